//! Worker registration and heartbeats (a heartbeat renews the worker's leases: [`super::lease`]).

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;

/// A worker process as registered.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct WorkerInfo {
    pub id: Uuid,
    /// `host-pid-suffix`; unique per process start.
    pub name: String,
    pub host: String,
    pub pid: i32,
    pub queues: Vec<String>,
    pub kinds: Vec<String>,
    pub concurrency: i32,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub last_heartbeat_at: DateTime<Utc>,
    pub stopped_at: Option<DateTime<Utc>>,
    /// `active`, `stopped`, or `lost` (no heartbeat for three lease periods).
    pub status: String,
    /// Attempts holding a lease right now.
    pub running: i64,
}

/// Register a worker process; one that runs user kinds of a `namespace` (the Rust SDK's
/// in-process mode) is listed and counted as a live worker of those kinds there.
pub async fn register(
    pool: &PgPool,
    w: &WorkerInfo,
    namespace: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO workers (id, name, host, pid, queues, kinds, concurrency, version, started_at, last_heartbeat_at, namespace)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10)",
    )
    .bind(w.id)
    .bind(&w.name)
    .bind(&w.host)
    .bind(w.pid)
    .bind(&w.queues)
    .bind(&w.kinds)
    .bind(w.concurrency)
    .bind(&w.version)
    .bind(w.started_at)
    .bind(namespace)
    .execute(pool)
    .await?;
    Ok(())
}

/// Extend the worker's leases and record its heartbeat. Returns the ids of its running jobs whose
/// cancel was requested, and the jobs it holds no lease for any more (fenced off).
pub async fn heartbeat(
    pool: &PgPool,
    worker_id: Uuid,
    worker_name: &str,
    lease_s: f64,
) -> Result<Vec<Uuid>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE workers SET last_heartbeat_at = now() WHERE id = $1")
        .bind(worker_id)
        .execute(&mut *tx)
        .await?;
    let canceled = super::lease::renew(&mut tx, worker_name, lease_s).await?;
    tx.commit().await?;
    Ok(canceled
        .into_iter()
        .filter(|(_, c)| *c)
        .map(|(id, _)| id)
        .collect())
}

/// Mark a worker stopped (graceful shutdown).
pub async fn stopped(pool: &PgPool, worker_id: Uuid) -> Result<(), StoreError> {
    sqlx::query("UPDATE workers SET stopped_at = now() WHERE id = $1")
        .bind(worker_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Workers seen in the last hour (stopped ones included), newest first.
///
/// `running` counts the attempts of namespace `running_in` only (`None`: of every namespace):
/// workers are shared, what they run for other tenants is not the caller's to see.
pub async fn list(
    pool: &PgPool,
    lease_s: f64,
    running_in: Option<&str>,
) -> Result<Vec<WorkerInfo>, StoreError> {
    type Row = (
        Uuid,
        String,
        String,
        i32,
        Vec<String>,
        Vec<String>,
        i32,
        String,
        DateTime<Utc>,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        String,
        i64,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT w.id, w.name, w.host, w.pid, w.queues, w.kinds, w.concurrency, w.version, w.started_at,
                w.last_heartbeat_at, w.stopped_at,
                CASE WHEN w.stopped_at IS NOT NULL THEN 'stopped'
                     WHEN w.last_heartbeat_at < now() - make_interval(secs => $1 * 3) THEN 'lost'
                     ELSE 'active' END,
                (SELECT count(*) FROM leases l
                 WHERE l.worker_id = w.name AND ($2::text IS NULL OR l.namespace = $2))
         FROM workers w
         WHERE w.last_heartbeat_at > now() - interval '1 hour'
             AND ($2::text IS NULL OR w.namespace IS NULL OR w.namespace = $2)
         ORDER BY w.started_at DESC LIMIT 500",
    )
    .bind(lease_s)
    .bind(running_in)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(
                id,
                name,
                host,
                pid,
                queues,
                kinds,
                concurrency,
                version,
                started_at,
                last_heartbeat_at,
                stopped_at,
                status,
                running,
            )| {
                WorkerInfo {
                    id,
                    name,
                    host,
                    pid,
                    queues,
                    kinds,
                    concurrency,
                    version,
                    started_at,
                    last_heartbeat_at,
                    stopped_at,
                    status,
                    running,
                }
            },
        )
        .collect())
}

/// A worker of the HTTP protocol, as its calls need it (docs/workers.md); or a built-in worker
/// whose push call handed an attempt over to an endpoint (`builtin`: it leases nothing).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RemoteWorker {
    pub id: Uuid,
    /// Unique: the `worker` of its attempts' `JobStarted` and leases.
    pub name: String,
    /// The caller's namespace (a built-in worker serves every namespace).
    pub namespace: String,
    pub builtin: bool,
    pub queues: Vec<String>,
    pub kinds: Vec<String>,
    pub stopped_at: Option<DateTime<Utc>>,
}

/// Register a worker of the HTTP protocol in `namespace`.
pub async fn register_remote(
    pool: &PgPool,
    w: &WorkerInfo,
    namespace: &str,
    labels: &serde_json::Value,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO workers (id, name, host, pid, queues, kinds, concurrency, version, started_at,
             last_heartbeat_at, namespace, labels)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11)",
    )
    .bind(w.id)
    .bind(&w.name)
    .bind(&w.host)
    .bind(w.pid)
    .bind(&w.queues)
    .bind(&w.kinds)
    .bind(w.concurrency)
    .bind(&w.version)
    .bind(w.started_at)
    .bind(namespace)
    .bind(labels)
    .execute(pool)
    .await?;
    Ok(())
}

/// A protocol worker of `namespace`.
pub async fn get_remote(
    pool: &PgPool,
    namespace: &str,
    id: Uuid,
) -> Result<Option<RemoteWorker>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, name, coalesce(namespace, $2) AS namespace, namespace IS NULL AS builtin,
                queues, kinds, stopped_at FROM workers
         WHERE id = $1 AND (namespace = $2 OR namespace IS NULL)",
    )
    .bind(id)
    .bind(namespace)
    .fetch_optional(pool)
    .await?)
}

/// Record that a protocol worker is alive (each lease call).
pub async fn seen(pool: &PgPool, id: Uuid) -> Result<(), StoreError> {
    sqlx::query("UPDATE workers SET last_heartbeat_at = now() WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Renew the lease of attempt `attempt` of `job_id` held by `worker` for `term` seconds from
/// now, and mark the worker alive. `None`: it holds no such lease (expired and reaped, or the
/// attempt ended).
pub async fn renew_lease(
    pool: &PgPool,
    worker_id: Uuid,
    worker: &str,
    job_id: Uuid,
    attempt: u32,
    term: f64,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    let row: Option<(DateTime<Utc>,)> = sqlx::query_as(
        "WITH w AS (UPDATE workers SET last_heartbeat_at = now() WHERE id = $5)
         UPDATE leases SET lease_until = now() + make_interval(secs => $4)
         WHERE job_id = $1 AND attempt = $2 AND worker_id IN ($3, $3 || $6) RETURNING lease_until",
    )
    .bind(job_id)
    .bind(attempt as i32)
    .bind(worker)
    .bind(term)
    .bind(worker_id)
    .bind(super::lease::DETACHED)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(t,)| t))
}
