//! `capibara-bench agents`: what Capibara adds to the agent kinds' calls (issue 19;
//! docs/http.md, docs/llm.md, docs/benchmarks.md).
//!
//! One private stack ([`Env`]: Postgres, Redis, the API and the scheduler) and one
//! `capibara-worker`, with calls to loopback allowed. Every job runs alone (the next is
//! submitted when the last has ended), so the worker is idle at each submit.
//!
//! 1. **`http.request`.** A local server answers `GET /x` at once with a small JSON body and
//!    times its own handler. Jobs are sent with `POST /v1/jobs` and `Prefer: wait`; per job,
//!    from the job row: enqueue→finished and started→finished, each less the server's own time
//!    (the overhead), and the client's round trip. Baselines: the same GET sent by reqwest from
//!    this process, on a kept-alive connection and on a new connection each time.
//! 2. **`llm.generate` time to first token.** A local stand-in speaking OpenAI's streamed chat
//!    completions sends its first token after `--provider-ttft-ms`, then a few more. The
//!    provider's own TTFT is what a reqwest client sending straight to it sees (request sent →
//!    first content delta). Capibara's TTFT is what an SSE client sees: `POST /v1/jobs` sent →
//!    the job's first `JobOutputChunk` read from `GET /v1/jobs/{id}/events` (the stream
//!    docs/llm.md tells clients to open), and, as a second series, from a `/v1/events`
//!    subscription opened before the submits. The overhead is Capibara's TTFT less the
//!    stand-in's own time for the same request (request received → first token written); where
//!    the time goes comes from the job row, the stand-in's clock and the chunk's `recorded_at`
//!    (one machine, one clock).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Result};
use axum::{
    body::{Body, Bytes},
    extract::Query,
    response::{IntoResponse, Response},
    routing::{get, post},
    serve::{ListenerExt, TapIo},
    Json, Router,
};
use capibara_shared::shutdown;
use clap::Args;
use futures::StreamExt;
use reqwest::{header, Client};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

use crate::harness::server_bin_dir;
use crate::harness::{named_dir, percentile, print_header, profile, run_dir, sorted, Env, Facts};
use crate::push;

/// `capibara-bench agents` options.
#[derive(Args, Debug)]
pub struct AgentsBenchArgs {
    /// Jobs (and direct calls) per series, one at a time.
    #[arg(long, default_value_t = 200)]
    jobs: usize,
    /// The stand-in provider's own time to the first token, ms.
    #[arg(long, default_value_t = 20)]
    provider_ttft_ms: u64,
    /// Tokens the stand-in sends after the first, 5 ms apart.
    #[arg(long, default_value_t = 4)]
    tokens: usize,
    /// Run Postgres with fsync/synchronous_commit/full_page_writes off (not durable).
    #[arg(long)]
    unsafe_pg: bool,
    /// Directory for the servers' data and the logs (default: `target/bench/agents-<time>`).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Jobs run first and left out of the figures (connections, caches, the provider lookup).
const WARMUP: usize = 10;
/// Gap between the stand-in's tokens after the first.
const TOKEN_GAP: Duration = Duration::from_millis(5);

/// Wall-clock milliseconds since the epoch: the one clock this process, the servers and
/// Postgres' timestamps share on one machine.
fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One table row: a label and the p50/p95/p99 of its samples (sorted here).
struct Row {
    label: String,
    samples: Vec<f64>,
}

impl Row {
    fn new(label: impl Into<String>, samples: Vec<f64>) -> Row {
        Row {
            label: label.into(),
            samples: sorted(samples),
        }
    }

    fn p50(&self) -> f64 {
        percentile(&self.samples, 0.5)
    }

