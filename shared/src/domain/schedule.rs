//! Cron schedules: the `schedule` stream's events, its projection row, and the pure rules that
//! decide which ticks fire, are skipped or wait — given an explicit `now`, so they are tested
//! with any clock.
//!
//! Time rules (documented in docs/scheduler.md): cron fields (the crontab dialect of
//! [`super::cron_expr`]) are local wall-clock times of the schedule's IANA timezone. A local time that does not exist (spring forward) fires once at the
//! instant the clock jumps; a local time that happens twice (fall back) fires once, at its first
//! occurrence.

use std::fmt;

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{
    cron_expr::CrontabExpr,
    event::{DomainEvent, StreamType},
    job::Submission,
};

/// What happens when a tick comes while the previous tick's job still runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Fire anyway.
    #[default]
    Allow,
    /// Skip the tick (`TickSkipped {reason: overlap}`).
    Skip,
    /// Keep one tick and fire it when the previous job ends; further ones are skipped.
    BufferOne,
}

/// What happens to ticks missed while no scheduler ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Skip them all.
    None,
    /// Fire the most recent one only.
    #[default]
    Latest,
    /// Fire every one inside the catch-up window.
    All,
}

/// Where a tick goes.
// Read once per tick from JSON; boxing the job template would buy nothing measurable.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ScheduleTarget {
    /// Submit a job from this (validated) template.
    Job { job: Submission },
    /// Start a run of a workflow (its latest version).
    Workflow {
        workflow_id: Uuid,
        #[serde(default)]
        input: serde_json::Value,
    },
}

/// A parsed cron expression in a timezone.
#[derive(Debug, Clone)]
pub struct CronSpec {
    /// Their union is the expression (two when both day fields are restricted: Vixie's "either").
    schedules: Vec<cron::Schedule>,
    tz: Tz,
}

/// How far the scheduler looks for the next fire time (Feb 29 can be 8 years apart).
const HORIZON_DAYS: i64 = 366 * 9;

impl CronSpec {
    /// `expr`: a crontab expression ([`CrontabExpr`]: 5 fields, 6 with seconds first, or an
    /// alias such as `@daily`). `timezone`: an IANA name. The error names the request field.
    pub fn parse(expr: &str, timezone: &str) -> Result<CronSpec, (&'static str, String)> {
        let tz: Tz = timezone
            .parse()
            .map_err(|_| ("timezone", format!("unknown IANA timezone `{timezone}`")))?;
        let parsed: CrontabExpr = expr.parse().map_err(|e| ("cron", e))?;
        Ok(CronSpec {
            schedules: parsed.cron_schedules(),
            tz,
        })
    }

    /// Fire instants strictly after `after`, in order (see the module docs for DST).
    pub fn after(&self, after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        // Walk the wall-clock timeline: cron on naive local times, then map each to an instant.
        // From the wall-clock time of `after` (a second earlier, so that time itself is a
        // candidate); instants not after `after` (a repeated hour's first pass) are filtered out.
        let local_after = after.with_timezone(&self.tz).naive_local() - Duration::seconds(1);
        let naive_start = Utc.from_utc_datetime(&local_after);
        // Nothing past the last storable time: a schedule near year 9999 simply ends.
        let horizon = (after + Duration::days(HORIZON_DAYS)).min(super::storable::max_time());
        let mut last: Option<DateTime<Utc>> = None;
        merged(
            self.schedules
                .iter()
                .map(|s| s.after(&naive_start))
                .collect(),
        )
        .map(move |fake_utc| self.resolve(fake_utc.naive_utc()))
        .take_while(move |t| *t <= horizon)
        .filter(move |t| {
            let fresh = *t > after && last.is_none_or(|l| *t > l);
            if fresh {
                last = Some(*t);
            }
            fresh
        })
    }

