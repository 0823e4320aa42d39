//! Job kinds Capibara accepts, their default queues, and input validation at submission.
//!
//! Inputs are checked when a job is submitted, so a broken input is a 422 for the client
//! instead of a failure discovered later on a worker. [`validate_input`] is the one check of a
//! kind's input: every entry point (`POST /v1/jobs` and its batch, schedule and trigger
//! targets, workflow step inputs, `/v1/orchestrate`, `POST /v1/tts`) calls it.

use serde_json::{json, Value};

use super::FieldError;

/// A job kind the platform can run.
#[derive(Debug, Clone, Copy)]
pub struct KindSpec {
    pub name: &'static str,
    pub default_queue: &'static str,
    pub description: &'static str,
    /// Created by Capibara itself; clients cannot submit it.
    pub internal: bool,
    validate: fn(&Value) -> Result<(), FieldError>,
    /// The JSON Schema of the input, exactly as strict as `validate` (the OpenAPI document
    /// publishes it; the fuzz test checks every input it allows is accepted). `voices` are the
    /// installed Piper voices (a `tts.render` input must name one, or an espeak voice).
    schema: fn(&[String]) -> Value,
}

/// What checking an input needs to know about this deployment beyond the input itself (which
/// voices are installed, …). A trait so this module does no IO: the binaries answer from their
/// configuration (`capibara_shared::installed`).
pub trait KindContext {
    /// Whether `tts.render` can speak with `voice` here (a Piper voice in the voices
    /// directory, or an `espeak:<language>` voice).
    fn voice_installed(&self, voice: &str) -> bool;

    /// The voices installed here (names, as `GET /v1/tts/voices` lists them), for the published
    /// input schema.
    fn installed_voices(&self) -> Vec<String>;
}

/// Check a job's kind and input, wherever the job comes from: the kind must be one clients may
/// submit, the input must have the kind's shape, and what it names must exist here (a
/// `tts.render` voice must be installed). Returns the kind; errors name the field, `kind` or
/// `input.<field>` (callers nest them: `jobs[2].input.voice`, `steps[0].input.voice`).
pub fn validate_input(
    kind: &str,
    input: &Value,
    ctx: &dyn KindContext,
) -> Result<&'static KindSpec, FieldError> {
    let spec = find_public(kind).ok_or_else(|| {
        FieldError::new(
            "kind",
            format!("unknown kind `{kind}`; available: {}", names().join(", ")),
        )
    })?;
    (spec.validate)(input).map_err(|e| e.under("input"))?;
    check_installed(spec, input, ctx).map_err(|e| e.under("input"))?;
    Ok(spec)
}

/// The checks that need [`KindContext`]; the input already has the kind's shape.
fn check_installed(
    spec: &KindSpec,
    input: &Value,
    ctx: &dyn KindContext,
) -> Result<(), FieldError> {
    if spec.name == "tts.render" {
        if let Some(voice) = input.get("voice").and_then(Value::as_str) {
            if !ctx.voice_installed(voice) {
                return Err(FieldError::new(
                    "voice",
                    format!("unknown voice `{voice}`; GET /v1/tts/voices lists them"),
                ));
            }
        }
    }
    Ok(())
}

