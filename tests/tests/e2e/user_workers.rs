//! Kinds registered by users and the HTTP worker protocol (docs/workers.md), against the real
//! binaries: kinds and their schemas at submission, dispatch lanes (the built-in worker never
//! takes a user kind's job), leases with fencing (a stale token is 409 and records nothing), a
//! silent worker's job running again, cancel, retries, release, the `worker` role, and user
//! kinds as workflow steps.

use std::time::{Duration, Instant};

use capibara_tests::{eventually, runs, types, Api, TestEnv};
use serde_json::{json, Value};

async fn put_kind(api: &Api, name: &str, def: Value) -> capibara_tests::Res {
    api.send(
        api.http
            .put(api.url(&format!("/v1/kinds/{name}")))
            .json(&def),
    )
    .await
}

/// A worker of the protocol, driven by the test.
struct Proto {
    api: Api,
    id: String,
}

/// A leased job: its id, attempt and lease token.
#[derive(Debug, Clone)]
struct Leased {
    id: String,
    attempt: u64,
    token: String,
    job: Value,
}

impl Proto {
    async fn register(api: &Api, body: Value) -> Proto {
        let r = api.post("/v1/workers", body).await;
        assert_eq!(r.status, 201, "{r:?}");
        Proto {
            api: api.clone(),
            id: r.body["id"].as_str().unwrap().to_string(),
        }
    }

    async fn lease(&self, max_jobs: u32, wait_ms: u64) -> Vec<Leased> {
        let r = self
            .api
            .post(
                &format!("/v1/workers/{}/lease", self.id),
                json!({"max_jobs": max_jobs, "wait_ms": wait_ms}),
            )
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        r.body["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| Leased {
                id: j["job"]["id"].as_str().unwrap().to_string(),
                attempt: j["job"]["attempt"].as_u64().unwrap(),
                token: j["lease"]["token"].as_str().unwrap().to_string(),
                job: j["job"].clone(),
            })
            .collect()
    }

    /// Lease until one job arrives (or fail after `timeout`).
    async fn lease_one(&self, timeout: Duration) -> Leased {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(j) = self.lease(1, 1000).await.pop() {
                return j;
            }
            assert!(Instant::now() < deadline, "no job was leased");
        }
    }

    async fn call(&self, job: &Leased, what: &str, body: Value) -> capibara_tests::Res {
        self.api
            .send(
                self.api
                    .http
                    .post(self.api.url(&format!("/v1/jobs/{}/{what}", job.id)))
                    .header("Capibara-Lease", &job.token)
                    .json(&body),
            )
            .await
    }
}

#[tokio::test]
async fn kinds_are_registered_checked_at_submission_listed_and_deleted() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();

    // Bad names and definitions name the field.
    for (name, def, field) in [
        ("Bad", json!({}), "name"),
        ("echo", json!({}), "name"),
        ("code.mine", json!({}), "name"),
        (
            "img.resize",
            json!({"input_schema": {"type": 5}}),
            "input_schema",
        ),
        ("img.resize", json!({"max_attempts": 0}), "max_attempts"),
        ("img.resize", json!({"queue": "a/b"}), "queue"),
    ] {
        let r = put_kind(&api, name, def).await;
        assert_eq!(r.status, 422, "{name}: {r:?}");
        assert_eq!(r.body["errors"][0]["field"], field, "{name}: {r:?}");
    }
    let r = put_kind(&api, "img.resize", json!({"nope": 1})).await;
    assert_eq!(r.status, 422, "unknown fields are refused: {r:?}");

    let def = json!({
        "description": "Resize an image", "queue": "images", "max_attempts": 5, "timeout_s": 60,
        "priority": "high",
        "input_schema": {"type": "object", "required": ["url", "width"],
            "properties": {"url": {"type": "string"}, "width": {"type": "integer", "minimum": 1}}},
        "output_schema": {"type": "object", "required": ["width"]}
    });
    let r = put_kind(&api, "img.resize", def.clone()).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["builtin"], false);
    assert_eq!(r.body["live_workers"], 0);
    let r = put_kind(&api, "img.resize", def.clone()).await;
    assert_eq!(
        (r.status, r.body["version"].as_i64()),
        (200, Some(1)),
        "unchanged: {r:?}"
    );

    // Submission checks the schema with field paths, and the kind's defaults apply.
    let r = api
        .submit(json!({"kind": "img.resize", "input": {"url": "u", "width": 0}}))
        .await;
    assert_eq!(r.status, 422, "{r:?}");
    assert_eq!(r.body["errors"][0]["field"], "input.width");
    let r = api
        .submit(json!({"kind": "img.resize", "input": {"url": "u"}}))
        .await;
    assert_eq!(r.body["errors"][0]["field"], "input.width", "{r:?}");
    let r = api
        .submit(json!({"kind": "img.resize", "input": {"url": "u", "width": 3}}))
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let job = &r.body;
    assert_eq!(job["queue"], "images");
    assert_eq!(job["max_attempts"], 5);
    assert_eq!(job["timeout_s"], 60);
    assert_eq!(job["priority"], "high");
    // A batch resolves them too.
    let r = api
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [{"kind": "echo"}, {"kind": "img.resize", "input": {"url": "u", "width": "x"}}]}),
        )
        .await;
    assert_eq!(r.body["errors"][0]["field"], "jobs[1].input.width", "{r:?}");

    // Listed with the built-in kinds; another namespace does not see it.
    let list = api.get("/v1/kinds").await;
    let names: Vec<&str> = list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"echo") && names.contains(&"img.resize"),
        "{names:?}"
    );
    let other = api.key_for("other", &["submit"]).await;
    assert_eq!(other.get("/v1/kinds/img.resize").await.status, 404);
    let r = other
        .submit(json!({"kind": "img.resize", "input": {"url": "u", "width": 3}}))
        .await;
    assert_eq!(r.body["errors"][0]["field"], "kind", "{r:?}");
    assert_eq!(
        api.get("/v1/kinds/img.resize").await.body["queue"],
        Value::Null
    );
    assert_eq!(
        api.get("/v1/kinds/img.resize").await.body["default_queue"],
        "images"
    );

    // Every change is an event of the kind's stream; a delete refuses new submissions.
    let r = put_kind(&api, "img.resize", json!({"queue": "images2"})).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = api
        .send(api.http.delete(api.url("/v1/kinds/img.resize")))
        .await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = api
        .send(api.http.delete(api.url("/v1/kinds/img.resize")))
        .await;
    assert_eq!(r.status, 404, "{r:?}");
    let r = api
        .submit(json!({"kind": "img.resize", "input": {"url": "u", "width": 3}}))
        .await;
    assert_eq!(r.body["errors"][0]["field"], "kind", "{r:?}");
    let pool = env.pool().await;
    let kinds: Vec<(String,)> =
        sqlx::query_as("SELECT type FROM events WHERE stream_type = 'kind' ORDER BY position")
            .fetch_all(&pool)
            .await
            .unwrap();
    let kinds: Vec<&str> = kinds.iter().map(|(t,)| t.as_str()).collect();
    assert_eq!(kinds, ["KindRegistered", "KindUpdated", "KindDeleted"]);
    // Registered again: the same stream goes on.
    assert_eq!(put_kind(&api, "img.resize", json!({})).await.status, 201);
}

