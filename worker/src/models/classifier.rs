//! A text classifier on the sentence encoder: a linear head over MiniLM's sentence vectors,
//! trained with candle's autograd (cross-entropy, AdamW written out here so its moments can be
//! checkpointed and a resumed training continues exactly where it stopped). Checkpoints and the
//! trained model are safetensors files whose metadata header (`capibara`) says what they are.
//!
//! The training is deterministic: the split and the order of examples come from the seed, the
//! head starts at zero, and the same features give the same steps, so the same seed on the same
//! data gives the same metrics, and a resumed training the metrics of one that never stopped.

use std::{collections::HashMap, time::Instant};

use candle_core::{DType, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::Config;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::bert::{attention_bias, mean_pool, Layer};

pub use capibara_shared::domain::model::{ModelInfo, MODEL_FORMAT};
/// The `format` of a checkpoint file.
pub const CHECKPOINT_FORMAT: &str = "capibara-classifier-checkpoint/1";
/// The metadata key holding a file's description (JSON).
use capibara_shared::domain::model::MODEL_META_KEY as META_KEY;

// AdamW's constants (PyTorch's defaults; the weight decay is transformers' usual 0.01).
const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
const WEIGHT_DECAY: f64 = 0.01;

#[derive(Debug, thiserror::Error)]
pub enum ClassifierError {
    /// The bytes are not a model or checkpoint of this format.
    #[error("not a Capibara classifier file: {0}")]
    Format(String),
    #[error("training: {0}")]
    Run(String),
    #[error("canceled")]
    Canceled,
}

fn run(e: impl std::fmt::Display) -> ClassifierError {
    ClassifierError::Run(e.to_string())
}

fn format_err(e: impl std::fmt::Display) -> ClassifierError {
    ClassifierError::Format(e.to_string())
}

/// A trained model, ready to classify: its head, and the encoder layers it trained.
pub struct Classifier {
    info: ModelInfo,
    w: Tensor,
    b: Tensor,
    top: Option<Top>,
    /// The trained layers' tensors by name (what the model file stores of them).
    top_tensors: Vec<(String, Tensor)>,
}

/// The encoder's last layers that a training trains: they read the token states the frozen
/// layers below them wrote, and their mean-pooled output is what the head reads.
pub struct Top {
    layers: Vec<Layer>,
}

impl Top {
    /// Layers `first..` of the model from `vb` (named as in the base model's file).
    fn load(vb: VarBuilder, config: &Config, first: usize) -> candle_core::Result<Top> {
        Ok(Top {
            layers: (first..config.num_hidden_layers)
                .map(|i| Layer::load(vb.clone(), config, i))
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// The sentence vectors of texts whose token states are `states` ([tokens, hidden] each).
    fn pooled(&self, states: &[&Tensor]) -> candle_core::Result<Tensor> {
        let longest = states
            .iter()
            .map(|s| s.dim(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let t = longest.iter().copied().max().unwrap_or(0);
        let mut padded = Vec::with_capacity(states.len());
        let mut mask = Vec::with_capacity(states.len() * t);
        for (s, n) in states.iter().zip(&longest) {
            padded.push(s.pad_with_zeros(0, 0, t - n)?);
            mask.extend((0..t).map(|i| u32::from(i < *n)));
        }
        let mut x = Tensor::stack(&padded, 0)?;
        let mask = Tensor::from_vec(mask, (states.len(), t), super::device::get())?;
        let bias = attention_bias(&mask)?;
        for l in &self.layers {
            x = l.forward(&x, &bias)?;
        }
        mean_pool(&x, &mask)
    }
}

/// What the head is trained on, per example: the frozen encoder's sentence vector (no layer
/// trained), or the token states the trained layers read.
pub enum Features<'a> {
    Vectors(&'a [Vec<f32>]),
    States(&'a [Tensor]),
}

fn logits(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)?.broadcast_add(b)
}

fn matrix(rows: &[Vec<f32>]) -> Result<Tensor, ClassifierError> {
    let d = rows.first().map_or(0, Vec::len);
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), d), super::device::get()).map_err(run)
}

/// Serialize `tensors` with `meta` as the file's description.
fn to_safetensors(
    tensors: &[(&str, &Tensor)],
    meta: &impl Serialize,
) -> Result<Vec<u8>, ClassifierError> {
    let header = HashMap::from([(
        META_KEY.to_string(),
        serde_json::to_string(meta).map_err(run)?,
    )]);
    safetensors::serialize(tensors.iter().map(|(n, t)| (*n, *t)), Some(header)).map_err(run)
}

/// The tensors and the description of a file of ours.
fn from_safetensors<M: for<'a> Deserialize<'a>>(
    bytes: &[u8],
) -> Result<(HashMap<String, Tensor>, M), ClassifierError> {
    let meta: M = description(bytes)?;
    let tensors =
        candle_core::safetensors::load_buffer(bytes, super::device::get()).map_err(format_err)?;
    Ok((tensors, meta))
}

fn take(t: &mut HashMap<String, Tensor>, name: &str) -> Result<Tensor, ClassifierError> {
    t.remove(name)
        .ok_or_else(|| format_err(format!("no tensor `{name}`")))
}

/// What a model file says about itself, without reading its tensors.
pub fn model_info(bytes: &[u8]) -> Result<ModelInfo, ClassifierError> {
    description(bytes)
}

/// The description (`capibara` metadata) of a file of ours, without reading its tensors.
fn description<M: for<'a> Deserialize<'a>>(bytes: &[u8]) -> Result<M, ClassifierError> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(format_err)?;
    let meta = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| format_err("no `capibara` metadata"))?;
    serde_json::from_str(meta).map_err(format_err)
}

impl Classifier {
    /// Read a model file (`model.safetensors` of a training job); `config` is the base
    /// encoder's (for the layers a model trained).
    pub fn from_bytes(bytes: &[u8], config: &Config) -> Result<Classifier, ClassifierError> {
        let (mut t, info): (_, ModelInfo) = from_safetensors(bytes)?;
        if info.format != MODEL_FORMAT {
            return Err(format_err(format!("format `{}`", info.format)));
        }
        let (w, b) = (take(&mut t, "head.weight")?, take(&mut t, "head.bias")?);
        if w.dims2().map_err(format_err)?.0 != info.labels.len()
            || b.dims1().map_err(format_err)? != info.labels.len()
        {
            return Err(format_err("the head's shape does not fit its labels"));
        }
        let n = info.train_layers as usize;
        let (top, top_tensors) = if n == 0 {
            (None, Vec::new())
        } else {
            if n > config.num_hidden_layers {
                return Err(format_err("more trained layers than the encoder has"));
            }
            let mut named: Vec<(String, Tensor)> =
                t.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            let vb = VarBuilder::from_tensors(t, DType::F32, super::device::get());
            let top = Top::load(vb, config, config.num_hidden_layers - n).map_err(format_err)?;
            (Some(top), named)
        };
        Ok(Classifier {
            info,
            w,
            b,
            top,
            top_tensors,
        })
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, ClassifierError> {
        let mut tensors: Vec<(&str, &Tensor)> =
            vec![("head.weight", &self.w), ("head.bias", &self.b)];
        tensors.extend(self.top_tensors.iter().map(|(n, t)| (n.as_str(), t)));
        to_safetensors(&tensors, &self.info)
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The first encoder layer this model trained (the frozen ones below it make its input).
    pub fn first_trained_layer(&self, config: &Config) -> usize {
        config.num_hidden_layers - self.info.train_layers as usize
    }

    /// Each example's probability per label (softmax of the head's outputs), in label order.
    pub fn probabilities(&self, features: Features) -> Result<Vec<Vec<f32>>, ClassifierError> {
        let x = match (&self.top, features) {
            (_, Features::Vectors([])) | (_, Features::States([])) => return Ok(Vec::new()),
            (None, Features::Vectors(v)) => matrix(v)?,
            (Some(top), Features::States(s)) => {
                let refs: Vec<&Tensor> = s.iter().collect();
                let mut out = Vec::new();
                for chunk in refs.chunks(32) {
                    out.push(top.pooled(chunk).map_err(run)?);
                }
                Tensor::cat(&out, 0).map_err(run)?
            }
            _ => return Err(run("the features do not fit the model")),
        };
        let p = candle_nn::ops::softmax(&logits(&x, &self.w, &self.b).map_err(run)?, D::Minus1)
            .map_err(run)?;
        p.to_vec2::<f32>().map_err(run)
    }
}

/// A training's settings: a checkpoint continues only a training with the same ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub base: String,
    pub labels: Vec<String>,
    pub max_length: u32,
    pub epochs: u32,
    pub learning_rate: f64,
    pub batch_size: u32,
    pub seed: u64,
    pub train_examples: usize,
    pub validation_examples: usize,
    /// The encoder's last layers trained with the head (0: the head alone).
    #[serde(default)]
    pub train_layers: u32,
    /// Their learning rate.
    #[serde(default)]
    pub encoder_learning_rate: f64,
}

impl TrainSettings {
    pub fn steps_per_epoch(&self) -> u64 {
        (self.train_examples as u64).div_ceil(u64::from(self.batch_size.max(1)))
    }

    pub fn total_steps(&self) -> u64 {
        self.steps_per_epoch() * u64::from(self.epochs)
    }
}

/// The examples' features and their label indices: sentence vectors (`x`) when no encoder
/// layer is trained, else the token states the trained layers read (`states`).
#[derive(Debug, Clone, Default)]
pub struct Data {
    pub x: Vec<Vec<f32>>,
    pub states: Vec<Tensor>,
    pub y: Vec<u32>,
}

impl Data {
    fn features(&self) -> Features<'_> {
        if self.states.is_empty() {
            Features::Vectors(&self.x)
        } else {
            Features::States(&self.states)
        }
    }
}

/// Sums over the current epoch's steps so far (for its mean loss and accuracy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Sums {
    loss: f64,
    correct: u64,
    seen: u64,
}