    fn line(&self, bold: bool) -> String {
        let b = if bold { "**" } else { "" };
        format!(
            "| {} | {b}{:.2}{b} | {:.2} | {:.2} | {} |",
            self.label,
            self.p50(),
            percentile(&self.samples, 0.95),
            percentile(&self.samples, 0.99),
            self.samples.len()
        )
    }
}

fn table(title: &str, rows: &[Row], bold: &[usize]) -> String {
    let mut t = format!("{title}\n\n| ms | p50 | p95 | p99 | n |\n|---|---|---|---|---|\n");
    for (i, r) in rows.iter().enumerate() {
        t.push_str(&r.line(bold.contains(&i)));
        t.push('\n');
    }
    t
}

pub async fn run(a: AgentsBenchArgs) -> Result<()> {
    if a.jobs == 0 {
        bail!("--jobs must be positive");
    }
    let bin_dir = server_bin_dir()?;
    let dir = run_dir(a.dir.as_ref(), named_dir(&bin_dir, "agents"))?;
    let facts = Facts::collect();
    print_header("capibara-bench agents", &facts, a.unsafe_pg, "");
    println!(
        "{} jobs per series, one at a time, after {WARMUP} warm-up jobs; stand-in provider: first token after {} ms, then {} more {} ms apart",
        a.jobs,
        a.provider_ttft_ms,
        a.tokens,
        TOKEN_GAP.as_millis()
    );
    println!("bench dir: {}", dir.display());

    let mut env = Env::start_with(a.unsafe_pg, 16, push::env(), &dir, &bin_dir).await?;
    env.spawn_worker("worker").await?;
    let outcome = tokio::select! {
        r = phases(&a, &env) => r,
        _ = shutdown::signal() => Err(anyhow!("interrupted")),
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let pg_dir = env.pg.as_ref().map(|p| p.data_dir().to_path_buf());
    drop(env);
    match outcome {
        Ok(report) => {
            println!(
                "\nBuild: {}; git {}; Postgres {}; load average at the end: {}\n",
                profile(),
                facts.git,
                if a.unsafe_pg {
                    "fsync off (`--unsafe-pg`)"
                } else {
                    "with durable commits"
                },
                load.trim()
            );
            println!("{report}");
            if let Some(d) = pg_dir {
                let _ = std::fs::remove_dir_all(&d);
            }
            let _ = std::fs::remove_dir_all(dir.join("redis"));
            println!("logs: {}", dir.display());
            Ok(())
        }
        Err(e) => {
            eprintln!("bench failed; logs and data are in {}", dir.display());
            Err(e)
        }
    }
}

async fn phases(a: &AgentsBenchArgs, env: &Env) -> Result<String> {
    let http = http_request(a, env).await?;
    println!("{http}");
    let llm = llm_ttft(a, env).await?;
    println!("{llm}");
    Ok(format!("{http}\n{llm}"))
}

// ---------------------------------------------------------------------------------------------
// http.request
// ---------------------------------------------------------------------------------------------

/// What the local server saw of one request: its handler's own time and when it began (wall).
#[derive(Clone, Copy)]
struct Hit {
    own_ms: f64,
    at_ms: f64,
}

type Hits = Arc<Mutex<HashMap<String, Hit>>>;

/// A loopback listener whose connections send at once (`TCP_NODELAY`), as HTTP servers and
/// providers' front ends do: without it, a token written a while after the response's head
/// waits for the client's delayed ACK (up to 40 ms on Linux) on a kept-alive connection.
async fn nodelay_listener() -> Result<(String, TapIo<TcpListener, fn(&mut TcpStream)>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let nodelay: fn(&mut TcpStream) = |tcp| {
        let _ = tcp.set_nodelay(true);
    };
    Ok((base, listener.tap_io(nodelay)))
}

/// A server on loopback answering `GET /x?i=…` at once with a small JSON body.
async fn serve_x() -> Result<(String, Hits, tokio::task::JoinHandle<()>)> {
    let hits: Hits = Arc::default();
    let app = Router::new().route(
        "/x",
        get({
            let hits = hits.clone();
            move |Query(q): Query<HashMap<String, String>>| async move {
                let (t, at_ms) = (Instant::now(), wall_ms());
                let i = q.get("i").cloned().unwrap_or_default();
                let answer = Json(json!({"ok": true, "i": i}));
                let own_ms = ms(t.elapsed());
                hits.lock().expect("hits").insert(i, Hit { own_ms, at_ms });
                answer
            }
        }),
    );
    let (base, listener) = nodelay_listener().await?;
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((base, hits, server))
}

/// One job alone: `POST /v1/jobs` with `Prefer: wait`; the job's id, the client's round trip,
/// and its output.
async fn submit_wait(env: &Env, body: &Value) -> Result<(Uuid, f64, Value)> {
    let t = Instant::now();
    let r = env
        .http
        .post(env.api("/v1/jobs"))
        .header("Prefer", "wait=30")
        .json(body)
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await?;
    let round_trip = ms(t.elapsed());
    if v["status"] != "succeeded" {
        bail!("{} job did not succeed ({status}): {v}", body["kind"]);
    }
    let id = v["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no job id in {v}"))?;
    Ok((id, round_trip, v["output"].clone()))
}

/// queued_at, started_at and finished_at of each job tagged `phase`, wall ms.
async fn job_times(env: &Env, phase: &str) -> Result<HashMap<Uuid, (f64, f64, f64)>> {
    let rows: Vec<(Uuid, f64, f64, f64)> = sqlx::query_as(
        "SELECT id, (extract(epoch FROM queued_at) * 1000)::float8, \
         (extract(epoch FROM started_at) * 1000)::float8, \
         (extract(epoch FROM finished_at) * 1000)::float8 \
         FROM jobs WHERE tags->>'phase' = $1 AND status = 'succeeded'",
    )
    .bind(phase)
    .fetch_all(&env.pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, q, s, f)| (id, (q, s, f)))
        .collect())
}

