//! Built-in kinds for tests, demos and benchmarks: `echo`, `sleep`, `fail`.

use std::time::Duration;

use async_trait::async_trait;
use capibara_shared::domain::{
    job::JobError,
    kinds::{
        input::{self, FailInput, SleepInput},
        output::{FailOutput, SleepOutput},
    },
};

use super::{ExecError, Executor, JobContext, Output};

/// Output = input.
pub struct Echo;

#[async_trait]
impl Executor for Echo {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        Ok(Output {
            output: ctx.input,
            ..Default::default()
        })
    }
}

/// Sleeps `ms`, reporting progress every `progress_ms` (default: every second when `ms` is 2 s
/// or more, else never); stops at once when canceled.
pub struct Sleep;

#[async_trait]
impl Executor for Sleep {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let SleepInput { ms, progress_ms } = input::parse(&ctx.input).map_err(invalid)?;
        let total = Duration::from_millis(ms);
        let every = match progress_ms {
            Some(p) => Some(Duration::from_millis(p.max(1))),
            None => (total >= Duration::from_secs(2)).then_some(Duration::from_secs(1)),
        };
        let started = tokio::time::Instant::now();
        loop {
            let left = total.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(every.map_or(left, |e| left.min(e))) => {}
                _ = ctx.cancel.cancelled() => {
                    return Err(ExecError::Abort(JobError::new("canceled", "sleep interrupted")));
                }
            }
            if every.is_some() && started.elapsed() < total {
                let pct =
                    (started.elapsed().as_secs_f64() / total.as_secs_f64() * 100.0).min(100.0);
                ctx.progress
                    .progress(Some((pct * 10.0).round() / 10.0), None)
                    .await;
            }
        }
        Ok(Output {
            output: to_output(SleepOutput { slept_ms: ms }),
            ..Default::default()
        })
    }
}

/// Fails the first `times` attempts (always when `times` is absent) with `message`.
pub struct Fail;

#[async_trait]
impl Executor for Fail {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let FailInput {
            message,
            times,
            error_type,
            retry_after_s,
        } = input::parse(&ctx.input).map_err(invalid)?;
        let message = message.unwrap_or_else(|| "failed on purpose".into());
        let error = JobError::new(error_type.as_deref().unwrap_or("executor_error"), message);
        match times {
            Some(times) if u64::from(ctx.attempt) > times => Ok(Output {
                output: to_output(FailOutput {
                    attempt: ctx.attempt,
                }),
                ..Default::default()
            }),
            _ => Err(match retry_after_s {
                Some(s) if s.is_finite() && (0.0..=3600.0).contains(&s) => {
                    ExecError::RetryAfter(std::time::Duration::from_secs_f64(s), error)
                }
                _ => ExecError::Retryable(error),
            }),
        }
    }
}

/// An input the kind's type refuses (submission checks the same type, so only a job written
/// around the API, or an older input format, gets here).
pub(super) fn invalid(e: capibara_shared::domain::FieldError) -> ExecError {
    let e = e.under("input");
    ExecError::Abort(JobError::new(
        "invalid_input",
        format!("{}: {}", e.field, e.message),
    ))
}

/// A kind's typed output as the job's JSON output.
pub(super) fn to_output(output: impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(output).expect("an output type serializes")
}
