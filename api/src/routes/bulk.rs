//! `/v1/jobs/bulk`: cancel or retry every job a filter matches, as an operation that runs in the
//! scheduler (docs/flow-control.md "Bulk actions"). The request only records `BulkStarted`; its
//! place in the log pins which jobs are considered.

use axum::{
    extract::{Path, State},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use capibara_shared::{
    domain::{
        self,
        auth::Role,
        bulk::{BulkAction, BulkEvent, BulkOperation, BulkStatus},
        job::JobStatus,
    },
    store::{self, bulk::bulk_append, jobs::JobFilter, StoreError},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::{auth::Auth, error::ApiError, extract::ApiJson, AppState};

/// `POST /v1/jobs/bulk` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    /// `cancel` (as `POST /v1/jobs/{id}/cancel`), `retry` (as `POST /v1/jobs/{id}/retry`) or
    /// `delete` (as `DELETE /v1/jobs/{id}`: finished jobs outside workflow runs).
    #[schema(value_type = BulkAction)]
    pub action: String,
    /// Which jobs: the filters of `GET /v1/jobs`. An empty filter is refused unless `all` is
    /// true.
    #[serde(default)]
    pub filter: BulkFilter,
    /// Act on every job of the namespace when the filter is empty (a guard against an
    /// accidental mass cancel).
    #[serde(default)]
    pub all: bool,
}

/// The jobs a bulk action considers: the filters of `GET /v1/jobs`, all of which must hold.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<JobStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Tags the job carries, each `key:value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Vec<String>>,
    /// JSON the job's input contains (`{"customer": {"id": 42}}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub input: Option<Value>,
    /// JSON the job's output contains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub output: Option<Value>,
    /// `created_at` in [after, before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_after: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_before: Option<DateTime<Utc>>,
    /// `finished_at` in [after, before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_after: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_before: Option<DateTime<Utc>>,
    /// The error's `type` (`timeout`, `expired`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    /// The worker id of the last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

/// A bulk operation and how far it got.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Operation {
    pub id: Uuid,
    pub action: BulkAction,
    #[schema(value_type = Object)]
    pub filter: Value,
    pub all: bool,
    pub status: BulkStatus,
    /// The global log position of the operation's `BulkStarted` (its id in `/v1/events`): only
    /// jobs submitted before it in the log are considered.
    pub position: i64,
    /// Jobs that matched when the operation began (`null` until its first page).
    pub matched: Option<i64>,
    /// Jobs acted on.
    pub done: i64,
    /// Jobs that matched but no longer qualified for the action (a finished job for `cancel`,
    /// one that did not fail for `retry`, an unfinished job or a run's step for `delete`).
    pub skipped: i64,
    /// Why it failed (`status: failed`).
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl Operation {
    fn of(op: BulkOperation, position: i64) -> Operation {
        Operation {
            id: op.id,
            action: op.action,
            filter: op.filter,
            all: op.all_jobs,
            status: op.status,
            position,
            matched: op.matched,
            done: op.done,
            skipped: op.skipped,
            error: op.error,
            created_at: op.created_at,
            finished_at: op.finished_at,
        }
    }
}

/// Cancel, retry or delete every job of the key's namespace that `filter` matches. The operation runs in
/// the background (`GET /v1/jobs/bulk/{id}` shows its progress); each job's events name it as
/// their causation.
#[utoipa::path(post, operation_id = "startBulkAction", path = "/v1/jobs/bulk", tag = "jobs", request_body = BulkRequest,
    responses((status = 202, description = "started; see Location", body = Operation),
              (status = 403, body = crate::error::Problem),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn start(
    State(state): State<AppState>,
    auth: Auth,
    body: ApiJson<BulkRequest>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let req = body.value;
    let action: BulkAction = req
        .action
        .parse()
        .map_err(|m: String| ApiError::field("action", m))?;
    let filter = serde_json::to_value(&req.filter).map_err(ApiError::internal)?;
    // The scheduler parses the stored filter the same way: what is accepted here runs there.
    if JobFilter::from_json(&filter)?.is_empty() && !req.all {
        return Err(ApiError::field(
            "filter",
            "is empty, which matches every job of the namespace: give a filter, or \
             `\"all\": true` to act on every job",
        ));
    }
    let id = Uuid::now_v7();
    let started = BulkEvent::BulkStarted {
        action,
        filter,
        all: req.all,
    };
    let (op, append) = bulk_append(None, id, &[started], auth.metadata(), domain::now())
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("BulkStarted does not apply")))?;
    let appended = state
        .store
        .appender
        .append(append)
        .await
        .map_err(StoreError::from)?;
    let position = appended.positions.first().copied().unwrap_or_default();
    let location = HeaderValue::from_str(&format!("/v1/jobs/bulk/{id}")).expect("ascii");
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(Operation::of(op, position)),
    )
        .into_response())
}

#[utoipa::path(get, operation_id = "getBulkAction", path = "/v1/jobs/bulk/{id}", tag = "jobs",
    params(("id" = String, Path)),
    responses((status = 200, body = Operation), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<Operation>, ApiError> {
    auth.require(Role::Read)?;
    let id = crate::extract::path_id(&id, "bulk operation")?;
    let (op, position) = store::bulk::get(&state.store.pool, Some(auth.namespace()), id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no bulk operation `{id}`")))?;
    Ok(Json(Operation::of(op, position)))
}
