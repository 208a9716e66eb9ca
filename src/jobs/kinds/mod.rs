//! Job kinds: what a job of each `kind` does. A kind is a [`JobKind`]; [`Kinds`] maps
//! names to them for the workers. Every handler is idempotent, because a job runs at
//! least once (a worker may die after the effect and before the ack).

mod audit;
pub mod auth_code_email;
pub mod index;
mod noop;
pub mod welcome_email;

use std::collections::HashMap;
use std::sync::Arc;

use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

pub use audit::{Audit, AuditArgs};
pub use auth_code_email::AuthCodeEmail;
pub use index::Indexing;
pub use noop::Noop;
pub use welcome_email::WelcomeEmail;

use super::{Job, JobQueue, DEFAULT_MAX_ATTEMPTS};
use crate::mail::Mailer;
use crate::store::Store;

/// Why a run failed: stored as the job's `last_error`, then retried, or buried at once
/// when `permanent` (no retry can fix it: a malformed job, an address the mail server
/// refuses).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct JobFailure {
    pub message: String,
    pub permanent: bool,
    /// Retry after this long instead of the queue's schedule.
    pub retry_in: Option<std::time::Duration>,
    /// The job did not run: no attempt is counted (see [`JobFailure::snooze`]).
    pub snooze: bool,
}

impl JobFailure {
    /// A failure a later attempt may not hit (retried on the schedule).
    pub fn new(msg: impl std::fmt::Display) -> Self {
        JobFailure { message: msg.to_string(), permanent: false, retry_in: None, snooze: false }
    }

    /// A failure every attempt would hit: straight to the dead set.
    pub fn permanent(msg: impl std::fmt::Display) -> Self {
        JobFailure { message: msg.to_string(), permanent: true, retry_in: None, snooze: false }
    }

    /// The job chose not to run now (its receiver is unavailable or busy): it runs after
    /// `delay`, and this does not count as an attempt.
    pub fn snooze(msg: impl std::fmt::Display, delay: std::time::Duration) -> Self {
        JobFailure { message: msg.to_string(), permanent: false, retry_in: Some(delay), snooze: true }
    }

    /// The next attempt runs after `delay` (the kind's own schedule, or `Retry-After`).
    pub fn retry_in(mut self, delay: std::time::Duration) -> Self {
        self.retry_in = Some(delay);
        self
    }
}

/// What a handler may ask of the worker that runs it: the lease its jobs are held
/// under (a fetched batch shares one).
#[derive(Clone)]
pub struct JobContext {
    queue: Arc<dyn JobQueue>,
    /// A job of the batch that is still held (what a heartbeat presents).
    job: Uuid,
    lease: Uuid,
    /// How long one heartbeat extends the lease.
    lease_for: Duration,
}

/// The part of a confirmed lease an effect may use: the rest is margin for the clocks
/// and the round trip.
const FENCE_SHARE: f64 = 0.8;

impl JobContext {
    pub fn new(queue: Arc<dyn JobQueue>, job: Uuid, lease: Uuid, lease_for: Duration) -> Self {
        JobContext { queue, job, lease, lease_for }
    }

    /// This attempt's lease: unique to it (a job run again gets a new one).
    pub fn lease(&self) -> Uuid {
        self.lease
    }

    /// How long one heartbeat extends the lease.
    pub fn lease_for(&self) -> Duration {
        self.lease_for
    }

    /// Extends the lease and returns the instant until which it is certainly held. An
    /// effect that cannot be taken back (an email) must start only after this answered
    /// and finish before the instant: then the reaper cannot hand the job to another
    /// worker while this one may still be acting on it. Fails when the lease is gone
    /// (the reaper took the job) or cannot be confirmed (the queue is unreachable).
    pub async fn fence(&self) -> Result<tokio::time::Instant, JobFailure> {
        let asked = tokio::time::Instant::now();
        match self.queue.heartbeat(self.job, self.lease, self.lease_for).await {
            Ok(true) => Ok(asked + self.lease_for.mul_f64(FENCE_SHARE)),
            Ok(false) => Err(JobFailure::new("the lease was lost (the reaper took the job back); not acting on it")),
            Err(e) => Err(JobFailure::new(format!("cannot confirm the lease ({e}); not acting on it"))),
        }
    }
}

#[async_trait]
pub trait JobKind: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Attempts before the dead set (Sidekiq's 25 unless a kind says otherwise).
    fn max_attempts(&self) -> u32 {
        DEFAULT_MAX_ATTEMPTS
    }
    /// Runs one job. Kinds that work in batches implement [`run_batch`] instead.
    ///
    /// [`run_batch`]: JobKind::run_batch
    async fn run(&self, job: &Job) -> Result<(), JobFailure> {
        let _ = job;
        Err(JobFailure::permanent(format!("job kind {} runs only in batches", self.name())))
    }
    /// Runs a leased batch of this kind's jobs; one outcome per job, in order. The
    /// default runs [`run`](JobKind::run) for each, concurrently. Kinds override it to
    /// share round trips (one statement, one index commit, one look-up for the batch).
    async fn run_batch(&self, jobs: &[&Job], ctx: &JobContext) -> Vec<Result<(), JobFailure>> {
        let _ = ctx;
        futures_util::future::join_all(jobs.iter().map(|j| self.run(j))).await
    }
}

/// Each job's outcome when a group shares one write: a job whose arguments were bad
/// keeps its own failure, the others take the shared result.
pub(crate) fn outcomes<T>(
    parsed: Vec<Result<T, JobFailure>>,
    shared: &Result<(), JobFailure>,
) -> Vec<Result<(), JobFailure>> {
    parsed
        .into_iter()
        .map(|p| match (p, shared) {
            (Err(bad), _) => Err(bad),
            (Ok(_), Ok(())) => Ok(()),
            (Ok(_), Err(e)) => Err(e.clone()),
        })
        .collect()
}

/// The kinds a worker pool can run, by name.
#[derive(Clone, Default)]
pub struct Kinds(HashMap<String, Arc<dyn JobKind>>);

impl Kinds {
    /// Eventra's own kinds: `noop`, `audit`, `welcome_email`, `auth_code_email`, and the indexing kinds
    /// (`index_user`, `unindex_user`, `unindex_tenant`).
    pub fn standard(
        store: Arc<dyn Store>,
        mailer: Arc<dyn Mailer>,
        mail_from: String,
        index: Arc<dyn crate::search::SearchIndex>,
        sealer: Arc<crate::webhooks::secret_box::SecretBox>,
    ) -> Self {
        let mut kinds = Kinds::default()
            .with(Arc::new(Noop))
            .with(Arc::new(Audit::new(store.clone(), index.clone())))
            .with(Arc::new(AuthCodeEmail::new(mailer.clone(), mail_from.clone(), sealer)))
            .with(Arc::new(WelcomeEmail::new(store.clone(), mailer, mail_from)));
        for k in Indexing::kinds(store, index) {
            kinds = kinds.with(k);
        }
        kinds
    }

    /// Adds (or replaces) a kind.
    pub fn with(mut self, kind: Arc<dyn JobKind>) -> Self {
        self.0.insert(kind.name().to_owned(), kind);
        self
    }

    /// Adds every kind of `other` (replacing same-named ones).
    pub fn with_all(mut self, other: Kinds) -> Self {
        self.0.extend(other.0);
        self
    }

    /// The attempts each kind wants, for jobs that do not say.
    pub fn max_attempts(&self) -> HashMap<String, u32> {
        self.0.iter().map(|(name, k)| (name.clone(), k.max_attempts())).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn JobKind>> {
        self.0.get(name)
    }

    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.0.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}
