//! Flow control (docs/flow-control.md): concurrency and rate limits per key, and pauses. Each
//! limit is a namespace resource with its own stream (`LimitConfigured` / `LimitDeleted`); the
//! pauses of a namespace are one stream (`DispatchPaused` / `DispatchResumed`). Which limits a
//! job falls under, and under which key, is decided here ([`Group::of`]); the queue enforces
//! them when it hands jobs out (shared/src/queue.rs).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    event::{DomainEvent, StreamType},
    job::Job,
    FieldError,
};

/// Which jobs a limit applies to (absent fields match everything of the namespace).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The limit's own namespace (a limit never applies to another namespace's jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A rate: `count` starts per `period_s`, with up to `burst` at once (default 1: evenly
/// spaced).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitRate {
    #[schema(minimum = 1)]
    pub count: u32,
    #[schema(minimum = 0.001, maximum = 86400)]
    pub period_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub burst: Option<u32>,
}

impl LimitRate {
    /// Milliseconds between two starts.
    pub fn interval_ms(&self) -> f64 {
        self.period_s * 1000.0 / f64::from(self.count)
    }
}

/// A limit's definition (`PUT /v1/limits/{name}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitDef {
    #[serde(default, rename = "match")]
    #[schema(inline)]
    pub matches: LimitMatch,
    /// Where a job's key is read: `tags.<name>` or `input.<path>` (dots between fields).
    /// Absent: one key for every matching job (a global limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^(tags\.[^.]+|input(\.[^.]+)+)$")]
    pub key: Option<String>,
    /// At most this many jobs of one key run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub max_running: Option<u32>,
    /// At most this many starts per period, per key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(inline)]
    pub rate: Option<LimitRate>,
}

/// Limit and key names: what a Redis key and a URL segment can carry.
pub fn valid_limit_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl LimitDef {
    /// Check a definition for namespace `namespace`; errors name fields under `body`.
    pub fn validate(&self, namespace: &str) -> Result<(), FieldError> {
        if self.max_running.is_none() && self.rate.is_none() {
            return Err(FieldError::new(
                "max_running",
                "a limit needs `max_running`, `rate` or both",
            ));
        }
        if self.max_running == Some(0) {
            return Err(FieldError::new(
                "max_running",
                "must be at least 1 (pause the queue to stop it)",
            ));
        }
        if let Some(r) = &self.rate {
            if r.count == 0 {
                return Err(FieldError::new("rate.count", "must be at least 1"));
            }
            if !(r.period_s.is_finite() && r.period_s >= 0.001 && r.period_s <= 86_400.0) {
                return Err(FieldError::new(
                    "rate.period_s",
                    "must be between 0.001 and 86400 seconds",
                ));
            }
            if r.burst == Some(0) {
                return Err(FieldError::new("rate.burst", "must be at least 1"));
            }
        }
        if let Some(ns) = &self.matches.namespace {
            if ns != namespace {
                return Err(FieldError::new(
                    "match.namespace",
                    "a limit applies within its own namespace only",
                ));
            }
        }
        if let Some(q) = &self.matches.queue {
            if !super::job::valid_queue_name(q) {
                return Err(FieldError::new("match.queue", "not a queue name"));
            }
        }
        if let Some(k) = &self.key {
            KeyPath::parse(k).map_err(|m| FieldError::new("key", m))?;
        }
        Ok(())
    }

    fn applies_to(&self, job: &Job) -> bool {
        self.matches.queue.as_ref().is_none_or(|q| *q == job.queue)
            && self.matches.kind.as_ref().is_none_or(|k| *k == job.kind)
    }
}

/// Where a key is read from a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPath {
    Tag(String),
    Input(Vec<String>),
}

impl KeyPath {
    pub fn parse(path: &str) -> Result<KeyPath, &'static str> {
        let mut parts = path.split('.');
        let root = parts.next().unwrap_or_default();
        let rest: Vec<String> = parts.map(str::to_string).collect();
        if rest.is_empty() || rest.iter().any(String::is_empty) {
            return Err("must be `tags.<name>` or `input.<path>`");
        }
        match root {
            "tags" if rest.len() == 1 => Ok(KeyPath::Tag(rest[0].clone())),
            "input" => Ok(KeyPath::Input(rest)),
            _ => Err("must be `tags.<name>` or `input.<path>`"),
        }
    }

    /// The job's key (`None`: the job does not carry it).
    pub fn read(&self, job: &Job) -> Option<String> {
        match self {
            KeyPath::Tag(t) => job.tags.get(t).cloned(),
            KeyPath::Input(path) => {
                let mut v = &job.input;
                for p in path {
                    v = v.get(p)?;
                }
                match v {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Null => None,
                    other => Some(other.to_string()),
                }
            }
        }
    }
}

