//! Reading events: one stream in order, and the whole log gap-safely.
//!
//! Within one stream, positions grow with versions (an append at version v+1 is decided only
//! after v committed, and the unique `(stream_id, version)` lets one of concurrent appends at a
//! version win), so `position > after` never skips an event of that stream.
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

/// Whether `stream_id` is a stream of `stream_type` in `namespace`. The `streams` row outlives
/// the projections (a job row pruned by `CAPIBARA_RETENTION`) and the stream's events (an
/// archived partition), so it answers who may read a history after both.
pub async fn stream_of(
    pool: &PgPool,
    namespace: &str,
    stream_type: &str,
    stream_id: Uuid,
) -> Result<bool, StoreError> {
    let row: Option<(i32,)> = sqlx::query_as(
        "SELECT 1 FROM streams WHERE stream_id = $1 AND namespace = $2 AND stream_type = $3",
    )
    .bind(stream_id)
    .bind(namespace)
    .bind(stream_type)
    .fetch_optional(pool)
    .await?;
    Ok(row.is_some())
}

/// Type of the last event of a stream.
pub async fn last_type(pool: &PgPool, stream_id: Uuid) -> Result<Option<String>, StoreError> {
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT type FROM events WHERE stream_id = $1 ORDER BY version DESC LIMIT 1",
    )
    .bind(stream_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(t,)| t))
}

/// A position in the global log: the transaction id and position of the last event read.
/// Ordered as the log is read: by transaction id, then position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
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
pub async fn read_all<'c>(
    db: impl sqlx::PgExecutor<'c>,
    cursor: LogCursor,
    limit: i64,
) -> Result<(Vec<EventEnvelope>, LogCursor), StoreError> {
    read_all_with(db, cursor, limit, true).await
}

/// [`read_all`] without the events' `data` (JSON `null` in its place): for a follower that needs
/// only which event happened to which stream (the deliverer reads the job's state itself), so
/// Postgres neither reads nor sends the payloads.
pub async fn read_all_headers<'c>(
    db: impl sqlx::PgExecutor<'c>,
    cursor: LogCursor,
    limit: i64,
) -> Result<(Vec<EventEnvelope>, LogCursor), StoreError> {
    read_all_with(db, cursor, limit, false).await
}

async fn read_all_with<'c>(
    db: impl sqlx::PgExecutor<'c>,
    cursor: LogCursor,
    limit: i64,
    with_data: bool,
) -> Result<(Vec<EventEnvelope>, LogCursor), StoreError> {
    let rows: Vec<LogRow> = sqlx::query_as(
        "SELECT tx_id::text, position, stream_type, stream_id, version, type,
                CASE WHEN $4 THEN data ELSE 'null'::jsonb END, metadata, recorded_at
         FROM events
         WHERE (tx_id, position) > ($1::text::xid8, $2)
           AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY events.tx_id, position LIMIT $3",
    )
    .bind(cursor.tx_id.to_string())
    .bind(cursor.position)
    .bind(limit)
    .bind(with_data)
    .fetch_all(db)
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

/// The cursor of the newest event a gap-safe read can return right now (the default cursor when
/// the log is empty). A follower that starts here and reads on with [`read_all`] sees every event
/// committed later, and none committed before.
pub async fn head(pool: &PgPool) -> Result<LogCursor, StoreError> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT tx_id::text, position FROM events
         WHERE tx_id < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY events.tx_id DESC, position DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    Ok(row
        .map(|(tx, position)| LogCursor {
            tx_id: tx.parse().unwrap_or(0),
            position,
        })
        .unwrap_or_default())
}

/// What a follower of the whole log read (see [`read_all_tail`]).
#[derive(Debug, Clone, Default)]
pub struct TailRead {
    /// Events after the cursor, each with its own cursor (the log's order is by
    /// `(tx_id, position)`, so positions alone do not say which events a cursor has passed).
    pub events: Vec<(LogCursor, EventEnvelope)>,
    /// Whether committed events wait behind a transaction still running (`tx_id` at or above
    /// the horizon): they become readable as soon as it ends, which may publish no hint.
    pub pending: bool,
}

