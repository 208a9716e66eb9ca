//! The database of record and its transactional outbox, behind one trait.
//!
//! Two implementations share every statement (`sql.rs`): PostgreSQL for scale-out and
//! SQLite as the embedded default. The locking protocol that keeps tenant limits, email
//! uniqueness and per-tenant event order correct across processes is described in
//! `sql.rs`; both backends follow it.

mod batch;
mod group_write;
mod pg_guess;
mod postgres;
mod predicted;
mod sql;
mod sqlite;
mod statement;
pub mod writes;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::domain::{
    ApiKey, AuditEntry, DomainEvent, EventContext, NewApiKey, NewTenant, NewUser, Page, PageRequest, Tenant,
    TenantPatch, User, UserPatch,
};

pub use group_write::GroupWrite;

use crate::domain::auth::Session;

/// What presenting a refresh token did.
#[derive(Debug, Clone, PartialEq)]
pub enum RefreshUse {
    /// It was current: spent, and its successor stored. The session and its user now.
    Rotated { session: Session, user: User },
    /// It was spent already: its session is revoked (the whole family).
    Reused(Session),
    /// Unknown, of another tenant, or its session is revoked or expired.
    Invalid,
}

/// What redeeming a one-time code did.
#[derive(Debug, Clone, PartialEq)]
pub enum CodeOutcome {
    /// Right: the change is made; the user as it is now.
    Redeemed(User),
    /// Wrong; this many tries are left (0: the code is gone).
    Wrong { tries_left: i32 },
    /// No live code (never sent, expired, used, or out of tries).
    NoCode,
}

/// An access-token signing key as stored (Ed25519, PKCS#8). `Debug` leaves out the
/// private key.
#[derive(Clone, PartialEq, sqlx::FromRow)]
pub struct StoredKey {
    pub kid: String,
    pub private_key: Vec<u8>,
    pub public_key: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub retired_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .finish_non_exhaustive()
    }
}
pub use postgres::PgStore;
pub use sqlite::SqliteStore;
pub use writes::{TenantWrite, WriteOutcome};

/// What can go wrong in the store. Each variant that a client can cause is mapped to
/// a 4xx in `crate::error`; only `Database`/`Migrate` are server faults.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A unique constraint refused the write; the message says which value clashed.
    #[error("{0}")]
    Conflict(String),
    #[error("tenant has reached its limit of {max_users} users")]
    TenantFull { max_users: i64 },
    #[error("version {expected} is stale; the current version is {current}")]
    StaleVersion { expected: i64, current: i64 },
    #[error("Idempotency-Key was already used with a different request body")]
    IdempotencyMismatch,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The database could not be reached, or is shutting down or out of resources
    /// (a shared copy of such an error, for every write of a failed batch).
    #[error("{0}")]
    Unavailable(String),
}

impl StoreError {
    /// Whether this means "down or overloaded, try again" rather than a fault.
    pub fn is_unreachable(&self) -> bool {
        match self {
            StoreError::Database(e) => unreachable(e),
            StoreError::Unavailable(_) => true,
            _ => false,
        }
    }
}

/// Whether a database error means "down or overloaded, try again" rather than a fault:
/// no connection to be had, a connection lost mid-way, or the server shutting down or
/// out of resources (SQLSTATE classes 08, 53, 57).
fn unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("53") || c.starts_with("57"))
        }
        _ => false,
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// An `Idempotency-Key` with the digest of the request it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRequest {
    pub key: String,
    pub request_hash: String,
}

/// How long a stored idempotent response is replayed.
pub const IDEMPOTENCY_TTL_HOURS: i64 = 24;

/// Result of an idempotent create.
#[derive(Debug, Clone, PartialEq)]
pub struct Created<T> {
    pub value: T,
    /// True when this is the stored answer to an earlier identical request.
    pub replayed: bool,
}

/// An unpublished outbox row as the relay sends it: the stored payload as it is, not
/// parsed and serialized again on its way to the bus.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct OutboxMessage {
    pub seq: i64,
    pub tenant_seq: i64,
    pub event_id: Uuid,
    pub event_type: String,
    /// The event's CloudEvents JSON.
    pub payload: String,
}

