//! Job kinds Capibara accepts, their default queues, and input validation at submission.
//!
//! Inputs are checked when a job is submitted, so a broken input is a 422 for the client
//! instead of a failure discovered later on a worker. [`validate_input`] is the one check of a
//! kind's input: every entry point (`POST /v1/jobs` and its batch, schedule and trigger
//! targets, workflow step inputs, `/v1/orchestrate`, `POST /v1/tts`) calls it. Each kind's input
//! is one typed struct ([`input`]): the executor reads it, and its JSON Schema, derived from it,
//! is what submission checks and what `GET /v1/kinds` publishes.

pub mod http;
pub mod input;
pub mod llm;
pub mod mcp;
pub mod memory;
pub mod model;
pub mod output;
pub mod user;

use serde_json::{json, Value};

use self::input::{
    ChatPostInput, CodeRunInput, CodeValidateInput, FailInput, SleepInput, TtsRenderInput,
};
use self::user::UserKind;
use super::{
    connector::types::{ConnectorFetchInput, ConnectorFetchOutput},
    content::{ContentProcessInput, ContentProcessOutput},
    FieldError,
};

/// A job kind the platform can run.
#[derive(Debug, Clone, Copy)]
pub struct KindSpec {
    pub name: &'static str,
    pub default_queue: &'static str,
    pub description: &'static str,
    /// Created by Capibara itself; clients cannot submit it.
    pub internal: bool,
    /// Run by programs of the worker protocol that declare it (an external trainer), never by
    /// `capibara-worker`: its jobs are dispatched on a lane, as user kinds are.
    pub external: bool,
    validate: fn(&Value) -> Result<(), FieldError>,
    /// The JSON Schema of the input: the one `validate` checks, derived from the kind's input
    /// type. `voices` are the installed voices (a `tts.render` input must name one), which the
    /// published schema lists as an enum.
    schema: fn(&[String]) -> Value,
    /// The JSON Schema of the output, derived from the kind's output type, where it is known.
    output: Option<fn() -> Value>,
}

/// What checking an input needs to know about this deployment beyond the input itself (which
/// voices are installed, …). A trait so this module does no IO: the binaries answer from their
/// configuration (`capibara_shared::installed`).
pub trait KindContext: Send + Sync {
    /// Whether `tts.render` can speak with `voice` here (a Piper voice in the voices
    /// directory, or an `espeak:<language>` voice).
    fn voice_installed(&self, voice: &str) -> bool;

    /// The voices installed here (names, as `GET /v1/tts/voices` lists them), for the published
    /// input schema.
    fn installed_voices(&self) -> Vec<String>;

    /// The user kind `name` of the namespace being checked (docs/workers.md). Contexts that
    /// check a request load the kinds it names first; the default knows none.
    fn user_kind(&self, _name: &str) -> UserKindLookup<'_> {
        UserKindLookup::Missing
    }
}

/// What a [`KindContext`] knows of a user kind.
pub enum UserKindLookup<'a> {
    Registered(&'a UserKind),
    /// Not registered (or deleted) in the namespace.
    Missing,
    /// This context does not load user kinds (a workflow step's rendered input, checked in the
    /// orchestrator): a well-formed name is accepted unchecked.
    NotLoaded,
}

/// A kind an input was checked against.
#[derive(Debug, Clone, Copy)]
pub enum KindRef<'a> {
    Builtin(&'static KindSpec),
    User(&'a UserKind),
    /// A user kind's name the context could not check ([`UserKindLookup::NotLoaded`]).
    Unchecked,
}

impl KindRef<'_> {
    /// The queue its jobs go to when a submission names none.
    pub fn default_queue(&self) -> &str {
        match self {
            KindRef::Builtin(k) => k.default_queue,
            KindRef::User(k) => k.definition.queue(),
            KindRef::Unchecked => user::DEFAULT_QUEUE,
        }
    }

    /// The user kind's definition, if it is one.
    pub fn user(&self) -> Option<&user::KindDef> {
        match self {
            KindRef::User(k) => Some(&k.definition),
            _ => None,
        }
    }
}