/// [`read_all`] for a follower: each event with its cursor, and whether more is already
/// committed but not yet readable (same snapshot, one statement).
pub async fn read_all_tail(
    pool: &PgPool,
    cursor: LogCursor,
    limit: i64,
) -> Result<TailRead, StoreError> {
    type TailRow = (
        bool,
        Option<String>,
        Option<i64>,
        Option<String>,
        Option<Uuid>,
        Option<i64>,
        Option<String>,
        Option<Value>,
        Option<Value>,
        Option<DateTime<Utc>>,
    );
    let rows: Vec<TailRow> = sqlx::query_as(
        "(SELECT false, tx_id::text, position, stream_type, stream_id, version, type, data,
                 metadata, recorded_at
          FROM events
          WHERE (tx_id, position) > ($1::text::xid8, $2)
            AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
          ORDER BY events.tx_id, position LIMIT $3)
         UNION ALL
         SELECT true, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
         WHERE EXISTS (SELECT 1 FROM events
                       WHERE tx_id >= pg_snapshot_xmin(pg_current_snapshot()))",
    )
    .bind(cursor.tx_id.to_string())
    .bind(cursor.position)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let mut read = TailRead::default();
    for row in rows {
        match row {
            (true, ..) => read.pending = true,
            (
                false,
                Some(tx),
                Some(position),
                Some(st),
                Some(sid),
                Some(version),
                Some(t),
                Some(data),
                Some(meta),
                Some(at),
            ) => read
                .events
                .push(log_row((tx, position, st, sid, version, t, data, meta, at))),
            _ => {}
        }
    }
    read.events.sort_by_key(|(c, _)| *c);
    Ok(read)
}

fn log_row(
    (tx, position, st, sid, version, t, data, meta, at): LogRow,
) -> (LogCursor, EventEnvelope) {
    (
        LogCursor {
            tx_id: tx.parse().unwrap_or(0),
            position,
        },
        envelope((position, st, sid, version, t, data, meta, at)),
    )
}

/// Which events of the global log a reader wants; every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogFilter {
    /// `metadata.namespace`.
    pub namespace: Option<String>,
    /// Event types (any of them); empty = all.
    pub types: Vec<String>,
    pub stream_type: Option<String>,
    /// `metadata.kind` (job events carry their job's kind).
    pub kind: Option<String>,
    /// `metadata.tags` must hold each `key = value`.
    pub tags: Vec<(String, String)>,
    /// Only events whose metadata names a `correlation_id` (a workflow step's job events, a
    /// child run's: the orchestrator's reading).
    pub correlated: bool,
}

impl LogFilter {
    /// The same test as the SQL of [`read_all_filtered`], in memory (for live fan-out).
    pub fn matches(&self, e: &EventEnvelope) -> bool {
        let meta_str = |k: &str| e.metadata.get(k).and_then(Value::as_str);
        if let Some(ns) = &self.namespace {
            if meta_str("namespace") != Some(ns.as_str()) {
                return false;
            }
        }
        if !self.types.is_empty() && !self.types.contains(&e.event_type) {
            return false;
        }
        if let Some(st) = &self.stream_type {
            if *st != e.stream_type {
                return false;
            }
        }
        if self.correlated && meta_str("correlation_id").is_none() {
            return false;
        }
        if let Some(kind) = &self.kind {
            if meta_str("kind") != Some(kind.as_str()) {
                return false;
            }
        }
        if !self.tags.is_empty() {
            let tags = e.metadata.get("tags");
            for (k, v) in &self.tags {
                if tags.and_then(|t| t.get(k)).and_then(Value::as_str) != Some(v.as_str()) {
                    return false;
                }
            }
        }
        true
    }

    /// `[{"k": "v"}, …]` for `jsonb_build_array(metadata->'tags') @> $n` (an array, so the same
    /// key asked with two values matches nothing, as in [`LogFilter::matches`]).
    fn tags_json(&self) -> Option<Value> {
        (!self.tags.is_empty()).then(|| {
            Value::Array(
                self.tags
                    .iter()
                    .map(|(k, v)| {
                        let mut one = serde_json::Map::new();
                        one.insert(k.clone(), Value::String(v.clone()));
                        Value::Object(one)
                    })
                    .collect(),
            )
        })
    }
}

