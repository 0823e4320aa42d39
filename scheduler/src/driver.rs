//! The one driver of the scheduler's periodic loops: run a step; while it reports work done
//! (a full page, a tick fired) run it again at once, else wait a period; stop when told. The
//! steps themselves (`promote_due`, `reap`, `tick_once`, …) are plain functions tested
//! in-process; this loop is tested on a paused clock.

use std::time::Duration;

use capibara_shared::store;
use tokio_util::sync::CancellationToken;

/// Run `step` until `stop`: again at once after a step that did something (returned n > 0),
/// after `period` otherwise (an error included).
pub(crate) async fn every<F, Fut>(period: Duration, stop: &CancellationToken, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<usize, store::StoreError>>,
{
    loop {
        let more = match f().await {
            Ok(n) => n > 0,
            Err(e) => {
                tracing::debug!(error = %e, "housekeeping step failed");
                false
            }
        };
        if stop.is_cancelled() {
            return;
        }
        if !more {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::time::{Duration, Instant};

    use super::*;

    /// The loop driver on a paused clock: a step that did something (the promoter says so only
    /// for a full page) runs again at once, an idle or failed step waits one period, and a stop
    /// ends the loop after the step that sees it.
    #[tokio::test(start_paused = true)]
    async fn a_loop_runs_again_at_once_while_there_is_a_backlog_and_waits_a_period_otherwise() {
        let period = Duration::from_secs(2);
        let start = Instant::now();
        let stop = CancellationToken::new();
        // What each step returns, in order; after the last the loop is stopped.
        let script: Vec<Result<usize, store::StoreError>> = vec![
            Ok(500),
            Ok(500),
            Ok(0),
            Err(store::StoreError::Unavailable("down".into())),
            Ok(3),
            Ok(0),
        ];
        let steps = script.len();
        let script = Arc::new(Mutex::new(script.into_iter()));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let driver = every(period, &stop, || {
            calls.lock().unwrap().push(start.elapsed());
            let mut left = script.lock().unwrap();
            let next = left.next();
            if left.as_slice().is_empty() && next.is_some() {
                stop.cancel();
            }
            async move { next.unwrap_or(Ok(0)) }
        });
        tokio::time::timeout(Duration::from_secs(60), driver)
            .await
            .expect("the loop ends once stopped");
        let at: Vec<u64> = calls.lock().unwrap().iter().map(|d| d.as_secs()).collect();
        // 500, 500: again at once; 0: wait; error: wait; 3: again at once; 0: stopped.
        assert_eq!(at, [0, 0, 0, 2, 4, 4], "seconds of each step");
        assert_eq!(at.len(), steps);
    }
}
