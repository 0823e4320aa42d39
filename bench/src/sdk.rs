//! `capibara-bench sdk`: the SDK workers against the built-in Rust worker, on one stack.
//!
//! One private Postgres and Redis with the real API and scheduler ([`Env`]). Each worker in turn
//! (`capibara-worker`, then the Python SDK worker, then the TypeScript SDK worker, each with the
//! same `--concurrency`) runs alone and is stopped before the next starts:
//!
//! 1. **Idle pickup.** With the worker idle (the SDKs long-polling), single submits paced at
//!    `--pickup-rate`/s; enqueue→start p50/p95/p99 from each job's `queued_at` and `started_at`.
//! 2. **End to end.** N no-op jobs submitted in batches (1,000 per request, 4 at once) while the
//!    worker runs them, from the first submit until none is open (as `capibara bench` phase c);
//!    then every job's `succeeded` is checked. The Rust worker runs the built-in `echo`; the SDK
//!    workers run a user kind (`bench.noop-python`, `bench.noop-typescript`, registered with
//!    `PUT /v1/kinds`) whose handler returns its input. Where the time goes: CPU of every
//!    process (from `/proc`), Postgres transactions per job (`pg_stat_database`, reads and this
//!    bench's own polling included) and each job's started→finished time.
//!
//! The SDK workers are the driver scripts in `bench/sdk-drivers/`, importing the SDKs from
//! `sdk/python/src` and `sdk/typescript/src` of the source tree (`--repo`).

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use capibara_dev_services::find_free_port;
use capibara_shared::shutdown;
use clap::{Args, ValueEnum};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::harness::server_bin_dir;
use crate::harness::{
    bytes, named_dir, percentile, post, print_header, profile, run_dir, sorted, thousands, CpuUse,
    Env, Facts,
};
use crate::push;

/// Jobs per `POST /v1/jobs/batch` request, and requests at once (as `capibara bench` phase c).
const BATCH_SIZE: usize = 1000;
const BATCH_CONCURRENCY: usize = 4;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Which {
    /// `capibara-worker` running the built-in `echo`.
    Rust,
    /// The Rust SDK's in-process mode (`capibara-bench sdk-driver`), a user kind.
    RustSdk,
    /// The Python SDK worker (`bench/sdk-drivers/python_noop.py`).
    Python,
    /// The TypeScript SDK worker on Node (`bench/sdk-drivers/typescript_noop.mjs`).
    Typescript,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Rust => "rust",
            Which::RustSdk => "rust-sdk",
            Which::Python => "python",
            Which::Typescript => "typescript",
        }
    }

    fn kind(self) -> String {
        match self {
            Which::Rust => "echo".into(),
            w => format!("bench.noop-{}", w.name()),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Which::Rust => "Rust (`capibara-worker`, built-in `echo`)",
            Which::RustSdk => "Rust SDK in-process (`Worker::in_process`)",
            Which::Python => "Python SDK (`Worker`, sync handler)",
            Which::Typescript => "TypeScript SDK on Node (`Worker`)",
        }
    }
}

/// `capibara-bench sdk` options.
#[derive(Args, Debug)]
pub struct SdkBenchArgs {
    /// Jobs per end-to-end phase.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// `--concurrency` of every worker (the Rust one and the SDK workers alike).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Single submits of each idle-pickup phase.
    #[arg(long, default_value_t = 200)]
    pickup_jobs: usize,
    /// Paced submit rate of the idle-pickup phases, jobs/s.
    #[arg(long, default_value_t = 20)]
    pickup_rate: u32,
    /// Smoke test: 1/20 of the jobs (1,000 by default) and 1/4 of the pickup submits.
    #[arg(long)]
    quick: bool,
    /// Workers to measure, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "rust,rust-sdk,python,typescript"
    )]
    workers: Vec<Which>,
    /// Python interpreter (a name on PATH or a path).
    #[arg(long, default_value = "python3")]
    python: String,
    /// Node.js (a name on PATH or a path).
    #[arg(long, default_value = "node")]
    node: String,
    /// Source tree holding `sdk/` and `bench/sdk-drivers/` (default: the one this was built from).
    #[arg(long)]
    repo: Option<PathBuf>,
    /// Run Postgres with fsync/synchronous_commit/full_page_writes off (not durable).
    #[arg(long)]
    unsafe_pg: bool,
    /// Skip the push phase (a push kind's endpoint called by `capibara-worker`).
    #[arg(long)]
    no_push: bool,
    /// Directory for the servers' data and the logs (default: `target/bench/sdk-<time>`).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// One worker's figures.
