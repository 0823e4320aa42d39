//! Inbound webhook triggers: who may call `POST /hooks/{id}`, how the call becomes a job's input,
//! and the `trigger` stream that records every call.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// How callers of a hook authenticate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TriggerAuth {
    /// `Authorization: Bearer <token>`.
    Bearer { token: String },
    /// Standard Webhooks headers signed with `secret` (`whsec_…`); replays (same `webhook-id`) are
    /// refused, and timestamps more than 5 minutes away.
    StandardWebhooks { secret: String },
    /// GitHub style: `header` (default `X-Hub-Signature-256`) = `sha256=<hex HMAC-SHA256 of the body>`.
    HmacSha256 {
        secret: String,
        #[serde(default)]
        header: Option<String>,
    },
}

impl TriggerAuth {
    /// The same, with secrets replaced (for responses).
    pub fn redacted(&self) -> TriggerAuth {
        match self {
            TriggerAuth::Bearer { .. } => TriggerAuth::Bearer {
                token: "***".into(),
            },
            TriggerAuth::StandardWebhooks { .. } => TriggerAuth::StandardWebhooks {
                secret: "***".into(),
            },
            TriggerAuth::HmacSha256 { header, .. } => TriggerAuth::HmacSha256 {
                secret: "***".into(),
                header: header.clone(),
            },
        }
    }
}

/// The `triggers` projection row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Trigger {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    #[schema(value_type = Object)]
    pub target: Value,
    #[schema(value_type = Object)]
    pub auth: Value,
    /// Template of the job input over `body` and `headers`; null = the request body.
    #[schema(value_type = Option<Object>)]
    pub input: Option<Value>,
    pub rate_limit_per_minute: i32,
    /// `active` or `deleted`.
    pub status: String,
    pub invocations: i64,
    pub rejections: i64,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Events of the `trigger` stream (Capibara's: the catalog leaves them open).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum TriggerEvent {
    TriggerCreated {
        name: String,
        target: Value,
        auth: Value,
        input: Option<Value>,
        rate_limit_per_minute: i32,
    },
    TriggerDeleted {},
    /// An accepted call.
    TriggerInvoked {
        /// The job started (for a workflow target: the run's id; `run_id` says so).
        job_id: Uuid,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_id: Option<Uuid>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_id: Option<String>,
        body_bytes: usize,
    },
    /// A refused call and why (status 401, 409, 413, 422, 429).
    TriggerRejected {
        status: u16,
        reason: String,
    },
}

impl TriggerEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            TriggerEvent::TriggerCreated { .. } => "TriggerCreated",
            TriggerEvent::TriggerDeleted {} => "TriggerDeleted",
            TriggerEvent::TriggerInvoked { .. } => "TriggerInvoked",
            TriggerEvent::TriggerRejected { .. } => "TriggerRejected",
        }
    }

    pub fn to_parts(&self) -> (&'static str, Value) {
        let mut v = serde_json::to_value(self).expect("trigger events serialize");
        (
            self.type_name(),
            v.get_mut("data").map(Value::take).unwrap_or_default(),
        )
    }
}

impl Trigger {
    pub fn apply(
        prev: Option<Trigger>,
        id: Uuid,
        namespace: &str,
        ev: &TriggerEvent,
        at: DateTime<Utc>,
    ) -> Option<Trigger> {
        let mut t = match (prev, ev) {
            (
                None,
                TriggerEvent::TriggerCreated {
                    name,
                    target,
                    auth,
                    input,
                    rate_limit_per_minute,
                },
            ) => Trigger {
                id,
                namespace: namespace.to_string(),
                name: name.clone(),
                target: target.clone(),
                auth: auth.clone(),
                input: input.clone(),
                rate_limit_per_minute: *rate_limit_per_minute,
                status: "active".into(),
                invocations: 0,
                rejections: 0,
                version: 0,
                created_at: at,
                updated_at: at,
            },
            (None, _) => return None,
            (Some(t), _) => t,
        };
        match ev {
            TriggerEvent::TriggerCreated { .. } => {}
            TriggerEvent::TriggerDeleted {} => t.status = "deleted".into(),
            TriggerEvent::TriggerInvoked { .. } => t.invocations += 1,
            TriggerEvent::TriggerRejected { .. } => t.rejections += 1,
        }
        t.version += 1;
        t.updated_at = at;
        Some(t)
    }
}

/// Render an input template: every string is a minijinja template over `body` and `headers`;
/// a string that is exactly one `{{ expression }}` keeps the expression's JSON type.
pub fn render_input(
    template: &Value,
    body: &Value,
    headers: &BTreeMap<String, String>,
) -> Result<Value, String> {
    let env = minijinja::Environment::new();
    let ctx = minijinja::context! { body => body, headers => headers };
    super::template::render(&env, template, &ctx)
}

/// Check a template's syntax (at trigger creation); nothing is evaluated.
pub fn check_template(template: &Value) -> Result<(), String> {
    super::template::check(&minijinja::Environment::new(), template)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exact_expressions_keep_their_json_type_and_others_render_as_text() {
        let body = json!({"repo": {"name": "capibara"}, "commits": [1, 2, 3], "n": 7});
        let headers: BTreeMap<String, String> =
            [("x-github-event".to_string(), "push".to_string())].into();
        let t = json!({
            "commits": "{{ body.commits }}",
            "count": "{{ body.commits | length }}",
            "n": "{{ body.n }}",
            "title": "push to {{ body.repo.name }} ({{ headers['x-github-event'] }})",
            "fixed": 1
        });
        let out = render_input(&t, &body, &headers).unwrap();
        assert_eq!(
            out,
            json!({"commits": [1, 2, 3], "count": 3, "n": 7, "title": "push to capibara (push)", "fixed": 1})
        );
    }

    #[test]
    fn bad_syntax_is_reported() {
        assert!(check_template(&json!({"x": "{{ body. }}"})).is_err());
        assert!(
            check_template(&json!({"x": "{{ body.a }}", "n": "{{ body.list | length }}"})).is_ok()
        );
    }
}
