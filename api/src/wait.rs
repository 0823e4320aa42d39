//! Waiting for a job or a run to end (`Prefer: wait`), woken by stream hints.

use std::{future::Future, time::Duration};

use capibara_shared::{domain::job::Job, store};
use tokio::time::Instant;
use uuid::Uuid;

use crate::{error::ApiError, AppState};

/// Fallback re-read interval when no hint arrives.
const POLL: Duration = Duration::from_millis(500);

/// Re-read stream `id`'s row with `load` on every hint until `done` holds or `timeout` passes;
/// returns the last row read (None: it does not exist).
pub async fn until<T, F, Fut>(
    state: &AppState,
    id: Uuid,
    timeout: Duration,
    load: F,
    done: fn(&T) -> bool,
) -> Result<Option<T>, ApiError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Option<T>, store::StoreError>>,
{
    let deadline = Instant::now() + timeout;
    let notify = state.watch.watch(id);
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let Some(row) = load().await? else {
            return Ok(None);
        };
        let now = Instant::now();
        if done(&row) || now >= deadline {
            return Ok(Some(row));
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep((deadline - now).min(POLL)) => {}
        }
    }
}

/// The job once terminal, or its latest state when `timeout` passes (never cancels it).
pub async fn until_terminal(
    state: &AppState,
    namespace: &str,
    id: Uuid,
    timeout: Duration,
) -> Result<Option<Job>, ApiError> {
    until(
        state,
        id,
        timeout,
        || store::jobs::get(&state.store.pool, namespace, id),
        |j: &Job| j.status.is_terminal(),
    )
    .await
}
