//! `llm.generate` / `llm.chat` (docs/llm.md) against three local stand-in providers on
//! loopback: two speaking OpenAI's chat-completions protocol (whole answers and SSE streams)
//! and one speaking Anthropic's Messages API. Routing by model and priority, keys from
//! secrets, usage and cost, tokens streamed as `JobOutputChunk` events, failover when a
//! provider's process dies mid-stream (its runtime is shut down: sockets closed, then
//! connections refused), the circuit breaker opening and shown at `GET /v1/llm/providers`,
//! health probes, a bad request failing the job, and `/metrics`.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use capibara_tests::{find_free_port, types, Api, TestEnv};
use serde_json::{json, Value};

/// How a stand-in answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ok,
    /// Two tokens of a stream, then the whole server dies.
    DieMidStream,
    /// 400 with an OpenAI error body.
    BadRequest,
}

struct Standin {
    name: String,
    mode: Mutex<Mode>,
    /// The last request's body and auth header.
    seen: Mutex<Vec<(Value, String)>>,
    kill: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

type Shared = Arc<Standin>;

fn tokens(name: &str) -> Vec<String> {
    vec!["Hello".into(), " from".into(), format!(" {name}")]
}

fn sse(events: Vec<String>, die_after: Option<(usize, Shared)>) -> Response {
    let stream = async_stream_of(events, die_after);
    (
        [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// The events 30 ms apart; with `die_after`, the server is killed after that many.
fn async_stream_of(
    events: Vec<String>,
    die_after: Option<(usize, Shared)>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::unfold((0usize, events, die_after), |(i, events, die)| async move {
        if let Some((n, s)) = &die {
            if i == *n {
                if let Some(kill) = s.kill.lock().unwrap().take() {
                    let _ = kill.send(());
                }
                futures::future::pending::<()>().await;
            }
        }
        let ev = events.get(i)?.clone();
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        Some((Ok(Bytes::from(ev)), (i + 1, events, die)))
    })
}

async fn openai_chat(
    State(s): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    s.seen.lock().unwrap().push((body.clone(), auth));
    let mode = *s.mode.lock().unwrap();
    if mode == Mode::BadRequest {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": {"message": "max_tokens is too large for this model",
                                  "type": "invalid_request_error"}}),
            ),
        )
            .into_response();
    }
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let toks = tokens(&s.name);
    if body["stream"] != json!(true) {
        return Json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": toks.concat()},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
        }))
        .into_response();
    }
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                   "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        )
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    for t in &toks {
        events.push(chunk(json!({"content": t}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    events.push(format!(
        "data: {}\n\n",
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
               "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})
    ));
    events.push("data: [DONE]\n\n".into());
    let die = (mode == Mode::DieMidStream).then(|| (3, s.clone()));
    sse(events, die)
}

async fn openai_models(State(s): State<Shared>) -> Response {
    Json(json!({"object": "list", "data": [{"id": "gpt-test", "object": "model", "owned_by": s.name}]}))
        .into_response()
}

async fn anthropic_messages(
    State(s): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    if h("anthropic-version").is_empty() {
        return (StatusCode::BAD_REQUEST, Json(json!({"type": "error",
            "error": {"type": "invalid_request_error", "message": "anthropic-version header is required"}})))
            .into_response();
    }
    s.seen.lock().unwrap().push((body.clone(), h("x-api-key")));
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let toks = tokens(&s.name);
    if body["stream"] != json!(true) {
        return Json(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": toks.concat()}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 20, "output_tokens": 3}
        }))
        .into_response();
    }
    let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![
        ev(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
            "role": "assistant", "model": model, "content": [], "stop_reason": null,
            "usage": {"input_tokens": 20, "output_tokens": 1}}}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ),
        ev("ping", json!({"type": "ping"})),
    ];
    for t in &toks {
        events.push(ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": t}}),
        ));
    }
    events.push(ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(ev("message_delta", json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 3}})));
    events.push(ev("message_stop", json!({"type": "message_stop"})));
    sse(events, None)
}

