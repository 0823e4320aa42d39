//! The checks after a chaos run, from the event log and the receiver, not from the processes'
//! own counters: every accepted job and run terminal, none lost, none completed twice, each
//! workflow step run once, every callback's terminal event delivered in order, and the
//! projections equal to a rebuild from the log.

use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{bail, Context, Result};
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    load::{Accepted, Shape, WORKFLOW_STEP_JOBS},
    receiver::Receiver,
};

/// Job statuses that end a job.
const TERMINAL: &[&str] = &["succeeded", "failed", "canceled"];

#[derive(Debug, Default)]
pub(crate) struct Audit {
    /// Accepted per shape.
    pub(crate) accepted: BTreeMap<Shape, usize>,
    /// Final status of the accepted jobs and runs, per status.
    pub(crate) statuses: BTreeMap<String, usize>,
    /// Accepted, but no stream in the log.
    pub(crate) lost: Vec<Uuid>,
    /// Accepted, in the log, not terminal.
    pub(crate) open: Vec<Uuid>,
    /// Any job (accepted or created by Capibara: steps, deliveries) with two terminal events.
    pub(crate) completed_twice: Vec<Uuid>,
    /// Runs whose step jobs differ from one job per step (per map item).
    pub(crate) steps_not_once: Vec<String>,
    /// Callback jobs whose terminal event never reached the receiver.
    pub(crate) callbacks_missing: Vec<Uuid>,
    /// Callback jobs whose events arrived out of order (or the terminal one not last).
    pub(crate) callbacks_out_of_order: Vec<Uuid>,
    pub(crate) callbacks_checked: usize,
    pub(crate) callback_repeats: usize,
    pub(crate) callback_bad_signatures: usize,
    /// Deliveries not succeeded.
    pub(crate) deliveries_unfinished: i64,
    /// Per projection table: rows, and rows that differ after a rebuild.
    pub(crate) projections: Vec<(String, usize, usize)>,
    pub(crate) events: i64,
}

impl Audit {
    /// Every broken promise, as lines; empty when the run kept them all.
    pub(crate) fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut list = |what: &str, ids: &[Uuid]| {
            if !ids.is_empty() {
                let some: Vec<String> = ids.iter().take(5).map(Uuid::to_string).collect();
                out.push(format!("{} {what} (e.g. {})", ids.len(), some.join(", ")));
            }
        };
        list("accepted but lost", &self.lost);
        list("accepted but not terminal", &self.open);
        list("completed twice", &self.completed_twice);
        list(
            "callbacks without their terminal event",
            &self.callbacks_missing,
        );
        list("callbacks out of order", &self.callbacks_out_of_order);
        if !self.steps_not_once.is_empty() {
            out.push(format!(
                "{} runs with a step not run exactly once: {}",
                self.steps_not_once.len(),
                self.steps_not_once
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        if self.callback_bad_signatures > 0 {
            out.push(format!(
                "{} callbacks failed signature verification",
                self.callback_bad_signatures
            ));
        }
        if self.deliveries_unfinished > 0 {
            out.push(format!(
                "{} deliveries not succeeded",
                self.deliveries_unfinished
            ));
        }
        for (table, _, differ) in &self.projections {
            if *differ > 0 {
                out.push(format!("{table}: {differ} rows differ from a rebuild"));
            }
        }
        out
    }
}

/// The events that end a job stream, and a run stream.
const JOB_ENDS: &[&str] = &["JobSucceeded", "JobFailed", "JobCanceled"];
const RUN_ENDS: &[&str] = &["RunSucceeded", "RunFailed", "RunCanceled"];

/// For each stream of `ids`: its events, those among `ends`, and the status of its row in the
/// projection `table` (None when the row is missing).
async fn stream_ends(
    pool: &PgPool,
    ids: &[Uuid],
    ends: &[&str],
    table: &str,
) -> Result<Vec<(Uuid, i64, i64, Option<String>)>> {
    Ok(sqlx::query_as(&format!(
        "SELECT s.id,
                (SELECT count(*) FROM events e WHERE e.stream_id = s.id),
                (SELECT count(*) FROM events e WHERE e.stream_id = s.id AND e.type = ANY($2)),
                p.status
         FROM unnest($1::uuid[]) s(id) LEFT JOIN {table} p ON p.id = s.id"
    ))
    .bind(ids)
    .bind(ends)
    .fetch_all(pool)
    .await?)
}

/// Jobs and runs not yet terminal, anywhere in the database (steps and deliveries included).
pub(crate) async fn open_work(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM jobs WHERE status <> ALL($1))
              + (SELECT count(*) FROM runs WHERE status NOT IN ('succeeded', 'failed', 'canceled'))",
    )
    .bind(TERMINAL)
    .fetch_one(pool)
    .await?)
}

