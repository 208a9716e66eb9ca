//! The embedded job queue: one `jobs` table in the SQLite database of record.
//!
//! Every write is a single guarded statement on the store's one writer connection, so
//! each is atomic and writers queue in the pool instead of in SQLite's busy handler;
//! looks that decide whether to write at all run on the reader pool. Times are integer
//! microseconds since the epoch (this host's clock: the file is local to it) so every
//! comparison is exact. A fetch leases a batch under one lease id, like Redis.

use std::collections::HashSet;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::sqlite::SqlitePool;
use sqlx::types::Json;
use uuid::Uuid;

use super::{
    dur_us, from_us, now_us, Acted, Enqueued, Failed, Job, JobError, JobQueue, JobResult, JobSet, JobState, NewJob,
    QueueConfig, QueueStats, Scanned,
};

pub struct SqliteJobQueue {
    /// The store's reader pool: jobs live in the same database file.
    pool: SqlitePool,
    /// The store's one writer.
    writer: SqlitePool,
    config: QueueConfig,
}

impl SqliteJobQueue {
    pub fn new(pools: crate::store::SqlitePools, config: QueueConfig) -> Self {
        SqliteJobQueue { pool: pools.read, writer: pools.write, config }
    }

    /// Opens (and migrates) the SQLite database at `url` for jobs: the database of
    /// record's own file in the embedded default, or `<data dir>/jobs.db` beside a
    /// PostgreSQL database when no Redis is configured.
    pub async fn open(url: &str, config: QueueConfig) -> JobResult<Self> {
        use crate::store::Store;
        let store = crate::store::SqliteStore::connect(url, 8).await.map_err(|e| JobError::Backend(e.to_string()))?;
        store.migrate().await.map_err(|e| JobError::Backend(e.to_string()))?;
        Ok(SqliteJobQueue::new(store.pools(), config))
    }
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
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
    lease_id: Option<Uuid>,
    started_at_us: Option<i64>,
    last_error: Option<String>,
    failed_at_us: Option<i64>,
    finished_at_us: Option<i64>,
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
            started_at: r.started_at_us.filter(|_| state == JobState::Running).map(from_us),
            lease: r.lease_id,
            last_error: r.last_error,
            failed_at: r.failed_at_us.map(from_us),
            finished_at: r.finished_at_us.map(from_us),
        })
    }
}

#[async_trait]
impl JobQueue for SqliteJobQueue {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> JobResult<()> {
        sqlx::query("SELECT 1").execute(&self.writer).await?;
        Ok(())
    }

    async fn enqueue(&self, job: NewJob) -> JobResult<Enqueued> {
        self.enqueue_many(vec![job]).await?.pop().ok_or_else(|| JobError::Backend("enqueue answered nothing".into()))
    }

