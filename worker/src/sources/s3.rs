//! `s3`: objects of an S3-compatible bucket, listed and read with the object_store library
//! (SigV4 signing, ListObjectsV2 paging, retries). Its HTTP client is ours: pinned to the
//! endpoint's addresses as the SSRF guard checked them, so the library never resolves the name
//! again. Objects modified before the cursor's `modified_after` are not read again; the others
//! are read (up to `max_file_bytes`), typed and their text extracted ([`super::document`]).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use capibara_shared::{
    domain::connector::storage::{S3Config, DEFAULT_MAX_FILE_BYTES},
    outbound,
};
use futures::StreamExt;
use object_store::{
    aws::AmazonS3Builder,
    client::{HttpClient, HttpConnector},
    path::Path as ObjectPath,
    ClientOptions, ObjectMeta, ObjectStore, RetryConfig,
};

use super::{document, Listing, Request, SourceError};
use crate::{
    fetch::GetError,
    http::{pinned_client, HttpError},
};

/// The object_store client: our pinned reqwest client.
#[derive(Debug)]
struct Pinned(reqwest::Client);

impl HttpConnector for Pinned {
    fn connect(&self, _: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(self.0.clone()))
    }
}

pub async fn list(req: Request<'_>) -> Result<Listing, SourceError> {
    let config: S3Config = serde_json::from_value(req.config.clone())
        .map_err(|e| SourceError::Config(e.to_string()))?;
    let region = config.region.as_deref().unwrap_or("us-east-1");
    let endpoint = config
        .endpoint
        .clone()
        .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
    let policy = super::policy(req.policy, None, config.timeout_s);
    let started = Instant::now();
    let url = outbound::parse_url(&endpoint).map_err(|e| GetError::Http(e.into()))?;
    let addrs = outbound::resolve(&url, policy.allow_private)
        .await
        .map_err(|e| GetError::Http(HttpError::from(e)))?;
    let client = pinned_client(&policy, &url, &addrs).map_err(GetError::Http)?;
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&config.bucket)
        .with_region(region)
        .with_endpoint(endpoint.trim_end_matches('/'))
        .with_virtual_hosted_style_request(false)
        .with_allow_http(url.scheme() == "http")
        .with_http_connector(Pinned(client))
        .with_client_options(ClientOptions::new().with_timeout(policy.timeout))
        .with_retry(RetryConfig {
            max_retries: 2,
            retry_timeout: policy.timeout,
            ..RetryConfig::default()
        });
    let secret = |k: &str| req.secrets.get(&format!("auth.{k}"));
    match (secret("access_key_id"), secret("secret_access_key")) {
        (Some(id), Some(key)) => {
            builder = builder.with_access_key_id(id).with_secret_access_key(key);
            if let Some(t) = secret("session_token") {
                builder = builder.with_token(t);
            }
        }
        (None, None) => builder = builder.with_skip_signature(true),
        _ => {
            return Err(SourceError::Config(
                "give both `auth.access_key_id` and `auth.secret_access_key`, or neither".into(),
            ))
        }
    }
    let store: Arc<dyn ObjectStore> = Arc::new(builder.build().map_err(storage_error)?);

    let fut = read(&req, &config, store, started, policy.timeout);
    tokio::time::timeout(policy.timeout, fut)
        .await
        .map_err(|_| GetError::Http(HttpError::Timeout))?
}

