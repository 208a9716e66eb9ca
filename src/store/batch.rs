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
use super::statement::{Statement, Val};
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

    /// The tenant row's event sequence and user count as locked.
    pub fn row_before(&self) -> (i64, i64) {
        self.locked
    }

    /// The tenant row as this part leaves it.
    pub fn row_after(&self) -> TenantLock {
        TenantLock { event_seq: self.event_seq, max_users: self.max_users, user_count: self.user_count }
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

/// Stored idempotent answers by (tenant, key).
pub(super) type StoredAnswers = HashMap<(Uuid, String), StoredAnswer>;

/// What the database holds for a round of create runs: taken emails and stored
/// idempotent answers, by (tenant, email or key).
#[derive(Default)]
pub(super) struct Known {
    pub taken: HashSet<(Uuid, String)>,
    pub stored: StoredAnswers,
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

/// A value serialized as JSON.
fn json<T: serde::Serialize + ?Sized>(value: &T) -> StoreResult<Val<'static>> {
    serde_json::value::to_raw_value(value)
        .map(Val::Json)
        .map_err(|e| StoreError::Corrupt(format!("a value is not serializable: {e}")))
}

/// `INSERT INTO users … VALUES …` for these users.
pub(super) fn push_users<'a>(q: &mut impl Statement<'a>, users: &[&'a NewUser]) -> StoreResult<()> {
    q.sql(
        "INSERT INTO users (id, tenant_id, email, email_normalized, name, status, email_verified, \
         attributes, version, created_at, updated_at, password_hash) ",
    );
    let rows = users.iter().map(|n| {
        let u = &n.0;
        // Checked when the write was accepted (`decide_creates`): only hashes get here.
        let hash = n.password_hash().ok().flatten().map(|h| h.as_str());
        Ok([
            Val::Uuid(u.id),
            Val::Uuid(u.tenant_id),
            Val::Text(u.email.as_str().into()),
            Val::Text(u.email_key().into()),
            Val::Text(u.name.as_str().into()),
            Val::Text(u.status.as_str().into()),
            Val::Bool(u.email_verified),
            json(&u.attributes)?,
            Val::Int(u.version),
            Val::Time(u.created_at),
            Val::Time(u.updated_at),
            Val::NullableText(hash),
        ])
    });
    q.rows(rows.collect::<StoreResult<Vec<_>>>()?);
    Ok(())
}

/// `SELECT tenant_id, email_normalized FROM users WHERE …`: which of these pairs exist
/// (a row-value `IN` over a `VALUES` subquery, which both engines answer from the
/// `(tenant_id, email_normalized)` index).
pub(super) fn push_taken_emails<'a>(q: &mut impl Statement<'a>, emails: &'a [(Uuid, String)]) {
    q.sql(
        "SELECT tenant_id, email_normalized FROM users WHERE (tenant_id, email_normalized) IN \
         (SELECT v.column1, v.column2 FROM (",
    );
    q.rows(emails.iter().map(|(t, e)| [Val::Uuid(*t), Val::Text(e.as_str().into())]));
    q.sql(") AS v)");
}

/// `SELECT … FROM idempotency_keys WHERE …`: the stored answers for these (tenant, key)
/// pairs, as [`StoredAnswer`] rows.
pub(super) fn push_stored_answers<'a>(q: &mut impl Statement<'a>, keys: &'a [(Uuid, String)]) {
    q.sql(
        "SELECT tenant_id, key, request_hash, response, created_at FROM idempotency_keys \
         WHERE (tenant_id, key) IN (SELECT v.column1, v.column2 FROM (",
    );
    q.rows(keys.iter().map(|(t, k)| [Val::Uuid(*t), Val::Text(k.as_str().into())]));
    q.sql(") AS v)");
}

/// `INSERT INTO outbox … VALUES …` for these events (with their `tenant_seq`).
pub(super) fn push_events<'a>(
    q: &mut impl Statement<'a>,
    events: &[&'a (i64, DomainEvent)],
    now: chrono::DateTime<chrono::Utc>,
) -> StoreResult<()> {
    q.sql("INSERT INTO outbox (event_id, tenant_id, tenant_seq, event_type, payload, created_at) ");
    let rows = events.iter().map(|(seq, event)| {
        Ok([
            Val::Uuid(event.id),
            Val::Uuid(event.tenantid),
            Val::Int(*seq),
            Val::Text(event.event_type.as_str().into()),
            json(event)?,
            Val::Time(now),
        ])
    });
    q.rows(rows.collect::<StoreResult<Vec<_>>>()?);
    Ok(())
}

