//! The `runs` projection, and [`commit_plan`]: turning a run's plan (events + actions) into one
//! atomic append — the run's events at its expected version, the step jobs it submits, the jobs
//! and child runs it cancels, and the child runs it starts.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    jobs::{job_append, JobWrite},
    Append, Effect, StoreError,
};
use crate::domain::{
    event::{EventMetadata, StreamType},
    job::{Cancel, Priority, Submission},
    kinds,
    run::{self, Action, Plan, Run, RunEvent, RunStatus, StepHead, StepJob},
    workflow::WorkflowDef,
};

/// Upsert of whole rows from a JSON array of [`Run`]s.
pub const UPSERT_RUNS: &str = "
INSERT INTO runs SELECT * FROM jsonb_populate_recordset(NULL::runs, $1)
ON CONFLICT (id) DO UPDATE SET
    status = EXCLUDED.status, output = EXCLUDED.output, error = EXCLUDED.error,
    steps = EXCLUDED.steps, signals = EXCLUDED.signals, stream_version = EXCLUDED.stream_version,
    started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at,
    updated_at = EXCLUDED.updated_at";

fn decode(v: Value) -> Result<Run, StoreError> {
    serde_json::from_value(v)
        .map_err(|e| StoreError::Internal(format!("runs row does not decode: {e}")))
}

/// Runs by id, any namespace.
pub async fn get_many(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<Run>, StoreError> {
    let rows: Vec<(Value,)> = sqlx::query_as("SELECT to_jsonb(r) FROM runs r WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(pool)
        .await?;
    rows.into_iter().map(|(v,)| decode(v)).collect()
}

pub async fn get_any(pool: &PgPool, id: Uuid) -> Result<Option<Run>, StoreError> {
    Ok(get_many(pool, &[id]).await?.into_iter().next())
}

pub async fn get(pool: &PgPool, namespace: &str, id: Uuid) -> Result<Option<Run>, StoreError> {
    Ok(get_any(pool, id)
        .await?
        .filter(|r| r.namespace == namespace))
}

/// Filters of `GET /v1/runs`.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub workflow_id: Option<Uuid>,
    pub status: Option<RunStatus>,
    pub before: Option<Uuid>,
}

/// Newest first.
pub async fn list(
    pool: &PgPool,
    namespace: &str,
    f: &RunFilter,
    limit: i64,
) -> Result<Vec<Run>, StoreError> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT to_jsonb(r) FROM runs r WHERE namespace = $1
         AND ($2::uuid IS NULL OR workflow_id = $2) AND ($3::text IS NULL OR status = $3)
         AND ($4::uuid IS NULL OR id < $4) ORDER BY id DESC LIMIT $5",
    )
    .bind(namespace)
    .bind(f.workflow_id)
    .bind(f.status.map(|s| s.as_str()))
    .bind(f.before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(v,)| decode(v)).collect()
}

/// Definitions never change once written (a `PUT` makes a new version), so each process keeps
/// the ones it has used.
type DefCache = Mutex<HashMap<(Uuid, u32), Arc<WorkflowDef>>>;

fn def_cache() -> &'static DefCache {
    static CACHE: OnceLock<DefCache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The definition a run pinned.
pub async fn definition(
    pool: &PgPool,
    workflow_id: Uuid,
    version: u32,
) -> Result<Option<Arc<WorkflowDef>>, StoreError> {
    if let Some(d) = def_cache()
        .lock()
        .expect("def cache")
        .get(&(workflow_id, version))
    {
        return Ok(Some(d.clone()));
    }
    let Some(w) = super::workflows::get_any(pool, workflow_id).await? else {
        return Ok(None);
    };
    let Some(def) = w.definition(version) else {
        return Ok(None);
    };
    let def = Arc::new(def.clone());
    let mut cache = def_cache().lock().expect("def cache");
    if cache.len() > 10_000 {
        cache.clear();
    }
    cache.insert((workflow_id, version), def.clone());
    Ok(Some(def))
}