    /// The instant of a local wall-clock time.
    fn resolve(&self, local: NaiveDateTime) -> DateTime<Utc> {
        match self.tz.from_local_datetime(&local) {
            LocalResult::Single(t) => t.with_timezone(&Utc),
            LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc),
            LocalResult::None => {
                // In a gap: the instant the clock jumps, the first whose wall clock is past
                // `local`. UTC offsets lie within ±15 h, so it lies in this window; bisect it.
                // Whole seconds: offsets change on whole seconds.
                let as_utc = local.and_utc().timestamp();
                let (mut before, mut past) = (as_utc - 15 * 3600, as_utc + 15 * 3600);
                let wall = |t: i64| {
                    DateTime::from_timestamp(t, 0)
                        .expect("in range")
                        .with_timezone(&self.tz)
                        .naive_local()
                };
                while past - before > 1 {
                    let mid = before + (past - before) / 2;
                    if wall(mid) > local {
                        past = mid;
                    } else {
                        before = mid;
                    }
                }
                DateTime::from_timestamp(past, 0).expect("in range")
            }
        }
    }
}

/// Several ascending iterators as one ascending iterator, equal items once.
fn merged<I: Iterator<Item = DateTime<Utc>>>(iters: Vec<I>) -> impl Iterator<Item = DateTime<Utc>> {
    let mut iters: Vec<std::iter::Peekable<I>> =
        iters.into_iter().map(Iterator::peekable).collect();
    std::iter::from_fn(move || {
        let next = iters.iter_mut().filter_map(|i| i.peek().copied()).min()?;
        for i in &mut iters {
            if i.peek() == Some(&next) {
                i.next();
            }
        }
        Some(next)
    })
}

/// The `schedule` projection row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Schedule {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub cron: String,
    pub timezone: String,
    #[schema(value_type = Object)]
    pub target: serde_json::Value,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
    /// With `catch_up: all`, missed ticks older than this are skipped.
    pub catch_up_window_s: i64,
    /// Each tick fires up to this many seconds late (spreads load; the same for every replica).
    pub jitter_s: i64,
    pub start_at: Option<DateTime<Utc>>,
    pub end_at: Option<DateTime<Utc>>,
    /// `active`, `paused` or `deleted`.
    pub status: String,
    /// The next tick, nominal (before jitter); none when paused or past `end_at`.
    pub next_fire_time: Option<DateTime<Utc>>,
    pub last_fire_time: Option<DateTime<Utc>>,
    /// Job of the last fired tick (overlap checks).
    pub last_job_id: Option<Uuid>,
    /// A tick held back by `overlap: buffer_one`.
    pub buffered_fire_time: Option<DateTime<Utc>>,
    pub fired_count: i64,
    pub skipped_count: i64,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The settable part of a schedule (what `ScheduleCreated`/`ScheduleUpdated` carry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub target: ScheduleTarget,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
    pub catch_up_window_s: i64,
    pub jitter_s: i64,
    pub start_at: Option<DateTime<Utc>>,
    pub end_at: Option<DateTime<Utc>>,
}

/// Events of the `schedule` stream (catalog names; `TickBuffered` is Capibara's addition for
/// `overlap: buffer_one`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum ScheduleEvent {
    ScheduleCreated(ScheduleSpec),
    ScheduleUpdated(ScheduleSpec),
    SchedulePaused {},
    ScheduleResumed {},
    ScheduleDeleted {},
    TickFired {
        fire_time: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_id: Option<Uuid>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_id: Option<Uuid>,
        /// `schedule`, `catch_up`, `buffered`, `manual` or `backfill`.
        trigger: String,
    },
    TickSkipped {
        fire_time: DateTime<Utc>,
        /// `paused`, `overlap`, `missed` (catch-up policy), `outside_catch_up` (older than the window).
        reason: String,
        /// How many ticks this event stands for (missed ticks are summarised).
        #[serde(default = "one")]
        count: u64,
    },
    TickBuffered {
        fire_time: DateTime<Utc>,
    },
}

fn one() -> u64 {
    1
}

impl DomainEvent for ScheduleEvent {
    const STREAM: StreamType = StreamType::Schedule;

