//! The orchestrator: follows the global event log (gap-safe) and advances workflow runs when a
//! step's job starts or ends, or a child run ends. For each page it folds those facts into the
//! runs they belong to, plans what follows (ready steps, skips, the run's end) and commits the
//! run events, the new step jobs and its checkpoint in one transaction.
//!
//! Step jobs and child runs name their run in `metadata.correlation_id`, so the follower needs
//! no lookup to find them. A run changed concurrently by the API (a signal, a cancel) makes the
//! commit conflict; the page is then planned again from fresh state, so every step is
//! scheduled exactly once. One replica leads (session advisory lock); the others wait.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use capibara_shared::{
    command::runs::ORCHESTRATOR,
    domain::{
        self,
        event::EventEnvelope,
        job::JobEvent,
        run::{self, Plan, RunEvent},
        DomainEvent,
    },
    queue::Queue,
    store::{
        self,
        events::LogCursor,
        runs::{build, Built, RunChange},
        Append, AppendError, Effect, Store,
    },
};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::leader::Leadership;

/// Name of the orchestrator's checkpoint.
pub const CHECKPOINT: &str = "orchestrator";
const LEADER_LOCK: i64 = 0x6361_7069_7275_6e73; // "capiruns"
const PAGE: i64 = 1000;
/// Events of the log one read looks at (most are not a workflow's: they are skipped in SQL).
const SCAN: i64 = 10_000;
/// The events that advance runs: a step job's start and end, a child run's end.
const ADVANCING: [&str; 7] = [
    "JobStarted",
    "JobSucceeded",
    "JobFailed",
    "JobCanceled",
    "RunSucceeded",
    "RunFailed",
    "RunCanceled",
];
/// How often an idle follower saves how far it read.
const SAVE_EVERY: Duration = Duration::from_secs(2);

/// Run until `stop`: lead when possible, follow the log, advance runs.
pub async fn run(store: Store, queue: Queue, stop: CancellationToken) {
    let wake = Arc::new(Notify::new());
    tokio::spawn(listen_run_hints(queue.clone(), wake.clone(), stop.clone()));
    crate::leader::run("orchestrator", &stop, || lead(&store, &queue, &wake, &stop)).await;
}

/// After a commit with a step job's or a child run's events, how long every commit's hint
/// still wakes the orchestrator.
const FOLLOW_ALL_FOR: Duration = Duration::from_millis(100);

/// Wake the orchestrator on the hints of commits with an event that names a run, and not on the
/// others (the rest of the log is read past on the 500 ms poll): one log read per workflow
/// commit instead of one per commit. For `FOLLOW_ALL_FOR` after such a hint every commit's hint
/// wakes it again, as the gap-safe read may not show the hinted events yet (an older
/// transaction still open holds the horizon back), and a later commit is what moves it.
async fn listen_run_hints(queue: Queue, wake: Arc<Notify>, stop: CancellationToken) {
    let runs = queue.run_hints_channel();
    let channels = vec![runs.clone(), queue.hints_channel()];
    let mut run_hint_at: Option<Instant> = None;
    let wakes = move |channel: &str| {
        if channel == runs {
            run_hint_at = Some(Instant::now());
            return true;
        }
        run_hint_at.is_some_and(|t| t.elapsed() < FOLLOW_ALL_FOR)
    };
    crate::deliverer::listen_hints(queue, channels, wake, stop, wakes).await;
}

