//! Every metric Capibara exports, with its HELP text, and which binary records it.
//!
//! [`register`] runs at start-up on every binary: it describes each metric (HELP and TYPE lines)
//! and creates its series at zero, so the first `/metrics` scrape already lists them and
//! `rate()` has a starting point. Series whose labels are known at start (kinds, queues,
//! outcomes) are created for every label value; those whose labels only exist at run time
//! (`capibara_code_run_seconds{language,runtime}`, the per-queue gauges) are described here and
//! appear on first use. Process metrics (`process_*`) come from [`crate::telemetry`].

use metrics::Unit;

/// A Capibara binary (`capibara dev` is all three).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Api,
    Worker,
    Scheduler,
}

/// Prometheus metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

/// Where a label's values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// A fixed set.
    Fixed(&'static [&'static str]),
    /// The job kinds this binary knows ([`Labels::kinds`]).
    Kinds,
    /// The queues this binary serves ([`Labels::queues`]).
    Queues,
    /// Only known at run time: the series appears on first use.
    Open,
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct MetricSpec {
    pub name: &'static str,
    pub kind: MetricType,
    pub help: &'static str,
    pub unit: Option<Unit>,
    /// Binaries that record it.
    pub on: &'static [Component],
    pub labels: &'static [(&'static str, Values)],
}

use Component::{Api, Scheduler, Worker};
use MetricType::{Counter, Gauge, Histogram};

const ALL: &[Component] = &[Api, Worker, Scheduler];
const JOB_OUTCOMES: &[&str] = &[
    "succeeded",
    "failed",
    "timed_out",
    "canceled",
    "released",
    "detached",
];

const MCP_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "other",
];
const MCP_OUTCOMES: &[&str] = &["ok", "tool_error", "error"];
const HTTP_OUTCOMES: &[&str] = &["ok", "unexpected_status", "error", "circuit_open"];
const BREAKER_STATES: &[&str] = &["open", "closed"];