async fn http_request(a: &AgentsBenchArgs, env: &Env) -> Result<String> {
    let (base, hits, server) = serve_x().await?;

    // Baselines: the same GET from this process.
    let mut direct = Vec::new();
    for (label, client) in [
        ("kept-alive connection", Client::new()),
        (
            "new connection each",
            Client::builder().pool_max_idle_per_host(0).build()?,
        ),
    ] {
        let mut samples = Vec::with_capacity(a.jobs);
        for i in 0..WARMUP + a.jobs {
            let t = Instant::now();
            let r = client.get(format!("{base}/x?i=direct-{i}")).send().await?;
            r.error_for_status()?.bytes().await?;
            if i >= WARMUP {
                samples.push(ms(t.elapsed()));
            }
        }
        direct.push(Row::new(
            format!("reqwest from the bench, GET round trip ({label})"),
            samples,
        ));
    }

    let phase = "http";
    let mut jobs = Vec::with_capacity(a.jobs);
    for i in 0..WARMUP + a.jobs {
        let key = format!("job-{i}");
        let tag = if i < WARMUP { "http-warmup" } else { phase };
        let body = json!({"kind": "http.request", "tags": {"phase": tag},
            "input": {"method": "GET", "url": format!("{base}/x?i={key}")}});
        let (id, round_trip, output) = submit_wait(env, &body).await?;
        if output["status"] != 200 {
            bail!("http.request answered {output}");
        }
        if i >= WARMUP {
            let call = output["duration_ms"].as_f64().unwrap_or(f64::NAN);
            jobs.push((id, key, round_trip, call));
        }
    }
    server.abort();
    let times = job_times(env, phase).await?;
    let hits = hits.lock().expect("hits");
    let mut own = Vec::new();
    let (mut call, mut to_send, mut to_start) = (Vec::new(), Vec::new(), Vec::new());
    let (mut run, mut run_over, mut total, mut total_over) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut client, mut client_over) = (Vec::new(), Vec::new());
    for (id, key, round_trip, duration) in jobs {
        let &(queued, started, finished) = times
            .get(&id)
            .ok_or_else(|| anyhow!("job {id} has no succeeded row"))?;
        let hit = hits
            .get(&key)
            .ok_or_else(|| anyhow!("the server never saw job {id}"))?;
        own.push(hit.own_ms);
        call.push(duration);
        to_start.push(started - queued);
        to_send.push(hit.at_ms - started);
        run.push(finished - started);
        run_over.push(finished - started - hit.own_ms);
        total.push(finished - queued);
        total_over.push(finished - queued - hit.own_ms);
        client.push(round_trip);
        client_over.push(round_trip - hit.own_ms);
    }
    let mut rows = direct;
    rows.extend([
        Row::new("the server's own time (inside its handler)", own),
        Row::new(
            "the worker's call (output `duration_ms`: guard, breaker, connect, send, read)",
            call,
        ),
        Row::new("enqueue → started (queued_at → started_at)", to_start),
        Row::new(
            "started → the server has the request (claim, secrets, guard, connect)",
            to_send,
        ),
        Row::new("started → finished", run),
        Row::new(
            "**overhead: started → finished − the server's time**",
            run_over,
        ),
        Row::new("enqueue → finished", total),
        Row::new(
            "**overhead: enqueue → finished − the server's time**",
            total_over,
        ),
        Row::new(
            "client round trip, `POST /v1/jobs` + `Prefer: wait`",
            client,
        ),
        Row::new(
            "overhead: client round trip − the server's time",
            client_over,
        ),
    ]);
    Ok(table(
        "### `http.request` (GET to a loopback server answering at once)",
        &rows,
        &[7, 9],
    ))
}

