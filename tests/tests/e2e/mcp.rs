//! MCP (docs/mcp.md), with the official MCP SDK from PyPI (`mcp`, deploy/test.sh installs it
//! into target/capibara-test/agents): its client against the running `/mcp` server (tools
//! from kinds and workflows, a call's result, progress notifications, a handle past the wait
//! read back as a resource, roles, 401), and `mcp.call` against a server written with the
//! SDK's `MCPServer` on loopback (a result with the server's progress, a tool that errors).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use capibara_tests::{find_free_port, runs, TestEnv};
use serde_json::{json, Value};

/// The Python of the venv deploy/test.sh makes with the MCP SDK.
fn python() -> PathBuf {
    let path = std::env::var_os("CAPIBARA_TEST_AGENTS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/capibara-test/agents")
        })
        .join("bin/python");
    assert!(
        path.exists(),
        "{} is missing: deploy/test.sh installs the MCP SDK (`mcp`) from PyPI there",
        path.display()
    );
    path
}

fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("capibara-mcp-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A client session of the SDK: runs the steps the test asserts on and prints one JSON object.
const CLIENT: &str = r#"
import asyncio, json, sys, httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

url, key, read_key = sys.argv[1], sys.argv[2], sys.argv[3]

def dump(result):
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)

async def session(k, steps):
    client = httpx2.AsyncClient(headers={"Authorization": "Bearer " + k}, timeout=60)
    async with client:
        async with streamable_http_client(url, http_client=client) as (r, w):
            async with ClientSession(r, w) as s:
                init = await s.initialize()
                return init, await steps(s)

async def full(s):
    out = {}
    tools = await s.list_tools()
    out["tools"] = {t.name: t.input_schema for t in tools.tools}
    out["echo"] = dump(await s.call_tool("echo", {"msg": "hi"}))
    out["workflow"] = dump(await s.call_tool("workflow.double", {"n": 21}))
    out["invalid"] = dump(await s.call_tool("sleep", {"ms": "soon"}))
    progress = []
    async def on_progress(p, total, message):
        progress.append([p, total, message])
    out["slept"] = dump(await s.call_tool("sleep", {"ms": 2500, "progress_ms": 300},
                                          progress_callback=on_progress))
    out["progress"] = progress
    handle = dump(await s.call_tool("sleep", {"ms": 2000}, meta={"capibara/wait_s": 0.2}))
    out["handle"] = handle
    await asyncio.sleep(4)
    link = [c for c in handle["content"] if c["type"] == "resource_link"][0]
    out["read"] = dump(await s.read_resource(link["uri"]))
    out["templates"] = [t.uri_template for t in (await s.list_resource_templates()).resource_templates]
    out["resources"] = [r.uri for r in (await s.list_resources()).resources]
    try:
        await s.read_resource("capibara://jobs/00000000-0000-7000-8000-000000000000")
        out["missing"] = None
    except MCPError as e:
        out["missing"] = e.error.code
    return out

async def read_only(s):
    out = {"tools": len((await s.list_tools()).tools)}
    try:
        await s.call_tool("echo", {"msg": "no"})
        out["call"] = "allowed"
    except MCPError as e:
        out["call"] = e.error.code
    return out

async def main():
    init, out = await session(key, full)
    out["protocol"] = init.protocol_version
    _, out["read_only"] = await session(read_key, read_only)
    print(json.dumps(out))

asyncio.run(main())
"#;

/// A remote MCP server made with the SDK: `add` reports progress, `broken` always fails.
const SERVER: &str = r#"
import sys
from mcp.server.mcpserver import MCPServer, Context

app = MCPServer("capibara-test-remote")

@app.tool()
async def add(a: int, b: int, ctx: Context) -> dict:
    """Adds two numbers, reporting progress halfway."""
    await ctx.report_progress(1, 2, "halfway")
    return {"sum": a + b}

@app.tool()
def broken(reason: str) -> str:
    """Always fails."""
    raise ValueError("broken on purpose: " + reason)

app.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]), streamable_http_path="/mcp")
"#;

/// A child process, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_remote() -> (Server, u16) {
    let script = scratch("server.py", SERVER);
    let port = find_free_port();
    let mut child = Command::new(python())
        .arg(&script)
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the MCP server");
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the MCP server exited: {status}");
        }
        assert!(Instant::now() < deadline, "port {port} did not open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (Server(child), port)
}

