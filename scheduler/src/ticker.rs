//! The ticker: fires cron schedules. Any number of replicas run it; each tick is decided by
//! appending to the schedule's stream at the version read (the loser of a race sees a version
//! conflict and drops its attempt) and recorded in `schedule_ticks`, unique per
//! (schedule, fire time) — so every tick fires exactly once.

use std::time::Duration;

use capibara_shared::{
    command::ticks::{self, FireError},
    domain::{
        self,
        schedule::{plan, Schedule, ScheduleEvent, TickAction},
    },
    store::{self, schedules::schedule_append, AppendError, Store, StoreError},
};
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::driver::every;

/// The scheduler's clock: real time plus an offset (`CAPIBARA_CLOCK_OFFSET_S`, for tests that
/// need "an hour later" without waiting an hour).
#[derive(Debug, Clone, Copy, Default)]
pub struct Clock {
    pub offset: chrono::Duration,
}

impl Clock {
    pub fn from_env() -> Clock {
        let offset = std::env::var("CAPIBARA_CLOCK_OFFSET_S")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .map(|s| chrono::Duration::milliseconds((s * 1000.0) as i64))
            .unwrap_or_else(chrono::Duration::zero);
        Clock { offset }
    }

    pub fn now(&self) -> DateTime<Utc> {
        domain::now() + self.offset
    }
}

/// How often due schedules are looked for.
const POLL: Duration = Duration::from_millis(100);

/// Schedules whose tick the store refuses even without its job or run: left out of the due
/// query until the schedule changes (their id and the version refused), so they cannot starve
/// the others. Only for this process; a restart finds them again in one pass.
#[derive(Debug, Default)]
pub struct Refused(std::sync::Mutex<std::collections::HashMap<Uuid, i64>>);

impl Refused {
    fn ids(&self) -> Vec<Uuid> {
        self.0.lock().expect("refused").keys().copied().collect()
    }

    fn add(&self, s: &Schedule) {
        self.0.lock().expect("refused").insert(s.id, s.version);
    }

    /// Forget schedules changed since (a new version may be storable).
    async fn forget_changed(&self, pool: &sqlx::PgPool) -> Result<(), store::StoreError> {
        let ids = self.ids();
        if ids.is_empty() {
            return Ok(());
        }
        let now: Vec<(Uuid, i64)> =
            sqlx::query_as("SELECT id, version FROM schedules WHERE id = ANY($1)")
                .bind(&ids)
                .fetch_all(pool)
                .await?;
        let now: std::collections::HashMap<Uuid, i64> = now.into_iter().collect();
        self.0
            .lock()
            .expect("refused")
            .retain(|id, v| now.get(id) == Some(v));
        Ok(())
    }
}

/// Run until `stop`: a pass every `POLL`. A pass handles every due schedule (up to 500, each up
/// to its own tick limit), so the next one waits a period even after work: a schedule that
/// keeps being due (a bug) then costs one pass per `POLL`, not a busy loop.
pub async fn run(store: Store, clock: Clock, stop: CancellationToken) {
    let refused = Refused::default();
    every(POLL, &stop, || async {
        match tick_once_with(&store, clock, &refused).await {
            Ok(n) if n > 0 => tracing::debug!(schedules = n, "schedules ticked"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "ticking schedules failed"),
        }
        Ok(0)
    })
    .await
}

/// Schedules handled at once in one pass (each is its own small transaction).
const CONCURRENCY: usize = 16;

/// One pass over the due schedules; returns how many had something to do.
pub async fn tick_once(store: &Store, clock: Clock) -> Result<usize, store::StoreError> {
    tick_once_with(store, clock, &Refused::default()).await
}

