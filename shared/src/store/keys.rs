//! API keys: secrets are random and high-entropy, so a SHA-256 of the secret is what we store and
//! look up (a slow password hash buys nothing against 190-bit secrets and costs every request).

use chrono::{DateTime, Utc};
use rand::{distr::Alphanumeric, Rng};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;
use crate::domain::auth::Role;

/// A key as the API sees it after authentication.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct ApiKey {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    /// First characters of the secret, to recognise it.
    pub prefix: String,
    pub roles: Vec<Role>,
    pub created_at: DateTime<Utc>,
}

impl ApiKey {
    /// Whether the key may act where `needed` is required.
    pub fn allows(&self, needed: Role) -> bool {
        self.roles.iter().any(|r| r.grants(needed))
    }
}

/// SHA-256 hex of a secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new random secret: `cap_` + 32 alphanumerics.
pub fn new_secret() -> String {
    let body: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    format!("cap_{body}")
}

/// Create a key; returns it and its secret (shown once).
pub async fn create(
    pool: &PgPool,
    namespace: &str,
    name: &str,
    roles: &[Role],
) -> Result<(ApiKey, String), StoreError> {
    let secret = new_secret();
    let key = insert(pool, namespace, name, roles, &secret).await?;
    Ok((key, secret))
}

/// Store a key with a given secret (the bootstrap admin key, the dev demo key).
pub async fn insert(
    pool: &PgPool,
    namespace: &str,
    name: &str,
    roles: &[Role],
    secret: &str,
) -> Result<ApiKey, StoreError> {
    let id = Uuid::now_v7();
    let prefix: String = secret.chars().take(8).collect();
    let role_names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
    let (created_at,): (DateTime<Utc>,) = sqlx::query_as(
        "INSERT INTO api_keys (id, namespace, name, prefix, key_hash, roles) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (key_hash) DO UPDATE SET revoked_at = NULL RETURNING created_at",
    )
    .bind(id)
    .bind(namespace)
    .bind(name)
    .bind(&prefix)
    .bind(hash_secret(secret))
    .bind(&role_names)
    .fetch_one(pool)
    .await?;
    Ok(ApiKey {
        id,
        namespace: namespace.to_string(),
        name: name.to_string(),
        prefix,
        roles: roles.to_vec(),
        created_at,
    })
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: Uuid,
    namespace: String,
    name: String,
    prefix: String,
    roles: Vec<String>,
    created_at: DateTime<Utc>,
}

impl From<KeyRow> for ApiKey {
    fn from(r: KeyRow) -> Self {
        ApiKey {
            id: r.id,
            namespace: r.namespace,
            name: r.name,
            prefix: r.prefix,
            roles: r.roles.iter().filter_map(|r| r.parse().ok()).collect(),
            created_at: r.created_at,
        }
    }
}

/// The live key with this secret.
pub async fn find_by_secret(pool: &PgPool, secret: &str) -> Result<Option<ApiKey>, StoreError> {
    let row: Option<KeyRow> = sqlx::query_as(
        "SELECT id, namespace, name, prefix, roles, created_at FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
    )
    .bind(hash_secret(secret))
    .fetch_optional(pool)
    .await?;
    Ok(row.map(ApiKey::from))
}

/// Keys of a namespace.
pub async fn list(pool: &PgPool, namespace: &str) -> Result<Vec<ApiKey>, StoreError> {
    let rows: Vec<KeyRow> = sqlx::query_as(
        "SELECT id, namespace, name, prefix, roles, created_at FROM api_keys
         WHERE namespace = $1 AND revoked_at IS NULL ORDER BY created_at",
    )
    .bind(namespace)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(ApiKey::from).collect())
}