#[tokio::test]
async fn the_sdk_client_lists_kinds_and_workflows_as_tools_and_calls_them() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    runs::create(
        &api,
        json!({"name": "double", "description": "Echoes n twice.",
               "input_schema": {"type": "object", "required": ["n"],
                                "properties": {"n": {"type": "integer"}}},
               "steps": [{"id": "a", "kind": "echo", "input": {"n": "{{ input.n }}"}},
                         {"id": "b", "kind": "echo", "input": {"m": "{{ steps.a.output.n }}"},
                          "depends_on": ["a"]}],
               "output": {"first": "{{ steps.a.output.n }}", "second": "{{ steps.b.output.m }}"}}),
    )
    .await;
    let reader = api.key_for("default", &["read"]).await;

    // Without a key: 401, before any JSON-RPC.
    let r = reqwest::Client::new()
        .post(api.url("/mcp"))
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let script = scratch("client.py", CLIENT);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(&script)
            .args([api.url("/mcp"), api.key.clone(), reader.key.clone()])
            .output()
            .expect("running the MCP client")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "the client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out: Value = serde_json::from_slice(&out.stdout).expect("the client's JSON");

    assert_eq!(out["protocol"], "2025-11-25");
    // Kinds are tools with their published schemas; workflows with their input_schema.
    assert_eq!(out["tools"]["echo"]["type"], "object");
    assert_eq!(
        out["tools"]["sleep"]["required"],
        json!(["ms"]),
        "{}",
        out["tools"]["sleep"]
    );
    assert_eq!(out["tools"]["workflow.double"]["required"], json!(["n"]));
    assert!(out["tools"].get("mcp.call").is_some());

    let echo = &out["echo"];
    assert_eq!(echo["isError"], false, "{echo}");
    assert_eq!(echo["structuredContent"], json!({"msg": "hi"}));
    let text: Value = serde_json::from_str(echo["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(text, json!({"msg": "hi"}));

    let wf = &out["workflow"];
    assert_eq!(wf["isError"], false, "{wf}");
    assert_eq!(wf["structuredContent"], json!({"first": 21, "second": 21}));

    // An input the kind refuses is a tool error naming the field.
    assert_eq!(out["invalid"]["isError"], true);
    assert!(out["invalid"]["content"][0]["text"]
        .as_str()
        .unwrap()
        .contains("ms"));

    // The sleep's progress reports arrived as notifications, increasing, before the result.
    assert_eq!(out["slept"]["isError"], false, "{}", out["slept"]);
    let progress = out["progress"].as_array().unwrap();
    assert!(progress.len() >= 2, "{progress:?}");
    let values: Vec<f64> = progress.iter().map(|p| p[0].as_f64().unwrap()).collect();
    assert!(values.windows(2).all(|w| w[0] < w[1]), "{values:?}");
    assert_eq!(progress[0][1], 100.0);

    // Past the wait: a handle and a resource_link, read later as the finished job.
    let handle = &out["handle"];
    assert_eq!(handle["isError"], false);
    assert_ne!(
        handle["structuredContent"]["status"], "succeeded",
        "{handle}"
    );
    let id = handle["structuredContent"]["id"].as_str().unwrap();
    let read = &out["read"]["contents"][0];
    assert_eq!(read["uri"], format!("capibara://jobs/{id}"));
    assert_eq!(read["mimeType"], "application/json");
    let job: Value = serde_json::from_str(read["text"].as_str().unwrap()).unwrap();
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["kind"], "sleep");

    let templates = out["templates"].as_array().unwrap();
    assert!(templates.contains(&json!("capibara://jobs/{id}/artifacts/{name}")));
    assert!(out["resources"]
        .as_array()
        .unwrap()
        .contains(&json!(format!("capibara://jobs/{id}"))));
    assert_eq!(out["missing"], -32002);

    // A read-only key lists but may not call.
    assert!(out["read_only"]["tools"].as_u64().unwrap() > 5);
    assert_eq!(out["read_only"]["call"], -32001);
}

#[tokio::test]
async fn mcp_call_calls_a_tool_on_a_remote_server_and_its_errors_fail_the_job() {
    let mut env = TestEnv::new().await;
    env.extra_env
        .push(("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()));
    let _procs = env.spawn_all().await;
    let api = env.client();
    let (_server, port) = start_remote().await;
    let server = format!("http://127.0.0.1:{port}/mcp");

    let id = api
        .submit_id(json!({"kind": "mcp.call", "input": {
            "server": server, "tool": "add", "arguments": {"a": 2, "b": 40}}}))
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["output"]["isError"], false);
    let text = job["output"]["content"][0]["text"].as_str().unwrap();
    let sum: Value = serde_json::from_str(text).unwrap();
    assert_eq!(sum, json!({"sum": 42}));
    // The server's progress notification became the job's progress.
    let events = api.events(&id).await;
    let progress: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "JobProgress")
        .collect();
    assert_eq!(progress.len(), 1, "{events:?}");
    assert_eq!(progress[0]["data"]["percent"], 50.0, "{:?}", progress[0]);

    // A tool that answers isError fails the job at once, with no retry.
    let id = api
        .submit_id(json!({"kind": "mcp.call", "max_attempts": 3, "input": {
            "server": server, "tool": "broken", "arguments": {"reason": "test"}}}))
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["type"], "tool_error", "{job}");
    assert!(job["error"]["message"].as_str().unwrap().contains("broken"));
    assert_eq!(job["attempt"], 1);

    // An unknown tool is the server's JSON-RPC error (or an isError result): not retried.
    let id = api
        .submit_id(json!({"kind": "mcp.call", "input": {"server": server, "tool": "nope"}}))
        .await;
    let job = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempt"], 1, "{job}");

    // A server that is not there: the attempt fails retryably (a retry is scheduled), like
    // http.request's connect errors.
    let gone = find_free_port();
    let id = api
        .submit_id(json!({"kind": "mcp.call", "max_attempts": 3,
                          "backoff": {"initial_ms": 60000},
                          "input": {"server": format!("http://127.0.0.1:{gone}/mcp"), "tool": "add"}}))
        .await;
    let failed = capibara_tests::eventually("the attempt to fail", Duration::from_secs(30), || {
        let api = api.clone();
        let id = id.clone();
        async move {
            api.events(&id)
                .await
                .into_iter()
                .find(|e| e["type"] == "JobAttemptFailed")
        }
    })
    .await;
    assert_eq!(
        failed["data"]["error"]["type"], "connect_failed",
        "{failed}"
    );
    assert!(failed["data"]["retry_at"].is_string(), "{failed}");
    assert_ne!(api.job(&id).await["status"], "failed");
}
