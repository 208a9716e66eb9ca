//! Group commit of a tenant's writes: one transaction for a whole batch.
//!
//! ## Design note: outcomes without savepoints
//! Every write of a batch must end as if it had run alone, in order: a duplicate email
//! or a full tenant fails that write only. Savepoints would give that, at two round
//! trips a write, and PostgreSQL slows every snapshot down once a transaction holds more
//! than 64 subtransactions. Instead, under the tenant-row lock (which every writer of the
//! tenant takes first, in every process), nothing of the tenant's can change but through
//! this transaction, so each failure is decided before any statement can hit it:
//! - emails are checked with one look-up per run of creates (plus the run itself),
//!   a changed email with one look-up;
//! - `max_users`, versions and idempotency keys (stored ones, and those of this very
//!   batch) are checked in memory;
//! - then a run of creates is one multi-row `INSERT`, and the batch's events one
//!   multi-row outbox `INSERT` (so one `NOTIFY`), its idempotency records one more, and
//!   the tenant row (event sequence, user count) one `UPDATE`.
//!
//! A statement that fails anyway (a bug, a constraint the checks missed) aborts the
//! transaction; `write_batch` then runs each write alone, so only the culprit fails.
//! Order: writes are applied in mailbox order, creates being held back only until the
//! next write of another kind (which may depend on them), so events take gap-free
//! `tenant_seq` numbers in that order.

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use uuid::Uuid;

use super::sql::TenantLock;
use super::{StoreError, StoreResult, WriteOutcome};
use crate::domain::{DomainEvent, User};

/// Rows per multi-row statement: 11 parameters a user row, well inside SQLite's 32,766.
pub(super) const ROWS_PER_STATEMENT: usize = 500;

/// What a batch's transaction has decided so far and must still write.
pub(super) struct Batch {
    pub tenant_id: Uuid,
    /// The tenant's last event number handed out (this batch's included).
    pub event_seq: i64,
    pub user_count: i64,
    pub max_users: i64,
    /// The tenant row as locked, to know whether it needs its one `UPDATE`.
    locked: (i64, i64),
    /// Events to append, with their `tenant_seq`, in order.
    pub events: Vec<(i64, DomainEvent)>,
    /// Idempotency records to store: key, request hash, response.
    pub idempotency: Vec<(String, String, Value)>,
    /// Keyed creates accepted in this batch: key → (request hash, user), so a second
    /// identical request in the same batch replays the first.
    pub keyed: HashMap<String, (String, User)>,
}

impl Batch {
    pub fn new(tenant_id: Uuid, lock: &TenantLock) -> Self {
        Batch {
            tenant_id,
            event_seq: lock.event_seq,
            user_count: lock.user_count,
            max_users: lock.max_users,
            locked: (lock.event_seq, lock.user_count),
            events: Vec::new(),
            idempotency: Vec::new(),
            keyed: HashMap::new(),
        }
    }

    /// Takes the next event number for `event`.
    pub fn append(&mut self, event: DomainEvent) {
        self.event_seq += 1;
        self.events.push((self.event_seq, event));
    }

    /// Whether the tenant row changed and needs its `UPDATE`.
    pub fn tenant_changed(&self) -> bool {
        (self.event_seq, self.user_count) != self.locked
    }

    /// Whether one more user fits.
    pub fn has_room(&self) -> bool {
        self.max_users == 0 || self.user_count < self.max_users
    }
}

/// The conflict for an email address the tenant already has.
pub(super) fn email_taken(email: &str) -> StoreError {
    StoreError::Conflict(format!("a user with email '{email}' already exists in this tenant"))
}

