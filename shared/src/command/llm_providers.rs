//! Configuring and deleting LLM providers (`PUT`/`DELETE /v1/llm/providers/{name}`): decisions
//! of [`LlmProvider`] on the provider's stream, through the command loop. The stream is
//! addressed by name ([`llm::stream_id`]).

use uuid::Uuid;

use super::{execute, Aggregate, CommandError};
use crate::{
    domain::{
        event::EventMetadata,
        llm::{self, LlmProvider, ProviderDef, ProviderEvent},
    },
    store::{self, llm_providers::provider_append, Append, Store, StoreError},
};

/// A provider's stream, which may not exist yet: PUT creates it.
#[derive(Debug, Clone)]
pub struct ProviderStream {
    namespace: String,
    pub provider: Option<LlmProvider>,
}

impl Aggregate for ProviderStream {
    type Event = ProviderEvent;

    async fn load(store: &Store, namespace: &str, id: Uuid) -> Result<Option<Self>, StoreError> {
        Ok(Some(ProviderStream {
            namespace: namespace.to_string(),
            provider: store::llm_providers::get(&store.pool, namespace, id).await?,
        }))
    }

    fn append(
        &self,
        id: Uuid,
        events: &[ProviderEvent],
        metadata: &EventMetadata,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(Self, Append), StoreError> {
        let (provider, append) = provider_append(
            self.provider.as_ref(),
            id,
            &self.namespace,
            events,
            metadata.clone(),
            at,
        )
        .ok_or_else(super::does_not_apply::<ProviderEvent>)?;
        Ok((
            ProviderStream {
                namespace: self.namespace.clone(),
                provider: Some(provider),
            },
            append,
        ))
    }
}

/// Why a provider command was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("no LLM provider `{0}` in this namespace")]
    NotFound(String),
}

/// Configure provider `name` of `metadata.namespace` (checked by the caller); `true` when it
/// did not exist (or was deleted).
pub async fn put(
    store: &Store,
    metadata: &EventMetadata,
    name: &str,
    definition: ProviderDef,
) -> Result<(LlmProvider, bool), CommandError<ProviderError>> {
    let id = llm::stream_id(&metadata.namespace, name);
    let (stream, created) = execute(
        store,
        &metadata.namespace,
        id,
        metadata,
        |s: &ProviderStream| {
            let created = s.provider.as_ref().is_none_or(|p| p.deleted);
            let events = LlmProvider::put(s.provider.as_ref(), name, definition.clone());
            Ok::<_, ProviderError>((events, created))
        },
    )
    .await?;
    Ok((stream.provider.expect("a put provider exists"), created))
}

/// Delete provider `name`.
pub async fn delete(
    store: &Store,
    metadata: &EventMetadata,
    name: &str,
) -> Result<(), CommandError<ProviderError>> {
    let id = llm::stream_id(&metadata.namespace, name);
    execute(
        store,
        &metadata.namespace,
        id,
        metadata,
        |s: &ProviderStream| match &s.provider {
            Some(p) if !p.deleted => Ok((vec![ProviderEvent::LlmProviderDeleted {}], ())),
            _ => Err(ProviderError::NotFound(name.to_string())),
        },
    )
    .await?;
    Ok(())
}
