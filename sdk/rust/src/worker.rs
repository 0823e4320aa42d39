//! A worker: handlers registered by kind, run over the HTTP worker protocol (docs/workers.md).
//!
//! It registers its kinds, long-polls leases for as many jobs as it has free slots, heartbeats
//! each running job every `heartbeat_s` (a requested cancel cancels the handler), enforces
//! `timeout_s`, reports the outcome, and on shutdown (SIGTERM, Ctrl-C, a
//! [`CancellationToken`], [`RunningWorker::stop`]) stops leasing, lets running handlers finish
//! within a grace period, releases the rest and deregisters. A lost lease drops its job, never
//! the worker.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use futures::FutureExt;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use uuid::Uuid;

use crate::{
    client::Client,
    error::{Error, HandlerError, Result},
    http::backoff,
    lease::{Failure, Lease},
    types::{Job, KindDecl, KindSpec, LogLevel, LogLine, Progress, Registration, WorkerSpec},
};

type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, HandlerError>> + Send>>;
pub(crate) type HandlerFn = Arc<dyn Fn(JobContext) -> HandlerFuture + Send + Sync>;

/// Why a running job's handler was told to stop ([`JobContext::stop_reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The job's cancel was requested: it ends `canceled`.
    Canceled,
    /// The attempt ran past its `timeout_s`: it fails with type `timeout` and is retried.
    Timeout,
    /// The lease expired or was taken over: the job is no longer this worker's.
    LeaseLost,
    /// The worker is shutting down and gave the job back (released).
    Shutdown,
}

/// A running job's stop signal: the first reason wins.
pub(crate) struct JobState {
    token: CancellationToken,
    reason: Mutex<Option<StopReason>>,
}

impl JobState {
    pub(crate) fn new() -> JobState {
        JobState {
            token: CancellationToken::new(),
            reason: Mutex::new(None),
        }
    }

    pub(crate) fn stop(&self, why: StopReason) {
        {
            let mut r = self.reason.lock().expect("job state");
            if r.is_none() {
                *r = Some(why);
            }
        }
        self.token.cancel();
    }

    pub(crate) fn reason(&self) -> Option<StopReason> {
        *self.reason.lock().expect("job state")
    }
}

/// What a handler receives: the job, calls to report while it runs, and its cancellation.
/// Cheap to clone (to move into tasks the handler spawns).
#[derive(Clone)]
pub struct JobContext {
    pub id: Uuid,
    pub kind: String,
    pub input: Value,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub max_attempts: u32,
    inner: Arc<ContextInner>,
}

struct ContextInner {
    reports: Reports,
    state: Arc<JobState>,
    /// The next output chunk's number.
    seq: AtomicU64,
}

/// Where a running job's reports go.
enum Reports {
    /// Over the HTTP protocol, with the lease token.
    Http(Arc<Lease>),
    /// Into the worker runtime of this process ([`crate::in_process`]).
    #[cfg(feature = "in-process")]
    InProcess(Box<crate::in_process::Reports>),
}

impl JobContext {
    fn new(lease: Arc<Lease>, state: Arc<JobState>) -> JobContext {
        Self::with_reports(Reports::Http(lease), state)
    }

    fn with_reports(reports: Reports, state: Arc<JobState>) -> JobContext {
        let j = match &reports {
            Reports::Http(lease) => &lease.job,
            #[cfg(feature = "in-process")]
            Reports::InProcess(r) => &r.job,
        };
        JobContext {
            id: j.id,
            kind: j.kind.clone(),
            input: j.input.clone(),
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            inner: Arc::new(ContextInner {
                reports,
                state,
                seq: AtomicU64::new(0),
            }),
        }
    }

    /// A context whose reports go into this process's worker runtime.
    #[cfg(feature = "in-process")]
    pub(crate) fn in_process(reports: crate::in_process::Reports, state: Arc<JobState>) -> Self {
        Self::with_reports(Reports::InProcess(Box::new(reports)), state)
    }