async fn lead(
    store: &Store,
    queue: &Queue,
    wake: &Notify,
    stop: &CancellationToken,
) -> Result<(), store::StoreError> {
    let mut leadership = Leadership::acquire(&store.pool, LEADER_LOCK, "orchestrator").await?;
    tracing::info!("orchestrator leading");
    let mut cursor = store::checkpoints::load(&store.pool, CHECKPOINT)
        .await?
        .unwrap_or_default();
    let mut saved = cursor;
    let mut last_save = Instant::now();
    let mut failures: u32 = 0;
    let filter = store::events::LogFilter {
        types: ADVANCING.map(String::from).to_vec(),
        correlated: true,
        ..Default::default()
    };
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        leadership.confirm().await?;
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Only the events of workflows, read past the rest in SQL.
        let page =
            store::events::read_all_filtered(store.generic_pool(), cursor, &filter, PAGE, SCAN)
                .await?;
        let next = page.next;
        let events: Vec<EventEnvelope> = page.events.into_iter().map(|(_, e)| e).collect();
        if events.is_empty() {
            cursor = next;
            if !page.at_end {
                continue;
            }
            if saved != cursor && last_save.elapsed() > SAVE_EVERY {
                store::checkpoints::save(&store.pool, CHECKPOINT, cursor).await?;
                saved = cursor;
                last_save = Instant::now();
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.cancelled() => return Ok(()),
            }
            continue;
        }
        match process(store, queue, &events, next).await {
            Ok(committed) => {
                failures = 0;
                cursor = next;
                if committed {
                    saved = next;
                    last_save = Instant::now();
                }
                // A page that reached the end read all there was: wait for the next hint (one
                // that came while the page was processed ends the wait at once).
                if page.at_end {
                    tokio::select! {
                        _ = &mut notified => {}
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.cancelled() => {}
                    }
                }
            }
            Err(e) => {
                // A conflict (the API changed a run meanwhile) or an outage: plan the page again,
                // backing off when it keeps failing.
                failures += 1;
                if failures > 5 {
                    tracing::warn!(error = %e, failures, "advancing runs keeps failing; retrying");
                } else {
                    tracing::debug!(error = %e, "advancing runs failed; planning the page again");
                }
                let wait = Duration::from_millis(5 * 2u64.pow(failures.min(8)))
                    .min(Duration::from_secs(1));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return Ok(()),
                }
            }
        }
    }
}

/// A fact from the log about one run.
enum Fact {
    Job(Uuid, Box<JobEvent>),
    ChildEnded(Uuid),
}

fn correlation(e: &EventEnvelope) -> Option<Uuid> {
    e.metadata
        .get("correlation_id")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
}

/// Advance the runs this page of events concerns. Returns whether anything was committed.
async fn process(
    store: &Store,
    queue: &Queue,
    events: &[EventEnvelope],
    next: LogCursor,
) -> Result<bool, store::StoreError> {
    let mut order: Vec<Uuid> = Vec::new();
    let mut facts: HashMap<Uuid, Vec<Fact>> = HashMap::new();
    let mut children: Vec<Uuid> = Vec::new();
    for e in events {
        // Only step jobs and child runs name a run; skip everything else before decoding it
        // (this loop sees every job event of the platform).
        let Some(run_id) = correlation(e) else {
            continue;
        };
        let fact = match (e.stream_type.as_str(), e.event_type.as_str()) {
            ("job", "JobStarted" | "JobSucceeded" | "JobFailed" | "JobCanceled") => {
                match JobEvent::from_parts(&e.event_type, e.data.clone()) {
                    Ok(ev) => Fact::Job(e.stream_id, Box::new(ev)),
                    Err(_) => continue,
                }
            }
            ("run", "RunSucceeded" | "RunFailed" | "RunCanceled") => {
                children.push(e.stream_id);
                Fact::ChildEnded(e.stream_id)
            }
            _ => continue,
        };
        if !facts.contains_key(&run_id) {
            order.push(run_id);
        }
        facts.entry(run_id).or_default().push(fact);
    }
    if order.is_empty() {
        return Ok(false);
    }
    let mut ids = order.clone();
    ids.extend(children);
    let loaded: HashMap<Uuid, domain::run::Run> = store::runs::get_many(&store.pool, &ids)
        .await?
        .into_iter()
        .map(|r| (r.id, r))
        .collect();
    let at = domain::now();
    let mut changes = Vec::new();
    // Each run's facts, before what was planned on them: a run the store refuses fails with
    // them recorded (its steps' ends are facts, whatever follows them).
    let mut recorded: HashMap<Uuid, Vec<RunEvent>> = HashMap::new();
    for run_id in order {
        let Some(mut run) = loaded.get(&run_id).cloned() else {
            continue;
        };
        if run.status.is_terminal() {
            continue;
        }
        let Some(def) = store::runs::definition(&store.pool, run.workflow_id, run.version).await?
        else {
            tracing::warn!(run = %run.id, "the run's workflow version is missing; it cannot advance");
            continue;
        };
        let prev = run.stream_version;
        let mut plan = Plan::default();
        for f in facts.remove(&run_id).unwrap_or_default() {
            let fact: Option<RunEvent> = match &f {
                Fact::Job(job_id, ev) => run::job_fact(&run, *job_id, ev),
                Fact::ChildEnded(child) => loaded.get(child).and_then(|c| run::child_fact(&run, c)),
            };
            if let Some(fact) = fact {
                plan.record(&mut run, fact, at);
            }
        }
        if plan.events.is_empty() {
            continue;
        }
        recorded.insert(run_id, plan.events.clone());
        run::advance(&def, &mut run, &mut plan, at);
        changes.push(RunChange {
            prev_version: Some(prev),
            run,
            def,
            plan,
        });
    }
    if changes.is_empty() {
        return Ok(false);
    }
    // Each run's share of the commit, kept apart so that a run the store refuses can be
    // committed without the others (and fail alone).
    let mut shares: Vec<(Uuid, Built)> = Vec::with_capacity(changes.len());
    for change in changes {
        let run_id = change.run.id;
        shares.push((
            run_id,
            build(&store.pool, vec![change], ORCHESTRATOR, at).await?,
        ));
    }
    let mut appends: Vec<Append> = shares
        .iter()
        .flat_map(|(_, b)| b.appends.iter().cloned())
        .collect();
    if let Some(first) = appends.first_mut() {
        first.effects.push(Effect::Checkpoint {
            name: CHECKPOINT.into(),
            cursor: next,
        });
    }
    match store.appender.append_all(appends).await {
        Ok(_) => {}
        Err(AppendError::Conflict { .. }) => return Err(store::StoreError::Conflict),
        Err(e @ AppendError::Invalid(_)) => {
            // One run's events the store refuses (a value Postgres cannot store): commit run by
            // run, failing the runs refused, then move on. An outage retries the page instead.
            tracing::warn!(error = %e, "a page of run changes was refused; committing run by run");
            return commit_each(store, queue, &loaded, &recorded, shares, next, at).await;
        }
        Err(e) => return Err(e.into()),
    }
    metrics::counter!("capibara_runs_advanced_total").increment(1);
    for (_, b) in shares {
        queue.tell_canceled(&b.cancel_running).await;
    }
    Ok(true)
}

