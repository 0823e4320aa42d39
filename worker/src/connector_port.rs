//! The Postgres side of `connector.fetch` (tables `connectors`, `connector_items`, `secrets`).

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use capibara_shared::{
    command,
    domain::{
        connector::{Connector, FetchError},
        event::EventMetadata,
    },
    store::{self, Append, Store},
};
use serde_json::Value;
use uuid::Uuid;

use crate::executors::connector::ConnectorStore;

pub struct PgConnectorStore {
    pub store: Store,
    /// Who records: `worker:<name>`.
    pub actor: String,
}

impl PgConnectorStore {
    fn metadata(&self, c: &Connector, job_id: Uuid) -> EventMetadata {
        EventMetadata {
            namespace: c.namespace.clone(),
            actor: Some(self.actor.clone()),
            causation_id: Some(job_id),
            ..Default::default()
        }
    }
}

#[async_trait]
impl ConnectorStore for PgConnectorStore {
    async fn load(&self, namespace: &str, id: Uuid) -> Result<Option<Connector>, String> {
        store::connectors::get(&self.store.pool, namespace, id)
            .await
            .map_err(|e| e.to_string())
    }

    async fn secrets(
        &self,
        namespace: &str,
        names: &[String],
    ) -> Result<HashMap<String, String>, String> {
        store::secrets::values(&self.store.pool, namespace, names)
            .await
            .map_err(|e| e.to_string())
    }

    async fn seen(&self, id: Uuid, hashes: &[String]) -> Result<HashSet<String>, String> {
        store::connectors::seen(&self.store.pool, id, hashes)
            .await
            .map_err(|e| e.to_string())
    }

    async fn failed(&self, c: &Connector, job_id: Uuid, error: FetchError) {
        let meta = self.metadata(c, job_id);
        if let Err(e) = command::connectors::failed(&self.store, &meta, c.id, job_id, error).await {
            tracing::warn!(connector_id = %c.id, %job_id, error = %e, "recording a failed fetch failed");
        }
    }

    fn fetched(
        &self,
        c: &Connector,
        job_id: Uuid,
        items: u64,
        cursor: Value,
        hashes: Vec<String>,
        not_modified: bool,
    ) -> Result<Append, String> {
        command::connectors::fetched(
            c,
            &self.metadata(c, job_id),
            job_id,
            items,
            cursor,
            hashes,
            not_modified,
        )
        .map_err(|e| e.to_string())
    }
}
