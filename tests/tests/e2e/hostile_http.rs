//! Hostile HTTP clients against the real `capibara-api` binary: request smuggling shapes, oversize
//! heads, URIs and bodies, slow (slowloris) and idle connections, and a one-key flood while other
//! keys are served (docs/security.md, "Hostile input"). Raw bytes go over a `TcpStream`, so
//! nothing a client library would normalize is normalized.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use capibara_tests::{Res, TestEnv};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// What a server sent back on one connection until it closed it. A connection still open after
/// `wait` fails the test: every case here must end with the server closing.
async fn exchange(port: u16, request: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(request).await.unwrap();
    read_to_close(&mut s, wait).await
}

async fn read_to_close(s: &mut TcpStream, wait: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the connection is still open after {wait:?}; got so far: {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status codes of every response in `raw`.
fn statuses(raw: &str) -> Vec<u16> {
    raw.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| raw.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// A second, complete request appended to every hostile one: if a server (or a proxy in front of
/// it) framed the first request differently, this one would be answered too.
const SMUGGLED: &str = "GET /v1/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer smuggled\r\n\r\n";

#[tokio::test]
async fn request_smuggling_shapes_are_refused_and_the_connection_closed() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let head = "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";
    // Each: (what, request head and body) — followed by SMUGGLED on the same connection.
    let refused = [
        (
            "two different Content-Lengths",
            format!("{head}Content-Length: 4\r\nContent-Length: 40\r\n\r\n{{}}  "),
        ),
        (
            "a Content-Length list",
            format!("{head}Content-Length: 4, 40\r\n\r\n{{}}  "),
        ),
        (
            "a signed Content-Length",
            format!("{head}Content-Length: +4\r\n\r\n{{}}  "),
        ),
        (
            "a Transfer-Encoding that does not end in chunked",
            format!("{head}Transfer-Encoding: chunked, identity\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"),
        ),
        (
            "an unknown Transfer-Encoding",
            format!("{head}Transfer-Encoding: xchunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"),
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            "POST /v1/jobs HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
                .to_string(),
        ),
        (
            "an obs-folded header",
            format!("{head}X-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\n{{}}"),
        ),
        (
            "whitespace before a header's colon",
            format!("{head}Content-Length : 2\r\n\r\n{{}}"),
        ),
        (
            "a bare LF inside a header line",
            format!("{head}X-A: a\nContent-Length: 40\r\nContent-Length: 2\r\n\r\n{{}}"),
        ),
    ];
    for (what, req) in &refused {
        let raw = exchange(
            env.api_port,
            format!("{req}{SMUGGLED}").as_bytes(),
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(statuses(&raw), [400], "{what}: {raw:?}");
    }

    // Both Content-Length and Transfer-Encoding: hyper frames the body by the chunked encoding
    // alone (RFC 9112 §6.1) and closes the connection after the answer, so whatever a proxy
    // took for the next request is never read as one.
    let raw = exchange(
        env.api_port,
        format!("{head}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}")
            .as_bytes(),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(statuses(&raw).len(), 1, "one answer, then close: {raw:?}");
    assert!(
        raw.to_ascii_lowercase().contains("connection: close"),
        "{raw:?}"
    );

    // A chunk size that is not hex: the request fails (its body cannot be read), nothing after
    // it is answered, and the connection is closed.
    let raw = exchange(
        env.api_port,
        format!("{head}Authorization: Bearer x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n{SMUGGLED}")
            .as_bytes(),
        Duration::from_secs(20),
    )
    .await;
    assert!(statuses(&raw).len() <= 1, "{raw:?}");
    assert!(statuses(&raw).iter().all(|s| *s >= 400), "{raw:?}");

    // The server still answers well-formed requests.
    let raw = exchange(
        env.api_port,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(statuses(&raw), [200], "{raw:?}");
}

#[tokio::test]
async fn oversize_heads_uris_and_bodies_are_refused() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_BODY_LIMIT_BYTES".into(), "4096".into()));
    let _api = env.spawn_api().await;

    // Headers past CAPIBARA_HTTP_MAX_HEADER_BYTES (64 KiB): 431 and the connection closed.
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let raw = exchange(env.api_port, big.as_bytes(), Duration::from_secs(20)).await;
    assert_eq!(statuses(&raw), [431], "{}", &raw[..raw.len().min(300)]);
    // Many small headers add up the same way.
    let many: String = (0..3000).map(|i| format!("X-H{i}: {i:030}\r\n")).collect();
    let raw = exchange(
        env.api_port,
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(statuses(&raw), [431], "{}", &raw[..raw.len().min(300)]);

    // A request target past 16 KiB: 414 problem JSON.
    let api = env.client();
    let r = api
        .get(&format!("/v1/jobs?kind={}", "k".repeat(20 * 1024)))
        .await;
    assert_eq!(r.status, 414, "{r:?}");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/problem+json")
    );

    // A body past CAPIBARA_BODY_LIMIT_BYTES, with a length or chunked: 413 problem JSON.
    let input = serde_json::json!({"kind": "echo", "input": {"x": "y".repeat(8000)}});
    let r = api.post("/v1/jobs", input.clone()).await;
    assert_problem(&r, 413);
    let body = serde_json::to_vec(&input).unwrap();
    let stream = futures::stream::iter(
        body.chunks(1000)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = api
        .send(
            api.http
                .post(api.url("/v1/jobs"))
                .header("content-type", "application/json")
                .body(reqwest::Body::wrap_stream(stream)),
        )
        .await;
    assert_problem(&r, 413);
}

fn assert_problem(r: &Res, status: u16) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/problem+json"),
        "{r:?}"
    );
    assert_eq!(r.body["status"], status, "{r:?}");
}

#[tokio::test]
async fn slow_and_idle_connections_are_closed_while_other_clients_are_served() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_HTTP_HEADER_TIMEOUT_S".into(), "1".into()));
    let _api = env.spawn_api().await;
    let port = env.api_port;

    // 100 slowloris connections: a request head one byte every 200 ms, never finished.
    let slow: Vec<_> = (0..100)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
                for b in head.iter().cycle() {
                    if s.write_all(&[*b]).await.is_err() {
                        break; // closed by the server
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // Whatever it got (a 408, or nothing), the server has closed it.
                let mut rest = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
                    .await
                    .expect("closed");
            })
        })
        .collect();
    // Meanwhile a normal client is answered, again and again.
    let api = env.client();
    for _ in 0..20 {
        assert_eq!(api.get("/v1/me").await.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for s in slow {
        tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("every slow connection is closed by the server")
            .unwrap();
    }

    // A client that sends part of the HTTP/2 preface and stalls, or nothing at all: closed too.
    for start in [&b"PRI * HTTP/2.0\r\n"[..], b""] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(start).await.unwrap();
        read_to_close(&mut s, Duration::from_secs(30)).await;
    }

    // An idle keep-alive connection is closed too: one request, then silence.
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let raw = read_to_close(&mut s, Duration::from_secs(30)).await;
    assert_eq!(statuses(&raw), [200], "{raw:?}");
}

#[tokio::test]
async fn connections_past_the_limit_wait_for_a_free_slot() {
    let mut env = TestEnv::new().await;
    env.extra_env.extend([
        ("CAPIBARA_HTTP_HEADER_TIMEOUT_S".into(), "1".into()),
        ("CAPIBARA_HTTP_MAX_CONNECTIONS".into(), "4".into()),
    ]);
    let _api = env.spawn_api().await;
    // Four silent connections hold every slot until the header timeout closes them.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(
            TcpStream::connect(("127.0.0.1", env.api_port))
                .await
                .unwrap(),
        );
    }
    // A fifth client is served once one is freed: its connection waited in the backlog.
    let raw = exchange(
        env.api_port,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(statuses(&raw), [200], "{raw:?}");
    for mut s in silent {
        read_to_close(&mut s, Duration::from_secs(30)).await;
    }
}

