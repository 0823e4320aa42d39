//! `connector.fetch`: the new items of a connector (docs/connectors.md). The source lists what
//! it has ([`crate::sources`]); this executor keeps the new ones — not published before
//! `since`, never returned by this connector before (by content hash), at most `max_items` —
//! stores them all as `items.jsonl`, and hands the runtime the connector's record of the fetch
//! to commit with the job's success ([`Output::also`]): the cursor and the returned hashes move
//! exactly when the job succeeds (docs/connectors-design.md).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use async_trait::async_trait;
use capibara_shared::{
    artifacts::ArtifactStore,
    domain::{
        connector::{
            types::{self, ConnectorFetchInput, ConnectorFetchOutput, Item},
            Connector, FetchError,
        },
        job::JobError,
        kinds::input,
    },
    store::Append,
};
use serde_json::Value;
use uuid::Uuid;

use super::{builtin::to_output, ExecError, Executor, JobContext, Output};
use crate::{
    http::OutboundPolicy,
    sources::{self, Listing, SourceError},
};

/// The artifact with every new item.
pub const ARTIFACT: &str = "items.jsonl";

/// What the executor needs of the store: connectors, secret values, the items a connector
/// returned, and the records of its fetches.
#[async_trait]
pub trait ConnectorStore: Send + Sync {
    /// The connector `id` of `namespace`, deleted or not.
    async fn load(&self, namespace: &str, id: Uuid) -> Result<Option<Connector>, String>;
    /// The values of the namespace's secrets among `names`.
    async fn secrets(
        &self,
        namespace: &str,
        names: &[String],
    ) -> Result<HashMap<String, String>, String>;
    /// Which of `hashes` connector `id` returned before.
    async fn seen(&self, id: Uuid, hashes: &[String]) -> Result<HashSet<String>, String>;
    /// Record that the attempt failed (on the connector's stream; best effort).
    async fn failed(&self, connector: &Connector, job_id: Uuid, error: FetchError);
    /// The connector's record of a successful fetch, to commit with the job's success.
    fn fetched(
        &self,
        connector: &Connector,
        job_id: Uuid,
        items: u64,
        cursor: Value,
        hashes: Vec<String>,
        not_modified: bool,
    ) -> Result<Append, String>;
}

pub struct ConnectorFetch {
    pub store: Arc<dyn ConnectorStore>,
    /// `Err` when `CAPIBARA_ARTIFACTS` could not be opened: fetches with new items then fail.
    pub artifacts: Result<ArtifactStore, String>,
    /// Whether private addresses may be reached (`CAPIBARA_OUTBOUND_ALLOW_PRIVATE`).
    pub policy: OutboundPolicy,
    /// `CAPIBARA_FILES_ROOT`: the directory the `files` type reads (each namespace its
    /// `<root>/<namespace>/`); `None`: that type is off.
    pub files_root: Option<std::path::PathBuf>,
}

fn abort(t: &str, m: impl Into<String>) -> ExecError {
    ExecError::Abort(JobError::new(t, m))
}

fn retry(t: &str, m: impl Into<String>) -> ExecError {
    ExecError::Retryable(JobError::new(t, m))
}

/// A source's failure as what the job should do next.
fn exec_error(e: SourceError) -> ExecError {
    match e {
        SourceError::Get(e) => super::outbound_error(e, "the config's max_bytes"),
        SourceError::Status {
            status,
            retry_after,
            snippet,
        } => {
            let e = JobError::new(
                "http_status",
                format!("the source answered HTTP {status}: {snippet}"),
            );
            match (status, retry_after) {
                (408 | 429 | 500..=599, Some(d)) => ExecError::RetryAfter(d, e),
                (408 | 429 | 500..=599, None) => ExecError::Retryable(e),
                _ => ExecError::Abort(e),
            }
        }
        SourceError::Malformed(m) => abort("malformed_response", m),
        SourceError::Refused(m) => abort("robots_disallowed", m),
        SourceError::Config(m) => abort("invalid_config", m),
        SourceError::NotConfigured(m) => abort("not_configured", m),
        SourceError::NotFound(m) => abort("not_found", m),
        SourceError::Denied(m) => abort("access_denied", m),
        SourceError::TooMany(m) => abort("too_many_files", m),
        SourceError::Io(m) => retry("storage_failed", m),
    }
}

/// What a fetch reads: the connector (if one is named), its type and config, and its secrets.
struct Target {
    connector: Option<Connector>,
    connector_type: String,
    config: Value,
    secrets: BTreeMap<String, String>,
}

