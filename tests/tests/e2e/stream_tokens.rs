//! Browser-safe streaming auth and CORS, without a browser: `POST /v1/stream-tokens` tokens
//! open the SSE endpoints (`?token=`) and nothing else, expire, never widen their key, and are
//! accepted by every API process; CORS headers appear only for `CAPIBARA_CORS_ORIGINS`; `/ui`
//! is served with its security headers.

use std::time::Duration;

use capibara_tests::{find_free_port, parse_sse, Api, TestEnv};
use serde_json::{json, Value};

/// A request with no `Authorization` header.
async fn raw(req: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, String) {
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap_or_default())
}

async fn token(api: &Api, body: Value) -> String {
    let r = api.post("/v1/stream-tokens", body).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
    r.body["token"].as_str().expect("token").to_string()
}

/// The SSE body of a finished job's stream (it closes after the terminal event).
async fn sse_with_token(api: &Api, path: &str, token: &str) -> (u16, String) {
    let (status, _, body) = raw(api
        .http
        .get(api.url(&format!("{path}?token={token}")))
        .header("Accept", "text/event-stream"))
    .await;
    (status, body)
}

#[tokio::test]
async fn a_stream_token_opens_the_job_stream_and_nothing_else() {
    let env = TestEnv::new().await;
    let (_api, _w, _s) = env.spawn_all().await;
    let admin = env.client();
    let reader = admin.key_for("default", &["read"]).await;
    let id = admin
        .submit_id(json!({"kind": "echo", "input": {"hi": 1}}))
        .await;
    admin.wait_terminal(&id, Duration::from_secs(30)).await;
    let path = format!("/v1/jobs/{id}/events");
    let t = token(&reader, json!({})).await;

    // The job's SSE stream: every event up to the terminal one.
    let (status, body) = sse_with_token(&reader, &path, &t).await;
    assert_eq!(status, 200, "{body}");
    let types: Vec<String> = parse_sse(&body).into_iter().map(|(_, ty, _)| ty).collect();
    assert_eq!(
        types.last().map(String::as_str),
        Some("JobSucceeded"),
        "{types:?}"
    );

    // Not a general credential: other endpoints, the JSON page, the bearer header.
    for (what, req) in [
        (
            "GET /v1/jobs?token=",
            reader.http.get(reader.url(&format!("/v1/jobs?token={t}"))),
        ),
        (
            "GET /v1/jobs/{id}?token=",
            reader
                .http
                .get(reader.url(&format!("/v1/jobs/{id}?token={t}"))),
        ),
        (
            "JSON events page",
            reader.http.get(reader.url(&format!("{path}?token={t}"))),
        ),
        (
            "token as bearer",
            reader.http.get(reader.url("/v1/jobs")).bearer_auth(&t),
        ),
        (
            "token as bearer on a stream",
            reader
                .http
                .get(reader.url(&path))
                .header("Accept", "text/event-stream")
                .bearer_auth(&t),
        ),
        (
            "POST /v1/stream-tokens?token=",
            reader
                .http
                .post(reader.url(&format!("/v1/stream-tokens?token={t}")))
                .json(&json!({})),
        ),
    ] {
        let (status, headers, body) = raw(req).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(
            headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{what}"
        );
    }

    // A token limited to one path opens only that path.
    let other = admin.submit_id(json!({"kind": "echo", "input": {}})).await;
    let one = token(&reader, json!({"path": path})).await;
    assert_eq!(sse_with_token(&reader, &path, &one).await.0, 200);
    let (status, body) = sse_with_token(&reader, &format!("/v1/jobs/{other}/events"), &one).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("does not open this path"), "{body}");

    // A forged token (another secret) is refused.
    let mut forged = t.clone();
    forged.pop();
    forged.push(if t.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(sse_with_token(&reader, &path, &forged).await.0, 401);

    // Only stream paths may be asked for.
    let r = reader
        .post("/v1/stream-tokens", json!({"path": "/v1/jobs"}))
        .await;
    assert_eq!(r.status, 422, "{r:?}");
}

#[tokio::test]
async fn an_expired_stream_token_is_a_401_problem() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_STREAM_TOKEN_TTL_S".into(), "1".into()));
    let _api = env.spawn_api().await;
    let admin = env.client();
    let r = admin.post("/v1/stream-tokens", json!({})).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["expires_in_s"], 1);
    let t = r.body["token"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, headers, body) = raw(admin
        .http
        .get(admin.url(&format!("/v1/events?token={t}")))
        .header("Accept", "text/event-stream"))
    .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let problem: Value = serde_json::from_str(&body).unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("expired"),
        "{problem}"
    );
}