struct Row {
    which: Which,
    jobs_per_s: f64,
    secs: f64,
    /// Median started→finished of the end-to-end jobs, ms.
    running_p50: f64,
    /// Postgres transactions committed in the bench database (reads included) per job.
    commits_per_job: f64,
    cpu: CpuUse,
    /// Sorted enqueue→start latencies, ms.
    pickup: Vec<f64>,
}

pub async fn run(mut a: SdkBenchArgs) -> Result<()> {
    if a.quick {
        a.jobs = (a.jobs / 20).max(1);
        a.pickup_jobs = (a.pickup_jobs / 4).max(1);
    }
    if a.jobs == 0 || a.concurrency == 0 || a.pickup_jobs == 0 || a.pickup_rate == 0 {
        bail!("--jobs, --concurrency, --pickup-jobs and --pickup-rate must be positive");
    }
    if a.workers.is_empty() {
        bail!("--workers names none");
    }
    let bin_dir = server_bin_dir()?;
    let repo = match &a.repo {
        Some(r) => r.clone(),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    let repo = std::path::absolute(&repo)?;
    let mut versions = Vec::new();
    for w in &a.workers {
        let (interp, file) = match w {
            Which::Rust | Which::RustSdk => continue,
            Which::Python => (&a.python, "sdk/python/src/capibara/__init__.py"),
            Which::Typescript => (&a.node, "sdk/typescript/src/index.js"),
        };
        if !repo.join(file).is_file() || !repo.join(driver(*w)).is_file() {
            bail!(
                "{} or {} is missing under {}: pass --repo <source tree>",
                file,
                driver(*w),
                repo.display()
            );
        }
        let path = which(interp).ok_or_else(|| anyhow!("{interp} not found (--python/--node)"))?;
        versions.push(format!("{} {}", w.name(), version(&path)));
    }
    let dir = run_dir(a.dir.as_ref(), named_dir(&bin_dir, "sdk"))?;

    let facts = Facts::collect();
    print_header(
        "capibara-bench sdk",
        &facts,
        a.unsafe_pg,
        &versions
            .iter()
            .map(|v| format!("; {v}"))
            .collect::<String>(),
    );
    println!(
        "end to end: {} jobs per worker, batches of {BATCH_SIZE} × {BATCH_CONCURRENCY} concurrent; \
         worker concurrency {}; idle pickup: {} single submits at {}/s",
        a.jobs, a.concurrency, a.pickup_jobs, a.pickup_rate
    );
    println!("bench dir: {}", dir.display());

    let mut env = Env::start_with(a.unsafe_pg, a.concurrency, push::env(), &dir, &bin_dir).await?;
    let outcome = tokio::select! {
        r = phases(&a, &mut env, &repo, &facts) => r,
        _ = shutdown::signal() => Err(anyhow!("interrupted")),
    };
    let pg_dir = env.pg.as_ref().map(|p| p.data_dir().to_path_buf());
    drop(env);
    match outcome {
        Ok(table) => {
            println!("\n{table}");
            if let Some(d) = pg_dir {
                let _ = fs::remove_dir_all(&d);
            }
            let _ = fs::remove_dir_all(dir.join("redis"));
            println!("logs: {}", dir.display());
            Ok(())
        }
        Err(e) => {
            eprintln!("bench failed; logs and data are in {}", dir.display());
            Err(e)
        }
    }
}

fn driver(w: Which) -> &'static str {
    match w {
        Which::Python => "bench/sdk-drivers/python_noop.py",
        _ => "bench/sdk-drivers/typescript_noop.mjs",
    }
}

/// `name` when it is a path, else the first match on PATH.
fn which(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).is_file().then(|| PathBuf::from(name));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn version(interp: &Path) -> String {
    std::process::Command::new(interp)
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if s.is_empty() {
                s = String::from_utf8_lossy(&o.stderr).trim().to_string();
            }
            s
        })
        .unwrap_or_else(|| "(version unknown)".into())
}

