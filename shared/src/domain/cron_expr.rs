//! The crontab dialect of schedules: what a `cron` string means (docs/scheduler.md, "Cron
//! dialect").
//!
//! Expressions are read the way Vixie cron (cronie, the POSIX crontab) reads them: day of week
//! 0–7 with 0 and 7 both Sunday and 1 Monday, three-letter names, `*`, ranges, steps and lists,
//! the `@daily`-style aliases, and Vixie's day rule: when both day fields are restricted (neither
//! starts with `*`), a day matches if EITHER matches. A sixth field in front holds seconds.
//! Extensions from other dialects (`L`, `W`, `#`) are refused with a message naming the field.
//!
//! The `cron` crate does the calendar walk; it numbers weekdays 1–7 from Sunday and always ANDs
//! the day fields, so this module hands it explicit value lists — and two schedules whose union
//! is the expression when the day rule is "either". Tests: shared/tests/cron_dialect.rs and, against
//! an independent implementation, shared/tests/cron_reference.rs.

use std::str::FromStr;

/// A parsed crontab expression: the set of values of every field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrontabExpr {
    /// Bit `n` set: value `n` is in the field.
    seconds: u64,
    minutes: u64,
    hours: u64,
    days_of_month: u64,
    months: u64,
    /// Bits 0–6, Sunday = 0 (a `7` is folded into 0).
    days_of_week: u64,
    /// How the two day fields combine.
    days: DayRule,
}

/// Vixie cron's rule for the day-of-month and day-of-week fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DayRule {
    /// One of the fields starts with `*`: a day must match both (so only the other one counts,
    /// unless it is a stepped `*/n`).
    Both,
    /// Neither starts with `*`: a day matches if either field matches.
    Either,
}

/// One field's name (for messages), its bounds and its names.
struct Field {
    name: &'static str,
    low: u32,
    high: u32,
    /// Three-letter names of the values from `low` on.
    names: &'static [&'static str],
}

const SECOND: Field = Field {
    name: "second",
    low: 0,
    high: 59,
    names: &[],
};
const MINUTE: Field = Field {
    name: "minute",
    low: 0,
    high: 59,
    names: &[],
};
const HOUR: Field = Field {
    name: "hour",
    low: 0,
    high: 23,
    names: &[],
};
const DAY_OF_MONTH: Field = Field {
    name: "day-of-month",
    low: 1,
    high: 31,
    names: &[],
};
const MONTH: Field = Field {
    name: "month",
    low: 1,
    high: 12,
    names: &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ],
};
const DAY_OF_WEEK: Field = Field {
    name: "day-of-week",
    low: 0,
    high: 7,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
};

/// The aliases and the five fields each stands for.
const ALIASES: &[(&str, &str)] = &[
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
    ("@monthly", "0 0 1 * *"),
    ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@hourly", "0 * * * *"),
];

impl FromStr for CrontabExpr {
    type Err = String;

    /// Parse a crontab expression; the error says which field is wrong and why.
    fn from_str(expr: &str) -> Result<CrontabExpr, String> {
        let trimmed = expr.trim();
        if trimmed.starts_with('@') {
            if trimmed.eq_ignore_ascii_case("@reboot") {
                return Err(
                    "`@reboot` runs when a cron daemon starts; a schedule has no such \
                            moment (use a fixed time)"
                        .into(),
                );
            }
            return match ALIASES
                .iter()
                .find(|(alias, _)| alias.eq_ignore_ascii_case(trimmed))
            {
                Some((_, fields)) => fields.parse(),
                None => Err(format!(
                    "unknown alias `{trimmed}` (known: @yearly, @annually, @monthly, @weekly, \
                     @daily, @midnight, @hourly)"
                )),
            };
        }
        let parts: Vec<&str> = trimmed.split_whitespace().collect();
        let (seconds, rest) = match parts.len() {
            5 => (1, &parts[..]),
            6 => (parse_field(&SECOND, parts[0])?.0, &parts[1..]),
            n => {
                return Err(format!(
                    "expected 5 fields (minute hour day-of-month month day-of-week), 6 with \
                     seconds first, or an alias such as @daily; got {n}"
                ))
            }
        };
        let (minutes, _) = parse_field(&MINUTE, rest[0])?;
        let (hours, _) = parse_field(&HOUR, rest[1])?;
        let (days_of_month, dom_star) = parse_field(&DAY_OF_MONTH, rest[2])?;
        let (months, _) = parse_field(&MONTH, rest[3])?;
        let (mut days_of_week, dow_star) = parse_field(&DAY_OF_WEEK, rest[4])?;
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week & !(1 << 7)) | 1;
        }
        Ok(CrontabExpr {
            seconds,
            minutes,
            hours,
            days_of_month,
            months,
            days_of_week,
            days: if dom_star || dow_star {
                DayRule::Both
            } else {
                DayRule::Either
            },
        })
    }
}

impl CrontabExpr {
    /// How the day fields combine.
    pub fn day_rule(&self) -> DayRule {
        self.days
    }

