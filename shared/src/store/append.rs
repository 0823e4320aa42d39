//! Group-committed appends.
//!
//! Callers hand an [`Append`] to the [`Appender`] and await its result. A few flusher tasks take
//! everything that queued up while the previous flush ran and write it in one transaction:
//! lock the touched streams in id order, check each append's expected version in arrival order,
//! then one multi-row statement each for commands, streams, events and every side effect. A
//! conflicting append fails alone; the rest of the batch commits.
//!
//! An append whose own values Postgres refuses for good (a NUL character, a time out of range:
//! [`crate::domain::storable`]) fails alone too: the obvious ones are refused before they join
//! a batch, and a statement that fails for such a value splits the batch in halves until the
//! culprit is alone (docs/event-store.md, "Poison appends"). Only errors of the connection or
//! the server fail a whole batch.
//!
//! After commit, a [`CommitListener`] (the queue) is told of the new dispatch entries (it pushes
//! them to Redis: the fast path; the relay sweeps what this misses) and of the changed stream ids
//! (hints for waiters and SSE readers).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{mpsc, oneshot, Mutex};
use uuid::Uuid;

use super::{dispatch::DispatchEntry, lease::Lease, StoreError};
use crate::domain::{
    event::{DomainEvent, EventMetadata, StreamType},
    job::Job,
    storable, FieldError,
};

/// Told of every commit: the jobs it made ready to run and the streams it changed. The queue
/// (Redis) listens, for the fast-path dispatch and for stream hints; the store does not know it.
pub trait CommitListener: Send + Sync + 'static {
    fn committed<'a>(
        &'a self,
        dispatched: &'a [DispatchEntry],
        streams: &'a [Uuid],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;
}

/// What a stream's version must be for an append to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// The stream must not exist yet.
    NoStream,
    /// The stream must be at exactly this version.
    Version(i64),
}

/// One event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_type: String,
    pub data: Value,
    /// When it happened, if earlier than the append (default: the append's `recorded_at`).
    pub recorded_at: Option<DateTime<Utc>>,
}

/// A command to record with the append (for `Idempotency-Key` replays).
#[derive(Debug, Clone, Serialize)]
pub struct CommandRecord {
    pub id: Uuid,
    pub namespace: String,
    #[serde(rename = "type")]
    pub command_type: String,
    pub idempotency_key: Option<String>,
    pub request_hash: String,
    pub status_code: i32,
    pub response: Option<Value>,
    pub stream_id: Option<Uuid>,
    pub actor: Option<String>,
    pub received_at: DateTime<Utc>,
}

/// Rows written in the same transaction as the events.
#[derive(Debug, Clone)]
pub enum Effect {
    UpsertJob(Box<Job>),
    Dispatch(DispatchEntry),
    Undispatch(Uuid),
    Lease(Lease),
    ReleaseLease(Uuid),
    UpsertDelivery(Box<crate::domain::delivery::Delivery>),
    UpsertSchedule(Box<crate::domain::schedule::Schedule>),
    UpsertTrigger(Box<crate::domain::trigger::Trigger>),
    UpsertWorkflow(Box<crate::domain::workflow::Workflow>),
    UpsertRun(Box<crate::domain::run::Run>),
    UpsertUserKind(Box<crate::domain::kinds::user::UserKind>),
    /// Fired ticks: `(schedule_id, fire_time)` is unique, so a tick fires once across replicas.
    InsertTicks {
        schedule_id: Uuid,
        ticks: Vec<(DateTime<Utc>, Option<Uuid>)>,
    },
    /// Store (`Some`) or remove (`None`) a trigger's credential: kept beside the log, never in it.
    TriggerCredential {
        trigger_id: Uuid,
        namespace: String,
        credential: Option<crate::domain::trigger::TriggerCredential>,
    },
    /// A hook's Standard Webhooks message id, committed with the job or run the call started so
    /// a failed start leaves no receipt behind. A second receipt of the same id violates the
    /// primary key: use it with [`Appender::append_all`], which reports that as a conflict.
    Receipt {
        trigger_id: Uuid,
        message_id: String,
    },
    /// Move a log follower's checkpoint in the same transaction as what it produced.
    Checkpoint {
        name: String,
        cursor: super::events::LogCursor,
    },
}

