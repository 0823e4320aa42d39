//! Capibara's HTTP API (axum). [`app`] builds the router so tests can serve it in-process;
//! `main.rs` only wires config, telemetry and shutdown.
//!
//! # Layout
//! - [`routes`]: one module per resource (`jobs`, `admin`).
//! - [`auth`]: API keys, roles, rate limits.
//! - [`extract`]: JSON bodies, `Prefer`, `Idempotency-Key`, query parsing — all failing as problems.
//! - [`error`]: the only place errors become HTTP responses (RFC 9457).
//! - [`wait`]: `Prefer: wait` on top of stream hints.
//! - [`openapi`]: the generated OpenAPI document and Swagger UI.
//! - [`stream_tokens`]: short-lived signed tokens for browser streams (`?token=`).
//! - [`ui`]: the web dashboard at `/ui`, embedded in the binary.
//! - [`mcp`]: the MCP server at `/mcp` (kinds and workflows as tools; jobs, runs, artifacts as
//!   resources).

pub mod auth;
pub mod error;
pub mod extract;
pub mod firehose;
pub mod handed_out;
pub mod kept_leases;
pub mod mcp;
pub mod openapi;
pub mod outbound;
pub mod routes;
pub mod stream_tokens;
pub mod streams;
pub mod trace;
pub mod ui;
pub mod wait;

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    extract::DefaultBodyLimit,
    routing::{get, post},
    Router,
};
use capibara_shared::{config::Config, hints::StreamWatch, ops, queue::Queue, store::Store};
use tokio::net::TcpListener;
use tower_http::{catch_panic::CatchPanicLayer, trace::TraceLayer};

use crate::error::ApiError;

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub queue: Queue,
    /// Wake-ups for `Prefer: wait` and SSE followers.
    pub watch: StreamWatch,
    pub config: Arc<Config>,
    pub keys: auth::KeyCache,
    pub limiter: auth::RateLimiter,
    /// Failed authentications per client address.
    pub auth_failures: auth::FailureLimiter,
    /// Open SSE streams per key.
    pub streams: streams::StreamSlots,
    /// This process's tailer of the global log, for `GET /v1/events` over SSE.
    pub firehose: firehose::Firehose,
    /// Where job artifacts are read from (`CAPIBARA_ARTIFACTS`); the error says why it could
    /// not be opened (artifact reads are then 503s).
    pub artifacts: Result<capibara_shared::artifacts::ArtifactStore, String>,
    /// Lease calls of protocol workers waiting on Redis (bounded).
    pub long_polls: routes::workers::LongPolls,
    /// Protocol workers and user kinds read recently (short-lived caches).
    pub known_workers: routes::workers::KnownWorkers,
    /// Jobs handed out by this process's lease calls, until their final report.
    pub kept_leases: Arc<kept_leases::KeptLeases>,
    /// Claims of attempts this process's lease calls handed out, waiting for their report.
    pub handed_out: Arc<handed_out::HandedOut>,
    pub user_kinds: routes::kinds::KnownKinds,
    /// The key that signs stream tokens (config, or loaded once from Postgres).
    pub stream_secret: stream_tokens::TokenSecret,
    /// The bound on jobs waiting for a worker (`CAPIBARA_MAX_BACKLOG`): requests that create
    /// work ask it first.
    pub backlog: capibara_shared::backlog::Backlog,
}

impl AppState {
    pub fn new(store: Store, queue: Queue, config: Arc<Config>) -> Self {
        let watch = StreamWatch::start(&queue);
        let keys = auth::KeyCache::new(config.admin_key.as_deref());
        keys.listen(&queue);
        Self {
            keys,
            limiter: auth::RateLimiter::new(config.rate_limit_rps),
            auth_failures: auth::FailureLimiter::per_minute(config.auth_failures_per_min),
            streams: streams::StreamSlots::new(config.sse_max_streams_per_key),
            firehose: firehose::Firehose::new(store.generic_pool().clone(), &watch),
            artifacts: capibara_shared::artifacts::ArtifactStore::open(&config.artifacts)
                .map_err(|e| e.to_string()),
            long_polls: Default::default(),
            known_workers: Default::default(),
            kept_leases: Default::default(),
            handed_out: Default::default(),
            user_kinds: Default::default(),
            stream_secret: Default::default(),
            backlog: capibara_shared::backlog::Backlog::new(store.pool.clone(), config.max_backlog),
            store,
            queue,
            watch,
            config,
        }
    }
}

