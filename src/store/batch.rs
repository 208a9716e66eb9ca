//! Group commit: the writes of several tenants, each tenant's in its mailbox order, in
//! ONE transaction.
//!
//! ## Design note: outcomes without savepoints
//! Every write must end as if it had run alone, in order: a duplicate email or a full
//! tenant fails that write only. Savepoints would give that, at two round trips a
//! write, and PostgreSQL slows every snapshot down once a transaction holds more than
//! 64 subtransactions. Instead, under the tenant-row locks (which every writer of a
//! tenant takes first, in every process), nothing of a locked tenant can change but
//! through this transaction, so each failure is decided before any statement can hit it:
//! - emails are checked with one look-up per round of create runs (all tenants'
//!   runs together, plus each run itself), a changed email with one look-up;
//! - `max_users`, versions and idempotency keys (stored ones, and those of this very
//!   batch) are checked in memory;
//! - then every tenant's run of creates goes into one multi-row `INSERT`, the events
//!   of all writes into one multi-row outbox `INSERT`, the idempotency records into one
//!   more, and every changed tenant row (event sequence, user count) into one `UPDATE`.
//!
//! A statement that fails anyway (a bug, a constraint the checks missed) aborts the
//! transaction; `write_batches` then runs each tenant's writes alone, then each write
//! alone, so only the culprit fails.
//!
//! ## Order and locks
//! A tenant's writes are applied in their order, creates being held back only until
//! the tenant's next write of another kind (which may depend on them), so its events
//! take gap-free `tenant_seq` numbers in that order. The tenant rows are locked in one
//! statement, in id order: two transactions that lock overlapping tenants (two
//! processes) take the locks in the same order and cannot deadlock.

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use uuid::Uuid;

use super::sql::TenantLock;
use super::{StoreError, StoreResult, TenantWrite, WriteOutcome};
use crate::domain::{DomainEvent, NewUser, User};

/// Rows per multi-row statement: 11 parameters a user row, well inside SQLite's 32,766.
pub(super) const ROWS_PER_STATEMENT: usize = 500;

/// One tenant's share of a transaction: its writes, what has been decided for them,
/// and its row as locked.
pub(super) struct Part<'w> {
    pub tenant_id: Uuid,
    pub writes: &'w [TenantWrite],
    pub results: Vec<Option<StoreResult<WriteOutcome>>>,
    /// The next write to apply.
    pub next: usize,
    /// The tenant's last event number handed out (this batch's included).
    pub event_seq: i64,
    pub user_count: i64,
    pub max_users: i64,
    /// The tenant row as locked, to know whether it needs its `UPDATE`.
    locked: (i64, i64),
    /// Events to append, with their `tenant_seq`, in order.
    pub events: Vec<(i64, DomainEvent)>,
    /// Idempotency records to store: key, request hash, response.
    pub idempotency: Vec<(String, String, Value)>,
    /// Keyed creates accepted in this batch: key → (request hash, user), so a second
    /// identical request in the same batch replays the first.
    pub keyed: HashMap<String, (String, User)>,
}

impl<'w> Part<'w> {
    /// A tenant's part, from its row as locked.
    pub fn new(tenant_id: Uuid, writes: &'w [TenantWrite], lock: &TenantLock) -> Self {
        Part {
            tenant_id,
            writes,
            results: writes.iter().map(|_| None).collect(),
            next: 0,
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

    fn has_room(&self) -> bool {
        self.max_users == 0 || self.user_count < self.max_users
    }

    /// The next run of creates (and moves past it); empty when the next write is not a
    /// create.
    pub fn take_create_run(&mut self) -> Vec<usize> {
        let start = self.next;
        while self.writes.get(self.next).is_some_and(|w| matches!(w, TenantWrite::CreateUser { .. })) {
            self.next += 1;
        }
        (start..self.next).collect()
    }

    /// The outcomes, in the writes' order.
    pub fn outcomes(self) -> Vec<StoreResult<WriteOutcome>> {
        self.results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Corrupt("a write got no outcome".into()))))
            .collect()
    }
}