/// Events for one stream, with everything that must commit with them.
#[derive(Debug, Clone)]
pub struct Append {
    pub stream_id: Uuid,
    pub stream_type: StreamType,
    pub namespace: String,
    pub expected: Expected,
    pub events: Vec<NewEvent>,
    pub metadata: EventMetadata,
    pub recorded_at: DateTime<Utc>,
    pub command: Option<CommandRecord>,
    pub effects: Vec<Effect>,
}

impl Append {
    /// Events for a stream at `prev_version` (`None`: a new stream), all recorded at `at`.
    pub fn of<E: DomainEvent>(
        stream_id: Uuid,
        prev_version: Option<i64>,
        events: &[E],
        metadata: EventMetadata,
        at: DateTime<Utc>,
        effects: Vec<Effect>,
    ) -> Append {
        Append {
            stream_id,
            stream_type: E::STREAM,
            namespace: metadata.namespace.clone(),
            expected: prev_version.map_or(Expected::NoStream, Expected::Version),
            events: events
                .iter()
                .map(|e| {
                    let (t, data) = e.to_parts();
                    NewEvent {
                        event_type: t.to_string(),
                        data,
                        recorded_at: None,
                    }
                })
                .collect(),
            metadata,
            recorded_at: at,
            command: None,
            effects,
        }
    }

    /// Why Postgres would refuse this append's own values, found before it joins a batch: a NUL
    /// character in an event, the metadata or the command, or a time outside the storable
    /// range. Values only its side effects carry are caught by the write itself (see
    /// [`flush`]).
    pub fn unstorable(&self) -> Option<String> {
        let check = || -> Result<(), FieldError> {
            storable::check_text("namespace", &self.namespace)?;
            storable::check_time("recorded_at", self.recorded_at)?;
            for (k, e) in self.events.iter().enumerate() {
                storable::check_text(&format!("events[{k}].type"), &e.event_type)?;
                storable::check_json(&format!("events[{k}].data"), &e.data)?;
                if let Some(t) = e.recorded_at {
                    storable::check_time(&format!("events[{k}].recorded_at"), t)?;
                }
            }
            let meta = serde_json::to_value(&self.metadata).unwrap_or_default();
            storable::check_json("metadata", &meta)?;
            if let Some(c) = &self.command {
                storable::check_json("command", &serde_json::to_value(c).unwrap_or_default())?;
            }
            Ok(())
        };
        check().err().map(|e| format!("{}: {}", e.field, e.message))
    }

    fn new_version(&self) -> i64 {
        let base = match self.expected {
            Expected::NoStream => 0,
            Expected::Version(v) => v,
        };
        base + self.events.len() as i64
    }
}

/// A committed append.
#[derive(Debug, Clone)]
pub struct Appended {
    /// Stream version after the append.
    pub version: i64,
    /// Global positions of the appended events, in order.
    pub positions: Vec<i64>,
}

/// Why an append did not apply.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    #[error("stream version conflict (actual version {actual:?})")]
    Conflict { actual: Option<i64> },
    #[error("a command with this idempotency key already exists")]
    DuplicateCommand,
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// The append's own data is refused by Postgres (a NUL character, a time out of range, a
    /// constraint): retrying cannot help. The rest of its batch committed without it.
    #[error("the append holds a value that cannot be stored: {0}")]
    Invalid(String),
}

impl From<AppendError> for StoreError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Conflict { .. } => StoreError::Conflict,
            AppendError::DuplicateCommand => StoreError::DuplicateCommand,
            AppendError::Unavailable(m) => StoreError::Unavailable(m),
            AppendError::Invalid(m) => StoreError::Invalid(m),
        }
    }
}

struct Pending {
    append: Append,
    reply: oneshot::Sender<Result<Appended, AppendError>>,
}

/// Settings of the group commit.
#[derive(Debug, Clone, Copy)]
pub struct AppenderOptions {
    /// Flushes that may run at once (each on its own connection).
    pub flushers: usize,
    /// Most appends in one transaction.
    pub max_batch: usize,
}

impl Default for AppenderOptions {
    fn default() -> Self {
        Self {
            flushers: 2,
            max_batch: 1000,
        }
    }
}