/// Kinds available in this build. Executors for further kinds (`tts.render`, `code.run`, …)
/// register here when they land.
pub const KINDS: &[KindSpec] = &[
    KindSpec {
        name: "echo",
        default_queue: "default",
        description: "Returns its input as output.",
        internal: false,
        validate: |_| Ok(()),
        schema: |_| json!({"description": "Any JSON value; it is the job's output."}),
    },
    KindSpec {
        name: "sleep",
        default_queue: "default",
        description: "Sleeps for `ms` milliseconds (cancelable), reporting progress every \
                      `progress_ms` (default: every second from 2 s on), then returns {slept_ms}.",
        internal: false,
        validate: validate_sleep,
        schema: |_| schema_sleep(),
    },
    KindSpec {
        name: "fail",
        default_queue: "default",
        description: "Fails the first `times` attempts (or always) with `message`.",
        internal: false,
        validate: validate_fail,
        schema: |_| schema_fail(),
    },
    KindSpec {
        name: "code.run",
        default_queue: "code",
        description: "Runs a Python or JavaScript snippet in the wasm sandbox; output {result, \
                      stdout, stderr, exit_code, duration_ms, cached} (docs/code.md).",
        internal: false,
        validate: validate_code_run,
        schema: |_| schema_code(true),
    },
    KindSpec {
        name: "code.validate",
        default_queue: "code",
        description: "Syntax-checks a snippet without running it; output {valid, message, \
                      line, column} (behind POST /v1/code/validate).",
        internal: false,
        validate: validate_code_validate,
        schema: |_| schema_code(false),
    },
    KindSpec {
        name: super::workflow::WAIT_KIND,
        default_queue: "default",
        description: "A workflow `wait` step: a delayed job that does nothing (a durable timer).",
        internal: true,
        validate: |_| Ok(()),
        schema: |_| json!({}),
    },
    KindSpec {
        name: "tts.render",
        default_queue: "tts",
        description: "Speaks `text` with a Piper voice (or espeak-ng's); artifact audio.wav (or \
                      audio.pcm), one JobOutputChunk per sentence; output {duration_s, \
                      sample_rate, voice, chars_per_second, …} (docs/tts.md).",
        internal: false,
        validate: validate_tts,
        schema: schema_tts,
    },
    KindSpec {
        name: "callback.deliver",
        default_queue: "callbacks",
        description:
            "Delivers one signed webhook (created by Capibara for callbacks and subscriptions).",
        internal: true,
        validate: |_| Ok(()),
        schema: |_| json!({}),
    },
];

impl KindSpec {
    /// The JSON Schema of this kind's input here (see [`KindSpec::schema`]).
    pub fn input_schema(&self, ctx: &dyn KindContext) -> Value {
        (self.schema)(&ctx.installed_voices())
    }

    /// Whether an absent input (`{}`) is refused: the input has required fields.
    pub fn input_required(&self) -> bool {
        (self.schema)(&[])
            .get("required")
            .and_then(Value::as_array)
            .is_some_and(|r| !r.is_empty())
    }
}

/// Look a kind up by name.
pub fn find(name: &str) -> Option<&'static KindSpec> {
    KINDS.iter().find(|k| k.name == name)
}

/// A kind clients may submit.
pub fn find_public(name: &str) -> Option<&'static KindSpec> {
    find(name).filter(|k| !k.internal)
}

/// Names of the kinds clients may submit, for error messages.
pub fn names() -> Vec<&'static str> {
    KINDS
        .iter()
        .filter(|k| !k.internal)
        .map(|k| k.name)
        .collect()
}

fn object(input: &Value) -> Result<&serde_json::Map<String, Value>, FieldError> {
    input
        .as_object()
        .ok_or_else(|| FieldError::new("", "must be a JSON object"))
}

fn reject_unknown(obj: &serde_json::Map<String, Value>, known: &[&str]) -> Result<(), FieldError> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(FieldError::new(
            k.clone(),
            format!("unknown field (expected one of: {})", known.join(", ")),
        )),
        None => Ok(()),
    }
}

/// Longest `sleep` accepted: one day.
pub const MAX_SLEEP_MS: u64 = 86_400_000;

fn validate_sleep(input: &Value) -> Result<(), FieldError> {
    let obj = object(input)?;
    reject_unknown(obj, &["ms", "progress_ms"])?;
    if let Some(v) = obj.get("progress_ms") {
        match v.as_u64() {
            Some(1..=MAX_SLEEP_MS) => {}
            _ => {
                return Err(FieldError::new(
                    "progress_ms",
                    format!("must be an integer from 1 to {MAX_SLEEP_MS}"),
                ))
            }
        }
    }
    match obj.get("ms") {
        None => Err(FieldError::new("ms", "is required")),
        Some(v) => match v.as_u64() {
            Some(ms) if ms <= MAX_SLEEP_MS => Ok(()),
            Some(_) => Err(FieldError::new(
                "ms",
                format!("must be at most {MAX_SLEEP_MS}"),
            )),
            None => Err(FieldError::new("ms", "must be a non-negative integer")),
        },
    }
}

