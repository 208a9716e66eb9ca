//! SQLite backend: the embedded default, a single file under the data directory.
//!
//! WAL mode lets readers run beside the one writer; `synchronous = NORMAL` is durable
//! against process crashes (only an OS crash can lose the last commits), the usual
//! trade for an embedded server database. Foreign keys must be switched on per
//! connection for tenant deletion to cascade.
//!
//! ## Design note: one writer
//! Every write of the process (store, embedded job queue, embedded bus) goes through
//! one pooled connection, so writers wait their turn in the pool's fair queue instead
//! of colliding on SQLite's lock and sleeping in its busy handler (which backs off up to
//! 100 ms a try). Reads use their own pool and never wait for the writer (WAL). Leases
//! are timed by this host's clock: the database file is local to this host.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use super::sql::sql_store_impl;
use super::{SqlitePools, StoreResult};

/// Takes this process's turn at setting up the database `file` (its first connection,
/// its migrations): an exclusive lock on `<file>.setup-lock`, held until the returned
/// file is dropped. Nothing to take for an in-memory database.
async fn setup_turn(file: &std::path::Path) -> StoreResult<Option<std::fs::File>> {
    if file.as_os_str().is_empty() || file.as_os_str() == ":memory:" {
        return Ok(None);
    }
    let mut lock = file.as_os_str().to_owned();
    lock.push(".setup-lock");
    let unavailable = |e: String| super::StoreError::Unavailable(format!("the setup lock beside the database: {e}"));
    tokio::task::spawn_blocking(move || {
        let f = std::fs::File::options().create(true).truncate(false).write(true).open(&lock)?;
        f.lock()?;
        Ok::<_, std::io::Error>(Some(f))
    })
    .await
    .map_err(|e| unavailable(e.to_string()))?
    .map_err(|e| unavailable(e.to_string()))
}

/// A pool on one SQLite file.
#[derive(Clone)]
pub struct SqliteStore {
    /// Readers (several; WAL lets them run beside the writer).
    pub(super) pool: SqlitePool,
    /// The one writer connection.
    pub(super) writer: SqlitePool,
}

impl SqliteStore {
    const MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
    /// SQLite has no data-modifying CTEs: a batch's rows go in one statement a table.
    const ONE_STATEMENT_WRITES: bool = false;

    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        let parsed = SqliteConnectOptions::from_str(url)?;
        // The first connection turns a new file to WAL: processes starting together take
        // turns for that too.
        let _turn = setup_turn(parsed.get_filename()).await?;
        let options = parsed
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            // Only another process writing the same file (a maintenance command) waits here.
            .busy_timeout(Duration::from_secs(30));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.clone())
            .await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        Ok(SqliteStore { pool, writer })
    }

    /// The reader pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Readers and the writer, for the embedded queue and bus.
    pub fn pools(&self) -> SqlitePools {
        SqlitePools { read: self.pool.clone(), write: self.writer.clone() }
    }

    fn embedded_pools(&self) -> Option<SqlitePools> {
        Some(self.pools())
    }

    /// Begins a batch's transaction with its tenant rows, which of `emails` exist and
    /// the stored answers for `keys`.
    /// SQLite has no `FOR UPDATE`: a write takes the database's write lock at once (a
    /// read first could meet another process's write between it and the first write,
    /// and fail with a busy snapshot).
    async fn begin_locked(
        &self,
        ids: &[uuid::Uuid],
        emails: &[(uuid::Uuid, String)],
        keys: &[(uuid::Uuid, String)],
    ) -> StoreResult<(
        sqlx::Transaction<'static, sqlx::Sqlite>,
        std::collections::HashMap<uuid::Uuid, super::sql::TenantLock>,
        super::batch::Known,
    )> {
        let mut tx = self.writer.begin().await?;
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new("UPDATE tenants SET event_seq = event_seq WHERE id IN (");
        let mut list = q.separated(", ");
        for id in ids {
            list.push_bind(*id);
        }
        q.push(") RETURNING id, event_seq, max_users, user_count");
        let rows: Vec<(uuid::Uuid, i64, i64, i64)> = q.build_query_as().fetch_all(&mut *tx).await?;
        let known = super::batch::Known {
            taken: Self::taken_emails(&mut tx, emails).await?,
            stored: Self::stored_answers(&mut tx, keys).await?,
        };
        Ok((tx, super::sql::locks_by_id(rows), known))
    }

    /// `Store::write_batches`: one writer, so a transaction has no round trips to save
    /// by guessing (`predicted.rs`); it locks first.
    async fn write_batches_ordered(
        &self,
        batches: &[(uuid::Uuid, &[super::TenantWrite])],
        locked: &(dyn Fn() + Send + Sync),
    ) -> Vec<Vec<StoreResult<super::WriteOutcome>>> {
        self.write_batches_locking(batches, locked, &|_| ()).await
    }

    /// Writes a batch's rows (bound, in multi-row statements) and commits.
    async fn commit_batches(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Sqlite>,
        rows: &super::batch::FinalRows<'_>,
    ) -> StoreResult<()> {
        Self::finish_batches(&mut tx, rows).await?;
        Ok(tx.commit().await?)
    }

    /// sqlx takes no lock on SQLite while it migrates, so processes starting together
    /// on one file (the roles split over processes) would apply the same migration
    /// twice: they take turns on a lock file beside the database instead.
    async fn migrate_exclusively(&self) -> StoreResult<()> {
        let _turn = setup_turn(self.writer.connect_options().get_filename()).await?;
        Ok(Self::MIGRATOR.run(&self.writer).await?)
    }

    /// One host: the relay is woken in-process.
    async fn send_outbox_notify(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn lease_try(&self, name: &str, holder: &str, ttl: Duration) -> StoreResult<bool> {
        let now = crate::domain::now();
        let until = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        let done = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at < $4",
        )
        .bind(name)
        .bind(holder)
        .bind(until)
        .bind(now)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// `Store::claim_emails` for distinct keys: the claims' `leases` names taken.
    async fn emails_claim_try(&self, keys: &[String], holder: &str, ttl: Duration) -> StoreResult<Vec<String>> {
        let now = crate::domain::now();
        let until = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO leases (name, holder, expires_at) SELECT 'email:' || k.column1, ",
        );
        q.push_bind(holder.to_owned());
        q.push(", ");
        q.push_bind(until);
        q.push(" FROM (");
        q.push_values(keys, |mut row, k| {
            row.push_bind(k.clone());
        });
        q.push(
            ") AS k WHERE NOT EXISTS (SELECT 1 FROM email_log WHERE email_log.key = k.column1) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at < ",
        );
        q.push_bind(now);
        q.push(" RETURNING name");
        let rows: Vec<(String,)> = q.build_query_as().fetch_all(&self.writer).await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    async fn lease_mark_published(&self, seqs: &[i64], lease: &str, holder: &str) -> StoreResult<u64> {
        let now = crate::domain::now();
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new("UPDATE outbox SET published_at = ");
        q.push_bind(now);
        q.push(" WHERE published_at IS NULL AND EXISTS (SELECT 1 FROM leases WHERE name = ");
        q.push_bind(lease.to_owned());
        q.push(" AND holder = ");
        q.push_bind(holder.to_owned());
        q.push(" AND expires_at > ");
        q.push_bind(now);
        q.push(") AND seq IN (");
        let mut list = q.separated(", ");
        for seq in seqs {
            list.push_bind(*seq);
        }
        q.push(")");
        Ok(q.build().execute(&self.writer).await?.rows_affected())
    }
}

sql_store_impl!(SqliteStore, sqlx::Sqlite, "sqlite");
