//! `/v1/runs`: list, get, events (JSON and SSE), cancel, retry, signals.

use std::time::Duration;

use axum::{
    extract::{Path, RawQuery, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use capibara_shared::{
    command,
    domain::{
        self,
        auth::Role,
        event::EventEnvelope,
        run::{self, Run, RunEvent, StepStatus},
    },
    store::{self, runs::RunFilter},
};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::jobs::{decode_cursor, Page};
use crate::{
    auth::Auth,
    error::ApiError,
    extract::{parse_limit, prefer_wait, query_pairs, ApiJson},
    AppState,
};

/// Command type of `POST /v1/workflows/{id}/runs` (Idempotency-Key replays).
pub const START_COMMAND: &str = "StartRun";

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    crate::extract::path_id(id, "run")
}

async fn load(state: &AppState, auth: &Auth, id: Uuid) -> Result<Run, ApiError> {
    store::runs::get(&state.store.pool, auth.namespace(), id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no run `{id}`")))
}

fn location(id: Uuid) -> HeaderValue {
    HeaderValue::from_str(&format!("/v1/runs/{id}")).expect("ascii")
}

/// The run a previous start with this key created; 422 if the key was used for another body.
pub async fn replay(
    state: &AppState,
    auth: &Auth,
    key: &str,
    hash: &str,
) -> Result<Option<Run>, ApiError> {
    let Some(cmd) = store::commands::find_by_key(&state.store.pool, auth.namespace(), key).await?
    else {
        return Ok(None);
    };
    if cmd.request_hash != *hash || cmd.command_type != START_COMMAND {
        return Err(ApiError::Validation {
            detail: "this Idempotency-Key was already used with a different request".into(),
            errors: vec![domain::FieldError::new(
                "Idempotency-Key",
                "already used with a different request",
            )],
        });
    }
    match cmd.stream_id {
        Some(id) => Ok(store::runs::get(&state.store.pool, auth.namespace(), id).await?),
        None => Ok(None),
    }
}

/// 200 with an ended run after a wait, else 202 + `Location`.
pub async fn finish(
    state: &AppState,
    auth: &Auth,
    run: Run,
    wait: Option<Duration>,
    replayed: bool,
) -> Result<Response, ApiError> {
    let run = match wait {
        Some(d) if !run.status.is_terminal() => until_ended(state, auth.namespace(), run.id, d)
            .await?
            .unwrap_or(run),
        _ => run,
    };
    let status = if run.status.is_terminal() && wait.is_some() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let id = run.id;
    let mut res = (status, Json(run)).into_response();
    let h = res.headers_mut();
    h.insert(header::LOCATION, location(id));
    if let Some(w) = wait {
        if let Ok(v) = HeaderValue::from_str(&format!("wait={}", w.as_secs())) {
            h.insert("preference-applied", v);
        }
    }
    if replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(res)
}

/// The run once ended, or its latest state when `timeout` passes.
pub async fn until_ended(
    state: &AppState,
    namespace: &str,
    id: Uuid,
    timeout: Duration,
) -> Result<Option<Run>, ApiError> {
    crate::wait::until(
        state,
        id,
        timeout,
        || store::runs::get(&state.store.pool, namespace, id),
        |r: &Run| r.status.is_terminal(),
    )
    .await
}

#[utoipa::path(get, operation_id = "listRuns", path = "/v1/runs", tag = "workflows",
    params(("workflow_id" = Option<uuid::Uuid>, Query), ("status" = Option<capibara_shared::domain::run::RunStatus>, Query),
           ("limit" = Option<i64>, Query, minimum = 1, maximum = 500), ("cursor" = Option<String>, Query, pattern = "^[A-Za-z0-9_-]{21}[AQgw]$", description = "`next_cursor` of the previous page")),
    responses((status = 200, body = Page<Run>), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
    RawQuery(q): RawQuery,
) -> Result<Json<Page<Run>>, ApiError> {
    auth.require(Role::Read)?;
    let mut f = RunFilter::default();
    let mut limit = None;
    for (k, v) in query_pairs(q.as_deref())? {
        match k.as_str() {
            "workflow_id" => {
                f.workflow_id = Some(
                    v.parse()
                        .map_err(|_| ApiError::field("workflow_id", "must be a UUID"))?,
                )
            }
            "status" => {
                f.status = Some(
                    v.parse()
                        .map_err(|e: String| ApiError::field("status", e))?,
                )
            }
            "limit" => limit = Some(v),
            "cursor" => f.before = Some(decode_cursor(&v)?),
            other => {
                return Err(ApiError::field(
                    other,
                    "unknown query parameter (workflow_id, status, limit, cursor)",
                ))
            }
        }
    }
    let limit = parse_limit(limit.as_deref())?;
    let items = store::runs::list(&state.store.pool, auth.namespace(), &f, limit + 1).await?;
    Ok(Json(Page::from_extra_row(items, limit, |r| r.id)))
}

#[utoipa::path(get, operation_id = "getRun", path = "/v1/runs/{id}", tag = "workflows",
    params(("id" = String, Path), ("Prefer" = Option<String>, Header, description = "wait=N")),
    responses((status = 200, body = Run), (status = 202, description = "not ended after the wait", body = Run),
              (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require(Role::Read)?;
    let wait = prefer_wait(&headers)?;
    let run = load(&state, &auth, parse_id(&id)?).await?;
    match wait {
        None => Ok(Json(run).into_response()),
        Some(_) => finish(&state, &auth, run, wait, false).await,
    }
}

fn terminal_type(t: &str) -> bool {
    matches!(t, "RunSucceeded" | "RunFailed" | "RunCanceled")
}

#[utoipa::path(get, operation_id = "listRunEvents", path = "/v1/runs/{id}/events", tag = "workflows",
    params(("id" = String, Path), ("after" = Option<i64>, Query, minimum = 0, description = "an event id: continue after it"), ("Last-Event-ID" = Option<i64>, Header, minimum = 0, description = "SSE resume; takes precedence over `after`"),
           ("limit" = Option<i64>, Query, minimum = 1, maximum = 500)),
    responses((status = 200, description = "JSON page, or text/event-stream with Accept: text/event-stream",
               body = Page<EventEnvelope>)),
    security(("bearer" = [])))]
pub async fn events(
    State(state): State<AppState>,
    crate::stream_tokens::StreamAuth(auth): crate::stream_tokens::StreamAuth,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    auth.require(Role::Read)?;
    let id = parse_id(&id)?;
    load(&state, &auth, id).await?;
    super::jobs::stream_events(state, &auth, id, &headers, q.as_deref(), terminal_type).await
}

/// Plan a change of the run with `decide` and record it (`command::runs::change`), then tell
/// running jobs of their cancel.
async fn change(
    state: &AppState,
    auth: &Auth,
    id: Uuid,
    decide: impl Fn(&mut Run, &domain::workflow::WorkflowDef) -> Result<run::Plan, ApiError>,
) -> Result<Run, ApiError> {
    let changed = command::runs::change(&state.store, auth.namespace(), id, &auth.actor(), decide)
        .await
        .map_err(|e| ApiError::from_command(e, "run", id))?;
    state.queue.tell_canceled(&changed.cancel_running).await;
    Ok(changed.run)
}

#[utoipa::path(post, operation_id = "cancelRun", path = "/v1/runs/{id}/cancel", tag = "workflows", params(("id" = String, Path)),
    responses((status = 200, description = "canceled; running step jobs were told to stop", body = Run),
              (status = 409, description = "already ended", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Run>, ApiError> {
    auth.require(Role::Submit)?;
    let id = parse_id(&id)?;
    let run = change(&state, &auth, id, |r, _| {
        if r.status.is_terminal() {
            return Err(ApiError::Conflict(format!("run is already {}", r.status)));
        }
        Ok(run::cancel(
            r,
            Some("canceled by request".into()),
            domain::now(),
        ))
    })
    .await?;
    Ok(Json(run))
}

#[utoipa::path(post, operation_id = "retryRun", path = "/v1/runs/{id}/retry", tag = "workflows", params(("id" = String, Path)),
    responses((status = 202, description = "running again from the steps that did not succeed", body = Run),
              (status = 409, description = "not failed or canceled", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn retry(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let id = parse_id(&id)?;
    let run = change(&state, &auth, id, |r, def| {
        if !matches!(r.status, run::RunStatus::Failed | run::RunStatus::Canceled) {
            return Err(ApiError::Conflict(format!(
                "only failed or canceled runs can be retried; this one is {}",
                r.status
            )));
        }
        let steps = run::retry_steps(r);
        Ok(run::apply_and_advance(
            def,
            r,
            vec![RunEvent::RunRetried { steps }],
            domain::now(),
        ))
    })
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location(id))],
        Json(run),
    )
        .into_response())
}

/// `POST /v1/runs/{id}/signals/{name}` body.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// Becomes the approval step's output.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub payload: Value,
}

