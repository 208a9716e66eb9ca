//! Runs jobs: take one, run its kind's handler under a timeout with its lease kept
//! alive, then ack or fail it. The worker actors call [`Runner::run_next`] in a loop;
//! the benchmark drives the same code.
//!
//! A handler's panic, error or timeout is a failed attempt (retried on Sidekiq's
//! schedule), never a crashed worker. A worker that dies mid-job (killed, process gone)
//! stops heartbeating; the reaper returns the job once its lease lapses and it runs
//! again, which is why every handler is idempotent.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::Notify;
use tracing::Instrument;
use uuid::Uuid;

use super::kinds::{JobFailure, Kinds};
use super::{Enqueued, Failed, Job, JobError, JobQueue, JobResult, NewJob};

/// How a worker pool runs.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Queues in priority order: a worker takes from the first that has a job.
    pub queues: Vec<String>,
    /// How long a fetched job stays leased without a heartbeat (heartbeats come every
    /// third of it); the time after which a dead worker's job runs again.
    pub lease: Duration,
    /// Longest one run may take before it counts as a failure.
    pub timeout: Duration,
    /// How long an idle worker waits before looking again (an enqueue in this process
    /// wakes it at once).
    pub idle_poll: Duration,
    /// Most jobs one worker leases at once (run one after another, acked together).
    /// A worker never takes more than its fair share of a queue, so a shallow queue
    /// still spreads over idle workers; 1 turns batching off.
    pub batch: u32,
    /// Workers sharing the queue in this process (for the fair share).
    pub workers: u32,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            queues: vec!["default".into()],
            lease: Duration::from_secs(30),
            timeout: Duration::from_secs(300),
            idle_poll: Duration::from_millis(200),
            batch: 25,
            workers: 10,
        }
    }
}

/// The queue as producers use it: enqueue (filling in each kind's attempt limit), and
/// wake an idle worker of this process.
#[derive(Clone)]
pub struct JobClient {
    pub queue: Arc<dyn JobQueue>,
    wake: Arc<Notify>,
    max_attempts: Arc<HashMap<String, u32>>,
}

impl JobClient {
    /// A client for `queue`; jobs of the `kinds` listed get their kind's attempt limit
    /// unless they set one.
    pub fn new(queue: Arc<dyn JobQueue>, kinds: &Kinds) -> Self {
        JobClient { queue, wake: Arc::new(Notify::new()), max_attempts: Arc::new(kinds.max_attempts()) }
    }

    pub async fn enqueue(&self, mut job: NewJob) -> JobResult<Enqueued> {
        if job.max_attempts.is_none() {
            job.max_attempts = self.max_attempts.get(&job.kind).copied();
        }
        let kind = job.kind.clone();
        let outcome = self.queue.enqueue(job).await?;
        if let Enqueued::New(_) = outcome {
            metrics::counter!("eventra_jobs_enqueued_total", "kind" => kind).increment(1);
            self.wake.notify_one();
        }
        Ok(outcome)
    }

    /// Wakes every idle worker of this process (after an operator's retry).
    pub fn wake_all(&self) {
        self.wake.notify_waiters();
    }
}

/// One kind's metric handles, looked up once rather than per job.
#[derive(Clone)]
struct KindMetrics {
    started: metrics::Counter,
    succeeded: metrics::Counter,
    failed: metrics::Counter,
    retried: metrics::Counter,
    dead: metrics::Counter,
    duration: metrics::Histogram,
}

impl KindMetrics {
    fn new(kind: &str) -> Self {
        let k = kind.to_owned();
        KindMetrics {
            started: metrics::counter!("eventra_jobs_started_total", "kind" => k.clone()),
            succeeded: metrics::counter!("eventra_jobs_succeeded_total", "kind" => k.clone()),
            failed: metrics::counter!("eventra_jobs_failed_total", "kind" => k.clone()),
            retried: metrics::counter!("eventra_jobs_retried_total", "kind" => k.clone()),
            dead: metrics::counter!("eventra_jobs_dead_total", "kind" => k.clone()),
            duration: metrics::histogram!("eventra_job_duration_seconds", "kind" => k),
        }
    }
}

/// Successes are acked once the oldest has waited this long (checked as each job of
/// the batch finishes), else with the rest of the batch.
const MAX_ACK_DELAY: Duration = Duration::from_millis(100);

/// Successes of a batch waiting for their (shared) ack.
#[derive(Default)]
struct PendingAcks {
    leases: Vec<(Uuid, Uuid)>,
    metrics: HashMap<Uuid, KindMetrics>,
    /// Their positions in the batch.
    positions: Vec<usize>,
    /// When the oldest one succeeded.
    since: Option<Instant>,
}

impl PendingAcks {
    fn add(&mut self, position: usize, id: Uuid, lease: Uuid, metrics: KindMetrics) {
        self.since.get_or_insert_with(Instant::now);
        self.leases.push((id, lease));
        self.metrics.insert(id, metrics);
        self.positions.push(position);
    }
}

