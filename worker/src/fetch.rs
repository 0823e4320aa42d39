//! Outbound GETs for connectors: every hop through the SSRF guard.
//!
//! [`get`] resolves and checks the URL ([`capibara_shared::outbound`]) and connects only to the
//! checked addresses (as [`crate::http::post`] does), follows at most [`MAX_REDIRECTS`]
//! redirects itself, checking each new URL again (so a public URL cannot redirect into the
//! private network), drops credentials when a redirect leaves the host, bounds the whole
//! exchange by the policy's timeout (a slow drip of bytes times out like a silent server) and
//! fails when the body is longer than the policy's cap instead of reading on. No compression is
//! asked for or decoded, so a compressed body is never inflated. At most [`HOST_CONCURRENCY`]
//! requests of this process go to one host at once; connectors that ask for a pause between
//! requests to a host wait for it ([`pause`]).

use std::{
    collections::HashMap,
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant},
};

use capibara_shared::outbound;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::http::{header_map, map_reqwest, pinned_client, retry_after, HttpError, OutboundPolicy};

/// Most redirects one GET follows.
pub const MAX_REDIRECTS: usize = 5;

/// A response to a GET.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// The URL that answered (after redirects).
    pub url: url::Url,
    /// `Retry-After` in seconds, when the response has one.
    pub retry_after: Option<Duration>,
}

impl Got {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Why a GET brought nothing back.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("the response is longer than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
    #[error("a redirect without a valid Location")]
    BadRedirect,
    #[error("canceled")]
    Canceled,
    /// The sink a streamed body went to refused a piece.
    #[error("storing the response: {0}")]
    Sink(String),
}

/// Headers that carry credentials: not sent on to another host.
fn credential(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "authorization" | "cookie" | "proxy-authorization"
    ) || name.as_str().contains("key")
        || name.as_str().contains("token")
}

/// GET `url` with `headers` under `policy`, following redirects; any final status is a
/// response.
pub async fn get(
    policy: &OutboundPolicy,
    url: &str,
    headers: &[(String, String)],
    cancel: &CancellationToken,
) -> Result<Got, GetError> {
    send(
        policy,
        reqwest::Method::GET,
        url,
        headers,
        None,
        cancel,
        None,
    )
    .await
}

/// Where a streamed response body goes ([`send`] with a sink): each piece as it arrives, with
/// the length the response announced.
#[async_trait::async_trait]
pub trait BodySink: Send {
    /// The final response's headers, before its first piece.
    async fn start(&mut self, _headers: &HeaderMap) {}
    async fn piece(&mut self, bytes: &[u8], total: Option<u64>) -> Result<(), String>;
}

