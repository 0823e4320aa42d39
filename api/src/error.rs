//! The one place where errors become HTTP responses: RFC 9457 `application/problem+json`.

use std::time::Duration;

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use capibara_shared::{
    command::CommandError,
    domain::{job::NotAllowed, FieldError},
    store::StoreError,
};
use uuid::Uuid;

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid API key")]
    Unauthorized,
    /// A stream token that is expired, forged or used where it opens nothing (401, saying why).
    #[error("{0}")]
    TokenRefused(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A lease-scoped call whose lease is gone (docs/workers.md, "Leases and fencing").
    #[error("{0}")]
    LeaseLost(String),
    #[error("{detail}")]
    Validation {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A limit was exceeded (`detail` says which); 429 with `Retry-After`.
    #[error("{detail}")]
    RateLimited {
        retry_after: Duration,
        detail: String,
    },
    #[error("a dependency is unavailable")]
    Unavailable,
    /// Capibara refuses more work for now (`detail` says why: the backlog bound, a request
    /// that outlived its deadline); 503 with `Retry-After`. Nothing was accepted.
    #[error("{detail}")]
    Overloaded {
        retry_after: Duration,
        detail: String,
    },
    /// A fault of ours: the source is kept (its chain is logged once, by [`log_internal_errors`]);
    /// the client sees only that it happened.
    #[error("internal error: {0:#}")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    /// An internal error from any error (or message), keeping its chain.
    pub fn internal(e: impl Into<anyhow::Error>) -> Self {
        ApiError::Internal(e.into())
    }

    /// The per-key request rate limit (`CAPIBARA_RATE_LIMIT_RPS`).
    pub fn rate_limited(retry_after: Duration) -> Self {
        ApiError::RateLimited {
            retry_after,
            detail: "rate limit exceeded".into(),
        }
    }

    /// A 422 naming one field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError::new(field, message).into()
    }

    /// The same error with each field error mapped (renamed, nested); the detail is rebuilt from
    /// the mapped fields. Other errors pass through.
    pub fn map_fields(self, f: impl Fn(FieldError) -> FieldError) -> Self {
        match self {
            ApiError::Validation { errors, .. } => {
                let errors: Vec<FieldError> = errors.into_iter().map(f).collect();
                ApiError::Validation {
                    detail: errors
                        .iter()
                        .map(|e| format!("{}: {}", e.field, e.message))
                        .collect::<Vec<_>>()
                        .join("; "),
                    errors,
                }
            }
            other => other,
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request", "Bad Request"),
            ApiError::Unauthorized | ApiError::TokenRefused(_) => {
                (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized")
            }
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not Found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict"),
            ApiError::LeaseLost(_) => (StatusCode::CONFLICT, "lease-lost", "Lease Lost"),
            ApiError::Validation { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                "Validation Failed",
            ),
            ApiError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported Media Type",
            ),
            ApiError::PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload Too Large",
            ),
            ApiError::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too Many Requests",
            ),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service Unavailable",
            ),
            ApiError::Overloaded { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "Service Unavailable",
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal Server Error",
            ),
        }
    }
}

impl ApiError {
    /// The answer to a command that did not happen (`command::execute`); `what` names the
    /// resource (`job`, `schedule`, …) and the domain's refusal becomes its own answer.
    pub fn from_command<E>(e: CommandError<E>, what: &str, id: Uuid) -> Self
    where
        E: std::error::Error + Into<ApiError>,
    {
        match e {
            CommandError::NotFound => ApiError::NotFound(format!("no {what} `{id}`")),
            CommandError::Rejected(e) => e.into(),
            CommandError::Busy => {
                ApiError::Conflict(format!("the {what} is changing too fast; retry"))
            }
            CommandError::Store(e) => e.into(),
        }
    }
}

/// A command the domain refused in the resource's state.
impl From<NotAllowed> for ApiError {
    fn from(NotAllowed(why): NotAllowed) -> Self {
        ApiError::Conflict(why)
    }
}

impl From<std::convert::Infallible> for ApiError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::Validation {
            detail: format!("{}: {}", e.field, e.message),
            errors: vec![e],
        }
    }
}

/// The backlog bound was reached: nothing was accepted.
impl From<capibara_shared::backlog::BacklogFull> for ApiError {
    fn from(e: capibara_shared::backlog::BacklogFull) -> Self {
        ApiError::Overloaded {
            retry_after: Duration::from_secs(5),
            detail: e.to_string(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::NotFound("not found".into()),
            StoreError::Conflict => {
                ApiError::Conflict("the resource changed concurrently; retry".into())
            }
            StoreError::DuplicateCommand => {
                ApiError::Conflict("idempotency key already used".into())
            }
            StoreError::Unavailable(m) => {
                tracing::warn!(error = %m, "store unavailable");
                ApiError::Unavailable
            }
            // Data the edge checks let through and Postgres refused: the client's, not ours.
            StoreError::Invalid(m) => ApiError::Validation {
                detail: format!("the request holds a value that cannot be stored: {m}"),
                errors: Vec::new(),
            },
            StoreError::Internal(m) => ApiError::Internal(anyhow::anyhow!(m)),
        }
    }
}

/// RFC 9457 problem details (shared by every binary).
pub use capibara_shared::problem::Problem;

impl ApiError {
    /// The problem JSON this error answers with.
    pub fn to_problem(&self) -> Problem {
        let (status, slug, title) = self.parts();
        let detail = match self {
            ApiError::Internal(_) => "an unexpected error occurred; it has been logged".to_string(),
            ApiError::Unavailable => {
                "the database or queue is unavailable; retry shortly".to_string()
            }
            other => other.to_string(),
        };
        let errors = match self {
            ApiError::Validation { errors, .. } => errors.clone(),
            _ => Vec::new(),
        };
        Problem {
            problem_type: format!("urn:capibara:problem:{slug}"),
            title: title.to_string(),
            status: status.as_u16(),
            detail,
            errors,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.parts();
        let retry_after = match &self {
            ApiError::Unavailable => Some("1".to_string()),
            ApiError::RateLimited { retry_after, .. }
            | ApiError::Overloaded { retry_after, .. } => {
                Some((retry_after.as_secs_f64().ceil().max(1.0) as u64).to_string())
            }
            _ => None,
        };
        let internal = match &self {
            ApiError::Internal(e) => Some(InternalError(format!("{e:#}"))),
            _ => None,
        };
        let body = self.to_problem();
        let mut res = body.into_response();
        let h = res.headers_mut();
        if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
            h.insert(header::RETRY_AFTER, v);
        }
        if status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(e) = internal {
            res.extensions_mut().insert(e);
        }
        res
    }
}

/// The chain of an internal error, carried on its response to [`log_internal_errors`].
#[derive(Debug, Clone)]
pub struct InternalError(pub String);

/// Middleware: log each internal error once, with the request it failed, where every other
/// log line of the request is (the conversion to a response logs nothing).
pub async fn log_internal_errors(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let res = next.run(req).await;
    if let Some(InternalError(chain)) = res.extensions().get::<InternalError>() {
        tracing::error!(%method, %path, error = %chain, "internal error");
    }
    res
}

#[cfg(test)]
mod internal_error_tests {
    use super::*;

    #[test]
    fn an_internal_error_keeps_its_chain_for_the_log_and_tells_the_client_nothing() {
        let io = std::io::Error::other("disk on fire");
        let e = ApiError::internal(anyhow::Error::new(io).context("writing the artifact"));
        let res = e.into_response();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let logged = res.extensions().get::<InternalError>().unwrap().0.clone();
        assert_eq!(logged, "writing the artifact: disk on fire");
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }
}
