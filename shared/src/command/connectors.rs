//! Creating, changing and deleting connectors (`/v1/connectors`), and recording what their
//! fetches did: decisions of [`Connector`] on the connector's stream, through the command loop.
//! A successful fetch's record ([`fetched`]) is not committed here: the worker commits it with
//! the job's success (docs/connectors-design.md).

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::{execute, Aggregate, CommandError};
use crate::{
    domain::{
        connector::{Connector, ConnectorDef, ConnectorEvent, FetchError},
        event::EventMetadata,
        now,
    },
    store::{self, connectors::connector_append, Append, Store, StoreError},
};

impl Aggregate for Connector {
    type Event = ConnectorEvent;

    async fn load(store: &Store, namespace: &str, id: Uuid) -> Result<Option<Self>, StoreError> {
        store::connectors::get(&store.pool, namespace, id).await
    }

    fn append(
        &self,
        id: Uuid,
        events: &[ConnectorEvent],
        metadata: &EventMetadata,
        at: DateTime<Utc>,
    ) -> Result<(Self, Append), StoreError> {
        connector_append(
            Some(self),
            id,
            &self.namespace,
            events,
            metadata.clone(),
            at,
        )
        .ok_or_else(super::does_not_apply::<ConnectorEvent>)
    }
}

/// Why a connector command was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("no connector {0} in this namespace")]
    NotFound(Uuid),
}

/// Create a connector of `metadata.namespace` (the definition is checked by the caller:
/// [`ConnectorDef::validate`]).
pub async fn create(
    store: &Store,
    metadata: &EventMetadata,
    definition: ConnectorDef,
) -> Result<Connector, StoreError> {
    let id = Uuid::now_v7();
    let (connector, append) = connector_append(
        None,
        id,
        &metadata.namespace,
        &[ConnectorEvent::ConnectorCreated { definition }],
        metadata.clone(),
        now(),
    )
    .ok_or_else(super::does_not_apply::<ConnectorEvent>)?;
    store.appender.append(append).await?;
    Ok(connector)
}

fn live(c: &Connector, id: Uuid) -> Result<(), ConnectorError> {
    if c.deleted {
        Err(ConnectorError::NotFound(id))
    } else {
        Ok(())
    }
}

/// Replace connector `id`'s definition (checked by the caller); the cursor and the items it
/// returned stay.
pub async fn update(
    store: &Store,
    metadata: &EventMetadata,
    id: Uuid,
    definition: ConnectorDef,
) -> Result<Connector, CommandError<ConnectorError>> {
    let (c, ()) = execute(store, &metadata.namespace, id, metadata, |c: &Connector| {
        live(c, id)?;
        Ok((c.update(definition.clone()), ()))
    })
    .await?;
    Ok(c)
}

/// Delete connector `id`: fetches of it fail from now on; its history stays in the log.
pub async fn delete(
    store: &Store,
    metadata: &EventMetadata,
    id: Uuid,
) -> Result<Connector, CommandError<ConnectorError>> {
    let (c, ()) = execute(store, &metadata.namespace, id, metadata, |c: &Connector| {
        live(c, id)?;
        Ok((vec![ConnectorEvent::ConnectorDeleted {}], ()))
    })
    .await?;
    Ok(c)
}

/// Record that job `job_id`'s attempt of a fetch of connector `id` failed.
pub async fn failed(
    store: &Store,
    metadata: &EventMetadata,
    id: Uuid,
    job_id: Uuid,
    error: FetchError,
) -> Result<(), CommandError<ConnectorError>> {
    execute(store, &metadata.namespace, id, metadata, |c: &Connector| {
        live(c, id)?;
        Ok((
            vec![ConnectorEvent::FetchFailed {
                job_id,
                error: error.clone(),
            }],
            (),
        ))
    })
    .await?;
    Ok(())
}

/// What a successful fetch of `connector` (as it was read when the fetch started) by job
/// `job_id` records: the append to commit with the job's success. It expects the version the
/// fetch started from, so a fetch that overlapped another cannot move the cursor twice.
pub fn fetched(
    connector: &Connector,
    metadata: &EventMetadata,
    job_id: Uuid,
    items: u64,
    cursor: Value,
    hashes: Vec<String>,
    not_modified: bool,
) -> Result<Append, StoreError> {
    let events = connector.fetched(job_id, items, cursor, hashes, not_modified);
    Ok(connector.append(connector.id, &events, metadata, now())?.1)
}
