//! `push` kinds (docs/workers.md, "Push kinds"): the job is POSTed to the kind's endpoint,
//! signed per Standard Webhooks, with the attempt's lease token. The answer decides the attempt:
//! a 2xx JSON body is the output; `202` hands the attempt to the endpoint, which finishes it
//! through the worker protocol with the token; 408, 5xx, timeouts and connection errors retry
//! with the job's policy; 429 retries after its `Retry-After`; any other 4xx fails without
//! retry. Each call is recorded in the job's history (a `JobProgress` naming the status and the
//! time it took).

use async_trait::async_trait;
use capibara_shared::domain::{job::JobError, kinds::user::PushTarget, webhook::WebhookSecret};
use serde_json::{json, Value};

use super::{ExecError, Executor, JobContext, Output};
use crate::http::{self, HttpError, HttpResponse, OutboundPolicy};

/// One attempt of a push kind's job.
pub struct PushCall {
    pub target: PushTarget,
    /// The job as it was popped, sent as `job`.
    pub job: Value,
    /// The attempt's lease token and its expiry, sent as `lease`.
    pub lease: Value,
    /// The Standard Webhooks message id: one per attempt.
    pub message_id: String,
    /// `CAPIBARA_WEBHOOK_SECRET` (push calls are signed like callbacks).
    pub secret: Option<WebhookSecret>,
    pub policy: OutboundPolicy,
}

/// Largest answer read from an endpoint: the output limit of a job's input.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

fn error(kind: &str, message: impl Into<String>) -> JobError {
    JobError::new(kind, message)
}

/// What the endpoint's answer means for the attempt.
pub fn verdict(r: Result<HttpResponse, HttpError>) -> Result<Output, ExecError> {
    let res = match r {
        Ok(res) => res,
        Err(e @ (HttpError::Forbidden(_) | HttpError::InvalidUrl(_))) => {
            return Err(ExecError::Abort(error("push_refused", e.to_string())))
        }
        Err(HttpError::Timeout) => {
            return Err(ExecError::Retryable(error(
                "push_timeout",
                "the endpoint did not answer in time",
            )))
        }
        Err(e) => {
            return Err(ExecError::Retryable(error(
                "push_unreachable",
                e.to_string(),
            )))
        }
    };
    let said = |what: &str| {
        format!(
            "the endpoint answered {} {what}: {}",
            res.status, res.body_snippet
        )
    };
    match res.status {
        202 => Err(ExecError::Detached),
        200..=299 => {
            if res.truncated {
                return Err(ExecError::Abort(error(
                    "invalid_output",
                    format!("the endpoint's answer is over {MAX_ANSWER_BYTES} bytes"),
                )));
            }
            if res.body.iter().all(u8::is_ascii_whitespace) {
                return Ok(Output {
                    output: Value::Null,
                    ..Default::default()
                });
            }
            serde_json::from_slice(&res.body)
                .map(|output| Output {
                    output,
                    ..Default::default()
                })
                .map_err(|e| {
                    ExecError::Abort(error(
                        "invalid_output",
                        format!("the endpoint's answer is not JSON: {e}"),
                    ))
                })
        }
        429 => {
            let e = error("push_rate_limited", said("(rate limited)"));
            Err(match res.retry_after {
                Some(d) => ExecError::RetryAfter(d, e),
                None => ExecError::Retryable(e),
            })
        }
        408 | 500..=599 => Err(ExecError::Retryable(error("push_failed", said("")))),
        _ => Err(ExecError::Abort(error(
            "push_rejected",
            said("(not retried)"),
        ))),
    }
}