async fn read(
    req: &Request<'_>,
    config: &S3Config,
    store: Arc<dyn ObjectStore>,
    started: Instant,
    timeout: Duration,
) -> Result<Listing, SourceError> {
    let mark = super::watermark(req.cursor);
    let mut selection = super::Selection::new(
        config.glob.as_deref(),
        config.max_files,
        "objects",
        "prefix",
    )?;
    let max_bytes = config.max_file_bytes.unwrap_or(DEFAULT_MAX_FILE_BYTES);
    let prefix = (!config.prefix.is_empty()).then(|| ObjectPath::from(config.prefix.as_str()));
    let mut listed = store.list(prefix.as_ref());
    let mut found: Vec<ObjectMeta> = Vec::new();
    while let Some(meta) = listed.next().await {
        if req.cancel.is_cancelled() {
            return Err(GetError::Canceled.into());
        }
        let meta = meta.map_err(storage_error)?;
        let rel = relative(&meta.location, prefix.as_ref());
        if !selection.keeps(&rel)? {
            continue;
        }
        if mark.is_some_and(|m| meta.last_modified < m) {
            continue;
        }
        found.push(meta);
    }
    let total = found.len();
    let (mut items, mut bytes, mut newest) = (Vec::with_capacity(total), 0u64, mark);
    let mut reporter = super::Reporter::default();
    for meta in found {
        if req.cancel.is_cancelled() {
            return Err(GetError::Canceled.into());
        }
        let body = if config.extract && meta.size <= max_bytes {
            get(&store, &meta.location, max_bytes).await?
        } else {
            None
        };
        bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        newest = newest.max(Some(meta.last_modified));
        let rel = relative(&meta.location, prefix.as_ref());
        items.push(document::item(document::File {
            path: &rel,
            url: Some(format!("s3://{}/{}", config.bucket, meta.location)),
            modified: meta.last_modified,
            size: meta.size,
            bytes: body.as_deref(),
        }));
        let done = items.len();
        if done < total {
            reporter
                .report(req, done as u64, Some(total as u64), || {
                    format!(
                        "read {done} of {total} objects ({:.0} s of the {} s allowed)",
                        started.elapsed().as_secs_f64(),
                        timeout.as_secs()
                    )
                })
                .await;
        }
    }
    Ok(super::storage_listing(items, newest, bytes))
}

/// An object's bytes, read as a stream and cut off past `max` (the listing's size is the
/// server's word; the body is counted). `None`: it vanished since the listing, or outgrew `max`.
async fn get(
    store: &Arc<dyn ObjectStore>,
    at: &ObjectPath,
    max: u64,
) -> Result<Option<Vec<u8>>, SourceError> {
    let got = match store.get(at).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(storage_error(e)),
    };
    let mut stream = got.into_stream();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(storage_error)?;
        if (out.len() + chunk.len()) as u64 > max {
            return Ok(None);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Some(out))
}

/// A key after the prefix, as the glob and the item's path see it.
fn relative(at: &ObjectPath, prefix: Option<&ObjectPath>) -> String {
    match prefix {
        Some(p) => at
            .prefix_match(p)
            .map(|parts| {
                parts
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .unwrap_or_else(|| at.to_string()),
        None => at.to_string(),
    }
}

fn storage_error(e: object_store::Error) -> SourceError {
    match e {
        object_store::Error::NotFound { .. } => {
            SourceError::NotFound(format!("the bucket or object does not exist: {e}"))
        }
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => SourceError::Denied(e.to_string()),
        other => match status_of(&other) {
            Some(404) => SourceError::NotFound(format!("the bucket does not exist: {other}")),
            Some(401 | 403) => SourceError::Denied(other.to_string()),
            _ => SourceError::Io(other.to_string()),
        },
    }
}

/// The HTTP status a `Generic` error reports. object_store types the errors of single-object
/// calls (`NotFound`, `PermissionDenied`), but a failed listing is `Generic`, its status only
/// in the message ("… non-2xx status code: 404 Not Found …").
fn status_of(e: &object_store::Error) -> Option<u16> {
    let text = e.to_string();
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_errors_are_typed_by_the_status_they_report() {
        let generic = |m: &str| object_store::Error::Generic {
            store: "S3",
            source: m.to_string().into(),
        };
        let kind = |m: &str| match storage_error(generic(m)) {
            SourceError::NotFound(_) => "not_found",
            SourceError::Denied(_) => "denied",
            SourceError::Io(_) => "io",
            _ => "other",
        };
        assert_eq!(
            kind("Error performing list request: Server returned non-2xx status code: 404 Not Found: <Error><Code>NoSuchBucket</Code></Error>"),
            "not_found"
        );
        assert_eq!(kind("… non-2xx status code: 403 Forbidden: …"), "denied");
        assert_eq!(kind("… non-2xx status code: 503 Slow Down"), "io");
        assert_eq!(kind("connection refused"), "io");
    }
}
