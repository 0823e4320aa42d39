//! One attempt's timeline, apart from Postgres and Redis: the executor runs unclaimed for a
//! moment (most short jobs end there, and record their start with their outcome in one
//! append), then its start is recorded (the claim, fenced by the job's version) while it keeps
//! running; a user's cancel, the end of the shutdown grace, a timeout or a report that cannot
//! be stored stops it. The runtime passes the claim in; tests drive this on a paused clock.

use std::{future::Future, sync::Mutex, time::Duration};

use capibara_shared::domain::job::JobError;
use tokio_util::sync::CancellationToken;

use crate::executors::{ExecError, Output};

/// How an attempt ended.
pub(crate) enum Outcome {
    Done(Result<Output, ExecError>),
    TimedOut,
    Canceled,
    /// The worker is stopping: give the attempt back without using it up.
    Released,
}

/// A report the executor made (progress, an output chunk) that Postgres cannot store: the
/// attempt stops and ends with this error.
#[derive(Default)]
pub(crate) struct InvalidOutput {
    stop: CancellationToken,
    error: Mutex<Option<JobError>>,
}

impl InvalidOutput {
    pub(crate) fn set(&self, error: JobError) {
        self.error
            .lock()
            .expect("invalid output lock")
            .get_or_insert(error);
        self.stop.cancel();
    }

    fn outcome(&self) -> Outcome {
        let error = self.error.lock().expect("invalid output lock").clone();
        Outcome::Done(Err(ExecError::Abort(error.unwrap_or_else(|| {
            JobError::new("invalid_output", "a report of the attempt cannot be stored")
        }))))
    }
}

/// What ends an attempt from outside its executor, and what to tell when it ends.
pub(crate) struct Stops<'a> {
    /// Canceled by the user (`POST /v1/jobs/{id}/cancel`).
    pub user_cancel: &'a CancellationToken,
    /// The grace period after SIGTERM is over: the attempt is given back.
    pub hard_stop: &'a CancellationToken,
    pub invalid: &'a InvalidOutput,
    /// Cancelled once the executor's future is dropped (blocking executors watch it).
    pub on_end: &'a CancellationToken,
}