/// Commit each run's share on its own. A share the store refuses while it accepts others is
/// that run's own data: the run fails with `store_rejected` (and the refusal as the message)
/// instead, so one run never holds up the others. It fails with the page's facts recorded (a
/// step whose job succeeded shows as succeeded), or, if the store refuses those too, from the
/// state before them. A conflict plans the page again; an outage retries it.
async fn commit_each(
    store: &Store,
    queue: &Queue,
    before: &HashMap<Uuid, domain::run::Run>,
    recorded: &HashMap<Uuid, Vec<RunEvent>>,
    shares: Vec<(Uuid, Built)>,
    next: LogCursor,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<bool, store::StoreError> {
    for (run_id, b) in shares {
        match store.appender.append_all(b.appends).await {
            Ok(_) => queue.tell_canceled(&b.cancel_running).await,
            Err(AppendError::Conflict { .. }) => return Err(store::StoreError::Conflict),
            Err(AppendError::Unavailable(e)) => return Err(store::StoreError::Unavailable(e)),
            Err(e) => {
                tracing::warn!(run = %run_id, error = %e, "the store refused a run's events; failing the run");
                metrics::counter!("capibara_runs_refused_total").increment(1);
                let error = serde_json::json!({
                    "type": "store_rejected",
                    "message": format!("the run's next events could not be stored: {}", e.to_string().replace('\0', "\\u0000")),
                });
                let Some(loaded) = before.get(&run_id) else {
                    continue;
                };
                // With the page's facts first; without them if those are refused too.
                let facts = recorded.get(&run_id).cloned().unwrap_or_default();
                for facts in [facts, Vec::new()] {
                    let mut run = loaded.clone();
                    let prev = run.stream_version;
                    let Some(def) =
                        store::runs::definition(&store.pool, run.workflow_id, run.version).await?
                    else {
                        break;
                    };
                    let mut plan = Plan::default();
                    for fact in facts {
                        plan.record(&mut run, fact, at);
                    }
                    let failure = run::fail_run(&mut run, error.clone(), at);
                    plan.events.extend(failure.events);
                    plan.actions = failure.actions;
                    let failed = build(
                        &store.pool,
                        vec![RunChange {
                            prev_version: Some(prev),
                            run,
                            def,
                            plan,
                        }],
                        ORCHESTRATOR,
                        at,
                    )
                    .await?;
                    match store.appender.append_all(failed.appends).await {
                        Ok(_) => {
                            queue.tell_canceled(&failed.cancel_running).await;
                            break;
                        }
                        Err(AppendError::Conflict { .. }) => {
                            return Err(store::StoreError::Conflict)
                        }
                        Err(e) => {
                            store.ping().await?;
                            tracing::error!(run = %run_id, error = %e, "the run's failure could not be stored");
                        }
                    }
                }
            }
        }
    }
    store::checkpoints::save(&store.pool, CHECKPOINT, next).await?;
    metrics::counter!("capibara_runs_advanced_total").increment(1);
    Ok(true)
}
