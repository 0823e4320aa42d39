//! `/v1/triggers`: inbound webhooks that start jobs. The hook itself is served by the scheduler
//! at `POST /hooks/{id}`.

use std::convert::Infallible;

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use capibara_shared::{
    command,
    domain::{
        self,
        auth::Role,
        trigger::{check_template, Trigger, TriggerAuth, TriggerEvent},
        webhook::WebhookSecret,
    },
    store::{self, triggers::trigger_append, Effect, StoreError},
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    auth::Auth,
    error::ApiError,
    extract::ApiJson,
    routes::{jobs::Page, schedules::TargetBody},
    AppState,
};

/// `POST /v1/triggers` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTrigger {
    pub name: String,
    pub target: TargetBody,
    /// How callers authenticate. Leave `token`/`secret` out to have one generated; either way
    /// the creation response is the only place it is shown.
    pub auth: TriggerAuth,
    /// Template of the job input over `body` and `headers` (minijinja; a string that is exactly
    /// `{{ expr }}` keeps its JSON type). Omitted: the request body is the input.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub input: Option<serde_json::Value>,
    /// Calls accepted per minute (default 600).
    #[serde(default)]
    pub rate_limit_per_minute: Option<i32>,
}

/// A trigger with its hook URL (credentials are never returned after creation).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TriggerView {
    #[serde(flatten)]
    pub trigger: Trigger,
    /// Where to send calls: `POST` here.
    pub url: String,
}

/// A new trigger with its credential (shown only here).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedTrigger {
    #[serde(flatten)]
    pub trigger: TriggerView,
    /// The bearer token or signing secret callers use, as given or generated.
    pub secret: String,
}

fn view(state: &AppState, t: Trigger) -> TriggerView {
    // The projection holds the redacted form only (the log never had the credential, or a
    // migration removed it); `Trigger::apply` redacts whatever an event carries.
    let url = format!(
        "{}/hooks/{}",
        state.config.hooks_public_url.trim_end_matches('/'),
        t.id
    );
    TriggerView { trigger: t, url }
}

#[utoipa::path(post, operation_id = "createTrigger", path = "/v1/triggers", tag = "schedules", request_body = CreateTrigger,
    responses((status = 201, body = CreatedTrigger), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    body: ApiJson<CreateTrigger>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let b = body.value;
    if b.name.trim().is_empty() || b.name.chars().count() > 200 {
        return Err(ApiError::field("name", "must be 1-200 characters"));
    }
    let target = super::schedules::target(b.target, &state, &auth).await?;
    let auth_given = b.auth.with_generated_credential();
    match &auth_given {
        TriggerAuth::Bearer { token: Some(token) } if token.len() < 16 => {
            return Err(ApiError::field("auth.token", "use at least 16 characters"))
        }
        TriggerAuth::StandardWebhooks {
            secret: Some(secret),
        } => {
            WebhookSecret::parse(secret)
                .map_err(|e| ApiError::field("auth.secret", e.to_string()))?;
        }
        TriggerAuth::HmacSha256 { secret, header } => {
            if secret.as_ref().is_none_or(|s| s.len() < 16) {
                return Err(ApiError::field("auth.secret", "use at least 16 characters"));
            }
            if header
                .as_ref()
                .is_some_and(|h| h.is_empty() || h.len() > 100)
            {
                return Err(ApiError::field("auth.header", "must be a header name"));
            }
        }
        _ => {}
    }
    if let Some(t) = &b.input {
        check_template(t).map_err(|m| ApiError::field("input", m))?;
    }
    let rate = b.rate_limit_per_minute.unwrap_or(600);
    if !(1..=100_000).contains(&rate) {
        return Err(ApiError::field(
            "rate_limit_per_minute",
            "must be between 1 and 100000",
        ));
    }
    let ev = TriggerEvent::TriggerCreated {
        name: b.name,
        target: serde_json::to_value(&target).map_err(ApiError::internal)?,
        // The log keeps the scheme only; the credential goes to `trigger_credentials`.
        auth: serde_json::to_value(auth_given.redacted()).map_err(ApiError::internal)?,
        input: b.input,
        rate_limit_per_minute: rate,
    };
    let (t, mut a) = trigger_append(
        None,
        Uuid::now_v7(),
        auth.namespace(),
        &[ev],
        auth.metadata(),
        domain::now(),
    )
    .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("trigger state")))?;
    a.effects.push(Effect::TriggerCredential {
        trigger_id: t.id,
        namespace: t.namespace.clone(),
        credential: Some(auth_given.credential()),
    });
    state
        .store
        .appender
        .append(a)
        .await
        .map_err(StoreError::from)?;
    let created = CreatedTrigger {
        trigger: view(&state, t),
        secret: auth_given.credential_text().to_string(),
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

#[utoipa::path(get, operation_id = "listTriggers", path = "/v1/triggers", tag = "schedules",
    responses((status = 200, body = Page<TriggerView>)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Page<TriggerView>>, ApiError> {
    auth.require(Role::Read)?;
    let items = store::triggers::list(&state.store.pool, auth.namespace())
        .await?
        .into_iter()
        .map(|t| view(&state, t))
        .collect();
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

async fn load(state: &AppState, auth: &Auth, id: &str) -> Result<Trigger, ApiError> {
    let uid: Uuid = id
        .parse()
        .map_err(|_| ApiError::NotFound(format!("no trigger `{id}`")))?;
    store::triggers::get(&state.store.pool, auth.namespace(), uid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no trigger `{id}`")))
}

#[utoipa::path(get, operation_id = "getTrigger", path = "/v1/triggers/{id}", tag = "schedules", params(("id" = String, Path)),
    responses((status = 200, body = TriggerView), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<TriggerView>, ApiError> {
    auth.require(Role::Read)?;
    Ok(Json(view(&state, load(&state, &auth, &id).await?)))
}

#[utoipa::path(delete, operation_id = "deleteTrigger", path = "/v1/triggers/{id}", tag = "schedules", params(("id" = String, Path)),
    responses((status = 204, description = "deleted; its hook answers 404 from now on")), security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Submit)?;
    let id: Uuid = id
        .parse()
        .map_err(|_| ApiError::NotFound(format!("no trigger `{id}`")))?;
    command::execute::<Trigger, _, Infallible, _>(
        &state.store,
        auth.namespace(),
        id,
        &auth.metadata(),
        |_| Ok((vec![TriggerEvent::TriggerDeleted {}], ())),
    )
    .await
    .map_err(|e| ApiError::from_command(e, "trigger", id))?;
    Ok(StatusCode::NO_CONTENT)
}
