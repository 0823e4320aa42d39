//! `chat.post`: a message to a Slack-compatible incoming webhook, through the SSRF guard
//! ([`crate::http::post`]: no redirects followed, bounded time and answer). The answer decides
//! the attempt: 2xx succeeds, 429 and 5xx (and no answer) are retried — after `Retry-After`
//! when given — and other statuses fail with the service's own words (Slack's `invalid_payload`,
//! `channel_not_found`, `no_service`).

use std::time::Duration;

use async_trait::async_trait;
use capibara_shared::domain::{
    job::JobError,
    kinds::{input, input::ChatPostInput, output::ChatPostOutput},
};
use serde_json::{json, Value};

use super::{builtin::to_output, ExecError, Executor, JobContext, Output};
use crate::http::{self, HttpError, OutboundPolicy};

pub struct ChatPost {
    pub policy: OutboundPolicy,
}

fn error(t: &str, m: impl Into<String>) -> JobError {
    JobError::new(t, m)
}

#[async_trait]
impl Executor for ChatPost {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let input: ChatPostInput = input::parse(&ctx.input).map_err(|e| {
            ExecError::Abort(error(
                "invalid_input",
                format!("{}: {}", e.field, e.message),
            ))
        })?;
        let mut body = json!({"text": input.text});
        if let Some(b) = input.blocks {
            body["blocks"] = Value::from(b.into_iter().map(Value::Object).collect::<Vec<_>>());
        }
        if let Some(c) = input.channel {
            body["channel"] = json!(c);
        }
        if let Some(u) = input.username {
            body["username"] = json!(u);
        }
        let policy = OutboundPolicy {
            timeout: Duration::from_secs(input.timeout_s.unwrap_or(15).into()),
            ..self.policy.clone()
        };
        let body = serde_json::to_vec(&body).expect("JSON");
        let res = tokio::select! {
            r = http::post(&policy, &input.url, &[], body) => r,
            () = ctx.cancel.cancelled() => {
                return Err(ExecError::Abort(error("canceled", "the post was canceled")));
            }
        };
        let res = res.map_err(|e| match e {
            HttpError::Forbidden(m) => ExecError::Abort(error("forbidden_address", m)),
            HttpError::InvalidUrl(m) => ExecError::Abort(error("invalid_url", m)),
            HttpError::Timeout => {
                ExecError::Retryable(error("timeout", "the webhook did not answer in time"))
            }
            HttpError::Connect(m) => ExecError::Retryable(error("connect_failed", m)),
            HttpError::Other(m) => ExecError::Retryable(error("request_failed", m)),
        })?;
        let said = format!(
            "the webhook answered HTTP {}: {}",
            res.status, res.body_snippet
        );
        match res.status {
            200..=299 => Ok(Output {
                output: to_output(ChatPostOutput {
                    status: res.status,
                    response: res.body_snippet,
                    duration_ms: (res.duration.as_secs_f64() * 1e5).round() / 100.0,
                }),
                ..Default::default()
            }),
            429 | 500..=599 | 408 => {
                let e = error("http_status", said);
                Err(match res.retry_after {
                    Some(d) => ExecError::RetryAfter(d, e),
                    None => ExecError::Retryable(e),
                })
            }
            _ => Err(ExecError::Abort(error("http_status", said))),
        }
    }

    /// A post is an effect outside Capibara: claimed before it starts, never run twice at once.
    fn repeatable(&self) -> bool {
        false
    }
}
