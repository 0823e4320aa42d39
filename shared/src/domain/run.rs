//! Workflow runs: the run stream's events, the fold into the `runs` row, and the planner that
//! decides — from a run's state and its pinned definition — which steps are ready, skipped or
//! finished and what jobs to submit.
//!
//! The planner is pure. Whoever appends to a run stream (the API starting, signalling,
//! canceling or retrying a run; the orchestrator recording a step's job ending) folds the new
//! facts in, calls [`advance`], and appends the facts and the planner's events in one
//! transaction at the run's expected version. Two writers racing on one run conflict and the
//! loser re-reads and re-plans, so every dependent step is scheduled exactly once.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    str::FromStr,
    sync::{Arc, OnceLock},
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{
    kinds::{self, KindContext},
    template,
    workflow::{
        self, MapInput, OnFailure, StepDef, SubWorkflowInput, WaitInput, WorkflowDef, WAIT_KIND,
    },
    FieldError,
};

/// What a rendered step input is checked against before its job is submitted: the same checks
/// as a job submitted through the API ([`kinds::validate_input`], the input size limit).
#[derive(Clone)]
pub struct StepChecks {
    /// Largest input, as JSON (`CAPIBARA_INPUT_LIMIT_BYTES`).
    pub input_limit_bytes: usize,
    /// What is installed here (voices).
    pub kinds: Arc<dyn KindContext + Send + Sync>,
}

/// Until [`set_step_checks`]: the default input limit, and any voice (the worker refuses a
/// voice it lacks).
struct AnyVoice;

impl KindContext for AnyVoice {
    fn voice_installed(&self, _voice: &str) -> bool {
        true
    }

    fn installed_voices(&self) -> Vec<String> {
        Vec::new()
    }
}

static STEP_CHECKS: OnceLock<StepChecks> = OnceLock::new();

/// Set this process's [`StepChecks`] (once, at startup, from the configuration).
pub fn set_step_checks(checks: StepChecks) {
    let _ = STEP_CHECKS.set(checks);
}

fn step_checks() -> StepChecks {
    STEP_CHECKS.get().cloned().unwrap_or_else(|| StepChecks {
        input_limit_bytes: 1024 * 1024,
        kinds: Arc::new(AnyVoice),
    })
}

/// The first string in `v` (keys included) holding a NUL character, which Postgres cannot
/// store, as a field path under `at`.
fn nul_in(v: &Value, at: &str) -> Option<String> {
    match v {
        Value::String(s) => s.contains('\0').then(|| at.to_string()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, x)| nul_in(x, &format!("{at}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(k, x)| {
            if k.contains('\0') {
                Some(at.to_string())
            } else {
                nul_in(x, &format!("{at}.{k}"))
            }
        }),
        _ => None,
    }
}

/// Check a rendered value that will be stored: its size and that Postgres can store it.
fn check_storable(v: &Value, field: &str, limit: usize) -> Result<(), FieldError> {
    let size = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(0);
    if size > limit {
        return Err(FieldError::new(
            field,
            format!("is {size} bytes after rendering; the limit is {limit} bytes (CAPIBARA_INPUT_LIMIT_BYTES)"),
        ));
    }
    match nul_in(v, field) {
        Some(at) => Err(FieldError::new(
            at,
            "contains a NUL character (\\u0000), which cannot be stored",
        )),
        None => Ok(()),
    }
}

/// Check a step job's rendered input as a submitted job's input is checked.
pub fn check_rendered_input(kind: &str, input: &Value) -> Result<(), FieldError> {
    let checks = step_checks();
    check_storable(input, "input", checks.input_limit_bytes)?;
    kinds::validate_input(kind, input, checks.kinds.as_ref()).map(|_| ())
}

/// Run status (contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Queued,
    Running,
    /// Nothing runs; a step waits for a signal.
    Waiting,
    Succeeded,
    Failed,
    Canceled,
}

impl RunStatus {
    pub const ALL: [RunStatus; 6] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Waiting,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Waiting => "waiting",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Canceled => "canceled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Canceled
        )
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("unknown status `{s}` (expected queued, running, waiting, succeeded, failed or canceled)")
            })
    }
}

/// Step status (contract).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Pending,
    Ready,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Canceled,
    Waiting,
}

impl StepStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StepStatus::Succeeded | StepStatus::Failed | StepStatus::Skipped | StepStatus::Canceled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Ready => "ready",
            StepStatus::Running => "running",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::Canceled => "canceled",
            StepStatus::Waiting => "waiting",
        }
    }
}

/// One child of a `map` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ItemState {
    pub index: u32,
    pub status: StepStatus,
    pub job_id: Option<Uuid>,
    pub attempt: u32,
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// One step of a run (contract fields first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StepState {
    pub id: String,
    pub kind: String,
    pub status: StepStatus,
    /// The step's job (job kinds and `wait`).
    pub job_id: Option<Uuid>,
    /// Attempts of the step's job started so far.
    pub attempt: u32,
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The rendered input the step ran with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub input: Option<Value>,
    /// Why the step was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The child run of a `workflow` step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_run_id: Option<Uuid>,
    /// Children of a `map` step, in item order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<ItemState>>,
    pub ready_at: Option<DateTime<Utc>>,
}

impl StepState {
    fn new(id: &str, kind: &str) -> StepState {
        StepState {
            id: id.to_string(),
            kind: kind.to_string(),
            status: StepStatus::Pending,
            job_id: None,
            attempt: 0,
            output: None,
            error: None,
            started_at: None,
            finished_at: None,
            input: None,
            reason: None,
            child_run_id: None,
            items: None,
            ready_at: None,
        }
    }
}

/// Step id and kind, as recorded when a run starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepHead {
    pub id: String,
    pub kind: String,
}

