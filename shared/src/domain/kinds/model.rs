//! The model kinds' inputs and outputs (docs/models.md): `text.embed`, `finetune.train` and
//! `model.classify`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::input::KindInput;
use crate::domain::FieldError;

/// The sentence encoder `text.embed` runs: sentence-transformers' all-MiniLM-L6-v2.
pub const EMBED_MODEL: &str = "all-minilm-l6-v2";
/// Its vectors' length.
pub const EMBED_DIMENSIONS: usize = 384;
/// The tokens of a text it reads (the rest is cut, and the text marked `truncated`).
pub const EMBED_MAX_TOKENS: usize = 256;
/// Most texts one job embeds.
pub const EMBED_MAX_TEXTS: usize = 256;

/// `text.embed`: sentence vectors of `texts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TextEmbedInput {
    /// The texts (1-256), each at most 100,000 characters; a text's first 256 tokens (about
    /// 190 English words) make its vector.
    #[schema(min_items = 1, max_items = 256)]
    pub texts: Vec<String>,
    /// The model (only `all-minilm-l6-v2` in this build).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, pattern = "^all-minilm-l6-v2$")]
    pub model: Option<String>,
}

/// Longest text, in characters.
pub const EMBED_MAX_CHARS: usize = 100_000;

/// `text.embed`'s published schema: the derived one, with each text's length.
pub fn embed_schema() -> serde_json::Value {
    let mut s = super::input::schema::<TextEmbedInput>();
    s["properties"]["texts"]["items"]["maxLength"] = serde_json::json!(EMBED_MAX_CHARS);
    s
}

impl KindInput for TextEmbedInput {
    fn check(&self) -> Result<(), FieldError> {
        if let Some(i) = self
            .texts
            .iter()
            .position(|t| t.chars().count() > EMBED_MAX_CHARS)
        {
            return Err(FieldError::new(
                format!("texts[{i}]"),
                format!("is longer than {EMBED_MAX_CHARS} characters"),
            ));
        }
        if let Some(m) = &self.model {
            if m != EMBED_MODEL {
                return Err(FieldError::new(
                    "model",
                    format!("unknown model `{m}`; available: {EMBED_MODEL}"),
                ));
            }
        }
        Ok(())
    }
}

/// `text.embed`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TextEmbedOutput {
    pub model: String,
    /// The vectors' length (384).
    pub dimensions: usize,
    /// One unit-length vector per text, in order (mean of the token vectors, L2-normalized:
    /// the dot product of two is their cosine similarity).
    pub vectors: Vec<Vec<f32>>,
    /// Tokens read per text (with the two markers), at most 256.
    pub tokens: Vec<usize>,
    /// Per text: whether it was longer than 256 tokens and cut.
    pub truncated: Vec<bool>,
    pub duration_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::kinds::input;
    use serde_json::json;

    #[test]
    fn training_inputs_name_the_row_and_field() {
        let field = |v| {
            input::parse::<FinetuneTrainInput>(&v)
                .err()
                .map(|e| e.field)
        };
        let ex = |t: &str, l: &str| json!({"text": t, "label": l});
        let four = json!([ex("a", "x"), ex("b", "x"), ex("c", "y"), ex("d", "y")]);
        assert_eq!(field(json!({"name": "m", "examples": four})), None);
        assert_eq!(
            field(
                json!({"name": "m", "examples": [ex("a", "x"), ex("b", "x"), ex("c", "y"), {"text": "d"}]})
            ),
            Some("examples[3].label".into())
        );
        assert_eq!(
            field(
                json!({"name": "m", "examples": [ex("a", "x"), ex(" ", "x"), ex("c", "y"), ex("d", "y")]})
            ),
            Some("examples[1].text".into())
        );
        assert_eq!(
            field(
                json!({"name": "m", "examples": [ex("a", "x"), ex("b", "x"), ex("c", "x"), ex("d", "x")]})
            ),
            Some("examples".into())
        );
        assert_eq!(
            field(
                json!({"name": "m", "examples": four, "freeze_encoder": true, "train_layers": 2})
            ),
            Some("train_layers".into())
        );
        let schema = train_schema();
        let text = &schema["properties"]["examples"]["items"]["properties"]["text"];
        assert_eq!(text["maxLength"], 10_000, "{schema}");
        assert_eq!(text["pattern"], "\\S");
        assert_eq!(schema["properties"]["freeze_encoder"]["type"], "boolean");
        let field = |v| {
            input::parse::<ModelClassifyInput>(&v)
                .err()
                .map(|e| e.field)
        };
        assert_eq!(field(json!({"model": "m@2", "texts": ["a"]})), None);
        assert_eq!(
            field(json!({"model": "m@0", "texts": ["a"]})),
            Some("model".into())
        );
    }

    #[test]
    fn inputs_name_the_bad_field() {
        let field = |v| input::parse::<TextEmbedInput>(&v).err().map(|e| e.field);
        assert_eq!(field(json!({"texts": ["a", ""]})), None);
        assert_eq!(field(json!({"texts": []})), Some("texts".into()));
        assert_eq!(
            field(json!({"texts": ["a"], "model": "gpt"})),
            Some("model".into())
        );
        let many: Vec<String> = (0..257).map(|k| k.to_string()).collect();
        assert_eq!(field(json!({"texts": many})), Some("texts".into()));
        let long = "x".repeat(EMBED_MAX_CHARS + 1);
        assert_eq!(
            field(json!({"texts": ["a", long]})),
            Some("texts[1]".into())
        );
        assert_eq!(
            embed_schema()["properties"]["texts"]["items"]["maxLength"],
            100_000
        );
    }
}

