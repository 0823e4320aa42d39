//! The job API end to end: real api, worker and scheduler processes on real Postgres and Redis.

use std::time::Duration;

use capibara_tests::{eventually, parse_sse, types, TestEnv};
use serde_json::json;

#[tokio::test]
async fn submitting_with_prefer_wait_returns_the_finished_job() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    let r = api
        .send(
            api.http
                .post(api.url("/v1/jobs"))
                .header("Prefer", "wait=10")
                .json(
                    &json!({"kind": "echo", "input": {"hello": "world"}, "tags": {"user": "42"}}),
                ),
        )
        .await;

    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["status"], "succeeded");
    assert_eq!(r.body["output"], json!({"hello": "world"}));
    assert_eq!(r.body["attempt"], 1);
    let id = r.body["id"].as_str().unwrap();
    assert_eq!(r.header("location").unwrap(), format!("/v1/jobs/{id}"));
    assert_eq!(
        types(&api.events(id).await),
        ["JobSubmitted", "JobStarted", "JobSucceeded"]
    );
}

#[tokio::test]
async fn a_wait_that_runs_out_answers_202_and_the_job_keeps_running() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    let r = api
        .send(
            api.http
                .post(api.url("/v1/jobs"))
                .header("Prefer", "wait=1")
                .json(&json!({"kind": "sleep", "input": {"ms": 2500}})),
        )
        .await;

    assert_eq!(r.status, 202, "{r:?}");
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(r.header("location").unwrap(), format!("/v1/jobs/{id}"));
    assert!(
        r.body["status"] == "running" || r.body["status"] == "queued",
        "still in progress: {:?}",
        r.body["status"]
    );
    let done = api.wait_terminal(&id, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["output"], json!({"slept_ms": 2500}));
}

/// A progress report in flight when the worker records `JobStarted` on its own (25 ms into the
/// attempt) shares the attempt's state with it; the worker must keep driving the executor while
/// it claims, or both wait on each other forever (found with `tts.render`'s first chunk).
#[tokio::test]
async fn progress_reported_while_the_attempt_is_claimed_does_not_stall_the_job() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    let jobs: Vec<_> = {
        let mut ids = Vec::new();
        for _ in 0..20 {
            let r = api
                .post(
                    "/v1/jobs",
                    json!({"kind": "sleep", "input": {"ms": 120, "progress_ms": 1}}),
                )
                .await;
            assert_eq!(r.status, 202, "{r:?}");
            ids.push(r.body["id"].as_str().unwrap().to_string());
        }
        ids
    };

    for id in &jobs {
        let job = eventually("the job to end", Duration::from_secs(30), || async {
            let r = api.get(&format!("/v1/jobs/{id}")).await;
            let done = ["succeeded", "failed", "canceled"]
                .contains(&r.body["status"].as_str().unwrap_or_default());
            done.then_some(r.body)
        })
        .await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let events = types(&api.events(id).await);
        assert!(
            // Progress reports are coalesced while one is being written: under load a 120 ms
            // attempt may record a single one.
            events.iter().filter(|t| *t == "JobProgress").count() >= 1,
            "{events:?}"
        );
        assert_eq!(events.iter().filter(|t| *t == "JobStarted").count(), 1);
    }
}

#[tokio::test]
async fn without_prefer_submission_answers_202_with_location() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let r = env.client().submit(json!({"kind": "echo"})).await;
    assert_eq!(r.status, 202);
    assert_eq!(r.body["status"], "queued");
    assert!(r.header("location").unwrap().starts_with("/v1/jobs/"));
}

#[tokio::test]
async fn a_failing_job_is_retried_with_backoff_then_succeeds() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    let id = api
        .submit_id(json!({"kind": "fail", "input": {"times": 2, "message": "flaky"}, "backoff": {"initial_ms": 100}}))
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(20)).await;

    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["attempt"], 3);
    let t = types(&api.events(&id).await);
    assert_eq!(t.iter().filter(|t| *t == "JobAttemptFailed").count(), 2);
    assert_eq!(t.iter().filter(|t| *t == "JobScheduled").count(), 2);
    assert_eq!(t.iter().filter(|t| *t == "JobStarted").count(), 3);
}

