//! `/v1/jobs`: submit (one or a batch), list, get, events (JSON and SSE), cancel, retry.

use std::{collections::BTreeMap, convert::Infallible, time::Duration};

use axum::{
    extract::{Path, RawQuery, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    Json,
};
use base64::Engine;
use capibara_shared::{
    command::{
        self,
        jobs::{Idempotency, SubmitError, Submitter},
    },
    config::Config,
    domain::{
        self,
        auth::Role,
        delivery::validate_patterns,
        event::{EventEnvelope, EventMetadata},
        job::{valid_queue_name, validate_tags, Cancel, Job, NotAllowed, Priority, Submission},
        kinds::{self, KindContext},
        retry::Backoff,
        storable, FieldError,
    },
    installed::{self, RequestKinds},
    store::{
        self,
        jobs::{job_append, JobFilter, JobWrite},
        StoreError,
    },
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;
use uuid::Uuid;

use crate::{
    auth::Auth,
    error::ApiError,
    extract::{idempotency_key, parse_limit, prefer_wait, query_pairs, wants_sse, ApiJson},
    streams::Slot,
    AppState,
};

/// A job submission (contract body).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    /// Job kind: `echo`, `sleep`, `fail`, … (`GET /v1/kinds` lists them).
    pub kind: String,
    /// Kind-specific input (default `{}`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub input: Option<Value>,
    /// Queue (default: the kind's queue).
    #[serde(default)]
    pub queue: Option<String>,
    #[serde(default)]
    pub priority: Option<Priority>,
    /// Run no earlier than this time (RFC 3339, years 0001-9999).
    #[serde(default)]
    pub run_at: Option<DateTime<Utc>>,
    /// Attempts before the job fails (default 3, at most 100).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Per-attempt timeout in seconds (at most 86,400).
    #[serde(default)]
    pub timeout_s: Option<u32>,
    #[serde(default)]
    pub backoff: Option<Backoff>,
    /// POSTed a signed `{type, timestamp, data: <job>}` (Standard Webhooks) on the events in
    /// `callback_events`. Private and loopback addresses are refused unless
    /// `CAPIBARA_OUTBOUND_ALLOW_PRIVATE=true`.
    #[serde(default)]
    pub callback_url: Option<String>,
    /// Events sent to `callback_url` (default `["job.succeeded", "job.failed", "job.canceled"]`).
    #[serde(default)]
    pub callback_events: Option<Vec<String>>,
    #[serde(default)]
    pub tags: Option<BTreeMap<String, String>>,
    /// Return the job submitted with the same `key` within `window_s` seconds instead of a new
    /// one, whatever its body and status (`200` with `Capibara-Deduplicated: true`; the merge is
    /// recorded on that job as `JobDeduplicated`). It supersedes an Idempotency-Key; not in a
    /// batch.
    #[serde(default)]
    #[schema(inline)]
    pub dedup: Option<DedupSpec>,
    /// Not started by then → `canceled` with error `expired`, using no attempt (RFC 3339, after
    /// `run_at` and now). Not with `ttl_s`.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// The same, in seconds from when the job is due (its `run_at`, else now; 1-31,536,000).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 31536000)]
    pub ttl_s: Option<u32>,
    /// The job ends within this many seconds of when it is due, across all attempts: an attempt
    /// is stopped there and no retry starts after it (error `deadline_exceeded`; 1-31,536,000).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 31536000)]
    pub deadline_s: Option<u32>,
    /// Jobs with the same ordering key run one at a time, in submission order, retries
    /// included (1-256 characters; docs/flow-control.md).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 256)]
    pub ordering_key: Option<String>,
    /// Keep one waiting job per `key`, due `delay_s` after the latest submission: while the job
    /// made by the first still waits, each later one replaces its input and pushes it back
    /// (`200` with `Capibara-Debounced: true`; recorded on that job as `JobDebounced`). Not with
    /// `run_at` or `dedup`; not in a batch.
    #[serde(default)]
    #[schema(inline)]
    pub debounce: Option<DebounceSpec>,
}

/// `dedup` of a submission (docs/flow-control.md).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DedupSpec {
    /// 1-256 characters, per namespace.
    #[schema(min_length = 1, max_length = 256)]
    pub key: String,
    /// How long after the first submission the key returns its job (1-2,592,000 s: 30 days).
    #[schema(minimum = 1, maximum = 2592000)]
    pub window_s: u32,
}

