//! PostgreSQL backend: the database of record for scale-out deployments.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::query::Query;
use sqlx::{ConnectOptions, Postgres, Row};

use super::batch::{FinalRows, Known};
use super::pg_guess::Guess;
use super::predicted::Predictions;
use super::sql::{sql_store_impl, TenantLock};
use super::statement::{Literal, Statement, Val};
use super::{StoreError, StoreResult, TenantWrite, WriteOutcome};
use uuid::Uuid;

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
    /// Each tenant's row as this process's last transaction on it leaves it, so the
    /// next may be sent as one message (`predicted.rs`).
    predictions: Arc<Predictions>,
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
            // The guessed transactions' statement (`pg_guess.rs`) is planned once per
            // connection: its plan does not depend on its arrays' contents.
            .connect_lazy_with(options.options([("plan_cache_mode", "force_generic_plan")]));
        Ok(PgStore { writer: pool.clone(), pool, batches, predictions: Arc::default() })
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
    ) -> StoreResult<(BatchTx, HashMap<Uuid, TenantLock>, Known)> {
        let mut message = lock_statement(ids, "id, event_seq, max_users, user_count")
            .spliceable()
            .ok_or_else(|| StoreError::Corrupt("a tenant id held a NUL".into()))?;
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
        let mut known = Known::default();
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

    /// `Store::write_batches`: as one message where the writes are creates and every
    /// tenant's row is predicted (`predicted.rs`), else (or when the guess was wrong)
    /// locking first (`write_batches_locking`), after the guessed transactions on these
    /// tenants still in flight.
    async fn write_batches_ordered(
        &self,
        batches: &[(Uuid, &[TenantWrite])],
        locked: &(dyn Fn() + Send + Sync),
    ) -> Vec<Vec<StoreResult<WriteOutcome>>> {
        let mut ids: Vec<Uuid> = batches.iter().map(|(t, _)| *t).collect();
        ids.sort_unstable();
        ids.dedup();
        let creates_only = ids.len() == batches.len()
            && batches.iter().all(|(_, w)| w.iter().all(|w| matches!(w, TenantWrite::CreateUser { .. })));
        let (turn, guess) =
            self.predictions.begin(&ids, |rows| if creates_only { Guess::decide(batches, rows) } else { None });
        match guess.and_then(|g| g.statement(&ids).ok().map(|s| (g, s))) {
            Some((guess, (statement, first_event))) => {
                let sent = self.send_guess(&ids, statement, first_event).await;
                let outcome = match &sent {
                    Ok(Sent::Committed) => "committed",
                    Ok(Sent::Refused) => "missed",
                    Err(_) => "unknown",
                };
                metrics::counter!("eventra_write_guesses_total", "outcome" => outcome).increment(1);
                match sent {
                    Ok(Sent::Committed) => {
                        // Only now: a later batch of these tenants sent while this one is
                        // on its way could reach the database first, and fail its guard.
                        // (Called once the message was written, batches overtook one
                        // another and got smaller: a hot tenant was a third slower.)
                        locked();
                        return guess.outcomes();
                    }
                    Ok(Sent::Refused) => {
                        turn.forget();
                        turn.wait_for_earlier(false).await;
                    }
                    Err(e) => {
                        turn.forget();
                        let message = format!("the write transaction's connection broke: {e}");
                        return super::writes::all_unavailable(batches, &message);
                    }
                }
            }
            None => {
                turn.forget();
                turn.wait_for_earlier(true).await;
            }
        }
        // A transaction that then fails leaves a guess that fails in turn: it is
        // forgotten then (above), at the cost of one round trip.
        self.write_batches_locking(batches, locked, &|rows| turn.expect(rows)).await
    }

    /// Sends a guessed transaction's statement ([`Guess::statement`]), its own
    /// implicit transaction. `Err`: its connection broke and whether it committed could
    /// not be learnt.
    async fn send_guess(
        &self,
        ids: &[Uuid],
        statement: Query<'static, Postgres, PgArguments>,
        first_event: Uuid,
    ) -> StoreResult<Sent> {
        let Ok(mut conn) = self.batches.acquire().await else { return Ok(Sent::Refused) };
        match statement.execute(&mut *conn).await {
            Ok(_) => Ok(Sent::Committed),
            Err(e) if connection_lost(&e) => {
                conn.close_on_drop();
                drop(conn);
                tracing::info!(error = %e, "a batch connection broke under a guessed transaction; asking whether it committed");
                Ok(if self.guess_committed(ids, first_event).await? { Sent::Committed } else { Sent::Refused })
            }
            Err(e) => {
                // 22012: the guard's division by zero. The implicit transaction has
                // ended, nothing of it written.
                let stale = matches!(&e, sqlx::Error::Database(db) if db.code().as_deref() == Some("22012"));
                tracing::debug!(error = %e, stale, "a guessed write transaction was refused");
                Ok(Sent::Refused)
            }
        }
    }

    /// Whether a guessed transaction whose connection broke committed: once its
    /// tenants' locks can be had (it has ended, one way or the other), whether its
    /// first event is in the outbox.
    async fn guess_committed(&self, ids: &[Uuid], event_id: Uuid) -> StoreResult<bool> {
        let mut message = lock_statement(ids, "id");
        message.sql("; SELECT event_id, true FROM outbox WHERE event_id = ");
        message.value(Val::Uuid(event_id));
        let message = message.spliceable().ok_or_else(|| StoreError::Corrupt("a tenant id held a NUL".into()))?;
        let (mut tx, rows) = self.first_message(&message).await?;
        let committed = rows.iter().any(|row| row.len() == 2);
        sqlx::Executor::execute(&mut *tx, sqlx::raw_sql("ROLLBACK")).await?;
        tx.ended = true;
        Ok(committed)
    }

    /// Sends a batch transaction's first message on a lane connection, and returns its
    /// rows. A connection that has broken while it waited (the server restarted) fails
    /// before the transaction began anything: it is closed and the message sent again
    /// on another, as many times as the pool has connections.
    async fn first_message(&self, message: &str) -> StoreResult<(BatchTx, Vec<PgRow>)> {
        let mut attempts = BATCH_CONNECTIONS + 1;
        loop {
            let mut tx = BatchTx { conn: self.batches.acquire().await?, ended: false };
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
    async fn commit_batches(&self, mut tx: BatchTx, rows: &FinalRows<'_>) -> StoreResult<()> {
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
        tx.ended = true;
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

    /// `Store::claim_emails` for distinct keys, by the database's clock: the claims'
    /// `leases` names taken.
    async fn emails_claim_try(&self, keys: &[String], holder: &str, ttl: Duration) -> StoreResult<Vec<String>> {
        let rows: Vec<(String,)> = sqlx::query_as(
            "INSERT INTO leases (name, holder, expires_at) \
             SELECT 'email:' || k, $2, clock_timestamp() + make_interval(secs => $3) FROM unnest($1::text[]) AS k \
             WHERE NOT EXISTS (SELECT 1 FROM email_log WHERE email_log.key = k) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at < clock_timestamp() \
             RETURNING name",
        )
        .bind(keys)
        .bind(holder)
        .bind(ttl.as_secs_f64())
        .fetch_all(&self.writer)
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
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
/// `begin_locked`). One dropped before it ended (its `COMMIT` or `ROLLBACK` answered:
/// an error, or its future dropped midway) closes its connection, and the server rolls
/// the transaction back: the pool never gets a connection still in a transaction.
pub(super) struct BatchTx {
    conn: PoolConnection<Postgres>,
    ended: bool,
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
        if !self.ended {
            self.conn.close_on_drop();
        }
    }
}

/// `BEGIN; SELECT <columns> FROM tenants WHERE id IN (<ids>) ORDER BY id FOR UPDATE`:
/// a batch transaction's start, its tenant rows locked in id order.
fn lock_statement(ids: &[Uuid], columns: &str) -> Literal {
    let mut lock = Literal::new("BEGIN; SELECT ");
    lock.sql(columns);
    lock.sql(" FROM tenants WHERE id IN (");
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
    lock
}

/// How a guessed transaction's statement ended.
enum Sent {
    Committed,
    /// Nothing was written: its guard failed (a tenant row was not as guessed), a
    /// unique index found an email or key taken, or it could not be sent.
    Refused,
}
