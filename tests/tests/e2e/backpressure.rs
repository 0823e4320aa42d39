//! Backpressure instead of loss: while Redis is unreachable, stalled or out of memory, and
//! while Postgres stalls, every submission is either accepted durably (and runs once the fault
//! ends) or refused with a 503 problem and `Retry-After` — never accepted and lost.

use std::time::{Duration, Instant};

use capibara_tests::{eventually, Fault, FaultProxy, RedisOptions, RedisServer, TestEnv};
use serde_json::json;

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("capibara-{tag}-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql).fetch_one(pool).await.unwrap();
    n
}

fn shared_pg() -> String {
    std::env::var("CAPIBARA_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://capibara@127.0.0.1:25432/postgres".into())
}

fn shared_redis_addr() -> std::net::SocketAddr {
    let url = std::env::var("CAPIBARA_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:26379/".into());
    let port: u16 = url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port in CAPIBARA_TEST_REDIS_URL");
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test]
async fn submissions_while_redis_is_cut_or_stalled_are_accepted_and_run_when_it_returns() {
    let proxy = FaultProxy::start(shared_redis_addr()).unwrap();
    let env = TestEnv::on(shared_pg(), format!("redis://127.0.0.1:{}/", proxy.port())).await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let pool = env.pool().await;
    let warm = api.submit_id(json!({"kind": "echo"})).await;
    api.wait_terminal(&warm, Duration::from_secs(20)).await;

    let mut accepted = vec![warm];
    for fault in [Fault::Cut, Fault::Stall] {
        proxy.set(fault);
        let started = Instant::now();
        for i in 0..20 {
            let r = api.submit(json!({"kind": "echo", "input": {"i": i}})).await;
            assert_eq!(
                r.status, 202,
                "accepted durably while Redis is {fault:?}: {r:?}"
            );
            accepted.push(r.body["id"].as_str().unwrap().to_string());
        }
        eprintln!(
            "20 submissions while Redis is {fault:?}: {:?}",
            started.elapsed()
        );
        proxy.heal();
    }
    // The writer did not wait for Redis: the pushes it could not make were left to the relay.
    let metrics = capibara_tests::scrape(&env.api_url()).await;
    assert!(
        metric(&metrics, "capibara_dispatch_deferred_total") > 0.0,
        "the fast path deferred to the relay: {metrics}"
    );
    let n = accepted.len() as i64;
    eventually(
        "every accepted job ran",
        Duration::from_secs(60),
        || async {
            (count(
                &pool,
                "SELECT count(*) FROM jobs WHERE status = 'succeeded'",
            )
            .await
                == n)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM events WHERE type = 'JobSucceeded'"
        )
        .await,
        n,
        "each once"
    );
}