/// The catalog (docs/configuration.md lists it too; a test keeps the two in step).
pub const METRICS: &[MetricSpec] = &[
    MetricSpec {
        name: "capibara_http_requests_total",
        kind: Counter,
        help: "http.request calls by outcome: ok (an expected status), unexpected_status, error (no answer), circuit_open (refused by the host's breaker, not sent).",
        unit: None,
        on: &[Worker],
        labels: &[("outcome", Values::Fixed(HTTP_OUTCOMES))],
    },
    MetricSpec {
        name: "capibara_llm_requests_total",
        kind: Counter,
        help: "LLM provider calls of llm.generate / llm.chat by provider and outcome: ok, error (the provider failed; the next one is tried), circuit_open (skipped: its breaker is open).",
        unit: None,
        on: &[Worker],
        labels: &[("provider", Values::Open), ("outcome", Values::Open)],
    },
    MetricSpec {
        name: "capibara_llm_tokens_total",
        kind: Counter,
        help: "Tokens of answered LLM calls, as providers report them, by provider and direction (input, output).",
        unit: None,
        on: &[Worker],
        labels: &[("provider", Values::Open), ("direction", Values::Open)],
    },
    MetricSpec {
        name: "capibara_llm_cost_microdollars_total",
        kind: Counter,
        help: "Cost of answered LLM calls in millionths of a US dollar, by provider (providers with prices).",
        unit: None,
        on: &[Worker],
        labels: &[("provider", Values::Open)],
    },
    MetricSpec {
        name: "capibara_llm_ttft_seconds",
        kind: Histogram,
        help: "Time from sending a streamed LLM call to its first token, by provider.",
        unit: Some(Unit::Seconds),
        on: &[Worker],
        labels: &[("provider", Values::Open)],
    },
    MetricSpec {
        name: "capibara_llm_request_duration_seconds",
        kind: Histogram,
        help: "Time of answered LLM calls, from sending to the end of the answer, by provider.",
        unit: Some(Unit::Seconds),
        on: &[Worker],
        labels: &[("provider", Values::Open)],
    },
    MetricSpec {
        name: "capibara_llm_breaker_transitions_total",
        kind: Counter,
        help: "LLM provider circuit breakers that opened or closed (GET /v1/llm/providers shows each provider's).",
        unit: None,
        on: &[Worker],
        labels: &[("to", Values::Fixed(BREAKER_STATES))],
    },
    MetricSpec {
        name: "capibara_http_breaker_transitions_total",
        kind: Counter,
        help: "http.request circuit breakers that opened or closed (GET /v1/http/hosts shows each host's).",
        unit: None,
        on: &[Worker],
        labels: &[("to", Values::Fixed(BREAKER_STATES))],
    },
    MetricSpec {
        name: "capibara_http_rate_limited_total",
        kind: Counter,
        help: "http.request calls that found no token in their host's rate_limit bucket: waited in place, or deferred (scheduled again, using no attempt).",
        unit: None,
        on: &[Worker],
        labels: &[("outcome", Values::Fixed(&["waited", "deferred"]))],
    },
    MetricSpec {
        name: "capibara_mcp_requests_total",
        kind: Counter,
        help: "JSON-RPC requests to the MCP server at /mcp, by method (docs/mcp.md).",
        unit: None,
        on: &[Api],
        labels: &[("method", Values::Fixed(MCP_METHODS))],
    },
    MetricSpec {
        name: "capibara_mcp_calls_total",
        kind: Counter,
        help: "mcp.call tool calls by outcome: ok, tool_error (the tool answered isError), error (no result).",
        unit: None,
        on: &[Worker],
        labels: &[("outcome", Values::Fixed(MCP_OUTCOMES))],
    },
    // Event store (every binary appends).
    MetricSpec {
        name: "capibara_append_batch_size",
        kind: Histogram,
        help: "Events written per group commit of the event appender.",
        unit: None,
        on: ALL,
        labels: &[],
    },
    MetricSpec {
        name: "capibara_append_batch_seconds",
        kind: Histogram,
        help: "Time to write one group commit of the event appender.",
        unit: Some(Unit::Seconds),
        on: ALL,
        labels: &[],
    },
    MetricSpec {
        name: "capibara_runs_started_total",
        kind: Counter,
        help: "Workflow runs started.",
        unit: None,
        on: ALL,
        labels: &[],
    },
    MetricSpec {
        name: "capibara_append_retried_in_transaction_total",
        kind: Counter,
        help: "One-statement group commits that did not fully apply (a version or an idempotency key taken by another writer) and were written again in a transaction to find the losers.",
        unit: None,
        on: ALL,
        labels: &[],
    },
    MetricSpec {
        name: "capibara_runtime_worker_threads",
        kind: Gauge,
        help: "Worker threads of this process's async runtime (CAPIBARA_RUNTIME_THREADS; default half the cores, at least one).",
        unit: None,
        on: ALL,
        labels: &[],
    },
    MetricSpec {
        name: "capibara_append_queue_full_total",
        kind: Counter,
        help: "Writes refused because the group-commit queue stayed full for the append timeout (Postgres not keeping up).",
        unit: None,
        on: ALL,
        labels: &[],
    },
    MetricSpec {
        name: "capibara_backlog_refused_total",
        kind: Counter,
        help: "Jobs refused with 503 because the backlog of jobs waiting for a worker was at CAPIBARA_MAX_BACKLOG.",
        unit: None,
        on: &[Api, Scheduler],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_append_refused_total",
        kind: Counter,
        help: "Appends refused for their own data (a value Postgres cannot store); the rest of their batch committed.",
        unit: None,
        on: ALL,
        labels: &[],
    },
    // API.
    MetricSpec {
        name: "capibara_auth_failures_total",
        kind: Counter,
        help: "Requests refused for an unknown or revoked bearer token.",
        unit: None,
        on: &[Api],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_jobs_submitted_total",
        kind: Counter,
        help: "Jobs accepted by the API, by kind (`batch` counts the jobs of /v1/jobs/batch).",
        unit: None,
        on: &[Api],
        labels: &[("kind", Values::Kinds)],
    },
    MetricSpec {
        name: "capibara_firehose_events_total",
        kind: Counter,
        help: "Events fanned out to firehose (SSE) readers.",
        unit: None,
        on: &[Api],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_firehose_batches_total",
        kind: Counter,
        help: "Batches of events read from the log for firehose readers.",
        unit: None,
        on: &[Api],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_firehose_lagged_total",
        kind: Counter,
        help: "Times a slow firehose reader fell behind and was resumed from the log.",
        unit: None,
        on: &[Api],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_firehose_subscribers",
        kind: Gauge,
        help: "Firehose (SSE) readers connected now.",
        unit: None,
        on: &[Api],
        labels: &[],
    },
    // Worker.
    MetricSpec {
        name: "capibara_jobs_total",
        kind: Counter,
        help: "Jobs this worker executed, by kind and outcome.",
        unit: None,
        on: &[Worker],
        labels: &[("kind", Values::Kinds), ("outcome", Values::Fixed(JOB_OUTCOMES))],
    },
    MetricSpec {
        name: "capibara_job_run_seconds",
        kind: Histogram,
        help: "Time a job's executor ran, by kind.",
        unit: Some(Unit::Seconds),
        on: &[Worker],
        labels: &[("kind", Values::Kinds)],
    },
    MetricSpec {
        name: "capibara_worker_slots",
        kind: Gauge,
        help: "Attempts this worker may run at once (its --concurrency).",
        unit: None,
        on: &[Worker],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_worker_busy_slots",
        kind: Gauge,
        help: "Attempts this worker is running now (busy / slots: its saturation).",
        unit: None,
        on: &[Worker],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_job_pickup_latency_seconds",
        kind: Histogram,
        help: "Time from a job becoming runnable to a worker starting it, by queue.",
        unit: Some(Unit::Seconds),
        on: &[Worker],
        labels: &[("queue", Values::Queues)],
    },
    MetricSpec {
        name: "capibara_dispatch_stale_total",
        kind: Counter,
        help: "Popped dispatch entries whose job was no longer queued (skipped).",
        unit: None,
        on: &[Api, Worker],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_dispatch_carried_stale_total",
        kind: Counter,
        help: "Popped jobs whose carried copy was not the job as it stands (the attempt's first append conflicted): what the attempt did was discarded and the job put back on the queue.",
        unit: None,
        on: &[Worker],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_worker_protocol_leased_total",
        kind: Counter,
        help: "Jobs handed to workers of the HTTP protocol by lease calls.",
        unit: None,
        on: &[Api],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_worker_protocol_claims_total",
        kind: Counter,
        help: "Attempts handed out to protocol workers before their claim, by what claimed them: their first report (JobStarted in its append: a fast attempt), or the lease call's own claim CAPIBARA_WORKER_CLAIM_AFTER_MS (250 ms) after it handed them out.",
        unit: None,
        on: &[Api],
        labels: &[("by", Values::Fixed(&["report", "lease"]))],
    },
    MetricSpec {
        name: "capibara_worker_protocol_final_reports_total",
        kind: Counter,
        help: "Final reports (complete, fail) of protocol workers by where the job they decided on came from: kept since this process's lease call handed it out, or read from Postgres (another replica leased it, or it was not kept).",
        unit: None,
        on: &[Api],
        labels: &[("job", Values::Fixed(&["kept", "read"]))],
    },
    MetricSpec {
        name: "capibara_kind_live_workers",
        kind: Gauge,
        help: "Registered workers of the HTTP protocol that declared a user kind and were seen recently (0: nothing runs its jobs).",
        unit: None,
        on: &[Scheduler],
        labels: &[("namespace", Values::Open), ("kind", Values::Open)],
    },
    MetricSpec {
        name: "capibara_dispatch_duplicates_total",
        kind: Counter,
        help: "Duplicate dispatches of one attempt fenced off at claim.",
        unit: None,
        on: &[Worker],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_results_fenced_total",
        kind: Counter,
        help: "Results discarded because the attempt was taken away or duplicated (fencing).",
        unit: None,
        on: &[Worker],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_delivery_attempts_total",
        kind: Counter,
        help: "Webhook delivery attempts, by outcome (delivered, retry, failed).",
        unit: None,
        on: &[Worker],
        labels: &[("outcome", Values::Fixed(&["delivered", "retry", "failed"]))],
    },
    MetricSpec {
        name: "capibara_code_run_seconds",
        kind: Histogram,
        help: "Time a code.run job spent in the sandbox, by language and runtime.",
        unit: Some(Unit::Seconds),
        on: &[Worker],
        labels: &[("language", Values::Open), ("runtime", Values::Open)],
    },
    MetricSpec {
        name: "capibara_tts_voice_ready",
        kind: Gauge,
        help: "1 once the worker's default TTS voice is loaded (0 while loading, if it failed, or without the tts queue).",
        unit: None,
        on: &[Worker],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_tts_model_loads_total",
        kind: Counter,
        help: "TTS voice models loaded, by when (warm_up at start, or job on first use).",
        unit: None,
        on: &[Worker],
        labels: &[("during", Values::Fixed(&["warm_up", "job"]))],
    },
    // Scheduler.
    MetricSpec {
        name: "capibara_schedule_ticks_fired_total",
        kind: Counter,
        help: "Schedule occurrences fired.",
        unit: None,
        on: &[Scheduler],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_schedule_fire_lateness_seconds",
        kind: Histogram,
        help: "How late a schedule occurrence fired after its due time.",
        unit: Some(Unit::Seconds),
        on: &[Scheduler],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_runs_advanced_total",
        kind: Counter,
        help: "Times the orchestrator advanced a workflow run.",
        unit: None,
        on: &[Scheduler],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_runs_advanced_in_report_total",
        kind: Counter,
        help: "Workflow runs advanced in the commit of a step job's report, without the orchestrator.",
        unit: None,
        on: &[Api, Worker],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_dispatch_deferred_total",
        kind: Counter,
        help: "Jobs committed as queued whose after-commit push to Redis failed or was skipped while Redis did not answer; the relay dispatches them.",
        unit: None,
        on: ALL,
        labels: &[],
    },
    MetricSpec {
        name: "capibara_relay_pushed_total",
        kind: Counter,
        help: "Queued jobs the relay found missing from Redis and pushed again.",
        unit: None,
        on: &[Scheduler],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_flow_waits_total",
        kind: Counter,
        help: "Jobs the queue held back, once per blocking episode (each is a JobWaiting event).",
        unit: None,
        on: &[Scheduler],
        labels: &[(
            "reason",
            Values::Fixed(&["concurrency", "rate", "paused", "ordering"]),
        )],
    },
    MetricSpec {
        name: "capibara_bulk_jobs_total",
        kind: Counter,
        help: "Jobs bulk actions went through: acted on (done) or no longer qualified (skipped).",
        unit: None,
        on: &[Scheduler],
        labels: &[
            ("action", Values::Fixed(&["cancel", "retry"])),
            ("result", Values::Fixed(&["done", "skipped"])),
        ],
    },
    MetricSpec {
        name: "capibara_retention_pruned_total",
        kind: Counter,
        help: "Finished jobs and deliveries removed by retention.",
        unit: None,
        on: &[Scheduler],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_leases_expired_total",
        kind: Counter,
        help: "Running attempts whose lease expired (marked worker_lost).",
        unit: None,
        on: &[Scheduler],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_trigger_calls_total",
        kind: Counter,
        help: "Inbound trigger calls, by outcome (accepted, rejected).",
        unit: None,
        on: &[Scheduler],
        labels: &[("outcome", Values::Fixed(&["accepted", "rejected"]))],
    },
    MetricSpec {
        name: "capibara_deliveries_created_total",
        kind: Counter,
        help: "Webhook deliveries created from the event log (callbacks and subscriptions).",
        unit: None,
        on: &[Scheduler],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_queue_depth",
        kind: Gauge,
        help: "Jobs waiting to run, by queue.",
        unit: None,
        on: &[Scheduler],
        labels: &[("queue", Values::Open)],
    },
    MetricSpec {
        name: "capibara_queue_running",
        kind: Gauge,
        help: "Jobs running now, by queue.",
        unit: None,
        on: &[Scheduler],
        labels: &[("queue", Values::Open)],
    },
    MetricSpec {
        name: "capibara_queue_scheduled",
        kind: Gauge,
        help: "Jobs scheduled for later, by queue.",
        unit: None,
        on: &[Scheduler],
        labels: &[("queue", Values::Open)],
    },
    MetricSpec {
        name: "capibara_queue_oldest_age_seconds",
        kind: Gauge,
        help: "Age of the oldest waiting job, by queue.",
        unit: Some(Unit::Seconds),
        on: &[Scheduler],
        labels: &[("queue", Values::Open)],
    },
    MetricSpec {
        name: "capibara_invalid_output_total",
        kind: Counter,
        help: "Attempts ended as invalid_output: their output or error held a value that cannot be stored.",
        unit: None,
        on: &[Worker],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_runs_refused_total",
        kind: Counter,
        help: "Workflow runs failed with store_rejected: the store refused their next events.",
        unit: None,
        on: &[Scheduler],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_deliveries_refused_total",
        kind: Counter,
        help: "Webhook deliveries recorded as failed with store_rejected: the store refused them.",
        unit: None,
        on: &[Scheduler],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_events_archived_total",
        kind: Counter,
        help: "Events archived to the artifact store with their partition dropped (docs/event-log-retention.md).",
        unit: None,
        on: &[Scheduler],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_event_archive_runs_total",
        kind: Counter,
        help: "Event archive runs that took the archive lock (one replica at a time).",
        unit: None,
        on: &[Scheduler],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_event_archive_errors_total",
        kind: Counter,
        help: "Event archive runs that failed (store, artifact store or verification); the next run resumes.",
        unit: None,
        on: &[Scheduler],
        labels: &[],
    },
    MetricSpec {
        name: "capibara_scheduler_leader",
        kind: Gauge,
        help: "1 on the scheduler replica that leads a role (deliverer, orchestrator), else 0; summed over replicas, 0 means no replica leads it.",
        unit: None,
        on: &[Scheduler],
        labels: &[("role", Values::Fixed(&["deliverer", "orchestrator"]))],
    },
    MetricSpec {
        name: "capibara_schedule_ticks_refused_total",
        kind: Counter,
        help: "Schedule ticks the store refused (the schedule is paused with the reason).",
        unit: None,
        on: &[Scheduler],
        labels: &[],
    },
];

