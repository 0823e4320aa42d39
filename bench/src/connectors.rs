//! `capibara bench-connectors`: `connector.fetch` on a local feed of N items (10,000 by
//! default): items/s of a first fetch (everything new: download, parse, hash, dedupe, write
//! items.jsonl, record the hashes), and the cost of an incremental fetch with nothing new —
//! the feed answering 304 to the stored ETag, and the same feed without validators (downloaded
//! and parsed again, every item already seen). Then the same for a directory of N files
//! (10,000 by default) read by the `files` type.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use anyhow::{bail, Result};
use axum::{extract::State, http::HeaderMap, response::IntoResponse, routing::get, Router};
use clap::Args;
use serde_json::{json, Value};

use crate::harness::{named_dir, percentile, profile, sorted, Env, Facts};

#[derive(Args)]
pub struct ConnectorBenchArgs {
    /// Items in the feed.
    #[arg(long, default_value_t = 10_000)]
    items: usize,
    /// Incremental fetches measured (each case).
    #[arg(long, default_value_t = 20)]
    fetches: usize,
    /// Files in the directory of the `files` case.
    #[arg(long, default_value_t = 10_000)]
    files: usize,
    /// Run Postgres with fsync/synchronous_commit off (not durable), to see the commit cost.
    #[arg(long)]
    unsafe_pg: bool,
}

struct Feed {
    body: String,
    /// Whether the feed sends an ETag (and answers 304 to it).
    validators: AtomicBool,
}

async fn feed(State(f): State<Arc<Feed>>, headers: HeaderMap) -> axum::response::Response {
    let etag = "\"v1\"";
    if !f.validators.load(Ordering::Relaxed) {
        return ([("content-type", "application/rss+xml")], f.body.clone()).into_response();
    }
    if headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some(etag) {
        return (axum::http::StatusCode::NOT_MODIFIED, [("etag", etag)]).into_response();
    }
    (
        [("content-type", "application/rss+xml"), ("etag", etag)],
        f.body.clone(),
    )
        .into_response()
}

fn rss(n: usize) -> String {
    let mut s = String::from(
        r#"<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel><title>Bench</title><link>http://bench.test/</link><description>d</description>"#,
    );
    for k in 0..n {
        s.push_str(&format!(
            "<item><title>Post number {k}</title><link>http://bench.test/posts/{k}</link><guid>g{k}</guid>\
             <pubDate>Tue, 01 Dec 2026 {:02}:{:02}:00 GMT</pubDate><description>Summary of post {k}: a few words \
             about it, long enough to look like a real one.</description></item>",
            (k / 60) % 24,
            k % 60
        ));
    }
    s.push_str("</channel></rss>");
    s
}

/// One fetch with `Prefer: wait`: (client wall ms, job run ms, output).
async fn fetch(env: &Env, input: Value) -> Result<(f64, f64, Value)> {
    let t = Instant::now();
    let r = env
        .http
        .post(env.api("/v1/jobs"))
        .header("prefer", "wait=60")
        .json(&json!({"kind": "connector.fetch", "input": input, "max_attempts": 1}))
        .send()
        .await?;
    let wall = t.elapsed().as_secs_f64() * 1000.0;
    let job: Value = r.json().await?;
    if job["status"] != "succeeded" {
        bail!("the fetch did not succeed: {job}");
    }
    let at = |k: &str| {
        job[k]
            .as_str()
            .and_then(|s| s.parse::<chrono::DateTime<chrono::Utc>>().ok())
    };
    let run = match (at("started_at"), at("finished_at")) {
        (Some(s), Some(f)) => (f - s).num_microseconds().unwrap_or(0) as f64 / 1000.0,
        _ => f64::NAN,
    };
    Ok((wall, run, job["output"].clone()))
}

fn line(what: &str, v: &[f64]) {
    let v = sorted(v.to_vec());
    println!(
        "  {what}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} fetches)",
        percentile(&v, 0.50),
        percentile(&v, 0.99),
        v.last().copied().unwrap_or(f64::NAN),
        v.len()
    );
}

