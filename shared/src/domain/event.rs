//! Streams and the event envelope (contract: DESIGN §6).

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The kind of aggregate a stream belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamType {
    Job,
    Run,
    Workflow,
    Schedule,
    Trigger,
    Delivery,
    Model,
}

impl StreamType {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamType::Job => "job",
            StreamType::Run => "run",
            StreamType::Workflow => "workflow",
            StreamType::Schedule => "schedule",
            StreamType::Trigger => "trigger",
            StreamType::Delivery => "delivery",
            StreamType::Model => "model",
        }
    }
}

impl fmt::Display for StreamType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StreamType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "job" => StreamType::Job,
            "run" => StreamType::Run,
            "workflow" => StreamType::Workflow,
            "schedule" => StreamType::Schedule,
            "trigger" => StreamType::Trigger,
            "delivery" => StreamType::Delivery,
            "model" => StreamType::Model,
            other => return Err(format!("unknown stream type `{other}`")),
        })
    }
}

/// Who caused an event and why; stored as the event's `metadata`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventMetadata {
    pub namespace: String,
    /// `key:<api key id>`, `worker:<id>`, `scheduler`, …
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// Job kind, on job events (lets `/v1/events?kind=` filter without a join).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Job tags, on job events (for `/v1/events?tag=k:v`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<std::collections::BTreeMap<String, String>>,
}

/// An event as clients see it (contract envelope).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventEnvelope {
    /// Opaque cursor (the global log position); also the SSE `id`.
    pub id: String,
    pub stream_type: String,
    pub stream_id: Uuid,
    pub version: i64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: serde_json::Value,
    pub metadata: serde_json::Value,
    pub recorded_at: DateTime<Utc>,
}

impl EventEnvelope {
    pub fn position(&self) -> i64 {
        self.id.parse().unwrap_or(0)
    }
}
