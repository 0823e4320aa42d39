//! Rebuilding projections from the event log (`capibara admin rebuild-projections`).
//!
//! The fold is the same [`Job::apply`] the appender uses inline, and every timestamp in a row
//! comes from an event's `recorded_at`, so a rebuilt row equals the row written inline.

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{archive, batch::upsert, jobs::UPSERT_JOBS, StoreError};
use crate::artifacts::ArtifactStore;
use crate::domain::{
    job::{Job, JobEvent},
    DomainEvent,
};

/// A row a projection folds: stream id, event type, data, namespace, recorded at.
type SourceRow = (Uuid, String, Value, String, DateTime<Utc>);

/// The archived events of `stream_type` (docs/event-log-retention.md), in (stream, version)
/// order, one archive object in memory at a time: a partition holds whole streams, so they fold
/// before the live ones. Fails when partitions were archived and no artifact store is given.
async fn archived_rows<'a>(
    pool: &PgPool,
    archives: Option<&'a ArtifactStore>,
    stream_type: &'a str,
) -> Result<impl futures::Stream<Item = Result<SourceRow, StoreError>> + 'a, StoreError> {
    let keys = archive::archive_keys(pool).await?;
    if !keys.is_empty() && archives.is_none() {
        return Err(StoreError::Internal(format!(
            "{} event archive objects exist: a rebuild needs the artifact store \
             (CAPIBARA_ARTIFACTS) to replay them",
            keys.len()
        )));
    }
    Ok(futures::stream::iter(keys)
        .then(move |key| async move {
            let store = archives.ok_or(StoreError::NotFound)?;
            archive::read_object(store, &key)
                .await
                .map_err(|e| StoreError::Internal(e.to_string()))
        })
        .map_ok(move |events| {
            futures::stream::iter(
                events
                    .into_iter()
                    .filter(move |e| e.stream_type == stream_type)
                    .map(|e| {
                        let ns = e.metadata["namespace"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string();
                        Ok((e.stream_id, e.event_type, e.data, ns, e.recorded_at))
                    }),
            )
        })
        .try_flatten())
}

/// What a rebuild did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildReport {
    pub events: u64,
    pub jobs: u64,
}

/// Rebuild the `jobs` projection in one transaction (readers see the old rows until commit).
pub async fn rebuild_jobs(
    pool: &PgPool,
    archives: Option<&ArtifactStore>,
) -> Result<RebuildReport, StoreError> {
    let archived = archived_rows(pool, archives, "job").await?;
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE jobs IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM jobs").execute(&mut *tx).await?;
    let mut report = RebuildReport::default();
    let mut rows: Vec<Job> = Vec::new();
    {
        let mut reader = pool.acquire().await?;
        let stream = sqlx::query_as::<_, (Uuid, String, Value, String, DateTime<Utc>)>(
            "SELECT stream_id, type, data, metadata->>'namespace', recorded_at FROM events
             WHERE stream_type = 'job' ORDER BY stream_id, version",
        )
        .fetch(&mut *reader);
        let mut stream = Box::pin(archived.chain(stream.map_err(StoreError::from)));
        let mut current: Option<Job> = None;
        while let Some((stream_id, event_type, data, namespace, at)) = stream.try_next().await? {
            report.events += 1;
            let ev = JobEvent::from_parts(&event_type, data).map_err(|e| {
                StoreError::Internal(format!(
                    "event {event_type} of {stream_id} does not decode: {e}"
                ))
            })?;
            match current.as_mut() {
                Some(j) if j.id == stream_id => j
                    .apply(&ev, at)
                    .map_err(|e| StoreError::Internal(format!("job {stream_id}: {e}")))?,
                _ => {
                    if let Some(done) = current.take().filter(|j| !j.deleted) {
                        rows.push(done);
                    }
                    current = Job::replay(stream_id, &namespace, [(&ev, at)])
                        .map_err(|e| StoreError::Internal(format!("job {stream_id}: {e}")))?;
                }
            }
            if rows.len() >= 500 {
                report.jobs += rows.len() as u64;
                upsert(&mut tx, UPSERT_JOBS, std::mem::take(&mut rows).iter()).await?;
            }
        }
        if let Some(done) = current.take().filter(|j| !j.deleted) {
            rows.push(done);
        }
    }
    if !rows.is_empty() {
        report.jobs += rows.len() as u64;
        upsert(&mut tx, UPSERT_JOBS, rows.iter()).await?;
    }
    tx.commit().await?;
    Ok(report)
}