/// The `runs` projection row, and the run as the API returns it (contract fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Run {
    pub id: Uuid,
    pub namespace: String,
    pub workflow_id: Uuid,
    pub workflow_name: String,
    /// The workflow version this run pinned.
    pub version: u32,
    pub status: RunStatus,
    #[schema(value_type = Object)]
    pub input: Value,
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
    pub steps: Vec<StepState>,
    /// Signals received and not yet consumed by a step, by name.
    #[schema(value_type = Object)]
    pub signals: BTreeMap<String, Value>,
    pub parent_run_id: Option<Uuid>,
    pub parent_step_id: Option<String>,
    pub callback_url: Option<String>,
    pub stream_version: i64,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// Events of a run stream (contract names, DESIGN §3; `RunRetried` is Capibara's addition).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum RunEvent {
    RunStarted {
        workflow_id: Uuid,
        workflow_name: String,
        version: u32,
        input: Value,
        steps: Vec<StepHead>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent_run_id: Option<Uuid>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent_step_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        callback_url: Option<String>,
    },
    StepReady {
        step_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_id: Option<Uuid>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        child_run_id: Option<Uuid>,
        /// Number of children of a `map` step.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        items: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input: Option<Value>,
    },
    StepStarted {
        step_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<u32>,
        job_id: Uuid,
        attempt: u32,
    },
    StepSucceeded {
        step_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<u32>,
        output: Value,
    },
    StepFailed {
        step_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<u32>,
        error: Value,
    },
    StepSkipped {
        step_id: String,
        reason: String,
    },
    SignalReceived {
        name: String,
        payload: Value,
    },
    RunSucceeded {
        output: Value,
    },
    RunFailed {
        error: Value,
    },
    RunCanceled {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Steps that did not succeed go back to pending (succeeded outputs are kept).
    RunRetried {
        steps: Vec<String>,
    },
}

impl RunEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            RunEvent::RunStarted { .. } => "RunStarted",
            RunEvent::StepReady { .. } => "StepReady",
            RunEvent::StepStarted { .. } => "StepStarted",
            RunEvent::StepSucceeded { .. } => "StepSucceeded",
            RunEvent::StepFailed { .. } => "StepFailed",
            RunEvent::StepSkipped { .. } => "StepSkipped",
            RunEvent::SignalReceived { .. } => "SignalReceived",
            RunEvent::RunSucceeded { .. } => "RunSucceeded",
            RunEvent::RunFailed { .. } => "RunFailed",
            RunEvent::RunCanceled { .. } => "RunCanceled",
            RunEvent::RunRetried { .. } => "RunRetried",
        }
    }

    pub fn to_parts(&self) -> (&'static str, Value) {
        let v = serde_json::to_value(self).expect("run events serialize");
        (
            self.type_name(),
            v.get("data").cloned().unwrap_or(Value::Null),
        )
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            RunEvent::RunSucceeded { .. }
                | RunEvent::RunFailed { .. }
                | RunEvent::RunCanceled { .. }
        )
    }
}

impl Run {
    /// The fold (inline projection, rebuild, and the planner's view of its own events).
    pub fn apply(
        prev: Option<Run>,
        id: Uuid,
        namespace: &str,
        e: &RunEvent,
        at: DateTime<Utc>,
    ) -> Option<Run> {
        let mut r = match (prev, e) {
            (
                None,
                RunEvent::RunStarted {
                    workflow_id,
                    workflow_name,
                    version,
                    input,
                    steps,
                    parent_run_id,
                    parent_step_id,
                    callback_url,
                },
            ) => Run {
                id,
                namespace: namespace.to_string(),
                workflow_id: *workflow_id,
                workflow_name: workflow_name.clone(),
                version: *version,
                status: RunStatus::Running,
                input: input.clone(),
                output: None,
                error: None,
                steps: steps
                    .iter()
                    .map(|s| StepState::new(&s.id, &s.kind))
                    .collect(),
                signals: BTreeMap::new(),
                parent_run_id: *parent_run_id,
                parent_step_id: parent_step_id.clone(),
                callback_url: callback_url.clone(),
                stream_version: 0,
                created_at: at,
                started_at: Some(at),
                finished_at: None,
                updated_at: at,
            },
            (None, _) => return None,
            (Some(r), _) => r,
        };
        r.fold(e, at);
        r.stream_version += 1;
        r.updated_at = at;
        if !r.status.is_terminal() {
            r.status = r.live_status();
        }
        Some(r)
    }

    fn fold(&mut self, e: &RunEvent, at: DateTime<Utc>) {
        match e {
            RunEvent::RunStarted { .. } => {}
            RunEvent::StepReady {
                step_id,
                index,
                job_id,
                child_run_id,
                items,
                input,
            } => {
                let Some(s) = self.step_mut(step_id) else {
                    return;
                };
                match index {
                    Some(i) => {
                        if let Some(item) = s.item_mut(*i) {
                            item.status = StepStatus::Ready;
                            item.job_id = *job_id;
                        }
                    }
                    None => {
                        s.ready_at = Some(at);
                        s.job_id = *job_id;
                        s.child_run_id = *child_run_id;
                        s.input = input.clone();
                        s.status = match s.kind.as_str() {
                            "approval" => StepStatus::Waiting,
                            "map" | "workflow" => StepStatus::Running,
                            _ => StepStatus::Ready,
                        };
                        if matches!(s.status, StepStatus::Running | StepStatus::Waiting) {
                            s.started_at = Some(at);
                        }
                        if let Some(n) = items {
                            s.items = Some(
                                (0..*n)
                                    .map(|index| ItemState {
                                        index,
                                        status: StepStatus::Pending,
                                        job_id: None,
                                        attempt: 0,
                                        output: None,
                                        error: None,
                                        started_at: None,
                                        finished_at: None,
                                    })
                                    .collect(),
                            );
                        }
                    }
                }
            }
            RunEvent::StepStarted {
                step_id,
                index,
                attempt,
                ..
            } => {
                let Some(s) = self.step_mut(step_id) else {
                    return;
                };
                match index {
                    Some(i) => {
                        if let Some(item) = s.item_mut(*i) {
                            item.status = StepStatus::Running;
                            item.attempt = *attempt;
                            item.started_at.get_or_insert(at);
                        }
                    }
                    None => {
                        s.status = StepStatus::Running;
                        s.attempt = *attempt;
                        s.started_at.get_or_insert(at);
                    }
                }
            }
            RunEvent::StepSucceeded {
                step_id,
                index,
                output,
            } => {
                let Some(s) = self.step_mut(step_id) else {
                    return;
                };
                match index {
                    Some(i) => {
                        if let Some(item) = s.item_mut(*i) {
                            item.status = StepStatus::Succeeded;
                            item.output = Some(output.clone());
                            item.finished_at = Some(at);
                        }
                    }
                    None => {
                        s.status = StepStatus::Succeeded;
                        s.output = Some(output.clone());
                        s.error = None;
                        s.started_at.get_or_insert(at);
                        s.finished_at = Some(at);
                        if s.kind == "approval" {
                            self.signals.remove(step_id);
                        }
                    }
                }
            }
            RunEvent::StepFailed {
                step_id,
                index,
                error,
            } => {
                let Some(s) = self.step_mut(step_id) else {
                    return;
                };
                match index {
                    Some(i) => {
                        if let Some(item) = s.item_mut(*i) {
                            item.status = StepStatus::Failed;
                            item.error = Some(error.clone());
                            item.finished_at = Some(at);
                        }
                    }
                    None => {
                        s.status = StepStatus::Failed;
                        s.error = Some(error.clone());
                        s.finished_at = Some(at);
                        for item in s.items.iter_mut().flatten() {
                            if !item.status.is_terminal() {
                                item.status = StepStatus::Canceled;
                                item.finished_at = Some(at);
                            }
                        }
                    }
                }
            }
            RunEvent::StepSkipped { step_id, reason } => {
                if let Some(s) = self.step_mut(step_id) {
                    s.status = StepStatus::Skipped;
                    s.reason = Some(reason.clone());
                    s.finished_at = Some(at);
                }
            }
            RunEvent::SignalReceived { name, payload } => {
                self.signals.insert(name.clone(), payload.clone());
            }
            RunEvent::RunSucceeded { output } => {
                self.status = RunStatus::Succeeded;
                self.output = Some(output.clone());
                self.finished_at = Some(at);
            }
            RunEvent::RunFailed { error } => {
                self.status = RunStatus::Failed;
                self.error = Some(error.clone());
                self.finished_at = Some(at);
                self.cancel_unfinished(at);
            }
            RunEvent::RunCanceled { .. } => {
                self.status = RunStatus::Canceled;
                self.finished_at = Some(at);
                self.cancel_unfinished(at);
            }
            RunEvent::RunRetried { steps } => {
                self.status = RunStatus::Running;
                self.error = None;
                self.output = None;
                self.finished_at = None;
                for s in self.steps.iter_mut().filter(|s| steps.contains(&s.id)) {
                    let kind = std::mem::take(&mut s.kind);
                    *s = StepState::new(&s.id, &kind);
                }
            }
        }
    }