/// `INSERT INTO idempotency_keys … VALUES …` for these (tenant, record) pairs.
pub(super) fn push_idempotency<'a>(
    q: &mut impl Statement<'a>,
    records: &[(Uuid, &'a (String, String, Value))],
    now: chrono::DateTime<chrono::Utc>,
) -> StoreResult<()> {
    q.sql("INSERT INTO idempotency_keys (tenant_id, key, request_hash, response, created_at) ");
    let rows = records.iter().map(|(tenant_id, (key, hash, response))| {
        Ok([
            Val::Uuid(*tenant_id),
            Val::Text(key.as_str().into()),
            Val::Text(hash.as_str().into()),
            json(response)?,
            Val::Time(now),
        ])
    });
    q.rows(rows.collect::<StoreResult<Vec<_>>>()?);
    Ok(())
}

/// `v (id, seq, users) AS (VALUES …) UPDATE tenants …` (after a `WITH `): the changed
/// tenant rows' event sequence and user count, in one statement.
pub(super) fn push_tenant_rows<'a>(q: &mut impl Statement<'a>, parts: &[&Part<'_>]) {
    q.sql("v (id, seq, users) AS (");
    q.rows(parts.iter().map(|p| [Val::Uuid(p.tenant_id), Val::Int(p.event_seq), Val::Int(p.user_count)]));
    q.sql(") UPDATE tenants SET event_seq = v.seq, user_count = v.users FROM v WHERE tenants.id = v.id");
}

/// What a batch transaction writes at its end: the users still to insert, every
/// tenant's events (in each tenant's order), idempotency records, and the changed
/// tenant rows.
pub(super) struct FinalRows<'a> {
    pub users: &'a [&'a NewUser],
    pub events: Vec<&'a (i64, DomainEvent)>,
    pub records: Vec<(Uuid, &'a (String, String, Value))>,
    pub changed: Vec<&'a Part<'a>>,
    pub now: chrono::DateTime<chrono::Utc>,
}

impl<'a> FinalRows<'a> {
    pub fn new(parts: &'a [Option<Part<'a>>], users: &'a [&'a NewUser]) -> Self {
        let parts: Vec<&Part<'_>> = parts.iter().flatten().collect();
        FinalRows {
            users,
            events: parts.iter().flat_map(|p| &p.events).collect(),
            records: parts.iter().flat_map(|p| p.idempotency.iter().map(|r| (p.tenant_id, r))).collect(),
            changed: parts.iter().copied().filter(|p| p.tenant_changed()).collect(),
            now: crate::domain::now(),
        }
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.users.is_empty() && self.events.is_empty() && self.records.is_empty()
    }

    /// Bound parameters the rows take.
    pub fn params(&self) -> usize {
        self.users.len() * 12 + self.events.len() * 6 + self.records.len() * 5 + self.changed.len() * 3
    }

    /// Every row in one statement of data-modifying CTEs (PostgreSQL).
    pub fn push_one_statement(&self, q: &mut impl Statement<'a>) -> StoreResult<()> {
        self.push_row_ctes(q)?;
        push_tenant_rows(q, &self.changed);
        Ok(())
    }

    /// `WITH ` and the CTEs inserting users, events and idempotency records (each
    /// followed by `, `).
    fn push_row_ctes(&self, q: &mut impl Statement<'a>) -> StoreResult<()> {
        q.sql("WITH ");
        if !self.users.is_empty() {
            q.sql("u AS (");
            push_users(q, self.users)?;
            q.sql("), ");
        }
        if !self.events.is_empty() {
            q.sql("o AS (");
            push_events(q, &self.events, self.now)?;
            q.sql("), ");
        }
        if !self.records.is_empty() {
            q.sql("k AS (");
            push_idempotency(q, &self.records, self.now)?;
            q.sql("), ");
        }
        Ok(())
    }
}