// ---------------------------------------------------------------------------------------------
// llm.generate
// ---------------------------------------------------------------------------------------------

/// What the stand-in saw of one request, wall ms: received, and its first token written.
#[derive(Clone, Copy)]
struct Call {
    received: f64,
    first: f64,
}

type Calls = Arc<Mutex<HashMap<String, Call>>>;

/// One OpenAI stream event.
fn event(v: Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// The answer to `prompt`: the first token after `ttft`, `more` tokens [`TOKEN_GAP`] apart,
/// the finish with the token counts, `[DONE]`.
fn answer(calls: Calls, prompt: String, ttft: Duration, more: usize) -> Response {
    let stream = futures::stream::unfold(0usize, move |i| {
        let (calls, prompt) = (calls.clone(), prompt.clone());
        async move {
            let piece = if i == 0 {
                tokio::time::sleep(ttft).await;
                let b = event(json!({"model": "m", "choices": [{"index": 0,
                    "delta": {"role": "assistant", "content": "tok"}, "finish_reason": null}]}));
                if let Some(c) = calls.lock().expect("calls").get_mut(&prompt) {
                    c.first = wall_ms();
                }
                b
            } else if i <= more {
                tokio::time::sleep(TOKEN_GAP).await;
                event(
                    json!({"choices": [{"index": 0, "delta": {"content": " tok"},
                    "finish_reason": null}]}),
                )
            } else if i == more + 1 {
                event(
                    json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": more + 1}}),
                )
            } else if i == more + 2 {
                Bytes::from_static(b"data: [DONE]\n\n")
            } else {
                return None;
            };
            Some((Ok::<_, std::io::Error>(piece), i + 1))
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// The stand-in provider on loopback: `POST /v1/chat/completions`, streamed.
async fn serve_provider(
    ttft: Duration,
    more: usize,
) -> Result<(String, Calls, tokio::task::JoinHandle<()>)> {
    let calls: Calls = Arc::default();
    let app = Router::new().route(
        "/v1/chat/completions",
        post({
            let calls = calls.clone();
            move |Json(body): Json<Value>| async move {
                let received = wall_ms();
                let prompt = body["messages"]
                    .as_array()
                    .and_then(|m| m.last())
                    .and_then(|m| m["content"].as_str())
                    .unwrap_or_default()
                    .to_string();
                calls.lock().expect("calls").insert(
                    prompt.clone(),
                    Call {
                        received,
                        first: f64::NAN,
                    },
                );
                answer(calls, prompt, ttft, more)
            }
        }),
    );
    let (base, listener) = nodelay_listener().await?;
    let base = format!("{base}/v1");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((base, calls, server))
}

/// Server-sent events of a response, frame by frame.
struct Sse {
    body: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    buf: Vec<u8>,
}

/// One SSE frame: its `event` and `data` (lines joined).
struct Frame {
    event: String,
    data: String,
}

impl Sse {
    async fn open(http: &Client, url: &str) -> Result<Sse> {
        let r = http
            .get(url)
            .header(header::ACCEPT, "text/event-stream")
            .send()
            .await?;
        if !r.status().is_success() {
            let status = r.status();
            bail!("GET {url} answered {status}: {}", r.text().await?);
        }
        Ok(Sse {
            body: r.bytes_stream().boxed(),
            buf: Vec::new(),
        })
    }

    /// The next frame with an event or data (keep-alive comments skipped); None at the end.
    async fn next(&mut self) -> Result<Option<Frame>> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&raw);
                let mut f = Frame {
                    event: String::new(),
                    data: String::new(),
                };
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        f.event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        f.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if !f.event.is_empty() || !f.data.is_empty() {
                    return Ok(Some(f));
                }
                continue;
            }
            match self.body.next().await {
                Some(b) => self.buf.extend_from_slice(&b?),
                None => return Ok(None),
            }
        }
    }
}

/// The provider's own TTFT as a client sending straight to it sees it, ms.
async fn direct_ttft(base: &str, i: usize) -> Result<f64> {
    let client = Client::new();
    let t = Instant::now();
    let r = client
        .post(format!("{base}/chat/completions"))
        .json(&json!({"model": "m", "stream": true,
            "messages": [{"role": "user", "content": format!("direct-{i}")}]}))
        .send()
        .await?
        .error_for_status()?;
    let mut body = r.bytes_stream();
    let mut seen = Vec::new();
    let mut ttft = None;
    while let Some(b) = body.next().await {
        seen.extend_from_slice(&b?);
        let needle = b"\"content\"";
        if ttft.is_none() && seen.windows(needle.len()).any(|w| w == needle) {
            ttft = Some(ms(t.elapsed()));
        }
    }
    ttft.ok_or_else(|| anyhow!("the stand-in sent no token"))
}

/// When a chunk was recorded (its envelope's `recorded_at`), wall ms.
fn recorded_at(envelope: &Value) -> f64 {
    envelope["recorded_at"]
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map_or(f64::NAN, |t| t.timestamp_micros() as f64 / 1000.0)
}

/// One streamed job as a client sees it.
struct Seen {
    id: Uuid,
    prompt: String,
    /// Submit sent, wall ms.
    sent: f64,
    /// Submit sent → first `JobOutputChunk` read, ms.
    ttft: f64,
    /// The first chunk's `recorded_at`, wall ms.
    chunk_recorded: f64,
    /// The first chunk read by the client, wall ms.
    chunk_read: f64,
}

fn llm_job(prompt: &str, phase: &str) -> Value {
    json!({"kind": "llm.generate", "tags": {"phase": phase},
        "input": {"model": "m", "prompt": prompt, "stream": true}})
}

/// Submit, and the job's id (no waiting).
async fn submit(env: &Env, body: &Value) -> Result<Uuid> {
    let r = env.http.post(env.api("/v1/jobs")).json(body).send().await?;
    let status = r.status();
    let v: Value = r.json().await?;
    if !status.is_success() {
        bail!("POST /v1/jobs answered {status}: {v}");
    }
    v["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no job id in {v}"))
}

