//! The client API (docs/api.md): jobs, events, kinds, workflows and runs, schedules, and the
//! worker protocol's registration and lease calls (docs/workers.md).

use std::{
    future::{Future, IntoFuture},
    pin::Pin,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use futures::Stream;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    http::{Http, Req},
    lease::Lease,
    sse,
    types::{
        Backoff, Event, Job, JobSpec, JobStatus, Kind, Page, Priority, Registration, Run, Schedule,
        ScheduleSpec, WorkerSpec, Workflow,
    },
};

/// A stream of events; ends after a job's or run's terminal event.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event>> + Send>>;

/// Where the API is when `CAPIBARA_URL` is not set.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// A client of one Capibara API. Cheap to clone: clones share the connection pool.
#[derive(Clone)]
pub struct Client {
    pub(crate) http: Http,
}

/// Settings of a [`Client`]: `Client::builder().url(..).api_key(..).build()`.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    url: String,
    api_key: Option<String>,
    max_retries: u32,
    timeout: Duration,
}

impl ClientBuilder {
    /// The API's base URL (`http://127.0.0.1:8080`).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// Sent as `Authorization: Bearer <key>`.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Retries of a failed idempotent call, and of a 429 (default 3).
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Per request, on top of any wait the server holds it for (default 30 s).
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    pub fn build(self) -> Result<Client> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(Error::Config(format!(
                "the API URL must start with http:// or https://, not `{}`",
                self.url
            )));
        }
        Ok(Client {
            http: Http::new(self.url, self.api_key, self.max_retries, self.timeout)?,
        })
    }
}

impl Client {
    /// Settings from scratch: `http://127.0.0.1:8080`, no key.
    pub fn builder() -> ClientBuilder {
        ClientBuilder {
            url: DEFAULT_URL.into(),
            api_key: None,
            max_retries: 3,
            timeout: Duration::from_secs(30),
        }
    }

    /// A client of `CAPIBARA_URL` (default `http://127.0.0.1:8080`) with `CAPIBARA_API_KEY`.
    pub fn from_env() -> Result<Client> {
        let mut b = Client::builder();
        if let Ok(url) = std::env::var("CAPIBARA_URL") {
            b = b.url(url);
        }
        if let Ok(key) = std::env::var("CAPIBARA_API_KEY") {
            b = b.api_key(key);
        }
        b.build()
    }

    /// A client of `url` with `api_key`.
    pub fn new(url: impl Into<String>, api_key: impl Into<String>) -> Result<Client> {
        Client::builder().url(url).api_key(api_key).build()
    }

    /// The API's base URL.
    pub fn url(&self) -> &str {
        &self.http.base
    }

    // ---- jobs ----

