//! Secrets encrypted at rest (docs/security.md, "Secrets encrypted at rest"): real binaries, a
//! run and a trigger that use secrets, then every place a value could leak is searched — every
//! table of the database as text, the events, the job inputs, the processes' logs, `/metrics`
//! and error responses. A process without the key refuses to start, and keys rotate.

use std::{path::Path, time::Duration};

use capibara_shared::crypto::Key;
use capibara_tests::{
    find_free_port, run_to_exit,
    runs::{create, ended, start, step},
    Api, Proc, TestEnv,
};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

/// A test env whose scheduler (hooks) and worker listen on known ports, logging at `debug`.
fn env_with_ports(env: &mut TestEnv) -> (String, String) {
    let (hooks, worker) = (find_free_port(), find_free_port());
    for (k, v) in [
        ("CAPIBARA_SCHEDULER_ADDR", format!("127.0.0.1:{hooks}")),
        (
            "CAPIBARA_HOOKS_PUBLIC_URL",
            format!("http://127.0.0.1:{hooks}"),
        ),
        ("CAPIBARA_WORKER_ADDR", format!("127.0.0.1:{worker}")),
        ("CAPIBARA_LOG", "debug".to_string()),
    ] {
        env.extra_env.push((k.into(), v));
    }
    (
        format!("http://127.0.0.1:{hooks}"),
        format!("http://127.0.0.1:{worker}"),
    )
}

/// API, worker and scheduler with their output in `dir`; waits until each answers.
async fn spawn_logged(env: &TestEnv, dir: &Path, hooks: &str, worker: &str) -> Vec<Proc> {
    let procs = vec![
        env.spawn_logged("api", "capibara-api", &[], &dir.join("api.log")),
        env.spawn_logged("worker", "capibara-worker", &[], &dir.join("worker.log")),
        env.spawn_logged(
            "scheduler",
            "capibara-scheduler",
            &[],
            &dir.join("scheduler.log"),
        ),
    ];
    for url in [env.api_url(), hooks.to_string(), worker.to_string()] {
        capibara_tests::wait_http_ok(&format!("{url}/healthz")).await;
    }
    procs
}

