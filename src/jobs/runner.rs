//! Runs jobs: lease a batch, run it by kind (each kind's [`JobKind::run_batch`] gets
//! all of its jobs at once, the kinds concurrently) under a timeout with the lease kept
//! alive, then ack the successes of each kind as it finishes and fail the rest. The
//! worker actors call [`Runner::run_next`] in a loop; the benchmark drives the same code.
//!
//! A handler's panic, error or timeout is a failed attempt (retried on Sidekiq's
//! schedule), never a crashed worker. A worker that dies mid-job (killed, process gone)
//! stops heartbeating; the reaper returns the job once its lease lapses and it runs
//! again, which is why every handler is idempotent.
//!
//! [`JobKind::run_batch`]: super::kinds::JobKind::run_batch

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::Notify;
use tracing::Instrument;
use uuid::Uuid;

use super::kinds::{JobContext, JobFailure, Kinds};
use super::{Enqueued, Failed, Job, JobError, JobQueue, JobResult, NewJob};

/// How a worker pool runs.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Queues a worker takes from, each call starting at the next one in turn.
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

    pub async fn enqueue(&self, job: NewJob) -> JobResult<Enqueued> {
        self.enqueue_many(vec![job]).await?.pop().ok_or_else(|| JobError::Backend("enqueue answered nothing".into()))
    }

    /// Enqueues a batch in one round trip (a consumer's batch of events' jobs).
    pub async fn enqueue_many(&self, mut jobs: Vec<NewJob>) -> JobResult<Vec<Enqueued>> {
        for job in &mut jobs {
            if job.max_attempts.is_none() {
                job.max_attempts = self.max_attempts.get(&job.kind).copied();
            }
        }
        let kinds: Vec<String> = jobs.iter().map(|j| j.kind.clone()).collect();
        let outcomes = self.queue.enqueue_many(jobs).await?;
        let mut new = 0;
        for (kind, outcome) in kinds.into_iter().zip(&outcomes) {
            if let Enqueued::New(_) = outcome {
                metrics::counter!("eventra_jobs_enqueued_total", "kind" => kind).increment(1);
                new += 1;
            }
        }
        if new > 0 {
            // One idle worker per new job (at most all of them) looks at the queue at once.
            for _ in 0..new.min(64) {
                self.wake.notify_one();
            }
        }
        Ok(outcomes)
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

/// How one kind's share of a batch ended.
enum Outcome {
    Succeeded,
    Failed(JobFailure),
}

pub struct Runner {
    client: JobClient,
    kinds: Kinds,
    config: RunnerConfig,
    metrics: Mutex<HashMap<String, KindMetrics>>,
    draining: AtomicBool,
    /// Which queue the next call starts at.
    turn: std::sync::atomic::AtomicUsize,
}

impl Runner {
    pub fn new(client: JobClient, kinds: Kinds, config: RunnerConfig) -> Self {
        Runner {
            client,
            kinds,
            config,
            metrics: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            turn: std::sync::atomic::AtomicUsize::new(0),
        }
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

    /// Leases the next jobs of a non-empty queue and runs them to their settlement.
    /// Each call starts at the next queue in turn, so with several queues (email and
    /// index jobs in one process) a busy one never starves another. `Ok(false)` when
    /// every queue is empty (or the pool is draining).
    pub async fn run_next(&self, worker: &str) -> JobResult<bool> {
        let c = &self.config;
        let n = c.queues.len().max(1);
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % n;
        for queue in c.queues.iter().cycle().skip(start).take(c.queues.len()) {
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

    /// Runs a leased batch: every kind's jobs go to that kind at once, the kinds run
    /// concurrently, and each kind's outcomes are settled as soon as it finishes
    /// (successes acked together), while one heartbeat every third of the lease keeps
    /// the rest of the batch leased. If the lease is lost (the reaper took the batch
    /// back), the results still outstanding are dropped: the jobs run again elsewhere.
    ///
    /// The groups, their settlements and the heartbeat are futures of one `select!`,
    /// never awaited inside one another's arm: each may wait for the same pooled
    /// connection (SQLite has one writer), and a future that holds it must keep being
    /// polled while another waits for it.
    async fn run_batch(&self, jobs: Vec<Job>) {
        // Groups of (kind, lease): a fetch leases a batch under one lease id.
        let mut groups: Vec<(String, Uuid, Vec<usize>)> = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            let Some(lease) = job.lease else { continue };
            match groups.iter_mut().find(|(k, l, _)| *k == job.kind && *l == lease) {
                Some((_, _, members)) => members.push(i),
                None => groups.push((job.kind.clone(), lease, vec![i])),
            }
        }
        let unsettled: Mutex<Vec<bool>> = Mutex::new(jobs.iter().map(|j| j.lease.is_some()).collect());
        let jobs = &jobs;
        let unsettled = &unsettled;
        let work = futures_util::future::join_all(groups.into_iter().map(|(kind, lease, members)| async move {
            let (members, outcomes) = self.run_group(jobs, kind, lease, members).await;
            {
                let mut u = unsettled.lock().unwrap_or_else(|e| e.into_inner());
                for i in &members {
                    u[*i] = false;
                }
            }
            self.settle(jobs, &members, outcomes).await;
        }));
        let keep_alive = async {
            let every = self.config.lease / 3;
            let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                beat.tick().await;
                let held: Vec<(Uuid, Uuid)> = {
                    let u = unsettled.lock().unwrap_or_else(|e| e.into_inner());
                    jobs.iter().zip(u.iter()).filter(|(_, u)| **u).filter_map(|(j, _)| Some((j.id, j.lease?))).collect()
                };
                if !self.heartbeat(&held).await {
                    return held.len();
                }
            }
        };
        tokio::select! {
            _ = work => {}
            lost = keep_alive => {
                tracing::warn!(jobs = lost, "lease lost while running (the reaper took the jobs back); their results are dropped");
            }
        }
    }

    /// Runs one kind's share of a batch under the timeout, with panics caught.
    async fn run_group(
        &self,
        jobs: &[Job],
        kind: String,
        lease: Uuid,
        members: Vec<usize>,
    ) -> (Vec<usize>, Vec<Outcome>) {
        let batch: Vec<&Job> = members.iter().map(|i| &jobs[*i]).collect();
        let Some(handler) = self.kinds.get(&kind) else {
            let known = self.kinds.names();
            let failure = JobFailure::new(format!("unknown job kind {kind:?} (this worker runs {known:?})"));
            return (members, batch.iter().map(|_| Outcome::Failed(failure.clone())).collect());
        };
        let metrics = self.metrics_for(&kind);
        metrics.started.increment(batch.len() as u64);
        let span = tracing::info_span!("jobs", kind = %kind, jobs = batch.len(), first_job_id = %batch[0].id);
        let ctx = JobContext::new(self.client.queue.clone(), batch[0].id, lease, self.config.lease);
        let started = Instant::now();
        let run =
            tokio::time::timeout(self.config.timeout, AssertUnwindSafe(handler.run_batch(&batch, &ctx)).catch_unwind())
                .instrument(span)
                .await;
        let elapsed = started.elapsed().as_secs_f64();
        for _ in &batch {
            metrics.duration.record(elapsed);
        }
        let all = |failure: JobFailure| batch.iter().map(|_| Outcome::Failed(failure.clone())).collect::<Vec<_>>();
        let outcomes = match run {
            Ok(Ok(results)) if results.len() == batch.len() => results
                .into_iter()
                .map(|r| match r {
                    Ok(()) => Outcome::Succeeded,
                    Err(f) => Outcome::Failed(f),
                })
                .collect(),
            Ok(Ok(results)) => all(JobFailure::new(format!(
                "job kind {kind} answered {} outcomes for {} jobs",
                results.len(),
                batch.len()
            ))),
            Ok(Err(panic)) => all(JobFailure::new(format!("handler panicked: {}", panic_message(&panic)))),
            Err(_) => all(JobFailure::new(format!("timed out after {:?}", self.config.timeout))),
        };
        (members, outcomes)
    }

    /// Acks a group's successes in one call and records its failures.
    async fn settle(&self, jobs: &[Job], members: &[usize], outcomes: Vec<Outcome>) {
        let mut leases = Vec::new();
        let mut kinds: HashMap<Uuid, KindMetrics> = HashMap::new();
        let mut failures = Vec::new();
        for (i, outcome) in members.iter().zip(outcomes) {
            let job = &jobs[*i];
            let Some(lease) = job.lease else { continue };
            let metrics = self.metrics_for(&job.kind);
            match outcome {
                Outcome::Succeeded => {
                    leases.push((job.id, lease));
                    kinds.insert(job.id, metrics);
                }
                Outcome::Failed(failure) => {
                    let span =
                        tracing::info_span!("job", job_id = %job.id, kind = %job.kind, attempt = job.failures + 1);
                    failures
                        .push(async move { self.settle_failure(job, lease, failure, &metrics).instrument(span).await });
                }
            }
        }
        // Recorded concurrently: a batch of snoozed deliveries is one pipeline to Redis,
        // not one round trip after another.
        futures_util::future::join_all(failures).await;
        if leases.is_empty() {
            return;
        }
        match self.client.queue.ack_many(&leases).await {
            Ok(acked) => {
                for id in &acked {
                    if let Some(m) = kinds.get(id) {
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
        if failure.snooze {
            let delay = failure.retry_in.unwrap_or(Duration::from_secs(1));
            match self.client.queue.snooze(job.id, lease, delay).await {
                Ok(()) => tracing::debug!(reason = %failure.message, ?delay, "job snoozed"),
                Err(e) => tracing::warn!(error = %e, "could not snooze the job; the reaper returns it"),
            }
            return;
        }
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
        let failed = match failure.retry_in {
            Some(delay) => self.client.queue.fail_after(job.id, lease, &error, delay).await,
            None => self.client.queue.fail(job.id, lease, &error).await,
        };
        match failed {
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

    /// Extends every lease among `held` (job id, lease) pairs once; `false` when one of
    /// them is gone.
    async fn heartbeat(&self, held: &[(Uuid, Uuid)]) -> bool {
        let mut extended: Vec<Uuid> = Vec::new();
        for (id, lease) in held {
            if extended.contains(lease) {
                continue;
            }
            match self.client.queue.heartbeat(*id, *lease, self.config.lease).await {
                Ok(true) => extended.push(*lease),
                Ok(false) => return false,
                Err(e) => tracing::warn!(error = %e, "heartbeat failed; trying again next beat"),
            }
        }
        true
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
