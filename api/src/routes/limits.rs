//! Flow control (docs/flow-control.md): `/v1/limits` (concurrency and rate limits per key) and
//! pausing or resuming a queue, a kind or one key of a limit.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::IntoResponse,
    Json,
};
use capibara_shared::{
    command::{self, limits::FlowError},
    domain::{
        auth::Role,
        job::valid_queue_name,
        limit::{valid_limit_name, Limit, LimitDef, LimitMatch, LimitRate, PauseTarget},
    },
    flow, store,
};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::{auth::Auth, error::ApiError, extract::ApiJson, routes::jobs::Page, AppState};

/// A limit as shown (its definition's fields, with its name and times).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LimitInfo {
    pub name: String,
    #[serde(rename = "match")]
    #[schema(inline)]
    pub matches: LimitMatch,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_running: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub rate: Option<LimitRate>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<Limit> for LimitInfo {
    fn from(l: Limit) -> Self {
        let LimitDef {
            matches,
            key,
            max_running,
            rate,
        } = l.definition;
        LimitInfo {
            name: l.name,
            matches,
            key,
            max_running,
            rate,
            created_at: l.created_at,
            updated_at: l.updated_at,
        }
    }
}

impl From<FlowError> for ApiError {
    fn from(e: FlowError) -> Self {
        match e {
            FlowError::NotFound(_) => ApiError::NotFound(e.to_string()),
        }
    }
}

fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    if valid_limit_name(name) {
        Ok(())
    } else {
        Err(ApiError::field(
            field,
            "1-64 characters: letters, digits, `.`, `_` and `-`",
        ))
    }
}

/// After a change: this process dispatches with it and Redis enforces it at once (the other
/// processes load it from Redis within a second, and the scheduler re-syncs Redis every two).
async fn apply_now(state: &AppState) {
    if let Err(e) = flow::sync_queue(&state.store.pool, &state.queue).await {
        tracing::warn!(error = %e, "syncing limits to Redis failed; the scheduler retries");
    }
}

#[utoipa::path(get, operation_id = "listLimits", path = "/v1/limits", tag = "flow",
    responses((status = 200, body = Page<LimitInfo>)), security(("bearer" = [])))]
/// The namespace's limits, by name.
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Page<LimitInfo>>, ApiError> {
    auth.require(Role::Read)?;
    let items = store::limits::list(&state.store.pool, auth.namespace())
        .await?
        .into_iter()
        .map(LimitInfo::from)
        .collect();
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[utoipa::path(get, operation_id = "getLimit", path = "/v1/limits/{name}", tag = "flow",
    params(("name" = String, Path)),
    responses((status = 200, body = LimitInfo), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<Json<LimitInfo>, ApiError> {
    auth.require(Role::Read)?;
    let ns = auth.namespace();
    let limit = store::limits::get(
        &state.store.pool,
        ns,
        capibara_shared::domain::limit::stream_id(ns, &name),
    )
    .await?
    .filter(|l| !l.deleted)
    .ok_or_else(|| ApiError::NotFound(format!("no limit `{name}`")))?;
    Ok(Json(limit.into()))
}

#[utoipa::path(put, operation_id = "putLimit", path = "/v1/limits/{name}", tag = "flow",
    params(("name" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")), request_body = LimitDef,
    responses((status = 201, description = "configured", body = LimitInfo),
              (status = 200, description = "replaced (or unchanged)", body = LimitInfo),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
/// Configure a limit (an admin key): which jobs it matches, the key it counts by, and its
/// `max_running` and/or `rate`.
pub async fn put(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    body: ApiJson<LimitDef>,
) -> Result<impl IntoResponse, ApiError> {
    auth.require(Role::Admin)?;
    check_name("name", &name)?;
    let definition = body.value;
    definition.validate(auth.namespace())?;
    let meta = auth.metadata();
    let (limit, created) = command::limits::put(&state.store, &meta, &name, definition)
        .await
        .map_err(|e| ApiError::from_command(e, "limit", uuid::Uuid::nil()))?;
    apply_now(&state).await;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(LimitInfo::from(limit))))
}

#[utoipa::path(delete, operation_id = "deleteLimit", path = "/v1/limits/{name}", tag = "flow",
    params(("name" = String, Path)),
    responses((status = 204, description = "deleted"), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Admin)?;
    let meta = auth.metadata();
    command::limits::delete(&state.store, &meta, &name)
        .await
        .map_err(|e| ApiError::from_command(e, "limit", uuid::Uuid::nil()))?;
    apply_now(&state).await;
    Ok(StatusCode::NO_CONTENT)
}

/// What is paused in the namespace.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PausedTarget {
    #[serde(flatten)]
    pub target: PauseTarget,
    pub paused_at: DateTime<Utc>,
}

async fn set(
    state: &AppState,
    auth: &Auth,
    target: PauseTarget,
    pause: bool,
) -> Result<Json<Page<PausedTarget>>, ApiError> {
    auth.require(Role::Admin)?;
    let meta = auth.metadata();
    let paused = command::limits::set_paused(&state.store, &meta, target, pause)
        .await
        .map_err(|e| ApiError::from_command(e, "pause", uuid::Uuid::nil()))?;
    apply_now(state).await;
    Ok(Json(Page {
        items: paused
            .into_iter()
            .map(|(target, paused_at)| PausedTarget { target, paused_at })
            .collect(),
        next_cursor: None,
    }))
}

#[utoipa::path(get, operation_id = "listPauses", path = "/v1/pauses", tag = "flow",
    responses((status = 200, body = Page<PausedTarget>)), security(("bearer" = [])))]
/// Everything paused in the namespace, with when.
pub async fn pauses(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Page<PausedTarget>>, ApiError> {
    auth.require(Role::Read)?;
    let paused = store::limits::pauses(&state.store.pool, auth.namespace())
        .await?
        .map(|p| p.paused)
        .unwrap_or_default();
    Ok(Json(Page {
        items: paused
            .into_iter()
            .map(|(target, paused_at)| PausedTarget { target, paused_at })
            .collect(),
        next_cursor: None,
    }))
}

fn queue_target(name: String) -> Result<PauseTarget, ApiError> {
    if !valid_queue_name(&name) {
        return Err(ApiError::field("name", "not a queue name"));
    }
    Ok(PauseTarget::Queue { queue: name })
}

fn kind_target(name: String) -> Result<PauseTarget, ApiError> {
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::field("name", "not a kind name"));
    }
    Ok(PauseTarget::Kind { kind: name })
}

