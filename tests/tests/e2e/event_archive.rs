//! The bounded event log (docs/event-log-retention.md): old partitions of finished streams are
//! archived to the artifact store and dropped; archived histories still read through the API and
//! rebuild the projections; a run that dies midway is finished by the next; one archiver at a
//! time among replicas.

use std::time::Duration;

use capibara_shared::{
    artifacts::ArtifactStore,
    store::archive::{self, Halt, ARCHIVE_LOCK},
};
use capibara_tests::*;
use serde_json::{json, Value};

/// Settings that make a partition old within seconds: 2-second partitions, no archive by the
/// scheduler itself (the test drives it), partitions created every half second.
fn short_partitions(env: &mut TestEnv, retention: &str) {
    env.extra_env
        .push(("CAPIBARA_EVENTS_PARTITION".into(), "2s".into()));
    env.extra_env
        .push(("CAPIBARA_EVENTS_RETENTION".into(), retention.into()));
    env.extra_env
        .push(("CAPIBARA_EVENTS_ARCHIVE_EVERY".into(), "500ms".into()));
}

async fn job_rows(pool: &sqlx::PgPool) -> Vec<(Value,)> {
    sqlx::query_as("SELECT to_jsonb(j) FROM jobs j ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn live_job_events(pool: &sqlx::PgPool) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM events WHERE stream_type = 'job'")
        .fetch_one(pool)
        .await
        .unwrap();
    n
}