    /// The input as `T`; an input that does not fit fails the job without retry
    /// (`invalid_input`).
    pub fn input_as<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_value(self.input.clone())
            .map_err(|e| HandlerError::fatal("invalid_input", e.to_string()))
    }

    /// The job as leased (queue, tags, `timeout_s`, …).
    pub fn job(&self) -> &Job {
        match &self.inner.reports {
            Reports::Http(lease) => &lease.job,
            #[cfg(feature = "in-process")]
            Reports::InProcess(r) => &r.job,
        }
    }

    /// The lease (token, raw protocol calls); `None` in-process, where there is no token.
    pub fn lease(&self) -> Option<&Lease> {
        match &self.inner.reports {
            Reports::Http(lease) => Some(lease),
            #[cfg(feature = "in-process")]
            Reports::InProcess(_) => None,
        }
    }

    /// Resolves when the handler should stop: the job was canceled, timed out, lost its lease
    /// or is released at shutdown. The worker reports at once and drops the handler's future;
    /// await this where the handler has cleanup to do first.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.inner.state.token.cancelled()
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.state.token.is_cancelled()
    }

    /// Why the handler was told to stop, once it was.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.inner.state.reason()
    }

    /// A token cancelled with the job, for code that takes one.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.inner.state.token.clone()
    }

    /// Record progress: `percent` (0-100) and a message (cut at 1,000 characters).
    pub async fn progress(&self, percent: f64, message: impl Into<String>) -> Result<()> {
        self.report_progress(Progress {
            percent: Some(percent),
            message: Some(message.into()),
            data: None,
        })
        .await
    }

    /// Record progress with any of percent, message, data. Best effort: a failed call is
    /// logged and `Ok`, except a lost lease, which is [`Error::LeaseLost`] (and cancels the
    /// handler): the job is no longer yours.
    pub async fn report_progress(&self, mut p: Progress) -> Result<()> {
        if let Some(m) = &mut p.message {
            cut(m, 1000);
        }
        let r = match &self.inner.reports {
            Reports::Http(lease) => lease.progress(&p).await,
            #[cfg(feature = "in-process")]
            Reports::InProcess(r) => {
                r.sink
                    .progress_with_data(p.percent, p.message, p.data)
                    .await;
                Ok(())
            }
        };
        self.best("progress", r)
    }

    /// Record a log line (cut at 10,000 characters). Best effort, like `report_progress`.
    pub async fn log(&self, level: LogLevel, message: impl Into<String>) -> Result<()> {
        let mut message = message.into();
        cut(&mut message, 10_000);
        let r = match &self.inner.reports {
            Reports::Http(lease) => lease.logs(&[LogLine { level, message }]).await,
            #[cfg(feature = "in-process")]
            Reports::InProcess(r) => {
                r.sink.log(level.as_str(), message).await;
                Ok(())
            }
        };
        self.best("log", r)
    }

    /// Stream an output chunk to SSE readers (numbered from 0). Best effort, like
    /// `report_progress`.
    pub async fn chunk(&self, data: impl Serialize) -> Result<()> {
        let data = serde_json::to_value(data).map_err(|e| Error::decode("an output chunk", e))?;
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let r = match &self.inner.reports {
            Reports::Http(lease) => lease.chunk(seq, data).await,
            #[cfg(feature = "in-process")]
            Reports::InProcess(r) => {
                r.sink.output_chunk(seq, data).await;
                Ok(())
            }
        };
        self.best("chunk", r)
    }

    fn best(&self, what: &str, r: Result<()>) -> Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(e @ Error::LeaseLost(_)) => {
                self.inner.state.stop(StopReason::LeaseLost);
                Err(e)
            }
            Err(e) => {
                tracing::warn!(job = %self.id, error = %e, "{what} not recorded");
                Ok(())
            }
        }
    }
}

/// Cut `s` to at most `max` characters.
fn cut(s: &mut String, max: usize) {
    if let Some((i, _)) = s.char_indices().nth(max) {
        s.truncate(i);
    }
}

pub(crate) struct HandlerEntry {
    pub(crate) f: HandlerFn,
}

/// How a worker reaches Capibara.
enum Transport {
    /// The HTTP worker protocol, through a [`Client`].
    Http(Client),
    /// Directly, inside this process ([`crate::in_process`]).
    #[cfg(feature = "in-process")]
    InProcess(Box<crate::in_process::InProcess>),
}

