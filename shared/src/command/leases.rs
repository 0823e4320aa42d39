//! Jobs taken and reported by workers of the HTTP protocol (docs/workers.md): the claim that
//! starts an attempt under a lease, and the lease-scoped reports, each fenced by its token.
//!
//! Fencing: a report is decided on the job as loaded and appended at that version (the command
//! loop), and the decision refuses it unless the job's current attempt is the token's, still
//! running on the token's worker. An attempt that was reaped (its lease expired) or that ended
//! moved the job on, so a stale token is refused ([`LeaseError::Lost`]) and records nothing —
//! the same guarantee as the built-in worker's version fence.

use std::{
    fmt,
    str::FromStr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{execute_async_from, Aggregate, CommandError, Writes};
use crate::{
    domain::{
        event::EventMetadata,
        job::{Artifact, AttemptEnd, Job, JobEvent, JobStatus},
        kinds::model::{FinetuneCommandOutput, FinetuneTrainInput},
        model::{self, ModelInfo, Registration},
        now, FieldError,
    },
    queue::Popped,
    store::{
        self,
        jobs::{job_append, JobWrite},
        workers::RemoteWorker,
        Append, AppendError, Store, StoreError,
    },
};

/// Names one attempt of one job held by one worker: `{job}.{attempt}.{worker}`. Opaque to
/// clients. Not a secret (the caller is authenticated by its key): a fencing token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseToken {
    pub job_id: Uuid,
    pub attempt: u32,
    pub worker_id: Uuid,
}

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}",
            self.job_id.simple(),
            self.attempt,
            self.worker_id.simple()
        )
    }
}

impl FromStr for LeaseToken {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let mut parts = s.trim().split('.');
        let (Some(j), Some(a), Some(w), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(());
        };
        Ok(LeaseToken {
            job_id: j.parse().map_err(drop)?,
            attempt: a.parse().map_err(drop)?,
            worker_id: w.parse().map_err(drop)?,
        })
    }
}

/// Why a lease-scoped call was refused.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The token no longer names the job's running attempt on this worker.
    #[error("the lease of attempt {attempt} is lost: the job is {status} (attempt {current}); stop working on it")]
    Lost {
        attempt: u32,
        current: u32,
        status: JobStatus,
    },
    /// The output does not match the kind's output schema.
    #[error("{}: {}", .0.field, .0.message)]
    Invalid(crate::domain::FieldError),
}

/// The metadata of what worker `w` records.
pub fn metadata(w: &RemoteWorker) -> EventMetadata {
    EventMetadata {
        namespace: w.namespace.clone(),
        actor: Some(format!("worker:{}", w.id)),
        ..Default::default()
    }
}

/// Start the next attempt of each job `popped` for worker `w`, holding its lease for `term`:
/// the jobs are read in one query and their claims committed together (one group commit).
/// A job whose copy rode with its pop is not read: its claim expects the copy's version, and
/// one that conflicts reads the job again ([`store::dispatch::carried`]). Jobs that are not
/// this worker's to run any more are left out (a duplicate delivery, canceled or started
/// elsewhere meanwhile, another namespace, a kind it did not declare).
pub async fn claim_many(
    store: &Store,
    w: &RemoteWorker,
    popped: Popped,
    term: Duration,
) -> Result<Vec<(Job, LeaseToken, DateTime<Utc>)>, StoreError> {
    let (mut jobs, load) = popped.split();
    if !load.is_empty() {
        jobs.extend(store::jobs::get_many(&store.pool, &load).await?);
    }
    let claims = futures::future::join_all(
        jobs.into_iter()
            .filter(|j| j.namespace == w.namespace)
            .map(|job| claim(store, w, job, term)),
    )
    .await;
    claims.into_iter().filter_map(Result::transpose).collect()
}

