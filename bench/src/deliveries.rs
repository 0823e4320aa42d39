//! `capibara bench-deliveries`: throughput and latency of webhook deliveries (`callback_url`).
//!
//! Like `capibara bench` (and with its helpers) it starts a private Postgres and Redis and spawns
//! the real `capibara-api`, `capibara-scheduler` and one `capibara-worker`
//! (`--queues default,callbacks`) next to this executable, with a fresh
//! `CAPIBARA_WEBHOOK_SECRET` and `CAPIBARA_OUTBOUND_ALLOW_PRIVATE=true`. It runs its own webhook
//! receiver in this process on 127.0.0.1, which checks every request's Standard Webhooks
//! signature and takes its latency as receive time − the payload's `timestamp` (the terminal
//! event's `recorded_at`; same machine, same clock).
//!
//! A. throughput: N `echo` jobs with a `callback_url`, submitted in batches; from the first
//!    submit until the receiver holds N verified deliveries;
//! B. latency: single submits paced at `--rate` for `--secs`, with the system otherwise idle.
//!
//! For each phase it also splits the path from the database: terminal event → delivery row
//! (`deliveries.created_at`, the deliverer) → `callback.deliver` job started (`jobs.started_at`,
//! queue and pick-up) → received (the worker loads, signs and POSTs).

