//! What every benchmark shares: the bench directory, the private Postgres and Redis with the
//! real binaries spawned against them ([`Env`]), CPU and memory read from `/proc`, the machine's
//! facts printed with each figure, and small helpers for percentiles and HTTP posts.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use capibara_dev_services::{
    find_free_port, PostgresOptions, PostgresServer, RedisOptions, RedisServer,
};
use reqwest::{header, Client};
use sqlx::PgPool;

use crate::jobs::BenchArgs;

pub(crate) fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// The directory of this executable, where the server binaries it spawns must be (built in
/// the same profile).
pub(crate) fn server_bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let bin_dir = exe
        .parent()
        .with_context(|| format!("{} has no parent directory", exe.display()))?
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
    Ok(bin_dir)
}

/// `<target>/bench/run-<unix time>` when the binary is in `<target>/<profile>/`, else a
/// directory under the temp dir.
pub(crate) fn default_dir(bin_dir: &Path) -> PathBuf {
    named_dir(bin_dir, "run")
}

/// The run directory (`--dir`, else `fallback`), created and made absolute.
pub(crate) fn run_dir(dir: Option<&PathBuf>, fallback: PathBuf) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let dir = dir.cloned().unwrap_or(fallback);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(std::path::absolute(&dir)?)
}

/// The lines every measuring command opens with: what ran, on which machine and build, and
/// whether commits were durable (`extra` is appended to the build line).
pub(crate) fn print_header(command: &str, facts: &Facts, unsafe_pg: bool, extra: &str) {
    println!("{command} — {}", facts.date);
    println!("machine: {}", facts.machine());
    println!(
        "build: {} (git {}); Postgres durable commits: {}{extra}",
        profile(),
        facts.git,
        if unsafe_pg { "OFF (--unsafe-pg)" } else { "on" },
    );
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
    /// `CAPIBARA_SECRETS_KEY` of every process (secrets are encrypted at rest).
    pub(crate) secrets_key: String,
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

/// Postgres (with database `db`; durable unless `fast_unsafe`) and Redis (no persistence: it
/// only dispatches), under `<dir>/postgres/data` and `<dir>/redis`, on free ports.
pub(crate) async fn start_servers(
    dir: &Path,
    fast_unsafe: bool,
    db: &str,
) -> Result<(PostgresServer, RedisServer)> {
    let pg_dir = dir.join("postgres").join("data");
    let redis_dir = dir.join("redis");
    let db = db.to_string();
    tokio::task::spawn_blocking(move || {
        let pg = PostgresServer::start(PostgresOptions {
            data_dir: pg_dir,
            port: 0,
            fast_unsafe,
        })
        .context("starting Postgres")?;
        pg.ensure_database(&db)?;
        let redis = RedisServer::start(RedisOptions {
            dir: redis_dir,
            port: 0,
            persist: false,
        })
        .context("starting Redis")?;
        anyhow::Ok((pg, redis))
    })
    .await?
}

/// Serves `app` on a free loopback port (a stand-in receiver) until the task is aborted.
pub(crate) async fn serve_loopback(
    app: axum::Router,
    what: &'static str,
) -> Result<(u16, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .with_context(|| format!("binding the {what}"))?;
    let port = listener.local_addr()?.port();
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("{what} stopped: {e}");
        }
    });
    Ok((port, server))
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
        let (mut pg, redis) = start_servers(dir, fast_unsafe, "bench").await?;
        let pg = tokio::task::spawn_blocking(move || {
            statement_stats(&mut pg);
            pg
        })
        .await?;
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
        // The bench's own queries run as another role, so the per-job counts leave them out.
        let observer_url = match (db_url.find("://"), db_url.find('@')) {
            (Some(s), Some(at)) => format!("{}{OBSERVER}{}", &db_url[..s + 3], &db_url[at..]),
            _ => db_url.clone(),
        };
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&observer_url)
            .await
            .context("connecting to the bench database")?;
        let (pg_version, sync_commit, fsync): (String, String, String) = sqlx::query_as(
            "SELECT current_setting('server_version'), current_setting('synchronous_commit'),
                    current_setting('fsync')",
        )
        .fetch_one(&pool)
        .await?;
        let redis_version = Command::new("redis-server")
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("v=").map(str::to_string))
            })
            .unwrap_or_else(|| "unknown".into());
        println!(
            "versions: PostgreSQL {pg_version} (synchronous_commit={sync_commit}, fsync={fsync}), Redis {redis_version} (no persistence: it only dispatches)"
        );
        let mut env = Env {
            procs: Vec::new(),
            redis_url: redis.url(),
            redis: Some(redis),
            pg: Some(pg),
            dir: dir.to_path_buf(),
            bin_dir: bin_dir.to_path_buf(),
            db_url,
            admin_key,
            secrets_key: capibara_shared::crypto::generate_key(),
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
        // The servers get the bench's settings only, and the settings named in
        // `CAPIBARA_BENCH_KEEP_ENV` (comma-separated: a setting measured on purpose).
        let keep = std::env::var("CAPIBARA_BENCH_KEEP_ENV").unwrap_or_default();
        let keep: Vec<&str> = keep.split(',').map(str::trim).collect();
        for (k, _) in std::env::vars_os() {
            let name = k.to_string_lossy();
            if name.starts_with("CAPIBARA_") && !keep.contains(&name.as_ref()) {
                c.env_remove(k);
            }
        }
        let own = format!("127.0.0.1:{port}");
        c.args(args)
            .env("CAPIBARA_DATABASE_URL", &self.db_url)
            .env("CAPIBARA_REDIS_URL", &self.redis_url)
            .env("CAPIBARA_REDIS_PREFIX", "bench")
            .env("CAPIBARA_ADMIN_KEY", &self.admin_key)
            // Secrets are encrypted at rest; a key for this run's fresh database.
            .env("CAPIBARA_SECRETS_KEY", &self.secrets_key)
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

    pub(crate) fn workers(&self) -> impl Iterator<Item = &Proc> {
        self.procs.iter().filter(|p| p.name.starts_with("worker"))
    }

    pub(crate) fn proc_named(&self, name: &str) -> Option<&Proc> {
        self.procs.iter().find(|p| p.name == name)
    }

    /// Jobs not yet terminal (uses the `(namespace, status, id)` index, so it stays cheap while
    /// thousands of finished jobs pile up).
    pub(crate) async fn open_jobs(&self) -> Result<i64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE namespace = 'default' \
             AND status IN ('queued', 'running', 'scheduled')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    /// Transactions committed in the bench database so far (`pg_stat_database`).
    /// What Postgres did so far, for per-job figures ([`PgWork::per_job`]); None where
    /// `pg_stat_statements` is not installed.
    pub(crate) async fn pg_work(&self) -> Option<PgWork> {
        let row: Result<(i64, i64, i64, i64, i64, i64, f64), _> = sqlx::query_as(
            "SELECT
               (SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements s
                 WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND s.userid <> (SELECT oid FROM pg_roles WHERE rolname = current_user)),
               (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),
               (SELECT coalesce(sum(n_tup_ins), 0)::int8 FROM pg_stat_user_tables),
               (SELECT coalesce(sum(n_tup_upd), 0)::int8 FROM pg_stat_user_tables),
               (SELECT coalesce(sum(n_tup_hot_upd), 0)::int8 FROM pg_stat_user_tables),
               (SELECT coalesce(sum(n_tup_del), 0)::int8 FROM pg_stat_user_tables),
               (SELECT wal_bytes::float8 FROM pg_stat_wal)",
        )
        .fetch_one(&self.pool)
        .await;
        row.ok().map(
            |(statements, commits, inserted, updated, hot, deleted, wal)| PgWork {
                statements,
                commits,
                inserted,
                updated,
                hot,
                deleted,
                wal,
            },
        )
    }

    pub(crate) async fn commits(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    pub(crate) async fn count(&self, sql: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
    }

    pub(crate) async fn count_tag(&self, status: &str, tag: &str) -> Result<i64> {
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
    pub(crate) async fn batch_sizes(&self, port: u16) -> Flushes {
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
    pub(crate) async fn batch_snapshot(&self) -> BTreeMap<String, Flushes> {
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
pub(crate) struct Flushes {
    pub(crate) appends: f64,
    pub(crate) flushes: f64,
    pub(crate) seconds: f64,
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
pub(crate) fn rss_mib(pid: u32) -> Option<f64> {
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
    secs: f64,
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
            secs,
            machine_busy: if total > 0.0 {
                busy / total * 100.0
            } else {
                0.0
            },
        }
    }

    /// CPU seconds of one group (`postgres`, `api`, …) over the span.
    pub(crate) fn seconds(&self, group: &str) -> f64 {
        self.groups
            .iter()
            .find(|(k, _)| k == group)
            .map_or(0.0, |(_, pct)| pct / 100.0 * self.secs)
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

/// The role the bench's own connection uses (see [`Env::pg_work`]).
const OBSERVER: &str = "bench_observer";

/// Creates the observer role and loads `pg_stat_statements` (a restart). A Postgres without
/// the module still runs the bench, without the per-job statement counts.
fn statement_stats(pg: &mut PostgresServer) {
    let role = format!(
        "DO $$ BEGIN CREATE ROLE {OBSERVER} LOGIN SUPERUSER;
         EXCEPTION WHEN duplicate_object THEN NULL; END $$;"
    );
    let mut setup = || -> Result<()> {
        pg.psql("postgres", &role)?;
        pg.psql(
            "postgres",
            "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'",
        )?;
        pg.restart()?;
        pg.psql("bench", "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")?;
        Ok(())
    };
    if let Err(e) = setup() {
        eprintln!("pg_stat_statements unavailable ({e:#}); no per-job statement counts");
    }
}

/// Cumulative counters of Postgres' work (statements of the Capibara processes, commits, rows
/// written, WAL).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PgWork {
    statements: i64,
    commits: i64,
    inserted: i64,
    updated: i64,
    hot: i64,
    deleted: i64,
    wal: f64,
}

impl PgWork {
    /// Per job between `a` and `b`, with Postgres' CPU time over the same span.
    pub(crate) fn per_job(a: &PgWork, b: &PgWork, jobs: usize, pg_cpu_secs: f64) -> String {
        let n = jobs.max(1) as f64;
        let upd = (b.updated - a.updated) as f64;
        let hot = (b.hot - a.hot) as f64;
        format!(
            "{:.2} statements (round trips), {:.2} commits, rows written {:.2} (insert {:.2}, update {:.2} of which HOT {:.0}%, delete {:.2}), WAL {} B, Postgres CPU {:.3} ms",
            (b.statements - a.statements) as f64 / n,
            (b.commits - a.commits) as f64 / n,
            ((b.inserted - a.inserted) as f64 + upd + (b.deleted - a.deleted) as f64) / n,
            (b.inserted - a.inserted) as f64 / n,
            upd / n,
            if upd > 0.0 { hot / upd * 100.0 } else { 0.0 },
            (b.deleted - a.deleted) as f64 / n,
            thousands((b.wal - a.wal) / n),
            pg_cpu_secs * 1000.0 / n,
        )
    }
}
