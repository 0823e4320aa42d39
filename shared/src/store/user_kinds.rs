//! The `user_kinds` projection (kinds users define, docs/workers.md) and [`kind_append`].

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Append, Effect, StoreError};
use crate::domain::{
    event::EventMetadata,
    kinds::user::{KindEvent, UserKind},
};

pub const UPSERT_USER_KINDS: &str = "
INSERT INTO user_kinds SELECT * FROM jsonb_populate_recordset(NULL::user_kinds, $1)
ON CONFLICT (id) DO UPDATE SET definition = EXCLUDED.definition, deleted = EXCLUDED.deleted,
    version = EXCLUDED.version, updated_at = EXCLUDED.updated_at";

/// The state after `events` and the append that records them (expecting `prev`'s version).
pub fn kind_append(
    prev: Option<&UserKind>,
    id: Uuid,
    namespace: &str,
    events: &[KindEvent],
    metadata: EventMetadata,
    at: DateTime<Utc>,
) -> Option<(UserKind, Append)> {
    let mut state = prev.cloned();
    for e in events {
        state = Some(UserKind::apply(state, id, namespace, e, at)?);
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
        vec![Effect::UpsertUserKind(Box::new(new.clone()))],
    );
    Some((new, append))
}

fn decode(v: Value) -> Result<UserKind, StoreError> {
    serde_json::from_value(v)
        .map_err(|e| StoreError::Internal(format!("user_kinds row does not decode: {e}")))
}

/// The kind's row by stream id, deleted or not (what a command loads).
pub async fn get(pool: &PgPool, namespace: &str, id: Uuid) -> Result<Option<UserKind>, StoreError> {
    let row: Option<(Value,)> =
        sqlx::query_as("SELECT to_jsonb(k) FROM user_kinds k WHERE id = $1 AND namespace = $2")
            .bind(id)
            .bind(namespace)
            .fetch_optional(pool)
            .await?;
    row.map(|(v,)| decode(v)).transpose()
}

/// The live kinds of `namespace` among `names` (one query).
pub async fn find(
    pool: &PgPool,
    namespace: &str,
    names: &[&str],
) -> Result<Vec<UserKind>, StoreError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT to_jsonb(k) FROM user_kinds k WHERE namespace = $1 AND name = ANY($2) AND NOT deleted",
    )
    .bind(namespace)
    .bind(names)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(v,)| decode(v)).collect()
}

/// The live kinds of `namespace`, by name.
pub async fn list(pool: &PgPool, namespace: &str) -> Result<Vec<UserKind>, StoreError> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT to_jsonb(k) FROM user_kinds k WHERE namespace = $1 AND NOT deleted ORDER BY name LIMIT 1000",
    )
    .bind(namespace)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(v,)| decode(v)).collect()
}

/// Since when a protocol worker counts as live: seen within the visibility timeout, or 60 s
/// (an idle worker's long polls last up to 30 s), whichever is longer.
pub fn live_since(visibility_timeout: std::time::Duration) -> DateTime<Utc> {
    let window = visibility_timeout.max(std::time::Duration::from_secs(60));
    Utc::now() - chrono::Duration::from_std(window).unwrap_or_default()
}

/// How many registered protocol workers of `namespace` declared each kind and were seen since
/// `since` (`GET /v1/kinds`).
pub async fn live_workers(
    pool: &PgPool,
    namespace: &str,
    since: DateTime<Utc>,
) -> Result<std::collections::HashMap<String, i64>, StoreError> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT k, count(*) FROM workers, unnest(kinds) AS k
         WHERE namespace = $1 AND stopped_at IS NULL AND last_heartbeat_at >= $2 GROUP BY k",
    )
    .bind(namespace)
    .bind(since)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Live workers per (namespace, kind) across namespaces, for the `/metrics` gauge; kinds with
/// none are listed with 0. Push kinds are left out: no worker leases them (Capibara calls their
/// endpoint), so a 0 there would only raise a false alert.
pub async fn live_workers_all(
    pool: &PgPool,
    since: DateTime<Utc>,
) -> Result<Vec<(String, String, i64)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT k.namespace, k.name, count(w.id) FROM user_kinds k
         LEFT JOIN workers w ON w.namespace = k.namespace AND k.name = ANY(w.kinds)
             AND w.stopped_at IS NULL AND w.last_heartbeat_at >= $1
         WHERE NOT k.deleted AND k.definition->>'mode' IS DISTINCT FROM 'push'
         GROUP BY k.namespace, k.name",
    )
    .bind(since)
    .fetch_all(pool)
    .await?)
}

/// The live push kinds of every namespace (workers dispatch their jobs to the endpoints).
pub async fn push_kinds(pool: &PgPool) -> Result<Vec<UserKind>, StoreError> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT to_jsonb(k) FROM user_kinds k WHERE NOT deleted AND definition->>'mode' = 'push'
         LIMIT 10000",
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(v,)| decode(v)).collect()
}
