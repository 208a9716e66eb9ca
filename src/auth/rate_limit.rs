//! Rate limits of the authentication routes (SPEC §8): sign-in, verification and reset
//! attempts, successful or not, per (tenant, email) and per client IP.
//!
//! Both backends run the same algorithm, GCRA (the generic cell rate algorithm): a key
//! may spend `burst` attempts at once, then one more every `period / burst`. "10 a
//! minute" is a burst of 10, refilled at one every 6 s.
//! - **Redis** (`REDIS_URL` set): one Lua script per attempt, timed by Redis's clock, so
//!   the limit holds across every process that shares the Redis. If Redis does not
//!   answer, the process falls back to its own limiter for that attempt (and says so
//!   in the log): an outage must not lock every user out, nor lift the limits.
//! - **In-process** (`governor`, keyed): per process, for the embedded stack.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use fred::clients::Client;
use fred::interfaces::ClientLike as _;
use fred::types::scripts::Script;
use governor::clock::{Clock as _, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

/// GCRA in Redis. KEYS[1]: the key. ARGV: burst, period in microseconds.
/// Returns {1, 0} when allowed, {0, µs until the next attempt is allowed} when not.
const GCRA: &str = r#"
local burst = tonumber(ARGV[1])
local interval = tonumber(ARGV[2]) / burst
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat + interval - burst * interval
if now < allow_at then
  return {0, allow_at - now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, 0}
"#;

/// One limit: `burst` attempts a `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    pub burst: u32,
    pub period: Duration,
}

/// An attempt refused: when the next one would be allowed, and the limit it broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub retry_after: Duration,
    pub limit: Limit,
}

type Local = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

#[derive(Clone)]
pub struct Limiter {
    /// The limit of [`check`](Limiter::check).
    limit: Limit,
    /// One in-process limiter per limit in use (a tenant's key rate is its own).
    local: Arc<std::sync::Mutex<std::collections::HashMap<Limit, Arc<Local>>>>,
    redis: Option<(Client, Script, String)>,
}

impl Limiter {
    /// In-process only.
    pub fn local(limit: Limit) -> Self {
        Limiter { limit, local: Arc::default(), redis: None }
    }

    /// Shared through Redis (keys under `<namespace>:rl:`), with the in-process limiter
    /// as the fallback while Redis is unreachable.
    pub fn redis(limit: Limit, url: &str, namespace: &str) -> Result<Self, String> {
        let client = crate::jobs::redis::redis_client(url).map_err(|e| e.to_string())?;
        client.connect();
        let mut l = Self::local(limit);
        l.redis = Some((client, Script::from_lua(GCRA), format!("{namespace}:rl:")));
        Ok(l)
    }

    pub fn limit(&self) -> Limit {
        self.limit
    }

    /// Spends one attempt of `key`; `Err` when it is over the limit.
    pub async fn check(&self, key: &str) -> Result<(), Refused> {
        self.check_limit(key, self.limit).await
    }

    /// [`check`](Limiter::check) against another limit (a tenant's own rate).
    pub async fn check_limit(&self, key: &str, limit: Limit) -> Result<(), Refused> {
        if let Some((client, script, prefix)) = &self.redis {
            let args = vec![limit.burst.to_string(), limit.period.as_micros().to_string()];
            match script.evalsha_with_reload::<(i64, i64), _, _>(client, vec![format!("{prefix}{key}")], args).await {
                Ok((1, _)) => return Ok(()),
                Ok((_, wait_us)) => {
                    return Err(refused(limit, Duration::from_micros(u64::try_from(wait_us).unwrap_or(0))));
                }
                Err(e) => {
                    metrics::counter!("eventra_rate_limit_fallbacks_total").increment(1);
                    tracing::warn!(error = %e, "rate limit: Redis did not answer; limiting in this process for now");
                }
            }
        }
        let local = match self.local.lock() {
            Ok(mut map) => map.entry(limit).or_insert_with(|| Arc::new(RateLimiter::keyed(quota(limit)))).clone(),
            // A poisoned map (a panic elsewhere while it was held): limit with a fresh one.
            Err(_) => Arc::new(RateLimiter::keyed(quota(limit))),
        };
        match local.check_key(&key.to_owned()) {
            Ok(()) => Ok(()),
            Err(not_until) => Err(refused(limit, not_until.wait_time_from(DefaultClock::default().now()))),
        }
    }

    /// Forgets in-process keys that are back to a full burst (called periodically, so
    /// the map does not grow with every email ever tried).
    pub fn forget_idle(&self) {
        let limiters: Vec<Arc<Local>> = self.local.lock().map(|m| m.values().cloned().collect()).unwrap_or_default();
        for l in limiters {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

fn refused(limit: Limit, wait: Duration) -> Refused {
    metrics::counter!("eventra_rate_limited_total").increment(1);
    Refused { retry_after: wait, limit }
}

fn quota(limit: Limit) -> Quota {
    let burst = NonZeroU32::new(limit.burst.max(1)).unwrap_or(NonZeroU32::MIN);
    let every = limit.period / burst.get();
    Quota::with_period(every.max(Duration::from_micros(1)))
        .unwrap_or_else(|| Quota::per_second(burst))
        .allow_burst(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_then_refusals_with_the_wait() {
        let l = Limiter::local(Limit { burst: 3, period: Duration::from_secs(60) });
        for _ in 0..3 {
            assert!(l.check("a").await.is_ok());
        }
        let refused = l.check("a").await.unwrap_err();
        assert!(refused.retry_after > Duration::from_secs(15) && refused.retry_after <= Duration::from_secs(20));
        // Keys are independent.
        assert!(l.check("b").await.is_ok());
    }
}
