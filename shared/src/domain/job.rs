//! The job model: submission, status, the job event catalog and the fold from events to the
//! `jobs` projection row.
//!
//! The same [`Job::apply`] runs when an event is appended (inline projection) and when
//! `capibara admin rebuild-projections` replays the log, so both produce identical rows.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    str::FromStr,
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    event::{DomainEvent, StreamType},
    retry::Backoff,
    FieldError,
};

/// Job status (contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
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
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Scheduled,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Scheduled => "scheduled",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("unknown status `{s}` (expected scheduled, queued, running, succeeded, failed or canceled)")
            })
    }
}

/// Dispatch priority within a queue.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    Critical,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Critical => "critical",
        }
    }

    /// How many milliseconds of waiting this priority is worth in the dispatch order.
    ///
    /// A job's dispatch score is `enqueued_at_ms - head_start_ms`: a `critical` job jumps ahead of
    /// everything enqueued up to five minutes before it, but a `low` job that has waited longer
    /// than that is served first — so no priority starves.
    pub fn head_start_ms(self) -> i64 {
        match self {
            Priority::Low => 0,
            Priority::Normal => 10_000,
            Priority::High => 60_000,
            Priority::Critical => 300_000,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "low" => Ok(Priority::Low),
            "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            "critical" => Ok(Priority::Critical),
            other => Err(format!(
                "unknown priority `{other}` (expected low, normal, high or critical)"
            )),
        }
    }
}

/// An error recorded on a failed attempt or a failed job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobError {
    /// `executor_error`, `timeout`, `worker_lost`, `canceled`, `invalid_input`, …
    #[serde(rename = "type")]
    pub error_type: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl JobError {
    pub fn new(error_type: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error_type: error_type.into(),
            message: message.into(),
            details: None,
        }
    }
}

/// An artifact a job produced (e.g. `audio.wav`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Artifact {
    pub name: String,
    pub content_type: String,
    pub size: u64,
    /// Where the artifact store keeps it.
    pub location: String,
}

/// Add `new` to a job's artifacts; one of the same name replaces the one listed.
/// Whether `a` is a file of job `job`'s own (`…/jobs/{job}/{name}`, as every artifact store
/// names them), with no `..` segment that could lead elsewhere.
pub fn stored_under(a: &Artifact, job: Uuid) -> bool {
    a.location.ends_with(&format!("/jobs/{job}/{}", a.name))
        && !a.location.split('/').any(|s| s == "..")
}

fn add_artifacts(artifacts: &mut Vec<Artifact>, new: Vec<Artifact>) {
    for a in new {
        artifacts.retain(|b| b.name != a.name);
        artifacts.push(a);
    }
}

/// A validated job submission: what `JobSubmitted` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submission {
    pub kind: String,
    pub input: serde_json::Value,
    pub queue: String,
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<DateTime<Utc>>,
    pub max_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// Public event names sent to `callback_url` (default: the terminal ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_events: Option<Vec<String>>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The workflow run whose step this job is (set by the workflow engine only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<Uuid>,
    /// The step (`id`, or `id[index]` for a map child).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_id: Option<String>,
    /// Secrets the step's template referred to (set by the workflow engine only, never taken
    /// from a client): the worker resolves `${secret:NAME}` for these names and no others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_refs: Option<BTreeSet<String>>,
    /// Not started by then: the job is canceled with error `expired`, using no attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The same, counted from when the job is due (its `run_at`, else its submission).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u32>,
    /// The job ends within this many seconds of when it is due, across all attempts: an
    /// attempt is stopped there and no retry starts after it (error `deadline_exceeded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_s: Option<u32>,
    /// Jobs with the same ordering key run one at a time, in submission order (retries
    /// included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering_key: Option<String>,
    /// The submission's `debounce` key: the job waits out its delay (`run_at`) under this key,
    /// and later submissions with the key replace its input and push its `run_at` back
    /// (`JobDebounced`) until it is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debounce_key: Option<String>,
    /// W3C trace context of what submitted the job (the request, or the attempt that made it),
    /// continued by each attempt, callback and push call ([`crate::trace_context`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl Submission {
    /// When a job submitted at `at` is due: its `run_at`, else `at`.
    pub fn due(&self, at: DateTime<Utc>) -> DateTime<Utc> {
        self.run_at.filter(|r| *r > at).unwrap_or(at)
    }

    /// The events that submit a new job at `at`: `JobSubmitted`, then `JobScheduled` when it
    /// is to run later (else it is queued at once).
    pub fn into_events(self, at: DateTime<Utc>) -> Vec<JobEvent> {
        let delayed = self.run_at.filter(|t| *t > at);
        let debounced = self.debounce_key.is_some();
        let mut events = vec![JobEvent::JobSubmitted(self)];
        if let Some(run_at) = delayed {
            let reason = if debounced { "debounced" } else { "delayed" };
            events.push(JobEvent::JobScheduled {
                run_at,
                reason: reason.into(),
                max_attempts: None,
            });
        }
        events
    }
}