fn validate_fail(input: &Value) -> Result<(), FieldError> {
    let obj = object(input)?;
    reject_unknown(obj, &["message", "times"])?;
    if let Some(m) = obj.get("message") {
        if !m.is_string() {
            return Err(FieldError::new("message", "must be a string"));
        }
    }
    if let Some(t) = obj.get("times") {
        if t.as_u64().is_none() {
            return Err(FieldError::new("times", "must be a non-negative integer"));
        }
    }
    Ok(())
}

/// `code.run` limits (docs/code.md): the largest snippet accepted.
pub const CODE_MAX_BYTES: usize = 256 * 1024;
/// `code.run` wall-clock timeout: default and accepted range (milliseconds).
pub const CODE_DEFAULT_TIMEOUT_MS: u64 = 5_000;
pub const CODE_MAX_TIMEOUT_MS: u64 = 60_000;
/// `code.run` memory cap: default and accepted range (MiB). The Python runtime needs ~40 MiB
/// to start.
pub const CODE_DEFAULT_MEMORY_MB: u64 = 128;
pub const CODE_MIN_MEMORY_MB: u64 = 64;
pub const CODE_MAX_MEMORY_MB: u64 = 1024;
/// Languages `code.run` runs.
pub const CODE_LANGUAGES: &[&str] = &["python", "javascript"];

fn validate_code_common(obj: &serde_json::Map<String, Value>) -> Result<(), FieldError> {
    match obj.get("language") {
        None => return Err(FieldError::new("language", "is required")),
        Some(Value::String(l)) if CODE_LANGUAGES.contains(&l.as_str()) => {}
        Some(_) => {
            return Err(FieldError::new(
                "language",
                format!("must be one of: {}", CODE_LANGUAGES.join(", ")),
            ))
        }
    }
    match obj.get("code") {
        None => Err(FieldError::new("code", "is required")),
        Some(Value::String(c)) if c.len() > CODE_MAX_BYTES => Err(FieldError::new(
            "code",
            format!("must be at most {CODE_MAX_BYTES} bytes"),
        )),
        Some(Value::String(_)) => Ok(()),
        Some(_) => Err(FieldError::new("code", "must be a string")),
    }
}

fn validate_range(
    obj: &serde_json::Map<String, Value>,
    field: &str,
    min: u64,
    max: u64,
) -> Result<(), FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(()),
        Some(v) => match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(()),
            _ => Err(FieldError::new(
                field,
                format!("must be an integer from {min} to {max}"),
            )),
        },
    }
}

fn validate_code_run(input: &Value) -> Result<(), FieldError> {
    let obj = object(input)?;
    reject_unknown(
        obj,
        &[
            "language",
            "code",
            "context",
            "timeout_ms",
            "memory_mb",
            "cache",
        ],
    )?;
    validate_code_common(obj)?;
    match obj.get("context") {
        None | Some(Value::Null) | Some(Value::Object(_)) => {}
        Some(_) => {
            return Err(FieldError::new(
                "context",
                "must be an object (its keys become the code's variables)",
            ))
        }
    }
    validate_range(obj, "timeout_ms", 1, CODE_MAX_TIMEOUT_MS)?;
    validate_range(obj, "memory_mb", CODE_MIN_MEMORY_MB, CODE_MAX_MEMORY_MB)?;
    match obj.get("cache") {
        None | Some(Value::Bool(_)) => Ok(()),
        Some(_) => Err(FieldError::new("cache", "must be true or false")),
    }
}

fn validate_code_validate(input: &Value) -> Result<(), FieldError> {
    let obj = object(input)?;
    reject_unknown(obj, &["language", "code"])?;
    validate_code_common(obj)
}

/// `tts.render` limits (docs/tts.md).
pub const TTS_MAX_CHARS: usize = 20_000;
pub const TTS_SPEED: (f64, f64) = (0.25, 4.0);
pub const TTS_NOISE: (f64, f64) = (0.0, 2.0);
pub const TTS_SAMPLE_RATE: (u64, u64) = (8_000, 48_000);
pub const TTS_FORMATS: &[&str] = &["wav", "pcm_s16le"];

