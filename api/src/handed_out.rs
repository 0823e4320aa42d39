//! Attempts this API process handed out to protocol workers before their claim (fast attempts,
//! docs/workers.md): the claim of each waits here `CAPIBARA_WORKER_CLAIM_AFTER_MS` (25 ms, as
//! the built-in worker's fast attempts), and is appended then only if no report of the attempt
//! came first. A short job's report records `JobStarted` and its end
//! in one append, so its claim is never written (one append per job instead of two).
//!
//! Losing what waits here (the process stops) loses no job: a report still claims its attempt
//! (the token names the job as it was handed out), and a job whose worker never reports is
//! still queued in Postgres with its dispatch entry, which the relay pushes again.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use capibara_shared::{command::leases, domain::job::Job, store::Append};
use uuid::Uuid;

use crate::AppState;

#[derive(Default)]
pub struct HandedOut {
    /// Each waiting claim with the job it leaves.
    claims: Mutex<HashMap<Uuid, (Job, Append)>>,
}

impl HandedOut {
    /// Hold the claim of each attempt of `handed` until `after` has passed, then append those
    /// whose report did not come first.
    pub fn claim_later(&self, state: &AppState, handed: Vec<(Job, Append)>, after: Duration) {
        if handed.is_empty() {
            return;
        }
        let ids: Vec<Uuid> = handed.iter().map(|(j, _)| j.id).collect();
        self.claims
            .lock()
            .expect("handed out")
            .extend(handed.into_iter().map(|(j, a)| (j.id, (j, a))));
        let state = state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let due = state.handed_out.take(&ids);
            if due.is_empty() {
                return;
            }
            metrics::counter!("capibara_worker_protocol_claims_total", "by" => "lease")
                .increment(due.len() as u64);
            for job in leases::claim_handed(&state.store, due).await {
                state.kept_leases.refresh(&job);
            }
        });
    }

    /// Whether attempt `id`'s claim still waited (it is not appended now): its report claims
    /// it instead.
    pub fn forget(&self, id: Uuid) -> bool {
        let waited = self
            .claims
            .lock()
            .expect("handed out")
            .remove(&id)
            .is_some();
        if waited {
            metrics::counter!("capibara_worker_protocol_claims_total", "by" => "report")
                .increment(1);
        }
        waited
    }

    /// The claims of `ids` that still wait, no longer waiting.
    fn take(&self, ids: &[Uuid]) -> Vec<(Job, Append)> {
        let mut claims = self.claims.lock().expect("handed out");
        ids.iter().filter_map(|id| claims.remove(id)).collect()
    }
}