pub async fn run(a: ConnectorBenchArgs) -> Result<()> {
    let facts = Facts::collect();
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let dir = named_dir(&bin_dir, "connectors");
    std::fs::create_dir_all(&dir)?;
    println!(
        "capibara bench-connectors — {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    println!("machine: {}", facts.machine());
    println!(
        "build: {}; a local RSS feed of {} items on loopback; 1 worker; postgres {}",
        profile(),
        a.items,
        if a.unsafe_pg {
            "fsync off (not durable)"
        } else {
            "durable commits"
        }
    );
    let feed_state = Arc::new(Feed {
        body: rss(a.items),
        validators: AtomicBool::new(true),
    });
    println!("feed: {:.1} MB", feed_state.body.len() as f64 / 1e6);
    let app = Router::new()
        .route("/feed.xml", get(feed))
        .with_state(feed_state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/feed.xml", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let files_root = dir.join("files");
    let _ = std::fs::remove_dir_all(&files_root);
    let mut env = Env::start_with(
        a.unsafe_pg,
        32,
        vec![
            ("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()),
            (
                "CAPIBARA_FILES_ROOT".into(),
                files_root.to_string_lossy().into_owned(),
            ),
        ],
        &dir,
        &bin_dir,
    )
    .await?;
    env.spawn_worker("worker-1").await?;
    let r: Value = env
        .http
        .post(env.api("/v1/connectors"))
        .json(&json!({"name": "bench", "type": "rss", "config": {"url": url, "max_bytes": 104_857_600}}))
        .send()
        .await?
        .json()
        .await?;
    let Some(id) = r["id"].as_str().map(str::to_string) else {
        bail!("creating the connector: {r}");
    };
    // Warm-up: an inline fetch of the same feed (nothing is remembered).
    fetch(
        &env,
        json!({"type": "rss", "config": {"url": url, "max_bytes": 104_857_600}, "max_items": 100_000, "inline_items": 0}),
    )
    .await?;

    let (wall, run, out) = fetch(
        &env,
        json!({"connector_id": id, "max_items": 100_000, "inline_items": 0}),
    )
    .await?;
    let n = out["new_items"].as_u64().unwrap_or(0);
    println!("first fetch, every item new ({n} items):");
    println!(
        "  client wall {wall:.0} ms = {:.0} items/s; job run {run:.0} ms = {:.0} items/s",
        n as f64 / (wall / 1000.0),
        n as f64 / (run / 1000.0)
    );

    let (mut walls, mut runs) = (Vec::new(), Vec::new());
    for _ in 0..a.fetches {
        let (w, r, out) = fetch(&env, json!({"connector_id": id})).await?;
        if out["not_modified"] != true || out["new_items"] != 0 {
            bail!("expected a 304 with nothing new: {out}");
        }
        walls.push(w);
        runs.push(r);
    }
    println!("nothing new, the feed answers 304 (target: ≤ 20 ms):");
    line("client wall (POST with Prefer: wait → answer)", &walls);
    line("job run (started → finished)", &runs);

    feed_state.validators.store(false, Ordering::Relaxed);
    let (mut walls, mut runs) = (Vec::new(), Vec::new());
    for _ in 0..a.fetches.min(5) {
        let (w, r, out) = fetch(&env, json!({"connector_id": id})).await?;
        if out["new_items"] != 0 {
            bail!("expected nothing new: {out}");
        }
        walls.push(w);
        runs.push(r);
    }
    println!("nothing new, no validators (download, parse and dedupe {n} seen items):");
    line("client wall", &walls);
    line("job run", &runs);
    files(&env, &files_root, &a).await
}

/// The `files` case: a directory of N small text and Markdown files in 100 subdirectories.
async fn files(env: &Env, root: &std::path::Path, a: &ConnectorBenchArgs) -> Result<()> {
    let base = root.join("default").join("bench");
    let mut bytes = 0usize;
    for k in 0..a.files {
        let sub = base.join(format!("d{:02}", k % 100));
        std::fs::create_dir_all(&sub)?;
        let (name, body) = if k % 2 == 0 {
            (
                format!("note-{k}.md"),
                format!("# Note {k}\n\nA few lines about item {k}, long enough to look like a real note, with a [link](https://example.org/{k}).\n"),
            )
        } else {
            (
                format!("log-{k}.txt"),
                format!(
                    "entry {k}: the job ran, wrote its output and finished without an error.\n"
                ),
            )
        };
        bytes += body.len();
        std::fs::write(sub.join(name), body)?;
    }
    println!(
        "files: a directory of {} files ({:.1} MB, .md and .txt in 100 subdirectories)",
        a.files,
        bytes as f64 / 1e6
    );
    let r: Value = env
        .http
        .post(env.api("/v1/connectors"))
        .json(&json!({"name": "bench files", "type": "files", "config": {"path": "bench"}}))
        .send()
        .await?
        .json()
        .await?;
    let Some(id) = r["id"].as_str().map(str::to_string) else {
        bail!("creating the files connector: {r}");
    };
    // Warm-up (and the page cache): an inline fetch of the same directory.
    fetch(
        env,
        json!({"type": "files", "config": {"path": "bench"}, "max_items": 100_000, "inline_items": 0}),
    )
    .await?;
    let (wall, run, out) = fetch(
        env,
        json!({"connector_id": id, "max_items": 100_000, "inline_items": 0}),
    )
    .await?;
    let n = out["new_items"].as_u64().unwrap_or(0);
    println!("first fetch, every file new ({n} files read, typed, text extracted):");
    println!(
        "  client wall {wall:.0} ms = {:.0} files/s; job run {run:.0} ms = {:.0} files/s",
        n as f64 / (wall / 1000.0),
        n as f64 / (run / 1000.0)
    );
    let (mut walls, mut runs) = (Vec::new(), Vec::new());
    for _ in 0..a.fetches.min(10) {
        let (w, r, out) = fetch(env, json!({"connector_id": id})).await?;
        if out["new_items"] != 0 {
            bail!("expected nothing new: {out}");
        }
        walls.push(w);
        runs.push(r);
    }
    println!("nothing new (the directory walked, no file older than the cursor opened):");
    line("client wall", &walls);
    line("job run", &runs);
    Ok(())
}
