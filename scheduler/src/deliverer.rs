//! The deliverer: follows the global event log (gap-safe) and turns job events and run ends into
//! webhook deliveries — one per `callback_url` event and per matching subscription — each with a
//! `callback.deliver` job on the `callbacks` queue. The checkpoint moves in the same transaction
//! as the deliveries it produced, so each event is turned into deliveries exactly once.
//!
//! One replica leads (session advisory lock); the others wait. Deliveries of one job to one
//! target go out in event order: a delivery created while an earlier one of the same job and
//! target is unfinished waits, and [`release_waiting`] queues it once the earlier one finished.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use capibara_shared::{
    domain::{
        self,
        delivery::{self, public_job_event, DeliveryEvent, DEFAULT_CALLBACK_EVENTS},
        event::{EventEnvelope, EventMetadata},
        job::{Job, JobEvent},
        kinds,
        subscription::Subscription,
        DomainEvent,
    },
    queue::Queue,
    store::{
        self, deliveries::delivery_append, events::LogCursor, held::HeldConnection, Append,
        AppendError, Effect, Store,
    },
};
use futures::StreamExt;
use serde_json::{json, Value};
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::leader::Leadership;

/// The least time between two reads of the log while it trickles (a delivery waits at most
/// this much longer; the scheduler reads a few events per query instead of one).
const COALESCE: Duration = Duration::from_millis(10);

/// How often the checkpoint moves while pages create no delivery.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// Name of the deliverer's checkpoint.
pub const CHECKPOINT: &str = "deliverer";
const LEADER_LOCK: i64 = 0x6361_7069_6465_6c76; // "capidelv"
const PAGE: i64 = 500;

/// Settings of the deliverer.
#[derive(Debug, Clone)]
pub struct DelivererOptions {
    /// Attempts of a `callback.deliver` job (retry schedule length + 1).
    pub max_attempts: u32,
    /// Fallback poll when no hint arrives.
    pub poll: Duration,
}

impl DelivererOptions {
    pub fn new(config: &capibara_shared::config::Config) -> Self {
        Self {
            max_attempts: config.delivery_retry_schedule.len() as u32 + 1,
            poll: Duration::from_millis(200),
        }
    }
}

/// Run until `stop`: lead when possible, follow the log, create deliveries.
pub async fn run(store: Store, queue: Queue, opts: DelivererOptions, stop: CancellationToken) {
    let wake = std::sync::Arc::new(Notify::new());
    let channels = vec![queue.hints_channel()];
    tokio::spawn(listen_hints(
        queue.clone(),
        channels,
        wake.clone(),
        stop.clone(),
        |_| true,
    ));
    crate::leader::run("deliverer", &stop, || lead(&store, &opts, &wake, &stop)).await;
}

