//! `capibara bench-models`: the model kinds through the API on one worker —
//! - `text.embed`: the first job (the model loaded), then the client wall and the model's own
//!   time for 1 and 32 texts per job, texts/s;
//! - `finetune.train` on the shipped sentiment set (tests/fixtures/sentiment): seconds,
//!   training examples/s, and the held-out accuracy of the model;
//! - `model.classify` with that model: p50 and texts/s for 1 and 32 texts;
//! - `memory.search` over 10,000 and 100,000 stored items (written straight into the table
//!   with random unit vectors, as the model's work is not what this measures): the first
//!   search (the worker's copy loaded), then p50/p99 by meaning, by words and both;
//! - the worker's resident memory along the way.
//!
//! `--threads 1` runs the worker's model code on one thread (`RAYON_NUM_THREADS`).

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
    /// Threads the worker's model code uses (RAYON_NUM_THREADS; default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// The largest memory collection searched (items).
    #[arg(long, default_value_t = 100_000)]
    memory_items: usize,
}

/// A job of `kind` run to its end: (client wall ms, the job).
async fn run_job(env: &Env, kind: &str, input: Value) -> Result<(f64, Value)> {
    let t = Instant::now();
    let mut job: Value = env
        .http
        .post(env.api("/v1/jobs"))
        .header("prefer", "wait=60")
        .json(&json!({"kind": kind, "input": input}))
        .send()
        .await?
        .json()
        .await?;
    while !matches!(
        job["status"].as_str(),
        Some("succeeded" | "failed" | "canceled")
    ) {
        let id = job["id"].as_str().unwrap_or_default().to_string();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        job = env
            .http
            .get(env.api(&format!("/v1/jobs/{id}")))
            .send()
            .await?
            .json()
            .await?;
    }
    let wall = t.elapsed().as_secs_f64() * 1000.0;
    if job["status"] != "succeeded" {
        bail!("{kind} did not succeed: {job}");
    }
    Ok((wall, job))
}

/// `jobs` jobs of `kind` with 1, then 32 sentences as `texts` (beside `input`'s fields), one
/// at a time: the client wall, the job's own `duration_ms`, and texts/s from it.
async fn per_text(env: &Env, kind: &str, input: Value, jobs: usize) -> Result<()> {
    for n in [1usize, 32] {
        let (mut walls, mut models) = (Vec::new(), Vec::new());
        for j in 0..jobs {
            let mut input = input.clone();
            input["texts"] = json!((0..n).map(|k| sentence(1 + j * n + k)).collect::<Vec<_>>());
            let (w, job) = run_job(env, kind, input).await?;
            walls.push(w);
            models.push(job["output"]["duration_ms"].as_f64().unwrap_or(f64::NAN));
        }
        let (walls, models) = (sorted(walls), sorted(models));
        let m50 = percentile(&models, 0.5);
        println!(
            "{kind}, {n} text(s) of ~20 words per job ({jobs} jobs): client wall p50 {:.1} ms, p99 {:.1} ms; model p50 {m50:.1} ms = {:.0} texts/s",
            percentile(&walls, 0.5),
            percentile(&walls, 0.99),
            n as f64 / (m50 / 1000.0)
        );
    }
    // Many one-text jobs at once (an application classifying each message as it arrives): the
    // worker runs 32 at a time, and their texts share model passes.
    let many = 4 * jobs;
    let t = Instant::now();
    let runs = (0..many).map(|j| {
        let mut input = input.clone();
        input["texts"] = json!([sentence(1000 + j)]);
        run_job(env, kind, input)
    });
    let walls: Vec<f64> = futures::future::try_join_all(runs)
        .await?
        .into_iter()
        .map(|(w, _)| w)
        .collect();
    let all = t.elapsed().as_secs_f64();
    let walls = sorted(walls);
    println!(
        "{kind}, {many} one-text jobs submitted at once: {:.0} texts/s; client wall p50 {:.0} ms, p99 {:.0} ms",
        many as f64 / all,
        percentile(&walls, 0.5),
        percentile(&walls, 0.99)
    );
    Ok(())
}

