//! Webhook deliveries: the `delivery` stream's events and its projection row, plus the public
//! names of job and run events (`job.succeeded`, `run.failed`, …) used by callbacks and
//! subscriptions.

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::event::{DomainEvent, StreamType};

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Waits for an earlier delivery of the same job to the same target (order per job).
    Waiting,
    /// Being delivered (or between retries).
    Pending,
    Succeeded,
    /// Gave up (a final 4xx, or the retry schedule ran out). Can be redelivered.
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Waiting => "waiting",
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Succeeded => "succeeded",
            DeliveryStatus::Failed => "failed",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, DeliveryStatus::Succeeded | DeliveryStatus::Failed)
    }
}

impl fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeliveryStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "waiting" => Ok(DeliveryStatus::Waiting),
            "pending" => Ok(DeliveryStatus::Pending),
            "succeeded" => Ok(DeliveryStatus::Succeeded),
            "failed" => Ok(DeliveryStatus::Failed),
            other => Err(format!(
                "unknown status `{other}` (expected waiting, pending, succeeded or failed)"
            )),
        }
    }
}

/// Events of the `delivery` stream. `DeliveryAttempted`, `DeliverySucceeded` and
/// `DeliveryFailed` are the catalog's; `DeliveryCreated` and `DeliveryQueued` are Capibara's
/// additions (what is to be sent, and when a delivery job was started for it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum DeliveryEvent {
    DeliveryCreated {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subscription_id: Option<Uuid>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_id: Option<Uuid>,
        event_type: String,
        source_position: i64,
        target: String,
        url: String,
        payload: Value,
    },
    DeliveryQueued {
        delivery_job_id: Uuid,
        /// `created`, `released` (an earlier delivery of the job finished) or `redeliver`.
        reason: String,
    },
    DeliveryAttempted {
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status_code: Option<u16>,
        duration_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        response_snippet: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    DeliverySucceeded {
        attempt: u32,
    },
    DeliveryFailed {
        attempt: u32,
        reason: String,
    },
}

impl DomainEvent for DeliveryEvent {
    const STREAM: StreamType = StreamType::Delivery;

    fn type_name(&self) -> &'static str {
        match self {
            DeliveryEvent::DeliveryCreated { .. } => "DeliveryCreated",
            DeliveryEvent::DeliveryQueued { .. } => "DeliveryQueued",
            DeliveryEvent::DeliveryAttempted { .. } => "DeliveryAttempted",
            DeliveryEvent::DeliverySucceeded { .. } => "DeliverySucceeded",
            DeliveryEvent::DeliveryFailed { .. } => "DeliveryFailed",
        }
    }
}

/// The `deliveries` projection row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Delivery {
    pub id: Uuid,
    pub namespace: String,
    pub subscription_id: Option<Uuid>,
    pub job_id: Option<Uuid>,
    /// Public event type delivered (`job.succeeded`, …).
    pub event_type: String,
    /// Global log position of the event delivered.
    pub source_position: i64,
    /// `callback` (the job's `callback_url`) or the subscription id.
    pub target: String,
    pub url: String,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub last_status_code: Option<u16>,
    pub last_error: Option<String>,
    /// The exact body sent (the `webhook-id` is the delivery id).
    #[schema(value_type = Object)]
    pub payload: Value,
    /// The current `callback.deliver` job.
    pub delivery_job_id: Option<Uuid>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

impl Delivery {
    /// Fold one event (the first must be `DeliveryCreated`).
    pub fn apply(
        prev: Option<Delivery>,
        id: Uuid,
        namespace: &str,
        ev: &DeliveryEvent,
        at: DateTime<Utc>,
    ) -> Option<Delivery> {
        let mut d = match (prev, ev) {
            (
                None,
                DeliveryEvent::DeliveryCreated {
                    subscription_id,
                    job_id,
                    event_type,
                    source_position,
                    target,
                    url,
                    payload,
                },
            ) => Delivery {
                id,
                namespace: namespace.to_string(),
                subscription_id: *subscription_id,
                job_id: *job_id,
                event_type: event_type.clone(),
                source_position: *source_position,
                target: target.clone(),
                url: url.clone(),
                status: DeliveryStatus::Waiting,
                attempts: 0,
                last_status_code: None,
                last_error: None,
                payload: payload.clone(),
                delivery_job_id: None,
                version: 0,
                created_at: at,
                updated_at: at,
                delivered_at: None,
            },
            (None, _) => return None,
            (Some(d), _) => d,
        };
        match ev {
            DeliveryEvent::DeliveryCreated { .. } => {}
            DeliveryEvent::DeliveryQueued {
                delivery_job_id, ..
            } => {
                d.status = DeliveryStatus::Pending;
                d.delivery_job_id = Some(*delivery_job_id);
            }
            DeliveryEvent::DeliveryAttempted {
                attempt,
                status_code,
                error,
                ..
            } => {
                d.attempts = d.attempts.max(*attempt);
                d.last_status_code = *status_code;
                d.last_error = error.clone();
            }
            DeliveryEvent::DeliverySucceeded { .. } => {
                d.status = DeliveryStatus::Succeeded;
                d.delivered_at = Some(at);
            }
            DeliveryEvent::DeliveryFailed { reason, .. } => {
                d.status = DeliveryStatus::Failed;
                d.last_error = Some(reason.clone());
            }
        }
        d.version += 1;
        d.updated_at = at;
        Some(d)
    }
}