/// Events of the job stream (contract names, DESIGN §3). `JobQueued` is Capibara's addition: a
/// delayed or retrying job became due, or an operator asked for a retry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
// A submission is the one large event, written once per job and folded in place; boxing it
// would buy nothing on this path but an allocation.
#[allow(clippy::large_enum_variant)]
pub enum JobEvent {
    JobSubmitted(Submission),
    JobScheduled {
        run_at: DateTime<Utc>,
        /// `delayed` (run_at on submission), `debounced` (a submission's `debounce` delay),
        /// `retry`, or `deferred` (the attempt waited for a
        /// rate limit without using up an attempt).
        reason: String,
        /// A deferral gives the attempt back: the job may make this many attempts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_attempts: Option<u32>,
    },
    JobQueued {
        /// `due`, `manual_retry`, or `released` (a worker shutting down gave the attempt back).
        reason: String,
        /// A manual retry grants a fresh budget of attempts up to this number.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_attempts: Option<u32>,
    },
    JobStarted {
        attempt: u32,
        worker: String,
    },
    JobProgress {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        percent: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<serde_json::Value>,
    },
    JobLog {
        level: String,
        message: String,
    },
    JobOutputChunk {
        seq: u64,
        data: serde_json::Value,
    },
    JobSucceeded {
        attempt: u32,
        output: serde_json::Value,
        #[serde(default)]
        artifacts: Vec<Artifact>,
    },
    JobAttemptFailed {
        attempt: u32,
        error: JobError,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_at: Option<DateTime<Utc>>,
    },
    JobFailed {
        attempt: u32,
        error: JobError,
    },
    JobCancelRequested {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    JobCanceled {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
        /// Why, when Capibara canceled it rather than a client: `expired` (not started by its
        /// `expires_at`), `deadline_exceeded` (its `deadline_at` passed while it waited).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<JobError>,
    },
    /// A later submission with the same `dedup` key, within its window, was answered with this
    /// job instead of a new one (any status; nothing changes).
    JobDeduplicated {
        key: String,
    },
    /// A later submission with the same `debounce` key, while this job still waited out its
    /// delay, was merged into it: its `input` replaces the job's, and the job is now due at
    /// `run_at` (the later submission's time plus its `delay_s`).
    JobDebounced {
        key: String,
        input: serde_json::Value,
        run_at: DateTime<Utc>,
    },
    /// The queue held this queued job back (docs/flow-control.md), recorded once per episode:
    /// `reason` is `concurrency` (limit `limit` full for `key`), `rate` (no start allowed for
    /// `key` until `until`), `paused` (`target` is paused) or `ordering` (an earlier job of
    /// ordering key `key` has not ended).
    JobWaiting {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<DateTime<Utc>>,
    },
    JobTimedOut {
        attempt: u32,
    },
    /// The finished job was deleted (`DELETE /v1/jobs/{id}`, a bulk `delete`): it leaves the
    /// `jobs` projection, and so every read of the API; its stream stays in the log. Always the
    /// stream's last event: nothing applies after it.
    JobDeleted {},
}

impl DomainEvent for JobEvent {
    const STREAM: StreamType = StreamType::Job;

    fn type_name(&self) -> &'static str {
        match self {
            JobEvent::JobSubmitted(_) => "JobSubmitted",
            JobEvent::JobScheduled { .. } => "JobScheduled",
            JobEvent::JobQueued { .. } => "JobQueued",
            JobEvent::JobStarted { .. } => "JobStarted",
            JobEvent::JobProgress { .. } => "JobProgress",
            JobEvent::JobLog { .. } => "JobLog",
            JobEvent::JobOutputChunk { .. } => "JobOutputChunk",
            JobEvent::JobSucceeded { .. } => "JobSucceeded",
            JobEvent::JobAttemptFailed { .. } => "JobAttemptFailed",
            JobEvent::JobFailed { .. } => "JobFailed",
            JobEvent::JobCancelRequested { .. } => "JobCancelRequested",
            JobEvent::JobCanceled { .. } => "JobCanceled",
            JobEvent::JobTimedOut { .. } => "JobTimedOut",
            JobEvent::JobDeduplicated { .. } => "JobDeduplicated",
            JobEvent::JobDebounced { .. } => "JobDebounced",
            JobEvent::JobWaiting { .. } => "JobWaiting",
            JobEvent::JobDeleted { .. } => "JobDeleted",
        }
    }
}

impl JobEvent {
    /// Whether this event ends the job.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobEvent::JobSucceeded { .. }
                | JobEvent::JobFailed { .. }
                | JobEvent::JobCanceled { .. }
        )
    }
}

/// The `jobs` projection row, and the job as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    pub id: Uuid,
    pub namespace: String,
    pub kind: String,
    pub queue: String,
    pub priority: Priority,
    pub status: JobStatus,
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
    #[schema(value_type = Option<Object>)]
    pub output: Option<serde_json::Value>,
    pub error: Option<JobError>,
    /// Last `JobProgress` (percent, message, data).
    #[schema(value_type = Option<Object>)]
    pub progress: Option<serde_json::Value>,
    pub tags: BTreeMap<String, String>,
    /// Number of attempts started so far.
    pub attempt: u32,
    pub max_attempts: u32,
    pub timeout_s: Option<u32>,
    pub backoff: Option<Backoff>,
    pub callback_url: Option<String>,
    /// Events sent to `callback_url` (null = job.succeeded, job.failed, job.canceled).
    pub callback_events: Option<Vec<String>>,
    /// When a scheduled job becomes due (delay or retry).
    pub run_at: Option<DateTime<Utc>>,
    pub cancel_requested: bool,
    /// Worker running (or that last ran) the job.
    pub worker_id: Option<String>,
    /// Files the job stored: those its success listed, and those a progress report listed
    /// while it ran (`data.artifacts`, e.g. a training's checkpoints).
    pub artifacts: Vec<Artifact>,
    /// Stream version after the last applied event (optimistic concurrency).
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub queued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    /// The workflow run this job is a step of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_id: Option<String>,
    /// Secrets this step job may resolve (see [`Submission::secret_refs`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_refs: Option<BTreeSet<String>>,
    /// Not started by then: canceled with error `expired` (`ttl_s` / `expires_at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// Ends by then across all attempts (`deadline_s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<DateTime<Utc>>,
    /// Jobs with the same ordering key run one at a time, in submission order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering_key: Option<String>,
    /// Why this job is not running: for a queued job why the queue holds it back, as last
    /// recorded (`JobWaiting`); for a scheduled one `scheduled`, `backing_off` (a retry) or
    /// `rate_limited` (a deferral) `until` its `run_at`. Cleared when it starts or ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub waiting: Option<serde_json::Value>,
    /// The `debounce` key the job waits under while it waits out its delay; cleared once it
    /// leaves `scheduled`, so that the key makes a new job from then on (at most one pending
    /// job per key and namespace: a unique index on the projection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debounce_key: Option<String>,
    /// W3C `traceparent` of what submitted the job: an SDK worker or push endpoint continues
    /// this trace (docs/observability.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// `JobDeleted` was applied: the row is to be removed, not written (never stored).
    #[serde(skip)]
    pub deleted: bool,
}

/// A job event could not be applied to the current state (a bug or a corrupted log).
#[derive(Debug, thiserror::Error)]
#[error("event {event} cannot apply to job in status {status}")]
pub struct InvalidTransition {
    pub event: &'static str,
    pub status: JobStatus,
}

/// A command a job's state does not allow (cancel a finished job, retry a running one): the
/// message says why, for a 409.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotAllowed(pub String);

/// What canceling a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// It was waiting: it is canceled now (take it off the queue).
    Canceled,
    /// It is running: its worker is asked to stop (publish the cancel notice).
    Requested,
    /// It is running and was already asked to stop: nothing to record.
    AlreadyRequested,
}

