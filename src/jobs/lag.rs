//! Effect lag: how far behind the job workers are, as an API process sees it, and the
//! load shedding that keeps the backlog bounded when the API takes writes faster than
//! the effects can follow.
//!
//! ## Design note: shed while working, buffer while stalled
//! The lag is the age of the next job to run (`JobQueue::head`), sampled a few times a
//! second. When it exceeds the limit and the workers are making progress (the queue's
//! head moved within [`STALL`]), the pipeline is overloaded: writes are refused with 503
//! and `Retry-After`, so clients slow down to what the effects can follow instead of
//! the backlog growing without bound. When the head does not move (no worker running,
//! a worker outage), the pipeline is stalled, not overloaded: writes go on, and the
//! outbox and the queue hold their effects until it runs again, as they do while
//! RabbitMQ or Redis is down (with Redis down there is no sample, and no shedding).

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use super::JobQueue;

/// How often the queue's head is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// A head that has not moved for this long means stalled workers, not overload.
pub const STALL: Duration = Duration::from_secs(5);
/// The queues whose lag is watched: the effects of a write (emails, then its search
/// entries); the worst of them counts.
const QUEUES: [&str; 2] = ["default", super::kinds::index::QUEUE];

#[derive(Debug, Default)]
struct Sample {
    /// Age of the next job to run (zero when the queue is empty or unreadable).
    lag: Duration,
    /// The head as last read, and when a head last left the queue.
    head: Option<Uuid>,
    moved_at: Option<Instant>,
}

/// The lag as an API process sees it (one per process; see the module note).
#[derive(Debug)]
pub struct EffectLag {
    /// Above this lag (while working) writes are shed; zero turns shedding off.
    limit: Duration,
    samples: Mutex<[Sample; 2]>,
}

impl EffectLag {
    /// No monitor: every write is admitted.
    pub fn off() -> Arc<Self> {
        Arc::new(EffectLag { limit: Duration::ZERO, samples: Mutex::default() })
    }

    /// Watches `queue`, shedding writes above `limit` (zero: off, and no sampling). The
    /// sampler ends when the monitor is dropped.
    pub fn spawn(queue: Arc<dyn JobQueue>, limit: Duration) -> Arc<Self> {
        let lag = Arc::new(EffectLag { limit, samples: Mutex::default() });
        if !limit.is_zero() {
            tokio::spawn(sample_loop(Arc::downgrade(&lag), queue));
        }
        lag
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Sample; 2]> {
        self.samples.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err(lag)` when a write should be refused: the workers are behind by more than
    /// the limit and still working through the queue.
    pub fn admit(&self) -> Result<(), Duration> {
        if self.limit.is_zero() {
            return Ok(());
        }
        let samples = self.lock();
        for s in samples.iter() {
            let working = s.moved_at.is_some_and(|t| t.elapsed() < STALL);
            if s.lag > self.limit && working {
                metrics::counter!("eventra_writes_shed_total").increment(1);
                return Err(s.lag);
            }
        }
        Ok(())
    }

    fn record(&self, queue: usize, head: Option<(Uuid, Duration)>) {
        let mut samples = self.lock();
        let Some(s) = samples.get_mut(queue) else { return };
        let (id, lag) = match head {
            Some((id, age)) => (Some(id), age),
            None => (None, Duration::ZERO),
        };
        // Progress is the head leaving the queue (taken by a worker), not a job arriving
        // in an empty one.
        if s.head.is_some() && id != s.head {
            s.moved_at = Some(Instant::now());
        }
        s.head = id;
        s.lag = lag;
        let worst = samples.iter().map(|s| s.lag).max().unwrap_or_default();
        metrics::gauge!("eventra_effect_lag_seconds").set(worst.as_secs_f64());
    }
}

async fn sample_loop(lag: Weak<EffectLag>, queue: Arc<dyn JobQueue>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(lag) = lag.upgrade() else { return };
        for (i, name) in QUEUES.iter().enumerate() {
            match queue.head(name).await {
                Ok(head) => lag.record(i, head),
                // Unreadable (Redis down): no lag known, so nothing is shed.
                Err(_) => lag.record(i, None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lag(limit_ms: u64) -> EffectLag {
        EffectLag { limit: Duration::from_millis(limit_ms), samples: Mutex::default() }
    }

    #[tokio::test(start_paused = true)]
    async fn sheds_only_while_the_head_moves() {
        let l = lag(1000);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        l.record(0, Some((a, Duration::from_millis(1500))));
        assert!(l.admit().is_ok(), "a head seen once has not been seen to move: not known to be working");
        l.record(0, Some((b, Duration::from_millis(500))));
        assert!(l.admit().is_ok(), "under the limit");
        l.record(0, Some((a, Duration::from_millis(1500))));
        assert_eq!(l.admit(), Err(Duration::from_millis(1500)), "over the limit while working");
        // The head stays put: stalled workers, not overload.
        tokio::time::advance(STALL).await;
        l.record(0, Some((a, Duration::from_millis(6500))));
        assert!(l.admit().is_ok(), "stalled: the outbox and queue buffer");
        l.record(0, None);
        assert!(l.admit().is_ok(), "empty");
        assert!(EffectLag::off().admit().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_index_queue_behind_sheds_too() {
        let l = lag(1000);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        l.record(0, None);
        l.record(1, Some((a, Duration::from_millis(100))));
        l.record(1, Some((b, Duration::from_millis(2500))));
        assert_eq!(l.admit(), Err(Duration::from_millis(2500)), "the email queue is empty, the index queue behind");
    }
}
