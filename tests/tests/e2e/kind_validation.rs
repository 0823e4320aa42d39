//! One validation of a kind's input, wherever a job comes from: `POST /v1/jobs`, a batch,
//! schedule and trigger targets, workflow definitions' static step inputs, `/v1/orchestrate`,
//! `POST /v1/tts` and calls to a trigger all refuse the same input with a 422 naming the field
//! — including checks that need to know the deployment, such as an uninstalled voice.

use capibara_tests::{find_free_port, TestEnv};
use serde_json::{json, Value};
use std::time::Duration;

/// A `tts.render` input naming a voice no server has.
fn bad_tts() -> Value {
    json!({"text": "hi", "voice": "nope"})
}

fn assert_422(r: &capibara_tests::Res, field: &str) {
    assert_eq!(r.status, 422, "{r:?}");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/problem+json"),
        "{r:?}"
    );
    assert_eq!(r.body["errors"][0]["field"], field, "{r:?}");
    let message = r.body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("unknown voice `nope`"), "{r:?}");
}

#[tokio::test]
async fn an_unknown_voice_is_refused_at_every_entry_point() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();

    let r = api
        .submit(json!({"kind": "tts.render", "input": bad_tts()}))
        .await;
    assert_422(&r, "input.voice");

    let r = api
        .post(
            "/v1/jobs/batch",
            json!({"jobs": [{"kind": "echo"}, {"kind": "tts.render", "input": bad_tts()}]}),
        )
        .await;
    assert_422(&r, "jobs[1].input.voice");

    let r = api
        .post(
            "/v1/schedules",
            json!({"name": "nightly", "cron": "0 9 * * *",
                   "target": {"type": "job", "job": {"kind": "tts.render", "input": bad_tts()}}}),
        )
        .await;
    assert_422(&r, "target.job.input.voice");

    let r = api
        .post(
            "/v1/triggers",
            json!({"name": "speak", "auth": {"type": "bearer", "token": "a-long-enough-bearer-token"},
                   "target": {"type": "job", "job": {"kind": "tts.render", "input": bad_tts()}}}),
        )
        .await;
    assert_422(&r, "target.job.input.voice");

    let r = api
        .post(
            "/v1/workflows",
            json!({"name": "speak", "steps": [
                {"id": "a", "kind": "echo"},
                {"id": "b", "kind": "tts.render", "input": bad_tts()}]}),
        )
        .await;
    assert_422(&r, "steps[1].input.voice");
    let r = api
        .post(
            "/v1/workflows",
            json!({"name": "speak-each", "steps": [{"id": "m", "kind": "map", "input": {
                "items": [1, 2], "step": {"kind": "tts.render", "input": bad_tts()}}}]}),
        )
        .await;
    assert_422(&r, "steps[0].input.step.input.voice");

    let r = api
        .post(
            "/v1/orchestrate",
            json!({"intent": "tts.render", "inputs": bad_tts()}),
        )
        .await;
    assert_422(&r, "inputs.voice");

    let r = api.post("/v1/tts", bad_tts()).await;
    assert_422(&r, "voice");

    // None of them created anything.
    for path in ["/v1/jobs", "/v1/schedules", "/v1/triggers", "/v1/workflows"] {
        let r = api.get(path).await;
        assert_eq!(r.body["items"], json!([]), "{path}: {r:?}");
    }

    // The espeak voices exist everywhere, so the same input with one of them is accepted.
    let r = api
        .submit(json!({"kind": "tts.render", "input": {"text": "hi", "voice": "espeak:en-us"}}))
        .await;
    assert_eq!(r.status, 202, "{r:?}");
}

