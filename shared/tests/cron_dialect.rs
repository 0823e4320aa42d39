//! The crontab dialect at the domain level: day-of-week numbering, the day rule, aliases,
//! refused extensions, and the gap rule to the second (docs/scheduler.md, "Cron dialect").

use capibara_shared::domain::{
    cron_expr::{CrontabExpr, DayRule},
    schedule::CronSpec,
};
use chrono::{DateTime, Datelike, Utc};

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

/// The weekdays (0 = Sunday) a daily-time expression fires on in one week.
fn days_of_week(expr: &str) -> Vec<u32> {
    let mut days: Vec<u32> = CronSpec::parse(expr, "UTC")
        .unwrap()
        .after(utc("2026-05-02T23:59:59Z")) // the week from Sunday 2026-05-03
        .take_while(|t| *t < utc("2026-05-10T00:00:00Z"))
        .map(|t| t.weekday().num_days_from_sunday())
        .collect();
    days.dedup();
    days
}

#[test]
fn day_of_week_counts_from_sunday_0_and_7_is_sunday_too() {
    assert_eq!(days_of_week("0 9 * * 1-5"), [1, 2, 3, 4, 5]);
    assert_eq!(days_of_week("0 9 * * 7"), [0]);
    assert_eq!(days_of_week("0 9 * * 0"), [0]);
    assert_eq!(days_of_week("0 9 * * 5-7"), [0, 5, 6]);
    assert_eq!(days_of_week("0 9 * * */2"), [0, 2, 4, 6]);
    assert_eq!(days_of_week("0 9 * * MON-fri/2"), [1, 3, 5]);
    assert_eq!(days_of_week("0 9 * * sun,sat"), [0, 6]);
    assert_eq!(days_of_week("0 9 * * fri-sun"), [0, 5, 6]);
    assert_eq!(days_of_week("0 9 * * sun-tue"), [0, 1, 2]);
}

#[test]
fn day_of_week_is_numbered_as_in_crontab() {
    // 2026-05-01 is a Friday.
    let from = "2026-05-01T10:00:00Z";
    assert_eq!(
        ticks("0 9 * * 1-5", "UTC", from, 5),
        [
            "2026-05-04T09:00:00+00:00", // Monday
            "2026-05-05T09:00:00+00:00",
            "2026-05-06T09:00:00+00:00",
            "2026-05-07T09:00:00+00:00",
            "2026-05-08T09:00:00+00:00", // Friday
        ],
        "weekdays are Monday to Friday"
    );
    assert_eq!(
        ticks("0 9 * * 1", "UTC", from, 2),
        ["2026-05-04T09:00:00+00:00", "2026-05-11T09:00:00+00:00"],
        "1 is Monday"
    );
    assert_eq!(
        ticks("0 9 * * 7", "UTC", from, 2),
        ["2026-05-03T09:00:00+00:00", "2026-05-10T09:00:00+00:00"],
        "7 is Sunday"
    );
    assert_eq!(
        ticks("0 12 * * 0", "UTC", from, 2),
        ["2026-05-03T12:00:00+00:00", "2026-05-10T12:00:00+00:00"],
        "0 is Sunday"
    );
    assert_eq!(
        ticks("0 9 * * sat-sun", "UTC", from, 2),
        ["2026-05-02T09:00:00+00:00", "2026-05-03T09:00:00+00:00"]
    );
    assert_eq!(
        ticks("30 0 9 * * 1-5", "UTC", from, 1),
        ["2026-05-04T09:00:30+00:00"],
        "six fields number days the same way"
    );
    assert_eq!(
        ticks("@weekly", "Europe/Berlin", from, 1),
        ["2026-05-02T22:00:00+00:00"], // Sunday 00:00 CEST
    );
}

#[test]
fn both_day_fields_restricted_match_either_day() {
    // Crontab: the 13th of every month AND every Friday, not only Fridays the 13th.
    assert_eq!(
        ticks("0 0 13 * 5", "UTC", "2026-05-01T10:00:00Z", 4),
        [
            "2026-05-08T00:00:00+00:00", // Friday
            "2026-05-13T00:00:00+00:00", // Wednesday the 13th
            "2026-05-15T00:00:00+00:00",
            "2026-05-22T00:00:00+00:00",
        ]
    );
    // A day field starting with `*` (here `*/2`, the odd days) makes the rule "both".
    assert_eq!(
        ticks("0 0 */2 * mon", "UTC", "2026-05-01T10:00:00Z", 3),
        [
            "2026-05-11T00:00:00+00:00",
            "2026-05-25T00:00:00+00:00",
            "2026-06-01T00:00:00+00:00",
        ]
    );
}

#[test]
fn a_gap_fires_at_the_jump_to_the_second() {
    // Six fields: 02:30:15 does not exist on 2026-03-29 in Berlin; the clock jumps at 01:00 UTC.
    assert_eq!(
        ticks("15 30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", 2),
        ["2026-03-29T01:00:00+00:00", "2026-03-30T00:30:15+00:00"]
    );
}

#[test]
fn the_day_rule_follows_vixie() {
    let rule = |e: &str| e.parse::<CrontabExpr>().unwrap().day_rule();
    assert_eq!(rule("0 0 1 * 1"), DayRule::Either);
    assert_eq!(rule("0 0 * * 1"), DayRule::Both);
    assert_eq!(
        rule("0 0 */2 * 1"),
        DayRule::Both,
        "a field starting with * is a star"
    );
    assert_eq!(rule("0 0 1-31 * 1"), DayRule::Either);
    assert_eq!(rule("0 0 ? * 1"), DayRule::Both);
}

#[test]
fn aliases_expand_to_their_fields() {
    for (alias, fields) in [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
    ] {
        assert_eq!(
            alias.parse::<CrontabExpr>().unwrap(),
            fields.parse::<CrontabExpr>().unwrap()
        );
    }
    assert_eq!(
        "@DAILY".parse::<CrontabExpr>().unwrap(),
        "0 0 * * *".parse::<CrontabExpr>().unwrap()
    );
}

#[test]
fn bad_expressions_name_the_field_and_the_problem() {
    for (expr, message) in [
        ("0 0 L * *", "day-of-month field `L`: `L`"),
        ("0 0 15W * *", "day-of-month field `15W`: `W`"),
        ("0 0 * * 5L", "day-of-week field `5L`: `L`"),
        ("0 0 * * 1#2", "day-of-week field `1#2`: `#`"),
        ("0 ? * * *", "hour field `?`: `?` is only accepted"),
        ("60 * * * *", "minute field `60`: 60 is out of range 0-59"),
        ("0 0 * * 8", "day-of-week field `8`: 8 is out of range 0-7"),
        (
            "0 0 0 * *",
            "day-of-month field `0`: 0 is out of range 1-31",
        ),
        ("0 0 * 13 *", "month field `13`"),
        (
            "0 0 * * monday",
            "day-of-week field `monday`: `monday` is neither",
        ),
        ("0 0 * * 5-1", "the range `5-1` runs backwards"),
        ("*/0 * * * *", "minute field `*/0`: a step of 0"),
        ("1,,2 * * * *", "an empty list item"),
        ("0 0 * * * * *", "expected 5 fields"),
        ("@reboot", "`@reboot`"),
        ("@fortnightly", "unknown alias `@fortnightly`"),
    ] {
        let err = expr.parse::<CrontabExpr>().unwrap_err();
        assert!(err.contains(message), "{expr}: {err}");
    }
}