fn jsonl(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Store `n` items in `collection` straight into the table: random unit vectors, and texts
/// made of a few of 200 words (for the keyword search).
async fn fill_memory(env: &Env, collection: &str, n: usize) -> Result<()> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
    let words: Vec<String> = (0..200).map(|w| format!("word{w}")).collect();
    for start in (0..n).step_by(2_000) {
        let m = 2_000.min(n - start);
        let mut ids = Vec::with_capacity(m);
        let mut texts = Vec::with_capacity(m);
        let mut vectors = Vec::with_capacity(m * 384);
        for _ in 0..m {
            ids.push(uuid::Uuid::now_v7());
            let t: Vec<&str> = (0..8)
                .map(|_| words[rng.random_range(0..words.len())].as_str())
                .collect();
            texts.push(t.join(" "));
            let v: Vec<f32> = (0..384).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            vectors.extend(v.into_iter().map(|x| x / norm));
        }
        sqlx::query(
            "INSERT INTO memory_items (id, namespace, collection, text, tags, metadata, embedding)
             SELECT i, 'default', $2, t, '{}', '{}', ARRAY(
                 SELECT ($4::real[])[k] FROM generate_series(o * 384 + 1, o * 384 + 384) AS k)
             FROM unnest($1::uuid[], $3::text[]) WITH ORDINALITY AS x(i, t, n),
                  LATERAL (SELECT (n - 1)::int AS o) AS off",
        )
        .bind(&ids)
        .bind(collection)
        .bind(&texts)
        .bind(&vectors)
        .execute(&env.pool)
        .await?;
    }
    sqlx::query(
        "INSERT INTO memory_collections (namespace, collection, items) VALUES ('default', $1, $2)
         ON CONFLICT (namespace, collection) DO UPDATE SET items = memory_collections.items + $2",
    )
    .bind(collection)
    .bind(n as i64)
    .execute(&env.pool)
    .await?;
    // The planner's statistics as autovacuum would have them after such a load.
    sqlx::query("ANALYZE memory_items")
        .execute(&env.pool)
        .await?;
    Ok(())
}

