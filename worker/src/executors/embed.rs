//! `text.embed`: sentence vectors from the process's MiniLM encoder
//! ([`crate::models::encoder::SharedEncoder`]), loaded by the first job that needs it; the work
//! runs on the blocking pool.

use std::{sync::Arc, time::Instant};

use async_trait::async_trait;
use capibara_shared::domain::{
    job::JobError,
    kinds::{
        input,
        model::{TextEmbedInput, TextEmbedOutput, EMBED_DIMENSIONS, EMBED_MODEL},
    },
};

use super::{builtin::to_output, ExecError, Executor, JobContext, Output};
use crate::models::encoder::{EncoderError, SharedEncoder};

pub struct TextEmbed {
    /// The process's encoder (shared with `content.process`).
    pub encoder: Arc<SharedEncoder>,
}

/// An encoder failure as what the job does next: a missing model fails the job, naming the
/// file; a crashed run may be retried.
pub fn model_error(e: EncoderError) -> ExecError {
    match e {
        EncoderError::Missing(_) => {
            ExecError::Abort(JobError::new("model_unavailable", e.to_string()))
        }
        EncoderError::Load(_) => ExecError::Abort(JobError::new("model_failed", e.to_string())),
        EncoderError::Run(_) => ExecError::Retryable(JobError::new("model_failed", e.to_string())),
    }
}

#[async_trait]
impl Executor for TextEmbed {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let input: TextEmbedInput = input::parse(&ctx.input).map_err(|e| {
            ExecError::Abort(JobError::new(
                "invalid_input",
                format!("{}: {}", e.field, e.message),
            ))
        })?;
        let started = Instant::now();
        let embedded = self.encoder.embed(input.texts).await.map_err(model_error)?;
        let output = TextEmbedOutput {
            model: EMBED_MODEL.into(),
            dimensions: EMBED_DIMENSIONS,
            tokens: embedded.iter().map(|e| e.tokens).collect(),
            truncated: embedded.iter().map(|e| e.truncated).collect(),
            vectors: embedded.into_iter().map(|e| e.vector).collect(),
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        };
        Ok(Output {
            output: to_output(output),
            ..Output::default()
        })
    }

    /// Embedding writes nothing: running an attempt twice is harmless.
    fn repeatable(&self) -> bool {
        true
    }
}
