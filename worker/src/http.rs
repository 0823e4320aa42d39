//! Safe outbound HTTP for executors (webhook deliveries, connectors).
//!
//! [`post`] checks the URL with [`capibara_shared::outbound`], resolves the host once and pins
//! the connection to the checked addresses (reqwest never resolves the name again, so a DNS
//! answer that changes after the check cannot reach a private address), follows no redirects
//! (a 3xx is returned as is), ignores proxy settings from the environment, bounds the connect
//! and total time, and reads at most `max_response_bytes` of the response.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{LazyLock, Mutex},
    time::{Duration, Instant},
};

use capibara_shared::outbound::{self, OutboundError};

/// Most characters of the response body kept in [`HttpResponse::body_snippet`].
pub const SNIPPET_CHARS: usize = 512;

/// Limits of one outbound request.
#[derive(Debug, Clone)]
pub struct OutboundPolicy {
    /// Allow loopback and private addresses (`CAPIBARA_OUTBOUND_ALLOW_PRIVATE`).
    pub allow_private: bool,
    pub connect_timeout: Duration,
    /// Whole request: resolve, connect, send, and read the (capped) response.
    pub timeout: Duration,
    /// Response bytes read at most; the rest is dropped with the connection.
    pub max_response_bytes: usize,
}

impl Default for OutboundPolicy {
    fn default() -> Self {
        OutboundPolicy {
            allow_private: false,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            max_response_bytes: 64 * 1024,
        }
    }
}

/// What came back.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// The first ≤ 512 characters of the body read (lossy UTF-8).
    pub body_snippet: String,
    /// From the start of the request to the end of reading the response.
    pub duration: Duration,
    /// The body was longer than `max_response_bytes` and was cut there.
    pub truncated: bool,
    /// The body read (at most `max_response_bytes`).
    pub body: Vec<u8>,
    /// `Retry-After` in seconds, when the response has one.
    pub retry_after: Option<Duration>,
}

/// Why no response came back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The URL's host is (or resolves to) a non-public address.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    InvalidUrl(String),
    #[error("request timed out")]
    Timeout,
    /// Resolving or connecting failed.
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Other(String),
}

impl From<OutboundError> for HttpError {
    fn from(e: OutboundError) -> Self {
        match e {
            OutboundError::InvalidUrl(m) => HttpError::InvalidUrl(m),
            e @ OutboundError::Forbidden { .. } => HttpError::Forbidden(e.to_string()),
            e @ OutboundError::Resolve(_) => HttpError::Connect(e.to_string()),
        }
    }
}

