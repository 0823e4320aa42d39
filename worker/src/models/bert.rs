//! MiniLM (a BERT) written with operations candle can differentiate, so `finetune.train` can
//! train its layers: candle-transformers' BERT, which `text.embed` runs, normalizes with a
//! fused layer-norm kernel that has no backward pass. The same weights give the same vectors
//! (tested against that implementation).
//!
//! The model is split where training needs it: [`Embeddings`] and a stack of [`Layer`]s, each
//! loaded from its own [`VarBuilder`] (constant tensors for the frozen part, a `VarMap`'s
//! variables for the trained part).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{embedding, linear, Embedding, Linear, VarBuilder};
use candle_transformers::models::bert::Config;

/// A layer norm from differentiable operations.
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl Norm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Norm> {
        Ok(Norm {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps)
    }
}

/// Word, position and token-type embeddings, normalized.
pub struct Embeddings {
    words: Embedding,
    positions: Embedding,
    types: Embedding,
    norm: Norm,
}

impl Embeddings {
    /// From `vb` at the model's root (`embeddings.*`).
    pub fn load(vb: VarBuilder, c: &Config) -> Result<Embeddings> {
        let vb = vb.pp("embeddings");
        Ok(Embeddings {
            words: embedding(c.vocab_size, c.hidden_size, vb.pp("word_embeddings"))?,
            positions: embedding(
                c.max_position_embeddings,
                c.hidden_size,
                vb.pp("position_embeddings"),
            )?,
            types: embedding(
                c.type_vocab_size,
                c.hidden_size,
                vb.pp("token_type_embeddings"),
            )?,
            norm: Norm::load(vb.pp("LayerNorm"), c.hidden_size, c.layer_norm_eps)?,
        })
    }

    pub fn forward(&self, ids: &Tensor, types: &Tensor) -> Result<Tensor> {
        let len = ids.dim(1)?;
        let positions = Tensor::arange(0u32, len as u32, ids.device())?;
        let x = (self.words.forward(ids)? + self.types.forward(types)?)?
            .broadcast_add(&self.positions.forward(&positions)?)?;
        self.norm.forward(&x)
    }
}

/// One transformer layer: self-attention and the feed-forward block, each with a residual and
/// a layer norm (post-norm, as BERT).
pub struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: Norm,
    intermediate: Linear,
    output: Linear,
    output_norm: Norm,
    heads: usize,
}

