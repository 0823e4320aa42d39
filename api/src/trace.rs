//! Each request runs in a span that continues the client's W3C `traceparent` (when traces are
//! exported), so a job it submits records that trace ([`capibara_shared::trace_context`]).

use axum::{extract::Request, middleware::Next, response::Response};
use capibara_shared::trace_context;
use tracing::Instrument;

pub async fn continue_trace(req: Request, next: Next) -> Response {
    let incoming = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| trace_context::valid(v))
        .map(str::to_string);
    if !trace_context::exporting() {
        // Nothing would read a span: only the client's context is passed along.
        return trace_context::with_incoming(incoming, next.run(req)).await;
    }
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format!("{} {}", req.method(), route_of(req.uri().path())),
        otel.kind = "server",
        http.request.method = %req.method(),
        url.path = %req.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    trace_context::adopt(&span, incoming.as_deref());
    let res = trace_context::with_incoming(incoming, next.run(req).instrument(span.clone())).await;
    span.record("http.response.status_code", res.status().as_u16());
    res
}

/// A path with its ids replaced (`/v1/jobs/{id}`), so span names stay few.
fn route_of(path: &str) -> String {
    path.split('/')
        .map(|seg| match uuid::Uuid::parse_str(seg) {
            Ok(_) => "{id}",
            Err(_) => seg,
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_leave_the_span_name() {
        assert_eq!(
            super::route_of("/v1/jobs/0193a5b0-0000-7000-8000-000000000000/events"),
            "/v1/jobs/{id}/events"
        );
        assert_eq!(super::route_of("/v1/jobs"), "/v1/jobs");
    }
}
