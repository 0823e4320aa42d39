//! `mcp.call`: one tool call on a remote MCP server over streamable HTTP (docs/mcp.md).
//!
//! A client session of three POSTs, each through [`crate::fetch::send`] (the outbound guard,
//! pinned connections, capped bodies): `initialize`, `notifications/initialized`, then
//! `tools/call` with a progress token, carrying the `Mcp-Session-Id` the server gave and the
//! negotiated `MCP-Protocol-Version`. Each answer may be JSON or an SSE stream; SSE bodies are
//! parsed as they arrive ([`Answer`]), so the server's `notifications/progress` become the
//! job's progress while the tool runs. The session is ended with a DELETE (best effort).
//! Transport failures map as `http.request`'s ([`outbound_error`]); a tool that answers
//! `isError` fails the job without retry.

use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine;
use capibara_shared::domain::{
    job::JobError,
    kinds::{
        http::HttpAuth,
        input,
        mcp::{McpCallInput, McpCallOutput},
    },
};
use serde_json::{json, Value};

use super::{
    builtin::to_output, mail::SecretStore, outbound_error, ExecError, Executor, JobContext, Output,
    ProgressSink,
};
use crate::{
    fetch::{self, BodySink},
    http::OutboundPolicy,
};

/// The protocol revision this client asks for.
pub const PROTOCOL_VERSION: &str = "2025-11-25";
/// Most bytes one answer may have.
const MAX_ANSWER_BYTES: usize = 10 * 1024 * 1024;

pub struct McpCall {
    pub secrets: Arc<dyn SecretStore>,
    pub allow_private: bool,
}

fn abort(kind: &str, message: impl Into<String>) -> ExecError {
    ExecError::Abort(JobError::new(kind, message))
}

fn retry(kind: &str, message: impl Into<String>) -> ExecError {
    ExecError::Retryable(JobError::new(kind, message))
}

/// One answer's body as it arrives: JSON kept whole, SSE split into events; progress
/// notifications go to the job's progress at once.
struct Answer {
    sse: bool,
    buf: Vec<u8>,
    /// JSON-RPC messages of the SSE events read so far.
    messages: Vec<Value>,
    progress: Arc<dyn ProgressSink>,
}

impl Answer {
    fn new(progress: Arc<dyn ProgressSink>) -> Self {
        Answer {
            sse: false,
            buf: Vec::new(),
            messages: Vec::new(),
            progress,
        }
    }

    /// Parse the complete events in the buffer (an event ends at a blank line).
    async fn drain_events(&mut self, all: bool) {
        loop {
            let text = String::from_utf8_lossy(&self.buf).replace("\r\n", "\n");
            let end = match text.find("\n\n") {
                Some(i) => i,
                None if all && !text.trim().is_empty() => text.len(),
                None => return,
            };
            let event = text[..end].to_string();
            self.buf = text.as_bytes()[(end + 2).min(text.len())..].to_vec();
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if data.is_empty() {
                continue;
            }
            let Ok(message) = serde_json::from_str::<Value>(&data.join("\n")) else {
                continue;
            };
            if message["method"] == "notifications/progress" {
                let p = &message["params"];
                let percent = match (p["progress"].as_f64(), p["total"].as_f64()) {
                    (Some(done), Some(total)) if total > 0.0 => {
                        Some((100.0 * done / total).clamp(0.0, 100.0))
                    }
                    _ => None,
                };
                let text = p["message"].as_str().map(str::to_string);
                self.progress
                    .progress_with_data(percent, text, Some(json!({"mcp": p})))
                    .await;
            }
            self.messages.push(message);
        }
    }

    /// The response to request `id`, once the body is complete.
    async fn response(mut self, id: u64) -> Result<Value, ExecError> {
        if !self.sse {
            return serde_json::from_slice(&self.buf)
                .map_err(|e| abort("invalid_response", format!("the answer is not JSON: {e}")));
        }
        self.drain_events(true).await;
        self.messages
            .into_iter()
            .find(|m| m["id"] == id && (m.get("result").is_some() || m.get("error").is_some()))
            .ok_or_else(|| {
                retry(
                    "invalid_response",
                    "the event stream ended without a response",
                )
            })
    }
}

#[async_trait]
impl BodySink for Answer {
    async fn start(&mut self, headers: &reqwest::header::HeaderMap) {
        self.sse = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("text/event-stream"));
    }

    async fn piece(&mut self, bytes: &[u8], _total: Option<u64>) -> Result<(), String> {
        self.buf.extend_from_slice(bytes);
        if self.sse {
            self.drain_events(false).await;
        }
        Ok(())
    }
}

/// A session with one server.
struct Session<'a> {
    policy: OutboundPolicy,
    url: &'a str,
    headers: Vec<(String, String)>,
    ctx: &'a JobContext,
}

