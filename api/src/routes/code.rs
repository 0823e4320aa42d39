//! `/v1/code/*`: the seed-compatible front of `code.run` (docs/code.md).
//!
//! `execute` and `validate` submit a job (`code.run` / `code.validate`, queue `code`) and wait
//! for it, so every run is on the event log like any other job; the cache endpoints read and
//! prune the namespace's `code_cache` rows.

use std::time::Duration;

use axum::{
    body::Bytes,
    extract::{FromRequest, RawQuery, Request, State},
    http::StatusCode,
    response::IntoResponse,
    Json,
};
use capibara_shared::{
    domain::{
        auth::Role,
        job::{Job, JobError, JobStatus},
        kinds, FieldError,
    },
    store::{self, code_cache::CacheStats},
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    auth::Auth,
    error::ApiError,
    extract::{query_pairs, ApiJson},
    routes::jobs::{create, SubmitJob},
    AppState,
};

/// `POST /v1/code/execute` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ExecuteCode {
    /// The snippet (required). Assign to `result` to return a value.
    #[serde(default)]
    pub code: Option<String>,
    /// `python` (default) or `javascript`.
    #[serde(default)]
    pub language: Option<String>,
    /// Any JSON, visible to the code as `context`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub context: Option<Value>,
    /// Wall-clock timeout in seconds (default 5, at most 60).
    #[serde(default)]
    pub timeout: Option<f64>,
    /// Memory cap in MiB (default 128, 64 to 1024).
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// Serve and store a cached result (default true).
    #[serde(default)]
    pub cache: Option<bool>,
}

/// `POST /v1/code/execute` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ExecuteResponse {
    /// The code ran to the end (no exception, no limit hit).
    pub success: bool,
    /// What the code assigned to `result` (null when nothing or on failure).
    #[schema(value_type = Option<Object>)]
    pub result: Value,
    pub stdout: String,
    pub stderr: String,
    /// Executor time in milliseconds (of the original run when `cached`).
    pub execution_time_ms: f64,
    /// Served from the result cache.
    pub cached: bool,
    /// On failure: `type` is `timeout`, `memory_limit`, `output_limit`, `cpu_limit` or
    /// `runtime_error`; `details.traceback` holds the traceback / stack.
    pub error: Option<JobError>,
    pub job_id: uuid::Uuid,
    /// `succeeded`, `failed`, or `accepted` when the job had not finished in time (HTTP 202).
    pub status: String,
}

/// Extra time the API waits beyond the code's own timeout (queueing, reporting).
const WAIT_MARGIN: Duration = Duration::from_secs(10);

/// Reads a body, naming the field in every error: unknown fields, wrong types, missing `code`.
fn parse_body<T: serde::de::DeserializeOwned>(
    body: serde_json::Map<String, Value>,
    known: &[&str],
) -> Result<T, ApiError> {
    if let Some(k) = body.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::field(
            k.clone(),
            format!("unknown field (expected one of: {})", known.join(", ")),
        ));
    }
    if body.get("code").is_none_or(Value::is_null) {
        return Err(ApiError::field("code", "is required"));
    }
    serde_path_to_error::deserialize(Value::Object(body)).map_err(|e| {
        let field = e.path().to_string();
        ApiError::field(field, e.into_inner().to_string())
    })
}

fn rename_input_field(e: FieldError, renames: &[(&str, &str)]) -> ApiError {
    let bare = e
        .field
        .strip_prefix("input.")
        .unwrap_or(&e.field)
        .to_string();
    let field = renames
        .iter()
        .find(|(from, _)| *from == bare)
        .map(|(_, to)| to.to_string())
        .unwrap_or(bare);
    ApiError::field(field, e.message)
}

/// The kind's input check (`kinds::validate_input`), with errors naming this endpoint's
/// fields instead of the job input's.
fn check_input(
    state: &AppState,
    kind: &str,
    input: &Value,
    renames: &[(&str, &str)],
) -> Result<(), ApiError> {
    kinds::validate_input(kind, input, state.config.as_ref())
        .map(|_| ())
        .map_err(|e| rename_input_field(e, renames))
}

/// Submits `kind` with `input` and waits up to `wait` for it to finish.
async fn submit_and_wait(
    state: &AppState,
    auth: &Auth,
    kind: &str,
    input: Value,
    hash: &str,
    wait: Duration,
    command_type: &str,
) -> Result<Job, ApiError> {
    let submission = SubmitJob {
        kind: kind.into(),
        input: Some(input),
        queue: None,
        priority: None,
        run_at: None,
        // Code that failed would fail the same way again.
        max_attempts: Some(1),
        ..SubmitJob::default()
    };
    let (job, _) = create(state, auth, submission, None, hash, command_type).await?;
    if job.status.is_terminal() {
        return Ok(job);
    }
    Ok(
        crate::wait::until_terminal(state, auth.namespace(), job.id, wait)
            .await?
            .unwrap_or(job),
    )
}