#[tokio::test]
async fn exhausted_attempts_fail_the_job_and_retry_runs_it_again() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    let id = api
        .submit_id(json!({"kind": "fail", "input": {"message": "always"}, "max_attempts": 2, "backoff": {"initial_ms": 50}}))
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(20)).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["attempt"], 2);
    assert_eq!(job["error"]["message"], "always");

    // Listed as a dead letter.
    let failed = api.get("/v1/jobs?status=failed").await;
    assert_eq!(failed.body["items"][0]["id"], id.as_str());

    let r = api.post(&format!("/v1/jobs/{id}/retry"), json!({})).await;
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.body["status"], "queued");
    assert_eq!(r.body["max_attempts"], 4);
    let job = api.wait_terminal(&id, Duration::from_secs(20)).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["attempt"], 4);

    let r = api
        .post(
            &format!(
                "/v1/jobs/{}/retry",
                api.submit_id(json!({"kind": "echo"})).await
            ),
            json!({}),
        )
        .await;
    assert_eq!(
        r.status, 409,
        "only failed/canceled jobs can be retried: {r:?}"
    );
}

#[tokio::test]
async fn the_timeout_stops_the_attempt() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    let started = std::time::Instant::now();
    let id = api
        .submit_id(
            json!({"kind": "sleep", "input": {"ms": 30000}, "timeout_s": 1, "max_attempts": 1}),
        )
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(20)).await;

    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"]["type"], "timeout");
    assert!(started.elapsed() < Duration::from_secs(15));
    let t = types(&api.events(&id).await);
    assert!(t.contains(&"JobTimedOut".to_string()), "{t:?}");
    assert!(!t.contains(&"JobSucceeded".to_string()));
}

#[tokio::test]
async fn cancel_reaches_a_running_job() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    let id = api
        .submit_id(json!({"kind": "sleep", "input": {"ms": 60000}}))
        .await;
    eventually("job running", Duration::from_secs(10), || async {
        (api.job(&id).await["status"] == "running").then_some(())
    })
    .await;
    let r = api.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert_eq!(r.status, 202, "{r:?}");
    let job = api.wait_terminal(&id, Duration::from_secs(10)).await;

    assert_eq!(job["status"], "canceled");
    let t = types(&api.events(&id).await);
    assert_eq!(
        t,
        [
            "JobSubmitted",
            "JobStarted",
            "JobCancelRequested",
            "JobCanceled"
        ]
    );
    let again = api.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert_eq!(again.status, 409);
}

#[tokio::test]
async fn cancel_of_a_queued_job_is_immediate() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    let id = api.submit_id(json!({"kind": "echo"})).await;
    let r = api.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["status"], "canceled");
    // A worker started afterwards never runs it.
    let _worker = env.spawn_worker(&[]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        types(&api.events(&id).await),
        ["JobSubmitted", "JobCancelRequested", "JobCanceled"]
    );
}

#[tokio::test]
async fn delayed_jobs_start_on_time() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    let run_at = chrono::Utc::now() + chrono::Duration::seconds(2);
    let r = api
        .submit(json!({"kind": "echo", "run_at": run_at.to_rfc3339()}))
        .await;
    assert_eq!(r.body["status"], "scheduled");
    let id = r.body["id"].as_str().unwrap().to_string();
    let job = api.wait_terminal(&id, Duration::from_secs(15)).await;

    let started: chrono::DateTime<chrono::Utc> =
        job["started_at"].as_str().unwrap().parse().unwrap();
    let late = (started - run_at).num_milliseconds();
    assert!((0..1000).contains(&late), "started {late} ms after run_at");
    assert_eq!(
        types(&api.events(&id).await),
        [
            "JobSubmitted",
            "JobScheduled",
            "JobQueued",
            "JobStarted",
            "JobSucceeded"
        ]
    );
}

#[tokio::test]
async fn higher_priorities_run_first() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    let mut ids = Vec::new();
    for p in ["low", "normal", "high", "critical"] {
        ids.push((
            p,
            api.submit_id(json!({"kind": "echo", "priority": p})).await,
        ));
    }
    let _worker = env.spawn_worker(&["--concurrency", "1"]);
    let mut starts = Vec::new();
    for (p, id) in &ids {
        let job = api.wait_terminal(id, Duration::from_secs(15)).await;
        starts.push((job["started_at"].as_str().unwrap().to_string(), *p));
    }
    starts.sort();
    let order: Vec<&str> = starts.iter().map(|(_, p)| *p).collect();
    assert_eq!(order, ["critical", "high", "normal", "low"]);
}

