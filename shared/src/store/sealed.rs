//! The columns that hold secrets, encrypted at rest with [`crate::crypto`] (docs/security.md,
//! "Secrets encrypted at rest"): `secrets.value`, `trigger_credentials.credential` and
//! `server_secrets.secret`. Each row's `key_id` names the key its value is sealed under; NULL is
//! a row written before encryption (plain text, read as is until [`reencrypt`] rewrites it).
//!
//! Each value is bound to its row: the AAD is the table and the row's key, so a ciphertext copied
//! into another row (another namespace's secret, another trigger) does not open.

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;
use crate::{
    crypto::{aad, CryptoError, Keyring},
    domain::trigger::TriggerCredential,
};

impl From<CryptoError> for StoreError {
    fn from(e: CryptoError) -> Self {
        // The message names a key id at most, never a value.
        StoreError::Internal(format!("secrets at rest: {e}"))
    }
}

pub(crate) fn secret_aad(namespace: &str, name: &str) -> String {
    aad("secrets", &[namespace, name])
}

fn credential_aad(trigger_id: Uuid) -> String {
    aad("trigger_credentials", &[&trigger_id.to_string()])
}

fn server_secret_aad(name: &str) -> String {
    aad("server_secrets", &[name])
}

/// A `secrets.value` as stored: `(value, key_id)`.
pub(crate) fn seal_secret(
    ring: &Keyring,
    namespace: &str,
    name: &str,
    value: &str,
) -> (String, String) {
    (
        ring.seal(&secret_aad(namespace, name), value.as_bytes()),
        ring.current_id().to_string(),
    )
}

/// A `secrets.value` read back.
pub(crate) fn open_secret(
    namespace: &str,
    name: &str,
    value: String,
    key_id: Option<&str>,
) -> Result<String, CryptoError> {
    match key_id {
        None => Ok(value),
        Some(_) => crate::crypto::keyring()?.open_text(&secret_aad(namespace, name), &value),
    }
}

/// A `trigger_credentials.credential` as stored (a JSON string holding the envelope of the
/// credential's JSON) and its key id.
pub(crate) fn seal_credential(
    ring: &Keyring,
    trigger_id: Uuid,
    credential: &TriggerCredential,
) -> (Value, String) {
    let json = serde_json::to_vec(credential).expect("a credential serializes");
    (
        Value::String(ring.seal(&credential_aad(trigger_id), &json)),
        ring.current_id().to_string(),
    )
}

/// A `trigger_credentials.credential` read back: the JSON of the credential.
fn open_credential_json(
    ring: Option<&Keyring>,
    trigger_id: Uuid,
    stored: Value,
    key_id: Option<&str>,
) -> Result<Value, CryptoError> {
    match (key_id, stored) {
        (None, plain) => Ok(plain),
        (Some(_), Value::String(sealed)) => {
            let ring = match ring {
                Some(r) => r,
                None => crate::crypto::keyring()?,
            };
            let json = ring.open(&credential_aad(trigger_id), &sealed)?;
            serde_json::from_slice(&json).map_err(|_| CryptoError::Malformed)
        }
        (Some(_), _) => Err(CryptoError::Malformed),
    }
}

/// The credential a trigger's callers are checked against.
pub async fn trigger_credential(
    pool: &PgPool,
    trigger_id: Uuid,
) -> Result<Option<TriggerCredential>, StoreError> {
    let row: Option<(Value, Option<String>)> =
        sqlx::query_as("SELECT credential, key_id FROM trigger_credentials WHERE trigger_id = $1")
            .bind(trigger_id)
            .fetch_optional(pool)
            .await?;
    let Some((stored, key_id)) = row else {
        return Ok(None);
    };
    let json = open_credential_json(None, trigger_id, stored, key_id.as_deref())?;
    Ok(Some(serde_json::from_value(json).map_err(|e| {
        StoreError::Internal(format!("a stored trigger credential does not parse: {e}"))
    })?))
}

