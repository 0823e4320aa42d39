//! Operational resources: `/v1/workers` (the list), `/v1/queues`, `/v1/api-keys`.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::IntoResponse,
    Json,
};
use capibara_shared::{
    domain::auth::{validate_namespace, Role},
    store::{
        self,
        jobs::QueueStats,
        keys::{ApiKey, NewKey},
        workers::WorkerInfo,
    },
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{auth::Auth, error::ApiError, extract::ApiJson, routes::jobs::Page, AppState};

/// Workers are shared by every namespace, so listing them needs the `admin` role; `running`
/// counts the caller's namespace's attempts only, except for a super-admin (docs/security.md).
#[utoipa::path(get, operation_id = "listWorkers", path = "/v1/workers", tag = "operations",
    responses((status = 200, body = Page<WorkerInfo>), (status = 403, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn workers(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Page<WorkerInfo>>, ApiError> {
    auth.require(Role::Admin).map_err(|_| {
        ApiError::Forbidden(
            "listing workers needs the `admin` role: workers are shared by every namespace".into(),
        )
    })?;
    let running_in = (!auth.is_super_admin()).then(|| auth.namespace());
    let items = store::workers::list(
        &state.store.pool,
        state.config.visibility_timeout.as_secs_f64(),
        running_in,
    )
    .await?;
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[utoipa::path(get, operation_id = "listQueues", path = "/v1/queues", tag = "operations",
    responses((status = 200, body = Page<QueueStats>)), security(("bearer" = [])))]
pub async fn queues(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Page<QueueStats>>, ApiError> {
    auth.require(Role::Read)?;
    let mut items = store::jobs::queue_stats(&state.store.pool, Some(auth.namespace())).await?;
    let paused: Vec<String> = store::limits::pauses(&state.store.pool, auth.namespace())
        .await?
        .map(|p| p.paused)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(t, _)| match t {
            capibara_shared::domain::limit::PauseTarget::Queue { queue } => Some(queue),
            _ => None,
        })
        .collect();
    for q in &mut items {
        q.paused = paused.contains(&q.name);
    }
    // A paused queue with no jobs is listed too: the pause is what an operator looks for.
    for name in paused {
        if !items.iter().any(|q| q.name == name) {
            items.push(store::jobs::QueueStats {
                name,
                depth: 0,
                running: 0,
                scheduled: 0,
                oldest_age_s: None,
                paused: true,
            });
        }
    }
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

/// `POST /v1/api-keys` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub name: String,
    pub roles: Vec<Role>,
    /// Namespace of the new key (default: the caller's). Only super-admins may pick another.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Make the new key a super-admin (it needs the `admin` role). Only super-admins may.
    #[serde(default)]
    pub super_admin: bool,
}

/// A new key; `key` is shown only here.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub info: ApiKey,
    pub key: String,
}

#[utoipa::path(post, operation_id = "createApiKey", path = "/v1/api-keys", tag = "operations", request_body = CreateKey,
    responses((status = 201, body = CreatedKey), (status = 403, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn create_key(
    State(state): State<AppState>,
    auth: Auth,
    body: ApiJson<CreateKey>,
) -> Result<impl IntoResponse, ApiError> {
    auth.require(Role::Admin)?;
    let req = body.value;
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::field("name", "must be 1-100 characters"));
    }
    if req.roles.is_empty() {
        return Err(ApiError::field(
            "roles",
            format!(
                "name at least one of: {}",
                Role::ALL.map(|r| r.as_str()).join(", ")
            ),
        ));
    }
    let namespace = req
        .namespace
        .unwrap_or_else(|| auth.namespace().to_string());
    validate_namespace(&namespace).map_err(|m| ApiError::field("namespace", m))?;
    if namespace != auth.namespace() && !auth.is_super_admin() {
        return Err(ApiError::Forbidden(format!(
            "only a super-admin creates keys for another namespace than its own (`{}`)",
            auth.namespace()
        )));
    }
    if req.super_admin {
        if !auth.is_super_admin() {
            return Err(ApiError::Forbidden(
                "only a super-admin creates super-admin keys".into(),
            ));
        }
        if !req.roles.contains(&Role::Admin) {
            return Err(ApiError::field(
                "super_admin",
                "a super-admin key needs the `admin` role",
            ));
        }
    }
    let (info, key) = store::keys::create(
        &state.store.pool,
        NewKey {
            namespace: &namespace,
            name,
            roles: &req.roles,
            super_admin: req.super_admin,
        },
    )
    .await?;
    tracing::info!(actor = %auth.actor(), key_id = %info.id, namespace = %info.namespace,
        super_admin = info.super_admin, "API key created");
    Ok((StatusCode::CREATED, Json(CreatedKey { info, key })))
}

/// Keys of the caller's namespace (a super-admin: of every namespace), revoked ones included;
/// never a secret nor its hash.
#[utoipa::path(get, operation_id = "listApiKeys", path = "/v1/api-keys", tag = "operations",
    responses((status = 200, body = Page<ApiKey>)), security(("bearer" = [])))]
pub async fn list_keys(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Page<ApiKey>>, ApiError> {
    auth.require(Role::Admin)?;
    let scope = (!auth.is_super_admin()).then(|| auth.namespace());
    let items = store::keys::list(&state.store.pool, scope).await?;
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

/// Revoke a key: from the answer on it is refused (401) by every API process. Admins revoke
/// their namespace's keys, super-admins any; only a super-admin revokes a super-admin key.
/// Revoking a revoked key answers the recorded revocation.
#[utoipa::path(delete, operation_id = "revokeApiKey", path = "/v1/api-keys/{id}", tag = "operations", params(("id" = String, Path)),
    responses((status = 200, description = "revoked (`revoked_at`, `revoked_by` set)", body = ApiKey),
              (status = 403, body = crate::error::Problem), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn revoke_key(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<ApiKey>, ApiError> {
    auth.require(Role::Admin)?;
    let not_found = || ApiError::NotFound(format!("no API key `{id}`"));
    let key_id: Uuid = id.parse().map_err(|_| not_found())?;
    let key = store::keys::get(&state.store.pool, key_id)
        .await?
        .filter(|k| auth.is_super_admin() || k.namespace == auth.namespace())
        .ok_or_else(not_found)?;
    if key.super_admin && !auth.is_super_admin() {
        return Err(ApiError::Forbidden(
            "only a super-admin revokes a super-admin key".into(),
        ));
    }
    let key = store::keys::revoke(&state.store.pool, key_id, &auth.actor())
        .await?
        .ok_or_else(not_found)?;
    // This process at once; the others over Redis (or, if that message is lost, when their
    // cache entry expires).
    state.keys.evict(key_id);
    if let Err(e) = state.queue.publish_key_revoked(key_id).await {
        tracing::warn!(error = %e, key_id = %key_id,
            "could not announce the revocation; other API processes refuse the key within their cache TTL");
    }
    tracing::info!(actor = %auth.actor(), key_id = %key_id, namespace = %key.namespace, "API key revoked");
    Ok(Json(key))
}
