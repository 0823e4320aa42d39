//! Workflows end to end with the real binaries: definitions and versions, the shipped examples,
//! 50-way fan-in exactly once, crashes of workers and the API mid-run, cancel, retry, signals,
//! sub-workflows and waits, schedules/triggers/orchestrate starting runs, and a projection
//! rebuild that reproduces every run.

use std::time::Duration;

use capibara_tests::{
    eventually, parse_sse,
    runs::{create, ended, start, step},
    types, Api, TestEnv,
};
use serde_json::{json, Value};

fn example(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/examples")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

async fn create_text(api: &Api, body: String, content_type: &str) -> reqwest::Response {
    api.http
        .post(api.url("/v1/workflows"))
        .bearer_auth(&api.key)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn count(pool: &sqlx::PgPool, sql: &str, run: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql).bind(run).fetch_one(pool).await.unwrap();
    n
}

#[tokio::test]
async fn definitions_are_validated_versioned_and_deleted() {
    let env = TestEnv::new().await;
    let (_a, _w, _s) = env.spawn_all().await;
    let api = env.client();
    for (def, field, needle) in [
        (
            json!({"name": "x", "steps": [{"id": "a", "kind": "echo", "depends_on": ["zz"]}]}),
            "steps[0].depends_on",
            "`zz`",
        ),
        (
            json!({"name": "x", "steps": [{"id": "a", "kind": "echo", "depends_on": ["b"]},
                                          {"id": "b", "kind": "echo", "depends_on": ["a"]}]}),
            "steps[0].depends_on",
            "cycle",
        ),
        (
            json!({"name": "x", "steps": [{"id": "a", "kind": "nope"}]}),
            "steps[0].kind",
            "unknown kind",
        ),
        (
            json!({"name": "x", "steps": [{"id": "a", "kind": "echo", "input": {"v": "{{ input. }}"}}]}),
            "steps[0].input",
            "`a`",
        ),
        (
            json!({"name": "x", "steps": [{"id": "a", "kind": "echo", "when": "1 +"}]}),
            "steps[0].when",
            "condition",
        ),
        (
            json!({"name": "x", "steps": [{"id": "a", "kind": "sleep", "input": {"ms": "soon"}}]}),
            "steps[0].input.ms",
            "`a`",
        ),
    ] {
        let r = api.post("/v1/workflows", def.clone()).await;
        assert_eq!(r.status, 422, "{def}: {r:?}");
        assert_eq!(r.body["errors"][0]["field"], field, "{r:?}");
        let msg = r.body["errors"][0]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{msg}");
    }
    // YAML is accepted; a bad body is a 415/422 problem.
    let r = create_text(&api, example("fan-out-fan-in.yaml"), "application/yaml").await;
    assert_eq!(r.status(), 201);
    let r = create_text(&api, "name: [".into(), "application/yaml").await;
    assert_eq!(r.status(), 422);
    let r = create_text(&api, "{}".into(), "text/plain").await;
    assert_eq!(r.status(), 415);

    // PUT makes a new version; a run pins the version it started with.
    let id = create(
        &api,
        json!({"name": "v", "steps": [{"id": "a", "kind": "sleep", "input": {"ms": 600}}]}),
    )
    .await;
    let run = start(&api, &id, json!({})).await;
    let r = api
        .http
        .put(api.url(&format!("/v1/workflows/{id}")))
        .bearer_auth(&api.key)
        .json(&json!({"name": "v", "steps": [{"id": "b", "kind": "echo"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let w = api.get(&format!("/v1/workflows/{id}")).await.body;
    assert_eq!(w["version"], 2);
    assert_eq!(w["versions"].as_array().unwrap().len(), 2);
    let run2 = start(&api, &id, json!({})).await;
    let done = ended(&api, &run, Duration::from_secs(20)).await;
    assert_eq!(done["version"], 1);
    assert_eq!(done["status"], "succeeded");
    assert_eq!(step(&done, "a")["status"], "succeeded");
    let done2 = ended(&api, &run2, Duration::from_secs(20)).await;
    assert_eq!(done2["version"], 2);
    assert_eq!(step(&done2, "b")["status"], "succeeded");

    // Delete: the workflow is gone, its runs stay readable.
    let r = api
        .http
        .delete(api.url(&format!("/v1/workflows/{id}")))
        .bearer_auth(&api.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(api.get(&format!("/v1/workflows/{id}")).await.status, 404);
    assert_eq!(api.get(&format!("/v1/runs/{run}")).await.status, 200);
    let r = api
        .post(&format!("/v1/workflows/{id}/runs"), json!({"input": {}}))
        .await;
    assert_eq!(r.status, 404);

    // Runs are listed with filters; bad filters are problems naming the parameter.
    let r = api.get("/v1/runs?status=succeeded&limit=1").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["items"].as_array().unwrap().len(), 1);
    assert!(r.body["next_cursor"].is_string());
    let r = api.get("/v1/runs?status=sideways").await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["errors"][0]["field"], "status");
}

#[tokio::test]
async fn the_shipped_examples_run() {
    let env = TestEnv::new().await;
    let (_a, _w, _s) = env.spawn_all().await;
    let api = env.client();

    // Data pipeline: one bad row of four -> quality 0.75 -> the quality branch runs.
    let def: Value = serde_json::from_str(&example("data-pipeline.json")).unwrap();
    let id = create(&api, def).await;
    let bad_input = api
        .post(
            &format!("/v1/workflows/{id}/runs"),
            json!({"input": {"rows": "nope"}}),
        )
        .await;
    assert_eq!(bad_input.status, 422, "{bad_input:?}");
    assert_eq!(bad_input.body["errors"][0]["field"], "input.rows");
    let rows = json!([{"value": 1}, {"value": 3}, {"value": "x"}, {"value": 8}]);
    let run = start(&api, &id, json!({"rows": rows})).await;
    let done = ended(&api, &run, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["output"]["summary"]["count"], 3);
    assert_eq!(done["output"]["summary"]["mean"], 4.0);
    assert_eq!(done["output"]["quality_check"], "succeeded");
    assert_eq!(
        done["output"]["alert"],
        "only 75.0% of the rows were usable"
    );
    // Clean data: the branch is skipped.
    let run = start(&api, &id, json!({"rows": [{"value": 2}, {"value": 4}]})).await;
    let done = ended(&api, &run, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(step(&done, "quality_alert")["status"], "skipped");
    // Each step was a job of its kind, visible in /v1/jobs.
    let jobs = api
        .get("/v1/jobs?tag=workflow:data-pipeline&limit=100")
        .await;
    let kinds: Vec<&str> = jobs.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k == "code.run").count(), 6);
    assert!(jobs.body["items"][0]["run_id"].is_string());

    // Fan-out / fan-in over a list (YAML definition), with Prefer: wait.
    let r = create_text(&api, example("fan-out-fan-in.yaml"), "application/yaml").await;
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let names: Vec<String> = (0..9).map(|i| format!("n{i}")).collect();
    let r = api
        .send(
            api.http
                .post(api.url(&format!("/v1/workflows/{id}/runs")))
                .header("prefer", "wait=30")
                .json(&json!({"input": {"names": names}})),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["status"], "succeeded");
    assert_eq!(r.body["output"]["count"], 9);
    assert_eq!(r.body["output"]["greetings"][3], "Hello, n3!");
    assert_eq!(r.body["output"]["loud"][0], "N0");
    let greet = step(&r.body, "greet");
    assert_eq!(greet["items"].as_array().unwrap().len(), 9);

    // Approval flow: waits for the signal, then ships.
    let def: Value = serde_json::from_str(&example("approval-flow.json")).unwrap();
    let id = create(&api, def).await;
    let run = start(&api, &id, json!({"change": "raise limits", "user": "ana"})).await;
    eventually(
        "the run to wait for approval",
        Duration::from_secs(20),
        || async {
            let r = api.get(&format!("/v1/runs/{run}")).await;
            (r.body["status"] == "waiting" && step(&r.body, "approve")["status"] == "waiting")
                .then_some(())
        },
    )
    .await;
    let r = api
        .post(
            &format!("/v1/runs/{run}/signals/nope"),
            json!({"payload": {}}),
        )
        .await;
    assert_eq!(r.status, 404);
    let r = api
        .post(
            &format!("/v1/runs/{run}/signals/approve"),
            json!({"payload": {"approved": true, "by": "bo"}}),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let done = ended(&api, &run, Duration::from_secs(20)).await;
    assert_eq!(done["output"], json!({"decision": "shipped", "by": "bo"}));
    assert_eq!(step(&done, "record_rejection")["status"], "skipped");
    let r = api
        .post(
            &format!("/v1/runs/{run}/signals/approve"),
            json!({"payload": {}}),
        )
        .await;
    assert_eq!(r.status, 409);
    // The run's events, as JSON and as SSE (ending after the terminal event).
    let evs = api.get(&format!("/v1/runs/{run}/events")).await.body["items"]
        .as_array()
        .unwrap()
        .clone();
    let t = types(&evs);
    assert_eq!(t.first().map(String::as_str), Some("RunStarted"));
    assert!(t.contains(&"SignalReceived".to_string()));
    assert_eq!(t.last().map(String::as_str), Some("RunSucceeded"));
    let sse = api
        .http
        .get(api.url(&format!("/v1/runs/{run}/events")))
        .bearer_auth(&api.key)
        .header("accept", "text/event-stream")
        .header("last-event-id", evs[1]["id"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let frames = parse_sse(&sse);
    assert_eq!(frames.len(), evs.len() - 2);
    assert_eq!(frames.last().unwrap().2["type"], "RunSucceeded");
}

#[tokio::test]
async fn fifty_branches_finishing_together_start_the_join_once() {
    let env = TestEnv::new().await;
    let api_proc = env.spawn_api().await;
    let _w1 = env.spawn_worker(&["--concurrency", "64"]);
    let _w2 = env.spawn_worker(&["--concurrency", "64"]);
    let _s = env.spawn_scheduler();
    let api = env.client();
    let branches: Vec<String> = (0..60).map(|i| format!("b{i}")).collect();
    let mut steps = vec![json!({"id": "root", "kind": "echo"})];
    for b in &branches {
        steps.push(json!({"id": b, "kind": "echo", "depends_on": ["root"], "input": {"b": b}}));
    }
    steps.push(json!({"id": "join", "kind": "echo", "depends_on": branches,
                      "input": {"n": "{{ steps | length }}"}}));
    let id = create(&api, json!({"name": "wide", "steps": steps})).await;
    let pool = env.pool().await;
    for _ in 0..3 {
        let run = start(&api, &id, json!({})).await;
        let done = ended(&api, &run, Duration::from_secs(60)).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(step(&done, "join")["output"]["n"], 62);
        let joins = count(
            &pool,
            "SELECT count(*) FROM jobs WHERE run_id = $1::uuid AND step_id = 'join'",
            &run,
        )
        .await;
        assert_eq!(joins, 1);
        let jobs = count(
            &pool,
            "SELECT count(*) FROM jobs WHERE run_id = $1::uuid",
            &run,
        )
        .await;
        assert_eq!(jobs, 62);
        let ready = count(
            &pool,
            "SELECT count(*) FROM events WHERE stream_id = $1::uuid AND type = 'StepReady'",
            &run,
        )
        .await;
        assert_eq!(ready, 62);
    }
    drop(api_proc);
}

/// A step's report plans its run in its own commit when no other step of the run is in flight:
/// a chain runs to its end with no scheduler at all, its history as the orchestrator writes it.
/// Steps that run in parallel are left to the orchestrator: without it the run waits after
/// the branches, and once it runs the join starts once.
#[tokio::test]
async fn a_steps_report_plans_its_run_and_parallel_steps_wait_for_the_orchestrator() {
    let mut env = TestEnv::new().await;
    let wport = capibara_tests::find_free_port();
    env.extra_env
        .push(("CAPIBARA_WORKER_ADDR".into(), format!("127.0.0.1:{wport}")));
    let _api = env.spawn_api().await;
    let _worker = env.spawn_worker(&[]);
    let api = env.client();
    let pool = env.pool().await;

    let chain = create(
        &api,
        json!({"name": "chain", "steps": [
            {"id": "a", "kind": "echo", "input": {"n": "{{ input.n }}"}},
            {"id": "b", "kind": "echo", "depends_on": ["a"], "input": {"n": "{{ steps.a.output.n }}"}},
            {"id": "c", "kind": "echo", "depends_on": ["b"], "input": {"n": "{{ steps.b.output.n }}"}},
        ]}),
    )
    .await;
    let run = start(&api, &chain, json!({"n": 7})).await;
    let done = ended(&api, &run, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(step(&done, "c")["output"]["n"], 7, "{done}");
    let metrics = capibara_tests::scrape(&format!("http://127.0.0.1:{wport}")).await;
    assert!(
        metrics.contains("capibara_runs_advanced_in_report_total 3"),
        "{metrics}"
    );
    // The run's history is the orchestrator's: each step ready, started and succeeded once,
    // then the run's end, all written by the orchestrator's planning.
    let history: Vec<(String, String)> = sqlx::query_as(
        "SELECT type, metadata->>'actor' FROM events WHERE stream_id = $1::uuid AND version > 1 \
         ORDER BY version",
    )
    .bind(&run)
    .fetch_all(&pool)
    .await
    .unwrap();
    let types: Vec<&str> = history.iter().map(|(t, _)| t.as_str()).collect();
    let step_events = ["StepReady", "StepStarted", "StepSucceeded"];
    let mut want: Vec<&str> = step_events.repeat(3);
    want.push("RunSucceeded");
    assert_eq!(types, want, "{history:?}");
    // The first step was made ready by the run's start (the API); the rest by the planning.
    assert!(
        history[1..]
            .iter()
            .all(|(_, actor)| actor == "orchestrator"),
        "{history:?}"
    );

    let fan = create(
        &api,
        json!({"name": "fan", "steps": [
            {"id": "x", "kind": "echo"},
            {"id": "y", "kind": "echo"},
            {"id": "join", "kind": "echo", "depends_on": ["x", "y"]},
        ]}),
    )
    .await;
    let run = start(&api, &fan, json!({})).await;
    let ran = |step: &'static str| {
        let (pool, run) = (pool.clone(), run.clone());
        async move {
            count(
                &pool,
                &format!(
                    "SELECT count(*) FROM jobs WHERE run_id = $1::uuid AND step_id = '{step}' \
                     AND status = 'succeeded'"
                ),
                &run,
            )
            .await
        }
    };
    eventually(
        "both branches succeeded",
        Duration::from_secs(15),
        || async { (ran("x").await == 1 && ran("y").await == 1).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let joins = "SELECT count(*) FROM jobs WHERE run_id = $1::uuid AND step_id = 'join'";
    assert_eq!(
        count(&pool, joins, &run).await,
        0,
        "planned without the orchestrator"
    );
    let _scheduler = env.spawn_scheduler();
    let done = ended(&api, &run, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(count(&pool, joins, &run).await, 1);
}

#[tokio::test]
async fn crashes_mid_run_lose_and_duplicate_nothing_and_a_rebuild_reproduces_runs() {
    let env = TestEnv::new().await;
    let mut api_proc = env.spawn_api().await;
    let mut worker = env.spawn_worker(&[]);
    let _s = env.spawn_scheduler();
    let api = env.client();
    let mut steps = vec![];
    let mut prev: Option<String> = None;
    for i in 0..6 {
        let id = format!("s{i}");
        let mut s = json!({"id": id, "kind": "sleep", "input": {"ms": 400},
                           "retry": {"max_attempts": 3, "backoff": {"initial_ms": 100}}});
        if let Some(p) = &prev {
            s["depends_on"] = json!([p]);
        }
        steps.push(s);
        prev = Some(id);
    }
    steps.push(json!({"id": "fan", "kind": "map", "depends_on": ["s5"],
        "input": {"items": [1, 2, 3, 4, 5, 6, 7, 8], "concurrency": 3,
                  "step": {"kind": "sleep", "input": {"ms": 200}}},
        "retry": {"max_attempts": 3, "backoff": {"initial_ms": 100}}}));
    let id = create(&api, json!({"name": "crashy", "steps": steps})).await;
    let runs: Vec<String> = {
        let mut v = vec![];
        for _ in 0..3 {
            v.push(start(&api, &id, json!({})).await);
        }
        v
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    worker.kill();
    let worker2 = env.spawn_worker(&[]);
    tokio::time::sleep(Duration::from_millis(900)).await;
    api_proc.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    api_proc = env.spawn_api().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(worker2);
    let _worker3 = env.spawn_worker(&[]);
    let pool = env.pool().await;
    for run in &runs {
        let done = ended(&api, run, Duration::from_secs(120)).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        // One job per step (map: per item); attempts may repeat, jobs never.
        let jobs = count(
            &pool,
            "SELECT count(*) FROM jobs WHERE run_id = $1::uuid",
            run,
        )
        .await;
        assert_eq!(jobs, 6 + 8, "{done}");
        let dup: (i64,) = sqlx::query_as(
            "SELECT count(*) FROM (SELECT step_id FROM jobs WHERE run_id = $1::uuid
             GROUP BY step_id HAVING count(*) > 1) d",
        )
        .bind(run)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(dup.0, 0);
    }
    // The projection rebuilt from the log equals the one written inline.
    let before: Vec<(Value,)> = sqlx::query_as("SELECT to_jsonb(r) FROM runs r ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    env.rebuild_projections();
    let after: Vec<(Value,)> = sqlx::query_as("SELECT to_jsonb(r) FROM runs r ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(before.len(), 3);
    assert_eq!(before, after);
    drop(api_proc);
}

#[tokio::test]
async fn cancel_retry_sub_workflows_waits_and_failure() {
    let env = TestEnv::new().await;
    let (_a, _w, _s) = env.spawn_all().await;
    let api = env.client();
    let pool = env.pool().await;

    // Cancel: the running step's job is canceled too.
    let id = create(
        &api,
        json!({"name": "long", "steps": [{"id": "nap", "kind": "sleep", "input": {"ms": 60000}},
                                          {"id": "after", "kind": "echo", "depends_on": ["nap"]}]}),
    )
    .await;
    let run = start(&api, &id, json!({})).await;
    let job = eventually("the step to run", Duration::from_secs(20), || async {
        let r = api.get(&format!("/v1/runs/{run}")).await;
        (step(&r.body, "nap")["status"] == "running")
            .then(|| step(&r.body, "nap")["job_id"].as_str().unwrap().to_string())
    })
    .await;
    let r = api.post(&format!("/v1/runs/{run}/cancel"), json!({})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["status"], "canceled");
    assert_eq!(step(&r.body, "after")["status"], "canceled");
    let j = api.wait_terminal(&job, Duration::from_secs(20)).await;
    assert_eq!(j["status"], "canceled");
    assert_eq!(
        api.post(&format!("/v1/runs/{run}/cancel"), json!({}))
            .await
            .status,
        409
    );

    // Failure fails the run; retry re-runs only what did not succeed.
    let id = create(
        &api,
        json!({"name": "flaky", "steps": [
            {"id": "ok", "kind": "echo", "input": {"v": 1}},
            {"id": "bad", "kind": "fail", "depends_on": ["ok"], "input": {"message": "nope"}},
        ]}),
    )
    .await;
    let run = start(&api, &id, json!({})).await;
    let done = ended(&api, &run, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["error"]["step_id"], "bad");
    let ok_job = step(&done, "ok")["job_id"].clone();
    let bad_job = step(&done, "bad")["job_id"].clone();
    assert_eq!(
        api.post(&format!("/v1/runs/{run}/retry"), json!({}))
            .await
            .status,
        202
    );
    let again = eventually(
        "the retried run to fail again",
        Duration::from_secs(20),
        || async {
            let r = api.get(&format!("/v1/runs/{run}")).await;
            (r.body["status"] == "failed" && step(&r.body, "bad")["job_id"] != bad_job)
                .then_some(r.body)
        },
    )
    .await;
    assert_eq!(step(&again, "ok")["job_id"], ok_job);
    assert_eq!(step(&again, "ok")["output"], json!({"v": 1}));
    let evs = api
        .get(&format!("/v1/runs/{run}/events?limit=500"))
        .await
        .body["items"]
        .as_array()
        .unwrap()
        .clone();
    assert!(types(&evs).contains(&"RunRetried".to_string()));

    // Sub-workflow and wait steps.
    let child = create(
        &api,
        json!({"name": "child", "steps": [{"id": "c", "kind": "echo", "input": {"got": "{{ input.x }}"}}],
               "output": "{{ steps.c.output }}"}),
    )
    .await;
    let parent = create(
        &api,
        json!({"name": "parent", "steps": [
            {"id": "pause", "kind": "wait", "input": {"duration": "1s"}},
            {"id": "sub", "kind": "workflow", "depends_on": ["pause"],
             "input": {"workflow_id": child, "input": {"x": "{{ input.x }}"}}},
        ], "output": {"sub": "{{ steps.sub.output }}"}}),
    )
    .await;
    let started = std::time::Instant::now();
    let run = start(&api, &parent, json!({"x": [1, 2]})).await;
    let done = ended(&api, &run, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(done["output"], json!({"sub": {"got": [1, 2]}}));
    let child_run = step(&done, "sub")["child_run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let c = api.get(&format!("/v1/runs/{child_run}")).await.body;
    assert_eq!(c["parent_run_id"], run.as_str());
    let waits = count(
        &pool,
        "SELECT count(*) FROM jobs WHERE run_id = $1::uuid AND kind = 'workflow.wait'",
        &run,
    )
    .await;
    assert_eq!(waits, 1);
}

#[tokio::test]
async fn schedules_triggers_and_orchestrate_start_runs() {
    let mut env = TestEnv::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.extra_env.push((
        "CAPIBARA_SCHEDULER_ADDR".into(),
        format!("127.0.0.1:{port}"),
    ));
    env.extra_env.push((
        "CAPIBARA_HOOKS_PUBLIC_URL".into(),
        format!("http://127.0.0.1:{port}"),
    ));
    let (_a, _w, mut sched) = env.spawn_all().await;
    let api = env.client();
    let id = create(
        &api,
        json!({"name": "greeter", "steps": [{"id": "hi", "kind": "echo", "input": {"hello": "{{ input.name }}"}}],
               "output": "{{ steps.hi.output }}"}),
    )
    .await;
    // A schedule's manual trigger starts a run.
    let r = api
        .post(
            "/v1/schedules",
            json!({"name": "s", "cron": "0 0 1 1 *", "target": {"type": "workflow", "workflow_id": id, "input": {"name": "cron"}}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let sid = r.body["id"].as_str().unwrap().to_string();
    let r = api
        .post(&format!("/v1/schedules/{sid}/trigger"), json!({}))
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let run = r.body["last_job_id"].as_str().unwrap().to_string();
    let done = ended(&api, &run, Duration::from_secs(20)).await;
    assert_eq!(done["output"], json!({"hello": "cron"}));
    // The ticker fires workflow targets too (an every-second schedule).
    let r = api
        .post(
            "/v1/schedules",
            json!({"name": "tick", "cron": "* * * * * *", "overlap": "allow",
                   "target": {"type": "workflow", "workflow_id": id, "input": {"name": "tick"}}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let tick = r.body["id"].as_str().unwrap().to_string();
    let ticked = eventually("a scheduled run", Duration::from_secs(20), || async {
        let runs = api
            .get(&format!("/v1/runs?workflow_id={id}&status=succeeded"))
            .await;
        runs.body["items"]
            .as_array()?
            .iter()
            .find(|r| r["input"]["schedule"]["id"] == tick.as_str())
            .cloned()
    })
    .await;
    assert_eq!(ticked["output"], json!({"hello": "tick"}));
    assert_eq!(
        api.post(&format!("/v1/schedules/{tick}/pause"), json!({}))
            .await
            .status,
        200
    );
    // A trigger with a workflow target starts a run from the request body.
    let r = api
        .post(
            "/v1/triggers",
            json!({"name": "t", "target": {"type": "workflow", "workflow_id": id},
                   "auth": {"type": "bearer", "token": "0123456789abcdef"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let url = r.body["url"].as_str().unwrap().to_string();
    let hook = eventually("the hook endpoint", Duration::from_secs(10), || async {
        let r = api
            .http
            .post(&url)
            .bearer_auth("0123456789abcdef")
            .json(&json!({"name": "hook"}))
            .send()
            .await
            .ok()?;
        (r.status() == 202).then_some(())?;
        r.json::<Value>().await.ok()
    })
    .await;
    let run = hook["run_id"].as_str().unwrap().to_string();
    let done = ended(&api, &run, Duration::from_secs(20)).await;
    assert_eq!(done["output"], json!({"hello": "hook"}));
    // Orchestrate intents may name a workflow.
    let r = api
        .post(
            "/v1/orchestrate",
            json!({"intent": "greeter", "inputs": {"name": "seed"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["status"], "succeeded");
    assert_eq!(r.body["result"], json!({"hello": "seed"}));
    assert!(r.body["run_id"].is_string());
    let r = api
        .post("/v1/orchestrate", json!({"intent": "nobody"}))
        .await;
    assert_eq!(r.status, 422);
    assert!(r.body["detail"].as_str().unwrap().contains("greeter"));
    sched.kill();
}

#[tokio::test]
async fn a_run_callback_is_signed_and_sent_when_the_run_ends() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_WEBHOOK_SECRET".into(), SECRET.into()));
    env.extra_env
        .push(("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()));
    let (_a, _w, _s) = env.spawn_all().await;
    let api = env.client();
    let receiver = capibara_tests::receiver::Receiver::start(
        &[SECRET],
        capibara_tests::receiver::ReceiverOptions::default(),
    );
    let id = create(
        &api,
        json!({"name": "cb", "steps": [{"id": "a", "kind": "echo", "input": {"v": 3}}]}),
    )
    .await;
    let r = api
        .post(
            &format!("/v1/workflows/{id}/runs"),
            json!({"input": {}, "callback_url": format!("{}/runs", receiver.url)}),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let run = r.body["id"].as_str().unwrap().to_string();
    let got = eventually("the run callback", Duration::from_secs(20), || async {
        let got = receiver.requests();
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(got[0]["verified"], true, "{}", got[0]);
    assert_eq!(got[0]["body"]["type"], "run.succeeded");
    assert_eq!(got[0]["body"]["data"]["id"], run.as_str());
    assert_eq!(got[0]["body"]["data"]["output"], json!({"a": {"v": 3}}));
    let d = api.get(&format!("/v1/deliveries?job_id={run}")).await;
    assert_eq!(d.body["items"].as_array().unwrap().len(), 1, "{d:?}");
    // A callback URL needs the signing secret to be configured and must be a URL.
    let r = api
        .post(
            &format!("/v1/workflows/{id}/runs"),
            json!({"input": {}, "callback_url": "not a url"}),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.body["errors"][0]["field"], "callback_url");
}

#[tokio::test]
async fn secrets_are_referenced_by_name_and_never_enter_the_log() {
    let env = TestEnv::new().await;
    let (_a, _w, _s) = env.spawn_all().await;
    let api = env.client();
    let put = |name: &str, value: &str| {
        api.http
            .put(api.url(&format!("/v1/secrets/{name}")))
            .bearer_auth(&api.key)
            .json(&json!({"value": value}))
            .send()
    };
    assert_eq!(put("TOKEN", "s3cr3t-value").await.unwrap().status(), 200);
    assert_eq!(put("bad name", "x").await.unwrap().status(), 422);
    let list = api.get("/v1/secrets").await;
    assert_eq!(list.body["items"][0]["name"], "TOKEN");
    assert!(!list.body.to_string().contains("s3cr3t"));

    let id = create(
        &api,
        json!({"name": "sec", "steps": [
            {"id": "call", "kind": "echo", "input": {"auth": "Bearer {{ secrets.TOKEN }}"}},
            {"id": "missing", "kind": "echo", "depends_on": ["call"], "input": {"k": "{{ secrets.NOPE }}"}},
        ]}),
    )
    .await;
    let run = start(&api, &id, json!({})).await;
    let done = ended(&api, &run, Duration::from_secs(20)).await;
    // The executor saw the value (the reference was replaced: echo returns it), and the value is
    // redacted from what the attempt records; the job's stored input keeps only the reference.
    assert_eq!(step(&done, "call")["output"]["auth"], "Bearer ***");
    let job = step(&done, "call")["job_id"].as_str().unwrap().to_string();
    assert_eq!(
        api.job(&job).await["input"]["auth"],
        "Bearer ${secret:TOKEN}"
    );
    let pool = env.pool().await;
    let (leaks,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM events WHERE data::text LIKE '%s3cr3t%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(leaks, 0);
    // A missing secret fails the step without retrying.
    assert_eq!(done["status"], "failed");
    assert_eq!(
        step(&done, "missing")["error"]["type"],
        "secret_not_found",
        "{done}"
    );
}

async fn put_secret(api: &Api, name: &str, value: &str) {
    let r = api
        .http
        .put(api.url(&format!("/v1/secrets/{name}")))
        .bearer_auth(&api.key)
        .json(&json!({"value": value}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn secrets_resolve_only_for_the_steps_that_name_them_in_their_own_namespace() {
    let mut env = TestEnv::new().await;
    env.visibility_timeout_s = 30.0; // code.run compiles its runtime once: no lease expiry
    let _procs = env.spawn_all().await;
    let admin = env.client();
    let (a, b) = (
        admin.key_for("team-a", &["admin"]).await,
        admin.key_for("team-b", &["admin"]).await,
    );
    put_secret(&a, "TOKEN", "alpha-s3cr3t").await;
    put_secret(&a, "LANG", "alpha-lang-s3cr3t").await;
    put_secret(&b, "TOKEN", "bravo-s3cr3t-longer").await;
    let a_submit = a.key_for("team-a", &["submit", "read"]).await;

    // A client's job never resolves a reference: it stays a literal string (job, batch, orchestrate).
    let leak = json!({"leak": "${secret:TOKEN}"});
    let job = a_submit
        .submit_id(json!({"kind": "echo", "input": leak}))
        .await;
    let job = a_submit.wait_terminal(&job, Duration::from_secs(20)).await;
    assert_eq!(job["output"], leak, "{job}");
    let batch = a_submit
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [{"kind": "echo", "input": leak}]}),
        )
        .await;
    assert_eq!(batch.status, 202, "{batch:?}");
    let id = batch.body["items"][0]["id"].as_str().unwrap().to_string();
    let job = a_submit.wait_terminal(&id, Duration::from_secs(20)).await;
    assert_eq!(job["output"], leak, "{job}");
    let o = a_submit
        .post("/v1/orchestrate", json!({"intent": "echo", "inputs": leak}))
        .await;
    let id = o.body["job_id"].as_str().unwrap().to_string();
    let job = a_submit.wait_terminal(&id, Duration::from_secs(20)).await;
    assert_eq!(job["output"], leak, "{job}");

    // Writing a step that reads secrets is an admin's act: a submit key could make it send them
    // anywhere. A submit key still writes workflows without secrets.
    let r = a_submit
        .post(
            "/v1/workflows",
            json!({"name": "exfil", "steps": [{"id": "s", "kind": "echo", "input": {"t": "{{ secrets.TOKEN }}"}}]}),
        )
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    let r = a_submit
        .post(
            "/v1/workflows",
            json!({"name": "plain", "steps": [{"id": "s", "kind": "echo", "input": {"t": "{{ input.t }}"}}]}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");

    // A workflow template still resolves the secrets it names, each namespace its own: the
    // value's length shows which one the step got without echoing it.
    let def = json!({"name": "uses-secrets", "steps": [
        {"id": "len", "kind": "code.run", "input": {"language": "python",
            "code": "result = len(context['t'])", "context": {"t": "{{ secrets.TOKEN }}"}}},
        {"id": "injected", "kind": "echo", "input": {"x": "{{ input.x }}"}},
    ]});
    let (wa, wb) = (create(&a, def.clone()).await, create(&b, def).await);
    let input = json!({"x": "${secret:TOKEN}"});
    let (ra, rb) = (
        start(&a, &wa, input.clone()).await,
        start(&b, &wb, input).await,
    );
    let (ra, rb) = (
        ended(&a, &ra, Duration::from_secs(300)).await,
        ended(&b, &rb, Duration::from_secs(300)).await,
    );
    assert_eq!(step(&ra, "len")["output"]["result"], 12, "{ra}");
    assert_eq!(step(&rb, "len")["output"]["result"], 19, "{rb}");
    // A reference that came in through the run's input is not the template's: it stays literal.
    assert_eq!(step(&ra, "injected")["output"]["x"], "${secret:TOKEN}");
    assert_eq!(step(&rb, "injected")["output"]["x"], "${secret:TOKEN}");

    // A secret in a field the kind checks (code.run's language) fails the step at its start, as
    // any rendered input that the kind refuses, and the error does not echo the value.
    let wl = create(
        &a,
        json!({"name": "bad-lang", "steps": [
            {"id": "run", "kind": "code.run", "input": {"language": "{{ secrets.LANG }}", "code": "1"}}]}),
    )
    .await;
    let rl = start(&a, &wl, json!({})).await;
    let rl = ended(&a, &rl, Duration::from_secs(60)).await;
    assert_eq!(rl["status"], "failed", "{rl}");
    let error = &step(&rl, "run")["error"];
    assert_eq!(error["type"], "invalid_input", "{rl}");
    assert_eq!(error["field"], "input.language", "{rl}");
    assert!(!rl.to_string().contains("alpha-lang"), "{rl}");

    // An executor error that echoes a secret (a `fail` step whose message is the value) is
    // stored with the value redacted, in the job, the run and the log.
    let wf = create(
        &a,
        json!({"name": "fail-with-secret", "steps": [
            {"id": "boom", "kind": "fail", "input": {"message": "token {{ secrets.TOKEN }} refused"}}]}),
    )
    .await;
    let rf = start(&a, &wf, json!({})).await;
    let rf = ended(&a, &rf, Duration::from_secs(60)).await;
    assert_eq!(rf["status"], "failed", "{rf}");
    let job = a.job(step(&rf, "boom")["job_id"].as_str().unwrap()).await;
    assert_eq!(job["error"]["message"], "token *** refused", "{job}");
    assert!(!rf.to_string().contains("s3cr3t"), "{rf}");

    // Nothing anywhere in the log or the job and run rows holds a value.
    let pool = env.pool().await;
    for sql in [
        "SELECT count(*) FROM events WHERE data::text LIKE '%s3cr3t%'",
        "SELECT count(*) FROM jobs WHERE to_jsonb(jobs)::text LIKE '%s3cr3t%'",
        "SELECT count(*) FROM runs WHERE to_jsonb(runs)::text LIKE '%s3cr3t%'",
    ] {
        let (n,): (i64,) = sqlx::query_as(sql).fetch_one(&pool).await.unwrap();
        assert_eq!(n, 0, "{sql}");
    }
}

/// Signals to different approval steps of one run, sent at once, all apply: each request that
/// loses the race on the run's stream plans again (`command::runs::change`) instead of
/// answering 409. Copies of one signal sent at once still apply once.
#[tokio::test]
async fn concurrent_signals_to_one_run_all_apply() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let steps: Vec<Value> = (0..12)
        .map(|i| json!({"id": format!("approve-{i}"), "kind": "approval"}))
        .collect();
    let wf = create(&api, json!({"name": "many-approvals", "steps": steps})).await;
    let run = start(&api, &wf, json!({})).await;
    let answers = futures::future::join_all((0..12).map(|i| {
        let api = &api;
        let run = &run;
        async move {
            api.post(
                &format!("/v1/runs/{run}/signals/approve-{i}"),
                json!({"payload": {"i": i}}),
            )
            .await
        }
    }))
    .await;
    for a in &answers {
        assert_eq!(a.status, 202, "{a:?}");
    }
    let ended = ended(&api, &run, Duration::from_secs(30)).await;
    assert_eq!(ended["status"], "succeeded", "{ended}");
    for i in 0..12 {
        assert_eq!(
            step(&ended, &format!("approve-{i}"))["output"],
            json!({"i": i})
        );
    }
    assert_eq!(signal_count(&env, &run).await, 12);

    // Copies of one signal sent at once to a waiting run: one applies, the others are refused
    // by the step's own check ("already signalled"), not by a race.
    let run = start(&api, &wf, json!({})).await;
    let path = format!("/v1/runs/{run}/signals/approve-0");
    let copies = futures::future::join_all(
        (0..6).map(|_| api.post(&path, json!({"payload": {"copy": true}}))),
    )
    .await;
    let accepted = copies.iter().filter(|r| r.status == 202).count();
    let refused: Vec<_> = copies.iter().filter(|r| r.status != 202).collect();
    assert_eq!(accepted, 1, "{copies:?}");
    for r in &refused {
        assert_eq!(r.status, 409, "{r:?}");
        assert!(
            r.body["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("already"),
            "{r:?}"
        );
    }
    assert_eq!(signal_count(&env, &run).await, 1);
}

async fn signal_count(env: &TestEnv, run: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM events WHERE stream_id = $1::uuid AND type = 'SignalReceived'",
    )
    .bind(run)
    .fetch_one(&env.pool().await)
    .await
    .unwrap();
    n
}