/// The settings of a worker: [`Worker::builder`].
#[must_use = "a worker does nothing until started: `.run().await` or `.start().await`"]
pub struct WorkerBuilder {
    transport: Transport,
    handlers: BTreeMap<String, HandlerEntry>,
    specs: BTreeMap<String, KindSpec>,
    concurrency: u32,
    name: Option<String>,
    labels: BTreeMap<String, String>,
    version: Option<String>,
    queues: Option<Vec<String>>,
    grace: Duration,
    poll_wait: Duration,
    signals: bool,
    shutdown: Option<CancellationToken>,
}

/// A worker of your own kinds. Build it with [`Worker::builder`].
pub struct Worker;

impl Worker {
    /// A worker on `client`: add handlers with [`WorkerBuilder::handle`], then
    /// [`WorkerBuilder::run`].
    pub fn builder(client: Client) -> WorkerBuilder {
        Self::with_transport(Transport::Http(client))
    }

    /// A worker that runs its handlers inside this process with `capibara-worker`'s own
    /// runtime, straight on Postgres and Redis (feature `in-process`; see
    /// [`crate::in_process`]).
    #[cfg(feature = "in-process")]
    pub fn in_process(connection: crate::in_process::InProcess) -> WorkerBuilder {
        Self::with_transport(Transport::InProcess(Box::new(connection)))
    }

    fn with_transport(transport: Transport) -> WorkerBuilder {
        WorkerBuilder {
            transport,
            handlers: BTreeMap::new(),
            specs: BTreeMap::new(),
            concurrency: 32,
            name: None,
            labels: BTreeMap::new(),
            version: None,
            queues: None,
            grace: Duration::from_secs(30),
            poll_wait: Duration::from_secs(30),
            signals: true,
            shutdown: None,
        }
    }
}

impl WorkerBuilder {
    /// Run `handler` for jobs of `kind`; what it returns (serialized) is the job's output.
    pub fn handle<F, Fut, T>(mut self, kind: impl Into<String>, handler: F) -> Self
    where
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, HandlerError>> + Send + 'static,
        T: Serialize + 'static,
    {
        let f: HandlerFn = Arc::new(move |ctx| {
            Box::pin(handler(ctx).map(|r| {
                r.and_then(|out| {
                    serde_json::to_value(out)
                        .map_err(|e| HandlerError::fatal("invalid_output", e.to_string()))
                })
            }))
        });
        self.handlers.insert(kind.into(), HandlerEntry { f });
        self
    }

    /// Declare `kind`'s definition: it is registered (or updated) when the worker registers.
    /// Without one, the kind is taken as it is (or registered with the defaults).
    pub fn kind_definition(mut self, kind: impl Into<String>, spec: KindSpec) -> Self {
        self.specs.insert(kind.into(), spec);
        self
    }

