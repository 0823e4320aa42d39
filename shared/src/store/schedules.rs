//! The `schedules` projection and [`schedule_append`].

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::{Append, Effect, StoreError};
use crate::domain::{
    event::EventMetadata,
    schedule::{Schedule, ScheduleEvent},
};

/// Upsert of whole rows from a JSON array of [`Schedule`]s.
pub const UPSERT_SCHEDULES: &str = "
INSERT INTO schedules SELECT * FROM jsonb_populate_recordset(NULL::schedules, $1)
ON CONFLICT (id) DO UPDATE SET
    name = EXCLUDED.name, cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, target = EXCLUDED.target,
    overlap = EXCLUDED.overlap, catch_up = EXCLUDED.catch_up, catch_up_window_s = EXCLUDED.catch_up_window_s,
    jitter_s = EXCLUDED.jitter_s, start_at = EXCLUDED.start_at, end_at = EXCLUDED.end_at, status = EXCLUDED.status,
    next_fire_time = EXCLUDED.next_fire_time, last_fire_time = EXCLUDED.last_fire_time,
    last_job_id = EXCLUDED.last_job_id, buffered_fire_time = EXCLUDED.buffered_fire_time,
    fired_count = EXCLUDED.fired_count, skipped_count = EXCLUDED.skipped_count, version = EXCLUDED.version,
    updated_at = EXCLUDED.updated_at";

/// Apply `events` to `prev` (or create from `ScheduleCreated`) and build the append, with one
/// `schedule_ticks` row per fired tick (unique per schedule and fire time).
pub fn schedule_append(
    prev: Option<&Schedule>,
    id: Uuid,
    namespace: &str,
    events: &[ScheduleEvent],
    metadata: EventMetadata,
    at: DateTime<Utc>,
) -> Option<(Schedule, Append)> {
    let mut state = prev.cloned();
    let mut ticks = Vec::new();
    for e in events {
        state = Some(Schedule::apply(state, id, namespace, e, at)?);
        if let ScheduleEvent::TickFired {
            fire_time, job_id, ..
        } = e
        {
            ticks.push((*fire_time, *job_id));
        }
    }
    let new = state?;
    let mut effects = vec![Effect::UpsertSchedule(Box::new(new.clone()))];
    if !ticks.is_empty() {
        effects.push(Effect::InsertTicks {
            schedule_id: id,
            ticks,
        });
    }
    let append = Append::of(
        id,
        prev.map(|p| p.version),
        events,
        EventMetadata {
            namespace: namespace.to_string(),
            ..metadata
        },
        at,
        effects,
    );
    Some((new, append))
}

fn decode(v: Value) -> Result<Schedule, StoreError> {
    serde_json::from_value(v)
        .map_err(|e| StoreError::Internal(format!("schedules row does not decode: {e}")))
}

pub async fn get(pool: &PgPool, namespace: &str, id: Uuid) -> Result<Option<Schedule>, StoreError> {
    let row: Option<(Value,)> =
        sqlx::query_as("SELECT to_jsonb(s) FROM schedules s WHERE id = $1 AND namespace = $2 AND status <> 'deleted'")
            .bind(id)
            .bind(namespace)
            .fetch_optional(pool)
            .await?;
    row.map(|(v,)| decode(v)).transpose()
}

pub async fn list(pool: &PgPool, namespace: &str) -> Result<Vec<Schedule>, StoreError> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT to_jsonb(s) FROM schedules s WHERE namespace = $1 AND status <> 'deleted' ORDER BY id LIMIT 1000",
    )
    .bind(namespace)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(v,)| decode(v)).collect()
}

/// Active schedules with a tick due by `now` (jitter is applied by the planner) or a buffered tick,
/// except those in `except` (the ticker's schedules the store refuses).
pub async fn due(
    pool: &PgPool,
    now: DateTime<Utc>,
    limit: i64,
    except: &[Uuid],
) -> Result<Vec<Schedule>, StoreError> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT to_jsonb(s) FROM schedules s
         WHERE status = 'active' AND (next_fire_time <= $1 OR buffered_fire_time IS NOT NULL)
         AND NOT (id = ANY($3))
         ORDER BY next_fire_time LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .bind(except)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|(v,)| decode(v)).collect()
}

/// The fire times already recorded for a schedule within a range (backfill skips them).
pub async fn fired_between(
    pool: &PgPool,
    schedule_id: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<DateTime<Utc>>, StoreError> {
    let rows: Vec<(DateTime<Utc>,)> = sqlx::query_as(
        "SELECT fire_time FROM schedule_ticks WHERE schedule_id = $1 AND fire_time BETWEEN $2 AND $3",
    )
    .bind(schedule_id)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(t,)| t).collect())
}