#[utoipa::path(post, operation_id = "signalRun", path = "/v1/runs/{id}/signals/{name}", tag = "workflows",
    params(("id" = String, Path), ("name" = String, Path, description = "the approval step's id")),
    request_body = SignalBody,
    responses((status = 202, description = "recorded; the step succeeds with the payload", body = Run),
              (status = 404, description = "no run, or no approval step of that name", body = crate::error::Problem),
              (status = 409, description = "the run or step already ended, or was already signalled", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn signal(
    State(state): State<AppState>,
    auth: Auth,
    Path((id, name)): Path<(String, String)>,
    body: ApiJson<SignalBody>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let id = parse_id(&id)?;
    let payload = body.value.payload;
    let run = change(&state, &auth, id, |r, def| {
        let step = def
            .step(&name)
            .filter(|s| s.kind == "approval")
            .ok_or_else(|| {
                ApiError::NotFound(format!("the run's workflow has no approval step `{name}`"))
            })?;
        if r.status.is_terminal() {
            return Err(ApiError::Conflict(format!("run is already {}", r.status)));
        }
        let state = r.step(&step.id).map(|s| s.status);
        if state.is_some_and(StepStatus::is_terminal) {
            return Err(ApiError::Conflict(format!(
                "step `{name}` is already {}",
                state.map(|s| s.as_str()).unwrap_or("ended")
            )));
        }
        if r.signals.contains_key(&name) {
            return Err(ApiError::Conflict(format!(
                "step `{name}` was already signalled"
            )));
        }
        Ok(run::apply_and_advance(
            def,
            r,
            vec![RunEvent::SignalReceived {
                name: name.clone(),
                payload: payload.clone(),
            }],
            domain::now(),
        ))
    })
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location(id))],
        Json(run),
    )
        .into_response())
}
