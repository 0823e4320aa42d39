//! `files`: files under the namespace's directory of `CAPIBARA_FILES_ROOT`, walked by walkdir
//! (symbolic links are neither followed nor listed), matched by a glob (globset). Files
//! modified before the cursor's `modified_after` are not read again; the others are read, typed
//! and their text extracted ([`super::document`]).

use std::{
    io::Read,
    path::{Path, PathBuf},
};

use capibara_shared::domain::connector::{
    storage::{FilesConfig, DEFAULT_MAX_FILE_BYTES},
    types::Item,
};
use chrono::{DateTime, Utc};

use super::{document, Listing, Request, SourceError};
use crate::fetch::GetError;

/// Files read per blocking batch (between batches: cancel checked, progress reported).
const BATCH: usize = 256;

/// A file the walk found.
struct Found {
    rel: String,
    abs: PathBuf,
    size: u64,
    modified: DateTime<Utc>,
}

pub async fn list(req: Request<'_>) -> Result<Listing, SourceError> {
    let config: FilesConfig = serde_json::from_value(req.config.clone())
        .map_err(|e| SourceError::Config(e.to_string()))?;
    let root = req.files_root.ok_or_else(|| {
        SourceError::NotConfigured(
            "the `files` type is off: the workers' operator has not set CAPIBARA_FILES_ROOT".into(),
        )
    })?;
    let mark = super::watermark(req.cursor);
    let dir = root.join(req.namespace);
    let base = dir.join(&config.path);
    let (found, unchanged) = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || walk(&dir, &base, &config, mark))
            .await
            .map_err(|e| SourceError::Io(e.to_string()))??
    };
    let total = found.len();
    let max_bytes = config.max_file_bytes.unwrap_or(DEFAULT_MAX_FILE_BYTES);
    let mut items = Vec::with_capacity(total);
    let mut bytes = 0u64;
    let mut newest = mark;
    let mut reporter = super::Reporter::default();
    let mut batches = found.into_iter().peekable();
    while batches.peek().is_some() {
        if req.cancel.is_cancelled() {
            return Err(GetError::Canceled.into());
        }
        let batch: Vec<Found> = batches.by_ref().take(BATCH).collect();
        let extract = config.extract;
        let (read, n) = tokio::task::spawn_blocking(move || read_batch(batch, extract, max_bytes))
            .await
            .map_err(|e| SourceError::Io(e.to_string()))?;
        bytes += n;
        for item in &read {
            newest = newest.max(item.updated);
        }
        items.extend(read);
        let done = items.len();
        if done < total {
            reporter
                .report(&req, done as u64, Some(total as u64), || {
                    format!("read {done} of {total} files")
                })
                .await;
        }
    }
    tracing::debug!(listed = total, unchanged, "files walked");
    Ok(super::storage_listing(items, newest, bytes))
}

/// The files under `base` (which must be a directory inside `dir`) that match, modified at or
/// after `mark`, in path order; and how many matched but were older.
fn walk(
    dir: &Path,
    base: &Path,
    config: &FilesConfig,
    mark: Option<DateTime<Utc>>,
) -> Result<(Vec<Found>, usize), SourceError> {
    let missing = || {
        SourceError::NotFound(format!(
            "`{}` is not a directory in this namespace's files directory",
            if config.path.is_empty() {
                "."
            } else {
                &config.path
            }
        ))
    };
    // A symbolic link among the path's parts could lead out of the namespace's directory.
    let dir = dir.canonicalize().map_err(|_| missing())?;
    let base = base.canonicalize().map_err(|_| missing())?;
    if !base.starts_with(&dir) || !base.is_dir() {
        return Err(missing());
    }
    let mut selection =
        super::Selection::new(config.glob.as_deref(), config.max_files, "files", "path")?;
    let mut walker = walkdir::WalkDir::new(&base)
        .follow_links(false)
        .sort_by_file_name();
    if !config.recursive {
        walker = walker.max_depth(1);
    }
    let (mut found, mut unchanged) = (Vec::new(), 0usize);
    for entry in walker {
        let entry = entry.map_err(|e| SourceError::Io(e.to_string()))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let Ok(rel) = entry.path().strip_prefix(&base) else {
            continue;
        };
        let Some(rel) = rel
            .to_str()
            .map(|r| r.replace(std::path::MAIN_SEPARATOR, "/"))
        else {
            continue; // not UTF-8: cannot be named in an item
        };
        if !selection.keeps(&rel)? {
            continue;
        }
        let meta = entry
            .metadata()
            .map_err(|e| SourceError::Io(e.to_string()))?;
        let modified: DateTime<Utc> = meta
            .modified()
            .map(DateTime::from)
            .unwrap_or_else(|_| Utc::now());
        if mark.is_some_and(|m| modified < m) {
            unchanged += 1;
            continue;
        }
        found.push(Found {
            rel,
            abs: entry.into_path(),
            size: meta.len(),
            modified,
        });
    }
    Ok((found, unchanged))
}

/// Read and type a batch of files; the bytes read. A file that vanished since the walk is left
/// out; one that grew past the limit is listed unread.
fn read_batch(batch: Vec<Found>, extract: bool, max_bytes: u64) -> (Vec<Item>, u64) {
    let mut out = Vec::with_capacity(batch.len());
    let mut total = 0;
    for f in batch {
        let mut bytes = None;
        if extract && f.size <= max_bytes {
            let mut buf = Vec::with_capacity(f.size as usize);
            match std::fs::File::open(&f.abs)
                .and_then(|h| h.take(max_bytes + 1).read_to_end(&mut buf))
            {
                Ok(n) if n as u64 <= max_bytes => {
                    total += n as u64;
                    bytes = Some(buf);
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(_) => {}
            }
        }
        out.push(document::item(document::File {
            path: &f.rel,
            url: None,
            modified: f.modified,
            size: f.size,
            bytes: bytes.as_deref(),
        }));
    }
    (out, total)
}