#[async_trait]
impl Executor for PushCall {
    /// A call to the user's endpoint is an outside effect: claimed before it is made.
    fn repeatable(&self) -> bool {
        false
    }

    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let Some(secret) = &self.secret else {
            return Err(ExecError::Abort(error(
                "push_unsigned",
                "push calls are signed with CAPIBARA_WEBHOOK_SECRET, which this worker does not have",
            )));
        };
        let body =
            serde_json::to_vec(&json!({"job": self.job, "lease": self.lease})).unwrap_or_default();
        let timestamp = chrono::Utc::now().timestamp();
        let mut headers = vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("webhook-id".to_string(), self.message_id.clone()),
            ("webhook-timestamp".to_string(), timestamp.to_string()),
            (
                "webhook-signature".to_string(),
                secret.sign(&self.message_id, timestamp, &body),
            ),
            ("capibara-job-id".to_string(), ctx.job_id.to_string()),
            ("capibara-attempt".to_string(), ctx.attempt.to_string()),
        ];
        // The endpoint continues the job's trace (docs/observability.md).
        if let Some(tp) = capibara_shared::trace_context::outgoing(ctx.job.traceparent.as_deref()) {
            headers.push(("traceparent".to_string(), tp));
        }
        let policy = OutboundPolicy {
            timeout: self.target.timeout(),
            max_response_bytes: MAX_ANSWER_BYTES,
            ..self.policy.clone()
        };
        let started = std::time::Instant::now();
        let result = tokio::select! {
            r = http::post(&policy, &self.target.url, &headers, body) => r,
            _ = ctx.cancel.cancelled() => Err(HttpError::Other("canceled".into())),
        };
        let ms = started.elapsed().as_millis();
        let status = match &result {
            Ok(r) => r.status.to_string(),
            Err(e) => e.to_string(),
        };
        // Recorded with the attempt's end: no commit of its own between the answer and the end.
        ctx.progress
            .note(format!("push call: {status} in {ms} ms"))
            .await;
        verdict(result)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn answer(
        status: u16,
        body: &str,
        retry_after: Option<u64>,
    ) -> Result<HttpResponse, HttpError> {
        Ok(HttpResponse {
            status,
            body_snippet: body.chars().take(http::SNIPPET_CHARS).collect(),
            duration: Duration::from_millis(1),
            truncated: false,
            body: body.as_bytes().to_vec(),
            retry_after: retry_after.map(Duration::from_secs),
        })
    }

    fn kind(r: Result<Output, ExecError>) -> String {
        match r {
            Ok(o) => format!("ok {}", o.output),
            Err(ExecError::Detached) => "detached".into(),
            Err(ExecError::Retryable(e)) => format!("retry {}", e.error_type),
            Err(ExecError::RetryAfter(d, _)) => format!("retry after {}", d.as_secs()),
            Err(ExecError::Abort(e)) => format!("abort {}", e.error_type),
            Err(ExecError::Defer(d, _)) => format!("defer {}", d.as_secs()),
        }
    }

    #[test]
    fn answers_map_to_outcomes_as_documented() {
        assert_eq!(
            kind(verdict(answer(200, r#"{"a":1}"#, None))),
            r#"ok {"a":1}"#
        );
        assert_eq!(kind(verdict(answer(204, "", None))), "ok null");
        assert_eq!(
            kind(verdict(answer(200, "<html>", None))),
            "abort invalid_output"
        );
        assert_eq!(kind(verdict(answer(202, "", None))), "detached");
        assert_eq!(kind(verdict(answer(503, "", None))), "retry push_failed");
        assert_eq!(kind(verdict(answer(408, "", None))), "retry push_failed");
        assert_eq!(kind(verdict(answer(429, "", Some(7)))), "retry after 7");
        assert_eq!(
            kind(verdict(answer(429, "", None))),
            "retry push_rate_limited"
        );
        assert_eq!(kind(verdict(answer(404, "", None))), "abort push_rejected");
        assert_eq!(kind(verdict(answer(422, "", None))), "abort push_rejected");
        assert_eq!(kind(verdict(Err(HttpError::Timeout))), "retry push_timeout");
        assert_eq!(
            kind(verdict(Err(HttpError::Forbidden("private".into())))),
            "abort push_refused"
        );
    }
}
