//! Push kinds (docs/workers.md, "Push kinds"): capibara-worker POSTs each job to the kind's
//! endpoint, signed per Standard Webhooks and checked by an independent receiver
//! (`tests/webhook_receiver.py`); the answer decides the attempt (2xx output, 5xx retry, 4xx
//! fail, 429 after `Retry-After`), and a `202` hands the attempt to the endpoint, which finishes
//! it through the worker protocol with its lease token — or loses it when it stops renewing.

use std::time::Duration;

use capibara_tests::{
    eventually, find_free_port,
    receiver::{Receiver, ReceiverOptions},
    scrape, types, Api, TestEnv,
};
use redis::AsyncCommands;
use serde_json::{json, Value};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn env_with_push() -> TestEnv {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_WEBHOOK_SECRET".into(), SECRET.into()));
    env.extra_env
        .push(("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()));
    env
}

async fn put_push_kind(api: &Api, name: &str, url: &str) {
    let r = api
        .send(api.http.put(api.url(&format!("/v1/kinds/{name}"))).json(
            &json!({"mode": "push", "push": {"url": url, "timeout_s": 5}, "max_attempts": 3}),
        ))
        .await;
    assert_eq!(r.status, 201, "{r:?}");
}

async fn requests(r: &Receiver, n: usize) -> Vec<Value> {
    eventually(
        &format!("{n} calls at the endpoint"),
        Duration::from_secs(30),
        || async {
            let got = r.requests();
            (got.len() >= n).then_some(got)
        },
    )
    .await
}

#[tokio::test]
async fn a_push_kinds_jobs_are_posted_signed_and_the_answer_is_the_outcome() {
    let env = env_with_push().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    // The definition is checked: push needs an endpoint, pull takes none.
    let put = |body: Value| {
        let api = api.clone();
        async move {
            api.send(api.http.put(api.url("/v1/kinds/hook.x")).json(&body))
                .await
        }
    };
    let r = put(json!({"mode": "push"})).await;
    assert_eq!(r.body["errors"][0]["field"], "push", "{r:?}");
    let r = put(json!({"push": {"url": "http://127.0.0.1:1/"}})).await;
    assert_eq!(r.body["errors"][0]["field"], "push", "{r:?}");
    let r = put(json!({"mode": "push", "push": {"url": "ftp://x/"}})).await;
    assert_eq!(r.body["errors"][0]["field"], "push.url", "{r:?}");

    // The first call fails (500): retried; the second answers the output.
    let ok = Receiver::start(
        &[SECRET],
        ReceiverOptions {
            fail_first: Some(1),
            reply_input: true,
            ..Default::default()
        },
    );
    put_push_kind(&api, "hook.resize", &ok.url).await;
    // The client's trace context goes with the job to its endpoint (docs/observability.md).
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = api
        .post_with(
            "/v1/jobs",
            ("traceparent", traceparent),
            json!({"kind": "hook.resize", "input": {"w": 7}}),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.body["id"].as_str().unwrap().to_string();
    let job = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["output"], json!({"input": {"w": 7}, "attempt": 2}));
    let calls = ok.requests();
    assert_eq!(calls.len(), 2, "{calls:?}");
    for (i, c) in calls.iter().enumerate() {
        assert_eq!(c["verified"], true, "signed: {c}");
        assert_eq!(
            c["webhook_id"],
            format!("{id}.{}", i + 1),
            "one message per attempt"
        );
        assert_eq!(c["body"]["job"]["id"], id);
        assert_eq!(c["body"]["job"]["status"], "running");
        assert_eq!(c["headers"]["traceparent"], traceparent, "{c}");
        assert_eq!(c["body"]["job"]["traceparent"], traceparent, "{c}");
        assert!(c["body"]["lease"]["token"].is_string(), "{c}");
    }
    let events = api.events(&id).await;
    let t = types(&events);
    assert_eq!(
        t,
        [
            "JobSubmitted",
            "JobStarted",
            "JobProgress",
            "JobAttemptFailed",
            "JobScheduled",
            "JobQueued",
            "JobStarted",
            "JobProgress",
            "JobSucceeded"
        ],
        "every call is in the history"
    );
    let first = &events[2]["data"]["message"];
    assert!(
        first.as_str().unwrap().starts_with("push call: 500"),
        "{first}"
    );
    assert_eq!(events[3]["data"]["error"]["type"], "push_failed");
    // Each call's record commits with the attempt's end: no commit of its own on the way.
    let pool = env.pool().await;
    let tx: Vec<String> = sqlx::query_scalar(
        "SELECT tx_id::text FROM events WHERE stream_id = $1::uuid ORDER BY version",
    )
    .bind(&id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(tx.len(), 9, "{tx:?}");
    assert_eq!(
        tx[2], tx[3],
        "the failed call's record and the attempt's failure"
    );
    assert_eq!(tx[7], tx[8], "the call's record and the success");

    // A 4xx is final.
    let no = Receiver::start(
        &[SECRET],
        ReceiverOptions {
            always: Some(422),
            ..Default::default()
        },
    );
    put_push_kind(&api, "hook.refuse", &no.url).await;
    let id = api.submit_id(json!({"kind": "hook.refuse"})).await;
    let job = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["error"]["type"], "push_rejected");

    // A 429 is retried after its Retry-After.
    let busy = Receiver::start(
        &[SECRET],
        ReceiverOptions {
            always: Some(429),
            retry_after_s: Some(1),
            ..Default::default()
        },
    );
    put_push_kind(&api, "hook.busy", &busy.url).await;
    let id = api.submit_id(json!({"kind": "hook.busy"})).await;
    let job = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["attempt"], 3);
    let calls = busy.requests();
    let at = |c: &Value| c["timestamp"].as_str().unwrap().parse::<i64>().unwrap();
    assert!(
        at(&calls[1]) - at(&calls[0]) >= 1,
        "the retry waited for Retry-After: {calls:?}"
    );
}

/// A job rides with its dispatch entry, and `capibara-worker` starts from that copy instead of
/// reading the job from Postgres, but nothing stands on the copy unless the attempt's first
/// append, which expects the copy's version, commits (docs/write-path.md, "The job rides with
/// its pop"). Copies that are not the job as it stands (here one version behind, with another
/// input) lose that check, whether the attempt claims first (a push call) or runs at once (the
/// built-in `echo`): the job goes back on the queue, runs again on its own input, and the
/// endpoint and the output never see the copy's.
#[tokio::test]
async fn a_carried_copy_that_is_not_the_job_as_it_stands_is_not_run() {
    let mut env = env_with_push().await;
    let wport = find_free_port();
    env.extra_env
        .push(("CAPIBARA_WORKER_ADDR".into(), format!("127.0.0.1:{wport}")));
    let _api = env.spawn_api().await;
    let _scheduler = env.spawn_scheduler();
    let api = env.client();
    let endpoint = Receiver::start(
        &[SECRET],
        ReceiverOptions {
            reply_input: true,
            ..Default::default()
        },
    );
    put_push_kind(&api, "hook.copy", &endpoint.url).await;
    // No worker yet: both jobs wait in Redis, each with its copy.
    let current = api
        .submit_id(json!({"kind": "hook.copy", "input": {"n": 1}}))
        .await;
    let stale = api
        .submit_id(json!({"kind": "hook.copy", "input": {"n": 2}}))
        .await;
    let echo = api
        .submit_id(json!({"kind": "echo", "input": {"n": 3}}))
        .await;
    let mut redis = redis::Client::open(env.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = |id: &str| format!("{{{}}}:body:{id}", env.redis_prefix);
    for (id, n) in [(&stale, 2), (&echo, 3)] {
        let copy: String = redis.get(key(id)).await.unwrap();
        let mut forged: Value = serde_json::from_str(&copy).unwrap();
        assert_eq!(forged["input"], json!({"n": n}), "{forged}");
        assert_eq!(forged["version"], 1, "{forged}");
        forged["input"] = json!({"n": "not the job's"});
        forged["version"] = json!(0);
        let _: () = redis.set(key(id), forged.to_string()).await.unwrap();
    }

    let _worker = env.spawn_worker(&[]);
    for (id, n) in [(&current, 1), (&stale, 2)] {
        let job = api.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["output"], json!({"input": {"n": n}, "attempt": 1}));
        assert_eq!(job["attempt"], 1, "one attempt: {job}");
        let exists: bool = redis.exists(key(id)).await.unwrap();
        assert!(!exists, "the pop took the copy off");
    }
    let job = api.wait_terminal(&echo, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["output"], json!({"n": 3}), "the job's own input: {job}");
    assert_eq!(job["attempt"], 1, "the discarded run was no attempt: {job}");
    let calls = endpoint.requests();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(
        calls
            .iter()
            .all(|c| c["body"]["job"]["input"]["n"] != "not the job's"),
        "{calls:?}"
    );
    let metrics = scrape(&format!("http://127.0.0.1:{wport}")).await;
    assert!(
        metrics.contains("capibara_dispatch_carried_stale_total 2"),
        "two copies were set aside: {}",
        metrics
            .lines()
            .filter(|l| l.contains("dispatch"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn a_202_hands_the_attempt_to_the_endpoint_which_finishes_it_or_loses_it() {
    let env = env_with_push().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let later = Receiver::start(
        &[SECRET],
        ReceiverOptions {
            always: Some(202),
            ..Default::default()
        },
    );
    put_push_kind(&api, "hook.later", &later.url).await;
    let id = api.submit_id(json!({"kind": "hook.later"})).await;
    // The endpoint keeps the first attempt but never renews its lease: after the visibility
    // timeout the attempt is lost (worker_lost) and the job is pushed again.
    let calls = requests(&later, 2).await;
    let token = |c: &Value| c["body"]["lease"]["token"].as_str().unwrap().to_string();
    let (stale, fresh) = (token(&calls[0]), token(&calls[1]));
    let job = api.job(&id).await;
    assert_eq!(
        (&job["status"], &job["attempt"]),
        (&json!("running"), &json!(2))
    );
    let lease_call = |token: String, what: &'static str, body: Value| {
        let api = api.clone();
        let id = id.clone();
        async move {
            api.send(
                api.http
                    .post(api.url(&format!("/v1/jobs/{id}/{what}")))
                    .header("Capibara-Lease", token)
                    .json(&body),
            )
            .await
        }
    };
    let r = lease_call(stale.clone(), "complete", json!({"output": "stale"})).await;
    assert_eq!(r.status, 409, "{r:?}");
    // The second attempt is finished by the endpoint through the protocol.
    let r = lease_call(fresh.clone(), "heartbeat", json!({})).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = lease_call(fresh.clone(), "progress", json!({"percent": 90})).await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = lease_call(fresh, "complete", json!({"output": {"done": 2}})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["status"], "succeeded");
    let events = api.events(&id).await;
    let failed = events
        .iter()
        .find(|e| e["type"] == "JobAttemptFailed")
        .unwrap();
    assert_eq!(failed["data"]["error"]["type"], "worker_lost");
    // A built-in worker's token is for push kinds only: never for a built-in kind's job.
    let echo = api
        .submit_id(json!({"kind": "sleep", "input": {"ms": 3000}}))
        .await;
    let running = eventually("the sleep job runs", Duration::from_secs(10), || async {
        let j = api.job(&echo).await;
        (j["status"] == "running").then_some(j)
    })
    .await;
    let worker: Vec<(uuid::Uuid,)> = sqlx::query_as("SELECT id FROM workers WHERE name = $1")
        .bind(running["worker_id"].as_str().unwrap())
        .fetch_all(&env.pool().await)
        .await
        .unwrap();
    let forged = format!("{}.1.{}", echo.replace('-', ""), worker[0].0.simple());
    let r = api
        .send(
            api.http
                .post(api.url(&format!("/v1/jobs/{echo}/complete")))
                .header("Capibara-Lease", forged)
                .json(&json!({"output": "forged"})),
        )
        .await;
    assert_eq!(r.status, 409, "{r:?}");
}

/// A child process killed on drop (the example's SDK worker).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_mixed_workers_example_runs_code_run_a_python_sdk_kind_and_a_push_kind() {
    let env = env_with_push().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = root.join("docs/examples/mixed-workers");
    // demo.notify: a push kind whose endpoint answers {input, attempt}.
    let endpoint = Receiver::start(
        &[SECRET],
        ReceiverOptions {
            reply_input: true,
            ..Default::default()
        },
    );
    put_push_kind(&api, "demo.notify", &endpoint.url).await;
    // demo.describe: the example's Python SDK worker registers it.
    let _worker = Child(
        std::process::Command::new("python3")
            .arg(example.join("worker.py"))
            .env("PYTHONPATH", root.join("sdk/python/src"))
            .env("CAPIBARA_URL", env.api_url())
            .env("CAPIBARA_API_KEY", capibara_tests::ADMIN_KEY)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("starting the example's worker"),
    );
    eventually(
        "the SDK worker is live",
        Duration::from_secs(30),
        || async {
            (api.get("/v1/kinds/demo.describe").await.body["live_workers"] == 1).then_some(())
        },
    )
    .await;
    let yaml = std::fs::read_to_string(example.join("workflow.yaml")).unwrap();
    let r = api
        .send(
            api.http
                .post(api.url("/v1/workflows"))
                .header("content-type", "application/yaml")
                .body(yaml),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let wf = r.body["id"].as_str().unwrap().to_string();
    let run = capibara_tests::runs::start(&api, &wf, json!({"values": [2, 4, 9]})).await;
    let ended = capibara_tests::runs::ended(&api, &run, Duration::from_secs(90)).await;
    assert_eq!(ended["status"], "succeeded", "{ended}");
    let summary = "3 values, total 15, mean 5.00";
    assert_eq!(ended["output"]["summary"], summary, "{ended}");
    assert_eq!(
        ended["output"]["notified"],
        json!({"input": {"text": summary}, "attempt": 1})
    );
    let call = &endpoint.requests()[0];
    assert_eq!(call["verified"], true);
    assert_eq!(call["body"]["job"]["input"]["text"], summary);
}
