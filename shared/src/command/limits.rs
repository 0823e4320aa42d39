//! Configuring limits (`PUT`/`DELETE /v1/limits/{name}`) and pausing or resuming dispatch
//! (`POST /v1/queues/{name}/pause`, …): decisions on the limit's stream and the namespace's
//! pause stream, through the command loop (docs/flow-control.md).

use uuid::Uuid;

use super::{execute, Aggregate, CommandError};
use crate::{
    domain::{
        event::EventMetadata,
        limit::{self, Limit, LimitDef, LimitEvent, PauseEvent, PauseTarget, Pauses},
    },
    store::{
        self,
        limits::{limit_append, pauses_append},
        Append, Store, StoreError,
    },
};

/// A limit's stream, which may not exist yet: PUT creates it.
#[derive(Debug, Clone)]
pub struct LimitStream {
    namespace: String,
    pub limit: Option<Limit>,
}

impl Aggregate for LimitStream {
    type Event = LimitEvent;

    async fn load(store: &Store, namespace: &str, id: Uuid) -> Result<Option<Self>, StoreError> {
        Ok(Some(LimitStream {
            namespace: namespace.to_string(),
            limit: store::limits::get(&store.pool, namespace, id).await?,
        }))
    }

    fn append(
        &self,
        id: Uuid,
        events: &[LimitEvent],
        metadata: &EventMetadata,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(Self, Append), StoreError> {
        let (limit, append) = limit_append(
            self.limit.as_ref(),
            id,
            &self.namespace,
            events,
            metadata.clone(),
            at,
        )
        .ok_or_else(super::does_not_apply::<LimitEvent>)?;
        Ok((
            LimitStream {
                namespace: self.namespace.clone(),
                limit: Some(limit),
            },
            append,
        ))
    }
}

/// Why a flow-control command was refused.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("no limit `{0}` in this namespace")]
    NotFound(String),
}

/// Configure limit `name`; `true` when it did not exist (or was deleted).
pub async fn put(
    store: &Store,
    metadata: &EventMetadata,
    name: &str,
    definition: LimitDef,
) -> Result<(Limit, bool), CommandError<FlowError>> {
    let id = limit::stream_id(&metadata.namespace, name);
    let (stream, created) = execute(
        store,
        &metadata.namespace,
        id,
        metadata,
        |s: &LimitStream| {
            let created = s.limit.as_ref().is_none_or(|l| l.deleted);
            let events = Limit::put(s.limit.as_ref(), name, definition.clone());
            Ok::<_, FlowError>((events, created))
        },
    )
    .await?;
    Ok((stream.limit.expect("a put limit exists"), created))
}

/// Delete limit `name`.
pub async fn delete(
    store: &Store,
    metadata: &EventMetadata,
    name: &str,
) -> Result<(), CommandError<FlowError>> {
    let id = limit::stream_id(&metadata.namespace, name);
    execute(
        store,
        &metadata.namespace,
        id,
        metadata,
        |s: &LimitStream| match &s.limit {
            Some(l) if !l.deleted => Ok((vec![LimitEvent::LimitDeleted {}], ())),
            _ => Err(FlowError::NotFound(name.to_string())),
        },
    )
    .await?;
    Ok(())
}

/// A namespace's pause stream.
#[derive(Debug, Clone)]
pub struct PauseStream {
    namespace: String,
    pub pauses: Option<Pauses>,
}

impl Aggregate for PauseStream {
    type Event = PauseEvent;

    async fn load(store: &Store, namespace: &str, _id: Uuid) -> Result<Option<Self>, StoreError> {
        Ok(Some(PauseStream {
            namespace: namespace.to_string(),
            pauses: store::limits::pauses(&store.pool, namespace).await?,
        }))
    }

    fn append(
        &self,
        id: Uuid,
        events: &[PauseEvent],
        metadata: &EventMetadata,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(Self, Append), StoreError> {
        let (pauses, append) = pauses_append(
            self.pauses.as_ref(),
            id,
            &self.namespace,
            events,
            metadata.clone(),
            at,
        )
        .ok_or_else(super::does_not_apply::<PauseEvent>)?;
        Ok((
            PauseStream {
                namespace: self.namespace.clone(),
                pauses: Some(pauses),
            },
            append,
        ))
    }
}

/// Pause (`pause = true`) or resume `target`; returns the namespace's pauses after it. Pausing
/// what is paused, or resuming what is not, records nothing.
pub async fn set_paused(
    store: &Store,
    metadata: &EventMetadata,
    target: PauseTarget,
    pause: bool,
) -> Result<Vec<(PauseTarget, chrono::DateTime<chrono::Utc>)>, CommandError<FlowError>> {
    let id = limit::pauses_stream_id(&metadata.namespace);
    let (stream, ()) = execute(
        store,
        &metadata.namespace,
        id,
        metadata,
        |s: &PauseStream| {
            let is = s.pauses.as_ref().is_some_and(|p| p.is_paused(&target));
            let events = match (pause, is) {
                (true, false) => vec![PauseEvent::DispatchPaused {
                    target: target.clone(),
                }],
                (false, true) => vec![PauseEvent::DispatchResumed {
                    target: target.clone(),
                }],
                _ => Vec::new(),
            };
            Ok::<_, FlowError>((events, ()))
        },
    )
    .await?;
    Ok(stream.pauses.map(|p| p.paused).unwrap_or_default())
}