    fn cancel_unfinished(&mut self, at: DateTime<Utc>) {
        for s in &mut self.steps {
            if !s.status.is_terminal() {
                s.status = StepStatus::Canceled;
                s.finished_at = Some(at);
            }
            for item in s.items.iter_mut().flatten() {
                if !item.status.is_terminal() {
                    item.status = StepStatus::Canceled;
                    item.finished_at = Some(at);
                }
            }
        }
    }

    /// Status of a run that has not ended, from its steps.
    fn live_status(&self) -> RunStatus {
        // Pending steps wait for something upstream; only ready or running ones are busy.
        let busy = self
            .steps
            .iter()
            .any(|s| matches!(s.status, StepStatus::Ready | StepStatus::Running));
        if !busy && self.steps.iter().any(|s| s.status == StepStatus::Waiting) {
            RunStatus::Waiting
        } else {
            RunStatus::Running
        }
    }

    pub fn step(&self, id: &str) -> Option<&StepState> {
        self.steps.iter().find(|s| s.id == id)
    }

    fn step_mut(&mut self, id: &str) -> Option<&mut StepState> {
        self.steps.iter_mut().find(|s| s.id == id)
    }

    /// The step (and map index) a job belongs to.
    pub fn find_job(&self, job_id: Uuid) -> Option<(&StepState, Option<u32>)> {
        for s in &self.steps {
            if s.job_id == Some(job_id) {
                return Some((s, None));
            }
            if let Some(item) = s.items.iter().flatten().find(|i| i.job_id == Some(job_id)) {
                return Some((s, Some(item.index)));
            }
        }
        None
    }

    /// Template context: `input`, `steps.<id>.{status, output, error}`, `run`, and `secrets`
    /// (references, resolved on the worker).
    pub fn context(&self, extra: Option<(&Value, u32)>) -> minijinja::Value {
        self.step_context(extra).0
    }

    /// [`Run::context`], and the `secrets` object that records which names were referenced (a
    /// step's job may resolve only those).
    pub fn step_context(
        &self,
        extra: Option<(&Value, u32)>,
    ) -> (minijinja::Value, std::sync::Arc<template::SecretRefs>) {
        let steps: serde_json::Map<String, Value> = self
            .steps
            .iter()
            .map(|s| {
                (
                    s.id.clone(),
                    json!({"status": s.status.as_str(), "output": s.output, "error": s.error}),
                )
            })
            .collect();
        let mut ctx = json!({
            "input": self.input,
            "steps": steps,
            "run": {"id": self.id, "workflow_id": self.workflow_id, "workflow": self.workflow_name,
                    "version": self.version, "created_at": self.created_at},
        });
        if let Some((item, index)) = extra {
            ctx["item"] = item.clone();
            ctx["index"] = json!(index);
        }
        let base = minijinja::Value::from_serialize(&ctx);
        let refs = std::sync::Arc::new(template::SecretRefs::default());
        let ctx = minijinja::context! {
            secrets => minijinja::Value::from_dyn_object(refs.clone()),
            ..base
        };
        (ctx, refs)
    }
}

impl StepState {
    fn item_mut(&mut self, index: u32) -> Option<&mut ItemState> {
        self.items.as_mut()?.get_mut(index as usize)
    }
}

/// Something to do besides appending run events, decided by [`advance`]; all of it commits in
/// the same transaction as the events.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Submit the job of a step (or of a map child).
    SubmitJob(StepJob),
    /// Start a sub-workflow run.
    StartRun {
        run_id: Uuid,
        workflow_id: Uuid,
        input: Value,
        step_id: String,
    },
    /// Cancel a step's job that is still queued or running.
    CancelJob(Uuid),
    /// Cancel a sub-workflow run.
    CancelRun(Uuid),
}

/// A job a step runs as.
#[derive(Debug, Clone, PartialEq)]
pub struct StepJob {
    pub job_id: Uuid,
    pub step_id: String,
    pub index: Option<u32>,
    pub kind: String,
    pub input: Value,
    pub queue: Option<String>,
    pub max_attempts: u32,
    pub backoff: Option<super::retry::Backoff>,
    pub timeout_s: Option<u32>,
    pub run_at: Option<DateTime<Utc>>,
    /// Secrets the step's input template referred to: the only ones its job may resolve.
    pub secret_refs: BTreeSet<String>,
}

/// What one [`advance`] decided: events to append (already folded into the run) and actions.
#[derive(Debug, Default)]
pub struct Plan {
    pub events: Vec<RunEvent>,
    pub actions: Vec<Action>,
}

