//! Bulk actions (`POST /v1/jobs/bulk`, docs/flow-control.md "Bulk actions") against the real
//! binaries: an operation acts on exactly the jobs its filter matched when it was asked for (its
//! place in the log), never on jobs submitted later; its progress is visible; it resumes after
//! the scheduler is killed with nothing done twice. Deleting jobs (one, or in bulk) removes
//! finished jobs from every read, keeps their history, agrees with a rebuild, and never drops a
//! callback still owed.

use std::time::Duration;

use capibara_tests::{
    eventually,
    receiver::{Receiver, ReceiverOptions},
    types, Api, TestEnv,
};
use serde_json::{json, Value};

/// Submit `n` jobs of `job` (in batches of at most 1000); returns their ids.
async fn submit_many(api: &Api, n: usize, job: Value) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    while ids.len() < n {
        let count = (n - ids.len()).min(1000);
        let r = api
            .post("/v1/jobs/batch", json!({"jobs": vec![job.clone(); count]}))
            .await;
        assert_eq!(r.status, 202, "{r:?}");
        for j in r.body["items"].as_array().unwrap() {
            ids.push(j["id"].as_str().unwrap().to_string());
        }
    }
    ids
}

/// The operation once it ended.
async fn finished(api: &Api, id: &str, timeout: Duration) -> Value {
    eventually("the bulk operation to end", timeout, || async {
        let r = api.get(&format!("/v1/jobs/bulk/{id}")).await;
        assert_eq!(r.status, 200, "{r:?}");
        (r.body["status"] != "running").then_some(r.body)
    })
    .await
}

/// Every job matching `query` (all pages).
async fn count(api: &Api, query: &str) -> usize {
    let mut n = 0;
    let mut cursor = String::new();
    loop {
        let r = api
            .get(&format!("/v1/jobs?{query}&limit=500{cursor}"))
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        n += r.body["items"].as_array().unwrap().len();
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return n,
        }
    }
}