async fn put_secret(api: &Api, name: &str, value: &str) -> (u16, String) {
    let r = api
        .http
        .put(api.url(&format!("/v1/secrets/{name}")))
        .bearer_auth(&api.key)
        .json(&json!({"value": value}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn call_hmac(url: &str, secret: &str) -> u16 {
    let body = b"{\"action\":\"opened\"}";
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    reqwest::Client::new()
        .post(url)
        .header("X-Hub-Signature-256", sig)
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Tables of the database whose rows, as text, contain `needle`.
async fn tables_containing(pool: &sqlx::PgPool, needle: &str) -> Vec<String> {
    let tables: Vec<(String,)> = sqlx::query_as(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(tables.len() > 20, "{tables:?}");
    let mut found = Vec::new();
    for (t,) in tables {
        let (n,): (i64,) = sqlx::query_as(&format!(
            "SELECT count(*) FROM \"{t}\" AS r WHERE strpos(r::text, $1) > 0"
        ))
        .bind(needle)
        .fetch_one(pool)
        .await
        .unwrap();
        if n > 0 {
            found.push(t);
        }
    }
    found
}

/// A fresh directory for the processes' logs.
fn log_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "capibara-secrets-at-rest-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The key id of base64 `key`.
fn key_id(key: &str) -> String {
    Key::parse(key).unwrap().id().to_string()
}

/// `(table, key_id)` of every encrypted row.
async fn key_ids(pool: &sqlx::PgPool) -> Vec<(String, Option<String>)> {
    sqlx::query_as(
        "SELECT 'secrets', key_id FROM secrets
         UNION ALL SELECT 'trigger_credentials', key_id FROM trigger_credentials
         UNION ALL SELECT 'server_secrets', key_id FROM server_secrets",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A workflow whose step echoes `{{ secrets.TOKEN }}`; returns the ended run.
async fn run_with_secret(api: &Api, workflow: &str) -> Value {
    let run = start(api, workflow, json!({})).await;
    ended(api, &run, Duration::from_secs(30)).await
}

#[tokio::test]
async fn secret_values_are_encrypted_at_rest_and_appear_nowhere_after_a_run() {
    let mut env = TestEnv::new().await;
    let (hooks, worker) = env_with_ports(&mut env);
    let dir = log_dir();
    let mut procs = spawn_logged(&env, &dir, &hooks, &worker).await;
    let api = env.client();

    let token = "zebra-token-value-7f3a91c2";
    let hmac_secret = "quokka-hmac-secret-5d18e0b4";
    let values = [token, hmac_secret];
    assert_eq!(put_secret(&api, "TOKEN", token).await.0, 200);
    // Error responses name what is wrong, not the value.
    let (status, body) = put_secret(&api, "bad name", token).await;
    assert_eq!(status, 422);
    assert!(!body.contains(token), "{body}");
    let r = api
        .http
        .put(api.url("/v1/secrets/OTHER"))
        .bearer_auth(&api.key)
        .json(&json!({"value": token, "unknown": 1}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());
    let body = r.text().await.unwrap();
    assert!(!body.contains(token), "{body}");

    let workflow = create(
        &api,
        json!({"name": "uses-secret", "steps": [
            {"id": "call", "kind": "echo", "input": {"auth": "Bearer {{ secrets.TOKEN }}"}},
        ]}),
    )
    .await;
    let done = run_with_secret(&api, &workflow).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(step(&done, "call")["output"]["auth"], "Bearer ***");
    let job = step(&done, "call")["job_id"].as_str().unwrap().to_string();
    assert_eq!(
        api.job(&job).await["input"]["auth"],
        "Bearer ${secret:TOKEN}"
    );

    let r = api
        .post(
            "/v1/triggers",
            json!({"name": "gh", "auth": {"type": "hmac_sha256", "secret": hmac_secret},
                   "target": {"type": "job", "job": {"kind": "echo"}}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let hook = r.body["url"].as_str().unwrap().to_string();
    assert_eq!(call_hmac(&hook, hmac_secret).await, 202);
    assert_eq!(call_hmac(&hook, "a-wrong-secret").await, 401);
    // The stream-token signing key is a stored secret too.
    let r = api.post("/v1/stream-tokens", json!({})).await;
    assert_eq!(r.status, 201, "{r:?}");

    // Every encrypted row is under this test's key; no table holds a value as text.
    let pool = env.pool().await;
    let rows = key_ids(&pool).await;
    let tables: Vec<&str> = rows.iter().map(|(t, _)| t.as_str()).collect();
    for t in ["secrets", "trigger_credentials", "server_secrets"] {
        assert!(tables.contains(&t), "no {t} row: {rows:?}");
    }
    let id = key_id(&env.secrets_key);
    assert!(
        rows.iter().all(|(_, k)| k.as_deref() == Some(id.as_str())),
        "{rows:?}"
    );
    for v in values {
        assert_eq!(
            tables_containing(&pool, v).await,
            Vec::<String>::new(),
            "{v}"
        );
    }
    let (leaks,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM events WHERE strpos(data::text, $1) > 0 OR strpos(data::text, $2) > 0",
    )
    .bind(token)
    .bind(hmac_secret)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(leaks, 0);

    // Nor does any process's /metrics, nor its log.
    for url in [env.api_url(), hooks.clone(), worker.clone()] {
        let metrics = capibara_tests::scrape(&url).await;
        assert!(metrics.contains("# TYPE"), "{url}: {metrics}");
        for v in values {
            assert!(!metrics.contains(v), "{url}/metrics shows a secret");
        }
    }
    for p in &mut procs {
        p.terminate(Duration::from_secs(10));
    }
    for name in ["api", "worker", "scheduler"] {
        let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap();
        assert!(!log.is_empty(), "{name} logged nothing at debug");
        for v in values {
            assert!(!log.contains(v), "{name}'s log shows a secret");
        }
    }
}

#[tokio::test]
async fn a_process_without_a_usable_key_refuses_to_start_with_a_clear_error() {
    let env = TestEnv::new().await;
    for bin in ["capibara-api", "capibara-worker", "capibara-scheduler"] {
        let mut c = env.command_for(bin);
        c.env("CAPIBARA_SECRETS_KEY", "");
        let (status, err) = run_to_exit(c);
        assert!(!status.success(), "{bin} started without a key");
        assert_eq!(err.trim().lines().count(), 1, "{bin}: {err}");
        assert!(err.contains("CAPIBARA_SECRETS_KEY"), "{bin}: {err}");
        assert!(err.contains("openssl rand -base64 32"), "{bin}: {err}");

        let mut c = env.command_for(bin);
        c.env("CAPIBARA_SECRETS_KEY", "c2hvcnQ=");
        let (status, err) = run_to_exit(c);
        assert!(!status.success(), "{bin} started with a 5-byte key");
        assert!(
            err.contains("CAPIBARA_SECRETS_KEY") && err.contains("not 32"),
            "{bin}: {err}"
        );
    }
}

#[tokio::test]
async fn keys_rotate_without_downtime_and_plain_text_rows_are_encrypted() {
    let mut env = TestEnv::new().await;
    let (hooks, worker) = env_with_ports(&mut env);
    let dir = log_dir();
    let old_key = env.secrets_key.clone();
    let new_key = capibara_shared::crypto::generate_key();
    let new_id = key_id(&new_key);

    // Under the old key: a secret, a trigger, and a row from before encryption (plain text).
    let mut procs = spawn_logged(&env, &dir, &hooks, &worker).await;
    let api = env.client();
    assert_eq!(
        put_secret(&api, "TOKEN", "rotating-token-value-1").await.0,
        200
    );
    let r = api
        .post(
            "/v1/triggers",
            json!({"name": "gh", "auth": {"type": "hmac_sha256", "secret": "rotating-hmac-value-2"},
                   "target": {"type": "job", "job": {"kind": "echo"}}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let hook = r.body["url"].as_str().unwrap().to_string();
    let pool = env.pool().await;
    sqlx::query(
        "INSERT INTO secrets (namespace, name, value, created_at, updated_at)
         VALUES ('default', 'LEGACY', 'legacy-plain-value-3', now(), now())",
    )
    .execute(&pool)
    .await
    .unwrap();
    let workflow = create(
        &api,
        json!({"name": "uses-secrets", "steps": [
            {"id": "call", "kind": "echo",
             "input": {"auth": "Bearer {{ secrets.TOKEN }}", "legacy": "{{ secrets.LEGACY }}"}},
        ]}),
    )
    .await;
    let done = run_with_secret(&api, &workflow).await;
    assert_eq!(step(&done, "call")["output"]["legacy"], "***", "{done}");
    for p in &mut procs {
        p.terminate(Duration::from_secs(10));
    }

    // Deploy with the new key current and the old one accepted; the scheduler re-encrypts at
    // startup and `capibara secrets rotate` finishes (or finds nothing left).
    env.extra_env
        .push(("CAPIBARA_SECRETS_KEY".into(), new_key.clone()));
    env.extra_env
        .push(("CAPIBARA_SECRETS_OLD_KEYS".into(), old_key.clone()));
    let mut procs = spawn_logged(&env, &dir, &hooks, &worker).await;
    // The scheduler's pass may hold rows for a moment (they are skipped, not waited for): run
    // the command until it reports nothing left, as an operator would.
    let done = format!("under key {new_id}, 0 remaining");
    capibara_tests::eventually(
        "the rotation to finish",
        Duration::from_secs(20),
        || async {
            let out = env
                .command_for("capibara")
                .args(["secrets", "rotate"])
                .output()
                .unwrap();
            let printed = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "{printed} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            printed.contains(&done).then_some(())
        },
    )
    .await;
    let rows = key_ids(&pool).await;
    assert!(
        rows.iter()
            .all(|(_, k)| k.as_deref() == Some(new_id.as_str())),
        "{rows:?}"
    );
    assert!(rows.len() >= 3, "{rows:?}");
    assert_eq!(
        tables_containing(&pool, "legacy-plain-value-3").await,
        Vec::<String>::new()
    );
    for p in &mut procs {
        p.terminate(Duration::from_secs(10));
    }

    // The old key removed: everything still reads, a job uses the secrets, the hook checks calls.
    env.extra_env
        .retain(|(k, _)| k != "CAPIBARA_SECRETS_OLD_KEYS");
    let _procs = spawn_logged(&env, &dir, &hooks, &worker).await;
    let done = run_with_secret(&api, &workflow).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(step(&done, "call")["output"]["auth"], "Bearer ***");
    assert_eq!(step(&done, "call")["output"]["legacy"], "***");
    assert_eq!(call_hmac(&hook, "rotating-hmac-value-2").await, 202);

    // A process given only the old key refuses to start, naming the key the rows use.
    let mut c = env.command_for("capibara-api");
    c.env("CAPIBARA_SECRETS_KEY", &old_key).env(
        "CAPIBARA_API_ADDR",
        format!("127.0.0.1:{}", find_free_port()),
    );
    let (status, err) = run_to_exit(c);
    assert!(!status.success());
    assert!(
        err.contains(&new_id) && err.contains("CAPIBARA_SECRETS_OLD_KEYS"),
        "{err}"
    );
}
