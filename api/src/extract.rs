//! Request extractors whose failures are problem+json: JSON bodies with field paths, `Prefer`,
//! `Idempotency-Key`, and list query strings.

use std::time::Duration;

use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
    http::{header, HeaderMap},
};
use capibara_shared::domain::storable;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// A JSON body: malformed JSON is 400, a wrong field is 422 naming it, too large is 413. A NUL
/// character anywhere (in a key or a string) is 422 naming its path: Postgres cannot store it.
pub struct ApiJson<T> {
    pub value: T,
    /// SHA-256 of the canonical JSON (sorted keys), for idempotency checks.
    pub hash: String,
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|ct| {
                let ct = ct
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                ct == "application/json" || ct.ends_with("+json")
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::UnsupportedMediaType(
                "send the body as JSON with `Content-Type: application/json`".into(),
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge("the request body exceeds the configured limit".into())
            } else {
                ApiError::BadRequest(format!("could not read the body: {e}"))
            }
        })?;
        let raw: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
        if let Some(path) = storable::find_nul(&raw) {
            return Err(storable::nul_error(path).into());
        }
        let hash = hex::encode(Sha256::digest(raw.to_string().as_bytes()));
        let value = serde_path_to_error::deserialize(raw).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            ApiError::field(field, e.into_inner().to_string())
        })?;
        Ok(ApiJson { value, hash })
    }
}

/// `Prefer: wait=N` (RFC 7240), N capped at 60 s.
pub fn prefer_wait(headers: &HeaderMap) -> Result<Option<Duration>, ApiError> {
    for v in headers.get_all("prefer") {
        let Ok(v) = v.to_str() else { continue };
        for pref in v.split(',') {
            let pref = pref.trim();
            if let Some(n) = pref.strip_prefix("wait=") {
                let secs: f64 = n
                    .trim()
                    .parse()
                    .map_err(|_| ApiError::field("Prefer", "wait must be a number of seconds"))?;
                if !(0.0..=60.0).contains(&secs) {
                    return Err(ApiError::field(
                        "Prefer",
                        "wait must be between 0 and 60 seconds",
                    ));
                }
                return Ok(Some(Duration::from_secs_f64(secs)));
            }
        }
    }
    Ok(None)
}

/// `Idempotency-Key` header, 1–255 printable characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => {
            let s = v
                .to_str()
                .map_err(|_| ApiError::field("Idempotency-Key", "must be printable ASCII"))?
                .trim()
                .trim_matches('"');
            if s.is_empty() || s.len() > 255 {
                return Err(ApiError::field(
                    "Idempotency-Key",
                    "must be 1-255 characters",
                ));
            }
            Ok(Some(s.to_string()))
        }
    }
}

/// Query pairs in order (repeated keys kept). A NUL (`%00`) is 422 naming the parameter: the
/// values reach SQL, and Postgres refuses NUL in text.
pub fn query_pairs(raw: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("malformed query string: {e}")))?;
    if let Some((k, _)) = pairs
        .iter()
        .find(|(k, v)| k.contains('\0') || v.contains('\0'))
    {
        return Err(storable::nul_error(k.replace('\0', "\\0")).into());
    }
    Ok(pairs)
}

/// `limit` in 1..=500 (default 50).
pub fn parse_limit(v: Option<&str>) -> Result<i64, ApiError> {
    match v {
        None => Ok(50),
        Some(s) => match s.parse::<i64>() {
            Ok(n) if (1..=500).contains(&n) => Ok(n),
            _ => Err(ApiError::field(
                "limit",
                "must be an integer between 1 and 500",
            )),
        },
    }
}

/// Whether the client asked for server-sent events.
pub fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"))
}

/// A resource id from the path: one that is not a UUID names no resource (404, not 400), so a
/// malformed id answers like an unknown one. `what` names the resource (`job`, `run`, …).
pub fn path_id(id: &str, what: &str) -> Result<uuid::Uuid, ApiError> {
    id.parse()
        .map_err(|_| ApiError::NotFound(format!("no {what} `{id}` (ids are UUIDs)")))
}
