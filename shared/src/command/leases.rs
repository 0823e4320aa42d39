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

/// Names one attempt of one job held by one worker: `{job}.{attempt}.{worker}`, and for an
/// attempt handed out before its claim, `.{version}.{ms}`: the job's version as it was handed
/// out and when (see [`hand_out_many`]). Opaque to clients. Not a secret (the caller is
/// authenticated by its key): a fencing token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseToken {
    pub job_id: Uuid,
    pub attempt: u32,
    pub worker_id: Uuid,
    /// Set when the attempt was handed out unclaimed.
    pub handed: Option<Handed>,
}

/// The job an attempt was handed out unclaimed on: its version then, and the time (ms since
/// the Unix epoch) its `JobStarted` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handed {
    pub version: i64,
    pub at_ms: i64,
}

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}",
            self.job_id.simple(),
            self.attempt,
            self.worker_id.simple()
        )?;
        match self.handed {
            Some(h) => write!(f, ".{}.{}", h.version, h.at_ms),
            None => Ok(()),
        }
    }
}

impl FromStr for LeaseToken {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let mut parts = s.trim().split('.');
        let (Some(j), Some(a), Some(w)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(());
        };
        let handed = match (parts.next(), parts.next(), parts.next()) {
            (None, _, _) => None,
            (Some(v), Some(at), None) => Some(Handed {
                version: v.parse().map_err(drop)?,
                at_ms: at.parse().map_err(drop)?,
            }),
            _ => return Err(()),
        };
        Ok(LeaseToken {
            job_id: j.parse().map_err(drop)?,
            attempt: a.parse().map_err(drop)?,
            worker_id: w.parse().map_err(drop)?,
            handed,
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

/// An attempt handed out to a worker of the protocol before its claim is committed (a fast
/// attempt, docs/workers.md): the worker starts at once, and the attempt's first report records
/// `JobStarted` with it in one append; the claim is appended on its own only if no report came
/// first ([`claim_handed`], 250 ms later in the API, by default).
#[derive(Debug)]
pub struct HandedOut {
    /// The job as it stands, queued: what a report of the attempt decides on.
    pub job: Job,
    /// The job as its claim leaves it: what the worker is given.
    pub started: Job,
    /// The claim, expecting the job as handed out.
    pub claim: Append,
    pub token: LeaseToken,
    pub expires_at: DateTime<Utc>,
}

/// Hand out the next attempt of each job `popped` to worker `w`, unclaimed, its lease to last
/// `term` once claimed. A worker runs what it is given before anything is committed, so what it
/// is given must be the job as it stands, not as its dispatch wrote it: a copy that rode with
/// its pop is handed out only at the job's current version, read from Postgres (one query of
/// the versions; the rows of the others, [`store::jobs::as_they_stand`]). Jobs that are
/// not this worker's to run any more are left out (a duplicate delivery, canceled or started
/// elsewhere meanwhile, another namespace, a kind it did not declare); the rest keep the
/// pop's order.
pub async fn hand_out_many(
    store: &Store,
    w: &RemoteWorker,
    popped: Popped,
    term: Duration,
) -> Result<Vec<HandedOut>, StoreError> {
    let jobs = store::jobs::as_they_stand(store.generic_pool(), popped).await?;
    let at = now();
    jobs.into_iter()
        .filter(|j| {
            j.namespace == w.namespace && j.status == JobStatus::Queued && w.kinds.contains(&j.kind)
        })
        .map(|job| hand_out(w, job, term, at))
        .collect()
}

/// [`hand_out_many`] of one job read as `job`, at `at`.
fn hand_out(
    w: &RemoteWorker,
    job: Job,
    term: Duration,
    at: DateTime<Utc>,
) -> Result<HandedOut, StoreError> {
    let attempt = job.attempt + 1;
    let mut write = JobWrite::new(metadata(w), at);
    write.lease = Some((w.name.clone(), term));
    let (started, claim) = job_append(Some(&job), job.id, &[start(w, attempt)], write)
        .map_err(|e| StoreError::Internal(e.to_string()))?;
    let token = LeaseToken {
        job_id: job.id,
        attempt,
        worker_id: w.id,
        handed: Some(Handed {
            version: job.version,
            at_ms: at.timestamp_millis(),
        }),
    };
    let expires_at = at + chrono::Duration::from_std(term).unwrap_or_default();
    Ok(HandedOut {
        job,
        started,
        claim,
        token,
        expires_at,
    })
}

/// The event that starts attempt `attempt` on worker `w`.
fn start(w: &RemoteWorker, attempt: u32) -> JobEvent {
    JobEvent::JobStarted {
        attempt,
        worker: w.name.clone(),
    }
}

/// Commit `claims` of attempts handed out ([`HandedOut::claim`] with the job it leaves) whose
/// report did not come first, in one group commit. A claim expects the job as it was handed
/// out, so one whose job moved since (its report claimed it, a cancel) conflicts and is left:
/// the attempt's token decides again on the job as it stands. Returns the jobs claimed.
pub async fn claim_handed(store: &Store, claims: Vec<(Job, Append)>) -> Vec<Job> {
    let appended = futures::future::join_all(claims.into_iter().map(|(started, claim)| async {
        match store.appender.append(claim).await {
            Ok(_) => Some(started),
            Err(AppendError::Conflict { .. }) => None,
            Err(e) => {
                // The attempt's next report (or heartbeat) claims it; failing that, the relay
                // dispatches the job again once its entry is past the grace period.
                tracing::warn!(job_id = %started.id, error = %e, "claiming a handed-out attempt failed");
                None
            }
        }
    }))
    .await;
    appended.into_iter().flatten().collect()
}

/// What a worker reports about its attempt.
#[derive(Debug, Clone)]
pub enum Report {
    /// The attempt runs: its claim, if it was handed out unclaimed and is not yet (a heartbeat,
    /// an upload); nothing otherwise.
    Start,
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
///
/// An attempt handed out unclaimed ([`hand_out_many`]) and not claimed since is claimed by its
/// report: `JobStarted` and what the report records in one append, the lease lasting `term`.
pub async fn report(
    store: &Store,
    w: &RemoteWorker,
    token: LeaseToken,
    term: Duration,
    report: Report,
    check_output: impl Fn(&serde_json::Value) -> Result<(), crate::domain::FieldError>,
) -> Result<Job, CommandError<LeaseError>> {
    report_on(store, w, token, term, None, report, check_output).await
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
    term: Duration,
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
        term,
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
                term,
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
    term: Duration,
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
            // An attempt handed out unclaimed is claimed by this report, in its append.
            let claim = unclaimed(&job, w, token).then(|| start(w, token.attempt));
            let running = match &claim {
                Some(started) => std::borrow::Cow::Owned(
                    job.append(job.id, std::slice::from_ref(started), meta, now())?
                        .0,
                ),
                None => {
                    holds(&job, w, token).map_err(CommandError::Rejected)?;
                    std::borrow::Cow::Borrowed(&job)
                }
            };
            let mut with = Vec::new();
            let events = match report {
                Report::Start => Vec::new(),
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
                    running.end_attempt(token.attempt, end.clone(), now())
                }
                Report::Trained(trained) => {
                    let (end, registration) = registered(store, &running, w, trained).await?;
                    with.push(registration);
                    running.end_attempt(token.attempt, end, now())
                }
            };
            if events.is_empty() && claim.is_none() {
                return Ok(Writes {
                    appends: Vec::new(),
                    out: job,
                });
            }
            planned.store(false, Ordering::Relaxed);
            if plan.swap(false, Ordering::Relaxed) {
                // A plan that cannot be made (the run cannot be read) is the orchestrator's.
                if let Ok(Some(run)) = super::runs::plan_with_report(store, &running, &events).await
                {
                    with.extend(run);
                    planned.store(true, Ordering::Relaxed);
                }
            }
            let at = now();
            let mut write = JobWrite::new(meta.clone(), at);
            write.lease = Some((w.name.clone(), term));
            if claim.is_some() {
                // The attempt started when it was handed out (a time the token carries, so
                // never later than now nor earlier than the job as it was handed out).
                write.started_at = token
                    .handed
                    .and_then(|h| DateTime::<Utc>::from_timestamp_millis(h.at_ms))
                    .map(|t| t.clamp(job.updated_at.min(at), at));
            }
            let events: Vec<JobEvent> = claim.into_iter().chain(events).collect();
            let (after, append) = job_append(Some(&job), job.id, &events, write)
                .map_err(|e| StoreError::Internal(e.to_string()))?;
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

/// Whether `token` names an attempt handed out to worker `w` unclaimed ([`hand_out_many`]) that
/// is not claimed yet: the job is still queued as it was handed out.
pub fn unclaimed(job: &Job, w: &RemoteWorker, token: LeaseToken) -> bool {
    token.handed.is_some_and(|h| h.version == job.version)
        && job.status == JobStatus::Queued
        && job.attempt + 1 == token.attempt
        && token.worker_id == w.id
        && !w.builtin
        && w.kinds.contains(&job.kind)
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
            handed: None,
        };
        assert_eq!(t.to_string().parse::<LeaseToken>(), Ok(t));
        let handed = LeaseToken {
            handed: Some(Handed {
                version: 7,
                at_ms: 1_796_000_000_123,
            }),
            ..t
        };
        assert_eq!(handed.to_string(), format!("{t}.7.1796000000123"));
        assert_eq!(handed.to_string().parse::<LeaseToken>(), Ok(handed));
        for bad in [
            "",
            "x",
            "a.b.c",
            &format!("{}.x.{}", t.job_id, t.worker_id),
            &format!("{t}.7"),
            &format!("{t}.x.8"),
            &format!("{t}.7.8.9"),
        ] {
            assert!(bad.parse::<LeaseToken>().is_err(), "{bad}");
        }
    }
}
