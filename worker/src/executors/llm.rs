//! `llm.generate` and `llm.chat` (docs/llm.md; decisions in docs/llm-design.md): one answer
//! from the namespace's providers. The candidates (the pinned provider, or those serving the
//! model by priority) are tried in turn within the attempt: one whose breaker is open is
//! skipped, one that fails in a way another may not (no connection, no answer in time, 408,
//! 429, 5xx, a stream cut short, a refused key) is recorded and the next is tried. A request
//! the provider calls bad (another 4xx) fails the job. When all failed, the attempt fails
//! retryably. Streamed answers become `JobOutputChunk` events as they arrive.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use capibara_shared::{
    config::Config,
    domain::{
        job::JobError,
        kinds::{
            input,
            llm::{LlmInput, LlmOutput, LlmTry, LlmUsage, Message, Role},
        },
        llm::{route, LlmProvider, ProviderType},
    },
    http_hosts::{HostBreakers, Transition},
};
use serde_json::json;

use super::{
    builtin::to_output, mail::SecretStore, ExecError, Executor, JobContext, Output, ProgressSink,
};
use crate::{
    breakers::LazyBreakers,
    fetch::{self, BodySink, GetError},
    http::{HttpError, OutboundPolicy},
    llm::{self, sse, Answer, Call},
};

/// Where the executor reads the namespace's providers.
#[async_trait]
pub trait ProviderSource: Send + Sync {
    async fn providers(&self, namespace: &str) -> Result<Vec<LlmProvider>, String>;
}

pub struct Llm {
    pub providers: Arc<dyn ProviderSource>,
    pub secrets: Arc<dyn SecretStore>,
    pub allow_private: bool,
    breakers: LazyBreakers,
}

/// Streamed text is written at most this often (the first piece at once).
const CHUNK_EVERY: Duration = Duration::from_millis(50);
/// Most bytes of an answer read (10 MiB).
const MAX_ANSWER_BYTES: usize = 10 * 1024 * 1024;

impl Llm {
    pub fn new(
        providers: Arc<dyn ProviderSource>,
        secrets: Arc<dyn SecretStore>,
        config: &Config,
    ) -> Self {
        Llm {
            providers,
            secrets,
            allow_private: config.outbound_allow_private,
            breakers: LazyBreakers::new(
                &config.redis_url,
                &config.redis_prefix,
                "llm",
                config.llm_breaker_failures,
                config.llm_breaker_cooldown,
            ),
        }
    }
}

/// Why one provider's call failed.
#[derive(Debug)]
struct Failure {
    error: &'static str,
    message: String,
    /// Counts against the provider's breaker (it is down or overloaded).
    provider_failed: bool,
    /// The request itself is bad: no other provider will take it either.
    fatal: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    fn new(error: &'static str, message: impl Into<String>) -> Self {
        Failure {
            error,
            message: message.into(),
            provider_failed: true,
            fatal: false,
            retry_after: None,
        }
    }
}

/// What an answered call measured.
struct Answered {
    answer: Answer,
    ttft: Option<Duration>,
    latency: Duration,
}

/// A streamed answer as it arrives: events parsed, text written as output chunks (the first
/// at once, then at most every [`CHUNK_EVERY`]). An answer that is not an event stream (an
/// error's JSON) is kept as it is.
struct Stream {
    protocol: ProviderType,
    provider: String,
    parser: sse::Parser,
    events: Option<bool>,
    raw: Vec<u8>,
    answer: Answer,
    error: Option<String>,
    pending: String,
    flushed: Instant,
    started: Instant,
    ttft: Option<Duration>,
    seq: u64,
    progress: Arc<dyn ProgressSink>,
}

impl Stream {
    async fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let text = std::mem::take(&mut self.pending);
        self.progress
            .output_chunk(self.seq, json!({"text": text, "provider": self.provider}))
            .await;
        self.seq += 1;
        self.flushed = Instant::now();
    }
}

#[async_trait]
impl BodySink for Stream {
    async fn start(&mut self, headers: &reqwest::header::HeaderMap) {
        self.events = Some(
            headers
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream")),
        );
    }