    /// Jobs run at once (default 32).
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Shown in `GET /v1/workers` (the server adds a unique suffix).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    pub fn label(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    /// Your code's version.
    pub fn version(mut self, v: impl Into<String>) -> Self {
        self.version = Some(v.into());
        self
    }

    /// Queues to take jobs from (default: each kind's queue).
    pub fn queues<I: IntoIterator<Item = S>, S: Into<String>>(mut self, queues: I) -> Self {
        self.queues = Some(queues.into_iter().map(Into::into).collect());
        self
    }

    /// On shutdown, how long running handlers may finish before their jobs are released
    /// (default 30 s).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// How long one lease call waits for a job (default and at most 30 s).
    pub fn poll_wait(mut self, wait: Duration) -> Self {
        self.poll_wait = wait.min(Duration::from_secs(30));
        self
    }

    /// Whether [`WorkerBuilder::run`] shuts down on SIGTERM and Ctrl-C (default true; a
    /// second signal releases running jobs at once).
    pub fn handle_signals(mut self, yes: bool) -> Self {
        self.signals = yes;
        self
    }

    /// Shut down when `token` is cancelled.
    pub fn shutdown_token(mut self, token: CancellationToken) -> Self {
        self.shutdown = Some(token);
        self
    }

    /// Register, then lease and run jobs in the background; the handle stops it.
    pub async fn start(self) -> Result<RunningWorker> {
        if self.handlers.is_empty() {
            return Err(Error::Config(
                "no handlers: call handle() before starting".into(),
            ));
        }
        if let Some(kind) = self.specs.keys().find(|k| !self.handlers.contains_key(*k)) {
            return Err(Error::Config(format!(
                "kind `{kind}` has a definition but no handler"
            )));
        }
        let stop = match &self.shutdown {
            Some(t) => t.child_token(),
            None => CancellationToken::new(),
        };
        let client = match self.transport {
            Transport::Http(client) => client,
            #[cfg(feature = "in-process")]
            Transport::InProcess(connection) => {
                let running = crate::in_process::start(
                    *connection,
                    crate::in_process::Settings {
                        handlers: self.handlers,
                        specs: self.specs,
                        concurrency: self.concurrency,
                        queues: self.queues,
                        grace: self.grace,
                    },
                    stop.clone(),
                )
                .await?;
                return Ok(RunningWorker {
                    mode: Mode::InProcess(running),
                    stop,
                    signals: self.signals,
                });
            }
        };
        let mut specs = self.specs;
        let spec = WorkerSpec {
            kinds: self
                .handlers
                .keys()
                .map(|name| match specs.remove(name) {
                    Some(spec) => KindDecl::Defined {
                        name: name.clone(),
                        spec,
                    },
                    None => KindDecl::Name(name.clone()),
                })
                .collect(),
            queues: self.queues,
            concurrency: Some(self.concurrency),
            name: self.name,
            labels: self.labels,
            version: self.version,
        };
        let registration = client.register_worker(&spec).await?;
        tracing::info!(worker = %registration.id, name = %registration.name, "registered");
        let shared = Arc::new(Shared {
            client,
            handlers: self.handlers.into_iter().collect(),
            spec,
            registration: Mutex::new(registration),
            slots: Arc::new(Semaphore::new(self.concurrency as usize)),
            concurrency: self.concurrency,
            jobs: Mutex::new(HashMap::new()),
            poll_wait: self.poll_wait,
            grace: self.grace,
            skip_grace: CancellationToken::new(),
        });
        let task = tokio::spawn(lease_loop(shared.clone(), stop.clone()));
        Ok(RunningWorker {
            mode: Mode::Http { shared, task },
            stop,
            signals: self.signals,
        })
    }

    /// Start, and run until SIGTERM or Ctrl-C (see [`WorkerBuilder::handle_signals`]), the
    /// shutdown token, or an error registering. Returns after the shutdown: running jobs
    /// finished or released, the worker deregistered.
    pub async fn run(self) -> Result<()> {
        self.start().await?.wait().await;
        Ok(())
    }
}

/// What the worker's tasks share.
struct Shared {
    client: Client,
    handlers: HashMap<String, HandlerEntry>,
    /// What it registers with (again, when the server forgot it).
    spec: WorkerSpec,
    registration: Mutex<Registration>,
    /// One permit per free slot: a running job holds one.
    slots: Arc<Semaphore>,
    concurrency: u32,
    /// Running jobs, to release at shutdown.
    jobs: Mutex<HashMap<Uuid, Arc<JobState>>>,
    poll_wait: Duration,
    grace: Duration,
    /// Cancelled to end the grace period at once (a second signal).
    skip_grace: CancellationToken,
}

/// A started worker.
pub struct RunningWorker {
    mode: Mode,
    /// Cancelled to begin the shutdown.
    stop: CancellationToken,
    signals: bool,
}

/// What runs a started worker.
enum Mode {
    /// The lease loop of the HTTP protocol.
    Http {
        shared: Arc<Shared>,
        task: JoinHandle<()>,
    },
    /// `capibara-worker`'s runtime in this process.
    #[cfg(feature = "in-process")]
    InProcess(crate::in_process::Running),
}

impl RunningWorker {
    /// The registration answer (`id`, `lease_s`, `heartbeat_s`, …); in-process, the same
    /// figures of the worker's own registration.
    pub fn registration(&self) -> Registration {
        match &self.mode {
            Mode::Http { shared, .. } => shared.registration.lock().expect("registration").clone(),
            #[cfg(feature = "in-process")]
            Mode::InProcess(r) => r.registration.clone(),
        }
    }