impl DedupSpec {
    fn check(self) -> Result<command::jobs::Dedup, ApiError> {
        if self.key.is_empty() || self.key.chars().count() > 256 {
            return Err(ApiError::field("dedup.key", "must be 1-256 characters"));
        }
        if !(1..=2_592_000).contains(&self.window_s) {
            return Err(ApiError::field(
                "dedup.window_s",
                "must be between 1 and 2592000 (30 days)",
            ));
        }
        Ok(command::jobs::Dedup {
            key: self.key,
            window_s: self.window_s,
        })
    }
}

/// `debounce` of a submission (docs/flow-control.md).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DebounceSpec {
    /// 1-256 characters, per namespace.
    #[schema(min_length = 1, max_length = 256)]
    pub key: String,
    /// How long the key must stay quiet before its job is due (1-86,400 s).
    #[schema(minimum = 1, maximum = 86400)]
    pub delay_s: u32,
}

impl DebounceSpec {
    fn check(self) -> Result<command::jobs::Debounce, ApiError> {
        if self.key.is_empty() || self.key.chars().count() > 256 {
            return Err(ApiError::field("debounce.key", "must be 1-256 characters"));
        }
        if !(1..=86_400).contains(&self.delay_s) {
            return Err(ApiError::field(
                "debounce.delay_s",
                "must be between 1 and 86400 (a day)",
            ));
        }
        Ok(command::jobs::Debounce {
            key: self.key,
            delay_s: self.delay_s,
        })
    }
}

/// `POST /v1/jobs/batch` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBatch {
    pub jobs: Vec<SubmitJob>,
}

/// A page of items.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A page from a list query that fetched `limit + 1` rows, newest first: the extra row only
    /// says there is more, and the cursor names the page's last item.
    pub fn from_extra_row(mut items: Vec<T>, limit: i64, id: impl Fn(&T) -> Uuid) -> Page<T> {
        let next_cursor = if items.len() as i64 > limit {
            items.truncate(limit as usize);
            items.last().map(|x| encode_cursor(id(x)))
        } else {
            None
        };
        Page { items, next_cursor }
    }
}

/// Most jobs in one batch.
pub const MAX_BATCH: usize = 1000;

/// The kinds a request names, resolved in the caller's namespace (user kinds are loaded in one
/// query; built-in kinds need none).
pub async fn request_kinds<'a>(
    state: &'a AppState,
    namespace: &str,
    names: &[&str],
) -> Result<RequestKinds<'a>, ApiError> {
    Ok(installed::with_user_kinds(&state.store.pool, &state.config, namespace, names).await?)
}

/// Validate a submission into the domain type; errors name the field.
pub async fn to_submission(
    s: SubmitJob,
    state: &AppState,
    namespace: &str,
) -> Result<Submission, ApiError> {
    let kinds = request_kinds(state, namespace, &[s.kind.as_str()]).await?;
    to_submission_in(s, &state.config, &kinds).await
}

