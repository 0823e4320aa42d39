//! `/healthz`, `/readyz` and `/metrics`, served by every binary. `/readyz` checks Postgres and
//! Redis, and reports the binary's background-loaded [`Components`] (503 while one is loading).

use axum::{
    extract::State,
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::json;
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use crate::{problem::Problem, queue::Queue, store::Store};

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    pub store: Store,
    pub queue: Queue,
    /// Parts of this binary that get ready in the background (a worker's TTS voice).
    pub components: Components,
}

/// Where a background-loaded part of a binary stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentState {
    /// Still loading: `/readyz` answers 503 until it is done.
    Loading,
    Ready,
    /// Could not be loaded; reported, but the binary stays ready for its other work.
    Failed(String),
}

/// Background-loaded parts of a binary by name (`tts_voice`), as `/readyz` reports them.
#[derive(Clone, Default)]
pub struct Components(Arc<Mutex<BTreeMap<String, ComponentState>>>);

impl Components {
    pub fn set(&self, name: &str, state: ComponentState) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), state);
    }

    pub fn get(&self, name: &str) -> Option<ComponentState> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn snapshot(&self) -> BTreeMap<String, ComponentState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
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
    let mut body = json!({
        "postgres": if pg.is_ok() { "ok" } else { "unavailable" },
        "redis": if redis.is_ok() { "ok" } else { "unavailable" },
    });
    let mut loading = false;
    for (name, state) in r.components.snapshot() {
        body[name] = match state {
            ComponentState::Loading => {
                loading = true;
                json!("loading")
            }
            ComponentState::Ready => json!("ok"),
            ComponentState::Failed(e) => json!({"status": "failed", "error": e}),
        };
    }
    if pg.is_ok() && redis.is_ok() && !loading {
        (StatusCode::OK, Json(body)).into_response()
    } else {
        let detail = if loading && pg.is_ok() && redis.is_ok() {
            "still loading"
        } else {
            "a dependency is not reachable"
        };
        let mut res = Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
            .with_extensions([("checks".to_string(), body)].into_iter().collect());
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        res
    }
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::render_metrics(),
    )
        .into_response()
}