    /// The worker's id.
    pub fn id(&self) -> Uuid {
        self.registration().id
    }

    /// How many jobs run now.
    pub fn running(&self) -> usize {
        match &self.mode {
            Mode::Http { shared, .. } => shared.jobs.lock().expect("jobs").len(),
            #[cfg(feature = "in-process")]
            Mode::InProcess(r) => r.running(),
        }
    }

    /// Cancel it to begin the shutdown ([`RunningWorker::wait`] then finishes it).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Shut down now: stop leasing, give running handlers the grace period, release the
    /// rest, deregister.
    pub async fn stop(mut self) {
        self.stop.cancel();
        self.shutdown().await;
    }

    /// Run until the shutdown token is cancelled (or SIGTERM / Ctrl-C, unless signals are
    /// off), then shut down.
    pub async fn wait(mut self) {
        if self.signals {
            tokio::select! {
                _ = self.stop.cancelled() => {}
                _ = shutdown_signal() => {
                    tracing::info!("shutdown signal: stopping");
                    self.stop.cancel();
                }
            }
            // A second signal ends the grace period (over HTTP; in-process the runtime keeps
            // its grace).
            let second = match &self.mode {
                Mode::Http { shared, .. } => {
                    let skip = shared.skip_grace.clone();
                    Some(tokio::spawn(async move {
                        shutdown_signal().await;
                        tracing::warn!("second signal: releasing running jobs now");
                        skip.cancel();
                    }))
                }
                #[cfg(feature = "in-process")]
                Mode::InProcess(_) => None,
            };
            self.shutdown().await;
            if let Some(second) = second {
                second.abort();
            }
        } else {
            self.stop.cancelled().await;
            self.shutdown().await;
        }
    }

    async fn shutdown(&mut self) {
        let (shared, task) = match &mut self.mode {
            Mode::Http { shared, task } => (shared.clone(), task),
            #[cfg(feature = "in-process")]
            Mode::InProcess(r) => return r.finish().await,
        };
        let _ = task.await;
        let all = shared.concurrency;
        let finished = tokio::select! {
            r = shared.slots.acquire_many(all) => r.is_ok(),
            _ = tokio::time::sleep(shared.grace) => false,
            _ = shared.skip_grace.cancelled() => false,
        };
        if !finished {
            let running: Vec<_> = shared
                .jobs
                .lock()
                .expect("jobs")
                .values()
                .cloned()
                .collect();
            tracing::info!(jobs = running.len(), "grace period over: releasing");
            for j in running {
                j.stop(StopReason::Shutdown);
            }
            // Each releases its job (one call, with the client's timeout and retries).
            let _ = tokio::time::timeout(Duration::from_secs(120), shared.slots.acquire_many(all))
                .await;
        }
        let id = shared.registration.lock().expect("registration").id;
        if let Err(e) = shared.client.deregister_worker(id).await {
            tracing::warn!(worker = %id, error = %e, "deregister failed");
        }
    }
}

/// Dropped without [`RunningWorker::stop`] or [`RunningWorker::wait`]: it stops leasing;
/// running jobs still finish and report, but nothing is released or deregistered.
impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Ctrl-C, or SIGTERM on Unix. Never resolves if the signals cannot be watched.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    r = tokio::signal::ctrl_c() => {
                        if r.is_err() {
                            term.recv().await;
                        }
                    }
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM");
                if tokio::signal::ctrl_c().await.is_err() {
                    futures::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        if tokio::signal::ctrl_c().await.is_err() {
            futures::future::pending::<()>().await;
        }
    }
}

