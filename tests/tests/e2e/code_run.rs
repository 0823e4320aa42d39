//! `code.run` end to end: jobs and the `/v1/code/*` endpoints against real api, worker and
//! scheduler processes, with the wasm runtimes from `deploy/fetch-assets.sh`.

use std::{path::PathBuf, time::Duration};

use capibara_tests::{eventually, types, Proc, TestEnv};
use serde_json::{json, Value};

/// The asset directory (absolute: the binaries run in the test's working directory).
fn assets_dir() -> String {
    std::env::var("CAPIBARA_ASSETS_DIR").unwrap_or_else(|_| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../.capibara/assets")
            .to_string_lossy()
            .into_owned()
    })
}

async fn start() -> (TestEnv, (Proc, Proc, Proc)) {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_ASSETS_DIR".into(), assets_dir()));
    // These tests are not about leases: a CPU-starved CI machine must not expire one mid-run
    // and turn a single attempt into two.
    env.visibility_timeout_s = 30.0;
    let procs = env.spawn_all().await;
    // On a fresh machine the worker first compiles the runtimes (~25 s on 2 busy cores, once;
    // then they load from the .cwasm cache in milliseconds). Wait for that with a syntax check
    // so the endpoints' own waits below measure runs, not the compiler.
    let api = env.client();
    let id = api
        .submit_id(json!({"kind": "code.validate", "input": {"language": "python", "code": "1"}}))
        .await;
    let ready = api.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(ready["status"], "succeeded", "sandbox warm-up: {ready}");
    (env, procs)
}

/// Submits a `code.run` job and waits for it to finish; returns the job.
async fn run_job(api: &capibara_tests::Api, input: Value) -> Value {
    let r = api
        .send(
            api.http
                .post(api.url("/v1/jobs"))
                .header("Prefer", "wait=30")
                .json(&json!({"kind": "code.run", "input": input})),
        )
        .await;
    assert!(r.status == 200 || r.status == 202, "{r:?}");
    let id = r.body["id"].as_str().unwrap().to_string();
    if r.status == 200 {
        return r.body;
    }
    api.wait_terminal(&id, Duration::from_secs(60)).await
}

#[tokio::test]
async fn a_code_run_job_returns_the_result_output_and_timing() {
    let (env, _procs) = start().await;
    let api = env.client();

    let job = run_job(
        &api,
        json!({"language": "python", "code": "print('rows', len(context['rows']))\nresult = sum(context['rows'])",
               "context": {"rows": [1, 2, 3]}}),
    )
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["queue"], "code");
    let out = &job["output"];
    assert_eq!(out["result"], 6);
    assert_eq!(out["stdout"], "rows 3\n");
    assert_eq!(out["stderr"], "");
    assert_eq!(out["exit_code"], 0);
    assert_eq!(out["cached"], false);
    assert!(out["duration_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(
        types(&api.events(job["id"].as_str().unwrap()).await),
        ["JobSubmitted", "JobStarted", "JobSucceeded"]
    );

    let job = run_job(
        &api,
        json!({"language": "javascript", "code": "console.log('hi'); result = context.a.map(x => x + 1)",
               "context": {"a": [1, 2]}, "cache": false}),
    )
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["output"]["result"], json!([2, 3]));
    assert_eq!(job["output"]["stdout"], "hi\n");
}

#[tokio::test]
async fn each_breach_fails_the_job_once_with_its_own_error_type() {
    let (env, _procs) = start().await;
    let api = env.client();
    let cases = [
        (
            json!({"language": "python", "code": "while True: pass", "timeout_ms": 500}),
            "timeout",
        ),
        (
            json!({"language": "javascript", "code": "for(;;){}", "timeout_ms": 500}),
            "timeout",
        ),
        (
            json!({"language": "python", "code": "x = []\nwhile True: x.append(bytearray(10**7))", "memory_mb": 64}),
            "memory_limit",
        ),
        (
            json!({"language": "python", "code": "while True: print('x' * 10000)"}),
            "output_limit",
        ),
        (
            json!({"language": "python", "code": "open('/etc/passwd').read()"}),
            "runtime_error",
        ),
        (
            json!({"language": "python", "code": "import socket\nsocket.create_connection(('127.0.0.1', 5432))"}),
            "runtime_error",
        ),
        (
            json!({"language": "python", "code": "import os\nos.system('id')"}),
            "runtime_error",
        ),
        (
            json!({"language": "python", "code": "import subprocess\nsubprocess.run(['id'])"}),
            "runtime_error",
        ),
        (
            json!({"language": "javascript", "code": "null.x"}),
            "runtime_error",
        ),
    ];
    let jobs =
        futures::future::join_all(cases.iter().map(|(input, _)| run_job(&api, input.clone())))
            .await;
    for ((input, want), job) in cases.iter().zip(jobs) {
        assert_eq!(job["status"], "failed", "{input}: {job}");
        assert_eq!(job["error"]["type"], *want, "{input}: {job}");
        // A sandbox failure is final: the same code would fail the same way.
        let id = job["id"].as_str().unwrap();
        assert_eq!(job["attempt"], 1, "{input}: {:?}", api.events(id).await);
        assert!(
            job["error"]["details"]["duration_ms"].as_f64().is_some(),
            "{job}"
        );
    }
}

