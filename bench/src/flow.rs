//! `capibara-bench flow`: what flow control costs, and what fairness buys (issue 20 items 3
//! and 10; docs/flow-control.md, docs/benchmarks.md).
//!
//! One private stack ([`Env`]) and one `capibara-worker`. Echo jobs spread over `--keys`
//! tenants (`tags.tenant`).
//!
//! 1. **Throughput, no limits:** `--jobs` jobs submitted in batches while the worker runs them,
//!    from the first submit until the last has succeeded (after a warm-up round of the same).
//! 2. **Throughput with limits:** the same after `PUT /v1/limits/per-tenant` (`max_running: 2`
//!    per tenant) and `PUT /v1/limits/global` (a rate of 100,000/s: checked on every start,
//!    never binding), then once more without them (the tables grow from run to run). The loss
//!    against the mean of the two runs without limits is the figure (target ≤ 15 %).
//! 3. **Enqueue→start under the limits** at a paced `--rate` submits/s (each job under its
//!    tenant's limit): p50 and p99 from the job rows (`queued_at` → `started_at`).
//! 4. **Fairness:** namespace `big` queues `--backlog` jobs before any worker runs; then the
//!    worker starts and namespace `small` submits one job: its enqueue→start, and how many of
//!    the backlog were still queued when it started.
//!
//! A measuring command, not a test: it fails only when the system does not work at all.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use clap::Args;
use reqwest::Client;
use serde_json::{json, Value};

use crate::harness::{
    named_dir, percentile, print_header, run_dir, server_bin_dir, sorted, Env, Facts,
};

