//! Values Postgres refuses permanently, found before they reach a write.
//!
//! Postgres cannot store a NUL character in `text` or `jsonb` (`\u0000` in JSON text is refused
//! with `22P05`), and Capibara's timestamps travel through JSON (`jsonb_to_recordset`), where
//! chrono writes years past 9999 as `+10000-…` and years before 1 as negative numbers — text
//! Postgres does not parse. Such a value fails every write it is part of, forever; left to reach
//! a shared writer it takes the other writes of that batch down with it (docs/security.md,
//! "Poison values and write isolation"). The API refuses them at the edge (422 naming the
//! field), the worker ends an attempt whose output holds them, and the appender refuses an
//! append that carries them before it joins a batch.

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use serde_json::Value;

use super::FieldError;

/// Longest key shown in a path (keys are the client's text; a path must stay short).
const MAX_KEY_IN_PATH: usize = 64;

/// The earliest time Capibara stores: `0001-01-01T00:00:00Z` (RFC 3339 has four-digit years;
/// Postgres has no year 0).
pub fn min_time() -> DateTime<Utc> {
    Utc.from_utc_datetime(
        &NaiveDate::from_ymd_opt(1, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .expect("valid date"),
    )
}

/// The latest time Capibara stores: `9999-12-31T23:59:59.999999Z`.
pub fn max_time() -> DateTime<Utc> {
    Utc.from_utc_datetime(
        &NaiveDate::from_ymd_opt(9999, 12, 31)
            .and_then(|d| d.and_hms_micro_opt(23, 59, 59, 999_999))
            .expect("valid date"),
    )
}

/// Whether `t` lies in the storable range ([`min_time`] ..= [`max_time`]).
pub fn time_ok(t: DateTime<Utc>) -> bool {
    (min_time()..=max_time()).contains(&t)
}

/// A time outside the storable range, as a field error.
pub fn check_time(field: &str, t: DateTime<Utc>) -> Result<(), FieldError> {
    if time_ok(t) {
        Ok(())
    } else {
        Err(FieldError::new(field, TIME_RANGE))
    }
}

const TIME_RANGE: &str =
    "must be between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999Z (UTC)";

/// Where the first NUL character is in `v` (in a key or a string, at any depth): `""` for `v`
/// itself, else a path like `a[2].b`. A key that holds the NUL is shown with it as `\0`.
pub fn find_nul(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => s.contains('\0').then(String::new),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, x)| find_nul(x).map(|rest| join(&format!("[{i}]"), &rest))),
        Value::Object(map) => map.iter().find_map(|(k, x)| {
            if k.contains('\0') {
                Some(key_segment(k))
            } else {
                find_nul(x).map(|rest| join(&key_segment(k), &rest))
            }
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => None,
    }
}

/// A NUL in `v` as a field error naming its path under `field` (`input` + `a[2]` =
/// `input.a[2]`).
pub fn check_json(field: &str, v: &Value) -> Result<(), FieldError> {
    match find_nul(v) {
        None => Ok(()),
        Some(path) => Err(nul_error(path).under_nonempty(field)),
    }
}

/// A NUL in a plain string as a field error.
pub fn check_text(field: &str, s: &str) -> Result<(), FieldError> {
    if s.contains('\0') {
        Err(FieldError::new(field, NUL))
    } else {
        Ok(())
    }
}

/// The error for a NUL found at `path`.
pub fn nul_error(path: String) -> FieldError {
    FieldError::new(path, NUL)
}

const NUL: &str = "contains a NUL character (\\u0000), which cannot be stored";

fn key_segment(k: &str) -> String {
    let mut s: String = k.chars().take(MAX_KEY_IN_PATH).collect();
    if s.len() < k.len() {
        s.push('…');
    }
    s.replace('\0', "\\0")
}

fn join(head: &str, rest: &str) -> String {
    if rest.is_empty() {
        head.to_string()
    } else if rest.starts_with('[') {
        format!("{head}{rest}")
    } else {
        format!("{head}.{rest}")
    }
}

impl FieldError {
    /// Like [`FieldError::under`], but an empty prefix leaves the error as it is.
    fn under_nonempty(self, prefix: &str) -> Self {
        if prefix.is_empty() {
            self
        } else {
            self.under(prefix)
        }
    }
}

/// `#[serde(deserialize_with = …)]` for request times: a time outside the storable range is a
/// deserialization error, which the API's JSON extractor turns into a 422 naming the field.
pub mod serde_time {
    use chrono::{DateTime, Utc};
    use serde::{de::Error, Deserialize, Deserializer};

    pub fn required<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let t = DateTime::<Utc>::deserialize(d)?;
        if super::time_ok(t) {
            Ok(t)
        } else {
            Err(D::Error::custom(super::TIME_RANGE))
        }
    }

    pub fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        match Option::<DateTime<Utc>>::deserialize(d)? {
            Some(t) if !super::time_ok(t) => Err(D::Error::custom(super::TIME_RANGE)),
            t => Ok(t),
        }
    }
}