impl Job {
    /// Decide a cancel: the events to record and what follows. Every entry point that cancels
    /// a job (the API, a workflow run that ends) decides here.
    pub fn cancel(&self, reason: Option<String>) -> Result<(Vec<JobEvent>, Cancel), NotAllowed> {
        if self.status.is_terminal() {
            return Err(NotAllowed(format!("job is already {}", self.status)));
        }
        if self.status == JobStatus::Running {
            if self.cancel_requested {
                return Ok((Vec::new(), Cancel::AlreadyRequested));
            }
            return Ok((
                vec![JobEvent::JobCancelRequested { reason }],
                Cancel::Requested,
            ));
        }
        Ok((
            vec![
                JobEvent::JobCancelRequested { reason },
                JobEvent::JobCanceled {
                    attempt: None,
                    error: None,
                },
            ],
            Cancel::Canceled,
        ))
    }

    /// Decide a manual retry of a failed or canceled job: queued again with a fresh budget of
    /// `budget` attempts (the submission's `max_attempts`).
    pub fn retry(&self, budget: u32) -> Result<Vec<JobEvent>, NotAllowed> {
        if !matches!(self.status, JobStatus::Failed | JobStatus::Canceled) {
            return Err(NotAllowed(format!(
                "only failed or canceled jobs can be retried; this one is {}",
                self.status
            )));
        }
        Ok(vec![JobEvent::JobQueued {
            reason: "manual_retry".into(),
            max_attempts: Some(self.attempt + budget),
        }])
    }

    /// Decide a delete: only a finished job, and not a workflow run's step (it belongs to its
    /// run, whose record and retries refer to it).
    pub fn delete(&self) -> Result<Vec<JobEvent>, NotAllowed> {
        if !self.status.is_terminal() {
            return Err(NotAllowed(format!(
                "only finished jobs can be deleted; this one is {} (cancel it first)",
                self.status
            )));
        }
        if let Some(run) = self.run_id {
            return Err(NotAllowed(format!(
                "this job is a step of workflow run {run}; it is kept with its run"
            )));
        }
        Ok(vec![JobEvent::JobDeleted {}])
    }
}

/// What follows a change of a job's status, besides recording its events. The domain decides
/// it here, next to the fold; the store carries it out in the same transaction (the dispatch
/// outbox, the lease table), and after the commit the queue is told of new dispatches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// It became ready to run: into the dispatch outbox, queued since `since`.
    Dispatch { since: DateTime<Utc> },
    /// It is no longer waiting for a worker: out of the outbox.
    Undispatch,
    /// An attempt started: its worker holds a lease on it.
    GrantLease,
    /// The attempt ended: the lease is released.
    ReleaseLease,
}

impl Job {
    /// What follows from going from status `before` (`None`: a new job) to this state, when
    /// the change is recorded at `at`.
    pub fn follows(&self, before: Option<JobStatus>, at: DateTime<Utc>) -> Vec<Follow> {
        use JobStatus::{Queued, Running};
        let mut out = Vec::new();
        let (was, is) = (before, self.status);
        if is == Queued && was != Some(Queued) {
            out.push(Follow::Dispatch {
                since: self.queued_at.unwrap_or(at),
            });
        }
        if was == Some(Queued) && is != Queued {
            out.push(Follow::Undispatch);
        }
        if is == Running && was != Some(Running) {
            out.push(Follow::GrantLease);
        }
        if was == Some(Running) && is != Running {
            out.push(Follow::ReleaseLease);
        }
        out
    }
}

impl Job {
    /// The state right after `JobSubmitted`.
    pub fn submitted(id: Uuid, namespace: &str, s: &Submission, at: DateTime<Utc>) -> Job {
        Job {
            id,
            namespace: namespace.to_string(),
            kind: s.kind.clone(),
            queue: s.queue.clone(),
            priority: s.priority,
            status: JobStatus::Queued,
            input: s.input.clone(),
            output: None,
            error: None,
            progress: None,
            tags: s.tags.clone(),
            attempt: 0,
            max_attempts: s.max_attempts,
            timeout_s: s.timeout_s,
            backoff: s.backoff,
            callback_url: s.callback_url.clone(),
            callback_events: s.callback_events.clone(),
            run_at: s.run_at,
            cancel_requested: false,
            worker_id: None,
            artifacts: Vec::new(),
            version: 1,
            created_at: at,
            queued_at: Some(at),
            started_at: None,
            finished_at: None,
            updated_at: at,
            run_id: s.run_id,
            step_id: s.step_id.clone(),
            secret_refs: s.secret_refs.clone(),
            expires_at: s.expires_at.or_else(|| {
                s.ttl_s
                    .map(|t| s.due(at) + chrono::Duration::seconds(t as i64))
            }),
            deadline_at: s
                .deadline_s
                .map(|d| s.due(at) + chrono::Duration::seconds(d as i64)),
            ordering_key: s.ordering_key.clone(),
            waiting: None,
            debounce_key: s.debounce_key.clone(),
            traceparent: s.traceparent.clone(),
            deleted: false,
        }
    }

    /// Fold a whole stream (used by rebuilds and tests).
    pub fn replay<'a>(
        id: Uuid,
        namespace: &str,
        events: impl IntoIterator<Item = (&'a JobEvent, DateTime<Utc>)>,
    ) -> Result<Option<Job>, InvalidTransition> {
        let mut job: Option<Job> = None;
        for (ev, at) in events {
            match (&mut job, ev) {
                (None, JobEvent::JobSubmitted(s)) => {
                    job = Some(Job::submitted(id, namespace, s, at))
                }
                (None, other) => {
                    return Err(InvalidTransition {
                        event: other.type_name(),
                        status: JobStatus::Queued,
                    })
                }
                (Some(j), ev) => j.apply(ev, at)?,
            }
        }
        Ok(job)
    }

