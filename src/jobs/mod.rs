//! Background jobs: durable queues with reliable fetch, Sidekiq's retry schedule and a
//! dead set, behind one [`JobQueue`] trait.
//!
//! Semantics every backend keeps:
//! - a job has a unique id and an idempotency key; a second enqueue of the key is a no-op
//!   while the first is ready, scheduled, running, retrying, dead, or done within
//!   [`QueueConfig::done_retention`];
//! - `fetch` leases the oldest ready job of a queue to one worker until a deadline and
//!   hands out a lease id; `heartbeat`, `ack` and `fail` must present it, so a worker
//!   whose lease lapsed cannot act on the job's next run; a job whose lease expires (its
//!   worker died) is put back by `reap_expired` and runs again (at-least-once);
//! - `fail` schedules a retry after [`RetrySchedule::delay`] or, after the last attempt,
//!   moves the job to the dead set, which is capped by count and age like Sidekiq's;
//! - `promote_due` moves scheduled and retrying jobs whose time has come to ready.

pub mod dispatch;
pub mod kinds;
pub mod lag;
pub(crate) mod redis;
pub mod runner;
pub mod schedule;
mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

pub use dispatch::jobs_for_event;
pub use kinds::{JobFailure, JobKind, Kinds};
pub use lag::EffectLag;
pub use redis::RedisJobQueue;
pub use runner::{JobClient, Runner, RunnerConfig};
pub use schedule::{RetrySchedule, DEFAULT_MAX_ATTEMPTS};
pub use sqlite::SqliteJobQueue;

/// A job whose worker died under it this many times (its lease lapsed: a crash, an
/// OOM kill, a chaos kill) is buried instead of run again: a poison job must not take
/// workers down forever. Kills are not failed attempts, so this is a separate count.
pub const MAX_REAPS: u32 = 5;

/// The `last_error` of a job buried by the reaper.
pub(crate) fn reaped_error(n: u32) -> String {
    format!("its worker died under it {n} times (crash or kill); buried as a poison job")
}

/// Microseconds since the epoch: how both backends store times, so comparisons are exact.
pub(crate) fn now_us() -> i64 {
    Utc::now().timestamp_micros()
}

pub(crate) fn dur_us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

pub(crate) fn from_us(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Ready,
    Scheduled,
    Running,
    Retry,
    Dead,
    Done,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Ready => "ready",
            JobState::Scheduled => "scheduled",
            JobState::Running => "running",
            JobState::Retry => "retry",
            JobState::Dead => "dead",
            JobState::Done => "done",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [JobState::Ready, JobState::Scheduled, JobState::Running, JobState::Retry, JobState::Dead, JobState::Done]
            .into_iter()
            .find(|st| st.as_str() == s)
    }
}

/// A job to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub kind: String,
    pub queue: String,
    pub args: Value,
    /// Same key, same effect: e.g. `welcome_email:<user id>`.
    pub idempotency_key: String,
    /// `None`: the kind's own limit when enqueued through a [`JobClient`] that knows
    /// the kind, else [`DEFAULT_MAX_ATTEMPTS`].
    pub max_attempts: Option<u32>,
    /// Run no earlier than this (a scheduled job); `None` means now.
    pub run_at: Option<DateTime<Utc>>,
}

impl NewJob {
    pub fn new(kind: impl Into<String>, idempotency_key: impl Into<String>, args: Value) -> Self {
        NewJob {
            kind: kind.into(),
            queue: "default".into(),
            args,
            idempotency_key: idempotency_key.into(),
            max_attempts: None,
            run_at: None,
        }
    }

    /// The attempts this job gets (at least one).
    pub fn attempts(&self) -> u32 {
        self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS).max(1)
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub id: Uuid,
    pub kind: String,
    pub queue: String,
    pub args: Value,
    pub idempotency_key: String,
    pub state: JobState,
    /// Failed attempts so far.
    pub failures: u32,
    pub max_attempts: u32,
    pub enqueued_at: DateTime<Utc>,
    /// When it becomes (or became) ready to run.
    pub run_at: DateTime<Utc>,
    /// The worker holding the lease, while running.
    pub worker: Option<String>,
    /// The current lease, while running: what `heartbeat`/`ack`/`fail` must present.
    pub lease: Option<Uuid>,
    /// When the current run began (its lease was taken), while running.
    pub started_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// When the last failure happened (`run_at - failed_at` is the retry delay).
    pub failed_at: Option<DateTime<Utc>>,
    /// When it finished (done or dead).
    pub finished_at: Option<DateTime<Utc>>,
}

/// What `enqueue` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Enqueued {
    New(Uuid),
    /// The key is taken: nothing was enqueued; the existing job's id.
    Duplicate(Uuid),
}

/// What `fail` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Failed {
    /// Retry number `failures` runs at `at`.
    Retry { at: DateTime<Utc>, failures: u32 },
    /// That was the last attempt.
    Dead,
}