impl Layer {
    /// Layer `i` from `vb` at the model's root (`encoder.layer.<i>.*`).
    pub fn load(vb: VarBuilder, c: &Config, i: usize) -> Result<Layer> {
        let vb = vb.pp(format!("encoder.layer.{i}"));
        let h = c.hidden_size;
        let a = vb.pp("attention");
        Ok(Layer {
            query: linear(h, h, a.pp("self.query"))?,
            key: linear(h, h, a.pp("self.key"))?,
            value: linear(h, h, a.pp("self.value"))?,
            attention_out: linear(h, h, a.pp("output.dense"))?,
            attention_norm: Norm::load(a.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
            intermediate: linear(h, c.intermediate_size, vb.pp("intermediate.dense"))?,
            output: linear(c.intermediate_size, h, vb.pp("output.dense"))?,
            output_norm: Norm::load(vb.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
            heads: c.num_attention_heads,
        })
    }

    /// `x` [batch, tokens, hidden]; `bias` [batch, 1, 1, tokens]: 0 for a token, a very
    /// negative number for padding ([`attention_bias`]).
    pub fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let d = h / self.heads;
        let split = |y: Tensor| -> Result<Tensor> {
            y.reshape((b, t, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, h))?;
        let x = self
            .attention_norm
            .forward(&(self.attention_out.forward(&context)? + x)?)?;
        let inner = self.intermediate.forward(&x)?.gelu_erf()?;
        self.output_norm
            .forward(&(self.output.forward(&inner)? + x)?)
    }
}

/// The attention bias of a mask [batch, tokens] (1 for a token, 0 for padding).
pub fn attention_bias(mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(DType::F32)?.unsqueeze(1)?.unsqueeze(1)?;
    (mask.ones_like()? - mask)? * -1e9
}

/// Mean of the token vectors (padding left out), L2-normalized: the model's sentence vector.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let mean = hidden
        .broadcast_mul(&mask)?
        .sum(1)?
        .broadcast_div(&mask.sum(1)?)?;
    let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
    mean.broadcast_div(&norm)
}

/// The base encoder's weights and layers, as constants (the part of the model no training
/// changes), loaded once per process by the first job that trains or serves encoder layers.
pub struct Base {
    pub config: Config,
    /// Every tensor of the model's file, by name (where trained layers start from).
    pub weights: std::collections::HashMap<String, Tensor>,
    embeddings: Embeddings,
    layers: Vec<Layer>,
}

impl Base {
    /// Load `config.json` and `model.safetensors` of the encoder's directory.
    pub fn load(dir: &std::path::Path) -> std::result::Result<Base, String> {
        let read = |f: &str| std::fs::read(dir.join(f)).map_err(|e| format!("{f}: {e}"));
        let config: Config =
            serde_json::from_slice(&read("config.json")?).map_err(|e| e.to_string())?;
        let bytes = read("model.safetensors")?;
        let weights = candle_core::safetensors::load_buffer(&bytes, super::device::get())
            .map_err(|e| e.to_string())?;
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, super::device::get());
        let embeddings = Embeddings::load(vb.clone(), &config).map_err(|e| e.to_string())?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::load(vb.clone(), &config, i))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| e.to_string())?;
        Ok(Base {
            config,
            weights,
            embeddings,
            layers,
        })
    }

    /// Each text's token states after the base's first `upto` layers ([tokens, hidden] each,
    /// without padding). CPU-bound: call it off the async runtime.
    pub fn states(
        &self,
        encoder: &super::encoder::Encoder,
        texts: &[String],
        max_tokens: usize,
        upto: usize,
    ) -> std::result::Result<Vec<Tensor>, String> {
        let e = |e: candle_core::Error| e.to_string();
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(32) {
            let batch = encoder
                .tokens(chunk, max_tokens)
                .map_err(|e| e.to_string())?;
            let mut x = self
                .embeddings
                .forward(&batch.ids, &batch.types)
                .map_err(e)?;
            let bias = attention_bias(&batch.mask).map_err(e)?;
            for l in &self.layers[..upto.min(self.layers.len())] {
                x = l.forward(&x, &bias).map_err(e)?;
            }
            for (i, n) in batch.tokens.iter().enumerate() {
                out.push(
                    x.get(i)
                        .and_then(|t| t.narrow(0, 0, *n)?.contiguous())
                        .map_err(e)?,
                );
            }
        }
        Ok(out)
    }
}

/// The process's [`Base`], loaded by the first job that needs it and shared after.
pub struct SharedBase {
    dir: std::path::PathBuf,
    cell: tokio::sync::OnceCell<std::sync::Arc<Base>>,
}

impl SharedBase {
    /// The base encoder of the assets directory `assets` (not loaded yet).
    pub fn new(assets: &std::path::Path) -> SharedBase {
        SharedBase {
            dir: super::encoder::Encoder::dir(assets),
            cell: tokio::sync::OnceCell::new(),
        }
    }

    pub async fn get(&self) -> std::result::Result<std::sync::Arc<Base>, String> {
        let dir = self.dir.clone();
        self.cell
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || Base::load(&dir).map(std::sync::Arc::new))
                    .await
                    .map_err(|e| e.to_string())?
            })
            .await
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::encoder::Encoder;
    use candle_core::Device;

    /// Every layer from the model's file gives the vectors candle-transformers' BERT gives.
    #[test]
    fn the_same_weights_give_the_same_vectors() {
        let assets = std::env::var_os("CAPIBARA_ASSETS_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.capibara/assets")
            });
        let dir = Encoder::dir(&assets);
        let encoder = Encoder::load(&dir).expect("the MiniLM model (deploy/fetch-assets.sh)");
        let config: Config =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu).unwrap();
        let embeddings = Embeddings::load(vb.clone(), &config).unwrap();
        let layers: Vec<Layer> = (0..config.num_hidden_layers)
            .map(|i| Layer::load(vb.clone(), &config, i).unwrap())
            .collect();
        let texts = vec![
            "The invoice was paid on time.".to_string(),
            "Penguins live in the south.".to_string(),
        ];
        let crate::models::encoder::Batch {
            ids, types, mask, ..
        } = encoder.tokens(&texts, 128).unwrap();
        let mut x = embeddings.forward(&ids, &types).unwrap();
        let bias = attention_bias(&mask).unwrap();
        for l in &layers {
            x = l.forward(&x, &bias).unwrap();
        }
        let ours = mean_pool(&x, &mask).unwrap().to_vec2::<f32>().unwrap();
        let theirs = encoder.embed(&texts).unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            let cos: f32 = a.iter().zip(&b.vector).map(|(x, y)| x * y).sum();
            assert!(cos > 0.9999, "{cos}");
        }
    }
}