/// How one run ended.
enum Outcome {
    Succeeded,
    Failed(JobFailure),
    /// Our lease lapsed mid-run (the reaper gave the job to another worker): leave it.
    LeaseLost,
}

pub struct Runner {
    client: JobClient,
    kinds: Kinds,
    config: RunnerConfig,
    metrics: Mutex<HashMap<String, KindMetrics>>,
    draining: AtomicBool,
}

impl Runner {
    pub fn new(client: JobClient, kinds: Kinds, config: RunnerConfig) -> Self {
        Runner { client, kinds, config, metrics: Mutex::new(HashMap::new()), draining: AtomicBool::new(false) }
    }

    pub fn client(&self) -> &JobClient {
        &self.client
    }

    pub fn config(&self) -> &RunnerConfig {
        &self.config
    }

    /// Shutdown begins: workers finish the batch in hand and take no more, so stopping
    /// them one by one does not leave the others leasing jobs they will not finish.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.client.wake_all();
    }

    /// Leases the next jobs of the first non-empty queue and runs them to their
    /// settlement. `Ok(false)` when every queue is empty (or the pool is draining).
    pub async fn run_next(&self, worker: &str) -> JobResult<bool> {
        let c = &self.config;
        for queue in &c.queues {
            if self.draining.load(Ordering::SeqCst) {
                return Ok(false);
            }
            let jobs = self.client.queue.fetch_many(queue, worker, c.lease, c.batch, c.workers).await?;
            if !jobs.is_empty() {
                self.run_batch(jobs).await;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Waits until an enqueue in this process or the idle poll interval.
    pub async fn idle(&self) {
        let _ = tokio::time::timeout(self.config.idle_poll, self.client.wake.notified()).await;
    }

    fn metrics_for(&self, kind: &str) -> KindMetrics {
        let mut cache = self.metrics.lock().unwrap_or_else(|e| e.into_inner());
        cache.entry(kind.to_owned()).or_insert_with(|| KindMetrics::new(kind)).clone()
    }

    /// Runs leased jobs one after another under one heartbeat (every third of the
    /// lease, for every job of the batch not settled yet); failures settle at once,
    /// successes are acked together, at the end of the batch or when a job finishes
    /// and the oldest waiting success is [`MAX_ACK_DELAY`] old (a worker that dies
    /// before that leaves them to the reaper: at-least-once, as always).
    async fn run_batch(&self, jobs: Vec<Job>) {
        let every = self.config.lease / 3;
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Failed, lost or acked: no longer ours to keep alive.
        let mut settled = vec![false; jobs.len()];
        let mut pending = PendingAcks::default();
        for (i, job) in jobs.iter().enumerate() {
            let Some(lease) = job.lease else { continue };
            let metrics = self.metrics_for(&job.kind);
            let span = tracing::info_span!("job", job_id = %job.id, kind = %job.kind, attempt = job.failures + 1);
            let outcome = self.execute(job, lease, &jobs, &settled, &mut beat, &metrics).instrument(span.clone()).await;
            let _enter = span.enter();
            match outcome {
                Outcome::Succeeded => pending.add(i, job.id, lease, metrics),
                Outcome::Failed(failure) => {
                    settled[i] = true;
                    self.settle_failure(job, lease, failure, &metrics).await;
                }
                Outcome::LeaseLost => {
                    settled[i] = true;
                    tracing::warn!("lease lost while running (the reaper took the job back); its result is dropped");
                }
            }
            // Successes share an ack call, unless the oldest has waited long enough.
            if pending.since.is_some_and(|t| t.elapsed() >= MAX_ACK_DELAY) {
                self.ack(&mut pending, &mut settled).await;
            }
        }
        self.ack(&mut pending, &mut settled).await;
    }

    /// Acks the pending successes in one call.
    async fn ack(&self, pending: &mut PendingAcks, settled: &mut [bool]) {
        let PendingAcks { leases, metrics, positions, since: _ } = std::mem::take(pending);
        if leases.is_empty() {
            return;
        }
        for i in positions {
            settled[i] = true;
        }
        match self.client.queue.ack_many(&leases).await {
            Ok(acked) => {
                for id in &acked {
                    if let Some(m) = metrics.get(id) {
                        m.succeeded.increment(1);
                    }
                }
                if acked.len() < leases.len() {
                    tracing::warn!(
                        lost = leases.len() - acked.len(),
                        "leases lost before the ack; those jobs run again elsewhere (handlers are idempotent)"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not ack; the reaper returns the jobs when their leases lapse"),
        }
    }

    async fn settle_failure(&self, job: &Job, lease: Uuid, failure: JobFailure, metrics: &KindMetrics) {
        metrics.failed.increment(1);
        let error = failure.message;
        if failure.permanent {
            match self.client.queue.bury(job.id, lease, &error).await {
                Ok(()) => {
                    metrics.dead.increment(1);
                    tracing::error!(%error, "job failed permanently; moved to the dead set without retries");
                }
                Err(e) => tracing::warn!(error = %e, "could not bury the job; the reaper returns it"),
            }
            return;
        }
        match self.client.queue.fail(job.id, lease, &error).await {
            Ok(Failed::Retry { at, failures }) => {
                metrics.retried.increment(1);
                tracing::warn!(%error, failures, retry_at = %at, "job failed; retry scheduled");
            }
            Ok(Failed::Dead) => {
                metrics.dead.increment(1);
                tracing::error!(%error, "job failed its last attempt; moved to the dead set");
            }
            Err(JobError::NotLeased(_)) => {
                tracing::warn!("lease lost before the failure was recorded; the job runs again elsewhere")
            }
            Err(e) => tracing::warn!(error = %e, "could not record the failure; the reaper returns the job"),
        }
    }

    /// Runs one handler under the timeout, with panics caught, while the batch's
    /// heartbeat keeps every unsettled lease alive.
    async fn execute(
        &self,
        job: &Job,
        lease: Uuid,
        batch: &[Job],
        settled: &[bool],
        beat: &mut tokio::time::Interval,
        metrics: &KindMetrics,
    ) -> Outcome {
        let Some(kind) = self.kinds.get(&job.kind) else {
            let known = self.kinds.names();
            return Outcome::Failed(JobFailure::new(format!(
                "unknown job kind {:?} (this worker runs {known:?})",
                job.kind
            )));
        };
        metrics.started.increment(1);
        let started = Instant::now();
        let run = tokio::time::timeout(self.config.timeout, AssertUnwindSafe(kind.run(job)).catch_unwind());
        tokio::pin!(run);
        let result = loop {
            tokio::select! {
                r = &mut run => break Some(r),
                _ = beat.tick() => {
                    if !self.heartbeat(batch, settled, job.id, lease).await {
                        break None;
                    }
                }
            }
        };
        metrics.duration.record(started.elapsed().as_secs_f64());
        match result {
            None => Outcome::LeaseLost,
            Some(Ok(Ok(Ok(())))) => Outcome::Succeeded,
            Some(Ok(Ok(Err(failure)))) => Outcome::Failed(failure),
            Some(Ok(Err(panic))) => {
                Outcome::Failed(JobFailure::new(format!("handler panicked: {}", panic_message(&panic))))
            }
            Some(Err(_)) => Outcome::Failed(JobFailure::new(format!("timed out after {:?}", self.config.timeout))),
        }
    }

    /// Extends every unsettled lease of the batch; `false` when the running job's own
    /// lease is gone.
    async fn heartbeat(&self, batch: &[Job], settled: &[bool], running: Uuid, running_lease: Uuid) -> bool {
        let mut own = true;
        // A backend may lease a whole batch under one lease id: extend each lease once.
        let mut extended: Vec<Uuid> = Vec::new();
        for (job, _) in batch.iter().zip(settled).filter(|(_, done)| !**done) {
            let Some(lease) = job.lease else { continue };
            if extended.contains(&lease) {
                continue;
            }
            match self.client.queue.heartbeat(job.id, lease, self.config.lease).await {
                Ok(true) => extended.push(lease),
                Ok(false) => {
                    tracing::warn!(job_id = %job.id, "lease lost (the reaper took the job back)");
                    if job.id == running && lease == running_lease {
                        own = false;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed; trying again next beat"),
            }
        }
        own
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// A shared runner, as the worker actors hold it.
pub type SharedRunner = Arc<Runner>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{JobKind, QueueConfig, SqliteJobQueue};

    struct Picky;

    #[async_trait::async_trait]
    impl JobKind for Picky {
        fn name(&self) -> &'static str {
            "picky"
        }
        fn max_attempts(&self) -> u32 {
            3
        }
        async fn run(&self, _job: &Job) -> Result<(), JobFailure> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_client_gives_jobs_their_kinds_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("jobs.db").display());
        let queue = Arc::new(SqliteJobQueue::open(&url, QueueConfig::default()).await.unwrap());
        let client = JobClient::new(queue.clone(), &Kinds::default().with(Arc::new(Picky)));
        let attempts = |e: Enqueued| async move {
            let Enqueued::New(id) = e else { panic!("duplicate") };
            queue.get(id).await.unwrap().unwrap().max_attempts
        };
        let kinds = client.enqueue(NewJob::new("picky", "a", serde_json::json!({}))).await.unwrap();
        assert_eq!(attempts.clone()(kinds).await, 3, "the kind's limit");
        let own = NewJob { max_attempts: Some(7), ..NewJob::new("picky", "b", serde_json::json!({})) };
        assert_eq!(attempts.clone()(client.enqueue(own).await.unwrap()).await, 7, "the job's own limit wins");
        let other = client.enqueue(NewJob::new("other", "c", serde_json::json!({}))).await.unwrap();
        assert_eq!(attempts(other).await, 25, "Sidekiq's default for kinds it does not know");
    }
}