    /// Apply one event that follows the current state. Bumps `version`.
    pub fn apply(&mut self, ev: &JobEvent, at: DateTime<Utc>) -> Result<(), InvalidTransition> {
        use JobStatus::*;
        let bad = |status| InvalidTransition {
            event: ev.type_name(),
            status,
        };
        if self.deleted {
            return Err(bad(self.status));
        }
        match ev {
            JobEvent::JobSubmitted(_) => return Err(bad(self.status)),
            JobEvent::JobDeleted {} => {
                if !self.status.is_terminal() {
                    return Err(bad(self.status));
                }
                self.deleted = true;
            }
            JobEvent::JobScheduled {
                run_at,
                max_attempts,
                reason,
            } => {
                if self.status.is_terminal() || self.status == Running {
                    return Err(bad(self.status));
                }
                if let Some(m) = max_attempts {
                    self.max_attempts = *m;
                }
                self.status = Scheduled;
                self.run_at = Some(*run_at);
                self.queued_at = None;
                let why = match reason.as_str() {
                    "retry" => "backing_off",
                    "deferred" => "rate_limited",
                    "debounced" => "debounced",
                    _ => "scheduled",
                };
                self.waiting =
                    Some(serde_json::json!({"reason": why, "until": run_at, "since": at}));
            }
            JobEvent::JobQueued {
                max_attempts,
                reason,
            } => {
                if matches!(self.status, Running | Succeeded | Queued) {
                    return Err(bad(self.status));
                }
                if let Some(m) = max_attempts {
                    self.max_attempts = *m;
                }
                if reason == "manual_retry" {
                    self.error = None;
                    self.output = None;
                    self.finished_at = None;
                    self.cancel_requested = false;
                }
                self.status = Queued;
                self.run_at = None;
                self.queued_at = Some(at);
                self.waiting = None;
            }
            JobEvent::JobStarted { attempt, worker } => {
                if self.status != Queued {
                    return Err(bad(self.status));
                }
                self.status = Running;
                self.attempt = *attempt;
                self.worker_id = Some(worker.clone());
                self.started_at = Some(at);
                self.progress = None;
            }
            JobEvent::JobProgress {
                percent,
                message,
                data,
            } => {
                let mut p = serde_json::Map::new();
                if let Some(v) = percent {
                    p.insert("percent".into(), serde_json::json!(v));
                }
                if let Some(v) = message {
                    p.insert("message".into(), serde_json::json!(v));
                }
                if let Some(v) = data {
                    p.insert("data".into(), v.clone());
                    // Files stored while the job runs (a training's checkpoints) are listed at
                    // once, so they stay reachable if the job never succeeds.
                    if let Some(stored) = v
                        .get("artifacts")
                        .and_then(|a| serde_json::from_value::<Vec<Artifact>>(a.clone()).ok())
                    {
                        // Only files stored under this job: a report cannot list another
                        // job's (another tenant's) file as its own.
                        let own = stored
                            .into_iter()
                            .filter(|a| stored_under(a, self.id))
                            .collect();
                        add_artifacts(&mut self.artifacts, own);
                    }
                }
                self.progress = Some(serde_json::Value::Object(p));
            }
            JobEvent::JobLog { .. }
            | JobEvent::JobOutputChunk { .. }
            | JobEvent::JobTimedOut { .. }
            | JobEvent::JobDeduplicated { .. } => {}
            JobEvent::JobDebounced { input, run_at, .. } => {
                if self.status != Scheduled || self.debounce_key.is_none() {
                    return Err(bad(self.status));
                }
                self.input = input.clone();
                self.run_at = Some(*run_at);
                if let Some(w) = self.waiting.as_mut() {
                    w["until"] = serde_json::json!(run_at);
                }
            }
            JobEvent::JobWaiting { .. } => {
                if self.status != Queued {
                    return Err(bad(self.status));
                }
                let mut w = serde_json::to_value(ev).unwrap_or_default()["data"].take();
                w["since"] = serde_json::json!(at);
                self.waiting = Some(w);
            }
            JobEvent::JobSucceeded {
                output, artifacts, ..
            } => {
                if self.status != Running {
                    return Err(bad(self.status));
                }
                self.status = Succeeded;
                self.output = Some(output.clone());
                add_artifacts(&mut self.artifacts, artifacts.clone());
                self.error = None;
                self.finished_at = Some(at);
            }
            JobEvent::JobAttemptFailed {
                error, retry_at, ..
            } => {
                if self.status != Running {
                    return Err(bad(self.status));
                }
                self.error = Some(error.clone());
                // Followed by JobScheduled (retry) or JobFailed; until then the job is queued-less.
                self.status = Scheduled;
                self.run_at = *retry_at;
                self.queued_at = None;
            }
            JobEvent::JobFailed { error, .. } => {
                if self.status.is_terminal() {
                    return Err(bad(self.status));
                }
                self.status = Failed;
                self.error = Some(error.clone());
                self.run_at = None;
                self.queued_at = None;
                self.finished_at = Some(at);
            }
            JobEvent::JobCancelRequested { .. } => {
                if self.status.is_terminal() {
                    return Err(bad(self.status));
                }
                self.cancel_requested = true;
            }
            JobEvent::JobCanceled { error, .. } => {
                if self.status.is_terminal() {
                    return Err(bad(self.status));
                }
                if error.is_some() {
                    self.error = error.clone();
                }
                self.status = Canceled;
                self.run_at = None;
                self.queued_at = None;
                self.finished_at = Some(at);
            }
        }
        if !matches!(self.status, Queued | Scheduled) {
            self.waiting = None;
        }
        // Only the first wait is a debounce: once the job leaves it (queued, canceled), a
        // later retry's wait is not, and the key makes a new job.
        if self.status != Scheduled {
            self.debounce_key = None;
        }
        self.version += 1;
        self.updated_at = at;
        Ok(())
    }

    /// `deadline_exceeded` (naming `last`) when the next try, at `next`, would start at or
    /// after the job's `deadline_at`.
    fn past_deadline(&self, next: DateTime<Utc>, last: &JobError) -> Option<JobError> {
        let deadline = self.deadline_at.filter(|d| next >= *d)?;
        Some(JobError::new(
            "deadline_exceeded",
            format!(
                "the job's deadline ({}) leaves no time for another attempt; the last one failed with {}: {}",
                deadline.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                last.error_type,
                last.message
            ),
        ))
    }

    /// Decide the merge of a later submission with debounce `key` (its `input`, due at
    /// `run_at`) into this job: `JobDebounced` while the job still waits out its delay under
    /// that key, else `None` (the key makes a new job).
    pub fn debounce(
        &self,
        key: &str,
        input: &serde_json::Value,
        run_at: DateTime<Utc>,
    ) -> Option<JobEvent> {
        (self.status == JobStatus::Scheduled && self.debounce_key.as_deref() == Some(key)).then(
            || JobEvent::JobDebounced {
                key: key.to_string(),
                input: input.clone(),
                run_at,
            },
        )
    }