/// The encoders a model can be trained on (`finetune.train`'s `base_model`).
pub const BASE_MODELS: &[&str] = &[EMBED_MODEL];
/// Most examples one training takes.
pub const MAX_EXAMPLES: usize = 50_000;
/// Longest example text, in characters.
pub const MAX_EXAMPLE_CHARS: usize = 10_000;
/// Most classes a model may have.
pub const MAX_LABELS: usize = 100;

/// One labeled example (a JSONL line of `examples_url` / `examples_artifact` has the same shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingExample {
    /// The text (1-10,000 characters).
    #[schema(min_length = 1, max_length = 10000)]
    pub text: String,
    /// Its class (1-100 characters).
    #[schema(min_length = 1, max_length = 100)]
    pub label: String,
}

/// A JSONL file of examples stored as another job's artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExamplesArtifact {
    pub job_id: uuid::Uuid,
    /// The artifact's name (e.g. `examples.jsonl`).
    #[schema(min_length = 1, max_length = 128)]
    pub name: String,
}

/// `finetune.train`: train a text classifier (the MiniLM encoder and a classification head)
/// on labeled examples and register it as the next version of `name`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FinetuneTrainInput {
    /// The model's name; the trained model is registered as `name@N` (`GET /v1/models`).
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    pub name: String,
    /// The encoder to start from (only `all-minilm-l6-v2` in this build).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, pattern = "^all-minilm-l6-v2$")]
    pub base_model: Option<String>,
    /// The examples, inline (4-50,000, at least two labels, each label at least twice).
    /// Exactly one of `examples`, `examples_url` and `examples_artifact`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false, min_items = 4, max_items = 50000)]
    pub examples: Option<Vec<TrainingExample>>,
    /// A JSONL file of examples (`{"text": …, "label": …}` per line) fetched over HTTP(S)
    /// through the outbound guard (no private addresses unless the operator allows them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        nullable = false,
        min_length = 1,
        max_length = 2048,
        pattern = "^https?://"
    )]
    pub examples_url: Option<String>,
    /// A JSONL file of examples stored as another job's artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false)]
    pub examples_artifact: Option<ExamplesArtifact>,
    /// The share of the examples held out for validation, per label (default 0.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 0.0, maximum = 0.5)]
    pub validation_split: Option<f64>,
    /// Passes over the training examples (default 3 when encoder layers are fine-tuned, 20 for
    /// the head alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1000)]
    pub epochs: Option<u32>,
    /// AdamW's learning rate for the classification head (default 0.01).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, exclusive_minimum = 0.0, maximum = 10.0)]
    pub learning_rate: Option<f64>,
    /// Examples per step (default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1024)]
    pub batch_size: Option<u32>,
    /// Tokens of a text the model reads (default 128, at most 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 8, maximum = 256)]
    pub max_length: Option<u32>,
    /// Seeds the split and the order of examples: the same seed on the same data gives the
    /// same metrics (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 0)]
    pub seed: Option<u64>,
    /// `true`: train only the classification head, on the frozen encoder's sentence vectors.
    /// `false`: fine-tune the encoder's last `train_layers` layers with the head (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub freeze_encoder: Option<bool>,
    /// Encoder layers fine-tuned, counted from the top (1-6, 6 being the whole encoder;
    /// default 2; only without `freeze_encoder: true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 6)]
    pub train_layers: Option<u32>,
    /// AdamW's learning rate for the encoder's layers (default 0.0001).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, exclusive_minimum = 0.0, maximum = 1.0)]
    pub encoder_learning_rate: Option<f64>,
    /// Store a checkpoint artifact every this many steps (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1000000)]
    pub checkpoint_every: Option<u32>,
    /// Report progress every this many steps (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1000000)]
    pub progress_every: Option<u32>,
    /// A `finetune.train` job whose last checkpoint this training continues from (same
    /// examples, labels and settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub resume_from: Option<uuid::Uuid>,
    /// `finetune.command` only: settings for the external trainer (an object it reads, such
    /// as `{"lora_rank": 8}`); Capibara passes it on unread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, value_type = Object)]
    pub params: Option<serde_json::Map<String, serde_json::Value>>,
}

