//! The embedded job queue: one `jobs` table in the SQLite database of record.
//!
//! Each operation is a single statement or a short transaction, so SQLite's single
//! writer makes it atomic; times are integer microseconds since the epoch so every
//! comparison is exact.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::sqlite::SqlitePool;
use sqlx::types::Json;
use uuid::Uuid;

use super::{Enqueued, Failed, Job, JobError, JobQueue, JobResult, JobState, NewJob, QueueConfig};

pub struct SqliteJobQueue {
    /// The store's pool: jobs live in the same database file.
    pool: SqlitePool,
    config: QueueConfig,
}

impl SqliteJobQueue {
    pub fn new(pool: SqlitePool, config: QueueConfig) -> Self {
        SqliteJobQueue { pool, config }
    }
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn now_us() -> i64 {
    micros(Utc::now())
}

fn dur_us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn from_us(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: Uuid,
    kind: String,
    queue: String,
    args: Json<Value>,
    idempotency_key: String,
    state: String,
    failures: i64,
    max_attempts: i64,
    enqueued_at_us: i64,
    run_at_us: i64,
    worker: Option<String>,
    last_error: Option<String>,
}

impl TryFrom<JobRow> for Job {
    type Error = JobError;
    fn try_from(r: JobRow) -> JobResult<Job> {
        let state = JobState::parse(&r.state)
            .ok_or_else(|| JobError::Backend(format!("job {} has state {:?}", r.id, r.state)))?;
        Ok(Job {
            id: r.id,
            kind: r.kind,
            queue: r.queue,
            args: r.args.0,
            idempotency_key: r.idempotency_key,
            state,
            failures: u32::try_from(r.failures).unwrap_or(u32::MAX),
            max_attempts: u32::try_from(r.max_attempts).unwrap_or(u32::MAX),
            enqueued_at: from_us(r.enqueued_at_us),
            run_at: from_us(r.run_at_us),
            worker: r.worker,
            last_error: r.last_error,
        })
    }
}

#[async_trait]
impl JobQueue for SqliteJobQueue {
    async fn enqueue(&self, job: NewJob) -> JobResult<Enqueued> {
        let now = now_us();
        let mut tx = self.pool.begin().await?;
        let existing: Option<(Uuid, String, Option<i64>)> =
            sqlx::query_as("SELECT id, state, finished_at_us FROM jobs WHERE idempotency_key = $1")
                .bind(&job.idempotency_key)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some((id, state, finished)) = existing {
            let expired = state == "done" && finished.is_some_and(|f| f < now - dur_us(self.config.done_retention));
            if !expired {
                return Ok(Enqueued::Duplicate(id));
            }
            sqlx::query("DELETE FROM jobs WHERE id = $1").bind(id).execute(&mut *tx).await?;
        }
        let id = Uuid::now_v7();
        let run_at = job.run_at.map(micros).filter(|t| *t > now);
        let state = if run_at.is_some() { JobState::Scheduled } else { JobState::Ready };
        sqlx::query(
            "INSERT INTO jobs (id, kind, queue, args, idempotency_key, state, failures, max_attempts, \
             enqueued_at_us, run_at_us) VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, $9)",
        )
        .bind(id)
        .bind(&job.kind)
        .bind(&job.queue)
        .bind(Json(&job.args))
        .bind(&job.idempotency_key)
        .bind(state.as_str())
        .bind(i64::from(job.max_attempts.max(1)))
        .bind(now)
        .bind(run_at.unwrap_or(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Enqueued::New(id))
    }

    async fn fetch(&self, queue: &str, worker: &str, lease: Duration) -> JobResult<Option<Job>> {
        let now = now_us();
        let row = sqlx::query_as::<_, JobRow>(
            "UPDATE jobs SET state = 'running', worker = $1, lease_until_us = $2 WHERE id = \
             (SELECT id FROM jobs WHERE state = 'ready' AND queue = $3 ORDER BY run_at_us, id LIMIT 1) \
             RETURNING *",
        )
        .bind(worker)
        .bind(now + dur_us(lease))
        .bind(queue)
        .fetch_optional(&self.pool)
        .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn heartbeat(&self, id: Uuid, worker: &str, lease: Duration) -> JobResult<bool> {
        let done =
            sqlx::query("UPDATE jobs SET lease_until_us = $3 WHERE id = $1 AND worker = $2 AND state = 'running'")
                .bind(id)
                .bind(worker)
                .bind(now_us() + dur_us(lease))
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn ack(&self, id: Uuid, worker: &str) -> JobResult<()> {
        let done = sqlx::query(
            "UPDATE jobs SET state = 'done', worker = NULL, lease_until_us = NULL, finished_at_us = $3 \
             WHERE id = $1 AND worker = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(worker)
        .bind(now_us())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() != 1 {
            return Err(JobError::NotLeased(id));
        }
        Ok(())
    }

    async fn fail(&self, id: Uuid, worker: &str, error: &str) -> JobResult<Failed> {
        let now = now_us();
        let mut tx = self.pool.begin().await?;
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT failures, max_attempts FROM jobs WHERE id = $1 AND worker = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(worker)
        .fetch_optional(&mut *tx)
        .await?;
        let (failures, max_attempts) = row.ok_or(JobError::NotLeased(id))?;
        let failures = failures + 1;
        let outcome = if failures >= max_attempts {
            sqlx::query(
                "UPDATE jobs SET state = 'dead', failures = $2, last_error = $3, worker = NULL, lease_until_us = NULL, \
                 finished_at_us = $4 WHERE id = $1",
            )
            .bind(id)
            .bind(failures)
            .bind(error)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            self.trim_dead(&mut tx, now).await?;
            Failed::Dead
        } else {
            let n = u32::try_from(failures).unwrap_or(u32::MAX);
            let at = now + dur_us(self.config.schedule.delay(n, rand::random::<f64>()));
            sqlx::query(
                "UPDATE jobs SET state = 'retry', failures = $2, last_error = $3, worker = NULL, lease_until_us = NULL, \
                 run_at_us = $4 WHERE id = $1",
            )
            .bind(id)
            .bind(failures)
            .bind(error)
            .bind(at)
            .execute(&mut *tx)
            .await?;
            Failed::Retry { at: from_us(at), failures: n }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn promote_due(&self) -> JobResult<u64> {
        let done =
            sqlx::query("UPDATE jobs SET state = 'ready' WHERE state IN ('scheduled', 'retry') AND run_at_us <= $1")
                .bind(now_us())
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected())
    }

    async fn reap_expired(&self) -> JobResult<u64> {
        let done = sqlx::query(
            "UPDATE jobs SET state = 'ready', worker = NULL, lease_until_us = NULL \
             WHERE state = 'running' AND lease_until_us < $1",
        )
        .bind(now_us())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn get(&self, id: Uuid) -> JobResult<Option<Job>> {
        let row =
            sqlx::query_as::<_, JobRow>("SELECT * FROM jobs WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn count(&self, state: JobState) -> JobResult<u64> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM jobs WHERE state = $1")
            .bind(state.as_str())
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

impl SqliteJobQueue {
    /// Keeps the dead set within its capacity (oldest first) and age.
    async fn trim_dead(&self, tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, now: i64) -> JobResult<()> {
        sqlx::query("DELETE FROM jobs WHERE state = 'dead' AND finished_at_us < $1")
            .bind(now - dur_us(self.config.dead_max_age))
            .execute(&mut **tx)
            .await?;
        sqlx::query(
            "DELETE FROM jobs WHERE state = 'dead' AND id NOT IN \
             (SELECT id FROM jobs WHERE state = 'dead' ORDER BY finished_at_us DESC, id DESC LIMIT $1)",
        )
        .bind(i64::try_from(self.config.dead_max_jobs).unwrap_or(i64::MAX))
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}