#[tokio::test]
async fn a_flooded_key_is_held_to_its_rate_while_other_keys_are_answered() {
    const RPS: u64 = 200;
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_RATE_LIMIT_RPS".into(), RPS.to_string()));
    let _api = env.spawn_api().await;
    let admin = env.client();
    let flooded = admin.key_for("default", &["read"]).await;
    let other = admin.key_for("default", &["read"]).await;
    // Warm both keys' cache entries outside the window (the flood key's bucket starts full).
    assert_eq!(other.get("/v1/me").await.status, 200);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, limited) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let sample: Arc<std::sync::Mutex<Option<Res>>> = Default::default();
    let started = Instant::now();
    // 64 keep-alive connections (reqwest pools them) sending as fast as they are answered.
    let flood: Vec<_> = (0..64)
        .map(|_| {
            let (api, stop, ok, limited, sample) = (
                flooded.clone(),
                stop.clone(),
                ok.clone(),
                limited.clone(),
                sample.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = api.get("/v1/me").await;
                    match r.status {
                        429 => {
                            limited.fetch_add(1, Ordering::Relaxed);
                            sample.lock().unwrap().get_or_insert(r);
                        }
                        200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        s => panic!("the flooded key got {s}: {r:?}"),
                    }
                }
            })
        })
        .collect();
    // Another key, at a polite pace during the flood: every request is answered.
    let mut other_answers = 0;
    while started.elapsed() < Duration::from_secs(5) {
        let r = other.get("/v1/me").await;
        assert_eq!(r.status, 200, "another key during the flood: {r:?}");
        other_answers += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    let window = started.elapsed().as_secs_f64();
    let (ok, limited) = (ok.load(Ordering::Relaxed), limited.load(Ordering::Relaxed));
    eprintln!(
        "flood: {} requests in {window:.1} s ({:.0}/s), {ok} accepted, {limited} answered 429; \
         another key: {other_answers} answered",
        ok + limited,
        (ok + limited) as f64 / window,
    );
    // The bucket holds 2× the rate and refills at the rate: no more got through over the window.
    let allowed = 2 * RPS + (RPS as f64 * window).ceil() as u64;
    assert!(
        ok <= allowed,
        "{ok} accepted in {window:.1} s at {RPS}/s (at most {allowed})"
    );
    assert!(limited > 0, "the flood never hit the limit");
    let r = sample.lock().unwrap().take().unwrap();
    assert_problem(&r, 429);
    let retry_after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry_after >= 1, "{r:?}");
    assert!(other_answers > 0);
}