impl FinetuneTrainInput {
    pub fn validation_split(&self) -> f64 {
        self.validation_split.unwrap_or(0.2)
    }
    /// Default: 3 when encoder layers are fine-tuned, 20 for the head alone.
    pub fn epochs(&self) -> u32 {
        self.epochs
            .unwrap_or(if self.trained_layers() > 0 { 3 } else { 20 })
    }
    pub fn learning_rate(&self) -> f64 {
        self.learning_rate.unwrap_or(0.01)
    }
    pub fn batch_size(&self) -> u32 {
        self.batch_size.unwrap_or(16)
    }
    pub fn max_length(&self) -> u32 {
        self.max_length.unwrap_or(128)
    }
    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or(0)
    }
    pub fn checkpoint_every(&self) -> u32 {
        self.checkpoint_every.unwrap_or(100)
    }
    pub fn progress_every(&self) -> u32 {
        self.progress_every.unwrap_or(10)
    }
    pub fn base_model(&self) -> &str {
        self.base_model.as_deref().unwrap_or(EMBED_MODEL)
    }
    /// Encoder layers trained (0: the head alone).
    pub fn trained_layers(&self) -> u32 {
        if self.freeze_encoder == Some(true) {
            0
        } else {
            self.train_layers.unwrap_or(2)
        }
    }
    pub fn encoder_learning_rate(&self) -> f64 {
        self.encoder_learning_rate.unwrap_or(1e-4)
    }
}

/// Check a set of examples (inline, or read from a file by the worker): at least two labels,
/// each with at least two examples, no blank text. Errors name the row
/// (`examples[7].text`); `field` is where the examples came from.
pub fn check_examples(field: &str, examples: &[TrainingExample]) -> Result<(), FieldError> {
    if examples.len() < 4 {
        return Err(FieldError::new(
            field,
            format!("needs at least 4 examples (got {})", examples.len()),
        ));
    }
    if examples.len() > MAX_EXAMPLES {
        return Err(FieldError::new(
            field,
            format!("has more than {MAX_EXAMPLES} examples"),
        ));
    }
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for (i, e) in examples.iter().enumerate() {
        if e.text.trim().is_empty() {
            return Err(FieldError::new(
                format!("{field}[{i}].text"),
                "is blank: every example needs a text",
            ));
        }
        if e.text.chars().count() > MAX_EXAMPLE_CHARS {
            return Err(FieldError::new(
                format!("{field}[{i}].text"),
                format!("is longer than {MAX_EXAMPLE_CHARS} characters"),
            ));
        }
        let n = e.label.chars().count();
        if e.label.trim().is_empty() || n > 100 {
            return Err(FieldError::new(
                format!("{field}[{i}].label"),
                "must be 1-100 characters, not blank",
            ));
        }
        *counts.entry(e.label.as_str()).or_default() += 1;
    }
    if counts.len() < 2 {
        return Err(FieldError::new(
            field,
            format!(
                "needs at least two labels; every example is labeled `{}`",
                examples[0].label
            ),
        ));
    }
    if counts.len() > MAX_LABELS {
        return Err(FieldError::new(
            field,
            format!("has {} labels; at most {MAX_LABELS}", counts.len()),
        ));
    }
    if let Some((label, _)) = counts.iter().find(|(_, n)| **n < 2) {
        return Err(FieldError::new(
            field,
            format!("label `{label}` has one example; every label needs at least two"),
        ));
    }
    Ok(())
}

