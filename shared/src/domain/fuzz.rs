//! Property-based fuzzing of everything that parses client input here: workflow definitions,
//! templates, crontab expressions and schedules, and job inputs (built-in kinds and user kinds'
//! JSON Schemas). docs/security.md, "Hostile input".
//!
//! Properties: nothing panics; work is bounded (templates run under a small fuel budget, so a
//! hanging case shows up as a slow test, never as an endless one); errors are [`FieldError`]s
//! that name a field; what parses and validates round-trips through its serializer.
//!
//! Inputs are both arbitrary (random bytes and strings) and structured-but-mutated (valid
//! shapes with fields swapped for hostile values). 256 cases per property by default;
//! `PROPTEST_CASES=100000 cargo test -p capibara-shared --lib fuzz::` runs a long session.
//! A failure prints a minimal input; add it to the `regressions` tests below once fixed.

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::{json, Value};

use super::{
    cron_expr::CrontabExpr,
    kinds::{self, user::KindDef, TestContext},
    problem::FieldError,
    schedule::CronSpec,
    template::{self, Budget, Templates},
    workflow::WorkflowDef,
};

/// Cases per property: `PROPTEST_CASES`, else 256 (CI runs on 2 cores).
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256),
        // Shrinking a slow case can take long; a few hundred steps find a small one.
        max_shrink_iters: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A fuel budget small enough that the worst template finishes in milliseconds.
const FUZZ_BUDGET: Budget = Budget {
    fuel: 20_000,
    output_bytes: 64 * 1024,
};

fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,40}",
        Just(String::new()),
        Just("\u{0}".to_string()),
        Just("{{ input.x }}".to_string()),
        Just("{{ secrets.K }}".to_string()),
        Just(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
                .to_string()
        ),
        Just("{{ 'x' * 100000000 }}".to_string()),
        Just("a".repeat(5000)),
        Just("ü😀\u{202e}".to_string()),
        Just("../../etc/passwd".to_string()),
    ]
}

fn hostile_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1.5)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1e308)),
    ]
}

