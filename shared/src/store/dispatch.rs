//! The dispatch outbox, swept by the relay.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;
use crate::queue::DispatchEntry;

/// Queued jobs Redis may not hold: never confirmed by the relay and older than `grace_ms`
/// (the fast path usually pushed them), or confirmed more than `repush_s` ago (Redis may have
/// lost them since, or a worker popped them and died before starting). Marks them pushed.
pub async fn claim_for_push(
    pool: &PgPool,
    grace_ms: i64,
    repush_s: i64,
    limit: i64,
) -> Result<Vec<DispatchEntry>, StoreError> {
    let rows: Vec<(Uuid, String, String, i64, DateTime<Utc>)> = sqlx::query_as(
        "UPDATE dispatch d SET pushed_at = now()
         FROM (SELECT job_id FROM dispatch
               WHERE (pushed_at IS NULL AND enqueued_at < now() - make_interval(secs => $1::float8 / 1000))
                  OR pushed_at < now() - make_interval(secs => $2::float8)
               ORDER BY enqueued_at LIMIT $3 FOR UPDATE SKIP LOCKED) due
         WHERE d.job_id = due.job_id
         RETURNING d.job_id, d.namespace, d.queue, d.score, d.enqueued_at",
    )
    .bind(grace_ms)
    .bind(repush_s)
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

/// Forget every push confirmation (Redis lost its data): the relay pushes everything again.
pub async fn reset_pushed(pool: &PgPool) -> Result<u64, StoreError> {
    Ok(
        sqlx::query("UPDATE dispatch SET pushed_at = NULL WHERE pushed_at IS NOT NULL")
            .execute(pool)
            .await?
            .rows_affected(),
    )
}
