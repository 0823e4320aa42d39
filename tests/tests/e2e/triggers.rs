//! Inbound webhook triggers: the three auth schemes, replays, limits, input mapping, and the
//! record of every call on the trigger stream.

use std::time::Duration;

use capibara_shared::domain::webhook::WebhookSecret;
use capibara_tests::{find_free_port, Api, Proc, TestEnv};
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
    assert_eq!(r.body["auth"]["secret"], "***");
    assert_eq!(r.body["secret"], secret.as_str(), "shown once, at creation");

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
    // One refusal per status a minute is recorded; the other two 401s only counted.
    assert_eq!(
        types,
        [
            "TriggerCreated",
            "TriggerInvoked",
            "TriggerRejected",
            "TriggerRejected",
        ]
    );
    let statuses: Vec<u64> = events
        .iter()
        .filter(|(t, _)| t == "TriggerRejected")
        .map(|(_, d)| d["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [409, 401]);
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
    let second = call("a-long-enough-token-123").await.unwrap();
    assert_eq!(
        second.status(),
        202,
        "2 per minute; the unauthenticated call spent nothing"
    );
    let limited = call("a-long-enough-token-123").await.unwrap();
    assert_eq!(limited.status(), 429, "2 per minute");
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

/// A hook call with a bearer token.
async fn call_bearer(http: &reqwest::Client, url: &str, token: &str) -> u16 {
    http.post(url)
        .bearer_auth(token)
        .json(&json!({"a": 1}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A Standard Webhooks call signed with `key`.
async fn call_signed(
    http: &reqwest::Client,
    url: &str,
    key: &WebhookSecret,
    msg_id: &str,
    ts: i64,
) -> u16 {
    let body = "{\"n\": 1}";
    http.post(url)
        .header("webhook-id", msg_id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", key.sign(msg_id, ts, body.as_bytes()))
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// A deployment with its hooks endpoint up, and admin clients of two namespaces.
async fn two_teams() -> (TestEnv, (Proc, Proc, Proc), (Api, Api)) {
    let (env, hooks) = env_with_hooks().await;
    let procs = env.spawn_all().await;
    capibara_tests::wait_http_ok(&format!("{hooks}/healthz")).await;
    let admin = env.client();
    let teams = (
        admin.key_for("team-a", &["admin"]).await,
        admin.key_for("team-b", &["admin"]).await,
    );
    (env, procs, teams)
}

async fn create_trigger(api: &capibara_tests::Api, body: Value) -> (String, String, String) {
    let r = api.post("/v1/triggers", body).await;
    assert_eq!(r.status, 201, "{r:?}");
    (
        r.body["id"].as_str().unwrap().to_string(),
        r.body["url"].as_str().unwrap().to_string(),
        r.body["secret"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn trigger_credentials_are_shown_once_and_never_enter_the_log() {
    let (env, hooks) = env_with_hooks().await;
    let _procs = env.spawn_all().await;
    capibara_tests::wait_http_ok(&format!("{hooks}/healthz")).await;
    let admin = env.client();
    let (a, b) = (
        admin.key_for("team-a", &["admin"]).await,
        admin.key_for("team-b", &["admin"]).await,
    );
    let a_read = a.key_for("team-a", &["read"]).await;
    let http = reqwest::Client::new();
    let echo = json!({"type": "job", "job": {"kind": "echo"}});

    // A bearer token left out is generated and shown once; a given HMAC secret is kept.
    let (bearer_id, bearer_url, token) = create_trigger(
        &a,
        json!({"name": "gen", "auth": {"type": "bearer"}, "target": echo}),
    )
    .await;
    assert!(token.len() >= 32, "{token}");
    let hmac_secret = "team-a-hmac-secret-0123456789";
    let (_, hmac_url, shown) = create_trigger(
        &a,
        json!({"name": "gh", "auth": {"type": "hmac_sha256", "secret": hmac_secret}, "target": echo}),
    )
    .await;
    assert_eq!(shown, hmac_secret);
    let (_, b_url, b_secret) = create_trigger(
        &b,
        json!({"name": "sw", "auth": {"type": "standard_webhooks"}, "target": echo}),
    )
    .await;
    let b_key = WebhookSecret::parse(&b_secret).unwrap();

    // Every credential still authenticates its hook, side by side.
    assert_eq!(call_bearer(&http, &bearer_url, &token).await, 202);
    assert_eq!(
        call_bearer(&http, &bearer_url, "not-the-token-at-all").await,
        401
    );
    let body = b"{\"action\":\"opened\"}";
    let mut mac = Hmac::<Sha256>::new_from_slice(hmac_secret.as_bytes()).unwrap();
    mac.update(body);
    let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let r = http
        .post(&hmac_url)
        .header("X-Hub-Signature-256", &sig)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let now = chrono::Utc::now().timestamp();
    assert_eq!(call_signed(&http, &b_url, &b_key, "m1", now).await, 202);

    // A read key sees triggers and their events, never a credential.
    let credentials = [token.as_str(), hmac_secret, b_secret.as_str()];
    for (who, path) in [
        (&a_read, "/v1/triggers".to_string()),
        (&a_read, format!("/v1/triggers/{bearer_id}")),
        (&a_read, "/v1/events?stream_type=trigger".to_string()),
        (&b, "/v1/events?stream_type=trigger".to_string()),
    ] {
        // The firehose serves events once the log reader's horizon has passed them.
        let text = capibara_tests::eventually(&path, Duration::from_secs(10), || async {
            let r = who.get(&path).await;
            assert_eq!(r.status, 200, "{path}: {r:?}");
            let text = r.body.to_string();
            (text.contains("TriggerCreated") || path.starts_with("/v1/triggers")).then_some(text)
        })
        .await;
        for c in credentials {
            assert!(!text.contains(c), "{path} shows a credential: {text}");
        }
    }
    let pool = env.pool().await;
    for c in credentials {
        let (n,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM events WHERE data::text LIKE '%' || $1 || '%'")
                .bind(c)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(n, 0, "a credential is in the log");
    }
    // Credentials are encrypted at rest (the bearer token, besides, only as its SHA-256).
    let stored: Vec<(Value, Option<String>)> =
        sqlx::query_as("SELECT credential, key_id FROM trigger_credentials")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(!stored.is_empty());
    for (credential, key_id) in &stored {
        assert!(key_id.is_some(), "{credential}");
        assert!(
            credential.as_str().is_some_and(|c| c.starts_with("v1:")),
            "{credential}"
        );
        for c in credentials {
            assert!(!credential.to_string().contains(c), "{credential}");
        }
    }

    // A trigger made before this fix (raw token in its event and row, no stored credential) is
    // repaired by the migration: the credential moves out of the log and the hook still works.
    let legacy = "legacy-token-0123456789";
    let (old_id, old_url, _) = create_trigger(
        &a,
        json!({"name": "old", "auth": {"type": "bearer", "token": legacy}, "target": echo}),
    )
    .await;
    let mut tx = pool.begin().await.unwrap();
    sqlx::raw_sql(&format!(
        "SET LOCAL capibara.allow_event_rewrite = 'on';
         UPDATE events SET data = jsonb_set(data, '{{auth}}', '{{\"type\": \"bearer\", \"token\": \"{legacy}\"}}')
          WHERE stream_id = '{old_id}' AND type = 'TriggerCreated';
         UPDATE triggers SET auth = '{{\"type\": \"bearer\", \"token\": \"{legacy}\"}}' WHERE id = '{old_id}';
         DELETE FROM trigger_credentials WHERE trigger_id = '{old_id}';"
    ))
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let migration = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../migrations/20261203000111_trigger_credentials.sql"),
    )
    .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::raw_sql(&migration).execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(call_bearer(&http, &old_url, legacy).await, 202);
    let (n,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM events WHERE data::text LIKE '%legacy-token%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(n, 0, "the migration scrubbed the old event");
    assert!(!a_read
        .get("/v1/triggers")
        .await
        .body
        .to_string()
        .contains(legacy));

    // A projection rebuilt from the log still holds no credential, and every hook still works.
    env.rebuild_projections();
    let listed = a_read.get("/v1/triggers").await.body.to_string();
    for c in [legacy, token.as_str(), hmac_secret] {
        assert!(!listed.contains(c), "{listed}");
    }
    assert_eq!(call_bearer(&http, &bearer_url, &token).await, 202);
    assert_eq!(call_bearer(&http, &old_url, legacy).await, 202);
}

#[tokio::test]
async fn an_unauthenticated_flood_neither_locks_out_the_sender_nor_floods_the_log() {
    let (env, _procs, (a, b)) = two_teams().await;
    let http = reqwest::Client::new();
    let trigger = |token: &str| {
        json!({"name": "t", "auth": {"type": "bearer", "token": token}, "rate_limit_per_minute": 3,
               "target": {"type": "job", "job": {"kind": "echo"}}})
    };
    let (a_id, a_url, a_token) = create_trigger(&a, trigger("team-a-token-0123456789")).await;
    let (b_id, b_url, b_token) = create_trigger(&b, trigger("team-b-token-0123456789")).await;

    // Forty calls without the credential, ten times the trigger's rate: all 401, never 429.
    for i in 0..40 {
        let status = call_bearer(&http, &a_url, &format!("guess-{i}-0123456789")).await;
        assert_eq!(status, 401, "call {i}");
    }
    // The sender with the credential is not locked out, nor is the other tenant.
    assert_eq!(call_bearer(&http, &a_url, &a_token).await, 202);
    assert_eq!(call_bearer(&http, &b_url, &b_token).await, 202);

    // One refusal recorded (the rest counted in the next record and the metric), not forty.
    let pool = env.pool().await;
    let a_events = stream_types(&pool, &a_id).await;
    let rejected: Vec<&Value> = a_events
        .iter()
        .filter(|(t, _)| t == "TriggerRejected")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(rejected.len(), 1, "{a_events:?}");
    assert_eq!(rejected[0]["status"], 401);
    let b_types: Vec<String> = stream_types(&pool, &b_id)
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(b_types, ["TriggerCreated", "TriggerInvoked"]);
}

#[tokio::test]
async fn a_failed_start_leaves_no_receipt_so_the_retry_starts_exactly_one_job() {
    let (env, _procs, (a, b)) = two_teams().await;
    let http = reqwest::Client::new();
    let trigger = json!({"name": "sw", "auth": {"type": "standard_webhooks"},
                         "target": {"type": "job", "job": {"kind": "echo"}}});
    let (a_id, a_url, a_secret) = create_trigger(&a, trigger.clone()).await;
    let (_, b_url, b_secret) = create_trigger(&b, trigger).await;
    let (a_key, b_key) = (
        WebhookSecret::parse(&a_secret).unwrap(),
        WebhookSecret::parse(&b_secret).unwrap(),
    );
    let now = chrono::Utc::now().timestamp();

    // A validly signed timestamp 2^63 seconds in the past is refused (no i64 overflow).
    assert_eq!(
        call_signed(&http, &a_url, &a_key, "ancient", now.wrapping_add(i64::MIN)).await,
        401
    );

    // Postgres refuses team-a's hook jobs for a while: a real failure of the transaction that
    // would start the job.
    let pool = env.pool().await;
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse_hook_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'injected failure'; END $$;
         CREATE TRIGGER refuse_hook_jobs BEFORE INSERT ON jobs FOR EACH ROW
           WHEN (NEW.tags->>'trigger_id' = '{a_id}') EXECUTE FUNCTION refuse_hook_jobs();"
    ))
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(call_signed(&http, &a_url, &a_key, "msg-1", now).await, 503);
    // The other tenant's hook is not affected.
    assert_eq!(call_signed(&http, &b_url, &b_key, "msg-1", now).await, 202);
    sqlx::raw_sql("DROP TRIGGER refuse_hook_jobs ON jobs")
        .execute(&pool)
        .await
        .unwrap();

    // The sender retries the same message: it is accepted once, then a replay.
    assert_eq!(call_signed(&http, &a_url, &a_key, "msg-1", now).await, 202);
    assert_eq!(call_signed(&http, &a_url, &a_key, "msg-1", now).await, 409);
    let (jobs,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM jobs WHERE tags->>'trigger_id' = $1")
            .bind(&a_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(jobs, 1);
}

/// A call whose body Postgres cannot store (a NUL character, in JSON or in raw text) is refused
/// with a 422: a 503 would have the sender retry the same body forever. The next good call is
/// accepted.
#[tokio::test]
async fn a_call_with_a_nul_character_is_a_422_not_a_retry() {
    let (env, hooks) = env_with_hooks().await;
    let _procs = env.spawn_all().await;
    capibara_tests::wait_http_ok(&format!("{hooks}/healthz")).await;
    let api = env.client();
    let http = reqwest::Client::new();
    let r = api
        .post(
            "/v1/triggers",
            json!({"name": "nul", "auth": {"type": "bearer", "token": "a-long-enough-token-123"},
                   "target": {"type": "job", "job": {"kind": "echo"}}}),
        )
        .await;
    let url = r.body["url"].as_str().unwrap().to_string();
    let call = |body: Vec<u8>, content_type: &'static str| {
        http.post(&url)
            .bearer_auth("a-long-enough-token-123")
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let json_nul = call(br#"{"a": "x\u0000y"}"#.to_vec(), "application/json")
        .await
        .unwrap();
    assert_eq!(json_nul.status(), 422);
    let text_nul = call(b"x\0y".to_vec(), "text/plain").await.unwrap();
    assert_eq!(text_nul.status(), 422);
    let ok = call(br#"{"a": 1}"#.to_vec(), "application/json")
        .await
        .unwrap();
    assert_eq!(ok.status(), 202);
}

/// Calls of one hook sent at once: distinct messages are all accepted (a call that loses the
/// race on the trigger's stream tries again), and copies of one message start exactly one job
/// or run: the copies that lose the race find the receipt and answer 409.
#[tokio::test]
async fn concurrent_calls_are_all_accepted_and_copies_of_one_message_start_once() {
    let (env, _procs, (a, _)) = two_teams().await;
    let http = reqwest::Client::new();
    let wf = capibara_tests::runs::create(
        &a,
        json!({"name": "hooked", "steps": [{"id": "a", "kind": "echo", "input": {"v": 1}}]}),
    )
    .await;
    let pool = env.pool().await;
    let now = chrono::Utc::now().timestamp();
    for target in [
        json!({"type": "job", "job": {"kind": "echo"}}),
        json!({"type": "workflow", "workflow_id": wf}),
    ] {
        let (id, url, secret) = create_trigger(
            &a,
            json!({"name": "burst", "auth": {"type": "standard_webhooks"}, "target": target}),
        )
        .await;
        let key = WebhookSecret::parse(&secret).unwrap();
        let messages: Vec<String> = (0..12)
            .map(|i| format!("distinct-{i}"))
            .chain((0..12).map(|_| "copied".to_string()))
            .collect();
        let answers = futures::future::join_all(
            messages
                .iter()
                .map(|m| call_signed(&http, &url, &key, m, now)),
        )
        .await;
        assert!(
            answers[..12].iter().all(|s| *s == 202),
            "{target}: {answers:?}"
        );
        let copies = &answers[12..];
        assert_eq!(
            copies.iter().filter(|s| **s == 202).count(),
            1,
            "{target}: {answers:?}"
        );
        assert_eq!(
            copies.iter().filter(|s| **s == 409).count(),
            11,
            "{target}: {answers:?}"
        );
        let (invoked,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM events WHERE stream_id = $1::uuid AND type = 'TriggerInvoked'",
        )
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(invoked, 13, "{target}");
        let (started,): (i64,) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM jobs WHERE tags->>'trigger_id' = $1)
                  + (SELECT count(*) FROM events WHERE type = 'RunStarted'
                       AND metadata->>'actor' = 'trigger:' || $1)",
        )
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(started, 13, "{target}");
    }
}
