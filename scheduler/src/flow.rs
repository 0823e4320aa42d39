//! Flow control's housekeeping (docs/flow-control.md): keep Redis's limits and pauses equal to
//! Postgres's, give back slots no job holds any more (a release Redis never saw), and record
//! each decision to hold a job back as `JobWaiting` on the job. Safe with several replicas:
//! waits are taken off Redis atomically, appends are version-checked, syncs are idempotent.

use std::time::Duration;

use capibara_shared::{
    domain::{self, job::JobEvent, job::JobStatus},
    flow,
    queue::Queue,
    store::{
        self,
        jobs::{job_append, JobWrite},
        Store,
    },
};
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long a popped job may hold a slot without running before it is given back.
const HELD_GRACE: Duration = Duration::from_secs(10);

pub async fn run(store: &Store, queue: &Queue, stop: &CancellationToken) {
    let mut last_sync: Option<tokio::time::Instant> = None;
    loop {
        if last_sync.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
            if let Err(e) = flow::sync_queue(&store.pool, queue).await {
                tracing::debug!(error = %e, "syncing limits and pauses to Redis failed");
            }
            if let Err(e) = reconcile(store, queue).await {
                tracing::debug!(error = %e, "reconciling held slots failed");
            }
            last_sync = Some(tokio::time::Instant::now());
        }
        if let Err(e) = record_waits(store, queue).await {
            tracing::debug!(error = %e, "recording waits failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

fn unavailable(e: capibara_shared::queue::QueueError) -> store::StoreError {
    store::StoreError::Unavailable(e.to_string())
}

/// Slots held by jobs that no longer run (ordering keys: that ended) go back.
async fn reconcile(store: &Store, queue: &Queue) -> Result<(), store::StoreError> {
    let before = (domain::now() - chrono::Duration::from_std(HELD_GRACE).unwrap_or_default())
        .timestamp_millis();
    for (set, ids) in queue.held_before(before).await.map_err(unavailable)? {
        let ordering = set.contains(":ord:");
        let jobs = store::jobs::get_many(&store.pool, &ids).await?;
        let stale: Vec<Uuid> = ids
            .iter()
            .filter(|id| match jobs.iter().find(|j| j.id == **id) {
                None => true,
                Some(j) if ordering => j.status.is_terminal(),
                Some(j) => j.status != JobStatus::Running,
            })
            .copied()
            .collect();
        if !stale.is_empty() {
            tracing::info!(set = %set, jobs = stale.len(), "gave back slots no running job held");
            queue.drop_held(&set, &stale).await.map_err(unavailable)?;
        }
    }
    Ok(())
}

/// Append `JobWaiting` for each decision the queue recorded (once per blocking episode).
async fn record_waits(store: &Store, queue: &Queue) -> Result<(), store::StoreError> {
    let waits = queue.take_waits(500).await.map_err(unavailable)?;
    if waits.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = waits
        .iter()
        .filter_map(|w| w["job"].as_str()?.parse().ok())
        .collect();
    let jobs = store::jobs::get_many(&store.pool, &ids).await?;
    let mut appends = Vec::new();
    for w in &waits {
        let Some(job) = w["job"]
            .as_str()
            .and_then(|s| s.parse::<Uuid>().ok())
            .and_then(|id| jobs.iter().find(|j| j.id == id))
        else {
            continue;
        };
        if job.status != JobStatus::Queued {
            continue;
        }
        let at = w["at_ms"]
            .as_i64()
            .and_then(DateTime::<Utc>::from_timestamp_millis)
            .unwrap_or_else(domain::now);
        let event = waiting_event(w);
        if let JobEvent::JobWaiting { reason, .. } = &event {
            if let Some(reason) = ["concurrency", "rate", "paused", "ordering"]
                .into_iter()
                .find(|r| r == reason)
            {
                metrics::counter!("capibara_flow_waits_total", "reason" => reason).increment(1);
            }
        }
        // The decision's own time, not when it was written down.
        let write = JobWrite::new(
            capibara_shared::domain::event::EventMetadata {
                namespace: job.namespace.clone(),
                actor: Some("scheduler".into()),
                ..Default::default()
            },
            domain::truncate_micros(at),
        );
        if let Ok((_, a)) = job_append(Some(job), job.id, &[event], write) {
            appends.push(a);
        }
    }
    // Conflicts: the job moved on meanwhile (started, say); its wait is over anyway.
    store.appender.append_many(appends).await;
    Ok(())
}

fn waiting_event(w: &Value) -> JobEvent {
    let text = |k: &str| w[k].as_str().map(str::to_string);
    JobEvent::JobWaiting {
        reason: text("reason").unwrap_or_else(|| "unknown".into()),
        limit: text("limit"),
        key: text("key"),
        target: text("target"),
        until: w["until_ms"]
            .as_f64()
            .and_then(|ms| DateTime::<Utc>::from_timestamp_millis(ms as i64)),
    }
}
