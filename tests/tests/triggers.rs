//! Inbound webhook triggers: the three auth schemes, replays, limits, input mapping, and the
//! record of every call on the trigger stream.

use std::time::Duration;

use capibara_shared::domain::webhook::WebhookSecret;
use capibara_tests::{find_free_port, TestEnv};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

async fn env_with_hooks() -> (TestEnv, String) {
    let mut env = TestEnv::new().await;
    let port = find_free_port();
    env.extra_env.push((
        "CAPIBARA_SCHEDULER_ADDR".into(),
        format!("127.0.0.1:{port}"),
    ));
    env.extra_env.push((
        "CAPIBARA_HOOKS_PUBLIC_URL".into(),
        format!("http://127.0.0.1:{port}"),
    ));
    (env, format!("http://127.0.0.1:{port}"))
}

async fn stream_types(pool: &sqlx::PgPool, id: &str) -> Vec<(String, Value)> {
    sqlx::query_as("SELECT type, data FROM events WHERE stream_id = $1::uuid ORDER BY version")
        .bind(id)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_standard_webhooks_trigger_accepts_signed_calls_and_refuses_bad_ones() {
    let (env, hooks) = env_with_hooks().await;
    let _procs = env.spawn_all().await;
    capibara_tests::wait_http_ok(&format!("{hooks}/healthz")).await;
    let api = env.client();
    let (key, secret) = WebhookSecret::generate();
    let r = api
        .post(
            "/v1/triggers",
            json!({"name": "github-ish", "auth": {"type": "standard_webhooks", "secret": secret},
                   "target": {"type": "job", "job": {"kind": "echo"}},
                   "input": {"repo": "{{ body.repository.name }}", "commits": "{{ body.commits | length }}", "event": "{{ headers['x-event'] }}"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.body["id"].as_str().unwrap().to_string();
    let url = r.body["url"].as_str().unwrap().to_string();
    assert_eq!(url, format!("{hooks}/hooks/{id}"));
    assert_eq!(r.body["auth"]["secret"], "***", "secrets are not returned");

    let http = reqwest::Client::new();
    let body = json!({"repository": {"name": "capibara"}, "commits": [1, 2]}).to_string();
    let send = |msg_id: &str, ts: i64, body: &str, sig: Option<String>| {
        let sig = sig.unwrap_or_else(|| key.sign(msg_id, ts, body.as_bytes()));
        http.post(&url)
            .header("webhook-id", msg_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .header("x-event", "push")
            .body(body.to_string())
            .send()
    };
    let now = chrono::Utc::now().timestamp();
    let ok = send("msg_1", now, &body, None).await.unwrap();
    assert_eq!(ok.status(), 202);
    let accepted: Value = ok.json().await.unwrap();
    let job = api
        .wait_terminal(
            accepted["job_id"].as_str().unwrap(),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(
        job["output"],
        json!({"repo": "capibara", "commits": 2, "event": "push"})
    );
    assert_eq!(job["tags"]["trigger_id"], id.as_str());

    let replay = send("msg_1", now, &body, None).await.unwrap();
    assert_eq!(replay.status(), 409);
    assert_eq!(replay.headers()["content-type"], "application/problem+json");
    let stale = send("msg_2", now - 600, &body, None).await.unwrap();
    assert_eq!(stale.status(), 401);
    let forged = send(
        "msg_3",
        now,
        &body,
        Some("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()),
    )
    .await
    .unwrap();
    assert_eq!(forged.status(), 401);
    let tampered = http
        .post(&url)
        .header("webhook-id", "msg_4")
        .header("webhook-timestamp", now.to_string())
        .header("webhook-signature", key.sign("msg_4", now, body.as_bytes()))
        .body("{\"repository\": {\"name\": \"evil\"}}")
        .send()
        .await
        .unwrap();
    assert_eq!(tampered.status(), 401);
    let big = "x".repeat(2 * 1024 * 1024);
    let too_big = send("msg_5", now, &big, None).await.unwrap();
    assert_eq!(too_big.status(), 413);

    let pool = env.pool().await;
    let events = stream_types(&pool, &id).await;
    let types: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types[..5],
        [
            "TriggerCreated",
            "TriggerInvoked",
            "TriggerRejected",
            "TriggerRejected",
            "TriggerRejected"
        ]
    );
    let statuses: Vec<u64> = events
        .iter()
        .filter(|(t, _)| t == "TriggerRejected")
        .map(|(_, d)| d["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses[..4], [409, 401, 401, 401]);
    let listed = api.get(&format!("/v1/triggers/{id}")).await;
    assert_eq!(listed.body["invocations"], 1);
}

#[tokio::test]
async fn bearer_and_github_style_triggers_authenticate_and_rate_limit() {
    let (env, hooks) = env_with_hooks().await;
    let _procs = env.spawn_all().await;
    capibara_tests::wait_http_ok(&format!("{hooks}/healthz")).await;
    let api = env.client();
    let http = reqwest::Client::new();

    let r = api
        .post(
            "/v1/triggers",
            json!({"name": "bearer", "auth": {"type": "bearer", "token": "a-long-enough-token-123"},
                   "target": {"type": "job", "job": {"kind": "echo"}}, "rate_limit_per_minute": 2}),
        )
        .await;
    let url = r.body["url"].as_str().unwrap().to_string();
    let call = |token: &str| {
        http.post(&url)
            .bearer_auth(token)
            .json(&json!({"a": 1}))
            .send()
    };
    assert_eq!(call("wrong-token-wrong-token").await.unwrap().status(), 401);
    let ok = call("a-long-enough-token-123").await.unwrap();
    assert_eq!(ok.status(), 202);
    let job_id = ok.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        api.wait_terminal(&job_id, Duration::from_secs(10)).await["output"],
        json!({"a": 1}),
        "no template: the body"
    );
    let limited = call("a-long-enough-token-123").await.unwrap();
    assert_eq!(
        limited.status(),
        429,
        "2 per minute, the rejected call counted"
    );
    assert!(limited.headers().contains_key("retry-after"));

    let r = api
        .post(
            "/v1/triggers",
            json!({"name": "gh", "auth": {"type": "hmac_sha256", "secret": "github-secret-0123456789"},
                   "target": {"type": "job", "job": {"kind": "echo"}}}),
        )
        .await;
    let url = r.body["url"].as_str().unwrap().to_string();
    let body = b"{\"action\":\"opened\"}";
    let mut mac = Hmac::<Sha256>::new_from_slice(b"github-secret-0123456789").unwrap();
    mac.update(body);
    let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let ok = http
        .post(&url)
        .header("X-Hub-Signature-256", &sig)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 202);
    let bad = http
        .post(&url)
        .header("X-Hub-Signature-256", "sha256=00")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);

    let unknown = http
        .post(format!(
            "{hooks}/hooks/01a1fe98-8c6f-75a7-8698-419dc9908435"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let bad_template = api
        .post(
            "/v1/triggers",
            json!({"name": "x", "auth": {"type": "bearer", "token": "a-long-enough-token-123"},
                   "target": {"type": "job", "job": {"kind": "echo"}}, "input": {"x": "{{ body. }}"}}),
        )
        .await;
    assert_eq!(bad_template.status, 422);
    assert_eq!(bad_template.body["errors"][0]["field"], "input");
    assert_eq!(
        api.get("/v1/triggers").await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}
