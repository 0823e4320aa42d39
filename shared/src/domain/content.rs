//! `content.process` (docs/content.md): text operations on items — inline, or the JSONL
//! artifact of an earlier job such as `connector.fetch`'s `items.jsonl`. Its typed input (and
//! the published schema, which states what the derived one cannot: one of `items` and
//! `artifact`, the operation names), and its output.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::domain::{
    kinds::input::{self, KindInput},
    FieldError,
};

/// Most items one inline input holds.
pub const MAX_ITEMS: usize = 10_000;
/// Most lines read from an artifact (`connector.fetch` returns at most 100,000 items).
pub const MAX_ARTIFACT_ITEMS: usize = 100_000;
/// Largest artifact read.
pub const MAX_ARTIFACT_BYTES: u64 = 64 * 1024 * 1024;
/// `max_keywords`: default and most.
pub const DEFAULT_MAX_KEYWORDS: u32 = 10;
pub const MAX_KEYWORDS: u32 = 50;
/// `summary_sentences`: default and most.
pub const DEFAULT_SUMMARY_SENTENCES: u32 = 3;
pub const MAX_SUMMARY_SENTENCES: u32 = 20;
/// An artifact's name (as [`crate::artifacts::valid_name`] allows it).
pub const ARTIFACT_NAME_PATTERN: &str = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$";

/// Operations of issue 17 that need a model this build does not ship: refused at submission.
pub const NOT_BUILT: &[&str] = &["classify"];
/// Most items one job embeds (the `embed` operation runs a model: about 20 ms per text of 100
/// words on one core).
pub const MAX_EMBED_ITEMS: usize = 1000;

/// One operation of `content.process`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// The language of the text (whatlang): `language`.
    Language,
    /// Key phrases (RAKE with the language's stop words): `keywords`.
    Keywords,
    /// The text's most representative sentences, in their order (TextRank): `summary`.
    Summary,
    /// Flesch reading ease and Flesch–Kincaid grade: `readability`.
    Readability,
    /// Word, sentence and character counts: `stats`.
    Stats,
    /// The item's text as plain text (HTML converted): `text`.
    HtmlToText,
    /// The text's sentence vector (`text.embed`'s model, all-MiniLM-L6-v2): `embedding`.
    Embed,
}

impl Operation {
    /// Every operation, in the order results list them.
    pub const ALL: [Operation; 7] = [
        Operation::Language,
        Operation::Keywords,
        Operation::Summary,
        Operation::Readability,
        Operation::Stats,
        Operation::HtmlToText,
        Operation::Embed,
    ];

    /// The operation's name in inputs.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Language => "language",
            Operation::Keywords => "keywords",
            Operation::Summary => "summary",
            Operation::Readability => "readability",
            Operation::Stats => "stats",
            Operation::HtmlToText => "html_to_text",
            Operation::Embed => "embed",
        }
    }

    /// The operation named `name`.
    pub fn from_name(name: &str) -> Option<Operation> {
        Self::ALL.into_iter().find(|o| o.name() == name)
    }

    /// Every name, for messages and the schema.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|o| o.name()).collect()
    }
}

/// One item to process: the shape of a `connector.fetch` item (other fields, such as `hash`
/// or `url`, are ignored). Its text is `text`, else `content`, else `summary`, else `html`,
/// else `title`; HTML is converted to text first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ContentItem {
    /// Copied to the item's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub id: Option<String>,
    /// The last resort when the item has no other text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub title: Option<String>,
    /// Plain text (converted when it holds HTML tags or entities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub text: Option<String>,
    /// HTML, always converted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub html: Option<String>,
    /// A feed item's summary (converted when it holds HTML).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub summary: Option<String>,
    /// A feed item's content (converted when it holds HTML).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub content: Option<String>,
}

/// An artifact of an earlier job of the same namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArtifactRef {
    /// The job that stored it (of this namespace).
    pub job_id: Uuid,
    /// Its name, e.g. `items.jsonl`: one JSON item per line.
    pub name: String,
}

