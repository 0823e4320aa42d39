//! The push phase of `capibara-bench sdk`: a push kind (docs/workers.md) whose endpoint is a
//! local HTTP server answering at once, and `capibara-worker` calling it. Single submits at the
//! pickup rate while the worker is idle; per job, enqueue→finished from the job row, the
//! endpoint's own time measured inside its handler, and their difference: what push mode adds.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use axum::{routing::post as route_post, Json, Router};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{percentile, sorted, Env};

/// The webhook secret the bench's API and worker sign push calls with (push kinds need one).
pub(crate) const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What the servers need for the push phase: a signing secret, and calls to loopback allowed.
pub(crate) fn env() -> Vec<(String, String)> {
    vec![
        ("CAPIBARA_WEBHOOK_SECRET".into(), WEBHOOK_SECRET.into()),
        ("CAPIBARA_OUTBOUND_ALLOW_PRIVATE".into(), "true".into()),
    ]
}

const KIND: &str = "bench.push";

/// Sorted figures of the push phase, ms.
pub(crate) struct Push {
    /// Enqueue→finished.
    pub total: Vec<f64>,
    /// The endpoint's own time (inside its handler).
    pub endpoint: Vec<f64>,
    /// Enqueue→finished minus the endpoint's own time.
    pub overhead: Vec<f64>,
    /// Enqueue→started (the attempt's claim), and started→finished.
    pub to_start: Vec<f64>,
    pub to_finish: Vec<f64>,
}

impl Push {
    pub(crate) fn describe(&self) -> String {
        format!(
            "enqueue→finished p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms; the endpoint's own time p50 {:.3} ms; \
             push overhead p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms (enqueue→started p50 {:.2} ms, started→finished p50 {:.2} ms)",
            percentile(&self.total, 0.5),
            percentile(&self.total, 0.95),
            percentile(&self.total, 0.99),
            percentile(&self.endpoint, 0.5),
            percentile(&self.overhead, 0.5),
            percentile(&self.overhead, 0.95),
            percentile(&self.overhead, 0.99),
            percentile(&self.to_start, 0.5),
            percentile(&self.to_finish, 0.5),
        )
    }
}

/// Run `jobs` single submits at `rate`/s of a push kind through a fresh `capibara-worker`.
pub(crate) async fn measure(env: &mut Env, jobs: usize, rate: u32) -> Result<Push> {
    let own: Arc<Mutex<HashMap<Uuid, f64>>> = Arc::default();
    let app = Router::new().route(
        "/push",
        route_post({
            let own = own.clone();
            move |Json(call): Json<Value>| async move {
                let t = Instant::now();
                let id = call["job"]["id"].as_str().and_then(|s| s.parse().ok());
                let answer = Json(json!({"echo": call["job"]["input"]}));
                if let Some(id) = id {
                    own.lock()
                        .expect("endpoint times")
                        .insert(id, t.elapsed().as_secs_f64() * 1000.0);
                }
                answer
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/push", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let definition =
        json!({"mode": "push", "push": {"url": url}, "description": "capibara-bench sdk: push"});
    crate::sdk::put_kind(env, KIND, definition).await?;
    let name = "worker-push";
    env.spawn_worker(name).await?;
    // Workers reload the push kinds every second.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let tag = "push";
    crate::sdk::paced_submits(env, &crate::sdk::job(KIND, tag), jobs, rate).await?;
    let rows: Vec<(Uuid, f64, f64)> = sqlx::query_as(
        "SELECT id, (extract(epoch FROM finished_at - queued_at) * 1000)::float8, \
         (extract(epoch FROM started_at - queued_at) * 1000)::float8 FROM jobs \
         WHERE tags->>'phase' = $1 AND status = 'succeeded'",
    )
    .bind(tag)
    .fetch_all(&env.pool)
    .await?;
    crate::sdk::stop(env, name).await?;
    server.abort();
    if rows.len() != jobs {
        bail!("push: {} of {jobs} jobs succeeded", rows.len());
    }
    let own = own.lock().expect("endpoint times");
    let mut total = Vec::with_capacity(jobs);
    let mut endpoint = Vec::with_capacity(jobs);
    let mut overhead = Vec::with_capacity(jobs);
    let mut to_start = Vec::with_capacity(jobs);
    let mut to_finish = Vec::with_capacity(jobs);
    for (id, ms, start) in rows {
        to_start.push(start);
        to_finish.push(ms - start);
        let e = *own
            .get(&id)
            .ok_or_else(|| anyhow!("push: the endpoint never saw job {id}"))?;
        total.push(ms);
        endpoint.push(e);
        overhead.push(ms - e);
    }
    Ok(Push {
        total: sorted(total),
        endpoint: sorted(endpoint),
        overhead: sorted(overhead),
        to_start: sorted(to_start),
        to_finish: sorted(to_finish),
    })
}
