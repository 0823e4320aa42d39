//! The faults a chaos run injects, on a schedule, and the recovery probe after each: once a
//! fault is over, an `echo` job is submitted and the time until it succeeded is the fault's
//! recovery time.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};
use capibara_dev_services::{Fault as Net, FaultProxy, PostgresServer, RedisServer};
use serde_json::Value;

use super::{
    fleet::Fleet,
    load::{Shape, Submitter},
};

/// One fault of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// An API process SIGKILLed (the supervisor restarts it).
    ApiKill,
    /// Redis SIGKILLed and restarted with no data.
    RedisRestartEmpty,
    /// Postgres stopped with a fast shutdown and started again.
    PgRestartFast,
    /// Postgres stopped with an immediate shutdown (no checkpoint: crash recovery on start).
    PgRestartImmediate,
    /// Every connection to Redis reset and new ones refused, for [`OUTAGE`].
    RedisCut,
    /// Every connection to Postgres reset and new ones refused, for [`OUTAGE`].
    PgCut,
    /// No byte moves to or from Redis, for [`OUTAGE`] (a hung server).
    RedisStall,
    /// No byte moves to or from Postgres, for [`OUTAGE`].
    PgStall,
    /// The scheduler replica holding leader locks SIGKILLed.
    SchedulerLeaderKill,
}

/// How long a network cut or stall lasts.
pub(crate) const OUTAGE: Duration = Duration::from_secs(10);

impl Fault {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Fault::ApiKill => "API process SIGKILLed, restarted",
            Fault::RedisRestartEmpty => "Redis SIGKILLed, restarted empty",
            Fault::PgRestartFast => "Postgres restarted (fast shutdown)",
            Fault::PgRestartImmediate => "Postgres restarted (immediate shutdown, crash recovery)",
            Fault::RedisCut => "network to Redis cut for 10 s",
            Fault::PgCut => "network to Postgres cut for 10 s",
            Fault::RedisStall => "network to Redis stalled for 10 s",
            Fault::PgStall => "network to Postgres stalled for 10 s",
            Fault::SchedulerLeaderKill => "leading scheduler SIGKILLed, restarted",
        }
    }

    /// Every fault once, in the order a cycle injects them.
    pub(crate) const CYCLE: &'static [Fault] = &[
        Fault::ApiKill,
        Fault::RedisRestartEmpty,
        Fault::PgRestartFast,
        Fault::RedisCut,
        Fault::SchedulerLeaderKill,
        Fault::PgRestartImmediate,
        Fault::PgCut,
        Fault::RedisStall,
        Fault::PgStall,
    ];
}

/// Postgres and Redis, and the proxies every Capibara process reaches them through.
pub(crate) struct Stack {
    pub(crate) pg: Mutex<PostgresServer>,
    pub(crate) redis: Mutex<RedisServer>,
    pub(crate) pg_proxy: FaultProxy,
    pub(crate) redis_proxy: FaultProxy,
}

/// One injected fault and what followed.
#[derive(Debug, Clone)]
pub(crate) struct Injected {
    pub(crate) fault: Fault,
    /// Seconds into the run when it began and when it was over (servers back, network healed).
    pub(crate) at: f64,
    pub(crate) ended: f64,
    pub(crate) detail: String,
    /// After `ended`: the probe's submission accepted, and its job succeeded.
    pub(crate) accepted_after: Option<f64>,
    pub(crate) recovered_after: Option<f64>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("{e}"))?
}

/// The scheduler holding the most leader locks (`capibara_scheduler_leader` on its /metrics).
async fn leading_scheduler(fleet: &Fleet, http: &reqwest::Client) -> Option<String> {
    let mut best: Option<(String, usize)> = None;
    for (name, port) in fleet.named("scheduler") {
        let url = format!("http://127.0.0.1:{port}/metrics");
        let Ok(r) = http.get(&url).send().await else {
            continue;
        };
        let text = r.text().await.unwrap_or_default();
        let held = text
            .lines()
            .filter(|l| l.starts_with("capibara_scheduler_leader{") && l.ends_with(" 1"))
            .count();
        if held > 0 && best.as_ref().is_none_or(|(_, n)| held > *n) {
            best = Some((name, held));
        }
    }
    best.map(|(n, _)| n)
}

/// Injects `fault` and returns once it is over, with what was done.
pub(crate) async fn inject(
    fault: Fault,
    stack: &Arc<Stack>,
    fleet: &Fleet,
    http: &reqwest::Client,
) -> Result<String> {
    Ok(match fault {
        Fault::ApiKill => {
            let name = fleet
                .named("api")
                .first()
                .map(|(n, _)| n.clone())
                .ok_or_else(|| anyhow!("no API process"))?;
            let pid = fleet.kill(&name);
            fleet.supervise();
            format!("{name} (pid {pid:?})")
        }
        Fault::RedisRestartEmpty => {
            let s = stack.clone();
            blocking(move || {
                s.redis
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .restart_empty()
            })
            .await?;
            String::new()
        }
        Fault::PgRestartFast | Fault::PgRestartImmediate => {
            let s = stack.clone();
            blocking(move || {
                let mut pg = s.pg.lock().unwrap_or_else(|p| p.into_inner());
                if fault == Fault::PgRestartImmediate {
                    // A stop that failed killed the server instead: start it again either way.
                    if let Err(e) = pg.stop_immediate() {
                        eprintln!("immediate shutdown: {e:#}");
                    }
                }
                pg.restart()
            })
            .await?;
            String::new()
        }
        Fault::RedisCut | Fault::RedisStall | Fault::PgCut | Fault::PgStall => {
            let (proxy, how) = match fault {
                Fault::RedisCut => (&stack.redis_proxy, Net::Cut),
                Fault::RedisStall => (&stack.redis_proxy, Net::Stall),
                Fault::PgCut => (&stack.pg_proxy, Net::Cut),
                _ => (&stack.pg_proxy, Net::Stall),
            };
            proxy.set(how);
            tokio::time::sleep(OUTAGE).await;
            proxy.heal();
            String::new()
        }
        Fault::SchedulerLeaderKill => match leading_scheduler(fleet, http).await {
            Some(name) => {
                let pid = fleet.kill(&name);
                fleet.supervise();
                format!("{name} (pid {pid:?}) led")
            }
            None => "no scheduler reported a leader lock; none killed".into(),
        },
    })
}

/// Submits a probe job and waits until it succeeded: seconds until accepted, until succeeded.
pub(crate) async fn probe(sub: &Submitter, within: Duration) -> (Option<f64>, Option<f64>) {
    let started = Instant::now();
    let Some(id) = sub.submit(0, Shape::Probe, "", "").await else {
        return (None, None);
    };
    let accepted = started.elapsed().as_secs_f64();
    while started.elapsed() < within {
        let url = format!("{}/v1/jobs/{id}", sub.api());
        if let Ok(r) = sub.http().get(&url).send().await {
            if let Ok(v) = r.json::<Value>().await {
                if v.get("status").and_then(Value::as_str) == Some("succeeded") {
                    return (Some(accepted), Some(started.elapsed().as_secs_f64()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (Some(accepted), None)
}