/// The conflict for an email address the tenant already has.
pub(super) fn email_taken(email: &str) -> StoreError {
    StoreError::Conflict(format!("a user with email '{email}' already exists in this tenant"))
}

/// A stored idempotent answer, as the batch reads it.
#[derive(sqlx::FromRow)]
pub(super) struct StoredAnswer {
    pub tenant_id: Uuid,
    pub key: String,
    pub request_hash: String,
    pub response: sqlx::types::Json<Value>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// What the database holds for a round of create runs: taken emails and stored
/// idempotent answers, by (tenant, email or key).
#[derive(Default)]
pub(super) struct Known {
    pub taken: HashSet<(Uuid, String)>,
    pub stored: HashMap<(Uuid, String), StoredAnswer>,
}

/// Decides a tenant's run of creates in order (see the module note) and answers each;
/// returns the accepted users (to insert) and the stored keys found expired (to
/// delete before the new records go in).
pub(super) fn decide_creates<'w>(
    part: &mut Part<'w>,
    run: &[usize],
    known: &Known,
) -> StoreResult<(Vec<&'w NewUser>, Vec<String>)> {
    let now = crate::domain::now();
    let ttl = chrono::Duration::hours(super::IDEMPOTENCY_TTL_HOURS);
    let tenant = part.tenant_id;
    let writes = part.writes;
    let mut accepted: Vec<&'w NewUser> = Vec::new();
    let mut expired = Vec::new();
    let mut emails: HashSet<String> = HashSet::new();
    for &i in run {
        let TenantWrite::CreateUser { user, idempotency, ctx } = &writes[i] else { continue };
        let u = &user.0;
        // A replay answers the earlier request's user, whatever changed since.
        if let Some(req) = idempotency {
            if let Some((hash, earlier)) = part.keyed.get(&req.key) {
                part.results[i] = Some(if *hash == req.request_hash {
                    Ok(WriteOutcome::UserCreated(super::Created { value: earlier.clone(), replayed: true }))
                } else {
                    Err(StoreError::IdempotencyMismatch)
                });
                continue;
            }
            if let Some(row) = known.stored.get(&(tenant, req.key.clone())) {
                if row.created_at < now - ttl {
                    expired.push(req.key.clone());
                } else if row.request_hash != req.request_hash {
                    part.results[i] = Some(Err(StoreError::IdempotencyMismatch));
                    continue;
                } else {
                    part.results[i] = Some(
                        serde_json::from_value::<User>(row.response.0.clone())
                            .map(|value| WriteOutcome::UserCreated(super::Created { value, replayed: true }))
                            .map_err(|e| StoreError::Corrupt(format!("idempotent response: {e}"))),
                    );
                    continue;
                }
            }
        }
        if let Err(bug) = user.password_hash() {
            part.results[i] = Some(Err(StoreError::Corrupt(bug.to_owned())));
            continue;
        }
        let email = u.email_key();
        if emails.contains(&email) || known.taken.contains(&(tenant, email.clone())) {
            part.results[i] = Some(Err(email_taken(&u.email)));
            continue;
        }
        if !part.has_room() {
            part.results[i] = Some(Err(StoreError::TenantFull { max_users: part.max_users }));
            continue;
        }
        part.user_count += 1;
        emails.insert(email);
        part.append(DomainEvent::user_created(u, ctx));
        if let Some(req) = idempotency {
            let response = serde_json::to_value(u).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            part.keyed.insert(req.key.clone(), (req.request_hash.clone(), u.clone()));
            part.idempotency.push((req.key.clone(), req.request_hash.clone(), response));
        }
        accepted.push(user);
        part.results[i] = Some(Ok(WriteOutcome::UserCreated(super::Created { value: u.clone(), replayed: false })));
    }
    Ok((accepted, expired))
}

