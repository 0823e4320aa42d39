//! One HTTP call to the API: auth, JSON in and out, problem JSON to [`Error`], per-request
//! timeouts, and retries with backoff: network errors and 502/503/504 for idempotent calls
//! only; a 429, which the server answers before doing anything, for every call.

use std::time::Duration;

use reqwest::{header::HeaderMap, Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};

/// Sent as `User-Agent`.
pub(crate) const USER_AGENT: &str = concat!("capibara-sdk-rust/", env!("CARGO_PKG_VERSION"));

/// The transport of a [`crate::Client`]: cheap to clone (reqwest's pool is shared).
#[derive(Clone)]
pub(crate) struct Http {
    pub(crate) base: String,
    api_key: Option<String>,
    pub(crate) inner: reqwest::Client,
    /// Retries after the first try.
    max_retries: u32,
    /// Per request, on top of any wait the server holds the call for.
    pub(crate) timeout: Duration,
}

/// One request: what varies between the API's calls.
pub(crate) struct Req<'a> {
    pub method: Method,
    pub path: String,
    pub query: Vec<(&'a str, String)>,
    pub body: Option<Value>,
    pub headers: Vec<(&'static str, String)>,
    /// Safe to send again after a network error (GET, PUT, DELETE, fenced or keyed POSTs).
    pub idempotent: bool,
    /// Added to the client's timeout (a server-side wait).
    pub extra_wait: Duration,
}

impl<'a> Req<'a> {
    pub fn new(method: Method, path: impl Into<String>) -> Req<'a> {
        let idempotent = matches!(method, Method::GET | Method::PUT | Method::DELETE);
        Req {
            method,
            path: path.into(),
            query: Vec::new(),
            body: None,
            headers: Vec::new(),
            idempotent,
            extra_wait: Duration::ZERO,
        }
    }

    pub fn get(path: impl Into<String>) -> Req<'a> {
        Req::new(Method::GET, path)
    }

    pub fn post(path: impl Into<String>) -> Req<'a> {
        Req::new(Method::POST, path)
    }

    pub fn json(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }

    pub fn header(mut self, name: &'static str, value: Option<String>) -> Self {
        if let Some(v) = value {
            self.headers.push((name, v));
        }
        self
    }

    pub fn query(mut self, name: &'a str, value: Option<String>) -> Self {
        if let Some(v) = value {
            self.query.push((name, v));
        }
        self
    }

    pub fn idempotent(mut self, yes: bool) -> Self {
        self.idempotent = yes;
        self
    }

    /// `Prefer: wait=N` (seconds, ≤ 60), and the time the server may hold the call for.
    pub fn prefer_wait(mut self, wait: Option<Duration>) -> Self {
        if let Some(w) = wait {
            let w = w.min(Duration::from_secs(60));
            self.headers
                .push(("prefer", format!("wait={}", trim_secs(w.as_secs_f64()))));
            self.extra_wait = w;
        }
        self
    }
}