/// [`get`] for any method, with `body`. A redirect keeps the method and body on 307 and 308,
/// and becomes a GET without a body on 303 (and on 301/302 after a POST), as browsers do.
/// With a `sink`, the final response's body goes there piece by piece (still capped by the
/// policy) instead of into [`Got::body`].
pub async fn send(
    policy: &OutboundPolicy,
    method: reqwest::Method,
    url: &str,
    headers: &[(String, String)],
    body: Option<Vec<u8>>,
    cancel: &CancellationToken,
    mut sink: Option<&mut dyn BodySink>,
) -> Result<Got, GetError> {
    let (mut method, mut body) = (method, body);
    let started = Instant::now();
    let mut map = header_map(headers)?;
    if !map.contains_key(reqwest::header::USER_AGENT) {
        map.insert(
            reqwest::header::USER_AGENT,
            HeaderValue::from_static(concat!("Capibara-Connector/", env!("CARGO_PKG_VERSION"))),
        );
    }
    let mut url = outbound::parse_url(url).map_err(HttpError::from)?;
    let fut = async {
        for _ in 0..=MAX_REDIRECTS {
            let addrs = outbound::resolve(&url, policy.allow_private)
                .await
                .map_err(HttpError::from)?;
            let client = pinned_client(policy, &url, &addrs)?;
            let _slot = slot(url.host_str().unwrap_or("")).await;
            let remaining = policy.timeout.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return Err(HttpError::Timeout.into());
            }
            let mut request = client
                .request(method.clone(), url.clone())
                .timeout(remaining)
                .headers(map.clone());
            if let Some(b) = &body {
                request = request.body(b.clone());
            }
            let mut resp = request.send().await.map_err(map_reqwest)?;
            let status = resp.status();
            if status.is_redirection() && status != reqwest::StatusCode::NOT_MODIFIED {
                let next = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| url.join(l).ok())
                    .ok_or(GetError::BadRedirect)?;
                let next = outbound::parse_url(next.as_str()).map_err(HttpError::from)?;
                if next.host_str() != url.host_str()
                    || next.port_or_known_default() != url.port_or_known_default()
                {
                    let keep: HeaderMap = map
                        .iter()
                        .filter(|(k, _)| !credential(k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    map = keep;
                }
                let to_get = status == reqwest::StatusCode::SEE_OTHER
                    || (method == reqwest::Method::POST && matches!(status.as_u16(), 301 | 302));
                if to_get {
                    method = reqwest::Method::GET;
                    body = None;
                }
                url = next;
                continue;
            }
            let retry_after = retry_after(resp.headers());
            let cap = policy.max_response_bytes;
            if resp.content_length().is_some_and(|n| n as usize > cap) {
                return Err(GetError::TooLarge(cap));
            }
            let total = resp.content_length();
            if let Some(sink) = sink.as_deref_mut() {
                sink.start(resp.headers()).await;
            }
            let (mut body, mut received) = (Vec::new(), 0usize);
            while let Some(chunk) = resp.chunk().await.map_err(map_reqwest)? {
                received += chunk.len();
                if received > cap {
                    return Err(GetError::TooLarge(cap));
                }
                match sink.as_deref_mut() {
                    Some(sink) => sink.piece(&chunk, total).await.map_err(GetError::Sink)?,
                    None => body.extend_from_slice(&chunk),
                }
            }
            return Ok(Got {
                status: status.as_u16(),
                headers: resp.headers().clone(),
                body,
                url,
                retry_after,
            });
        }
        Err(GetError::TooManyRedirects)
    };
    tokio::select! {
        r = tokio::time::timeout(policy.timeout, fut) => r.unwrap_or(Err(HttpError::Timeout.into())),
        () = cancel.cancelled() => Err(GetError::Canceled),
    }
}

/// Requests one worker process makes to one host at once, at most (per-host concurrency).
pub const HOST_CONCURRENCY: usize = 4;

/// Per-host manners of this process: at most [`HOST_CONCURRENCY`] requests in flight to a
/// host, and a pause between two requests to it when a connector asks for one.
#[derive(Default)]
struct Hosts {
    gates: HashMap<String, Arc<Semaphore>>,
    /// When the next request to a host may start.
    next: HashMap<String, Instant>,
}

static HOSTS: LazyLock<Mutex<Hosts>> = LazyLock::new(Default::default);

/// Most hosts remembered; the maps are emptied when they grow past it.
const MAX_HOSTS: usize = 10_000;

/// A slot among the [`HOST_CONCURRENCY`] requests to `host`; hold it for the request's life.
async fn slot(host: &str) -> OwnedSemaphorePermit {
    let gate = {
        let mut h = HOSTS.lock().expect("hosts");
        if h.gates.len() > MAX_HOSTS {
            h.gates.clear();
        }
        h.gates
            .entry(host.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(HOST_CONCURRENCY)))
            .clone()
    };
    gate.acquire_owned()
        .await
        .expect("host gates are never closed")
}

/// Politeness: wait until `delay` has passed since the start of the previous request to `host`
/// that asked for a pause (requests of this process; each waiter reserves its own start).
pub async fn pause(host: &str, delay: Duration) {
    if delay.is_zero() {
        return;
    }
    let wait = {
        let mut h = HOSTS.lock().expect("hosts");
        if h.next.len() > MAX_HOSTS {
            h.next.clear();
        }
        let now = Instant::now();
        let at = h.next.get(host).copied().unwrap_or(now).max(now);
        h.next.insert(host.to_string(), at + delay);
        at - now
    };
    tokio::time::sleep(wait).await;
}
