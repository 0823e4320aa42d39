//! `capibara bench`: throughput and latency figures of the real system.
//!
//! Self-contained: starts a private Postgres (durable commits unless `--unsafe-pg`) and Redis
//! under a bench directory, spawns the real `capibara-api`, `capibara-scheduler` and
//! `capibara-worker` binaries found next to this executable (so they must be built in the same
//! profile), and drives them over HTTP while reading the outcome from Postgres:
//!
//! a. single submits from C concurrent clients (no worker running);
//! b. batch submits (1000 jobs per request, 4 concurrent);
//!    then one worker drains the 2N queued jobs (reported as well);
//! c. end to end with one worker process: batches are submitted while the worker runs them, from
//!    the first submit until all N are `succeeded`;
//! d. the same with two worker processes;
//! e. enqueue→start latency at a paced 200 submits/s (from `queued_at`/`started_at`), and the
//!    client-side HTTP round trip;
//! f. resident memory of the idle workers and the API.
//!
//! During c and d the CPU time of every process (Postgres with all its backends, Redis, API,
//! workers, scheduler, this client) is sampled from `/proc`, and the mean group-commit batch
//! size (`capibara_append_batch_size`) is read from each process's `/metrics`.
//!
//! It prints a line per phase and a final markdown table for `docs/benchmarks.md`. It is a
//! measuring command, not a test: it fails only when the system does not work at all.

use std::{
    fs,
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use capibara_shared::shutdown;
use clap::Args;
use reqwest::Client;
use serde_json::json;

use crate::harness::server_bin_dir;
use crate::harness::{
    bytes, default_dir, percentile, post, print_header, profile, rss_mib, run_dir, sorted,
    thousands, CpuUse, Env, Facts, PgWork,
};

/// `capibara bench` options.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Jobs per throughput phase (a, b, c, d).
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Concurrent HTTP clients for single submits (phase a).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Jobs per `POST /v1/jobs/batch` request.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Concurrent batch requests.
    #[arg(long, default_value_t = 4)]
    batch_concurrency: usize,
    /// `--concurrency` of each worker process.
    #[arg(long, default_value_t = 64)]
    pub(crate) worker_concurrency: usize,
    /// Paced submit rate of the latency phase, jobs/s.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Length of the latency phase, seconds.
    #[arg(long, default_value_t = 10.0)]
    latency_secs: f64,
    /// Smoke test: divide the job count and the latency phase's length by 10.
    #[arg(long)]
    quick: bool,
    /// Run Postgres with fsync/synchronous_commit/full_page_writes off (not durable).
    #[arg(long)]
    pub(crate) unsafe_pg: bool,
    /// Directory for the servers' data and the logs (default: `target/bench/run-<time>` when
    /// this binary lives in a cargo target directory, else under the temp directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the data (not only the logs) after a successful run.
    #[arg(long)]
    keep: bool,
}