impl Session<'_> {
    /// POST one message; the response when `id` is a request's, else nothing.
    async fn post(&mut self, message: Value, id: Option<u64>) -> Result<Option<Value>, ExecError> {
        let mut answer = Answer::new(self.ctx.progress.clone());
        let got = fetch::send(
            &self.policy,
            reqwest::Method::POST,
            self.url,
            &self.headers,
            Some(message.to_string().into_bytes()),
            &self.ctx.cancel,
            Some(&mut answer),
        )
        .await
        .map_err(|e| outbound_error(e, "10 MiB per answer"))?;
        if !(200..300).contains(&got.status) {
            let body = String::from_utf8_lossy(&answer.buf);
            let snippet: String = body.chars().take(512).collect();
            let error = JobError::new(
                "http_status",
                format!("the MCP server answered {}: {snippet}", got.status),
            );
            let failing = got.status == 408 || got.status == 429 || got.status >= 500;
            return Err(match (failing, got.retry_after) {
                (true, Some(after)) => ExecError::RetryAfter(after, error),
                (true, None) => ExecError::Retryable(error),
                (false, _) => ExecError::Abort(error),
            });
        }
        if let Some(session) = got.header("mcp-session-id") {
            if !self
                .headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("mcp-session-id"))
            {
                self.headers
                    .push(("mcp-session-id".into(), session.to_string()));
            }
        }
        let Some(id) = id else { return Ok(None) };
        let response = answer.response(id).await?;
        if let Some(error) = response.get("error") {
            return Err(abort(
                "mcp_error",
                format!(
                    "{} (code {})",
                    error["message"]
                        .as_str()
                        .unwrap_or("the server refused the request"),
                    error["code"]
                ),
            ));
        }
        Ok(Some(response["result"].clone()))
    }

    /// End the session (servers may refuse: 405).
    async fn close(&self) {
        if self.headers.iter().any(|(k, _)| k == "mcp-session-id") {
            let _ = fetch::send(
                &self.policy,
                reqwest::Method::DELETE,
                self.url,
                &self.headers,
                None,
                &self.ctx.cancel,
                None,
            )
            .await;
        }
    }
}

impl McpCall {
    async fn authorization(&self, namespace: &str, auth: &HttpAuth) -> Result<String, ExecError> {
        let name = match auth {
            HttpAuth::Bearer { secret } | HttpAuth::Basic { secret, .. } => secret,
        };
        let value = self
            .secrets
            .required(namespace, name, "auth.secret")
            .await?;
        Ok(match auth {
            HttpAuth::Bearer { .. } => format!("Bearer {value}"),
            HttpAuth::Basic { username, .. } => format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{value}"))
            ),
        })
    }
}

/// The text of a result's text blocks, for a failed call's error.
fn text_of(content: &[Value]) -> String {
    let text: Vec<&str> = content.iter().filter_map(|c| c["text"].as_str()).collect();
    let joined = text.join("\n");
    joined.chars().take(2000).collect()
}

#[async_trait]
impl Executor for McpCall {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let input: McpCallInput = input::parse(&ctx.input)
            .map_err(|e| abort("invalid_input", format!("{}: {}", e.field, e.message)))?;
        let mut headers: Vec<(String, String)> = input
            .headers
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(auth) = &input.auth {
            headers.push((
                "authorization".into(),
                self.authorization(&ctx.job.namespace, auth).await?,
            ));
        }
        headers.push(("content-type".into(), "application/json".into()));
        headers.push((
            "accept".into(),
            "application/json, text/event-stream".into(),
        ));
        let timeout = std::time::Duration::from_millis(input.timeout_ms());
        let mut session = Session {
            policy: OutboundPolicy {
                allow_private: self.allow_private,
                connect_timeout: timeout.min(std::time::Duration::from_secs(10)),
                timeout,
                max_response_bytes: MAX_ANSWER_BYTES,
            },
            url: &input.server,
            headers,
            ctx: &ctx,
        };
        let init = session
            .post(
                json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                    "protocolVersion": PROTOCOL_VERSION,
                    "capabilities": {},
                    "clientInfo": {"name": "capibara", "version": env!("CARGO_PKG_VERSION")}
                }}),
                Some(1),
            )
            .await?
            .unwrap_or_default();
        let version = init["protocolVersion"]
            .as_str()
            .unwrap_or(PROTOCOL_VERSION)
            .to_string();
        session
            .headers
            .push(("mcp-protocol-version".into(), version));
        session
            .post(
                json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
                None,
            )
            .await?;
        let called = session
            .post(
                json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
                    "name": input.tool,
                    "arguments": input.arguments.clone().unwrap_or_default(),
                    "_meta": {"progressToken": ctx.job_id.to_string()}
                }}),
                Some(2),
            )
            .await;
        session.close().await;
        let tool_error = matches!(&called, Ok(Some(r)) if r["isError"].as_bool() == Some(true));
        let outcome = match &called {
            Ok(_) if tool_error => "tool_error",
            Ok(_) => "ok",
            Err(_) => "error",
        };
        metrics::counter!("capibara_mcp_calls_total", "outcome" => outcome).increment(1);
        let result = called?.unwrap_or_default();
        let content = result["content"].as_array().cloned().unwrap_or_default();
        if tool_error {
            return Err(abort(
                "tool_error",
                format!("`{}` failed: {}", input.tool, text_of(&content)),
            ));
        }
        Ok(Output {
            output: to_output(McpCallOutput {
                content,
                structured_content: result.get("structuredContent").cloned(),
                is_error: false,
            }),
            ..Output::default()
        })
    }

    /// A tool may act on the world: an attempt is claimed before it runs.
    fn repeatable(&self) -> bool {
        false
    }
}
