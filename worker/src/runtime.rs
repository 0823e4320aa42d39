//! The worker runtime: fetch from Redis, claim in Postgres (fenced by stream version), run with a
//! timeout and cancellation, heartbeat leases, report the outcome, shut down gracefully.
//!
//! apalis's `WorkerBuilder` is not used: its runtime owns retries, attempts and buffering, which
//! here belong to Postgres (docs/queue.md explains the choice).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use async_trait::async_trait;
use capibara_shared::{
    domain::{
        self,
        event::EventMetadata,
        job::{Job, JobError, JobEvent, JobStatus},
    },
    queue::Queue,
    store::{
        self,
        jobs::{job_append, JobWrite},
        workers::WorkerInfo,
        AppendError, Store,
    },
};
use futures::StreamExt;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use uuid::Uuid;

use crate::executors::{ExecError, JobContext, Output, ProgressSink, Registry};

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
}

impl Default for WorkerOptions {
    fn default() -> Self {
        Self {
            queues: vec!["default".into()],
            concurrency: 32,
            lease: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(25),
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
}

/// Run a worker until `shutdown` is cancelled, then drain.
pub async fn run(
    store: Store,
    queue: Queue,
    registry: Registry,
    opts: WorkerOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let id = Uuid::now_v7();
    let host = hostname();
    let name = format!(
        "{host}-{}-{}",
        std::process::id(),
        &id.simple().to_string()[24..]
    );
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
        match store::workers::register(&store.pool, &info).await {
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
    });
    let tasks = TaskTracker::new();
    let background = CancellationToken::new();
    tokio::spawn(heartbeat_loop(inner.clone(), background.clone()));
    tokio::spawn(cancel_listener(inner.clone(), background.clone()));

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
    let mut blocking = None;
    loop {
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore open"),
            _ = shutdown.cancelled() => return,
        };
        let want = slots.available_permits() + 1;
        let mut ids = match inner.queue.pop(&inner.opts.queues, want).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "popping from Redis failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        if ids.is_empty() {
            if blocking.is_none() {
                blocking = inner.queue.blocking_connection().await.ok();
            }
            let Some(conn) = blocking.as_mut() else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            tokio::select! {
                r = inner.queue.blocking_pop(conn, &inner.opts.queues, Duration::from_secs(1)) => match r {
                    Ok(Some(id)) => ids.push(id),
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "blocking pop failed");
                        blocking = None;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            }
        }
        let jobs = match store::jobs::get_many(&inner.store.pool, &ids).await {
            Ok(j) => j,
            Err(e) => {
                // The jobs stay `queued` in Postgres; the relay pushes them again.
                tracing::warn!(error = %e, "loading popped jobs failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut permit = Some(first);
        for job in jobs {
            if job.status != JobStatus::Queued {
                metrics::counter!("capibara_dispatch_stale_total").increment(1);
                continue;
            }
            if inner.registry.get(&job.kind).is_none() {
                tracing::warn!(job_id = %job.id, kind = %job.kind, "this worker cannot run this kind; returning it");
                let entry = capibara_shared::queue::DispatchEntry::new(
                    job.id,
                    &job.namespace,
                    &job.queue,
                    job.priority,
                    job.queued_at.unwrap_or_else(domain::now),
                );
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
            tasks.spawn(async move {
                run_job(&inner, job).await;
                drop(p);
            });
        }
    }
}

fn metadata(inner: &Inner, job: &Job) -> EventMetadata {
    EventMetadata {
        namespace: job.namespace.clone(),
        actor: Some(format!("worker:{}", inner.name)),
        correlation_id: None,
        causation_id: None,
    }
}

/// How an attempt ended.
enum Outcome {
    Done(Result<Output, ExecError>),
    TimedOut,
    Canceled,
    /// The worker is stopping: give the attempt back without using it up.
    Released,
}

async fn run_job(inner: &Arc<Inner>, job: Job) {
    let attempt = job.attempt + 1;
    let Some(started) = claim(inner, job, attempt).await else {
        return;
    };
    let id = started.id;
    if let Some(q) = started.queued_at {
        let latency = (started.started_at.unwrap_or(q) - q)
            .num_microseconds()
            .unwrap_or(0) as f64
            / 1e6;
        metrics::histogram!("capibara_job_pickup_latency_seconds", "queue" => started.queue.clone()).record(latency);
    }
    let user_cancel = CancellationToken::new();
    inner.running.lock().expect("running lock").insert(
        id,
        Running {
            cancel: user_cancel.clone(),
        },
    );
    let exec_cancel = CancellationToken::new();
    let executor = inner
        .registry
        .get(&started.kind)
        .expect("kind checked before claim");
    let state = Arc::new(Mutex::new(started.clone()));
    let ctx = JobContext {
        job_id: id,
        kind: started.kind.clone(),
        attempt,
        input: started.input.clone(),
        cancel: exec_cancel.clone(),
        progress: Arc::new(Progress {
            inner: inner.clone(),
            state: state.clone(),
        }),
    };
    let timer = std::time::Instant::now();
    let timeout = started.timeout_s.map(|s| Duration::from_secs(s as u64));
    let mut exec = executor.execute(ctx);
    let outcome = tokio::select! {
        r = async {
            match timeout {
                Some(t) => tokio::time::timeout(t, &mut exec).await.map_err(|_| ()),
                None => Ok((&mut exec).await),
            }
        } => match r {
            Ok(r) => Outcome::Done(r),
            Err(()) => Outcome::TimedOut,
        },
        _ = user_cancel.cancelled() => Outcome::Canceled,
        _ = inner.hard_stop.cancelled() => Outcome::Released,
    };
    // Dropping the future stops async executors (and releases whatever it held); blocking ones
    // watch this token.
    drop(exec);
    exec_cancel.cancel();
    let elapsed = timer.elapsed().as_secs_f64();
    let label = match &outcome {
        Outcome::Done(Ok(_)) => "succeeded",
        Outcome::Done(Err(_)) => "failed",
        Outcome::TimedOut => "timed_out",
        Outcome::Canceled => "canceled",
        Outcome::Released => "released",
    };
    metrics::counter!("capibara_jobs_total", "kind" => started.kind.clone(), "outcome" => label)
        .increment(1);
    metrics::histogram!("capibara_job_run_seconds", "kind" => started.kind.clone()).record(elapsed);
    report(inner, &state, attempt, outcome).await;
    inner.running.lock().expect("running lock").remove(&id);
}

/// Append `JobStarted` with the version we loaded: a duplicate delivery, or a job canceled or
/// started elsewhere meanwhile, loses the version check and is dropped here.
async fn claim(inner: &Arc<Inner>, mut job: Job, attempt: u32) -> Option<Job> {
    for _ in 0..3 {
        let mut w = JobWrite::new(metadata(inner, &job), domain::now());
        w.lease = Some((inner.name.clone(), inner.opts.lease));
        let events = [JobEvent::JobStarted {
            attempt,
            worker: inner.name.clone(),
        }];
        let (started, append) = match job_append(Some(&job), job.id, &events, w) {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(job_id = %job.id, error = %e, "job no longer claimable");
                return None;
            }
        };
        match inner.store.appender.append(append).await {
            Ok(_) => return Some(started),
            Err(AppendError::Conflict { .. }) => {
                let fresh = store::jobs::get_any(&inner.store.pool, job.id)
                    .await
                    .ok()
                    .flatten()?;
                if fresh.status != JobStatus::Queued || fresh.attempt + 1 != attempt {
                    metrics::counter!("capibara_dispatch_duplicates_total").increment(1);
                    tracing::debug!(job_id = %job.id, "duplicate delivery fenced off");
                    return None;
                }
                job = fresh;
            }
            Err(e) => {
                tracing::warn!(job_id = %job.id, error = %e, "claim failed; the relay will dispatch the job again");
                return None;
            }
        }
    }
    None
}

fn outcome_events(job: &Job, attempt: u32, outcome: &Outcome) -> Vec<JobEvent> {
    let now = domain::now();
    match outcome {
        Outcome::Done(Ok(out)) => vec![JobEvent::JobSucceeded {
            attempt,
            output: out.output.clone(),
            artifacts: out.artifacts.clone(),
        }],
        Outcome::Done(Err(ExecError::Retryable(e))) => {
            job.attempt_failure_events(attempt, e.clone(), true, None, now)
        }
        Outcome::Done(Err(ExecError::Abort(e))) if job.cancel_requested => {
            let _ = e;
            vec![JobEvent::JobCanceled {
                attempt: Some(attempt),
            }]
        }
        Outcome::Done(Err(ExecError::Abort(e))) => {
            job.attempt_failure_events(attempt, e.clone(), false, None, now)
        }
        Outcome::Done(Err(ExecError::RetryAfter(d, e))) => {
            job.attempt_failure_events(attempt, e.clone(), true, Some(*d), now)
        }
        Outcome::TimedOut => {
            let secs = job.timeout_s.unwrap_or_default();
            let mut evs = vec![JobEvent::JobTimedOut { attempt }];
            evs.extend(job.attempt_failure_events(
                attempt,
                JobError::new("timeout", format!("attempt exceeded timeout_s = {secs}")),
                true,
                None,
                now,
            ));
            evs
        }
        Outcome::Canceled => vec![JobEvent::JobCanceled {
            attempt: Some(attempt),
        }],
        Outcome::Released => vec![
            JobEvent::JobAttemptFailed {
                attempt,
                error: JobError::new(
                    "worker_shutdown",
                    "the worker stopped before the attempt finished",
                ),
                retry_at: Some(now),
            },
            JobEvent::JobQueued {
                reason: "released".into(),
                max_attempts: Some(job.max_attempts + 1),
            },
        ],
    }
}

/// Record the outcome. A version conflict means someone else wrote to the job meanwhile: if it is
/// still our attempt (a cancel request, say), write again on top; if the lease was taken away,
/// our result is fenced off.
async fn report(inner: &Arc<Inner>, state: &Arc<Mutex<Job>>, attempt: u32, outcome: Outcome) {
    let mut delay = Duration::from_millis(100);
    let deadline = tokio::time::Instant::now() + inner.opts.lease;
    loop {
        let mut job = state.lock().await;
        let events = outcome_events(&job, attempt, &outcome);
        let (new, append) = match job_append(
            Some(&job),
            job.id,
            &events,
            JobWrite::new(metadata(inner, &job), domain::now()),
        ) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(job_id = %job.id, error = %e, "outcome does not apply; dropping it");
                return;
            }
        };
        match inner.store.appender.append(append).await {
            Ok(_) => {
                *job = new;
                return;
            }
            Err(AppendError::Conflict { .. }) => {
                match store::jobs::get_any(&inner.store.pool, job.id).await {
                    Ok(Some(fresh))
                        if fresh.status == JobStatus::Running && fresh.attempt == attempt =>
                    {
                        *job = fresh
                    }
                    Ok(_) => {
                        metrics::counter!("capibara_results_fenced_total").increment(1);
                        tracing::info!(job_id = %job.id, attempt, "attempt was taken away; result discarded");
                        return;
                    }
                    Err(_) => {}
                }
            }
            Err(e) => {
                if tokio::time::Instant::now() > deadline {
                    tracing::error!(job_id = %job.id, error = %e, "could not record the outcome; the lease will expire and the job runs again");
                    return;
                }
                drop(job);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Records `JobProgress` on the job's stream.
struct Progress {
    inner: Arc<Inner>,
    state: Arc<Mutex<Job>>,
}

#[async_trait]
impl ProgressSink for Progress {
    async fn progress(&self, percent: Option<f64>, message: Option<String>) {
        let mut job = self.state.lock().await;
        let events = [JobEvent::JobProgress {
            percent,
            message,
            data: None,
        }];
        let Ok((new, append)) = job_append(
            Some(&job),
            job.id,
            &events,
            JobWrite::new(metadata(&self.inner, &job), domain::now()),
        ) else {
            return;
        };
        match self.inner.store.appender.append(append).await {
            Ok(_) => *job = new,
            Err(AppendError::Conflict { .. }) => {
                if let Ok(Some(fresh)) = store::jobs::get_any(&self.inner.store.pool, job.id).await
                {
                    *job = fresh;
                }
            }
            Err(_) => {}
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
        if let Ok(mut pubsub) = inner.queue.client().get_async_pubsub().await {
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