    async fn piece(&mut self, bytes: &[u8], _total: Option<u64>) -> Result<(), String> {
        if self.events != Some(true) {
            // An error's JSON, or a whole answer from a provider that does not stream (the
            // policy caps it at MAX_ANSWER_BYTES).
            self.raw.extend_from_slice(bytes);
            return Ok(());
        }
        for event in self.parser.feed(bytes) {
            match llm::read_event(self.protocol, &event, &mut self.answer) {
                Ok(Some(text)) => {
                    self.pending.push_str(&text);
                    if self.ttft.is_none() {
                        self.ttft = Some(self.started.elapsed());
                        self.flush().await;
                    } else if self.flushed.elapsed() >= CHUNK_EVERY {
                        self.flush().await;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.error.get_or_insert(e);
                }
            }
        }
        Ok(())
    }
}

/// How a failed exchange counts: the body of an answer with an error status names the error.
fn status_failure(status: u16, body: &[u8], retry_after: Option<Duration>) -> Failure {
    let message = format!("answered {status}: {}", llm::error_message(body));
    match status {
        408 | 429 | 500..=599 => Failure {
            retry_after,
            ..Failure::new("http_status", message)
        },
        // A refused key or an unknown model here: another provider may take it.
        401 | 403 | 404 => Failure {
            provider_failed: false,
            ..Failure::new("http_status", message)
        },
        _ => Failure {
            provider_failed: false,
            fatal: true,
            ..Failure::new("bad_request", message)
        },
    }
}

fn send_failure(e: GetError) -> Failure {
    match e {
        GetError::Http(HttpError::Timeout) => Failure::new("timeout", "no complete answer in time"),
        GetError::Http(HttpError::Connect(m)) => Failure::new("connect_failed", m),
        GetError::Http(HttpError::Other(m)) => Failure::new("stream_cut", m),
        GetError::Http(HttpError::Forbidden(m)) => Failure {
            provider_failed: false,
            ..Failure::new("forbidden_address", m)
        },
        GetError::Http(HttpError::InvalidUrl(m)) => Failure {
            provider_failed: false,
            ..Failure::new("invalid_url", m)
        },
        GetError::TooLarge(n) => Failure::new(
            "response_too_large",
            format!("the answer is longer than {n} bytes"),
        ),
        e @ (GetError::TooManyRedirects | GetError::BadRedirect) => Failure {
            provider_failed: false,
            ..Failure::new("redirects", e.to_string())
        },
        GetError::Canceled => Failure {
            provider_failed: false,
            fatal: true,
            ..Failure::new("canceled", "the job was canceled")
        },
        GetError::Sink(m) => Failure::new("stream_cut", m),
    }
}

impl Llm {
    /// One call to `provider`; streamed text goes out through `progress` from chunk `seq` on.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        provider: &LlmProvider,
        model: &str,
        messages: &[Message],
        input: &LlmInput,
        api_key: Option<&str>,
        ctx: &JobContext,
        seq: &mut u64,
    ) -> Result<Answered, Failure> {
        let def = &provider.definition;
        let request = llm::request(
            def,
            &Call {
                model,
                messages,
                input,
                stream: input.streams(),
                api_key,
            },
        );
        let policy = OutboundPolicy {
            allow_private: self.allow_private,
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_millis(def.timeout_ms()),
            max_response_bytes: MAX_ANSWER_BYTES,
        };
        let started = Instant::now();
        let mut stream = input.streams().then(|| Stream {
            protocol: def.protocol,
            provider: provider.name.clone(),
            parser: sse::Parser::default(),
            events: None,
            raw: Vec::new(),
            answer: Answer::default(),
            error: None,
            pending: String::new(),
            flushed: started,
            started,
            ttft: None,
            seq: *seq,
            progress: ctx.progress.clone(),
        });
        let sent = fetch::send(
            &policy,
            reqwest::Method::POST,
            &request.url,
            &request.headers,
            Some(request.body),
            &ctx.cancel,
            stream.as_mut().map(|s| s as &mut dyn BodySink),
        )
        .await;
        if let Some(s) = stream.as_mut() {
            s.flush().await;
            *seq = s.seq;
        }
        let got = sent.map_err(send_failure)?;
        let latency = started.elapsed();
        let body = stream.as_ref().map_or(&got.body, |s| &s.raw);
        if !(200..300).contains(&got.status) {
            return Err(status_failure(got.status, body, got.retry_after));
        }
        let Some(s) = stream else {
            let answer = llm::read_body(def.protocol, &got.body)
                .map_err(|e| Failure::new("invalid_response", e))?;
            return Ok(Answered {
                answer,
                ttft: None,
                latency,
            });
        };
        if s.events != Some(true) {
            // A provider that answers a stream request with one JSON body.
            let answer = llm::read_body(def.protocol, &s.raw)
                .map_err(|e| Failure::new("invalid_response", e))?;
            return Ok(Answered {
                answer,
                ttft: None,
                latency,
            });
        }
        if let Some(e) = s.error {
            return Err(Failure::new("provider_error", e));
        }
        if !s.answer.done {
            return Err(Failure::new(
                "stream_cut",
                "the stream ended before the answer did",
            ));
        }
        Ok(Answered {
            answer: s.answer,
            ttft: s.ttft,
            latency,
        })
    }
}

