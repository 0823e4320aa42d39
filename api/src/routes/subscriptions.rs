//! `/v1/subscriptions`: send job and run events matching a filter to a URL, with custom headers.

use std::collections::BTreeMap;

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use capibara_shared::{
    domain::{
        self,
        auth::Role,
        delivery::validate_subscription_events,
        subscription::{validate_headers, Subscription, SubscriptionFilter},
        webhook::WebhookSecret,
    },
    store,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{auth::Auth, error::ApiError, extract::ApiJson, routes::jobs::Page, AppState};

/// `POST /v1/subscriptions` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSubscription {
    pub url: String,
    /// Event names or patterns: `job.*`, `job.failed`, `run.succeeded`, `run.failed`,
    /// `run.canceled`, `run.*`, `*`, or the aliases `workflow.completed` (= `run.succeeded`) and
    /// `workflow.failed` (= `run.failed`), delivered under the alias.
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// The seed's name for `events` (give one of the two).
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
    #[serde(default)]
    pub filter: Option<SubscriptionFilter>,
    /// Extra headers sent with every delivery (`{"Authorization": "Bearer …"}`). Values are
    /// stored, never shown again: responses list `header_names` only.
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub description: Option<String>,
}

/// `PATCH /v1/subscriptions/{id}` body: fields to change.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSubscription {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// The seed's name for `events`.
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
    #[serde(default)]
    pub filter: Option<SubscriptionFilter>,
    /// Replaces all custom headers (`{}` removes them).
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub description: Option<String>,
}

/// A new subscription with its signing secret (shown only here).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedSubscription {
    #[serde(flatten)]
    pub subscription: Subscription,
    /// `whsec_…`: verify deliveries with it (Standard Webhooks).
    pub secret: String,
}

/// The event list of a body, from `events` or `event_types`, checked; errors name the field as
/// the client spelled it (`event_types[2]`).
fn events_of(
    events: Option<Vec<String>>,
    event_types: Option<Vec<String>>,
    required: bool,
) -> Result<Option<Vec<String>>, ApiError> {
    let (field, list) = match (events, event_types) {
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                "event_types",
                "give `events` or `event_types`, not both",
            ))
        }
        (Some(e), None) => ("events", e),
        (None, Some(e)) => ("event_types", e),
        (None, None) if required => {
            return Err(ApiError::field("events", "name at least one event"))
        }
        (None, None) => return Ok(None),
    };
    validate_subscription_events(&list).map_err(|(i, m)| match i {
        Some(i) => ApiError::field(format!("{field}[{i}]"), m),
        None => ApiError::field(field, m),
    })?;
    Ok(Some(list))
}

fn headers_of(
    headers: Option<BTreeMap<String, String>>,
) -> Result<Option<BTreeMap<String, String>>, ApiError> {
    headers
        .map(|h| validate_headers(&h).map_err(|(f, m)| ApiError::field(f, m)))
        .transpose()
}

fn check_description(d: &Option<String>) -> Result<(), ApiError> {
    match d {
        Some(d) if d.chars().count() > 500 => {
            Err(ApiError::field("description", "at most 500 characters"))
        }
        _ => Ok(()),
    }
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    crate::extract::path_id(id, "subscription")
}

async fn load(state: &AppState, auth: &Auth, id: &str) -> Result<Subscription, ApiError> {
    let id = parse_id(id)?;
    store::subscriptions::get(&state.store.pool, auth.namespace(), id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no subscription `{id}`")))
}

#[utoipa::path(post, operation_id = "createSubscription", path = "/v1/subscriptions", tag = "deliveries", request_body = CreateSubscription,
    responses((status = 201, body = CreatedSubscription), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    body: ApiJson<CreateSubscription>,
) -> Result<Response, ApiError> {
    auth.require(Role::Admin)?;
    let req = body.value;
    let url = crate::outbound::check_url("url", &req.url, &state.config).await?;
    let events = events_of(req.events, req.event_types, true)?.unwrap_or_default();
    let headers = headers_of(req.headers)?.unwrap_or_default();
    check_description(&req.description)?;
    let now = domain::now();
    let (_, secret) = WebhookSecret::generate();
    let sub = Subscription {
        id: Uuid::now_v7(),
        namespace: auth.namespace().to_string(),
        url,
        events,
        filter: req.filter.unwrap_or_default(),
        header_names: headers.keys().cloned().collect(),
        status: "active".into(),
        description: req.description,
        created_at: now,
        updated_at: now,
    };
    store::subscriptions::create(&state.store.pool, &sub, &secret, &headers).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedSubscription {
            subscription: sub,
            secret,
        }),
    )
        .into_response())
}

