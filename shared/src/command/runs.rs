//! Changing a workflow run that exists (cancel, retry, a signal): the domain plans the change
//! on the run and the definition it pinned; [`store::runs::build`] resolves the plan's actions
//! (step jobs to submit, jobs and child runs to cancel, child runs to start) into appends; all
//! commit in one transaction at the run's version, and a concurrent change plans again.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use uuid::Uuid;

use super::{execute_async, CommandError, Writes};
use crate::{
    domain::{
        job::{Job, JobEvent},
        now,
        run::{planner, Plan, Run},
        workflow::WorkflowDef,
    },
    store::{self, runs::RunChange, Append, Store, StoreError},
};

/// The actor of the run events the orchestrator's planning appends, whoever commits them.
pub const ORCHESTRATOR: &str = "orchestrator";

/// A run after a change, and the running step jobs its plan asked to stop (to be told after
/// the commit: `Queue::publish_cancel`; a worker that misses it sees the cancel at its next
/// heartbeat).
#[derive(Debug)]
pub struct Changed {
    pub run: Run,
    pub cancel_running: Vec<Uuid>,
}

/// Plan a change of run `id` with `decide` (which may refuse it) and record it with everything
/// the plan implies, planning again on a concurrent change.
pub async fn change<E, F>(
    store: &Store,
    namespace: &str,
    id: Uuid,
    actor: &str,
    decide: F,
) -> Result<Changed, CommandError<E>>
where
    E: std::error::Error + 'static,
    F: Fn(&mut Run, &WorkflowDef) -> Result<Plan, E>,
{
    let decide = &decide;
    execute_async(store, namespace, id, |mut run: Run| async move {
        let def = store::runs::definition(&store.pool, run.workflow_id, run.version)
            .await?
            .ok_or_else(|| StoreError::Internal("the run's workflow version is missing".into()))?;
        let prev_version = Some(run.stream_version);
        let plan = decide(&mut run, &def).map_err(CommandError::Rejected)?;
        let built = store::runs::build(
            &store.pool,
            vec![RunChange {
                prev_version,
                run: run.clone(),
                def,
                plan,
            }],
            actor,
            now(),
        )
        .await?;
        Ok(Writes {
            appends: built.appends,
            out: Changed {
                run,
                cancel_running: built.cancel_running,
            },
        })
    })
    .await
}

/// A step job's report that plans its run in the same commit: the appends that advance run
/// `job.run_id` on `events` (the report's job events, as they will be appended), to be committed
/// atomically with the report at the run's version. `None` when the report changes nothing in
/// the run, or when the orchestrator should plan it: a step that does not always run alone in
/// its definition ([`WorkflowDef::runs_alone`]: a branch of a fan-out, a map item), or a run
/// with another step in flight ([`planner::plan_report`]). If the atomic commit does not go
/// through, the caller commits its report alone and the orchestrator plans the run from the
/// log, as it does every report (it finds the step of a report planned here ended already, and
/// does nothing for it). docs/workflows.md, "A step's report plans its run".
pub async fn plan_with_report(
    store: &Store,
    job: &Job,
    events: &[JobEvent],
) -> Result<Option<Vec<Append>>, StoreError> {
    let (Some(run_id), Some(step)) = (job.run_id, job.step_id.as_deref()) else {
        return Ok(None);
    };
    // A run this process planned before: a step with peers is left to the orchestrator
    // without reading the run (a fan-out's branches would each read it for nothing).
    if known_definitions()
        .get(run_id)
        .is_some_and(|d| !d.runs_alone(step))
    {
        return Ok(None);
    }
    let Some(mut run) = store::runs::get_any(&store.pool, run_id).await? else {
        return Ok(None);
    };
    let Some(def) = store::runs::definition(&store.pool, run.workflow_id, run.version).await?
    else {
        return Ok(None);
    };
    known_definitions().put(run_id, def.clone());
    if !def.runs_alone(step) {
        return Ok(None);
    }
    let at = now();
    let prev_version = Some(run.stream_version);
    let Some(plan) = planner::plan_report(&def, &mut run, job.id, events, at) else {
        return Ok(None);
    };
    let change = RunChange {
        prev_version,
        run,
        def,
        plan,
    };
    let built = store::runs::build(&store.pool, vec![change], ORCHESTRATOR, at).await?;
    // Running jobs to stop after the commit: none while the step runs alone; should there be
    // any, the orchestrator plans it, and tells their workers.
    Ok(built.cancel_running.is_empty().then_some(built.appends))
}

/// The definitions of the runs whose step reports this process planned lately (a run's pinned
/// definition never changes).
#[derive(Default)]
struct KnownDefinitions(Mutex<HashMap<Uuid, Arc<WorkflowDef>>>);

impl KnownDefinitions {
    /// Runs remembered at most; all are forgotten when more come.
    const CAPACITY: usize = 10_000;

    fn get(&self, run: Uuid) -> Option<Arc<WorkflowDef>> {
        self.0.lock().expect("known definitions").get(&run).cloned()
    }

    fn put(&self, run: Uuid, def: Arc<WorkflowDef>) {
        let mut known = self.0.lock().expect("known definitions");
        if known.len() >= Self::CAPACITY {
            known.clear();
        }
        known.insert(run, def);
    }
}

fn known_definitions() -> &'static KnownDefinitions {
    static KNOWN: OnceLock<KnownDefinitions> = OnceLock::new();
    KNOWN.get_or_init(Default::default)
}