/// The whole HTTP app.
pub fn app(state: AppState) -> Router {
    use routes::{
        admin, bulk, code, deliveries, jobs, kinds, orchestrate, schedules, subscriptions,
        triggers, workers,
    };
    let v1 = Router::new()
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/jobs/batch", post(jobs::submit_batch))
        .route("/v1/jobs/bulk", post(bulk::start))
        .route("/v1/jobs/bulk/{id}", get(bulk::get))
        .route(
            "/v1/jobs/{id}/artifacts/{name}",
            get(routes::artifacts::get).put(workers::upload_artifact),
        )
        .route("/v1/tts", post(routes::tts::render))
        .route("/v1/tts/voices", get(routes::tts::voices))
        .route("/v1/tts/stream", get(routes::tts::stream))
        .route(
            "/v1/workflows",
            post(routes::workflows::create).get(routes::workflows::list),
        )
        .route(
            "/v1/workflows/{id}",
            get(routes::workflows::get)
                .put(routes::workflows::update)
                .delete(routes::workflows::delete),
        )
        .route(
            "/v1/workflows/{id}/runs",
            post(routes::workflows::start_run),
        )
        .route("/v1/secrets", get(routes::secrets::list))
        .route(
            "/v1/secrets/{name}",
            axum::routing::put(routes::secrets::put).delete(routes::secrets::delete),
        )
        .route("/v1/runs", get(routes::runs::list))
        .route("/v1/runs/{id}", get(routes::runs::get))
        .route("/v1/runs/{id}/events", get(routes::runs::events))
        .route("/v1/runs/{id}/cancel", post(routes::runs::cancel))
        .route("/v1/runs/{id}/retry", post(routes::runs::retry))
        .route("/v1/runs/{id}/signals/{name}", post(routes::runs::signal))
        .route("/v1/jobs/{id}", get(jobs::get).delete(jobs::delete))
        .route("/v1/jobs/{id}/events", get(jobs::events))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/retry", post(jobs::retry))
        .route("/v1/jobs/{id}/heartbeat", post(workers::heartbeat))
        .route("/v1/jobs/{id}/progress", post(workers::progress))
        .route("/v1/jobs/{id}/logs", post(workers::logs))
        .route("/v1/jobs/{id}/chunks", post(workers::chunk))
        .route("/v1/jobs/{id}/complete", post(workers::complete))
        .route("/v1/jobs/{id}/fail", post(workers::fail))
        .route("/v1/jobs/{id}/release", post(workers::release))
        .route("/v1/events", get(routes::events::list))
        .route("/v1/stream-tokens", post(stream_tokens::create))
        .route("/v1/me", get(routes::me::get))
        .route("/v1/workers", get(admin::workers).post(workers::register))
        .route(
            "/v1/workers/{id}",
            axum::routing::delete(workers::deregister),
        )
        .route("/v1/workers/{id}/lease", post(workers::lease))
        .route("/v1/workers/{id}/complete", post(workers::complete_many))
        .route("/v1/queues", get(admin::queues))
        .route("/v1/queues/{name}/pause", post(routes::limits::pause_queue))
        .route(
            "/v1/queues/{name}/resume",
            post(routes::limits::resume_queue),
        )
        .route("/v1/kinds/{name}/pause", post(routes::limits::pause_kind))
        .route("/v1/kinds/{name}/resume", post(routes::limits::resume_kind))
        .route("/v1/limits", get(routes::limits::list))
        .route(
            "/v1/limits/{name}",
            get(routes::limits::get)
                .put(routes::limits::put)
                .delete(routes::limits::delete),
        )
        .route(
            "/v1/limits/{name}/keys/{key}/pause",
            post(routes::limits::pause_key),
        )
        .route(
            "/v1/limits/{name}/keys/{key}/resume",
            post(routes::limits::resume_key),
        )
        .route("/v1/pauses", get(routes::limits::pauses))
        .route(
            "/v1/connectors",
            post(routes::connectors::create).get(routes::connectors::list),
        )
        .route(
            "/v1/connectors/{id}",
            get(routes::connectors::get)
                .put(routes::connectors::update)
                .delete(routes::connectors::delete),
        )
        .route("/v1/connector-types", get(routes::connectors::list_types))
        .route("/v1/fine-tuning/start", post(routes::fine_tuning::start))
        .route(
            "/v1/fine-tuning/{id}/status",
            get(routes::fine_tuning::status),
        )
        .route("/v1/semantic/embed", post(routes::semantic::embed))
        .route("/v1/semantic/search", post(routes::semantic::search))
        .route("/v1/semantic/chunk", post(routes::semantic::chunk))
        .route("/v1/http/hosts", get(routes::http::hosts))
        .route("/v1/http/request", post(routes::http::request))
        .route(
            "/v1/http/stream-download",
            post(routes::http::stream_download),
        )
        .route("/v1/http/requests/{id}", get(routes::http::get_request))
        .route("/v1/http/metrics", get(routes::http::metrics))
        .route("/v1/http/health", get(routes::http::health))
        .route("/v1/llm/providers", get(routes::llm::list))
        .route(
            "/v1/llm/providers/{name}",
            get(routes::llm::get)
                .put(routes::llm::put)
                .delete(routes::llm::delete),
        )
        .route("/v1/models", get(routes::models::list))
        .route(
            "/v1/models/{ref}",
            get(routes::models::get).delete(routes::models::delete),
        )
        .route(
            "/v1/content/connectors/{family}",
            post(routes::content::seed_family),
        )
        .route(
            "/v1/content/connectors/web",
            post(routes::content::seed_web),
        )
        .route(
            "/v1/content/connectors/api",
            post(routes::content::seed_api),
        )
        .route("/v1/content/discover", post(routes::content::discover))
        .route("/v1/kinds", get(kinds::list))
        .route(
            "/v1/kinds/{name}",
            get(kinds::get).put(kinds::put).delete(kinds::delete),
        )
        .route(
            "/v1/api-keys",
            post(admin::create_key).get(admin::list_keys),
        )
        .route(
            "/v1/api-keys/{id}",
            axum::routing::delete(admin::revoke_key),
        )
        .route(
            "/v1/subscriptions",
            post(subscriptions::create).get(subscriptions::list),
        )
        .route(
            "/v1/subscriptions/{id}",
            get(subscriptions::get)
                .patch(subscriptions::update)
                .delete(subscriptions::delete),
        )
        .route("/v1/subscriptions/{id}/pause", post(subscriptions::pause))
        .route("/v1/subscriptions/{id}/resume", post(subscriptions::resume))
        .route("/v1/deliveries", get(deliveries::list))
        .route("/v1/deliveries/{id}", get(deliveries::get))
        .route("/v1/deliveries/{id}/redeliver", post(deliveries::redeliver))
        .route("/v1/orchestrate", post(orchestrate::orchestrate))
        .route("/mcp", post(mcp::post).get(mcp::get).delete(mcp::delete))
        .route("/v1/code/execute", post(code::execute))
        .route("/v1/code/validate", post(code::validate))
        .route("/v1/code/cache/stats", get(code::cache_stats))
        .route("/v1/code/cache", axum::routing::delete(code::cache_clear))
        .route(
            "/v1/schedules",
            post(schedules::create).get(schedules::list),
        )
        .route(
            "/v1/schedules/{id}",
            get(schedules::get)
                .patch(schedules::update)
                .delete(schedules::delete),
        )
        .route("/v1/schedules/{id}/pause", post(schedules::pause))
        .route("/v1/schedules/{id}/resume", post(schedules::resume))
        .route("/v1/schedules/{id}/trigger", post(schedules::trigger))
        .route("/v1/schedules/{id}/backfill", post(schedules::backfill))
        .route("/v1/triggers", post(triggers::create).get(triggers::list))
        .route(
            "/v1/triggers/{id}",
            get(triggers::get).delete(triggers::delete),
        )
        .with_state(state.clone());
    let spec = openapi::spec(state.config.as_ref());
    let router = Router::new()
        .merge(v1)
        .merge(ui::router())
        .merge(
            utoipa_swagger_ui::SwaggerUi::new("/docs")
                .external_url_unchecked("/openapi.json", spec),
        )
        .merge(ops::router(ops::Readiness {
            store: state.store.clone(),
            queue: state.queue.clone(),
            components: Default::default(),
        }))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { MethodNotAllowed })
        .layer(DefaultBodyLimit::max(state.config.body_limit_bytes))
        .layer(axum::middleware::from_fn(deadline))
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::Internal(anyhow::anyhow!(
                "handler panicked"
            )))
        }))
        .layer(axum::middleware::from_fn(error::log_internal_errors))
        .layer(axum::middleware::from_fn(trace::continue_trace))
        .layer(TraceLayer::new_for_http());
    // Same-origin only unless origins are configured: no CORS headers at all by default.
    match cors(&state.config.cors_origins) {
        Some(layer) => router.layer(layer),
        None => router,
    }
}