fn tried(tries: &mut Vec<LlmTry>, provider: &str, error: &str, message: String) {
    tries.push(LlmTry {
        provider: provider.to_string(),
        error: error.to_string(),
        message,
    });
}

/// Record a call's outcome in its provider's breaker and beside it (logged, never fatal).
async fn record(
    breakers: &HostBreakers,
    namespace: &str,
    provider: &str,
    ok: bool,
    error: Option<&str>,
    latency: Duration,
) {
    match breakers.record(namespace, provider, ok).await {
        Ok(Some(t)) => {
            let to = match t {
                Transition::Opened => "open",
                Transition::Closed => "closed",
            };
            tracing::warn!(
                provider,
                namespace,
                state = to,
                "LLM provider circuit breaker"
            );
            metrics::counter!("capibara_llm_breaker_transitions_total", "to" => to).increment(1);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "recording an LLM call in its breaker"),
    }
    if let Err(e) = breakers
        .note(namespace, provider, error, latency.as_secs_f64() * 1000.0)
        .await
    {
        tracing::warn!(error = %e, "noting an LLM call");
    }
}

#[async_trait]
impl Executor for Llm {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let abort = |t: &str, m: String| ExecError::Abort(JobError::new(t, m));
        let input: LlmInput = input::parse(&ctx.input)
            .map_err(|e| abort("invalid_input", format!("{}: {}", e.field, e.message)))?;
        let namespace = ctx.job.namespace.as_str();
        let providers = self
            .providers
            .providers(namespace)
            .await
            .map_err(|e| ExecError::Retryable(JobError::new("store_unavailable", e)))?;
        let candidates = route(
            &providers,
            input.provider.as_deref(),
            input.model.as_deref(),
        );
        if candidates.is_empty() {
            return Err(abort(
                "no_provider",
                match (&input.provider, &input.model) {
                    (Some(p), Some(m)) => format!("provider `{p}` does not exist or does not serve `{m}` (GET /v1/llm/providers)"),
                    (Some(p), None) => format!("no provider `{p}` in this namespace (GET /v1/llm/providers)"),
                    (None, m) => format!(
                        "no provider serves model `{}` (GET /v1/llm/providers)",
                        m.as_deref().unwrap_or_default()
                    ),
                },
            ));
        }
        let breakers = self.breakers.get().await?;
        let messages = input.conversation();
        let mut tries: Vec<LlmTry> = Vec::new();
        let mut soonest: Option<Duration> = None;
        let mut seq = 0u64;
        for provider in candidates {
            let name = provider.name.as_str();
            let Some(model) = input
                .model
                .as_deref()
                .or(provider.definition.default_model())
            else {
                tried(
                    &mut tries,
                    name,
                    "no_model",
                    "the job names no model and the provider lists only patterns".into(),
                );
                continue;
            };
            let timeout = Duration::from_millis(provider.definition.timeout_ms());
            let allowed = breakers
                .allow(namespace, name, timeout)
                .await
                .map_err(|e| {
                    ExecError::Retryable(JobError::new("breaker_unavailable", e.to_string()))
                })?;
            if let Err(wait) = allowed {
                metrics::counter!("capibara_llm_requests_total", "provider" => name.to_string(), "outcome" => "circuit_open").increment(1);
                soonest = Some(soonest.map_or(wait, |s| s.min(wait)));
                tried(&mut tries, name, "circuit_open",
                    format!(
                        "its circuit breaker is open after repeated failures; the next call may go in {:.1} s",
                        wait.as_secs_f64()
                    ),
                );
                continue;
            }
            let api_key = match &provider.definition.api_key_secret {
                Some(secret) => match self.secrets.secret(namespace, secret).await {
                    Ok(Some(v)) => Some(v),
                    Ok(None) => {
                        tried(
                            &mut tries,
                            name,
                            "secret_not_found",
                            format!("its api_key_secret `{secret}` does not exist"),
                        );
                        continue;
                    }
                    Err(e) => {
                        return Err(ExecError::Retryable(JobError::new("store_unavailable", e)))
                    }
                },
                None => None,
            };
            if seq > 0 {
                // This provider starts over: clients drop what the last one streamed.
                let reason = tries.last().map(|t| t.message.clone()).unwrap_or_default();
                ctx.progress
                    .output_chunk(
                        seq,
                        json!({"reset": true, "provider": name, "reason": reason}),
                    )
                    .await;
                seq += 1;
            }
            let started = Instant::now();
            let result = self
                .call(
                    provider,
                    model,
                    &messages,
                    &input,
                    api_key.as_deref(),
                    &ctx,
                    &mut seq,
                )
                .await;
            match result {
                Ok(done) => {
                    record(breakers, namespace, name, true, None, done.latency).await;
                    return Ok(Output {
                        output: to_output(output(provider, model, done, tries)),
                        ..Output::default()
                    });
                }
                Err(f) => {
                    let message = format!("{}: {}", f.error, f.message);
                    if f.provider_failed {
                        record(
                            breakers,
                            namespace,
                            name,
                            false,
                            Some(&message),
                            started.elapsed(),
                        )
                        .await;
                    }
                    metrics::counter!("capibara_llm_requests_total", "provider" => name.to_string(), "outcome" => "error").increment(1);
                    if f.fatal {
                        return Err(abort(f.error, format!("provider `{name}` {}", f.message)));
                    }
                    if let Some(after) = f.retry_after {
                        soonest = Some(soonest.map_or(after, |s| s.min(after)));
                    }
                    tried(&mut tries, name, f.error, f.message);
                }
            }
        }
        let summary: Vec<String> = tries
            .iter()
            .map(|t| format!("{} ({}: {})", t.provider, t.error, t.message))
            .collect();
        let error = JobError::new(
            "providers_failed",
            format!("every provider failed: {}", summary.join("; ")),
        );
        Err(match soonest {
            Some(wait) => ExecError::RetryAfter(wait, error),
            None => ExecError::Retryable(error),
        })
    }

    /// A call costs money: one attempt at a time.
    fn repeatable(&self) -> bool {
        false
    }
}

