//! Errors: what the API answered (RFC 9457 problem JSON, one variant per kind of refusal), what
//! the network did, and what a handler returns to steer its job's retries.

use std::{fmt, time::Duration};

use serde::Deserialize;

/// What a call returns.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One field a `422` names (`input.width`, `jobs[1].kind`, `Capibara-Lease`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FieldError {
    pub field: String,
    #[serde(default)]
    pub message: String,
}

/// An error answer of the API: RFC 9457 problem details.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Problem {
    /// HTTP status.
    #[serde(default)]
    pub status: u16,
    /// The problem type URI (`urn:capibara:problem:validation`, `…:lease-lost`).
    #[serde(rename = "type", default)]
    pub problem_type: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub detail: String,
    /// Every field the answer names.
    #[serde(default)]
    pub errors: Vec<FieldError>,
}

impl Problem {
    /// The problem of an answer with `status` and body `body` (problem JSON, or anything else,
    /// which becomes the detail).
    pub fn from_body(status: u16, body: &[u8]) -> Problem {
        match serde_json::from_slice::<Problem>(body) {
            Ok(mut p) => {
                p.status = status;
                p
            }
            Err(_) => Problem {
                status,
                problem_type: "about:blank".into(),
                title: String::new(),
                detail: String::from_utf8_lossy(&body[..body.len().min(1000)]).into_owned(),
                errors: Vec::new(),
            },
        }
    }

    /// The first field the problem names.
    pub fn field(&self) -> Option<&str> {
        self.errors.first().map(|e| e.field.as_str())
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.status)?;
        if !self.title.is_empty() {
            write!(f, " {}", self.title)?;
        }
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

/// Everything a call of this crate can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// 400 or 422: a field is wrong ([`Problem::field`] names it).
    #[error("invalid request: {0}")]
    Validation(Box<Problem>),
    /// 401: missing or unknown API key.
    #[error("unauthorized: {0}")]
    Unauthorized(Box<Problem>),
    /// 403: the key lacks the role.
    #[error("forbidden: {0}")]
    Forbidden(Box<Problem>),
    /// 404: unknown id or route.
    #[error("not found: {0}")]
    NotFound(Box<Problem>),
    /// 409: the action does not fit the resource's state (cancel a finished job).
    #[error("conflict: {0}")]
    Conflict(Box<Problem>),
    /// 409 whose type ends in `lease-lost`: the lease token no longer names the job's attempt;
    /// nothing was recorded. Stop working on that job.
    #[error("lease lost: {0}")]
    LeaseLost(Box<Problem>),
    /// 429: a limit; retry after `retry_after` (the `Retry-After` header).
    #[error("rate limited: {problem}")]
    RateLimited {
        retry_after: Option<Duration>,
        problem: Box<Problem>,
    },
    /// 503: Postgres or Redis unreachable; retry after `retry_after`.
    #[error("unavailable: {problem}")]
    Unavailable {
        retry_after: Option<Duration>,
        problem: Box<Problem>,
    },
    /// Any other error answer.
    #[error("{0}")]
    Problem(Box<Problem>),
    /// No answer came: connection refused or reset, DNS, request timeout, a broken body.
    #[error("transport: {0}")]
    Transport(#[source] reqwest::Error),
    /// An answer that is not what the API documents.
    #[error("unexpected answer: {context}")]
    Decode {
        context: String,
        #[source]
        source: serde_json::Error,
    },
    /// A wait ([`crate::Client::wait`], [`crate::Client::wait_run`]) ran past its deadline;
    /// the job or run keeps going.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A setting that cannot work (a base URL that does not parse, a header value).
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl Error {
    /// The error for an error answer.
    pub(crate) fn from_answer(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Error {
        // Boxed: an error answer is rare, and `Result<T, Error>` stays small.
        let problem = Box::new(Problem::from_body(status, body));
        match status {
            400 | 422 => Error::Validation(problem),
            401 => Error::Unauthorized(problem),
            403 => Error::Forbidden(problem),
            404 => Error::NotFound(problem),
            409 if problem.problem_type.ends_with("lease-lost") => Error::LeaseLost(problem),
            409 => Error::Conflict(problem),
            429 => Error::RateLimited {
                retry_after,
                problem,
            },
            503 => Error::Unavailable {
                retry_after,
                problem,
            },
            _ => Error::Problem(problem),
        }
    }

    /// The API's answer, when there was one.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Error::Validation(p)
            | Error::Unauthorized(p)
            | Error::Forbidden(p)
            | Error::NotFound(p)
            | Error::Conflict(p)
            | Error::LeaseLost(p)
            | Error::Problem(p)
            | Error::RateLimited { problem: p, .. }
            | Error::Unavailable { problem: p, .. } => Some(p),
            _ => None,
        }
    }

    /// The HTTP status of the answer, when there was one.
    pub fn status(&self) -> Option<u16> {
        self.problem().map(|p| p.status)
    }

    /// The first field the answer names (`input.width`).
    pub fn field(&self) -> Option<&str> {
        self.problem().and_then(Problem::field)
    }

    pub(crate) fn decode(context: impl Into<String>, source: serde_json::Error) -> Error {
        Error::Decode {
            context: context.into(),
            source,
        }
    }
}

/// What a handler returns when its job did not succeed. Any error converts into a retryable
/// one with `?` (its type name becomes the recorded error type), so this type is not itself a
/// `std::error::Error`, like `anyhow::Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum HandlerError {
    /// Retried while attempts remain, after the job's backoff.
    Retryable { error_type: String, message: String },
    /// Fails the job now, without retry.
    Fatal { error_type: String, message: String },
    /// Retried no sooner than after the delay (the attempt counts).
    RetryAfter { delay: Duration, message: String },
}