impl Sums {
    fn mean_loss(&self) -> f64 {
        self.loss / self.seen.max(1) as f64
    }
    fn accuracy(&self) -> f64 {
        self.correct as f64 / self.seen.max(1) as f64
    }
}

/// What a checkpoint file's description holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointMeta {
    format: String,
    settings: TrainSettings,
    /// Steps done.
    step: u64,
    epoch: Sums,
}

/// Where a training was: its weights, AdamW's moments, the steps done and the current epoch's
/// sums so far.
pub struct Checkpoint {
    meta: CheckpointMeta,
    tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint, ClassifierError> {
        let (tensors, meta): (_, CheckpointMeta) = from_safetensors(bytes)?;
        if meta.format != CHECKPOINT_FORMAT {
            return Err(format_err(format!("format `{}`", meta.format)));
        }
        Ok(Checkpoint { meta, tensors })
    }

    /// Steps done.
    pub fn step(&self) -> u64 {
        self.meta.step
    }

    pub fn settings(&self) -> &TrainSettings {
        &self.meta.settings
    }
}

/// What a training tells as it goes.
pub enum TrainEvent {
    /// A `JobProgress` report: `percent` and `data` (step, loss, accuracy, examples/s, ETA, …).
    Progress {
        percent: f64,
        message: String,
        data: serde_json::Value,
    },
    /// A checkpoint to store, after `step` steps.
    Checkpoint { step: u64, bytes: Vec<u8> },
}