/// A stand-in on its own runtime and thread, so that killing it closes every connection.
fn spawn(name: &str, anthropic: bool) -> (String, Shared) {
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel();
    let s: Shared = Arc::new(Standin {
        name: name.into(),
        mode: Mutex::new(Mode::Ok),
        seen: Mutex::default(),
        kill: Mutex::new(Some(kill_tx)),
    });
    let app = if anthropic {
        Router::new()
            .route("/v1/messages", post(anthropic_messages))
            .route(
                "/v1/models",
                get(|| async { Json(json!({"data": [{"id": "claude-test", "type": "model"}]})) }),
            )
    } else {
        Router::new()
            .route("/v1/chat/completions", post(openai_chat))
            .route("/v1/models", get(openai_models))
    }
    .with_state(s.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tokio::select! {
                _ = axum::serve(listener, app) => {}
                _ = kill_rx => {}
            }
        });
        // Every connection task dies with the runtime.
        rt.shutdown_background();
    });
    (format!("http://{addr}"), s)
}

async fn run(api: &Api, kind: &str, input: Value, attempts: u32) -> Value {
    let id = api
        .submit_id(
            json!({"kind": kind, "input": input, "max_attempts": attempts,
                          "backoff": {"initial_ms": 100, "factor": 1, "max_ms": 100}}),
        )
        .await;
    api.wait_terminal(&id, Duration::from_secs(60)).await
}

/// The streamed text the job's chunks leave once resets are applied, and the chunks.
async fn streamed(api: &Api, job: &Value) -> (String, Vec<Value>) {
    let events = api.events(job["id"].as_str().unwrap()).await;
    let chunks: Vec<Value> = events
        .iter()
        .filter(|e| e["type"] == "JobOutputChunk")
        .map(|e| e["data"].clone())
        .collect();
    let mut text = String::new();
    for c in &chunks {
        if c["data"]["reset"] == json!(true) {
            text.clear();
        } else {
            text.push_str(c["data"]["text"].as_str().unwrap_or_default());
        }
    }
    (text, chunks)
}

