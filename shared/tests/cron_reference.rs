//! Next fire times of schedules against an independent cron implementation, the `croner` crate,
//! over 1,200 generated crontab expressions in five timezones (DST transition days included).
//!
//! Croner reads Vixie crontab too (0 and 7 are Sunday, names, ranges, steps, lists, aliases, the
//! "either" day rule). Where the two differ by design, the comparison is restricted, and says so:
//!
//! - **The day rule.** Vixie cron ANDs the day fields when either one *starts with* `*` (so
//!   `*/2` in day-of-month with a weekday means "odd days that are Mondays") and ORs them
//!   otherwise; croner treats only a bare `*` as a wildcard. The test decides from the raw
//!   text, as Vixie does, and passes croner its own switch for the two modes (`dom_and_dow`).
//! - **`@midnight`**, unknown to croner, is given to it as `@daily` (crontab(5): the same).
//! - **`n/step`** (from n to the field's end) is an extension both accept: croner in its
//!   `sloppy_ranges` mode.
//! - **DST.** Croner follows Vixie: a fixed-time job (one second, minute and hour) fires at the
//!   jump in a gap and once, at the first pass, in a repeated hour — as Capibara does, so those
//!   are compared everywhere. An interval job (a `*`, step, range or list in those fields) runs
//!   on croner's wall clock: it skips times in a gap and fires in both passes of a repeated hour,
//!   where Capibara fires once at the jump and once at the first pass (docs/scheduler.md, "Time").
//!   For those, fire times in a repeated hour or at the instant of a jump are left out on both
//!   sides, and everything else is compared.

use capibara_shared::domain::schedule::CronSpec;
use chrono::{DateTime, Duration, LocalResult, NaiveDate, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use croner::{parser::CronParser, Cron, JobType};

const EXPRESSIONS: usize = 1200;
/// Fire times compared from each start instant.
const FIRES: usize = 8;
/// Capibara looks nine years ahead; compare what both find within eight.
const HORIZON_DAYS: i64 = 8 * 365;
const TIMEZONES: [&str; 5] = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe", // DST shifts by 30 minutes
    "Pacific/Chatham",     // UTC+12:45 / +13:45
];

/// SplitMix64: a fixed, seeded sequence whatever the `rand` version.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high`.
    fn range(&mut self, low: u32, high: u32) -> u32 {
        low + (self.next() % u64::from(high - low + 1)) as u32
    }

    fn chance(&mut self, percent: u32) -> bool {
        self.range(1, 100) <= percent
    }
}

struct FieldGen {
    low: u32,
    high: u32,
    names: &'static [&'static str],
    /// Values drawn more often (hours around the DST changes).
    hot: Option<(u32, u32)>,
    day: bool,
}

const SECOND: FieldGen = FieldGen {
    low: 0,
    high: 59,
    names: &[],
    hot: None,
    day: false,
};
const MINUTE: FieldGen = SECOND;
const HOUR: FieldGen = FieldGen {
    low: 0,
    high: 23,
    names: &[],
    hot: Some((0, 4)),
    day: false,
};
const DAY_OF_MONTH: FieldGen = FieldGen {
    low: 1,
    high: 31,
    names: &[],
    hot: Some((25, 31)),
    day: true,
};
const MONTH: FieldGen = FieldGen {
    low: 1,
    high: 12,
    names: &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ],
    hot: None,
    day: false,
};
const DAY_OF_WEEK: FieldGen = FieldGen {
    low: 0,
    high: 7,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
    hot: None,
    day: true,
};

impl FieldGen {
    fn value(&self, rng: &mut Rng) -> u32 {
        match self.hot {
            Some((a, b)) if rng.chance(40) => rng.range(a, b),
            _ => rng.range(self.low, self.high),
        }
    }

    /// A value, sometimes spelled as its name. Sunday is `sun` as 0 only; as the end of a
    /// range after another day (`fri-sun`) it is 7.
    fn spell(&self, v: u32, range_start: Option<u32>, rng: &mut Rng) -> String {
        let name = match (self.names.len(), v, range_start) {
            (0, ..) => None,
            (7, 7, Some(a)) if a > 0 => Some(self.names[0]),
            (7, 7, _) | (7, 0, Some(_)) => None,
            (_, v, _) => Some(self.names[(v - self.low) as usize]),
        };
        match name {
            Some(name) if rng.chance(30) => {
                if rng.chance(50) {
                    name.to_uppercase()
                } else {
                    name.to_string()
                }
            }
            _ => v.to_string(),
        }
    }

    /// `a-b` with a <= b.
    fn range(&self, rng: &mut Rng) -> (u32, u32, String) {
        let (a, b) = (self.value(rng), self.value(rng));
        let (a, b) = (a.min(b), a.max(b));
        let text = format!(
            "{}-{}",
            self.spell(a, None, rng),
            self.spell(b, Some(a), rng)
        );
        (a, b, text)
    }

