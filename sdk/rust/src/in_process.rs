//! In-process mode (feature `in-process`): the same handlers, run inside `capibara-worker`'s
//! own runtime, straight on Postgres and Redis instead of over HTTP.
//!
//! [`Worker::in_process`](crate::Worker::in_process) declares the handlers' kinds in a
//! namespace (registering the ones it defines or that do not exist yet, as a worker of the
//! protocol does), then runs `capibara_worker::run` with a registry of those kinds: it pops the
//! kinds' lanes of its queues from Redis, claims each attempt in Postgres (fenced by the job's
//! version) before the handler starts, renews leases, enforces `timeout_s`, stops the handler
//! on cancel, records progress, logs and output chunks as events, and on shutdown lets running
//! handlers finish within the grace period and gives the rest back. The worker is listed in
//! `GET /v1/workers` of its namespace and counts as a live worker of its kinds.
//!
//! What differs from the HTTP mode: there is no lease token ([`JobContext::lease`] is
//! `None`); a stopped attempt's handler future is dropped at once (it cannot run cleanup after
//! [`JobContext::cancelled`]; tasks it spawned see the token fire, with
//! [`StopReason::Timeout`] when its `timeout_s` ran out and [`StopReason::Canceled`]
//! otherwise: a cancel, or the end of the shutdown grace); the output schema is the one
//! declared at start; labels and the version are not recorded; a second signal does not cut the
//! grace period short.

use std::{
    collections::BTreeMap,
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use capibara_shared::{
    command,
    domain::{
        event::EventMetadata,
        job::JobError,
        kinds::{
            self,
            user::{KindDef, UserKind},
        },
    },
    queue::Queue,
    store,
};
use capibara_worker::{
    executors::{self, ExecError, Executor, Output, ProgressSink, Registry},
    WorkerOptions,
};
use futures::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    error::{Error, HandlerError, Result},
    types::{Job, KindSpec, Registration},
    worker::{HandlerEntry, HandlerFn, JobContext, JobState, StopReason},
};

/// `capibara-worker`'s settings, for [`InProcess::from_config`].
pub use capibara_shared::config::Config;

/// Where an in-process worker connects, and the namespace its kinds belong to.
pub struct InProcess {
    config: Config,
    namespace: String,
}

impl InProcess {
    /// `capibara-worker`'s settings from the environment (`CAPIBARA_DATABASE_URL`,
    /// `CAPIBARA_REDIS_URL`, `CAPIBARA_REDIS_PREFIX`, `CAPIBARA_VISIBILITY_TIMEOUT_S`, …:
    /// docs/configuration.md); kinds of the namespace `CAPIBARA_NAMESPACE`, `default` if unset.
    pub fn from_env() -> Result<InProcess> {
        let config = Config::from_env().map_err(|e| Error::Config(e.to_string()))?;
        // Workflow steps' `${secret:NAME}` references are resolved here as in `capibara-worker`:
        // with the deployment's key (CAPIBARA_SECRETS_KEY), when one is set.
        if let Some(keyring) = capibara_shared::crypto::Keyring::from_env()
            .map_err(|e| Error::Config(e.to_string()))?
        {
            capibara_shared::crypto::install(keyring);
        }
        let namespace = std::env::var("CAPIBARA_NAMESPACE")
            .ok()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into());
        Ok(InProcess { config, namespace })
    }

    /// Settings made in code; kinds of the namespace `default`.
    pub fn from_config(config: Config) -> InProcess {
        InProcess {
            config,
            namespace: "default".into(),
        }
    }

    /// The namespace whose kinds the handlers serve.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }
}

/// The builder's settings that the in-process mode uses.
pub(crate) struct Settings {
    pub handlers: BTreeMap<String, HandlerEntry>,
    pub specs: BTreeMap<String, KindSpec>,
    pub concurrency: u32,
    pub queues: Option<Vec<String>>,
    pub grace: Duration,
}

/// A started in-process worker.
pub(crate) struct Running {
    pub registration: Registration,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    jobs: Arc<AtomicUsize>,
}

impl Running {
    pub fn running(&self) -> usize {
        self.jobs.load(Ordering::Relaxed)
    }