/// A stored idempotent answer, as the batch reads it.
#[derive(sqlx::FromRow)]
pub(super) struct StoredAnswer {
    pub key: String,
    pub request_hash: String,
    pub response: sqlx::types::Json<Value>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// Decides the run's creates in order (see the module note) and answers each; returns
/// the accepted users (to insert) and the stored keys found expired (to delete first).
pub(super) fn decide_creates<'w>(
    b: &mut Batch,
    writes: &'w [super::TenantWrite],
    run: &[usize],
    taken: &HashSet<String>,
    stored: &HashMap<String, StoredAnswer>,
    results: &mut [Option<StoreResult<WriteOutcome>>],
) -> StoreResult<(Vec<&'w User>, Vec<String>)> {
    let now = crate::domain::now();
    let ttl = chrono::Duration::hours(super::IDEMPOTENCY_TTL_HOURS);
    let mut accepted = Vec::new();
    let mut expired = Vec::new();
    let mut emails: HashSet<String> = HashSet::new();
    for &i in run {
        let super::TenantWrite::CreateUser { user, idempotency, ctx } = &writes[i] else { continue };
        let u = &user.0;
        // A replay answers the earlier request's user, whatever changed since.
        if let Some(req) = idempotency {
            if let Some((hash, earlier)) = b.keyed.get(&req.key) {
                results[i] = Some(if *hash == req.request_hash {
                    Ok(WriteOutcome::UserCreated(super::Created { value: earlier.clone(), replayed: true }))
                } else {
                    Err(StoreError::IdempotencyMismatch)
                });
                continue;
            }
            if let Some(row) = stored.get(&req.key) {
                if row.created_at < now - ttl {
                    expired.push(req.key.clone());
                } else if row.request_hash != req.request_hash {
                    results[i] = Some(Err(StoreError::IdempotencyMismatch));
                    continue;
                } else {
                    results[i] = Some(
                        serde_json::from_value::<User>(row.response.0.clone())
                            .map(|value| WriteOutcome::UserCreated(super::Created { value, replayed: true }))
                            .map_err(|e| StoreError::Corrupt(format!("idempotent response: {e}"))),
                    );
                    continue;
                }
            }
        }
        let email = u.email_key();
        if taken.contains(&email) || emails.contains(&email) {
            results[i] = Some(Err(email_taken(&u.email)));
            continue;
        }
        if !b.has_room() {
            results[i] = Some(Err(StoreError::TenantFull { max_users: b.max_users }));
            continue;
        }
        b.user_count += 1;
        emails.insert(email);
        b.append(DomainEvent::user_created(u, ctx));
        if let Some(req) = idempotency {
            let response = serde_json::to_value(u).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            b.keyed.insert(req.key.clone(), (req.request_hash.clone(), u.clone()));
            b.idempotency.push((req.key.clone(), req.request_hash.clone(), response));
        }
        accepted.push(u);
        results[i] = Some(Ok(WriteOutcome::UserCreated(super::Created { value: u.clone(), replayed: false })));
    }
    Ok((accepted, expired))
}