/// [`to_submission`] against kinds already resolved (a batch resolves them once).
pub async fn to_submission_in(
    s: SubmitJob,
    config: &Config,
    kinds: &dyn KindContext,
) -> Result<Submission, ApiError> {
    let input_limit = config.input_limit_bytes;
    let input = s.input.unwrap_or_else(|| Value::Object(Default::default()));
    let size = serde_json::to_vec(&input).map(|v| v.len()).unwrap_or(0);
    if size > input_limit {
        return Err(ApiError::PayloadTooLarge(format!(
            "input is {size} bytes; the limit is {input_limit} bytes"
        )));
    }
    // The one check of a kind's input, the same wherever a job comes from.
    let kind = kinds::validate_input(&s.kind, &input, kinds)?;
    // A user kind's defaults apply where the submission gives none.
    let defaults = kind.user().cloned().unwrap_or_default();
    let queue = s.queue.unwrap_or_else(|| kind.default_queue().to_string());
    if !valid_queue_name(&queue) {
        return Err(ApiError::field(
            "queue",
            "must be 1-64 characters of letters, digits, '.', '_' or '-'",
        ));
    }
    let max_attempts = s.max_attempts.or(defaults.max_attempts).unwrap_or(3);
    if !(1..=100).contains(&max_attempts) {
        return Err(ApiError::field("max_attempts", "must be between 1 and 100"));
    }
    let timeout_s = s.timeout_s.or(defaults.timeout_s);
    if let Some(t) = timeout_s {
        if !(1..=86_400).contains(&t) {
            return Err(ApiError::field("timeout_s", "must be between 1 and 86400"));
        }
    }
    if let Some(b) = &s.backoff {
        b.validate()?;
    }
    let callback_url = crate::outbound::callback_url(s.callback_url.as_deref(), config).await?;
    if let Some(events) = &s.callback_events {
        if callback_url.is_none() {
            return Err(ApiError::field("callback_events", "needs a callback_url"));
        }
        validate_patterns(events, false).map_err(|m| ApiError::field("callback_events", m))?;
    }
    let tags = s.tags.unwrap_or_default();
    validate_tags(&tags)?;
    // Checked here rather than when parsing: a job nested in a schedule's `target` is parsed
    // without field paths, and this names `target.job.run_at`.
    if let Some(t) = s.run_at {
        storable::check_time("run_at", t)?;
    }
    for (field, v) in [("ttl_s", s.ttl_s), ("deadline_s", s.deadline_s)] {
        if v.is_some_and(|v| !(1..=31_536_000).contains(&v)) {
            return Err(ApiError::field(
                field,
                "must be between 1 and 31536000 (a year)",
            ));
        }
    }
    if s.ordering_key
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.chars().count() > 256)
    {
        return Err(ApiError::field("ordering_key", "must be 1-256 characters"));
    }
    if let Some(t) = s.expires_at {
        storable::check_time("expires_at", t)?;
        if s.ttl_s.is_some() {
            return Err(ApiError::field(
                "ttl_s",
                "give `expires_at` or `ttl_s`, not both",
            ));
        }
        let due = s.run_at.unwrap_or_else(domain::now).max(domain::now());
        if t <= due {
            return Err(ApiError::field(
                "expires_at",
                "must be after now and after run_at (the job would expire before it may start)",
            ));
        }
    }
    Ok(Submission {
        kind: s.kind,
        input,
        queue,
        priority: s.priority.or(defaults.priority).unwrap_or_default(),
        run_at: s.run_at.map(domain::truncate_micros),
        max_attempts,
        timeout_s,
        backoff: s.backoff,
        callback_url,
        callback_events: s.callback_events,
        tags,
        run_id: None,
        step_id: None,
        secret_refs: None,
        expires_at: s.expires_at.map(domain::truncate_micros),
        ttl_s: s.ttl_s,
        deadline_s: s.deadline_s,
        ordering_key: s.ordering_key,
        debounce_key: None,
        // Filled from the request's trace context when the job is written.
        traceparent: None,
    })
}

fn metadata(auth: &Auth) -> EventMetadata {
    EventMetadata {
        namespace: auth.namespace().to_string(),
        actor: Some(auth.actor()),
        correlation_id: None,
        causation_id: None,
        ..Default::default()
    }
}

fn location(id: Uuid) -> HeaderValue {
    HeaderValue::from_str(&format!("/v1/jobs/{id}")).expect("ascii")
}

/// 200 with a finished job, else 202 + `Location`.
pub fn job_response(job: &Job, waited: Option<Duration>, replayed: bool) -> Response {
    let status = if job.status.is_terminal() && waited.is_some() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let mut res = (status, Json(job)).into_response();
    let h = res.headers_mut();
    h.insert(header::LOCATION, location(job.id));
    if let Some(w) = waited {
        if let Ok(v) = HeaderValue::from_str(&format!("wait={}", w.as_secs())) {
            h.insert("preference-applied", v);
        }
    }
    if replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    res
}

