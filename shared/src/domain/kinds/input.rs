//! Each kind's input, once, as a typed struct: the executor deserializes it, and its JSON Schema
//! is derived from it (utoipa) and published (`GET /v1/kinds`, `/openapi.json`). Submission
//! checks an input against that derived schema ([`check`]), so what the server accepts and what
//! it publishes cannot drift; an error names the field and says what its schema allows.

use std::sync::OnceLock;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::{PartialSchema, ToSchema};

use super::CODE_MAX_BYTES;
use crate::domain::FieldError;

/// A kind's typed input.
pub trait KindInput: DeserializeOwned + PartialSchema {
    /// What the schema cannot state (a limit in bytes where JSON Schema counts characters).
    fn check(&self) -> Result<(), FieldError> {
        Ok(())
    }
}

/// `sleep`: sleeps, reporting progress, then returns `{slept_ms}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SleepInput {
    /// How long to sleep, in milliseconds (at most one day).
    #[schema(minimum = 0, maximum = 86_400_000)]
    pub ms: u64,
    /// Report progress this often, in milliseconds (default: every second from 2 s on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 86_400_000, nullable = false)]
    pub progress_ms: Option<u64>,
}
impl KindInput for SleepInput {}

/// `fail`: fails the first `times` attempts (every attempt when absent) with `message`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailInput {
    /// The error message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub message: Option<String>,
    /// Fail only the first `times` attempts (default: every attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, nullable = false)]
    pub times: Option<u64>,
}
impl KindInput for FailInput {}

/// A language `code.run` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CodeLanguage {
    Python,
    Javascript,
}

/// `code.run`: a Python or JavaScript snippet in the wasm sandbox (docs/code.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeRunInput {
    #[schema(inline)]
    pub language: CodeLanguage,
    /// The snippet: at most 262144 bytes of UTF-8.
    #[schema(max_length = 262_144)]
    pub code: String,
    /// Bound as `context`, and each top-level key as a variable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub context: Option<Map<String, Value>>,
    /// Wall-clock limit in milliseconds (default 5000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 60_000, default = 5000)]
    pub timeout_ms: Option<u64>,
    /// Memory cap in MiB (default 128).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 64, maximum = 1024, default = 128)]
    pub memory_mb: Option<u64>,
    /// Reuse a cached result of the same input (default true).
    #[serde(default = "yes")]
    #[schema(default = true)]
    pub cache: bool,
}

fn yes() -> bool {
    true
}

impl KindInput for CodeRunInput {
    fn check(&self) -> Result<(), FieldError> {
        code_bytes(&self.code)
    }
}

/// `code.validate`: syntax-checks a snippet without running it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeValidateInput {
    #[schema(inline)]
    pub language: CodeLanguage,
    /// The snippet: at most 262144 bytes of UTF-8.
    #[schema(max_length = 262_144)]
    pub code: String,
}

impl KindInput for CodeValidateInput {
    fn check(&self) -> Result<(), FieldError> {
        code_bytes(&self.code)
    }
}

