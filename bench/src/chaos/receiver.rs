//! The callback receiver of a chaos run: verifies each delivery's Standard Webhooks signature
//! and keeps, per job, the events in the order they arrived (a repeated `webhook-id` is an
//! at-least-once retry, counted and otherwise ignored).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use anyhow::Result;
use axum::{body::Bytes, extract::State, http::HeaderMap, http::StatusCode, Router};
use capibara_shared::domain::webhook::WebhookSecret;
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

/// One event as delivered.
#[derive(Debug, Clone)]
pub(crate) struct Delivered {
    pub(crate) event: String,
    pub(crate) timestamp: DateTime<Utc>,
}

#[derive(Default)]
pub(crate) struct Inbox {
    pub(crate) by_job: HashMap<Uuid, Vec<Delivered>>,
    ids: HashSet<String>,
    pub(crate) repeats: usize,
    pub(crate) bad_signature: usize,
    pub(crate) bad_body: usize,
}

struct ReceiverState {
    secret: WebhookSecret,
    inbox: Mutex<Inbox>,
}

pub(crate) struct Receiver {
    pub(crate) url: String,
    state: Arc<ReceiverState>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub(crate) async fn start(secret: WebhookSecret) -> Result<Receiver> {
        let state = Arc::new(ReceiverState {
            secret,
            inbox: Mutex::new(Inbox::default()),
        });
        let app = Router::new().fallback(receive).with_state(state.clone());
        let (port, server) = crate::harness::serve_loopback(app, "callback receiver").await?;
        Ok(Receiver {
            url: format!("http://127.0.0.1:{port}/chaos"),
            state,
            server,
        })
    }

    pub(crate) fn inbox<T>(&self, f: impl FnOnce(&Inbox) -> T) -> T {
        f(&self.state.inbox.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(
    State(s): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let now = Utc::now().timestamp();
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let id = h("webhook-id");
    let ts = h("webhook-timestamp").and_then(|t| t.parse::<i64>().ok());
    let verified = match (id, ts, h("webhook-signature")) {
        (Some(id), Some(ts), Some(sig)) => {
            (now - ts).abs() <= 300 && s.secret.verify(id, ts, &body, sig)
        }
        _ => false,
    };
    let mut inbox = s.inbox.lock().unwrap_or_else(|p| p.into_inner());
    let (true, Some(id)) = (verified, id) else {
        inbox.bad_signature += 1;
        return StatusCode::UNAUTHORIZED;
    };
    let parsed = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        let event = v.get("type")?.as_str()?.to_string();
        let timestamp: DateTime<Utc> = serde_json::from_value(v.get("timestamp")?.clone()).ok()?;
        let job: Uuid = v.get("data")?.get("id")?.as_str()?.parse().ok()?;
        Some((job, Delivered { event, timestamp }))
    });
    let Some((job, delivered)) = parsed else {
        inbox.bad_body += 1;
        return StatusCode::OK;
    };
    if !inbox.ids.insert(id.to_string()) {
        inbox.repeats += 1;
        return StatusCode::OK;
    }
    inbox.by_job.entry(job).or_default().push(delivered);
    StatusCode::OK
}
