//! The production job queue on Redis (fred). Every step that touches more than one key
//! is a Lua script, so it is atomic; every key lives under the namespace.
//!
//! ## Design note: keys
//! - `{ns}:job:{id}`: hash with the job's fields (times in µs since the epoch);
//! - `{ns}:idem:{key}`: the job id holding an idempotency key;
//! - `{ns}:queue:{name}`: ready ids (LPUSH to add, RPOP to take: oldest first);
//! - `{ns}:queues`: the set of queue names;
//! - `{ns}:scheduled`, `{ns}:retry`: ids by due time; `{ns}:dead`: ids by finish time;
//! - `{ns}:running`: lease ids by deadline, and `{ns}:lease:{lease}`: the ids a fetch
//!   leased under it (reliable fetch: a worker that dies lets its lease lapse and the
//!   reaper puts its jobs back). One lease per fetched batch keeps the per-job work
//!   off this set;
//! - `{ns}:done:{hour}`: how many jobs finished in that hour (since the epoch), kept
//!   for the retention: `count(Done)` sums the buckets within it, without a per-job
//!   sorted-set entry on the hot path.
//!
//! Finished jobs keep their hash and idempotency key for `done_retention` (Redis
//! expiry); the dead set is trimmed by age and count when a job dies.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;
use fred::types::scripts::Script;
use uuid::Uuid;

use super::{
    dur_us, from_us, now_us, Acted, Enqueued, Failed, Job, JobError, JobQueue, JobResult, JobSet, JobState, NewJob,
    QueueConfig, QueueStats, Scanned,
};

impl From<fred::error::Error> for JobError {
    fn from(e: fred::error::Error) -> Self {
        JobError::Backend(e.to_string())
    }
}

/// Lua: Redis's own clock, in µs since the epoch, and a number as Redis stores it.
/// Every lease deadline, due time and finish time is taken from it, so processes on
/// hosts whose clocks disagree still agree on when a lease lapses.
macro_rules! clock_lua {
    () => {
        r#"
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function fmt(n) return string.format('%.0f', n) end
"#
    };
}

/// KEYS: scheduled, queues. ARGV: job key prefix, idem key prefix, queue key prefix,
/// then per job 7 values: id, kind, queue, args, idempotency key, max attempts, run_at
/// (µs; 0 = now). Enqueues every job whose key is free, in order, in one step; returns
/// per job the id already holding its key, or "" for a new job.
const ENQUEUE_MANY: &str = concat!(
    clock_lua!(),
    r#"
local now = now_us()
local out = {}
for i = 4, #ARGV, 7 do
  local id, kind, queue, args, key, max = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  local idem = ARGV[2] .. key
  local existing = redis.call('GET', idem)
  if existing then
    table.insert(out, existing)
  else
    local run_at = tonumber(ARGV[i + 6])
    local state = 'ready'
    if run_at > now then state = 'scheduled' else run_at = now end
    redis.call('HSET', ARGV[1] .. id, 'id', id, 'kind', kind, 'queue', queue, 'args', args,
      'idempotency_key', key, 'state', state, 'failures', 0, 'max_attempts', max,
      'enqueued_at_us', fmt(now), 'run_at_us', fmt(run_at))
    redis.call('SET', idem, id)
    redis.call('SADD', KEYS[2], queue)
    if state == 'scheduled' then redis.call('ZADD', KEYS[1], fmt(run_at), id)
    else redis.call('LPUSH', ARGV[3] .. queue, id) end
    table.insert(out, '')
  end
end
return out
"#
);

/// KEYS: queue, running. ARGV: job key prefix, worker, lease (µs), max, workers, lease
/// id, lease-set key prefix. Takes up to `min(max, ceil(len / workers))` ids under one
/// lease (one `running` entry and one id set per fetch, not per job) and returns, per
/// job, its id and the fields of [`FETCHED_FIELDS`] in order (a fixed `HMGET`, half the
/// reply of `HGETALL`). An id whose job hash is gone (evicted, deleted by hand) is
/// dropped rather than turned into a half-written job.
const FETCH: &str = concat!(
    clock_lua!(),
    r#"
local n = math.min(tonumber(ARGV[4]), math.ceil(redis.call('LLEN', KEYS[1]) / tonumber(ARGV[5])))
local out, ids = {}, {}
local started = fmt(now_us())
while #out < n do
  local id = redis.call('RPOP', KEYS[1])
  if not id then break end
  local job = ARGV[1] .. id
  local f = redis.call('HMGET', job, 'kind', 'queue', 'args', 'idempotency_key', 'failures', 'max_attempts',
    'enqueued_at_us', 'run_at_us', 'last_error', 'failed_at_us')
  if f[1] then
    redis.call('HSET', job, 'state', 'running', 'worker', ARGV[2], 'lease', ARGV[6], 'started_at_us', started)
    table.insert(ids, id)
    table.insert(f, 1, id)
    table.insert(out, f)
  end
end
if #ids > 0 then
  redis.call('SADD', ARGV[7] .. ARGV[6], unpack(ids))
  redis.call('ZADD', KEYS[2], fmt(now_us() + tonumber(ARGV[3])), ARGV[6])
end
return out
"#
);

/// The fields FETCH returns after the id, in order.
const FETCHED_FIELDS: [&str; 10] = [
    "kind",
    "queue",
    "args",
    "idempotency_key",
    "failures",
    "max_attempts",
    "enqueued_at_us",
    "run_at_us",
    "last_error",
    "failed_at_us",
];

