//! `/v1/kinds`: the built-in kinds and the namespace's own (docs/workers.md).

use std::collections::HashMap;

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::IntoResponse,
    Json,
};
use capibara_shared::{
    command::{
        self,
        kinds::{KindError, Put},
    },
    domain::{
        auth::Role,
        job::Priority,
        kinds::{
            self,
            user::{self, KindDef, Mode, UserKind},
            KindSpec,
        },
    },
    store,
};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::{auth::Auth, error::ApiError, extract::ApiJson, routes::jobs::Page, AppState};

/// A job kind: built-in, or registered in the caller's namespace.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KindInfo {
    pub name: String,
    /// Built into `capibara-worker` (false: registered in this namespace).
    pub builtin: bool,
    /// Queue of its jobs when a submission names none.
    pub default_queue: String,
    pub description: String,
    /// The JSON Schema of the kind's `input` here (the one submissions are checked against,
    /// with this deployment's voices); `{}` for a user kind without one.
    #[schema(value_type = Object)]
    pub input_schema: serde_json::Value,
    /// The JSON Schema of a successful job's `output`, where it is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub output_schema: Option<serde_json::Value>,
    /// `pull` for user kinds (their workers lease jobs); absent for built-in kinds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// User kinds: defaults applied where a submission gives none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// User kinds and built-in kinds run by external programs (`finetune.command`):
    /// registered workers that declared it and were seen recently (0: nothing would run its
    /// jobs now).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_workers: Option<i64>,
    /// User kinds: the version of its stream (one per change).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
    /// `POST /v1/orchestrate` only dry-runs it unless the request says `confirm_dangerous`
    /// (its definition says `dangerous: true`, or its name is in
    /// `CAPIBARA_ORCHESTRATE_DANGEROUS`).
    pub dangerous: bool,
}

impl KindInfo {
    /// Built-in kind `k`; `live` counts the workers of the protocol per declared kind.
    fn builtin(k: &KindSpec, state: &AppState, live: &HashMap<String, i64>) -> KindInfo {
        KindInfo {
            name: k.name.to_string(),
            builtin: true,
            default_queue: k.default_queue.to_string(),
            description: k.description.to_string(),
            input_schema: k.input_schema(state.config.as_ref()),
            output_schema: k.output_schema(),
            mode: None,
            timeout_s: None,
            max_attempts: None,
            priority: None,
            live_workers: k.external.then(|| live.get(k.name).copied().unwrap_or(0)),
            version: None,
            updated_at: None,
            dangerous: state.config.orchestrate_dangerous.matches(k.name),
        }
    }

    fn user(k: UserKind, live: i64, state: &AppState) -> KindInfo {
        let d = k.definition;
        KindInfo {
            dangerous: d.dangerous || state.config.orchestrate_dangerous.matches(&k.name),
            default_queue: d.queue().to_string(),
            name: k.name,
            builtin: false,
            description: d.description,
            input_schema: d.input_schema.unwrap_or_else(|| serde_json::json!({})),
            output_schema: d.output_schema,
            mode: Some(d.mode),
            timeout_s: d.timeout_s,
            max_attempts: d.max_attempts,
            priority: d.priority,
            live_workers: Some(live),
            version: Some(k.version),
            updated_at: Some(k.updated_at),
        }
    }
}

/// Since when a worker counts as live ([`store::user_kinds::live_since`]).
pub fn live_since(state: &AppState) -> DateTime<Utc> {
    store::user_kinds::live_since(state.config.visibility_timeout)
}

async fn live_workers(state: &AppState, namespace: &str) -> Result<HashMap<String, i64>, ApiError> {
    Ok(store::user_kinds::live_workers(&state.store.pool, namespace, live_since(state)).await?)
}

