//! `POST /v1/orchestrate`'s modes against the real binaries: the seed's `agent`, `flow`, `mcp`
//! and `auto` with the seed's answer (`status: success | error | accepted`, `mode`,
//! `duration_ms`, `job_id`, `message`), the existing answer kept for requests without a seed
//! mode, and dangerous intents as dry runs unless confirmed (docs/orchestrate-design.md).

use capibara_tests::{runs as workflows, Api, TestEnv};
use serde_json::{json, Value};

async fn orchestrate(api: &Api, body: Value) -> (u16, Value) {
    let r = api.post("/v1/orchestrate", body).await;
    (r.status, r.body)
}

async fn put(api: &Api, path: &str, body: Value) {
    let r = api.send(api.http.put(api.url(path)).json(&body)).await;
    assert!(r.status < 300, "{path}: {r:?}");
}

/// The jobs of `kind` this namespace holds.
async fn jobs_of(api: &Api, kind: &str) -> Vec<Value> {
    let r = api.get(&format!("/v1/jobs?kind={kind}")).await;
    assert_eq!(r.status, 200, "{r:?}");
    r.body["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn orchestrate_runs_agents_flows_and_mcp_tools_and_dry_runs_dangerous_intents() {
    let mut env = TestEnv::new().await;
    env.extra_env.extend([
        // Long enough for `fail`'s three attempts (backoff 1 s, 2 s).
        ("CAPIBARA_ORCHESTRATE_WAIT_S".into(), "10".into()),
        ("CAPIBARA_ORCHESTRATE_DANGEROUS".into(), "ssh.*".into()),
        // mcp.call reaches this API's own /mcp on loopback.
        ("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()),
    ]);
    let _procs = env.spawn_all().await;
    let api = env.client();

    // agent: a job kind, answered in the seed's shape.
    let (code, a) = orchestrate(
        &api,
        json!({"intent": "echo", "inputs": {"q": "hi"}, "mode": "agent"}),
    )
    .await;
    assert_eq!(code, 200, "{a}");
    assert_eq!(a["status"], "success", "{a}");
    assert_eq!(a["mode"], "agent");
    assert_eq!(a["job_status"], "succeeded");
    assert_eq!(a["result"], json!({"q": "hi"}));
    assert!(a["job_id"].is_string() && a["duration_ms"].is_u64(), "{a}");
    assert_eq!(a["message"], "`echo` succeeded");
    // A failure is `error`, with the job's error in the message.
    let (code, f) = orchestrate(
        &api,
        json!({"intent": "fail", "inputs": {"message": "boom"}, "mode": "agent"}),
    )
    .await;
    assert_eq!(code, 200, "{f}");
    assert_eq!(f["status"], "error", "{f}");
    assert_eq!(f["job_status"], "failed");
    assert!(f["message"].as_str().unwrap().contains("boom"), "{f}");
    // Still running at the limit: `accepted`, 202, where to poll.
    let (code, s) = orchestrate(
        &api,
        json!({"intent": "sleep", "inputs": {"ms": 30000}, "mode": "auto"}),
    )
    .await;
    assert_eq!(code, 202, "{s}");
    assert_eq!(
        (&s["status"], &s["mode"]),
        (&json!("accepted"), &json!("agent"))
    );
    assert!(s["message"].as_str().unwrap().contains("/v1/jobs/"), "{s}");

    // Without a seed mode the existing answer is kept (status is the job's own), with the
    // seed's fields added.
    let (code, e) = orchestrate(&api, json!({"intent": "echo", "inputs": {"q": "old"}})).await;
    assert_eq!(code, 200, "{e}");
    assert_eq!(e["status"], "succeeded", "{e}");
    assert_eq!(e["mode"], "agent");
    assert_eq!(
        e["location"],
        format!("/v1/jobs/{}", e["job_id"].as_str().unwrap())
    );

    // flow: a workflow; auto picks flow for a workflow's name and says so.
    workflows::create(
        &api,
        json!({"name": "greet", "steps": [
            {"id": "say", "kind": "echo", "input": {"hello": "{{ input.name }}"}}]}),
    )
    .await;
    let (code, w) = orchestrate(
        &api,
        json!({"intent": "greet", "inputs": {"name": "ada"}, "mode": "flow"}),
    )
    .await;
    assert_eq!(code, 200, "{w}");
    assert_eq!(
        (&w["status"], &w["mode"]),
        (&json!("success"), &json!("flow")),
        "{w}"
    );
    assert_eq!(w["result"]["say"], json!({"hello": "ada"}), "{w}");
    assert!(w["run_id"].is_string() && w.get("job_id").is_none(), "{w}");
    let (_, w2) = orchestrate(
        &api,
        json!({"intent": "workflow:greet", "inputs": {"name": "bob"}, "mode": "auto"}),
    )
    .await;
    assert_eq!(
        (&w2["status"], &w2["mode"]),
        (&json!("success"), &json!("flow")),
        "{w2}"
    );
    // A run's input is checked against the workflow's input_schema; errors name `inputs.…`.
    workflows::create(
        &api,
        json!({"name": "typed", "input_schema": {"type": "object", "required": ["n"],
                  "properties": {"n": {"type": "integer"}}},
               "steps": [{"id": "a", "kind": "echo", "input": {"n": "{{ input.n }}"}}]}),
    )
    .await;
    let (code, p) = orchestrate(
        &api,
        json!({"intent": "typed", "inputs": {"n": "x"}, "mode": "flow"}),
    )
    .await;
    assert_eq!(
        (code, &p["errors"][0]["field"]),
        (422, &json!("inputs.n")),
        "{p}"
    );
    // A mode insists on its sort of intent.
    let (code, p) = orchestrate(&api, json!({"intent": "greet", "mode": "agent"})).await;
    assert_eq!(code, 422, "{p}");
    assert_eq!(p["errors"][0]["field"], "intent", "{p}");
    assert!(
        p["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("mode flow"),
        "{p}"
    );
    let (code, p) = orchestrate(&api, json!({"intent": "echo", "mode": "flow"})).await;
    assert_eq!(code, 422, "{p}");
    assert!(
        p["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("job kind"),
        "{p}"
    );
    let (code, p) = orchestrate(&api, json!({"intent": "nope", "mode": "auto"})).await;
    assert_eq!(
        (code, &p["errors"][0]["field"]),
        (422, &json!("intent")),
        "{p}"
    );
    let (code, p) = orchestrate(&api, json!({"intent": "echo", "mode": "fast"})).await;
    assert_eq!(
        (code, &p["errors"][0]["field"]),
        (422, &json!("mode")),
        "{p}"
    );

    // mcp: a tool on an MCP server (this API's own /mcp, reached by mcp.call with a key from a
    // secret); auto picks mcp when the body names a server.
    put(&api, "/v1/secrets/CAPIBARA_KEY", json!({"value": api.key})).await;
    let server = json!({"server": api.url("/mcp"),
                        "auth": {"type": "bearer", "secret": "CAPIBARA_KEY"}});
    let (code, m) = orchestrate(
        &api,
        json!({"intent": "echo", "inputs": {"via": "mcp"}, "mode": "mcp", "mcp": server}),
    )
    .await;
    assert_eq!(code, 200, "{m}");
    assert_eq!(
        (&m["status"], &m["mode"]),
        (&json!("success"), &json!("mcp")),
        "{m}"
    );
    assert_eq!(m["job"]["kind"], "mcp.call", "{m}");
    assert_eq!(m["job"]["input"]["tool"], "echo");
    assert_eq!(m["result"]["isError"], false, "{m}");
    assert!(m["result"].to_string().contains("via"), "{m}");
    let (_, m2) = orchestrate(
        &api,
        json!({"intent": "echo", "inputs": {"via": "auto"}, "mode": "auto", "mcp": server}),
    )
    .await;
    assert_eq!(
        (&m2["status"], &m2["mode"]),
        (&json!("success"), &json!("mcp")),
        "{m2}"
    );
    let (code, p) = orchestrate(&api, json!({"intent": "echo", "mode": "mcp"})).await;
    assert_eq!(
        (code, &p["errors"][0]["field"]),
        (422, &json!("mcp")),
        "{p}"
    );
    let (code, p) = orchestrate(
        &api,
        json!({"intent": "echo", "mode": "mcp", "mcp": {"server": "ftp://x", "tool": "t"}}),
    )
    .await;
    assert_eq!(
        (code, &p["errors"][0]["field"]),
        (422, &json!("mcp.tool")),
        "{p}"
    );
    let (code, p) = orchestrate(
        &api,
        json!({"intent": "echo", "mode": "mcp", "mcp": {"server": "ftp://x"}}),
    )
    .await;
    assert_eq!(
        (code, &p["errors"][0]["field"]),
        (422, &json!("mcp.server")),
        "{p}"
    );
    let (code, p) = orchestrate(
        &api,
        json!({"intent": "echo", "mode": "agent", "mcp": server}),
    )
    .await;
    assert_eq!(
        (code, &p["errors"][0]["field"]),
        (422, &json!("mcp")),
        "{p}"
    );

    // Dangerous intents: a kind marked dangerous, a workflow with such a step, and a tool whose
    // name matches CAPIBARA_ORCHESTRATE_DANGEROUS run dry unless confirmed.
    put(
        &api,
        "/v1/kinds/deploy.prod",
        json!({"dangerous": true, "input_schema": {"type": "object", "required": ["version"]}}),
    )
    .await;
    let kind = api.get("/v1/kinds/deploy.prod").await;
    assert_eq!(kind.body["dangerous"], true, "{kind:?}");
    let echo = api.get("/v1/kinds/echo").await;
    assert_eq!(echo.body["dangerous"], false, "{echo:?}");
    let (code, d) = orchestrate(
        &api,
        json!({"intent": "deploy.prod", "inputs": {"version": "1.2"}, "mode": "agent"}),
    )
    .await;
    assert_eq!(code, 200, "{d}");
    assert_eq!(
        (&d["status"], &d["mode"]),
        (&json!("dry_run"), &json!("agent")),
        "{d}"
    );
    assert!(
        d["message"].as_str().unwrap().contains("confirm_dangerous"),
        "{d}"
    );
    assert_eq!(
        d["plan"],
        json!({"kind": "deploy.prod", "input": {"version": "1.2"}})
    );
    assert!(
        d.get("job_id").is_none() && d.get("location").is_none(),
        "{d}"
    );
    // The dry run checks the input as a real request would.
    let (code, p) = orchestrate(&api, json!({"intent": "deploy.prod", "mode": "agent"})).await;
    assert_eq!(code, 422, "{p}");
    assert!(
        p["errors"][0]["field"]
            .as_str()
            .unwrap()
            .starts_with("inputs"),
        "{p}"
    );
    assert!(
        jobs_of(&api, "deploy.prod").await.is_empty(),
        "a dry run appends nothing"
    );
    // Confirmed, it runs (no worker serves the kind here, so it is accepted).
    let (code, c) = orchestrate(
        &api,
        json!({"intent": "deploy.prod", "inputs": {"version": "1.2"}, "mode": "agent",
               "confirm_dangerous": true}),
    )
    .await;
    assert_eq!(code, 202, "{c}");
    assert_eq!(c["status"], "accepted", "{c}");
    assert_eq!(jobs_of(&api, "deploy.prod").await.len(), 1);

    let release = workflows::create(
        &api,
        json!({"name": "release", "steps": [
            {"id": "ship", "kind": "deploy.prod", "input": {"version": "{{ input.v }}"}}]}),
    )
    .await;
    let (code, d) = orchestrate(&api, json!({"intent": "release", "inputs": {"v": "2"}})).await;
    assert_eq!(code, 200, "{d}");
    assert_eq!(
        (&d["status"], &d["mode"]),
        (&json!("dry_run"), &json!("flow")),
        "{d}"
    );
    assert_eq!(d["plan"]["workflow"], "release");
    let runs = api.get(&format!("/v1/runs?workflow_id={release}")).await;
    assert_eq!(
        runs.body["items"],
        json!([]),
        "a dry run starts no run: {runs:?}"
    );

    let (code, d) = orchestrate(
        &api,
        json!({"intent": "ssh.exec", "inputs": {"cmd": "rm -rf /"}, "mode": "mcp", "mcp": server}),
    )
    .await;
    assert_eq!(code, 200, "{d}");
    assert_eq!(
        (&d["status"], &d["mode"]),
        (&json!("dry_run"), &json!("mcp")),
        "{d}"
    );
    assert_eq!(d["plan"]["tool"], "ssh.exec");
    assert_eq!(d["plan"]["arguments"], json!({"cmd": "rm -rf /"}));
    assert!(jobs_of(&api, "mcp.call")
        .await
        .iter()
        .all(|j| j["input"]["tool"] != "ssh.exec"));
}