/// One outbox row as the relay (and tests) read it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRecord {
    /// Global insertion order.
    pub seq: i64,
    /// Gap-free order of events within one tenant: the order the relay must keep.
    pub tenant_seq: i64,
    pub tenant_id: Uuid,
    pub event: DomainEvent,
    pub created_at: DateTime<Utc>,
    pub published_at: Option<DateTime<Utc>>,
}

/// Persistence for tenants, keys and users; every mutating method writes exactly one
/// outbox event in the same transaction, or nothing at all.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `postgres` or `sqlite`, for health output and logs.
    fn backend(&self) -> &'static str;

    /// The SQLite pools, when the store is SQLite (the embedded job queue and bus share
    /// its file, and its one writer).
    fn sqlite_pools(&self) -> Option<SqlitePools>;

    /// Applies pending migrations.
    async fn migrate(&self) -> StoreResult<()>;

    /// Cheap round trip for readiness checks.
    async fn ping(&self) -> StoreResult<()>;

    /// Tells other processes' outbox relays that new rows were committed (PostgreSQL
    /// `NOTIFY eventra_outbox`, sent after the commit, never inside a writing
    /// transaction: see migration 0007). Nothing to do on SQLite (one host, woken
    /// in-process).
    async fn notify_outbox(&self) -> StoreResult<()>;

    /// Creates a tenant together with its first admin key (one `tenant.created` event).
    async fn create_tenant(&self, tenant: &NewTenant, admin_key: &NewApiKey, ctx: &EventContext)
        -> StoreResult<Tenant>;
    async fn get_tenant(&self, id: Uuid) -> StoreResult<Tenant>;
    async fn list_tenants(&self, page: PageRequest) -> StoreResult<Page<Tenant>>;
    /// Applies a patch; a patch that changes nothing writes nothing.
    async fn update_tenant(&self, id: Uuid, patch: &TenantPatch, ctx: &EventContext) -> StoreResult<Tenant>;
    /// Deletes the tenant with its users and keys (one `tenant.deleted` event).
    async fn delete_tenant(&self, id: Uuid, ctx: &EventContext) -> StoreResult<()>;

    /// Applies a tenant's writes in one transaction, in order, each with its own
    /// outcome (see [`writes`]): a write that fails (a duplicate email, a full tenant, a
    /// stale version) fails alone and the others commit. Answers one outcome per write.
    async fn write_batch(&self, tenant_id: Uuid, writes: &[TenantWrite]) -> Vec<StoreResult<WriteOutcome>> {
        self.write_batches(&[(tenant_id, writes)], &|| ()).await.pop().unwrap_or_default()
    }

    /// [`write_batch`](Store::write_batch) for several tenants at once, in ONE
    /// transaction (each tenant's writes in their order); outcomes per tenant, per write.
    /// `locked` is called once a later batch of these tenants, even in another
    /// transaction, is ordered after this one, so it may be sent at once (pipelining):
    /// once the transaction holds every tenant's row lock and has decided its writes
    /// (the later one waits for the lock), or, for a transaction sent on guessed rows,
    /// once it has committed (the later
    /// one's guess then rests on it: see `predicted.rs`).
    async fn write_batches(
        &self,
        batches: &[(Uuid, &[TenantWrite])],
        locked: &(dyn Fn() + Send + Sync),
    ) -> Vec<Vec<StoreResult<WriteOutcome>>>;

    /// Stores a new API key (one `api_key.created` event).
    async fn create_api_key(&self, key: &NewApiKey, ctx: &EventContext) -> StoreResult<ApiKey> {
        let write = TenantWrite::CreateApiKey { key: key.clone(), ctx: ctx.clone() };
        writes::single(self.write_batch(key.key.tenant_id, &[write]).await)?.into_api_key()
    }

    /// Looks a key up by the hash of its secret.
    async fn find_api_key(&self, hash: &str) -> StoreResult<Option<ApiKey>>;

    /// Creates a user, enforcing email uniqueness and `max_users` in the database.
    async fn create_user(
        &self,
        user: &NewUser,
        idempotency: Option<&IdempotencyRequest>,
        ctx: &EventContext,
    ) -> StoreResult<Created<User>> {
        let write = TenantWrite::CreateUser { user: user.clone(), idempotency: idempotency.cloned(), ctx: ctx.clone() };
        writes::single(self.write_batch(user.0.tenant_id, &[write]).await)?.into_created_user()
    }
    async fn get_user(&self, tenant_id: Uuid, user_id: Uuid) -> StoreResult<User>;
    /// The tenant's users with these ids, in the order given; ids not found are left out.
    async fn get_users(&self, tenant_id: Uuid, ids: &[Uuid]) -> StoreResult<Vec<User>>;
    /// The users with these ids, whatever their tenant (ids are unique), in no order;
    /// ids not found are left out. For batched jobs, which check the tenant themselves.
    async fn find_users(&self, ids: &[Uuid]) -> StoreResult<Vec<User>>;
    async fn list_users(&self, tenant_id: Uuid, page: PageRequest) -> StoreResult<Page<User>>;
    /// Applies a patch if `expected_version` (when given) is current.
    async fn update_user(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        expected_version: Option<i64>,
        patch: &UserPatch,
        ctx: &EventContext,
    ) -> StoreResult<User> {
        let write = TenantWrite::UpdateUser { user_id, expected_version, patch: patch.clone(), ctx: ctx.clone() };
        writes::single(self.write_batch(tenant_id, &[write]).await)?.into_updated_user()
    }

    /// Deletes a user if `expected_version` (when given) is current.
    async fn delete_user(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        expected_version: Option<i64>,
        ctx: &EventContext,
    ) -> StoreResult<()> {
        let write = TenantWrite::DeleteUser { user_id, expected_version, ctx: ctx.clone() };
        writes::single(self.write_batch(tenant_id, &[write]).await)?.into_deleted()
    }

    /// Deletes idempotency records created before `before`; returns how many.
    async fn purge_idempotency_keys(&self, before: DateTime<Utc>) -> StoreResult<u64>;

    /// Outbox rows with `seq > after_seq`, oldest first: for inspection and tests.
    /// Not a relay cursor: on PostgreSQL `seq` is taken at insert, not commit, so a
    /// row with a lower `seq` can become visible after a higher one (of another tenant).
    /// The relay uses [`unpublished_outbox`](Store::unpublished_outbox) instead.
    async fn outbox_after(&self, after_seq: i64, limit: u32) -> StoreResult<Vec<OutboxRecord>>;

    /// Unpublished outbox rows, oldest first (by `seq`). Within a tenant this is commit
    /// order: the tenant-row lock makes a tenant's next write wait for the previous
    /// commit, so a row is never visible before its tenant's earlier rows (this is why
    /// a `seq > cursor` scan would be wrong but a `published_at IS NULL` scan is right).
    async fn unpublished_outbox(&self, limit: u32) -> StoreResult<Vec<OutboxMessage>>;
    /// Marks rows published (after the bus confirmed them), but only while `holder` still
    /// holds the lease `lease` (fencing: a relay whose lease lapsed mid-publish cannot
    /// mark); returns how many rows it marked.
    async fn mark_published(&self, seqs: &[i64], lease: &str, holder: &str) -> StoreResult<u64>;
    /// Deletes up to `limit` rows published more than `retention` ago (oldest first);
    /// returns how many. Unpublished rows are never touched.
    async fn prune_outbox(&self, retention: std::time::Duration, limit: u32) -> StoreResult<u64>;
    /// When the oldest unpublished row was written (the relay's lag), if any.
    async fn oldest_unpublished(&self) -> StoreResult<Option<DateTime<Utc>>>;
    /// Takes or renews the lease `name` for `holder` for `ttl`; `false` while another
    /// holder's lease is still valid. Timed by the database's clock (PostgreSQL's
    /// `clock_timestamp()`; SQLite is local to its host), so processes on hosts whose
    /// clocks disagree agree on when a lease lapses.
    async fn try_lease(&self, name: &str, holder: &str, ttl: std::time::Duration) -> StoreResult<bool>;
    /// Gives the lease up (a clean shutdown), if `holder` has it.
    async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()>;

    /// Records audit entries in one transaction (those whose event already has one are
    /// skipped: a redelivery) and counts the new ones in the event analytics, in the
    /// same transaction: every event is counted exactly once. Returns how many were new.
    async fn append_audit_many(&self, entries: &[AuditEntry]) -> StoreResult<u64>;
    /// A tenant's events accepted (its event sequence) and not yet processed (counted in
    /// the analytics), leaving out those dropped unprocessed ([`record_dropped_event`]);
    /// `None` for an unknown tenant.
    ///
    /// [`record_dropped_event`]: Store::record_dropped_event
    async fn tenant_backlog(&self, tenant_id: Uuid) -> StoreResult<Option<i64>>;
    /// An operator discarded this event from the dead-letter queue: it will not be
    /// processed, so it leaves its tenant's backlog (once, however often it is recorded;
    /// not at all if it was processed after all).
    async fn record_dropped_event(&self, tenant_id: Uuid, event_id: Uuid) -> StoreResult<()>;

    // ---- End-user authentication (SPEC §8) ----

    /// The tenant's user with this normalized email, and its password hash if it has
    /// one (the only read of a hash).
    async fn user_credentials(
        &self,
        tenant_id: Uuid,
        email_normalized: &str,
    ) -> StoreResult<Option<(User, Option<String>)>>;
    /// A user by id with its password hash (checking a current password).
    async fn user_with_hash(&self, tenant_id: Uuid, user_id: Uuid) -> StoreResult<(User, Option<String>)>;
    /// Sets a user's password: the hash, `user.password_changed`, and every session of
    /// the user but `keep` revoked, in one transaction.
    async fn set_password(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        hash: &str,
        keep: Option<Uuid>,
        ctx: &EventContext,
    ) -> StoreResult<User>;
    /// Stores a one-time code (its HMAC) for (user, `purpose`), replacing an earlier one.
    async fn put_code(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        purpose: &str,
        code_hash: &str,
        expires_at: DateTime<Utc>,
        tries: i32,
    ) -> StoreResult<()>;
    /// Spends a try of the user's `purpose` code. When `code_hash` is right (and the code
    /// is live), the code is gone and the change is made in the same transaction:
    /// `verify` marks the email verified (`user.verified`); `reset` sets `new_hash` and
    /// revokes every session (`user.password_changed`).
    async fn redeem_code(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        purpose: &str,
        code_hash: &str,
        new_hash: Option<&str>,
        ctx: &EventContext,
    ) -> StoreResult<CodeOutcome>;
    /// Replaces a user's password hash with one of the same password (new parameters,
    /// at sign-in): no event, the password did not change.
    async fn rehash_password(&self, tenant_id: Uuid, user_id: Uuid, hash: &str) -> StoreResult<()>;
    /// A new session with its first refresh token (by hash), and its
    /// `auth.login_succeeded` event, in one transaction.
    async fn create_session(&self, session: &Session, refresh_hash: &str, event: &DomainEvent) -> StoreResult<()>;
    /// Spends the refresh token `token_hash` of the tenant: rotated to `new_hash` if it
    /// was current; if it was spent already, its session is revoked and
    /// `auth.refresh_reuse_detected` written, in one transaction.
    async fn use_refresh_token(
        &self,
        tenant_id: Uuid,
        token_hash: &str,
        new_hash: &str,
        correlation_id: &str,
    ) -> StoreResult<RefreshUse>;
    /// Revokes an active session (`auth.session_revoked` in the same transaction);
    /// `None` if the tenant has no such active session (of `user_id`, when given).
    async fn revoke_session(
        &self,
        tenant_id: Uuid,
        session_id: Uuid,
        user_id: Option<Uuid>,
        reason: &str,
        ctx: &EventContext,
    ) -> StoreResult<Option<Session>>;
    /// A user's active sessions, newest first.
    async fn sessions_of(&self, tenant_id: Uuid, user_id: Uuid) -> StoreResult<Vec<Session>>;
    /// Whether the session is neither revoked nor expired (checked on every request an
    /// access token makes, so a revocation holds at once in every process).
    async fn session_active(&self, tenant_id: Uuid, session_id: Uuid) -> StoreResult<bool>;
    /// Appends an event that records no other change (`auth.login_failed`), in its
    /// tenant's order.
    async fn append_event(&self, event: &DomainEvent) -> StoreResult<()>;
    /// Deletes sessions that expired or were revoked before `before` (their refresh
    /// tokens with them) and one-time codes that expired before it; returns how many.
    async fn purge_auth(&self, before: DateTime<Utc>) -> StoreResult<u64>;
    /// Every signing key, newest first.
    async fn signing_keys(&self) -> StoreResult<Vec<StoredKey>>;
    /// Adds a signing key; with `retire_others`, every other unretired key is retired
    /// now (it stays published until its tokens expired).
    async fn add_signing_key(&self, key: &StoredKey, retire_others: bool) -> StoreResult<()>;
    /// The analytics rows of a tenant at `grain` for buckets in `[from, to)`.
    async fn event_stats(
        &self,
        tenant_id: Uuid,
        grain: crate::domain::analytics::Grain,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        event_type: Option<&str>,
    ) -> StoreResult<Vec<crate::domain::analytics::StatRow>>;
    // ---- custom events (SPEC §9) ----
    /// Creates or replaces a tenant's event type (version +1); the stored type.
    async fn put_event_type(
        &self,
        def: &crate::domain::custom_event::EventTypeDef,
    ) -> StoreResult<crate::domain::custom_event::EventTypeDef>;
    async fn get_event_type(
        &self,
        tenant_id: Uuid,
        name: &str,
    ) -> StoreResult<Option<crate::domain::custom_event::EventTypeDef>>;
    /// A tenant's event types by name (at most 1,000).
    async fn list_event_types(&self, tenant_id: Uuid) -> StoreResult<Vec<crate::domain::custom_event::EventTypeDef>>;
    async fn delete_event_type(&self, tenant_id: Uuid, name: &str) -> StoreResult<()>;
    /// The current version of each of these types that exists (what schema caches check).
    async fn event_type_versions(&self, tenant_id: Uuid, names: &[String]) -> StoreResult<Vec<(String, i64)>>;
    /// Writes a tenant's accepted events to the outbox in ONE transaction, under the
    /// tenant-row lock (gap-free `tenant_seq` in order). An event whose client id was
    /// seen before (earlier, or earlier in `events`) writes nothing and answers with
    /// the original id.
    async fn ingest_events(
        &self,
        tenant_id: Uuid,
        events: &[crate::domain::custom_event::NewCustomEvent],
    ) -> StoreResult<Vec<crate::domain::custom_event::Ingested>>;
    async fn get_audit(&self, event_id: Uuid) -> StoreResult<Option<AuditEntry>>;
    /// How many audit entries a tenant has.
    async fn count_audit(&self, tenant_id: Uuid) -> StoreResult<u64>;
    // ---- webhooks (SPEC §7) ----

    /// Stores a new endpoint with its secret (404 when the tenant is gone).
    async fn create_webhook(
        &self,
        new: &crate::domain::webhook::NewEndpoint,
    ) -> StoreResult<crate::domain::webhook::WebhookEndpoint>;
    async fn list_webhooks(
        &self,
        tenant_id: Uuid,
        page: PageRequest,
    ) -> StoreResult<Page<crate::domain::webhook::WebhookEndpoint>>;
    async fn get_webhook(&self, tenant_id: Uuid, id: Uuid) -> StoreResult<crate::domain::webhook::WebhookEndpoint>;
    /// Writes url, description, filters and status (not the secret).
    async fn update_webhook(
        &self,
        e: &crate::domain::webhook::WebhookEndpoint,
    ) -> StoreResult<crate::domain::webhook::WebhookEndpoint>;
    async fn delete_webhook(&self, tenant_id: Uuid, id: Uuid) -> StoreResult<()>;
    /// A new secret; the current one becomes the previous, signing until `previous_until`.
    async fn rotate_webhook_secret(
        &self,
        tenant_id: Uuid,
        id: Uuid,
        secret: &str,
        previous_until: DateTime<Utc>,
    ) -> StoreResult<()>;
    /// The enabled endpoints of these tenants (the consumers' fan-out, one query a batch).
    async fn webhook_targets(&self, tenant_ids: &[Uuid]) -> StoreResult<Vec<crate::domain::webhook::WebhookEndpoint>>;
    /// Endpoints with the secrets that sign now, by id alone (the look-up of a batch of
    /// deliveries); the ids not found are gone.
    async fn webhooks_for_delivery(
        &self,
        ids: &[Uuid],
    ) -> StoreResult<Vec<(crate::domain::webhook::WebhookEndpoint, crate::domain::webhook::Secrets)>>;
    /// Logs attempts, one answer each in order: `false` when it was a success and one is
    /// already logged for that (endpoint, event) (earlier, or earlier in `attempts`), or
    /// the endpoint is gone.
    async fn record_deliveries(&self, attempts: &[crate::domain::webhook::DeliveryAttempt]) -> StoreResult<Vec<bool>>;
    /// The (endpoint, event) pairs among `pairs` with a success logged.
    async fn delivered(&self, pairs: &[(Uuid, Uuid)]) -> StoreResult<std::collections::HashSet<(Uuid, Uuid)>>;
    /// An endpoint's attempts, oldest first: all, those of one status, or `pending`: the
    /// latest attempt of each event when it failed and another is due (the endpoint is
    /// enabled and attempts are left), shown with status `pending`.
    async fn list_deliveries(
        &self,
        endpoint_id: Uuid,
        status: Option<&str>,
        page: PageRequest,
    ) -> StoreResult<Page<crate::domain::webhook::DeliveryAttempt>>;
    /// Events with a failed attempt since `since` and no success (what recover resends).
    async fn undelivered_since(&self, endpoint_id: Uuid, since: DateTime<Utc>, limit: u32) -> StoreResult<Vec<Uuid>>;
    /// When the endpoint's failing streak began: its first failed attempt after its last
    /// success (`None`: its latest attempt succeeded, or it has none).
    async fn failing_since(&self, endpoint_id: Uuid) -> StoreResult<Option<DateTime<Utc>>>;
    /// Deletes delivery-log rows older than `before` (at most `limit`); how many.
    async fn prune_deliveries(&self, before: DateTime<Utc>, limit: u32) -> StoreResult<u64>;
    /// Endpoints with delivery attempts since `since`, the most failures first (the
    /// operator's view, across tenants).
    async fn webhook_health(&self, since: DateTime<Utc>, limit: u32) -> StoreResult<Vec<EndpointHealth>>;
    /// An event still in the outbox, by id.
    async fn outbox_event(&self, event_id: Uuid) -> StoreResult<Option<crate::domain::DomainEvent>>;
    /// Disables an enabled endpoint and writes `webhook.disabled` in the same
    /// transaction; `false` if it was not enabled.
    async fn disable_webhook(&self, id: Uuid, reason: &str, ctx: &EventContext) -> StoreResult<bool>;

    /// The `limit` tenants with the most events committed since `since` (still in the
    /// outbox), busiest first, with their user counts.
    async fn tenant_activity(&self, since: DateTime<Utc>, limit: u32) -> StoreResult<Vec<TenantActivity>>;
    /// A tenant's audit entries matching `filter`, oldest first (by event id, which is
    /// time-ordered), paged by cursor.
    async fn list_audit(
        &self,
        tenant_id: Uuid,
        filter: &AuditFilter,
        page: PageRequest,
    ) -> StoreResult<Page<AuditEntry>>;

    /// Whether the email with this idempotency key was sent.
    async fn email_sent(&self, key: &str) -> StoreResult<bool>;
    /// Which of these idempotency keys were sent (one query for a batch).
    async fn emails_sent(&self, keys: &[String]) -> StoreResult<std::collections::HashSet<String>>;
    /// Records a sent email; `false` when the key was already recorded.
    async fn record_email(&self, email: &SentEmail) -> StoreResult<bool>;
    /// Records several sent emails in one statement (keys already recorded are
    /// skipped), and ends their claims; returns how many were new.
    async fn record_emails(&self, emails: &[SentEmail]) -> StoreResult<u64>;
    /// Claims the sends of these emails for `holder` (one attempt at a job) for `ttl`,
    /// timed like [`try_lease`](Store::try_lease) by the database's clock: each key not
    /// recorded whose claim is free, already `holder`'s, or past its time. Returns the
    /// keys claimed. While an attempt's claim holds, no other attempt, in any process,
    /// sends that email: its record may be pending. A claim ends when its email is
    /// recorded, or released.
    async fn claim_emails(
        &self,
        keys: &[String],
        holder: &str,
        ttl: std::time::Duration,
    ) -> StoreResult<std::collections::HashSet<String>>;
    /// Gives up `holder`'s claims on these keys (their sends failed).
    async fn release_emails(&self, keys: &[String], holder: &str) -> StoreResult<()>;
}