/// Lease jobs for the free slots until `stop`.
async fn lease_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut failures = 0;
    loop {
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            p = shared.slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let mut permits = vec![first];
        while permits.len() < 100 {
            match shared.slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let id = shared.registration.lock().expect("registration").id;
        let leased = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = shared.client.lease_jobs(id, permits.len() as u32, shared.poll_wait) => r,
        };
        match leased {
            Ok(leases) => {
                failures = 0;
                for lease in leases {
                    match permits.pop() {
                        Some(permit) => spawn_job(&shared, lease, permit),
                        None => {
                            // More jobs than asked for: not ours to run now.
                            tokio::spawn(async move {
                                if let Err(e) = lease.release().await {
                                    dropped(lease.job.id, "release", &e);
                                }
                            });
                        }
                    }
                }
            }
            Err(e) => {
                drop(permits);
                tracing::warn!(error = %e, "lease failed");
                if matches!(e, Error::NotFound(_) | Error::Conflict(_)) {
                    // The registration is gone (or was deregistered): register again.
                    match shared.client.register_worker(&shared.spec).await {
                        Ok(r) => *shared.registration.lock().expect("registration") = r,
                        Err(e) => tracing::warn!(error = %e, "register again failed"),
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff(failures)) => {}
                }
                failures += 1;
            }
        }
    }
}

fn spawn_job(shared: &Arc<Shared>, lease: Lease, permit: OwnedSemaphorePermit) {
    let state = Arc::new(JobState::new());
    let id = lease.job.id;
    shared.jobs.lock().expect("jobs").insert(id, state.clone());
    let shared = shared.clone();
    tokio::spawn(async move {
        run_job(&shared, Arc::new(lease), state).await;
        shared.jobs.lock().expect("jobs").remove(&id);
        drop(permit);
    });
}

/// What came of the handler.
enum Outcome {
    Finished(Result<Value, HandlerError>),
    /// Told to stop before it finished (see the job's reason).
    Stopped,
}

async fn run_job(shared: &Shared, lease: Arc<Lease>, state: Arc<JobState>) {
    let id = lease.job.id;
    let Some(handler) = shared.handlers.get(&lease.job.kind) else {
        tracing::warn!(job = %id, kind = %lease.job.kind, "no handler; releasing");
        if let Err(e) = lease.release().await {
            dropped(id, "release", &e);
        }
        return;
    };
    let every = {
        let r = shared.registration.lock().expect("registration");
        Duration::from_secs_f64(r.heartbeat_s.max(0.1))
    };
    let done = CancellationToken::new();
    let beats = tokio::spawn(heartbeats(
        lease.clone(),
        state.clone(),
        every,
        done.clone(),
    ));
    let timeout = lease
        .job
        .timeout_s
        .or_else(|| shared.spec_timeout(&lease.job.kind))
        .map(|s| Duration::from_secs(u64::from(s)));
    let ctx = JobContext::new(lease.clone(), state.clone());
    let run = AssertUnwindSafe((handler.f)(ctx)).catch_unwind();
    let timer = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => futures::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        biased;
        r = run => Outcome::Finished(r.unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the handler panicked".into());
            Err(HandlerError::Retryable { error_type: "panic".into(), message })
        })),
        _ = state.token.cancelled() => Outcome::Stopped,
        _ = timer => {
            state.stop(StopReason::Timeout);
            Outcome::Stopped
        }
    };
    done.cancel();
    beats.abort();
    let _ = beats.await;
    report(&lease, &state, outcome, timeout).await;
}

impl Shared {
    fn spec_timeout(&self, kind: &str) -> Option<u32> {
        self.spec.kinds.iter().find_map(|k| match k {
            KindDecl::Defined { name, spec } if name == kind => spec.timeout_s,
            _ => None,
        })
    }
}

/// Renew the lease every `every` until `done`; a requested cancel or a lost lease stops the
/// handler.
async fn heartbeats(
    lease: Arc<Lease>,
    state: Arc<JobState>,
    every: Duration,
    done: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match lease.heartbeat().await {
            Ok(hb) if hb.cancel_requested => state.stop(StopReason::Canceled),
            Ok(_) => {}
            Err(Error::LeaseLost(_) | Error::Conflict(_) | Error::NotFound(_)) => {
                state.stop(StopReason::LeaseLost);
                return;
            }
            Err(e) => tracing::warn!(job = %lease.job.id, error = %e, "heartbeat failed"),
        }
    }
}

