//! Templates over JSON values (minijinja), shared by trigger inputs and workflow steps.
//!
//! Every string of a JSON value may be a template. A string that is exactly one `{{ expression }}`
//! evaluates to the expression's value with its JSON type kept (a list stays a list); any other
//! string containing `{{` or `{%` renders to a string. Other values are copied.

use std::sync::OnceLock;

use serde_json::Value;

/// What one template may spend: minijinja fuel (instructions) per template string, and the
/// bytes the whole rendered value may take. A template over the budget is an error of the run
/// or hook call it belongs to; nothing else waits for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Instructions one template string may execute (`CAPIBARA_TEMPLATE_FUEL`).
    pub fuel: u64,
    /// Bytes the rendered value may take, as JSON (`CAPIBARA_TEMPLATE_OUTPUT_LIMIT_BYTES`).
    pub output_bytes: usize,
}

impl Budget {
    /// 100 000 instructions (a long template uses a few hundred) and 1 MiB of output.
    pub const DEFAULT: Budget = Budget {
        fuel: 100_000,
        output_bytes: 1024 * 1024,
    };
}

impl Default for Budget {
    fn default() -> Self {
        Budget::DEFAULT
    }
}

static BUDGET: OnceLock<Budget> = OnceLock::new();

/// Set this process's budget (once, at startup, from the configuration); later calls are
/// ignored. Until then [`Budget::DEFAULT`] applies.
pub fn set_budget(budget: Budget) {
    let _ = BUDGET.set(budget);
}

/// This process's budget.
pub fn budget() -> Budget {
    BUDGET.get().copied().unwrap_or_default()
}

/// A minijinja environment with a [`Budget`]: the only way to render or evaluate a template.
pub struct Templates {
    env: minijinja::Environment<'static>,
    budget: Budget,
}

impl Templates {
    /// Workflow templates: undefined attributes are errors only when used as something
    /// (`chainable` lets `steps.a.output.x` be tested with `is defined`).
    pub fn new() -> Templates {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
        Templates::budgeted(env, budget())
    }

    /// Trigger input templates: minijinja's default undefined behavior (an attribute of an
    /// undefined value is an error).
    pub fn lenient() -> Templates {
        Templates::budgeted(minijinja::Environment::new(), budget())
    }

    /// The same templates under another budget.
    pub fn with_budget(self, budget: Budget) -> Templates {
        Templates::budgeted(self.env, budget)
    }

    fn budgeted(mut env: minijinja::Environment<'static>, budget: Budget) -> Templates {
        env.set_fuel(Some(budget.fuel));
        Templates { env, budget }
    }
}

impl Default for Templates {
    fn default() -> Self {
        Templates::new()
    }
}

