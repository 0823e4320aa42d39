//! The worked examples in docs/examples run as written: docs/examples/summarize-page (a page
//! fetched by `http.request`, summarized by `llm.generate` through a local stand-in speaking
//! OpenAI's chat-completions protocol, stored by `memory.write`, and read back through `/mcp`
//! by the example's own client script on the official MCP SDK).

use std::{
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{extract::State, routing::post, Json, Router};
use capibara_tests::{runs, TestEnv};
use serde_json::{json, Value};

fn example(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/examples")
        .join(path)
}

/// The Python of the venv deploy/test.sh makes with the MCP SDK.
fn python() -> PathBuf {
    std::env::var_os("CAPIBARA_TEST_AGENTS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/capibara-test/agents")
        })
        .join("bin/python")
}

const PAGE: &str = "<html><head><title>Capybara</title></head><body><h1>Capybara</h1>\
    <p>The capybara is the largest living rodent. It lives in groups near rivers and lakes \
    in South America.</p></body></html>";

/// A summary only a model that was given the page could write.
const SUMMARY: &str =
    "The capybara is the largest living rodent; it lives in groups near South American water.";

/// Serves `PAGE` at `/capybara` and an OpenAI-compatible `/v1/chat/completions` that
/// summarizes it (and says so when the page is not in the prompt); keeps the requests it got.
async fn serve() -> (String, Arc<Mutex<Vec<Value>>>) {
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    async fn chat(
        State(seen): State<Arc<Mutex<Vec<Value>>>>,
        Json(body): Json<Value>,
    ) -> Json<Value> {
        seen.lock().unwrap().push(body.clone());
        let prompt = body["messages"].to_string();
        let text = if prompt.contains("largest living rodent") {
            SUMMARY
        } else {
            "I was not given the page."
        };
        Json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 87, "completion_tokens": 19, "total_tokens": 106}
        }))
    }
    let app = Router::new()
        .route(
            "/capybara",
            axum::routing::get(|| async { ([("content-type", "text/html")], PAGE) }),
        )
        .route("/v1/chat/completions", post(chat))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn summarize_page_example_fetches_summarizes_remembers_and_reads_back_over_mcp() {
    let mut env = TestEnv::new().await;
    // The page and the model are on loopback.
    env.extra_env
        .push(("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()));
    let _procs = env.spawn_all().await;
    let api = env.client();
    let (base, seen) = serve().await;

    // 1. A provider for the model (README step 1, with the stand-in's address).
    let r = api
        .send(
            api.http
                .put(api.url("/v1/llm/providers/local"))
                .json(&json!({
            "type": "openai", "base_url": format!("{base}/v1"), "models": ["gpt-4o-mini"]})),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");

    // 2. The workflow, as the file is.
    let yaml = std::fs::read_to_string(example("summarize-page/workflow.yaml")).unwrap();
    let r = api
        .http
        .post(api.url("/v1/workflows"))
        .bearer_auth(&api.key)
        .header("content-type", "application/yaml")
        .body(yaml)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let workflow: Value = r.json().await.unwrap();

    // 3. Run it.
    let url = format!("{base}/capybara");
    let run_id = runs::start(&api, workflow["id"].as_str().unwrap(), json!({"url": url})).await;
    let run = runs::ended(&api, &run_id, Duration::from_secs(120)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"]["summary"], SUMMARY, "{run}");
    assert_eq!(run["output"]["tokens"]["output_tokens"], 19, "{run}");
    let fetched = &runs::step(&run, "fetch")["output"];
    assert_eq!(fetched["status"], 200, "{run}");
    // The model got the page, with the example's system prompt, under the default model name.
    let asked = seen
        .lock()
        .unwrap()
        .last()
        .cloned()
        .expect("the model was asked");
    assert_eq!(asked["model"], "gpt-4o-mini");
    assert!(asked["messages"][0]["content"]
        .as_str()
        .unwrap()
        .contains("two sentences"));
    assert!(asked["messages"][1]["content"]
        .as_str()
        .unwrap()
        .contains("largest living rodent"));

    // 4. Read it back through MCP with the example's client.
    let script = example("summarize-page/read_back.py");
    let (mcp_url, key) = (api.url("/mcp"), api.key.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script)
            .args([mcp_url, key, "which rodent is the largest?".into(), run_id])
            .output()
            .expect("running read_back.py")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "read_back.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out: Value = serde_json::from_slice(&out.stdout).expect("read_back.py prints JSON");
    assert_eq!(out["hits"][0]["text"], SUMMARY, "{out}");
    assert_eq!(out["hits"][0]["url"], url, "{out}");
    assert_eq!(out["run"]["memory_id"], run["output"]["memory_id"], "{out}");
}