/// Submit, then follow `GET /v1/jobs/{id}/events` to the job's end.
async fn via_job_events(env: &Env, prompt: String, phase: &str) -> Result<Seen> {
    let (t, sent) = (Instant::now(), wall_ms());
    let id = submit(env, &llm_job(&prompt, phase)).await?;
    let mut sse = Sse::open(&env.http, &env.api(&format!("/v1/jobs/{id}/events"))).await?;
    let mut first = None;
    while let Some(f) = sse.next().await? {
        match f.event.as_str() {
            "JobOutputChunk" if first.is_none() => {
                let (ttft, read) = (ms(t.elapsed()), wall_ms());
                let envelope: Value = serde_json::from_str(&f.data)?;
                first = Some((ttft, read, recorded_at(&envelope)));
            }
            "JobSucceeded" => break,
            "JobFailed" | "JobCanceled" | "JobTimedOut" => {
                bail!("job {id} ended with {}: {}", f.event, f.data)
            }
            _ => {}
        }
    }
    let (ttft, chunk_read, chunk_recorded) =
        first.ok_or_else(|| anyhow!("job {id}: no JobOutputChunk"))?;
    Ok(Seen {
        id,
        prompt,
        sent,
        ttft,
        chunk_recorded,
        chunk_read,
    })
}