#[utoipa::path(post, operation_id = "submitJob", path = "/v1/jobs", tag = "jobs", request_body = SubmitJob,
    params(("Prefer" = Option<String>, Header, description = "wait=N: wait up to N seconds (≤ 60) for the result"),
           ("Idempotency-Key" = Option<String>, Header, description = "replays return the same job")),
    responses((status = 200, description = "finished within the wait", body = Job),
              (status = 202, description = "accepted; see Location", body = Job),
              (status = 400, body = crate::error::Problem), (status = 413, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem), (status = 429, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn submit(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    body: ApiJson<SubmitJob>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let wait = prefer_wait(&headers)?;
    let key = idempotency_key(&headers)?;
    let merged_header = if body.value.dedup.is_some() {
        Some("capibara-deduplicated")
    } else if body.value.debounce.is_some() {
        Some("capibara-debounced")
    } else {
        None
    };
    let (job, replayed) = create(&state, &auth, body.value, key, &body.hash, "SubmitJob").await?;
    if let Some(header) = merged_header.filter(|_| replayed) {
        let mut res = finish(&state, &auth, job, wait, false).await?;
        *res.status_mut() = StatusCode::OK;
        res.headers_mut()
            .insert(header, HeaderValue::from_static("true"));
        return Ok(res);
    }
    finish(&state, &auth, job, wait, replayed).await
}

impl SubmitJob {
    /// A job of `kind` with `input` and every other setting at its default.
    pub fn of(kind: &str, input: Value) -> SubmitJob {
        SubmitJob {
            kind: kind.into(),
            input: Some(input),
            ..SubmitJob::default()
        }
    }
}

/// Create a job (or return the one an earlier command with the same idempotency key, or the same
/// `dedup` key within its window, created; or the job pending under the same `debounce` key,
/// merged into). Returns the job and whether it was a replay (or merge).
pub async fn create(
    state: &AppState,
    auth: &Auth,
    mut submission: SubmitJob,
    key: Option<String>,
    hash: &str,
    command_type: &str,
) -> Result<(Job, bool), ApiError> {
    state.backlog.admit(1)?;
    // `dedup` supersedes an Idempotency-Key: its own key makes the request safe to repeat.
    let dedup = submission.dedup.take().map(DedupSpec::check).transpose()?;
    let debounce = submission
        .debounce
        .take()
        .map(DebounceSpec::check)
        .transpose()?;
    if debounce.is_some() && dedup.is_some() {
        return Err(ApiError::field(
            "debounce",
            "give `debounce` or `dedup`, not both",
        ));
    }
    if debounce.is_some() && submission.run_at.is_some() {
        return Err(ApiError::field(
            "debounce",
            "a debounced job is due `delay_s` after the latest submission: give no `run_at`",
        ));
    }
    // `debounce` supersedes an Idempotency-Key as well: a repeat merges into the same job.
    let idempotency = key
        .filter(|_| dedup.is_none() && debounce.is_none())
        .map(|key| Idempotency {
            key,
            request_hash: hash.to_string(),
            command_type: command_type.to_string(),
        });
    if let Some(i) = &idempotency {
        if let Some(job) = command::jobs::replay(&state.store, auth.namespace(), i).await? {
            return Ok((job, true));
        }
    }
    let sub = to_submission(submission, state, auth.namespace()).await?;
    let by = Submitter {
        namespace: auth.namespace().to_string(),
        actor: auth.actor(),
    };
    Ok(match (&dedup, &debounce) {
        (Some(d), _) => command::jobs::submit_deduplicated(&state.store, &by, sub, d).await?,
        (None, Some(d)) => command::jobs::submit_debounced(&state.store, &by, sub, d).await?,
        (None, None) => command::jobs::submit(&state.store, &by, sub, idempotency.as_ref()).await?,
    })
}

/// A submission the command refused.
impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            e @ SubmitError::KeyReused => ApiError::Validation {
                detail: e.to_string(),
                errors: vec![FieldError::new(
                    "Idempotency-Key",
                    "reused with a different body",
                )],
            },
            e @ SubmitError::KeyInUse => ApiError::Conflict(e.to_string()),
            e @ SubmitError::DebounceKind { .. } => ApiError::Validation {
                detail: e.to_string(),
                errors: vec![FieldError::new(
                    "debounce.key",
                    "a job of another kind is pending under this key",
                )],
            },
            SubmitError::Store(e) => e.into(),
        }
    }
}

/// How long a seed endpoint's answer waits for its job when `Prefer: wait` says nothing.
pub const DEFAULT_SEED_WAIT: Duration = Duration::from_secs(30);

/// What the seed endpoints that take a kind's input as their body do (`/v1/semantic/*`,
/// `/v1/http/request`): submit a job of `kind` with that input (errors name the body's own
/// fields), and answer the job when done within `Prefer: wait` (default 30 s), else `202`.
pub async fn run_kind(
    state: &AppState,
    auth: &Auth,
    headers: &HeaderMap,
    kind: &str,
    body: ApiJson<serde_json::Map<String, Value>>,
    command_type: &str,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let wait = prefer_wait(headers)?.unwrap_or(DEFAULT_SEED_WAIT);
    let key = idempotency_key(headers)?;
    let (job, replayed) = create(
        state,
        auth,
        SubmitJob::of(kind, Value::Object(body.value)),
        key,
        &body.hash,
        command_type,
    )
    .await
    .map_err(|e| rename_input(e, ""))?;
    finish(state, auth, job, Some(wait), replayed).await
}

