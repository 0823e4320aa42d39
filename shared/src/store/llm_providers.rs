//! The `llm_providers` projection (docs/llm.md): one row per provider stream, and
//! [`provider_append`].

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Append, Effect, StoreError};
use crate::domain::{
    event::EventMetadata,
    llm::{LlmProvider, ProviderEvent},
};

pub const UPSERT_LLM_PROVIDERS: &str = "
INSERT INTO llm_providers SELECT * FROM jsonb_populate_recordset(NULL::llm_providers, $1)
ON CONFLICT (id) DO UPDATE SET definition = EXCLUDED.definition, deleted = EXCLUDED.deleted,
    version = EXCLUDED.version, updated_at = EXCLUDED.updated_at";

/// The state after `events` and the append that records them (expecting `prev`'s version).
pub fn provider_append(
    prev: Option<&LlmProvider>,
    id: Uuid,
    namespace: &str,
    events: &[ProviderEvent],
    metadata: EventMetadata,
    at: DateTime<Utc>,
) -> Option<(LlmProvider, Append)> {
    let mut state = prev.cloned();
    for e in events {
        state = Some(LlmProvider::apply(state, id, namespace, e, at)?);
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
        vec![Effect::UpsertLlmProvider(Box::new(new.clone()))],
    );
    Some((new, append))
}

fn decode(v: Value) -> Result<LlmProvider, StoreError> {
    serde_json::from_value(v)
        .map_err(|e| StoreError::Internal(format!("llm_providers row does not decode: {e}")))
}

/// The provider's row by stream id, deleted or not (what a command loads).
pub async fn get(
    pool: &PgPool,
    namespace: &str,
    id: Uuid,
) -> Result<Option<LlmProvider>, StoreError> {
    let row: Option<(Value,)> =
        sqlx::query_as("SELECT to_jsonb(p) FROM llm_providers p WHERE id = $1 AND namespace = $2")
            .bind(id)
            .bind(namespace)
            .fetch_optional(pool)
            .await?;
    row.map(|(v,)| decode(v)).transpose()
}

/// The live providers of `namespace`, by name.
pub async fn list(pool: &PgPool, namespace: &str) -> Result<Vec<LlmProvider>, StoreError> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT to_jsonb(p) FROM llm_providers p WHERE namespace = $1 AND NOT deleted
         ORDER BY name LIMIT 1000",
    )
    .bind(namespace)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(v,)| decode(v)).collect()
}
