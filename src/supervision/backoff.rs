//! Restart delays: exponential with jitter, so a crash-looping child does not spin.

use std::time::Duration;

use super::spec::Backoff;

impl Backoff {
    /// The delay before restart number `n` (1-based) of a child, with `unit` a random
    /// number in `[0, 1)` for the jitter.
    pub fn delay(&self, n: u32, unit: f64) -> Duration {
        let exp = n.saturating_sub(1).min(30);
        let base = self.initial.saturating_mul(1u32 << exp).min(self.max);
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 - jitter + 2.0 * jitter * unit.clamp(0.0, 1.0);
        base.mul_f64(factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1), jitter: 0.0 };
        let delays: Vec<u128> = (1..=6).map(|n| b.delay(n, 0.5).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1), jitter: 0.2 };
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(80));
        assert_eq!(b.delay(1, 0.999_999).as_millis(), 119);
    }
}
