//! `text.chunk`: a text cut into pieces that fit the encoder ([`crate::models::chunker`]),
//! counted with the encoder's tokenizer (read once per process; the model is not loaded).

use std::{path::PathBuf, sync::Arc};

use async_trait::async_trait;
use capibara_shared::domain::{
    job::JobError,
    kinds::{
        input,
        model::{TextChunkInput, TextChunkOutput},
    },
};
use tokenizers::Tokenizer;

use super::{builtin::to_output, ExecError, Executor, JobContext, Output};
use crate::models::chunker::{chunk_text, load_tokenizer};

pub struct TextChunk {
    /// The encoder's directory (its `tokenizer.json`).
    pub dir: PathBuf,
    pub tokenizer: tokio::sync::OnceCell<Arc<Tokenizer>>,
}

impl TextChunk {
    pub fn new(dir: PathBuf) -> Self {
        TextChunk {
            dir,
            tokenizer: tokio::sync::OnceCell::new(),
        }
    }

    async fn tokenizer(&self) -> Result<Arc<Tokenizer>, ExecError> {
        let path = self.dir.join("tokenizer.json");
        self.tokenizer
            .get_or_try_init(|| async move {
                let t = load_tokenizer(&path).map_err(|e| {
                    ExecError::Abort(JobError::new(
                        "model_unavailable",
                        format!(
                            "the tokenizer is not installed: {} ({e}; deploy/fetch-assets.sh \
                             fetches it)",
                            path.display()
                        ),
                    ))
                })?;
                Ok(Arc::new(t))
            })
            .await
            .cloned()
    }
}

#[async_trait]
impl Executor for TextChunk {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let input: TextChunkInput = input::parse(&ctx.input).map_err(|e| {
            ExecError::Abort(JobError::new(
                "invalid_input",
                format!("{}: {}", e.field, e.message),
            ))
        })?;
        let tokenizer = self.tokenizer().await?;
        let (max, overlap, strategy) = (input.max_tokens(), input.overlap(), input.strategy);
        let chunks = tokio::task::spawn_blocking(move || {
            chunk_text(&tokenizer, &input.text, strategy, max, overlap)
        })
        .await
        .map_err(|e| ExecError::Retryable(JobError::new("chunk_failed", e.to_string())))?
        .map_err(|e| ExecError::Abort(JobError::new("chunk_failed", e)))?;
        Ok(Output {
            output: to_output(TextChunkOutput { strategy, chunks }),
            ..Output::default()
        })
    }
}
