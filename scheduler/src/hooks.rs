//! `POST /hooks/{trigger_id}`: inbound webhook triggers. A valid call answers 202 with the job it
//! submitted; bad signatures 401, replays 409 (same `webhook-id`) or 401 (timestamp more than
//! 5 minutes away), oversized bodies 413, too many calls 429 — each with a problem body, and every
//! call, accepted or not, recorded on the trigger's stream.

use std::{
    collections::{BTreeMap, HashMap},
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
    config::Config,
    domain::{
        self,
        event::EventMetadata,
        job::JobEvent,
        kinds,
        schedule::ScheduleTarget,
        trigger::{render_input, Trigger, TriggerAuth, TriggerEvent},
        webhook::WebhookSecret,
    },
    store::{
        self,
        jobs::{job_append, JobWrite},
        triggers::trigger_append,
        AppendError, Store,
    },
};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use uuid::Uuid;

/// Largest body a hook accepts.
pub const MAX_BODY: usize = 1024 * 1024;
/// Accepted distance of a Standard Webhooks timestamp from now.
const TOLERANCE_S: i64 = 300;

#[derive(Clone)]
pub struct HookState {
    pub store: Store,
    /// What inputs are checked against (installed voices): the same answer as the API's.
    config: Arc<Config>,
    limits: Arc<Mutex<HashMap<Uuid, (f64, Instant)>>>,
}

