//! `POST /v1/orchestrate`: the seed-compatible front door. An intent names a job kind; the answer
//! is synchronous when the job finishes within `CAPIBARA_ORCHESTRATE_WAIT_S` (default 8 s), else
//! `202 {status: "accepted", job_id, …}`. Identical (intent, inputs) within an hour return the
//! same job: the content hash is the idempotency key.

use std::time::Duration;

use axum::{extract::State, http::StatusCode, response::IntoResponse, Json};
use capibara_shared::{
    domain::{auth::Role, job::Job, kinds},
    store,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{
    auth::Auth,
    error::ApiError,
    extract::ApiJson,
    routes::jobs::{create, SubmitJob},
    AppState,
};

/// `POST /v1/orchestrate` body (orchestrator seed shape).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Orchestrate {
    /// A job kind (`echo`, `sleep`, …); `GET /v1/kinds` lists them.
    pub intent: String,
    /// The job's input.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub inputs: Option<Value>,
    /// `auto` (default: wait up to the limit, then 202), `sync` (same), or `async` (202 at once).
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub callback_url: Option<String>,
    /// Returned as given; not interpreted.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub context: Option<Value>,
}

/// The answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OrchestrateResponse {
    /// `accepted` (still running), or the job's final status.
    pub status: String,
    pub job_id: uuid::Uuid,
    pub intent: String,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub error: Option<capibara_shared::domain::job::JobError>,
    /// Where to poll.
    pub location: String,
    /// The same job was returned for identical (intent, inputs) within the hour.
    pub deduplicated: bool,
    #[schema(value_type = Option<Object>)]
    pub context: Option<Value>,
    pub job: Job,
}

/// Identical requests within this window return the same job.
const DEDUP_WINDOW_S: i64 = 3600;

#[utoipa::path(post, path = "/v1/orchestrate", tag = "jobs", request_body = Orchestrate,
    responses((status = 200, description = "finished within the wait", body = OrchestrateResponse),
              (status = 202, description = "accepted; poll `location`", body = OrchestrateResponse),
              (status = 422, description = "unknown intent: the detail lists the available ones", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn orchestrate(
    State(state): State<AppState>,
    auth: Auth,
    body: ApiJson<Orchestrate>,
) -> Result<impl IntoResponse, ApiError> {
    auth.require(Role::Submit)?;
    let req = body.value;
    if kinds::find_public(&req.intent).is_none() {
        return Err(ApiError::field(
            "intent",
            format!(
                "unknown intent `{}`; available: {}",
                req.intent,
                kinds::names().join(", ")
            ),
        ));
    }
    let wait = match req.mode.as_deref().unwrap_or("auto") {
        "auto" | "sync" => Duration::from_secs_f64(state.config.orchestrate_wait_s),
        "async" => Duration::ZERO,
        other => {
            return Err(ApiError::field(
                "mode",
                format!("unknown mode `{other}` (auto, sync or async)"),
            ))
        }
    };
    let inputs = req
        .inputs
        .unwrap_or_else(|| Value::Object(Default::default()));
    let hash = hex::encode(Sha256::digest(
        format!("{}\n{}", req.intent, inputs).as_bytes(),
    ));
    let key = format!("orchestrate:{hash}");
    store::commands::expire_key(&state.store.pool, auth.namespace(), &key, DEDUP_WINDOW_S).await?;
    let submission = SubmitJob {
        kind: req.intent.clone(),
        input: Some(inputs),
        queue: None,
        priority: None,
        run_at: None,
        max_attempts: None,
        timeout_s: None,
        backoff: None,
        callback_url: req.callback_url,
        callback_events: None,
        tags: None,
    };
    let (job, deduplicated) =
        create(&state, &auth, submission, Some(key), &hash, "Orchestrate").await?;
    let job = if wait.is_zero() || job.status.is_terminal() {
        job
    } else {
        crate::wait::until_terminal(&state, auth.namespace(), job.id, wait)
            .await?
            .unwrap_or(job)
    };
    let done = job.status.is_terminal();
    let body = OrchestrateResponse {
        status: if done {
            job.status.to_string()
        } else {
            "accepted".into()
        },
        job_id: job.id,
        intent: req.intent,
        result: job.output.clone(),
        error: job.error.clone(),
        location: format!("/v1/jobs/{}", job.id),
        deduplicated,
        context: req.context,
        job,
    };
    let status = if done {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((
        status,
        [(axum::http::header::LOCATION, body.location.clone())],
        Json(body),
    ))
}
