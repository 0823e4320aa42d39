//! The command layer: a use-case on an existing stream is "load the aggregate → decide the
//! events (a pure function of the domain) → append them at the version read → on a version
//! conflict, load again and decide again". [`execute`] is that loop, written once for every
//! [`Aggregate`]; entry points (HTTP handlers, the CLI, the scheduler) call it with the domain's
//! decision (`Job::cancel`, `Job::retry`, a schedule's pause) instead of writing the loop
//! themselves. docs/architecture.md has the design and what still follows it.

use std::future::Future;

pub mod connectors;
pub mod hook_call;
pub mod jobs;
pub mod kinds;
pub mod leases;
pub mod limits;
pub mod llm_providers;
pub mod models;
pub mod runs;
pub mod ticks;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{
    domain::{
        delivery::{Delivery, DeliveryEvent},
        event::{DomainEvent, EventMetadata},
        job::{Job, JobEvent},
        now,
        run::{Run, RunEvent},
        schedule::{Schedule, ScheduleEvent},
        trigger::{Trigger, TriggerEvent},
        workflow::{Workflow, WorkflowEvent},
    },
    store::{
        self,
        deliveries::delivery_append,
        jobs::{job_append, JobWrite},
        schedules::schedule_append,
        triggers::trigger_append,
        workflows::workflow_append,
        Append, AppendError, Effect, Store, StoreError,
    },
};

/// A stream's state that commands load and change: how to read it (in a namespace) and how its
/// new events become an append at the version it was read at.
pub trait Aggregate: Sized {
    type Event: DomainEvent;

    /// The current state, if the stream exists in `namespace`.
    fn load(
        store: &Store,
        namespace: &str,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<Self>, StoreError>> + Send;

    /// The state after `events`, and the append that records them (expecting this version).
    fn append(
        &self,
        id: Uuid,
        events: &[Self::Event],
        metadata: &EventMetadata,
        at: DateTime<Utc>,
    ) -> Result<(Self, Append), StoreError>;
}

impl Aggregate for Job {
    type Event = JobEvent;

    fn load(
        store: &Store,
        namespace: &str,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<Self>, StoreError>> + Send {
        store::jobs::get(&store.pool, namespace, id)
    }

    fn append(
        &self,
        id: Uuid,
        events: &[JobEvent],
        metadata: &EventMetadata,
        at: DateTime<Utc>,
    ) -> Result<(Job, Append), StoreError> {
        job_append(Some(self), id, events, JobWrite::new(metadata.clone(), at))
            .map_err(|e| StoreError::Internal(e.to_string()))
    }
}

impl Aggregate for Schedule {
    type Event = ScheduleEvent;

    fn load(
        store: &Store,
        namespace: &str,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<Self>, StoreError>> + Send {
        store::schedules::get(&store.pool, namespace, id)
    }

    fn append(
        &self,
        id: Uuid,
        events: &[ScheduleEvent],
        metadata: &EventMetadata,
        at: DateTime<Utc>,
    ) -> Result<(Schedule, Append), StoreError> {
        schedule_append(
            Some(self),
            id,
            &self.namespace,
            events,
            metadata.clone(),
            at,
        )
        .ok_or_else(does_not_apply::<ScheduleEvent>)
    }
}

impl Aggregate for Workflow {
    type Event = WorkflowEvent;

    fn load(
        store: &Store,
        namespace: &str,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<Self>, StoreError>> + Send {
        store::workflows::get(&store.pool, namespace, id)
    }

    fn append(
        &self,
        id: Uuid,
        events: &[WorkflowEvent],
        metadata: &EventMetadata,
        at: DateTime<Utc>,
    ) -> Result<(Workflow, Append), StoreError> {
        workflow_append(Some(self), id, events, metadata.clone(), at)
            .ok_or_else(does_not_apply::<WorkflowEvent>)
    }
}

impl Aggregate for Trigger {
    type Event = TriggerEvent;