pub async fn finish(
    state: &AppState,
    auth: &Auth,
    job: Job,
    wait: Option<Duration>,
    replayed: bool,
) -> Result<Response, ApiError> {
    let job = match wait {
        Some(d) if !job.status.is_terminal() => {
            crate::wait::until_terminal(state, auth.namespace(), job.id, d)
                .await?
                .unwrap_or(job)
        }
        _ => job,
    };
    Ok(job_response(&job, wait, replayed))
}

#[utoipa::path(post, operation_id = "submitJobBatch", path = "/v1/jobs/batch", tag = "jobs", request_body = SubmitBatch,
    responses((status = 202, description = "all accepted, in order", body = Page<Job>),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn submit_batch(
    State(state): State<AppState>,
    auth: Auth,
    body: ApiJson<SubmitBatch>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let jobs = body.value.jobs;
    if jobs.is_empty() || jobs.len() > MAX_BATCH {
        return Err(ApiError::field(
            "jobs",
            format!("must hold 1 to {MAX_BATCH} jobs"),
        ));
    }
    state.backlog.admit(jobs.len() as u64)?;
    let names: Vec<&str> = jobs.iter().map(|j| j.kind.as_str()).collect();
    let kinds = request_kinds(&state, auth.namespace(), &names).await?;
    let now = domain::now();
    let mut appends = Vec::with_capacity(jobs.len());
    let mut created = Vec::with_capacity(jobs.len());
    for (i, s) in jobs.into_iter().enumerate() {
        for (field, given) in [
            ("dedup", s.dedup.is_some()),
            ("debounce", s.debounce.is_some()),
        ] {
            if given {
                return Err(ApiError::field(
                    format!("jobs[{i}].{field}"),
                    "is not taken in a batch: submit the job on its own",
                ));
            }
        }
        let sub = to_submission_in(s, &state.config, &kinds)
            .await
            .map_err(|e| nest(e, &format!("jobs[{i}]")))?;
        let (job, append) = job_append(
            None,
            Uuid::now_v7(),
            &sub.into_events(now),
            JobWrite::new(metadata(&auth), now),
        )
        .map_err(ApiError::internal)?;
        appends.push(append);
        created.push(job);
    }
    state
        .store
        .appender
        .append_all(appends)
        .await
        .map_err(StoreError::from)?;
    metrics::counter!("capibara_jobs_submitted_total", "kind" => "batch")
        .increment(created.len() as u64);
    // Serialized straight from the jobs: through a `Value` tree first, a batch of 1,000 spent
    // more of the API's CPU building and dropping that tree than writing the answer.
    #[derive(Serialize)]
    struct Items {
        items: Vec<Job>,
    }
    Ok((StatusCode::ACCEPTED, Json(Items { items: created })).into_response())
}

pub fn nest(e: ApiError, prefix: &str) -> ApiError {
    match e {
        ApiError::PayloadTooLarge(m) => ApiError::PayloadTooLarge(format!("{prefix}: {m}")),
        other => other.map_fields(|f| f.under(prefix)),
    }
}

/// Field errors from a job's submission name the input `input`; endpoints whose body calls it
/// something else rename it: `inputs` (`/v1/orchestrate`: `inputs.voice`), or `""` where the
/// body is the input (`POST /v1/tts`: `voice`).
pub fn rename_input(e: ApiError, to: &str) -> ApiError {
    let rename = |field: &str| -> String {
        let rest = if field == "input" {
            ""
        } else if let Some(rest) = field.strip_prefix("input.") {
            rest
        } else {
            return field.to_string();
        };
        match (to, rest) {
            ("", "") => "input".to_string(),
            ("", r) => r.to_string(),
            (t, "") => t.to_string(),
            (t, r) => format!("{t}.{r}"),
        }
    };
    e.map_fields(|f| FieldError::new(rename(&f.field), f.message))
}

pub fn encode_cursor(id: Uuid) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id.as_bytes())
}

pub fn decode_cursor(s: &str) -> Result<Uuid, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
        .and_then(|b| Uuid::from_slice(&b).ok())
        .ok_or_else(|| ApiError::field("cursor", "is not a cursor returned by this API"))
}

