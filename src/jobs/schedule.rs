//! The retry schedule: Sidekiq's, so operators' intuition carries over.
//!
//! Before retry `n` (1-based) the job waits `c⁴ + 15 s + rand(0..10)·(c + 1) s` with
//! `c = n − 1` (Sidekiq counts retries from 0): about 15 s, 16 s, 31 s, 96 s, 271 s, …
//! and ~17 days in all over the default 25 attempts. A time scale divides every delay,
//! so tests run the real schedule fast without a second code path; jitter can be
//! switched off where exact times matter.

use std::time::Duration;

/// Attempts before a job goes to the dead set (Sidekiq's default).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 25;

/// Retry delays for one deployment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrySchedule {
    /// 1.0 in production; e.g. 100.0 in tests makes a 15 s delay 150 ms.
    pub time_scale: f64,
    /// Random spread so retries of many jobs failing together do not stampede.
    pub jitter: bool,
}

impl Default for RetrySchedule {
    fn default() -> Self {
        RetrySchedule { time_scale: 1.0, jitter: true }
    }
}

impl RetrySchedule {
    /// The delay before retry number `n` (n ≥ 1), with `unit` in `[0, 1)` for jitter.
    pub fn delay(&self, n: u32, unit: f64) -> Duration {
        let c = f64::from(n.max(1) - 1);
        let steps = if self.jitter { (unit.clamp(0.0, 0.999_999) * 10.0).floor() } else { 0.0 };
        let secs = c.powi(4) + 15.0 + steps * (c + 1.0);
        Duration::from_secs_f64(secs / self.time_scale.max(f64::MIN_POSITIVE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_sidekiq_without_jitter() {
        let s = RetrySchedule { jitter: false, ..RetrySchedule::default() };
        let secs: Vec<u64> = (1..=6).map(|n| s.delay(n, 0.7).as_secs()).collect();
        assert_eq!(secs, [15, 16, 31, 96, 271, 640]);
    }

    #[test]
    fn jitter_adds_up_to_nine_steps_of_c_plus_one() {
        let s = RetrySchedule::default();
        assert_eq!(s.delay(1, 0.999).as_secs(), 15 + 9);
        assert_eq!(s.delay(3, 0.999).as_secs(), 16 + 15 + 9 * 3);
        assert_eq!(s.delay(3, 0.0).as_secs(), 31);
    }

    #[test]
    fn grows_and_scales() {
        let s = RetrySchedule::default();
        // At equal jitter every retry waits longer than the one before (with different
        // jitter the first few may swap, as in Sidekiq).
        for n in 1..DEFAULT_MAX_ATTEMPTS {
            for unit in [0.0, 0.5, 0.999] {
                assert!(s.delay(n + 1, unit) > s.delay(n, unit), "retry {n} at jitter {unit}");
            }
        }
        let fast = RetrySchedule { time_scale: 100.0, jitter: false };
        assert_eq!(fast.delay(1, 0.0), Duration::from_millis(150));
        let total: f64 = (1..DEFAULT_MAX_ATTEMPTS).map(|n| s.delay(n, 0.5).as_secs_f64()).sum();
        assert!((15.0..20.0).contains(&(total / 86_400.0)), "about 17 days in all: {} days", total / 86_400.0);
    }
}