/// POST `body` to `url` under `policy`. `headers` are sent as given; `content-type` defaults to
/// `application/json` when absent. Any status (including 3xx, 4xx and 5xx) is a response.
pub async fn post(
    policy: &OutboundPolicy,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> Result<HttpResponse, HttpError> {
    let started = Instant::now();
    let url = outbound::parse_url(url)?;
    let addrs = tokio::time::timeout(
        policy.connect_timeout,
        outbound::resolve(&url, policy.allow_private),
    )
    .await
    .map_err(|_| HttpError::Timeout)??;
    let remaining = policy.timeout.saturating_sub(started.elapsed());
    if remaining.is_zero() {
        return Err(HttpError::Timeout);
    }
    let mut res = send_pinned(policy, remaining, &url, &addrs, headers, body).await?;
    res.duration = started.elapsed();
    Ok(res)
}

/// A client per host name and checked addresses, so calls to one endpoint reuse its
/// connections (building one loads the TLS roots, and a new connection per call cost ~8 ms of a
/// push call to a local endpoint). The addresses are part of the key: a name that resolves
/// elsewhere gets a client pinned there. Bounded: emptied when it holds [`MAX_CLIENTS`].
type ClientKey = (Option<String>, Vec<SocketAddr>, Duration);

static CLIENTS: LazyLock<Mutex<HashMap<ClientKey, reqwest::Client>>> =
    LazyLock::new(Default::default);

const MAX_CLIENTS: usize = 256;

pub(crate) fn pinned_client(
    policy: &OutboundPolicy,
    url: &url::Url,
    addrs: &[SocketAddr],
) -> Result<reqwest::Client, HttpError> {
    let name = match url.host() {
        Some(url::Host::Domain(name)) => Some(name.to_string()),
        _ => None,
    };
    let mut pinned = addrs.to_vec();
    pinned.sort();
    let key = (name, pinned, policy.connect_timeout);
    if let Some(c) = CLIENTS.lock().expect("http clients").get(&key) {
        return Ok(c.clone());
    }
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(policy.connect_timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(8)
        .user_agent(concat!("Capibara-Webhooks/", env!("CARGO_PKG_VERSION")));
    if let Some(name) = &key.0 {
        // Pin: reqwest looks names up in its overrides before the system resolver.
        builder = builder.resolve_to_addrs(name, addrs);
    }
    let client = builder
        .build()
        .map_err(|e| HttpError::Other(error_chain(&e)))?;
    let mut clients = CLIENTS.lock().expect("http clients");
    if clients.len() >= MAX_CLIENTS {
        clients.clear();
    }
    clients.insert(key, client.clone());
    Ok(client)
}

/// Send to `url` connecting only to `addrs` (already checked).
async fn send_pinned(
    policy: &OutboundPolicy,
    timeout: Duration,
    url: &url::Url,
    addrs: &[SocketAddr],
    headers: &[(String, String)],
    body: Vec<u8>,
) -> Result<HttpResponse, HttpError> {
    let started = Instant::now();
    let client = pinned_client(policy, url, addrs)?;

    let mut header_map = header_map(headers)?;
    if !header_map.contains_key(reqwest::header::CONTENT_TYPE) {
        header_map.insert(
            reqwest::header::CONTENT_TYPE,
            reqwest::header::HeaderValue::from_static("application/json"),
        );
    }

    let mut resp = client
        .post(url.clone())
        .timeout(timeout)
        .headers(header_map)
        .body(body)
        .send()
        .await
        .map_err(map_reqwest)?;
    let status = resp.status().as_u16();
    let retry_after = retry_after(resp.headers());

    let cap = policy.max_response_bytes;
    let mut buf: Vec<u8> = Vec::new();
    let mut truncated = false;
    while let Some(chunk) = resp.chunk().await.map_err(map_reqwest)? {
        let room = cap - buf.len();
        if chunk.len() > room {
            buf.extend_from_slice(&chunk[..room]);
            truncated = true;
            break; // dropping `resp` closes the connection
        }
        buf.extend_from_slice(&chunk);
    }
    drop(resp);

    let body_snippet: String = String::from_utf8_lossy(&buf)
        .chars()
        .take(SNIPPET_CHARS)
        .collect();
    Ok(HttpResponse {
        status,
        body_snippet,
        duration: started.elapsed(),
        truncated,
        body: buf,
        retry_after,
    })
}

/// Request headers from name/value pairs; a bad name or value is an error naming the header.
pub(crate) fn header_map(
    headers: &[(String, String)],
) -> Result<reqwest::header::HeaderMap, HttpError> {
    let mut map = reqwest::header::HeaderMap::new();
    for (k, v) in headers {
        let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| HttpError::Other(format!("invalid header name {k:?}")))?;
        let value = reqwest::header::HeaderValue::from_str(v)
            .map_err(|_| HttpError::Other(format!("invalid value for header {k:?}")))?;
        map.append(name, value);
    }
    Ok(map)
}

/// A response's `Retry-After` in seconds, when it has one.
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

pub(crate) fn map_reqwest(e: reqwest::Error) -> HttpError {
    // Never echo the URL: it may carry a token in its query.
    let e = e.without_url();
    if e.is_timeout() {
        HttpError::Timeout
    } else if e.is_connect() {
        HttpError::Connect(error_chain(&e))
    } else if e.is_builder() {
        HttpError::InvalidUrl(error_chain(&e))
    } else {
        HttpError::Other(error_chain(&e))
    }
}

/// The error and its sources, `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let msg = inner.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    /// A request the test server saw: (method, path, headers lower-cased, body).
    type Seen = Arc<Mutex<Vec<(String, String, Vec<(String, String)>, Vec<u8>)>>>;

    /// What the test server does with a request to `path`.
    #[derive(Clone, Copy)]
    enum Reply {
        /// 200 with a short JSON body.
        Ok,
        /// 302 to /target.
        Redirect,
        /// Sleep before answering.
        Slow,
        /// 200 with a body of many megabytes.
        Huge,
    }

    async fn read_request(
        s: &mut TcpStream,
    ) -> Option<(String, String, Vec<(String, String)>, Vec<u8>)> {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let n = s.read(&mut tmp).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let mut first = lines.next()?.split(' ');
        let method = first.next()?.to_string();
        let path = first.next()?.to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = buf[head_end..].to_vec();
        while body.len() < len {
            let n = s.read(&mut tmp).await.ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&tmp[..n]);
        }
        Some((method, path, headers, body))
    }

    /// Serve on 127.0.0.1 until the test ends; every request is recorded.
    async fn serve(reply: Reply) -> (u16, Seen) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Seen = Arc::default();
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut s).await else {
                        return;
                    };
                    let path = req.1.clone();
                    seen.lock().unwrap().push(req);
                    let reply = if path == "/target" { Reply::Ok } else { reply };
                    match reply {
                        Reply::Ok => {
                            let body = r#"{"ok":true}"#;
                            let _ = s
                                .write_all(
                                    format!(
                                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                        body.len()
                                    )
                                    .as_bytes(),
                                )
                                .await;
                        }
                        Reply::Redirect => {
                            let _ = s
                                .write_all(b"HTTP/1.1 302 Found\r\nlocation: /target\r\ncontent-length: 5\r\nconnection: close\r\n\r\nmoved")
                                .await;
                        }
                        Reply::Slow => {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                                .await;
                        }
                        Reply::Huge => {
                            let total = 8 * 1024 * 1024;
                            let _ = s
                                .write_all(
                                    format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\nconnection: close\r\n\r\n")
                                        .as_bytes(),
                                )
                                .await;
                            let chunk = vec![b'x'; 64 * 1024];
                            let mut sent = 0;
                            while sent < total {
                                if s.write_all(&chunk).await.is_err() {
                                    break; // the client hung up: expected
                                }
                                sent += chunk.len();
                            }
                        }
                    }
                    let _ = s.shutdown().await;
                });
            }
        });
        (port, seen)
    }

    fn private_ok() -> OutboundPolicy {
        OutboundPolicy {
            allow_private: true,
            ..OutboundPolicy::default()
        }
    }

    #[tokio::test]
    async fn posts_and_returns_snippet() {
        let (port, seen) = serve(Reply::Ok).await;
        let headers = vec![
            ("webhook-id".to_string(), "msg_1".to_string()),
            ("x-extra".to_string(), "a b".to_string()),
        ];
        let r = post(
            &private_ok(),
            &format!("http://127.0.0.1:{port}/hook"),
            &headers,
            br#"{"hello":1}"#.to_vec(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body_snippet, r#"{"ok":true}"#);
        assert!(!r.truncated);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let (method, path, hdrs, body) = &seen[0];
        assert_eq!((method.as_str(), path.as_str()), ("POST", "/hook"));
        assert_eq!(body, br#"{"hello":1}"#);
        let h = |n: &str| hdrs.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        assert_eq!(h("webhook-id").as_deref(), Some("msg_1"));
        assert_eq!(h("x-extra").as_deref(), Some("a b"));
        assert_eq!(h("content-type").as_deref(), Some("application/json"));
        assert!(h("user-agent").unwrap().starts_with("Capibara-Webhooks/"));
    }

    #[tokio::test]
    async fn via_localhost_name_is_pinned_and_checked() {
        let (port, _seen) = serve(Reply::Ok).await;
        let url = format!("http://localhost:{port}/x");
        let r = post(&private_ok(), &url, &[], b"{}".to_vec())
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let err = post(&OutboundPolicy::default(), &url, &[], b"{}".to_vec())
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Forbidden(_)), "{err:?}");
    }

    #[tokio::test]
    async fn pinned_address_is_used_without_dns() {
        // A name that no resolver knows: only the pin can make this request connect.
        let (port, seen) = serve(Reply::Ok).await;
        let url = url::Url::parse(&format!("http://capibara-pin-test.invalid:{port}/p")).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let policy = private_ok();
        let r = send_pinned(&policy, policy.timeout, &url, &[addr], &[], b"{}".to_vec())
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let seen = seen.lock().unwrap();
        let host = seen[0].2.iter().find(|(k, _)| k == "host").unwrap();
        assert_eq!(host.1, format!("capibara-pin-test.invalid:{port}"));
    }

    #[tokio::test]
    async fn redirect_is_not_followed() {
        let (port, seen) = serve(Reply::Redirect).await;
        let r = post(
            &private_ok(),
            &format!("http://127.0.0.1:{port}/start"),
            &[],
            b"{}".to_vec(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 302);
        assert_eq!(r.body_snippet, "moved");
        // Give a (wrongly) following client time to reach /target.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let paths: Vec<String> = seen.lock().unwrap().iter().map(|r| r.1.clone()).collect();
        assert_eq!(paths, vec!["/start".to_string()]);
    }

    #[tokio::test]
    async fn slow_server_times_out() {
        let (port, _seen) = serve(Reply::Slow).await;
        let policy = OutboundPolicy {
            timeout: Duration::from_millis(300),
            ..private_ok()
        };
        let t = Instant::now();
        let err = post(
            &policy,
            &format!("http://127.0.0.1:{port}/"),
            &[],
            b"{}".to_vec(),
        )
        .await
        .unwrap_err();
        assert_eq!(err, HttpError::Timeout);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn huge_response_is_capped() {
        let (port, _seen) = serve(Reply::Huge).await;
        let policy = OutboundPolicy {
            max_response_bytes: 1000,
            ..private_ok()
        };
        let r = post(
            &policy,
            &format!("http://127.0.0.1:{port}/"),
            &[],
            b"{}".to_vec(),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        assert!(r.truncated);
        assert_eq!(r.body_snippet, "x".repeat(SNIPPET_CHARS));

        // Exactly at the cap is not truncated: a body of 11 bytes with an 11-byte cap.
        let (port, _seen) = serve(Reply::Ok).await;
        let policy = OutboundPolicy {
            max_response_bytes: r#"{"ok":true}"#.len(),
            ..private_ok()
        };
        let r = post(
            &policy,
            &format!("http://127.0.0.1:{port}/"),
            &[],
            b"{}".to_vec(),
        )
        .await
        .unwrap();
        assert!(!r.truncated);
        assert_eq!(r.body_snippet, r#"{"ok":true}"#);
    }

    #[tokio::test]
    async fn loopback_refused_unless_allowed() {
        let (port, seen) = serve(Reply::Ok).await;
        let url = format!("http://127.0.0.1:{port}/");
        let err = post(&OutboundPolicy::default(), &url, &[], b"{}".to_vec())
            .await
            .unwrap_err();
        assert!(
            matches!(err, HttpError::Forbidden(ref m) if m.contains("127.0.0.1")),
            "{err:?}"
        );
        assert!(seen.lock().unwrap().is_empty());
        let r = post(&private_ok(), &url, &[], b"{}".to_vec())
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }

    #[tokio::test]
    async fn invalid_urls_and_connect_errors() {
        for bad in ["ftp://example.com/", "not a url", "http://u:p@127.0.0.1/"] {
            let err = post(&private_ok(), bad, &[], vec![]).await.unwrap_err();
            assert!(matches!(err, HttpError::InvalidUrl(_)), "{bad}: {err:?}");
        }
        // A port nobody listens on.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let err = post(
            &private_ok(),
            &format!("http://127.0.0.1:{port}/"),
            &[],
            vec![],
        )
        .await
        .unwrap_err();
        assert!(matches!(err, HttpError::Connect(_)), "{err:?}");
    }
}
