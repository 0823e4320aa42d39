//! The event store directly: optimistic concurrency in group commits, atomic batches, gap-safe
//! reads of the global log under concurrent writers, and projection rebuilds.

use std::{collections::HashSet, time::Duration};

use capibara_shared::{
    domain::{
        event::{EventMetadata, StreamType},
        job::{JobEvent, Submission},
    },
    store::{
        self,
        events::LogCursor,
        jobs::{job_append, JobWrite},
        Append, AppendError, Appender, Expected, NewEvent,
    },
};
use capibara_tests::TestEnv;
use serde_json::json;
use uuid::Uuid;

async fn appender(env: &TestEnv) -> (sqlx::PgPool, Appender) {
    appender_with(env, 16, Default::default()).await
}

/// An appender with `opts` on a migrated pool of `connections`.
async fn appender_with(
    env: &TestEnv,
    connections: u32,
    opts: store::AppenderOptions,
) -> (sqlx::PgPool, Appender) {
    let pool = store::connect(&env.database_url, connections)
        .await
        .unwrap();
    store::migrate(&pool).await.unwrap();
    let appender = Appender::start(pool.clone(), None, opts);
    (pool, appender)
}

/// One flusher: every append goes through the same connection, one batch at a time.
fn one_flusher() -> store::AppenderOptions {
    store::AppenderOptions {
        flushers: 1,
        ..Default::default()
    }
}

fn append(stream: Uuid, expected: Expected, n: usize) -> Append {
    Append {
        stream_id: stream,
        stream_type: StreamType::Schedule,
        namespace: "default".into(),
        expected,
        events: (0..n)
            .map(|i| NewEvent {
                event_type: "TestEvent".into(),
                data: json!({"i": i}),
                recorded_at: None,
            })
            .collect(),
        metadata: EventMetadata {
            namespace: "default".into(),
            ..Default::default()
        },
        recorded_at: capibara_shared::domain::now(),
        command: None,
        effects: vec![],
    }
}

#[tokio::test]
async fn concurrent_appends_at_the_same_version_let_exactly_one_win() {
    let env = TestEnv::new().await;
    let (pool, appender) = appender(&env).await;
    let stream = Uuid::now_v7();
    appender
        .append(append(stream, Expected::NoStream, 1))
        .await
        .unwrap();

    let results = futures::future::join_all(
        (0..20).map(|_| appender.append(append(stream, Expected::Version(1), 2))),
    )
    .await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{results:?}");
    assert!(results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .all(|e| matches!(e, AppendError::Conflict { actual: Some(_) })));
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM events WHERE stream_id = $1")
        .bind(stream)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 3);

    let again = appender.append(append(stream, Expected::NoStream, 1)).await;
    assert!(
        matches!(again, Err(AppendError::Conflict { .. })),
        "{again:?}"
    );
}

