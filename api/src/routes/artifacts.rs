//! `GET /v1/jobs/{id}/artifacts/{name}`: a job's file from the artifact store, with its content
//! type and single byte-range requests (`Range: bytes=a-b`, `a-`, `-n` → 206; a last byte past
//! the end, however large, is cut to the file as RFC 9110 §14.1.2 says; a first byte outside the
//! file → 416), so audio players can seek.

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use capibara_shared::{artifacts::ArtifactError, domain::auth::Role, store};
use uuid::Uuid;

use crate::{auth::Auth, error::ApiError, AppState};

/// A parsed `Range` header.
#[derive(Debug, PartialEq)]
enum ByteRange {
    /// `bytes=a-b` (end inclusive) or `bytes=a-` (end `None`).
    From(u64, Option<u64>),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

/// One range, or `None` for a header we serve the whole file for (absent, several ranges, or
/// another unit), as RFC 9110 allows. `Err` means a malformed single range (416).
fn parse_range(headers: &HeaderMap) -> Result<Option<ByteRange>, ()> {
    let Some(v) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.trim().split_once('-').ok_or(())?;
    // Digits only; a number beyond u64 (a last byte or a suffix length past any file) saturates.
    let num = |s: &str| {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(());
        }
        Ok(s.parse::<u64>().unwrap_or(u64::MAX))
    };
    match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, false) => Ok(Some(ByteRange::Suffix(num(b)?))),
        (false, true) => Ok(Some(ByteRange::From(num(a)?, None))),
        (false, false) => {
            let (a, b) = (num(a)?, num(b)?);
            if b < a {
                return Err(());
            }
            Ok(Some(ByteRange::From(a, Some(b))))
        }
        (true, true) => Err(()),
    }
}

fn not_satisfiable(size: u64) -> Response {
    let mut res = ApiError::BadRequest(format!(
        "the requested range is outside the artifact ({size} bytes)"
    ))
    .into_response();
    *res.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
    if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
        res.headers_mut().insert(header::CONTENT_RANGE, v);
    }
    res
}

#[utoipa::path(get, operation_id = "getJobArtifact", path = "/v1/jobs/{id}/artifacts/{name}", tag = "jobs",
    params(("id" = String, Path), ("name" = String, Path, description = "e.g. audio.wav"),
           ("Range" = Option<String>, Header, description = "bytes=a-b, bytes=a- or bytes=-n")),
    responses((status = 200, description = "the whole file, with its content type"),
              (status = 206, description = "the requested byte range"),
              (status = 404, body = crate::error::Problem),
              (status = 416, body = crate::error::Problem)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    auth.require(Role::Read)?;
    let id: Uuid = id
        .parse()
        .map_err(|_| ApiError::NotFound(format!("no job `{id}` (ids are UUIDs)")))?;
    let job = store::jobs::get(&state.store.pool, auth.namespace(), id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no job `{id}`")))?;
    let artifact = job
        .artifacts
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| ApiError::NotFound(format!("job `{id}` has no artifact `{name}`")))?;
    let store = state.artifacts.as_ref().map_err(|e| {
        tracing::error!(error = %e, "artifact store unavailable");
        ApiError::Unavailable
    })?;
    let range = match parse_range(&headers) {
        Ok(r) => r,
        Err(()) => return Ok(not_satisfiable(artifact.size)),
    };
    let size = artifact.size;
    let wanted = match range {
        None => None,
        // `b` may be u64::MAX: the end is cut to the size by the store.
        Some(ByteRange::From(a, b)) => Some(a..b.map_or(u64::MAX, |b| b.saturating_add(1))),
        Some(ByteRange::Suffix(0)) => return Ok(not_satisfiable(size)),
        Some(ByteRange::Suffix(n)) => Some(size.saturating_sub(n)..size),
    };
    let read = match store.get(&artifact.location, wanted.clone()).await {
        Ok(r) => r,
        Err(ArtifactError::BadRange { size }) => return Ok(not_satisfiable(size)),
        Err(ArtifactError::NotFound) => {
            return Err(ApiError::NotFound(format!(
                "artifact `{name}` of job `{id}` is no longer stored"
            )))
        }
        Err(e) => {
            tracing::error!(error = %e, job_id = %id, "artifact read failed");
            return Err(ApiError::Unavailable);
        }
    };
    let mut res = Response::new(Body::from(read.bytes.clone()));
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&artifact.content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(read.bytes.len()));
    if let Ok(v) = HeaderValue::from_str(&format!("inline; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if wanted.is_some() {
        *res.status_mut() = StatusCode::PARTIAL_CONTENT;
        let end = read.range.end.saturating_sub(1);
        if let Ok(v) =
            HeaderValue::from_str(&format!("bytes {}-{end}/{}", read.range.start, read.size))
        {
            res.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str) -> Result<Option<ByteRange>, ()> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        parse_range(&h)
    }

    #[test]
    fn range_headers_parse_into_one_range_or_the_whole_file() {
        assert_eq!(range("bytes=0-99"), Ok(Some(ByteRange::From(0, Some(99)))));
        assert_eq!(range("bytes=100-"), Ok(Some(ByteRange::From(100, None))));
        assert_eq!(range("bytes=-500"), Ok(Some(ByteRange::Suffix(500))));
        assert_eq!(range("bytes=0-1,5-6"), Ok(None));
        assert_eq!(range("items=0-1"), Ok(None));
        assert_eq!(range("bytes=5-1"), Err(()));
        assert_eq!(range("bytes=x-1"), Err(()));
        assert_eq!(range("bytes=+1-2"), Err(()));
        assert_eq!(
            range("bytes=0-18446744073709551615"),
            Ok(Some(ByteRange::From(0, Some(u64::MAX))))
        );
        assert_eq!(
            range("bytes=0-99999999999999999999999"),
            Ok(Some(ByteRange::From(0, Some(u64::MAX))))
        );
        assert_eq!(
            range("bytes=-99999999999999999999999"),
            Ok(Some(ByteRange::Suffix(u64::MAX)))
        );
        assert_eq!(parse_range(&HeaderMap::new()), Ok(None));
    }
}
