//! Event subscriptions: which job and run events go to a URL, with which extra headers.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{delivery::delivered_name, job::Job};

/// Which jobs a subscription covers (all given fields must match). The fields describe jobs: a
/// subscription with a filter receives no run events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Every tag here must be on the job with the same value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
}

impl SubscriptionFilter {
    /// Whether no field is set (the subscription covers every job and every run).
    pub fn is_empty(&self) -> bool {
        self.kind.is_none() && self.queue.is_none() && self.tags.is_none()
    }

    pub fn matches(&self, job: &Job) -> bool {
        self.kind.as_ref().is_none_or(|k| *k == job.kind)
            && self.queue.as_ref().is_none_or(|q| *q == job.queue)
            && self
                .tags
                .as_ref()
                .is_none_or(|tags| tags.iter().all(|(k, v)| job.tags.get(k) == Some(v)))
    }
}

/// A subscription as stored (the secret is never returned after creation, header values never).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Subscription {
    pub id: Uuid,
    pub namespace: String,
    pub url: String,
    /// Event names or patterns (`job.*`, `job.failed`, `run.succeeded`, `run.*`, `*`, or the
    /// aliases `workflow.completed`, `workflow.failed`).
    pub events: Vec<String>,
    pub filter: SubscriptionFilter,
    /// Names of the custom headers sent with every delivery (their values are never shown).
    #[serde(default)]
    pub header_names: Vec<String>,
    /// `active` or `paused`.
    pub status: String,
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Subscription {
    /// The event type this subscription receives for public job event `name` of `job`, if it
    /// wants it.
    pub fn wants_job_event(&self, name: &str, job: &Job) -> Option<String> {
        if self.status != "active" || !self.filter.matches(job) {
            return None;
        }
        delivered_name(&self.events, name)
    }

    /// The event type this subscription receives for public run event `name` (`run.succeeded`,
    /// …), if it wants it: under the alias it subscribed with, when it named an alias.
    pub fn wants_run_event(&self, name: &str) -> Option<String> {
        if self.status != "active" || !self.filter.is_empty() {
            return None;
        }
        delivered_name(&self.events, name)
    }
}

/// Most custom headers per subscription.
pub const MAX_HEADERS: usize = 20;
/// Most bytes of all custom header names and values together.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// Headers a subscription may not set: hop-by-hop and framing headers (the HTTP client owns
/// them), `host`, `content-type`, and the Standard Webhooks headers (`webhook-*`, the signature
/// must be ours).
pub const RESERVED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "expect",
];

/// Check custom delivery headers and normalise their names to lowercase. The error is
/// `(field, message)` with the field written `headers.<name as given>`.
pub fn validate_headers(
    headers: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, (String, String)> {
    if headers.len() > MAX_HEADERS {
        return Err(("headers".into(), format!("at most {MAX_HEADERS} headers")));
    }
    let total: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_HEADER_BYTES {
        return Err((
            "headers".into(),
            format!("names and values together are at most {MAX_HEADER_BYTES} bytes"),
        ));
    }
    let mut out = BTreeMap::new();
    for (name, value) in headers {
        let field = format!("headers.{name}");
        let parsed = axum::http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| (field.clone(), "not a valid HTTP header name".to_string()))?;
        let lower = parsed.as_str().to_string();
        if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("webhook-") {
            return Err((
                field,
                format!("`{lower}` is set by Capibara and cannot be overridden"),
            ));
        }
        // Visible ASCII and inner spaces only: no control characters (CR/LF), no obs-text.
        let value_ok = axum::http::HeaderValue::from_str(value).is_ok()
            && value
                .bytes()
                .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
            && value.trim() == value;
        if !value_ok {
            return Err((
                field,
                "value must be visible ASCII without control characters or surrounding spaces"
                    .into(),
            ));
        }
        if out.insert(lower.clone(), value.clone()).is_some() {
            return Err((field, format!("`{lower}` is given twice")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn headers_are_checked_and_lowercased() {
        let ok = validate_headers(&h(&[("Authorization", "Bearer abc"), ("X-Team", "a")])).unwrap();
        assert_eq!(ok, h(&[("authorization", "Bearer abc"), ("x-team", "a")]));
        for (name, value) in [
            ("Webhook-Signature", "v1,x"),
            ("webhook-id", "1"),
            ("Content-Type", "text/plain"),
            ("Host", "example.com"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "close"),
            ("bad name", "x"),
            ("", "x"),
            ("x-a", "line\r\nInjected: 1"),
            ("x-a", " padded"),
            ("x-a", "caf\u{e9}"),
        ] {
            let err = validate_headers(&h(&[(name, value)])).unwrap_err();
            assert_eq!(err.0, format!("headers.{name}"), "{name}: {value:?}");
        }
        let dup = validate_headers(&h(&[("X-A", "1"), ("x-a", "2")])).unwrap_err();
        assert!(dup.1.contains("twice"), "{dup:?}");
        let many: BTreeMap<String, String> =
            (0..21).map(|i| (format!("x-{i}"), "v".into())).collect();
        assert_eq!(validate_headers(&many).unwrap_err().0, "headers");
        let big = h(&[("x-big", &"a".repeat(MAX_HEADER_BYTES))]);
        assert_eq!(validate_headers(&big).unwrap_err().0, "headers");
    }
}