/// The longest a request may take to be answered (a long poll holds at most 60 s): past it,
/// a 503 problem with `Retry-After` instead of a connection held for ever by a stalled
/// dependency. Streams (SSE, WebSocket) are answered at once and not limited here.
const REQUEST_DEADLINE: Duration = Duration::from_secs(75);

async fn deadline(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match tokio::time::timeout(REQUEST_DEADLINE, next.run(req)).await {
        Ok(res) => res,
        Err(_) => axum::response::IntoResponse::into_response(ApiError::Overloaded {
            retry_after: Duration::from_secs(5),
            detail: format!(
                "no answer within {}s (a dependency is slow); retry later",
                REQUEST_DEADLINE.as_secs()
            ),
        }),
    }
}

/// The CORS layer for `CAPIBARA_CORS_ORIGINS` (none when the list is empty): those origins may
/// call every route with a bearer key; the answer names the one origin, never `*`.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{header, HeaderName, HeaderValue, Method};
    if origins.is_empty() {
        return None;
    }
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::ACCEPT,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("prefer"),
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([
                header::LOCATION,
                header::RETRY_AFTER,
                HeaderName::from_static("preference-applied"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

struct MethodNotAllowed;

impl axum::response::IntoResponse for MethodNotAllowed {
    fn into_response(self) -> axum::response::Response {
        capibara_shared::problem::Problem::for_status(
            axum::http::StatusCode::METHOD_NOT_ALLOWED,
            "this route does not accept that method",
        )
        .into_response()
    }
}

/// Serve until `shutdown` resolves; in-flight requests finish first. The listener's bounds
/// (header read timeout, connections at once, head size) are the config's `http`.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = state.config.http;
    capibara_shared::http_server::serve(listener, app(state), limits, shutdown).await
}