#[tokio::test]
async fn a_runtime_error_carries_the_traceback_and_output_so_far() {
    let (env, _procs) = start().await;
    let api = env.client();
    let job = run_job(
        &api,
        json!({"language": "python", "code": "print('before')\ndef f():\n    return 1 / 0\nf()"}),
    )
    .await;
    assert_eq!(job["status"], "failed");
    let err = &job["error"];
    assert_eq!(err["type"], "runtime_error");
    assert_eq!(err["message"], "ZeroDivisionError: division by zero");
    let tb = err["details"]["traceback"].as_str().unwrap();
    assert!(tb.contains("line 3, in f"), "{tb}");
    assert_eq!(err["details"]["stdout"], "before\n");
    assert_eq!(err["details"]["exit_code"], 1);
}

/// Output Postgres cannot store (a NUL character) ends the attempt with `invalid_output`, once:
/// not a write that fails forever while the job is re-queued with attempt 0 and holds a slot.
#[tokio::test]
async fn output_with_a_nul_character_fails_the_attempt_as_invalid_output() {
    let (env, _procs) = start().await;
    let api = env.client();
    let cases = [
        ("print('a\\x00b')", "output.stdout"),
        ("result = {'k': ['ok', 'x\\x00']}", "output.result.k[1]"),
        ("print('\\x00')\n1 / 0", "error.details.stdout"),
    ];
    for (code, path) in cases {
        let job = run_job(
            &api,
            json!({"language": "python", "code": code, "cache": false}),
        )
        .await;
        assert_eq!(job["status"], "failed", "{code}: {job}");
        assert_eq!(job["attempt"], 1, "{job}");
        assert_eq!(job["error"]["type"], "invalid_output", "{job}");
        let message = job["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("`{path}`")), "{message}");
        assert!(!message.contains('\0'), "{message}");
        assert_eq!(
            types(&api.events(job["id"].as_str().unwrap()).await),
            [
                "JobSubmitted",
                "JobStarted",
                "JobAttemptFailed",
                "JobFailed"
            ]
        );
    }
    // The worker is free for the next job.
    let job = run_job(
        &api,
        json!({"language": "python", "code": "result = 1", "cache": false}),
    )
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
}

#[tokio::test]
async fn fifty_concurrent_jobs_each_get_their_own_result_and_no_state_leaks() {
    let (env, _procs) = start().await;
    let api = env.client();
    let jobs: Vec<Value> = (0..50)
        .map(|i| {
            let (language, code) = if i % 2 == 0 {
                ("python", "import json\nassert not hasattr(json, 'mark')\njson.mark = context['i']\nresult = json.mark * 10")
            } else {
                ("javascript", "if (globalThis.mark !== undefined) throw new Error('leak'); globalThis.mark = context.i; result = mark * 10")
            };
            json!({"kind": "code.run", "input": {"language": language, "code": code, "context": {"i": i}, "cache": false}})
        })
        .collect();
    let r = api.post("/v1/jobs/batch", json!({"jobs": jobs})).await;
    assert_eq!(r.status, 202, "{r:?}");
    let ids: Vec<String> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let job = api.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["output"]["result"], json!(i * 10));
    }
}

