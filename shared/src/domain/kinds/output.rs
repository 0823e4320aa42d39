//! Each kind's output, where its shape is known, as one typed struct: the executor builds it,
//! and its JSON Schema, derived from it, is published by `GET /v1/kinds` (`output_schema`).
//! `echo` returns its input, so it has none.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// `sleep`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SleepOutput {
    /// How long it slept, in milliseconds.
    pub slept_ms: u64,
}

/// `fail`'s output, once it stops failing (after `times` attempts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FailOutput {
    /// The attempt that succeeded.
    pub attempt: u32,
}

/// `code.run`'s output (a run that raised or timed out fails the job instead: docs/code.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CodeRunOutput {
    /// The value the code assigned to `result` (any JSON; null when none).
    pub result: Value,
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    /// How long the run took in the sandbox.
    pub duration_ms: f64,
    /// The result came from the cache (an earlier run of the same input).
    pub cached: bool,
    /// Which runtime ran it: `python-component`, `python-wasi` or `quickjs`.
    pub runtime: String,
}

/// `code.validate`'s output: whether the snippet parses, and where it does not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CodeValidateOutput {
    pub valid: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub line: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub column: Option<u32>,
}

/// `tts.render`'s output; the audio is the artifact it names (docs/tts.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TtsRenderOutput {
    /// Length of the audio, in seconds.
    pub duration_s: f64,
    pub sample_rate: u32,
    /// The voice that spoke.
    pub voice: String,
    /// `piper` or `espeak`.
    pub engine: String,
    /// `wav` or `pcm_s16le`.
    pub format: String,
    pub sentences: u64,
    pub chars: u64,
    pub chars_per_second: f64,
    pub render_ms: f64,
    /// Render time over audio time (below 1: faster than real time).
    pub real_time_factor: f64,
    /// Time to the first sentence's audio, in milliseconds.
    pub first_chunk_ms: Option<f64>,
    /// This job loaded the voice's model (a cold start).
    pub model_loaded: bool,
    /// The artifact holding the audio (`audio.wav` or `audio.pcm`).
    pub artifact: String,
}

/// `chat.post`'s output: what the webhook answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatPostOutput {
    /// The HTTP status (2xx).
    pub status: u16,
    /// The first 512 characters of the answer (Slack answers `ok`).
    pub response: String,
    pub duration_ms: f64,
}

/// `mail.send`'s output: what the SMTP server took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MailSendOutput {
    /// The message's `Message-ID` (without angle brackets); the same on every attempt of a job.
    pub message_id: String,
    /// The recipients the server accepted (to, cc and bcc; bare addresses).
    pub accepted: Vec<String>,
    /// The server's answer to the message (`250 …`).
    pub response: String,
    pub duration_ms: f64,
}
