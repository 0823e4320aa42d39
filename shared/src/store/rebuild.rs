//! Rebuilding projections from the event log (`capibara admin rebuild-projections`).
//!
//! The fold is the same [`Job::apply`] the appender uses inline, and every timestamp in a row
//! comes from an event's `recorded_at`, so a rebuilt row equals the row written inline.

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{jobs::UPSERT_JOBS, StoreError};
use crate::domain::job::{Job, JobEvent};

/// What a rebuild did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RebuildReport {
    pub events: u64,
    pub jobs: u64,
}

/// Rebuild the `jobs` projection in one transaction (readers see the old rows until commit).
pub async fn rebuild_jobs(pool: &PgPool) -> Result<RebuildReport, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE jobs IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM jobs").execute(&mut *tx).await?;
    let mut report = RebuildReport::default();
    let mut rows: Vec<Job> = Vec::new();
    {
        let mut reader = pool.acquire().await?;
        let mut stream = sqlx::query_as::<_, (Uuid, String, Value, String, DateTime<Utc>)>(
            "SELECT stream_id, type, data, metadata->>'namespace', recorded_at FROM events
             WHERE stream_type = 'job' ORDER BY stream_id, version",
        )
        .fetch(&mut *reader);
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
                    if let Some(done) = current.take() {
                        rows.push(done);
                    }
                    current = Job::replay(stream_id, &namespace, [(&ev, at)])
                        .map_err(|e| StoreError::Internal(format!("job {stream_id}: {e}")))?;
                }
            }
            if rows.len() >= 500 {
                report.jobs += rows.len() as u64;
                let batch =
                    serde_json::to_value(std::mem::take(&mut rows)).expect("jobs serialize");
                sqlx::query(UPSERT_JOBS)
                    .bind(batch)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        if let Some(done) = current.take() {
            rows.push(done);
        }
    }
    if !rows.is_empty() {
        report.jobs += rows.len() as u64;
        let batch = serde_json::to_value(rows).expect("jobs serialize");
        sqlx::query(UPSERT_JOBS)
            .bind(batch)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(report)
}
