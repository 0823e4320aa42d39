//! The CLI as an operator uses it against the real binaries: `jobs list` and `jobs tail` (table
//! and JSON), `runs list` and `runs watch` (exit status by the run's end), and shell completions
//! that bash itself loads.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
    time::Duration,
};

use capibara_tests::{runs as workflows, Api, TestEnv};
use serde_json::{json, Value};

fn cli(api: &Api, args: &[&str]) -> Command {
    let mut c = Command::new(capibara_tests::bin("capibara"));
    c.args(args)
        .env("CAPIBARA_URL", &api.base)
        .env("CAPIBARA_API_KEY", &api.key);
    c
}

async fn run(api: &Api, args: &[&str]) -> Output {
    let mut c = cli(api, args);
    tokio::task::spawn_blocking(move || c.output().expect("capibara runs"))
        .await
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn jobs_list_and_tail_print_tables_and_json() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let id = api
        .submit_id(json!({"kind": "echo", "input": {"n": 1}, "tags": {"cli": "t"}}))
        .await;
    api.wait_terminal(&id, Duration::from_secs(30)).await;

    let o = run(&api, &["jobs", "list", "--tag", "cli:t", "-o", "json"]).await;
    assert!(o.status.success(), "{o:?}");
    let page: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(page["items"][0]["id"], id.as_str());
    let o = run(&api, &["jobs", "list", "--kind", "echo"]).await;
    assert!(o.status.success(), "{o:?}");
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("ID "), "{text}");
    assert!(lines[0].contains("STATUS"), "{text}");
    let row = lines.iter().find(|l| l.starts_with(&id)).expect(&text);
    assert!(row.contains("succeeded") && row.contains("1/"), "{row}");
    // A bad filter is the API's problem, printed, and a failure.
    let o = run(&api, &["jobs", "list", "--status", "nope"]).await;
    assert!(!o.status.success());
    assert!(stdout(&o).contains("status"), "{o:?}");

    // The history, from the beginning of the log: one row per event of the job.
    let events = api.events(&id).await;
    let n = events.len().to_string();
    let o = run(
        &api,
        &[
            "jobs",
            "tail",
            "--after",
            "0",
            "--kind",
            "echo",
            "--max-events",
            &n,
        ],
    )
    .await;
    assert!(o.status.success(), "{o:?}");
    let text = stdout(&o);
    assert!(text.starts_with("TIME "), "{text}");
    assert_eq!(text.lines().count(), events.len() + 1, "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains(&id) && l.contains("JobSucceeded") && l.contains("echo")),
        "{text}"
    );

    // Live: from the moment it connects. Jobs are submitted until it has seen two events.
    let mut tail = cli(
        &api,
        &[
            "jobs",
            "tail",
            "--kind",
            "sleep",
            "-o",
            "json",
            "--max-events",
            "2",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let out = tail.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(out)
            .lines()
            .map(|l| l.unwrap())
            .collect::<Vec<_>>()
    });
    for _ in 0..100 {
        if reader.is_finished() {
            break;
        }
        api.submit_id(json!({"kind": "sleep", "input": {"ms": 1}}))
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lines = reader.join().unwrap();
    assert!(tail.wait().unwrap().success());
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        let e: Value = serde_json::from_str(l).unwrap();
        assert_eq!(e["stream_type"], "job");
        assert_eq!(e["metadata"]["kind"], "sleep");
    }
}

#[tokio::test]
async fn runs_watch_follows_a_run_to_its_end_and_exits_by_its_status() {
    let env = TestEnv::new().await;
    let _procs = env.spawn_all().await;
    let api = env.client();
    let wf = workflows::create(
        &api,
        json!({"name": "cli-watch", "steps": [
            {"id": "nap", "kind": "sleep", "input": {"ms": 600}},
            {"id": "after", "kind": "echo", "depends_on": ["nap"], "input": {"ok": true}}]}),
    )
    .await;
    let run_id = workflows::start(&api, &wf, json!({})).await;
    let o = run(&api, &["runs", "watch", &run_id, "-o", "json"]).await;
    assert!(o.status.success(), "{o:?}");
    let states: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(states.len() >= 2, "one line per change: {states:?}");
    let last = states.last().unwrap();
    assert_eq!(last["status"], "succeeded");
    assert!(last["steps"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["status"] == "succeeded"));

    // Table output (not a terminal: the tables follow one another).
    let o = run(&api, &["runs", "watch", &run_id]).await;
    assert!(o.status.success(), "{o:?}");
    let text = stdout(&o);
    assert!(
        text.starts_with(&format!("run {run_id}  cli-watch  succeeded")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("nap ") && l.contains("succeeded")),
        "{text}"
    );

    let o = run(&api, &["runs", "list"]).await;
    assert!(o.status.success(), "{o:?}");
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with(&run_id) && l.contains("2/2")),
        "{o:?}"
    );

    // A run that fails: watch exits non-zero.
    let failing = workflows::create(
        &api,
        json!({"name": "cli-fail", "steps": [
            {"id": "boom", "kind": "fail", "input": {"message": "nope"}}]}),
    )
    .await;
    let bad = workflows::start(&api, &failing, json!({})).await;
    let o = run(&api, &["runs", "watch", &bad]).await;
    assert!(!o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("run ended failed"),
        "{o:?}"
    );
    // Not a run: the API's 404, and a failure.
    let o = run(
        &api,
        &["runs", "watch", "0193a5b0-0000-7000-8000-000000000000"],
    )
    .await;
    assert!(!o.status.success());
    assert!(
        stdout(&o).contains("404") || stdout(&o).contains("not"),
        "{o:?}"
    );
}

#[test]
fn completions_load_in_bash_and_name_the_commands() {
    let script = Command::new(capibara_tests::bin("capibara"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(script.status.success());
    let text = String::from_utf8(script.stdout).unwrap();
    for word in ["jobs", "runs", "tail", "watch", "completions"] {
        assert!(text.contains(word), "{word} missing");
    }
    let path =
        std::env::temp_dir().join(format!("capibara-completion-{}.bash", std::process::id()));
    std::fs::write(&path, &text).unwrap();
    // bash loads it and registers the completion; then asks it to complete `capibara jobs t`.
    let check = format!(
        "source {}; complete -p capibara >/dev/null && COMP_WORDS=(capibara jobs t); \
         COMP_CWORD=2; COMP_LINE='capibara jobs t'; COMP_POINT=15; _capibara capibara t jobs \
         && echo \"${{COMPREPLY[@]}}\"",
        path.display()
    );
    let o = Command::new("bash").args(["-c", &check]).output().unwrap();
    std::fs::remove_file(&path).ok();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "tail", "{o:?}");
    for shell in ["zsh", "fish"] {
        let o = Command::new(capibara_tests::bin("capibara"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(o.status.success() && !o.stdout.is_empty(), "{shell}");
    }
}