async fn phases(a: &SdkBenchArgs, env: &mut Env, repo: &Path, facts: &Facts) -> Result<String> {
    let mut rows = Vec::new();
    for &w in &a.workers {
        let proc_name = start_worker(a, env, repo, w).await?;
        // Let the first long poll settle.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let pickup = idle_pickup(a, env, w).await?;
        println!(
            "{} idle pickup ({} single submits at {}/s): enqueue→start p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            w.name(),
            pickup.len(),
            a.pickup_rate,
            percentile(&pickup, 0.5),
            percentile(&pickup, 0.95),
            percentile(&pickup, 0.99),
            pickup.last().copied().unwrap_or(f64::NAN)
        );
        let e = end_to_end(a, env, w).await?;
        let secs = e.elapsed.as_secs_f64();
        let jobs_per_s = a.jobs as f64 / secs;
        println!(
            "{} end to end: {} jobs in {secs:.2} s → {} jobs/s",
            w.name(),
            a.jobs,
            thousands(jobs_per_s)
        );
        println!("    CPU, % of one core: {}", e.cpu.describe());
        println!(
            "    per job: {:.1} Postgres transactions; queued→started p50 {:.0} ms; started→finished p50 {:.1} ms, p99 {:.1} ms",
            e.commits_per_job,
            percentile(&e.queued, 0.5),
            percentile(&e.running, 0.5),
            percentile(&e.running, 0.99)
        );
        stop(env, &proc_name).await?;
        rows.push(Row {
            which: w,
            jobs_per_s,
            secs,
            running_p50: percentile(&e.running, 0.5),
            commits_per_job: e.commits_per_job,
            cpu: e.cpu,
            pickup,
        });
    }

    let rust = rows
        .iter()
        .find(|r| r.which == Which::Rust)
        .map(|r| r.jobs_per_s);
    let mut t = format!(
        "Build: {}; {} no-op jobs per end-to-end phase (batches of {BATCH_SIZE}, {BATCH_CONCURRENCY} at once); \
         worker concurrency {}; idle pickup: {} single submits at {}/s; Postgres {}; git {}; {}.\n\n",
        profile(),
        a.jobs,
        a.concurrency,
        a.pickup_jobs,
        a.pickup_rate,
        if a.unsafe_pg {
            "fsync off (`--unsafe-pg`)"
        } else {
            "with durable commits"
        },
        facts.git,
        facts.machine()
    );
    t.push_str(
        "| Worker | End to end | vs Rust | Postgres transactions per job | started→finished p50 | Idle enqueue→start p50 | p95 | p99 | CPU during end to end, % of one core |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        let ratio = match rust {
            Some(x) if x > 0.0 => format!("{:.0} %", r.jobs_per_s / x * 100.0),
            _ => "—".into(),
        };
        t.push_str(&format!(
            "| {} | **{} jobs/s** ({:.1} s) | {ratio} | {:.1} | {:.1} ms | **{:.2} ms** | {:.2} ms | {:.2} ms | {} |\n",
            r.which.label(),
            thousands(r.jobs_per_s),
            r.secs,
            r.commits_per_job,
            r.running_p50,
            percentile(&r.pickup, 0.5),
            percentile(&r.pickup, 0.95),
            percentile(&r.pickup, 0.99),
            r.cpu.describe()
        ));
    }
    let pushed = if a.no_push {
        None
    } else {
        let p = push::measure(env, a.pickup_jobs, a.pickup_rate).await?;
        let line = format!(
            "push kind through capibara-worker ({} single submits at {}/s, idle): {}",
            a.pickup_jobs,
            a.pickup_rate,
            p.describe()
        );
        println!("{line}");
        t.push_str(&format!("\n{line}.\n"));
        Some(p)
    };
    let mut verdicts = Vec::new();
    if let Some(p) = &pushed {
        let p50 = percentile(&p.overhead, 0.5);
        verdicts.push(format!(
            "push overhead p50 {p50:.2} ms ({})",
            if p50 <= 5.0 { "met" } else { "missed" }
        ));
    }
    for r in rows.iter().filter(|r| r.which != Which::Rust) {
        if let Some(x) = rust.filter(|x| *x > 0.0) {
            let pct = r.jobs_per_s / x * 100.0;
            verdicts.push(format!(
                "{} {:.0} % of Rust ({})",
                r.which.name(),
                pct,
                if pct >= 50.0 { "met" } else { "missed" }
            ));
        }
        let p50 = percentile(&r.pickup, 0.5);
        verdicts.push(format!(
            "{} pickup p50 {p50:.2} ms ({})",
            r.which.name(),
            if p50 <= 5.0 { "met" } else { "missed" }
        ));
    }
    if !verdicts.is_empty() {
        t.push_str(&format!(
            "\nTargets (≥ 50 % of Rust; idle pickup p50 ≤ 5 ms; push overhead p50 ≤ 5 ms): {}.\n",
            verdicts.join("; ")
        ));
    }
    Ok(t)
}

