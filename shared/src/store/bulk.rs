//! The `bulk_operations` projection (docs/flow-control.md "Bulk actions"), [`bulk_append`], and
//! the reads of a running operation: its pin in the log and the pages of jobs it acts on.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    events::LogCursor,
    jobs::{bind_filter, JobFilter, JobRow, FILTER_WHERE},
    Append, Effect, StoreError,
};
use crate::domain::{
    bulk::{BulkEvent, BulkOperation},
    event::EventMetadata,
    job::Job,
};

pub const UPSERT_BULK: &str = "
INSERT INTO bulk_operations SELECT * FROM jsonb_populate_recordset(NULL::bulk_operations, $1)
ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, matched = EXCLUDED.matched,
    done = EXCLUDED.done, skipped = EXCLUDED.skipped, cursor = EXCLUDED.cursor,
    error = EXCLUDED.error, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at,
    finished_at = EXCLUDED.finished_at";

/// The state after `events` and the append that records them (expecting `prev`'s version).
pub fn bulk_append(
    prev: Option<&BulkOperation>,
    id: Uuid,
    events: &[BulkEvent],
    metadata: EventMetadata,
    at: DateTime<Utc>,
) -> Option<(BulkOperation, Append)> {
    let mut state = prev.cloned();
    for e in events {
        state = Some(BulkOperation::apply(state, id, &metadata.namespace, e, at)?);
    }
    let new = state?;
    let append = Append::of(
        id,
        prev.map(|p| p.version),
        events,
        metadata,
        at,
        vec![Effect::UpsertBulk(Box::new(new.clone()))],
    );
    Some((new, append))
}

fn decode(v: Value) -> Result<BulkOperation, StoreError> {
    serde_json::from_value(v)
        .map_err(|e| StoreError::Internal(format!("bulk_operations row does not decode: {e}")))
}

/// An operation of `namespace` (`None`: any namespace), with the position of its `BulkStarted`
/// (its pin).
pub async fn get(
    pool: &PgPool,
    namespace: Option<&str>,
    id: Uuid,
) -> Result<Option<(BulkOperation, i64)>, StoreError> {
    let row: Option<(Value, i64)> = sqlx::query_as(
        "SELECT to_jsonb(o), e.position FROM bulk_operations o
           JOIN events e ON e.stream_id = o.id AND e.version = 1
          WHERE o.id = $1 AND ($2::text IS NULL OR o.namespace = $2)",
    )
    .bind(id)
    .bind(namespace)
    .fetch_optional(pool)
    .await?;
    row.map(|(v, p)| Ok((decode(v)?, p))).transpose()
}

/// Where a running operation is pinned, and who asked for it.
#[derive(Debug, Clone)]
pub struct Pin {
    /// `BulkStarted`'s place in the log: jobs whose `JobSubmitted` comes at or before it.
    pub cursor: LogCursor,
    /// The actor of `BulkStarted` (the key that asked), for the job events it writes.
    pub actor: Option<String>,
}

/// The oldest running operation whose `BulkStarted` every reader of the log can see (no
/// transaction that could still commit before it in the log is running): from then on the set of
/// jobs submitted before it is fixed.
pub async fn next_running(pool: &PgPool) -> Result<Option<(BulkOperation, Pin)>, StoreError> {
    let row: Option<(Value, String, i64, Option<String>)> = sqlx::query_as(
        "SELECT to_jsonb(o), e.tx_id::text, e.position, e.metadata->>'actor'
           FROM bulk_operations o
           JOIN events e ON e.stream_id = o.id AND e.version = 1
          WHERE o.status = 'running'
            AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
          ORDER BY o.created_at LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    row.map(|(v, tx, position, actor)| {
        Ok((
            decode(v)?,
            Pin {
                cursor: LogCursor {
                    tx_id: tx.parse().unwrap_or(0),
                    position,
                },
                actor,
            },
        ))
    })
    .transpose()
}

/// The pin condition: job `j` was submitted at or before `$14`/`$15` in the log.
const SUBMITTED_BEFORE: &str = "EXISTS (SELECT 1 FROM events s
     WHERE s.stream_id = j.id AND s.version = 1
       AND (s.tx_id, s.position) <= ($14::text::xid8, $15))";

/// The next page of jobs an operation acts on: matching `f` in `namespace`, submitted at or
/// before `pin`, with ids after `after`, in id order.
pub async fn page(
    pool: &PgPool,
    namespace: &str,
    f: &JobFilter,
    pin: LogCursor,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Job>, StoreError> {
    let sql = format!(
        "SELECT to_jsonb(j) FROM jobs j WHERE {FILTER_WHERE} AND {SUBMITTED_BEFORE}
           AND ($16::uuid IS NULL OR j.id > $16)
         ORDER BY j.id LIMIT $17"
    );
    let rows: Vec<JobRow> = bind_filter(sqlx::query_as(&sql), namespace, f)
        .bind(pin.tx_id.to_string())
        .bind(pin.position)
        .bind(after)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(|(j,)| j.0).collect())
}

/// How many jobs an operation matches when it begins (see [`page`]).
pub async fn count(
    pool: &PgPool,
    namespace: &str,
    f: &JobFilter,
    pin: LogCursor,
) -> Result<i64, StoreError> {
    let sql = format!("SELECT count(*) FROM jobs j WHERE {FILTER_WHERE} AND {SUBMITTED_BEFORE}");
    let (n,): (i64,) = bind_filter(sqlx::query_as(&sql), namespace, f)
        .bind(pin.tx_id.to_string())
        .bind(pin.position)
        .fetch_one(pool)
        .await?;
    Ok(n)
}