    fn type_name(&self) -> &'static str {
        match self {
            ScheduleEvent::ScheduleCreated(_) => "ScheduleCreated",
            ScheduleEvent::ScheduleUpdated(_) => "ScheduleUpdated",
            ScheduleEvent::SchedulePaused {} => "SchedulePaused",
            ScheduleEvent::ScheduleResumed {} => "ScheduleResumed",
            ScheduleEvent::ScheduleDeleted {} => "ScheduleDeleted",
            ScheduleEvent::TickFired { .. } => "TickFired",
            ScheduleEvent::TickSkipped { .. } => "TickSkipped",
            ScheduleEvent::TickBuffered { .. } => "TickBuffered",
        }
    }
}

impl Schedule {
    /// The job a tick of a schedule with a job target submits: the target's template, tagged
    /// with the schedule and the tick, to run now. None for a workflow target (or a target that
    /// does not read).
    pub fn tick_job(&self, fire_time: DateTime<Utc>) -> Option<super::job::Submission> {
        let ScheduleTarget::Job { job: mut sub } =
            serde_json::from_value::<ScheduleTarget>(self.target.clone()).ok()?
        else {
            return None;
        };
        sub.tags.insert("schedule_id".into(), self.id.to_string());
        sub.tags.insert("fire_time".into(), fire_time.to_rfc3339());
        sub.run_at = None;
        Some(sub)
    }

    /// The parsed cron of this schedule.
    pub fn cron_spec(&self) -> Option<CronSpec> {
        CronSpec::parse(&self.cron, &self.timezone).ok()
    }

    /// The first tick after `t` within `start_at`/`end_at`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let from = match self.start_at {
            Some(s) if s > t => s - Duration::microseconds(1),
            _ => t,
        };
        let next = self.cron_spec()?.after(from).next()?;
        match self.end_at {
            Some(end) if next > end => None,
            _ => Some(next),
        }
    }

    /// The next `n` ticks from `now` (for `GET /v1/schedules/{id}`).
    pub fn upcoming(&self, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut t = match self.next_fire_time {
            Some(t) => t,
            None => return out,
        };
        out.push(t);
        while out.len() < n {
            match self.next_after(t) {
                Some(nt) => {
                    out.push(nt);
                    t = nt;
                }
                None => break,
            }
        }
        out
    }

    fn set_spec(&mut self, s: &ScheduleSpec) {
        self.name = s.name.clone();
        self.cron = s.cron.clone();
        self.timezone = s.timezone.clone();
        self.target = serde_json::to_value(&s.target).unwrap_or_default();
        self.overlap = s.overlap;
        self.catch_up = s.catch_up;
        self.catch_up_window_s = s.catch_up_window_s;
        self.jitter_s = s.jitter_s;
        self.start_at = s.start_at;
        self.end_at = s.end_at;
    }

    /// Fold one event (the first must be `ScheduleCreated`).
    pub fn apply(
        prev: Option<Schedule>,
        id: Uuid,
        namespace: &str,
        ev: &ScheduleEvent,
        at: DateTime<Utc>,
    ) -> Option<Schedule> {
        let mut s = match (prev, ev) {
            (None, ScheduleEvent::ScheduleCreated(spec)) => {
                let mut s = Schedule {
                    id,
                    namespace: namespace.to_string(),
                    name: String::new(),
                    cron: String::new(),
                    timezone: String::new(),
                    target: serde_json::Value::Null,
                    overlap: Overlap::Allow,
                    catch_up: CatchUp::Latest,
                    catch_up_window_s: 0,
                    jitter_s: 0,
                    start_at: None,
                    end_at: None,
                    status: "active".into(),
                    next_fire_time: None,
                    last_fire_time: None,
                    last_job_id: None,
                    buffered_fire_time: None,
                    fired_count: 0,
                    skipped_count: 0,
                    version: 0,
                    created_at: at,
                    updated_at: at,
                };
                s.set_spec(spec);
                s.next_fire_time = s.next_after(at);
                s
            }
            (None, _) => return None,
            (Some(s), _) => s,
        };
        match ev {
            ScheduleEvent::ScheduleCreated(_) => {}
            ScheduleEvent::ScheduleUpdated(spec) => {
                s.set_spec(spec);
                if s.status == "active" {
                    s.next_fire_time = s.next_after(at);
                }
            }
            ScheduleEvent::SchedulePaused {} => {
                s.status = "paused".into();
                s.next_fire_time = None;
                s.buffered_fire_time = None;
            }
            ScheduleEvent::ScheduleResumed {} => {
                s.status = "active".into();
                s.next_fire_time = s.next_after(at);
            }
            ScheduleEvent::ScheduleDeleted {} => {
                s.status = "deleted".into();
                s.next_fire_time = None;
                s.buffered_fire_time = None;
            }
            ScheduleEvent::TickFired {
                fire_time,
                job_id,
                run_id,
                trigger,
            } => {
                s.fired_count += 1;
                // A workflow target's run id stands in for the job (overlap checks look both up).
                s.last_job_id = job_id.or(*run_id).or(s.last_job_id);
                if s.last_fire_time.is_none_or(|l| *fire_time > l) {
                    s.last_fire_time = Some(*fire_time);
                }
                match trigger.as_str() {
                    "manual" | "backfill" => {}
                    "buffered" => s.buffered_fire_time = None,
                    _ => s.next_fire_time = s.next_after(*fire_time),
                }
            }
            ScheduleEvent::TickSkipped {
                fire_time, count, ..
            } => {
                s.skipped_count += *count as i64;
                // A buffered tick that could not start is done with too (else it stays due).
                if s.buffered_fire_time == Some(*fire_time) {
                    s.buffered_fire_time = None;
                }
                if s.next_fire_time.is_some_and(|n| n <= *fire_time) {
                    s.next_fire_time = s.next_after(*fire_time);
                }
            }
            ScheduleEvent::TickBuffered { fire_time } => {
                s.buffered_fire_time = Some(*fire_time);
                s.next_fire_time = s.next_after(*fire_time);
            }
        }
        s.version += 1;
        s.updated_at = at;
        Some(s)
    }

    /// The delay of tick `fire_time` (deterministic, so replicas agree).
    pub fn jitter(&self, fire_time: DateTime<Utc>) -> Duration {
        if self.jitter_s <= 0 {
            return Duration::zero();
        }
        let seed = self.id.as_u128() as u64 ^ fire_time.timestamp_millis() as u64;
        let spread =
            (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) % (self.jitter_s as u64 * 1000);
        Duration::milliseconds(spread as i64)
    }
}

