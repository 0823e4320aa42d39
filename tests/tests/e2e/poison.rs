//! Poison values — a NUL character, a time Postgres cannot store — are refused at the edge with
//! a 422 naming the field, and one tenant sending them does not disturb another
//! (docs/security.md, "Poison values and write isolation").

use std::time::{Duration, Instant};

use capibara_shared::domain::storable::{
    check_json, check_text, check_time, find_nul, max_time, min_time, serde_time, time_ok,
};
use capibara_tests::{eventually, Api, Res, TestEnv};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

fn assert_refused(r: &Res, field: &str) {
    assert_eq!(r.status, 422, "{field}: {r:?}");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/problem+json")
    );
    assert_eq!(r.body["errors"][0]["field"], field, "{r:?}");
}

async fn post_yaml(api: &Api, path: &str, yaml: &str) -> Res {
    api.send(
        api.http
            .post(api.url(path))
            .header("content-type", "application/yaml")
            .body(yaml.to_string()),
    )
    .await
}

/// A key of its own namespace.
async fn tenant(admin: &Api, namespace: &str) -> Api {
    let r = admin
        .post(
            "/v1/api-keys",
            json!({"name": namespace, "roles": ["read", "submit"], "namespace": namespace}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    admin.with_key(r.body["key"].as_str().unwrap())
}

const NUL: &str = "x\u{0}y";

#[tokio::test]
async fn nul_characters_and_unstorable_times_are_refused_with_422_naming_the_field() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();

    // NUL in stored JSON, at any depth, in a value or a key.
    let r = api
        .submit(json!({"kind": "echo", "input": {"a": [0, 1, {"b": NUL}]}}))
        .await;
    assert_refused(&r, "input.a[2].b");
    assert!(r.body["detail"].as_str().unwrap().contains("NUL"), "{r:?}");
    assert_refused(
        &api.submit(json!({"kind": "echo", "input": {NUL: 1}})).await,
        "input.x\\0y",
    );
    assert_refused(
        &api.submit(json!({"kind": "echo", "tags": {"team": NUL}}))
            .await,
        "tags.team",
    );
    assert_refused(
        &api.post(
            "/v1/jobs/batch",
            json!({"jobs": [{"kind": "echo"}, {"kind": "echo", "input": {"s": NUL}}]}),
        )
        .await,
        "jobs[1].input.s",
    );
    assert_refused(
        &api.post(
            "/v1/schedules",
            json!({"name": "s", "cron": "* * * * *",
                   "target": {"type": "job", "job": {"kind": "echo", "input": {"x": [NUL]}}}}),
        )
        .await,
        "target.job.input.x[0]",
    );
    assert_refused(
        &api.post(
            "/v1/workflows",
            json!({"name": "w", "steps": [{"id": "a", "kind": "echo", "input": {"t": NUL}}]}),
        )
        .await,
        "steps[0].input.t",
    );
    assert_refused(
        &post_yaml(
            &api,
            "/v1/workflows",
            "name: w\nsteps:\n  - id: a\n    kind: echo\n    input: {t: \"x\\0y\"}\n",
        )
        .await,
        "steps[0].input.t",
    );
    // Query parameters reach SQL too.
    assert_refused(&api.get("/v1/jobs?tag=team:x%00y").await, "tag");

    // Times outside 0001-01-01 .. 9999-12-31 (UTC).
    for run_at in [
        "-200000-01-01T00:00:00Z",
        "+200000-01-01T00:00:00Z",
        "9999-12-31T23:00:00-05:00",
    ] {
        assert_refused(
            &api.submit(json!({"kind": "echo", "run_at": run_at})).await,
            "run_at",
        );
    }
    assert_refused(
        &api.post(
            "/v1/jobs/batch",
            json!({"jobs": [{"kind": "echo", "run_at": "-200000-01-01T00:00:00Z"}]}),
        )
        .await,
        "jobs[0].run_at",
    );
    let schedule = |extra: Value| {
        let mut body = json!({"name": "s", "cron": "* * * * *",
                              "target": {"type": "job", "job": {"kind": "echo"}}});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    assert_refused(
        &api.post(
            "/v1/schedules",
            schedule(json!({"start_at": "+100000-01-01T00:00:00Z"})),
        )
        .await,
        "start_at",
    );
    assert_refused(
        &api.post(
            "/v1/schedules",
            schedule(json!({"end_at": "-4714-11-24T00:00:00Z"})),
        )
        .await,
        "end_at",
    );
    assert_refused(
        &api.post(
            "/v1/schedules",
            schedule(json!({"target": {"type": "job",
                "job": {"kind": "echo", "run_at": "+100000-01-01T00:00:00Z"}}})),
        )
        .await,
        "target.job.run_at",
    );

    // The edge of the range is fine.
    let r = api
        .submit(json!({"kind": "echo", "run_at": "9999-12-31T23:59:59Z"}))
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.body["status"], "scheduled");
    let r = api
        .post(
            "/v1/schedules",
            schedule(json!({"start_at": "9999-12-31T23:58:00Z"})),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["start_at"], "9999-12-31T23:58:00Z");
}

/// One namespace floods the API with poison while another submits 160 jobs, runs a schedule and
/// a workflow: every poison request is a 422 (never a 503), and the other tenant's work all
/// goes through.
#[tokio::test]
async fn a_tenant_sending_poison_does_not_disturb_another() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let admin = env.client();
    let hostile = tenant(&admin, "hostile").await;
    let victim = tenant(&admin, "victim").await;

    let r = victim
        .post(
            "/v1/schedules",
            json!({"name": "every second", "cron": "* * * * * *", "overlap": "allow",
                   "target": {"type": "job", "job": {"kind": "echo", "input": {"tick": true}}}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let schedule = r.body["id"].as_str().unwrap().to_string();
    let r = victim
        .post(
            "/v1/workflows",
            json!({"name": "w", "steps": [{"id": "a", "kind": "echo", "input": {"v": 1}}]}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let workflow = r.body["id"].as_str().unwrap().to_string();

    let poison: Vec<(&str, Value)> = vec![
        (
            "/v1/jobs",
            json!({"kind": "echo", "input": {"a": [{"b": NUL}]}}),
        ),
        ("/v1/jobs", json!({"kind": "echo", "tags": {"t": NUL}})),
        (
            "/v1/jobs",
            json!({"kind": "echo", "run_at": "-200000-01-01T00:00:00Z"}),
        ),
        (
            "/v1/jobs/batch",
            json!({"jobs": [{"kind": "echo"}, {"kind": "echo", "input": {NUL: 1}}]}),
        ),
        (
            "/v1/schedules",
            json!({"name": "s", "cron": "* * * * * *", "start_at": "+100000-01-01T00:00:00Z",
                   "target": {"type": "job", "job": {"kind": "echo"}}}),
        ),
        (
            "/v1/workflows",
            json!({"name": NUL, "steps": [{"id": "a", "kind": "echo"}]}),
        ),
    ];
    let flood = {
        let hostile = hostile.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for round in 0..40 {
                let sends = poison
                    .iter()
                    .map(|(path, body)| hostile.post(path, body.clone()));
                for r in futures::future::join_all(sends).await {
                    statuses.push(r.status);
                }
                if round % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            statuses
        })
    };

    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut ids = Vec::new();
    for chunk in 0..10 {
        let sends = (0..16).map(|i| {
            let victim = victim.clone();
            async move {
                let t = Instant::now();
                let r = victim
                    .submit(json!({"kind": "echo", "input": {"n": chunk * 16 + i}}))
                    .await;
                (r, t.elapsed())
            }
        });
        for (r, took) in futures::future::join_all(sends).await {
            assert_eq!(r.status, 202, "a victim submission failed: {r:?}");
            ids.push(r.body["id"].as_str().unwrap().to_string());
            latencies.push(took);
        }
    }
    let run = victim
        .post(&format!("/v1/workflows/{workflow}/runs"), json!({}))
        .await;
    assert!(run.status == 201 || run.status == 202, "{run:?}");

    let statuses = flood.await.unwrap();
    assert_eq!(statuses.len(), 240);
    assert!(
        statuses.iter().all(|s| *s == 422),
        "every poison request is a 422: {statuses:?}"
    );
    assert_eq!(ids.len(), 160);
    latencies.sort();
    eprintln!(
        "victim submissions during the flood: p50 {:?}, max {:?}, all 160 in {:?}",
        latencies[80],
        latencies[159],
        started.elapsed()
    );
    for id in &ids {
        let job = victim.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    let run_id = run.body["id"].as_str().unwrap().to_string();
    eventually("the victim's run succeeds", Duration::from_secs(60), || {
        let victim = victim.clone();
        let path = format!("/v1/runs/{run_id}");
        async move {
            let r = victim.get(&path).await;
            (r.body["status"] == "succeeded").then_some(())
        }
    })
    .await;
    eventually(
        "the victim's schedule keeps firing",
        Duration::from_secs(30),
        || {
            let victim = victim.clone();
            let path = format!("/v1/jobs?tag=schedule_id:{schedule}&limit=500");
            async move {
                let r = victim.get(&path).await;
                let fired = r.body["items"].as_array().map_or(0, Vec::len);
                (fired >= 3).then_some(())
            }
        },
    )
    .await;
    // Nothing of the hostile tenant's was stored.
    let r = hostile.get("/v1/jobs?limit=500").await;
    assert_eq!(r.body["items"], json!([]), "{r:?}");
}

// The rules themselves (shared/src/domain/storable.rs), without a server.

#[test]
fn finds_nul_in_strings_and_keys_at_any_depth() {
    assert_eq!(find_nul(&json!({"a": [1, "x", {"b": "c"}]})), None);
    assert_eq!(
        find_nul(&json!({"a": [1, "x", {"b": "c\u{0}"}]})),
        Some("a[2].b".into())
    );
    assert_eq!(find_nul(&json!([[0, "\u{0}"]])), Some("[0][1]".into()));
    assert_eq!(find_nul(&json!("\u{0}")), Some(String::new()));
    assert_eq!(
        find_nul(&json!({"k": {"x\u{0}y": 1}})),
        Some("k.x\\0y".into())
    );
    let long = format!("{}\u{0}", "k".repeat(100));
    let path = find_nul(&json!({ long: 1 })).unwrap();
    assert_eq!(path, format!("{}…", "k".repeat(64)));
    assert!(!path.contains('\0'));
}

#[test]
fn check_json_names_the_path_under_the_field() {
    let e = check_json("input", &json!({"a": [0, 1, {"b": "\u{0}"}]})).unwrap_err();
    assert_eq!(e.field, "input.a[2].b");
    assert!(e.message.contains("NUL"));
    assert_eq!(
        check_json("input", &json!("\u{0}")).unwrap_err().field,
        "input"
    );
    assert_eq!(
        check_json("", &json!({"a": "\u{0}"})).unwrap_err().field,
        "a"
    );
    assert!(check_json("input", &json!({"a": "ok"})).is_ok());
    assert!(check_text("name", "a\u{0}").is_err());
}

#[test]
fn the_storable_range_is_rfc_3339s_four_digit_years() {
    assert!(time_ok(min_time()));
    assert!(time_ok(max_time()));
    assert!(!time_ok(min_time() - chrono::Duration::microseconds(1)));
    assert!(!time_ok(max_time() + chrono::Duration::microseconds(1)));
    // What chrono accepts and writes back as text Postgres does not parse.
    let far: DateTime<Utc> = "+200000-01-01T00:00:00Z".parse().unwrap();
    assert!(!time_ok(far));
    assert_eq!(check_time("run_at", far).unwrap_err().field, "run_at");
    #[derive(serde::Deserialize)]
    struct B {
        #[serde(default, deserialize_with = "serde_time::optional")]
        at: Option<DateTime<Utc>>,
    }
    assert!(serde_json::from_value::<B>(json!({"at": "-200000-01-01T00:00:00Z"})).is_err());
    assert!(serde_json::from_value::<B>(json!({"at": "9999-12-31T23:00:00-05:00"})).is_err());
    assert!(serde_json::from_value::<B>(json!({"at": null}))
        .unwrap()
        .at
        .is_none());
    assert!(serde_json::from_value::<B>(json!({})).unwrap().at.is_none());
    assert!(
        serde_json::from_value::<B>(json!({"at": "2030-01-01T00:00:00Z"}))
            .unwrap()
            .at
            .is_some()
    );
}
