//! Submitting a job: the one way a new job is created at a client's request (`POST /v1/jobs`,
//! `/v1/orchestrate`, and the entry points that follow: SDKs, the HTTP worker protocol). With an
//! Idempotency-Key the command is recorded in the job's transaction, and a repeat of the same
//! request returns the job the first one created instead of a second job. With `dedup` any
//! submission with the same key within the window returns the first one's job, and the merge is
//! recorded on it. With `debounce` a submission merges into the job still waiting out its delay
//! under the same key (new input, later `run_at`) instead of making another.

use uuid::Uuid;

use crate::{
    domain::{
        event::EventMetadata,
        job::{Job, JobEvent, Submission},
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
    /// The job pending under the `debounce` key is of another kind: a merge would run this
    /// input with that kind.
    #[error("the job pending under this debounce key is of kind {pending}")]
    DebounceKind { pending: String },
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

/// A submission's `dedup`: the job submitted with `key` within `window_s` seconds is returned,
/// whatever the body and the job's status.
#[derive(Debug, Clone)]
pub struct Dedup {
    pub key: String,
    pub window_s: u32,
}

impl Dedup {
    /// Dedup keys live beside Idempotency-Keys in the command log, as their own command type
    /// (a header that happens to spell the same key is a different command: refused, not
    /// merged), with one hash for every body.
    fn idempotency(&self) -> Idempotency {
        Idempotency {
            key: format!("dedup:{}", self.key),
            request_hash: "dedup".into(),
            command_type: "SubmitJobDeduplicated".into(),
        }
    }
}

/// Submit `sub` unless a job was submitted with the same `dedup` key within its window: then
/// that job, with `JobDeduplicated` appended to it. Returns the job and whether it was merged.
pub async fn submit_deduplicated(
    store: &Store,
    by: &Submitter,
    sub: Submission,
    dedup: &Dedup,
) -> Result<(Job, bool), SubmitError> {
    let idempotency = dedup.idempotency();
    store::commands::expire_key(
        &store.pool,
        &by.namespace,
        &idempotency.key,
        dedup.window_s as i64,
    )
    .await?;
    let (job, merged) = match replay(store, &by.namespace, &idempotency).await? {
        Some(job) => (job, true),
        None => submit(store, by, sub, Some(&idempotency)).await?,
    };
    if !merged {
        return Ok((job, false));
    }
    Ok((record_merge(store, by, job, &dedup.key).await?, true))
}

/// Append `JobDeduplicated` to `job` (the command loop re-reads it when its version moved).
async fn record_merge(
    store: &Store,
    by: &Submitter,
    job: Job,
    key: &str,
) -> Result<Job, SubmitError> {
    let metadata = EventMetadata {
        namespace: by.namespace.clone(),
        actor: Some(by.actor.clone()),
        ..Default::default()
    };
    let merged = JobEvent::JobDeduplicated {
        key: key.to_string(),
    };
    let (job, ()) = super::execute_from::<Job, _, std::convert::Infallible, _>(
        store,
        &by.namespace,
        job.id,
        Some(job),
        &metadata,
        |_| Ok((vec![merged.clone()], ())),
    )
    .await
    .map_err(|e| match e {
        super::CommandError::Store(e) => e,
        other => StoreError::Internal(other.to_string()),
    })?;
    Ok(job)
}

/// A submission's `debounce`: at most one job per key waits, due `delay_s` after the latest
/// submission, with the latest submission's input.
#[derive(Debug, Clone)]
pub struct Debounce {
    pub key: String,
    pub delay_s: u32,
}

/// How often a debounced submission goes round between "merge into the pending job" and
/// "create one" while other submissions with the key keep moving the pending job in and out of
/// its wait; every lap means another writer made progress.
const DEBOUNCE_LAPS: usize = 16;

/// Submit `sub` (its `run_at` ignored) due `delay_s` from now, unless a job with the same
/// `debounce` key still waits out its delay: then that job takes `sub`'s input and the new due
/// time (`JobDebounced`). Returns the job and whether it was merged.
///
/// Race-free through the projection's unique index on `(namespace, debounce_key)` over waiting
/// jobs: of two submissions that both found no job, one insert fails with a conflict and goes
/// round to merge into the other's job; a merge that finds the job gone from its wait (due,
/// canceled) goes round to create one.
pub async fn submit_debounced(
    store: &Store,
    by: &Submitter,
    mut sub: Submission,
    debounce: &Debounce,
) -> Result<(Job, bool), SubmitError> {
    let metadata = EventMetadata {
        namespace: by.namespace.clone(),
        actor: Some(by.actor.clone()),
        ..Default::default()
    };
    sub.debounce_key = Some(debounce.key.clone());
    for _ in 0..DEBOUNCE_LAPS {
        let run_at = crate::domain::truncate_micros(
            now() + chrono::Duration::seconds(debounce.delay_s as i64),
        );
        if let Some(pending) =
            store::jobs::pending_debounce(&store.pool, &by.namespace, &debounce.key).await?
        {
            if pending.kind != sub.kind {
                return Err(SubmitError::DebounceKind {
                    pending: pending.kind,
                });
            }
            let merged = super::execute_from::<Job, _, std::convert::Infallible, _>(
                store,
                &by.namespace,
                pending.id,
                Some(pending),
                &metadata,
                |job| {
                    let merge = job.debounce(&debounce.key, &sub.input, run_at);
                    let done = merge.is_some();
                    Ok((merge.into_iter().collect(), done))
                },
            )
            .await;
            match merged {
                Ok((job, true)) => return Ok((job, true)),
                // It left its wait (or was deleted) meanwhile: the key makes a new job.
                Ok((_, false)) | Err(super::CommandError::NotFound) => {}
                Err(super::CommandError::Store(e)) => return Err(e.into()),
                Err(other) => return Err(StoreError::Internal(other.to_string()).into()),
            }
        }
        sub.run_at = Some(run_at);
        match submit(store, by, sub.clone(), None).await {
            Ok(created) => return Ok(created),
            // Another submission's job took the key first: merge into it.
            Err(SubmitError::Store(StoreError::Conflict)) => {}
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Conflict.into())
}