/// The key of jobs that lack the limit's key field: they share one key.
pub const NO_KEY: &str = "(none)";

/// A configured limit (the `limits` row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limit {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub definition: LimitDef,
    pub deleted: bool,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Events of a limit's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum LimitEvent {
    LimitConfigured { name: String, definition: LimitDef },
    LimitDeleted {},
}

impl DomainEvent for LimitEvent {
    const STREAM: StreamType = StreamType::Limit;

    fn type_name(&self) -> &'static str {
        match self {
            LimitEvent::LimitConfigured { .. } => "LimitConfigured",
            LimitEvent::LimitDeleted {} => "LimitDeleted",
        }
    }
}

const LIMIT_NS: Uuid = Uuid::from_u128(0x6c1d_7a4e_2b8f_4c51_9e0a_3f6d_b2c4_a871);
const PAUSES_NS: Uuid = Uuid::from_u128(0x2a9e_5b17_c3d0_4f6e_8b21_7d4c_e9f0_13a6);

/// The stream of limit `name` of `namespace`.
pub fn stream_id(namespace: &str, name: &str) -> Uuid {
    Uuid::new_v5(&LIMIT_NS, format!("{namespace}/{name}").as_bytes())
}

impl Limit {
    /// The state after `ev`, or `None` when it does not apply.
    pub fn apply(
        prev: Option<Limit>,
        id: Uuid,
        namespace: &str,
        ev: &LimitEvent,
        at: DateTime<Utc>,
    ) -> Option<Limit> {
        let mut l = match (prev, ev) {
            (None, LimitEvent::LimitConfigured { name, definition }) => Limit {
                id,
                namespace: namespace.to_string(),
                name: name.clone(),
                definition: definition.clone(),
                deleted: false,
                version: 0,
                created_at: at,
                updated_at: at,
            },
            (None, _) => return None,
            (Some(l), _) => l,
        };
        match ev {
            LimitEvent::LimitConfigured { definition, .. } => {
                l.definition = definition.clone();
                l.deleted = false;
            }
            LimitEvent::LimitDeleted {} => {
                if l.deleted {
                    return None;
                }
                l.deleted = true;
            }
        }
        l.version += 1;
        l.updated_at = at;
        Some(l)
    }

    /// What configuring `definition` records: nothing when it is the live definition.
    pub fn put(current: Option<&Limit>, name: &str, definition: LimitDef) -> Vec<LimitEvent> {
        match current {
            Some(l) if !l.deleted && l.definition == definition => Vec::new(),
            _ => vec![LimitEvent::LimitConfigured {
                name: name.to_string(),
                definition,
            }],
        }
    }
}

/// What a pause stops: a queue, a kind, or one key of a limit (all within a namespace).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(tag = "scope", rename_all = "snake_case")]
pub enum PauseTarget {
    Queue { queue: String },
    Kind { kind: String },
    Key { limit: String, key: String },
}

impl PauseTarget {
    /// The field naming it in Redis's pause set (`<scope>:<namespace>/<target>`), also what the
    /// queue's Lua builds from a group.
    pub fn field(&self, namespace: &str) -> String {
        match self {
            PauseTarget::Queue { queue } => format!("queue:{namespace}/{queue}"),
            PauseTarget::Kind { kind } => format!("kind:{namespace}/{kind}"),
            PauseTarget::Key { limit, key } => format!("key:{namespace}/{limit}/{key}"),
        }
    }
}

/// Events of a namespace's pause stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum PauseEvent {
    DispatchPaused { target: PauseTarget },
    DispatchResumed { target: PauseTarget },
}

impl DomainEvent for PauseEvent {
    const STREAM: StreamType = StreamType::Pauses;

    fn type_name(&self) -> &'static str {
        match self {
            PauseEvent::DispatchPaused { .. } => "DispatchPaused",
            PauseEvent::DispatchResumed { .. } => "DispatchResumed",
        }
    }
}

/// The pause stream of `namespace`.
pub fn pauses_stream_id(namespace: &str) -> Uuid {
    Uuid::new_v5(&PAUSES_NS, namespace.as_bytes())
}