/// Public name of a job event: `JobSucceeded` → `job.succeeded`.
pub fn public_job_event(event_type: &str) -> Option<String> {
    let rest = event_type.strip_prefix("Job")?;
    let mut out = String::from("job.");
    for (i, c) in rest.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// Every public job event name.
pub const JOB_EVENT_NAMES: &[&str] = &[
    "job.submitted",
    "job.scheduled",
    "job.queued",
    "job.started",
    "job.progress",
    "job.log",
    "job.output_chunk",
    "job.succeeded",
    "job.attempt_failed",
    "job.failed",
    "job.cancel_requested",
    "job.canceled",
    "job.timed_out",
];

/// Public run events a subscription can ask for (a run's `callback_url` receives these too).
pub const RUN_EVENT_NAMES: &[&str] = &["run.succeeded", "run.failed", "run.canceled"];

/// Accepted alternative names (the seed's): `(alias, canonical)`. A subscription that names an
/// alias receives the event under the alias (see [`delivered_name`]).
pub const EVENT_ALIASES: &[(&str, &str)] = &[
    ("workflow.completed", "run.succeeded"),
    ("workflow.failed", "run.failed"),
];

/// The canonical name of `name`: itself, or what the alias stands for.
pub fn canonical_event(name: &str) -> &str {
    EVENT_ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, canonical)| canonical)
}

/// The event type a subscriber with `patterns` receives for the canonical event `name`, if it
/// wants it: `name` when a pattern matches it (`run.succeeded`, `run.*`, `*`), else the alias it
/// subscribed with (`workflow.completed`). Each event is delivered once per subscription.
pub fn delivered_name(patterns: &[String], name: &str) -> Option<String> {
    if patterns.iter().any(|p| pattern_matches(p, name)) {
        return Some(name.to_string());
    }
    patterns
        .iter()
        .find(|p| p.as_str() != name && canonical_event(p) == name)
        .cloned()
}

/// The kind of the job that sends one delivery.
pub const DELIVER_KIND: &str = "callback.deliver";

/// The submission of the `callback.deliver` job that sends delivery `delivery_id`, whether the
/// deliverer creates it or a client asks for a redelivery: one definition, so the two cannot
/// drift apart. `max_attempts` is one more than the retry schedule's steps.
pub fn delivery_job(delivery_id: Uuid, max_attempts: u32) -> super::job::Submission {
    super::job::Submission {
        kind: DELIVER_KIND.into(),
        input: serde_json::json!({"delivery_id": delivery_id}),
        queue: "callbacks".into(),
        priority: super::job::Priority::Normal,
        run_at: None,
        max_attempts,
        timeout_s: Some(60),
        backoff: None,
        callback_url: None,
        callback_events: None,
        tags: [("delivery_id".to_string(), delivery_id.to_string())].into(),
        run_id: None,
        step_id: None,
        secret_refs: None,
        expires_at: None,
        ttl_s: None,
        deadline_s: None,
        ordering_key: None,
        debounce_key: None,
        traceparent: None,
    }
}

