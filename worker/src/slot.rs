//! A worker's slots (`--concurrency`): one per handler running. A slot goes to the next job as
//! soon as its handler ends, and the attempt's report then commits behind it, in one of as many
//! report places as there are slots: a report waits for its group commit without holding a
//! handler's place, and a slow Postgres still stops the pops once every place is taken
//! (docs/queue.md, "Slots").

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A slot held by a running attempt (shown in `capibara_worker_busy_slots`).
pub struct Slot {
    _running: OwnedSemaphorePermit,
    reports: Arc<Semaphore>,
}

impl Slot {
    /// The slot `running` (of the slots' semaphore), taken by an attempt; its report will take
    /// one of `reports`.
    pub fn taken(running: OwnedSemaphorePermit, reports: Arc<Semaphore>) -> Slot {
        metrics::gauge!("capibara_worker_busy_slots").increment(1.0);
        Slot {
            _running: running,
            reports,
        }
    }

    /// The handler has ended: wait for a report place, then let the slot go to the next job.
    /// The place is held until the report is written.
    pub async fn hand_over(self) -> OwnedSemaphorePermit {
        let place = self
            .reports
            .clone()
            .acquire_owned()
            .await
            .expect("the report places are never closed");
        drop(self);
        place
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!("capibara_worker_busy_slots").decrement(1.0);
    }
}
