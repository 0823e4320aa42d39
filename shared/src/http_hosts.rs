//! The circuit breaker of each (namespace, host) that `http.request` calls (docs/http.md,
//! decision in docs/http-design.md), and of each LLM provider (docs/llm-design.md): shared by
//! every worker through Redis, each transition one Lua script. After `failures` consecutive failures the breaker opens for `cooldown`: calls
//! are refused without being sent. Then one call goes through (half-open); its success closes
//! the breaker, its failure opens it again. Redis holds nothing durable here: a Redis that
//! restarts empty forgets every breaker, which closes them.

use std::{sync::LazyLock, time::Duration};

use chrono::{DateTime, TimeZone, Utc};
use redis::Script;
use serde::Serialize;

use crate::redis_conn::RedisConn;

/// Breakers are forgotten this long after their last call.
const TTL_S: u64 = 86_400;

const ALLOW: &str = r#"
local now = tonumber(ARGV[1])
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'open' then
  local reopen = tonumber(redis.call('HGET', KEYS[1], 'open_until'))
  if now < reopen then return reopen - now end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe_until', now + tonumber(ARGV[2]))
  return 0
elseif state == 'half_open' then
  local probe = tonumber(redis.call('HGET', KEYS[1], 'probe_until') or '0')
  if now < probe then return probe - now end
  redis.call('HSET', KEYS[1], 'probe_until', now + tonumber(ARGV[2]))
end
return 0
"#;

const RECORD: &str = r#"
local now = tonumber(ARGV[2])
redis.call('SADD', KEYS[2], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[6])
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if ARGV[1] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'last_success_at', now)
  if state ~= 'closed' then return 'closed' end
  return ''
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('HSET', KEYS[1], 'last_failure_at', now)
if state == 'half_open' or (state == 'closed' and failures >= tonumber(ARGV[3])) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'open_until', now + tonumber(ARGV[4]),
             'opened_at', now)
  return 'open'
end
if state == 'closed' then redis.call('HSET', KEYS[1], 'state', 'closed') end
return ''
"#;

/// GCRA: reserve the host's next call slot when it is at most ARGV[4] ms away (returns
/// {1, wait}), else reserve nothing (returns {0, wait}). `rate_tat` is the theoretical arrival
/// time of the next call; a call may go `burst` intervals before it.
const TAKE: &str = r#"
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tat = tonumber(redis.call('HGET', KEYS[1], 'rate_tat') or '0')
if tat < now then tat = now end
local next_tat = tat + interval
local wait = math.ceil(next_tat - burst * interval - now)
if wait < 0 then wait = 0 end
if wait > tonumber(ARGV[4]) then return {0, wait} end
redis.call('HSET', KEYS[1], 'rate_tat', string.format('%.3f', next_tat),
           'rate_interval_ms', ARGV[2], 'rate_burst', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('SADD', KEYS[2], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {1, wait}
"#;

static ALLOW_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ALLOW));
static TAKE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(TAKE));
static RECORD_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RECORD));

/// The breakers of every host, and their settings.
#[derive(Clone)]
pub struct HostBreakers {
    conn: RedisConn,
    prefix: String,
    /// What the breakers guard: `http` (hosts `http.request` calls) or `llm` (LLM providers).
    scope: &'static str,
    /// Consecutive failures that open a breaker.
    pub failures: u32,
    /// How long an open breaker refuses calls before it lets one through.
    pub cooldown: Duration,
}

/// A breaker as `GET /v1/http/hosts` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct HostState {
    pub host: String,
    /// `closed` (calls go through), `open` (refused until `open_until`), or `half_open` (one
    /// call is trying the host).
    pub state: String,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_until: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failure_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_success_at: Option<DateTime<Utc>>,
    /// The last call's error, while the last call failed (LLM providers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// How long the last call took (LLM providers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_latency_ms: Option<f64>,
    /// The rate limit the last rate-limited call gave (`http.request`'s `rate_limit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateState>,
}

