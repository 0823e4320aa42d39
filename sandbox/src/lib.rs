//! Capibara's code sandbox: runs untrusted Python and JavaScript snippets inside wasmtime, one
//! fresh instance per run, with no network, no host filesystem (only an empty per-run scratch
//! directory at `/tmp`), no environment variables, a memory cap, a wall-clock timeout (epoch
//! interruption), an optional CPU budget (fuel) and capped output. It is the engine of the
//! `code.run` job kind; the worker's executor is a thin layer over [`Sandbox::run`].
//!
//! # Layout
//! - [`Sandbox`]: one wasmtime `Engine`, the runtimes compiled once and pre-linked
//!   (`InstancePre`, one per language), an epoch ticker thread; `run` and `check`.
//! - `modules`: the precompiled-module cache (`.cwasm` keyed by wasm hash, wasmtime version
//!   and engine settings, loaded with `deserialize`).
//! - `limits`: the memory cap, the interrupt reasons (timeout, cancel, scratch quota) and the
//!   scratch directory's measure.
//! - `guest/`: the wrappers run inside QuickJS and the CPython WASI fallback; `python/`: the
//!   componentize-py app (built into `wasm/python-component.wasm` by `deploy/fetch-assets.sh`).
//!
//! Runtimes, in the asset directory (`CAPIBARA_ASSETS_DIR`, filled by `deploy/fetch-assets.sh`):
//! - `wasm/python-component.wasm`: CPython as a component snapshotted after start-up (~2 ms a
//!   run); its stdlib is the whitelist imported by `python/app.py`.
//! - `wasm/python.wasm`: the CPython WASI build (fallback when the component is absent, ~50 ms).
//! - `wasm/quickjs.wasm`: QuickJS (`qjs --std`).

mod limits;
mod modules;
mod pipe;

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use wasmtime::{Config, Engine, Store, Trap, UpdateDeadline};
use wasmtime_wasi::{
    p1::WasiP1Ctx, p2::pipe::MemoryInputPipe, FsPerms, I32Exit, ResourceTable, WasiCtx,
    WasiCtxBuilder, WasiCtxView, WasiView,
};

pub use limits::CancelFlag;
pub use modules::WASMTIME_VERSION;

use limits::{Interrupted, MemoryCap};
use pipe::CappedPipe;

/// The script that runs a job inside QuickJS.
const JS_WRAPPER: &str = include_str!("../guest/wrapper.js");
/// The script that runs a job inside the CPython WASI fallback.
const PY_WRAPPER: &str = include_str!("../guest/wrapper.py");

/// Default cap on stdout, on stderr and on the result's JSON, each.
pub const DEFAULT_OUTPUT_LIMIT: usize = 1024 * 1024;
/// Default cap on what one run may write to its scratch directory (`/tmp`).
pub const DEFAULT_SCRATCH_LIMIT: u64 = 64 * 1024 * 1024;
/// How many epoch ticks pass between two measurements of the scratch directory.
const SCRATCH_CHECK_TICKS: u32 = 4;
/// How often the epoch ticker advances: the timeout's resolution.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// A language `code.run` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    Javascript,
}

impl Language {
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Javascript => "javascript",
        }
    }
}

impl std::str::FromStr for Language {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "python" | "py" => Ok(Language::Python),
            "javascript" | "js" => Ok(Language::Javascript),
            other => Err(format!(
                "unknown language `{other}` (expected python or javascript)"
            )),
        }
    }
}

/// Which Python runtime to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PythonRuntime {
    /// The pre-initialized component when present, else the CPython WASI build.
    #[default]
    Auto,
    /// Only the component (error when absent).
    Component,
    /// Only the CPython WASI build.
    Wasi,
}

/// How a [`Sandbox`] is set up.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Holds `wasm/python-component.wasm`, `wasm/python.wasm`, `wasm/quickjs.wasm`.
    pub assets_dir: PathBuf,
    /// Where compiled modules (`.cwasm`) are kept between processes.
    pub cache_dir: PathBuf,
    /// Cap on stdout, stderr and the result's JSON (bytes, each).
    pub output_limit: usize,
    /// When set, the engine meters fuel and every run gets this CPU budget (slower code: only
    /// for deterministic CPU limits; the timeout bounds wall-clock time anyway).
    pub fuel: Option<u64>,
    pub python: PythonRuntime,
    /// Bytes one run may keep in its scratch directory (`/tmp`), measured every few epoch
    /// ticks and when the run ends; beyond, the run fails with `scratch_limit`.
    pub scratch_limit: u64,
}