/// The fold of a projection row: previous row, stream id, namespace, event, recorded at.
type Fold<T, E> = fn(Option<T>, Uuid, &str, &E, DateTime<Utc>) -> Option<T>;

/// Rebuild a projection whose rows fold from one stream type with `apply`.
async fn rebuild_stream<T, E>(
    pool: &PgPool,
    stream_type: &str,
    table: &str,
    sql: &str,
    apply: Fold<T, E>,
    archives: Option<&ArtifactStore>,
) -> Result<(u64, u64), StoreError>
where
    T: serde::Serialize,
    E: serde::de::DeserializeOwned,
{
    let archived = archived_rows(pool, archives, stream_type).await?;
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("LOCK TABLE {table} IN EXCLUSIVE MODE"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("DELETE FROM {table}"))
        .execute(&mut *tx)
        .await?;
    let (mut events, mut written) = (0u64, 0u64);
    let mut rows: Vec<T> = Vec::new();
    {
        let mut reader = pool.acquire().await?;
        let stream = sqlx::query_as::<_, (Uuid, String, Value, String, DateTime<Utc>)>(
            "SELECT stream_id, type, data, metadata->>'namespace', recorded_at FROM events
             WHERE stream_type = $1 ORDER BY stream_id, version",
        )
        .bind(stream_type)
        .fetch(&mut *reader);
        let mut stream = Box::pin(archived.chain(stream.map_err(StoreError::from)));
        let mut current: Option<(Uuid, T)> = None;
        while let Some((stream_id, t, data, namespace, at)) = stream.try_next().await? {
            events += 1;
            let ev: E = serde_json::from_value(serde_json::json!({"type": t, "data": data}))
                .map_err(|e| {
                    StoreError::Internal(format!("{stream_type} event {t} of {stream_id}: {e}"))
                })?;
            let prev = match current.take() {
                Some((id, row)) if id == stream_id => Some(row),
                Some((_, row)) => {
                    rows.push(row);
                    None
                }
                None => None,
            };
            if let Some(next) = apply(prev, stream_id, &namespace, &ev, at) {
                current = Some((stream_id, next));
            }
            if rows.len() >= 500 {
                written += rows.len() as u64;
                upsert(&mut tx, sql, std::mem::take(&mut rows).iter()).await?;
            }
        }
        if let Some((_, row)) = current {
            rows.push(row);
        }
    }
    if !rows.is_empty() {
        written += rows.len() as u64;
        upsert(&mut tx, sql, rows.iter()).await?;
    }
    tx.commit().await?;
    Ok((events, written))
}

/// Everything a full rebuild did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FullRebuild {
    pub events: u64,
    pub jobs: u64,
    pub deliveries: u64,
    pub schedules: u64,
    pub triggers: u64,
    pub workflows: u64,
    pub runs: u64,
    pub user_kinds: u64,
    pub connectors: u64,
    pub models: u64,
    pub llm_providers: u64,
    pub limits: u64,
    pub pauses: u64,
    pub bulk_operations: u64,
}