impl ConnectorFetch {
    async fn target(
        &self,
        namespace: &str,
        input: &ConnectorFetchInput,
    ) -> Result<Target, ExecError> {
        let Some(id) = input.connector_id else {
            return Ok(Target {
                connector: None,
                connector_type: input.connector_type.clone().unwrap_or_default(),
                config: input.config.clone().unwrap_or_default(),
                secrets: BTreeMap::new(),
            });
        };
        let c = self
            .store
            .load(namespace, id)
            .await
            .map_err(|e| retry("store_unavailable", e))?
            .filter(|c| !c.deleted)
            .ok_or_else(|| {
                abort(
                    "connector_not_found",
                    format!("no connector {id} in this namespace"),
                )
            })?;
        let names: Vec<String> = c.secrets.values().cloned().collect();
        let values = self
            .store
            .secrets(namespace, &names)
            .await
            .map_err(|e| retry("store_unavailable", e))?;
        let mut secrets = BTreeMap::new();
        for (place, name) in &c.secrets {
            let v = values.get(name).ok_or_else(|| {
                abort(
                    "secret_not_found",
                    format!("secret `{name}` (for `{place}`) does not exist in this namespace"),
                )
            })?;
            secrets.insert(place.clone(), v.clone());
        }
        Ok(Target {
            connector_type: c.connector_type.clone(),
            config: c.config.clone(),
            connector: Some(c),
            secrets,
        })
    }

    async fn list(&self, t: &Target, ctx: &JobContext) -> Result<Listing, ExecError> {
        let req = sources::Request {
            config: &t.config,
            secrets: &t.secrets,
            cursor: t.connector.as_ref().and_then(|c| c.cursor.as_ref()),
            policy: &self.policy,
            cancel: &ctx.cancel,
            namespace: &ctx.job.namespace,
            files_root: self.files_root.as_deref(),
            progress: ctx.progress.as_ref(),
        };
        match t.connector_type.as_str() {
            "api" => sources::api::list(req).await.map_err(exec_error),
            "files" => sources::files::list(req).await.map_err(exec_error),
            "s3" => sources::s3::list(req).await.map_err(exec_error),
            "graphql" => sources::graphql::list(req).await.map_err(exec_error),
            "imap" => sources::imap::list(req).await.map_err(exec_error),
            "rss" => sources::rss::list(req).await.map_err(exec_error),
            "web" => sources::web::list(req).await.map_err(exec_error),
            other => Err(abort(
                "invalid_config",
                format!(
                    "unknown connector type `{other}`; available: {}",
                    types::names().join(", ")
                ),
            )),
        }
    }
}

/// Keep what is new: published after `since`, once per content hash, never `seen`; oldest first
/// (items without a date last, in the source's order), so the rest of a cut comes next time.
fn new_items(
    items: Vec<Item>,
    since: Option<chrono::DateTime<chrono::Utc>>,
    seen: &HashSet<String>,
) -> Vec<Item> {
    let mut once = HashSet::new();
    let mut new: Vec<Item> = items
        .into_iter()
        .filter(|i| match (since, i.updated.or(i.published)) {
            (Some(s), Some(d)) => d > s,
            _ => true,
        })
        .filter(|i| !seen.contains(&i.hash) && once.insert(i.hash.clone()))
        .collect();
    new.sort_by_key(|i| {
        let d = i.published.or(i.updated);
        (d.is_none(), d)
    });
    new
}