#[tokio::test]
async fn list_filters_and_paginates() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    for i in 0..5 {
        api.submit_id(json!({"kind": "echo", "tags": {"batch": "a", "i": i.to_string()}}))
            .await;
    }
    api.submit_id(json!({"kind": "sleep", "input": {"ms": 1}, "queue": "other"}))
        .await;

    let all = api.get("/v1/jobs?limit=4").await;
    assert_eq!(all.body["items"].as_array().unwrap().len(), 4);
    let cursor = all.body["next_cursor"].as_str().unwrap();
    let rest = api.get(&format!("/v1/jobs?limit=4&cursor={cursor}")).await;
    assert_eq!(rest.body["items"].as_array().unwrap().len(), 2);
    assert!(rest.body["next_cursor"].is_null());

    assert_eq!(
        api.get("/v1/jobs?kind=sleep").await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        api.get("/v1/jobs?queue=other").await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        api.get("/v1/jobs?tag=batch:a").await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    assert_eq!(
        api.get("/v1/jobs?tag=batch:a&tag=i:3").await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        api.get("/v1/jobs?status=queued").await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        6
    );

    let bad = api.get("/v1/jobs?status=done").await;
    assert_eq!(bad.status, 422);
    assert_eq!(bad.body["errors"][0]["field"], "status");
    assert_eq!(
        api.get("/v1/jobs?limit=501").await.body["errors"][0]["field"],
        "limit"
    );
    assert_eq!(
        api.get("/v1/jobs?cursor=zzz").await.body["errors"][0]["field"],
        "cursor"
    );
}

#[tokio::test]
async fn a_batch_is_accepted_in_order_or_not_at_all() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    let jobs: Vec<_> = (0..50)
        .map(|i| json!({"kind": "echo", "input": {"i": i}}))
        .collect();
    let r = api.post("/v1/jobs/batch", json!({"jobs": jobs})).await;
    assert_eq!(r.status, 202, "{r:?}");
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 50);
    for (i, j) in items.iter().enumerate() {
        assert_eq!(j["input"]["i"], i);
    }
    let last = items[49]["id"].as_str().unwrap();
    assert_eq!(
        api.wait_terminal(last, Duration::from_secs(20)).await["output"]["i"],
        49
    );

    let bad = api
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [{"kind": "echo"}, {"kind": "nope"}]}),
        )
        .await;
    assert_eq!(bad.status, 422);
    assert_eq!(bad.body["errors"][0]["field"], "jobs[1].kind");
    let listed = api.get("/v1/jobs?limit=500").await;
    assert_eq!(
        listed.body["items"].as_array().unwrap().len(),
        50,
        "nothing of the bad batch was stored"
    );

    let too_many: Vec<_> = (0..1001).map(|_| json!({"kind": "echo"})).collect();
    let r = api.post("/v1/jobs/batch", json!({"jobs": too_many})).await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["errors"][0]["field"], "jobs");
}

#[tokio::test]
async fn sse_streams_until_the_terminal_event_and_resumes_without_gap_or_duplicate() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    let id = api
        .submit_id(json!({"kind": "sleep", "input": {"ms": 2200}}))
        .await;
    let stream = |last: Option<String>| {
        let api = api.clone();
        let id = id.clone();
        async move {
            let mut req = api
                .http
                .get(api.url(&format!("/v1/jobs/{id}/events")))
                .bearer_auth(&api.key)
                .header("Accept", "text/event-stream");
            if let Some(l) = last {
                req = req.header("Last-Event-ID", l);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.headers()["content-type"], "text/event-stream");
            // Ends by itself after the terminal event.
            tokio::time::timeout(Duration::from_secs(20), r.text())
                .await
                .expect("stream closes")
                .unwrap()
        }
    };
    let full = parse_sse(&stream(None).await);
    let kinds: Vec<&str> = full.iter().map(|(_, e, _)| e.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"JobSubmitted"));
    assert_eq!(kinds.last(), Some(&"JobSucceeded"));
    assert!(kinds.contains(&"JobProgress"), "{kinds:?}");
    for (sse_id, event, data) in &full {
        assert_eq!(&data["id"].as_str().unwrap(), sse_id);
        assert_eq!(&data["type"].as_str().unwrap(), event);
    }

    // Resume from the second event: exactly the rest, no gap, no duplicate.
    let resumed = parse_sse(&stream(Some(full[1].0.clone())).await);
    let expected: Vec<&String> = full[2..].iter().map(|(i, _, _)| i).collect();
    let got: Vec<&String> = resumed.iter().map(|(i, _, _)| i).collect();
    assert_eq!(got, expected);

    // Resuming after the terminal event closes at once with nothing.
    let after_end = parse_sse(&stream(Some(full.last().unwrap().0.clone())).await);
    assert!(after_end.is_empty());
}