#[tokio::test]
async fn a_stream_token_never_widens_its_key() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let admin = env.client();
    let theirs = admin
        .submit_id(json!({"kind": "echo", "input": {}, "run_at": "2099-01-01T00:00:00Z"}))
        .await;
    let reader = admin.key_for("team-b", &["read"]).await;
    let t = token(&reader, json!({})).await;
    let me = reader.get("/v1/me").await;
    assert_eq!(me.status, 200, "{me:?}");
    assert_eq!(me.body["namespace"], "team-b");
    assert_eq!(me.body["can"]["submit"], false);

    // Another namespace's job: not found, as with the key itself.
    let (status, body) = sse_with_token(&reader, &format!("/v1/jobs/{theirs}/events"), &t).await;
    assert_eq!(status, 404, "{body}");
    // The TTS WebSocket needs `submit`: a read key's token cannot open it.
    let (status, _, body) = raw(reader
        .http
        .get(reader.url(&format!("/v1/tts/stream?token={t}")))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="))
    .await;
    assert_eq!(status, 403, "{body}");
    // A submit key's token opens it (101 Switching Protocols).
    let submitter = admin.key_for("team-b", &["submit"]).await;
    let st = token(&submitter, json!({"path": "/v1/tts/stream"})).await;
    let (status, _, _) = raw(submitter
        .http
        .get(submitter.url(&format!("/v1/tts/stream?token={st}")))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="))
    .await;
    assert_eq!(status, 101);

    // A revoked key's tokens open nothing.
    let keys = admin.get("/v1/api-keys").await;
    let id = keys.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["namespace"] == "team-b" && k["roles"] == json!(["read"]))
        .expect("team-b key")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = admin
        .send(admin.http.delete(admin.url(&format!("/v1/api-keys/{id}"))))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let (status, _, body) = raw(reader
        .http
        .get(reader.url(&format!("/v1/events?token={t}")))
        .header("Accept", "text/event-stream"))
    .await;
    assert_eq!(status, 401, "{body}");
}

#[tokio::test]
async fn every_api_process_accepts_the_others_stream_tokens() {
    let env = TestEnv::new().await;
    let _a = env.spawn_api().await;
    let port = find_free_port();
    let _b = env.spawn_api_on(port).await;
    let admin = env.client();
    let id = admin.submit_id(json!({"kind": "echo", "input": {}})).await;
    let t = token(&admin, json!({})).await;
    // No worker: the job's stream stays open; its headers are what counts.
    let b = Api::new(&format!("http://127.0.0.1:{port}"), "");
    let (status, headers, body) = raw(b
        .http
        .get(b.url(&format!("/v1/jobs/{id}/events?token={t}")))
        .header("Accept", "text/event-stream")
        .timeout(Duration::from_secs(2)))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
}

#[tokio::test]
async fn cors_is_off_by_default_and_on_for_configured_origins() {
    // Off: no CORS headers, whatever the Origin.
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let admin = env.client();
    let preflight = |api: &Api, origin: &str| {
        api.http
            .request(reqwest::Method::OPTIONS, api.url("/v1/jobs"))
            .header("Origin", origin.to_string())
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization,content-type",
            )
    };
    let (_, headers, _) = raw(preflight(&admin, "https://ops.example.com")).await;
    assert!(headers.get("access-control-allow-origin").is_none());
    let r = admin
        .send(
            admin
                .http
                .get(admin.url("/v1/queues"))
                .header("Origin", "https://ops.example.com"),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.header("access-control-allow-origin").is_none());
    drop(_api);

    // On for the listed origins only.
    let mut env = TestEnv::new().await;
    env.extra_env.push((
        "CAPIBARA_CORS_ORIGINS".into(),
        "https://ops.example.com, http://localhost:5173".into(),
    ));
    let _api = env.spawn_api().await;
    let admin = env.client();
    let (status, headers, _) = raw(preflight(&admin, "https://ops.example.com")).await;
    assert!(status < 300, "{status}");
    assert_eq!(
        headers
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("https://ops.example.com")
    );
    let allowed = headers
        .get("access-control-allow-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");
    let r = admin
        .send(
            admin
                .http
                .get(admin.url("/v1/queues"))
                .header("Origin", "http://localhost:5173"),
        )
        .await;
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("http://localhost:5173")
    );
    let (_, headers, _) = raw(preflight(&admin, "https://evil.example.com")).await;
    assert!(headers.get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn the_dashboard_is_served_from_the_binary_with_a_strict_policy() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    let r = api.http.get(api.url("/ui")).send().await.expect("request");
    // Redirects are followed: /ui → /ui/.
    assert_eq!(r.status(), 200);
    assert_eq!(r.url().path(), "/ui/");
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"));
    assert!(!csp.contains("unsafe-inline"));
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = r.text().await.unwrap();
    assert!(html.contains("/ui/app.js"));

    let r = api.http.get(api.url("/ui/app.js")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    let etag = r.headers()["etag"].clone();
    let r = api
        .http
        .get(api.url("/ui/app.js"))
        .header("If-None-Match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = api.http.get(api.url("/ui/nope.js")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // The dashboard is no part of the API's contract.
    let doc = api.get("/openapi.json").await;
    let paths = doc.body["paths"].as_object().unwrap();
    assert!(paths.keys().all(|p| !p.starts_with("/ui")));
    assert!(paths.contains_key("/v1/stream-tokens") && paths.contains_key("/v1/me"));
}