/// Each log follower's saved position and when it saved it, against the log's head.
pub(crate) async fn followers(pool: &PgPool) -> Result<Vec<String>> {
    let head: Option<i64> = sqlx::query_scalar("SELECT max(position) FROM events")
        .fetch_one(pool)
        .await?;
    let rows: Vec<(String, i64, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as("SELECT name, position, updated_at FROM log_checkpoints ORDER BY name")
            .fetch_all(pool)
            .await?;
    let mut lines = vec![format!("log head: position {}", head.unwrap_or(0))];
    lines.extend(rows.into_iter().map(|(name, position, at)| {
        format!("follower {name}: position {position}, saved at {at}")
    }));
    Ok(lines)
}

pub(crate) async fn check(
    pool: &PgPool,
    accepted: &[Accepted],
    receiver: &Receiver,
) -> Result<Audit> {
    let mut audit = Audit::default();
    for a in accepted {
        *audit.accepted.entry(a.shape).or_default() += 1;
    }
    audit.events = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?;

    let jobs: Vec<Uuid> = accepted
        .iter()
        .filter(|a| a.shape != Shape::Workflow)
        .map(|a| a.id)
        .collect();
    let rows = stream_ends(pool, &jobs, JOB_ENDS, "jobs").await?;
    let mut status_of = BTreeMap::new();
    for (id, events, terminal, status) in rows {
        if events == 0 {
            audit.lost.push(id);
            continue;
        }
        if terminal == 0 {
            audit.open.push(id);
        }
        let status = status.unwrap_or_else(|| "missing from the jobs projection".into());
        *audit.statuses.entry(status.clone()).or_default() += 1;
        status_of.insert(id, status);
    }
    // Two terminal events on one job stream, for every job (steps and deliveries too).
    audit.completed_twice = sqlx::query_scalar(
        "SELECT stream_id FROM events WHERE stream_type = 'job' AND type = ANY($1)
         GROUP BY stream_id HAVING count(*) > 1",
    )
    .bind(JOB_ENDS)
    .fetch_all(pool)
    .await?;

    // Runs: terminal once, and one job per step (per map item).
    let runs: Vec<Uuid> = accepted
        .iter()
        .filter(|a| a.shape == Shape::Workflow)
        .map(|a| a.id)
        .collect();
    let rows = stream_ends(pool, &runs, RUN_ENDS, "runs").await?;
    for (id, events, terminal, status) in rows {
        if events == 0 {
            audit.lost.push(id);
            continue;
        }
        match terminal {
            0 => audit.open.push(id),
            1 => {}
            _ => audit.completed_twice.push(id),
        }
        let status = status.unwrap_or_else(|| "missing from the runs projection".into());
        *audit.statuses.entry(format!("run {status}")).or_default() += 1;
    }
    let step_jobs: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "SELECT run_id, step_id, count(*) FROM jobs WHERE run_id = ANY($1)
         GROUP BY run_id, step_id",
    )
    .bind(&runs)
    .fetch_all(pool)
    .await?;
    let mut per_run: BTreeMap<Uuid, BTreeMap<String, i64>> = BTreeMap::new();
    for (run, step, n) in step_jobs {
        per_run.entry(run).or_default().insert(step, n);
    }
    let succeeded: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM runs WHERE id = ANY($1) AND status = 'succeeded'")
            .bind(&runs)
            .fetch_all(pool)
            .await?;
    let expected: BTreeMap<String, i64> = WORKFLOW_STEP_JOBS
        .iter()
        .map(|(s, n)| (s.to_string(), *n))
        .collect();
    for run in succeeded {
        let got = per_run.remove(&run).unwrap_or_default();
        if got != expected {
            audit.steps_not_once.push(format!(
                "run {run}: step jobs {got:?}, expected {expected:?}"
            ));
        }
    }

    // Callbacks: the terminal event arrived, last, and the events in order.
    let (by_job, repeats, bad) = receiver.inbox(|i| (i.by_job.clone(), i.repeats, i.bad_signature));
    audit.callback_repeats = repeats;
    audit.callback_bad_signatures = bad;
    for a in accepted.iter().filter(|a| a.shape == Shape::Callback) {
        let Some(status) = status_of.get(&a.id) else {
            continue;
        };
        audit.callbacks_checked += 1;
        let got = by_job.get(&a.id).cloned().unwrap_or_default();
        let terminal = format!("job.{status}");
        match got.iter().position(|d| d.event == terminal) {
            None => audit.callbacks_missing.push(a.id),
            Some(i) => {
                let in_order = got.windows(2).all(|w| w[0].timestamp <= w[1].timestamp);
                if i + 1 != got.len() || !in_order {
                    audit.callbacks_out_of_order.push(a.id);
                }
            }
        }
    }
    audit.deliveries_unfinished =
        sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE status <> 'succeeded'")
            .fetch_one(pool)
            .await?;
    Ok(audit)
}