/// `content.process`: language, keywords, summary, readability, stats and plain text of each
/// item, inline (`items`) or from a JSONL artifact of an earlier job (`artifact`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContentProcessInput {
    /// The items (1-10000), each `{id, title, text, html, summary, content}`; other fields are
    /// ignored. Instead of `artifact`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false)]
    pub items: Option<Vec<ContentItem>>,
    /// A JSONL artifact of an earlier job of this namespace (at most 64 MiB, 100000 lines), e.g.
    /// a `connector.fetch` job's `items.jsonl`. Instead of `items`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false)]
    pub artifact: Option<ArtifactRef>,
    /// What to compute for each item (1-7, each once): `language`, `keywords`, `summary`,
    /// `readability`, `stats`, `html_to_text`, `embed` (at most 1000 items).
    pub operations: Vec<String>,
    /// Most keywords per item (1-50, default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 50, nullable = false)]
    pub max_keywords: Option<u32>,
    /// Sentences in each summary (1-20, default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 20, nullable = false)]
    pub summary_sentences: Option<u32>,
}

impl ContentProcessInput {
    /// The operations asked for, in the input's order (once [`KindInput::check`] passed, every
    /// name is known).
    pub fn operations(&self) -> Vec<Operation> {
        self.operations
            .iter()
            .filter_map(|n| Operation::from_name(n))
            .collect()
    }

    pub fn max_keywords(&self) -> usize {
        self.max_keywords.unwrap_or(DEFAULT_MAX_KEYWORDS) as usize
    }

    pub fn summary_sentences(&self) -> usize {
        self.summary_sentences.unwrap_or(DEFAULT_SUMMARY_SENTENCES) as usize
    }
}

fn available() -> String {
    Operation::names().join(", ")
}

impl KindInput for ContentProcessInput {
    fn check(&self) -> Result<(), FieldError> {
        match (&self.items, &self.artifact) {
            (Some(_), Some(_)) => {
                return Err(FieldError::new(
                    "artifact",
                    "give either `items` or `artifact`, not both",
                ))
            }
            (None, None) => {
                return Err(FieldError::new(
                    "items",
                    "give `items`, or `artifact` (a JSONL artifact of an earlier job)",
                ))
            }
            (Some(items), None) if items.is_empty() || items.len() > MAX_ITEMS => {
                return Err(FieldError::new(
                    "items",
                    format!("must hold 1 to {MAX_ITEMS} items"),
                ))
            }
            (None, Some(a)) if !crate::artifacts::valid_name(&a.name) => {
                return Err(FieldError::new(
                    "artifact.name",
                    format!("must be an artifact name matching `{ARTIFACT_NAME_PATTERN}`"),
                ))
            }
            _ => {}
        }
        let mut seen = Vec::new();
        for (i, name) in self.operations.iter().enumerate() {
            let field = format!("operations[{i}]");
            if NOT_BUILT.contains(&name.as_str()) {
                return Err(FieldError::new(
                    field,
                    format!(
                        "`{name}` is not available in this build (it needs a model Capibara \
                         does not ship yet); available: {}",
                        available()
                    ),
                ));
            }
            let Some(op) = Operation::from_name(name) else {
                return Err(FieldError::new(
                    field,
                    format!("unknown operation `{name}`; available: {}", available()),
                ));
            };
            if seen.contains(&op) {
                return Err(FieldError::new(field, format!("`{name}` is listed twice")));
            }
            seen.push(op);
        }
        if seen.is_empty() {
            return Err(FieldError::new(
                "operations",
                format!("list at least one operation; available: {}", available()),
            ));
        }
        if let (true, Some(items)) = (seen.contains(&Operation::Embed), &self.items) {
            if items.len() > MAX_EMBED_ITEMS {
                return Err(FieldError::new(
                    "items",
                    format!("`embed` takes at most {MAX_EMBED_ITEMS} items"),
                ));
            }
        }
        Ok(())
    }
}

