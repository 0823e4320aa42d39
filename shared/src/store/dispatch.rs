//! The dispatch outbox, read by the relay.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;
use crate::queue::DispatchEntry;

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
    let rows: Vec<(Uuid, String, String, i64, DateTime<Utc>)> = sqlx::query_as(
        "SELECT job_id, namespace, queue, score, enqueued_at FROM dispatch
         WHERE ($1::timestamptz IS NULL OR (enqueued_at, job_id) > ($1, $2)) AND enqueued_at <= $3
         ORDER BY enqueued_at, job_id LIMIT $4",
    )
    .bind(after_at)
    .bind(after_id)
    .bind(until)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(job_id, namespace, queue, score, enqueued_at)| DispatchEntry {
                job_id,
                namespace,
                queue,
                score,
                enqueued_at,
            },
        )
        .collect())
}