impl SandboxConfig {
    /// Defaults for an asset directory: compiled modules under `<assets>/compiled`.
    pub fn new(assets_dir: impl Into<PathBuf>) -> Self {
        let assets_dir = assets_dir.into();
        Self {
            cache_dir: assets_dir.join("compiled"),
            assets_dir,
            output_limit: DEFAULT_OUTPUT_LIMIT,
            fuel: None,
            python: PythonRuntime::Auto,
            scratch_limit: DEFAULT_SCRATCH_LIMIT,
        }
    }
}

/// One run's input.
#[derive(Debug, Clone)]
pub struct RunRequest<'a> {
    pub language: Language,
    pub code: &'a str,
    /// Bound to the global `context` inside the code.
    pub context: &'a Value,
    pub timeout: Duration,
    /// Cap on the guest's linear memory.
    pub memory_bytes: usize,
    /// Stops the run at the next epoch tick when canceled.
    pub cancel: Option<CancelFlag>,
}

/// Why a run failed (contract names, see docs/code.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Ran past its wall-clock timeout.
    Timeout,
    /// Asked for more memory than its cap.
    MemoryLimit,
    /// Wrote more than the output cap (stdout, stderr or the result).
    OutputLimit,
    /// Kept more than the scratch quota in `/tmp`.
    ScratchLimit,
    /// Used up its fuel (CPU budget).
    CpuLimit,
    /// The code raised / threw (traceback or stack attached), exited non-zero, or trapped.
    RuntimeError,
    /// The job was canceled while running.
    Canceled,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::MemoryLimit => "memory_limit",
            FailureKind::OutputLimit => "output_limit",
            FailureKind::ScratchLimit => "scratch_limit",
            FailureKind::CpuLimit => "cpu_limit",
            FailureKind::RuntimeError => "runtime_error",
            FailureKind::Canceled => "canceled",
        }
    }
}

/// A failed run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    #[serde(rename = "type")]
    pub kind: FailureKind,
    pub message: String,
    /// Python traceback / JavaScript stack, when the code raised.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<u32>,
}

impl Failure {
    fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            traceback: None,
            line: None,
            column: None,
        }
    }
}

/// What one run produced.
#[derive(Debug, Clone)]
pub struct Execution {
    /// The value the code assigned to `result` (null when none), or why the run failed.
    pub outcome: Result<Value, Failure>,
    pub stdout: String,
    pub stderr: String,
    /// Output was cut at the cap (then the outcome is an `output_limit` failure).
    pub truncated: bool,
    pub exit_code: i32,
    /// Wall-clock time of the run (instantiate + execute).
    pub duration: Duration,
    /// Which runtime ran it: `python-component`, `python-wasi` or `quickjs`.
    pub runtime: &'static str,
}

/// A syntax check's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub valid: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<u32>,
}

/// What start-up did, for logs and the benchmark.
#[derive(Debug, Clone, Default)]
pub struct StartupReport {
    /// Runtimes that had to be compiled (no cached `.cwasm`).
    pub compiled: Vec<&'static str>,
    pub python_runtime: &'static str,
    pub duration: Duration,
}

/// Store data for core modules (WASI preview 1: CPython WASI, QuickJS).
struct P1State {
    wasi: WasiP1Ctx,
    cap: MemoryCap,
}

/// Store data for the Python component (WASI preview 2).
struct P2State {
    ctx: WasiCtx,
    table: ResourceTable,
    cap: MemoryCap,
}

impl WasiView for P2State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

