//! The bounded event log (docs/event-log-retention.md): time partitions of `events` created
//! ahead, old partitions whose streams are all finished archived to the artifact store (gzip
//! JSONL, one object per partition and namespace) and dropped, and reads of archived streams.
//!
//! An archive run holds a session advisory lock, so one replica archives at a time; each step
//! is recorded (`event_partitions.status`, `event_archives`), and objects have fixed keys, so a
//! run that dies anywhere is finished by the next one without duplicates. A partition is dropped
//! only after every object was read back and its line count matched the partition's rows.

use std::io::{BufRead, Write};

use chrono::{DateTime, Utc};
use flate2::{read::GzDecoder, write::GzEncoder, Compression};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;
use crate::{
    artifacts::{ArtifactError, ArtifactStore},
    config::EventLogConfig,
    domain::event::EventEnvelope,
};

/// The advisory lock an archive run holds (one archiver among replicas).
pub const ARCHIVE_LOCK: i64 = 7_300_000_000_000_000_002;

/// Last events after which a stream takes no more appends: a partition is archived only when
/// every stream in it ended with one of these. Long-lived streams (schedules, triggers,
/// workflows, connectors, …) end only when deleted.
pub const FINISHED: &[&str] = &[
    "JobSucceeded",
    "JobFailed",
    "JobCanceled",
    "JobDeleted",
    "RunSucceeded",
    "RunFailed",
    "RunCanceled",
    "DeliverySucceeded",
    "DeliveryFailed",
    "BulkFinished",
    "BulkFailed",
    "ScheduleDeleted",
    "TriggerDeleted",
    "WorkflowDeleted",
    "ConnectorDeleted",
    "KindDeleted",
    "ModelDeleted",
    "LimitDeleted",
    "LlmProviderDeleted",
];

/// Rows buffered (compressed) before a part goes to the store.
const PART_BYTES: usize = 8 * 1024 * 1024;

/// Why an archive step failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("artifact store: {0}")]
    Artifacts(#[from] ArtifactError),
    /// An object read back does not hold what the partition holds (nothing is dropped).
    #[error("archive of {partition} does not verify: {reason}")]
    Verify { partition: String, reason: String },
    #[error("archived events do not decode: {0}")]
    Decode(String),
}

impl From<sqlx::Error> for ArchiveError {
    fn from(e: sqlx::Error) -> Self {
        ArchiveError::Store(e.into())
    }
}

/// Where an archive run stops early (tests of a run that dies midway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halt {
    Never,
    /// After the objects of the first partition are written and recorded, before the drop.
    AfterObjects,
}

/// What an archive run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArchiveReport {
    /// Partitions archived and dropped.
    pub partitions: u64,
    pub events: u64,
    pub objects: u64,
    /// Old partitions kept because a stream in them is not finished.
    pub blocked: u64,
    /// Another replica was archiving: this run did nothing.
    pub busy: bool,
}

/// One archived event: a line of an archive object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArchivedEvent {
    pub position: i64,
    pub tx_id: String,
    pub stream_type: String,
    pub stream_id: Uuid,
    pub version: i64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: Value,
    pub metadata: Value,
    pub recorded_at: DateTime<Utc>,
}

impl ArchivedEvent {
    pub fn envelope(self) -> EventEnvelope {
        EventEnvelope {
            id: self.position.to_string(),
            stream_type: self.stream_type,
            stream_id: self.stream_id,
            version: self.version,
            event_type: self.event_type,
            data: self.data,
            metadata: self.metadata,
            recorded_at: self.recorded_at,
        }
    }
}

type EventRow = (
    i64,
    String,
    String,
    Uuid,
    i64,
    String,
    Value,
    Value,
    DateTime<Utc>,
);

/// The artifact-store key of chunk `seq` of a partition's archive for `namespace`.
pub fn object_key(namespace: &str, partition: &str, seq: i32) -> String {
    format!("events/{namespace}/{partition}/{seq:05}.jsonl.gz")
}

/// Create the partitions that cover creation times up to two periods ahead (idempotent; the
/// scheduler calls it every archive interval). Returns how many it created.
pub async fn ensure_partitions(pool: &PgPool, cfg: &EventLogConfig) -> Result<i32, StoreError> {
    let secs = cfg.partition.as_secs_f64();
    let (n,): (i32,) = sqlx::query_as(
        "SELECT capibara_events_ensure_partitions(make_interval(secs => $1),
                                                  make_interval(secs => $2))",
    )
    .bind(secs)
    .bind(secs * 2.0)
    .fetch_one(pool)
    .await?;
    Ok(n)
}

