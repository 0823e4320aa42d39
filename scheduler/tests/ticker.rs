//! One pass of the ticker (`ticker::tick_once`) in-process, on a real Postgres database of its
//! own, at clock times the test chooses: what a pass fires, skips and leaves for later is
//! checked without spawning a binary or waiting for a minute to turn. The loop around the pass
//! is the scheduler's one driver (`driver::every`, tested on a paused clock);
//! tests/tests/e2e/schedules.rs keeps replicas, restarts and real time.

use capibara_scheduler::ticker::{tick_once, Clock};
use capibara_shared::{
    domain::{
        event::EventMetadata,
        schedule::{CatchUp, Overlap, Schedule, ScheduleEvent, ScheduleSpec, ScheduleTarget},
    },
    store::{self, schedules::schedule_append, Store},
};
use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;
use uuid::Uuid;

/// A store on a database of its own; the `TestEnv` keeps the database while it lives.
async fn store() -> (Store, capibara_tests::TestEnv) {
    let env = capibara_tests::TestEnv::new().await;
    let pool = store::connect(&env.database_url, 4).await.unwrap();
    store::migrate(&pool).await.unwrap();
    let appender = store::Appender::start(pool.clone(), None, Default::default());
    (Store::new(pool, appender), env)
}

/// 2030-01-01 at 00:`m`:`s` UTC.
fn at(m: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2030, 1, 1, 0, m, s).unwrap()
}

/// The ticker's clock reading `t` (real time plus the offset that makes it `t`; the
/// milliseconds a pass takes change nothing here).
fn clock_at(t: DateTime<Utc>) -> Clock {
    Clock {
        offset: t - Utc::now(),
    }
}

/// An every-minute schedule with a job target, created at `created`.
async fn every_minute(store: &Store, catch_up: CatchUp, created: DateTime<Utc>) -> Uuid {
    let spec = ScheduleSpec {
        name: "every-minute".into(),
        cron: "* * * * *".into(),
        timezone: "UTC".into(),
        target: serde_json::from_value::<ScheduleTarget>(
            json!({"type": "job", "job": {"kind": "echo", "input": {}, "queue": "default",
                   "priority": "normal", "max_attempts": 3}}),
        )
        .unwrap(),
        overlap: Overlap::Allow,
        catch_up,
        catch_up_window_s: 3600,
        jitter_s: 0,
        start_at: None,
        end_at: None,
    };
    let id = Uuid::now_v7();
    let meta = EventMetadata {
        namespace: "default".into(),
        ..Default::default()
    };
    let events = [ScheduleEvent::ScheduleCreated(spec)];
    let (_, append) = schedule_append(None, id, "default", &events, meta, created).unwrap();
    store.appender.append(append).await.unwrap();
    id
}

async fn schedule(store: &Store, id: Uuid) -> Schedule {
    store::schedules::get(&store.pool, "default", id)
        .await
        .unwrap()
        .unwrap()
}

/// The schedule's events after `ScheduleCreated`: type, fire time (minute), trigger or reason,
/// and how many ticks it stands for.
async fn ticks(store: &Store, id: Uuid) -> Vec<(String, u32, String, i64)> {
    let rows: Vec<(String, DateTime<Utc>, String, i64)> = sqlx::query_as(
        "SELECT type, (data->>'fire_time')::timestamptz,
                coalesce(data->>'trigger', data->>'reason'), coalesce((data->>'count')::bigint, 1)
         FROM events WHERE stream_id = $1 AND version > 1 ORDER BY version",
    )
    .bind(id)
    .fetch_all(&store.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(t, fire, why, n)| (t, chrono::Timelike::minute(&fire), why, n))
        .collect()
}

fn fired(minute: u32, trigger: &str) -> (String, u32, String, i64) {
    ("TickFired".into(), minute, trigger.into(), 1)
}

fn skipped(minute: u32, count: i64) -> (String, u32, String, i64) {
    ("TickSkipped".into(), minute, "missed".into(), count)
}

#[tokio::test]
async fn a_pass_fires_the_due_tick_once_and_nothing_that_is_not_due() {
    let (store, _env) = store().await;
    let id = every_minute(&store, CatchUp::Latest, at(0, 10)).await;
    assert_eq!(schedule(&store, id).await.next_fire_time, Some(at(1, 0)));

    // Before the first fire time: nothing to do.
    assert_eq!(tick_once(&store, clock_at(at(0, 50))).await.unwrap(), 0);
    assert!(ticks(&store, id).await.is_empty());

    // Just past it: one tick, with its job, and the next one planned.
    assert_eq!(tick_once(&store, clock_at(at(1, 5))).await.unwrap(), 1);
    assert_eq!(ticks(&store, id).await, [fired(1, "schedule")]);
    let s = schedule(&store, id).await;
    assert_eq!((s.fired_count, s.next_fire_time), (1, Some(at(2, 0))));
    let job = s.last_job_id.expect("the tick's job");
    let job = store::jobs::get(&store.pool, "default", job)
        .await
        .unwrap()
        .expect("the job is committed with the tick");
    assert_eq!(job.kind, "echo");

    // The same instant again (another replica, or the next poll): nothing fires twice.
    assert_eq!(tick_once(&store, clock_at(at(1, 5))).await.unwrap(), 0);
    assert_eq!(ticks(&store, id).await.len(), 1);
}

#[tokio::test]
async fn ticks_missed_while_no_scheduler_ran_follow_the_catch_up_policy() {
    let (store, _env) = store().await;
    let latest = every_minute(&store, CatchUp::Latest, at(0, 10)).await;
    let all = every_minute(&store, CatchUp::All, at(0, 10)).await;
    let none = every_minute(&store, CatchUp::None, at(0, 10)).await;

    // No scheduler ran from 00:00:10 to 00:04:30: the ticks of 00:01 to 00:04 are all more than
    // MISSED_AFTER_S late.
    assert_eq!(tick_once(&store, clock_at(at(4, 30))).await.unwrap(), 3);
    assert_eq!(
        ticks(&store, latest).await,
        [skipped(3, 3), fired(4, "catch_up")]
    );
    assert_eq!(
        ticks(&store, all).await,
        [1, 2, 3, 4].map(|m| fired(m, "catch_up"))
    );
    assert_eq!(ticks(&store, none).await, [skipped(4, 4)]);
    for id in [latest, all, none] {
        assert_eq!(schedule(&store, id).await.next_fire_time, Some(at(5, 0)));
    }
}