/// (event type, job id, envelope, read at) from a firehose subscription.
type Fire = (String, Option<Uuid>, Value, Instant, f64);

/// Submit while a `/v1/events` subscription is already open; its frames come through `rx`.
async fn via_firehose(
    env: &Env,
    rx: &mut tokio::sync::mpsc::Receiver<Fire>,
    prompt: String,
    phase: &str,
) -> Result<Seen> {
    let (t, sent) = (Instant::now(), wall_ms());
    let id = submit(env, &llm_job(&prompt, phase)).await?;
    let mut first = None;
    loop {
        let (kind, of, envelope, at, read) =
            tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .map_err(|_| anyhow!("job {id}: nothing on the firehose for 30 s"))?
                .ok_or_else(|| anyhow!("the firehose closed"))?;
        if of != Some(id) {
            continue;
        }
        match kind.as_str() {
            "JobOutputChunk" if first.is_none() => {
                first = Some((ms(at.duration_since(t)), read, recorded_at(&envelope)));
            }
            "JobSucceeded" => break,
            "JobFailed" => bail!("job {id} failed: {envelope}"),
            _ => {}
        }
    }
    let (ttft, chunk_read, chunk_recorded) =
        first.ok_or_else(|| anyhow!("job {id}: no JobOutputChunk"))?;
    Ok(Seen {
        id,
        prompt,
        sent,
        ttft,
        chunk_recorded,
        chunk_read,
    })
}

