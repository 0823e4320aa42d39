//! `/v1/workflows`: define (JSON or YAML), list, get with versions, update (a new version),
//! delete, and start runs.

use std::convert::Infallible;

use axum::{
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use capibara_shared::{
    command,
    domain::{
        self,
        auth::Role,
        kinds::{KindContext, UserKindLookup},
        workflow::{Workflow, WorkflowDef, WorkflowEvent},
    },
    store::{
        self,
        append::CommandRecord,
        runs::{StartError, StartRun},
        workflows::workflow_append,
        AppendError, StoreError,
    },
};
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::jobs::{decode_cursor, Page};
use crate::{
    auth::Auth,
    error::ApiError,
    extract::{idempotency_key, parse_limit, prefer_wait, query_pairs, ApiJson},
    AppState,
};

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    crate::extract::path_id(id, "workflow")
}

/// Parse and validate a definition from a JSON or YAML body (static step inputs get the same
/// check as a job submitted on its own).
async fn definition(
    state: &AppState,
    auth: &Auth,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<WorkflowDef, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let yaml = ct.contains("yaml");
    if !yaml && !ct.starts_with("application/json") && !ct.contains("+json") {
        return Err(ApiError::UnsupportedMediaType(
            "send the definition as application/json or application/yaml".into(),
        ));
    }
    let mut def = WorkflowDef::parse(body, yaml)?;
    let names = def.kind_names();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let kinds = crate::routes::jobs::request_kinds(state, auth.namespace(), &names).await?;
    def.validate(&kinds)?;
    def.fill_user_kind_queues(|name| match kinds.user_kind(name) {
        UserKindLookup::Registered(k) => Some(k.definition.queue().to_string()),
        _ => None,
    });
    Ok(def)
}