/// Report what came of the job.
async fn report(lease: &Lease, state: &JobState, outcome: Outcome, timeout: Option<Duration>) {
    let id = lease.job.id;
    let reason = state.reason();
    if reason == Some(StopReason::LeaseLost) {
        tracing::warn!(job = %id, "lease lost; dropped");
        return;
    }
    let failure = match (outcome, reason) {
        (Outcome::Finished(Ok(output)), _) => {
            match lease.complete(output).await {
                Ok(_) => {}
                Err(Error::Validation(p)) => {
                    // The output does not match the kind's output_schema.
                    let f = failure("invalid_output", &p.detail, false, None);
                    if let Err(e) = lease.fail(&f).await {
                        dropped(id, "fail", &e);
                    }
                }
                Err(e) => dropped(id, "complete", &e),
            }
            return;
        }
        (Outcome::Finished(Err(e)), None) => match e {
            HandlerError::Retryable {
                error_type,
                message,
            } => failure(&error_type, &message, true, None),
            HandlerError::Fatal {
                error_type,
                message,
            } => failure(&error_type, &message, false, None),
            HandlerError::RetryAfter { delay, message } => {
                failure("retry_after", &message, true, Some(delay.as_secs_f64()))
            }
        },
        (_, Some(StopReason::Canceled)) => {
            failure("canceled", &format!("job {id} was canceled"), false, None)
        }
        (_, Some(StopReason::Timeout)) => {
            let t = timeout.unwrap_or_default();
            failure(
                "timeout",
                &format!("job {id} timed out after {t:?}"),
                true,
                None,
            )
        }
        (_, Some(StopReason::Shutdown) | None) => {
            match lease.release().await {
                Ok(_) => tracing::info!(job = %id, "released"),
                Err(e) => dropped(id, "release", &e),
            }
            return;
        }
        (_, Some(StopReason::LeaseLost)) => unreachable!("handled above"),
    };
    if let Err(e) = lease.fail(&failure).await {
        dropped(id, "fail", &e);
    }
}

/// A `fail` body within the protocol's limits: a type of 1-100 characters, a message of at
/// most 10,000.
fn failure(
    error_type: &str,
    message: &str,
    retryable: bool,
    retry_after_s: Option<f64>,
) -> Failure {
    let mut t = error_type.trim().to_string();
    cut(&mut t, 100);
    if t.is_empty() {
        t = "error".into();
    }
    let mut m = message.to_string();
    cut(&mut m, 10_000);
    Failure {
        error_type: t,
        message: m,
        retryable,
        retry_after_s,
    }
}

fn dropped(id: Uuid, what: &str, e: &Error) {
    match e {
        Error::LeaseLost(_) | Error::Conflict(_) => {
            tracing::warn!(job = %id, error = %e, "{what} refused; dropped")
        }
        _ => tracing::error!(job = %id, error = %e,
            "{what} failed; the lease will expire and the job run again"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_keeps_to_the_protocol_limits() {
        let f = failure("  ", &"é".repeat(20_000), true, None);
        assert_eq!(f.error_type, "error");
        assert_eq!(f.message.chars().count(), 10_000);
        let f = failure(&"t".repeat(300), "m", false, Some(1.5));
        assert_eq!(f.error_type.len(), 100);
        assert!(!f.retryable);
        assert_eq!(f.retry_after_s, Some(1.5));
    }

    #[test]
    fn the_first_stop_reason_wins_and_cancels_the_token() {
        let s = JobState::new();
        assert!(!s.token.is_cancelled());
        s.stop(StopReason::Canceled);
        s.stop(StopReason::Shutdown);
        assert!(s.token.is_cancelled());
        assert_eq!(s.reason(), Some(StopReason::Canceled));
    }

    #[tokio::test]
    async fn a_worker_without_handlers_or_with_a_stray_definition_does_not_start() {
        let client = Client::new("http://127.0.0.1:9", "k").unwrap();
        let e = Worker::builder(client.clone()).start().await.err();
        assert!(
            matches!(e, Some(Error::Config(_))),
            "{:?}",
            e.map(|e| e.to_string())
        );
        let e = Worker::builder(client)
            .handle("a.b", |_job: JobContext| async move { Ok(()) })
            .kind_definition("c.d", KindSpec::default())
            .start()
            .await
            .err();
        assert!(matches!(e, Some(Error::Config(_))));
    }
}