/// A finished training.
pub struct Trained {
    pub classifier: Classifier,
    pub steps: u64,
    /// The last epoch's mean training loss and accuracy.
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub validation: Option<(f64, f64)>,
    /// Examples this run stepped through, and its seconds.
    pub examples: u64,
    pub seconds: f64,
    pub checkpoints: u32,
}

/// One parameter and AdamW's moments of it.
struct Param {
    var: Var,
    m: Tensor,
    v: Tensor,
}

impl Param {
    fn new(var: Var, m: Tensor, v: Tensor) -> Param {
        Param { var, m, v }
    }

    /// One AdamW step (decoupled weight decay) at step `t` (from 1).
    fn step(&mut self, grad: &Tensor, lr: f64, t: u64) -> candle_core::Result<()> {
        self.m = ((&self.m * BETA1)? + (grad * (1.0 - BETA1))?)?;
        self.v = ((&self.v * BETA2)? + (grad.sqr()? * (1.0 - BETA2))?)?;
        let m_hat = (&self.m / (1.0 - BETA1.powi(t as i32)))?;
        let v_hat = (&self.v / (1.0 - BETA2.powi(t as i32)))?;
        let update = (m_hat / (v_hat.sqrt()? + EPS)?)?;
        let decayed = (self.var.as_tensor() * (1.0 - lr * WEIGHT_DECAY))?;
        self.var.set(&(decayed - (update * lr)?)?)
    }
}

