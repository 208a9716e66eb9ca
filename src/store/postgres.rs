//! PostgreSQL backend: the database of record for scale-out deployments.

use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Postgres, Row};

use super::sql::sql_store_impl;
use super::StoreResult;

/// Longest a request waits for a pooled connection: a database that is down (or a pool
/// exhausted by it) answers 503 quickly instead of holding the request.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest one statement may run (server side).
const STATEMENT_TIMEOUT: &str = "30s";
/// Connections for batch transactions: one per group-commit lane, and spares.
const BATCH_CONNECTIONS: u32 = 4;

/// A pool on one PostgreSQL database.
#[derive(Clone)]
pub struct PgStore {
    /// Shared by every request; sized for the API's concurrency, not the tenant count.
    pub(super) pool: PgPool,
    /// The same pool: PostgreSQL takes concurrent writers.
    pub(super) writer: PgPool,
    /// The group-commit lanes' connections, handed out without the pool's test
    /// round trip (a broken one is replaced when the transaction's first message fails:
    /// `begin_locked`).
    batches: PgPool,
}

impl PgStore {
    const MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    /// A batch's rows (users, events, idempotency records, tenant rows) go in one
    /// statement of data-modifying CTEs: one round trip instead of four.
    const ONE_STATEMENT_WRITES: bool = true;

    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        // Batches write literals (`statement.rs`): their quoting assumes standard strings.
        let options: PgConnectOptions = url
            .parse::<PgConnectOptions>()?
            .options([("statement_timeout", STATEMENT_TIMEOUT), ("standard_conforming_strings", "on")])
            .log_statements(tracing::log::LevelFilter::Trace);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        let batches = PgPoolOptions::new()
            .max_connections(BATCH_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(false)
            .connect_lazy_with(options);
        Ok(PgStore { writer: pool.clone(), pool, batches })
    }