fn number_in(
    obj: &serde_json::Map<String, Value>,
    field: &str,
    (min, max): (f64, f64),
) -> Result<(), FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(()),
        Some(v) => match v.as_f64() {
            Some(x) if (min..=max).contains(&x) => Ok(()),
            _ => Err(FieldError::new(
                field,
                format!("must be a number from {min} to {max}"),
            )),
        },
    }
}

fn validate_tts(input: &Value) -> Result<(), FieldError> {
    let obj = object(input)?;
    reject_unknown(
        obj,
        &[
            "text",
            "voice",
            "speed",
            "noise_scale",
            "noise_w",
            "format",
            "sample_rate",
        ],
    )?;
    match obj.get("text") {
        None => return Err(FieldError::new("text", "is required")),
        Some(Value::String(t)) if t.trim().is_empty() => {
            return Err(FieldError::new("text", "must not be empty"))
        }
        Some(Value::String(t)) if t.chars().count() > TTS_MAX_CHARS => {
            return Err(FieldError::new(
                "text",
                format!("must be at most {TTS_MAX_CHARS} characters"),
            ))
        }
        Some(Value::String(_)) => {}
        Some(_) => return Err(FieldError::new("text", "must be a string")),
    }
    match obj.get("voice") {
        None | Some(Value::Null) => {}
        Some(Value::String(v))
            if !v.is_empty()
                && v.len() <= 128
                && !v.starts_with('.')
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-+:".contains(&b)) => {}
        Some(_) => {
            return Err(FieldError::new(
                "voice",
                "must be a voice name from GET /v1/tts/voices",
            ))
        }
    }
    number_in(obj, "speed", TTS_SPEED)?;
    number_in(obj, "noise_scale", TTS_NOISE)?;
    number_in(obj, "noise_w", TTS_NOISE)?;
    match obj.get("format") {
        None | Some(Value::Null) => {}
        Some(Value::String(f)) if TTS_FORMATS.contains(&f.as_str()) => {}
        Some(_) => {
            return Err(FieldError::new(
                "format",
                format!("must be one of: {}", TTS_FORMATS.join(", ")),
            ))
        }
    }
    match obj.get("sample_rate") {
        None | Some(Value::Null) => Ok(()),
        Some(v) => match v.as_u64() {
            Some(r) if (TTS_SAMPLE_RATE.0..=TTS_SAMPLE_RATE.1).contains(&r) => Ok(()),
            _ => Err(FieldError::new(
                "sample_rate",
                format!(
                    "must be an integer from {} to {} (Hz)",
                    TTS_SAMPLE_RATE.0, TTS_SAMPLE_RATE.1
                ),
            )),
        },
    }
}

/// Nullable: `null` means the field's default, as when it is absent.
fn or_null(schema: Value) -> Value {
    json!({"anyOf": [schema, {"type": "null"}]})
}

fn schema_sleep() -> Value {
    json!({"type": "object", "additionalProperties": false, "required": ["ms"], "properties": {
        "ms": {"type": "integer", "minimum": 0, "maximum": MAX_SLEEP_MS,
               "description": "How long to sleep, in milliseconds (at most one day)."},
        "progress_ms": {"type": "integer", "minimum": 1, "maximum": MAX_SLEEP_MS,
                        "description": "Report progress this often (default: every second from 2 s on)."},
    }})
}

fn schema_fail() -> Value {
    json!({"type": "object", "additionalProperties": false, "properties": {
        "message": {"type": "string", "description": "The error message."},
        "times": {"type": "integer", "minimum": 0,
                  "description": "Fail only the first `times` attempts (default: every attempt)."},
    }})
}