/// Run `exec` (within `timeout`), unclaimed for `claim_after`, then with `claim` in flight.
/// Returns how the attempt ended, or None when the claim found it taken away (fenced off);
/// only once a claim that was started has finished (dropping it could leave its append
/// committed unseen).
pub(crate) async fn supervise<X, C>(
    exec: X,
    timeout: Option<Duration>,
    claim_after: Duration,
    claim: C,
    stops: Stops<'_>,
) -> Option<Outcome>
where
    X: Future<Output = Result<Output, ExecError>>,
    C: Future<Output = bool>,
{
    let mut run = Box::pin(async move {
        match timeout {
            Some(t) => tokio::time::timeout(t, exec).await.map_err(|_| ()),
            None => Ok(exec.await),
        }
    });
    let to_outcome = |r: Result<Result<Output, ExecError>, ()>| match r {
        Ok(r) => Outcome::Done(r),
        Err(()) => Outcome::TimedOut,
    };
    // Phase 1: run unclaimed for a moment; most short jobs end here.
    let early = tokio::select! {
        r = &mut run => Some(to_outcome(r)),
        _ = tokio::time::sleep(claim_after) => None,
        _ = stops.user_cancel.cancelled() => Some(Outcome::Canceled),
        _ = stops.hard_stop.cancelled() => Some(Outcome::Released),
        _ = stops.invalid.stop.cancelled() => Some(stops.invalid.outcome()),
    };
    // Phase 2: record the start (fenced), then keep running under the lease. The executor keeps
    // being polled while the claim waits: a progress report of its own may hold the attempt's
    // state (claiming through it), and waiting for that lock without driving the executor
    // would leave both waiting forever.
    let mut claim = std::pin::pin!(claim);
    let phase_two = early.is_none();
    let mut claimed: Option<bool> = None;
    let outcome = match early {
        Some(o) => Some(o),
        None => loop {
            tokio::select! {
                ok = &mut claim, if claimed.is_none() => {
                    claimed = Some(ok);
                    if !ok {
                        break None; // fenced off: the attempt is not ours
                    }
                }
                r = &mut run => break Some(to_outcome(r)),
                _ = stops.user_cancel.cancelled() => break Some(Outcome::Canceled),
                _ = stops.hard_stop.cancelled() => break Some(Outcome::Released),
                _ = stops.invalid.stop.cancelled() => break Some(stops.invalid.outcome()),
            }
        },
    };
    // Dropping the future stops async executors (and releases whatever it held); blocking ones
    // watch `on_end`.
    drop(run);
    stops.on_end.cancel();
    // A claim still in flight finishes before anything is reported; the executor is gone, so
    // the attempt's state is free for it.
    if phase_two && claimed.is_none() {
        claimed = Some(claim.await);
    }
    outcome.filter(|_| claimed != Some(false))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;
    use tokio::time::{sleep, Instant};

    use super::*;

    const CLAIM_AFTER: Duration = Duration::from_millis(25);

    /// The stop switches of one attempt.
    #[derive(Default)]
    struct Switches {
        user_cancel: CancellationToken,
        hard_stop: CancellationToken,
        invalid: InvalidOutput,
        on_end: CancellationToken,
    }

    impl Switches {
        fn stops(&self) -> Stops<'_> {
            Stops {
                user_cancel: &self.user_cancel,
                hard_stop: &self.hard_stop,
                invalid: &self.invalid,
                on_end: &self.on_end,
            }
        }
    }

    /// A switch to pull, and when (ms after the start).
    type Pull = Option<(u64, fn(&Switches))>;

    /// Milliseconds since `start` when something happened.
    #[derive(Default, Debug)]
    struct Log {
        claim_polled: Option<u128>,
        claim_answered: Option<u128>,
        work_finished: Option<u128>,
    }

    /// An executor that works for `d`.
    async fn work(start: Instant, d: Duration, log: Arc<Mutex<Log>>) -> Result<Output, ExecError> {
        sleep(d).await;
        log.lock().unwrap().work_finished = Some(start.elapsed().as_millis());
        Ok(Output {
            output: json!({"ok": true}),
            ..Default::default()
        })
    }

    /// A claim that takes `d` and answers `ours`.
    async fn claim(start: Instant, d: Duration, ours: bool, log: Arc<Mutex<Log>>) -> bool {
        log.lock().unwrap().claim_polled = Some(start.elapsed().as_millis());
        sleep(d).await;
        log.lock().unwrap().claim_answered = Some(start.elapsed().as_millis());
        ours
    }

    /// Runs one attempt: work of `work_for`, a claim of `claim_for` answering `ours`; `pull`
    /// pulls a switch at a time (ms) meanwhile. Returns the outcome, when it came (ms) and the log.
    async fn attempt(
        work_for: Duration,
        timeout: Option<Duration>,
        claim_for: Duration,
        ours: bool,
        pull: Pull,
    ) -> (Option<Outcome>, u128, Log, bool) {
        let start = Instant::now();
        let log = Arc::new(Mutex::new(Log::default()));
        let switches = Switches::default();
        let exec = work(start, work_for, log.clone());
        let claim = claim(start, claim_for, ours, log.clone());
        let puller = async {
            if let Some((at_ms, act)) = pull {
                sleep(Duration::from_millis(at_ms)).await;
                act(&switches);
            }
            std::future::pending::<()>().await
        };
        let outcome = tokio::select! {
            o = supervise(exec, timeout, CLAIM_AFTER, claim, switches.stops()) => o,
            _ = puller => unreachable!(),
        };
        let at = start.elapsed().as_millis();
        let log = std::mem::take(&mut *log.lock().unwrap());
        (outcome, at, log, switches.on_end.is_cancelled())
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_attempt_ends_before_its_start_is_claimed_on_its_own() {
        let (outcome, at, log, ended) = attempt(ms(10), None, ms(5), true, None).await;
        assert!(matches!(outcome, Some(Outcome::Done(Ok(_)))));
        assert_eq!(at, 10);
        assert_eq!(log.claim_polled, None, "the start goes with the outcome");
        assert!(ended);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_attempt_is_claimed_after_claim_after_and_runs_to_its_end() {
        let (outcome, at, log, _) = attempt(ms(5000), None, ms(100), true, None).await;
        assert!(matches!(outcome, Some(Outcome::Done(Ok(_)))));
        assert_eq!(
            (log.claim_polled, log.claim_answered, at),
            (Some(25), Some(125), 5000)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_taken_away_is_stopped_when_its_claim_is_refused() {
        let (outcome, at, log, ended) = attempt(ms(5000), None, ms(50), false, None).await;
        assert!(outcome.is_none(), "fenced off: nothing to report");
        assert_eq!(at, 75);
        assert_eq!(log.work_finished, None, "the executor was dropped");
        assert!(ended, "blocking executors are told to stop");
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_ends_the_attempt_at_its_limit() {
        let (outcome, at, log, _) = attempt(ms(10_000), Some(ms(2000)), ms(10), true, None).await;
        assert!(matches!(outcome, Some(Outcome::TimedOut)));
        assert_eq!(at, 2000);
        assert_eq!(log.work_finished, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_while_the_claim_is_in_flight_is_reported_after_the_claim() {
        let (outcome, at, log, _) = attempt(
            ms(10_000),
            None,
            ms(1000),
            true,
            Some((100, |s: &Switches| s.user_cancel.cancel())),
        )
        .await;
        assert!(matches!(outcome, Some(Outcome::Canceled)));
        assert_eq!(log.claim_answered, Some(1025), "the claim was not dropped");
        assert_eq!(at, 1025);
        assert_eq!(log.work_finished, None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_end_of_the_shutdown_grace_gives_an_unclaimed_attempt_back() {
        let (outcome, at, log, _) = attempt(
            ms(10_000),
            None,
            ms(10),
            true,
            Some((10, |s: &Switches| s.hard_stop.cancel())),
        )
        .await;
        assert!(matches!(outcome, Some(Outcome::Released)));
        assert_eq!((at, log.claim_polled), (10, None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_report_that_cannot_be_stored_fails_the_attempt_with_its_error() {
        let (outcome, at, _, _) = attempt(
            ms(10_000),
            None,
            ms(10),
            true,
            Some((500, |s: &Switches| {
                s.invalid.set(JobError::new(
                    "invalid_output",
                    "progress.message has a NUL",
                ))
            })),
        )
        .await;
        match outcome {
            Some(Outcome::Done(Err(ExecError::Abort(e)))) => {
                assert_eq!(e.error_type, "invalid_output");
                assert_eq!(e.message, "progress.message has a NUL");
            }
            _ => panic!("expected an invalid_output failure"),
        }
        assert_eq!(at, 500);
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_ends_while_its_claim_is_refused_reports_nothing() {
        let (outcome, at, log, ended) = attempt(ms(50), None, ms(100), false, None).await;
        assert!(
            outcome.is_none(),
            "the attempt was not ours: its result is discarded"
        );
        assert_eq!(
            (log.work_finished, log.claim_answered, at),
            (Some(50), Some(125), 125)
        );
        assert!(ended);
    }

    /// The runtime's claim takes the attempt's state, which the executor may hold (a progress
    /// report claims through it). On a cancel the executor is dropped, releasing the state,
    /// before the claim in flight is awaited: awaiting first would wait forever.
    #[tokio::test(start_paused = true)]
    async fn a_cancel_drops_the_executor_before_awaiting_the_claim_it_blocks() {
        let state = Arc::new(tokio::sync::Mutex::new(()));
        let switches = Switches::default();
        let start = Instant::now();
        let exec = {
            let state = state.clone();
            async move {
                let _held = state.lock().await;
                sleep(ms(10_000)).await;
                Ok(Output {
                    output: json!(null),
                    ..Default::default()
                })
            }
        };
        let answered = Mutex::new(None);
        let claim = async {
            let _state = state.lock().await;
            *answered.lock().unwrap() =
                Some((start.elapsed().as_millis(), switches.on_end.is_cancelled()));
            true
        };
        let cancel = async {
            sleep(ms(100)).await;
            switches.user_cancel.cancel();
            std::future::pending::<()>().await
        };
        let outcome = tokio::time::timeout(ms(60_000), async {
            tokio::select! {
                o = supervise(exec, None, CLAIM_AFTER, claim, switches.stops()) => o,
                _ = cancel => unreachable!(),
            }
        })
        .await
        .expect("the claim was awaited while the executor still held the state");
        assert!(matches!(outcome, Some(Outcome::Canceled)));
        assert_eq!(
            *answered.lock().unwrap(),
            Some((100, true)),
            "the claim answered once the executor was gone and told to end"
        );
    }
}
