//! Checkpoints of followers of the global log.

use sqlx::PgPool;

use super::{events::LogCursor, StoreError};

/// Where follower `name` stands (the start of the log if it never ran).
pub async fn load(pool: &PgPool, name: &str) -> Result<Option<LogCursor>, StoreError> {
    let row: Option<(String, i64)> =
        sqlx::query_as("SELECT tx_id, position FROM log_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(tx, position)| LogCursor {
        tx_id: tx.parse().unwrap_or(0),
        position,
    }))
}

/// The statement that saves a checkpoint (used inside append transactions and alone).
pub const SAVE: &str = "INSERT INTO log_checkpoints (name, tx_id, position, updated_at) VALUES ($1, $2, $3, now())
     ON CONFLICT (name) DO UPDATE SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position, updated_at = now()";

pub async fn save(pool: &PgPool, name: &str, cursor: LogCursor) -> Result<(), StoreError> {
    sqlx::query(SAVE)
        .bind(name)
        .bind(cursor.tx_id.to_string())
        .bind(cursor.position)
        .execute(pool)
        .await?;
    Ok(())
}
