//! Streams and the event envelope (contract: DESIGN §6).

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;
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
    Kind,
    Connector,
    LlmProvider,
    Limit,
    Pauses,
    /// A bulk action on jobs (`POST /v1/jobs/bulk`).
    Bulk,
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
            StreamType::Kind => "kind",
            StreamType::Connector => "connector",
            StreamType::LlmProvider => "llm_provider",
            StreamType::Limit => "limit",
            StreamType::Pauses => "pauses",
            StreamType::Bulk => "bulk",
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
            "kind" => StreamType::Kind,
            "connector" => StreamType::Connector,
            "llm_provider" => StreamType::LlmProvider,
            "limit" => StreamType::Limit,
            "pauses" => StreamType::Pauses,
            "bulk" => StreamType::Bulk,
            other => return Err(format!("unknown stream type `{other}`")),
        })
    }
}

/// An aggregate's event, as every stream type implements it once: its stream type, its type
/// name, and how it is split into the stored (`events.type`, `events.data`) and rebuilt from
/// them. Events are serde enums tagged `{"type": …, "data": …}` (adjacent tagging), so the parts
/// are the two halves of that object.
pub trait DomainEvent: Serialize + DeserializeOwned {
    /// The stream type whose events these are.
    const STREAM: StreamType;

    /// The event's type name, as stored in `events.type` (the serde tag).
    fn type_name(&self) -> &'static str;

    /// Split into (`type`, `data`) for storage.
    fn to_parts(&self) -> (&'static str, Value) {
        let mut v = serde_json::to_value(self).expect("events serialize to JSON");
        let data = v
            .get_mut("data")
            .map(Value::take)
            .unwrap_or_else(|| serde_json::json!({}));
        (self.type_name(), data)
    }

    /// Rebuild from stored (`type`, `data`).
    fn from_parts(event_type: &str, data: Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(serde_json::json!({"type": event_type, "data": data}))
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

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use super::*;
    use crate::domain::{
        delivery::DeliveryEvent, job::JobEvent, run::RunEvent, schedule::ScheduleEvent,
        trigger::TriggerEvent, workflow::WorkflowEvent,
    };

    /// The stored parts of an event rebuild it, and its type name is its serde tag.
    fn stores<E: DomainEvent + PartialEq + Debug>(e: E, stream: StreamType) {
        assert_eq!(E::STREAM, stream);
        let tagged = serde_json::to_value(&e).unwrap();
        assert_eq!(tagged["type"], e.type_name(), "{e:?}");
        let (t, data) = e.to_parts();
        assert_eq!(data, tagged["data"], "{e:?}");
        assert_eq!(E::from_parts(t, data).unwrap(), e);
    }

    #[test]
    fn every_stream_types_events_are_stored_as_type_and_data() {
        stores(JobEvent::JobTimedOut { attempt: 2 }, StreamType::Job);
        stores(
            JobEvent::JobCanceled {
                attempt: None,
                error: None,
            },
            StreamType::Job,
        );
        stores(ScheduleEvent::SchedulePaused {}, StreamType::Schedule);
        stores(
            DeliveryEvent::DeliveryFailed {
                attempt: 3,
                reason: "timeout".into(),
            },
            StreamType::Delivery,
        );
        stores(TriggerEvent::TriggerDeleted {}, StreamType::Trigger);
        stores(WorkflowEvent::WorkflowDeleted {}, StreamType::Workflow);
        stores(
            RunEvent::RunRetried {
                steps: vec!["a".into()],
            },
            StreamType::Run,
        );
        // A stored event of another type is refused, not mistaken for one of these.
        assert!(
            ScheduleEvent::from_parts("JobTimedOut", serde_json::json!({"attempt": 1})).is_err()
        );
    }
}