enum PythonPre {
    Component(wasmtime::component::InstancePre<P2State>),
    Wasi(wasmtime::InstancePre<P1State>),
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Ticker {
    fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("sandbox-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch ticker thread");
        Self { stop }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The code sandbox: build once per process, then call [`Sandbox::run`] from any thread.
pub struct Sandbox {
    engine: Engine,
    python: PythonPre,
    javascript: wasmtime::InstancePre<P1State>,
    config: SandboxConfig,
    startup: StartupReport,
    /// Source of the per-run nonce separating the guest's report from the code's stdout.
    runs: AtomicU64,
    _ticker: Ticker,
}

/// The asset files, relative to the asset directory.
pub const PYTHON_COMPONENT: &str = "wasm/python-component.wasm";
pub const PYTHON_WASI: &str = "wasm/python.wasm";
pub const QUICKJS: &str = "wasm/quickjs.wasm";

fn asset(config: &SandboxConfig, rel: &str) -> anyhow::Result<PathBuf> {
    let path = config.assets_dir.join(rel);
    if !path.is_file() {
        anyhow::bail!(
            "{} is missing: run deploy/fetch-assets.sh (or set CAPIBARA_ASSETS_DIR)",
            path.display()
        );
    }
    Ok(path)
}

/// Loads a core-module runtime and links it with WASI preview 1.
fn core_pre(
    engine: &Engine,
    config: &SandboxConfig,
    name: &'static str,
    rel: &str,
) -> anyhow::Result<(wasmtime::InstancePre<P1State>, bool)> {
    let path = asset(config, rel)?;
    let loaded = modules::load(
        engine,
        &config.cache_dir,
        name,
        &path,
        modules::WasmKind::Module,
    )?;
    let modules::Compiled::Module(module) = loaded.compiled else {
        anyhow::bail!("{} is not a core module", path.display());
    };
    let mut linker = wasmtime::Linker::<P1State>::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s| &mut s.wasi)?;
    let pre = linker
        .instantiate_pre(&module)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("linking {}", path.display()))?;
    Ok((pre, loaded.compiled_now))
}

impl Sandbox {
    /// Builds the engine and loads every runtime (compiling those not yet in the cache).
    pub fn new(config: SandboxConfig) -> anyhow::Result<Self> {
        let started = Instant::now();
        let mut wasm_config = Config::new();
        wasm_config
            .epoch_interruption(true)
            .consume_fuel(config.fuel.is_some())
            .memory_init_cow(true)
            .parallel_compilation(true);
        let engine = Engine::new(&wasm_config)?;
        let mut startup = StartupReport::default();

        let component = config.assets_dir.join(PYTHON_COMPONENT);
        let use_component = match config.python {
            PythonRuntime::Auto => component.is_file(),
            PythonRuntime::Component => {
                asset(&config, PYTHON_COMPONENT)?;
                true
            }
            PythonRuntime::Wasi => false,
        };
        let python = if use_component {
            let loaded = modules::load(
                &engine,
                &config.cache_dir,
                "python-component",
                &component,
                modules::WasmKind::Component,
            )?;
            if loaded.compiled_now {
                startup.compiled.push("python-component");
            }
            let modules::Compiled::Component(c) = loaded.compiled else {
                anyhow::bail!("python-component.wasm is not a component");
            };
            let mut linker = wasmtime::component::Linker::<P2State>::new(&engine);
            wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
            startup.python_runtime = "python-component";
            PythonPre::Component(
                linker
                    .instantiate_pre(&c)
                    .map_err(anyhow::Error::from)
                    .context("linking the Python component")?,
            )
        } else {
            tracing::warn!(
                "{} not found: Python runs on the slower CPython WASI build (run deploy/fetch-assets.sh)",
                component.display()
            );
            let (pre, compiled_now) = core_pre(&engine, &config, "python", PYTHON_WASI)?;
            if compiled_now {
                startup.compiled.push("python-wasi");
            }
            startup.python_runtime = "python-wasi";
            PythonPre::Wasi(pre)
        };
        let (javascript, compiled_now) = core_pre(&engine, &config, "quickjs", QUICKJS)?;
        if compiled_now {
            startup.compiled.push("quickjs");
        }
        startup.duration = started.elapsed();
        Ok(Self {
            _ticker: Ticker::start(engine.clone()),
            engine,
            python,
            javascript,
            config,
            startup,
            runs: AtomicU64::new(0),
        })
    }

