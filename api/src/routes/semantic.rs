//! The semantic seed endpoints (docs/models.md): `POST /v1/semantic/embed`, `/search` and
//! `/chunk` take the input of `text.embed`, `memory.search` and `text.chunk` as their body and
//! answer that job, waiting for it up to `Prefer: wait` (default 30 s).

use axum::{extract::State, http::HeaderMap, response::Response};
use capibara_shared::domain::job::Job;
use serde_json::{Map, Value};

use crate::{auth::Auth, error::ApiError, extract::ApiJson, routes::jobs::run_kind, AppState};

macro_rules! semantic_route {
    ($name:ident, $path:literal, $kind:literal, $op:literal, $what:literal) => {
        #[doc = concat!("`POST ", $path, "`: ", $what, " (a `", $kind, "` job).")]
        #[utoipa::path(post, operation_id = $op, path = $path, tag = "models",
            request_body(content = Object, description = concat!("a `", $kind, "` input")),
            params(("Prefer" = Option<String>, Header, description = "wait=N: wait up to N seconds (≤ 60; default 30) for the result"),
                   ("Idempotency-Key" = Option<String>, Header, description = "replays return the same job")),
            responses((status = 200, description = "done within the wait: the job, its output", body = Job),
                      (status = 202, description = "still running; see Location", body = Job),
                      (status = 422, body = crate::error::Problem)),
            security(("bearer" = [])))]
        pub async fn $name(
            State(state): State<AppState>,
            auth: Auth,
            headers: HeaderMap,
            body: ApiJson<Map<String, Value>>,
        ) -> Result<Response, ApiError> {
            run_kind(&state, &auth, &headers, $kind, body, "Semantic").await
        }
    };
}

semantic_route!(
    embed,
    "/v1/semantic/embed",
    "text.embed",
    "semanticEmbed",
    "sentence vectors of `texts`"
);
semantic_route!(
    search,
    "/v1/semantic/search",
    "memory.search",
    "semanticSearch",
    "the stored texts nearest to `query`"
);
semantic_route!(
    chunk,
    "/v1/semantic/chunk",
    "text.chunk",
    "semanticChunk",
    "a text cut into chunks that fit the encoder"
);