/// Starts `w` and waits until it takes jobs; returns its process name in `env`.
async fn start_worker(a: &SdkBenchArgs, env: &mut Env, repo: &Path, w: Which) -> Result<String> {
    if w == Which::Rust {
        // CPU group "workers"; its concurrency is `Env::worker_concurrency` (= --concurrency).
        let name = "worker-rust".to_string();
        env.spawn_worker(&name).await?;
        return Ok(name);
    }
    let name = match w {
        Which::RustSdk => "rust-sdk".to_string(),
        _ => format!("{}-sdk", w.name()),
    };
    let kind = w.kind();
    put_kind(
        env,
        &kind,
        json!({"description": "capibara-bench sdk: returns its input"}),
    )
    .await?;
    let conc = a.concurrency.to_string();
    let (program, script, extra) = match w {
        Which::Python => (
            which(&a.python).ok_or_else(|| anyhow!("{} not found", a.python))?,
            repo.join(driver(w)).display().to_string(),
            vec![(
                "PYTHONPATH".to_string(),
                repo.join("sdk/python/src").display().to_string(),
            )],
        ),
        Which::RustSdk => (
            std::env::current_exe()?,
            "sdk-driver".to_string(),
            Vec::new(),
        ),
        _ => (
            which(&a.node).ok_or_else(|| anyhow!("{} not found", a.node))?,
            repo.join(driver(w)).display().to_string(),
            Vec::new(),
        ),
    };
    // `Env::spawn` joins the binary to its bin dir; an absolute path replaces it. The SDKs read
    // CAPIBARA_URL and CAPIBARA_API_KEY; `extra_env` carries them for this child only.
    let saved = env.extra_env.clone();
    env.extra_env.push(("CAPIBARA_URL".into(), env.api("")));
    env.extra_env
        .push(("CAPIBARA_API_KEY".into(), env.admin_key.clone()));
    env.extra_env.extend(extra);
    let spawned = env.spawn(
        &name,
        &program.display().to_string(),
        &[&script, "--kind", &kind, "--concurrency", &conc],
        find_free_port(),
    );
    env.extra_env = saved;
    spawned?;
    let log = env
        .proc_named(&name)
        .map(|p| p.log.clone())
        .ok_or_else(|| anyhow!("{name} not spawned"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        env.check_alive()?;
        if fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("bench-driver ready"))
        {
            return Ok(name);
        }
        if Instant::now() > deadline {
            bail!(
                "{name} did not register within 60 s (log {})",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, up to 20 s to exit (the SDKs finish their last long poll), then SIGKILL; the
/// process leaves `env`.
pub(crate) async fn stop(env: &mut Env, name: &str) -> Result<()> {
    let i = env
        .procs
        .iter()
        .position(|p| p.name == name)
        .ok_or_else(|| anyhow!("no process {name}"))?;
    let mut p = env.procs.remove(i);
    // kill(1): this crate has no unsafe code. The child is not reaped yet, so its pid is ours.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            println!("    {name} still running 20 s after SIGTERM: killed");
            let _ = p.child.kill();
            let _ = p.child.wait();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

pub(crate) fn job(kind: &str, tag: &str) -> Value {
    json!({"kind": kind, "input": {"n": 1}, "tags": {"phase": tag}})
}

/// Single submits at `--pickup-rate` while the worker is idle; returns the sorted
/// enqueue→start latencies in ms.
async fn idle_pickup(a: &SdkBenchArgs, env: &mut Env, w: Which) -> Result<Vec<f64>> {
    let tag = format!("pickup-{}", w.name());
    paced_submits(env, &job(&w.kind(), &tag), a.pickup_jobs, a.pickup_rate).await?;
    let lat: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM started_at - queued_at) * 1000)::float8 FROM jobs \
         WHERE tags->>'phase' = $1 AND status = 'succeeded'",
    )
    .bind(&tag)
    .fetch_all(&env.pool)
    .await?;
    if lat.len() != a.pickup_jobs {
        bail!("{tag}: {} of {} jobs succeeded", lat.len(), a.pickup_jobs);
    }
    Ok(sorted(lat))
}

/// Register (or update) user kind `kind` with `definition`.
pub(crate) async fn put_kind(env: &Env, kind: &str, definition: Value) -> Result<()> {
    let r = env
        .http
        .put(env.api(&format!("/v1/kinds/{kind}")))
        .json(&definition)
        .send()
        .await?;
    if !r.status().is_success() {
        let status = r.status();
        bail!(
            "PUT /v1/kinds/{kind} answered {status}: {}",
            r.text().await?
        );
    }
    Ok(())
}

/// `jobs` single submits of `job` at `rate`/s, then wait until none is open.
pub(crate) async fn paced_submits(
    env: &mut Env,
    job: &Value,
    jobs: usize,
    rate: u32,
) -> Result<()> {
    let body = bytes(job)?;
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        interval.tick().await;
        let (http, url, body) = (env.http.clone(), env.api("/v1/jobs"), body.clone());
        tasks.push(tokio::spawn(async move { post(&http, &url, body).await }));
    }
    for t in tasks {
        t.await??;
    }
    env.wait_drained().await
}

/// N jobs in batches while the worker runs them, from the first submit until none is open
/// (`Env::wait_drained`, polled every 50 ms); then checks all N succeeded.
async fn end_to_end(a: &SdkBenchArgs, env: &mut Env, w: Which) -> Result<E2e> {
    let tag = format!("e2e-{}", w.name());
    let kind = w.kind();
    let requests = a.jobs.div_ceil(BATCH_SIZE);
    let bodies = (0..requests)
        .map(|i| {
            let n = BATCH_SIZE.min(a.jobs - i * BATCH_SIZE);
            bytes(&json!({"jobs": vec![job(&kind, &tag); n]}))
        })
        .collect::<Result<Vec<_>>>()?;
    let (http, url) = (env.http.clone(), env.api("/v1/jobs/batch"));
    let commits0 = env.commits().await?;
    let cpu0 = env.cpu_snapshot();
    let started = Instant::now();
    let submitter = tokio::spawn(async move {
        let mut s = futures::stream::iter(bodies)
            .map(|b| post(&http, &url, b))
            .buffer_unordered(BATCH_CONCURRENCY);
        while let Some(r) = s.next().await {
            r?;
        }
        anyhow::Ok(())
    });
    submitter.await??;
    env.wait_drained().await?;
    let elapsed = started.elapsed();
    let cpu1 = env.cpu_snapshot();
    // Backends report their counters at most once a second; let them.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let commits = env.commits().await? - commits0;
    let ok = env.count_tag("succeeded", &tag).await?;
    if ok != a.jobs as i64 {
        bail!("{tag}: {ok} of {} jobs succeeded", a.jobs);
    }
    // Where a job's time went: waiting in the queue, then started → finished (for an SDK worker:
    // lease answer, handler, `complete` round trip and its commit).
    let (queued, running): (Vec<f64>, Vec<f64>) = sqlx::query_as::<_, (f64, f64)>(
        "SELECT (extract(epoch FROM started_at - queued_at) * 1000)::float8, \
                (extract(epoch FROM finished_at - started_at) * 1000)::float8 \
         FROM jobs WHERE tags->>'phase' = $1",
    )
    .bind(&tag)
    .fetch_all(&env.pool)
    .await?
    .into_iter()
    .unzip();
    Ok(E2e {
        elapsed,
        cpu: CpuUse::between(&cpu0, &cpu1),
        commits_per_job: commits as f64 / a.jobs as f64,
        queued: sorted(queued),
        running: sorted(running),
    })
}

struct E2e {
    elapsed: Duration,
    cpu: CpuUse,
    /// Postgres transactions committed in the bench database (reads included) per job.
    commits_per_job: f64,
    /// Sorted enqueue→start and start→finish times of the phase's jobs, ms.
    queued: Vec<f64>,
    running: Vec<f64>,
}
