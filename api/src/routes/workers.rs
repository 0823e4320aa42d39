//! The worker protocol over HTTP (docs/workers.md): register, long-poll leases, and the
//! lease-scoped reports of a leased job (`Capibara-Lease`), each fenced by its token
//! ([`command::leases`]).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
    Json,
};
use capibara_shared::{
    artifacts::ArtifactError,
    command::{
        self,
        leases::{LeaseError, LeaseToken, Report},
    },
    domain::{
        auth::Role,
        job::{Artifact, AttemptEnd, Job, JobError},
        kinds::{
            self,
            user::{self, KindDef},
        },
        now, FieldError,
    },
    queue::Popped,
    redis_conn::RedisConn,
    store::{
        self,
        workers::{RemoteWorker, WorkerInfo},
    },
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::trainers;
use crate::{
    auth::Auth, error::ApiError, extract::ApiJson, routes::kinds as kind_routes, AppState,
};

/// `POST /v1/workers` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterWorker {
    /// Kinds this worker runs: names, or `{"name": …, <PUT /v1/kinds fields>}` objects that
    /// register or update the kind first (1-100).
    #[schema(value_type = Vec<Object>)]
    pub kinds: Vec<Value>,
    /// Queues to take those kinds' jobs from (default: each kind's queue).
    #[serde(default)]
    pub queues: Option<Vec<String>>,
    /// Jobs it runs at once (1-1000, default 1); informational.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000)]
    pub concurrency: Option<u32>,
    /// Shown in `GET /v1/workers` (1-100 characters).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Your code's version.
    #[serde(default)]
    pub version: Option<String>,
}

/// A registered worker.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RegisteredWorker {
    pub id: Uuid,
    /// Unique name: the `worker_id` of the jobs it runs.
    pub name: String,
    pub kinds: Vec<String>,
    pub queues: Vec<String>,
    /// Visibility timeout: a lease not renewed within it expires and its job runs again.
    pub lease_s: f64,
    /// How often to renew each lease (a third of `lease_s`).
    pub heartbeat_s: f64,
}

/// `POST /v1/workers/{id}/lease` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// Most jobs to take (1-100, default 1).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100)]
    pub max_jobs: Option<u32>,
    /// How long to wait for one when none is waiting (0-30000 ms, default 30000).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 30000)]
    pub wait_ms: Option<u64>,
}

/// A lease on a job's attempt.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LeaseInfo {
    /// Send it as `Capibara-Lease` with every call about this job.
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

/// A leased job.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LeasedJob {
    /// The job as its attempt's claim leaves it (`running`, the next `attempt`). The claim is
    /// written with the attempt's first report, or `CAPIBARA_WORKER_CLAIM_AFTER_MS` (250 ms)
    /// after the lease if none came by then (docs/workers.md, "Fast attempts").
    pub job: Job,
    pub lease: LeaseInfo,
}

/// Jobs handed to a worker.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Leased {
    pub jobs: Vec<LeasedJob>,
}

/// Protocol workers this API process looked up, for [`WORKER_TTL`]: every lease call and report
/// names its worker, whose row changes only when it is deregistered. A deregistration here
/// evicts at once; another process's within [`WORKER_TTL`].
#[derive(Clone, Default)]
pub struct KnownWorkers {
    #[allow(clippy::type_complexity)]
    entries:
        Arc<Mutex<std::collections::HashMap<(String, Uuid), (RemoteWorker, Instant, Instant)>>>,
}

/// How long a looked-up worker is remembered, and how often its `last_heartbeat_at` is written
/// (lease calls and heartbeats mark it alive at most this often).
const WORKER_TTL: Duration = Duration::from_secs(5);

impl KnownWorkers {
    /// The worker `id` of `namespace` (a built-in worker too: push endpoints report for it).
    async fn get(
        &self,
        state: &AppState,
        namespace: &str,
        id: Uuid,
    ) -> Result<Option<RemoteWorker>, ApiError> {
        let key = (namespace.to_string(), id);
        if let Some((w, read, _)) = self.entries.lock().expect("workers").get(&key) {
            if read.elapsed() < WORKER_TTL {
                return Ok(Some(w.clone()));
            }
        }
        let found = store::workers::get_remote(&state.store.pool, namespace, id).await?;
        if let Some(w) = &found {
            let now = Instant::now();
            let mut entries = self.entries.lock().expect("workers");
            let seen = entries.get(&key).map_or(now - WORKER_TTL, |e| e.2);
            entries.insert(key, (w.clone(), now, seen));
        }
        Ok(found)
    }

    /// Record that worker `w` is alive, at most every [`WORKER_TTL`].
    async fn seen(&self, state: &AppState, w: &RemoteWorker) -> Result<(), ApiError> {
        let key = (w.namespace.clone(), w.id);
        let due = {
            let mut entries = self.entries.lock().expect("workers");
            match entries.get_mut(&key) {
                Some(e) if e.2.elapsed() < WORKER_TTL => false,
                Some(e) => {
                    e.2 = Instant::now();
                    true
                }
                None => true,
            }
        };
        if due {
            store::workers::seen(&state.store.pool, w.id).await?;
        }
        Ok(())
    }

    fn forget(&self, namespace: &str, id: Uuid) {
        self.entries
            .lock()
            .expect("workers")
            .remove(&(namespace.to_string(), id));
    }
}

