//! The dispatch queue in Redis, driven directly: what an idle fetcher (the built-in worker, the
//! HTTP protocol's long poll) relies on when it blocks straight after a pop that found nothing.

use std::time::Duration;

use capibara_shared::{
    domain::{
        event::EventMetadata,
        job::{Job, Submission},
    },
    queue::Queue,
    redis_conn::RedisConn,
    store::{
        dispatch::{self, DispatchEntry},
        jobs::{job_append, JobWrite},
        Effect,
    },
};
use capibara_tests::{dispatch_entry, TestEnv};
use redis::AsyncCommands;
use serde_json::json;

/// A test's queue, the `default` lane, and an idle fetcher's own blocking connection.
async fn fetcher() -> (TestEnv, Queue, Vec<String>, RedisConn) {
    let env = TestEnv::new().await;
    let queue = Queue::connect(&env.redis_url, &env.redis_prefix)
        .await
        .unwrap();
    let conn = queue.blocking_connection().await.unwrap();
    (env, queue, vec!["default".to_string()], conn)
}

/// A job pushed between a fetcher's empty pop and its blocking wait is not missed: the push's
/// wake token stays in the list, so the wait returns it at once instead of sleeping out its
/// timeout (`Queue::wait_and_pop` does not pop before it blocks).
#[tokio::test]
async fn a_push_between_the_empty_pop_and_the_wait_wakes_the_fetcher_at_once() {
    let (_env, queue, lanes, mut conn) = fetcher().await;

    let empty = queue.pop_due(&lanes, 4).await.unwrap();
    assert!(empty.ids.is_empty(), "{empty:?}");
    assert_eq!(empty.due, None, "no rate-limited group");

    let id = uuid::Uuid::now_v7();
    queue
        .push(&[dispatch_entry("default", "echo", id)])
        .await
        .unwrap();

    // A minute's timeout: a wait that missed the push would outlive the 10 s allowed here.
    let woken = tokio::time::timeout(
        Duration::from_secs(10),
        queue.wait_and_pop(&mut conn, &lanes, Duration::from_secs(60), empty.due),
    )
    .await
    .expect("the wait returned on the push's wake token, not at its timeout")
    .unwrap();
    assert_eq!(woken.ids, vec![id]);

    // Nothing left: the next wait sleeps out its (short) timeout and finds nothing.
    let idle = queue
        .wait_and_pop(&mut conn, &lanes, Duration::from_millis(200), None)
        .await
        .unwrap();
    assert!(idle.ids.is_empty(), "{idle:?}");
}

/// The last command a Redis client ran (`CLIENT LIST`'s `cmd=`).
async fn last_command(queue: &Queue, client: i64) -> String {
    let mut main = queue.connection();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("ID")
        .arg(client)
        .query_async(&mut main)
        .await
        .unwrap();
    list.split_whitespace()
        .find_map(|f| f.strip_prefix("cmd="))
        .unwrap_or_default()
        .to_string()
}

/// A woken fetcher gets its job in the wake-up's own answer: the pop script rides behind the
/// `BLPOP` on the fetcher's connection (Redis runs it as soon as the wait ends), so no second
/// round trip follows the wake. Also after Redis lost its script cache (a restart): the pop
/// that cannot ride along (`NOSCRIPT`) is made on its own, and the job is not lost.
#[tokio::test]
async fn a_woken_fetcher_gets_its_job_in_the_wake_up_answer() {
    let (_env, queue, lanes, mut conn) = fetcher().await;
    let client: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await
        .unwrap();
    let empty = queue.pop_due(&lanes, 4).await.unwrap();
    assert!(empty.ids.is_empty(), "{empty:?}");

    for flushed in [false, true] {
        if flushed {
            let mut main = queue.connection();
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query_async(&mut main)
                .await
                .unwrap();
        }
        let id = uuid::Uuid::now_v7();
        let pusher = queue.clone();
        let push = tokio::spawn(async move {
            // After the fetcher blocked.
            tokio::time::sleep(Duration::from_millis(300)).await;
            pusher
                .push(&[dispatch_entry("default", "echo", id)])
                .await
                .unwrap();
        });
        let woken = tokio::time::timeout(
            Duration::from_secs(10),
            queue.wait_and_pop(&mut conn, &lanes, Duration::from_secs(60), None),
        )
        .await
        .expect("the push woke the fetcher")
        .unwrap();
        push.await.unwrap();
        assert_eq!(woken.ids, vec![id], "script cache flushed: {flushed}");
        if !flushed {
            assert_eq!(
                last_command(&queue, client).await,
                "evalsha",
                "the pop ran on the fetcher's own connection, right after its BLPOP"
            );
        }
    }

    // A wait that times out ends in the pop the fetcher would make next: it found nothing.
    let idle = queue
        .wait_and_pop(&mut conn, &lanes, Duration::from_millis(200), None)
        .await
        .unwrap();
    assert!(idle.ids.is_empty(), "{idle:?}");
    assert_eq!(last_command(&queue, client).await, "evalsha");
}