/// What the `leases` row names of emails' claims (`Store::claim_emails`) begin with
/// (the backends' claim statements write it too).
const EMAIL_CLAIM: &str = "email:";

/// The `leases` row name of an email's claim.
pub(crate) fn email_claim(key: &str) -> String {
    format!("{EMAIL_CLAIM}{key}")
}

/// The email key a claim's `leases` row name is for.
pub(crate) fn claimed_email(name: &str) -> Option<&str> {
    name.strip_prefix(EMAIL_CLAIM)
}

/// How long the webhook delivery log keeps an attempt.
pub const DELIVERY_LOG_DAYS: i64 = 30;

/// An endpoint's recent deliveries (`Store::webhook_health`).
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct EndpointHealth {
    pub endpoint_id: Uuid,
    pub tenant_id: Uuid,
    pub slug: String,
    pub url: String,
    pub status: String,
    /// Attempts logged in the window.
    pub attempts: i64,
    pub failed: i64,
}

/// A tenant's recent activity (`Store::tenant_activity`).
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TenantActivity {
    pub tenant_id: Uuid,
    pub slug: String,
    pub name: String,
    pub user_count: i64,
    /// Events committed in the window.
    pub events: i64,
}

/// The smallest UUIDv7 of a moment: event ids are UUIDv7, so `event_id >= this` is every
/// event committed since then, found by a range scan of the outbox's unique index.
pub fn first_uuid_v7_at(at: DateTime<Utc>) -> Uuid {
    let ms = u64::try_from(at.timestamp_millis()).unwrap_or(0);
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    b[6] = 0x70;
    b[8] = 0x80;
    Uuid::from_bytes(b)
}