/// Seconds as the shortest decimal (`1.5`, `10`).
fn trim_secs(s: f64) -> String {
    let t = format!("{s:.3}");
    t.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Delay before retry `n` (0-based): 250 ms doubling, at most 5 s, ±20 % jitter.
pub(crate) fn backoff(n: u32) -> Duration {
    let base = 250f64 * 2f64.powi(n.min(16) as i32);
    Duration::from_millis((base.min(5000.0) * (0.8 + 0.4 * random_unit())) as u64)
}

/// A number in [0, 1): std's randomly keyed hasher, so no random-number crate is needed.
pub(crate) fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// `Retry-After` in delta-seconds (the API's form).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: f64 = v.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

impl Http {
    pub(crate) fn new(
        base: String,
        api_key: Option<String>,
        max_retries: u32,
        timeout: Duration,
    ) -> Result<Http> {
        let inner = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(Error::Transport)?;
        Ok(Http {
            base: base.trim_end_matches('/').to_string(),
            api_key,
            inner,
            max_retries,
            timeout,
        })
    }

    /// The request builder of `req`, without sending it.
    pub(crate) fn build(
        &self,
        req: &Req<'_>,
        timeout: Option<Duration>,
    ) -> reqwest::RequestBuilder {
        let mut b = self
            .inner
            .request(req.method.clone(), format!("{}{}", self.base, req.path));
        if !req
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("accept"))
        {
            b = b.header(reqwest::header::ACCEPT, "application/json");
        }
        if !req.query.is_empty() {
            b = b.query(&req.query);
        }
        if let Some(key) = &self.api_key {
            b = b.bearer_auth(key);
        }
        for (k, v) in &req.headers {
            b = b.header(*k, v);
        }
        if let Some(body) = &req.body {
            b = b.json(body);
        }
        if let Some(t) = timeout {
            b = b.timeout(t);
        }
        b
    }

    /// Send `req` with retries; the body of a 2xx answer (empty for 204), or the error.
    pub(crate) async fn send(&self, req: Req<'_>) -> Result<(StatusCode, HeaderMap, Vec<u8>)> {
        let timeout = self.timeout + req.extra_wait;
        let mut attempt = 0;
        loop {
            let sent = self.build(&req, Some(timeout)).send().await;
            let res = match sent {
                Ok(r) => r,
                Err(e) => {
                    if req.idempotent && attempt < self.max_retries {
                        tokio::time::sleep(backoff(attempt)).await;
                        attempt += 1;
                        continue;
                    }
                    return Err(Error::Transport(e));
                }
            };
            let status = res.status();
            let headers = res.headers().clone();
            let body = match res.bytes().await {
                Ok(b) => b.to_vec(),
                Err(e) => {
                    if req.idempotent && attempt < self.max_retries {
                        tokio::time::sleep(backoff(attempt)).await;
                        attempt += 1;
                        continue;
                    }
                    return Err(Error::Transport(e));
                }
            };
            if status.is_success() {
                return Ok((status, headers, body));
            }
            let code = status.as_u16();
            let retryable = code == 429 || (req.idempotent && matches!(code, 502..=504));
            if retryable && attempt < self.max_retries {
                let wait = retry_after(&headers)
                    .map(|d| d.min(Duration::from_secs(30)))
                    .unwrap_or_else(|| backoff(attempt));
                tokio::time::sleep(wait).await;
                attempt += 1;
                continue;
            }
            return Err(Error::from_answer(code, retry_after(&headers), &body));
        }
    }

    /// Send `req` and decode the answer's JSON.
    pub(crate) async fn json<T: DeserializeOwned>(&self, req: Req<'_>) -> Result<T> {
        let what = format!("{} {}", req.method, req.path);
        let (_, _, body) = self.send(req).await?;
        serde_json::from_slice(&body).map_err(|e| Error::decode(what, e))
    }

    /// Send `req`, ignoring the answer's body.
    pub(crate) async fn empty(&self, req: Req<'_>) -> Result<()> {
        self.send(req).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_250_ms_up_to_5_s_with_jitter() {
        for _ in 0..50 {
            let d0 = backoff(0).as_millis();
            assert!((200..=300).contains(&d0), "{d0}");
            let d2 = backoff(2).as_millis();
            assert!((800..=1200).contains(&d2), "{d2}");
            let d9 = backoff(9).as_millis();
            assert!((4000..=6000).contains(&d9), "{d9}");
        }
    }

    #[test]
    fn prefer_wait_is_written_in_seconds_and_capped_at_60() {
        let r = Req::get("/x").prefer_wait(Some(Duration::from_millis(1500)));
        assert_eq!(r.headers, vec![("prefer", "wait=1.5".to_string())]);
        let r = Req::get("/x").prefer_wait(Some(Duration::from_secs(600)));
        assert_eq!(r.headers, vec![("prefer", "wait=60".to_string())]);
        assert_eq!(r.extra_wait, Duration::from_secs(60));
    }

    #[test]
    fn retry_after_reads_delta_seconds() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(reqwest::header::RETRY_AFTER, "5".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(5)));
    }
}