#[tokio::test]
async fn execute_answers_the_seed_shape_and_serves_repeats_from_the_cache() {
    let (env, _procs) = start().await;
    let api = env.client();
    let body = json!({"code": "print('once')\nresult = context['x'] * 2", "context": {"x": 21}, "timeout": 5});

    let first = api.post("/v1/code/execute", body.clone()).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.body["success"], true);
    assert_eq!(first.body["result"], 42);
    assert_eq!(first.body["stdout"], "once\n");
    assert_eq!(first.body["stderr"], "");
    assert_eq!(first.body["cached"], false);
    assert!(first.body["execution_time_ms"].as_f64().unwrap() > 0.0);

    let second = api.post("/v1/code/execute", body.clone()).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.body["cached"], true);
    assert_eq!(second.body["result"], 42);
    assert_eq!(second.body["stdout"], "once\n");
    assert_ne!(second.body["job_id"], first.body["job_id"]);

    // Another context is another entry; `cache: false` neither reads nor fills it.
    let other = api
        .post(
            "/v1/code/execute",
            json!({"code": "result = context['x'] * 2", "context": {"x": 1}}),
        )
        .await;
    assert_eq!(other.body["cached"], false);
    let mut uncached = body.clone();
    uncached["cache"] = json!(false);
    let r = api.post("/v1/code/execute", uncached).await;
    assert_eq!(r.body["cached"], false);
    assert_eq!(r.body["result"], 42);

    let stats = api.get("/v1/code/cache/stats").await;
    assert_eq!(stats.status, 200, "{stats:?}");
    assert_eq!(stats.body["entries"], 2);
    assert_eq!(stats.body["hits"], 1);
    assert!(
        (stats.body["hit_rate"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9,
        "{stats:?}"
    );
    assert!(stats.body["avg_execution_time_ms"].as_f64().unwrap() > 0.0);

    // Entries younger than an hour stay; `older_than_hours=0` takes them all.
    let r = api
        .send(
            api.http
                .delete(api.url("/v1/code/cache?older_than_hours=1")),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["deleted"], 0);
    let r = api
        .send(
            api.http
                .delete(api.url("/v1/code/cache?older_than_hours=0")),
        )
        .await;
    assert_eq!(r.body["deleted"], 2);
    assert_eq!(api.get("/v1/code/cache/stats").await.body["entries"], 0);
    let again = api.post("/v1/code/execute", body).await;
    assert_eq!(again.body["cached"], false);
}

#[tokio::test]
async fn execute_runs_the_seeds_examples_with_context_keys_as_variables() {
    let (env, _procs) = start().await;
    let api = env.client();
    // The code-generation seed's own example, exactly as it sends it.
    let r = api
        .post(
            "/v1/code/execute",
            json!({"code": "result = x * y", "context": {"x": 5, "y": 3}}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["success"], true, "{r:?}");
    assert_eq!(r.body["result"], 15);
    let r = api
        .post(
            "/v1/code/execute",
            json!({"code": "result = x * y", "language": "javascript", "context": {"x": 5, "y": 3}}),
        )
        .await;
    assert_eq!(r.body["success"], true, "{r:?}");
    assert_eq!(r.body["result"], 15);
    // The cache key covers the context: other values are another run, not the cached 15.
    let r = api
        .post(
            "/v1/code/execute",
            json!({"code": "result = x * y", "context": {"x": 2, "y": 3}}),
        )
        .await;
    assert_eq!(
        (&r.body["result"], &r.body["cached"]),
        (&json!(6), &json!(false)),
        "{r:?}"
    );
    // A key that is no identifier stays reachable through `context`, which is still bound.
    let r = api
        .post(
            "/v1/code/execute",
            json!({"code": "result = context['first-name'] + ' ' + last", "context": {"first-name": "Ada", "last": "L"}}),
        )
        .await;
    assert_eq!(r.body["result"], "Ada L", "{r:?}");
    // The same through a code.run job.
    let job = run_job(
        &api,
        json!({"language": "javascript", "code": "result = items.length + context.items.length",
               "context": {"items": [1, 2]}}),
    )
    .await;
    assert_eq!(job["output"]["result"], 4, "{job}");
}

#[tokio::test]
async fn execute_reports_failures_with_their_type() {
    let (env, _procs) = start().await;
    let api = env.client();
    let r = api
        .post(
            "/v1/code/execute",
            json!({"code": "while (true) {}", "language": "javascript", "timeout": 0.5}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["success"], false);
    assert_eq!(r.body["error"]["type"], "timeout");
    assert_eq!(r.body["result"], Value::Null);
}

#[tokio::test]
async fn validate_reports_syntax_errors_with_line_and_column() {
    let (env, _procs) = start().await;
    let api = env.client();
    let r = api
        .post(
            "/v1/code/validate",
            json!({"code": "x = 1\nif x > 0\n    pass", "language": "python"}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["valid"], false);
    assert_eq!(r.body["line"], 2);
    assert!(r.body["column"].as_u64().is_some());
    assert!(r.body["message"].as_str().unwrap().contains("SyntaxError"));

    let r = api
        .post("/v1/code/validate", json!({"code": "while True: pass"}))
        .await;
    assert_eq!(
        r.body["valid"], true,
        "checking does not run the code: {r:?}"
    );

    let r = api
        .post(
            "/v1/code/validate",
            json!({"code": "let a = ;", "language": "javascript"}),
        )
        .await;
    assert_eq!(r.body["valid"], false, "{r:?}");
    assert_eq!(r.body["line"], 1);

    // The seed's form: the fields in the query string, no body.
    let query = |q: &[(&str, &str)]| api.send(api.http.post(api.url("/v1/code/validate")).query(q));
    let r = query(&[("code", "result = 1 + 2"), ("language", "python")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        (&r.body["valid"], &r.body["language"]),
        (&json!(true), &json!("python"))
    );
    let r = query(&[("code", "x = 1\nif x > 0\n    pass")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["valid"], false, "python is the default: {r:?}");
    let r = query(&[("code", "let a = ;"), ("language", "javascript")]).await;
    assert_eq!(
        (&r.body["valid"], &r.body["line"]),
        (&json!(false), &json!(1)),
        "{r:?}"
    );
}

#[tokio::test]
async fn bad_inputs_are_problems_naming_the_field() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_ASSETS_DIR".into(), assets_dir()));
    let _api = env.spawn_api().await;
    let api = env.client();
    let cases = [
        (
            "/v1/jobs",
            json!({"kind": "code.run", "input": {"language": "python"}}),
            "input.code",
        ),
        (
            "/v1/jobs",
            json!({"kind": "code.run", "input": {"language": "ruby", "code": "1"}}),
            "input.language",
        ),
        (
            "/v1/jobs",
            json!({"kind": "code.run", "input": {"language": "python", "code": "1", "timeout_ms": 600000}}),
            "input.timeout_ms",
        ),
        (
            "/v1/jobs",
            json!({"kind": "code.run", "input": {"language": "python", "code": "1", "memory_mb": 1}}),
            "input.memory_mb",
        ),
        (
            "/v1/jobs",
            json!({"kind": "code.run", "input": {"language": "python", "code": "1", "network": true}}),
            "input.network",
        ),
        (
            "/v1/code/execute",
            json!({"code": "1", "timeout": 0}),
            "timeout",
        ),
        (
            "/v1/code/execute",
            json!({"code": "1", "language": "cobol"}),
            "language",
        ),
        ("/v1/code/execute", json!({"language": "python"}), "code"),
        (
            "/v1/code/execute",
            json!({"code": "1", "sandbox": "off"}),
            "sandbox",
        ),
        (
            "/v1/code/execute",
            json!({"code": "1", "context": {}, "cache": "yes"}),
            "cache",
        ),
        ("/v1/code/validate", json!({"code": 5}), "code"),
    ];
    for (path, body, field) in cases {
        let r = api.post(path, body.clone()).await;
        assert_eq!(r.status, 422, "{path} {body}: {r:?}");
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/problem+json"),
            "{r:?}"
        );
        let errors = r.body["errors"].as_array().unwrap();
        assert!(
            errors.iter().any(|e| e["field"] == field),
            "{path} {body}: expected {field} in {r:?}"
        );
    }
    // The query-string form of /v1/code/validate names its fields the same way.
    for (q, field) in [
        ("code=1&language=ruby", "language"),
        ("language=python", "code"),
        ("code=1&strict=yes", "strict"),
        ("code=1&code=2", "code"),
    ] {
        let r = api
            .send(api.http.post(api.url(&format!("/v1/code/validate?{q}"))))
            .await;
        assert_eq!(r.status, 422, "{q}: {r:?}");
        assert_eq!(r.body["errors"][0]["field"], field, "{q}: {r:?}");
    }
    let r = api
        .send(
            api.http
                .post(api.url("/v1/code/validate?code=1"))
                .json(&json!({"code": "2"})),
        )
        .await;
    assert_eq!(r.status, 400, "the query string or a body, not both: {r:?}");
    let r = api
        .send(
            api.http
                .delete(api.url("/v1/code/cache?older_than_hours=soon")),
        )
        .await;
    assert_eq!(r.status, 422, "{r:?}");
    assert_eq!(r.body["errors"][0]["field"], "older_than_hours");
}

#[tokio::test]
async fn canceling_stops_a_running_snippet() {
    let (env, _procs) = start().await;
    let api = env.client();
    let id = api
        .submit_id(json!({"kind": "code.run", "input": {"language": "python", "code": "while True: pass", "timeout_ms": 60000}}))
        .await;
    eventually("the job runs", Duration::from_secs(20), || async {
        (api.job(&id).await["status"] == "running").then_some(())
    })
    .await;
    let r = api.post(&format!("/v1/jobs/{id}/cancel"), json!({})).await;
    assert!(r.status < 300, "{r:?}");
    let job = api.wait_terminal(&id, Duration::from_secs(20)).await;
    assert_eq!(job["status"], "canceled", "{job}");
}