/// Rebuild every projection: `jobs`, `deliveries`, `schedules`, `triggers`, `workflows`, `runs`,
/// `user_kinds`, `connectors`, `connector_items`, `models`, `llm_providers` and `bulk_operations` (each in its own transaction).
///
/// Events of archived partitions are replayed from `archives` (required once any partition
/// was archived).
pub async fn rebuild_all(
    pool: &PgPool,
    archives: Option<&ArtifactStore>,
) -> Result<FullRebuild, StoreError> {
    use crate::domain::{
        bulk::{BulkEvent, BulkOperation},
        connector::{Connector, ConnectorEvent},
        delivery::{Delivery, DeliveryEvent},
        kinds::user::{KindEvent, UserKind},
        limit::{Limit, LimitEvent, PauseEvent, Pauses},
        llm::{LlmProvider, ProviderEvent},
        model::{ModelEvent, ModelName},
        run::{Run, RunEvent},
        schedule::{Schedule, ScheduleEvent},
        trigger::{Trigger, TriggerEvent},
        workflow::{Workflow, WorkflowEvent},
    };
    let jobs = rebuild_jobs(pool, archives).await?;
    let (de, deliveries) = rebuild_stream::<Delivery, DeliveryEvent>(
        pool,
        "delivery",
        "deliveries",
        super::deliveries::UPSERT_DELIVERIES,
        Delivery::apply,
        archives,
    )
    .await?;
    let (se, schedules) = rebuild_stream::<Schedule, ScheduleEvent>(
        pool,
        "schedule",
        "schedules",
        super::schedules::UPSERT_SCHEDULES,
        Schedule::apply,
        archives,
    )
    .await?;
    let (te, triggers) = rebuild_stream::<Trigger, TriggerEvent>(
        pool,
        "trigger",
        "triggers",
        super::triggers::UPSERT_TRIGGERS,
        Trigger::apply,
        archives,
    )
    .await?;
    let (we, workflows) = rebuild_stream::<Workflow, WorkflowEvent>(
        pool,
        "workflow",
        "workflows",
        super::workflows::UPSERT_WORKFLOWS,
        Workflow::apply,
        archives,
    )
    .await?;
    let (re, runs) = rebuild_stream::<Run, RunEvent>(
        pool,
        "run",
        "runs",
        super::runs::UPSERT_RUNS,
        Run::apply,
        archives,
    )
    .await?;
    let (ke, user_kinds) = rebuild_stream::<UserKind, KindEvent>(
        pool,
        "kind",
        "user_kinds",
        super::user_kinds::UPSERT_USER_KINDS,
        UserKind::apply,
        archives,
    )
    .await?;
    let (ce, connectors) = rebuild_stream::<Connector, ConnectorEvent>(
        pool,
        "connector",
        "connectors",
        super::connectors::UPSERT_CONNECTORS,
        Connector::apply,
        archives,
    )
    .await?;
    super::connectors::rebuild_items(pool).await?;
    let (me, models) = rebuild_stream::<ModelName, ModelEvent>(
        pool,
        "model",
        "models",
        super::models::UPSERT_MODELS,
        ModelName::apply,
        archives,
    )
    .await?;
    let (pe, llm_providers) = rebuild_stream::<LlmProvider, ProviderEvent>(
        pool,
        "llm_provider",
        "llm_providers",
        super::llm_providers::UPSERT_LLM_PROVIDERS,
        LlmProvider::apply,
        archives,
    )
    .await?;
    let (le, limits) = rebuild_stream::<Limit, LimitEvent>(
        pool,
        "limit",
        "limits",
        super::limits::UPSERT_LIMITS,
        Limit::apply,
        archives,
    )
    .await?;
    let (pse, pauses) = rebuild_stream::<Pauses, PauseEvent>(
        pool,
        "pauses",
        "pauses",
        super::limits::UPSERT_PAUSES,
        Pauses::apply,
        archives,
    )
    .await?;
    let (be, bulk_operations) = rebuild_stream::<BulkOperation, BulkEvent>(
        pool,
        "bulk",
        "bulk_operations",
        super::bulk::UPSERT_BULK,
        BulkOperation::apply,
        archives,
    )
    .await?;
    Ok(FullRebuild {
        events: jobs.events + de + se + te + we + re + ke + ce + me + pe + le + pse + be,
        limits,
        pauses,
        bulk_operations,
        models,
        llm_providers,
        user_kinds,
        connectors,
        jobs: jobs.jobs,
        deliveries,
        schedules,
        triggers,
        workflows,
        runs,
    })
}