/// A job's append that loses (its stream exists already, or another writer took its version)
/// writes nothing: not its events, and none of its projection rows (jobs, dispatch, leases),
/// although the job core is written as one statement.
#[tokio::test]
async fn an_append_that_loses_changes_no_projection_row() {
    let env = TestEnv::new().await;
    let (pool, appender) = appender(&env).await;
    let sub: Submission = serde_json::from_value(
        json!({"kind": "echo", "input": {}, "queue": "q", "priority": "normal", "max_attempts": 3}),
    )
    .unwrap();
    let at = capibara_shared::domain::now();
    let write = |lease: Option<&str>| {
        let mut w = JobWrite::new(
            EventMetadata {
                namespace: "default".into(),
                ..Default::default()
            },
            at,
        );
        w.lease = lease.map(|worker| (worker.to_string(), Duration::from_secs(30)));
        w
    };
    let id = Uuid::now_v7();
    let (queued, submit) = job_append(None, id, &sub.into_events(at), write(None)).unwrap();
    appender.append(submit.clone()).await.unwrap();
    let again = appender.append(submit).await;
    assert!(
        matches!(again, Err(AppendError::Conflict { actual: Some(1) })),
        "{again:?}"
    );

    let start = |worker: &str| {
        let events = [JobEvent::JobStarted {
            attempt: 1,
            worker: worker.into(),
        }];
        job_append(Some(&queued), id, &events, write(Some(worker)))
            .unwrap()
            .1
    };
    appender.append(start("first")).await.unwrap();
    let stale = appender.append(start("second")).await;
    assert!(
        matches!(stale, Err(AppendError::Conflict { actual: Some(2) })),
        "{stale:?}"
    );
    let (status, worker): (String, Option<String>) =
        sqlx::query_as("SELECT status, worker_id FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), worker.as_deref()),
        ("running", Some("first"))
    );
    let (lease,): (String,) = sqlx::query_as("SELECT worker_id FROM leases WHERE job_id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(lease, "first");
    let (dispatched,): (i64,) = sqlx::query_as("SELECT count(*) FROM dispatch WHERE job_id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(dispatched, 0);
    assert_eq!(events_of(&pool, id).await, 2);
}

#[tokio::test]
async fn an_atomic_batch_writes_all_or_nothing() {
    let env = TestEnv::new().await;
    let (pool, appender) = appender(&env).await;
    let existing = Uuid::now_v7();
    appender
        .append(append(existing, Expected::NoStream, 1))
        .await
        .unwrap();

    let batch = vec![
        append(Uuid::now_v7(), Expected::NoStream, 1),
        append(existing, Expected::Version(7), 1),
    ];
    assert!(appender.append_all(batch).await.is_err());
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1, "nothing of the failed batch was written");

    let ok = appender
        .append_all(vec![
            append(Uuid::now_v7(), Expected::NoStream, 2),
            append(existing, Expected::Version(1), 1),
        ])
        .await
        .unwrap();
    assert_eq!(ok.iter().map(|a| a.version).collect::<Vec<_>>(), [2, 2]);
}

#[tokio::test]
async fn the_global_log_reader_never_skips_a_late_commit() {
    let env = TestEnv::new().await;
    let (pool, appender) = appender(&env).await;
    let stop = tokio_util_stop();

    // Slow writers: take a position, then hold the transaction open while others commit.
    let mut writers = Vec::new();
    for w in 0..4 {
        let pool = pool.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut written = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut tx = pool.begin().await.unwrap();
                sqlx::query(
                    "INSERT INTO events (stream_id, stream_type, version, type, data, metadata, recorded_at)
                     VALUES ($1, 'schedule', 1, 'Slow', '{}', '{}', now())",
                )
                .bind(Uuid::now_v7())
                .execute(&mut *tx)
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(15 + w * 7)).await;
                tx.commit().await.unwrap();
                written += 1;
            }
            written
        }));
    }
    // Fast writers through the group commit.
    for _ in 0..4 {
        let appender = appender.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut written = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                appender
                    .append(append(Uuid::now_v7(), Expected::NoStream, 3))
                    .await
                    .unwrap();
                written += 3;
            }
            written
        }));
    }
    // Follow the log while they write.
    let reader = {
        let pool = pool.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut cursor = LogCursor::default();
            let mut seen = Vec::new();
            loop {
                let done = stop.load(std::sync::atomic::Ordering::Relaxed);
                let (events, next) = store::events::read_all(&pool, cursor, 200).await.unwrap();
                cursor = next;
                let empty = events.is_empty();
                seen.extend(events.into_iter().map(|e| e.position()));
                if done && empty {
                    // One more pass after the writers finished.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let (rest, next) = store::events::read_all(&pool, cursor, 100_000)
                        .await
                        .unwrap();
                    seen.extend(rest.into_iter().map(|e| e.position()));
                    return (seen, next);
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in writers {
        total += w.await.unwrap();
    }
    let (mut seen, mut cursor) = reader.await.unwrap();
    // Transactions of other tests on the shared server (the horizon is the cluster's) may hold
    // the last events back for a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < total && std::time::Instant::now() < deadline {
        let (rest, next) = store::events::read_all(&pool, cursor, 100_000)
            .await
            .unwrap();
        if rest.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cursor = next;
        seen.extend(rest.into_iter().map(|e| e.position()));
    }

    let unique: HashSet<i64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "no event delivered twice");
    let (all,): (i64,) = sqlx::query_as("SELECT count(*) FROM events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(all as usize, total);
    assert_eq!(seen.len(), total, "every committed event was read");
    // A naive `position > last` reader would have had to skip some: commits were out of order.
    let out_of_order = seen.windows(2).filter(|w| w[1] < w[0]).count();
    assert!(out_of_order > 0, "the test produced late commits");
}

fn tokio_util_stop() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
}

