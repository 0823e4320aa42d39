//! The web dashboard (`/ui`) in a real browser: Debian's `chromium`, headless, driven by
//! playwright-core from tests/browser/dashboard.mjs (docs/dashboard.md). This test starts the
//! API, a worker and the scheduler, makes the data the script needs (a workflow run, a workflow
//! the browser starts, a finished TTS job, a running job, a failed delivery to a receiver that
//! refuses, a schedule, a trigger, a subscription), then runs the script and asserts it passed.
//! Screenshots land in target/capibara-test/screenshots.
//!
//! deploy/test.sh installs playwright-core and axe-core from the npm registry into
//! target/capibara-test/browser (`CAPIBARA_TEST_BROWSER_MODULES`); deploy/install-deps.sh
//! installs chromium. Without them the test is skipped with a message, except under `CI=true`,
//! where a missing tool fails it.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use capibara_tests::{
    eventually,
    receiver::{Receiver, ReceiverOptions},
    runs, TestEnv,
};
use serde_json::json;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The node modules, node and chromium; `None` (skip) when one is missing outside CI.
fn tools() -> Option<(PathBuf, PathBuf)> {
    let modules = std::env::var_os("CAPIBARA_TEST_BROWSER_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/capibara-test/browser/node_modules"));
    let chromium = std::env::var_os("CAPIBARA_TEST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let node_ok = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let missing: Vec<String> = [
        (!node_ok).then(|| "node".to_string()),
        (!modules.join("playwright-core").exists())
            .then(|| format!("playwright-core in {}", modules.display())),
        (!modules.join("axe-core").exists()).then(|| format!("axe-core in {}", modules.display())),
        (!chromium.exists()).then(|| format!("chromium at {}", chromium.display())),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return Some((modules, chromium));
    }
    let why = format!(
        "the dashboard browser test needs {}: deploy/install-deps.sh installs chromium (apt) and \
         deploy/test.sh installs playwright-core and axe-core (npm) into \
         target/capibara-test/browser",
        missing.join(", ")
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("skipped: {why}");
    None
}

#[tokio::test]
async fn the_dashboard_works_in_a_real_browser() {
    let Some((modules, chromium)) = tools() else {
        return;
    };
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_WEBHOOK_SECRET".into(), SECRET.into()));
    env.extra_env
        .push(("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()));
    env.extra_env
        .push(("CAPIBARA_DELIVERY_RETRY_SCHEDULE".into(), "100ms".into()));
    let _procs = env.spawn_all().await;
    let admin = env.client();
    let reader = admin.key_for("default", &["read"]).await;

    // A three-step workflow run (a → b, a → c) that finishes.
    let wf = runs::create(
        &admin,
        json!({"name": "fan-out", "steps": [
            {"id": "fetch", "kind": "echo", "input": {"n": 1}},
            {"id": "resize", "kind": "echo", "depends_on": ["fetch"], "input": {"n": 2}},
            {"id": "publish", "kind": "echo", "depends_on": ["fetch"], "input": {"n": 3}}]}),
    )
    .await;
    let run = runs::start(&admin, &wf, json!({})).await;
    runs::ended(&admin, &run, Duration::from_secs(60)).await;
    // One the browser starts itself: its middle step sleeps, so the DAG changes while watched.
    runs::create(
        &admin,
        json!({"name": "slow-pipeline", "steps": [
            {"id": "fetch", "kind": "echo", "input": {}},
            {"id": "wait", "kind": "sleep", "depends_on": ["fetch"], "input": {"ms": 3000}},
            {"id": "publish", "kind": "echo", "depends_on": ["wait"], "input": {}}]}),
    )
    .await;

    // A TTS job whose audio the page plays.
    let tts = admin
        .submit_id(json!({"kind": "tts.render", "input": {"text": "Hello from the dashboard."}}))
        .await;
    let done = admin.wait_terminal(&tts, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}");

    // A failed delivery: the receiver answers 410 (final, no retries).
    let receiver = Receiver::start(
        &[SECRET],
        ReceiverOptions {
            always: Some(410),
            ..Default::default()
        },
    );
    let failing = admin
        .submit_id(json!({"kind": "fail", "max_attempts": 1, "callback_url": format!("{}/hook", receiver.url)}))
        .await;
    let delivery = eventually("a failed delivery", Duration::from_secs(30), || async {
        let r = admin
            .get(&format!("/v1/deliveries?job_id={failing}&status=failed"))
            .await;
        r.body["items"]
            .as_array()
            .and_then(|a| a.first())
            .map(|d| d["id"].as_str().unwrap().to_string())
    })
    .await;

    // Something on every other page: a schedule, a trigger, a subscription.
    let r = admin
        .post(
            "/v1/schedules",
            json!({"name": "nightly-report", "cron": "0 3 * * *",
                   "target": {"type": "job", "job": {"kind": "echo", "input": {"report": true}}}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let schedule = r.body["id"].as_str().unwrap().to_string();
    let r = admin
        .post(&format!("/v1/schedules/{schedule}/trigger"), json!({}))
        .await;
    assert!(r.status < 300, "{r:?}");
    let r = admin
        .post(
            "/v1/triggers",
            json!({"name": "github-push", "auth": {"type": "bearer", "token": "a-long-enough-token-123"},
                   "target": {"type": "job", "job": {"kind": "echo"}}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = admin
        .post(
            "/v1/subscriptions",
            json!({"url": format!("{}/events", receiver.url), "events": ["job.failed"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");

    // A job that runs until the browser cancels it.
    let running = admin
        .submit_id(json!({"kind": "sleep", "input": {"ms": 600000, "progress_ms": 1000}}))
        .await;
    eventually("the long job to run", Duration::from_secs(30), || async {
        (admin.job(&running).await["status"] == "running").then_some(())
    })
    .await;

    let shots = repo().join("target/capibara-test/screenshots");
    let env_url = env.api_url();
    let script = repo().join("tests/browser/dashboard.mjs");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .env("CAPIBARA_UI_URL", env_url)
            .env("CAPIBARA_UI_ADMIN_KEY", capibara_tests::ADMIN_KEY)
            .env("CAPIBARA_UI_READ_KEY", &reader.key)
            .env("CAPIBARA_UI_RUN_ID", run)
            .env("CAPIBARA_UI_RUNNING_JOB_ID", running)
            .env("CAPIBARA_UI_DELIVERY_ID", delivery)
            .env("CAPIBARA_UI_TTS_JOB_ID", tts)
            .env("CAPIBARA_UI_SCREENSHOTS", &shots)
            .env("CAPIBARA_UI_NODE_MODULES", modules)
            .env("CAPIBARA_UI_CHROMIUM", chromium)
            .output()
            .expect("running node")
    })
    .await
    .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{log}");
    assert!(out.status.success(), "the browser checks failed:\n{log}");
    assert!(log.contains("all dashboard checks passed"), "{log}");
}