/// Check a job's kind and input, wherever the job comes from: the kind must be one clients may
/// submit, the input must have the kind's shape, and what it names must exist here (a
/// `tts.render` voice must be installed). Returns the kind; errors name the field, `kind` or
/// `input.<field>` (callers nest them: `jobs[2].input.voice`, `steps[0].input.voice`).
pub fn validate_input<'a>(
    kind: &str,
    input: &Value,
    ctx: &'a dyn KindContext,
) -> Result<KindRef<'a>, FieldError> {
    let unknown = || {
        FieldError::new(
            "kind",
            format!(
                "unknown kind `{kind}`; available: {} and the kinds registered in this namespace \
                 (GET /v1/kinds)",
                names().join(", ")
            ),
        )
    };
    let Some(spec) = find_public(kind) else {
        if user::is_builtin(kind) || user::validate_name(kind).is_err() {
            return Err(unknown());
        }
        return match ctx.user_kind(kind) {
            UserKindLookup::Registered(k) => {
                k.check_input(input).map_err(|e| e.under("input"))?;
                Ok(KindRef::User(k))
            }
            UserKindLookup::Missing => Err(unknown()),
            UserKindLookup::NotLoaded => Ok(KindRef::Unchecked),
        };
    };
    (spec.validate)(input).map_err(|e| e.under("input"))?;
    check_installed(spec, input, ctx).map_err(|e| e.under("input"))?;
    Ok(KindRef::Builtin(spec))
}

