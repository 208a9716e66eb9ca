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

    /// Locks a batch's tenant rows, in id order (so overlapping batches of two
    /// processes cannot deadlock), without new row versions (the batch's one `UPDATE`
    /// comes at its end); returns the rows by id, and which of `emails` exist.
    ///
    /// The look-up is a statement of its own, after the lock: in READ COMMITTED each
    /// statement reads a snapshot taken when it starts, so only a statement that starts
    /// once the lock is held sees what the lock's previous holder (another process, or
    /// this tenant's previous batch) committed. (Folded into the lock statement it
    /// missed those rows: a two-server race on one email answered 500, not 409.)
    async fn lock_tenants(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        ids: &[uuid::Uuid],
        emails: &[(uuid::Uuid, String)],
    ) -> StoreResult<(
        std::collections::HashMap<uuid::Uuid, super::sql::TenantLock>,
        std::collections::HashSet<(uuid::Uuid, String)>,
    )> {
        let rows: Vec<(uuid::Uuid, i64, i64, i64)> = sqlx::query_as(
            "SELECT id, event_seq, max_users, user_count FROM tenants WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        )
        .bind(ids)
        .fetch_all(&mut **tx)
        .await?;
        let taken = Self::taken_emails(tx, emails).await?;
        Ok((super::sql::locks_by_id(rows), taken))
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