/// The transaction of one batch, stamped out per backend inside `impl $store` (sqlx's
/// executor bounds cannot be named generically; see `sql.rs`). Each backend provides
/// `LOCK_TENANT_FOR_BATCH`: a statement that locks the tenant row and returns it.
macro_rules! batch_helpers {
    ($db:ty) => {
        /// Applies `writes` in one transaction; `Err` when the transaction failed as a
        /// whole (nothing of it is written).
        async fn batch_tx(
            &self,
            tenant_id: uuid::Uuid,
            writes: &[$crate::store::TenantWrite],
        ) -> $crate::store::StoreResult<Vec<$crate::store::StoreResult<$crate::store::WriteOutcome>>> {
            use $crate::store::TenantWrite;
            let mut tx = self.writer.begin().await?;
            let lock = sqlx::query_as::<_, $crate::store::sql::TenantLock>(Self::LOCK_TENANT_FOR_BATCH)
                .bind(tenant_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or($crate::store::StoreError::NotFound("tenant"))?;
            let mut b = $crate::store::batch::Batch::new(tenant_id, &lock);
            let mut results: Vec<Option<$crate::store::StoreResult<$crate::store::WriteOutcome>>> =
                writes.iter().map(|_| None).collect();
            let mut run: Vec<usize> = Vec::new();
            for (i, write) in writes.iter().enumerate() {
                let outcome = match write {
                    TenantWrite::CreateUser { .. } => {
                        run.push(i);
                        continue;
                    }
                    TenantWrite::UpdateUser { user_id, expected_version, patch, ctx } => {
                        Self::flush_creates(&mut tx, &mut b, writes, &run, &mut results).await?;
                        run.clear();
                        Self::batch_update(&mut tx, &mut b, *user_id, *expected_version, patch, ctx).await?
                    }
                    TenantWrite::DeleteUser { user_id, expected_version, ctx } => {
                        Self::flush_creates(&mut tx, &mut b, writes, &run, &mut results).await?;
                        run.clear();
                        Self::batch_delete(&mut tx, &mut b, *user_id, *expected_version, ctx).await?
                    }
                    TenantWrite::CreateApiKey { key, ctx } => {
                        Self::flush_creates(&mut tx, &mut b, writes, &run, &mut results).await?;
                        run.clear();
                        Self::batch_api_key(&mut tx, &mut b, key, ctx).await?
                    }
                };
                results[i] = Some(outcome);
            }
            Self::flush_creates(&mut tx, &mut b, writes, &run, &mut results).await?;
            Self::finish_batch(&mut tx, &b).await?;
            tx.commit().await?;
            Ok(results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err($crate::store::StoreError::Corrupt("a write got no outcome".into()))))
                .collect())
        }

        /// Decides and inserts a run of creates (see `batch::decide_creates`).
        async fn flush_creates(
            tx: &mut sqlx::Transaction<'_, $db>,
            b: &mut $crate::store::batch::Batch,
            writes: &[$crate::store::TenantWrite],
            run: &[usize],
            results: &mut [Option<$crate::store::StoreResult<$crate::store::WriteOutcome>>],
        ) -> $crate::store::StoreResult<()> {
            use $crate::store::TenantWrite;
            if run.is_empty() {
                return Ok(());
            }
            let mut emails = Vec::new();
            let mut keys = Vec::new();
            for &i in run {
                if let TenantWrite::CreateUser { user, idempotency, .. } = &writes[i] {
                    emails.push(user.0.email_key());
                    if let Some(req) = idempotency.as_ref().filter(|r| !b.keyed.contains_key(&r.key)) {
                        keys.push(req.key.clone());
                    }
                }
            }
            let mut taken = std::collections::HashSet::new();
            for chunk in emails.chunks($crate::store::batch::ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new("SELECT email_normalized FROM users WHERE tenant_id = ");
                q.push_bind(b.tenant_id);
                q.push(" AND email_normalized IN (");
                let mut list = q.separated(", ");
                for e in chunk {
                    list.push_bind(e.as_str());
                }
                q.push(")");
                let rows: Vec<(String,)> = q.build_query_as().fetch_all(&mut **tx).await?;
                taken.extend(rows.into_iter().map(|(e,)| e));
            }
            let mut stored = std::collections::HashMap::new();
            for chunk in keys.chunks($crate::store::batch::ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "SELECT key, request_hash, response, created_at FROM idempotency_keys WHERE tenant_id = ",
                );
                q.push_bind(b.tenant_id);
                q.push(" AND key IN (");
                let mut list = q.separated(", ");
                for k in chunk {
                    list.push_bind(k.as_str());
                }
                q.push(")");
                let rows: Vec<$crate::store::batch::StoredAnswer> = q.build_query_as().fetch_all(&mut **tx).await?;
                stored.extend(rows.into_iter().map(|r| (r.key.clone(), r)));
            }
            let (accepted, expired) = $crate::store::batch::decide_creates(b, writes, run, &taken, &stored, results)?;
            for chunk in expired.chunks($crate::store::batch::ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new("DELETE FROM idempotency_keys WHERE tenant_id = ");
                q.push_bind(b.tenant_id);
                q.push(" AND key IN (");
                let mut list = q.separated(", ");
                for k in chunk {
                    list.push_bind(k.as_str());
                }
                q.push(")");
                q.build().execute(&mut **tx).await?;
            }
            for chunk in accepted.chunks($crate::store::batch::ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO users (id, tenant_id, email, email_normalized, name, status, email_verified, \
                     attributes, version, created_at, updated_at) ",
                );
                q.push_values(chunk, |mut row, u| {
                    row.push_bind(u.id)
                        .push_bind(u.tenant_id)
                        .push_bind(u.email.as_str())
                        .push_bind(u.email_key())
                        .push_bind(u.name.as_str())
                        .push_bind(u.status.as_str())
                        .push_bind(u.email_verified)
                        .push_bind(sqlx::types::Json(&u.attributes))
                        .push_bind(u.version)
                        .push_bind(u.created_at)
                        .push_bind(u.updated_at);
                });
                q.build().execute(&mut **tx).await?;
            }
            Ok(())
        }

        /// The user as the transaction sees it, if the tenant has it.
        async fn batch_user(
            tx: &mut sqlx::Transaction<'_, $db>,
            tenant_id: uuid::Uuid,
            user_id: uuid::Uuid,
        ) -> $crate::store::StoreResult<Option<$crate::domain::User>> {
            let row = sqlx::query_as::<_, $crate::store::sql::UserRow>("SELECT * FROM users WHERE tenant_id = $1 AND id = $2")
                .bind(tenant_id)
                .bind(user_id)
                .fetch_optional(&mut **tx)
                .await?;
            row.map(TryInto::try_into).transpose()
        }

        /// Patches one user (outer `Err`: the transaction failed; inner: this write did).
        async fn batch_update(
            tx: &mut sqlx::Transaction<'_, $db>,
            b: &mut $crate::store::batch::Batch,
            user_id: uuid::Uuid,
            expected_version: Option<i64>,
            patch: &$crate::domain::UserPatch,
            ctx: &$crate::domain::EventContext,
        ) -> $crate::store::StoreResult<$crate::store::StoreResult<$crate::store::WriteOutcome>> {
            use $crate::store::{StoreError, WriteOutcome};
            let Some(before) = Self::batch_user(tx, b.tenant_id, user_id).await? else {
                return Ok(Err(StoreError::NotFound("user")));
            };
            if let Some(expected) = expected_version.filter(|v| *v != before.version) {
                return Ok(Err(StoreError::StaleVersion { expected, current: before.version }));
            }
            let Some((after, kind)) = patch.apply(&before, crate::domain::now()) else {
                return Ok(Ok(WriteOutcome::UserUpdated(before))); // no-op: nothing written, no event
            };
            if after.email_key() != before.email_key() {
                let clash: Option<(uuid::Uuid,)> = sqlx::query_as(
                    "SELECT id FROM users WHERE tenant_id = $1 AND email_normalized = $2 AND id <> $3",
                )
                .bind(b.tenant_id)
                .bind(after.email_key())
                .bind(user_id)
                .fetch_optional(&mut **tx)
                .await?;
                if clash.is_some() {
                    return Ok(Err($crate::store::batch::email_taken(&after.email)));
                }
            }
            let done = sqlx::query(
                "UPDATE users SET email = $3, email_normalized = $4, name = $5, status = $6, email_verified = $7, \
                 attributes = $8, version = $9, updated_at = $10 WHERE id = $1 AND tenant_id = $2 AND version = $9 - 1",
            )
            .bind(after.id)
            .bind(after.tenant_id)
            .bind(&after.email)
            .bind(after.email_key())
            .bind(&after.name)
            .bind(after.status.as_str())
            .bind(after.email_verified)
            .bind(sqlx::types::Json(&after.attributes))
            .bind(after.version)
            .bind(after.updated_at)
            .execute(&mut **tx)
            .await?;
            if done.rows_affected() != 1 {
                return Err(StoreError::Corrupt(format!("user {} changed under the tenant lock", after.id)));
            }
            b.append($crate::domain::DomainEvent::user_changed(kind, &before, &after, ctx));
            Ok(Ok(WriteOutcome::UserUpdated(after)))
        }

        /// Deletes one user (outer `Err`: the transaction failed; inner: this write did).
        async fn batch_delete(
            tx: &mut sqlx::Transaction<'_, $db>,
            b: &mut $crate::store::batch::Batch,
            user_id: uuid::Uuid,
            expected_version: Option<i64>,
            ctx: &$crate::domain::EventContext,
        ) -> $crate::store::StoreResult<$crate::store::StoreResult<$crate::store::WriteOutcome>> {
            use $crate::store::{StoreError, WriteOutcome};
            let Some(user) = Self::batch_user(tx, b.tenant_id, user_id).await? else {
                return Ok(Err(StoreError::NotFound("user")));
            };
            if let Some(expected) = expected_version.filter(|v| *v != user.version) {
                return Ok(Err(StoreError::StaleVersion { expected, current: user.version }));
            }
            sqlx::query("DELETE FROM users WHERE tenant_id = $1 AND id = $2")
                .bind(b.tenant_id)
                .bind(user_id)
                .execute(&mut **tx)
                .await?;
            b.user_count -= 1;
            b.append($crate::domain::DomainEvent::user_deleted(&user, crate::domain::now(), ctx));
            Ok(Ok(WriteOutcome::UserDeleted))
        }

        /// Stores one API key (outer `Err`: the transaction failed).
        async fn batch_api_key(
            tx: &mut sqlx::Transaction<'_, $db>,
            b: &mut $crate::store::batch::Batch,
            key: &$crate::domain::NewApiKey,
            ctx: &$crate::domain::EventContext,
        ) -> $crate::store::StoreResult<$crate::store::StoreResult<$crate::store::WriteOutcome>> {
            if key.key.tenant_id != b.tenant_id {
                return Ok(Err($crate::store::StoreError::NotFound("tenant")));
            }
            sqlx::query("INSERT INTO api_keys (id, tenant_id, role, key_hash, created_at) VALUES ($1, $2, $3, $4, $5)")
                .bind(key.key.id)
                .bind(key.key.tenant_id)
                .bind(key.key.role.as_str())
                .bind(&key.hash)
                .bind(key.key.created_at)
                .execute(&mut **tx)
                .await?;
            b.append($crate::domain::DomainEvent::api_key_created(&key.key, ctx));
            Ok(Ok($crate::store::WriteOutcome::ApiKeyCreated(key.key.clone())))
        }

        /// The batch's shared statements: its events (one multi-row insert, so one
        /// `NOTIFY`), its idempotency records, and the tenant row's one update.
        async fn finish_batch(
            tx: &mut sqlx::Transaction<'_, $db>,
            b: &$crate::store::batch::Batch,
        ) -> $crate::store::StoreResult<()> {
            let now = crate::domain::now();
            for chunk in b.events.chunks($crate::store::batch::ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO outbox (event_id, tenant_id, tenant_seq, event_type, payload, created_at) ",
                );
                q.push_values(chunk, |mut row, (seq, event)| {
                    row.push_bind(event.id)
                        .push_bind(event.tenantid)
                        .push_bind(*seq)
                        .push_bind(event.event_type.as_str())
                        .push_bind(sqlx::types::Json(event))
                        .push_bind(now);
                });
                q.build().execute(&mut **tx).await?;
            }
            for chunk in b.idempotency.chunks($crate::store::batch::ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO idempotency_keys (tenant_id, key, request_hash, response, created_at) ",
                );
                q.push_values(chunk, |mut row, (key, hash, response)| {
                    row.push_bind(b.tenant_id)
                        .push_bind(key.as_str())
                        .push_bind(hash.as_str())
                        .push_bind(sqlx::types::Json(response))
                        .push_bind(now);
                });
                q.build().execute(&mut **tx).await?;
            }
            if b.tenant_changed() {
                sqlx::query("UPDATE tenants SET event_seq = $2, user_count = $3 WHERE id = $1")
                    .bind(b.tenant_id)
                    .bind(b.event_seq)
                    .bind(b.user_count)
                    .execute(&mut **tx)
                    .await?;
            }
            Ok(())
        }
    };
}

pub(crate) use batch_helpers;
