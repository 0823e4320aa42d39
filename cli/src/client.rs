//! API client commands. They read `CAPIBARA_URL` (default http://127.0.0.1:8080) and
//! `CAPIBARA_API_KEY`, print JSON, and exit non-zero on a problem response.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use reqwest::{header, Client, Response};
use serde_json::Value;

#[derive(Args, Clone)]
pub struct Conn {
    /// API base URL.
    #[arg(long, env = "CAPIBARA_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API key.
    #[arg(long, env = "CAPIBARA_API_KEY", hide_env_values = true)]
    key: String,
}

impl Conn {
    pub fn client(&self) -> anyhow::Result<Client> {
        let mut h = header::HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {}", self.key).parse()?,
        );
        Ok(Client::builder().default_headers(h).build()?)
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{}", self.url.trim_end_matches('/'), path)
    }
}

#[derive(Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    conn: Conn,
    /// Job kind (`echo`, `sleep`, `fail`, …).
    kind: String,
    /// Input JSON.
    #[arg(default_value = "{}")]
    input: String,
    #[arg(long)]
    queue: Option<String>,
    #[arg(long)]
    priority: Option<String>,
    #[arg(long)]
    max_attempts: Option<u32>,
    #[arg(long)]
    timeout_s: Option<u32>,
    /// Run at (RFC 3339).
    #[arg(long)]
    run_at: Option<String>,
    /// Tags, `k:v`, repeatable.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Wait up to N seconds for the result.
    #[arg(long)]
    wait: Option<u32>,
    #[arg(long)]
    idempotency_key: Option<String>,
}

pub async fn print(res: Response) -> anyhow::Result<Value> {
    let status = res.status();
    let body: Value = res.json().await.context("reading the response")?;
    println!("{}", serde_json::to_string_pretty(&body)?);
    if !status.is_success() {
        bail!("request failed with {status}");
    }
    Ok(body)
}

pub async fn submit(a: SubmitArgs) -> anyhow::Result<()> {
    let input: Value = serde_json::from_str(&a.input).context("input is not valid JSON")?;
    let mut body = serde_json::json!({"kind": a.kind, "input": input});
    let o = body.as_object_mut().expect("object");
    if let Some(q) = a.queue {
        o.insert("queue".into(), q.into());
    }
    if let Some(p) = a.priority {
        o.insert("priority".into(), p.into());
    }
    if let Some(m) = a.max_attempts {
        o.insert("max_attempts".into(), m.into());
    }
    if let Some(t) = a.timeout_s {
        o.insert("timeout_s".into(), t.into());
    }
    if let Some(r) = a.run_at {
        o.insert("run_at".into(), r.into());
    }
    if !a.tags.is_empty() {
        let mut tags = serde_json::Map::new();
        for t in &a.tags {
            let (k, v) = t.split_once(':').context("tags look like key:value")?;
            tags.insert(k.into(), v.into());
        }
        o.insert("tags".into(), Value::Object(tags));
    }
    let mut req = a.conn.client()?.post(a.conn.at("/v1/jobs")).json(&body);
    if let Some(w) = a.wait {
        req = req.header("Prefer", format!("wait={w}"));
    }
    if let Some(k) = a.idempotency_key {
        req = req.header("Idempotency-Key", k);
    }
    print(req.send().await?).await.map(drop)
}

#[derive(Args)]
pub struct GetArgs {
    #[command(flatten)]
    conn: Conn,
    id: String,
}

pub async fn get(a: GetArgs) -> anyhow::Result<()> {
    let res = a
        .conn
        .client()?
        .get(a.conn.at(&format!("/v1/jobs/{}", a.id)))
        .send()
        .await?;
    print(res).await.map(drop)
}

