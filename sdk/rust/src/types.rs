//! What the API takes and returns, as typed values. Each answer type reads the fields the API
//! documents and keeps any other in `extra`, so a newer server never breaks an older client;
//! enums read an unknown value as `Unknown`.

use std::{collections::BTreeMap, fmt};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// `run_at` is in the future, or the job waits for a retry.
    Scheduled,
    /// Due and waiting for a worker.
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
    /// A status this version of the SDK does not know.
    #[serde(other)]
    Unknown,
}

impl JobStatus {
    /// Succeeded, failed or canceled: nothing more happens unless the job is retried.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            JobStatus::Scheduled => "scheduled",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
            JobStatus::Unknown => "unknown",
        };
        f.write_str(s)
    }
}

/// A job's priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    Critical,
    #[serde(other)]
    Unknown,
}

/// Why an attempt or a job failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    /// `timeout`, `worker_lost`, `canceled`, a handler's own type, …
    #[serde(rename = "type")]
    pub error_type: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

/// Delays between attempts: `initial_ms`, multiplied by `factor` per attempt, at most `max_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    pub initial_ms: u64,
    pub factor: f64,
    pub max_ms: u64,
}

/// A job (`GET /v1/jobs/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: Uuid,
    pub kind: String,
    #[serde(default)]
    pub queue: String,
    #[serde(default)]
    pub priority: Priority,
    pub status: JobStatus,
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub output: Option<Value>,
    #[serde(default)]
    pub error: Option<JobError>,
    /// The last progress reported: `{percent, message, data}`.
    #[serde(default)]
    pub progress: Option<Value>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Attempts started so far.
    #[serde(default)]
    pub attempt: u32,
    #[serde(default)]
    pub max_attempts: u32,
    #[serde(default)]
    pub timeout_s: Option<u32>,
    #[serde(default)]
    pub cancel_requested: bool,
    /// The worker running (or that last ran) the job.
    #[serde(default)]
    pub worker_id: Option<String>,
    #[serde(default)]
    pub run_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    /// The workflow run this job is a step of.
    #[serde(default)]
    pub run_id: Option<Uuid>,
    /// Why it is not running (`reason`: `concurrency`, `rate`, `paused`, `ordering`,
    /// `scheduled`, `backing_off`, `rate_limited`; docs/flow-control.md).
    #[serde(default)]
    pub waiting: Option<Value>,
    /// The rest of the job as the API sent it (`namespace`, `backoff`, `artifacts`, …).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An event envelope of a stream (`GET /v1/jobs/{id}/events`, SSE `data`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Opaque cursor: resume after this event with it (`Last-Event-ID`, `after`).
    pub id: String,
    /// `job`, `run`, `workflow`, `schedule`, …
    pub stream_type: String,
    pub stream_id: Uuid,
    /// Position in its stream (1, 2, …).
    pub version: i64,
    /// `JobSubmitted`, `JobProgress`, `JobSucceeded`, …
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub metadata: Value,
    pub recorded_at: DateTime<Utc>,
}

/// One page of a list: `next_cursor` continues it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// Where a workflow run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Queued,
    Running,
    /// A step waits for a signal.
    Waiting,
    Succeeded,
    Failed,
    Canceled,
    #[serde(other)]
    Unknown,
}

