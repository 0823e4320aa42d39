//! Logs (JSON in production, pretty in dev), the Prometheus recorder, and process metrics.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

use crate::{
    config::LogFormat,
    metric_catalog::{Component, Labels},
};

/// Install the global log subscriber once (later calls are ignored), with span export over
/// OTLP when `CAPIBARA_OTLP_ENDPOINT` is set ([`crate::trace_context`]); `service` names this
/// process in the traces (`OTEL_SERVICE_NAME` overrides it).
pub fn init_logs(format: LogFormat, service: &str) {
    let filter = EnvFilter::try_from_env("CAPIBARA_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let endpoint = std::env::var("CAPIBARA_OTLP_ENDPOINT").ok();
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_string());
    // Spans are exported whatever the log level (CAPIBARA_LOG=warn still traces); the
    // exporter's own HTTP client is never traced.
    let traces = crate::trace_context::layer(endpoint.as_deref(), &service).map(|l| {
        l.with_filter(EnvFilter::new(
            "info,sqlx=warn,opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off,\
             opentelemetry_http=off,hyper=off,hyper_util=off,reqwest=off,h2=off",
        ))
    });
    let logs = match format {
        LogFormat::Json => fmt::layer().json().with_current_span(false).boxed(),
        LogFormat::Pretty => fmt::layer().compact().boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces)
        .try_init();
}

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let latency = [
                0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0,
            ];
            let run = [
                0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("capibara_job_pickup_latency_seconds".into()),
                    &latency,
                )
                .expect("buckets")
                .set_buckets_for_metric(Matcher::Full("capibara_job_run_seconds".into()), &run)
                .expect("buckets")
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .expect("buckets")
                .set_buckets_for_metric(
                    Matcher::Full("capibara_append_batch_size".into()),
                    &[1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
                )
                .expect("buckets");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// Install the recorder, describe this binary's metrics with their series at zero
/// ([`crate::metric_catalog`]) and the process metrics (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_open_fds`, …), and take a first process sample, so
/// the first scrape already describes everything.
pub fn init_metrics(components: &[Component], labels: &Labels) {
    metrics_handle();
    for c in components {
        crate::metric_catalog::register(*c, labels);
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        metrics::gauge!("capibara_runtime_worker_threads").set(rt.metrics().num_workers() as f64);
    }
    let process = PROCESS.get_or_init(metrics_process::Collector::default);
    process.describe();
    process.collect();
}

/// The exposition text: process metrics sampled now, then every metric.
pub fn render_metrics() -> String {
    if let Some(p) = PROCESS.get() {
        p.collect();
    }
    metrics_handle().render()
}
