//! Bulk actions on jobs (`POST /v1/jobs/bulk`, docs/flow-control.md "Bulk actions"): an
//! operation is a `bulk` stream. `BulkStarted` pins the operation to its own place in the event
//! log: the jobs it acts on are those matching its filter whose `JobSubmitted` comes before it in
//! the log. They are taken in pages by id; each page's job events and its `BulkProgressed`
//! (running counts and the last id done) commit in one transaction, so a crash resumes at the
//! cursor and no job is counted, or acted on, twice.

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::{
    event::{DomainEvent, StreamType},
    job::{Cancel, Job, JobEvent},
};

/// What an operation does to each job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BulkAction {
    /// What `POST /v1/jobs/{id}/cancel` does: a waiting job is canceled, a running one is asked
    /// to stop; a finished one is skipped.
    Cancel,
    /// What `POST /v1/jobs/{id}/retry` does: a failed or canceled job is queued again with a
    /// fresh budget of attempts; any other is skipped.
    Retry,
    /// What `DELETE /v1/jobs/{id}` does: a finished job leaves every read of the API
    /// (`JobDeleted`; its history stays in the event log); a job still waiting or running, or a
    /// workflow run's step, is skipped.
    Delete,
}

impl BulkAction {
    pub fn as_str(self) -> &'static str {
        match self {
            BulkAction::Cancel => "cancel",
            BulkAction::Retry => "retry",
            BulkAction::Delete => "delete",
        }
    }
}

impl fmt::Display for BulkAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BulkAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cancel" => Ok(BulkAction::Cancel),
            "retry" => Ok(BulkAction::Retry),
            "delete" => Ok(BulkAction::Delete),
            _ => Err("must be `cancel`, `retry` or `delete`".into()),
        }
    }
}

/// What an operation decided for one job: the events to record on it, or a skip (the job no
/// longer qualifies for the action).
#[derive(Debug, Clone, PartialEq)]
pub enum JobAction {
    Skip,
    /// Record these events; `cancel` says what a cancel did (for the queue after the commit).
    Act {
        events: Vec<JobEvent>,
        cancel: Option<Cancel>,
    },
}

impl BulkAction {
    /// The decision for `job`, made by the same domain functions as the single-job endpoints.
    /// `budget` is the job's submitted `max_attempts` (a retry's fresh budget).
    pub fn decide(self, job: &Job, budget: Option<u32>) -> JobAction {
        match self {
            BulkAction::Cancel => match job.cancel(None) {
                // Already asked to stop: nothing more to record, so nothing done.
                Ok((_, Cancel::AlreadyRequested)) | Err(_) => JobAction::Skip,
                Ok((events, cancel)) => JobAction::Act {
                    events,
                    cancel: Some(cancel),
                },
            },
            BulkAction::Retry => match job.retry(budget.unwrap_or(job.max_attempts)) {
                Ok(events) => JobAction::Act {
                    events,
                    cancel: None,
                },
                Err(_) => JobAction::Skip,
            },
            BulkAction::Delete => match job.delete() {
                Ok(events) => JobAction::Act {
                    events,
                    cancel: None,
                },
                Err(_) => JobAction::Skip,
            },
        }
    }
}

/// Status of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BulkStatus {
    Running,
    Finished,
    Failed,
}

/// Events of a `bulk` stream. Counts are running totals, so each event says where the
/// operation stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum BulkEvent {
    /// The operation was asked for. Its own place in the log is the pin: only jobs submitted
    /// before it are considered.
    BulkStarted {
        action: BulkAction,
        /// The filter as given (the fields of `GET /v1/jobs`).
        filter: Value,
        /// Given to act on every job of the namespace (an empty filter is refused without it).
        #[serde(default)]
        all: bool,
    },
    /// A page was done, in the transaction of its jobs' events.
    BulkProgressed {
        done: u64,
        skipped: u64,
        /// The jobs that matched when the operation began (first page only).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        matched: Option<u64>,
        /// The position of `BulkStarted` (first page only), as the runner resolved it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        position: Option<i64>,
        /// The last job id of the page: the next page starts after it.
        cursor: Uuid,
    },
    BulkFinished {
        done: u64,
        skipped: u64,
    },
    /// The operation cannot go on (a value Postgres refuses); what was done stays done.
    BulkFailed {
        error: String,
    },
}

impl DomainEvent for BulkEvent {
    const STREAM: StreamType = StreamType::Bulk;