impl Plan {
    /// Record an event: fold it into `run` and keep it for the append.
    pub fn record(&mut self, run: &mut Run, e: RunEvent, at: DateTime<Utc>) {
        let id = run.id;
        let taken = std::mem::replace(run, placeholder());
        *run = Run::apply(Some(taken), id, "", &e, at).expect("an existing run folds");
        self.events.push(e);
    }

    fn emit(&mut self, run: &mut Run, e: RunEvent, at: DateTime<Utc>) {
        self.record(run, e, at)
    }
}

fn placeholder() -> Run {
    Run {
        id: Uuid::nil(),
        namespace: String::new(),
        workflow_id: Uuid::nil(),
        workflow_name: String::new(),
        version: 0,
        status: RunStatus::Queued,
        input: Value::Null,
        output: None,
        error: None,
        steps: Vec::new(),
        signals: BTreeMap::new(),
        parent_run_id: None,
        parent_step_id: None,
        callback_url: None,
        stream_version: 0,
        created_at: DateTime::<Utc>::UNIX_EPOCH,
        started_at: None,
        finished_at: None,
        updated_at: DateTime::<Utc>::UNIX_EPOCH,
    }
}

/// Apply `facts` (events from outside the planner: a job ended, a signal, a cancel) to the run,
/// then plan until nothing more follows. Returns every event to append, facts first.
pub fn apply_and_advance(
    def: &WorkflowDef,
    run: &mut Run,
    facts: Vec<RunEvent>,
    at: DateTime<Utc>,
) -> Plan {
    let mut plan = Plan::default();
    for f in facts {
        plan.emit(run, f, at);
    }
    advance(def, run, &mut plan, at);
    plan
}

/// The fact a step job's event means for the run, if any (ignores jobs the run no longer
/// waits for, e.g. after a cancel or a retry).
pub fn job_fact(run: &Run, job_id: Uuid, event: &super::job::JobEvent) -> Option<RunEvent> {
    use super::job::JobEvent;
    if run.status.is_terminal() {
        return None;
    }
    let (step, index) = run.find_job(job_id)?;
    let (status, started) = match index {
        Some(i) => {
            let item = step.items.as_ref()?.get(i as usize)?;
            (item.status, item.attempt)
        }
        None => (step.status, step.attempt),
    };
    if status.is_terminal() {
        return None;
    }
    let step_id = step.id.clone();
    match event {
        // Already recorded (a page planned again after part of it committed).
        JobEvent::JobStarted { attempt, .. }
            if status == StepStatus::Running && started == *attempt =>
        {
            None
        }
        JobEvent::JobStarted { attempt, .. } => Some(RunEvent::StepStarted {
            step_id,
            index,
            job_id,
            attempt: *attempt,
        }),
        JobEvent::JobSucceeded { output, .. } => Some(RunEvent::StepSucceeded {
            step_id,
            index,
            output: output.clone(),
        }),
        JobEvent::JobFailed { error, .. } => Some(RunEvent::StepFailed {
            step_id,
            index,
            error: serde_json::to_value(error).unwrap_or(Value::Null),
        }),
        JobEvent::JobCanceled { .. } => Some(RunEvent::StepFailed {
            step_id,
            index,
            error: json!({"type": "canceled", "message": "the step's job was canceled"}),
        }),
        _ => None,
    }
}

/// The fact a child run's end means for its parent.
pub fn child_fact(parent: &Run, child: &Run) -> Option<RunEvent> {
    if parent.status.is_terminal() {
        return None;
    }
    let step = parent
        .steps
        .iter()
        .find(|s| s.child_run_id == Some(child.id))?;
    if step.status.is_terminal() {
        return None;
    }
    let step_id = step.id.clone();
    match child.status {
        RunStatus::Succeeded => Some(RunEvent::StepSucceeded {
            step_id,
            index: None,
            output: child.output.clone().unwrap_or(Value::Null),
        }),
        RunStatus::Failed => Some(RunEvent::StepFailed {
            step_id,
            index: None,
            error: json!({"type": "sub_workflow_failed", "run_id": child.id, "error": child.error}),
        }),
        RunStatus::Canceled => Some(RunEvent::StepFailed {
            step_id,
            index: None,
            error: json!({"type": "canceled", "run_id": child.id, "message": "the sub-workflow run was canceled"}),
        }),
        _ => None,
    }
}

/// Cancel a run: the cancel event and the cancel of every job and child run still going.
pub fn cancel(run: &mut Run, reason: Option<String>, at: DateTime<Utc>) -> Plan {
    let mut plan = Plan {
        actions: live_work(run),
        ..Default::default()
    };
    plan.emit(run, RunEvent::RunCanceled { reason }, at);
    plan
}

/// Fail a run that cannot advance (e.g. the store refuses its next events): `RunFailed` with
/// `error`, and the cancel of every job and child run still going.
pub fn fail_run(run: &mut Run, error: Value, at: DateTime<Utc>) -> Plan {
    let mut plan = Plan {
        actions: live_work(run),
        ..Default::default()
    };
    plan.emit(run, RunEvent::RunFailed { error }, at);
    plan
}

/// Jobs and child runs still going, as cancel actions.
fn live_work(run: &Run) -> Vec<Action> {
    let mut out = Vec::new();
    for s in &run.steps {
        if matches!(s.status, StepStatus::Ready | StepStatus::Running) {
            if let Some(j) = s.job_id {
                out.push(Action::CancelJob(j));
            }
            if let Some(r) = s.child_run_id {
                out.push(Action::CancelRun(r));
            }
        }
        for item in s.items.iter().flatten() {
            if matches!(item.status, StepStatus::Ready | StepStatus::Running) {
                if let Some(j) = item.job_id {
                    out.push(Action::CancelJob(j));
                }
            }
        }
    }
    out
}

/// Steps a retry resets: every step that did not succeed.
pub fn retry_steps(run: &Run) -> Vec<String> {
    run.steps
        .iter()
        .filter(|s| s.status != StepStatus::Succeeded)
        .map(|s| s.id.clone())
        .collect()
}