    /// What start-up did (compiled or loaded, which Python runtime, how long).
    pub fn startup(&self) -> &StartupReport {
        &self.startup
    }

    /// The engine settings' hash that compiled modules are keyed by.
    pub fn settings_hash(&self) -> String {
        modules::settings_hash(&self.engine)
    }

    /// Runs one snippet in a fresh instance. Blocks the calling thread for the run's duration.
    pub fn run(&self, req: &RunRequest<'_>) -> Execution {
        let started = Instant::now();
        let mut exec = match (req.language, &self.python) {
            (Language::Python, PythonPre::Component(pre)) => self.run_component(pre, req, started),
            (Language::Python, PythonPre::Wasi(pre)) => {
                self.run_core(pre, req, started, "python-wasi", python_args())
            }
            (Language::Javascript, _) => {
                self.run_core(&self.javascript, req, started, "quickjs", js_args())
            }
        };
        exec.duration = started.elapsed();
        exec
    }

    /// Compiles `code` without running it and reports the first syntax error.
    pub fn check(&self, language: Language, code: &str) -> anyhow::Result<Validation> {
        let req = RunRequest {
            language,
            code,
            context: &Value::Null,
            timeout: Duration::from_secs(5),
            memory_bytes: 256 << 20,
            cancel: None,
        };
        let started = Instant::now();
        let raw = match (language, &self.python) {
            (Language::Python, PythonPre::Component(pre)) => {
                let P2Run { mut store, .. } = self.p2_store(&req, started)?;
                let instance = pre.instantiate(&mut store)?;
                let check = instance
                    .get_typed_func::<(&str,), (String,)>(&mut store, "check")
                    .map_err(anyhow::Error::from)
                    .context("the Python component has no `check` export")?;
                let (json,) = check.call(&mut store, (code,))?;
                json
            }
            (Language::Python, PythonPre::Wasi(pre)) => {
                self.core_report(pre, &req, started, python_args(), true)?
            }
            (Language::Javascript, _) => {
                self.core_report(&self.javascript, &req, started, js_args(), true)?
            }
        };
        serde_json::from_str(&raw).context("reading the syntax check's answer")
    }

    fn limits(&self, req: &RunRequest<'_>) -> MemoryCap {
        MemoryCap {
            max_bytes: req.memory_bytes,
            hit: false,
        }
    }

