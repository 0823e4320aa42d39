//! W3C trace context across Capibara's hops (docs/observability.md "Traces"): a submitting HTTP
//! request's `traceparent` is recorded with the job (`Submission::traceparent`), and the worker's
//! attempt, the SDK workers (the job's `traceparent` field), push endpoints and callbacks (a
//! `traceparent` header) continue that trace.
//!
//! With `CAPIBARA_OTLP_ENDPOINT` set, spans are exported over OTLP and the recorded context is
//! the current span's (so an attempt is a child of the request that submitted it). Without it no
//! span is recorded, and a request's own `traceparent` is passed along unchanged.

use std::{collections::HashMap, sync::OnceLock};

use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The exporter's provider, when traces are exported.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

tokio::task_local! {
    /// The `traceparent` a request came with, while it is handled (exporting off).
    static INCOMING: Option<String>;
}

/// Whether spans are exported (and so have contexts of their own).
pub fn exporting() -> bool {
    PROVIDER.get().is_some()
}

/// The exporter's layer for the log subscriber: `None` unless `endpoint` is set. Spans go to
/// `{endpoint}/v1/traces` (OTLP over HTTP, protobuf) in batches, named `service`.
pub fn layer<S>(endpoint: Option<&str>, service: &str) -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let endpoint = endpoint.filter(|e| !e.is_empty())?;
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let service = service.to_string();
    // The exporter's blocking HTTP client may not be built on an async runtime's thread.
    let built = std::thread::spawn(move || {
        use opentelemetry_otlp::WithExportConfig;
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(url)
            .build()
            .map(|exporter| {
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name(service)
                            .build(),
                    )
                    .build()
            })
    })
    .join()
    .expect("the exporter's builder thread");
    let provider = match built {
        Ok(p) => p,
        Err(e) => {
            eprintln!("CAPIBARA_OTLP_ENDPOINT: traces not exported: {e}");
            return None;
        }
    };
    let tracer = provider.tracer("capibara");
    let _ = PROVIDER.set(provider);
    Some(tracing_opentelemetry::layer().with_tracer(tracer))
}

/// Export what is buffered and stop the exporter (at shutdown; blocks up to a few seconds).
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let p = p.clone();
        let _ = std::thread::spawn(move || p.shutdown()).join();
    }
}

/// Continue the trace `traceparent` names in `span` (a malformed value starts a new trace).
pub fn adopt(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent.filter(|_| exporting()) else {
        return;
    };
    let carrier = HashMap::from([("traceparent".to_string(), tp.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The `traceparent` to record or send from here: the current span's when exporting, else the
/// request's own.
pub fn current() -> Option<String> {
    if exporting() {
        let cx = tracing::Span::current().context();
        if !cx.span().span_context().is_valid() {
            return None;
        }
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        return carrier.remove("traceparent");
    }
    INCOMING.try_with(Clone::clone).ok().flatten()
}

/// The `traceparent` header of a call made for a job whose recorded context is `recorded` (a
/// push call, a callback): the current span (the attempt's) when exporting, else the recorded one.
pub fn outgoing(recorded: Option<&str>) -> Option<String> {
    match exporting() {
        true => current().or_else(|| recorded.map(str::to_string)),
        false => recorded.map(str::to_string),
    }
}

/// Run `f` as the handling of a request that came with `traceparent` (see [`current`]).
pub async fn with_incoming<F: std::future::Future>(traceparent: Option<String>, f: F) -> F::Output {
    INCOMING.scope(traceparent, f).await
}

/// A `traceparent` as W3C Trace Context defines it (version 00): what is accepted from clients.
pub fn valid(traceparent: &str) -> bool {
    let parts: Vec<&str> = traceparent.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    };
    matches!(parts.as_slice(), [v, t, s, f]
        if *v == "00" && hex(t, 32) && hex(s, 16) && hex(f, 2)
            && t.bytes().any(|b| b != b'0') && s.bytes().any(|b| b != b'0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_w3c_traceparents_are_valid() {
        assert!(valid(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(!valid(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn without_an_exporter_a_requests_own_traceparent_is_passed_along() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string();
        assert_eq!(current(), None);
        let inside = with_incoming(Some(tp.clone()), async { current() }).await;
        assert_eq!(inside, Some(tp));
    }
}
