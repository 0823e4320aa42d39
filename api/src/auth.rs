//! Authentication (bearer API keys, cached briefly and dropped at once when revoked), roles,
//! per-key rate limiting and per-address limiting of failed authentications.
//!
//! The isolation rules these enforce are in docs/security.md ("Keys, roles and visibility").

use std::{
    collections::HashMap,
    hash::Hash,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::{request::Parts, HeaderMap},
};
use capibara_shared::{
    domain::auth::Role,
    queue::Queue,
    store::keys::{self, ApiKey},
};
use futures::StreamExt;
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
    /// The metadata of events this caller's command records: its namespace and actor.
    pub fn metadata(&self) -> capibara_shared::domain::event::EventMetadata {
        capibara_shared::domain::event::EventMetadata {
            namespace: self.namespace().to_string(),
            actor: Some(self.actor()),
            ..Default::default()
        }
    }

    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.key.allows(role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this API key lacks the `{role}` role"
            )))
        }
    }

    /// A super-admin: an `admin` key that may manage keys of every namespace.
    pub fn is_super_admin(&self) -> bool {
        self.key.super_admin && self.key.allows(Role::Admin)
    }
}

/// A cached lookup: the key (or its absence) and when it was read.
type CachedKey = (Option<ApiKey>, Instant);

/// Looked-up keys by secret hash, for [`KEY_TTL`]. A revocation evicts the key at once in every
/// API process (over Redis, [`KeyCache::listen`]); the TTL bounds it when that message is lost.
#[derive(Clone, Default)]
pub struct KeyCache {
    entries: Arc<Mutex<HashMap<String, CachedKey>>>,
    /// Bumped by every eviction: a lookup that started before one does not cache its answer
    /// (it may have read the key just before the revocation committed).
    generation: Arc<AtomicU64>,
    admin: Option<(String, ApiKey)>,
}

/// How long a looked-up key (or an unknown token) is remembered.
pub const KEY_TTL: Duration = Duration::from_secs(10);

