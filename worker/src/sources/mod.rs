//! Where `connector.fetch` gets items from: one module per connector type. A source turns a
//! config and the connector's cursor into the items the source lists now and the cursor after
//! them; which of them are new is the executor's business
//! ([`crate::executors::connector`]).

pub mod api;
pub mod document;
pub mod files;
pub mod graphql;
pub mod imap;
pub mod rss;
pub mod s3;
pub mod web;

use std::{collections::BTreeMap, time::Duration};

use capibara_shared::domain::connector::types::Item;
use serde_json::Value;

use crate::fetch::GetError;

/// What a source listed.
#[derive(Debug, Default)]
pub struct Listing {
    /// Every item the source lists now, in its order.
    pub items: Vec<Item>,
    /// The cursor after this listing.
    pub cursor: Value,
    /// The source said nothing changed since the cursor (HTTP 304): `items` is empty.
    pub not_modified: bool,
    /// Bytes downloaded.
    pub bytes: u64,
    /// The cursor's key that holds the newest item date listed (the storage types'
    /// `modified_after`): when a fetch returns only part of the new items, the executor sets it
    /// back to the newest date it returned, so the rest are listed again.
    pub watermark: Option<&'static str>,
    /// Files that came with the items (an email's attachments): the executor stores those of
    /// the items it returns as artifacts of the fetch.
    pub attachments: Vec<Attachment>,
}

/// A file that came with an item, stored as an artifact of the fetch if the item is new.
#[derive(Debug)]
pub struct Attachment {
    /// The item's `id`.
    pub item: String,
    /// The artifact's name (a valid one: `[A-Za-z0-9._-]`, at most 128 characters).
    pub name: String,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

/// What a source needs besides its config.
pub struct Request<'a> {
    pub config: &'a Value,
    /// Secret values by the place the connector put them (`headers.Authorization`).
    pub secrets: &'a BTreeMap<String, String>,
    /// The connector's cursor (`None`: the first fetch, or an inline config).
    pub cursor: Option<&'a Value>,
    pub policy: &'a crate::http::OutboundPolicy,
    pub cancel: &'a tokio_util::sync::CancellationToken,
    /// The job's namespace (the `files` type reads its directory only).
    pub namespace: &'a str,
    /// The workers' `CAPIBARA_FILES_ROOT` (`None`: the `files` type is off).
    pub files_root: Option<&'a std::path::Path>,
    /// Where long listings report how far they are.
    pub progress: &'a dyn crate::executors::ProgressSink,
}

/// Why a source listed nothing.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Get(#[from] GetError),
    /// The source answered with a status that is not a listing.
    #[error("the source answered HTTP {status}: {snippet}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
        snippet: String,
    },
    /// The answer is not what the type reads (malformed XML, not a feed).
    #[error("{0}")]
    Malformed(String),
    /// The source refuses to be read (robots.txt disallows the page).
    #[error("{0}")]
    Refused(String),
    /// The config does not fit the type (checked at submission; a bug if it happens).
    #[error("{0}")]
    Config(String),
    /// The type needs a setting this worker's operator has not made.
    #[error("{0}")]
    NotConfigured(String),
    /// The directory or bucket the config names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The source refused the credentials (or their absence).
    #[error("{0}")]
    Denied(String),
    /// More files match than the config's `max_files`.
    #[error("{0}")]
    TooMany(String),
    /// Reading the source failed (an I/O or storage service error that may pass).
    #[error("{0}")]
    Io(String),
}

/// How far a long listing is, reported at most once a second (each report is a `JobProgress`
/// event): pages walked, or files read of how many.
pub struct Reporter {
    last: std::time::Instant,
}

impl Default for Reporter {
    fn default() -> Self {
        Reporter {
            last: std::time::Instant::now(),
        }
    }
}

impl Reporter {
    /// `done` of `total` (a percentage) or of an unknown number, and what that is in words.
    pub async fn report(
        &mut self,
        req: &Request<'_>,
        done: u64,
        total: Option<u64>,
        message: impl FnOnce() -> String,
    ) {
        if self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last = std::time::Instant::now();
        let percent = total.map(|t| 100.0 * done as f64 / t.max(1) as f64);
        req.progress.progress(percent, Some(message())).await;
    }
}