impl RunStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Canceled
        )
    }
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub id: String,
    pub kind: String,
    /// `pending`, `ready`, `running`, `succeeded`, `failed`, `skipped`, `canceled`, `waiting`.
    pub status: String,
    #[serde(default)]
    pub job_id: Option<Uuid>,
    #[serde(default)]
    pub attempt: u32,
    #[serde(default)]
    pub output: Option<Value>,
    #[serde(default)]
    pub error: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A workflow run (`GET /v1/runs/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub id: Uuid,
    pub workflow_id: Uuid,
    #[serde(default)]
    pub workflow_name: String,
    /// The workflow version the run pinned.
    #[serde(default)]
    pub version: u32,
    pub status: RunStatus,
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub output: Option<Value>,
    #[serde(default)]
    pub error: Option<Value>,
    #[serde(default)]
    pub steps: Vec<Step>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Run {
    /// Step `id`, if the run has one.
    pub fn step(&self, id: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.id == id)
    }
}

/// A workflow (`POST /v1/workflows`, `GET /v1/workflows/{id}`); its definitions are in `extra`
/// (`versions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workflow {
    pub id: Uuid,
    pub name: String,
    /// Latest definition version.
    #[serde(default)]
    pub version: u32,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A cron schedule (`/v1/schedules`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub id: Uuid,
    pub name: String,
    pub cron: String,
    #[serde(default)]
    pub timezone: String,
    #[serde(default)]
    pub target: Value,
    /// `active`, `paused` or `deleted`.
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub next_fire_time: Option<DateTime<Utc>>,
    #[serde(default)]
    pub last_fire_time: Option<DateTime<Utc>>,
    /// Job of the last fired tick.
    #[serde(default)]
    pub last_job_id: Option<Uuid>,
    #[serde(default)]
    pub fired_count: i64,
    #[serde(default)]
    pub next_fire_times: Vec<DateTime<Utc>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What to do with a tick while the previous one's job still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    Allow,
    Skip,
    BufferOne,
}

/// What to do with ticks missed while the scheduler was down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    None,
    Latest,
    All,
}

/// Where a schedule's ticks go.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
// Built once per schedule: boxing the job would only make it harder to write.
#[allow(clippy::large_enum_variant)]
pub enum ScheduleTarget {
    /// Submit this job.
    Job { job: JobSpec },
    /// Start a run of the workflow's latest version.
    Workflow {
        workflow_id: Uuid,
        #[serde(skip_serializing_if = "Option::is_none")]
        input: Option<Value>,
    },
}

/// `POST /v1/schedules`: `ScheduleSpec::new(name, cron, target)` and the optional settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScheduleSpec {
    pub name: String,
    /// Crontab: 5 fields, 6 with seconds first, or an alias such as `@daily`.
    pub cron: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    pub target: ScheduleTarget,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlap: Option<Overlap>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<CatchUp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter_s: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_at: Option<DateTime<Utc>>,
}

impl ScheduleSpec {
    pub fn new(name: impl Into<String>, cron: impl Into<String>, target: ScheduleTarget) -> Self {
        ScheduleSpec {
            name: name.into(),
            cron: cron.into(),
            timezone: None,
            target,
            overlap: None,
            catch_up: None,
            jitter_s: None,
            start_at: None,
            end_at: None,
        }
    }

    /// IANA time zone of the cron expression (default `UTC`).
    pub fn timezone(mut self, tz: impl Into<String>) -> Self {
        self.timezone = Some(tz.into());
        self
    }

    pub fn overlap(mut self, o: Overlap) -> Self {
        self.overlap = Some(o);
        self
    }

    pub fn catch_up(mut self, c: CatchUp) -> Self {
        self.catch_up = Some(c);
        self
    }
}

/// A job to submit: `JobSpec::new(kind, input)` and the optional fields. Also the job of a
/// schedule's target and of a batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSpec {
    pub kind: String,
    pub input: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_events: Option<Vec<String>>,
    /// Return the job submitted with the same key within the window instead of a new one
    /// (not in a batch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup: Option<Dedup>,
    /// Keep one waiting job per key, due `delay_s` after the latest submission, with the
    /// latest input (not with `run_at` or `dedup`, not in a batch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debounce: Option<Debounce>,
    /// Not started within this many seconds of being due: canceled (`expired`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u32>,
    /// Not started by then: canceled (`expired`). Not with `ttl_s`, not in schedule targets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Ended within this many seconds of being due, across all attempts
    /// (`deadline_exceeded`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<u32>,
    /// Jobs with the same ordering key run one at a time, in submission order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordering_key: Option<String>,
}

/// A submission's `dedup` (docs/flow-control.md).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dedup {
    pub key: String,
    pub window_s: u32,
}

/// A submission's `debounce` (docs/flow-control.md).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Debounce {
    pub key: String,
    pub delay_s: u32,
}

impl JobSpec {
    pub fn new(kind: impl Into<String>, input: Value) -> JobSpec {
        JobSpec {
            kind: kind.into(),
            input,
            queue: None,
            priority: None,
            run_at: None,
            max_attempts: None,
            timeout_s: None,
            backoff: None,
            tags: BTreeMap::new(),
            callback_url: None,
            callback_events: None,
            dedup: None,
            debounce: None,
            ttl_s: None,
            expires_at: None,
            deadline_s: None,
            ordering_key: None,
        }
    }
}