    /// Submit a job of `kind` with `input`: set options on the answer, then `.send().await`
    /// (or `.await` it).
    pub fn submit(&self, kind: impl Into<String>, input: Value) -> Submit<'_> {
        Submit {
            client: self,
            spec: JobSpec::new(kind, input),
            idempotency_key: None,
            wait: None,
        }
    }

    /// Submit a [`JobSpec`] as is.
    pub fn submit_spec(&self, spec: JobSpec) -> Submit<'_> {
        Submit {
            client: self,
            spec,
            idempotency_key: None,
            wait: None,
        }
    }

    /// Submit many jobs at once, all or nothing; the jobs in the same order.
    pub async fn submit_batch(&self, jobs: Vec<JobSpec>) -> Result<Vec<Job>> {
        let page: Page<Job> = self
            .http
            .json(Req::post("/v1/jobs/batch").json(json!({ "jobs": jobs })))
            .await?;
        Ok(page.items)
    }

    /// The job.
    pub async fn get(&self, id: Uuid) -> Result<Job> {
        self.http.json(Req::get(format!("/v1/jobs/{id}"))).await
    }

    /// The job, once it ended or after `wait` (≤ 60 s), whichever comes first.
    pub async fn get_wait(&self, id: Uuid, wait: Duration) -> Result<Job> {
        self.http
            .json(Req::get(format!("/v1/jobs/{id}")).prefer_wait(Some(wait)))
            .await
    }

    /// Wait until the job ends and return it, whatever its status; [`Error::Timeout`] after
    /// `timeout` (`None`: no limit).
    pub async fn wait(&self, id: Uuid, timeout: Option<Duration>) -> Result<Job> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let job = self
                .get_wait(id, left.unwrap_or(Duration::from_secs(60)))
                .await?;
            if job.status.is_terminal() {
                return Ok(job);
            }
            if left.is_some_and(|l| l.is_zero()) {
                return Err(Error::Timeout(format!(
                    "job {id} still {} after {:?}",
                    job.status,
                    timeout.unwrap_or_default()
                )));
            }
        }
    }

    /// A page of jobs, newest first.
    pub async fn list_jobs(&self, query: &JobQuery) -> Result<Page<Job>> {
        let mut req = Req::get("/v1/jobs")
            .query("status", query.status.map(|s| s.to_string()))
            .query("kind", query.kind.clone())
            .query("queue", query.queue.clone())
            .query("limit", query.limit.map(|l| l.to_string()))
            .query("cursor", query.cursor.clone());
        for (k, v) in &query.tags {
            req = req.query("tag", Some(format!("{k}:{v}")));
        }
        self.http.json(req).await
    }

    /// One page of the job's events: after event `after` (from the first when `None`).
    pub async fn events(
        &self,
        id: Uuid,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> Result<Page<Event>> {
        let req = Req::get(format!("/v1/jobs/{id}/events"))
            .query("after", after.map(str::to_string))
            .query("limit", limit.map(|l| l.to_string()));
        self.http.json(req).await
    }

    /// Every event of the job so far.
    pub async fn all_events(&self, id: Uuid) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.events(id, after.as_deref(), Some(500)).await?;
            out.extend(page.items);
            match page.next_cursor {
                Some(c) => after = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// The job's events as they happen (SSE), from the first or after `last_event_id`, ending
    /// after the terminal one. A dropped connection is resumed with `Last-Event-ID`: no gap,
    /// no duplicate. Drop the stream to stop.
    pub fn stream(&self, id: Uuid, last_event_id: Option<String>) -> EventStream {
        sse::follow(
            self.http.clone(),
            format!("/v1/jobs/{id}/events"),
            Vec::new(),
            last_event_id,
            Some(sse::job_terminal),
        )
    }

    /// The namespace's event firehose (`/v1/events`) as SSE: live events from now, or after
    /// `last_event_id` (`"0"`: the whole history). Never ends by itself.
    pub fn stream_all(&self, filter: &EventFilter, last_event_id: Option<String>) -> EventStream {
        let mut query = Vec::new();
        if !filter.types.is_empty() {
            query.push(("types", filter.types.join(",")));
        }
        if let Some(s) = &filter.stream_type {
            query.push(("stream_type", s.clone()));
        }
        if let Some(k) = &filter.kind {
            query.push(("kind", k.clone()));
        }
        for t in &filter.tags {
            query.push(("tag", t.clone()));
        }
        sse::follow(
            self.http.clone(),
            "/v1/events".into(),
            query,
            last_event_id,
            None,
        )
    }

    /// Cancel: a waiting job at once, a running one is told to stop (its handler is canceled).
    pub async fn cancel(&self, id: Uuid) -> Result<Job> {
        self.http
            .json(Req::post(format!("/v1/jobs/{id}/cancel")).idempotent(true))
            .await
    }

    /// Queue a failed or canceled job again with a fresh budget of attempts.
    pub async fn retry(&self, id: Uuid) -> Result<Job> {
        self.http
            .json(Req::post(format!("/v1/jobs/{id}/retry")))
            .await
    }

    // ---- kinds ----

    /// Create or replace your kind `name`.
    pub async fn put_kind(&self, name: &str, spec: &crate::types::KindSpec) -> Result<Kind> {
        let body = serde_json::to_value(spec).map_err(|e| Error::decode("a kind spec", e))?;
        self.http
            .json(Req::new(Method::PUT, format!("/v1/kinds/{name}")).json(body))
            .await
    }

    pub async fn get_kind(&self, name: &str) -> Result<Kind> {
        self.http.json(Req::get(format!("/v1/kinds/{name}"))).await
    }

    /// The built-in kinds and the namespace's own.
    pub async fn list_kinds(&self) -> Result<Vec<Kind>> {
        let page: Page<Kind> = self.http.json(Req::get("/v1/kinds")).await?;
        Ok(page.items)
    }

    /// Stop new submissions of the kind (jobs already submitted still run).
    pub async fn delete_kind(&self, name: &str) -> Result<()> {
        self.http
            .empty(Req::new(Method::DELETE, format!("/v1/kinds/{name}")))
            .await
    }

    // ---- workflows and runs ----

    /// Create a workflow from its definition (docs/workflows.md).
    pub async fn create_workflow(&self, definition: Value) -> Result<Workflow> {
        self.http
            .json(Req::post("/v1/workflows").json(definition))
            .await
    }

    pub async fn get_workflow(&self, id: Uuid) -> Result<Workflow> {
        self.http
            .json(Req::get(format!("/v1/workflows/{id}")))
            .await
    }

    pub async fn delete_workflow(&self, id: Uuid) -> Result<()> {
        self.http
            .empty(Req::new(Method::DELETE, format!("/v1/workflows/{id}")))
            .await
    }

    /// Start a run of the workflow's latest version: set options, then `.send().await`.
    pub fn start_run(&self, workflow_id: Uuid, input: Value) -> StartRun<'_> {
        StartRun {
            client: self,
            workflow_id,
            input,
            idempotency_key: None,
            wait: None,
        }
    }

    /// The run (each step's status, job and output).
    pub async fn get_run(&self, id: Uuid) -> Result<Run> {
        self.http.json(Req::get(format!("/v1/runs/{id}"))).await
    }

    /// Wait until the run ends; [`Error::Timeout`] after `timeout` (`None`: no limit).
    pub async fn wait_run(&self, id: Uuid, timeout: Option<Duration>) -> Result<Run> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let req = Req::get(format!("/v1/runs/{id}"))
                .prefer_wait(Some(left.unwrap_or(Duration::from_secs(60))));
            let run: Run = self.http.json(req).await?;
            if run.status.is_terminal() {
                return Ok(run);
            }
            if left.is_some_and(|l| l.is_zero()) {
                return Err(Error::Timeout(format!(
                    "run {id} still {:?} after {:?}",
                    run.status,
                    timeout.unwrap_or_default()
                )));
            }
        }
    }

    pub async fn cancel_run(&self, id: Uuid) -> Result<Run> {
        self.http
            .json(Req::post(format!("/v1/runs/{id}/cancel")).idempotent(true))
            .await
    }

    /// The run's events as SSE, like [`Client::stream`] for a job.
    pub fn stream_run(&self, id: Uuid, last_event_id: Option<String>) -> EventStream {
        sse::follow(
            self.http.clone(),
            format!("/v1/runs/{id}/events"),
            Vec::new(),
            last_event_id,
            Some(sse::run_terminal),
        )
    }

    // ---- schedules ----

    pub async fn create_schedule(&self, spec: &ScheduleSpec) -> Result<Schedule> {
        let body = serde_json::to_value(spec).map_err(|e| Error::decode("a schedule", e))?;
        self.http.json(Req::post("/v1/schedules").json(body)).await
    }

    pub async fn get_schedule(&self, id: Uuid) -> Result<Schedule> {
        self.http
            .json(Req::get(format!("/v1/schedules/{id}")))
            .await
    }

    /// A page of schedules.
    pub async fn list_schedules(&self, cursor: Option<&str>) -> Result<Page<Schedule>> {
        self.http
            .json(Req::get("/v1/schedules").query("cursor", cursor.map(str::to_string)))
            .await
    }

    pub async fn pause_schedule(&self, id: Uuid) -> Result<Schedule> {
        self.http
            .json(Req::post(format!("/v1/schedules/{id}/pause")).idempotent(true))
            .await
    }

    pub async fn resume_schedule(&self, id: Uuid) -> Result<Schedule> {
        self.http
            .json(Req::post(format!("/v1/schedules/{id}/resume")).idempotent(true))
            .await
    }

    /// Fire a tick now; the answer's `last_job_id` is its job.
    pub async fn trigger_schedule(&self, id: Uuid) -> Result<Schedule> {
        self.http
            .json(Req::post(format!("/v1/schedules/{id}/trigger")))
            .await
    }

    pub async fn delete_schedule(&self, id: Uuid) -> Result<()> {
        self.http
            .empty(Req::new(Method::DELETE, format!("/v1/schedules/{id}")))
            .await
    }

    // ---- the worker protocol ----

    /// Register a worker (and declare its kinds).
    pub async fn register_worker(&self, spec: &WorkerSpec) -> Result<Registration> {
        let body = serde_json::to_value(spec).map_err(|e| Error::decode("a worker spec", e))?;
        self.http.json(Req::post("/v1/workers").json(body)).await
    }

    /// Lease up to `max_jobs` (1-100) jobs, holding the call up to `wait` (≤ 30 s) while none
    /// is waiting. Possibly none.
    pub async fn lease_jobs(
        &self,
        worker_id: Uuid,
        max_jobs: u32,
        wait: Duration,
    ) -> Result<Vec<Lease>> {
        let wait = wait.min(Duration::from_secs(30));
        let mut req = Req::post(format!("/v1/workers/{worker_id}/lease")).json(json!({
            "max_jobs": max_jobs.clamp(1, 100),
            "wait_ms": wait.as_millis() as u64,
        }));
        req.extra_wait = wait;
        #[derive(Deserialize)]
        struct Leased {
            jobs: Vec<LeasedJob>,
        }
        #[derive(Deserialize)]
        struct LeasedJob {
            job: Job,
            lease: LeaseInfo,
        }
        #[derive(Deserialize)]
        struct LeaseInfo {
            token: String,
            expires_at: DateTime<Utc>,
        }
        let leased: Leased = self.http.json(req).await?;
        Ok(leased
            .jobs
            .into_iter()
            .map(|j| Lease::new(self.clone(), j.job, j.lease.token, j.lease.expires_at))
            .collect())
    }

    /// Mark the worker stopped (release or finish its jobs first).
    pub async fn deregister_worker(&self, worker_id: Uuid) -> Result<()> {
        self.http
            .empty(Req::new(Method::DELETE, format!("/v1/workers/{worker_id}")))
            .await
    }
}

