//! The command layer: a use-case on an existing stream is "load the aggregate → decide the
//! events (a pure function of the domain) → append them at the version read → on a version
//! conflict, load again and decide again". [`on_job`] is that loop for job streams, written
//! once; entry points (HTTP handlers, the CLI, the scheduler) call it with the domain's decision
//! (`Job::cancel`, `Job::retry`) instead of writing the loop themselves. docs/architecture.md
//! has the design and what still follows it.

use uuid::Uuid;

use crate::{
    domain::{
        event::EventMetadata,
        job::{Job, JobEvent},
        now,
    },
    store::{
        self,
        jobs::{job_append, JobWrite},
        AppendError, Store, StoreError,
    },
};

/// How many times a command re-reads a stream that changed under it before giving up.
const ATTEMPTS: usize = 10;

/// Why a command did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error + 'static> {
    /// No such stream in the namespace.
    #[error("not found")]
    NotFound,
    /// The domain refused the command in the aggregate's state.
    #[error(transparent)]
    Rejected(E),
    /// The stream kept changing: every attempt lost the race.
    #[error("the stream is changing too fast; retry")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Run `decide` on job `id` of `namespace` and record its events, re-reading and deciding
/// again when another writer got there first. `decide` returns the events and a value for the
/// caller (what follows the change); no events means nothing to record. Returns the job after
/// the events, and that value.
pub async fn on_job<T, E, F>(
    store: &Store,
    namespace: &str,
    id: Uuid,
    metadata: &EventMetadata,
    decide: F,
) -> Result<(Job, T), CommandError<E>>
where
    E: std::error::Error + 'static,
    F: Fn(&Job) -> Result<(Vec<JobEvent>, T), E>,
{
    for _ in 0..ATTEMPTS {
        let job = store::jobs::get(&store.pool, namespace, id)
            .await?
            .ok_or(CommandError::NotFound)?;
        let (events, out) = decide(&job).map_err(CommandError::Rejected)?;
        if events.is_empty() {
            return Ok((job, out));
        }
        let (new, append) = job_append(
            Some(&job),
            id,
            &events,
            JobWrite::new(metadata.clone(), now()),
        )
        .map_err(|e| StoreError::Internal(e.to_string()))?;
        match store.appender.append(append).await {
            Ok(_) => return Ok((new, out)),
            Err(AppendError::Conflict { .. }) => continue,
            Err(e) => return Err(StoreError::from(e).into()),
        }
    }
    Err(CommandError::Busy)
}
