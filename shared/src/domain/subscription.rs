//! Event subscriptions: which events of which jobs go to a URL.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{delivery::pattern_matches, job::Job};

/// Which jobs a subscription covers (all given fields must match).
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
    pub fn matches(&self, job: &Job) -> bool {
        self.kind.as_ref().is_none_or(|k| *k == job.kind)
            && self.queue.as_ref().is_none_or(|q| *q == job.queue)
            && self
                .tags
                .as_ref()
                .is_none_or(|tags| tags.iter().all(|(k, v)| job.tags.get(k) == Some(v)))
    }
}

/// A subscription as stored (the secret is never returned after creation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Subscription {
    pub id: Uuid,
    pub namespace: String,
    pub url: String,
    /// Event names or patterns (`job.*`, `job.failed`, `*`).
    pub events: Vec<String>,
    pub filter: SubscriptionFilter,
    /// `active` or `paused`.
    pub status: String,
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Subscription {
    /// Whether this subscription wants public event `name` of `job`.
    pub fn wants(&self, name: &str, job: &Job) -> bool {
        self.status == "active"
            && self.events.iter().any(|p| pattern_matches(p, name))
            && self.filter.matches(job)
    }
}