#[utoipa::path(get, operation_id = "listKinds", path = "/v1/kinds", tag = "kinds",
    responses((status = 200, body = Page<KindInfo>)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Page<KindInfo>>, ApiError> {
    auth.require(Role::Read)?;
    Ok(Json(Page {
        items: visible(&state, auth.namespace()).await?,
        next_cursor: None,
    }))
}

/// The kinds a namespace sees: the public built-in ones, then its registered ones (what
/// `GET /v1/kinds` lists and the MCP server offers as tools).
pub async fn visible(state: &AppState, namespace: &str) -> Result<Vec<KindInfo>, ApiError> {
    let live = live_workers(state, namespace).await?;
    let mut items: Vec<KindInfo> = kinds::KINDS
        .iter()
        .filter(|k| !k.internal)
        .map(|k| KindInfo::builtin(k, state, &live))
        .collect();
    for k in store::user_kinds::list(&state.store.pool, namespace).await? {
        let n = live.get(&k.name).copied().unwrap_or(0);
        items.push(KindInfo::user(k, n, state));
    }
    Ok(items)
}

#[utoipa::path(get, operation_id = "getKind", path = "/v1/kinds/{name}", tag = "kinds",
    params(("name" = String, Path)),
    responses((status = 200, body = KindInfo), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<Json<KindInfo>, ApiError> {
    auth.require(Role::Read)?;
    if let Some(k) = kinds::find_public(&name) {
        let live = live_workers(&state, auth.namespace()).await?;
        return Ok(Json(KindInfo::builtin(k, &state, &live)));
    }
    let found = store::user_kinds::find(&state.store.pool, auth.namespace(), &[name.as_str()])
        .await?
        .pop()
        .ok_or_else(|| ApiError::NotFound(format!("no kind `{name}`")))?;
    let live = live_workers(&state, auth.namespace()).await?;
    let n = live.get(&found.name).copied().unwrap_or(0);
    Ok(Json(KindInfo::user(found, n, &state)))
}

/// Register or replace a kind's definition (the one use-case of `PUT` and of a worker that
/// declares a kind with its definition).
/// A push kind's endpoint can be called from here: calls are signed, and the URL passes the
/// outbound policy.
pub async fn check_push(state: &AppState, definition: &KindDef) -> Result<(), ApiError> {
    if let Some(push) = &definition.push {
        if state.config.webhook_secret.is_none() {
            return Err(ApiError::field(
                "push.url",
                "push calls are signed with CAPIBARA_WEBHOOK_SECRET, which this server does not have",
            ));
        }
        crate::outbound::check_url("push.url", &push.url, &state.config).await?;
    }
    Ok(())
}

pub async fn put_definition(
    state: &AppState,
    auth: &Auth,
    name: &str,
    definition: KindDef,
) -> Result<(UserKind, Put), ApiError> {
    user::validate_name(name)?;
    definition.validate()?;
    check_push(state, &definition).await?;
    let meta = auth.metadata();
    let put = command::kinds::put(&state.store, &meta, name, definition)
        .await
        .map_err(|e| ApiError::from_command(e, "kind", uuid::Uuid::nil()))?;
    state.user_kinds.forget(auth.namespace(), name);
    Ok(put)
}

#[utoipa::path(put, operation_id = "putKind", path = "/v1/kinds/{name}", tag = "kinds",
    params(("name" = String, Path)), request_body = KindDef,
    responses((status = 201, description = "registered", body = KindInfo),
              (status = 200, description = "replaced (or unchanged)", body = KindInfo),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn put(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
    body: ApiJson<KindDef>,
) -> Result<impl IntoResponse, ApiError> {
    auth.require(Role::Submit)?;
    let (kind, put) = put_definition(&state, &auth, &name, body.value).await?;
    let live = live_workers(&state, auth.namespace()).await?;
    let n = live.get(&kind.name).copied().unwrap_or(0);
    let status = match put {
        Put::Created => StatusCode::CREATED,
        Put::Updated | Put::Unchanged => StatusCode::OK,
    };
    Ok((status, Json(KindInfo::user(kind, n, &state))))
}

#[utoipa::path(delete, operation_id = "deleteKind", path = "/v1/kinds/{name}", tag = "kinds",
    params(("name" = String, Path)),
    responses((status = 204, description = "deleted"), (status = 404, body = crate::error::Problem),
              (status = 409, description = "a built-in kind", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    auth.require(Role::Submit)?;
    if kinds::find(&name).is_some() {
        return Err(ApiError::Conflict(format!(
            "`{name}` is a built-in kind; it cannot be deleted"
        )));
    }
    let meta = auth.metadata();
    command::kinds::delete(&state.store, &meta, &name)
        .await
        .map_err(|e| ApiError::from_command(e, "kind", uuid::Uuid::nil()))?;
    state.user_kinds.forget(auth.namespace(), &name);
    Ok(StatusCode::NO_CONTENT)
}

impl From<KindError> for ApiError {
    fn from(e: KindError) -> Self {
        match e {
            KindError::NotFound(_) => ApiError::NotFound(e.to_string()),
        }
    }
}

/// User kinds this API process read, for [`KIND_TTL`]: what a worker's `complete` checks its
/// output against. A PUT or DELETE here evicts at once; another process's within [`KIND_TTL`].
#[derive(Clone, Default)]
pub struct KnownKinds {
    #[allow(clippy::type_complexity)]
    entries: std::sync::Arc<
        std::sync::Mutex<
            HashMap<(String, String), (Option<std::sync::Arc<UserKind>>, std::time::Instant)>,
        >,
    >,
}

/// How long a read user kind is remembered.
const KIND_TTL: std::time::Duration = std::time::Duration::from_secs(1);

impl KnownKinds {
    /// The live user kind `name` of `namespace`.
    pub async fn get(
        &self,
        state: &AppState,
        namespace: &str,
        name: &str,
    ) -> Result<Option<std::sync::Arc<UserKind>>, ApiError> {
        let key = (namespace.to_string(), name.to_string());
        if let Some((k, at)) = self.entries.lock().expect("kinds").get(&key) {
            if at.elapsed() < KIND_TTL {
                return Ok(k.clone());
            }
        }
        let found = store::user_kinds::find(&state.store.pool, namespace, &[name])
            .await?
            .pop()
            .map(std::sync::Arc::new);
        self.entries
            .lock()
            .expect("kinds")
            .insert(key, (found.clone(), std::time::Instant::now()));
        Ok(found)
    }

    pub(crate) fn forget(&self, namespace: &str, name: &str) {
        self.entries
            .lock()
            .expect("kinds")
            .remove(&(namespace.to_string(), name.to_string()));
    }
}