impl HookState {
    pub fn new(store: Store, config: Arc<Config>) -> Self {
        Self {
            store,
            config,
            limits: Arc::default(),
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
    let body = json!({
        "type": format!("urn:capibara:problem:{}", match status.as_u16() {
            401 => "unauthorized", 404 => "not-found", 409 => "replay", 413 => "payload-too-large",
            422 => "validation", 429 => "rate-limited", 503 => "unavailable", _ => "error",
        }),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut res = (status, body.to_string()).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res
}

fn meta(t: &Trigger) -> EventMetadata {
    EventMetadata {
        namespace: t.namespace.clone(),
        actor: Some("hook".into()),
        ..Default::default()
    }
}

/// Record a refused call on the trigger's stream (best effort) and answer with a problem.
async fn reject(state: &HookState, t: &Trigger, status: StatusCode, reason: &str) -> Response {
    let mut current = t.clone();
    for _ in 0..5 {
        let ev = TriggerEvent::TriggerRejected {
            status: status.as_u16(),
            reason: reason.to_string(),
        };
        let Some((_, a)) = trigger_append(
            Some(&current),
            current.id,
            &current.namespace,
            &[ev],
            meta(&current),
            domain::now(),
        ) else {
            break;
        };
        match state.store.appender.append(a).await {
            Err(AppendError::Conflict { .. }) => {
                match store::triggers::get_any(&state.store.pool, t.id).await {
                    Ok(Some(fresh)) => current = fresh,
                    _ => break,
                }
            }
            _ => break,
        }
    }
    metrics::counter!("capibara_trigger_calls_total", "outcome" => "rejected").increment(1);
    problem(status, reason)
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Check the call's credentials; `Err((status, reason))` refuses it.
async fn authenticate(
    state: &HookState,
    t: &Trigger,
    auth: &TriggerAuth,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Option<String>, (StatusCode, String)> {
    let unauthorized = |m: &str| (StatusCode::UNAUTHORIZED, m.to_string());
    match auth {
        TriggerAuth::Bearer { token } => {
            let given = header_str(headers, "authorization")
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| unauthorized("missing bearer token"))?;
            let same = given.len() == token.len()
                && given
                    .bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0;
            if same {
                Ok(None)
            } else {
                Err(unauthorized("wrong bearer token"))
            }
        }
        TriggerAuth::StandardWebhooks { secret } => {
            let id = header_str(headers, "webhook-id")
                .ok_or_else(|| unauthorized("missing webhook-id"))?;
            let ts: i64 = header_str(headers, "webhook-timestamp")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| unauthorized("missing or bad webhook-timestamp"))?;
            let sig = header_str(headers, "webhook-signature")
                .ok_or_else(|| unauthorized("missing webhook-signature"))?;
            if (chrono::Utc::now().timestamp() - ts).abs() > TOLERANCE_S {
                return Err(unauthorized(
                    "webhook-timestamp is more than 5 minutes away (replay?)",
                ));
            }
            let key = WebhookSecret::parse(secret)
                .map_err(|_| unauthorized("trigger secret is invalid"))?;
            if !key.verify(id, ts, body, sig) {
                return Err(unauthorized("signature does not match"));
            }
            match store::triggers::first_receipt(&state.store.pool, t.id, id).await {
                Ok(true) => Ok(Some(id.to_string())),
                Ok(false) => Err((
                    StatusCode::CONFLICT,
                    format!("message {id} was already received"),
                )),
                Err(_) => Err((StatusCode::SERVICE_UNAVAILABLE, "store unavailable".into())),
            }
        }
        TriggerAuth::HmacSha256 { secret, header } => {
            let name = header
                .as_deref()
                .unwrap_or("x-hub-signature-256")
                .to_ascii_lowercase();
            let given = header_str(headers, &name)
                .and_then(|v| v.strip_prefix("sha256="))
                .and_then(|h| hex::decode(h).ok())
                .ok_or_else(|| unauthorized(&format!("missing or malformed {name}")))?;
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
                .map_err(|_| unauthorized("bad secret"))?;
            mac.update(body);
            mac.verify_slice(&given)
                .map(|_| None)
                .map_err(|_| unauthorized("signature does not match"))
        }
    }
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
    let Ok(auth) = serde_json::from_value::<TriggerAuth>(t.auth.clone()) else {
        return problem(StatusCode::INTERNAL_SERVER_ERROR, "trigger misconfigured");
    };
    let message_id = match authenticate(&state, &t, &auth, &headers, &body).await {
        Ok(m) => m,
        Err((status, reason)) => return reject(&state, &t, status, &reason).await,
    };
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
            return start_run(&state, &t, workflow_id, input, message_id, body.len()).await
        }
    };
    // The call's input gets the same check as a job submitted through the API.
    if let Err(e) = kinds::validate_input(&sub.kind, &input, state.config.as_ref()) {
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
    let job_id = Uuid::now_v7();
    let now = domain::now();
    let mut current = t.clone();
    for _ in 0..10 {
        let ev = TriggerEvent::TriggerInvoked {
            job_id,
            run_id: None,
            message_id: message_id.clone(),
            body_bytes: body.len(),
        };
        let Some((_, ta)) = trigger_append(
            Some(&current),
            current.id,
            &current.namespace,
            &[ev],
            meta(&current),
            now,
        ) else {
            break;
        };
        let Ok((_, ja)) = job_append(
            None,
            job_id,
            &[JobEvent::JobSubmitted(sub.clone())],
            JobWrite::new(meta(&current), now),
        ) else {
            break;
        };
        match state.store.appender.append_all(vec![ta, ja]).await {
            Ok(_) => {
                metrics::counter!("capibara_trigger_calls_total", "outcome" => "accepted")
                    .increment(1);
                let body = json!({"status": "accepted", "trigger_id": t.id, "job_id": job_id, "location": format!("/v1/jobs/{job_id}")});
                return (StatusCode::ACCEPTED, Json(body)).into_response();
            }
            Err(AppendError::Conflict { .. }) => {
                match store::triggers::get_any(&state.store.pool, t.id).await {
                    Ok(Some(fresh)) => current = fresh,
                    _ => break,
                }
            }
            Err(_) => return problem(StatusCode::SERVICE_UNAVAILABLE, "store unavailable; retry"),
        }
    }
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "the trigger is busy; retry",
    )
}

/// A trigger with a workflow target: start a run with the rendered input, recording the call on
/// the trigger's stream in the same transaction.
async fn start_run(
    state: &HookState,
    t: &Trigger,
    workflow_id: Uuid,
    input: serde_json::Value,
    message_id: Option<String>,
    body_bytes: usize,
) -> Response {
    let run_id = Uuid::now_v7();
    let mut current = t.clone();
    for _ in 0..10 {
        let now = domain::now();
        let ev = TriggerEvent::TriggerInvoked {
            job_id: run_id,
            run_id: Some(run_id),
            message_id: message_id.clone(),
            body_bytes,
        };
        let Some((_, ta)) = trigger_append(
            Some(&current),
            current.id,
            &current.namespace,
            &[ev],
            meta(&current),
            now,
        ) else {
            break;
        };
        let prepared = store::runs::prepare_run(
            &state.store,
            store::runs::StartRun {
                namespace: current.namespace.clone(),
                workflow_id,
                input: input.clone(),
                callback_url: None,
                actor: format!("trigger:{}", current.id),
                command: None,
                with: vec![ta],
                run_id,
            },
        )
        .await;
        let appends = match prepared {
            Ok((_, appends)) => appends,
            Err(store::runs::StartError::Input(e)) => {
                return reject(
                    state,
                    &current,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &format!("{}: {}", e.field, e.message),
                )
                .await
            }
            Err(store::runs::StartError::WorkflowNotFound) => {
                return problem(
                    StatusCode::NOT_FOUND,
                    "the trigger's workflow no longer exists",
                )
            }
            Err(_) => return problem(StatusCode::SERVICE_UNAVAILABLE, "store unavailable; retry"),
        };
        match state.store.appender.append_all(appends).await {
            Ok(_) => {
                metrics::counter!("capibara_trigger_calls_total", "outcome" => "accepted")
                    .increment(1);
                let body = json!({"status": "accepted", "trigger_id": current.id, "run_id": run_id,
                                  "location": format!("/v1/runs/{run_id}")});
                return (StatusCode::ACCEPTED, Json(body)).into_response();
            }
            Err(AppendError::Conflict { .. }) => {
                match store::triggers::get_any(&state.store.pool, current.id).await {
                    Ok(Some(fresh)) => current = fresh,
                    _ => break,
                }
            }
            Err(_) => return problem(StatusCode::SERVICE_UNAVAILABLE, "store unavailable; retry"),
        }
    }
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "the trigger is busy; retry",
    )
}
