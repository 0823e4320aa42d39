//! `finetune.train`: read the examples (inline, a JSONL URL through the outbound guard, or a
//! JSONL artifact), split them per label by the seed, turn them into sentence vectors with the
//! process's encoder, train a classification head on them ([`crate::models::classifier`]) with
//! progress reports and checkpoint artifacts, and register the result as the next version of
//! the model's name, in the same commit as the job's success (docs/models.md).
//!
//! A later attempt of the same job (after a crash or a lost lease) continues from the job's own
//! last checkpoint; `resume_from` continues another job's.

use std::{collections::BTreeSet, sync::Arc, time::Instant};

use async_trait::async_trait;
use capibara_shared::{
    command,
    domain::{
        event::EventMetadata,
        job::{Artifact, JobError},
        kinds::{
            input,
            model::{
                check_examples, FinetuneTrainInput, FinetuneTrainOutput, TrainingExample,
                TrainingMetrics,
            },
        },
        model::{ModelName, ModelRef, ModelVersion, Registration},
        FieldError,
    },
};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde_json::json;
use uuid::Uuid;

use super::{builtin::to_output, content::ArtifactReader, ExecError, Executor, JobContext, Output};
use crate::{
    executors::embed::model_error,
    http::OutboundPolicy,
    models::{
        bert::SharedBase,
        classifier::{self, Cadence, Checkpoint, ClassifierError, Data, TrainEvent, TrainSettings},
        encoder::SharedEncoder,
    },
};

/// Largest examples file read (`examples_url`, `examples_artifact`).
pub const MAX_EXAMPLES_BYTES: usize = 64 * 1024 * 1024;
/// Texts turned into vectors between two progress reports.
const ENCODE_CHUNK: usize = 128;
const SAFETENSORS: &str = "application/octet-stream";

/// What the model kinds need of the store.
#[async_trait]
pub trait ModelStore: Send + Sync {
    /// The row of model name `name` (to number the next version).
    async fn name(&self, namespace: &str, name: &str) -> Result<Option<ModelName>, String>;
    /// The live version `reference` names.
    async fn resolve(
        &self,
        namespace: &str,
        reference: &ModelRef,
    ) -> Result<Option<ModelVersion>, String>;
    /// Job `id`'s kind and artifacts (its checkpoints).
    async fn job_artifacts(
        &self,
        namespace: &str,
        id: Uuid,
    ) -> Result<Option<(String, Vec<Artifact>)>, String>;
    async fn read(&self, artifact: &Artifact) -> Result<Vec<u8>, String>;
    async fn put(
        &self,
        job_id: Uuid,
        name: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> Result<Artifact, String>;
}

pub struct FinetuneTrain {
    pub encoder: Arc<SharedEncoder>,
    /// The encoder as layers that train (for `train_layers`).
    pub base: Arc<SharedBase>,
    pub models: Arc<dyn ModelStore>,
    /// For `examples_artifact`.
    pub reader: Arc<dyn ArtifactReader>,
    /// For `examples_url`.
    pub policy: OutboundPolicy,
}

fn abort(kind: &str, message: impl Into<String>) -> ExecError {
    ExecError::Abort(JobError::new(kind, message))
}

fn store_error(e: String) -> ExecError {
    ExecError::Retryable(JobError::new("store_unavailable", e))
}

/// Examples from a JSONL file: one `{"text", "label"}` object per line (blank lines skipped).
pub fn parse_jsonl(field: &str, bytes: &[u8]) -> Result<Vec<TrainingExample>, FieldError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| FieldError::new(field, format!("is not UTF-8 text: {e}")))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let example: TrainingExample = serde_json::from_str(line).map_err(|e| {
            FieldError::new(
                format!("{field}[{}]", out.len()),
                format!(
                    "line {}: not a {{\"text\": …, \"label\": …}} object: {e}",
                    n + 1
                ),
            )
        })?;
        out.push(example);
    }
    check_examples(field, &out)?;
    Ok(out)
}

