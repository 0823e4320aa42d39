//! `POST /hooks/{trigger_id}`: inbound webhook triggers. A valid call answers 202 with the job it
//! submitted; bad signatures 401, replays 409 (same `webhook-id`) or 401 (timestamp more than
//! 5 minutes away), oversized bodies 413, too many calls 429 — each with a problem body.
//!
//! Order matters (docs/security.md, "Inbound hooks"): a call is authenticated before it spends
//! the trigger's rate limit, so callers without the credential cannot lock out the sender that
//! has it. Accepted calls are recorded on the trigger's stream with the job or run they start,
//! and a Standard Webhooks receipt (`webhook-id`) commits in that same transaction — a failed
//! start leaves no receipt, so the sender's retry is not mistaken for a replay. Refusals are
//! counted in `capibara_trigger_calls_total` and recorded at most once a minute per trigger and
//! status (the record says how many were left out), so a flood of bad calls cannot flood the log.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::{header, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use capibara_shared::{
    command::{
        self,
        hook_call::{self, meta, Accepted, Call, Refused, Start},
        CommandError,
    },
    config::Config,
    domain::{
        kinds,
        schedule::ScheduleTarget,
        trigger::{render_input, sha256_hex, Trigger, TriggerCredential, TriggerEvent},
        webhook::WebhookSecret,
    },
    problem::{self, Problem},
    store::{self, Store, StoreError},
};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use uuid::Uuid;

/// Largest body a hook accepts.
pub const MAX_BODY: usize = 1024 * 1024;
/// Accepted distance of a Standard Webhooks timestamp from now.
const TOLERANCE_S: u64 = 300;
/// Refusals of one status are recorded on a trigger's stream at most this often.
const RECORD_REFUSALS_EVERY: Duration = Duration::from_secs(60);

/// Whether a Standard Webhooks timestamp is within the tolerance of `now` (both in seconds since
/// the epoch). `abs_diff` cannot overflow, whatever the caller sent.
fn timestamp_fresh(now: i64, ts: i64) -> bool {
    now.abs_diff(ts) <= TOLERANCE_S
}

/// Per (trigger, status): when a refusal was last recorded, and how many since were not.
type Refusals = HashMap<(Uuid, u16), (Instant, u64)>;

#[derive(Clone)]
pub struct HookState {
    pub store: Store,
    /// What inputs are checked against (installed voices): the same answer as the API's.
    config: Arc<Config>,
    limits: Arc<Mutex<HashMap<Uuid, (f64, Instant)>>>,
    refusals: Arc<Mutex<Refusals>>,
    /// The bound on jobs waiting for a worker (`CAPIBARA_MAX_BACKLOG`), as in the API.
    backlog: capibara_shared::backlog::Backlog,
}

impl HookState {
    pub fn new(store: Store, config: Arc<Config>) -> Self {
        Self {
            backlog: capibara_shared::backlog::Backlog::new(store.pool.clone(), config.max_backlog),
            store,
            config,
            limits: Arc::default(),
            refusals: Arc::default(),
        }
    }

    /// Whether to record this refusal now; `Some(n)`: yes, and `n` were left out before it.
    fn record_refusal(&self, id: Uuid, status: u16) -> Option<u64> {
        let now = Instant::now();
        let mut map = self.refusals.lock().expect("refusals lock");
        match map.get_mut(&(id, status)) {
            Some((last, skipped)) if now.duration_since(*last) < RECORD_REFUSALS_EVERY => {
                *skipped += 1;
                None
            }
            _ => {
                let skipped = map
                    .insert((id, status), (now, 0))
                    .map_or(0, |(_, skipped)| skipped);
                Some(skipped)
            }
        }
    }

    /// Token bucket per trigger: `per_minute` calls a minute, bursts of the same size.
    fn take(&self, id: Uuid, per_minute: i32) -> Result<(), Duration> {
        let rate = per_minute.max(1) as f64 / 60.0;
        let burst = per_minute.max(1) as f64;
        let now = Instant::now();
        let mut map = self.limits.lock().expect("limits lock");
        let (tokens, last) = map.entry(id).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
        }
    }
}