/// `code.run` (`run`) or `code.validate`.
fn schema_code(run: bool) -> Value {
    let mut properties = json!({
        "language": {"enum": CODE_LANGUAGES},
        "code": {"type": "string", "maxLength": CODE_MAX_BYTES,
                 "description": format!("The snippet: at most {CODE_MAX_BYTES} bytes of UTF-8.")},
    });
    if run {
        let more = json!({
            "context": or_null(json!({"type": "object",
                "description": "Bound as `context`, and each top-level key as a variable."})),
            "timeout_ms": or_null(json!({"type": "integer", "minimum": 1,
                "maximum": CODE_MAX_TIMEOUT_MS, "default": CODE_DEFAULT_TIMEOUT_MS})),
            "memory_mb": or_null(json!({"type": "integer", "minimum": CODE_MIN_MEMORY_MB,
                "maximum": CODE_MAX_MEMORY_MB, "default": CODE_DEFAULT_MEMORY_MB})),
            "cache": {"type": "boolean", "description": "Reuse a cached result of the same input (default true)."},
        });
        properties
            .as_object_mut()
            .expect("an object")
            .extend(more.as_object().expect("an object").clone());
    }
    json!({"type": "object", "additionalProperties": false, "required": ["language", "code"],
           "properties": properties})
}

/// The `voice` of a `tts.render` input: one of the voices installed here (`GET /v1/tts/voices`).
pub fn voice_schema(voices: &[String]) -> Value {
    let description = "A voice from GET /v1/tts/voices: an installed Piper voice or espeak-ng's.";
    if voices.is_empty() {
        json!({"type": "string", "description": description})
    } else {
        json!({"enum": voices, "description": description})
    }
}

fn schema_tts(voices: &[String]) -> Value {
    let number =
        |(min, max): (f64, f64)| or_null(json!({"type": "number", "minimum": min, "maximum": max}));
    json!({"type": "object", "additionalProperties": false, "required": ["text"], "properties": {
        "text": {"type": "string", "minLength": 1, "maxLength": TTS_MAX_CHARS, "pattern": "\\S",
                 "description": "What to say: not only whitespace."},
        "voice": or_null(voice_schema(voices)),
        "speed": number(TTS_SPEED),
        "noise_scale": number(TTS_NOISE),
        "noise_w": number(TTS_NOISE),
        "format": or_null(json!({"enum": TTS_FORMATS})),
        "sample_rate": or_null(json!({"type": "integer", "minimum": TTS_SAMPLE_RATE.0,
                                      "maximum": TTS_SAMPLE_RATE.1})),
    }})
}

/// Tests' deployment: the only installed voices are `en_US-joe-medium` and espeak's.
#[cfg(test)]
pub(crate) struct TestContext;

#[cfg(test)]
impl KindContext for TestContext {
    fn voice_installed(&self, voice: &str) -> bool {
        voice == "en_US-joe-medium" || voice.starts_with("espeak:")
    }

