//! Inbound webhook triggers: who may call `POST /hooks/{id}`, how the call becomes a job's input,
//! and the `trigger` stream that records every call.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::event::{DomainEvent, StreamType};

/// How callers of a hook authenticate, as `POST /v1/triggers` takes it. A credential left out is
/// generated; either way it is shown once, in the creation response, and never again: the log
/// and the projection keep only [`TriggerAuth::redacted`], the hook reads a
/// [`TriggerCredential`] stored apart (docs/security.md, "Trigger credentials").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TriggerAuth {
    /// `Authorization: Bearer <token>` (omitted: a random token is generated).
    Bearer {
        #[serde(default)]
        token: Option<String>,
    },
    /// Standard Webhooks headers signed with `secret` (`whsec_…`; omitted: generated); replays
    /// (same `webhook-id`) are refused, and timestamps more than 5 minutes away.
    StandardWebhooks {
        #[serde(default)]
        secret: Option<String>,
    },
    /// GitHub style: `header` (default `X-Hub-Signature-256`) = `sha256=<hex HMAC-SHA256 of the
    /// body>` (`secret` omitted: generated).
    HmacSha256 {
        #[serde(default)]
        secret: Option<String>,
        #[serde(default)]
        header: Option<String>,
    },
}

/// What a redacted credential reads as.
const HIDDEN: &str = "***";

impl TriggerAuth {
    /// The same, with secrets replaced: what events, the projection and responses show.
    pub fn redacted(&self) -> TriggerAuth {
        let hidden = Some(HIDDEN.to_string());
        match self {
            TriggerAuth::Bearer { .. } => TriggerAuth::Bearer { token: hidden },
            TriggerAuth::StandardWebhooks { .. } => {
                TriggerAuth::StandardWebhooks { secret: hidden }
            }
            TriggerAuth::HmacSha256 { header, .. } => TriggerAuth::HmacSha256 {
                secret: hidden,
                header: header.clone(),
            },
        }
    }

    /// The same with a generated credential where none was given.
    pub fn with_generated_credential(self) -> TriggerAuth {
        let random_hex = || hex::encode(rand::random::<[u8; 32]>());
        match self {
            TriggerAuth::Bearer { token } => TriggerAuth::Bearer {
                token: Some(token.unwrap_or_else(|| format!("tok_{}", random_hex()))),
            },
            TriggerAuth::StandardWebhooks { secret } => TriggerAuth::StandardWebhooks {
                secret: Some(secret.unwrap_or_else(|| super::webhook::WebhookSecret::generate().1)),
            },
            TriggerAuth::HmacSha256 { secret, header } => TriggerAuth::HmacSha256 {
                secret: Some(secret.unwrap_or_else(random_hex)),
                header,
            },
        }
    }

    /// The token or secret (after [`TriggerAuth::with_generated_credential`]).
    pub fn credential_text(&self) -> &str {
        match self {
            TriggerAuth::Bearer { token: s }
            | TriggerAuth::StandardWebhooks { secret: s }
            | TriggerAuth::HmacSha256 { secret: s, .. } => s.as_deref().unwrap_or_default(),
        }
    }

    /// What the hook keeps to check calls: a bearer token only as its SHA-256, signing secrets
    /// as they are (verifying a signature needs the key).
    pub fn credential(&self) -> TriggerCredential {
        let text = self.credential_text().to_string();
        match self {
            TriggerAuth::Bearer { .. } => TriggerCredential::Bearer {
                token_sha256: sha256_hex(&text),
            },
            TriggerAuth::StandardWebhooks { .. } => {
                TriggerCredential::StandardWebhooks { secret: text }
            }
            TriggerAuth::HmacSha256 { header, .. } => TriggerCredential::HmacSha256 {
                secret: text,
                header: header.clone(),
            },
        }
    }
}

/// A trigger's credential as stored (table `trigger_credentials`, never in the event log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TriggerCredential {
    Bearer {
        token_sha256: String,
    },
    StandardWebhooks {
        secret: String,
    },
    HmacSha256 {
        secret: String,
        #[serde(default)]
        header: Option<String>,
    },
}

/// Lower-case hex SHA-256 of `s`.
pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// An `auth` value from a `TriggerCreated` event with any credential replaced (events written
/// before credentials left the log carried them).
fn redact_auth_value(auth: &Value) -> Value {
    serde_json::from_value::<TriggerAuth>(auth.clone())
        .ok()
        .and_then(|a| serde_json::to_value(a.redacted()).ok())
        .unwrap_or_else(
            || serde_json::json!({"type": auth.get("type").cloned().unwrap_or_default()}),
        )
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
    /// A refused call and why (status 401, 409, 422, 429). Recorded at most once a minute per
    /// trigger and status: `suppressed` counts the refusals with that status not recorded since
    /// (a flood of bad calls must not flood the log).
    TriggerRejected {
        status: u16,
        reason: String,
        #[serde(default, skip_serializing_if = "is_zero")]
        suppressed: u64,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl DomainEvent for TriggerEvent {
    const STREAM: StreamType = StreamType::Trigger;

    fn type_name(&self) -> &'static str {
        match self {
            TriggerEvent::TriggerCreated { .. } => "TriggerCreated",
            TriggerEvent::TriggerDeleted {} => "TriggerDeleted",
            TriggerEvent::TriggerInvoked { .. } => "TriggerInvoked",
            TriggerEvent::TriggerRejected { .. } => "TriggerRejected",
        }
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
                auth: redact_auth_value(auth),
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
            TriggerEvent::TriggerRejected { suppressed, .. } => {
                t.rejections += 1 + *suppressed as i64
            }
        }
        t.version += 1;
        t.updated_at = at;
        Some(t)
    }
}

/// Render an input template: every string is a minijinja template over `body` and `headers`;
/// a string that is exactly one `{{ expression }}` keeps the expression's JSON type. The
/// render has the process's template budget ([`super::template::Budget`]).
pub fn render_input(
    template: &Value,
    body: &Value,
    headers: &BTreeMap<String, String>,
) -> Result<Value, String> {
    let ctx = minijinja::context! { body => body, headers => headers };
    super::template::render(&super::template::Templates::lenient(), template, &ctx)
}

/// Check a template's syntax (at trigger creation); nothing is evaluated.
pub fn check_template(template: &Value) -> Result<(), String> {
    super::template::check(&super::template::Templates::lenient(), template)
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
    fn created_events_keep_no_credential_even_from_old_events() {
        let old = TriggerEvent::TriggerCreated {
            name: "t".into(),
            target: json!({}),
            auth: json!({"type": "hmac_sha256", "secret": "raw-secret-0123456789", "header": "x-sig"}),
            input: None,
            rate_limit_per_minute: 1,
        };
        let t = Trigger::apply(None, Uuid::now_v7(), "ns", &old, Utc::now()).unwrap();
        assert_eq!(
            t.auth,
            json!({"type": "hmac_sha256", "secret": "***", "header": "x-sig"})
        );
        let auth = TriggerAuth::Bearer {
            token: Some("tok".into()),
        };
        assert_eq!(
            auth.credential(),
            TriggerCredential::Bearer {
                token_sha256: sha256_hex("tok")
            }
        );
        let generated = TriggerAuth::StandardWebhooks { secret: None }.with_generated_credential();
        assert!(generated.credential_text().starts_with("whsec_"));
    }

    #[test]
    fn bad_syntax_is_reported() {
        assert!(check_template(&json!({"x": "{{ body. }}"})).is_err());
        assert!(
            check_template(&json!({"x": "{{ body.a }}", "n": "{{ body.list | length }}"})).is_ok()
        );
    }
}
