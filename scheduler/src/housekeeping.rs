//! Housekeeping duties, safe to run in any number of scheduler replicas: every write is fenced by
//! a stream version or claimed with `FOR UPDATE SKIP LOCKED`.
//!
//! - promoter: scheduled jobs whose `run_at` passed get `JobQueued` (and so a dispatch row);
//! - expirer: waiting jobs past their `expires_at` or `deadline_at` get `JobCanceled` with
//!   `expired` or `deadline_exceeded` (no attempt used);
//! - relay: queued jobs Redis does not hold are pushed again (checked without writing to Postgres);
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

use crate::driver::every;

/// Intervals of the loops.
#[derive(Debug, Clone)]
pub struct HousekeepingOptions {
    pub promote_every: Duration,
    pub relay_every: Duration,
    pub reap_every: Duration,
    /// A dispatch row older than this is checked against Redis (the fast path usually pushed it).
    pub relay_grace: Duration,
    /// How often every queued row is checked again (finds jobs popped by a worker that died).
    pub repush_after: Duration,
    /// Age after which terminal jobs' projection rows are pruned (None = never).
    pub retention: Option<Duration>,
}

impl HousekeepingOptions {
    pub fn new(visibility_timeout: Duration) -> Self {
        Self {
            promote_every: Duration::from_millis(100),
            relay_every: Duration::from_millis(250),
            reap_every: Duration::from_millis(500),
            relay_grace: Duration::from_secs(2),
            repush_after: visibility_timeout,
            retention: None,
        }
    }
}

fn scheduler_metadata(job: &Job) -> EventMetadata {
    EventMetadata {
        namespace: job.namespace.clone(),
        actor: Some("scheduler".into()),
        correlation_id: None,
        causation_id: None,
        ..Default::default()
    }
}

/// Run every loop until `stop`.
pub async fn run(store: Store, queue: Queue, opts: HousekeepingOptions, stop: CancellationToken) {
    tokio::join!(
        every(opts.promote_every, &stop, || promote_due(&store)),
        every(opts.promote_every, &stop, || expire_due(&store)),
        relay_loop(&store, &queue, &opts, &stop),
        crate::flow::run(&store, &queue, &stop),
        every(opts.reap_every, &stop, || reap(&store)),
        gauges_loop(&store, opts.repush_after, &stop),
        every(Duration::from_secs(5), &stop, || retention(
            &store,
            opts.retention
        )),
    );
}