async fn tick_once_with(
    store: &Store,
    clock: Clock,
    refused: &Refused,
) -> Result<usize, store::StoreError> {
    use futures::StreamExt;
    use rand::seq::SliceRandom;
    let now = clock.now();
    refused.forget_changed(&store.pool).await?;
    let mut due = store::schedules::due(&store.pool, now, 500, &refused.ids()).await?;
    if due.is_empty() {
        return Ok(0);
    }
    // Replicas take the due schedules in different orders, so they rarely race on the same one.
    due.shuffle(&mut rand::rng());
    let previous: Vec<Uuid> = due.iter().filter_map(|s| s.last_job_id).collect();
    let mut running: std::collections::HashSet<Uuid> =
        store::jobs::get_many(&store.pool, &previous)
            .await?
            .into_iter()
            .filter(|j| !j.status.is_terminal())
            .map(|j| j.id)
            .collect();
    // Workflow targets record their run's id.
    running.extend(
        store::runs::get_many(&store.pool, &previous)
            .await?
            .into_iter()
            .filter(|r| !r.status.is_terminal())
            .map(|r| r.id),
    );
    let results: Vec<Result<bool, store::StoreError>> = futures::stream::iter(due)
        .map(|s| {
            let previous_running = s.last_job_id.is_some_and(|j| running.contains(&j));
            async move {
                let actions = plan(&s, now, previous_running);
                if actions.is_empty() {
                    return Ok(false);
                }
                match apply(store, &s, &actions, clock.now()).await {
                    Ok(()) => Ok(true),
                    // Another replica decided these ticks first.
                    Err(AppendError::Conflict { .. }) => Ok(false),
                    // This schedule's tick the store refuses: recorded; the others go on.
                    Err(e @ AppendError::Invalid(_)) => {
                        refuse(store, &s, &actions, &e, clock.now(), refused).await;
                        Ok(true)
                    }
                    // An outage: this tick is tried again at the next pass.
                    Err(e) => Err(e.into()),
                }
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut acted = 0;
    let mut failed = None;
    for r in results {
        match r {
            Ok(true) => acted += 1,
            Ok(false) => {}
            Err(e) => failed = Some(e),
        }
    }
    match failed {
        Some(e) if acted == 0 => Err(e),
        _ => Ok(acted),
    }
}

/// A tick the store refused: record it as skipped, with the refusal as the reason, and pause
/// the schedule (its next tick would be refused the same way; `resume` starts it again); if
/// even that is refused, leave the schedule out of the due query until it changes.
async fn refuse(
    store: &Store,
    s: &Schedule,
    actions: &[TickAction],
    e: &AppendError,
    at: DateTime<Utc>,
    refused: &Refused,
) {
    metrics::counter!("capibara_schedule_ticks_refused_total").increment(1);
    let reason: String = format!("store_rejected: {e}")
        .replace('\0', "\\u0000")
        .chars()
        .take(500)
        .collect();
    tracing::warn!(schedule = %s.id, namespace = %s.namespace, reason, "the store refused a tick; skipping it");
    let mut events: Vec<ScheduleEvent> = actions
        .iter()
        .map(|a| match a {
            TickAction::Fire { fire_time, .. }
            | TickAction::Skip { fire_time, .. }
            | TickAction::Buffer { fire_time } => ScheduleEvent::TickSkipped {
                fire_time: *fire_time,
                reason: reason.clone(),
                count: 1,
            },
        })
        .collect();
    // Its next tick would be refused the same way: the schedule stops until it is resumed.
    events.push(ScheduleEvent::SchedulePaused {});
    let skipped = schedule_append(
        Some(s),
        s.id,
        &s.namespace,
        &events,
        ticks::metadata(s, "scheduler"),
        at,
    );
    let stored = match skipped {
        Some((_, append)) => store.appender.append_all(vec![append]).await,
        None => Err(AppendError::Unavailable("no events".into())),
    };
    match stored {
        Ok(_) | Err(AppendError::Conflict { .. }) => {}
        Err(e) => {
            tracing::error!(schedule = %s.id, error = %e, "the store refuses the schedule itself; leaving it out until it changes");
            refused.add(s);
        }
    }
}

/// Turn planned actions into one atomic write: the schedule's events and the jobs they submit.
pub async fn apply(
    store: &Store,
    s: &Schedule,
    actions: &[TickAction],
    at: DateTime<Utc>,
) -> Result<(), AppendError> {
    let mut events = Vec::new();
    let mut jobs = Vec::new();
    for a in actions {
        match a {
            TickAction::Fire { fire_time, trigger } => {
                match ticks::fire(store, s, *fire_time, trigger, "scheduler", at).await {
                    Ok(fired) => {
                        jobs.extend(fired.appends);
                        events.push(fired.event);
                    }
                    // An outage: the pass tries this tick again.
                    Err(FireError::Store(StoreError::Unavailable(m))) => {
                        return Err(AppendError::Unavailable(m))
                    }
                    Err(e) => events.push(ScheduleEvent::TickSkipped {
                        fire_time: *fire_time,
                        reason: match e {
                            FireError::Input(e) => {
                                format!("invalid_input: {}: {}", e.field, e.message)
                            }
                            FireError::WorkflowGone | FireError::Unreadable => {
                                "target_unavailable".into()
                            }
                            e => format!("target_unavailable: {e}"),
                        },
                        count: 1,
                    }),
                }
            }
            TickAction::Skip {
                fire_time,
                reason,
                count,
            } => events.push(ScheduleEvent::TickSkipped {
                fire_time: *fire_time,
                reason: reason.to_string(),
                count: *count,
            }),
            TickAction::Buffer { fire_time } => events.push(ScheduleEvent::TickBuffered {
                fire_time: *fire_time,
            }),
        }
    }
    let Some((_, append)) = schedule_append(
        Some(s),
        s.id,
        &s.namespace,
        &events,
        ticks::metadata(s, "scheduler"),
        at,
    ) else {
        return Ok(());
    };
    let mut all = vec![append];
    all.extend(jobs);
    let fired = events
        .iter()
        .filter(|e| matches!(e, ScheduleEvent::TickFired { .. }))
        .count();
    store.appender.append_all(all).await?;
    if fired > 0 {
        metrics::counter!("capibara_schedule_ticks_fired_total").increment(fired as u64);
        for e in &events {
            if let ScheduleEvent::TickFired { fire_time, .. } = e {
                let late = (at - fire_time).num_milliseconds().max(0) as f64 / 1000.0;
                metrics::histogram!("capibara_schedule_fire_lateness_seconds").record(late);
            }
        }
    }
    Ok(())
}