/// Filters of [`Client::list_jobs`].
#[derive(Debug, Clone, Default)]
pub struct JobQuery {
    pub status: Option<JobStatus>,
    pub kind: Option<String>,
    pub queue: Option<String>,
    /// `key → value` tags every job must carry.
    pub tags: Vec<(String, String)>,
    /// 1-500 (default 50).
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// Filters of [`Client::stream_all`]; all must hold.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Event types (`JobSucceeded`, …).
    pub types: Vec<String>,
    /// `job`, `run`, `workflow`, `schedule`, …
    pub stream_type: Option<String>,
    /// Events of jobs of this kind.
    pub kind: Option<String>,
    /// `key:value` tags.
    pub tags: Vec<String>,
}

/// A submission being prepared: [`Client::submit`].
#[must_use = "a submission does nothing until sent: `.send().await`"]
pub struct Submit<'a> {
    client: &'a Client,
    spec: JobSpec,
    idempotency_key: Option<String>,
    wait: Option<Duration>,
}

impl<'a> Submit<'a> {
    /// Queue its jobs go to (default: the kind's).
    pub fn queue(mut self, q: impl Into<String>) -> Self {
        self.spec.queue = Some(q.into());
        self
    }

    pub fn priority(mut self, p: Priority) -> Self {
        self.spec.priority = Some(p);
        self
    }