/// Decide what follows from the run's state until nothing more does.
pub fn advance(def: &WorkflowDef, run: &mut Run, plan: &mut Plan, at: DateTime<Utc>) {
    let env = template::Templates::new();
    loop {
        if run.status.is_terminal() {
            return;
        }
        let before = plan.events.len();
        // A failed step that fails the run ends it.
        if let Some(failed) = run.steps.iter().find(|s| {
            s.status == StepStatus::Failed
                && def.step(&s.id).map(|d| d.on_failure) == Some(OnFailure::FailRun)
        }) {
            let error = json!({"step_id": failed.id, "error": failed.error});
            plan.actions.extend(live_work(run));
            plan.emit(run, RunEvent::RunFailed { error }, at);
            return;
        }
        // Approval steps with their signal.
        let signalled: Vec<(String, Value)> = run
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Waiting && s.kind == "approval")
            .filter_map(|s| run.signals.get(&s.id).map(|p| (s.id.clone(), p.clone())))
            .collect();
        for (step_id, payload) in signalled {
            plan.emit(
                run,
                RunEvent::StepSucceeded {
                    step_id,
                    index: None,
                    output: payload,
                },
                at,
            );
        }
        // Map steps: start children within the concurrency, finish when all ended.
        for sd in def.steps.iter().filter(|s| s.kind == "map") {
            advance_map(&env, sd, run, plan, at);
        }
        // Pending steps whose dependencies all ended.
        for sd in &def.steps {
            let Some(state) = run.step(&sd.id) else {
                continue;
            };
            if state.status != StepStatus::Pending {
                continue;
            }
            let deps: Vec<(&StepDef, &StepState)> = sd
                .depends_on
                .iter()
                .filter_map(|d| Some((def.step(d)?, run.step(d)?)))
                .collect();
            if deps.iter().any(|(_, s)| !s.status.is_terminal()) {
                continue;
            }
            if let Some((d, _)) = deps.iter().find(|(d, s)| {
                s.status == StepStatus::Failed && d.on_failure == OnFailure::SkipDependents
            }) {
                let reason = format!("dependency `{}` failed", d.id);
                plan.emit(
                    run,
                    RunEvent::StepSkipped {
                        step_id: sd.id.clone(),
                        reason,
                    },
                    at,
                );
                continue;
            }
            if let Some((d, _)) = deps.iter().find(|(_, s)| {
                s.status == StepStatus::Skipped
                    && s.reason
                        .as_deref()
                        .is_some_and(|r| r.starts_with("dependency"))
            }) {
                // Skipped because something upstream failed: the skip spreads.
                let reason = format!("dependency `{}` was skipped after a failure", d.id);
                plan.emit(
                    run,
                    RunEvent::StepSkipped {
                        step_id: sd.id.clone(),
                        reason,
                    },
                    at,
                );
                continue;
            }
            if !deps.is_empty() && deps.iter().all(|(_, s)| s.status == StepStatus::Skipped) {
                plan.emit(
                    run,
                    RunEvent::StepSkipped {
                        step_id: sd.id.clone(),
                        reason: "every dependency was skipped".into(),
                    },
                    at,
                );
                continue;
            }
            start_step(&env, sd, run, plan, at);
        }
        // Every step ended: the run ends — once a pass decided nothing more, so that a step that
        // failed in this pass (a template or input error at its start) fails the run above.
        if run.steps.iter().all(|s| s.status.is_terminal()) {
            if plan.events.len() != before {
                continue;
            }
            let ctx = run.context(None);
            let output = match &def.output {
                Some(t) => template::render(&env, t, &ctx),
                None => Ok(Value::Object(
                    run.steps
                        .iter()
                        .filter(|s| s.status == StepStatus::Succeeded)
                        .map(|s| (s.id.clone(), s.output.clone().unwrap_or(Value::Null)))
                        .collect(),
                )),
            };
            let limit = step_checks().input_limit_bytes;
            let e = match output {
                Ok(output) => match check_storable(&output, "output", limit) {
                    Ok(()) => RunEvent::RunSucceeded { output },
                    Err(e) => RunEvent::RunFailed {
                        error: json!({"type": "invalid_output", "field": e.field,
                                      "message": format!("{}: {}", e.field, e.message)}),
                    },
                },
                Err(m) => RunEvent::RunFailed {
                    error: json!({"type": "template_error", "field": "output", "message": printable(m)}),
                },
            };
            plan.emit(run, e, at);
            return;
        }
        if plan.events.len() == before {
            return;
        }
    }
}

fn fail(step_id: &str, index: Option<u32>, kind: &str, message: String) -> RunEvent {
    RunEvent::StepFailed {
        step_id: step_id.to_string(),
        index,
        error: json!({"type": kind, "message": printable(message)}),
    }
}

/// A rendered input that fails its checks: `invalid_input`, naming the field.
fn invalid(step_id: &str, index: Option<u32>, e: FieldError) -> RunEvent {
    RunEvent::StepFailed {
        step_id: step_id.to_string(),
        index,
        error: json!({
            "type": "invalid_input",
            "field": e.field,
            "message": printable(format!("{}: {}", e.field, e.message)),
        }),
    }
}

/// An error message that can be stored (a template's error may quote what it rendered).
fn printable(message: String) -> String {
    if message.contains('\0') {
        message.replace('\0', "\\u0000")
    } else {
        message
    }
}