/// The job of `kind` (queue `q`, namespace `default`) as its submission writes it, and the
/// dispatch entry that submission pushes.
fn submitted(kind: &str) -> (Job, DispatchEntry) {
    let sub: Submission = serde_json::from_value(
        json!({"kind": kind, "input": {"n": 1}, "queue": "q", "priority": "normal", "max_attempts": 3}),
    )
    .unwrap();
    let at = capibara_shared::domain::now();
    let meta = EventMetadata {
        namespace: "default".into(),
        ..Default::default()
    };
    let (job, append) = job_append(
        None,
        uuid::Uuid::now_v7(),
        &sub.into_events(at),
        JobWrite::new(meta, at),
    )
    .unwrap();
    let entry = append
        .effects
        .iter()
        .find_map(|e| match e {
            Effect::Dispatch(d) => Some(d.clone()),
            _ => None,
        })
        .expect("a submitted job is dispatched");
    (job, entry)
}

/// One pop across lanes takes the oldest head first, whichever lane holds it. The pop script
/// reads each lane's first group once per call and again only for the lane it took from; had it
/// kept lane a's first read, the second job here would be lane a's (300) instead of lane b's
/// older one (200).
#[tokio::test]
async fn one_pop_across_lanes_takes_the_oldest_head_first_whichever_lane_holds_it() {
    let (_env, queue, _, _) = fetcher().await;
    let entry = |lane: &str, score: i64| {
        let mut e = dispatch_entry(lane, "echo", uuid::Uuid::now_v7());
        e.score = score;
        e
    };
    let a = [entry("a", 100), entry("a", 300), entry("a", 500)];
    let b = [entry("b", 200), entry("b", 400)];
    queue.push(&a).await.unwrap();
    queue.push(&b).await.unwrap();
    let lanes = vec!["a".to_string(), "b".to_string()];
    let popped = queue.pop_due(&lanes, 5).await.unwrap();
    assert_eq!(
        popped.ids[..2],
        [a[0].job_id, b[0].job_id],
        "the oldest of both lanes, then the oldest left: {popped:?}"
    );
    let mut all = popped.ids.clone();
    all.sort();
    let mut want: Vec<_> = a.iter().chain(&b).map(|e| e.job_id).collect();
    want.sort();
    assert_eq!(all, want, "each job once");
    assert!(queue.pop_due(&lanes, 5).await.unwrap().ids.is_empty());
}

/// A job rides with its dispatch entry: the pop hands out the job as its commit wrote it, once
/// (a later pop of the same id, the relay's re-push, finds no copy), and taking the entry off
/// (a cancel) takes the copy too; a job too large is not carried (docs/write-path.md, "The job
/// rides with its pop").
#[tokio::test]
async fn a_job_rides_with_its_pop_once() {
    let (env, queue, _, _) = fetcher().await;
    let (job, entry) = submitted("echo");
    assert!(entry.carried.is_some(), "a built-in kind");
    let (_, user) = submitted("hook.resize");
    assert!(user.carried.is_some(), "a user kind");
    let lanes = vec![entry.queue.clone()];
    queue.push(std::slice::from_ref(&entry)).await.unwrap();
    let mut popped = queue.pop_due(&lanes, 4).await.unwrap();
    assert_eq!(popped.ids, vec![job.id]);
    let copy = popped.carried.remove(&job.id).expect("the copy rode along");
    assert_eq!(
        serde_json::to_value(&copy).unwrap(),
        serde_json::to_value(&job).unwrap(),
        "the job as its commit wrote it"
    );
    assert_eq!(copy.version, 1);

    // A pop of several hands out as many jobs as it may, each with its copy.
    let (second, second_entry) = submitted("echo");
    let (third, third_entry) = submitted("echo");
    queue.push(&[second_entry, third_entry]).await.unwrap();
    let popped = queue.pop_due(&lanes, 2).await.unwrap();
    let mut ids = popped.ids.clone();
    ids.sort();
    let mut want = vec![second.id, third.id];
    want.sort();
    assert_eq!(ids, want, "{popped:?}");
    assert_eq!(popped.carried.len(), 2, "{popped:?}");

    // The relay pushes the outbox row again (no copy): the pop finds none left behind.
    let mut again = entry.clone();
    again.carried = None;
    queue.push(&[again.clone()]).await.unwrap();
    let popped = queue.pop_due(&lanes, 4).await.unwrap();
    assert_eq!(popped.ids, vec![job.id]);
    assert!(popped.carried.is_empty(), "{popped:?}");

    // Taken off before any pop (a cancel): the copy goes with the entry.
    let (job, entry) = submitted("echo");
    queue.push(std::slice::from_ref(&entry)).await.unwrap();
    let key = format!("{{{}}}:body:{}", env.redis_prefix, job.id);
    let mut conn = queue.connection();
    let held: bool = conn.exists(&key).await.unwrap();
    assert!(held, "{key} holds the copy");
    let ttl: i64 = conn.pttl(&key).await.unwrap();
    assert!(
        ttl > 0 && ttl as u64 <= dispatch::CARRY_TTL_MS,
        "a copy expires: {ttl} ms"
    );
    queue.remove(&entry).await.unwrap();
    let held: bool = conn.exists(&key).await.unwrap();
    assert!(!held, "the copy went with its entry");
    assert!(queue.pop_due(&lanes, 4).await.unwrap().ids.is_empty());

    // Too large to carry: loaded from Postgres instead.
    let (mut big, _) = submitted("echo");
    big.input = json!({"text": "x".repeat(dispatch::CARRY_MAX_BYTES)});
    assert!(dispatch::carried(&big).is_none());
}
