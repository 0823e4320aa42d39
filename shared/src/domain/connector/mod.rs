//! Connectors (docs/connectors.md): configuration that `connector.fetch` jobs read again and
//! again, the `connector` stream that records every change of it, every fetch, cursor move and
//! failure, and the fold into the `connectors` row. The design: docs/connectors-design.md.
//!
//! - [`types`]: the connector types, each one's typed config (its JSON Schema is derived from
//!   it) and an example, and `connector.fetch`'s input.
//! - [`storage`]: the configs of the types that read files (`files`, `s3`).

pub mod imap;
pub mod storage;
pub mod types;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{
    event::{DomainEvent, StreamType},
    FieldError,
};

/// Longest connector name, in characters.
pub const MAX_NAME: usize = 200;

/// What `POST /v1/connectors` takes and `PUT /v1/connectors/{id}` replaces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectorDef {
    /// A label (1-200 characters).
    pub name: String,
    /// The connector type: one of `GET /v1/connector-types`.
    #[serde(rename = "type")]
    pub connector_type: String,
    /// The type's configuration; its schema is the type's `config_schema`.
    #[schema(value_type = Object)]
    pub config: Value,
    /// Secrets by reference: a place in the config the type accepts a secret at (e.g.
    /// `headers.Authorization`) → the name of a namespace secret (`/v1/secrets`). The value is
    /// read when a fetch runs; it is never stored in the connector or its events.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
}

impl ConnectorDef {
    /// Check the definition against its type; errors name the field (`config.url`).
    pub fn validate(&self) -> Result<(), FieldError> {
        let n = self.name.trim().chars().count();
        if n == 0 || self.name.chars().count() > MAX_NAME {
            return Err(FieldError::new(
                "name",
                format!("must be 1-{MAX_NAME} characters"),
            ));
        }
        let ty = types::find(&self.connector_type).ok_or_else(|| {
            FieldError::new(
                "type",
                format!(
                    "unknown connector type `{}`; available: {} (GET /v1/connector-types)",
                    self.connector_type,
                    types::names().join(", ")
                ),
            )
        })?;
        (ty.validate)(&self.config).map_err(|e| e.under("config"))?;
        for (place, secret) in &self.secrets {
            if !(ty.secret_place)(place) {
                return Err(FieldError::new(
                    format!("secrets.{place}"),
                    format!(
                        "a `{}` connector takes secrets at: {}",
                        ty.name, ty.secret_places
                    ),
                ));
            }
            if !crate::domain::secret_name_ok(secret) {
                return Err(FieldError::new(
                    format!("secrets.{place}"),
                    "must name a secret: 1-128 letters, digits, '_' or '-'",
                ));
            }
        }
        if let Some(place) = (ty.needs_secrets)(&self.config) {
            if !self.secrets.contains_key(place) {
                return Err(FieldError::new(
                    format!("secrets.{place}"),
                    "the config's `auth` reads its credential from this secret place: name a \
                     namespace secret here (PUT /v1/secrets/{name} holds the value)",
                ));
            }
        }
        Ok(())
    }
}

/// Why a fetch failed, as `FetchFailed` records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FetchError {
    #[serde(rename = "type")]
    pub error_type: String,
    pub message: String,
}

/// Events of a connector's stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum ConnectorEvent {
    ConnectorCreated {
        #[serde(flatten)]
        definition: ConnectorDef,
    },
    ConnectorUpdated {
        #[serde(flatten)]
        definition: ConnectorDef,
    },
    ConnectorDeleted {},
    /// A fetch succeeded (recorded with the job's success): what it saw and returned.
    ConnectorFetched {
        job_id: Uuid,
        /// Items the source listed.
        items: u64,
        /// Items returned as new.
        new_items: u64,
        /// The source answered "not modified" (HTTP 304).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        not_modified: bool,
    },
    /// The cursor moved and/or new items were seen (recorded with the job's success).
    CursorAdvanced {
        job_id: Uuid,
        /// The type's cursor after the fetch (e.g. a feed's ETag and Last-Modified).
        cursor: Value,
        /// Content hashes of the items returned: never returned again.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        hashes: Vec<String>,
    },
    /// An attempt of a fetch failed.
    FetchFailed {
        job_id: Uuid,
        error: FetchError,
    },
}

