//! `capibara bench-models`: `text.embed` through the API on one worker — the first job (the
//! model loaded), then the client wall and the model's own time for 1 and 32 texts per job,
//! texts/s, and the worker's resident memory with the model loaded.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::harness::{named_dir, percentile, profile, sorted, Env, Facts};

#[derive(Args)]
pub struct ModelBenchArgs {
    /// Jobs measured per case.
    #[arg(long, default_value_t = 20)]
    jobs: usize,
}

/// A sentence of about 20 words, different each time.
fn sentence(k: usize) -> String {
    format!(
        "Order {k} was shipped from the warehouse on Tuesday and should reach the customer \
         before the end of the week, weather permitting."
    )
}

/// One job with `Prefer: wait`: (client wall ms, the model's ms).
async fn embed(env: &Env, texts: &[String]) -> Result<(f64, f64)> {
    let t = Instant::now();
    let job: Value = env
        .http
        .post(env.api("/v1/jobs"))
        .header("prefer", "wait=60")
        .json(&json!({"kind": "text.embed", "input": {"texts": texts}}))
        .send()
        .await?
        .json()
        .await?;
    let wall = t.elapsed().as_secs_f64() * 1000.0;
    if job["status"] != "succeeded" {
        bail!("text.embed did not succeed: {job}");
    }
    Ok((
        wall,
        job["output"]["duration_ms"].as_f64().unwrap_or(f64::NAN),
    ))
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

pub async fn run(a: ModelBenchArgs) -> Result<()> {
    let facts = Facts::collect();
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let dir = named_dir(&bin_dir, "models");
    std::fs::create_dir_all(&dir)?;
    println!(
        "capibara bench-models — {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    println!("machine: {}", facts.machine());
    println!(
        "build: {}; text.embed (all-MiniLM-L6-v2, candle, CPU); 1 worker",
        profile()
    );
    let mut env = Env::start_with(false, 4, Vec::new(), &dir, &bin_dir).await?;
    env.spawn_worker("worker-1").await?;
    let pid = env
        .procs
        .iter()
        .find(|p| p.name == "worker-1")
        .map(|p| p.child.id());
    let before = pid.and_then(rss_mib);
    let (wall, model) = embed(&env, &[sentence(0)]).await?;
    println!(
        "first job (loads the model): client wall {wall:.0} ms, model {model:.1} ms; worker RSS {:.0} → {:.0} MiB",
        before.unwrap_or(f64::NAN),
        pid.and_then(rss_mib).unwrap_or(f64::NAN)
    );
    for n in [1usize, 32] {
        let (mut walls, mut models) = (Vec::new(), Vec::new());
        for j in 0..a.jobs {
            let texts: Vec<String> = (0..n).map(|k| sentence(1 + j * n + k)).collect();
            let (w, m) = embed(&env, &texts).await?;
            walls.push(w);
            models.push(m);
        }
        let (walls, models) = (sorted(walls), sorted(models));
        let m50 = percentile(&models, 0.5);
        println!(
            "{n} text(s) of ~20 words per job ({} jobs): client wall p50 {:.1} ms, p99 {:.1} ms; model p50 {m50:.1} ms = {:.0} texts/s",
            a.jobs,
            percentile(&walls, 0.5),
            percentile(&walls, 0.99),
            n as f64 / (m50 / 1000.0)
        );
    }
    println!(
        "worker RSS with the model loaded: {:.0} MiB",
        pid.and_then(rss_mib).unwrap_or(f64::NAN)
    );
    Ok(())
}
