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
    collections::BTreeMap,
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use capibara_dev_services::{
    find_free_port, PostgresOptions, PostgresServer, RedisOptions, RedisServer,
};
use capibara_shared::shutdown;
use clap::Args;
use reqwest::{header, Client};
use serde_json::json;
use sqlx::PgPool;

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
    worker_concurrency: usize,
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
    unsafe_pg: bool,
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
    let exe = std::env::current_exe().context("locating this executable")?;
    let bin_dir = exe
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?
        .to_path_buf();
    for b in ["capibara-api", "capibara-scheduler", "capibara-worker"] {
        if !bin_dir.join(b).is_file() {
            bail!(
                "{} is missing: build all binaries in the same profile (`cargo build --workspace --bins`, \
                 with `--release` for figures worth quoting)",
                bin_dir.join(b).display()
            );
        }
    }
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => default_dir(&bin_dir),
    };
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::path::absolute(&dir)?;

    let facts = Facts::collect();
    println!("capibara bench — {}", facts.date);
    println!("machine: {}", facts.machine());
    println!(
        "build: {} (git {}); Postgres durable commits: {}",
        profile(),
        facts.git,
        if a.unsafe_pg {
            "OFF (--unsafe-pg)"
        } else {
            "on"
        }
    );
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

pub(crate) fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// `<target>/bench/run-<unix time>` when the binary is in `<target>/<profile>/`, else a
/// directory under the temp dir.
pub(crate) fn default_dir(bin_dir: &Path) -> PathBuf {
    named_dir(bin_dir, "run")
}

