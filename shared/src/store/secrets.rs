//! Secrets referred to by name from workflow templates. Values are stored here only (not in the
//! event log); job inputs carry `${secret:NAME}` references that [`resolve`] replaces on the
//! worker just before an executor runs — only in workflow step jobs, and only for the names the
//! step's template referred to (`Job::secret_refs`). [`Redactor`] keeps resolved values out of
//! whatever the attempt records. Values are encrypted at rest ([`super::sealed`]).

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use super::StoreError;

/// A secret as listed (never with its value).
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct SecretInfo {
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Create or replace; returns whether it was created.
pub async fn put(
    pool: &PgPool,
    namespace: &str,
    name: &str,
    value: &str,
) -> Result<SecretInfo, StoreError> {
    let now = crate::domain::now();
    // Encrypted at rest under the current key, bound to (namespace, name): super::sealed.
    let (sealed, key_id) =
        super::sealed::seal_secret(crate::crypto::keyring()?, namespace, name, value);
    Ok(sqlx::query_as(
        "INSERT INTO secrets (namespace, name, value, key_id, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $5)
         ON CONFLICT (namespace, name) DO UPDATE SET value = EXCLUDED.value, key_id = EXCLUDED.key_id,
             updated_at = EXCLUDED.updated_at
         RETURNING name, created_at, updated_at",
    )
    .bind(namespace)
    .bind(name)
    .bind(sealed)
    .bind(key_id)
    .bind(now)
    .fetch_one(pool)
    .await?)
}

pub async fn list(pool: &PgPool, namespace: &str) -> Result<Vec<SecretInfo>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT name, created_at, updated_at FROM secrets WHERE namespace = $1 ORDER BY name LIMIT 1000",
    )
    .bind(namespace)
    .fetch_all(pool)
    .await?)
}

/// Whether it existed.
pub async fn delete(pool: &PgPool, namespace: &str, name: &str) -> Result<bool, StoreError> {
    Ok(
        sqlx::query("DELETE FROM secrets WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .execute(pool)
            .await?
            .rows_affected()
            == 1,
    )
}

const OPEN: &str = "${secret:";

fn reference(name: &str) -> String {
    crate::domain::template::secret_reference(name)
}

fn names(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(i) = rest.find(OPEN) {
                let after = &rest[i + OPEN.len()..];
                match after.find('}') {
                    Some(end) => {
                        out.insert(after[..end].to_string());
                        rest = &after[end + 1..];
                    }
                    None => break,
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| names(i, out)),
        Value::Object(map) => map.values().for_each(|i| names(i, out)),
        _ => {}
    }
}

fn replace(v: &Value, values: &HashMap<String, String>) -> Value {
    match v {
        Value::String(s) if s.contains(OPEN) => {
            let mut out = s.clone();
            for (name, value) in values {
                out = out.replace(&reference(name), value);
            }
            Value::String(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(|i| replace(i, values)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), replace(v, values)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Why an input's secrets could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("secret `{0}` does not exist")]
    Missing(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An input with its secret references replaced, and the values that went in.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub input: Value,
    /// Every value put into `input`: what the worker removes from anything it records.
    pub redactor: Redactor,
}

/// Removes known secret values from whatever an attempt records (output, errors, progress,
/// streamed chunks), so an executor that echoes its input cannot write a secret into the log.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Non-empty values, longest first (a value containing another is replaced whole).
    values: Vec<String>,
}

/// What a redacted value reads as.
pub const REDACTED: &str = "***";

impl Redactor {
    pub fn new(values: impl IntoIterator<Item = String>) -> Self {
        let mut values: Vec<String> = values.into_iter().filter(|v| !v.is_empty()).collect();
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        Self { values }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// `s` with every known value replaced by [`REDACTED`].
    pub fn text(&self, s: &str) -> String {
        let mut out = s.to_string();
        for v in &self.values {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), REDACTED);
            }
        }
        out
    }

    /// Every string (and object key) of `v` redacted.
    pub fn value(&self, v: &Value) -> Value {
        if self.is_empty() {
            return v.clone();
        }
        match v {
            Value::String(s) => Value::String(self.text(s)),
            Value::Array(items) => Value::Array(items.iter().map(|i| self.value(i)).collect()),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (self.text(k), self.value(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

/// The values of the secrets of `namespace` among `names` (absent names are left out).
pub async fn values(
    pool: &PgPool,
    namespace: &str,
    names: &[String],
) -> Result<HashMap<String, String>, StoreError> {
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT name, value, key_id FROM secrets WHERE namespace = $1 AND name = ANY($2)",
    )
    .bind(namespace)
    .bind(names)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|(name, value, key_id)| {
            let value = super::sealed::open_secret(namespace, &name, value, key_id.as_deref())?;
            Ok((name, value))
        })
        .collect()
}

/// Replace `${secret:NAME}` in `input` for the names in `allowed` (the secrets the step's
/// template referred to) with the namespace's values. References to other names stay literal
/// strings. No query when nothing is allowed or referenced.
pub async fn resolve(
    pool: &PgPool,
    namespace: &str,
    input: &Value,
    allowed: &BTreeSet<String>,
) -> Result<Option<Resolved>, ResolveError> {
    if allowed.is_empty() {
        return Ok(None);
    }
    let mut wanted = BTreeSet::new();
    names(input, &mut wanted);
    wanted.retain(|n| allowed.contains(n));
    if wanted.is_empty() {
        return Ok(None);
    }
    let wanted: Vec<String> = wanted.into_iter().collect();
    let values = values(pool, namespace, &wanted).await?;
    if let Some(missing) = wanted.iter().find(|n| !values.contains_key(*n)) {
        return Err(ResolveError::Missing(missing.clone()));
    }
    Ok(Some(Resolved {
        input: replace(input, &values),
        redactor: Redactor::new(values.into_values()),
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn references_are_found_and_replaced_in_any_string() {
        let input = json!({"auth": format!("Bearer {}", reference("TOKEN")), "list": [reference("A")], "n": 1});
        let mut found = BTreeSet::new();
        names(&input, &mut found);
        assert_eq!(found.into_iter().collect::<Vec<_>>(), vec!["A", "TOKEN"]);
        let values: HashMap<String, String> =
            [("TOKEN".into(), "t0k".into()), ("A".into(), "a".into())].into();
        assert_eq!(
            replace(&input, &values),
            json!({"auth": "Bearer t0k", "list": ["a"], "n": 1})
        );
    }

    #[test]
    fn the_redactor_replaces_values_in_strings_and_keys_longest_first() {
        let r = Redactor::new([
            "s3cr3t".to_string(),
            "s3cr3t-long".to_string(),
            String::new(),
        ]);
        assert_eq!(
            r.value(
                &json!({"error": "unknown language `s3cr3t-long`", "s3cr3t": [1, "x s3cr3t y"]})
            ),
            json!({"error": "unknown language `***`", "***": [1, "x *** y"]})
        );
        assert!(Redactor::new([String::new()]).is_empty());
    }
}