fn code_bytes(code: &str) -> Result<(), FieldError> {
    if code.len() > CODE_MAX_BYTES {
        return Err(FieldError::new(
            "code",
            format!("must be at most {CODE_MAX_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// The audio encoding of `tts.render`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TtsFormat {
    Wav,
    PcmS16le,
}

/// `tts.render`: speaks `text` (docs/tts.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TtsRenderInput {
    /// What to say: not only whitespace.
    #[schema(min_length = 1, max_length = 20_000, pattern = r"\S")]
    pub text: String,
    /// A voice from GET /v1/tts/voices: an installed Piper voice or espeak-ng's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[A-Za-z0-9_+:-][A-Za-z0-9._+:-]{0,127}$")]
    pub voice: Option<String>,
    /// Speaking rate (1 is the voice's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.25, maximum = 4.0)]
    pub speed: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub noise_scale: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub noise_w: Option<f64>,
    /// `wav` (default) or raw `pcm_s16le`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub format: Option<TtsFormat>,
    /// Resample to this rate, in Hz.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 8000, maximum = 48_000)]
    pub sample_rate: Option<u32>,
}
impl KindInput for TtsRenderInput {}

/// `chat.post`: a message to a Slack-compatible incoming webhook (Slack, Mattermost, Rocket.Chat,
/// Discord's `/slack` endpoint, …): `POST url` with `{text, …}` as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatPostInput {
    /// The webhook's http(s) URL, or a whole `${secret:NAME}` reference to one (in workflow
    /// steps). Private and loopback addresses are refused unless
    /// `CAPIBARA_OUTBOUND_ALLOW_PRIVATE=true`.
    #[schema(
        max_length = 2048,
        pattern = r"^([Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[!#-~]*)?|\$\{secret:[A-Za-z0-9_-]{1,128}\})$"
    )]
    pub url: String,
    /// The message (Slack mrkdwn), at most 40,000 characters.
    #[schema(min_length = 1, max_length = 40_000)]
    pub text: String,
    /// Slack Block Kit blocks, sent as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_items = 50)]
    pub blocks: Option<Vec<Map<String, Value>>>,
    /// Override the webhook's default channel, where the service allows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 200)]
    pub channel: Option<String>,
    /// Override the webhook's display name, where the service allows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 200)]
    pub username: Option<String>,
    /// Seconds the call may take (default 15, 1-60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 60, nullable = false)]
    pub timeout_s: Option<u32>,
}

impl ChatPostInput {
    /// Whether `url` is a whole `${secret:NAME}` reference (resolved on the worker).
    pub fn url_is_secret(&self) -> bool {
        self.url
            .strip_prefix("${secret:")
            .and_then(|r| r.strip_suffix('}'))
            .is_some_and(crate::domain::secret_name_ok)
    }
}

impl KindInput for ChatPostInput {
    fn check(&self) -> Result<(), FieldError> {
        if !self.url_is_secret() {
            crate::outbound::parse_url(&self.url)
                .map_err(|e| FieldError::new("url", e.to_string()))?;
        }
        Ok(())
    }
}

/// The JSON Schema derived from `T`, as JSON.
pub fn schema<T: PartialSchema>() -> Value {
    let mut v = serde_json::to_value(T::schema()).expect("a schema serializes");
    // The derived integer formats (`int64`, …) are OpenAPI annotations the ranges already say.
    strip_formats(&mut v);
    v
}

fn strip_formats(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if o.get("format").and_then(Value::as_str).is_some_and(|f| {
                matches!(
                    f,
                    "int32" | "int64" | "uint32" | "uint64" | "double" | "float"
                )
            }) {
                o.remove("format");
            }
            o.values_mut().for_each(strip_formats);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_formats),
        _ => {}
    }
}

/// Check `input` against `T`'s derived schema and parse it. The schema is compiled once per
/// type.
pub fn parse<T: KindInput + 'static>(input: &Value) -> Result<T, FieldError> {
    let schema = compiled::<T>();
    let errors: Vec<_> = schema.validator.iter_errors(input).collect();
    if let Some(e) = first_error(&schema.schema, &errors) {
        return Err(e);
    }
    let parsed: T = serde_json::from_value(input.clone())
        .map_err(|e| FieldError::new("", format!("does not fit the kind's input: {e}")))?;
    parsed.check()?;
    Ok(parsed)
}

/// [`parse`], keeping only the verdict.
pub fn check<T: KindInput + 'static>(input: &Value) -> Result<(), FieldError> {
    parse::<T>(input).map(drop)
}

struct Compiled {
    schema: Value,
    validator: jsonschema::Validator,
}