/// The Redis key suffix a job of `kind` in `queue` is dispatched on: the queue for built-in
/// kinds (`capibara-worker` pops queues), the lane `{queue}/{namespace}/{kind}` for user kinds
/// and the built-in kinds that external programs run ([`KindSpec::external`])
/// (workers of the protocol lease the lanes of the kinds they declared), so no worker is ever
/// handed a job it cannot run. Queue names hold no `/`.
pub fn lane(queue: &str, namespace: &str, kind: &str) -> String {
    if find(kind).is_some_and(|k| !k.external) {
        queue.to_string()
    } else {
        format!("{queue}/{namespace}/{kind}")
    }
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
        external: false,
        validate: |_| Ok(()),
        schema: |_| json!({"description": "Any JSON value; it is the job's output."}),
        output: None,
    },
    KindSpec {
        name: "sleep",
        default_queue: "default",
        description: "Sleeps for `ms` milliseconds (cancelable), reporting progress every \
                      `progress_ms` (default: every second from 2 s on), then returns {slept_ms}.",
        internal: false,
        external: false,
        validate: input::check::<SleepInput>,
        schema: |_| typed::<SleepInput>(),
        output: Some(typed::<output::SleepOutput>),
    },
    KindSpec {
        name: "fail",
        default_queue: "default",
        description: "Fails the first `times` attempts (or always) with `message`.",
        internal: false,
        external: false,
        validate: input::check::<FailInput>,
        schema: |_| typed::<FailInput>(),
        output: Some(typed::<output::FailOutput>),
    },
    KindSpec {
        name: "code.run",
        default_queue: "code",
        description: "Runs a Python or JavaScript snippet in the wasm sandbox; output {result, \
                      stdout, stderr, exit_code, duration_ms, cached} (docs/code.md).",
        internal: false,
        external: false,
        validate: input::check::<CodeRunInput>,
        schema: |_| typed::<CodeRunInput>(),
        output: Some(typed::<output::CodeRunOutput>),
    },
    KindSpec {
        name: "code.validate",
        default_queue: "code",
        description: "Syntax-checks a snippet without running it; output {valid, message, \
                      line, column} (behind POST /v1/code/validate).",
        internal: false,
        external: false,
        validate: input::check::<CodeValidateInput>,
        schema: |_| typed::<CodeValidateInput>(),
        output: Some(typed::<output::CodeValidateOutput>),
    },
    KindSpec {
        name: super::workflow::WAIT_KIND,
        default_queue: "default",
        description: "A workflow `wait` step: a delayed job that does nothing (a durable timer).",
        internal: true,
        external: false,
        validate: |_| Ok(()),
        schema: |_| json!({}),
        output: None,
    },
    KindSpec {
        name: "tts.render",
        default_queue: "tts",
        description: "Speaks `text` with a Piper voice (or espeak-ng's); artifact audio.wav (or \
                      audio.pcm), one JobOutputChunk per sentence; output {duration_s, \
                      sample_rate, voice, chars_per_second, …} (docs/tts.md).",
        internal: false,
        external: false,
        validate: input::check::<TtsRenderInput>,
        schema: schema_tts,
        output: Some(typed::<output::TtsRenderOutput>),
    },
    KindSpec {
        name: "connector.fetch",
        default_queue: "connector",
        description: "The new items of a connector (`connector_id`) or of an inline {type, \
                      config}: output {fetched, new_items, items (the first few), artifact \
                      items.jsonl, cursor}; the connector's cursor advances with the job's \
                      success (docs/connectors.md).",
        internal: false,
        external: false,
        validate: input::check::<ConnectorFetchInput>,
        schema: |_| super::connector::types::fetch_schema(),
        output: Some(typed::<ConnectorFetchOutput>),
    },
    KindSpec {
        name: "content.process",
        default_queue: "default",
        description: "Text operations on items, inline (`items`) or a JSONL artifact of an \
                      earlier job (`artifact`, e.g. connector.fetch's items.jsonl): language, \
                      keywords, summary, readability, stats, html_to_text; output {items (one \
                      result per item), processed} (docs/content.md).",
        internal: false,
        external: false,
        validate: input::check::<ContentProcessInput>,
        schema: |_| super::content::input_schema(),
        output: Some(typed::<ContentProcessOutput>),
    },
    KindSpec {
        name: "chat.post",
        default_queue: "default",
        description: "Posts `text` (and Block Kit `blocks`) to a Slack-compatible incoming \
                      webhook; output {status, response, duration_ms}; 429 and 5xx are retried \
                      (after Retry-After), other 4xx fail (docs/connectors.md).",
        internal: false,
        external: false,
        validate: input::check::<ChatPostInput>,
        schema: |_| typed::<ChatPostInput>(),
        output: Some(typed::<output::ChatPostOutput>),
    },
    KindSpec {
        name: "mail.send",
        default_queue: "default",
        description: "Sends one email (text and/or HTML) through an SMTP server (STARTTLS, TLS or \
                      plain; password from a namespace secret); output {message_id, accepted, \
                      response}; 4xx answers and lost connections are retried, 5xx fail \
                      (docs/mail.md).",
        internal: false,
        external: false,
        validate: input::check_mail_send,
        schema: |_| typed::<input::MailSendInput>(),
        output: Some(typed::<output::MailSendOutput>),
    },
    KindSpec {
        name: "http.request",
        default_queue: "default",
        description: "One HTTP call through the outbound guard: {method, url, headers, query, \
                      body | json | form, auth (bearer/basic from a secret), timeout_ms, \
                      expect_status, response}; 408, 429 (Retry-After) and 5xx are retried \
                      with the job's backoff; a circuit breaker per host (GET \
                      /v1/http/hosts); output {status, headers, body, url, duration_ms} \
                      (docs/http.md).",
        internal: false,
        external: false,
        validate: input::check::<http::HttpRequestInput>,
        schema: |_| http::http_schema(),
        output: Some(typed::<http::HttpRequestOutput>),
    },
    KindSpec {
        name: "llm.generate",
        default_queue: "default",
        description: "One answer from a language model through the namespace's providers \
                      (/v1/llm/providers, OpenAI-compatible or Anthropic): {model | provider, \
                      prompt | messages, system, params, stream}; routed by model with \
                      failover and a circuit breaker per provider; `stream` writes tokens as \
                      output chunks; output {text, message, provider, model, usage, \
                      latency_ms, ttft_ms, cost_usd, tries} (docs/llm.md).",
        internal: false,
        external: false,
        validate: input::check::<llm::LlmInput>,
        schema: |_| llm::llm_schema(false),
        output: Some(typed::<llm::LlmOutput>),
    },
    KindSpec {
        name: "llm.chat",
        default_queue: "default",
        description: "`llm.generate` for a conversation: {model | provider, messages, system, \
                      params, stream}; the output's `message` continues it (docs/llm.md).",
        internal: false,
        external: false,
        validate: llm::check_chat,
        schema: |_| llm::llm_schema(true),
        output: Some(typed::<llm::LlmOutput>),
    },
    KindSpec {
        name: "mcp.call",
        default_queue: "default",
        description: "Calls `tool` with `arguments` on a remote MCP server (streamable HTTP, \
                      through the outbound guard; `auth` bearer/basic from a secret); relays \
                      the server's progress; output {content, structuredContent, isError}; a \
                      tool error fails the job, connect errors, timeouts and 5xx are retried \
                      (docs/mcp.md).",
        internal: false,
        external: false,
        validate: input::check::<mcp::McpCallInput>,
        schema: |_| mcp::mcp_schema(),
        output: Some(typed::<mcp::McpCallOutput>),
    },
    KindSpec {
        name: "text.embed",
        default_queue: "models",
        description: "Sentence vectors of `texts` (1-256) with all-MiniLM-L6-v2 (384 \
                      dimensions, unit length, first 256 tokens of each text); output {model, \
                      dimensions, vectors, tokens, truncated} (docs/models.md).",
        internal: false,
        external: false,
        validate: input::check::<model::TextEmbedInput>,
        schema: |_| model::embed_schema(),
        output: Some(typed::<model::TextEmbedOutput>),
    },
    KindSpec {
        name: "finetune.train",
        default_queue: "finetune",
        description: "Trains a text classifier (the all-MiniLM-L6-v2 encoder and a \
                      classification head, candle) on labeled examples (inline, a JSONL URL or \
                      artifact), with progress, checkpoints and resume; registers it as the \
                      next version of `name` (`GET /v1/models`); output {model, model_id, \
                      version, labels, metrics} (docs/models.md).",
        internal: false,
        external: false,
        validate: model::check_train,
        schema: |_| model::train_schema(),
        output: Some(typed::<model::FinetuneTrainOutput>),
    },
    KindSpec {
        name: "finetune.command",
        default_queue: "finetune",
        description: "Hands a training (`finetune.train`'s input, plus `params` for the \
                      trainer) to an external trainer, any program that declares this kind \
                      over the worker protocol; its progress and checkpoints are the job's, \
                      and the model file it completes with is checked and registered as the \
                      next version of `name`; output {model, model_id, version, labels, \
                      metrics, trainer} (docs/models.md).",
        internal: false,
        external: true,
        validate: input::check::<model::FinetuneTrainInput>,
        schema: |_| model::command_schema(),
        output: Some(typed::<model::FinetuneCommandOutput>),
    },
    KindSpec {
        name: "model.classify",
        default_queue: "finetune",
        description: "Classifies `texts` (1-256) with a model `finetune.train` registered \
                      (`name`, `name@version` or an id); output {model, predictions: [{label, \
                      score, scores}]} (docs/models.md).",
        internal: false,
        external: false,
        validate: input::check::<model::ModelClassifyInput>,
        schema: |_| model::classify_schema(),
        output: Some(typed::<model::ModelClassifyOutput>),
    },
    KindSpec {
        name: "text.chunk",
        default_queue: "models",
        description: "Cuts `text` into chunks that fit the encoder (all-MiniLM-L6-v2's tokens): \
                      whole sentences packed up to `max_tokens` (`sentence`, the default) or \
                      token windows with an `overlap` (`tokens`); output {strategy, chunks: \
                      [{text, start, end, tokens}]} (docs/models.md).",
        internal: false,
        external: false,
        validate: input::check::<model::TextChunkInput>,
        schema: |_| typed::<model::TextChunkInput>(),
        output: Some(typed::<model::TextChunkOutput>),
    },
    KindSpec {
        name: "memory.write",
        default_queue: "models",
        description: "Stores `text` with its sentence vector (all-MiniLM-L6-v2), `tags` and \
                      `metadata` in a collection, for `memory.search`; output {id, collection, \
                      tokens, truncated} (docs/models.md).",
        internal: false,
        external: false,
        validate: input::check::<memory::MemoryWriteInput>,
        schema: |_| memory::write_schema(),
        output: Some(typed::<memory::MemoryWriteOutput>),
    },
    KindSpec {
        name: "memory.search",
        default_queue: "models",
        description: "The `k` stored texts of a collection nearest to `query`: by meaning \
                      (`semantic`), by words (`keyword`, Postgres full-text search) or both \
                      fused by reciprocal rank (`hybrid`, the default); `tags` filter; output \
                      {items: [{id, text, tags, metadata, score}]} (docs/models.md).",
        internal: false,
        external: false,
        validate: input::check::<memory::MemorySearchInput>,
        schema: |_| memory::search_schema(),
        output: Some(typed::<memory::MemorySearchOutput>),
    },
    KindSpec {
        name: "callback.deliver",
        default_queue: "callbacks",
        description:
            "Delivers one signed webhook (created by Capibara for callbacks and subscriptions).",
        internal: true,
        external: false,
        validate: |_| Ok(()),
        schema: |_| json!({}),
        output: None,
    },
];