/// Start one step whose dependencies have ended.
fn start_step(
    env: &template::Templates,
    sd: &StepDef,
    run: &mut Run,
    plan: &mut Plan,
    at: DateTime<Utc>,
) {
    let ctx = run.context(None);
    if let Some(cond) = &sd.when {
        match template::condition(env, cond, &ctx) {
            Ok(true) => {}
            Ok(false) => {
                plan.emit(
                    run,
                    RunEvent::StepSkipped {
                        step_id: sd.id.clone(),
                        reason: format!("condition `{cond}` is false"),
                    },
                    at,
                );
                return;
            }
            Err(m) => {
                plan.emit(run, fail(&sd.id, None, "condition_error", m), at);
                return;
            }
        }
    }
    // Secrets the rendered input referred to (none for a map: its children render their own).
    let mut secret_refs = BTreeSet::new();
    // A map's child input is rendered per item, later.
    let input = if sd.kind == "map" {
        let mut raw = sd.input.clone();
        match raw.get("items").map(|t| template::render(env, t, &ctx)) {
            Some(Ok(items)) => raw["items"] = items,
            Some(Err(m)) => {
                plan.emit(run, fail(&sd.id, None, "template_error", m), at);
                return;
            }
            None => {}
        }
        raw
    } else {
        let (ctx, refs) = run.step_context(None);
        match template::render(env, &sd.input, &ctx) {
            Ok(v) => {
                secret_refs = refs.names();
                v
            }
            Err(m) => {
                plan.emit(run, fail(&sd.id, None, "template_error", m), at);
                return;
            }
        }
    };
    // Rendered inputs are checked as submitted ones: every kind's size and storability, a job
    // kind's input with the kind's validation.
    let checked = if workflow::CONTROL_KINDS.contains(&sd.kind.as_str()) {
        check_storable(&input, "input", step_checks().input_limit_bytes)
    } else {
        check_rendered_input(&sd.kind, &input)
    };
    if let Err(e) = checked {
        plan.emit(run, invalid(&sd.id, None, e), at);
        return;
    }
    let (max_attempts, backoff) = sd
        .retry
        .as_ref()
        .map_or((1, None), |r| (r.max_attempts, r.backoff));
    let job = |kind: &str, input: Value, run_at: Option<DateTime<Utc>>| StepJob {
        job_id: Uuid::now_v7(),
        step_id: sd.id.clone(),
        index: None,
        kind: kind.to_string(),
        input,
        queue: sd.queue.clone(),
        max_attempts,
        backoff,
        timeout_s: sd.timeout_s,
        run_at,
        secret_refs: secret_refs.clone(),
    };
    let ready = |job_id: Option<Uuid>, child: Option<Uuid>, items: Option<u32>, input: &Value| {
        RunEvent::StepReady {
            step_id: sd.id.clone(),
            index: None,
            job_id,
            child_run_id: child,
            items,
            input: Some(input.clone()),
        }
    };
    match sd.kind.as_str() {
        "approval" => plan.emit(run, ready(None, None, None, &input), at),
        "wait" => {
            let until = match serde_json::from_value::<WaitInput>(input.clone()) {
                Ok(WaitInput {
                    duration: Some(d),
                    until: None,
                }) => workflow::parse_wait_duration(&d).map(|d| at + d),
                Ok(WaitInput {
                    duration: None,
                    until: Some(u),
                }) => u
                    .as_str()
                    .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                    .map(|t| super::truncate_micros(t.with_timezone(&Utc)))
                    .ok_or_else(|| "`until` must be an RFC 3339 time".to_string()),
                Ok(_) => Err("needs exactly one of `duration` or `until`".into()),
                Err(e) => Err(e.to_string()),
            };
            match until {
                Ok(until) => {
                    let j = job(WAIT_KIND, json!({"until": until}), Some(until));
                    plan.emit(run, ready(Some(j.job_id), None, None, &input), at);
                    plan.actions.push(Action::SubmitJob(j));
                }
                Err(m) => plan.emit(run, fail(&sd.id, None, "input_error", m), at),
            }
        }
        "workflow" => match serde_json::from_value::<SubWorkflowInput>(input.clone()) {
            Ok(sub) => {
                let child = Uuid::now_v7();
                plan.emit(run, ready(None, Some(child), None, &input), at);
                plan.actions.push(Action::StartRun {
                    run_id: child,
                    workflow_id: sub.workflow_id,
                    input: sub.input,
                    step_id: sd.id.clone(),
                });
            }
            Err(e) => plan.emit(run, fail(&sd.id, None, "input_error", e.to_string()), at),
        },
        "map" => match serde_json::from_value::<MapInput>(input.clone()) {
            Ok(m) => match m.items.as_array() {
                Some(items) if items.len() <= workflow::MAX_MAP_ITEMS => {
                    plan.emit(run, ready(None, None, Some(items.len() as u32), &input), at);
                    advance_map(env, sd, run, plan, at);
                }
                Some(items) => plan.emit(
                    run,
                    fail(
                        &sd.id,
                        None,
                        "input_error",
                        format!(
                            "`items` has {} entries; the limit is {}",
                            items.len(),
                            workflow::MAX_MAP_ITEMS
                        ),
                    ),
                    at,
                ),
                None => plan.emit(
                    run,
                    fail(
                        &sd.id,
                        None,
                        "input_error",
                        format!("`items` must evaluate to a list, not {}", m.items),
                    ),
                    at,
                ),
            },
            Err(e) => plan.emit(run, fail(&sd.id, None, "input_error", e.to_string()), at),
        },
        kind => {
            let j = job(kind, input.clone(), None);
            plan.emit(run, ready(Some(j.job_id), None, None, &input), at);
            plan.actions.push(Action::SubmitJob(j));
        }
    }
}

