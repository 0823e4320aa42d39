//! Accepting a call of an inbound hook (`POST /hooks/{id}`): `TriggerInvoked` on the trigger's
//! stream, the receipt of its Standard Webhooks `webhook-id`, and the job or run it starts, in
//! one transaction. A conflict (the trigger changed, or the same message was accepted
//! meanwhile by another replica: the receipt is unique) re-reads the trigger; a message that is
//! now received is a replay, not a second start.

use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;
use uuid::Uuid;

use super::{execute_async, CommandError, Writes};
use crate::{
    domain::{
        event::EventMetadata,
        job::Submission,
        now,
        trigger::{Trigger, TriggerEvent},
        FieldError,
    },
    store::{
        self,
        runs::{StartError, StartRun},
        triggers::trigger_append,
        Append, Effect, Store, StoreError,
    },
};

/// What a call starts, with its input already rendered and checked.
#[derive(Debug, Clone)]
pub enum Start {
    Job(Box<Submission>),
    Run { workflow_id: Uuid, input: Value },
}

/// One accepted call.
#[derive(Debug, Clone)]
pub struct Call {
    /// The Standard Webhooks `webhook-id`, when the trigger verifies that scheme.
    pub message_id: Option<String>,
    pub body_bytes: usize,
    pub start: Start,
}

/// What the call started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    Job(Uuid),
    Run(Uuid),
}

/// Why a call was not accepted (besides the store).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The message was accepted before (by this replica or another one).
    #[error("message {0} was already received")]
    Replay(String),
    /// The rendered input does not fit the workflow's input schema.
    #[error("{}: {}", .0.field, .0.message)]
    Input(FieldError),
    #[error("the trigger's workflow no longer exists")]
    WorkflowGone,
}

/// Accept `call` of trigger `t` (whose credentials the caller has verified). The caller checks
/// for a replay before rendering the input; this checks again after each lost race.
pub async fn accept(
    store: &Store,
    t: &Trigger,
    call: Call,
) -> Result<Accepted, CommandError<Refused>> {
    let started = match call.start {
        Start::Job(_) => Accepted::Job(Uuid::now_v7()),
        Start::Run { .. } => Accepted::Run(Uuid::now_v7()),
    };
    let retrying = AtomicBool::new(false);
    let (call, retrying) = (&call, &retrying);
    execute_async(store, &t.namespace, t.id, |current: Trigger| async move {
        if let Some(m) = &call.message_id {
            if retrying.swap(true, Ordering::Relaxed)
                && store::triggers::received(&store.pool, current.id, m).await?
            {
                return Err(CommandError::Rejected(Refused::Replay(m.clone())));
            }
        }
        let at = now();
        let (job_id, run_id) = match started {
            Accepted::Job(id) => (id, None),
            Accepted::Run(id) => (id, Some(id)),
        };
        let invoked = TriggerEvent::TriggerInvoked {
            job_id,
            run_id,
            message_id: call.message_id.clone(),
            body_bytes: call.body_bytes,
        };
        let (_, mut recorded) = trigger_append(
            Some(&current),
            current.id,
            &current.namespace,
            &[invoked],
            meta(&current),
            at,
        )
        .ok_or_else(|| StoreError::Internal("TriggerInvoked does not apply".into()))?;
        recorded
            .effects
            .extend(call.message_id.iter().map(|m| Effect::Receipt {
                trigger_id: current.id,
                message_id: m.clone(),
            }));
        let appends = match &call.start {
            Start::Job(sub) => vec![recorded, job(&current, job_id, sub, at)?],
            Start::Run { workflow_id, input } => {
                run(
                    store,
                    &current,
                    run_id.unwrap_or(job_id),
                    *workflow_id,
                    input,
                    recorded,
                )
                .await?
            }
        };
        Ok(Writes {
            appends,
            out: started,
        })
    })
    .await
}

/// How a hook's events are recorded on the trigger's stream (its refusals too).
pub fn meta(t: &Trigger) -> EventMetadata {
    EventMetadata {
        namespace: t.namespace.clone(),
        actor: Some("hook".into()),
        ..Default::default()
    }
}

fn job(
    t: &Trigger,
    job_id: Uuid,
    sub: &Submission,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<Append, StoreError> {
    store::jobs::submit_append(job_id, sub.clone(), meta(t), at)
}

async fn run(
    store: &Store,
    t: &Trigger,
    run_id: Uuid,
    workflow_id: Uuid,
    input: &Value,
    recorded: Append,
) -> Result<Vec<Append>, CommandError<Refused>> {
    let prepared = store::runs::prepare_run(
        store,
        StartRun {
            namespace: t.namespace.clone(),
            workflow_id,
            input: input.clone(),
            callback_url: None,
            actor: format!("trigger:{}", t.id),
            command: None,
            with: vec![recorded],
            run_id,
        },
    )
    .await;
    match prepared {
        Ok((_, appends)) => Ok(appends),
        Err(StartError::Input(e)) => Err(CommandError::Rejected(Refused::Input(e))),
        Err(StartError::WorkflowNotFound) => Err(CommandError::Rejected(Refused::WorkflowGone)),
        Err(StartError::Store(e)) => Err(e.into()),
        Err(StartError::Append(e)) => Err(StoreError::from(e).into()),
    }
}