impl KindSpec {
    /// The JSON Schema of this kind's input here (see [`KindSpec::schema`]).
    pub fn input_schema(&self, ctx: &dyn KindContext) -> Value {
        (self.schema)(&ctx.installed_voices())
    }

    /// The JSON Schema of this kind's output, where it is known (`echo` returns its input).
    pub fn output_schema(&self) -> Option<Value> {
        self.output.map(|schema| schema())
    }

    /// Whether an absent input (`{}`) is refused: the input has required fields.
    pub fn input_required(&self) -> bool {
        // Whatever the schema's form (`required`, `oneOf`, rules between fields): does it take
        // an empty input?
        let schema = (self.schema)(&[]);
        jsonschema::validator_for(&schema).map_or(true, |v| !v.is_valid(&json!({})))
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

/// Longest `sleep` accepted: one day.
pub const MAX_SLEEP_MS: u64 = 86_400_000;

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

/// `tts.render` limits (docs/tts.md).
pub const TTS_MAX_CHARS: usize = 20_000;
pub const TTS_SPEED: (f64, f64) = (0.25, 4.0);
pub const TTS_NOISE: (f64, f64) = (0.0, 2.0);
pub const TTS_SAMPLE_RATE: (u64, u64) = (8_000, 48_000);
pub const TTS_FORMATS: &[&str] = &["wav", "pcm_s16le"];

/// The `voice` of a `tts.render` input: one of the voices installed here (`GET /v1/tts/voices`).
pub fn voice_schema(voices: &[String]) -> Value {
    let description = "A voice from GET /v1/tts/voices: an installed Piper voice or espeak-ng's.";
    if voices.is_empty() {
        json!({"type": "string", "description": description})
    } else {
        json!({"enum": voices, "description": description})
    }
}

/// A kind's derived input or output schema (see [`input`], [`output`]).
fn typed<T: utoipa::PartialSchema>() -> Value {
    input::schema::<T>()
}

/// `tts.render`'s derived schema, with `voice` one of the voices installed here.
fn schema_tts(voices: &[String]) -> Value {
    let mut schema = typed::<TtsRenderInput>();
    if !voices.is_empty() {
        schema["properties"]["voice"] = json!({"anyOf": [voice_schema(voices), {"type": "null"}],
            "description": "A voice from GET /v1/tts/voices: an installed Piper voice or espeak-ng's."});
    }
    schema
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
    fn derived_schemas_state_the_limits_the_executors_use() {
        let sleep = find("sleep").unwrap().input_schema(&TestContext);
        assert_eq!(sleep["properties"]["ms"]["maximum"], json!(MAX_SLEEP_MS));
        assert_eq!(sleep["required"], json!(["ms"]));
        assert_eq!(sleep["additionalProperties"], json!(false));
        let code = find("code.run").unwrap().input_schema(&TestContext);
        let p = &code["properties"];
        assert_eq!(p["code"]["maxLength"], json!(CODE_MAX_BYTES));
        assert_eq!(p["timeout_ms"]["maximum"], json!(CODE_MAX_TIMEOUT_MS));
        assert_eq!(p["timeout_ms"]["default"], json!(CODE_DEFAULT_TIMEOUT_MS));
        assert_eq!(p["memory_mb"]["minimum"], json!(CODE_MIN_MEMORY_MB));
        assert_eq!(p["memory_mb"]["maximum"], json!(CODE_MAX_MEMORY_MB));
        assert_eq!(p["memory_mb"]["default"], json!(CODE_DEFAULT_MEMORY_MB));
        assert_eq!(p["language"]["enum"], json!(CODE_LANGUAGES));
        let tts = find("tts.render").unwrap().input_schema(&TestContext);
        let p = &tts["properties"];
        assert_eq!(p["text"]["maxLength"], json!(TTS_MAX_CHARS));
        let n = |v: &Value| v.as_f64().unwrap();
        assert_eq!(n(&p["speed"]["minimum"]), TTS_SPEED.0);
        assert_eq!(n(&p["speed"]["maximum"]), TTS_SPEED.1);
        assert_eq!(n(&p["noise_w"]["maximum"]), TTS_NOISE.1);
        assert_eq!(p["sample_rate"]["minimum"], json!(TTS_SAMPLE_RATE.0));
        assert_eq!(p["sample_rate"]["maximum"], json!(TTS_SAMPLE_RATE.1));
        let formats = p["format"].to_string();
        assert!(TTS_FORMATS.iter().all(|f| formats.contains(f)), "{formats}");
        assert!(p["voice"].to_string().contains("en_US-joe-medium"));
    }

    #[test]
    fn the_executor_reads_the_same_type_submission_checked() {
        let parsed: input::CodeRunInput =
            input::parse(&json!({"language": "python", "code": "1", "timeout_ms": 10})).unwrap();
        assert_eq!(parsed.timeout_ms, Some(10));
        assert!(parsed.cache, "cache defaults to true");
        let e = input::parse::<input::SleepInput>(&json!({"ms": 1, "progress_ms": 0})).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("progress_ms", "must be an integer from 1 to 86400000")
        );
    }

    /// A namespace with one user kind, `image.resize`.
    struct WithUserKind(user::UserKind);

    impl KindContext for WithUserKind {
        fn voice_installed(&self, _: &str) -> bool {
            false
        }
        fn installed_voices(&self) -> Vec<String> {
            Vec::new()
        }
        fn user_kind(&self, name: &str) -> UserKindLookup<'_> {
            if name == self.0.name {
                UserKindLookup::Registered(&self.0)
            } else {
                UserKindLookup::Missing
            }
        }
    }

