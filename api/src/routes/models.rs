//! `/v1/models` (docs/models.md): the versions `finetune.train` registered, by name
//! (`sentiment`: the latest), `name@version` or id; deleting one version or a whole name.

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    Json,
};
use capibara_shared::{
    command::{self, models::ModelError},
    domain::{
        auth::Role,
        model::{ModelRef, ModelVersion},
    },
    store,
};
use serde::Deserialize;

use crate::{auth::Auth, error::ApiError, routes::jobs::Page, AppState};

/// Filters of `GET /v1/models`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListModels {
    /// Only the versions of this model name.
    #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    pub name: Option<String>,
}

fn parse_ref(reference: &str) -> Result<ModelRef, ApiError> {
    reference.parse::<ModelRef>().map_err(ApiError::NotFound)
}

#[utoipa::path(get, operation_id = "listModels", path = "/v1/models", tag = "models",
    params(ListModels),
    responses((status = 200, body = Page<ModelVersion>), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<ListModels>,
) -> Result<Json<Page<ModelVersion>>, ApiError> {
    auth.require(Role::Read)?;
    if let Some(name) = &q.name {
        capibara_shared::domain::model::check_name("name", name)?;
    }
    let items = store::models::list(&state.store.pool, auth.namespace(), q.name.as_deref()).await?;
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[utoipa::path(get, operation_id = "getModel", path = "/v1/models/{ref}", tag = "models",
    params(("ref" = String, Path, description = "`name` (its latest version), `name@version` or a model id")),
    responses((status = 200, body = ModelVersion), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(reference): Path<String>,
) -> Result<Json<ModelVersion>, ApiError> {
    auth.require(Role::Read)?;
    let r = parse_ref(&reference)?;
    let (_, version) = store::models::resolve(&state.store.pool, auth.namespace(), &r)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no model `{r}`")))?;
    Ok(Json(version))
}

#[utoipa::path(delete, operation_id = "deleteModel", path = "/v1/models/{ref}", tag = "models",
    params(("ref" = String, Path, description = "`name@version` or a model id: that version; `name`: every version")),
    responses((status = 204, description = "deleted"), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(reference): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Submit)?;
    let r = parse_ref(&reference)?;
    let metadata = auth.metadata();
    command::models::delete(&state.store, &metadata, &r)
        .await
        .map_err(|e| match e {
            command::CommandError::NotFound => ApiError::NotFound(format!("no model `{r}`")),
            command::CommandError::Rejected(e) => e.into(),
            command::CommandError::Busy => {
                ApiError::Conflict("the model is changing too fast; retry".into())
            }
            command::CommandError::Store(e) => e.into(),
        })?;
    Ok(StatusCode::NO_CONTENT)
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::NotFound(_) => ApiError::NotFound(e.to_string()),
        }
    }
}
