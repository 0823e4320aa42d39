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
    /// May create, list and revoke keys of every namespace (docs/security.md).
    pub super_admin: bool,
    pub created_at: DateTime<Utc>,
    /// When the key was revoked (a revoked key authenticates nothing).
    pub revoked_at: Option<DateTime<Utc>>,
    /// Who revoked it: the actor (`key:<id>`, or `cli` for `capibara admin revoke-key`).
    pub revoked_by: Option<String>,
}

/// A key to create.
#[derive(Debug, Clone, Copy)]
pub struct NewKey<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub roles: &'a [Role],
    pub super_admin: bool,
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
pub async fn create(pool: &PgPool, new: NewKey<'_>) -> Result<(ApiKey, String), StoreError> {
    let secret = new_secret();
    let key = insert(pool, new, &secret).await?;
    Ok((key, secret))
}

/// Store a key with a given secret (the dev demo key). Storing a secret that already exists
/// makes that key live again with the given settings.
pub async fn insert(pool: &PgPool, new: NewKey<'_>, secret: &str) -> Result<ApiKey, StoreError> {
    let prefix: String = secret.chars().take(8).collect();
    let role_names: Vec<&str> = new.roles.iter().map(|r| r.as_str()).collect();
    let row: KeyRow = sqlx::query_as(&format!(
        "INSERT INTO api_keys (id, namespace, name, prefix, key_hash, roles, super_admin)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (key_hash) DO UPDATE SET revoked_at = NULL, revoked_by = NULL,
             namespace = $2, name = $3, roles = $6, super_admin = $7
         RETURNING {COLUMNS}"
    ))
    .bind(Uuid::now_v7())
    .bind(new.namespace)
    .bind(new.name)
    .bind(&prefix)
    .bind(hash_secret(secret))
    .bind(&role_names)
    .bind(new.super_admin)
    .fetch_one(pool)
    .await?;
    Ok(row.into())
}

const COLUMNS: &str =
    "id, namespace, name, prefix, roles, super_admin, created_at, revoked_at, revoked_by";

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: Uuid,
    namespace: String,
    name: String,
    prefix: String,
    roles: Vec<String>,
    super_admin: bool,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
    revoked_by: Option<String>,
}

impl From<KeyRow> for ApiKey {
    fn from(r: KeyRow) -> Self {
        ApiKey {
            id: r.id,
            namespace: r.namespace,
            name: r.name,
            prefix: r.prefix,
            roles: r.roles.iter().filter_map(|r| r.parse().ok()).collect(),
            super_admin: r.super_admin,
            created_at: r.created_at,
            revoked_at: r.revoked_at,
            revoked_by: r.revoked_by,
        }
    }
}

/// The live key with this secret.
pub async fn find_by_secret(pool: &PgPool, secret: &str) -> Result<Option<ApiKey>, StoreError> {
    let row: Option<KeyRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL"
    ))
    .bind(hash_secret(secret))
    .fetch_optional(pool)
    .await?;
    Ok(row.map(ApiKey::from))
}

/// Keys of one namespace (`None`: of every namespace), revoked ones included, oldest first.
pub async fn list(pool: &PgPool, namespace: Option<&str>) -> Result<Vec<ApiKey>, StoreError> {
    let rows: Vec<KeyRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM api_keys WHERE $1::text IS NULL OR namespace = $1
         ORDER BY created_at, id"
    ))
    .bind(namespace)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(ApiKey::from).collect())
}

/// One key by id, revoked or not.
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<ApiKey>, StoreError> {
    let row: Option<KeyRow> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(id)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(ApiKey::from))
}

/// Revoke a key, recording when and by whom (`by`: an actor such as `key:<id>`). Revoking a
/// revoked key changes nothing. Returns the key as stored afterwards (None: no such key).
pub async fn revoke(pool: &PgPool, id: Uuid, by: &str) -> Result<Option<ApiKey>, StoreError> {
    sqlx::query(
        "UPDATE api_keys SET revoked_at = now(), revoked_by = $2
         WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .bind(by)
    .execute(pool)
    .await?;
    get(pool, id).await
}
