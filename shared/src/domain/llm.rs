//! LLM providers (docs/llm.md; decisions in docs/llm-design.md): the endpoints `llm.generate`
//! and `llm.chat` call, one stream per (namespace, name), its state folded from
//! `LlmProviderConfigured` / `LlmProviderDeleted`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    event::{DomainEvent, StreamType},
    FieldError,
};

/// The protocol a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProviderType {
    /// OpenAI's chat completions (`POST {base_url}/chat/completions`): OpenAI, vLLM, Ollama's
    /// OpenAI API, llama.cpp's server, LiteLLM, …
    Openai,
    /// Anthropic's Messages API (`POST {base_url}/v1/messages`).
    Anthropic,
}

/// Prices, in US dollars per million tokens, for `cost_usd` in outputs and on `/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderCost {
    #[schema(minimum = 0, maximum = 10000)]
    pub input_per_mtok: f64,
    #[schema(minimum = 0, maximum = 10000)]
    pub output_per_mtok: f64,
}

/// A provider's definition (`PUT /v1/llm/providers/{name}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderDef {
    #[serde(rename = "type")]
    #[schema(inline)]
    pub protocol: ProviderType,
    /// `https://api.openai.com/v1`, `http://vllm:8000/v1`, `https://api.anthropic.com`, …
    #[schema(
        min_length = 1,
        max_length = 2048,
        pattern = "^[hH][tT][tT][pP][sS]?://"
    )]
    pub base_url: String,
    /// The models it serves: names, or a prefix ending in `*` (`llama3*`), or `*` for any.
    #[schema(schema_with = models_schema)]
    pub models: Vec<String>,
    /// The namespace secret (`/v1/secrets`) holding the API key, read by the worker when it
    /// calls (`Authorization: Bearer` for OpenAI, `x-api-key` for Anthropic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, min_length = 1, max_length = 100)]
    pub api_key_secret: Option<String>,
    /// Lower first among the providers of a model (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 0, maximum = 1000)]
    pub priority: Option<u32>,
    /// A whole call, from sending to the end of the answer (default 120,000 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 100, maximum = 600000)]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline, nullable = false)]
    pub cost: Option<ProviderCost>,
}

/// `models`: 1-100 names of 1-200 characters without spaces or control characters, a `*` only
/// at the end.
fn models_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(200))
                .pattern(Some(r"^[^\s\x00-\x1f\x7f-\x9f*]*\*?$")),
        )
        .min_items(Some(1))
        .max_items(Some(100))
        .build()
}

impl ProviderDef {
    pub fn priority(&self) -> u32 {
        self.priority.unwrap_or(100)
    }

    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms.unwrap_or(120_000)
    }

    /// Whether it serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| match m.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => m == model,
        })
    }

    /// The model a job that pins this provider without naming one gets: its first exact name.
    pub fn default_model(&self) -> Option<&str> {
        self.models
            .iter()
            .find(|m| !m.ends_with('*'))
            .map(String::as_str)
    }

    /// The URL of the provider's API `path` (`chat/completions`, `messages`, `models`):
    /// under `base_url` for OpenAI, under `base_url`'s `/v1` for Anthropic (whether or not the
    /// base names it).
    pub fn endpoint(&self, path: &str) -> String {
        let base = self.base_url.trim_end_matches('/');
        let path = path.trim_start_matches('/');
        match self.protocol {
            ProviderType::Anthropic if !base.ends_with("/v1") => format!("{base}/v1/{path}"),
            _ => format!("{base}/{path}"),
        }
    }

    /// The headers that carry `api_key` (and Anthropic's API version).
    pub fn auth_headers(&self, api_key: Option<&str>) -> Vec<(String, String)> {
        match self.protocol {
            ProviderType::Openai => api_key
                .map(|k| vec![("authorization".to_string(), format!("Bearer {k}"))])
                .unwrap_or_default(),
            ProviderType::Anthropic => {
                let mut h = vec![("anthropic-version".to_string(), "2023-06-01".to_string())];
                if let Some(k) = api_key {
                    h.push(("x-api-key".into(), k.to_string()));
                }
                h
            }
        }
    }

    /// What the schema cannot state.
    pub fn validate(&self) -> Result<(), FieldError> {
        crate::outbound::parse_url(&self.base_url)
            .map_err(|e| FieldError::new("base_url", e.to_string()))?;
        if self.models.is_empty() || self.models.len() > 100 {
            return Err(FieldError::new("models", "give 1 to 100 models"));
        }
        for (i, m) in self.models.iter().enumerate() {
            let ok = !m.is_empty()
                && m.len() <= 200
                && !m.chars().any(|c| c.is_control() || c.is_whitespace())
                && !m.strip_suffix('*').unwrap_or(m).contains('*');
            if !ok {
                return Err(FieldError::new(
                    format!("models[{i}]"),
                    "a model name (1-200 characters, no spaces), or a prefix ending in `*`",
                ));
            }
        }
        if self.priority.is_some_and(|p| p > 1000) {
            return Err(FieldError::new("priority", "between 0 and 1000"));
        }
        if self
            .timeout_ms
            .is_some_and(|t| !(100..=600_000).contains(&t))
        {
            return Err(FieldError::new("timeout_ms", "between 100 and 600000"));
        }
        if let Some(cost) = &self.cost {
            for (field, v) in [
                ("cost.input_per_mtok", cost.input_per_mtok),
                ("cost.output_per_mtok", cost.output_per_mtok),
            ] {
                if !(0.0..=10_000.0).contains(&v) {
                    return Err(FieldError::new(field, "between 0 and 10000"));
                }
            }
        }
        Ok(())
    }
}

