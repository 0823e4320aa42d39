//! The bulk runner (docs/flow-control.md "Bulk actions"): takes the oldest running operation and
//! acts on its next page of jobs. A page's job events and the operation's `BulkProgressed` (its
//! counts and the last id done) are one append of several streams, so after a crash the next
//! step starts after the last committed page and no job is acted on or counted twice.
//!
//! Safe with any number of scheduler replicas: every append expects the versions it read (the
//! operation's and each job's), so two replicas doing the same page commit it once; the other
//! conflicts and reads again.

use std::{collections::HashMap, time::Duration};

use capibara_shared::{
    domain::{
        self,
        bulk::{BulkAction, BulkEvent, BulkOperation, JobAction},
        event::EventMetadata,
        job::{Cancel, Job},
    },
    queue::Queue,
    store::{
        self,
        bulk::{bulk_append, Pin},
        jobs::{job_append, JobFilter, JobWrite},
        AppendError, Store, StoreError,
    },
};
use tokio_util::sync::CancellationToken;

use crate::driver::every;

/// How the runner works.
#[derive(Debug, Clone)]
pub struct BulkOptions {
    /// Jobs per page (one transaction).
    pub page_size: i64,
    /// How often an idle runner looks for a running operation.
    pub poll: Duration,
}

/// Run operations until `stop`.
pub async fn run(store: Store, queue: Queue, opts: BulkOptions, stop: CancellationToken) {
    every(opts.poll, &stop, || step(&store, &queue, opts.page_size)).await
}

/// The operation's own events: recorded by the scheduler.
fn runner_metadata(op: &BulkOperation) -> EventMetadata {
    EventMetadata {
        namespace: op.namespace.clone(),
        actor: Some("scheduler".into()),
        ..Default::default()
    }
}

/// One step: the next page of the oldest running operation (or its end when no page is left).
/// Returns how many jobs it went through plus one for an operation it moved (0: nothing to do).
pub async fn step(store: &Store, queue: &Queue, page_size: i64) -> Result<usize, StoreError> {
    let Some((op, pin)) = store::bulk::next_running(&store.pool).await? else {
        return Ok(0);
    };
    let filter = match JobFilter::from_json(&op.filter) {
        Ok(f) => f,
        // Checked when the operation was asked for; a stored filter that no longer parses
        // (a field renamed since) ends it rather than acting on the wrong jobs.
        Err(e) => {
            let error = format!("the filter no longer parses: {}: {}", e.field, e.message);
            record(store, &op, BulkEvent::BulkFailed { error }).await?;
            return Ok(1);
        }
    };
    let first = op.cursor.is_none();
    let matched = match first {
        true => Some(store::bulk::count(&store.pool, &op.namespace, &filter, pin.cursor).await?),
        false => None,
    };
    let jobs = store::bulk::page(
        &store.pool,
        &op.namespace,
        &filter,
        pin.cursor,
        op.cursor,
        page_size,
    )
    .await?;
    let Some(last) = jobs.last().map(|j| j.id) else {
        let finished = BulkEvent::BulkFinished {
            done: op.done as u64,
            skipped: op.skipped as u64,
        };
        if record(store, &op, finished).await? {
            tracing::info!(operation = %op.id, done = op.done, skipped = op.skipped, "bulk operation finished");
        }
        return Ok(1);
    };
    let budgets = match op.action {
        BulkAction::Retry => {
            let ids: Vec<_> = jobs.iter().map(|j| j.id).collect();
            store::jobs::submitted_max_attempts(&store.pool, &ids).await?
        }
        BulkAction::Cancel | BulkAction::Delete => HashMap::new(),
    };
    let page = decide_page(&op, &pin, &jobs, &budgets);
    let progressed = BulkEvent::BulkProgressed {
        done: op.done as u64 + page.done,
        skipped: op.skipped as u64 + page.skipped,
        matched: matched.map(|m| m as u64),
        position: first.then_some(pin.cursor.position),
        cursor: last,
    };
    let (_, op_append) = bulk_append(
        Some(&op),
        op.id,
        &[progressed],
        runner_metadata(&op),
        domain::now(),
    )
    .ok_or_else(|| StoreError::Internal("BulkProgressed does not apply".into()))?;
    let mut appends = page.appends;
    appends.push(op_append);
    match store.appender.append_all(appends).await {
        Ok(_) => {}
        // A job changed since the page was read, or another replica did this page: read again.
        Err(AppendError::Conflict { .. }) => return Ok(1),
        Err(AppendError::Invalid(why)) => {
            record(store, &op, BulkEvent::BulkFailed { error: why }).await?;
            return Ok(1);
        }
        Err(e) => return Err(e.into()),
    }
    let action = op.action.as_str();
    metrics::counter!("capibara_bulk_jobs_total", "action" => action, "result" => "done")
        .increment(page.done);
    metrics::counter!("capibara_bulk_jobs_total", "action" => action, "result" => "skipped")
        .increment(page.skipped);
    // What follows on the queue, as after the single-job cancel (the retried jobs' dispatch rows
    // were pushed by the commit itself).
    for (job, cancel) in page.follow {
        match cancel {
            Cancel::Canceled => {
                let entry = store::dispatch::DispatchEntry::of(&job, domain::now());
                let _ = queue.remove(&entry).await;
            }
            Cancel::Requested => {
                if let Err(e) = queue.publish_cancel(job.id).await {
                    tracing::warn!(error = %e, "cancel notice not published; the worker sees it at its next heartbeat");
                }
            }
            Cancel::AlreadyRequested => {}
        }
    }
    Ok(jobs.len() + 1)
}

/// What a page records: each job's events (caused by the operation, by the key that asked for
/// it), and the counts.
struct Page {
    appends: Vec<store::Append>,
    follow: Vec<(Job, Cancel)>,
    done: u64,
    skipped: u64,
}

fn decide_page(
    op: &BulkOperation,
    pin: &Pin,
    jobs: &[Job],
    budgets: &HashMap<uuid::Uuid, u32>,
) -> Page {
    let metadata = EventMetadata {
        namespace: op.namespace.clone(),
        actor: pin.actor.clone(),
        causation_id: Some(op.id),
        ..Default::default()
    };
    let now = domain::now();
    let mut page = Page {
        appends: Vec::with_capacity(jobs.len() + 1),
        follow: Vec::new(),
        done: 0,
        skipped: 0,
    };
    for job in jobs {
        let JobAction::Act { events, cancel } =
            op.action.decide(job, budgets.get(&job.id).copied())
        else {
            page.skipped += 1;
            continue;
        };
        match job_append(
            Some(job),
            job.id,
            &events,
            JobWrite::new(metadata.clone(), now),
        ) {
            Ok((new, append)) => {
                page.appends.push(append);
                page.done += 1;
                if let Some(c) = cancel {
                    page.follow.push((new, c));
                }
            }
            Err(_) => page.skipped += 1,
        }
    }
    page
}

/// Record one event of the operation; `false` when another replica moved it first.
async fn record(store: &Store, op: &BulkOperation, ev: BulkEvent) -> Result<bool, StoreError> {
    let (_, append) = bulk_append(Some(op), op.id, &[ev], runner_metadata(op), domain::now())
        .ok_or_else(|| StoreError::Internal("the bulk event does not apply".into()))?;
    match store.appender.append(append).await {
        Ok(_) => Ok(true),
        Err(AppendError::Conflict { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