/// Archive and drop every partition whose period ended more than `retention` ago and whose
/// streams are all finished. Returns at once (`busy`) when another run holds the lock.
pub async fn archive_old(
    pool: &PgPool,
    store: &ArtifactStore,
    retention: std::time::Duration,
    halt: Halt,
) -> Result<ArchiveReport, ArchiveError> {
    let mut report = ArchiveReport::default();
    let mut lock = pool.acquire().await?;
    let (got,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
        .bind(ARCHIVE_LOCK)
        .fetch_one(&mut *lock)
        .await?;
    if !got {
        report.busy = true;
        return Ok(report);
    }
    // The connection is closed after, not put back in the pool: if the unlock below never runs
    // (this future dropped) or fails, the session lock goes with the connection instead of
    // staying held by a pooled one, which would keep every later pass `busy`.
    lock.close_on_drop();
    let result = archive_locked(pool, store, retention, halt, &mut report).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(ARCHIVE_LOCK)
        .execute(&mut *lock)
        .await;
    metrics::counter!("capibara_event_archive_runs_total").increment(1);
    match result {
        Ok(()) => Ok(report),
        Err(e) => {
            metrics::counter!("capibara_event_archive_errors_total").increment(1);
            Err(e)
        }
    }
}

async fn archive_locked(
    pool: &PgPool,
    store: &ArtifactStore,
    retention: std::time::Duration,
    halt: Halt,
    report: &mut ArchiveReport,
) -> Result<(), ArchiveError> {
    let due: Vec<(String,)> = sqlx::query_as(
        "SELECT name FROM event_partitions
          WHERE status IN ('active', 'archiving')
            AND hi_at < now() - make_interval(secs => $1)
          ORDER BY lo",
    )
    .bind(retention.as_secs_f64())
    .fetch_all(pool)
    .await?;
    for (partition,) in due {
        let (open,): (i64,) = sqlx::query_as(&format!(
            // Descending on both: a backward scan of the (stream_id, version) index, no sort.
            "SELECT count(*) FROM (SELECT DISTINCT ON (stream_id) type FROM {}
                                   ORDER BY stream_id DESC, version DESC) last
              WHERE type <> ALL($1)",
            quote(&partition)
        ))
        .bind(FINISHED)
        .fetch_one(pool)
        .await?;
        if open > 0 {
            report.blocked += 1;
            tracing::info!(%partition, open, "event partition kept: streams not finished");
            continue;
        }
        let events = archive_partition(pool, store, &partition, report).await?;
        if halt == Halt::AfterObjects && events > 0 {
            return Ok(());
        }
        drop_partition(pool, &partition, events).await?;
        report.partitions += 1;
        report.events += events as u64;
        metrics::counter!("capibara_events_archived_total").increment(events as u64);
    }
    Ok(())
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Write, record and verify the objects of `partition`; returns its event count.
async fn archive_partition(
    pool: &PgPool,
    store: &ArtifactStore,
    partition: &str,
    report: &mut ArchiveReport,
) -> Result<i64, ArchiveError> {
    sqlx::query("UPDATE event_partitions SET status = 'archiving' WHERE name = $1")
        .bind(partition)
        .execute(pool)
        .await?;
    let part = quote(partition);
    let namespaces: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT coalesce(metadata->>'namespace', '_'), count(*) FROM {part} GROUP BY 1 ORDER BY 1"
    ))
    .fetch_all(pool)
    .await?;
    // An interrupted run's records are rewritten (its objects are overwritten: same keys).
    sqlx::query("DELETE FROM event_archives WHERE partition = $1")
        .bind(partition)
        .execute(pool)
        .await?;
    let mut total = 0i64;
    for (namespace, count) in namespaces {
        let written = archive_namespace(pool, store, partition, &namespace, report).await?;
        if written != count {
            return Err(ArchiveError::Verify {
                partition: partition.to_string(),
                reason: format!("namespace {namespace}: {count} rows, {written} archived"),
            });
        }
        total += count;
    }
    Ok(total)
}

/// One chunk being written: whole streams, up to about [`CHUNK_EVENTS`] events.
struct Chunk {
    seq: i32,
    key: String,
    writer: crate::artifacts::ArtifactWriter,
    gz: GzEncoder<Vec<u8>>,
    events: i64,
    min_stream: Uuid,
    max_stream: Uuid,
    min_position: i64,
    max_position: i64,
}