    /// Deadline, cancel flag and fuel for a fresh store.
    fn arm<T: 'static>(
        &self,
        store: &mut Store<T>,
        req: &RunRequest<'_>,
        started: Instant,
        scratch: &Path,
    ) {
        let deadline = started + req.timeout;
        let cancel = req.cancel.clone();
        let scratch = scratch.to_path_buf();
        let scratch_limit = self.config.scratch_limit;
        let mut ticks: u32 = 0;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if cancel.as_ref().is_some_and(CancelFlag::is_canceled) {
                return Err(Interrupted::Canceled.into());
            }
            if Instant::now() >= deadline {
                return Err(Interrupted::Timeout.into());
            }
            ticks = ticks.wrapping_add(1);
            if ticks.is_multiple_of(SCRATCH_CHECK_TICKS)
                && limits::dir_size(&scratch) > scratch_limit
            {
                return Err(Interrupted::ScratchLimit.into());
            }
            Ok(UpdateDeadline::Continue(1))
        });
        if let Some(fuel) = self.config.fuel {
            // Only fails when the engine does not meter fuel, which `new` set up to match.
            let _ = store.set_fuel(fuel);
        }
    }

    fn pipes(&self, extra: usize) -> (CappedPipe, CappedPipe) {
        // One byte past the cap tells "exactly at the cap" from "cut".
        (
            CappedPipe::new(self.config.output_limit + 1 + extra),
            CappedPipe::new(self.config.output_limit + 1),
        )
    }

    fn wasi_builder(
        scratch: &Path,
        stdin: Vec<u8>,
        stdout: &CappedPipe,
        stderr: &CappedPipe,
    ) -> anyhow::Result<WasiCtxBuilder> {
        let mut b = WasiCtxBuilder::new();
        // No env vars, no inherited stdio, no network: only what is set here.
        b.stdin(MemoryInputPipe::new(stdin))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }));
        b.preopened_dir(scratch, "/tmp", FsPerms::ReadWrite)?;
        Ok(b)
    }

    /// A fresh store for the Python component, with its scratch dir and output pipes.
    fn p2_store(&self, req: &RunRequest<'_>, started: Instant) -> anyhow::Result<P2Run> {
        let (stdout, stderr) = self.pipes(0);
        let scratch = tempfile::Builder::new()
            .prefix("capibara-code-")
            .tempdir()?;
        let ctx = Self::wasi_builder(scratch.path(), Vec::new(), &stdout, &stderr)?.build();
        let mut store = Store::new(
            &self.engine,
            P2State {
                ctx,
                table: ResourceTable::new(),
                cap: self.limits(req),
            },
        );
        store.limiter(|s| &mut s.cap);
        self.arm(&mut store, req, started, scratch.path());
        Ok(P2Run {
            store,
            scratch,
            stdout,
            stderr,
        })
    }

    fn run_component(
        &self,
        pre: &wasmtime::component::InstancePre<P2State>,
        req: &RunRequest<'_>,
        started: Instant,
    ) -> Execution {
        let runtime = "python-component";
        let P2Run {
            mut store,
            scratch,
            stdout,
            stderr,
        } = match self.p2_store(req, started) {
            Ok(run) => run,
            Err(e) => return host_failure(runtime, e),
        };
        let context_json = req.context.to_string();
        let called: wasmtime::Result<String> = (|| {
            let instance = pre.instantiate(&mut store)?;
            let exec = instance.get_typed_func::<(&str, &str), (String,)>(&mut store, "exec")?;
            let (report,) = exec.call(&mut store, (req.code, context_json.as_str()))?;
            Ok(report)
        })();
        let mem_hit = store.data().cap.hit;
        drop(store);
        let scratch_over = limits::dir_size(scratch.path()) > self.config.scratch_limit;
        drop(scratch);
        let (report, trap) = match called {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(e)),
        };
        self.finish(
            runtime,
            req,
            Finish {
                stdout: stdout.contents(),
                stderr: stderr.contents(),
                report,
                trap,
                mem_hit,
                scratch_over,
            },
        )
    }

    /// Instantiates a core module with the job on stdin; returns its stdout/stderr and the
    /// guest report (the text after the nonce), or the trap.
    fn core_call(
        &self,
        pre: &wasmtime::InstancePre<P1State>,
        req: &RunRequest<'_>,
        started: Instant,
        args: &[&str],
        check: bool,
    ) -> anyhow::Result<Finish> {
        let nonce = self.nonce();
        let job = serde_json::json!({
            "code": req.code,
            "context": req.context,
            "nonce": nonce,
            "check": check,
        });
        // The report follows the code's own stdout: room for one more capped block.
        let (stdout, stderr) = self.pipes(self.config.output_limit + nonce.len() + 1);
        let scratch = tempfile::Builder::new()
            .prefix("capibara-code-")
            .tempdir()?;
        let wasi = Self::wasi_builder(
            scratch.path(),
            job.to_string().into_bytes(),
            &stdout,
            &stderr,
        )?
        .args(args)
        .build_p1();
        let mut store = Store::new(
            &self.engine,
            P1State {
                wasi,
                cap: self.limits(req),
            },
        );
        store.limiter(|s| &mut s.cap);
        self.arm(&mut store, req, started, scratch.path());
        let called: wasmtime::Result<()> = (|| {
            let instance = pre.instantiate(&mut store)?;
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            start.call(&mut store, ())
        })();
        let mem_hit = store.data().cap.hit;
        drop(store);
        let scratch_over = limits::dir_size(scratch.path()) > self.config.scratch_limit;
        drop(scratch);
        let mut out = stdout.contents();
        let marker = format!("\n{nonce}");
        let report = match find_last(&out, marker.as_bytes()) {
            Some(at) => {
                let report = String::from_utf8_lossy(&out[at + marker.len()..]).into_owned();
                out.truncate(at);
                Some(report)
            }
            None => None,
        };
        let trap = match called {
            Ok(()) => None,
            Err(e) => match e.downcast_ref::<I32Exit>() {
                Some(I32Exit(0)) => None,
                _ => Some(e),
            },
        };
        Ok(Finish {
            stdout: out,
            stderr: stderr.contents(),
            report,
            trap,
            mem_hit,
            scratch_over,
        })
    }

    fn core_report(
        &self,
        pre: &wasmtime::InstancePre<P1State>,
        req: &RunRequest<'_>,
        started: Instant,
        args: Vec<String>,
        check: bool,
    ) -> anyhow::Result<String> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let f = self.core_call(pre, req, started, &args, check)?;
        if let Some(e) = f.trap {
            return Err(e.into());
        }
        f.report.ok_or_else(|| {
            anyhow::anyhow!(
                "the runtime gave no answer: {}",
                String::from_utf8_lossy(&f.stderr)
            )
        })
    }

    fn run_core(
        &self,
        pre: &wasmtime::InstancePre<P1State>,
        req: &RunRequest<'_>,
        started: Instant,
        runtime: &'static str,
        args: Vec<String>,
    ) -> Execution {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match self.core_call(pre, req, started, &args, false) {
            Ok(f) => self.finish(runtime, req, f),
            Err(e) => host_failure(runtime, e),
        }
    }

    fn nonce(&self) -> String {
        use std::hash::{BuildHasher, Hasher};
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_u128(started_nanos());
        format!("\u{1}CAPIBARA-REPORT-{:016x}{n:x}\u{1}", h.finish())
    }

    /// Turns what the guest left behind into an [`Execution`]; the order of checks decides
    /// which limit is reported when several apply (deadline first, then output, then memory).
    fn finish(&self, runtime: &'static str, req: &RunRequest<'_>, f: Finish) -> Execution {
        let cap = self.config.output_limit;
        let truncated = f.stdout.len() > cap || f.stderr.len() > cap;
        let stdout = text_prefix(&f.stdout, cap);
        let stderr = text_prefix(&f.stderr, cap);
        let report: Option<GuestReport> = f.report.as_deref().and_then(|r| {
            if r.len() > cap {
                None
            } else {
                serde_json::from_str(r).ok()
            }
        });
        let report_too_big = f.report.as_ref().is_some_and(|r| r.len() > cap);
        let mut exit_code = report.as_ref().map(|r| r.exit_code).unwrap_or(1);

        let outcome = if let Some(e) = &f.trap {
            if let Some(i) = e.downcast_ref::<Interrupted>() {
                Err(match i {
                    Interrupted::Timeout => Failure::new(
                        FailureKind::Timeout,
                        format!("exceeded the timeout of {} ms", req.timeout.as_millis()),
                    ),
                    Interrupted::Canceled => Failure::new(FailureKind::Canceled, "canceled"),
                    Interrupted::ScratchLimit => scratch_failure(self.config.scratch_limit),
                })
            } else if f.scratch_over {
                Err(scratch_failure(self.config.scratch_limit))
            } else if truncated {
                Err(output_failure(cap))
            } else if f.mem_hit {
                Err(memory_failure(req))
            } else if e.downcast_ref::<Trap>() == Some(&Trap::OutOfFuel) {
                Err(Failure::new(
                    FailureKind::CpuLimit,
                    "used up its CPU budget (fuel)",
                ))
            } else if let Some(I32Exit(code)) = e.downcast_ref::<I32Exit>() {
                exit_code = *code;
                let mut failure = Failure::new(
                    FailureKind::RuntimeError,
                    format!("exited with code {code}"),
                );
                failure.traceback = (!stderr.is_empty()).then(|| stderr.clone());
                Err(failure)
            } else {
                let mut failure = Failure::new(FailureKind::RuntimeError, trap_message(e));
                failure.traceback = Some(format!("{e:?}"));
                Err(failure)
            }
        } else if f.scratch_over {
            Err(scratch_failure(self.config.scratch_limit))
        } else if truncated || report_too_big {
            Err(output_failure(cap))
        } else {
            match report {
                None if f.mem_hit => Err(memory_failure(req)),
                None => Err(Failure::new(
                    FailureKind::RuntimeError,
                    "the code ended the interpreter before it reported a result",
                )),
                Some(r) => match r.error_type {
                    None => Ok(r.result.unwrap_or(Value::Null)),
                    Some(kind) => {
                        let kind = if f.mem_hit {
                            FailureKind::MemoryLimit
                        } else {
                            kind
                        };
                        Err(Failure {
                            kind,
                            message: r.message.unwrap_or_else(|| kind.as_str().to_string()),
                            traceback: r.traceback,
                            line: r.line,
                            column: r.column,
                        })
                    }
                },
            }
        };
        if outcome.is_err() && exit_code == 0 {
            exit_code = 1;
        }
        Execution {
            outcome,
            stdout,
            stderr,
            truncated,
            exit_code,
            duration: Duration::ZERO,
            runtime,
        }
    }
}