    fn load(
        store: &Store,
        namespace: &str,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<Self>, StoreError>> + Send {
        store::triggers::get(&store.pool, namespace, id)
    }

    fn append(
        &self,
        id: Uuid,
        events: &[TriggerEvent],
        metadata: &EventMetadata,
        at: DateTime<Utc>,
    ) -> Result<(Trigger, Append), StoreError> {
        trigger_append(
            Some(self),
            id,
            &self.namespace,
            events,
            metadata.clone(),
            at,
        )
        .ok_or_else(does_not_apply::<TriggerEvent>)
    }
}

impl Aggregate for Delivery {
    type Event = DeliveryEvent;

    fn load(
        store: &Store,
        namespace: &str,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<Self>, StoreError>> + Send {
        store::deliveries::get(&store.pool, namespace, id)
    }

    fn append(
        &self,
        id: Uuid,
        events: &[DeliveryEvent],
        metadata: &EventMetadata,
        at: DateTime<Utc>,
    ) -> Result<(Delivery, Append), StoreError> {
        delivery_append(
            Some(self),
            id,
            &self.namespace,
            events,
            metadata.clone(),
            at,
        )
        .ok_or_else(does_not_apply::<DeliveryEvent>)
    }
}

impl Aggregate for Run {
    type Event = RunEvent;

