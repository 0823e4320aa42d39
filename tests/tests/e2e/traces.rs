//! OpenTelemetry traces (docs/observability.md "Traces"): with `CAPIBARA_OTLP_ENDPOINT` set, one
//! trace runs from the submitting request (continuing the client's `traceparent`) through each
//! attempt on the worker to the callback, and a workflow run's step jobs continue the run's
//! trace. Spans are received by a local OTLP/HTTP endpoint and decoded with the protocol's own
//! message definitions (opentelemetry-proto). Without an endpoint, a client's `traceparent` is
//! passed along unchanged.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{body::Bytes, routing::post, Router};
use capibara_tests::{
    eventually,
    receiver::{Receiver, ReceiverOptions},
    runs, TestEnv,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value::Value as AnyValue,
};
use prost::Message;
use serde_json::json;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// One received span.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
}

/// A local OTLP/HTTP traces endpoint; returns its base URL and what it received.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let got: Arc<Mutex<Vec<Span>>> = Arc::default();
    let sink = got.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                let mut out = sink.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| kv.value.as_ref()?.value.clone())
                        .map(|v| match v {
                            AnyValue::StringValue(s) => s,
                            other => format!("{other:?}"),
                        })
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            out.push(Span {
                                service: service.clone(),
                                name: s.name,
                                trace_id: hex(&s.trace_id),
                                span_id: hex(&s.span_id),
                                parent: hex(&s.parent_span_id),
                            });
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn env_with(env: &mut TestEnv, extra: &[(&str, &str)]) {
    for (k, v) in [
        ("CAPIBARA_WEBHOOK_SECRET", SECRET),
        ("CAPIBARA_OUTBOUND_ALLOW_PRIVATE", "true"),
    ]
    .iter()
    .chain(extra)
    {
        env.extra_env.push((k.to_string(), v.to_string()));
    }
}

#[tokio::test]
async fn one_trace_runs_from_the_request_through_the_attempt_to_the_callback_and_the_steps() {
    let (otlp, spans) = otlp_receiver().await;
    let mut env = TestEnv::new().await;
    env_with(
        &mut env,
        &[
            ("CAPIBARA_OTLP_ENDPOINT", &otlp),
            // Export each batch within 100 ms instead of 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let _procs = env.spawn_all().await;
    let api = env.client();
    let hook = Receiver::start(&[SECRET], ReceiverOptions::default());
    let traceparent = format!("00-{TRACE}-{CLIENT_SPAN}-01");

    let r = api
        .post_with(
            "/v1/jobs",
            ("traceparent", &traceparent),
            json!({"kind": "echo", "input": {"n": 1}, "callback_url": hook.url}),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.body["id"].as_str().unwrap().to_string();
    let job = api.wait_terminal(&id, Duration::from_secs(30)).await;
    // The job records the request's span: same trace, a span of Capibara's own.
    let recorded = job["traceparent"].as_str().expect("traceparent recorded");
    assert!(recorded.starts_with(&format!("00-{TRACE}-")), "{recorded}");
    assert!(!recorded.contains(CLIENT_SPAN), "{recorded}");
    let got = hook.wait_requests(1, Duration::from_secs(30)).await;
    let header = got[0]["headers"]["traceparent"]
        .as_str()
        .expect("a traceparent header");
    assert!(header.starts_with(&format!("00-{TRACE}-")), "{header}");

    let wf = runs::create(
        &api,
        json!({"name": "traced", "steps": [{"id": "a", "kind": "echo", "input": {}}]}),
    )
    .await;
    let r = api
        .post_with(
            &format!("/v1/workflows/{wf}/runs"),
            ("traceparent", &traceparent),
            json!({"input": {}}),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let run = runs::ended(
        &api,
        r.body["id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    let step_job = api
        .job(runs::step(&run, "a")["job_id"].as_str().unwrap())
        .await;
    assert!(
        step_job["traceparent"]
            .as_str()
            .is_some_and(|t| t.starts_with(&format!("00-{TRACE}-"))),
        "{step_job}"
    );

    let mine = eventually(
        "the request, attempt and callback spans",
        Duration::from_secs(30),
        || async {
            let all: Vec<Span> = spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.trace_id == TRACE)
                .cloned()
                .collect();
            let has = |service: &str, name: &str| {
                all.iter().any(|s| s.service == service && s.name == name)
            };
            (has("capibara-api", "POST /v1/jobs")
                && has("capibara-worker", "attempt echo")
                && has("capibara-worker", "callback.send")
                && has("capibara-api", "POST /v1/workflows/{id}/runs")
                && all.iter().filter(|s| s.name == "attempt echo").count() >= 2)
                .then_some(all)
        },
    )
    .await;
    let submit = mine.iter().find(|s| s.name == "POST /v1/jobs").unwrap();
    assert_eq!(
        submit.parent, CLIENT_SPAN,
        "the client's span is the parent"
    );
    assert!(recorded.contains(&submit.span_id), "{recorded} {submit:?}");
    let attempt = mine
        .iter()
        .find(|s| s.name == "attempt echo" && s.parent == submit.span_id);
    assert!(
        attempt.is_some(),
        "the attempt is a child of the submit: {mine:#?}"
    );
    let callback = mine.iter().find(|s| s.name == "callback.send").unwrap();
    assert_eq!(callback.parent, submit.span_id, "{mine:#?}");
    assert!(header.contains(&callback.span_id), "{header} {callback:?}");
}

#[tokio::test]
async fn without_an_exporter_a_clients_traceparent_is_passed_along_unchanged() {
    let mut env = TestEnv::new().await;
    env_with(&mut env, &[]);
    let _procs = env.spawn_all().await;
    let api = env.client();
    let hook = Receiver::start(&[SECRET], ReceiverOptions::default());
    let traceparent = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    let r = api
        .post_with(
            "/v1/jobs",
            ("traceparent", &traceparent),
            json!({"kind": "echo", "callback_url": hook.url}),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    let id = r.body["id"].as_str().unwrap().to_string();
    let job = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(job["traceparent"], traceparent.as_str());
    let got = hook.wait_requests(1, Duration::from_secs(30)).await;
    assert_eq!(got[0]["headers"]["traceparent"], traceparent.as_str());
    // A malformed one is not recorded.
    let r = api
        .post_with(
            "/v1/jobs",
            ("traceparent", "00-not-a-trace-01"),
            json!({"kind": "echo"}),
        )
        .await;
    assert_eq!(r.status, 202, "{r:?}");
    assert!(r.body.get("traceparent").is_none(), "{r:?}");
}