/// A store for one component run and what must live as long as it.
struct P2Run {
    store: Store<P2State>,
    /// Preopened as `/tmp`; removed when the run ends.
    scratch: tempfile::TempDir,
    stdout: CappedPipe,
    stderr: CappedPipe,
}

/// What a guest run left behind, before interpretation.
struct Finish {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// The guest's JSON report, when it got to write one.
    report: Option<String>,
    /// The error the call ended with, if any.
    trap: Option<wasmtime::Error>,
    /// The memory cap refused a growth.
    mem_hit: bool,
    /// The scratch directory held more than its quota.
    scratch_over: bool,
}

/// The JSON a guest wrapper reports.
#[derive(Deserialize)]
struct GuestReport {
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    error_type: Option<FailureKind>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    traceback: Option<String>,
    #[serde(default)]
    line: Option<u32>,
    #[serde(default)]
    column: Option<u32>,
    #[serde(default)]
    exit_code: i32,
}

fn python_args() -> Vec<String> {
    // -S: no site module (saves start-up time); -I: no user paths, no PYTHON* variables.
    ["python", "-S", "-I", "-c", PY_WRAPPER]
        .map(String::from)
        .to_vec()
}

fn js_args() -> Vec<String> {
    ["qjs", "--std", "-e", JS_WRAPPER]
        .map(String::from)
        .to_vec()
}