/// Claim `job` (as read) for `w`; on a conflict read it again and retry while it is still
/// queued.
async fn claim(
    store: &Store,
    w: &RemoteWorker,
    mut job: Job,
    term: Duration,
) -> Result<Option<(Job, LeaseToken, DateTime<Utc>)>, StoreError> {
    for _ in 0..3 {
        if job.status != JobStatus::Queued || !w.kinds.contains(&job.kind) {
            return Ok(None);
        }
        let at = now();
        let mut write = JobWrite::new(metadata(w), at);
        write.lease = Some((w.name.clone(), term));
        let attempt = job.attempt + 1;
        let events = [JobEvent::JobStarted {
            attempt,
            worker: w.name.clone(),
        }];
        let (started, append) = job_append(Some(&job), job.id, &events, write)
            .map_err(|e| StoreError::Internal(e.to_string()))?;
        match store.appender.append(append).await {
            Ok(_) => {
                let token = LeaseToken {
                    job_id: job.id,
                    attempt,
                    worker_id: w.id,
                };
                let expires = at + chrono::Duration::from_std(term).unwrap_or_default();
                return Ok(Some((started, token, expires)));
            }
            Err(AppendError::Conflict { .. }) => {
                match store::jobs::get(&store.pool, &w.namespace, job.id).await? {
                    Some(fresh) => job = fresh,
                    None => return Ok(None),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// What a worker reports about its attempt.
#[derive(Debug, Clone)]
pub enum Report {
    Progress {
        percent: Option<f64>,
        message: Option<String>,
        data: Option<serde_json::Value>,
    },
    Logs(Vec<(String, String)>),
    Chunk {
        seq: u64,
        data: serde_json::Value,
    },
    End(AttemptEnd),
    /// The success of a `finetune.command` job: the model it trained is registered with it.
    Trained(Box<Trained>),
}

/// What an external trainer completed a `finetune.command` job with: its model file (whose
/// header the caller read and checked, [`crate::domain::model::check_model_header`]) among the
/// files the attempt uploaded, and the figures it reported.
#[derive(Debug, Clone)]
pub struct Trained {
    pub artifacts: Vec<Artifact>,
    pub model: Artifact,
    pub info: ModelInfo,
    pub metrics: serde_json::Value,
}

/// Record `report` on the attempt `token` names, if worker `w` still holds it. Returns the job
/// after it.
pub async fn report(
    store: &Store,
    w: &RemoteWorker,
    token: LeaseToken,
    report: Report,
    check_output: impl Fn(&serde_json::Value) -> Result<(), crate::domain::FieldError>,
) -> Result<Job, CommandError<LeaseError>> {
    report_on(store, w, token, None, report, check_output).await
}

/// [`report`] decided first on `loaded`, the job as the caller read it (a batch of reports
/// reads its jobs at once); a job that changed since is read again.
///
/// The end of a workflow step's job plans its run in the same commit when the step runs alone
/// ([`super::runs::plan_with_report`], as the built-in worker's reports do), on the first try
/// only: a try that conflicts is decided again without it, and one the store refuses is
/// recorded again without it; the orchestrator then plans the run from the log.
pub async fn report_on(
    store: &Store,
    w: &RemoteWorker,
    token: LeaseToken,
    loaded: Option<Job>,
    report: Report,
    check_output: impl Fn(&serde_json::Value) -> Result<(), crate::domain::FieldError>,
) -> Result<Job, CommandError<LeaseError>> {
    let ends = matches!(report, Report::End(_));
    let planned = AtomicBool::new(false);
    let first = report_as(
        store,
        w,
        token,
        loaded,
        &report,
        &check_output,
        ends,
        &planned,
    );
    match first.await {
        Ok(job) => {
            if planned.load(Ordering::Relaxed) {
                metrics::counter!("capibara_runs_advanced_in_report_total").increment(1);
            }
            Ok(job)
        }
        // The caller's copy went into the refused try: the job is read again (a rare path).
        Err(CommandError::Store(_)) if planned.load(Ordering::Relaxed) => {
            report_as(
                store,
                w,
                token,
                None,
                &report,
                &check_output,
                false,
                &planned,
            )
            .await
        }
        Err(e) => Err(e),
    }
}

/// [`report_on`], planning the run in the first try when `plan`; `planned` tells whether the
/// last try did.
#[allow(clippy::too_many_arguments)]
async fn report_as(
    store: &Store,
    w: &RemoteWorker,
    token: LeaseToken,
    loaded: Option<Job>,
    report: &Report,
    check_output: &impl Fn(&serde_json::Value) -> Result<(), crate::domain::FieldError>,
    plan: bool,
    planned: &AtomicBool,
) -> Result<Job, CommandError<LeaseError>> {
    let meta = metadata(w);
    let loaded = loaded.filter(|j| j.id == token.job_id && j.namespace == w.namespace);
    let meta = &meta;
    let plan = AtomicBool::new(plan);
    let plan = &plan;
    execute_async_from(
        store,
        &w.namespace,
        token.job_id,
        loaded,
        |job: Job| async move {
            holds(&job, w, token).map_err(CommandError::Rejected)?;
            let mut with = Vec::new();
            let events = match report {
                Report::Progress {
                    percent,
                    message,
                    data,
                } => vec![JobEvent::JobProgress {
                    percent: *percent,
                    message: message.clone(),
                    data: data.clone(),
                }],
                Report::Logs(lines) => lines
                    .iter()
                    .map(|(level, message)| JobEvent::JobLog {
                        level: level.clone(),
                        message: message.clone(),
                    })
                    .collect(),
                Report::Chunk { seq, data } => vec![JobEvent::JobOutputChunk {
                    seq: *seq,
                    data: data.clone(),
                }],
                Report::End(end) => {
                    if let AttemptEnd::Succeeded { output, .. } = end {
                        check_output(output).map_err(|e| {
                            CommandError::Rejected(LeaseError::Invalid(e.under("output")))
                        })?;
                    }
                    job.end_attempt(token.attempt, end.clone(), now())
                }
                Report::Trained(trained) => {
                    let (end, registration) = registered(store, &job, w, trained).await?;
                    with.push(registration);
                    job.end_attempt(token.attempt, end, now())
                }
            };
            if events.is_empty() {
                return Ok(Writes {
                    appends: Vec::new(),
                    out: job,
                });
            }
            planned.store(false, Ordering::Relaxed);
            if plan.swap(false, Ordering::Relaxed) {
                // A plan that cannot be made (the run cannot be read) is the orchestrator's.
                if let Ok(Some(run)) = super::runs::plan_with_report(store, &job, &events).await {
                    with.extend(run);
                    planned.store(true, Ordering::Relaxed);
                }
            }
            let (after, append) = job.append(job.id, &events, meta, now())?;
            with.insert(0, append);
            Ok(Writes {
                appends: with,
                out: after,
            })
        },
    )
    .await
}

/// The success of `finetune.command` job `job` that registers `trained`'s model as the next
/// version of the job's `name` (read now: a registration that loses the race for the number
/// conflicts, and the command reads both streams again), and the append registering it.
async fn registered(
    store: &Store,
    job: &Job,
    w: &RemoteWorker,
    trained: &Trained,
) -> Result<(AttemptEnd, Append), CommandError<LeaseError>> {
    let input: FinetuneTrainInput = serde_json::from_value(job.input.clone())
        .map_err(|e| StoreError::Internal(format!("a finetune.command input: {e}")))?;
    let info = &trained.info;
    if info.base != input.base_model() {
        return Err(CommandError::Rejected(LeaseError::Invalid(
            FieldError::new(
                "output.artifact",
                format!(
                    "the model file was trained on `{}`; the job asked for `{}`",
                    info.base,
                    input.base_model()
                ),
            ),
        )));
    }
    let current = store::models::get(
        &store.pool,
        &job.namespace,
        model::stream_id(&job.namespace, &input.name),
    )
    .await?;
    let registration = Registration {
        id: Uuid::now_v7(),
        name: input.name.clone(),
        base: info.base.clone(),
        task: "text_classification".into(),
        labels: info.labels.clone(),
        max_length: info.max_length,
        metrics: trained.metrics.clone(),
        training_job_id: job.id,
        artifact: trained.model.clone(),
    };
    let metadata = EventMetadata {
        causation_id: Some(job.id),
        ..metadata(w)
    };
    let model_id = registration.id;
    let (version, append) = super::models::registered(current.as_ref(), &metadata, registration)?;
    let output = FinetuneCommandOutput {
        model: format!("{}@{version}", input.name),
        model_id,
        version,
        labels: info.labels.clone(),
        metrics: trained.metrics.clone(),
        trainer: w.name.clone(),
    };
    let end = AttemptEnd::Succeeded {
        output: serde_json::to_value(output).map_err(|e| StoreError::Internal(e.to_string()))?,
        artifacts: trained.artifacts.clone(),
    };
    Ok((end, append))
}

/// Whether worker `w` holds the attempt `token` names on `job`.
pub fn holds(job: &Job, w: &RemoteWorker, token: LeaseToken) -> Result<(), LeaseError> {
    // A built-in worker's token is only ever handed to push endpoints: user kinds only.
    let kind_ok = !w.builtin || !crate::domain::kinds::user::is_builtin(&job.kind);
    let ours = kind_ok
        && job.status == JobStatus::Running
        && job.attempt == token.attempt
        && token.worker_id == w.id
        && job.worker_id.as_deref() == Some(w.name.as_str());
    if ours {
        Ok(())
    } else {
        Err(LeaseError::Lost {
            attempt: token.attempt,
            current: job.attempt,
            status: job.status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_malformed_ones_are_refused() {
        let t = LeaseToken {
            job_id: Uuid::now_v7(),
            attempt: 3,
            worker_id: Uuid::now_v7(),
        };
        assert_eq!(t.to_string().parse::<LeaseToken>(), Ok(t));
        for bad in ["", "x", "a.b.c", &format!("{}.x.{}", t.job_id, t.worker_id)] {
            assert!(bad.parse::<LeaseToken>().is_err(), "{bad}");
        }
    }
}
