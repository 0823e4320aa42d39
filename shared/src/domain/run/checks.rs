//! The checks of a rendered step input, the same as a submitted job's: the kind's validation,
//! the input size limit, and what Postgres can store.

use std::sync::{Arc, OnceLock};

use serde_json::Value;

use crate::domain::{
    kinds::{self, KindContext},
    FieldError,
};

/// What a rendered step input is checked against before its job is submitted: the same checks
/// as a job submitted through the API ([`kinds::validate_input`], the input size limit).
#[derive(Clone)]
pub struct StepChecks {
    /// Largest input, as JSON (`CAPIBARA_INPUT_LIMIT_BYTES`).
    pub input_limit_bytes: usize,
    /// What is installed here (voices).
    pub kinds: Arc<dyn KindContext + Send + Sync>,
}

/// Until [`set_step_checks`]: the default input limit, and any voice (the worker refuses a
/// voice it lacks).
struct AnyVoice;

impl KindContext for AnyVoice {
    fn voice_installed(&self, _voice: &str) -> bool {
        true
    }

    fn installed_voices(&self) -> Vec<String> {
        Vec::new()
    }
}

static STEP_CHECKS: OnceLock<StepChecks> = OnceLock::new();

/// Set this process's [`StepChecks`] (once, at startup, from the configuration).
pub fn set_step_checks(checks: StepChecks) {
    let _ = STEP_CHECKS.set(checks);
}

pub(super) fn step_checks() -> StepChecks {
    STEP_CHECKS.get().cloned().unwrap_or_else(|| StepChecks {
        input_limit_bytes: 1024 * 1024,
        kinds: Arc::new(AnyVoice),
    })
}

/// Check a rendered value that will be stored: its size and that Postgres can store it.
pub(super) fn check_storable(v: &Value, field: &str, limit: usize) -> Result<(), FieldError> {
    let size = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(0);
    if size > limit {
        return Err(FieldError::new(
            field,
            format!("is {size} bytes after rendering; the limit is {limit} bytes (CAPIBARA_INPUT_LIMIT_BYTES)"),
        ));
    }
    // The one NUL rule (`storable`), naming the path under `field`.
    crate::domain::storable::check_json(field, v)
}

/// Check a step job's rendered input as a submitted job's input is checked.
pub fn check_rendered_input(kind: &str, input: &Value) -> Result<(), FieldError> {
    let checks = step_checks();
    check_storable(input, "input", checks.input_limit_bytes)?;
    kinds::validate_input(kind, input, checks.kinds.as_ref()).map(|_| ())
}