fn output_failure(cap: usize) -> Failure {
    Failure::new(
        FailureKind::OutputLimit,
        format!("output exceeded the limit of {cap} bytes (truncated)"),
    )
}

fn scratch_failure(limit: u64) -> Failure {
    Failure::new(
        FailureKind::ScratchLimit,
        format!("kept more than {limit} bytes in /tmp (CAPIBARA_CODE_SCRATCH_LIMIT_BYTES)"),
    )
}

fn memory_failure(req: &RunRequest<'_>) -> Failure {
    Failure::new(
        FailureKind::MemoryLimit,
        format!(
            "exceeded the memory limit of {} MiB",
            req.memory_bytes >> 20
        ),
    )
}

/// A run that failed on the host side (e.g. no scratch directory could be made).
fn host_failure(runtime: &'static str, e: anyhow::Error) -> Execution {
    Execution {
        outcome: Err(Failure::new(
            FailureKind::RuntimeError,
            format!("the sandbox could not start the run: {e:#}"),
        )),
        stdout: String::new(),
        stderr: String::new(),
        truncated: false,
        exit_code: 1,
        duration: Duration::ZERO,
        runtime,
    }
}

fn trap_message(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<Trap>() {
        Some(Trap::StackOverflow) => "stack overflow".to_string(),
        Some(t) => format!("wasm trap: {t}"),
        None => format!("{e:#}"),
    }
}

/// At most `cap` bytes of `bytes` as text, not cutting a UTF-8 character.
fn text_prefix(bytes: &[u8], cap: usize) -> String {
    let mut end = bytes.len().min(cap);
    while end > 0 && end < bytes.len() && (bytes[end] & 0xC0) == 0x80 {
        end -= 1;
    }
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn find_last(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() > haystack.len() {
        return None;
    }
    (0..=haystack.len() - needle.len())
        .rev()
        .find(|&i| &haystack[i..i + needle.len()] == needle)
}

fn started_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}
