//! Recorded commands, looked up for `Idempotency-Key` replays.

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;

/// A command as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredCommand {
    pub id: Uuid,
    #[sqlx(rename = "type")]
    pub command_type: String,
    pub request_hash: String,
    pub status_code: i32,
    pub response: Option<Value>,
    pub stream_id: Option<Uuid>,
}

/// The command recorded under `key` in `namespace`, if any.
pub async fn find_by_key(
    pool: &PgPool,
    namespace: &str,
    key: &str,
) -> Result<Option<StoredCommand>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, type, request_hash, status_code, response, stream_id FROM commands
         WHERE namespace = $1 AND idempotency_key = $2",
    )
    .bind(namespace)
    .bind(key)
    .fetch_optional(pool)
    .await?)
}

/// Forget the command under `key` if it is older than `max_age_s` (content-hash keys that
/// deduplicate only within a window).
pub async fn expire_key(
    pool: &PgPool,
    namespace: &str,
    key: &str,
    max_age_s: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "DELETE FROM commands WHERE namespace = $1 AND idempotency_key = $2
           AND received_at < now() - make_interval(secs => $3::float8)",
    )
    .bind(namespace)
    .bind(key)
    .bind(max_age_s)
    .execute(pool)
    .await?;
    Ok(())
}
