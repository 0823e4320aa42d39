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
    /// The error type (default `executor_error`; `rate_limited` with `retry_after_s` makes the
    /// job's rate limits back off, as a downstream 429 would).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, min_length = 1, max_length = 64)]
    pub error_type: Option<String>,
    /// Retry after this many seconds instead of the backoff (0-3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 3600, nullable = false)]
    pub retry_after_s: Option<f64>,
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
        pattern = r"^([Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.-]+(:([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?(/[!#-~]*)?|\$\{secret:[A-Za-z0-9_-]{1,128}\})$"
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

/// How `mail.send` secures its SMTP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP, no encryption (a relay on a trusted network, or a local test server).
    None,
    /// Plain SMTP upgraded with STARTTLS before anything is sent (submission, port 587); a
    /// server that does not offer STARTTLS is refused.
    Starttls,
    /// TLS from the first byte (SMTPS, port 465).
    Tls,
}

/// The SMTP server `mail.send` hands the message to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SmtpServer {
    /// The server's host name or IPv4 address (the TLS certificate must name it). Private and
    /// loopback addresses are refused unless `CAPIBARA_OUTBOUND_ALLOW_PRIVATE=true`.
    #[schema(
        min_length = 1,
        max_length = 253,
        pattern = r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$"
    )]
    pub host: String,
    /// The server's port (587 for STARTTLS submission, 465 for TLS, 25 for relays).
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u32,
    #[schema(inline)]
    pub tls: SmtpTls,
    /// Log in as this user (AUTH PLAIN or LOGIN) with the password in `password_secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, min_length = 1, max_length = 256)]
    pub username: Option<String>,
    /// The name of the namespace secret (`PUT /v1/secrets/{name}`) that holds the password;
    /// read by the worker when it sends. Required with `username`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, pattern = r"^[A-Za-z0-9_-]{1,128}$")]
    pub password_secret: Option<String>,
}

impl KindInput for SmtpServer {
    fn check(&self) -> Result<(), FieldError> {
        crate::outbound::parse_url(&format!("http://{}:{}/", self.host, self.port))
            .map_err(|e| FieldError::new("host", e.to_string()))?;
        match (&self.username, &self.password_secret) {
            (Some(_), None) => Err(FieldError::new(
                "password_secret",
                "is required with `username`: the name of the secret holding the password",
            )),
            (None, Some(_)) => Err(FieldError::new(
                "username",
                "is required with `password_secret`",
            )),
            _ => Ok(()),
        }
    }
}

/// Most recipients of one `mail.send` (to, cc and bcc together).
pub const MAIL_MAX_RECIPIENTS: usize = 100;

/// `mail.send`: one message through an SMTP server (docs/mail.md). Addresses are `a@b.example`
/// or `Name <a@b.example>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MailSendInput {
    /// The sender (the `From` header and the envelope sender).
    #[schema(min_length = 3, max_length = 512)]
    pub from: String,
    /// Recipients (`To`).
    #[schema(min_items = 1, max_items = 100)]
    pub to: Vec<String>,
    /// Copy recipients (`Cc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_items = 100)]
    pub cc: Option<Vec<String>>,
    /// Blind copy recipients: in the envelope, never in a header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_items = 100)]
    pub bcc: Option<Vec<String>>,
    /// Where replies go (`Reply-To`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 512)]
    pub reply_to: Option<String>,
    /// The subject line (one line).
    #[schema(max_length = 998, pattern = r"^[^\r\n]*$")]
    pub subject: String,
    /// The plain-text body. At least one of `text` and `html`; with both, the message is
    /// multipart/alternative.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 1_000_000)]
    pub text: Option<String>,
    /// The HTML body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 1_000_000)]
    pub html: Option<String>,
    #[schema(inline)]
    pub smtp: SmtpServer,
    /// Seconds the whole exchange may take (default 30, 1-300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 300, nullable = false)]
    pub timeout_s: Option<u32>,
}

