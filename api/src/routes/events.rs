//! `GET /v1/events`: the event firehose of the caller's namespace, as JSON pages or SSE.
//!
//! JSON reads the log gap-safely from `?after=` (filters pushed into SQL); SSE joins this
//! process's tailer ([`crate::firehose`]) after catching up from `Last-Event-ID` / `?after=`.

use axum::{
    body::Body,
    extract::{RawQuery, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use capibara_shared::{
    domain::{auth::Role, event::EventEnvelope, event::StreamType, kinds},
    store::{
        self,
        events::{LogCursor, LogFilter},
        StoreError,
    },
};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    error::ApiError,
    extract::{parse_limit, query_pairs, wants_sse},
    firehose::{self, Start},
    routes::jobs::Page,
    streams::Slot,
    AppState,
};

/// Events a JSON request scans at most (matching or not) before it answers.
const SCAN_LIMIT: i64 = 5000;

/// The parsed query of `GET /v1/events`.
struct Query {
    filter: LogFilter,
    /// `(parameter or header name, event id)`.
    after: Option<(&'static str, i64)>,
    limit: i64,
}

fn once(slot: &mut Option<String>, name: &str, v: String) -> Result<(), ApiError> {
    if slot.replace(v).is_some() {
        return Err(ApiError::field(name, "may be given only once"));
    }
    Ok(())
}

fn parse_id(name: &'static str, v: &str) -> Result<(&'static str, i64), ApiError> {
    v.trim()
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .map(|n| (name, n))
        .ok_or_else(|| ApiError::field(name, "must be an event id returned by this API"))
}

fn valid_type_name(t: &str) -> bool {
    t.len() <= 64
        && t.starts_with(|c: char| c.is_ascii_uppercase())
        && t.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn parse_query(headers: &HeaderMap, raw: Option<&str>) -> Result<Query, ApiError> {
    let mut filter = LogFilter::default();
    let (mut after, mut limit, mut stream_type, mut kind) = (None, None, None, None);
    for (k, v) in query_pairs(raw)? {
        match k.as_str() {
            "after" | "cursor" => once(&mut after, "after", v)?,
            "limit" => once(&mut limit, "limit", v)?,
            "stream_type" => once(&mut stream_type, "stream_type", v)?,
            "kind" => once(&mut kind, "kind", v)?,
            // A stream token (`crate::stream_tokens`), already checked by the extractor.
            "token" => {}
            "types" => {
                for t in v.split(',').map(str::trim) {
                    if !valid_type_name(t) {
                        return Err(ApiError::field(
                            "types",
                            format!("`{t}` is not an event type (a comma-separated list such as JobSucceeded,JobFailed)"),
                        ));
                    }
                    if !filter.types.iter().any(|x| x == t) {
                        filter.types.push(t.to_string());
                    }
                }
            }
            "tag" => {
                let (tk, tv) = v
                    .split_once(':')
                    .filter(|(tk, _)| !tk.is_empty())
                    .ok_or_else(|| ApiError::field("tag", "must look like key:value"))?;
                filter.tags.push((tk.to_string(), tv.to_string()));
            }
            other => {
                return Err(ApiError::field(
                    other,
                    "unknown query parameter (types, stream_type, kind, tag, after, limit)",
                ))
            }
        }
    }
    if let Some(st) = stream_type {
        let st: StreamType = st
            .parse()
            .map_err(|e: String| ApiError::field("stream_type", e))?;
        filter.stream_type = Some(st.as_str().to_string());
    }
    if let Some(kind) = kind {
        // A built-in kind, or a well-formed user kind name (registered or not: its events are
        // what the log holds).
        if kinds::find(&kind).is_none() && kinds::user::validate_name(&kind).is_err() {
            return Err(ApiError::field(
                "kind",
                format!(
                    "unknown kind `{kind}`; available: {} and user kinds (GET /v1/kinds)",
                    kinds::names().join(", ")
                ),
            ));
        }
        filter.kind = Some(kind);
    }
    let from_header = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("-").to_string());
    let after = match (from_header, after) {
        (Some(h), _) => Some(parse_id("Last-Event-ID", &h)?),
        (None, Some(q)) => Some(parse_id("after", &q)?),
        (None, None) => None,
    };
    Ok(Query {
        filter,
        after,
        limit: parse_limit(limit.as_deref())?,
    })
}

/// The cursor just after event `id` (0 = the start of the log).
async fn cursor_after(
    state: &AppState,
    (name, id): (&'static str, i64),
) -> Result<LogCursor, ApiError> {
    match LogCursor::after_position(&state.store.pool, id).await {
        Ok(c) => Ok(c),
        Err(StoreError::NotFound) => Err(ApiError::field(
            name,
            format!("`{id}` is not an event id of this log"),
        )),
        Err(e) => Err(e.into()),
    }
}

#[utoipa::path(get, operation_id = "listEvents", path = "/v1/events", tag = "events",
    params(("types" = Option<String>, Query, pattern = "^[A-Z][A-Za-z0-9]{0,63}(,[A-Z][A-Za-z0-9]{0,63})*$", description = "comma-separated event types, e.g. JobSucceeded,JobFailed"),
           ("stream_type" = Option<String>, Query, pattern = "^(job|run|workflow|schedule|trigger|delivery|model|kind|connector)$", description = "job, run, workflow, schedule, trigger, delivery, model, kind or connector"),
           ("kind" = Option<String>, Query, description = "job kind (job events)"),
           ("tag" = Option<String>, Query, pattern = "^[^:]+:", description = "k:v, repeatable; every one must match (job events)"),
           ("after" = Option<i64>, Query, minimum = 0, description = "an event id: continue after it (JSON: default the start of the log; SSE: default live events only)"),
           ("Last-Event-ID" = Option<i64>, Header, minimum = 0, description = "SSE resume; takes precedence over `after`"),
           ("limit" = Option<i64>, Query, minimum = 1, maximum = 500, description = "JSON page size, 1-500 (default 50)")),
    responses((status = 200, description = "JSON page (`next_cursor`: pass as `after` to continue; the firehose never ends), \
                or text/event-stream with Accept: text/event-stream (never closes by itself)",
               body = Page<EventEnvelope>),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    crate::stream_tokens::StreamAuth(auth): crate::stream_tokens::StreamAuth,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    auth.require(Role::Read)?;
    let mut query = parse_query(&headers, q.as_deref())?;
    query.filter.namespace = Some(auth.namespace().to_string());
    let cursor = match query.after {
        Some(a) => Some(cursor_after(&state, a).await?),
        None => None,
    };
    if wants_sse(&headers) {
        let slot = state.streams.acquire(auth.key.id)?;
        return sse(state, slot, query.filter, cursor).await;
    }
    let page = store::events::read_all_filtered(
        &state.store.pool,
        cursor.unwrap_or_default(),
        &query.filter,
        query.limit,
        SCAN_LIMIT,
    )
    .await?;
    let next_cursor = (page.next.position > 0).then(|| page.next.position.to_string());
    let items = page.events.into_iter().map(|(_, e)| e).collect();
    Ok(Json(Page { items, next_cursor }).into_response())
}

/// Subscribe before answering (so the stream has no gap from the moment the headers arrive),
/// then follow in a task that ends when the client goes away (and frees `slot`).
async fn sse(
    state: AppState,
    slot: Slot,
    filter: LogFilter,
    cursor: Option<LogCursor>,
) -> Result<Response, ApiError> {
    let (rx, published) = state.firehose.subscribe().await?;
    let start = cursor.map_or(Start::Now, Start::After);
    let (tx, out) = tokio::sync::mpsc::channel::<firehose::Frame>(state.firehose.client_queue());
    let follow = firehose::follow(
        state.firehose.pool().clone(),
        filter,
        start,
        rx,
        published,
        tx,
    );
    tokio::spawn(async move {
        let _slot = slot;
        follow.await
    });
    let mut res = Response::new(Body::from_stream(ReceiverStream::new(out)));
    *res.status_mut() = StatusCode::OK;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(res)
}