impl HandlerError {
    /// A retryable error of type `error`.
    pub fn retryable(message: impl Into<String>) -> HandlerError {
        HandlerError::Retryable {
            error_type: "error".into(),
            message: message.into(),
        }
    }

    /// An error that fails the job without retry, recorded with `error_type`.
    pub fn fatal(error_type: impl Into<String>, message: impl Into<String>) -> HandlerError {
        HandlerError::Fatal {
            error_type: error_type.into(),
            message: message.into(),
        }
    }

    /// Retry no sooner than `delay` (recorded with type `retry_after`).
    pub fn retry_after(delay: Duration, message: impl Into<String>) -> HandlerError {
        HandlerError::RetryAfter {
            delay,
            message: message.into(),
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerError::Retryable {
                error_type,
                message,
            } => write!(f, "{error_type}: {message}"),
            HandlerError::Fatal {
                error_type,
                message,
            } => write!(f, "{error_type} (fatal): {message}"),
            HandlerError::RetryAfter { delay, message } => {
                write!(f, "retry after {delay:?}: {message}")
            }
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(e: E) -> Self {
        let full = std::any::type_name::<E>();
        // `core::num::error::ParseIntError` → `ParseIntError`; generics keep their last path.
        let short = full.split('<').next().unwrap_or(full);
        let short = short.rsplit("::").next().unwrap_or(short);
        HandlerError::Retryable {
            error_type: short.to_string(),
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(status: u16, slug: &str) -> Vec<u8> {
        serde_json::json!({
            "type": format!("urn:capibara:problem:{slug}"),
            "title": "T",
            "status": status,
            "detail": "input.ms: must be a non-negative integer",
            "errors": [{"field": "input.ms", "message": "must be a non-negative integer"}]
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn each_status_maps_to_its_variant() {
        let e = Error::from_answer(422, None, &problem(422, "validation"));
        assert!(matches!(e, Error::Validation(_)), "{e:?}");
        assert_eq!(e.field(), Some("input.ms"));
        assert_eq!(e.status(), Some(422));
        assert!(matches!(
            Error::from_answer(400, None, b"{}"),
            Error::Validation(_)
        ));
        assert!(matches!(
            Error::from_answer(401, None, b""),
            Error::Unauthorized(_)
        ));
        assert!(matches!(
            Error::from_answer(403, None, b""),
            Error::Forbidden(_)
        ));
        assert!(matches!(
            Error::from_answer(404, None, b""),
            Error::NotFound(_)
        ));
        assert!(matches!(
            Error::from_answer(500, None, b""),
            Error::Problem(_)
        ));
    }

    #[test]
    fn a_409_is_a_lost_lease_only_when_its_type_says_so() {
        let lost = Error::from_answer(409, None, &problem(409, "lease-lost"));
        assert!(matches!(lost, Error::LeaseLost(_)), "{lost:?}");
        let conflict = Error::from_answer(409, None, &problem(409, "conflict"));
        assert!(matches!(conflict, Error::Conflict(_)), "{conflict:?}");
    }

    #[test]
    fn a_429_and_a_503_keep_their_retry_after() {
        let e = Error::from_answer(429, Some(Duration::from_secs(5)), &problem(429, "x"));
        match e {
            Error::RateLimited {
                retry_after,
                problem,
            } => {
                assert_eq!(retry_after, Some(Duration::from_secs(5)));
                assert_eq!(problem.status, 429);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Error::from_answer(503, Some(Duration::from_secs(1)), b"{}"),
            Error::Unavailable {
                retry_after: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn a_body_that_is_not_problem_json_becomes_the_detail() {
        let p = Problem::from_body(502, b"Bad Gateway from the proxy");
        assert_eq!(p.status, 502);
        assert_eq!(p.detail, "Bad Gateway from the proxy");
        assert_eq!(p.field(), None);
        assert_eq!(p.to_string(), "502: Bad Gateway from the proxy");
    }

    #[test]
    fn the_status_of_the_answer_wins_over_the_body() {
        let p = Problem::from_body(409, br#"{"type":"x","status":200}"#);
        assert_eq!(p.status, 409);
    }

    #[test]
    fn any_error_converts_into_a_retryable_handler_error_named_after_its_type() {
        fn parse(s: &str) -> Result<u32, HandlerError> {
            Ok(s.parse::<u32>()?)
        }
        match parse("x") {
            Err(HandlerError::Retryable {
                error_type,
                message,
            }) => {
                assert_eq!(error_type, "ParseIntError");
                assert_eq!(message, "invalid digit found in string");
            }
            other => panic!("{other:?}"),
        }
    }
}
