//! Tenant isolation in the background loops (docs/security.md, "Background loops, templates
//! and budgets"): a run, a schedule or a trigger call whose data the store refuses, or whose
//! template never finishes, fails alone — another namespace's runs, schedules and trigger calls
//! go on as usual, also across a scheduler restart.
//!
//! "The store refuses" is made real with a Postgres trigger on this test's database that raises
//! `22P05` (the error a NUL character in JSON text gets) for the hostile namespace's rows.

use std::time::{Duration, Instant};

use capibara_tests::{
    eventually, find_free_port,
    runs::{create as create_workflow, ended, start, step},
    Api, TestEnv,
};
use serde_json::{json, Value};

/// A client for namespace `ns` (submit rights).
async fn tenant(admin: &Api, ns: &str) -> Api {
    let r = admin
        .post(
            "/v1/api-keys",
            json!({"name": ns, "roles": ["submit"], "namespace": ns}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    admin.with_key(r.body["key"].as_str().unwrap())
}

/// Make Postgres refuse the rows of `table` (of the hostile namespace) for which `when` (SQL
/// over `NEW`) holds, as it refuses a NUL character.
async fn refuse_hostile(env: &TestEnv, table: &str, when: &str) {
    let pool = env.pool().await;
    sqlx::query(&format!(
        "CREATE FUNCTION refuse_hostile_{table}() RETURNS trigger AS $$
         BEGIN
           IF NEW.namespace = 'hostile' AND ({when}) THEN
             RAISE EXCEPTION 'unsupported Unicode escape sequence' USING ERRCODE = '22P05';
           END IF;
           RETURN NEW;
         END $$ LANGUAGE plpgsql"
    ))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "CREATE TRIGGER refuse_hostile_{table} BEFORE INSERT OR UPDATE ON {table}
         FOR EACH ROW EXECUTE FUNCTION refuse_hostile_{table}()"
    ))
    .execute(&pool)
    .await
    .unwrap();
}

/// The hostile namespace's jobs whose input has `poison` or that a schedule submits.
async fn refuse_hostile_jobs(env: &TestEnv) {
    refuse_hostile(
        env,
        "jobs",
        "NEW.input ? 'poison' OR NEW.tags ? 'schedule_id'",
    )
    .await;
}

/// Two echo steps, the second's input from a template.
fn two_steps(name: &str, second: Value) -> Value {
    json!({"name": name, "steps": [
        {"id": "a", "kind": "echo", "input": {"n": "{{ input.n }}"}},
        {"id": "b", "kind": "echo", "depends_on": ["a"], "input": second},
    ]})
}

/// The other tenant's run, started now, succeeds within `within`.
async fn other_tenant_runs(api: &Api, workflow: &str, within: Duration) {
    let started = Instant::now();
    let run = start(api, workflow, json!({"n": 1})).await;
    let done = ended(api, &run, within).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(started.elapsed() < within);
}

#[tokio::test]
async fn a_poisoned_run_fails_alone_and_other_namespaces_advance_also_after_a_restart() {
    let env = TestEnv::new().await;
    let (_api, _worker, mut scheduler) = env.spawn_all().await;
    refuse_hostile_jobs(&env).await;
    let admin = env.client();
    let hostile = tenant(&admin, "hostile").await;
    let team_b = tenant(&admin, "team-b").await;
    let good = create_workflow(
        &team_b,
        two_steps("good", json!({"x": "{{ steps.a.output.n }}"})),
    )
    .await;

    // A step whose template renders a NUL character: the run fails with a clear error.
    let nul = create_workflow(&hostile, two_steps("nul", json!({"x": "{{ '\\u0000' }}"}))).await;
    let nul_run = start(&hostile, &nul, json!({"n": 1})).await;
    // A step whose job the store refuses (any cause): the run fails with the refusal.
    let refused = create_workflow(
        &hostile,
        two_steps("refused", json!({"poison": "{{ steps.a.output.n }}"})),
    )
    .await;
    let refused_run = start(&hostile, &refused, json!({"n": 1})).await;
    other_tenant_runs(&team_b, &good, Duration::from_secs(15)).await;

    let done = ended(&hostile, &nul_run, Duration::from_secs(15)).await;
    assert_eq!(done["status"], "failed", "{done}");
    let b = step(&done, "b");
    assert_eq!(b["error"]["type"], "invalid_input", "{done}");
    assert_eq!(b["error"]["field"], "input.x", "{done}");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("NUL"),
        "{done}"
    );
    let done = ended(&hostile, &refused_run, Duration::from_secs(15)).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["type"], "store_rejected", "{done}");
    // The first step's job succeeded, and the run shows so: it fails with its facts recorded.
    assert_eq!(step(&done, "a")["status"], "succeeded", "{done}");

    // Another refused run while the scheduler is down: after the restart it fails, and the
    // other tenant's run started after it succeeds.
    assert!(scheduler.terminate(Duration::from_secs(10)));
    let refused_run = start(&hostile, &refused, json!({"n": 2})).await;
    let good_run = start(&team_b, &good, json!({"n": 2})).await;
    let _scheduler = env.spawn_scheduler();
    let done = ended(&team_b, &good_run, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let done = ended(&hostile, &refused_run, Duration::from_secs(15)).await;
    assert_eq!(done["error"]["type"], "store_rejected", "{done}");
    other_tenant_runs(&team_b, &good, Duration::from_secs(15)).await;
}

