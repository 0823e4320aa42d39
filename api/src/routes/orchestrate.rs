//! `POST /v1/orchestrate`: the seed-compatible front door. An intent names a job kind or a
//! workflow (by name, or `workflow:<name>`); the answer
//! is synchronous when the job finishes within `CAPIBARA_ORCHESTRATE_WAIT_S` (default 8 s), else
//! `202 {status: "accepted", job_id, …}`. Identical (intent, inputs) within an hour return the
//! same job: the content hash is the idempotency key.

use std::time::Duration;

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use capibara_shared::{
    domain::{self, auth::Role, job::Job, kinds, run::Run},
    store::{
        self,
        append::CommandRecord,
        runs::{StartError, StartRun},
        AppendError, StoreError,
    },
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{
    auth::Auth,
    error::ApiError,
    extract::ApiJson,
    routes::{
        jobs::{create, rename_input, SubmitJob},
        runs,
    },
    AppState,
};

/// `POST /v1/orchestrate` body (orchestrator seed shape).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Orchestrate {
    /// A job kind (`echo`, `sleep`, …; `GET /v1/kinds` lists them) or a workflow's name.
    pub intent: String,
    /// The job's input.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub inputs: Option<Value>,
    /// `auto` (default: wait up to the limit, then 202), `sync` and `agent` (the same: the
    /// orchestrator seed's clients send `agent` for an intent a local agent serves, which here
    /// is the intent's job), or `async` (202 at once).
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
    /// The job (intents naming a job kind).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<uuid::Uuid>,
    /// The workflow run (intents naming a workflow).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<uuid::Uuid>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<Job>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<Run>,
}

/// Identical requests within this window return the same job.
const DEDUP_WINDOW_S: i64 = 3600;

#[utoipa::path(post, operation_id = "orchestrate", path = "/v1/orchestrate", tag = "jobs", request_body = Orchestrate,
    responses((status = 200, description = "finished within the wait", body = OrchestrateResponse),
              (status = 202, description = "accepted; poll `location`", body = OrchestrateResponse),
              (status = 422, description = "unknown intent: the detail lists the available ones", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn orchestrate(
    State(state): State<AppState>,
    auth: Auth,
    body: ApiJson<Orchestrate>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let req = body.value;
    let wait = match req.mode.as_deref().unwrap_or("auto") {
        "auto" | "sync" | "agent" => Duration::from_secs_f64(state.config.orchestrate_wait_s),
        "async" => Duration::ZERO,
        other => {
            return Err(ApiError::field(
                "mode",
                format!("unknown mode `{other}` (auto, sync, agent or async)"),
            ))
        }
    };
    let inputs = req
        .inputs
        .clone()
        .unwrap_or_else(|| Value::Object(Default::default()));
    let hash = hex::encode(Sha256::digest(
        format!("{}\n{}", req.intent, inputs).as_bytes(),
    ));
    let key = format!("orchestrate:{hash}");
    store::commands::expire_key(&state.store.pool, auth.namespace(), &key, DEDUP_WINDOW_S).await?;
    let user_kind = !kinds::user::is_builtin(&req.intent)
        && !store::user_kinds::find(&state.store.pool, auth.namespace(), &[req.intent.as_str()])
            .await?
            .is_empty();
    if kinds::find_public(&req.intent).is_none() && !user_kind {
        // Not a job kind: a workflow of that name (optionally written `workflow:<name>`)?
        let name = req.intent.strip_prefix("workflow:").unwrap_or(&req.intent);
        return match store::workflows::find_by_name(&state.store.pool, auth.namespace(), name)
            .await?
        {
            Some(w) => run_workflow(&state, &auth, req, w.id, inputs, key, hash, wait).await,
            None => {
                let workflows: Vec<String> =
                    store::workflows::list(&state.store.pool, auth.namespace(), None, 50)
                        .await?
                        .into_iter()
                        .map(|w| w.name)
                        .collect();
                Err(ApiError::field(
                    "intent",
                    format!(
                        "unknown intent `{}`; available kinds: {} and this namespace's (GET /v1/kinds); workflows: {}",
                        req.intent,
                        kinds::names().join(", "),
                        if workflows.is_empty() {
                            "none".to_string()
                        } else {
                            workflows.join(", ")
                        }
                    ),
                ))
            }
        };
    }
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
    // The kind's input check, as for every job; errors name this body's `inputs`.
    let (job, deduplicated) = create(&state, &auth, submission, Some(key), &hash, "Orchestrate")
        .await
        .map_err(|e| rename_input(e, "inputs"))?;
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
        job_id: Some(job.id),
        run_id: None,
        intent: req.intent,
        result: job.output.clone(),
        error: job.error.clone(),
        location: format!("/v1/jobs/{}", job.id),
        deduplicated,
        context: req.context,
        job: Some(job),
        run: None,
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
    )
        .into_response())
}

/// An intent naming a workflow: start (or, within the hour, return) its run and wait for it.
#[allow(clippy::too_many_arguments)]
async fn run_workflow(
    state: &AppState,
    auth: &Auth,
    req: Orchestrate,
    workflow_id: uuid::Uuid,
    inputs: Value,
    key: String,
    hash: String,
    wait: Duration,
) -> Result<Response, ApiError> {
    let (run, deduplicated) = match runs::replay(state, auth, &key, &hash).await? {
        Some(run) => (run, true),
        None => {
            let run_id = uuid::Uuid::now_v7();
            // The same checks as a job's callback (the signing secret must exist).
            let callback_url =
                crate::outbound::callback_url(req.callback_url.as_deref(), &state.config).await?;
            let command = CommandRecord {
                id: uuid::Uuid::now_v7(),
                namespace: auth.namespace().to_string(),
                command_type: runs::START_COMMAND.into(),
                idempotency_key: Some(key.clone()),
                request_hash: hash.clone(),
                status_code: 202,
                response: Some(serde_json::json!({"run_id": run_id})),
                stream_id: Some(run_id),
                actor: Some(auth.actor()),
                received_at: domain::now(),
            };
            match store::runs::start_run(
                &state.store,
                StartRun {
                    namespace: auth.namespace().to_string(),
                    workflow_id,
                    input: inputs,
                    callback_url,
                    actor: auth.actor(),
                    command: Some(command),
                    with: Vec::new(),
                    run_id,
                },
            )
            .await
            {
                Ok(run) => (run, false),
                Err(StartError::Input(e)) => return Err(e.under("inputs").into()),
                Err(StartError::Append(AppendError::DuplicateCommand)) => (
                    runs::replay(state, auth, &key, &hash)
                        .await?
                        .ok_or_else(|| ApiError::Conflict("the request is in progress".into()))?,
                    true,
                ),
                Err(StartError::WorkflowNotFound) => {
                    return Err(ApiError::field("intent", "the workflow was just deleted"))
                }
                Err(StartError::Append(e)) => return Err(StoreError::from(e).into()),
                Err(StartError::Store(e)) => return Err(e.into()),
            }
        }
    };
    let run = if wait.is_zero() || run.status.is_terminal() {
        run
    } else {
        runs::until_ended(state, auth.namespace(), run.id, wait)
            .await?
            .unwrap_or(run)
    };
    let done = run.status.is_terminal();
    let body = OrchestrateResponse {
        status: if done {
            run.status.to_string()
        } else {
            "accepted".into()
        },
        job_id: None,
        run_id: Some(run.id),
        intent: req.intent,
        result: run.output.clone(),
        error: None,
        location: format!("/v1/runs/{}", run.id),
        deduplicated,
        context: req.context,
        job: None,
        run: Some(run),
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
    )
        .into_response())
}
