//! Memory items (`memory_items`, docs/models.md): texts with their sentence vectors, counted per
//! collection (`memory_collections`), searched by words here and by meaning in the workers.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;

/// A stored item to write.
#[derive(Debug, Clone)]
pub struct NewItem<'a> {
    pub id: Uuid,
    pub namespace: &'a str,
    pub collection: &'a str,
    pub text: &'a str,
    pub tags: &'a [String],
    pub metadata: &'a Value,
    pub embedding: &'a [f32],
}

/// Store `item` (nothing when its id is stored already: a retried write) and count it.
/// Returns whether it was new.
pub async fn insert(pool: &PgPool, item: NewItem<'_>) -> Result<bool, StoreError> {
    let (n,): (i64,) = sqlx::query_as(
        "WITH new AS (
             INSERT INTO memory_items (id, namespace, collection, text, tags, metadata, embedding)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING RETURNING 1),
         counted AS (
             INSERT INTO memory_collections (namespace, collection, items)
             SELECT $2, $3, count(*) FROM new HAVING count(*) > 0
             ON CONFLICT (namespace, collection)
             DO UPDATE SET items = memory_collections.items + EXCLUDED.items RETURNING 1)
         SELECT count(*) FROM new",
    )
    .bind(item.id)
    .bind(item.namespace)
    .bind(item.collection)
    .bind(item.text)
    .bind(item.tags)
    .bind(item.metadata)
    .bind(item.embedding)
    .fetch_one(pool)
    .await?;
    Ok(n > 0)
}

/// Items of a collection (0 when it has none).
pub async fn count(pool: &PgPool, namespace: &str, collection: &str) -> Result<i64, StoreError> {
    let row: Option<(i64,)> = sqlx::query_as(
        "SELECT items FROM memory_collections WHERE namespace = $1 AND collection = $2",
    )
    .bind(namespace)
    .bind(collection)
    .fetch_optional(pool)
    .await?;
    Ok(row.map_or(0, |r| r.0))
}

/// An item's vector and what filters it, for a worker's copy of a collection.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct VectorRow {
    pub seq: i64,
    pub id: Uuid,
    pub tags: Vec<String>,
    pub embedding: Vec<f32>,
}

/// The items of a collection stored after `after` (a `seq`), in `seq` order, at most `limit`.
pub async fn vectors_after(
    pool: &PgPool,
    namespace: &str,
    collection: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<VectorRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT seq, id, tags, embedding FROM memory_items
         WHERE namespace = $1 AND collection = $2 AND seq > $3 ORDER BY seq LIMIT $4",
    )
    .bind(namespace)
    .bind(collection)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// A found item's stored fields.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ItemRow {
    pub id: Uuid,
    pub text: String,
    pub tags: Vec<String>,
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
}

/// The items `ids` of a namespace (in no particular order).
pub async fn items(
    pool: &PgPool,
    namespace: &str,
    ids: &[Uuid],
) -> Result<Vec<ItemRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, text, tags, metadata, created_at FROM memory_items
         WHERE namespace = $1 AND id = ANY($2)",
    )
    .bind(namespace)
    .bind(ids)
    .fetch_all(pool)
    .await?)
}

/// The `limit` items of a collection that best match `query` by words (Postgres full-text
/// search with English stemming, web-search syntax), with every tag of `tags`, best first, with
/// their `ts_rank_cd`.
pub async fn keyword(
    pool: &PgPool,
    namespace: &str,
    collection: &str,
    query: &str,
    tags: &[String],
    limit: i64,
) -> Result<Vec<(Uuid, f32)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, ts_rank_cd(tsv, q) AS rank
         FROM memory_items, websearch_to_tsquery('english', $3) AS q
         WHERE namespace = $1 AND collection = $2 AND tsv @@ q AND tags @> $4
         ORDER BY rank DESC, seq LIMIT $5",
    )
    .bind(namespace)
    .bind(collection)
    .bind(query)
    .bind(tags)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