use std::{
    collections::{HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use axum::{body::Bytes, extract::State, http::HeaderMap, http::StatusCode, Router};
use capibara_dev_services::find_free_port;
use capibara_shared::{domain::webhook::WebhookSecret, shutdown};
use chrono::{DateTime, Utc};
use reqwest::Client;
use serde_json::{json, Value};

use crate::harness::server_bin_dir;
use crate::harness::{
    bytes, default_dir, percentile, post, print_header, profile, run_dir, sorted, thousands,
    CpuUse, Env, Facts,
};

/// `capibara bench-deliveries` options.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Jobs (and so deliveries) of the throughput phase (A).
    #[arg(long, default_value_t = 5_000)]
    jobs: usize,
    /// Jobs per `POST /v1/jobs/batch` request in phase A (at most 1000).
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Concurrent batch requests in phase A.
    #[arg(long, default_value_t = 4)]
    batch_concurrency: usize,
    /// `--concurrency` of the worker process.
    #[arg(long, default_value_t = 64)]
    worker_concurrency: usize,
    /// Paced submit rate of the latency phase (B), jobs/s.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Length of the latency phase (B), seconds.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Smoke test: divide the job count and the latency phase's length by 10.
    #[arg(long)]
    quick: bool,
    /// Run Postgres with fsync/synchronous_commit/full_page_writes off (not durable).
    #[arg(long)]
    unsafe_pg: bool,
    /// Directory for the servers' data and the logs (default as for `capibara bench`).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the data (not only the logs) after a successful run.
    #[arg(long)]
    keep: bool,
    /// `CAPIBARA_LOG` of the spawned processes (e.g. `info,sqlx=warn` to see more).
    #[arg(long, default_value = "warn")]
    log: String,
}

/// Runs the benchmark (see the module docs).
pub async fn run(mut a: Args) -> Result<()> {
    if a.quick {
        a.jobs = (a.jobs / 10).max(1);
        a.secs /= 10.0;
    }
    if a.jobs == 0 || a.batch_size == 0 || a.batch_size > 1000 || a.batch_concurrency == 0 {
        bail!("--jobs and --batch-concurrency must be positive, --batch-size 1 to 1000");
    }
    if a.rate == 0 || a.secs <= 0.0 || a.worker_concurrency == 0 {
        bail!("--rate, --secs and --worker-concurrency must be positive");
    }
    let bin_dir = server_bin_dir()?;
    let dir = run_dir(a.dir.as_ref(), default_dir(&bin_dir))?;

    let facts = Facts::collect();
    print_header("capibara bench-deliveries", &facts, a.unsafe_pg, "");
    println!(
        "A: {} jobs, batches of {} × {} concurrent; B: {}/s for {} s; worker concurrency {}",
        a.jobs, a.batch_size, a.batch_concurrency, a.rate, a.secs, a.worker_concurrency
    );
    println!("bench dir: {}", dir.display());

    let (secret, encoded) = WebhookSecret::generate();
    let receiver = Receiver::start(secret).await?;
    println!("receiver: {}", receiver.url);
    let extra = [
        ("CAPIBARA_WEBHOOK_SECRET", encoded),
        ("CAPIBARA_OUTBOUND_ALLOW_PRIVATE", "true".to_string()),
        ("CAPIBARA_LOG", a.log.clone()),
    ];
    let mut env = start_env(&a, &dir, &bin_dir, &extra).await?;
    let outcome = tokio::select! {
        r = phases(&a, &mut env, &receiver, &facts) => r,
        _ = shutdown::signal() => Err(anyhow!("interrupted")),
    };
    // Children first, then Redis and Postgres (Env's Drop and field order).
    let pg_dir = env.pg.as_ref().map(|p| p.data_dir().to_path_buf());
    drop(env);
    receiver.server.abort();
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
// Processes
// ---------------------------------------------------------------------------------------------

/// The next transaction id Postgres will assign (uses none up); reported with the figures.
async fn next_xid(pool: &sqlx::PgPool) -> Result<u64> {
    let x: String = sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
        .fetch_one(pool)
        .await?;
    Ok(x.parse()?)
}

/// Postgres, Redis, the API, the scheduler and one worker (`--queues default,callbacks`), all
/// with `extra` in their environment.
async fn start_env(a: &Args, dir: &Path, bin_dir: &Path, extra: &[(&str, String)]) -> Result<Env> {
    let extra = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let mut env = Env::start_with(a.unsafe_pg, a.worker_concurrency, extra, dir, bin_dir).await?;
    let worker_port = find_free_port();
    let conc = a.worker_concurrency.to_string();
    env.spawn(
        "worker-1",
        "capibara-worker",
        &["--queues", "default,callbacks", "--concurrency", &conc],
        worker_port,
    )?;
    env.wait_healthy(worker_port).await?;
    Ok(env)
}

// ---------------------------------------------------------------------------------------------
// Receiver
// ---------------------------------------------------------------------------------------------

/// One verified delivery as received.
#[derive(Debug, Clone)]
struct Receipt {
    /// `webhook-id` (the delivery id).
    delivery_id: String,
    /// `data.tags.phase` of the job.
    phase: String,
    at: Instant,
    received_at: DateTime<Utc>,
    /// `received_at` − the payload's `timestamp`, ms.
    latency_ms: f64,
}

#[derive(Default)]
struct Inbox {
    receipts: Vec<Receipt>,
    ids: HashSet<String>,
    by_phase: HashMap<String, usize>,
    /// Requests whose signature (or `webhook-*` headers, or timestamp tolerance) failed.
    bad_signature: usize,
    /// Verified requests whose body was not `{type, timestamp, data}`.
    bad_body: usize,
    /// Verified requests with a `webhook-id` already received.
    duplicates: usize,
}

struct ReceiverState {
    secret: WebhookSecret,
    inbox: Mutex<Inbox>,
}

/// The in-process webhook receiver (axum on 127.0.0.1, any path).
struct Receiver {
    url: String,
    state: Arc<ReceiverState>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(secret: WebhookSecret) -> Result<Receiver> {
        let state = Arc::new(ReceiverState {
            secret,
            inbox: Mutex::new(Inbox::default()),
        });
        let app = Router::new().fallback(receive).with_state(state.clone());
        let (port, server) = crate::harness::serve_loopback(app, "webhook receiver").await?;
        Ok(Receiver {
            url: format!("http://127.0.0.1:{port}/hook"),
            state,
            server,
        })
    }

    fn inbox<T>(&self, f: impl FnOnce(&Inbox) -> T) -> T {
        f(&self.state.inbox.lock().expect("inbox lock"))
    }

    fn count(&self, phase: &str) -> usize {
        self.inbox(|i| i.by_phase.get(phase).copied().unwrap_or(0))
    }

    fn receipts(&self, phase: &str) -> Vec<Receipt> {
        self.inbox(|i| {
            i.receipts
                .iter()
                .filter(|r| r.phase == phase)
                .cloned()
                .collect()
        })
    }

    /// (bad signatures, bad bodies, duplicates).
    fn faults(&self) -> (usize, usize, usize) {
        self.inbox(|i| (i.bad_signature, i.bad_body, i.duplicates))
    }

    /// Waits until `n` verified deliveries of `phase` arrived; fails when a child exited, a
    /// signature failed, or nothing arrived for 60 s.
    async fn wait_for(&self, env: &mut Env, phase: &str, n: usize) -> Result<()> {
        let mut last = 0;
        let mut last_change = Instant::now();
        loop {
            env.check_alive()?;
            let (bad, _, _) = self.faults();
            if bad > 0 {
                bail!("{bad} deliveries failed signature verification");
            }
            let got = self.count(phase);
            if got >= n {
                return Ok(());
            }
            if got > last {
                last = got;
                last_change = Instant::now();
            } else if last_change.elapsed() > Duration::from_secs(60) {
                let (jobs, created, succeeded) = progress(env, phase).await?;
                bail!(
                    "phase {phase}: {got} of {n} deliveries arrived, none for 60 s \
                     ({jobs} jobs succeeded, {created} deliveries created, {succeeded} delivered)"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Jobs of `phase` succeeded, their deliveries created, and those delivered (from the DB).
async fn progress(env: &Env, phase: &str) -> Result<(i64, i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT (SELECT count(*) FROM jobs WHERE tags->>'phase' = $1 AND status = 'succeeded'), \
           count(*), count(*) FILTER (WHERE d.status = 'succeeded') \
         FROM deliveries d JOIN jobs j ON j.id = d.job_id WHERE j.tags->>'phase' = $1",
    )
    .bind(phase)
    .fetch_one(&env.pool)
    .await?)
}

/// Verifies, parses and records one delivery; 401 for a bad signature, else 200.
async fn receive(
    State(s): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let received_at = Utc::now();
    let at = Instant::now();
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let id = h("webhook-id");
    let ts = h("webhook-timestamp").and_then(|t| t.parse::<i64>().ok());
    let verified = match (id, ts, h("webhook-signature")) {
        (Some(id), Some(ts), Some(sig)) => {
            (received_at.timestamp() - ts).abs() <= 300 && s.secret.verify(id, ts, &body, sig)
        }
        _ => false,
    };
    let mut inbox = s.inbox.lock().expect("inbox lock");
    let (true, Some(id)) = (verified, id) else {
        inbox.bad_signature += 1;
        return StatusCode::UNAUTHORIZED;
    };
    let parsed = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        v.get("type")?.as_str()?;
        let t: DateTime<Utc> = serde_json::from_value(v.get("timestamp")?.clone()).ok()?;
        let phase = v
            .get("data")?
            .get("tags")
            .and_then(|t| t.get("phase"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        Some((t, phase))
    });
    let Some((timestamp, phase)) = parsed else {
        inbox.bad_body += 1;
        return StatusCode::OK;
    };
    if !inbox.ids.insert(id.to_string()) {
        inbox.duplicates += 1;
        return StatusCode::OK;
    }
    let latency_ms = (received_at - timestamp)
        .num_microseconds()
        .unwrap_or(i64::MAX) as f64
        / 1000.0;
    *inbox.by_phase.entry(phase.clone()).or_default() += 1;
    inbox.receipts.push(Receipt {
        delivery_id: id.to_string(),
        phase,
        at,
        received_at,
        latency_ms,
    });
    StatusCode::OK
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

fn job_body(tag: &str, callback_url: &str) -> Value {
    json!({"kind": "echo", "input": {}, "tags": {"phase": tag}, "callback_url": callback_url})
}

/// `n` jobs with a callback through `/v1/jobs/batch`, `size` per request, `concurrency` at once.
async fn submit_batches(
    http: Client,
    url: String,
    n: usize,
    size: usize,
    concurrency: usize,
    body: Value,
) -> Result<Duration> {
    let full = bytes(&json!({"jobs": vec![body.clone(); size.min(n)]}))?;
    let rest = n % size;
    let last = if rest > 0 {
        Some(bytes(&json!({"jobs": vec![body; rest]}))?)
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

/// Per-stage latencies of one phase's deliveries, ms, each sorted.
struct Stages {
    /// Terminal event `recorded_at` → `deliveries.created_at` (the deliverer).
    to_created: Vec<f64>,
    /// `deliveries.created_at` → the `callback.deliver` job's `started_at` (commit, queue, pop).
    to_started: Vec<f64>,
    /// That `started_at` → received here (load, sign, POST).
    to_received: Vec<f64>,
    /// Deliveries with more than one attempt.
    retried: i64,
}

/// Delivery id, event → created ms, created → started ms, started (epoch s), attempts.
type StageRow = (String, f64, Option<f64>, Option<f64>, i32);

async fn stages(env: &Env, receipts: &[Receipt], phase: &str) -> Result<Stages> {
    let rows: Vec<StageRow> = sqlx::query_as(
        "SELECT d.id::text, \
           (extract(epoch FROM d.created_at - (d.payload->>'timestamp')::timestamptz) * 1000)::float8, \
           (extract(epoch FROM cj.started_at - d.created_at) * 1000)::float8, \
           extract(epoch FROM cj.started_at)::float8, \
           d.attempts \
         FROM deliveries d JOIN jobs j ON j.id = d.job_id \
         LEFT JOIN jobs cj ON cj.id = d.delivery_job_id \
         WHERE j.tags->>'phase' = $1",
    )
    .bind(phase)
    .fetch_all(&env.pool)
    .await?;
    let received: HashMap<&str, f64> = receipts
        .iter()
        .map(|r| {
            (
                r.delivery_id.as_str(),
                r.received_at.timestamp_micros() as f64 / 1e6,
            )
        })
        .collect();
    let mut s = Stages {
        to_created: Vec::with_capacity(rows.len()),
        to_started: Vec::with_capacity(rows.len()),
        to_received: Vec::with_capacity(rows.len()),
        retried: 0,
    };
    for (id, created, started, started_epoch, attempts) in rows {
        s.to_created.push(created);
        if let Some(st) = started {
            s.to_started.push(st);
        }
        if let (Some(se), Some(r)) = (started_epoch, received.get(id.as_str())) {
            s.to_received.push((r - se) * 1000.0);
        }
        if attempts > 1 {
            s.retried += 1;
        }
    }
    s.to_created = sorted(s.to_created);
    s.to_started = sorted(s.to_started);
    s.to_received = sorted(s.to_received);
    Ok(s)
}

impl Stages {
    fn describe(&self) -> String {
        let f = |v: &[f64]| {
            format!(
                "p50 {:.1} / p99 {:.1} ms",
                percentile(v, 0.5),
                percentile(v, 0.99)
            )
        };
        format!(
            "event → delivery row {}; → callback job started {}; → received {}",
            f(&self.to_created),
            f(&self.to_started),
            f(&self.to_received)
        )
    }
}

fn latency_text(lat: &[f64]) -> String {
    format!(
        "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(lat, 0.5),
        percentile(lat, 0.9),
        percentile(lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN)
    )
}

async fn phases(a: &Args, env: &mut Env, rx: &Receiver, facts: &Facts) -> Result<String> {
    let mut rows: Vec<(String, String)> = Vec::new();
    let n = a.jobs;
    let xid0 = next_xid(&env.pool).await?;

    // A. throughput.
    let cpu0 = env.cpu_snapshot();
    let started = Instant::now();
    let submitter = tokio::spawn(submit_batches(
        env.http.clone(),
        env.api("/v1/jobs/batch"),
        n,
        a.batch_size,
        a.batch_concurrency,
        job_body("throughput", &rx.url),
    ));
    rx.wait_for(env, "throughput", n).await?;
    let cpu1 = env.cpu_snapshot();
    let submit_elapsed = submitter.await??;
    let receipts = rx.receipts("throughput");
    let elapsed = receipts
        .iter()
        .map(|r| r.at)
        .max()
        .map(|t| t.duration_since(started))
        .unwrap_or_else(|| started.elapsed());
    let rate = n as f64 / elapsed.as_secs_f64();
    let lat_a = sorted(receipts.iter().map(|r| r.latency_ms).collect());
    env.wait_drained().await?;
    let st_a = stages(env, &receipts, "throughput").await?;
    let cpu = CpuUse::between(&cpu0, &cpu1);
    println!(
        "A. throughput: {n} deliveries in {:.2} s → {} deliveries/s (submits done at {:.2} s)",
        elapsed.as_secs_f64(),
        thousands(rate),
        submit_elapsed.as_secs_f64()
    );
    println!("    latency under load: {}", latency_text(&lat_a));
    println!("    stages: {}", st_a.describe());
    println!("    CPU, % of one core: {}", cpu.describe());
    rows.push((
        format!(
            "A. Throughput: {n} `echo` jobs with `callback_url` (batches of {} × {} concurrent) → verified deliveries",
            a.batch_size, a.batch_concurrency
        ),
        format!(
            "**{} deliveries/s** ({n} in {:.1} s; submits done at {:.1} s)",
            thousands(rate),
            elapsed.as_secs_f64(),
            submit_elapsed.as_secs_f64()
        ),
    ));
    rows.push((
        "A. Latency under load (terminal event → received)".into(),
        latency_text(&lat_a),
    ));
    rows.push(("A. Stages (from the DB)".into(), st_a.describe()));
    rows.push(("A. CPU, % of one core".into(), cpu.describe()));

    // B. latency at a paced rate.
    let total = ((a.rate as f64) * a.secs).round().max(1.0) as usize;
    let period = Duration::from_secs_f64(1.0 / a.rate as f64);
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let body = bytes(&job_body("latency", &rx.url))?;
    let mut tasks = Vec::with_capacity(total);
    let started = Instant::now();
    for _ in 0..total {
        interval.tick().await;
        let (http, url, body) = (env.http.clone(), env.api("/v1/jobs"), body.clone());
        tasks.push(tokio::spawn(async move { post(&http, &url, body).await }));
    }
    for t in tasks {
        t.await??;
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    rx.wait_for(env, "latency", total).await?;
    env.wait_drained().await?;
    let receipts = rx.receipts("latency");
    let lat_b = sorted(receipts.iter().map(|r| r.latency_ms).collect());
    let st_b = stages(env, &receipts, "latency").await?;
    println!(
        "B. latency at {}/s ({total} jobs, achieved {achieved:.0}/s): {}",
        a.rate,
        latency_text(&lat_b)
    );
    println!("    stages: {}", st_b.describe());
    rows.push((
        format!(
            "B. Latency at {} submits/s ({total} jobs, otherwise idle): terminal event → received",
            a.rate
        ),
        format!(
            "**p50 {:.1} ms**, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            percentile(&lat_b, 0.5),
            percentile(&lat_b, 0.9),
            percentile(&lat_b, 0.99),
            lat_b.last().copied().unwrap_or(f64::NAN)
        ),
    ));
    rows.push(("B. Stages (from the DB)".into(), st_b.describe()));

    let (bad_sig, bad_body, dups) = rx.faults();
    let delivered = env
        .count("SELECT count(*) FROM deliveries WHERE status = 'succeeded'")
        .await?;
    let expected = (n + total) as i64;
    println!(
        "checks: {bad_sig} signature failures, {bad_body} bad bodies, {dups} duplicates, {} retried deliveries; {delivered} of {expected} deliveries succeeded",
        st_a.retried + st_b.retried
    );
    if bad_sig > 0 || bad_body > 0 || delivered != expected {
        bail!(
            "{bad_sig} signature failures, {bad_body} bad bodies, {delivered} of {expected} deliveries succeeded"
        );
    }
    let xid1 = next_xid(&env.pool).await?;
    println!("transaction ids used: {xid0} → {xid1}");
    rows.push((
        "Checks".into(),
        format!(
            "{bad_sig} signature failures, {dups} duplicates, {} retried deliveries (transaction ids {xid0} → {xid1})",
            st_a.retried + st_b.retried
        ),
    ));

    let mut table = String::new();
    table.push_str(&format!(
        "Build: {}; Postgres {}; 1 worker `--queues default,callbacks --concurrency {}`; git {}; {}.\n",
        profile(),
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
