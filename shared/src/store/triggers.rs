//! The `triggers` projection, [`trigger_append`] and replay receipts.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Append, Effect, StoreError};
use crate::domain::{
    event::EventMetadata,
    trigger::{Trigger, TriggerCredential, TriggerEvent},
};

pub const UPSERT_TRIGGERS: &str = "
INSERT INTO triggers SELECT * FROM jsonb_populate_recordset(NULL::triggers, $1)
ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, invocations = EXCLUDED.invocations,
    rejections = EXCLUDED.rejections, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at";

pub fn trigger_append(
    prev: Option<&Trigger>,
    id: Uuid,
    namespace: &str,
    events: &[TriggerEvent],
    metadata: EventMetadata,
    at: DateTime<Utc>,
) -> Option<(Trigger, Append)> {
    let mut state = prev.cloned();
    for e in events {
        state = Some(Trigger::apply(state, id, namespace, e, at)?);
    }
    let new = state?;
    let mut effects = vec![Effect::UpsertTrigger(Box::new(new.clone()))];
    if events
        .iter()
        .any(|e| matches!(e, TriggerEvent::TriggerDeleted {}))
    {
        // The credential goes with the trigger.
        effects.push(Effect::TriggerCredential {
            trigger_id: id,
            namespace: namespace.to_string(),
            credential: None,
        });
    }
    let append = Append::of(
        id,
        prev.map(|p| p.version),
        events,
        EventMetadata {
            namespace: namespace.to_string(),
            ..metadata
        },
        at,
        effects,
    );
    Some((new, append))
}

fn decode(v: Value) -> Result<Trigger, StoreError> {
    serde_json::from_value(v)
        .map_err(|e| StoreError::Internal(format!("triggers row does not decode: {e}")))
}

/// A live trigger, any namespace (the hook endpoint).
pub async fn get_any(pool: &PgPool, id: Uuid) -> Result<Option<Trigger>, StoreError> {
    let row: Option<(Value,)> =
        sqlx::query_as("SELECT to_jsonb(t) FROM triggers t WHERE id = $1 AND status = 'active'")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    row.map(|(v,)| decode(v)).transpose()
}

pub async fn get(pool: &PgPool, namespace: &str, id: Uuid) -> Result<Option<Trigger>, StoreError> {
    Ok(get_any(pool, id)
        .await?
        .filter(|t| t.namespace == namespace))
}

pub async fn list(pool: &PgPool, namespace: &str) -> Result<Vec<Trigger>, StoreError> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT to_jsonb(t) FROM triggers t WHERE namespace = $1 AND status = 'active' ORDER BY id LIMIT 1000",
    )
    .bind(namespace)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(v,)| decode(v)).collect()
}

/// Whether a Standard Webhooks message id was already accepted (a replay). The receipt itself is
/// written with the job the call starts ([`super::append::Effect::Receipt`]).
pub async fn received(
    pool: &PgPool,
    trigger_id: Uuid,
    message_id: &str,
) -> Result<bool, StoreError> {
    let row: Option<(i32,)> =
        sqlx::query_as("SELECT 1 FROM trigger_receipts WHERE trigger_id = $1 AND message_id = $2")
            .bind(trigger_id)
            .bind(message_id)
            .fetch_optional(pool)
            .await?;
    Ok(row.is_some())
}

/// The credential a trigger's callers are checked against (decrypted: [`super::sealed`]).
pub async fn credential(
    pool: &PgPool,
    trigger_id: Uuid,
) -> Result<Option<TriggerCredential>, StoreError> {
    super::sealed::trigger_credential(pool, trigger_id).await
}
