//! Kinds that users define (docs/workers.md): their definition, the `kind` stream that records
//! every change of it, and the fold into the `user_kinds` row.
//!
//! A kind's stream id is derived from its namespace and name ([`stream_id`]), so
//! `PUT /v1/kinds/{name}` addresses its stream without a lookup and two first PUTs of one name
//! race on one stream.

use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::KINDS;
use crate::domain::{
    event::{DomainEvent, StreamType},
    job::Priority,
    FieldError,
};

/// Name prefixes of built-in kind families, present and planned: a user kind may not start
/// with one, so a later built-in kind never collides with a user's.
pub const RESERVED_PREFIXES: &[&str] = &[
    "code.",
    "tts.",
    "callback.",
    "workflow.",
    "connector.",
    "content.",
    "model.",
    "finetune.",
    "text.",
    "memory.",
    "llm.",
    "http.",
    "mcp.",
    "push.",
];

/// Longest kind name.
pub const MAX_NAME: usize = 64;

/// Whether `name` is a built-in kind or in a built-in family: never a user kind.
pub fn is_builtin(name: &str) -> bool {
    KINDS.iter().any(|k| k.name == name) || RESERVED_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Check a user kind's name: lowercase dot-separated segments, not built-in.
pub fn validate_name(name: &str) -> Result<(), FieldError> {
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    };
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.split('.').all(segment_ok);
    if !ok {
        return Err(FieldError::new(
            "name",
            "must be 1-64 characters: lowercase dot-separated segments of a-z, 0-9, '_' or '-', \
             starting with a letter (image.resize)",
        ));
    }
    if is_builtin(name) {
        return Err(FieldError::new(
            "name",
            format!(
                "`{name}` is a built-in kind or in a built-in family ({}); pick another name",
                RESERVED_PREFIXES.join(" ")
            ),
        ));
    }
    Ok(())
}

/// Namespace of kind stream ids (UUIDv5).
const KIND_NS: Uuid = Uuid::from_u128(0x6b1d_7a2e_3c4f_4e8a_9b0c_1d2e_3f4a_5b6c);

/// The stream id of kind `name` in `namespace`.
pub fn stream_id(namespace: &str, name: &str) -> Uuid {
    Uuid::new_v5(&KIND_NS, format!("{namespace}/{name}").as_bytes())
}

/// How a kind's jobs are run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Workers lease its jobs over the worker protocol.
    #[default]
    Pull,
    /// Capibara POSTs each job to `push.url` (signed, Standard Webhooks).
    Push,
}

/// Where a push kind's jobs are sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushTarget {
    /// An absolute http(s) URL. Private and loopback addresses are refused unless
    /// `CAPIBARA_OUTBOUND_ALLOW_PRIVATE=true`.
    pub url: String,
    /// How long one call may take, in seconds (1-900, default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 900)]
    pub timeout_s: Option<u32>,
}

impl PushTarget {
    pub const DEFAULT_TIMEOUT_S: u32 = 30;

    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_s.unwrap_or(Self::DEFAULT_TIMEOUT_S) as u64)
    }
}

/// A kind's definition, as `PUT /v1/kinds/{name}` takes it and its events record it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KindDef {
    /// Free text (at most 1,000 characters).
    #[serde(default)]
    pub description: String,
    /// Queue its jobs go to when a submission names none (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// JSON Schema (draft 2020-12) every submission's input must match (default: any JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub input_schema: Option<Value>,
    /// JSON Schema of the output (checked when a worker completes a job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub output_schema: Option<Value>,
    /// Per-attempt timeout in seconds (1-86,400) when a submission gives none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 86400)]
    pub timeout_s: Option<u32>,
    /// Attempts (1-100) when a submission gives none (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100)]
    pub max_attempts: Option<u32>,
    /// Priority when a submission gives none (default `normal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// `pull`: workers lease its jobs; `push`: Capibara POSTs them to `push.url`
    /// (docs/workers.md).
    #[serde(default)]
    pub mode: Mode,
    /// The endpoint of a `push` kind (required then, refused otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushTarget>,
    /// `POST /v1/orchestrate` only dry-runs this kind unless the request says
    /// `confirm_dangerous: true` (docs/api.md). Plain submissions are not affected.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dangerous: bool,
}

/// Default queue of a user kind.
pub const DEFAULT_QUEUE: &str = "default";