    fn type_name(&self) -> &'static str {
        match self {
            BulkEvent::BulkStarted { .. } => "BulkStarted",
            BulkEvent::BulkProgressed { .. } => "BulkProgressed",
            BulkEvent::BulkFinished { .. } => "BulkFinished",
            BulkEvent::BulkFailed { .. } => "BulkFailed",
        }
    }
}

/// An operation (the `bulk_operations` row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BulkOperation {
    pub id: Uuid,
    pub namespace: String,
    pub action: BulkAction,
    pub filter: Value,
    pub all_jobs: bool,
    pub status: BulkStatus,
    pub matched: Option<i64>,
    pub done: i64,
    pub skipped: i64,
    /// The last job id done (`None` before the first page).
    pub cursor: Option<Uuid>,
    pub error: Option<String>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl BulkOperation {
    /// The state after `ev`, or `None` when it does not apply. (Who asked is the actor in
    /// `BulkStarted`'s metadata; the runner reads it there.)
    pub fn apply(
        prev: Option<BulkOperation>,
        id: Uuid,
        namespace: &str,
        ev: &BulkEvent,
        at: DateTime<Utc>,
    ) -> Option<BulkOperation> {
        let mut op = match (prev, ev) {
            (
                None,
                BulkEvent::BulkStarted {
                    action,
                    filter,
                    all,
                },
            ) => BulkOperation {
                id,
                namespace: namespace.to_string(),
                action: *action,
                filter: filter.clone(),
                all_jobs: *all,
                status: BulkStatus::Running,
                matched: None,
                done: 0,
                skipped: 0,
                cursor: None,
                error: None,
                version: 0,
                created_at: at,
                updated_at: at,
                finished_at: None,
            },
            (None, _) | (Some(_), BulkEvent::BulkStarted { .. }) => return None,
            (Some(op), _) if op.status != BulkStatus::Running => return None,
            (Some(op), _) => op,
        };
        match ev {
            BulkEvent::BulkStarted { .. } => {}
            BulkEvent::BulkProgressed {
                done,
                skipped,
                matched,
                cursor,
                ..
            } => {
                op.done = *done as i64;
                op.skipped = *skipped as i64;
                if let Some(m) = matched {
                    op.matched = Some(*m as i64);
                }
                op.cursor = Some(*cursor);
            }
            BulkEvent::BulkFinished { done, skipped } => {
                op.done = *done as i64;
                op.skipped = *skipped as i64;
                op.status = BulkStatus::Finished;
                // No page at all: nothing matched.
                op.matched.get_or_insert(op.done + op.skipped);
                op.finished_at = Some(at);
            }
            BulkEvent::BulkFailed { error } => {
                op.error = Some(error.clone());
                op.status = BulkStatus::Failed;
                op.finished_at = Some(at);
            }
        }
        op.version += 1;
        op.updated_at = at;
        Some(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_and_unknown_ones_name_the_choices() {
        assert_eq!("cancel".parse(), Ok(BulkAction::Cancel));
        assert_eq!("retry".parse(), Ok(BulkAction::Retry));
        assert_eq!("delete".parse(), Ok(BulkAction::Delete));
        assert_eq!(
            "purge".parse::<BulkAction>().unwrap_err(),
            "must be `cancel`, `retry` or `delete`"
        );
    }

    #[test]
    fn an_operation_counts_its_pages_and_ends_once() {
        let id = Uuid::now_v7();
        let at = crate::domain::now();
        let start = BulkEvent::BulkStarted {
            action: BulkAction::Cancel,
            filter: serde_json::json!({"tag": "batch:7"}),
            all: false,
        };
        let op = BulkOperation::apply(None, id, "ns", &start, at).unwrap();
        assert_eq!((op.status, op.version), (BulkStatus::Running, 1));
        let page = BulkEvent::BulkProgressed {
            done: 90,
            skipped: 10,
            matched: Some(150),
            position: Some(7),
            cursor: Uuid::now_v7(),
        };
        let op = BulkOperation::apply(Some(op), id, "ns", &page, at).unwrap();
        assert_eq!((op.done, op.skipped, op.matched), (90, 10, Some(150)));
        let end = BulkEvent::BulkFinished {
            done: 140,
            skipped: 10,
        };
        let op = BulkOperation::apply(Some(op), id, "ns", &end, at).unwrap();
        assert_eq!(op.status, BulkStatus::Finished);
        assert_eq!(op.finished_at, Some(at));
        // Nothing applies after the end, and a second start never does.
        assert!(BulkOperation::apply(Some(op.clone()), id, "ns", &page, at).is_none());
        assert!(BulkOperation::apply(Some(op), id, "ns", &start, at).is_none());
    }
}