/// Projection tables `capibara admin rebuild-projections` rebuilds.
const PROJECTIONS: &[&str] = &[
    "jobs",
    "deliveries",
    "schedules",
    "triggers",
    "workflows",
    "runs",
    "user_kinds",
    "connectors",
    "connector_items",
    "models",
    "llm_providers",
    "bulk_operations",
    "limits",
    "pauses",
];

async fn snapshot(pool: &PgPool) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out = BTreeMap::new();
    for t in PROJECTIONS {
        let rows: Vec<String> =
            sqlx::query_scalar(&format!("SELECT to_jsonb(t)::text FROM {t} t ORDER BY 1"))
                .fetch_all(pool)
                .await
                .with_context(|| format!("reading {t}"))?;
        out.insert(t.to_string(), rows);
    }
    Ok(out)
}

/// Rebuilds every projection with `capibara admin rebuild-projections` (the fleet is stopped)
/// and compares each table with what the processes wrote inline.
pub(crate) async fn rebuild_matches(
    pool: &PgPool,
    bin_dir: &Path,
    env: &[(String, String)],
    audit: &mut Audit,
) -> Result<()> {
    let before = snapshot(pool).await?;
    let out = Command::new(bin_dir.join("capibara"))
        .args(["admin", "rebuild-projections"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .context("running capibara admin rebuild-projections")?;
    if !out.status.success() {
        bail!(
            "rebuild-projections failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let after = snapshot(pool).await?;
    for (table, rows) in &before {
        let rebuilt = after.get(table).cloned().unwrap_or_default();
        let differ = if *rows == rebuilt {
            0
        } else {
            let a: std::collections::BTreeSet<&String> = rows.iter().collect();
            let b: std::collections::BTreeSet<&String> = rebuilt.iter().collect();
            a.symmetric_difference(&b).count().max(1)
        };
        audit.projections.push((table.clone(), rows.len(), differ));
    }
    Ok(())
}