/// The transaction of a set of tenant batches, stamped out per backend inside
/// `impl $store` (sqlx's executor bounds cannot be named generically; see `sql.rs`).
/// Each backend provides
/// - `begin_locked`: begins the transaction, locks the tenant rows (in id order) and
///   returns them, with which of the given (tenant, email) pairs the tenants have and
///   the stored answers for the given (tenant, idempotency key) pairs ([`Known`]). The
///   transaction it returns dereferences to the backend's connection;
/// - `commit_batches`: writes the [`FinalRows`] and commits.
macro_rules! batch_helpers {
    ($db:ty) => {
        /// Applies every tenant's writes in one transaction; `Err` when the transaction
        /// failed as a whole (nothing of it is written). Outcomes per tenant, per write.
        /// Once every write is decided, before the commit, `decided` gets the tenant rows
        /// it will leave, then `locked` is called.
        async fn batches_tx(
            &self,
            batches: &[(uuid::Uuid, &[$crate::store::TenantWrite])],
            locked: &(dyn Fn() + Send + Sync),
            decided: &(dyn Fn(&[(uuid::Uuid, $crate::store::sql::TenantLock)]) + Send + Sync),
        ) -> $crate::store::StoreResult<Vec<Vec<$crate::store::StoreResult<$crate::store::WriteOutcome>>>> {
            use $crate::store::batch::Part;
            use $crate::store::TenantWrite;
            let mut ids: Vec<uuid::Uuid> = batches.iter().map(|(t, _)| *t).collect();
            ids.sort_unstable();
            ids.dedup();
            // The emails and idempotency keys of each tenant's leading creates (the first
            // round) are looked up right after the lock.
            let mut leading: Vec<(uuid::Uuid, String)> = Vec::new();
            let mut leading_keys: Vec<(uuid::Uuid, String)> = Vec::new();
            for (t, writes) in batches {
                for w in writes.iter() {
                    let TenantWrite::CreateUser { user, idempotency, .. } = w else { break };
                    leading.push((*t, user.0.email_key()));
                    leading_keys.extend(idempotency.as_ref().map(|r| (*t, r.key.clone())));
                }
            }
            let (mut tx, locks, known) = self.begin_locked(&ids, &leading, &leading_keys).await?;
            let tx_conn: &mut <$db as sqlx::Database>::Connection = &mut tx;
            let mut prefetched = Some(known);
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
                Self::decide_runs(tx_conn, &mut parts, &runs, &mut users, prefetched.take()).await?;
                let others = parts.iter().flatten().any(|p| p.writes.get(p.next).is_some());
                if others && !users.is_empty() {
                    Self::insert_users(tx_conn, &users).await?;
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
                            Self::batch_update(tx_conn, part, *user_id, *expected_version, patch, ctx).await?
                        }
                        TenantWrite::DeleteUser { user_id, expected_version, ctx } => {
                            Self::batch_delete(tx_conn, part, *user_id, *expected_version, ctx).await?
                        }
                        TenantWrite::CreateApiKey { key, ctx } => Self::batch_api_key(tx_conn, part, key, ctx).await?,
                    };
                    part.results[i] = Some(outcome);
                }
                if !progressed {
                    break;
                }
            }
            let rows_after: Vec<_> = parts.iter().flatten().map(|p| (p.tenant_id, p.row_after())).collect();
            decided(&rows_after);
            locked();
            self.commit_batches(tx, &$crate::store::batch::FinalRows::new(&parts, &users)).await?;
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
        /// with one email look-up and one idempotency look-up for all of them (unless
        /// they came with the lock: `prefetched`); the accepted users join `users`.
        async fn decide_runs<'w>(
            tx: &mut <$db as sqlx::Database>::Connection,
            parts: &mut [Option<$crate::store::batch::Part<'w>>],
            runs: &[(usize, Vec<usize>)],
            users: &mut Vec<&'w $crate::domain::NewUser>,
            prefetched: Option<$crate::store::batch::Known>,
        ) -> $crate::store::StoreResult<()> {
            use $crate::store::TenantWrite;
            if runs.is_empty() {
                return Ok(());
            }
            // The first round's look-ups came with the lock: the pairs are gathered only
            // for later rounds.
            let known = match prefetched {
                Some(known) => known,
                None => {
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
                    $crate::store::batch::Known {
                        taken: Self::taken_emails(tx, &emails).await?,
                        stored: Self::stored_answers(tx, &keys).await?,
                    }
                }
            };
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
                q.build().execute(&mut *tx).await?;
            }
            Ok(())
        }

        /// Which of these (tenant, normalized email) pairs the database has.
        async fn taken_emails(
            tx: &mut <$db as sqlx::Database>::Connection,
            emails: &[(uuid::Uuid, String)],
        ) -> $crate::store::StoreResult<std::collections::HashSet<(uuid::Uuid, String)>> {
            let mut taken = std::collections::HashSet::new();
            for chunk in emails.chunks($crate::store::batch::ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new("");
                $crate::store::batch::push_taken_emails(&mut q, chunk);
                let rows: Vec<(uuid::Uuid, String)> = q.build_query_as().fetch_all(&mut *tx).await?;
                taken.extend(rows);
            }
            Ok(taken)
        }

        /// The stored idempotent answers for these (tenant, key) pairs.
        async fn stored_answers(
            tx: &mut <$db as sqlx::Database>::Connection,
            keys: &[(uuid::Uuid, String)],
        ) -> $crate::store::StoreResult<$crate::store::batch::StoredAnswers> {
            let mut stored = $crate::store::batch::StoredAnswers::new();
            for chunk in keys.chunks($crate::store::batch::ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new("");
                $crate::store::batch::push_stored_answers(&mut q, chunk);
                let rows: Vec<$crate::store::batch::StoredAnswer> = q.build_query_as().fetch_all(&mut *tx).await?;
                stored.extend(rows.into_iter().map(|r| ((r.tenant_id, r.key.clone()), r)));
            }
            Ok(stored)
        }

        /// Inserts users, in multi-row statements.
        async fn insert_users(
            tx: &mut <$db as sqlx::Database>::Connection,
            users: &[&$crate::domain::NewUser],
        ) -> $crate::store::StoreResult<()> {
            for chunk in users.chunks($crate::store::batch::ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new("");
                $crate::store::batch::push_users(&mut q, chunk)?;
                q.build().execute(&mut *tx).await?;
            }
            Ok(())
        }

        /// The user as the transaction sees it, if the tenant has it.
        async fn batch_user(
            tx: &mut <$db as sqlx::Database>::Connection,
            tenant_id: uuid::Uuid,
            user_id: uuid::Uuid,
        ) -> $crate::store::StoreResult<Option<$crate::domain::User>> {
            let row = sqlx::query_as::<_, $crate::store::sql::UserRow>("SELECT * FROM users WHERE tenant_id = $1 AND id = $2")
                .bind(tenant_id)
                .bind(user_id)
                .fetch_optional(&mut *tx)
                .await?;
            row.map(TryInto::try_into).transpose()
        }

        /// Patches one user (outer `Err`: the transaction failed; inner: this write did).
        async fn batch_update(
            tx: &mut <$db as sqlx::Database>::Connection,
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
                .fetch_optional(&mut *tx)
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
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                return Err(StoreError::Corrupt(format!("user {} changed under the tenant lock", after.id)));
            }
            b.append($crate::domain::DomainEvent::user_changed(kind, &before, &after, ctx));
            Ok(Ok(WriteOutcome::UserUpdated(after)))
        }

        /// Deletes one user (outer `Err`: the transaction failed; inner: this write did).
        async fn batch_delete(
            tx: &mut <$db as sqlx::Database>::Connection,
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
                .execute(&mut *tx)
                .await?;
            b.user_count -= 1;
            b.append($crate::domain::DomainEvent::user_deleted(&user, crate::domain::now(), ctx));
            Ok(Ok(WriteOutcome::UserDeleted))
        }

        /// Stores one API key (outer `Err`: the transaction failed).
        async fn batch_api_key(
            tx: &mut <$db as sqlx::Database>::Connection,
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
                .execute(&mut *tx)
                .await?;
            b.append($crate::domain::DomainEvent::api_key_created(&key.key, ctx));
            Ok(Ok($crate::store::WriteOutcome::ApiKeyCreated(key.key.clone())))
        }

        /// The transaction's rows at its end ([`FinalRows`](crate::store::batch::FinalRows)),
        /// with bound parameters: in one statement of data-modifying CTEs where the
        /// backend takes them and the parameters fit, else in multi-row statements.
        async fn finish_batches(
            tx: &mut <$db as sqlx::Database>::Connection,
            rows: &$crate::store::batch::FinalRows<'_>,
        ) -> $crate::store::StoreResult<()> {
            use $crate::store::batch::{push_events, push_idempotency, push_tenant_rows, ROWS_PER_STATEMENT};
            if rows.is_empty() {
                return Ok(());
            }
            if Self::ONE_STATEMENT_WRITES && rows.params() <= 60_000 && !rows.changed.is_empty() {
                let mut q = sqlx::QueryBuilder::<$db>::new("");
                rows.push_one_statement(&mut q)?;
                q.build().execute(&mut *tx).await?;
                return Ok(());
            }
            Self::insert_users(tx, rows.users).await?;
            for chunk in rows.events.chunks(ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new("");
                push_events(&mut q, chunk, rows.now)?;
                q.build().execute(&mut *tx).await?;
            }
            for chunk in rows.records.chunks(ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new("");
                push_idempotency(&mut q, chunk, rows.now)?;
                q.build().execute(&mut *tx).await?;
            }
            for chunk in rows.changed.chunks(ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<$db>::new("WITH ");
                push_tenant_rows(&mut q, chunk);
                q.build().execute(&mut *tx).await?;
            }
            Ok(())
        }
    };
}

pub(crate) use batch_helpers;
