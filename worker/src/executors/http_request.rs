//! `http.request`: one HTTP call through the outbound guard (docs/http.md). The call goes
//! through [`crate::fetch::send`] (every hop resolved and checked, connections pinned to the
//! checked addresses, the body capped, the whole exchange bounded, credentials dropped when a
//! redirect leaves the host). Retries are the job's: connect errors, timeouts, 408, 429 and 5xx
//! fail the attempt retryably (with `Retry-After` when the answer has one), other unexpected
//! statuses fail the job. Each (namespace, host) has a circuit breaker shared by every worker
//! ([`HostBreakers`]): while it is open, calls fail at once, retryably, without being sent.
//! With `rate_limit`, each call first takes a slot of the host's token bucket (in place when
//! it is near, else the attempt is deferred without using one).

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use async_trait::async_trait;
use base64::Engine;
use capibara_shared::{
    artifacts::{ArtifactStore, ArtifactWriter},
    config::Config,
    domain::{
        job::{Artifact, JobError},
        kinds::{
            http::{HttpAuth, HttpRequestInput, HttpRequestOutput, RateLimit, ResponseAs},
            input,
        },
    },
    http_hosts::{HostBreakers, Take, Transition},
};
use serde_json::Value;

use super::{
    builtin::to_output, mail::SecretStore, outbound_error, ExecError, Executor, JobContext, Output,
    ProgressSink,
};
use crate::{
    breakers::LazyBreakers,
    fetch::{self, BodySink, GetError},
    http::{HttpError, OutboundPolicy},
};

pub struct HttpRequest {
    pub secrets: Arc<dyn SecretStore>,
    /// Where `response: artifact` bodies go.
    pub artifacts: Result<ArtifactStore, String>,
    pub allow_private: bool,
    breakers: LazyBreakers,
}

fn abort(kind: &str, message: impl Into<String>) -> ExecError {
    ExecError::Abort(JobError::new(kind, message))
}

fn retry(kind: &str, message: impl Into<String>) -> ExecError {
    ExecError::Retryable(JobError::new(kind, message))
}

impl HttpRequest {
    pub fn new(secrets: Arc<dyn SecretStore>, config: &Config) -> Self {
        HttpRequest {
            secrets,
            artifacts: ArtifactStore::open(&config.artifacts).map_err(|e| e.to_string()),
            allow_private: config.outbound_allow_private,
            breakers: LazyBreakers::new(
                &config.redis_url,
                &config.redis_prefix,
                "http",
                config.http_breaker_failures,
                config.http_breaker_cooldown,
            ),
        }
    }

    /// The `Authorization` header `auth` names, its secret read now.
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

    /// Wait for a slot of `host`'s token bucket: in place when it is at most
    /// [`RATE_WAIT_IN_PLACE`] away (returns the ms waited), else the attempt is deferred
    /// (scheduled again when the bucket has room, using no attempt).
    async fn wait_for_rate(
        breakers: &HostBreakers,
        namespace: &str,
        host: &str,
        rate: &RateLimit,
        ctx: &JobContext,
    ) -> Result<f64, ExecError> {
        let take = breakers
            .take(
                namespace,
                host,
                rate.interval_ms(),
                rate.burst(),
                RATE_WAIT_IN_PLACE,
            )
            .await
            .map_err(|e| retry("breaker_unavailable", e.to_string()))?;
        match take {
            Take::Go(wait) if wait.is_zero() => Ok(0.0),
            Take::Go(wait) => {
                metrics::counter!("capibara_http_rate_limited_total", "outcome" => "waited")
                    .increment(1);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => Ok(wait.as_secs_f64() * 1000.0),
                    _ = ctx.cancel.cancelled() => Err(abort("canceled", "the job was canceled")),
                }
            }
            Take::Later(wait) => {
                metrics::counter!("capibara_http_rate_limited_total", "outcome" => "deferred")
                    .increment(1);
                Err(ExecError::Defer(
                    wait,
                    JobError::new(
                        "rate_limited",
                        format!(
                            "the rate limit of `{host}` ({} per {} s, burst {}) lets the next call \
                             go in {:.1} s; the job waits without using an attempt",
                            rate.count,
                            rate.period_s.unwrap_or(1),
                            rate.burst(),
                            wait.as_secs_f64()
                        ),
                    ),
                ))
            }
        }
    }
}