    /// Wait for the runtime to finish its shutdown (it began when the stop token was cancelled).
    pub async fn finish(&mut self) {
        let Some(task) = self.task.take() else {
            return;
        };
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the in-process worker failed"),
            Err(e) => tracing::error!(error = %e, "the in-process worker panicked"),
        }
    }
}

/// Where an in-process job's reports go: the runtime's sink for the attempt.
pub(crate) struct Reports {
    pub job: Job,
    pub sink: Arc<dyn ProgressSink>,
}

/// Check the kinds, connect, declare the kinds, and start the runtime until `stop`.
pub(crate) async fn start(
    connection: InProcess,
    settings: Settings,
    stop: CancellationToken,
) -> Result<Running> {
    let InProcess { config, namespace } = connection;
    let Settings {
        handlers,
        mut specs,
        concurrency,
        queues,
        grace,
    } = settings;
    let mut declared = Vec::new();
    for name in handlers.keys() {
        if kinds::find(name).is_some() {
            return Err(Error::Config(format!(
                "`{name}` is a built-in kind: capibara-worker runs it"
            )));
        }
        kinds::user::validate_name(name).map_err(|e| field_error(name, e))?;
        let definition = specs
            .remove(name)
            .map(|s| definition(name, &s))
            .transpose()?;
        declared.push((name.clone(), definition));
    }
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        Error::Config(format!("in-process worker: {what}: {e}"))
    };
    let pool = store::connect(&config.database_url, config.db_max_connections)
        .await
        .map_err(|e| unavailable("connecting to Postgres", &e))?;
    store::migrate(&pool)
        .await
        .map_err(|e| unavailable("applying migrations", &e))?;
    let queue =
        Queue::connect_sharded(&config.redis_url, &config.redis_prefix, config.redis_shards)
            .await
            .map_err(|e| unavailable("connecting to Redis", &e))?;
    let store = store::Store::new(
        pool.clone(),
        store::Appender::start(pool, Some(Arc::new(queue.clone())), (&config).into()),
    );
    let id = Uuid::now_v7();
    let name = capibara_worker::runtime::worker_name(id);
    let metadata = EventMetadata {
        namespace: namespace.clone(),
        actor: Some(format!("worker:{id}")),
        ..Default::default()
    };
    let declared_kinds = command::kinds::declare(&store, &metadata, &declared)
        .await
        .map_err(|e| unavailable("registering the kinds", &e))?;
    let mut queues = queues.unwrap_or_else(|| {
        declared_kinds
            .iter()
            .map(|k| k.definition.queue().to_string())
            .collect()
    });
    queues.sort();
    queues.dedup();

    let jobs = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::for_namespace(&namespace);
    for ((kind, entry), declared_kind) in handlers.into_iter().zip(declared_kinds) {
        registry.register_user(
            &kind,
            Arc::new(Handler {
                f: entry.f,
                kind: declared_kind,
                jobs: jobs.clone(),
                worker: name.clone(),
            }),
        );
    }
    let lease_s = config.visibility_timeout.as_secs_f64();
    let registration = Registration {
        id,
        name,
        kinds: declared.into_iter().map(|(k, _)| k).collect(),
        queues: queues.clone(),
        lease_s,
        heartbeat_s: lease_s / 3.0,
    };
    let opts = WorkerOptions {
        queues,
        concurrency: concurrency as usize,
        lease: config.visibility_timeout,
        shutdown_grace: grace,
        id: Some(id),
    };
    tracing::info!(worker = %registration.name, %namespace, kinds = ?registration.kinds, "in-process worker starting");
    let task = tokio::spawn(capibara_worker::run(store, queue, registry, opts, stop));
    Ok(Running {
        registration,
        task: Some(task),
        jobs,
    })
}

/// A declared definition as the server's kind definition, checked as `PUT /v1/kinds` checks it
/// (a push definition cannot come from [`KindSpec`]; refused all the same).
fn definition(name: &str, spec: &KindSpec) -> Result<KindDef> {
    let value = serde_json::to_value(spec).map_err(|e| Error::decode("a kind definition", e))?;
    let def: KindDef =
        serde_json::from_value(value).map_err(|e| Error::Config(format!("kind `{name}`: {e}")))?;
    def.validate().map_err(|e| field_error(name, e))?;
    if def.push.is_some() {
        return Err(Error::Config(format!(
            "kind `{name}`: a push kind runs at its endpoint, not in this process"
        )));
    }
    Ok(def)
}