/// `content.process`'s published input schema: inline `items` or an `artifact` (a `oneOf`),
/// with the operation names, counts and the artifact name stated.
pub fn input_schema() -> Value {
    let derived = input::schema::<ContentProcessInput>();
    let mut common = derived["properties"].clone();
    let props = common.as_object_mut().expect("properties");
    let mut items = props.remove("items").expect("items");
    let mut artifact = props.remove("artifact").expect("artifact");
    items["minItems"] = json!(1);
    items["maxItems"] = json!(MAX_ITEMS);
    // The derivation wraps an optional struct in a one-variant `oneOf`: flatten it.
    if let Some(inner) = artifact
        .get("oneOf")
        .and_then(Value::as_array)
        .and_then(|v| v.first())
        .cloned()
    {
        let description = artifact.get("description").cloned();
        artifact = inner;
        if let Some(d) = description {
            artifact["description"] = d;
        }
    }
    artifact["properties"]["name"]["pattern"] = json!(ARTIFACT_NAME_PATTERN);
    let description = derived["properties"]["operations"]["description"].clone();
    props.insert(
        "operations".into(),
        json!({
            "type": "array",
            "description": description,
            "items": {"type": "string", "enum": Operation::names()},
            "minItems": 1,
            "maxItems": Operation::ALL.len(),
            "uniqueItems": true,
        }),
    );
    let variant = |title: &str, key: &str, schema: Value| {
        let mut p = common.clone();
        p[key] = schema;
        json!({
            "title": title,
            "type": "object",
            "properties": p,
            "required": [key, "operations"],
            "additionalProperties": false,
        })
    };
    let mut inline = variant("inline items", "items", items);
    // `embed` runs a model: fewer items.
    inline["if"] = json!({"properties": {"operations": {"contains": {"const": "embed"}}}});
    inline["then"] = json!({"properties": {"items": {"maxItems": MAX_EMBED_ITEMS}}});
    json!({
        "description": derived.get("description").cloned().unwrap_or_else(|| json!("content.process")),
        "oneOf": [
            inline,
            variant("a JSONL artifact of an earlier job", "artifact", artifact),
        ],
    })
}

/// The language of a text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LanguageResult {
    /// ISO 639-3 code (`eng`, `deu`, `cmn`, …), as whatlang names its 70 languages.
    pub code: String,
    /// The language's English name.
    pub name: String,
    /// 0-1: how far ahead of the next candidate the language is.
    pub confidence: f64,
    /// Whether whatlang considers the guess reliable (enough text, a clear lead).
    pub reliable: bool,
}

/// A key phrase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Keyword {
    /// The phrase, lowercase.
    pub term: String,
    /// RAKE score (sum of its words' degree/frequency); higher is more central. Without a stop
    /// word list for the language: the word's share of all words.
    pub score: f64,
}

/// Readability by the Flesch formulas (made for English; other languages' numbers are not
/// calibrated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Readability {
    /// 206.835 − 1.015 × words/sentence − 84.6 × syllables/word: 90-100 very easy, 0-30 very
    /// hard.
    pub flesch_reading_ease: f64,
    /// 0.39 × words/sentence + 11.8 × syllables/word − 15.59: a US school grade.
    pub flesch_kincaid_grade: f64,
}

/// Counts over the item's plain text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TextStats {
    /// Words by Unicode (UAX #29) word boundaries; each CJK ideograph is one.
    pub words: u64,
    /// Sentences by Unicode (UAX #29) sentence boundaries, common abbreviations joined.
    pub sentences: u64,
    /// Unicode characters (scalar values), whitespace included.
    pub characters: u64,
    /// `words / sentences` (0 when there is no sentence), two decimals.
    pub avg_words_per_sentence: f64,
}

/// The results of one item: only the operations asked for are present.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ItemResult {
    /// The item's `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub id: Option<String>,
    /// `language` (absent when the text has nothing to go by).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false)]
    pub language: Option<LanguageResult>,
    /// `keywords`, best first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false)]
    pub keywords: Option<Vec<Keyword>>,
    /// `summary`: the chosen sentences in the text's order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub summary: Option<String>,
    /// `readability` (absent when the text has no words).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false)]
    pub readability: Option<Readability>,
    /// `stats`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false)]
    pub stats: Option<TextStats>,
    /// `html_to_text`: the item's text as plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub text: Option<String>,
    /// `embed`: the text's unit-length sentence vector (384 numbers; its first 256 tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub embedding: Option<Vec<f32>>,
}

