//! Executors: one per job kind family, one file each. They implement [`Executor`] and know
//! nothing of Redis or SQL; the runtime owns claiming, leases, timeouts, retries and reporting.

pub mod builtin;
pub mod callback;
pub mod chat;
pub mod chunk;
pub mod classify;
pub mod code;
pub mod connector;
pub mod content;
pub mod embed;
pub mod finetune;
pub mod http_request;
pub mod llm;
pub mod mail;
pub mod mcp_call;
pub mod memory;
pub mod push;
pub mod tts;
pub mod workflow;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use capibara_shared::domain::job::{Artifact, Job, JobError};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What an executor gets for one attempt.
pub struct JobContext {
    pub job_id: Uuid,
    pub kind: String,
    pub attempt: u32,
    /// Attempts the job may use in all (this one included).
    pub max_attempts: u32,
    pub input: Value,
    /// The job as it was read before this attempt (queue, tags, `timeout_s`, …).
    pub job: Arc<Job>,
    /// Cancelled when the job is canceled or the worker must stop; long work checks it.
    pub cancel: CancellationToken,
    pub progress: Arc<dyn ProgressSink>,
}

/// Where executors report progress (recorded as `JobProgress` events) and streamed partial
/// output (`JobOutputChunk` events, e.g. one per rendered TTS sentence).
#[async_trait]
pub trait ProgressSink: Send + Sync {
    async fn progress(&self, percent: Option<f64>, message: Option<String>) {
        self.progress_with_data(percent, message, None).await
    }

    /// Progress with a JSON `data` payload as well (what SDK handlers may report).
    async fn progress_with_data(
        &self,
        percent: Option<f64>,
        message: Option<String>,
        data: Option<Value>,
    );

    /// Record one piece of partial output; `seq` counts from 0 within the attempt.
    async fn output_chunk(&self, seq: u64, data: Value);

    /// Record a log line (`JobLog`); `level` is `debug`, `info`, `warn` or `error`.
    async fn log(&self, level: &str, message: String);

    /// A progress message that need not be stored at once: recorded in the same commit as the
    /// attempt's next write (its next report, or its end), so it adds no commit of its own.
    async fn note(&self, message: String) {
        self.progress(None, Some(message)).await
    }
}

/// A successful attempt.
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub output: Value,
    pub artifacts: Vec<Artifact>,
    /// Appends to other streams that commit in the same transaction as the job's success, or
    /// not at all (a connector's cursor: docs/connectors-design.md). When one of them conflicts
    /// the attempt fails, retryably, with `stream_moved`.
    pub also: Vec<capibara_shared::store::Append>,
}

/// A failed attempt, typed by what should happen next.
#[derive(Debug, Clone)]
pub enum ExecError {
    /// Retry with the job's backoff if attempts remain.
    Retryable(JobError),
    /// Do not retry: the job fails now.
    Abort(JobError),
    /// Retry after this delay (if attempts remain), instead of the backoff.
    RetryAfter(Duration, JobError),
    /// Not a failure: the attempt waited for something outside the job (a rate limit) and
    /// gives itself back; the job runs again after this delay without using up an attempt.
    Defer(Duration, JobError),
    /// The attempt goes on elsewhere: a push endpoint answered `202` and finishes it through
    /// the worker protocol with the lease token. Nothing is reported; the lease is handed over.
    Detached,
}

impl ExecError {
    /// The error to record (none for an attempt handed over).
    pub fn job_error(&self) -> Option<&JobError> {
        match self {
            ExecError::Retryable(e)
            | ExecError::Abort(e)
            | ExecError::RetryAfter(_, e)
            | ExecError::Defer(_, e) => Some(e),
            ExecError::Detached => None,
        }
    }
}

/// What a failed outbound call ([`crate::fetch::send`]) means for its job, for the kinds that
/// call out (`connector.fetch`, `http.request`): an address the guard refuses, a bad URL or
/// redirect, a body over `limit` (the input field that set it) or a cancel fail the job;
/// no connection or no answer in time is retried.
pub fn outbound_error(e: crate::fetch::GetError, limit: &str) -> ExecError {
    use crate::{fetch::GetError, http::HttpError};
    let abort = |t: &str, m: String| ExecError::Abort(JobError::new(t, m));
    let retry = |t: &str, m: String| ExecError::Retryable(JobError::new(t, m));
    match e {
        GetError::Http(HttpError::Forbidden(m)) => abort("forbidden_address", m),
        GetError::Http(HttpError::InvalidUrl(m)) => abort("invalid_url", m),
        GetError::Http(HttpError::Timeout) => retry("timeout", "no complete answer in time".into()),
        GetError::Http(HttpError::Connect(m)) => retry("connect_failed", m),
        GetError::Http(HttpError::Other(m)) => retry("request_failed", m),
        GetError::TooLarge(n) => abort(
            "response_too_large",
            format!("the response is longer than {n} bytes ({limit})"),
        ),
        e @ (GetError::TooManyRedirects | GetError::BadRedirect) => {
            abort("redirects", e.to_string())
        }
        GetError::Canceled => abort("canceled", "the job was canceled".into()),
        GetError::Sink(m) => retry("artifact_store", m),
    }
}

