//! `http.request` (docs/http.md) against a local HTTP server on loopback: methods, query,
//! JSON and form bodies, auth from a secret, redirects, statuses that fail with and without a
//! retry (`Retry-After` honoured, each try in the job's history), and the per-host circuit
//! breaker shared through Redis: it opens after repeated failures, refuses calls without
//! sending them, shows at `GET /v1/http/hosts`, and closes after a successful probe. The
//! per-host token bucket: calls from two workers spaced out, deferrals that use no attempt,
//! other hosts unaffected.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use axum::{
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
    routing::{any, get},
    Json, Router,
};
use capibara_tests::{types, Api, TestEnv};
use futures::StreamExt;
use serde_json::{json, Value};

#[derive(Default)]
struct Counts {
    flaky: AtomicUsize,
    down: AtomicUsize,
    healthy: std::sync::atomic::AtomicBool,
    /// When each `/tick` call arrived.
    ticks: std::sync::Mutex<Vec<std::time::Instant>>,
}

type Shared = Arc<Counts>;

async fn echo(
    headers: HeaderMap,
    Query(q): Query<std::collections::BTreeMap<String, String>>,
    body: Bytes,
) -> impl IntoResponse {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    Json(json!({
        "query": q,
        "body": String::from_utf8_lossy(&body),
        "content_type": h("content-type"),
        "authorization": h("authorization"),
        "x_trace": h("x-trace"),
    }))
}

async fn flaky(State(c): State<Shared>) -> impl IntoResponse {
    if c.flaky.fetch_add(1, Ordering::SeqCst) == 0 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "1")],
            "busy",
        )
            .into_response()
    } else {
        "fine now".into_response()
    }
}

async fn down(State(c): State<Shared>) -> impl IntoResponse {
    c.down.fetch_add(1, Ordering::SeqCst);
    if c.healthy.load(Ordering::SeqCst) {
        (StatusCode::OK, "back").into_response()
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response()
    }
}

/// 3 MiB in three pieces 700 ms apart (so the download reports progress), announced length.
async fn big() -> impl IntoResponse {
    let pieces = futures::stream::iter(0..3u8).then(|i| async move {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        Ok::<_, std::io::Error>(Bytes::from(vec![b'a' + i; 1 << 20]))
    });
    (
        [
            ("content-type", "application/x-test"),
            ("content-length", "3145728"),
        ],
        axum::body::Body::from_stream(pieces),
    )
}

