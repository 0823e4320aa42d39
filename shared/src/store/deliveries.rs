//! The `deliveries` projection, and [`delivery_append`] which turns delivery events into an
//! [`Append`].

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Append, Effect, StoreError};
use crate::domain::{
    delivery::{Delivery, DeliveryEvent, DeliveryStatus},
    event::{EventEnvelope, EventMetadata},
};

/// Upsert of whole rows from a JSON array of [`Delivery`]s.
pub const UPSERT_DELIVERIES: &str = "
INSERT INTO deliveries SELECT * FROM jsonb_populate_recordset(NULL::deliveries, $1)
ON CONFLICT (id) DO UPDATE SET
    status = EXCLUDED.status, attempts = EXCLUDED.attempts, last_status_code = EXCLUDED.last_status_code,
    last_error = EXCLUDED.last_error, delivery_job_id = EXCLUDED.delivery_job_id,
    version = EXCLUDED.version, updated_at = EXCLUDED.updated_at, delivered_at = EXCLUDED.delivered_at";

/// Apply `events` to `prev` (or create from `DeliveryCreated`) and build the append.
pub fn delivery_append(
    prev: Option<&Delivery>,
    id: Uuid,
    namespace: &str,
    events: &[DeliveryEvent],
    metadata: EventMetadata,
    at: DateTime<Utc>,
) -> Option<(Delivery, Append)> {
    let mut state = prev.cloned();
    for e in events {
        state = Some(Delivery::apply(state, id, namespace, e, at)?);
    }
    let new = state?;
    let append = Append::of(
        id,
        prev.map(|p| p.version),
        events,
        EventMetadata {
            namespace: namespace.to_string(),
            ..metadata
        },
        at,
        vec![Effect::UpsertDelivery(Box::new(new.clone()))],
    );
    Some((new, append))
}

fn decode(v: Value) -> Result<Delivery, StoreError> {
    serde_json::from_value(v)
        .map_err(|e| StoreError::Internal(format!("deliveries row does not decode: {e}")))
}

/// One delivery of a namespace.
pub async fn get(pool: &PgPool, namespace: &str, id: Uuid) -> Result<Option<Delivery>, StoreError> {
    let row: Option<(Value,)> =
        sqlx::query_as("SELECT to_jsonb(d) FROM deliveries d WHERE id = $1 AND namespace = $2")
            .bind(id)
            .bind(namespace)
            .fetch_optional(pool)
            .await?;
    row.map(|(v,)| decode(v)).transpose()
}

/// One delivery, any namespace (workers).
pub async fn get_any(pool: &PgPool, id: Uuid) -> Result<Option<Delivery>, StoreError> {
    let row: Option<(Value,)> =
        sqlx::query_as("SELECT to_jsonb(d) FROM deliveries d WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    row.map(|(v,)| decode(v)).transpose()
}

/// Filters of `GET /v1/deliveries`.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub job_id: Option<Uuid>,
    pub subscription_id: Option<Uuid>,
    pub status: Option<DeliveryStatus>,
    pub before: Option<Uuid>,
}

/// Newest first.
pub async fn list(
    pool: &PgPool,
    namespace: &str,
    f: &DeliveryFilter,
    limit: i64,
) -> Result<Vec<Delivery>, StoreError> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT to_jsonb(d) FROM deliveries d
         WHERE namespace = $1
           AND ($2::uuid IS NULL OR job_id = $2)
           AND ($3::uuid IS NULL OR subscription_id = $3)
           AND ($4::text IS NULL OR status = $4)
           AND ($5::uuid IS NULL OR id < $5)
         ORDER BY id DESC LIMIT $6",
    )
    .bind(namespace)
    .bind(f.job_id)
    .bind(f.subscription_id)
    .bind(f.status.map(|s| s.as_str()))
    .bind(f.before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(v,)| decode(v)).collect()
}

/// The attempts of a delivery (`DeliveryAttempted` events), in order.
pub async fn attempts(pool: &PgPool, id: Uuid) -> Result<Vec<EventEnvelope>, StoreError> {
    Ok(super::events::read_stream(pool, id, 0, 10_000)
        .await?
        .into_iter()
        .filter(|e| e.event_type == "DeliveryAttempted")
        .collect())
}

/// (target, job) pairs among `job_ids` that have a delivery not yet finished.
pub async fn open_keys(pool: &PgPool, job_ids: &[Uuid]) -> Result<Vec<(String, Uuid)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT DISTINCT target, job_id FROM deliveries
         WHERE job_id = ANY($1) AND status IN ('waiting', 'pending')",
    )
    .bind(job_ids)
    .fetch_all(pool)
    .await?)
}

/// Waiting deliveries whose every earlier delivery (same target and job) is finished: they can
/// be sent now. Oldest first.
pub async fn releasable(pool: &PgPool, limit: i64) -> Result<Vec<Delivery>, StoreError> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT to_jsonb(d) FROM deliveries d
         WHERE d.status = 'waiting'
           AND NOT EXISTS (SELECT 1 FROM deliveries e
                           WHERE e.target = d.target AND e.job_id IS NOT DISTINCT FROM d.job_id
                             AND e.source_position < d.source_position
                             AND e.status IN ('waiting', 'pending'))
         ORDER BY d.source_position LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(v,)| decode(v)).collect()
}
