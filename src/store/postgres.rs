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
    /// A batch's tenant-row lock: a row lock without a new row version (the batch's
    /// one `UPDATE` comes at its end).
    const LOCK_TENANT_FOR_BATCH: &'static str =
        "SELECT event_seq, max_users, user_count FROM tenants WHERE id = $1 FOR UPDATE";

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
