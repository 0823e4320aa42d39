//! `capibara jobs list` (a page of jobs as a table) and `capibara jobs tail` (every job event of
//! the namespace as it happens, from the event firehose).

use anyhow::bail;
use clap::{Args, Subcommand};
use reqwest::header;
use serde_json::Value;

use crate::{
    client::{list_page, print, query, Conn, Sse},
    output::{cell, clock, when, Output},
};

#[derive(Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first: `capibara jobs list --status failed --kind echo`.
    List(ListJobs),
    /// Print job events live as they happen (`GET /v1/events` over SSE), one row each, until
    /// interrupted: `capibara jobs tail --kind echo`.
    Tail(TailJobs),
}

#[derive(Args)]
pub struct ListJobs {
    #[command(flatten)]
    conn: Conn,
    /// queued, scheduled, running, succeeded, failed or canceled.
    #[arg(long)]
    status: Option<String>,
    #[arg(long)]
    kind: Option<String>,
    #[arg(long)]
    queue: Option<String>,
    /// `key:value`, repeatable (all must hold).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Jobs per page (1–500).
    #[arg(long, default_value_t = 20)]
    limit: u32,
    /// Continue after this cursor (a previous page's `next_cursor`).
    #[arg(long)]
    cursor: Option<String>,
    #[arg(long, short, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Args)]
pub struct TailJobs {
    #[command(flatten)]
    conn: Conn,
    /// Only jobs of this kind.
    #[arg(long)]
    kind: Option<String>,
    /// `key:value`, repeatable (all must hold).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Only these event types, comma-separated (`JobSucceeded,JobFailed`).
    #[arg(long)]
    types: Option<String>,
    /// Start after this event id (`0`: the whole history) instead of from now.
    #[arg(long)]
    after: Option<String>,
    /// Stop after this many events.
    #[arg(long)]
    max_events: Option<u64>,
    #[arg(long, short, value_enum, default_value = "table")]
    output: Output,
}

pub async fn run(command: JobsCommand) -> anyhow::Result<()> {
    match command {
        JobsCommand::List(a) => list(a).await,
        JobsCommand::Tail(a) => tail(a).await,
    }
}

async fn list(a: ListJobs) -> anyhow::Result<()> {
    let query = query(
        [
            ("limit", Some(a.limit.to_string())),
            ("status", a.status),
            ("kind", a.kind),
            ("queue", a.queue),
            ("cursor", a.cursor),
        ],
        a.tags.into_iter().map(|t| ("tag", t)),
    );
    let headers = ["ID", "KIND", "QUEUE", "STATUS", "ATTEMPT", "CREATED", "WHY"];
    list_page(&a.conn, "/v1/jobs", &query, a.output, &headers, |j| {
        vec![
            cell(&j["id"]),
            cell(&j["kind"]),
            cell(&j["queue"]),
            cell(&j["status"]),
            format!("{}/{}", j["attempt"], j["max_attempts"]),
            when(&j["created_at"]),
            why(j),
        ]
    })
    .await
}

/// Why a job is where it is: its error, or what it waits for.
fn why(job: &Value) -> String {
    if let Some(e) = job["error"].as_object() {
        return format!("{}: {}", cell(&e["type"]), cell(&e["message"]));
    }
    match job["waiting"]["reason"].as_str() {
        Some(r) => match job["waiting"]["key"].as_str() {
            Some(k) => format!("{r} ({k})"),
            None => r.to_string(),
        },
        None => "-".into(),
    }
}

async fn tail(a: TailJobs) -> anyhow::Result<()> {
    let query = query(
        [
            ("stream_type", Some("job".to_string())),
            ("kind", a.kind),
            ("types", a.types),
            ("after", a.after),
        ],
        a.tags.into_iter().map(|t| ("tag", t)),
    );
    let res = a
        .conn
        .client()?
        .get(a.conn.at("/v1/events"))
        .query(&query)
        .header(header::ACCEPT, "text/event-stream")
        .send()
        .await?;
    if !res.status().is_success() {
        return print(res).await.map(drop);
    }
    // Rows are printed as events come, so the columns are fixed (a job id is 36 characters).
    let row = |t: &str, job: &str, kind: &str, event: &str, detail: &str| {
        format!("{t:<12}  {job:<36}  {kind:<16}  {event:<18}  {detail}")
            .trim_end()
            .to_string()
    };
    if a.output == Output::Table {
        println!("{}", row("TIME", "JOB", "KIND", "EVENT", "DETAIL"));
    }
    let mut frames = Sse::new(res);
    let mut seen = 0;
    while let Some(frame) = frames.next().await? {
        let Ok(e) = serde_json::from_str::<Value>(&frame.data) else {
            continue;
        };
        match a.output {
            Output::Json => println!("{e}"),
            Output::Table => println!(
                "{}",
                row(
                    &clock(&e["recorded_at"]),
                    &cell(&e["stream_id"]),
                    &cell(&e["metadata"]["kind"]),
                    &cell(&e["type"]),
                    &detail(&e),
                )
            ),
        }
        seen += 1;
        if a.max_events.is_some_and(|m| seen >= m) {
            return Ok(());
        }
    }
    bail!("the server closed the event stream")
}

/// The part of a job event worth a glance.
fn detail(e: &Value) -> String {
    let d = &e["data"];
    match e["type"].as_str().unwrap_or_default() {
        "JobStarted" => format!("attempt {} on {}", d["attempt"], cell(&d["worker"])),
        "JobSucceeded" => format!("attempt {}", d["attempt"]),
        "JobAttemptFailed" | "JobFailed" | "JobCanceled" if d["error"].is_object() => {
            format!(
                "{}: {}",
                cell(&d["error"]["type"]),
                cell(&d["error"]["message"])
            )
        }
        "JobProgress" => match d["percent"].as_f64() {
            Some(p) => format!("{p}% {}", d["message"].as_str().unwrap_or_default()),
            None => d["message"].as_str().unwrap_or_default().to_string(),
        },
        "JobScheduled" => format!("{} until {}", cell(&d["reason"]), when(&d["run_at"])),
        "JobQueued" | "JobWaiting" => cell(&d["reason"]),
        "JobLog" => format!("{}: {}", cell(&d["level"]), cell(&d["message"])),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_row_says_why_and_an_event_what() {
        assert_eq!(
            why(&json!({"error": {"type": "timeout", "message": "took 30 s"}})),
            "timeout: took 30 s"
        );
        assert_eq!(
            why(&json!({"waiting": {"reason": "concurrency", "key": "acme"}})),
            "concurrency (acme)"
        );
        assert_eq!(why(&json!({"status": "queued"})), "-");
        let started = json!({"type": "JobStarted", "data": {"attempt": 2, "worker": "w-1"}});
        assert_eq!(detail(&started), "attempt 2 on w-1");
        let failed = json!({"type": "JobFailed",
            "data": {"attempt": 1, "error": {"type": "boom", "message": "no"}}});
        assert_eq!(detail(&failed), "boom: no");
        let progress = json!({"type": "JobProgress", "data": {"percent": 40, "message": "half"}});
        assert_eq!(detail(&progress), "40% half");
    }
}