/// The hooks router (merged into the scheduler's HTTP server).
pub fn router(state: HookState) -> Router {
    Router::new()
        .route("/hooks/{id}", post(hook))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

fn problem(status: StatusCode, detail: &str) -> Response {
    // A 409 here is always a replayed webhook id.
    let slug = match status {
        StatusCode::CONFLICT => "replay",
        _ => problem::slug(status),
    };
    Problem::new(status, slug, detail).into_response()
}

/// Answer a refused call with a problem; record it on the trigger's stream (best effort) unless
/// one with the same status was recorded less than a minute ago.
async fn reject(state: &HookState, t: &Trigger, status: StatusCode, reason: &str) -> Response {
    let outcome = if status == StatusCode::UNAUTHORIZED {
        "unauthenticated"
    } else {
        "rejected"
    };
    metrics::counter!("capibara_trigger_calls_total", "outcome" => outcome).increment(1);
    let Some(suppressed) = state.record_refusal(t.id, status.as_u16()) else {
        return problem(status, reason);
    };
    tracing::info!(trigger_id = %t.id, status = status.as_u16(), reason, suppressed, "hook call refused");
    let rejected = TriggerEvent::TriggerRejected {
        status: status.as_u16(),
        reason: reason.to_string(),
        suppressed,
    };
    // Best effort: the caller's answer does not depend on the record.
    if let Err(e) = command::execute::<Trigger, _, Infallible, _>(
        &state.store,
        &t.namespace,
        t.id,
        &meta(t),
        |_| Ok((vec![rejected.clone()], ())),
    )
    .await
    {
        tracing::debug!(trigger_id = %t.id, error = %e, "refusal not recorded");
    }
    problem(status, reason)
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Check the call's credentials (no I/O); `Ok(Some(webhook-id))` for Standard Webhooks calls.
fn authenticate(
    credential: &TriggerCredential,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Option<String>, String> {
    match credential {
        TriggerCredential::Bearer { token_sha256 } => {
            let given = header_str(headers, "authorization")
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or("missing bearer token")?;
            let given = sha256_hex(given);
            let same = given.len() == token_sha256.len()
                && given
                    .bytes()
                    .zip(token_sha256.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0;
            if same {
                Ok(None)
            } else {
                Err("wrong bearer token".into())
            }
        }
        TriggerCredential::StandardWebhooks { secret } => {
            let id = header_str(headers, "webhook-id").ok_or("missing webhook-id")?;
            let ts: i64 = header_str(headers, "webhook-timestamp")
                .and_then(|v| v.parse().ok())
                .ok_or("missing or bad webhook-timestamp")?;
            let sig =
                header_str(headers, "webhook-signature").ok_or("missing webhook-signature")?;
            if !timestamp_fresh(chrono::Utc::now().timestamp(), ts) {
                return Err("webhook-timestamp is more than 5 minutes away (replay?)".into());
            }
            let key = WebhookSecret::parse(secret).map_err(|_| "trigger secret is invalid")?;
            if !key.verify(id, ts, body, sig) {
                return Err("signature does not match".into());
            }
            Ok(Some(id.to_string()))
        }
        TriggerCredential::HmacSha256 { secret, header } => {
            let name = header
                .as_deref()
                .unwrap_or("x-hub-signature-256")
                .to_ascii_lowercase();
            let given = header_str(headers, &name)
                .and_then(|v| v.strip_prefix("sha256="))
                .and_then(|h| hex::decode(h).ok())
                .ok_or_else(|| format!("missing or malformed {name}"))?;
            let mut mac =
                Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_err(|_| "bad secret")?;
            mac.update(body);
            mac.verify_slice(&given)
                .map(|_| None)
                .map_err(|_| "signature does not match".into())
        }
    }
}

/// A replay of an accepted message: answered 409, nothing started.
async fn replay(state: &HookState, t: &Trigger, message_id: &str) -> Response {
    reject(
        state,
        t,
        StatusCode::CONFLICT,
        &format!("message {message_id} was already received"),
    )
    .await
}

async fn hook(
    State(state): State<HookState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(id) = id.parse::<Uuid>() else {
        return problem(StatusCode::NOT_FOUND, "no such trigger");
    };
    let t = match store::triggers::get_any(&state.store.pool, id).await {
        Ok(Some(t)) => t,
        Ok(None) => return problem(StatusCode::NOT_FOUND, "no such trigger"),
        Err(_) => return problem(StatusCode::SERVICE_UNAVAILABLE, "store unavailable; retry"),
    };
    let credential = match store::triggers::credential(&state.store.pool, t.id).await {
        Ok(Some(c)) => c,
        Ok(None) => return problem(StatusCode::INTERNAL_SERVER_ERROR, "trigger misconfigured"),
        Err(_) => return problem(StatusCode::SERVICE_UNAVAILABLE, "store unavailable; retry"),
    };
    // Authenticate first: only callers holding the credential spend the rate limit.
    let message_id = match authenticate(&credential, &headers, &body) {
        Ok(m) => m,
        Err(reason) => return reject(&state, &t, StatusCode::UNAUTHORIZED, &reason).await,
    };
    if let Err(wait) = state.take(t.id, t.rate_limit_per_minute) {
        let mut res = reject(
            &state,
            &t,
            StatusCode::TOO_MANY_REQUESTS,
            "rate limit of this trigger exceeded",
        )
        .await;
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            res.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return res;
    }
    if let Some(m) = &message_id {
        match store::triggers::received(&state.store.pool, t.id, m).await {
            Ok(false) => {}
            Ok(true) => return replay(&state, &t, m).await,
            Err(_) => return problem(StatusCode::SERVICE_UNAVAILABLE, "store unavailable; retry"),
        }
    }
    let body_json: Value = if body.is_empty() {
        Value::Object(Default::default())
    } else {
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&body)}))
    };
    let header_map: BTreeMap<String, String> = headers
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "authorization" | "cookie"))
        .filter_map(|(k, v)| {
            v.to_str()
                .ok()
                .map(|v| (k.as_str().to_string(), v.to_string()))
        })
        .collect();
    let input = match &t.input {
        Some(template) => match render_input(template, &body_json, &header_map) {
            Ok(v) => v,
            Err(m) => {
                return reject(
                    &state,
                    &t,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &format!("input template: {m}"),
                )
                .await
            }
        },
        None => body_json,
    };
    let target = match serde_json::from_value::<ScheduleTarget>(t.target.clone()) {
        Ok(target) => target,
        Err(_) => {
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "trigger target unavailable",
            )
        }
    };
    let mut sub = match target {
        ScheduleTarget::Job { job } => job,
        ScheduleTarget::Workflow { workflow_id, .. } => {
            let start = Start::Run { workflow_id, input };
            return accept(&state, &t, message_id, body.len(), start).await;
        }
    };
    // The call's input gets the same check as a job submitted through the API (a user kind's
    // schema included).
    let Ok(kinds) = capibara_shared::installed::with_user_kinds(
        &state.store.pool,
        &state.config,
        &t.namespace,
        &[sub.kind.as_str()],
    )
    .await
    else {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
    };
    if let Err(e) = kinds::validate_input(&sub.kind, &input, &kinds) {
        return reject(
            &state,
            &t,
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!("{}: {}", e.field, e.message),
        )
        .await;
    }
    sub.input = input;
    sub.tags.insert("trigger_id".into(), t.id.to_string());
    accept(
        &state,
        &t,
        message_id,
        body.len(),
        Start::Job(Box::new(sub)),
    )
    .await
}

