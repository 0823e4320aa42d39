//! A Postgres connection a hot loop keeps from one use to the next: the appender's flushers
//! (one per flusher), the worker's load of popped jobs and the deliverer's reads of each page.
//!
//! sqlx tests every connection given back to its pool with a round trip (`sqlx-core` 0.8.6,
//! `PoolConnection::return_to_pool`; `test_before_acquire(false)` does not cover it). On a loop
//! that takes a connection per write or per read, that is a second round trip and a wake-up of
//! the Postgres backend each time, on the path of every job (docs/write-path.md, "One thread hop
//! and one round trip fewer per write"). A held connection is given back after [`HOLD_FOR`], so
//! the pool's idle and lifetime limits still apply; one whose use failed or was cut off is
//! closed, never reused.

use std::time::{Duration, Instant};

use sqlx::{pool::PoolConnection, PgConnection, PgPool, Postgres};

/// How long a loop keeps one connection before handing it back to the pool.
pub const HOLD_FOR: Duration = Duration::from_secs(60);

/// One loop's connection: taken from `pool` when first needed, kept between uses while
/// holding is allowed.
pub struct HeldConnection {
    pool: PgPool,
    conn: Option<PoolConnection<Postgres>>,
    taken: Instant,
    hold: bool,
}

impl HeldConnection {
    /// `hold`: whether to keep the connection between uses at all. A caller passes false where
    /// holding would leave its pool without a connection for everyone else.
    pub fn new(pool: PgPool, hold: bool) -> Self {
        Self {
            pool,
            conn: None,
            taken: Instant::now(),
            hold,
        }
    }

    /// The connection, taken from the pool if none is held.
    pub async fn get(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        let conn = match self.conn.take() {
            Some(c) => c,
            None => {
                let c = self.pool.acquire().await?;
                self.taken = Instant::now();
                c
            }
        };
        Ok(&mut **self.conn.insert(conn))
    }

    /// The last use failed or was cut off mid-statement: its state is unknown, so it is closed
    /// and the next [`get`](Self::get) takes a fresh one.
    pub fn broke(&mut self) {
        if let Some(mut c) = self.conn.take() {
            c.close_on_drop();
        }
    }

    /// A use ended well: keep the connection, or give it back when holding is off or it was
    /// taken more than [`HOLD_FOR`] ago.
    pub fn done(&mut self) {
        if !self.hold || self.taken.elapsed() > HOLD_FOR {
            self.conn = None;
        }
    }
}
