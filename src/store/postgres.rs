//! PostgreSQL backend: the database of record for scale-out deployments.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::ConnectOptions;

use super::sql::sql_store_impl;
use super::StoreResult;

/// Longest a request waits for a pooled connection: a database that is down (or a pool
/// exhausted by it) answers 503 quickly instead of holding the request.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest one statement may run (server side).
const STATEMENT_TIMEOUT: &str = "30s";

/// A pool on one PostgreSQL database.
#[derive(Clone)]
pub struct PgStore {
    /// Shared by every request; sized for the API's concurrency, not the tenant count.
    pub(super) pool: PgPool,
    /// The same pool: PostgreSQL takes concurrent writers.
    pub(super) writer: PgPool,
}

impl PgStore {
    const MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
    /// A batch's rows (users, events, idempotency records, tenant rows) go in one
    /// statement of data-modifying CTEs: one round trip instead of four.
    const ONE_STATEMENT_WRITES: bool = true;

    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        let options: PgConnectOptions = url
            .parse::<PgConnectOptions>()?
            .options([("statement_timeout", STATEMENT_TIMEOUT)])
            .log_statements(tracing::log::LevelFilter::Trace);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(PgStore { writer: pool.clone(), pool })
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
    /// (the batch's one `UPDATE` comes at its end); returns the rows by id, and which
    /// of `emails` exist. Two round trips, as pgbench's transactions take for `BEGIN`
    /// and their first statement:
    /// - `BEGIN` and the lock go in one simple-protocol message (tenant ids are UUIDs,
    ///   written by us: nothing from a request is spliced into it);
    /// - the rows and the email look-up are one statement that starts after the locks
    ///   are held. In READ COMMITTED each statement reads a snapshot taken when it
    ///   starts, so it sees what the locks' previous holders (another process, this
    ///   tenant's previous batch) committed. (Folded into the locking statement, the
    ///   look-up missed those rows: a two-server race on one email answered 500.)
    async fn begin_locked(
        &self,
        ids: &[uuid::Uuid],
        emails: &[(uuid::Uuid, String)],
    ) -> StoreResult<(
        sqlx::Transaction<'static, sqlx::Postgres>,
        std::collections::HashMap<uuid::Uuid, super::sql::TenantLock>,
        std::collections::HashSet<(uuid::Uuid, String)>,
    )> {
        let list: Vec<String> = ids.iter().map(|id| format!("'{}'", id.hyphenated())).collect();
        let begin = format!(
            "BEGIN; SELECT 1 FROM tenants WHERE id IN ({}) ORDER BY id FOR UPDATE",
            if list.is_empty() { "NULL".to_owned() } else { list.join(", ") }
        );
        let mut tx = self.writer.begin_with(begin).await?;
        let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(
            "SELECT id, event_seq, max_users, user_count, NULL::text FROM tenants WHERE id = ANY(",
        );
        q.push_bind(ids);
        q.push(")");
        if !emails.is_empty() && emails.len() <= 10_000 {
            q.push(" UNION ALL ");
            super::batch::push_taken_emails_as_lock_rows(&mut q, emails);
        }
        let rows: Vec<(uuid::Uuid, i64, i64, i64, Option<String>)> = q.build_query_as().fetch_all(&mut *tx).await?;
        let mut locks = Vec::new();
        let mut taken = std::collections::HashSet::new();
        for (id, seq, max, count, email) in rows {
            match email {
                Some(email) => {
                    taken.insert((id, email));
                }
                None => locks.push((id, seq, max, count)),
            }
        }
        if emails.len() > 10_000 {
            taken = Self::taken_emails(&mut tx, emails).await?;
        }
        Ok((tx, super::sql::locks_by_id(locks), taken))
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
