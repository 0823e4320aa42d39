//! `capibara bench-fanout`: live fan-out of the event firehose (`GET /v1/events` over SSE).
//!
//! Self-contained like `capibara bench`: starts a private Postgres and Redis under a bench
//! directory and the real `capibara-api`, `capibara-scheduler` and one `capibara-worker` found
//! next to this executable (build them in the same profile). Then:
//!
//! 1. runs a few warm-up jobs and reads the API's resident memory (VmRSS);
//! 2. opens C SSE clients on `/v1/events` (default 1,000; `--clients`), each on its own HTTP
//!    connection, and reads the RSS again → memory per connected client;
//! 3. submits `echo` jobs at a paced rate (default 200/s for 10 s) while the worker runs them;
//! 4. every client timestamps each event frame when its bytes arrive (it only parses the frame's
//!    `id`); fan-out latency is that time minus the event's `recorded_at`, read from Postgres by
//!    id at the end (same machine, same clock). `recorded_at` is set by
//!    the writer just before its append, so the figure includes the group commit, the Redis hint,
//!    the tailer's read and the fan-out to every client;
//! 5. waits until every client has received every event written during the phase, and checks
//!    that each got each of them exactly once.
//!
//! It prints a line per step and a markdown table for `docs/benchmarks.md`. The bench client
//! shares the machine with everything it measures; its CPU use is reported.

use std::{
    fs,
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::harness::server_bin_dir;
use crate::harness::{named_dir, profile, Env};
use anyhow::{anyhow, bail, Context, Result};
use capibara_shared::shutdown;
use clap::Args;
use futures::StreamExt;
use reqwest::{header, Client};
use serde_json::json;

/// `capibara bench-fanout` options.
#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Concurrent SSE clients on `GET /v1/events`.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Paced submit rate, jobs/s.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Length of the paced phase, seconds.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// `--concurrency` of the worker process.
    #[arg(long, default_value_t = 64)]
    worker_concurrency: usize,
    /// Run Postgres with fsync/synchronous_commit/full_page_writes off (not durable).
    #[arg(long)]
    unsafe_pg: bool,
    /// Directory for the servers' data and the logs (default `target/bench/fanout-<time>` next
    /// to a cargo target directory, else under the temp directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the data (not only the logs) after a successful run.
    #[arg(long)]
    keep: bool,
}

/// Set when this process re-executed itself under a raised `ulimit -n`.
const FD_RAISED: &str = "CAPIBARA_BENCH_FD_RAISED";

/// Runs the benchmark (see the module docs).
pub async fn run(a: FanoutArgs) -> Result<()> {
    if a.clients == 0 || a.rate == 0 || a.secs <= 0.0 {
        bail!("--clients, --rate and --secs must be positive");
    }
    // Each client is a socket here and one in the API (which inherits this limit).
    let needed = a.clients as u64 + 512;
    let (soft, hard) = open_files_limit();
    if soft < needed {
        if std::env::var_os(FD_RAISED).is_none() && hard >= needed {
            println!(
                "raising the open-files limit from {soft} to {needed} (ulimit -n) and re-running"
            );
            let status = Command::new("sh")
                .arg("-c")
                .arg(format!("ulimit -n {needed} && exec \"$0\" \"$@\""))
                .arg(std::env::current_exe()?)
                .args(std::env::args_os().skip(1))
                .env(FD_RAISED, "1")
                .status()
                .context("re-running under sh")?;
            std::process::exit(status.code().unwrap_or(1));
        }
        bail!(
            "{} clients need about {needed} open files; the limit is {soft} (hard {hard}): \
             raise it with `ulimit -n {needed}`",
            a.clients
        );
    }
    let bin_dir = server_bin_dir()?;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => named_dir(&bin_dir, "fanout"),
    };
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::path::absolute(&dir)?;

    let machine = machine();
    println!(
        "capibara bench-fanout — {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    println!("machine: {machine}");
    println!(
        "build: {}; {} SSE clients; {} jobs/s for {} s; bench dir: {}",
        profile(),
        a.clients,
        a.rate,
        a.secs,
        dir.display()
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
    let outcome = tokio::select! {
        r = measure(&a, &mut env, &machine) => r,
        _ = shutdown::signal() => Err(anyhow!("interrupted")),
    };
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

/// (soft, hard) `Max open files` of this process.
fn open_files_limit() -> (u64, u64) {
    let s = fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = s.lines().find(|l| l.starts_with("Max open files"));
    let nums: Vec<u64> = line
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| match w {
                    "unlimited" => Some(u64::MAX),
                    w => w.parse().ok(),
                })
                .collect()
        })
        .unwrap_or_default();
    (
        nums.first().copied().unwrap_or(1024),
        nums.get(1).copied().unwrap_or(1024),
    )
}