/// What a ticker should do now.
#[derive(Debug, Clone, PartialEq)]
pub enum TickAction {
    /// Fire this tick (`trigger`: schedule, catch_up or buffered).
    Fire {
        fire_time: DateTime<Utc>,
        trigger: &'static str,
    },
    Skip {
        fire_time: DateTime<Utc>,
        reason: &'static str,
        count: u64,
    },
    Buffer {
        fire_time: DateTime<Utc>,
    },
}

/// A tick is "missed" when the scheduler reaches it this much after its time.
pub const MISSED_AFTER_S: i64 = 15;
/// Most ticks handled for one schedule in one pass (the rest in the next).
const MAX_TICKS_PER_PASS: usize = 1000;

/// Decide what to do with the ticks due at `now`, given whether the last fired job is still
/// running. Pure: the ticker applies the actions in order.
pub fn plan(s: &Schedule, now: DateTime<Utc>, previous_running: bool) -> Vec<TickAction> {
    let mut actions = Vec::new();
    if s.status != "active" {
        return actions;
    }
    if let (Some(b), false) = (s.buffered_fire_time, previous_running) {
        actions.push(TickAction::Fire {
            fire_time: b,
            trigger: "buffered",
        });
    }
    let Some(first) = s.next_fire_time else {
        return actions;
    };
    if first + s.jitter(first) > now {
        return actions;
    }
    let mut due = vec![first];
    while due.len() < MAX_TICKS_PER_PASS {
        match s.next_after(*due.last().expect("non-empty")) {
            Some(t) if t <= now => due.push(t),
            _ => break,
        }
    }
    let missed_before = now - Duration::seconds(MISSED_AFTER_S);
    let (missed, fresh): (Vec<_>, Vec<_>) = due.into_iter().partition(|t| *t < missed_before);
    let mut to_fire: Vec<(DateTime<Utc>, &'static str)> = Vec::new();
    if let Some(&last_missed) = missed.last() {
        match s.catch_up {
            CatchUp::None => actions.push(TickAction::Skip {
                fire_time: last_missed,
                reason: "missed",
                count: missed.len() as u64,
            }),
            CatchUp::Latest => {
                if missed.len() > 1 {
                    actions.push(TickAction::Skip {
                        fire_time: missed[missed.len() - 2],
                        reason: "missed",
                        count: missed.len() as u64 - 1,
                    });
                }
                to_fire.push((last_missed, "catch_up"));
            }
            CatchUp::All => {
                let window_start = now - Duration::seconds(s.catch_up_window_s.max(0));
                let (old, inside): (Vec<_>, Vec<_>) =
                    missed.iter().partition(|t| **t < window_start);
                if let Some(&last_old) = old.last() {
                    actions.push(TickAction::Skip {
                        fire_time: last_old,
                        reason: "outside_catch_up",
                        count: old.len() as u64,
                    });
                }
                to_fire.extend(inside.into_iter().map(|t| (t, "catch_up")));
            }
        }
    }
    to_fire.extend(fresh.into_iter().map(|t| (t, "schedule")));
    let mut running = previous_running && !matches!(actions.first(), Some(TickAction::Fire { .. }));
    let mut buffered = s.buffered_fire_time.is_some() && previous_running;
    for (t, trigger) in to_fire {
        if running {
            match s.overlap {
                Overlap::Allow => {}
                Overlap::Skip => {
                    actions.push(TickAction::Skip {
                        fire_time: t,
                        reason: "overlap",
                        count: 1,
                    });
                    continue;
                }
                Overlap::BufferOne => {
                    if buffered {
                        actions.push(TickAction::Skip {
                            fire_time: t,
                            reason: "overlap",
                            count: 1,
                        });
                    } else {
                        actions.push(TickAction::Buffer { fire_time: t });
                        buffered = true;
                    }
                    continue;
                }
            }
        }
        actions.push(TickAction::Fire {
            fire_time: t,
            trigger,
        });
        running = true;
    }
    actions
}

impl fmt::Display for Overlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Overlap::Allow => "allow",
            Overlap::Skip => "skip",
            Overlap::BufferOne => "buffer_one",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn ticks(expr: &str, tz: &str, from: &str, n: usize) -> Vec<String> {
        CronSpec::parse(expr, tz)
            .unwrap()
            .after(utc(from))
            .take(n)
            .map(|t| t.to_rfc3339())
            .collect()
    }

    #[test]
    fn five_six_field_and_macro_expressions_parse() {
        assert!(CronSpec::parse("0 9 * * *", "UTC").is_ok());
        assert!(CronSpec::parse("*/5 0 9 * * *", "UTC").is_ok());
        assert!(CronSpec::parse("@hourly", "UTC").is_ok());
        assert_eq!(CronSpec::parse("0 9 * *", "UTC").unwrap_err().0, "cron");
        assert_eq!(CronSpec::parse("0 99 * * *", "UTC").unwrap_err().0, "cron");
        let (field, message) = CronSpec::parse("0 9 L * *", "UTC").unwrap_err();
        assert_eq!(field, "cron");
        assert!(message.starts_with("day-of-month field `L`"), "{message}");
        assert_eq!(
            CronSpec::parse("0 9 * * *", "Mars/Base").unwrap_err().0,
            "timezone"
        );
        assert_eq!(
            ticks("@hourly", "UTC", "2026-01-01T10:20:00Z", 2),
            ["2026-01-01T11:00:00+00:00", "2026-01-01T12:00:00+00:00"]
        );
    }

    #[test]
    fn a_nonexistent_local_time_fires_once_when_the_clock_jumps() {
        // Europe/Berlin springs forward on 2026-03-29 at 02:00 → 03:00 (01:00 UTC).
        assert_eq!(
            ticks("30 2 * * *", "Europe/Berlin", "2026-03-27T12:00:00Z", 4),
            [
                "2026-03-28T01:30:00+00:00", // 02:30 CET
                "2026-03-29T01:00:00+00:00", // no 02:30 that day: at the jump (03:00 CEST)
                "2026-03-30T00:30:00+00:00", // 02:30 CEST
                "2026-03-31T00:30:00+00:00",
            ]
        );
    }

    #[test]
    fn a_repeated_local_time_fires_once_at_its_first_occurrence() {
        // Europe/Berlin falls back on 2026-10-25 at 03:00 CEST → 02:00 CET: 02:30 happens twice.
        assert_eq!(
            ticks("30 2 * * *", "Europe/Berlin", "2026-10-23T12:00:00Z", 3),
            [
                "2026-10-24T00:30:00+00:00",
                "2026-10-25T00:30:00+00:00", // 02:30 CEST, the first one; not again at 02:30 CET
                "2026-10-26T01:30:00+00:00",
            ]
        );
    }

    #[test]
    fn month_ends_and_leap_days_are_respected() {
        assert_eq!(
            ticks("0 0 31 * *", "UTC", "2027-01-15T00:00:00Z", 3),
            [
                "2027-01-31T00:00:00+00:00",
                "2027-03-31T00:00:00+00:00",
                "2027-05-31T00:00:00+00:00"
            ]
        );
        assert_eq!(
            ticks("0 12 29 2 *", "UTC", "2026-01-01T00:00:00Z", 2),
            ["2028-02-29T12:00:00+00:00", "2032-02-29T12:00:00+00:00"]
        );
        // Day 30 skips February.
        assert_eq!(
            ticks("0 0 30 * *", "UTC", "2027-01-31T00:00:00Z", 1),
            ["2027-03-30T00:00:00+00:00"]
        );
    }

    fn schedule(expr: &str, catch_up: CatchUp, overlap: Overlap, created: &str) -> Schedule {
        let spec = ScheduleSpec {
            name: "t".into(),
            cron: expr.into(),
            timezone: "UTC".into(),
            target: ScheduleTarget::Workflow {
                workflow_id: Uuid::nil(),
                input: serde_json::Value::Null,
            },
            overlap,
            catch_up,
            catch_up_window_s: 1800,
            jitter_s: 0,
            start_at: None,
            end_at: None,
        };
        Schedule::apply(
            None,
            Uuid::now_v7(),
            "default",
            &ScheduleEvent::ScheduleCreated(spec),
            utc(created),
        )
        .unwrap()
    }

    /// A buffered tick whose start fails (the workflow is gone) is skipped once and is then no
    /// longer due; it used to stay buffered, and every pass failed it again.
    #[test]
    fn a_buffered_tick_that_cannot_start_is_skipped_once() {
        let s = schedule(
            "* * * * *",
            CatchUp::Latest,
            Overlap::BufferOne,
            "2026-05-01T10:00:30Z",
        );
        let buffered = utc("2026-05-01T10:01:00Z");
        let s = Schedule::apply(
            Some(s),
            Uuid::nil(),
            "default",
            &ScheduleEvent::TickBuffered {
                fire_time: buffered,
            },
            buffered,
        )
        .unwrap();
        let now = utc("2026-05-01T10:01:30Z");
        assert_eq!(
            plan(&s, now, false),
            [TickAction::Fire {
                fire_time: buffered,
                trigger: "buffered"
            }]
        );
        let skipped = ScheduleEvent::TickSkipped {
            fire_time: buffered,
            reason: "target_unavailable".into(),
            count: 1,
        };
        let s = Schedule::apply(Some(s), Uuid::nil(), "default", &skipped, now).unwrap();
        assert_eq!(s.buffered_fire_time, None);
        assert!(plan(&s, now, false).is_empty());
    }

    #[test]
    fn an_hour_down_catches_up_per_policy() {
        // Every minute, created at 10:00:30; the scheduler comes back at 11:00:30.
        let now = utc("2026-05-01T11:00:30Z");
        let s = schedule(
            "* * * * *",
            CatchUp::None,
            Overlap::Allow,
            "2026-05-01T10:00:30Z",
        );
        assert_eq!(
            plan(&s, now, false),
            [TickAction::Skip {
                fire_time: utc("2026-05-01T11:00:00Z"),
                reason: "missed",
                count: 60
            }]
        );
        let s = schedule(
            "* * * * *",
            CatchUp::Latest,
            Overlap::Allow,
            "2026-05-01T10:00:30Z",
        );
        assert_eq!(
            plan(&s, now, false),
            [
                TickAction::Skip {
                    fire_time: utc("2026-05-01T10:59:00Z"),
                    reason: "missed",
                    count: 59
                },
                TickAction::Fire {
                    fire_time: utc("2026-05-01T11:00:00Z"),
                    trigger: "catch_up"
                },
            ]
        );
        let s = schedule(
            "* * * * *",
            CatchUp::All,
            Overlap::Allow,
            "2026-05-01T10:00:30Z",
        );
        let actions = plan(&s, now, false);
        assert_eq!(
            actions[0],
            TickAction::Skip {
                fire_time: utc("2026-05-01T10:30:00Z"),
                reason: "outside_catch_up",
                count: 30
            }
        );
        let fired: Vec<_> = actions
            .iter()
            .filter(|a| matches!(a, TickAction::Fire { .. }))
            .collect();
        assert_eq!(fired.len(), 30, "the 30 ticks inside the 30-minute window");
    }

    #[test]
    fn overlap_policies_decide_while_the_previous_job_runs() {
        let now = utc("2026-05-01T10:01:00.100Z");
        let s = schedule(
            "* * * * *",
            CatchUp::Latest,
            Overlap::Skip,
            "2026-05-01T10:00:30Z",
        );
        assert_eq!(
            plan(&s, now, true),
            [TickAction::Skip {
                fire_time: utc("2026-05-01T10:01:00Z"),
                reason: "overlap",
                count: 1
            }]
        );
        assert_eq!(
            plan(&s, now, false),
            [TickAction::Fire {
                fire_time: utc("2026-05-01T10:01:00Z"),
                trigger: "schedule"
            }]
        );
        let s = schedule(
            "* * * * *",
            CatchUp::Latest,
            Overlap::BufferOne,
            "2026-05-01T10:00:30Z",
        );
        assert_eq!(
            plan(&s, now, true),
            [TickAction::Buffer {
                fire_time: utc("2026-05-01T10:01:00Z")
            }]
        );
        let s = schedule(
            "* * * * *",
            CatchUp::Latest,
            Overlap::Allow,
            "2026-05-01T10:00:30Z",
        );
        assert_eq!(
            plan(&s, now, true),
            [TickAction::Fire {
                fire_time: utc("2026-05-01T10:01:00Z"),
                trigger: "schedule"
            }]
        );
        // Nothing is due before the tick's time.
        assert!(plan(&s, utc("2026-05-01T10:00:59Z"), false).is_empty());
    }

    #[test]
    fn ticks_fold_into_the_next_fire_time() {
        let s = schedule(
            "0 * * * *",
            CatchUp::Latest,
            Overlap::Allow,
            "2026-05-01T10:20:00Z",
        );
        assert_eq!(s.next_fire_time, Some(utc("2026-05-01T11:00:00Z")));
        let fired = ScheduleEvent::TickFired {
            fire_time: utc("2026-05-01T11:00:00Z"),
            job_id: Some(Uuid::nil()),
            run_id: None,
            trigger: "schedule".into(),
        };
        let s = Schedule::apply(
            Some(s),
            Uuid::nil(),
            "default",
            &fired,
            utc("2026-05-01T11:00:00.2Z"),
        )
        .unwrap();
        assert_eq!(s.next_fire_time, Some(utc("2026-05-01T12:00:00Z")));
        assert_eq!(s.upcoming(3).len(), 3);
        let paused = Schedule::apply(
            Some(s),
            Uuid::nil(),
            "default",
            &ScheduleEvent::SchedulePaused {},
            utc("2026-05-01T11:10:00Z"),
        )
        .unwrap();
        assert_eq!(paused.next_fire_time, None);
    }
}
