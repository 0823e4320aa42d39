//! The `workflows` projection and [`workflow_append`].

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Append, Effect, StoreError};
use crate::domain::{
    event::EventMetadata,
    workflow::{Workflow, WorkflowEvent},
};

/// Upsert of whole rows from a JSON array of [`Workflow`]s.
pub const UPSERT_WORKFLOWS: &str = "
INSERT INTO workflows SELECT * FROM jsonb_populate_recordset(NULL::workflows, $1)
ON CONFLICT (id) DO UPDATE SET
    name = EXCLUDED.name, description = EXCLUDED.description, version = EXCLUDED.version,
    versions = EXCLUDED.versions, deleted = EXCLUDED.deleted, stream_version = EXCLUDED.stream_version,
    updated_at = EXCLUDED.updated_at, deleted_at = EXCLUDED.deleted_at";

/// Apply `events` to `prev` (or create from `WorkflowCreated`) and build the append.
pub fn workflow_append(
    prev: Option<&Workflow>,
    id: Uuid,
    events: &[WorkflowEvent],
    metadata: EventMetadata,
    at: DateTime<Utc>,
) -> Option<(Workflow, Append)> {
    let mut state = prev.cloned();
    for e in events {
        state = Some(Workflow::apply(state, id, &metadata.namespace, e, at)?);
    }
    let new = state?;
    let append = Append::of(
        id,
        prev.map(|p| p.stream_version),
        events,
        metadata,
        at,
        vec![Effect::UpsertWorkflow(Box::new(new.clone()))],
    );
    Some((new, append))
}

fn decode(v: Value) -> Result<Workflow, StoreError> {
    serde_json::from_value(v)
        .map_err(|e| StoreError::Internal(format!("workflows row does not decode: {e}")))
}

/// A workflow by id, any namespace, deleted ones included (runs keep their version).
pub async fn get_any(pool: &PgPool, id: Uuid) -> Result<Option<Workflow>, StoreError> {
    let row: Option<(Value,)> = sqlx::query_as("SELECT to_jsonb(w) FROM workflows w WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.map(|(v,)| decode(v)).transpose()
}

/// A live (not deleted) workflow of a namespace.
pub async fn get(pool: &PgPool, namespace: &str, id: Uuid) -> Result<Option<Workflow>, StoreError> {
    Ok(get_any(pool, id)
        .await?
        .filter(|w| w.namespace == namespace && !w.deleted))
}

/// The newest live workflow of that name.
pub async fn find_by_name(
    pool: &PgPool,
    namespace: &str,
    name: &str,
) -> Result<Option<Workflow>, StoreError> {
    let row: Option<(Value,)> = sqlx::query_as(
        "SELECT to_jsonb(w) FROM workflows w WHERE namespace = $1 AND name = $2 AND NOT deleted
         ORDER BY id DESC LIMIT 1",
    )
    .bind(namespace)
    .bind(name)
    .fetch_optional(pool)
    .await?;
    row.map(|(v,)| decode(v)).transpose()
}

/// Live workflows, newest first, below the cursor id.
pub async fn list(
    pool: &PgPool,
    namespace: &str,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Workflow>, StoreError> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT to_jsonb(w) FROM workflows w WHERE namespace = $1 AND NOT deleted
         AND ($2::uuid IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
    )
    .bind(namespace)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(v,)| decode(v)).collect()
}
