//! The model kinds' inputs and outputs (docs/models.md): `text.embed` today.

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