async fn serve(counts: Shared) -> String {
    let app = Router::new()
        .route("/big", get(big))
        .route("/echo", any(echo))
        .route("/flaky", get(flaky))
        .route("/down", get(down))
        .route(
            "/tick",
            get(|State(c): State<Shared>| async move {
                c.ticks.lock().unwrap().push(std::time::Instant::now());
                "tick"
            }),
        )
        .route(
            "/missing",
            get(|| async { (StatusCode::NOT_FOUND, "no such thing") }),
        )
        .route(
            "/moved",
            get(|| async { (StatusCode::FOUND, [("location", "/echo?moved=1")]) }),
        )
        .with_state(counts);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn run(api: &Api, input: Value, attempts: u32) -> Value {
    let id = api
        .submit_id(
            json!({"kind": "http.request", "input": input, "max_attempts": attempts,
                          "backoff": {"initial_ms": 100, "factor": 1, "max_ms": 100}}),
        )
        .await;
    api.wait_terminal(&id, Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn http_request_calls_retries_and_breaks_the_circuit_per_host() {
    let mut env = TestEnv::new().await;
    env.extra_env.extend([
        ("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()),
        ("CAPIBARA_HTTP_BREAKER_FAILURES".into(), "3".into()),
        ("CAPIBARA_HTTP_BREAKER_COOLDOWN_S".into(), "2".into()),
    ]);
    let _procs = env.spawn_all().await;
    let api = env.client();
    let counts: Shared = Arc::default();
    let base = serve(counts.clone()).await;

    // Bad inputs are 422s naming the field.
    for (input, field) in [
        (json!({"url": "ftp://x.test"}), "input.url"),
        (
            json!({"url": "https://x.test", "json": {}, "form": {"a": "b"}}),
            "input.form",
        ),
        (
            json!({"url": "https://x.test", "expect_status": [99]}),
            "input.expect_status[0]",
        ),
    ] {
        let r = api
            .submit(json!({"kind": "http.request", "input": input}))
            .await;
        assert_eq!(r.status, 422, "{r:?}");
        assert_eq!(r.body["errors"][0]["field"], field, "{}", r.body);
    }

    // GET with query and headers; the JSON answer is parsed.
    let job = run(
        &api,
        json!({"url": format!("{base}/echo?a=1"), "query": {"b": "2 3"},
               "headers": {"X-Trace": "t-1"}}),
        1,
    )
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let out = &job["output"];
    assert_eq!(out["status"], 200);
    assert_eq!(out["body"]["query"], json!({"a": "1", "b": "2 3"}));
    assert_eq!(out["body"]["x_trace"], "t-1");
    assert!(out["headers"]["content-type"]
        .as_str()
        .unwrap()
        .contains("json"));

    // POST JSON with a bearer token from a secret; a form with basic auth.
    let r = api
        .send(
            api.http
                .put(api.url("/v1/secrets/API_TOKEN"))
                .json(&json!({"value": "s3cr3t"})),
        )
        .await;
    assert!(r.status < 300, "{r:?}");
    let job = run(
        &api,
        json!({"method": "POST", "url": format!("{base}/echo"), "json": {"x": [1, 2]},
               "auth": {"type": "bearer", "secret": "API_TOKEN"}}),
        1,
    )
    .await;
    let body = &job["output"]["body"];
    assert_eq!(body["body"], r#"{"x":[1,2]}"#, "{job}");
    assert_eq!(body["content_type"], "application/json");
    assert_eq!(body["authorization"], "Bearer s3cr3t");
    let events = api.events(job["id"].as_str().unwrap()).await;
    assert!(
        !serde_json::to_string(&events[0])
            .unwrap()
            .contains("s3cr3t"),
        "the input names the secret, not its value"
    );
    let job = run(
        &api,
        json!({"method": "PUT", "url": format!("{base}/echo"), "form": {"a": "1 2"},
               "auth": {"type": "basic", "username": "ada", "secret": "API_TOKEN"},
               "response": "text"}),
        1,
    )
    .await;
    let text: Value = serde_json::from_str(job["output"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(text["body"], "a=1+2");
    assert_eq!(text["authorization"], "Basic YWRhOnMzY3IzdA==");
    let job = run(
        &api,
        json!({"url": format!("{base}/echo"), "auth": {"type": "bearer", "secret": "NOPE"}}),
        3,
    )
    .await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"]["type"], "secret_not_found", "{job}");

    // A redirect is followed.
    let job = run(&api, json!({"url": format!("{base}/moved")}), 1).await;
    assert_eq!(job["output"]["body"]["query"]["moved"], "1", "{job}");
    assert!(job["output"]["url"]
        .as_str()
        .unwrap()
        .ends_with("/echo?moved=1"));

    // 503 with Retry-After: the job's second attempt succeeds, after the server's delay.
    let job = run(&api, json!({"url": format!("{base}/flaky")}), 3).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 2);
    assert_eq!(job["output"]["body"], "fine now");
    let events = api.events(job["id"].as_str().unwrap()).await;
    let failed = events
        .iter()
        .find(|e| e["type"] == "JobAttemptFailed")
        .expect("the first try is in the history");
    assert_eq!(failed["data"]["error"]["type"], "http_status", "{failed}");
    assert!(failed["data"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("503"));
    // Retried no sooner than the server's Retry-After (1 s), not the job's 100 ms backoff.
    let time = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{v}: {e}"))
    };
    let waited = time(&failed["data"]["retry_at"]) - time(&failed["recorded_at"]);
    assert!(waited.num_milliseconds() >= 900, "{failed}");
    assert!(types(&events).contains(&"JobSucceeded".to_string()));

    // 404 is not retried.
    let job = run(&api, json!({"url": format!("{base}/missing")}), 3).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["error"]["type"], "http_status");
    // Unless the caller expects it.
    let job = run(
        &api,
        json!({"url": format!("{base}/missing"), "expect_status": [404]}),
        1,
    )
    .await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["output"]["body"], "no such thing");

    // A large body streamed into an artifact, with progress; the output names it.
    let job = run(
        &api,
        json!({"url": format!("{base}/big"), "response": "artifact", "artifact_name": "big.bin"}),
        1,
    )
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["output"]["body"], Value::Null);
    assert_eq!(job["output"]["artifact"]["size"], 3 << 20, "{job}");
    assert_eq!(job["artifacts"][0]["name"], "big.bin");
    assert_eq!(job["artifacts"][0]["content_type"], "application/x-test");
    let r = api
        .send(
            api.http
                .get(api.url(&format!("/v1/jobs/{id}/artifacts/big.bin"))),
        )
        .await;
    assert_eq!(r.status, 200);
    let progress: Vec<Value> = api
        .events(&id)
        .await
        .into_iter()
        .filter(|e| e["type"] == "JobProgress")
        .collect();
    assert!(!progress.is_empty(), "a download reports progress");
    assert_eq!(
        progress[0]["data"]["data"]["total"],
        3 << 20,
        "{progress:?}"
    );
    // The file as the server sent it (ASCII, so the client's text is its bytes).
    let downloaded = r.body.as_str().unwrap().as_bytes();
    assert_eq!(downloaded.len(), 3 << 20);
    assert_eq!((downloaded[0], downloaded[(2 << 20) + 5]), (b'a', b'c'));
    // Too long for its limit: failed, and nothing stored.
    let job = run(
        &api,
        json!({"url": format!("{base}/big"), "response": "artifact",
               "max_response_bytes": 1048576}),
        1,
    )
    .await;
    assert_eq!(job["error"]["type"], "response_too_large", "{job}");
    assert_eq!(job["artifacts"], json!([]), "{job}");
    let r = api
        .submit(json!({"kind": "http.request",
                       "input": {"url": format!("{base}/big"), "max_response_bytes": 20000000}}))
        .await;
    assert_eq!(r.status, 422, "{r:?}");
    assert_eq!(r.body["errors"][0]["field"], "input.max_response_bytes");

    // The seed endpoints: the input as the body, answered when done.
    let r = api
        .send(
            api.http
                .post(api.url("/v1/http/request"))
                .header("Prefer", "wait=20")
                .json(&json!({"url": format!("{base}/echo"), "query": {"via": "seed"}})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.body["output"]["body"]["query"]["via"], "seed",
        "{}",
        r.body
    );
    let seed_id = r.body["id"].as_str().unwrap().to_string();
    let r = api.get(&format!("/v1/http/requests/{seed_id}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["kind"], "http.request");
    let r = api
        .post(
            "/v1/http/request",
            json!({"url": "https://x.test", "json": {}, "body": "a"}),
        )
        .await;
    assert_eq!(r.status, 422, "{r:?}");
    assert_eq!(r.body["errors"][0]["field"], "json", "{}", r.body);
    let r = api
        .send(
            api.http
                .post(api.url("/v1/http/stream-download"))
                .header("Prefer", "wait=20")
                .json(&json!({"url": format!("{base}/big"), "artifact_name": "seed.bin"})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["artifacts"][0]["name"], "seed.bin", "{}", r.body);
    let r = api
        .post(
            "/v1/http/stream-download",
            json!({"url": "https://x.test", "response": "text"}),
        )
        .await;
    assert_eq!(r.status, 422, "{r:?}");
    assert_eq!(r.body["errors"][0]["field"], "response");
    let other = api
        .submit_id(json!({"kind": "sleep", "input": {"ms": 1}}))
        .await;
    assert_eq!(
        api.get(&format!("/v1/http/requests/{other}")).await.status,
        404
    );
    let health = api.get("/v1/http/health").await;
    assert_eq!(health.body["status"], "ok", "{}", health.body);

    // The breaker: three failures open it; the next call is refused without being sent.
    for _ in 0..3 {
        let job = run(&api, json!({"url": format!("{base}/down")}), 1).await;
        assert_eq!(job["error"]["type"], "http_status", "{job}");
    }
    assert_eq!(counts.down.load(Ordering::SeqCst), 3);
    let job = run(&api, json!({"url": format!("{base}/down")}), 1).await;
    assert_eq!(job["error"]["type"], "circuit_open", "{job}");
    assert_eq!(counts.down.load(Ordering::SeqCst), 3, "nothing was sent");
    let hosts = api.get("/v1/http/hosts").await;
    assert_eq!(hosts.status, 200, "{hosts:?}");
    let host = &hosts.body["items"][0];
    assert_eq!(host["host"], "127.0.0.1");
    assert_eq!(host["state"], "open", "{host}");
    assert!(host["consecutive_failures"].as_u64().unwrap() >= 3);
    assert!(host["open_until"].is_string());

    let health = api.get("/v1/http/health").await;
    assert_eq!(health.body["status"], "degraded", "{}", health.body);
    assert_eq!(health.body["failing_hosts"][0]["host"], "127.0.0.1");
    let m = api.get("/v1/http/metrics").await;
    assert_eq!(m.status, 200, "{m:?}");
    assert_eq!(m.body["breakers"]["open"], 1, "{}", m.body);
    assert!(
        m.body["requests"]["succeeded"].as_i64().unwrap() >= 8,
        "{}",
        m.body
    );
    assert!(
        m.body["requests"]["failed"].as_i64().unwrap() >= 5,
        "{}",
        m.body
    );

    // After the cool-down one call goes through; the host is back, so it closes.
    counts.healthy.store(true, Ordering::SeqCst);
    let job = run(&api, json!({"url": format!("{base}/down")}), 5).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["output"]["body"], "back");
    let hosts = api.get("/v1/http/hosts").await;
    assert_eq!(hosts.body["items"][0]["state"], "closed", "{}", hosts.body);
    assert_eq!(hosts.body["items"][0]["consecutive_failures"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn http_request_rate_limit_spaces_calls_across_workers_and_defers_without_using_attempts() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()));
    let _procs = env.spawn_all().await;
    let _second_worker = env.spawn_worker(&[]);
    let api = env.client();
    let counts: Shared = Arc::default();
    let base = serve(counts.clone()).await;

    // 30 calls at 5 per second from two workers, one attempt each: about 6 s, none fails.
    let rate = json!({"count": 5, "period_s": 1});
    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(
            api.submit_id(json!({"kind": "http.request", "max_attempts": 1,
                "input": {"url": format!("{base}/tick"), "rate_limit": rate}}))
                .await,
        );
    }
    // Another host (the same server by name) is not held up meanwhile.
    let other = base.replace("127.0.0.1", "localhost");
    let free = run(&api, json!({"url": format!("{other}/echo")}), 1).await;
    assert_eq!(free["status"], "succeeded", "{free}");
    let free_done = std::time::Instant::now();

    let mut deferred = 0;
    let mut waited = 0;
    for id in &ids {
        let job = api.wait_terminal(id, Duration::from_secs(90)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let events = api.events(id).await;
        let deferrals = events
            .iter()
            .filter(|e| e["type"] == "JobScheduled" && e["data"]["reason"] == "deferred")
            .count();
        if deferrals > 0 {
            deferred += 1;
            // Each deferral gave its attempt back.
            assert_eq!(job["max_attempts"], 1 + deferrals, "{job}");
            let failed = events
                .iter()
                .find(|e| e["type"] == "JobAttemptFailed")
                .unwrap();
            assert_eq!(failed["data"]["error"]["type"], "rate_limited", "{failed}");
        }
        if job["output"]["rate_wait_ms"].as_f64().unwrap_or(0.0) > 0.0 {
            waited += 1;
        }
    }
    assert!(deferred > 0, "calls more than 2 s away are deferred");
    assert!(waited > 0, "calls less than 2 s away wait in place");

    // Never more than 5 calls (plus one for scheduling jitter) in any second; 30 calls at
    // 200 ms intervals span close to 6 s.
    let mut ticks = counts.ticks.lock().unwrap().clone();
    ticks.sort();
    assert_eq!(ticks.len(), 30);
    for (i, t) in ticks.iter().enumerate() {
        let in_window = ticks[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < Duration::from_secs(1))
            .count();
        assert!(in_window <= 6, "{in_window} calls within 1 s from call {i}");
    }
    let span = ticks[29].duration_since(ticks[0]);
    assert!(span >= Duration::from_millis(5_000), "30 calls in {span:?}");
    assert!(
        free_done < ticks[29],
        "the other host's call waited for the throttled ones"
    );

    // The bucket is shown with the host.
    let hosts = api.get("/v1/http/hosts").await;
    let host = hosts.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "127.0.0.1")
        .cloned()
        .unwrap_or_else(|| panic!("{}", hosts.body));
    assert_eq!(host["rate_limit"]["interval_ms"], 200.0, "{host}");
    assert_eq!(host["rate_limit"]["burst"], 1, "{host}");

    // A bad rate is refused at submission, naming the field.
    let r = api
        .submit(json!({"kind": "http.request",
            "input": {"url": format!("{base}/tick"), "rate_limit": {"count": 0}}}))
        .await;
    assert_eq!(r.status, 422, "{r:?}");
    assert_eq!(
        r.body["errors"][0]["field"], "input.rate_limit.count",
        "{r:?}"
    );
}