/// Wake a log follower on the hints of `channels` that `wakes` accepts (it gets the channel's
/// name), resubscribing after a lost connection (and waking then: hints may have been missed).
pub(crate) async fn listen_hints(
    queue: Queue,
    channels: Vec<String>,
    wake: std::sync::Arc<Notify>,
    stop: CancellationToken,
    mut wakes: impl FnMut(&str) -> bool + Send,
) {
    loop {
        if let Ok(mut pubsub) = queue.redis().pubsub().await {
            if pubsub.subscribe(&channels[..]).await.is_ok() {
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        m = messages.next() => match m {
                            Some(m) => if wakes(m.get_channel_name()) {
                                wake.notify_one();
                            },
                            None => break,
                        },
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
        wake.notify_one();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

async fn lead(
    store: &Store,
    opts: &DelivererOptions,
    wake: &Notify,
    stop: &CancellationToken,
) -> Result<(), store::StoreError> {
    let mut leadership = Leadership::acquire(&store.pool, LEADER_LOCK, "deliverer").await?;
    tracing::info!("deliverer leading");
    // A first run starts at the beginning of the log: only jobs with a callback_url and
    // subscriptions created before an event produce deliveries, so old history sends nothing.
    let mut cursor = store::checkpoints::load(&store.pool, CHECKPOINT)
        .await?
        .unwrap_or_default();
    let mut subs = SubscriptionCache::default();
    // The reads of each page (the log, subscriptions, callbacks) keep one connection.
    let mut db = store.held_connection();
    let mut last_release = Instant::now();
    // A page that creates nothing moves the cursor in memory only; the checkpoint follows
    // every SAVE_EVERY (a restart reads those pages again and again creates nothing: a
    // delivery's (source_position, target) is unique besides).
    let mut saved = cursor;
    let mut last_save = Instant::now();
    loop {
        if stop.is_cancelled() {
            if saved != cursor {
                store::checkpoints::save(&store.pool, CHECKPOINT, cursor).await?;
            }
            return Ok(());
        }
        leadership.confirm().await?;
        if last_release.elapsed() > Duration::from_millis(200) {
            release_waiting(store, opts).await?;
            last_release = Instant::now();
        }
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let read_at = Instant::now();
        // Which events happened, not their data: a delivery's payload is the job's state.
        let read = store::events::read_all_headers(db.get().await?, cursor, PAGE).await;
        let (events, next) = read.inspect_err(|_| db.broke())?;
        if saved != cursor && last_save.elapsed() > SAVE_EVERY {
            store::checkpoints::save(&store.pool, CHECKPOINT, cursor).await?;
            saved = cursor;
            last_save = Instant::now();
        }
        if events.is_empty() {
            db.done();
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(opts.poll) => {}
                _ = stop.cancelled() => continue,
            }
            continue;
        }
        let read = subs.refresh_for(db.get().await?, &events).await;
        read.inspect_err(|_| db.broke())?;
        let processed = process(store, &mut db, opts, &subs, &events, next).await;
        db.done();
        match processed {
            Ok(n) => {
                if n > 0 {
                    metrics::counter!("capibara_deliveries_created_total").increment(n as u64);
                    // The page's deliveries moved the checkpoint in their transaction.
                    saved = next;
                    last_save = Instant::now();
                }
                cursor = next;
                // A page short of PAGE read all there was: wait for the next hint (one that
                // came while this page was processed ends the wait at once) instead of
                // reading again for nothing, and let COALESCE pass since this read so that a
                // steady stream of commits is read a few at a time, not one per commit.
                if (events.len() as i64) < PAGE {
                    tokio::select! {
                        _ = async {
                            (&mut notified).await;
                            tokio::time::sleep(COALESCE.saturating_sub(read_at.elapsed())).await;
                        } => {}
                        _ = tokio::time::sleep(opts.poll) => {}
                        _ = stop.cancelled() => {}
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "creating deliveries failed; reloading the checkpoint");
                cursor = store::checkpoints::load(&store.pool, CHECKPOINT)
                    .await?
                    .unwrap_or(cursor);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Active subscriptions, reloaded whenever a page holds events newer than the last load (so a
/// subscription gets every event recorded after its creation, and none before).
#[derive(Default)]
struct SubscriptionCache {
    by_namespace: HashMap<String, Vec<Subscription>>,
    /// Database-independent wall clock of the last load (events carry `recorded_at`).
    loaded_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl SubscriptionCache {
    async fn refresh_for(
        &mut self,
        db: &mut PgConnection,
        events: &[EventEnvelope],
    ) -> Result<(), store::StoreError> {
        let newest = events.iter().map(|e| e.recorded_at).max();
        if self.loaded_at.is_some_and(|l| newest.is_none_or(|n| n < l)) {
            return Ok(());
        }
        let at = domain::now();
        self.by_namespace.clear();
        for s in store::subscriptions::active(db).await? {
            self.by_namespace
                .entry(s.namespace.clone())
                .or_default()
                .push(s);
        }
        self.loaded_at = Some(at);
        Ok(())
    }
}

/// A delivery to create.
struct Planned {
    namespace: String,
    subscription_id: Option<Uuid>,
    target: String,
    url: String,
    job_id: Uuid,
    event_type: String,
    source_position: i64,
    payload: Value,
}

/// Deliveries of a run's end: a run started with a `callback_url` gets `run.succeeded`,
/// `run.failed` or `run.canceled` with the run as `data`, and so does every subscription of the
/// run's namespace that asked for the event (under the alias it named, e.g. `workflow.completed`).
async fn run_deliveries(
    store: &Store,
    subs: &SubscriptionCache,
    events: &[EventEnvelope],
) -> Result<Vec<Planned>, store::StoreError> {
    let ends: Vec<&EventEnvelope> = events
        .iter()
        .filter(|e| {
            e.stream_type == "run"
                && matches!(
                    e.event_type.as_str(),
                    "RunSucceeded" | "RunFailed" | "RunCanceled"
                )
        })
        .collect();
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = ends.iter().map(|e| e.stream_id).collect();
    let runs: HashMap<Uuid, domain::run::Run> = store::runs::get_many(&store.pool, &ids)
        .await?
        .into_iter()
        .filter(|r| r.callback_url.is_some() || subs.by_namespace.contains_key(&r.namespace))
        .map(|r| (r.id, r))
        .collect();
    let mut planned = Vec::new();
    for e in ends {
        let Some(run) = runs.get(&e.stream_id) else {
            continue;
        };
        let name = match e.event_type.as_str() {
            "RunSucceeded" => "run.succeeded",
            "RunFailed" => "run.failed",
            _ => "run.canceled",
        };
        let payload = json!({"type": name, "timestamp": e.recorded_at, "data": run});
        if let Some(url) = &run.callback_url {
            planned.push(Planned {
                namespace: run.namespace.clone(),
                subscription_id: None,
                target: "callback".into(),
                url: url.clone(),
                job_id: run.id,
                event_type: name.into(),
                source_position: e.position(),
                payload: payload.clone(),
            });
        }
        for s in subs.by_namespace.get(&run.namespace).into_iter().flatten() {
            if s.created_at > e.recorded_at {
                continue;
            }
            if let Some(as_name) = s.wants_run_event(name) {
                planned.push(Planned {
                    namespace: run.namespace.clone(),
                    subscription_id: Some(s.id),
                    target: s.id.to_string(),
                    url: s.url.clone(),
                    job_id: run.id,
                    payload: renamed(&payload, name, &as_name),
                    event_type: as_name,
                    source_position: e.position(),
                });
            }
        }
    }
    Ok(planned)
}

/// The payload under the event name a subscriber asked for (an alias renames `type`).
fn renamed(payload: &Value, name: &str, as_name: &str) -> Value {
    let mut p = payload.clone();
    if name != as_name {
        p["type"] = Value::String(as_name.to_string());
    }
    p
}

/// Turn one page of events into deliveries; returns how many were created.
async fn process(
    store: &Store,
    db: &mut HeldConnection,
    opts: &DelivererOptions,
    subs: &SubscriptionCache,
    events: &[EventEnvelope],
    next: LogCursor,
) -> Result<usize, store::StoreError> {
    // Job events of public and user kinds (deliveries are jobs too: never deliver those).
    let job_events: Vec<&EventEnvelope> = events
        .iter()
        .filter(|e| e.stream_type == "job")
        .filter(|e| {
            e.metadata
                .get("kind")
                .and_then(Value::as_str)
                // User kinds are not in the catalog: theirs are delivered too.
                .is_some_and(|k| !kinds::find(k).is_some_and(|s| s.internal))
        })
        .collect();
    let namespace_of = |e: &EventEnvelope| {
        e.metadata
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string()
    };
    // Which jobs might need deliveries: those with a callback, or in a namespace with subscriptions.
    let ids: Vec<Uuid> = job_events
        .iter()
        .map(|e| e.stream_id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    type CallbackRow = (Uuid, Option<String>, Option<sqlx::types::Json<Vec<String>>>);
    let rows: Vec<CallbackRow> = if ids.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as("SELECT id, callback_url, callback_events FROM jobs WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(db.get().await?)
            .await
            .inspect_err(|_| db.broke())?
    };
    // A job missing from the projection was deleted (`JobDeleted`) before its events were
    // delivered: its callback comes from its history below, so deleting never drops one.
    let mut deleted: HashSet<Uuid> = ids.iter().copied().collect();
    let mut callbacks: HashMap<Uuid, (String, Option<Vec<String>>)> = HashMap::new();
    for (id, url, wanted) in rows {
        deleted.remove(&id);
        if let Some(url) = url {
            callbacks.insert(id, (url, wanted.map(|j| j.0)));
        }
    }
    let interesting: Vec<&EventEnvelope> = job_events
        .into_iter()
        .filter(|e| {
            callbacks.contains_key(&e.stream_id)
                || deleted.contains(&e.stream_id)
                || subs.by_namespace.contains_key(&namespace_of(e))
        })
        .collect();
    let mut planned: Vec<Planned> = Vec::new();
    if !interesting.is_empty() {
        let states = job_states(&store.pool, &interesting).await?;
        for e in &interesting {
            let Some(name) = public_job_event(&e.event_type) else {
                continue;
            };
            let Some(job) = states.get(&(e.stream_id, e.version)) else {
                continue;
            };
            let ns = namespace_of(e);
            let payload = json!({"type": name, "timestamp": e.recorded_at, "data": job});
            let callback = match deleted.contains(&e.stream_id) {
                true => job
                    .callback_url
                    .clone()
                    .map(|url| (url, job.callback_events.clone())),
                false => callbacks.get(&e.stream_id).cloned(),
            };
            if let Some((url, wanted)) = &callback {
                let wanted = wanted
                    .as_ref()
                    .map(|w| w.contains(&name))
                    .unwrap_or_else(|| DEFAULT_CALLBACK_EVENTS.contains(&name.as_str()));
                if wanted {
                    planned.push(Planned {
                        namespace: ns.clone(),
                        subscription_id: None,
                        target: "callback".into(),
                        url: url.clone(),
                        job_id: e.stream_id,
                        event_type: name.clone(),
                        source_position: e.position(),
                        payload: payload.clone(),
                    });
                }
            }
            for s in subs.by_namespace.get(&ns).into_iter().flatten() {
                if s.created_at > e.recorded_at {
                    continue;
                }
                if let Some(as_name) = s.wants_job_event(&name, job) {
                    planned.push(Planned {
                        namespace: ns.clone(),
                        subscription_id: Some(s.id),
                        target: s.id.to_string(),
                        url: s.url.clone(),
                        job_id: e.stream_id,
                        payload: renamed(&payload, &name, &as_name),
                        event_type: as_name,
                        source_position: e.position(),
                    });
                }
            }
        }
    }
    planned.extend(run_deliveries(store, subs, events).await?);
    let checkpoint = Effect::Checkpoint {
        name: CHECKPOINT.into(),
        cursor: next,
    };
    if planned.is_empty() {
        return Ok(0);
    }
    // Order per (target, job): a delivery waits while an earlier one is unfinished.
    let job_ids: Vec<Uuid> = planned
        .iter()
        .map(|p| p.job_id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let mut open: HashSet<(String, Uuid)> = store::deliveries::open_keys(&store.pool, &job_ids)
        .await?
        .into_iter()
        .collect();
    let now = domain::now();
    // Each delivery's appends (the delivery, its job), kept apart so that one the store refuses
    // can be recorded as failed without holding up the others.
    let mut groups: Vec<(Vec<Append>, Refusal)> = Vec::new();
    let n = planned.len();
    for p in planned {
        let waiting = !open.insert((p.target.clone(), p.job_id));
        let id = Uuid::now_v7();
        let refusal = Refusal {
            id,
            namespace: p.namespace.clone(),
            created: DeliveryEvent::DeliveryCreated {
                subscription_id: p.subscription_id,
                job_id: Some(p.job_id),
                event_type: p.event_type.clone(),
                source_position: p.source_position,
                target: p.target.clone(),
                url: p.url.clone(),
                payload: json!({"type": p.event_type}),
            },
        };
        let mut events = vec![DeliveryEvent::DeliveryCreated {
            subscription_id: p.subscription_id,
            job_id: Some(p.job_id),
            event_type: p.event_type,
            source_position: p.source_position,
            target: p.target,
            url: p.url,
            payload: p.payload,
        }];
        let job_id = Uuid::now_v7();
        if !waiting {
            events.push(DeliveryEvent::DeliveryQueued {
                delivery_job_id: job_id,
                reason: "created".into(),
            });
        }
        let Some((_, a)) =
            delivery_append(None, id, &p.namespace, &events, meta(&p.namespace), now)
        else {
            continue;
        };
        let mut group = vec![a];
        if !waiting {
            group.push(delivery_job(id, job_id, &p.namespace, opts, now)?);
        }
        groups.push((group, refusal));
    }
    let mut appends: Vec<Append> = groups.iter().flat_map(|(g, _)| g.iter().cloned()).collect();
    if let Some(first) = appends.first_mut() {
        first.effects.push(checkpoint);
    }
    match store.appender.append_all(appends).await {
        Ok(_) => Ok(n),
        Err(e @ AppendError::Invalid(_)) => {
            // One delivery the store refuses (a value Postgres cannot store): commit them one
            // by one, recording the refused ones as failed. An outage retries the page instead.
            tracing::warn!(error = %e, "a page of deliveries was refused; committing one by one");
            for (group, refusal) in groups {
                match store.appender.append_all(group).await {
                    Ok(_) => {}
                    Err(e @ AppendError::Invalid(_)) => refusal.record(store, &e, now).await,
                    Err(e) => return Err(e.into()),
                }
            }
            store::checkpoints::save(&store.pool, CHECKPOINT, next).await?;
            Ok(n)
        }
        Err(e) => Err(e.into()),
    }
}

/// A delivery the store refused, to record as failed (without its payload) instead.
struct Refusal {
    id: Uuid,
    namespace: String,
    created: DeliveryEvent,
}

impl Refusal {
    async fn record(self, store: &Store, e: &AppendError, now: chrono::DateTime<chrono::Utc>) {
        metrics::counter!("capibara_deliveries_refused_total").increment(1);
        let reason: String = format!("store_rejected: {e}")
            .replace('\0', "\\u0000")
            .chars()
            .take(500)
            .collect();
        tracing::warn!(delivery = %self.id, namespace = %self.namespace, reason, "the store refused a delivery; recording it as failed");
        let events = [
            self.created,
            DeliveryEvent::DeliveryFailed { attempt: 0, reason },
        ];
        let Some((_, a)) = delivery_append(
            None,
            self.id,
            &self.namespace,
            &events,
            meta(&self.namespace),
            now,
        ) else {
            return;
        };
        if let Err(e) = store.appender.append_all(vec![a]).await {
            tracing::error!(delivery = %self.id, error = %e, "the failed delivery could not be recorded either; dropping it");
        }
    }
}

fn meta(namespace: &str) -> EventMetadata {
    EventMetadata {
        namespace: namespace.to_string(),
        actor: Some("deliverer".into()),
        ..Default::default()
    }
}

/// The `callback.deliver` job that sends delivery `delivery_id`.
pub fn delivery_job(
    delivery_id: Uuid,
    job_id: Uuid,
    namespace: &str,
    opts: &DelivererOptions,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Append, store::StoreError> {
    let sub = delivery::delivery_job(delivery_id, opts.max_attempts);
    store::jobs::submit_append(job_id, sub, meta(namespace), now)
}

/// The job as it was right after each of the given events (folding its stream up to there).
async fn job_states(
    pool: &PgPool,
    events: &[&EventEnvelope],
) -> Result<HashMap<(Uuid, i64), Job>, store::StoreError> {
    let ids: Vec<Uuid> = events
        .iter()
        .map(|e| e.stream_id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let max_version: HashMap<Uuid, i64> = events.iter().fold(HashMap::new(), |mut m, e| {
        let v = m.entry(e.stream_id).or_insert(0);
        *v = (*v).max(e.version);
        m
    });
    let wanted: HashSet<(Uuid, i64)> = events.iter().map(|e| (e.stream_id, e.version)).collect();
    let rows: Vec<(
        Uuid,
        i64,
        String,
        Value,
        Value,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as(
        "SELECT stream_id, version, type, data, metadata, recorded_at FROM events
         WHERE stream_id = ANY($1) ORDER BY stream_id, version",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    let mut out = HashMap::new();
    let mut current: Option<Job> = None;
    for (stream_id, version, t, data, metadata, at) in rows {
        if version > max_version.get(&stream_id).copied().unwrap_or(0) {
            continue;
        }
        let Ok(ev) = JobEvent::from_parts(&t, data) else {
            continue;
        };
        let ns = metadata
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        current = match current.take() {
            Some(mut j) if j.id == stream_id => {
                if j.apply(&ev, at).is_err() {
                    continue;
                }
                Some(j)
            }
            _ => Job::replay(stream_id, &ns, [(&ev, at)]).ok().flatten(),
        };
        if wanted.contains(&(stream_id, version)) {
            if let Some(j) = &current {
                out.insert((stream_id, version), j.clone());
            }
        }
    }
    Ok(out)
}

/// Queue waiting deliveries whose earlier deliveries (same job, same target) have finished.
pub async fn release_waiting(
    store: &Store,
    opts: &DelivererOptions,
) -> Result<usize, store::StoreError> {
    let ready = store::deliveries::releasable(&store.pool, 100).await?;
    let now = domain::now();
    let mut released = 0;
    for d in ready {
        let job_id = Uuid::now_v7();
        let events = [DeliveryEvent::DeliveryQueued {
            delivery_job_id: job_id,
            reason: "released".into(),
        }];
        let Some((_, a)) = delivery_append(
            Some(&d),
            d.id,
            &d.namespace,
            &events,
            meta(&d.namespace),
            now,
        ) else {
            continue;
        };
        let j = delivery_job(d.id, job_id, &d.namespace, opts, now)?;
        if store.appender.append_all(vec![a, j]).await.is_ok() {
            released += 1;
        }
    }
    Ok(released)
}