/// `NAME-STAMP-PID` under `target/bench` when the binaries sit in a cargo target directory,
/// else under the temp directory.
pub(crate) fn named_dir(bin_dir: &Path, name: &str) -> PathBuf {
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
    let name = format!("{name}-{stamp}-{}", std::process::id());
    match bin_dir.parent() {
        Some(target) if target.join("CACHEDIR.TAG").is_file() => target.join("bench").join(name),
        _ => std::env::temp_dir().join("capibara-bench").join(name),
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// A spawned binary.
pub(crate) struct Proc {
    pub(crate) name: String,
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
    /// Port of its health/metrics listener.
    pub(crate) port: u16,
}

/// The servers and processes of one run. Dropping it kills and reaps every child, then stops
/// Redis and Postgres (fields drop in declaration order after `drop`).
pub(crate) struct Env {
    pub(crate) procs: Vec<Proc>,
    pub(crate) redis: Option<RedisServer>,
    pub(crate) pg: Option<PostgresServer>,
    pub(crate) dir: PathBuf,
    pub(crate) bin_dir: PathBuf,
    pub(crate) db_url: String,
    pub(crate) redis_url: String,
    pub(crate) admin_key: String,
    pub(crate) api_port: u16,
    pub(crate) pool: PgPool,
    pub(crate) http: Client,
    pub(crate) worker_concurrency: usize,
    /// More `CAPIBARA_*` settings for every child (e.g. a webhook secret).
    pub(crate) extra_env: Vec<(String, String)>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

impl Env {
    pub(crate) async fn start(a: &BenchArgs, dir: &Path, bin_dir: &Path) -> Result<Env> {
        Self::start_with(a.unsafe_pg, a.worker_concurrency, Vec::new(), dir, bin_dir).await
    }

    /// Postgres, Redis, the API and the scheduler; every child also gets `extra_env`.
    pub(crate) async fn start_with(
        fast_unsafe: bool,
        worker_concurrency: usize,
        extra_env: Vec<(String, String)>,
        dir: &Path,
        bin_dir: &Path,
    ) -> Result<Env> {
        let pg_dir = dir.join("postgres").join("data");
        let redis_dir = dir.join("redis");
        let (pg, redis) = tokio::task::spawn_blocking(move || {
            let pg = PostgresServer::start(PostgresOptions {
                data_dir: pg_dir,
                port: 0,
                fast_unsafe,
            })
            .context("starting Postgres")?;
            pg.ensure_database("bench")?;
            let redis = RedisServer::start(RedisOptions {
                dir: redis_dir,
                port: 0,
                persist: false,
            })
            .context("starting Redis")?;
            anyhow::Ok((pg, redis))
        })
        .await??;
        println!(
            "postgres: {} (log {}); redis: {}",
            pg.url("bench"),
            pg.log_path().display(),
            redis.url()
        );
        let admin_key = format!("bench-{}", uuid::Uuid::new_v4().simple());
        let mut headers = header::HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {admin_key}").parse()?,
        );
        let http = Client::builder()
            .default_headers(headers)
            .pool_max_idle_per_host(1024)
            .timeout(Duration::from_secs(120))
            .build()?;
        let db_url = pg.url("bench");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&db_url)
            .await
            .context("connecting to the bench database")?;
        let mut env = Env {
            procs: Vec::new(),
            redis_url: redis.url(),
            redis: Some(redis),
            pg: Some(pg),
            dir: dir.to_path_buf(),
            bin_dir: bin_dir.to_path_buf(),
            db_url,
            admin_key,
            api_port: find_free_port(),
            pool,
            http,
            worker_concurrency,
            extra_env,
        };
        // The API applies the migrations; start it alone first.
        let api_port = env.api_port;
        env.spawn("api", "capibara-api", &[], api_port)?;
        env.wait_healthy(api_port).await?;
        let sched_port = find_free_port();
        env.spawn("scheduler", "capibara-scheduler", &[], sched_port)?;
        env.wait_healthy(sched_port).await?;
        Ok(env)
    }

    pub(crate) fn api(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.api_port)
    }

    /// Spawns a binary with the bench environment; logs go to `<dir>/<name>.log`.
    pub(crate) fn spawn(&mut self, name: &str, bin: &str, args: &[&str], port: u16) -> Result<()> {
        let log = self.dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut c = Command::new(self.bin_dir.join(bin));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CAPIBARA_") {
                c.env_remove(k);
            }
        }
        let own = format!("127.0.0.1:{port}");
        c.args(args)
            .env("CAPIBARA_DATABASE_URL", &self.db_url)
            .env("CAPIBARA_REDIS_URL", &self.redis_url)
            .env("CAPIBARA_REDIS_PREFIX", "bench")
            .env("CAPIBARA_ADMIN_KEY", &self.admin_key)
            .env("CAPIBARA_API_ADDR", format!("127.0.0.1:{}", self.api_port))
            .env(
                "CAPIBARA_SCHEDULER_ADDR",
                if bin == "capibara-scheduler" {
                    own.as_str()
                } else {
                    "127.0.0.1:0"
                },
            )
            // A known port (not 0) so the bench can read each worker's /metrics.
            .env(
                "CAPIBARA_WORKER_ADDR",
                if bin == "capibara-worker" {
                    own.as_str()
                } else {
                    "127.0.0.1:0"
                },
            )
            .env("CAPIBARA_RATE_LIMIT_RPS", "1000000")
            .env("CAPIBARA_LOG", "warn")
            .env("CAPIBARA_LOG_FORMAT", "json")
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = c
            .spawn()
            .with_context(|| format!("starting {}", self.bin_dir.join(bin).display()))?;
        self.procs.push(Proc {
            name: name.to_string(),
            child,
            log,
            port,
        });
        Ok(())
    }

    pub(crate) async fn spawn_worker(&mut self, name: &str) -> Result<()> {
        let port = find_free_port();
        let conc = self.worker_concurrency.to_string();
        self.spawn(name, "capibara-worker", &["--concurrency", &conc], port)?;
        self.wait_healthy(port).await
    }

    /// Fails when a child exited, quoting the end of its log.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait()? {
                let log = fs::read_to_string(&p.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "{} exited ({status}); end of {}:\n{}",
                    p.name,
                    p.log.display(),
                    tail.join("\n")
                );
            }
        }
        Ok(())
    }

    pub(crate) async fn wait_healthy(&mut self, port: u16) -> Result<()> {
        let url = format!("http://127.0.0.1:{port}/healthz");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.check_alive()?;
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("{url} did not answer within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn workers(&self) -> impl Iterator<Item = &Proc> {
        self.procs.iter().filter(|p| p.name.starts_with("worker"))
    }

    fn proc_named(&self, name: &str) -> Option<&Proc> {
        self.procs.iter().find(|p| p.name == name)
    }

    /// Jobs not yet terminal (uses the `(namespace, status, id)` index, so it stays cheap while
    /// thousands of finished jobs pile up).
    async fn open_jobs(&self) -> Result<i64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE namespace = 'default' \
             AND status IN ('queued', 'running', 'scheduled')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    /// Transactions committed in the bench database so far (`pg_stat_database`).
    async fn commits(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    pub(crate) async fn count(&self, sql: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
    }

    async fn count_tag(&self, status: &str, tag: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE status = $1 AND tags->>'phase' = $2",
        )
        .bind(status)
        .bind(tag)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Polls every 50 ms until no job is open; fails when nothing moved for 60 s.
    pub(crate) async fn wait_drained(&mut self) -> Result<()> {
        let mut last = i64::MAX;
        let mut last_change = Instant::now();
        loop {
            self.check_alive()?;
            let open = self.open_jobs().await?;
            if open == 0 {
                return Ok(());
            }
            if open < last {
                last = open;
                last_change = Instant::now();
            } else if last_change.elapsed() > Duration::from_secs(60) {
                bail!("{open} jobs still open and no progress for 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Group-commit counters in a process's `/metrics`: appends (sum of
    /// `capibara_append_batch_size`), flushes (its count) and seconds spent flushing (sum of
    /// `capibara_append_batch_seconds`).
    async fn batch_sizes(&self, port: u16) -> Flushes {
        let url = format!("http://127.0.0.1:{port}/metrics");
        let mut f = Flushes::default();
        let Ok(r) = self.http.get(&url).send().await else {
            return f;
        };
        let text = r.text().await.unwrap_or_default();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            match (it.next(), it.next().and_then(|v| v.parse::<f64>().ok())) {
                (Some("capibara_append_batch_size_sum"), Some(v)) => f.appends = v,
                (Some("capibara_append_batch_size_count"), Some(v)) => f.flushes = v,
                (Some("capibara_append_batch_seconds_sum"), Some(v)) => f.seconds = v,
                _ => {}
            }
        }
        f
    }

    /// Group-commit counters of the API and every worker, by process name.
    async fn batch_snapshot(&self) -> BTreeMap<String, Flushes> {
        let mut out = BTreeMap::new();
        for p in self
            .procs
            .iter()
            .filter(|p| p.name == "api" || p.name.starts_with("worker"))
        {
            out.insert(p.name.clone(), self.batch_sizes(p.port).await);
        }
        out
    }

    /// CPU time (ticks) of each process group, and of the whole machine.
    pub(crate) fn cpu_snapshot(&self) -> CpuSnapshot {
        let mut groups: BTreeMap<String, u64> = BTreeMap::new();
        let procs = all_procs();
        if let Some(pm) = self
            .pg
            .as_ref()
            .and_then(|pg| postmaster_pid(pg.data_dir()))
        {
            let mut t = procs.get(&pm).map(|s| s.ticks + s.child_ticks).unwrap_or(0);
            t += procs
                .values()
                .filter(|s| s.ppid == pm)
                .map(|s| s.ticks)
                .sum::<u64>();
            groups.insert("postgres".into(), t);
        }
        if let Some(port) = self.redis.as_ref().map(|r| r.port()) {
            let t = procs
                .iter()
                .filter(|(pid, s)| s.comm == "redis-server" && redis_on_port(**pid, port))
                .map(|(_, s)| s.ticks)
                .sum();
            groups.insert("redis".into(), t);
        }
        for p in &self.procs {
            let group = if p.name.starts_with("worker") {
                "workers"
            } else {
                p.name.as_str()
            };
            let t = procs.get(&p.child.id()).map(|s| s.ticks).unwrap_or(0);
            *groups.entry(group.to_string()).or_default() += t;
        }
        let me = procs.get(&std::process::id()).map(|s| s.ticks).unwrap_or(0);
        groups.insert("bench client".into(), me);
        CpuSnapshot {
            at: Instant::now(),
            groups,
            machine: machine_ticks(),
        }
    }
}

/// Group-commit counters of one process (see [`Env::batch_sizes`]).
#[derive(Debug, Clone, Copy, Default)]
struct Flushes {
    appends: f64,
    flushes: f64,
    seconds: f64,
}

// ---------------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------------

struct ProcStat {
    comm: String,
    ppid: u32,
    /// utime + stime.
    ticks: u64,
    /// cutime + cstime (children it reaped).
    child_ticks: u64,
}

fn read_stat(pid: u32) -> Option<ProcStat> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let f: Vec<&str> = s[close + 1..].split_whitespace().collect();
    // f[0] is field 3 (state); utime is field 14.
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Some(ProcStat {
        comm,
        ppid: n(1) as u32,
        ticks: n(11) + n(12),
        child_ticks: n(13) + n(14),
    })
}

fn all_procs() -> BTreeMap<u32, ProcStat> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
                if let Some(s) = read_stat(pid) {
                    out.insert(pid, s);
                }
            }
        }
    }
    out
}

fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

fn redis_on_port(pid: u32, port: u16) -> bool {
    let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
    cmd.contains(&format!(":{port}")) || cmd.contains(&format!("--port {port}"))
}

/// (busy, total) ticks of all CPUs from `/proc/stat`.
fn machine_ticks() -> (u64, u64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// VmRSS of a process in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub(crate) struct CpuSnapshot {
    at: Instant,
    groups: BTreeMap<String, u64>,
    machine: (u64, u64),
}

/// CPU use between two snapshots: % of one core per group, and the machine's busy %.
pub(crate) struct CpuUse {
    groups: Vec<(String, f64)>,
    machine_busy: f64,
}

impl CpuUse {
    pub(crate) fn between(a: &CpuSnapshot, b: &CpuSnapshot) -> CpuUse {
        let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
        let hz = clock_ticks();
        let mut groups: Vec<(String, f64)> = b
            .groups
            .iter()
            .map(|(k, v)| {
                let before = a.groups.get(k).copied().unwrap_or(0);
                (
                    k.clone(),
                    v.saturating_sub(before) as f64 / hz / secs * 100.0,
                )
            })
            .collect();
        groups.sort_by(|x, y| y.1.total_cmp(&x.1));
        let busy = b.machine.0.saturating_sub(a.machine.0) as f64;
        let total = b.machine.1.saturating_sub(a.machine.1) as f64;
        CpuUse {
            groups,
            machine_busy: if total > 0.0 {
                busy / total * 100.0
            } else {
                0.0
            },
        }
    }