/// Accept the call (`command::hook_call::accept`) and answer it.
async fn accept(
    state: &HookState,
    t: &Trigger,
    message_id: Option<String>,
    body_bytes: usize,
    start: Start,
) -> Response {
    if let Err(full) = state.backlog.admit(1) {
        let mut res = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            full.to_string(),
        )
        .into_response();
        res.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(state.backlog.retry_after().as_secs()),
        );
        return res;
    }
    let call = Call {
        message_id,
        body_bytes,
        start,
    };
    let body = match hook_call::accept(&state.store, t, call).await {
        Ok(Accepted::Job(job_id)) => json!({"status": "accepted", "trigger_id": t.id,
            "job_id": job_id, "location": format!("/v1/jobs/{job_id}")}),
        Ok(Accepted::Run(run_id)) => json!({"status": "accepted", "trigger_id": t.id,
            "run_id": run_id, "location": format!("/v1/runs/{run_id}")}),
        Err(CommandError::Rejected(Refused::Replay(m))) => return replay(state, t, &m).await,
        Err(CommandError::Rejected(e @ Refused::Input(_))) => {
            return reject(state, t, StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()).await
        }
        Err(CommandError::Rejected(e @ Refused::WorkflowGone)) => {
            return problem(StatusCode::NOT_FOUND, &e.to_string())
        }
        Err(CommandError::NotFound) => return problem(StatusCode::NOT_FOUND, "no such trigger"),
        Err(CommandError::Busy) => {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the trigger is busy; retry",
            )
        }
        // The call's own data cannot be stored (a NUL character in the body): a retry cannot
        // help, so the sender is told so instead of being asked to retry.
        Err(CommandError::Store(StoreError::Invalid(why))) => {
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("the call cannot be stored: {why}"),
            )
        }
        Err(CommandError::Store(_)) => {
            return problem(StatusCode::SERVICE_UNAVAILABLE, "store unavailable; retry")
        }
    };
    metrics::counter!("capibara_trigger_calls_total", "outcome" => "accepted").increment(1);
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_far_away_are_refused_without_overflow() {
        let now = 1_800_000_000_i64;
        assert!(timestamp_fresh(now, now));
        assert!(timestamp_fresh(now, now - 300));
        assert!(timestamp_fresh(now, now + 300));
        assert!(!timestamp_fresh(now, now - 301));
        // now − 2⁶³ (as a sender can write it) and the extremes.
        assert!(!timestamp_fresh(now, now.wrapping_add(i64::MIN)));
        assert!(!timestamp_fresh(now, i64::MIN));
        assert!(!timestamp_fresh(now, i64::MAX));
        assert!(!timestamp_fresh(i64::MIN, i64::MAX));
    }
}