/// How a run is started.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: Uuid,
    pub namespace: String,
    pub workflow_id: Uuid,
    pub workflow_name: String,
    pub version: u32,
    pub input: Value,
    pub parent: Option<(Uuid, String)>,
    pub callback_url: Option<String>,
}

/// A new run's state and plan: `RunStarted` and whatever is ready at once.
pub fn start(def: &WorkflowDef, new: NewRun, at: DateTime<Utc>) -> (Run, Plan) {
    let started = RunEvent::RunStarted {
        workflow_id: new.workflow_id,
        workflow_name: new.workflow_name,
        version: new.version,
        input: new.input,
        steps: def
            .steps
            .iter()
            .map(|s| StepHead {
                id: s.id.clone(),
                kind: s.kind.clone(),
            })
            .collect(),
        parent_run_id: new.parent.as_ref().map(|p| p.0),
        parent_step_id: new.parent.map(|p| p.1),
        callback_url: new.callback_url,
        traceparent: crate::trace_context::current(),
    };
    let mut run = Run::apply(None, new.id, &new.namespace, &started, at).expect("RunStarted folds");
    let mut plan = Plan {
        events: vec![started],
        actions: Vec::new(),
    };
    run::advance(def, &mut run, &mut plan, at);
    (run, plan)
}

/// One run's share of a commit: its stream version before the plan (None: a new run), its
/// state after, and the plan.
#[derive(Debug)]
pub struct RunChange {
    pub prev_version: Option<i64>,
    pub run: Run,
    pub def: Arc<WorkflowDef>,
    pub plan: Plan,
}

/// Appends for a set of run changes, with everything their actions imply, and the running jobs
/// to notify of their cancel after commit.
#[derive(Debug, Default)]
pub struct Built {
    pub appends: Vec<Append>,
    pub cancel_running: Vec<Uuid>,
}

fn run_metadata(run: &Run, actor: &str) -> EventMetadata {
    EventMetadata {
        namespace: run.namespace.clone(),
        actor: Some(actor.to_string()),
        // Child runs name their parent, so the orchestrator finds their end without a lookup.
        correlation_id: run.parent_run_id,
        ..Default::default()
    }
}

