//! The backlog bound: how many jobs may wait for a worker before new work is refused.
//!
//! While Redis is unreachable or full, submissions are still accepted into Postgres (the
//! dispatch outbox) and dispatched when Redis recovers. That must not grow without end: past
//! `CAPIBARA_MAX_BACKLOG` waiting jobs, requests that would create new work are refused with
//! 503 and `Retry-After` — told "not accepted", never accepted and lost. Work already accepted
//! (retries, workflow steps, schedule occurrences that fall due) is never refused.
//!
//! Counting on every request would cost a scan per submission, so a process counts at most
//! once a second, in the background, when a request asks and the last count is older (an
//! idle process costs Postgres nothing); a count never scans more than `limit + 1` rows, and
//! what the process admits in between is added to it. The bound is soft only by what other
//! processes admit within a second, and by the first admissions after an idle spell, which
//! are judged on the last count.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc, Mutex,
};
use std::time::{Duration, Instant};

use sqlx::PgPool;

/// How often the count is refreshed.
const REFRESH: Duration = Duration::from_secs(1);

/// A refused admission: `waiting` jobs wait, the bound is `limit`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{waiting} jobs are waiting for a worker, at the backlog bound of {limit}; retry later")]
pub struct BacklogFull {
    pub waiting: u64,
    pub limit: u64,
}

/// The gate; cheap to clone.
#[derive(Clone, Default)]
pub struct Backlog {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// 0: no bound.
    limit: u64,
    waiting: AtomicU64,
    /// Admitted since the running (or last) count started: the count may not see them yet.
    admitted_since_count: AtomicU64,
    pool: Option<PgPool>,
    /// When the last count started (none yet: `None`).
    counted_at: Mutex<Option<Instant>>,
}

impl Backlog {
    /// No bound at all.
    pub fn unbounded() -> Backlog {
        Backlog::default()
    }

    /// A bound of `limit` waiting jobs (`None` or 0: none), counted on `pool`.
    pub fn new(pool: PgPool, limit: Option<u64>) -> Backlog {
        Backlog {
            inner: Arc::new(Inner {
                limit: limit.unwrap_or(0),
                waiting: AtomicU64::new(0),
                admitted_since_count: AtomicU64::new(0),
                pool: Some(pool),
                counted_at: Mutex::new(None),
            }),
        }
    }

    /// Start a count in the background unless one started less than [`REFRESH`] ago.
    fn refresh_if_stale(&self) {
        let Some(pool) = self.inner.pool.clone() else {
            return;
        };
        {
            let mut at = self
                .inner
                .counted_at
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if at.is_some_and(|t| t.elapsed() < REFRESH) {
                return;
            }
            *at = Some(Instant::now());
            self.inner.admitted_since_count.store(0, Ordering::Relaxed);
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            match count(&pool, inner.limit).await {
                // What was admitted while counting may be missing from `n` (or not: then it is
                // counted twice until the next count, erring on the side of the bound).
                Ok(n) => inner.waiting.store(
                    n + inner.admitted_since_count.load(Ordering::Relaxed),
                    Ordering::Relaxed,
                ),
                // Postgres down: submissions fail on their own; keep the last count.
                Err(e) => tracing::debug!(error = %e, "counting the backlog failed"),
            }
        });
    }

    /// Whether `n` more jobs may be accepted now.
    pub fn admit(&self, n: u64) -> Result<(), BacklogFull> {
        let limit = self.inner.limit;
        if limit == 0 {
            return Ok(());
        }
        self.refresh_if_stale();
        let waiting = self.inner.waiting.load(Ordering::Relaxed);
        if waiting.saturating_add(n) > limit {
            metrics::counter!("capibara_backlog_refused_total").increment(n);
            return Err(BacklogFull { waiting, limit });
        }
        // Count what this process lets in until the next count replaces the figure.
        self.inner.waiting.fetch_add(n, Ordering::Relaxed);
        self.inner
            .admitted_since_count
            .fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// The suggested wait before a refused request is retried.
    pub fn retry_after(&self) -> Duration {
        Duration::from_secs(5)
    }
}

/// Jobs waiting for a worker (outbox rows), counting no further than `limit + 1`.
async fn count(pool: &PgPool, limit: u64) -> Result<u64, sqlx::Error> {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM (SELECT 1 FROM dispatch LIMIT $1) d")
        .bind(limit.saturating_add(1).min(i64::MAX as u64) as i64)
        .fetch_one(pool)
        .await?;
    Ok(n.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unbounded_admits_anything_and_a_full_backlog_refuses() {
        assert_eq!(Backlog::unbounded().admit(u64::MAX), Ok(()));
        let b = Backlog {
            inner: Arc::new(Inner {
                limit: 10,
                waiting: AtomicU64::new(8),
                ..Inner::default()
            }),
        };
        assert_eq!(
            b.admit(3),
            Err(BacklogFull {
                waiting: 8,
                limit: 10
            })
        );
        assert_eq!(b.admit(2), Ok(()));
        assert_eq!(
            b.admit(1),
            Err(BacklogFull {
                waiting: 10,
                limit: 10
            }),
            "what was admitted counts before the next count"
        );
    }
}