    /// One transaction for the whole batch (one writer turn, one commit), one statement
    /// a job: a key held by a finished job past its retention is taken over in place;
    /// any other holder makes the job a duplicate (then its id is looked up).
    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> JobResult<Vec<Enqueued>> {
        let now = now_us();
        let expired = now - dur_us(self.config.done_retention);
        let mut tx = self.writer.begin().await?;
        let mut out = Vec::with_capacity(jobs.len());
        // One statement per chunk (ten binds a row): every statement is a round trip to
        // the writer's thread. A key already held (a live job, or earlier in the chunk)
        // answers with its holder.
        for chunk in jobs.chunks(500) {
            let ids: Vec<Uuid> = chunk.iter().map(|_| Uuid::now_v7()).collect();
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO jobs (id, kind, queue, args, idempotency_key, state, failures, max_attempts, \
                 enqueued_at_us, run_at_us) ",
            );
            q.push_values(chunk.iter().zip(&ids), |mut row, (job, id)| {
                let run_at = job.run_at.map(micros).filter(|t| *t > now);
                let state = if run_at.is_some() { JobState::Scheduled } else { JobState::Ready };
                row.push_bind(*id)
                    .push_bind(job.kind.clone())
                    .push_bind(job.queue.clone())
                    .push_bind(Json(job.args.clone()))
                    .push_bind(job.idempotency_key.clone())
                    .push_bind(state.as_str())
                    .push_bind(0i64)
                    .push_bind(i64::from(job.attempts()))
                    .push_bind(now)
                    .push_bind(run_at.unwrap_or(now));
            });
            q.push(
                " ON CONFLICT (idempotency_key) DO UPDATE SET id = excluded.id, kind = excluded.kind, \
                 queue = excluded.queue, args = excluded.args, state = excluded.state, failures = 0, \
                 max_attempts = excluded.max_attempts, enqueued_at_us = excluded.enqueued_at_us, \
                 run_at_us = excluded.run_at_us, worker = NULL, lease_id = NULL, lease_until_us = NULL, \
                 last_error = NULL, failed_at_us = NULL, finished_at_us = NULL, reaped = 0 \
                 WHERE jobs.state = 'done' AND jobs.finished_at_us < ",
            );
            q.push_bind(expired).push(" RETURNING id");
            let taken: std::collections::HashSet<Uuid> =
                q.build_query_as::<(Uuid,)>().fetch_all(&mut *tx).await?.into_iter().map(|(id,)| id).collect();
            let held: Vec<&str> = chunk
                .iter()
                .zip(&ids)
                .filter(|(_, id)| !taken.contains(id))
                .map(|(j, _)| j.idempotency_key.as_str())
                .collect();
            let mut holders: std::collections::HashMap<String, Uuid> = std::collections::HashMap::new();
            if !held.is_empty() {
                let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                    "SELECT idempotency_key, id FROM jobs WHERE idempotency_key IN (",
                );
                let mut list = q.separated(", ");
                for k in &held {
                    list.push_bind(k.to_string());
                }
                q.push(")");
                holders.extend(q.build_query_as::<(String, Uuid)>().fetch_all(&mut *tx).await?);
            }
            for (job, id) in chunk.iter().zip(ids) {
                if taken.contains(&id) {
                    out.push(Enqueued::New(id));
                } else {
                    let holder = holders
                        .get(&job.idempotency_key)
                        .copied()
                        .ok_or_else(|| JobError::Backend(format!("no job holds the key {}", job.idempotency_key)))?;
                    out.push(Enqueued::Duplicate(holder));
                }
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn fetch_many(
        &self,
        queue: &str,
        worker: &str,
        lease: Duration,
        max: u32,
        workers: u32,
    ) -> JobResult<Vec<Job>> {
        let max = max.max(1);
        // Look before taking the writer: idle workers poll, and an empty queue must not
        // queue them behind every other writer of the database. The count is capped at
        // what a fair share could need.
        let (ready,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE state = 'ready' AND queue = $1 LIMIT $2)")
                .bind(queue)
                .bind(i64::from(max) * i64::from(workers.max(1)))
                .fetch_one(&self.pool)
                .await?;
        if ready == 0 {
            return Ok(Vec::new());
        }
        let share = (ready as u64).div_ceil(u64::from(workers.max(1))).min(u64::from(max));
        let mut rows = sqlx::query_as::<_, JobRow>(
            "UPDATE jobs SET state = 'running', worker = $1, lease_until_us = $2, lease_id = $3, started_at_us = $6 \
             WHERE id IN (SELECT id FROM jobs WHERE state = 'ready' AND queue = $4 ORDER BY run_at_us, id LIMIT $5) \
             RETURNING *",
        )
        .bind(worker)
        .bind(now_us() + dur_us(lease))
        .bind(Uuid::new_v4())
        .bind(queue)
        .bind(i64::try_from(share).unwrap_or(1))
        .bind(now_us())
        .fetch_all(&self.writer)
        .await?;
        rows.sort_by_key(|r| (r.run_at_us, r.id));
        rows.into_iter().map(Job::try_from).collect()
    }

    /// Extends every job leased under `lease` (a fetched batch) while the lease has not
    /// lapsed; `true` if `id` is still held under it.
    async fn heartbeat(&self, id: Uuid, lease: Uuid, duration: Duration) -> JobResult<bool> {
        let now = now_us();
        let held: Vec<(Uuid,)> = sqlx::query_as(
            "UPDATE jobs SET lease_until_us = $2 WHERE lease_id = $1 AND state = 'running' AND lease_until_us >= $3 \
             RETURNING id",
        )
        .bind(lease)
        .bind(now + dur_us(duration))
        .bind(now)
        .fetch_all(&self.writer)
        .await?;
        Ok(held.iter().any(|(h,)| *h == id))
    }

    async fn ack(&self, id: Uuid, lease: Uuid) -> JobResult<()> {
        if self.ack_many(&[(id, lease)]).await?.is_empty() {
            return Err(JobError::NotLeased(id));
        }
        Ok(())
    }

    async fn ack_many(&self, leases: &[(Uuid, Uuid)]) -> JobResult<Vec<Uuid>> {
        let mut acked = Vec::with_capacity(leases.len());
        for chunk in leases.chunks(400) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "UPDATE jobs SET state = 'done', worker = NULL, lease_id = NULL, lease_until_us = NULL, finished_at_us = ",
            );
            q.push_bind(now_us());
            q.push(" WHERE state = 'running' AND (id, lease_id) IN (VALUES ");
            let mut list = q.separated(", ");
            for (id, lease) in chunk {
                list.push("(");
                list.push_bind_unseparated(*id);
                list.push_unseparated(", ");
                list.push_bind_unseparated(*lease);
                list.push_unseparated(")");
            }
            q.push(") RETURNING id");
            let rows: Vec<(Uuid,)> = q.build_query_as().fetch_all(&self.writer).await?;
            let done: HashSet<Uuid> = rows.into_iter().map(|r| r.0).collect();
            acked.extend(chunk.iter().map(|(id, _)| *id).filter(|id| done.contains(id)));
        }
        Ok(acked)
    }

    async fn fail(&self, id: Uuid, lease: Uuid, error: &str) -> JobResult<Failed> {
        self.settle_failure(id, lease, error, false, None).await
    }

    async fn fail_after(&self, id: Uuid, lease: Uuid, error: &str, delay: Duration) -> JobResult<Failed> {
        self.settle_failure(id, lease, error, false, Some(delay)).await
    }

    async fn snooze(&self, id: Uuid, lease: Uuid, delay: Duration) -> JobResult<()> {
        let done = sqlx::query(
            "UPDATE jobs SET state = 'retry', run_at_us = $3, worker = NULL, lease_id = NULL, lease_until_us = NULL \
             WHERE id = $1 AND lease_id = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(lease)
        .bind(now_us() + dur_us(delay))
        .execute(&self.writer)
        .await?;
        if done.rows_affected() == 0 {
            return Err(JobError::NotLeased(id));
        }
        Ok(())
    }

    async fn bury(&self, id: Uuid, lease: Uuid, error: &str) -> JobResult<()> {
        self.settle_failure(id, lease, error, true, None).await.map(|_| ())
    }

    async fn promote_due(&self) -> JobResult<u64> {
        let done =
            sqlx::query("UPDATE jobs SET state = 'ready' WHERE state IN ('scheduled', 'retry') AND run_at_us <= $1")
                .bind(now_us())
                .execute(&self.writer)
                .await?;
        Ok(done.rows_affected())
    }

    async fn reap_expired(&self) -> JobResult<u64> {
        let now = now_us();
        let done = sqlx::query(
            "UPDATE jobs SET reaped = reaped + 1, worker = NULL, lease_id = NULL, lease_until_us = NULL, \
             state = CASE WHEN reaped + 1 >= $2 THEN 'dead' ELSE 'ready' END, \
             finished_at_us = CASE WHEN reaped + 1 >= $2 THEN $1 ELSE finished_at_us END, \
             last_error = CASE WHEN reaped + 1 >= $2 THEN $3 ELSE last_error END \
             WHERE state = 'running' AND lease_until_us < $1",
        )
        .bind(now)
        .bind(i64::from(super::MAX_REAPS))
        .bind(super::reaped_error(super::MAX_REAPS))
        .execute(&self.writer)
        .await?;
        if done.rows_affected() > 0 {
            self.trim_dead(now).await?;
        }
        // Finished jobs past their retention are dead weight (done here, off the ack path).
        sqlx::query("DELETE FROM jobs WHERE state = 'done' AND finished_at_us < $1")
            .bind(now_us() - dur_us(self.config.done_retention))
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }

    async fn get(&self, id: Uuid) -> JobResult<Option<Job>> {
        let row =
            sqlx::query_as::<_, JobRow>("SELECT * FROM jobs WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn find_by_key(&self, key: &str) -> JobResult<Option<Job>> {
        let row = sqlx::query_as::<_, JobRow>("SELECT * FROM jobs WHERE idempotency_key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn count(&self, state: JobState) -> JobResult<u64> {
        // Done jobs count while they still hold their key (within the retention).
        let since = if state == JobState::Done { now_us() - dur_us(self.config.done_retention) } else { i64::MIN };
        let (n,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM jobs WHERE state = $1 AND COALESCE(finished_at_us, $2) >= $2")
                .bind(state.as_str())
                .bind(since)
                .fetch_one(&self.pool)
                .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn head(&self, queue: &str) -> JobResult<Option<(Uuid, Duration)>> {
        let row: Option<(Uuid, i64)> = sqlx::query_as(
            "SELECT id, run_at_us FROM jobs WHERE state = 'ready' AND queue = $1 ORDER BY run_at_us, id LIMIT 1",
        )
        .bind(queue)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(id, ready)| (id, Duration::from_micros(u64::try_from(now_us() - ready).unwrap_or(0)))))
    }

    async fn queues(&self) -> JobResult<Vec<QueueStats>> {
        let rows: Vec<(String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT queue, COUNT(*) FILTER (WHERE state = 'ready'), MIN(run_at_us) FILTER (WHERE state = 'ready') \
             FROM jobs GROUP BY queue ORDER BY queue",
        )
        .fetch_all(&self.pool)
        .await?;
        let now = now_us();
        Ok(rows
            .into_iter()
            .map(|(name, size, oldest)| QueueStats {
                name,
                size: u64::try_from(size).unwrap_or(0),
                latency: Duration::from_micros(u64::try_from(oldest.map_or(0, |t| now - t)).unwrap_or(0)),
            })
            .collect())
    }

    async fn scan(&self, set: &JobSet, offset: u64, limit: u32) -> JobResult<Scanned> {
        let order = match set {
            JobSet::Queue(_) | JobSet::Scheduled | JobSet::Retry => "run_at_us, id",
            JobSet::Dead => "finished_at_us DESC, id DESC",
            JobSet::Running => "lease_until_us, id",
        };
        let queue = match set {
            JobSet::Queue(q) => Some(q.as_str()),
            _ => None,
        };
        let rows = sqlx::query_as::<_, JobRow>(&format!(
            "SELECT * FROM jobs WHERE state = $1 AND ($2 IS NULL OR queue = $2) ORDER BY {order} LIMIT $3 OFFSET $4"
        ))
        .bind(set.state().as_str())
        .bind(queue)
        .bind(i64::from(limit))
        .bind(i64::try_from(offset).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let consumed = rows.len() as u64;
        let jobs = rows
            .into_iter()
            .enumerate()
            .map(|(i, r)| Ok((offset + i as u64, Job::try_from(r)?)))
            .collect::<JobResult<Vec<_>>>()?;
        Ok(Scanned { jobs, consumed })
    }

    async fn retry_now(&self, id: Uuid) -> JobResult<Acted> {
        let done = sqlx::query(
            "UPDATE jobs SET state = 'ready', run_at_us = $2, finished_at_us = NULL \
             WHERE id = $1 AND state IN ('scheduled', 'retry', 'dead')",
        )
        .bind(id)
        .bind(now_us())
        .execute(&self.writer)
        .await?;
        self.acted(id, done.rows_affected(), JobState::Ready).await
    }

    async fn kill(&self, id: Uuid) -> JobResult<Acted> {
        let now = now_us();
        let done = sqlx::query(
            "UPDATE jobs SET state = 'dead', finished_at_us = $2, \
             last_error = COALESCE(last_error, 'killed by an operator') \
             WHERE id = $1 AND state IN ('ready', 'scheduled', 'retry')",
        )
        .bind(id)
        .bind(now)
        .execute(&self.writer)
        .await?;
        if done.rows_affected() == 1 {
            self.trim_dead(now).await?;
        }
        self.acted(id, done.rows_affected(), JobState::Dead).await
    }

    async fn delete(&self, id: Uuid) -> JobResult<Acted> {
        let done = sqlx::query("DELETE FROM jobs WHERE id = $1 AND state IN ('ready', 'scheduled', 'retry', 'dead')")
            .bind(id)
            .execute(&self.writer)
            .await?;
        if done.rows_affected() == 1 {
            return Ok(Acted::Done);
        }
        Ok(match self.get(id).await? {
            None => Acted::NotFound,
            Some(job) => Acted::Refused(job.state),
        })
    }

    async fn retry_all(&self, set: &JobSet) -> JobResult<u64> {
        if !matches!(set, JobSet::Scheduled | JobSet::Retry | JobSet::Dead) {
            return Ok(0);
        }
        let done =
            sqlx::query("UPDATE jobs SET state = 'ready', run_at_us = $2, finished_at_us = NULL WHERE state = $1")
                .bind(set.state().as_str())
                .bind(now_us())
                .execute(&self.writer)
                .await?;
        Ok(done.rows_affected())
    }

    async fn kill_all(&self, set: &JobSet) -> JobResult<u64> {
        if !matches!(set, JobSet::Scheduled | JobSet::Retry) {
            return Ok(0);
        }
        let now = now_us();
        let done = sqlx::query(
            "UPDATE jobs SET state = 'dead', finished_at_us = $2, \
             last_error = COALESCE(last_error, 'killed by an operator') WHERE state = $1",
        )
        .bind(set.state().as_str())
        .bind(now)
        .execute(&self.writer)
        .await?;
        if done.rows_affected() > 0 {
            self.trim_dead(now).await?;
        }
        Ok(done.rows_affected())
    }

    async fn delete_all(&self, set: &JobSet) -> JobResult<u64> {
        let queue = match set {
            JobSet::Queue(q) => Some(q.as_str()),
            JobSet::Running => return Ok(0),
            _ => None,
        };
        let done = sqlx::query("DELETE FROM jobs WHERE state = $1 AND ($2 IS NULL OR queue = $2)")
            .bind(set.state().as_str())
            .bind(queue)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }
}

impl SqliteJobQueue {
    /// A failed attempt: retry later, or bury (after the last attempt, or at once when
    /// `permanent`).
    async fn settle_failure(
        &self,
        id: Uuid,
        lease: Uuid,
        error: &str,
        permanent: bool,
        delay: Option<Duration>,
    ) -> JobResult<Failed> {
        // The retry delay depends on the failure count; only the lease holder changes it
        // and the update below re-checks it, so reading it first is safe.
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT failures, max_attempts FROM jobs WHERE id = $1 AND lease_id = $2 AND state = 'running'",
        )
        .bind(id)
        .bind(lease)
        .fetch_optional(&self.pool)
        .await?;
        let (failures, max_attempts) = row.ok_or(JobError::NotLeased(id))?;
        let failures = failures + 1;
        let now = now_us();
        let dead = permanent || failures >= max_attempts;
        let n = u32::try_from(failures).unwrap_or(u32::MAX);
        let at = now + dur_us(delay.unwrap_or_else(|| self.config.schedule.delay(n, rand::random::<f64>())));
        let done = sqlx::query(
            "UPDATE jobs SET failures = $3, last_error = $4, worker = NULL, lease_id = NULL, lease_until_us = NULL, \
             failed_at_us = $7, state = $5, run_at_us = CASE WHEN $5 = 'retry' THEN $6 ELSE run_at_us END, \
             finished_at_us = CASE WHEN $5 = 'dead' THEN $7 ELSE finished_at_us END \
             WHERE id = $1 AND lease_id = $2 AND state = 'running' AND failures = $3 - 1",
        )
        .bind(id)
        .bind(lease)
        .bind(failures)
        .bind(error)
        .bind(if dead { "dead" } else { "retry" })
        .bind(at)
        .bind(now)
        .execute(&self.writer)
        .await?;
        if done.rows_affected() != 1 {
            return Err(JobError::NotLeased(id));
        }
        if dead {
            self.trim_dead(now).await?;
            Ok(Failed::Dead)
        } else {
            Ok(Failed::Retry { at: from_us(at), failures: n })
        }
    }

    /// The outcome of an action that changed `changed` rows: when none, either the job
    /// is already where the action would put it, or it is missing, or refused.
    async fn acted(&self, id: Uuid, changed: u64, target: JobState) -> JobResult<Acted> {
        if changed == 1 {
            return Ok(Acted::Done);
        }
        Ok(match self.get(id).await? {
            None => Acted::NotFound,
            Some(job) if job.state == target => Acted::Done,
            Some(job) => Acted::Refused(job.state),
        })
    }

    /// Keeps the dead set within its capacity (oldest first) and age.
    async fn trim_dead(&self, now: i64) -> JobResult<()> {
        sqlx::query("DELETE FROM jobs WHERE state = 'dead' AND finished_at_us < $1")
            .bind(now - dur_us(self.config.dead_max_age))
            .execute(&self.writer)
            .await?;
        sqlx::query(
            "DELETE FROM jobs WHERE state = 'dead' AND id NOT IN \
             (SELECT id FROM jobs WHERE state = 'dead' ORDER BY finished_at_us DESC, id DESC LIMIT $1)",
        )
        .bind(i64::try_from(self.config.dead_max_jobs).unwrap_or(i64::MAX))
        .execute(&self.writer)
        .await?;
        Ok(())
    }
}
