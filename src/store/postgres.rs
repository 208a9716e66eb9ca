//! PostgreSQL backend: the database of record for scale-out deployments.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::ConnectOptions;

use super::sql::sql_store_impl;
use super::StoreResult;

/// A pool on one PostgreSQL database.
#[derive(Clone)]
pub struct PgStore {
    /// Shared by every request; sized for the API's concurrency, not the tenant count.
    pub(super) pool: PgPool,
}

impl PgStore {
    const MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        let options: PgConnectOptions =
            url.parse::<PgConnectOptions>()?.log_statements(tracing::log::LevelFilter::Trace);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(PgStore { pool })
    }

    /// The pool, for maintenance and tests that need raw SQL.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

sql_store_impl!(PgStore, sqlx::Postgres, "postgres");