/// Resolve the actions of `changes` (starting child runs, canceling jobs and child runs,
/// submitting step jobs) and build one append per stream. A child run whose workflow is gone
/// fails its parent step instead.
pub async fn build(
    pool: &PgPool,
    mut changes: Vec<RunChange>,
    actor: &str,
    at: DateTime<Utc>,
) -> Result<Built, StoreError> {
    let mut built = Built::default();
    let mut i = 0;
    while i < changes.len() {
        let actions = std::mem::take(&mut changes[i].plan.actions);
        for action in actions {
            match action {
                Action::SubmitJob(j) => {
                    let c = &changes[i];
                    built.appends.push(step_job_append(&c.run, &j, actor, at)?);
                }
                Action::CancelJob(job_id) => {
                    if let Some(job) = super::jobs::get_any(pool, job_id).await? {
                        // The domain's one decision of a cancel (the API's too).
                        let Ok((events, done)) = job.cancel(Some("workflow run ended".into()))
                        else {
                            continue;
                        };
                        match done {
                            Cancel::AlreadyRequested => continue,
                            Cancel::Requested => built.cancel_running.push(job_id),
                            Cancel::Canceled => {}
                        }
                        let meta = EventMetadata {
                            namespace: job.namespace.clone(),
                            actor: Some(actor.to_string()),
                            ..Default::default()
                        };
                        let (_, a) =
                            job_append(Some(&job), job_id, &events, JobWrite::new(meta, at))
                                .map_err(|e| StoreError::Internal(e.to_string()))?;
                        built.appends.push(a);
                    }
                }
                Action::CancelRun(child_id) => {
                    let Some(mut child) = get_any(pool, child_id).await? else {
                        continue;
                    };
                    if child.status.is_terminal() {
                        continue;
                    }
                    let Some(def) = definition(pool, child.workflow_id, child.version).await?
                    else {
                        continue;
                    };
                    let prev = child.stream_version;
                    let plan = run::cancel(&mut child, Some("the parent run ended".into()), at);
                    changes.push(RunChange {
                        prev_version: Some(prev),
                        run: child,
                        def,
                        plan,
                    });
                }
                Action::StartRun {
                    run_id,
                    workflow_id,
                    input,
                    step_id,
                } => {
                    let parent = &changes[i].run;
                    let w = super::workflows::get_any(pool, workflow_id)
                        .await?
                        .filter(|w| w.namespace == parent.namespace && !w.deleted);
                    let def = match &w {
                        Some(w) => definition(pool, w.id, w.version).await?,
                        None => None,
                    };
                    let checked = def.as_ref().map(|d| {
                        crate::domain::workflow::check_input(d, &input).map_err(|e| e.message)
                    });
                    match (w, def, checked) {
                        (Some(w), Some(def), Some(Ok(()))) => {
                            let (child, plan) = start(
                                &def,
                                NewRun {
                                    id: run_id,
                                    namespace: parent.namespace.clone(),
                                    workflow_id: w.id,
                                    workflow_name: w.name.clone(),
                                    version: w.version,
                                    input,
                                    parent: Some((parent.id, step_id)),
                                    callback_url: None,
                                },
                                at,
                            );
                            changes.push(RunChange {
                                prev_version: None,
                                run: child,
                                def,
                                plan,
                            });
                        }
                        (_, _, checked) => {
                            let message = match checked {
                                Some(Err(m)) => format!("the sub-workflow's input: {m}"),
                                _ => format!("workflow {workflow_id} does not exist"),
                            };
                            let c = &mut changes[i];
                            let fact = RunEvent::StepFailed {
                                step_id,
                                index: None,
                                error: serde_json::json!({"type": "sub_workflow_error", "message": message}),
                            };
                            let mut more = Plan::default();
                            more.record(&mut c.run, fact, at);
                            run::advance(&c.def, &mut c.run, &mut more, at);
                            c.plan.events.extend(more.events);
                            // Their actions are handled on this pass.
                            c.plan.actions.extend(more.actions);
                        }
                    }
                }
            }
            // A sub-workflow failure may have added actions to this change.
        }
        if changes[i].plan.actions.is_empty() {
            i += 1;
        }
    }
    for c in changes {
        if c.plan.events.is_empty() {
            continue;
        }
        let meta = run_metadata(&c.run, actor);
        let run = c.run;
        built.appends.push(Append::of(
            run.id,
            c.prev_version,
            &c.plan.events,
            meta,
            at,
            vec![Effect::UpsertRun(Box::new(run))],
        ));
    }
    Ok(built)
}

