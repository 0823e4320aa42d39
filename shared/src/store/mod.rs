//! The event store and projections in Postgres.
//!
//! # Layout
//! - [`append`]: group-committed appends with optimistic concurrency and side effects.
//! - [`jobs`]: job projection queries and the helper that turns job events into an append.
//! - [`events`]: reading a stream and the gap-safe read of the global log.
//! - [`commands`]: idempotency-key lookups.
//! - [`keys`]: API keys.
//! - [`workers`]: worker registration and heartbeats.
//! - [`lease`]: an attempt's lease: grant, renew, expire, release, and how results are fenced.
//! - [`dispatch`]: the dispatch outbox (written with the events, swept by the relay).
//! - [`rebuild`]: rebuilding projections from the log.
//! - [`workflows`], [`runs`]: workflow definitions, runs, and committing a run's plan.
//! - [`secrets`]: secrets workflow templates refer to by name (values never enter the log).
//! - [`deliveries`], [`subscriptions`], [`checkpoints`]: webhook deliveries and log followers.
//! - [`code_cache`]: `code.run`'s result cache.
//! - [`connectors`]: connectors and the item hashes they returned.
//! - [`memory`]: memory items (texts with sentence vectors) and their full-text search.
//! - [`models`]: the model registry (a row per model name).
//! - [`bulk`]: bulk operations on jobs: their rows, and the pages of jobs they act on.

pub mod append;
pub mod archive;
mod batch;
pub mod bulk;
pub mod checkpoints;
pub mod code_cache;
pub mod commands;
pub mod connectors;
pub mod deliveries;
pub mod dispatch;
pub mod events;
pub mod held;
pub mod jobs;
pub mod keys;
pub mod lease;
pub mod limits;
pub mod llm_providers;
pub mod memory;
pub mod models;
pub mod rebuild;
pub mod runs;
pub mod schedules;
pub mod sealed;
pub mod secrets;
pub mod subscriptions;
pub mod triggers;
pub mod user_kinds;
pub mod workers;
pub mod workflows;

use std::time::Duration;

use sqlx::{postgres::PgPoolOptions, PgPool};

pub use append::{
    Append, AppendError, Appended, Appender, AppenderOptions, Effect, Expected, NewEvent,
};

/// Errors at the store boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("concurrent modification")]
    Conflict,
    #[error("duplicate idempotency key")]
    DuplicateCommand,
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A value Postgres refuses permanently (see [`AppendError::Invalid`]).
    #[error("value cannot be stored: {0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
            sqlx::Error::Database(ref db) if is_unavailable_code(db.code().as_deref()) => {
                StoreError::Unavailable(e.to_string())
            }
            sqlx::Error::Database(ref db)
                if db.code().is_some_and(|c| is_refused_value_code(&c)) =>
            {
                StoreError::Invalid(db.message().to_string())
            }
            other => StoreError::Internal(other.to_string()),
        }
    }
}

/// Admin shutdown, crash recovery, cannot connect, too many connections, read-only.
fn is_unavailable_code(code: Option<&str>) -> bool {
    matches!(code, Some(c) if c.starts_with("57P") || c.starts_with("08") || c == "53300" || c == "25006")
}

/// A value Postgres refuses permanently, whoever sends it again: a data exception (class 22:
/// a NUL character, a time or number out of range, text that does not parse), an integrity
/// violation other than a duplicate key (not null, check, foreign key), or a row or index
/// entry over a size limit (54000).
fn is_refused_value_code(code: &str) -> bool {
    code.starts_with("22") || (code.starts_with("23") && code != "23505") || code == "54000"
}

/// Open a pool that fails fast while Postgres is down and recovers by itself when it returns.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(3))
        .idle_timeout(Duration::from_secs(300))
        .test_before_acquire(false)
        .connect_lazy(url)
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    Ok(pool)
}

/// A pool on the same database as `pool` whose connections plan each prepared statement once,
/// generically (`plan_cache_mode = force_generic_plan`), for the hot statements whose plan does
/// not depend on their values: the append (docs/write-path.md), the reads of the log, and
/// loads by primary key ([`Store::generic_pool`]).
///
/// Left to choose (`auto`), Postgres plans these again on every execution: a custom plan
/// knows the arrays' lengths, so it always looks cheaper than the generic one, and planning a
/// statement over the partitioned `events` table costs more than running it (0.9 ms of
/// planning against 0.4 ms of execution for a lone submit; 0.8 ms for a 0.07 ms log read).
/// Their generic plans are the same index probes and ordered index scans, and Postgres
/// replans them when `ANALYZE` changes a table's statistics.
///
/// These connections also `SET enable_seqscan = off`. A generic plan is made once, with the
/// statistics of that moment, and kept until `ANALYZE` runs: made while a table is still small
/// (a fresh database, the first minutes of a benchmark, a new `events` partition), it reads
/// the whole table to find one row (`jobs` by id, `dispatch` by job id, the append's probe of
/// the expected event), and keeps doing so as the table grows. Every statement on this pool
/// finds its rows by key, so the index path is the right one at any size; a statement with
/// no index to use still scans. Lazy, like `pool`: a connection opens on first use.
pub fn with_generic_plans(pool: &PgPool) -> PgPool {
    let opts = pool.options();
    PgPoolOptions::new()
        .max_connections(opts.get_max_connections())
        .min_connections(0)
        .acquire_timeout(opts.get_acquire_timeout())
        .idle_timeout(opts.get_idle_timeout())
        .test_before_acquire(false)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                sqlx::Executor::execute(
                    conn,
                    "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off",
                )
                .await?;
                Ok(())
            })
        })
        .connect_lazy_with((*pool.connect_options()).clone())
}

/// Apply pending migrations. sqlx holds an advisory lock meanwhile, so replicas starting together
/// migrate once.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    use sqlx::migrate::MigrateError;
    sqlx::migrate!("../migrations")
        .run(pool)
        .await
        .map_err(|e| match e {
            // Postgres unreachable (a restart, a cut network): worth waiting for.
            MigrateError::Execute(inner) | MigrateError::ExecuteMigration(inner, _) => {
                match StoreError::from(inner) {
                    StoreError::Unavailable(m) => {
                        StoreError::Unavailable(format!("migration failed: {m}"))
                    }
                    other => StoreError::Internal(format!("migration failed: {other}")),
                }
            }
            // A migration missing from this build, edited, or left dirty: waiting changes nothing.
            other => StoreError::Internal(format!("migration failed: {other}")),
        })
}

/// Store handle: the pool and the group-commit appender.
#[derive(Clone)]
pub struct Store {
    pub pool: PgPool,
    pub appender: Appender,
}

impl Store {
    pub fn new(pool: PgPool, appender: Appender) -> Self {
        Self { pool, appender }
    }

    /// The pool whose connections plan each prepared statement once ([`with_generic_plans`]),
    /// shared with the appender: for the hot statements whose plan does not depend on their
    /// values (the log's reads, the worker's load of popped jobs, the deliverer's callback
    /// lookup), where planning costs more than running.
    pub fn generic_pool(&self) -> &PgPool {
        self.appender.pool()
    }

    /// A connection of [`Self::generic_pool`] for one hot loop to keep between uses
    /// ([`held::HeldConnection`]): kept only if the pool still has one for everyone else
    /// besides the appender's flushers and this loop.
    pub fn held_connection(&self) -> held::HeldConnection {
        let pool = self.generic_pool();
        let hold =
            pool.options().get_max_connections() as usize > self.appender.held_connections() + 1;
        held::HeldConnection::new(pool.clone(), hold)
    }

    /// Liveness check for `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
