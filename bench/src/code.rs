//! `capibara bench-code`: how fast `code.run` is (docs/code.md, docs/benchmarks.md).
//!
//! 1. Executor time in this process (the same `Sandbox` the worker uses, one run at a time):
//!    start-up from the compiled-module cache plus the first run ("first run after a worker
//!    restart"), then `result = 1 + 1` in Python (pre-initialized component) and JavaScript
//!    (QuickJS), and the CPython WASI fallback for comparison; then all cores in parallel.
//! 2. Through HTTP: Postgres, Redis, the API, the scheduler and one worker (the real binaries
//!    next to this one), sequential `POST /v1/jobs` with `Prefer: wait` for a `code.run` job
//!    (`cache: false`), and `POST /v1/code/execute` answered from the cache.
//!
//! It prints figures; it is not a test and fails only when nothing works.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use capibara_sandbox::{Language, PythonRuntime, RunRequest, Sandbox, SandboxConfig};
use capibara_shared::shutdown;
use clap::Args;
use serde_json::{json, Value};

use crate::harness::{default_dir, percentile, profile, sorted, Env, Facts};

/// `capibara bench-code` options.
#[derive(Args, Debug, Clone)]
pub struct CodeBenchArgs {
    /// Runs per executor measurement.
    #[arg(long, default_value_t = 1000)]
    runs: usize,
    /// Requests per HTTP measurement.
    #[arg(long, default_value_t = 300)]
    requests: usize,
    /// Asset directory (default `CAPIBARA_ASSETS_DIR` or `.capibara/assets`).
    #[arg(long)]
    assets: Option<PathBuf>,
    /// Also measure a cold start: compile every runtime into an empty cache (~10-30 s).
    #[arg(long)]
    cold: bool,
    /// Skip the HTTP part.
    #[arg(long)]
    no_http: bool,
    /// Directory for the servers' data and logs of the HTTP part.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Other work on the machine skews every figure: the bench says how busy it was.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// "p50 a · p90 b · p99 c · min d ms" of samples in milliseconds.
fn summary(samples: Vec<f64>) -> (f64, String) {
    let s = sorted(samples);
    let p50 = percentile(&s, 0.5);
    (
        p50,
        format!(
            "p50 {:.2} · p90 {:.2} · p99 {:.2} · min {:.2} ms (n={})",
            p50,
            percentile(&s, 0.9),
            percentile(&s, 0.99),
            s.first().copied().unwrap_or(0.0),
            s.len()
        ),
    )
}

fn run_once(sandbox: &Sandbox, language: Language, code: &str) -> Result<Duration> {
    let ctx = json!({});
    let e = sandbox.run(&RunRequest {
        language,
        code,
        context: &ctx,
        timeout: Duration::from_secs(10),
        memory_bytes: 128 << 20,
        cancel: None,
    });
    match e.outcome {
        Ok(v) if v == json!(2) => Ok(e.duration),
        other => bail!("{language:?} run gave {other:?}"),
    }
}

fn series(sandbox: &Sandbox, language: Language, code: &str, n: usize) -> Result<Vec<f64>> {
    for _ in 0..n.min(20) {
        run_once(sandbox, language, code)?; // warm caches and the allocator
    }
    (0..n)
        .map(|_| run_once(sandbox, language, code).map(ms))
        .collect()
}

/// Runs per second with one thread per core.
fn parallel(
    sandbox: Arc<Sandbox>,
    language: Language,
    code: &'static str,
    n: usize,
) -> Result<f64> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let s = sandbox.clone();
            std::thread::spawn(move || -> Result<()> {
                for _ in 0..n / threads {
                    run_once(&s, language, code)?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow!("bench thread panicked"))??;
    }
    Ok((n / threads * threads) as f64 / started.elapsed().as_secs_f64())
}

pub async fn run(a: CodeBenchArgs) -> Result<()> {
    let facts = Facts::collect();
    let assets = a
        .assets
        .clone()
        .or_else(|| std::env::var_os("CAPIBARA_ASSETS_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(".capibara/assets"));
    let assets = std::fs::canonicalize(&assets)
        .with_context(|| format!("{} (run deploy/fetch-assets.sh)", assets.display()))?;
    println!("capibara bench-code — {}", facts.date);
    println!("machine: {}", facts.machine());
    println!(
        "build: {}; git {}; assets {}",
        profile(),
        facts.git,
        assets.display()
    );

    let mut rows: Vec<(String, String)> = Vec::new();
    let bench = {
        let assets = assets.clone();
        let a = a.clone();
        tokio::task::spawn_blocking(move || executor_part(&a, &assets)).await??
    };
    rows.extend(bench);

    if !a.no_http {
        let http = tokio::select! {
            r = http_part(&a, &assets) => r?,
            _ = shutdown::signal() => bail!("interrupted"),
        };
        rows.extend(http);
    }

    println!("load average at end: {}", loadavg());
    println!("\n| measurement | figure |\n|---|---|");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
    Ok(())
}

fn executor_part(a: &CodeBenchArgs, assets: &std::path::Path) -> Result<Vec<(String, String)>> {
    let mut rows = Vec::new();
    let config = SandboxConfig::new(assets);
    if a.cold {
        let tmp = tempfile_dir()?;
        let mut cold = config.clone();
        cold.cache_dir = tmp.clone();
        let started = Instant::now();
        let s = Sandbox::new(cold)?;
        let load = started.elapsed();
        let first = run_once(&s, Language::Python, "result = 1 + 1")?;
        let line = format!(
            "{:.0} ms to compile {:?}, then first Python run {:.2} ms",
            ms(load),
            s.startup().compiled,
            ms(first)
        );
        println!("cold start (empty module cache): {line}");
        rows.push(("cold start (compile all runtimes)".into(), line));
        let _ = std::fs::remove_dir_all(tmp);
    }

    // Make sure the cache is filled, then time a start-up from it, as a restarted worker does.
    drop(Sandbox::new(config.clone())?);
    let started = Instant::now();
    let sandbox = Sandbox::new(config.clone())?;
    let load = started.elapsed();
    let first_py = run_once(&sandbox, Language::Python, "result = 1 + 1")?;
    let first_js = run_once(&sandbox, Language::Javascript, "result = 1 + 1")?;
    let line = format!(
        "load {:.1} ms + first Python run {:.2} ms = {:.1} ms (first JS run {:.2} ms)",
        ms(load),
        ms(first_py),
        ms(load + first_py),
        ms(first_js)
    );
    println!("first run after restart: {line}");
    rows.push(("first run after a restart (executor)".into(), line));

    for (label, lang, code) in [
        (
            "Python `result = 1 + 1` (component)",
            Language::Python,
            "result = 1 + 1",
        ),
        (
            "JavaScript `result = 1 + 1` (QuickJS)",
            Language::Javascript,
            "result = 1 + 1",
        ),
    ] {
        let (_, line) = summary(series(&sandbox, lang, code, a.runs)?);
        println!("{label}: {line}");
        rows.push((format!("{label}, executor time"), line));
    }

    let sandbox = Arc::new(sandbox);
    for (label, lang) in [
        ("Python", Language::Python),
        ("JavaScript", Language::Javascript),
    ] {
        let rate = parallel(sandbox.clone(), lang, "result = 1 + 1", a.runs)?;
        let line = format!("{rate:.0} runs/s");
        println!("{label} on all cores: {line}");
        rows.push((format!("{label} `result = 1 + 1`, all cores"), line));
    }

    let mut wasi = config;
    wasi.python = PythonRuntime::Wasi;
    let fallback = Sandbox::new(wasi)?;
    let (_, line) = summary(series(&fallback, Language::Python, "result = 1 + 1", 50)?);
    println!("Python fallback (CPython WASI): {line}");
    rows.push((
        "Python `result = 1 + 1` (CPython WASI fallback)".into(),
        line,
    ));
    Ok(rows)
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("capibara-bench-code-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn http_part(a: &CodeBenchArgs, assets: &std::path::Path) -> Result<Vec<(String, String)>> {
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("executable has no directory")?
        .to_path_buf();
    let dir = a.dir.clone().unwrap_or_else(|| default_dir(&bin_dir));
    std::fs::create_dir_all(&dir)?;
    let extra = vec![(
        "CAPIBARA_ASSETS_DIR".to_string(),
        assets.to_string_lossy().into_owned(),
    )];
    let mut env = Env::start_with(true, 16, extra, &dir, &bin_dir).await?;
    env.spawn_worker("worker").await?;
    let mut rows = Vec::new();

    let job = |code: &str, lang: &str| json!({"kind": "code.run", "input": {"language": lang, "code": code, "cache": false}});
    // Warm up: the worker loads its sandbox in the background at start.
    for _ in 0..20 {
        submit_wait(&env, &job("result = 1 + 1", "python")).await?;
    }
    for (label, lang) in [("Python", "python"), ("JavaScript", "javascript")] {
        let mut samples = Vec::with_capacity(a.requests);
        for _ in 0..a.requests {
            let started = Instant::now();
            submit_wait(&env, &job("result = 1 + 1", lang)).await?;
            samples.push(ms(started.elapsed()));
        }
        let (_, line) = summary(samples);
        println!("HTTP POST /v1/jobs + Prefer: wait, {label}: {line}");
        rows.push((
            format!("HTTP `POST /v1/jobs` `Prefer: wait`, {label} `result = 1 + 1` (round trip)"),
            line,
        ));
    }

    let body = json!({"code": "result = 1 + 1", "context": {}});
    let url = env.api("/v1/code/execute");
    env.http
        .post(&url)
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let mut samples = Vec::with_capacity(a.requests);
    for _ in 0..a.requests {
        let started = Instant::now();
        let r: Value = env.http.post(&url).json(&body).send().await?.json().await?;
        if r["cached"] != json!(true) {
            bail!("expected a cached answer, got {r}");
        }
        samples.push(ms(started.elapsed()));
    }
    let (_, line) = summary(samples);
    println!("HTTP POST /v1/code/execute, cache hit: {line}");
    rows.push((
        "HTTP `POST /v1/code/execute`, cache hit (round trip)".into(),
        line,
    ));
    drop(env);
    let _ = std::fs::remove_dir_all(dir.join("postgres"));
    let _ = std::fs::remove_dir_all(dir.join("redis"));
    Ok(rows)
}

async fn submit_wait(env: &Env, body: &Value) -> Result<()> {
    let r = env
        .http
        .post(env.api("/v1/jobs"))
        .header("Prefer", "wait=30")
        .json(body)
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await?;
    if status.as_u16() != 200 || v["status"] != "succeeded" || v["output"]["result"] != json!(2) {
        bail!("code.run job did not succeed in time ({status}): {v}");
    }
    Ok(())
}
