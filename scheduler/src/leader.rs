//! One leader per role among scheduler replicas (the deliverer, the orchestrator): a
//! session-level advisory lock held on a connection of its own. The lock goes with the
//! connection, so a replica that dies or loses Postgres hands leadership over by itself, and
//! a replica that stops leading closes that connection: back in the pool it would keep the lock
//! (a session lock outlives the borrow), and no replica could lead that role again while the
//! connection lived, held as another role's lock connection or serving other queries.
//! `capibara_scheduler_leader{role}` is 1 on the replica that holds a role's lock, so an alert
//! can tell when no replica leads one.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use capibara_shared::store::StoreError;
use sqlx::{pool::PoolConnection, PgPool, Postgres};
use tokio_util::sync::CancellationToken;

/// How often a leader confirms it still holds its lock.
const CONFIRM_EVERY: Duration = Duration::from_secs(1);
/// How long a replica that is not leading waits before trying again.
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// A held leader lock; dropping it closes its connection (which releases the lock) and sets the
/// role's leader gauge back to 0.
pub struct Leadership {
    conn: PoolConnection<Postgres>,
    confirmed: Instant,
    /// The role this lock leads (the gauge's `role` label).
    role: &'static str,
}

impl Leadership {
    /// Take lock `key` for `role`, or [`StoreError::Conflict`] when another replica holds it.
    pub async fn acquire(
        pool: &PgPool,
        key: i64,
        role: &'static str,
    ) -> Result<Leadership, StoreError> {
        let mut conn = pool.acquire().await?;
        let (got,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut *conn)
            .await?;
        if !got {
            return Err(StoreError::Conflict);
        }
        metrics::gauge!("capibara_scheduler_leader", "role" => role).set(1.0);
        Ok(Leadership {
            conn,
            confirmed: Instant::now(),
            role,
        })
    }

    /// Fails when the lock's connection died (at most one round trip a second): the lock is
    /// gone with it and the caller must stop leading.
    pub async fn confirm(&mut self) -> Result<(), StoreError> {
        if self.confirmed.elapsed() > CONFIRM_EVERY {
            sqlx::query("SELECT 1").execute(&mut *self.conn).await?;
            self.confirmed = Instant::now();
        }
        Ok(())
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.conn.close_on_drop();
        metrics::gauge!("capibara_scheduler_leader", "role" => self.role).set(0.0);
    }
}

/// Run `lead` until it returns `Ok` or `stop` fires; an error (not leading, or leadership
/// lost) is retried every two seconds.
pub async fn run<F, Fut>(role: &str, stop: &CancellationToken, mut lead: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), StoreError>>,
{
    loop {
        if stop.is_cancelled() {
            return;
        }
        match lead().await {
            Ok(()) => return,
            Err(e) => tracing::debug!(error = %e, role, "not leading; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_EVERY) => {}
            _ = stop.cancelled() => return,
        }
    }
}