/// `INSERT INTO users … VALUES …` for these users.
pub(super) fn push_users<'a, DB>(q: &mut sqlx::QueryBuilder<'a, DB>, users: &[&'a NewUser])
where
    DB: sqlx::Database,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<&'a str>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    bool: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    sqlx::types::Json<&'a serde_json::Map<String, Value>>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    chrono::DateTime<chrono::Utc>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    q.push(
        "INSERT INTO users (id, tenant_id, email, email_normalized, name, status, email_verified, \
         attributes, version, created_at, updated_at, password_hash) ",
    );
    q.push_values(users, |mut row, n| {
        let u = &n.0;
        // Checked when the write was accepted (`decide_creates`): only hashes get here.
        let hash = n.password_hash().ok().flatten().map(|h| h.as_str());
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
            .push_bind(u.updated_at)
            .push_bind(hash);
    });
}

/// `SELECT tenant_id, email_normalized FROM users WHERE …`: which of these pairs exist
/// (a row-value `IN` over a `VALUES` subquery, which both engines answer from the
/// `(tenant_id, email_normalized)` index).
pub(super) fn push_taken_emails<'a, DB>(q: &mut sqlx::QueryBuilder<'a, DB>, emails: &'a [(Uuid, String)])
where
    DB: sqlx::Database,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    q.push(
        "SELECT tenant_id, email_normalized FROM users WHERE (tenant_id, email_normalized) IN \
         (SELECT v.column1, v.column2 FROM (",
    );
    q.push_values(emails, |mut row, (t, e)| {
        row.push_bind(*t).push_bind(e.as_str());
    });
    q.push(") AS v)");
}

/// The email look-up as rows shaped like the locked tenant rows (`tenant_id, 0, 0, 0,
/// email`), to follow them in a `UNION ALL` (PostgreSQL's one statement after the lock).
pub(super) fn push_taken_emails_as_lock_rows<'a>(
    q: &mut sqlx::QueryBuilder<'a, sqlx::Postgres>,
    emails: &'a [(Uuid, String)],
) {
    q.push(
        "SELECT tenant_id, 0::int8, 0::int8, 0::int8, email_normalized FROM users \
         WHERE (tenant_id, email_normalized) IN (SELECT v.column1, v.column2 FROM (",
    );
    q.push_values(emails, |mut row, (t, e)| {
        row.push_bind(*t).push_bind(e.as_str());
    });
    q.push(") AS v)");
}

/// `INSERT INTO outbox … VALUES …` for these events (with their `tenant_seq`).
pub(super) fn push_events<'a, DB>(
    q: &mut sqlx::QueryBuilder<'a, DB>,
    events: &[&'a (i64, DomainEvent)],
    now: chrono::DateTime<chrono::Utc>,
) where
    DB: sqlx::Database,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    sqlx::types::Json<&'a DomainEvent>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    chrono::DateTime<chrono::Utc>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    q.push("INSERT INTO outbox (event_id, tenant_id, tenant_seq, event_type, payload, created_at) ");
    q.push_values(events, |mut row, (seq, event)| {
        row.push_bind(event.id)
            .push_bind(event.tenantid)
            .push_bind(*seq)
            .push_bind(event.event_type.as_str())
            .push_bind(sqlx::types::Json(event))
            .push_bind(now);
    });
}

/// `INSERT INTO idempotency_keys … VALUES …` for these (tenant, record) pairs.
pub(super) fn push_idempotency<'a, DB>(
    q: &mut sqlx::QueryBuilder<'a, DB>,
    records: &[(Uuid, &'a (String, String, Value))],
    now: chrono::DateTime<chrono::Utc>,
) where
    DB: sqlx::Database,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    sqlx::types::Json<&'a Value>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    chrono::DateTime<chrono::Utc>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    q.push("INSERT INTO idempotency_keys (tenant_id, key, request_hash, response, created_at) ");
    q.push_values(records, |mut row, (tenant_id, (key, hash, response))| {
        row.push_bind(*tenant_id)
            .push_bind(key.as_str())
            .push_bind(hash.as_str())
            .push_bind(sqlx::types::Json(response))
            .push_bind(now);
    });
}