#[async_trait]
impl Executor for ConnectorFetch {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let input: ConnectorFetchInput = input::parse(&ctx.input)
            .map_err(|e| abort("invalid_input", format!("{}: {}", e.field, e.message)))?;
        let target = self.target(&ctx.job.namespace, &input).await?;
        let listing = match self.list(&target, &ctx).await {
            Ok(l) => l,
            Err(e) => {
                if let (Some(c), Some(je)) = (&target.connector, e.job_error()) {
                    let error = FetchError {
                        error_type: je.error_type.clone(),
                        message: je.message.clone(),
                    };
                    self.store.failed(c, ctx.job_id, error).await;
                }
                return Err(e);
            }
        };
        ctx.progress
            .note(format!(
                "listed {} items ({} bytes{})",
                listing.items.len(),
                listing.bytes,
                if listing.not_modified {
                    ", not modified"
                } else {
                    ""
                }
            ))
            .await;
        let fetched = listing.items.len() as u64;
        let seen = match &target.connector {
            Some(c) => {
                let hashes: Vec<String> = listing.items.iter().map(|i| i.hash.clone()).collect();
                self.store
                    .seen(c.id, &hashes)
                    .await
                    .map_err(|e| retry("store_unavailable", e))?
            }
            None => HashSet::new(),
        };
        let mut new = new_items(listing.items, input.since, &seen);
        let max = input
            .max_items
            .unwrap_or(ConnectorFetchInput::DEFAULT_MAX_ITEMS) as usize;
        let more = new.len() > max;
        new.truncate(max);
        let mut cursor = listing.cursor;
        if let (true, Some(key)) = (more, listing.watermark) {
            // The rest are newer than what is returned (oldest first): list from there again.
            if let Some(last) = new.last().and_then(|i| i.published.or(i.updated)) {
                cursor[key] = serde_json::json!(last);
            }
        }
        if more {
            // The rest come next time: keep the old validators so the source sends them again.
            let old = target.connector.as_ref().and_then(|c| c.cursor.clone());
            for k in ["etag", "last_modified"] {
                cursor[k] = old
                    .as_ref()
                    .and_then(|o| o.get(k).cloned())
                    .unwrap_or(Value::Null);
            }
        }
        let mut artifacts = Vec::new();
        if !new.is_empty() {
            let store = self
                .artifacts
                .as_ref()
                .map_err(|e| abort("artifact_store", e.clone()))?;
            let mut jsonl = Vec::new();
            for item in &new {
                serde_json::to_writer(&mut jsonl, item).expect("items serialize");
                jsonl.push(b'\n');
            }
            artifacts.push(
                store
                    .put(ctx.job_id, ARTIFACT, "application/x-ndjson", jsonl)
                    .await
                    .map_err(|e| retry("artifact_store", e.to_string()))?,
            );
            // The files of the items returned (an email's attachments).
            let kept: HashSet<&str> = new.iter().map(|i| i.id.as_str()).collect();
            for a in listing.attachments {
                if kept.contains(a.item.as_str()) {
                    artifacts.push(
                        store
                            .put(ctx.job_id, &a.name, &a.media_type, a.bytes)
                            .await
                            .map_err(|e| retry("artifact_store", e.to_string()))?,
                    );
                }
            }
        }
        let hashes: Vec<String> = new.iter().map(|i| i.hash.clone()).collect();
        let inline = input
            .inline_items
            .unwrap_or(ConnectorFetchInput::DEFAULT_INLINE_ITEMS) as usize;
        let output = ConnectorFetchOutput {
            fetched,
            new_items: new.len() as u64,
            items: new.into_iter().take(inline).collect(),
            artifact: (!artifacts.is_empty()).then(|| ARTIFACT.to_string()),
            cursor: cursor.clone(),
            not_modified: listing.not_modified,
            more,
        };
        let also = match &target.connector {
            Some(c) => vec![self
                .store
                .fetched(c, ctx.job_id, fetched, cursor, hashes, listing.not_modified)
                .map_err(|e| abort("invalid_output", e))?],
            None => Vec::new(),
        };
        Ok(Output {
            output: to_output(output),
            artifacts,
            also,
        })
    }

    /// A fetch only reads; its record commits with the job's success, so a second run of an
    /// attempt is harmless.
    fn repeatable(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(hash: &str, published: Option<&str>) -> Item {
        Item {
            id: hash.into(),
            hash: hash.into(),
            title: None,
            url: None,
            summary: None,
            content: None,
            published: published.map(|p| p.parse().unwrap()),
            updated: None,
            authors: vec![],
            categories: vec![],
            fields: Default::default(),
            data: None,
        }
    }

    #[test]
    fn new_items_drop_the_seen_the_repeated_and_the_old_and_come_oldest_first() {
        let items = vec![
            item("c", Some("2026-12-03T00:00:00Z")),
            item("b", Some("2026-12-02T00:00:00Z")),
            item("a", Some("2026-11-01T00:00:00Z")),
            item("n", None),
            item("b", Some("2026-12-02T00:00:00Z")),
            item("s", Some("2026-12-04T00:00:00Z")),
        ];
        let seen: HashSet<String> = ["s".to_string()].into();
        let since = Some("2026-12-01T00:00:00Z".parse().unwrap());
        let hashes: Vec<String> = new_items(items, since, &seen)
            .into_iter()
            .map(|i| i.hash)
            .collect();
        assert_eq!(hashes, vec!["b", "c", "n"]);
    }
}
