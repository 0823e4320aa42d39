//! Leadership among scheduler replicas (`leader::Leadership`) on a real Postgres database of its
//! own, each replica a pool of its own: a replica that stops leading while its process and its
//! pool live on (its loop failed on an error that is not about the lock's connection, such as a
//! log read on another pool) must let another replica lead. The short chaos profile found the
//! orchestrator led by nobody for minutes after such an error: the lock's connection went back
//! to its pool still holding the session lock.

use std::time::Duration;

use capibara_scheduler::leader::Leadership;
use capibara_shared::store::{self, StoreError};

const KEY: i64 = 0x7e57_1ead;

/// The replica on `pool` cannot take the lock: another one leads.
async fn assert_led_elsewhere(pool: &sqlx::PgPool, why: &str) {
    assert!(
        matches!(
            Leadership::acquire(pool, KEY, "test").await,
            Err(StoreError::Conflict)
        ),
        "{why}"
    );
}

#[tokio::test]
async fn a_replica_that_stops_leading_hands_the_lock_to_another() {
    let env = capibara_tests::TestEnv::new().await;
    // One connection each: what replica A's pool hands out next is the lock's old connection.
    let a = store::connect(&env.database_url, 1).await.unwrap();
    let b = store::connect(&env.database_url, 1).await.unwrap();

    let leading = Leadership::acquire(&a, KEY, "test").await.unwrap();
    assert_led_elsewhere(&b, "one leader at a time").await;

    // A stops leading; its pool goes on serving its other loops.
    drop(leading);
    let (one,): (i32,) = sqlx::query_as("SELECT 1").fetch_one(&a).await.unwrap();
    assert_eq!(one, 1);

    let mut taken = capibara_tests::eventually(
        "replica B to lead after replica A stopped",
        Duration::from_secs(10),
        || async { Leadership::acquire(&b, KEY, "test").await.ok() },
    )
    .await;
    taken.confirm().await.unwrap();
    assert_led_elsewhere(&a, "A does not lead beside B").await;

    // And back: B stops, A leads again.
    drop(taken);
    capibara_tests::eventually(
        "replica A to lead again",
        Duration::from_secs(10),
        || async { Leadership::acquire(&a, KEY, "test").await.ok() },
    )
    .await;
}
