//! The `models` projection (docs/models.md): one row per model name, and [`model_append`].

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Append, Effect, StoreError};
use crate::domain::{
    event::EventMetadata,
    model::{self, ModelEvent, ModelName, ModelRef, ModelVersion},
};

pub const UPSERT_MODELS: &str = "
INSERT INTO models SELECT * FROM jsonb_populate_recordset(NULL::models, $1)
ON CONFLICT (id) DO UPDATE SET versions = EXCLUDED.versions,
    next_version = EXCLUDED.next_version, version = EXCLUDED.version,
    updated_at = EXCLUDED.updated_at";

/// The state after `events` and the append that records them (expecting `prev`'s version).
pub fn model_append(
    prev: Option<&ModelName>,
    id: Uuid,
    namespace: &str,
    events: &[ModelEvent],
    metadata: EventMetadata,
    at: DateTime<Utc>,
) -> Option<(ModelName, Append)> {
    let mut state = prev.cloned();
    for e in events {
        state = Some(ModelName::apply(state, id, namespace, e, at)?);
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
        vec![Effect::UpsertModel(Box::new(new.clone()))],
    );
    Some((new, append))
}

fn decode(v: Value) -> Result<ModelName, StoreError> {
    serde_json::from_value(v)
        .map_err(|e| StoreError::Internal(format!("models row does not decode: {e}")))
}

/// The row of model name `name` (with no live version, if all were deleted).
pub async fn get_name(
    pool: &PgPool,
    namespace: &str,
    name: &str,
) -> Result<Option<ModelName>, StoreError> {
    get(pool, namespace, model::stream_id(namespace, name)).await
}

/// The row holding the version `reference` names, and that version.
pub async fn resolve(
    pool: &PgPool,
    namespace: &str,
    reference: &ModelRef,
) -> Result<Option<(ModelName, ModelVersion)>, StoreError> {
    let row = match reference {
        ModelRef::Latest(name) | ModelRef::Version(name, _) => {
            get_name(pool, namespace, name).await?
        }
        ModelRef::Id(id) => {
            let row: Option<(Value,)> = sqlx::query_as(
                "SELECT to_jsonb(m) FROM models m WHERE namespace = $1
                 AND versions @> jsonb_build_array(jsonb_build_object('id', $2::text))",
            )
            .bind(namespace)
            .bind(id.to_string())
            .fetch_optional(pool)
            .await?;
            row.map(|(v,)| decode(v)).transpose()?
        }
    };
    Ok(row.and_then(|m| m.find(reference).cloned().map(|v| (m, v))))
}

/// The live versions of `namespace` (of `name` only, when given), newest first.
pub async fn list(
    pool: &PgPool,
    namespace: &str,
    name: Option<&str>,
) -> Result<Vec<ModelVersion>, StoreError> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT to_jsonb(m) FROM models m WHERE namespace = $1
         AND ($2::text IS NULL OR name = $2) ORDER BY name",
    )
    .bind(namespace)
    .bind(name)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::new();
    for (v,) in rows {
        out.extend(decode(v)?.versions);
    }
    out.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then(b.version.cmp(&a.version))
    });
    Ok(out)
}

/// The row of stream `id` (what a command loads).
pub async fn get(
    pool: &PgPool,
    namespace: &str,
    id: Uuid,
) -> Result<Option<ModelName>, StoreError> {
    let row: Option<(Value,)> =
        sqlx::query_as("SELECT to_jsonb(m) FROM models m WHERE id = $1 AND namespace = $2")
            .bind(id)
            .bind(namespace)
            .fetch_optional(pool)
            .await?;
    row.map(|(v,)| decode(v)).transpose()
}
