//! Flow control (docs/flow-control.md) against the real binaries. Built so far: `dedup` —
//! the job submitted with a key within its window is returned for any later body, whatever its
//! status, with `Capibara-Deduplicated: true`, and each merge is recorded on that job;
//! `debounce` — one waiting job per key takes each later submission's input and due time
//! (`Capibara-Debounced: true`, `JobDebounced`); and deadlines — `ttl_s`/`expires_at` cancel a job not started in time (no attempt used),
//! `deadline_s` cuts the running attempt and stops retries.

use std::time::Duration;

use capibara_tests::{types, TestEnv};
use serde_json::json;

#[tokio::test]
async fn dedup_returns_the_job_of_the_key_within_its_window_and_records_each_merge() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    let first = api
        .submit(json!({"kind": "echo", "input": {"order": 42},
                       "dedup": {"key": "order-42", "window_s": 60}}))
        .await;
    assert_eq!(first.status, 202, "{first:?}");
    assert_eq!(first.header("capibara-deduplicated"), None);
    let id = first.body["id"].as_str().unwrap().to_string();
    api.wait_terminal(&id, Duration::from_secs(30)).await;

    // Another body with the same key: the finished job, 200, said so.
    let again = api
        .submit(json!({"kind": "sleep", "input": {"ms": 10},
                       "dedup": {"key": "order-42", "window_s": 60}}))
        .await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(
        again.header("capibara-deduplicated").as_deref(),
        Some("true")
    );
    assert_eq!(again.body["id"], id.as_str());
    assert_eq!(again.body["status"], "succeeded");
    assert_eq!(again.body["kind"], "echo");
    let events = api.events(&id).await;
    let merges: Vec<_> = events
        .iter()
        .filter(|e| e["type"] == "JobDeduplicated")
        .collect();
    assert_eq!(merges.len(), 1, "{:?}", types(&events));
    assert_eq!(merges[0]["data"]["key"], "order-42");
    assert!(merges[0]["metadata"]["actor"].is_string(), "{}", merges[0]);

    // Other keys and other namespaces are other jobs.
    let other = api
        .submit(json!({"kind": "echo", "dedup": {"key": "order-43", "window_s": 60}}))
        .await;
    assert_eq!(other.status, 202);
    assert_ne!(other.body["id"], id.as_str());
    let tenant = api.key_for("tenant-b", &["submit", "read"]).await;
    let theirs = tenant
        .submit(json!({"kind": "echo", "dedup": {"key": "order-42", "window_s": 60}}))
        .await;
    assert_eq!(theirs.status, 202, "{theirs:?}");
    assert_ne!(theirs.body["id"], id.as_str());

    // Past the window the key makes a new job.
    let short = api
        .submit(json!({"kind": "echo", "dedup": {"key": "tick", "window_s": 1}}))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = api
        .submit(json!({"kind": "echo", "dedup": {"key": "tick", "window_s": 1}}))
        .await;
    assert_eq!(later.status, 202, "{later:?}");
    assert_ne!(later.body["id"], short.body["id"]);

    // Concurrent submissions with one key make one job.
    let racers = (0..8).map(|i| {
        let api = api.clone();
        async move {
            api.submit(json!({"kind": "echo", "input": {"i": i},
                              "dedup": {"key": "race", "window_s": 60}}))
                .await
        }
    });
    let answers = futures::future::join_all(racers).await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|r| r.body["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|r| r.status == 202).count(), 1);

    // Bad input names the field; an Idempotency-Key (SDKs always send one) does not stop the
    // merge; a batch refuses dedup.
    for (dedup, field) in [
        (json!({"key": "", "window_s": 5}), "dedup.key"),
        (json!({"key": "k", "window_s": 0}), "dedup.window_s"),
        // Serde's own message for a missing field names it: "missing field `window_s`".
        (json!({"key": "k"}), "dedup"),
    ] {
        let r = api.submit(json!({"kind": "echo", "dedup": dedup})).await;
        assert_eq!(r.status, 422, "{r:?}");
        assert_eq!(r.body["errors"][0]["field"], field, "{r:?}");
    }
    let r = api
        .send(
            api.http
                .post(api.url("/v1/jobs"))
                .header("idempotency-key", "k1")
                .json(&json!({"kind": "sleep", "input": {"ms": 1},
                               "dedup": {"key": "order-42", "window_s": 60}})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["id"], id.as_str());
    let r = api
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [{"kind": "echo"}, {"kind": "echo", "dedup": {"key": "k", "window_s": 5}}]}),
        )
        .await;
    assert_eq!(r.status, 422, "{r:?}");
    assert_eq!(r.body["errors"][0]["field"], "jobs[1].dedup");
}

