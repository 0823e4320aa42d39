//! `model.classify`: the classes of texts by a registered model. The model's head is read from
//! its artifact once per worker and kept (the most recently used [`CACHED`] of them); the
//! texts go through the process's shared encoder in batches, then the head. Concurrent jobs
//! of one model share passes ([`Coalescer`]).

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use async_trait::async_trait;
use capibara_shared::domain::{
    job::JobError,
    kinds::{
        input,
        model::{ModelClassifyInput, ModelClassifyOutput, Prediction},
    },
    model::ModelRef,
};
use uuid::Uuid;

use super::{
    builtin::to_output, embed::model_error, finetune::ModelStore, ExecError, Executor, JobContext,
    Output,
};
use candle_transformers::models::bert::Config;

use crate::models::{
    bert::SharedBase,
    classifier::{argmax, model_info, Classifier, Features},
    coalesce::{Coalescer, Work},
    encoder::SharedEncoder,
};

/// Models kept loaded per worker.
pub const CACHED: usize = 16;

pub struct ModelClassify {
    pub encoder: Arc<SharedEncoder>,
    /// The encoder's frozen layers, for models that trained the ones above.
    pub base: Arc<SharedBase>,
    pub models: Arc<dyn ModelStore>,
    /// Loaded heads, most recently used last.
    pub loaded: tokio::sync::Mutex<Vec<(Uuid, Arc<Classifier>)>>,
    /// Concurrent requests of a model that fine-tuned encoder layers, merged into shared
    /// passes (a model with a frozen encoder shares the encoder's).
    passes: Arc<Coalescer<Uuid, Vec<f32>>>,
}

impl ModelClassify {
    pub fn new(
        encoder: Arc<SharedEncoder>,
        base: Arc<SharedBase>,
        models: Arc<dyn ModelStore>,
    ) -> Self {
        ModelClassify {
            encoder,
            base,
            models,
            loaded: tokio::sync::Mutex::new(Vec::new()),
            passes: Default::default(),
        }
    }

    /// The head of model version `id`, read from `artifact` unless it is loaded.
    async fn head(
        &self,
        id: Uuid,
        artifact: &capibara_shared::domain::job::Artifact,
    ) -> Result<Arc<Classifier>, ExecError> {
        let mut loaded = self.loaded.lock().await;
        if let Some(i) = loaded.iter().position(|(k, _)| *k == id) {
            let hit = loaded.remove(i);
            loaded.push(hit.clone());
            return Ok(hit.1);
        }
        let bytes = self
            .models
            .read(artifact)
            .await
            .map_err(|e| ExecError::Retryable(JobError::new("model_unavailable", e)))?;
        let failed = |e: String| ExecError::Abort(JobError::new("model_failed", e));
        let info = model_info(&bytes).map_err(|e| failed(e.to_string()))?;
        let config = if info.train_layers > 0 {
            self.base.get().await.map_err(failed)?.config.clone()
        } else {
            Config::default()
        };
        let head =
            Arc::new(Classifier::from_bytes(&bytes, &config).map_err(|e| failed(e.to_string()))?);
        if loaded.len() >= CACHED {
            loaded.remove(0);
        }
        loaded.push((id, head.clone()));
        Ok(head)
    }
}

#[async_trait]
impl Executor for ModelClassify {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let input: ModelClassifyInput = input::parse(&ctx.input).map_err(|e| {
            ExecError::Abort(JobError::new(
                "invalid_input",
                format!("{}: {}", e.field, e.message),
            ))
        })?;
        let started = Instant::now();
        let reference: ModelRef = input
            .model
            .parse()
            .map_err(|e: String| ExecError::Abort(JobError::new("invalid_input", e)))?;
        let version = self
            .models
            .resolve(&ctx.job.namespace, &reference)
            .await
            .map_err(|e| ExecError::Retryable(JobError::new("store_unavailable", e)))?
            .ok_or_else(|| {
                ExecError::Abort(JobError::new(
                    "model_not_found",
                    format!("no model `{reference}` in this namespace (GET /v1/models)"),
                ))
            })?;
        let reg = &version.registration;
        let head = self.head(reg.id, &reg.artifact).await?;
        let max = head.info().max_length as usize;
        let retry = |e: String| ExecError::Retryable(JobError::new("model_failed", e));
        let probabilities = if head.info().train_layers == 0 {
            let vectors: Vec<Vec<f32>> = self
                .encoder
                .embed_with(input.texts, max)
                .await
                .map_err(model_error)?
                .into_iter()
                .map(|e| e.vector)
                .collect();
            head.probabilities(Features::Vectors(&vectors))
                .map_err(|e| retry(e.to_string()))?
        } else {
            // The base's frozen layers, then the model's own.
            let base = self.base.get().await.map_err(retry)?;
            let encoder = self.encoder.get().await.map_err(model_error)?;
            let head = head.clone();
            let work: Work<Vec<f32>> = Arc::new(move |texts: &[String]| {
                let upto = head.first_trained_layer(&base.config);
                let states = base.states(&encoder, texts, max, upto)?;
                head.probabilities(Features::States(&states))
                    .map_err(|e| e.to_string())
            });
            self.passes
                .run(reg.id, input.texts, work)
                .await
                .map_err(retry)?
        };
        let labels = &head.info().labels;
        let predictions = probabilities
            .iter()
            .map(|p| {
                let best = argmax(p);
                Prediction {
                    label: labels[best].clone(),
                    score: f64::from(p[best]),
                    scores: labels
                        .iter()
                        .cloned()
                        .zip(p.iter().map(|x| f64::from(*x)))
                        .collect::<BTreeMap<_, _>>(),
                }
            })
            .collect();
        Ok(Output {
            output: to_output(ModelClassifyOutput {
                model: version.reference.clone(),
                model_id: reg.id,
                predictions,
                duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            }),
            ..Output::default()
        })
    }

    /// Classifying writes nothing: running an attempt twice is harmless.
    fn repeatable(&self) -> bool {
        true
    }
}
