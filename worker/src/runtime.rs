//! The worker runtime: fetch from Redis, claim in Postgres (fenced by stream version), run with a
//! timeout and cancellation, heartbeat leases, report the outcome, shut down gracefully.
//!
//! apalis's `WorkerBuilder` is not used: its runtime owns retries, attempts and buffering, which
//! here belong to Postgres (docs/queue.md explains the choice).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex as StdMutex, RwLock as StdRwLock},
    time::Duration,
};

use async_trait::async_trait;
use capibara_shared::{
    command::{self, leases::LeaseToken},
    domain::{
        self,
        event::EventMetadata,
        job::{AttemptEnd, Job, JobError, JobEvent, JobStatus},
        kinds::{self, user::PushTarget},
        storable, DomainEvent, FieldError,
    },
    queue::Queue,
    store::{
        self,
        dispatch::DispatchEntry,
        held::HeldConnection,
        jobs::{job_append, JobWrite},
        secrets::Redactor,
        workers::WorkerInfo,
        AppendError, Store,
    },
};
use futures::StreamExt;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    executors::{push::PushCall, ExecError, Executor, JobContext, ProgressSink, Registry},
    supervisor::{supervise, InvalidOutput, Outcome, Stops},
};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Queues to take jobs from.
    pub queues: Vec<String>,
    /// Jobs run at once.
    pub concurrency: usize,
    /// Lease length; heartbeats renew it every third of it.
    pub lease: Duration,
    /// How long in-flight jobs may finish after SIGTERM before they are given back.
    pub shutdown_grace: Duration,
    /// The worker's id (`None`: a new one); its name is `host-pid-` and the id's end.
    pub id: Option<Uuid>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            queues: vec!["default".into()],
            concurrency: 32,
            lease: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(25),
            id: None,
        }
    }
}

/// A running job's stop switches.
struct Running {
    /// Canceled by the user (`POST /v1/jobs/{id}/cancel`).
    cancel: CancellationToken,
}

struct Inner {
    store: Store,
    queue: Queue,
    registry: Registry,
    opts: WorkerOptions,
    id: Uuid,
    name: String,
    running: StdMutex<HashMap<Uuid, Running>>,
    /// Cancelled when the grace period after SIGTERM is over: in-flight jobs are given back.
    hard_stop: CancellationToken,
    /// The push kinds of every namespace, refreshed every second ([`push_kinds_loop`]).
    push_kinds: StdRwLock<PushKinds>,
}

/// Push kinds (docs/workers.md): their endpoints, and the lanes of this worker's queues that
/// their jobs are dispatched on.
#[derive(Default)]
struct PushKinds {
    targets: HashMap<(String, String), PushTarget>,
    lanes: Vec<String>,
}

impl Inner {
    /// Redis keys this worker pops: its queues, and their lanes of push kinds.
    fn lanes(&self) -> Vec<String> {
        let mut lanes = Vec::new();
        if self.registry.has_builtin() {
            lanes.extend(self.opts.queues.iter().cloned());
        }
        if let Some((namespace, user)) = self.registry.user_kinds() {
            for q in &self.opts.queues {
                lanes.extend(user.iter().map(|k| kinds::lane(q, namespace, k)));
            }
        }
        if self.registry.push().is_some() {
            lanes.extend(
                self.push_kinds
                    .read()
                    .expect("push kinds")
                    .lanes
                    .iter()
                    .cloned(),
            );
        }
        lanes
    }

    /// The push endpoint of `job`'s kind, if it is a push kind this worker runs.
    fn push_target(&self, job: &Job) -> Option<PushTarget> {
        self.registry.push()?;
        self.push_kinds
            .read()
            .expect("push kinds")
            .targets
            .get(&(job.namespace.clone(), job.kind.clone()))
            .cloned()
    }

    fn can_run(&self, job: &Job) -> bool {
        self.registry.executor(&job.namespace, &job.kind).is_some()
            || self.push_target(job).is_some()
    }

    /// Whether `job`'s attempts are claimed before they start (a push call, or a built-in
    /// executor that is not repeatable): a carried copy of such a job is claimed before
    /// anything else is done with it ([`run_job`]).
    fn claims_first(&self, job: &Job) -> bool {
        match self.registry.executor(&job.namespace, &job.kind) {
            Some(e) => !e.repeatable(),
            None => self.push_target(job).is_some(),
        }
    }

    /// The executor of `job`'s next attempt: a built-in one, or a call to its push endpoint.
    fn executor_for(&self, job: &Job) -> Option<Arc<dyn Executor>> {
        if let Some(e) = self.registry.executor(&job.namespace, &job.kind) {
            return Some(e);
        }
        let target = self.push_target(job)?;
        let support = self.registry.push()?;
        let attempt = job.attempt + 1;
        let token = LeaseToken {
            job_id: job.id,
            attempt,
            worker_id: self.id,
            handed: None,
        };
        let expires_at =
            domain::now() + chrono::Duration::from_std(self.opts.lease).unwrap_or_default();
        let mut sent = serde_json::to_value(job).unwrap_or_default();
        sent["status"] = serde_json::json!("running");
        sent["attempt"] = serde_json::json!(attempt);
        sent["worker_id"] = serde_json::json!(self.name);
        Some(Arc::new(PushCall {
            target,
            job: sent,
            lease: serde_json::json!({"token": token.to_string(), "expires_at": expires_at}),
            message_id: format!("{}.{attempt}", job.id),
            secret: support.secret.clone(),
            policy: support.policy.clone(),
        }))
    }
}

