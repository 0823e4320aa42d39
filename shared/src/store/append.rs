//! Group-committed appends.
//!
//! Callers hand an [`Append`] to the [`Appender`] and await its result. A few flusher tasks take
//! everything that queued up while the previous flush ran and write it at once
//! ([`super::batch`]): each append's expected version is checked within the batch in arrival
//! order, then by the events' unique `(stream_id, version)`; the job core is one statement with
//! one commit, other projections join it in a transaction. A conflicting append fails alone; the
//! rest of the batch commits.
//!
//! An append whose own values Postgres refuses for good (a NUL character, a time out of range:
//! [`crate::domain::storable`]) fails alone too: the obvious ones are refused before they join
//! a batch, and a statement that fails for such a value splits the batch in halves until the
//! culprit is alone (docs/event-store.md, "Poison appends"). Only errors of the connection or
//! the server fail a whole batch.
//!
//! The callers are answered as soon as the commit returns. Then a [`CommitListener`] (the queue)
//! is told of the new dispatch entries (it pushes them to Redis: the fast path; the relay sweeps
//! what this misses) and of the changed stream ids (hints for waiters and SSE readers), before
//! the flusher takes its next batch.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{mpsc, oneshot, Mutex};
use uuid::Uuid;

use super::{
    batch::Written, dispatch::DispatchEntry, held::HeldConnection, lease::Lease, StoreError,
};
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
        released: &'a [super::dispatch::Release],
        changed: Changed<'a>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;
}

/// The streams a commit changed, for the hints that wake their readers.
#[derive(Debug, Clone, Copy)]
pub struct Changed<'a> {
    pub streams: &'a [Uuid],
    /// Whether an event of the commit names a run (`correlation_id`: a workflow step's job or a
    /// child run), the only events the orchestrator follows.
    pub runs: bool,
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
    /// The job was deleted (`JobDeleted`): its `jobs` row goes.
    DeleteJob(Uuid),
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
    UpsertConnector(Box<crate::domain::connector::Connector>),
    UpsertModel(Box<crate::domain::model::ModelName>),
    UpsertLlmProvider(Box<crate::domain::llm::LlmProvider>),
    UpsertLimit(Box<crate::domain::limit::Limit>),
    UpsertPauses(Box<crate::domain::limit::Pauses>),
    /// After the commit, give back what a running (or ordered) job held in the queue
    /// ([`super::dispatch::Release`]); nothing is written.
    Release(super::dispatch::Release),
    UpsertBulk(Box<crate::domain::bulk::BulkOperation>),
    /// Content hashes a connector returned (`connector_items`).
    ConnectorItems {
        connector_id: Uuid,
        hashes: Vec<String>,
    },
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

    pub(super) fn new_version(&self) -> i64 {
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
    /// Most appends waiting for a flusher; a caller finding it full waits (up to `timeout`)
    /// for room, so memory stays bounded while Postgres is slow.
    pub queue: usize,
    /// How long a write (or a wait for room in the queue) may take before its callers get
    /// [`AppendError::Unavailable`]. A write that timed out may still commit: callers that
    /// must know repeat it with the same Idempotency-Key.
    pub timeout: Duration,
}

impl Default for AppenderOptions {
    fn default() -> Self {
        Self {
            flushers: 2,
            max_batch: 1000,
            queue: 10_000,
            timeout: Duration::from_secs(10),
        }
    }
}

impl From<&crate::config::Config> for AppenderOptions {
    fn from(c: &crate::config::Config) -> Self {
        Self {
            flushers: c.append_flushers,
            queue: c.append_queue,
            timeout: c.append_timeout,
            ..Self::default()
        }
    }
}

/// Handle to the group-commit writer; cheap to clone.
#[derive(Clone)]
pub struct Appender {
    tx: mpsc::Sender<Pending>,
    pool: PgPool,
    listener: Option<Arc<dyn CommitListener>>,
    timeout: Duration,
    /// How many of the pool's connections the flushers keep (0 where holding is off).
    held: usize,
}

