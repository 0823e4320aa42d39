//! The seed endpoints (docs/connectors.md, "Seed endpoints"): `POST /v1/content/connectors/{family}`
//! and `POST /v1/content/discover` map onto `connector.fetch` jobs, submitted as
//! `POST /v1/jobs` submits them (the same command), answered when they end under
//! `Prefer: wait`, else `202` at once.

use std::time::Duration;

use axum::{
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use capibara_shared::{
    domain::{auth::Role, connector::types, job::Job},
    store,
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{
    auth::Auth,
    error::ApiError,
    extract::{idempotency_key, prefer_wait, ApiJson},
    routes::jobs::{create, finish, rename_input, Page, SubmitJob},
    AppState,
};

fn fetch_job(input: Value) -> SubmitJob {
    SubmitJob::of("connector.fetch", input)
}

/// The family's types, or a 404 (an unknown family) / 422 (a family with no type here).
fn family_types(family: &str) -> Result<&'static [&'static str], ApiError> {
    let t = types::family(family).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no connector family `{family}`; families: {}",
            types::FAMILIES
                .iter()
                .map(|(f, _)| *f)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    if t.is_empty() {
        return Err(ApiError::field(
            "family",
            format!("the `{family}` family has no connector type in this build yet"),
        ));
    }
    Ok(t)
}

/// `POST /v1/content/connectors/{family}`: a `connector.fetch` of a connector (`connector_id`)
/// or an inline `{type, config}` of the family.
async fn seed(
    state: &AppState,
    auth: &Auth,
    headers: &HeaderMap,
    family: &str,
    body: ApiJson<Map<String, Value>>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let allowed = family_types(family)?;
    let wait = prefer_wait(headers)?;
    let key = idempotency_key(headers)?;
    let input = Value::Object(body.value);
    let ty = match input.get("connector_id").and_then(Value::as_str) {
        Some(id) => {
            let id = id
                .parse()
                .map_err(|_| ApiError::field("connector_id", "must be a UUID"))?;
            let c = store::connectors::get(&state.store.pool, auth.namespace(), id)
                .await?
                .filter(|c| !c.deleted)
                .ok_or_else(|| ApiError::NotFound(format!("no connector `{id}`")))?;
            Some(c.connector_type)
        }
        None => input
            .get("type")
            .and_then(Value::as_str)
            .map(str::to_string),
    };
    if let Some(t) = ty.filter(|t| !allowed.contains(&t.as_str())) {
        return Err(ApiError::field(
            "type",
            format!(
                "`{t}` is not a `{family}` connector type; the family's: {}",
                allowed.join(", ")
            ),
        ));
    }
    let (job, replayed) = create(
        state,
        auth,
        fetch_job(input),
        key,
        &body.hash,
        "SeedConnector",
    )
    .await
    .map_err(|e| rename_input(e, ""))?;
    finish(state, auth, job, wait, replayed).await
}

macro_rules! family_route {
    ($name:ident, $family:literal, $op:literal) => {
        #[utoipa::path(post, operation_id = $op, path = concat!("/v1/content/connectors/", $family), tag = "connectors",
            request_body(content = Object, description = "a `connector.fetch` input: `connector_id`, or an inline `type` of the family with its `config`"),
            params(("Prefer" = Option<String>, Header, description = "wait=N: wait up to N seconds (≤ 60) for the result")),
            responses((status = 200, description = "the fetch ended within the wait", body = Job),
                      (status = 202, description = "accepted; see Location", body = Job),
                      (status = 404, body = crate::error::Problem),
                      (status = 422, body = crate::error::Problem)),
            security(("bearer" = [])))]
        pub async fn $name(
            State(state): State<AppState>,
            auth: Auth,
            headers: HeaderMap,
            body: ApiJson<Map<String, Value>>,
        ) -> Result<Response, ApiError> {
            seed(&state, &auth, &headers, $family, body).await
        }
    };
}

family_route!(seed_web, "web", "seedWebConnector");
family_route!(seed_api, "api", "seedApiConnector");

/// `POST /v1/content/connectors/{family}` for the families not documented by their own path
/// (those with no type in this build answer a 422 naming `family`).
pub async fn seed_family(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path(family): Path<String>,
    body: ApiJson<Map<String, Value>>,
) -> Result<Response, ApiError> {
    seed(&state, &auth, &headers, &family, body).await
}

/// `POST /v1/content/discover` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Discover {
    /// Sources to fetch (1-20), each `{type, config}` of a connector type.
    #[schema(value_type = Vec<Object>, min_items = 1, max_items = 20)]
    pub sources: Vec<Value>,
    /// Most new items per source (1-100000, default 1000).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100_000, nullable = false)]
    pub max_items: Option<u32>,
    /// Only items published after this time.
    #[serde(default)]
    #[schema(nullable = false)]
    pub since: Option<DateTime<Utc>>,
    /// Items each job lists inline (0-100, default 10).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100, nullable = false)]
    pub inline_items: Option<u32>,
}

#[utoipa::path(post, operation_id = "discoverContent", path = "/v1/content/discover", tag = "connectors",
    request_body = Discover,
    params(("Prefer" = Option<String>, Header, description = "wait=N: wait up to N seconds (≤ 60) for every fetch")),
    responses((status = 200, description = "every fetch ended within the wait", body = Page<Job>),
              (status = 202, description = "accepted: one connector.fetch job per source, in order", body = Page<Job>),
              (status = 422, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn discover(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    body: ApiJson<Discover>,
) -> Result<Response, ApiError> {
    auth.require(Role::Submit)?;
    let wait = prefer_wait(&headers)?;
    let d = body.value;
    if d.sources.is_empty() || d.sources.len() > 20 {
        return Err(ApiError::field("sources", "give 1-20 sources"));
    }
    // Every source is checked before any job is submitted.
    let mut inputs = Vec::with_capacity(d.sources.len());
    for (i, source) in d.sources.into_iter().enumerate() {
        let Value::Object(mut input) = source else {
            return Err(ApiError::field(
                format!("sources[{i}]"),
                "must be {type, config}",
            ));
        };
        for (k, v) in [
            ("max_items", d.max_items.map(Value::from)),
            ("inline_items", d.inline_items.map(Value::from)),
            ("since", d.since.map(|s| json!(s))),
        ] {
            if let Some(v) = v {
                input.insert(k.into(), v);
            }
        }
        let input = Value::Object(input);
        capibara_shared::domain::kinds::validate_input(
            "connector.fetch",
            &input,
            state.config.as_ref(),
        )
        .map_err(|e| rename_input(ApiError::from(e), &format!("sources[{i}]")))?;
        inputs.push(input);
    }
    let mut jobs: Vec<Job> = Vec::with_capacity(inputs.len());
    for input in inputs {
        let (job, _) = create(
            &state,
            &auth,
            fetch_job(input),
            None,
            &body.hash,
            "DiscoverContent",
        )
        .await?;
        jobs.push(job);
    }
    if let Some(w) = wait {
        let deadline = tokio::time::Instant::now() + w;
        for job in &mut jobs {
            if job.status.is_terminal() {
                continue;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let Some(j) = crate::wait::until_terminal(
                &state,
                auth.namespace(),
                job.id,
                left.max(Duration::from_millis(1)),
            )
            .await?
            {
                *job = j;
            }
        }
    }
    let done = jobs.iter().all(|j| j.status.is_terminal());
    let status = if wait.is_some() && done {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((
        status,
        Json(Page {
            items: jobs,
            next_cursor: None,
        }),
    )
        .into_response())
}
