//! The housekeeping steps in-process, each on a real Postgres database (and Redis prefix) of its
//! own: the promoter queues what is due and nothing else, the reaper ends attempts whose lease
//! expired and only those, the relay pushes what Redis does not hold (once when a row passes
//! its grace period, and again at its full check). The loop around each step is
//! `driver::every`, tested on a paused clock; tests/tests/e2e/failures.rs keeps the kills.

use std::time::Duration;

use capibara_scheduler::housekeeping::{promote_due, reap, HousekeepingOptions, Relay};
use capibara_shared::{
    domain::{
        event::EventMetadata,
        job::{Job, JobEvent, JobStatus, Submission},
        now,
    },
    queue::Queue,
    store::{
        self,
        jobs::{job_append, JobWrite},
        Store,
    },
};
use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

/// A store without a commit listener (nothing reaches Redis unless a step pushes it), and the
/// queue of the test's Redis prefix.
async fn setup() -> (Store, Queue, capibara_tests::TestEnv) {
    let env = capibara_tests::TestEnv::new().await;
    let pool = store::connect(&env.database_url, 4).await.unwrap();
    store::migrate(&pool).await.unwrap();
    let appender = store::Appender::start(pool.clone(), None, Default::default());
    let queue = Queue::connect(&env.redis_url, &env.redis_prefix)
        .await
        .unwrap();
    (Store::new(pool, appender), queue, env)
}

fn meta() -> EventMetadata {
    EventMetadata {
        namespace: "default".into(),
        ..Default::default()
    }
}

/// An echo job submitted now, to run at `run_at` (None: now).
async fn submit(store: &Store, run_at: Option<DateTime<Utc>>) -> Job {
    let sub: Submission = serde_json::from_value(json!({
        "kind": "echo", "input": {}, "queue": "default", "priority": "normal",
        "max_attempts": 3, "run_at": run_at,
    }))
    .unwrap();
    let at = now();
    let (job, append) = job_append(
        None,
        Uuid::now_v7(),
        &sub.into_events(at),
        JobWrite::new(meta(), at),
    )
    .unwrap();
    store.appender.append(append).await.unwrap();
    job
}

/// Start attempt 1 of `job` on worker `w` with a lease of `lease`.
async fn start(store: &Store, job: &Job, lease: Duration) -> Job {
    let at = now();
    let mut w = JobWrite::new(meta(), at);
    w.lease = Some(("w".into(), lease));
    w.started_at = Some(at);
    let started = [JobEvent::JobStarted {
        attempt: 1,
        worker: "w".into(),
    }];
    let (job, append) = job_append(Some(job), job.id, &started, w).unwrap();
    store.appender.append(append).await.unwrap();
    job
}

async fn status(store: &Store, id: Uuid) -> Job {
    store::jobs::get(&store.pool, "default", id)
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn the_promoter_queues_what_is_due_and_nothing_else() {
    let (store, _queue, _env) = setup().await;
    let soon = submit(&store, Some(now() + chrono::Duration::milliseconds(300))).await;
    let later = submit(&store, Some(now() + chrono::Duration::hours(1))).await;
    assert_eq!(status(&store, soon.id).await.status, JobStatus::Scheduled);

    promote_due(&store).await.unwrap();
    assert_eq!(status(&store, soon.id).await.status, JobStatus::Scheduled);

    tokio::time::sleep(Duration::from_millis(400)).await;
    promote_due(&store).await.unwrap();
    assert_eq!(status(&store, soon.id).await.status, JobStatus::Queued);
    assert_eq!(status(&store, later.id).await.status, JobStatus::Scheduled);
}

#[tokio::test]
async fn the_reaper_ends_only_attempts_whose_lease_expired() {
    let (store, _queue, _env) = setup().await;
    let lost = submit(&store, None).await;
    let lost = start(&store, &lost, Duration::ZERO).await;
    let alive = submit(&store, None).await;
    start(&store, &alive, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(10)).await;

    reap(&store).await.unwrap();
    let after = status(&store, lost.id).await;
    assert_eq!(after.status, JobStatus::Scheduled, "retried with backoff");
    assert_eq!(after.attempt, 1, "a lost attempt counts");
    assert_eq!(
        after.error.as_ref().map(|e| e.error_type.as_str()),
        Some("worker_lost")
    );
    assert_eq!(status(&store, alive.id).await.status, JobStatus::Running);

    // Its lease is gone: a second pass changes nothing.
    reap(&store).await.unwrap();
    assert_eq!(status(&store, lost.id).await.version, after.version);
}

#[tokio::test]
async fn the_relay_pushes_what_redis_lacks_after_the_grace_and_again_at_its_full_check() {
    let (store, queue, _env) = setup().await;
    let job = submit(&store, None).await;
    let missing = || async { !capibara_tests::on_redis(&queue, "default", "echo", job.id).await };
    assert!(
        missing().await,
        "no commit listener: the fast path did not push it"
    );

    // Every row is checked again 2 s after the last full check.
    let mut opts = HousekeepingOptions::new(Duration::from_secs(2));
    opts.relay_grace = Duration::ZERO;
    let mut relay = Relay::new(opts);
    assert_eq!(relay.sweep(&store, &queue).await.unwrap(), 1);
    assert!(!missing().await);

    // A worker popped it and died before starting it: the incremental check has seen the row,
    // so only the next full check pushes it again.
    queue
        .remove(&capibara_tests::dispatch_entry("default", "echo", job.id))
        .await
        .unwrap();
    assert_eq!(relay.sweep(&store, &queue).await.unwrap(), 0);
    assert!(missing().await);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(relay.sweep(&store, &queue).await.unwrap(), 1);
    assert!(!missing().await);
}