/// Events per archive object, cut at a stream boundary: bounds the memory and time of a read.
pub const CHUNK_EVENTS: i64 = 200_000;

async fn archive_namespace(
    pool: &PgPool,
    store: &ArtifactStore,
    partition: &str,
    namespace: &str,
    report: &mut ArchiveReport,
) -> Result<i64, ArchiveError> {
    let sql = format!(
        "SELECT position, tx_id::text, stream_type, stream_id, version, type, data, metadata,
                recorded_at
           FROM {} WHERE coalesce(metadata->>'namespace', '_') = $1
          ORDER BY stream_id, version",
        quote(partition)
    );
    let mut conn = pool.acquire().await?;
    let mut rows = sqlx::query_as::<_, EventRow>(&sql)
        .bind(namespace)
        .fetch(&mut *conn);
    let mut chunk: Option<Chunk> = None;
    let mut seq = 0;
    let mut written = 0i64;
    while let Some(row) = rows.try_next().await? {
        let (position, tx_id, stream_type, stream_id, version, event_type, data, metadata, at) =
            row;
        let full = chunk
            .as_ref()
            .is_some_and(|c| c.events >= CHUNK_EVENTS && c.max_stream != stream_id);
        if full {
            let done = chunk.take().expect("a chunk");
            finish_chunk(pool, store, partition, namespace, done).await?;
            report.objects += 1;
        }
        let c = match chunk.as_mut() {
            Some(c) => c,
            None => {
                seq += 1;
                let key = object_key(namespace, partition, seq);
                let writer = store.object_writer(&key, "application/gzip").await?;
                chunk.insert(Chunk {
                    seq,
                    key,
                    writer,
                    gz: GzEncoder::new(Vec::new(), Compression::fast()),
                    events: 0,
                    min_stream: stream_id,
                    max_stream: stream_id,
                    min_position: position,
                    max_position: position,
                })
            }
        };
        let line = ArchivedEvent {
            position,
            tx_id,
            stream_type,
            stream_id,
            version,
            event_type,
            data,
            metadata,
            recorded_at: at,
        };
        serde_json::to_writer(&mut c.gz, &line).map_err(|e| ArchiveError::Decode(e.to_string()))?;
        c.gz.write_all(b"\n")
            .map_err(|e| ArchiveError::Decode(e.to_string()))?;
        c.events += 1;
        c.max_stream = stream_id;
        c.min_position = c.min_position.min(position);
        c.max_position = c.max_position.max(position);
        written += 1;
        if c.gz.get_ref().len() >= PART_BYTES {
            let part = std::mem::take(c.gz.get_mut());
            c.writer.write(&part).await?;
        }
    }
    drop(rows);
    if let Some(done) = chunk {
        finish_chunk(pool, store, partition, namespace, done).await?;
        report.objects += 1;
    }
    Ok(written)
}

/// Store a chunk, read it back, count its lines, and record it.
async fn finish_chunk(
    pool: &PgPool,
    store: &ArtifactStore,
    partition: &str,
    namespace: &str,
    mut c: Chunk,
) -> Result<(), ArchiveError> {
    let rest =
        c.gz.finish()
            .map_err(|e| ArchiveError::Decode(e.to_string()))?;
    c.writer.write(&rest).await?;
    let bytes = c.writer.size() as i64;
    c.writer.finish().await?;
    let stored = count_lines(store, &c.key).await?;
    if stored != c.events {
        return Err(ArchiveError::Verify {
            partition: partition.to_string(),
            reason: format!("{}: {} events written, {stored} read back", c.key, c.events),
        });
    }
    sqlx::query(
        "INSERT INTO event_archives (partition, namespace, seq, object_key, events, min_stream,
                                     max_stream, min_position, max_position, bytes)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(partition)
    .bind(namespace)
    .bind(c.seq)
    .bind(&c.key)
    .bind(c.events)
    .bind(c.min_stream)
    .bind(c.max_stream)
    .bind(c.min_position)
    .bind(c.max_position)
    .bind(bytes)
    .execute(pool)
    .await?;
    Ok(())
}