/// Jobs, newest first. Besides the parameters listed, `input.<path>=<value>` and
/// `output.<path>=<value>` keep the jobs whose input (output) contains that value at that path
/// (`?input.customer.id=42`; the value is JSON when it parses as JSON, else a string; repeatable).
#[utoipa::path(get, operation_id = "listJobs", path = "/v1/jobs", tag = "jobs",
    params(("status" = Option<capibara_shared::domain::job::JobStatus>, Query), ("kind" = Option<String>, Query), ("queue" = Option<String>, Query),
           ("tag" = Option<String>, Query, pattern = ":", description = "k:v, repeatable"),
           ("created_after" = Option<DateTime<Utc>>, Query), ("created_before" = Option<DateTime<Utc>>, Query),
           ("finished_after" = Option<DateTime<Utc>>, Query), ("finished_before" = Option<DateTime<Utc>>, Query),
           ("error_type" = Option<String>, Query, description = "the error's `type` (`timeout`, `expired`, …)"),
           ("worker" = Option<String>, Query, description = "the worker id of the last attempt"),
           ("limit" = Option<i64>, Query, minimum = 1, maximum = 500),
           ("cursor" = Option<String>, Query, pattern = "^[A-Za-z0-9_-]{21}[AQgw]$", description = "`next_cursor` of the previous page")),
    responses((status = 200, body = Page<Job>), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
    RawQuery(q): RawQuery,
) -> Result<Json<Page<Job>>, ApiError> {
    auth.require(Role::Read)?;
    let mut f = JobFilter::default();
    let mut limit = None;
    for (k, v) in query_pairs(q.as_deref())? {
        match k.as_str() {
            "limit" => limit = Some(v),
            "cursor" => f.before = Some(decode_cursor(&v)?),
            name => {
                // The value of a containment filter is JSON when it parses as JSON (`42`,
                // `true`, `"42"`), else a string.
                let value = match name.split_once('.') {
                    Some(("input" | "output", _)) => {
                        serde_json::from_str(&v).unwrap_or(Value::String(v))
                    }
                    _ => Value::String(v),
                };
                if !f.set(name, &value)? {
                    return Err(ApiError::field(
                        name,
                        format!(
                            "unknown query parameter ({}, limit, cursor)",
                            JobFilter::FIELDS
                        ),
                    ));
                }
            }
        }
    }
    let limit = parse_limit(limit.as_deref())?;
    let items = store::jobs::list(&state.store.pool, auth.namespace(), &f, limit + 1).await?;
    Ok(Json(Page::from_extra_row(items, limit, |j| j.id)))
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    crate::extract::path_id(id, "job")
}

async fn load(state: &AppState, auth: &Auth, id: Uuid) -> Result<Job, ApiError> {
    store::jobs::get(&state.store.pool, auth.namespace(), id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job `{id}`")))
}

#[utoipa::path(get, operation_id = "getJob", path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path), ("Prefer" = Option<String>, Header, description = "wait=N")),
    responses((status = 200, body = Job), (status = 202, description = "still running after the wait", body = Job),
              (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require(Role::Read)?;
    let id = parse_id(&id)?;
    let wait = prefer_wait(&headers)?;
    let job = load(&state, &auth, id).await?;
    answer(&state, &auth, job, wait).await
}

/// A job as read: at once, or (with `Prefer: wait`, `wait`) once it ends or the wait does.
pub async fn answer(
    state: &AppState,
    auth: &Auth,
    job: Job,
    wait: Option<Duration>,
) -> Result<Response, ApiError> {
    match wait {
        None => Ok(Json(job).into_response()),
        Some(_) => finish(state, auth, job, wait, false).await,
    }
}

fn terminal_type(t: &str) -> bool {
    matches!(t, "JobSucceeded" | "JobFailed" | "JobCanceled")
}

fn parse_after(headers: &HeaderMap, q: &[(String, String)]) -> Result<i64, ApiError> {
    let from_query = q.iter().find(|(k, _)| k == "after").map(|(_, v)| v.clone());
    let from_header = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match from_header.or(from_query) {
        None => Ok(0),
        Some(s) => s
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::field("after", "must be an event id returned by this API")),
    }
}

#[utoipa::path(get, operation_id = "listJobEvents", path = "/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = String, Path), ("after" = Option<i64>, Query, minimum = 0, description = "an event id: continue after it"), ("Last-Event-ID" = Option<i64>, Header, minimum = 0, description = "SSE resume; takes precedence over `after`"),
           ("limit" = Option<i64>, Query, minimum = 1, maximum = 500)),
    responses((status = 200, description = "JSON page, or text/event-stream with Accept: text/event-stream",
               body = Page<EventEnvelope>)),
    security(("bearer" = [])))]
