//! The bulk runner's step in-process on a real Postgres database: the pin (jobs submitted after
//! `BulkStarted` are never considered), and two replicas stepping the same operation at once
//! acting on each job exactly once. tests/tests/e2e/bulk.rs keeps the HTTP side and the kill.

use capibara_scheduler::bulk::step;
use capibara_shared::{
    domain::{
        bulk::{BulkAction, BulkEvent, BulkStatus},
        event::EventMetadata,
        job::Submission,
        now,
    },
    queue::Queue,
    store::{self, bulk::bulk_append, jobs::submit_append, Store},
};
use serde_json::json;
use uuid::Uuid;

async fn setup() -> (Store, Queue, capibara_tests::TestEnv) {
    let env = capibara_tests::TestEnv::new().await;
    let pool = store::connect(&env.database_url, 8).await.unwrap();
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
        actor: Some("key:test".into()),
        ..Default::default()
    }
}

/// `n` queued echo jobs tagged `batch: <tag>`, in one transaction.
async fn submit(store: &Store, n: usize, tag: &str) {
    let sub: Submission = serde_json::from_value(json!({
        "kind": "echo", "input": {}, "queue": "default", "priority": "normal",
        "max_attempts": 3, "tags": {"batch": tag},
    }))
    .unwrap();
    let appends = (0..n)
        .map(|_| submit_append(Uuid::now_v7(), sub.clone(), meta(), now()).unwrap())
        .collect();
    store.appender.append_all(appends).await.unwrap();
}

async fn start_cancel(store: &Store, tag: &str) -> Uuid {
    let id = Uuid::now_v7();
    let started = BulkEvent::BulkStarted {
        action: BulkAction::Cancel,
        filter: json!({"tag": [format!("batch:{tag}")]}),
        all: false,
    };
    let (_, append) = bulk_append(None, id, &[started], meta(), now()).unwrap();
    store.appender.append(append).await.unwrap();
    id
}

/// Step until operation `op` ended. A step may find nothing to do for a while: the runner waits
/// until no transaction that could still commit before `BulkStarted` in the log is running
/// (in any database of the server, so other tests' transactions count).
async fn drain(store: &Store, queue: &Queue, page: i64, op: Uuid) {
    for _ in 0..10_000 {
        if step(store, queue, page).await.unwrap() == 0 {
            let (o, _) = store::bulk::get(&store.pool, None, op)
                .await
                .unwrap()
                .unwrap();
            if o.status != BulkStatus::Running {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    panic!("the operation never ended");
}

#[tokio::test]
async fn a_bulk_operation_considers_only_jobs_submitted_before_it_in_the_log() {
    let (store, queue, _env) = setup().await;
    submit(&store, 23, "a").await;
    submit(&store, 5, "b").await;
    let op = start_cancel(&store, "a").await;
    submit(&store, 7, "a").await;

    drain(&store, &queue, 4, op).await;

    let (o, position) = store::bulk::get(&store.pool, Some("default"), op)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(o.status, BulkStatus::Finished);
    assert_eq!((o.matched, o.done, o.skipped), (Some(23), 23, 0));
    assert!(position > 0);
    let by_status: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT tags->>'batch', status, count(*) FROM jobs GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&store.pool)
    .await
    .unwrap();
    assert_eq!(
        by_status,
        [
            ("a".into(), "canceled".into(), 23),
            ("a".into(), "queued".into(), 7),
            ("b".into(), "queued".into(), 5),
        ]
    );
}

#[tokio::test]
async fn two_replicas_stepping_one_bulk_operation_act_on_each_job_once() {
    let (store, queue, _env) = setup().await;
    submit(&store, 200, "a").await;
    let op = start_cancel(&store, "a").await;

    tokio::join!(drain(&store, &queue, 7, op), drain(&store, &queue, 7, op));

    let (o, _) = store::bulk::get(&store.pool, None, op)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(o.status, BulkStatus::Finished);
    assert_eq!((o.matched, o.done, o.skipped), (Some(200), 200, 0));
    let (events, jobs): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT stream_id) FROM events
          WHERE type = 'JobCanceled' AND (metadata->>'causation_id')::uuid = $1
            AND metadata->>'actor' = 'key:test'",
    )
    .bind(op)
    .fetch_one(&store.pool)
    .await
    .unwrap();
    assert_eq!((events, jobs), (200, 200));
    let finished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE stream_id = $1 AND type = 'BulkFinished'",
    )
    .bind(op)
    .fetch_one(&store.pool)
    .await
    .unwrap();
    assert_eq!(finished, 1);
}
