//! The HTTP listener every binary serves through (API, scheduler hooks, worker and scheduler
//! health/metrics), with the bounds that keep hostile or broken clients from tying it up
//! (docs/security.md, "Hostile input").
//!
//! `axum::serve` offers no header read timeout, connection limit or header size limit, so this
//! is a small accept loop on hyper-util's HTTP/1 + HTTP/2 connection builder:
//! - a client must send a request's complete head within `header_read_timeout` (a client that
//!   connects and sends nothing is dropped after it too); the same
//!   timer bounds how long a keep-alive connection may sit idle between requests (hyper starts
//!   it when it waits for the next request's first byte), so slowloris connections are closed;
//! - at most `max_connections` connections are served at once; further ones wait in the
//!   kernel's accept backlog until one closes, so a flood of slow clients cannot exhaust file
//!   descriptors or memory;
//! - a request head larger than `max_header_bytes` is answered 431 and the connection closed
//!   (hyper); a URI longer than [`MAX_URI_BYTES`] is answered 414 (problem JSON);
//! - HTTP/2 connections get pings (`keep_alive`), and at most 256 concurrent streams.
//!
//! Request smuggling is hyper's: a request with both `Content-Length` and
//! `Transfer-Encoding`, conflicting `Content-Length`s, a bad chunk size or an obs-folded header
//! is answered 400 and the connection closed (tests/tests/e2e/hostile_http.rs checks it on the
//! real binary).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use axum::{extract::ConnectInfo, Router};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto::Builder,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tower::ServiceExt as _;

/// Longest request target (path and query) served; beyond: 414. Capibara's longest legitimate
/// URIs (list filters, cursors) are a few hundred bytes.
pub const MAX_URI_BYTES: usize = 16 * 1024;

/// Bounds on the connections one listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// How long a client may take to send a request head, and how long a keep-alive connection
    /// may stay idle between requests (`CAPIBARA_HTTP_HEADER_TIMEOUT_S`, default 30 s, hyper's own
    /// default: a client pool's idle connection closed under it races with its reuse, so not less).
    pub header_read_timeout: Duration,
    /// Connections served at once (`CAPIBARA_HTTP_MAX_CONNECTIONS`, default 4096); the rest wait
    /// in the accept backlog.
    pub max_connections: usize,
    /// Largest request head (request line and headers) in bytes
    /// (`CAPIBARA_HTTP_MAX_HEADER_BYTES`, default 64 KiB, at least 8 KiB); beyond: 431.
    pub max_header_bytes: usize,
}

impl ServeLimits {
    pub const DEFAULT: ServeLimits = ServeLimits {
        header_read_timeout: Duration::from_secs(30),
        max_connections: 4096,
        max_header_bytes: 64 * 1024,
    };
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits::DEFAULT
    }
}

/// Serve `router` on `listener` until `shutdown` resolves; then stop accepting, ask every open
/// connection to finish its in-flight requests and close, and return when all have.
///
/// Handlers see the peer address as `ConnectInfo<SocketAddr>` (the failed-authentication limit
/// is per address); accepted sockets get `TCP_NODELAY` (SSE frames and short JSON answers go
/// out at once instead of waiting on Nagle).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router.layer(axum::middleware::from_fn(refuse_long_uris));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's minimum read buffer is 8 KiB; the whole head must fit in it.
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Closed when serving stops: every connection task then shuts its connection down
    // gracefully; the loop below waits for the tasks to drop their permits.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("never closed"),
            () = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let header_read_timeout = limits.header_read_timeout;
        let service = router
            .clone()
            .map_request(move |mut req: axum::extract::Request<_>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                req.map(axum::body::Body::new)
            });
        let service = TowerToHyperService::new(service);
        let builder = builder.clone();
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            // hyper's header timer starts once the protocol is known; until then (a client
            // that connects and sends nothing, or a byte of the HTTP/2 preface) it would wait
            // forever.
            let deadline = tokio::time::Instant::now() + header_read_timeout;
            let known = tokio::select! {
                known = protocol_known(&tcp, deadline) => known,
                _ = stop_rx.changed() => false, // shutting down: no request started yet
            };
            if !known {
                drop(permit);
                return;
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => log_close(r),
                _ = stop_rx.changed() => {
                    conn.as_mut().graceful_shutdown();
                    log_close(conn.await);
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    drop(stop_tx);
    // Every connection holds a permit until it has closed.
    let _all = permits
        .acquire_many(u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX))
        .await;
    Ok(())
}

fn log_close(r: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(e) = r {
        tracing::debug!(error = %e, "connection closed with an error");
    }
}

async fn refuse_long_uris(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if len > MAX_URI_BYTES {
        return crate::problem::Problem::for_status(
            axum::http::StatusCode::URI_TOO_LONG,
            format!("the request target is {len} bytes; at most {MAX_URI_BYTES} are served"),
        )
        .into_response();
    }
    next.run(req).await
}

/// Whether the client sent enough by `deadline` to tell HTTP/1 from HTTP/2: a first byte that
/// differs from the HTTP/2 connection preface, or the whole 24-byte preface. Only peeks: hyper
/// reads the same bytes again.
async fn protocol_known(tcp: &tokio::net::TcpStream, deadline: tokio::time::Instant) -> bool {
    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; 24];
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return false,
        };
        if n == 0 {
            return false; // closed before a request
        }
        if n == buf.len() || buf[..n] != PREFACE[..n] {
            return true;
        }
        // Part of the HTTP/2 preface: wait for more (a peek would return the same bytes at once).
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