/// Reads the firehose into a channel, stamping each frame when it was read.
async fn firehose(env: &Env) -> Result<tokio::sync::mpsc::Receiver<Fire>> {
    let url = env.api("/v1/events?types=JobOutputChunk,JobSucceeded,JobFailed&kind=llm.generate");
    let mut sse = Sse::open(&env.http, &url).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        while let Ok(Some(f)) = sse.next().await {
            let (at, read) = (Instant::now(), wall_ms());
            let Ok(envelope) = serde_json::from_str::<Value>(&f.data) else {
                continue;
            };
            let id = envelope["stream_id"].as_str().and_then(|s| s.parse().ok());
            if tx.send((f.event, id, envelope, at, read)).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

async fn llm_ttft(a: &AgentsBenchArgs, env: &Env) -> Result<String> {
    let ttft = Duration::from_millis(a.provider_ttft_ms);
    let (base, calls, server) = serve_provider(ttft, a.tokens).await?;
    let r = env
        .http
        .put(env.api("/v1/llm/providers/bench"))
        .json(&json!({"type": "openai", "base_url": base, "models": ["*"]}))
        .send()
        .await?;
    if !r.status().is_success() {
        let status = r.status();
        bail!(
            "PUT /v1/llm/providers/bench answered {status}: {}",
            r.text().await?
        );
    }

    let mut direct = Vec::with_capacity(a.jobs);
    for i in 0..WARMUP + a.jobs {
        let t = direct_ttft(&base, i).await?;
        if i >= WARMUP {
            direct.push(t);
        }
    }
    let direct = Row::new(
        "provider's own TTFT: reqwest straight to the stand-in (sent → first delta)",
        direct,
    );

    let mut series = Vec::new();
    for (label, phase) in [
        (
            "`GET /v1/jobs/{id}/events` opened after the submit",
            "llm-job",
        ),
        ("`/v1/events?kind=llm.generate` opened before", "llm-fire"),
    ] {
        let mut rx = if phase == "llm-fire" {
            Some(firehose(env).await?)
        } else {
            None
        };
        let mut seen = Vec::with_capacity(a.jobs);
        for i in 0..WARMUP + a.jobs {
            let tag = if i < WARMUP { "llm-warmup" } else { phase };
            let prompt = format!("{phase}-{i}");
            let s = match rx.as_mut() {
                Some(rx) => via_firehose(env, rx, prompt, tag).await?,
                None => via_job_events(env, prompt, tag).await?,
            };
            if i >= WARMUP {
                seen.push(s);
            }
        }
        series.push((label, phase, seen));
    }
    server.abort();

    let calls = calls.lock().expect("calls").clone();
    let mut rows = vec![direct];
    let mut bold = Vec::new();
    for (label, phase, seen) in series {
        let times = job_times(env, phase).await?;
        let mut ttft = Vec::new();
        let mut over = Vec::new();
        let mut own = Vec::new();
        let (mut to_queue, mut pickup, mut to_call, mut to_record, mut to_client) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for s in &seen {
            let &(queued, started, _) = times
                .get(&s.id)
                .ok_or_else(|| anyhow!("job {} has no succeeded row", s.id))?;
            let c = calls
                .get(&s.prompt)
                .copied()
                .ok_or_else(|| anyhow!("the stand-in never saw job {}", s.id))?;
            ttft.push(s.ttft);
            own.push(c.first - c.received);
            over.push(s.ttft - (c.first - c.received));
            to_queue.push(queued - s.sent);
            pickup.push(started - queued);
            to_call.push(c.received - started);
            to_record.push(s.chunk_recorded - c.first);
            to_client.push(s.chunk_read - s.chunk_recorded);
        }
        let cross = Row::new(
            format!("…the same, less the provider's own TTFT p50 as a client saw it ({label})"),
            ttft.iter().map(|t| t - rows[0].p50()).collect(),
        );
        bold.push(rows.len() + 2);
        rows.extend([
            Row::new(
                format!("Capibara TTFT: submit sent → first chunk read, {label}"),
                ttft,
            ),
            Row::new("…the stand-in's own time for the same requests", own),
            Row::new(
                "**overhead: Capibara TTFT − the stand-in's own time**",
                over,
            ),
            cross,
            Row::new("…where it goes: submit sent → queued_at", to_queue),
            Row::new("…queued_at → started_at (dispatch, pickup)", pickup),
            Row::new(
                "…started_at → the stand-in has the request (claim, provider, breaker, connect)",
                to_call,
            ),
            Row::new(
                "…first token written → chunk `recorded_at` (worker reads and parses)",
                to_record,
            ),
            Row::new(
                "…chunk `recorded_at` → read by the SSE client (commit, hint, API read, send)",
                to_client,
            ),
        ]);
    }
    Ok(table(
        &format!(
            "### `llm.generate` time to first token (stand-in: first token after {} ms)",
            a.provider_ttft_ms
        ),
        &rows,
        &bold,
    ))
}
