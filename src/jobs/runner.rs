//! Runs jobs: take one, run its kind's handler under a timeout with its lease kept
//! alive, then ack or fail it. The worker actors call [`Runner::run_next`] in a loop;
//! the benchmark drives the same code.
//!
//! A handler's panic, error or timeout is a failed attempt (retried on Sidekiq's
//! schedule), never a crashed worker. A worker that dies mid-job (killed, process gone)
//! stops heartbeating; the reaper returns the job once its lease lapses and it runs
//! again, which is why every handler is idempotent.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::Notify;

use super::kinds::Kinds;
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
            batch: 10,
            workers: 10,
        }
    }
}

/// The queue as producers use it: enqueue, and wake an idle worker of this process.
#[derive(Clone)]
pub struct JobClient {
    pub queue: Arc<dyn JobQueue>,
    wake: Arc<Notify>,
}

impl JobClient {
    pub fn new(queue: Arc<dyn JobQueue>) -> Self {
        JobClient { queue, wake: Arc::new(Notify::new()) }
    }

    pub async fn enqueue(&self, job: NewJob) -> JobResult<Enqueued> {
        let kind = job.kind.clone();
        let outcome = self.queue.enqueue(job).await?;
        if let Enqueued::New(_) = outcome {
            metrics::counter!("eventra_jobs_enqueued_total", "kind" => kind).increment(1);
            self.wake.notify_one();
        }
        Ok(outcome)
    }
}

impl JobClient {
    /// Wakes every idle worker of this process (after an operator's retry).
    pub fn wake_all(&self) {
        self.wake.notify_waiters();
    }
}

pub struct Runner {
    client: JobClient,
    kinds: Kinds,
    config: RunnerConfig,
}

impl Runner {
    pub fn new(client: JobClient, kinds: Kinds, config: RunnerConfig) -> Self {
        Runner { client, kinds, config }
    }

    pub fn client(&self) -> &JobClient {
        &self.client
    }

    pub fn config(&self) -> &RunnerConfig {
        &self.config
    }

    /// Leases the next jobs of the first non-empty queue and runs them to their
    /// settlement. `Ok(false)` when every queue is empty.
    pub async fn run_next(&self, worker: &str) -> JobResult<bool> {
        let c = &self.config;
        for queue in &c.queues {
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

    /// Runs leased jobs one after another; failures settle at once, successes are acked
    /// together at the end (a worker that dies before that leaves them to the reaper:
    /// at-least-once, as always).
    async fn run_batch(&self, jobs: Vec<Job>) {
        let leased: Vec<(uuid::Uuid, uuid::Uuid)> =
            jobs.iter().filter_map(|j| j.lease.map(|lease| (j.id, lease))).collect();
        let mut succeeded: Vec<(uuid::Uuid, uuid::Uuid)> = Vec::with_capacity(jobs.len());
        let mut kinds: Vec<String> = Vec::with_capacity(jobs.len());
        for (i, job) in jobs.iter().enumerate() {
            let Some(lease) = job.lease else {
                tracing::error!(job_id = %job.id, "fetched job carries no lease; left for the reaper");
                continue;
            };
            // Keep alive what is still ours: the successes awaiting their ack and the
            // jobs not run yet.
            let unsettled: Vec<_> = succeeded.iter().chain(leased.iter().skip(i)).copied().collect();
            if self.run(job, lease, &unsettled).await {
                succeeded.push((job.id, lease));
                kinds.push(job.kind.clone());
            }
        }
        match self.client.queue.ack_many(&succeeded).await {
            Ok(n) => {
                for kind in kinds {
                    metrics::counter!("eventra_jobs_succeeded_total", "kind" => kind).increment(1);
                }
                if n < succeeded.len() as u64 {
                    tracing::warn!(
                        lost = succeeded.len() as u64 - n,
                        "leases lost before the ack; those jobs run again elsewhere (handlers are idempotent)"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not ack; the reaper returns the jobs when their leases lapse"),
        }
    }

    /// Runs one job; `true` when it succeeded (to be acked), else it is settled here.
    async fn run(&self, job: &Job, lease: uuid::Uuid, unsettled: &[(uuid::Uuid, uuid::Uuid)]) -> bool {
        let kind = job.kind.clone();
        let span = tracing::info_span!("job", job_id = %job.id, kind = %kind, attempt = job.failures + 1);
        let _enter = span.enter();
        metrics::counter!("eventra_jobs_started_total", "kind" => kind.clone()).increment(1);
        let started = Instant::now();
        let outcome = self.execute(job, unsettled).await;
        metrics::histogram!("eventra_job_duration_seconds", "kind" => kind.clone())
            .record(started.elapsed().as_secs_f64());
        let Err(error) = outcome else { return true };
        metrics::counter!("eventra_jobs_failed_total", "kind" => kind.clone()).increment(1);
        match self.client.queue.fail(job.id, lease, &error).await {
            Ok(Failed::Retry { at, failures }) => {
                metrics::counter!("eventra_jobs_retried_total", "kind" => kind).increment(1);
                tracing::warn!(%error, failures, retry_at = %at, "job failed; retry scheduled");
            }
            Ok(Failed::Dead) => {
                metrics::counter!("eventra_jobs_dead_total", "kind" => kind).increment(1);
                tracing::error!(%error, "job failed its last attempt; moved to the dead set");
            }
            Err(JobError::NotLeased(_)) => {
                tracing::warn!("lease lost before the failure was recorded; the job runs again elsewhere")
            }
            Err(e) => tracing::warn!(error = %e, "could not record the failure; the reaper returns the job"),
        }
        false
    }

    /// Runs the handler under the timeout, heartbeating the lease meanwhile.
    async fn execute(&self, job: &Job, unsettled: &[(uuid::Uuid, uuid::Uuid)]) -> Result<(), String> {
        let Some(kind) = self.kinds.get(&job.kind) else {
            return Err(format!("unknown job kind {:?} (this worker runs {:?})", job.kind, self.kinds.names()));
        };
        let run = tokio::time::timeout(self.config.timeout, AssertUnwindSafe(kind.run(job)).catch_unwind());
        tokio::pin!(run);
        let beat_every = self.config.lease / 3;
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + beat_every, beat_every);
        let result = loop {
            tokio::select! {
                r = &mut run => break r,
                _ = beat.tick() => {
                    for (id, lease) in unsettled {
                        match self.client.queue.heartbeat(*id, *lease, self.config.lease).await {
                            Ok(true) => {}
                            Ok(false) => tracing::warn!(job_id = %id, "lease lost while running (the reaper took the job back)"),
                            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                        }
                    }
                }
            }
        };
        match result {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(failure))) => Err(failure.0),
            Ok(Err(panic)) => Err(format!("handler panicked: {}", panic_message(&panic))),
            Err(_) => Err(format!("timed out after {:?}", self.config.timeout)),
        }
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
