//! `capibara bench-schedules`: fire accuracy of cron schedules with several scheduler replicas.
//! Many every-second schedules run for a while; lateness is each `TickFired`'s `recorded_at`
//! minus its nominal fire time, and duplicates (a tick fired twice) are counted.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Parser};
use serde_json::json;

use crate::harness::{named_dir, percentile, profile, Env, Facts};
use crate::jobs::BenchArgs;

#[derive(Args)]
pub struct ScheduleBenchArgs {
    /// Schedules firing every second.
    #[arg(long, default_value_t = 50)]
    schedules: usize,
    /// Scheduler replicas.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// How long they run, seconds.
    #[arg(long, default_value_t = 20)]
    secs: u64,
}

#[derive(Parser)]
struct Defaults {
    #[command(flatten)]
    bench: BenchArgs,
}

pub async fn run(a: ScheduleBenchArgs) -> Result<()> {
    let facts = Facts::collect();
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let dir = named_dir(&bin_dir, "schedules");
    std::fs::create_dir_all(&dir)?;
    println!(
        "capibara bench-schedules — {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    println!("machine: {}", facts.machine());
    println!(
        "build: {}; {} schedules × every second; {} scheduler replicas; {} s",
        profile(),
        a.schedules,
        a.replicas,
        a.secs
    );
    let defaults = Defaults::parse_from(["bench"]).bench;
    let mut env = Env::start(&defaults, &dir, &bin_dir).await?;
    for i in 1..a.replicas {
        let port = capibara_dev_services::find_free_port();
        env.spawn(
            &format!("scheduler-{}", i + 1),
            "capibara-scheduler",
            &[],
            port,
        )?;
        env.wait_healthy(port).await?;
    }
    env.spawn_worker("worker-1").await?;
    let mut ids = Vec::new();
    for i in 0..a.schedules {
        let r = env
            .http
            .post(env.api("/v1/schedules"))
            .json(
                &json!({"name": format!("s{i}"), "cron": "* * * * * *", "overlap": "allow",
                          "target": {"type": "job", "job": {"kind": "echo"}}}),
            )
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("creating a schedule: {}", r.text().await?);
        }
        ids.push(
            r.json::<serde_json::Value>().await?["id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    tokio::time::sleep(Duration::from_secs(a.secs)).await;
    for id in &ids {
        env.http
            .post(env.api(&format!("/v1/schedules/{id}/pause")))
            .send()
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.check_alive()?;
    let rows: Vec<(f64,)> = sqlx::query_as(
        "SELECT extract(epoch FROM recorded_at - (data->>'fire_time')::timestamptz)::float8 * 1000
         FROM events WHERE type = 'TickFired' AND data->>'trigger' = 'schedule'",
    )
    .fetch_all(&env.pool)
    .await?;
    let (dups,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM (SELECT stream_id, data->>'fire_time' FROM events WHERE type = 'TickFired'
         GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .fetch_one(&env.pool)
    .await?;
    let mut late: Vec<f64> = rows.into_iter().map(|(ms,)| ms).collect();
    late.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
    let expected = a.schedules as f64 * a.secs as f64;
    println!();
    println!("| Figure | Value |");
    println!("|---|---|");
    println!(
        "| Ticks fired (expected ≈ {expected:.0}) | {} |",
        late.len()
    );
    println!("| Ticks fired twice | {dups} |");
    println!(
        "| Lateness (recorded_at − fire_time) | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms |",
        percentile(&late, 0.50),
        percentile(&late, 0.99),
        late.last().copied().unwrap_or(0.0)
    );
    println!();
    println!("logs: {}", dir.display());
    Ok(())
}