    /// Not before this time (`scheduled` until then).
    pub fn run_at(mut self, t: DateTime<Utc>) -> Self {
        self.spec.run_at = Some(t);
        self
    }

    /// Attempts (1-100).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.spec.max_attempts = Some(n);
        self
    }

    /// Per-attempt timeout in seconds.
    pub fn timeout_s(mut self, s: u32) -> Self {
        self.spec.timeout_s = Some(s);
        self
    }

    pub fn backoff(mut self, b: Backoff) -> Self {
        self.spec.backoff = Some(b);
        self
    }

    pub fn tag(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.spec.tags.insert(k.into(), v.into());
        self
    }

    /// Signed POSTs of the job's events to this URL (docs/deliveries.md).
    pub fn callback_url(mut self, url: impl Into<String>) -> Self {
        self.spec.callback_url = Some(url.into());
        self
    }

    /// Any submission with `key` within `window_s` seconds of the first returns the first's
    /// job, whatever its body (docs/flow-control.md; also makes the call safe to retry).
    pub fn dedup(mut self, key: impl Into<String>, window_s: u32) -> Self {
        self.spec.dedup = Some(crate::Dedup {
            key: key.into(),
            window_s,
        });
        self
    }

    /// While the job of an earlier submission with `key` still waits, merge into it (this
    /// input, due `delay_s` from now) instead of making another (docs/flow-control.md).
    pub fn debounce(mut self, key: impl Into<String>, delay_s: u32) -> Self {
        self.spec.debounce = Some(crate::Debounce {
            key: key.into(),
            delay_s,
        });
        self
    }

    /// Canceled (`expired`, no attempt used) if not started within `ttl_s` seconds of being
    /// due.
    pub fn ttl_s(mut self, ttl_s: u32) -> Self {
        self.spec.ttl_s = Some(ttl_s);
        self
    }

    /// Must end within `deadline_s` seconds of being due, across all attempts
    /// (`deadline_exceeded`).
    pub fn deadline_s(mut self, deadline_s: u32) -> Self {
        self.spec.deadline_s = Some(deadline_s);
        self
    }

    /// Run one at a time with the other jobs of `key`, in submission order (retries included).
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.spec.ordering_key = Some(key.into());
        self
    }

    /// The same key and body return the same job (also makes the call safe to retry).
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Answer with the finished job if it ends within `wait` (≤ 60 s; `Prefer: wait`).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Send it; the job as it is now (finished, with [`Submit::wait`], if it ended in time).
    pub async fn send(self) -> Result<Job> {
        let body = serde_json::to_value(&self.spec).map_err(|e| Error::decode("a job", e))?;
        let retry_safe = self.idempotency_key.is_some()
            || self.spec.dedup.is_some()
            || self.spec.debounce.is_some();
        let req = Req::post("/v1/jobs")
            .json(body)
            .idempotent(retry_safe)
            .header("idempotency-key", self.idempotency_key)
            .prefer_wait(self.wait);
        self.client.http.json(req).await
    }
}