/// Any JSON value, nested a few levels, with keys from `keys` half of the time.
fn json_value(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        proptest::sample::select(keys).prop_map(str::to_string),
        "[a-z_]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        hostile_number(),
        hostile_string().prop_map(Value::String),
        proptest::sample::select(keys).prop_map(|k| Value::String(k.to_string())),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Field names and values a workflow definition uses, so mutated definitions get deep.
const WORKFLOW_WORDS: &[&str] = &[
    "name",
    "description",
    "input_schema",
    "steps",
    "output",
    "dangerous",
    "id",
    "kind",
    "input",
    "depends_on",
    "when",
    "retry",
    "on_failure",
    "timeout_s",
    "max_attempts",
    "items",
    "step",
    "duration",
    "until",
    "workflow",
    "workflow_id",
    "version",
    "concurrency",
    "echo",
    "sleep",
    "map",
    "wait",
    "approval",
    "fail",
    "continue",
    "a",
    "b",
    "c",
    "http.request",
    "type",
    "object",
    "properties",
    "required",
    "{{ input.x }}",
    "steps.a.output.x > 1",
    "{{ steps.a.output }}",
    "{{ item }}",
    "1s",
    "P1D",
    "-1s",
];

fn step() -> impl Strategy<Value = Value> {
    (
        proptest::sample::select(&["a", "b", "c", "d", ""][..]),
        proptest::sample::select(
            &[
                "echo", "sleep", "map", "wait", "approval", "workflow", "nope", "fail",
            ][..],
        ),
        json_value(WORKFLOW_WORDS),
        proptest::collection::vec(proptest::sample::select(&["a", "b", "c", "zz"][..]), 0..3),
        proptest::option::of(json_value(WORKFLOW_WORDS)),
    )
        .prop_map(|(id, kind, input, deps, extra)| {
            let mut s = json!({"id": id, "kind": kind, "input": input, "depends_on": deps});
            if let Some(extra) = extra {
                // Some steps get a stray field, a `when`, a retry or an on_failure.
                let k = match &extra {
                    Value::String(_) => "when",
                    Value::Object(_) => "retry",
                    Value::Number(_) => "timeout_s",
                    _ => "on_failure",
                };
                s[k] = extra;
            }
            s
        })
}

fn workflow_value() -> impl Strategy<Value = Value> {
    (
        hostile_string(),
        proptest::collection::vec(step(), 0..6),
        proptest::option::of(json_value(WORKFLOW_WORDS)),
        proptest::option::of(json_value(WORKFLOW_WORDS)),
    )
        .prop_map(|(name, steps, schema, output)| {
            let mut w = json!({"name": name, "steps": steps});
            if let Some(s) = schema {
                w["input_schema"] = s;
            }
            if let Some(o) = output {
                w["output"] = o;
            }
            w
        })
}

/// A validation error must say which field is wrong and why.
fn names_a_field(e: &FieldError) -> Result<(), TestCaseError> {
    prop_assert!(
        !e.message.trim().is_empty(),
        "an error without a message: {e:?}"
    );
    Ok(())
}

/// Parse → validate; what passes must round-trip through JSON and validate again.
fn check_workflow(body: &[u8], yaml: bool) -> Result<(), TestCaseError> {
    let def = match WorkflowDef::parse(body, yaml) {
        Ok(d) => d,
        Err(e) => return names_a_field(&e),
    };
    match def.validate(&TestContext) {
        Ok(()) => {
            let again = WorkflowDef::parse(&serde_json::to_vec(&def).unwrap(), false)
                .expect("a valid definition parses again");
            prop_assert_eq!(&again, &def);
            prop_assert!(again.validate(&TestContext).is_ok());
        }
        Err(e) => {
            names_a_field(&e)?;
            prop_assert!(
                !e.field.is_empty(),
                "a definition error names no field: {e:?}"
            );
        }
    }
    Ok(())
}

fn cron_token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*".to_string()),
        Just("?".to_string()),
        Just("L".to_string()),
        Just("W".to_string()),
        Just("#".to_string()),
        Just("-".to_string()),
        Just(",".to_string()),
        Just("/".to_string()),
        (0u32..70).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        Just("-1".to_string()),
        proptest::sample::select(
            &["MON", "sun", "JAN", "dec", "FOO", "@daily", "@reboot", "@x"][..]
        )
        .prop_map(str::to_string),
    ]
}

fn cron_field() -> impl Strategy<Value = String> {
    proptest::collection::vec(cron_token(), 1..5).prop_map(|t| t.concat())
}

fn cron_expr() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        proptest::collection::vec(cron_field(), 0..8).prop_map(|f| f.join(" ")),
        proptest::collection::vec(cron_field(), 5..=6).prop_map(|f| f.join(" ")),
    ]
}

fn timezone() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(
            &[
                "UTC",
                "Europe/Berlin",
                "America/New_York",
                "Australia/Lord_Howe",
                "Pacific/Chatham",
                "Asia/Kathmandu",
                "America/Sao_Paulo",
                "Etc/GMT+12",
                "Etc/GMT-14",
                "Pacific/Kiritimati",
                "Antarctica/Troll",
                "",
            ][..]
        )
        .prop_map(str::to_string),
        any::<String>(),
    ]
}

/// Instants across the whole storable range (DESIGN: years 1-9999), edges included.
fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    let (lo, hi) = (
        super::storable::min_time().timestamp(),
        super::storable::max_time().timestamp(),
    );
    prop_oneof![
        (lo..=hi).prop_map(|s| Utc.timestamp_opt(s, 0).unwrap()),
        Just(super::storable::min_time()),
        Just(super::storable::max_time()),
        (1_700_000_000i64..1_900_000_000).prop_map(|s| Utc.timestamp_opt(s, 0).unwrap()),
    ]
}

