//! SQLite backend: the embedded default, a single file under the data directory.
//!
//! WAL mode lets readers run beside the one writer; `synchronous = NORMAL` is durable
//! against process crashes (only an OS crash can lose the last commits), the usual
//! trade for an embedded server database. Foreign keys must be switched on per
//! connection for tenant deletion to cascade.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use super::sql::sql_store_impl;
use super::StoreResult;

/// A pool on one SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    /// Several readers, one writer at a time (SQLite's own lock, waited on via busy_timeout).
    pub(super) pool: SqlitePool,
}

impl SqliteStore {
    const MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        Ok(SqliteStore { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

sql_store_impl!(SqliteStore, sqlx::Sqlite, "sqlite");
