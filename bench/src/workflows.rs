//! `capibara bench-workflows`: orchestration overhead. A 40-step chain of `echo` steps measures
//! the time from one step's job ending to the next step's job starting (and the chain end to
//! end); a 100-way fan-out/fan-in measures the wall time of a wide run.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::harness::{named_dir, percentile, profile, sorted, Env, Facts};

#[derive(Args)]
pub struct WorkflowBenchArgs {
    /// Steps in the chain.
    #[arg(long, default_value_t = 40)]
    chain: usize,
    /// Branches of the fan-out.
    #[arg(long, default_value_t = 100)]
    fan: usize,
    /// Runs of each shape (after one warm-up run).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Run Postgres with fsync/synchronous_commit off (not durable), to see the commit cost.
    #[arg(long)]
    unsafe_pg: bool,
}

async fn create(env: &Env, def: Value) -> Result<String> {
    let r = env
        .http
        .post(env.api("/v1/workflows"))
        .json(&def)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("creating a workflow: {}", r.text().await?);
    }
    Ok(r.json::<Value>().await?["id"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// Start a run and wait for it; returns (run id, client-side wall ms).
async fn run_once(env: &Env, workflow: &str) -> Result<(String, f64)> {
    let t = Instant::now();
    let r = env
        .http
        .post(env.api(&format!("/v1/workflows/{workflow}/runs")))
        .header("prefer", "wait=60")
        .json(&json!({"input": {}}))
        .send()
        .await?;
    let wall = t.elapsed().as_secs_f64() * 1000.0;
    let body: Value = r.json().await?;
    if body["status"] != "succeeded" {
        bail!("run did not succeed: {body}");
    }
    Ok((body["id"].as_str().unwrap_or_default().to_string(), wall))
}

pub async fn run(a: WorkflowBenchArgs) -> Result<()> {
    let facts = Facts::collect();
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let dir = named_dir(&bin_dir, "workflows");
    std::fs::create_dir_all(&dir)?;
    println!(
        "capibara bench-workflows — {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    println!("machine: {}", facts.machine());
    println!(
        "build: {}; chain of {} echo steps; fan-out of {}; {} runs each; 1 worker; postgres {}",
        profile(),
        a.chain,
        a.fan,
        a.runs,
        if a.unsafe_pg {
            "fsync off (not durable)"
        } else {
            "durable commits"
        }
    );
    let mut env = Env::start_with(a.unsafe_pg, 64, Vec::new(), &dir, &bin_dir).await?;
    env.spawn_worker("worker-1").await?;

    let chain: Vec<Value> = (0..a.chain)
        .map(|i| {
            let mut s = json!({"id": format!("s{i}"), "kind": "echo", "input": {"i": i}});
            if i > 0 {
                s["depends_on"] = json!([format!("s{}", i - 1)]);
            }
            s
        })
        .collect();
    let chain_id = create(&env, json!({"name": "chain", "steps": chain})).await?;
    let mut fan = vec![json!({"id": "root", "kind": "echo"})];
    let branches: Vec<String> = (0..a.fan).map(|i| format!("b{i}")).collect();
    for b in &branches {
        fan.push(json!({"id": b, "kind": "echo", "depends_on": ["root"]}));
    }
    fan.push(json!({"id": "join", "kind": "echo", "depends_on": branches}));
    let fan_id = create(&env, json!({"name": "fan", "steps": fan})).await?;

    run_once(&env, &chain_id).await?;
    run_once(&env, &fan_id).await?;
    let mut chain_runs = Vec::new();
    let mut chain_wall = Vec::new();
    for _ in 0..a.runs {
        let (id, wall) = run_once(&env, &chain_id).await?;
        chain_runs.push(id);
        chain_wall.push(wall);
    }
    let mut fan_wall = Vec::new();
    let mut fan_runs = Vec::new();
    for _ in 0..a.runs {
        let (id, wall) = run_once(&env, &fan_id).await?;
        fan_runs.push(id);
        fan_wall.push(wall);
    }
    env.check_alive()?;

    // Step overhead: next step's job start − previous step's job end (same clock: Postgres rows
    // written from the worker's and the orchestrator's clocks on one machine).
    let rows: Vec<(f64,)> = sqlx::query_as(
        "SELECT extract(epoch FROM n.started_at - p.finished_at)::float8 * 1000
         FROM jobs p JOIN jobs n ON n.run_id = p.run_id
          AND (CASE WHEN n.step_id ~ '^s[0-9]+$' THEN substr(n.step_id, 2)::int END)
              = (CASE WHEN p.step_id ~ '^s[0-9]+$' THEN substr(p.step_id, 2)::int END) + 1
         WHERE p.run_id = ANY($1::uuid[])",
    )
    .bind(&chain_runs)
    .fetch_all(&env.pool)
    .await?;
    let overhead = sorted(rows.into_iter().map(|(ms,)| ms).collect());
    // The orchestrator's share: the step's job end → the next StepReady on the run stream.
    let rows: Vec<(f64,)> = sqlx::query_as(
        "SELECT extract(epoch FROM r.recorded_at - j.finished_at)::float8 * 1000
         FROM jobs j JOIN events r ON r.stream_id = j.run_id AND r.type = 'StepReady'
          AND (CASE WHEN r.data->>'step_id' ~ '^s[0-9]+$' THEN substr(r.data->>'step_id', 2)::int END)
              = (CASE WHEN j.step_id ~ '^s[0-9]+$' THEN substr(j.step_id, 2)::int END) + 1
         WHERE j.run_id = ANY($1::uuid[])",
    )
    .bind(&chain_runs)
    .fetch_all(&env.pool)
    .await?;
    let planning = sorted(rows.into_iter().map(|(ms,)| ms).collect());
    let rows: Vec<(f64,)> = sqlx::query_as(
        "SELECT extract(epoch FROM finished_at - created_at)::float8 * 1000 FROM runs
         WHERE id = ANY($1::uuid[])",
    )
    .bind(&chain_runs)
    .fetch_all(&env.pool)
    .await?;
    let chain_e2e = sorted(rows.into_iter().map(|(ms,)| ms).collect());
    let rows: Vec<(f64,)> = sqlx::query_as(
        "SELECT extract(epoch FROM finished_at - created_at)::float8 * 1000 FROM runs
         WHERE id = ANY($1::uuid[])",
    )
    .bind(&fan_runs)
    .fetch_all(&env.pool)
    .await?;
    let fan_e2e = sorted(rows.into_iter().map(|(ms,)| ms).collect());
    let chain_wall = sorted(chain_wall);
    let fan_wall = sorted(fan_wall);

    println!();
    println!("| Figure | p50 | p99 / max |");
    println!("|---|---|---|");
    println!(
        "| Step overhead: previous step's job end → next step's job start ({} gaps) | {:.2} ms | {:.2} ms |",
        overhead.len(),
        percentile(&overhead, 0.50),
        percentile(&overhead, 0.99)
    );
    println!(
        "| of which the orchestrator: job end → next `StepReady` committed | {:.2} ms | {:.2} ms |",
        percentile(&planning, 0.50),
        percentile(&planning, 0.99)
    );
    println!(
        "| {}-step chain, run created → run finished | {:.0} ms | {:.0} ms |",
        a.chain,
        percentile(&chain_e2e, 0.50),
        chain_e2e.last().copied().unwrap_or(0.0)
    );
    println!(
        "| {}-step chain, client POST (Prefer: wait) → response | {:.0} ms | {:.0} ms |",
        a.chain,
        percentile(&chain_wall, 0.50),
        chain_wall.last().copied().unwrap_or(0.0)
    );
    println!(
        "| {}-way fan-out/fan-in, run created → run finished | {:.0} ms | {:.0} ms |",
        a.fan,
        percentile(&fan_e2e, 0.50),
        fan_e2e.last().copied().unwrap_or(0.0)
    );
    println!(
        "| {}-way fan-out/fan-in, client POST (Prefer: wait) → response | {:.0} ms | {:.0} ms |",
        a.fan,
        percentile(&fan_wall, 0.50),
        fan_wall.last().copied().unwrap_or(0.0)
    );
    println!();
    println!("logs: {}", dir.display());
    Ok(())
}