pub async fn events(
    State(state): State<AppState>,
    crate::stream_tokens::StreamAuth(auth): crate::stream_tokens::StreamAuth,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    auth.require(Role::Read)?;
    let id = parse_id(&id)?;
    match load(&state, &auth, id).await {
        Ok(_) => {}
        // A finished job whose row `CAPIBARA_RETENTION` pruned keeps its history: in the log,
        // or in its partition's archive (docs/event-log-retention.md).
        // A deleted job (`JobDeleted`, whose row went too) is not found, in the log or archived.
        Err(ApiError::NotFound(m)) => {
            if !store::events::stream_of(&state.store.pool, auth.namespace(), "job", id).await?
                || was_deleted(&state, auth.namespace(), id).await?
            {
                return Err(ApiError::NotFound(m));
            }
        }
        Err(e) => return Err(e),
    }
    stream_events(state, &auth, id, &headers, q.as_deref(), terminal_type).await
}

/// Whether job `id`'s history ends with `JobDeleted`: its last event in the log or, once its
/// partition was archived, in the archive.
async fn was_deleted(state: &AppState, namespace: &str, id: Uuid) -> Result<bool, ApiError> {
    let last = match store::events::last_type(&state.store.pool, id).await? {
        Some(t) => Some(t),
        None => archived(state, namespace, id, 0)
            .await
            .and_then(|events| events.last().map(|e| e.event_type.clone())),
    };
    Ok(last.as_deref() == Some("JobDeleted"))
}

/// One stream's events: a JSON page (`after`, `limit`), or SSE with `Accept: text/event-stream`
/// (resumable with `Last-Event-ID`), ending after an event `terminal` accepts. The caller has
/// checked that the stream is the client's. An SSE stream takes one of the key's stream slots.
pub async fn stream_events(
    state: AppState,
    auth: &Auth,
    id: Uuid,
    headers: &HeaderMap,
    query: Option<&str>,
    terminal: fn(&str) -> bool,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(query)?;
    let after = parse_after(headers, &pairs)?;
    let limit = parse_limit(
        pairs
            .iter()
            .find(|(k, _)| k == "limit")
            .map(|(_, v)| v.as_str()),
    )?;
    if wants_sse(headers) {
        let slot = state.streams.acquire(auth.key.id)?;
        return Ok(sse(
            state,
            slot,
            auth.namespace().to_string(),
            id,
            after,
            terminal,
        )
        .into_response());
    }
    let mut items = store::events::read_stream(&state.store.pool, id, after, limit).await?;
    if items.is_empty() {
        // An archived stream (docs/event-log-retention.md): the slower path, same page shape.
        if let Ok(archives) = &state.artifacts {
            let archived = store::archive::read_archived_stream(
                &state.store.pool,
                archives,
                auth.namespace(),
                id,
                after,
                limit,
            )
            .await
            .map_err(ApiError::internal)?;
            if let Some(archived) = archived {
                items = archived;
            }
        }
    }
    let next_cursor = (items.len() as i64 == limit)
        .then(|| items.last().map(|e| e.id.clone()))
        .flatten();
    Ok(Json(Page { items, next_cursor }).into_response())
}

/// One event of a stream as an SSE message (live or read from the archive alike).
fn sse_event(ev: &capibara_shared::domain::event::EventEnvelope) -> Event {
    Event::default()
        .id(ev.id.clone())
        .event(ev.event_type.clone())
        .data(serde_json::to_string(ev).unwrap_or_default())
}

/// Follow one stream: everything after `after`, then live events, closing after a terminal one
/// (`terminal` tells which event types end the stream). An idle stream sleeps until a hint for
/// its stream arrives (`StreamWatch`), re-reading Postgres only every
/// `CAPIBARA_SSE_FALLBACK_POLL` otherwise; `slot` is held until the stream ends.
/// The events of `id` after `after` when its partition was archived (docs/event-log-retention.md).
async fn archived(
    state: &AppState,
    namespace: &str,
    id: Uuid,
    after: i64,
) -> Option<Vec<capibara_shared::domain::event::EventEnvelope>> {
    let archives = state.artifacts.as_ref().ok()?;
    match store::archive::read_archived_stream(
        &state.store.pool,
        archives,
        namespace,
        id,
        after,
        i64::MAX,
    )
    .await
    {
        Ok(events) => events,
        Err(e) => {
            tracing::warn!(error = %e, stream = %id, "reading an archived stream failed");
            None
        }
    }
}

