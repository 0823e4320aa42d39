//! The chaos suite's CI profile: `capibara chaos --profile short` (1,000 submissions of mixed
//! kinds over 90 s while workers are SIGKILLed every 2 s, an API and the leading scheduler are
//! killed, Redis restarts empty, Postgres restarts fast and immediate, and the network to Redis
//! and to Postgres is cut for 10 s each), then the exact account from the event log. The
//! command exits non-zero when a promise broke; its report is printed here for the CI log.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

#[test]
fn the_short_chaos_profile_loses_nothing_and_completes_nothing_twice() {
    let dir =
        std::env::temp_dir().join(format!("capibara-chaos-{}", uuid::Uuid::now_v7().simple()));
    // At a lower priority (its Postgres, Redis and processes inherit it): it asserts no
    // timing, and its nine processes would otherwise starve the tests running beside it.
    // The drain is cut at 120 s (not the command's 300 s) so that a run that does not drain
    // ends in its report, inside the test's time limit.
    let mut child = Command::new("nice")
        .args(["-n", "10"])
        .arg(capibara_tests::bin("capibara-bench"))
        .args([
            "chaos",
            "--profile",
            "short",
            "--drain-secs",
            "120",
            "--dir",
        ])
        .arg(&dir)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("capibara-bench runs");
    let stderr = child.stderr.take().expect("piped stderr");
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut text);
        text
    });
    // Line by line as the run prints them: a run killed at the time limit still shows how far
    // it got in the test's output.
    let mut stdout = String::new();
    for line in BufReader::new(child.stdout.take().expect("piped stdout"))
        .lines()
        .map_while(Result::ok)
    {
        println!("{line}");
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let status = child.wait().expect("capibara-bench exits");
    let stderr = stderr.join().unwrap_or_default();
    assert!(
        status.success(),
        "the chaos run failed ({status}); logs in {}:\n{stderr}",
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