/// Lines of a stored archive object (decompressed, not parsed).
async fn count_lines(store: &ArtifactStore, key: &str) -> Result<i64, ArchiveError> {
    let bytes = store.get_object(key).await?;
    let mut reader = GzDecoder::new(&bytes[..]);
    let mut buf = vec![0u8; 64 * 1024];
    let mut lines = 0i64;
    loop {
        let n = std::io::Read::read(&mut reader, &mut buf)
            .map_err(|e| ArchiveError::Decode(format!("{key}: {e}")))?;
        if n == 0 {
            return Ok(lines);
        }
        lines += buf[..n].iter().filter(|b| **b == b'\n').count() as i64;
    }
}

/// Detach and drop `partition` once its archive records add up to its rows.
async fn drop_partition(pool: &PgPool, partition: &str, events: i64) -> Result<(), ArchiveError> {
    let mut tx = pool.begin().await?;
    let part = quote(partition);
    let (rows,): (i64,) = sqlx::query_as(&format!("SELECT count(*) FROM {part}"))
        .fetch_one(&mut *tx)
        .await?;
    let (recorded,): (Option<i64>,) =
        sqlx::query_as("SELECT sum(events)::bigint FROM event_archives WHERE partition = $1")
            .bind(partition)
            .fetch_one(&mut *tx)
            .await?;
    if rows != events || recorded.unwrap_or(0) != rows {
        return Err(ArchiveError::Verify {
            partition: partition.to_string(),
            reason: format!(
                "{rows} rows, {events} archived, {} recorded",
                recorded.unwrap_or(0)
            ),
        });
    }
    sqlx::query(&format!("ALTER TABLE events DETACH PARTITION {part}"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("DROP TABLE {part}"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE event_partitions SET status = 'archived', events = $2, archived_at = now()
          WHERE name = $1",
    )
    .bind(partition)
    .bind(events)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The events of an archive object, in (stream, version) order.
pub async fn read_object(
    store: &ArtifactStore,
    key: &str,
) -> Result<Vec<ArchivedEvent>, ArchiveError> {
    let bytes = store.get_object(key).await?;
    let reader = std::io::BufReader::new(GzDecoder::new(&bytes[..]));
    let mut out = Vec::new();
    for line in reader.lines() {
        let line = line.map_err(|e| ArchiveError::Decode(format!("{key}: {e}")))?;
        if line.is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line).map_err(|e| ArchiveError::Decode(format!("{key}: {e}")))?,
        );
    }
    Ok(out)
}

/// Events of an archived stream of `namespace` after position `after`, like
/// [`super::events::read_stream`]; `None` when the stream is not in an archived partition.
pub async fn read_archived_stream(
    pool: &PgPool,
    store: &ArtifactStore,
    namespace: &str,
    stream_id: Uuid,
    after: i64,
    limit: i64,
) -> Result<Option<Vec<EventEnvelope>>, ArchiveError> {
    let key: Option<(String,)> = sqlx::query_as(
        "SELECT a.object_key FROM event_partitions p
           JOIN event_archives a ON a.partition = p.name AND a.namespace = $2
          WHERE p.status = 'archived' AND p.lo <= $1 AND $1 < p.hi
            AND a.min_stream <= $1 AND $1 <= a.max_stream",
    )
    .bind(stream_id)
    .bind(namespace)
    .fetch_optional(pool)
    .await?;
    let Some((key,)) = key else {
        return Ok(None);
    };
    let events = read_object(store, &key).await?;
    Ok(Some(
        events
            .into_iter()
            .filter(|e| e.stream_id == stream_id && e.position > after)
            .take(limit.max(0) as usize)
            .map(ArchivedEvent::envelope)
            .collect(),
    ))
}

/// Every archive object's key, oldest partition first.
pub async fn archive_keys(pool: &PgPool) -> Result<Vec<String>, StoreError> {
    let keys: Vec<(String,)> = sqlx::query_as(
        "SELECT a.object_key FROM event_archives a
           JOIN event_partitions p ON p.name = a.partition AND p.status = 'archived'
          ORDER BY p.lo, a.namespace, a.seq",
    )
    .fetch_all(pool)
    .await?;
    Ok(keys.into_iter().map(|(k,)| k).collect())
}

/// Whether any partition was archived (a rebuild then needs the artifact store).
pub async fn any_archived(pool: &PgPool) -> Result<bool, StoreError> {
    let (n,): (bool,) =
        sqlx::query_as("SELECT EXISTS (SELECT 1 FROM event_partitions WHERE status = 'archived')")
            .fetch_one(pool)
            .await?;
    Ok(n)
}
