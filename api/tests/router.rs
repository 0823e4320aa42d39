//! The router in-process: requests go through `tower::ServiceExt::oneshot` to `capibara_api::app`
//! on a real Postgres database and Redis prefix of their own, without spawning a binary. These
//! pin the shapes of refusals (status, `application/problem+json`, the field named) that every
//! client relies on; tests/tests/e2e/*.rs keep the end-to-end and failure scenarios.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    body::Body,
    extract::ConnectInfo,
    http::{header, Request, StatusCode},
    Router,
};
use capibara_shared::{config::Config, queue::Queue, store};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

const KEY: &str = "cap_router_test_admin_key_0123456789";

/// The app on a database of its own; the `TestEnv` keeps the database while it lives.
async fn app() -> (Router, capibara_tests::TestEnv) {
    let env = capibara_tests::TestEnv::new().await;
    let mut config = Config::from_env().expect("config");
    config.admin_key = Some(KEY.into());
    let config = Arc::new(config);
    let pool = store::connect(&env.database_url, 4).await.unwrap();
    store::migrate(&pool).await.unwrap();
    let queue = Queue::connect(&env.redis_url, &env.redis_prefix)
        .await
        .unwrap();
    let appender = store::Appender::start(
        pool.clone(),
        Some(std::sync::Arc::new(queue.clone())),
        config.as_ref().into(),
    );
    let app = capibara_api::app(capibara_api::AppState::new(
        store::Store::new(pool, appender),
        queue,
        config,
    ));
    (app, env)
}

/// Send `req` (from 127.0.0.1) and read the answer: status, content type, JSON body.
async fn send(app: &Router, mut req: Request<Body>) -> (StatusCode, String, Value) {
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let content_type = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, content_type, body)
}

fn post(path: &str, content_type: &str, body: &'static [u8]) -> Request<Body> {
    Request::post(path)
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body))
        .unwrap()
}

fn assert_problem(got: &(StatusCode, String, Value), status: u16, field: Option<&str>) {
    let (s, content_type, body) = got;
    assert_eq!(s.as_u16(), status, "{body}");
    assert_eq!(content_type, "application/problem+json", "{body}");
    assert_eq!(body["status"], status, "{body}");
    assert!(
        body["type"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert!(body["title"].is_string(), "{body}");
    if let Some(field) = field {
        assert_eq!(body["errors"][0]["field"], field, "{body}");
    }
}

#[tokio::test]
async fn refusals_are_problems_naming_what_is_wrong() {
    let (app, _env) = app().await;
    let json = "application/json";

    let unknown = send(&app, Request::get("/v1/nope").body(Body::empty()).unwrap()).await;
    assert_problem(&unknown, 404, None);

    let anonymous = send(&app, Request::get("/v1/jobs").body(Body::empty()).unwrap()).await;
    assert_problem(&anonymous, 401, None);

    let malformed = send(&app, post("/v1/jobs", json, b"{\"kind\": ")).await;
    assert_problem(&malformed, 400, None);

    let not_json = send(&app, post("/v1/jobs", "text/plain", b"kind=echo")).await;
    assert_problem(&not_json, 415, None);

    let kind = send(&app, post("/v1/jobs", json, br#"{"kind": "nope"}"#)).await;
    assert_problem(&kind, 422, Some("kind"));

    let input = send(
        &app,
        post(
            "/v1/jobs",
            json,
            br#"{"kind": "sleep", "input": {"ms": -1}}"#,
        ),
    )
    .await;
    assert_problem(&input, 422, Some("input.ms"));

    let nul = send(
        &app,
        post(
            "/v1/jobs",
            json,
            br#"{"kind": "echo", "input": {"a": ["x\u0000"]}}"#,
        ),
    )
    .await;
    assert_problem(&nul, 422, Some("input.a[0]"));

    let batch = send(
        &app,
        post(
            "/v1/jobs/batch",
            json,
            br#"{"jobs": [{"kind": "echo"}, {"kind": "echo", "max_attempts": 0}]}"#,
        ),
    )
    .await;
    assert_problem(&batch, 422, Some("jobs[1].max_attempts"));

    let id = send(
        &app,
        Request::get("/v1/jobs/not-a-uuid")
            .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(id.0 == 404 || id.0 == 422, "{:?}", id);
    assert_eq!(id.1, "application/problem+json");
}

#[tokio::test]
async fn a_job_is_accepted_and_the_kinds_and_document_are_served() {
    let (app, _env) = app().await;
    let (status, _, job) = send(
        &app,
        post(
            "/v1/jobs",
            "application/json",
            br#"{"kind": "echo", "input": {"n": 1}}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{job}");
    assert_eq!(job["status"], "queued");
    assert_eq!(job["input"], json!({"n": 1}));

    let (status, _, kinds) = send(
        &app,
        Request::get("/v1/kinds")
            .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let sleep = kinds["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "sleep")
        .unwrap();
    assert_eq!(sleep["input_schema"]["required"], json!(["ms"]));

    let (status, _, doc) = send(
        &app,
        Request::get("/openapi.json").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["components"]["schemas"]["SubmitJob"]["oneOf"].is_array());
}
