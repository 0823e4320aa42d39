//! Tools: one per kind the namespace sees and one per workflow (`workflow.<name>`). Calling
//! one submits a job (through [`routes::jobs::create`], the submission every entry point
//! uses) or starts a run ([`routes::workflows::start`]), waits for it while relaying its
//! progress, and answers its result, or a handle and a `resource_link` past the wait.

use std::time::Duration;

use capibara_shared::{
    domain::{auth::Role, job::Job, job::JobStatus, run::Run},
    store,
};
use serde_json::{json, Value};
use tokio::{sync::mpsc::UnboundedSender, time::Instant};
use uuid::Uuid;

use super::protocol::{self, RpcError};
use crate::{
    auth::Auth,
    error::ApiError,
    routes::{self, jobs::SubmitJob},
    AppState,
};

/// Prefix of workflow tools' names.
pub const WORKFLOW_PREFIX: &str = "workflow.";
/// Workflows offered as tools, at most (the newest).
const MAX_WORKFLOWS: i64 = 200;
/// Re-read interval when no stream hint arrives.
const POLL: Duration = Duration::from_millis(500);

/// Where progress of a call goes: its token and the response stream's sender.
pub struct Progress {
    pub token: Value,
    pub tx: UnboundedSender<Value>,
    /// The last `progress` value sent (it must increase).
    sent: f64,
}

impl Progress {
    pub fn new(token: Value, tx: UnboundedSender<Value>) -> Self {
        Progress {
            token,
            tx,
            sent: 0.0,
        }
    }

    fn send(&mut self, progress: f64, total: Option<f64>, message: Option<String>) {
        if progress <= self.sent {
            return;
        }
        self.sent = progress;
        let _ = self
            .tx
            .send(protocol::progress(&self.token, progress, total, message));
    }
}

/// A tool's input schema: an object schema (MCP requires `type: object`).
fn object_schema(schema: Option<Value>) -> Value {
    match schema {
        Some(Value::Object(mut m)) if !m.is_empty() => {
            m.entry("type").or_insert_with(|| json!("object"));
            Value::Object(m)
        }
        _ => json!({"type": "object"}),
    }
}

/// `tools/list`: every visible kind, then every workflow.
pub async fn list(state: &AppState, auth: &Auth) -> Result<Value, RpcError> {
    auth.require(Role::Read)?;
    let mut tools: Vec<Value> = routes::kinds::visible(state, auth.namespace())
        .await?
        .into_iter()
        .map(|k| {
            json!({"name": k.name, "title": k.name, "description": k.description,
                   "inputSchema": object_schema(Some(k.input_schema))})
        })
        .collect();
    let workflows =
        store::workflows::list(&state.store.pool, auth.namespace(), None, MAX_WORKFLOWS)
            .await
            .map_err(ApiError::from)?;
    for w in workflows {
        let schema = w
            .versions
            .iter()
            .find(|v| v.version == w.version)
            .and_then(|v| v.definition.input_schema.clone());
        let description = w
            .description
            .clone()
            .unwrap_or_else(|| format!("Runs the workflow `{}` and answers its output.", w.name));
        tools.push(json!({
            "name": format!("{WORKFLOW_PREFIX}{}", w.name),
            "title": w.name,
            "description": description,
            "inputSchema": object_schema(schema),
        }));
    }
    Ok(json!({"tools": tools}))
}

/// A result with one text block (and `structuredContent` when given).
fn result(text: String, structured: Option<Value>, is_error: bool) -> Value {
    let mut r = json!({"content": [{"type": "text", "text": text}], "isError": is_error});
    if let Some(s) = structured.filter(Value::is_object) {
        r["structuredContent"] = s;
    }
    r
}

/// An input the submission refused: a tool error the model can correct (2025-11-25).
fn refused(e: ApiError) -> Result<Value, RpcError> {
    match e {
        ApiError::Validation { detail, errors } => {
            let fields: Vec<String> = errors
                .iter()
                .map(|f| format!("{}: {}", f.field, f.message))
                .collect();
            let why = if fields.is_empty() {
                detail
            } else {
                fields.join("; ")
            };
            Ok(result(format!("invalid arguments: {why}"), None, true))
        }
        e @ (ApiError::BadRequest(_) | ApiError::PayloadTooLarge(_) | ApiError::Conflict(_)) => {
            Ok(result(e.to_string(), None, true))
        }
        e => Err(e.into()),
    }
}