/// Label values known at start-up.
#[derive(Debug, Clone, Default)]
pub struct Labels {
    /// Job kinds (public ones; the API adds `batch`).
    pub kinds: Vec<String>,
    /// Queues this binary serves.
    pub queues: Vec<String>,
}

impl Labels {
    /// The API's: public kinds, and `batch`.
    pub fn api() -> Labels {
        let mut kinds: Vec<String> = crate::domain::kinds::KINDS
            .iter()
            .filter(|k| !k.internal)
            .map(|k| k.name.to_string())
            .collect();
        kinds.push("batch".into());
        Labels {
            kinds,
            queues: Vec::new(),
        }
    }

    /// A worker's: every kind (deliveries and workflow steps included), and its queues.
    pub fn worker(queues: &[String]) -> Labels {
        Labels {
            kinds: crate::domain::kinds::KINDS
                .iter()
                .map(|k| k.name.to_string())
                .collect(),
            queues: queues.to_vec(),
        }
    }
}

/// Every label combination of `spec` with values known now; `None` when a label is open.
fn series(spec: &MetricSpec, labels: &Labels) -> Option<Vec<Vec<(&'static str, String)>>> {
    let mut out: Vec<Vec<(&'static str, String)>> = vec![Vec::new()];
    for (name, values) in spec.labels {
        let values: Vec<String> = match values {
            Values::Fixed(v) => v.iter().map(|s| s.to_string()).collect(),
            Values::Kinds => labels.kinds.clone(),
            Values::Queues => labels.queues.clone(),
            Values::Open => return None,
        };
        out = out
            .into_iter()
            .flat_map(|prefix| {
                values.iter().map(move |v| {
                    let mut p = prefix.clone();
                    p.push((*name, v.clone()));
                    p
                })
            })
            .collect();
    }
    Some(out)
}

/// Describe every metric `component` records and create its known series at zero. Call after
/// the recorder is installed ([`crate::telemetry::metrics_handle`]).
pub fn register(component: Component, labels: &Labels) {
    for spec in METRICS.iter().filter(|m| m.on.contains(&component)) {
        describe(spec);
        for series in series(spec, labels).unwrap_or_default() {
            let labels: Vec<metrics::Label> = series
                .into_iter()
                .map(|(k, v)| metrics::Label::new(k, v))
                .collect();
            match spec.kind {
                Counter => metrics::counter!(spec.name, labels).increment(0),
                // Gauges with known series start true at zero (no firehose reader, no voice
                // loaded yet); per-queue gauges are open and set by the scheduler.
                Gauge => metrics::gauge!(spec.name, labels).set(0.0),
                // Registering the handle creates the series (empty buckets, count 0).
                Histogram => drop(metrics::histogram!(spec.name, labels)),
            }
        }
    }
}

fn describe(spec: &MetricSpec) {
    match (spec.kind, spec.unit) {
        (Counter, Some(u)) => metrics::describe_counter!(spec.name, u, spec.help),
        (Counter, None) => metrics::describe_counter!(spec.name, spec.help),
        (Gauge, Some(u)) => metrics::describe_gauge!(spec.name, u, spec.help),
        (Gauge, None) => metrics::describe_gauge!(spec.name, spec.help),
        (Histogram, Some(u)) => metrics::describe_histogram!(spec.name, u, spec.help),
        (Histogram, None) => metrics::describe_histogram!(spec.name, spec.help),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_the_cartesian_product_of_known_values() {
        let spec = METRICS
            .iter()
            .find(|m| m.name == "capibara_jobs_total")
            .unwrap();
        let labels = Labels {
            kinds: vec!["echo".into(), "sleep".into()],
            queues: vec![],
        };
        let s = series(spec, &labels).unwrap();
        assert_eq!(s.len(), 2 * JOB_OUTCOMES.len());
        assert!(s.contains(&vec![
            ("kind", "sleep".to_string()),
            ("outcome", "timed_out".to_string())
        ]));
        let open = METRICS
            .iter()
            .find(|m| m.name == "capibara_code_run_seconds")
            .unwrap();
        assert!(series(open, &labels).is_none());
    }

    #[test]
    fn names_are_unique_and_prometheus_style() {
        let mut names: Vec<&str> = METRICS.iter().map(|m| m.name).collect();
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "a metric is listed twice");
        for m in METRICS {
            assert!(m.name.starts_with("capibara_"), "{}", m.name);
            assert_eq!(m.kind == Counter, m.name.ends_with("_total"), "{}", m.name);
            assert!(!m.help.is_empty() && !m.on.is_empty(), "{}", m.name);
        }
    }

    /// Every `counter!`/`gauge!`/`histogram!` name in the source is in the catalog, so no metric
    /// goes out without HELP text or a zero series.
    #[test]
    fn the_catalog_lists_every_metric_the_source_records() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut missing = Vec::new();
        for dir in [
            "api/src",
            "shared/src",
            "worker/src",
            "scheduler/src",
            "tts/src",
            "sandbox/src",
        ] {
            let mut stack = vec![root.join(dir)];
            while let Some(d) = stack.pop() {
                for entry in std::fs::read_dir(&d).unwrap().flatten() {
                    let path = entry.path();
                    if path.is_dir() {
                        stack.push(path);
                        continue;
                    }
                    if path.extension().is_none_or(|e| e != "rs") {
                        continue;
                    }
                    let text = std::fs::read_to_string(&path).unwrap();
                    for macro_call in ["counter!(\"", "gauge!(\"", "histogram!(\""] {
                        for (at, _) in text.match_indices(macro_call) {
                            let rest = &text[at + macro_call.len()..];
                            let name = &rest[..rest.find('"').unwrap()];
                            if !METRICS.iter().any(|m| m.name == name) {
                                missing.push(format!("{name} ({})", path.display()));
                            }
                        }
                    }
                }
            }
        }
        assert!(missing.is_empty(), "not in the catalog: {missing:?}");
    }

    #[test]
    fn the_docs_list_every_metric() {
        let docs = include_str!("../../docs/configuration.md");
        for m in METRICS {
            assert!(
                docs.contains(&format!("`{}`", m.name)),
                "docs/configuration.md does not list `{}`",
                m.name
            );
        }
    }
}