/// A Redis of the test's own (its memory limit is changed), in a fresh directory.
fn private_redis(tag: &str) -> (std::path::PathBuf, RedisServer) {
    let dir = temp_dir(tag);
    let redis = RedisServer::start(RedisOptions {
        dir: dir.clone(),
        port: 0,
        persist: false,
    })
    .unwrap();
    (dir, redis)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A Redis at its `maxmemory` with `noeviction` refuses our pushes. Submissions are still
/// accepted (the outbox holds what Redis cannot), workers keep draining the queue — popping
/// frees memory, so the pop must work at the limit — and the relay pushes the rest as room
/// appears: every accepted job runs once.
#[tokio::test]
async fn a_redis_out_of_memory_loses_nothing_and_the_queue_drains() {
    let (dir, redis) = private_redis("redis-oom");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let env = TestEnv::on(shared_pg(), redis.url()).await;
    let _api = env.spawn_api().await;
    let _scheduler = env.spawn_scheduler();
    let api = env.client();
    let pool = env.pool().await;
    let (group_key, _, _) = capibara_tests::redis_group_keys(&env.redis_prefix, "default", "echo");
    let warm: Vec<_> = (0..10)
        .map(|i| json!({"kind": "echo", "input": {"warm": i}}))
        .collect();
    assert_eq!(
        api.post("/v1/jobs/batch", json!({"jobs": warm}))
            .await
            .status,
        202
    );
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .unwrap();
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    // Room for a few thousand queued ids on top of what Redis uses with our processes connected.
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .arg("maxmemory")
        .arg(used + 1_000_000)
        .query_async(&mut conn)
        .await
        .unwrap();

    // Fill Redis until it refuses: every batch is still accepted.
    let mut accepted = 10i64;
    let mut held = 0i64;
    for batch in 0..30 {
        let jobs: Vec<_> = (0..500)
            .map(|i| json!({"kind": "echo", "input": {"b": batch, "i": i}}))
            .collect();
        let r = api.post("/v1/jobs/batch", json!({"jobs": jobs})).await;
        assert_eq!(r.status, 202, "accepted while Redis is full: {r:?}");
        accepted += 500;
        held = redis::cmd("ZCARD")
            .arg(&group_key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if accepted - held > 1000 {
            break;
        }
    }
    assert!(
        accepted - held > 1000,
        "Redis refused pushes at its maxmemory ({held} of {accepted} held)"
    );
    let one = api
        .submit(json!({"kind": "echo", "input": {"last": true}}))
        .await;
    assert_eq!(one.status, 202, "a single submission too: {one:?}");
    accepted += 1;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM jobs WHERE status = 'queued'").await,
        accepted,
        "everything accepted is queued in Postgres"
    );

    let _worker = env.spawn_worker(&["--concurrency", "32"]);
    eventually("the queue drained", Duration::from_secs(120), || async {
        let done = count(
            &pool,
            "SELECT count(*) FROM jobs WHERE status = 'succeeded'",
        )
        .await;

        (done == accepted).then_some(())
    })
    .await;
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM events WHERE type = 'JobSucceeded'"
        )
        .await,
        accepted,
        "each once"
    );
    drop(env);
    drop(redis);
    let _ = std::fs::remove_dir_all(dir);
}

/// A push that Redis refuses half-way at its `maxmemory` must not leave a job in its group's
/// set without the group in the lane's ring: Redis would hold the job (so the relay never
/// pushes it again) but no worker could pop it. Pushes at every distance from the limit leave
/// each entry either poppable or missing.
#[tokio::test]
async fn a_push_refused_at_maxmemory_leaves_no_job_stranded() {
    let (dir, redis) = private_redis("redis-strand");
    let queue = capibara_shared::queue::Queue::connect(&redis.url(), "strand")
        .await
        .unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let used = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    };
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (mut refused, mut stranded) = (0, Vec::new());
    for k in 0..400u64 {
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(0)
            .query_async(&mut conn)
            .await
            .unwrap();
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut conn)
            .await
            .unwrap();
        let () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(used(info) + k * 8)
            .query_async(&mut conn)
            .await
            .unwrap();
        let kind = format!("kind-{k}-{}", "x".repeat(200));
        let entry = capibara_tests::dispatch_entry("default", &kind, uuid::Uuid::now_v7());
        if queue.push(std::slice::from_ref(&entry)).await.is_err() {
            refused += 1;
        }
        let group_key = format!("{{strand}}:g:default:{}", entry.group);
        let in_group: Option<f64> = redis::cmd("ZSCORE")
            .arg(&group_key)
            .arg(entry.job_id.to_string())
            .query_async(&mut conn)
            .await
            .unwrap();
        let in_ring: Option<f64> = redis::cmd("ZSCORE")
            .arg("{strand}:ring:default")
            .arg(&entry.group)
            .query_async(&mut conn)
            .await
            .unwrap();
        if in_group.is_some() && in_ring.is_none() {
            stranded.push(k);
        }
    }
    assert!(refused > 0, "some pushes met the limit");
    assert!(
        stranded.is_empty(),
        "jobs held but not poppable at offsets {stranded:?}"
    );
    drop(redis);
    let _ = std::fs::remove_dir_all(dir);
}

