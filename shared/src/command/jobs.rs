//! Submitting a job: the one way a new job is created at a client's request (`POST /v1/jobs`,
//! `/v1/orchestrate`, and the entry points that follow: SDKs, the HTTP worker protocol). With an
//! Idempotency-Key the command is recorded in the job's transaction, and a repeat of the same
//! request returns the job the first one created instead of a second job.

use uuid::Uuid;

use crate::{
    domain::{
        event::EventMetadata,
        job::{Job, Submission},
        now,
    },
    store::{
        self,
        append::CommandRecord,
        jobs::{job_append, JobWrite},
        AppendError, Store, StoreError,
    },
};

/// A request's Idempotency-Key, with what identifies the request it came with.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub key: String,
    /// A hash of the request body: the same key with another body is refused.
    pub request_hash: String,
    /// The command the key was used for (`SubmitJob`, `Orchestrate`).
    pub command_type: String,
}

/// Who submits, where.
#[derive(Debug, Clone)]
pub struct Submitter {
    pub namespace: String,
    pub actor: String,
}

/// Why a submission was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The key was used before, with another request.
    #[error("this Idempotency-Key was already used with a different request")]
    KeyReused,
    /// A concurrent request with the same key holds it and its job is not visible yet.
    #[error("idempotency key is in use")]
    KeyInUse,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The job an earlier request with this key created (None: the key is new).
pub async fn replay(
    store: &Store,
    namespace: &str,
    idempotency: &Idempotency,
) -> Result<Option<Job>, SubmitError> {
    let Some(cmd) = store::commands::find_by_key(&store.pool, namespace, &idempotency.key).await?
    else {
        return Ok(None);
    };
    if cmd.request_hash != idempotency.request_hash || cmd.command_type != idempotency.command_type
    {
        return Err(SubmitError::KeyReused);
    }
    let id = cmd
        .stream_id
        .ok_or_else(|| StoreError::Internal("a recorded command without its job".into()))?;
    Ok(store::jobs::get(&store.pool, namespace, id).await?)
}

/// Submit `sub`; returns the job and whether it is an earlier request's (a replay).
pub async fn submit(
    store: &Store,
    by: &Submitter,
    sub: Submission,
    idempotency: Option<&Idempotency>,
) -> Result<(Job, bool), SubmitError> {
    let at = now();
    let id = Uuid::now_v7();
    let metadata = EventMetadata {
        namespace: by.namespace.clone(),
        actor: Some(by.actor.clone()),
        ..Default::default()
    };
    let mut w = JobWrite::new(metadata, at);
    // Commands are recorded when they carry an Idempotency-Key (the event metadata records the
    // actor of every command anyway).
    w.command = idempotency.map(|i| CommandRecord {
        id: Uuid::now_v7(),
        namespace: by.namespace.clone(),
        command_type: i.command_type.clone(),
        idempotency_key: Some(i.key.clone()),
        request_hash: i.request_hash.clone(),
        status_code: 202,
        response: Some(serde_json::json!({"job_id": id})),
        stream_id: Some(id),
        actor: Some(by.actor.clone()),
        received_at: at,
    });
    let (job, append) = job_append(None, id, &sub.into_events(at), w)
        .map_err(|e| StoreError::Internal(e.to_string()))?;
    match store.appender.append(append).await {
        Ok(_) => {
            metrics::counter!("capibara_jobs_submitted_total", "kind" => job.kind.clone())
                .increment(1);
            Ok((job, false))
        }
        // Another request with the same key committed first: its job is the answer.
        Err(AppendError::DuplicateCommand) => match idempotency {
            Some(i) => replay(store, &by.namespace, i)
                .await?
                .map(|job| (job, true))
                .ok_or(SubmitError::KeyInUse),
            None => Err(StoreError::DuplicateCommand.into()),
        },
        Err(e) => Err(StoreError::from(e).into()),
    }
}