fn key_target(limit: String, key: String) -> Result<PauseTarget, ApiError> {
    check_name("name", &limit)?;
    if key.is_empty() || key.chars().count() > 256 {
        return Err(ApiError::field("key", "must be 1-256 characters"));
    }
    Ok(PauseTarget::Key { limit, key })
}

#[utoipa::path(post, operation_id = "pauseQueue", path = "/v1/queues/{name}/pause", tag = "flow",
    params(("name" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")),
    responses((status = 200, description = "what is paused now", body = Page<PausedTarget>),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
/// Pause a queue in this namespace: running jobs finish, nothing new starts, submissions are
/// still accepted.
pub async fn pause_queue(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<Json<Page<PausedTarget>>, ApiError> {
    set(&state, &auth, queue_target(name)?, true).await
}

#[utoipa::path(post, operation_id = "resumeQueue", path = "/v1/queues/{name}/resume", tag = "flow",
    params(("name" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")),
    responses((status = 200, description = "what is paused now", body = Page<PausedTarget>),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn resume_queue(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<Json<Page<PausedTarget>>, ApiError> {
    set(&state, &auth, queue_target(name)?, false).await
}

#[utoipa::path(post, operation_id = "pauseKind", path = "/v1/kinds/{name}/pause", tag = "flow",
    params(("name" = String, Path, min_length = 1, max_length = 128)),
    responses((status = 200, description = "what is paused now", body = Page<PausedTarget>),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn pause_kind(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<Json<Page<PausedTarget>>, ApiError> {
    set(&state, &auth, kind_target(name)?, true).await
}

#[utoipa::path(post, operation_id = "resumeKind", path = "/v1/kinds/{name}/resume", tag = "flow",
    params(("name" = String, Path, min_length = 1, max_length = 128)),
    responses((status = 200, description = "what is paused now", body = Page<PausedTarget>),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn resume_kind(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<Json<Page<PausedTarget>>, ApiError> {
    set(&state, &auth, kind_target(name)?, false).await
}

#[utoipa::path(post, operation_id = "pauseLimitKey", path = "/v1/limits/{name}/keys/{key}/pause", tag = "flow",
    params(("name" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"), ("key" = String, Path, min_length = 1, max_length = 256)),
    responses((status = 200, description = "what is paused now", body = Page<PausedTarget>),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
/// Pause one key of a limit (e.g. one tenant).
pub async fn pause_key(
    State(state): State<AppState>,
    auth: Auth,
    Path((name, key)): Path<(String, String)>,
) -> Result<Json<Page<PausedTarget>>, ApiError> {
    set(&state, &auth, key_target(name, key)?, true).await
}

#[utoipa::path(post, operation_id = "resumeLimitKey", path = "/v1/limits/{name}/keys/{key}/resume", tag = "flow",
    params(("name" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$"), ("key" = String, Path, min_length = 1, max_length = 256)),
    responses((status = 200, description = "what is paused now", body = Page<PausedTarget>),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn resume_key(
    State(state): State<AppState>,
    auth: Auth,
    Path((name, key)): Path<(String, String)>,
) -> Result<Json<Page<PausedTarget>>, ApiError> {
    set(&state, &auth, key_target(name, key)?, false).await
}
