//! Templates over JSON values (minijinja), shared by trigger inputs and workflow steps.
//!
//! Every string of a JSON value may be a template. A string that is exactly one `{{ expression }}`
//! evaluates to the expression's value with its JSON type kept (a list stays a list); any other
//! string containing `{{` or `{%` renders to a string. Other values are copied.

use serde_json::Value;

/// A minijinja environment with Capibara's settings: undefined attributes are errors only when
/// used as something (`chainable` lets `steps.a.output.x` be tested with `is defined`).
pub fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
    env
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

/// Render every string of `v` over `ctx`.
pub fn render(
    env: &minijinja::Environment<'_>,
    v: &Value,
    ctx: &minijinja::Value,
) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) => {
            if let Some(expr) = single_expression(s) {
                let out = env
                    .compile_expression(expr)
                    .and_then(|c| c.eval(ctx))
                    .map_err(|e| format!("`{s}`: {e}"))?;
                if out.is_undefined() {
                    Value::Null
                } else {
                    serde_json::to_value(&out).map_err(|e| format!("`{s}`: {e}"))?
                }
            } else if s.contains("{{") || s.contains("{%") {
                Value::String(env.render_str(s, ctx).map_err(|e| format!("`{s}`: {e}"))?)
            } else {
                v.clone()
            }
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| render(env, i, ctx))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render(env, v, ctx)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// Whether any template in `v` reads the top-level variable `name` (e.g. `secrets`). Templates
/// that do not parse read nothing (they are refused elsewhere).
pub fn uses_variable(env: &minijinja::Environment<'_>, v: &Value, name: &str) -> bool {
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
        Value::Array(items) => items.iter().any(|i| uses_variable(env, i, name)),
        Value::Object(map) => map.values().any(|i| uses_variable(env, i, name)),
        _ => false,
    }
}

/// Check the syntax of every template in `v`; nothing is evaluated.
pub fn check(env: &minijinja::Environment<'_>, v: &Value) -> Result<(), String> {
    match v {
        Value::String(s) => {
            if let Some(expr) = single_expression(s) {
                env.compile_expression(expr)
                    .map(|_| ())
                    .map_err(|e| format!("`{s}`: {e}"))
            } else if s.contains("{{") || s.contains("{%") {
                env.template_from_str(s)
                    .map(|_| ())
                    .map_err(|e| format!("`{s}`: {e}"))
            } else {
                Ok(())
            }
        }
        Value::Array(items) => items.iter().try_for_each(|i| check(env, i)),
        Value::Object(map) => map.values().try_for_each(|i| check(env, i)),
        _ => Ok(()),
    }
}

/// Evaluate a condition (a bare expression, or one wrapped in `{{ }}`) to a truth value.
pub fn condition(
    env: &minijinja::Environment<'_>,
    expr: &str,
    ctx: &minijinja::Value,
) -> Result<bool, String> {
    let e = single_expression(expr).unwrap_or(expr.trim());
    env.compile_expression(e)
        .and_then(|c| c.eval(ctx))
        .map(|v| v.is_true())
        .map_err(|err| format!("`{expr}`: {err}"))
}

/// Check a condition's syntax.
pub fn check_condition(env: &minijinja::Environment<'_>, expr: &str) -> Result<(), String> {
    let e = single_expression(expr).unwrap_or(expr.trim());
    if e.is_empty() {
        return Err("is empty".into());
    }
    env.compile_expression(e)
        .map(|_| ())
        .map_err(|err| format!("`{expr}`: {err}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn single_expressions_keep_json_types() {
        let env = environment();
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
        let env = environment();
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
        let env = environment();
        let uses = |v: Value| uses_variable(&env, &v, "secrets");
        assert!(uses(json!({"a": ["Bearer {{ secrets.TOKEN }}"]})));
        assert!(uses(json!("{{ secrets['TOKEN'] }}")));
        assert!(uses(json!("{% if x %}{{ secrets.A }}{% endif %}")));
        assert!(!uses(
            json!({"a": "{{ input.secrets }}", "b": "secrets", "c": "{{ steps.secrets.output }}"})
        ));
    }

    #[test]
    fn syntax_errors_are_reported() {
        let env = environment();
        assert!(check(&env, &json!({"a": "{{ input. }}"})).is_err());
        assert!(check(&env, &json!({"a": "{% if %}"})).is_err());
        assert!(check_condition(&env, "1 +").is_err());
        assert!(check_condition(&env, "").is_err());
        assert!(check(&env, &json!({"a": "plain", "b": "{{ x | length }}"})).is_ok());
    }
}
