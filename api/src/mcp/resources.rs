//! Resources: jobs (`capibara://jobs/{id}`), runs (`capibara://runs/{id}`) and job artifacts
//! (`capibara://jobs/{id}/artifacts/{name}`), read with the caller's namespace and role.

use base64::Engine;
use capibara_shared::{
    domain::auth::Role,
    store::{self, jobs::JobFilter, runs::RunFilter},
};
use serde_json::{json, Value};
use uuid::Uuid;

use super::protocol::{RpcError, RESOURCE_NOT_FOUND};
use crate::{auth::Auth, error::ApiError, AppState};

const SCHEME: &str = "capibara://";
/// Recent jobs and runs `resources/list` names.
const LISTED: i64 = 50;
/// Largest artifact read inline (bigger ones: `GET /v1/jobs/{id}/artifacts/{name}`).
const MAX_INLINE_BYTES: u64 = 8 * 1024 * 1024;

pub fn job_uri(id: Uuid) -> String {
    format!("{SCHEME}jobs/{id}")
}

pub fn run_uri(id: Uuid) -> String {
    format!("{SCHEME}runs/{id}")
}

pub fn artifact_uri(job: Uuid, name: &str) -> String {
    format!("{SCHEME}jobs/{job}/artifacts/{name}")
}

/// What a URI names.
#[derive(Debug, PartialEq)]
enum Target {
    Job(Uuid),
    Run(Uuid),
    Artifact(Uuid, String),
}

fn parse(uri: &str) -> Option<Target> {
    let rest = uri.strip_prefix(SCHEME)?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["jobs", id] => Some(Target::Job(id.parse().ok()?)),
        ["runs", id] => Some(Target::Run(id.parse().ok()?)),
        ["jobs", id, "artifacts", name] if !name.is_empty() => {
            Some(Target::Artifact(id.parse().ok()?, (*name).to_string()))
        }
        _ => None,
    }
}

/// `resources/list`: the namespace's recent jobs and runs.
pub async fn list(state: &AppState, auth: &Auth) -> Result<Value, RpcError> {
    auth.require(Role::Read)?;
    let pool = &state.store.pool;
    let jobs = store::jobs::list(pool, auth.namespace(), &JobFilter::default(), LISTED)
        .await
        .map_err(ApiError::from)?;
    let runs = store::runs::list(pool, auth.namespace(), &RunFilter::default(), LISTED)
        .await
        .map_err(ApiError::from)?;
    let mut resources: Vec<Value> = jobs
        .iter()
        .map(|j| {
            json!({"uri": job_uri(j.id), "name": format!("job {}", j.id),
                   "title": format!("{} job ({})", j.kind, j.status),
                   "mimeType": "application/json"})
        })
        .collect();
    resources.extend(runs.iter().map(|r| {
        json!({"uri": run_uri(r.id), "name": format!("run {}", r.id),
               "title": format!("{} run ({})", r.workflow_name, r.status),
               "mimeType": "application/json"})
    }));
    Ok(json!({"resources": resources}))
}

/// `resources/templates/list`.
pub fn templates() -> Value {
    json!({"resourceTemplates": [
        {"uriTemplate": format!("{SCHEME}jobs/{{id}}"), "name": "job",
         "description": "A job: status, input, output, error, progress, artifacts.",
         "mimeType": "application/json"},
        {"uriTemplate": format!("{SCHEME}runs/{{id}}"), "name": "run",
         "description": "A workflow run: status, steps, output.", "mimeType": "application/json"},
        {"uriTemplate": format!("{SCHEME}jobs/{{id}}/artifacts/{{name}}"), "name": "artifact",
         "description": "A file a job stored (text, or base64 `blob`)."}
    ]})
}

fn not_found(uri: &str) -> RpcError {
    RpcError::new(RESOURCE_NOT_FOUND, format!("Resource not found: {uri}"))
}

fn json_contents(uri: &str, value: &impl serde::Serialize) -> Value {
    let text = serde_json::to_string(value).unwrap_or_default();
    json!({"contents": [{"uri": uri, "mimeType": "application/json", "text": text}]})
}

/// Whether a content type is text (served as `text`, not `blob`).
fn textual(content_type: &str) -> bool {
    let t = content_type.to_ascii_lowercase();
    t.starts_with("text/") || t.contains("json") || t.contains("xml") || t.contains("yaml")
}

/// `resources/read`.
pub async fn read(state: &AppState, auth: &Auth, params: &Value) -> Result<Value, RpcError> {
    auth.require(Role::Read)?;
    let uri = params["uri"]
        .as_str()
        .ok_or_else(|| RpcError::invalid_params("`uri` names the resource"))?;
    let pool = &state.store.pool;
    match parse(uri).ok_or_else(|| not_found(uri))? {
        Target::Job(id) => {
            let job = store::jobs::get(pool, auth.namespace(), id)
                .await
                .map_err(ApiError::from)?
                .ok_or_else(|| not_found(uri))?;
            Ok(json_contents(uri, &job))
        }
        Target::Run(id) => {
            let run = store::runs::get(pool, auth.namespace(), id)
                .await
                .map_err(ApiError::from)?
                .ok_or_else(|| not_found(uri))?;
            Ok(json_contents(uri, &run))
        }
        Target::Artifact(id, name) => {
            let job = store::jobs::get(pool, auth.namespace(), id)
                .await
                .map_err(ApiError::from)?
                .ok_or_else(|| not_found(uri))?;
            let a = job
                .artifacts
                .iter()
                .find(|a| a.name == name)
                .ok_or_else(|| not_found(uri))?;
            if a.size > MAX_INLINE_BYTES {
                return Err(RpcError::invalid_params(format!(
                    "the artifact is {} bytes, more than {MAX_INLINE_BYTES} read here; \
                     GET /v1/jobs/{id}/artifacts/{name} serves it",
                    a.size
                )));
            }
            let store = state
                .artifacts
                .as_ref()
                .map_err(|_| RpcError::from(ApiError::Unavailable))?;
            let read = store
                .get(&a.location, None)
                .await
                .map_err(|_| not_found(uri))?;
            let mut content = json!({"uri": uri, "mimeType": a.content_type});
            match std::str::from_utf8(&read.bytes) {
                Ok(text) if textual(&a.content_type) => content["text"] = json!(text),
                _ => {
                    content["blob"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(&read.bytes))
                }
            }
            Ok(json!({"contents": [content]}))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_jobs_runs_and_artifacts() {
        let id = Uuid::now_v7();
        assert_eq!(parse(&job_uri(id)), Some(Target::Job(id)));
        assert_eq!(parse(&run_uri(id)), Some(Target::Run(id)));
        assert_eq!(
            parse(&artifact_uri(id, "out.txt")),
            Some(Target::Artifact(id, "out.txt".into()))
        );
        assert_eq!(parse("capibara://jobs/nope"), None);
        assert_eq!(parse("file:///etc/passwd"), None);
        assert_eq!(parse(&format!("capibara://jobs/{id}/artifacts/a/b")), None);
    }
}
