//! `capibara runs list` and `capibara runs watch`: workflow runs as tables, a run's steps redrawn
//! live from its event stream until it ends.

use std::io::IsTerminal;

use anyhow::bail;
use clap::{Args, Subcommand};
use reqwest::header;
use serde_json::Value;

use crate::{
    client::{list_page, print, query, Conn, Sse},
    output::{cell, when, Output, Table},
};

#[derive(Subcommand)]
pub enum RunsCommand {
    /// List runs, newest first: `capibara runs list --status running`.
    List(ListRuns),
    /// Show a run's steps and redraw them on each of its events until it ends; exits non-zero
    /// unless it succeeded: `capibara runs watch <id>`.
    Watch(WatchRun),
}

#[derive(Args)]
pub struct ListRuns {
    #[command(flatten)]
    conn: Conn,
    #[arg(long)]
    workflow_id: Option<String>,
    /// queued, running, waiting, succeeded, failed or canceled.
    #[arg(long)]
    status: Option<String>,
    #[arg(long, default_value_t = 20)]
    limit: u32,
    #[arg(long)]
    cursor: Option<String>,
    #[arg(long, short, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Args)]
pub struct WatchRun {
    #[command(flatten)]
    conn: Conn,
    id: String,
    /// `json`: the run, one line per change.
    #[arg(long, short, value_enum, default_value = "table")]
    output: Output,
}

pub async fn run(command: RunsCommand) -> anyhow::Result<()> {
    match command {
        RunsCommand::List(a) => list(a).await,
        RunsCommand::Watch(a) => watch(a).await,
    }
}

async fn list(a: ListRuns) -> anyhow::Result<()> {
    let query = query(
        [
            ("limit", Some(a.limit.to_string())),
            ("workflow_id", a.workflow_id),
            ("status", a.status),
            ("cursor", a.cursor),
        ],
        [],
    );
    let headers = ["ID", "WORKFLOW", "STATUS", "STEPS", "CREATED", "FINISHED"];
    list_page(&a.conn, "/v1/runs", &query, a.output, &headers, |r| {
        vec![
            cell(&r["id"]),
            cell(&r["workflow_name"]),
            cell(&r["status"]),
            steps_done(r),
            when(&r["created_at"]),
            when(&r["finished_at"]),
        ]
    })
    .await
}

/// `finished/total` steps.
fn steps_done(run: &Value) -> String {
    let steps = run["steps"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let done = steps
        .iter()
        .filter(|s| {
            matches!(
                s["status"].as_str(),
                Some("succeeded" | "failed" | "skipped" | "canceled")
            )
        })
        .count();
    format!("{done}/{}", steps.len())
}

/// The run and its steps as a table.
fn render(run: &Value) -> String {
    let mut out = format!(
        "run {}  {}  {}\n",
        cell(&run["id"]),
        cell(&run["workflow_name"]),
        cell(&run["status"])
    );
    let mut table = Table::new(&[
        "STEP", "KIND", "STATUS", "ATTEMPT", "JOB", "STARTED", "FINISHED", "NOTE",
    ]);
    for s in run["steps"].as_array().into_iter().flatten() {
        let note = match (&s["error"], &s["reason"]) {
            (Value::Object(e), _) => format!("{}: {}", cell(&e["type"]), cell(&e["message"])),
            (Value::String(e), _) => e.clone(),
            (_, Value::String(r)) => r.clone(),
            _ => "-".into(),
        };
        table.row(vec![
            cell(&s["id"]),
            cell(&s["kind"]),
            cell(&s["status"]),
            cell(&s["attempt"]),
            cell(&s["job_id"]),
            when(&s["started_at"]),
            when(&s["finished_at"]),
            note,
        ]);
    }
    out.push_str(&table.render());
    out
}

fn terminal(run: &Value) -> bool {
    matches!(
        run["status"].as_str(),
        Some("succeeded" | "failed" | "canceled")
    )
}

async fn watch(a: WatchRun) -> anyhow::Result<()> {
    let client = a.conn.client()?;
    let url = a.conn.at(&format!("/v1/runs/{}", a.id));
    let redraw = std::io::stdout().is_terminal() && a.output == Output::Table;
    let show = |run: &Value| match a.output {
        Output::Json => println!("{run}"),
        Output::Table if redraw => print!("\x1b[H\x1b[2J{}", render(run)),
        Output::Table => println!("{}", render(run)),
    };
    let res = client.get(&url).send().await?;
    if !res.status().is_success() {
        return print(res).await.map(drop);
    }
    let mut run: Value = res.json().await?;
    let mut last = run["stream_version"].clone();
    show(&run);
    if !terminal(&run) {
        let res = client
            .get(format!("{url}/events"))
            .query(&[("after", "0")])
            .header(header::ACCEPT, "text/event-stream")
            .send()
            .await?;
        if !res.status().is_success() {
            return print(res).await.map(drop);
        }
        let mut frames = Sse::new(res);
        // The stream ends after the run's last event.
        while frames.next().await?.is_some() {
            run = client
                .get(&url)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            if run["stream_version"] != last {
                last = run["stream_version"].clone();
                show(&run);
            }
            if terminal(&run) {
                break;
            }
        }
    }
    match run["status"].as_str() {
        Some("succeeded") => Ok(()),
        Some(s) => bail!("run ended {s}"),
        None => bail!("the run has no status"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_run_renders_as_its_steps() {
        let run = json!({"id": "r1", "workflow_name": "hello", "status": "running",
            "steps": [
                {"id": "a", "kind": "echo", "status": "succeeded", "attempt": 1, "job_id": "j1",
                 "started_at": "2026-12-05T21:40:01.5Z", "finished_at": "2026-12-05T21:40:02.5Z"},
                {"id": "b", "kind": "fail", "status": "failed", "attempt": 2,
                 "error": {"type": "boom", "message": "no"}},
                {"id": "c", "kind": "echo", "status": "skipped", "attempt": 0, "reason": "when false"}]});
        let text = render(&run);
        assert!(text.starts_with("run r1  hello  running\n"), "{text}");
        assert!(text.contains("2026-12-05 21:40:02"), "{text}");
        assert!(text.contains("boom: no"), "{text}");
        assert!(text.contains("when false"), "{text}");
        assert_eq!(steps_done(&run), "3/3");
        assert!(!terminal(&run));
    }
}