/// The append that submits a step's job.
fn step_job_append(
    run: &Run,
    j: &StepJob,
    actor: &str,
    at: DateTime<Utc>,
) -> Result<Append, StoreError> {
    let queue = j.queue.clone().unwrap_or_else(|| {
        kinds::find(&j.kind)
            .map(|k| k.default_queue)
            .unwrap_or("default")
            .to_string()
    });
    let sub = Submission {
        kind: j.kind.clone(),
        input: j.input.clone(),
        queue,
        priority: Priority::Normal,
        run_at: j.run_at,
        max_attempts: j.max_attempts,
        timeout_s: j.timeout_s,
        backoff: j.backoff,
        callback_url: None,
        callback_events: None,
        tags: [(
            "workflow".to_string(),
            run.workflow_name.chars().take(256).collect(),
        )]
        .into(),
        run_id: Some(run.id),
        step_id: Some(match j.index {
            Some(i) => format!("{}[{i}]", j.step_id),
            None => j.step_id.clone(),
        }),
        secret_refs: (!j.secret_refs.is_empty()).then(|| j.secret_refs.clone()),
        expires_at: None,
        ttl_s: None,
        deadline_s: None,
        ordering_key: None,
        debounce_key: None,
        traceparent: run.traceparent.clone(),
    };
    let meta = EventMetadata {
        namespace: run.namespace.clone(),
        actor: Some(actor.to_string()),
        ..Default::default()
    };
    super::jobs::submit_append(j.job_id, sub, meta, at)
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("workflow not found")]
    WorkflowNotFound,
    #[error("{}: {}", .0.field, .0.message)]
    Input(crate::domain::FieldError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Append(#[from] super::AppendError),
}

/// Everything needed to start a run.
#[derive(Debug, Clone)]
pub struct StartRun {
    pub namespace: String,
    pub workflow_id: Uuid,
    pub input: Value,
    pub callback_url: Option<String>,
    pub actor: String,
    /// Recorded with the run's first events (Idempotency-Key).
    pub command: Option<super::append::CommandRecord>,
    /// Committed in the same transaction (e.g. a schedule's tick).
    pub with: Vec<Append>,
    /// The run's id (chosen by the caller so it can be named in `with`).
    pub run_id: Uuid,
}

/// Start a run of the workflow's latest version: `RunStarted`, the first steps and their jobs,
/// in one transaction. Running jobs to cancel cannot arise here, so there is nothing to publish.
pub async fn start_run(store: &super::Store, s: StartRun) -> Result<Run, StartError> {
    let (run, appends) = prepare_run(store, s).await?;
    store.appender.append_all(appends).await?;
    metrics::counter!("capibara_runs_started_total").increment(1);
    Ok(run)
}

/// The appends that start a run (for callers that commit them with their own, e.g. a tick).
pub async fn prepare_run(
    store: &super::Store,
    s: StartRun,
) -> Result<(Run, Vec<Append>), StartError> {
    let w = super::workflows::get(&store.pool, &s.namespace, s.workflow_id)
        .await?
        .ok_or(StartError::WorkflowNotFound)?;
    let def = definition(&store.pool, w.id, w.version)
        .await?
        .ok_or(StartError::WorkflowNotFound)?;
    crate::domain::workflow::check_input(&def, &s.input).map_err(StartError::Input)?;
    let at = crate::domain::now();
    let (run, plan) = start(
        &def,
        NewRun {
            id: s.run_id,
            namespace: s.namespace.clone(),
            workflow_id: w.id,
            workflow_name: w.name.clone(),
            version: w.version,
            input: s.input,
            parent: None,
            callback_url: s.callback_url,
        },
        at,
    );
    let started = run.clone();
    let mut built = build(
        &store.pool,
        vec![RunChange {
            prev_version: None,
            run,
            def,
            plan,
        }],
        &s.actor,
        at,
    )
    .await?;
    if let Some(a) = built
        .appends
        .iter_mut()
        .find(|a| a.stream_type == StreamType::Run && a.stream_id == s.run_id)
    {
        a.command = s.command;
    }
    built.appends.extend(s.with);
    Ok((started, built.appends))
}

/// The run a tick of a schedule with a workflow target starts (None: a job target): its id and
/// appends. Its input is the target's input plus `schedule: {id, fire_time}`.
pub async fn prepare_tick_run(
    store: &super::Store,
    s: &crate::domain::schedule::Schedule,
    fire_time: DateTime<Utc>,
    actor: &str,
) -> Option<Result<(Uuid, Vec<Append>), StartError>> {
    let target: crate::domain::schedule::ScheduleTarget =
        serde_json::from_value(s.target.clone()).ok()?;
    let crate::domain::schedule::ScheduleTarget::Workflow { workflow_id, input } = target else {
        return None;
    };
    let mut input = if input.is_null() {
        serde_json::json!({})
    } else {
        input
    };
    if let Some(obj) = input.as_object_mut() {
        obj.entry("schedule")
            .or_insert_with(|| serde_json::json!({"id": s.id, "fire_time": fire_time}));
    }
    let run_id = Uuid::now_v7();
    let prepared = prepare_run(
        store,
        StartRun {
            namespace: s.namespace.clone(),
            workflow_id,
            input,
            callback_url: None,
            actor: actor.to_string(),
            command: None,
            with: Vec::new(),
            run_id,
        },
    )
    .await;
    Some(prepared.map(|(_, appends)| (run_id, appends)))
}
