//! Workflow runs: the run stream's events, the fold into the `runs` row, and the planner that
//! decides — from a run's state and its pinned definition — which steps are ready, skipped or
//! finished and what jobs to submit.
//!
//! The planner is pure. Whoever appends to a run stream (the API starting, signalling,
//! canceling or retrying a run; the orchestrator recording a step's job ending) folds the new
//! facts in, calls [`advance`], and appends the facts and the planner's events in one
//! transaction at the run's expected version. Two writers racing on one run conflict and the
//! loser re-reads and re-plans, so every dependent step is scheduled exactly once.
//!
//! Modules: this one holds the run's state and its fold; [`planner`] decides what follows a
//! change; [`checks`] holds the checks of rendered step inputs.

mod checks;
pub mod planner;

pub use checks::{check_rendered_input, set_step_checks, StepChecks};
pub use planner::{
    advance, apply_and_advance, cancel, child_fact, fail_run, job_fact, retry_steps, Action, Plan,
    StepJob,
};

use std::{collections::BTreeMap, fmt, str::FromStr};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::domain::{
    event::{DomainEvent, StreamType},
    template,
};

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
    /// W3C `traceparent` of what started the run; its step jobs continue that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
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
        /// W3C trace context of what started the run: its step jobs continue it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
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

impl DomainEvent for RunEvent {
    const STREAM: StreamType = StreamType::Run;

    fn type_name(&self) -> &'static str {
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
}

impl RunEvent {
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
                    traceparent,
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
                traceparent: traceparent.clone(),
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

    /// Whether a step or map item other than the one of job `job_id` is ready or running.
    pub fn busy_besides(&self, job_id: Uuid) -> bool {
        let busy = |status: StepStatus, job: Option<Uuid>| {
            matches!(status, StepStatus::Ready | StepStatus::Running) && job != Some(job_id)
        };
        self.steps.iter().any(|s| match &s.items {
            Some(items) => items.iter().any(|i| busy(i.status, i.job_id)),
            None => busy(s.status, s.job_id),
        })
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