/// A provider's name: what jobs pin and metrics label.
pub fn validate_name(name: &str) -> Result<(), FieldError> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            "name",
            "must be 1-64 characters of a-z, 0-9, '-' or '_', starting with a letter",
        ))
    }
}

/// Namespace of provider stream ids (UUIDv5).
const PROVIDER_NS: Uuid = Uuid::from_u128(0x4c4c_4d70_7276_4e8a_9b0c_2d3e_4f5a_6b7c);

/// The stream id of provider `name` in `namespace`.
pub fn stream_id(namespace: &str, name: &str) -> Uuid {
    Uuid::new_v5(&PROVIDER_NS, format!("{namespace}/{name}").as_bytes())
}

/// Events of a provider's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum ProviderEvent {
    LlmProviderConfigured {
        name: String,
        definition: ProviderDef,
    },
    LlmProviderDeleted {},
}

impl DomainEvent for ProviderEvent {
    const STREAM: StreamType = StreamType::LlmProvider;

    fn type_name(&self) -> &'static str {
        match self {
            ProviderEvent::LlmProviderConfigured { .. } => "LlmProviderConfigured",
            ProviderEvent::LlmProviderDeleted {} => "LlmProviderDeleted",
        }
    }
}

/// A provider (the `llm_providers` row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmProvider {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub definition: ProviderDef,
    /// Deleted providers keep their row (their stream goes on if the name is configured again).
    pub deleted: bool,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl LlmProvider {
    /// The state after `ev`, or `None` when it does not apply.
    pub fn apply(
        prev: Option<LlmProvider>,
        id: Uuid,
        namespace: &str,
        ev: &ProviderEvent,
        at: DateTime<Utc>,
    ) -> Option<LlmProvider> {
        let mut p = match (prev, ev) {
            (None, ProviderEvent::LlmProviderConfigured { name, definition }) => LlmProvider {
                id,
                namespace: namespace.to_string(),
                name: name.clone(),
                definition: definition.clone(),
                deleted: false,
                version: 0,
                created_at: at,
                updated_at: at,
            },
            (None, _) => return None,
            (Some(p), _) => p,
        };
        match ev {
            ProviderEvent::LlmProviderConfigured { definition, .. } => {
                p.definition = definition.clone();
                p.deleted = false;
            }
            ProviderEvent::LlmProviderDeleted {} => {
                if p.deleted {
                    return None;
                }
                p.deleted = true;
            }
        }
        p.version += 1;
        p.updated_at = at;
        Some(p)
    }

    /// What configuring `definition` records: nothing when it is the live definition.
    pub fn put(
        current: Option<&LlmProvider>,
        name: &str,
        definition: ProviderDef,
    ) -> Vec<ProviderEvent> {
        match current {
            Some(p) if !p.deleted && p.definition == definition => Vec::new(),
            _ => vec![ProviderEvent::LlmProviderConfigured {
                name: name.to_string(),
                definition,
            }],
        }
    }
}

