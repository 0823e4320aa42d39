//! Operations: health, readiness and metrics on every binary, OpenAPI and Swagger UI, workers
//! and queues, and the CLI client commands.

use std::time::Duration;

use capibara_tests::{eventually, find_free_port, run_to_exit, wait_http_ok, TestEnv, ADMIN_KEY};
use serde_json::json;

/// Give the worker and the scheduler of `env`'s processes an HTTP port each (health, metrics);
/// returns them.
fn serve_worker_and_scheduler(env: &mut TestEnv) -> (u16, u16) {
    let (wport, sport) = (find_free_port(), find_free_port());
    env.extra_env
        .push(("CAPIBARA_WORKER_ADDR".into(), format!("127.0.0.1:{wport}")));
    env.extra_env.push((
        "CAPIBARA_SCHEDULER_ADDR".into(),
        format!("127.0.0.1:{sport}"),
    ));
    (wport, sport)
}

#[tokio::test]
async fn every_binary_serves_health_readiness_and_metrics() {
    let mut env = TestEnv::new().await;
    let (wport, sport) = serve_worker_and_scheduler(&mut env);
    let _procs = env.spawn_all().await;
    let api = env.client();
    let id = api.submit_id(json!({"kind": "echo"})).await;
    api.wait_terminal(&id, Duration::from_secs(10)).await;

    let http = reqwest::Client::new();
    for base in [
        env.api_url(),
        format!("http://127.0.0.1:{wport}"),
        format!("http://127.0.0.1:{sport}"),
    ] {
        wait_http_ok(&format!("{base}/healthz")).await;
        // The worker is ready once its TTS voice has loaded (it serves the tts queue).
        let body = eventually("ready", Duration::from_secs(60), || async {
            let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
            let ok = ready.status() == 200;
            let body: serde_json::Value = ready.json().await.unwrap();
            ok.then_some(body)
        })
        .await;
        let mut want = json!({"postgres": "ok", "redis": "ok"});
        if base.ends_with(&wport.to_string()) {
            want["tts_voice"] = json!("ok");
        }
        assert_eq!(body, want);
        let metrics = http.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(metrics.status(), 200);
    }
    let worker_metrics = capibara_tests::scrape(&format!("http://127.0.0.1:{wport}")).await;
    assert!(
        worker_metrics.contains("capibara_jobs_total{kind=\"echo\",outcome=\"succeeded\"} 1"),
        "{worker_metrics}"
    );
    assert!(worker_metrics.contains("capibara_job_pickup_latency_seconds_bucket"));
    // Saturation: its slots (its concurrency), none busy once the job has ended.
    let gauge = |name: &str| {
        worker_metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    assert!(
        gauge("capibara_worker_slots").is_some_and(|n| n >= 1.0),
        "{worker_metrics}"
    );
    assert_eq!(
        gauge("capibara_worker_busy_slots"),
        Some(0.0),
        "{worker_metrics}"
    );
    assert!(worker_metrics.contains("capibara_job_run_seconds_bucket"));
    let scheduler_metrics = eventually("queue gauges", Duration::from_secs(10), || async {
        let m = capibara_tests::scrape(&format!("http://127.0.0.1:{sport}")).await;
        m.contains("capibara_queue_depth").then_some(m)
    })
    .await;
    assert!(scheduler_metrics.contains("capibara_queue_oldest_age_seconds"));
}

/// Metric names of the `# HELP` lines of an exposition.
fn described(metrics: &str) -> Vec<&str> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP "))
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

/// The value of the series `name` (no labels) in an exposition.
fn value(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

/// The `capibara_runtime_worker_threads` gauge of the `/metrics` at `base`.
async fn runtime_threads(base: &str) -> Option<f64> {
    wait_http_ok(&format!("{base}/healthz")).await;
    let m = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    value(&m, "capibara_runtime_worker_threads")
}

#[tokio::test]
async fn each_binary_runs_on_half_the_cores_or_the_runtime_threads_it_is_given() {
    let mut env = TestEnv::new().await;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let half = (cores / 2).max(1) as f64;
    let (wport, sport) = serve_worker_and_scheduler(&mut env);
    // Defaults: half the cores, at least one, in every binary.
    {
        let _procs = env.spawn_all().await;
        assert_eq!(runtime_threads(&env.api_url()).await, Some(half), "api");
        let worker = format!("http://127.0.0.1:{wport}");
        assert_eq!(runtime_threads(&worker).await, Some(half), "worker");
        let scheduler = format!("http://127.0.0.1:{sport}");
        assert_eq!(runtime_threads(&scheduler).await, Some(half), "scheduler");
    }
    // CAPIBARA_RUNTIME_THREADS, then Tokio's own variable.
    for (var, n) in [("CAPIBARA_RUNTIME_THREADS", 3), ("TOKIO_WORKER_THREADS", 2)] {
        env.extra_env.push((var.into(), n.to_string()));
        let port = find_free_port();
        let _api = env.spawn_api_on(port).await;
        let base = format!("http://127.0.0.1:{port}");
        assert_eq!(runtime_threads(&base).await, Some(n as f64), "{var}");
        env.extra_env.pop();
    }
    // A value that is not a count stops the start, naming the variable.
    for bin in ["capibara-api", "capibara-worker", "capibara-scheduler"] {
        let mut c = env.command_for(bin);
        c.env("CAPIBARA_RUNTIME_THREADS", "0");
        let (status, err) = run_to_exit(c);
        assert!(!status.success(), "{bin} started with 0 threads");
        assert!(err.contains("CAPIBARA_RUNTIME_THREADS"), "{bin}: {err}");
    }
}

#[tokio::test]
async fn the_first_scrape_describes_every_metric_and_the_process() {
    let mut env = TestEnv::new().await;
    let (wport, sport) = serve_worker_and_scheduler(&mut env);
    // No traffic at all: each binary is scraped as soon as it answers.
    let _procs = env.spawn_all().await;
    let http = reqwest::Client::new();
    let scrape = |base: String| {
        let http = http.clone();
        async move {
            wait_http_ok(&format!("{base}/healthz")).await;
            let r = http.get(format!("{base}/metrics")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        }
    };
    let api = scrape(env.api_url()).await;
    let worker = scrape(format!("http://127.0.0.1:{wport}")).await;
    let scheduler = scrape(format!("http://127.0.0.1:{sport}")).await;

    for (binary, m, ours) in [
        (
            "api",
            &api,
            &[
                "capibara_jobs_submitted_total",
                "capibara_append_batch_seconds",
                "capibara_firehose_events_total",
            ][..],
        ),
        (
            "worker",
            &worker,
            &[
                "capibara_jobs_total",
                "capibara_job_run_seconds",
                "capibara_job_pickup_latency_seconds",
                "capibara_delivery_attempts_total",
            ][..],
        ),
        (
            "scheduler",
            &scheduler,
            &[
                "capibara_deliveries_created_total",
                "capibara_schedule_fire_lateness_seconds",
                "capibara_trigger_calls_total",
                "capibara_leases_expired_total",
            ][..],
        ),
    ] {
        let help = described(m);
        for name in ours.iter().chain(&[
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
        ]) {
            assert!(help.contains(name), "{binary}: no HELP for {name}:\n{m}");
            assert!(
                m.contains(&format!("# TYPE {name} ")),
                "{binary}: no TYPE for {name}:\n{m}"
            );
        }
        let rss = value(m, "process_resident_memory_bytes").expect("rss");
        assert!(rss > 1_000_000.0, "{binary}: rss {rss}");
        assert!(
            value(m, "process_open_fds").expect("fds") >= 3.0,
            "{binary}"
        );
        // A binary that has only just started may not have used one clock tick (10 ms) yet.
        assert!(
            value(m, "process_cpu_seconds_total").expect("cpu") >= 0.0,
            "{binary}"
        );
    }
    // Series are there at zero before anything happened, so rate() has a start.
    assert!(
        worker.contains("capibara_jobs_total{kind=\"echo\",outcome=\"succeeded\"} 0"),
        "{worker}"
    );
    assert!(
        worker.contains("capibara_job_pickup_latency_seconds_count{queue=\"tts\"} 0"),
        "{worker}"
    );
    assert!(
        api.contains("capibara_jobs_submitted_total{kind=\"echo\"} 0"),
        "{api}"
    );
    assert_eq!(
        value(&scheduler, "capibara_deliveries_created_total"),
        Some(0.0)
    );
    assert_eq!(
        value(&scheduler, "capibara_schedule_fire_lateness_seconds_count"),
        Some(0.0)
    );
    assert!(
        scheduler.contains("capibara_trigger_calls_total{outcome=\"rejected\"} 0"),
        "{scheduler}"
    );
    // Each binary describes only what it records.
    assert!(!described(&api).contains(&"capibara_jobs_total"));
    assert!(!described(&scheduler).contains(&"capibara_jobs_submitted_total"));
}

#[tokio::test]
async fn openapi_and_swagger_ui_are_served_from_the_binary() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let http = reqwest::Client::new();
    let spec: serde_json::Value = http
        .get(format!("{}/openapi.json", env.api_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    for path in [
        "/v1/jobs",
        "/v1/jobs/batch",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/events",
        "/v1/jobs/{id}/cancel",
        "/v1/jobs/{id}/retry",
        "/v1/workers",
        "/v1/queues",
        "/v1/api-keys",
    ] {
        assert!(
            spec["paths"][path].is_object(),
            "{path} missing from the spec"
        );
    }
    assert!(spec["components"]["schemas"]["Problem"].is_object());
    let ui = http
        .get(format!("{}/docs/", env.api_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ui.status(), 200);
    assert!(ui.text().await.unwrap().contains("swagger-ui"));
}

#[tokio::test]
async fn workers_and_queues_are_listed() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    let _w1 = env.spawn_worker(&["--queues", "default,reports", "--concurrency", "2"]);
    let _w2 = env.spawn_worker(&["--queues", "reports", "--concurrency", "1"]);

    let workers = eventually(
        "two workers registered",
        Duration::from_secs(10),
        || async {
            let r = api.get("/v1/workers").await;
            let items = r.body["items"].as_array().cloned().unwrap_or_default();
            (items.len() == 2).then_some(items)
        },
    )
    .await;
    assert_ne!(
        workers[0]["name"], workers[1]["name"],
        "worker ids are unique"
    );
    assert!(workers.iter().all(|w| w["status"] == "active"));
    assert!(workers
        .iter()
        .any(|w| w["queues"] == json!(["default", "reports"])));

    let sleeper = api
        .submit_id(json!({"kind": "sleep", "input": {"ms": 3000}, "queue": "reports"}))
        .await;
    api.submit_id(json!({"kind": "sleep", "input": {"ms": 3000}, "queue": "reports"}))
        .await;
    api.submit_id(json!({"kind": "sleep", "input": {"ms": 3000}, "queue": "reports"}))
        .await;
    api.submit_id(json!({"kind": "echo", "queue": "idle"}))
        .await;
    let queues = eventually("queue stats", Duration::from_secs(10), || async {
        let r = api.get("/v1/queues").await;
        let items = r.body["items"].as_array().cloned().unwrap_or_default();
        let reports = items.iter().find(|q| q["name"] == "reports")?.clone();
        (reports["running"] == 3).then_some(items)
    })
    .await;
    let idle = queues.iter().find(|q| q["name"] == "idle").unwrap();
    assert_eq!(idle["depth"], 1, "nobody serves `idle`");
    assert!(idle["oldest_age_s"].as_f64().unwrap() >= 0.0);
    assert_eq!(api.job(&sleeper).await["status"], "running");
}

#[tokio::test]
async fn the_cli_submits_waits_and_streams() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(capibara_tests::bin("capibara"))
            .args(args)
            .env("CAPIBARA_URL", env.api_url())
            .env("CAPIBARA_API_KEY", ADMIN_KEY)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (ok, out) = run(&["submit", "echo", r#"{"x": 1}"#, "--wait", "10"]);
    assert!(ok, "{out}");
    let job: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(job["output"], json!({"x": 1}));
    let id = job["id"].as_str().unwrap();

    let (ok, out) = run(&["get", id]);
    assert!(ok && out.contains("succeeded"));
    let (ok, out) = run(&["wait", id]);
    assert!(ok, "{out}");
    let (ok, out) = run(&["events", id, "--follow"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(out.lines().last().unwrap().contains("JobSucceeded"));

    let (ok, out) = run(&["submit", "nope"]);
    assert!(!ok, "a problem exits non-zero");
    assert!(out.contains("unknown kind"));
}

#[tokio::test]
async fn retention_prunes_finished_jobs_but_keeps_the_event_log() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_RETENTION".into(), "1s".into()));
    let _procs = env.spawn_all().await;
    let api = env.client();
    let done = api.submit_id(json!({"kind": "echo"})).await;
    api.wait_terminal(&done, Duration::from_secs(10)).await;
    let waiting = api
        .submit_id(json!({"kind": "echo", "run_at": (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339()}))
        .await;
    eventually(
        "the finished job is pruned",
        Duration::from_secs(20),
        || async { (api.get(&format!("/v1/jobs/{done}")).await.status == 404).then_some(()) },
    )
    .await;
    assert_eq!(
        api.job(&waiting).await["status"],
        "scheduled",
        "unfinished jobs stay"
    );
    let pool = env.pool().await;
    let (events,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM events WHERE stream_id = $1::uuid")
            .bind(&done)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(events, 3, "the log keeps the pruned job's history");
}

#[tokio::test]
async fn the_cli_manages_schedules_and_triggers() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let run = |args: &[&str]| {
        let out = std::process::Command::new(capibara_tests::bin("capibara"))
            .args(args)
            .env("CAPIBARA_URL", env.api_url())
            .env("CAPIBARA_API_KEY", ADMIN_KEY)
            .output()
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        (out.status.success(), body)
    };
    let (ok, s) = run(&[
        "schedules",
        "create",
        "--name",
        "n",
        "--cron",
        "@daily",
        "--kind",
        "echo",
        "--input",
        r#"{"a":1}"#,
    ]);
    assert!(ok, "{s}");
    let id = s["id"].as_str().unwrap();
    assert_eq!(s["next_fire_times"].as_array().unwrap().len(), 5);
    let (ok, list) = run(&["schedules", "list"]);
    assert!(ok && list["items"].as_array().unwrap().len() == 1);
    let (ok, fired) = run(&["schedules", "trigger", id]);
    assert!(ok && fired["fired_count"] == 1, "{fired}");
    let (ok, paused) = run(&["schedules", "pause", id]);
    assert!(ok && paused["status"] == "paused");
    let (ok, resumed) = run(&["schedules", "resume", id]);
    assert!(ok && resumed["status"] == "active");
    let (ok, t) = run(&[
        "triggers",
        "create",
        "--name",
        "t",
        "--kind",
        "echo",
        "--auth",
        "bearer:a-long-enough-token-123",
    ]);
    assert!(ok, "{t}");
    assert!(t["url"].as_str().unwrap().contains("/hooks/"));
    let (ok, tl) = run(&["triggers", "list"]);
    assert!(ok && tl["items"].as_array().unwrap().len() == 1);
    let (ok, _) = run(&[
        "triggers", "create", "--name", "t", "--kind", "echo", "--auth", "magic:x",
    ]);
    assert!(!ok);
}