const SCHEMA_WORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "enum",
    "const",
    "$ref",
    "$defs",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
    "uniqueItems",
    "multipleOf",
    "string",
    "integer",
    "object",
    "array",
    "number",
    "boolean",
    "null",
    "#",
    "#/$defs/a",
    "a",
    "^(a+)+$",
    "(?=a)",
    "\\1",
    "[",
    "date-time",
    "email",
    "uri",
    "regex",
];

proptest! {
    #![proptest_config(config())]

    #[test]
    fn workflow_parsing_of_arbitrary_bytes_never_panics(
        body in proptest::collection::vec(any::<u8>(), 0..512),
        yaml in any::<bool>(),
    ) {
        check_workflow(&body, yaml)?;
    }

    #[test]
    fn workflow_parsing_of_arbitrary_text_never_panics(body in any::<String>(), yaml in any::<bool>()) {
        check_workflow(body.as_bytes(), yaml)?;
    }

    #[test]
    fn mutated_workflow_definitions_validate_or_name_the_field(w in workflow_value()) {
        check_workflow(&serde_json::to_vec(&w).unwrap(), false)?;
        // The same value as YAML takes the same path.
        check_workflow(serde_norway::to_string(&w).unwrap().as_bytes(), true)?;
    }

    #[test]
    fn templates_check_and_render_within_their_budget(
        parts in proptest::collection::vec(prop_oneof![
            proptest::sample::select(&[
                "{{", "}}", "{%", "%}", "{#", "#}", " for ", " in ", " endfor ", " if ", " endif ",
                " set ", "range(", "100000", ")", "(", "|", "join", "tojson", "upper", "x", "'",
                "\"", " * ", " ~ ", "loop", "input", ".", "[", "]", "steps", "secrets", "item",
                " is defined", "-", "{{ input.x }}", "namespace(", "recursive", "macro",
                "indent(", "center(", "1000000000", "9e99",
            ][..]).prop_map(str::to_string),
            any::<String>(),
        ], 0..24),
        lenient in any::<bool>(),
    ) {
        let source = parts.concat();
        let t = if lenient { Templates::lenient() } else { Templates::new() }.with_budget(FUZZ_BUDGET);
        let value = json!({"a": source, "b": [source]});
        let ctx = minijinja::Value::from_serialize(json!({
            "input": {"x": [1, 2, 3], "s": "abc"},
            "steps": {"a": {"output": {"x": 2}}},
            "item": "i",
        }));
        let _ = template::check(&t, &value);
        if let Ok(out) = template::render(&t, &value, &ctx) {
            // The output limit holds for every template that renders.
            prop_assert!(serde_json::to_vec(&out).unwrap().len() <= FUZZ_BUDGET.output_bytes);
        }
        let _ = template::check_condition(&t, &source);
        let _ = template::condition(&t, &source, &ctx);
    }

    #[test]
    fn crontab_parsing_never_panics_and_names_the_field(expr in cron_expr(), tz in timezone()) {
        let _ = expr.parse::<CrontabExpr>();
        match CronSpec::parse(&expr, &tz) {
            Ok(spec) => {
                // Parsing again gives the same schedule: the next fire times agree.
                let again = CronSpec::parse(&expr, &tz).unwrap();
                let from = Utc.with_ymd_and_hms(2030, 3, 30, 0, 0, 0).unwrap();
                let a: Vec<_> = spec.after(from).take(3).collect();
                let b: Vec<_> = again.after(from).take(3).collect();
                prop_assert_eq!(&a, &b);
                prop_assert!(a.windows(2).all(|w| w[0] < w[1]), "not ascending: {a:?}");
                prop_assert!(a.iter().all(|t| *t > from));
            }
            Err((field, message)) => {
                prop_assert!(field == "cron" || field == "timezone");
                prop_assert!(!message.is_empty());
            }
        }
    }

    #[test]
    fn cron_fire_times_exist_for_any_instant_in_the_storable_range(
        expr in proptest::sample::select(&[
            "* * * * *", "0 0 29 2 *", "59 23 31 12 *", "0 30 2 * * *", "*/7 */5 L * 1-5",
            "0 0 1 1 *", "30 2 * * 0", "0 0 31 4 *", "0 0 30 2 *",
        ][..]),
        tz in timezone(),
        from in instant(),
    ) {
        let Ok(spec) = CronSpec::parse(expr, &tz) else { return Ok(()) };
        let ticks: Vec<_> = spec.after(from).take(2).collect();
        prop_assert!(ticks.iter().all(|t| *t > from && super::storable::time_ok(*t)));
    }

    #[test]
    fn schedule_windows_and_jitter_never_panic(
        expr in proptest::sample::select(&["* * * * *", "0 0 29 2 *", "0 30 2 * * *", "@yearly"][..]),
        tz in timezone(),
        start in proptest::option::of(instant()),
        end in proptest::option::of(instant()),
        now in instant(),
        jitter_s in 0i64..=3600,
    ) {
        let s = super::schedule::Schedule {
            id: uuid::Uuid::now_v7(),
            namespace: "default".into(),
            name: "s".into(),
            cron: expr.into(),
            timezone: tz,
            target: json!({"kind": "echo", "input": {}}),
            overlap: super::schedule::Overlap::Allow,
            catch_up: super::schedule::CatchUp::All,
            catch_up_window_s: 3600,
            jitter_s,
            start_at: start,
            end_at: end,
            status: "active".into(),
            next_fire_time: Some(now),
            last_fire_time: None,
            last_job_id: None,
            buffered_fire_time: None,
            fired_count: 0,
            skipped_count: 0,
            version: 1,
            created_at: now,
            updated_at: now,
        };
        if let Some(next) = s.next_after(now) {
            prop_assert!(next > now);
            prop_assert!(end.is_none_or(|e| next <= e));
            let j = s.jitter(next);
            prop_assert!(j >= chrono::Duration::zero() && j < chrono::Duration::seconds(jitter_s.max(1)));
        }
        let up = s.upcoming(3);
        prop_assert!(up.windows(2).all(|w| w[0] < w[1]));
        let _ = super::schedule::plan(&s, now, false);
    }

    #[test]
    fn builtin_kind_inputs_are_checked_without_panics(
        kind in proptest::sample::select(kinds::KINDS).prop_map(|k| k.name),
        input in json_value(&[
            "text", "voice", "ms", "url", "method", "headers", "body", "code", "language", "x",
            "model", "messages", "prompt", "items", "format", "speed", "timeout_s", "to",
            "subject", "query", "path", "tools", "progress_ms", "fail",
        ]),
    ) {
        if let Err(e) = kinds::validate_input(kind, &input, &TestContext) {
            names_a_field(&e)?;
            prop_assert!(
                e.field == "kind" || e.field == "input" || e.field.starts_with("input."),
                "{kind}: the error names `{}`, not the input: {e:?}", e.field
            );
        }
    }

    #[test]
    fn user_kind_schemas_and_inputs_never_panic(
        schema in json_value(SCHEMA_WORDS),
        input in json_value(&["a", "b", "items", "x"]),
    ) {
        let def = KindDef { input_schema: Some(schema), ..Default::default() };
        match def.validate() {
            Ok(()) => {
                let again: KindDef = serde_json::from_value(serde_json::to_value(&def).unwrap()).unwrap();
                prop_assert_eq!(&again, &def);
                let kind = super::kinds::user::UserKind::apply(
                    None,
                    uuid::Uuid::nil(),
                    "default",
                    &super::kinds::user::KindEvent::KindRegistered { name: "fuzz.kind".into(), definition: def },
                    Utc::now(),
                )
                .unwrap();
                if let Err(e) = kind.check_input(&input) {
                    names_a_field(&e)?;
                }
            }
            Err(e) => {
                names_a_field(&e)?;
                prop_assert!(e.field == "input_schema", "{e:?}");
            }
        }
    }
}