async fn relay_loop(
    store: &Store,
    queue: &Queue,
    opts: &HousekeepingOptions,
    stop: &CancellationToken,
) {
    let mut relay = Relay::new(opts.clone());
    loop {
        if let Err(e) = relay.sweep(store, queue).await {
            tracing::warn!(error = %e, "relay sweep failed; retrying");
        }
        tokio::select! {
            _ = tokio::time::sleep(opts.relay_every) => {}
            _ = stop.cancelled() => return,
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

/// Cancel waiting jobs whose time ran out ([`Job::expiry`]). Returns how many (the loop runs
/// again at once while there is a backlog).
pub async fn expire_due(store: &Store) -> Result<usize, store::StoreError> {
    let now = domain::now();
    let expiring = store::jobs::expiring(&store.pool, 500).await?;
    let mut appends = Vec::with_capacity(expiring.len());
    for job in &expiring {
        let Some(event) = job.expiry(now) else {
            continue;
        };
        if let Ok((_, a)) = job_append(
            Some(job),
            job.id,
            &[event],
            JobWrite::new(scheduler_metadata(job), now),
        ) {
            appends.push(a);
        }
    }
    let n = appends.len();
    // Conflicts: the job started (or was canceled) meanwhile; the next sweep sees it again.
    store.appender.append_many(appends).await;
    Ok(if expiring.len() == 500 { n } else { 0 })
}

/// The relay: makes sure Redis holds every queued job, without writing to Postgres.
///
/// Rows that just passed the grace period are checked once (the writer's fast path normally
/// pushed them: the check is a pipelined `ZSCORE`), and every `repush_after` all rows are checked
/// again, which finds jobs popped by a worker that died before starting them. A Redis that lost
/// its data (no epoch mark) triggers a full pass at once. Pushes are `ZADD NX`, so replicas and
/// races with the fast path are harmless.
pub struct Relay {
    opts: HousekeepingOptions,
    /// Rows enqueued up to here have been checked at least once.
    checked_until: Option<chrono::DateTime<chrono::Utc>>,
    last_full: Option<tokio::time::Instant>,
}

const RELAY_PAGE: i64 = 2000;
/// Entries per push transaction of the relay.
const RELAY_PUSH_CHUNK: usize = 100;

impl Relay {
    pub fn new(opts: HousekeepingOptions) -> Self {
        Self {
            opts,
            checked_until: None,
            last_full: None,
        }
    }

    /// One sweep; returns how many jobs were pushed.
    pub async fn sweep(
        &mut self,
        store: &Store,
        queue: &Queue,
    ) -> Result<usize, store::StoreError> {
        let unavailable =
            |e: capibara_shared::queue::QueueError| store::StoreError::Unavailable(e.to_string());
        let wiped = !queue.epoch_present().await.map_err(unavailable)?;
        if wiped {
            // Mark the epoch first: jobs pushed from now on count as held.
            queue.push(&[]).await.map_err(unavailable)?;
        }
        let now = domain::now();
        let horizon = now - chrono::Duration::from_std(self.opts.relay_grace).unwrap_or_default();
        let full_due = wiped
            || self.checked_until.is_none()
            || self
                .last_full
                .is_none_or(|t| t.elapsed() >= self.opts.repush_after);
        let mut cursor = match (full_due, self.checked_until) {
            (false, Some(at)) => Some((at, uuid::Uuid::max())),
            _ => None,
        };
        let mut pushed = 0;
        loop {
            let page = store::dispatch::page(&store.pool, cursor, horizon, RELAY_PAGE).await?;
            let Some(last) = page.last() else { break };
            cursor = Some((last.enqueued_at, last.job_id));
            let missing = queue.missing(&page).await.map_err(unavailable)?;
            // In small transactions: a Redis near its `maxmemory` takes what fits (workers
            // popping free room for the rest) instead of refusing one page-sized push forever.
            for chunk in missing.chunks(RELAY_PUSH_CHUNK) {
                queue.push(chunk).await.map_err(unavailable)?;
                pushed += chunk.len();
            }
            if (page.len() as i64) < RELAY_PAGE {
                break;
            }
        }
        self.checked_until = Some(horizon);
        if full_due {
            self.last_full = Some(tokio::time::Instant::now());
        }
        if pushed > 0 {
            metrics::counter!("capibara_relay_pushed_total").increment(pushed as u64);
            if wiped {
                tracing::warn!(
                    pushed,
                    "Redis lost its dispatch data; re-dispatched queued jobs from Postgres"
                );
            } else {
                tracing::info!(pushed, "relay re-dispatched queued jobs Redis did not hold");
            }
        }
        Ok(pushed)
    }
}

/// Prune projections of finished work older than the retention period, in batches. The event
/// log keeps everything (`capibara admin rebuild-projections` would bring the rows back).
pub async fn retention(store: &Store, keep: Option<Duration>) -> Result<usize, store::StoreError> {
    let Some(keep) = keep else { return Ok(0) };
    let secs = keep.as_secs_f64();
    let jobs = sqlx::query(
        "DELETE FROM jobs WHERE id IN (
             SELECT id FROM jobs WHERE status IN ('succeeded', 'failed', 'canceled')
               AND finished_at < now() - make_interval(secs => $1) LIMIT 1000)",
    )
    .bind(secs)
    .execute(&store.pool)
    .await?
    .rows_affected();
    let deliveries = sqlx::query(
        "DELETE FROM deliveries WHERE id IN (
             SELECT id FROM deliveries WHERE status IN ('succeeded', 'failed')
               AND updated_at < now() - make_interval(secs => $1) LIMIT 1000)",
    )
    .bind(secs)
    .execute(&store.pool)
    .await?
    .rows_affected();
    sqlx::query("DELETE FROM trigger_receipts WHERE received_at < now() - interval '1 day'")
        .execute(&store.pool)
        .await?;
    sqlx::query(
        "DELETE FROM commands WHERE received_at < now() - make_interval(secs => greatest($1, 86400))",
    )
    .bind(secs)
    .execute(&store.pool)
    .await?;
    let n = (jobs + deliveries) as usize;
    if n > 0 {
        metrics::counter!("capibara_retention_pruned_total").increment(n as u64);
        tracing::info!(jobs, deliveries, "retention pruned finished projections");
    }
    Ok(if jobs == 1000 || deliveries == 1000 {
        n
    } else {
        0
    })
}

/// End attempts whose lease expired.
pub async fn reap(store: &Store) -> Result<usize, store::StoreError> {
    let expired = store::lease::expired(&store.pool, 200).await?;
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
                error: None,
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

/// Queue gauges for `/metrics`. Queues seen once keep being reported (at zero when empty).
/// With them, the live workers of each user kind (`visibility_timeout` sets the window).
async fn gauges_loop(store: &Store, visibility_timeout: Duration, stop: &CancellationToken) {
    let mut known: std::collections::BTreeSet<String> = ["default".to_string()].into();
    loop {
        match store::jobs::queue_stats(&store.pool, None).await {
            Ok(stats) => {
                known.extend(stats.iter().map(|q| q.name.clone()));
                for name in &known {
                    let q = stats.iter().find(|q| &q.name == name);
                    let label = name.clone();
                    metrics::gauge!("capibara_queue_depth", "queue" => label.clone())
                        .set(q.map_or(0.0, |q| q.depth as f64));
                    metrics::gauge!("capibara_queue_running", "queue" => label.clone())
                        .set(q.map_or(0.0, |q| q.running as f64));
                    metrics::gauge!("capibara_queue_scheduled", "queue" => label.clone())
                        .set(q.map_or(0.0, |q| q.scheduled as f64));
                    metrics::gauge!("capibara_queue_oldest_age_seconds", "queue" => label)
                        .set(q.and_then(|q| q.oldest_age_s).unwrap_or(0.0));
                }
            }
            Err(e) => tracing::debug!(error = %e, "queue gauges failed"),
        }
        let since = store::user_kinds::live_since(visibility_timeout);
        match store::user_kinds::live_workers_all(&store.pool, since).await {
            Ok(kinds) => {
                for (namespace, kind, n) in kinds {
                    metrics::gauge!("capibara_kind_live_workers", "namespace" => namespace, "kind" => kind)
                        .set(n as f64);
                }
            }
            Err(e) => tracing::debug!(error = %e, "kind gauges failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.cancelled() => return,
        }
    }
}
