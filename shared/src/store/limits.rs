//! The `limits` and `pauses` projections (docs/flow-control.md), and the appends of their
//! streams.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Append, Effect, StoreError};
use crate::domain::{
    event::EventMetadata,
    limit::{Limit, LimitEvent, PauseEvent, Pauses},
};

pub const UPSERT_LIMITS: &str = "
INSERT INTO limits SELECT * FROM jsonb_populate_recordset(NULL::limits, $1)
ON CONFLICT (id) DO UPDATE SET definition = EXCLUDED.definition, deleted = EXCLUDED.deleted,
    version = EXCLUDED.version, updated_at = EXCLUDED.updated_at";

pub const UPSERT_PAUSES: &str = "
INSERT INTO pauses SELECT * FROM jsonb_populate_recordset(NULL::pauses, $1)
ON CONFLICT (id) DO UPDATE SET paused = EXCLUDED.paused,
    version = EXCLUDED.version, updated_at = EXCLUDED.updated_at";

/// The state after `events` and the append that records them (expecting `prev`'s version).
pub fn limit_append(
    prev: Option<&Limit>,
    id: Uuid,
    namespace: &str,
    events: &[LimitEvent],
    metadata: EventMetadata,
    at: DateTime<Utc>,
) -> Option<(Limit, Append)> {
    let new = fold(prev, events, |s, e| Limit::apply(s, id, namespace, e, at))?;
    let effect = Effect::UpsertLimit(Box::new(new.clone()));
    let version = prev.map(|p| p.version);
    Some((
        new,
        append(id, version, namespace, events, metadata, at, effect),
    ))
}

/// The same for a namespace's pause stream.
pub fn pauses_append(
    prev: Option<&Pauses>,
    id: Uuid,
    namespace: &str,
    events: &[PauseEvent],
    metadata: EventMetadata,
    at: DateTime<Utc>,
) -> Option<(Pauses, Append)> {
    let new = fold(prev, events, |s, e| Pauses::apply(s, id, namespace, e, at))?;
    let effect = Effect::UpsertPauses(Box::new(new.clone()));
    let version = prev.map(|p| p.version);
    Some((
        new,
        append(id, version, namespace, events, metadata, at, effect),
    ))
}

/// `events` folded onto `prev` (`None` when one does not apply).
fn fold<S: Clone, E>(
    prev: Option<&S>,
    events: &[E],
    apply: impl Fn(Option<S>, &E) -> Option<S>,
) -> Option<S> {
    let mut state = prev.cloned();
    for e in events {
        state = Some(apply(state, e)?);
    }
    state
}

fn append<E: crate::domain::DomainEvent>(
    id: Uuid,
    version: Option<i64>,
    namespace: &str,
    events: &[E],
    metadata: EventMetadata,
    at: DateTime<Utc>,
    effect: Effect,
) -> Append {
    let metadata = EventMetadata {
        namespace: namespace.to_string(),
        ..metadata
    };
    Append::of(id, version, events, metadata, at, vec![effect])
}

fn decode<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, StoreError> {
    serde_json::from_value(v)
        .map_err(|e| StoreError::Internal(format!("flow-control row does not decode: {e}")))
}

/// The limit's row by stream id, deleted or not (what a command loads).
pub async fn get(pool: &PgPool, namespace: &str, id: Uuid) -> Result<Option<Limit>, StoreError> {
    let row: Option<(Value,)> =
        sqlx::query_as("SELECT to_jsonb(l) FROM limits l WHERE id = $1 AND namespace = $2")
            .bind(id)
            .bind(namespace)
            .fetch_optional(pool)
            .await?;
    row.map(|(v,)| decode(v)).transpose()
}

/// The live limits of `namespace`, by name.
pub async fn list(pool: &PgPool, namespace: &str) -> Result<Vec<Limit>, StoreError> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT to_jsonb(l) FROM limits l WHERE namespace = $1 AND NOT deleted
         ORDER BY name LIMIT 1000",
    )
    .bind(namespace)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(v,)| decode(v)).collect()
}

/// Every namespace's live limits (what each process dispatches with).
pub async fn all(db: impl sqlx::PgExecutor<'_>) -> Result<Vec<Limit>, StoreError> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT to_jsonb(l) FROM limits l WHERE NOT deleted ORDER BY namespace, name",
    )
    .fetch_all(db)
    .await?;
    rows.into_iter().map(|(v,)| decode(v)).collect()
}

/// A namespace's pauses (`None`: it never paused anything).
pub async fn pauses(pool: &PgPool, namespace: &str) -> Result<Option<Pauses>, StoreError> {
    let row: Option<(Value,)> =
        sqlx::query_as("SELECT to_jsonb(p) FROM pauses p WHERE namespace = $1")
            .bind(namespace)
            .fetch_optional(pool)
            .await?;
    row.map(|(v,)| decode(v)).transpose()
}

/// Every namespace's pauses.
pub async fn all_pauses(db: impl sqlx::PgExecutor<'_>) -> Result<Vec<Pauses>, StoreError> {
    let rows: Vec<(Value,)> = sqlx::query_as("SELECT to_jsonb(p) FROM pauses p")
        .fetch_all(db)
        .await?;
    rows.into_iter().map(|(v,)| decode(v)).collect()
}
