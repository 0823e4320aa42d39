//! The client side of a chaos run: submissions spread evenly over the load window, across
//! every API process, each retried with its own `Idempotency-Key` until it is accepted (a
//! retry after an answer that never came cannot create a second job). What the APIs accepted
//! is the set the audit holds Capibara to.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use reqwest::{header, Client, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

/// What a submission is. The mix is fixed by index, so two runs submit the same work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Shape {
    /// `echo`: done in milliseconds.
    Echo,
    /// `sleep` of 1–3 s with progress every 250 ms: often running when a worker is killed.
    Slow,
    /// `fail` of its first attempt, then success.
    Flaky,
    /// `echo` with a `callback_url` to the local receiver (started, succeeded, failed).
    Callback,
    /// A run of the fan-out workflow (a `map` of 4 `echo` children, then a join).
    Workflow,
    /// An `echo` submitted after each fault to time the recovery.
    Probe,
}

impl Shape {
    pub(crate) fn of(index: usize) -> Shape {
        match index % 10 {
            0..=4 => Shape::Echo,
            5 | 6 => Shape::Slow,
            7 => Shape::Flaky,
            8 => Shape::Callback,
            _ => Shape::Workflow,
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Shape::Echo => "echo",
            Shape::Slow => "slow sleep with progress",
            Shape::Flaky => "failing then succeeding",
            Shape::Callback => "echo with callback",
            Shape::Workflow => "workflow run (fan-out 4 + join)",
            Shape::Probe => "recovery probe",
        }
    }
}

/// Retries survive a worker killed mid-attempt every few seconds.
const MAX_ATTEMPTS: u32 = 10;

/// One accepted submission.
#[derive(Debug, Clone)]
pub(crate) struct Accepted {
    pub(crate) id: Uuid,
    pub(crate) shape: Shape,
}

/// How the APIs answered.
#[derive(Default)]
pub(crate) struct Answers {
    pub(crate) accepted: Mutex<Vec<Accepted>>,
    /// Submissions given up on after [`GIVE_UP`] of refusals: never accepted, so not owed.
    pub(crate) gave_up: AtomicUsize,
    /// Answers other than 2xx, 429 and 5xx (a bad request the harness built: a bug).
    pub(crate) rejected: Mutex<Vec<String>>,
    /// Retries by cause (`503`, `connection`, …).
    pub(crate) retries: Mutex<BTreeMap<String, u64>>,
    pub(crate) posts: AtomicU64,
}

impl Answers {
    fn retry(&self, why: String) {
        *self
            .retries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(why)
            .or_default() += 1;
    }

    pub(crate) fn accepted(&self) -> Vec<Accepted> {
        self.accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// How long one submission is retried before the client gives up on it.
const GIVE_UP: Duration = Duration::from_secs(300);

/// Posts to the API processes in turn.
pub(crate) struct Submitter {
    http: Client,
    apis: Vec<String>,
    next: AtomicUsize,
    pub(crate) answers: Answers,
}

impl Submitter {
    pub(crate) fn new(admin_key: &str, apis: Vec<String>) -> anyhow::Result<Submitter> {
        let mut h = header::HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {admin_key}").parse()?,
        );
        let http = Client::builder()
            .default_headers(h)
            .pool_max_idle_per_host(64)
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Submitter {
            http,
            apis,
            next: AtomicUsize::new(0),
            answers: Answers::default(),
        })
    }

    pub(crate) fn http(&self) -> &Client {
        &self.http
    }

    /// The next API's base URL.
    pub(crate) fn api(&self) -> &str {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.apis.len();
        &self.apis[i]
    }

