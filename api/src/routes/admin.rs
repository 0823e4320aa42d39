//! Operational resources: `/v1/workers`, `/v1/queues`, `/v1/kinds`, `/v1/api-keys`.

use axum::{extract::State, http::StatusCode, response::IntoResponse, Json};
use capibara_shared::{
    domain::{
        auth::{validate_namespace, Role},
        kinds,
    },
    store::{self, jobs::QueueStats, keys::ApiKey, workers::WorkerInfo},
};
use serde::{Deserialize, Serialize};

use crate::{auth::Auth, error::ApiError, extract::ApiJson, routes::jobs::Page, AppState};

#[utoipa::path(get, operation_id = "listWorkers", path = "/v1/workers", tag = "operations",
    responses((status = 200, body = Page<WorkerInfo>)), security(("bearer" = [])))]
pub async fn workers(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Page<WorkerInfo>>, ApiError> {
    auth.require(Role::Read)?;
    let items = store::workers::list(
        &state.store.pool,
        state.config.visibility_timeout.as_secs_f64(),
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
    let items = store::jobs::queue_stats(&state.store.pool, Some(auth.namespace())).await?;
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

/// A job kind this deployment accepts.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KindInfo {
    pub name: &'static str,
    pub default_queue: &'static str,
    pub description: &'static str,
}

#[utoipa::path(get, operation_id = "listKinds", path = "/v1/kinds", tag = "jobs",
    responses((status = 200, body = Page<KindInfo>)), security(("bearer" = [])))]
pub async fn kinds_list(auth: Auth) -> Result<Json<Page<KindInfo>>, ApiError> {
    auth.require(Role::Read)?;
    let items = kinds::KINDS
        .iter()
        .filter(|k| !k.internal)
        .map(|k| KindInfo {
            name: k.name,
            default_queue: k.default_queue,
            description: k.description,
        })
        .collect();
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
    /// Namespace of the new key (default: the caller's). Only admins of `default` may pick another.
    #[serde(default)]
    pub namespace: Option<String>,
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
    if name.is_empty() || name.len() > 100 {
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
    if namespace != auth.namespace() && auth.namespace() != "default" {
        return Err(ApiError::Forbidden(
            "only admins of namespace `default` create keys for other namespaces".into(),
        ));
    }
    let (info, key) = store::keys::create(&state.store.pool, &namespace, name, &req.roles).await?;
    Ok((StatusCode::CREATED, Json(CreatedKey { info, key })))
}

#[utoipa::path(get, operation_id = "listApiKeys", path = "/v1/api-keys", tag = "operations",
    responses((status = 200, body = Page<ApiKey>)), security(("bearer" = [])))]
pub async fn list_keys(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Page<ApiKey>>, ApiError> {
    auth.require(Role::Admin)?;
    let items = store::keys::list(&state.store.pool, auth.namespace()).await?;
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}