/// A secret every process of the deployment shares (`server_secrets`), created once with
/// `fresh` by the first process that asks, sealed under the current key.
pub async fn server_secret(pool: &PgPool, name: &str, fresh: &[u8]) -> Result<Vec<u8>, StoreError> {
    let ring = crate::crypto::keyring()?;
    let sealed = ring.seal(&server_secret_aad(name), fresh);
    sqlx::query(
        "INSERT INTO server_secrets (name, secret, key_id) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(sealed.as_bytes())
    .bind(ring.current_id())
    .execute(pool)
    .await?;
    let (secret, key_id): (Vec<u8>, Option<String>) =
        sqlx::query_as("SELECT secret, key_id FROM server_secrets WHERE name = $1")
            .bind(name)
            .fetch_one(pool)
            .await?;
    Ok(open_server_secret(ring, name, secret, key_id.as_deref())?)
}

fn open_server_secret(
    ring: &Keyring,
    name: &str,
    stored: Vec<u8>,
    key_id: Option<&str>,
) -> Result<Vec<u8>, CryptoError> {
    match key_id {
        None => Ok(stored),
        Some(_) => {
            let text = String::from_utf8(stored).map_err(|_| CryptoError::Malformed)?;
            ring.open(&server_secret_aad(name), &text)
        }
    }
}

/// Why a process cannot use the stored secrets with its keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyCheckError {
    #[error(
        "CAPIBARA_SECRETS_OLD_KEYS: stored secrets are encrypted with key {0}, which this process \
         does not have: add the key they were written with to CAPIBARA_SECRETS_OLD_KEYS \
         (docs/security.md, \"Key rotation without downtime\")"
    )]
    UnknownKey(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Refuse to start when a stored row uses a key id that `ring` does not hold (every process
/// calls it after migrating, so a missing old key is a startup error, not a failing job later).
pub async fn check_keys(pool: &PgPool, ring: &Keyring) -> Result<(), KeyCheckError> {
    let ids: Vec<(String,)> = sqlx::query_as(
        "SELECT key_id FROM secrets WHERE key_id IS NOT NULL
         UNION SELECT key_id FROM trigger_credentials WHERE key_id IS NOT NULL
         UNION SELECT key_id FROM server_secrets WHERE key_id IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)?;
    match ids.into_iter().find(|(id,)| !ring.knows(id)) {
        Some((id,)) => Err(KeyCheckError::UnknownKey(id)),
        None => Ok(()),
    }
}

/// [`check_keys`] with this process's keyring (after migrating, before serving).
pub async fn check_installed_keys(pool: &PgPool) -> Result<(), KeyCheckError> {
    let ring = crate::crypto::keyring().map_err(StoreError::from)?;
    check_keys(pool, ring).await
}

/// What one [`reencrypt`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reencrypted {
    /// Rows rewritten under the current key (plain-text rows included).
    pub rewritten: u64,
    /// Rows still under another key or plain text (locked by another pass meanwhile).
    pub remaining: u64,
}

/// Rows per transaction of [`reencrypt`].
const BATCH: i64 = 100;

/// Rewrite every secret column not under `ring`'s current key (an old key, or plain text from
/// before encryption) under it, in transactions of [`BATCH`] rows. Rows another pass holds are
/// skipped (`FOR UPDATE SKIP LOCKED`), so replicas can run it at once; it can stop anywhere and
/// resume. A row under a key `ring` does not hold fails the pass, naming the key id.
pub async fn reencrypt(pool: &PgPool, ring: &Keyring) -> Result<Reencrypted, StoreError> {
    let mut rewritten = 0;
    loop {
        let n = reencrypt_secrets(pool, ring).await?
            + reencrypt_credentials(pool, ring).await?
            + reencrypt_server_secrets(pool, ring).await?;
        if n == 0 {
            break;
        }
        rewritten += n;
    }
    let (remaining,): (i64,) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM secrets WHERE key_id IS DISTINCT FROM $1)
              + (SELECT count(*) FROM trigger_credentials WHERE key_id IS DISTINCT FROM $1)
              + (SELECT count(*) FROM server_secrets WHERE key_id IS DISTINCT FROM $1)",
    )
    .bind(ring.current_id())
    .fetch_one(pool)
    .await?;
    Ok(Reencrypted {
        rewritten,
        remaining: remaining as u64,
    })
}

async fn reencrypt_secrets(pool: &PgPool, ring: &Keyring) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT namespace, name, value, key_id FROM secrets WHERE key_id IS DISTINCT FROM $1
         LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(ring.current_id())
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    for (namespace, name, value, key_id) in &rows {
        let plain = match key_id {
            None => value.clone(),
            Some(_) => ring.open_text(&secret_aad(namespace, name), value)?,
        };
        let (sealed, id) = seal_secret(ring, namespace, name, &plain);
        sqlx::query(
            "UPDATE secrets SET value = $3, key_id = $4 WHERE namespace = $1 AND name = $2",
        )
        .bind(namespace)
        .bind(name)
        .bind(sealed)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(rows.len() as u64)
}

async fn reencrypt_credentials(pool: &PgPool, ring: &Keyring) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(Uuid, Value, Option<String>)> = sqlx::query_as(
        "SELECT trigger_id, credential, key_id FROM trigger_credentials WHERE key_id IS DISTINCT FROM $1
         LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(ring.current_id())
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    let n = rows.len() as u64;
    for (trigger_id, stored, key_id) in rows {
        let json = open_credential_json(Some(ring), trigger_id, stored, key_id.as_deref())?;
        let credential: TriggerCredential = serde_json::from_value(json).map_err(|e| {
            StoreError::Internal(format!("a stored trigger credential does not parse: {e}"))
        })?;
        let (sealed, id) = seal_credential(ring, trigger_id, &credential);
        sqlx::query(
            "UPDATE trigger_credentials SET credential = $2, key_id = $3 WHERE trigger_id = $1",
        )
        .bind(trigger_id)
        .bind(sealed)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(n)
}

async fn reencrypt_server_secrets(pool: &PgPool, ring: &Keyring) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(String, Vec<u8>, Option<String>)> = sqlx::query_as(
        "SELECT name, secret, key_id FROM server_secrets WHERE key_id IS DISTINCT FROM $1
         LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(ring.current_id())
    .bind(BATCH)
    .fetch_all(&mut *tx)
    .await?;
    let n = rows.len() as u64;
    for (name, stored, key_id) in rows {
        let plain = open_server_secret(ring, &name, stored, key_id.as_deref())?;
        let sealed = ring.seal(&server_secret_aad(&name), &plain);
        sqlx::query("UPDATE server_secrets SET secret = $2, key_id = $3 WHERE name = $1")
            .bind(&name)
            .bind(sealed.as_bytes())
            .bind(ring.current_id())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(n)
}
