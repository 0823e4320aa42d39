//! Keys, roles and visibility between tenants (docs/security.md "Keys, roles and visibility"):
//! listing and revoking keys, who may mint keys for which namespace, who sees workers, the
//! per-address limit on unknown bearer tokens, idle SSE streams that wait on hints (and their
//! per-key cap), and byte ranges past the end of an artifact. Every test runs two namespaces
//! side by side and checks that the other tenant is unaffected.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use capibara_tests::{eventually, find_free_port, parse_sse, Api, Res, TestEnv};
use serde_json::json;

fn assert_problem(r: &Res, status: u16) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/problem+json"),
        "{r:?}"
    );
    assert_eq!(r.body["status"], status, "{r:?}");
}

/// A new key made by `by`: (id, secret).
async fn new_key(by: &Api, namespace: &str, roles: &[&str]) -> (String, String) {
    let r = by
        .post(
            "/v1/api-keys",
            json!({"name": format!("{namespace}-{}", roles.join("-")), "roles": roles,
                   "namespace": namespace}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    (
        r.body["id"].as_str().unwrap().to_string(),
        r.body["key"].as_str().unwrap().to_string(),
    )
}

/// Transactions committed on the test database so far (as the statistics report them; they
/// lag by about a second).
async fn xact_commits(pool: &sqlx::PgPool) -> i64 {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    n
}

/// A client whose connections come from `local` (any 127.0.0.0/8 address reaches 127.0.0.1).
fn from_address(base: &str, key: &str, local: &str) -> Api {
    let mut api = Api::new(base, key);
    api.http = reqwest::Client::builder()
        .local_address(local.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    api
}

#[tokio::test]
async fn keys_are_listed_without_secrets_and_a_revoked_key_is_refused_by_every_replica() {
    let env = TestEnv::new().await;
    let _a = env.spawn_api().await;
    let port_b = find_free_port();
    let _b = env.spawn_api_on(port_b).await;
    let root = env.client();
    let (admin_a_id, admin_a) = new_key(&root, "team-a", &["admin"]).await;
    let (_, admin_b) = new_key(&root, "team-b", &["admin"]).await;
    let admin_a = root.with_key(&admin_a);
    let admin_b = root.with_key(&admin_b);
    let (reader_id, reader_secret) = new_key(&admin_a, "team-a", &["read"]).await;
    let (_, b_reader_secret) = new_key(&admin_b, "team-b", &["read"]).await;
    let replica_b = Api::new(&format!("http://127.0.0.1:{port_b}"), &reader_secret);
    let reader_on_a = root.with_key(&reader_secret);
    // Both replicas have the key cached.
    assert_eq!(reader_on_a.get("/v1/jobs").await.status, 200);
    assert_eq!(replica_b.get("/v1/jobs").await.status, 200);

    // An admin lists its namespace's keys: no secret, no hash.
    let listed = admin_a.get("/v1/api-keys").await;
    assert_eq!(listed.status, 200, "{listed:?}");
    let items = listed.body["items"].as_array().unwrap();
    let ids: Vec<&str> = items.iter().map(|k| k["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [admin_a_id.as_str(), reader_id.as_str()]);
    for k in items {
        assert_eq!(k["namespace"], "team-a");
        assert!(k.get("key").is_none() && k.get("key_hash").is_none(), "{k}");
        assert!(
            k["revoked_at"].is_null() && k["created_at"].is_string(),
            "{k}"
        );
        assert!(k["roles"].is_array() && k["super_admin"] == false, "{k}");
    }
    let text = listed.body.to_string();
    assert!(!text.contains(&reader_secret) && !text.contains(&reader_secret[..12]));
    // The other tenant's admin neither sees nor revokes them.
    let theirs = admin_b.get("/v1/api-keys").await;
    assert!(theirs.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["namespace"] == "team-b"));
    let r = admin_b
        .send(
            admin_b
                .http
                .delete(admin_b.url(&format!("/v1/api-keys/{reader_id}"))),
        )
        .await;
    assert_problem(&r, 404);
    assert_eq!(reader_on_a.get("/v1/jobs").await.status, 200);
    // Readers do not manage keys.
    assert_problem(&reader_on_a.get("/v1/api-keys").await, 403);

    // Revoke on replica A: refused there at once, on replica B well within the cache TTL.
    let r = admin_a
        .send(
            admin_a
                .http
                .delete(admin_a.url(&format!("/v1/api-keys/{reader_id}"))),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body["revoked_at"].is_string());
    assert_eq!(r.body["revoked_by"], format!("key:{admin_a_id}"));
    let revoked = Instant::now();
    assert_problem(&reader_on_a.get("/v1/jobs").await, 401);
    eventually(
        "replica B refuses the key",
        Duration::from_secs(5),
        || async { (replica_b.get("/v1/jobs").await.status == 401).then_some(()) },
    )
    .await;
    assert!(
        revoked.elapsed() < Duration::from_secs(3),
        "replica B took {:?}: the revocation was not pushed",
        revoked.elapsed()
    );
    // Stored with who revoked it; listed as revoked; revoking again changes nothing.
    let pool = env.pool().await;
    let (by,): (Option<String>,) =
        sqlx::query_as("SELECT revoked_by FROM api_keys WHERE id = $1::uuid")
            .bind(&reader_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(by, Some(format!("key:{admin_a_id}")));
    let again = admin_a
        .send(
            admin_a
                .http
                .delete(admin_a.url(&format!("/v1/api-keys/{reader_id}"))),
        )
        .await;
    assert_eq!(again.body["revoked_at"], r.body["revoked_at"]);
    let listed = admin_a.get("/v1/api-keys").await;
    let entry = listed.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == reader_id.as_str())
        .cloned()
        .unwrap();
    assert!(entry["revoked_at"].is_string(), "{entry}");

    // The other tenant is unaffected, on both replicas.
    let b_reader = root.with_key(&b_reader_secret);
    assert_eq!(b_reader.get("/v1/jobs").await.status, 200);
    assert_eq!(
        replica_b
            .with_key(&b_reader_secret)
            .get("/v1/jobs")
            .await
            .status,
        200
    );
    // The super-admin sees every namespace's keys.
    let all = root.get("/v1/api-keys").await;
    let namespaces: std::collections::BTreeSet<&str> = all.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(namespaces, ["team-a", "team-b"].into());
}

#[tokio::test]
async fn only_a_super_admin_mints_keys_for_other_namespaces() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let root = env.client();
    let (_, admin_a) = new_key(&root, "team-a", &["admin"]).await;
    let admin_a = root.with_key(&admin_a);
    let (_, submit_b) = new_key(&root, "team-b", &["submit"]).await;
    let submit_b = root.with_key(&submit_b);

    // A namespace admin mints in its own namespace only, and no super-admin.
    let r = admin_a
        .post(
            "/v1/api-keys",
            json!({"name": "x", "roles": ["admin"], "namespace": "team-b"}),
        )
        .await;
    assert_problem(&r, 403);
    let r = admin_a
        .post(
            "/v1/api-keys",
            json!({"name": "x", "roles": ["admin"], "super_admin": true}),
        )
        .await;
    assert_problem(&r, 403);
    let (_, own) = new_key(&admin_a, "team-a", &["submit"]).await;
    assert_eq!(root.with_key(&own).get("/v1/jobs").await.status, 200);
    // No key of team-b came from it.
    let pool = env.pool().await;
    let (in_b,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM api_keys WHERE namespace = 'team-b'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(in_b, 1);

    // The super-admin may, and may make another super-admin, which may too.
    let r = root
        .post(
            "/v1/api-keys",
            json!({"name": "ops", "roles": ["admin"], "super_admin": true}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["super_admin"], true);
    let ops_id = r.body["id"].as_str().unwrap().to_string();
    let ops = root.with_key(r.body["key"].as_str().unwrap());
    let (_, c) = new_key(&ops, "team-c", &["read"]).await;
    assert_eq!(root.with_key(&c).get("/v1/jobs").await.status, 200);
    let r = root
        .post(
            "/v1/api-keys",
            json!({"name": "x", "roles": ["read"], "super_admin": true}),
        )
        .await;
    assert_problem(&r, 422);
    assert_eq!(r.body["errors"][0]["field"], "super_admin");
    // A plain admin of `default` may not revoke a super-admin.
    let (_, default_admin) = new_key(&root, "default", &["admin"]).await;
    let default_admin = root.with_key(&default_admin);
    let r = default_admin
        .send(
            default_admin
                .http
                .delete(default_admin.url(&format!("/v1/api-keys/{ops_id}"))),
        )
        .await;
    assert_problem(&r, 403);
    // …nor mint for another namespace (`default` is not special any more).
    let r = default_admin
        .post(
            "/v1/api-keys",
            json!({"name": "x", "roles": ["read"], "namespace": "team-b"}),
        )
        .await;
    assert_problem(&r, 403);

    // The other tenant is unaffected throughout.
    let id = submit_b.submit_id(json!({"kind": "echo"})).await;
    assert_eq!(submit_b.job(&id).await["namespace"], "team-b");
}

#[tokio::test]
async fn workers_are_listed_to_admins_only_with_their_own_namespace_running_counts() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let root = env.client();
    let (_, admin_a) = new_key(&root, "team-a", &["admin"]).await;
    let (_, admin_b) = new_key(&root, "team-b", &["admin"]).await;
    let (_, reader_b) = new_key(&root, "team-b", &["read"]).await;
    let (_, submit_a) = new_key(&root, "team-a", &["submit"]).await;
    let (admin_a, admin_b) = (root.with_key(&admin_a), root.with_key(&admin_b));
    let (reader_b, submit_a) = (root.with_key(&reader_b), root.with_key(&submit_a));
    let running = |r: &Res| -> i64 {
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["running"].as_i64().unwrap())
            .sum()
    };

    let job = submit_a
        .submit_id(json!({"kind": "sleep", "input": {"ms": 8000}}))
        .await;
    eventually("team-a's job runs", Duration::from_secs(10), || async {
        (running(&root.get("/v1/workers").await) == 1).then_some(())
    })
    .await;

    let a = admin_a.get("/v1/workers").await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(running(&a), 1);
    // team-b's admin sees the shared worker, not what it runs for team-a.
    let b = admin_b.get("/v1/workers").await;
    assert_eq!(b.status, 200, "{b:?}");
    assert_eq!(b.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(running(&b), 0);
    // Non-admins see no workers at all.
    assert_problem(&reader_b.get("/v1/workers").await, 403);
    assert_problem(&submit_a.get("/v1/workers").await, 403);
    // Queues stay per namespace for everyone.
    assert_eq!(reader_b.get("/v1/queues").await.status, 200);

    let r = submit_a
        .post(&format!("/v1/jobs/{job}/cancel"), json!({}))
        .await;
    assert!(r.status == 200 || r.status == 202, "{r:?}");
}

#[tokio::test]
async fn unknown_tokens_are_limited_per_address_while_valid_keys_keep_working() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_AUTH_FAILURES_PER_MIN".into(), "5".into()));
    let _api = env.spawn_api().await;
    let root = env.client();
    let (_, key_a) = new_key(&root, "team-a", &["read"]).await;
    let (_, key_b) = new_key(&root, "team-b", &["read"]).await;
    let base = env.api_url();
    let attacker = from_address(&base, &key_a, "127.0.0.2");
    let neighbour = from_address(&base, &key_b, "127.0.0.3");
    // The attacker's address also holds a valid key, used before the attack.
    assert_eq!(attacker.get("/v1/jobs").await.status, 200);

    for i in 0..5 {
        let r = attacker
            .with_key(&format!("cap_guess{i}"))
            .get("/v1/jobs")
            .await;
        assert_problem(&r, 401);
    }
    let r = attacker.with_key("cap_guess5").get("/v1/jobs").await;
    assert_problem(&r, 429);
    assert_eq!(r.body["type"], "urn:capibara:problem:rate-limited");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");

    // Blocked guesses cost Postgres nothing.
    let pool = env.pool().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = xact_commits(&pool).await;
    for i in 0..100 {
        let r = attacker
            .with_key(&format!("cap_more{i}"))
            .get("/v1/jobs")
            .await;
        assert_eq!(r.status, 429);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let spent = xact_commits(&pool).await - before;
    assert!(spent < 20, "100 blocked guesses cost {spent} transactions");

    // The valid key of that address still works (it is known without a lookup)…
    assert_eq!(attacker.get("/v1/jobs").await.status, 200);
    // …and the other tenant, from another address, is untouched: its key works, and its own
    // mistakes are 401s against its own budget.
    assert_eq!(neighbour.get("/v1/jobs").await.status, 200);
    assert_problem(&neighbour.with_key("cap_typo").get("/v1/jobs").await, 401);
    assert_eq!(neighbour.get("/v1/jobs").await.status, 200);
}

/// An open SSE request (the response has arrived).
async fn open_sse(api: &Api, path: &str) -> reqwest::Response {
    api.http
        .get(api.url(path))
        .bearer_auth(&api.key)
        .header("Accept", "text/event-stream")
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .expect("SSE request")
}

#[tokio::test]
async fn idle_streams_wait_on_hints_and_are_capped_per_key() {
    const STREAMS: usize = 20;
    let mut env = TestEnv::new().await;
    env.extra_env.push((
        "CAPIBARA_SSE_MAX_STREAMS_PER_KEY".into(),
        STREAMS.to_string(),
    ));
    // So that prompt delivery below can only come from the hints.
    env.extra_env
        .push(("CAPIBARA_SSE_FALLBACK_POLL".into(), "60s".into()));
    // No worker: the jobs stay queued and their streams idle.
    let _api = env.spawn_api().await;
    let root = env.client();
    let (_, key_a) = new_key(&root, "team-a", &["submit"]).await;
    let (_, key_b) = new_key(&root, "team-b", &["submit"]).await;
    let (a, b) = (root.with_key(&key_a), root.with_key(&key_b));
    let job_a = a.submit_id(json!({"kind": "echo"})).await;
    let job_b = b.submit_id(json!({"kind": "echo"})).await;

    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let res = open_sse(&a, &format!("/v1/jobs/{job_a}/events")).await;
        assert_eq!(res.status(), 200);
        streams.push(res);
    }
    // One more is over the cap, on a job stream or the firehose alike…
    let over = a
        .send(
            a.http
                .get(a.url(&format!("/v1/jobs/{job_a}/events")))
                .header("Accept", "text/event-stream"),
        )
        .await;
    assert_problem(&over, 429);
    assert!(over.header("retry-after").is_some());
    let over = a
        .send(
            a.http
                .get(a.url("/v1/events"))
                .header("Accept", "text/event-stream"),
        )
        .await;
    assert_problem(&over, 429);
    // …while the other tenant streams freely.
    let b_stream = open_sse(&b, &format!("/v1/jobs/{job_b}/events")).await;
    assert_eq!(b_stream.status(), 200);

    // Idle streams do not poll Postgres: over 4 s, far fewer transactions than streams.
    // Postgres (15+) counts a backend's commits when it flushes its statistics, which an idle
    // backend may put off for up to 10 s (PGSTAT_IDLE_INTERVAL): the streams' own opening reads
    // must be counted before the window starts, or a loaded machine sees them inside it.
    let pool = env.pool().await;
    tokio::time::sleep(Duration::from_millis(11_000)).await;
    let before = xact_commits(&pool).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let spent = xact_commits(&pool).await - before;
    assert!(
        spent < STREAMS as i64,
        "{STREAMS} idle streams cost {spent} transactions in 4 s"
    );

    // Events still arrive at once: cancel the job; every stream gets the end and closes.
    let canceled = Instant::now();
    let r = a.post(&format!("/v1/jobs/{job_a}/cancel"), json!({})).await;
    assert_eq!(r.status, 200, "{r:?}");
    let bodies = futures::future::join_all(streams.into_iter().map(|res| async move {
        tokio::time::timeout(Duration::from_secs(10), res.text())
            .await
            .expect("the stream ended")
            .unwrap()
    }))
    .await;
    assert!(
        canceled.elapsed() < Duration::from_secs(5),
        "events took {:?}",
        canceled.elapsed()
    );
    for body in &bodies {
        let frames = parse_sse(body);
        assert_eq!(
            frames.last().map(|f| f.1.as_str()),
            Some("JobCanceled"),
            "{body}"
        );
    }
    // The ended streams gave their slots back.
    eventually("a slot is free again", Duration::from_secs(5), || async {
        let res = open_sse(&a, "/v1/events").await;
        (res.status() == 200).then_some(())
    })
    .await;
    // The other tenant's stream is still open and live.
    let r = b.post(&format!("/v1/jobs/{job_b}/cancel"), json!({})).await;
    assert_eq!(r.status, 200, "{r:?}");
    let body = tokio::time::timeout(Duration::from_secs(10), b_stream.text())
        .await
        .expect("team-b's stream ended")
        .unwrap();
    let types: Vec<String> = parse_sse(&body).into_iter().map(|f| f.1).collect();
    assert_eq!(
        types.last().map(String::as_str),
        Some("JobCanceled"),
        "{types:?}"
    );
}

#[tokio::test]
async fn a_range_ending_past_the_artifact_is_served_cut_to_its_size() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let root = env.client();
    let (_, key_a) = new_key(&root, "team-a", &["submit"]).await;
    let (_, key_b) = new_key(&root, "team-b", &["submit"]).await;
    let (a, b) = (root.with_key(&key_a), root.with_key(&key_b));
    let r = a
        .send(
            a.http
                .post(a.url("/v1/tts"))
                .header("Prefer", "wait=60")
                .json(&json!({"text": "Hello.", "voice": "espeak:en-us"})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let url = r.body["audio_url"].as_str().unwrap().to_string();
    let get = |api: &Api, range: Option<&str>| {
        let mut req = api.http.get(api.url(&url)).bearer_auth(&api.key);
        if let Some(r) = range {
            req = req.header("Range", r);
        }
        req.send()
    };
    let whole = get(&a, None).await.unwrap().bytes().await.unwrap();
    let size = whole.len();
    assert!(size > 44);

    for (range, from) in [
        ("bytes=0-18446744073709551615", 0),
        ("bytes=10-99999999999999999999999", 10),
        ("bytes=-18446744073709551615", 0),
        ("bytes=-99999999999999999999999", 0),
    ] {
        let res = get(&a, Some(range)).await.unwrap();
        assert_eq!(res.status(), 206, "{range}");
        assert_eq!(
            res.headers()["content-range"],
            format!("bytes {from}-{}/{size}", size - 1).as_str(),
            "{range}"
        );
        assert_eq!(res.bytes().await.unwrap(), whole[from..], "{range}");
    }
    // A first byte past the end is still unsatisfiable.
    let res = get(&a, Some(&format!("bytes={size}-18446744073709551615")))
        .await
        .unwrap();
    assert_eq!(res.status(), 416);
    // The other tenant cannot read it, whatever the range.
    let res = get(&b, Some("bytes=0-18446744073709551615")).await.unwrap();
    assert_eq!(res.status(), 404);
}
