//! Waiting for a job to finish (`Prefer: wait`), woken by stream hints.

use std::time::Duration;

use capibara_shared::{domain::job::Job, store};
use tokio::time::Instant;
use uuid::Uuid;

use crate::{error::ApiError, AppState};

/// Fallback re-read interval when no hint arrives.
const POLL: Duration = Duration::from_millis(500);

/// The job once terminal, or its latest state when `timeout` passes (never cancels it).
pub async fn until_terminal(
    state: &AppState,
    namespace: &str,
    id: Uuid,
    timeout: Duration,
) -> Result<Option<Job>, ApiError> {
    let deadline = Instant::now() + timeout;
    let notify = state.watch.watch(id);
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let job = store::jobs::get(&state.store.pool, namespace, id).await?;
        let Some(job) = job else { return Ok(None) };
        let now = Instant::now();
        if job.status.is_terminal() || now >= deadline {
            return Ok(Some(job));
        }
        let nap = (deadline - now).min(POLL);
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(nap) => {}
        }
    }
}
