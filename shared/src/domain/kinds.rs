//! Job kinds Capibara accepts, their default queues, and input validation at submission.
//!
//! Inputs are checked here, in the API, so a broken input is a 422 for the client instead of a
//! failure discovered later on a worker.

use serde_json::Value;

use super::FieldError;

/// A job kind the platform can run.
#[derive(Debug, Clone, Copy)]
pub struct KindSpec {
    pub name: &'static str,
    pub default_queue: &'static str,
    pub description: &'static str,
    /// Created by Capibara itself; clients cannot submit it.
    pub internal: bool,
    validate: fn(&Value) -> Result<(), FieldError>,
}

impl KindSpec {
    /// Check an input for this kind; errors name the field under `input`.
    pub fn validate_input(&self, input: &Value) -> Result<(), FieldError> {
        (self.validate)(input).map_err(|e| e.under("input"))
    }
}

/// Kinds available in this build. Executors for further kinds (`tts.render`, `code.run`, …)
/// register here when they land.
pub const KINDS: &[KindSpec] = &[
    KindSpec {
        name: "echo",
        default_queue: "default",
        description: "Returns its input as output.",
        internal: false,
        validate: |_| Ok(()),
    },
    KindSpec {
        name: "sleep",
        default_queue: "default",
        description: "Sleeps for `ms` milliseconds (cancelable), then returns {slept_ms}.",
        internal: false,
        validate: validate_sleep,
    },
    KindSpec {
        name: "fail",
        default_queue: "default",
        description: "Fails the first `times` attempts (or always) with `message`.",
        internal: false,
        validate: validate_fail,
    },
    KindSpec {
        name: "callback.deliver",
        default_queue: "callbacks",
        description:
            "Delivers one signed webhook (created by Capibara for callbacks and subscriptions).",
        internal: true,
        validate: |_| Ok(()),
    },
];

/// Look a kind up by name.
pub fn find(name: &str) -> Option<&'static KindSpec> {
    KINDS.iter().find(|k| k.name == name)
}

/// A kind clients may submit.
pub fn find_public(name: &str) -> Option<&'static KindSpec> {
    find(name).filter(|k| !k.internal)
}

/// Names of the kinds clients may submit, for error messages.
pub fn names() -> Vec<&'static str> {
    KINDS
        .iter()
        .filter(|k| !k.internal)
        .map(|k| k.name)
        .collect()
}

fn object(input: &Value) -> Result<&serde_json::Map<String, Value>, FieldError> {
    input
        .as_object()
        .ok_or_else(|| FieldError::new("", "must be a JSON object"))
}

fn reject_unknown(obj: &serde_json::Map<String, Value>, known: &[&str]) -> Result<(), FieldError> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(FieldError::new(
            k.clone(),
            format!("unknown field (expected one of: {})", known.join(", ")),
        )),
        None => Ok(()),
    }
}

/// Longest `sleep` accepted: one day.
pub const MAX_SLEEP_MS: u64 = 86_400_000;

fn validate_sleep(input: &Value) -> Result<(), FieldError> {
    let obj = object(input)?;
    reject_unknown(obj, &["ms"])?;
    match obj.get("ms") {
        None => Err(FieldError::new("ms", "is required")),
        Some(v) => match v.as_u64() {
            Some(ms) if ms <= MAX_SLEEP_MS => Ok(()),
            Some(_) => Err(FieldError::new(
                "ms",
                format!("must be at most {MAX_SLEEP_MS}"),
            )),
            None => Err(FieldError::new("ms", "must be a non-negative integer")),
        },
    }
}

fn validate_fail(input: &Value) -> Result<(), FieldError> {
    let obj = object(input)?;
    reject_unknown(obj, &["message", "times"])?;
    if let Some(m) = obj.get("message") {
        if !m.is_string() {
            return Err(FieldError::new("message", "must be a string"));
        }
    }
    if let Some(t) = obj.get("times") {
        if t.as_u64().is_none() {
            return Err(FieldError::new("times", "must be a non-negative integer"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sleep_needs_a_bounded_integer_ms() {
        let k = find("sleep").unwrap();
        assert!(k.validate_input(&json!({"ms": 10})).is_ok());
        assert_eq!(k.validate_input(&json!({})).unwrap_err().field, "input.ms");
        assert_eq!(
            k.validate_input(&json!({"ms": "x"})).unwrap_err().field,
            "input.ms"
        );
        assert_eq!(
            k.validate_input(&json!({"ms": 1, "x": 1}))
                .unwrap_err()
                .field,
            "input.x"
        );
        assert_eq!(k.validate_input(&json!([1])).unwrap_err().field, "input");
    }

    #[test]
    fn unknown_kinds_are_not_found() {
        assert!(find("nope").is_none());
        assert!(names().contains(&"echo"));
    }
}