#[tokio::test]
async fn rebuilding_projections_gives_identical_rows() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let mut ids = Vec::new();
    ids.push(
        api.submit_id(json!({"kind": "echo", "input": {"a": [1, 2]}, "tags": {"t": "1"}}))
            .await,
    );
    ids.push(
        api.submit_id(
            json!({"kind": "fail", "input": {"times": 1}, "backoff": {"initial_ms": 50}}),
        )
        .await,
    );
    ids.push(
        api.submit_id(json!({"kind": "fail", "max_attempts": 1}))
            .await,
    );
    ids.push(
        api.submit_id(json!({"kind": "sleep", "input": {"ms": 2100}, "priority": "high"}))
            .await,
    );
    let canceled = api
        .submit_id(json!({"kind": "sleep", "input": {"ms": 60000}}))
        .await;
    let delayed = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    api.submit_id(json!({"kind": "echo", "run_at": delayed}))
        .await;
    for id in &ids {
        api.wait_terminal(id, Duration::from_secs(20)).await;
    }
    api.post(&format!("/v1/jobs/{}/retry", ids[2]), json!({}))
        .await;
    api.wait_terminal(&ids[2], Duration::from_secs(20)).await;
    api.post(&format!("/v1/jobs/{canceled}/cancel"), json!({}))
        .await;
    api.wait_terminal(&canceled, Duration::from_secs(20)).await;

    let pool = env.pool().await;
    let snapshot = || async {
        let rows: Vec<(serde_json::Value,)> =
            sqlx::query_as("SELECT to_jsonb(j) FROM jobs j ORDER BY id")
                .fetch_all(&pool)
                .await
                .unwrap();
        rows
    };
    let before = snapshot().await;
    assert_eq!(before.len(), 6);

    let printed = env.rebuild_projections();
    assert!(printed.contains("rebuilt 6 jobs"), "{printed}");

    let after = snapshot().await;
    assert_eq!(before, after);
}

/// Transaction ids are compared as numbers, not text: a page that crosses a power of ten
/// (9999 → 10000) must stay in order (a text sort once put "10000" before "9999").
#[tokio::test]
async fn the_global_log_reader_orders_transaction_ids_numerically_across_a_power_of_ten() {
    let env = TestEnv::new().await;
    let (pool, appender) = appender(&env).await;
    let (current,): (i64,) = sqlx::query_as("SELECT txid_current()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let next_power = 10i64.pow((current as f64).log10().floor() as u32 + 1);
    let gap = next_power - current;
    if gap > 20 && gap < 3_000_000 {
        // Use up transaction ids (one subtransaction each) until just before the boundary.
        sqlx::query("CREATE TABLE burn (x int)")
            .execute(&pool)
            .await
            .unwrap();
        let burn = format!(
            "DO $$ BEGIN FOR i IN 1..{} LOOP
                 BEGIN INSERT INTO burn VALUES (i); EXCEPTION WHEN OTHERS THEN NULL; END;
             END LOOP; END $$",
            gap - 15
        );
        sqlx::raw_sql(&burn).execute(&pool).await.unwrap();
    }
    for _ in 0..40 {
        appender
            .append(append(Uuid::now_v7(), Expected::NoStream, 1))
            .await
            .unwrap();
    }
    let rows: Vec<(String,)> = sqlx::query_as("SELECT tx_id::text FROM events")
        .fetch_all(&pool)
        .await
        .unwrap();
    let lens: HashSet<usize> = rows.iter().map(|(t,)| t.len()).collect();
    let mut cursor = LogCursor::default();
    let mut seen = Vec::new();
    // Transactions of other tests on the shared server may hold the horizon back for a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < rows.len() && std::time::Instant::now() < deadline {
        let (events, next) = store::events::read_all(&pool, cursor, 7).await.unwrap();
        if events.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        seen.extend(events.iter().map(|e| e.position()));
        cursor = next;
    }
    // Nothing more may come after the last one (no duplicates past the end).
    let (extra, _) = store::events::read_all(&pool, cursor, 100).await.unwrap();
    assert!(extra.is_empty(), "read past the end: {extra:?}");
    assert_eq!(
        seen.len(),
        rows.len(),
        "every event read once (tx id digit counts: {lens:?})"
    );
    let unique: HashSet<i64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len());
}