/// The job's output for `done` from `provider`, with metrics recorded.
fn output(provider: &LlmProvider, model: &str, done: Answered, tries: Vec<LlmTry>) -> LlmOutput {
    let name = provider.name.clone();
    let a = done.answer;
    let (input_tokens, output_tokens) = (a.input_tokens.unwrap_or(0), a.output_tokens.unwrap_or(0));
    let cost_usd = provider.definition.cost.as_ref().map(|c| {
        (input_tokens as f64 * c.input_per_mtok + output_tokens as f64 * c.output_per_mtok) / 1e6
    });
    metrics::counter!("capibara_llm_requests_total", "provider" => name.clone(), "outcome" => "ok")
        .increment(1);
    metrics::counter!("capibara_llm_tokens_total", "provider" => name.clone(), "direction" => "input")
        .increment(input_tokens);
    metrics::counter!("capibara_llm_tokens_total", "provider" => name.clone(), "direction" => "output")
        .increment(output_tokens);
    if let Some(c) = cost_usd {
        metrics::counter!("capibara_llm_cost_microdollars_total", "provider" => name.clone())
            .increment((c * 1e6).round() as u64);
    }
    metrics::histogram!("capibara_llm_request_duration_seconds", "provider" => name.clone())
        .record(done.latency.as_secs_f64());
    if let Some(t) = done.ttft {
        metrics::histogram!("capibara_llm_ttft_seconds", "provider" => name.clone())
            .record(t.as_secs_f64());
    }
    LlmOutput {
        message: Message {
            role: Role::Assistant,
            content: a.text.clone(),
        },
        text: a.text,
        provider: name,
        model: a.model.unwrap_or_else(|| model.to_string()),
        finish_reason: a.finish_reason,
        usage: LlmUsage {
            input_tokens,
            output_tokens,
            total_tokens: input_tokens + output_tokens,
        },
        latency_ms: done.latency.as_secs_f64() * 1000.0,
        ttft_ms: done.ttft.map(|t| t.as_secs_f64() * 1000.0),
        cost_usd,
        tries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_decide_failover() {
        let f = status_failure(503, br#"{"error":{"message":"busy"}}"#, None);
        assert!(f.provider_failed && !f.fatal);
        assert!(f.message.contains("busy"));
        let f = status_failure(401, b"{}", None);
        assert!(!f.provider_failed && !f.fatal);
        let f = status_failure(400, b"{}", None);
        assert!(f.fatal);
        let f = status_failure(429, b"", Some(Duration::from_secs(3)));
        assert_eq!(f.retry_after, Some(Duration::from_secs(3)));
    }
}