/// A refused kind name or definition, naming the field.
fn field_error(kind: &str, e: capibara_shared::domain::FieldError) -> Error {
    Error::Config(format!("kind `{kind}`: `{}` {}", e.field, e.message))
}

/// A handler as an executor of the runtime.
struct Handler {
    f: HandlerFn,
    /// The kind as declared at start: its `output_schema` checks what the handler returns.
    kind: UserKind,
    /// Attempts running now, across this worker's handlers.
    jobs: Arc<AtomicUsize>,
    worker: String,
}

/// Counts one running attempt while alive.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How much earlier than `timeout_s` (by this attempt's clock) a stop still counts as the
/// timeout.
const TIMER_SLACK: Duration = Duration::from_millis(50);

/// Tells a handler's tasks that its attempt was stopped, if dropped before it ended.
struct StopOnDrop {
    state: Option<Arc<JobState>>,
    started: Instant,
    timeout: Option<Duration>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            // The runtime's timer started a moment before this attempt's clock.
            let timed_out = self
                .timeout
                .is_some_and(|t| self.started.elapsed() + TIMER_SLACK >= t);
            state.stop(if timed_out {
                StopReason::Timeout
            } else {
                StopReason::Canceled
            });
        }
    }
}

#[async_trait]
impl Executor for Handler {
    async fn execute(&self, ctx: executors::JobContext) -> Result<Output, ExecError> {
        // As soon as the runtime starts the attempt (its timeout runs from about here).
        let started = Instant::now();
        self.jobs.fetch_add(1, Ordering::Relaxed);
        let _counted = Counted(self.jobs.clone());
        let job = sdk_job(&ctx, &self.worker).map_err(|e| {
            ExecError::Abort(JobError::new(
                "invalid_job",
                format!("the job does not decode: {e}"),
            ))
        })?;
        let timeout = job.timeout_s.map(|s| Duration::from_secs(u64::from(s)));
        let state = Arc::new(JobState::new());
        // The runtime stops an attempt by dropping this future: the handler's token then fires
        // for the tasks it spawned.
        let mut stopped = StopOnDrop {
            state: Some(state.clone()),
            started,
            timeout,
        };
        let reports = Reports {
            job,
            sink: ctx.progress.clone(),
        };
        let run = AssertUnwindSafe((self.f)(JobContext::in_process(reports, state))).catch_unwind();
        let ended = run.await;
        stopped.state = None;
        match ended {
            Ok(Ok(output)) => match self.kind.check_output(&output) {
                Ok(()) => Ok(Output {
                    output,
                    ..Default::default()
                }),
                Err(e) => {
                    let e = e.under("output");
                    Err(ExecError::Abort(JobError::new(
                        "invalid_output",
                        format!("`{}` {}", e.field, e.message),
                    )))
                }
            },
            Ok(Err(e)) => Err(exec_error(e)),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "the handler panicked".into());
                Err(ExecError::Retryable(JobError::new("panic", message)))
            }
        }
    }

    /// User code may have effects outside Capibara: each attempt is claimed before it starts,
    /// so a duplicate delivery never runs it twice (as over HTTP, where a job is leased first).
    fn repeatable(&self) -> bool {
        false
    }
}

/// The job as the SDK shows it: as leased over HTTP (running, this attempt, this worker), with
/// the input the runtime resolved.
fn sdk_job(ctx: &executors::JobContext, worker: &str) -> serde_json::Result<Job> {
    let mut v = serde_json::to_value(&*ctx.job)?;
    v["status"] = "running".into();
    v["attempt"] = ctx.attempt.into();
    v["worker_id"] = worker.into();
    v["input"] = ctx.input.clone();
    serde_json::from_value(v)
}

/// How a handler's error steers the job, as over HTTP.
fn exec_error(e: HandlerError) -> ExecError {
    match e {
        HandlerError::Retryable {
            error_type,
            message,
        } => ExecError::Retryable(JobError::new(error_type, message)),
        HandlerError::Fatal {
            error_type,
            message,
        } => ExecError::Abort(JobError::new(error_type, message)),
        HandlerError::RetryAfter { delay, message } => {
            ExecError::RetryAfter(delay, JobError::new("retry_after", message))
        }
    }
}