impl KeyCache {
    /// `admin_secret` is `CAPIBARA_ADMIN_KEY`: a super-admin of namespace `default`, never
    /// stored.
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
                    super_admin: true,
                    created_at: chrono::DateTime::UNIX_EPOCH,
                    revoked_at: None,
                    revoked_by: None,
                },
            )
        });
        Self {
            admin,
            ..Self::default()
        }
    }

    /// Follow the revoked-keys channel of `queue`, evicting each revoked key; forgets every
    /// cached key whenever the subscription drops (messages may have been missed).
    pub fn listen(&self, queue: &Queue) {
        let cache = self.clone();
        let redis = queue.redis().clone();
        let channel = queue.revoked_keys_channel();
        tokio::spawn(async move {
            loop {
                match redis.pubsub().await {
                    Ok(mut pubsub) => {
                        if pubsub.subscribe(&channel).await.is_ok() {
                            // Revocations published while we were not subscribed.
                            cache.clear();
                            let mut messages = pubsub.on_message();
                            while let Some(msg) = messages.next().await {
                                let payload: String = msg.get_payload().unwrap_or_default();
                                if let Ok(id) = payload.parse() {
                                    cache.evict(id);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "revoked-keys subscription failed; retrying")
                    }
                }
                cache.clear();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    /// The cached answer for a secret hash: `Some(Some(key))` known, `Some(None)` known to be
    /// unknown, `None` not cached (or expired).
    fn cached(&self, hash: &str) -> Option<Option<ApiKey>> {
        if let Some((h, key)) = &self.admin {
            if h == hash {
                return Some(Some(key.clone()));
            }
        }
        let map = self.entries.lock().expect("cache lock");
        map.get(hash)
            .filter(|(_, at)| at.elapsed() < KEY_TTL)
            .map(|(key, _)| key.clone())
    }

    /// Read the key from Postgres and remember the answer.
    async fn load(&self, state: &AppState, secret: &str) -> Result<Option<ApiKey>, ApiError> {
        let generation = self.generation.load(Ordering::SeqCst);
        let key = keys::find_by_secret(&state.store.pool, secret).await?;
        let mut map = self.entries.lock().expect("cache lock");
        if self.generation.load(Ordering::SeqCst) == generation {
            if map.len() > 10_000 {
                map.clear();
            }
            map.insert(keys::hash_secret(secret), (key.clone(), Instant::now()));
        }
        Ok(key)
    }

    /// Forget the key with this id (it was revoked).
    pub fn evict(&self, id: Uuid) {
        let mut map = self.entries.lock().expect("cache lock");
        self.generation.fetch_add(1, Ordering::SeqCst);
        map.retain(|_, (key, _)| key.as_ref().is_none_or(|k| k.id != id));
    }

    /// Forget every cached key.
    pub fn clear(&self) {
        let mut map = self.entries.lock().expect("cache lock");
        self.generation.fetch_add(1, Ordering::SeqCst);
        map.clear();
    }
}

/// Token buckets by `K`: `rate` tokens per second, holding at most `burst`.
#[derive(Clone)]
pub struct TokenBuckets<K> {
    rate: f64,
    burst: f64,
    buckets: Arc<Mutex<HashMap<K, (f64, Instant)>>>,
}

/// Requests per API key (`CAPIBARA_RATE_LIMIT_RPS`, bursts of 2×).
pub type RateLimiter = TokenBuckets<Uuid>;

/// Failed authentications per client address (`CAPIBARA_AUTH_FAILURES_PER_MIN`).
pub type FailureLimiter = TokenBuckets<IpAddr>;

impl RateLimiter {
    pub fn new(rps: u32) -> Self {
        let rate = rps.max(1) as f64;
        TokenBuckets::with_rate(rate, rate * 2.0)
    }
}

impl FailureLimiter {
    /// `per_min` failures a minute, in bursts of as many.
    pub fn per_minute(per_min: u32) -> Self {
        let burst = per_min.max(1) as f64;
        TokenBuckets::with_rate(burst / 60.0, burst)
    }
}

impl<K: Hash + Eq + Copy> TokenBuckets<K> {
    pub fn with_rate(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst: burst.max(1.0),
            buckets: Arc::default(),
        }
    }

    /// Take a token or say how long until one is available.
    pub fn check(&self, key: K) -> Result<(), Duration> {
        self.with_bucket(key, |tokens| {
            *tokens -= 1.0;
        })
    }

    /// Whether a token is available, without taking it.
    pub fn peek(&self, key: K) -> Result<(), Duration> {
        self.with_bucket(key, |_| {})
    }

    fn with_bucket(&self, key: K, take: impl FnOnce(&mut f64)) -> Result<(), Duration> {
        let now = Instant::now();
        let mut map = self.buckets.lock().expect("limiter lock");
        if map.len() > 100_000 {
            // Buckets that have refilled are the same as absent ones.
            let full_after = Duration::from_secs_f64(self.burst / self.rate);
            map.retain(|_, (_, last)| now.duration_since(*last) < full_after);
        }
        let (tokens, last) = map.entry(key).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            take(tokens);
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate))
        }
    }
}

/// The client's address as the failure limiter keys it: the TCP peer, or, when the peer is a
/// trusted proxy, the right-most `X-Forwarded-For` entry that is not one. IPv6 clients are
/// keyed by their /64 (one host usually holds a whole /64). `None` when the server was not
/// given peer addresses (an app served without connect info).
pub fn client_address(
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    trusted: &[IpAddr],
) -> Option<IpAddr> {
    let mut client = canonical(peer?.ip());
    if trusted.contains(&client) {
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        for hop in hops.into_iter().rev() {
            let Ok(ip) = hop.parse::<IpAddr>() else { break };
            client = canonical(ip);
            if !trusted.contains(&client) {
                break;
            }
        }
    }
    Some(match client {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    })
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn too_many_failures(retry_after: Duration) -> ApiError {
    ApiError::RateLimited {
        retry_after,
        detail: "too many requests with unknown API keys from this address".into(),
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
        let cached = state.keys.cached(&keys::hash_secret(secret));
        let key = match cached {
            // A known key is served from memory, whatever its address did.
            Some(Some(key)) => key,
            cached => {
                let peer = parts
                    .extensions
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|c| c.0);
                let client = client_address(peer, &parts.headers, &state.config.trusted_proxies);
                // An address over its failure budget gets no Postgres lookup at all.
                if let Some(ip) = client {
                    state.auth_failures.peek(ip).map_err(too_many_failures)?;
                }
                let key = match cached {
                    Some(None) => None,
                    _ => state.keys.load(state, secret).await?,
                };
                match key {
                    Some(key) => key,
                    None => {
                        if let Some(ip) = client {
                            let _ = state.auth_failures.check(ip);
                        }
                        metrics::counter!("capibara_auth_failures_total").increment(1);
                        return Err(ApiError::Unauthorized);
                    }
                }
            }
        };
        state
            .limiter
            .check(key.id)
            .map_err(ApiError::rate_limited)?;
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

    #[test]
    fn peeking_takes_nothing_and_addresses_are_separate() {
        let l = FailureLimiter::per_minute(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..5 {
            assert!(l.peek(a).is_ok());
        }
        assert!(l.check(a).is_ok() && l.check(a).is_ok());
        let wait = l.peek(a).unwrap_err();
        assert!(wait > Duration::from_secs(20), "{wait:?}");
        assert!(l.peek(b).is_ok());
    }

    fn xff(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", v.parse().unwrap());
        h
    }

    #[test]
    fn forwarded_for_counts_only_behind_a_trusted_proxy() {
        let proxy: SocketAddr = "10.1.1.1:5000".parse().unwrap();
        let trusted: Vec<IpAddr> = vec!["10.1.1.1".parse().unwrap(), "10.1.1.2".parse().unwrap()];
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // Untrusted peer: its own address, whatever it claims.
        assert_eq!(
            client_address(
                Some("192.0.2.9:1".parse().unwrap()),
                &xff("1.2.3.4"),
                &trusted
            ),
            ip("192.0.2.9")
        );
        // Trusted: the right-most entry that is not a proxy; spoofed entries to its left lose.
        assert_eq!(
            client_address(Some(proxy), &xff("6.6.6.6, 1.2.3.4, 10.1.1.2"), &trusted),
            ip("1.2.3.4")
        );
        assert_eq!(
            client_address(Some(proxy), &HeaderMap::new(), &trusted),
            ip("10.1.1.1")
        );
        assert_eq!(
            client_address(Some(proxy), &xff("garbage"), &trusted),
            ip("10.1.1.1")
        );
        // IPv6 by /64; IPv4-mapped as IPv4.
        assert_eq!(
            client_address(
                Some("[2001:db8::1:2]:1".parse().unwrap()),
                &HeaderMap::new(),
                &[]
            ),
            ip("2001:db8::")
        );
        assert_eq!(
            client_address(
                Some("[::ffff:192.0.2.1]:1".parse().unwrap()),
                &HeaderMap::new(),
                &[]
            ),
            ip("192.0.2.1")
        );
        assert_eq!(client_address(None, &HeaderMap::new(), &[]), None);
    }
}
