//! The memory kinds (docs/models.md): `memory.write` stores a text with its sentence vector,
//! `memory.search` finds stored texts by meaning, by words, or both.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::input::KindInput;
use crate::domain::FieldError;

/// The collection a write or search names when it names none.
pub const DEFAULT_COLLECTION: &str = "default";
/// Longest stored text, in characters (its first 256 tokens make its vector).
pub const MAX_TEXT: usize = 100_000;
/// Most tags of an item.
pub const MAX_TAGS: usize = 32;
/// Most items a search returns.
pub const MAX_K: u32 = 100;
/// A collection's name, and a tag, as patterns.
pub const COLLECTION_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$";
pub const TAG_PATTERN: &str = "^[^\\s,][^,]{0,63}$";

/// `memory.write`: store `text` (with its vector) in a collection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryWriteInput {
    /// The text (1-100,000 characters; its first 256 tokens make its vector).
    #[schema(min_length = 1, max_length = 100000, pattern = "\\S")]
    pub text: String,
    /// Labels to filter searches by (at most 32, each 1-64 characters without commas).
    #[serde(default)]
    #[schema(max_items = 32)]
    pub tags: Vec<String>,
    /// Anything to keep with the text (returned by searches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub metadata: Option<BTreeMap<String, Value>>,
    /// The collection (default `default`): searches look in one collection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    pub collection: Option<String>,
}

fn check_tags(tags: &[String]) -> Result<(), FieldError> {
    for (i, t) in tags.iter().enumerate() {
        let n = t.chars().count();
        if n == 0 || n > 64 || t.contains(',') || t.starts_with(char::is_whitespace) {
            return Err(FieldError::new(
                format!("tags[{i}]"),
                "must be 1-64 characters, without commas, not starting with a space",
            ));
        }
    }
    Ok(())
}

/// The published schema of `tags`' items.
fn tag_items(s: &mut Value) {
    s["properties"]["tags"]["items"] =
        serde_json::json!({"type": "string", "pattern": TAG_PATTERN});
}

impl KindInput for MemoryWriteInput {
    fn check(&self) -> Result<(), FieldError> {
        if self.text.chars().count() > MAX_TEXT {
            return Err(FieldError::new(
                "text",
                format!("is longer than {MAX_TEXT} characters"),
            ));
        }
        check_tags(&self.tags)
    }
}

/// `memory.write`'s published schema.
pub fn write_schema() -> Value {
    let mut s = super::input::schema::<MemoryWriteInput>();
    tag_items(&mut s);
    s
}

impl MemoryWriteInput {
    pub fn collection(&self) -> &str {
        self.collection.as_deref().unwrap_or(DEFAULT_COLLECTION)
    }
}

/// `memory.write`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MemoryWriteOutput {
    /// The item's id (the writing job's id).
    pub id: uuid::Uuid,
    pub collection: String,
    /// Tokens of the text read for its vector, and whether it was cut there.
    pub tokens: usize,
    pub truncated: bool,
}

/// How `memory.search` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// By meaning: the cosine of the query's vector and the item's.
    Semantic,
    /// By words: Postgres full-text search (English stemming), `ts_rank_cd`.
    Keyword,
    /// Both, fused by reciprocal rank (`Σ 1/(60 + rank)`).
    #[default]
    Hybrid,
}

/// `memory.search`: the stored texts nearest to `query`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemorySearchInput {
    /// What to look for (1-10,000 characters; in keyword mode, web-search syntax: words,
    /// "quoted phrases", -excluded, or).
    #[schema(min_length = 1, max_length = 10000, pattern = "\\S")]
    pub query: String,
    /// How many items (1-100, default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 100)]
    pub k: Option<u32>,
    /// Only items with every one of these tags.
    #[serde(default)]
    #[schema(max_items = 32)]
    pub tags: Vec<String>,
    /// `semantic`, `keyword` or `hybrid` (default).
    #[serde(default)]
    #[schema(inline)]
    pub mode: SearchMode,
    /// The collection (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    pub collection: Option<String>,
}

impl KindInput for MemorySearchInput {
    fn check(&self) -> Result<(), FieldError> {
        check_tags(&self.tags)
    }
}

/// `memory.search`'s published schema.
pub fn search_schema() -> Value {
    let mut s = super::input::schema::<MemorySearchInput>();
    tag_items(&mut s);
    s
}

impl MemorySearchInput {
    pub fn k(&self) -> usize {
        self.k.unwrap_or(10).clamp(1, MAX_K) as usize
    }
    pub fn collection(&self) -> &str {
        self.collection.as_deref().unwrap_or(DEFAULT_COLLECTION)
    }
}

/// One found item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MemoryHit {
    pub id: uuid::Uuid,
    pub text: String,
    pub tags: Vec<String>,
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// The mode's score: cosine (semantic), `ts_rank_cd` (keyword) or the fused score (hybrid).
    pub score: f64,
    /// Its rank by meaning and by words (from 1), where it was in those lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semantic_rank: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyword_rank: Option<usize>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// `memory.search`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MemorySearchOutput {
    #[schema(inline)]
    pub mode: SearchMode,
    pub collection: String,
    #[schema(inline)]
    pub items: Vec<MemoryHit>,
    /// Items of the collection searched (by meaning).
    pub searched: usize,
    pub duration_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::kinds::input;
    use serde_json::json;

    #[test]
    fn inputs_name_the_bad_field() {
        let w = |v| input::parse::<MemoryWriteInput>(&v).err().map(|e| e.field);
        assert_eq!(w(json!({"text": "Hello World", "tags": ["test"]})), None);
        assert_eq!(w(json!({"text": " "})), Some("text".into()));
        assert_eq!(
            w(json!({"text": "a", "tags": ["x", "a,b"]})),
            Some("tags[1]".into())
        );
        assert_eq!(
            w(json!({"text": "a", "collection": "no space"})),
            Some("collection".into())
        );
        let s = |v| input::parse::<MemorySearchInput>(&v).err().map(|e| e.field);
        assert_eq!(
            s(json!({"query": "hello", "mode": "keyword", "k": 5})),
            None
        );
        assert_eq!(
            s(json!({"query": "hello", "mode": "fuzzy"})),
            Some("mode".into())
        );
        assert_eq!(s(json!({"query": "hello", "k": 0})), Some("k".into()));
        assert_eq!(
            search_schema()["properties"]["tags"]["items"]["pattern"],
            TAG_PATTERN
        );
    }
}
