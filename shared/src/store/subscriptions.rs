//! Subscriptions (configuration rows).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;
use crate::domain::subscription::{Subscription, SubscriptionFilter};

#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    namespace: String,
    url: String,
    events: Vec<String>,
    filter: sqlx::types::Json<SubscriptionFilter>,
    header_names: Vec<String>,
    status: String,
    description: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<Row> for Subscription {
    fn from(r: Row) -> Self {
        Subscription {
            id: r.id,
            namespace: r.namespace,
            url: r.url,
            events: r.events,
            filter: r.filter.0,
            header_names: r.header_names,
            status: r.status,
            description: r.description,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// Header names come from the keys of the `headers` column (values are not read here).
const COLUMNS: &str = "id, namespace, url, events, filter,
    ARRAY(SELECT jsonb_object_keys(headers) ORDER BY 1) AS header_names,
    status, description, created_at, updated_at";

/// Store a new subscription with its signing secret (`whsec_…`) and custom headers (validated,
/// lowercase names; `s.header_names` is ignored).
pub async fn create(
    pool: &PgPool,
    s: &Subscription,
    secret: &str,
    headers: &BTreeMap<String, String>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO subscriptions (id, namespace, url, events, filter, secret, status, description, created_at, updated_at, headers)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(s.id)
    .bind(&s.namespace)
    .bind(&s.url)
    .bind(&s.events)
    .bind(sqlx::types::Json(&s.filter))
    .bind(secret)
    .bind(&s.status)
    .bind(&s.description)
    .bind(s.created_at)
    .bind(s.updated_at)
    .bind(sqlx::types::Json(headers))
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn get(
    pool: &PgPool,
    namespace: &str,
    id: Uuid,
) -> Result<Option<Subscription>, StoreError> {
    let row: Option<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM subscriptions WHERE id = $1 AND namespace = $2"
    ))
    .bind(id)
    .bind(namespace)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(Subscription::from))
}

pub async fn list(pool: &PgPool, namespace: &str) -> Result<Vec<Subscription>, StoreError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM subscriptions WHERE namespace = $1 ORDER BY id"
    ))
    .bind(namespace)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(Subscription::from).collect())
}

/// Every active subscription (the deliverer caches them).
pub async fn active<'c>(db: impl sqlx::PgExecutor<'c>) -> Result<Vec<Subscription>, StoreError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM subscriptions WHERE status = 'active' ORDER BY id"
    ))
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(Subscription::from).collect())
}

/// Save changed fields (url, events, filter, status, description, and the custom headers when
/// `headers` is given: they replace the old ones).
pub async fn update(
    pool: &PgPool,
    s: &Subscription,
    headers: Option<&BTreeMap<String, String>>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE subscriptions SET url = $3, events = $4, filter = $5, status = $6, description = $7, updated_at = $8,
             headers = COALESCE($9, headers)
         WHERE id = $1 AND namespace = $2",
    )
    .bind(s.id)
    .bind(&s.namespace)
    .bind(&s.url)
    .bind(&s.events)
    .bind(sqlx::types::Json(&s.filter))
    .bind(&s.status)
    .bind(&s.description)
    .bind(s.updated_at)
    .bind(headers.map(sqlx::types::Json))
    .execute(pool)
    .await?;
    Ok(())
}

/// Delete; returns whether it existed. Its deliveries stay (with their history).
pub async fn delete(pool: &PgPool, namespace: &str, id: Uuid) -> Result<bool, StoreError> {
    Ok(
        sqlx::query("DELETE FROM subscriptions WHERE id = $1 AND namespace = $2")
            .bind(id)
            .bind(namespace)
            .execute(pool)
            .await?
            .rows_affected()
            > 0,
    )
}

/// What sending a subscription's delivery needs: its signing secret and custom headers.
pub async fn send_settings(
    pool: &PgPool,
    id: Uuid,
) -> Result<Option<(String, BTreeMap<String, String>)>, StoreError> {
    let row: Option<(String, sqlx::types::Json<BTreeMap<String, String>>)> =
        sqlx::query_as("SELECT secret, headers FROM subscriptions WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(s, h)| (s, h.0)))
}