    /// What a waiting job whose time ran out records at `now`: `JobCanceled` with `expired`
    /// (not started by `expires_at`) or `deadline_exceeded` (its `deadline_at` passed), using
    /// no attempt. `None` while it may still start (or once it has).
    pub fn expiry(&self, now: DateTime<Utc>) -> Option<JobEvent> {
        if !matches!(self.status, JobStatus::Queued | JobStatus::Scheduled) {
            return None;
        }
        let at = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let error = match (self.expires_at, self.deadline_at) {
            (Some(e), _) if e <= now => JobError::new(
                "expired",
                format!("not started by its expires_at ({})", at(e)),
            ),
            (_, Some(d)) if d <= now => JobError::new(
                "deadline_exceeded",
                format!("not started by its deadline ({})", at(d)),
            ),
            _ => return None,
        };
        Some(JobEvent::JobCanceled {
            attempt: None,
            error: Some(error),
        })
    }

    /// How long the attempt starting at `now` may run: its `timeout_s`, cut at `deadline_at`.
    pub fn attempt_timeout(&self, now: DateTime<Utc>) -> Option<std::time::Duration> {
        let timeout = self
            .timeout_s
            .map(|s| std::time::Duration::from_secs(s as u64));
        let left = self
            .deadline_at
            .map(|d| (d - now).to_std().unwrap_or_default());
        match (timeout, left) {
            (Some(t), Some(l)) => Some(t.min(l)),
            (t, l) => t.or(l),
        }
    }

    /// The backoff policy in force.
    pub fn backoff_policy(&self) -> Backoff {
        self.backoff.unwrap_or_default()
    }

    /// Events that end attempt `attempt` with `error`: a retry if attempts remain and
    /// `retryable`, else the terminal failure. `retry_after` overrides the backoff.
    pub fn attempt_failure_events(
        &self,
        attempt: u32,
        error: JobError,
        retryable: bool,
        retry_after: Option<std::time::Duration>,
        now: DateTime<Utc>,
    ) -> Vec<JobEvent> {
        if retryable && attempt < self.max_attempts {
            let delay = retry_after.unwrap_or_else(|| self.backoff_policy().delay(attempt));
            let retry_at = now + chrono::Duration::from_std(delay).unwrap_or_default();
            let retry_at = crate::domain::truncate_micros(retry_at);
            if let Some(error) = self.past_deadline(retry_at, &error) {
                return self.attempt_failure_events(attempt, error, false, None, now);
            }
            vec![
                JobEvent::JobAttemptFailed {
                    attempt,
                    error,
                    retry_at: Some(retry_at),
                },
                JobEvent::JobScheduled {
                    run_at: retry_at,
                    reason: "retry".into(),
                    max_attempts: None,
                },
            ]
        } else {
            vec![
                JobEvent::JobAttemptFailed {
                    attempt,
                    error: error.clone(),
                    retry_at: None,
                },
                JobEvent::JobFailed { attempt, error },
            ]
        }
    }
}

/// How an attempt ended, as its worker reports it (the built-in worker, a worker of the HTTP
/// protocol): [`Job::end_attempt`] turns it into the events, so retries, backoff, `retry_after`
/// and cancellation are decided in one place.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptEnd {
    Succeeded {
        output: serde_json::Value,
        artifacts: Vec<Artifact>,
    },
    /// Failed: retried (after `retry_after`, else the backoff) while attempts remain and
    /// `retryable`; a non-retryable failure of a job whose cancel was requested is its
    /// cancellation.
    Failed {
        error: JobError,
        retryable: bool,
        retry_after: Option<std::time::Duration>,
    },
    TimedOut,
    Canceled,
    /// The worker is stopping: the attempt is given back without using up one.
    Released,
    /// The attempt waited for something outside the job (a rate limit) and gives the attempt
    /// back: the job is scheduled again after `after`, without using up one.
    Deferred {
        error: JobError,
        after: std::time::Duration,
    },
}

impl Job {
    /// The events that end attempt `attempt` as `end` says, at `now`.
    pub fn end_attempt(&self, attempt: u32, end: AttemptEnd, now: DateTime<Utc>) -> Vec<JobEvent> {
        match end {
            AttemptEnd::Succeeded { output, artifacts } => vec![JobEvent::JobSucceeded {
                attempt,
                output,
                artifacts,
            }],
            AttemptEnd::Failed {
                retryable: false, ..
            } if self.cancel_requested => {
                vec![JobEvent::JobCanceled {
                    attempt: Some(attempt),
                    error: None,
                }]
            }
            AttemptEnd::Failed {
                error,
                retryable,
                retry_after,
            } => self.attempt_failure_events(attempt, error, retryable, retry_after, now),
            AttemptEnd::TimedOut => {
                let secs = self.timeout_s.unwrap_or_default();
                let mut evs = vec![JobEvent::JobTimedOut { attempt }];
                evs.extend(self.attempt_failure_events(
                    attempt,
                    JobError::new("timeout", format!("attempt exceeded timeout_s = {secs}")),
                    true,
                    None,
                    now,
                ));
                evs
            }
            AttemptEnd::Canceled => vec![JobEvent::JobCanceled {
                attempt: Some(attempt),
                error: None,
            }],
            AttemptEnd::Released => vec![
                JobEvent::JobAttemptFailed {
                    attempt,
                    error: JobError::new(
                        "worker_shutdown",
                        "the worker stopped before the attempt finished",
                    ),
                    retry_at: Some(now),
                },
                JobEvent::JobQueued {
                    reason: "released".into(),
                    max_attempts: Some(self.max_attempts + 1),
                },
            ],
            AttemptEnd::Deferred { .. } if self.cancel_requested => {
                vec![JobEvent::JobCanceled {
                    attempt: Some(attempt),
                    error: None,
                }]
            }
            AttemptEnd::Deferred { error, after } => {
                let run_at = now + chrono::Duration::from_std(after).unwrap_or_default();
                let run_at = crate::domain::truncate_micros(run_at);
                if let Some(error) = self.past_deadline(run_at, &error) {
                    return self.attempt_failure_events(attempt, error, false, None, now);
                }
                vec![
                    JobEvent::JobAttemptFailed {
                        attempt,
                        error,
                        retry_at: Some(run_at),
                    },
                    JobEvent::JobScheduled {
                        run_at,
                        reason: "deferred".into(),
                        max_attempts: Some(self.max_attempts + 1),
                    },
                ]
            }
        }
    }
}

