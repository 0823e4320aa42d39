//! Cron schedules end to end: API, exactly-once ticks across three scheduler replicas, catch-up
//! after downtime (with the scheduler's clock moved an hour ahead), overlap, manual trigger and
//! backfill.

use std::{collections::HashMap, time::Duration};

use capibara_tests::{eventually, TestEnv};
use serde_json::{json, Value};

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql).fetch_one(pool).await.unwrap();
    n
}

async fn schedule_events(pool: &sqlx::PgPool, id: &str) -> Vec<(String, Value)> {
    sqlx::query_as("SELECT type, data FROM events WHERE stream_id = $1::uuid ORDER BY version")
        .bind(id)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn schedules_are_created_validated_listed_paused_and_deleted() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    let r = api
        .post(
            "/v1/schedules",
            json!({"name": "nightly", "cron": "0 9 * * *", "timezone": "Europe/Berlin",
                   "target": {"type": "job", "job": {"kind": "echo", "input": {"x": 1}}},
                   "overlap": "skip", "catch_up": "latest"}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.body["id"].as_str().unwrap().to_string();
    let next: Vec<chrono::DateTime<chrono::Utc>> =
        serde_json::from_value(r.body["next_fire_times"].clone()).unwrap();
    assert_eq!(next.len(), 5);
    for t in &next {
        let berlin = t.with_timezone(&chrono_tz::Europe::Berlin);
        assert_eq!(berlin.format("%H:%M").to_string(), "09:00");
    }
    assert_eq!(r.body["status"], "active");

    for (body, field) in [
        (
            json!({"name": "x", "cron": "0 9 * *", "target": {"type": "job", "job": {"kind": "echo"}}}),
            "cron",
        ),
        (
            json!({"name": "x", "cron": "0 9 * * *", "timezone": "Mars/Olympus", "target": {"type": "job", "job": {"kind": "echo"}}}),
            "timezone",
        ),
        (
            json!({"name": "x", "cron": "0 9 * * *", "target": {"type": "job", "job": {"kind": "nope"}}}),
            "target.job.kind",
        ),
        (
            json!({"name": "x", "cron": "0 9 * * *", "target": {"type": "workflow", "workflow_id": "w"}}),
            "target.workflow_id",
        ),
        (
            json!({"name": "x", "cron": "0 9 * * *", "overlap": "never", "target": {"type": "job", "job": {"kind": "echo"}}}),
            "overlap",
        ),
        (
            json!({"name": "", "cron": "0 9 * * *", "target": {"type": "job", "job": {"kind": "echo"}}}),
            "name",
        ),
    ] {
        let r = api.post("/v1/schedules", body).await;
        assert_eq!(r.status, 422, "{field}: {r:?}");
        assert_eq!(r.body["errors"][0]["field"], field, "{r:?}");
    }

    assert_eq!(
        api.get("/v1/schedules").await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let paused = api
        .post(&format!("/v1/schedules/{id}/pause"), json!({}))
        .await;
    assert_eq!(paused.body["status"], "paused");
    assert!(paused.body["next_fire_time"].is_null());
    let resumed = api
        .post(&format!("/v1/schedules/{id}/resume"), json!({}))
        .await;
    assert_eq!(resumed.body["status"], "active");
    let patched = api
        .send(
            api.http
                .patch(api.url(&format!("/v1/schedules/{id}")))
                .json(&json!({"cron": "@hourly"})),
        )
        .await;
    assert_eq!(patched.status, 200, "{patched:?}");
    assert_eq!(patched.body["cron"], "@hourly");
    let del = api
        .send(api.http.delete(api.url(&format!("/v1/schedules/{id}"))))
        .await;
    assert_eq!(del.status, 204);
    assert_eq!(api.get(&format!("/v1/schedules/{id}")).await.status, 404);
    let pool = env.pool().await;
    let types: Vec<String> = schedule_events(&pool, &id)
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(
        types,
        [
            "ScheduleCreated",
            "SchedulePaused",
            "ScheduleResumed",
            "ScheduleUpdated",
            "ScheduleDeleted"
        ]
    );
}

/// `cron` is read as a crontab: 1-5 is Monday to Friday, 0 and 7 are Sunday; other dialects'
/// `L`/`W`/`#` and `@reboot` are a 422 naming the `cron` field and what is wrong.
#[tokio::test]
async fn cron_reads_day_of_week_as_crontab() {
    use chrono::{Datelike, Weekday};
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    let create = |cron: &str| {
        json!({"name": format!("c {cron}"), "cron": cron, "timezone": "America/New_York",
               "target": {"type": "job", "job": {"kind": "echo"}}})
    };
    let fire_days = |body: &Value| -> Vec<(Weekday, String)> {
        let times: Vec<chrono::DateTime<chrono::Utc>> =
            serde_json::from_value(body["next_fire_times"].clone()).unwrap();
        times
            .iter()
            .map(|t| {
                let local = t.with_timezone(&chrono_tz::America::New_York);
                (local.weekday(), local.format("%H:%M").to_string())
            })
            .collect()
    };

    let r = api.post("/v1/schedules", create("0 9 * * 1-5")).await;
    assert_eq!(r.status, 201, "{r:?}");
    let mut days = fire_days(&r.body);
    assert!(days.iter().all(|(_, hm)| hm == "09:00"), "{days:?}");
    days.sort_by_key(|(d, _)| d.num_days_from_monday());
    let days: Vec<Weekday> = days.into_iter().map(|(d, _)| d).collect();
    assert_eq!(
        days,
        [
            Weekday::Mon,
            Weekday::Tue,
            Weekday::Wed,
            Weekday::Thu,
            Weekday::Fri
        ],
        "the next five ticks of `0 9 * * 1-5` are one each weekday"
    );
    for (cron, day) in [
        ("0 12 * * 0", Weekday::Sun),
        ("0 12 * * 7", Weekday::Sun),
        ("0 12 * * 1", Weekday::Mon),
        ("0 12 * * sat", Weekday::Sat),
    ] {
        let r = api.post("/v1/schedules", create(cron)).await;
        assert_eq!(r.status, 201, "{cron}: {r:?}");
        let days = fire_days(&r.body);
        assert_eq!(days.len(), 5);
        assert!(
            days.iter().all(|(d, hm)| *d == day && hm == "12:00"),
            "{cron}: {days:?}"
        );
        let next: chrono::DateTime<chrono::Utc> =
            serde_json::from_value(r.body["next_fire_time"].clone()).unwrap();
        assert_eq!(
            next.with_timezone(&chrono_tz::America::New_York).weekday(),
            day
        );
    }

    for (cron, message) in [
        ("0 9 * * 1#2", "day-of-week field `1#2`: `#`"),
        ("0 9 L * *", "day-of-month field `L`: `L`"),
        ("0 9 15W * *", "day-of-month field `15W`: `W`"),
        ("0 9 * * 5L", "day-of-week field `5L`: `L`"),
        ("@reboot", "@reboot"),
        ("0 9 * * 8", "day-of-week field `8`: 8 is out of range 0-7"),
    ] {
        let r = api.post("/v1/schedules", create(cron)).await;
        assert_eq!(r.status, 422, "{cron}: {r:?}");
        assert_eq!(r.body["errors"][0]["field"], "cron", "{r:?}");
        let got = r.body["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(got.contains(message), "{cron}: {got}");
    }
    // A PATCH to a refused expression is refused the same way, and the schedule keeps its cron.
    let r = api.post("/v1/schedules", create("0 9 * * 1")).await;
    let id = r.body["id"].as_str().unwrap().to_string();
    let patched = api
        .send(
            api.http
                .patch(api.url(&format!("/v1/schedules/{id}")))
                .json(&json!({"cron": "0 9 * * MON#1"})),
        )
        .await;
    assert_eq!(patched.status, 422, "{patched:?}");
    assert_eq!(patched.body["errors"][0]["field"], "cron");
    assert_eq!(
        api.get(&format!("/v1/schedules/{id}")).await.body["cron"],
        "0 9 * * 1"
    );
}

#[tokio::test]
async fn three_scheduler_replicas_fire_each_tick_exactly_once() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let _worker = env.spawn_worker(&[]);
    let _s1 = env.spawn_scheduler();
    let _s2 = env.spawn_scheduler();
    let _s3 = env.spawn_scheduler();
    let api = env.client();
    let r = api
        .post(
            "/v1/schedules",
            json!({"name": "every second", "cron": "* * * * * *", "overlap": "allow",
                   "target": {"type": "job", "job": {"kind": "echo", "input": {"tick": true}}}}),
        )
        .await;
    let id = r.body["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(6)).await;
    api.post(&format!("/v1/schedules/{id}/pause"), json!({}))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let pool = env.pool().await;
    let events = schedule_events(&pool, &id).await;
    let mut per_tick: HashMap<String, usize> = HashMap::new();
    for (t, data) in &events {
        if t == "TickFired" {
            *per_tick
                .entry(data["fire_time"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert!(per_tick.len() >= 4, "ticks fired: {per_tick:?}");
    assert!(
        per_tick.values().all(|n| *n == 1),
        "a tick fired twice: {per_tick:?}"
    );
    let jobs = count(
        &pool,
        &format!("SELECT count(*) FROM jobs WHERE tags->>'schedule_id' = '{id}'"),
    )
    .await;
    assert_eq!(jobs as usize, per_tick.len(), "one job per tick");
    let rows = count(
        &pool,
        &format!("SELECT count(*) FROM schedule_ticks WHERE schedule_id = '{id}'"),
    )
    .await;
    assert_eq!(rows as usize, per_tick.len());
    // Lateness is a benchmark figure (`capibara bench-schedules`), not asserted here.
}

#[tokio::test]
async fn a_scheduler_that_was_down_for_an_hour_catches_up_per_policy() {
    let mut env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    let mut ids = HashMap::new();
    for policy in ["none", "latest", "all"] {
        let r = api
            .post(
                "/v1/schedules",
                json!({"name": policy, "cron": "* * * * *", "catch_up": policy, "catch_up_window_s": 600,
                       "overlap": "allow", "target": {"type": "job", "job": {"kind": "echo"}}}),
            )
            .await;
        ids.insert(policy, r.body["id"].as_str().unwrap().to_string());
    }
    // The scheduler comes up "an hour later".
    env.extra_env
        .push(("CAPIBARA_CLOCK_OFFSET_S".into(), "3630".into()));
    let _scheduler = env.spawn_scheduler();
    let pool = env.pool().await;
    for (policy, id) in &ids {
        eventually(
            &format!("{policy} caught up"),
            Duration::from_secs(20),
            || async {
                let ev = schedule_events(&pool, id).await;
                ev.iter()
                    .any(|(t, d)| {
                        t == "TickSkipped" || (t == "TickFired" && d["trigger"] == "catch_up")
                    })
                    .then_some(())
            },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let summary = |events: Vec<(String, Value)>| {
        let fired = events
            .iter()
            .filter(|(t, d)| t == "TickFired" && d["trigger"] == "catch_up")
            .count();
        let skipped: u64 = events
            .iter()
            .filter(|(t, _)| t == "TickSkipped")
            .map(|(_, d)| d["count"].as_u64().unwrap())
            .sum();
        let reasons: Vec<String> = events
            .iter()
            .filter(|(t, _)| t == "TickSkipped")
            .map(|(_, d)| d["reason"].as_str().unwrap().to_string())
            .collect();
        (fired, skipped, reasons)
    };
    let (fired, skipped, reasons) = summary(schedule_events(&pool, &ids["none"]).await);
    assert_eq!(fired, 0);
    assert!((59..=61).contains(&skipped), "{skipped}");
    assert_eq!(reasons, ["missed"]);
    let (fired, skipped, _) = summary(schedule_events(&pool, &ids["latest"]).await);
    assert_eq!(fired, 1);
    assert!((58..=60).contains(&skipped), "{skipped}");
    let (fired, skipped, reasons) = summary(schedule_events(&pool, &ids["all"]).await);
    assert!(
        (9..=11).contains(&fired),
        "the ticks of the 10-minute window: {fired}"
    );
    assert!((49..=51).contains(&skipped), "{skipped}");
    assert_eq!(reasons, ["outside_catch_up"]);
}

#[tokio::test]
async fn overlap_skip_does_not_start_a_tick_while_the_previous_job_runs() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let r = api
        .post(
            "/v1/schedules",
            json!({"name": "slow", "cron": "* * * * * *", "overlap": "skip",
                   "target": {"type": "job", "job": {"kind": "sleep", "input": {"ms": 2500}}}}),
        )
        .await;
    let id = r.body["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(5)).await;
    api.post(&format!("/v1/schedules/{id}/pause"), json!({}))
        .await;
    let pool = env.pool().await;
    let events = schedule_events(&pool, &id).await;
    let fired = events.iter().filter(|(t, _)| t == "TickFired").count();
    let overlaps = events
        .iter()
        .filter(|(t, d)| t == "TickSkipped" && d["reason"] == "overlap")
        .count();
    assert!((1..=3).contains(&fired), "fired {fired}");
    assert!(overlaps >= 2, "skipped for overlap: {overlaps}");
    let running = count(
        &pool,
        &format!(
            "SELECT count(*) FROM jobs WHERE tags->>'schedule_id' = '{id}' AND status = 'running'"
        ),
    )
    .await;
    assert!(running <= 1, "never two at once");
}

#[tokio::test]
async fn trigger_runs_now_and_backfill_fires_each_missing_tick_once() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let r = api
        .post(
            "/v1/schedules",
            json!({"name": "hourly", "cron": "@hourly", "target": {"type": "job", "job": {"kind": "echo", "input": {"k": 1}}}}),
        )
        .await;
    let id = r.body["id"].as_str().unwrap().to_string();
    let t = api
        .post(&format!("/v1/schedules/{id}/trigger"), json!({}))
        .await;
    assert_eq!(t.status, 202, "{t:?}");
    let job_id = t.body["last_job_id"].as_str().unwrap().to_string();
    let job = api.wait_terminal(&job_id, Duration::from_secs(10)).await;
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["tags"]["schedule_id"], id.as_str());

    let to = chrono::Utc::now();
    let from = to - chrono::Duration::hours(5);
    let b = api
        .post(
            &format!("/v1/schedules/{id}/backfill"),
            json!({"from": from, "to": to}),
        )
        .await;
    assert_eq!(b.status, 202, "{b:?}");
    let again = api
        .post(
            &format!("/v1/schedules/{id}/backfill"),
            json!({"from": from, "to": to}),
        )
        .await;
    assert_eq!(again.status, 202);
    let pool = env.pool().await;
    let backfilled = schedule_events(&pool, &id)
        .await
        .into_iter()
        .filter(|(t, d)| t == "TickFired" && d["trigger"] == "backfill")
        .count();
    assert!(
        (4..=5).contains(&backfilled),
        "five hourly ticks in five hours, once: {backfilled}"
    );
    let bad = api
        .post(
            &format!("/v1/schedules/{id}/backfill"),
            json!({"from": to, "to": from}),
        )
        .await;
    assert_eq!(bad.status, 422);
}

/// A schedule that does not fire during a test; its id.
async fn yearly_schedule(api: &capibara_tests::Api) -> String {
    let r = api
        .post(
            "/v1/schedules",
            json!({"name": "busy", "cron": "0 0 1 1 *", "target": {"type": "job", "job": {"kind": "echo"}}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    r.body["id"].as_str().unwrap().to_string()
}

/// Pause and resume are commands (`capibara_shared::command`): a request that loses the race to
/// another writer re-reads the schedule and applies again, instead of answering 409.
#[tokio::test]
async fn concurrent_pauses_and_resumes_all_apply() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    let id = yearly_schedule(&api).await;
    let calls = (0..12).map(|i| {
        let api = api.clone();
        let path = format!(
            "/v1/schedules/{id}/{}",
            if i % 2 == 0 { "pause" } else { "resume" }
        );
        async move { api.post(&path, json!({})).await }
    });
    let refused: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .filter(|r| r.status != 200)
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
    let pool = env.pool().await;
    let changes = schedule_events(&pool, &id)
        .await
        .into_iter()
        .filter(|(t, _)| t == "SchedulePaused" || t == "ScheduleResumed")
        .count();
    assert_eq!(changes, 12);
}

/// PATCH applies to the schedule as it is when it commits: concurrent updates of different
/// fields all succeed and none is lost (the command re-reads and decides again on a conflict).
#[tokio::test]
async fn concurrent_updates_of_different_fields_all_apply() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    let id = yearly_schedule(&api).await;
    let patches = [
        json!({"name": "renamed"}),
        json!({"jitter_s": 7}),
        json!({"catch_up_window_s": 600}),
        json!({"overlap": "allow"}),
        json!({"catch_up": "all"}),
        json!({"timezone": "Europe/Paris"}),
    ];
    let calls = patches.iter().map(|p| {
        let api = api.clone();
        let req = api
            .http
            .patch(api.url(&format!("/v1/schedules/{id}")))
            .json(p);
        async move { api.send(req).await }
    });
    let refused: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .filter(|r| r.status != 200)
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
    let s = api.get(&format!("/v1/schedules/{id}")).await.body;
    for p in &patches {
        let (field, value) = p.as_object().unwrap().iter().next().unwrap();
        assert_eq!(&s[field], value, "{field} was lost: {s}");
    }
    let pool = env.pool().await;
    let updates = schedule_events(&pool, &id)
        .await
        .into_iter()
        .filter(|(t, _)| t == "ScheduleUpdated")
        .count();
    assert_eq!(updates, patches.len());
}

/// Firing a tick by hand and backfilling are commands too: requests that race on one schedule
/// all fire (a loser re-reads the schedule and fires from there), each tick once.
#[tokio::test]
async fn concurrent_manual_ticks_and_backfills_all_fire_once() {
    let env = TestEnv::new().await;
    let _api = env.spawn_api().await;
    let api = env.client();
    let id = yearly_schedule(&api).await;
    // Four manual ticks, and four backfills of the same two yearly ticks (2020 and 2021).
    let calls = (0..8).map(|i| {
        let api = api.clone();
        let id = id.clone();
        async move {
            if i % 2 == 0 {
                api.post(&format!("/v1/schedules/{id}/trigger"), json!({}))
                    .await
            } else {
                api.post(
                    &format!("/v1/schedules/{id}/backfill"),
                    json!({"from": "2020-01-01T00:00:00Z", "to": "2021-06-01T00:00:00Z"}),
                )
                .await
            }
        }
    });
    let refused: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .filter(|r| r.status != 202)
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
    let pool = env.pool().await;
    let fired: Vec<String> = schedule_events(&pool, &id)
        .await
        .into_iter()
        .filter(|(t, _)| t == "TickFired")
        .map(|(_, d)| d["trigger"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        fired.iter().filter(|t| *t == "manual").count(),
        4,
        "{fired:?}"
    );
    assert_eq!(
        fired.iter().filter(|t| *t == "backfill").count(),
        2,
        "{fired:?}"
    );
    let (jobs,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM jobs WHERE tags->>'schedule_id' = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(jobs, 6);
}
