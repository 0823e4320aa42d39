//! `callback.deliver`: sends one webhook delivery, signed per Standard Webhooks, and records the
//! attempt on the delivery's stream. Retries (408, 429, 5xx, timeouts, connection errors) follow
//! the delivery retry schedule; any other 4xx, or a refused address, is final.

use std::{sync::Arc, time::Duration};
use tracing::Instrument;

use async_trait::async_trait;
use capibara_shared::domain::{job::JobError, webhook::WebhookSecret};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{ExecError, Executor, JobContext, Output};
use crate::http::{self, HttpError, OutboundPolicy};

/// What the executor needs to send a delivery.
pub struct DeliveryToSend {
    /// The delivery's namespace: its attempts are recorded there.
    pub namespace: String,
    pub url: String,
    pub payload: Value,
    pub secret: WebhookSecret,
    /// A subscription's custom headers (validated when it was saved; none for callbacks).
    pub headers: Vec<(String, String)>,
    /// Attempts recorded so far (across redeliveries).
    pub attempts: u32,
    pub finished: bool,
}

/// One attempt's result, as recorded.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub status_code: Option<u16>,
    pub duration_ms: u64,
    pub response_snippet: Option<String>,
    pub error: Option<String>,
    /// `Some(true)` delivered, `Some(false)` given up (with `error` as the reason), `None` retrying.
    pub final_outcome: Option<bool>,
}

/// Access to deliveries, provided by the runtime (SQL lives there, not here).
#[async_trait]
pub trait DeliveryPort: Send + Sync {
    async fn load(&self, delivery_id: Uuid) -> Result<Option<DeliveryToSend>, String>;
    async fn record(
        &self,
        delivery_id: Uuid,
        namespace: &str,
        record: AttemptRecord,
    ) -> Result<(), String>;
}

pub struct CallbackDeliver {
    pub port: Arc<dyn DeliveryPort>,
    pub policy: OutboundPolicy,
    /// Delay before attempt n+1 is `schedule[n-1]`.
    pub schedule: Vec<Duration>,
}

enum Verdict {
    Delivered,
    Retry(String),
    GiveUp(String),
}

fn classify(r: &Result<http::HttpResponse, HttpError>) -> Verdict {
    match r {
        Ok(res) if (200..300).contains(&res.status) => Verdict::Delivered,
        Ok(res) if res.status == 408 || res.status == 429 || res.status >= 500 => {
            Verdict::Retry(format!("receiver answered {}", res.status))
        }
        Ok(res) => Verdict::GiveUp(format!("receiver answered {} (not retried)", res.status)),
        Err(e @ (HttpError::Forbidden(_) | HttpError::InvalidUrl(_))) => {
            Verdict::GiveUp(e.to_string())
        }
        Err(e) => Verdict::Retry(e.to_string()),
    }
}

#[async_trait]
impl Executor for CallbackDeliver {
    /// A webhook POST is an outside effect: claim the attempt before sending.
    fn repeatable(&self) -> bool {
        false
    }

    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let id: Uuid = ctx
            .input
            .get("delivery_id")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                ExecError::Abort(JobError::new("invalid_input", "delivery_id missing"))
            })?;
        let d = self
            .port
            .load(id)
            .await
            .map_err(|e| ExecError::Retryable(JobError::new("store_unavailable", e)))?
            .ok_or_else(|| {
                ExecError::Abort(JobError::new(
                    "not_found",
                    format!("delivery {id} does not exist"),
                ))
            })?;
        if d.finished {
            return Ok(Output {
                output: json!({"delivery_id": id, "skipped": "already finished"}),
                ..Default::default()
            });
        }
        let body = serde_json::to_vec(&d.payload).unwrap_or_default();
        let msg_id = id.to_string();
        let timestamp = chrono::Utc::now().timestamp();
        let mut headers = d.headers.clone();
        headers.extend([
            ("content-type".to_string(), "application/json".to_string()),
            ("webhook-id".to_string(), msg_id.clone()),
            ("webhook-timestamp".to_string(), timestamp.to_string()),
            (
                "webhook-signature".to_string(),
                d.secret.sign(&msg_id, timestamp, &body),
            ),
        ]);
        // The call continues the trace of the job (or run) the event is about: the payload's
        // `data` is it (docs/observability.md).
        let recorded = d.payload["data"]["traceparent"].as_str();
        let span = tracing::info_span!(
            "callback.send",
            otel.kind = "client",
            delivery.id = %id,
            event = %d.payload["type"].as_str().unwrap_or_default(),
        );
        capibara_shared::trace_context::adopt(&span, recorded);
        if let Some(tp) = span.in_scope(|| capibara_shared::trace_context::outgoing(recorded)) {
            headers.push(("traceparent".to_string(), tp));
        }
        let started = std::time::Instant::now();
        let result = http::post(&self.policy, &d.url, &headers, body)
            .instrument(span)
            .await;
        let duration_ms = match &result {
            Ok(r) => r.duration.as_millis() as u64,
            Err(_) => started.elapsed().as_millis() as u64,
        };
        let verdict = classify(&result);
        let attempt = d.attempts + 1;
        let last_try = ctx.attempt >= ctx.max_attempts;
        let (final_outcome, error) = match &verdict {
            Verdict::Delivered => (Some(true), None),
            Verdict::GiveUp(m) => (Some(false), Some(m.clone())),
            Verdict::Retry(m) if last_try => {
                (Some(false), Some(format!("{m}; retry schedule exhausted")))
            }
            Verdict::Retry(m) => (None, Some(m.clone())),
        };
        let record = AttemptRecord {
            attempt,
            status_code: result.as_ref().ok().map(|r| r.status),
            duration_ms,
            response_snippet: result.as_ref().ok().map(|r| r.body_snippet.clone()),
            error: error.clone(),
            final_outcome,
        };
        self.port
            .record(id, &d.namespace, record)
            .await
            .map_err(|e| ExecError::Retryable(JobError::new("store_unavailable", e)))?;
        metrics::counter!("capibara_delivery_attempts_total", "outcome" => match &verdict {
            Verdict::Delivered => "delivered",
            Verdict::Retry(_) => "retry",
            Verdict::GiveUp(_) => "failed",
        })
        .increment(1);
        match verdict {
            Verdict::Delivered => Ok(Output {
                output: json!({"delivery_id": id, "status_code": result.as_ref().ok().map(|r| r.status), "attempt": attempt}),
                ..Default::default()
            }),
            Verdict::GiveUp(m) => Err(ExecError::Abort(JobError::new("delivery_failed", m))),
            Verdict::Retry(m) => {
                let delay = self
                    .schedule
                    .get((ctx.attempt as usize).saturating_sub(1))
                    .copied()
                    .unwrap_or(Duration::from_secs(3600));
                Err(ExecError::RetryAfter(
                    delay,
                    JobError::new("delivery_retry", m),
                ))
            }
        }
    }
}