    fn item(&self, rng: &mut Rng) -> String {
        let step = |rng: &mut Rng, span: u32| rng.range(1, span.max(1) + 1);
        match rng.range(0, 9) {
            0..=2 => {
                let v = self.value(rng);
                self.spell(v, None, rng)
            }
            3 | 4 => self.range(rng).2,
            5 | 6 => format!("*/{}", step(rng, (self.high - self.low) / 2)),
            7 | 8 => {
                let (a, b, text) = self.range(rng);
                format!("{text}/{}", step(rng, (b - a) / 2 + 1))
            }
            _ => format!("{}/{}", self.value(rng), step(rng, self.high - self.low)),
        }
    }

    fn field(&self, rng: &mut Rng) -> String {
        if rng.chance(if self.day { 45 } else { 20 }) {
            return if self.day && rng.chance(15) { "?" } else { "*" }.into();
        }
        let n = if rng.chance(70) { 1 } else { rng.range(2, 3) };
        (0..n).map(|_| self.item(rng)).collect::<Vec<_>>().join(",")
    }
}

fn expression(rng: &mut Rng) -> String {
    if rng.chance(3) {
        let aliases = [
            "@yearly",
            "@annually",
            "@monthly",
            "@weekly",
            "@daily",
            "@midnight",
            "@hourly",
        ];
        return aliases[rng.range(0, 6) as usize].into();
    }
    // A quarter are fixed-time (one second, minute and hour), compared on DST days in full.
    let fixed_time = rng.chance(25);
    let time = |f: &FieldGen, rng: &mut Rng| {
        if fixed_time {
            f.value(rng).to_string()
        } else {
            f.field(rng)
        }
    };
    let mut fields = vec![
        time(&MINUTE, rng),
        time(&HOUR, rng),
        DAY_OF_MONTH.field(rng),
        MONTH.field(rng),
        DAY_OF_WEEK.field(rng),
    ];
    if rng.chance(30) {
        fields.insert(0, time(&SECOND, rng));
    }
    fields.join(" ")
}

/// Vixie cron's rule, from the text: the day fields are ANDed when either starts with `*`.
fn vixie_ands_the_days(expr: &str) -> bool {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    if fields.len() < 5 {
        return true; // an alias: at most one day field is restricted
    }
    let (dom, dow) = (fields[fields.len() - 3], fields[fields.len() - 1]);
    [dom, dow]
        .iter()
        .any(|f| f.starts_with('*') || f.starts_with('?'))
}

fn reference(expr: &str) -> Cron {
    // Croner lacks `@midnight`, which crontab(5) defines as `@daily`.
    let expr = if expr == "@midnight" { "@daily" } else { expr };
    CronParser::builder()
        .dom_and_dow(vixie_ands_the_days(expr))
        .sloppy_ranges(true)
        .build()
        .parse(expr)
        .unwrap_or_else(|e| panic!("croner refuses `{expr}`: {e}"))
}

/// The instants in `year` when `tz`'s UTC offset changes, each with the offset change in
/// seconds (positive: the clock jumps forward).
fn transitions(tz: Tz, year: i32) -> Vec<(DateTime<Utc>, i32)> {
    let offset = |t: DateTime<Utc>| {
        tz.offset_from_utc_datetime(&t.naive_utc())
            .fix()
            .local_minus_utc()
    };
    let mut out = Vec::new();
    let mut t = Utc.with_ymd_and_hms(year, 1, 1, 0, 0, 0).unwrap();
    let end = Utc.with_ymd_and_hms(year + 1, 1, 1, 0, 0, 0).unwrap();
    while t < end {
        let next = t + Duration::hours(6);
        if offset(t) != offset(next) {
            // Whole seconds: offsets change on whole seconds.
            let at = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
            let (mut a, mut b) = (t.timestamp(), next.timestamp());
            while b - a > 1 {
                let mid = a + (b - a) / 2;
                if offset(at(mid)) == offset(t) {
                    a = mid;
                } else {
                    b = mid;
                }
            }
            out.push((at(b), offset(at(b)) - offset(at(a))));
        }
        t = next;
    }
    out
}

/// Whether `t`'s wall-clock time in `tz` happens twice.
fn in_repeated_hour(tz: Tz, t: DateTime<Utc>) -> bool {
    let local = t.with_timezone(&tz).naive_local();
    matches!(tz.from_local_datetime(&local), LocalResult::Ambiguous(..))
}

/// Local midnight of `t`'s day in `tz` (or the first instant of that day).
fn local_day_start(tz: Tz, t: DateTime<Utc>) -> DateTime<Utc> {
    let day = t.with_timezone(&tz).date_naive();
    (0..24 * 60)
        .find_map(|m| {
            tz.from_local_datetime(&(day.and_hms_opt(0, 0, 0).unwrap() + Duration::minutes(m)))
                .earliest()
        })
        .unwrap()
        .with_timezone(&Utc)
}