impl From<&crate::config::Config> for AppenderOptions {
    fn from(c: &crate::config::Config) -> Self {
        Self {
            flushers: c.append_flushers,
            ..Self::default()
        }
    }
}

/// Handle to the group-commit writer; cheap to clone.
#[derive(Clone)]
pub struct Appender {
    tx: mpsc::UnboundedSender<Pending>,
    pool: PgPool,
    listener: Option<Arc<dyn CommitListener>>,
}

impl Appender {
    /// Start the flusher tasks. `listener` is told of each commit (see [`CommitListener`]).
    pub fn start(
        pool: PgPool,
        listener: Option<Arc<dyn CommitListener>>,
        opts: AppenderOptions,
    ) -> Appender {
        let (tx, rx) = mpsc::unbounded_channel::<Pending>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..opts.flushers.max(1) {
            let rx = rx.clone();
            let pool = pool.clone();
            let listener = listener.clone();
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else { return };
                        let mut batch = vec![first];
                        while batch.len() < opts.max_batch {
                            match rx.try_recv() {
                                Ok(p) => batch.push(p),
                                Err(_) => break,
                            }
                        }
                        batch
                    };
                    flush(&pool, listener.as_deref(), batch).await;
                }
            });
        }
        Appender { tx, pool, listener }
    }

    /// Append all in one transaction, or none (batch submission).
    pub async fn append_all(&self, appends: Vec<Append>) -> Result<Vec<Appended>, AppendError> {
        if let Some(why) = appends.iter().find_map(Append::unstorable) {
            return Err(AppendError::Invalid(why));
        }
        let mut results: Vec<Option<Result<Appended, AppendError>>> = vec![None; appends.len()];
        match try_flush(&self.pool, &appends, &mut results, &HashSet::new(), true).await {
            Ok(Ok(done)) => {
                after_commit(self.listener.as_deref(), done).await;
                results
                    .into_iter()
                    .map(|r| {
                        r.unwrap_or_else(|| Err(AppendError::Unavailable("not flushed".into())))
                    })
                    .collect()
            }
            Ok(Err(_)) => Err(results
                .into_iter()
                .flatten()
                .find_map(Result::err)
                .unwrap_or(AppendError::Conflict { actual: None })),
            // A unique row another writer committed first (e.g. a schedule tick) is a conflict.
            Err(e) => Err(refused(&e).unwrap_or_else(|| AppendError::Unavailable(e.to_string()))),
        }
    }

    /// Append and wait for the commit.
    pub async fn append(&self, append: Append) -> Result<Appended, AppendError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { append, reply })
            .map_err(|_| AppendError::Unavailable("appender stopped".into()))?;
        rx.await
            .map_err(|_| AppendError::Unavailable("appender dropped the request".into()))?
    }

    /// Append several (each succeeds or fails on its own).
    pub async fn append_many(&self, appends: Vec<Append>) -> Vec<Result<Appended, AppendError>> {
        let mut rxs = Vec::with_capacity(appends.len());
        for append in appends {
            let (reply, rx) = oneshot::channel();
            if self.tx.send(Pending { append, reply }).is_err() {
                rxs.push(None);
            } else {
                rxs.push(Some(rx));
            }
        }
        let mut out = Vec::with_capacity(rxs.len());
        for rx in rxs {
            out.push(match rx {
                Some(rx) => rx.await.unwrap_or_else(|_| {
                    Err(AppendError::Unavailable(
                        "appender dropped the request".into(),
                    ))
                }),
                None => Err(AppendError::Unavailable("appender stopped".into())),
            });
        }
        out
    }
}