/// Long polls waiting on Redis in this process, each on a connection of its own (a blocked
/// command stalls its connection): bounded, so idle workers cannot exhaust connections.
#[derive(Clone)]
pub struct LongPolls {
    slots: Arc<Semaphore>,
    idle: Arc<Mutex<Vec<RedisConn>>>,
}

/// Most long polls one API process holds at once; beyond, a lease call answers without
/// waiting (the worker polls again).
const MAX_LONG_POLLS: usize = 256;

impl Default for LongPolls {
    fn default() -> Self {
        Self {
            slots: Arc::new(Semaphore::new(MAX_LONG_POLLS)),
            idle: Default::default(),
        }
    }
}

/// A blocking pop waits at most this long per Redis command (below the connection's response
/// timeout); a long poll repeats it until its deadline.
const BLOCK_SLICE: Duration = Duration::from_secs(2);

fn kind_field(i: usize) -> impl Fn(FieldError) -> FieldError {
    move |e| e.under(&format!("kinds[{i}]"))
}

#[utoipa::path(post, operation_id = "registerWorker", path = "/v1/workers", tag = "workers",
    request_body = RegisterWorker,
    responses((status = 201, body = RegisteredWorker), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn register(
    State(state): State<AppState>,
    auth: Auth,
    body: ApiJson<RegisterWorker>,
) -> Result<impl IntoResponse, ApiError> {
    auth.require(Role::Worker)?;
    let req = body.value;
    if req.kinds.is_empty() || req.kinds.len() > 100 {
        return Err(ApiError::field("kinds", "must hold 1 to 100 kinds"));
    }
    let concurrency = req.concurrency.unwrap_or(1);
    if !(1..=1000).contains(&concurrency) {
        return Err(ApiError::field("concurrency", "must be between 1 and 1000"));
    }
    let id = Uuid::now_v7();
    let short = &id.simple().to_string()[24..];
    let name = match req.name.as_deref().map(str::trim) {
        None => format!("worker-{short}"),
        Some(n) if n.is_empty() || n.chars().count() > 100 => {
            return Err(ApiError::field("name", "must be 1-100 characters"))
        }
        Some(n) => format!("{n}-{short}"),
    };
    let labels = req.labels.unwrap_or_default();
    if labels.len() > 32 {
        return Err(ApiError::field("labels", "at most 32 labels"));
    }
    let version = req.version.unwrap_or_default();
    if version.chars().count() > 100 {
        return Err(ApiError::field("version", "at most 100 characters"));
    }
    if let Some(queues) = &req.queues {
        if queues.is_empty() || queues.len() > 100 {
            return Err(ApiError::field("queues", "must hold 1 to 100 queues"));
        }
        if let Some(i) = queues
            .iter()
            .position(|q| !capibara_shared::domain::job::valid_queue_name(q))
        {
            return Err(ApiError::field(
                format!("queues[{i}]"),
                "must be 1-64 characters of letters, digits, '.', '_' or '-'",
            ));
        }
    }
    // Check every declaration before registering any kind.
    let mut declared: Vec<(String, Option<KindDef>)> = Vec::new();
    let mut external: Vec<&kinds::KindSpec> = Vec::new();
    for (i, k) in req.kinds.into_iter().enumerate() {
        let (name, definition) = match k {
            Value::String(name) => (name, None),
            Value::Object(mut o) => {
                let name = match o.remove("name") {
                    Some(Value::String(n)) => n,
                    _ => {
                        return Err(
                            FieldError::new(format!("kinds[{i}].name"), "is required").into()
                        )
                    }
                };
                let def: KindDef = serde_json::from_value(Value::Object(o))
                    .map_err(|e| FieldError::new(format!("kinds[{i}]"), e.to_string()))?;
                def.validate().map_err(kind_field(i))?;
                (name, Some(def))
            }
            _ => {
                return Err(ApiError::field(
                    format!("kinds[{i}]"),
                    "must be a kind name or an object with `name`",
                ))
            }
        };
        match kinds::find(&name) {
            // A built-in kind that external programs run (`finetune.command`): declared by
            // name, its definition is Capibara's.
            Some(k) if k.external && definition.is_none() => {
                external.push(k);
                continue;
            }
            Some(k) if k.external => {
                return Err(ApiError::field(
                    format!("kinds[{i}]"),
                    format!(
                        "`{name}` is a built-in kind: declare it by name, without a definition"
                    ),
                ))
            }
            Some(_) => {
                return Err(ApiError::field(
                    format!("kinds[{i}]"),
                    format!("`{name}` is a built-in kind: capibara-worker runs it"),
                ))
            }
            None => {}
        }
        user::validate_name(&name).map_err(kind_field(i))?;
        if let Some(def) = &definition {
            kind_routes::check_push(&state, def).await?;
        }
        declared.push((name, definition));
    }
    let meta = auth.metadata();
    let kinds = command::kinds::declare(&state.store, &meta, &declared)
        .await
        .map_err(|e| ApiError::from_command(e, "kind", Uuid::nil()))?;
    for (name, _) in &declared {
        state.user_kinds.forget(auth.namespace(), name);
    }
    let queues_of_kinds = kinds
        .iter()
        .map(|k| k.definition.queue().to_string())
        .chain(external.iter().map(|k| k.default_queue.to_string()))
        .collect();
    let mut queues = req.queues.unwrap_or(queues_of_kinds);
    queues.sort();
    queues.dedup();
    let info = WorkerInfo {
        id,
        name: name.clone(),
        host: String::new(),
        pid: 0,
        queues: queues.clone(),
        kinds: declared
            .iter()
            .map(|(n, _)| n.clone())
            .chain(external.iter().map(|k| k.name.to_string()))
            .collect(),
        concurrency: concurrency as i32,
        version,
        started_at: now(),
        last_heartbeat_at: now(),
        stopped_at: None,
        status: "active".into(),
        running: 0,
    };
    let labels = serde_json::to_value(labels).map_err(ApiError::internal)?;
    store::workers::register_remote(&state.store.pool, &info, auth.namespace(), &labels).await?;
    let lease_s = state.config.visibility_timeout.as_secs_f64();
    Ok((
        StatusCode::CREATED,
        Json(RegisteredWorker {
            id,
            name,
            kinds: info.kinds,
            queues,
            lease_s,
            heartbeat_s: lease_s / 3.0,
        }),
    ))
}

/// The caller's registered worker `id`, still running.
async fn worker(state: &AppState, auth: &Auth, id: Uuid) -> Result<RemoteWorker, ApiError> {
    auth.require(Role::Worker)?;
    let w = state
        .known_workers
        .get(state, auth.namespace(), id)
        .await?
        .filter(|w| !w.builtin)
        .ok_or_else(|| ApiError::NotFound(format!("no worker `{id}`")))?;
    if w.stopped_at.is_some() {
        return Err(ApiError::Conflict(format!(
            "worker `{id}` is deregistered; register again"
        )));
    }
    Ok(w)
}

#[utoipa::path(post, operation_id = "leaseJobs", path = "/v1/workers/{id}/lease", tag = "workers",
    params(("id" = String, Path)), request_body = LeaseRequest,
    responses((status = 200, body = Leased), (status = 404, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn lease(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: ApiJson<LeaseRequest>,
) -> Result<Json<Leased>, ApiError> {
    let w = worker(&state, &auth, crate::extract::path_id(&id, "worker")?).await?;
    let max = body.value.max_jobs.unwrap_or(1);
    if !(1..=100).contains(&max) {
        return Err(ApiError::field("max_jobs", "must be between 1 and 100"));
    }
    let wait_ms = body.value.wait_ms.unwrap_or(30_000);
    if wait_ms > 30_000 {
        return Err(ApiError::field("wait_ms", "must be between 0 and 30000"));
    }
    state.known_workers.seen(&state, &w).await?;
    let lanes: Vec<String> = w
        .queues
        .iter()
        .flat_map(|q| w.kinds.iter().map(|k| kinds::lane(q, &w.namespace, k)))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    let term = state.config.visibility_timeout;
    let mut jobs = Vec::new();
    loop {
        let popped = state
            .queue
            .pop_due(&lanes, max as usize)
            .await
            .map_err(|_| ApiError::Unavailable)?;
        let due = popped.due;
        let took = !popped.ids.is_empty();
        claim_all(&state, &w, popped, term, &mut jobs).await?;
        if !jobs.is_empty() {
            break;
        }
        if took {
            // Everything it took was stale (a duplicate entry of a job that ended or started
            // meanwhile): the queue may hold jobs behind them, whose pushes' wake tokens other
            // fetchers may have taken. Pop again rather than wait for one.
            continue;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let Some(first) = wait_for_one(&state, &lanes, left, due).await? else {
            break;
        };
        // Deregistered while it waited (here at once, elsewhere within WORKER_TTL): the job
        // goes back to the queue, not to a worker that is gone.
        if let Err(e) = worker(&state, &auth, w.id).await {
            give_back(&state, &first.ids).await;
            return Err(e);
        }
        claim_all(&state, &w, first, term, &mut jobs).await?;
        if max > 1 && !jobs.is_empty() {
            let more = state
                .queue
                .pop_due(&lanes, max as usize - jobs.len())
                .await
                .map_err(|_| ApiError::Unavailable)?;
            claim_all(&state, &w, more, term, &mut jobs).await?;
        }
        if !jobs.is_empty() {
            break;
        }
    }
    if !jobs.is_empty() {
        metrics::counter!("capibara_worker_protocol_leased_total").increment(jobs.len() as u64);
    }
    Ok(Json(Leased { jobs }))
}

/// Hand out each popped job to `w`, its claim appended later unless a report comes first
/// ([`crate::handed_out`]); those that are not its to run any more are skipped.
async fn claim_all(
    state: &AppState,
    w: &RemoteWorker,
    popped: Popped,
    term: Duration,
    out: &mut Vec<LeasedJob>,
) -> Result<(), ApiError> {
    let popped_n = popped.ids.len();
    let mut handed = command::leases::hand_out_many(&state.store, w, popped, term).await?;
    // A job whose attempt this process handed out and has not claimed yet is still queued in
    // Postgres, so a second delivery of it (the relay pushing again an entry it found popped)
    // reads as one to hand out: it is not.
    handed.retain(|h| !state.handed_out.is_out(h.job.id));
    let stale = popped_n - handed.len();
    if stale > 0 {
        metrics::counter!("capibara_dispatch_stale_total").increment(stale as u64);
    }
    let after = state.config.worker_claim_after;
    if after.is_zero() {
        // Claimed before the answer: the worker is given only what its claim committed.
        let claims = handed.iter().map(|h| (h.started.clone(), h.claim.clone()));
        let claimed = command::leases::claim_handed(&state.store, claims.collect()).await;
        for h in handed
            .into_iter()
            .filter(|h| claimed.iter().any(|j| j.id == h.job.id))
        {
            state.kept_leases.keep(&h.started);
            out.push(leased_job(&h));
        }
        return Ok(());
    }
    let mut claims = Vec::with_capacity(handed.len());
    for h in handed {
        // A report decides on the job as it stands, queued; the worker gets it as its claim
        // will leave it.
        state.kept_leases.keep(&h.job);
        out.push(leased_job(&h));
        claims.push((h.started, h.claim));
    }
    state.handed_out.claim_later(state, claims, after);
    Ok(())
}

/// What a lease call answers for the attempt `h` handed out.
fn leased_job(h: &command::leases::HandedOut) -> LeasedJob {
    LeasedJob {
        job: h.started.clone(),
        lease: LeaseInfo {
            token: h.token.to_string(),
            expires_at: h.expires_at,
        },
    }
}

/// Put popped `ids` back on the queue (best effort: the relay re-pushes what Redis lacks).
async fn give_back(state: &AppState, ids: &[Uuid]) {
    if let Err(e) = store::dispatch::put_back(&state.store.pool, &state.queue, ids).await {
        tracing::warn!(error = %e, "giving popped jobs back failed");
    }
}

/// After a pop on `lanes` that found nothing (`due`: what it said of rate-limited groups), wait
/// up to `left` for one job (blocking waits on a pooled connection).
async fn wait_for_one(
    state: &AppState,
    lanes: &[String],
    left: Duration,
    mut due: Option<Duration>,
) -> Result<Option<Popped>, ApiError> {
    let polls = &state.long_polls;
    let Ok(_slot) = polls.slots.clone().try_acquire_owned() else {
        // Too many long polls here: let the worker come back.
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        return Ok(None);
    };
    let pooled = polls.idle.lock().expect("long poll pool").pop();
    let mut conn = match pooled {
        Some(c) => c,
        None => state
            .queue
            .blocking_connection()
            .await
            .map_err(|_| ApiError::Unavailable)?,
    };
    let deadline = tokio::time::Instant::now() + left;
    let mut found = None;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left < Duration::from_millis(10) {
            break;
        }
        match state
            .queue
            .wait_and_pop(&mut conn, lanes, left.min(BLOCK_SLICE), due)
            .await
        {
            Ok(popped) => {
                if !popped.ids.is_empty() {
                    found = Some(popped);
                    break;
                }
                due = popped.due;
            }
            Err(_) => return Err(ApiError::Unavailable),
        }
    }
    polls.idle.lock().expect("long poll pool").push(conn);
    Ok(found)
}

#[utoipa::path(delete, operation_id = "deregisterWorker", path = "/v1/workers/{id}", tag = "workers",
    params(("id" = String, Path)),
    responses((status = 204, description = "stopped"), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn deregister(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Worker)?;
    let id = crate::extract::path_id(&id, "worker")?;
    store::workers::get_remote(&state.store.pool, auth.namespace(), id)
        .await?
        .filter(|w| !w.builtin)
        .ok_or_else(|| ApiError::NotFound(format!("no worker `{id}`")))?;
    store::workers::stopped(&state.store.pool, id).await?;
    state.known_workers.forget(auth.namespace(), id);
    Ok(StatusCode::NO_CONTENT)
}

// --- Lease-scoped calls -------------------------------------------------------------------

/// The header carrying a lease token.
pub const LEASE_HEADER: &str = "capibara-lease";

/// The caller's worker and the token of `Capibara-Lease`, which must name job `job_id`.
async fn leased(
    state: &AppState,
    auth: &Auth,
    headers: &HeaderMap,
    job_id: &str,
) -> Result<(RemoteWorker, LeaseToken), ApiError> {
    let token = headers.get(LEASE_HEADER).and_then(|v| v.to_str().ok());
    leased_by(state, auth, token, "Capibara-Lease", job_id).await
}

/// The caller's worker and lease `token` (given as `field`), which must name job `job_id`.
async fn leased_by(
    state: &AppState,
    auth: &Auth,
    token: Option<&str>,
    field: &str,
    job_id: &str,
) -> Result<(RemoteWorker, LeaseToken), ApiError> {
    auth.require(Role::Worker)?;
    let job_id = crate::extract::path_id(job_id, "job")?;
    let bad = || ApiError::field(field, "must be the lease token the lease call answered");
    let token: LeaseToken = token.ok_or_else(bad)?.parse().map_err(|()| bad())?;
    if token.job_id != job_id {
        return Err(ApiError::LeaseLost(format!(
            "the lease token is for job `{}`, not `{job_id}`",
            token.job_id
        )));
    }
    let w = state
        .known_workers
        .get(state, auth.namespace(), token.worker_id)
        .await?
        .ok_or_else(|| ApiError::LeaseLost("the lease's worker is not registered here".into()))?;
    Ok((w, token))
}

impl From<LeaseError> for ApiError {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::Lost { .. } => ApiError::LeaseLost(e.to_string()),
            LeaseError::Invalid(f) => f.into(),
        }
    }
}

/// Record `report` under the caller's lease; the job after it.
async fn record(
    state: &AppState,
    auth: &Auth,
    headers: &HeaderMap,
    id: &str,
    report: Report,
) -> Result<Job, ApiError> {
    let (w, token) = leased(state, auth, headers, id).await?;
    record_for(state, &w, token, None, report).await
}

/// Record `report` under lease `token` of worker `w`; the job after it. `loaded` is the job
/// when the caller read it already (a batch reads its jobs at once).
async fn record_for(
    state: &AppState,
    w: &RemoteWorker,
    token: LeaseToken,
    mut loaded: Option<Job>,
    report: Report,
) -> Result<Job, ApiError> {
    let id = token.job_id;
    // The job as its lease call left it, if this process handed it out (crate::kept_leases).
    let last = matches!(report, Report::End(_) | Report::Trained(_));
    if loaded.is_none() {
        loaded = match last {
            true => state.kept_leases.take(id),
            false => state.kept_leases.get(id),
        };
    }
    // The kind's output schema, when a success is reported.
    let mut kind = None;
    if let Report::End(AttemptEnd::Succeeded { .. }) = report {
        // Read the job for its kind only when a kind this worker runs has an output schema.
        let mut schemas = false;
        for k in &w.kinds {
            let known = state.user_kinds.get(state, &w.namespace, k).await?;
            schemas |= known.is_some_and(|k| k.definition.output_schema.is_some());
        }
        if schemas || w.builtin {
            if loaded.is_none() {
                loaded = store::jobs::get(&state.store.pool, &w.namespace, id).await?;
            }
            let job = loaded
                .as_ref()
                .ok_or_else(|| ApiError::NotFound(format!("no job `{id}`")))?;
            kind = state.user_kinds.get(state, &w.namespace, &job.kind).await?;
        }
    }
    let term = state.config.visibility_timeout;
    let after =
        command::leases::report_on(
            &state.store,
            w,
            token,
            term,
            loaded,
            report,
            |out| match &kind {
                Some(k) => k.check_output(out),
                None => Ok(()),
            },
        )
        .await
        .map_err(|e| ApiError::from_command(e, "job", id))?;
    // A report recorded claims an attempt handed out unclaimed, in its own append: the claim
    // waiting in this process is not needed any more. (One refused leaves it waiting.)
    if token.handed.is_some() {
        state.handed_out.forget(id);
    }
    if !last {
        state.kept_leases.refresh(&after);
    }
    Ok(after)
}

/// Claim the attempt `token` names if it was handed out unclaimed and is not claimed yet (a
/// call that needs the attempt running: a heartbeat, an upload, a trainer's success); nothing
/// otherwise.
async fn settle(state: &AppState, w: &RemoteWorker, token: LeaseToken) -> Result<(), ApiError> {
    if token.handed.is_some() {
        record_for(state, w, token, None, Report::Start).await?;
    }
    Ok(())
}

/// Answer to a heartbeat.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Heartbeat {
    /// Stop the handler and report `fail` with `retryable: false` (recorded as canceled).
    pub cancel_requested: bool,
    pub expires_at: DateTime<Utc>,
}