    #[test]
    fn user_kinds_resolve_in_their_context_and_get_lanes_of_their_own() {
        let def = user::KindDef {
            queue: Some("images".into()),
            input_schema: Some(json!({"type": "object", "required": ["width"],
                "properties": {"width": {"type": "integer"}}})),
            ..Default::default()
        };
        let ev = user::KindEvent::KindRegistered {
            name: "image.resize".into(),
            definition: def,
        };
        let k = user::UserKind::apply(None, uuid::Uuid::nil(), "ns", &ev, chrono::Utc::now());
        let ctx = WithUserKind(k.unwrap());
        let r = validate_input("image.resize", &json!({"width": 3}), &ctx).unwrap();
        assert_eq!(r.default_queue(), "images");
        assert!(r.user().is_some());
        let e = validate_input("image.resize", &json!({"width": "x"}), &ctx).unwrap_err();
        assert_eq!(e.field, "input.width");
        // Unknown in this namespace, unknown to the default context, and never a built-in name.
        assert_eq!(
            validate_input("image.crop", &json!({}), &ctx)
                .unwrap_err()
                .field,
            "kind"
        );
        assert_eq!(
            validate_input("image.resize", &json!({}), &TestContext)
                .unwrap_err()
                .field,
            "kind"
        );
        assert_eq!(
            validate_input("code.mine", &json!({}), &ctx)
                .unwrap_err()
                .field,
            "kind"
        );
        assert_eq!(
            lane("images", "ns", "image.resize"),
            "images/ns/image.resize"
        );
        assert_eq!(lane("code", "ns", "code.run"), "code");
        assert_eq!(lane("callbacks", "ns", "callback.deliver"), "callbacks");
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
        assert!(matches!(ok.unwrap(), KindRef::Builtin(k) if k.name == "tts.render"));
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