#[tokio::test]
async fn deadlines_cancel_unstarted_jobs_cut_attempts_and_stop_retries() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();

    // No worker serves queue `nobody`: not started within 1 s → canceled, `expired`, no attempt.
    let id = api
        .submit_id(json!({"kind": "echo", "queue": "nobody", "ttl_s": 1}))
        .await;
    let queued = api.job(&id).await;
    assert!(queued["expires_at"].is_string(), "{queued}");
    let job = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "canceled", "{job}");
    assert_eq!(job["error"]["type"], "expired", "{job}");
    assert_eq!(job["attempt"], 0, "{job}");
    let events = api.events(&id).await;
    assert_eq!(
        types(&events),
        vec!["JobSubmitted", "JobCanceled"],
        "{events:?}"
    );

    // A job that starts in time runs as usual.
    let id = api.submit_id(json!({"kind": "echo", "ttl_s": 30})).await;
    let job = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    // deadline_s stops retries: `fail` would try 10 times, 500 ms apart; the deadline allows
    // about 2 s of them.
    let id = api
        .submit_id(json!({"kind": "fail", "max_attempts": 10, "deadline_s": 2,
                          "backoff": {"initial_ms": 500, "factor": 1, "max_ms": 500}}))
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(30)).await;
    // `failed` when the deadline stopped a retry; `canceled` when a retry was waiting for a
    // worker as the deadline passed.
    assert!(
        job["status"] == "failed" || job["status"] == "canceled",
        "{job}"
    );
    assert_eq!(job["error"]["type"], "deadline_exceeded", "{job}");
    let attempts = job["attempt"].as_u64().unwrap();
    assert!((2..10).contains(&attempts), "{job}");

    // ... and cuts the running attempt at the deadline.
    let id = api
        .submit_id(
            json!({"kind": "sleep", "input": {"ms": 20000}, "deadline_s": 1,
                          "max_attempts": 3}),
        )
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(15)).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["type"], "deadline_exceeded", "{job}");
    assert_eq!(job["attempt"], 1, "{job}");
    assert!(types(&api.events(&id).await).contains(&"JobTimedOut".to_string()));

    // Bad deadlines name the field.
    let past = (chrono::Utc::now() - chrono::Duration::seconds(5)).to_rfc3339();
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc3339();
    for (body, field) in [
        (json!({"kind": "echo", "expires_at": past}), "expires_at"),
        (
            json!({"kind": "echo", "expires_at": soon, "ttl_s": 5}),
            "ttl_s",
        ),
        (json!({"kind": "echo", "ttl_s": 0}), "ttl_s"),
        (json!({"kind": "echo", "deadline_s": 0}), "deadline_s"),
        (
            json!({"kind": "echo", "run_at": soon, "expires_at": soon}),
            "expires_at",
        ),
    ] {
        let r = api.submit(body.clone()).await;
        assert_eq!(r.status, 422, "{body}: {r:?}");
        assert_eq!(r.body["errors"][0]["field"], field, "{body}: {r:?}");
    }
}