    pub(crate) fn describe(&self) -> String {
        let parts: Vec<String> = self
            .groups
            .iter()
            .map(|(k, v)| format!("{k} {v:.0}%"))
            .collect();
        format!(
            "{} (machine busy {:.0}%)",
            parts.join(", "),
            self.machine_busy
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Machine facts
// ---------------------------------------------------------------------------------------------

pub(crate) struct Facts {
    cores: usize,
    cpu: String,
    mem_gib: f64,
    pub(crate) git: String,
    pub(crate) date: String,
}

impl Facts {
    pub(crate) fn collect() -> Facts {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown CPU".into());
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_gib = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kb| kb / 1024.0 / 1024.0)
            .unwrap_or(0.0);
        let git = Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty());
        let dirty = Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=no"])
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .is_some_and(|o| !o.stdout.is_empty());
        let git = match git {
            Some(g) if dirty => format!("{g}+dirty"),
            Some(g) => g,
            None => "unknown".into(),
        };
        Facts {
            cores,
            cpu,
            mem_gib,
            git,
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        }
    }

    pub(crate) fn machine(&self) -> String {
        format!(
            "{} cores (nproc), {}, {:.1} GiB memory",
            self.cores, self.cpu, self.mem_gib
        )
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

pub(crate) fn bytes(v: &serde_json::Value) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(v)?)
}

/// POSTs JSON bytes; fails on a non-2xx answer. The body is read (and dropped) so the
/// connection goes back to the pool.
pub(crate) async fn post(http: &Client, url: &str, body: Vec<u8>) -> Result<()> {
    let r = http
        .post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = r.status();
    let text = r.bytes().await?;
    if !status.is_success() {
        bail!(
            "POST {url} answered {status}: {}",
            String::from_utf8_lossy(&text[..text.len().min(500)])
        );
    }
    Ok(())
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub(crate) fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

pub(crate) fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
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
}

/// Submits `n` jobs in batches while the running workers execute them; measures from the first
/// submit until all are succeeded.
async fn end_to_end(a: &BenchArgs, env: &mut Env, tag: &str) -> Result<E2e> {
    let events0 = env.count("SELECT count(*) FROM events").await?;
    let commits0 = env.commits().await?;
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
    Ok(E2e {
        elapsed,
        submit_elapsed: submit_elapsed.unwrap_or_default(),
        events: events1 - events0,
        cpu: CpuUse::between(&cpu0, &cpu1),
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
