//! Reading events: one stream in order, and the whole log gap-safely.
//!
//! Within one stream, positions grow with versions (appends to a stream are serialized by its
//! `streams` row lock), so `position > after` never skips an event of that stream.
//!
//! The global log is different: positions are taken from a sequence before commit, so a
//! transaction can commit a lower position after a reader already passed it. [`read_all`] only
//! returns events of transactions older than every transaction still in flight
//! (`tx_id < pg_snapshot_xmin(pg_current_snapshot())`) and orders by `(tx_id, position)`, so once
//! a cursor passes an event, nothing can later appear before it. See docs/event-store.md.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;
use crate::domain::event::EventEnvelope;

type Row = (i64, String, Uuid, i64, String, Value, Value, DateTime<Utc>);
/// A row of the global read: the transaction id (as text) and the event.
type LogRow = (
    String,
    i64,
    String,
    Uuid,
    i64,
    String,
    Value,
    Value,
    DateTime<Utc>,
);

fn envelope(
    (position, stream_type, stream_id, version, event_type, data, metadata, recorded_at): Row,
) -> EventEnvelope {
    EventEnvelope {
        id: position.to_string(),
        stream_type,
        stream_id,
        version,
        event_type,
        data,
        metadata,
        recorded_at,
    }
}

/// Events of one stream after global position `after` (0 = from the start), in order.
pub async fn read_stream(
    pool: &PgPool,
    stream_id: Uuid,
    after: i64,
    limit: i64,
) -> Result<Vec<EventEnvelope>, StoreError> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT position, stream_type, stream_id, version, type, data, metadata, recorded_at
         FROM events WHERE stream_id = $1 AND position > $2 ORDER BY version LIMIT $3",
    )
    .bind(stream_id)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(envelope).collect())
}

/// A position in the global log: the transaction id and position of the last event read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogCursor {
    pub tx_id: u64,
    pub position: i64,
}

impl LogCursor {
    /// The cursor just after the event at `position` (looks its transaction up).
    pub async fn after_position(pool: &PgPool, position: i64) -> Result<LogCursor, StoreError> {
        if position <= 0 {
            return Ok(LogCursor::default());
        }
        let tx: Option<(String,)> =
            sqlx::query_as("SELECT tx_id::text FROM events WHERE position = $1")
                .bind(position)
                .fetch_optional(pool)
                .await?;
        let tx_id = match tx {
            Some((t,)) => t.parse().unwrap_or(0),
            None => return Err(StoreError::NotFound),
        };
        Ok(LogCursor { tx_id, position })
    }
}

/// Events of the whole log after `cursor`, gap-safe (see the module docs). Returns the events and
/// the cursor to continue from.
pub async fn read_all(
    pool: &PgPool,
    cursor: LogCursor,
    limit: i64,
) -> Result<(Vec<EventEnvelope>, LogCursor), StoreError> {
    let rows: Vec<LogRow> = sqlx::query_as(
        "SELECT tx_id::text, position, stream_type, stream_id, version, type, data, metadata, recorded_at
         FROM events
         WHERE (tx_id, position) > ($1::text::xid8, $2)
           AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY tx_id, position LIMIT $3",
    )
    .bind(cursor.tx_id.to_string())
    .bind(cursor.position)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let mut next = cursor;
    let events = rows
        .into_iter()
        .map(|(tx, position, st, sid, version, t, data, meta, at)| {
            next = LogCursor {
                tx_id: tx.parse().unwrap_or(next.tx_id),
                position,
            };
            envelope((position, st, sid, version, t, data, meta, at))
        })
        .collect();
    Ok((events, next))
}
