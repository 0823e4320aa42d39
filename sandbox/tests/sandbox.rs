//! The sandbox against the real runtimes (assets from `deploy/fetch-assets.sh`): results,
//! isolation, limits and the error type each breach ends with.

use std::{
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use capibara_sandbox::{
    CancelFlag, FailureKind, Language, PythonRuntime, RunRequest, Sandbox, SandboxConfig,
};
use serde_json::{json, Value};

fn assets_dir() -> PathBuf {
    std::env::var("CAPIBARA_ASSETS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.capibara/assets"))
}

fn config() -> SandboxConfig {
    let mut c = SandboxConfig::new(assets_dir());
    c.python = PythonRuntime::Component;
    c
}

/// One sandbox per test process (loading it is a few milliseconds once compiled).
fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        Sandbox::new(config()).expect("sandbox (run deploy/fetch-assets.sh to get the runtimes)")
    })
}

fn req<'a>(language: Language, code: &'a str, context: &'a Value) -> RunRequest<'a> {
    RunRequest {
        language,
        code,
        context,
        timeout: Duration::from_secs(10),
        memory_bytes: 256 << 20,
        cancel: None,
    }
}

fn run(language: Language, code: &str) -> capibara_sandbox::Execution {
    sandbox().run(&req(language, code, &Value::Null))
}

fn failure_kind(e: &capibara_sandbox::Execution) -> FailureKind {
    match &e.outcome {
        Ok(v) => panic!("expected a failure, got result {v} (stdout {:?})", e.stdout),
        Err(f) => f.kind,
    }
}

#[test]
fn python_returns_result_stdout_and_sees_context() {
    let ctx = json!({"rows": [1, 2, 3]});
    let e = sandbox().run(&req(
        Language::Python,
        "import statistics\nprint('hi')\nresult = {'sum': sum(context['rows']), 'mean': statistics.mean(context['rows'])}",
        &ctx,
    ));
    assert_eq!(e.outcome.clone().unwrap(), json!({"sum": 6, "mean": 2}));
    assert_eq!(e.stdout, "hi\n");
    assert_eq!(e.exit_code, 0);
    assert_eq!(e.runtime, "python-component");
}

#[test]
fn javascript_returns_result_stdout_and_sees_context() {
    let ctx = json!({"name": "capibara"});
    let e = sandbox().run(&req(
        Language::Javascript,
        "console.log('hello', context.name);\nlet result = {upper: context.name.toUpperCase(), n: [1,2,3].map(x => x * 2)};",
        &ctx,
    ));
    assert_eq!(
        e.outcome.clone().unwrap(),
        json!({"upper": "CAPIBARA", "n": [2, 4, 6]})
    );
    assert_eq!(e.stdout, "hello capibara\n");
    assert_eq!(e.runtime, "quickjs");
}

#[test]
fn no_result_assigned_gives_null() {
    assert_eq!(run(Language::Python, "x = 1").outcome.unwrap(), Value::Null);
    assert_eq!(
        run(Language::Javascript, "var x = 1").outcome.unwrap(),
        Value::Null
    );
}

#[test]
fn whitelisted_stdlib_modules_import() {
    let e = run(
        Language::Python,
        "import json, re, math, datetime, collections, itertools, statistics, hashlib, decimal\n\
         result = [hashlib.sha256(b'a').hexdigest()[:8], str(decimal.Decimal('1.10') + 1), math.floor(2.5)]",
    );
    assert_eq!(e.outcome.unwrap(), json!(["ca978112", "2.10", 2]));
}

#[test]
fn an_infinite_loop_times_out() {
    for (lang, code) in [
        (Language::Python, "while True:\n    pass"),
        (Language::Javascript, "for (;;) {}"),
    ] {
        let mut r = req(lang, code, &Value::Null);
        r.timeout = Duration::from_millis(300);
        let e = sandbox().run(&r);
        assert_eq!(failure_kind(&e), FailureKind::Timeout, "{lang:?}");
        assert!(
            e.duration >= Duration::from_millis(300),
            "{lang:?}: {:?}",
            e.duration
        );
    }
}