/// Runs one kind of job.
#[async_trait]
pub trait Executor: Send + Sync {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError>;

    /// Whether running an attempt twice is harmless (no effect outside Capibara). Such attempts
    /// may start before their `JobStarted` is written (fast attempts); others are claimed first,
    /// so a duplicate delivery never runs them twice.
    fn repeatable(&self) -> bool {
        true
    }
}

/// Executors by kind name.
#[derive(Clone, Default)]
pub struct Registry {
    by_kind: HashMap<String, Arc<dyn Executor>>,
    /// How push kinds' calls are made (`None`: this worker does not run push kinds).
    push: Option<PushSupport>,
    /// Kinds registered by users of one namespace, run in this process (the Rust SDK's
    /// in-process mode): their jobs come from the kinds' lanes of this worker's queues.
    user: Option<UserKinds>,
}

/// One namespace's user kinds that a [`Registry`] runs.
#[derive(Clone)]
struct UserKinds {
    namespace: String,
    by_kind: HashMap<String, Arc<dyn Executor>>,
}

/// What calls to push kinds' endpoints need.
#[derive(Clone)]
pub struct PushSupport {
    /// `CAPIBARA_WEBHOOK_SECRET`: calls are signed with it.
    pub secret: Option<capibara_shared::domain::webhook::WebhookSecret>,
    pub policy: crate::http::OutboundPolicy,
}

impl Registry {
    /// Every executor built into this worker.
    pub fn builtin() -> Self {
        let mut r = Registry::default();
        r.register("echo", Arc::new(builtin::Echo));
        r.register("sleep", Arc::new(builtin::Sleep));
        r.register("fail", Arc::new(builtin::Fail));
        r.register(
            capibara_shared::domain::workflow::WAIT_KIND,
            Arc::new(workflow::Wait),
        );
        r
    }

    /// Built-ins plus `callback.deliver`.
    pub fn with_callbacks(callback: callback::CallbackDeliver) -> Self {
        let mut r = Self::builtin();
        r.register("callback.deliver", Arc::new(callback));
        r
    }

    pub fn register(&mut self, kind: &str, executor: Arc<dyn Executor>) {
        self.by_kind.insert(kind.to_string(), executor);
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn Executor>> {
        self.by_kind.get(kind).cloned()
    }

    /// A registry of no built-in kind, for user kinds of `namespace` ([`Registry::register_user`]).
    pub fn for_namespace(namespace: impl Into<String>) -> Self {
        Registry {
            user: Some(UserKinds {
                namespace: namespace.into(),
                by_kind: HashMap::new(),
            }),
            ..Default::default()
        }
    }

    /// Run jobs of user kind `kind` of the registry's namespace with `executor`.
    ///
    /// # Panics
    /// If the registry was not made with [`Registry::for_namespace`].
    pub fn register_user(&mut self, kind: &str, executor: Arc<dyn Executor>) {
        self.user
            .as_mut()
            .expect("a registry for a namespace (Registry::for_namespace)")
            .by_kind
            .insert(kind.to_string(), executor);
    }

    /// The executor of a job of `kind` in `namespace`: a built-in one, or a user kind of the
    /// registry's namespace.
    pub fn executor(&self, namespace: &str, kind: &str) -> Option<Arc<dyn Executor>> {
        self.get(kind).or_else(|| {
            self.user
                .as_ref()
                .filter(|u| u.namespace == namespace)
                .and_then(|u| u.by_kind.get(kind).cloned())
        })
    }

    /// Whether any built-in kind runs here (the worker then takes jobs from its queues
    /// themselves, not only from user kinds' lanes).
    pub fn has_builtin(&self) -> bool {
        !self.by_kind.is_empty()
    }

    /// The namespace and names of the user kinds that run here.
    pub fn user_kinds(&self) -> Option<(&str, Vec<String>)> {
        self.user.as_ref().map(|u| {
            let mut k: Vec<String> = u.by_kind.keys().cloned().collect();
            k.sort();
            (u.namespace.as_str(), k)
        })
    }

    /// Run push kinds with `support`.
    pub fn with_push(mut self, support: PushSupport) -> Self {
        self.push = Some(support);
        self
    }

    pub fn push(&self) -> Option<&PushSupport> {
        self.push.as_ref()
    }

    /// Every kind that runs here, built-in and user kinds.
    pub fn kinds(&self) -> Vec<String> {
        let mut k: Vec<String> = self.by_kind.keys().cloned().collect();
        if let Some((_, user)) = self.user_kinds() {
            k.extend(user);
        }
        k.sort();
        k
    }
}