fn shared_pg_addr() -> std::net::SocketAddr {
    let url = shared_pg();
    let port: u16 = url
        .rsplit_once('@')
        .map(|(_, rest)| rest)
        .and_then(|hp| hp.split('/').next())
        .and_then(|hp| hp.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("a port in CAPIBARA_TEST_DATABASE_URL");
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// While every connection to Postgres hangs, a burst of submissions is answered with 503
/// problems and `Retry-After` (bounded waits, bounded memory), nothing answered 202 is lost, and
/// the API recovers by itself when Postgres answers again.
#[tokio::test]
async fn a_stalled_postgres_gets_503s_with_bounded_memory_and_loses_nothing() {
    let proxy = FaultProxy::start(shared_pg_addr()).unwrap();
    let direct = shared_pg();
    let through = direct.replace(
        &format!(":{}/", shared_pg_addr().port()),
        &format!(":{}/", proxy.port()),
    );
    let mut env = TestEnv::on(
        through,
        std::env::var("CAPIBARA_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:26379/".into()),
    )
    .await;
    // Short waits so the test is quick; the defaults are documented in docs/configuration.md.
    env.extra_env
        .push(("CAPIBARA_APPEND_TIMEOUT".into(), "2s".into()));
    let api_proc = env.spawn_api().await;
    let _scheduler = env.spawn_scheduler();
    let _worker = env.spawn_worker(&[]);
    let api = env.client();
    let pool = capibara_tests::sqlx_connect(&env.database_url.replace(
        &format!(":{}/", proxy.port()),
        &format!(":{}/", shared_pg_addr().port()),
    ))
    .await;
    let mut accepted = Vec::new();
    for i in 0..20 {
        accepted.push(
            api.submit_id(json!({"kind": "echo", "input": {"before": i}}))
                .await,
        );
    }
    let rss_before = rss_kb(api_proc.pid());

    proxy.set(Fault::Stall);
    let burst = futures::future::join_all((0..500).map(|i| {
        let api = api.clone();
        async move {
            api.submit(json!({"kind": "echo", "input": {"during": i}}))
                .await
        }
    }))
    .await;
    let rss_during = rss_kb(api_proc.pid());
    let mut refused = 0;
    for r in &burst {
        match r.status {
            202 => accepted.push(r.body["id"].as_str().unwrap().to_string()),
            503 => {
                refused += 1;
                assert_eq!(
                    r.header("content-type").as_deref(),
                    Some("application/problem+json"),
                    "{r:?}"
                );
                assert!(r.header("retry-after").is_some(), "{r:?}");
            }
            _ => panic!("a submission while Postgres stalls: {r:?}"),
        }
    }
    assert!(refused > 0, "the stall was felt");
    eprintln!(
        "stalled Postgres: {refused} of 500 refused with 503; API RSS {rss_before} kB before, {rss_during} kB after the burst"
    );
    assert!(
        rss_during < rss_before + 64 * 1024,
        "memory stays bounded: {rss_before} kB → {rss_during} kB"
    );

    proxy.heal();
    let after = eventually("the API recovers", Duration::from_secs(60), || async {
        let r = api
            .submit(json!({"kind": "echo", "input": {"after": true}}))
            .await;
        (r.status == 202).then(|| r.body["id"].as_str().unwrap().to_string())
    })
    .await;
    accepted.push(after);
    for id in &accepted {
        let job = api.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(job["status"], "succeeded", "accepted means it runs: {job}");
    }
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(n >= accepted.len() as i64);
}

/// At `CAPIBARA_MAX_BACKLOG` jobs waiting for a worker, requests that create work are refused
/// with a 503 `overloaded` problem and `Retry-After` (nothing of them is stored), and accepted
/// again once workers bring the backlog down.
#[tokio::test]
async fn the_backlog_bound_refuses_new_work_with_503_until_workers_catch_up() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_MAX_BACKLOG".into(), "50".into()));
    let _api = env.spawn_api().await;
    let _scheduler = env.spawn_scheduler();
    let api = env.client();
    let pool = env.pool().await;
    let jobs: Vec<_> = (0..50)
        .map(|i| json!({"kind": "echo", "input": {"i": i}}))
        .collect();
    assert_eq!(
        api.post("/v1/jobs/batch", json!({"jobs": jobs}))
            .await
            .status,
        202
    );

    let refused = eventually("the bound is felt", Duration::from_secs(10), || async {
        let r = api
            .submit(json!({"kind": "echo", "input": {"over": true}}))
            .await;
        (r.status == 503).then_some(r)
    })
    .await;
    assert_eq!(
        refused.header("content-type").as_deref(),
        Some("application/problem+json")
    );
    assert_eq!(
        refused.body["type"], "urn:capibara:problem:overloaded",
        "{refused:?}"
    );
    assert!(
        refused.body["detail"].as_str().unwrap().contains("backlog"),
        "{refused:?}"
    );
    assert!(refused.header("retry-after").is_some());
    let again = api
        .submit(json!({"kind": "echo", "input": {"refused": 1}}))
        .await;
    assert_eq!(again.status, 503, "{again:?}");
    let batch = api
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [{"kind": "echo", "input": {"refused": 2}}]}),
        )
        .await;
    assert_eq!(batch.status, 503, "{batch:?}");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM jobs WHERE input ? 'refused'").await,
        0,
        "nothing of a refused request is stored"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM jobs").await,
        50,
        "the process counts what it admits between counts"
    );

    let _worker = env.spawn_worker(&["--concurrency", "16"]);
    let after = eventually("accepted again", Duration::from_secs(30), || async {
        let r = api
            .submit(json!({"kind": "echo", "input": {"after": true}}))
            .await;
        (r.status == 202).then(|| r.body["id"].as_str().unwrap().to_string())
    })
    .await;
    assert_eq!(
        api.wait_terminal(&after, Duration::from_secs(30)).await["status"],
        "succeeded"
    );
}

