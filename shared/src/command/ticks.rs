//! Firing a schedule's tick: the `TickFired` event and what it starts (the schedule's job, or a
//! run of its workflow), one definition for the ticker, `POST /v1/schedules/{id}/trigger` and
//! `…/backfill`. The manual and backfilled ticks go through the command loop (a concurrent
//! change of the schedule re-reads it and fires again from there); the ticker applies the same
//! [`fire`] inside its own pass (a lost race means the tick was fired by another replica).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{execute_async, CommandError, Writes};
use crate::{
    domain::{
        event::EventMetadata,
        now,
        schedule::{Schedule, ScheduleEvent},
        FieldError,
    },
    store::{self, runs::StartError, schedules::schedule_append, Append, Store, StoreError},
};

/// Why a tick cannot start what its schedule targets.
#[derive(Debug, thiserror::Error)]
pub enum FireError {
    #[error("the target workflow no longer exists")]
    WorkflowGone,
    /// The workflow's input schema refuses the target's input.
    #[error("{}: {}", .0.field, .0.message)]
    Input(FieldError),
    /// The stored target does not read (a bug or a hand-edited row).
    #[error("the schedule's target cannot be read")]
    Unreadable,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A fired tick: its event and the appends of the job or run it starts.
#[derive(Debug)]
pub struct Fired {
    pub event: ScheduleEvent,
    pub appends: Vec<Append>,
}

/// Fire `s`'s tick of `fire_time` (`trigger`: `schedule`, `catch_up`, `buffered`, `manual` or
/// `backfill`), recorded as done by `actor`.
pub async fn fire(
    store: &Store,
    s: &Schedule,
    fire_time: DateTime<Utc>,
    trigger: &str,
    actor: &str,
    at: DateTime<Utc>,
) -> Result<Fired, FireError> {
    if let Some(prepared) = store::runs::prepare_tick_run(store, s, fire_time, actor).await {
        let (run_id, appends) = prepared.map_err(|e| match e {
            StartError::WorkflowNotFound => FireError::WorkflowGone,
            StartError::Input(e) => FireError::Input(e),
            StartError::Store(e) => FireError::Store(e),
            StartError::Append(e) => FireError::Store(e.into()),
        })?;
        let event = ScheduleEvent::TickFired {
            fire_time,
            job_id: None,
            run_id: Some(run_id),
            trigger: trigger.into(),
        };
        return Ok(Fired { event, appends });
    }
    let sub = s.tick_job(fire_time).ok_or(FireError::Unreadable)?;
    let job_id = Uuid::now_v7();
    let job = store::jobs::submit_append(job_id, sub, metadata(s, actor), at)?;
    let event = ScheduleEvent::TickFired {
        fire_time,
        job_id: Some(job_id),
        run_id: None,
        trigger: trigger.into(),
    };
    Ok(Fired {
        event,
        appends: vec![job],
    })
}

/// How a tick's events and jobs are recorded.
pub fn metadata(s: &Schedule, actor: &str) -> EventMetadata {
    EventMetadata {
        namespace: s.namespace.clone(),
        actor: Some(actor.to_string()),
        ..Default::default()
    }
}

/// Why ticks were not fired on request.
#[derive(Debug, thiserror::Error)]
pub enum TickError {
    #[error(transparent)]
    Fire(#[from] FireError),
    /// A backfill range holding more ticks than one request may fire.
    #[error("the range holds more than {0} ticks")]
    TooMany(usize),
}

/// Fire schedule `id`'s tick now (`POST /v1/schedules/{id}/trigger`); returns the schedule
/// after it.
pub async fn fire_now(
    store: &Store,
    namespace: &str,
    id: Uuid,
    actor: &str,
) -> Result<Schedule, CommandError<TickError>> {
    execute_async(store, namespace, id, |s: Schedule| async move {
        let at = now();
        let fired = fire(store, &s, at, "manual", actor, at)
            .await
            .map_err(rejected)?;
        record(&s, vec![fired], actor, at)
    })
    .await
}

/// Fire every tick of schedule `id` in `[from, to]` that was not fired yet
/// (`POST /v1/schedules/{id}/backfill`), at most `max`; returns the schedule after them.
pub async fn backfill(
    store: &Store,
    namespace: &str,
    id: Uuid,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    max: usize,
    actor: &str,
) -> Result<Schedule, CommandError<TickError>> {
    execute_async(store, namespace, id, |s: Schedule| async move {
        let spec = s.cron_spec().ok_or(CommandError::Rejected(TickError::Fire(
            FireError::Unreadable,
        )))?;
        let times: Vec<DateTime<Utc>> = spec
            .after(from - chrono::Duration::microseconds(1))
            .take_while(|t| *t <= to)
            .take(max + 1)
            .collect();
        if times.len() > max {
            return Err(CommandError::Rejected(TickError::TooMany(max)));
        }
        let done = store::schedules::fired_between(&store.pool, s.id, from, to).await?;
        let at = now();
        let mut fired = Vec::new();
        for t in times.into_iter().filter(|t| !done.contains(t)) {
            fired.push(
                fire(store, &s, t, "backfill", actor, at)
                    .await
                    .map_err(rejected)?,
            );
        }
        record(&s, fired, actor, at)
    })
    .await
}

fn rejected(e: FireError) -> CommandError<TickError> {
    match e {
        FireError::Store(e) => CommandError::Store(e),
        e => CommandError::Rejected(TickError::Fire(e)),
    }
}

/// The schedule's append of `fired` ticks, with what they start; nothing when none fired.
fn record(
    s: &Schedule,
    fired: Vec<Fired>,
    actor: &str,
    at: DateTime<Utc>,
) -> Result<Writes<Schedule>, CommandError<TickError>> {
    if fired.is_empty() {
        return Ok(Writes {
            appends: Vec::new(),
            out: s.clone(),
        });
    }
    let (events, starts): (Vec<ScheduleEvent>, Vec<Vec<Append>>) =
        fired.into_iter().map(|f| (f.event, f.appends)).unzip();
    let (new, append) =
        schedule_append(Some(s), s.id, &s.namespace, &events, metadata(s, actor), at)
            .ok_or_else(|| StoreError::Internal("the ticks do not apply to the schedule".into()))?;
    let mut appends = vec![append];
    appends.extend(starts.into_iter().flatten());
    Ok(Writes { appends, out: new })
}