async fn flush(pool: &PgPool, listener: Option<&dyn CommitListener>, batch: Vec<Pending>) {
    let started = Instant::now();
    let size = batch.len();
    let (appends, replies): (Vec<Append>, Vec<_>) =
        batch.into_iter().map(|p| (p.append, p.reply)).unzip();
    let mut results: Vec<Option<Result<Appended, AppendError>>> = vec![None; appends.len()];
    // An append Postgres would refuse never joins the batch.
    let mut candidates = Vec::with_capacity(appends.len());
    for (i, a) in appends.iter().enumerate() {
        match a.unstorable() {
            Some(why) => {
                metrics::counter!("capibara_append_refused_total").increment(1);
                tracing::warn!(stream_id = %a.stream_id, namespace = %a.namespace, %why, "append refused");
                results[i] = Some(Err(AppendError::Invalid(why)));
            }
            None => candidates.push(i),
        }
    }
    let (committed, failed) = write_isolating(pool, &appends, &mut results, candidates).await;
    if let Some(e) = failed {
        let msg = e.to_string();
        tracing::warn!(error = %msg, size, "append batch failed");
        for r in results.iter_mut().filter(|r| r.is_none()) {
            *r = Some(Err(AppendError::Unavailable(msg.clone())));
        }
    }
    after_commit(listener, committed).await;
    metrics::histogram!("capibara_append_batch_size").record(size as f64);
    metrics::histogram!("capibara_append_batch_seconds").record(started.elapsed().as_secs_f64());
    for (reply, result) in replies.into_iter().zip(results) {
        let _ = reply
            .send(result.unwrap_or_else(|| Err(AppendError::Unavailable("not flushed".into()))));
    }
}

/// Write the appends `part` of the batch. The happy path is one transaction. Appends that fail a
/// check inside it (a version conflict, a duplicate key) are left out and it is retried. A
/// statement that fails for a value Postgres refuses ([`refused`]) splits the part in halves,
/// written in order, until the culprit is alone: it gets its own error and everything else
/// commits. One poison append among n costs about 2·log2(n) extra transactions, paid only when
/// there is one. Returns what committed, and the error (of the connection or the server) that
/// stopped the rest; appends without a result then are unanswered.
async fn write_isolating(
    pool: &PgPool,
    appends: &[Append],
    results: &mut [Option<Result<Appended, AppendError>>],
    part: Vec<usize>,
) -> (Committed, Option<sqlx::Error>) {
    let mut committed = Committed {
        dispatched: Vec::new(),
        streams: Vec::new(),
    };
    if part.is_empty() {
        return (committed, None);
    }
    // A stack of parts, the earliest on top: appends to one stream keep their order.
    let mut todo = vec![part];
    while let Some(part) = todo.pop() {
        let members: HashSet<usize> = part.iter().copied().collect();
        let mut excluded: HashSet<usize> = (0..appends.len())
            .filter(|i| !members.contains(i))
            .collect();
        loop {
            match try_flush(pool, appends, results, &excluded, false).await {
                Ok(Ok(done)) => {
                    committed.dispatched.extend(done.dispatched);
                    committed.streams.extend(done.streams);
                    break;
                }
                Ok(Err(losers)) => excluded.extend(losers),
                Err(e) => {
                    let Some(error) = refused(&e) else {
                        return (committed, Some(e));
                    };
                    let live: Vec<usize> = part
                        .iter()
                        .copied()
                        .filter(|i| !excluded.contains(i))
                        .collect();
                    if let [culprit] = live[..] {
                        let a = &appends[culprit];
                        metrics::counter!("capibara_append_refused_total").increment(1);
                        tracing::warn!(stream_id = %a.stream_id, namespace = %a.namespace,
                            error = %e, "append refused by the database; the rest of its batch commits");
                        results[culprit] = Some(Err(error));
                    } else if live.len() > 1 {
                        let (left, right) = live.split_at(live.len() / 2);
                        todo.push(right.to_vec());
                        todo.push(left.to_vec());
                    }
                    break;
                }
            }
        }
    }
    committed.streams.sort_unstable();
    committed.streams.dedup();
    (committed, None)
}

/// The error for an append whose statement failed with `e`, if `e` is about a value it brought
/// rather than the connection or the server: a duplicate unique row another writer committed
/// first (e.g. a schedule tick) is a conflict; a value Postgres refuses is
/// [`AppendError::Invalid`].
fn refused(e: &sqlx::Error) -> Option<AppendError> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    let code = db.code()?;
    if code == "23505" {
        Some(AppendError::Conflict { actual: None })
    } else if super::is_refused_value_code(&code) {
        Some(AppendError::Invalid(db.message().to_string()))
    } else {
        None
    }
}