impl KindDef {
    /// Check a definition; errors name the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.description.chars().count() > 1000 {
            return Err(FieldError::new("description", "at most 1000 characters"));
        }
        if let Some(q) = &self.queue {
            if !crate::domain::job::valid_queue_name(q) {
                return Err(FieldError::new(
                    "queue",
                    "must be 1-64 characters of letters, digits, '.', '_' or '-'",
                ));
            }
        }
        for (field, schema) in [
            ("input_schema", &self.input_schema),
            ("output_schema", &self.output_schema),
        ] {
            if let Some(s) = schema {
                if !s.is_object() && !s.is_boolean() {
                    return Err(FieldError::new(field, "must be a JSON Schema object"));
                }
                jsonschema::draft202012::new(s).map_err(|e| {
                    FieldError::new(field, format!("is not a valid JSON Schema: {e}"))
                })?;
            }
        }
        if let Some(t) = self.timeout_s {
            if !(1..=86_400).contains(&t) {
                return Err(FieldError::new("timeout_s", "must be between 1 and 86400"));
            }
        }
        if let Some(m) = self.max_attempts {
            if !(1..=100).contains(&m) {
                return Err(FieldError::new("max_attempts", "must be between 1 and 100"));
            }
        }
        match (self.mode, &self.push) {
            (Mode::Push, None) => {
                return Err(FieldError::new("push", "a push kind needs push.url"));
            }
            (Mode::Pull, Some(_)) => {
                return Err(FieldError::new("push", "only for `\"mode\": \"push\"`"));
            }
            (Mode::Push, Some(p)) => {
                if p.timeout_s.is_some_and(|t| !(1..=900).contains(&t)) {
                    return Err(FieldError::new(
                        "push.timeout_s",
                        "must be between 1 and 900",
                    ));
                }
                crate::outbound::parse_url(&p.url)
                    .map_err(|e| FieldError::new("push.url", e.to_string()))?;
            }
            (Mode::Pull, None) => {}
        }
        Ok(())
    }

    pub fn queue(&self) -> &str {
        self.queue.as_deref().unwrap_or(DEFAULT_QUEUE)
    }
}

/// Events of a kind's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum KindEvent {
    KindRegistered { name: String, definition: KindDef },
    KindUpdated { definition: KindDef },
    KindDeleted {},
}

impl DomainEvent for KindEvent {
    const STREAM: StreamType = StreamType::Kind;

    fn type_name(&self) -> &'static str {
        match self {
            KindEvent::KindRegistered { .. } => "KindRegistered",
            KindEvent::KindUpdated { .. } => "KindUpdated",
            KindEvent::KindDeleted {} => "KindDeleted",
        }
    }
}

/// A user kind (the `user_kinds` row).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserKind {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub definition: KindDef,
    /// Deleted kinds keep their row (their stream goes on if the name is registered again).
    pub deleted: bool,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip)]
    compiled: OnceLock<std::sync::Arc<Compiled>>,
}

/// Compiled schemas, once per loaded kind.
#[derive(Debug)]
struct Compiled {
    input: Option<jsonschema::Validator>,
    output: Option<jsonschema::Validator>,
}

impl PartialEq for UserKind {
    fn eq(&self, other: &Self) -> bool {
        (
            self.id,
            &self.namespace,
            &self.name,
            &self.definition,
            self.deleted,
            self.version,
            self.created_at,
            self.updated_at,
        ) == (
            other.id,
            &other.namespace,
            &other.name,
            &other.definition,
            other.deleted,
            other.version,
            other.created_at,
            other.updated_at,
        )
    }
}

impl UserKind {
    /// The state after `ev` (`None`: the event does not apply).
    pub fn apply(
        prev: Option<UserKind>,
        id: Uuid,
        namespace: &str,
        ev: &KindEvent,
        at: DateTime<Utc>,
    ) -> Option<UserKind> {
        let existed = prev.is_some();
        let mut k = match (prev, ev) {
            (None, KindEvent::KindRegistered { name, definition }) => UserKind {
                id,
                namespace: namespace.to_string(),
                name: name.clone(),
                definition: definition.clone(),
                deleted: false,
                version: 0,
                created_at: at,
                updated_at: at,
                compiled: OnceLock::new(),
            },
            (None, _) => return None,
            (Some(k), _) => k,
        };
        match ev {
            KindEvent::KindRegistered { .. } if existed => return None,
            KindEvent::KindRegistered { definition, .. }
            | KindEvent::KindUpdated { definition } => {
                k.definition = definition.clone();
                k.deleted = false;
            }
            KindEvent::KindDeleted {} => {
                if k.deleted {
                    return None;
                }
                k.deleted = true;
            }
        }
        k.compiled = OnceLock::new();
        k.version += 1;
        k.updated_at = at;
        Some(k)
    }

    /// Decide a PUT: register (a new or deleted kind) or update; nothing when unchanged.
    pub fn put(current: Option<&UserKind>, name: &str, definition: KindDef) -> Vec<KindEvent> {
        match current {
            Some(k) if !k.deleted && k.definition == definition => Vec::new(),
            Some(k) if !k.deleted => vec![KindEvent::KindUpdated { definition }],
            Some(_) => vec![KindEvent::KindUpdated { definition }],
            None => vec![KindEvent::KindRegistered {
                name: name.to_string(),
                definition,
            }],
        }
    }

    fn compiled(&self) -> &Compiled {
        self.compiled.get_or_init(|| {
            let compile = |s: &Option<Value>| {
                s.as_ref()
                    .and_then(|s| jsonschema::draft202012::new(s).ok())
            };
            std::sync::Arc::new(Compiled {
                input: compile(&self.definition.input_schema),
                output: compile(&self.definition.output_schema),
            })
        })
    }