    /// `cron` crate schedules (seconds first, weekdays 1–7 from Sunday) whose union of fire
    /// times is this expression's: one, or two when the day rule is "either".
    pub(crate) fn cron_schedules(&self) -> Vec<cron::Schedule> {
        let time = format!(
            "{} {} {}",
            list(self.seconds, &SECOND, 0),
            list(self.minutes, &MINUTE, 0),
            list(self.hours, &HOUR, 0)
        );
        let months = list(self.months, &MONTH, 0);
        let dom = list(self.days_of_month, &DAY_OF_MONTH, 0);
        // Sunday..Saturday as 0..6 here, 1..7 there.
        let dow = list(self.days_of_week, &DAY_OF_WEEK, 1);
        let exprs = match self.days {
            DayRule::Both => vec![format!("{time} {dom} {months} {dow}")],
            DayRule::Either => vec![
                format!("{time} {dom} {months} *"),
                format!("{time} * {months} {dow}"),
            ],
        };
        exprs
            .iter()
            .map(|e| cron::Schedule::from_str(e).expect("generated cron expressions parse"))
            .collect()
    }
}

/// The `cron` crate's spelling of a value set: `*` when full, else the values (plus `shift`).
fn list(bits: u64, field: &Field, shift: u32) -> String {
    // Day of week: 0..6 only (7 was folded into 0).
    let high = if field.name == DAY_OF_WEEK.name {
        6
    } else {
        field.high
    };
    let values: Vec<u32> = (field.low..=high)
        .filter(|v| bits & (1 << v) != 0)
        .collect();
    if values.len() as u32 == high - field.low + 1 {
        return "*".into();
    }
    values
        .iter()
        .map(|v| (v + shift).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A field's value set and whether it starts with `*` (Vixie's test for the day rule).
fn parse_field(field: &Field, text: &str) -> Result<(u64, bool), String> {
    let fail = |problem: String| format!("{} field `{text}`: {problem}", field.name);
    let day_field = field.name == DAY_OF_MONTH.name || field.name == DAY_OF_WEEK.name;
    let mut bits = 0u64;
    for item in text.split(',') {
        bits |= parse_item(field, item, day_field).map_err(fail)?;
    }
    Ok((bits, text.starts_with('*') || text.starts_with('?')))
}

/// One list item: `*`, `n`, `a-b`, each optionally `/step`.
fn parse_item(field: &Field, item: &str, day_field: bool) -> Result<u64, String> {
    if item.is_empty() {
        return Err("an empty list item".into());
    }
    refuse_extensions(item, day_field)?;
    let (base, step) = match item.split_once('/') {
        Some((base, step)) => {
            let step: u32 = number(step).ok_or_else(|| format!("step `{step}` is not a number"))?;
            if step == 0 {
                return Err("a step of 0".into());
            }
            (base, Some(step))
        }
        None => (item, None),
    };
    let (from, to) = if base == "*" || base == "?" {
        (field.low, field.high)
    } else if let Some((a, b)) = base.split_once('-') {
        let (a, b) = match (value(field, a)?, value(field, b)?) {
            // `fri-sun`: Sunday named as the end of a range is 7.
            (a, 0) if a > 0 && b.eq_ignore_ascii_case("sun") => (a, 7),
            (a, b) => (a, b),
        };
        if a > b {
            return Err(format!("the range `{base}` runs backwards"));
        }
        (a, b)
    } else {
        let a = value(field, base)?;
        // `n/step` (an extension: Vixie refuses it) runs from n to the field's end.
        (a, if step.is_some() { field.high } else { a })
    };
    let mut bits = 0u64;
    let mut v = from;
    while v <= to {
        bits |= 1 << v;
        v += step.unwrap_or(1);
    }
    Ok(bits)
}

/// Other dialects' special characters, refused with what they would mean.
fn refuse_extensions(item: &str, day_field: bool) -> Result<(), String> {
    let upper = item.to_ascii_uppercase();
    let digits_then = |suffix: char| {
        upper.len() > 1
            && upper.ends_with(suffix)
            && upper[..upper.len() - 1].bytes().all(|b| b.is_ascii_digit())
    };
    if item.contains('#') {
        return Err("`#` (the nth weekday of the month) is not supported".into());
    }
    if upper == "L" || upper == "LW" || upper.starts_with("L-") || digits_then('L') {
        return Err("`L` (the last day or weekday of the month) is not supported".into());
    }
    if digits_then('W') {
        return Err("`W` (the weekday nearest a day) is not supported".into());
    }
    if item.contains('?') && !day_field {
        return Err("`?` is only accepted in the day-of-month and day-of-week fields".into());
    }
    if item.contains('?') && item != "?" {
        return Err("`?` stands alone (it means `*`)".into());
    }
    Ok(())
}

/// A value: a number in the field's bounds, or one of its three-letter names.
fn value(field: &Field, text: &str) -> Result<u32, String> {
    if let Some(i) = field
        .names
        .iter()
        .position(|n| n.eq_ignore_ascii_case(text))
    {
        return Ok(field.low + i as u32);
    }
    let Some(v) = number(text) else {
        return Err(if field.names.is_empty() {
            format!("`{text}` is not a number")
        } else {
            format!(
                "`{text}` is neither a number nor a name ({})",
                field.names.join(", ")
            )
        });
    };
    if !(field.low..=field.high).contains(&v) {
        return Err(format!("{v} is out of range {}-{}", field.low, field.high));
    }
    Ok(v)
}

/// Decimal digits only (no sign, no spaces).
fn number(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}
