//! `/v1/schedules`: cron schedules that submit jobs (or, later, start workflow runs).

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use std::convert::Infallible;

use capibara_shared::{
    command::{
        self,
        ticks::{self, FireError, TickError},
    },
    domain::{
        self,
        auth::Role,
        schedule::{
            CatchUp, CronSpec, Overlap, Schedule, ScheduleEvent, ScheduleSpec, ScheduleTarget,
        },
        storable,
    },
    store::{self, schedules::schedule_append, AppendError, StoreError},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    auth::Auth,
    error::ApiError,
    extract::ApiJson,
    routes::jobs::{nest, to_submission, Page, SubmitJob},
    AppState,
};

/// Where a tick goes (contract shape).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TargetBody {
    /// Submit this job.
    Job { job: Box<SubmitJob> },
    /// Start a run of a workflow (its latest version) with this input.
    Workflow {
        workflow_id: String,
        #[serde(default)]
        #[schema(value_type = Object)]
        input: Option<serde_json::Value>,
    },
}

/// `POST /v1/schedules` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSchedule {
    pub name: String,
    /// A crontab expression (docs/scheduler.md, "Cron dialect"): 5 fields (day of week 0-7, 0 and
    /// 7 Sunday), 6 with seconds first, or an alias such as `@daily`.
    pub cron: String,
    /// IANA timezone (default `UTC`).
    #[serde(default)]
    pub timezone: Option<String>,
    pub target: TargetBody,
    /// Default `skip`.
    #[serde(default)]
    pub overlap: Option<Overlap>,
    /// Default `latest`.
    #[serde(default)]
    pub catch_up: Option<CatchUp>,
    /// With `catch_up: all`: how far back missed ticks are fired (default 3600 s).
    #[serde(default)]
    pub catch_up_window_s: Option<i64>,
    /// Delay each tick by up to this many seconds (default 0).
    #[serde(default)]
    pub jitter_s: Option<i64>,
    /// No tick before this time (RFC 3339, years 0001-9999).
    #[serde(default, deserialize_with = "storable::serde_time::optional")]
    pub start_at: Option<DateTime<Utc>>,
    /// No tick after this time (RFC 3339, years 0001-9999).
    #[serde(default, deserialize_with = "storable::serde_time::optional")]
    pub end_at: Option<DateTime<Utc>>,
}

/// `PATCH /v1/schedules/{id}` body: any subset of the fields of a schedule.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSchedule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub cron: Option<String>,
    #[serde(default)]
    pub timezone: Option<String>,
    #[serde(default)]
    pub target: Option<TargetBody>,
    #[serde(default)]
    pub overlap: Option<Overlap>,
    #[serde(default)]
    pub catch_up: Option<CatchUp>,
    #[serde(default)]
    pub catch_up_window_s: Option<i64>,
    #[serde(default)]
    pub jitter_s: Option<i64>,
    /// No tick before this time (RFC 3339, years 0001-9999).
    #[serde(default, deserialize_with = "storable::serde_time::optional")]
    pub start_at: Option<DateTime<Utc>>,
    /// No tick after this time (RFC 3339, years 0001-9999).
    #[serde(default, deserialize_with = "storable::serde_time::optional")]
    pub end_at: Option<DateTime<Utc>>,
}

/// A schedule with its next fire times.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ScheduleView {
    #[serde(flatten)]
    pub schedule: Schedule,
    pub next_fire_times: Vec<DateTime<Utc>>,
}

impl From<Schedule> for ScheduleView {
    fn from(s: Schedule) -> Self {
        let next_fire_times = s.upcoming(5);
        ScheduleView {
            schedule: s,
            next_fire_times,
        }
    }
}

/// `POST /v1/schedules/{id}/backfill` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Backfill {
    #[serde(deserialize_with = "storable::serde_time::required")]
    pub from: DateTime<Utc>,
    #[serde(deserialize_with = "storable::serde_time::required")]
    pub to: DateTime<Utc>,
}

/// Most ticks one backfill may fire.
const MAX_BACKFILL: usize = 1000;

pub async fn target(
    t: TargetBody,
    state: &AppState,
    auth: &Auth,
) -> Result<ScheduleTarget, ApiError> {
    match t {
        TargetBody::Job { job } if job.expires_at.is_some() => Err(ApiError::field(
            "target.job.expires_at",
            "a schedule fires many times: give `ttl_s`, counted from each fire",
        )),
        TargetBody::Job { job } => Ok(ScheduleTarget::Job {
            job: to_submission(*job, state, auth.namespace())
                .await
                .map_err(|e| nest(e, "target.job"))?,
        }),
        TargetBody::Workflow { workflow_id, input } => {
            let id: Uuid = workflow_id.parse().map_err(|_| {
                ApiError::field("target.workflow_id", "must be a workflow id (UUID)")
            })?;
            if store::workflows::get(&state.store.pool, auth.namespace(), id)
                .await?
                .is_none()
            {
                return Err(ApiError::field(
                    "target.workflow_id",
                    format!("no workflow `{id}`"),
                ));
            }
            let input = input.unwrap_or_else(|| serde_json::json!({}));
            if !input.is_object() {
                return Err(ApiError::field("target.input", "must be a JSON object"));
            }
            Ok(ScheduleTarget::Workflow {
                workflow_id: id,
                input,
            })
        }
    }
}

