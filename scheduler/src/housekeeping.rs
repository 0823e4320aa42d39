//! Housekeeping duties, safe to run in any number of scheduler replicas: every write is fenced by
//! a stream version or claimed with `FOR UPDATE SKIP LOCKED`.
//!
//! - promoter: scheduled jobs whose `run_at` passed get `JobQueued` (and so a dispatch row);
//! - relay: dispatch rows Redis may have lost are pushed again (all of them after a Redis wipe);
//! - reaper: attempts whose lease expired (their worker died) fail with `worker_lost` and are
//!   retried per their policy;
//! - gauges: queue depth, running and oldest age for `/metrics`.

use std::time::Duration;

use capibara_shared::{
    domain::{
        self,
        event::EventMetadata,
        job::{Job, JobError, JobEvent, JobStatus},
    },
    queue::Queue,
    store::{
        self,
        jobs::{job_append, JobWrite},
        Store,
    },
};
use tokio_util::sync::CancellationToken;

/// Intervals of the loops.
#[derive(Debug, Clone)]
pub struct HousekeepingOptions {
    pub promote_every: Duration,
    pub relay_every: Duration,
    pub reap_every: Duration,
    /// A dispatch row unconfirmed for this long is pushed by the relay (the fast path usually did).
    pub relay_grace: Duration,
    /// A pushed row still queued after this long is pushed again (popped by a worker that died).
    pub repush_after: Duration,
}

impl HousekeepingOptions {
    pub fn new(visibility_timeout: Duration) -> Self {
        Self {
            promote_every: Duration::from_millis(100),
            relay_every: Duration::from_millis(250),
            reap_every: Duration::from_millis(500),
            relay_grace: Duration::from_secs(2),
            repush_after: visibility_timeout,
        }
    }
}

fn scheduler_metadata(job: &Job) -> EventMetadata {
    EventMetadata {
        namespace: job.namespace.clone(),
        actor: Some("scheduler".into()),
        correlation_id: None,
        causation_id: None,
    }
}

/// Run every loop until `stop`.
pub async fn run(store: Store, queue: Queue, opts: HousekeepingOptions, stop: CancellationToken) {
    tokio::join!(
        every(opts.promote_every, &stop, || promote_due(&store)),
        every(opts.relay_every, &stop, || relay(&store, &queue, &opts)),
        every(opts.reap_every, &stop, || reap(&store)),
        every(Duration::from_secs(2), &stop, || gauges(&store)),
    );
}

async fn every<F, Fut>(period: Duration, stop: &CancellationToken, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<usize, store::StoreError>>,
{
    loop {
        let more = match f().await {
            Ok(n) => n > 0,
            Err(e) => {
                tracing::debug!(error = %e, "housekeeping step failed");
                false
            }
        };
        if stop.is_cancelled() {
            return;
        }
        if !more {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Queue scheduled jobs that are due. Returns how many were promoted (so the loop runs again at
/// once while there is a backlog).
pub async fn promote_due(store: &Store) -> Result<usize, store::StoreError> {
    let due = store::jobs::due(&store.pool, 500).await?;
    let mut appends = Vec::with_capacity(due.len());
    for job in &due {
        let events = [JobEvent::JobQueued {
            reason: "due".into(),
            max_attempts: None,
        }];
        if let Ok((_, a)) = job_append(
            Some(job),
            job.id,
            &events,
            JobWrite::new(scheduler_metadata(job), domain::now()),
        ) {
            appends.push(a);
        }
    }
    let n = appends.len();
    // Conflicts mean another replica (or a cancel) got there first: fine.
    store.appender.append_many(appends).await;
    Ok(if n == 500 { n } else { 0 })
}

/// Push dispatch rows that Redis may not hold.
pub async fn relay(
    store: &Store,
    queue: &Queue,
    opts: &HousekeepingOptions,
) -> Result<usize, store::StoreError> {
    match queue.epoch_present().await {
        Ok(false) => {
            let n = store::dispatch::reset_pushed(&store.pool).await?;
            if n > 0 {
                tracing::warn!(
                    rows = n,
                    "Redis lost its dispatch data; re-dispatching every queued job"
                );
            }
            // Mark the epoch even with nothing queued, so the next sweep does not repeat this.
            queue
                .push(&[])
                .await
                .map_err(|e| store::StoreError::Unavailable(e.to_string()))?;
        }
        Ok(true) => {}
        Err(e) => return Err(store::StoreError::Unavailable(e.to_string())),
    }
    let grace_ms = opts.relay_grace.as_millis() as i64;
    let entries = store::dispatch::claim_for_push(
        &store.pool,
        grace_ms,
        opts.repush_after.as_secs().max(1) as i64,
        1000,
    )
    .await?;
    if entries.is_empty() {
        return Ok(0);
    }
    queue
        .push(&entries)
        .await
        .map_err(|e| store::StoreError::Unavailable(e.to_string()))?;
    metrics::counter!("capibara_relay_pushed_total").increment(entries.len() as u64);
    tracing::debug!(count = entries.len(), "relay pushed queued jobs");
    Ok(if entries.len() == 1000 {
        entries.len()
    } else {
        0
    })
}

/// End attempts whose lease expired.
pub async fn reap(store: &Store) -> Result<usize, store::StoreError> {
    let expired = store::workers::expired_leases(&store.pool, 200).await?;
    if expired.is_empty() {
        return Ok(0);
    }
    let ids: Vec<_> = expired.iter().map(|(id, _)| *id).collect();
    let jobs = store::jobs::get_many(&store.pool, &ids).await?;
    let now = domain::now();
    let mut appends = Vec::new();
    for job in &jobs {
        let Some((_, attempt)) = expired.iter().find(|(id, _)| *id == job.id) else {
            continue;
        };
        if job.status != JobStatus::Running || job.attempt as i32 != *attempt {
            continue;
        }
        let events = if job.cancel_requested {
            vec![JobEvent::JobCanceled {
                attempt: Some(job.attempt),
            }]
        } else {
            job.attempt_failure_events(
                job.attempt,
                JobError::new(
                    "worker_lost",
                    "the worker stopped heartbeating (crashed or hung); lease expired",
                ),
                true,
                None,
                now,
            )
        };
        if let Ok((_, a)) = job_append(
            Some(job),
            job.id,
            &events,
            JobWrite::new(scheduler_metadata(job), now),
        ) {
            appends.push(a);
        }
    }
    let n = appends.len();
    if n > 0 {
        tracing::warn!(count = n, "expired leases: attempts marked worker_lost");
        metrics::counter!("capibara_leases_expired_total").increment(n as u64);
    }
    store.appender.append_many(appends).await;
    Ok(0)
}

async fn gauges(store: &Store) -> Result<usize, store::StoreError> {
    for q in store::jobs::queue_stats(&store.pool, None).await? {
        metrics::gauge!("capibara_queue_depth", "queue" => q.name.clone()).set(q.depth as f64);
        metrics::gauge!("capibara_queue_running", "queue" => q.name.clone()).set(q.running as f64);
        metrics::gauge!("capibara_queue_scheduled", "queue" => q.name.clone())
            .set(q.scheduled as f64);
        metrics::gauge!("capibara_queue_oldest_age_seconds", "queue" => q.name.clone())
            .set(q.oldest_age_s.unwrap_or(0.0));
    }
    Ok(0)
}
