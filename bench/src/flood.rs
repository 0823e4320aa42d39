//! `capibara-bench flood`: one API key floods the API from loopback over many keep-alive
//! connections, as fast as it is answered, while a few other keys send at a polite pace.
//! Prints the flood's achieved request rate, the share the per-key limit answered 429, how many
//! of those got through against the limit's budget (rate × seconds + burst), and the other
//! keys' successes and latency (docs/security.md, "Hostile input").

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Args;
use reqwest::Client;
use serde_json::json;

use crate::harness::{
    named_dir, percentile, print_header, run_dir, server_bin_dir, sorted, Env, Facts,
};

#[derive(Args, Debug)]
pub struct FloodArgs {
    /// Concurrent keep-alive connections of the flooding key.
    #[arg(long, default_value_t = 256)]
    connections: usize,
    /// How long the flood lasts, in seconds.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// The API's per-key limit (`CAPIBARA_RATE_LIMIT_RPS`).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Other keys sending during the flood, one request at a time with 5 ms between.
    #[arg(long, default_value_t = 4)]
    other_keys: usize,
    #[arg(long)]
    unsafe_pg: bool,
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// A client that sends `key` as its bearer token, with a pool as large as the flood.
fn client(key: &str, pool: usize) -> Result<Client> {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse()?,
    );
    Ok(Client::builder()
        .default_headers(h)
        .pool_max_idle_per_host(pool)
        .timeout(Duration::from_secs(60))
        .build()?)
}

pub async fn run(a: FloodArgs) -> Result<()> {
    if a.connections == 0 || a.rate == 0 || a.secs <= 0.0 {
        bail!("--connections, --rate and --secs must be positive");
    }
    let bin_dir = server_bin_dir()?;
    let dir = run_dir(a.dir.as_ref(), named_dir(&bin_dir, "flood"))?;
    let facts = Facts::collect();
    print_header("capibara-bench flood", &facts, a.unsafe_pg, "");
    let env = Env::start_with(
        a.unsafe_pg,
        1,
        vec![("CAPIBARA_RATE_LIMIT_RPS".into(), a.rate.to_string())],
        &dir,
        &bin_dir,
    )
    .await?;
    let mut keys = Vec::new();
    for i in 0..=a.other_keys {
        let r = env
            .http
            .post(env.api("/v1/api-keys"))
            .json(&json!({"name": format!("flood-{i}"), "roles": ["read"]}))
            .send()
            .await?;
        let body: serde_json::Value = r.json().await?;
        keys.push(
            body["key"]
                .as_str()
                .with_context(|| format!("creating a key: {body}"))?
                .to_string(),
        );
    }
    let url = env.api("/v1/me");
    let flood_client = client(&keys[0], a.connections)?;
    // Open and warm the flood's connections and the keys' cache entries before the window.
    for k in &keys {
        client(k, 1)?.get(&url).send().await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // the flood key's bucket refills

    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicU64; 3]> = Arc::new(Default::default()); // 200, 429, other
    let started = Instant::now();
    let flood: Vec<_> = (0..a.connections)
        .map(|_| {
            let (c, url, stop, counts) = (
                flood_client.clone(),
                url.clone(),
                stop.clone(),
                counts.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let i = match c.get(&url).send().await {
                        Ok(r) if r.status() == 200 => 0,
                        Ok(r) if r.status() == 429 => 1,
                        _ => 2,
                    };
                    counts[i].fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let others: Vec<_> = keys[1..]
        .iter()
        .map(|k| {
            let (c, url, stop) = (client(k, 1), url.clone(), stop.clone());
            tokio::spawn(async move {
                let c = c?;
                let (mut ok, mut failed, mut ms) = (0u64, 0u64, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match c.get(&url).send().await {
                        Ok(r) if r.status() == 200 => ok += 1,
                        _ => failed += 1,
                    }
                    ms.push(t.elapsed().as_secs_f64() * 1000.0);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                anyhow::Ok((ok, failed, ms))
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(a.secs)).await;
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await?;
    }
    let window = started.elapsed().as_secs_f64();
    let (mut ok, mut failed, mut ms) = (0, 0, Vec::new());
    for o in others {
        let (k, f, m) = o.await??;
        ok += k;
        failed += f;
        ms.extend(m);
    }
    let ms = sorted(ms);
    let [accepted, limited, errors] = [0, 1, 2].map(|i| counts[i].load(Ordering::Relaxed));
    let total = accepted + limited + errors;
    let budget = a.rate as f64 * window + 2.0 * a.rate as f64;
    println!(
        "flood: 1 key, {} connections, {window:.1} s, limit {} req/s (burst {})",
        a.connections,
        a.rate,
        2 * a.rate
    );
    println!(
        "flood rate: {:.0} req/s ({total} requests); 429: {:.1} %; accepted {accepted} of a budget \
         of {budget:.0} (rate × s + burst); errors {errors}",
        total as f64 / window,
        100.0 * limited as f64 / total.max(1) as f64,
    );
    println!(
        "other keys ({}): {ok} answered 200, {failed} not; latency p50 {:.2} ms, p99 {:.2} ms",
        a.other_keys,
        percentile(&ms, 0.50),
        percentile(&ms, 0.99),
    );
    Ok(())
}
