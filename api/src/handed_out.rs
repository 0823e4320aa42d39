//! Attempts this API process handed out to protocol workers before their claim (fast attempts,
//! docs/workers.md): the claim of each waits here `CAPIBARA_WORKER_CLAIM_AFTER_MS` (250 ms by
//! default: a protocol worker's report comes back over HTTP, often batched, where the built-in
//! worker's fast attempts wait 25 ms), and is appended then only if no report of the attempt
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
    /// Each waiting claim with the job it leaves, until it is appended (or its report came).
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
            let due = state.handed_out.due(&ids);
            if !due.is_empty() {
                let claimed = leases::claim_handed(&state.store, due).await;
                metrics::counter!("capibara_worker_protocol_claims_total", "by" => "lease")
                    .increment(claimed.len() as u64);
                for job in claimed {
                    state.kept_leases.refresh(&job);
                }
            }
            // Out only now: until its claim is appended, a job popped again (the relay pushes
            // an entry Redis lost, or one popped and not started yet) is not handed out again.
            state.handed_out.done(&ids);
        });
    }

    /// Whether the attempt of job `id` this process handed out is not claimed yet: a pop of
    /// the job again is a duplicate delivery, not handed out.
    pub fn is_out(&self, id: Uuid) -> bool {
        self.claims.lock().expect("handed out").contains_key(&id)
    }

    /// Whether attempt `id`'s claim still waited (it is not appended now): its report claimed
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

    /// The claims of `ids` that still wait, to be appended (they stay until [`Self::done`]).
    fn due(&self, ids: &[Uuid]) -> Vec<(Job, Append)> {
        let claims = self.claims.lock().expect("handed out");
        ids.iter()
            .filter_map(|id| claims.get(id).cloned())
            .collect()
    }

    /// The claims of `ids` appended (or conflicting): no longer waiting.
    fn done(&self, ids: &[Uuid]) {
        let mut claims = self.claims.lock().expect("handed out");
        for id in ids {
            claims.remove(id);
        }
    }
}