/// `capibara-bench flow` options.
#[derive(Args, Debug)]
pub struct FlowBenchArgs {
    /// Jobs per throughput phase.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Tenants the jobs are spread over.
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// `--concurrency` of the worker.
    #[arg(long, default_value_t = 64)]
    worker_concurrency: usize,
    /// Paced submit rate of the latency phase, jobs/s.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Length of the latency phase, seconds.
    #[arg(long, default_value_t = 10.0)]
    latency_secs: f64,
    /// The big tenant's backlog in the fairness phase.
    #[arg(long, default_value_t = 100_000)]
    backlog: usize,
    /// Smoke test: a tenth of the jobs, the backlog and the latency phase.
    #[arg(long)]
    quick: bool,
    /// Run Postgres with fsync/synchronous_commit/full_page_writes off (not durable).
    #[arg(long)]
    unsafe_pg: bool,
    /// Directory for the servers' data and logs.
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub async fn run(mut a: FlowBenchArgs) -> Result<()> {
    if a.quick {
        a.jobs = (a.jobs / 10).max(1);
        a.backlog = (a.backlog / 10).max(1);
        a.latency_secs /= 10.0;
    }
    if a.jobs == 0 || a.keys == 0 || a.rate == 0 || a.worker_concurrency == 0 {
        bail!("--jobs, --keys, --rate and --worker-concurrency must be positive");
    }
    let bin_dir = server_bin_dir()?;
    let dir = run_dir(a.dir.as_ref(), named_dir(&bin_dir, "flow"))?;
    let facts = Facts::collect();
    print_header("capibara-bench flow", &facts, a.unsafe_pg, "");
    println!(
        "jobs per phase: {}; tenants: {}; worker concurrency: {}; backlog: {}",
        a.jobs, a.keys, a.worker_concurrency, a.backlog
    );
    let mut env = Env::start_with(
        a.unsafe_pg,
        a.worker_concurrency,
        Vec::new(),
        &dir,
        &bin_dir,
    )
    .await?;
    env.spawn_worker("worker").await?;

    // Warm up (connections, caches, the first pages of each table), then measure.
    throughput(&env, &a, "warmup").await?;
    let free = throughput(&env, &a, "free").await?;
    println!("1. no limits: {free:.0} jobs/s");
    put(
        &env.http,
        &env.api("/v1/limits/per-tenant"),
        json!({"key": "tags.tenant", "max_running": 2}),
    )
    .await?;
    put(
        &env.http,
        &env.api("/v1/limits/global"),
        json!({"rate": {"count": 100_000, "period_s": 1}}),
    )
    .await?;
    // Every process learns of a new limit within a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let limited = throughput(&env, &a, "limited").await?;
    // And without them again: the tables grew meanwhile, so the loss is against the mean of the
    // runs before and after.
    for name in ["per-tenant", "global"] {
        let url = env.api(&format!("/v1/limits/{name}"));
        let r = env.http.delete(&url).send().await?;
        if !r.status().is_success() {
            bail!("DELETE {url}: {}", r.status());
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let free_after = throughput(&env, &a, "free-after").await?;
    println!("1b. no limits again: {free_after:.0} jobs/s");
    let free = (free + free_after) / 2.0;
    let loss = 100.0 * (1.0 - limited / free);
    println!(
        "2. with {} keys × max_running 2 and a global rate: {limited:.0} jobs/s ({loss:.1} % less)",
        a.keys
    );

    let (p50, p99, n) = latency(&env, &a).await?;
    println!(
        "3. enqueue→start under the limits at {}/s: p50 {p50:.2} ms, p99 {p99:.2} ms ({n} jobs)",
        a.rate
    );

    let (waited, left) = fairness(&mut env, &a).await?;
    println!(
        "4. one job of another tenant behind a {}-job backlog: started {waited:.1} ms after it was queued, with {left} of the backlog still queued",
        a.backlog
    );

    println!("\n| figure | value |\n|---|---|");
    println!("| end to end, no limits (mean of the runs before and after) | {free:.0} jobs/s |");
    println!(
        "| end to end, {} keys × `max_running: 2` + a global rate | {limited:.0} jobs/s ({loss:.1} % less) |",
        a.keys
    );
    println!(
        "| enqueue→start of a job under its limits, at {}/s, p50 / p99 | {p50:.2} / {p99:.2} ms |",
        a.rate
    );
    println!(
        "| enqueue→start of one job behind another namespace's {}-job backlog | {waited:.1} ms ({left} still queued) |",
        a.backlog
    );
    drop(env);
    Ok(())
}

async fn put(http: &Client, url: &str, body: Value) -> Result<()> {
    let r = http.put(url).json(&body).send().await?;
    if !r.status().is_success() {
        bail!("PUT {url}: {} {}", r.status(), r.text().await?);
    }
    Ok(())
}

async fn post_batch(http: &Client, url: &str, jobs: Vec<Value>) -> Result<()> {
    let r = http.post(url).json(&json!({ "jobs": jobs })).send().await?;
    if r.status().as_u16() != 202 {
        bail!("POST {url}: {} {}", r.status(), r.text().await?);
    }
    Ok(())
}

/// Jobs/s from the first submit until all `a.jobs` of `phase` succeeded.
async fn throughput(env: &Env, a: &FlowBenchArgs, phase: &str) -> Result<f64> {
    let started = Instant::now();
    let url = env.api("/v1/jobs/batch");
    for chunk in (0..a.jobs).collect::<Vec<_>>().chunks(1000) {
        let jobs = chunk
            .iter()
            .map(|i| {
                json!({"kind": "echo", "input": {"i": i},
                            "tags": {"phase": phase, "tenant": format!("t{}", i % a.keys)}})
            })
            .collect();
        post_batch(&env.http, &url, jobs).await?;
    }
    wait_done(env, phase, a.jobs, Duration::from_secs(600)).await?;
    Ok(a.jobs as f64 / started.elapsed().as_secs_f64())
}

async fn wait_done(env: &Env, phase: &str, n: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let (done,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM jobs WHERE tags->>'phase' = $1 AND status = 'succeeded'",
        )
        .bind(phase)
        .fetch_one(&env.pool)
        .await?;
        if done as usize >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("phase {phase}: {done} of {n} jobs succeeded in {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// p50, p99 (ms) and count of enqueue→start at a paced rate, each job under its limits.
async fn latency(env: &Env, a: &FlowBenchArgs) -> Result<(f64, f64, usize)> {
    let n = ((a.rate as f64) * a.latency_secs).max(1.0) as usize;
    let every = Duration::from_secs_f64(1.0 / a.rate as f64);
    let url = env.api("/v1/jobs");
    let mut tick = tokio::time::interval(every);
    let mut sent = Vec::new();
    for i in 0..n {
        tick.tick().await;
        let http = env.http.clone();
        let url = url.clone();
        let body = json!({"kind": "echo", "tags": {"phase": "latency", "tenant": format!("t{}", i % a.keys)}});
        sent.push(tokio::spawn(async move {
            http.post(url).json(&body).send().await
        }));
    }
    for s in sent {
        s.await??;
    }
    wait_done(env, "latency", n, Duration::from_secs(120)).await?;
    let rows: Vec<(f64,)> = sqlx::query_as(
        "SELECT EXTRACT(EPOCH FROM (started_at - queued_at))::float8 * 1000 FROM jobs
         WHERE tags->>'phase' = 'latency'",
    )
    .fetch_all(&env.pool)
    .await?;
    let ms = sorted(rows.into_iter().map(|(v,)| v).collect());
    Ok((percentile(&ms, 0.5), percentile(&ms, 0.99), ms.len()))
}

/// A key of namespace `ns` that may submit and read.
async fn key_for(env: &Env, ns: &str) -> Result<Client> {
    let r = env
        .http
        .post(env.api("/v1/api-keys"))
        .json(&json!({"name": ns, "roles": ["submit", "read"], "namespace": ns}))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!(
            "creating a key for {ns}: {} {}",
            r.status(),
            r.text().await?
        );
    }
    let key: Value = r.json().await?;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {}", key["key"].as_str().unwrap_or_default()).parse()?,
    );
    Ok(Client::builder().default_headers(headers).build()?)
}

/// The small tenant's enqueue→start (ms) behind the big one's backlog, and how much of the
/// backlog was still queued then.
async fn fairness(env: &mut Env, a: &FlowBenchArgs) -> Result<(f64, i64)> {
    // Stop the worker, so that the backlog is all queued before anything runs.
    for p in env.procs.iter_mut().filter(|p| p.name == "worker") {
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
    env.procs.retain(|p| p.name != "worker");
    let big = key_for(env, "big").await?;
    let small = key_for(env, "small").await?;
    let url = env.api("/v1/jobs/batch");
    for chunk in (0..a.backlog).collect::<Vec<_>>().chunks(1000) {
        let jobs = chunk
            .iter()
            .map(|i| json!({"kind": "echo", "input": {"i": i}, "tags": {"phase": "backlog"}}))
            .collect();
        post_batch(&big, &url, jobs).await?;
    }
    env.spawn_worker("worker-2").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = small
        .post(env.api("/v1/jobs"))
        .json(&json!({"kind": "echo", "tags": {"phase": "small"}}))
        .send()
        .await?;
    if r.status().as_u16() != 202 {
        bail!("the small tenant's submit: {}", r.status());
    }
    wait_done(env, "small", 1, Duration::from_secs(300)).await?;
    let (waited, started_at): (f64, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
        "SELECT EXTRACT(EPOCH FROM (started_at - queued_at))::float8 * 1000, started_at
         FROM jobs WHERE tags->>'phase' = 'small'",
    )
    .fetch_one(&env.pool)
    .await?;
    let (left,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM jobs WHERE tags->>'phase' = 'backlog'
           AND (started_at IS NULL OR started_at > $1)",
    )
    .bind(started_at)
    .fetch_one(&env.pool)
    .await?;
    Ok((waited, left))
}
