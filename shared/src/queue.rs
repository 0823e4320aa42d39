//! The Redis dispatch structure (owned by Capibara; see docs/queue.md).
//!
//! One sorted set per queue, `{<prefix>}:queue:<name>`, member = job id, score =
//! `enqueued_at_ms - priority head start` ([`crate::domain::job::Priority::head_start_ms`]).
//! Lowest score is served first, so higher priorities go first but an old low-priority job
//! eventually beats new critical ones. Pushes are `ZADD NX` (idempotent: the relay can re-push
//! freely); pops are atomic (`BZPOPMIN` when idle, a Lua multi-pop when busy).
//!
//! Redis holds no state of record: a popped job that never started stays `queued` in Postgres and
//! is re-pushed by the relay; the `epoch` key tells the relay that Redis lost its data.

use std::time::Duration;

use redis::{aio::ConnectionManager, AsyncCommands, Script};
use uuid::Uuid;

use crate::store::dispatch::DispatchEntry;

/// Redis errors, kept opaque at this boundary.
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct QueueError(#[from] redis::RedisError);

const POP_SCRIPT: &str = r#"
local count = tonumber(ARGV[1])
local best = {}
for _, key in ipairs(KEYS) do
  local items = redis.call('ZRANGE', key, 0, count - 1, 'WITHSCORES')
  for j = 1, #items, 2 do
    best[#best + 1] = {items[j], tonumber(items[j + 1]), key}
  end
end
table.sort(best, function(a, b) return a[2] < b[2] end)
local out = {}
for i = 1, math.min(count, #best) do
  redis.call('ZREM', best[i][3], best[i][1])
  out[#out + 1] = best[i][1]
end
return out
"#;

/// Handle to the dispatch queues; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    pop: Script,
}

fn manager_config() -> redis::aio::ConnectionManagerConfig {
    redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(2))
        .set_response_timeout(Duration::from_secs(5))
        .set_number_of_retries(2)
        .set_max_delay(500)
}

impl Queue {
    /// Connect; `prefix` namespaces every key (tests use one per test).
    pub async fn connect(url: &str, prefix: &str) -> Result<Queue, QueueError> {
        let client = redis::Client::open(url)?;
        let conn = client
            .get_connection_manager_with_config(manager_config())
            .await?;
        Ok(Queue {
            client,
            conn,
            prefix: prefix.to_string(),
            pop: Script::new(POP_SCRIPT),
        })
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The shared connection, for other Redis state under this prefix
    /// ([`crate::http_hosts`]).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// What every key of this deployment starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key of one queue. The `{prefix}` hash tag keeps all keys in one cluster slot.
    pub fn queue_key(&self, queue: &str) -> String {
        format!("{{{}}}:queue:{}", self.prefix, queue)
    }

    fn epoch_key(&self) -> String {
        format!("{{{}}}:epoch", self.prefix)
    }

    /// Channel carrying ids of streams that just changed.
    pub fn hints_channel(&self) -> String {
        format!("{{{}}}:hints", self.prefix)
    }

    /// Channel carrying ids of running jobs whose cancel was requested.
    pub fn cancel_channel(&self) -> String {
        format!("{{{}}}:cancel", self.prefix)
    }

    /// Channel carrying ids of API keys just revoked (every API process drops them from its
    /// key cache).
    pub fn revoked_keys_channel(&self) -> String {
        format!("{{{}}}:revoked-keys", self.prefix)
    }

    /// Add entries (idempotent). Also marks the epoch so a wipe can be detected.
    pub async fn push(&self, entries: &[DispatchEntry]) -> Result<(), QueueError> {
        let mut pipe = redis::pipe();
        self.add_push(&mut pipe, entries);
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// The commands of [`Queue::push`], added to `pipe`.
    fn add_push(&self, pipe: &mut redis::Pipeline, entries: &[DispatchEntry]) {
        pipe.cmd("SET")
            .arg(self.epoch_key())
            .arg(1)
            .arg("NX")
            .ignore();
        for e in entries {
            pipe.cmd("ZADD")
                .arg(self.queue_key(&e.queue))
                .arg("NX")
                .arg(e.score)
                .arg(e.job_id.to_string())
                .ignore();
        }
    }

    /// The command of [`Queue::publish_hints`], added to `pipe`.
    fn add_hints(&self, pipe: &mut redis::Pipeline, streams: &[Uuid]) {
        let payload = streams
            .iter()
            .map(Uuid::to_string)
            .collect::<Vec<_>>()
            .join(",");
        pipe.cmd("PUBLISH")
            .arg(self.hints_channel())
            .arg(payload)
            .ignore();
    }

    /// The entries Redis does not hold (lost in a wipe, never pushed, or popped by a worker that
    /// died before starting the job).
    pub async fn missing(
        &self,
        entries: &[DispatchEntry],
    ) -> Result<Vec<DispatchEntry>, QueueError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for e in entries {
            pipe.cmd("ZSCORE")
                .arg(self.queue_key(&e.queue))
                .arg(e.job_id.to_string());
        }
        let mut conn = self.conn.clone();
        let scores: Vec<Option<f64>> = pipe.query_async(&mut conn).await?;
        Ok(entries
            .iter()
            .zip(scores)
            .filter(|(_, s)| s.is_none())
            .map(|(e, _)| e.clone())
            .collect())
    }

    /// Pop up to `max` jobs across `queues`, lowest score first, without blocking.
    pub async fn pop(&self, queues: &[String], max: usize) -> Result<Vec<Uuid>, QueueError> {
        let mut inv = self.pop.prepare_invoke();
        for q in queues {
            inv.key(self.queue_key(q));
        }
        inv.arg(max);
        let mut conn = self.conn.clone();
        let ids: Vec<String> = inv.invoke_async(&mut conn).await?;
        Ok(ids.iter().filter_map(|s| s.parse().ok()).collect())
    }

    /// A connection for blocking pops (a blocked command stalls its connection, so each fetcher
    /// has its own).
    pub async fn blocking_connection(&self) -> Result<ConnectionManager, QueueError> {
        Ok(self
            .client
            .get_connection_manager_with_config(manager_config())
            .await?)
    }

    /// Wait up to `timeout` for one job across `queues`.
    pub async fn blocking_pop(
        &self,
        conn: &mut ConnectionManager,
        queues: &[String],
        timeout: Duration,
    ) -> Result<Option<Uuid>, QueueError> {
        let keys: Vec<String> = queues.iter().map(|q| self.queue_key(q)).collect();
        let res: Option<(String, String, f64)> = redis::cmd("BZPOPMIN")
            .arg(&keys)
            .arg(timeout.as_secs_f64())
            .query_async(conn)
            .await?;
        Ok(res.and_then(|(_, member, _)| member.parse().ok()))
    }

    /// Remove a job from its queue (after cancel); harmless if absent.
    pub async fn remove(&self, queue: &str, job_id: Uuid) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        conn.zrem::<_, _, ()>(self.queue_key(queue), job_id.to_string())
            .await?;
        Ok(())
    }

    /// Whether Redis still holds the epoch mark (false after a wipe or on a fresh Redis).
    pub async fn epoch_present(&self) -> Result<bool, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn.exists(self.epoch_key()).await?)
    }

    /// Best-effort notice that streams changed (waiters fall back to polling if it is lost).
    pub async fn publish_hints(&self, streams: &[Uuid]) {
        let mut pipe = redis::pipe();
        self.add_hints(&mut pipe, streams);
        let mut conn = self.conn.clone();
        if let Err(e) = pipe.query_async::<()>(&mut conn).await {
            tracing::debug!(error = %e, "publishing stream hints failed");
        }
    }

    /// Tell every API process that a key was revoked (they also forget cached keys after a
    /// few seconds, so a lost message delays the revocation, never loses it).
    pub async fn publish_key_revoked(&self, key_id: Uuid) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        conn.publish::<_, _, ()>(self.revoked_keys_channel(), key_id.to_string())
            .await?;
        Ok(())
    }

    /// Tell workers that a running job's cancel was requested.
    pub async fn publish_cancel(&self, job_id: Uuid) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        conn.publish::<_, _, ()>(self.cancel_channel(), job_id.to_string())
            .await?;
        Ok(())
    }

    /// Liveness check for `/readyz`.
    pub async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok(())
    }
}