/// What `list_audit` keeps: all given conditions hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditFilter {
    /// Event type, exactly (`user.updated`).
    pub event_type: Option<String>,
    /// `at >= from`.
    pub from: Option<DateTime<Utc>>,
    /// `at < to`.
    pub to: Option<DateTime<Utc>>,
    /// Case-insensitive substring of the subject, actor, or before/after states.
    pub text: Option<String>,
}

/// An email that went out, by its idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub struct SentEmail {
    pub key: String,
    pub tenant_id: Uuid,
    pub recipient: String,
    pub message_id: String,
    pub sent_at: DateTime<Utc>,
}

/// The pools of an SQLite database: readers, and the one writer every write of the
/// process goes through (store, job queue, bus), so writers queue in the pool instead of
/// sleeping in SQLite's busy handler.
#[derive(Clone, Debug)]
pub struct SqlitePools {
    pub read: sqlx::SqlitePool,
    pub write: sqlx::SqlitePool,
}

/// Opens the store a database URL names: `postgres://…` or `sqlite://…`.
/// `max_connections` caps the pool (SQLite uses at most 8: one writer at a time anyway).
pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(url, max_connections).await?))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url, max_connections.min(8)).await?))
    } else {
        Err(StoreError::Database(sqlx::Error::Configuration(
            format!("DATABASE_URL must start with postgres:// or sqlite:// (got {})", redact_url(url)).into(),
        )))
    }
}

/// `postgres://u@h:p/db?x` with `db` replaced by `name` (a fresh database beside an
/// admin connection's).
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// A URL with any password replaced, safe to log.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme_end + 3], &userinfo[..colon], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(super::redact_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(super::redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
    }
}