/// Sends `appends` while the only flusher waits on a lock (another transaction holds the
/// version its append inserts), so that they all land in the batch it takes next (instead of
/// trickling into batches of their own).
async fn in_one_batch(
    pool: &sqlx::PgPool,
    appender: &Appender,
    appends: Vec<Append>,
) -> Vec<Result<store::Appended, AppendError>> {
    let blocker = Uuid::now_v7();
    appender
        .append(append(blocker, Expected::NoStream, 1))
        .await
        .unwrap();
    let mut lock = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO events (stream_id, stream_type, version, type, data, metadata, recorded_at)
         VALUES ($1, 'job', 2, 'Blocker', '{}', '{}', now())",
    )
    .bind(blocker)
    .execute(&mut *lock)
    .await
    .unwrap();
    let held = {
        let appender = appender.clone();
        tokio::spawn(async move {
            appender
                .append(append(blocker, Expected::Version(1), 1))
                .await
        })
    };
    capibara_tests::eventually(
        "the flusher waits on the lock",
        Duration::from_secs(10),
        || async {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            (n > 0).then_some(())
        },
    )
    .await;
    let results = {
        let appender = appender.clone();
        tokio::spawn(async move { appender.append_many(appends).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.rollback().await.unwrap();
    held.await.unwrap().unwrap();
    results.await.unwrap()
}

async fn events_of(pool: &sqlx::PgPool, stream: Uuid) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM events WHERE stream_id = $1")
        .bind(stream)
        .fetch_one(pool)
        .await
        .unwrap();
    n
}

#[tokio::test]
async fn a_poison_append_fails_alone_and_the_rest_of_its_batch_commits() {
    let env = TestEnv::new().await;
    // One flusher: every append below goes through the same batch.
    let (pool, appender) = appender_with(&env, 16, one_flusher()).await;
    let schedule = Uuid::now_v7();
    let tick = capibara_shared::domain::now();
    let with = |effects: Vec<store::Effect>| {
        let mut a = append(Uuid::now_v7(), Expected::NoStream, 1);
        a.effects = effects;
        a
    };
    let mut appends: Vec<Append> = (0..40).map(|_| with(vec![])).collect();
    // Caught before the batch: a NUL in an event (what an edge check would have refused).
    let mut nul_event = append(Uuid::now_v7(), Expected::NoStream, 1);
    nul_event.events[0].data = json!({"a": [0, {"b": "x\u{0}y"}]});
    // Refused by Postgres inside the batch, for values only a side effect carries: a NUL in
    // text (22021), a time before 4713 BC (22008).
    let nul_text = with(vec![store::Effect::Checkpoint {
        name: "follower\u{0}".into(),
        cursor: LogCursor::default(),
    }]);
    let ancient: chrono::DateTime<chrono::Utc> = "-200000-01-01T00:00:00Z".parse().unwrap();
    let far_time = with(vec![store::Effect::InsertTicks {
        schedule_id: Uuid::now_v7(),
        ticks: vec![(ancient, None)],
    }]);
    // Two appends of one batch writing the same unique row: the second is a conflict.
    let tick_a = with(vec![store::Effect::InsertTicks {
        schedule_id: schedule,
        ticks: vec![(tick, None)],
    }]);
    let tick_b = with(vec![store::Effect::InsertTicks {
        schedule_id: schedule,
        ticks: vec![(tick, None)],
    }]);
    for (at, a) in [
        (3, nul_event),
        (11, nul_text),
        (25, far_time),
        (30, tick_a),
        (31, tick_b),
    ] {
        appends.insert(at, a);
    }
    let streams: Vec<Uuid> = appends.iter().map(|a| a.stream_id).collect();

    let results = in_one_batch(&pool, &appender, appends).await;

    let failed: Vec<usize> = (0..results.len())
        .filter(|&i| results[i].is_err())
        .collect();
    assert_eq!(failed, [3, 11, 25, 31], "{results:?}");
    let AppendError::Invalid(why) = results[3].as_ref().unwrap_err() else {
        panic!("{:?}", results[3]);
    };
    assert!(why.starts_with("events[0].data.a[1].b:"), "{why}");
    assert!(!why.contains('\0'));
    assert!(
        matches!(results[11], Err(AppendError::Invalid(_))),
        "{:?}",
        results[11]
    );
    assert!(
        matches!(results[25], Err(AppendError::Invalid(_))),
        "{:?}",
        results[25]
    );
    assert!(
        matches!(results[31], Err(AppendError::Conflict { .. })),
        "{:?}",
        results[31]
    );
    for (i, stream) in streams.iter().enumerate() {
        let expected = if failed.contains(&i) { 0 } else { 1 };
        assert_eq!(events_of(&pool, *stream).await, expected, "append {i}");
    }
    let (ticks,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM schedule_ticks WHERE schedule_id = $1")
            .bind(schedule)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(ticks, 1);

    // An atomic batch with a poison append is refused as a whole, as invalid (not unavailable).
    let mut bad = append(Uuid::now_v7(), Expected::NoStream, 1);
    bad.events[0].data = json!({"k\u{0}": 1});
    let ok = append(Uuid::now_v7(), Expected::NoStream, 1);
    let ok_id = ok.stream_id;
    let r = appender.append_all(vec![ok, bad]).await;
    assert!(matches!(r, Err(AppendError::Invalid(_))), "{r:?}");
    assert_eq!(events_of(&pool, ok_id).await, 0);
    let r = appender
        .append_all(vec![with(vec![store::Effect::Checkpoint {
            name: "x\u{0}".into(),
            cursor: LogCursor::default(),
        }])])
        .await;
    assert!(matches!(r, Err(AppendError::Invalid(_))), "{r:?}");
}

/// The storable time range agrees with Postgres: its ends round-trip through the JSON text the
/// projections are written with, one microsecond beyond either does not.
#[tokio::test]
async fn the_storable_time_range_is_what_postgres_parses_from_json() {
    use capibara_shared::domain::storable;
    let env = TestEnv::new().await;
    let pool = env.pool().await;
    let parse = |t: chrono::DateTime<chrono::Utc>| {
        let pool = pool.clone();
        async move {
            let row = json!([{ "t": t }]);
            sqlx::query_as::<_, (chrono::DateTime<chrono::Utc>,)>(
                "SELECT t FROM jsonb_to_recordset($1) AS r(t timestamptz)",
            )
            .bind(row)
            .fetch_one(&pool)
            .await
            .map(|(t,)| t)
        }
    };
    let tick = chrono::Duration::microseconds(1);
    for t in [storable::min_time(), storable::max_time()] {
        assert!(storable::time_ok(t));
        assert_eq!(parse(t).await.unwrap(), t);
    }
    for t in [storable::min_time() - tick, storable::max_time() + tick] {
        assert!(!storable::time_ok(t));
        assert!(parse(t).await.is_err(), "{t:?} parsed");
    }
}

/// Two writers append to the same two streams in opposite orders, many times at once: each
/// batch writes its rows in stream order, so they wait for each other instead of deadlocking
/// (a deadlock would fail a whole batch as `Unavailable`).
#[tokio::test]
async fn batches_touching_the_same_streams_in_opposite_orders_never_deadlock() {
    let env = TestEnv::new().await;
    let (pool, first) = appender(&env).await;
    let second = Appender::start(pool.clone(), None, Default::default());
    for _ in 0..30 {
        let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
        let created = first
            .append_many(vec![
                append(x, Expected::NoStream, 1),
                append(y, Expected::NoStream, 1),
            ])
            .await;
        assert!(created.iter().all(Result::is_ok), "{created:?}");
        let (a, b) = tokio::join!(
            first.append_many(vec![
                append(x, Expected::Version(1), 3),
                append(y, Expected::Version(1), 3),
            ]),
            second.append_many(vec![
                append(y, Expected::Version(1), 3),
                append(x, Expected::Version(1), 3),
            ]),
        );
        for r in a.iter().chain(&b) {
            assert!(
                matches!(r, Ok(_) | Err(AppendError::Conflict { .. })),
                "{r:?}"
            );
        }
        let wins = a.iter().chain(&b).filter(|r| r.is_ok()).count();
        assert_eq!(wins, 2, "each stream has exactly one winner: {a:?} {b:?}");
    }
}

/// A commit with an event that names a run (a workflow step's job, a child run) is also hinted
/// on the runs' channel, which alone wakes the orchestrator; other commits are not.
#[tokio::test]
async fn only_commits_with_an_event_that_names_a_run_are_hinted_to_the_orchestrator() {
    use futures::StreamExt;
    let env = TestEnv::new().await;
    let pool = store::connect(&env.database_url, 4).await.unwrap();
    store::migrate(&pool).await.unwrap();
    let queue = capibara_shared::queue::Queue::connect(&env.redis_url, &env.redis_prefix)
        .await
        .unwrap();
    let appender = Appender::start(
        pool.clone(),
        Some(std::sync::Arc::new(queue.clone())),
        Default::default(),
    );
    let client = redis::Client::open(env.redis_url.as_str()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(&[queue.run_hints_channel(), queue.hints_channel()][..])
        .await
        .unwrap();
    let mut messages = pubsub.on_message();

    let plain = Uuid::now_v7();
    appender
        .append(append(plain, Expected::NoStream, 1))
        .await
        .unwrap();
    let step = Uuid::now_v7();
    let mut correlated = append(step, Expected::NoStream, 1);
    correlated.metadata.correlation_id = Some(Uuid::now_v7());
    appender.append(correlated).await.unwrap();

    let mut seen: Vec<(String, String)> = Vec::new();
    while seen.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .expect("three hints within 5 s")
            .unwrap();
        seen.push((m.get_channel_name().to_string(), m.get_payload().unwrap()));
    }
    // Nothing else arrives: the plain commit was not hinted to the orchestrator.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), messages.next())
            .await
            .is_err(),
        "a fourth hint: {seen:?}"
    );
    let on = |channel: &str| -> Vec<String> {
        seen.iter()
            .filter(|(c, _)| c == channel)
            .map(|(_, p)| p.clone())
            .collect()
    };
    assert_eq!(
        on(&queue.hints_channel()),
        vec![plain.to_string(), step.to_string()]
    );
    assert_eq!(on(&queue.run_hints_channel()), vec![step.to_string()]);
}

/// Appends until one succeeds, counting the failures (at most `tries`).
async fn append_until_ok(appender: &Appender, stream: Uuid, version: i64, tries: usize) -> usize {
    for failed in 0..tries {
        match appender
            .append(append(stream, Expected::Version(version), 1))
            .await
        {
            Ok(_) => return failed,
            Err(AppendError::Unavailable(_)) => {}
            Err(e) => panic!("append at version {version}: {e}"),
        }
    }
    panic!("no append succeeded in {tries} tries");
}

#[tokio::test]
async fn a_flusher_keeps_its_connection_and_replaces_one_that_broke() {
    let env = TestEnv::new().await;
    let (_pool, appender) = appender_with(&env, 16, one_flusher()).await;
    let stream = Uuid::now_v7();
    appender
        .append(append(stream, Expected::NoStream, 1))
        .await
        .unwrap();
    for v in 1..5 {
        appender
            .append(append(stream, Expected::Version(v), 1))
            .await
            .unwrap();
    }
    // Time for a connection handed back to settle in the pool (sqlx tests it first).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let own = appender.pool();
    assert_eq!(
        own.size() as usize - own.num_idle(),
        1,
        "the flusher holds its connection between batches (size {}, idle {})",
        own.size(),
        own.num_idle()
    );

    // Its backend ends (a Postgres restart, an administrator): at most one write fails, then
    // the flusher writes on a fresh connection instead of failing every batch on the dead one.
    let admin = capibara_tests::sqlx_connect(&env.database_url).await;
    let ended: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(!ended.is_empty());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let failed = append_until_ok(&appender, stream, 5, 3).await;
    assert!(
        failed <= 1,
        "{failed} writes failed after the backend ended"
    );
    for v in 6..10 {
        appender
            .append(append(stream, Expected::Version(v), 1))
            .await
            .unwrap();
    }
    assert_eq!(events_of(&admin, stream).await, 10);
}

#[tokio::test]
async fn flushers_hand_their_connections_back_when_holding_would_leave_none() {
    let env = TestEnv::new().await;
    let opts = store::AppenderOptions {
        flushers: 2,
        timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let (_pool, appender) = appender_with(&env, 2, opts).await;
    let streams: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    let writes = streams
        .iter()
        .map(|s| appender.append(append(*s, Expected::NoStream, 1)));
    for r in futures::future::join_all(writes).await {
        r.unwrap();
    }
    // Both connections of the pool went to the flushers; the log readers' queries still get one.
    let n: (i64,) = sqlx::query_as("SELECT count(*) FROM events")
        .fetch_one(appender.pool())
        .await
        .expect("a connection for a reader");
    assert_eq!(n.0, 20);
}

/// A generic plan is made once per connection, with the statistics of that moment, and kept
/// until `ANALYZE`. Made on a fresh database, where every table is empty, it must still find
/// rows by key: a plan that scans the table would keep scanning it as the table grows (the
/// worker's load of popped jobs, the append's probes).
#[tokio::test]
async fn generic_plans_made_on_an_empty_database_find_rows_by_key() {
    let env = TestEnv::new().await;
    let (_pool, appender) = appender(&env).await;
    let mut tx = appender.pool().begin().await.unwrap();
    let found = store::jobs::get_many(&mut *tx, &[Uuid::now_v7()])
        .await
        .unwrap();
    assert!(found.is_empty());
    let scans: (i64, i64) = sqlx::query_as(
        "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_xact_user_tables WHERE relname = 'jobs'",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(
        scans,
        (0, 1),
        "(sequential scans, index scans) of jobs for one load by id"
    );
}

/// Where the orchestrator's checkpoint stands.
async fn checkpoint_position(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT position FROM log_checkpoints WHERE name = 'orchestrator'")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A run's plan with a log checkpoint (what the orchestrator commits, and a run's creation by
/// the API) is one statement: the `runs` row and the checkpoint ride in the core's statement
/// instead of a transaction of five round trips. A trigger notes the top-level statement that
/// wrote each `runs` row. A plan that loses (its run moved on) writes no row at all.
#[tokio::test]
async fn a_runs_plan_and_its_checkpoint_are_written_by_the_core_statement() {
    use capibara_shared::{domain::workflow::WorkflowDef, store::runs};
    let env = TestEnv::new().await;
    let (pool, appender) = appender_with(&env, 4, one_flusher()).await;
    for ddl in [
        "CREATE TABLE seen_statements (q text)",
        "CREATE FUNCTION note_statement() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN INSERT INTO seen_statements VALUES (current_query()); RETURN NULL; END $$",
        "CREATE TRIGGER note AFTER INSERT OR UPDATE ON runs FOR EACH STATEMENT
         EXECUTE FUNCTION note_statement()",
    ] {
        sqlx::query(ddl).execute(&pool).await.unwrap();
    }
    let def: std::sync::Arc<WorkflowDef> = std::sync::Arc::new(
        serde_json::from_value(json!({"name": "one", "steps": [{"id": "a", "kind": "echo"}]}))
            .unwrap(),
    );
    let at = capibara_shared::domain::now();
    let new_run = |id: Uuid| runs::NewRun {
        id,
        namespace: "default".into(),
        workflow_id: Uuid::now_v7(),
        workflow_name: "one".into(),
        version: 1,
        input: json!({}),
        parent: None,
        callback_url: None,
    };
    let plan_of = |id: Uuid| {
        let (run, plan) = runs::start(&def, new_run(id), at);
        runs::RunChange {
            prev_version: None,
            run,
            def: def.clone(),
            plan,
        }
    };
    let checkpoint = |position: i64| store::Effect::Checkpoint {
        name: "orchestrator".into(),
        cursor: LogCursor { tx_id: 7, position },
    };

    let id = Uuid::now_v7();
    let mut built = runs::build(&pool, vec![plan_of(id)], "test", at)
        .await
        .unwrap();
    assert_eq!(built.appends.len(), 2, "the run and its first step's job");
    built.appends[0].effects.push(checkpoint(41));
    appender.append_all(built.appends).await.unwrap();

    let seen: Vec<(String,)> = sqlx::query_as("SELECT DISTINCT q FROM seen_statements")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    for part in [
        "INSERT INTO runs",
        "INSERT INTO events",
        "INSERT INTO log_checkpoints",
    ] {
        assert!(seen[0].0.contains(part), "not one statement: {}", seen[0].0);
    }
    let (status, version): (String, i64) =
        sqlx::query_as("SELECT status, stream_version FROM runs WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (status.as_str(), version),
        ("running", events_of(&pool, id).await)
    );
    let (tx_id, position): (String, i64) = sqlx::query_as(
        "SELECT tx_id::text, position FROM log_checkpoints WHERE name = 'orchestrator'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((tx_id.as_str(), position), ("7", 41));
    let (jobs,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(jobs, 1);

    // The same run started again: its stream exists, so the plan loses as a whole. Neither
    // its `runs` row nor the checkpoint moves, and no second step job is written.
    let mut again = runs::build(&pool, vec![plan_of(id)], "test", at)
        .await
        .unwrap();
    again.appends[0].effects.push(checkpoint(99));
    let results = appender.append_all(again.appends).await;
    assert!(results.is_err(), "{results:?}");
    let position = checkpoint_position(&pool).await;
    assert_eq!(position, 41);
    let (jobs,): (i64,) = sqlx::query_as("SELECT count(*) FROM jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(jobs, 1);
    let (version,): (i64,) = sqlx::query_as("SELECT stream_version FROM runs WHERE id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(version, events_of(&pool, id).await);

    // Two checkpoints of one name in a batch: the last one wins, as in a transaction (an upsert
    // may not touch a row twice in one statement).
    let mut two = runs::build(&pool, vec![plan_of(Uuid::now_v7())], "test", at)
        .await
        .unwrap();
    two.appends[0].effects.push(checkpoint(50));
    two.appends[1].effects.push(checkpoint(51));
    appender.append_all(two.appends).await.unwrap();
    let position = checkpoint_position(&pool).await;
    assert_eq!(position, 51);
}