/// With the default settings a finished job's row is pruned (`CAPIBARA_RETENTION`, 30 d) before
/// its partition is archived (`CAPIBARA_EVENTS_RETENTION`, 30 d after the partition's 7 days):
/// its history stays readable by its namespace, from the log and then from the archive.
#[tokio::test]
async fn a_pruned_jobs_history_reads_from_the_log_then_from_its_archive() {
    let mut env = TestEnv::new().await;
    short_partitions(&mut env, "0");
    env.extra_env
        .push(("CAPIBARA_RETENTION".into(), "1s".into()));
    let _procs = env.spawn_all().await;
    let api = env.client();
    let pool = env.pool().await;
    let store = ArtifactStore::open(env.artifacts_dir().to_str().unwrap()).unwrap();
    let other = api.key_for("elsewhere", &["admin"]).await;

    let id = api
        .submit_id(json!({"kind": "echo", "input": {"n": 7}}))
        .await;
    // A job deleted (not pruned) stays not found, its history in the log or archived.
    let deleted = api.submit_id(json!({"kind": "echo"})).await;
    api.wait_terminal(&deleted, Duration::from_secs(20)).await;
    let r = api
        .send(api.http.delete(api.url(&format!("/v1/jobs/{deleted}"))))
        .await;
    assert_eq!(r.status, 204, "{r:?}");
    let before = eventually("the job's terminal event", Duration::from_secs(20), || {
        let api = api.clone();
        let id = id.clone();
        async move {
            let events = api.events(&id).await;
            types(&events)
                .contains(&"JobSucceeded".to_string())
                .then_some(events)
        }
    })
    .await;

    eventually("the job's row pruned", Duration::from_secs(30), || {
        let api = api.clone();
        let id = id.clone();
        async move { (api.get(&format!("/v1/jobs/{id}")).await.status == 404).then_some(()) }
    })
    .await;
    // From the log.
    assert_eq!(api.events(&id).await, before, "history of a pruned job");
    let foreign = other.get(&format!("/v1/jobs/{id}/events")).await;
    assert_eq!(foreign.status, 404, "{foreign:?}");
    let unknown = api
        .get(&format!("/v1/jobs/{}/events", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(unknown.status, 404, "{unknown:?}");
    let gone = api.get(&format!("/v1/jobs/{deleted}/events")).await;
    assert_eq!(gone.status, 404, "a deleted job's history: {gone:?}");

    // From the archive, once its partition is gone.
    eventually("the job's events archived", Duration::from_secs(30), || {
        let (pool, store) = (pool.clone(), store.clone());
        async move {
            archive::archive_old(&pool, &store, Duration::ZERO, Halt::Never)
                .await
                .unwrap();
            (live_job_events(&pool).await == 0).then_some(())
        }
    })
    .await;
    assert_eq!(
        api.events(&id).await,
        before,
        "archived history of a pruned job"
    );
    let foreign = other.get(&format!("/v1/jobs/{id}/events")).await;
    assert_eq!(foreign.status, 404, "{foreign:?}");
    let gone = api.get(&format!("/v1/jobs/{deleted}/events")).await;
    assert_eq!(
        gone.status, 404,
        "a deleted job's archived history: {gone:?}"
    );
    let text = tokio::time::timeout(
        Duration::from_secs(20),
        api.http
            .get(api.url(&format!("/v1/jobs/{id}/events")))
            .bearer_auth(&api.key)
            .header("Accept", "text/event-stream")
            .send()
            .await
            .unwrap()
            .text(),
    )
    .await
    .expect("the stream of a pruned, archived job closes")
    .unwrap();
    assert_eq!(parse_sse(&text).len(), before.len());
}

#[tokio::test]
async fn archived_histories_read_from_the_artifact_store_and_rebuild_the_projections() {
    let mut env = TestEnv::new().await;
    short_partitions(&mut env, "0");
    let _procs = env.spawn_all().await;
    let api = env.client();
    let pool = env.pool().await;
    let store = ArtifactStore::open(env.artifacts_dir().to_str().unwrap()).unwrap();

    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(
            api.submit_id(json!({"kind": "echo", "input": {"n": i}, "tags": {"t": "x"}}))
                .await,
        );
    }
    ids.push(
        api.submit_id(json!({"kind": "fail", "max_attempts": 1}))
            .await,
    );
    for id in &ids {
        api.wait_terminal(id, Duration::from_secs(20)).await;
    }
    let mut before = Vec::new();
    for id in &ids {
        before.push(api.events(id).await);
    }
    let rows_before = job_rows(&pool).await;
    assert_eq!(rows_before.len(), ids.len());
    let total = live_job_events(&pool).await;
    assert!(total >= 5 * 3, "{total} job events");

    // A run that dies between writing the objects and dropping the partition.
    let halted = eventually(
        "a partition old enough to archive",
        Duration::from_secs(20),
        || {
            let (pool, store) = (pool.clone(), store.clone());
            async move {
                let r = archive::archive_old(&pool, &store, Duration::ZERO, Halt::AfterObjects)
                    .await
                    .unwrap();
                (r.objects > 0).then_some(r)
            }
        },
    )
    .await;
    // Only partitions without events (the empty legacy one) may have been dropped.
    assert_eq!(halted.events, 0, "{halted:?}");
    let (archiving,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM event_partitions WHERE status = 'archiving'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(archiving, 1, "the interrupted partition is marked");

    // The next runs finish it and every other old partition, until no job event is live.
    eventually("every job event archived", Duration::from_secs(30), || {
        let (pool, store) = (pool.clone(), store.clone());
        async move {
            archive::archive_old(&pool, &store, Duration::ZERO, Halt::Never)
                .await
                .unwrap();
            (live_job_events(&pool).await == 0).then_some(())
        }
    })
    .await;

    // Partitions dropped, one object per (partition, namespace), counts add up, no duplicate.
    let archived: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT p.name, a.object_key, a.events FROM event_partitions p
           JOIN event_archives a ON a.partition = p.name
          WHERE p.status = 'archived' ORDER BY p.lo",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(!archived.is_empty());
    let mut positions = std::collections::HashSet::new();
    let mut job_events = 0i64;
    for (partition, key, events) in &archived {
        let (exists,): (bool,) = sqlx::query_as("SELECT to_regclass($1) IS NOT NULL")
            .bind(partition)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(!exists, "{partition} dropped");
        assert!(env.artifacts_dir().join(key).is_file(), "{key} stored");
        let lines = archive::read_object(&store, key).await.unwrap();
        assert_eq!(lines.len() as i64, *events, "{key}");
        for e in lines {
            assert!(
                positions.insert(e.position),
                "position {} twice",
                e.position
            );
            job_events += (e.stream_type == "job") as i64;
        }
    }
    assert_eq!(job_events, total, "every job event archived once");

    // The API reads the archived histories: the same events, in the same shape.
    for (id, events) in ids.iter().zip(&before) {
        assert_eq!(&api.events(id).await, events, "history of {id}");
        let page = api.get(&format!("/v1/jobs/{id}/events?limit=2")).await;
        assert_eq!(page.status, 200);
        assert_eq!(page.body["items"].as_array().unwrap().len(), 2);
        let cursor = page.body["next_cursor"].as_str().unwrap().to_string();
        let rest = api
            .get(&format!("/v1/jobs/{id}/events?after={cursor}"))
            .await;
        assert_eq!(
            rest.body["items"].as_array().unwrap()[..],
            events[2..],
            "paging an archived history"
        );
    }

    // SSE on an archived job sends its archived events, then ends.
    let text = tokio::time::timeout(
        Duration::from_secs(20),
        api.http
            .get(api.url(&format!("/v1/jobs/{}/events", ids[0])))
            .bearer_auth(&api.key)
            .header("Accept", "text/event-stream")
            .send()
            .await
            .unwrap()
            .text(),
    )
    .await
    .expect("the stream of an archived job closes")
    .unwrap();
    let frames = parse_sse(&text);
    let sse_ids: Vec<&str> = frames.iter().map(|(i, _, _)| i.as_str()).collect();
    let page_ids: Vec<&str> = before[0]
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(sse_ids, page_ids);

    // An archived stream is read-only: retrying the archived failed job is a conflict.
    let retry = api
        .post(&format!("/v1/jobs/{}/retry", ids[4]), json!({}))
        .await;
    assert_eq!(retry.status, 409, "{retry:?}");
    assert_eq!(api.events(&ids[4]).await, before[4]);

    // rebuild-projections replays the archives: identical rows.
    let printed = env.rebuild_projections();
    assert!(
        printed.contains(&format!("rebuilt {} jobs", ids.len())),
        "{printed}"
    );
    assert_eq!(job_rows(&pool).await, rows_before);

    // New jobs still append (into a current partition) after old ones were dropped.
    let next = api.submit_id(json!({"kind": "echo"})).await;
    api.wait_terminal(&next, Duration::from_secs(20)).await;
    assert!(live_job_events(&pool).await >= 3);
}

#[tokio::test]
async fn one_archiver_at_a_time_and_unfinished_streams_keep_their_partition() {
    let mut env = TestEnv::new().await;
    short_partitions(&mut env, "0");
    let api_proc = env.spawn_api().await;
    let scheduler = env.spawn_scheduler();
    let api = env.client();
    let pool = env.pool().await;
    let store = ArtifactStore::open(env.artifacts_dir().to_str().unwrap()).unwrap();
    // No worker: the job stays queued, so its partition is not finished.
    let id = api.submit_id(json!({"kind": "echo"})).await;
    let events = api.events(&id).await;

    // Another replica holds the archive lock: this run does nothing.
    let mut other = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(ARCHIVE_LOCK)
        .execute(&mut *other)
        .await
        .unwrap();
    let r = archive::archive_old(&pool, &store, Duration::ZERO, Halt::Never)
        .await
        .unwrap();
    assert!(r.busy);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(ARCHIVE_LOCK)
        .execute(&mut *other)
        .await
        .unwrap();

    // Once the partition is old, it is kept: its job is not finished.
    let r = eventually(
        "the job's partition is old",
        Duration::from_secs(20),
        || {
            let (pool, store) = (pool.clone(), store.clone());
            async move {
                let r = archive::archive_old(&pool, &store, Duration::ZERO, Halt::Never)
                    .await
                    .unwrap();
                (r.blocked > 0).then_some(r)
            }
        },
    )
    .await;
    assert!(!r.busy);
    assert_eq!(api.events(&id).await, events);
    assert_eq!(live_job_events(&pool).await, events.len() as i64);

    // Two scheduler replicas archiving at once (1 s retention): each partition once.
    let mut procs = vec![scheduler, env.spawn_scheduler()];
    drop(api_proc);
    let mut env2 = env;
    env2.extra_env
        .retain(|(k, _)| k != "CAPIBARA_EVENTS_RETENTION");
    env2.extra_env
        .push(("CAPIBARA_EVENTS_RETENTION".into(), "1s".into()));
    for p in &mut procs {
        p.kill();
    }
    let _a = env2.spawn_scheduler();
    let _b = env2.spawn_scheduler();
    let _api = env2.spawn_api().await;
    let _worker = env2.spawn_worker(&[]);
    api.wait_terminal(&id, Duration::from_secs(20)).await;
    eventually(
        "the schedulers archive the job",
        Duration::from_secs(30),
        || {
            let pool = pool.clone();
            async move { (live_job_events(&pool).await == 0).then_some(()) }
        },
    )
    .await;
    let (records, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT object_key) FROM event_archives")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(records, distinct);
    let after = api.events(&id).await;
    assert_eq!(types(&after)[..events.len()], types(&events)[..]);
    assert_eq!(
        types(&after).last().map(String::as_str),
        Some("JobSucceeded")
    );
}

/// Creating partitions beside a writer does not deadlock. A writer that read `events` (its
/// version check) and then appends, in one transaction, while the scheduler creates partitions:
/// creation used to lock the default partition first and wait for the reader, while the writer
/// waited for the default partition (`deadlock detected`: a 503 to the client; the full test run
/// hit it when a test's scheduler started beside its API's writes). Creation now takes `events`
/// itself first, in ACCESS EXCLUSIVE mode, so the writer finishes first.
#[tokio::test]
async fn creating_partitions_beside_a_writer_does_not_deadlock() {
    let env = TestEnv::new().await;
    // The API migrates; no scheduler, so no partition exists yet beyond the migration's.
    let api = env.spawn_api().await;
    drop(api);
    let pool = env.pool().await;
    let stream = uuid::Uuid::now_v7();
    let mut writer = pool.begin().await.unwrap();
    let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM events WHERE stream_id = $1")
        .bind(stream)
        .fetch_one(&mut *writer)
        .await
        .unwrap();
    assert_eq!(n, 0);
    let creator = {
        let pool = pool.clone();
        tokio::spawn(async move {
            sqlx::query_scalar::<_, i32>(
                "SELECT capibara_events_ensure_partitions('1 day', '2 days')",
            )
            .fetch_one(&pool)
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    sqlx::query(
        "INSERT INTO events (stream_id, stream_type, version, type, data, metadata, recorded_at)
         VALUES ($1, 'job', 1, 'JobSubmitted', '{}', '{}', now())",
    )
    .bind(stream)
    .execute(&mut *writer)
    .await
    .expect("the append beside partition creation (deadlock detected before the fix)");
    writer.commit().await.unwrap();
    let created = creator
        .await
        .unwrap()
        .expect("partition creation finished after the writer");
    assert!(created >= 2, "partitions created: {created}");
    let (where_,): (String,) =
        sqlx::query_as("SELECT tableoid::regclass::text FROM events WHERE stream_id = $1")
            .bind(stream)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_ne!(
        where_, "events_default",
        "the row moved into its time partition"
    );
}
