//! `/v1/http/*` (docs/http.md): the circuit breaker of each host that this namespace's
//! `http.request` jobs called (`/hosts`), and the seed endpoints: `POST /request` and
//! `/stream-download` submit an `http.request` job with the body as its input and answer it,
//! `GET /requests/{id}` reads one, `/metrics` and `/health` sum them up.

use std::collections::BTreeMap;

use axum::{
    extract::{Path, State},
    http::HeaderMap,
    response::Response,
    Json,
};
use capibara_shared::{
    domain::auth::Role,
    http_hosts::{HostBreakers, HostState},
    store,
};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{
    auth::Auth,
    error::ApiError,
    extract::{prefer_wait, ApiJson},
    routes::jobs::{answer, run_kind, Page},
    AppState,
};

const KIND: &str = "http.request";

fn breakers(state: &AppState) -> HostBreakers {
    HostBreakers::new(
        state.queue.connection(),
        state.queue.prefix(),
        state.config.http_breaker_failures,
        state.config.http_breaker_cooldown,
    )
}

#[utoipa::path(get, operation_id = "listHttpHosts", path = "/v1/http/hosts", tag = "http",
    responses((status = 200, body = Page<HostState>), (status = 503, body = crate::error::Problem)),
    security(("bearer" = [])))]
/// The hosts `http.request` jobs of this namespace called (in the last day), with the state of
/// each one's circuit breaker.
pub async fn hosts(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Page<HostState>>, ApiError> {
    auth.require(Role::Read)?;
    let items = breakers(&state)
        .list(auth.namespace())
        .await
        .map_err(|_| ApiError::Unavailable)?;
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[utoipa::path(post, operation_id = "httpRequest", path = "/v1/http/request", tag = "http",
    request_body(content = Object, description = "an `http.request` input"),
    params(("Prefer" = Option<String>, Header, description = "wait=N: wait up to N seconds (≤ 60; default 30) for the answer"),
           ("Idempotency-Key" = Option<String>, Header, description = "replays return the same job")),
    responses((status = 200, description = "done within the wait: the job, its output the answer", body = capibara_shared::domain::job::Job),
              (status = 202, description = "still running; see Location", body = capibara_shared::domain::job::Job),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
/// One call as an `http.request` job, answered when it is done (or `202` while it runs).
pub async fn request(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    body: ApiJson<Map<String, Value>>,
) -> Result<Response, ApiError> {
    run_kind(&state, &auth, &headers, KIND, body, "HttpRequest").await
}

#[utoipa::path(post, operation_id = "httpStreamDownload", path = "/v1/http/stream-download", tag = "http",
    request_body(content = Object, description = "an `http.request` input without `response` (the body always goes to the artifact)"),
    params(("Prefer" = Option<String>, Header, description = "wait=N: wait up to N seconds (≤ 60; default 30)"),
           ("Idempotency-Key" = Option<String>, Header, description = "replays return the same job")),
    responses((status = 200, description = "downloaded within the wait: the job, its artifact", body = capibara_shared::domain::job::Job),
              (status = 202, description = "still downloading; see Location (progress in its events)", body = capibara_shared::domain::job::Job),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
/// A download into the job's artifact (`response: artifact`), with progress.
pub async fn stream_download(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    mut body: ApiJson<Map<String, Value>>,
) -> Result<Response, ApiError> {
    if body.value.contains_key("response") {
        return Err(ApiError::field(
            "response",
            "a stream-download always stores the body as an artifact; leave `response` out",
        ));
    }
    body.value
        .insert("response".into(), Value::from("artifact"));
    run_kind(&state, &auth, &headers, KIND, body, "HttpStreamDownload").await
}

#[utoipa::path(get, operation_id = "getHttpRequest", path = "/v1/http/requests/{id}", tag = "http",
    params(("id" = String, Path), ("Prefer" = Option<String>, Header, description = "wait=N")),
    responses((status = 200, body = capibara_shared::domain::job::Job), (status = 202, body = capibara_shared::domain::job::Job),
              (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
/// An `http.request` job (what `/request` and `/stream-download` answered).
pub async fn get_request(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require(Role::Read)?;
    let wait = prefer_wait(&headers)?;
    let not_found = || ApiError::NotFound(format!("no http request `{id}`"));
    let job_id: uuid::Uuid = id.parse().map_err(|_| not_found())?;
    let job = store::jobs::get(&state.store.pool, auth.namespace(), job_id)
        .await?
        .filter(|j| j.kind == KIND)
        .ok_or_else(not_found)?;
    answer(&state, &auth, job, wait).await
}

/// `GET /v1/http/metrics`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HttpMetrics {
    /// This namespace's `http.request` jobs by status.
    pub requests: BTreeMap<String, i64>,
    /// Its hosts' breakers by state (`closed`, `open`, `half_open`).
    pub breakers: BTreeMap<String, i64>,
}

#[utoipa::path(get, operation_id = "getHttpMetrics", path = "/v1/http/metrics", tag = "http",
    responses((status = 200, body = HttpMetrics), (status = 503, body = crate::error::Problem)),
    security(("bearer" = [])))]
/// Counts of this namespace's calls and breakers (the workers' `/metrics` have the rates).
pub async fn metrics(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<HttpMetrics>, ApiError> {
    auth.require(Role::Read)?;
    let requests = store::jobs::count_by_status(&state.store.pool, auth.namespace(), KIND)
        .await?
        .into_iter()
        .collect();
    let mut by_state = BTreeMap::new();
    for h in breakers(&state)
        .list(auth.namespace())
        .await
        .map_err(|_| ApiError::Unavailable)?
    {
        *by_state.entry(h.state).or_insert(0) += 1;
    }
    Ok(Json(HttpMetrics {
        requests,
        breakers: by_state,
    }))
}

/// `GET /v1/http/health`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HttpHealth {
    /// `ok`, or `degraded` while a host's breaker is not closed.
    pub status: String,
    /// The hosts whose breaker is open or half-open.
    pub failing_hosts: Vec<HostState>,
}

#[utoipa::path(get, operation_id = "getHttpHealth", path = "/v1/http/health", tag = "http",
    responses((status = 200, body = HttpHealth), (status = 503, body = crate::error::Problem)),
    security(("bearer" = [])))]
/// Whether this namespace's calls go through: `degraded` with the hosts whose breaker is open.
pub async fn health(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<HttpHealth>, ApiError> {
    auth.require(Role::Read)?;
    let failing_hosts: Vec<HostState> = breakers(&state)
        .list(auth.namespace())
        .await
        .map_err(|_| ApiError::Unavailable)?
        .into_iter()
        .filter(|h| h.state != "closed")
        .collect();
    Ok(Json(HttpHealth {
        status: if failing_hosts.is_empty() {
            "ok"
        } else {
            "degraded"
        }
        .into(),
        failing_hosts,
    }))
}