/// KEYS: job, running. ARGV: id, lease id, lease (µs). Extends the lease (and with it
/// every job of its batch) if the job is still held under it and its deadline has not
/// passed (a lapsed lease is the reaper's, even before it ran); returns 1 if so.
const HEARTBEAT: &str = concat!(
    clock_lua!(),
    r#"
local f = redis.call('HMGET', KEYS[1], 'lease', 'state')
if f[1] ~= ARGV[2] or f[2] ~= 'running' then return 0 end
local now = now_us()
local deadline = redis.call('ZSCORE', KEYS[2], ARGV[2])
if not deadline or tonumber(deadline) < now then return 0 end
redis.call('ZADD', KEYS[2], fmt(now + tonumber(ARGV[3])), ARGV[2])
return 1
"#
);

/// Lua: takes settled job ids out of their lease's set; a lease with no jobs left
/// leaves the `running` set.
macro_rules! release_lua {
    () => {
        r#"
local function release(prefix, running, lease, ids)
  local set = prefix .. lease
  redis.call('SREM', set, unpack(ids))
  if redis.call('SCARD', set) == 0 then
    redis.call('DEL', set)
    redis.call('ZREM', running, lease)
  end
end
"#
    };
}

/// KEYS: running, done bucket (this hour's count). ARGV: (unused), retention_ms, job key
/// prefix, idem key prefix, lease-set key prefix, then (id, lease id) pairs. Acks each
/// pair still leased; returns the acked ids. Times stay the strings Rust formatted.
const ACK: &str = concat!(
    clock_lua!(),
    release_lua!(),
    r#"
local ms = tonumber(ARGV[2])
local now = fmt(now_us())
local ids, by_lease = {}, {}
for i = 6, #ARGV, 2 do
  local id, job, lease = ARGV[i], ARGV[3] .. ARGV[i], ARGV[i + 1]
  local f = redis.call('HMGET', job, 'lease', 'state', 'idempotency_key')
  if f[1] == lease and f[2] == 'running' then
    local idem = ARGV[4] .. (f[3] or '')
    -- worker and lease fields stay: they mean nothing once the state is not running
    redis.call('HSET', job, 'state', 'done', 'finished_at_us', now)
    if ms > 0 then
      redis.call('PEXPIRE', job, ms)
      redis.call('PEXPIRE', idem, ms)
    else
      redis.call('DEL', job, idem)
    end
    table.insert(ids, id)
    by_lease[lease] = by_lease[lease] or {}
    table.insert(by_lease[lease], id)
  end
end
for lease, members in pairs(by_lease) do release(ARGV[5], KEYS[1], lease, members) end
if #ids > 0 then
  redis.call('INCRBY', KEYS[2], #ids)
  redis.call('PEXPIRE', KEYS[2], ms + 3600000)
end
return ids
"#
);

/// Lua: drops dead jobs finished before `cutoff` (a string of µs), then the oldest
/// beyond `max_count`, with their hashes and idempotency keys (Sidekiq's dead-set cap).
macro_rules! trim_dead_lua {
    () => {
        r#"
local function trim_dead(dead, cutoff, max_count, job_prefix, idem_prefix)
  local gone = redis.call('ZRANGEBYSCORE', dead, '-inf', '(' .. cutoff)
  local extra = redis.call('ZCARD', dead) - #gone - max_count
  if extra > 0 then
    for _, id in ipairs(redis.call('ZRANGE', dead, #gone, #gone + extra - 1)) do table.insert(gone, id) end
  end
  for _, id in ipairs(gone) do
    local key = redis.call('HGET', job_prefix .. id, 'idempotency_key')
    if key then redis.call('DEL', idem_prefix .. key) end
    redis.call('DEL', job_prefix .. id)
    redis.call('ZREM', dead, id)
  end
end
"#
    };
}

/// KEYS: job, running, retry, dead. ARGV: id, lease id, error, `snooze` (run again after
/// the delay without counting an attempt) or empty, retry delay
/// (µs), expected failures, dead max age (µs), dead max count, job key prefix, idem key
/// prefix, `1` to bury at once (a permanent failure), lease-set key prefix. Returns -1
/// if not leased, 0 for retry, 1 for dead.
const FAIL: &str = concat!(
    clock_lua!(),
    trim_dead_lua!(),
    release_lua!(),
    r#"
local now = now_us()
local f = redis.call('HMGET', KEYS[1], 'lease', 'state', 'failures', 'max_attempts')
if f[1] ~= ARGV[2] or f[2] ~= 'running' then return {-1, ''} end
local snooze = ARGV[4] == 'snooze'
local failures = tonumber(f[3]) + 1
if snooze then failures = tonumber(f[3]) end
if failures ~= tonumber(ARGV[6]) then return {-1, ''} end
release(ARGV[12], KEYS[2], ARGV[2], {ARGV[1]})
redis.call('HDEL', KEYS[1], 'worker', 'lease')
if snooze then
  local at = fmt(now + tonumber(ARGV[5]))
  redis.call('HSET', KEYS[1], 'state', 'retry', 'run_at_us', at)
  redis.call('ZADD', KEYS[3], at, ARGV[1])
  return {0, at}
end
redis.call('HSET', KEYS[1], 'failures', failures, 'last_error', ARGV[3], 'failed_at_us', fmt(now))
if failures < tonumber(f[4]) and ARGV[11] ~= '1' then
  local at = fmt(now + tonumber(ARGV[5]))
  redis.call('HSET', KEYS[1], 'state', 'retry', 'run_at_us', at)
  redis.call('ZADD', KEYS[3], at, ARGV[1])
  return {0, at}
end
redis.call('HSET', KEYS[1], 'state', 'dead', 'finished_at_us', fmt(now))
redis.call('ZADD', KEYS[4], fmt(now), ARGV[1])
trim_dead(KEYS[4], fmt(now - tonumber(ARGV[7])), tonumber(ARGV[8]), ARGV[9], ARGV[10])
return {1, fmt(now)}
"#
);

/// KEYS: from (scheduled/retry zset). ARGV: (unused), job key prefix, queue key prefix, 1 to
/// requeue at the head else 0, most ids per call. Moves members
/// scored before `now` to their queue as ready (members whose job hash is gone are
/// dropped). Returns {moved, examined}: a full `examined` means call again.
const MOVE_DUE: &str = concat!(
    clock_lua!(),
    r#"
-- "due" includes now
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. fmt(now_us() + 1), 'LIMIT', 0, tonumber(ARGV[5]))
local moved = 0
for _, id in ipairs(ids) do
  local job = ARGV[2] .. id
  local name = redis.call('HGET', job, 'queue')
  redis.call('ZREM', KEYS[1], id)
  if name then
    local queue = ARGV[3] .. name
    redis.call('HSET', job, 'state', 'ready')
    redis.call('HDEL', job, 'worker', 'lease')
    if ARGV[4] == '1' then redis.call('RPUSH', queue, id) else redis.call('LPUSH', queue, id) end
    moved = moved + 1
  end
end
return {moved, #ids}
"#
);

/// KEYS: running, dead. ARGV: (unused), job key prefix, queue key prefix, lease-set key
/// prefix, most leases per call, max reaps, the buried job's error, dead max age (µs), dead
/// max count, idem key prefix. Every lease whose deadline passed (its worker died): the
/// jobs still held under it go back to the head of their queue, or to the dead set once
/// their worker died under them `max reaps` times. Returns {handled, examined}.
const REAP: &str = concat!(
    clock_lua!(),
    trim_dead_lua!(),
    r#"
local now = now_us()
local leases = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. fmt(now), 'LIMIT', 0, tonumber(ARGV[5]))
local moved, buried = 0, 0
for _, lease in ipairs(leases) do
  local set = ARGV[4] .. lease
  for _, id in ipairs(redis.call('SMEMBERS', set)) do
    local job = ARGV[2] .. id
    local f = redis.call('HMGET', job, 'state', 'lease', 'queue')
    if f[1] == 'running' and f[2] == lease and f[3] then
      redis.call('HDEL', job, 'worker', 'lease')
      if redis.call('HINCRBY', job, 'reaped', 1) >= tonumber(ARGV[6]) then
        redis.call('HSET', job, 'state', 'dead', 'finished_at_us', fmt(now), 'last_error', ARGV[7])
        redis.call('ZADD', KEYS[2], fmt(now), id)
        buried = buried + 1
      else
        redis.call('HSET', job, 'state', 'ready')
        redis.call('RPUSH', ARGV[3] .. f[3], id)
      end
      moved = moved + 1
    end
  end
  redis.call('DEL', set)
  redis.call('ZREM', KEYS[1], lease)
end
if buried > 0 then trim_dead(KEYS[2], fmt(now - tonumber(ARGV[8])), tonumber(ARGV[9]), ARGV[2], ARGV[10]) end
return {moved, #leases}
"#
);

/// KEYS: job. ARGV: id, action (`retry`, `kill`, `delete`, or `bury` for a running job
/// whose hash cannot be read), key namespace prefix (`{ns}:`), (unused), dead max age (µs), dead
/// max count, and optionally the state the job must be in. An operator's action on one
/// job: takes it out of wherever it is (its queue list, its lease, or its state's sorted
/// set; the sorted sets are named after the states) and puts it where the action says. Returns
/// `ok`, `missing`, or the state that refuses the action.
const ACT: &str = concat!(
    clock_lua!(),
    trim_dead_lua!(),
    release_lua!(),
    r#"
local job, id, action, ns = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local now_n = now_us()
local now = fmt(now_n)
local state = redis.call('HGET', job, 'state')
if not state then return 'missing' end
if ARGV[7] and ARGV[7] ~= state then return state end
if state == 'done' or (state == 'running' and action ~= 'bury') then return state end
if (action == 'retry' and state == 'ready') or (action == 'kill' and state == 'dead') then return 'ok' end
local queue = redis.call('HGET', job, 'queue')
if state == 'ready' then redis.call('LREM', ns .. 'queue:' .. (queue or ''), 0, id)
elseif state == 'running' then
  local lease = redis.call('HGET', job, 'lease')
  if lease then release(ns .. 'lease:', ns .. 'running', lease, {id}) end
else redis.call('ZREM', ns .. state, id) end
if action == 'delete' then
  local key = redis.call('HGET', job, 'idempotency_key')
  if key then redis.call('DEL', ns .. 'idem:' .. key) end
  redis.call('DEL', job)
elseif action == 'retry' then
  redis.call('HSET', job, 'state', 'ready', 'run_at_us', now)
  redis.call('HDEL', job, 'finished_at_us')
  redis.call('SADD', ns .. 'queues', queue)
  redis.call('LPUSH', ns .. 'queue:' .. queue, id)
else
  if not redis.call('HGET', job, 'last_error') then redis.call('HSET', job, 'last_error', 'killed by an operator') end
  redis.call('HSET', job, 'state', 'dead', 'finished_at_us', now)
  redis.call('HDEL', job, 'worker', 'lease')
  redis.call('ZADD', ns .. 'dead', now, id)
  trim_dead(ns .. 'dead', fmt(now_n - tonumber(ARGV[5])), tonumber(ARGV[6]), ns .. 'job:', ns .. 'idem:')
end
return 'ok'
"#
);

/// KEYS: queue. ARGV: job key prefix, idem key prefix, chunk size. Deletes up to a chunk
/// of a queue's ready jobs (from the newest end: one `LTRIM`, no per-id `LREM`), with
/// their hashes and idempotency keys. Returns how many ids it took off the list.
const CLEAR_QUEUE: &str = r#"
local n = tonumber(ARGV[3])
local ids = redis.call('LRANGE', KEYS[1], 0, n - 1)
for _, id in ipairs(ids) do
  local job = ARGV[1] .. id
  local key = redis.call('HGET', job, 'idempotency_key')
  if key then redis.call('DEL', ARGV[2] .. key) end
  redis.call('DEL', job)
end
redis.call('LTRIM', KEYS[1], #ids, -1)
return #ids
"#;

pub struct RedisJobQueue {
    client: Client,
    config: QueueConfig,
    keys: Keys,
    enqueue_many: Script,
    fetch: Script,
    heartbeat: Script,
    ack: Script,
    fail: Script,
    move_due: Script,
    reap: Script,
    act: Script,
    clear_queue: Script,
}

/// Key names and prefixes, formatted once at connect.
struct Keys {
    /// `{ns}:`
    ns: String,
    job: String,
    idem: String,
    queue: String,
    queues: String,
    scheduled: String,
    retry: String,
    running: String,
    dead: String,
    /// `{ns}:done:` (hourly buckets follow).
    done: String,
    /// `{ns}:lease:` (a fetch's lease id follows): the ids it holds.
    lease: String,
}

impl Keys {
    fn new(ns: &str) -> Self {
        let k = |rest: &str| format!("{ns}:{rest}");
        Keys {
            ns: k(""),
            job: k("job:"),
            idem: k("idem:"),
            queue: k("queue:"),
            queues: k("queues"),
            scheduled: k("scheduled"),
            retry: k("retry"),
            running: k("running"),
            dead: k("dead"),
            done: k("done:"),
            lease: k("lease:"),
        }
    }

    fn job(&self, id: impl std::fmt::Display) -> String {
        format!("{}{id}", self.job)
    }

    fn queue(&self, name: &str) -> String {
        format!("{}{name}", self.queue)
    }

    /// The sorted set holding a state's ids (ready ids live in queue lists, running ones
    /// in their lease's set, done jobs only in the hourly counts).
    fn set_of(&self, state: JobState) -> Option<&str> {
        match state {
            JobState::Scheduled => Some(&self.scheduled),
            JobState::Retry => Some(&self.retry),
            JobState::Running => None,
            JobState::Dead => Some(&self.dead),
            JobState::Ready | JobState::Done => None,
        }
    }
}

/// Longest one Redis command may take (a dead Redis fails calls after this).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a TCP connect (and handshake) to Redis may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `connect` waits for the first connection before returning anyway.
const CONNECT_WAIT: Duration = Duration::from_secs(2);

/// A fred client that reconnects with backoff forever and times every command out.
pub(crate) fn redis_client(url: &str) -> JobResult<Client> {
    let mut config = Config::from_url(url)?;
    // Keep trying when Redis is down at start, as after any later loss.
    config.fail_fast = false;
    let client = Builder::from_config(config)
        .with_performance_config(|p| p.default_command_timeout = COMMAND_TIMEOUT)
        .with_connection_config(|c| {
            c.connection_timeout = CONNECT_TIMEOUT;
            c.internal_command_timeout = COMMAND_TIMEOUT;
            // A connection that stops answering (a half-open socket) is dropped and
            // made again rather than waited on.
            c.unresponsive.max_timeout = Some(COMMAND_TIMEOUT * 2);
            c.unresponsive.interval = Duration::from_secs(1);
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .build()?;
    // The returned tasks run the callbacks for the client's lifetime; dropping their
    // handles detaches them.
    let _on_reconnect = client.on_reconnect(|server| async move {
        tracing::info!(%server, "connected to Redis");
        Ok(())
    });
    let _on_error = client.on_error(|(error, server)| async move {
        tracing::warn!(%error, server = ?server, "Redis connection lost; reconnecting with backoff");
        Ok(())
    });
    Ok(client)
}

/// One done-count bucket, in µs.
const HOUR_US: i64 = 3_600_000_000;

/// Most ids one scheduler or reaper call moves, so a backlog never blocks Redis long.
const MOVE_CHUNK: u32 = 500;
/// Most ids one queue-clearing call deletes.
const CLEAR_CHUNK: u32 = 500;

impl RedisJobQueue {
    /// A queue on the Redis at `url`, keys under `namespace`. The client reconnects by
    /// itself (exponential backoff, forever) and bounds every command by
    /// [`COMMAND_TIMEOUT`], so a Redis that goes away turns calls into quick errors and
    /// one that comes back is used again without a restart. Waits up to
    /// [`CONNECT_WAIT`] for the first connection; a Redis that is down at start is not
    /// an error (the service starts, and the queue works once Redis is up).
    pub async fn connect(url: &str, namespace: &str, config: QueueConfig) -> JobResult<Self> {
        let client = redis_client(url)?;
        client.connect();
        match tokio::time::timeout(CONNECT_WAIT, client.wait_for_connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Redis is unreachable at start; the job queue retries until it is back")
            }
            Err(_) => tracing::warn!(
                "Redis did not answer within {CONNECT_WAIT:?} at start; the job queue retries until it is back"
            ),
        }
        Ok(RedisJobQueue {
            client,
            config,
            keys: Keys::new(namespace),
            enqueue_many: Script::from_lua(ENQUEUE_MANY),
            fetch: Script::from_lua(FETCH),
            heartbeat: Script::from_lua(HEARTBEAT),
            ack: Script::from_lua(ACK),
            fail: Script::from_lua(FAIL),
            move_due: Script::from_lua(MOVE_DUE),
            reap: Script::from_lua(REAP),
            act: Script::from_lua(ACT),
            clear_queue: Script::from_lua(CLEAR_QUEUE),
        })
    }

    /// Deletes every key of this namespace (benchmarks, decommissioning): a blocking
    /// `KEYS` scan, not for a namespace that is in use.
    pub async fn delete_namespace(&self) -> JobResult<()> {
        let script = "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end return 0";
        let _: i64 = self.client.eval(script, Vec::<String>::new(), vec![format!("{}*", self.keys.ns)]).await?;
        Ok(())
    }

    /// The dead set's age limit in µs (the scripts cut it against Redis's clock).
    fn dead_max_age(&self) -> String {
        dur_us(self.config.dead_max_age).to_string()
    }

    async fn act(&self, id: Uuid, action: &str, expected: Option<JobState>) -> JobResult<Acted> {
        let mut args = vec![
            id.to_string(),
            action.to_owned(),
            self.keys.ns.clone(),
            String::new(),
            self.dead_max_age(),
            self.config.dead_max_jobs.to_string(),
        ];
        args.extend(expected.map(|s| s.as_str().to_owned()));
        let outcome: String = self.act.evalsha_with_reload(&self.client, vec![self.keys.job(id)], args).await?;
        Ok(match outcome.as_str() {
            "ok" => Acted::Done,
            "missing" => Acted::NotFound,
            other => Acted::Refused(
                JobState::parse(other).ok_or_else(|| JobError::Backend(format!("unknown job state {other}")))?,
            ),
        })
    }

    /// The leases of running batches, earliest deadline first.
    async fn running_leases(&self) -> JobResult<Vec<String>> {
        Ok(self.client.zrange(&self.keys.running, 0, -1, None, false, None, false).await?)
    }

    /// The ids of a set, in its order, from `offset`.
    async fn ids(&self, set: &JobSet, offset: u64, limit: u32) -> JobResult<Vec<String>> {
        let start = i64::try_from(offset).unwrap_or(i64::MAX);
        let stop = start.saturating_add(i64::from(limit)) - 1;
        Ok(match set {
            JobSet::Queue(name) => {
                // Workers take from the tail: the next to run is the last element.
                let mut ids: Vec<String> = self.client.lrange(self.keys.queue(name), -stop - 1, -start - 1).await?;
                ids.reverse();
                ids
            }
            JobSet::Dead => self.client.zrange(&self.keys.dead, start, stop, None, true, None, false).await?,
            JobSet::Running => {
                // Leases by deadline, each lease's jobs by id.
                let mut ids = Vec::new();
                for lease in self.running_leases().await? {
                    let mut held: Vec<String> = self.client.smembers(format!("{}{lease}", self.keys.lease)).await?;
                    held.sort();
                    ids.extend(held);
                }
                let from = usize::try_from(offset).unwrap_or(usize::MAX).min(ids.len());
                ids.into_iter().skip(from).take(limit as usize).collect()
            }
            other => match self.keys.set_of(other.state()) {
                Some(key) => self.client.zrange(key, start, stop, None, false, None, false).await?,
                None => Vec::new(),
            },
        })
    }

    async fn move_due(&self, from: &str, now: i64, head: bool) -> JobResult<u64> {
        let mut moved = 0;
        loop {
            let args = vec![
                now.to_string(),
                self.keys.job.clone(),
                self.keys.queue.clone(),
                if head { "1" } else { "0" }.to_owned(),
                MOVE_CHUNK.to_string(),
            ];
            let (n, examined): (i64, i64) =
                self.move_due.evalsha_with_reload(&self.client, vec![from.to_owned()], args).await?;
            moved += u64::try_from(n).unwrap_or(0);
            if examined < i64::from(MOVE_CHUNK) {
                return Ok(moved);
            }
        }
    }

    async fn settle_failure(
        &self,
        id: Uuid,
        lease: Uuid,
        error: &str,
        permanent: bool,
        delay: Option<Duration>,
    ) -> JobResult<Failed> {
        // The delay depends on the failure count; only the lease holder changes it, and
        // the script re-checks it, so reading it first is safe.
        let failures: Option<i64> = self.client.hget(self.keys.job(id), "failures").await?;
        let failures = failures.ok_or(JobError::NotLeased(id))? + 1;
        let n = u32::try_from(failures).unwrap_or(u32::MAX);
        let delay = dur_us(delay.unwrap_or_else(|| self.config.schedule.delay(n, rand::random::<f64>())));
        let keys = vec![self.keys.job(id), self.keys.running.clone(), self.keys.retry.clone(), self.keys.dead.clone()];
        let args = vec![
            id.to_string(),
            lease.to_string(),
            error.to_owned(),
            String::new(),
            delay.to_string(),
            failures.to_string(),
            self.dead_max_age(),
            self.config.dead_max_jobs.to_string(),
            self.keys.job.clone(),
            self.keys.idem.clone(),
            if permanent { "1" } else { "0" }.to_owned(),
            self.keys.lease.clone(),
        ];
        let (outcome, at): (i64, String) = self.fail.evalsha_with_reload(&self.client, keys, args).await?;
        match outcome {
            0 => Ok(Failed::Retry { at: from_us(at.parse().unwrap_or_default()), failures: n }),
            1 => Ok(Failed::Dead),
            _ => Err(JobError::NotLeased(id)),
        }
    }
}

fn parse_job(mut fields: HashMap<String, String>) -> JobResult<Job> {
    let running = fields.get("state").is_some_and(|s| s == "running");
    let mut take = |k: &str| fields.remove(k).ok_or_else(|| JobError::Backend(format!("job hash lacks {k}")));
    let num = |k: &str, v: String| -> JobResult<i64> {
        v.parse().map_err(|_| JobError::Backend(format!("job field {k} is not a number")))
    };
    let id = take("id")?.parse().map_err(|_| JobError::Backend("job id is not a UUID".into()))?;
    let kind = take("kind")?;
    let queue = take("queue")?;
    let args = serde_json::from_str(&take("args")?).map_err(|e| JobError::Backend(format!("job args: {e}")))?;
    let idempotency_key = take("idempotency_key")?;
    let state = JobState::parse(&take("state")?).ok_or_else(|| JobError::Backend("unknown job state".into()))?;
    let failures = u32::try_from(num("failures", take("failures")?)?).unwrap_or(u32::MAX);
    let max_attempts = u32::try_from(num("max_attempts", take("max_attempts")?)?).unwrap_or(u32::MAX);
    let enqueued_at = from_us(num("enqueued_at_us", take("enqueued_at_us")?)?);
    let run_at = from_us(num("run_at_us", take("run_at_us")?)?);
    Ok(Job {
        id,
        kind,
        queue,
        args,
        idempotency_key,
        state,
        failures,
        max_attempts,
        enqueued_at,
        run_at,
        // Kept in the hash after a run for speed; meaningful only while running.
        worker: fields.remove("worker").filter(|_| running),
        lease: fields.remove("lease").and_then(|l| l.parse().ok()).filter(|_| running),
        started_at: fields.remove("started_at_us").and_then(|v| v.parse().ok()).map(from_us).filter(|_| running),
        last_error: fields.remove("last_error"),
        failed_at: fields.remove("failed_at_us").and_then(|v| v.parse().ok()).map(from_us),
        finished_at: fields.remove("finished_at_us").and_then(|v| v.parse().ok()).map(from_us),
    })
}

#[async_trait]
impl JobQueue for RedisJobQueue {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn ping(&self) -> JobResult<()> {
        let _: String = self.client.ping(None).await?;
        Ok(())
    }

    async fn enqueue(&self, job: NewJob) -> JobResult<Enqueued> {
        self.enqueue_many(vec![job]).await?.pop().ok_or_else(|| JobError::Backend("enqueue answered nothing".into()))
    }

    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> JobResult<Vec<Enqueued>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let keys = vec![self.keys.scheduled.clone(), self.keys.queues.clone()];
        let mut args = Vec::with_capacity(3 + 7 * jobs.len());
        args.extend([self.keys.job.clone(), self.keys.idem.clone(), self.keys.queue.clone()]);
        let mut ids = Vec::with_capacity(jobs.len());
        for job in jobs {
            let id = Uuid::now_v7();
            ids.push(id);
            let attempts = job.attempts();
            let run_at = job.run_at.map_or(0, |t| t.timestamp_micros().max(0));
            args.extend([
                id.to_string(),
                job.kind,
                job.queue,
                job.args.to_string(),
                job.idempotency_key,
                attempts.to_string(),
                run_at.to_string(),
            ]);
        }
        let existing: Vec<String> = self.enqueue_many.evalsha_with_reload(&self.client, keys, args).await?;
        if existing.len() != ids.len() {
            return Err(JobError::Backend(format!("enqueue answered {} of {} jobs", existing.len(), ids.len())));
        }
        ids.into_iter()
            .zip(existing)
            .map(|(id, held)| {
                if held.is_empty() {
                    Ok(Enqueued::New(id))
                } else {
                    held.parse()
                        .map(Enqueued::Duplicate)
                        .map_err(|_| JobError::Backend("idempotency key holds a non-UUID".into()))
                }
            })
            .collect()
    }

    async fn fetch_many(
        &self,
        queue: &str,
        worker: &str,
        lease: Duration,
        max: u32,
        workers: u32,
    ) -> JobResult<Vec<Job>> {
        let max = max.max(1);
        let keys = vec![self.keys.queue(queue), self.keys.running.clone()];
        let mut args = Vec::with_capacity(7);
        args.extend([
            self.keys.job.clone(),
            worker.to_owned(),
            dur_us(lease).to_string(),
            max.to_string(),
            workers.max(1).to_string(),
        ]);
        let lease_id = Uuid::new_v4().to_string();
        args.extend([lease_id.clone(), self.keys.lease.clone()]);
        let rows: Vec<Vec<Option<String>>> = self.fetch.evalsha_with_reload(&self.client, keys, args).await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for row in rows {
            let mut values = row.into_iter();
            let raw_id = values.next().flatten();
            let mut fields = HashMap::with_capacity(FETCHED_FIELDS.len() + 4);
            fields.insert("lease".to_owned(), lease_id.clone());
            for (name, value) in FETCHED_FIELDS.iter().zip(values) {
                if let Some(v) = value {
                    fields.insert((*name).to_owned(), v);
                }
            }
            if let Some(id) = &raw_id {
                fields.insert("id".into(), id.clone());
            }
            fields.insert("state".into(), "running".into());
            fields.insert("worker".into(), worker.to_owned());
            fields.insert("started_at_us".into(), now_us().to_string());
            match parse_job(fields) {
                Ok(job) => jobs.push(job),
                Err(e) => {
                    // An unreadable job would fail every batch it lands in: bury it.
                    tracing::error!(job_id = ?raw_id, error = %e, "unreadable job hash; moved to the dead set");
                    if let Some(id) = raw_id.and_then(|i| i.parse::<Uuid>().ok()) {
                        self.act(id, "bury", Some(JobState::Running)).await?;
                    }
                }
            }
        }
        Ok(jobs)
    }

    async fn ack_many(&self, leases: &[(Uuid, Uuid)]) -> JobResult<Vec<Uuid>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let keys = vec![self.keys.running.clone(), format!("{}{}", self.keys.done, now_us() / HOUR_US)];
        let now = now_us();
        let retention = self.config.done_retention;
        let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let mut args = Vec::with_capacity(5 + 2 * leases.len());
        args.extend([
            now.to_string(),
            retention_ms.to_string(),
            self.keys.job.clone(),
            self.keys.idem.clone(),
            self.keys.lease.clone(),
        ]);
        for (id, lease) in leases {
            args.push(id.to_string());
            args.push(lease.to_string());
        }
        let acked: Vec<String> = self.ack.evalsha_with_reload(&self.client, keys, args).await?;
        Ok(acked.iter().filter_map(|id| id.parse().ok()).collect())
    }

    async fn heartbeat(&self, id: Uuid, lease: Uuid, duration: Duration) -> JobResult<bool> {
        let keys = vec![self.keys.job(id), self.keys.running.clone()];
        let args = vec![id.to_string(), lease.to_string(), dur_us(duration).to_string()];
        let ok: i64 = self.heartbeat.evalsha_with_reload(&self.client, keys, args).await?;
        Ok(ok == 1)
    }

    async fn ack(&self, id: Uuid, lease: Uuid) -> JobResult<()> {
        if self.ack_many(&[(id, lease)]).await?.is_empty() {
            return Err(JobError::NotLeased(id));
        }
        Ok(())
    }

    async fn fail(&self, id: Uuid, lease: Uuid, error: &str) -> JobResult<Failed> {
        self.settle_failure(id, lease, error, false, None).await
    }

    async fn fail_after(&self, id: Uuid, lease: Uuid, error: &str, delay: Duration) -> JobResult<Failed> {
        self.settle_failure(id, lease, error, false, Some(delay)).await
    }

    async fn snooze(&self, id: Uuid, lease: Uuid, delay: Duration) -> JobResult<()> {
        let failures: Option<i64> = self.client.hget(self.keys.job(id), "failures").await?;
        let failures = failures.ok_or(JobError::NotLeased(id))?;
        let keys = vec![self.keys.job(id), self.keys.running.clone(), self.keys.retry.clone(), self.keys.dead.clone()];
        let args = vec![
            id.to_string(),
            lease.to_string(),
            String::new(),
            "snooze".to_owned(),
            dur_us(delay).to_string(),
            failures.to_string(),
            self.dead_max_age(),
            self.config.dead_max_jobs.to_string(),
            self.keys.job.clone(),
            self.keys.idem.clone(),
            "0".to_owned(),
            self.keys.lease.clone(),
        ];
        let (outcome, _): (i64, String) = self.fail.evalsha_with_reload(&self.client, keys, args).await?;
        if outcome < 0 {
            return Err(JobError::NotLeased(id));
        }
        Ok(())
    }

    async fn bury(&self, id: Uuid, lease: Uuid, error: &str) -> JobResult<()> {
        self.settle_failure(id, lease, error, true, None).await.map(|_| ())
    }

    async fn promote_due(&self) -> JobResult<u64> {
        let now = now_us() + 1; // "due" includes now
        Ok(self.move_due(&self.keys.scheduled, now, false).await? + self.move_due(&self.keys.retry, now, false).await?)
    }

    async fn reap_expired(&self) -> JobResult<u64> {
        let mut moved = 0;
        let now = now_us();
        loop {
            let args = vec![
                now.to_string(),
                self.keys.job.clone(),
                self.keys.queue.clone(),
                self.keys.lease.clone(),
                MOVE_CHUNK.to_string(),
                super::MAX_REAPS.to_string(),
                super::reaped_error(super::MAX_REAPS),
                self.dead_max_age(),
                self.config.dead_max_jobs.to_string(),
                self.keys.idem.clone(),
            ];
            let keys = vec![self.keys.running.clone(), self.keys.dead.clone()];
            let (n, examined): (i64, i64) = self.reap.evalsha_with_reload(&self.client, keys, args).await?;
            moved += u64::try_from(n).unwrap_or(0);
            if examined < i64::from(MOVE_CHUNK) {
                return Ok(moved);
            }
        }
    }

    async fn get(&self, id: Uuid) -> JobResult<Option<Job>> {
        let fields: HashMap<String, String> = self.client.hgetall(self.keys.job(id)).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        parse_job(fields).map(Some)
    }

    async fn find_by_key(&self, key: &str) -> JobResult<Option<Job>> {
        let id: Option<String> = self.client.get(format!("{}{key}", self.keys.idem)).await?;
        let Some(id) = id.and_then(|i| i.parse::<Uuid>().ok()) else { return Ok(None) };
        self.get(id).await
    }

    async fn count(&self, state: JobState) -> JobResult<u64> {
        let n: i64 = match state {
            JobState::Ready => {
                let queues: Vec<String> = self.client.smembers(&self.keys.queues).await?;
                let mut total = 0;
                for q in queues {
                    let len: i64 = self.client.llen(self.keys.queue(&q)).await?;
                    total += len;
                }
                total
            }
            JobState::Running => {
                let mut total = 0;
                for lease in self.running_leases().await? {
                    let n: i64 = self.client.scard(format!("{}{lease}", self.keys.lease)).await?;
                    total += n;
                }
                total
            }
            JobState::Done => {
                let now = now_us();
                let first = (now - dur_us(self.config.done_retention)) / HOUR_US;
                let buckets: Vec<String> = (first..=now / HOUR_US).map(|h| format!("{}{h}", self.keys.done)).collect();
                let counts: Vec<Option<i64>> = self.client.mget(buckets).await?;
                counts.into_iter().flatten().sum()
            }
            other => match self.keys.set_of(other) {
                Some(key) => self.client.zcard(key).await?,
                None => 0,
            },
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn queues(&self) -> JobResult<Vec<QueueStats>> {
        let mut names: Vec<String> = self.client.smembers(&self.keys.queues).await?;
        names.sort();
        let now = now_us();
        let mut stats = Vec::with_capacity(names.len());
        for name in names {
            let key = self.keys.queue(&name);
            let size: i64 = self.client.llen(&key).await?;
            let next: Option<String> = self.client.lindex(&key, -1).await?;
            let mut latency = Duration::ZERO;
            if let Some(id) = next {
                let ready: Option<i64> = self.client.hget(self.keys.job(&id), "run_at_us").await?;
                latency = Duration::from_micros(u64::try_from(ready.map_or(0, |t| now - t)).unwrap_or(0));
            }
            stats.push(QueueStats { name, size: u64::try_from(size).unwrap_or(0), latency });
        }
        Ok(stats)
    }

    async fn head(&self, queue: &str) -> JobResult<Option<(Uuid, Duration)>> {
        let next: Option<String> = self.client.lindex(self.keys.queue(queue), -1).await?;
        let Some(id) = next else { return Ok(None) };
        let ready: Option<i64> = self.client.hget(self.keys.job(&id), "run_at_us").await?;
        let age = Duration::from_micros(u64::try_from(ready.map_or(0, |t| now_us() - t)).unwrap_or(0));
        let id = Uuid::parse_str(&id).map_err(|e| JobError::Backend(format!("queue {queue} holds a bad id: {e}")))?;
        Ok(Some((id, age)))
    }

    async fn scan(&self, set: &JobSet, offset: u64, limit: u32) -> JobResult<Scanned> {
        let ids = self.ids(set, offset, limit).await?;
        let consumed = ids.len() as u64;
        if ids.is_empty() {
            return Ok(Scanned { jobs: Vec::new(), consumed });
        }
        let pipeline = self.client.pipeline();
        for id in &ids {
            let _: () = pipeline.hgetall(self.keys.job(id)).await?;
        }
        let hashes: Vec<HashMap<String, String>> = pipeline.all().await?;
        // A hash that vanished between the two reads (finished, trimmed) is skipped.
        let jobs = hashes
            .into_iter()
            .enumerate()
            .filter(|(_, h)| !h.is_empty())
            .map(|(i, h)| Ok((offset + i as u64, parse_job(h)?)))
            .collect::<JobResult<Vec<_>>>()?;
        Ok(Scanned { jobs, consumed })
    }

    async fn retry_now(&self, id: Uuid) -> JobResult<Acted> {
        self.act(id, "retry", None).await
    }

    async fn kill(&self, id: Uuid) -> JobResult<Acted> {
        self.act(id, "kill", None).await
    }

    async fn delete(&self, id: Uuid) -> JobResult<Acted> {
        self.act(id, "delete", None).await
    }

    async fn retry_all(&self, set: &JobSet) -> JobResult<u64> {
        if !matches!(set, JobSet::Scheduled | JobSet::Retry | JobSet::Dead) {
            return Ok(0);
        }
        self.act_on_all(set, "retry").await
    }

    async fn kill_all(&self, set: &JobSet) -> JobResult<u64> {
        if !matches!(set, JobSet::Scheduled | JobSet::Retry) {
            return Ok(0);
        }
        self.act_on_all(set, "kill").await
    }

    async fn delete_all(&self, set: &JobSet) -> JobResult<u64> {
        match set {
            JobSet::Running => Ok(0),
            JobSet::Queue(name) => self.clear_queue(name).await,
            _ => self.act_on_all(set, "delete").await,
        }
    }
}

impl RedisJobQueue {
    /// Applies `action` to a snapshot of the set's ids, one atomic step per job (each
    /// checks the job is still in the set's state), so a big set never blocks Redis.
    async fn act_on_all(&self, set: &JobSet, action: &str) -> JobResult<u64> {
        let ids = self.ids(set, 0, u32::MAX).await?;
        let mut n = 0;
        for id in ids {
            let Ok(id) = id.parse::<Uuid>() else { continue };
            if self.act(id, action, Some(set.state())).await? == Acted::Done {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Deletes a queue's ready jobs a chunk at a time, up to the length it had when
    /// asked (jobs enqueued meanwhile stay).
    async fn clear_queue(&self, name: &str) -> JobResult<u64> {
        let key = self.keys.queue(name);
        let len: i64 = self.client.llen(&key).await?;
        let mut left = u64::try_from(len).unwrap_or(0);
        let mut deleted = 0;
        while left > 0 {
            let chunk = u32::try_from(left.min(u64::from(CLEAR_CHUNK))).unwrap_or(CLEAR_CHUNK);
            let args = vec![self.keys.job.clone(), self.keys.idem.clone(), chunk.to_string()];
            let n: i64 = self.clear_queue.evalsha_with_reload(&self.client, vec![key.clone()], args).await?;
            let n = u64::try_from(n).unwrap_or(0);
            if n == 0 {
                break;
            }
            deleted += n;
            left = left.saturating_sub(n);
        }
        Ok(deleted)
    }
}