/// Limits of one queue deployment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueConfig {
    pub schedule: RetrySchedule,
    /// Dead set capacity (oldest dropped first) and maximum age.
    pub dead_max_jobs: u64,
    pub dead_max_age: Duration,
    /// How long a finished job still blocks its idempotency key.
    pub done_retention: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            schedule: RetrySchedule::default(),
            dead_max_jobs: 10_000,
            dead_max_age: Duration::from_secs(180 * 86_400),
            done_retention: Duration::from_secs(7 * 86_400),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job {0} is not held under this lease")]
    NotLeased(Uuid),
    #[error("job queue backend: {0}")]
    Backend(String),
}

impl From<sqlx::Error> for JobError {
    fn from(e: sqlx::Error) -> Self {
        JobError::Backend(e.to_string())
    }
}

pub type JobResult<T> = Result<T, JobError>;

/// A durable job queue. Every method is atomic on its own.
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// `redis` or `sqlite`, for logs and `/health/ready`.
    fn backend(&self) -> &'static str;
    /// Answers when the backend does.
    async fn ping(&self) -> JobResult<()>;
    async fn enqueue(&self, job: NewJob) -> JobResult<Enqueued>;
    /// Enqueues several jobs at once (one round trip, one atomic step where the backend
    /// can): what a broker consumer does with a batch of events. One outcome per job.
    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> JobResult<Vec<Enqueued>> {
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            out.push(self.enqueue(job).await?);
        }
        Ok(out)
    }
    /// Leases the oldest ready job of `queue` to `worker` for `lease`.
    async fn fetch(&self, queue: &str, worker: &str, lease: Duration) -> JobResult<Option<Job>> {
        Ok(self.fetch_many(queue, worker, lease, 1, 1).await?.pop())
    }
    /// Extends a lease; `false` when the job is no longer held under `lease`. (Redis
    /// leases a fetched batch under one lease id, so this extends the whole batch.)
    async fn heartbeat(&self, id: Uuid, lease: Uuid, duration: Duration) -> JobResult<bool>;
    /// The job succeeded.
    async fn ack(&self, id: Uuid, lease: Uuid) -> JobResult<()>;
    /// The job failed with `error`: schedule a retry (on the queue's schedule) or bury it.
    async fn fail(&self, id: Uuid, lease: Uuid, error: &str) -> JobResult<Failed>;
    /// [`fail`](JobQueue::fail), retrying after `delay` instead of the queue's schedule
    /// (a kind with a schedule of its own, or a receiver's `Retry-After`).
    async fn fail_after(&self, id: Uuid, lease: Uuid, error: &str, delay: Duration) -> JobResult<Failed>;
    /// The job did not run (its handler chose to wait: a receiver's circuit is open, too
    /// many deliveries in flight): it runs again after `delay`, and no attempt is counted.
    async fn snooze(&self, id: Uuid, lease: Uuid, delay: Duration) -> JobResult<()>;
    /// The job failed in a way no retry can fix (or is unreadable): straight to the
    /// dead set, whatever attempts it has left.
    async fn bury(&self, id: Uuid, lease: Uuid, error: &str) -> JobResult<()>;
    /// Leases up to `max` ready jobs of `queue` at once, under one lease id, but no more
    /// than a fair share (`ceil(ready / workers)`), so a shallow queue still spreads over
    /// idle workers.
    async fn fetch_many(
        &self,
        queue: &str,
        worker: &str,
        lease: Duration,
        max: u32,
        workers: u32,
    ) -> JobResult<Vec<Job>>;
    /// Acks several `(job id, lease id)` pairs; returns the ids that were still leased
    /// (the others ran out their lease and are someone else's now).
    async fn ack_many(&self, leases: &[(Uuid, Uuid)]) -> JobResult<Vec<Uuid>> {
        let mut acked = Vec::with_capacity(leases.len());
        for (id, lease) in leases {
            match self.ack(*id, *lease).await {
                Ok(()) => acked.push(*id),
                Err(JobError::NotLeased(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(acked)
    }
    /// Scheduler: due scheduled and retrying jobs become ready. Returns how many.
    async fn promote_due(&self) -> JobResult<u64>;
    /// Reaper: running jobs whose lease expired become ready again, or dead after
    /// [`MAX_REAPS`] lapses. Returns how many it handled.
    async fn reap_expired(&self) -> JobResult<u64>;
    async fn get(&self, id: Uuid) -> JobResult<Option<Job>>;
    /// The job holding an idempotency key (while the key is held: until its retention
    /// after it finished), if any: what a producer or a benchmark looks an effect up by.
    async fn find_by_key(&self, key: &str) -> JobResult<Option<Job>>;
    async fn count(&self, state: JobState) -> JobResult<u64>;

    // Operator views and actions (`/v1/admin/jobs`).

    /// Every known queue with its size and latency.
    async fn queues(&self) -> JobResult<Vec<QueueStats>>;
    /// The next job to run of a queue and how long it has been ready; `None` when the
    /// queue is empty. Cheap (an index or list head look-up): the API's effect-lag
    /// monitor polls it.
    async fn head(&self, queue: &str) -> JobResult<Option<(Uuid, Duration)>>;
    /// The jobs at raw positions `offset..offset + limit` of `set`, in the set's order
    /// ([`JobSet`]), unfiltered. Positions whose job vanished meanwhile are skipped but
    /// counted in `consumed`, which is below `limit` only at the end of the set.
    async fn scan(&self, set: &JobSet, offset: u64, limit: u32) -> JobResult<Scanned>;
    /// Scheduled, retrying or dead → ready now (a ready job stays as it is).
    async fn retry_now(&self, id: Uuid) -> JobResult<Acted>;
    /// Ready, scheduled or retrying → dead (a dead job stays as it is).
    async fn kill(&self, id: Uuid) -> JobResult<Acted>;
    /// Removes a job that is not running or done, and frees its idempotency key.
    async fn delete(&self, id: Uuid) -> JobResult<Acted>;
    /// `retry_now` for every job of a scheduled, retry or dead set; returns how many.
    async fn retry_all(&self, set: &JobSet) -> JobResult<u64>;
    /// `delete` for every job of a set (a queue, scheduled, retry or dead); returns how many.
    async fn delete_all(&self, set: &JobSet) -> JobResult<u64>;
    /// `kill` for every job of the scheduled or retry set; returns how many.
    async fn kill_all(&self, set: &JobSet) -> JobResult<u64>;

    /// One page of `set`, keeping jobs that match `filter` (see [`Job::matches`]). The
    /// cursor is a raw position, like Sidekiq's pages: jobs that leave the set meanwhile
    /// shift later pages, which an operator's view tolerates.
    async fn list(&self, set: &JobSet, filter: Option<&str>, offset: u64, limit: u32) -> JobResult<JobList> {
        const BATCH: u32 = 200;
        let limit = limit.max(1);
        let filter = filter.map(str::to_lowercase).filter(|f| !f.is_empty());
        let mut items = Vec::new();
        let mut pos = offset;
        let mut budget = LIST_SCAN_BUDGET;
        loop {
            let Scanned { jobs, consumed } = self.scan(set, pos, BATCH).await?;
            for (position, job) in jobs {
                // A job that moved between the set and its read belongs elsewhere now.
                if job.state == set.state() && filter.as_deref().is_none_or(|f| job.matches(f)) {
                    if items.len() == limit as usize {
                        return Ok(JobList { items, next_offset: Some(position) });
                    }
                    items.push(job);
                }
            }
            pos += consumed;
            if consumed < u64::from(BATCH) {
                return Ok(JobList { items, next_offset: None });
            }
            // A filter that matches little must not make one request read a huge set:
            // hand back what was found and where to go on from.
            budget = budget.saturating_sub(consumed);
            if budget == 0 {
                return Ok(JobList { items, next_offset: Some(pos) });
            }
        }
    }
}

/// Most positions one `list` call reads before it returns a partial page.
pub const LIST_SCAN_BUDGET: u64 = 10_000;

/// What [`JobQueue::scan`] read: jobs with their raw positions, and how many
/// positions it went past.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scanned {
    pub jobs: Vec<(u64, Job)>,
    pub consumed: u64,
}

/// A set of jobs an operator looks at, each in its natural order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobSet {
    /// The ready jobs of one queue, next to run first.
    Queue(String),
    /// Scheduled jobs, soonest first.
    Scheduled,
    /// Jobs waiting for a retry, soonest first.
    Retry,
    /// The dead set, most recently buried first.
    Dead,
    /// Leased jobs, earliest lease deadline first.
    Running,
}

impl JobSet {
    /// The state of every job in the set.
    pub fn state(&self) -> JobState {
        match self {
            JobSet::Queue(_) => JobState::Ready,
            JobSet::Scheduled => JobState::Scheduled,
            JobSet::Retry => JobState::Retry,
            JobSet::Dead => JobState::Dead,
            JobSet::Running => JobState::Running,
        }
    }
}

/// A queue as an operator sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueStats {
    pub name: String,
    pub size: u64,
    /// How long the next job to run has been ready (zero for an empty queue).
    pub latency: Duration,
}

/// A page of [`JobQueue::list`].
#[derive(Debug, Clone, PartialEq)]
pub struct JobList {
    pub items: Vec<Job>,
    pub next_offset: Option<u64>,
}

/// What an operator action did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acted {
    Done,
    NotFound,
    /// The job is in a state the action does not apply to (running or done).
    Refused(JobState),
}

impl Job {
    /// Case-insensitive substring match (`needle` already lowercase) over the id, kind,
    /// queue, idempotency key, arguments and last error: what an operator searches by.
    pub fn matches(&self, needle: &str) -> bool {
        let hay = [
            self.id.to_string(),
            self.kind.clone(),
            self.queue.clone(),
            self.idempotency_key.clone(),
            self.args.to_string(),
            self.last_error.clone().unwrap_or_default(),
        ];
        hay.iter().any(|h| h.to_lowercase().contains(needle))
    }
}
