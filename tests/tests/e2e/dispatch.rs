//! The dispatch queue in Redis, driven directly: what an idle fetcher (the built-in worker, the
//! HTTP protocol's long poll) relies on when it blocks straight after a pop that found nothing.

use std::time::Duration;

use capibara_shared::{queue::Queue, redis_conn::RedisConn};
use capibara_tests::{dispatch_entry, TestEnv};

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
