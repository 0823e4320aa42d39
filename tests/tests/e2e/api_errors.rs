//! Security basics and error shapes: every failure is RFC 9457 problem+json naming the field.

use std::time::Duration;

use capibara_tests::{Api, Res, TestEnv};
use serde_json::json;

fn assert_problem(r: &Res, status: u16) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/problem+json"),
        "{r:?}"
    );
    assert_eq!(r.body["status"], status);
    assert!(r.body["type"]
        .as_str()
        .unwrap()
        .starts_with("urn:capibara:problem:"));
    assert!(r.body["title"].is_string() && r.body["detail"].is_string());
}

#[tokio::test]
async fn bad_inputs_are_problems_naming_the_field() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();

    let r = api.submit(json!({"kind": "nope"})).await;
    assert_problem(&r, 422);
    assert_eq!(r.body["errors"][0]["field"], "kind");
    assert!(
        r.body["detail"].as_str().unwrap().contains("echo"),
        "lists available kinds"
    );

    let r = api
        .submit(json!({"kind": "sleep", "input": {"ms": -1}}))
        .await;
    assert_problem(&r, 422);
    assert_eq!(r.body["errors"][0]["field"], "input.ms");

    let r = api
        .submit(json!({"kind": "echo", "priority": "urgent"}))
        .await;
    assert_eq!(r.body["errors"][0]["field"], "priority");
    let r = api.submit(json!({"kind": "echo", "max_attempts": 0})).await;
    assert_eq!(r.body["errors"][0]["field"], "max_attempts");
    let r = api.submit(json!({"kind": "echo", "timeout_s": 0})).await;
    assert_eq!(r.body["errors"][0]["field"], "timeout_s");
    let r = api
        .submit(json!({"kind": "echo", "queue": "bad queue!"}))
        .await;
    assert_eq!(r.body["errors"][0]["field"], "queue");
    let r = api
        .submit(json!({"kind": "echo", "run_at": "tomorrow"}))
        .await;
    assert_eq!(r.body["errors"][0]["field"], "run_at");
    let r = api.submit(json!({"kind": "echo", "surprise": 1})).await;
    assert_problem(&r, 422);
    let r = api
        .submit(json!({"kind": "echo", "backoff": {"factor": 100}}))
        .await;
    assert_eq!(r.body["errors"][0]["field"], "backoff.factor");
    let r = api
        .submit(json!({"kind": "echo", "tags": {"a:b": "c"}}))
        .await;
    assert_eq!(r.body["errors"][0]["field"], "tags.a:b");

    let malformed = api
        .send(
            api.http
                .post(api.url("/v1/jobs"))
                .header("content-type", "application/json")
                .body("{\"kind\": "),
        )
        .await;
    assert_problem(&malformed, 400);
    let not_json = api
        .send(api.http.post(api.url("/v1/jobs")).body("kind=echo"))
        .await;
    assert_problem(&not_json, 415);

    let unknown = api
        .get("/v1/jobs/01a1fe98-8c6f-75a7-8698-419dc9908435")
        .await;
    assert_problem(&unknown, 404);
    assert_problem(&api.get("/v1/jobs/not-a-uuid").await, 404);
    assert_problem(&api.get("/v1/nothing-here").await, 404);
    assert_problem(&api.send(api.http.delete(api.url("/v1/jobs"))).await, 405);
    let r = api
        .send(
            api.http
                .get(api.url("/v1/jobs/01a1fe98-8c6f-75a7-8698-419dc9908435"))
                .header("Prefer", "wait=600"),
        )
        .await;
    assert_problem(&r, 422);
}

#[tokio::test]
async fn oversized_bodies_and_inputs_are_413() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_BODY_LIMIT_BYTES".into(), "20000".into()));
    env.extra_env
        .push(("CAPIBARA_INPUT_LIMIT_BYTES".into(), "1000".into()));
    let _api = env.spawn_api().await;
    let api = env.client();

    let big = "x".repeat(30_000);
    assert_problem(
        &api.submit(json!({"kind": "echo", "input": {"s": big}}))
            .await,
        413,
    );
    let medium = "x".repeat(2_000);
    let r = api
        .submit(json!({"kind": "echo", "input": {"s": medium}}))
        .await;
    assert_problem(&r, 413);
    assert!(r.body["detail"].as_str().unwrap().contains("input"));
    assert_eq!(
        api.submit(json!({"kind": "echo", "input": {"s": "small"}}))
            .await
            .status,
        202
    );
}