impl KindInput for FinetuneTrainInput {
    fn check(&self) -> Result<(), FieldError> {
        crate::domain::model::check_name("name", &self.name)?;
        if !BASE_MODELS.contains(&self.base_model()) {
            return Err(FieldError::new(
                "base_model",
                format!(
                    "`{}` is not available; available: {}",
                    self.base_model(),
                    BASE_MODELS.join(", ")
                ),
            ));
        }
        let sources = [
            self.examples.is_some(),
            self.examples_url.is_some(),
            self.examples_artifact.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            0 => {
                return Err(FieldError::new(
                    "examples",
                    "give the examples: `examples`, `examples_url` or `examples_artifact`",
                ))
            }
            1 => {}
            _ => {
                return Err(FieldError::new(
                    if self.examples_url.is_some() && self.examples.is_some() {
                        "examples_url"
                    } else {
                        "examples_artifact"
                    },
                    "give only one of `examples`, `examples_url` and `examples_artifact`",
                ))
            }
        }
        if let Some(examples) = &self.examples {
            check_examples("examples", examples)?;
        }
        if self.freeze_encoder == Some(true) && self.train_layers.is_some() {
            return Err(FieldError::new(
                "train_layers",
                "names encoder layers to fine-tune, which `freeze_encoder: true` keeps frozen",
            ));
        }
        Ok(())
    }
}

/// A training's final figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TrainingMetrics {
    pub train_examples: usize,
    pub validation_examples: usize,
    pub epochs: u32,
    pub steps: u64,
    /// Mean loss and accuracy over the last epoch's training steps.
    pub train_loss: f64,
    pub train_accuracy: f64,
    /// On the held-out examples (absent with `validation_split` 0).
    pub validation_loss: Option<f64>,
    pub validation_accuracy: Option<f64>,
    /// Training examples processed per second (the encoder's pass included).
    pub examples_per_s: f64,
    /// Seconds spent turning the examples into sentence vectors.
    pub encode_s: f64,
    pub duration_s: f64,
}

/// `finetune.train`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FinetuneTrainOutput {
    /// `name@version`: what `model.classify` takes.
    pub model: String,
    pub model_id: uuid::Uuid,
    pub version: u32,
    pub labels: Vec<String>,
    #[schema(inline)]
    pub metrics: TrainingMetrics,
    /// The step the training continued from (a checkpoint), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<u64>,
    /// Checkpoints stored by this attempt.
    pub checkpoints: u32,
}

/// What an external trainer reports when it completes a `finetune.command` job
/// (`POST /v1/jobs/{id}/complete` `output`): the model file it uploaded, and its figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainerResult {
    /// The uploaded model file, listed in the completion's `artifacts` (default
    /// `model.safetensors`); docs/models.md, "The model file", says its format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, min_length = 1, max_length = 128)]
    pub artifact: Option<String>,
    /// The training's final figures (`validation_accuracy`, …), recorded as the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, value_type = Object)]
    pub metrics: Option<serde_json::Map<String, serde_json::Value>>,
}

impl TrainerResult {
    pub fn artifact(&self) -> &str {
        self.artifact.as_deref().unwrap_or("model.safetensors")
    }
}

/// `finetune.command`'s output, recorded when the trainer completes: the version registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FinetuneCommandOutput {
    /// `name@version`: what `model.classify` takes.
    pub model: String,
    pub model_id: uuid::Uuid,
    pub version: u32,
    pub labels: Vec<String>,
    /// What the trainer reported.
    #[schema(value_type = Object)]
    pub metrics: serde_json::Value,
    /// The worker that trained it.
    pub trainer: String,
}

/// `model.classify`: the classes of `texts` by a registered model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelClassifyInput {
    /// `name` (its latest version), `name@version` or a model id.
    #[schema(min_length = 1, max_length = 100)]
    pub model: String,
    /// The texts (1-256), each at most 100,000 characters (the model reads its first
    /// `max_length` tokens).
    #[schema(min_items = 1, max_items = 256)]
    pub texts: Vec<String>,
}

impl KindInput for ModelClassifyInput {
    fn check(&self) -> Result<(), FieldError> {
        self.model
            .parse::<crate::domain::model::ModelRef>()
            .map_err(|e| FieldError::new("model", e))?;
        if let Some(i) = self
            .texts
            .iter()
            .position(|t| t.chars().count() > EMBED_MAX_CHARS)
        {
            return Err(FieldError::new(
                format!("texts[{i}]"),
                format!("is longer than {EMBED_MAX_CHARS} characters"),
            ));
        }
        Ok(())
    }
}

/// A model reference as a pattern: `name`, `name@version` or a version's id.
pub const MODEL_REF_PATTERN: &str =
    "^([A-Za-z0-9][A-Za-z0-9._-]{0,63}(@[1-9][0-9]{0,8})?|[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})$";

/// `model.classify`'s published schema: the derived one, with each text's length and the
/// form of a model reference.
pub fn classify_schema() -> serde_json::Value {
    let mut s = super::input::schema::<ModelClassifyInput>();
    s["properties"]["texts"]["items"]["maxLength"] = serde_json::json!(EMBED_MAX_CHARS);
    s["properties"]["model"]["pattern"] = serde_json::json!(MODEL_REF_PATTERN);
    s
}