/// A queue name: 1-64 letters, digits, '.', '_' or '-' (no '/': dispatch lanes use it).
pub fn valid_queue_name(q: &str) -> bool {
    !q.is_empty()
        && q.len() <= 64
        && q.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Validate common submission fields (kind-specific input is checked in [`super::kinds`]).
pub fn validate_tags(tags: &BTreeMap<String, String>) -> Result<(), FieldError> {
    if tags.len() > 32 {
        return Err(FieldError::new("tags", "at most 32 tags"));
    }
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > 64 || k.contains(':') {
            return Err(FieldError::new(
                format!("tags.{k}"),
                "tag keys are 1-64 characters without ':'",
            ));
        }
        if v.chars().count() > 256 {
            return Err(FieldError::new(
                format!("tags.{k}"),
                "tag values are at most 256 characters",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submission() -> Submission {
        Submission {
            kind: "echo".into(),
            input: serde_json::json!({"a": 1}),
            queue: "default".into(),
            priority: Priority::Normal,
            run_at: None,
            max_attempts: 3,
            timeout_s: None,
            backoff: None,
            callback_url: None,
            callback_events: None,
            tags: BTreeMap::new(),
            run_id: None,
            step_id: None,
            secret_refs: None,
            expires_at: None,
            ttl_s: None,
            deadline_s: None,
            ordering_key: None,
            debounce_key: None,
            traceparent: None,
        }
    }

    #[test]
    fn waiting_says_why_a_job_is_not_running_until_it_runs() {
        let at = crate::domain::now();
        let mut job = Job::submitted(Uuid::now_v7(), "default", &submission(), at);
        assert_eq!(job.waiting, None);
        let hold = JobEvent::JobWaiting {
            reason: "concurrency".into(),
            limit: Some("per-tenant".into()),
            key: Some("acme".into()),
            target: None,
            until: None,
        };
        job.apply(&hold, at).unwrap();
        let w = job.waiting.clone().unwrap();
        assert_eq!(w["reason"], "concurrency");
        assert_eq!(w["key"], "acme");
        for e in [
            JobEvent::JobStarted {
                attempt: 1,
                worker: "w".into(),
            },
            JobEvent::JobAttemptFailed {
                attempt: 1,
                error: JobError::new("executor_error", "x"),
                retry_at: Some(at),
            },
            JobEvent::JobScheduled {
                run_at: at,
                reason: "retry".into(),
                max_attempts: None,
            },
        ] {
            job.apply(&e, at).unwrap();
        }
        assert_eq!(job.waiting.as_ref().unwrap()["reason"], "backing_off");
        job.apply(
            &JobEvent::JobQueued {
                reason: "due".into(),
                max_attempts: None,
            },
            at,
        )
        .unwrap();
        assert_eq!(job.waiting, None);
        // Waiting is only for a queued job.
        job.apply(
            &JobEvent::JobStarted {
                attempt: 2,
                worker: "w".into(),
            },
            at,
        )
        .unwrap();
        assert!(job.apply(&hold, at).is_err());
        assert_eq!(job.waiting, None);
    }

    #[test]
    fn a_debounced_job_takes_each_merge_until_it_leaves_its_wait_and_replays_identically() {
        let at = crate::domain::now();
        let later = |s: i64| at + chrono::Duration::seconds(s);
        let sub = Submission {
            run_at: Some(later(5)),
            debounce_key: Some("k".into()),
            ..submission()
        };
        let mut log: Vec<(JobEvent, DateTime<Utc>)> =
            sub.into_events(at).into_iter().map(|e| (e, at)).collect();
        assert!(
            matches!(&log[1].0, JobEvent::JobScheduled { reason, .. } if reason == "debounced")
        );
        let id = Uuid::now_v7();
        let fold = |log: &[(JobEvent, DateTime<Utc>)]| {
            Job::replay(id, "default", log.iter().map(|(e, t)| (e, *t)))
                .unwrap()
                .unwrap()
        };
        let job = fold(&log);
        assert_eq!(job.debounce_key.as_deref(), Some("k"));
        // Another key, or the same key after the job left its wait, does not merge.
        assert!(job
            .debounce("other", &serde_json::json!({}), later(6))
            .is_none());
        let merge = job
            .debounce("k", &serde_json::json!({"n": 2}), later(7))
            .unwrap();
        log.push((merge, later(2)));
        let job = fold(&log);
        assert_eq!(job.input, serde_json::json!({"n": 2}));
        assert_eq!(job.run_at, Some(later(7)));
        assert_eq!(job.status, JobStatus::Scheduled);

        log.push((
            JobEvent::JobQueued {
                reason: "due".into(),
                max_attempts: None,
            },
            later(7),
        ));
        let job = fold(&log);
        assert_eq!(job.debounce_key, None);
        assert!(job
            .debounce("k", &serde_json::json!({}), later(8))
            .is_none());
        // A merge can no longer apply: the log would be corrupt.
        let mut bad = job.clone();
        let stale = JobEvent::JobDebounced {
            key: "k".into(),
            input: serde_json::json!({}),
            run_at: later(9),
        };
        assert!(bad.apply(&stale, later(8)).is_err());
        // The fold is a function of the log: folding again gives the same row.
        assert_eq!(fold(&log), job);
    }

    #[test]
    fn what_follows_a_status_change_is_decided_by_the_domain() {
        let at = crate::domain::now();
        let job = Job::submitted(Uuid::now_v7(), "default", &submission(), at);
        assert_eq!(job.status, JobStatus::Queued);
        // A new queued job is dispatched; nothing else.
        assert_eq!(
            job.follows(None, at),
            vec![Follow::Dispatch {
                since: job.queued_at.unwrap()
            }]
        );
        // Starting takes it out of the outbox and grants a lease.
        let running = decided(
            job.clone(),
            &[JobEvent::JobStarted {
                attempt: 1,
                worker: "w".into(),
            }],
        );
        assert_eq!(
            running.follows(Some(JobStatus::Queued), at),
            vec![Follow::Undispatch, Follow::GrantLease]
        );
        // Ending the attempt releases the lease; a progress report changes nothing.
        let (events, _) = running.cancel(None).unwrap();
        let still = decided(running.clone(), &events);
        assert_eq!(still.follows(Some(JobStatus::Running), at), vec![]);
        let failed = decided(
            running,
            &[JobEvent::JobFailed {
                attempt: 1,
                error: JobError::new("boom", "no"),
            }],
        );
        assert_eq!(
            failed.follows(Some(JobStatus::Running), at),
            vec![Follow::ReleaseLease]
        );
        // Staying queued (a re-dispatch) is not a new dispatch.
        assert_eq!(job.follows(Some(JobStatus::Queued), at), vec![]);
    }

    /// Apply a decision's events, as the store would.
    fn decided(mut job: Job, events: &[JobEvent]) -> Job {
        for e in events {
            job.apply(e, crate::domain::now()).unwrap();
        }
        job
    }

    #[test]
    fn progress_lists_only_the_jobs_own_files() {
        let at = crate::domain::now();
        let job = Job::submitted(Uuid::now_v7(), "default", &submission(), at);
        let other = Uuid::now_v7();
        let file = |job: Uuid, name: &str, prefix: &str| {
            serde_json::json!({"name": name, "content_type": "application/octet-stream",
                "size": 1, "location": format!("file:///a{prefix}/jobs/{job}/{name}")})
        };
        let running = decided(
            job.clone(),
            &[JobEvent::JobStarted {
                attempt: 1,
                worker: "w".into(),
            }],
        );
        let reported = decided(
            running,
            &[JobEvent::JobProgress {
                percent: None,
                message: None,
                data: Some(serde_json::json!({"artifacts": [
                    file(job.id, "ckpt-1", ""),
                    file(other, "secret.wav", ""),
                    file(job.id, "x", &format!("/jobs/{other}/y/..")),
                ]})),
            }],
        );
        let names: Vec<&str> = reported.artifacts.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["ckpt-1"]);
    }

    #[test]
    fn cancel_is_decided_by_the_jobs_state() {
        let now = crate::domain::now();
        let queued = Job::submitted(Uuid::now_v7(), "default", &submission(), now);
        let (events, done) = queued.cancel(None).unwrap();
        assert_eq!(done, Cancel::Canceled);
        let canceled = decided(queued, &events);
        assert_eq!(canceled.status, JobStatus::Canceled);
        assert!(canceled
            .cancel(None)
            .unwrap_err()
            .0
            .contains("already canceled"));

        let running = decided(
            Job::submitted(Uuid::now_v7(), "default", &submission(), now),
            &[JobEvent::JobStarted {
                attempt: 1,
                worker: "w".into(),
            }],
        );
        let (events, done) = running.cancel(Some("why".into())).unwrap();
        assert_eq!(done, Cancel::Requested);
        let asked = decided(running, &events);
        assert_eq!(asked.status, JobStatus::Running);
        let (events, done) = asked.cancel(None).unwrap();
        assert_eq!((events.len(), done), (0, Cancel::AlreadyRequested));
    }

    #[test]
    fn retry_gives_a_failed_or_canceled_job_a_fresh_budget() {
        let now = crate::domain::now();
        let queued = Job::submitted(Uuid::now_v7(), "default", &submission(), now);
        assert!(queued
            .retry(3)
            .unwrap_err()
            .0
            .contains("this one is queued"));
        let (events, _) = queued.cancel(None).unwrap();
        let canceled = decided(queued, &events);
        let events = canceled.retry(3).unwrap();
        let retried = decided(canceled, &events);
        assert_eq!(retried.status, JobStatus::Queued);
        assert_eq!(retried.max_attempts, retried.attempt + 3);
    }

    #[test]
    fn only_a_finished_job_outside_a_run_is_deleted_and_nothing_applies_after() {
        let now = crate::domain::now();
        let queued = Job::submitted(Uuid::now_v7(), "default", &submission(), now);
        assert!(queued
            .delete()
            .unwrap_err()
            .0
            .contains("only finished jobs can be deleted; this one is queued"));
        let (events, _) = queued.cancel(None).unwrap();
        let canceled = decided(queued, &events);
        let events = canceled.delete().unwrap();
        let (t, d) = events[0].to_parts();
        assert_eq!((t, &d), ("JobDeleted", &serde_json::json!({})));
        assert_eq!(JobEvent::from_parts(t, d).unwrap(), events[0]);
        let deleted = decided(canceled.clone(), &events);
        assert!(deleted.deleted);
        assert_eq!(deleted.version, canceled.version + 1);
        // Never stored: the row of a deleted job is removed, not written.
        assert!(serde_json::to_value(&deleted)
            .unwrap()
            .get("deleted")
            .is_none());
        let mut again = deleted.clone();
        assert!(again.apply(&JobEvent::JobDeleted {}, now).is_err());
        assert!(again.retry(3).is_ok(), "the domain decision alone");
        assert!(again
            .apply(
                &JobEvent::JobQueued {
                    reason: "manual_retry".into(),
                    max_attempts: None
                },
                now
            )
            .is_err());

        let mut step = canceled;
        step.run_id = Some(Uuid::now_v7());
        assert!(step
            .delete()
            .unwrap_err()
            .0
            .contains("is a step of workflow run"));
    }

    #[test]
    fn events_round_trip_through_type_and_data() {
        let ev = JobEvent::JobStarted {
            attempt: 2,
            worker: "w1".into(),
        };
        let (t, d) = ev.to_parts();
        assert_eq!(t, "JobStarted");
        assert_eq!(d, serde_json::json!({"attempt": 2, "worker": "w1"}));
        assert_eq!(JobEvent::from_parts(t, d).unwrap(), ev);
    }

    #[test]
    fn a_job_runs_through_retry_to_success() {
        let now = crate::domain::now();
        let mut job = Job::submitted(Uuid::now_v7(), "default", &submission(), now);
        assert_eq!(job.status, JobStatus::Queued);
        job.apply(
            &JobEvent::JobStarted {
                attempt: 1,
                worker: "w".into(),
            },
            now,
        )
        .unwrap();
        for ev in job.attempt_failure_events(1, JobError::new("x", "boom"), true, None, now) {
            job.apply(&ev, now).unwrap();
        }
        assert_eq!(job.status, JobStatus::Scheduled);
        assert!(job.run_at.unwrap() > now);
        job.apply(
            &JobEvent::JobQueued {
                reason: "due".into(),
                max_attempts: None,
            },
            now,
        )
        .unwrap();
        job.apply(
            &JobEvent::JobStarted {
                attempt: 2,
                worker: "w".into(),
            },
            now,
        )
        .unwrap();
        job.apply(
            &JobEvent::JobSucceeded {
                attempt: 2,
                output: serde_json::json!(1),
                artifacts: vec![],
            },
            now,
        )
        .unwrap();
        assert_eq!(job.status, JobStatus::Succeeded);
        assert_eq!(job.version, 7);
    }

    #[test]
    fn the_last_attempt_fails_the_job() {
        let now = crate::domain::now();
        let mut job = Job::submitted(Uuid::now_v7(), "default", &submission(), now);
        job.max_attempts = 1;
        job.apply(
            &JobEvent::JobStarted {
                attempt: 1,
                worker: "w".into(),
            },
            now,
        )
        .unwrap();
        for ev in job.attempt_failure_events(1, JobError::new("x", "boom"), true, None, now) {
            job.apply(&ev, now).unwrap();
        }
        assert_eq!(job.status, JobStatus::Failed);
    }

    #[test]
    fn a_finished_job_cannot_start_again() {
        let now = crate::domain::now();
        let mut job = Job::submitted(Uuid::now_v7(), "default", &submission(), now);
        job.apply(
            &JobEvent::JobCanceled {
                attempt: None,
                error: None,
            },
            now,
        )
        .unwrap();
        assert!(job
            .apply(
                &JobEvent::JobStarted {
                    attempt: 1,
                    worker: "w".into()
                },
                now
            )
            .is_err());
    }

    #[test]
    fn a_deferred_attempt_is_scheduled_again_without_using_up_an_attempt() {
        let at = crate::domain::now();
        let job = Job::submitted(Uuid::now_v7(), "default", &submission(), at);
        let mut job = job;
        // Three attempts deferred in a row: the job still has its three attempts.
        for attempt in 1..=3 {
            if job.status == JobStatus::Scheduled {
                job = decided(
                    job,
                    &[JobEvent::JobQueued {
                        reason: "due".into(),
                        max_attempts: None,
                    }],
                );
            }
            let running = decided(
                job.clone(),
                &[JobEvent::JobStarted {
                    attempt,
                    worker: "w".into(),
                }],
            );
            let end = AttemptEnd::Deferred {
                error: JobError::new("rate_limited", "later"),
                after: std::time::Duration::from_secs(5),
            };
            let events = running.end_attempt(attempt, end, at);
            assert!(matches!(
                &events[1],
                JobEvent::JobScheduled { reason, max_attempts: Some(m), run_at }
                    if reason == "deferred" && *m == 3 + attempt && *run_at > at
            ));
            job = decided(running, &events);
            assert_eq!(job.status, JobStatus::Scheduled);
            assert_eq!(job.max_attempts - job.attempt, 3);
        }
        // A job whose cancel was requested is canceled instead.
        let mut running = decided(
            job,
            &[
                JobEvent::JobQueued {
                    reason: "due".into(),
                    max_attempts: None,
                },
                JobEvent::JobStarted {
                    attempt: 4,
                    worker: "w".into(),
                },
            ],
        );
        running.cancel_requested = true;
        let end = AttemptEnd::Deferred {
            error: JobError::new("rate_limited", "later"),
            after: std::time::Duration::from_secs(5),
        };
        assert!(matches!(
            running.end_attempt(4, end, at)[..],
            [JobEvent::JobCanceled {
                attempt: Some(4),
                ..
            }]
        ));
        // Events written before `max_attempts` existed on JobScheduled still read.
        let old: JobEvent = serde_json::from_value(serde_json::json!(
            {"type": "JobScheduled", "data": {"run_at": at, "reason": "retry"}}
        ))
        .unwrap();
        assert!(matches!(
            old,
            JobEvent::JobScheduled {
                max_attempts: None,
                ..
            }
        ));
    }

    #[test]
    fn deadlines_cancel_waiting_jobs_cut_attempts_and_stop_retries() {
        let at = crate::domain::now();
        let secs = |n: i64| chrono::Duration::seconds(n);
        let mut sub = submission();
        sub.ttl_s = Some(10);
        sub.deadline_s = Some(60);
        sub.timeout_s = Some(300);
        let job = Job::submitted(Uuid::now_v7(), "default", &sub, at);
        assert_eq!(job.expires_at, Some(at + secs(10)));
        assert_eq!(job.deadline_at, Some(at + secs(60)));
        // ttl and deadline count from run_at when the job is delayed.
        let mut later = sub.clone();
        later.run_at = Some(at + secs(100));
        let delayed = Job::submitted(Uuid::now_v7(), "default", &later, at);
        assert_eq!(delayed.expires_at, Some(at + secs(110)));
        // Waiting past expires_at: canceled with `expired`, no attempt.
        assert_eq!(job.expiry(at + secs(9)), None);
        let expired = decided(job.clone(), &[job.expiry(at + secs(10)).unwrap()]);
        assert_eq!(expired.status, JobStatus::Canceled);
        assert_eq!(expired.error.as_ref().unwrap().error_type, "expired");
        assert_eq!(expired.attempt, 0);
        // Once started, it no longer expires; the attempt is cut at the deadline.
        let running = decided(
            job.clone(),
            &[JobEvent::JobStarted {
                attempt: 1,
                worker: "w".into(),
            }],
        );
        assert_eq!(running.expiry(at + secs(30)), None);
        assert_eq!(
            running.attempt_timeout(at + secs(50)),
            Some(std::time::Duration::from_secs(10))
        );
        assert_eq!(
            running.attempt_timeout(at),
            Some(std::time::Duration::from_secs(60))
        );
        // A retry that would start past the deadline is not made.
        let events = running.attempt_failure_events(
            1,
            JobError::new("boom", "no"),
            true,
            Some(std::time::Duration::from_secs(30)),
            at + secs(40),
        );
        match &events[..] {
            [JobEvent::JobAttemptFailed { retry_at: None, .. }, JobEvent::JobFailed { error, .. }] =>
            {
                assert_eq!(error.error_type, "deadline_exceeded");
                assert!(error.message.contains("boom: no"), "{}", error.message);
            }
            other => panic!("{other:?}"),
        }
        // One that starts before it is.
        let events = running.attempt_failure_events(1, JobError::new("boom", "no"), true, None, at);
        assert!(matches!(events[1], JobEvent::JobScheduled { .. }));
        // A queued job whose deadline passed is canceled with `deadline_exceeded`.
        let mut only_deadline = submission();
        only_deadline.deadline_s = Some(5);
        let waiting = Job::submitted(Uuid::now_v7(), "default", &only_deadline, at);
        match waiting.expiry(at + secs(5)) {
            Some(JobEvent::JobCanceled {
                attempt: None,
                error: Some(e),
            }) => assert_eq!(e.error_type, "deadline_exceeded"),
            other => panic!("{other:?}"),
        }
    }
}