    fn installed_voices(&self) -> Vec<String> {
        vec!["en_US-joe-medium".into(), "espeak:en-us".into()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(k: &KindSpec, input: &Value) -> Result<(), FieldError> {
        validate_input(k.name, input, &TestContext).map(|_| ())
    }

    #[test]
    fn tts_inputs_are_checked_field_by_field() {
        let k = find("tts.render").unwrap();
        assert_eq!(k.default_queue, "tts");
        assert!(check(
            k,
            &json!({"text": "Hi", "voice": "en_US-joe-medium", "speed": 1.5,
                "noise_scale": 0, "format": "pcm_s16le", "sample_rate": 16000})
        )
        .is_ok());
        let field = |v: Value| check(k, &v).unwrap_err().field;
        assert_eq!(field(json!({})), "input.text");
        assert_eq!(field(json!({"text": "  "})), "input.text");
        assert_eq!(
            field(json!({"text": "a".repeat(TTS_MAX_CHARS + 1)})),
            "input.text"
        );
        assert_eq!(field(json!({"text": "a", "speed": 0})), "input.speed");
        assert_eq!(field(json!({"text": "a", "speed": "fast"})), "input.speed");
        assert_eq!(
            field(json!({"text": "a", "noise_scale": 3})),
            "input.noise_scale"
        );
        assert_eq!(field(json!({"text": "a", "format": "mp3"})), "input.format");
        assert_eq!(
            field(json!({"text": "a", "sample_rate": 100})),
            "input.sample_rate"
        );
        assert_eq!(field(json!({"text": "a", "voice": "../x"})), "input.voice");
        assert_eq!(field(json!({"text": "a", "pitch": 1})), "input.pitch");
    }

    #[test]
    fn sleep_needs_a_bounded_integer_ms() {
        let k = find("sleep").unwrap();
        assert!(check(k, &json!({"ms": 10})).is_ok());
        assert_eq!(check(k, &json!({})).unwrap_err().field, "input.ms");
        assert_eq!(check(k, &json!({"ms": "x"})).unwrap_err().field, "input.ms");
        assert_eq!(
            check(k, &json!({"ms": 1, "x": 1})).unwrap_err().field,
            "input.x"
        );
        assert_eq!(check(k, &json!([1])).unwrap_err().field, "input");
        assert!(check(k, &json!({"ms": 10, "progress_ms": 1})).is_ok());
        for bad in [json!(0), json!(-1), json!("1"), json!(1.5)] {
            assert_eq!(
                check(k, &json!({"ms": 10, "progress_ms": bad}))
                    .unwrap_err()
                    .field,
                "input.progress_ms"
            );
        }
    }

    #[test]
    fn code_run_inputs_are_checked_field_by_field() {
        let k = find("code.run").unwrap();
        assert_eq!(k.default_queue, "code");
        let ok = json!({"language": "python", "code": "result = 1", "context": {"a": [1]},
                        "timeout_ms": 1000, "memory_mb": 128, "cache": false});
        assert!(check(k, &ok).is_ok());
        let field = |v: Value| check(k, &v).unwrap_err().field;
        assert_eq!(field(json!({"code": "1"})), "input.language");
        assert_eq!(
            field(json!({"language": "ruby", "code": "1"})),
            "input.language"
        );
        assert_eq!(field(json!({"language": "python"})), "input.code");
        assert_eq!(
            field(json!({"language": "python", "code": 1})),
            "input.code"
        );
        let big = "x".repeat(CODE_MAX_BYTES + 1);
        assert_eq!(
            field(json!({"language": "python", "code": big})),
            "input.code"
        );
        assert_eq!(
            field(json!({"language": "python", "code": "1", "timeout_ms": 0})),
            "input.timeout_ms"
        );
        assert_eq!(
            field(json!({"language": "python", "code": "1", "memory_mb": 4096})),
            "input.memory_mb"
        );
        assert_eq!(
            field(json!({"language": "python", "code": "1", "cache": "no"})),
            "input.cache"
        );
        assert_eq!(
            field(json!({"language": "python", "code": "1", "fuel": 1})),
            "input.fuel"
        );
        let v = find("code.validate").unwrap();
        assert!(check(v, &json!({"language": "javascript", "code": "1"})).is_ok());
        assert_eq!(
            check(
                v,
                &json!({"language": "javascript", "code": "1", "context": {}})
            )
            .unwrap_err()
            .field,
            "input.context"
        );
    }

    #[test]
    fn unknown_kinds_are_not_found() {
        assert!(find("nope").is_none());
        assert!(names().contains(&"echo"));
    }

    #[test]
    fn one_check_covers_kind_shape_and_installed_voices() {
        let ok = validate_input(
            "tts.render",
            &json!({"text": "hi", "voice": "en_US-joe-medium"}),
            &TestContext,
        );
        assert_eq!(ok.unwrap().name, "tts.render");
        let e = validate_input(
            "tts.render",
            &json!({"text": "hi", "voice": "nope"}),
            &TestContext,
        )
        .unwrap_err();
        assert_eq!(e.field, "input.voice");
        assert!(e.message.contains("GET /v1/tts/voices"), "{}", e.message);
        // No voice: the default, nothing to look up.
        assert!(validate_input("tts.render", &json!({"text": "hi"}), &TestContext).is_ok());
        assert_eq!(
            validate_input("nope", &json!({}), &TestContext)
                .unwrap_err()
                .field,
            "kind"
        );
        // Internal kinds are not submittable.
        assert_eq!(
            validate_input("callback.deliver", &json!({}), &TestContext)
                .unwrap_err()
                .field,
            "kind"
        );
    }
}
