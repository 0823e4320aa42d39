//! Jobs this API process handed out in lease calls, kept until their final report: the report
//! decides on the job as its claim left it instead of reading it from Postgres again (that read
//! was, per completed job, about half of what Postgres spent on the protocol's writes).
//!
//! Safe as a read is: a report's append expects the version of the job it decided on, so a kept
//! job that is not the job as it stands (a progress report, a cancel, a reaped lease since)
//! conflicts, and the report reads the job again and decides anew. The same holds for a report
//! that reaches another API replica, which keeps nothing for it and reads. Bounded: at most
//! [`KeptLeases::CAPACITY`] jobs (the oldest go first), none whose input is large.

use std::{
    collections::{HashMap, VecDeque},
    io,
    sync::Mutex,
};

use capibara_shared::domain::job::Job;
use uuid::Uuid;

#[derive(Default)]
pub struct KeptLeases {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<Uuid, Job>,
    /// Insertion order, for evicting the oldest. Ids taken since stay until the order is
    /// compacted (when it grows to twice the capacity); an id may appear twice, and its stale
    /// entry then evicts the newer one early, which costs a read, nothing else.
    order: VecDeque<Uuid>,
}

impl KeptLeases {
    /// Jobs kept at most.
    pub const CAPACITY: usize = 10_000;
    /// Jobs whose input serializes to more than this are not kept.
    pub const MAX_INPUT_BYTES: usize = 16 * 1024;

    /// Keep `job`, as a claim left it.
    pub fn keep(&self, job: &Job) {
        if json_len(&job.input) > Self::MAX_INPUT_BYTES {
            return;
        }
        let mut inner = self.inner.lock().expect("kept leases");
        while inner.jobs.len() >= Self::CAPACITY {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            inner.jobs.remove(&old);
        }
        if inner.jobs.insert(job.id, job.clone()).is_none() {
            inner.order.push_back(job.id);
        }
        if inner.order.len() >= 2 * Self::CAPACITY {
            let Inner { jobs, order } = &mut *inner;
            order.retain(|id| jobs.contains_key(id));
        }
    }

    /// The kept job `id`, no longer kept (for a final report).
    pub fn take(&self, id: Uuid) -> Option<Job> {
        let job = self.inner.lock().expect("kept leases").jobs.remove(&id);
        let outcome = if job.is_some() { "kept" } else { "read" };
        metrics::counter!("capibara_worker_protocol_final_reports_total", "job" => outcome)
            .increment(1);
        job
    }

    /// A copy of the kept job `id` (for a report that is not the last).
    pub fn get(&self, id: Uuid) -> Option<Job> {
        self.inner
            .lock()
            .expect("kept leases")
            .jobs
            .get(&id)
            .cloned()
    }

    /// Replace the kept job by `job` after a report that changed it (if it is kept).
    pub fn refresh(&self, job: &Job) {
        if let Some(kept) = self
            .inner
            .lock()
            .expect("kept leases")
            .jobs
            .get_mut(&job.id)
        {
            *kept = job.clone();
        }
    }
}

/// Bytes `value` serializes to, without building the text.
fn json_len(value: &serde_json::Value) -> usize {
    struct Count(usize);
    impl io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, value);
    c.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(input: serde_json::Value) -> Job {
        let sub: capibara_shared::domain::job::Submission =
            serde_json::from_value(serde_json::json!({"kind": "echo", "input": input, "queue": "q", "priority": "normal", "max_attempts": 3}))
                .unwrap();
        Job::submitted(
            Uuid::now_v7(),
            "default",
            &sub,
            capibara_shared::domain::now(),
        )
    }

    #[test]
    fn a_job_is_taken_once_and_large_inputs_are_not_kept() {
        let kept = KeptLeases::default();
        let j = job(serde_json::json!({"n": 1}));
        kept.keep(&j);
        assert_eq!(kept.get(j.id).map(|k| k.id), Some(j.id));
        assert_eq!(kept.take(j.id).map(|k| k.id), Some(j.id));
        assert!(kept.take(j.id).is_none());
        let big = job(serde_json::json!({"s": "x".repeat(KeptLeases::MAX_INPUT_BYTES)}));
        kept.keep(&big);
        assert!(kept.get(big.id).is_none());
    }

    #[test]
    fn jobs_taken_leave_no_trace_behind() {
        let kept = KeptLeases::default();
        for _ in 0..3 * KeptLeases::CAPACITY {
            let j = job(serde_json::json!({}));
            kept.keep(&j);
            assert!(kept.take(j.id).is_some());
        }
        let inner = kept.inner.lock().unwrap();
        assert!(inner.jobs.is_empty());
        assert!(
            inner.order.len() < 2 * KeptLeases::CAPACITY,
            "{}",
            inner.order.len()
        );
    }

    #[test]
    fn the_oldest_go_first_beyond_the_capacity() {
        let kept = KeptLeases::default();
        let first = job(serde_json::json!({}));
        kept.keep(&first);
        for _ in 0..KeptLeases::CAPACITY {
            kept.keep(&job(serde_json::json!({})));
        }
        assert!(kept.get(first.id).is_none());
        assert_eq!(kept.inner.lock().unwrap().jobs.len(), KeptLeases::CAPACITY);
    }
}