#[utoipa::path(get, operation_id = "listSubscriptions", path = "/v1/subscriptions", tag = "deliveries",
    responses((status = 200, body = Page<Subscription>)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Page<Subscription>>, ApiError> {
    auth.require(Role::Read)?;
    let items = store::subscriptions::list(&state.store.pool, auth.namespace()).await?;
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[utoipa::path(get, operation_id = "getSubscription", path = "/v1/subscriptions/{id}", tag = "deliveries", params(("id" = String, Path)),
    responses((status = 200, body = Subscription), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Subscription>, ApiError> {
    auth.require(Role::Read)?;
    Ok(Json(load(&state, &auth, &id).await?))
}

#[utoipa::path(patch, operation_id = "updateSubscription", path = "/v1/subscriptions/{id}", tag = "deliveries", params(("id" = String, Path)),
    request_body = UpdateSubscription,
    responses((status = 200, body = Subscription), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn update(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: ApiJson<UpdateSubscription>,
) -> Result<Json<Subscription>, ApiError> {
    auth.require(Role::Admin)?;
    let mut sub = load(&state, &auth, &id).await?;
    let req = body.value;
    if let Some(url) = req.url {
        sub.url = crate::outbound::check_url("url", &url, &state.config).await?;
    }
    if let Some(events) = events_of(req.events, req.event_types, false)? {
        sub.events = events;
    }
    let headers = headers_of(req.headers)?;
    if let Some(h) = &headers {
        sub.header_names = h.keys().cloned().collect();
    }
    if let Some(filter) = req.filter {
        sub.filter = filter;
    }
    if req.description.is_some() {
        check_description(&req.description)?;
        sub.description = req.description;
    }
    sub.updated_at = domain::now();
    store::subscriptions::update(&state.store.pool, &sub, headers.as_ref()).await?;
    Ok(Json(sub))
}

async fn set_status(
    state: &AppState,
    auth: &Auth,
    id: &str,
    status: &str,
) -> Result<Json<Subscription>, ApiError> {
    auth.require(Role::Admin)?;
    let mut sub = load(state, auth, id).await?;
    sub.status = status.to_string();
    sub.updated_at = domain::now();
    store::subscriptions::update(&state.store.pool, &sub, None).await?;
    Ok(Json(sub))
}

#[utoipa::path(post, operation_id = "pauseSubscription", path = "/v1/subscriptions/{id}/pause", tag = "deliveries", params(("id" = String, Path)),
    responses((status = 200, description = "paused: events are not delivered while paused", body = Subscription)),
    security(("bearer" = [])))]
pub async fn pause(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Subscription>, ApiError> {
    set_status(&state, &auth, &id, "paused").await
}

#[utoipa::path(post, operation_id = "resumeSubscription", path = "/v1/subscriptions/{id}/resume", tag = "deliveries", params(("id" = String, Path)),
    responses((status = 200, body = Subscription)), security(("bearer" = [])))]
pub async fn resume(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Subscription>, ApiError> {
    set_status(&state, &auth, &id, "active").await
}

#[utoipa::path(delete, operation_id = "deleteSubscription", path = "/v1/subscriptions/{id}", tag = "deliveries", params(("id" = String, Path)),
    responses((status = 204, description = "deleted; its deliveries keep their history"),
              (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Admin)?;
    let id = parse_id(&id)?;
    if store::subscriptions::delete(&state.store.pool, auth.namespace(), id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("no subscription `{id}`")))
    }
}
