//! What `capibara-api`, `capibara-worker` and `capibara-scheduler` need before they serve:
//! Postgres (migrated, its stored secrets readable with the installed keys) and Redis.
//!
//! A process started while Postgres restarts or the network to Redis is down waits for them
//! (up to `CAPIBARA_STARTUP_WAIT_S`, a warning per try) instead of exiting at once: the chaos
//! suite found every worker restarted during a database restart crash-looping
//! (docs/reliability.md). What waiting cannot fix (a malformed URL, a failed or unknown
//! migration, a key the stored rows need) still fails at once.

use std::{
    fmt::Display,
    future::Future,
    time::{Duration, Instant},
};

use sqlx::PgPool;
use thiserror::Error;

use crate::{
    config::Config,
    queue::{Queue, QueueError},
    store::{self, sealed::KeyCheckError, StoreError},
};

#[derive(Debug, Error)]
pub enum StartupError {
    #[error("applying migrations: {0}")]
    Migrate(#[source] StoreError),
    #[error(transparent)]
    Keys(#[from] KeyCheckError),
    #[error("connecting to Postgres: {0}")]
    Postgres(#[source] StoreError),
    #[error("connecting to Redis: {0}")]
    Redis(#[source] QueueError),
}

/// Postgres and Redis, ready.
pub struct Backends {
    pub pool: PgPool,
    pub queue: Queue,
}

/// Connects to Postgres and Redis, applies the migrations and checks the secrets keys,
/// retrying what failed because a server did not answer for up to `config.startup_wait`.
pub async fn connect(config: &Config) -> Result<Backends, StartupError> {
    let deadline = Instant::now() + config.startup_wait;
    let pool = store::connect(&config.database_url, config.db_max_connections)
        .await
        .map_err(StartupError::Postgres)?;
    retry(
        "Postgres (migrations)",
        deadline,
        is_store_transient,
        || store::migrate(&pool),
    )
    .await
    .map_err(StartupError::Migrate)?;
    retry(
        "Postgres (secrets keys)",
        deadline,
        |e: &KeyCheckError| matches!(e, KeyCheckError::Store(s) if is_store_transient(s)),
        || store::sealed::check_installed_keys(&pool),
    )
    .await?;
    let queue = retry("Redis", deadline, is_queue_transient, || {
        Queue::connect_sharded(&config.redis_url, &config.redis_prefix, config.redis_shards)
    })
    .await
    .map_err(StartupError::Redis)?;
    Ok(Backends { pool, queue })
}

fn is_store_transient(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(_))
}

fn is_queue_transient(e: &QueueError) -> bool {
    e.is_unreachable()
}

/// Calls `attempt` until it succeeds, fails for good, or `deadline` passes; waits 0.25 s, then
/// twice as long each time up to 2 s.
async fn retry<T, E, F, Fut>(
    what: &str,
    deadline: Instant,
    transient: impl Fn(&E) -> bool,
    mut attempt: F,
) -> Result<T, E>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut wait = Duration::from_millis(250);
    let mut tries = 0u32;
    loop {
        match attempt().await {
            Ok(v) => {
                if tries > 0 {
                    tracing::info!(what, tries, "reachable again; starting");
                }
                return Ok(v);
            }
            Err(e) if transient(&e) && Instant::now() + wait < deadline => {
                tries += 1;
                tracing::warn!(what, error = %e, retry_in_ms = wait.as_millis() as u64,
                    "not reachable at startup; waiting (CAPIBARA_STARTUP_WAIT_S)");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_transient_failure_is_retried_until_it_succeeds() {
        let mut calls = 0;
        let got: Result<u32, String> = retry(
            "x",
            Instant::now() + Duration::from_secs(10),
            |_| true,
            || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 3 {
                        Err("down".to_string())
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(got, Ok(3));
    }

    #[tokio::test]
    async fn a_lasting_failure_or_a_passed_deadline_returns_the_error() {
        let mut calls = 0;
        let got: Result<(), String> = retry(
            "x",
            Instant::now() + Duration::from_secs(10),
            |_| false,
            || {
                calls += 1;
                async { Err("bad url".to_string()) }
            },
        )
        .await;
        assert_eq!((got, calls), (Err("bad url".to_string()), 1));
        let mut calls = 0;
        let got: Result<(), String> = retry(
            "x",
            Instant::now(),
            |_| true,
            || {
                calls += 1;
                async { Err("down".to_string()) }
            },
        )
        .await;
        assert_eq!((got, calls), (Err("down".to_string()), 1));
    }
}