/// The candidates for a call, in the order they are tried: the pinned `provider` alone, or
/// the providers serving `model` by priority, then name.
pub fn route<'a>(
    providers: &'a [LlmProvider],
    provider: Option<&str>,
    model: Option<&str>,
) -> Vec<&'a LlmProvider> {
    let mut out: Vec<&LlmProvider> = providers
        .iter()
        .filter(|p| !p.deleted)
        .filter(|p| match (provider, model) {
            (Some(name), Some(model)) => p.name == name && p.definition.serves(model),
            (Some(name), None) => p.name == name,
            (None, Some(model)) => p.definition.serves(model),
            (None, None) => false,
        })
        .collect();
    out.sort_by(|a, b| (a.definition.priority(), &a.name).cmp(&(b.definition.priority(), &b.name)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(models: &[&str], priority: u32) -> ProviderDef {
        ProviderDef {
            protocol: ProviderType::Openai,
            base_url: "http://127.0.0.1:1/v1".into(),
            models: models.iter().map(|s| s.to_string()).collect(),
            api_key_secret: None,
            priority: Some(priority),
            timeout_ms: None,
            cost: None,
        }
    }

    fn provider(name: &str, d: ProviderDef) -> LlmProvider {
        let ev = ProviderEvent::LlmProviderConfigured {
            name: name.into(),
            definition: d,
        };
        LlmProvider::apply(None, stream_id("ns", name), "ns", &ev, crate::domain::now()).unwrap()
    }

    #[test]
    fn routing_by_model_priority_and_pin() {
        let all = vec![
            provider("b", def(&["llama3*"], 10)),
            provider("a", def(&["llama3-8b", "gpt-4o"], 10)),
            provider("c", def(&["*"], 50)),
            provider("z", def(&["gpt-4o"], 1)),
        ];
        let names = |v: Vec<&LlmProvider>| v.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(route(&all, None, Some("llama3-8b"))), ["a", "b", "c"]);
        assert_eq!(names(route(&all, None, Some("gpt-4o"))), ["z", "a", "c"]);
        assert_eq!(names(route(&all, Some("b"), None)), ["b"]);
        assert!(route(&all, Some("b"), Some("gpt-4o")).is_empty());
        assert!(route(&all, None, None).is_empty());
    }

    #[test]
    fn definitions_are_checked() {
        assert!(def(&["gpt-4o", "llama*"], 1).validate().is_ok());
        assert_eq!(def(&["a b"], 1).validate().unwrap_err().field, "models[0]");
        assert_eq!(def(&["l*a*"], 1).validate().unwrap_err().field, "models[0]");
        // Multibyte characters anywhere (the fuzzer found a slice inside one).
        assert!(def(&["é", "llamaé*", "*"], 1).validate().is_ok());
        let mut d = def(&["m"], 1);
        d.base_url = "ftp://x".into();
        assert_eq!(d.validate().unwrap_err().field, "base_url");
        let mut d = def(&["m"], 1001);
        assert_eq!(d.validate().unwrap_err().field, "priority");
        d.priority = None;
        d.timeout_ms = Some(600_001);
        assert_eq!(d.validate().unwrap_err().field, "timeout_ms");
        assert!(validate_name("openai-main").is_ok());
        let mut d = def(&["m"], 1);
        d.base_url = "http://h/v1/".into();
        assert_eq!(
            d.endpoint("/chat/completions"),
            "http://h/v1/chat/completions"
        );
        d.protocol = ProviderType::Anthropic;
        assert_eq!(d.endpoint("messages"), "http://h/v1/messages");
        d.base_url = "https://api.anthropic.com".into();
        assert_eq!(d.endpoint("models"), "https://api.anthropic.com/v1/models");
        assert!(validate_name("Open").is_err());
    }

    #[test]
    fn put_and_delete_fold() {
        let p = provider("a", def(&["m"], 1));
        assert!(LlmProvider::put(Some(&p), "a", def(&["m"], 1)).is_empty());
        assert_eq!(LlmProvider::put(Some(&p), "a", def(&["m"], 2)).len(), 1);
        let now = crate::domain::now();
        let gone = LlmProvider::apply(
            Some(p.clone()),
            p.id,
            "ns",
            &ProviderEvent::LlmProviderDeleted {},
            now,
        )
        .unwrap();
        assert!(gone.deleted && gone.version == 2);
        assert!(LlmProvider::apply(
            Some(gone),
            p.id,
            "ns",
            &ProviderEvent::LlmProviderDeleted {},
            now
        )
        .is_none());
    }
}