/// After each commit: push what became ready (the fast path; the relay sweeps what this misses)
/// and publish the changed streams as hints.
impl crate::store::append::CommitListener for Queue {
    fn committed<'a>(
        &'a self,
        dispatched: &'a [DispatchEntry],
        streams: &'a [Uuid],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        // One round trip: the pushes, then the hints (a waiter woken by a hint finds its job
        // in the queue already).
        Box::pin(async move {
            let mut pipe = redis::pipe();
            if !dispatched.is_empty() {
                self.add_push(&mut pipe, dispatched);
            }
            if !streams.is_empty() {
                self.add_hints(&mut pipe, streams);
            }
            let mut conn = self.conn.clone();
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                tracing::warn!(error = %e, dispatched = dispatched.len(),
                    "after-commit push to Redis failed; the relay will dispatch again");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::job::Priority;

    fn score(p: Priority, secs_ago: i64) -> i64 {
        let at = chrono::Utc::now() - chrono::Duration::seconds(secs_ago);
        DispatchEntry::new(Uuid::now_v7(), "default", "q", p, at).score
    }

    #[test]
    fn higher_priorities_are_served_first_among_jobs_of_similar_age() {
        let mut jobs = [
            (score(Priority::Low, 0), "low"),
            (score(Priority::Critical, 0), "critical"),
            (score(Priority::Normal, 0), "normal"),
            (score(Priority::High, 0), "high"),
        ];
        jobs.sort();
        assert_eq!(jobs.map(|(_, p)| p), ["critical", "high", "normal", "low"]);
    }

    #[test]
    fn a_low_priority_job_that_waited_long_enough_beats_new_critical_work() {
        let old_low = score(Priority::Low, 301);
        let new_critical = score(Priority::Critical, 0);
        assert!(old_low < new_critical, "no priority starves");
        let fresh_low = score(Priority::Low, 10);
        assert!(fresh_low > new_critical);
    }
}
