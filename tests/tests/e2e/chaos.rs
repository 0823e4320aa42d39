//! The chaos suite's CI profile: `capibara chaos --profile short` (1,000 submissions of mixed
//! kinds over 90 s while workers are SIGKILLed every 2 s, an API and the leading scheduler are
//! killed, Redis restarts empty, Postgres restarts fast and immediate, and the network to Redis
//! and to Postgres is cut for 10 s each), then the exact account from the event log. The
//! command exits non-zero when a promise broke; its report is printed here for the CI log.

use std::process::Command;

#[test]
fn the_short_chaos_profile_loses_nothing_and_completes_nothing_twice() {
    let dir =
        std::env::temp_dir().join(format!("capibara-chaos-{}", uuid::Uuid::now_v7().simple()));
    // At a lower priority (its Postgres, Redis and processes inherit it): it asserts no
    // timing, and its nine processes would otherwise starve the tests running beside it.
    let out = Command::new("nice")
        .args(["-n", "10"])
        .arg(capibara_tests::bin("capibara-bench"))
        .args(["chaos", "--profile", "short", "--dir"])
        .arg(&dir)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("capibara-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the chaos run failed ({}); logs in {}:\n{stdout}\n{stderr}",
        out.status,
        dir.display()
    );
    // The figures the promise is about, as printed.
    let line = stdout
        .lines()
        .find(|l| l.starts_with("terminal "))
        .expect("an accounting line");
    assert!(
        line.contains("/ lost 0 / not terminal 0 / completed twice 0"),
        "{line}"
    );
    let accepted: usize = stdout
        .lines()
        .find(|l| l.contains("in all;"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.replace(',', "").parse().ok())
        .expect("the accepted count");
    assert!(
        accepted >= 1_000,
        "every submission was accepted in the end: {accepted}"
    );
    for fault in [
        "Redis SIGKILLed, restarted empty",
        "Postgres restarted (immediate shutdown, crash recovery)",
        "network to Postgres cut for 10 s",
        "leading scheduler SIGKILLed, restarted",
    ] {
        assert!(stdout.contains(fault), "the run injected `{fault}`");
    }
    assert!(stdout.contains("RESULT: every promise held"));
    let _ = std::fs::remove_dir_all(&dir);
}