async fn load(state: &AppState, auth: &Auth, id: Uuid) -> Result<Workflow, ApiError> {
    store::workflows::get(&state.store.pool, auth.namespace(), id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no workflow `{id}`")))
}

fn created(w: &Workflow, status: StatusCode) -> Response {
    let mut res = (status, Json(w)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/workflows/{}", w.id)) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}

/// Steps that read `secrets` receive the values: only an admin key may write them (a `submit`
/// key could otherwise write a step that sends a secret anywhere).
fn require_admin_for_secrets(auth: &Auth, def: &WorkflowDef) -> Result<(), ApiError> {
    if def.references_secrets() && auth.require(Role::Admin).is_err() {
        return Err(ApiError::Forbidden(
            "a workflow whose steps read `secrets` can be written only with an admin key".into(),
        ));
    }
    Ok(())
}

#[utoipa::path(post, operation_id = "createWorkflow", path = "/v1/workflows", tag = "workflows", request_body(content = WorkflowDef,
        description = "JSON, or YAML with Content-Type: application/yaml"),
    responses((status = 201, body = Workflow), (status = 415, body = crate::error::Problem),
              (status = 422, description = "invalid definition; the error names the step", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let def = definition(&state, &auth, &headers, &body).await?;
    require_admin_for_secrets(&auth, &def)?;
    let id = Uuid::now_v7();
    let (w, append) = workflow_append(
        None,
        id,
        &[WorkflowEvent::WorkflowCreated { definition: def }],
        auth.metadata(),
        domain::now(),
    )
    .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("workflow state")))?;
    state
        .store
        .appender
        .append(append)
        .await
        .map_err(StoreError::from)?;
    Ok(created(&w, StatusCode::CREATED))
}

#[utoipa::path(put, operation_id = "updateWorkflow", path = "/v1/workflows/{id}", tag = "workflows", params(("id" = String, Path)),
    request_body = WorkflowDef,
    responses((status = 200, description = "a new version", body = Workflow), (status = 404, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn update(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let id = parse_id(&id)?;
    let def = definition(&state, &auth, &headers, &body).await?;
    require_admin_for_secrets(&auth, &def)?;
    let (w, ()) = command::execute::<Workflow, _, Infallible, _>(
        &state.store,
        auth.namespace(),
        id,
        &auth.metadata(),
        |_| {
            Ok((
                vec![WorkflowEvent::WorkflowUpdated {
                    definition: def.clone(),
                }],
                (),
            ))
        },
    )
    .await
    .map_err(|e| ApiError::from_command(e, "workflow", id))?;
    Ok(created(&w, StatusCode::OK))
}

#[utoipa::path(get, operation_id = "listWorkflows", path = "/v1/workflows", tag = "workflows",
    params(("limit" = Option<i64>, Query, minimum = 1, maximum = 500), ("cursor" = Option<String>, Query, pattern = "^[A-Za-z0-9_-]{21}[AQgw]$", description = "`next_cursor` of the previous page")),
    responses((status = 200, body = Page<Workflow>)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
    RawQuery(q): RawQuery,
) -> Result<Json<Page<Workflow>>, ApiError> {
    auth.require(Role::Read)?;
    let (mut before, mut limit) = (None, None);
    for (k, v) in query_pairs(q.as_deref())? {
        match k.as_str() {
            "limit" => limit = Some(v),
            "cursor" => before = Some(decode_cursor(&v)?),
            other => {
                return Err(ApiError::field(
                    other,
                    "unknown query parameter (limit, cursor)",
                ))
            }
        }
    }
    let limit = parse_limit(limit.as_deref())?;
    let items =
        store::workflows::list(&state.store.pool, auth.namespace(), before, limit + 1).await?;
    Ok(Json(Page::from_extra_row(items, limit, |w| w.id)))
}

#[utoipa::path(get, operation_id = "getWorkflow", path = "/v1/workflows/{id}", tag = "workflows", params(("id" = String, Path)),
    responses((status = 200, description = "the workflow with every version", body = Workflow),
              (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Workflow>, ApiError> {
    auth.require(Role::Read)?;
    Ok(Json(load(&state, &auth, parse_id(&id)?).await?))
}

#[utoipa::path(delete, operation_id = "deleteWorkflow", path = "/v1/workflows/{id}", tag = "workflows", params(("id" = String, Path)),
    responses((status = 204, description = "deleted; existing runs keep their version"),
              (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Submit)?;
    let id = parse_id(&id)?;
    command::execute::<Workflow, _, Infallible, _>(
        &state.store,
        auth.namespace(),
        id,
        &auth.metadata(),
        |_| Ok((vec![WorkflowEvent::WorkflowDeleted {}], ())),
    )
    .await
    .map_err(|e| ApiError::from_command(e, "workflow", id))?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/workflows/{id}/runs` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRunBody {
    /// The run's input (checked against the workflow's `input_schema`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub input: Option<Value>,
    /// POSTed a signed `run.succeeded` / `run.failed` / `run.canceled` when the run ends.
    #[serde(default)]
    pub callback_url: Option<String>,
}

#[utoipa::path(post, operation_id = "startWorkflowRun", path = "/v1/workflows/{id}/runs", tag = "workflows", params(("id" = String, Path),
        ("Prefer" = Option<String>, Header, description = "wait=N: wait up to N seconds for the run to end"),
        ("Idempotency-Key" = Option<String>, Header)),
    request_body = StartRunBody,
    responses((status = 200, description = "ended within the wait", body = capibara_shared::domain::run::Run),
              (status = 202, description = "started; see Location", body = capibara_shared::domain::run::Run),
              (status = 404, body = crate::error::Problem), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn start_run(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: ApiJson<StartRunBody>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    state.backlog.admit(1)?;
    let workflow_id = parse_id(&id)?;
    let wait = prefer_wait(&headers)?;
    let key = idempotency_key(&headers)?;
    // The same key for another workflow is a different request.
    let hash = format!("{workflow_id}:{}", body.hash);
    if let Some(key) = &key {
        if let Some(run) = super::runs::replay(&state, &auth, key, &hash).await? {
            return super::runs::finish(&state, &auth, run, wait, true).await;
        }
    }
    let b = body.value;
    let callback_url =
        crate::outbound::callback_url(b.callback_url.as_deref(), &state.config).await?;
    let input = b.input.unwrap_or_else(|| Value::Object(Default::default()));
    let size = serde_json::to_vec(&input).map(|v| v.len()).unwrap_or(0);
    if size > state.config.input_limit_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "input is {size} bytes; the limit is {} bytes",
            state.config.input_limit_bytes
        )));
    }
    let run_id = Uuid::now_v7();
    let command = key.as_ref().map(|key| CommandRecord {
        id: Uuid::now_v7(),
        namespace: auth.namespace().to_string(),
        command_type: super::runs::START_COMMAND.into(),
        idempotency_key: Some(key.clone()),
        request_hash: hash.clone(),
        status_code: 202,
        response: Some(serde_json::json!({"run_id": run_id})),
        stream_id: Some(run_id),
        actor: Some(auth.actor()),
        received_at: domain::now(),
    });
    let started = store::runs::start_run(
        &state.store,
        StartRun {
            namespace: auth.namespace().to_string(),
            workflow_id,
            input,
            callback_url,
            actor: auth.actor(),
            command,
            with: Vec::new(),
            run_id,
        },
    )
    .await;
    let run = match started {
        Err(StartError::Append(AppendError::DuplicateCommand)) => {
            let key = key.as_deref().unwrap_or_default();
            let run = super::runs::replay(&state, &auth, key, &hash)
                .await?
                .ok_or_else(|| ApiError::Conflict("idempotency key is in use".into()))?;
            return super::runs::finish(&state, &auth, run, wait, true).await;
        }
        other => started_run(other, workflow_id)?,
    };
    super::runs::finish(&state, &auth, run, wait, false).await
}

/// The run a start made, or its refusal as an API error.
fn started_run(
    started: Result<capibara_shared::domain::run::Run, StartError>,
    workflow_id: Uuid,
) -> Result<capibara_shared::domain::run::Run, ApiError> {
    match started {
        Ok(run) => Ok(run),
        Err(StartError::WorkflowNotFound) => {
            Err(ApiError::NotFound(format!("no workflow `{workflow_id}`")))
        }
        Err(StartError::Input(e)) => Err(e.into()),
        Err(StartError::Append(e)) => Err(StoreError::from(e).into()),
        Err(StartError::Store(e)) => Err(e.into()),
    }
}

/// Start a run of `workflow_id` with `input` for the caller, without an idempotency key (the
/// MCP server's workflow tools).
pub async fn start(
    state: &AppState,
    auth: &Auth,
    workflow_id: Uuid,
    input: Value,
) -> Result<capibara_shared::domain::run::Run, ApiError> {
    auth.require(Role::Submit)?;
    state.backlog.admit(1)?;
    let started = store::runs::start_run(
        &state.store,
        StartRun {
            namespace: auth.namespace().to_string(),
            workflow_id,
            input,
            callback_url: None,
            actor: auth.actor(),
            command: None,
            with: Vec::new(),
            run_id: Uuid::now_v7(),
        },
    )
    .await;
    started_run(started, workflow_id)
}