    /// POSTs `body` to `path` with the idempotency key `key` until an API accepts it; returns
    /// the answer's body, or None when it gave up or the request was rejected.
    pub(crate) async fn post_until_accepted(
        &self,
        path: &str,
        body: &Value,
        key: Uuid,
    ) -> Option<Value> {
        let started = Instant::now();
        loop {
            self.answers.posts.fetch_add(1, Ordering::Relaxed);
            let url = format!("{}{path}", self.api());
            let sent = self
                .http
                .post(&url)
                .header("Idempotency-Key", key.to_string())
                .json(body)
                .send()
                .await;
            let wait = match sent {
                Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                    Ok(v) => return Some(v),
                    Err(_) => {
                        self.answers.retry("body cut".into());
                        Duration::from_millis(100)
                    }
                },
                Ok(r) => {
                    let status = r.status();
                    let retry_after = r
                        .headers()
                        .get(header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                        self.answers.retry(status.as_u16().to_string());
                        // Honour Retry-After, capped: another API process may answer sooner.
                        Duration::from_millis(retry_after.map_or(250, |s| (s * 1000).min(2000)))
                    } else {
                        let text = r.text().await.unwrap_or_default();
                        self.answers
                            .rejected
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(format!("{status} {}", &text[..text.len().min(300)]));
                        return None;
                    }
                }
                Err(e) => {
                    self.answers.retry(if e.is_timeout() {
                        "timeout".into()
                    } else {
                        "connection".into()
                    });
                    Duration::from_millis(100)
                }
            };
            if started.elapsed() > GIVE_UP {
                self.answers.gave_up.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Submits one piece of work of `shape`; records it when accepted.
    pub(crate) async fn submit(
        &self,
        index: usize,
        shape: Shape,
        workflow: &str,
        callback_url: &str,
    ) -> Option<Uuid> {
        let key = Uuid::new_v4();
        let tags = json!({"chaos": format!("{shape:?}").to_lowercase()});
        let retry = json!({"initial_ms": 200, "factor": 2, "max_ms": 2000});
        let (path, body) = match shape {
            Shape::Echo | Shape::Probe => (
                "/v1/jobs".to_string(),
                json!({"kind": "echo", "input": {"i": index}, "tags": tags,
                       "max_attempts": MAX_ATTEMPTS, "backoff": retry}),
            ),
            Shape::Slow => (
                "/v1/jobs".to_string(),
                json!({"kind": "sleep", "input": {"ms": 1000 + (index % 5) * 500, "progress_ms": 250},
                       "tags": tags, "max_attempts": MAX_ATTEMPTS, "backoff": retry}),
            ),
            Shape::Flaky => (
                "/v1/jobs".to_string(),
                json!({"kind": "fail", "input": {"times": 1, "message": "first attempt fails"},
                       "tags": tags, "max_attempts": MAX_ATTEMPTS, "backoff": retry}),
            ),
            Shape::Callback => (
                "/v1/jobs".to_string(),
                json!({"kind": "echo", "input": {"i": index}, "tags": tags,
                       "max_attempts": MAX_ATTEMPTS, "backoff": retry,
                       "callback_url": callback_url,
                       "callback_events": ["job.started", "job.succeeded", "job.failed"]}),
            ),
            Shape::Workflow => (
                format!("/v1/workflows/{workflow}/runs"),
                json!({"input": {"items": [index, index + 1, index + 2, index + 3]}}),
            ),
        };
        let answer = self.post_until_accepted(&path, &body, key).await?;
        let id = answer
            .get("id")
            .or_else(|| answer.get("run_id"))
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<Uuid>().ok());
        let Some(id) = id else {
            self.answers
                .rejected
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("2xx without an id: {answer}"));
            return None;
        };
        self.answers
            .accepted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Accepted { id, shape });
        Some(id)
    }
}

/// The fan-out workflow every `Workflow` submission runs.
pub(crate) fn workflow_definition(name: &str) -> Value {
    let retry =
        json!({"max_attempts": MAX_ATTEMPTS, "backoff": {"initial_ms": 200, "max_ms": 2000}});
    json!({
        "name": name,
        "description": "capibara chaos: a map of 4 echo children, then a join",
        "steps": [
            {"id": "fan", "kind": "map", "input": {"items": "{{ input.items }}", "concurrency": 4,
              "step": {"kind": "echo", "input": {"v": "{{ item }}"}}}, "retry": retry},
            {"id": "join", "kind": "echo", "depends_on": ["fan"],
             "input": {"n": "{{ steps.fan.output | length }}"}, "retry": retry}
        ]
    })
}

/// Jobs a run of [`workflow_definition`] creates, per step id (a map child is `fan[i]`).
pub(crate) const WORKFLOW_STEP_JOBS: &[(&str, i64)] = &[
    ("fan[0]", 1),
    ("fan[1]", 1),
    ("fan[2]", 1),
    ("fan[3]", 1),
    ("join", 1),
];

/// Submits `jobs` pieces of work evenly over `secs`, `concurrency` at a time.
pub(crate) async fn run(
    sub: Arc<Submitter>,
    jobs: usize,
    secs: f64,
    concurrency: usize,
    workflow: String,
    callback_url: String,
) {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let every = Duration::from_secs_f64(secs / jobs.max(1) as f64);
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (sub, next, workflow, callback_url) = (
                sub.clone(),
                next.clone(),
                workflow.clone(),
                callback_url.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= jobs {
                        return;
                    }
                    let due = started + every * i as u32;
                    tokio::time::sleep_until(due.into()).await;
                    sub.submit(i, Shape::of(i), &workflow, &callback_url).await;
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}