/// Keep [`Inner::push_kinds`] up to date: kinds registered or changed elsewhere apply within a
/// second.
async fn push_kinds_loop(inner: Arc<Inner>, stop: CancellationToken) {
    loop {
        match store::user_kinds::push_kinds(&inner.store.pool).await {
            Ok(kinds) => {
                let mut next = PushKinds::default();
                for k in kinds {
                    let Some(target) = k.definition.push.clone() else {
                        continue;
                    };
                    for q in &inner.opts.queues {
                        next.lanes.push(kinds::lane(q, &k.namespace, &k.name));
                    }
                    next.targets.insert((k.namespace, k.name), target);
                }
                *inner.push_kinds.write().expect("push kinds") = next;
            }
            Err(e) => tracing::debug!(error = %e, "loading push kinds failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Run a worker until `shutdown` is cancelled, then drain.
pub async fn run(
    store: Store,
    queue: Queue,
    registry: Registry,
    opts: WorkerOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let id = opts.id.unwrap_or_else(Uuid::now_v7);
    let host = hostname();
    let name = worker_name(id);
    let info = WorkerInfo {
        id,
        name: name.clone(),
        host,
        pid: std::process::id() as i32,
        queues: opts.queues.clone(),
        kinds: registry.kinds(),
        concurrency: opts.concurrency as i32,
        version: capibara_shared::VERSION.to_string(),
        started_at: domain::now(),
        last_heartbeat_at: domain::now(),
        stopped_at: None,
        status: "active".into(),
        running: 0,
    };
    loop {
        let namespace = registry.user_kinds().map(|(ns, _)| ns);
        match store::workers::register(&store.pool, &info, namespace).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "worker registration failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }
    tracing::info!(worker = %name, queues = ?opts.queues, concurrency = opts.concurrency, "worker started");
    let inner = Arc::new(Inner {
        store,
        queue,
        registry,
        opts,
        id,
        name,
        running: StdMutex::new(HashMap::new()),
        hard_stop: CancellationToken::new(),
        push_kinds: Default::default(),
    });
    let tasks = TaskTracker::new();
    let background = CancellationToken::new();
    tokio::spawn(heartbeat_loop(inner.clone(), background.clone()));
    tokio::spawn(cancel_listener(inner.clone(), background.clone()));
    tokio::spawn(push_kinds_loop(inner.clone(), background.clone()));

    fetch_loop(&inner, &tasks, &shutdown).await;

    // Drain: let running jobs finish within the grace period, then give them back.
    tasks.close();
    let running = inner.running.lock().expect("running lock").len();
    tracing::info!(
        running,
        grace_s = inner.opts.shutdown_grace.as_secs_f64(),
        "worker draining"
    );
    if tokio::time::timeout(inner.opts.shutdown_grace, tasks.wait())
        .await
        .is_err()
    {
        inner.hard_stop.cancel();
        tasks.wait().await;
    }
    background.cancel();
    let _ = store::workers::stopped(&inner.store.pool, inner.id).await;
    tracing::info!(worker = %inner.name, "worker stopped");
    Ok(())
}

/// The name of worker `id` in this process: `host-pid-` and the id's last 8 hex digits.
pub fn worker_name(id: Uuid) -> String {
    format!(
        "{}-{}-{}",
        hostname(),
        std::process::id(),
        &id.simple().to_string()[24..]
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

async fn fetch_loop(inner: &Arc<Inner>, tasks: &TaskTracker, shutdown: &CancellationToken) {
    let slots = Arc::new(Semaphore::new(inner.opts.concurrency));
    metrics::gauge!("capibara_worker_slots").set(inner.opts.concurrency as f64);
    let mut blocking = None;
    // The loads of popped jobs keep one connection.
    let mut db = inner.store.held_connection();
    'fetch: loop {
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore open"),
            _ = shutdown.cancelled() => return,
        };
        let want = slots.available_permits() + 1;
        let lanes = inner.lanes();
        let popped = match inner.queue.pop_due(&lanes, want).await {
            Ok(popped) => popped,
            Err(e) => {
                tracing::warn!(error = %e, "popping from Redis failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        let mut popped = popped;
        if popped.ids.is_empty() {
            if blocking.is_none() {
                blocking = inner.queue.blocking_connection().await.ok();
            }
            let Some(conn) = blocking.as_mut() else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            // Each wait ends in a pop (`wait_and_pop`); one that found nothing says when to
            // wait until next, so no pop of its own comes between two waits.
            let mut due = popped.due;
            popped = loop {
                let lanes = inner.lanes();
                tokio::select! {
                    r = inner.queue.wait_and_pop(conn, &lanes, Duration::from_secs(1), due) => match r {
                        Ok(woken) if !woken.ids.is_empty() => break woken,
                        Ok(empty) => due = empty.due,
                        Err(e) => {
                            tracing::debug!(error = %e, "blocking pop failed");
                            blocking = None;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue 'fetch;
                        }
                    },
                    _ = shutdown.cancelled() => return,
                }
            };
        }
        // A job whose copy rode with its pop starts from that copy (its first append checks
        // it: [`run_job`]); the others are read from Postgres.
        let (carried, load) = popped.split();
        let loaded = match load.is_empty() {
            true => Vec::new(),
            false => match load_popped(&mut db, &load, shutdown).await {
                Some(jobs) => jobs,
                None => return,
            },
        };
        let jobs = carried
            .into_iter()
            .map(|job| (job, Source::Carried))
            .chain(loaded.into_iter().map(|job| (job, Source::Loaded)));
        let mut permit = Some(first);
        for (job, source) in jobs {
            if job.status != JobStatus::Queued {
                metrics::counter!("capibara_dispatch_stale_total").increment(1);
                continue;
            }
            // Popped after its time ran out (before the expirer got to it): record that, not
            // an attempt. A conflict means it changed meanwhile; the expirer sees it again.
            if let Some(expired) = job.expiry(domain::now()) {
                if let Ok((_, append)) = job_append(
                    Some(&job),
                    job.id,
                    &[expired],
                    JobWrite::new(metadata(inner, &job), domain::now()),
                ) {
                    let _ = inner.store.appender.append(append).await;
                }
                continue;
            }
            if !inner.can_run(&job) {
                tracing::warn!(job_id = %job.id, kind = %job.kind, "this worker cannot run this kind; returning it");
                let entry = DispatchEntry::of(&job, job.queued_at.unwrap_or_else(domain::now));
                let _ = inner.queue.push(&[entry]).await;
                continue;
            }
            let p = match permit.take() {
                Some(p) => p,
                None => match slots.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => slots.clone().acquire_owned().await.expect("semaphore open"),
                },
            };
            let inner = inner.clone();
            let span = attempt_span(&job);
            tasks.spawn(
                async move {
                    let busy = metrics::gauge!("capibara_worker_busy_slots");
                    busy.increment(1.0);
                    run_job(&inner, job, source).await;
                    busy.decrement(1.0);
                    drop(p);
                }
                .instrument(span),
            );
        }
        // Let the attempts just spawned send their claims before this loop's next pop: on a
        // runtime with one thread they would otherwise wait behind it.
        tokio::task::yield_now().await;
    }
}

/// The jobs of ids popped from Redis. Popping took them off the queue, so while Postgres cannot
/// be reached (restarting, say) the read is tried again until it answers: dropping them would
/// leave them to the relay's full check, a visibility timeout later. Another error (a row that
/// does not decode) drops the batch as before, for the relay, so one bad row cannot stop the
/// worker. None on shutdown (the relay pushes them again).
async fn load_popped(
    db: &mut HeldConnection,
    ids: &[Uuid],
    shutdown: &CancellationToken,
) -> Option<Vec<Job>> {
    let mut wait = Duration::from_millis(100);
    loop {
        let loaded = match db.get().await {
            Ok(conn) => store::jobs::get_many(conn, ids).await,
            Err(e) => Err(e.into()),
        };
        match loaded {
            Ok(jobs) => {
                db.done();
                return Some(jobs);
            }
            Err(e @ store::StoreError::Unavailable(_)) => {
                db.broke();
                tracing::warn!(error = %e, jobs = ids.len(), "loading popped jobs failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return None,
                }
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                db.done();
                tracing::error!(error = %e, jobs = ids.len(), "popped jobs cannot be loaded; the relay pushes them again");
                return Some(Vec::new());
            }
        }
    }
}

fn metadata(inner: &Inner, job: &Job) -> EventMetadata {
    EventMetadata {
        namespace: job.namespace.clone(),
        actor: Some(format!("worker:{}", inner.name)),
        correlation_id: None,
        causation_id: None,
        ..Default::default()
    }
}

/// One attempt's view of its job, shared by the runner and the progress sink.
struct AttemptState {
    /// The job as last written (or read) by this attempt.
    job: Job,
    /// Whether `JobStarted` is recorded. Until then the job is still `queued` in Postgres.
    claimed: bool,
    attempt: u32,
    /// When execution began (`JobStarted.recorded_at`, even when recorded later).
    started_at: chrono::DateTime<chrono::Utc>,
    /// Secret values resolved into this attempt's input: removed from every event it records.
    redactor: Redactor,
    /// Notes ([`ProgressSink::note`]) waiting for the attempt's next write.
    pending: Vec<JobEvent>,
    /// `job` is a carried copy that no append has checked yet ([`run_job`]).
    copy: bool,
}

impl AttemptState {
    /// The next attempt of `job`, not claimed yet, its execution beginning at `started_at`.
    fn new(job: Job, started_at: chrono::DateTime<chrono::Utc>) -> AttemptState {
        AttemptState {
            attempt: job.attempt + 1,
            job,
            claimed: false,
            started_at,
            redactor: Redactor::default(),
            pending: Vec::new(),
            copy: false,
        }
    }
}

/// `events` with every resolved secret value replaced (outputs, errors, progress, chunks).
fn redact_events(redactor: &Redactor, events: Vec<JobEvent>) -> Vec<JobEvent> {
    if redactor.is_empty() {
        return events;
    }
    events
        .into_iter()
        .map(|e| {
            let (t, data) = e.to_parts();
            JobEvent::from_parts(t, redactor.value(&data)).unwrap_or(e)
        })
        .collect()
}

/// The error that ends an attempt whose output holds a value Postgres cannot store. Not
/// retried: the same code produces the same bytes. Names where, never the value.
fn invalid_output(e: &FieldError) -> JobError {
    JobError::new(
        "invalid_output",
        format!(
            "the attempt's `{}` {}; encode binary data (e.g. as base64) before returning it",
            e.field, e.message
        ),
    )
}

/// An outcome whose output or error cannot be stored becomes an `invalid_output` failure,
/// instead of a write that fails forever (and a job re-queued forever).
fn storable_outcome(outcome: Outcome) -> Outcome {
    let refused = match &outcome {
        Outcome::Done(Ok(out)) => storable::check_json("output", &out.output)
            .and_then(|()| {
                let artifacts = serde_json::to_value(&out.artifacts).unwrap_or_default();
                storable::check_json("artifacts", &artifacts)
            })
            .err(),
        Outcome::Done(Err(e)) => e.job_error().and_then(|e| {
            storable::check_json("error", &serde_json::to_value(e).unwrap_or_default()).err()
        }),
        Outcome::TimedOut | Outcome::Canceled | Outcome::Released => None,
    };
    match refused {
        None => outcome,
        Some(e) => {
            metrics::counter!("capibara_invalid_output_total").increment(1);
            Outcome::Done(Err(ExecError::Abort(invalid_output(&e))))
        }
    }
}

/// How long an attempt runs before its `JobStarted` is written on its own. Attempts that end
/// sooner record `JobStarted` and their outcome in one append (docs/queue.md, "fast attempts").
const CLAIM_AFTER: Duration = Duration::from_millis(25);

/// The attempt's span, in the trace of what submitted the job (exported with
/// `CAPIBARA_OTLP_ENDPOINT`; docs/observability.md).
fn attempt_span(job: &Job) -> tracing::Span {
    if !capibara_shared::trace_context::exporting() {
        // Nothing would read it: no span, no fields formatted on the hot path.
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "job.attempt",
        otel.name = %format!("attempt {}", job.kind),
        job.id = %job.id,
        job.kind = %job.kind,
        job.queue = %job.queue,
        job.attempt = job.attempt + 1,
    );
    capibara_shared::trace_context::adopt(&span, job.traceparent.as_deref());
    span
}

/// Where a popped job's state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Read from Postgres after the pop.
    Loaded,
    /// The copy that rode with its dispatch entry ([`store::dispatch::carried`]): the job as a
    /// commit wrote it, maybe not as it stands now.
    Carried,
}

/// Run the next attempt of `job`. A carried copy may not be the job as it stands: the first
/// append of the attempt (its claim, or its outcome with `JobStarted`) expects the copy's
/// version, so one that commits proves the copy was the job (every write of a job's row is an
/// append to its stream), and one that conflicts ends the attempt and puts the job back on the
/// queue as it stands ([`requeue_changed`]). An attempt with outside effects is claimed before
/// anything else is done with its copy (secrets, the push call); a repeatable one runs on it at
/// once, and what it did is discarded if the copy lost.
async fn run_job(inner: &Arc<Inner>, job: Job, source: Source) {
    let mut st = AttemptState::new(job.clone(), domain::now());
    if source == Source::Loaded {
        return run_loaded(inner, job, st).await;
    }
    st.copy = true;
    if inner.claims_first(&job) {
        // The claim stands in for the load of a popped job, and is tried again as that load is
        // while Postgres cannot be reached ([`load_popped`]).
        let mut wait = Duration::from_millis(100);
        loop {
            match try_claim(inner, &mut st).await {
                Claim::Ours => break,
                Claim::NotOurs | Claim::Changed => return,
                Claim::Failed => tokio::select! {
                    _ = tokio::time::sleep(wait) => wait = (wait * 2).min(Duration::from_secs(2)),
                    _ = inner.hard_stop.cancelled() => return,
                },
            }
        }
    }
    run_loaded(inner, job, st).await
}

/// A carried copy lost its check: what the attempt did is discarded, and the job goes back on
/// the queue as its outbox entry stands, if it still waits for a worker.
async fn requeue_changed(inner: &Inner, id: Uuid) {
    metrics::counter!("capibara_dispatch_carried_stale_total").increment(1);
    if let Err(e) = store::dispatch::put_back(&inner.store.pool, &inner.queue, &[id]).await {
        tracing::warn!(job_id = %id, error = %e, "putting a changed job back failed; the relay will dispatch it again");
    }
}

/// [`run_job`] of `job`, its attempt's state `st` (claimed already, or not yet).
async fn run_loaded(inner: &Arc<Inner>, job: Job, mut st: AttemptState) {
    let attempt = job.attempt + 1;
    let id = job.id;
    let kind = job.kind.clone();
    let Some(executor) = inner.executor_for(&job) else {
        return;
    };
    let started_at = st.started_at;
    if let Some(q) = job.queued_at {
        let latency = (started_at - q).num_microseconds().unwrap_or(0) as f64 / 1e6;
        metrics::histogram!("capibara_job_pickup_latency_seconds", "queue" => job.queue.clone())
            .record(latency);
    }
    let user_cancel = CancellationToken::new();
    inner.running.lock().expect("running lock").insert(
        id,
        Running {
            cancel: user_cancel.clone(),
        },
    );
    let exec_cancel = CancellationToken::new();
    let invalid = Arc::new(InvalidOutput::default());
    // The attempt's timeout, cut at the job's deadline.
    let timeout = job.attempt_timeout(domain::now());
    // Workflow steps may carry `${secret:NAME}` references: resolved here, never stored. Only a
    // step job's own references resolve (the names its template used, recorded by the workflow
    // engine); in any other job a `${secret:…}` string is just text.
    let allowed = job
        .secret_refs
        .clone()
        .filter(|_| job.run_id.is_some())
        .unwrap_or_default();
    let (input, redactor, secret_error) = match store::secrets::resolve(
        &inner.store.pool,
        &job.namespace,
        &job.input,
        &allowed,
    )
    .await
    {
        Ok(Some(resolved)) => (resolved.input, resolved.redactor, None),
        Ok(None) => (job.input.clone(), Redactor::default(), None),
        Err(store::secrets::ResolveError::Missing(name)) => (
            job.input.clone(),
            Redactor::default(),
            Some(ExecError::Abort(JobError::new(
                "secret_not_found",
                format!("secret `{name}` does not exist in this namespace"),
            ))),
        ),
        Err(store::secrets::ResolveError::Store(e)) => (
            job.input.clone(),
            Redactor::default(),
            Some(ExecError::Retryable(JobError::new(
                "store_unavailable",
                format!("secrets could not be read: {e}"),
            ))),
        ),
    };
    st.redactor = redactor;
    let state = Arc::new(Mutex::new(st));
    let progress = Arc::new(Progress {
        inner: inner.clone(),
        state: state.clone(),
        invalid: invalid.clone(),
    });
    let ctx = JobContext {
        job_id: id,
        kind: kind.clone(),
        attempt,
        max_attempts: job.max_attempts,
        input,
        job: Arc::new(job),
        cancel: exec_cancel.clone(),
        progress: progress.clone(),
    };
    // Attempts with outside effects are claimed before they start (no duplicate runs).
    if !executor.repeatable() {
        let claimed = {
            let mut st = state.lock().await;
            claim(inner, &mut st).await
        };
        if !claimed {
            inner.running.lock().expect("running lock").remove(&id);
            return;
        }
    }
    tracing::debug!(job_id = %id, %kind, attempt, "executing");
    let timer = std::time::Instant::now();
    let exec = match secret_error {
        None => executor.execute(ctx),
        Some(e) => Box::pin(async move { Err(e) }),
    };
    // Phase 2's claim, polled only if the attempt outlives CLAIM_AFTER.
    let claim_start = async {
        let mut st = state.lock().await;
        claim(inner, &mut st).await
    };
    let claim_after = if state.lock().await.claimed {
        Duration::ZERO
    } else {
        CLAIM_AFTER
    };
    let stops = Stops {
        user_cancel: &user_cancel,
        hard_stop: &inner.hard_stop,
        invalid: &invalid,
        on_end: &exec_cancel,
    };
    // None: fenced off (the claim found the attempt taken away).
    let Some(outcome) = supervise(exec, timeout, claim_after, claim_start, stops).await else {
        inner.running.lock().expect("running lock").remove(&id);
        return;
    };
    if matches!(outcome, Outcome::Done(Err(ExecError::Detached))) {
        // A push endpoint took the attempt over: its lease is no longer renewed by this worker's
        // heartbeats, only by the endpoint's (it expires, and the job runs again, if those stop).
        // The call's note is recorded now; the endpoint writes the rest of the attempt.
        progress.append(&[]).await;
        if let Err(e) = store::lease::detach(&inner.store.pool, id, attempt).await {
            tracing::warn!(job_id = %id, error = %e, "handing the lease over failed; it expires with this worker");
        }
        metrics::counter!("capibara_jobs_total", "kind" => kind, "outcome" => "detached")
            .increment(1);
        inner.running.lock().expect("running lock").remove(&id);
        return;
    }
    let outcome = storable_outcome(outcome);
    let elapsed = timer.elapsed().as_secs_f64();
    let label = match &outcome {
        Outcome::Done(Ok(_)) => "succeeded",
        Outcome::Done(Err(_)) => "failed",
        Outcome::TimedOut => "timed_out",
        Outcome::Canceled => "canceled",
        Outcome::Released => "released",
    };
    metrics::counter!("capibara_jobs_total", "kind" => kind.clone(), "outcome" => label)
        .increment(1);
    tracing::debug!(job_id = %id, outcome = label, elapsed, "executed; reporting");
    metrics::histogram!("capibara_job_run_seconds", "kind" => kind).record(elapsed);
    report(inner, &state, outcome).await;
    inner.running.lock().expect("running lock").remove(&id);
}

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// `JobStarted` is recorded: the attempt is this worker's.
    Ours,
    /// Not this worker's to run (a duplicate delivery, canceled or started elsewhere).
    NotOurs,
    /// The claim could not be written (Postgres unreachable, say): unless it is tried again,
    /// the relay dispatches the job again.
    Failed,
    /// The attempt started from a carried copy that is not the job as it stands: it is
    /// not this worker's, and the job went back on the queue ([`requeue_changed`]).
    Changed,
}

/// Append `JobStarted` with the version we loaded: a duplicate delivery, or a job canceled or
/// started elsewhere meanwhile, loses the version check. Returns whether the attempt is ours.
async fn claim(inner: &Arc<Inner>, st: &mut AttemptState) -> bool {
    match try_claim(inner, st).await {
        Claim::Ours => true,
        Claim::Failed => {
            tracing::warn!(job_id = %st.job.id, "the relay will dispatch the job again");
            false
        }
        Claim::NotOurs | Claim::Changed => false,
    }
}

/// [`claim`]. On a conflict the job is read again and claimed while it is still queued for
/// this attempt, unless the attempt started from a carried copy ([`Claim::Changed`]).
async fn try_claim(inner: &Arc<Inner>, st: &mut AttemptState) -> Claim {
    if st.claimed {
        return Claim::Ours;
    }
    for _ in 0..3 {
        let mut w = JobWrite::new(metadata(inner, &st.job), domain::now());
        w.lease = Some((inner.name.clone(), inner.opts.lease));
        w.started_at = Some(st.started_at);
        let events = [JobEvent::JobStarted {
            attempt: st.attempt,
            worker: inner.name.clone(),
        }];
        let Ok((started, append)) = job_append(Some(&st.job), st.job.id, &events, w) else {
            return Claim::NotOurs;
        };
        match inner.store.appender.append(append).await {
            Ok(_) => {
                st.job = started;
                st.claimed = true;
                st.copy = false;
                return Claim::Ours;
            }
            Err(AppendError::Conflict { .. }) if st.copy => {
                requeue_changed(inner, st.job.id).await;
                return Claim::Changed;
            }
            Err(AppendError::Conflict { .. }) => {
                let Ok(Some(fresh)) = store::jobs::get_any(&inner.store.pool, st.job.id).await
                else {
                    return Claim::NotOurs;
                };
                if fresh.status != JobStatus::Queued || fresh.attempt + 1 != st.attempt {
                    metrics::counter!("capibara_dispatch_duplicates_total").increment(1);
                    tracing::debug!(job_id = %st.job.id, "duplicate delivery fenced off");
                    return Claim::NotOurs;
                }
                st.job = fresh;
            }
            Err(e) => {
                tracing::warn!(job_id = %st.job.id, error = %e, "claim failed");
                return Claim::Failed;
            }
        }
    }
    Claim::NotOurs
}

/// The events of `outcome`: the domain's decision ([`Job::end_attempt`]).
fn outcome_events(job: &Job, attempt: u32, outcome: &Outcome) -> Vec<JobEvent> {
    let end = match outcome {
        Outcome::Done(Ok(out)) => AttemptEnd::Succeeded {
            output: out.output.clone(),
            artifacts: out.artifacts.clone(),
        },
        Outcome::Done(Err(ExecError::Defer(after, error))) => AttemptEnd::Deferred {
            error: error.clone(),
            after: *after,
        },
        Outcome::Done(Err(e)) => {
            let (error, retryable, retry_after) = match e {
                ExecError::Retryable(e) => (e.clone(), true, None),
                ExecError::Abort(e) => (e.clone(), false, None),
                ExecError::RetryAfter(d, e) => (e.clone(), true, Some(*d)),
                ExecError::Defer(..) => unreachable!("matched above"),
                // Handled before reporting (run_job); never recorded.
                ExecError::Detached => (
                    JobError::new("detached", "the attempt was handed over"),
                    true,
                    None,
                ),
            };
            AttemptEnd::Failed {
                error,
                retryable,
                retry_after,
            }
        }
        Outcome::TimedOut => AttemptEnd::TimedOut,
        Outcome::Canceled => AttemptEnd::Canceled,
        Outcome::Released => AttemptEnd::Released,
    };
    job.end_attempt(attempt, end, domain::now())
}

/// Record the outcome. An unclaimed attempt records `JobStarted` with it (one append). A version
/// conflict means someone else wrote to the job meanwhile: if it is still our attempt (a cancel
/// request, say), write again on top; otherwise our result is fenced off.
async fn report(inner: &Arc<Inner>, state: &Arc<Mutex<AttemptState>>, mut outcome: Outcome) {
    let mut delay = Duration::from_millis(100);
    let deadline = tokio::time::Instant::now() + inner.opts.lease;
    let mut st = state.lock().await;
    if !st.claimed {
        if matches!(outcome, Outcome::Released) {
            // Never started as far as Postgres knows: just hand the id back to Redis.
            let j = &st.job;
            let entry = DispatchEntry::of(j, j.queued_at.unwrap_or_else(domain::now));
            let _ = inner.queue.push(&[entry]).await;
            return;
        }
        if matches!(outcome, Outcome::Canceled) {
            // Canceled while queued: the API already recorded JobCanceled.
            return;
        }
    }
    let notes = std::mem::take(&mut st.pending);
    // A step job's report plans its run in the same commit, until that conflicts or is refused:
    // then the report commits alone and the orchestrator plans the run from the log.
    let mut plan_run = st.job.run_id.is_some();
    loop {
        let attempt = st.attempt;
        let mut events = Vec::new();
        if !st.claimed {
            events.push(JobEvent::JobStarted {
                attempt,
                worker: inner.name.clone(),
            });
        }
        events.extend(notes.iter().cloned());
        events.extend(outcome_events(&st.job, attempt, &outcome));
        let events = redact_events(&st.redactor, events);
        let mut w = JobWrite::new(metadata(inner, &st.job), domain::now());
        if !st.claimed {
            w.started_at = Some(st.started_at);
            w.lease = Some((inner.name.clone(), inner.opts.lease));
        }
        let (new, append) = match job_append(Some(&st.job), st.job.id, &events, w) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(job_id = %st.job.id, error = %e, "outcome does not apply; dropping it");
                return;
            }
        };
        // Appends of other streams that commit with a success, or not at all (Output::also).
        let also = match &outcome {
            Outcome::Done(Ok(out)) => out.also.clone(),
            _ => Vec::new(),
        };
        let with_also = !also.is_empty();
        let planned = match plan_run && !with_also {
            true => command::runs::plan_with_report(&inner.store, &st.job, &events)
                .await
                .unwrap_or_else(|e| {
                    tracing::debug!(job_id = %st.job.id, error = %e, "the run is left to the orchestrator");
                    None
                }),
            false => None,
        };
        let with_plan = planned.is_some();
        let written = if with_also {
            let mut all = vec![append];
            all.extend(also);
            inner.store.appender.append_all(all).await.map(drop)
        } else if let Some(plan) = planned {
            let mut all = vec![append];
            all.extend(plan);
            inner.store.appender.append_all(all).await.map(drop)
        } else {
            inner.store.appender.append(append).await.map(drop)
        };
        match written {
            Ok(()) => {
                st.job = new;
                st.claimed = true;
                st.copy = false;
                if with_plan {
                    metrics::counter!("capibara_runs_advanced_in_report_total").increment(1);
                }
                return;
            }
            // The run moved since it was read (another step's report, a signal, the
            // orchestrator), the store refused its events, or the commit failed: the report is
            // written as if it had planned nothing, and the orchestrator plans the run.
            Err(_) if with_plan => plan_run = false,
            // Started from a carried copy that was not the job as it stands: the attempt ran
            // on what may be another job's state, so its result goes nowhere.
            Err(AppendError::Conflict { .. }) if st.copy && !st.claimed => {
                requeue_changed(inner, st.job.id).await;
                return;
            }
            Err(AppendError::Conflict { .. }) => {
                match store::jobs::get_any(&inner.store.pool, st.job.id).await {
                    // The job did not move: one of the other streams did (another fetch advanced
                    // the connector). The attempt's result is stale; it runs again.
                    Ok(Some(fresh)) if with_also && fresh.version == st.job.version => {
                        outcome = Outcome::Done(Err(ExecError::Retryable(JobError::new(
                            "stream_moved",
                            "another writer changed a stream this attempt records to (another \
                             fetch of the same connector, say); the attempt runs again",
                        ))));
                    }
                    Ok(Some(fresh))
                        if st.claimed
                            && fresh.status == JobStatus::Running
                            && fresh.attempt == attempt =>
                    {
                        st.job = fresh
                    }
                    Ok(Some(fresh))
                        if !st.claimed
                            && fresh.status == JobStatus::Queued
                            && fresh.attempt + 1 == attempt =>
                    {
                        st.job = fresh
                    }
                    Ok(_) => {
                        metrics::counter!("capibara_results_fenced_total").increment(1);
                        tracing::info!(job_id = %st.job.id, attempt, "attempt was taken away or duplicated; result discarded");
                        return;
                    }
                    Err(_) => {}
                }
            }
            // The last line of defense (the checks above missed a value): record that instead.
            Err(AppendError::Invalid(m)) => {
                let is_fallback = matches!(&outcome,
                    Outcome::Done(Err(ExecError::Abort(e))) if e.error_type == "invalid_output");
                if is_fallback {
                    tracing::error!(job_id = %st.job.id, error = %m, "the outcome cannot be stored; the job runs again");
                    return;
                }
                tracing::warn!(job_id = %st.job.id, error = %m, "the outcome cannot be stored; failing the attempt");
                outcome = Outcome::Done(Err(ExecError::Abort(JobError::new(
                    "invalid_output",
                    format!("the attempt's result cannot be stored: {m}"),
                ))));
            }
            Err(e) => {
                if tokio::time::Instant::now() > deadline {
                    tracing::error!(job_id = %st.job.id, error = %e, "could not record the outcome; the job runs again");
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Records `JobProgress` on the job's stream (claiming the attempt first if needed).
struct Progress {
    inner: Arc<Inner>,
    state: Arc<Mutex<AttemptState>>,
    /// A report that cannot be stored ends the attempt through this.
    invalid: Arc<InvalidOutput>,
}

#[async_trait]
impl ProgressSink for Progress {
    async fn progress_with_data(
        &self,
        percent: Option<f64>,
        message: Option<String>,
        data: Option<serde_json::Value>,
    ) {
        if let Some(Err(e)) = message
            .as_deref()
            .map(|m| storable::check_text("progress.message", m))
        {
            return self.invalid.set(invalid_output(&e));
        }
        if let Some(Err(e)) = data
            .as_ref()
            .map(|d| storable::check_json("progress.data", d))
        {
            return self.invalid.set(invalid_output(&e));
        }
        let events = [JobEvent::JobProgress {
            percent,
            message,
            data,
        }];
        self.append(&events).await;
    }

    async fn output_chunk(&self, seq: u64, data: serde_json::Value) {
        if let Err(e) = storable::check_json("output_chunk.data", &data) {
            return self.invalid.set(invalid_output(&e));
        }
        self.append(&[JobEvent::JobOutputChunk { seq, data }]).await;
    }

    async fn log(&self, level: &str, message: String) {
        if let Err(e) = storable::check_text("log.message", &message) {
            return self.invalid.set(invalid_output(&e));
        }
        let level = level.to_string();
        self.append(&[JobEvent::JobLog { level, message }]).await;
    }

    async fn note(&self, message: String) {
        if let Err(e) = storable::check_text("progress.message", &message) {
            return self.invalid.set(invalid_output(&e));
        }
        self.state.lock().await.pending.push(JobEvent::JobProgress {
            percent: None,
            message: Some(message),
            data: None,
        });
    }
}

impl Progress {
    /// Append events to the attempt's job stream (claiming the attempt first if needed); a
    /// conflict refreshes the cached job, other failures drop the events (they are reports).
    async fn append(&self, events: &[JobEvent]) {
        let mut st = self.state.lock().await;
        if events.is_empty() && st.pending.is_empty() {
            return;
        }
        if !claim(&self.inner, &mut st).await {
            return;
        }
        // Notes waiting for a write go first, in this one.
        let mut all = std::mem::take(&mut st.pending);
        all.extend_from_slice(events);
        // A conflict (e.g. a cancel request appended meanwhile) is retried on the fresh stream
        // so streamed output is not lost.
        let events = redact_events(&st.redactor, all);
        for _ in 0..3 {
            let Ok((new, append)) = job_append(
                Some(&st.job),
                st.job.id,
                &events,
                JobWrite::new(metadata(&self.inner, &st.job), domain::now()),
            ) else {
                return;
            };
            match self.inner.store.appender.append(append).await {
                Ok(_) => {
                    st.job = new;
                    return;
                }
                Err(AppendError::Conflict { .. }) => {
                    match store::jobs::get_any(&self.inner.store.pool, st.job.id).await {
                        Ok(Some(fresh)) if fresh.attempt == st.job.attempt => st.job = fresh,
                        _ => return,
                    }
                }
                Err(AppendError::Invalid(m)) => {
                    return self.invalid.set(JobError::new(
                        "invalid_output",
                        format!("a report of the attempt cannot be stored: {m}"),
                    ));
                }
                Err(_) => return,
            }
        }
    }
}

async fn heartbeat_loop(inner: Arc<Inner>, stop: CancellationToken) {
    let every = inner.opts.lease / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        match store::workers::heartbeat(
            &inner.store.pool,
            inner.id,
            &inner.name,
            inner.opts.lease.as_secs_f64(),
        )
        .await
        {
            Ok(canceled) => {
                for id in canceled {
                    cancel_running(&inner, id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

fn cancel_running(inner: &Inner, id: Uuid) {
    if let Some(r) = inner.running.lock().expect("running lock").get(&id) {
        if !r.cancel.is_cancelled() {
            tracing::info!(job_id = %id, "cancel requested; stopping the attempt");
            r.cancel.cancel();
        }
    }
}

/// Cancel notices over Redis pub/sub: the fast way; heartbeats catch any that are missed.
async fn cancel_listener(inner: Arc<Inner>, stop: CancellationToken) {
    let channel = inner.queue.cancel_channel();
    loop {
        if let Ok(mut pubsub) = inner.queue.redis().pubsub().await {
            if pubsub.subscribe(&channel).await.is_ok() {
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        m = messages.next() => match m {
                            Some(msg) => {
                                let payload: String = msg.get_payload().unwrap_or_default();
                                if let Ok(id) = payload.parse() {
                                    cancel_running(&inner, id);
                                }
                            }
                            None => break,
                        },
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => return,
        }
    }
}
