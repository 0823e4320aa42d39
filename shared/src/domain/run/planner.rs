//! The planner: from a run's state and its pinned definition, which steps are ready, skipped or
//! finished, and what to do besides appending events (jobs to submit or cancel, child runs).
//! Pure: the callers append what it decides.

use super::checks::{check_storable, step_checks};
use super::*;
use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::domain::{
    template,
    workflow::{
        self, MapInput, OnFailure, StepDef, SubWorkflowInput, WaitInput, WorkflowDef, WAIT_KIND,
    },
    FieldError,
};

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
    pub backoff: Option<crate::domain::retry::Backoff>,
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
        traceparent: None,
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

/// What the events of one report of step job `job_id` mean for `run`, planned as the
/// orchestrator plans a page of the log: each event's fact folded in, in order, then what
/// follows. `None` when no event is news to the run, or when another step (or map item) of the
/// run is ready or running: its report would plan the same run at the same version, so a run
/// with work in parallel is left to the orchestrator, which plans a page of reports in one
/// commit (docs/workflows.md, "A step's report plans its run").
pub fn plan_report(
    def: &WorkflowDef,
    run: &mut Run,
    job_id: Uuid,
    events: &[crate::domain::job::JobEvent],
    at: DateTime<Utc>,
) -> Option<Plan> {
    if run.status.is_terminal() || run.busy_besides(job_id) {
        return None;
    }
    let mut plan = Plan::default();
    for e in events {
        if let Some(fact) = job_fact(run, job_id, e) {
            plan.record(run, fact, at);
        }
    }
    if plan.events.is_empty() {
        return None;
    }
    advance(def, run, &mut plan, at);
    Some(plan)
}

/// The fact a step job's event means for the run, if any (ignores jobs the run no longer
/// waits for, e.g. after a cancel or a retry).
pub fn job_fact(run: &Run, job_id: Uuid, event: &crate::domain::job::JobEvent) -> Option<RunEvent> {
    use crate::domain::job::JobEvent;
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
                    .map(|t| crate::domain::truncate_micros(t.with_timezone(&Utc)))
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
            traceparent: None,
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
    fn a_report_plans_its_run_only_when_no_other_step_is_in_flight() {
        let d = def(json!({"name": "fan", "steps": [
            {"id": "a", "kind": "echo"},
            {"id": "b", "kind": "echo"},
            {"id": "join", "kind": "echo", "depends_on": ["a", "b"]},
        ]}));
        let (mut run, plan) = start(&d, json!({}));
        let first = jobs(&plan);
        assert_eq!(first.len(), 2);
        let (a, b) = (first[0].job_id, first[1].job_id);
        let at = crate::domain::now();
        let report = [
            JobEvent::JobStarted {
                attempt: 1,
                worker: "w".into(),
            },
            JobEvent::JobSucceeded {
                attempt: 1,
                output: json!({"ok": true}),
                artifacts: vec![],
            },
        ];
        // `b` is ready too: `a`'s report leaves the run to the orchestrator, untouched.
        let before = run.clone();
        assert!(plan_report(&d, &mut run, a, &report, at).is_none());
        assert_eq!(run, before);
        // Once `a`'s end is recorded, `b`'s report plans the run: its own facts, then the join.
        succeed(&d, &mut run, a, json!({}));
        let plan = plan_report(&d, &mut run, b, &report, at).expect("planned");
        let types: Vec<&str> = plan.events.iter().map(DomainEvent::type_name).collect();
        assert_eq!(types, ["StepStarted", "StepSucceeded", "StepReady"]);
        let join = jobs(&plan);
        assert_eq!(join.len(), 1);
        assert_eq!(join[0].step_id, "join");
        // The same report again (the orchestrator reading it from the log) is no news.
        assert!(plan_report(&d, &mut run, b, &report, at).is_none());
        // The join's report ends the run.
        let plan = plan_report(&d, &mut run, join[0].job_id, &report, at).expect("planned");
        assert_eq!(
            plan.events.last().map(DomainEvent::type_name),
            Some("RunSucceeded")
        );
        assert!(run.status.is_terminal());
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
            traceparent: None,
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