fn sse(
    state: AppState,
    slot: Slot,
    namespace: String,
    id: Uuid,
    mut after: i64,
    terminal: fn(&str) -> bool,
) -> impl IntoResponse {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    let poll = state.config.sse_fallback_poll;
    tokio::spawn(async move {
        let _slot = slot;
        let notify = state.watch.watch(id);
        let mut first = true;
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let batch = match store::events::read_stream(&state.store.pool, id, after, 500).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "SSE read failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = tx.closed() => return,
                    }
                }
            };
            if first && batch.is_empty() {
                // An archived stream: everything from the archive, then the end.
                if let Some(events) = archived(&state, &namespace, id, after).await {
                    for ev in events {
                        if tx.send(Ok(sse_event(&ev))).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
            }
            let full = batch.len() == 500;
            let mut ended = false;
            for ev in batch {
                after = ev.position();
                ended = terminal(&ev.event_type);
                if tx.send(Ok(sse_event(&ev))).await.is_err() {
                    return;
                }
            }
            if ended {
                return;
            }
            if full {
                continue;
            }
            if std::mem::take(&mut first) {
                // Resumed after the terminal event: nothing more will come. (Later reads see
                // a terminal event as it is appended.)
                if let Ok(Some(last_type)) = store::events::last_type(&state.store.pool, id).await {
                    if terminal(&last_type) {
                        let last = store::events::read_stream(&state.store.pool, id, after, 1)
                            .await
                            .unwrap_or_default();
                        if last.is_empty() {
                            return;
                        }
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(poll) => {}
                _ = tx.closed() => return,
            }
        }
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[utoipa::path(post, operation_id = "cancelJob", path = "/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = String, Path)),
    responses((status = 200, description = "canceled", body = Job),
              (status = 202, description = "running; the worker was told to stop", body = Job),
              (status = 409, description = "already finished", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let id = parse_id(&id)?;
    let (job, done) = command::execute::<Job, _, _, _>(
        &state.store,
        auth.namespace(),
        id,
        &metadata(&auth),
        |job| job.cancel(None),
    )
    .await
    .map_err(|e| ApiError::from_command(e, "job", id))?;
    match done {
        Cancel::Canceled => {
            let entry = store::dispatch::DispatchEntry::of(&job, domain::now());
            let _ = state.queue.remove(&entry).await;
            Ok((StatusCode::OK, Json(job)).into_response())
        }
        Cancel::Requested => {
            if let Err(e) = state.queue.publish_cancel(id).await {
                tracing::warn!(error = %e, "cancel notice not published; the worker sees it at its next heartbeat");
            }
            Ok((StatusCode::ACCEPTED, Json(job)).into_response())
        }
        Cancel::AlreadyRequested => Ok((StatusCode::ACCEPTED, Json(job)).into_response()),
    }
}

#[utoipa::path(post, operation_id = "retryJob", path = "/v1/jobs/{id}/retry", tag = "jobs", params(("id" = String, Path)),
    responses((status = 202, description = "queued again with a fresh budget of attempts", body = Job),
              (status = 409, description = "not failed or canceled", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn retry(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let id = parse_id(&id)?;
    // The submission's budget: read once, it never changes.
    let budget = submitted_max_attempts(&state, id).await?;
    let (job, ()) = command::execute::<Job, _, NotAllowed, _>(
        &state.store,
        auth.namespace(),
        id,
        &metadata(&auth),
        |job| Ok((job.retry(budget.unwrap_or(job.max_attempts))?, ())),
    )
    .await
    .map_err(|e| ApiError::from_command(e, "job", id))?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location(id))],
        Json(job),
    )
        .into_response())
}

#[utoipa::path(delete, operation_id = "deleteJob", path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path)),
    responses((status = 204, description = "deleted: gone from every read of the API; its history stays in the event log"),
              (status = 404, description = "no such job (or already deleted)", body = crate::error::Problem),
              (status = 409, description = "not finished, or a workflow run's step", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Submit)?;
    let id = parse_id(&id)?;
    command::execute::<Job, _, NotAllowed, _>(
        &state.store,
        auth.namespace(),
        id,
        &metadata(&auth),
        |job| Ok((job.delete()?, ())),
    )
    .await
    .map_err(|e| ApiError::from_command(e, "job", id))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn submitted_max_attempts(state: &AppState, id: Uuid) -> Result<Option<u32>, ApiError> {
    Ok(
        store::jobs::submitted_max_attempts(&state.store.pool, &[id])
            .await?
            .remove(&id),
    )
}