const NESTED_LOOP: &str =
    "{% for a in range(10000) %}{% for b in range(10000) %}x{% endfor %}{% endfor %}";

#[tokio::test]
async fn templates_over_budget_fail_their_run_or_hook_call_only() {
    let mut env = TestEnv::new().await;
    let port = find_free_port();
    let hooks = format!("http://127.0.0.1:{port}");
    env.extra_env.push((
        "CAPIBARA_SCHEDULER_ADDR".into(),
        format!("127.0.0.1:{port}"),
    ));
    env.extra_env
        .push(("CAPIBARA_HOOKS_PUBLIC_URL".into(), hooks.clone()));
    // A small budget, so that a condition (an expression: no loops) can exceed it too.
    env.extra_env
        .push(("CAPIBARA_TEMPLATE_FUEL".into(), "1000".into()));
    let _procs = env.spawn_all().await;
    capibara_tests::wait_http_ok(&format!("{hooks}/healthz")).await;
    let admin = env.client();
    let hostile = tenant(&admin, "hostile").await;
    let team_b = tenant(&admin, "team-b").await;
    let good = create_workflow(
        &team_b,
        two_steps("good", json!({"x": "{{ steps.a.output.n }}"})),
    )
    .await;

    // A step input (rendered by the orchestrator), a first step's input (rendered by the API
    // when the run starts) and a condition.
    let started = Instant::now();
    let looped_input =
        create_workflow(&hostile, two_steps("input", json!({"x": NESTED_LOOP}))).await;
    let run = start(&hostile, &looped_input, json!({"n": 1})).await;
    let first = create_workflow(
        &hostile,
        json!({"name": "first", "steps": [{"id": "a", "kind": "echo", "input": {"x": NESTED_LOOP}}]}),
    )
    .await;
    let first_run = start(&hostile, &first, json!({})).await;
    // A variable, so that the compiler cannot fold the sum into a constant.
    let cond = format!("input.n{} > 0", " + input.n".repeat(600));
    let conditioned = create_workflow(
        &hostile,
        json!({"name": "when", "steps": [
            {"id": "a", "kind": "echo"},
            {"id": "b", "kind": "echo", "depends_on": ["a"], "when": cond}]}),
    )
    .await;
    let cond_run = start(&hostile, &conditioned, json!({"n": 1})).await;
    other_tenant_runs(&team_b, &good, Duration::from_secs(15)).await;
    for (run, step_id, kind) in [
        (&run, "b", "template_error"),
        (&first_run, "a", "template_error"),
        (&cond_run, "b", "condition_error"),
    ] {
        let done = ended(&hostile, run, Duration::from_secs(15)).await;
        assert_eq!(done["status"], "failed", "{done}");
        let e = &step(&done, step_id)["error"];
        assert_eq!(e["type"], kind, "{done}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("CAPIBARA_TEMPLATE_FUEL"),
            "{done}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(30));

    // A trigger's input mapping: that call is refused at once; another tenant's call works.
    let trigger = |api: Api, input: Value| async move {
        let r = api
            .post(
                "/v1/triggers",
                json!({"name": "t", "auth": {"type": "bearer", "token": "a-long-enough-token-123"},
                       "target": {"type": "job", "job": {"kind": "echo"}}, "input": input}),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        r.body["url"].as_str().unwrap().to_string()
    };
    let bad = trigger(hostile.clone(), json!({"x": NESTED_LOOP})).await;
    let fine = trigger(team_b.clone(), json!({"x": "{{ body.n }}"})).await;
    let http = reqwest::Client::new();
    let call = |url: String| {
        http.post(url)
            .bearer_auth("a-long-enough-token-123")
            .json(&json!({"n": 3}))
            .send()
    };
    let t = Instant::now();
    let (bad_r, fine_r) = tokio::join!(call(bad), call(fine));
    let bad_r = bad_r.unwrap();
    assert_eq!(bad_r.status(), 422);
    let body: Value = bad_r.json().await.unwrap();
    assert!(
        body.to_string().contains("CAPIBARA_TEMPLATE_FUEL"),
        "{body}"
    );
    let fine_r = fine_r.unwrap();
    assert_eq!(fine_r.status(), 202);
    assert!(t.elapsed() < Duration::from_secs(5));
    let accepted: Value = fine_r.json().await.unwrap();
    let job = team_b
        .wait_terminal(
            accepted["job_id"].as_str().unwrap(),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(job["output"], json!({"x": 3}));
}

#[tokio::test]
async fn rendered_step_inputs_are_validated_like_submitted_ones() {
    let mut env = TestEnv::new().await;
    // A render budget above the input limit, so the input limit is what stops the 2 MB input.
    env.extra_env.push((
        "CAPIBARA_TEMPLATE_OUTPUT_LIMIT_BYTES".into(),
        (50 * 1024 * 1024).to_string(),
    ));
    let _procs = env.spawn_all().await;
    let api = env.client();
    let memory = create_workflow(
        &api,
        json!({"name": "memory", "steps": [
            {"id": "a", "kind": "echo", "input": {"mb": "{{ input.mb }}"}},
            {"id": "b", "kind": "code.run", "depends_on": ["a"], "input": {
                "language": "python", "code": "1", "memory_mb": "{{ steps.a.output.mb }}"}}]}),
    )
    .await;
    let done = ended(
        &api,
        &start(&api, &memory, json!({"mb": 3000})).await,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(done["status"], "failed", "{done}");
    let e = &step(&done, "b")["error"];
    assert_eq!(e["type"], "invalid_input", "{done}");
    assert_eq!(e["field"], "input.memory_mb", "{done}");

    let sleep = create_workflow(
        &api,
        json!({"name": "sleep", "steps": [{"id": "a", "kind": "sleep", "input": {"ms": "{{ input.ms }}"}}]}),
    )
    .await;
    let done = ended(
        &api,
        &start(&api, &sleep, json!({"ms": 10_000_000_000u64})).await,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(step(&done, "a")["error"]["field"], "input.ms", "{done}");

    let big = create_workflow(
        &api,
        json!({"name": "big", "steps": [
            {"id": "a", "kind": "echo"},
            {"id": "b", "kind": "echo", "depends_on": ["a"], "input": {"s": "{{ 'x' * 2000000 }}"}}]}),
    )
    .await;
    let done = ended(
        &api,
        &start(&api, &big, json!({})).await,
        Duration::from_secs(15),
    )
    .await;
    let e = &step(&done, "b")["error"];
    assert_eq!(e["type"], "invalid_input", "{done}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("CAPIBARA_INPUT_LIMIT_BYTES"),
        "{done}"
    );
    // No job was submitted for any of them.
    let pool = env.pool().await;
    let (n,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM jobs WHERE kind IN ('code.run', 'sleep') OR input ? 's'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(n, 0);
    // Another namespace's templated runs go on as usual.
    let team_b = tenant(&api, "team-b").await;
    let good = create_workflow(
        &team_b,
        two_steps("good", json!({"x": "{{ steps.a.output.n }}"})),
    )
    .await;
    other_tenant_runs(&team_b, &good, Duration::from_secs(15)).await;
}

#[tokio::test]
async fn schedules_whose_ticks_are_refused_do_not_stop_another_namespaces_schedule() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let _worker = env.spawn_worker(&[]);
    refuse_hostile_jobs(&env).await;
    let admin = env.client();
    let hostile = tenant(&admin, "hostile").await;
    let team_b = tenant(&admin, "team-b").await;
    // More hostile schedules than the ticker reads in one pass, all due before the other one.
    let mut ids = Vec::new();
    for i in 0..505 {
        let r = hostile
            .post(
                "/v1/schedules",
                json!({"name": format!("h{i}"), "cron": "* * * * * *",
                       "target": {"type": "job", "job": {"kind": "echo"}}}),
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        ids.push(r.body["id"].as_str().unwrap().to_string());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = team_b
        .post(
            "/v1/schedules",
            json!({"name": "b", "cron": "* * * * * *",
                   "target": {"type": "job", "job": {"kind": "echo", "input": {"tick": true}}}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let started = Instant::now();
    let _scheduler = env.spawn_scheduler();
    let pool = env.pool().await;
    eventually("the other namespace's schedule to fire", Duration::from_secs(20), || async {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM jobs WHERE namespace = 'team-b' AND tags ? 'schedule_id' AND status = 'succeeded'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        (n >= 2).then_some(())
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(20));
    // Each refused schedule recorded why and stopped.
    let h = hostile.get(&format!("/v1/schedules/{}", ids[0])).await;
    assert_eq!(h.body["status"], "paused", "{h:?}");
    let (reason,): (String,) = sqlx::query_as(
        "SELECT data->>'reason' FROM events WHERE stream_id = $1::uuid AND type = 'TickSkipped'",
    )
    .bind(&ids[0])
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(reason.starts_with("store_rejected"), "{reason}");
}

/// The hostile namespace's new deliveries (those not already recorded as failed).
async fn refuse_hostile_deliveries(env: &TestEnv) {
    refuse_hostile(env, "deliveries", "NEW.status <> 'failed'").await;
}

/// The deliverer commits a page of deliveries with its checkpoint: one tenant's delivery that
/// the store refuses is recorded as failed (`store_rejected`), and the other tenant's callbacks
/// on the same page and after it are delivered.
#[tokio::test]
async fn a_refused_delivery_fails_alone_and_other_namespaces_callbacks_arrive() {
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_WEBHOOK_SECRET".into(), SECRET.into()));
    env.extra_env
        .push(("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()));
    let _procs = env.spawn_all().await;
    refuse_hostile_deliveries(&env).await;
    let admin = env.client();
    let (hostile, team_b) = (
        tenant(&admin, "hostile").await,
        tenant(&admin, "team-b").await,
    );
    let receiver = capibara_tests::receiver::Receiver::start(&[SECRET], Default::default());
    let hook = format!("{}/hook", receiver.url);
    let submit = |api: &Api, n: u32| {
        let body = json!({"kind": "echo", "input": {"n": n}, "callback_url": hook});
        let api = api.clone();
        async move { api.submit_id(body).await }
    };
    // Interleaved, so that the two tenants' deliveries share pages.
    let mut hostile_jobs = Vec::new();
    let mut b_jobs = Vec::new();
    for n in 0..5 {
        hostile_jobs.push(submit(&hostile, n).await);
        b_jobs.push(submit(&team_b, n).await);
    }
    let delivered = |jobs: Vec<String>| {
        let receiver = &receiver;
        async move {
            eventually("team-b's callbacks", Duration::from_secs(30), || async {
                let got: Vec<String> = receiver
                    .requests()
                    .iter()
                    .filter_map(|r| r["body"]["data"]["id"].as_str().map(str::to_string))
                    .collect();
                jobs.iter().all(|j| got.contains(j)).then_some(got)
            })
            .await
        }
    };
    let got = delivered(b_jobs.clone()).await;
    for j in &hostile_jobs {
        assert!(!got.contains(j), "a refused delivery was sent");
    }
    // The refused ones are recorded as failed, with why.
    for j in &hostile_jobs {
        let d = eventually("the refusal recorded", Duration::from_secs(30), || async {
            let r = hostile.get(&format!("/v1/deliveries?job_id={j}")).await;
            let items = r.body["items"].as_array().cloned().unwrap_or_default();
            items.into_iter().find(|d| d["status"] == "failed")
        })
        .await;
        assert!(
            d["last_error"]
                .as_str()
                .unwrap_or_default()
                .starts_with("store_rejected"),
            "{d}"
        );
    }
    // The deliverer moved on: later callbacks of the other tenant still arrive.
    let later = submit(&team_b, 99).await;
    delivered(vec![later]).await;
}
