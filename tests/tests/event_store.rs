//! The event store directly: optimistic concurrency in group commits, atomic batches, gap-safe
//! reads of the global log under concurrent writers, and projection rebuilds.

use std::{collections::HashSet, time::Duration};

use capibara_shared::{
    domain::event::{EventMetadata, StreamType},
    store::{self, events::LogCursor, Append, AppendError, Appender, Expected, NewEvent},
};
use capibara_tests::TestEnv;
use serde_json::json;
use uuid::Uuid;

async fn appender(env: &TestEnv) -> (sqlx::PgPool, Appender) {
    let pool = store::connect(&env.database_url, 16).await.unwrap();
    store::migrate(&pool).await.unwrap();
    let appender = Appender::start(pool.clone(), None, Default::default());
    (pool, appender)
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
                    let (rest, _) = store::events::read_all(&pool, cursor, 100_000)
                        .await
                        .unwrap();
                    seen.extend(rest.into_iter().map(|e| e.position()));
                    return seen;
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
    let seen = reader.await.unwrap();

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

    let out = std::process::Command::new(capibara_tests::bin("capibara"))
        .args(["admin", "rebuild-projections"])
        .env("CAPIBARA_DATABASE_URL", &env.database_url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("rebuilt 6 jobs"));

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