/// Validate a subscription's event list: job and run event names, the aliases, and the
/// wildcards `job.*`, `run.*` and `*`. The error carries the index of the bad entry.
pub fn validate_subscription_events(patterns: &[String]) -> Result<(), (Option<usize>, String)> {
    if patterns.is_empty() {
        return Err((None, "name at least one event".into()));
    }
    if patterns.len() > 50 {
        return Err((None, "at most 50 events".into()));
    }
    for (i, p) in patterns.iter().enumerate() {
        let ok = JOB_EVENT_NAMES.contains(&p.as_str())
            || RUN_EVENT_NAMES.contains(&p.as_str())
            || EVENT_ALIASES.iter().any(|(a, _)| a == p)
            || matches!(p.as_str(), "*" | "job.*" | "run.*");
        if !ok {
            let aliases: Vec<String> = EVENT_ALIASES
                .iter()
                .map(|(a, c)| format!("{a} (= {c})"))
                .collect();
            return Err((
                Some(i),
                format!(
                    "unknown event `{p}` (expected {}, {}, {}, job.*, run.* or *)",
                    JOB_EVENT_NAMES.join(", "),
                    RUN_EVENT_NAMES.join(", "),
                    aliases.join(", "),
                ),
            ));
        }
    }
    Ok(())
}

/// Events a `callback_url` receives unless `callback_events` says otherwise.
pub const DEFAULT_CALLBACK_EVENTS: &[&str] = &["job.succeeded", "job.failed", "job.canceled"];

/// Whether `name` matches a subscription pattern: exact, `job.*`, or `*`.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    pattern == "*"
        || pattern == name
        || pattern.strip_suffix(".*").is_some_and(|prefix| {
            name.strip_prefix(prefix)
                .is_some_and(|r| r.starts_with('.'))
        })
}

/// Validate a pattern list (subscriptions, `callback_events`).
pub fn validate_patterns(patterns: &[String], allow_wildcards: bool) -> Result<(), String> {
    if patterns.is_empty() {
        return Err("name at least one event".into());
    }
    for p in patterns {
        let ok = JOB_EVENT_NAMES.contains(&p.as_str())
            || (allow_wildcards && (p == "*" || p == "job.*"));
        if !ok {
            return Err(format!(
                "unknown event `{p}` (expected {}{})",
                JOB_EVENT_NAMES.join(", "),
                if allow_wildcards { ", job.* or *" } else { "" }
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_events_get_public_names() {
        assert_eq!(
            public_job_event("JobSucceeded").as_deref(),
            Some("job.succeeded")
        );
        assert_eq!(
            public_job_event("JobAttemptFailed").as_deref(),
            Some("job.attempt_failed")
        );
        assert_eq!(
            public_job_event("JobOutputChunk").as_deref(),
            Some("job.output_chunk")
        );
        assert_eq!(public_job_event("RunStarted"), None);
        for n in JOB_EVENT_NAMES {
            assert!(n.starts_with("job."));
        }
    }

    #[test]
    fn patterns_match_exact_names_and_wildcards() {
        assert!(pattern_matches("job.*", "job.failed"));
        assert!(pattern_matches("*", "job.failed"));
        assert!(pattern_matches("job.failed", "job.failed"));
        assert!(!pattern_matches("job.failed", "job.succeeded"));
        assert!(!pattern_matches("run.*", "job.failed"));
        assert!(validate_patterns(&["job.*".into()], true).is_ok());
        assert!(validate_patterns(&["job.*".into()], false).is_err());
        assert!(validate_patterns(&["job.finished".into()], true).is_err());
    }

    #[test]
    fn subscriptions_name_run_events_and_aliases() {
        let v = |p: &[&str]| {
            validate_subscription_events(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        assert!(v(&["run.succeeded", "run.failed", "run.canceled", "run.*"]).is_ok());
        assert!(v(&["workflow.completed", "workflow.failed", "job.*", "*"]).is_ok());
        assert_eq!(v(&["job.failed", "run.finished"]).unwrap_err().0, Some(1));
        assert_eq!(v(&["workflow.*"]).unwrap_err().0, Some(0));
        assert_eq!(v(&[]).unwrap_err().0, None);

        let pats = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            delivered_name(&pats(&["workflow.completed"]), "run.succeeded").as_deref(),
            Some("workflow.completed")
        );
        assert_eq!(
            delivered_name(&pats(&["workflow.completed"]), "run.failed"),
            None
        );
        assert_eq!(
            delivered_name(&pats(&["workflow.failed", "run.*"]), "run.failed").as_deref(),
            Some("run.failed"),
            "a canonical match wins, and the event is delivered once"
        );
        assert_eq!(
            delivered_name(&pats(&["*"]), "run.canceled").as_deref(),
            Some("run.canceled")
        );
        assert_eq!(delivered_name(&pats(&["job.*"]), "run.succeeded"), None);
        assert_eq!(canonical_event("workflow.failed"), "run.failed");
        assert_eq!(canonical_event("job.failed"), "job.failed");
    }
}
