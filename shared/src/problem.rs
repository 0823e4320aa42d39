//! RFC 9457 problem details (`application/problem+json`): the one way every Capibara binary
//! answers an error over HTTP — the API's handlers (`api/src/error.rs` maps `ApiError` here),
//! `/readyz`, and the scheduler's inbound hooks.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use serde_json::Value;

use crate::domain::FieldError;

pub const CONTENT_TYPE: &str = "application/problem+json";

/// RFC 9457 problem details.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

impl Problem {
    /// A problem of type `urn:capibara:problem:<slug>`, titled after the status.
    pub fn new(status: StatusCode, slug: &str, detail: impl Into<String>) -> Problem {
        Problem {
            problem_type: format!("urn:capibara:problem:{slug}"),
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    /// A problem whose type follows from the status alone (`422` is `validation`, …).
    pub fn for_status(status: StatusCode, detail: impl Into<String>) -> Problem {
        Problem::new(status, slug(status), detail)
    }

    /// The fields that were wrong.
    pub fn with_errors(mut self, errors: Vec<FieldError>) -> Problem {
        self.errors = errors;
        self
    }

    /// The response, with extension members (RFC 9457 §3.2) merged into the body.
    pub fn with_extensions(self, extensions: serde_json::Map<String, Value>) -> Response {
        let status = self.status_code();
        let mut body = serde_json::to_value(&self).unwrap_or_default();
        if let Value::Object(members) = &mut body {
            members.extend(extensions);
        }
        respond(status, body.to_string())
    }

    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        respond(status, serde_json::to_string(&self).unwrap_or_default())
    }
}

fn respond(status: StatusCode, body: String) -> Response {
    let mut res = (status, body).into_response();
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    res
}

/// The problem type slug of a status when nothing more specific is known.
pub fn slug(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad-request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not-found",
        405 => "method-not-allowed",
        409 => "conflict",
        413 => "payload-too-large",
        415 => "unsupported-media-type",
        422 => "validation",
        429 => "rate-limited",
        503 => "unavailable",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_names_its_type_status_and_fields() {
        let p = Problem::for_status(StatusCode::UNPROCESSABLE_ENTITY, "bad")
            .with_errors(vec![FieldError::new("input.ms", "must be at most 1")]);
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["type"], "urn:capibara:problem:validation");
        assert_eq!(v["title"], "Unprocessable Entity");
        assert_eq!(v["status"], 422);
        assert_eq!(v["errors"][0]["field"], "input.ms");
        let res = p.into_response();
        assert_eq!(res.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
    }
}
