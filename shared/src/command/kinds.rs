//! Registering, changing and deleting user kinds (`PUT`/`DELETE /v1/kinds/{name}`, a worker that
//! declares its kinds): decisions of [`UserKind`] on the kind's stream, through the command loop.
//! The stream is addressed by name ([`user::stream_id`]), so two first PUTs of one name race on
//! one stream: the loser re-reads and applies its definition as an update.

use uuid::Uuid;

use super::{execute, Aggregate, CommandError};
use crate::{
    domain::{
        event::EventMetadata,
        kinds::user::{self, KindDef, KindEvent, UserKind},
    },
    store::{self, user_kinds::kind_append, Append, Store, StoreError},
};

/// A kind's stream, which may not exist yet: PUT creates it.
#[derive(Debug, Clone)]
pub struct KindStream {
    namespace: String,
    pub kind: Option<UserKind>,
}

impl Aggregate for KindStream {
    type Event = KindEvent;

    async fn load(store: &Store, namespace: &str, id: Uuid) -> Result<Option<Self>, StoreError> {
        Ok(Some(KindStream {
            namespace: namespace.to_string(),
            kind: store::user_kinds::get(&store.pool, namespace, id).await?,
        }))
    }

    fn append(
        &self,
        id: Uuid,
        events: &[KindEvent],
        metadata: &EventMetadata,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(Self, Append), StoreError> {
        let (kind, append) = kind_append(
            self.kind.as_ref(),
            id,
            &self.namespace,
            events,
            metadata.clone(),
            at,
        )
        .ok_or_else(super::does_not_apply::<KindEvent>)?;
        Ok((
            KindStream {
                namespace: self.namespace.clone(),
                kind: Some(kind),
            },
            append,
        ))
    }
}

/// What a PUT did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Created,
    Updated,
    Unchanged,
}

/// Why a kind command was refused.
#[derive(Debug, thiserror::Error)]
pub enum KindError {
    #[error("no kind `{0}` in this namespace")]
    NotFound(String),
}

/// Register kind `name` of `metadata.namespace` with `definition`, or replace its definition.
/// The name and definition are checked by the caller ([`user::validate_name`],
/// [`KindDef::validate`]).
pub async fn put(
    store: &Store,
    metadata: &EventMetadata,
    name: &str,
    definition: KindDef,
) -> Result<(UserKind, Put), CommandError<KindError>> {
    let id = user::stream_id(&metadata.namespace, name);
    let (stream, put) = execute(
        store,
        &metadata.namespace,
        id,
        metadata,
        |s: &KindStream| {
            let live = s.kind.as_ref().filter(|k| !k.deleted);
            let events = UserKind::put(s.kind.as_ref(), name, definition.clone());
            let put = match (live, events.is_empty()) {
                (_, true) => Put::Unchanged,
                (Some(_), false) => Put::Updated,
                (None, false) => Put::Created,
            };
            Ok::<_, KindError>((events, put))
        },
    )
    .await?;
    Ok((stream.kind.expect("a put kind exists"), put))
}

/// The kinds a worker declares, as it starts: each one `declared` with a definition is
/// registered or updated with it; one declared by name only is taken as it is, or registered
/// with the defaults if the namespace has no such kind. Names and definitions are checked by
/// the caller. Returns the kinds in the order declared.
pub async fn declare(
    store: &Store,
    metadata: &EventMetadata,
    declared: &[(String, Option<KindDef>)],
) -> Result<Vec<UserKind>, CommandError<KindError>> {
    let names: Vec<&str> = declared.iter().map(|(n, _)| n.as_str()).collect();
    let existing = store::user_kinds::find(&store.pool, &metadata.namespace, &names).await?;
    let mut kinds = Vec::with_capacity(declared.len());
    for (name, definition) in declared {
        let current = existing.iter().find(|k| &k.name == name);
        kinds.push(match (definition, current) {
            (None, Some(k)) => k.clone(),
            (definition, _) => {
                put(
                    store,
                    metadata,
                    name,
                    definition.clone().unwrap_or_default(),
                )
                .await?
                .0
            }
        });
    }
    Ok(kinds)
}

/// Delete kind `name`: new submissions of it are refused; jobs already submitted still run.
pub async fn delete(
    store: &Store,
    metadata: &EventMetadata,
    name: &str,
) -> Result<UserKind, CommandError<KindError>> {
    let id = user::stream_id(&metadata.namespace, name);
    let (stream, ()) = execute(
        store,
        &metadata.namespace,
        id,
        metadata,
        |s: &KindStream| match &s.kind {
            Some(k) if !k.deleted => Ok((vec![KindEvent::KindDeleted {}], ())),
            _ => Err(KindError::NotFound(name.to_string())),
        },
    )
    .await?;
    Ok(stream.kind.expect("a deleted kind exists"))
}
