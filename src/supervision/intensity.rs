//! Restart intensity bookkeeping: a sliding window of restart times.

use std::collections::VecDeque;
use tokio::time::Instant;

use super::spec::Intensity;

/// Remembers recent restarts and says when one more is one too many.
#[derive(Debug, Clone)]
pub struct RestartWindow {
    limit: Intensity,
    /// Restart times within the last `limit.period`, oldest first.
    recent: VecDeque<Instant>,
}

impl RestartWindow {
    pub fn new(limit: Intensity) -> Self {
        RestartWindow { limit, recent: VecDeque::new() }
    }

    /// Records a restart at `now`; `false` when it exceeds the intensity (escalate).
    pub fn allow(&mut self, now: Instant) -> bool {
        while self.recent.front().is_some_and(|t| now.saturating_duration_since(*t) > self.limit.period) {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        self.recent.len() <= self.limit.max_restarts
    }

    /// Changes the limit (a supervisor whose children come and go scales it with them).
    pub fn set_limit(&mut self, limit: Intensity) {
        self.limit = limit;
    }

    /// Restarts in the current window.
    pub fn count(&self) -> usize {
        self.recent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fourth_restart_within_five_seconds_escalates() {
        let mut w = RestartWindow::new(Intensity::default());
        let t0 = Instant::now();
        assert!(w.allow(t0));
        assert!(w.allow(t0 + Duration::from_secs(1)));
        assert!(w.allow(t0 + Duration::from_secs(2)));
        assert!(!w.allow(t0 + Duration::from_secs(3)), "the 4th restart within 5 s escalates");
    }

    #[test]
    fn restarts_spread_over_ten_seconds_do_not() {
        let mut w = RestartWindow::new(Intensity::default());
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(w.allow(t0 + Duration::from_secs(5 * i)), "restart {i} at {}s", 5 * i);
        }
        // And a steady trickle never escalates either.
        for i in 3..20 {
            assert!(w.allow(t0 + Duration::from_secs(2 * i + 10)));
        }
        assert!(w.count() <= 3);
    }
}
