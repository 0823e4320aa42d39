//! `capibara chaos` (`capibara-bench chaos`): mixed work under combined faults, then an exact
//! account from the event log (docs/reliability.md, "The chaos suite").
//!
//! Postgres and Redis run locally; every Capibara process reaches them through a
//! [`FaultProxy`](capibara_dev_services::FaultProxy), so the network can be cut or stalled. Two
//! APIs, two scheduler replicas and several workers run as real processes. While submissions
//! arrive evenly over the load window, a worker is SIGKILLed every 2 s and the faults of
//! [`Fault::CYCLE`] are injected one after another; after each, a probe job times the recovery.
//! Then the run drains, every process is stopped, and [`audit`] checks the promises. The exit
//! status is non-zero when one is broken.

mod audit;
mod faults;
mod fleet;
mod load;
mod receiver;

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use capibara_dev_services::{find_free_port, FaultProxy};
use capibara_shared::domain::webhook::WebhookSecret;
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::harness::{named_dir, print_header, rss_mib, run_dir, server_bin_dir, thousands, Facts};
use faults::{Fault, Injected, Stack};
use fleet::{Fleet, Spec};
use load::Submitter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    /// CI: 1,000 submissions over 90 s, each fault once (stalls left out).
    Short,
    /// 10,000 submissions over 4 minutes, each fault once.
    Standard,
    /// 30 minutes of load with the faults repeating; RSS and connection counts must stay flat.
    Soak,
}

#[derive(Args, Debug)]
pub struct ChaosArgs {
    #[arg(long, value_enum, default_value = "standard")]
    profile: Profile,
    /// Submissions (jobs and workflow runs); default from the profile.
    #[arg(long)]
    jobs: Option<usize>,
    /// Seconds over which they are submitted; default from the profile.
    #[arg(long)]
    secs: Option<f64>,
    #[arg(long, default_value_t = 3)]
    workers: usize,
    #[arg(long, default_value_t = 16)]
    worker_concurrency: usize,
    /// Seconds between worker SIGKILLs (round robin); 0 turns them off.
    #[arg(long, default_value_t = 2.0)]
    kill_every: f64,
    /// How long the run may take to drain after the load.
    #[arg(long, default_value_t = 300)]
    drain_secs: u64,
    /// Log level of the Capibara processes.
    #[arg(long, default_value = "warn")]
    log: String,
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the Postgres and Redis data of a successful run.
    #[arg(long)]
    keep: bool,
}

struct Plan {
    jobs: usize,
    secs: f64,
    faults: Vec<Fault>,
    /// Seconds between the end of one fault and the start of the next.
    gap: f64,
}

impl ChaosArgs {
    fn plan(&self) -> Plan {
        let (jobs, secs, faults, gap) = match self.profile {
            Profile::Short => (
                1_000,
                90.0,
                Fault::CYCLE
                    .iter()
                    .copied()
                    .filter(|f| !matches!(f, Fault::RedisStall | Fault::PgStall))
                    .collect(),
                4.0,
            ),
            Profile::Standard => (10_000, 240.0, Fault::CYCLE.to_vec(), 10.0),
            // About 30 cycles' worth; the conductor stops when the load window ends.
            Profile::Soak => (54_000, 1_800.0, Fault::CYCLE.repeat(40), 30.0),
        };
        Plan {
            jobs: self.jobs.unwrap_or(jobs),
            secs: self.secs.unwrap_or(secs),
            faults,
            gap,
        }
    }
}

/// Resource figures at one moment of the run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// RSS of `api-2` (never killed), MiB.
    api_rss: f64,
    /// RSS of both schedulers, MiB.
    scheduler_rss: f64,
    /// Connections to the chaos database (None while Postgres is down).
    pg_connections: Option<i64>,
    /// Redis `connected_clients` (None while Redis is down).
    redis_clients: Option<i64>,
}

/// Resource figures over the run, one sample every [`SAMPLE_EVERY`].
#[derive(Default)]
struct Samples {
    rows: Vec<Sample>,
}

const SAMPLE_EVERY: Duration = Duration::from_secs(10);