#[test]
fn sleeping_past_the_timeout_times_out() {
    let mut r = req(
        Language::Python,
        "import time\ntime.sleep(30)",
        &Value::Null,
    );
    r.timeout = Duration::from_millis(300);
    let e = sandbox().run(&r);
    assert_eq!(failure_kind(&e), FailureKind::Timeout);
    assert!(e.duration < Duration::from_secs(5), "{:?}", e.duration);
}

#[test]
fn the_smallest_memory_cap_accepted_still_runs_both_languages() {
    for lang in [Language::Python, Language::Javascript] {
        let mut r = req(lang, "result = 1 + 1", &Value::Null);
        r.memory_bytes = 64 << 20; // kinds::CODE_MIN_MEMORY_MB
        assert_eq!(sandbox().run(&r).outcome.unwrap(), json!(2), "{lang:?}");
    }
}

#[test]
fn a_memory_bomb_hits_the_memory_limit() {
    for (lang, code) in [
        (
            Language::Python,
            "x = []\nwhile True:\n    x.append(' ' * 10_000_000)",
        ),
        (
            Language::Javascript,
            "let a = []; for (;;) a.push(new Array(1e6).fill(1));",
        ),
    ] {
        let mut r = req(lang, code, &Value::Null);
        r.memory_bytes = 128 << 20;
        let e = sandbox().run(&r);
        assert_eq!(
            failure_kind(&e),
            FailureKind::MemoryLimit,
            "{lang:?}: {e:?}"
        );
    }
}

#[test]
fn the_host_filesystem_is_not_reachable() {
    let e = run(Language::Python, "result = open('/etc/passwd').read()");
    assert_eq!(failure_kind(&e), FailureKind::RuntimeError);
    let f = e.outcome.unwrap_err();
    assert!(f.message.contains("FileNotFoundError"), "{f:?}");
    assert!(f.traceback.unwrap().contains("line 1"));
    // Nor by climbing out of the scratch dir.
    let e = run(
        Language::Python,
        "result = open('/tmp/../etc/passwd').read()",
    );
    assert_eq!(failure_kind(&e), FailureKind::RuntimeError);

    let e = run(
        Language::Javascript,
        "let f = std.open('/etc/passwd', 'r'); result = f === null ? 'no file' : f.readAsString();",
    );
    assert_eq!(e.outcome.unwrap(), json!("no file"));
}

#[test]
fn the_scratch_dir_is_writable_and_starts_empty_every_run() {
    let e = run(
        Language::Python,
        "import os\nbefore = os.listdir('/tmp')\nopen('/tmp/note.txt', 'w').write('x')\nresult = [before, os.listdir('/tmp')]",
    );
    assert_eq!(e.outcome.unwrap(), json!([[], ["note.txt"]]));
    let e = run(Language::Python, "import os\nresult = os.listdir('/tmp')");
    assert_eq!(e.outcome.unwrap(), json!([]));
}

#[test]
fn filling_the_scratch_dir_past_its_quota_is_a_scratch_limit_failure() {
    let mut c = config();
    c.scratch_limit = 1024 * 1024;
    let sandbox = Sandbox::new(c).expect("sandbox");
    let ctx = Value::Null;
    // Written in a loop (stopped at an epoch tick) and in one burst (found when the run ends).
    for code in [
        "f = open('/tmp/big', 'w')\nwhile True:\n    f.write('x' * 65536)\n    f.flush()",
        "open('/tmp/big', 'w').write('x' * 3_000_000)\nresult = 1",
    ] {
        let e = sandbox.run(&req(Language::Python, code, &ctx));
        assert_eq!(
            failure_kind(&e),
            FailureKind::ScratchLimit,
            "{:?}",
            e.outcome
        );
        assert!(e
            .outcome
            .unwrap_err()
            .message
            .contains("CAPIBARA_CODE_SCRATCH_LIMIT_BYTES"));
    }
    let e = sandbox.run(&req(
        Language::Javascript,
        "let f = std.open('/tmp/big', 'w'); for (;;) f.puts('x'.repeat(65536));",
        &ctx,
    ));
    assert_eq!(
        failure_kind(&e),
        FailureKind::ScratchLimit,
        "{:?}",
        e.outcome
    );
    // Under the quota: fine.
    let e = sandbox.run(&req(
        Language::Python,
        "open('/tmp/small', 'w').write('x' * 500_000)\nresult = 2",
        &ctx,
    ));
    assert_eq!(e.outcome.unwrap(), json!(2));
}