fn check_spec(s: &ScheduleSpec) -> Result<(), ApiError> {
    if s.name.trim().is_empty() || s.name.chars().count() > 200 {
        return Err(ApiError::field("name", "must be 1-200 characters"));
    }
    CronSpec::parse(&s.cron, &s.timezone).map_err(|(field, m)| ApiError::field(field, m))?;
    if !(0..=7 * 86_400).contains(&s.catch_up_window_s) {
        return Err(ApiError::field(
            "catch_up_window_s",
            "must be between 0 and 604800",
        ));
    }
    if !(0..=3600).contains(&s.jitter_s) {
        return Err(ApiError::field("jitter_s", "must be between 0 and 3600"));
    }
    if let (Some(a), Some(b)) = (s.start_at, s.end_at) {
        if b <= a {
            return Err(ApiError::field("end_at", "must be after start_at"));
        }
    }
    Ok(())
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    crate::extract::path_id(id, "schedule")
}

async fn load(state: &AppState, auth: &Auth, id: &str) -> Result<Schedule, ApiError> {
    let id = parse_id(id)?;
    store::schedules::get(&state.store.pool, auth.namespace(), id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no schedule `{id}`")))
}

/// Append schedule events (and jobs) atomically; a concurrent change is a 409.
async fn write(
    state: &AppState,
    auth: &Auth,
    prev: Option<&Schedule>,
    id: Uuid,
    events: &[ScheduleEvent],
    jobs: Vec<store::Append>,
) -> Result<Schedule, ApiError> {
    let (new, a) = schedule_append(
        prev,
        id,
        auth.namespace(),
        events,
        auth.metadata(),
        domain::now(),
    )
    .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("schedule state")))?;
    let mut all = vec![a];
    all.extend(jobs);
    match state.store.appender.append_all(all).await {
        Ok(_) => Ok(new),
        Err(AppendError::Conflict { .. }) => Err(ApiError::Conflict(
            "the schedule changed concurrently; retry".into(),
        )),
        Err(e) => Err(StoreError::from(e).into()),
    }
}

#[utoipa::path(post, operation_id = "createSchedule", path = "/v1/schedules", tag = "schedules", request_body = CreateSchedule,
    responses((status = 201, body = ScheduleView), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    body: ApiJson<CreateSchedule>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let b = body.value;
    let spec = ScheduleSpec {
        name: b.name,
        cron: b.cron,
        timezone: b.timezone.unwrap_or_else(|| "UTC".into()),
        target: target(b.target, &state, &auth).await?,
        overlap: b.overlap.unwrap_or(Overlap::Skip),
        catch_up: b.catch_up.unwrap_or(CatchUp::Latest),
        catch_up_window_s: b.catch_up_window_s.unwrap_or(3600),
        jitter_s: b.jitter_s.unwrap_or(0),
        start_at: b.start_at,
        end_at: b.end_at,
    };
    check_spec(&spec)?;
    let s = write(
        &state,
        &auth,
        None,
        Uuid::now_v7(),
        &[ScheduleEvent::ScheduleCreated(spec)],
        vec![],
    )
    .await?;
    Ok((StatusCode::CREATED, Json(ScheduleView::from(s))).into_response())
}