#[tokio::test(flavor = "multi_thread")]
async fn llm_routes_streams_fails_over_and_breaks_the_circuit_per_provider() {
    let mut env = TestEnv::new().await;
    let wport = find_free_port();
    env.extra_env.extend([
        ("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()),
        ("CAPIBARA_LLM_BREAKER_FAILURES".into(), "2".into()),
        ("CAPIBARA_LLM_BREAKER_COOLDOWN_S".into(), "60".into()),
        ("CAPIBARA_WORKER_ADDR".into(), format!("127.0.0.1:{wport}")),
    ]);
    let _procs = env.spawn_all().await;
    let api = env.client();
    let (a_url, a) = spawn("primary", false);
    let (b_url, b) = spawn("secondary", false);
    let (c_url, c) = spawn("claude", true);

    let r = api
        .send(
            api.http
                .put(api.url("/v1/secrets/OPENAI_KEY"))
                .json(&json!({"value": "sk-test-123"})),
        )
        .await;
    assert!(r.status < 300, "{r:?}");
    let put = |name: &str, def: Value| {
        let api = api.clone();
        let name = name.to_string();
        async move {
            api.send(
                api.http
                    .put(api.url(&format!("/v1/llm/providers/{name}")))
                    .json(&def),
            )
            .await
        }
    };
    // Bad definitions are 422s naming the field.
    for (name, def, field) in [
        (
            "Bad Name",
            json!({"type": "openai", "base_url": a_url.clone() + "/v1", "models": ["m"]}),
            "name",
        ),
        (
            "p",
            json!({"type": "openai", "base_url": "ftp://x", "models": ["m"]}),
            "base_url",
        ),
        (
            "p",
            json!({"type": "openai", "base_url": a_url.clone() + "/v1", "models": []}),
            "models",
        ),
        (
            "p",
            json!({"type": "openai", "base_url": a_url.clone() + "/v1", "models": ["a b"]}),
            "models[0]",
        ),
        (
            "p",
            json!({"type": "grok", "base_url": a_url.clone() + "/v1", "models": ["m"]}),
            "type",
        ),
    ] {
        let r = put(name, def).await;
        assert_eq!(r.status, 422, "{r:?}");
        assert_eq!(r.body["errors"][0]["field"], field, "{}", r.body);
    }
    let r = put(
        "primary",
        json!({"type": "openai", "base_url": a_url.clone() + "/v1", "models": ["gpt-test"],
        "priority": 1, "api_key_secret": "OPENAI_KEY",
        "cost": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}),
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["health"]["state"], "closed");
    let r = put("secondary", json!({"type": "openai", "base_url": b_url.clone() + "/v1/", "models": ["gpt-*"], "priority": 2})).await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = put(
        "claude",
        json!({"type": "anthropic", "base_url": c_url.clone(), "models": ["claude-test"],
        "api_key_secret": "OPENAI_KEY"}),
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    let again = put("secondary", json!({"type": "openai", "base_url": b_url.clone() + "/v1/", "models": ["gpt-*"], "priority": 2})).await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.body["version"], 1, "an unchanged PUT records nothing");

    // Inputs are checked at submission.
    for (kind, input, field) in [
        ("llm.generate", json!({"prompt": "hi"}), "input.model"),
        ("llm.generate", json!({"model": "gpt-test"}), "input.prompt"),
        (
            "llm.chat",
            json!({"model": "gpt-test", "prompt": "hi"}),
            "input.messages",
        ),
        (
            "llm.chat",
            json!({"model": "gpt-test", "messages": [{"role": "robot", "content": "x"}]}),
            "input.messages[0].role",
        ),
    ] {
        let r = api.submit(json!({"kind": kind, "input": input})).await;
        assert_eq!(r.status, 422, "{kind} {r:?}");
        assert_eq!(r.body["errors"][0]["field"], field, "{}", r.body);
    }

    // A whole answer from the first provider of the model, its key from the secret.
    let job = run(
        &api,
        "llm.generate",
        json!({"model": "gpt-test", "system": "Be brief.",
        "prompt": "Say hello", "params": {"temperature": 0.2, "max_tokens": 50}}),
        1,
    )
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let out = &job["output"];
    assert_eq!(out["text"], "Hello from primary");
    assert_eq!(
        out["message"],
        json!({"role": "assistant", "content": "Hello from primary"})
    );
    assert_eq!(out["provider"], "primary");
    assert_eq!(
        out["usage"],
        json!({"input_tokens": 12, "output_tokens": 3, "total_tokens": 15})
    );
    assert!(
        (out["cost_usd"].as_f64().unwrap() - 18e-6).abs() < 1e-12,
        "{out}"
    );
    assert_eq!(out["tries"], json!([]));
    let (sent, auth) = a.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(auth, "Bearer sk-test-123");
    assert_eq!(
        sent["messages"],
        json!([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Say hello"}])
    );
    assert_eq!(
        (sent["temperature"].clone(), sent["max_tokens"].clone()),
        (json!(0.2), json!(50))
    );
    let history = serde_json::to_string(&api.events(job["id"].as_str().unwrap()).await).unwrap();
    assert!(
        !history.contains("sk-test-123"),
        "the key never enters the history"
    );

    // Anthropic, streamed: the tokens arrive as output chunks, the output has the whole answer.
    let job = run(
        &api,
        "llm.chat",
        json!({"model": "claude-test", "stream": true,
        "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]}),
        1,
    )
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["output"]["text"], "Hello from claude");
    assert_eq!(job["output"]["usage"]["input_tokens"], 20);
    assert_eq!(job["output"]["finish_reason"], "stop");
    assert!(job["output"]["ttft_ms"].as_f64().unwrap() > 0.0);
    let (text, chunks) = streamed(&api, &job).await;
    assert_eq!(text, "Hello from claude");
    assert!(
        chunks.len() >= 2,
        "the first token is written at once: {chunks:?}"
    );
    assert_eq!(chunks[0]["data"]["provider"], "claude");
    let (sent, key) = c.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(key, "sk-test-123");
    assert_eq!(sent["system"], "S");
    assert_eq!(sent["messages"], json!([{"role": "user", "content": "Hi"}]));

    // The first provider dies in the middle of a stream: the second one answers in the same
    // attempt, after a reset chunk; the try is in the output.
    *a.mode.lock().unwrap() = Mode::DieMidStream;
    let job = run(
        &api,
        "llm.generate",
        json!({"model": "gpt-test", "prompt": "Say hello", "stream": true}),
        1,
    )
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempt"], 1);
    let out = &job["output"];
    assert_eq!(out["provider"], "secondary", "{out}");
    assert_eq!(out["text"], "Hello from secondary");
    assert_eq!(out["tries"][0]["provider"], "primary", "{out}");
    assert_eq!(out["tries"][0]["error"], "stream_cut", "{out}");
    let (text, chunks) = streamed(&api, &job).await;
    assert_eq!(text, "Hello from secondary");
    let reset = chunks
        .iter()
        .position(|c| c["data"]["reset"] == json!(true))
        .expect("a reset chunk");
    assert!(
        reset > 0,
        "primary's first tokens were streamed before it died: {chunks:?}"
    );
    assert_eq!(chunks[0]["data"]["provider"], "primary");
    assert_eq!(chunks[reset]["data"]["provider"], "secondary");

    // It stays dead: the next call fails over too (no connection), which opens its breaker
    // (2 failures); then it is skipped without a call.
    let job = run(
        &api,
        "llm.generate",
        json!({"model": "gpt-test", "prompt": "x"}),
        1,
    )
    .await;
    assert_eq!(job["output"]["provider"], "secondary", "{job}");
    assert_eq!(
        job["output"]["tries"][0]["error"], "connect_failed",
        "{job}"
    );
    let job = run(
        &api,
        "llm.generate",
        json!({"model": "gpt-test", "prompt": "x"}),
        1,
    )
    .await;
    assert_eq!(job["output"]["tries"][0]["error"], "circuit_open", "{job}");
    let r = api.get("/v1/llm/providers").await;
    assert_eq!(r.status, 200, "{r:?}");
    let items = r.body["items"].as_array().unwrap();
    let names: Vec<&str> = items.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["claude", "primary", "secondary"]);
    let primary = &items[1];
    assert_eq!(primary["health"]["state"], "open", "{primary}");
    assert!(
        primary["health"]["last_error"]
            .as_str()
            .unwrap()
            .contains("connect_failed"),
        "{primary}"
    );
    assert_eq!(primary["definition"]["api_key_secret"], "OPENAI_KEY");
    assert_eq!(items[2]["health"]["state"], "closed");
    assert!(items[2]["health"]["last_success_at"].is_string());

    // A probe now: the dead one fails, the others answer.
    let r = api.get("/v1/llm/providers?check=true").await;
    let checks: Vec<(String, bool)> = r.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["health"]["check"]["ok"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        checks,
        [
            ("claude".into(), true),
            ("primary".into(), false),
            ("secondary".into(), true)
        ],
        "{}",
        r.body
    );

    let r = api.get("/v1/llm/providers?check=maybe").await;
    assert_eq!(r.status, 422, "{r:?}");
    assert_eq!(r.body["errors"][0]["field"], "check");

    // A pinned provider gets no failover: with the breaker open, the job waits for it.
    let job = run(
        &api,
        "llm.generate",
        json!({"provider": "primary", "prompt": "x"}),
        1,
    )
    .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["type"], "providers_failed");
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("circuit_open"),
        "{job}"
    );

    // A request the provider calls bad fails the job at once (no other provider tried).
    *b.mode.lock().unwrap() = Mode::BadRequest;
    let job = run(
        &api,
        "llm.generate",
        json!({"model": "gpt-x", "prompt": "x"}),
        3,
    )
    .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["error"]["type"], "bad_request");
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens is too large"),
        "{job}"
    );

    // No provider for a model.
    let job = run(
        &api,
        "llm.generate",
        json!({"model": "nothing-serves-me", "prompt": "x"}),
        3,
    )
    .await;
    assert_eq!(job["error"]["type"], "no_provider", "{job}");
    assert!(
        types(&api.events(job["id"].as_str().unwrap()).await).contains(&"JobFailed".to_string())
    );

    // Usage and outcomes on the worker's /metrics.
    let metrics = capibara_tests::scrape(&format!("http://127.0.0.1:{wport}")).await;
    for line in [
        r#"capibara_llm_requests_total{provider="secondary",outcome="ok"} 3"#,
        r#"capibara_llm_requests_total{provider="primary",outcome="circuit_open"}"#,
        r#"capibara_llm_tokens_total{provider="claude",direction="input"} 20"#,
        r#"capibara_llm_cost_microdollars_total{provider="primary"} 18"#,
        r#"capibara_llm_breaker_transitions_total{to="open"} 1"#,
    ] {
        assert!(
            metrics.contains(line),
            "{line} not in\n{}",
            metrics
                .lines()
                .filter(|l| l.contains("llm"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    // Deleting a provider: it is gone from the list and from routing.
    let r = api
        .send(api.http.delete(api.url("/v1/llm/providers/claude")))
        .await;
    assert_eq!(r.status, 204);
    let r = api
        .send(api.http.delete(api.url("/v1/llm/providers/claude")))
        .await;
    assert_eq!(r.status, 404);
    let job = run(
        &api,
        "llm.chat",
        json!({"model": "claude-test", "messages": [{"role": "user", "content": "x"}]}),
        1,
    )
    .await;
    assert_eq!(job["error"]["type"], "no_provider", "{job}");
}