/// The longest wait for a rate-limit slot inside an attempt; longer waits defer the job.
const RATE_WAIT_IN_PLACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The request's headers and body as `input` describes them.
fn request_parts(input: &HttpRequestInput) -> (Vec<(String, String)>, Option<Vec<u8>>) {
    let mut headers: Vec<(String, String)> = input
        .headers
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let has = |headers: &[(String, String)], name: &str| {
        headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name))
    };
    let (content_type, body) = if let Some(json) = &input.json {
        ("application/json", Some(json.to_string().into_bytes()))
    } else if let Some(form) = &input.form {
        let encoded = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter())
            .finish();
        (
            "application/x-www-form-urlencoded",
            Some(encoded.into_bytes()),
        )
    } else if let Some(text) = &input.body {
        ("text/plain; charset=utf-8", Some(text.clone().into_bytes()))
    } else {
        ("", None)
    };
    if body.is_some() && !has(&headers, "content-type") {
        headers.push(("content-type".into(), content_type.into()));
    }
    if !has(&headers, "user-agent") {
        headers.push((
            "user-agent".into(),
            concat!("Capibara/", env!("CARGO_PKG_VERSION")).into(),
        ));
    }
    (headers, body)
}

/// A response body streamed into the job's artifact, with a progress report at most every
/// second. Keeps the body's first bytes, for the error of an unexpected status.
struct Download {
    store: ArtifactStore,
    job_id: uuid::Uuid,
    name: String,
    content_type: String,
    writer: Option<ArtifactWriter>,
    first: Vec<u8>,
    progress: Arc<dyn ProgressSink>,
    reported: Instant,
}

impl Download {
    async fn writer(&mut self) -> Result<&mut ArtifactWriter, String> {
        if self.writer.is_none() {
            let w = self
                .store
                .writer(self.job_id, &self.name, &self.content_type)
                .await
                .map_err(|e| e.to_string())?;
            self.writer = Some(w);
        }
        Ok(self.writer.as_mut().expect("just made"))
    }

    /// Drop what was written.
    async fn abort(&mut self) {
        if let Some(w) = self.writer.take() {
            w.abort().await;
        }
    }

    /// Store what was written (an empty file for an empty body).
    async fn finish(mut self) -> Result<Artifact, String> {
        self.writer().await?;
        let writer = self.writer.take().expect("made above");
        writer.finish().await.map_err(|e| e.to_string())
    }
}

#[async_trait]
impl BodySink for Download {
    async fn start(&mut self, headers: &reqwest::header::HeaderMap) {
        if let Some(ct) = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 255)
        {
            self.content_type = ct.to_string();
        }
    }

    async fn piece(&mut self, bytes: &[u8], total: Option<u64>) -> Result<(), String> {
        let keep = 512usize.saturating_sub(self.first.len()).min(bytes.len());
        self.first.extend_from_slice(&bytes[..keep]);
        let writer = self.writer().await?;
        writer.write(bytes).await.map_err(|e| e.to_string())?;
        let size = writer.size();
        if self.reported.elapsed() >= std::time::Duration::from_secs(1) {
            self.reported = Instant::now();
            let percent = total
                .filter(|t| *t > 0)
                .map(|t| (100.0 * size as f64 / t as f64).min(100.0));
            let message = match total {
                Some(t) => format!("downloaded {size} of {t} bytes"),
                None => format!("downloaded {size} bytes"),
            };
            self.progress
                .progress_with_data(
                    percent,
                    Some(message),
                    Some(serde_json::json!({"bytes": size, "total": total})),
                )
                .await;
        }
        Ok(())
    }
}

