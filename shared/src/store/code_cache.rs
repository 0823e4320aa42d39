//! `code.run`'s result cache (table `code_cache`): lookups and fills by the worker, stats and
//! pruning for `GET /v1/code/cache/stats` and `DELETE /v1/code/cache`.
//!
//! Entries are per namespace (a namespace never sees another's outputs or timings); the
//! worker finds a job's namespace through the `jobs` projection in the same statement.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;

/// The cached output for `key` in `job_id`'s namespace, counting the hit; `None` when absent
/// or expired.
pub async fn hit(pool: &PgPool, job_id: Uuid, key: &str) -> Result<Option<Value>, StoreError> {
    let row: Option<(Value,)> = sqlx::query_as(
        "UPDATE code_cache c SET hits = c.hits + 1, last_hit_at = now()
         FROM jobs j
         WHERE j.id = $1 AND c.namespace = j.namespace AND c.key = $2 AND c.expires_at > now()
         RETURNING c.output",
    )
    .bind(job_id)
    .bind(key)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(v,)| v))
}

/// What the worker stores after a run it executed.
pub struct Fill<'a> {
    pub job_id: Uuid,
    pub key: &'a str,
    pub language: &'a str,
    pub output: &'a Value,
    pub execution_ms: f64,
    pub ttl: Duration,
}

/// Stores (or refreshes an expired) entry for the run's namespace; counts the miss.
pub async fn fill(pool: &PgPool, f: Fill<'_>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO code_cache (namespace, key, language, output, execution_ms, expires_at)
         SELECT namespace, $2, $3, $4, $5, now() + make_interval(secs => $6) FROM jobs WHERE id = $1
         ON CONFLICT (namespace, key) DO UPDATE SET
             output = EXCLUDED.output, execution_ms = EXCLUDED.execution_ms,
             expires_at = EXCLUDED.expires_at, created_at = now(),
             misses = code_cache.misses + 1",
    )
    .bind(f.job_id)
    .bind(f.key)
    .bind(f.language)
    .bind(f.output)
    .bind(f.execution_ms)
    .bind(f.ttl.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(())
}

/// `GET /v1/code/cache/stats`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CacheStats {
    /// Entries not yet expired.
    pub entries: i64,
    /// Runs answered from the cache.
    pub hits: i64,
    /// Runs that executed and filled the cache.
    pub misses: i64,
    /// hits / (hits + misses); 0 when nothing ran yet.
    pub hit_rate: f64,
    /// Mean executor time of the runs that filled the live entries (milliseconds).
    pub avg_execution_time_ms: f64,
}

pub async fn stats(pool: &PgPool, namespace: &str) -> Result<CacheStats, StoreError> {
    let (entries, hits, misses, avg): (i64, i64, i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE expires_at > now()),
                coalesce(sum(hits), 0)::bigint, coalesce(sum(misses), 0)::bigint,
                avg(execution_ms) FILTER (WHERE expires_at > now())
         FROM code_cache WHERE namespace = $1",
    )
    .bind(namespace)
    .fetch_one(pool)
    .await?;
    let total = hits + misses;
    Ok(CacheStats {
        entries,
        hits,
        misses,
        hit_rate: if total == 0 {
            0.0
        } else {
            hits as f64 / total as f64
        },
        avg_execution_time_ms: avg.unwrap_or(0.0),
    })
}

/// Deletes the namespace's entries created more than `older_than` ago (all when `None`), and
/// every expired one; returns how many went.
pub async fn prune(
    pool: &PgPool,
    namespace: &str,
    older_than: Option<Duration>,
) -> Result<u64, StoreError> {
    let r = sqlx::query(
        "DELETE FROM code_cache WHERE namespace = $1
           AND ($2::float8 IS NULL OR created_at <= now() - make_interval(secs => $2)
                OR expires_at <= now())",
    )
    .bind(namespace)
    .bind(older_than.map(|d| d.as_secs_f64()))
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}