#[test]
fn sockets_processes_and_env_vars_are_unavailable() {
    let e = run(
        Language::Python,
        "import socket\ns = socket.socket()\ns.connect(('1.1.1.1', 80))",
    );
    assert_eq!(failure_kind(&e), FailureKind::RuntimeError);

    let e = run(Language::Python, "import os\nos.system('cat /etc/passwd')");
    assert_eq!(failure_kind(&e), FailureKind::RuntimeError);
    assert!(e.outcome.unwrap_err().message.contains("system"));

    let e = run(
        Language::Python,
        "import subprocess\nsubprocess.run(['ls'])",
    );
    assert_eq!(failure_kind(&e), FailureKind::RuntimeError);

    let e = run(Language::Python, "import os\nresult = dict(os.environ)");
    assert_eq!(e.outcome.unwrap(), json!({}));

    let e = run(
        Language::Javascript,
        "result = std.getenviron ? std.getenviron() : {}",
    );
    assert_eq!(e.outcome.unwrap(), json!({}));
    let e = run(Language::Javascript, "result = os.exec(['ls'])");
    assert_eq!(failure_kind(&e), FailureKind::RuntimeError);
}

#[test]
fn huge_output_is_cut_at_the_cap_and_reported() {
    for (lang, code) in [
        (Language::Python, "while True:\n    print('x' * 1000)"),
        (
            Language::Javascript,
            "for (;;) console.log('x'.repeat(1000))",
        ),
    ] {
        let e = run(lang, code);
        assert_eq!(
            failure_kind(&e),
            FailureKind::OutputLimit,
            "{lang:?}: {:?}",
            e.outcome
        );
        assert!(e.truncated);
        assert_eq!(
            e.stdout.len(),
            capibara_sandbox::DEFAULT_OUTPUT_LIMIT,
            "{lang:?}"
        );
    }
    let e = run(Language::Python, "result = 'y' * 2_000_000");
    assert_eq!(failure_kind(&e), FailureKind::OutputLimit);
}

#[test]
fn errors_carry_the_traceback_or_stack() {
    let e = run(
        Language::Python,
        "def f():\n    raise ValueError('boom')\nf()",
    );
    assert_eq!(e.exit_code, 1);
    let f = e.outcome.unwrap_err();
    assert_eq!(f.kind, FailureKind::RuntimeError);
    assert_eq!(f.message, "ValueError: boom");
    let tb = f.traceback.unwrap();
    assert!(tb.contains("line 2, in f") && tb.contains("line 3"), "{tb}");

    let e = run(
        Language::Javascript,
        "function f() { throw new TypeError('bad'); }\nf();",
    );
    let f = e.outcome.unwrap_err();
    assert_eq!(f.kind, FailureKind::RuntimeError);
    assert_eq!(f.message, "TypeError: bad");
    assert!(f.traceback.unwrap().contains("at f"));
}

#[test]
fn exit_codes_are_reported() {
    let e = run(Language::Python, "import sys\nsys.exit(3)");
    assert_eq!(e.exit_code, 3);
    assert_eq!(failure_kind(&e), FailureKind::RuntimeError);
    let e = run(Language::Python, "import sys\nresult = 5\nsys.exit(0)");
    assert_eq!(e.exit_code, 0);
    assert!(e.outcome.is_ok());
    let e = run(Language::Javascript, "std.exit(4)");
    assert_eq!(e.exit_code, 4);
    assert_eq!(failure_kind(&e), FailureKind::RuntimeError);
}