/// Indices of the validation examples: `split` of each label's examples (at least one of each
/// label stays for training), chosen by `seed`.
pub fn split(examples: &[TrainingExample], split: f64, seed: u64) -> BTreeSet<usize> {
    let labels: BTreeSet<&str> = examples.iter().map(|e| e.label.as_str()).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut held = BTreeSet::new();
    for label in labels {
        let mut idx: Vec<usize> = (0..examples.len())
            .filter(|i| examples[*i].label == label)
            .collect();
        idx.shuffle(&mut rng);
        let k = ((idx.len() as f64 * split).round() as usize).min(idx.len() - 1);
        held.extend(idx.into_iter().take(k));
    }
    held
}

/// The step a checkpoint artifact was stored at (`checkpoint-00000100.safetensors`).
fn checkpoint_step(name: &str) -> Option<u64> {
    name.strip_prefix("checkpoint-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

impl FinetuneTrain {
    async fn examples(
        &self,
        ctx: &JobContext,
        input: &FinetuneTrainInput,
    ) -> Result<Vec<TrainingExample>, ExecError> {
        let invalid =
            |e: FieldError| abort("invalid_examples", format!("{}: {}", e.field, e.message));
        if let Some(examples) = &input.examples {
            return Ok(examples.clone());
        }
        if let Some(url) = &input.examples_url {
            let policy = OutboundPolicy {
                max_response_bytes: MAX_EXAMPLES_BYTES,
                timeout: std::time::Duration::from_secs(120),
                ..self.policy.clone()
            };
            let got = crate::fetch::get(&policy, url, &[], &ctx.cancel)
                .await
                .map_err(|e| match e {
                    crate::fetch::GetError::TooLarge(_) | crate::fetch::GetError::Http(_) => {
                        abort("examples_unavailable", format!("examples_url: {e}"))
                    }
                    e => ExecError::Retryable(JobError::new(
                        "examples_unavailable",
                        format!("examples_url: {e}"),
                    )),
                })?;
            if !(200..300).contains(&got.status) {
                let e = JobError::new(
                    "examples_unavailable",
                    format!("examples_url answered HTTP {}", got.status),
                );
                return Err(if got.status >= 500 || got.status == 429 {
                    ExecError::Retryable(e)
                } else {
                    ExecError::Abort(e)
                });
            }
            return parse_jsonl("examples_url", &got.body).map_err(invalid);
        }
        let a = input
            .examples_artifact
            .as_ref()
            .ok_or_else(|| abort("invalid_input", "no examples"))?;
        let bytes = self
            .reader
            .read(
                &ctx.job.namespace,
                a.job_id,
                &a.name,
                MAX_EXAMPLES_BYTES as u64,
            )
            .await
            .map_err(|e| {
                use super::content::ReadError::*;
                match e {
                    NotFound(m) | Unreadable(m) => abort("examples_unavailable", m),
                    TooLarge(n) => abort(
                        "examples_unavailable",
                        format!("the examples file has {n} bytes; at most {MAX_EXAMPLES_BYTES}"),
                    ),
                    Unavailable(m) => store_error(m),
                }
            })?;
        parse_jsonl("examples_artifact", &bytes).map_err(invalid)
    }

    /// The checkpoint to continue from: this job's own last one when an earlier attempt stored
    /// one, else `resume_from`'s last one.
    async fn checkpoint(
        &self,
        ctx: &JobContext,
        input: &FinetuneTrainInput,
    ) -> Result<Option<(Uuid, Checkpoint)>, ExecError> {
        let ns = &ctx.job.namespace;
        let mut sources = Vec::new();
        if ctx.attempt > 1 {
            sources.push((ctx.job_id, false));
        }
        if let Some(id) = input.resume_from {
            sources.push((id, true));
        }
        for (id, asked) in sources {
            let failed = |m: String| abort("resume_failed", format!("resume_from {id}: {m}"));
            let Some((kind, artifacts)) = self
                .models
                .job_artifacts(ns, id)
                .await
                .map_err(store_error)?
            else {
                return Err(failed("no such job in this namespace".into()));
            };
            if kind != "finetune.train" {
                return Err(failed(format!("is a `{kind}` job, not `finetune.train`")));
            }
            let last = artifacts
                .iter()
                .filter_map(|a| checkpoint_step(&a.name).map(|s| (s, a)))
                .max_by_key(|(s, _)| *s);
            let Some((_, artifact)) = last else {
                if asked {
                    return Err(failed("the job stored no checkpoint".into()));
                }
                continue;
            };
            let bytes = self.models.read(artifact).await.map_err(store_error)?;
            let cp = Checkpoint::from_bytes(&bytes).map_err(|e| failed(e.to_string()))?;
            return Ok(Some((id, cp)));
        }
        Ok(None)
    }
}

#[async_trait]
impl Executor for FinetuneTrain {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let input: FinetuneTrainInput = input::parse(&ctx.input)
            .map_err(|e| abort("invalid_input", format!("{}: {}", e.field, e.message)))?;
        let started = Instant::now();
        let examples = self.examples(&ctx, &input).await?;
        let labels: Vec<String> = examples
            .iter()
            .map(|e| e.label.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let held = split(&examples, input.validation_split(), input.seed());
        let settings = TrainSettings {
            base: input.base_model().to_string(),
            labels: labels.clone(),
            max_length: input.max_length(),
            epochs: input.epochs(),
            learning_rate: input.learning_rate(),
            batch_size: input.batch_size(),
            seed: input.seed(),
            train_examples: examples.len() - held.len(),
            validation_examples: held.len(),
            train_layers: input.trained_layers(),
            encoder_learning_rate: if input.trained_layers() > 0 {
                input.encoder_learning_rate()
            } else {
                0.0
            },
        };
        let from = self.checkpoint(&ctx, &input).await?;
        if let Some((job, cp)) = &from {
            if cp.settings() != &settings {
                return Err(abort(
                    "resume_failed",
                    format!(
                        "the checkpoint of job {job} is of a training with other settings or \
                         examples (labels, split, epochs, learning rate, batch size, seed and \
                         max_length must be the same)"
                    ),
                ));
            }
        }
        let resumed_from_step = from.as_ref().map(|(_, cp)| cp.step());

        // Every example through the frozen part of the encoder, in order, with progress: its
        // sentence vector, or its token states below the layers to train.
        let encode_started = Instant::now();
        let texts: Vec<String> = examples.iter().map(|e| e.text.clone()).collect();
        let trained = settings.train_layers as usize;
        let base = if trained > 0 {
            Some(
                self.base
                    .get()
                    .await
                    .map_err(|e| ExecError::Abort(JobError::new("model_unavailable", e)))?,
            )
        } else {
            None
        };
        let mut vectors = Vec::with_capacity(texts.len());
        let mut states = Vec::new();
        for chunk in texts.chunks(ENCODE_CHUNK) {
            match &base {
                None => {
                    let done = self
                        .encoder
                        .embed_with(chunk.to_vec(), settings.max_length as usize)
                        .await
                        .map_err(model_error)?;
                    vectors.extend(done.into_iter().map(|e| e.vector));
                }
                Some(base) => {
                    let encoder = self.encoder.get().await.map_err(model_error)?;
                    let (base, chunk) = (base.clone(), chunk.to_vec());
                    let (max, upto) = (
                        settings.max_length as usize,
                        base.config.num_hidden_layers.saturating_sub(trained),
                    );
                    let done = tokio::task::spawn_blocking(move || {
                        base.states(&encoder, &chunk, max, upto)
                    })
                    .await
                    .map_err(|e| abort("training_failed", e.to_string()))?
                    .map_err(|e| abort("training_failed", e))?;
                    states.extend(done);
                }
            }
            let encoded = vectors.len() + states.len();
            ctx.progress
                .progress_with_data(
                    Some(0.0),
                    Some(format!("encoding the examples: {encoded}/{}", texts.len())),
                    Some(json!({"phase": "encode", "encoded": encoded, "examples": texts.len()})),
                )
                .await;
        }
        let encode_s = encode_started.elapsed().as_secs_f64();
        let (mut train_set, mut validation) = (Data::default(), Data::default());
        let mut vectors = vectors.into_iter();
        let mut states = states.into_iter();
        for (i, e) in examples.iter().enumerate() {
            let y = labels.binary_search(&e.label).expect("a known label") as u32;
            let set = if held.contains(&i) {
                &mut validation
            } else {
                &mut train_set
            };
            if trained > 0 {
                set.states.extend(states.next());
            } else {
                set.x.extend(vectors.next());
            }
            set.y.push(y);
        }

        // Train off the runtime; reports and checkpoints come back over a channel.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let cadence = Cadence {
            progress_every: u64::from(input.progress_every()),
            checkpoint_every: u64::from(input.checkpoint_every()),
        };
        let cancel = ctx.cancel.clone();
        let job_settings = settings.clone();
        let mut training = tokio::task::spawn_blocking(move || {
            classifier::train(
                &job_settings,
                &train_set,
                &validation,
                classifier::Start {
                    checkpoint: from.map(|(_, cp)| cp),
                    encoder: base.as_ref().map(|b| classifier::Encoder {
                        config: &b.config,
                        weights: &b.weights,
                    }),
                },
                cadence,
                &cancel,
                &mut |e| {
                    let _ = tx.send(e);
                },
            )
        });
        let mut percent = 0.0;
        let trained = loop {
            tokio::select! {
                Some(event) = rx.recv() => self.report(&ctx, event, &mut percent).await?,
                done = &mut training => {
                    while let Ok(event) = rx.try_recv() {
                        self.report(&ctx, event, &mut percent).await?;
                    }
                    break done.map_err(|e| abort("training_failed", e.to_string()))?;
                }
            }
        };
        let trained = trained.map_err(|e| match e {
            ClassifierError::Canceled => abort("canceled", "the training was stopped"),
            e => abort("training_failed", e.to_string()),
        })?;

        // The model, and its registration with the job's success.
        let bytes = trained
            .classifier
            .to_bytes()
            .map_err(|e| abort("training_failed", e.to_string()))?;
        let artifact = self
            .models
            .put(ctx.job_id, "model.safetensors", SAFETENSORS, bytes)
            .await
            .map_err(|e| ExecError::Retryable(JobError::new("artifact_store", e)))?;
        let seconds = started.elapsed().as_secs_f64();
        let metrics = TrainingMetrics {
            train_examples: settings.train_examples,
            validation_examples: settings.validation_examples,
            epochs: settings.epochs,
            steps: trained.steps,
            train_loss: trained.train_loss,
            train_accuracy: trained.train_accuracy,
            validation_loss: trained.validation.map(|v| v.0),
            validation_accuracy: trained.validation.map(|v| v.1),
            examples_per_s: trained.examples as f64 / (encode_s + trained.seconds).max(1e-9),
            encode_s,
            duration_s: seconds,
        };
        let ns = ctx.job.namespace.clone();
        let current = self
            .models
            .name(&ns, &input.name)
            .await
            .map_err(store_error)?;
        let registration = Registration {
            id: Uuid::now_v7(),
            name: input.name.clone(),
            base: settings.base.clone(),
            task: "text_classification".into(),
            labels: labels.clone(),
            max_length: settings.max_length,
            metrics: serde_json::to_value(&metrics).expect("metrics serialize"),
            training_job_id: ctx.job_id,
            artifact: artifact.clone(),
        };
        let metadata = EventMetadata {
            namespace: ns,
            actor: Some("worker".into()),
            causation_id: Some(ctx.job_id),
            ..Default::default()
        };
        let model_id = registration.id;
        let (version, append) =
            command::models::registered(current.as_ref(), &metadata, registration)
                .map_err(|e| store_error(e.to_string()))?;
        let output = FinetuneTrainOutput {
            model: format!("{}@{version}", input.name),
            model_id,
            version,
            labels,
            metrics,
            resumed_from_step,
            checkpoints: trained.checkpoints,
        };
        Ok(Output {
            output: to_output(output),
            artifacts: vec![artifact],
            also: vec![append],
        })
    }

    /// A training writes artifacts and registers a model: one attempt at a time.
    fn repeatable(&self) -> bool {
        false
    }
}

impl FinetuneTrain {
    /// Record one thing the training told: a progress report, or a checkpoint (stored, then
    /// listed by a progress report so the job keeps it whatever happens next).
    async fn report(
        &self,
        ctx: &JobContext,
        event: TrainEvent,
        percent: &mut f64,
    ) -> Result<(), ExecError> {
        match event {
            TrainEvent::Progress {
                percent: p,
                message,
                data,
            } => {
                *percent = p;
                ctx.progress
                    .progress_with_data(Some(p), Some(message), Some(data))
                    .await;
            }
            TrainEvent::Checkpoint { step, bytes } => {
                let name = format!("checkpoint-{step:08}.safetensors");
                let artifact = self
                    .models
                    .put(ctx.job_id, &name, SAFETENSORS, bytes)
                    .await
                    .map_err(|e| ExecError::Retryable(JobError::new("artifact_store", e)))?;
                ctx.progress
                    .progress_with_data(
                        Some(*percent),
                        Some(format!("checkpoint at step {step}")),
                        Some(json!({"checkpoint_step": step, "artifacts": [artifact]})),
                    )
                    .await;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(text: &str, label: &str) -> TrainingExample {
        TrainingExample {
            text: text.into(),
            label: label.into(),
        }
    }

    #[test]
    fn jsonl_rows_are_checked_and_named() {
        let ok = b"{\"text\": \"a\", \"label\": \"x\"}\n\n{\"text\": \"b\", \"label\": \"x\"}\n{\"text\": \"c\", \"label\": \"y\"}\n{\"text\": \"d\", \"label\": \"y\"}\n";
        assert_eq!(parse_jsonl("examples_url", ok).unwrap().len(), 4);
        let bad = b"{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\"}\n";
        let e = parse_jsonl("examples_url", bad).unwrap_err();
        assert_eq!(e.field, "examples_url[1]");
        assert!(e.message.contains("line 2"), "{}", e.message);
        let one = b"{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": \"x\"}\n{\"text\": \"c\", \"label\": \"x\"}\n{\"text\": \"d\", \"label\": \"x\"}\n";
        let e = parse_jsonl("examples_url", one).unwrap_err();
        assert!(e.message.contains("two labels"), "{}", e.message);
    }

    #[test]
    fn the_split_is_per_label_and_follows_the_seed() {
        let examples: Vec<_> = (0..30)
            .map(|i| ex(&i.to_string(), if i < 20 { "a" } else { "b" }))
            .collect();
        let held = split(&examples, 0.2, 1);
        assert_eq!(held.iter().filter(|i| **i < 20).count(), 4);
        assert_eq!(held.iter().filter(|i| **i >= 20).count(), 2);
        assert_eq!(split(&examples, 0.2, 1), held);
        assert_ne!(split(&examples, 0.2, 2), held);
        // A label with two examples keeps one for training.
        let few = vec![ex("1", "a"), ex("2", "a"), ex("3", "b"), ex("4", "b")];
        assert_eq!(split(&few, 0.5, 0).len(), 2);
        assert!(split(&few, 0.0, 0).is_empty());
        assert_eq!(
            checkpoint_step("checkpoint-00000100.safetensors"),
            Some(100)
        );
        assert_eq!(checkpoint_step("model.safetensors"), None);
    }
}