#[tokio::test]
async fn bulk_cancel_cancels_exactly_the_jobs_matching_at_its_position_and_not_later_ones() {
    let env = TestEnv::new().await;
    // No worker: every job stays queued until canceled.
    let _api = env.spawn_api().await;
    let _scheduler = env.spawn_scheduler();
    let api = env.client();

    let matching = submit_many(&api, 120, json!({"kind": "echo", "tags": {"batch": "b1"}})).await;
    submit_many(&api, 150, json!({"kind": "echo", "tags": {"batch": "b2"}})).await;
    submit_many(&api, 30, json!({"kind": "echo", "input": {"batch": "b1"}})).await;
    // Five matching jobs are already canceled: they match, but do not qualify.
    for id in &matching[..5] {
        let r = api.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
        assert_eq!(r.status, 200, "{r:?}");
    }

    let r = api
        .post(
            "/v1/jobs/bulk",
            json!({"action": "cancel", "filter": {"tag": ["batch:b1"]}}),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let op = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(
        r.header("location").as_deref(),
        Some(format!("/v1/jobs/bulk/{op}").as_str())
    );
    assert_eq!(r.body["action"], "cancel");
    assert_eq!(r.body["status"], "running");
    assert!(r.body["position"].as_i64().unwrap() > 0, "{r:?}");
    // Matching jobs submitted after the operation started are not its business.
    let late = submit_many(&api, 40, json!({"kind": "echo", "tags": {"batch": "b1"}})).await;

    let done = finished(&api, &op, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "finished", "{done}");
    assert_eq!(done["matched"], 120, "{done}");
    assert_eq!(done["done"], 115, "{done}");
    assert_eq!(done["skipped"], 5, "{done}");
    assert!(done["finished_at"].is_string(), "{done}");

    assert_eq!(count(&api, "tag=batch:b1&status=canceled").await, 120);
    assert_eq!(count(&api, "tag=batch:b1&status=queued").await, 40);
    assert_eq!(count(&api, "tag=batch:b2&status=queued").await, 150);
    assert_eq!(count(&api, "input.batch=b1&status=queued").await, 30);
    for id in &late {
        assert_eq!(api.job(id).await["status"], "queued");
    }
    // History says who did it: the operation caused the cancel, once.
    let events = api.events(&matching[50]).await;
    let canceled: Vec<_> = events
        .iter()
        .filter(|e| e["type"] == "JobCanceled")
        .collect();
    assert_eq!(canceled.len(), 1, "{:?}", types(&events));
    assert_eq!(canceled[0]["metadata"]["causation_id"], op.as_str());
    assert!(canceled[0]["metadata"]["actor"].is_string());
    // The operation's own stream records its pin and its pages.
    let pool = env.pool().await;
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT type FROM events WHERE stream_id = $1::uuid ORDER BY version")
            .bind(&op)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(kinds.first().map(String::as_str), Some("BulkStarted"));
    assert_eq!(kinds.last().map(String::as_str), Some("BulkFinished"));
    assert!(kinds.iter().any(|t| t == "BulkProgressed"), "{kinds:?}");

    // The operation's row is a projection: rebuilt from the log, it is the same.
    let rows = || async {
        sqlx::query_scalar::<_, Value>("SELECT to_jsonb(o) FROM bulk_operations o ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    let before = rows().await;
    assert_eq!(before.len(), 1);
    env.rebuild_projections();
    assert_eq!(rows().await, before);
}

#[tokio::test]
async fn bulk_retry_runs_failed_jobs_again() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let ids = submit_many(
        &api,
        8,
        json!({"kind": "fail", "max_attempts": 1, "tags": {"retry": "me"}}),
    )
    .await;
    let other = api
        .submit_id(json!({"kind": "echo", "tags": {"retry": "me"}}))
        .await;
    for id in &ids {
        assert_eq!(
            api.wait_terminal(id, Duration::from_secs(30)).await["status"],
            "failed"
        );
    }
    api.wait_terminal(&other, Duration::from_secs(30)).await;

    let r = api
        .post(
            "/v1/jobs/bulk",
            json!({"action": "retry", "filter": {"tag": ["retry:me"]}}),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let op = r.body["id"].as_str().unwrap().to_string();
    let done = finished(&api, &op, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "finished", "{done}");
    // The succeeded job matched but does not qualify for a retry.
    assert_eq!(
        (done["done"].clone(), done["skipped"].clone()),
        (json!(8), json!(1))
    );

    for id in &ids {
        let events = eventually(
            "the retried job to fail again",
            Duration::from_secs(30),
            || async {
                let events = api.events(id).await;
                let failed = events.iter().filter(|e| e["type"] == "JobFailed").count();
                (failed == 2).then_some(events)
            },
        )
        .await;
        let retried: Vec<_> = events
            .iter()
            .filter(|e| e["type"] == "JobQueued" && e["data"]["reason"] == "manual_retry")
            .collect();
        assert_eq!(retried.len(), 1, "{:?}", types(&events));
        assert_eq!(retried[0]["metadata"]["causation_id"], op.as_str());
    }
}

#[tokio::test]
async fn bulk_requests_are_checked_and_namespaced() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    let field = |r: &capibara_tests::Res| r.body["errors"][0]["field"].clone();

    let r = api
        .post(
            "/v1/jobs/bulk",
            json!({"action": "purge", "filter": {"kind": "echo"}}),
        )
        .await;
    assert_eq!((r.status, field(&r)), (422, json!("action")), "{r:?}");
    assert!(
        r.body.to_string().contains("`cancel`, `retry` or `delete`"),
        "{r:?}"
    );
    // An empty filter would act on everything: refused unless said so.
    let r = api.post("/v1/jobs/bulk", json!({"action": "cancel"})).await;
    assert_eq!((r.status, field(&r)), (422, json!("filter")), "{r:?}");
    let r = api
        .post("/v1/jobs/bulk", json!({"action": "cancel", "filter": {}}))
        .await;
    assert_eq!((r.status, field(&r)), (422, json!("filter")), "{r:?}");
    let r = api
        .post(
            "/v1/jobs/bulk",
            json!({"action": "cancel", "filter": {"tag": ["nocolon"]}}),
        )
        .await;
    assert_eq!((r.status, field(&r)), (422, json!("filter.tag")), "{r:?}");
    let r = api
        .post(
            "/v1/jobs/bulk",
            json!({"action": "cancel", "filter": {"colour": "red"}}),
        )
        .await;
    assert_eq!(r.status, 422, "{r:?}");
    let r = api
        .post("/v1/jobs/bulk", json!({"action": "cancel", "all": true}))
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let op = r.body["id"].as_str().unwrap().to_string();

    // A read-only key may look, not act; another namespace sees nothing.
    let reader = api.key_for("default", &["read"]).await;
    let r = reader
        .post("/v1/jobs/bulk", json!({"action": "cancel", "all": true}))
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(reader.get(&format!("/v1/jobs/bulk/{op}")).await.status, 200);
    let tenant = api.key_for("tenant-b", &["submit", "read"]).await;
    assert_eq!(tenant.get(&format!("/v1/jobs/bulk/{op}")).await.status, 404);
    assert_eq!(api.get("/v1/jobs/bulk/not-a-uuid").await.status, 404);
}

#[tokio::test]
async fn a_bulk_operation_resumes_after_the_scheduler_is_killed_and_acts_on_each_job_once() {
    let mut env = TestEnv::new().await;
    // Small pages, so that the operation is still running when the scheduler dies.
    env.extra_env
        .push(("CAPIBARA_BULK_PAGE_SIZE".into(), "5".into()));
    let _api = env.spawn_api().await;
    let api = env.client();
    let n = 3000;
    submit_many(
        &api,
        n,
        json!({"kind": "echo", "queue": "nobody", "tags": {"big": "yes"}}),
    )
    .await;

    let mut scheduler = env.spawn_scheduler();
    let r = api
        .post(
            "/v1/jobs/bulk",
            json!({"action": "cancel", "filter": {"queue": "nobody"}}),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let op = r.body["id"].as_str().unwrap().to_string();
    let midway = eventually("some pages done", Duration::from_secs(60), || async {
        let r = api.get(&format!("/v1/jobs/bulk/{op}")).await;
        (r.body["done"].as_i64().unwrap_or(0) >= 100).then_some(r.body)
    })
    .await;
    scheduler.kill();
    let at_kill = api.get(&format!("/v1/jobs/bulk/{op}")).await.body;
    assert_eq!(
        at_kill["status"], "running",
        "too fast to kill midway: {midway}"
    );
    assert!(at_kill["done"].as_i64().unwrap() < n as i64, "{at_kill}");

    let _scheduler = env.spawn_scheduler();
    let done = finished(&api, &op, Duration::from_secs(120)).await;
    assert_eq!(done["status"], "finished", "{done}");
    assert_eq!(done["matched"], n, "{done}");
    assert_eq!(done["done"], n, "{done}");
    assert_eq!(done["skipped"], 0, "nothing was done twice: {done}");

    // The log agrees: each job canceled once, by this operation.
    let pool = env.pool().await;
    let (canceled, jobs): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT stream_id) FROM events
          WHERE type = 'JobCanceled' AND metadata->>'causation_id' = $1",
    )
    .bind(&op)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((canceled, jobs), (n as i64, n as i64));
}

#[tokio::test]
async fn delete_removes_finished_jobs_from_every_read_and_a_rebuild_agrees() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let finished_ids = submit_many(&api, 6, json!({"kind": "echo", "tags": {"del": "me"}})).await;
    // Scheduled far ahead: they match, but are not finished, so they are kept.
    let waiting = submit_many(
        &api,
        3,
        json!({"kind": "echo", "tags": {"del": "me"}, "run_at": "2099-01-01T00:00:00Z"}),
    )
    .await;
    let kept = api.submit_id(json!({"kind": "echo"})).await;
    for id in finished_ids.iter().chain([&kept]) {
        api.wait_terminal(id, Duration::from_secs(30)).await;
    }

    // One job: an unfinished one is refused, a finished one goes, and then it is not found.
    let r = api
        .send(
            api.http
                .delete(api.url(&format!("/v1/jobs/{}", waiting[0]))),
        )
        .await;
    assert_eq!(r.status, 409, "{r:?}");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("cancel it first"),
        "{r:?}"
    );
    let reader = api.key_for("default", &["read"]).await;
    let one = &finished_ids[0];
    let r = reader
        .send(reader.http.delete(reader.url(&format!("/v1/jobs/{one}"))))
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = api
        .send(api.http.delete(api.url(&format!("/v1/jobs/{one}"))))
        .await;
    assert_eq!(r.status, 204, "{r:?}");
    for path in [format!("/v1/jobs/{one}"), format!("/v1/jobs/{one}/events")] {
        assert_eq!(api.get(&path).await.status, 404, "{path}");
    }
    let r = api
        .send(api.http.delete(api.url(&format!("/v1/jobs/{one}"))))
        .await;
    assert_eq!(r.status, 404, "{r:?}");

    // In bulk: the other five finished ones; the scheduled ones are skipped.
    let r = api
        .post(
            "/v1/jobs/bulk",
            json!({"action": "delete", "filter": {"tag": ["del:me"]}}),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let op = r.body["id"].as_str().unwrap().to_string();
    let done = finished(&api, &op, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "finished", "{done}");
    assert_eq!(
        (
            done["matched"].clone(),
            done["done"].clone(),
            done["skipped"].clone()
        ),
        (json!(8), json!(5), json!(3)),
        "{done}"
    );
    assert_eq!(count(&api, "tag=del:me").await, 3);
    assert_eq!(count(&api, "tag=del:me&status=scheduled").await, 3);
    assert_eq!(api.job(&kept).await["status"], "succeeded");
    for id in &finished_ids[1..] {
        assert_eq!(api.get(&format!("/v1/jobs/{id}")).await.status, 404);
    }

    // The history stays in the log: each deleted job's stream ends with `JobDeleted`, caused by
    // the operation (or by the key, for the single delete).
    let pool = env.pool().await;
    let last: Vec<(String, Value)> = sqlx::query_as(
        "SELECT DISTINCT ON (stream_id) type, metadata FROM events
         WHERE stream_id = ANY($1::uuid[]) ORDER BY stream_id, version DESC",
    )
    .bind(&finished_ids)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(last.len(), 6);
    assert!(last.iter().all(|(t, _)| t == "JobDeleted"), "{last:?}");
    let by_op = last
        .iter()
        .filter(|(_, m)| m["causation_id"] == op.as_str())
        .count();
    assert_eq!(by_op, 5, "{last:?}");

    // The projection rebuilt from the log is the same: the deleted jobs stay deleted.
    let rows = || async {
        sqlx::query_scalar::<_, Value>("SELECT to_jsonb(j) FROM jobs j ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    let before = rows().await;
    assert_eq!(before.len(), 4, "3 scheduled and the one kept");
    env.rebuild_projections();
    assert_eq!(rows().await, before);
}

#[tokio::test]
async fn a_job_deleted_before_its_callback_was_planned_still_gets_it() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_WEBHOOK_SECRET".into(), SECRET.into()));
    env.extra_env
        .push(("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()));
    let receiver = Receiver::start(&[SECRET], ReceiverOptions::default());
    // No scheduler yet: the deliverer (in the scheduler) has not read the job's events when
    // the job is deleted.
    let _api = env.spawn_api().await;
    let _worker = env.spawn_worker(&[]);
    let api = env.client();
    let id = api
        .submit_id(json!({"kind": "echo", "input": {"n": 3}, "callback_url": receiver.url}))
        .await;
    assert_eq!(
        api.wait_terminal(&id, Duration::from_secs(30)).await["status"],
        "succeeded"
    );
    let r = api
        .send(api.http.delete(api.url(&format!("/v1/jobs/{id}"))))
        .await;
    assert_eq!(r.status, 204, "{r:?}");

    let _scheduler = env.spawn_scheduler();
    let got = receiver.wait_requests(1, Duration::from_secs(30)).await;
    assert_eq!(got[0]["verified"], true, "{got:?}");
    assert_eq!(got[0]["body"]["type"], "job.succeeded");
    assert_eq!(got[0]["body"]["data"]["id"], id.as_str());
    assert_eq!(got[0]["body"]["data"]["output"], json!({"n": 3}));
}