/// A writer that refuses to grow past a limit (minijinja then stops rendering).
struct Bounded {
    out: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + buf.len() > self.limit {
            return Err(std::io::Error::other("over the output limit"));
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A template's error as a message naming the template (its first 200 characters).
fn error_message(source: &str, e: &minijinja::Error, t: &Templates) -> String {
    let shown: String = source.chars().take(200).collect();
    let ellipsis = if shown.len() < source.len() {
        "…"
    } else {
        ""
    };
    let what = match e.kind() {
        minijinja::ErrorKind::OutOfFuel => format!(
            "the template exceeded its budget of {} instructions (CAPIBARA_TEMPLATE_FUEL)",
            t.budget.fuel
        ),
        minijinja::ErrorKind::WriteFailure => over_output(t),
        _ => e.to_string(),
    };
    format!("`{shown}{ellipsis}`: {what}")
}

fn over_output(t: &Templates) -> String {
    format!(
        "the rendered value exceeds {} bytes (CAPIBARA_TEMPLATE_OUTPUT_LIMIT_BYTES)",
        t.budget.output_bytes
    )
}

/// What `{{ secrets.NAME }}` renders to: a reference the worker resolves right before the
/// executor runs, so secret values never enter job inputs, events or run state.
pub fn secret_reference(name: &str) -> String {
    format!("${{secret:{name}}}")
}

/// The `secrets` template variable: any attribute is a reference to the secret of that name.
///
/// It remembers which names a template asked for: the workflow engine stores them on the step's
/// job ([`crate::domain::job::Submission::secret_refs`]) and the worker resolves those and no
/// other reference, so a `${secret:NAME}` string that reached the input any other way (a run's
/// input, a client's job) stays a literal string.
#[derive(Debug, Default)]
pub struct SecretRefs {
    used: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl SecretRefs {
    /// The names templates rendered over this object referred to.
    pub fn names(&self) -> std::collections::BTreeSet<String> {
        self.used.lock().expect("secret refs lock").clone()
    }
}

impl minijinja::value::Object for SecretRefs {
    fn get_value(self: &std::sync::Arc<Self>, key: &minijinja::Value) -> Option<minijinja::Value> {
        let name = key.as_str()?;
        self.used
            .lock()
            .expect("secret refs lock")
            .insert(name.to_string());
        Some(minijinja::Value::from(secret_reference(name)))
    }
}

/// The expression of a string that is exactly one `{{ … }}`.
fn single_expression(s: &str) -> Option<&str> {
    s.trim()
        .strip_prefix("{{")
        .and_then(|r| r.strip_suffix("}}"))
        .filter(|e| !e.contains("{{") && !e.contains("}}"))
        .map(str::trim)
}

/// Whether a value holds a template anywhere.
pub fn is_templated(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains("{{") || s.contains("{%"),
        Value::Array(items) => items.iter().any(is_templated),
        Value::Object(map) => map.values().any(is_templated),
        _ => false,
    }
}

/// Render every string of `v` over `ctx`, within the budget of `t`: the output cap and the
/// fuel are for the whole value, not per string, so a value of many templates gets no more.
pub fn render(t: &Templates, v: &Value, ctx: &minijinja::Value) -> Result<Value, String> {
    let mut left = Left {
        bytes: t.budget.output_bytes,
        fuel: t.budget.fuel,
    };
    render_within(t, v, ctx, &mut left)
}

/// What is left of a render's budget.
struct Left {
    bytes: usize,
    fuel: u64,
}

fn render_within(
    t: &Templates,
    v: &Value,
    ctx: &minijinja::Value,
    left: &mut Left,
) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) => {
            if let Some(expr) = single_expression(s) {
                let out = t
                    .env
                    .compile_expression(expr)
                    .and_then(|c| c.eval(ctx))
                    .map_err(|e| error_message(s, &e, t))?;
                if out.is_undefined() {
                    Value::Null
                } else {
                    // Measured while it is written, so a huge value stops at the limit.
                    let mut w = Bounded {
                        out: Vec::new(),
                        limit: left.bytes,
                    };
                    serde_json::to_writer(&mut w, &out).map_err(|e| {
                        if e.is_io() {
                            format!("`{s}`: {}", over_output(t))
                        } else {
                            format!("`{s}`: {e}")
                        }
                    })?;
                    left.bytes -= w.out.len();
                    serde_json::from_slice(&w.out).map_err(|e| format!("`{s}`: {e}"))?
                }
            } else if s.contains("{{") || s.contains("{%") {
                // This template may use what the earlier ones of the value left of the fuel.
                let mut env = t.env.clone();
                env.set_fuel(Some(left.fuel));
                let template = env
                    .template_from_str(s)
                    .map_err(|e| error_message(s, &e, t))?;
                let mut w = Bounded {
                    out: Vec::new(),
                    limit: left.bytes,
                };
                let captured = template
                    .render_captured_to(ctx, &mut w)
                    .map_err(|e| error_message(s, &e, t))?;
                let used = captured.state().fuel_levels().map_or(0, |(used, _)| used);
                left.fuel = left.fuel.saturating_sub(used);
                drop(captured);
                left.bytes -= w.out.len();
                Value::String(String::from_utf8(w.out).map_err(|e| format!("`{s}`: {e}"))?)
            } else {
                v.clone()
            }
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| render_within(t, i, ctx, left))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_within(t, v, ctx, left)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// Whether any template in `v` reads the top-level variable `name` (e.g. `secrets`). Templates
/// that do not parse read nothing (they are refused elsewhere).
pub fn uses_variable(t: &Templates, v: &Value, name: &str) -> bool {
    let env = &t.env;
    match v {
        Value::String(s) => {
            if let Some(expr) = single_expression(s) {
                env.compile_expression(expr)
                    .is_ok_and(|e| e.undeclared_variables(false).contains(name))
            } else if s.contains("{{") || s.contains("{%") {
                env.template_from_str(s)
                    .is_ok_and(|t| t.undeclared_variables(false).contains(name))
            } else {
                false
            }
        }
        Value::Array(items) => items.iter().any(|i| uses_variable(t, i, name)),
        Value::Object(map) => map.values().any(|i| uses_variable(t, i, name)),
        _ => false,
    }
}

/// Check the syntax of every template in `v`; nothing is evaluated.
pub fn check(t: &Templates, v: &Value) -> Result<(), String> {
    match v {
        Value::String(s) => {
            if let Some(expr) = single_expression(s) {
                t.env
                    .compile_expression(expr)
                    .map(|_| ())
                    .map_err(|e| error_message(s, &e, t))
            } else if s.contains("{{") || s.contains("{%") {
                t.env
                    .template_from_str(s)
                    .map(|_| ())
                    .map_err(|e| error_message(s, &e, t))
            } else {
                Ok(())
            }
        }
        Value::Array(items) => items.iter().try_for_each(|i| check(t, i)),
        Value::Object(map) => map.values().try_for_each(|i| check(t, i)),
        _ => Ok(()),
    }
}

/// Evaluate a condition (a bare expression, or one wrapped in `{{ }}`) to a truth value, within
/// the budget of `t`.
pub fn condition(t: &Templates, expr: &str, ctx: &minijinja::Value) -> Result<bool, String> {
    let e = single_expression(expr).unwrap_or(expr.trim());
    bare_expression(e)
        .and_then(|e| t.env.compile_expression(e))
        .and_then(|c| c.eval(ctx))
        .map(|v| v.is_true())
        .map_err(|err| error_message(expr, &err, t))
}

/// Check a condition's syntax.
pub fn check_condition(t: &Templates, expr: &str) -> Result<(), String> {
    let e = single_expression(expr).unwrap_or(expr.trim());
    if e.is_empty() {
        return Err("is empty".into());
    }
    bare_expression(e)
        .and_then(|e| t.env.compile_expression(e))
        .map(|_| ())
        .map_err(|err| error_message(expr, &err, t))
}

/// A condition as minijinja's expression compiler may take it: with no `}}` outside a string
/// literal. minijinja (2.24) lexes an expression as the inside of `{{ }}`, so a `}}` ends that
/// state and a following `{{` finds no state left: `}}{{` panicked ("empty lexer stack") in the
/// API's definition check and in the scheduler's run of the step.
fn bare_expression(e: &str) -> Result<&str, minijinja::Error> {
    let mut quote: Option<char> = None;
    let mut chars = e.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(_), '\\') => {
                chars.next();
            }
            (Some(q), c) if c == q => quote = None,
            (None, '\'' | '"') => quote = Some(c),
            (None, '}') if chars.peek() == Some(&'}') => {
                return Err(minijinja::Error::new(
                    minijinja::ErrorKind::SyntaxError,
                    "unexpected `}}` in an expression",
                ));
            }
            _ => {}
        }
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn single_expressions_keep_json_types() {
        let env = Templates::new();
        let ctx = minijinja::Value::from_serialize(json!({"input": {"xs": [1, 2], "n": 3}}));
        let out = render(
            &env,
            &json!({"list": "{{ input.xs }}", "n": "{{ input.n + 1 }}", "s": "n={{ input.n }}"}),
            &ctx,
        )
        .unwrap();
        assert_eq!(out, json!({"list": [1, 2], "n": 4, "s": "n=3"}));
    }

    #[test]
    fn missing_attributes_render_null_and_conditions_see_them() {
        let env = Templates::new();
        let ctx = minijinja::Value::from_serialize(json!({"steps": {}}));
        assert_eq!(
            render(&env, &json!("{{ steps.a.output.x }}"), &ctx).unwrap(),
            Value::Null
        );
        assert!(!condition(&env, "steps.a.output.x is defined", &ctx).unwrap());
        assert!(condition(&env, "{{ 2 > 1 }}", &ctx).unwrap());
    }

    #[test]
    fn variables_read_by_templates_are_found() {
        let t = Templates::new();
        let uses = |v: Value| uses_variable(&t, &v, "secrets");
        assert!(uses(json!({"a": ["Bearer {{ secrets.TOKEN }}"]})));
        assert!(uses(json!("{{ secrets['TOKEN'] }}")));
        assert!(uses(json!("{% if x %}{{ secrets.A }}{% endif %}")));
        assert!(!uses(
            json!({"a": "{{ input.secrets }}", "b": "secrets", "c": "{{ steps.secrets.output }}"})
        ));
    }

    #[test]
    fn syntax_errors_are_reported() {
        let env = Templates::new();
        assert!(check(&env, &json!({"a": "{{ input. }}"})).is_err());
        assert!(check(&env, &json!({"a": "{% if %}"})).is_err());
        assert!(check_condition(&env, "1 +").is_err());
        assert!(check_condition(&env, "").is_err());
        assert!(check(&env, &json!({"a": "plain", "b": "{{ x | length }}"})).is_ok());
    }

    /// The 64-byte nested loop that froze the API for 80 s stops at the fuel limit at once.
    #[test]
    fn a_nested_loop_runs_out_of_fuel_quickly() {
        let t = Templates::new();
        let ctx = minijinja::Value::from_serialize(json!({}));
        let looped =
            "{% for a in range(10000) %}{% for b in range(10000) %}x{% endfor %}{% endfor %}";
        let started = std::time::Instant::now();
        let err = render(&t, &json!({"a": looped}), &ctx).unwrap_err();
        assert!(err.contains("budget of 100000 instructions"), "{err}");
        assert!(err.contains("CAPIBARA_TEMPLATE_FUEL"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn the_fuel_is_for_the_whole_value_not_each_template() {
        let t = Templates::new().with_budget(Budget {
            fuel: 10_000,
            output_bytes: 1_000_000,
        });
        let ctx = minijinja::Value::from_serialize(json!({}));
        // One loop fits the budget; forty of them in one value do not.
        let one = "{% for a in range(300) %}x{% endfor %}";
        assert!(render(&t, &json!({"a": one}), &ctx).is_ok());
        let many: serde_json::Map<String, Value> =
            (0..40).map(|i| (format!("k{i}"), json!(one))).collect();
        let err = render(&t, &Value::Object(many), &ctx).unwrap_err();
        assert!(err.contains("CAPIBARA_TEMPLATE_FUEL"), "{err}");
    }

    #[test]
    fn the_output_is_capped_while_it_is_written() {
        let t = Templates::new().with_budget(Budget {
            fuel: 1_000_000,
            output_bytes: 1000,
        });
        let ctx = minijinja::Value::from_serialize(json!({}));
        // Text: 2000 bytes from a loop.
        let err = render(&t, &json!("{% for a in range(2000) %}x{% endfor %}"), &ctx).unwrap_err();
        assert!(err.contains("exceeds 1000 bytes"), "{err}");
        // A single expression's value.
        let err = render(&t, &json!("{{ 'x' * 5000 }}"), &ctx).unwrap_err();
        assert!(err.contains("exceeds 1000 bytes"), "{err}");
        // The limit is for the whole value, not each string.
        let six = json!([
            "{{ 'x' * 300 }}",
            "{{ 'x' * 300 }}",
            "{{ 'x' * 300 }}",
            "{{ 'x' * 300 }}"
        ]);
        assert!(render(&t, &six, &ctx).is_err());
        let ok = render(&t, &json!(["{{ 'x' * 300 }}", "{{ 'y' * 300 }}"]), &ctx).unwrap();
        assert_eq!(ok[0].as_str().unwrap().len(), 300);
    }

    #[test]
    fn a_budget_exceeded_in_a_condition_is_an_error() {
        let t = Templates::lenient().with_budget(Budget {
            fuel: 10,
            output_bytes: 1000,
        });
        // Variables, so that the compiler cannot fold the sum into a constant.
        let ctx = minijinja::Value::from_serialize(json!({"x": 1}));
        let long = "x + x + x + x + x + x + x + x + x + x + x + x + x > 2";
        let err = condition(&t, long, &ctx).unwrap_err();
        assert!(err.contains("budget of 10 instructions"), "{err}");
        assert!(condition(&t, "1 > 0", &ctx).unwrap());
    }
}
