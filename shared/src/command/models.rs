//! The model registry's commands: registering a trained version (committed by the worker with
//! the training job's success, [`registered`]) and deleting versions (`DELETE /v1/models/{ref}`).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{execute, Aggregate, CommandError};
use crate::{
    domain::{
        event::EventMetadata,
        model::{self, ModelEvent, ModelName, ModelRef, Registration},
        now,
    },
    store::{self, models::model_append, Append, Store, StoreError},
};

impl Aggregate for ModelName {
    type Event = ModelEvent;

    async fn load(store: &Store, namespace: &str, id: Uuid) -> Result<Option<Self>, StoreError> {
        store::models::get(&store.pool, namespace, id).await
    }

    fn append(
        &self,
        id: Uuid,
        events: &[ModelEvent],
        metadata: &EventMetadata,
        at: DateTime<Utc>,
    ) -> Result<(Self, Append), StoreError> {
        model_append(
            Some(self),
            id,
            &self.namespace,
            events,
            metadata.clone(),
            at,
        )
        .ok_or_else(super::does_not_apply::<ModelEvent>)
    }
}

/// Why a model command was refused.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("no model `{0}` in this namespace")]
    NotFound(String),
}

/// The append registering `registration` as the next version of its name, whose row was read
/// as `current`: committed with the training job's success, it expects that row's version, so
/// two registrations of one name never take the same number (the later one is retried).
/// Returns the version's number too.
pub fn registered(
    current: Option<&ModelName>,
    metadata: &EventMetadata,
    registration: Registration,
) -> Result<(u32, Append), StoreError> {
    let version = current.map_or(1, |m| m.next_version);
    let id = model::stream_id(&metadata.namespace, &registration.name);
    let (_, append) = model_append(
        current,
        id,
        &metadata.namespace,
        &[ModelEvent::ModelRegistered {
            version,
            registration: Box::new(registration),
        }],
        metadata.clone(),
        now(),
    )
    .ok_or_else(super::does_not_apply::<ModelEvent>)?;
    Ok((version, append))
}

/// Delete what `reference` names: one version (`name@3`, an id), or every version of a name.
pub async fn delete(
    store: &Store,
    metadata: &EventMetadata,
    reference: &ModelRef,
) -> Result<ModelName, CommandError<ModelError>> {
    let not_found = || CommandError::Rejected(ModelError::NotFound(reference.to_string()));
    let (row, _) = store::models::resolve(&store.pool, &metadata.namespace, reference)
        .await?
        .ok_or_else(not_found)?;
    let (m, ()) = execute(
        store,
        &metadata.namespace,
        row.id,
        metadata,
        |m: &ModelName| {
            let version = match reference {
                ModelRef::Latest(_) => None,
                r => Some(
                    m.find(r)
                        .ok_or_else(|| ModelError::NotFound(r.to_string()))?
                        .version,
                ),
            };
            Ok((vec![ModelEvent::ModelDeleted { version }], ()))
        },
    )
    .await?;
    Ok(m)
}