/// A namespace's pauses (the `pauses` row): what is paused, since when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pauses {
    pub id: Uuid,
    pub namespace: String,
    /// Each paused target with when it was paused (a JSON array of pairs).
    pub paused: Vec<(PauseTarget, DateTime<Utc>)>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Pauses {
    pub fn apply(
        prev: Option<Pauses>,
        id: Uuid,
        namespace: &str,
        ev: &PauseEvent,
        at: DateTime<Utc>,
    ) -> Option<Pauses> {
        let mut p = prev.unwrap_or(Pauses {
            id,
            namespace: namespace.to_string(),
            paused: Vec::new(),
            version: 0,
            created_at: at,
            updated_at: at,
        });
        match ev {
            PauseEvent::DispatchPaused { target } => {
                if p.is_paused(target) {
                    return None;
                }
                p.paused.push((target.clone(), at));
                p.paused.sort();
            }
            PauseEvent::DispatchResumed { target } => {
                if !p.is_paused(target) {
                    return None;
                }
                p.paused.retain(|(t, _)| t != target);
            }
        }
        p.version += 1;
        p.updated_at = at;
        Some(p)
    }

    pub fn is_paused(&self, target: &PauseTarget) -> bool {
        self.paused.iter().any(|(t, _)| t == target)
    }
}

/// Who a job is dispatched with: its namespace, kind, queue, ordering key and the limits it
/// falls under with its key of each. Jobs of one group wait in one Redis sorted set; groups
/// take turns (fairness), and the queue checks the group's limits before handing out its head.
/// Serialized as the group's id in Redis (JSON, compact).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub ns: String,
    pub kind: String,
    pub queue: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ord: Option<String>,
    /// (limit name, key) pairs, by limit name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lim: Vec<(String, String)>,
}

impl Group {
    /// The group of `job` under `limits` (the namespace's live limits).
    pub fn of(job: &Job, limits: &[Limit]) -> Group {
        let mut lim: Vec<(String, String)> = limits
            .iter()
            .filter(|l| !l.deleted && l.namespace == job.namespace && l.definition.applies_to(job))
            .map(|l| {
                let key = match &l.definition.key {
                    None => String::new(),
                    Some(path) => KeyPath::parse(path)
                        .ok()
                        .and_then(|p| p.read(job))
                        .unwrap_or_else(|| NO_KEY.to_string()),
                };
                (l.name.clone(), key)
            })
            .collect();
        lim.sort();
        Group {
            ns: job.namespace.clone(),
            kind: job.kind.clone(),
            queue: job.queue.clone(),
            ord: job.ordering_key.clone(),
            lim,
        }
    }

    pub fn id(&self) -> String {
        serde_json::to_string(self).expect("a group serializes")
    }

    /// Whether anything is held for jobs of this group while they run.
    pub fn holds(&self) -> bool {
        self.ord.is_some() || !self.lim.is_empty()
    }
}

/// The limits of every namespace, as a process last loaded them.
pub type LimitsByNamespace = BTreeMap<String, Vec<Limit>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_read_tags_and_input_fields() {
        let mut job: Job = serde_json::from_value(serde_json::json!({
            "id": Uuid::nil(), "namespace": "n", "kind": "echo", "queue": "default",
            "priority": "normal", "status": "queued", "input": {"c": {"id": 42}, "s": "x"},
            "output": null, "error": null, "progress": null, "tags": {"tenant": "a"},
            "attempt": 0, "max_attempts": 1, "timeout_s": null, "backoff": null,
            "callback_url": null, "callback_events": null, "run_at": null,
            "cancel_requested": false, "worker_id": null, "artifacts": [], "version": 1,
            "created_at": Utc::now(), "queued_at": null, "started_at": null,
            "finished_at": null, "updated_at": Utc::now()
        }))
        .unwrap();
        assert_eq!(
            KeyPath::parse("tags.tenant").unwrap().read(&job).as_deref(),
            Some("a")
        );
        assert_eq!(
            KeyPath::parse("input.c.id").unwrap().read(&job).as_deref(),
            Some("42")
        );
        assert_eq!(KeyPath::parse("input.nope").unwrap().read(&job), None);
        assert!(KeyPath::parse("tags").is_err());
        assert!(KeyPath::parse("output.x").is_err());
        assert!(KeyPath::parse("tags.a.b").is_err());
        job.ordering_key = Some("o".into());
        let limit = |name: &str, key: Option<&str>, kind: Option<&str>| Limit {
            id: Uuid::nil(),
            namespace: "n".into(),
            name: name.into(),
            definition: LimitDef {
                matches: LimitMatch {
                    kind: kind.map(str::to_string),
                    ..Default::default()
                },
                key: key.map(str::to_string),
                max_running: Some(1),
                rate: None,
            },
            deleted: false,
            version: 1,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        };
        let g = Group::of(
            &job,
            &[
                limit("b", Some("tags.tenant"), None),
                limit("a", Some("tags.missing"), Some("echo")),
                limit("c", None, Some("other")),
            ],
        );
        assert_eq!(
            g.lim,
            [("a".into(), NO_KEY.into()), ("b".into(), "a".into())]
        );
        assert_eq!(g.ord.as_deref(), Some("o"));
    }
}
