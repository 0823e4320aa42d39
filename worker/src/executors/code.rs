//! `code.run` and `code.validate`: thin executors over [`capibara_sandbox::Sandbox`].
//!
//! The sandbox is loaded once per worker, in the background as the worker starts (compiled
//! modules come from the `.cwasm` cache, so that takes milliseconds), and runs go to a pool
//! of blocking threads sized to the cores. Results are cached through a [`ResultCache`] port
//! (Postgres in production: `crate::code_cache_port`).

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use capibara_sandbox::{CancelFlag, Execution, Language, RunRequest, Sandbox, SandboxConfig};
use capibara_shared::domain::{
    job::JobError,
    kinds::{
        self,
        input::{self, CodeLanguage, CodeRunInput, CodeValidateInput},
        output::{CodeRunOutput, CodeValidateOutput},
    },
    storable,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, Semaphore};
use uuid::Uuid;

use super::{
    builtin::{invalid, to_output},
    ExecError, Executor, JobContext, Output,
};

/// Where `code.run` keeps results (keyed per namespace by the job's id).
#[async_trait]
pub trait ResultCache: Send + Sync {
    async fn get(&self, job_id: Uuid, key: &str) -> Result<Option<Value>, String>;
    async fn put(&self, entry: CacheEntry<'_>) -> Result<(), String>;
}

/// One result to keep.
pub struct CacheEntry<'a> {
    pub job_id: Uuid,
    pub key: &'a str,
    pub language: &'a str,
    pub output: &'a Value,
    pub execution_ms: f64,
}

/// The worker's sandbox, loaded once, and the pool its runs use.
pub struct SandboxPool {
    config: SandboxConfig,
    sandbox: OnceCell<Result<Arc<Sandbox>, String>>,
    /// One permit per blocking thread: runs beyond it wait instead of oversubscribing cores.
    permits: Arc<Semaphore>,
}

impl SandboxPool {
    /// `threads`: runs at once (default: the number of cores).
    pub fn new(config: SandboxConfig, threads: Option<usize>) -> Arc<Self> {
        let threads = threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        });
        Arc::new(Self {
            config,
            sandbox: OnceCell::new(),
            permits: Arc::new(Semaphore::new(threads.max(1))),
        })
    }

    /// Loads the sandbox in the background so the first job does not wait for it.
    pub fn warm_up(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.sandbox().await {
                tracing::warn!(error = %e, "code.run is unavailable on this worker");
            }
        });
    }

    /// The loaded sandbox (loading it now if the warm-up has not finished).
    pub async fn sandbox(&self) -> Result<Arc<Sandbox>, String> {
        self.sandbox
            .get_or_init(|| async {
                let config = self.config.clone();
                let loaded = tokio::task::spawn_blocking(move || Sandbox::new(config))
                    .await
                    .map_err(|e| format!("loading the sandbox panicked: {e}"))
                    .and_then(|r| r.map_err(|e| format!("{e:#}")));
                match &loaded {
                    Ok(s) => tracing::info!(
                        compiled = ?s.startup().compiled,
                        python = s.startup().python_runtime,
                        ms = s.startup().duration.as_millis() as u64,
                        "code sandbox ready"
                    ),
                    Err(e) => tracing::error!(error = %e, "code sandbox failed to load"),
                }
                loaded.map(Arc::new)
            })
            .await
            .clone()
    }

    /// Runs `f` on a blocking thread once a permit is free.
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Sandbox) -> R + Send + 'static,
    ) -> Result<R, ExecError> {
        let sandbox = self.sandbox().await.map_err(unavailable)?;
        let _permit = self.permits.clone().acquire_owned().await.map_err(|_| {
            ExecError::Retryable(JobError::new("executor_error", "worker stopping"))
        })?;
        tokio::task::spawn_blocking(move || f(&sandbox))
            .await
            .map_err(|e| {
                ExecError::Abort(JobError::new(
                    "executor_error",
                    format!("the run panicked: {e}"),
                ))
            })
    }
}

fn unavailable(e: String) -> ExecError {
    ExecError::Abort(JobError::new(
        "executor_error",
        format!("code sandbox unavailable on this worker: {e}"),
    ))
}

/// The `code.run` executor.
pub struct CodeRun {
    pub pool: Arc<SandboxPool>,
    pub cache: Arc<dyn ResultCache>,
}

/// The sandbox's name for a language of the kind's input.
fn language(l: CodeLanguage) -> Language {
    match l {
        CodeLanguage::Python => Language::Python,
        CodeLanguage::Javascript => Language::Javascript,
    }
}