impl<'a> IntoFuture for Submit<'a> {
    type Output = Result<Job>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Job>> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

/// A run being started: [`Client::start_run`].
#[must_use = "a run does not start until sent: `.send().await`"]
pub struct StartRun<'a> {
    client: &'a Client,
    workflow_id: Uuid,
    input: Value,
    idempotency_key: Option<String>,
    wait: Option<Duration>,
}

impl<'a> StartRun<'a> {
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Answer with the finished run if it ends within `wait` (≤ 60 s).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    pub async fn send(self) -> Result<Run> {
        let req = Req::post(format!("/v1/workflows/{}/runs", self.workflow_id))
            .json(json!({ "input": self.input }))
            .idempotent(self.idempotency_key.is_some())
            .header("idempotency-key", self.idempotency_key)
            .prefer_wait(self.wait);
        self.client.http.json(req).await
    }
}

impl<'a> IntoFuture for StartRun<'a> {
    type Output = Result<Run>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Run>> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_without_a_scheme_is_refused() {
        let e = Client::builder().url("127.0.0.1:8080").build().err();
        assert!(matches!(e, Some(Error::Config(_))), "{e:?}");
        assert!(Client::new("http://127.0.0.1:1/", "k").is_ok());
    }

    #[test]
    fn the_base_url_loses_its_trailing_slash() {
        let c = Client::new("http://127.0.0.1:1/", "k").unwrap();
        assert_eq!(c.url(), "http://127.0.0.1:1");
    }
}
