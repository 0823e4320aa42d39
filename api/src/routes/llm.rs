//! `/v1/llm/providers`: the LLM providers `llm.generate` and `llm.chat` route to
//! (docs/llm.md), with each one's health: its circuit breaker and last call, as workers record
//! them, and with `?check=true` a probe made now.

use std::time::{Duration, Instant};

use axum::{
    extract::{Path, RawQuery, State},
    http::StatusCode,
    response::IntoResponse,
    Json,
};
use capibara_shared::{
    command::{self, llm_providers::ProviderError},
    domain::{
        auth::Role,
        llm::{self, LlmProvider, ProviderDef},
    },
    http_hosts::{HostBreakers, HostState},
    outbound, store,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    auth::Auth,
    error::ApiError,
    extract::{query_pairs, ApiJson},
    routes::jobs::Page,
    AppState,
};

/// How long a health probe may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

fn breakers(state: &AppState) -> HostBreakers {
    HostBreakers::new(
        state.queue.connection(),
        state.queue.prefix(),
        state.config.llm_breaker_failures,
        state.config.llm_breaker_cooldown,
    )
    .scoped("llm")
}

/// A probe of the provider made by this request (`?check=true`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ProviderCheck {
    /// It answered its model list with a 2xx status.
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub checked_at: DateTime<Utc>,
}

/// A provider's health.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ProviderHealth {
    /// The circuit breaker: `closed` (calls go), `open` (skipped until `open_until`) or
    /// `half_open` (one call is trying it).
    pub state: String,
    pub consecutive_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_until: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_success_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure_at: Option<DateTime<Utc>>,
    /// The last call's error, while the last call failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<ProviderCheck>,
}

impl ProviderHealth {
    fn from(state: Option<HostState>) -> Self {
        let s = state.unwrap_or(HostState {
            host: String::new(),
            state: "closed".into(),
            consecutive_failures: 0,
            open_until: None,
            last_failure_at: None,
            last_success_at: None,
            last_error: None,
            last_latency_ms: None,
            rate_limit: None,
        });
        ProviderHealth {
            state: s.state,
            consecutive_failures: s.consecutive_failures,
            open_until: s.open_until,
            last_success_at: s.last_success_at,
            last_failure_at: s.last_failure_at,
            last_error: s.last_error,
            last_latency_ms: s.last_latency_ms,
            check: None,
        }
    }
}

/// A provider as the API shows it: its definition, and its health.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ProviderInfo {
    pub name: String,
    /// What `PUT` set.
    pub definition: ProviderDef,
    pub health: ProviderHealth,
    /// The provider stream's version (one per change).
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl ProviderInfo {
    fn new(p: LlmProvider, health: ProviderHealth) -> Self {
        ProviderInfo {
            name: p.name,
            definition: p.definition,
            health,
            version: p.version,
            created_at: p.created_at,
            updated_at: p.updated_at,
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Probe each provider now (its model list, at most 5 s) and record the result in its
    /// circuit breaker.
    #[serde(default)]
    pub check: Option<bool>,
}

/// `?check=`: `true` or `false` (a 422 naming it otherwise; other parameters are ignored).
fn wants_check(raw: Option<&str>) -> Result<bool, ApiError> {
    let mut check = false;
    for (k, v) in query_pairs(raw)? {
        if k == "check" {
            check = match v.as_str() {
                "true" => true,
                "false" => false,
                _ => return Err(ApiError::field("check", "must be `true` or `false`")),
            };
        }
    }
    Ok(check)
}

/// Probe `p`: `GET` its model list through the outbound guard (the address resolved, checked
/// and pinned; no redirects), with its key.
async fn check(state: &AppState, namespace: &str, p: &LlmProvider) -> ProviderCheck {
    let started = Instant::now();
    let result = async {
        let url = p.definition.endpoint("models");
        let parsed = outbound::parse_url(&url).map_err(|e| e.to_string())?;
        let addrs = outbound::resolve(&parsed, state.config.outbound_allow_private)
            .await
            .map_err(|e| e.to_string())?;
        let key = match &p.definition.api_key_secret {
            Some(name) => Some(
                store::secrets::values(&state.store.pool, namespace, std::slice::from_ref(name))
                    .await
                    .map_err(|e| e.to_string())?
                    .remove(name)
                    .ok_or_else(|| format!("its api_key_secret `{name}` does not exist"))?,
            ),
            None => None,
        };
        let client = reqwest::Client::builder()
            .resolve_to_addrs(parsed.host_str().unwrap_or_default(), &addrs)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(CHECK_TIMEOUT)
            .build()
            .map_err(|e| e.to_string())?;
        let mut req = client.get(parsed);
        for (k, v) in p.definition.auth_headers(key.as_deref()) {
            req = req.header(k, v);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_timeout() {
                "no answer in time".to_string()
            } else {
                format!("no connection: {e}")
            }
        })?;
        Ok::<u16, String>(resp.status().as_u16())
    }
    .await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (ok, status, error) = match result {
        Ok(s) if (200..300).contains(&s) => (true, Some(s), None),
        Ok(s) => (false, Some(s), Some(format!("answered {s}"))),
        Err(e) => (false, None, Some(e)),
    };
    let b = breakers(state);
    if b.record(namespace, &p.name, ok).await.is_ok() {
        let _ = b
            .note(namespace, &p.name, error.as_deref(), latency_ms)
            .await;
    }
    ProviderCheck {
        ok,
        status,
        latency_ms,
        error,
        checked_at: Utc::now(),
    }
}

/// `providers` with their health (and, with `probe`, a check of each, made at once).
async fn with_health(
    state: &AppState,
    namespace: &str,
    providers: Vec<LlmProvider>,
    probe: bool,
) -> Result<Vec<ProviderInfo>, ApiError> {
    let checks: Vec<Option<ProviderCheck>> = if probe {
        futures::future::join_all(
            providers
                .iter()
                .map(|p| async move { Some(check(state, namespace, p).await) }),
        )
        .await
    } else {
        vec![None; providers.len()]
    };
    let mut states = breakers(state)
        .list(namespace)
        .await
        .map_err(|_| ApiError::Unavailable)?;
    Ok(providers
        .into_iter()
        .zip(checks)
        .map(|(p, check)| {
            let found = states
                .iter()
                .position(|s| s.host == p.name)
                .map(|i| states.swap_remove(i));
            let mut health = ProviderHealth::from(found);
            health.check = check;
            ProviderInfo::new(p, health)
        })
        .collect())
}

#[utoipa::path(get, operation_id = "listLlmProviders", path = "/v1/llm/providers", tag = "llm",
    params(ListParams),
    responses((status = 200, body = Page<ProviderInfo>), (status = 422, body = crate::error::Problem),
              (status = 503, body = crate::error::Problem)),
    security(("bearer" = [])))]