#[tokio::test]
async fn a_protocol_worker_runs_a_user_kind_the_built_in_worker_never_takes() {
    let env = TestEnv::new().await;
    let (_api, _worker, _scheduler) = env.spawn_all().await;
    let api = env.client();
    assert_eq!(
        put_kind(&api, "img.thumb", json!({"queue": "default"}))
            .await
            .status,
        201
    );
    // The built-in worker serves `default`: it must leave the job alone.
    let id = api
        .submit_id(json!({"kind": "img.thumb", "input": {"n": 1}}))
        .await;
    let echo = api.submit_id(json!({"kind": "echo", "input": 1})).await;
    api.wait_terminal(&echo, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let job = api.job(&id).await;
    assert_eq!(job["status"], "queued", "{job}");
    assert_eq!(job["attempt"], 0);
    assert_eq!(api.get("/v1/kinds/img.thumb").await.body["live_workers"], 0);

    let w = Proto::register(
        &api,
        json!({"kinds": ["img.thumb"], "concurrency": 4, "name": "thumbs", "labels": {"gpu": "no"}, "version": "1.0"}),
    )
    .await;
    assert_eq!(api.get("/v1/kinds/img.thumb").await.body["live_workers"], 1);
    let leased = w.lease(4, 0).await;
    assert_eq!(leased.len(), 1, "{leased:?}");
    let j = &leased[0];
    assert_eq!((j.id.as_str(), j.attempt), (id.as_str(), 1));
    assert_eq!(j.job["status"], "running");
    assert_eq!(j.job["input"], json!({"n": 1}));

    let r = w.call(j, "heartbeat", json!({})).await;
    assert_eq!(
        (r.status, &r.body["cancel_requested"]),
        (200, &json!(false))
    );
    let r = w
        .call(j, "progress", json!({"percent": 50, "message": "half"}))
        .await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = w
        .call(
            j,
            "logs",
            json!({"lines": [{"level": "info", "message": "a"}, {"level": "warn", "message": "b"}]}),
        )
        .await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = w.call(j, "chunks", json!({"seq": 0, "data": "part"})).await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = w
        .call(
            j,
            "logs",
            json!({"lines": [{"level": "loud", "message": "a"}]}),
        )
        .await;
    assert_eq!(r.body["errors"][0]["field"], "lines[0].level", "{r:?}");
    let r = w
        .call(j, "complete", json!({"output": {"done": true}}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["status"], "succeeded");
    assert_eq!(r.body["output"], json!({"done": true}));
    assert_eq!(
        types(&api.events(&id).await),
        [
            "JobSubmitted",
            "JobStarted",
            "JobProgress",
            "JobLog",
            "JobLog",
            "JobOutputChunk",
            "JobSucceeded"
        ]
    );

    // An idle long poll holds, and answers as soon as a job arrives.
    let waiting = {
        let w = Proto {
            api: w.api.clone(),
            id: w.id.clone(),
        };
        tokio::spawn(async move {
            let t = Instant::now();
            (w.lease(1, 20_000).await, t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let id2 = api.submit_id(json!({"kind": "img.thumb"})).await;
    let (got, took) = waiting.await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id, id2);
    assert!(
        took < Duration::from_secs(15),
        "answered on arrival: {took:?}"
    );

    // Deregistered: no live worker, no more leases.
    let r = api
        .send(api.http.delete(api.url(&format!("/v1/workers/{}", w.id))))
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(api.get("/v1/kinds/img.thumb").await.body["live_workers"], 0);
    let r = api
        .post(
            &format!("/v1/workers/{}/lease", w.id),
            json!({"wait_ms": 0}),
        )
        .await;
    assert_eq!(r.status, 409, "{r:?}");
}

#[tokio::test]
async fn a_long_poll_of_a_worker_deregistered_while_it_waits_hands_its_job_to_another() {
    let env = TestEnv::new().await;
    let (_api, _scheduler) = (env.spawn_api().await, env.spawn_scheduler());
    let api = env.client();
    assert_eq!(put_kind(&api, "img.crop", json!({})).await.status, 201);
    let gone = Proto::register(&api, json!({"kinds": ["img.crop"]})).await;
    let waiting = {
        let api = api.clone();
        let path = format!("/v1/workers/{}/lease", gone.id);
        tokio::spawn(async move { api.post(&path, json!({"wait_ms": 20_000})).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = api
        .send(
            api.http
                .delete(api.url(&format!("/v1/workers/{}", gone.id))),
        )
        .await;
    assert_eq!(r.status, 204);
    let id = api.submit_id(json!({"kind": "img.crop"})).await;
    let r = waiting.await.unwrap();
    assert_eq!(r.status, 409, "the long poll ends without the job: {r:?}");
    assert_eq!(api.job(&id).await["status"], "queued");
    let other = Proto::register(&api, json!({"kinds": ["img.crop"]})).await;
    let j = other.lease_one(Duration::from_secs(10)).await;
    assert_eq!((j.id.as_str(), j.attempt), (id.as_str(), 1));
}

#[tokio::test]
async fn a_stale_lease_is_refused_and_records_nothing_and_a_silent_workers_job_runs_again() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let _scheduler = env.spawn_scheduler();
    let api = env.client();
    put_kind(&api, "slow.thing", json!({})).await;
    let id = api.submit_id(json!({"kind": "slow.thing"})).await;
    let a = Proto::register(&api, json!({"kinds": ["slow.thing"]})).await;
    let first = a.lease_one(Duration::from_secs(10)).await;
    assert_eq!(first.attempt, 1);
    // Worker A goes silent: its lease expires (3 s here), the reaper fails the attempt as
    // worker_lost and the job is retried.
    let b = Proto::register(&api, json!({"kinds": ["slow.thing"]})).await;
    let second = b.lease_one(Duration::from_secs(30)).await;
    assert_eq!((second.id.as_str(), second.attempt), (id.as_str(), 2));
    let events = api.events(&id).await;
    let lost = events
        .iter()
        .find(|e| e["type"] == "JobAttemptFailed")
        .expect("the lost attempt is recorded");
    assert_eq!(lost["data"]["error"]["type"], "worker_lost");

    // A's token is stale: every call is 409 and nothing is recorded.
    let before = api.events(&id).await.len();
    for (what, body) in [
        ("complete", json!({"output": "stale"})),
        ("fail", json!({"error": {"type": "x", "message": "stale"}})),
        ("progress", json!({"percent": 1})),
        ("heartbeat", json!({})),
        ("release", json!({})),
    ] {
        let r = a.call(&first, what, body).await;
        assert_eq!(r.status, 409, "{what}: {r:?}");
        assert!(
            r.body["type"].as_str().unwrap().ends_with("lease-lost"),
            "{r:?}"
        );
    }
    // B's token on another job's path, and garbage tokens.
    let r = a
        .api
        .send(
            a.api
                .http
                .post(a.api.url(&format!("/v1/jobs/{}/complete", first.id)))
                .header("Capibara-Lease", "nonsense")
                .json(&json!({})),
        )
        .await;
    assert_eq!(r.status, 422, "{r:?}");
    assert_eq!(r.body["errors"][0]["field"], "Capibara-Lease");
    assert_eq!(api.events(&id).await.len(), before, "nothing recorded");

    let r = b
        .call(&second, "complete", json!({"output": "fresh"}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let job = api.job(&id).await;
    assert_eq!(
        (&job["status"], &job["output"]),
        (&json!("succeeded"), &json!("fresh"))
    );
}

#[tokio::test]
async fn cancel_retries_release_and_output_schemas_follow_the_job_policy() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let _scheduler = env.spawn_scheduler();
    let api = env.client();
    put_kind(
        &api,
        "pol.thing",
        json!({"output_schema": {"type": "object", "required": ["n"]}}),
    )
    .await;
    let w = Proto::register(&api, json!({"kinds": ["pol.thing"]})).await;

    // Cancel reaches the worker through its heartbeat; a non-retryable failure is the cancel.
    // (The attempt is claimed 250 ms after its lease call, its report not having come first.)
    let id = api.submit_id(json!({"kind": "pol.thing"})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    api.wait_status(&id, "running", Duration::from_secs(10))
        .await;
    let r = api.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert_eq!(r.status, 202, "{r:?}");
    let r = w.call(&j, "heartbeat", json!({})).await;
    assert_eq!(r.body["cancel_requested"], true, "{r:?}");
    let r = w
        .call(
            &j,
            "fail",
            json!({"error": {"type": "canceled", "message": "stopped"}, "retryable": false}),
        )
        .await;
    assert_eq!(r.body["status"], "canceled", "{r:?}");

    // A retryable failure with retry_after_s comes back as attempt 2; the output is checked.
    let id = api.submit_id(json!({"kind": "pol.thing"})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    let r = w
        .call(
            &j,
            "fail",
            json!({"error": {"type": "Busy", "message": "later"}, "retry_after_s": 0.2}),
        )
        .await;
    assert_eq!(r.body["status"], "scheduled", "{r:?}");
    let j = w.lease_one(Duration::from_secs(10)).await;
    assert_eq!((j.id.as_str(), j.attempt), (id.as_str(), 2));
    let r = w.call(&j, "complete", json!({"output": {"m": 1}})).await;
    assert_eq!(r.status, 422, "{r:?}");
    assert_eq!(r.body["errors"][0]["field"], "output.n");
    // Released (a worker shutting down): queued again, the attempt not used up.
    let r = w.call(&j, "release", json!({})).await;
    assert_eq!(r.body["status"], "queued", "{r:?}");
    assert_eq!(r.body["max_attempts"], 4);
    let j = w.lease_one(Duration::from_secs(10)).await;
    let r = w.call(&j, "complete", json!({"output": {"n": 1}})).await;
    assert_eq!(r.body["status"], "succeeded", "{r:?}");

    // A non-retryable failure fails the job at once.
    let id = api.submit_id(json!({"kind": "pol.thing"})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    let r = w
        .call(
            &j,
            "fail",
            json!({"error": {"type": "BadInput", "message": "no"}, "retryable": false}),
        )
        .await;
    assert_eq!(r.body["status"], "failed", "{r:?}");
    assert_eq!(api.job(&id).await["error"]["type"], "BadInput");
}

#[tokio::test]
async fn a_worker_key_may_only_work_and_other_keys_may_not_lease() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let admin = env.client();
    let worker = admin.key_for("team", &["worker"]).await;
    let submitter = admin.key_for("team", &["submit"]).await;
    assert_eq!(
        put_kind(&submitter, "team.job", json!({})).await.status,
        201
    );
    let r = submitter
        .post("/v1/workers", json!({"kinds": ["team.job"]}))
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    let w = Proto::register(&worker, json!({"kinds": ["team.job"]})).await;
    let id = submitter.submit_id(json!({"kind": "team.job"})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    assert_eq!(j.id, id);
    // A worker key reads nothing and submits nothing.
    assert_eq!(worker.get(&format!("/v1/jobs/{id}")).await.status, 403);
    assert_eq!(worker.get("/v1/jobs").await.status, 403);
    assert_eq!(worker.submit(json!({"kind": "echo"})).await.status, 403);
    // Another namespace's worker key cannot touch the lease, even with the token.
    let stranger = admin.key_for("elsewhere", &["worker"]).await;
    let r = stranger
        .send(
            stranger
                .http
                .post(stranger.url(&format!("/v1/jobs/{id}/complete")))
                .header("Capibara-Lease", &j.token)
                .json(&json!({})),
        )
        .await;
    assert_eq!(r.status, 409, "{r:?}");
    let r = stranger
        .post(&format!("/v1/workers/{}/lease", w.id), json!({}))
        .await;
    assert_eq!(r.status, 404, "{r:?}");
    // Built-in kinds are capibara-worker's.
    let r = worker.post("/v1/workers", json!({"kinds": ["echo"]})).await;
    assert_eq!(r.body["errors"][0]["field"], "kinds[0]", "{r:?}");
    // Declaring an unregistered kind registers it; an object declares its definition.
    let r = worker
        .post(
            "/v1/workers",
            json!({"kinds": ["new.kind", {"name": "typed.kind", "queue": "typed", "input_schema": {"type": "object"}}]}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["queues"], json!(["default", "typed"]));
    let r = submitter
        .submit(json!({"kind": "typed.kind", "input": [1]}))
        .await;
    assert_eq!(r.body["errors"][0]["field"], "input", "{r:?}");
    assert_eq!(
        submitter.get("/v1/kinds/new.kind").await.body["live_workers"],
        1
    );
}

#[tokio::test]
async fn workflows_run_user_kind_steps_next_to_built_in_ones() {
    let env = TestEnv::new().await;
    let (_api, _worker, _scheduler) = env.spawn_all().await;
    let api = env.client();
    put_kind(
        &api,
        "wf.double",
        json!({"queue": "math", "input_schema": {"type": "object", "required": ["n"],
            "properties": {"n": {"type": "integer"}}}}),
    )
    .await;
    // A static input is checked against the user kind's schema when the definition is saved.
    let r = api
        .post(
            "/v1/workflows",
            json!({"name": "bad", "steps": [{"id": "d", "kind": "wf.double", "input": {"n": "x"}}]}),
        )
        .await;
    assert_eq!(r.status, 422, "{r:?}");
    let r = api
        .post(
            "/v1/workflows",
            json!({"name": "bad2", "steps": [{"id": "d", "kind": "wf.nope"}]}),
        )
        .await;
    assert_eq!(r.body["errors"][0]["field"], "steps[0].kind", "{r:?}");
    let wf = runs::create(
        &api,
        json!({"name": "mixed", "steps": [
            {"id": "first", "kind": "echo", "input": {"n": "{{ input.n }}"}},
            {"id": "double", "kind": "wf.double", "depends_on": ["first"],
             "input": {"n": "{{ steps.first.output.n | int }}"}}
        ]}),
    )
    .await;
    let run = runs::start(&api, &wf, json!({"n": 21})).await;
    let w = Proto::register(&api, json!({"kinds": ["wf.double"]})).await;
    let j = w.lease_one(Duration::from_secs(30)).await;
    assert_eq!(j.job["queue"], "math", "the kind's queue");
    let n = j.job["input"]["n"].as_i64().unwrap();
    let r = w
        .call(&j, "complete", json!({"output": {"n": n * 2}}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let ended = runs::ended(&api, &run, Duration::from_secs(30)).await;
    assert_eq!(ended["status"], "succeeded", "{ended}");
    assert_eq!(runs::step(&ended, "double")["output"], json!({"n": 42}));
    eventually("the worker is live", Duration::from_secs(5), || async {
        (api.get("/v1/kinds/wf.double").await.body["live_workers"] == 1).then_some(())
    })
    .await;
}

/// A protocol worker's report of a step that runs alone plans the run in its commit, as the
/// built-in worker's does: a chain of user-kind steps runs to its end with no scheduler, through
/// the one-job and the batch completion alike. A plan the store refuses leaves the report to
/// commit alone.
#[tokio::test]
async fn a_protocol_workers_report_plans_its_run_with_no_orchestrator_and_never_fails_for_it() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    put_kind(&api, "wf.inc", json!({})).await;
    let wf = runs::create(
        &api,
        json!({"name": "incs", "steps": [
            {"id": "one", "kind": "wf.inc", "input": {"n": "{{ input.n }}"}},
            {"id": "two", "kind": "wf.inc", "depends_on": ["one"],
             "input": {"n": "{{ steps.one.output.n }}"}}
        ]}),
    )
    .await;
    let run = runs::start(&api, &wf, json!({"n": 1})).await;
    let w = Proto::register(&api, json!({"kinds": ["wf.inc"]})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    let n = j.job["input"]["n"].as_i64().unwrap();
    let r = w
        .call(&j, "complete", json!({"output": {"n": n + 1}}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let j = w.lease_one(Duration::from_secs(10)).await;
    assert_eq!(j.job["input"]["n"], 2, "{:?}", j.job);
    let r = api
        .post(
            &format!("/v1/workers/{}/complete", w.id),
            json!({"jobs": [{"id": j.id, "lease": j.token, "output": {"n": 3}}]}),
        )
        .await;
    assert_eq!(r.body["results"][0]["status"], 200, "{r:?}");
    let ended = runs::ended(&api, &run, Duration::from_secs(10)).await;
    assert_eq!(ended["status"], "succeeded", "{ended}");
    assert_eq!(runs::step(&ended, "two")["output"], json!({"n": 3}));
    let metrics = capibara_tests::scrape(&env.api_url()).await;
    assert!(
        metrics.contains("capibara_runs_advanced_in_report_total 2"),
        "{metrics}"
    );

    // A plan the store refuses (Postgres refuses the next step's job) never refuses the report:
    // it is recorded alone, and the orchestrator fails the run with the refusal.
    let pool = env.pool().await;
    for sql in [
        "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN
           IF NEW.input ? 'poison' THEN
             RAISE EXCEPTION 'unsupported Unicode escape sequence' USING ERRCODE = '22P05';
           END IF;
           RETURN NEW;
         END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON jobs
         FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    let wf = runs::create(
        &api,
        json!({"name": "refused", "steps": [
            {"id": "one", "kind": "wf.inc"},
            {"id": "two", "kind": "wf.inc", "depends_on": ["one"],
             "input": {"poison": "{{ steps.one.output.n }}"}}
        ]}),
    )
    .await;
    let run = runs::start(&api, &wf, json!({})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    let r = w.call(&j, "complete", json!({"output": {"n": 1}})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["status"], "succeeded", "{r:?}");
    let _scheduler = env.spawn_scheduler();
    let ended = runs::ended(&api, &run, Duration::from_secs(15)).await;
    assert_eq!(ended["status"], "failed", "{ended}");
    assert_eq!(ended["error"]["type"], "store_rejected", "{ended}");
    // The step whose job succeeded shows so; the refused one never started.
    assert_eq!(runs::step(&ended, "one")["status"], "succeeded", "{ended}");
    assert_eq!(
        runs::step(&ended, "one")["output"],
        json!({"n": 1}),
        "{ended}"
    );
    assert_eq!(runs::step(&ended, "two")["status"], "canceled", "{ended}");
}

#[tokio::test]
async fn schedules_and_triggers_submit_user_kinds_and_metrics_show_their_live_workers() {
    let mut env = TestEnv::new().await;
    let port = capibara_tests::find_free_port();
    env.extra_env.push((
        "CAPIBARA_SCHEDULER_ADDR".into(),
        format!("127.0.0.1:{port}"),
    ));
    env.extra_env.push((
        "CAPIBARA_HOOKS_PUBLIC_URL".into(),
        format!("http://127.0.0.1:{port}"),
    ));
    // For the push kind below.
    env.extra_env.extend([
        (
            "CAPIBARA_WEBHOOK_SECRET".into(),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        ),
        ("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()),
    ]);
    let _api = env.spawn_api().await;
    let _scheduler = env.spawn_scheduler();
    capibara_tests::wait_http_ok(&format!("http://127.0.0.1:{port}/healthz")).await;
    let api = env.client();
    put_kind(
        &api,
        "sched.job",
        json!({"input_schema": {"type": "object", "required": ["n"],
            "properties": {"n": {"type": "integer"}}}}),
    )
    .await;
    // A schedule's target is checked against the kind's schema, and fires the kind.
    let r = api
        .post(
            "/v1/schedules",
            json!({"name": "bad", "cron": "@daily",
                   "target": {"type": "job", "job": {"kind": "sched.job", "input": {"n": "x"}}}}),
        )
        .await;
    assert_eq!(r.body["errors"][0]["field"], "target.job.input.n", "{r:?}");
    let r = api
        .post(
            "/v1/schedules",
            json!({"name": "ok", "cron": "@daily",
                   "target": {"type": "job", "job": {"kind": "sched.job", "input": {"n": 1}}}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let schedule = r.body["id"].as_str().unwrap().to_string();
    let r = api
        .post(&format!("/v1/schedules/{schedule}/trigger"), json!({}))
        .await;
    assert!(r.status < 300, "{r:?}");
    let w = Proto::register(&api, json!({"kinds": ["sched.job"]})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    assert_eq!(j.job["input"], json!({"n": 1}));
    assert_eq!(j.job["tags"]["schedule_id"], schedule.as_str());
    w.call(&j, "complete", json!({})).await;

    // A trigger call's input gets the kind's schema check too.
    let r = api
        .post(
            "/v1/triggers",
            json!({"name": "t", "auth": {"type": "bearer", "token": "a-long-enough-token-123"},
                   "target": {"type": "job", "job": {"kind": "sched.job", "input": {"n": 0}}}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let url = r.body["url"].as_str().unwrap().to_string();
    let http = reqwest::Client::new();
    let call = |body: Value| {
        http.post(&url)
            .bearer_auth("a-long-enough-token-123")
            .json(&body)
            .send()
    };
    assert_eq!(call(json!({"n": "x"})).await.unwrap().status(), 422);
    let ok = call(json!({"n": 5})).await.unwrap();
    assert_eq!(ok.status(), 202);
    let j = w.lease_one(Duration::from_secs(10)).await;
    assert_eq!(j.job["input"], json!({"n": 5}));

    // /metrics: one live worker for the kind, none for a kind nobody runs, and nothing for a
    // push kind (Capibara calls its endpoint; no worker ever leases it). The push kind exists
    // before sched.idle, so the sample that shows sched.idle saw it too.
    let r = put_kind(
        &api,
        "sched.pushed",
        json!({"mode": "push", "push": {"url": "http://127.0.0.1:9/hook"}}),
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    put_kind(&api, "sched.idle", json!({})).await;
    let metrics = eventually("kind gauges", Duration::from_secs(15), || async {
        let m = http
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        (m.contains(r#"capibara_kind_live_workers{namespace="default",kind="sched.job"} 1"#)
            && m.contains(r#"capibara_kind_live_workers{namespace="default",kind="sched.idle"} 0"#))
        .then_some(m)
    })
    .await;
    assert!(metrics.contains("# HELP capibara_kind_live_workers"));
    assert!(!metrics.contains(r#"kind="sched.pushed""#), "{metrics}");
}

#[tokio::test]
async fn a_protocol_worker_uploads_artifacts_that_complete_attaches_to_the_job() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    put_kind(&api, "art.make", json!({})).await;
    let w = Proto::register(&api, json!({"kinds": ["art.make"]})).await;
    let id = api.submit_id(json!({"kind": "art.make"})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    let upload = |token: String, name: &'static str, body: &'static [u8]| {
        let api = api.clone();
        let id = id.clone();
        async move {
            api.send(
                api.http
                    .put(api.url(&format!("/v1/jobs/{id}/artifacts/{name}")))
                    .header("Capibara-Lease", token)
                    .header("content-type", "text/csv")
                    .body(body),
            )
            .await
        }
    };
    let r = upload(j.token.clone(), "rows.csv", b"a,b\n1,2\n").await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["size"], 8);
    let r2 = upload(j.token.clone(), "../x", b"no").await;
    assert_eq!(r2.status, 404, "not a route: {r2:?}");
    let bad = upload(j.token.clone(), ".hidden", b"no").await;
    assert_eq!(bad.body["errors"][0]["field"], "name", "{bad:?}");
    // Naming an artifact that was not uploaded is a 422.
    let r3 = w
        .call(&j, "complete", json!({"artifacts": [{"name": "nope.bin"}]}))
        .await;
    assert_eq!(r3.body["errors"][0]["field"], "artifacts[0]", "{r3:?}");
    let r = w
        .call(
            &j,
            "complete",
            json!({"output": {"rows": 1}, "artifacts": [r.body]}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let a = &r.body["artifacts"][0];
    assert_eq!(
        (&a["name"], &a["content_type"], &a["size"]),
        (&json!("rows.csv"), &json!("text/csv"), &json!(8))
    );
    let got = api
        .http
        .get(api.url(&format!("/v1/jobs/{id}/artifacts/rows.csv")))
        .bearer_auth(&api.key)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["content-type"], "text/csv");
    assert_eq!(got.bytes().await.unwrap().as_ref(), b"a,b\n1,2\n");
    // The attempt is over: its token uploads nothing more.
    let r = upload(j.token.clone(), "late.csv", b"x").await;
    assert_eq!(r.status, 409, "{r:?}");
}

#[tokio::test]
async fn orchestrate_takes_a_user_kind_as_its_intent() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    put_kind(
        &api,
        "orch.kind",
        json!({"input_schema": {"type": "object", "required": ["q"]}}),
    )
    .await;
    let r = api
        .post(
            "/v1/orchestrate",
            json!({"intent": "orch.kind", "inputs": {}}),
        )
        .await;
    assert_eq!(r.body["errors"][0]["field"], "inputs.q", "{r:?}");
    let r = api
        .post(
            "/v1/orchestrate",
            json!({"intent": "orch.kind", "inputs": {"q": 1}}),
        )
        .await;
    assert!(r.status == 202 || r.status == 200, "{r:?}");
    let w = Proto::register(&api, json!({"kinds": ["orch.kind"]})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    assert_eq!(j.job["input"], json!({"q": 1}));
    let r = api
        .post(
            "/v1/orchestrate",
            json!({"intent": "orch.nope", "inputs": {}}),
        )
        .await;
    assert_eq!(r.body["errors"][0]["field"], "intent", "{r:?}");
}

#[tokio::test]
async fn a_batch_completes_each_job_as_the_one_job_call_would_and_refuses_only_the_bad_ones() {
    let env = TestEnv::new().await;
    let (_api, _scheduler) = (env.spawn_api().await, env.spawn_scheduler());
    let api = env.client();
    put_kind(
        &api,
        "batch.thing",
        json!({"output_schema": {"type": "object", "required": ["n"]}}),
    )
    .await;
    let w = Proto::register(&api, json!({"kinds": ["batch.thing"], "concurrency": 8})).await;
    let other = Proto::register(&api, json!({"kinds": ["batch.thing"]})).await;
    let ids: Vec<String> =
        futures::future::join_all((0..4).map(|_| api.submit_id(json!({"kind": "batch.thing"}))))
            .await;
    let mut leased = Vec::new();
    while leased.len() < 4 {
        leased.extend(w.lease(4, 1000).await);
    }
    leased.sort_by_key(|j| ids.iter().position(|i| i == &j.id));
    // The one whose report is refused as a whole: claimed 250 ms after its lease call.
    api.wait_status(&leased[3].id, "running", Duration::from_secs(10))
        .await;
    let before = api.events(&leased[3].id).await.len();
    let path = format!("/v1/workers/{}/complete", w.id);
    let r = api
        .post(
            &path,
            json!({"jobs": [
                {"id": leased[0].id, "lease": leased[0].token, "output": {"n": 0}},
                {"id": leased[1].id, "lease": leased[1].token, "output": {"n": 1}},
                {"id": leased[2].id, "lease": leased[2].token, "output": {"m": 2}},
                {"id": leased[3].id, "lease": "nonsense", "output": {"n": 3}},
            ]}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let results = r.body["results"].as_array().unwrap();
    let statuses: Vec<u64> = results
        .iter()
        .map(|x| x["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 200, 422, 422], "{r:?}");
    assert_eq!(results[0]["id"], leased[0].id.as_str());
    assert!(results[0].get("problem").is_none(), "{r:?}");
    assert_eq!(
        results[2]["problem"]["errors"][0]["field"],
        "jobs[2].output.n"
    );
    assert_eq!(results[3]["problem"]["errors"][0]["field"], "jobs[3].lease");
    for (j, n) in leased.iter().zip(0..2) {
        let job = api.job(&j.id).await;
        assert_eq!(
            (&job["status"], &job["output"]),
            (&json!("succeeded"), &json!({"n": n}))
        );
        assert_eq!(
            types(&api.events(&j.id).await).last(),
            Some(&"JobSucceeded".to_string())
        );
    }
    // Its report refused, the attempt is claimed 250 ms after its lease call all the same.
    api.wait_status(&leased[2].id, "running", Duration::from_secs(10))
        .await;
    assert_eq!(
        api.events(&leased[3].id).await.len(),
        before,
        "nothing recorded"
    );

    // A finished job's token again, and a token of this worker sent under another's id: 409.
    let r = api
        .post(
            &path,
            json!({"jobs": [{"id": leased[0].id, "lease": leased[0].token, "output": {"n": 9}}]}),
        )
        .await;
    assert_eq!(r.body["results"][0]["status"], 409, "{r:?}");
    let r = api
        .post(
            &format!("/v1/workers/{}/complete", other.id),
            json!({"jobs": [{"id": leased[3].id, "lease": leased[3].token, "output": {"n": 3}}]}),
        )
        .await;
    assert_eq!(r.body["results"][0]["status"], 409, "{r:?}");
    assert_eq!(api.job(&leased[3].id).await["status"], "running");

    // The same job twice in one batch (the batch reads its jobs once; the two race on that
    // row): recorded once, the other refused as the one-job call would be.
    let r = api
        .post(
            &path,
            json!({"jobs": [
                {"id": leased[3].id, "lease": leased[3].token, "output": {"n": 3}},
                {"id": leased[3].id, "lease": leased[3].token, "output": {"n": 4}},
            ]}),
        )
        .await;
    let mut statuses: Vec<u64> = r.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["status"].as_u64().unwrap())
        .collect();
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{r:?}");
    let events = types(&api.events(&leased[3].id).await);
    assert_eq!(
        events.iter().filter(|t| *t == "JobSucceeded").count(),
        1,
        "{events:?}"
    );
    let r = api.post(&path, json!({"jobs": []})).await;
    assert_eq!(
        (r.status, &r.body["errors"][0]["field"]),
        (422, &json!("jobs")),
        "{r:?}"
    );
}

/// The value of `capibara_worker_protocol_final_reports_total{job="<from>"}` on the API.
async fn final_reports(env: &TestEnv, from: &str) -> u64 {
    let series = format!("capibara_worker_protocol_final_reports_total{{job=\"{from}\"}}");
    capibara_tests::metric(&env.api_url(), &series).await
}

/// A final report decides on the job as its lease call left it (kept by the API that handed it
/// out, not read again), and a kept job that changed since (here a cancel) is read again: the
/// report is decided on the job as it stands.
#[tokio::test]
async fn a_final_report_decides_on_the_job_its_lease_kept_and_reads_one_that_changed() {
    let env = TestEnv::new().await;
    let (_api, _scheduler) = (env.spawn_api().await, env.spawn_scheduler());
    let api = env.client();
    put_kind(&api, "kept.thing", json!({})).await;
    let w = Proto::register(&api, json!({"kinds": ["kept.thing"]})).await;

    let id = api.submit_id(json!({"kind": "kept.thing"})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    let r = w.call(&j, "progress", json!({"percent": 50})).await;
    assert_eq!(r.status, 204, "{r:?}");
    let r = api
        .post(
            &format!("/v1/workers/{}/complete", w.id),
            json!({"jobs": [{"id": j.id, "lease": j.token, "output": {"ok": true}}]}),
        )
        .await;
    assert_eq!(r.body["results"][0]["status"], 200, "{r:?}");
    let job = api.job(&id).await;
    assert_eq!(
        (&job["status"], &job["output"], &job["progress"]["percent"]),
        (&json!("succeeded"), &json!({"ok": true}), &json!(50.0))
    );
    assert_eq!(
        (
            final_reports(&env, "kept").await,
            final_reports(&env, "read").await
        ),
        (1, 0)
    );

    // Canceled after the attempt's claim: the kept job does not know, the report's append
    // conflicts, and the job read again decides (a non-retryable failure of a job whose cancel
    // was asked for is its cancel; decided on the kept job it would have been `failed`).
    let id = api.submit_id(json!({"kind": "kept.thing"})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    api.wait_status(&id, "running", Duration::from_secs(10))
        .await;
    let r = api.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert_eq!(r.status, 202, "{r:?}");
    let r = w
        .call(
            &j,
            "fail",
            json!({"error": {"type": "stopped", "message": "no"}, "retryable": false}),
        )
        .await;
    assert_eq!(r.body["status"], "canceled", "{r:?}");
    assert_eq!(final_reports(&env, "kept").await, 2);
    let events = types(&api.events(&id).await);
    assert_eq!(
        events.iter().filter(|t| *t == "JobCanceled").count(),
        1,
        "{events:?}"
    );
}

/// The value of counter `capibara_worker_protocol_claims_total{by}`.
async fn claims_by(env: &TestEnv, by: &str) -> u64 {
    let series = format!("capibara_worker_protocol_claims_total{{by=\"{by}\"}}");
    capibara_tests::metric(&env.api_url(), &series).await
}

/// `(type, transaction)` of each event of job `id`, in order.
async fn event_txs(pool: &sqlx::PgPool, id: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT type, tx_id::text FROM events WHERE stream_id = $1::uuid ORDER BY version",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Start an API whose lease calls claim their attempts `ms` after handing them out.
async fn api_claiming_after(env: &mut TestEnv, ms: u64) -> capibara_tests::Proc {
    env.extra_env
        .retain(|(k, _)| k != "CAPIBARA_WORKER_CLAIM_AFTER_MS");
    env.extra_env
        .push(("CAPIBARA_WORKER_CLAIM_AFTER_MS".into(), ms.to_string()));
    env.spawn_api().await
}

/// A lease hands the attempt out before its claim (a fast attempt): the worker gets the job as
/// its claim will leave it, and its report records `JobStarted` with its end in one transaction
/// (no claim of its own). A token of an attempt handed out is refused once the job moved on (a
/// cancel before its claim) and records nothing, and so is one naming a version the job never
/// had. (Here the lease call's own claim is held back a minute, so that the report comes
/// first whatever the machine's speed; `a_lease_claims_the_attempt_its_worker_does_not_report`
/// covers that claim.)
#[tokio::test]
async fn a_lease_hands_the_attempt_out_before_its_claim_and_the_report_claims_it() {
    let mut env = TestEnv::new().await;
    let _api = api_claiming_after(&mut env, 60_000).await;
    let _scheduler = env.spawn_scheduler();
    let api = env.client();
    let pool = env.pool().await;
    put_kind(&api, "fast.thing", json!({})).await;
    let w = Proto::register(&api, json!({"kinds": ["fast.thing"]})).await;

    let id = api.submit_id(json!({"kind": "fast.thing"})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    assert_eq!(
        (&j.job["status"], &j.job["attempt"]),
        (&json!("running"), &json!(1))
    );
    assert!(j.job["worker_id"].is_string(), "{:?}", j.job);
    assert_eq!(api.job(&id).await["status"], "queued", "not claimed yet");
    let r = w.call(&j, "complete", json!({"output": {"ok": 1}})).await;
    assert_eq!(
        (&r.body["status"], &r.body["attempt"]),
        (&json!("succeeded"), &json!(1)),
        "{r:?}"
    );
    let events = event_txs(&pool, &id).await;
    let n = events.len();
    let types: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(&types[n - 2..], ["JobStarted", "JobSucceeded"]);
    assert_eq!(
        events[n - 2].1,
        events[n - 1].1,
        "one transaction: {events:?}"
    );
    assert_eq!(claims_by(&env, "report").await, 1);
    // Started when it was handed out (the token carries the time), not when it was reported.
    let job = api.job(&id).await;
    let at = |f: &str| {
        chrono::DateTime::parse_from_rfc3339(job[f].as_str().unwrap())
            .unwrap_or_else(|e| panic!("{f}: {e}: {job}"))
    };
    assert!(at("started_at") < at("finished_at"), "{job}");
    let leases: i64 = sqlx::query_scalar("SELECT count(*) FROM leases")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(leases, 0, "no lease row written and left");

    // A progress report claims the attempt in its own append; the rest follows as before.
    let id = api.submit_id(json!({"kind": "fast.thing"})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    let r = w.call(&j, "progress", json!({"percent": 10})).await;
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(api.job(&id).await["status"], "running");
    let r = w.call(&j, "heartbeat", json!({})).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = w.call(&j, "complete", json!({"output": {"ok": 2}})).await;
    assert_eq!(r.body["status"], "succeeded", "{r:?}");
    let types: Vec<String> = event_txs(&pool, &id)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(
        types[types.len() - 3..],
        ["JobStarted", "JobProgress", "JobSucceeded"]
    );

    // Canceled before its claim: canceled at once; the handed-out token is refused and
    // records nothing.
    let id = api.submit_id(json!({"kind": "fast.thing"})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    let r = api.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert_eq!(
        (r.status, &r.body["status"]),
        (200, &json!("canceled")),
        "{r:?}"
    );
    let n = api.events(&id).await.len();
    for what in ["heartbeat", "complete"] {
        let r = w.call(&j, what, json!({"output": {"ok": 3}})).await;
        assert_eq!(r.status, 409, "{what}: {r:?}");
    }
    assert_eq!(api.events(&id).await.len(), n, "nothing recorded");

    // A token naming a version the job never had is refused; the real one is not.
    let id = api.submit_id(json!({"kind": "fast.thing"})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    let mut parts: Vec<String> = j.token.split('.').map(String::from).collect();
    assert_eq!(parts.len(), 5, "{}", j.token);
    parts[3] = "99".into();
    let forged = Leased {
        token: parts.join("."),
        ..j.clone()
    };
    let r = w.call(&forged, "complete", json!({"output": {}})).await;
    assert_eq!(r.status, 409, "{r:?}");
    let r = w.call(&j, "complete", json!({"output": {}})).await;
    assert_eq!(r.body["status"], "succeeded", "{r:?}");
    assert_eq!(api.job(&id).await["attempt"], 1);
}

/// An attempt whose worker reports nothing within `CAPIBARA_WORKER_CLAIM_AFTER_MS` (250 ms by default) is
/// claimed by the lease call (its `JobStarted` in a transaction of its own, timed at the lease),
/// and with 0 before the lease call answers.
#[tokio::test]
async fn a_lease_claims_the_attempt_its_worker_does_not_report() {
    let mut env = TestEnv::new().await;
    let api_proc = env.spawn_api().await;
    let _scheduler = env.spawn_scheduler();
    let api = env.client();
    let pool = env.pool().await;
    put_kind(&api, "slow.thing", json!({})).await;
    let w = Proto::register(&api, json!({"kinds": ["slow.thing"]})).await;

    let id = api.submit_id(json!({"kind": "slow.thing"})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    let job = api
        .wait_status(&id, "running", Duration::from_secs(10))
        .await;
    assert_eq!(claims_by(&env, "lease").await, 1);
    assert_eq!(job["attempt"], 1);
    let r = w.call(&j, "complete", json!({"output": {"ok": 1}})).await;
    assert_eq!(r.body["status"], "succeeded", "{r:?}");
    let events = event_txs(&pool, &id).await;
    let n = events.len();
    assert_eq!(events[n - 2].0, "JobStarted");
    assert_ne!(events[n - 2].1, events[n - 1].1, "{events:?}");

    drop(api_proc);
    let _api = api_claiming_after(&mut env, 0).await;
    let id = api.submit_id(json!({"kind": "slow.thing"})).await;
    let j = w.lease_one(Duration::from_secs(10)).await;
    assert_eq!(
        api.job(&id).await["status"],
        "running",
        "claimed before the answer"
    );
    let r = api.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert_eq!(r.status, 202, "asked of the worker: {r:?}");
    let r = w.call(&j, "heartbeat", json!({})).await;
    assert_eq!(r.body["cancel_requested"], true, "{r:?}");
}

/// The API that handed attempts out is killed (SIGKILL) before claiming them: no job is lost.
/// The worker's report, to the API started again, claims and ends its attempt in one append
/// (the token carries what it needs); a job whose worker never reports is still queued, and the
/// relay dispatches it again (its entry was popped): leased again, completed once.
#[tokio::test]
async fn an_api_killed_with_claims_waiting_loses_no_job() {
    let mut env = TestEnv::new().await;
    let mut api_proc = api_claiming_after(&mut env, 60_000).await;
    let _scheduler = env.spawn_scheduler();
    let api = env.client();
    put_kind(&api, "crash.thing", json!({})).await;
    let w = Proto::register(&api, json!({"kinds": ["crash.thing"]})).await;
    let reported = api.submit_id(json!({"kind": "crash.thing"})).await;
    let j1 = w.lease_one(Duration::from_secs(10)).await;
    let silent = api.submit_id(json!({"kind": "crash.thing"})).await;
    let j2 = w.lease_one(Duration::from_secs(10)).await;
    assert_eq!(
        (j1.id.as_str(), j2.id.as_str()),
        (reported.as_str(), silent.as_str())
    );

    api_proc.kill();
    let _api = env.spawn_api().await;
    let r = w.call(&j1, "complete", json!({"output": {"ok": 1}})).await;
    assert_eq!(
        (&r.body["status"], &r.body["attempt"]),
        (&json!("succeeded"), &json!(1)),
        "{r:?}"
    );
    let types: Vec<String> = api
        .events(&reported)
        .await
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        types.iter().filter(|t| *t == "JobStarted").count(),
        1,
        "{types:?}"
    );

    // Never reported: queued still, its entry gone from Redis; the relay pushes it again.
    assert_eq!(api.job(&silent).await["status"], "queued");
    let again = w.lease_one(Duration::from_secs(30)).await;
    assert_eq!((again.id.as_str(), again.attempt), (silent.as_str(), 1));
    let r = w
        .call(&again, "complete", json!({"output": {"ok": 2}}))
        .await;
    assert_eq!(r.body["status"], "succeeded", "{r:?}");
    // The first hand-out of the same attempt is refused now: completed once.
    let r = w.call(&j2, "complete", json!({"output": {"ok": 3}})).await;
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(api.job(&silent).await["output"], json!({"ok": 2}));
}

/// Entries of jobs that ended already (the relay pushes an entry again when it finds it popped
/// while the attempt's claim waits) ahead of a queued job, and no wake token left (other
/// fetchers took them): a lease call pops past the stale entries to the job behind them at once.
/// It used to wait for a wake token after each pop that found only stale entries, up to its
/// long poll's end: a few entries per two seconds, and the queued job waited (a backlog of the
/// SDK benchmark stalled for a minute so).
#[tokio::test]
async fn a_lease_pops_past_entries_of_ended_jobs_to_the_queued_job_behind_them() {
    use capibara_shared::{
        domain::{job::Priority, kinds::lane, limit::Group},
        queue::Queue,
        store::dispatch::DispatchEntry,
    };
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    put_kind(&api, "stale.thing", json!({})).await;
    let w = Proto::register(&api, json!({"kinds": ["stale.thing"]})).await;
    let mut ended = Vec::new();
    for _ in 0..40 {
        ended.push(api.submit_id(json!({"kind": "stale.thing"})).await);
    }
    let mut done = 0;
    while done < ended.len() {
        for j in w.lease(40, 1000).await {
            let r = w.call(&j, "complete", json!({})).await;
            assert_eq!(r.body["status"], "succeeded", "{r:?}");
            done += 1;
        }
    }

    // Their entries again, older than the next job's.
    let lane = lane("default", "default", "stale.thing");
    let group = Group {
        ns: "default".into(),
        kind: "stale.thing".into(),
        queue: "default".into(),
        ord: None,
        lim: Vec::new(),
    }
    .id();
    let at = chrono::Utc::now() - chrono::Duration::seconds(60);
    let stale: Vec<DispatchEntry> = ended
        .iter()
        .map(|id| {
            let mut e =
                DispatchEntry::new(id.parse().unwrap(), "default", &lane, Priority::Normal, at);
            e.group = group.clone();
            e
        })
        .collect();
    let queue = Queue::connect(&env.redis_url, &env.redis_prefix)
        .await
        .unwrap();
    queue.push(&stale).await.unwrap();
    let queued = api.submit_id(json!({"kind": "stale.thing"})).await;
    let mut conn = redis::Client::open(env.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let wake = format!("{{{}}}:wake:{lane}", env.redis_prefix);
    let _: () = redis::cmd("DEL")
        .arg(&wake)
        .query_async(&mut conn)
        .await
        .unwrap();

    // One job at a time and three seconds to wait: waiting after each stale pop took a few
    // of the forty entries in that time, and answered nothing.
    let got = w.lease(1, 3000).await;
    assert_eq!(
        got.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        [queued.as_str()],
        "the queued job behind the stale entries"
    );
    assert_eq!(
        capibara_tests::metric(&env.api_url(), "capibara_dispatch_stale_total").await,
        40
    );
}
