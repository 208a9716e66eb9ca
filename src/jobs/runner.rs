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
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            queues: vec!["default".into()],
            lease: Duration::from_secs(30),
            timeout: Duration::from_secs(300),
            idle_poll: Duration::from_millis(200),
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

    /// Takes the next job of the first non-empty queue and runs it to its settlement.
    /// `Ok(false)` when every queue is empty.
    pub async fn run_next(&self, worker: &str) -> JobResult<bool> {
        for queue in &self.config.queues {
            if let Some(job) = self.client.queue.fetch(queue, worker, self.config.lease).await? {
                self.run(job).await;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Waits until an enqueue in this process or the idle poll interval.
    pub async fn idle(&self) {
        let _ = tokio::time::timeout(self.config.idle_poll, self.client.wake.notified()).await;
    }

    async fn run(&self, job: Job) {
        let Some(lease) = job.lease else {
            tracing::error!(job_id = %job.id, "fetched job carries no lease; left for the reaper");
            return;
        };
        let kind = job.kind.clone();
        let span = tracing::info_span!("job", job_id = %job.id, kind = %kind, attempt = job.failures + 1);
        let _enter = span.enter();
        metrics::counter!("eventra_jobs_started_total", "kind" => kind.clone()).increment(1);
        let started = Instant::now();
        let outcome = self.execute(&job, lease).await;
        metrics::histogram!("eventra_job_duration_seconds", "kind" => kind.clone())
            .record(started.elapsed().as_secs_f64());
        let settled = match outcome {
            Ok(()) => self.client.queue.ack(job.id, lease).await.map(|()| {
                metrics::counter!("eventra_jobs_succeeded_total", "kind" => kind.clone()).increment(1);
            }),
            Err(error) => {
                metrics::counter!("eventra_jobs_failed_total", "kind" => kind.clone()).increment(1);
                self.client.queue.fail(job.id, lease, &error).await.map(|failed| match failed {
                    Failed::Retry { at, failures } => {
                        metrics::counter!("eventra_jobs_retried_total", "kind" => kind.clone()).increment(1);
                        tracing::warn!(%error, failures, retry_at = %at, "job failed; retry scheduled");
                    }
                    Failed::Dead => {
                        metrics::counter!("eventra_jobs_dead_total", "kind" => kind.clone()).increment(1);
                        tracing::error!(%error, "job failed its last attempt; moved to the dead set");
                    }
                })
            }
        };
        match settled {
            Ok(()) => {}
            Err(JobError::NotLeased(_)) => {
                tracing::warn!("lease lost before the job settled; it runs again elsewhere (handlers are idempotent)")
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not settle the job; the reaper returns it when its lease lapses")
            }
        }
    }

    /// Runs the handler under the timeout, heartbeating the lease meanwhile.
    async fn execute(&self, job: &Job, lease: uuid::Uuid) -> Result<(), String> {
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
                _ = beat.tick() => match self.client.queue.heartbeat(job.id, lease, self.config.lease).await {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!("lease lost while running (the reaper took the job back)"),
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                },
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
