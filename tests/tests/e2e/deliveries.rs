//! Results delivery: signed callbacks verified by an independent receiver (Python stdlib),
//! retries and their log, redelivery, subscriptions, order per job, outbound safety, and
//! `/v1/orchestrate`.

use std::time::Duration;

use capibara_tests::{
    eventually, find_free_port,
    receiver::{Receiver, ReceiverOptions},
    TestEnv,
};
use serde_json::{json, Value};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn env_with_callbacks() -> TestEnv {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_WEBHOOK_SECRET".into(), SECRET.into()));
    env.extra_env
        .push(("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()));
    env.extra_env
        .push(("CAPIBARA_DELIVERY_RETRY_SCHEDULE".into(), "100ms,200ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms".into()));
    env
}

async fn wait_requests(r: &Receiver, n: usize, timeout: Duration) -> Vec<Value> {
    eventually(
        &format!("{n} requests at the receiver"),
        timeout,
        || async {
            let got = r.requests();
            (got.len() >= n).then_some(got)
        },
    )
    .await
}

#[tokio::test]
async fn a_callback_is_signed_per_standard_webhooks_and_recorded() {
    let env = env_with_callbacks().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let receiver = Receiver::start(&[SECRET], ReceiverOptions::default());

    let id = api
        .submit_id(json!({"kind": "echo", "input": {"n": 7}, "callback_url": format!("{}/hook", receiver.url)}))
        .await;

    let got = wait_requests(&receiver, 1, Duration::from_secs(20)).await;
    let req = &got[0];
    assert_eq!(
        req["verified"], true,
        "the independent verifier accepts the signature: {req}"
    );
    assert_eq!(req["path"], "/hook");
    assert_eq!(req["body"]["type"], "job.succeeded");
    assert_eq!(req["body"]["data"]["id"], id.as_str());
    assert_eq!(req["body"]["data"]["status"], "succeeded");
    assert_eq!(req["body"]["data"]["output"], json!({"n": 7}));
    assert!(req["body"]["timestamp"].is_string());

    let list = eventually(
        "delivery recorded as succeeded",
        Duration::from_secs(10),
        || async {
            let r = api.get(&format!("/v1/deliveries?job_id={id}")).await;
            let items = r.body["items"].as_array().cloned().unwrap_or_default();
            (items.len() == 1 && items[0]["status"] == "succeeded").then_some(items)
        },
    )
    .await;
    let delivery = &list[0];
    assert_eq!(delivery["attempts"], 1);
    assert_eq!(delivery["event_type"], "job.succeeded");
    assert_eq!(delivery["target"], "callback");
    assert_eq!(
        req["webhook_id"], delivery["id"],
        "webhook-id is the delivery id"
    );
    let detail = api
        .get(&format!(
            "/v1/deliveries/{}",
            delivery["id"].as_str().unwrap()
        ))
        .await;
    let attempts = detail.body["attempts_log"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["data"]["status_code"], 200);
    assert!(attempts[0]["data"]["duration_ms"].is_number());
    assert!(attempts[0]["data"]["response_snippet"]
        .as_str()
        .unwrap()
        .contains("ok"));
}

#[tokio::test]
async fn a_failing_receiver_is_retried_until_it_accepts() {
    let env = env_with_callbacks().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let receiver = Receiver::start(
        &[SECRET],
        ReceiverOptions {
            fail_first: Some(2),
            ..Default::default()
        },
    );
    let id = api
        .submit_id(json!({"kind": "echo", "callback_url": receiver.url}))
        .await;

    let got = wait_requests(&receiver, 3, Duration::from_secs(20)).await;
    let statuses: Vec<i64> = got
        .iter()
        .map(|r| r["status_returned"].as_i64().unwrap())
        .collect();
    assert_eq!(statuses, [500, 500, 200]);
    assert!(
        got.iter().all(|r| r["webhook_id"] == got[0]["webhook_id"]),
        "the same message id on every retry"
    );
    let d = eventually(
        "succeeded after retries",
        Duration::from_secs(10),
        || async {
            let r = api
                .get(&format!("/v1/deliveries?job_id={id}&status=succeeded"))
                .await;
            r.body["items"].as_array().and_then(|a| a.first().cloned())
        },
    )
    .await;
    assert_eq!(d["attempts"], 3);
    let detail = api
        .get(&format!("/v1/deliveries/{}", d["id"].as_str().unwrap()))
        .await;
    let codes: Vec<i64> = detail.body["attempts_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["data"]["status_code"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [500, 500, 200]);
}

#[tokio::test]
async fn a_4xx_is_final_and_redeliver_tries_again() {
    let env = env_with_callbacks().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let receiver = Receiver::start(
        &[SECRET],
        ReceiverOptions {
            always: Some(410),
            ..Default::default()
        },
    );
    let id = api
        .submit_id(json!({"kind": "fail", "max_attempts": 1, "callback_url": receiver.url}))
        .await;
    let d = eventually("failed delivery", Duration::from_secs(20), || async {
        let r = api
            .get(&format!("/v1/deliveries?job_id={id}&status=failed"))
            .await;
        r.body["items"].as_array().and_then(|a| a.first().cloned())
    })
    .await;
    assert_eq!(d["event_type"], "job.failed");
    assert_eq!(d["attempts"], 1, "a 410 is not retried");
    assert_eq!(d["last_status_code"], 410);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(receiver.requests().len(), 1);

    let did = d["id"].as_str().unwrap().to_string();
    let r = api
        .post(&format!("/v1/deliveries/{did}/redeliver"), json!({}))
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.body["status"], "pending");
    wait_requests(&receiver, 2, Duration::from_secs(20)).await;
    let d = eventually(
        "second attempt recorded",
        Duration::from_secs(10),
        || async {
            let r = api.get(&format!("/v1/deliveries/{did}")).await;
            (r.body["attempts"] == 2 && r.body["status"] == "failed").then_some(r.body)
        },
    )
    .await;
    assert_eq!(d["attempts_log"].as_array().unwrap().len(), 2);
    let pending = api.get("/v1/deliveries?status=pending").await;
    assert_eq!(pending.status, 200);
    assert_eq!(api.get("/v1/deliveries?status=done").await.status, 422);
}

#[tokio::test]
async fn subscriptions_filter_events_and_can_be_paused_updated_and_deleted() {
    let env = env_with_callbacks().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let receiver_url_holder = Receiver::start(&[SECRET], ReceiverOptions::default());
    let r = api
        .post(
            "/v1/subscriptions",
            json!({"url": receiver_url_holder.url, "events": ["job.*"], "filter": {"kind": "echo", "tags": {"team": "a"}}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let sub_id = r.body["id"].as_str().unwrap().to_string();
    let sub_secret = r.body["secret"].as_str().unwrap().to_string();
    assert!(sub_secret.starts_with("whsec_"));
    drop(receiver_url_holder);
    // A receiver that only knows the subscription's own secret.
    let receiver = Receiver::start(&[&sub_secret], ReceiverOptions::default());
    let r = api
        .send(
            api.http
                .patch(api.url(&format!("/v1/subscriptions/{sub_id}")))
                .json(&json!({"url": receiver.url})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.body.get("secret").is_none(),
        "the secret is shown only once"
    );

    let echo = api
        .submit_id(json!({"kind": "echo", "tags": {"team": "a"}}))
        .await;
    api.submit_id(json!({"kind": "echo", "tags": {"team": "b"}}))
        .await;
    api.submit_id(json!({"kind": "sleep", "input": {"ms": 1}, "tags": {"team": "a"}}))
        .await;

    let got = wait_requests(&receiver, 3, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let got_all = receiver.requests();
    assert_eq!(
        got_all.len(),
        3,
        "only the matching job's events: {got_all:?}"
    );
    assert!(got
        .iter()
        .all(|r| r["verified"] == true && r["body"]["data"]["id"] == echo.as_str()));
    let types: Vec<&str> = got
        .iter()
        .map(|r| r["body"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["job.submitted", "job.started", "job.succeeded"],
        "in order"
    );
    let listed = api
        .get(&format!("/v1/deliveries?subscription_id={sub_id}"))
        .await;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 3);

    let paused = api
        .post(&format!("/v1/subscriptions/{sub_id}/pause"), json!({}))
        .await;
    assert_eq!(paused.body["status"], "paused");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    api.submit_id(json!({"kind": "echo", "tags": {"team": "a"}}))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.requests().len(), 3, "nothing while paused");

    let r = api
        .send(
            api.http
                .patch(api.url(&format!("/v1/subscriptions/{sub_id}")))
                .json(&json!({"events": ["job.succeeded"]})),
        )
        .await;
    assert_eq!(r.body["events"], json!(["job.succeeded"]));
    api.post(&format!("/v1/subscriptions/{sub_id}/resume"), json!({}))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    api.submit_id(json!({"kind": "echo", "tags": {"team": "a"}}))
        .await;
    let got = wait_requests(&receiver, 4, Duration::from_secs(20)).await;
    assert_eq!(got[3]["body"]["type"], "job.succeeded");

    assert_eq!(
        api.get("/v1/subscriptions").await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let del = api
        .send(
            api.http
                .delete(api.url(&format!("/v1/subscriptions/{sub_id}"))),
        )
        .await;
    assert_eq!(del.status, 204);
    assert_eq!(
        api.get(&format!("/v1/subscriptions/{sub_id}")).await.status,
        404
    );

    let bad = api
        .post(
            "/v1/subscriptions",
            json!({"url": receiver.url, "events": ["job.finished"]}),
        )
        .await;
    assert_eq!(bad.status, 422);
    assert_eq!(bad.body["errors"][0]["field"], "events[0]");
}

#[tokio::test]
async fn a_receiver_that_was_down_gets_everything_in_order_per_job() {
    let env = env_with_callbacks().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let port = find_free_port();
    let url = format!("http://127.0.0.1:{port}");
    let r = api
        .post(
            "/v1/subscriptions",
            json!({"url": url, "events": ["job.submitted", "job.started", "job.succeeded"]}),
        )
        .await;
    let secret = r.body["secret"].as_str().unwrap().to_string();

    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            api.submit_id(json!({"kind": "echo", "input": {"i": i}}))
                .await,
        );
    }
    // Nobody listens yet: attempts fail with connection refused and are retried.
    eventually(
        "failed attempts recorded",
        Duration::from_secs(20),
        || async {
            let r = api.get("/v1/deliveries?status=pending").await;
            let items = r.body["items"].as_array().cloned().unwrap_or_default();
            items
                .iter()
                .any(|d| d["attempts"].as_i64().unwrap_or(0) >= 1)
                .then_some(())
        },
    )
    .await;
    let receiver = Receiver::start(
        &[&secret],
        ReceiverOptions {
            port: Some(port),
            ..Default::default()
        },
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while receiver.requests().len() < 9 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = receiver.requests();
    if got.len() < 9 {
        let d = api.get("/v1/deliveries?limit=50").await;
        let jobs = api.get("/v1/jobs?kind=callback.deliver&limit=50").await;
        panic!(
            "only {} requests: {got:?}\ndeliveries: {}\njobs: {}",
            got.len(),
            d.body,
            jobs.body
        );
    }
    for id in &ids {
        let per_job: Vec<&str> = got
            .iter()
            .filter(|r| r["body"]["data"]["id"] == id.as_str())
            .map(|r| r["body"]["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            per_job,
            ["job.submitted", "job.started", "job.succeeded"],
            "job {id}"
        );
    }
    assert!(got.iter().all(|r| r["verified"] == true));
}

#[tokio::test]
async fn private_and_metadata_addresses_are_refused() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_WEBHOOK_SECRET".into(), SECRET.into()));
    let _api = env.spawn_api().await;
    let api = env.client();
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1/",
        "http://[::1]/",
        "ftp://example.com/",
        "not a url",
    ] {
        let r = api
            .submit(json!({"kind": "echo", "callback_url": url}))
            .await;
        assert_eq!(r.status, 422, "{url}: {r:?}");
        assert_eq!(r.body["errors"][0]["field"], "callback_url", "{url}");
        let r = api
            .post(
                "/v1/subscriptions",
                json!({"url": url, "events": ["job.*"]}),
            )
            .await;
        assert_eq!(r.status, 422, "{url}");
        assert_eq!(r.body["errors"][0]["field"], "url");
    }
    let r = api
        .submit(json!({"kind": "echo", "callback_url": "http://127.0.0.1:9/", "callback_events": ["job.done"]}))
        .await;
    assert_eq!(r.status, 422);
}

#[tokio::test]
async fn callbacks_need_a_signing_secret_on_the_server() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()));
    let _api = env.spawn_api().await;
    let r = env
        .client()
        .submit(json!({"kind": "echo", "callback_url": "http://127.0.0.1:9/"}))
        .await;
    assert_eq!(r.status, 422);
    assert!(r.body["detail"]
        .as_str()
        .unwrap()
        .contains("CAPIBARA_WEBHOOK_SECRET"));
}

#[tokio::test]
async fn orchestrate_answers_synchronously_and_deduplicates_identical_requests() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_ORCHESTRATE_WAIT_S".into(), "2".into()));
    let _procs = env.spawn_all().await;
    let api = env.client();

    let r = api
        .post(
            "/v1/orchestrate",
            json!({"intent": "echo", "inputs": {"q": "hi"}, "context": {"user": 1}}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["status"], "succeeded");
    assert_eq!(r.body["result"], json!({"q": "hi"}));
    assert_eq!(r.body["context"], json!({"user": 1}));
    assert_eq!(r.body["deduplicated"], false);
    let job_id = r.body["job_id"].clone();

    let again = api
        .post(
            "/v1/orchestrate",
            json!({"intent": "echo", "inputs": {"q": "hi"}}),
        )
        .await;
    assert_eq!(again.body["job_id"], job_id);
    assert_eq!(again.body["deduplicated"], true);
    let other = api
        .post(
            "/v1/orchestrate",
            json!({"intent": "echo", "inputs": {"q": "bye"}}),
        )
        .await;
    assert_ne!(other.body["job_id"], job_id);

    let slow = api
        .post(
            "/v1/orchestrate",
            json!({"intent": "sleep", "inputs": {"ms": 5000}}),
        )
        .await;
    assert_eq!(slow.status, 202);
    assert_eq!(slow.body["status"], "accepted");
    assert!(slow.body["location"]
        .as_str()
        .unwrap()
        .starts_with("/v1/jobs/"));
    let asynchronous = api
        .post(
            "/v1/orchestrate",
            json!({"intent": "echo", "inputs": {"n": 1}, "mode": "async"}),
        )
        .await;
    assert_eq!(asynchronous.status, 202);

    let unknown = api
        .post(
            "/v1/orchestrate",
            json!({"intent": "summarize", "inputs": {}}),
        )
        .await;
    assert_eq!(unknown.status, 422);
    assert_eq!(unknown.body["errors"][0]["field"], "intent");
    assert!(unknown.body["detail"].as_str().unwrap().contains("echo"));
}

#[tokio::test]
async fn rebuilding_deliveries_schedules_and_triggers_gives_identical_rows() {
    let env = env_with_callbacks().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let receiver = Receiver::start(
        &[SECRET],
        ReceiverOptions {
            fail_first: Some(1),
            ..Default::default()
        },
    );
    let id = api
        .submit_id(json!({"kind": "echo", "callback_url": receiver.url}))
        .await;
    let s = api
        .post(
            "/v1/schedules",
            json!({"name": "r", "cron": "@hourly", "target": {"type": "job", "job": {"kind": "echo"}}}),
        )
        .await;
    let sid = s.body["id"].as_str().unwrap().to_string();
    api.post(&format!("/v1/schedules/{sid}/trigger"), json!({}))
        .await;
    api.post(&format!("/v1/schedules/{sid}/pause"), json!({}))
        .await;
    let t = api
        .post(
            "/v1/triggers",
            json!({"name": "t", "auth": {"type": "bearer", "token": "a-long-enough-token-123"},
                   "target": {"type": "job", "job": {"kind": "echo"}}}),
        )
        .await;
    assert_eq!(t.status, 201);
    eventually(
        "delivered after a retry",
        Duration::from_secs(20),
        || async {
            let r = api
                .get(&format!("/v1/deliveries?job_id={id}&status=succeeded"))
                .await;
            (r.body["items"].as_array().map(|a| a.len()) == Some(1)).then_some(())
        },
    )
    .await;
    let pool = env.pool().await;
    let snapshot = |table: &'static str| {
        let pool = pool.clone();
        async move {
            let rows: Vec<(Value,)> =
                sqlx::query_as(&format!("SELECT to_jsonb(t) FROM {table} t ORDER BY id"))
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            rows
        }
    };
    let before = (
        snapshot("deliveries").await,
        snapshot("schedules").await,
        snapshot("triggers").await,
    );
    assert_eq!((before.0.len(), before.1.len(), before.2.len()), (1, 1, 1));
    env.rebuild_projections();
    let after = (
        snapshot("deliveries").await,
        snapshot("schedules").await,
        snapshot("triggers").await,
    );
    assert_eq!(before, after);
}

#[tokio::test]
async fn subscriptions_receive_run_ends_by_name_or_alias_with_their_custom_headers() {
    let env = env_with_callbacks().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    // Subscriptions first (their secrets are generated), then one receiver knowing both.
    let port = find_free_port();
    let base = format!("http://127.0.0.1:{port}");
    let canonical = api
        .post(
            "/v1/subscriptions",
            json!({"url": format!("{base}/canonical"), "event_types": ["run.succeeded", "run.failed"],
                   "headers": {"Authorization": "Bearer receiver-token-123", "X-Team": "a"}}),
        )
        .await;
    assert_eq!(canonical.status, 201, "{canonical:?}");
    assert_eq!(
        canonical.body["header_names"],
        json!(["authorization", "x-team"])
    );
    assert_eq!(
        canonical.body["events"],
        json!(["run.succeeded", "run.failed"])
    );
    let alias = api
        .post(
            "/v1/subscriptions",
            json!({"url": format!("{base}/alias"), "events": ["workflow.completed"]}),
        )
        .await;
    assert_eq!(alias.status, 201, "{alias:?}");
    let failures = api
        .post(
            "/v1/subscriptions",
            json!({"url": format!("{base}/failures"), "events": ["workflow.failed", "run.canceled"]}),
        )
        .await;
    assert_eq!(failures.status, 201, "{failures:?}");
    let receiver = Receiver::start(
        &[
            canonical.body["secret"].as_str().unwrap(),
            alias.body["secret"].as_str().unwrap(),
            failures.body["secret"].as_str().unwrap(),
        ],
        ReceiverOptions {
            port: Some(port),
            ..Default::default()
        },
    );

    let wf = api
        .post(
            "/v1/workflows",
            json!({"name": "subs", "steps": [{"id": "a", "kind": "echo", "input": {"v": 1}}]}),
        )
        .await;
    assert_eq!(wf.status, 201, "{wf:?}");
    let wf = wf.body["id"].as_str().unwrap().to_string();
    let run = api
        .post(&format!("/v1/workflows/{wf}/runs"), json!({"input": {}}))
        .await;
    assert_eq!(run.status, 202, "{run:?}");
    let run = run.body["id"].as_str().unwrap().to_string();

    wait_requests(&receiver, 2, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let got = receiver.requests();
    assert_eq!(
        got.len(),
        2,
        "one run end per subscription, no job events: {got:?}"
    );
    let at = |path: &str| got.iter().find(|r| r["path"] == path).cloned().unwrap();
    let c = at("/canonical");
    assert_eq!(c["verified"], true, "{c}");
    assert_eq!(c["body"]["type"], "run.succeeded");
    assert_eq!(c["body"]["data"]["id"], run.as_str());
    assert_eq!(c["body"]["data"]["status"], "succeeded");
    assert_eq!(c["body"]["data"]["output"], json!({"a": {"v": 1}}));
    assert_eq!(c["headers"]["authorization"], "Bearer receiver-token-123");
    assert_eq!(c["headers"]["x-team"], "a");
    let a = at("/alias");
    assert_eq!(a["verified"], true, "{a}");
    assert_eq!(
        a["body"]["type"], "workflow.completed",
        "delivered under the alias subscribed to"
    );
    assert_eq!(a["body"]["data"]["id"], run.as_str());
    assert!(a["headers"].get("authorization").is_none());

    let listed = api
        .get(&format!(
            "/v1/deliveries?subscription_id={}",
            alias.body["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(listed.body["items"][0]["event_type"], "workflow.completed");
    assert_eq!(listed.body["items"][0]["job_id"], run.as_str());

    // Header values are never shown again, nor written to the event log.
    let sub_id = canonical.body["id"].as_str().unwrap();
    let shown = api.get(&format!("/v1/subscriptions/{sub_id}")).await;
    assert_eq!(
        shown.body["header_names"],
        json!(["authorization", "x-team"])
    );
    let everything = format!(
        "{} {} {}",
        shown.body,
        api.get("/v1/subscriptions").await.body,
        api.get("/v1/events?limit=500").await.body
    );
    assert!(
        !everything.contains("receiver-token-123"),
        "a header value leaked: {everything}"
    );
    // PATCH replaces the headers; `{}` removes them.
    let r = api
        .send(
            api.http
                .patch(api.url(&format!("/v1/subscriptions/{sub_id}")))
                .json(&json!({"headers": {}})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["header_names"], json!([]));

    // A failed run and a canceled one: `run.failed` to the canonical subscription (now without
    // its headers), `workflow.failed` (the alias) and `run.canceled` to the third.
    let failing = api
        .post(
            "/v1/workflows",
            json!({"name": "subs-fail", "steps": [{"id": "a", "kind": "fail", "input": {"message": "no"}}]}),
        )
        .await;
    let failing = failing.body["id"].as_str().unwrap().to_string();
    let failed_run = api
        .post(
            &format!("/v1/workflows/{failing}/runs"),
            json!({"input": {}}),
        )
        .await;
    let failed_run = failed_run.body["id"].as_str().unwrap().to_string();
    let waiting = api
        .post(
            "/v1/workflows",
            json!({"name": "subs-cancel", "steps": [{"id": "ok", "kind": "approval"}]}),
        )
        .await;
    let waiting = waiting.body["id"].as_str().unwrap().to_string();
    let canceled_run = api
        .post(
            &format!("/v1/workflows/{waiting}/runs"),
            json!({"input": {}}),
        )
        .await;
    let canceled_run = canceled_run.body["id"].as_str().unwrap().to_string();
    let r = api
        .post(&format!("/v1/runs/{canceled_run}/cancel"), json!({}))
        .await;
    assert!(r.status == 200 || r.status == 202, "{r:?}");
    let got = wait_requests(&receiver, 5, Duration::from_secs(30)).await;
    let delivered = |path: &str, run: &str| {
        got.iter()
            .find(|r| r["path"] == path && r["body"]["data"]["id"] == run)
            .cloned()
            .unwrap_or_else(|| panic!("nothing for {run} at {path}: {got:?}"))
    };
    let f = delivered("/canonical", &failed_run);
    assert_eq!(f["body"]["type"], "run.failed");
    assert_eq!(f["verified"], true, "{f}");
    assert!(f["headers"].get("authorization").is_none(), "{f}");
    assert_eq!(
        delivered("/failures", &failed_run)["body"]["type"],
        "workflow.failed"
    );
    assert_eq!(
        delivered("/failures", &canceled_run)["body"]["type"],
        "run.canceled"
    );

    // Bad event names and headers are 422s naming the entry.
    for (body, field) in [
        (
            json!({"url": base, "event_types": ["run.succeeded", "run.finished"]}),
            "event_types[1]",
        ),
        (json!({"url": base, "events": ["workflow.*"]}), "events[0]"),
        (
            json!({"url": base, "events": ["run.failed"], "event_types": ["run.failed"]}),
            "event_types",
        ),
        (
            json!({"url": base, "events": ["run.failed"], "headers": {"Webhook-Signature": "v1,x"}}),
            "headers.Webhook-Signature",
        ),
        (
            json!({"url": base, "events": ["run.failed"], "headers": {"Content-Type": "text/plain"}}),
            "headers.Content-Type",
        ),
        (
            json!({"url": base, "events": ["run.failed"], "headers": {"X-Bad": "a\r\nb"}}),
            "headers.X-Bad",
        ),
    ] {
        let r = api.post("/v1/subscriptions", body.clone()).await;
        assert_eq!(r.status, 422, "{body}: {r:?}");
        assert_eq!(r.body["errors"][0]["field"], field, "{body}: {r:?}");
    }
}
