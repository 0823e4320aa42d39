//! External trainers (docs/models.md, "External trainers"): a program of the worker protocol
//! that declared `finetune.command` completes its job with the model file it uploaded. The
//! file's safetensors header is read here and checked as one `model.classify` can serve,
//! before the success and the model's registration are recorded together
//! ([`Report::Trained`]).

use capibara_shared::{
    artifacts::ArtifactError,
    command::leases::Trained,
    domain::{
        job::Artifact,
        kinds::{input, model::TrainerResult},
        model::{check_model_header, MAX_MODEL_HEADER},
    },
};
use serde_json::Value;

use crate::{error::ApiError, AppState};

/// The kind an external trainer takes.
pub const TRAINER_KIND: &str = "finetune.command";

/// What a trainer completed with: `output` is its [`TrainerResult`], `artifacts` the files the
/// attempt uploaded (the model file among them). Errors name `output.…`.
pub async fn trained(
    state: &AppState,
    output: Value,
    artifacts: Vec<Artifact>,
) -> Result<Trained, ApiError> {
    let result: TrainerResult = input::parse(&output).map_err(|e| e.under("output"))?;
    let name = result.artifact();
    let bad = |message: String| ApiError::field("output.artifact", message);
    let model = artifacts
        .iter()
        .find(|a| a.name == name)
        .cloned()
        .ok_or_else(|| {
            bad(format!(
                "`{name}` is not among the completion's `artifacts`: upload the model file \
                 (PUT /v1/jobs/{{id}}/artifacts/{name}) and list it"
            ))
        })?;
    let header = header_of(state, &model.location)
        .await?
        .ok_or_else(|| bad(format!("`{name}` is not a safetensors file")))?;
    let info = check_model_header(&header).map_err(|m| {
        bad(format!(
            "`{name}` is not a model file Capibara can serve: {m}"
        ))
    })?;
    Ok(Trained {
        artifacts,
        model,
        info,
        metrics: Value::Object(result.metrics.unwrap_or_default()),
    })
}

/// The JSON header of the safetensors file at `location` (after its 8-byte little-endian
/// length); `None` when the file is too short or its length is not believable.
async fn header_of(state: &AppState, location: &str) -> Result<Option<Vec<u8>>, ApiError> {
    let store = state
        .artifacts
        .as_ref()
        .map_err(|_| ApiError::Unavailable)?;
    let read = |range: std::ops::Range<u64>| async move {
        match store.get(location, Some(range.clone())).await {
            Ok(r) if r.range == range => Ok(Some(r.bytes)),
            Ok(_) | Err(ArtifactError::BadRange { .. }) => Ok(None),
            Err(e) => Err(ApiError::internal(e)),
        }
    };
    let Some(len) = read(0..8).await? else {
        return Ok(None);
    };
    let len = u64::from_le_bytes(len[..].try_into().expect("8 bytes"));
    if len == 0 || len > MAX_MODEL_HEADER {
        return Ok(None);
    }
    Ok(read(8..8 + len).await?.map(|b| b.to_vec()))
}