/// `finetune.train`'s published schema: the derived one, stating what it can of `check`:
/// exactly one source of examples, texts and labels not blank, no `train_layers` with a frozen
/// encoder.
/// (Two labels with two examples each is not a rule JSON Schema can state.)
pub fn train_schema() -> serde_json::Value {
    let mut s = command_schema();
    if let Some(p) = s["properties"].as_object_mut() {
        p.remove("params");
    }
    s
}

/// `finetune.train`'s check: [`FinetuneTrainInput`]'s, and no `params` (its own trainer has
/// none).
pub fn check_train(input: &serde_json::Value) -> Result<(), FieldError> {
    super::input::check::<FinetuneTrainInput>(input)?;
    if input.get("params").is_some() {
        return Err(FieldError::new(
            "params",
            "is for an external trainer (`finetune.command`); `finetune.train` takes its \
             settings as fields",
        ));
    }
    Ok(())
}

/// `finetune.command`'s published schema: `finetune.train`'s, with `params`.
pub fn command_schema() -> serde_json::Value {
    use serde_json::json;
    let mut s = super::input::schema::<FinetuneTrainInput>();
    s["oneOf"] = json!([
        {"required": ["examples"]},
        {"required": ["examples_url"]},
        {"required": ["examples_artifact"]}
    ]);
    let example = &mut s["properties"]["examples"]["items"]["properties"];
    example["text"]["pattern"] = json!("\\S");
    example["label"]["pattern"] = json!("\\S");
    // `train_layers` only with an encoder that is not frozen.
    s["if"] =
        json!({"properties": {"freeze_encoder": {"const": true}}, "required": ["freeze_encoder"]});
    s["then"] = json!({"not": {"required": ["train_layers"]}});
    s
}

/// One text's class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Prediction {
    /// The most likely label.
    pub label: String,
    /// Its probability.
    pub score: f64,
    /// Every label's probability (they sum to 1).
    pub scores: std::collections::BTreeMap<String, f64>,
}

/// `model.classify`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelClassifyOutput {
    /// The version that answered (`name@version`).
    pub model: String,
    pub model_id: uuid::Uuid,
    /// One per text, in order.
    #[schema(inline)]
    pub predictions: Vec<Prediction>,
    pub duration_ms: f64,
}

/// How `text.chunk` cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChunkStrategy {
    /// Whole sentences, packed together up to the limit (a longer sentence is cut in windows).
    #[default]
    Sentence,
    /// Windows of tokens, each `overlap` tokens into the one before.
    Tokens,
}

/// Longest text `text.chunk` takes, in characters.
pub const CHUNK_MAX_CHARS: usize = 1_000_000;

/// `text.chunk`: cut a text into pieces that fit the encoder's window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TextChunkInput {
    /// The text (1-1,000,000 characters).
    #[schema(min_length = 1, max_length = 1000000)]
    pub text: String,
    /// `sentence` (default) or `tokens`.
    #[serde(default)]
    #[schema(inline)]
    pub strategy: ChunkStrategy,
    /// A chunk's most tokens, the encoder's two markers included (16-256, default 128).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 16, maximum = 256)]
    pub max_tokens: Option<u32>,
    /// Tokens a window shares with the one before (0-64, default 0; less than half a chunk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 0, maximum = 64)]
    pub overlap: Option<u32>,
}

impl TextChunkInput {
    pub fn max_tokens(&self) -> usize {
        self.max_tokens.unwrap_or(128) as usize
    }
    pub fn overlap(&self) -> usize {
        self.overlap.unwrap_or(0) as usize
    }
}

impl KindInput for TextChunkInput {
    fn check(&self) -> Result<(), FieldError> {
        if self.text.chars().count() > CHUNK_MAX_CHARS {
            return Err(FieldError::new(
                "text",
                format!("is longer than {CHUNK_MAX_CHARS} characters"),
            ));
        }
        if self.overlap() * 2 >= self.max_tokens() {
            return Err(FieldError::new(
                "overlap",
                "must be less than half of `max_tokens`",
            ));
        }
        Ok(())
    }
}

/// One piece of a chunked text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Chunk {
    pub text: String,
    /// Where it is in the input, in characters (`end` exclusive).
    pub start: usize,
    pub end: usize,
    /// Its tokens (without the encoder's two markers).
    pub tokens: usize,
}

/// `text.chunk`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TextChunkOutput {
    #[schema(inline)]
    pub strategy: ChunkStrategy,
    #[schema(inline)]
    pub chunks: Vec<Chunk>,
}

impl KindInput for TrainerResult {}