/// Tell the listener what the commit changed.
async fn after_commit(listener: Option<&dyn CommitListener>, done: Committed) {
    if let Some(listener) = listener {
        if !done.dispatched.is_empty() || !done.streams.is_empty() {
            listener.committed(&done.dispatched, &done.streams).await;
        }
    }
}

struct Committed {
    dispatched: Vec<DispatchEntry>,
    streams: Vec<Uuid>,
}

/// One attempt at writing the batch. `Ok(Err(losers))` = roll back and retry without them.
async fn try_flush(
    pool: &PgPool,
    appends: &[Append],
    results: &mut [Option<Result<Appended, AppendError>>],
    excluded: &HashSet<usize>,
    atomic: bool,
) -> Result<Result<Committed, Vec<usize>>, sqlx::Error> {
    let mut tx = pool.begin().await?;

    // 1. Lock the existing streams we touch, in id order (no deadlocks between flushers).
    let mut lock_ids: Vec<Uuid> = appends
        .iter()
        .enumerate()
        .filter(|(i, a)| !excluded.contains(i) && matches!(a.expected, Expected::Version(_)))
        .map(|(_, a)| a.stream_id)
        .collect();
    lock_ids.sort_unstable();
    lock_ids.dedup();
    let mut current: HashMap<Uuid, Option<i64>> = HashMap::new();
    if !lock_ids.is_empty() {
        let rows: Vec<(Uuid, i64)> = sqlx::query_as(
            "SELECT stream_id, version FROM streams WHERE stream_id = ANY($1) ORDER BY stream_id FOR UPDATE",
        )
        .bind(&lock_ids)
        .fetch_all(&mut *tx)
        .await?;
        for id in &lock_ids {
            current.insert(*id, None);
        }
        for (id, v) in rows {
            current.insert(id, Some(v));
        }
    }

    // 2. Check expected versions in arrival order; a stream may appear more than once.
    let mut ok: Vec<usize> = Vec::with_capacity(appends.len());
    let mut keys_seen: HashSet<(&str, &str)> = HashSet::new();
    for (i, a) in appends.iter().enumerate() {
        if excluded.contains(&i) {
            continue;
        }
        let actual = match a.expected {
            Expected::NoStream => current.get(&a.stream_id).copied().flatten(),
            Expected::Version(_) => current.get(&a.stream_id).copied().flatten(),
        };
        let matches = match a.expected {
            Expected::NoStream => actual.is_none(),
            Expected::Version(v) => actual == Some(v),
        };
        if !matches {
            results[i] = Some(Err(AppendError::Conflict { actual }));
            continue;
        }
        if let Some(key) = a
            .command
            .as_ref()
            .and_then(|c| c.idempotency_key.as_deref())
        {
            if !keys_seen.insert((a.namespace.as_str(), key)) {
                results[i] = Some(Err(AppendError::DuplicateCommand));
                continue;
            }
        }
        current.insert(a.stream_id, Some(a.new_version()));
        results[i] = None;
        ok.push(i);
    }
    if atomic && ok.len() != appends.len() {
        tx.rollback().await?;
        return Ok(Err(Vec::new()));
    }
    if ok.is_empty() {
        tx.rollback().await?;
        return Ok(Ok(Committed {
            dispatched: vec![],
            streams: vec![],
        }));
    }

    // 3. Commands: a duplicate idempotency key loses.
    let commands: Vec<(usize, &CommandRecord)> = ok
        .iter()
        .filter_map(|&i| appends[i].command.as_ref().map(|c| (i, c)))
        .collect();
    if !commands.is_empty() {
        let rows = serde_json::to_value(commands.iter().map(|(_, c)| c).collect::<Vec<_>>())
            .expect("commands serialize");
        let inserted: Vec<(Uuid,)> = sqlx::query_as(
            "INSERT INTO commands (id, namespace, type, idempotency_key, request_hash, status_code, response, stream_id, actor, received_at)
             SELECT id, namespace, type, idempotency_key, request_hash, status_code, response, stream_id, actor, received_at
             FROM jsonb_to_recordset($1) AS c(id uuid, namespace text, type text, idempotency_key text, request_hash text,
                  status_code int, response jsonb, stream_id uuid, actor text, received_at timestamptz)
             ON CONFLICT (namespace, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
             RETURNING id",
        )
        .bind(rows)
        .fetch_all(&mut *tx)
        .await?;
        let inserted: HashSet<Uuid> = inserted.into_iter().map(|(id,)| id).collect();
        let losers: Vec<usize> = commands
            .iter()
            .filter(|(_, c)| !inserted.contains(&c.id))
            .map(|(i, _)| *i)
            .collect();
        if !losers.is_empty() {
            tx.rollback().await?;
            for &i in &losers {
                results[i] = Some(Err(AppendError::DuplicateCommand));
            }
            return Ok(Err(losers));
        }
    }

    // 4. Streams: create new ones, bump existing ones.
    let mut new_ids = Vec::new();
    let mut new_types = Vec::new();
    let mut new_ns = Vec::new();
    let mut new_versions = Vec::new();
    let mut final_version: HashMap<Uuid, i64> = HashMap::new();
    for &i in &ok {
        let a = &appends[i];
        if a.expected == Expected::NoStream {
            new_ids.push(a.stream_id);
            new_types.push(a.stream_type.as_str());
            new_ns.push(a.namespace.as_str());
            new_versions.push(a.new_version());
        }
        final_version.insert(a.stream_id, a.new_version());
    }
    if !new_ids.is_empty() {
        let created: Vec<(Uuid,)> = sqlx::query_as(
            "INSERT INTO streams (stream_id, stream_type, namespace, version)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[])
             ON CONFLICT (stream_id) DO NOTHING RETURNING stream_id",
        )
        .bind(&new_ids)
        .bind(&new_types)
        .bind(&new_ns)
        .bind(&new_versions)
        .fetch_all(&mut *tx)
        .await?;
        if created.len() != new_ids.len() {
            let created: HashSet<Uuid> = created.into_iter().map(|(id,)| id).collect();
            let losers: Vec<usize> = ok
                .iter()
                .copied()
                .filter(|&i| {
                    appends[i].expected == Expected::NoStream
                        && !created.contains(&appends[i].stream_id)
                })
                .collect();
            tx.rollback().await?;
            for &i in &losers {
                results[i] = Some(Err(AppendError::Conflict { actual: None }));
            }
            return Ok(Err(losers));
        }
    }
    let (upd_ids, upd_versions): (Vec<Uuid>, Vec<i64>) = final_version
        .iter()
        .filter(|(id, _)| current.contains_key(id) && lock_ids.binary_search(id).is_ok())
        .map(|(id, v)| (*id, *v))
        .unzip();
    if !upd_ids.is_empty() {
        sqlx::query(
            "UPDATE streams s SET version = u.version
             FROM unnest($1::uuid[], $2::bigint[]) AS u(id, version) WHERE s.stream_id = u.id",
        )
        .bind(&upd_ids)
        .bind(&upd_versions)
        .execute(&mut *tx)
        .await?;
    }

    // 5. Events.
    let mut ev_stream = Vec::new();
    let mut ev_type_stream = Vec::new();
    let mut ev_version = Vec::new();
    let mut ev_type = Vec::new();
    let mut ev_data = Vec::new();
    let mut ev_meta = Vec::new();
    let mut ev_at = Vec::new();
    for &i in &ok {
        let a = &appends[i];
        let base = a.new_version() - a.events.len() as i64;
        let meta = serde_json::to_value(&a.metadata).expect("metadata serializes");
        for (k, e) in a.events.iter().enumerate() {
            ev_stream.push(a.stream_id);
            ev_type_stream.push(a.stream_type.as_str());
            ev_version.push(base + 1 + k as i64);
            ev_type.push(e.event_type.as_str());
            ev_data.push(e.data.clone());
            ev_meta.push(meta.clone());
            ev_at.push(e.recorded_at.unwrap_or(a.recorded_at));
        }
    }
    let positions: Vec<(i64, Uuid, i64)> = sqlx::query_as(
        "INSERT INTO events (stream_id, stream_type, version, type, data, metadata, recorded_at)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::jsonb[], $6::jsonb[], $7::timestamptz[])
         RETURNING position, stream_id, version",
    )
    .bind(&ev_stream)
    .bind(&ev_type_stream)
    .bind(&ev_version)
    .bind(&ev_type)
    .bind(&ev_data)
    .bind(&ev_meta)
    .bind(&ev_at)
    .fetch_all(&mut *tx)
    .await?;
    let position_of: HashMap<(Uuid, i64), i64> =
        positions.into_iter().map(|(p, s, v)| ((s, v), p)).collect();

    // 6. Side effects, the last one per row winning.
    let dispatched = write_effects(&mut tx, appends, &ok).await?;

    tx.commit().await?;

    let mut streams = Vec::with_capacity(ok.len());
    for &i in &ok {
        let a = &appends[i];
        let base = a.new_version() - a.events.len() as i64;
        let positions = (1..=a.events.len() as i64)
            .map(|k| {
                position_of
                    .get(&(a.stream_id, base + k))
                    .copied()
                    .unwrap_or_default()
            })
            .collect();
        results[i] = Some(Ok(Appended {
            version: a.new_version(),
            positions,
        }));
        streams.push(a.stream_id);
    }
    streams.sort_unstable();
    streams.dedup();
    Ok(Ok(Committed {
        dispatched,
        streams,
    }))
}

async fn write_effects(
    tx: &mut Transaction<'_, Postgres>,
    appends: &[Append],
    ok: &[usize],
) -> Result<Vec<DispatchEntry>, sqlx::Error> {
    let mut jobs: HashMap<Uuid, &Job> = HashMap::new();
    let mut dispatch: HashMap<Uuid, Option<&DispatchEntry>> = HashMap::new();
    let mut leases: HashMap<Uuid, Option<&Lease>> = HashMap::new();
    let mut deliveries: HashMap<Uuid, &crate::domain::delivery::Delivery> = HashMap::new();
    let mut checkpoints: Vec<(&str, super::events::LogCursor)> = Vec::new();
    let mut schedules: HashMap<Uuid, &crate::domain::schedule::Schedule> = HashMap::new();
    let mut triggers: HashMap<Uuid, &crate::domain::trigger::Trigger> = HashMap::new();
    let mut workflows: HashMap<Uuid, &crate::domain::workflow::Workflow> = HashMap::new();
    let mut runs: HashMap<Uuid, &crate::domain::run::Run> = HashMap::new();
    let mut user_kinds: HashMap<Uuid, &crate::domain::kinds::user::UserKind> = HashMap::new();
    let (mut tick_sched, mut tick_time, mut tick_job) = (Vec::new(), Vec::new(), Vec::new());
    let mut credentials = Vec::new();
    let mut receipts = Vec::new();
    for &i in ok {
        for e in &appends[i].effects {
            match e {
                Effect::UpsertJob(j) => {
                    jobs.insert(j.id, j);
                }
                Effect::Dispatch(d) => {
                    dispatch.insert(d.job_id, Some(d));
                }
                Effect::Undispatch(id) => {
                    dispatch.insert(*id, None);
                }
                Effect::Lease(l) => {
                    leases.insert(l.job_id, Some(l));
                }
                Effect::ReleaseLease(id) => {
                    leases.insert(*id, None);
                }
                Effect::UpsertDelivery(d) => {
                    deliveries.insert(d.id, d);
                }
                Effect::Checkpoint { name, cursor } => checkpoints.push((name, *cursor)),
                Effect::UpsertSchedule(s) => {
                    schedules.insert(s.id, s);
                }
                Effect::UpsertUserKind(k) => {
                    user_kinds.insert(k.id, k);
                }
                Effect::UpsertTrigger(t) => {
                    triggers.insert(t.id, t);
                }
                Effect::UpsertWorkflow(w) => {
                    workflows.insert(w.id, w);
                }
                Effect::UpsertRun(r) => {
                    runs.insert(r.id, r);
                }
                Effect::TriggerCredential {
                    trigger_id,
                    namespace,
                    credential,
                } => credentials.push((trigger_id, namespace, credential)),
                Effect::Receipt {
                    trigger_id,
                    message_id,
                } => receipts.push((trigger_id, message_id)),
                Effect::InsertTicks { schedule_id, ticks } => {
                    for (t, j) in ticks {
                        tick_sched.push(*schedule_id);
                        tick_time.push(*t);
                        tick_job.push(*j);
                    }
                }
            }
        }
    }
    if !jobs.is_empty() {
        let rows = serde_json::to_value(jobs.values().collect::<Vec<_>>()).expect("jobs serialize");
        sqlx::query(super::jobs::UPSERT_JOBS)
            .bind(rows)
            .execute(&mut **tx)
            .await?;
    }
    if !deliveries.is_empty() {
        let rows = serde_json::to_value(deliveries.values().collect::<Vec<_>>())
            .expect("deliveries serialize");
        sqlx::query(super::deliveries::UPSERT_DELIVERIES)
            .bind(rows)
            .execute(&mut **tx)
            .await?;
    }
    if !schedules.is_empty() {
        let rows = serde_json::to_value(schedules.values().collect::<Vec<_>>())
            .expect("schedules serialize");
        sqlx::query(super::schedules::UPSERT_SCHEDULES)
            .bind(rows)
            .execute(&mut **tx)
            .await?;
    }
    if !triggers.is_empty() {
        let rows = serde_json::to_value(triggers.values().collect::<Vec<_>>())
            .expect("triggers serialize");
        sqlx::query(super::triggers::UPSERT_TRIGGERS)
            .bind(rows)
            .execute(&mut **tx)
            .await?;
    }
    if !user_kinds.is_empty() {
        let rows = serde_json::to_value(user_kinds.values().collect::<Vec<_>>())
            .expect("user kinds serialize");
        sqlx::query(super::user_kinds::UPSERT_USER_KINDS)
            .bind(rows)
            .execute(&mut **tx)
            .await?;
    }
    if !workflows.is_empty() {
        let rows = serde_json::to_value(workflows.values().collect::<Vec<_>>())
            .expect("workflows serialize");
        sqlx::query(super::workflows::UPSERT_WORKFLOWS)
            .bind(rows)
            .execute(&mut **tx)
            .await?;
    }
    if !runs.is_empty() {
        let rows = serde_json::to_value(runs.values().collect::<Vec<_>>()).expect("runs serialize");
        sqlx::query(super::runs::UPSERT_RUNS)
            .bind(rows)
            .execute(&mut **tx)
            .await?;
    }
    if !tick_sched.is_empty() {
        sqlx::query(
            "INSERT INTO schedule_ticks (schedule_id, fire_time, job_id)
             SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::uuid[])",
        )
        .bind(&tick_sched)
        .bind(&tick_time)
        .bind(&tick_job)
        .execute(&mut **tx)
        .await?;
    }
    for (trigger_id, namespace, credential) in credentials {
        match credential {
            Some(c) => {
                sqlx::query(
                    "INSERT INTO trigger_credentials (trigger_id, namespace, credential) VALUES ($1, $2, $3)
                     ON CONFLICT (trigger_id) DO UPDATE SET credential = EXCLUDED.credential",
                )
                .bind(trigger_id)
                .bind(namespace)
                .bind(sqlx::types::Json(c))
                .execute(&mut **tx)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM trigger_credentials WHERE trigger_id = $1")
                    .bind(trigger_id)
                    .execute(&mut **tx)
                    .await?;
            }
        }
    }
    for (trigger_id, message_id) in receipts {
        sqlx::query("INSERT INTO trigger_receipts (trigger_id, message_id) VALUES ($1, $2)")
            .bind(trigger_id)
            .bind(message_id)
            .execute(&mut **tx)
            .await?;
    }
    for (name, cursor) in checkpoints {
        sqlx::query(super::checkpoints::SAVE)
            .bind(name)
            .bind(cursor.tx_id.to_string())
            .bind(cursor.position)
            .execute(&mut **tx)
            .await?;
    }
    let (to_dispatch, to_undispatch) = split(&dispatch);
    super::dispatch::write(tx, &to_dispatch, &to_undispatch).await?;
    let (to_lease, to_release) = split(&leases);
    super::lease::write(tx, &to_lease, &to_release).await?;
    Ok(to_dispatch.into_iter().cloned().collect())
}

fn split<'a, T>(m: &HashMap<Uuid, Option<&'a T>>) -> (Vec<&'a T>, Vec<Uuid>) {
    let mut put = Vec::new();
    let mut delete = Vec::new();
    for (id, v) in m {
        match v {
            Some(v) => put.push(*v),
            None => delete.push(*id),
        }
    }
    (put, delete)
}
