//! `/v1/connectors` and `/v1/connector-types` (docs/connectors.md): connectors as configuration,
//! each a stream; `connector.fetch` jobs read them.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use capibara_shared::{
    command::{self, connectors::ConnectorError},
    domain::{
        auth::Role,
        connector::{types, Connector, ConnectorDef},
    },
    store,
};
use serde::Serialize;
use uuid::Uuid;

use crate::{auth::Auth, error::ApiError, extract::ApiJson, routes::jobs::Page, AppState};

/// A connector type of `GET /v1/connector-types`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConnectorTypeInfo {
    #[serde(rename = "type")]
    pub name: String,
    pub description: String,
    /// The JSON Schema of a connector's `config`.
    #[schema(value_type = Object)]
    pub config_schema: serde_json::Value,
    /// A config that passes the schema.
    #[schema(value_type = Object)]
    pub example: serde_json::Value,
    /// Where the config takes secrets (the keys of a connector's `secrets`).
    pub secrets: String,
    /// What the connector's cursor holds.
    pub cursor: String,
}

#[utoipa::path(get, operation_id = "listConnectorTypes", path = "/v1/connector-types", tag = "connectors",
    responses((status = 200, body = Page<ConnectorTypeInfo>)), security(("bearer" = [])))]
pub async fn list_types(auth: Auth) -> Result<Json<Page<ConnectorTypeInfo>>, ApiError> {
    auth.require(Role::Read)?;
    let items = types::TYPES
        .iter()
        .map(|t| ConnectorTypeInfo {
            name: t.name.to_string(),
            description: t.description.to_string(),
            config_schema: (t.schema)(),
            example: (t.example)(),
            secrets: t.secret_places.to_string(),
            cursor: t.cursor.to_string(),
        })
        .collect();
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

/// The definition, checked against its type, with its URL (or an `s3` endpoint) passing the
/// outbound policy.
async fn check(state: &AppState, def: &ConnectorDef) -> Result<(), ApiError> {
    def.validate()?;
    for field in ["url", "endpoint"] {
        if let Some(url) = def.config.get(field).and_then(|u| u.as_str()) {
            crate::outbound::check_url(&format!("config.{field}"), url, &state.config).await?;
        }
    }
    Ok(())
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    id.parse()
        .map_err(|_| ApiError::NotFound(format!("no connector `{id}`")))
}

async fn load(state: &AppState, auth: &Auth, id: &str) -> Result<Connector, ApiError> {
    let id = parse_id(id)?;
    store::connectors::get(&state.store.pool, auth.namespace(), id)
        .await?
        .filter(|c| !c.deleted)
        .ok_or_else(|| ApiError::NotFound(format!("no connector `{id}`")))
}

#[utoipa::path(post, operation_id = "createConnector", path = "/v1/connectors", tag = "connectors",
    request_body = ConnectorDef,
    responses((status = 201, body = Connector), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    body: ApiJson<ConnectorDef>,
) -> Result<(StatusCode, Json<Connector>), ApiError> {
    auth.require(Role::Submit)?;
    check(&state, &body.value).await?;
    let c = command::connectors::create(&state.store, &auth.metadata(), body.value).await?;
    Ok((StatusCode::CREATED, Json(c)))
}

#[utoipa::path(get, operation_id = "listConnectors", path = "/v1/connectors", tag = "connectors",
    responses((status = 200, body = Page<Connector>)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Page<Connector>>, ApiError> {
    auth.require(Role::Read)?;
    let items = store::connectors::list(&state.store.pool, auth.namespace(), None, 1000).await?;
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[utoipa::path(get, operation_id = "getConnector", path = "/v1/connectors/{id}", tag = "connectors",
    params(("id" = String, Path)),
    responses((status = 200, body = Connector), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Connector>, ApiError> {
    auth.require(Role::Read)?;
    Ok(Json(load(&state, &auth, &id).await?))
}

#[utoipa::path(put, operation_id = "updateConnector", path = "/v1/connectors/{id}", tag = "connectors",
    params(("id" = String, Path)), request_body = ConnectorDef,
    responses((status = 200, body = Connector), (status = 404, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn update(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: ApiJson<ConnectorDef>,
) -> Result<Json<Connector>, ApiError> {
    auth.require(Role::Submit)?;
    let id = parse_id(&id)?;
    check(&state, &body.value).await?;
    let c = command::connectors::update(&state.store, &auth.metadata(), id, body.value)
        .await
        .map_err(|e| ApiError::from_command(e, "connector", id))?;
    Ok(Json(c))
}

#[utoipa::path(delete, operation_id = "deleteConnector", path = "/v1/connectors/{id}", tag = "connectors",
    params(("id" = String, Path)),
    responses((status = 204, description = "deleted"), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Submit)?;
    let id = parse_id(&id)?;
    command::connectors::delete(&state.store, &auth.metadata(), id)
        .await
        .map_err(|e| ApiError::from_command(e, "connector", id))?;
    Ok(StatusCode::NO_CONTENT)
}

impl From<ConnectorError> for ApiError {
    fn from(e: ConnectorError) -> Self {
        match e {
            ConnectorError::NotFound(_) => ApiError::NotFound(e.to_string()),
        }
    }
}
