//! Authentication (bearer API keys, cached briefly), roles and per-key rate limiting.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{extract::FromRequestParts, http::request::Parts};
use capibara_shared::{
    domain::auth::Role,
    store::keys::{self, ApiKey},
};
use uuid::Uuid;

use crate::{error::ApiError, AppState};

/// The caller of a request.
#[derive(Debug, Clone)]
pub struct Auth {
    pub key: ApiKey,
}

impl Auth {
    pub fn namespace(&self) -> &str {
        &self.key.namespace
    }

    /// `key:<id>`, recorded as the actor of events.
    pub fn actor(&self) -> String {
        format!("key:{}", self.key.id)
    }

    /// Fail with 403 unless the key holds `role` (or a higher one).
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.key.allows(role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this API key lacks the `{role}` role"
            )))
        }
    }
}

/// A cached lookup: the key (or its absence) and when it was read.
type CachedKey = (Option<ApiKey>, Instant);

/// Looked-up keys by secret hash, for a few seconds (revocations apply within the TTL).
#[derive(Clone, Default)]
pub struct KeyCache {
    entries: Arc<Mutex<HashMap<String, CachedKey>>>,
    admin: Option<(String, ApiKey)>,
}

const KEY_TTL: Duration = Duration::from_secs(10);

impl KeyCache {
    /// `admin_secret` is `CAPIBARA_ADMIN_KEY`: an admin of namespace `default`, never stored.
    pub fn new(admin_secret: Option<&str>) -> Self {
        let admin = admin_secret.map(|s| {
            (
                keys::hash_secret(s),
                ApiKey {
                    id: Uuid::nil(),
                    namespace: "default".into(),
                    name: "bootstrap admin (CAPIBARA_ADMIN_KEY)".into(),
                    prefix: s.chars().take(8).collect(),
                    roles: vec![Role::Admin],
                    created_at: chrono::DateTime::UNIX_EPOCH,
                },
            )
        });
        Self {
            entries: Arc::default(),
            admin,
        }
    }

    async fn lookup(&self, state: &AppState, secret: &str) -> Result<Option<ApiKey>, ApiError> {
        let hash = keys::hash_secret(secret);
        if let Some((h, key)) = &self.admin {
            if *h == hash {
                return Ok(Some(key.clone()));
            }
        }
        if let Some((key, at)) = self.entries.lock().expect("cache lock").get(&hash) {
            if at.elapsed() < KEY_TTL {
                return Ok(key.clone());
            }
        }
        let key = keys::find_by_secret(&state.store.pool, secret).await?;
        let mut map = self.entries.lock().expect("cache lock");
        if map.len() > 10_000 {
            map.clear();
        }
        map.insert(hash, (key.clone(), Instant::now()));
        Ok(key)
    }
}

/// Token bucket per key: `rps` per second, bursts up to 2×.
#[derive(Clone)]
pub struct RateLimiter {
    rps: f64,
    buckets: Arc<Mutex<HashMap<Uuid, (f64, Instant)>>>,
}

impl RateLimiter {
    pub fn new(rps: u32) -> Self {
        Self {
            rps: rps.max(1) as f64,
            buckets: Arc::default(),
        }
    }

    /// Take a token or say how long until one is available.
    pub fn check(&self, key: Uuid) -> Result<(), Duration> {
        let burst = self.rps * 2.0;
        let now = Instant::now();
        let mut map = self.buckets.lock().expect("limiter lock");
        let (tokens, last) = map.entry(key).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rps).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rps))
        }
    }
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let secret = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or(ApiError::Unauthorized)?;
        let key = state
            .keys
            .lookup(state, secret)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        state
            .limiter
            .check(key.id)
            .map_err(|retry_after| ApiError::RateLimited { retry_after })?;
        Ok(Auth { key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_empties_then_refills() {
        let l = RateLimiter::new(5);
        let k = Uuid::now_v7();
        for _ in 0..10 {
            assert!(l.check(k).is_ok());
        }
        let wait = l.check(k).unwrap_err();
        assert!(wait <= Duration::from_millis(200), "{wait:?}");
        std::thread::sleep(wait + Duration::from_millis(5));
        assert!(l.check(k).is_ok());
    }
}