/// `v (id, seq, users) AS (VALUES …) UPDATE tenants …` (after a `WITH `): the changed
/// tenant rows' event sequence and user count, in one statement.
pub(super) fn push_tenant_rows<'a, DB>(q: &mut sqlx::QueryBuilder<'a, DB>, parts: &[&Part<'_>])
where
    DB: sqlx::Database,
    Uuid: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    q.push("v (id, seq, users) AS (");
    q.push_values(parts, |mut row, p| {
        row.push_bind(p.tenant_id).push_bind(p.event_seq).push_bind(p.user_count);
    });
    q.push(") UPDATE tenants SET event_seq = v.seq, user_count = v.users FROM v WHERE tenants.id = v.id");
}

/// The transaction of a set of tenant batches, stamped out per backend inside
/// `impl $store` (sqlx's executor bounds cannot be named generically; see `sql.rs`).
/// Each backend provides `begin_locked`: begins the transaction, locks the tenant rows
/// (in id order) and returns them, with which of the given (tenant, email) pairs the
/// tenants have.
macro_rules! batch_helpers {
    ($db:ty) => {
        /// Applies every tenant's writes in one transaction; `Err` when the transaction
        /// failed as a whole (nothing of it is written). Outcomes per tenant, per write.
        async fn batches_tx(
            &self,
            batches: &[(uuid::Uuid, &[$crate::store::TenantWrite])],
            locked: &(dyn Fn() + Send + Sync),
        ) -> $crate::store::StoreResult<Vec<Vec<$crate::store::StoreResult<$crate::store::WriteOutcome>>>> {
            use $crate::store::batch::Part;
            use $crate::store::TenantWrite;
            let mut ids: Vec<uuid::Uuid> = batches.iter().map(|(t, _)| *t).collect();
            ids.sort_unstable();
            ids.dedup();
            // The emails of each tenant's leading creates (the first round) are looked up
            // right after the lock.
            let leading: Vec<(uuid::Uuid, String)> = batches
                .iter()
                .flat_map(|(t, writes)| {
                    writes.iter().map_while(move |w| match w {
                        TenantWrite::CreateUser { user, .. } => Some((*t, user.0.email_key())),
                        _ => None,
                    })
                })
                .collect();
            let (mut tx, locks, taken) = self.begin_locked(&ids, &leading).await?;
            locked();
            let mut prefetched = Some(taken);
            // Accepted creates, inserted before the next write of another kind (which
            // must see them) or with the transaction's other rows at its end.
            let mut users: Vec<&$crate::domain::NewUser> = Vec::new();
            // Tenants that are gone answer "not found" for each write, without a part.
            let mut parts: Vec<Option<Part<'_>>> =
                batches.iter().map(|(t, writes)| locks.get(t).map(|lock| Part::new(*t, writes, lock))).collect();
            loop {
                // Every tenant's next run of creates, together.
                let mut runs: Vec<(usize, Vec<usize>)> = Vec::new();
                for (p, part) in parts.iter_mut().enumerate() {
                    if let Some(part) = part {
                        let run = part.take_create_run();
                        if !run.is_empty() {
                            runs.push((p, run));
                        }
                    }
                }
                let mut progressed = !runs.is_empty();
                Self::decide_runs(&mut tx, &mut parts, &runs, &mut users, prefetched.take()).await?;
                let others = parts.iter().flatten().any(|p| p.writes.get(p.next).is_some());
                if others && !users.is_empty() {
                    Self::insert_users(&mut tx, &users).await?;
                    users.clear();
                }
                // Then each tenant's next write of another kind, one at a time.
                for part in parts.iter_mut().flatten() {
                    let writes = part.writes;
                    let Some(write) = writes.get(part.next) else { continue };
                    let i = part.next;
                    part.next += 1;
                    progressed = true;
                    let outcome = match write {
                        TenantWrite::CreateUser { .. } => {
                            part.next -= 1; // a create comes with the next round's runs
                            continue;
                        }
                        TenantWrite::UpdateUser { user_id, expected_version, patch, ctx } => {
                            Self::batch_update(&mut tx, part, *user_id, *expected_version, patch, ctx).await?
                        }
                        TenantWrite::DeleteUser { user_id, expected_version, ctx } => {
                            Self::batch_delete(&mut tx, part, *user_id, *expected_version, ctx).await?
                        }
                        TenantWrite::CreateApiKey { key, ctx } => Self::batch_api_key(&mut tx, part, key, ctx).await?,
                    };
                    part.results[i] = Some(outcome);
                }
                if !progressed {
                    break;
                }
            }
            Self::finish_batches(&mut tx, &parts, &users).await?;
            tx.commit().await?;
            Ok(parts
                .into_iter()
                .zip(batches)
                .map(|(part, (_, writes))| match part {
                    Some(part) => part.outcomes(),
                    None => writes.iter().map(|_| Err($crate::store::StoreError::NotFound("tenant"))).collect(),
                })
                .collect())
        }

        /// Decides a round of create runs, one per tenant (see `batch::decide_creates`),
        /// with one email look-up (unless `taken` came with the lock) and one
        /// idempotency look-up for all of them; the accepted users join `users`.
        async fn decide_runs<'w>(
            tx: &mut sqlx::Transaction<'_, $db>,
            parts: &mut [Option<$crate::store::batch::Part<'w>>],
            runs: &[(usize, Vec<usize>)],
            users: &mut Vec<&'w $crate::domain::NewUser>,
            taken: Option<std::collections::HashSet<(uuid::Uuid, String)>>,
        ) -> $crate::store::StoreResult<()> {
            use $crate::store::TenantWrite;
            if runs.is_empty() {
                return Ok(());
            }
            let mut emails: Vec<(uuid::Uuid, String)> = Vec::new();
            let mut keys: Vec<(uuid::Uuid, String)> = Vec::new();
            for (p, run) in runs {
                let Some(part) = &parts[*p] else { continue };
                for &i in run {
                    if let TenantWrite::CreateUser { user, idempotency, .. } = &part.writes[i] {
                        emails.push((part.tenant_id, user.0.email_key()));
                        if let Some(req) = idempotency.as_ref().filter(|r| !part.keyed.contains_key(&r.key)) {
                            keys.push((part.tenant_id, req.key.clone()));
                        }
                    }
                }
            }
            let mut known = $crate::store::batch::Known::default();
            known.taken = match taken {
                Some(taken) => taken,
                None => Self::taken_emails(tx, &emails).await?,
            };
            for chunk in keys.chunks($crate::store::batch::ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "SELECT tenant_id, key, request_hash, response, created_at FROM idempotency_keys \
                     WHERE (tenant_id, key) IN (SELECT v.column1, v.column2 FROM (",
                );
                q.push_values(chunk, |mut row, (t, k)| {
                    row.push_bind(*t).push_bind(k.as_str());
                });
                q.push(") AS v)");
                let rows: Vec<$crate::store::batch::StoredAnswer> = q.build_query_as().fetch_all(&mut **tx).await?;
                known.stored.extend(rows.into_iter().map(|r| ((r.tenant_id, r.key.clone()), r)));
            }
            let mut expired: Vec<(uuid::Uuid, String)> = Vec::new();
            for (p, run) in runs {
                let Some(part) = parts[*p].as_mut() else { continue };
                let (accepted, stale) = $crate::store::batch::decide_creates(part, run, &known)?;
                users.extend(accepted);
                expired.extend(stale.into_iter().map(|k| (part.tenant_id, k)));
            }
            for chunk in expired.chunks($crate::store::batch::ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "DELETE FROM idempotency_keys WHERE (tenant_id, key) IN (SELECT v.column1, v.column2 FROM (",
                );
                q.push_values(chunk, |mut row, (t, k)| {
                    row.push_bind(*t).push_bind(k.as_str());
                });
                q.push(") AS v)");
                q.build().execute(&mut **tx).await?;
            }
            Ok(())
        }

        /// Which of these (tenant, normalized email) pairs the database has.
        async fn taken_emails(
            tx: &mut sqlx::Transaction<'_, $db>,
            emails: &[(uuid::Uuid, String)],
        ) -> $crate::store::StoreResult<std::collections::HashSet<(uuid::Uuid, String)>> {
            let mut taken = std::collections::HashSet::new();
            for chunk in emails.chunks($crate::store::batch::ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new("");
                $crate::store::batch::push_taken_emails(&mut q, chunk);
                let rows: Vec<(uuid::Uuid, String)> = q.build_query_as().fetch_all(&mut **tx).await?;
                taken.extend(rows);
            }
            Ok(taken)
        }

        /// Inserts users, in multi-row statements.
        async fn insert_users(
            tx: &mut sqlx::Transaction<'_, $db>,
            users: &[&$crate::domain::NewUser],
        ) -> $crate::store::StoreResult<()> {
            for chunk in users.chunks($crate::store::batch::ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new("");
                $crate::store::batch::push_users(&mut q, chunk);
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
            b: &mut $crate::store::batch::Part<'_>,
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
            b: &mut $crate::store::batch::Part<'_>,
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
            b: &mut $crate::store::batch::Part<'_>,
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

        /// The transaction's shared rows: the users still to insert, every tenant's
        /// events (in each tenant's order), idempotency records, and the changed tenant
        /// rows. On PostgreSQL one statement (data-modifying CTEs) when it fits, so the
        /// transaction is four round trips: `BEGIN`, lock, look-ups, this, `COMMIT`.
        async fn finish_batches(
            tx: &mut sqlx::Transaction<'_, $db>,
            parts: &[Option<$crate::store::batch::Part<'_>>],
            users: &[&$crate::domain::NewUser],
        ) -> $crate::store::StoreResult<()> {
            use $crate::store::batch::{push_events, push_idempotency, push_tenant_rows, push_users, ROWS_PER_STATEMENT};
            let now = crate::domain::now();
            let parts: Vec<&$crate::store::batch::Part<'_>> = parts.iter().flatten().collect();
            let events: Vec<&(i64, $crate::domain::DomainEvent)> = parts.iter().flat_map(|p| &p.events).collect();
            let records: Vec<(uuid::Uuid, &(String, String, serde_json::Value))> =
                parts.iter().flat_map(|p| p.idempotency.iter().map(|r| (p.tenant_id, r))).collect();
            let changed: Vec<&$crate::store::batch::Part<'_>> = parts.iter().copied().filter(|p| p.tenant_changed()).collect();
            if changed.is_empty() && users.is_empty() && events.is_empty() && records.is_empty() {
                return Ok(());
            }
            let params = users.len() * 12 + events.len() * 6 + records.len() * 5 + changed.len() * 3;
            if Self::ONE_STATEMENT_WRITES && params <= 60_000 && !changed.is_empty() {
                let mut q = sqlx::QueryBuilder::<$db>::new("WITH ");
                if !users.is_empty() {
                    q.push("u AS (");
                    push_users(&mut q, users);
                    q.push("), ");
                }
                if !events.is_empty() {
                    q.push("o AS (");
                    push_events(&mut q, &events, now);
                    q.push("), ");
                }
                if !records.is_empty() {
                    q.push("k AS (");
                    push_idempotency(&mut q, &records, now);
                    q.push("), ");
                }
                push_tenant_rows(&mut q, &changed);
                q.build().execute(&mut **tx).await?;
                return Ok(());
            }
            Self::insert_users(tx, users).await?;
            for chunk in events.chunks(ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new("");
                push_events(&mut q, chunk, now);
                q.build().execute(&mut **tx).await?;
            }
            for chunk in records.chunks(ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new("");
                push_idempotency(&mut q, chunk, now);
                q.build().execute(&mut **tx).await?;
            }
            for chunk in changed.chunks(ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new("WITH ");
                push_tenant_rows(&mut q, chunk);
                q.build().execute(&mut **tx).await?;
            }
            Ok(())
        }
    };
}

pub(crate) use batch_helpers;
