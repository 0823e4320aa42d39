//! A leased job and the lease-scoped calls of the worker protocol (docs/workers.md §3): each
//! carries the token in `Capibara-Lease`; a stale token is [`Error::LeaseLost`] and records
//! nothing. [`crate::Worker`] uses these; call them yourself to speak the protocol by hand.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::{
    client::Client,
    error::{Error, Result},
    http::Req,
    types::{Heartbeat, Job, LogLine, Progress},
};

/// One job leased by a worker, with its lease token.
#[derive(Clone)]
pub struct Lease {
    client: Client,
    /// The job as leased (`input`, `attempt`, `timeout_s`, …).
    pub job: Job,
    /// Sent as `Capibara-Lease` with every call about the job.
    pub token: String,
    /// When the lease expires unless renewed.
    pub expires_at: DateTime<Utc>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("job", &self.job.id)
            .field("attempt", &self.job.attempt)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// How an attempt failed: `fail`'s body.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// 1-100 characters (`timeout`, `canceled`, your own).
    pub error_type: String,
    /// At most 10,000 characters.
    pub message: String,
    /// Retry while attempts remain (the server's default: true).
    pub retryable: bool,
    /// Retry no sooner than this many seconds.
    pub retry_after_s: Option<f64>,
}

impl Lease {
    /// A lease on `job` with `token` (as a lease call answered it).
    pub fn new(client: Client, job: Job, token: String, expires_at: DateTime<Utc>) -> Lease {
        Lease {
            client,
            job,
            token,
            expires_at,
        }
    }

    async fn call(&self, action: &str, body: Option<Value>) -> Result<Vec<u8>> {
        let mut req = Req::post(format!("/v1/jobs/{}/{action}", self.job.id))
            // Fenced by the token: sending it twice records it at most once.
            .idempotent(true)
            .header("capibara-lease", Some(self.token.clone()));
        if let Some(b) = body {
            req = req.json(b);
        }
        Ok(self.client.http.send(req).await?.2)
    }

    async fn call_job(&self, action: &str, body: Option<Value>) -> Result<Job> {
        let bytes = self.call(action, body).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::decode(format!("POST /v1/jobs/{}/{action}", self.job.id), e))
    }

    /// Renew the lease; whether the job's cancel was requested.
    pub async fn heartbeat(&self) -> Result<Heartbeat> {
        let bytes = self.call("heartbeat", None).await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::decode("a heartbeat answer", e))
    }

    /// Record `JobProgress`.
    pub async fn progress(&self, p: &Progress) -> Result<()> {
        let body = serde_json::to_value(p).map_err(|e| Error::decode("a progress report", e))?;
        self.call("progress", Some(body)).await.map(|_| ())
    }

    /// Record one `JobLog` per line (1-100 lines).
    pub async fn logs(&self, lines: &[LogLine]) -> Result<()> {
        self.call("logs", Some(json!({ "lines": lines })))
            .await
            .map(|_| ())
    }

    /// Record a `JobOutputChunk` (streamed to SSE readers).
    pub async fn chunk(&self, seq: u64, data: Value) -> Result<()> {
        self.call("chunks", Some(json!({ "seq": seq, "data": data })))
            .await
            .map(|_| ())
    }

    /// The job succeeded with `output` (checked against the kind's `output_schema`).
    pub async fn complete(&self, output: Value) -> Result<Job> {
        self.call_job("complete", Some(json!({ "output": output })))
            .await
    }

    /// The attempt failed.
    pub async fn fail(&self, f: &Failure) -> Result<Job> {
        let mut body = json!({
            "error": {"type": f.error_type, "message": f.message},
            "retryable": f.retryable,
        });
        if let Some(s) = f.retry_after_s {
            body["retry_after_s"] = json!(s);
        }
        self.call_job("fail", Some(body)).await
    }

    /// Give the job back: queued again without using up an attempt.
    pub async fn release(&self) -> Result<Job> {
        self.call_job("release", None).await
    }
}