/// The namespace's LLM providers, by name, with each one's health.
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
    RawQuery(query): RawQuery,
) -> Result<Json<Page<ProviderInfo>>, ApiError> {
    auth.require(Role::Read)?;
    let probe = wants_check(query.as_deref())?;
    let providers = store::llm_providers::list(&state.store.pool, auth.namespace()).await?;
    let items = with_health(&state, auth.namespace(), providers, probe).await?;
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

async fn find(state: &AppState, namespace: &str, name: &str) -> Result<LlmProvider, ApiError> {
    store::llm_providers::get(
        &state.store.pool,
        namespace,
        llm::stream_id(namespace, name),
    )
    .await?
    .filter(|p| !p.deleted)
    .ok_or_else(|| ApiError::NotFound(format!("no LLM provider `{name}`")))
}

#[utoipa::path(get, operation_id = "getLlmProvider", path = "/v1/llm/providers/{name}", tag = "llm",
    params(("name" = String, Path), ListParams),
    responses((status = 200, body = ProviderInfo), (status = 404, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<ProviderInfo>, ApiError> {
    auth.require(Role::Read)?;
    let probe = wants_check(query.as_deref())?;
    let p = find(&state, auth.namespace(), &name).await?;
    let mut items = with_health(&state, auth.namespace(), vec![p], probe).await?;
    Ok(Json(items.pop().expect("one provider in, one out")))
}

#[utoipa::path(put, operation_id = "putLlmProvider", path = "/v1/llm/providers/{name}", tag = "llm",
    params(("name" = String, Path, pattern = "^[a-z][a-z0-9_-]{0,63}$")), request_body = ProviderDef,
    responses((status = 201, description = "configured", body = ProviderInfo),
              (status = 200, description = "replaced (or unchanged)", body = ProviderInfo),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
/// Configure a provider (an admin key): its protocol, base URL, models, key (a secret's name),
/// priority, timeout and prices.
pub async fn put(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    body: ApiJson<ProviderDef>,
) -> Result<impl IntoResponse, ApiError> {
    auth.require(Role::Admin)?;
    llm::validate_name(&name)?;
    let definition = body.value;
    definition.validate()?;
    crate::outbound::check_url("base_url", &definition.base_url, &state.config).await?;
    let meta = auth.metadata();
    let (provider, created) = command::llm_providers::put(&state.store, &meta, &name, definition)
        .await
        .map_err(|e| ApiError::from_command(e, "LLM provider", uuid::Uuid::nil()))?;
    let mut items = with_health(&state, auth.namespace(), vec![provider], false).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(items.pop().expect("one provider in, one out"))))
}

#[utoipa::path(delete, operation_id = "deleteLlmProvider", path = "/v1/llm/providers/{name}", tag = "llm",
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
    command::llm_providers::delete(&state.store, &meta, &name)
        .await
        .map_err(|e| ApiError::from_command(e, "LLM provider", uuid::Uuid::nil()))?;
    Ok(StatusCode::NO_CONTENT)
}

impl From<ProviderError> for ApiError {
    fn from(e: ProviderError) -> Self {
        match e {
            ProviderError::NotFound(_) => ApiError::NotFound(e.to_string()),
        }
    }
}
