//! `capibara-bench eventlog`: the bounded event log (docs/event-log-retention.md). Measures job
//! submissions/s (the append path) on an empty `events` table, generates `--events` finished
//! job events in an old partition with set-based SQL, measures submissions/s again with them in
//! the table, then archives that partition to a local artifact store and prints events/s.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use capibara_shared::{
    artifacts::ArtifactStore,
    store::archive::{self, Halt},
};
use clap::Args;
use serde_json::json;

use crate::harness::{named_dir, print_header, run_dir, server_bin_dir, thousands, Env, Facts};

#[derive(Args, Debug)]
pub struct EventLogBenchArgs {
    /// Finished job events to generate in the old partition (5 per job).
    #[arg(long, default_value_t = 50_000_000)]
    events: i64,
    /// Seconds of each submission window.
    #[arg(long, default_value_t = 15.0)]
    secs: f64,
    /// Concurrent submitting clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    #[arg(long)]
    unsafe_pg: bool,
    /// Skip the archive: empty the generated partition (`TRUNCATE`) before the control window.
    /// For the append figure alone, without the archive's ~20 minutes at 50 M events.
    #[arg(long)]
    no_archive: bool,
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Submissions/s of `POST /v1/jobs` (no worker: every job stays queued) over `secs`.
async fn submit_rate(env: &Env, clients: usize, secs: f64) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let url = env.api("/v1/jobs");
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (http, url, stop, done, failed) = (
                env.http.clone(),
                url.clone(),
                stop.clone(),
                done.clone(),
                failed.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let ok = http
                        .post(&url)
                        .json(&json!({"kind": "echo", "input": {"n": 1}}))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if ok { &done } else { &failed }.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let window = started.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        println!("  ({failed} submissions failed)");
    }
    Ok(done.load(Ordering::Relaxed) as f64 / window)
}

pub async fn run(a: EventLogBenchArgs) -> Result<()> {
    if a.events < 5 || a.secs <= 0.0 || a.clients == 0 {
        bail!("--events must be at least 5, --secs and --clients positive");
    }
    let bin_dir = server_bin_dir()?;
    let dir = run_dir(a.dir.as_ref(), named_dir(&bin_dir, "eventlog"))?;
    let facts = Facts::collect();
    print_header("capibara-bench eventlog", &facts, a.unsafe_pg, "");
    let env = Env::start_with(
        a.unsafe_pg,
        1,
        // The bench archives itself, measured; the scheduler only creates partitions.
        vec![("CAPIBARA_EVENTS_RETENTION".into(), "0".into())],
        &dir,
        &bin_dir,
    )
    .await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&env.db_url)
        .await?;

    println!(
        "append: {} clients POST /v1/jobs for {} s (no worker; each job appends JobSubmitted and JobQueued)",
        a.clients, a.secs
    );
    let empty = submit_rate(&env, a.clients, a.secs).await?;
    println!("  empty events table: {:.0} jobs/s", empty);

    // Finished jobs created 60 days ago: ids below the legacy partition's bound, and an old
    // transaction id, so the log's followers (deliverer, orchestrator) have them behind their
    // checkpoints, as they would for history written long ago.
    let streams = a.events / 5;
    let (base_ms,): (i64,) =
        sqlx::query_as("SELECT (extract(epoch FROM now() - interval '60 days') * 1000)::bigint")
            .fetch_one(&pool)
            .await?;
    let started = Instant::now();
    let batch = 200_000i64;
    let mut from = 0i64;
    while from < streams {
        let to = (from + batch).min(streams) - 1;
        sqlx::query(
            "INSERT INTO events (tx_id, stream_id, stream_type, version, type, data, metadata,
                                 recorded_at)
             SELECT '3'::xid8,
                    (substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-7000-8000-'
                     || lpad(to_hex(s), 12, '0'))::uuid,
                    'job', v,
                    (ARRAY['JobSubmitted', 'JobQueued', 'JobStarted', 'JobProgress',
                           'JobSucceeded'])[v],
                    jsonb_build_object('n', s), '{\"namespace\": \"default\"}'::jsonb,
                    now() - interval '60 days'
               FROM generate_series($1::bigint, $2::bigint) s,
                    LATERAL (SELECT lpad(to_hex($3::bigint + s), 12, '0') AS h) x,
                    generate_series(1, 5) v",
        )
        .bind(from)
        .bind(to)
        .bind(base_ms)
        .execute(&pool)
        .await?;
        from = to + 1;
    }
    let generated = started.elapsed().as_secs_f64();
    // Settle what a bulk load leaves behind, as a table that grew over months would be: the
    // visibility map set (no insert-triggered autovacuum in the window), dirty pages written.
    let settle = Instant::now();
    sqlx::query("VACUUM (ANALYZE) events_legacy")
        .execute(&pool)
        .await?;
    sqlx::query("CHECKPOINT").execute(&pool).await?;
    println!(
        "  vacuum + checkpoint after the load: {:.0} s",
        settle.elapsed().as_secs_f64()
    );
    let (rows, size): (i64, String) = sqlx::query_as(
        "SELECT count(*), pg_size_pretty(pg_total_relation_size('events_legacy')) FROM events_legacy",
    )
    .fetch_one(&pool)
    .await?;
    println!(
        "generated {} events ({} jobs) in the old partition in {generated:.0} s ({} events/s); events_legacy: {size}",
        thousands(rows as f64),
        thousands(streams as f64),
        thousands(rows as f64 / generated),
    );

    let full = submit_rate(&env, a.clients, a.secs).await?;
    println!(
        "  with {} events in the table: {:.0} jobs/s ({:+.1} %)",
        thousands(rows as f64),
        full,
        100.0 * (full - empty) / empty
    );

    if a.no_archive {
        sqlx::query("TRUNCATE events_legacy").execute(&pool).await?;
        let after = submit_rate(&env, a.clients, a.secs).await?;
        println!(
            "  after emptying the old partition (no archive): {:.0} jobs/s; with the events vs after: {:+.1} %",
            after,
            100.0 * (full - after) / after
        );
        println!("run directory: {}", dir.display());
        return Ok(());
    }
    let store = ArtifactStore::open(dir.join("archive").to_str().unwrap_or("archive"))?;
    let started = Instant::now();
    let r = archive::archive_old(&pool, &store, Duration::ZERO, Halt::Never).await?;
    let secs = started.elapsed().as_secs_f64();
    let (bytes,): (Option<i64>,) = sqlx::query_as("SELECT sum(bytes)::bigint FROM event_archives")
        .fetch_one(&pool)
        .await?;
    println!(
        "archive: {} partitions, {} events, {} objects ({:.0} MiB gzip) in {secs:.0} s: {} events/s (read, gzip, upload, read back and count, drop)",
        r.partitions,
        thousands(r.events as f64),
        r.objects,
        bytes.unwrap_or(0) as f64 / 1048576.0,
        thousands(r.events as f64 / secs),
    );
    // The same window again with the old partition gone: the control for a machine whose
    // load changed between the first two windows.
    let after = submit_rate(&env, a.clients, a.secs).await?;
    println!(
        "  after the archive (old partition dropped): {:.0} jobs/s; with the events vs after: {:+.1} %",
        after,
        100.0 * (full - after) / after
    );
    if r.blocked > 0 {
        println!(
            "  ({} old partitions kept: streams not finished)",
            r.blocked
        );
    }
    println!("run directory: {}", dir.display());
    Ok(())
}
