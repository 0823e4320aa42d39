//! The Redis dispatch structure (owned by Capibara; see docs/queue.md and
//! docs/flow-control.md).
//!
//! Per lane a ring of groups (`{<prefix>}:ring:<lane>`), per group a sorted set of job ids
//! (`{<prefix>}:g:<lane>:<group>`, score = `enqueued_at_ms - priority head start`,
//! [`crate::domain::job::Priority::head_start_ms`]). A pop (one Lua script) takes the group
//! whose turn comes first, checks its pauses, ordering key and limits, and hands out its head.
//! Pushes are `ZADD NX` (idempotent: the relay can re-push freely) plus a wake token for blocked
//! fetchers.
//!
//! Redis holds no state of record: a popped job that never started stays `queued` in Postgres and
//! is re-pushed by the relay; the `epoch` key tells the relay that Redis lost its data.
//!
//! The dispatch keys of a namespace share one hash tag, its shard's (`{<prefix>}` with one
//! shard, the default; `{<prefix>:<s>/<n>}` with `n` shards, a namespace in shard
//! FNV-1a(namespace) mod `n`), so on a Redis Cluster each script and each pipeline here
//! touches one slot: the pop checks and takes limits, ordering keys and pauses — shared by the
//! lanes of a namespace, never across namespaces — in one atomic step. Wake lists and channels
//! keep the deployment's tag `{<prefix>}`: one `BLPOP` waits on every lane of a fetcher
//! (docs/redis-cluster.md, "How keys are tagged").

use std::{collections::HashMap, time::Duration};

use redis::{AsyncCommands, Script};
use uuid::Uuid;

use crate::{
    domain::{
        job::Job,
        limit::{Group, Limit},
    },
    redis_conn::{Redis, RedisConn},
    store::{
        append::Changed,
        dispatch::{DispatchEntry, Release, CARRY_TTL_MS},
    },
};

/// No stream changed: a push or release outside a commit.
const NO_HINTS: Changed<'static> = Changed {
    streams: &[],
    runs: false,
};

/// The group an entry waits in; rows written before groups existed wait in their namespace's.
fn group_id(e: &DispatchEntry) -> String {
    if !e.group.is_empty() {
        return e.group.clone();
    }
    Group {
        ns: e.namespace.clone(),
        kind: String::new(),
        queue: e.queue.clone(),
        ord: None,
        lim: Vec::new(),
    }
    .id()
}

/// The dispatch shard of a namespace among `shards`: FNV-1a of its name (stable across
/// processes and releases).
pub fn shard_of(namespace: &str, shards: u16) -> u16 {
    if shards <= 1 {
        return 0;
    }
    (fnv1a(namespace) % u64::from(shards)) as u16
}

/// 64-bit FNV-1a.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What the dispatch keys of shard `s` of `shards` start with: the deployment's tag
/// `{prefix}` when there is one shard (key names as before shards existed), else
/// `{prefix:s/shards}` — the count is part of the name, so a deployment that changes it starts
/// on fresh keys (the relay re-pushes from Postgres, as after a wipe) instead of reading
/// another layout's.
pub fn shard_tag(prefix: &str, s: u16, shards: u16) -> String {
    if shards <= 1 {
        format!("{{{prefix}}}")
    } else {
        format!("{{{prefix}:{s}/{shards}}}")
    }
}

/// The namespace of a released job (from its group, which names it).
fn release_namespace(r: &Release) -> String {
    serde_json::from_str::<Group>(&r.group)
        .map(|g| g.ns)
        .unwrap_or_default()
}

/// What the queue keeps of a limit: what its scripts read (`max`; `ms` and `burst` of a rate)
/// and the whole limit, from which every process learns how to group jobs
/// ([`crate::flow::refresh`]).
fn limit_config(limit: &Limit) -> serde_json::Value {
    let mut c = serde_json::Map::new();
    if let Some(m) = limit.definition.max_running {
        c.insert("max".into(), m.into());
    }
    if let Some(r) = &limit.definition.rate {
        c.insert("ms".into(), r.interval_ms().into());
        c.insert("burst".into(), r.burst.unwrap_or(1).into());
    }
    c.insert(
        "limit".into(),
        serde_json::to_value(limit).expect("a limit serializes"),
    );
    serde_json::Value::Object(c)
}