#[test]
fn no_state_leaks_between_runs() {
    let first = run(
        Language::Python,
        "import json, sys, builtins\njson.leak = 1\nbuiltins.leak = 2\nsys.modules['leak'] = json\nLEAK = 3\nresult = 'set'",
    );
    assert_eq!(first.outcome.unwrap(), json!("set"));
    let second = run(
        Language::Python,
        "import json, sys, builtins\nresult = [hasattr(json, 'leak'), hasattr(builtins, 'leak'), 'leak' in sys.modules, 'LEAK' in globals()]",
    );
    assert_eq!(second.outcome.unwrap(), json!([false, false, false, false]));

    run(
        Language::Javascript,
        "globalThis.leak = 1; Array.prototype.leak = 2;",
    );
    let e = run(
        Language::Javascript,
        "result = [typeof globalThis.leak, typeof [].leak]",
    );
    assert_eq!(e.outcome.unwrap(), json!(["undefined", "undefined"]));
}

#[test]
fn fifty_concurrent_runs_each_get_their_own_result() {
    let sandbox: &'static Sandbox = sandbox();
    let handles: Vec<_> = (0..50)
        .map(|i| {
            std::thread::spawn(move || {
                let lang = if i % 2 == 0 {
                    Language::Python
                } else {
                    Language::Javascript
                };
                let ctx = json!({"i": i});
                let code = match lang {
                    Language::Python => "result = context['i'] * 2",
                    Language::Javascript => "result = context.i * 2",
                };
                let e = sandbox.run(&req(lang, code, &ctx));
                (i, e.outcome)
            })
        })
        .collect();
    for h in handles {
        let (i, outcome) = h.join().unwrap();
        assert_eq!(outcome.unwrap(), json!(i * 2));
    }
}

#[test]
fn cancel_stops_a_running_run() {
    let cancel = CancelFlag::new();
    let mut r = req(Language::Python, "while True:\n    pass", &Value::Null);
    r.cancel = Some(cancel.clone());
    let canceler = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        cancel.cancel();
    });
    let e = sandbox().run(&r);
    canceler.join().unwrap();
    assert_eq!(failure_kind(&e), FailureKind::Canceled);
}

#[test]
fn syntax_checks_give_line_and_column() {
    let s = sandbox();
    assert!(s.check(Language::Python, "x = 1\n").unwrap().valid);
    let v = s.check(Language::Python, "x = 1\ny = (2 +\n").unwrap();
    assert!(!v.valid);
    assert_eq!(v.line, Some(2));
    assert!(v.column.is_some());
    assert!(v.message.unwrap().starts_with("SyntaxError"));

    assert!(s.check(Language::Javascript, "let x = 1;").unwrap().valid);
    let v = s
        .check(Language::Javascript, "let x = 1;\nlet y = (2 + ;")
        .unwrap();
    assert!(!v.valid, "{v:?}");
    assert_eq!(v.line, Some(2));
    assert!(v.column.is_some());
    // Checking does not run the code.
    assert!(s.check(Language::Javascript, "for (;;) {}").unwrap().valid);
    assert!(s.check(Language::Python, "while True: pass").unwrap().valid);
}