impl Appender {
    /// Start the flusher tasks. `listener` is told of each commit (see [`CommitListener`]).
    pub fn start(
        pool: PgPool,
        listener: Option<Arc<dyn CommitListener>>,
        opts: AppenderOptions,
    ) -> Appender {
        // One plan per statement for the whole life of a connection (see the function).
        let pool = super::with_generic_plans(&pool);
        let (tx, rx) = mpsc::channel::<Pending>(opts.queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let flushers = opts.flushers.max(1);
        // Flushers keep their connections only while that leaves one for everything else.
        let hold = pool.options().get_max_connections() as usize > flushers;
        for _ in 0..flushers {
            let rx = rx.clone();
            let pool = pool.clone();
            let listener = listener.clone();
            tokio::spawn(async move {
                // Held from one batch to the next (see `flush`).
                let mut conn = HeldConnection::new(pool, hold);
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
                    flush(&mut conn, listener.as_deref(), batch, opts.timeout).await;
                    conn.done();
                }
            });
        }
        Appender {
            tx,
            pool,
            listener,
            timeout: opts.timeout,
            held: if hold { flushers } else { 0 },
        }
    }

    /// How many of the pool's connections the flushers keep between batches: another loop
    /// that would hold one too ([`HeldConnection`]) checks that one is still left.
    pub fn held_connections(&self) -> usize {
        self.held
    }

    /// The appender's pool: generic plans ([`super::with_generic_plans`]).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Queue `p` for a flusher, waiting for room up to the write timeout.
    async fn enqueue(&self, p: Pending) -> Result<(), AppendError> {
        match tokio::time::timeout(self.timeout, self.tx.send(p)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(AppendError::Unavailable("appender stopped".into())),
            Err(_) => {
                metrics::counter!("capibara_append_queue_full_total").increment(1);
                Err(AppendError::Unavailable(format!(
                    "the database is not keeping up: no room to queue a write within {:?}",
                    self.timeout
                )))
            }
        }
    }

    /// Append all in one transaction, or none (batch submission).
    pub async fn append_all(&self, appends: Vec<Append>) -> Result<Vec<Appended>, AppendError> {
        if let Some(why) = appends.iter().find_map(Append::unstorable) {
            return Err(AppendError::Invalid(why));
        }
        let mut results: Vec<Option<Result<Appended, AppendError>>> = vec![None; appends.len()];
        let written = tokio::time::timeout(self.timeout, async {
            let mut conn = self.pool.acquire().await?;
            try_flush(&mut conn, &appends, &mut results, &HashSet::new(), true).await
        })
        .await
        .unwrap_or_else(|_| Err(timed_out(self.timeout)));
        match written {
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
        self.enqueue(Pending { append, reply }).await?;
        rx.await
            .map_err(|_| AppendError::Unavailable("appender dropped the request".into()))?
    }

    /// Append several (each succeeds or fails on its own).
    pub async fn append_many(&self, appends: Vec<Append>) -> Vec<Result<Appended, AppendError>> {
        let mut rxs = Vec::with_capacity(appends.len());
        for append in appends {
            let (reply, rx) = oneshot::channel();
            match self.enqueue(Pending { append, reply }).await {
                Ok(()) => rxs.push(Ok(rx)),
                Err(e) => rxs.push(Err(e)),
            }
        }
        let mut out = Vec::with_capacity(rxs.len());
        for rx in rxs {
            out.push(match rx {
                Ok(rx) => rx.await.unwrap_or_else(|_| {
                    Err(AppendError::Unavailable(
                        "appender dropped the request".into(),
                    ))
                }),
                Err(e) => Err(e),
            });
        }
        out
    }
}

/// The error of a write Postgres did not finish within `timeout` (its outcome is unknown).
fn timed_out(timeout: Duration) -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the database did not answer within {timeout:?}; the write may or may not have committed"),
    ))
}

