//! The MCP server at `/mcp` (docs/mcp.md, docs/mcp-design.md): Capibara's kinds and
//! workflows as tools, its jobs, runs and artifacts as resources, over the streamable HTTP
//! transport, authenticated by API key like every other route.
//!
//! The server keeps no session state: `initialize` hands out an `Mcp-Session-Id` (clients
//! send it back), but every request is answered from the API key and the event store alone,
//! so any API process can answer any request and a restart loses nothing. A `tools/call` with
//! a `progressToken` is answered as an SSE stream (progress notifications, then the
//! response); everything else as one JSON body. `GET /mcp` is 405: the server never sends
//! requests of its own.
//!
//! # Layout
//! - [`protocol`]: JSON-RPC messages, error codes, version negotiation.
//! - [`tools`]: `tools/list` and `tools/call` (submit, wait with progress, answer).
//! - [`resources`]: `resources/list`, `resources/templates/list`, `resources/read`.

pub mod protocol;
pub mod resources;
pub mod tools;

use std::{convert::Infallible, time::Duration};

use axum::{
    body::Bytes,
    extract::State,
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    Json,
};
use futures::StreamExt;
use serde_json::{json, Value};

use self::protocol::{Incoming, RpcError, METHOD_NOT_FOUND};
use crate::{auth::Auth, AppState};

/// The session header.
const SESSION: &str = "mcp-session-id";

/// The wait a call asked for in `_meta["capibara/wait_s"]`, at most the configured one.
fn wait_of(state: &AppState, params: &Value) -> Duration {
    let most = state.config.mcp_wait;
    match params
        .pointer("/_meta/capibara~1wait_s")
        .and_then(Value::as_f64)
    {
        Some(s) if s.is_finite() && s >= 0.0 => most.min(Duration::from_secs_f64(s)),
        _ => most,
    }
}

/// Whether the client accepts an event stream.
fn accepts_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

/// Answer one request (not `tools/call` with progress, which [`post`] streams).
async fn answer(state: &AppState, auth: &Auth, m: &Incoming) -> Result<Value, RpcError> {
    let method = m.method.as_deref().unwrap_or_default();
    metrics::counter!("capibara_mcp_requests_total", "method" => method_label(method)).increment(1);
    match method {
        "initialize" => {
            let asked = m.params["protocolVersion"].as_str();
            Ok(json!({
                "protocolVersion": protocol::negotiate(asked),
                "capabilities": {"tools": {"listChanged": false},
                                 "resources": {"subscribe": false, "listChanged": false}},
                "serverInfo": {"name": "capibara", "title": "Capibara",
                               "version": env!("CARGO_PKG_VERSION")},
                "instructions": "Capibara runs jobs and workflows. Each tool submits one \
                    (a kind or `workflow.<name>`) and answers its output; a long one answers a \
                    handle and a resource_link (capibara://jobs/{id} or capibara://runs/{id}) \
                    to read later."
            }))
        }
        "ping" => Ok(json!({})),
        "tools/list" => tools::list(state, auth).await,
        "tools/call" => tools::call(state, auth, &m.params, wait_of(state, &m.params), None).await,
        "resources/list" => resources::list(state, auth).await,
        "resources/templates/list" => {
            auth.require(capibara_shared::domain::auth::Role::Read)?;
            Ok(resources::templates())
        }
        "resources/read" => resources::read(state, auth, &m.params).await,
        other => Err(RpcError::new(
            METHOD_NOT_FOUND,
            format!("Method not found: {other}"),
        )),
    }
}

/// The metric label of a method (unknown ones grouped, so labels stay few).
fn method_label(method: &str) -> &'static str {
    match method {
        "initialize" => "initialize",
        "ping" => "ping",
        "tools/list" => "tools/list",
        "tools/call" => "tools/call",
        "resources/list" => "resources/list",
        "resources/templates/list" => "resources/templates/list",
        "resources/read" => "resources/read",
        _ => "other",
    }
}

fn json_response(body: Value) -> Response {
    (StatusCode::OK, Json(body)).into_response()
}

/// `POST /mcp`: one JSON-RPC message.
pub async fn post(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let m = match Incoming::parse(&body) {
        Ok(m) => m,
        Err(e) => {
            let mut r = json_response(protocol::response(&Value::Null, Err(e)));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return r;
        }
    };
    // Notifications (and responses) are accepted with nothing to say.
    let Some(id) = m.id.clone() else {
        return StatusCode::ACCEPTED.into_response();
    };
    if m.method.is_none() {
        return StatusCode::ACCEPTED.into_response();
    }
    let streamed = m.method.as_deref() == Some("tools/call") && accepts_sse(&headers);
    if let (true, Some(token)) = (streamed, m.progress_token()) {
        metrics::counter!("capibara_mcp_requests_total", "method" => "tools/call").increment(1);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
        let wait = wait_of(&state, &m.params);
        tokio::spawn(async move {
            let progress = tools::Progress::new(token, tx.clone());
            let reply = tools::call(&state, &auth, &m.params, wait, Some(progress)).await;
            let _ = tx.send(protocol::response(&id, reply));
        });
        let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
            .map(|v| Ok::<_, Infallible>(Event::default().event("message").data(v.to_string())));
        return Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    let reply = answer(&state, &auth, &m).await;
    let mut r = json_response(protocol::response(&id, reply));
    if m.method.as_deref() == Some("initialize") {
        let session = format!("{:032x}", rand::random::<u128>());
        if let Ok(v) = HeaderValue::from_str(&session) {
            r.headers_mut().insert(SESSION, v);
        }
    }
    r
}

/// `GET /mcp`: no server-initiated stream (the transport allows a 405).
pub async fn get(_auth: Auth) -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "POST, DELETE")],
    )
        .into_response()
}

/// `DELETE /mcp`: end a session (there is no state to drop).
pub async fn delete(_auth: Auth) -> StatusCode {
    StatusCode::NO_CONTENT
}
