//! `POST /v1/orchestrate`: the seed-compatible front door. An intent names a job kind, a
//! workflow (by name, or `workflow:<name>`) or, with an `mcp` object, a tool on an MCP server.
//! The answer is synchronous when the work ends within `CAPIBARA_ORCHESTRATE_WAIT_S` (default
//! 8 s), else `202 {status: "accepted", …}`. Identical requests within an hour return the same
//! job: the content hash is the idempotency key. Modes, the two `status` vocabularies and
//! dangerous intents: docs/orchestrate-design.md.

use std::time::{Duration, Instant};

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use capibara_shared::{
    domain::{
        self,
        auth::Role,
        job::Job,
        kinds,
        kinds::mcp::McpServer,
        orchestrate::{seed_status, Mode, Route},
        problem::FieldError,
        run::Run,
        workflow::{self, Workflow},
    },
    store::{
        self,
        append::CommandRecord,
        runs::{StartError, StartRun},
        AppendError, StoreError,
    },
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{
    auth::Auth,
    error::ApiError,
    extract::ApiJson,
    routes::{
        jobs::{create, rename_input, to_submission, SubmitJob},
        runs,
    },
    AppState,
};

/// `POST /v1/orchestrate` body (orchestrator seed shape).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Orchestrate {
    /// A job kind (`echo`, `memory.write`, …; `GET /v1/kinds` lists them), a workflow's name
    /// (optionally `workflow:<name>`), or with `mcp` the name of a tool on that MCP server.
    pub intent: String,
    /// The job's or run's input; the tool's arguments in mode `mcp`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub inputs: Option<Value>,
    /// Omitted, `sync` or `async`: the existing behaviour (`status` is the job's own: succeeded,
    /// failed, canceled, or accepted; `async` answers 202 at once). The seed's modes answer with
    /// `status` success, error, accepted or dry_run: `agent` runs a job kind, `flow` starts a
    /// workflow, `mcp` calls the tool `intent` on the server in `mcp`, `auto` chooses (`mcp`
    /// given → mcp, a kind → agent, a workflow → flow) and says which in `mode`.
    #[serde(default)]
    #[schema(pattern = "^(auto|agent|flow|mcp|sync|async)$")]
    pub mode: Option<String>,
    #[serde(default)]
    pub callback_url: Option<String>,
    /// Returned as given; not interpreted.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub context: Option<Value>,
    /// Mode `mcp` (or `auto`): the MCP server whose tool `intent` is called with `inputs`.
    #[serde(default)]
    #[schema(inline)]
    pub mcp: Option<McpServer>,
    /// Run an intent marked dangerous (`CAPIBARA_ORCHESTRATE_DANGEROUS`, or `dangerous: true`
    /// on its kind or workflow). Without it such a request is a dry run: the input is checked,
    /// nothing runs, and `status` is `dry_run`.
    #[serde(default)]
    pub confirm_dangerous: bool,
}

/// The answer: the existing fields and the seed's (`mode`, `duration_ms`, `message`).
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct OrchestrateResponse {
    /// Without a seed mode: `accepted` (still running) or the job's or run's final status
    /// (`succeeded`, `failed`, `canceled`). With `mode` agent, flow, mcp or auto: `success`,
    /// `error` (failed or canceled), `accepted` or `dry_run`.
    pub status: String,
    /// The route taken: `agent` (a job of the intent's kind), `flow` (a workflow run) or `mcp`
    /// (an `mcp.call` job).
    pub mode: String,
    /// The job's or run's own status, whatever vocabulary `status` speaks (absent in a dry run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_status: Option<String>,
    /// Time spent answering this request.
    pub duration_ms: u64,
    /// One line for a person: what ran and how it ended, or what a dry run would have done.
    pub message: String,
    /// The job (routes agent and mcp).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<uuid::Uuid>,
    /// The workflow run (route flow).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<uuid::Uuid>,
    pub intent: String,
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    pub error: Option<capibara_shared::domain::job::JobError>,
    /// Where to poll (absent in a dry run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The same job was returned for an identical request within the hour.
    pub deduplicated: bool,
    #[schema(value_type = Option<Object>)]
    pub context: Option<Value>,
    /// A dry run's plan: `{kind, input}`, `{workflow, input}` or `{tool, server, arguments}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub plan: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<Job>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<Run>,
}