/// A sentence of about 20 words, different each time.
fn sentence(k: usize) -> String {
    format!(
        "Order {k} was shipped from the warehouse on Tuesday and should reach the customer \
         before the end of the week, weather permitting."
    )
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
    let extra = a
        .threads
        .map(|t| vec![("RAYON_NUM_THREADS".to_string(), t.to_string())])
        .unwrap_or_default();
    if let Some(t) = a.threads {
        println!("worker model threads: {t} (RAYON_NUM_THREADS)");
    }
    // capibara-worker's default concurrency: one-text jobs arriving together run together.
    let mut env = Env::start_with(false, 32, extra, &dir, &bin_dir).await?;
    env.spawn_worker("worker-1").await?;
    let pid = env
        .procs
        .iter()
        .find(|p| p.name == "worker-1")
        .map(|p| p.child.id());
    let before = pid.and_then(rss_mib);
    let (wall, first) = run_job(&env, "text.embed", json!({"texts": [sentence(0)]})).await?;
    let model = first["output"]["duration_ms"].as_f64().unwrap_or(f64::NAN);
    println!(
        "first job (loads the model): client wall {wall:.0} ms, model {model:.1} ms; worker RSS {:.0} → {:.0} MiB",
        before.unwrap_or(f64::NAN),
        pid.and_then(rss_mib).unwrap_or(f64::NAN)
    );
    per_text(&env, "text.embed", json!({}), a.jobs).await?;
    println!(
        "worker RSS with the model loaded: {:.0} MiB",
        pid.and_then(rss_mib).unwrap_or(f64::NAN)
    );

    // finetune.train on the shipped set, every sentence training; the held-out ones measure.
    let train = jsonl(include_str!("../../tests/fixtures/sentiment/train.jsonl"));
    let heldout = jsonl(include_str!("../../tests/fixtures/sentiment/heldout.jsonl"));
    for (label, extra) in [
        (
            "head alone (freeze_encoder)",
            json!({"freeze_encoder": true}),
        ),
        ("2 layers + head (default)", json!({})),
    ] {
        let mut input = json!({"name": "bench", "examples": train, "seed": 3,
                               "validation_split": 0.0});
        for (k, v) in extra.as_object().into_iter().flatten() {
            input[k] = v.clone();
        }
        let (wall, job) = run_job(&env, "finetune.train", input).await?;
        let m = &job["output"]["metrics"];
        let model = job["output"]["model"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let texts: Vec<&str> = heldout.iter().filter_map(|e| e["text"].as_str()).collect();
        let (_, classified) = run_job(
            &env,
            "model.classify",
            json!({"model": model, "texts": texts}),
        )
        .await?;
        let correct = classified["output"]["predictions"]
            .as_array()
            .map(|p| {
                p.iter()
                    .zip(&heldout)
                    .filter(|(p, e)| p["label"] == e["label"])
                    .count()
            })
            .unwrap_or(0);
        println!(
            "finetune.train, {label}: {} examples × {} epochs in {:.1} s (client wall {:.1} s; encoding {:.1} s) = {:.0} training examples/s; held-out accuracy {:.2} ({correct}/{})",
            m["train_examples"],
            m["epochs"],
            m["duration_s"].as_f64().unwrap_or(f64::NAN),
            wall / 1000.0,
            m["encode_s"].as_f64().unwrap_or(f64::NAN),
            m["examples_per_s"].as_f64().unwrap_or(f64::NAN),
            correct as f64 / heldout.len() as f64,
            heldout.len()
        );
    }
    // model.classify with the last (fine-tuned) model, loaded by a first job: 1 and 32 texts
    // per job.
    run_job(
        &env,
        "model.classify",
        json!({"model": "bench", "texts": ["x"]}),
    )
    .await?;
    per_text(&env, "model.classify", json!({"model": "bench"}), a.jobs).await?;
    println!(
        "worker RSS with the encoder, its trainable copy and the models loaded: {:.0} MiB",
        pid.and_then(rss_mib).unwrap_or(f64::NAN)
    );

    // memory.search at 10k and the largest size.
    let mut sizes = vec![10_000usize, a.memory_items];
    sizes.dedup();
    for n in sizes {
        let collection = format!("bench{n}");
        let t = Instant::now();
        fill_memory(&env, &collection, n).await?;
        let fill = t.elapsed().as_secs_f64();
        let (first, _) = run_job(
            &env,
            "memory.search",
            json!({"query": "word1 word2", "collection": collection, "mode": "semantic"}),
        )
        .await?;
        for mode in ["semantic", "keyword", "hybrid"] {
            let (mut walls, mut inner) = (Vec::new(), Vec::new());
            for j in 0..a.jobs.max(30) {
                let query = format!("word{} word{} shipped", j % 200, (j * 7) % 200);
                let (w, job) = run_job(
                    &env,
                    "memory.search",
                    json!({"query": query, "collection": collection, "mode": mode, "k": 10}),
                )
                .await?;
                walls.push(w);
                inner.push(job["output"]["duration_ms"].as_f64().unwrap_or(f64::NAN));
            }
            let (walls, inner) = (sorted(walls), sorted(inner));
            println!(
                "memory.search {mode}, {n} items, k 10 ({} searches): in the worker p50 {:.1} ms, p99 {:.1} ms; client wall p50 {:.1} ms",
                walls.len(),
                percentile(&inner, 0.5),
                percentile(&inner, 0.99),
                percentile(&walls, 0.5)
            );
        }
        println!(
            "  ({n} items written straight into the table in {fill:.1} s; the first search, which reads them into the worker, took {first:.0} ms; worker RSS now {:.0} MiB)",
            pid.and_then(rss_mib).unwrap_or(f64::NAN)
        );
    }
    Ok(())
}
