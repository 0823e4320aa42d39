//! Failure tests: real processes are killed; nothing accepted is lost and nothing runs twice.

use std::time::Duration;

use capibara_tests::{
    eventually, types, PostgresOptions, PostgresServer, RedisOptions, RedisServer, TestEnv,
};
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

/// Every job has exactly one `JobSucceeded`, and no attempt started twice.
async fn assert_each_succeeded_once(pool: &sqlx::PgPool, jobs: i64) {
    assert_eq!(
        count(pool, "SELECT count(*) FROM jobs WHERE status = 'succeeded'").await,
        jobs
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM events WHERE type = 'JobSucceeded'"
        )
        .await,
        jobs
    );
    let dup_starts = count(
        pool,
        "SELECT count(*) FROM (SELECT stream_id, data->>'attempt' FROM events WHERE type = 'JobStarted'
         GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!(dup_starts, 0, "an attempt was started twice");
}

#[tokio::test]
async fn a_sigkilled_worker_loses_nothing_and_each_job_completes_once() {
    let mut env = TestEnv::new().await;
    env.visibility_timeout_s = 2.0;
    let _api = env.spawn_api().await;
    let _scheduler = env.spawn_scheduler();
    let api = env.client();
    let pool = env.pool().await;
    let mut doomed = env.spawn_worker(&["--concurrency", "20"]);

    for _ in 0..20 {
        api.submit_id(json!({"kind": "sleep", "input": {"ms": 3000}}))
            .await;
    }
    eventually(
        "jobs running on the doomed worker",
        Duration::from_secs(10),
        || async {
            (count(&pool, "SELECT count(*) FROM jobs WHERE status = 'running'").await == 20)
                .then_some(())
        },
    )
    .await;
    doomed.kill();
    let _survivor = env.spawn_worker(&["--concurrency", "20"]);

    eventually("all jobs done", Duration::from_secs(40), || async {
        (count(
            &pool,
            "SELECT count(*) FROM jobs WHERE status = 'succeeded'",
        )
        .await
            == 20)
            .then_some(())
    })
    .await;
    assert_each_succeeded_once(&pool, 20).await;
    let lost = count(&pool, "SELECT count(*) FROM events WHERE type = 'JobAttemptFailed' AND data->'error'->>'type' = 'worker_lost'").await;
    assert_eq!(lost, 20, "each killed attempt is recorded as worker_lost");
}

#[tokio::test]
async fn jobs_survive_redis_restarting_empty() {
    let dir = temp_dir("redis");
    let mut redis = RedisServer::start(RedisOptions {
        dir: dir.clone(),
        port: 0,
        persist: false,
    })
    .unwrap();
    let env = TestEnv::on(
        std::env::var("CAPIBARA_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://capibara@127.0.0.1:25432/postgres".into()),
        redis.url(),
    )
    .await;
    let _api = env.spawn_api().await;
    let _scheduler = env.spawn_scheduler();
    let api = env.client();
    let pool = env.pool().await;

    // Accepted while Redis is up, but no worker yet: they wait in Redis.
    for i in 0..30 {
        api.submit_id(json!({"kind": "echo", "input": {"i": i}}))
            .await;
    }
    redis.kill().unwrap();
    // Accepted while Redis is down: Postgres is the source of truth.
    for i in 30..35 {
        let r = api.submit(json!({"kind": "echo", "input": {"i": i}})).await;
        assert_eq!(r.status, 202, "{r:?}");
    }
    redis.restart_empty().unwrap();
    let _worker = env.spawn_worker(&[]);

    eventually(
        "all 35 jobs done after the wipe",
        Duration::from_secs(40),
        || async {
            (count(
                &pool,
                "SELECT count(*) FROM jobs WHERE status = 'succeeded'",
            )
            .await
                == 35)
                .then_some(())
        },
    )
    .await;
    assert_each_succeeded_once(&pool, 35).await;
    drop(redis);
    let _ = std::fs::remove_dir_all(dir);
}

/// A Postgres of the test's own (durable settings, so it can be killed and restarted) under a
/// fresh directory, and a test environment on it with the shared Redis.
async fn private_postgres(tag: &str) -> (std::path::PathBuf, PostgresServer, TestEnv) {
    let dir = temp_dir(tag);
    let pg = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || {
            PostgresServer::start(PostgresOptions {
                data_dir: dir.join("data"),
                port: 0,
                fast_unsafe: false,
            })
            .unwrap()
        }
    })
    .await
    .unwrap();
    let env = TestEnv::on(
        pg.url("postgres"),
        std::env::var("CAPIBARA_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:26379/".into()),
    )
    .await;
    (dir, pg, env)
}