    /// Check a submission's input against the kind's schema; the error names the field under
    /// the input (`width`, `items/0` as `items.0`), like a built-in kind's.
    pub fn check_input(&self, input: &Value) -> Result<(), FieldError> {
        first_error(self.compiled().input.as_ref(), input)
    }

    /// Check a worker's output against the kind's output schema.
    pub fn check_output(&self, output: &Value) -> Result<(), FieldError> {
        first_error(self.compiled().output.as_ref(), output)
    }
}

fn first_error(v: Option<&jsonschema::Validator>, value: &Value) -> Result<(), FieldError> {
    let Some(v) = v else { return Ok(()) };
    let Some(e) = v.iter_errors(value).next() else {
        return Ok(());
    };
    let path = e
        .instance_path()
        .as_str()
        .trim_start_matches('/')
        .to_string();
    let mut field = path
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect::<Vec<_>>()
        .join(".");
    let mut message = e.to_string();
    if let jsonschema::error::ValidationErrorKind::Required { property } = e.kind() {
        let p = property.as_str().unwrap_or_default();
        field = if field.is_empty() {
            p.to_string()
        } else {
            format!("{field}.{p}")
        };
        message = "is required".into();
    }
    Err(FieldError::new(field, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(schema: Value) -> KindDef {
        KindDef {
            input_schema: Some(schema),
            ..Default::default()
        }
    }

    #[test]
    fn names_are_dotted_lowercase_and_never_built_in() {
        for ok in ["image.resize", "a", "billing.send-invoice", "x_1.y2"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Image",
            "1x",
            "a..b",
            "a.",
            "a/b",
            "echo",
            "code.run",
            "code.mine",
            "llm.chat",
            "push.call",
            &"a".repeat(65),
        ] {
            assert_eq!(validate_name(bad).unwrap_err().field, "name", "{bad}");
        }
    }

    #[test]
    fn definitions_are_checked_field_by_field() {
        assert!(def(json!({"type": "object"})).validate().is_ok());
        let field = |d: KindDef| d.validate().unwrap_err().field;
        assert_eq!(field(def(json!({"type": 5}))), "input_schema");
        assert_eq!(field(def(json!([1]))), "input_schema");
        assert_eq!(
            field(KindDef {
                queue: Some("a b".into()),
                ..Default::default()
            }),
            "queue"
        );
        assert_eq!(
            field(KindDef {
                timeout_s: Some(0),
                ..Default::default()
            }),
            "timeout_s"
        );
        assert_eq!(
            field(KindDef {
                max_attempts: Some(101),
                ..Default::default()
            }),
            "max_attempts"
        );
    }

    #[test]
    fn the_fold_registers_updates_deletes_and_registers_again() {
        let id = stream_id("ns", "k");
        assert_eq!(id, stream_id("ns", "k"));
        assert_ne!(id, stream_id("other", "k"));
        let at = Utc::now();
        let reg = UserKind::put(None, "k", KindDef::default());
        let k = UserKind::apply(None, id, "ns", &reg[0], at).unwrap();
        assert_eq!((k.version, k.deleted), (1, false));
        assert!(UserKind::put(Some(&k), "k", KindDef::default()).is_empty());
        let upd = UserKind::put(Some(&k), "k", def(json!({"type": "object"})));
        let k = UserKind::apply(Some(k), id, "ns", &upd[0], at).unwrap();
        assert_eq!(k.version, 2);
        let k = UserKind::apply(Some(k), id, "ns", &KindEvent::KindDeleted {}, at).unwrap();
        assert!(k.deleted);
        assert!(
            UserKind::apply(Some(k.clone()), id, "ns", &KindEvent::KindDeleted {}, at).is_none()
        );
        let again = UserKind::put(Some(&k), "k", KindDef::default());
        let k = UserKind::apply(Some(k), id, "ns", &again[0], at).unwrap();
        assert!(!k.deleted);
    }

    #[test]
    fn inputs_are_checked_against_the_schema_with_field_paths() {
        let at = Utc::now();
        let d = def(json!({"type": "object", "required": ["url", "width"],
            "properties": {"url": {"type": "string"}, "width": {"type": "integer", "minimum": 1},
                           "tags": {"type": "array", "items": {"type": "string"}}}}));
        let k = UserKind::apply(
            None,
            Uuid::nil(),
            "ns",
            &KindEvent::KindRegistered {
                name: "k".into(),
                definition: d,
            },
            at,
        )
        .unwrap();
        assert!(k.check_input(&json!({"url": "u", "width": 3})).is_ok());
        let field = |v: Value| k.check_input(&v).unwrap_err().field;
        assert_eq!(field(json!({"url": "u"})), "width");
        assert_eq!(field(json!({"url": "u", "width": 0})), "width");
        assert_eq!(
            field(json!({"url": "u", "width": 1, "tags": [1]})),
            "tags.0"
        );
        assert_eq!(field(json!(5)), "");
        // No output schema: any output.
        assert!(k.check_output(&json!(null)).is_ok());
    }
}