#[utoipa::path(post, operation_id = "executeCode", path = "/v1/code/execute", tag = "code", request_body = ExecuteCode,
    responses((status = 200, description = "finished (see `success`)", body = ExecuteResponse),
              (status = 202, description = "still running; poll `/v1/jobs/{job_id}`", body = ExecuteResponse),
              (status = 422, description = "a field is invalid (the problem names it)", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn execute(
    State(state): State<AppState>,
    auth: Auth,
    body: ApiJson<serde_json::Map<String, Value>>,
) -> Result<impl IntoResponse, ApiError> {
    auth.require(Role::Submit)?;
    let req: ExecuteCode = parse_body(
        body.value,
        &[
            "code",
            "language",
            "context",
            "timeout",
            "memory_mb",
            "cache",
        ],
    )?;
    let timeout_ms = match req.timeout {
        None => kinds::CODE_DEFAULT_TIMEOUT_MS,
        Some(t) if t > 0.0 && t * 1000.0 <= kinds::CODE_MAX_TIMEOUT_MS as f64 => {
            ((t * 1000.0).round() as u64).max(1)
        }
        Some(_) => {
            return Err(ApiError::field(
                "timeout",
                format!(
                    "must be more than 0 and at most {} seconds",
                    kinds::CODE_MAX_TIMEOUT_MS / 1000
                ),
            ))
        }
    };
    let mut input = json!({
        "language": req.language.unwrap_or_else(|| "python".into()),
        "code": req.code.unwrap_or_default(),
        "context": req.context.unwrap_or_else(|| json!({})),
        "timeout_ms": timeout_ms,
    });
    if let Some(m) = req.memory_mb {
        input["memory_mb"] = m.into();
    }
    if let Some(c) = req.cache {
        input["cache"] = c.into();
    }
    check_input(&state, "code.run", &input, &[("timeout_ms", "timeout")])?;
    let wait = Duration::from_millis(timeout_ms) + WAIT_MARGIN;
    let job = submit_and_wait(
        &state,
        &auth,
        "code.run",
        input,
        &body.hash,
        wait.min(Duration::from_secs(60)),
        "ExecuteCode",
    )
    .await?;
    let (status_code, body) = execute_response(job);
    Ok((status_code, Json(body)))
}

fn execute_response(job: Job) -> (StatusCode, ExecuteResponse) {
    let out = job.output.clone().unwrap_or(Value::Null);
    let details = job
        .error
        .as_ref()
        .and_then(|e| e.details.clone())
        .unwrap_or(Value::Null);
    // Output on success, error details on failure: both carry stdout/stderr/duration.
    let src = if job.status == JobStatus::Succeeded {
        &out
    } else {
        &details
    };
    let text = |k: &str| src.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let done = job.status.is_terminal();
    let body = ExecuteResponse {
        success: job.status == JobStatus::Succeeded,
        result: out.get("result").cloned().unwrap_or(Value::Null),
        stdout: text("stdout"),
        stderr: text("stderr"),
        execution_time_ms: src
            .get("duration_ms")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        cached: out.get("cached").and_then(Value::as_bool).unwrap_or(false),
        error: job.error.clone(),
        job_id: job.id,
        status: if done {
            job.status.to_string()
        } else {
            "accepted".into()
        },
    };
    let code = if done {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    (code, body)
}

/// `POST /v1/code/validate` body (or query string: `?code=…&language=…`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ValidateCode {
    /// The snippet (required).
    #[serde(default)]
    pub code: Option<String>,
    /// `python` (default) or `javascript`.
    #[serde(default)]
    pub language: Option<String>,
}

/// `POST /v1/code/validate` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ValidateResponse {
    pub valid: bool,
    pub language: String,
    /// The first syntax error, e.g. `SyntaxError: '(' was never closed`.
    pub message: Option<String>,
    /// 1-based line and column of the error.
    pub line: Option<u32>,
    pub column: Option<u32>,
}

/// How long a syntax check may take (it is a parse, milliseconds on an idle worker).
const VALIDATE_WAIT: Duration = Duration::from_secs(15);

/// `POST /v1/code/validate`'s fields: a JSON body, or (as the seed sends them) the query
/// string `?code=…&language=…` with an empty body.
async fn validate_fields(
    state: &AppState,
    query: Option<&str>,
    request: Request,
) -> Result<ApiJson<serde_json::Map<String, Value>>, ApiError> {
    let pairs = query_pairs(query)?;
    if pairs.is_empty() {
        return ApiJson::from_request(request, state).await;
    }
    let body = Bytes::from_request(request, state)
        .await
        .map_err(|e| ApiError::BadRequest(format!("could not read the body: {e}")))?;
    if !body.trim_ascii().is_empty() {
        return Err(ApiError::BadRequest(
            "send `code` and `language` in the query string or in a JSON body, not both".into(),
        ));
    }
    let mut fields = serde_json::Map::new();
    for (k, v) in pairs {
        if fields.insert(k.clone(), Value::String(v)).is_some() {
            return Err(ApiError::field(k, "given twice in the query string"));
        }
    }
    let hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(
            Value::Object(fields.clone()).to_string().as_bytes(),
        ))
    };
    Ok(ApiJson {
        value: fields,
        hash,
    })
}

