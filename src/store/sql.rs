//! The one implementation of [`Store`](super::Store), shared by PostgreSQL and SQLite.
//!
//! ## Design note: the tenant-row lock
//! Every write that belongs to a tenant begins with
//! `UPDATE tenants SET event_seq = event_seq + 1 WHERE id = $1 RETURNING …`. That single
//! statement does three jobs:
//! - it **serializes** all writes of one tenant across every process on the database
//!   (PostgreSQL row lock; SQLite has one writer anyway), so `max_users` checks and
//!   idempotency look-ups see a stable state without `SERIALIZABLE` retries;
//! - it hands out the tenant's **gap-free event sequence** (`tenant_seq` in the outbox),
//!   the order the relay publishes in; a rolled-back write rolls the number back too;
//! - it takes locks in one fixed order (tenant row first), so writers cannot deadlock.
//!
//! Email uniqueness is a unique index on `(tenant_id, email_normalized)`: the database,
//! not the actor, is the last word, so two API processes cannot both win.
//!
//! The SQL is written once in the dialect both engines accept (`$n` placeholders,
//! `RETURNING`); [`sql_store_impl!`] stamps it out per backend because sqlx's generic
//! executor bounds cannot be named once in a reusable way.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::types::Json;
use uuid::Uuid;

use super::{OutboxRecord, StoreError};
use crate::domain::{ApiKey, DomainEvent, Role, User, UserStatus};