/// Write `batch` on `conn`, the flusher's own connection ([`HeldConnection`]: kept from one
/// batch to the next). A connection that failed or timed out is closed, not reused; the next
/// batch takes a fresh one.
async fn flush(
    conn: &mut HeldConnection,
    listener: Option<&dyn CommitListener>,
    batch: Vec<Pending>,
    timeout: Duration,
) {
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
    // A stalled connection never answers: give up after `timeout` (dropping the write closes
    // its connection) so callers get an answer and the flusher serves the next batch.
    let (committed, failed) = match tokio::time::timeout(timeout, async {
        let held = match conn.get().await {
            Ok(c) => c,
            Err(e) => return (Written::default(), Some(e)),
        };
        write_isolating(held, &appends, &mut results, candidates).await
    })
    .await
    {
        Ok(done) => done,
        Err(_) => (Written::default(), Some(timed_out(timeout))),
    };
    if let Some(e) = failed {
        // Broken, or stopped mid-statement: its state is unknown.
        conn.broke();
        let msg = e.to_string();
        tracing::warn!(error = %msg, size, "append batch failed");
        for r in results.iter_mut().filter(|r| r.is_none()) {
            *r = Some(Err(AppendError::Unavailable(msg.clone())));
        }
    }
    metrics::histogram!("capibara_append_batch_size").record(size as f64);
    metrics::histogram!("capibara_append_batch_seconds").record(started.elapsed().as_secs_f64());
    for (reply, result) in replies.into_iter().zip(results) {
        let _ = reply
            .send(result.unwrap_or_else(|| Err(AppendError::Unavailable("not flushed".into()))));
    }
    after_commit(listener, committed).await;
}

/// Write the appends `part` of the batch. The happy path is one transaction. Appends that fail a
/// check inside it (a version conflict, a duplicate key) are left out and it is retried. A
/// statement that fails for a value Postgres refuses ([`refused`]) splits the part in halves,
/// written in order, until the culprit is alone: it gets its own error and everything else
/// commits. One poison append among n costs about 2·log2(n) extra transactions, paid only when
/// there is one. Returns what committed, and the error (of the connection or the server) that
/// stopped the rest; appends without a result then are unanswered.
async fn write_isolating(
    conn: &mut PgConnection,
    appends: &[Append],
    results: &mut [Option<Result<Appended, AppendError>>],
    part: Vec<usize>,
) -> (Written, Option<sqlx::Error>) {
    let mut committed = Written::default();
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
            match try_flush(conn, appends, results, &excluded, false).await {
                Ok(Ok(done)) => {
                    committed.dispatched.extend(done.dispatched);
                    committed.released.extend(done.released);
                    committed.streams.extend(done.streams);
                    committed.runs |= done.runs;
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
async fn after_commit(listener: Option<&dyn CommitListener>, done: Written) {
    if let Some(listener) = listener {
        if !done.dispatched.is_empty() || !done.released.is_empty() || !done.streams.is_empty() {
            listener
                .committed(
                    &done.dispatched,
                    &done.released,
                    Changed {
                        streams: &done.streams,
                        runs: done.runs,
                    },
                )
                .await;
        }
    }
}

/// One attempt at writing the batch ([`super::batch`]). `Ok(Err(losers))` = it rolled back;
/// retry without them.
async fn try_flush(
    conn: &mut PgConnection,
    appends: &[Append],
    results: &mut [Option<Result<Appended, AppendError>>],
    excluded: &HashSet<usize>,
    atomic: bool,
) -> Result<Result<Written, Vec<usize>>, sqlx::Error> {
    let ok = super::batch::check_batch(appends, results, excluded);
    if atomic && ok.len() != appends.len() {
        return Ok(Err(Vec::new()));
    }
    if ok.is_empty() {
        return Ok(Ok(Written::default()));
    }
    super::batch::write(conn, appends, &ok, results).await
}