/// A kind's definition (`PUT /v1/kinds/{name}`, or declared when a worker registers). Every
/// field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KindSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Queue of its jobs when a submission names none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// JSON Schema every submission's `input` must match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
    /// JSON Schema a completed job's output must match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
    /// Per-attempt timeout when a submission gives none (1-86,400).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
}

/// A kind as `GET /v1/kinds` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Kind {
    pub name: String,
    /// Built into `capibara-worker` (false: registered in this namespace).
    #[serde(default)]
    pub builtin: bool,
    #[serde(default)]
    pub default_queue: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub input_schema: Value,
    #[serde(default)]
    pub output_schema: Option<Value>,
    #[serde(default)]
    pub timeout_s: Option<u32>,
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Registered workers that declared it and were seen recently.
    #[serde(default)]
    pub live_workers: Option<i64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A kind a worker runs: a name, or a name with its definition (registered or updated when the
/// worker registers).
#[derive(Debug, Clone, PartialEq)]
pub enum KindDecl {
    Name(String),
    Defined { name: String, spec: KindSpec },
}

impl Serialize for KindDecl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            KindDecl::Name(n) => s.serialize_str(n),
            KindDecl::Defined { name, spec } => {
                let mut v = serde_json::to_value(spec).map_err(serde::ser::Error::custom)?;
                if let Value::Object(o) = &mut v {
                    o.insert("name".into(), Value::String(name.clone()));
                }
                v.serialize(s)
            }
        }
    }
}

/// `POST /v1/workers`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerSpec {
    pub kinds: Vec<KindDecl>,
    /// Default: each kind's queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queues: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl WorkerSpec {
    /// A worker of `kinds` (names), every other field left to the server's default.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(kinds: I) -> WorkerSpec {
        WorkerSpec {
            kinds: kinds
                .into_iter()
                .map(|k| KindDecl::Name(k.into()))
                .collect(),
            queues: None,
            concurrency: None,
            name: None,
            labels: BTreeMap::new(),
            version: None,
        }
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

/// The answer to a registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub id: Uuid,
    /// Unique name: the `worker_id` of the jobs it runs.
    pub name: String,
    #[serde(default)]
    pub kinds: Vec<String>,
    #[serde(default)]
    pub queues: Vec<String>,
    /// Visibility timeout: a lease not renewed within it expires.
    pub lease_s: f64,
    /// How often to renew each lease.
    pub heartbeat_s: f64,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Stop the handler: the job's cancel was requested.
    pub cancel_requested: bool,
    pub expires_at: DateTime<Utc>,
}

/// A progress report: any of percent (0-100), message (≤ 1,000 characters), data.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Progress {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// Level of a job's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    /// The level as the API writes it (`info`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// One log line of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub level: LogLevel,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_job_reads_unknown_fields_and_statuses_without_failing() {
        let j: Job = serde_json::from_value(json!({
            "id": "0193a3b4-0000-7000-8000-000000000001", "kind": "echo", "status": "paused",
            "priority": "urgent", "input": {"a": 1}, "attempt": 1, "max_attempts": 3,
            "namespace": "default", "artifacts": []
        }))
        .unwrap();
        assert_eq!(j.status, JobStatus::Unknown);
        assert_eq!(j.priority, Priority::Unknown);
        assert_eq!(j.extra["namespace"], "default");
        assert!(!j.status.is_terminal());
    }

    #[test]
    fn a_kind_declaration_is_a_name_or_an_object_with_its_name() {
        let spec = WorkerSpec {
            kinds: vec![
                KindDecl::Name("a.b".into()),
                KindDecl::Defined {
                    name: "c.d".into(),
                    spec: KindSpec {
                        timeout_s: Some(5),
                        ..Default::default()
                    },
                },
            ],
            ..WorkerSpec::new(Vec::<String>::new())
        };
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            json!({"kinds": ["a.b", {"name": "c.d", "timeout_s": 5}]})
        );
    }

    #[test]
    fn a_schedule_target_is_tagged_by_type() {
        let t = ScheduleTarget::Job {
            job: JobSpec::new("echo", json!({"x": 1})),
        };
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            json!({"type": "job", "job": {"kind": "echo", "input": {"x": 1}}})
        );
    }
}