impl DomainEvent for ConnectorEvent {
    const STREAM: StreamType = StreamType::Connector;

    fn type_name(&self) -> &'static str {
        match self {
            ConnectorEvent::ConnectorCreated { .. } => "ConnectorCreated",
            ConnectorEvent::ConnectorUpdated { .. } => "ConnectorUpdated",
            ConnectorEvent::ConnectorDeleted {} => "ConnectorDeleted",
            ConnectorEvent::ConnectorFetched { .. } => "ConnectorFetched",
            ConnectorEvent::CursorAdvanced { .. } => "CursorAdvanced",
            ConnectorEvent::FetchFailed { .. } => "FetchFailed",
        }
    }
}

/// A connector (the `connectors` row, and what the API shows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Connector {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type")]
    pub connector_type: String,
    #[schema(value_type = Object)]
    pub config: Value,
    pub secrets: BTreeMap<String, String>,
    /// Where the next fetch goes on from (`null` before the first successful fetch).
    #[schema(value_type = Option<Object>)]
    pub cursor: Option<Value>,
    /// Successful fetches.
    pub fetches: i64,
    /// Items returned as new, over all fetches.
    pub items_total: i64,
    pub last_fetch_at: Option<DateTime<Utc>>,
    pub last_job_id: Option<Uuid>,
    /// The last failed attempt's error (cleared by a successful fetch).
    pub last_error: Option<FetchError>,
    pub deleted: bool,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Connector {
    /// The definition it holds.
    pub fn definition(&self) -> ConnectorDef {
        ConnectorDef {
            name: self.name.clone(),
            connector_type: self.connector_type.clone(),
            config: self.config.clone(),
            secrets: self.secrets.clone(),
        }
    }

    /// The events of replacing the definition with `def` (none if it is the same).
    pub fn update(&self, def: ConnectorDef) -> Vec<ConnectorEvent> {
        if self.definition() == def {
            Vec::new()
        } else {
            vec![ConnectorEvent::ConnectorUpdated { definition: def }]
        }
    }

    /// The events recording a successful fetch by job `job_id`: the fetch, and the cursor move
    /// when the cursor changed or new items were seen.
    pub fn fetched(
        &self,
        job_id: Uuid,
        items: u64,
        cursor: Value,
        hashes: Vec<String>,
        not_modified: bool,
    ) -> Vec<ConnectorEvent> {
        let mut events = vec![ConnectorEvent::ConnectorFetched {
            job_id,
            items,
            new_items: hashes.len() as u64,
            not_modified,
        }];
        if self.cursor.as_ref() != Some(&cursor) || !hashes.is_empty() {
            events.push(ConnectorEvent::CursorAdvanced {
                job_id,
                cursor,
                hashes,
            });
        }
        events
    }

    /// The state after `ev` (`None`: the event does not apply).
    pub fn apply(
        prev: Option<Connector>,
        id: Uuid,
        namespace: &str,
        ev: &ConnectorEvent,
        at: DateTime<Utc>,
    ) -> Option<Connector> {
        let mut c = match (prev, ev) {
            (None, ConnectorEvent::ConnectorCreated { definition }) => Connector {
                id,
                namespace: namespace.to_string(),
                name: definition.name.clone(),
                connector_type: definition.connector_type.clone(),
                config: definition.config.clone(),
                secrets: definition.secrets.clone(),
                cursor: None,
                fetches: 0,
                items_total: 0,
                last_fetch_at: None,
                last_job_id: None,
                last_error: None,
                deleted: false,
                version: 1,
                created_at: at,
                updated_at: at,
            },
            (None, _) | (Some(_), ConnectorEvent::ConnectorCreated { .. }) => return None,
            (Some(c), _) if c.deleted => return None,
            (Some(mut c), ev) => {
                match ev {
                    ConnectorEvent::ConnectorCreated { .. } => return None,
                    ConnectorEvent::ConnectorUpdated { definition } => {
                        c.name = definition.name.clone();
                        c.connector_type = definition.connector_type.clone();
                        c.config = definition.config.clone();
                        c.secrets = definition.secrets.clone();
                    }
                    ConnectorEvent::ConnectorDeleted {} => c.deleted = true,
                    ConnectorEvent::ConnectorFetched {
                        job_id, new_items, ..
                    } => {
                        c.fetches += 1;
                        c.items_total += *new_items as i64;
                        c.last_fetch_at = Some(at);
                        c.last_job_id = Some(*job_id);
                        c.last_error = None;
                    }
                    ConnectorEvent::CursorAdvanced { cursor, .. } => {
                        c.cursor = Some(cursor.clone())
                    }
                    ConnectorEvent::FetchFailed { job_id, error } => {
                        c.last_job_id = Some(*job_id);
                        c.last_error = Some(error.clone());
                    }
                }
                c.version += 1;
                c
            }
        };
        c.updated_at = at;
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn def() -> ConnectorDef {
        ConnectorDef {
            name: "news".into(),
            connector_type: "rss".into(),
            config: json!({"url": "https://example.com/feed.xml"}),
            secrets: BTreeMap::new(),
        }
    }

    #[test]
    fn events_store_as_type_and_data_and_fold_into_the_row() {
        let id = Uuid::now_v7();
        let at = crate::domain::now();
        let created = ConnectorEvent::ConnectorCreated { definition: def() };
        let (t, data) = created.to_parts();
        assert_eq!(t, "ConnectorCreated");
        assert_eq!(data["type"], "rss");
        assert_eq!(ConnectorEvent::from_parts(t, data).unwrap(), created);

        let c = Connector::apply(None, id, "default", &created, at).unwrap();
        assert_eq!((c.version, c.cursor.clone(), c.fetches), (1, None, 0));
        let job = Uuid::now_v7();
        let events = c.fetched(job, 10, json!({"etag": "\"a\""}), vec!["h1".into()], false);
        assert_eq!(events.len(), 2, "a new cursor is recorded");
        let c = events
            .iter()
            .try_fold(c, |c, e| Connector::apply(Some(c), id, "default", e, at))
            .unwrap();
        assert_eq!((c.version, c.fetches, c.items_total), (3, 1, 1));
        assert_eq!(c.cursor, Some(json!({"etag": "\"a\""})));
        // The same cursor and nothing new: only the fetch is recorded.
        let again = c.fetched(job, 10, json!({"etag": "\"a\""}), vec![], true);
        assert_eq!(again.len(), 1);
        let deleted = Connector::apply(
            Some(c),
            id,
            "default",
            &ConnectorEvent::ConnectorDeleted {},
            at,
        )
        .unwrap();
        assert!(deleted.deleted);
        assert!(
            Connector::apply(Some(deleted), id, "default", &again[0], at).is_none(),
            "nothing applies to a deleted connector"
        );
    }

    #[test]
    fn definitions_are_checked_against_their_type() {
        assert!(def().validate().is_ok());
        let mut d = def();
        d.connector_type = "gopher".into();
        assert_eq!(d.validate().unwrap_err().field, "type");
        let mut d = def();
        d.config = json!({"url": "ftp://x"});
        assert_eq!(d.validate().unwrap_err().field, "config.url");
        let mut d = def();
        d.config = json!({});
        assert_eq!(d.validate().unwrap_err().field, "config.url");
        let mut d = def();
        d.secrets.insert("url".into(), "TOKEN".into());
        assert_eq!(d.validate().unwrap_err().field, "secrets.url");
        let mut d = def();
        d.secrets
            .insert("headers.Authorization".into(), "FEED_TOKEN".into());
        assert!(d.validate().is_ok());
        let mut d = def();
        d.name = " ".into();
        assert_eq!(d.validate().unwrap_err().field, "name");
    }
}