fn mailbox(field: String, s: &str) -> Result<(), FieldError> {
    s.parse::<lettre::message::Mailbox>()
        .map(drop)
        .map_err(|e| FieldError::new(field, format!("is not an email address ({e}): {s:?}")))
}

impl KindInput for MailSendInput {
    fn check(&self) -> Result<(), FieldError> {
        mailbox("from".into(), &self.from)?;
        if let Some(r) = &self.reply_to {
            mailbox("reply_to".into(), r)?;
        }
        let lists = [
            ("to", Some(&self.to)),
            ("cc", self.cc.as_ref()),
            ("bcc", self.bcc.as_ref()),
        ];
        let mut total = 0;
        for (name, list) in lists {
            for (i, a) in list.into_iter().flatten().enumerate() {
                mailbox(format!("{name}[{i}]"), a)?;
                total += 1;
            }
        }
        if total > MAIL_MAX_RECIPIENTS {
            return Err(FieldError::new(
                "to",
                format!("at most {MAIL_MAX_RECIPIENTS} recipients in to, cc and bcc together"),
            ));
        }
        if self.text.is_none() && self.html.is_none() {
            return Err(FieldError::new("text", "is required when `html` is absent"));
        }
        self.smtp.check().map_err(|e| e.under("smtp"))
    }
}

/// `mail.send`'s input check: the SMTP server's fields first (so an error names
/// `smtp.<field>`), then the rest.
pub fn check_mail_send(input: &Value) -> Result<(), FieldError> {
    parse_mail_send(input).map(drop)
}

/// [`check_mail_send`], keeping the parsed input.
pub fn parse_mail_send(input: &Value) -> Result<MailSendInput, FieldError> {
    if let Some(smtp) = input.get("smtp").filter(|s| s.is_object()) {
        parse::<SmtpServer>(smtp).map_err(|e| e.under("smtp"))?;
    }
    parse::<MailSendInput>(input)
}

/// The JSON Schema derived from `T`, as JSON.
pub fn schema<T: PartialSchema>() -> Value {
    let mut v = serde_json::to_value(T::schema()).expect("a schema serializes");
    // The derived integer formats (`int64`, …) are OpenAPI annotations the ranges already say.
    strip_formats(&mut v);
    // An optional inline struct is derived as a `oneOf` of one form: the form itself, so that
    // errors name the fields inside it (`rate_limit.count`, not `rate_limit`).
    unwrap_single_forms(&mut v);
    v
}

fn unwrap_single_forms(v: &mut Value) {
    match v {
        Value::Object(o) => {
            let single = match o.get("oneOf") {
                Some(Value::Array(forms)) if forms.len() == 1 && forms[0].is_object() => {
                    forms[0].as_object().cloned()
                }
                _ => None,
            };
            if let Some(form) = single {
                o.remove("oneOf");
                for (k, val) in form {
                    o.entry(k).or_insert(val);
                }
            }
            o.values_mut().for_each(unwrap_single_forms);
        }
        Value::Array(a) => a.iter_mut().for_each(unwrap_single_forms),
        _ => {}
    }
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
    // Inside a field (an array's item, an object's member): name the place in full,
    // `examples[3].text`.
    let path = field_path(e.instance_path().as_str());
    if path != field {
        return Some(match e.kind() {
            K::Required { property } => FieldError::new(
                format!("{path}.{}", property.as_str().unwrap_or_default()),
                "is required",
            ),
            _ => FieldError::new(path, e.to_string()),
        });
    }
    let wanted = properties
        .and_then(|p| p.get(&field))
        .map(describe)
        .unwrap_or_else(|| e.to_string());
    Some(FieldError::new(field, wanted))
}

/// A JSON pointer (`/examples/3/text`) as a field path (`examples[3].text`).
fn field_path(pointer: &str) -> String {
    let mut out = String::new();
    for part in pointer.trim_start_matches('/').split('/') {
        let part = part.replace("~1", "/").replace("~0", "~");
        if !out.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) && !part.is_empty() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&part);
        }
    }
    out
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