/// Runs the benchmark (see the module docs).
pub async fn run(mut a: BenchArgs) -> Result<()> {
    if a.quick {
        a.jobs = (a.jobs / 10).max(1);
        a.latency_secs /= 10.0;
    }
    if a.jobs == 0 || a.clients == 0 || a.batch_size == 0 || a.batch_concurrency == 0 {
        bail!("--jobs, --clients, --batch-size and --batch-concurrency must be positive");
    }
    if a.rate == 0 || a.latency_secs <= 0.0 {
        bail!("--rate and --latency-secs must be positive");
    }
    let bin_dir = server_bin_dir()?;
    let dir = run_dir(a.dir.as_ref(), default_dir(&bin_dir))?;

    let facts = Facts::collect();
    print_header("capibara bench", &facts, a.unsafe_pg, "");
    println!(
        "jobs per phase: {}; clients: {}; batch: {} × {} concurrent; worker concurrency: {}",
        a.jobs, a.clients, a.batch_size, a.batch_concurrency, a.worker_concurrency
    );
    println!("bench dir: {}", dir.display());

    let mut env = Env::start(&a, &dir, &bin_dir).await?;
    let outcome = tokio::select! {
        r = phases(&a, &mut env, &facts) => r,
        _ = shutdown::signal() => Err(anyhow!("interrupted")),
    };
    // Children first, then Redis and Postgres (Env's Drop and field order).
    let pg_dir = env.pg.as_ref().map(|p| p.data_dir().to_path_buf());
    drop(env);
    match outcome {
        Ok(table) => {
            println!("\n{table}");
            if !a.keep {
                if let Some(d) = pg_dir {
                    let _ = fs::remove_dir_all(&d);
                }
                let _ = fs::remove_dir_all(dir.join("redis"));
            }
            println!("logs: {}", dir.display());
            Ok(())
        }
        Err(e) => {
            eprintln!("bench failed; logs and data are in {}", dir.display());
            Err(e)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Load generators
// ---------------------------------------------------------------------------------------------

fn job_body(tag: &str) -> serde_json::Value {
    json!({"kind": "echo", "input": {}, "tags": {"phase": tag}})
}

/// `n` single submits from `clients` concurrent clients; returns the wall time and every
/// request's round trip in ms.
async fn submit_single(
    http: &Client,
    url: &str,
    n: usize,
    clients: usize,
    tag: &str,
) -> Result<(Duration, Vec<f64>)> {
    let body = bytes(&job_body(tag))?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients.min(n) {
        let (http, url, body, next) = (http.clone(), url.to_string(), body.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let t = Instant::now();
                post(&http, &url, body.clone()).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((started.elapsed(), all))
}

/// `n` jobs through `/v1/jobs/batch`, `size` per request, `concurrency` requests at once.
async fn submit_batches(
    http: Client,
    url: String,
    n: usize,
    size: usize,
    concurrency: usize,
    tag: String,
) -> Result<Duration> {
    let full = bytes(&json!({"jobs": vec![job_body(&tag); size.min(n)]}))?;
    let rest = n % size;
    let last = if rest > 0 {
        Some(bytes(&json!({"jobs": vec![job_body(&tag); rest]}))?)
    } else {
        None
    };
    let requests = n.div_ceil(size);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.min(requests) {
        let (http, url, full, last, next) = (
            http.clone(),
            url.clone(),
            full.clone(),
            last.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return anyhow::Ok(());
                }
                let body = match (&last, i + 1 == requests) {
                    (Some(l), true) => l.clone(),
                    _ => full.clone(),
                };
                post(&http, &url, body).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Phases
// ---------------------------------------------------------------------------------------------

/// One end-to-end phase's figures.
struct E2e {
    elapsed: Duration,
    submit_elapsed: Duration,
    events: i64,
    cpu: CpuUse,
    /// Per process: mean appends per flush, mean flush time in ms.
    batches: Vec<(String, f64, f64)>,
    /// Postgres transactions committed per second in the bench database.
    commits_per_s: f64,
    /// Postgres' work per job (statements, commits, rows, WAL, CPU), where measurable.
    per_job: Option<String>,
}

/// Submits `n` jobs in batches while the running workers execute them; measures from the first
/// submit until all are succeeded.
async fn end_to_end(a: &BenchArgs, env: &mut Env, tag: &str) -> Result<E2e> {
    let events0 = env.count("SELECT count(*) FROM events").await?;
    let commits0 = env.commits().await?;
    let work0 = env.pg_work().await;
    let batch0 = env.batch_snapshot().await;
    let cpu0 = env.cpu_snapshot();
    let started = Instant::now();
    let mut submitter = Some(tokio::spawn(submit_batches(
        env.http.clone(),
        env.api("/v1/jobs/batch"),
        a.jobs,
        a.batch_size,
        a.batch_concurrency,
        tag.to_string(),
    )));
    let mut submit_elapsed = None;
    let mut last = i64::MAX;
    let mut last_change = Instant::now();
    let elapsed = loop {
        env.check_alive()?;
        if submitter.as_ref().is_some_and(|s| s.is_finished()) {
            let s = submitter.take().expect("submitter");
            submit_elapsed = Some(s.await??);
        }
        // Every job is in the table once the submitter is done, so "no open job" then means
        // all of this phase's jobs finished (earlier phases were drained).
        if submit_elapsed.is_some() {
            let open = env.open_jobs().await?;
            if open == 0 {
                break started.elapsed();
            }
            if open < last {
                last = open;
                last_change = Instant::now();
            } else if last_change.elapsed() > Duration::from_secs(60) {
                bail!("{tag}: {open} jobs still open and no progress for 60 s");
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let cpu1 = env.cpu_snapshot();
    let batch1 = env.batch_snapshot().await;
    let events1 = env.count("SELECT count(*) FROM events").await?;
    // Backends report their counters at most once a second; let them.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let commits1 = env.commits().await?;
    let work1 = env.pg_work().await;
    let ok = env.count_tag("succeeded", tag).await?;
    if ok != a.jobs as i64 {
        bail!("{tag}: {ok} of {} jobs succeeded", a.jobs);
    }
    let batches = batch1
        .iter()
        .map(|(k, f1)| {
            let f0 = batch0.get(k).copied().unwrap_or_default();
            let c = f1.flushes - f0.flushes;
            if c > 0.0 {
                (
                    k.clone(),
                    (f1.appends - f0.appends) / c,
                    (f1.seconds - f0.seconds) / c * 1000.0,
                )
            } else {
                (k.clone(), 0.0, 0.0)
            }
        })
        // The API's batch endpoint commits each request as one transaction, outside the
        // group commit, so it records no flushes here.
        .filter(|(_, mean, _)| *mean > 0.0)
        .collect();
    let cpu = CpuUse::between(&cpu0, &cpu1);
    let per_job = work0
        .zip(work1)
        .map(|(w0, w1)| PgWork::per_job(&w0, &w1, a.jobs, cpu.seconds("postgres")));
    Ok(E2e {
        elapsed,
        submit_elapsed: submit_elapsed.unwrap_or_default(),
        events: events1 - events0,
        per_job,
        cpu,
        batches,
        commits_per_s: (commits1 - commits0) as f64 / elapsed.as_secs_f64(),
    })
}

fn print_e2e(label: &str, n: usize, e: &E2e) {
    let secs = e.elapsed.as_secs_f64();
    println!(
        "{label}: {n} jobs in {secs:.2} s → {} jobs/s, {} events/s (submits done at {:.2} s)",
        thousands(n as f64 / secs),
        thousands(e.events as f64 / secs),
        e.submit_elapsed.as_secs_f64()
    );
    println!("    CPU, % of one core: {}", e.cpu.describe());
    println!("    group commit: {}", batches_text(e));
    if let Some(p) = &e.per_job {
        println!("    Postgres per job: {p}");
    }
}

fn batches_text(e: &E2e) -> String {
    let mut parts: Vec<String> = e
        .batches
        .iter()
        .map(|(k, size, ms)| format!("{k} {size:.1} appends/flush, {ms:.1} ms/flush"))
        .collect();
    parts.push(format!("Postgres {} commits/s", thousands(e.commits_per_s)));
    parts.join("; ")
}

async fn phases(a: &BenchArgs, env: &mut Env, facts: &Facts) -> Result<String> {
    let n = a.jobs;
    let mut rows: Vec<(String, String)> = Vec::new();

    // a. single submits, no worker.
    let (t, lat) = submit_single(&env.http, &env.api("/v1/jobs"), n, a.clients, "single").await?;
    let lat = sorted(lat);
    let single_rate = n as f64 / t.as_secs_f64();
    println!(
        "a. submit, single ({} clients, no worker): {n} jobs in {:.2} s → {} jobs/s (HTTP p50 {:.1} ms, p99 {:.1} ms)",
        a.clients,
        t.as_secs_f64(),
        thousands(single_rate),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    rows.push((
        format!(
            "a. Submit, single (`POST /v1/jobs`, {} clients, no worker)",
            a.clients
        ),
        format!(
            "**{} jobs/s** (HTTP p50 {:.1} ms, p99 {:.1} ms)",
            thousands(single_rate),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        ),
    ));

    // b. batch submits, no worker.
    let t = submit_batches(
        env.http.clone(),
        env.api("/v1/jobs/batch"),
        n,
        a.batch_size,
        a.batch_concurrency,
        "batch".into(),
    )
    .await?;
    let batch_rate = n as f64 / t.as_secs_f64();
    println!(
        "b. submit, batch ({} per request, {} concurrent): {n} jobs in {:.2} s → {} jobs/s",
        a.batch_size,
        a.batch_concurrency,
        t.as_secs_f64(),
        thousands(batch_rate)
    );
    rows.push((
        format!(
            "b. Submit, batch (`POST /v1/jobs/batch`, {} per request, {} concurrent)",
            a.batch_size, a.batch_concurrency
        ),
        format!("**{} jobs/s**", thousands(batch_rate)),
    ));

    // Drain what a and b queued with one worker, so c starts from an empty queue.
    let queued = env.open_jobs().await?;
    env.spawn_worker("worker-1").await?;
    let started = Instant::now();
    env.wait_drained().await?;
    let drain = started.elapsed();
    let not_ok = env
        .count("SELECT count(*) FROM jobs WHERE status <> 'succeeded'")
        .await?;
    if not_ok > 0 {
        bail!("{not_ok} jobs of phases a/b did not succeed");
    }
    let drain_rate = queued as f64 / drain.as_secs_f64();
    println!(
        "drain of {queued} queued jobs, 1 worker (concurrency {}): {:.2} s → {} jobs/s",
        a.worker_concurrency,
        drain.as_secs_f64(),
        thousands(drain_rate)
    );
    rows.push((
        format!("Drain of {queued} queued jobs, 1 worker process"),
        format!(
            "**{} jobs/s** ({:.1} s)",
            thousands(drain_rate),
            drain.as_secs_f64()
        ),
    ));

    // c. end to end, one worker process.
    let c = end_to_end(a, env, "e2e1").await?;
    print_e2e("c. end-to-end, 1 worker process", n, &c);
    // d. end to end, two worker processes.
    env.spawn_worker("worker-2").await?;
    let d = end_to_end(a, env, "e2e2").await?;
    print_e2e("d. end-to-end, 2 worker processes", n, &d);
    for (label, e) in [("c", &c), ("d", &d)] {
        let workers = if label == "c" {
            "1 worker process"
        } else {
            "2 worker processes"
        };
        let secs = e.elapsed.as_secs_f64();
        rows.push((
            format!("{label}. End-to-end, {workers} (submit → all succeeded)"),
            format!(
                "**{} jobs/s**, {} events/s ({n} jobs in {secs:.1} s)",
                thousands(n as f64 / secs),
                thousands(e.events as f64 / secs)
            ),
        ));
        rows.push((format!("{label}. CPU, % of one core"), e.cpu.describe()));
        rows.push((
            format!("{label}. Group commit (mean per flush, by process)"),
            batches_text(e),
        ));
    }

    // e. latency at a paced rate, both workers idle.
    let total = ((a.rate as f64) * a.latency_secs).round().max(1.0) as usize;
    let period = Duration::from_secs_f64(1.0 / a.rate as f64);
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let body = bytes(&job_body("lat"))?;
    let mut tasks = Vec::with_capacity(total);
    let started = Instant::now();
    for _ in 0..total {
        interval.tick().await;
        let (http, url, body) = (env.http.clone(), env.api("/v1/jobs"), body.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            post(&http, &url, body).await?;
            anyhow::Ok(t.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut rtt = Vec::with_capacity(total);
    for t in tasks {
        rtt.push(t.await??);
    }
    let paced = started.elapsed();
    env.wait_drained().await?;
    let lat: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM started_at - queued_at) * 1000)::float8 FROM jobs \
         WHERE tags->>'phase' = 'lat' AND status = 'succeeded'",
    )
    .fetch_all(&env.pool)
    .await?;
    if lat.len() != total {
        bail!("latency phase: {} of {total} jobs succeeded", lat.len());
    }
    let lat = sorted(lat);
    let rtt = sorted(rtt);
    let achieved = total as f64 / paced.as_secs_f64();
    println!(
        "e. latency at {} jobs/s ({total} jobs, achieved {achieved:.0}/s): enqueue→start p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; HTTP submit p50 {:.2} ms, p99 {:.2} ms",
        a.rate,
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
        percentile(&rtt, 0.5),
        percentile(&rtt, 0.99)
    );
    rows.push((
        format!(
            "e. Enqueue→start latency at {} submits/s ({total} jobs, 2 idle workers)",
            a.rate
        ),
        format!(
            "**p50 {:.2} ms**, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(&lat, 0.5),
            percentile(&lat, 0.9),
            percentile(&lat, 0.99),
            lat.last().copied().unwrap_or(f64::NAN)
        ),
    ));
    rows.push((
        "e. HTTP submit round trip (client side), same run".into(),
        format!(
            "p50 {:.2} ms, p99 {:.2} ms",
            percentile(&rtt, 0.5),
            percentile(&rtt, 0.99)
        ),
    ));

    // f. idle memory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.check_alive()?;
    let mut rss = Vec::new();
    for p in env.workers() {
        rss.push((p.name.clone(), rss_mib(p.child.id()).unwrap_or(f64::NAN)));
    }
    for name in ["api", "scheduler"] {
        if let Some(p) = env.proc_named(name) {
            rss.push((name.to_string(), rss_mib(p.child.id()).unwrap_or(f64::NAN)));
        }
    }
    let rss_text = rss
        .iter()
        .map(|(k, v)| format!("{k} {v:.1} MiB"))
        .collect::<Vec<_>>()
        .join(", ");
    println!("f. idle RSS (VmRSS, 3 s after the latency phase): {rss_text}");
    rows.push((
        "f. Idle RSS (VmRSS) after the run".into(),
        format!("**{rss_text}**"),
    ));

    let mut table = String::new();
    table.push_str(&format!(
        "Build: {}; {} jobs per phase; Postgres {}; worker `--concurrency {}`; git {}; {}.\n",
        profile(),
        n,
        if a.unsafe_pg {
            "fsync off (`--unsafe-pg`)"
        } else {
            "with durable commits"
        },
        a.worker_concurrency,
        facts.git,
        facts.machine()
    ));
    table.push_str("\n| Figure | Value |\n|---|---|\n");
    for (k, v) in rows {
        table.push_str(&format!("| {k} | {v} |\n"));
    }
    Ok(table)
}
