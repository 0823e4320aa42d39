//! The dispatch outbox: a row per job that waits for a worker, written in the transaction that
//! queues it ([`crate::domain::job::Follow::Dispatch`]) and deleted in the one that takes it off
//! ([`crate::domain::job::Follow::Undispatch`]). After the commit the appender hands new rows to
//! the queue (the fast path); the relay sweeps the outbox for what Redis does not hold.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;
use crate::domain::job::Priority;

/// A queued job: an outbox row, and the member the queue (Redis) holds for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DispatchEntry {
    pub job_id: Uuid,
    pub namespace: String,
    pub queue: String,
    pub score: i64,
    pub enqueued_at: DateTime<Utc>,
    /// The dispatch group it waits in ([`crate::domain::limit::Group`], as its id); empty for
    /// rows written before groups existed (the queue then groups by namespace and queue).
    #[serde(rename = "grp")]
    pub group: String,
    /// The job as this entry's commit wrote it (JSON), pushed to Redis with the entry for the
    /// worker that pops it ([`carried`]); not part of the outbox row.
    #[serde(skip)]
    pub carried: Option<Arc<str>>,
}

/// The most bytes of a job's JSON that ride with its dispatch entry ([`carried`]).
pub const CARRY_MAX_BYTES: usize = 4096;

/// How long Redis keeps a carried copy that no pop took (a job that waits longer is loaded
/// from Postgres, as any other).
pub const CARRY_TTL_MS: u64 = 60_000;

/// The copy of `job` to carry with its dispatch entry, or None when its JSON is larger than
/// [`CARRY_MAX_BYTES`] (Redis holds a bounded copy or none).
///
/// A worker that pops the entry starts from the copy instead of reading the job from Postgres,
/// but nothing it records stands on the copy unchecked: its first append (the claim, or an
/// attempt's outcome with its `JobStarted`) expects the copy's version, and a job's version
/// changes with every write of its row, so an append that commits proves the copy was the job
/// as it stands. One that conflicts discards what the attempt did and puts the job back on the
/// queue as it stands (docs/write-path.md, "The job rides with its pop").
pub fn carried(job: &crate::domain::job::Job) -> Option<Arc<str>> {
    let json = serde_json::to_string(job).ok()?;
    (json.len() <= CARRY_MAX_BYTES).then(|| Arc::from(json))
}

/// What a job held in the queue while it ran, given back after the commit that ended its
/// attempt (or, for an ordering key, ended the job).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Release {
    pub job_id: Uuid,
    pub lane: String,
    pub group: String,
    /// The job ended: its ordering key goes to the next job.
    pub terminal: bool,
    /// A rate-limited attempt asked its limits to wait until then (ms since the epoch).
    pub backoff_until_ms: Option<i64>,
}

impl DispatchEntry {
    /// The entry of a queued `job`, queued since `since`, on its lane
    /// ([`crate::domain::kinds::lane`]: its queue, or for a user kind the queue's lane of
    /// that kind).
    pub fn of(job: &crate::domain::job::Job, since: DateTime<Utc>) -> Self {
        let lane = crate::domain::kinds::lane(&job.queue, &job.namespace, &job.kind);
        // Jobs of an ordering key keep their place across retries: by submission, not by
        // when they were queued again.
        let since = if job.ordering_key.is_some() {
            job.created_at
        } else {
            since
        };
        let mut e = Self::new(job.id, &job.namespace, &lane, job.priority, since);
        e.group = crate::flow::group_of(job).id();
        e.carried = carried(job);
        e
    }

    pub fn new(
        job_id: Uuid,
        namespace: &str,
        queue: &str,
        priority: Priority,
        enqueued_at: DateTime<Utc>,
    ) -> Self {
        Self {
            job_id,
            namespace: namespace.to_string(),
            queue: queue.to_string(),
            score: enqueued_at.timestamp_millis() - priority.head_start_ms(),
            enqueued_at,
            group: String::new(),
            carried: None,
        }
    }
}

/// Insert (or move) outbox rows: `$1` is a JSON array of [`DispatchEntry`]. Part of the one
/// statement that writes a batch ([`super::batch`]); taking rows off is a delete by job id.
pub(super) const PUT: &str =
    "INSERT INTO dispatch (job_id, namespace, queue, score, enqueued_at, grp)
    SELECT job_id, namespace, queue, score, enqueued_at, grp FROM jsonb_to_recordset($1)
        AS d(job_id uuid, namespace text, queue text, score bigint, enqueued_at timestamptz,
             grp text)
    ON CONFLICT (job_id) DO UPDATE SET queue = EXCLUDED.queue, score = EXCLUDED.score,
        enqueued_at = EXCLUDED.enqueued_at, grp = EXCLUDED.grp";

/// Where a relay pass stands: the last row seen, in `(enqueued_at, job_id)` order.
pub type DispatchCursor = (DateTime<Utc>, Uuid);

/// Queued jobs enqueued after `after` and no later than `until`, oldest first.
pub async fn page(
    pool: &PgPool,
    after: Option<DispatchCursor>,
    until: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<DispatchEntry>, StoreError> {
    let (after_at, after_id) = (after.map(|a| a.0), after.map(|a| a.1).unwrap_or_default());
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT job_id, namespace, queue, score, enqueued_at, grp FROM dispatch
         WHERE ($1::timestamptz IS NULL OR (enqueued_at, job_id) > ($1, $2)) AND enqueued_at <= $3
         ORDER BY enqueued_at, job_id LIMIT $4",
    )
    .bind(after_at)
    .bind(after_id)
    .bind(until)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(entry).collect())
}

/// An outbox row as read: job id, namespace, queue, score, enqueued at, group.
type Row = (Uuid, String, String, i64, DateTime<Utc>, String);

fn entry((job_id, namespace, queue, score, enqueued_at, group): Row) -> DispatchEntry {
    DispatchEntry {
        job_id,
        namespace,
        queue,
        score,
        enqueued_at,
        group,
        carried: None,
    }
}

/// The outbox rows of `ids` that are still queued (to hand a popped job back to the queue).
pub async fn of_jobs(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<DispatchEntry>, StoreError> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT job_id, namespace, queue, score, enqueued_at, grp FROM dispatch WHERE job_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(entry).collect())
}

/// Why [`put_back`] put nothing back.
#[derive(Debug, thiserror::Error)]
pub enum PutBackError {
    #[error("reading the outbox: {0}")]
    Read(#[from] StoreError),
    #[error("pushing to the queue: {0}")]
    Push(#[from] crate::queue::QueueError),
}

/// Push the outbox entries of `ids` to the queue again: those of jobs still waiting for a
/// worker (a job taken off since has no entry). For jobs popped and not run (a worker gone, a
/// carried copy that was not the job); best effort, as the relay re-pushes what Redis lacks.
pub async fn put_back(
    pool: &PgPool,
    queue: &crate::queue::Queue,
    ids: &[Uuid],
) -> Result<(), PutBackError> {
    let entries = of_jobs(pool, ids).await?;
    queue.push(&entries).await?;
    Ok(())
}
