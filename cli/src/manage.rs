//! `capibara schedules …` and `capibara triggers …`: API clients for the scheduler's resources.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::client::{print, Conn};

#[derive(Subcommand)]
pub enum SchedulesCommand {
    /// List schedules with their next fire times.
    List(ConnOnly),
    /// Create a schedule that submits a job: `capibara schedules create --name nightly --cron '0 9 * * *' --kind echo`.
    Create(CreateSchedule),
    Pause(ById),
    Resume(ById),
    /// Fire a schedule now.
    Trigger(ById),
}

#[derive(Subcommand)]
pub enum TriggersCommand {
    List(ConnOnly),
    /// Create an inbound webhook trigger; prints its hook URL.
    Create(CreateTrigger),
}

#[derive(Args)]
pub struct ConnOnly {
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args)]
pub struct ById {
    #[command(flatten)]
    conn: Conn,
    id: String,
}

#[derive(Args)]
pub struct CreateSchedule {
    #[command(flatten)]
    conn: Conn,
    #[arg(long)]
    name: String,
    /// 5 or 6 fields, or @hourly/@daily/…
    #[arg(long)]
    cron: String,
    #[arg(long, default_value = "UTC")]
    timezone: String,
    /// Job kind to submit on each tick.
    #[arg(long)]
    kind: String,
    /// Job input JSON.
    #[arg(long, default_value = "{}")]
    input: String,
    /// allow, skip or buffer_one.
    #[arg(long, default_value = "skip")]
    overlap: String,
    /// none, latest or all.
    #[arg(long, default_value = "latest")]
    catch_up: String,
}

#[derive(Args)]
pub struct CreateTrigger {
    #[command(flatten)]
    conn: Conn,
    #[arg(long)]
    name: String,
    #[arg(long)]
    kind: String,
    /// `bearer:<token>`, `standard-webhooks:<whsec_…>` or `hmac:<secret>[:<header>]`.
    #[arg(long)]
    auth: String,
    /// Input template JSON over `body` and `headers` (default: the request body).
    #[arg(long)]
    input: Option<String>,
}

pub async fn schedules(cmd: SchedulesCommand) -> anyhow::Result<()> {
    match cmd {
        SchedulesCommand::List(a) => print(
            a.conn
                .client()?
                .get(a.conn.at("/v1/schedules"))
                .send()
                .await?,
        )
        .await
        .map(drop),
        SchedulesCommand::Create(a) => {
            let input: Value =
                serde_json::from_str(&a.input).context("--input is not valid JSON")?;
            let body = json!({"name": a.name, "cron": a.cron, "timezone": a.timezone, "overlap": a.overlap,
                              "catch_up": a.catch_up, "target": {"type": "job", "job": {"kind": a.kind, "input": input}}});
            print(
                a.conn
                    .client()?
                    .post(a.conn.at("/v1/schedules"))
                    .json(&body)
                    .send()
                    .await?,
            )
            .await
            .map(drop)
        }
        SchedulesCommand::Pause(a) => post(&a, "pause").await,
        SchedulesCommand::Resume(a) => post(&a, "resume").await,
        SchedulesCommand::Trigger(a) => post(&a, "trigger").await,
    }
}

async fn post(a: &ById, action: &str) -> anyhow::Result<()> {
    let url = a.conn.at(&format!("/v1/schedules/{}/{action}", a.id));
    print(a.conn.client()?.post(url).send().await?)
        .await
        .map(drop)
}

pub async fn triggers(cmd: TriggersCommand) -> anyhow::Result<()> {
    match cmd {
        TriggersCommand::List(a) => print(
            a.conn
                .client()?
                .get(a.conn.at("/v1/triggers"))
                .send()
                .await?,
        )
        .await
        .map(drop),
        TriggersCommand::Create(a) => {
            let auth = match a.auth.split_once(':') {
                Some(("bearer", token)) => json!({"type": "bearer", "token": token}),
                Some(("standard-webhooks", secret)) => json!({"type": "standard_webhooks", "secret": secret}),
                Some(("hmac", rest)) => match rest.split_once(':') {
                    Some((secret, header)) => json!({"type": "hmac_sha256", "secret": secret, "header": header}),
                    None => json!({"type": "hmac_sha256", "secret": rest}),
                },
                _ => bail!("--auth must be bearer:<token>, standard-webhooks:<whsec_…> or hmac:<secret>[:<header>]"),
            };
            let mut body = json!({"name": a.name, "auth": auth, "target": {"type": "job", "job": {"kind": a.kind}}});
            if let Some(t) = a.input {
                body["input"] = serde_json::from_str(&t).context("--input is not valid JSON")?;
            }
            print(
                a.conn
                    .client()?
                    .post(a.conn.at("/v1/triggers"))
                    .json(&body)
                    .send()
                    .await?,
            )
            .await
            .map(drop)
        }
    }
}
