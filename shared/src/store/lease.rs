//! Leases: while an attempt runs, one worker holds the job until `lease_until`.
//!
//! - **grant**: the append that starts an attempt writes its lease in the same transaction, when
//!   the domain says so ([`crate::domain::job::Follow::GrantLease`], [`Lease::grant`]).
//! - **renew**: the worker's heartbeat moves `lease_until` of all its leases ([`renew`]).
//! - **expire**: the reaper (scheduler housekeeping) ends the attempts whose lease ran out
//!   ([`expired`]) with `worker_lost`.
//! - **release**: the append that ends the attempt deletes the lease
//!   ([`crate::domain::job::Follow::ReleaseLease`]).
//! - **fence**: a lease is not a lock. A worker records its attempt's outcome at the job stream's
//!   version it read when it claimed; an attempt that was reaped or claimed again moved that
//!   version, so the stale worker's write loses the version check and is discarded
//!   (`capibara_results_fenced_total`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::StoreError;
use crate::domain::job::Job;

/// A lease on a running attempt (a row of `leases`).
#[derive(Debug, Clone, Serialize)]
pub struct Lease {
    pub job_id: Uuid,
    pub attempt: i32,
    pub worker_id: String,
    pub namespace: String,
    pub queue: String,
    pub started_at: DateTime<Utc>,
    pub lease_until: DateTime<Utc>,
}

impl Lease {
    /// The lease `worker` holds on `job`'s current attempt, granted at `at` for `term`.
    pub fn grant(
        job: &Job,
        worker: String,
        term: Duration,
        started_at: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Lease {
        Lease {
            job_id: job.id,
            attempt: job.attempt as i32,
            worker_id: worker,
            namespace: job.namespace.clone(),
            queue: job.queue.clone(),
            started_at,
            lease_until: at + chrono::Duration::from_std(term).unwrap_or_default(),
        }
    }
}

/// Grant leases: `$1` is a JSON array of [`Lease`]. Part of the one statement that writes a
/// batch ([`super::batch`]); releasing is a delete by job id.
pub(super) const GRANT: &str = "INSERT INTO leases (job_id, attempt, worker_id, namespace, queue, started_at, lease_until)
    SELECT * FROM jsonb_to_recordset($1) AS l(job_id uuid, attempt int, worker_id text, namespace text,
        queue text, started_at timestamptz, lease_until timestamptz)
    ON CONFLICT (job_id) DO UPDATE SET attempt = EXCLUDED.attempt, worker_id = EXCLUDED.worker_id,
        started_at = EXCLUDED.started_at, lease_until = EXCLUDED.lease_until";

/// Extend every lease `worker` holds to `term` from now. Returns the jobs it still holds, each
/// with whether its cancel was requested.
pub(super) async fn renew(
    tx: &mut Transaction<'_, Postgres>,
    worker: &str,
    term: f64,
) -> Result<Vec<(Uuid, bool)>, sqlx::Error> {
    sqlx::query_as(
        "WITH l AS (UPDATE leases SET lease_until = now() + make_interval(secs => $2)
                    WHERE worker_id = $1 RETURNING job_id)
         SELECT j.id, j.cancel_requested FROM l JOIN jobs j ON j.id = l.job_id",
    )
    .bind(worker)
    .bind(term)
    .fetch_all(&mut **tx)
    .await
}

/// The suffix of a lease's `worker_id` once its worker handed the attempt over to a push
/// endpoint: the worker's heartbeats no longer renew it, the endpoint's do.
pub const DETACHED: &str = "#push";

/// Hand attempt `attempt` of `job_id` over (a push endpoint answered `202`): the lease stays,
/// renewed only by the endpoint's heartbeats from now on.
pub async fn detach(pool: &PgPool, job_id: Uuid, attempt: u32) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE leases SET worker_id = worker_id || $3
         WHERE job_id = $1 AND attempt = $2 AND right(worker_id, length($3)) <> $3",
    )
    .bind(job_id)
    .bind(attempt as i32)
    .bind(DETACHED)
    .execute(pool)
    .await?;
    Ok(())
}

/// Attempts whose lease ran out (their worker died or hung), `(job, attempt)`, oldest first.
pub async fn expired(pool: &PgPool, limit: i64) -> Result<Vec<(Uuid, i32)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT job_id, attempt FROM leases WHERE lease_until < now() ORDER BY lease_until LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