#[tokio::test]
async fn jobs_are_searched_by_input_and_output_contents_times_error_type_and_worker() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let ids_of = |r: &capibara_tests::Res| -> Vec<String> {
        r.body["items"]
            .as_array()
            .unwrap_or_else(|| panic!("{r:?}"))
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };
    let before = chrono::Utc::now();
    let a = api
        .submit_id(json!({"kind": "echo", "input": {"customer": {"id": 42, "tier": "gold"}}}))
        .await;
    let b = api
        .submit_id(json!({"kind": "echo", "input": {"customer": {"id": 7, "tier": "gold"}}}))
        .await;
    let c = api
        .submit_id(json!({"kind": "fail", "max_attempts": 1, "input": {"message": "boom"}}))
        .await;
    for id in [&a, &b, &c] {
        api.wait_terminal(id, Duration::from_secs(30)).await;
    }

    let q = |query: &str| {
        let api = api.clone();
        let query = query.to_string();
        async move { api.get(&format!("/v1/jobs?{query}")).await }
    };
    assert_eq!(ids_of(&q("input.customer.id=42").await), vec![a.clone()]);
    assert_eq!(
        ids_of(&q("input.customer.tier=gold").await),
        vec![b.clone(), a.clone()]
    );
    assert_eq!(
        ids_of(&q("input.customer.tier=gold&input.customer.id=7").await),
        vec![b.clone()]
    );
    // A quoted value is a string: 42 is not "42".
    assert!(ids_of(&q("input.customer.id=%2242%22").await).is_empty());
    // Outputs: echo's output is its input.
    assert_eq!(ids_of(&q("output.customer.id=7").await), vec![b.clone()]);
    assert_eq!(ids_of(&q("error_type=failed_on_purpose").await).len(), 0);
    let failed = api.job(&c).await;
    let error_type = failed["error"]["type"].as_str().unwrap().to_string();
    assert_eq!(
        ids_of(&q(&format!("error_type={error_type}")).await),
        vec![c.clone()]
    );
    let worker = failed["worker_id"].as_str().unwrap().to_string();
    assert_eq!(
        ids_of(&q(&format!("worker={worker}&kind=fail")).await),
        vec![c.clone()]
    );
    // Time ranges.
    let t = |d: chrono::DateTime<chrono::Utc>| d.to_rfc3339().replace('+', "%2B");
    assert_eq!(
        ids_of(&q(&format!("created_after={}", t(before))).await).len(),
        3
    );
    assert!(ids_of(&q(&format!("created_before={}", t(before))).await).is_empty());
    let later = chrono::Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(
        ids_of(&q(&format!("finished_before={}", t(later))).await).len(),
        3
    );
    assert!(ids_of(&q(&format!("finished_after={}", t(later))).await).is_empty());

    // Bad filters name the parameter.
    for (query, field) in [
        ("input.=1", "input."),
        ("created_after=yesterday", "created_after"),
        ("input.a=1&input.a=2", "input.a"),
        ("input.a=1&input.a.b=2", "input.a.b"),
        ("color=red", "color"),
    ] {
        let r = q(query).await;
        assert_eq!(r.status, 422, "{query}: {r:?}");
        assert_eq!(r.body["errors"][0]["field"], field, "{query}: {r:?}");
    }
}