/// The order of the training examples in epoch `epoch` (from the seed alone).
fn order(seed: u64, epoch: u64, n: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..n as u32).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    idx.shuffle(&mut rng);
    idx
}

/// Mean loss and accuracy of `head` on `data`.
fn evaluate(head: &Classifier, data: &Data) -> Result<(f64, f64), ClassifierError> {
    let p = head.probabilities(data.features())?;
    let mut loss = 0.0;
    let mut correct = 0;
    for (row, &y) in p.iter().zip(&data.y) {
        loss -= f64::from(row[y as usize].max(1e-12)).ln();
        if argmax(row) == y as usize {
            correct += 1;
        }
    }
    let n = data.y.len().max(1) as f64;
    Ok((loss / n, f64::from(correct) / n))
}

pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |best, (i, &p)| if p > best.1 { (i, p) } else { best },
        )
        .0
}

/// The base encoder a training's layers start from: its configuration and its weights by name.
#[derive(Clone, Copy)]
pub struct Encoder<'a> {
    pub config: &'a Config,
    pub weights: &'a HashMap<String, Tensor>,
}

/// Where a training starts: a checkpoint to continue, and the base encoder its layers start
/// from (needed when it trains encoder layers).
#[derive(Default)]
pub struct Start<'a> {
    pub checkpoint: Option<Checkpoint>,
    pub encoder: Option<Encoder<'a>>,
}

/// How often a training reports and stores checkpoints.
#[derive(Debug, Clone, Copy)]
pub struct Cadence {
    pub progress_every: u64,
    pub checkpoint_every: u64,
}