fn machine() -> String {
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
    format!("{cores} cores (nproc), {cpu}, {mem_gib:.1} GiB memory")
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

// The processes run on `capibara bench`'s `Env`; these read what only this bench needs.

/// CPU ticks of Postgres (postmaster and backends), the worker and the scheduler.
fn other_ticks(env: &Env) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let pm = env.pg.as_ref().and_then(|pg| {
        fs::read_to_string(pg.data_dir().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse::<u32>()
            .ok()
    });
    if let Some(pm) = pm {
        let mut t = cpu_ticks(pm);
        if let Ok(rd) = fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                if parent_pid(pid) == Some(pm) {
                    t += cpu_ticks(pid);
                }
            }
        }
        out.push(("Postgres".to_string(), t));
    }
    for p in env.procs.iter().filter(|p| p.name != "api") {
        out.push((p.name.clone(), cpu_ticks(p.child.id())));
    }
    out
}

fn api_pid(env: &Env) -> u32 {
    env.procs
        .iter()
        .find(|p| p.name == "api")
        .map(|p| p.child.id())
        .unwrap_or(0)
}

/// One counter of the API's `/metrics` (0 when absent).
async fn api_metric(env: &Env, name: &str) -> f64 {
    let Ok(r) = env.http.get(env.api("/metrics")).send().await else {
        return 0.0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(name))
                .then(|| it.next().and_then(|v| v.parse::<f64>().ok()))
                .flatten()
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------------

/// VmRSS of a process in MiB.
fn rss_mib(pid: u32) -> f64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = s.rfind(')') else { return 0 };
    let f: Vec<&str> = s[close + 1..].split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn parent_pid(pid: u32) -> Option<u32> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = s.rfind(')')?;
    s[close + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// (busy, total) ticks of all CPUs.
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

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// What one SSE client saw.
#[derive(Default)]
struct Seen {
    /// `(event id, receipt time in µs since the Unix epoch)` of each event frame.
    got: Vec<(i64, i64)>,
    error: Option<String>,
}

/// One SSE client: a plain TCP connection that sent `GET /v1/events` and read the response
/// head (so the server has subscribed it). Not reqwest: at ~600,000 frames/s on a small machine
/// the client must cost as little as possible, so it reads the socket itself and never decodes
/// the chunked framing (the server writes whole SSE frames per chunk; chunk-size lines are just
/// lines that are neither `id:` nor empty).
struct RawSse {
    stream: tokio::net::TcpStream,
    /// Bytes read after the response head.
    rest: Vec<u8>,
}

async fn open(addr: &str, key: &str) -> Result<RawSse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    stream
        .write_all(
            format!(
                "GET /v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
                 Accept: text/event-stream\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let mut buf = Vec::with_capacity(1024);
    let mut tmp = [0u8; 1024];
    loop {
        let n = stream.read(&mut tmp).await?;
        if n == 0 {
            bail!("the API closed the connection before answering");
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_string();
            if !head.starts_with("HTTP/1.1 200") {
                bail!("GET /v1/events answered: {head}");
            }
            return Ok(RawSse {
                stream,
                rest: buf[i + 4..].to_vec(),
            });
        }
    }
}

/// Splits complete SSE frames off the front of `buf`: calls `on_id` with each event frame's id
/// and returns how many bytes were consumed. Lines are found with `BufRead::skip_until` (a
/// memchr), so the client keeps up with a thousand streams on a small machine.
fn frames(buf: &[u8], mut on_id: impl FnMut(i64)) -> usize {
    use std::io::BufRead;
    let mut consumed = 0;
    let mut rest = buf;
    let mut id: Option<i64> = None;
    loop {
        let line_start = rest;
        let n = rest.skip_until(b'\n').unwrap_or(0);
        if n == 0 || line_start[n - 1] != b'\n' {
            return consumed; // incomplete line
        }
        let line = &line_start[..n - 1];
        if line.is_empty() {
            // End of a frame (a keep-alive comment has no id).
            if let Some(id) = id.take() {
                on_id(id);
            }
            consumed = buf.len() - rest.len();
        } else if let Some(v) = line.strip_prefix(b"id:") {
            id = std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.trim().parse().ok());
        }
    }
}

/// Reads frames until `stop`; notes the receipt time of each event frame.
async fn read_client(
    sse: RawSse,
    total: Arc<AtomicUsize>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Seen {
    use tokio::io::AsyncReadExt;
    let RawSse {
        mut stream,
        rest: mut buf,
    } = sse;
    let mut seen = Seen::default();
    let now = chrono::Utc::now().timestamp_micros();
    let done = frames(&buf, |id| seen.got.push((id, now)));
    buf.drain(..done);
    total.fetch_add(seen.got.len(), Ordering::Relaxed);
    let mut tmp = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = stream.read(&mut tmp) => r,
            _ = stop.changed() => return seen,
        };
        let n = match n {
            Ok(0) => {
                seen.error = Some("the stream closed".into());
                return seen;
            }
            Ok(n) => n,
            Err(e) => {
                seen.error = Some(e.to_string());
                return seen;
            }
        };
        let now = chrono::Utc::now().timestamp_micros();
        let before = seen.got.len();
        let done = if buf.is_empty() {
            let done = frames(&tmp[..n], |id| seen.got.push((id, now)));
            buf.extend_from_slice(&tmp[done..n]);
            0
        } else {
            buf.extend_from_slice(&tmp[..n]);
            frames(&buf, |id| seen.got.push((id, now)))
        };
        buf.drain(..done);
        total.fetch_add(seen.got.len() - before, Ordering::Relaxed);
    }
}

async fn post(http: &Client, url: &str, body: Vec<u8>) -> Result<()> {
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

fn percentile(sorted: &[f32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1])
}

/// Paced single submits: `total` jobs at `rate`/s; returns the achieved rate.
async fn paced_submits(env: &Env, total: usize, rate: u32, tag: &str) -> Result<f64> {
    let body = serde_json::to_vec(&json!({"kind": "echo", "input": {}, "tags": {"phase": tag}}))?;
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for _ in 0..total {
        interval.tick().await;
        let (http, url, body) = (env.http.clone(), env.api("/v1/jobs"), body.clone());
        tasks.push(tokio::spawn(async move { post(&http, &url, body).await }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn measure(a: &FanoutArgs, env: &mut Env, machine: &str) -> Result<String> {
    let api_pid = api_pid(env);

    // 1. Warm up, then the idle API's memory.
    paced_submits(env, 200, 1000, "warmup").await?;
    env.wait_drained().await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = rss_mib(api_pid);
    println!("1. API idle after 200 warm-up jobs: VmRSS {rss_idle:.1} MiB");

    // 2. Connect the clients, each on its own connection (HTTP/1.1: a streaming response holds
    //    its connection).
    let addr = format!("127.0.0.1:{}", env.api_port);
    let started = Instant::now();
    let responses: Vec<Result<RawSse>> = futures::stream::iter(0..a.clients)
        .map(|_| {
            let (addr, key) = (addr.clone(), env.admin_key.clone());
            async move { open(&addr, &key).await }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let connect_time = started.elapsed();
    let total = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut readers = Vec::with_capacity(a.clients);
    for r in responses {
        readers.push(tokio::spawn(read_client(
            r?,
            total.clone(),
            stop_rx.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.check_alive()?;
    let rss_connected = rss_mib(api_pid);
    let per_client_kib = (rss_connected - rss_idle) * 1024.0 / a.clients as f64;
    println!(
        "2. {} SSE clients connected in {:.2} s: API VmRSS {rss_connected:.1} MiB → {per_client_kib:.1} KiB per client",
        a.clients,
        connect_time.as_secs_f64()
    );

    // 3. Paced submits while the worker runs them.
    let events0 = env.count("SELECT count(*) FROM events").await?;
    let position0 = env
        .count("SELECT coalesce(max(position), 0) FROM events")
        .await?;
    let batches0 = api_metric(env, "capibara_firehose_batches_total").await;
    let lagged0 = api_metric(env, "capibara_firehose_lagged_total").await;
    let hz = clock_ticks();
    let me = std::process::id();
    let (api0, me0, others0, m0, t0) = (
        cpu_ticks(api_pid),
        cpu_ticks(me),
        other_ticks(env),
        machine_ticks(),
        Instant::now(),
    );
    let n = ((a.rate as f64) * a.secs).round().max(1.0) as usize;
    let achieved = paced_submits(env, n, a.rate, "fanout").await?;
    env.wait_drained().await?;
    let events1 = env.count("SELECT count(*) FROM events").await?;
    let expected = (events1 - events0) as usize;
    // Every client gets every event of the phase.
    let deadline = Instant::now() + Duration::from_secs(60);
    while total.load(Ordering::Relaxed) < expected * a.clients {
        if Instant::now() > deadline {
            bail!(
                "clients received {} of {} events after 60 s",
                total.load(Ordering::Relaxed),
                expected * a.clients
            );
        }
        env.check_alive()?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let (api1, me1, others1, m1) = (
        cpu_ticks(api_pid),
        cpu_ticks(me),
        other_ticks(env),
        machine_ticks(),
    );
    let rss_after = rss_mib(api_pid);
    let lagged = api_metric(env, "capibara_firehose_lagged_total").await - lagged0;
    let batches = api_metric(env, "capibara_firehose_batches_total").await - batches0;
    let _ = stop_tx.send(true);
    // recorded_at of every event of the phase, by id.
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT position, (extract(epoch FROM recorded_at) * 1000000)::bigint FROM events \
         WHERE position > $1",
    )
    .bind(position0)
    .fetch_all(&env.pool)
    .await?;
    let recorded: std::collections::HashMap<i64, i64> = rows.into_iter().collect();
    let mut lat: Vec<f32> = Vec::with_capacity(expected * a.clients);
    let (mut min_events, mut max_events, mut errors, mut unknown, mut dups) =
        (usize::MAX, 0, 0, 0, 0);
    for r in readers {
        let seen = r.await?;
        if let Some(e) = &seen.error {
            errors += 1;
            if errors == 1 {
                eprintln!("a client failed: {e}");
            }
        }
        min_events = min_events.min(seen.got.len());
        max_events = max_events.max(seen.got.len());
        let mut ids: Vec<i64> = seen.got.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        dups += seen.got.len() - ids.len();
        for (id, at) in seen.got {
            match recorded.get(&id) {
                Some(rec) => lat.push((at - rec) as f32 / 1000.0),
                None => unknown += 1,
            }
        }
    }
    if errors > 0 || min_events != expected || max_events != expected || unknown > 0 || dups > 0 {
        bail!(
            "each client should have the {expected} events once; got {min_events}..={max_events} \
             ({errors} failed, {unknown} unknown ids, {dups} duplicates)"
        );
    }
    lat.sort_by(f32::total_cmp);
    let api_cpu = (api1 - api0) as f64 / hz / secs * 100.0;
    let me_cpu = (me1 - me0) as f64 / hz / secs * 100.0;
    let busy = (m1.0 - m0.0) as f64 / (m1.1 - m0.1).max(1) as f64 * 100.0;
    let others = others1
        .iter()
        .zip(&others0)
        .map(|((name, t1), (_, t0))| {
            format!(
                "{name} {:.0}%",
                t1.saturating_sub(*t0) as f64 / hz / secs * 100.0
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let (p50, p90, p99, max) = (
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f32::NAN),
    );
    println!(
        "3. {n} jobs at {} jobs/s (achieved {achieved:.0}/s) → {expected} events, each delivered to all {} clients ({} deliveries, {:.0}/s)",
        a.rate,
        a.clients,
        lat.len(),
        lat.len() as f64 / secs
    );
    println!(
        "   fan-out latency (client receipt − recorded_at): p50 {p50:.2} ms, p90 {p90:.2} ms, p99 {p99:.2} ms, max {max:.2} ms; lagged receivers: {lagged}; tailer batches: {batches} ({:.1} events each)",
        expected as f64 / batches.max(1.0)
    );
    println!(
        "   CPU, % of one core: API {api_cpu:.0}%, bench client {me_cpu:.0}%, {others} (machine busy {busy:.0}%); API VmRSS after: {rss_after:.1} MiB"
    );

    let mut t = String::new();
    t.push_str(&format!(
        "Build: {}; {} SSE clients; {n} `echo` jobs at {} jobs/s; 1 worker (`--concurrency {}`); Postgres {}; {machine}.\n",
        profile(),
        a.clients,
        a.rate,
        a.worker_concurrency,
        if a.unsafe_pg { "fsync off" } else { "with durable commits" },
    ));
    t.push_str("\n| Figure | Value |\n|---|---|\n");
    t.push_str(&format!(
        "| Clients connected (each its own connection) | {} in {:.2} s |\n",
        a.clients,
        connect_time.as_secs_f64()
    ));
    t.push_str(&format!(
        "| Events fanned out | {expected} events × {} clients = {} deliveries ({:.0}/s), every client got every event once |\n",
        a.clients,
        lat.len(),
        lat.len() as f64 / secs
    ));
    t.push_str(&format!(
        "| Fan-out latency (receipt − `recorded_at`) | **p50 {p50:.2} ms**, p90 {p90:.2} ms, **p99 {p99:.2} ms**, max {max:.2} ms |\n"
    ));
    t.push_str(&format!(
        "| API VmRSS: idle → {} clients connected → after the phase | {rss_idle:.1} → {rss_connected:.1} → {rss_after:.1} MiB |\n",
        a.clients
    ));
    t.push_str(&format!(
        "| Memory per connected client | **{per_client_kib:.1} KiB** |\n"
    ));
    t.push_str(&format!(
        "| CPU during the phase, % of one core | API {api_cpu:.0}%, bench client (reading {} streams) {me_cpu:.0}%, {others}; machine busy {busy:.0}% |\n",
        a.clients
    ));
    t.push_str(&format!(
        "| Tailer batches (one write per client each) | {batches} ({:.1} events per batch) |\n",
        expected as f64 / batches.max(1.0)
    ));
    t.push_str(&format!(
        "| Receivers that lagged and caught up from Postgres | {lagged} |\n"
    ));
    Ok(t)
}