/// Which paths a storage listing keeps: those its glob matches, at most `max_files` of them.
pub struct Selection {
    glob: Option<globset::GlobMatcher>,
    max_files: usize,
    matched: usize,
    /// What the listing lists (`files`, `objects`) and where it is narrowed (`path`), for the
    /// error.
    what: &'static str,
    narrow: &'static str,
}

impl Selection {
    pub fn new(
        glob: Option<&str>,
        max_files: Option<u32>,
        what: &'static str,
        narrow: &'static str,
    ) -> Result<Selection, SourceError> {
        use capibara_shared::domain::connector::storage::{compile_glob, DEFAULT_MAX_FILES};
        Ok(Selection {
            glob: glob
                .map(compile_glob)
                .transpose()
                .map_err(SourceError::Config)?,
            max_files: max_files.unwrap_or(DEFAULT_MAX_FILES) as usize,
            matched: 0,
            what,
            narrow,
        })
    }

    /// Whether `rel` is kept; an error once more than `max_files` are (a listing is never cut
    /// short silently).
    pub fn keeps(&mut self, rel: &str) -> Result<bool, SourceError> {
        if self.glob.as_ref().is_some_and(|g| !g.is_match(rel)) {
            return Ok(false);
        }
        self.matched += 1;
        if self.matched > self.max_files {
            return Err(SourceError::TooMany(format!(
                "more than {} {} match; narrow `{}` or `glob`, or raise `max_files`",
                self.max_files, self.what, self.narrow
            )));
        }
        Ok(true)
    }
}

/// The cursor key of the storage types: the newest modification time listed.
const WATERMARK: &str = "modified_after";

/// The newest item date a storage cursor holds (`modified_after`).
pub fn watermark(cursor: Option<&Value>) -> Option<chrono::DateTime<chrono::Utc>> {
    cursor
        .and_then(|c| c.get(WATERMARK))
        .and_then(Value::as_str)
        .and_then(|t| t.parse().ok())
}

/// A storage type's listing: its items, and the watermark cursor at `newest`.
pub fn storage_listing(
    items: Vec<Item>,
    newest: Option<chrono::DateTime<chrono::Utc>>,
    bytes: u64,
) -> Listing {
    Listing {
        items,
        cursor: serde_json::json!({ WATERMARK: newest }),
        bytes,
        watermark: Some(WATERMARK),
        ..Listing::default()
    }
}

/// A request's headers: the config's, with the connector's secrets at `headers.<Name>` (a
/// secret replaces a header of the same name).
pub fn headers(
    config: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> =
        config.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    for (place, value) in secrets {
        if let Some(name) = place.strip_prefix("headers.") {
            headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
            headers.push((name.to_string(), value.clone()));
        }
    }
    headers
}

/// A conditional request: the validators a cursor kept (`etag`, `last_modified`) as
/// `If-None-Match` / `If-Modified-Since`.
pub fn validators(headers: &mut Vec<(String, String)>, cursor: Option<&Value>) {
    let text = |k: &str| cursor.and_then(|c| c.get(k)).and_then(Value::as_str);
    if let Some(etag) = text("etag") {
        headers.push(("if-none-match".into(), etag.to_string()));
    }
    if let Some(lm) = text("last_modified") {
        headers.push(("if-modified-since".into(), lm.to_string()));
    }
}

/// The limits of one connector's requests: its `max_bytes` and `timeout_s`, or the defaults.
pub fn policy(
    base: &crate::http::OutboundPolicy,
    max_bytes: Option<u64>,
    timeout_s: Option<u32>,
) -> crate::http::OutboundPolicy {
    use capibara_shared::domain::connector::types::{DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT_S};
    crate::http::OutboundPolicy {
        max_response_bytes: max_bytes.unwrap_or(DEFAULT_MAX_BYTES) as usize,
        timeout: Duration::from_secs(timeout_s.unwrap_or(DEFAULT_TIMEOUT_S).into()),
        ..base.clone()
    }
}

/// What a 304 lists: nothing, and the cursor as it was.
pub fn not_modified(cursor: Option<&Value>) -> Listing {
    Listing {
        cursor: cursor.cloned().unwrap_or_else(|| serde_json::json!({})),
        not_modified: true,
        ..Listing::default()
    }
}

/// A response that is not a listing (any status but 2xx).
pub fn status(got: &crate::fetch::Got) -> SourceError {
    SourceError::Status {
        status: got.status,
        retry_after: got.retry_after,
        snippet: snippet(&got.body),
    }
}

/// The first characters of a body, for error messages.
pub fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)])
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}