/// `users` as stored; converted to [`User`] after checking the text enums.
#[derive(sqlx::FromRow)]
pub(super) struct UserRow {
    id: Uuid,
    tenant_id: Uuid,
    email: String,
    name: String,
    status: String,
    email_verified: bool,
    attributes: Json<Map<String, Value>>,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// A user row with its password hash (sign-in only).
#[derive(sqlx::FromRow)]
pub(super) struct CredentialRow {
    #[sqlx(flatten)]
    pub(super) user: UserRow,
    pub(super) password_hash: Option<String>,
}

impl TryFrom<UserRow> for User {
    type Error = StoreError;
    fn try_from(r: UserRow) -> Result<Self, StoreError> {
        let status = UserStatus::parse(&r.status)
            .ok_or_else(|| StoreError::Corrupt(format!("user {} has status {:?}", r.id, r.status)))?;
        Ok(User {
            id: r.id,
            tenant_id: r.tenant_id,
            email: r.email,
            name: r.name,
            status,
            email_verified: r.email_verified,
            attributes: r.attributes.0,
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct ApiKeyRow {
    id: Uuid,
    tenant_id: Uuid,
    role: String,
    created_at: DateTime<Utc>,
}

impl TryFrom<ApiKeyRow> for ApiKey {
    type Error = StoreError;
    fn try_from(r: ApiKeyRow) -> Result<Self, StoreError> {
        let role = Role::parse(&r.role)
            .ok_or_else(|| StoreError::Corrupt(format!("api key {} has role {:?}", r.id, r.role)))?;
        Ok(ApiKey { id: r.id, tenant_id: r.tenant_id, role, created_at: r.created_at })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct OutboxRow {
    seq: i64,
    tenant_seq: i64,
    tenant_id: Uuid,
    payload: Json<DomainEvent>,
    created_at: DateTime<Utc>,
    published_at: Option<DateTime<Utc>>,
}

impl From<OutboxRow> for OutboxRecord {
    fn from(r: OutboxRow) -> Self {
        OutboxRecord {
            seq: r.seq,
            tenant_seq: r.tenant_seq,
            tenant_id: r.tenant_id,
            event: r.payload.0,
            created_at: r.created_at,
            published_at: r.published_at,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct AuditRow {
    event_id: Uuid,
    tenant_id: Uuid,
    event_type: String,
    subject: String,
    actor: Json<crate::domain::Actor>,
    correlation_id: String,
    at: DateTime<Utc>,
    before: Option<Json<Value>>,
    after: Option<Json<Value>>,
}

impl From<AuditRow> for crate::domain::AuditEntry {
    fn from(r: AuditRow) -> Self {
        crate::domain::AuditEntry {
            event_id: r.event_id,
            tenant_id: r.tenant_id,
            event_type: r.event_type,
            subject: r.subject,
            actor: r.actor.0,
            correlation_id: r.correlation_id,
            at: r.at,
            before: r.before.map(|j| j.0),
            after: r.after.map(|j| j.0),
        }
    }
}

/// A `webhook_endpoints` row: the endpoint, and its secrets for delivery.
#[derive(sqlx::FromRow)]
pub(super) struct WebhookRow {
    id: Uuid,
    pub(super) tenant_id: Uuid,
    url: String,
    description: String,
    event_types: String,
    status: String,
    disabled_reason: Option<String>,
    secret: String,
    previous_secret: Option<String>,
    previous_secret_until: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl WebhookRow {
    pub(super) fn endpoint(&self) -> crate::domain::webhook::WebhookEndpoint {
        crate::domain::webhook::WebhookEndpoint {
            id: self.id,
            tenant_id: self.tenant_id,
            url: self.url.clone(),
            description: self.description.clone(),
            event_types: serde_json::from_str(&self.event_types).unwrap_or_default(),
            status: crate::domain::webhook::EndpointStatus::parse(&self.status)
                .unwrap_or(crate::domain::webhook::EndpointStatus::Disabled),
            disabled_reason: self.disabled_reason.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }

    /// The secrets that sign at `now`: the previous one only until its overlap ends.
    pub(super) fn secrets(&self, now: DateTime<Utc>) -> crate::domain::webhook::Secrets {
        let previous = self.previous_secret.clone().filter(|_| self.previous_secret_until.is_some_and(|u| u > now));
        crate::domain::webhook::Secrets { current: self.secret.clone(), previous }
    }
}

/// An `event_types` row (the schema is stored as JSON text).
#[derive(sqlx::FromRow)]
pub(super) struct EventTypeRow {
    tenant_id: Uuid,
    name: String,
    description: String,
    schema: String,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<EventTypeRow> for crate::domain::custom_event::EventTypeDef {
    fn from(r: EventTypeRow) -> Self {
        crate::domain::custom_event::EventTypeDef {
            tenant_id: r.tenant_id,
            name: r.name,
            description: r.description,
            schema: serde_json::from_str(&r.schema).unwrap_or(serde_json::Value::Null),
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// Locked tenant rows (id, event_seq, max_users, user_count) by id.
pub(super) fn locks_by_id(rows: Vec<(Uuid, i64, i64, i64)>) -> std::collections::HashMap<Uuid, TenantLock> {
    rows.into_iter()
        .map(|(id, event_seq, max_users, user_count)| (id, TenantLock { event_seq, max_users, user_count }))
        .collect()
}

/// `DELETE FROM leases WHERE [holder = … AND] name IN (…)`: these emails' claims
/// (`Store::claim_emails`), only `holder`'s when given.
pub(super) fn delete_claims<'a, DB: sqlx::Database>(keys: &[String], holder: Option<&str>) -> sqlx::QueryBuilder<'a, DB>
where
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut q = sqlx::QueryBuilder::new("DELETE FROM leases WHERE ");
    if let Some(holder) = holder {
        q.push("holder = ");
        q.push_bind(holder.to_owned());
        q.push(" AND ");
    }
    q.push("name IN (");
    let mut names = q.separated(", ");
    for k in keys {
        names.push_bind(super::email_claim(k));
    }
    q.push(")");
    q
}

/// The tenant row as the lock statement returns it.
#[derive(sqlx::FromRow, Clone, Copy, Debug, PartialEq)]
pub(super) struct TenantLock {
    pub event_seq: i64,
    pub max_users: i64,
    pub user_count: i64,
}

/// The one place a unique violation becomes a conflict; every other error stays a
/// database error.
pub(super) fn conflict_or(e: sqlx::Error, message: impl FnOnce() -> String) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(message()),
        _ => StoreError::Database(e),
    }
}

/// Stamps out `impl Store` for one sqlx backend. `$store` must have `pool: Pool<$db>`
/// (reads) and `writer: Pool<$db>` (writes: the same pool on PostgreSQL, one connection
/// on SQLite) fields, a `MIGRATOR` associated static, and the backend's own
/// `embedded_pools`, `lease_try`, `lease_mark_published` and `emails_claim_try` (the
/// lease statements read the clock, which differs per engine).
macro_rules! sql_store_impl {
    ($store:ty, $db:ty, $backend:literal) => {
        impl $store {
            /// `Store::write_batches`, locking first: one transaction, and where it fails
            /// as a whole, each tenant alone, then each write alone. `decided` gets the
            /// tenant rows each transaction will leave, before its commit.
            async fn write_batches_locking(
                &self,
                batches: &[(uuid::Uuid, &[$crate::store::TenantWrite])],
                locked: &(dyn Fn() + Send + Sync),
                decided: &(dyn Fn(&[(uuid::Uuid, $crate::store::sql::TenantLock)]) + Send + Sync),
            ) -> Vec<Vec<$crate::store::StoreResult<$crate::store::WriteOutcome>>> {
                use $crate::store::StoreError;
                let error = match self.batches_tx(batches, locked, decided).await {
                    Ok(outcomes) => return outcomes,
                    Err(e) => e,
                };
                let writes: usize = batches.iter().map(|(_, w)| w.len()).sum();
                if writes == 1 {
                    // The one write's own error.
                    let mut error = Some(error);
                    return batches
                        .iter()
                        .map(|(_, w)| w.iter().map(|_| Err(error.take().unwrap_or_else(|| StoreError::Corrupt("one error, two writes".into())))).collect())
                        .collect();
                }
                // Every write would meet the same fate: tell each of them.
                if error.is_unreachable() {
                    return $crate::store::writes::all_unavailable(batches, &error.to_string());
                }
                // A statement failed in a way the checks did not foresee: the transaction
                // is gone, and with it every write. Run each tenant alone, then each of
                // its writes alone, so only the write at fault fails.
                tracing::warn!(tenants = batches.len(), writes, %error,
                    "a transaction of tenant writes failed as a whole; applying them one by one");
                let mut all = Vec::with_capacity(batches.len());
                for (tenant_id, tenant_writes) in batches {
                    let mut outcomes = Vec::with_capacity(tenant_writes.len());
                    let alone = if batches.len() > 1 { self.batches_tx(&[(*tenant_id, tenant_writes)], &|| (), decided).await.ok() } else { None };
                    match alone.and_then(|mut o| o.pop()) {
                        Some(o) => outcomes = o,
                        None => {
                            for write in tenant_writes.iter() {
                                outcomes.push(match self.batches_tx(&[(*tenant_id, std::slice::from_ref(write))], &|| (), decided).await {
                                    Ok(mut o) => o.pop().map_or_else(|| Err(StoreError::Corrupt("no outcome".into())), $crate::store::writes::single),
                                    Err(e) => Err(e),
                                });
                            }
                        }
                    }
                    all.push(outcomes);
                }
                all
            }

            /// Locks the tenant row and takes the next event number (see the module note).
            async fn lock_tenant(
                tx: &mut sqlx::Transaction<'_, $db>,
                tenant_id: uuid::Uuid,
            ) -> $crate::store::StoreResult<$crate::store::sql::TenantLock> {
                sqlx::query_as::<_, $crate::store::sql::TenantLock>(
                    "UPDATE tenants SET event_seq = event_seq + 1 WHERE id = $1 \
                     RETURNING event_seq, max_users, user_count",
                )
                .bind(tenant_id)
                .fetch_optional(&mut **tx)
                .await?
                .ok_or($crate::store::StoreError::NotFound("tenant"))
            }

            /// Appends the event to the outbox inside the caller's transaction.
            async fn insert_event(
                tx: &mut sqlx::Transaction<'_, $db>,
                tenant_seq: i64,
                event: &$crate::domain::DomainEvent,
            ) -> $crate::store::StoreResult<()> {
                sqlx::query(
                    "INSERT INTO outbox (event_id, tenant_id, tenant_seq, event_type, payload, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(event.id)
                .bind(event.tenantid)
                .bind(tenant_seq)
                .bind(event.event_type.as_str())
                .bind(sqlx::types::Json(event))
                .bind(crate::domain::now())
                .execute(&mut **tx)
                .await?;
                Ok(())
            }

            async fn select_tenant(
                tx: &mut sqlx::Transaction<'_, $db>,
                id: uuid::Uuid,
            ) -> $crate::store::StoreResult<$crate::domain::Tenant> {
                sqlx::query_as::<_, $crate::domain::Tenant>("SELECT * FROM tenants WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut **tx)
                    .await?
                    .ok_or($crate::store::StoreError::NotFound("tenant"))
            }

            /// A session as the transaction sees it.
            async fn session_row(
                tx: &mut sqlx::Transaction<'_, $db>,
                id: uuid::Uuid,
            ) -> $crate::store::StoreResult<$crate::domain::auth::Session> {
                sqlx::query_as::<_, $crate::domain::auth::Session>(
                    "SELECT id, tenant_id, user_id, created_at, last_used_at, expires_at, user_agent, ip \
                     FROM auth_sessions WHERE id = $1",
                )
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?
                .ok_or($crate::store::StoreError::NotFound("session"))
            }

            $crate::store::batch::batch_helpers!($db);
        }

        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            fn backend(&self) -> &'static str {
                $backend
            }

            fn sqlite_pools(&self) -> Option<$crate::store::SqlitePools> {
                self.embedded_pools()
            }

            async fn migrate(&self) -> $crate::store::StoreResult<()> {
                self.migrate_exclusively().await
            }

            async fn ping(&self) -> $crate::store::StoreResult<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn notify_outbox(&self) -> $crate::store::StoreResult<()> {
                self.send_outbox_notify().await
            }

            async fn create_tenant(
                &self,
                t: &$crate::domain::NewTenant,
                key: &$crate::domain::NewApiKey,
                ctx: &$crate::domain::EventContext,
            ) -> $crate::store::StoreResult<$crate::domain::Tenant> {
                let tenant = t.to_tenant();
                let mut tx = self.writer.begin().await?;
                sqlx::query(
                    "INSERT INTO tenants (id, slug, name, max_users, user_count, event_seq, created_at, updated_at, \
                     rate_limit_per_second) VALUES ($1, $2, $3, $4, 0, 1, $5, $5, $6)",
                )
                .bind(tenant.id)
                .bind(&tenant.slug)
                .bind(&tenant.name)
                .bind(tenant.max_users)
                .bind(tenant.created_at)
                .bind(tenant.rate_limit_per_second)
                .execute(&mut *tx)
                .await
                .map_err(|e| $crate::store::sql::conflict_or(e, || format!("a tenant with slug '{}' already exists", tenant.slug)))?;
                sqlx::query("INSERT INTO api_keys (id, tenant_id, role, key_hash, created_at) VALUES ($1, $2, $3, $4, $5)")
                    .bind(key.key.id)
                    .bind(tenant.id)
                    .bind(key.key.role.as_str())
                    .bind(&key.hash)
                    .bind(key.key.created_at)
                    .execute(&mut *tx)
                    .await?;
                let event = $crate::domain::DomainEvent::tenant_created(&tenant, &key.key, ctx);
                Self::insert_event(&mut tx, 1, &event).await?;
                tx.commit().await?;
                Ok(tenant)
            }

            async fn get_tenant(&self, id: uuid::Uuid) -> $crate::store::StoreResult<$crate::domain::Tenant> {
                sqlx::query_as::<_, $crate::domain::Tenant>("SELECT * FROM tenants WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?
                    .ok_or($crate::store::StoreError::NotFound("tenant"))
            }

            async fn list_tenants(
                &self,
                page: $crate::domain::PageRequest,
            ) -> $crate::store::StoreResult<$crate::domain::Page<$crate::domain::Tenant>> {
                let rows = sqlx::query_as::<_, $crate::domain::Tenant>("SELECT * FROM tenants WHERE id > $1 ORDER BY id LIMIT $2")
                    .bind(page.after.map(|c| c.0).unwrap_or(uuid::Uuid::nil()))
                    .bind(i64::from(page.limit) + 1)
                    .fetch_all(&self.pool)
                    .await?;
                Ok($crate::domain::Page::from_rows(rows, page.limit, |t| t.id))
            }

            async fn update_tenant(
                &self,
                id: uuid::Uuid,
                patch: &$crate::domain::TenantPatch,
                ctx: &$crate::domain::EventContext,
            ) -> $crate::store::StoreResult<$crate::domain::Tenant> {
                let mut tx = self.writer.begin().await?;
                let lock = Self::lock_tenant(&mut tx, id).await?;
                let before = Self::select_tenant(&mut tx, id).await?;
                let Some(after) = patch.apply(&before, crate::domain::now()) else {
                    return Ok(before); // nothing changes: the rollback returns the event number
                };
                sqlx::query(
                    "UPDATE tenants SET name = $2, max_users = $3, updated_at = $4, rate_limit_per_second = $5 \
                     WHERE id = $1",
                )
                .bind(id)
                .bind(&after.name)
                .bind(after.max_users)
                .bind(after.updated_at)
                .bind(after.rate_limit_per_second)
                    .execute(&mut *tx)
                    .await?;
                let event = $crate::domain::DomainEvent::tenant_updated(&before, &after, ctx);
                Self::insert_event(&mut tx, lock.event_seq, &event).await?;
                tx.commit().await?;
                Ok(after)
            }

            async fn delete_tenant(&self, id: uuid::Uuid, ctx: &$crate::domain::EventContext) -> $crate::store::StoreResult<()> {
                let mut tx = self.writer.begin().await?;
                let lock = Self::lock_tenant(&mut tx, id).await?;
                let tenant = Self::select_tenant(&mut tx, id).await?;
                sqlx::query("DELETE FROM tenants WHERE id = $1").bind(id).execute(&mut *tx).await?;
                let event = $crate::domain::DomainEvent::tenant_deleted(&tenant, crate::domain::now(), ctx);
                Self::insert_event(&mut tx, lock.event_seq, &event).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn find_api_key(&self, hash: &str) -> $crate::store::StoreResult<Option<$crate::domain::ApiKey>> {
                let row = sqlx::query_as::<_, $crate::store::sql::ApiKeyRow>(
                    "SELECT id, tenant_id, role, created_at FROM api_keys WHERE key_hash = $1",
                )
                .bind(hash)
                .fetch_optional(&self.pool)
                .await?;
                row.map(TryInto::try_into).transpose()
            }

            async fn write_batches(
                &self,
                batches: &[(uuid::Uuid, &[$crate::store::TenantWrite])],
                locked: &(dyn Fn() + Send + Sync),
            ) -> Vec<Vec<$crate::store::StoreResult<$crate::store::WriteOutcome>>> {
                if batches.iter().all(|(_, w)| w.is_empty()) {
                    return batches.iter().map(|_| Vec::new()).collect();
                }
                self.write_batches_ordered(batches, locked).await
            }

            async fn get_user(&self, tenant_id: uuid::Uuid, user_id: uuid::Uuid) -> $crate::store::StoreResult<$crate::domain::User> {
                let row = sqlx::query_as::<_, $crate::store::sql::UserRow>("SELECT * FROM users WHERE tenant_id = $1 AND id = $2")
                    .bind(tenant_id)
                    .bind(user_id)
                    .fetch_optional(&self.pool)
                    .await?
                    .ok_or($crate::store::StoreError::NotFound("user"))?;
                row.try_into()
            }

            async fn get_users(
                &self,
                tenant_id: uuid::Uuid,
                ids: &[uuid::Uuid],
            ) -> $crate::store::StoreResult<Vec<$crate::domain::User>> {
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let marks: Vec<String> = (0..ids.len()).map(|i| format!("${}", i + 2)).collect();
                let sql = format!("SELECT * FROM users WHERE tenant_id = $1 AND id IN ({})", marks.join(", "));
                let mut query = sqlx::query_as::<_, $crate::store::sql::UserRow>(&sql).bind(tenant_id);
                for id in ids {
                    query = query.bind(*id);
                }
                let mut found: std::collections::HashMap<uuid::Uuid, $crate::domain::User> = std::collections::HashMap::new();
                for row in query.fetch_all(&self.pool).await? {
                    let user: $crate::domain::User = row.try_into()?;
                    found.insert(user.id, user);
                }
                Ok(ids.iter().filter_map(|id| found.get(id).cloned()).collect())
            }

            async fn find_users(&self, ids: &[uuid::Uuid]) -> $crate::store::StoreResult<Vec<$crate::domain::User>> {
                let mut users = Vec::with_capacity(ids.len());
                for chunk in ids.chunks(500) {
                    let mut q = sqlx::QueryBuilder::<$db>::new("SELECT * FROM users WHERE id IN (");
                    let mut list = q.separated(", ");
                    for id in chunk {
                        list.push_bind(*id);
                    }
                    q.push(")");
                    let rows: Vec<$crate::store::sql::UserRow> = q.build_query_as().fetch_all(&self.pool).await?;
                    for row in rows {
                        users.push(row.try_into()?);
                    }
                }
                Ok(users)
            }

            async fn list_users(
                &self,
                tenant_id: uuid::Uuid,
                page: $crate::domain::PageRequest,
            ) -> $crate::store::StoreResult<$crate::domain::Page<$crate::domain::User>> {
                let rows = sqlx::query_as::<_, $crate::store::sql::UserRow>(
                    "SELECT * FROM users WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                )
                .bind(tenant_id)
                .bind(page.after.map(|c| c.0).unwrap_or(uuid::Uuid::nil()))
                .bind(i64::from(page.limit) + 1)
                .fetch_all(&self.pool)
                .await?;
                let users = rows.into_iter().map(TryInto::try_into).collect::<Result<Vec<$crate::domain::User>, _>>()?;
                Ok($crate::domain::Page::from_rows(users, page.limit, |u| u.id))
            }

            async fn purge_idempotency_keys(&self, before: chrono::DateTime<chrono::Utc>) -> $crate::store::StoreResult<u64> {
                let done = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1").bind(before).execute(&self.writer).await?;
                // Custom events' ids are kept as long.
                let keys = sqlx::query("DELETE FROM event_keys WHERE created_at < $1").bind(before).execute(&self.writer).await?;
                Ok(done.rows_affected() + keys.rows_affected())
            }

            async fn outbox_after(&self, after_seq: i64, limit: u32) -> $crate::store::StoreResult<Vec<$crate::store::OutboxRecord>> {
                let rows = sqlx::query_as::<_, $crate::store::sql::OutboxRow>(
                    "SELECT seq, tenant_seq, tenant_id, payload, created_at, published_at FROM outbox \
                     WHERE seq > $1 ORDER BY seq LIMIT $2",
                )
                .bind(after_seq)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            async fn unpublished_outbox(&self, limit: u32) -> $crate::store::StoreResult<Vec<$crate::store::OutboxMessage>> {
                Ok(sqlx::query_as::<_, $crate::store::OutboxMessage>(
                    "SELECT seq, tenant_seq, event_id, event_type, CAST(payload AS TEXT) AS payload FROM outbox \
                     WHERE published_at IS NULL ORDER BY seq LIMIT $1",
                )
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?)
            }

            async fn mark_published(&self, seqs: &[i64], lease: &str, holder: &str) -> $crate::store::StoreResult<u64> {
                if seqs.is_empty() {
                    return Ok(0);
                }
                self.lease_mark_published(seqs, lease, holder).await
            }

            async fn prune_outbox(&self, retention: std::time::Duration, limit: u32) -> $crate::store::StoreResult<u64> {
                let before = $crate::domain::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
                let done = sqlx::query(
                    "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE published_at IS NOT NULL \
                     AND published_at < $1 ORDER BY seq LIMIT $2)",
                )
                .bind(before)
                .bind(i64::from(limit))
                .execute(&self.writer)
                .await?;
                Ok(done.rows_affected())
            }

            async fn oldest_unpublished(&self) -> $crate::store::StoreResult<Option<chrono::DateTime<chrono::Utc>>> {
                let row: Option<(chrono::DateTime<chrono::Utc>,)> = sqlx::query_as(
                    "SELECT created_at FROM outbox WHERE published_at IS NULL ORDER BY seq LIMIT 1",
                )
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(|r| r.0))
            }

            async fn try_lease(&self, name: &str, holder: &str, ttl: std::time::Duration) -> $crate::store::StoreResult<bool> {
                self.lease_try(name, holder, ttl).await
            }

            async fn release_lease(&self, name: &str, holder: &str) -> $crate::store::StoreResult<()> {
                sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
                    .bind(name)
                    .bind(holder)
                    .execute(&self.writer)
                    .await?;
                Ok(())
            }

            async fn append_audit_many(&self, entries: &[$crate::domain::AuditEntry]) -> $crate::store::StoreResult<u64> {
                let mut tx = self.writer.begin().await?;
                let now = $crate::domain::now();
                let mut new: std::collections::HashSet<uuid::Uuid> = std::collections::HashSet::new();
                // Ten binds a row: chunks stay well below either engine's parameter limit.
                for chunk in entries.chunks(500) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO audit_log (event_id, tenant_id, event_type, subject, actor, correlation_id, at, \
                         before, after, recorded_at) ",
                    );
                    q.push_values(chunk, |mut row, e| {
                        row.push_bind(e.event_id)
                            .push_bind(e.tenant_id)
                            .push_bind(e.event_type.clone())
                            .push_bind(e.subject.clone())
                            .push_bind(sqlx::types::Json(e.actor.clone()))
                            .push_bind(e.correlation_id.clone())
                            .push_bind(e.at)
                            .push_bind(e.before.clone().map(sqlx::types::Json))
                            .push_bind(e.after.clone().map(sqlx::types::Json))
                            .push_bind(now);
                    });
                    q.push(" ON CONFLICT (event_id) DO NOTHING RETURNING event_id");
                    let ids: Vec<(uuid::Uuid,)> = q.build_query_as().fetch_all(&mut *tx).await?;
                    new.extend(ids.into_iter().map(|(id,)| id));
                }
                // The analytics of the entries written now, in their transaction: each event
                // is counted exactly once (commit time from its UUIDv7 id).
                let processed = entries.iter().filter(|e| new.contains(&e.event_id)).map(|e| {
                    (e.tenant_id, e.event_type.as_str(), $crate::domain::event::id_time(e.event_id).unwrap_or(e.at))
                });
                let increments: Vec<($crate::domain::analytics::StatKey, i64)> =
                    $crate::domain::analytics::stat_increments(processed, chrono::Utc::now()).into_iter().collect();
                for chunk in increments.chunks(500) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO event_stats (tenant_id, grain, bucket_start, event_type, latency_bucket, count) ",
                    );
                    q.push_values(chunk, |mut row, (k, n)| {
                        row.push_bind(k.tenant_id)
                            .push_bind(k.grain)
                            .push_bind(k.bucket_start)
                            .push_bind(k.event_type.clone())
                            .push_bind(k.latency_bucket)
                            .push_bind(*n);
                    });
                    q.push(
                        " ON CONFLICT (tenant_id, grain, bucket_start, event_type, latency_bucket) \
                         DO UPDATE SET count = event_stats.count + excluded.count",
                    );
                    q.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(new.len() as u64)
            }

            async fn user_credentials(
                &self,
                tenant_id: uuid::Uuid,
                email_normalized: &str,
            ) -> $crate::store::StoreResult<Option<($crate::domain::User, Option<String>)>> {
                let row = sqlx::query_as::<_, $crate::store::sql::CredentialRow>(
                    "SELECT * FROM users WHERE tenant_id = $1 AND email_normalized = $2",
                )
                .bind(tenant_id)
                .bind(email_normalized)
                .fetch_optional(&self.pool)
                .await?;
                let Some(row) = row else { return Ok(None) };
                Ok(Some((row.user.try_into()?, row.password_hash)))
            }

            async fn user_with_hash(
                &self,
                tenant_id: uuid::Uuid,
                user_id: uuid::Uuid,
            ) -> $crate::store::StoreResult<($crate::domain::User, Option<String>)> {
                let row = sqlx::query_as::<_, $crate::store::sql::CredentialRow>(
                    "SELECT * FROM users WHERE tenant_id = $1 AND id = $2",
                )
                .bind(tenant_id)
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?
                .ok_or($crate::store::StoreError::NotFound("user"))?;
                Ok((row.user.try_into()?, row.password_hash))
            }

            async fn set_password(
                &self,
                tenant_id: uuid::Uuid,
                user_id: uuid::Uuid,
                hash: &str,
                keep: Option<uuid::Uuid>,
                ctx: &$crate::domain::EventContext,
            ) -> $crate::store::StoreResult<$crate::domain::User> {
                let now = $crate::domain::now();
                let mut tx = self.writer.begin().await?;
                let lock = Self::lock_tenant(&mut tx, tenant_id).await?;
                let row = sqlx::query_as::<_, $crate::store::sql::UserRow>(
                    "UPDATE users SET password_hash = $3 WHERE tenant_id = $1 AND id = $2 RETURNING *",
                )
                .bind(tenant_id)
                .bind(user_id)
                .bind(hash)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or($crate::store::StoreError::NotFound("user"))?;
                let user: $crate::domain::User = row.try_into()?;
                sqlx::query(
                    "UPDATE auth_sessions SET revoked_at = $3, revoked_reason = 'password changed' \
                     WHERE tenant_id = $1 AND user_id = $2 AND revoked_at IS NULL AND ($4 IS NULL OR id <> $4)",
                )
                .bind(tenant_id)
                .bind(user_id)
                .bind(now)
                .bind(keep)
                .execute(&mut *tx)
                .await?;
                let event = $crate::domain::DomainEvent::user_password_changed(&user, ctx);
                Self::insert_event(&mut tx, lock.event_seq, &event).await?;
                tx.commit().await?;
                Ok(user)
            }

            async fn put_code(
                &self,
                tenant_id: uuid::Uuid,
                user_id: uuid::Uuid,
                purpose: &str,
                code_hash: &str,
                expires_at: chrono::DateTime<chrono::Utc>,
                tries: i32,
            ) -> $crate::store::StoreResult<()> {
                sqlx::query(
                    "INSERT INTO auth_codes (user_id, purpose, tenant_id, code_hash, tries_left, expires_at, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (user_id, purpose) DO UPDATE SET \
                     code_hash = excluded.code_hash, tries_left = excluded.tries_left, \
                     expires_at = excluded.expires_at, created_at = excluded.created_at",
                )
                .bind(user_id)
                .bind(purpose)
                .bind(tenant_id)
                .bind(code_hash)
                .bind(tries)
                .bind(expires_at)
                .bind($crate::domain::now())
                .execute(&self.writer)
                .await?;
                Ok(())
            }

            async fn redeem_code(
                &self,
                tenant_id: uuid::Uuid,
                user_id: uuid::Uuid,
                purpose: &str,
                code_hash: &str,
                new_hash: Option<&str>,
                ctx: &$crate::domain::EventContext,
            ) -> $crate::store::StoreResult<$crate::store::CodeOutcome> {
                use $crate::store::CodeOutcome;
                let now = $crate::domain::now();
                let mut tx = self.writer.begin().await?;
                let row: Option<(String, i32)> = sqlx::query_as(
                    "SELECT code_hash, tries_left FROM auth_codes WHERE user_id = $1 AND purpose = $2 \
                     AND tenant_id = $3 AND expires_at > $4 AND tries_left > 0",
                )
                .bind(user_id)
                .bind(purpose)
                .bind(tenant_id)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
                let Some((stored, tries)) = row else { return Ok(CodeOutcome::NoCode) };
                let right: bool = subtle::ConstantTimeEq::ct_eq(stored.as_bytes(), code_hash.as_bytes()).into();
                if !right {
                    sqlx::query(
                        "UPDATE auth_codes SET tries_left = tries_left - 1 WHERE user_id = $1 AND purpose = $2 \
                         AND tries_left > 0",
                    )
                    .bind(user_id)
                    .bind(purpose)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    return Ok(CodeOutcome::Wrong { tries_left: (tries - 1).max(0) });
                }
                // The tenant row before the code's (the order every writer, a user's
                // deletion included, takes them in), then the code is claimed once: a
                // concurrent redeem of the same code finds it gone.
                let lock = Self::lock_tenant(&mut tx, tenant_id).await?;
                let claimed = sqlx::query("DELETE FROM auth_codes WHERE user_id = $1 AND purpose = $2 AND code_hash = $3")
                    .bind(user_id)
                    .bind(purpose)
                    .bind(code_hash)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if claimed == 0 {
                    return Ok(CodeOutcome::NoCode); // the rollback returns the event number
                }
                let before: $crate::domain::User = sqlx::query_as::<_, $crate::store::sql::UserRow>(
                    "SELECT * FROM users WHERE tenant_id = $1 AND id = $2",
                )
                .bind(tenant_id)
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or($crate::store::StoreError::NotFound("user"))?
                .try_into()?;
                let (user, event) = match (purpose, new_hash) {
                    ("reset", Some(hash)) => {
                        sqlx::query("UPDATE users SET password_hash = $2 WHERE id = $1")
                            .bind(user_id)
                            .bind(hash)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query(
                            "UPDATE auth_sessions SET revoked_at = $2, revoked_reason = 'password reset' \
                             WHERE user_id = $1 AND revoked_at IS NULL",
                        )
                        .bind(user_id)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                        let event = $crate::domain::DomainEvent::user_password_changed(&before, ctx);
                        (before, event)
                    }
                    _ => {
                        let after: $crate::domain::User = sqlx::query_as::<_, $crate::store::sql::UserRow>(
                            "UPDATE users SET email_verified = TRUE, version = version + 1, updated_at = $2 \
                             WHERE id = $1 RETURNING *",
                        )
                        .bind(user_id)
                        .bind(now)
                        .fetch_one(&mut *tx)
                        .await?
                        .try_into()?;
                        let event = $crate::domain::DomainEvent::user_changed(
                            $crate::domain::EventType::UserVerified,
                            &before,
                            &after,
                            ctx,
                        );
                        (after, event)
                    }
                };
                Self::insert_event(&mut tx, lock.event_seq, &event).await?;
                tx.commit().await?;
                Ok(CodeOutcome::Redeemed(user))
            }

            async fn rehash_password(
                &self,
                tenant_id: uuid::Uuid,
                user_id: uuid::Uuid,
                hash: &str,
            ) -> $crate::store::StoreResult<()> {
                sqlx::query("UPDATE users SET password_hash = $3 WHERE tenant_id = $1 AND id = $2")
                    .bind(tenant_id)
                    .bind(user_id)
                    .bind(hash)
                    .execute(&self.writer)
                    .await?;
                Ok(())
            }

            async fn create_session(
                &self,
                session: &$crate::domain::auth::Session,
                refresh_hash: &str,
                event: &$crate::domain::DomainEvent,
            ) -> $crate::store::StoreResult<()> {
                let mut tx = self.writer.begin().await?;
                let lock = Self::lock_tenant(&mut tx, session.tenant_id).await?;
                sqlx::query(
                    "INSERT INTO auth_sessions (id, tenant_id, user_id, created_at, last_used_at, expires_at, \
                     user_agent, ip) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(session.id)
                .bind(session.tenant_id)
                .bind(session.user_id)
                .bind(session.created_at)
                .bind(session.last_used_at)
                .bind(session.expires_at)
                .bind(&session.user_agent)
                .bind(&session.ip)
                .execute(&mut *tx)
                .await?;
                sqlx::query("INSERT INTO refresh_tokens (token_hash, session_id, created_at) VALUES ($1, $2, $3)")
                    .bind(refresh_hash)
                    .bind(session.id)
                    .bind(session.created_at)
                    .execute(&mut *tx)
                    .await?;
                Self::insert_event(&mut tx, lock.event_seq, event).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn use_refresh_token(
                &self,
                tenant_id: uuid::Uuid,
                token_hash: &str,
                new_hash: &str,
                correlation_id: &str,
            ) -> $crate::store::StoreResult<$crate::store::RefreshUse> {
                use $crate::store::RefreshUse;
                let now = $crate::domain::now();
                let mut tx = self.writer.begin().await?;
                let found: Option<(Option<chrono::DateTime<chrono::Utc>>, uuid::Uuid)> = sqlx::query_as(
                    "SELECT t.spent_at, s.id FROM refresh_tokens t JOIN auth_sessions s ON s.id = t.session_id \
                     WHERE t.token_hash = $1 AND s.tenant_id = $2 AND s.revoked_at IS NULL AND s.expires_at > $3",
                )
                .bind(token_hash)
                .bind(tenant_id)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
                let Some((spent_at, session_id)) = found else { return Ok(RefreshUse::Invalid) };
                // Spend it, unless someone did first (then this is a reuse too).
                let spent_now = spent_at.is_none()
                    && sqlx::query("UPDATE refresh_tokens SET spent_at = $2 WHERE token_hash = $1 AND spent_at IS NULL")
                        .bind(token_hash)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                        == 1;
                if !spent_now {
                    // Reuse: the whole family ends, with the event, in one transaction.
                    let lock = Self::lock_tenant(&mut tx, tenant_id).await?;
                    let revoked = sqlx::query(
                        "UPDATE auth_sessions SET revoked_at = $2, revoked_reason = 'refresh token reuse' \
                         WHERE id = $1 AND revoked_at IS NULL",
                    )
                    .bind(session_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    let session = Self::session_row(&mut tx, session_id).await?;
                    if revoked == 1 {
                        // Whoever presented it holds the session's token: its user.
                        let ctx = $crate::domain::EventContext {
                            correlation_id: correlation_id.to_owned(),
                            actor: $crate::domain::Actor::User { id: session.user_id },
                        };
                        let event = $crate::domain::DomainEvent::auth_refresh_reuse_detected(&session, &ctx);
                        Self::insert_event(&mut tx, lock.event_seq, &event).await?;
                        tx.commit().await?;
                    }
                    return Ok(RefreshUse::Reused(session));
                }
                sqlx::query("INSERT INTO refresh_tokens (token_hash, session_id, created_at) VALUES ($1, $2, $3)")
                    .bind(new_hash)
                    .bind(session_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE auth_sessions SET last_used_at = $2 WHERE id = $1")
                    .bind(session_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                let session = Self::session_row(&mut tx, session_id).await?;
                let user = sqlx::query_as::<_, $crate::store::sql::UserRow>("SELECT * FROM users WHERE id = $1")
                    .bind(session.user_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(user) = user else { return Ok(RefreshUse::Invalid) };
                let user: $crate::domain::User = user.try_into()?;
                tx.commit().await?;
                Ok(RefreshUse::Rotated { session, user })
            }

            async fn revoke_session(
                &self,
                tenant_id: uuid::Uuid,
                session_id: uuid::Uuid,
                user_id: Option<uuid::Uuid>,
                reason: &str,
                ctx: &$crate::domain::EventContext,
            ) -> $crate::store::StoreResult<Option<$crate::domain::auth::Session>> {
                let now = $crate::domain::now();
                let mut tx = self.writer.begin().await?;
                let lock = Self::lock_tenant(&mut tx, tenant_id).await?;
                let done = sqlx::query(
                    "UPDATE auth_sessions SET revoked_at = $3, revoked_reason = $4 \
                     WHERE id = $1 AND tenant_id = $2 AND revoked_at IS NULL AND expires_at > $3 \
                     AND ($5 IS NULL OR user_id = $5)",
                )
                .bind(session_id)
                .bind(tenant_id)
                .bind(now)
                .bind(reason)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 0 {
                    return Ok(None); // the rollback returns the event number
                }
                let session = Self::session_row(&mut tx, session_id).await?;
                let event = $crate::domain::DomainEvent::auth_session_revoked(&session, reason, ctx);
                Self::insert_event(&mut tx, lock.event_seq, &event).await?;
                tx.commit().await?;
                Ok(Some(session))
            }

            async fn sessions_of(
                &self,
                tenant_id: uuid::Uuid,
                user_id: uuid::Uuid,
            ) -> $crate::store::StoreResult<Vec<$crate::domain::auth::Session>> {
                Ok(sqlx::query_as::<_, $crate::domain::auth::Session>(
                    "SELECT id, tenant_id, user_id, created_at, last_used_at, expires_at, user_agent, ip \
                     FROM auth_sessions WHERE tenant_id = $1 AND user_id = $2 AND revoked_at IS NULL \
                     AND expires_at > $3 ORDER BY created_at DESC LIMIT 1000",
                )
                .bind(tenant_id)
                .bind(user_id)
                .bind($crate::domain::now())
                .fetch_all(&self.pool)
                .await?)
            }

            async fn session_active(
                &self,
                tenant_id: uuid::Uuid,
                session_id: uuid::Uuid,
            ) -> $crate::store::StoreResult<bool> {
                let row: Option<(uuid::Uuid,)> = sqlx::query_as(
                    "SELECT id FROM auth_sessions WHERE id = $1 AND tenant_id = $2 AND revoked_at IS NULL \
                     AND expires_at > $3",
                )
                .bind(session_id)
                .bind(tenant_id)
                .bind($crate::domain::now())
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.is_some())
            }

            async fn append_event(&self, event: &$crate::domain::DomainEvent) -> $crate::store::StoreResult<()> {
                let mut tx = self.writer.begin().await?;
                let lock = Self::lock_tenant(&mut tx, event.tenantid).await?;
                Self::insert_event(&mut tx, lock.event_seq, event).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn purge_auth(&self, before: chrono::DateTime<chrono::Utc>) -> $crate::store::StoreResult<u64> {
                let mut tx = self.writer.begin().await?;
                // Refresh tokens first (SQLite enforces the cascade only with its pragma on).
                let tokens = sqlx::query(
                    "DELETE FROM refresh_tokens WHERE session_id IN (SELECT id FROM auth_sessions \
                     WHERE expires_at < $1 OR revoked_at < $1)",
                )
                .bind(before)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let sessions = sqlx::query("DELETE FROM auth_sessions WHERE expires_at < $1 OR revoked_at < $1")
                    .bind(before)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                let codes = sqlx::query("DELETE FROM auth_codes WHERE expires_at < $1")
                    .bind(before)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                Ok(tokens + sessions + codes)
            }

            async fn signing_keys(&self) -> $crate::store::StoreResult<Vec<$crate::store::StoredKey>> {
                Ok(sqlx::query_as::<_, $crate::store::StoredKey>(
                    "SELECT kid, private_key, public_key, created_at, retired_at FROM signing_keys \
                     ORDER BY created_at DESC, kid DESC",
                )
                .fetch_all(&self.pool)
                .await?)
            }

            async fn add_signing_key(
                &self,
                key: &$crate::store::StoredKey,
                retire_others: bool,
            ) -> $crate::store::StoreResult<()> {
                let mut tx = self.writer.begin().await?;
                if retire_others {
                    sqlx::query("UPDATE signing_keys SET retired_at = $1 WHERE retired_at IS NULL")
                        .bind(key.created_at)
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query(
                    "INSERT INTO signing_keys (kid, private_key, public_key, created_at, retired_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&key.kid)
                .bind(&key.private_key)
                .bind(&key.public_key)
                .bind(key.created_at)
                .bind(key.retired_at)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn tenant_backlog(&self, tenant_id: uuid::Uuid) -> $crate::store::StoreResult<Option<i64>> {
                let row: Option<(i64,)> = sqlx::query_as(
                    "SELECT t.event_seq - COALESCE((SELECT CAST(SUM(s.count) AS BIGINT) FROM event_stats s \
                     WHERE s.tenant_id = t.id AND s.grain = 3), 0) \
                     - (SELECT COUNT(*) FROM dropped_events d WHERE d.tenant_id = t.id \
                        AND NOT EXISTS (SELECT 1 FROM audit_log a WHERE a.event_id = d.event_id)) \
                     FROM tenants t WHERE t.id = $1",
                )
                .bind(tenant_id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(|(n,)| n))
            }

            async fn record_dropped_event(
                &self,
                tenant_id: uuid::Uuid,
                event_id: uuid::Uuid,
            ) -> $crate::store::StoreResult<()> {
                sqlx::query(
                    "INSERT INTO dropped_events (event_id, tenant_id, dropped_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (event_id) DO NOTHING",
                )
                .bind(event_id)
                .bind(tenant_id)
                .bind($crate::domain::now())
                .execute(&self.writer)
                .await?;
                Ok(())
            }

            async fn event_stats(
                &self,
                tenant_id: uuid::Uuid,
                grain: $crate::domain::analytics::Grain,
                from: chrono::DateTime<chrono::Utc>,
                to: chrono::DateTime<chrono::Utc>,
                event_type: Option<&str>,
            ) -> $crate::store::StoreResult<Vec<$crate::domain::analytics::StatRow>> {
                Ok(sqlx::query_as::<_, $crate::domain::analytics::StatRow>(
                    "SELECT bucket_start, event_type, latency_bucket, count FROM event_stats \
                     WHERE tenant_id = $1 AND grain = $2 AND bucket_start >= $3 AND bucket_start < $4 \
                     AND ($5 IS NULL OR event_type = $5) ORDER BY bucket_start, event_type",
                )
                .bind(tenant_id)
                .bind(grain.code())
                .bind(grain.start(from))
                .bind(to)
                .bind(event_type)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn put_event_type(
                &self,
                def: &$crate::domain::custom_event::EventTypeDef,
            ) -> $crate::store::StoreResult<$crate::domain::custom_event::EventTypeDef> {
                let row = sqlx::query_as::<_, $crate::store::sql::EventTypeRow>(
                    "INSERT INTO event_types (tenant_id, name, description, schema, version, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, 1, $5, $5) ON CONFLICT (tenant_id, name) DO UPDATE SET \
                     description = excluded.description, schema = excluded.schema, \
                     version = event_types.version + 1, updated_at = excluded.updated_at RETURNING *",
                )
                .bind(def.tenant_id)
                .bind(&def.name)
                .bind(&def.description)
                .bind(def.schema.to_string())
                .bind(def.updated_at)
                .fetch_one(&self.writer)
                .await;
                match row {
                    Ok(r) => Ok(r.into()),
                    Err(sqlx::Error::Database(db)) if db.is_foreign_key_violation() => {
                        Err($crate::store::StoreError::NotFound("tenant"))
                    }
                    Err(e) => Err(e.into()),
                }
            }

            async fn get_event_type(
                &self,
                tenant_id: uuid::Uuid,
                name: &str,
            ) -> $crate::store::StoreResult<Option<$crate::domain::custom_event::EventTypeDef>> {
                let row = sqlx::query_as::<_, $crate::store::sql::EventTypeRow>(
                    "SELECT * FROM event_types WHERE tenant_id = $1 AND name = $2",
                )
                .bind(tenant_id)
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(Into::into))
            }

            async fn list_event_types(
                &self,
                tenant_id: uuid::Uuid,
            ) -> $crate::store::StoreResult<Vec<$crate::domain::custom_event::EventTypeDef>> {
                let rows = sqlx::query_as::<_, $crate::store::sql::EventTypeRow>(
                    "SELECT * FROM event_types WHERE tenant_id = $1 ORDER BY name LIMIT 1000",
                )
                .bind(tenant_id)
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(Into::into).collect())
            }

            async fn delete_event_type(&self, tenant_id: uuid::Uuid, name: &str) -> $crate::store::StoreResult<()> {
                let done = sqlx::query("DELETE FROM event_types WHERE tenant_id = $1 AND name = $2")
                    .bind(tenant_id)
                    .bind(name)
                    .execute(&self.writer)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err($crate::store::StoreError::NotFound("event type"));
                }
                Ok(())
            }

            async fn event_type_versions(
                &self,
                tenant_id: uuid::Uuid,
                names: &[String],
            ) -> $crate::store::StoreResult<Vec<(String, i64)>> {
                if names.is_empty() {
                    return Ok(Vec::new());
                }
                let mut q = sqlx::QueryBuilder::<$db>::new("SELECT name, version FROM event_types WHERE tenant_id = ");
                q.push_bind(tenant_id).push(" AND name IN (");
                let mut list = q.separated(", ");
                for n in names {
                    list.push_bind(n.clone());
                }
                q.push(")");
                Ok(q.build_query_as().fetch_all(&self.pool).await?)
            }

            async fn ingest_events(
                &self,
                tenant_id: uuid::Uuid,
                events: &[$crate::domain::custom_event::NewCustomEvent],
            ) -> $crate::store::StoreResult<Vec<$crate::domain::custom_event::Ingested>> {
                use $crate::domain::custom_event::Ingested;
                let mut tx = self.writer.begin().await?;
                // The tenant row first: it serializes the tenant's writers (every process).
                let seq: Option<(i64,)> =
                    sqlx::query_as("UPDATE tenants SET event_seq = event_seq WHERE id = $1 RETURNING event_seq")
                        .bind(tenant_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                if seq.is_none() {
                    return Err($crate::store::StoreError::NotFound("tenant"));
                }
                // Clients' ids: the first sending of each is new; a later one (earlier, or
                // earlier in this batch) answers with the original event's id.
                let now = $crate::domain::now();
                let mut firsts: std::collections::HashMap<&str, uuid::Uuid> = std::collections::HashMap::new();
                let keyed: Vec<(&str, uuid::Uuid)> = events
                    .iter()
                    .filter_map(|e| Some((e.key.as_deref()?, e.event.id)))
                    .filter(|(k, id)| match firsts.entry(k) {
                        std::collections::hash_map::Entry::Occupied(_) => false,
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(*id);
                            true
                        }
                    })
                    .collect();
                let mut originals: std::collections::HashMap<String, uuid::Uuid> = std::collections::HashMap::new();
                for chunk in keyed.chunks(500) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO event_keys (tenant_id, key, event_id, created_at) ",
                    );
                    q.push_values(chunk, |mut row, (k, id)| {
                        row.push_bind(tenant_id).push_bind(k.to_string()).push_bind(*id).push_bind(now);
                    });
                    q.push(" ON CONFLICT (tenant_id, key) DO NOTHING RETURNING key");
                    let inserted: std::collections::HashSet<String> =
                        q.build_query_as::<(String,)>().fetch_all(&mut *tx).await?.into_iter().map(|(k,)| k).collect();
                    let seen: Vec<&str> = chunk.iter().map(|(k, _)| *k).filter(|k| !inserted.contains(*k)).collect();
                    if !seen.is_empty() {
                        let mut q = sqlx::QueryBuilder::<$db>::new("SELECT key, event_id FROM event_keys WHERE tenant_id = ");
                        q.push_bind(tenant_id).push(" AND key IN (");
                        let mut list = q.separated(", ");
                        for k in &seen {
                            list.push_bind(k.to_string());
                        }
                        q.push(")");
                        originals.extend(q.build_query_as::<(String, uuid::Uuid)>().fetch_all(&mut *tx).await?);
                    }
                }
                let outcomes: Vec<Ingested> = events
                    .iter()
                    .map(|e| match e.key.as_deref() {
                        Some(k) if originals.contains_key(k) => Ingested { id: originals[k], new: false },
                        Some(k) if firsts.get(k) != Some(&e.event.id) => Ingested { id: firsts[k], new: false },
                        _ => Ingested { id: e.event.id, new: true },
                    })
                    .collect();
                let new: Vec<&$crate::domain::DomainEvent> =
                    events.iter().zip(&outcomes).filter(|(_, o)| o.new).map(|(e, _)| &e.event).collect();
                if !new.is_empty() {
                    let n = i64::try_from(new.len()).unwrap_or(i64::MAX);
                    let (last,): (i64,) =
                        sqlx::query_as("UPDATE tenants SET event_seq = event_seq + $2 WHERE id = $1 RETURNING event_seq")
                            .bind(tenant_id)
                            .bind(n)
                            .fetch_one(&mut *tx)
                            .await?;
                    let first = last - n + 1;
                    let numbered: Vec<(i64, &$crate::domain::DomainEvent)> =
                        new.into_iter().enumerate().map(|(i, e)| (first + i as i64, e)).collect();
                    for chunk in numbered.chunks(500) {
                        let mut q = sqlx::QueryBuilder::<$db>::new(
                            "INSERT INTO outbox (event_id, tenant_id, tenant_seq, event_type, payload, created_at) ",
                        );
                        q.push_values(chunk, |mut row, (seq, e)| {
                            row.push_bind(e.id)
                                .push_bind(e.tenantid)
                                .push_bind(*seq)
                                .push_bind(e.event_type.as_str().to_owned())
                                .push_bind(sqlx::types::Json(*e))
                                .push_bind(now);
                        });
                        q.build().execute(&mut *tx).await?;
                    }
                }
                tx.commit().await?;
                Ok(outcomes)
            }

            async fn get_audit(&self, event_id: uuid::Uuid) -> $crate::store::StoreResult<Option<$crate::domain::AuditEntry>> {
                let row = sqlx::query_as::<_, $crate::store::sql::AuditRow>(
                    "SELECT event_id, tenant_id, event_type, subject, actor, correlation_id, at, before, after \
                     FROM audit_log WHERE event_id = $1",
                )
                .bind(event_id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(Into::into))
            }

            async fn tenant_activity(
                &self,
                since: chrono::DateTime<chrono::Utc>,
                limit: u32,
            ) -> $crate::store::StoreResult<Vec<$crate::store::TenantActivity>> {
                Ok(sqlx::query_as::<_, $crate::store::TenantActivity>(
                    "SELECT t.id AS tenant_id, t.slug, t.name, t.user_count, a.events \
                     FROM (SELECT tenant_id, COUNT(*) AS events FROM outbox WHERE event_id >= $1 \
                           GROUP BY tenant_id ORDER BY events DESC, tenant_id LIMIT $2) AS a \
                     JOIN tenants t ON t.id = a.tenant_id ORDER BY a.events DESC, t.id",
                )
                .bind($crate::store::first_uuid_v7_at(since))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?)
            }

            async fn create_webhook(
                &self,
                new: &$crate::domain::webhook::NewEndpoint,
            ) -> $crate::store::StoreResult<$crate::domain::webhook::WebhookEndpoint> {
                let e = &new.endpoint;
                let done = sqlx::query(
                    "INSERT INTO webhook_endpoints (id, tenant_id, url, description, event_types, status, secret, created_at, updated_at) \
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 WHERE EXISTS (SELECT 1 FROM tenants WHERE id = $2)",
                )
                .bind(e.id)
                .bind(e.tenant_id)
                .bind(&e.url)
                .bind(&e.description)
                .bind(serde_json::to_string(&e.event_types).unwrap_or_else(|_| "[]".into()))
                .bind(e.status.as_str())
                .bind(&new.secret)
                .bind(e.created_at)
                .bind(e.updated_at)
                .execute(&self.writer)
                .await?;
                if done.rows_affected() == 0 {
                    return Err($crate::store::StoreError::NotFound("tenant"));
                }
                Ok(e.clone())
            }

            async fn list_webhooks(
                &self,
                tenant_id: uuid::Uuid,
                page: $crate::domain::PageRequest,
            ) -> $crate::store::StoreResult<$crate::domain::Page<$crate::domain::webhook::WebhookEndpoint>> {
                let rows = sqlx::query_as::<_, $crate::store::sql::WebhookRow>(
                    "SELECT * FROM webhook_endpoints WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                )
                .bind(tenant_id)
                .bind(page.after.map(|c| c.0).unwrap_or(uuid::Uuid::nil()))
                .bind(i64::from(page.limit) + 1)
                .fetch_all(&self.pool)
                .await?;
                let items = rows.iter().map(|r| r.endpoint()).collect();
                Ok($crate::domain::Page::from_rows(items, page.limit, |e: &$crate::domain::webhook::WebhookEndpoint| e.id))
            }

            async fn get_webhook(
                &self,
                tenant_id: uuid::Uuid,
                id: uuid::Uuid,
            ) -> $crate::store::StoreResult<$crate::domain::webhook::WebhookEndpoint> {
                sqlx::query_as::<_, $crate::store::sql::WebhookRow>(
                    "SELECT * FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2",
                )
                .bind(tenant_id)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .map(|r| r.endpoint())
                .ok_or($crate::store::StoreError::NotFound("webhook"))
            }

            async fn update_webhook(
                &self,
                e: &$crate::domain::webhook::WebhookEndpoint,
            ) -> $crate::store::StoreResult<$crate::domain::webhook::WebhookEndpoint> {
                let done = sqlx::query(
                    "UPDATE webhook_endpoints SET url = $3, description = $4, event_types = $5, status = $6, \
                     disabled_reason = $7, updated_at = $8 WHERE tenant_id = $1 AND id = $2",
                )
                .bind(e.tenant_id)
                .bind(e.id)
                .bind(&e.url)
                .bind(&e.description)
                .bind(serde_json::to_string(&e.event_types).unwrap_or_else(|_| "[]".into()))
                .bind(e.status.as_str())
                .bind(&e.disabled_reason)
                .bind(e.updated_at)
                .execute(&self.writer)
                .await?;
                if done.rows_affected() == 0 {
                    return Err($crate::store::StoreError::NotFound("webhook"));
                }
                Ok(e.clone())
            }

            async fn delete_webhook(&self, tenant_id: uuid::Uuid, id: uuid::Uuid) -> $crate::store::StoreResult<()> {
                let done = sqlx::query("DELETE FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2")
                    .bind(tenant_id)
                    .bind(id)
                    .execute(&self.writer)
                    .await?;
                if done.rows_affected() == 0 {
                    return Err($crate::store::StoreError::NotFound("webhook"));
                }
                Ok(())
            }

            async fn rotate_webhook_secret(
                &self,
                tenant_id: uuid::Uuid,
                id: uuid::Uuid,
                secret: &str,
                previous_until: chrono::DateTime<chrono::Utc>,
            ) -> $crate::store::StoreResult<()> {
                let done = sqlx::query(
                    "UPDATE webhook_endpoints SET previous_secret = secret, previous_secret_until = $3, secret = $4, \
                     updated_at = $5 WHERE tenant_id = $1 AND id = $2",
                )
                .bind(tenant_id)
                .bind(id)
                .bind(previous_until)
                .bind(secret)
                .bind(crate::domain::now())
                .execute(&self.writer)
                .await?;
                if done.rows_affected() == 0 {
                    return Err($crate::store::StoreError::NotFound("webhook"));
                }
                Ok(())
            }

            async fn webhook_targets(
                &self,
                tenant_ids: &[uuid::Uuid],
            ) -> $crate::store::StoreResult<Vec<$crate::domain::webhook::WebhookEndpoint>> {
                if tenant_ids.is_empty() {
                    return Ok(Vec::new());
                }
                let mut q = sqlx::QueryBuilder::new(
                    "SELECT * FROM webhook_endpoints WHERE status = 'enabled' AND tenant_id IN (",
                );
                let mut list = q.separated(", ");
                for id in tenant_ids {
                    list.push_bind(*id);
                }
                q.push(")");
                let rows = q.build_query_as::<$crate::store::sql::WebhookRow>().fetch_all(&self.pool).await?;
                Ok(rows.iter().map(|r| r.endpoint()).collect())
            }

            async fn webhooks_for_delivery(
                &self,
                ids: &[uuid::Uuid],
            ) -> $crate::store::StoreResult<Vec<($crate::domain::webhook::WebhookEndpoint, $crate::domain::webhook::Secrets)>> {
                let now = chrono::Utc::now();
                let mut found = Vec::new();
                for chunk in ids.chunks(500) {
                    let mut q = sqlx::QueryBuilder::<$db>::new("SELECT * FROM webhook_endpoints WHERE id IN (");
                    let mut list = q.separated(", ");
                    for id in chunk {
                        list.push_bind(*id);
                    }
                    q.push(")");
                    let rows = q.build_query_as::<$crate::store::sql::WebhookRow>().fetch_all(&self.pool).await?;
                    found.extend(rows.iter().map(|r| (r.endpoint(), r.secrets(now))));
                }
                Ok(found)
            }

            async fn record_deliveries(
                &self,
                attempts: &[$crate::domain::webhook::DeliveryAttempt],
            ) -> $crate::store::StoreResult<Vec<bool>> {
                // One statement for the lot; the ids it returns are the rows written.
                async fn insert(
                    writer: &sqlx::Pool<$db>,
                    rows: &[$crate::domain::webhook::DeliveryAttempt],
                ) -> Result<std::collections::HashSet<uuid::Uuid>, sqlx::Error> {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO webhook_deliveries (id, endpoint_id, event_id, event_type, attempt, status, \
                         response_status, duration_ms, error, at) ",
                    );
                    q.push_values(rows, |mut row, d| {
                        row.push_bind(d.id)
                            .push_bind(d.endpoint_id)
                            .push_bind(d.event_id)
                            .push_bind(d.event_type.clone())
                            .push_bind(d.attempt)
                            .push_bind(d.status.clone())
                            .push_bind(d.response_status)
                            .push_bind(d.duration_ms)
                            .push_bind(d.error.clone())
                            .push_bind(d.at);
                    });
                    q.push(" ON CONFLICT DO NOTHING RETURNING id");
                    let ids: Vec<(uuid::Uuid,)> = q.build_query_as().fetch_all(writer).await?;
                    Ok(ids.into_iter().map(|(id,)| id).collect())
                }
                let mut written = std::collections::HashSet::new();
                for chunk in attempts.chunks(500) {
                    match insert(&self.writer, chunk).await {
                        Ok(ids) => written.extend(ids),
                        // An endpoint was deleted meanwhile: its rows have nothing to be
                        // logged against; the others are written one by one.
                        Err(sqlx::Error::Database(db)) if db.is_foreign_key_violation() => {
                            for d in chunk {
                                match insert(&self.writer, std::slice::from_ref(d)).await {
                                    Ok(ids) => written.extend(ids),
                                    Err(sqlx::Error::Database(db)) if db.is_foreign_key_violation() => {}
                                    Err(e) => return Err(e.into()),
                                }
                            }
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(attempts.iter().map(|d| written.contains(&d.id)).collect())
            }

            async fn delivered(
                &self,
                pairs: &[(uuid::Uuid, uuid::Uuid)],
            ) -> $crate::store::StoreResult<std::collections::HashSet<(uuid::Uuid, uuid::Uuid)>> {
                let mut found = std::collections::HashSet::new();
                for chunk in pairs.chunks(500) {
                    // Both columns of the one-success index, then the exact pairs.
                    let endpoints: std::collections::BTreeSet<uuid::Uuid> = chunk.iter().map(|p| p.0).collect();
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "SELECT endpoint_id, event_id FROM webhook_deliveries WHERE status = 'succeeded' AND endpoint_id IN (",
                    );
                    let mut list = q.separated(", ");
                    for id in &endpoints {
                        list.push_bind(*id);
                    }
                    q.push(") AND event_id IN (");
                    let mut list = q.separated(", ");
                    for (_, event) in chunk {
                        list.push_bind(*event);
                    }
                    q.push(")");
                    let rows: Vec<(uuid::Uuid, uuid::Uuid)> = q.build_query_as().fetch_all(&self.pool).await?;
                    found.extend(rows.into_iter().filter(|p| chunk.contains(p)));
                }
                Ok(found)
            }

            async fn list_deliveries(
                &self,
                endpoint_id: uuid::Uuid,
                status: Option<&str>,
                page: $crate::domain::PageRequest,
            ) -> $crate::store::StoreResult<$crate::domain::Page<$crate::domain::webhook::DeliveryAttempt>> {
                let after = page.after.map(|c| c.0).unwrap_or(uuid::Uuid::nil());
                let rows = if status == Some("pending") {
                    // The latest attempt of each event that failed, with another due: the
                    // endpoint is enabled, no success is logged (a success is the latest
                    // attempt), and attempts are left.
                    sqlx::query_as::<_, $crate::domain::webhook::DeliveryAttempt>(
                        "SELECT f.id, f.endpoint_id, f.event_id, f.event_type, f.attempt, 'pending' AS status, \
                         f.response_status, f.duration_ms, f.error, f.at FROM webhook_deliveries f \
                         JOIN webhook_endpoints e ON e.id = f.endpoint_id AND e.status = 'enabled' \
                         WHERE f.endpoint_id = $1 AND f.id > $2 AND f.status = 'failed' AND f.attempt < $3 \
                         AND NOT EXISTS (SELECT 1 FROM webhook_deliveries l WHERE l.endpoint_id = f.endpoint_id \
                         AND l.event_id = f.event_id AND l.id > f.id) ORDER BY f.id LIMIT $4",
                    )
                    .bind(endpoint_id)
                    .bind(after)
                    .bind(i32::try_from($crate::webhooks::delivery::MAX_ATTEMPTS).unwrap_or(i32::MAX))
                    .bind(i64::from(page.limit) + 1)
                    .fetch_all(&self.pool)
                    .await?
                } else {
                    sqlx::query_as::<_, $crate::domain::webhook::DeliveryAttempt>(
                        "SELECT * FROM webhook_deliveries WHERE endpoint_id = $1 AND id > $2 AND ($3 IS NULL OR status = $3) \
                         ORDER BY id LIMIT $4",
                    )
                    .bind(endpoint_id)
                    .bind(after)
                    .bind(status)
                    .bind(i64::from(page.limit) + 1)
                    .fetch_all(&self.pool)
                    .await?
                };
                Ok($crate::domain::Page::from_rows(rows, page.limit, |d| d.id))
            }

            async fn undelivered_since(
                &self,
                endpoint_id: uuid::Uuid,
                since: chrono::DateTime<chrono::Utc>,
                limit: u32,
            ) -> $crate::store::StoreResult<Vec<uuid::Uuid>> {
                let rows: Vec<(uuid::Uuid,)> = sqlx::query_as(
                    "SELECT DISTINCT f.event_id FROM webhook_deliveries f WHERE f.endpoint_id = $1 AND f.status = 'failed' \
                     AND f.at >= $2 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries s WHERE s.endpoint_id = f.endpoint_id \
                     AND s.event_id = f.event_id AND s.status = 'succeeded') ORDER BY f.event_id LIMIT $3",
                )
                .bind(endpoint_id)
                .bind(since)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map(|(id,)| id).collect())
            }

            async fn failing_since(
                &self,
                endpoint_id: uuid::Uuid,
            ) -> $crate::store::StoreResult<Option<chrono::DateTime<chrono::Utc>>> {
                let row: Option<(chrono::DateTime<chrono::Utc>,)> = sqlx::query_as(
                    "SELECT at FROM webhook_deliveries WHERE endpoint_id = $1 AND status = 'failed' AND id > COALESCE( \
                     (SELECT id FROM webhook_deliveries WHERE endpoint_id = $1 AND status = 'succeeded' ORDER BY id DESC LIMIT 1), $2) \
                     ORDER BY id LIMIT 1",
                )
                .bind(endpoint_id)
                .bind(uuid::Uuid::nil())
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.map(|(at,)| at))
            }

            async fn prune_deliveries(&self, before: chrono::DateTime<chrono::Utc>, limit: u32) -> $crate::store::StoreResult<u64> {
                let done = sqlx::query(
                    "DELETE FROM webhook_deliveries WHERE id IN \
                     (SELECT id FROM webhook_deliveries WHERE id < $1 ORDER BY id LIMIT $2)",
                )
                .bind($crate::store::first_uuid_v7_at(before))
                .bind(i64::from(limit))
                .execute(&self.writer)
                .await?;
                Ok(done.rows_affected())
            }

            async fn webhook_health(
                &self,
                since: chrono::DateTime<chrono::Utc>,
                limit: u32,
            ) -> $crate::store::StoreResult<Vec<$crate::store::EndpointHealth>> {
                Ok(sqlx::query_as::<_, $crate::store::EndpointHealth>(
                    "SELECT e.id AS endpoint_id, e.tenant_id, t.slug, e.url, e.status, a.attempts, a.failed \
                     FROM (SELECT endpoint_id, COUNT(*) AS attempts, \
                           COUNT(CASE WHEN status = 'failed' THEN 1 END) AS failed \
                           FROM webhook_deliveries WHERE id >= $1 GROUP BY endpoint_id \
                           ORDER BY failed DESC, attempts DESC LIMIT $2) AS a \
                     JOIN webhook_endpoints e ON e.id = a.endpoint_id JOIN tenants t ON t.id = e.tenant_id \
                     ORDER BY a.failed DESC, a.attempts DESC, e.id",
                )
                .bind($crate::store::first_uuid_v7_at(since))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?)
            }

            async fn outbox_event(&self, event_id: uuid::Uuid) -> $crate::store::StoreResult<Option<$crate::domain::DomainEvent>> {
                let row: Option<(sqlx::types::Json<$crate::domain::DomainEvent>,)> =
                    sqlx::query_as("SELECT payload FROM outbox WHERE event_id = $1")
                        .bind(event_id)
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(row.map(|(p,)| p.0))
            }

            async fn disable_webhook(
                &self,
                id: uuid::Uuid,
                reason: &str,
                ctx: &$crate::domain::EventContext,
            ) -> $crate::store::StoreResult<bool> {
                let Some(row) = sqlx::query_as::<_, $crate::store::sql::WebhookRow>("SELECT * FROM webhook_endpoints WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?
                else {
                    return Ok(false);
                };
                let mut tx = self.writer.begin().await?;
                let lock = Self::lock_tenant(&mut tx, row.tenant_id).await?;
                let now = crate::domain::now();
                let done = sqlx::query(
                    "UPDATE webhook_endpoints SET status = 'disabled', disabled_reason = $2, updated_at = $3 \
                     WHERE id = $1 AND status = 'enabled'",
                )
                .bind(id)
                .bind(reason)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() == 0 {
                    return Ok(false); // already disabled (or gone): the rollback returns the event number
                }
                let mut endpoint = row.endpoint();
                endpoint.status = $crate::domain::webhook::EndpointStatus::Disabled;
                endpoint.disabled_reason = Some(reason.to_owned());
                endpoint.updated_at = now;
                let event = $crate::domain::DomainEvent::webhook_disabled(&endpoint, ctx);
                Self::insert_event(&mut tx, lock.event_seq, &event).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn count_audit(&self, tenant_id: uuid::Uuid) -> $crate::store::StoreResult<u64> {
                let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM audit_log WHERE tenant_id = $1")
                    .bind(tenant_id)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(u64::try_from(n).unwrap_or(0))
            }

            async fn list_audit(
                &self,
                tenant_id: uuid::Uuid,
                filter: &$crate::store::AuditFilter,
                page: $crate::domain::PageRequest,
            ) -> $crate::store::StoreResult<$crate::domain::Page<$crate::domain::AuditEntry>> {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "SELECT event_id, tenant_id, event_type, subject, actor, correlation_id, at, before, after \
                     FROM audit_log WHERE tenant_id = ",
                );
                q.push_bind(tenant_id);
                q.push(" AND event_id > ");
                q.push_bind(page.after.map(|c| c.0).unwrap_or(uuid::Uuid::nil()));
                if let Some(t) = &filter.event_type {
                    q.push(" AND event_type = ");
                    q.push_bind(t.clone());
                }
                if let Some(from) = filter.from {
                    q.push(" AND at >= ");
                    q.push_bind(from);
                }
                if let Some(to) = filter.to {
                    q.push(" AND at < ");
                    q.push_bind(to);
                }
                if let Some(text) = filter.text.as_deref().filter(|t| !t.is_empty()) {
                    let escaped: String = text
                        .to_lowercase()
                        .chars()
                        .flat_map(|c| if matches!(c, '%' | '_' | '\\') { vec!['\\', c] } else { vec![c] })
                        .collect();
                    q.push(
                        " AND LOWER(subject || ' ' || CAST(actor AS TEXT) || ' ' || COALESCE(CAST(before AS TEXT), '') \
                         || ' ' || COALESCE(CAST(after AS TEXT), '')) LIKE ",
                    );
                    q.push_bind(format!("%{escaped}%"));
                    q.push(" ESCAPE '\\'");
                }
                q.push(" ORDER BY event_id LIMIT ");
                q.push_bind(i64::from(page.limit) + 1);
                let rows: Vec<$crate::store::sql::AuditRow> = q.build_query_as().fetch_all(&self.pool).await?;
                let entries: Vec<$crate::domain::AuditEntry> = rows.into_iter().map(Into::into).collect();
                Ok($crate::domain::Page::from_rows(entries, page.limit, |e| e.event_id))
            }

            async fn email_sent(&self, key: &str) -> $crate::store::StoreResult<bool> {
                let row: Option<(String,)> = sqlx::query_as("SELECT key FROM email_log WHERE key = $1")
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.is_some())
            }

            async fn record_emails(&self, emails: &[$crate::store::SentEmail]) -> $crate::store::StoreResult<u64> {
                let mut new = 0;
                let mut tx = self.writer.begin().await?;
                for chunk in emails.chunks(500) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO email_log (key, tenant_id, recipient, message_id, sent_at) ",
                    );
                    q.push_values(chunk, |mut row, m| {
                        row.push_bind(m.key.clone())
                            .push_bind(m.tenant_id)
                            .push_bind(m.recipient.clone())
                            .push_bind(m.message_id.clone())
                            .push_bind(m.sent_at);
                    });
                    q.push(" ON CONFLICT (key) DO NOTHING");
                    new += q.build().execute(&mut *tx).await?.rows_affected();
                    // Recorded: their claims have done their job.
                    let keys: Vec<String> = chunk.iter().map(|m| m.key.clone()).collect();
                    $crate::store::sql::delete_claims::<$db>(&keys, None).build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(new)
            }

            async fn claim_emails(
                &self,
                keys: &[String],
                holder: &str,
                ttl: std::time::Duration,
            ) -> $crate::store::StoreResult<std::collections::HashSet<String>> {
                let mut keys = keys.to_vec();
                keys.sort_unstable();
                keys.dedup();
                let mut claimed = std::collections::HashSet::new();
                for chunk in keys.chunks(500) {
                    let names = self.emails_claim_try(chunk, holder, ttl).await?;
                    claimed.extend(names.iter().filter_map(|n| $crate::store::claimed_email(n)).map(str::to_owned));
                }
                Ok(claimed)
            }

            async fn release_emails(&self, keys: &[String], holder: &str) -> $crate::store::StoreResult<()> {
                for chunk in keys.chunks(500) {
                    $crate::store::sql::delete_claims::<$db>(chunk, Some(holder)).build().execute(&self.writer).await?;
                }
                Ok(())
            }

            async fn emails_sent(&self, keys: &[String]) -> $crate::store::StoreResult<std::collections::HashSet<String>> {
                let mut sent = std::collections::HashSet::new();
                for chunk in keys.chunks(500) {
                    let mut q = sqlx::QueryBuilder::<$db>::new("SELECT key FROM email_log WHERE key IN (");
                    let mut list = q.separated(", ");
                    for k in chunk {
                        list.push_bind(k.clone());
                    }
                    q.push(")");
                    let rows: Vec<(String,)> = q.build_query_as().fetch_all(&self.pool).await?;
                    sent.extend(rows.into_iter().map(|r| r.0));
                }
                Ok(sent)
            }

            async fn record_email(&self, m: &$crate::store::SentEmail) -> $crate::store::StoreResult<bool> {
                let done = sqlx::query(
                    "INSERT INTO email_log (key, tenant_id, recipient, message_id, sent_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key) DO NOTHING",
                )
                .bind(&m.key)
                .bind(m.tenant_id)
                .bind(&m.recipient)
                .bind(&m.message_id)
                .bind(m.sent_at)
                .execute(&self.writer)
                .await?;
                Ok(done.rows_affected() == 1)
            }
        }
    };
}

pub(super) use sql_store_impl;
