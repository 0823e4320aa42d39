//! `/v1/secrets`: values workflow templates refer to as `{{ secrets.NAME }}`. Values are write-only
//! through the API (listing shows names and times) and never enter the event log.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use capibara_shared::{
    domain::auth::Role,
    store::{self, secrets::SecretInfo},
};
use serde::{Deserialize, Serialize};

use crate::{auth::Auth, error::ApiError, extract::ApiJson, AppState};

/// `PUT /v1/secrets/{name}` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSecret {
    pub value: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SecretList {
    pub items: Vec<SecretInfo>,
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if capibara_shared::domain::secret_name_ok(name) {
        Ok(())
    } else {
        Err(ApiError::field(
            "name",
            "must be 1-128 letters, digits, '_' or '-'",
        ))
    }
}

#[utoipa::path(put, operation_id = "putSecret", path = "/v1/secrets/{name}", tag = "workflows", params(("name" = String, Path)),
    request_body = PutSecret,
    responses((status = 200, description = "stored (the value is never returned)", body = SecretInfo),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn put(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    body: ApiJson<PutSecret>,
) -> Result<Json<SecretInfo>, ApiError> {
    auth.require(Role::Admin)?;
    check_name(&name)?;
    if body.value.value.len() > 64 * 1024 {
        return Err(ApiError::field("value", "must be at most 64 KiB"));
    }
    Ok(Json(
        store::secrets::put(
            &state.store.pool,
            auth.namespace(),
            &name,
            &body.value.value,
        )
        .await?,
    ))
}

#[utoipa::path(get, operation_id = "listSecrets", path = "/v1/secrets", tag = "workflows",
    responses((status = 200, description = "names and times, never values", body = SecretList)),
    security(("bearer" = [])))]
pub async fn list(State(state): State<AppState>, auth: Auth) -> Result<Json<SecretList>, ApiError> {
    auth.require(Role::Read)?;
    Ok(Json(SecretList {
        items: store::secrets::list(&state.store.pool, auth.namespace()).await?,
    }))
}

#[utoipa::path(delete, operation_id = "deleteSecret", path = "/v1/secrets/{name}", tag = "workflows", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Admin)?;
    if store::secrets::delete(&state.store.pool, auth.namespace(), &name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no secret `{name}`")))
    }
}
