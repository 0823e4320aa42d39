//! A text classifier on the sentence encoder: a linear head over MiniLM's sentence vectors,
//! trained with candle's autograd (cross-entropy, AdamW written out here so its moments can be
//! checkpointed and a resumed training continues exactly where it stopped). Checkpoints and the
//! trained model are safetensors files whose metadata header (`capibara`) says what they are.
//!
//! The training is deterministic: the split and the order of examples come from the seed, the
//! head starts at zero, and the same features give the same steps, so the same seed on the same
//! data gives the same metrics, and a resumed training the metrics of one that never stopped.

use std::{collections::HashMap, time::Instant};

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The `format` of a trained model file.
pub const MODEL_FORMAT: &str = "capibara-classifier/1";
/// The `format` of a checkpoint file.
pub const CHECKPOINT_FORMAT: &str = "capibara-classifier-checkpoint/1";
/// The metadata key holding a file's description (JSON).
const META_KEY: &str = "capibara";

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

/// What a trained model file says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub format: String,
    /// The encoder the head reads (`all-minilm-l6-v2`).
    pub base: String,
    /// The classes, in the order of the head's outputs.
    pub labels: Vec<String>,
    /// Tokens of a text the encoder reads for it.
    pub max_length: u32,
}

/// A trained head, ready to classify sentence vectors.
pub struct Classifier {
    info: ModelInfo,
    w: Tensor,
    b: Tensor,
}

fn logits(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)?.broadcast_add(b)
}

fn matrix(rows: &[Vec<f32>]) -> Result<Tensor, ClassifierError> {
    let d = rows.first().map_or(0, Vec::len);
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), d), &Device::Cpu).map_err(run)
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
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(format_err)?;
    let meta = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| format_err("no `capibara` metadata"))?;
    let meta: M = serde_json::from_str(meta).map_err(format_err)?;
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(format_err)?;
    Ok((tensors, meta))
}

fn take(t: &mut HashMap<String, Tensor>, name: &str) -> Result<Tensor, ClassifierError> {
    t.remove(name)
        .ok_or_else(|| format_err(format!("no tensor `{name}`")))
}

impl Classifier {
    /// Read a model file (`model.safetensors` of a training job).
    pub fn from_bytes(bytes: &[u8]) -> Result<Classifier, ClassifierError> {
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
        Ok(Classifier { info, w, b })
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, ClassifierError> {
        to_safetensors(
            &[("head.weight", &self.w), ("head.bias", &self.b)],
            &self.info,
        )
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Each row's probability per label (softmax of the head's outputs), in label order.
    pub fn probabilities(&self, features: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, ClassifierError> {
        if features.is_empty() {
            return Ok(Vec::new());
        }
        let x = matrix(features)?;
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
}

impl TrainSettings {
    pub fn steps_per_epoch(&self) -> u64 {
        (self.train_examples as u64).div_ceil(u64::from(self.batch_size.max(1)))
    }

    pub fn total_steps(&self) -> u64 {
        self.steps_per_epoch() * u64::from(self.epochs)
    }
}

/// Sentence vectors and their label indices.
#[derive(Debug, Clone, Default)]
pub struct Data {
    pub x: Vec<Vec<f32>>,
    pub y: Vec<u32>,
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
    let p = head.probabilities(&data.x)?;
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
    from: Option<Checkpoint>,
    cadence: Cadence,
    cancel: &CancellationToken,
    emit: &mut dyn FnMut(TrainEvent),
) -> Result<Trained, ClassifierError> {
    let started = Instant::now();
    let (c, d) = (settings.labels.len(), train.x.first().map_or(0, Vec::len));
    let x_all = matrix(&train.x)?;
    let y_all = Tensor::new(train.y.as_slice(), &Device::Cpu).map_err(run)?;
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).map_err(run);
    let (mut w, mut b, mut step, mut epoch_sums) = match from {
        Some(mut cp) => {
            if cp.meta.settings != *settings {
                return Err(run(
                    "the checkpoint is of a training with other settings or examples",
                ));
            }
            let t = &mut cp.tensors;
            let w = Param::new(
                Var::from_tensor(&take(t, "head.weight")?).map_err(run)?,
                take(t, "adam.m.head.weight")?,
                take(t, "adam.v.head.weight")?,
            );
            let b = Param::new(
                Var::from_tensor(&take(t, "head.bias")?).map_err(run)?,
                take(t, "adam.m.head.bias")?,
                take(t, "adam.v.head.bias")?,
            );
            (w, b, cp.meta.step, cp.meta.epoch)
        }
        None => (
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
            0,
            Sums::default(),
        ),
    };
    let head = |w: &Param, b: &Param| Classifier {
        info: ModelInfo {
            format: MODEL_FORMAT.into(),
            base: settings.base.clone(),
            labels: settings.labels.clone(),
            max_length: settings.max_length,
        },
        w: w.var.as_tensor().copy().expect("a copy of a CPU tensor"),
        b: b.var.as_tensor().copy().expect("a copy of a CPU tensor"),
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
        let idx = Tensor::new(rows, &Device::Cpu).map_err(run)?;
        let xb = x_all.index_select(&idx, 0).map_err(run)?;
        let yb = y_all.index_select(&idx, 0).map_err(run)?;
        let out = logits(&xb, w.var.as_tensor(), b.var.as_tensor()).map_err(run)?;
        let loss = candle_nn::loss::cross_entropy(&out, &yb).map_err(run)?;
        let grads = loss.backward().map_err(run)?;
        let t = step + 1;
        for p in [&mut w, &mut b] {
            let g = grads
                .get(p.var.as_tensor())
                .ok_or_else(|| run("no gradient for a parameter"))?
                .clone();
            p.step(&g, settings.learning_rate, t).map_err(run)?;
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
                Some(evaluate(&head(&w, &b), validation)?)
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
            let bytes = to_safetensors(
                &[
                    ("head.weight", w.var.as_tensor()),
                    ("head.bias", b.var.as_tensor()),
                    ("adam.m.head.weight", &w.m),
                    ("adam.v.head.weight", &w.v),
                    ("adam.m.head.bias", &b.m),
                    ("adam.v.head.bias", &b.v),
                ],
                &meta,
            )?;
            emit(TrainEvent::Checkpoint { step, bytes });
            checkpoints += 1;
        }
    }
    Ok(Trained {
        classifier: head(&w, &b),
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
            from,
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
        let read = Classifier::from_bytes(&bytes).unwrap();
        assert_eq!(read.info().labels, vec!["a", "b", "c"]);
        let val = toy(30, 2);
        assert_eq!(
            read.probabilities(&val.x).unwrap(),
            full.classifier.probabilities(&val.x).unwrap()
        );
        // A checkpoint is not a model, and a model not a checkpoint.
        assert!(Classifier::from_bytes(&cps[0]).is_err());
        assert!(Checkpoint::from_bytes(&bytes).is_err());
        // A checkpoint of other settings is refused.
        let mut other = settings(10);
        other.seed = 8;
        let cp = Checkpoint::from_bytes(&cps[0]).unwrap();
        let err = train(
            &other,
            &toy(60, 1),
            &toy(30, 2),
            Some(cp),
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