#[tokio::test]
async fn a_trigger_call_whose_input_names_an_unknown_voice_is_refused() {
    let mut env = TestEnv::new().await;
    let port = find_free_port();
    env.extra_env.push((
        "CAPIBARA_SCHEDULER_ADDR".into(),
        format!("127.0.0.1:{port}"),
    ));
    env.extra_env.push((
        "CAPIBARA_HOOKS_PUBLIC_URL".into(),
        format!("http://127.0.0.1:{port}"),
    ));
    let _api = env.spawn_api().await;
    let _scheduler = env.spawn_scheduler();
    capibara_tests::wait_http_ok(&format!("http://127.0.0.1:{port}/healthz")).await;
    let api = env.client();
    let token = "a-long-enough-bearer-token";
    let r = api
        .post(
            "/v1/triggers",
            json!({"name": "speak", "auth": {"type": "bearer", "token": token},
                   "target": {"type": "job", "job": {"kind": "tts.render",
                                                     "input": {"text": "placeholder"}}},
                   "input": {"text": "{{ body.text }}", "voice": "{{ body.voice }}"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let url = r.body["url"].as_str().unwrap().to_string();

    let http = reqwest::Client::new();
    let call = |voice: &str| {
        http.post(&url)
            .bearer_auth(token)
            .json(&json!({"text": "Hello.", "voice": voice}))
            .send()
    };
    let refused = call("nope").await.unwrap();
    assert_eq!(refused.status(), 422);
    let problem: Value = refused.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("input.voice") && detail.contains("unknown voice `nope`"),
        "{problem}"
    );
    assert_eq!(api.get("/v1/jobs").await.body["items"], json!([]));

    let accepted = call("espeak:en-us").await.unwrap();
    assert_eq!(accepted.status(), 202);
}

/// `GET /v1/kinds` publishes each kind's input schema, and it says what the server does: an
/// independent JSON Schema validator (the `jsonschema` crate) accepts exactly the inputs that
/// `POST /v1/jobs` accepts, over valid and invalid inputs of every kind.
#[tokio::test]
async fn each_kinds_published_input_schema_accepts_what_the_server_accepts() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    let r = api.get("/v1/kinds").await;
    assert_eq!(r.status, 200, "{r:?}");
    let schemas: std::collections::HashMap<String, Value> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["name"].as_str().unwrap().to_string(),
                k["input_schema"].clone(),
            )
        })
        .collect();
    let samples = [
        ("echo", json!({"anything": [1, "two"]})),
        ("echo", json!([1, 2])),
        ("sleep", json!({"ms": 10})),
        ("sleep", json!({"ms": 10, "progress_ms": 5})),
        ("sleep", json!({})),
        ("sleep", json!({"ms": -1})),
        ("sleep", json!({"ms": 86_400_001})),
        ("sleep", json!({"ms": 10, "progress_ms": 0})),
        ("sleep", json!({"ms": "10"})),
        ("sleep", json!({"ms": 10, "extra": true})),
        ("fail", json!({})),
        ("fail", json!({"message": "no", "times": 2})),
        ("fail", json!({"times": -2})),
        ("fail", json!({"message": 3})),
        (
            "code.run",
            json!({"language": "python", "code": "result = 1"}),
        ),
        (
            "code.run",
            json!({"language": "javascript", "code": "1", "context": {"x": 1},
                            "timeout_ms": 60000, "memory_mb": 64, "cache": false}),
        ),
        (
            "code.run",
            json!({"language": "python", "code": "1", "memory_mb": null, "timeout_ms": null}),
        ),
        ("code.run", json!({"language": "ruby", "code": "1"})),
        ("code.run", json!({"language": "python"})),
        (
            "code.run",
            json!({"language": "python", "code": "1", "memory_mb": 3000}),
        ),
        (
            "code.run",
            json!({"language": "python", "code": "1", "timeout_ms": 0}),
        ),
        (
            "code.run",
            json!({"language": "python", "code": "1", "context": [1]}),
        ),
        (
            "code.run",
            json!({"language": "python", "code": "1", "cache": "yes"}),
        ),
        (
            "code.validate",
            json!({"language": "python", "code": "x ="}),
        ),
        (
            "code.validate",
            json!({"language": "python", "code": "1", "timeout_ms": 5}),
        ),
        ("tts.render", json!({"text": "hi"})),
        (
            "tts.render",
            json!({"text": "hi", "voice": "espeak:en-us", "speed": 4.0,
                              "noise_scale": 0, "noise_w": 2, "format": "pcm_s16le",
                              "sample_rate": 8000}),
        ),
        ("tts.render", json!({"text": "   "})),
        ("tts.render", json!({"text": ""})),
        ("tts.render", json!({"text": "hi", "voice": "nope"})),
        ("tts.render", json!({"text": "hi", "speed": 5})),
        ("tts.render", json!({"text": "hi", "format": "mp3"})),
        ("tts.render", json!({"text": "hi", "sample_rate": 7999})),
        ("tts.render", json!({"voice": "espeak:en-us"})),
    ];
    for (kind, input) in samples {
        let schema = &schemas[kind];
        let by_schema = jsonschema::is_valid(schema, &input);
        let r = api.submit(json!({"kind": kind, "input": input})).await;
        assert!(r.status == 202 || r.status == 422, "{r:?}");
        assert_eq!(
            by_schema,
            r.status == 202,
            "{kind} {input}: the schema says {by_schema}, the server {}: {r:?}\n{schema}",
            r.status
        );
    }
}

/// `GET /v1/kinds` publishes each kind's output schema where the output is known, derived from
/// the type the executor builds: a real job of each such kind ends with an output that an
/// independent validator (the `jsonschema` crate) finds valid under it.
#[tokio::test]
async fn each_kinds_output_is_valid_under_its_published_output_schema() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let r = api.get("/v1/kinds").await;
    assert_eq!(r.status, 200, "{r:?}");
    let kinds = r.body["items"].as_array().unwrap().clone();
    let output_schema = |name: &str| {
        kinds
            .iter()
            .find(|k| k["name"] == name)
            .unwrap_or_else(|| panic!("{name} is listed"))
            .get("output_schema")
            .cloned()
    };
    assert_eq!(output_schema("echo"), None, "echo returns its input");
    let jobs = [
        ("sleep", json!({"ms": 5})),
        ("fail", json!({"times": 0})),
        (
            "code.run",
            json!({"language": "python", "code": "result = {'n': 1}"}),
        ),
        (
            "code.run",
            json!({"language": "javascript", "code": "result = 2"}),
        ),
        (
            "code.validate",
            json!({"language": "python", "code": "x ="}),
        ),
        (
            "code.validate",
            json!({"language": "javascript", "code": "1"}),
        ),
        (
            "tts.render",
            json!({"text": "Hi.", "voice": "espeak:en-us"}),
        ),
    ];
    for (kind, input) in jobs {
        let schema = output_schema(kind).unwrap_or_else(|| panic!("{kind} has an output_schema"));
        let id = api.submit_id(json!({"kind": kind, "input": input})).await;
        let job = api.wait_terminal(&id, Duration::from_secs(60)).await;
        assert_eq!(job["status"], "succeeded", "{kind}: {job}");
        let output = &job["output"];
        let errors: Vec<String> = jsonschema::validator_for(&schema)
            .unwrap()
            .iter_errors(output)
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "{kind}: {output} against {schema}: {errors:?}"
        );
    }
}