#[tokio::test]
async fn keys_are_required_and_roles_enforced() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let admin = env.client();

    let anonymous = Api::new(&env.api_url(), "");
    let r = anonymous
        .send(anonymous.http.get(anonymous.url("/v1/jobs")))
        .await;
    assert_problem(&r, 401);
    assert_problem(&admin.with_key("cap_wrong").get("/v1/jobs").await, 401);

    let r = admin
        .post("/v1/api-keys", json!({"name": "reader", "roles": ["read"]}))
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let secret = r.body["key"].as_str().unwrap().to_string();
    assert!(secret.starts_with("cap_"));
    let reader = admin.with_key(&secret);
    assert_eq!(reader.get("/v1/jobs").await.status, 200);
    assert_problem(&reader.submit(json!({"kind": "echo"})).await, 403);
    assert_problem(
        &reader
            .post("/v1/api-keys", json!({"name": "x", "roles": ["admin"]}))
            .await,
        403,
    );

    // Stored hashed: the secret itself is nowhere in the table.
    let pool = env.pool().await;
    let (hits,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM api_keys WHERE key_hash = $1 OR prefix = $1")
            .bind(&secret)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(hits, 0);

    let r = admin
        .post("/v1/api-keys", json!({"name": "x", "roles": ["owner"]}))
        .await;
    assert_problem(&r, 422);
    assert_eq!(r.body["errors"][0]["field"], "roles[0]");
    let r = admin
        .post(
            "/v1/api-keys",
            json!({"name": "x", "roles": ["read"], "namespace": "Bad NS"}),
        )
        .await;
    assert_eq!(r.body["errors"][0]["field"], "namespace");
}

#[tokio::test]
async fn namespaces_do_not_see_each_other() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let admin = env.client();
    let r = admin
        .post(
            "/v1/api-keys",
            json!({"name": "team-b", "roles": ["submit"], "namespace": "team-b"}),
        )
        .await;
    let team_b = admin.with_key(r.body["key"].as_str().unwrap());

    let id = admin.submit_id(json!({"kind": "echo"})).await;
    let theirs = team_b.submit_id(json!({"kind": "echo"})).await;

    assert_eq!(team_b.get(&format!("/v1/jobs/{id}")).await.status, 404);
    let listed = team_b.get("/v1/jobs").await;
    let ids: Vec<&str> = listed.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [theirs.as_str()]);
    assert_eq!(team_b.job(&theirs).await["namespace"], "team-b");
    assert_eq!(
        team_b
            .post(&format!("/v1/jobs/{id}/cancel"), json!({}))
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_RATE_LIMIT_RPS".into(), "5".into()));
    let _api = env.spawn_api().await;
    let api = env.client();
    let mut limited = None;
    for _ in 0..30 {
        let r = api.get("/v1/jobs").await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("a 429 within 30 quick requests at 5 rps");
    assert_problem(&r, 429);
    let retry_after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(api.get("/v1/jobs").await.status, 200);
}

#[tokio::test]
async fn an_idempotency_key_replays_and_rejects_a_different_body() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    let send = |body: serde_json::Value| {
        let api = api.clone();
        async move {
            api.send(
                api.http
                    .post(api.url("/v1/jobs"))
                    .header("Idempotency-Key", "order-7")
                    .json(&body),
            )
            .await
        }
    };
    let first = send(json!({"kind": "echo", "input": {"n": 1}})).await;
    let again = send(json!({"kind": "echo", "input": {"n": 1}})).await;
    assert_eq!(first.status, 202);
    assert_eq!(again.status, 202);
    assert_eq!(first.body["id"], again.body["id"]);
    assert_eq!(again.header("idempotent-replayed").as_deref(), Some("true"));

    let different = send(json!({"kind": "echo", "input": {"n": 2}})).await;
    assert_problem(&different, 422);
    assert_eq!(different.body["errors"][0]["field"], "Idempotency-Key");
}

#[tokio::test]
async fn ten_clients_racing_with_one_idempotency_key_create_one_job() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    let body = json!({"kind": "echo", "input": {"race": true}});
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let api = Api::new(&api.base, &api.key);
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            api.send(
                api.http
                    .post(api.url("/v1/jobs"))
                    .header("Idempotency-Key", "race-1")
                    .json(&body),
            )
            .await
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 202, "{r:?}");
        ids.push(r.body["id"].as_str().unwrap().to_string());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "all ten got the same job");
    let pool = env.pool().await;
    let (jobs,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    let (submitted,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM events WHERE type = 'JobSubmitted'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((jobs, submitted), (1, 1));
}