/// `tools/call`: run the tool, waiting at most `wait`.
pub async fn call(
    state: &AppState,
    auth: &Auth,
    params: &Value,
    wait: Duration,
    progress: Option<Progress>,
) -> Result<Value, RpcError> {
    let name = params["name"]
        .as_str()
        .ok_or_else(|| RpcError::invalid_params("`name` names the tool"))?;
    let arguments = match &params["arguments"] {
        Value::Null => json!({}),
        a @ Value::Object(_) => a.clone(),
        _ => return Err(RpcError::invalid_params("`arguments` must be an object")),
    };
    auth.require(Role::Submit)?;
    if let Some(workflow) = name.strip_prefix(WORKFLOW_PREFIX) {
        let found = store::workflows::find_by_name(&state.store.pool, auth.namespace(), workflow)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| RpcError::invalid_params(format!("Unknown tool: {name}")))?;
        let run = match routes::workflows::start(state, auth, found.id, arguments).await {
            Ok(run) => run,
            Err(e) => return refused(e),
        };
        let run = wait_run(state, auth.namespace(), run, wait, progress).await?;
        return Ok(run_result(&run));
    }
    let known = routes::kinds::visible(state, auth.namespace())
        .await?
        .iter()
        .any(|k| k.name == name);
    if !known {
        return Err(RpcError::invalid_params(format!("Unknown tool: {name}")));
    }
    let created = routes::jobs::create(
        state,
        auth,
        SubmitJob::of(name, arguments),
        None,
        "",
        "McpToolCall",
    )
    .await;
    let job = match created {
        Ok((job, _)) => job,
        Err(e) => return refused(e),
    };
    let job = wait_job(state, auth.namespace(), job, wait, progress).await?;
    Ok(job_result(&job))
}

/// The job once terminal, or as it is when `wait` passes; its progress reports are relayed.
async fn wait_job(
    state: &AppState,
    namespace: &str,
    job: Job,
    wait: Duration,
    mut progress: Option<Progress>,
) -> Result<Job, ApiError> {
    let deadline = Instant::now() + wait;
    let notify = state.watch.watch(job.id);
    let mut last: Option<Value> = None;
    let mut reports = 0.0;
    let mut job = job;
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(j) = store::jobs::get(&state.store.pool, namespace, job.id).await? {
            job = j;
        }
        if let (Some(p), Some(now)) = (progress.as_mut(), job.progress.as_ref()) {
            if last.as_ref() != Some(now) {
                last = Some(now.clone());
                reports += 1.0;
                let message = now["message"].as_str().map(str::to_string);
                match now["percent"].as_f64() {
                    Some(pct) => p.send(pct, Some(100.0), message),
                    None => p.send(reports, None, message),
                }
            }
        }
        let now = Instant::now();
        if job.status.is_terminal() || now >= deadline {
            return Ok(job);
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep((deadline - now).min(POLL)) => {}
        }
    }
}

/// The run once ended, or as it is when `wait` passes; each finished step is a progress report.
async fn wait_run(
    state: &AppState,
    namespace: &str,
    run: Run,
    wait: Duration,
    mut progress: Option<Progress>,
) -> Result<Run, ApiError> {
    let deadline = Instant::now() + wait;
    let notify = state.watch.watch(run.id);
    let mut run = run;
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(r) = store::runs::get(&state.store.pool, namespace, run.id).await? {
            run = r;
        }
        if let Some(p) = progress.as_mut() {
            let done = run.steps.iter().filter(|s| s.status.is_terminal()).count();
            if done > 0 {
                let message = format!("{done} of {} steps done", run.steps.len());
                p.send(done as f64, Some(run.steps.len() as f64), Some(message));
            }
        }
        let now = Instant::now();
        if run.status.is_terminal() || now >= deadline {
            return Ok(run);
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep((deadline - now).min(POLL)) => {}
        }
    }
}

/// A link to a resource this server serves.
fn link(uri: String, name: String, mime: &str) -> Value {
    json!({"type": "resource_link", "uri": uri, "name": name, "mimeType": mime})
}

/// The answer for a job: its output, its error, or a handle while it runs.
pub fn job_result(job: &Job) -> Value {
    let uri = super::resources::job_uri(job.id);
    match job.status {
        JobStatus::Succeeded => {
            let output = job.output.clone().unwrap_or(Value::Null);
            let mut r = result(output.to_string(), Some(output), false);
            let content = r["content"].as_array_mut().expect("made above");
            for a in &job.artifacts {
                content.push(link(
                    super::resources::artifact_uri(job.id, &a.name),
                    a.name.clone(),
                    &a.content_type,
                ));
            }
            r
        }
        s if s.is_terminal() => {
            let why = job
                .error
                .as_ref()
                .map(|e| format!("{}: {}", e.error_type, e.message))
                .unwrap_or_default();
            result(format!("job {} {s}: {why}", job.id), None, true)
        }
        s => handle(job.id, &s.to_string(), uri, "job"),
    }
}

/// The answer for a run.
pub fn run_result(run: &Run) -> Value {
    let status = run.status.to_string();
    if !run.status.is_terminal() {
        return handle(run.id, &status, super::resources::run_uri(run.id), "run");
    }
    match &run.output {
        Some(output) if status == "succeeded" => {
            result(output.to_string(), Some(output.clone()), false)
        }
        _ => {
            let why = run.error.clone().unwrap_or(Value::Null);
            result(format!("run {} {status}: {why}", run.id), None, true)
        }
    }
}

/// Still running: where to read the result later.
fn handle(id: Uuid, status: &str, uri: String, what: &str) -> Value {
    let mut r = result(
        format!("the {what} {id} is {status}; read the resource {uri} for its result later"),
        Some(json!({"id": id, "status": status, "resource": uri})),
        false,
    );
    r["content"].as_array_mut().expect("made above").push(link(
        uri,
        format!("{what} {id}"),
        "application/json",
    ));
    r
}