/// Inputs the fuzzing above found, or that are known hostile shapes; each must keep failing
/// cleanly.
mod regressions {
    use super::*;

    #[test]
    fn a_yaml_alias_bomb_is_refused_not_expanded() {
        let mut yaml =
            String::from("a: &a [\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\"]\n");
        for i in 0..9u8 {
            let (prev, this) = ((b'a' + i) as char, (b'b' + i) as char);
            yaml.push_str(&format!(
                "{this}: &{this} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
            ));
        }
        yaml.push_str("name: x\nsteps: []\n");
        let e = WorkflowDef::parse(yaml.as_bytes(), true).unwrap_err();
        assert!(!e.message.is_empty());
    }

    #[test]
    fn deeply_nested_definitions_are_refused() {
        let deep = "[".repeat(100_000);
        assert!(WorkflowDef::parse(deep.as_bytes(), false).is_err());
        let deep_yaml = "- ".repeat(100_000);
        assert!(WorkflowDef::parse(deep_yaml.as_bytes(), true).is_err());
    }

    #[test]
    fn templates_that_would_loop_or_allocate_without_bound_stop_at_the_budget() {
        let t = Templates::new().with_budget(FUZZ_BUDGET);
        let ctx = minijinja::Value::from_serialize(json!({}));
        for source in [
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "{{ 'x' * 100000000 }}",
            "{{ 'x' * 9999999999999 }}",
            "{{ range(100000) | join(',') }}",
            "{{ '' | center(1000000000) }}",
            "{{ 'a\nb' | indent(1000000000) }}",
            "{% macro m(n) %}{{ m(n) }}{% endmacro %}{{ m(1) }}",
        ] {
            let out = template::render(&t, &json!(source), &ctx);
            if let Ok(v) = &out {
                assert!(
                    serde_json::to_vec(v).unwrap().len() <= FUZZ_BUDGET.output_bytes,
                    "`{source}` rendered past the output limit"
                );
            }
        }
    }