    /// The pool, for maintenance and tests that need raw SQL.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn embedded_pools(&self) -> Option<super::SqlitePools> {
        None
    }

    /// Begins a batch's transaction holding its tenant rows' locks, in id order (so
    /// overlapping batches of two processes cannot deadlock), without new row versions
    /// (the batch's one `UPDATE` comes at its end); returns the rows by id, which of
    /// `emails` exist, and the stored answers for `keys`.
    ///
    /// One round trip: `BEGIN`, the locking `SELECT` and the email and idempotency
    /// look-ups go as one simple-query message, values written as literals
    /// (`statement.rs`). Each look-up is its own statement after the lock's: in READ
    /// COMMITTED each statement reads a snapshot taken when it starts, so it sees what
    /// the locks' previous holders (another process, this tenant's previous batch)
    /// committed. (Folded into the locking statement, the look-up missed those rows: a
    /// two-server race on one email answered 500.)
    async fn begin_locked(
        &self,
        ids: &[uuid::Uuid],
        emails: &[(uuid::Uuid, String)],
        keys: &[(uuid::Uuid, String)],
    ) -> StoreResult<(BatchTx, std::collections::HashMap<uuid::Uuid, super::sql::TenantLock>, super::batch::Known)>
    {
        use super::statement::{Literal, Statement, Val};
        let mut lock = Literal::new("BEGIN; SELECT id, event_seq, max_users, user_count FROM tenants WHERE id IN (");
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                lock.sql(", ");
            }
            lock.value(Val::Uuid(*id));
        }
        if ids.is_empty() {
            lock.sql("NULL");
        }
        lock.sql(") ORDER BY id FOR UPDATE");
        let mut message =
            lock.spliceable().ok_or_else(|| super::StoreError::Corrupt("a tenant id held a NUL".into()))?;
        // Up to 10,000 pairs each go in the same message (a few hundred KB); more (or a
        // value no literal can carry), and they are looked up bound, after it.
        let splice = |pairs: &[(uuid::Uuid, String)], push: fn(&mut Literal, &[(uuid::Uuid, String)])| {
            (!pairs.is_empty() && pairs.len() <= 10_000)
                .then(|| {
                    let mut q = Literal::default();
                    push(&mut q, pairs);
                    q.spliceable()
                })
                .flatten()
        };
        let emails_spliced = splice(emails, |q, p| super::batch::push_taken_emails(q, p));
        let keys_spliced = splice(keys, |q, p| super::batch::push_stored_answers(q, p));
        for statement in [&emails_spliced, &keys_spliced].into_iter().flatten() {
            message.push_str("; ");
            message.push_str(statement);
        }
        let (mut tx, rows) = self.first_message(&message).await?;
        // Each statement's rows have their own width.
        let mut locks = Vec::new();
        let mut known = super::batch::Known::default();
        for row in rows {
            match row.len() {
                4 => locks.push((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?)),
                2 => {
                    known.taken.insert((row.try_get(0)?, row.try_get(1)?));
                }
                _ => {
                    let answer = <super::batch::StoredAnswer as sqlx::FromRow<PgRow>>::from_row(&row)?;
                    known.stored.insert((answer.tenant_id, answer.key.clone()), answer);
                }
            }
        }
        if emails_spliced.is_none() && !emails.is_empty() {
            known.taken = Self::taken_emails(&mut tx, emails).await?;
        }
        if keys_spliced.is_none() && !keys.is_empty() {
            known.stored = Self::stored_answers(&mut tx, keys).await?;
        }
        Ok((tx, super::sql::locks_by_id(locks), known))
    }

    /// Sends a batch transaction's first message on a lane connection, and returns its
    /// rows. A connection that has broken while it waited (the server restarted) fails
    /// before the transaction began anything: it is closed and the message sent again
    /// on another, as many times as the pool has connections.
    async fn first_message(&self, message: &str) -> StoreResult<(BatchTx, Vec<PgRow>)> {
        let mut attempts = BATCH_CONNECTIONS + 1;
        loop {
            let mut tx = BatchTx { conn: self.batches.acquire().await?, committed: false };
            match sqlx::Executor::fetch_all(&mut *tx, sqlx::raw_sql(message)).await {
                Ok(rows) => return Ok((tx, rows)),
                Err(e) if attempts > 1 && connection_lost(&e) => {
                    attempts -= 1;
                    tracing::info!(error = %e, "a batch connection had broken; retrying on another");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes a batch's rows and commits, in one message (values as literals); a row
    /// holding a NUL goes bound, with `COMMIT` after it.
    async fn commit_batches(&self, mut tx: BatchTx, rows: &super::batch::FinalRows<'_>) -> StoreResult<()> {
        let mut message = super::statement::Literal::default();
        if !rows.changed.is_empty() {
            rows.push_one_statement(&mut message)?;
        }
        match message.spliceable().filter(|m| !m.is_empty()) {
            Some(mut message) => {
                message.push_str("; COMMIT");
                sqlx::Executor::execute(&mut *tx, sqlx::raw_sql(&message)).await?;
            }
            None => {
                Self::finish_batches(&mut tx, rows).await?;
                sqlx::Executor::execute(&mut *tx, sqlx::raw_sql("COMMIT")).await?;
            }
        }
        tx.committed = true;
        Ok(())
    }

    /// sqlx holds an advisory lock while it migrates: processes starting together take
    /// turns.
    async fn migrate_exclusively(&self) -> StoreResult<()> {
        Ok(Self::MIGRATOR.run(&self.writer).await?)
    }

    async fn send_outbox_notify(&self) -> StoreResult<()> {
        sqlx::query("SELECT pg_notify('eventra_outbox', '')").execute(&self.pool).await?;
        Ok(())
    }

    /// Takes or renews a lease, timed by the database's clock.
    async fn lease_try(&self, name: &str, holder: &str, ttl: Duration) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3)) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at < clock_timestamp()",
        )
        .bind(name)
        .bind(holder)
        .bind(ttl.as_secs_f64())
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks rows published while `holder`'s lease is valid by the database's clock.
    async fn lease_mark_published(&self, seqs: &[i64], lease: &str, holder: &str) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE outbox SET published_at = clock_timestamp() WHERE published_at IS NULL AND seq = ANY($3) \
             AND EXISTS (SELECT 1 FROM leases WHERE name = $1 AND holder = $2 AND expires_at > clock_timestamp())",
        )
        .bind(lease)
        .bind(holder)
        .bind(seqs)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }
}

sql_store_impl!(PgStore, sqlx::Postgres, "postgres");

/// Whether an error says the connection is gone (cut, or its server shutting down),
/// not that a statement failed: a message sent again on another connection may succeed.
fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        // 08: connection exceptions; 57P: the server shut down or restarted.
        sqlx::Error::Database(db) => db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

/// A batch transaction begun on a lane connection with a raw `BEGIN` (see
/// `begin_locked`). One that ends without its `COMMIT` (an error, or its future dropped
/// midway) closes its connection, and the server rolls the transaction back: the pool
/// never gets a connection still in a transaction.
pub(super) struct BatchTx {
    conn: PoolConnection<Postgres>,
    committed: bool,
}

impl std::ops::Deref for BatchTx {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for BatchTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

impl Drop for BatchTx {
    fn drop(&mut self) {
        if !self.committed {
            self.conn.close_on_drop();
        }
    }
}