/// A process started while Postgres and Redis do not answer waits for them
/// (`CAPIBARA_STARTUP_WAIT_S`) instead of exiting: before, every worker the chaos suite restarted
/// during a database restart exited with "applying migrations" and crash-looped.
#[tokio::test]
async fn processes_started_while_postgres_and_redis_are_unreachable_wait_for_them() {
    let pg = FaultProxy::start(shared_pg_addr()).unwrap();
    let redis = FaultProxy::start(shared_redis_addr()).unwrap();
    let through = shared_pg().replace(
        &format!(":{}/", shared_pg_addr().port()),
        &format!(":{}/", pg.port()),
    );
    let env = TestEnv::on(through, format!("redis://127.0.0.1:{}/", redis.port())).await;
    pg.set(Fault::Cut);
    redis.set(Fault::Cut);
    let dir = temp_dir("startup-wait");
    let mut api_proc = env.spawn_logged("api", "capibara-api", &[], &dir.join("api.log"));
    let mut worker = env.spawn_worker(&[]);
    let mut scheduler = env.spawn_scheduler();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (name, p) in [
        ("api", &mut api_proc),
        ("worker", &mut worker),
        ("scheduler", &mut scheduler),
    ] {
        assert!(
            p.is_running(),
            "{name} exited while Postgres was unreachable"
        );
    }
    // Postgres back (migrations run), Redis still cut: still waiting, not exited.
    pg.heal();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (name, p) in [
        ("api", &mut api_proc),
        ("worker", &mut worker),
        ("scheduler", &mut scheduler),
    ] {
        assert!(p.is_running(), "{name} exited while Redis was unreachable");
    }
    redis.heal();
    capibara_tests::wait_http_ok(&format!("{}/healthz", env.api_url())).await;
    let api = env.client();
    let id = api
        .submit_id(json!({"kind": "echo", "input": {"after": "startup"}}))
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let log = std::fs::read_to_string(dir.join("api.log")).unwrap_or_default();
    assert!(
        log.contains("not reachable at startup"),
        "the wait is logged: {log}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