#[utoipa::path(post, operation_id = "validateCode", path = "/v1/code/validate", tag = "code", request_body = ValidateCode,
    params(("code" = Option<String>, Query, description = "the snippet, when sent in the query string (the seed's form) with no body"),
           ("language" = Option<String>, Query, description = "`python` (default) or `javascript`, with `code` in the query string")),
    responses((status = 200, description = "checked", body = ValidateResponse),
              (status = 422, description = "a field is invalid (the problem names it)", body = crate::error::Problem),
              (status = 503, description = "no code worker answered in time", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn validate(
    State(state): State<AppState>,
    auth: Auth,
    RawQuery(query): RawQuery,
    request: Request,
) -> Result<Json<ValidateResponse>, ApiError> {
    auth.require(Role::Submit)?;
    let body = validate_fields(&state, query.as_deref(), request).await?;
    let req: ValidateCode = parse_body(body.value, &["code", "language"])?;
    let language = req.language.unwrap_or_else(|| "python".into());
    let input = json!({"language": language, "code": req.code.unwrap_or_default()});
    check_input(&state, "code.validate", &input, &[])?;
    let job = submit_and_wait(
        &state,
        &auth,
        "code.validate",
        input,
        &body.hash,
        VALIDATE_WAIT,
        "ValidateCode",
    )
    .await?;
    match (job.status, job.output) {
        (JobStatus::Succeeded, Some(out)) => {
            let num = |k: &str| out.get(k).and_then(Value::as_u64).map(|n| n as u32);
            Ok(Json(ValidateResponse {
                valid: out.get("valid").and_then(Value::as_bool).unwrap_or(false),
                language,
                message: out.get("message").and_then(Value::as_str).map(String::from),
                line: num("line"),
                column: num("column"),
            }))
        }
        (status, _) if status.is_terminal() => Err(ApiError::Internal(anyhow::anyhow!(
            "syntax check job {} ended {status}",
            job.id
        ))),
        _ => {
            tracing::warn!(job_id = %job.id, "no code worker checked the snippet in time");
            Err(ApiError::Unavailable)
        }
    }
}

#[utoipa::path(get, operation_id = "getCodeCacheStats", path = "/v1/code/cache/stats", tag = "code",
    responses((status = 200, description = "the namespace's cache", body = CacheStats)),
    security(("bearer" = [])))]
pub async fn cache_stats(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<CacheStats>, ApiError> {
    auth.require(Role::Read)?;
    Ok(Json(
        store::code_cache::stats(&state.store.pool, auth.namespace()).await?,
    ))
}

/// `DELETE /v1/code/cache` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CacheCleared {
    /// Entries removed.
    pub deleted: u64,
}

/// The largest `older_than_hours` (100 years): beyond it the cutoff leaves the time range.
const MAX_OLDER_THAN_HOURS: f64 = 876_000.0;

#[utoipa::path(delete, operation_id = "clearCodeCache", path = "/v1/code/cache", tag = "code",
    params(("older_than_hours" = Option<f64>, Query, minimum = 0, maximum = 876_000,
            description = "only entries created at least this many hours ago (expired ones always go); omitted = all")),
    responses((status = 200, description = "removed", body = CacheCleared),
              (status = 422, description = "bad `older_than_hours`", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn cache_clear(
    State(state): State<AppState>,
    auth: Auth,
    RawQuery(q): RawQuery,
) -> Result<Json<CacheCleared>, ApiError> {
    auth.require(Role::Submit)?;
    let mut older_than = None;
    for (k, v) in query_pairs(q.as_deref())? {
        match k.as_str() {
            "older_than_hours" => {
                let hours: f64 = v
                    .parse()
                    .ok()
                    .filter(|h: &f64| (0.0..=MAX_OLDER_THAN_HOURS).contains(h))
                    .ok_or_else(|| {
                        ApiError::field(
                            "older_than_hours",
                            format!("must be a number of hours from 0 to {MAX_OLDER_THAN_HOURS}"),
                        )
                    })?;
                older_than = Some(Duration::from_secs_f64(hours * 3600.0));
            }
            other => {
                return Err(ApiError::field(
                    other,
                    "unknown query parameter (expected older_than_hours)",
                ))
            }
        }
    }
    let deleted = store::code_cache::prune(&state.store.pool, auth.namespace(), older_than).await?;
    Ok(Json(CacheCleared { deleted }))
}