/// Start map children within the concurrency; end the map step when every child ended.
fn advance_map(
    env: &template::Templates,
    sd: &StepDef,
    run: &mut Run,
    plan: &mut Plan,
    at: DateTime<Utc>,
) {
    let Some(state) = run.step(&sd.id) else {
        return;
    };
    if state.status != StepStatus::Running {
        return;
    }
    let Some(items) = state.items.clone() else {
        return;
    };
    let Ok(m) = serde_json::from_value::<MapInput>(state.input.clone().unwrap_or_default()) else {
        return;
    };
    if let Some(failed) = items.iter().find(|i| i.status == StepStatus::Failed) {
        let error =
            json!({"type": "map_item_failed", "index": failed.index, "error": failed.error});
        let cancels: Vec<Action> = items
            .iter()
            .filter(|i| matches!(i.status, StepStatus::Ready | StepStatus::Running))
            .filter_map(|i| i.job_id.map(Action::CancelJob))
            .collect();
        plan.actions.extend(cancels);
        plan.emit(
            run,
            RunEvent::StepFailed {
                step_id: sd.id.clone(),
                index: None,
                error,
            },
            at,
        );
        return;
    }
    if items.iter().all(|i| i.status == StepStatus::Succeeded) {
        let output = Value::Array(
            items
                .iter()
                .map(|i| i.output.clone().unwrap_or(Value::Null))
                .collect(),
        );
        plan.emit(
            run,
            RunEvent::StepSucceeded {
                step_id: sd.id.clone(),
                index: None,
                output,
            },
            at,
        );
        return;
    }
    let busy = items
        .iter()
        .filter(|i| matches!(i.status, StepStatus::Ready | StepStatus::Running))
        .count();
    let free = (m.concurrency as usize).saturating_sub(busy);
    let list = m.items.as_array().cloned().unwrap_or_default();
    let (max_attempts, backoff) = sd
        .retry
        .as_ref()
        .map_or((1, None), |r| (r.max_attempts, r.backoff));
    for item in items
        .iter()
        .filter(|i| i.status == StepStatus::Pending)
        .take(free)
    {
        let value = list
            .get(item.index as usize)
            .cloned()
            .unwrap_or(Value::Null);
        let (ctx, refs) = run.step_context(Some((&value, item.index)));
        let input = match template::render(env, &m.step.input, &ctx) {
            Ok(input) => input,
            Err(msg) => {
                plan.emit(
                    run,
                    fail(&sd.id, Some(item.index), "template_error", msg),
                    at,
                );
                return;
            }
        };
        if let Err(e) = check_rendered_input(&m.step.kind, &input) {
            plan.emit(run, invalid(&sd.id, Some(item.index), e), at);
            return;
        }
        let j = StepJob {
            job_id: Uuid::now_v7(),
            step_id: sd.id.clone(),
            index: Some(item.index),
            kind: m.step.kind.clone(),
            input,
            queue: sd.queue.clone(),
            max_attempts,
            backoff,
            timeout_s: sd.timeout_s,
            run_at: None,
            secret_refs: refs.names(),
        };
        plan.emit(
            run,
            RunEvent::StepReady {
                step_id: sd.id.clone(),
                index: Some(item.index),
                job_id: Some(j.job_id),
                child_run_id: None,
                items: None,
                input: None,
            },
            at,
        );
        plan.actions.push(Action::SubmitJob(j));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;
    use crate::domain::job::JobEvent;

    fn def(v: Value) -> WorkflowDef {
        let d = WorkflowDef::from_value(v).unwrap();
        d.validate(&crate::domain::kinds::TestContext).unwrap();
        d
    }

    fn start(d: &WorkflowDef, input: Value) -> (Run, Plan) {
        let at = crate::domain::now();
        let started = RunEvent::RunStarted {
            workflow_id: Uuid::nil(),
            workflow_name: d.name.clone(),
            version: 1,
            input,
            steps: d
                .steps
                .iter()
                .map(|s| StepHead {
                    id: s.id.clone(),
                    kind: s.kind.clone(),
                })
                .collect(),
            parent_run_id: None,
            parent_step_id: None,
            callback_url: None,
        };
        let mut run = Run::apply(None, Uuid::now_v7(), "default", &started, at).unwrap();
        let mut plan = Plan::default();
        advance(d, &mut run, &mut plan, at);
        (run, plan)
    }

    fn jobs(plan: &Plan) -> Vec<StepJob> {
        plan.actions
            .iter()
            .filter_map(|a| match a {
                Action::SubmitJob(j) => Some(j.clone()),
                _ => None,
            })
            .collect()
    }

    /// Finish a job successfully with `output`; returns the follow-up plan.
    fn succeed(d: &WorkflowDef, run: &mut Run, job: Uuid, output: Value) -> Plan {
        let ev = JobEvent::JobSucceeded {
            attempt: 1,
            output,
            artifacts: vec![],
        };
        let fact = job_fact(run, job, &ev).expect("a fact");
        apply_and_advance(d, run, vec![fact], crate::domain::now())
    }

    fn fail_job(d: &WorkflowDef, run: &mut Run, job: Uuid) -> Plan {
        let ev = JobEvent::JobFailed {
            attempt: 1,
            error: crate::domain::job::JobError::new("boom", "it broke"),
        };
        let fact = job_fact(run, job, &ev).expect("a fact");
        apply_and_advance(d, run, vec![fact], crate::domain::now())
    }

    #[test]
    fn fan_out_then_join_schedules_the_join_once() {
        let mut steps = vec![json!({"id": "root", "kind": "echo"})];
        let branches: Vec<String> = (0..50).map(|i| format!("b{i}")).collect();
        for b in &branches {
            steps.push(json!({"id": b, "kind": "echo", "depends_on": ["root"], "input": {"i": b}}));
        }
        steps.push(json!({"id": "join", "kind": "echo", "depends_on": branches,
                          "input": {"n": "{{ steps | length }}"}}));
        let d = def(json!({"name": "fan", "steps": steps}));
        let (mut run, plan) = start(&d, json!({}));
        let root = jobs(&plan);
        assert_eq!(root.len(), 1);
        let plan = succeed(&d, &mut run, root[0].job_id, json!({}));
        let fan = jobs(&plan);
        assert_eq!(fan.len(), 50);
        let mut joins = 0;
        for (i, j) in fan.iter().enumerate() {
            let p = succeed(&d, &mut run, j.job_id, json!({"i": i}));
            joins += jobs(&p).iter().filter(|j| j.step_id == "join").count();
        }
        assert_eq!(joins, 1);
        assert_eq!(run.step("join").unwrap().status, StepStatus::Ready);
    }

    #[test]
    fn false_conditions_skip_and_joins_still_run() {
        let d = def(json!({"name": "branch", "steps": [
            {"id": "check", "kind": "echo", "input": {"ok": "{{ input.ok }}"}},
            {"id": "yes", "kind": "echo", "depends_on": ["check"], "when": "steps.check.output.ok"},
            {"id": "no", "kind": "echo", "depends_on": ["check"], "when": "not steps.check.output.ok"},
            {"id": "after_no", "kind": "echo", "depends_on": ["no"]},
            {"id": "join", "kind": "echo", "depends_on": ["yes", "no"]},
        ], "output": {"ok": "{{ steps.check.output.ok }}", "no": "{{ steps.no.status }}"}}));
        let (mut run, plan) = start(&d, json!({"ok": true}));
        let p = succeed(&d, &mut run, jobs(&plan)[0].job_id, json!({"ok": true}));
        let started: Vec<String> = jobs(&p).into_iter().map(|j| j.step_id).collect();
        assert_eq!(started, vec!["yes"]);
        assert_eq!(run.step("no").unwrap().status, StepStatus::Skipped);
        assert_eq!(run.step("after_no").unwrap().status, StepStatus::Skipped);
        let yes = run.step("yes").unwrap().job_id.unwrap();
        let p = succeed(&d, &mut run, yes, json!({}));
        assert_eq!(jobs(&p)[0].step_id, "join");
        let join = run.step("join").unwrap().job_id.unwrap();
        succeed(&d, &mut run, join, json!({}));
        assert_eq!(run.status, RunStatus::Succeeded);
        assert_eq!(run.output, Some(json!({"ok": true, "no": "skipped"})));
    }

    #[test]
    fn on_failure_rules() {
        let d = def(json!({"name": "f", "steps": [
            {"id": "a", "kind": "echo", "on_failure": "skip_dependents"},
            {"id": "b", "kind": "echo", "depends_on": ["a"]},
            {"id": "c", "kind": "echo", "depends_on": ["b"]},
            {"id": "x", "kind": "echo", "on_failure": "continue"},
            {"id": "y", "kind": "echo", "depends_on": ["x"], "input": {"s": "{{ steps.x.status }}"}},
        ]}));
        let (mut run, plan) = start(&d, json!({}));
        let ids: HashMap<String, Uuid> = jobs(&plan)
            .into_iter()
            .map(|j| (j.step_id, j.job_id))
            .collect();
        fail_job(&d, &mut run, ids["a"]);
        assert_eq!(run.step("b").unwrap().status, StepStatus::Skipped);
        assert_eq!(run.step("c").unwrap().status, StepStatus::Skipped);
        let p = fail_job(&d, &mut run, ids["x"]);
        let y = jobs(&p);
        assert_eq!(y[0].input, json!({"s": "failed"}));
        succeed(&d, &mut run, y[0].job_id, json!({}));
        assert_eq!(run.status, RunStatus::Succeeded);

        let d = def(json!({"name": "g", "steps": [
            {"id": "a", "kind": "echo"}, {"id": "slow", "kind": "echo"},
            {"id": "b", "kind": "echo", "depends_on": ["a"]},
        ]}));
        let (mut run, plan) = start(&d, json!({}));
        let ids: HashMap<String, Uuid> = jobs(&plan)
            .into_iter()
            .map(|j| (j.step_id, j.job_id))
            .collect();
        let p = fail_job(&d, &mut run, ids["a"]);
        assert_eq!(run.status, RunStatus::Failed);
        assert!(p.actions.contains(&Action::CancelJob(ids["slow"])));
        assert_eq!(run.step("b").unwrap().status, StepStatus::Canceled);
        // Retry resets what did not succeed and starts it again.
        let steps = retry_steps(&run);
        let p = apply_and_advance(
            &d,
            &mut run,
            vec![RunEvent::RunRetried { steps }],
            crate::domain::now(),
        );
        assert_eq!(run.status, RunStatus::Running);
        assert_eq!(jobs(&p).len(), 2);
    }

    #[test]
    fn map_runs_children_in_bounded_parallel_and_collects_in_order() {
        let d = def(json!({"name": "m", "steps": [
            {"id": "m", "kind": "map", "input": {"items": "{{ input.xs }}", "concurrency": 2,
              "step": {"kind": "echo", "input": {"v": "{{ item * 10 }}", "i": "{{ index }}"}}}},
        ]}));
        let (mut run, plan) = start(&d, json!({"xs": [1, 2, 3, 4, 5]}));
        let mut live = jobs(&plan);
        assert_eq!(live.len(), 2);
        assert_eq!(live[0].input, json!({"v": 10, "i": 0}));
        let mut finished = 0;
        // Finish in reverse order each time; results still land in item order.
        while let Some(j) = live.pop() {
            let out = j.input.clone();
            let p = succeed(&d, &mut run, j.job_id, out);
            finished += 1;
            live.extend(jobs(&p));
            assert!(live.len() <= 2);
        }
        assert_eq!(finished, 5);
        assert_eq!(run.status, RunStatus::Succeeded);
        let out = run.step("m").unwrap().output.clone().unwrap();
        let vs: Vec<i64> = out
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["v"].as_i64().unwrap())
            .collect();
        assert_eq!(vs, vec![10, 20, 30, 40, 50]);
    }

    #[test]
    fn approval_waits_for_its_signal() {
        let d = def(json!({"name": "a", "steps": [
            {"id": "approve", "kind": "approval"},
            {"id": "ship", "kind": "echo", "depends_on": ["approve"], "when": "steps.approve.output.ok"},
        ]}));
        let (mut run, plan) = start(&d, json!({}));
        assert!(jobs(&plan).is_empty());
        assert_eq!(run.status, RunStatus::Waiting);
        let p = apply_and_advance(
            &d,
            &mut run,
            vec![RunEvent::SignalReceived {
                name: "approve".into(),
                payload: json!({"ok": true}),
            }],
            crate::domain::now(),
        );
        assert_eq!(
            run.step("approve").unwrap().output,
            Some(json!({"ok": true}))
        );
        assert_eq!(jobs(&p)[0].step_id, "ship");
        assert_eq!(run.status, RunStatus::Running);
    }

    #[test]
    fn a_last_step_that_fails_at_its_start_fails_the_run() {
        let d = def(json!({"name": "late", "steps": [
            {"id": "a", "kind": "echo"},
            {"id": "b", "kind": "echo", "depends_on": ["a"], "input": {"x": "{{ steps.a.output.x + 'a' }}"}}]}));
        let (mut run, plan) = start(&d, json!({}));
        let p = succeed(&d, &mut run, jobs(&plan)[0].job_id, json!({"x": 1}));
        assert!(jobs(&p).is_empty());
        assert_eq!(run.step("b").unwrap().status, StepStatus::Failed);
        assert_eq!(run.status, RunStatus::Failed, "{:?}", p.events);
    }

    #[test]
    fn stale_job_events_are_ignored() {
        let d = def(json!({"name": "s", "steps": [{"id": "a", "kind": "echo"}]}));
        let (mut run, plan) = start(&d, json!({}));
        let j = jobs(&plan)[0].job_id;
        succeed(&d, &mut run, j, json!(1));
        let again = JobEvent::JobSucceeded {
            attempt: 1,
            output: json!(2),
            artifacts: vec![],
        };
        assert!(job_fact(&run, j, &again).is_none());
        assert!(job_fact(&run, Uuid::now_v7(), &again).is_none());
    }
}

#[cfg(test)]
mod secret_tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn secrets_render_as_references_in_any_position() {
        let d = WorkflowDef::from_value(json!({"name": "s", "steps": [
            {"id": "a", "kind": "echo", "input": {"auth": "Bearer {{ secrets.TOKEN }}", "raw": "{{ secrets.KEY }}"}}]}))
        .unwrap();
        d.validate(&crate::domain::kinds::TestContext).unwrap();
        let started = RunEvent::RunStarted {
            workflow_id: Uuid::nil(),
            workflow_name: "s".into(),
            version: 1,
            input: json!({}),
            steps: vec![StepHead {
                id: "a".into(),
                kind: "echo".into(),
            }],
            parent_run_id: None,
            parent_step_id: None,
            callback_url: None,
        };
        let at = crate::domain::now();
        let mut run = Run::apply(None, Uuid::now_v7(), "default", &started, at).unwrap();
        let mut plan = Plan::default();
        advance(&d, &mut run, &mut plan, at);
        let Action::SubmitJob(j) = &plan.actions[0] else {
            panic!("{:?}", plan.actions)
        };
        assert_eq!(
            j.input,
            json!({"auth": "Bearer ${secret:TOKEN}", "raw": "${secret:KEY}"})
        );
    }
}