    /// Found by `templates_check_and_render_within_their_budget`: minijinja's expression lexer
    /// panicked ("empty lexer stack") on a condition with `}}` before `{{`.
    #[test]
    fn a_condition_that_closes_its_own_expression_is_an_error_not_a_panic() {
        let t = Templates::new().with_budget(FUZZ_BUDGET);
        let ctx = minijinja::Value::from_serialize(json!({"input": {"s": "}}"}}));
        for expr in ["}}{{", "}}", "a }} {{ b", "x }}{{ y }}", "{{ a }}{{ b }}"] {
            assert!(template::check_condition(&t, expr).is_err(), "{expr}");
            assert!(template::condition(&t, expr, &ctx).is_err(), "{expr}");
        }
        // A `}}` inside a string literal is just text.
        assert!(template::condition(&t, "input.s == '}}'", &ctx).unwrap());
        assert!(template::condition(&t, r#"input.s == "}}""#, &ctx).unwrap());
        let e = WorkflowDef::from_value(json!({"name": "w", "steps": [
            {"id": "a", "kind": "echo", "when": "}}{{"},
        ]}))
        .unwrap()
        .validate(&TestContext)
        .unwrap_err();
        assert_eq!(e.field, "steps[0].when");
    }

    #[test]
    fn cron_edges_parse_or_name_the_field() {
        for expr in [
            "",
            " ",
            "@",
            "@reboot",
            "* * * * * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * 32 * *",
            "* * * 13 *",
            "* * * * 8",
            "*/0 * * * *",
            "5-1 * * * *",
            "18446744073709551615 * * * *",
            "*/18446744073709551615 * * * *",
            "-1 * * * *",
            "1-18446744073709551615 * * * *",
            "L * * * *",
            "* * L W *",
            "1,,2 * * * *",
        ] {
            if let Err((field, _)) = CronSpec::parse(expr, "UTC") {
                assert_eq!(field, "cron", "{expr}");
            }
        }
    }
}
