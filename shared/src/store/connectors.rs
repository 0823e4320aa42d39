//! The `connectors` projection (docs/connectors.md), the content hashes each connector returned
//! (`connector_items`), and [`connector_append`].

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Append, Effect, StoreError};
use crate::domain::{
    connector::{Connector, ConnectorEvent},
    event::EventMetadata,
};

pub const UPSERT_CONNECTORS: &str = "
INSERT INTO connectors SELECT * FROM jsonb_populate_recordset(NULL::connectors, $1)
ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, type = EXCLUDED.type,
    config = EXCLUDED.config, secrets = EXCLUDED.secrets, cursor = EXCLUDED.cursor,
    fetches = EXCLUDED.fetches, items_total = EXCLUDED.items_total,
    last_fetch_at = EXCLUDED.last_fetch_at, last_job_id = EXCLUDED.last_job_id,
    last_error = EXCLUDED.last_error, deleted = EXCLUDED.deleted, version = EXCLUDED.version,
    updated_at = EXCLUDED.updated_at";

/// Record item hashes as returned (they are never returned again).
pub const INSERT_ITEMS: &str = "
INSERT INTO connector_items (connector_id, hash)
SELECT * FROM unnest($1::uuid[], $2::text[]) ON CONFLICT DO NOTHING";

/// The state after `events` and the append that records them (expecting `prev`'s version).
pub fn connector_append(
    prev: Option<&Connector>,
    id: Uuid,
    namespace: &str,
    events: &[ConnectorEvent],
    metadata: EventMetadata,
    at: DateTime<Utc>,
) -> Option<(Connector, Append)> {
    let mut state = prev.cloned();
    let mut hashes = Vec::new();
    for e in events {
        state = Some(Connector::apply(state, id, namespace, e, at)?);
        if let ConnectorEvent::CursorAdvanced { hashes: h, .. } = e {
            hashes.extend(h.iter().cloned());
        }
    }
    let new = state?;
    let mut effects = vec![Effect::UpsertConnector(Box::new(new.clone()))];
    if !hashes.is_empty() {
        effects.push(Effect::ConnectorItems {
            connector_id: id,
            hashes,
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

fn decode(v: Value) -> Result<Connector, StoreError> {
    serde_json::from_value(v)
        .map_err(|e| StoreError::Internal(format!("connectors row does not decode: {e}")))
}

/// The connector's row, deleted or not (what a command loads).
pub async fn get(
    pool: &PgPool,
    namespace: &str,
    id: Uuid,
) -> Result<Option<Connector>, StoreError> {
    let row: Option<(Value,)> =
        sqlx::query_as("SELECT to_jsonb(c) FROM connectors c WHERE id = $1 AND namespace = $2")
            .bind(id)
            .bind(namespace)
            .fetch_optional(pool)
            .await?;
    row.map(|(v,)| decode(v)).transpose()
}

/// The live connectors of `namespace`, oldest first, after `after` (keyset page).
pub async fn list(
    pool: &PgPool,
    namespace: &str,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Connector>, StoreError> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT to_jsonb(c) FROM connectors c WHERE namespace = $1 AND NOT deleted
         AND ($2::uuid IS NULL OR id > $2) ORDER BY id LIMIT $3",
    )
    .bind(namespace)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(v,)| decode(v)).collect()
}

/// Which of `hashes` connector `id` returned before.
pub async fn seen(
    pool: &PgPool,
    id: Uuid,
    hashes: &[String],
) -> Result<HashSet<String>, StoreError> {
    if hashes.is_empty() {
        return Ok(HashSet::new());
    }
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT hash FROM connector_items WHERE connector_id = $1 AND hash = ANY($2)",
    )
    .bind(id)
    .bind(hashes)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(h,)| h).collect())
}

/// Rebuild `connector_items` from the log's `CursorAdvanced` events (after the `connectors`
/// rows); returns the hashes written.
pub async fn rebuild_items(pool: &PgPool) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("LOCK TABLE connector_items IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM connector_items")
        .execute(&mut *tx)
        .await?;
    let done = sqlx::query(
        "INSERT INTO connector_items (connector_id, hash)
         SELECT e.stream_id, h FROM events e, jsonb_array_elements_text(e.data->'hashes') AS h
         WHERE e.stream_type = 'connector' AND e.type = 'CursorAdvanced'
           AND jsonb_typeof(e.data->'hashes') = 'array'
         ON CONFLICT DO NOTHING",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(done.rows_affected())
}