#[utoipa::path(post, operation_id = "heartbeatJob", path = "/v1/jobs/{id}/heartbeat", tag = "workers",
    params(("id" = String, Path), ("Capibara-Lease" = String, Header)),
    responses((status = 200, body = Heartbeat), (status = 409, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn heartbeat(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Heartbeat>, ApiError> {
    let (w, token) = leased(&state, &auth, &headers, &id).await?;
    settle(&state, &w, token).await?;
    let id = token.job_id;
    let term = state.config.visibility_timeout.as_secs_f64();
    let renewed =
        store::workers::renew_lease(&state.store.pool, w.id, &w.name, id, token.attempt, term)
            .await?;
    let job = store::jobs::get(&state.store.pool, &w.namespace, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job `{id}`")))?;
    command::leases::holds(&job, &w, token)?;
    let expires_at = renewed.ok_or_else(|| {
        ApiError::LeaseLost("the lease expired; the job runs again elsewhere".into())
    })?;
    Ok(Json(Heartbeat {
        cancel_requested: job.cancel_requested,
        expires_at,
    }))
}

/// `POST /v1/jobs/{id}/progress` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProgressReport {
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100)]
    pub percent: Option<f64>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
}

#[utoipa::path(post, operation_id = "reportProgress", path = "/v1/jobs/{id}/progress", tag = "workers",
    params(("id" = String, Path), ("Capibara-Lease" = String, Header)), request_body = ProgressReport,
    responses((status = 204, description = "recorded"), (status = 409, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn progress(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: ApiJson<ProgressReport>,
) -> Result<StatusCode, ApiError> {
    let p = body.value;
    if let Some(pc) = p.percent {
        if !(0.0..=100.0).contains(&pc) {
            return Err(ApiError::field("percent", "must be from 0 to 100"));
        }
    }
    if p.message.as_ref().is_some_and(|m| m.chars().count() > 1000) {
        return Err(ApiError::field("message", "at most 1000 characters"));
    }
    // The lease first: a stale token is a 409 whatever the report holds.
    let (w, token) = leased(&state, &auth, &headers, &id).await?;
    let mut data = p.data;
    if let Some(listed) = data.as_mut().and_then(|d| d.get_mut("artifacts")) {
        *listed = stored_files(&state, &id, listed).await?;
    }
    let report = Report::Progress {
        percent: p.percent,
        message: p.message,
        data,
    };
    record_for(&state, &w, token, None, report).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A progress report's `data.artifacts` (files stored while the job runs, such as a training's
/// checkpoints, listed on the job at once): each names a file uploaded for job `id` (what the
/// upload answered, or just `{"name": …}`), and becomes what the store holds, so a report can
/// only list the job's own files.
async fn stored_files(state: &AppState, id: &str, listed: &Value) -> Result<Value, ApiError> {
    let field =
        |i: usize| move |f: FieldError| FieldError::new(format!("data.artifacts[{i}]"), f.message);
    let items = listed
        .as_array()
        .filter(|a| a.len() <= 100)
        .ok_or_else(|| {
            ApiError::field(
                "data.artifacts",
                "must be a list of at most 100 uploaded files",
            )
        })?;
    let mut files = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let named: UploadedArtifact = serde_json::from_value(item.clone()).map_err(|_| {
            ApiError::field(
                format!("data.artifacts[{i}]"),
                "must be an object with the uploaded file's `name`",
            )
        })?;
        files.push(
            uploaded(state, id, &named)
                .await
                .map_err(|e| e.map_fields(field(i)))?,
        );
    }
    serde_json::to_value(files).map_err(ApiError::internal)
}

/// One log line.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogLine {
    /// `debug`, `info`, `warn` or `error`.
    pub level: String,
    pub message: String,
}

/// `POST /v1/jobs/{id}/logs` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogReport {
    pub lines: Vec<LogLine>,
}

#[utoipa::path(post, operation_id = "reportLogs", path = "/v1/jobs/{id}/logs", tag = "workers",
    params(("id" = String, Path), ("Capibara-Lease" = String, Header)), request_body = LogReport,
    responses((status = 204, description = "recorded"), (status = 409, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn logs(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: ApiJson<LogReport>,
) -> Result<StatusCode, ApiError> {
    let lines = body.value.lines;
    if lines.is_empty() || lines.len() > 100 {
        return Err(ApiError::field("lines", "must hold 1 to 100 lines"));
    }
    for (i, l) in lines.iter().enumerate() {
        if !["debug", "info", "warn", "error"].contains(&l.level.as_str()) {
            return Err(ApiError::field(
                format!("lines[{i}].level"),
                "must be one of: debug, info, warn, error",
            ));
        }
        if l.message.chars().count() > 10_000 {
            return Err(ApiError::field(
                format!("lines[{i}].message"),
                "at most 10000 characters",
            ));
        }
    }
    let lines = lines.into_iter().map(|l| (l.level, l.message)).collect();
    record(&state, &auth, &headers, &id, Report::Logs(lines)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/jobs/{id}/chunks` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChunkReport {
    #[schema(minimum = 0)]
    pub seq: u64,
    #[schema(value_type = Object)]
    pub data: Value,
}

#[utoipa::path(post, operation_id = "reportChunk", path = "/v1/jobs/{id}/chunks", tag = "workers",
    params(("id" = String, Path), ("Capibara-Lease" = String, Header)), request_body = ChunkReport,
    responses((status = 204, description = "recorded"), (status = 409, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn chunk(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: ApiJson<ChunkReport>,
) -> Result<StatusCode, ApiError> {
    let c = body.value;
    let report = Report::Chunk {
        seq: c.seq,
        data: c.data,
    };
    record(&state, &auth, &headers, &id, report).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/jobs/{id}/complete` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Complete {
    /// The job's output (default null), checked against the kind's `output_schema`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// Artifacts this attempt uploaded (`PUT /v1/jobs/{id}/artifacts/{name}`): what each upload
    /// answered (or just its `name`); they become the job's artifacts.
    #[serde(default)]
    pub artifacts: Option<Vec<UploadedArtifact>>,
}

/// An uploaded artifact, as `complete` names it: the upload's answer does.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct UploadedArtifact {
    pub name: String,
    /// Default `application/octet-stream`.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Ignored: the store's own size is recorded.
    #[serde(default)]
    pub size: Option<u64>,
    /// Ignored: the store's own location is recorded.
    #[serde(default)]
    pub location: Option<String>,
}

#[utoipa::path(post, operation_id = "completeJob", path = "/v1/jobs/{id}/complete", tag = "workers",
    params(("id" = String, Path), ("Capibara-Lease" = String, Header)), request_body = Complete,
    responses((status = 200, body = Job), (status = 409, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn complete(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: ApiJson<Complete>,
) -> Result<Json<Job>, ApiError> {
    // The lease first: a stale token is a 409 whatever it names.
    let (w, token) = leased(&state, &auth, &headers, &id).await?;
    Ok(Json(completed(&state, &w, token, None, body.value).await?))
}

/// Record the success `c` under lease `token` of worker `w`.
async fn completed(
    state: &AppState,
    w: &RemoteWorker,
    token: LeaseToken,
    mut loaded: Option<Job>,
    c: Complete,
) -> Result<Job, ApiError> {
    let id = token.job_id.to_string();
    let output = c.output.unwrap_or(Value::Null);
    let names = c.artifacts.unwrap_or_default();
    if names.len() > 100 {
        return Err(ApiError::field("artifacts", "at most 100 artifacts"));
    }
    let mut artifacts = Vec::with_capacity(names.len());
    for (i, a) in names.iter().enumerate() {
        artifacts.push(uploaded(state, &id, a).await.map_err(|e| {
            e.map_fields(|f| FieldError::new(format!("artifacts[{i}]"), f.message))
        })?);
    }
    // An external trainer's success registers the model it uploaded.
    if w.kinds.iter().any(|k| k == trainers::TRAINER_KIND) {
        if loaded.is_none() {
            loaded = store::jobs::get(&state.store.pool, &w.namespace, token.job_id).await?;
        }
        if let Some(job) = loaded.as_ref().filter(|j| j.kind == trainers::TRAINER_KIND) {
            // The lease first: a stale token is a 409 whatever it reports.
            // (An attempt handed out unclaimed is claimed by the report.)
            if !command::leases::unclaimed(job, w, token) {
                command::leases::holds(job, w, token)?;
            }
            let trained = trainers::trained(state, output, artifacts).await?;
            return record_for(state, w, token, loaded, Report::Trained(Box::new(trained))).await;
        }
    }
    let end = AttemptEnd::Succeeded { output, artifacts };
    record_for(state, w, token, loaded, Report::End(end)).await
}

/// One job of `POST /v1/workers/{id}/complete`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteOne {
    /// The job's id.
    pub id: String,
    /// Its lease token (what `Capibara-Lease` carries on the one-job calls).
    pub lease: String,
    /// The job's output (default null), checked against the kind's `output_schema`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// Names of artifacts uploaded for this attempt.
    #[serde(default)]
    pub artifacts: Option<Vec<UploadedArtifact>>,
}

/// `POST /v1/workers/{id}/complete` body: up to 100 successes, recorded together.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteMany {
    #[schema(min_items = 1, max_items = 100)]
    pub jobs: Vec<CompleteOne>,
}

/// What came of one job of a batch: `status` is what `POST /v1/jobs/{id}/complete` would have
/// answered (200, or 409 for a lost lease, 422 for an output the schema refuses, …), with its
/// problem when it is not 200.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CompletedOne {
    pub id: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<crate::error::Problem>,
}

/// Answer to `POST /v1/workers/{id}/complete`, one result per job in the order sent.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CompletedMany {
    pub results: Vec<CompletedOne>,
}

#[utoipa::path(post, operation_id = "completeJobs", path = "/v1/workers/{id}/complete", tag = "workers",
    params(("id" = String, Path)), request_body = CompleteMany,
    responses((status = 200, body = CompletedMany), (status = 404, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
/// Complete several jobs in one call (a worker with many short jobs reports them together:
/// one request and one group commit instead of one each). Each job is checked and recorded as
/// by `POST /v1/jobs/{id}/complete`; one refused job does not refuse the others.
pub async fn complete_many(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: ApiJson<CompleteMany>,
) -> Result<Json<CompletedMany>, ApiError> {
    auth.require(Role::Worker)?;
    let worker_id = crate::extract::path_id(&id, "worker")?;
    let jobs = body.value.jobs;
    if jobs.is_empty() || jobs.len() > 100 {
        return Err(ApiError::field("jobs", "must hold 1 to 100 jobs"));
    }
    // The jobs this process handed out as their lease calls left them, one read for the rest;
    // each job's report decides on its row (and reads again only if it changed meanwhile).
    let mut loaded: std::collections::HashMap<Uuid, Job> = std::collections::HashMap::new();
    let mut unread = Vec::new();
    for id in jobs.iter().filter_map(|c| c.id.parse::<Uuid>().ok()) {
        match state.kept_leases.take(id) {
            Some(job) => {
                loaded.insert(id, job);
            }
            None => unread.push(id),
        }
    }
    if !unread.is_empty() {
        loaded.extend(
            store::jobs::get_many(&state.store.pool, &unread)
                .await?
                .into_iter()
                .map(|j| (j.id, j)),
        );
    }
    loaded.retain(|_, j| j.namespace == auth.namespace());
    let results = futures::future::join_all(jobs.into_iter().enumerate().map(|(i, c)| {
        let (state, auth) = (&state, &auth);
        // The token must name this id (checked below), so the row read for it is the job's.
        let job = c.id.parse().ok().and_then(|id| loaded.remove(&id));
        async move {
            let id = c.id.clone();
            let r = async {
                let (w, token) = leased_by(state, auth, Some(&c.lease), "lease", &c.id).await?;
                if token.worker_id != worker_id {
                    return Err(ApiError::LeaseLost(format!(
                        "the lease of job `{id}` is not worker `{worker_id}`'s"
                    )));
                }
                let c = Complete {
                    output: c.output,
                    artifacts: c.artifacts,
                };
                completed(state, &w, token, job, c).await
            }
            .await;
            match r {
                Ok(_) => CompletedOne {
                    id,
                    status: 200,
                    problem: None,
                },
                Err(e) => {
                    if let ApiError::Internal(cause) = &e {
                        tracing::error!(job = %id, error = %format!("{cause:#}"), "completing a job of a batch failed");
                    }
                    let e = e.map_fields(|f| {
                        FieldError::new(format!("jobs[{i}].{}", f.field), f.message)
                    });
                    let problem = e.to_problem();
                    CompletedOne {
                        id,
                        status: problem.status,
                        problem: Some(problem),
                    }
                }
            }
        }
    }))
    .await;
    Ok(Json(CompletedMany { results }))
}

/// The error a worker reports.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportedError {
    /// A short machine-readable type (`ValueError`, `upstream_timeout`, …).
    #[serde(rename = "type")]
    pub error_type: String,
    pub message: String,
}

/// `POST /v1/jobs/{id}/fail` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Fail {
    pub error: ReportedError,
    /// Retry while attempts remain (default true).
    #[serde(default)]
    pub retryable: Option<bool>,
    /// Retry no sooner than this (seconds, 0-86400; default: the job's backoff).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 86400)]
    pub retry_after_s: Option<f64>,
}

#[utoipa::path(post, operation_id = "failJob", path = "/v1/jobs/{id}/fail", tag = "workers",
    params(("id" = String, Path), ("Capibara-Lease" = String, Header)), request_body = Fail,
    responses((status = 200, body = Job), (status = 409, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn fail(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: ApiJson<Fail>,
) -> Result<Json<Job>, ApiError> {
    let f = body.value;
    let error_type = f.error.error_type.trim();
    if error_type.is_empty() || error_type.chars().count() > 100 {
        return Err(ApiError::field("error.type", "must be 1-100 characters"));
    }
    if f.error.message.chars().count() > 10_000 {
        return Err(ApiError::field("error.message", "at most 10000 characters"));
    }
    let retry_after = match f.retry_after_s {
        Some(s) if !(0.0..=86_400.0).contains(&s) => {
            return Err(ApiError::field(
                "retry_after_s",
                "must be from 0 to 86400 seconds",
            ))
        }
        Some(s) => Some(Duration::from_secs_f64(s)),
        None => None,
    };
    let end = AttemptEnd::Failed {
        error: JobError::new(error_type, f.error.message),
        retryable: f.retryable.unwrap_or(true),
        retry_after,
    };
    Ok(Json(
        record(&state, &auth, &headers, &id, Report::End(end)).await?,
    ))
}

/// The artifact `name` uploaded for job `id` (its size read from the store).
async fn uploaded(state: &AppState, id: &str, a: &UploadedArtifact) -> Result<Artifact, ApiError> {
    let name = a.name.as_str();
    let store = state
        .artifacts
        .as_ref()
        .map_err(|_| ApiError::Unavailable)?;
    let job_id = crate::extract::path_id(id, "job")?;
    let missing = || ApiError::field("artifacts", format!("no artifact `{name}` was uploaded"));
    if !capibara_shared::artifacts::valid_name(name) {
        return Err(missing());
    }
    let location = format!("{}/jobs/{job_id}/{name}", store.base());
    let size = match store.get(&location, Some(0..1)).await {
        Ok(read) => read.size,
        Err(ArtifactError::BadRange { size }) => size,
        Err(ArtifactError::NotFound) => return Err(missing()),
        Err(e) => return Err(ApiError::internal(e)),
    };
    Ok(Artifact {
        name: name.to_string(),
        content_type: a
            .content_type
            .clone()
            .filter(|c| !c.is_empty() && c.len() <= 255)
            .unwrap_or_else(|| "application/octet-stream".into()),
        size,
        location,
    })
}

#[utoipa::path(put, operation_id = "uploadArtifact", path = "/v1/jobs/{id}/artifacts/{name}", tag = "workers",
    params(("id" = String, Path), ("name" = String, Path), ("Capibara-Lease" = String, Header)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The file; its Content-Type is kept (default application/octet-stream)."),
    responses((status = 201, body = Artifact), (status = 409, body = crate::error::Problem),
              (status = 413, body = crate::error::Problem), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn upload_artifact(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path((id, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let (w, token) = leased(&state, &auth, &headers, &id).await?;
    settle(&state, &w, token).await?;
    if !capibara_shared::artifacts::valid_name(&name) {
        return Err(ApiError::field(
            "name",
            "must be 1-128 letters, digits, '.', '_' or '-', not starting with '.'",
        ));
    }
    let job = store::jobs::get(&state.store.pool, &w.namespace, token.job_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job `{id}`")))?;
    command::leases::holds(&job, &w, token)?;
    let store = state
        .artifacts
        .as_ref()
        .map_err(|_| ApiError::Unavailable)?;
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 255)
        .unwrap_or("application/octet-stream");
    let artifact = store
        .put(job.id, &name, content_type, body.to_vec())
        .await
        .map_err(ApiError::internal)?;
    Ok((StatusCode::CREATED, Json(artifact)))
}

#[utoipa::path(post, operation_id = "releaseJob", path = "/v1/jobs/{id}/release", tag = "workers",
    params(("id" = String, Path), ("Capibara-Lease" = String, Header)),
    responses((status = 200, body = Job), (status = 409, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn release(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    Ok(Json(
        record(
            &state,
            &auth,
            &headers,
            &id,
            Report::End(AttemptEnd::Released),
        )
        .await?,
    ))
}