#[derive(Args)]
pub struct WaitArgs {
    #[command(flatten)]
    conn: Conn,
    id: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

pub async fn wait(a: WaitArgs) -> anyhow::Result<()> {
    let client = a.conn.client()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(a.timeout);
    loop {
        let res = client
            .get(a.conn.at(&format!("/v1/jobs/{}", a.id)))
            .header("Prefer", "wait=30")
            .send()
            .await?;
        if res.status() == reqwest::StatusCode::ACCEPTED && std::time::Instant::now() < deadline {
            continue;
        }
        let body = print(res).await?;
        return match body["status"].as_str() {
            Some("succeeded") => Ok(()),
            Some(s) => bail!("job ended {s}"),
            None => bail!("no status"),
        };
    }
}

#[derive(Args)]
pub struct EventsArgs {
    #[command(flatten)]
    conn: Conn,
    id: String,
    /// Stream live over SSE until the job ends.
    #[arg(long)]
    follow: bool,
}

pub async fn events(a: EventsArgs) -> anyhow::Result<()> {
    let client = a.conn.client()?;
    let url = a.conn.at(&format!("/v1/jobs/{}/events", a.id));
    if !a.follow {
        return print(client.get(url).send().await?).await.map(drop);
    }
    let res = client
        .get(url)
        .header(header::ACCEPT, "text/event-stream")
        .send()
        .await?;
    if !res.status().is_success() {
        return print(res).await.map(drop);
    }
    let mut frames = Sse::new(res);
    while let Some(frame) = frames.next().await? {
        println!("{}", frame.data);
    }
    Ok(())
}

/// One event of a server-sent event stream.
pub struct Frame {
    /// `event:` (the event type; `message` when absent).
    pub event: String,
    /// `data:` lines joined by newlines.
    pub data: String,
}

/// Reads the frames of an SSE response (keep-alive comments skipped).
pub struct Sse {
    body: futures::stream::BoxStream<'static, reqwest::Result<Vec<u8>>>,
    buf: String,
}

impl Sse {
    pub fn new(res: Response) -> Sse {
        Sse {
            body: res.bytes_stream().map(|c| c.map(|b| b.to_vec())).boxed(),
            buf: String::new(),
        }
    }

    /// The next frame; `None` when the server ended the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<Frame>> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..end + 2).collect();
                let mut frame = Frame {
                    event: "message".into(),
                    data: String::new(),
                };
                let mut data = Vec::new();
                for line in raw.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        frame.event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if data.is_empty() {
                    continue;
                }
                frame.data = data.join("\n");
                return Ok(Some(frame));
            }
            match self.body.next().await {
                Some(chunk) => {
                    let text = String::from_utf8_lossy(&chunk?).replace("\r\n", "\n");
                    self.buf.push_str(&text);
                }
                None => return Ok(None),
            }
        }
    }
}

/// The query of a listing: `pairs` whose value is given, then `repeated` (a repeatable filter).
pub fn query(
    pairs: impl IntoIterator<Item = (&'static str, Option<String>)>,
    repeated: impl IntoIterator<Item = (&'static str, String)>,
) -> Vec<(&'static str, String)> {
    pairs
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .chain(repeated)
        .collect()
}

/// One page of a listing (`GET path?query`): as the API's JSON, or as a table with a row per
/// item; the next page's cursor goes to stderr.
pub async fn list_page(
    conn: &Conn,
    path: &str,
    query: &[(&str, String)],
    output: crate::output::Output,
    headers: &[&'static str],
    row: fn(&Value) -> Vec<String>,
) -> anyhow::Result<()> {
    let res = conn
        .client()?
        .get(conn.at(path))
        .query(query)
        .send()
        .await?;
    if output == crate::output::Output::Json || !res.status().is_success() {
        return print(res).await.map(drop);
    }
    let page: Value = res.json().await?;
    let mut table = crate::output::Table::new(headers);
    for item in page["items"].as_array().into_iter().flatten() {
        table.row(row(item));
    }
    print!("{}", table.render());
    if let Some(next) = page["next_cursor"].as_str() {
        eprintln!("more: --cursor {next}");
    }
    Ok(())
}