fn capibara_fires(expr: &str, tz: &str, start: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let end = start + Duration::days(HORIZON_DAYS);
    CronSpec::parse(expr, tz)
        .unwrap_or_else(|e| panic!("`{expr}` refused: {e:?}"))
        .after(start)
        .take_while(|t| *t <= end)
        .take(FIRES)
        .collect()
}

fn reference_fires(cron: &Cron, tz: Tz, start: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let end = start + Duration::days(HORIZON_DAYS);
    let mut out = Vec::new();
    let mut t = start.with_timezone(&tz);
    while out.len() < FIRES {
        match cron.find_next_occurrence(&t, false) {
            Ok(next) if next.with_timezone(&Utc) <= end => {
                out.push(next.with_timezone(&Utc));
                t = next;
            }
            _ => break,
        }
    }
    out
}

/// A timezone's clock changes: when, and the offset after (seconds).
type Transitions = Vec<(DateTime<Utc>, i32)>;

#[test]
fn next_fire_times_match_croner() {
    let mut rng = Rng(0x00C0_FFEE_CA9B_A2A1);
    let zones: Vec<(Tz, Transitions)> = TIMEZONES
        .iter()
        .map(|name| {
            let tz: Tz = name.parse().unwrap();
            let all = (2026..=2030).flat_map(|y| transitions(tz, y)).collect();
            (tz, all)
        })
        .collect();
    let (mut compared, mut dst_starts, mut or_rule, mut fixed) = (0usize, 0usize, 0usize, 0usize);
    for _ in 0..EXPRESSIONS {
        let expr = expression(&mut rng);
        let cron = reference(&expr);
        let fixed_time = cron.determine_job_type() == JobType::FixedTime;
        fixed += usize::from(fixed_time);
        or_rule += usize::from(!vixie_ands_the_days(&expr));
        for (tz, jumps) in &zones {
            let tz = *tz;
            // A random instant in 2026–2030, and the local start of a day the clock moves
            // forward and of one it moves back (random ones in UTC).
            let random = |rng: &mut Rng| {
                Utc.from_utc_datetime(
                    &NaiveDate::from_ymd_opt(2026, 1, 1)
                        .unwrap()
                        .and_hms_opt(0, 0, 0)
                        .unwrap(),
                ) + Duration::seconds(rng.range(0, 5 * 365 * 86_400) as i64)
            };
            let mut starts = vec![random(&mut rng)];
            for forward in [true, false] {
                let of_kind: Vec<_> = jumps.iter().filter(|(_, d)| (*d > 0) == forward).collect();
                if of_kind.is_empty() {
                    starts.push(random(&mut rng));
                } else {
                    let (at, _) = of_kind[rng.range(0, of_kind.len() as u32 - 1) as usize];
                    starts.push(local_day_start(tz, *at));
                    dst_starts += 1;
                }
            }
            for start in starts {
                // From inside a repeated hour, which pass a search is on is a matter of
                // definition; start instants are kept out of them.
                if in_repeated_hour(tz, start) {
                    continue;
                }
                let ours = capibara_fires(&expr, tz.name(), start);
                let theirs = reference_fires(&cron, tz, start);
                let (ours, theirs) = if fixed_time {
                    (ours, theirs)
                } else {
                    let is_jump = |t: &DateTime<Utc>| jumps.iter().any(|(at, d)| *d > 0 && at == t);
                    let keep = |v: Vec<DateTime<Utc>>| -> Vec<DateTime<Utc>> {
                        v.into_iter()
                            .filter(|t| !in_repeated_hour(tz, *t) && !is_jump(t))
                            .collect()
                    };
                    // Each side found FIRES times; compare up to the earlier of their last ones.
                    let until = match (ours.last(), theirs.last()) {
                        (Some(a), Some(b)) if ours.len() == FIRES && theirs.len() == FIRES => {
                            *a.min(b)
                        }
                        _ => start + Duration::days(HORIZON_DAYS),
                    };
                    let cut = |v: Vec<DateTime<Utc>>| -> Vec<DateTime<Utc>> {
                        keep(v).into_iter().filter(|t| *t <= until).collect()
                    };
                    (cut(ours), cut(theirs))
                };
                assert_eq!(
                    ours, theirs,
                    "`{expr}` in {tz} after {start}: Capibara (left) and croner (right) differ"
                );
                compared += ours.len();
            }
        }
    }
    eprintln!(
        "{EXPRESSIONS} expressions ({fixed} fixed-time, {or_rule} with the either-day rule), \
         {dst_starts} starts on DST days, {compared} fire times compared"
    );
    assert!(
        compared > EXPRESSIONS * TIMEZONES.len() * FIRES,
        "too few fire times compared"
    );
    assert!(
        or_rule > 50 && fixed > 50,
        "the generator covers both day rules and job types"
    );
}
