//! `/healthz`, `/readyz` and `/metrics`, served by every binary.

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::json;

use crate::{queue::Queue, store::Store};

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    pub store: Store,
    pub queue: Queue,
}

/// Routes for health and metrics.
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(readiness)
}

async fn readyz(State(r): State<Readiness>) -> Response {
    let (pg, redis) = tokio::join!(r.store.ping(), r.queue.ping());
    let body = json!({
        "postgres": if pg.is_ok() { "ok" } else { "unavailable" },
        "redis": if redis.is_ok() { "ok" } else { "unavailable" },
    });
    if pg.is_ok() && redis.is_ok() {
        (StatusCode::OK, Json(body)).into_response()
    } else {
        let mut problem = json!({
            "type": "urn:capibara:problem:unavailable",
            "title": "Service Unavailable",
            "status": 503,
            "detail": "a dependency is not reachable",
        });
        problem["checks"] = body;
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [
                (header::CONTENT_TYPE, "application/problem+json"),
                (header::RETRY_AFTER, "1"),
            ],
            problem.to_string(),
        )
            .into_response()
    }
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::metrics_handle().render(),
    )
        .into_response()
}