/// Redis errors, kept opaque at this boundary.
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct QueueError(#[from] redis::RedisError);

impl QueueError {
    /// Redis did not answer (refused, reset, timed out), as opposed to a bad URL or command.
    pub fn is_unreachable(&self) -> bool {
        let r = &self.0;
        r.is_io_error() || r.is_connection_refusal() || r.is_timeout() || r.is_connection_dropped()
    }
}

/// Pop up to `ARGV[2]` jobs from the lanes whose rings are `KEYS` (lane names in `ARGV[3..]`),
/// taking turns between groups and checking each group's pauses, ordering key and limits before
/// handing out its head. Returns the ms until the next rate-delayed group is due (-1: none),
/// then for each job its id and the copy of the job that rode with its entry (taken off; empty
/// when none: [`crate::store::dispatch::carried`]). A wait recorded for a group's head (it
/// becomes a `JobWaiting` event, a new version of the job) drops the head's copy, which would
/// no longer be the job. See docs/flow-control-design.md.
const POP_SCRIPT: &str = r#"
local P = ARGV[1]
local want = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lanes = {}
for i = 1, #KEYS do lanes[i] = ARGV[2 + i] end
local next_due = -1
local function due_in(d)
  if next_due < 0 or d < next_due then next_due = d end
end
for i, ring in ipairs(KEYS) do
  local dk = P .. ':delayed:' .. lanes[i]
  -- The first entry says whether any is due: most lanes have none, and read once.
  local nd = redis.call('ZRANGE', dk, 0, 0, 'WITHSCORES')
  if nd[2] and tonumber(nd[2]) <= now then
    local due = redis.call('ZRANGEBYSCORE', dk, '-inf', now)
    for _, g in ipairs(due) do
      redis.call('ZADD', ring, 'NX', now, g)
      redis.call('ZREM', dk, g)
    end
    nd = redis.call('ZRANGE', dk, 0, 0, 'WITHSCORES')
  end
  if nd[2] then due_in(tonumber(nd[2]) - now) end
end
local cfgs = {}
local function cfg(ns, name)
  local k = ns .. '/' .. name
  if cfgs[k] == nil then
    local raw = redis.call('HGET', P .. ':limits', k)
    cfgs[k] = raw and cjson.decode(raw) or false
  end
  return cfgs[k]
end
-- Whether any group has a wait recorded: when none has, a taken head has none to clear.
local waits_recorded = redis.call('EXISTS', P .. ':lastwait') == 1
local function waited(lane, gid, head, w)
  local mark = head .. '|' .. w.reason .. '|' .. (w.limit or w.target or w.key or '')
  local field = lane .. '\n' .. gid
  if redis.call('HGET', P .. ':lastwait', field) ~= mark then
    redis.call('HSET', P .. ':lastwait', field, mark)
    waits_recorded = true
    redis.call('DEL', P .. ':body:' .. head)
    w.job = head
    w.at_ms = now
    redis.call('RPUSH', P .. ':waits', cjson.encode(w))
    redis.call('LTRIM', P .. ':waits', -10000, -1)
  end
end
local function park(ring, lane, gid, blocker, head, w)
  redis.call('ZREM', ring, gid)
  redis.call('SADD', P .. ':parked:' .. blocker, lane .. '\n' .. gid)
  redis.call('SADD', P .. ':parkedsets', P .. ':parked:' .. blocker)
  waited(lane, gid, head, w)
end
-- Each ring's first group, read again only for the ring an iteration changed: every write of
-- an iteration (take, park, delay, drop an empty group) is to the ring it picked. A group's
-- decoded name and its pause flags are read once per call: nothing here writes them.
local heads = {}
local function head_of(i)
  local f = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  heads[i] = f[1] and {f[1], tonumber(f[2])} or false
end
for i = 1, #KEYS do head_of(i) end
local groups = {}
local function group(gid)
  local e = groups[gid]
  if e == nil then
    local g = cjson.decode(gid)
    local fields = {'queue:' .. g.ns .. '/' .. g.queue, 'kind:' .. g.ns .. '/' .. g.kind}
    for _, l in ipairs(g.lim or {}) do fields[#fields + 1] = 'key:' .. g.ns .. '/' .. l[1] .. '/' .. l[2] end
    e = {g, fields, redis.call('HMGET', P .. ':paused', unpack(fields))}
    groups[gid] = e
  end
  return e[1], e[2], e[3]
end
local out, taken = {}, 0
local budget = want + 64
while taken < want and budget > 0 do
  budget = budget - 1
  local bi, gid, bscore = nil, nil, nil
  for i = 1, #KEYS do
    local f = heads[i]
    if f and (bscore == nil or f[2] < bscore) then
      bi, gid, bscore = i, f[1], f[2]
    end
  end
  if not bi then break end
  local ring, lane = KEYS[bi], lanes[bi]
  local gk = P .. ':g:' .. lane .. ':' .. gid
  local h = redis.call('ZRANGE', gk, 0, 0)
  if not h[1] then
    redis.call('ZREM', ring, gid)
  else
    local head = h[1]
    local g, fields, pv = group(gid)
    local ns = g.ns
    local lim = g.lim or {}
    local blocked = false
    for i = 1, #fields do
      if pv[i] then
        park(ring, lane, gid, 'pause:' .. fields[i], head, {reason = 'paused', target = fields[i]})
        blocked = true
        break
      end
    end
    if not blocked and g.ord then
      local ok = P .. ':ord:' .. ns .. '/' .. g.ord
      if not redis.call('ZSCORE', ok, head) and redis.call('ZCARD', ok) > 0 then
        local holder = redis.call('ZRANGE', ok, 0, 0)[1]
        park(ring, lane, gid, 'ord:' .. ns .. '/' .. g.ord, head,
          {reason = 'ordering', key = g.ord, behind = holder})
        blocked = true
      end
    end
    local rates = {}
    if not blocked then
      for _, l in ipairs(lim) do
        local c = cfg(ns, l[1])
        if c then
          local sk = ns .. '/' .. l[1] .. '/' .. l[2]
          if c.max then
            local rk = P .. ':run:' .. sk
            if not redis.call('ZSCORE', rk, head) and redis.call('ZCARD', rk) >= c.max then
              park(ring, lane, gid, 'run:' .. sk, head,
                {reason = 'concurrency', limit = l[1], key = l[2], max_running = c.max})
              blocked = true
              break
            end
          end
          if c.ms then
            local tk = P .. ':tat:' .. sk
            local tat = tonumber(redis.call('GET', tk) or '0')
            if tat < now then tat = now end
            local allow = tat - (c.burst - 1) * c.ms
            if allow > now then
              redis.call('ZREM', ring, gid)
              redis.call('ZADD', P .. ':delayed:' .. lane, allow, gid)
              waited(lane, gid, head, {reason = 'rate', limit = l[1], key = l[2], until_ms = allow})
              due_in(allow - now)
              blocked = true
              break
            end
            rates[#rates + 1] = {tk, tat + c.ms, c.ms * c.burst}
          end
        end
      end
    end
    if not blocked then
      redis.call('ZREM', gk, head)
      for _, r in ipairs(rates) do
        redis.call('SET', r[1], tostring(r[2]), 'PX', math.ceil(r[2] - now + r[3]) + 1000)
      end
      local holds = false
      for _, l in ipairs(lim) do
        local c = cfg(ns, l[1])
        if c and c.max then
          local rk = P .. ':run:' .. ns .. '/' .. l[1] .. '/' .. l[2]
          redis.call('ZADD', rk, now, head)
          redis.call('SADD', P .. ':runsets', rk)
          holds = true
        end
      end
      if g.ord then
        local ok = P .. ':ord:' .. ns .. '/' .. g.ord
        redis.call('ZADD', ok, 'NX', now, head)
        redis.call('SADD', P .. ':runsets', ok)
        holds = true
      end
      if holds then redis.call('HSET', P .. ':held', head, lane .. '\n' .. gid) end
      if waits_recorded then redis.call('HDEL', P .. ':lastwait', lane .. '\n' .. gid) end
      taken = taken + 1
      out[#out + 1] = head
      local bk = P .. ':body:' .. head
      local body = redis.call('GET', bk)
      if body then redis.call('DEL', bk) end
      out[#out + 1] = body or ''
      local n = redis.call('ZRANGE', gk, 0, 0, 'WITHSCORES')
      if n[1] then
        local s = tonumber(n[2])
        if s < now then s = now end
        redis.call('ZADD', ring, s, gid)
      else
        redis.call('ZREM', ring, gid)
      end
    end
  end
  for i = 1, #KEYS do
    if KEYS[i] == ring then head_of(i) end
  end
end
return {tostring(next_due), unpack(out)}
"#;

/// Give back what job `ARGV[2]` held in the shard `ARGV[1]` (`KEYS[1]`: its `held` hash, named
/// so that a cluster routes the script to the node of the shard's slot) (`ARGV[3]` lane and
/// `ARGV[4]` group as dispatched; `ARGV[5]` = 1 when the job ended; `ARGV[6]` = ms its limits'
/// rates wait until, or empty) and return the groups that waited for it to their rings.
/// Returns the lanes of those groups, and wakes their fetchers when the wake keys share the
/// shard's slot (`ARGV[7]`: their prefix, or empty: the caller wakes them).
const RELEASE_SCRIPT: &str = r#"
local P, job = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lane, gid = ARGV[3], ARGV[4]
local held = redis.call('HGET', P .. ':held', job)
if held then
  local nl = string.find(held, '\n', 1, true)
  lane, gid = string.sub(held, 1, nl - 1), string.sub(held, nl + 1)
end
local g = cjson.decode(gid)
local ns = g.ns
local freed = {}
for _, l in ipairs(g.lim or {}) do
  local sk = ns .. '/' .. l[1] .. '/' .. l[2]
  if redis.call('ZREM', P .. ':run:' .. sk, job) == 1 then freed[#freed + 1] = 'run:' .. sk end
  if ARGV[6] ~= '' then
    local untl = tonumber(ARGV[6])
    local tk = P .. ':tat:' .. sk
    if tonumber(redis.call('GET', tk) or '0') < untl then
      redis.call('SET', tk, tostring(untl), 'PX', math.max(untl - now, 0) + 60000)
    end
  end
end
if ARGV[5] == '1' then
  if g.ord then
    local ok = P .. ':ord:' .. ns .. '/' .. g.ord
    if redis.call('ZREM', ok, job) == 1 then freed[#freed + 1] = 'ord:' .. ns .. '/' .. g.ord end
  end
  redis.call('HDEL', P .. ':held', job)
  redis.call('ZREM', P .. ':g:' .. ARGV[3] .. ':' .. ARGV[4], job)
elseif not g.ord then
  redis.call('HDEL', P .. ':held', job)
end
local W = ARGV[7]
local woken, seen = {}, {}
for _, b in ipairs(freed) do
  local pk = P .. ':parked:' .. b
  for _, m in ipairs(redis.call('SMEMBERS', pk)) do
    local nl = string.find(m, '\n', 1, true)
    local l = string.sub(m, 1, nl - 1)
    redis.call('ZADD', P .. ':ring:' .. l, 'NX', now, string.sub(m, nl + 1))
    if W ~= '' then
      redis.call('LPUSH', W .. ':wake:' .. l, '1')
      redis.call('LTRIM', W .. ':wake:' .. l, 0, 63)
    end
    if not seen[l] then
      seen[l] = true
      woken[#woken + 1] = l
    end
  end
  redis.call('DEL', pk)
end
return woken
"#;

/// Return every group parked on the sets `KEYS` of the shard `ARGV[1]` to its ring (after a
/// resume, a limit change, or the relay's periodic kick that heals a release Redis never saw).
/// Returns their lanes; wakes their fetchers as the release script does (`ARGV[2]`).
const UNPARK_SCRIPT: &str = r#"
local P, W = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local woken, seen = {}, {}
for _, pk in ipairs(KEYS) do
  for _, m in ipairs(redis.call('SMEMBERS', pk)) do
    local nl = string.find(m, '\n', 1, true)
    local l = string.sub(m, 1, nl - 1)
    redis.call('ZADD', P .. ':ring:' .. l, 'NX', now, string.sub(m, nl + 1))
    if W ~= '' then
      redis.call('LPUSH', W .. ':wake:' .. l, '1')
      redis.call('LTRIM', W .. ':wake:' .. l, 0, 63)
    end
    if not seen[l] then
      seen[l] = true
      woken[#woken + 1] = l
    end
  end
  redis.call('DEL', pk)
  redis.call('SREM', P .. ':parkedsets', pk)
end
return woken
"#;

/// What a pop handed out, and how soon a group it held back by a rate limit may go.
#[derive(Debug, Default)]
pub struct Popped {
    pub ids: Vec<Uuid>,
    pub due: Option<Duration>,
    /// The jobs whose copy rode with their entry ([`crate::store::dispatch::carried`]), as
    /// their entry's commit wrote them: the job only until its claim says otherwise.
    pub carried: HashMap<Uuid, Job>,
}

impl Popped {
    /// The pop script's answer: how soon a held-back group is due (ms, or -1), then each id
    /// and its carried copy (empty: none). A copy that does not decode is left out: the job is
    /// loaded from Postgres instead.
    fn of(out: &[String]) -> Popped {
        let due = out
            .first()
            .and_then(|d| d.parse::<i64>().ok())
            .filter(|d| *d >= 0)
            .map(|d| Duration::from_millis(d as u64 + 1));
        let mut popped = Popped {
            due,
            ..Popped::default()
        };
        for pair in out.get(1..).unwrap_or_default().chunks(2) {
            let Some(id) = pair[0].parse::<Uuid>().ok() else {
                continue;
            };
            popped.ids.push(id);
            let copy = pair.get(1).filter(|b| !b.is_empty());
            if let Some(job) = copy.and_then(|b| serde_json::from_str::<Job>(b).ok()) {
                if job.id == id {
                    popped.carried.insert(id, job);
                }
            }
        }
        popped
    }

    /// The jobs whose copies came with them, and the ids of those to read from Postgres.
    pub fn split(self) -> (Vec<Job>, Vec<Uuid>) {
        let Popped {
            ids, mut carried, ..
        } = self;
        let mut copies = Vec::with_capacity(carried.len());
        let mut load = Vec::new();
        for id in ids {
            match carried.remove(&id) {
                Some(job) => copies.push(job),
                None => load.push(id),
            }
        }
        (copies, load)
    }

    /// Add what another pop handed out.
    fn extend(&mut self, other: Popped) {
        self.ids.extend(other.ids);
        self.carried.extend(other.carried);
        self.due = match (self.due, other.due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// Handle to the dispatch queues; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    redis: Redis,
    conn: RedisConn,
    prefix: String,
    /// Dispatch shards ([`Queue::connect_sharded`]).
    shards: u16,
    /// Which shard the next pop starts at.
    turn: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pop: Script,
    unpark: Script,
    fast_path: std::sync::Arc<FastPath>,
}

/// How long the after-commit push may hold the committing writer while Redis answers (a
/// healthy loopback Redis answers a pipeline in well under a millisecond).
const FAST_PATH_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a background probe of a degraded fast path may wait for Redis.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The after-commit push's circuit breaker. Every commit of the group-commit writer waits for its
/// push, so a Redis that is unreachable, stalled or out of memory must not hold the writer: after
/// one failed or slow push the fast path is *degraded* and commits go on without pushing (their
/// outbox rows are the relay's), while at most one background push at a time probes Redis with
/// the entries of the commit at hand; the first that succeeds closes the breaker again.
#[derive(Default)]
struct FastPath {
    degraded: std::sync::atomic::AtomicBool,
    probing: std::sync::atomic::AtomicBool,
}

impl FastPath {
    fn is_degraded(&self) -> bool {
        self.degraded.load(std::sync::atomic::Ordering::Acquire)
    }

    fn failed(&self, why: &str, dispatched: usize) {
        if !self
            .degraded
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            tracing::warn!(error = %why, dispatched,
                "after-commit push to Redis failed; commits go on without it and the relay \
                 dispatches from Postgres until Redis answers again");
        }
    }

    fn recovered(&self) {
        if self
            .degraded
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            tracing::info!("Redis answers again; after-commit pushes resumed");
        }
    }

    /// Whether the caller may start the one probe.
    fn start_probe(&self) -> bool {
        !self.probing.swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    fn end_probe(&self) {
        self.probing
            .store(false, std::sync::atomic::Ordering::Release);
    }
}

impl Queue {
    /// Connect to a server or a cluster ([`crate::redis_conn::RedisTarget::parse`]) with one
    /// dispatch shard; `prefix` namespaces every key (tests use one per test).
    pub async fn connect(url: &str, prefix: &str) -> Result<Queue, QueueError> {
        Queue::connect_sharded(url, prefix, 1).await
    }

    /// [`Queue::connect`] with `shards` dispatch shards (`CAPIBARA_REDIS_SHARDS`): each holds
    /// the dispatch keys of the namespaces that hash to it under a hash tag of its own, so a
    /// Redis Cluster spreads them over its masters (docs/redis-cluster.md). Every process of a
    /// deployment must use the same count.
    pub async fn connect_sharded(
        url: &str,
        prefix: &str,
        shards: u16,
    ) -> Result<Queue, QueueError> {
        let redis = Redis::open(url)?;
        let conn = redis.connect().await?;
        Ok(Queue {
            redis,
            conn,
            prefix: prefix.to_string(),
            shards: shards.max(1),
            turn: Default::default(),
            pop: Script::new(POP_SCRIPT),
            unpark: Script::new(UNPARK_SCRIPT),
            fast_path: Default::default(),
        })
    }

    /// Where Redis is: for pub/sub connections ([`Redis::pubsub`]).
    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// The shared connection, for other Redis state under this prefix
    /// ([`crate::http_hosts`]).
    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// What every key of this deployment starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many dispatch shards the namespaces are spread over.
    pub fn shards(&self) -> u16 {
        self.shards
    }

    /// The deployment's own hash tag, `{prefix}`: wake lists, channels, and with one shard
    /// every dispatch key.
    fn base(&self) -> String {
        format!("{{{}}}", self.prefix)
    }

    fn shard_base(&self, s: u16) -> String {
        shard_tag(&self.prefix, s, self.shards)
    }

    fn shard_of(&self, namespace: &str) -> u16 {
        shard_of(namespace, self.shards)
    }

    fn all_shards(&self) -> impl Iterator<Item = String> + '_ {
        (0..self.shards).map(|s| self.shard_base(s))
    }

    /// The wake keys' prefix a script may push to itself: only when they share its slot.
    fn inline_wakes(&self) -> String {
        if self.shards == 1 {
            self.base()
        } else {
            String::new()
        }
    }

    /// The ring of a lane in a shard: its groups, scored by their next turn.
    fn ring_key(&self, shard: &str, lane: &str) -> String {
        format!("{shard}:ring:{lane}")
    }

    /// The jobs of one group on a lane, scored by priority and age.
    fn group_key(&self, shard: &str, lane: &str, group: &str) -> String {
        format!("{shard}:g:{lane}:{group}")
    }

    fn wake_key(&self, lane: &str) -> String {
        format!("{{{}}}:wake:{}", self.prefix, lane)
    }

    /// Where job `id`'s carried copy waits (the pop script names it `P .. ':body:' .. id`).
    fn body_key(&self, shard: &str, id: Uuid) -> String {
        format!("{shard}:body:{id}")
    }

    fn epoch_key(&self, shard: &str) -> String {
        format!("{shard}:epoch")
    }

    /// Channel carrying ids of streams that just changed.
    pub fn hints_channel(&self) -> String {
        format!("{{{}}}:hints", self.prefix)
    }

    /// Channel carrying the same ids for commits with an event that names a run (a workflow
    /// step's job, a child run): the orchestrator's wake-up.
    pub fn run_hints_channel(&self) -> String {
        format!("{{{}}}:hints:runs", self.prefix)
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

    /// Add entries (idempotent). Also marks the epoch so a wipe can be detected (every
    /// shard's, when `entries` is empty).
    pub async fn push(&self, entries: &[DispatchEntry]) -> Result<(), QueueError> {
        if entries.is_empty() {
            let marks = self.all_shards().map(|shard| {
                let mut conn = self.conn.clone();
                let key = self.epoch_key(&shard);
                async move { conn.set_nx::<_, _, ()>(key, 1).await }
            });
            futures::future::try_join_all(marks).await?;
            return Ok(());
        }
        self.send(entries, &[], NO_HINTS).await
    }

    /// Push `dispatched`, give back what `released` held, and publish `streams` as hints: with
    /// one shard in one round trip; with several, one pipeline per shard touched (at once),
    /// then the wake tokens and hints (after: a woken fetcher finds its job).
    async fn send(
        &self,
        dispatched: &[DispatchEntry],
        released: &[Release],
        changed: Changed<'_>,
    ) -> Result<(), QueueError> {
        let streams = changed.streams;
        if self.shards == 1 {
            let base = self.base();
            let mut pipe = redis::pipe();
            if !dispatched.is_empty() {
                let wakes = self.add_push(&mut pipe, &base, dispatched.iter());
                self.add_wakes(&mut pipe, wakes.iter().map(|(l, n)| (l.as_str(), *n)));
                pipe.cmd("EXEC").ignore();
            }
            for r in released {
                self.add_release(&mut pipe, &base, r).ignore();
            }
            if !streams.is_empty() {
                self.add_hints(&mut pipe, changed);
            }
            let mut conn = self.conn.clone();
            pipe.query_async::<()>(&mut conn).await?;
            return Ok(());
        }
        let mut by_shard: std::collections::BTreeMap<u16, (Vec<&DispatchEntry>, Vec<&Release>)> =
            Default::default();
        for e in dispatched {
            by_shard
                .entry(self.shard_of(&e.namespace))
                .or_default()
                .0
                .push(e);
        }
        for r in released {
            by_shard
                .entry(self.shard_of(&release_namespace(r)))
                .or_default()
                .1
                .push(r);
        }
        let sends = by_shard.into_iter().map(|(s, (entries, releases))| {
            let shard = self.shard_base(s);
            let mut pipe = redis::pipe();
            let mut wakes = std::collections::BTreeMap::new();
            if !entries.is_empty() {
                wakes = self.add_push(&mut pipe, &shard, entries.into_iter());
                pipe.cmd("EXEC").ignore();
            }
            for r in &releases {
                self.add_release(&mut pipe, &shard, r);
            }
            let mut conn = self.conn.clone();
            async move {
                let woken: Vec<Vec<String>> = pipe.query_async(&mut conn).await?;
                for lane in woken.into_iter().flatten() {
                    wakes.entry(lane).or_insert(1);
                }
                Ok::<_, redis::RedisError>(wakes)
            }
        });
        let mut wakes: std::collections::BTreeMap<String, usize> = Default::default();
        for w in futures::future::try_join_all(sends).await? {
            for (lane, n) in w {
                *wakes.entry(lane).or_default() += n;
            }
        }
        if wakes.is_empty() && streams.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        self.add_wakes(&mut pipe, wakes.iter().map(|(l, n)| (l.as_str(), *n)));
        if !streams.is_empty() {
            self.add_hints(&mut pipe, changed);
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// The commands pushing `entries` (all of shard `shard`), added to `pipe` as one
    /// transaction that the caller ends with `EXEC` (after the wake tokens, when they share
    /// the shard's slot): all or none. A Redis at its `maxmemory` (with `noeviction`) refuses
    /// writes one command at a time, and a job that reached its group's set but not the
    /// group's place in the lane's ring would be held by Redis yet never popped — and the
    /// relay, seeing it held, would never push it again. In a transaction a refused command
    /// aborts the whole push, so an entry is either poppable or missing (and the relay's).
    /// Returns how many jobs each lane received.
    fn add_push<'e>(
        &self,
        pipe: &mut redis::Pipeline,
        shard: &str,
        entries: impl Iterator<Item = &'e DispatchEntry>,
    ) -> std::collections::BTreeMap<String, usize> {
        pipe.cmd("MULTI").ignore();
        pipe.cmd("SET")
            .arg(self.epoch_key(shard))
            .arg(1)
            .arg("NX")
            .ignore();
        let mut wakes: std::collections::BTreeMap<String, usize> = Default::default();
        for e in entries {
            let group = group_id(e);
            pipe.cmd("ZADD")
                .arg(self.group_key(shard, &e.queue, &group))
                .arg("NX")
                .arg(e.score)
                .arg(e.job_id.to_string())
                .ignore();
            pipe.cmd("ZADD")
                .arg(self.ring_key(shard, &e.queue))
                .arg("NX")
                .arg(e.score)
                .arg(group)
                .ignore();
            if let Some(job) = &e.carried {
                pipe.cmd("SET")
                    .arg(self.body_key(shard, e.job_id))
                    .arg(job.as_bytes())
                    .arg("PX")
                    .arg(CARRY_TTL_MS)
                    .ignore();
            }
            *wakes.entry(e.queue.clone()).or_default() += 1;
        }
        wakes
    }

    /// Wake tokens for `lanes`: one per job, up to a worker-pool's worth (each wakes one
    /// blocked fetcher).
    fn add_wakes<'l>(
        &self,
        pipe: &mut redis::Pipeline,
        lanes: impl Iterator<Item = (&'l str, usize)>,
    ) {
        for (lane, n) in lanes {
            let key = self.wake_key(lane);
            pipe.cmd("LPUSH")
                .arg(&key)
                .arg(vec!["1"; n.clamp(1, 64)])
                .ignore();
            pipe.cmd("LTRIM").arg(&key).arg(0).arg(63).ignore();
        }
    }

    /// The changed streams on the hints channel, and on the runs' channel too when an event
    /// names a run (what the orchestrator follows: it wakes for nothing else).
    fn add_hints(&self, pipe: &mut redis::Pipeline, changed: Changed<'_>) {
        let payload = changed
            .streams
            .iter()
            .map(Uuid::to_string)
            .collect::<Vec<_>>()
            .join(",");
        if changed.runs {
            pipe.cmd("PUBLISH")
                .arg(self.run_hints_channel())
                .arg(&payload)
                .ignore();
        }
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
        let mut by_shard: std::collections::BTreeMap<u16, Vec<&DispatchEntry>> = Default::default();
        for e in entries {
            by_shard
                .entry(self.shard_of(&e.namespace))
                .or_default()
                .push(e);
        }
        let checks = by_shard.into_iter().map(|(s, group)| {
            let shard = self.shard_base(s);
            let mut pipe = redis::pipe();
            for e in &group {
                pipe.cmd("ZSCORE")
                    .arg(self.group_key(&shard, &e.queue, &group_id(e)))
                    .arg(e.job_id.to_string());
            }
            let mut conn = self.conn.clone();
            async move {
                let scores: Vec<Option<f64>> = pipe.query_async(&mut conn).await?;
                Ok::<_, redis::RedisError>(
                    group
                        .into_iter()
                        .zip(scores)
                        .filter(|(_, s)| s.is_none())
                        .map(|(e, _)| e.clone())
                        .collect::<Vec<_>>(),
                )
            }
        });
        let mut out: Vec<DispatchEntry> = futures::future::try_join_all(checks)
            .await?
            .into_iter()
            .flatten()
            .collect();
        // In the order given (the relay pushes oldest first).
        let order: std::collections::HashMap<Uuid, usize> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.job_id, i))
            .collect();
        out.sort_by_key(|e| order[&e.job_id]);
        Ok(out)
    }

    /// Pop up to `max` jobs across `lanes` without blocking: groups take turns, each group's
    /// limits and pauses are checked first (docs/flow-control.md). Also says how soon a group
    /// held back by a rate limit may go (what [`Queue::wait_and_pop`] needs after a pop that
    /// found nothing). The jobs' carried copies come with them: a caller that drops them makes
    /// their workers read the jobs from Postgres. With several shards, one
    /// script per shard until `max` are taken, starting at the shard after the one the previous
    /// pop started at (so no shard's groups wait behind another's); a shard that fails is
    /// skipped when another hands out work.
    pub async fn pop_due(&self, lanes: &[String], max: usize) -> Result<Popped, QueueError> {
        let n = usize::from(self.shards);
        let first = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n;
        let mut popped = Popped::default();
        let mut failed = None;
        for i in 0..n {
            if popped.ids.len() >= max {
                break;
            }
            let shard = self.shard_base(((first + i) % n) as u16);
            let cmd = self.pop_cmd(&shard, lanes, max - popped.ids.len());
            let mut conn = self.conn.clone();
            // The script is loaded when Redis lacks it (first use, a restart), as
            // `Script::invoke_async` does.
            let out = match cmd.query_async::<Vec<String>>(&mut conn).await {
                Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                    match self.pop.load_async(&mut conn).await {
                        Ok(_) => cmd.query_async(&mut conn).await,
                        Err(e) => Err(e),
                    }
                }
                r => r,
            };
            // A shard whose master is failing over does not stop the others' work.
            let out: Vec<String> = match out {
                Ok(out) => out,
                Err(e) if n > 1 => {
                    failed.get_or_insert(e);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            popped.extend(Popped::of(&out));
        }
        match failed {
            Some(e) if popped.ids.is_empty() => Err(e.into()),
            _ => Ok(popped),
        }
    }

    /// A connection for blocking waits (a blocked command stalls its connection, so each
    /// fetcher has its own).
    pub async fn blocking_connection(&self) -> Result<RedisConn, QueueError> {
        Ok(self.redis.connect_blocking().await?)
    }

    /// After a pop that found nothing (`due`: what it said of the rate-limited groups), block
    /// up to `timeout` until a push (or a release) wakes this fetcher or a rate-limited group is
    /// due, then pop one job. It does not pop first: the caller just did, and a push since then
    /// left its wake token in the list, so the `BLPOP` returns at once (one pop script per idle
    /// wait instead of two). The wake lists carry the deployment's own tag whatever the shards,
    /// so one `BLPOP` waits on all.
    ///
    /// With one shard on one Redis the pop script rides behind the `BLPOP` in one pipeline:
    /// Redis runs a blocked client's next command as soon as its wait ends, so a woken fetcher
    /// gets its job in the same answer as the wake-up instead of asking again (one round trip
    /// and one wake-up of this process less between a push and its start). After a wait that
    /// timed out, that pop is the one the caller would have made next.
    pub async fn wait_and_pop(
        &self,
        conn: &mut RedisConn,
        lanes: &[String],
        timeout: Duration,
        due: Option<Duration>,
    ) -> Result<Popped, QueueError> {
        let keys: Vec<String> = lanes.iter().map(|l| self.wake_key(l)).collect();
        let slot_key = keys.first().cloned().unwrap_or_else(|| self.base());
        let mut pipe = redis::pipe();
        pipe.cmd("BLPOP")
            .arg(&keys)
            .arg(timeout.as_secs_f64().max(0.01))
            .ignore();
        let behind = self.shards == 1 && matches!(conn, RedisConn::Single(_));
        if behind {
            pipe.add_command(self.pop_cmd(&self.base(), lanes, 1));
        }
        // Empty when no pop rode along.
        let wait = async |conn: &mut RedisConn| -> redis::RedisResult<Vec<Vec<String>>> {
            pipe.query_async(conn).await
        };
        let answer = match due.filter(|d| *d < timeout) {
            // Redis times out a blocked client only at its cron's pace (100 ms at the default
            // `hz`), too coarse to space a rate limit's starts: sleep here, precisely, and
            // unblock the client when the group is due.
            // On a cluster `CLIENT ID` and `CLIENT UNBLOCK` go to the node of the wake keys'
            // slot, where the `BLPOP` blocks.
            Some(due) => {
                let client: i64 = conn
                    .query_at_key(redis::cmd("CLIENT").arg("ID"), &slot_key)
                    .await?;
                let blpop = wait(conn);
                tokio::pin!(blpop);
                tokio::select! {
                    r = &mut blpop => r,
                    _ = tokio::time::sleep(due) => {
                        let mut main = self.conn.clone();
                        main.query_at_key::<i64>(
                            redis::cmd("CLIENT").arg("UNBLOCK").arg(client),
                            &slot_key,
                        )
                        .await?;
                        blpop.await
                    }
                }
            }
            None => wait(conn).await,
        };
        match answer {
            Ok(out) if behind => Ok(Popped::of(out.first().map_or(&[][..], |o| o))),
            Ok(_) => self.pop_due(lanes, 1).await,
            // The script is not in this Redis' cache yet (a restart): the pop loads it.
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => self.pop_due(lanes, 1).await,
            Err(e) => Err(e.into()),
        }
    }

    /// The pop script's `EVALSHA` for `lanes` of shard `shard` (alone, or in a pipeline, which
    /// cannot load it: [`Queue::pop_due`] loads it when Redis lacks it).
    fn pop_cmd(&self, shard: &str, lanes: &[String], max: usize) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.pop.get_hash()).arg(lanes.len());
        for l in lanes {
            cmd.arg(self.ring_key(shard, l));
        }
        cmd.arg(shard).arg(max).arg(lanes);
        cmd
    }

    /// Take a job that will not run off its group (after a cancel); harmless if absent.
    pub async fn remove(&self, entry: &DispatchEntry) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let shard = self.shard_base(self.shard_of(&entry.namespace));
        redis::pipe()
            .zrem(
                self.group_key(&shard, &entry.queue, &group_id(entry)),
                entry.job_id.to_string(),
            )
            .ignore()
            .del(self.body_key(&shard, entry.job_id))
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// The release script for `r` (of shard `shard`), added to `pipe`; its answer is the lanes
    /// whose fetchers the caller must wake (none with one shard: the script wakes them).
    fn add_release<'p>(
        &self,
        pipe: &'p mut redis::Pipeline,
        shard: &str,
        r: &Release,
    ) -> &'p mut redis::Pipeline {
        // EVAL, not EVALSHA: a pipeline cannot fall back when Redis lacks the script.
        pipe.cmd("EVAL")
            .arg(RELEASE_SCRIPT)
            .arg(1)
            .arg(format!("{shard}:held"))
            .arg(shard)
            .arg(r.job_id.to_string())
            .arg(&r.lane)
            .arg(&r.group)
            .arg(if r.terminal { "1" } else { "0" })
            .arg(
                r.backoff_until_ms
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
            )
            .arg(self.inline_wakes())
    }

    /// Give back what jobs held (the appender does this after each commit).
    pub async fn release(&self, released: &[Release]) -> Result<(), QueueError> {
        self.send(&[], released, NO_HINTS).await
    }

    /// Write the limits the queue enforces (`ns/name` → its config, in every shard), dropping
    /// the others, and return parked groups to their rings so they see the change.
    pub async fn sync_limits(&self, limits: &[Limit]) -> Result<(), QueueError> {
        let wanted: std::collections::HashMap<String, String> = limits
            .iter()
            .filter(|l| !l.deleted)
            .map(|l| {
                let field = format!("{}/{}", l.namespace, l.name);
                (field, limit_config(l).to_string())
            })
            .collect();
        for shard in self.all_shards() {
            let key = format!("{shard}:limits");
            let mut conn = self.conn.clone();
            let held: std::collections::HashMap<String, String> = conn.hgetall(&key).await?;
            // Unchanged (every sync but the one after a change): nothing to write or to wake.
            if held == wanted {
                continue;
            }
            let mut pipe = redis::pipe();
            pipe.atomic().cmd("DEL").arg(&key).ignore();
            for (field, config) in &wanted {
                pipe.cmd("HSET").arg(&key).arg(field).arg(config).ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
            self.kick_shard(&shard).await?;
        }
        Ok(())
    }

    /// The limits Redis enforces (as last synced from Postgres; every shard holds them all).
    pub async fn limits(&self) -> Result<Vec<Limit>, QueueError> {
        let mut conn = self.conn.clone();
        let raw: Vec<String> = conn.hvals(format!("{}:limits", self.shard_base(0))).await?;
        Ok(raw
            .iter()
            .filter_map(|r| {
                let v: serde_json::Value = serde_json::from_str(r).ok()?;
                serde_json::from_value(v.get("limit")?.clone()).ok()
            })
            .collect())
    }

    /// Make each shard's pause set exactly `fields` ([`PauseTarget::field`]); groups parked on
    /// a pause that ended go back to their rings.
    pub async fn sync_pauses(&self, fields: &[String]) -> Result<(), QueueError> {
        for shard in self.all_shards() {
            let key = format!("{shard}:paused");
            let mut conn = self.conn.clone();
            let now: Vec<String> = conn.hkeys(&key).await?;
            let mut pipe = redis::pipe();
            pipe.atomic();
            let mut resumed = Vec::new();
            for f in &now {
                if !fields.contains(f) {
                    pipe.cmd("HDEL").arg(&key).arg(f).ignore();
                    resumed.push(format!("{shard}:parked:pause:{f}"));
                }
            }
            for f in fields {
                pipe.cmd("HSET").arg(&key).arg(f).arg(1).ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
            self.unpark_sets(&shard, &resumed).await?;
        }
        Ok(())
    }

    /// Return every parked group to its ring: those still blocked park again at their next
    /// turn (a wait is recorded once per episode, so this writes nothing new). Heals a
    /// release Redis never saw. Returns how many lanes had groups to take up again.
    pub async fn kick(&self) -> Result<u64, QueueError> {
        let mut n = 0;
        for shard in self.all_shards() {
            n += self.kick_shard(&shard).await?;
        }
        Ok(n)
    }

    async fn kick_shard(&self, shard: &str) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        let sets: Vec<String> = conn.smembers(format!("{shard}:parkedsets")).await?;
        self.unpark_sets(shard, &sets).await
    }

    /// Return the groups parked on `sets` (of shard `shard`) to their rings and wake their
    /// lanes' fetchers; returns how many lanes were woken.
    async fn unpark_sets(&self, shard: &str, sets: &[String]) -> Result<u64, QueueError> {
        if sets.is_empty() {
            return Ok(0);
        }
        let mut inv = self.unpark.prepare_invoke();
        for s in sets {
            inv.key(s);
        }
        inv.arg(shard).arg(self.inline_wakes());
        let mut conn = self.conn.clone();
        let lanes: Vec<String> = inv.invoke_async(&mut conn).await?;
        if self.shards > 1 && !lanes.is_empty() {
            let mut pipe = redis::pipe();
            self.add_wakes(&mut pipe, lanes.iter().map(|l| (l.as_str(), 1)));
            pipe.query_async::<()>(&mut conn).await?;
        }
        Ok(lanes.len() as u64)
    }

    /// What holds slots (running sets of limits and ordering keys, of every shard): each set's
    /// key and its members popped before `before_ms` (to check against Postgres).
    pub async fn held_before(
        &self,
        before_ms: i64,
    ) -> Result<Vec<(String, Vec<Uuid>)>, QueueError> {
        let mut out = Vec::new();
        for shard in self.all_shards() {
            let mut conn = self.conn.clone();
            let registry = format!("{shard}:runsets");
            let sets: Vec<String> = conn.smembers(&registry).await?;
            if sets.is_empty() {
                continue;
            }
            // One round trip for every set: its old members and its size.
            let mut pipe = redis::pipe();
            for key in &sets {
                pipe.zrangebyscore(key, "-inf", before_ms).zcard(key);
            }
            let answers: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
            let mut empty = Vec::new();
            for (key, pair) in sets.into_iter().zip(answers.chunks(2)) {
                let ids: Vec<String> = redis::from_redis_value(&pair[0])?;
                let size: u64 = redis::from_redis_value(&pair[1])?;
                if size == 0 {
                    empty.push(key);
                } else if !ids.is_empty() {
                    out.push((key, ids.iter().filter_map(|s| s.parse().ok()).collect()));
                }
            }
            if !empty.is_empty() {
                conn.srem::<_, _, ()>(&registry, &empty).await?;
            }
        }
        Ok(out)
    }

    /// Drop members of a running set (as [`Queue::held_before`] named it) whose jobs no longer
    /// hold it, and let the groups that waited for it go again.
    pub async fn drop_held(&self, set: &str, ids: &[Uuid]) -> Result<(), QueueError> {
        if ids.is_empty() {
            return Ok(());
        }
        // The set's shard: its key up to the end of its hash tag.
        let shard = match set.find('}') {
            Some(end) => &set[..=end],
            None => return Ok(()),
        };
        let mut conn = self.conn.clone();
        let members: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        conn.zrem::<_, _, ()>(set, &members).await?;
        conn.hdel::<_, _, ()>(format!("{shard}:held"), &members)
            .await?;
        // `{s}:run:ns/l/k` waits in `{s}:parked:run:ns/l/k`.
        let blocker = set.strip_prefix(&format!("{shard}:")).unwrap_or(set);
        self.unpark_sets(shard, &[format!("{shard}:parked:{blocker}")])
            .await?;
        Ok(())
    }

    /// Take up to `max` recorded waits (decisions to hold a job back), oldest first in each
    /// shard.
    pub async fn take_waits(&self, max: usize) -> Result<Vec<serde_json::Value>, QueueError> {
        let mut out = Vec::new();
        for shard in self.all_shards() {
            let want = max - out.len();
            if want == 0 {
                break;
            }
            let key = format!("{shard}:waits");
            let mut conn = self.conn.clone();
            let (raw,): (Vec<String>,) = redis::pipe()
                .atomic()
                .lrange(&key, 0, want as isize - 1)
                .ltrim(&key, want as isize, -1)
                .ignore()
                .query_async(&mut conn)
                .await?;
            out.extend(raw.iter().filter_map(|r| serde_json::from_str(r).ok()));
        }
        Ok(out)
    }

    /// Whether Redis still holds every shard's epoch mark (false after a wipe, on a fresh
    /// Redis, or when a shard's keys were lost).
    pub async fn epoch_present(&self) -> Result<bool, QueueError> {
        for shard in self.all_shards() {
            let mut conn = self.conn.clone();
            if !conn.exists::<_, bool>(self.epoch_key(&shard)).await? {
                return Ok(false);
            }
        }
        Ok(true)
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

    /// [`Queue::publish_cancel`] of each of `jobs` (step jobs a run's plan stopped, after its
    /// commit). A notice that is not published is logged: the worker sees the cancel at its
    /// next heartbeat.
    pub async fn tell_canceled(&self, jobs: &[Uuid]) {
        for &job_id in jobs {
            if let Err(e) = self.publish_cancel(job_id).await {
                tracing::warn!(job_id = %job_id, error = %e, "cancel notice not published; the worker sees it at its next heartbeat");
            }
        }
    }

    /// Liveness check for `/readyz`.
    pub async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok(())
    }
}

/// After each commit: push what became ready (the fast path; the relay sweeps what this misses)
/// and publish the changed streams as hints. While Redis fails ([`FastPath`]) the commit is not
/// held: the push is skipped or sent as the breaker's background probe.
impl crate::store::append::CommitListener for Queue {
    fn committed<'a>(
        &'a self,
        dispatched: &'a [DispatchEntry],
        released: &'a [Release],
        changed: Changed<'a>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        // One round trip per shard touched: the pushes, then the hints (a waiter woken by a
        // hint finds its job in the queue already).
        Box::pin(async move {
            if !self.fast_path.is_degraded() {
                let outcome = tokio::time::timeout(
                    FAST_PATH_TIMEOUT,
                    self.send(dispatched, released, changed),
                )
                .await;
                let why = match outcome {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {FAST_PATH_TIMEOUT:?}"),
                };
                metrics::counter!("capibara_dispatch_deferred_total")
                    .increment(dispatched.len() as u64);
                self.fast_path.failed(&why, dispatched.len());
                return;
            }
            if !self.fast_path.start_probe() {
                metrics::counter!("capibara_dispatch_deferred_total")
                    .increment(dispatched.len() as u64);
                return;
            }
            let queue = self.clone();
            let (dispatched, released, streams, runs) = (
                dispatched.to_vec(),
                released.to_vec(),
                changed.streams.to_vec(),
                changed.runs,
            );
            tokio::spawn(async move {
                let n = dispatched.len() as u64;
                match tokio::time::timeout(
                    PROBE_TIMEOUT,
                    queue.send(
                        &dispatched,
                        &released,
                        Changed {
                            streams: &streams,
                            runs,
                        },
                    ),
                )
                .await
                {
                    Ok(Ok(())) => queue.fast_path.recovered(),
                    _ => metrics::counter!("capibara_dispatch_deferred_total").increment(n),
                }
                queue.fast_path.end_probe();
            });
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
    fn namespaces_spread_over_the_shards_and_one_shard_keeps_the_old_key_names() {
        assert_eq!(shard_tag("capibara", 0, 1), "{capibara}");
        assert_eq!(shard_of("anything", 1), 0);
        assert_eq!(shard_tag("capibara", 3, 16), "{capibara:3/16}");
        let used: std::collections::BTreeSet<u16> = (0..200)
            .map(|i| shard_of(&format!("tenant-{i}"), 16))
            .collect();
        assert_eq!(used.len(), 16, "200 namespaces use all 16 shards");
        // Stable in every process and release: FNV-1a's published test vectors.
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a("foobar"), 0x8594_4171_f739_67e8);
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