/// `content.process`'s output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ContentProcessOutput {
    /// One result per item, in the items' order.
    #[schema(inline)]
    pub items: Vec<ItemResult>,
    /// Items processed.
    pub processed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ContentProcessInput, FieldError> {
        input::parse::<ContentProcessInput>(&v)
    }

    fn field(v: Value) -> String {
        parse(v).unwrap_err().field
    }

    #[test]
    fn inputs_take_items_or_an_artifact_and_known_operations() {
        let ok = parse(json!({"items": [{"id": "1", "text": "Hello there."}],
                              "operations": ["language", "stats"], "max_keywords": 5}))
        .unwrap();
        assert_eq!(ok.operations(), [Operation::Language, Operation::Stats]);
        assert_eq!((ok.max_keywords(), ok.summary_sentences()), (5, 3));
        let a = parse(
            json!({"artifact": {"job_id": Uuid::now_v7(), "name": "items.jsonl"},
                             "operations": ["html_to_text"]}),
        )
        .unwrap();
        assert_eq!(a.artifact.unwrap().name, "items.jsonl");
        // A connector.fetch item as it is: unknown item fields are ignored.
        assert!(parse(
            json!({"items": [{"id": "x", "hash": "ab", "url": "https://x.test/",
            "content": "<p>Hi</p>", "authors": ["a"], "published": "2026-01-01T00:00:00Z"}],
            "operations": ["summary"]})
        )
        .is_ok());
    }

    #[test]
    fn errors_name_the_field() {
        let items = json!([{"text": "x"}]);
        assert_eq!(field(json!({"operations": ["stats"]})), "items");
        assert_eq!(
            field(json!({"items": [], "operations": ["stats"]})),
            "items"
        );
        let many: Vec<Value> = (0..=MAX_ITEMS).map(|_| json!({})).collect();
        assert_eq!(
            field(json!({"items": many, "operations": ["stats"]})),
            "items"
        );
        assert_eq!(
            field(
                json!({"items": items, "artifact": {"job_id": Uuid::now_v7(), "name": "a"},
                         "operations": ["stats"]})
            ),
            "artifact"
        );
        assert_eq!(
            field(
                json!({"artifact": {"job_id": Uuid::now_v7(), "name": "../x"},
                         "operations": ["stats"]})
            ),
            "artifact.name"
        );
        assert_eq!(field(json!({"items": items})), "operations");
        assert_eq!(
            field(json!({"items": items, "operations": []})),
            "operations"
        );
        assert_eq!(
            field(json!({"items": items, "operations": ["stats", "stats"]})),
            "operations[1]"
        );
        assert_eq!(
            field(json!({"items": items, "operations": ["stats", "sentiment"]})),
            "operations[1]"
        );
        assert_eq!(
            field(json!({"items": items, "operations": ["stats"], "max_keywords": 51})),
            "max_keywords"
        );
        assert_eq!(
            field(json!({"items": items, "operations": ["stats"], "summary_sentences": 0})),
            "summary_sentences"
        );
        assert_eq!(
            field(json!({"items": items, "operations": ["stats"], "model": "x"})),
            "model"
        );
    }

    #[test]
    fn classify_is_refused_with_the_available_operations() {
        for (i, op) in NOT_BUILT.iter().enumerate() {
            let mut ops = vec![json!("language"); i + 1];
            ops[i] = json!(op);
            if i > 0 {
                ops[0] = json!("stats");
            }
            let e = parse(json!({"items": [{"text": "x"}], "operations": ops})).unwrap_err();
            assert_eq!(e.field, format!("operations[{i}]"));
            assert!(e.message.contains(op), "{}", e.message);
            assert!(
                e.message.contains(
                    "language, keywords, summary, readability, stats, html_to_text, embed"
                ),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn embed_takes_at_most_a_thousand_inline_items() {
        let items = |n: usize| vec![json!({"text": "x"}); n];
        let ok = json!({"items": items(MAX_EMBED_ITEMS), "operations": ["embed", "stats"]});
        let over = json!({"items": items(MAX_EMBED_ITEMS + 1), "operations": ["stats", "embed"]});
        assert!(parse(ok.clone()).is_ok());
        assert_eq!(parse(over.clone()).unwrap_err().field, "items");
        let without = json!({"items": items(MAX_EMBED_ITEMS + 1), "operations": ["stats"]});
        assert!(parse(without.clone()).is_ok());
        let v = jsonschema::validator_for(&input_schema()).unwrap();
        assert!(v.is_valid(&ok) && v.is_valid(&without) && !v.is_valid(&over));
    }

    #[test]
    fn the_kind_is_registered_with_this_input() {
        use crate::domain::kinds::{self, TestContext};
        let k = kinds::find_public("content.process").unwrap();
        assert_eq!(k.default_queue, "default");
        assert!(k.input_required());
        assert_eq!(k.input_schema(&TestContext), input_schema());
        let e = kinds::validate_input(
            "content.process",
            &json!({"items": [{"text": "x"}], "operations": ["stats", "classify"]}),
            &TestContext,
        )
        .unwrap_err();
        assert_eq!(e.field, "input.operations[1]");
    }

    #[test]
    fn the_published_schema_states_the_rules_the_check_applies() {
        let schema = input_schema();
        let artifact = &schema["oneOf"][1]["properties"]["artifact"];
        assert_eq!(artifact["required"], json!(["job_id", "name"]));
        assert_eq!(
            artifact["properties"]["name"]["pattern"],
            ARTIFACT_NAME_PATTERN
        );
        let v = jsonschema::validator_for(&schema).unwrap();
        let id = Uuid::now_v7();
        let good = [
            json!({"items": [{"text": "a", "extra": 1}], "operations": ["language"]}),
            json!({"artifact": {"job_id": id, "name": "items.jsonl"},
                   "operations": Operation::names(), "max_keywords": 50, "summary_sentences": 20}),
        ];
        for g in &good {
            assert!(v.is_valid(g), "{g}");
            assert!(parse(g.clone()).is_ok(), "{g}");
        }
        let bad = [
            json!({"operations": ["language"]}),
            json!({"items": [], "operations": ["language"]}),
            json!({"items": [{"text": "a"}], "operations": []}),
            json!({"items": [{"text": "a"}], "operations": ["classify"]}),
            json!({"items": [{"text": "a"}], "operations": ["stats", "stats"]}),
            json!({"items": [{"text": "a"}], "artifact": {"job_id": id, "name": "a"},
                   "operations": ["stats"]}),
            json!({"artifact": {"job_id": id, "name": ".hidden"}, "operations": ["stats"]}),
            json!({"artifact": {"job_id": id, "name": "a", "x": 1}, "operations": ["stats"]}),
            json!({"items": [{"text": 1}], "operations": ["stats"]}),
            json!({"items": [{"text": "a"}], "operations": ["stats"], "max_keywords": 0}),
        ];
        for b in &bad {
            assert!(!v.is_valid(b), "the schema allows {b}");
            assert!(parse(b.clone()).is_err(), "the check allows {b}");
        }
    }

    #[test]
    fn the_output_schema_describes_the_output() {
        let schema = input::schema::<ContentProcessOutput>();
        let v = jsonschema::validator_for(&schema).unwrap();
        let out = ContentProcessOutput {
            items: vec![
                ItemResult {
                    id: Some("1".into()),
                    language: Some(LanguageResult {
                        code: "eng".into(),
                        name: "English".into(),
                        confidence: 0.9,
                        reliable: true,
                    }),
                    keywords: Some(vec![Keyword {
                        term: "rust".into(),
                        score: 1.0,
                    }]),
                    summary: Some("Rust.".into()),
                    readability: Some(Readability {
                        flesch_reading_ease: 50.0,
                        flesch_kincaid_grade: 8.0,
                    }),
                    stats: Some(TextStats {
                        words: 1,
                        sentences: 1,
                        characters: 5,
                        avg_words_per_sentence: 1.0,
                    }),
                    text: Some("Rust.".into()),
                    embedding: Some(vec![0.6, -0.8]),
                },
                ItemResult::default(),
            ],
            processed: 2,
        };
        let value = serde_json::to_value(&out).unwrap();
        let errors: Vec<String> = v.iter_errors(&value).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}\n{schema}");
        assert!(!v.is_valid(&json!({"items": [{"stats": {"words": "x"}}], "processed": 1})));
    }
}