/// Cache key: SHA-256 of the canonical JSON (sorted keys) of everything the result depends on.
/// The whole `context` is in it (its keys are also the code's variables). `v` changes when runs
/// of the same input may give another result (v2: context keys became variables).
pub fn cache_key(
    language: Language,
    code: &str,
    context: &Value,
    timeout_ms: u64,
    memory_mb: u64,
) -> String {
    let canonical = json!({
        "v": 2,
        "language": language.as_str(),
        "code": code,
        "context": context,
        "timeout_ms": timeout_ms,
        "memory_mb": memory_mb,
    });
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

#[async_trait]
impl Executor for CodeRun {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let input: CodeRunInput = input::parse(&ctx.input).map_err(invalid)?;
        let context = Value::Object(input.context.unwrap_or_default());
        let timeout_ms = input.timeout_ms.unwrap_or(kinds::CODE_DEFAULT_TIMEOUT_MS);
        let memory_mb = input.memory_mb.unwrap_or(kinds::CODE_DEFAULT_MEMORY_MB);
        let use_cache = input.cache;
        let lang = language(input.language);
        let key = cache_key(lang, &input.code, &context, timeout_ms, memory_mb);

        if use_cache {
            match self.cache.get(ctx.job_id, &key).await {
                Ok(Some(mut output)) => {
                    output["cached"] = Value::Bool(true);
                    return Ok(Output {
                        output,
                        ..Default::default()
                    });
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "code cache lookup failed; running"),
            }
        }

        let cancel = CancelFlag::new();
        let watcher = {
            let (token, flag) = (ctx.cancel.clone(), cancel.clone());
            tokio::spawn(async move {
                token.cancelled().await;
                flag.cancel();
            })
        };
        let language = lang;
        let code = input.code;
        let run_context = context;
        let exec = self
            .pool
            .blocking(move |sandbox| {
                sandbox.run(&RunRequest {
                    language,
                    code: &code,
                    context: &run_context,
                    timeout: Duration::from_millis(timeout_ms),
                    memory_bytes: (memory_mb as usize) << 20,
                    cancel: Some(cancel),
                })
            })
            .await;
        watcher.abort();
        let exec = exec?;
        let duration_ms = exec.duration.as_secs_f64() * 1000.0;
        metrics::histogram!("capibara_code_run_seconds", "language" => language.as_str(), "runtime" => exec.runtime)
            .record(exec.duration.as_secs_f64());
        let output = outcome_to_output(exec, duration_ms)?;
        // An output Postgres cannot store is not cached (the attempt ends `invalid_output`).
        if use_cache && storable::find_nul(&output).is_none() {
            let fill = CacheEntry {
                job_id: ctx.job_id,
                key: &key,
                language: language.as_str(),
                output: &output,
                execution_ms: duration_ms,
            };
            if let Err(e) = self.cache.put(fill).await {
                tracing::warn!(error = %e, "code cache fill failed");
            }
        }
        Ok(Output {
            output,
            ..Default::default()
        })
    }
}

/// The job output of a successful run, or the typed error of a failed one (never retried:
/// the same code would fail the same way).
fn outcome_to_output(exec: Execution, duration_ms: f64) -> Result<Value, ExecError> {
    match exec.outcome {
        Ok(result) => Ok(to_output(CodeRunOutput {
            result,
            stdout: exec.stdout,
            stderr: exec.stderr,
            exit_code: exec.exit_code,
            duration_ms,
            cached: false,
            runtime: exec.runtime.into(),
        })),
        Err(f) => {
            let mut details = json!({
                "stdout": exec.stdout,
                "stderr": exec.stderr,
                "exit_code": exec.exit_code,
                "duration_ms": duration_ms,
                "truncated": exec.truncated,
                "runtime": exec.runtime,
            });
            if let Some(tb) = f.traceback {
                details["traceback"] = Value::String(tb);
            }
            if let Some(line) = f.line {
                details["line"] = line.into();
            }
            if let Some(column) = f.column {
                details["column"] = column.into();
            }
            Err(ExecError::Abort(JobError {
                error_type: f.kind.as_str().to_string(),
                message: f.message,
                details: Some(details),
            }))
        }
    }
}

/// The internal `code.validate` executor behind `POST /v1/code/validate`: the same parser as
/// the runtime (CPython's `compile`, QuickJS compile-only), nothing executed.
pub struct CodeValidate {
    pub pool: Arc<SandboxPool>,
}

#[async_trait]
impl Executor for CodeValidate {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let input: CodeValidateInput = input::parse(&ctx.input).map_err(invalid)?;
        let lang = language(input.language);
        let checked = self
            .pool
            .blocking(move |sandbox| sandbox.check(lang, &input.code))
            .await?
            .map_err(|e| {
                ExecError::Abort(JobError::new(
                    "executor_error",
                    format!("syntax check failed: {e:#}"),
                ))
            })?;
        Ok(Output {
            output: to_output(CodeValidateOutput {
                valid: checked.valid,
                message: checked.message,
                line: checked.line,
                column: checked.column,
            }),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_depend_on_every_input_but_not_on_key_order() {
        let a = cache_key(Language::Python, "x", &json!({"a": 1, "b": 2}), 100, 64);
        let b = cache_key(
            Language::Python,
            "x",
            &serde_json::from_str(r#"{"b": 2, "a": 1}"#).unwrap(),
            100,
            64,
        );
        assert_eq!(a, b);
        for other in [
            cache_key(Language::Javascript, "x", &json!({"a": 1, "b": 2}), 100, 64),
            cache_key(Language::Python, "y", &json!({"a": 1, "b": 2}), 100, 64),
            cache_key(Language::Python, "x", &json!({"a": 1}), 100, 64),
            cache_key(Language::Python, "x", &json!({"a": 1, "b": 2}), 200, 64),
            cache_key(Language::Python, "x", &json!({"a": 1, "b": 2}), 100, 128),
        ] {
            assert_ne!(a, other);
        }
    }
}