/// A host's token bucket, as its calls left it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RateState {
    /// Time between two calls.
    pub interval_ms: f64,
    /// Calls that may go back to back.
    pub burst: u32,
    /// When the next call may go, while calls are spaced out (absent: now).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_call_at: Option<DateTime<Utc>>,
}

/// What the host's token bucket says about a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// A slot is reserved: go after this wait (zero: now).
    Go(Duration),
    /// No slot within the longest wait in place: try again after this long.
    Later(Duration),
}

/// What [`HostBreakers::record`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
}

/// The hash tag of a namespace's breakers of `scope`.
fn tag(prefix: &str, scope: &str, namespace: &str) -> String {
    format!("{{{prefix}:{scope}:{namespace}}}")
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn at(ms: Option<i64>) -> Option<DateTime<Utc>> {
    ms.and_then(|ms| Utc.timestamp_millis_opt(ms).single())
}

impl HostBreakers {
    pub fn new(conn: RedisConn, prefix: &str, failures: u32, cooldown: Duration) -> Self {
        HostBreakers {
            conn,
            prefix: prefix.to_string(),
            scope: "http",
            failures: failures.max(1),
            cooldown,
        }
    }

    /// The same breakers for another kind of target (`llm`: LLM providers, by name), in their
    /// own keys.
    pub fn scoped(mut self, scope: &'static str) -> Self {
        self.scope = scope;
        self
    }

    /// A namespace's breakers share a hash tag of their own (`{<prefix>:<scope>:<namespace>}`):
    /// each script and `list`'s pipeline stays on one slot of a cluster, and the namespaces
    /// spread over its masters.
    fn tag(&self, namespace: &str) -> String {
        tag(&self.prefix, self.scope, namespace)
    }

    fn key(&self, namespace: &str, host: &str) -> String {
        format!("{}:host:{host}", self.tag(namespace))
    }

    fn set_key(&self, namespace: &str) -> String {
        format!("{}:hosts", self.tag(namespace))
    }

    /// Whether a call to `host` may go now: `Err(wait)` while the breaker is open (or another
    /// call is the half-open probe, whose `timeout` bounds how long it holds the probe).
    pub async fn allow(
        &self,
        namespace: &str,
        host: &str,
        timeout: Duration,
    ) -> Result<Result<(), Duration>, redis::RedisError> {
        let wait: i64 = ALLOW_SCRIPT
            .key(self.key(namespace, host))
            .arg(now_ms())
            .arg(timeout.as_millis() as i64)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(if wait > 0 {
            Err(Duration::from_millis(wait as u64))
        } else {
            Ok(())
        })
    }

    /// Take a slot of `host`'s token bucket (`interval_ms` between calls, `burst` back to back),
    /// reserving it if it is at most `max_wait` away.
    pub async fn take(
        &self,
        namespace: &str,
        host: &str,
        interval_ms: f64,
        burst: u32,
        max_wait: Duration,
    ) -> Result<Take, redis::RedisError> {
        let (reserved, wait): (i64, i64) = TAKE_SCRIPT
            .key(self.key(namespace, host))
            .key(self.set_key(namespace))
            .arg(now_ms())
            .arg(format!("{interval_ms:.3}"))
            .arg(burst.max(1))
            .arg(max_wait.as_millis() as i64)
            .arg(TTL_S)
            .arg(host)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let wait = Duration::from_millis(wait.max(0) as u64);
        Ok(if reserved == 1 {
            Take::Go(wait)
        } else {
            Take::Later(wait)
        })
    }

    /// Record the outcome of a call to `host` (`ok`: it answered, not with 408, 429 or 5xx).
    pub async fn record(
        &self,
        namespace: &str,
        host: &str,
        ok: bool,
    ) -> Result<Option<Transition>, redis::RedisError> {
        let changed: String = RECORD_SCRIPT
            .key(self.key(namespace, host))
            .key(self.set_key(namespace))
            .arg(if ok { "1" } else { "0" })
            .arg(now_ms())
            .arg(self.failures)
            .arg(self.cooldown.as_millis() as i64)
            .arg(host)
            .arg(TTL_S)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(match changed.as_str() {
            "open" => Some(Transition::Opened),
            "closed" => Some(Transition::Closed),
            _ => None,
        })
    }

    /// Note the last call's error (or none) and duration beside its breaker (after
    /// [`HostBreakers::record`]).
    pub async fn note(
        &self,
        namespace: &str,
        host: &str,
        error: Option<&str>,
        latency_ms: f64,
    ) -> Result<(), redis::RedisError> {
        let error: String = error.unwrap_or_default().chars().take(500).collect();
        redis::cmd("HSET")
            .arg(self.key(namespace, host))
            .arg("last_error")
            .arg(error)
            .arg("last_latency_ms")
            .arg(format!("{latency_ms:.1}"))
            .query_async::<()>(&mut self.conn.clone())
            .await
    }

    /// The breakers of `namespace`'s hosts, by host name.
    pub async fn list(&self, namespace: &str) -> Result<Vec<HostState>, redis::RedisError> {
        let mut conn = self.conn.clone();
        let mut hosts: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.set_key(namespace))
            .query_async(&mut conn)
            .await?;
        hosts.sort();
        hosts.truncate(1000);
        // Every host's hash in one round trip.
        let mut pipe = redis::pipe();
        for host in &hosts {
            pipe.cmd("HGETALL").arg(self.key(namespace, host));
        }
        let all: Vec<std::collections::HashMap<String, String>> =
            pipe.query_async(&mut conn).await?;
        let now = now_ms();
        let mut out = Vec::with_capacity(hosts.len());
        for (host, fields) in hosts.into_iter().zip(all) {
            if fields.is_empty() {
                continue;
            }
            let num = |k: &str| fields.get(k).and_then(|v| v.parse::<i64>().ok());
            let float = |k: &str| fields.get(k).and_then(|v| v.parse::<f64>().ok());
            let rate_limit = float("rate_interval_ms").map(|interval_ms| {
                let burst = num("rate_burst").unwrap_or(1).max(1);
                // The next call may go `burst - 1` intervals before the stored arrival time.
                let next = float("rate_tat").map(|t| (t - (burst - 1) as f64 * interval_ms) as i64);
                RateState {
                    interval_ms,
                    burst: burst as u32,
                    next_call_at: at(next.filter(|n| *n > now)),
                }
            });
            let mut state = fields
                .get("state")
                .cloned()
                .unwrap_or_else(|| "closed".into());
            let open_until = num("open_until").filter(|_| state != "closed");
            // An open breaker whose cool-down is over lets the next call through.
            if state == "open" && open_until.is_some_and(|u| u <= now) {
                state = "half_open".into();
            }
            out.push(HostState {
                host,
                state,
                consecutive_failures: num("failures").unwrap_or(0).max(0) as u32,
                open_until: at(open_until),
                last_failure_at: at(num("last_failure_at")),
                last_success_at: at(num("last_success_at")),
                last_error: fields.get("last_error").filter(|e| !e.is_empty()).cloned(),
                last_latency_ms: fields.get("last_latency_ms").and_then(|v| v.parse().ok()),
                rate_limit,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::tag;
    use crate::redis_conn::key_slot;

    #[test]
    fn a_namespaces_breakers_share_a_slot_and_namespaces_spread() {
        let t = tag("capibara", "http", "acme");
        assert_eq!(
            key_slot(&format!("{t}:host:api.example.com")),
            key_slot(&format!("{t}:hosts"))
        );
        let thirds: std::collections::BTreeSet<u16> = (0..30)
            .map(|i| key_slot(&tag("capibara", "http", &format!("ns-{i}"))) / 5462)
            .collect();
        assert_eq!(
            thirds.len(),
            3,
            "30 namespaces land on all three masters' slot ranges"
        );
    }
}