pub async fn run(a: ChaosArgs) -> Result<()> {
    let plan = a.plan();
    if plan.jobs == 0 || plan.secs <= 0.0 || a.workers == 0 || a.worker_concurrency == 0 {
        bail!("--jobs, --secs, --workers and --worker-concurrency must be positive");
    }
    let bin_dir = server_bin_dir()?;
    let dir = run_dir(a.dir.as_ref(), named_dir(&bin_dir, "chaos"))?;
    let facts = Facts::collect();
    print_header("capibara chaos", &facts, false, "");
    println!(
        "profile {:?}: {} submissions over {} s; {} workers × {}, a worker SIGKILLed every {} s; \
         2 APIs, 2 scheduler replicas; visibility timeout 5 s",
        a.profile,
        thousands(plan.jobs as f64),
        plan.secs,
        a.workers,
        a.worker_concurrency,
        a.kill_every
    );
    println!("run dir: {}", dir.display());
    let t0 = Instant::now();

    // Postgres (durable) and Redis, each behind a fault proxy.
    let (pg, redis) = crate::harness::start_servers(&dir, false, "chaos").await?;
    let direct_db = pg.url("chaos");
    let direct_redis = redis.url();
    let loopback = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let stack = Arc::new(Stack {
        pg_proxy: FaultProxy::start(loopback(pg.port())).context("Postgres proxy")?,
        redis_proxy: FaultProxy::start(loopback(redis.port())).context("Redis proxy")?,
        pg: Mutex::new(pg),
        redis: Mutex::new(redis),
    });
    let proxied_db = direct_db.replace(
        &format!(
            ":{}/",
            stack.pg.lock().unwrap_or_else(|p| p.into_inner()).port()
        ),
        &format!(":{}/", stack.pg_proxy.port()),
    );
    let proxied_redis = format!("redis://127.0.0.1:{}/", stack.redis_proxy.port());
    println!(
        "postgres {direct_db} via proxy :{}; redis {direct_redis} via proxy :{}",
        stack.pg_proxy.port(),
        stack.redis_proxy.port()
    );

    let (secret, encoded_secret) = WebhookSecret::generate();
    let receiver = receiver::Receiver::start(secret).await?;
    let admin_key = format!("chaos-{}", uuid::Uuid::new_v4().simple());
    let secrets_key = capibara_shared::crypto::generate_key();
    let base_env: Vec<(String, String)> = [
        ("CAPIBARA_DATABASE_URL", proxied_db.clone()),
        ("CAPIBARA_REDIS_URL", proxied_redis.clone()),
        ("CAPIBARA_REDIS_PREFIX", "chaos".into()),
        ("CAPIBARA_ADMIN_KEY", admin_key.clone()),
        ("CAPIBARA_SECRETS_KEY", secrets_key.clone()),
        ("CAPIBARA_WEBHOOK_SECRET", encoded_secret),
        ("CAPIBARA_OUTBOUND_ALLOW_PRIVATE", "true".into()),
        ("CAPIBARA_VISIBILITY_TIMEOUT_S", "5".into()),
        ("CAPIBARA_RATE_LIMIT_RPS", "1000000".into()),
        ("CAPIBARA_LOG", a.log.clone()),
        ("CAPIBARA_LOG_FORMAT", "json".into()),
        ("CAPIBARA_SCHEDULER_ADDR", "127.0.0.1:0".into()),
        ("CAPIBARA_WORKER_ADDR", "127.0.0.1:0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let fleet = Arc::new(Fleet::new(bin_dir.clone(), dir.clone(), base_env, t0));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;

    // The first API applies the migrations alone; then everything else.
    let api_ports = [find_free_port(), find_free_port()];
    for (i, port) in api_ports.iter().enumerate() {
        fleet.add(Spec {
            name: format!("api-{}", i + 1),
            bin: "capibara-api",
            args: Vec::new(),
            port: *port,
            env: vec![("CAPIBARA_API_ADDR".into(), format!("127.0.0.1:{port}"))],
        })?;
        fleet.wait_healthy(&http, Duration::from_secs(120)).await?;
    }
    for i in 1..=2 {
        let port = find_free_port();
        fleet.add(Spec {
            name: format!("scheduler-{i}"),
            bin: "capibara-scheduler",
            args: Vec::new(),
            port,
            env: vec![(
                "CAPIBARA_SCHEDULER_ADDR".into(),
                format!("127.0.0.1:{port}"),
            )],
        })?;
    }
    for i in 1..=a.workers {
        let port = find_free_port();
        fleet.add(Spec {
            name: format!("worker-{i}"),
            bin: "capibara-worker",
            args: vec!["--concurrency".into(), a.worker_concurrency.to_string()],
            port,
            env: vec![("CAPIBARA_WORKER_ADDR".into(), format!("127.0.0.1:{port}"))],
        })?;
    }
    fleet.wait_healthy(&http, Duration::from_secs(120)).await?;

    let apis: Vec<String> = api_ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let sub = Arc::new(Submitter::new(&admin_key, apis)?);
    let workflow_name = "chaos-fan-out";
    let created = sub
        .post_until_accepted(
            "/v1/workflows",
            &load::workflow_definition(workflow_name),
            uuid::Uuid::new_v4(),
        )
        .await
        .context("creating the workflow")?;
    let workflow = created
        .get("id")
        .and_then(Value::as_str)
        .context("the workflow answer has no id")?
        .to_string();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&direct_db)
        .await
        .context("connecting to the chaos database")?;
    println!(
        "all processes healthy after {:.1} s; load starts\n",
        t0.elapsed().as_secs_f64()
    );

    let stop = Arc::new(AtomicBool::new(false));
    // The supervisor restarts whatever is gone, four times a second.
    let supervisor = {
        let (fleet, stop) = (fleet.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                fleet.supervise();
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let killing = Arc::new(AtomicBool::new(a.kill_every > 0.0));
    let killer = {
        let (fleet, killing, every, n) = (fleet.clone(), killing.clone(), a.kill_every, a.workers);
        tokio::spawn(async move {
            let mut k = 0usize;
            while killing.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs_f64(every.max(0.1))).await;
                if killing.load(Ordering::Relaxed) {
                    fleet.kill(&format!("worker-{}", k % n + 1));
                    k += 1;
                }
            }
        })
    };
    let samples = Arc::new(Mutex::new(Samples::default()));
    let sampler = {
        let (fleet, stop, samples, pool) =
            (fleet.clone(), stop.clone(), samples.clone(), pool.clone());
        let redis_url = direct_redis.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let row = sample(&fleet, &pool, &redis_url).await;
                samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .rows
                    .push(row);
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        })
    };

    let load_started = Instant::now();
    let load = tokio::spawn(load::run(
        sub.clone(),
        plan.jobs,
        plan.secs,
        32,
        workflow.clone(),
        receiver.url.clone(),
    ));
    // The conductor: faults one after another, each followed by its recovery probe.
    let mut timeline: Vec<Injected> = Vec::new();
    let mut probes = Vec::new();
    tokio::time::sleep(Duration::from_secs_f64(plan.gap.min(plan.secs / 10.0))).await;
    for fault in &plan.faults {
        if load_started.elapsed().as_secs_f64() + 12.0 > plan.secs {
            break;
        }
        let at = t0.elapsed().as_secs_f64();
        let detail = match faults::inject(*fault, &stack, &fleet, &http).await {
            Ok(d) => d,
            Err(e) => format!("injection failed: {e:#}"),
        };
        let ended = t0.elapsed().as_secs_f64();
        println!("t={at:>7.1} s  {} {detail}", fault.describe());
        let i = timeline.len();
        timeline.push(Injected {
            fault: *fault,
            at,
            ended,
            detail,
            accepted_after: None,
            recovered_after: None,
        });
        let sub = sub.clone();
        probes.push((
            i,
            tokio::spawn(async move { faults::probe(&sub, Duration::from_secs(120)).await }),
        ));
        tokio::time::sleep(Duration::from_secs_f64(plan.gap)).await;
    }
    let _ = load.await;
    let load_secs = load_started.elapsed().as_secs_f64();
    killing.store(false, Ordering::Relaxed);
    let _ = killer.await;
    for (i, p) in probes {
        if let Ok((accepted, recovered)) = p.await {
            timeline[i].accepted_after = accepted;
            timeline[i].recovered_after = recovered;
        }
    }
    println!(
        "\nload done after {load_secs:.1} s ({} submissions accepted); draining",
        sub.answers.accepted().len()
    );

    // Drain: everything terminal, or the deadline.
    let drain_started = Instant::now();
    let mut open = i64::MAX;
    while drain_started.elapsed() < Duration::from_secs(a.drain_secs) {
        match audit::open_work(&pool).await {
            Ok(0) => {
                open = 0;
                break;
            }
            Ok(n) => open = n,
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let drain_secs = drain_started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = supervisor.await;
    sampler.abort();
    fleet.stop_all();
    println!(
        "drained in {drain_secs:.1} s ({} jobs/runs still open)",
        if open == i64::MAX {
            "unknown".into()
        } else {
            open.to_string()
        }
    );
    if open != 0 {
        // Where the log followers stopped: a follower far behind the log's head is the first
        // suspect of work that did not drain.
        for line in audit::followers(&pool).await.unwrap_or_default() {
            println!("  {line}");
        }
    }

    let accepted = sub.answers.accepted();
    let mut result = audit::check(&pool, &accepted, &receiver).await?;
    let rebuild_env: Vec<(String, String)> = vec![
        ("CAPIBARA_DATABASE_URL".into(), direct_db.clone()),
        ("CAPIBARA_REDIS_URL".into(), direct_redis.clone()),
        ("CAPIBARA_REDIS_PREFIX".into(), "chaos".into()),
        ("CAPIBARA_SECRETS_KEY".into(), secrets_key),
    ];
    audit::rebuild_matches(&pool, &bin_dir, &rebuild_env, &mut result).await?;

    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    let mut failures = result.failures();
    let flat = flatness(&samples);
    if a.profile == Profile::Soak {
        failures.extend(flat.1.clone());
    }
    report(
        &timeline, &result, &sub, &fleet, &samples, &flat.0, drain_secs,
    );
    pool.close().await;
    drop(fleet);
    drop(stack);
    if failures.is_empty() {
        println!("\nRESULT: every promise held");
        if !a.keep {
            let _ = std::fs::remove_dir_all(dir.join("postgres"));
            let _ = std::fs::remove_dir_all(dir.join("redis"));
        }
        println!("logs: {}", dir.display());
        Ok(())
    } else {
        println!("\nRESULT: {} broken promise(s)", failures.len());
        for f in &failures {
            println!("  - {f}");
        }
        println!("logs and data: {}", dir.display());
        bail!("the chaos run broke {} promise(s)", failures.len())
    }
}

async fn sample(fleet: &Fleet, pool: &sqlx::PgPool, redis_url: &str) -> Sample {
    let rss = |name: &str| fleet.pid(name).and_then(rss_mib).unwrap_or(0.0);
    let pg_connections: Option<i64> = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await
    .ok();
    let redis_clients = async {
        let client = redis::Client::open(redis_url).ok()?;
        let mut c = tokio::time::timeout(
            Duration::from_secs(1),
            client.get_multiplexed_async_connection(),
        )
        .await
        .ok()?
        .ok()?;
        let info: String = redis::cmd("INFO")
            .arg("clients")
            .query_async(&mut c)
            .await
            .ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("connected_clients:"))
            .and_then(|v| v.trim().parse::<i64>().ok())
    }
    .await;
    Sample {
        api_rss: rss("api-2"),
        scheduler_rss: rss("scheduler-1") + rss("scheduler-2"),
        pg_connections,
        redis_clients,
    }
}

