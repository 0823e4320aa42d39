//! The limits every process dispatches with (docs/flow-control.md). A job's group
//! ([`Group::of`]) is decided when it is queued, from the limits this process last loaded:
//! [`spawn_refresher`] reloads them every second, and the API process that configures a limit
//! updates its own copy at once. A limit therefore applies to jobs queued from about a second
//! after it is configured; its `max_running` and `rate` are read by the queue itself, live.

use std::{
    sync::{Arc, LazyLock, RwLock},
    time::Duration,
};

use sqlx::PgPool;

use crate::domain::{
    job::Job,
    limit::{Group, Limit, LimitsByNamespace},
};

static BOOK: LazyLock<RwLock<Arc<LimitsByNamespace>>> = LazyLock::new(Default::default);

/// The dispatch group of `job` under the limits last loaded.
pub fn group_of(job: &Job) -> Group {
    let book = BOOK.read().expect("limits book").clone();
    let limits = book.get(&job.namespace).map(Vec::as_slice).unwrap_or(&[]);
    Group::of(job, limits)
}

/// Dispatch with `limits` (every namespace's live limits) from now on in this process.
pub fn install(limits: Vec<Limit>) {
    let mut next = LimitsByNamespace::new();
    for l in limits.into_iter().filter(|l| !l.deleted) {
        next.entry(l.namespace.clone()).or_default().push(l);
    }
    *BOOK.write().expect("limits book") = Arc::new(next);
}

/// Load every namespace's live limits from the queue's copy (Redis, which the scheduler keeps
/// equal to Postgres): no process polls Postgres for them.
pub async fn refresh(queue: &crate::queue::Queue) -> Result<(), crate::queue::QueueError> {
    install(queue.limits().await?);
    Ok(())
}

/// Keep this process's limits fresh: once now, then every second, for the process's life.
pub fn spawn_refresher(queue: crate::queue::Queue) {
    tokio::spawn(async move {
        loop {
            if let Err(e) = refresh(&queue).await {
                tracing::debug!(error = %e, "loading limits failed");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// The transaction-level advisory lock that serializes syncs ("capiflow").
const SYNC_LOCK: i64 = 0x6361_7069_666c_6f77;

/// Make Redis enforce what Postgres holds: every live limit, every pause; this process
/// dispatches with those limits at once (the API calls this after a change; the scheduler every
/// few seconds, which also heals a Redis that restarted empty).
///
/// Syncs take turns (an advisory lock held from the read of Postgres to the last write to
/// Redis): a sync that read Postgres just before a change must not write its older copy over
/// the newer one the changing API wrote — the processes would load it back (they read limits
/// from Redis) and queue jobs without the new limit until the next sync. In turn, the later
/// sync reads Postgres after the earlier one wrote, so the last write is the newest.
pub async fn sync_queue(
    pool: &PgPool,
    queue: &crate::queue::Queue,
) -> Result<(), crate::store::StoreError> {
    let unavailable =
        |e: crate::queue::QueueError| crate::store::StoreError::Unavailable(e.to_string());
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SYNC_LOCK)
        .execute(&mut *tx)
        .await?;
    let limits = crate::store::limits::all(&mut *tx).await?;
    let fields: Vec<String> = crate::store::limits::all_pauses(&mut *tx)
        .await?
        .iter()
        .flat_map(|p| p.paused.iter().map(|(t, _)| t.field(&p.namespace)))
        .collect();
    queue.sync_limits(&limits).await.map_err(unavailable)?;
    queue.sync_pauses(&fields).await.map_err(unavailable)?;
    tx.commit().await?;
    install(limits);
    Ok(())
}
