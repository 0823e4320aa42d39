//! Fuzzing every operation of the served `/openapi.json` with schemathesis (PyPI; deploy/test.sh
//! installs it into target/capibara-test/openapi-tools, `CAPIBARA_TEST_OPENAPI_TOOLS` names its
//! `bin`): inputs the schema allows and inputs it forbids, against the real API with a worker.
//! Checks (chosen in tests/schemathesis.toml): no 5xx, every status code, content type, header and
//! body as documented, and input the schema allows is accepted (the .toml lists the operations where that last check is off,
//! each with why). The command and its bounds are in docs/testing.md (keep them in step).

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use capibara_tests::{TestEnv, ADMIN_KEY};
use serde_json::Value;

/// Operations the fuzzer leaves out, each with why (docs/testing.md lists them too).
const NOT_FUZZED: &[(&str, &str)] = &[(
    "streamTts",
    "a WebSocket upgrade: schemathesis speaks plain HTTP, so every call is a refused handshake \
     that checks nothing",
)];

/// Test cases per operation, and the wall-clock bound of the whole run.
const MAX_EXAMPLES: &str = "10";
const RUN_BOUND: Duration = Duration::from_secs(240);

fn schemathesis() -> PathBuf {
    let dir = std::env::var_os("CAPIBARA_TEST_OPENAPI_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/capibara-test/openapi-tools/bin")
        });
    let path = dir.join("schemathesis");
    assert!(
        path.exists(),
        "{} is missing: deploy/test.sh installs schemathesis from PyPI into \
         target/capibara-test/openapi-tools (or point CAPIBARA_TEST_OPENAPI_TOOLS at a bin \
         directory holding it)",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn fuzzing_every_operation_finds_no_server_error_and_no_schema_mismatch() {
    let schemathesis = schemathesis();
    let env = TestEnv::new().await;
    // A worker, so the operations that wait for a job (code, TTS, `Prefer: wait`) finish.
    let _procs = env.spawn_all().await;
    let doc: Value = reqwest::get(format!("{}/openapi.json", env.api_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let operations: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();

    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemathesis.toml");
    let work = std::env::temp_dir().join(format!("capibara-schemathesis-{}", env.api_port));
    std::fs::create_dir_all(&work).unwrap();
    let log = work.join("output.txt");
    // Fix-ups for the rules JSON Schema cannot state (cross-field, this deployment, cron and
    // template syntax); each is listed in the file.
    let hooks = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemathesis_hooks.py");
    let mut cmd = Command::new(schemathesis);
    cmd.current_dir(&work)
        .env("SCHEMATHESIS_HOOKS", &hooks)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/openapi.json", env.api_url()))
        .args(["--header", &format!("Authorization: Bearer {ADMIN_KEY}")])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--seed", "1", "--no-color", "--generation-database", "none"]);
    for (id, _why) in NOT_FUZZED {
        cmd.args(["--exclude-operation-id", id]);
    }
    let out = std::fs::File::create(&log).unwrap();
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("starting schemathesis");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > RUN_BOUND {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let elapsed = started.elapsed();
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&work);
    eprintln!("schemathesis: {operations} operations documented, ran {elapsed:?}\n{output}");
    let status = status.unwrap_or_else(|| {
        panic!("schemathesis ran past its {RUN_BOUND:?} bound and was stopped (output above)")
    });
    assert!(
        status.success(),
        "schemathesis found failures (output above)"
    );
    // Every documented operation but the listed exclusions was tested.
    let tested = operations - NOT_FUZZED.len();
    assert!(
        output.contains(&format!("Tested: {tested}")),
        "schemathesis did not test all {tested} operations (output above)"
    );
}