/// One compiled validator per input type, for the life of the process.
fn compiled<T: KindInput + 'static>() -> &'static Compiled {
    static ALL: OnceLock<std::sync::Mutex<Vec<(std::any::TypeId, &'static Compiled)>>> =
        OnceLock::new();
    let id = std::any::TypeId::of::<T>();
    let mut all = ALL
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some((_, c)) = all.iter().find(|(t, _)| *t == id) {
        return c;
    }
    let schema = schema::<T>();
    let validator = jsonschema::validator_for(&schema).expect("a derived schema compiles");
    let c: &'static Compiled = Box::leak(Box::new(Compiled { schema, validator }));
    all.push((id, c));
    c
}

/// The error to report when several are found: the input's own shape first, then unknown
/// fields, then missing ones, then the first field (in the schema's order) that is wrong.
fn first_error(schema: &Value, errors: &[jsonschema::ValidationError<'_>]) -> Option<FieldError> {
    use jsonschema::error::ValidationErrorKind as K;
    let top = |e: &&jsonschema::ValidationError<'_>| e.instance_path().is_empty();
    if errors
        .iter()
        .filter(top)
        .any(|e| matches!(e.kind(), K::Type { .. }))
    {
        return Some(FieldError::new("", "must be a JSON object"));
    }
    let properties = schema.get("properties").and_then(Value::as_object);
    let known = || {
        properties
            .map(|p| p.keys().map(String::as_str).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    };
    for e in errors.iter().filter(top) {
        if let K::AdditionalProperties { unexpected } = e.kind() {
            let field = unexpected.first().cloned().unwrap_or_default();
            return Some(FieldError::new(
                field,
                format!("unknown field (expected one of: {})", known()),
            ));
        }
    }
    for e in errors.iter().filter(top) {
        if let K::Required { property } = e.kind() {
            return Some(FieldError::new(
                property.as_str().unwrap_or_default(),
                "is required",
            ));
        }
    }
    let field_of = |e: &jsonschema::ValidationError<'_>| {
        e.instance_path()
            .as_str()
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default()
            .replace("~1", "/")
            .replace("~0", "~")
    };
    let order = |f: &str| {
        properties
            .and_then(|p| p.keys().position(|k| k == f))
            .unwrap_or(usize::MAX)
    };
    let e = errors.iter().min_by_key(|e| order(&field_of(e)))?;
    let field = field_of(e);
    let wanted = properties
        .and_then(|p| p.get(&field))
        .map(describe)
        .unwrap_or_else(|| e.to_string());
    Some(FieldError::new(field, wanted))
}

/// What a field's schema allows, in words: "must be an integer from 1 to 60000".
pub fn describe(schema: &Value) -> String {
    let s = schema;
    if let Some(options) = s.get("enum").and_then(Value::as_array) {
        let names: Vec<String> = options
            .iter()
            .filter(|o| !o.is_null())
            .map(|o| o.as_str().map_or_else(|| o.to_string(), str::to_string))
            .collect();
        return format!("must be one of: {}", names.join(", "));
    }
    if let Some(one_of) = s
        .get("oneOf")
        .or_else(|| s.get("anyOf"))
        .and_then(Value::as_array)
    {
        if let Some(inner) = one_of
            .iter()
            .find(|o| o.get("type") != Some(&json!("null")))
        {
            return describe(inner);
        }
    }
    let types: Vec<&str> = match s.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let range = |what: &str| match (s.get("minimum"), s.get("maximum")) {
        (Some(min), Some(max)) => format!("must be {what} from {min} to {max}"),
        (Some(min), None) => format!("must be {what} of at least {min}"),
        (None, Some(max)) => format!("must be {what} of at most {max}"),
        (None, None) => format!("must be {what}"),
    };
    if types.contains(&"integer") {
        return range("an integer");
    }
    if types.contains(&"number") {
        return range("a number");
    }
    if types.contains(&"boolean") {
        return "must be true or false".into();
    }
    if types.contains(&"object") {
        return "must be an object".into();
    }
    if types.contains(&"string") {
        if s.get("pattern").and_then(Value::as_str) == Some(r"\S") {
            return match s.get("maxLength") {
                Some(max) => format!("must be a non-blank string of at most {max} characters"),
                None => "must be a non-blank string".into(),
            };
        }
        if let Some(pattern) = s.get("pattern").and_then(Value::as_str) {
            return format!("must be a string matching `{pattern}`");
        }
        return match s.get("maxLength") {
            Some(max) => format!("must be a string of at most {max} characters"),
            None => "must be a string".into(),
        };
    }
    "has the wrong type".into()
}