#[test]
fn compiled_modules_are_cached_by_hash_version_and_settings() {
    let s = sandbox();
    let files: Vec<String> = std::fs::read_dir(config().cache_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let hash = s.settings_hash();
    for name in ["python-component", "quickjs"] {
        assert!(
            files.iter().any(|f| f.starts_with(name)
                && f.contains(&format!("wasmtime{}", capibara_sandbox::WASMTIME_VERSION))
                && f.contains(&hash)
                && f.ends_with(".cwasm")),
            "{name} not in {files:?}"
        );
    }
    // A second sandbox loads from the cache instead of compiling.
    let again = Sandbox::new(config()).unwrap();
    assert!(again.startup().compiled.is_empty(), "{:?}", again.startup());
}

#[test]
fn the_cpython_wasi_fallback_runs_python_too() {
    let mut c = config();
    c.python = PythonRuntime::Wasi;
    let s = Arc::new(Sandbox::new(c).unwrap());
    let ctx = json!({"a": 20});
    let e = s.run(&req(
        Language::Python,
        "print('x')\nresult = context['a'] + 22",
        &ctx,
    ));
    assert_eq!(e.runtime, "python-wasi");
    assert_eq!(e.outcome.unwrap(), json!(42));
    assert_eq!(e.stdout, "x\n");

    let e = s.run(&req(Language::Python, "open('/etc/passwd')", &Value::Null));
    assert_eq!(failure_kind(&e), FailureKind::RuntimeError);
    let mut r = req(Language::Python, "while True: pass", &Value::Null);
    r.timeout = Duration::from_millis(300);
    assert_eq!(failure_kind(&s.run(&r)), FailureKind::Timeout);
    let v = s.check(Language::Python, "def (:").unwrap();
    assert_eq!(v.line, Some(1));
}

/// The binding rule of docs/code.md, checked the same way in every runtime: identifier keys are
/// variables; other keys, keywords, `context`/`result` and (JavaScript) existing globals are
/// only under `context`.
fn context_keys_are_variables_in(s: &Sandbox, language: Language, runtime: &str) {
    let ctx = json!({"x": 5, "y": 3});
    let e = s.run(&req(language, "result = x * y", &ctx));
    assert_eq!(e.runtime, runtime);
    assert_eq!(e.outcome.unwrap(), json!(15), "{}", e.stderr);

    let ctx = json!({"my-key": 2, "class": 3, "context": 4, "result": 7, "n": 1,
                     "JSON": 9, "Math": 9, "std": 9, "__proto__": 9, "__name__": 9});
    let code = match language {
        Language::Python => concat!(
            "assert 'my-key' not in globals() and context['my-key'] == 2\n",
            "assert context['class'] == 3 and isinstance(context, dict)\n",
            "assert context['context'] == 4 and __name__ == '__main__'\n",
            "result = [n, context['result']]",
        ),
        Language::Javascript => concat!(
            "if (typeof JSON.stringify !== 'function' || Math.max(1, 2) !== 2) throw new Error('globals');\n",
            "if (context['my-key'] !== 2 || context['class'] !== 3 || context.context !== 4) throw new Error('context');\n",
            "if (context.JSON !== 9) throw new Error('context.JSON');\n",
            "result = [n, context.result];",
        ),
    };
    let e = s.run(&req(language, code, &ctx));
    assert_eq!(e.outcome.unwrap(), json!([1, 7]), "{}", e.stderr);
    // `result` in the context is not the run's result: only the code assigns that.
    let e = s.run(&req(language, "n + 1", &json!({"n": 1, "result": 7})));
    assert_eq!(e.outcome.unwrap(), Value::Null, "{}", e.stderr);
    // A context that is not an object binds nothing but `context`.
    let e = s.run(&req(language, "result = context", &json!([1, 2])));
    assert_eq!(e.outcome.unwrap(), json!([1, 2]), "{}", e.stderr);
    // Assigning to the variable leaves `context` as it was.
    let code = match language {
        Language::Python => {
            "x = x + 1
result = [x, context['x']]"
        }
        Language::Javascript => "x = x + 1; result = [x, context.x];",
    };
    let e = s.run(&req(language, code, &json!({"x": 1})));
    assert_eq!(e.outcome.unwrap(), json!([2, 1]), "{}", e.stderr);
}

#[test]
fn context_keys_are_variables_in_every_runtime() {
    context_keys_are_variables_in(sandbox(), Language::Python, "python-component");
    context_keys_are_variables_in(sandbox(), Language::Javascript, "quickjs");
    let mut c = config();
    c.python = PythonRuntime::Wasi;
    let wasi = Sandbox::new(c).unwrap();
    context_keys_are_variables_in(&wasi, Language::Python, "python-wasi");
}

#[test]
fn fuel_bounds_cpu_when_enabled() {
    let mut c = config();
    // Enough for QuickJS to start and run the wrapper (which binds context keys), far too
    // little for an endless loop.
    c.fuel = Some(20_000_000);
    let s = Sandbox::new(c).unwrap();
    let e = s.run(&req(Language::Javascript, "for (;;) {}", &Value::Null));
    assert_eq!(failure_kind(&e), FailureKind::CpuLimit);
    let e = s.run(&req(Language::Javascript, "result = 1 + 1", &Value::Null));
    assert_eq!(e.outcome.unwrap(), json!(2));
}
