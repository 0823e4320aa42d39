//! Changing a workflow run that exists (cancel, retry, a signal): the domain plans the change
//! on the run and the definition it pinned; [`store::runs::build`] resolves the plan's actions
//! (step jobs to submit, jobs and child runs to cancel, child runs to start) into appends; all
//! commit in one transaction at the run's version, and a concurrent change plans again.

use uuid::Uuid;

use super::{execute_async, CommandError, Writes};
use crate::{
    domain::{
        now,
        run::{Plan, Run},
        workflow::WorkflowDef,
    },
    store::{self, runs::RunChange, Store, StoreError},
};

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