    fn load(
        store: &Store,
        namespace: &str,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<Self>, StoreError>> + Send {
        store::runs::get(&store.pool, namespace, id)
    }

    fn append(
        &self,
        id: Uuid,
        events: &[RunEvent],
        metadata: &EventMetadata,
        at: DateTime<Utc>,
    ) -> Result<(Run, Append), StoreError> {
        let mut run = self.clone();
        for e in events {
            run = Run::apply(Some(run), id, &self.namespace, e, at)
                .ok_or_else(does_not_apply::<RunEvent>)?;
        }
        let append = Append::of(
            id,
            Some(self.stream_version),
            events,
            metadata.clone(),
            at,
            vec![Effect::UpsertRun(Box::new(run.clone()))],
        );
        Ok((run, append))
    }
}

/// A decision whose events the fold refuses: a bug of the decision, not the caller's.
fn does_not_apply<E: DomainEvent>() -> StoreError {
    StoreError::Internal(format!("the events do not apply to the {}", E::STREAM))
}

/// What a decision records: the aggregate's own events, appends of other streams that commit
/// in the same transaction (the job that a redelivery queues), and a value for the caller.
#[derive(Debug)]
pub struct Decision<E, T> {
    pub events: Vec<E>,
    pub with: Vec<Append>,
    pub out: T,
}

/// How many times a command re-reads a stream that changed under it before giving up.
const ATTEMPTS: u32 = 20;

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

/// Run `decide` on the aggregate `id` of `namespace` and record its events, re-reading and
/// deciding again when another writer got there first. `decide` returns the events and a value
/// for the caller (what follows the change); no events means nothing to record. Returns the
/// state after the events, and that value.
pub async fn execute<A, T, E, F>(
    store: &Store,
    namespace: &str,
    id: Uuid,
    metadata: &EventMetadata,
    decide: F,
) -> Result<(A, T), CommandError<E>>
where
    A: Aggregate,
    E: std::error::Error + 'static,
    F: Fn(&A) -> Result<(Vec<A::Event>, T), E>,
{
    execute_from(store, namespace, id, None, metadata, decide).await
}

/// [`execute`] that decides first on `loaded`, the aggregate as the caller already read it
/// (one read for a batch of commands); a conflict reads it again as usual. `None` reads it
/// first, as [`execute`] does.
pub async fn execute_from<A, T, E, F>(
    store: &Store,
    namespace: &str,
    id: Uuid,
    loaded: Option<A>,
    metadata: &EventMetadata,
    decide: F,
) -> Result<(A, T), CommandError<E>>
where
    A: Aggregate,
    E: std::error::Error + 'static,
    F: Fn(&A) -> Result<(Vec<A::Event>, T), E>,
{
    let decide = |a: &A| {
        decide(a).map(|(events, out)| Decision {
            events,
            with: Vec::new(),
            out,
        })
    };
    execute_async_from(store, namespace, id, loaded, |current: A| {
        std::future::ready(writes(current, &decide, id, metadata))
    })
    .await
}

/// [`execute`] for a decision that also writes other streams ([`Decision::with`]), all in one
/// transaction: a conflict on any of them re-reads the aggregate and decides again.
pub async fn execute_with<A, T, E, F>(
    store: &Store,
    namespace: &str,
    id: Uuid,
    metadata: &EventMetadata,
    decide: F,
) -> Result<(A, T), CommandError<E>>
where
    A: Aggregate,
    E: std::error::Error + 'static,
    F: Fn(&A) -> Result<Decision<A::Event, T>, E>,
{
    execute_async(store, namespace, id, |current: A| {
        // The decision is synchronous; only its commit waits.
        std::future::ready(writes(current, &decide, id, metadata))
    })
    .await
}

/// One attempt of [`execute_with`]: the decision on `current` and the appends that record it.
fn writes<A, T, E, F>(
    current: A,
    decide: &F,
    id: Uuid,
    metadata: &EventMetadata,
) -> Result<Writes<(A, T)>, CommandError<E>>
where
    A: Aggregate,
    E: std::error::Error + 'static,
    F: Fn(&A) -> Result<Decision<A::Event, T>, E>,
{
    let decision = decide(&current).map_err(CommandError::Rejected)?;
    let (new, mut appends) = if decision.events.is_empty() {
        (current, Vec::new())
    } else {
        let (new, append) = current.append(id, &decision.events, metadata, now())?;
        (new, vec![append])
    };
    appends.extend(decision.with);
    Ok(Writes {
        appends,
        out: (new, decision.out),
    })
}

/// What one attempt of a command commits (in one transaction; nothing when empty) and the value
/// it gives its caller once committed.
#[derive(Debug)]
pub struct Writes<T> {
    pub appends: Vec<Append>,
    pub out: T,
}

/// The loop under every command: load the aggregate, let `attempt` decide and build what it
/// writes (it may read other streams first: the definition a run pinned, the workflow a hook
/// call starts), commit that, and when another writer got there first (a version conflict on
/// any of the appends) wait a little, load again and attempt again.
pub async fn execute_async<A, T, E, F, Fut>(
    store: &Store,
    namespace: &str,
    id: Uuid,
    attempt: F,
) -> Result<T, CommandError<E>>
where
    A: Aggregate,
    E: std::error::Error + 'static,
    F: Fn(A) -> Fut,
    Fut: Future<Output = Result<Writes<T>, CommandError<E>>>,
{
    execute_async_from(store, namespace, id, None, attempt).await
}

/// [`execute_async`] whose first attempt runs on `loaded` when given (read by the caller).
async fn execute_async_from<A, T, E, F, Fut>(
    store: &Store,
    namespace: &str,
    id: Uuid,
    mut loaded: Option<A>,
    attempt: F,
) -> Result<T, CommandError<E>>
where
    A: Aggregate,
    E: std::error::Error + 'static,
    F: Fn(A) -> Fut,
    Fut: Future<Output = Result<Writes<T>, CommandError<E>>>,
{
    for round in 0..ATTEMPTS {
        let current = match loaded.take() {
            Some(current) => current,
            None => A::load(store, namespace, id)
                .await?
                .ok_or(CommandError::NotFound)?,
        };
        let Writes { appends, out } = attempt(current).await?;
        // One stream joins the group commit; several commit together in their own transaction.
        let written = match <[Append; 1]>::try_from(appends) {
            Ok([one]) => store.appender.append(one).await.map(drop),
            Err(appends) if appends.is_empty() => Ok(()),
            Err(appends) => store.appender.append_all(appends).await.map(drop),
        };
        match written {
            Ok(()) => return Ok(out),
            Err(AppendError::Conflict { .. }) => {
                // Another writer won this round: back off a little (randomly, so that the
                // losers of a crowd do not collide again in the next group commit).
                let most_ms = 2u64 << round.min(5);
                tokio::time::sleep(std::time::Duration::from_millis(
                    rand::random::<u64>() % most_ms,
                ))
                .await;
            }
            Err(e) => return Err(StoreError::from(e).into()),
        }
    }
    Err(CommandError::Busy)
}