/// One page of a filtered read of the global log.
#[derive(Debug, Clone, Default)]
pub struct LogPage {
    /// The matching events, each with its own cursor, in log order.
    pub events: Vec<(LogCursor, EventEnvelope)>,
    /// Where to continue: past every event scanned, matching or not (so a reader of rare
    /// events does not rescan the same rows), but never past a matching event not returned.
    pub next: LogCursor,
    /// Whether the read reached the gap-safe horizon: nothing more is readable right now.
    pub at_end: bool,
}

/// Gap-safe read of the global log after `cursor`, keeping the events that pass `filter`: scans
/// at most `scan_limit` events and returns at most `limit` of them (see [`LogPage::next`]).
pub async fn read_all_filtered(
    pool: &PgPool,
    cursor: LogCursor,
    filter: &LogFilter,
    limit: i64,
    scan_limit: i64,
) -> Result<LogPage, StoreError> {
    type FilteredRow = (
        bool,
        String,
        i64,
        Option<String>,
        Option<Uuid>,
        Option<i64>,
        Option<String>,
        Option<Value>,
        Option<Value>,
        Option<DateTime<Utc>>,
        i64,
    );
    let limit = limit.max(1);
    let scan_limit = scan_limit.max(limit);
    // `scan` is the next stretch of the log; `hits` the matching events in it; the last row
    // (hit = false) is the last scanned event's cursor and how many were scanned.
    let rows: Vec<FilteredRow> = sqlx::query_as(
        "WITH scan AS MATERIALIZED (
             SELECT tx_id, position, stream_type, stream_id, version, type, data, metadata, recorded_at
             FROM events
             WHERE (tx_id, position) > ($1::text::xid8, $2)
               AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
             ORDER BY tx_id, position LIMIT $3
         ), hits AS (
             SELECT * FROM scan
             WHERE ($5::text IS NULL OR metadata->>'namespace' = $5)
               AND (cardinality($6::text[]) = 0 OR type = ANY($6::text[]))
               AND ($7::text IS NULL OR stream_type = $7)
               AND ($8::text IS NULL OR metadata->>'kind' = $8)
               AND ($9::jsonb IS NULL OR jsonb_build_array(metadata->'tags') @> $9::jsonb)
               AND (NOT $10 OR metadata->>'correlation_id' IS NOT NULL)
             ORDER BY tx_id, position LIMIT $4
         ), last AS (
             SELECT tx_id, position, (SELECT count(*) FROM scan) AS scanned
             FROM scan ORDER BY tx_id DESC, position DESC LIMIT 1
         )
         (SELECT true, tx_id::text, position, stream_type, stream_id, version, type, data, metadata,
                recorded_at, 0::bigint
         FROM hits ORDER BY hits.tx_id, hits.position)
         UNION ALL
         SELECT false, tx_id::text, position, NULL, NULL, NULL, NULL, NULL, NULL, NULL, scanned
         FROM last",
    )
    .bind(cursor.tx_id.to_string())
    .bind(cursor.position)
    .bind(scan_limit)
    .bind(limit)
    .bind(&filter.namespace)
    .bind(&filter.types)
    .bind(&filter.stream_type)
    .bind(&filter.kind)
    .bind(filter.tags_json())
    .bind(filter.correlated)
    .fetch_all(pool)
    .await?;
    let mut events = Vec::new();
    let mut last_scanned = None;
    let mut scanned = 0;
    for (hit, tx, position, st, sid, version, t, data, meta, at, n) in rows {
        let c = LogCursor {
            tx_id: tx.parse().unwrap_or(0),
            position,
        };
        if !hit {
            last_scanned = Some(c);
            scanned = n;
            continue;
        }
        if let (Some(st), Some(sid), Some(version), Some(t), Some(data), Some(meta), Some(at)) =
            (st, sid, version, t, data, meta, at)
        {
            events.push((c, envelope((position, st, sid, version, t, data, meta, at))));
        }
    }
    events.sort_by_key(|(c, _)| *c);
    let full = events.len() as i64 >= limit;
    let next = if full {
        // More matches may follow in the scanned stretch: continue after the last one returned.
        events.last().map(|(c, _)| *c).unwrap_or(cursor)
    } else {
        last_scanned.unwrap_or(cursor)
    };
    Ok(LogPage {
        events,
        next,
        at_end: !full && scanned < scan_limit,
    })
}