/// One figure of a [`Sample`], None where it was not measured.
type Series = fn(&Sample) -> Option<f64>;

/// Whether RSS and connection counts stayed flat: the last quarter of the samples against the
/// second (after warm-up). Returns the summary line and the failures.
fn flatness(s: &Samples) -> (String, Vec<String>) {
    let n = s.rows.len();
    if n < 8 {
        return (
            "too few samples to judge flatness (soak profile only)".into(),
            Vec::new(),
        );
    }
    let q = n / 4;
    let early = &s.rows[q..2 * q];
    let late = &s.rows[n - q..];
    let mean = |rows: &[Sample], f: Series| {
        let v: Vec<f64> = rows.iter().filter_map(f).collect();
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let mut failures = Vec::new();
    let mut parts = Vec::new();
    // (name, figure, allowed growth factor, allowed absolute slack)
    let series: [(&str, Series, f64, f64); 4] = [
        (
            "API RSS MiB",
            |r| Some(r.api_rss).filter(|v| *v > 0.0),
            1.25,
            16.0,
        ),
        (
            "schedulers RSS MiB",
            |r| Some(r.scheduler_rss).filter(|v| *v > 0.0),
            1.25,
            16.0,
        ),
        (
            "Postgres connections",
            |r| r.pg_connections.map(|v| v as f64),
            1.5,
            5.0,
        ),
        (
            "Redis clients",
            |r| r.redis_clients.map(|v| v as f64),
            1.5,
            5.0,
        ),
    ];
    for (name, f, factor, slack) in series {
        let (a, b) = (mean(early, f), mean(late, f));
        parts.push(format!("{name} {a:.1} → {b:.1}"));
        if a.is_finite() && b.is_finite() && b > a * factor + slack {
            failures.push(format!("{name} grew from {a:.1} to {b:.1} (not flat)"));
        }
    }
    (
        format!("second quarter → last quarter: {}", parts.join(", ")),
        failures,
    )
}

fn report(
    timeline: &[Injected],
    r: &audit::Audit,
    sub: &Submitter,
    fleet: &Fleet,
    samples: &Samples,
    flat: &str,
    drain_secs: f64,
) {
    println!("\n== fault timeline (recovery: after the fault ended, a probe job accepted / succeeded) ==");
    let s = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.2} s"));
    for f in timeline {
        println!(
            "t={:>7.1} s  {:<55} lasted {:>5.1} s  accepted {:>8}  succeeded {:>8}  {}",
            f.at,
            f.fault.describe(),
            f.ended - f.at,
            s(f.accepted_after),
            s(f.recovered_after),
            f.detail
        );
    }
    println!("\n== processes ==");
    for t in fleet.tallies() {
        let exits = if t.exits.is_empty() {
            String::new()
        } else {
            let first: Vec<String> = t
                .exits
                .iter()
                .take(3)
                .map(|(at, why)| format!("t={at:.1} s {why}"))
                .collect();
            format!(
                "; exited on its own {} time(s): {} (log {})",
                t.exits.len(),
                first.join(", "),
                t.log.display()
            )
        };
        println!(
            "{:<12} started {:>4}, SIGKILLed {:>4}{exits}",
            t.name, t.starts, t.kills
        );
    }
    println!("\n== accounting (from the event log) ==");
    let total: usize = r.accepted.values().sum();
    for (shape, n) in &r.accepted {
        println!("accepted {:>7}  {}", thousands(*n as f64), shape.label());
    }
    let retries = sub
        .answers
        .retries
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    println!(
        "accepted {:>7}  in all; {} POSTs, retried by cause {:?}; given up (never accepted) {}; rejected {}",
        thousands(total as f64),
        thousands(sub.answers.posts.load(Ordering::Relaxed) as f64),
        retries,
        sub.answers.gave_up.load(Ordering::Relaxed),
        sub.answers.rejected.lock().unwrap_or_else(|p| p.into_inner()).len(),
    );
    println!("final status: {:?}", r.statuses);
    println!(
        "terminal {} / lost {} / not terminal {} / completed twice {}",
        total - r.lost.len() - r.open.len(),
        r.lost.len(),
        r.open.len(),
        r.completed_twice.len()
    );
    println!(
        "workflow runs: {} with a step not run exactly once",
        r.steps_not_once.len()
    );
    println!(
        "callbacks: {} jobs checked, terminal event missing {}, out of order {}, repeated deliveries (same webhook-id) {}, bad signatures {}, deliveries not succeeded {}",
        r.callbacks_checked,
        r.callbacks_missing.len(),
        r.callbacks_out_of_order.len(),
        r.callback_repeats,
        r.callback_bad_signatures,
        r.deliveries_unfinished
    );
    let tables: Vec<String> = r
        .projections
        .iter()
        .filter(|(_, rows, _)| *rows > 0)
        .map(|(t, rows, differ)| format!("{t} {rows} rows ({differ} differ)"))
        .collect();
    println!("projections vs rebuild: {}", tables.join(", "));
    println!(
        "events in the log: {}; drain after the load: {drain_secs:.1} s",
        thousands(r.events as f64)
    );
    if let (Some(first), Some(last)) = (samples.rows.first(), samples.rows.last()) {
        let peak_pg = samples
            .rows
            .iter()
            .filter_map(|r| r.pg_connections)
            .max()
            .unwrap_or(0);
        let peak_redis = samples
            .rows
            .iter()
            .filter_map(|r| r.redis_clients)
            .max()
            .unwrap_or(0);
        println!(
            "\n== resources ({} samples every {:?}) ==\nAPI-2 RSS {:.1} → {:.1} MiB; schedulers RSS {:.1} → {:.1} MiB; Postgres connections peak {peak_pg}; Redis clients peak {peak_redis}\n{flat}",
            samples.rows.len(), SAMPLE_EVERY, first.api_rss, last.api_rss, first.scheduler_rss, last.scheduler_rss
        );
    }
}
