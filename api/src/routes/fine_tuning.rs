//! The fine-tuning seed endpoints (docs/models.md): `POST /v1/fine-tuning/start` takes the
//! seed's body and starts a `finetune.train` job; `GET /v1/fine-tuning/{id}/status` tells how
//! it goes.

use axum::{
    extract::{Path, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use capibara_shared::{
    domain::{
        auth::Role,
        job::{Job, JobError, JobStatus},
        kinds::model::BASE_MODELS,
        FieldError,
    },
    store,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::{
    auth::Auth,
    error::ApiError,
    extract::{idempotency_key, ApiJson},
    routes::jobs::{create, SubmitJob},
    AppState,
};

/// One training row of the seed's body: `input` is the text, `output` its label.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingRow {
    /// Put before the input (with a new line) when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, max_length = 1000)]
    pub instruction: Option<String>,
    #[schema(min_length = 1, max_length = 9000, pattern = "\\S")]
    pub input: String,
    /// The label.
    #[schema(min_length = 1, max_length = 100, pattern = "\\S")]
    pub output: String,
}

/// The training settings the seed sends (all optional; `finetune.train`'s defaults otherwise).
#[derive(Debug, Clone, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FineTuningConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1000)]
    pub epochs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, exclusive_minimum = 0.0, maximum = 10.0)]
    pub learning_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 1, maximum = 1024)]
    pub batch_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 8, maximum = 256)]
    pub max_length: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 0.0, maximum = 0.5)]
    pub validation_split: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, minimum = 0)]
    pub seed: Option<u64>,
}

/// `POST /v1/fine-tuning/start` body (the fine-tuning seed's shape).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FineTuningStart {
    /// The model to start from: `all-minilm-l6-v2` (another is a 422 listing the available
    /// ones).
    #[schema(pattern = "^all-minilm-l6-v2$")]
    pub base_model: String,
    /// The name the trained model is registered under (`target_model@N`, `GET /v1/models`).
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    pub target_model: String,
    /// 4-50,000 rows, at least two labels (`output`), each at least twice.
    #[schema(min_items = 4, max_items = 50000)]
    pub training_data: Vec<TrainingRow>,
    /// `text_classification` (the default; the only task in this build).
    #[serde(default)]
    #[schema(nullable = false, pattern = "^text_classification$")]
    pub task_type: Option<String>,
    #[serde(default)]
    #[schema(nullable = false)]
    pub fine_tuning_config: Option<FineTuningConfig>,
}

/// How a fine-tuning goes: `POST /v1/fine-tuning/start`'s answer and
/// `GET /v1/fine-tuning/{id}/status`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FineTuningStatus {
    /// The `finetune.train` job's id.
    pub id: Uuid,
    pub status: JobStatus,
    pub target_model: String,
    /// The registered model (`target_model@N`) once it succeeded.
    pub model: Option<String>,
    /// The last progress report (step, loss, accuracy, examples/s, ETA, …).
    #[schema(value_type = Option<Object>)]
    pub progress: Option<Value>,
    /// The final metrics once it succeeded.
    #[schema(value_type = Option<Object>)]
    pub metrics: Option<Value>,
    pub error: Option<JobError>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl FineTuningStatus {
    fn of(job: &Job) -> FineTuningStatus {
        let output = job.output.as_ref();
        FineTuningStatus {
            id: job.id,
            status: job.status,
            target_model: job.input["name"].as_str().unwrap_or_default().to_string(),
            model: output.and_then(|o| o["model"].as_str()).map(str::to_string),
            progress: job.progress.clone(),
            metrics: output.map(|o| o["metrics"].clone()),
            error: job.error.clone(),
            created_at: job.created_at,
            finished_at: job.finished_at,
        }
    }
}

/// The seed's names for `finetune.train`'s fields.
fn seed_field(field: &str) -> String {
    let field = field.strip_prefix("input.").unwrap_or(field);
    if field == "name" {
        return "target_model".into();
    }
    if let Some(rest) = field.strip_prefix("examples") {
        return format!(
            "training_data{}",
            rest.replace(".text", ".input").replace(".label", ".output")
        );
    }
    if field == "base_model" {
        return field.into();
    }
    format!("fine_tuning_config.{field}")
}

#[utoipa::path(post, operation_id = "startFineTuning", path = "/v1/fine-tuning/start", tag = "models",
    request_body = FineTuningStart,
    params(("Idempotency-Key" = Option<String>, Header, description = "replays return the same job")),
    responses((status = 202, description = "started; poll `Location`", body = FineTuningStatus),
              (status = 422, description = "a bad row or setting, or a base model that is not available (the problem lists the available ones)", body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn start(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    body: ApiJson<FineTuningStart>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let key = idempotency_key(&headers)?;
    let req = body.value;
    if !BASE_MODELS.contains(&req.base_model.as_str()) {
        return Err(ApiError::field(
            "base_model",
            format!(
                "`{}` is not available; available: {}",
                req.base_model,
                BASE_MODELS.join(", ")
            ),
        ));
    }
    if let Some(t) = req
        .task_type
        .as_deref()
        .filter(|t| *t != "text_classification")
    {
        return Err(ApiError::field(
            "task_type",
            format!("`{t}` is not available; available: text_classification"),
        ));
    }
    let examples: Vec<Value> = req
        .training_data
        .iter()
        .map(|r| {
            let text = match &r.instruction {
                Some(i) if !i.trim().is_empty() => format!("{i}\n{}", r.input),
                _ => r.input.clone(),
            };
            json!({"text": text, "label": r.output})
        })
        .collect();
    let mut input = serde_json::to_value(req.fine_tuning_config.unwrap_or_default())
        .expect("the config serializes");
    input["name"] = json!(req.target_model);
    input["base_model"] = json!(req.base_model);
    input["examples"] = json!(examples);
    let (job, _) = create(
        &state,
        &auth,
        SubmitJob::of("finetune.train", input),
        key,
        &body.hash,
        "StartFineTuning",
    )
    .await
    .map_err(|e| e.map_fields(|f| FieldError::new(seed_field(&f.field), f.message)))?;
    let location = format!("/v1/fine-tuning/{}/status", job.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(FineTuningStatus::of(&job)),
    )
        .into_response())
}

#[utoipa::path(get, operation_id = "getFineTuningStatus", path = "/v1/fine-tuning/{id}/status", tag = "models",
    params(("id" = String, Path, description = "the id `start` answered (a `finetune.train` job's), or a `finetune.command` job's")),
    responses((status = 200, body = FineTuningStatus), (status = 404, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn status(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<FineTuningStatus>, ApiError> {
    auth.require(Role::Read)?;
    let not_found = || ApiError::NotFound(format!("no fine-tuning `{id}`"));
    let job_id: Uuid = id.parse().map_err(|_| not_found())?;
    let job = store::jobs::get(&state.store.pool, auth.namespace(), job_id)
        .await?
        .filter(|j| matches!(j.kind.as_str(), "finetune.train" | "finetune.command"))
        .ok_or_else(not_found)?;
    Ok(Json(FineTuningStatus::of(&job)))
}