#[tokio::test]
async fn debounce_keeps_one_waiting_job_per_key_with_the_latest_input_due_after_the_last_submission(
) {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let debounce = json!({"key": "save-doc-7", "delay_s": 2});

    // Five submissions within the delay: one job, the first 202, the next four merged into it.
    let first = api
        .submit(json!({"kind": "echo", "input": {"n": 0}, "debounce": debounce}))
        .await;
    assert_eq!(first.status, 202, "{first:?}");
    assert_eq!(first.header("capibara-debounced"), None);
    assert_eq!(first.body["status"], "scheduled", "{first:?}");
    let id = first.body["id"].as_str().unwrap().to_string();
    let mut last = chrono::Utc::now();
    for n in 1..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = api
            .submit(json!({"kind": "echo", "input": {"n": n}, "debounce": debounce}))
            .await;
        last = chrono::Utc::now();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("capibara-debounced").as_deref(), Some("true"));
        assert_eq!(r.body["id"], id.as_str());
        assert_eq!(r.body["input"], json!({"n": n}), "{r:?}");
        assert_eq!(r.body["status"], "scheduled", "{r:?}");
    }

    // It runs once, with the last input, about delay_s after the last submission.
    let job = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["input"], json!({"n": 4}), "{job}");
    assert_eq!(job["attempt"], 1, "{job}");
    let started: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(job["started_at"].clone()).unwrap();
    let after = started - last;
    assert!(
        after >= chrono::Duration::milliseconds(1500) && after <= chrono::Duration::seconds(8),
        "started {after} after the last submission: {job}"
    );
    let events = api.events(&id).await;
    let merges: Vec<_> = events
        .iter()
        .filter(|e| e["type"] == "JobDebounced")
        .collect();
    assert_eq!(merges.len(), 4, "{:?}", types(&events));
    assert_eq!(merges[3]["data"]["input"], json!({"n": 4}));
    assert_eq!(merges[3]["data"]["key"], "save-doc-7");
    assert!(merges[0]["metadata"]["actor"].is_string(), "{}", merges[0]);
    assert_eq!(
        events.iter().filter(|e| e["type"] == "JobStarted").count(),
        1
    );
    let scheduled = events.iter().find(|e| e["type"] == "JobScheduled").unwrap();
    assert_eq!(scheduled["data"]["reason"], "debounced");

    // Once the job has run, the key makes a new job.
    let next = api
        .submit(json!({"kind": "echo", "input": {"n": 5}, "debounce": debounce}))
        .await;
    assert_eq!(next.status, 202, "{next:?}");
    assert_ne!(next.body["id"], id.as_str());

    // A merge takes the kind's input check, and the pending job's kind only.
    let bad = api
        .submit(json!({"kind": "sleep", "input": {"ms": "soon"},
                       "debounce": {"key": "typed", "delay_s": 60}}))
        .await;
    assert_eq!(bad.status, 422, "{bad:?}");
    let ok = api
        .submit(json!({"kind": "sleep", "input": {"ms": 1},
                       "debounce": {"key": "typed", "delay_s": 60}}))
        .await;
    assert_eq!(ok.status, 202, "{ok:?}");
    let bad = api
        .submit(json!({"kind": "sleep", "input": {"ms": "later"},
                       "debounce": {"key": "typed", "delay_s": 60}}))
        .await;
    assert_eq!(bad.status, 422, "{bad:?}");
    let other_kind = api
        .submit(json!({"kind": "echo", "debounce": {"key": "typed", "delay_s": 60}}))
        .await;
    assert_eq!(other_kind.status, 422, "{other_kind:?}");
    assert_eq!(other_kind.body["errors"][0]["field"], "debounce.key");
    let pending = api.job(ok.body["id"].as_str().unwrap()).await;
    assert_eq!(pending["input"], json!({"ms": 1}), "{pending}");

    // Concurrent submissions with one key: exactly one pending job, every other one merged.
    let racers = (0..8).map(|i| {
        let api = api.clone();
        async move {
            api.submit(json!({"kind": "echo", "input": {"i": i},
                              "debounce": {"key": "race", "delay_s": 60}}))
                .await
        }
    });
    let answers = futures::future::join_all(racers).await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|r| r.body["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|r| r.status == 202).count(), 1);
    assert_eq!(answers.iter().filter(|r| r.status == 200).count(), 7);
    let raced = ids.iter().next().unwrap();
    let merges = api
        .events(raced)
        .await
        .iter()
        .filter(|e| e["type"] == "JobDebounced")
        .count();
    assert_eq!(merges, 7);

    // Bad settings name the field; a batch refuses debounce.
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc3339();
    for (body, field) in [
        (
            json!({"kind": "echo", "debounce": {"key": "", "delay_s": 5}}),
            "debounce.key",
        ),
        (
            json!({"kind": "echo", "debounce": {"key": "k".repeat(257), "delay_s": 5}}),
            "debounce.key",
        ),
        (
            json!({"kind": "echo", "debounce": {"key": "k", "delay_s": 0}}),
            "debounce.delay_s",
        ),
        (
            json!({"kind": "echo", "debounce": {"key": "k", "delay_s": 86401}}),
            "debounce.delay_s",
        ),
        (
            json!({"kind": "echo", "debounce": {"key": "k", "delay_s": 5},
                   "dedup": {"key": "k", "window_s": 5}}),
            "debounce",
        ),
        (
            json!({"kind": "echo", "debounce": {"key": "k", "delay_s": 5}, "run_at": soon}),
            "debounce",
        ),
    ] {
        let r = api.submit(body.clone()).await;
        assert_eq!(r.status, 422, "{body}: {r:?}");
        assert_eq!(r.body["errors"][0]["field"], field, "{body}: {r:?}");
    }
    let r = api
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [{"kind": "echo"}, {"kind": "echo", "debounce": {"key": "k", "delay_s": 5}}]}),
        )
        .await;
    assert_eq!(r.status, 422, "{r:?}");
    assert_eq!(r.body["errors"][0]["field"], "jobs[1].debounce");
}
