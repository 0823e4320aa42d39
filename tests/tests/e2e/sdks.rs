//! The SDKs' own test suites (sdk/python, sdk/typescript), run against the real binaries:
//! api + built-in worker + scheduler of a test environment (visibility timeout 3 s). Each suite
//! submits and waits, streams with resume, runs its worker with progress, cancels a running
//! handler, retries, SIGKILLs a worker process and sees its job run again, has a stale lease
//! refused, and shuts a worker down gracefully (see each SDK's README, "Tests").

use std::{path::PathBuf, process::Command};

use capibara_tests::{TestEnv, ADMIN_KEY};

fn sdk_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("sdk")
        .join(name)
}

/// Run `cmd` in `dir` against `env`'s API; returns its combined output, after asserting it
/// passed.
async fn run_suite(env: &TestEnv, dir: PathBuf, program: &str, args: &[&str]) -> String {
    let out = tokio::task::spawn_blocking({
        let url = env.api_url();
        let program = program.to_string();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        move || {
            Command::new(program)
                .args(args)
                .current_dir(dir)
                .env("CAPIBARA_URL", url)
                .env("CAPIBARA_API_KEY", ADMIN_KEY)
                .output()
                .expect("starting the SDK's tests")
        }
    })
    .await
    .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the SDK's tests failed:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_sdk_passes_its_suite_against_the_real_binaries() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let out = run_suite(
        &env,
        sdk_dir("python"),
        "python3",
        &["-m", "unittest", "discover", "-s", "tests", "-v"],
    )
    .await;
    // Every test ran: none skipped for want of a server.
    let ran = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")?
                .split_whitespace()
                .next()?
                .parse::<u32>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no unittest summary:\n{out}"));
    assert!(ran >= 40, "only {ran} tests ran:\n{out}");
    assert!(!out.contains("skipped="), "tests were skipped:\n{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_typescript_sdk_passes_its_suite_against_the_real_binaries() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let out = run_suite(&env, sdk_dir("typescript"), "node", &["--test", "test/"]).await;
    let count = |what: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(what)?.trim().parse::<u32>().ok())
            .unwrap_or_else(|| panic!("no `{what}` in the node:test summary:\n{out}"))
    };
    assert!(count("# pass") >= 50, "{out}");
    assert_eq!(count("# fail"), 0, "{out}");
    assert_eq!(count("# skipped"), 0, "server tests were skipped:\n{out}");
}