/// Train the head on `train` (from `from` when given), evaluating on `validation` after each
/// epoch. CPU-bound: call it off the async runtime. Stops with [`ClassifierError::Canceled`]
/// between two steps once `cancel` is cancelled.
pub fn train(
    settings: &TrainSettings,
    train: &Data,
    validation: &Data,
    start: Start<'_>,
    cadence: Cadence,
    cancel: &CancellationToken,
    emit: &mut dyn FnMut(TrainEvent),
) -> Result<Trained, ClassifierError> {
    let Start {
        checkpoint: from,
        encoder,
    } = start;
    let started = Instant::now();
    let c = settings.labels.len();
    let d = train
        .x
        .first()
        .map(Vec::len)
        .or_else(|| train.states.first().and_then(|s| s.dim(1).ok()))
        .unwrap_or(0);
    let x_all = if train.states.is_empty() {
        Some(matrix(&train.x)?)
    } else {
        None
    };
    let y_all = Tensor::new(train.y.as_slice(), super::device::get()).map_err(run)?;
    let zeros =
        |shape: &[usize]| Tensor::zeros(shape, DType::F32, super::device::get()).map_err(run);
    // The trained encoder layers: variables named as in the base model's file, starting from
    // its weights.
    let varmap = VarMap::new();
    let (top, config) = match (settings.train_layers, encoder) {
        (0, _) => (None, None),
        (n, Some(e)) => {
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, super::device::get());
            let first = e.config.num_hidden_layers - n as usize;
            let top = Top::load(vb, e.config, first).map_err(run)?;
            for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
                let base = e
                    .weights
                    .get(name)
                    .ok_or_else(|| run(format!("the base model has no `{name}`")))?;
                var.set(base).map_err(run)?;
            }
            (Some(top), Some(e.config))
        }
        (_, None) => return Err(run("training encoder layers needs the encoder")),
    };
    // Every parameter by name: the head's, then the trained layers' in name order.
    let mut names = vec!["head.weight".to_string(), "head.bias".to_string()];
    let mut vars: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    names.extend(vars.iter().map(|(k, _)| k.clone()));
    let (mut params, mut step, mut epoch_sums) = match from {
        Some(mut cp) => {
            if cp.meta.settings != *settings {
                return Err(run(
                    "the checkpoint is of a training with other settings or examples",
                ));
            }
            let t = &mut cp.tensors;
            let mut params = Vec::with_capacity(names.len());
            for (i, name) in names.iter().enumerate() {
                let value = take(t, name)?;
                let var = if i < 2 {
                    Var::from_tensor(&value).map_err(run)?
                } else {
                    let v = vars[i - 2].1.clone();
                    v.set(&value).map_err(run)?;
                    v
                };
                params.push(Param::new(
                    var,
                    take(t, &format!("adam.m.{name}"))?,
                    take(t, &format!("adam.v.{name}"))?,
                ));
            }
            (params, cp.meta.step, cp.meta.epoch)
        }
        None => {
            let mut params = vec![
                Param::new(
                    Var::from_tensor(&zeros(&[c, d])?).map_err(run)?,
                    zeros(&[c, d])?,
                    zeros(&[c, d])?,
                ),
                Param::new(
                    Var::from_tensor(&zeros(&[c])?).map_err(run)?,
                    zeros(&[c])?,
                    zeros(&[c])?,
                ),
            ];
            for (_, v) in &vars {
                params.push(Param::new(
                    v.clone(),
                    v.as_tensor().zeros_like().map_err(run)?,
                    v.as_tensor().zeros_like().map_err(run)?,
                ));
            }
            (params, 0, Sums::default())
        }
    };
    let snapshot = |params: &[Param]| -> Result<Classifier, ClassifierError> {
        let copy = |p: &Param| p.var.as_tensor().copy().map_err(run);
        let top_tensors = params[2..]
            .iter()
            .zip(&names[2..])
            .map(|(p, n)| Ok((n.clone(), copy(p)?)))
            .collect::<Result<Vec<_>, ClassifierError>>()?;
        let top = match config {
            Some(cfg) => {
                let map: HashMap<String, Tensor> = top_tensors.iter().cloned().collect();
                let vb = VarBuilder::from_tensors(map, DType::F32, super::device::get());
                let first = cfg.num_hidden_layers - settings.train_layers as usize;
                Some(Top::load(vb, cfg, first).map_err(run)?)
            }
            None => None,
        };
        Ok(Classifier {
            info: ModelInfo {
                format: MODEL_FORMAT.into(),
                base: settings.base.clone(),
                labels: settings.labels.clone(),
                max_length: settings.max_length,
                train_layers: settings.train_layers,
            },
            w: copy(&params[0])?,
            b: copy(&params[1])?,
            top,
            top_tensors,
        })
    };
    let spe = settings.steps_per_epoch();
    let total = settings.total_steps();
    let bs = settings.batch_size as usize;
    let n = train.y.len();
    let mut window = Sums::default();
    let mut examples = 0u64;
    let mut checkpoints = 0;
    let mut perm = order(settings.seed, step / spe.max(1), n);
    let mut last_epoch = Sums::default();
    let mut validation_result = None;
    while step < total {
        if cancel.is_cancelled() {
            return Err(ClassifierError::Canceled);
        }
        let (epoch, k) = (step / spe, (step % spe) as usize);
        if k == 0 {
            perm = order(settings.seed, epoch, n);
            epoch_sums = Sums::default();
        }
        let rows = &perm[k * bs..((k + 1) * bs).min(n)];
        let idx = Tensor::new(rows, super::device::get()).map_err(run)?;
        let xb = match (&x_all, &top) {
            (Some(x), _) => x.index_select(&idx, 0).map_err(run)?,
            (None, Some(top)) => {
                let states: Vec<&Tensor> =
                    rows.iter().map(|r| &train.states[*r as usize]).collect();
                top.pooled(&states).map_err(run)?
            }
            (None, None) => return Err(run("token states without layers to train")),
        };
        let yb = y_all.index_select(&idx, 0).map_err(run)?;
        let out = logits(&xb, params[0].var.as_tensor(), params[1].var.as_tensor()).map_err(run)?;
        let loss = candle_nn::loss::cross_entropy(&out, &yb).map_err(run)?;
        let grads = loss.backward().map_err(run)?;
        let t = step + 1;
        for (i, p) in params.iter_mut().enumerate() {
            let g = grads
                .get(p.var.as_tensor())
                .ok_or_else(|| run("no gradient for a parameter"))?
                .clone();
            let lr = if i < 2 {
                settings.learning_rate
            } else {
                settings.encoder_learning_rate
            };
            p.step(&g, lr, t).map_err(run)?;
        }
        let loss = f64::from(loss.to_scalar::<f32>().map_err(run)?);
        let predicted = out.argmax(D::Minus1).map_err(run)?;
        let correct = predicted
            .eq(&yb)
            .and_then(|e| e.to_dtype(DType::U32))
            .and_then(|e| e.sum_all())
            .and_then(|e| e.to_scalar::<u32>())
            .map_err(run)?;
        for s in [&mut epoch_sums, &mut window] {
            s.loss += loss * rows.len() as f64;
            s.correct += u64::from(correct);
            s.seen += rows.len() as u64;
        }
        examples += rows.len() as u64;
        step = t;
        let epoch_end = k as u64 + 1 == spe;
        if epoch_end {
            last_epoch = epoch_sums;
            validation_result = if validation.y.is_empty() {
                None
            } else {
                Some(evaluate(&snapshot(&params)?, validation)?)
            };
        }
        if step % cadence.progress_every == 0 || epoch_end || step == total {
            let secs = started.elapsed().as_secs_f64();
            let rate = examples as f64 / secs.max(1e-9);
            let left = (total - step) as f64 * bs as f64 / rate.max(1e-9);
            let mut data = json!({
                "step": step,
                "total_steps": total,
                "epoch": epoch + 1,
                "epochs": settings.epochs,
                "loss": window.mean_loss(),
                "accuracy": window.accuracy(),
                "examples_per_s": rate,
                "eta_s": left,
            });
            if epoch_end {
                data["epoch_loss"] = json!(last_epoch.mean_loss());
                data["epoch_accuracy"] = json!(last_epoch.accuracy());
                if let Some((l, a)) = validation_result {
                    data["validation_loss"] = json!(l);
                    data["validation_accuracy"] = json!(a);
                }
            }
            emit(TrainEvent::Progress {
                percent: 100.0 * step as f64 / total.max(1) as f64,
                message: format!(
                    "step {step}/{total}, epoch {}/{}, loss {:.4}",
                    epoch + 1,
                    settings.epochs,
                    window.mean_loss()
                ),
                data,
            });
            window = Sums::default();
        }
        if step % cadence.checkpoint_every == 0 && step < total {
            let meta = CheckpointMeta {
                format: CHECKPOINT_FORMAT.into(),
                settings: settings.clone(),
                step,
                epoch: epoch_sums,
            };
            let moments: Vec<(String, &Tensor)> = params
                .iter()
                .zip(&names)
                .flat_map(|(p, n)| [(format!("adam.m.{n}"), &p.m), (format!("adam.v.{n}"), &p.v)])
                .collect();
            let mut tensors: Vec<(&str, &Tensor)> = params
                .iter()
                .zip(&names)
                .map(|(p, n)| (n.as_str(), p.var.as_tensor()))
                .collect();
            tensors.extend(moments.iter().map(|(n, t)| (n.as_str(), *t)));
            let bytes = to_safetensors(&tensors, &meta)?;
            emit(TrainEvent::Checkpoint { step, bytes });
            checkpoints += 1;
        }
    }
    Ok(Trained {
        classifier: snapshot(&params)?,
        steps: step,
        train_loss: last_epoch.mean_loss(),
        train_accuracy: last_epoch.accuracy(),
        validation: validation_result,
        examples,
        seconds: started.elapsed().as_secs_f64(),
        checkpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two well-separated clusters per label in 8 dimensions.
    fn toy(n: usize, seed: u64) -> Data {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut data = Data::default();
        for i in 0..n {
            let y = (i % 3) as u32;
            let x: Vec<f32> = (0..8)
                .map(|j| {
                    let centre = if j == y as usize { 1.0 } else { 0.0 };
                    centre + rand::Rng::random_range(&mut rng, -0.3..0.3)
                })
                .collect();
            data.x.push(x);
            data.y.push(y);
        }
        data
    }

    fn settings(epochs: u32) -> TrainSettings {
        TrainSettings {
            base: "all-minilm-l6-v2".into(),
            labels: vec!["a".into(), "b".into(), "c".into()],
            max_length: 64,
            epochs,
            learning_rate: 0.05,
            batch_size: 8,
            seed: 7,
            train_examples: 60,
            validation_examples: 30,
            train_layers: 0,
            encoder_learning_rate: 0.0,
        }
    }

    fn run_training(
        from: Option<Checkpoint>,
        cancel_at: Option<u64>,
    ) -> (
        Result<Trained, ClassifierError>,
        Vec<Vec<u8>>,
        Vec<serde_json::Value>,
    ) {
        let (train_set, val) = (toy(60, 1), toy(30, 2));
        let cancel = CancellationToken::new();
        let mut checkpoints = Vec::new();
        let mut progress = Vec::new();
        let out = train(
            &settings(10),
            &train_set,
            &val,
            Start {
                checkpoint: from,
                encoder: None,
            },
            Cadence {
                progress_every: 5,
                checkpoint_every: 12,
            },
            &cancel,
            &mut |e| match e {
                TrainEvent::Checkpoint { step, bytes } => {
                    checkpoints.push(bytes);
                    if Some(step) == cancel_at {
                        cancel.cancel();
                    }
                }
                TrainEvent::Progress { data, .. } => progress.push(data),
            },
        );
        (out, checkpoints, progress)
    }

    /// A two-layer encoder of width 8 with random weights, and examples as token states whose
    /// label shows in their first dimension.
    fn tiny() -> (Config, HashMap<String, Tensor>, Data, Data) {
        let config: Config = serde_json::from_value(json!({
            "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 16, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0, "max_position_embeddings": 16, "type_vocab_size": 2,
            "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
            "position_embedding_type": "absolute", "use_cache": false,
            "classifier_dropout": null, "model_type": "bert"}))
        .unwrap();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        Top::load(vb, &config, 0).unwrap();
        let weights: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                // Layer norms start as the identity (their weights are not drawn at random).
                let t = v.as_tensor();
                let t = if k.ends_with("LayerNorm.weight") {
                    t.ones_like().unwrap()
                } else {
                    t.copy().unwrap()
                };
                (k.clone(), t)
            })
            .collect();
        let mut rng = StdRng::seed_from_u64(9);
        let mut set = |n: usize| {
            let mut d = Data::default();
            for i in 0..n {
                let y = (i % 2) as u32;
                let t = 3 + i % 4;
                let v: Vec<f32> = (0..t * 8)
                    .map(|j| {
                        let signal = if j % 8 == 0 {
                            y as f32 * 2.0 - 1.0
                        } else {
                            0.0
                        };
                        signal + rand::Rng::random_range(&mut rng, -0.5..0.5)
                    })
                    .collect();
                d.states
                    .push(Tensor::from_vec(v, (t, 8), &Device::Cpu).unwrap());
                d.y.push(y);
            }
            d
        };
        let (train_set, validation) = (set(40), set(20));
        (config, weights, train_set, validation)
    }

    /// Training an encoder layer with the head: it learns, checkpoints hold the layer and its
    /// moments, and a resumed training ends as one that never stopped.
    #[test]
    fn trains_encoder_layers_and_resumes_exactly() {
        let (config, weights, train_set, validation) = tiny();
        let mut s = settings(30);
        s.labels = vec!["a".into(), "b".into()];
        s.train_examples = 40;
        s.validation_examples = 20;
        s.train_layers = 1;
        s.encoder_learning_rate = 0.01;
        let encoder = Encoder {
            config: &config,
            weights: &weights,
        };
        let run_it = |from: Option<Checkpoint>, stop_at: Option<u64>| {
            let cancel = CancellationToken::new();
            let mut cps = Vec::new();
            let out = train(
                &s,
                &train_set,
                &validation,
                Start {
                    checkpoint: from,
                    encoder: Some(encoder),
                },
                Cadence {
                    progress_every: 100,
                    checkpoint_every: 7,
                },
                &cancel,
                &mut |e| {
                    if let TrainEvent::Checkpoint { step, bytes } = e {
                        cps.push(bytes);
                        if Some(step) == stop_at {
                            cancel.cancel();
                        }
                    }
                },
            );
            (out, cps)
        };
        let (full, _) = run_it(None, None);
        let full = full.unwrap();
        let (_, accuracy) = full.validation.unwrap();
        assert!(accuracy > 0.9, "{accuracy}");
        let (stopped, cps) = run_it(None, Some(14));
        assert!(matches!(stopped, Err(ClassifierError::Canceled)));
        let cp = Checkpoint::from_bytes(cps.last().unwrap()).unwrap();
        let (resumed, _) = run_it(Some(cp), None);
        let resumed = resumed.unwrap();
        assert_eq!(resumed.validation, full.validation);
        assert_eq!(resumed.train_loss, full.train_loss);
        // The model file holds the trained layer: read back, it classifies the same.
        let read = Classifier::from_bytes(&full.classifier.to_bytes().unwrap(), &config).unwrap();
        assert_eq!(read.info().train_layers, 1);
        assert_eq!(
            read.probabilities(Features::States(&validation.states))
                .unwrap(),
            full.classifier
                .probabilities(Features::States(&validation.states))
                .unwrap()
        );
    }

    #[test]
    fn learns_reports_and_resumes_exactly() {
        let (full, checkpoints, progress) = run_training(None, None);
        let full = full.unwrap();
        assert_eq!(full.steps, 80);
        assert_eq!(checkpoints.len(), 6, "steps 12, 24, …, 72");
        let (vl, va) = full.validation.unwrap();
        assert!(va > 0.95 && vl < 0.5, "{va} {vl}");
        assert!(progress
            .iter()
            .any(|p| p["validation_accuracy"].is_number()));
        assert!(progress.iter().all(|p| p["eta_s"].is_number()));
        // The same seed again: the same figures.
        let again = run_training(None, None).0.unwrap();
        assert_eq!(again.validation, full.validation);
        assert_eq!(again.train_loss, full.train_loss);
        // Stopped after the third checkpoint (mid-epoch: 8 steps an epoch), resumed from it:
        // the same end.
        let (stopped, cps, _) = run_training(None, Some(36));
        assert!(matches!(stopped, Err(ClassifierError::Canceled)));
        let cp = Checkpoint::from_bytes(cps.last().unwrap()).unwrap();
        assert_eq!(cp.step(), 36);
        let resumed = run_training(Some(cp), None).0.unwrap();
        assert_eq!(resumed.validation, full.validation);
        assert_eq!(resumed.train_loss, full.train_loss);
        assert_eq!(
            resumed.examples,
            3 * 8 + 4 + 5 * 60,
            "the rest of the steps only"
        );
        // The model file round-trips and classifies as the trained head does.
        let bytes = full.classifier.to_bytes().unwrap();
        let read = Classifier::from_bytes(&bytes, &Config::default()).unwrap();
        assert_eq!(read.info().labels, vec!["a", "b", "c"]);
        let val = toy(30, 2);
        assert_eq!(
            read.probabilities(Features::Vectors(&val.x)).unwrap(),
            full.classifier
                .probabilities(Features::Vectors(&val.x))
                .unwrap()
        );
        // A checkpoint is not a model, and a model not a checkpoint.
        assert!(Classifier::from_bytes(&cps[0], &Config::default()).is_err());
        assert!(Checkpoint::from_bytes(&bytes).is_err());
        // A checkpoint of other settings is refused.
        let mut other = settings(10);
        other.seed = 8;
        let cp = Checkpoint::from_bytes(&cps[0]).unwrap();
        let err = train(
            &other,
            &toy(60, 1),
            &toy(30, 2),
            Start {
                checkpoint: Some(cp),
                encoder: None,
            },
            Cadence {
                progress_every: 5,
                checkpoint_every: 16,
            },
            &CancellationToken::new(),
            &mut |_| {},
        );
        assert!(matches!(err, Err(ClassifierError::Run(_))));
    }
}