#[utoipa::path(get, operation_id = "listSchedules", path = "/v1/schedules", tag = "schedules",
    responses((status = 200, body = Page<ScheduleView>)), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
) -> Result<Json<Page<ScheduleView>>, ApiError> {
    auth.require(Role::Read)?;
    let items = store::schedules::list(&state.store.pool, auth.namespace())
        .await?
        .into_iter()
        .map(ScheduleView::from)
        .collect();
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[utoipa::path(get, operation_id = "getSchedule", path = "/v1/schedules/{id}", tag = "schedules", params(("id" = String, Path)),
    responses((status = 200, body = ScheduleView), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    auth.require(Role::Read)?;
    Ok(Json(load(&state, &auth, &id).await?.into()))
}

#[utoipa::path(patch, operation_id = "updateSchedule", path = "/v1/schedules/{id}", tag = "schedules", params(("id" = String, Path)),
    request_body = UpdateSchedule, responses((status = 200, body = ScheduleView), (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn update(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: ApiJson<UpdateSchedule>,
) -> Result<Json<ScheduleView>, ApiError> {
    auth.require(Role::Submit)?;
    let id = parse_id(&id)?;
    let mut b = body.value;
    // A new target (its workflow looked up) is resolved once, outside the command's retries.
    let new_target = match b.target.take() {
        Some(t) => Some(target(t, &state, &auth).await?),
        None => None,
    };
    // The patch applies to the schedule as it is when the update commits.
    let (s, ()) = command::execute::<Schedule, _, ApiError, _>(
        &state.store,
        auth.namespace(),
        id,
        &auth.metadata(),
        |s| {
            let target = match &new_target {
                Some(t) => t.clone(),
                None => serde_json::from_value(s.target.clone()).map_err(ApiError::internal)?,
            };
            let spec = ScheduleSpec {
                name: b.name.clone().unwrap_or_else(|| s.name.clone()),
                cron: b.cron.clone().unwrap_or_else(|| s.cron.clone()),
                timezone: b.timezone.clone().unwrap_or_else(|| s.timezone.clone()),
                target,
                overlap: b.overlap.unwrap_or(s.overlap),
                catch_up: b.catch_up.unwrap_or(s.catch_up),
                catch_up_window_s: b.catch_up_window_s.unwrap_or(s.catch_up_window_s),
                jitter_s: b.jitter_s.unwrap_or(s.jitter_s),
                start_at: b.start_at.or(s.start_at),
                end_at: b.end_at.or(s.end_at),
            };
            check_spec(&spec)?;
            Ok((vec![ScheduleEvent::ScheduleUpdated(spec)], ()))
        },
    )
    .await
    .map_err(|e| ApiError::from_command(e, "schedule", id))?;
    Ok(Json(s.into()))
}

async fn simple(
    state: &AppState,
    auth: &Auth,
    id: &str,
    ev: ScheduleEvent,
) -> Result<Json<ScheduleView>, ApiError> {
    auth.require(Role::Submit)?;
    let id = parse_id(id)?;
    let (s, ()) = command::execute::<Schedule, _, Infallible, _>(
        &state.store,
        auth.namespace(),
        id,
        &auth.metadata(),
        |_| Ok((vec![ev.clone()], ())),
    )
    .await
    .map_err(|e| ApiError::from_command(e, "schedule", id))?;
    Ok(Json(s.into()))
}

#[utoipa::path(post, operation_id = "pauseSchedule", path = "/v1/schedules/{id}/pause", tag = "schedules", params(("id" = String, Path)),
    responses((status = 200, body = ScheduleView)), security(("bearer" = [])))]
pub async fn pause(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    simple(&state, &auth, &id, ScheduleEvent::SchedulePaused {}).await
}

#[utoipa::path(post, operation_id = "resumeSchedule", path = "/v1/schedules/{id}/resume", tag = "schedules", params(("id" = String, Path)),
    responses((status = 200, description = "ticks continue from now (missed ones are not fired)", body = ScheduleView)),
    security(("bearer" = [])))]
pub async fn resume(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    simple(&state, &auth, &id, ScheduleEvent::ScheduleResumed {}).await
}

#[utoipa::path(delete, operation_id = "deleteSchedule", path = "/v1/schedules/{id}", tag = "schedules", params(("id" = String, Path)),
    responses((status = 204, description = "deleted (its history stays in the log)")), security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let _deleted = simple(&state, &auth, &id, ScheduleEvent::ScheduleDeleted {}).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, operation_id = "triggerSchedule", path = "/v1/schedules/{id}/trigger", tag = "schedules", params(("id" = String, Path)),
    responses((status = 202, description = "fired now; `last_job_id` is the job", body = ScheduleView)),
    security(("bearer" = [])))]
pub async fn trigger(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    state.backlog.admit(1)?;
    let id = parse_id(&id)?;
    let s = ticks::fire_now(&state.store, auth.namespace(), id, &auth.actor())
        .await
        .map_err(|e| ApiError::from_command(e, "schedule", id))?;
    Ok((StatusCode::ACCEPTED, Json(ScheduleView::from(s))).into_response())
}

/// A tick that could not be fired on request.
impl From<TickError> for ApiError {
    fn from(e: TickError) -> Self {
        match e {
            TickError::Fire(e @ FireError::WorkflowGone) => ApiError::Conflict(e.to_string()),
            TickError::Fire(FireError::Input(e)) => e.under("target").into(),
            TickError::Fire(FireError::Store(e)) => e.into(),
            TickError::Fire(e @ FireError::Unreadable) => ApiError::internal(e),
            e @ TickError::TooMany(_) => ApiError::field("to", e.to_string()),
        }
    }
}

#[utoipa::path(post, operation_id = "backfillSchedule", path = "/v1/schedules/{id}/backfill", tag = "schedules", params(("id" = String, Path)),
    request_body = Backfill,
    responses((status = 202, description = "every tick in [from, to] not fired yet is fired now", body = ScheduleView),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn backfill(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    body: ApiJson<Backfill>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let b = body.value;
    if b.to < b.from {
        return Err(ApiError::field("to", "must not be before from"));
    }
    let id = parse_id(&id)?;
    let s = ticks::backfill(
        &state.store,
        auth.namespace(),
        id,
        (b.from, b.to),
        MAX_BACKFILL,
        &auth.actor(),
    )
    .await
    .map_err(|e| ApiError::from_command(e, "schedule", id))?;
    Ok((StatusCode::ACCEPTED, Json(ScheduleView::from(s))).into_response())
}