/// Identical requests within this window return the same job.
const DEDUP_WINDOW_S: i64 = 3600;

/// What a request's intent names, resolved against this namespace.
enum Target {
    /// A job kind; `dangerous` from its registered definition.
    Kind {
        dangerous: bool,
    },
    Workflow(Box<Workflow>),
    /// `mcp.call`'s whole input.
    Tool(Value),
}

impl Target {
    fn route(&self) -> Route {
        match self {
            Target::Kind { .. } => Route::Agent,
            Target::Workflow(_) => Route::Flow,
            Target::Tool(_) => Route::Mcp,
        }
    }
}

/// One request on its way: what it asked and how it is answered.
struct Call {
    req: Orchestrate,
    mode: Mode,
    route: Route,
    inputs: Value,
    started: Instant,
}

impl Call {
    /// The answer's fields every route fills the same way; the caller adds its own.
    fn response(self, status: String, message: String) -> OrchestrateResponse {
        OrchestrateResponse {
            status,
            mode: self.route.to_string(),
            duration_ms: self.started.elapsed().as_millis() as u64,
            message,
            intent: self.req.intent,
            context: self.req.context,
            ..OrchestrateResponse::default()
        }
    }
}

#[utoipa::path(post, operation_id = "orchestrate", path = "/v1/orchestrate", tag = "jobs", request_body = Orchestrate,
    responses((status = 200, description = "finished within the wait, or a dry run of a dangerous intent", body = OrchestrateResponse),
              (status = 202, description = "accepted; poll `location`", body = OrchestrateResponse),
              (status = 422, description = "bad mode, unknown intent (the detail lists the available ones), or an intent of the wrong sort for the mode", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn orchestrate(
    State(state): State<AppState>,
    auth: Auth,
    body: ApiJson<Orchestrate>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    auth.require(Role::Submit)?;
    let req = body.value;
    let mode = Mode::of(req.mode.as_deref()).map_err(|m| ApiError::field("mode", m))?;
    let wait = if mode.waits() {
        Duration::from_secs_f64(state.config.orchestrate_wait_s)
    } else {
        Duration::ZERO
    };
    let inputs = req
        .inputs
        .clone()
        .unwrap_or_else(|| Value::Object(Default::default()));
    let target = resolve(&state, &auth, &req, mode, &inputs).await?;
    let dangerous = is_dangerous(&state, &auth, &req.intent, &target).await?;
    let call = Call {
        route: target.route(),
        req,
        mode,
        inputs,
        started,
    };
    if dangerous && !call.req.confirm_dangerous {
        return dry_run(&state, &auth, call, target).await;
    }
    // The key: the intent and canonical inputs (and the server of a tool call).
    let mut content = format!("{}\n{}", call.req.intent, call.inputs);
    if let Some(mcp) = &call.req.mcp {
        content.push('\n');
        content.push_str(&serde_json::to_string(mcp).unwrap_or_default());
    }
    let hash = hex::encode(Sha256::digest(content.as_bytes()));
    let key = format!("orchestrate:{hash}");
    store::commands::expire_key(&state.store.pool, auth.namespace(), &key, DEDUP_WINDOW_S).await?;
    match target {
        Target::Workflow(w) => run_workflow(&state, &auth, call, w.id, key, hash, wait).await,
        Target::Kind { .. } => {
            let kind = call.req.intent.clone();
            let input = call.inputs.clone();
            run_job(&state, &auth, call, kind, input, key, hash, wait).await
        }
        Target::Tool(input) => {
            run_job(
                &state,
                &auth,
                call,
                "mcp.call".into(),
                input,
                key,
                hash,
                wait,
            )
            .await
        }
    }
}

/// What the intent names, in the route the mode allows; a 422 naming `intent` (or `mcp`) when
/// it names nothing of that sort.
async fn resolve(
    state: &AppState,
    auth: &Auth,
    req: &Orchestrate,
    mode: Mode,
    inputs: &Value,
) -> Result<Target, ApiError> {
    let wanted = mode.route();
    if req.mcp.is_some() && matches!(wanted, Some(Route::Agent | Route::Flow)) {
        return Err(ApiError::field(
            "mcp",
            format!(
                "names an MCP server, which mode `{}` does not call: use mode mcp or auto",
                mode_name(req)
            ),
        ));
    }
    if wanted == Some(Route::Mcp) || (wanted.is_none() && req.mcp.is_some()) {
        return tool_input(req, inputs).map(Target::Tool);
    }
    let user_kind = if kinds::user::is_builtin(&req.intent) {
        None
    } else {
        store::user_kinds::find(&state.store.pool, auth.namespace(), &[req.intent.as_str()])
            .await?
            .into_iter()
            .next()
    };
    let is_kind = kinds::find_public(&req.intent).is_some() || user_kind.is_some();
    let name = req.intent.strip_prefix("workflow:").unwrap_or(&req.intent);
    let workflow = if is_kind && wanted != Some(Route::Flow) {
        None
    } else {
        store::workflows::find_by_name(&state.store.pool, auth.namespace(), name).await?
    };
    let route = match wanted {
        Some(r) => r,
        None => {
            Route::choose(req.mcp.is_some(), is_kind, workflow.is_some()).unwrap_or(Route::Agent)
        }
    };
    match (route, workflow) {
        (Route::Agent, _) if is_kind => Ok(Target::Kind {
            dangerous: user_kind.is_some_and(|k| k.definition.dangerous),
        }),
        (Route::Flow, Some(w)) => Ok(Target::Workflow(Box::new(w))),
        (Route::Agent, Some(_)) => Err(ApiError::field(
            "intent",
            format!(
                "`{}` is a workflow, not a job kind: use mode flow or auto",
                req.intent
            ),
        )),
        (Route::Flow, None) if is_kind => Err(ApiError::field(
            "intent",
            format!(
                "`{}` is a job kind, not a workflow: use mode agent or auto",
                req.intent
            ),
        )),
        _ => Err(unknown_intent(state, auth, req, mode, route).await?),
    }
}

fn mode_name(req: &Orchestrate) -> &str {
    req.mode.as_deref().unwrap_or("sync")
}

/// The 422 for an intent that names nothing: what exists instead.
async fn unknown_intent(
    state: &AppState,
    auth: &Auth,
    req: &Orchestrate,
    mode: Mode,
    route: Route,
) -> Result<ApiError, ApiError> {
    let workflows: Vec<String> =
        store::workflows::list(&state.store.pool, auth.namespace(), None, 50)
            .await?
            .into_iter()
            .map(|w| w.name)
            .collect();
    let workflows = if workflows.is_empty() {
        "none".to_string()
    } else {
        workflows.join(", ")
    };
    let kinds = format!(
        "{} and this namespace's (GET /v1/kinds)",
        kinds::names().join(", ")
    );
    let detail = match route {
        Route::Flow => format!("unknown workflow `{}`; workflows: {workflows}", req.intent),
        _ if mode == Mode::Agent => {
            format!(
                "unknown job kind `{}`; available kinds: {kinds}",
                req.intent
            )
        }
        _ => format!(
            "unknown intent `{}`; available kinds: {kinds}; workflows: {workflows}",
            req.intent
        ),
    };
    Ok(ApiError::field("intent", detail))
}

/// `mcp.call`'s input for a tool call: the body's `mcp`, the tool and its arguments.
fn tool_input(req: &Orchestrate, inputs: &Value) -> Result<Value, ApiError> {
    let Some(mcp) = &req.mcp else {
        return Err(ApiError::field(
            "mcp",
            "mode mcp needs the server: {\"mcp\": {\"server\": \"https://…/mcp\"}}",
        ));
    };
    let Value::Object(arguments) = inputs else {
        return Err(ApiError::field(
            "inputs",
            "a tool's arguments must be an object",
        ));
    };
    let input = mcp.clone().call(&req.intent, arguments.clone());
    Ok(serde_json::to_value(input).expect("mcp.call input serializes"))
}

/// Field errors of a tool call's `mcp.call` input, named as this body names them.
fn tool_fields(e: ApiError) -> ApiError {
    e.map_fields(|f| {
        let field = match f.field.as_str() {
            "input.tool" => "intent".to_string(),
            "input.arguments" => "inputs".to_string(),
            other => match other.strip_prefix("input.arguments.") {
                Some(rest) => format!("inputs.{rest}"),
                None => match other.strip_prefix("input.") {
                    Some(rest) => format!("mcp.{rest}"),
                    None => other.to_string(),
                },
            },
        };
        FieldError::new(field, f.message)
    })
}

/// Whether the intent is dangerous: by name (`CAPIBARA_ORCHESTRATE_DANGEROUS`), by its
/// definition's `dangerous`, or (a workflow) by a step of a dangerous kind.
async fn is_dangerous(
    state: &AppState,
    auth: &Auth,
    intent: &str,
    target: &Target,
) -> Result<bool, ApiError> {
    let list = &state.config.orchestrate_dangerous;
    if list.matches(intent) {
        return Ok(true);
    }
    Ok(match target {
        Target::Kind { dangerous } => *dangerous,
        Target::Tool(_) => false,
        Target::Workflow(w) => {
            let Some(def) = w.latest() else {
                return Ok(false);
            };
            let steps = def.kind_names();
            if def.dangerous || list.matches(&w.name) || steps.iter().any(|k| list.matches(k)) {
                return Ok(true);
            }
            let names: Vec<&str> = steps.iter().map(String::as_str).collect();
            store::user_kinds::find(&state.store.pool, auth.namespace(), &names)
                .await?
                .iter()
                .any(|k| k.definition.dangerous)
        }
    })
}

/// A dangerous intent without `confirm_dangerous`: check the input as a real request would,
/// append nothing, and say what would run.
async fn dry_run(
    state: &AppState,
    auth: &Auth,
    call: Call,
    target: Target,
) -> Result<Response, ApiError> {
    let plan = match &target {
        Target::Kind { .. } | Target::Tool(_) => {
            let (kind, input) = match &target {
                Target::Tool(input) => ("mcp.call".to_string(), input.clone()),
                _ => (call.req.intent.clone(), call.inputs.clone()),
            };
            let submission = SubmitJob {
                kind: kind.clone(),
                input: Some(input.clone()),
                ..SubmitJob::default()
            };
            let checked = to_submission(submission, state, auth.namespace()).await;
            match &target {
                Target::Tool(_) => {
                    checked.map_err(tool_fields)?;
                    json!({"tool": call.req.intent, "server": input.get("server"), "arguments": call.inputs})
                }
                _ => {
                    checked.map_err(|e| rename_input(e, "inputs"))?;
                    json!({"kind": kind, "input": input})
                }
            }
        }
        Target::Workflow(w) => {
            if let Some(def) = w.latest() {
                workflow::check_input(def, &call.inputs)
                    .map_err(|e| rename_input(e.into(), "inputs"))?;
            }
            json!({"workflow": w.name, "input": call.inputs})
        }
    };
    let message = format!(
        "`{}` is marked dangerous: nothing ran (dry run); send \"confirm_dangerous\": true to run it",
        call.req.intent
    );
    let body = OrchestrateResponse {
        plan: Some(plan),
        ..call.response("dry_run".into(), message)
    };
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// Submit (or, within the hour, return) the job and wait for it.
#[allow(clippy::too_many_arguments)]
async fn run_job(
    state: &AppState,
    auth: &Auth,
    call: Call,
    kind: String,
    input: Value,
    key: String,
    hash: String,
    wait: Duration,
) -> Result<Response, ApiError> {
    let submission = SubmitJob {
        kind,
        input: Some(input),
        callback_url: call.req.callback_url.clone(),
        ..SubmitJob::default()
    };
    // The kind's input check, as for every job; errors name this body's fields.
    let (job, deduplicated) = create(state, auth, submission, Some(key), &hash, "Orchestrate")
        .await
        .map_err(|e| match call.route {
            Route::Mcp => tool_fields(e),
            _ => rename_input(e, "inputs"),
        })?;
    let job = if wait.is_zero() || job.status.is_terminal() {
        job
    } else {
        crate::wait::until_terminal(state, auth.namespace(), job.id, wait)
            .await?
            .unwrap_or(job)
    };
    let done = job.status.is_terminal();
    let succeeded = job.status == domain::job::JobStatus::Succeeded;
    let what = match call.route {
        Route::Mcp => format!("tool `{}`", call.req.intent),
        _ => format!("`{}`", call.req.intent),
    };
    let message = if !done {
        format!("{what} is running; poll /v1/jobs/{}", job.id)
    } else if succeeded {
        format!("{what} succeeded")
    } else {
        match &job.error {
            Some(e) => format!("{what} {}: {}", job.status, e.message),
            None => format!("{what} {}", job.status),
        }
    };
    let status = status_word(call.mode, done, succeeded, job.status.to_string());
    let body = OrchestrateResponse {
        job_status: Some(job.status.to_string()),
        job_id: Some(job.id),
        result: job.output.clone(),
        error: job.error.clone(),
        location: Some(format!("/v1/jobs/{}", job.id)),
        deduplicated,
        job: Some(job),
        ..call.response(status, message)
    };
    Ok(answer(body, done))
}

/// `status` in the vocabulary of the request's mode.
fn status_word(mode: Mode, done: bool, succeeded: bool, own: String) -> String {
    if mode.seed_vocabulary() {
        seed_status(done, succeeded).to_string()
    } else if done {
        own
    } else {
        "accepted".into()
    }
}

/// 200 when the work ended, else 202; `Location` says where to poll.
fn answer(body: OrchestrateResponse, done: bool) -> Response {
    let status = if done {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let location = body.location.clone().unwrap_or_default();
    (
        status,
        [(axum::http::header::LOCATION, location)],
        Json(body),
    )
        .into_response()
}

/// An intent naming a workflow: start (or, within the hour, return) its run and wait for it.
#[allow(clippy::too_many_arguments)]
async fn run_workflow(
    state: &AppState,
    auth: &Auth,
    call: Call,
    workflow_id: uuid::Uuid,
    key: String,
    hash: String,
    wait: Duration,
) -> Result<Response, ApiError> {
    let (run, deduplicated) = match runs::replay(state, auth, &key, &hash).await? {
        Some(run) => (run, true),
        None => {
            state.backlog.admit(1)?;
            let run_id = uuid::Uuid::now_v7();
            // The same checks as a job's callback (the signing secret must exist).
            let callback_url =
                crate::outbound::callback_url(call.req.callback_url.as_deref(), &state.config)
                    .await?;
            let command = CommandRecord {
                id: uuid::Uuid::now_v7(),
                namespace: auth.namespace().to_string(),
                command_type: runs::START_COMMAND.into(),
                idempotency_key: Some(key.clone()),
                request_hash: hash.clone(),
                status_code: 202,
                response: Some(serde_json::json!({"run_id": run_id})),
                stream_id: Some(run_id),
                actor: Some(auth.actor()),
                received_at: domain::now(),
            };
            match store::runs::start_run(
                &state.store,
                StartRun {
                    namespace: auth.namespace().to_string(),
                    workflow_id,
                    input: call.inputs.clone(),
                    callback_url,
                    actor: auth.actor(),
                    command: Some(command),
                    with: Vec::new(),
                    run_id,
                },
            )
            .await
            {
                Ok(run) => (run, false),
                Err(StartError::Input(e)) => return Err(rename_input(e.into(), "inputs")),
                Err(StartError::Append(AppendError::DuplicateCommand)) => (
                    runs::replay(state, auth, &key, &hash)
                        .await?
                        .ok_or_else(|| ApiError::Conflict("the request is in progress".into()))?,
                    true,
                ),
                Err(StartError::WorkflowNotFound) => {
                    return Err(ApiError::field("intent", "the workflow was just deleted"))
                }
                Err(StartError::Append(e)) => return Err(StoreError::from(e).into()),
                Err(StartError::Store(e)) => return Err(e.into()),
            }
        }
    };
    let run = if wait.is_zero() || run.status.is_terminal() {
        run
    } else {
        runs::until_ended(state, auth.namespace(), run.id, wait)
            .await?
            .unwrap_or(run)
    };
    let done = run.status.is_terminal();
    let succeeded = run.status == domain::run::RunStatus::Succeeded;
    let message = if !done {
        format!(
            "workflow `{}` is running; poll /v1/runs/{}",
            call.req.intent, run.id
        )
    } else {
        format!("workflow `{}` {}", call.req.intent, run.status)
    };
    let status = status_word(call.mode, done, succeeded, run.status.to_string());
    let body = OrchestrateResponse {
        job_status: Some(run.status.to_string()),
        run_id: Some(run.id),
        result: run.output.clone(),
        location: Some(format!("/v1/runs/{}", run.id)),
        deduplicated,
        run: Some(run),
        ..call.response(status, message)
    };
    Ok(answer(body, done))
}