#[tokio::test]
async fn the_api_answers_503_while_postgres_is_down_and_recovers_by_itself() {
    let (dir, mut pg, env) = private_postgres("pg").await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let before = api
        .submit_id(json!({"kind": "echo", "input": {"before": true}}))
        .await;
    api.wait_terminal(&before, Duration::from_secs(10)).await;

    pg = tokio::task::spawn_blocking(move || {
        pg.kill().unwrap();
        pg
    })
    .await
    .unwrap();
    let down = api.submit(json!({"kind": "echo"})).await;
    assert_eq!(down.status, 503, "{down:?}");
    assert_eq!(
        down.header("content-type").as_deref(),
        Some("application/problem+json")
    );
    assert!(down.header("retry-after").is_some());
    assert!(
        !down.body["detail"]
            .as_str()
            .unwrap()
            .contains("postgres://"),
        "no internals leak"
    );
    let ready = api.get("/readyz").await;
    assert_eq!(ready.status, 503);

    let pg = tokio::task::spawn_blocking(move || {
        pg.restart().unwrap();
        pg
    })
    .await
    .unwrap();
    let after = eventually("the API recovers", Duration::from_secs(30), || async {
        let r = api
            .submit(json!({"kind": "echo", "input": {"after": true}}))
            .await;
        (r.status == 202).then(|| r.body["id"].as_str().unwrap().to_string())
    })
    .await;
    let job = api.wait_terminal(&after, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(
        api.job(&before).await["status"],
        "succeeded",
        "nothing committed was lost"
    );
    drop(env);
    drop(pg);
    let _ = std::fs::remove_dir_all(dir);
}

/// A worker that pops a job while Postgres is down keeps it and runs it once Postgres is back:
/// the popped id is no longer on Redis, and dropping it would leave the job to the scheduler's
/// relay, whose full check comes a visibility timeout later. No scheduler runs here, so only the
/// worker can bring the job back.
#[tokio::test]
async fn a_job_popped_while_postgres_is_down_runs_as_soon_as_it_is_back() {
    let (dir, mut pg, env) = private_postgres("pg-popped").await;
    let _api = env.spawn_api().await;
    let api = env.client();
    // Queued in Postgres; taken off Redis for now, so the worker starts idle.
    let job = api
        .submit_id(json!({"kind": "echo", "input": {"n": 1}}))
        .await;
    let queue = capibara_shared::queue::Queue::connect(&env.redis_url, &env.redis_prefix)
        .await
        .unwrap();
    let id: uuid::Uuid = job.parse().unwrap();
    let popped = || async { !capibara_tests::on_redis(&queue, "default", "echo", id).await };
    // The API pushes a job to Redis right after answering: take it off once it is there.
    eventually("pushed to Redis", Duration::from_secs(5), || async {
        (!popped().await).then_some(())
    })
    .await;
    queue
        .remove(&capibara_tests::dispatch_entry("default", "echo", id))
        .await
        .unwrap();
    assert!(popped().await);
    let _worker = env.spawn_worker(&[]);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Postgres goes down; the job appears on Redis; the worker pops it and cannot load it.
    pg = tokio::task::spawn_blocking(move || {
        pg.kill().unwrap();
        pg
    })
    .await
    .unwrap();
    let entry = capibara_tests::dispatch_entry("default", "echo", id);
    queue.push(&[entry]).await.unwrap();
    eventually(
        "the worker to pop the job",
        Duration::from_secs(20),
        || async { popped().await.then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let pg = tokio::task::spawn_blocking(move || {
        pg.restart().unwrap();
        pg
    })
    .await
    .unwrap();
    let done = api.wait_terminal(&job, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    drop(env);
    drop(pg);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn duplicate_deliveries_never_record_a_second_start_or_success() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let _scheduler = env.spawn_scheduler();
    let api = env.client();
    let pool = env.pool().await;
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(
            api.submit_id(json!({"kind": "sleep", "input": {"ms": 200}}))
                .await,
        );
    }
    let _w1 = env.spawn_worker(&["--concurrency", "16"]);
    let _w2 = env.spawn_worker(&["--concurrency", "16"]);

    // Deliver every job again and again while the workers run them.
    let client = redis::Client::open(env.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (key, ring, group) =
        capibara_tests::redis_group_keys(&env.redis_prefix, "default", "sleep");
    for _ in 0..30 {
        for id in &ids {
            let _: () = redis::pipe()
                .cmd("ZADD")
                .arg(&key)
                .arg(0)
                .arg(id)
                .ignore()
                .cmd("ZADD")
                .arg(&ring)
                .arg(0)
                .arg(&group)
                .ignore()
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("all jobs done", Duration::from_secs(30), || async {
        (count(
            &pool,
            "SELECT count(*) FROM jobs WHERE status = 'succeeded'",
        )
        .await
            == 40)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_each_succeeded_once(&pool, 40).await;
    for id in &ids {
        assert_eq!(
            types(&api.events(id).await),
            ["JobSubmitted", "JobStarted", "JobSucceeded"]
        );
    }
}

#[tokio::test]
async fn sigterm_lets_running_jobs_finish_within_the_grace_period() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    let mut worker = env.spawn_worker(&["--shutdown-grace-s", "10"]);
    let id = api
        .submit_id(json!({"kind": "sleep", "input": {"ms": 1500}}))
        .await;
    eventually("running", Duration::from_secs(10), || async {
        (api.job(&id).await["status"] == "running").then_some(())
    })
    .await;
    assert!(
        worker.terminate(Duration::from_secs(15)),
        "worker exits after draining"
    );
    let job = api.job(&id).await;
    assert_eq!(job["status"], "succeeded");
    let workers = api.get("/v1/workers").await;
    assert_eq!(workers.body["items"][0]["status"], "stopped");
}

#[tokio::test]
async fn sigterm_gives_unfinished_jobs_back_without_using_up_an_attempt() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let _scheduler = env.spawn_scheduler();
    let api = env.client();
    let mut worker = env.spawn_worker(&["--shutdown-grace-s", "0.5"]);
    let id = api
        .submit_id(json!({"kind": "sleep", "input": {"ms": 4000}, "max_attempts": 1}))
        .await;
    eventually("running", Duration::from_secs(10), || async {
        (api.job(&id).await["status"] == "running").then_some(())
    })
    .await;
    assert!(worker.terminate(Duration::from_secs(10)));
    assert_eq!(api.job(&id).await["status"], "queued", "given back at once");

    let _next = env.spawn_worker(&[]);
    let job = api.wait_terminal(&id, Duration::from_secs(20)).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["attempt"], 2);
    let t = types(&api.events(&id).await);
    assert!(t.contains(&"JobQueued".to_string()), "{t:?}");
}

#[tokio::test]
async fn the_relay_re_dispatches_a_job_redis_lost_without_a_wipe() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let _scheduler = env.spawn_scheduler();
    let api = env.client();
    let id = api.submit_id(json!({"kind": "echo"})).await;
    // As if a worker popped it and died before starting it. The API answers as soon as the job
    // is committed and pushes it to Redis right after: remove it once it is there.
    let client = redis::Client::open(env.redis_url.as_str()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let (key, _, _) = capibara_tests::redis_group_keys(&env.redis_prefix, "default", "echo");
    eventually("pushed to Redis", Duration::from_secs(5), || {
        let mut conn = conn.clone();
        let (key, id) = (key.clone(), id.clone());
        async move {
            let removed: i64 = redis::cmd("ZREM")
                .arg(&key)
                .arg(&id)
                .query_async(&mut conn)
                .await
                .unwrap();
            (removed == 1).then_some(())
        }
    })
    .await;

    let _worker = env.spawn_worker(&[]);
    let job = api.wait_terminal(&id, Duration::from_secs(20)).await;
    assert_eq!(job["status"], "succeeded");
}

/// An attempt of a claim-first (not repeatable) kind that fails within a millisecond (a
/// connection refused) is retried after its backoff, and the last attempt's failure ends the
/// job: nothing waits for a dispatch that never comes.
#[tokio::test]
async fn a_fast_failing_claim_first_attempt_is_retried_after_its_backoff() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()));
    let _procs = env.spawn_all().await;
    let api = env.client();
    let gone = capibara_tests::find_free_port();
    for backoff in [
        json!({"initial_ms": 100}),
        json!({"initial_ms": 100, "factor": 1, "max_ms": 100}),
    ] {
        let id = api
            .submit_id(
                json!({"kind": "http.request", "max_attempts": 2, "backoff": backoff,
                              "input": {"url": format!("http://127.0.0.1:{gone}/")}}),
            )
            .await;
        let job = api.wait_terminal(&id, Duration::from_secs(30)).await;
        assert_eq!(job["status"], "failed", "{backoff}: {job}");
        assert_eq!(job["attempt"], 2, "{backoff}: {job}");
        assert_eq!(job["error"]["type"], "connect_failed", "{job}");
    }
}