/// Whether an answer with `status` counts as the host failing (and is worth retrying).
fn failing(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

#[async_trait]
impl Executor for HttpRequest {
    async fn execute(&self, ctx: JobContext) -> Result<Output, ExecError> {
        let input: HttpRequestInput = input::parse(&ctx.input)
            .map_err(|e| abort("invalid_input", format!("{}: {}", e.field, e.message)))?;
        let namespace = ctx.job.namespace.as_str();
        let mut url = capibara_shared::outbound::parse_url(&input.url)
            .map_err(|e| abort("invalid_url", e.to_string()))?;
        if let Some(query) = &input.query {
            url.query_pairs_mut().extend_pairs(query.iter());
        }
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let (mut headers, body) = request_parts(&input);
        if let Some(auth) = &input.auth {
            headers.push((
                "authorization".into(),
                self.authorization(namespace, auth).await?,
            ));
        }
        let timeout = std::time::Duration::from_millis(input.timeout_ms());
        let breakers = self.breakers.get().await?;
        let redis = |e: redis::RedisError| retry("breaker_unavailable", e.to_string());
        if let Err(wait) = breakers
            .allow(namespace, &host, timeout)
            .await
            .map_err(redis)?
        {
            metrics::counter!("capibara_http_requests_total", "outcome" => "circuit_open")
                .increment(1);
            return Err(ExecError::RetryAfter(
                wait,
                JobError::new(
                    "circuit_open",
                    format!(
                        "the circuit breaker of `{host}` is open after repeated failures; \
                         the next call may go in {:.1} s (GET /v1/http/hosts)",
                        wait.as_secs_f64()
                    ),
                ),
            ));
        }
        let rate_wait_ms = match &input.rate_limit {
            Some(rate) => Some(Self::wait_for_rate(breakers, namespace, &host, rate, &ctx).await?),
            None => None,
        };
        let policy = OutboundPolicy {
            allow_private: self.allow_private,
            connect_timeout: timeout.min(std::time::Duration::from_secs(10)),
            timeout,
            max_response_bytes: input.max_response_bytes() as usize,
        };
        let method = reqwest::Method::from_bytes(input.method().as_str().as_bytes())
            .expect("a known method");
        let mut download = if input.to_artifact() {
            Some(Download {
                store: self
                    .artifacts
                    .clone()
                    .map_err(|e| retry("artifact_store", e))?,
                job_id: ctx.job_id,
                name: input.artifact_name().to_string(),
                content_type: "application/octet-stream".into(),
                writer: None,
                first: Vec::new(),
                progress: ctx.progress.clone(),
                reported: Instant::now(),
            })
        } else {
            None
        };
        let started = Instant::now();
        let sink = download.as_mut().map(|d| d as &mut dyn BodySink);
        let sent = fetch::send(
            &policy,
            method,
            url.as_str(),
            &headers,
            body,
            &ctx.cancel,
            sink,
        )
        .await;
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        let host_failed = match &sent {
            Ok(got) => failing(got.status),
            Err(GetError::Http(HttpError::Timeout | HttpError::Connect(_))) => true,
            Err(_) => false,
        };
        let outcome = match &sent {
            Ok(got) if input.expected(got.status) => "ok",
            Ok(_) => "unexpected_status",
            Err(_) => "error",
        };
        metrics::counter!("capibara_http_requests_total", "outcome" => outcome).increment(1);
        // Only a call that went to the host tells about it (not one the guard refused).
        let reached = !matches!(
            sent,
            Err(GetError::Canceled
                | GetError::Http(HttpError::Forbidden(_) | HttpError::InvalidUrl(_)))
        );
        if reached {
            match breakers.record(namespace, &host, !host_failed).await {
                Ok(Some(t)) => {
                    let to = match t {
                        Transition::Opened => "open",
                        Transition::Closed => "closed",
                    };
                    tracing::warn!(host, namespace, state = to, "http.request circuit breaker");
                    metrics::counter!("capibara_http_breaker_transitions_total", "to" => to)
                        .increment(1);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "recording a call in its breaker"),
            }
        }
        let got = match sent {
            Ok(got) if input.expected(got.status) => got,
            other => {
                if let Some(d) = download.as_mut() {
                    d.abort().await;
                }
                other.map_err(|e| outbound_error(e, "max_response_bytes"))?
            }
        };
        if !input.expected(got.status) {
            let first = download.as_ref().map_or(&got.body, |d| &d.first);
            let snippet: String = String::from_utf8_lossy(first).chars().take(512).collect();
            let mut error = JobError::new(
                "http_status",
                format!("{} answered {}: {snippet}", host, got.status),
            );
            // A 429 makes the job's rate limits back off (docs/flow-control.md).
            error.details = Some(serde_json::json!({"status": got.status}));
            return Err(match (failing(got.status), got.retry_after) {
                (true, Some(after)) => ExecError::RetryAfter(after, error),
                (true, None) => ExecError::Retryable(error),
                (false, _) => ExecError::Abort(error),
            });
        }
        let mut response_headers = BTreeMap::<String, String>::new();
        for (name, value) in &got.headers {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            response_headers
                .entry(name.as_str().to_string())
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(&value);
                })
                .or_insert(value);
        }
        if let Some(d) = download {
            let artifact = d.finish().await.map_err(|e| retry("artifact_store", e))?;
            return Ok(Output {
                output: to_output(HttpRequestOutput {
                    status: got.status,
                    headers: response_headers,
                    body: Value::Null,
                    artifact: Some(artifact.clone()),
                    url: got.url.to_string(),
                    duration_ms,
                    rate_wait_ms,
                }),
                artifacts: vec![artifact],
                ..Output::default()
            });
        }
        let says_json = got
            .header("content-type")
            .is_some_and(|c| c.contains("json"));
        let body = if got.body.is_empty() {
            Value::Null
        } else {
            match input.response.unwrap_or(if says_json {
                ResponseAs::Json
            } else {
                ResponseAs::Text
            }) {
                ResponseAs::Json => serde_json::from_slice(&got.body).map_err(|e| {
                    abort(
                        "invalid_response",
                        format!("the response body is not JSON: {e}"),
                    )
                })?,
                ResponseAs::Text | ResponseAs::Artifact => {
                    Value::String(String::from_utf8_lossy(&got.body).into_owned())
                }
            }
        };
        Ok(Output {
            output: to_output(HttpRequestOutput {
                status: got.status,
                headers: response_headers,
                body,
                artifact: None,
                url: got.url.to_string(),
                duration_ms,
                rate_wait_ms,
            }),
            ..Output::default()
        })
    }

    /// A call may change the remote side (a POST): one attempt at a time.
    fn repeatable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_get_their_content_type_unless_one_is_given() {
        let input = |v: Value| input::parse::<HttpRequestInput>(&v).unwrap();
        let (h, b) = request_parts(&input(
            serde_json::json!({"url": "https://x.test", "form": {"a": "1 2", "b": "&"}}),
        ));
        assert_eq!(b.unwrap(), b"a=1+2&b=%26");
        assert!(h.contains(&(
            "content-type".into(),
            "application/x-www-form-urlencoded".into()
        )));
        let (h, b) = request_parts(&input(serde_json::json!({"url": "https://x.test",
            "json": {"a": 1}, "headers": {"Content-Type": "application/vnd.x+json"}})));
        assert_eq!(b.unwrap(), br#"{"a":1}"#);
        assert_eq!(
            h.iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                .count(),
            1
        );
        let (_, b) = request_parts(&input(serde_json::json!({"url": "https://x.test"})));
        assert!(b.is_none());
        assert!(failing(503) && failing(429) && failing(408) && !failing(404));
    }
}
