//! A transaction of creates decided on guessed tenant rows (`predicted.rs`), sent to
//! PostgreSQL as ONE prepared statement: its own implicit transaction, one round trip,
//! parsed and planned once per connection.
//!
//! ## Design note: one statement, and what it must get right
//! The rows go as array parameters, one per column (`unnest`), so the statement's text
//! is the same for every transaction and sqlx prepares it once per connection. (Sent
//! as SQL text with literals, every transaction was parsed and planned anew: at least
//! an eighth of PostgreSQL's time at 50 tenants.) Within the one statement:
//! - **Lock order.** `l` locks the tenant rows in id order (`ORDER BY id FOR UPDATE`,
//!   as every writer takes them) before the `UPDATE` touches any: it is the `UPDATE`'s
//!   one-time filter, evaluated before its scan. Two transactions on overlapping
//!   tenants wait for one another instead of deadlocking.
//! - **The guard.** The statement's snapshot is taken before `l` waits, so a row
//!   committed meanwhile (this tenant's previous transaction, on the other lane) is
//!   invisible to the `UPDATE`'s scan. Its scan therefore matches on the id only; the
//!   `UPDATE` finds the row changed and, in READ COMMITTED, recomputes its `SET` on the
//!   newest version. The guess is checked there: a row not as guessed gets the
//!   sentinel `event_seq = -1`, which `RETURNING` reports, and the main query then
//!   fails the statement (`1 / 0`, 22012), so nothing of it is written. (The check
//!   cannot raise by itself: `SET` and constraints are first evaluated on the old
//!   version, before the newer one is found.)
//! - **Writes after the guard.** The `INSERT`s are CTEs the main query does not read:
//!   PostgreSQL runs them after it, once the guard has passed. A taken email or key
//!   fails the statement through the unique indexes.

use std::collections::HashMap;

use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::Postgres;
use uuid::Uuid;

use super::batch::{FinalRows, Known, Part};
use super::sql::TenantLock;
use super::{StoreError, StoreResult, TenantWrite, WriteOutcome};
use crate::domain::NewUser;

/// The statement: `$1` the tenant ids to lock; `$2`–`$7` the tenant rows (id, new
/// event sequence and user count, guessed event sequence, user count and
/// `max_users`); `$8`–`$19` the users; `$20`–`$24` the events; `$25`–`$28` the
/// idempotency records; `$29` the time events and records are stamped with.
const STATEMENT: &str = "\
WITH l AS MATERIALIZED (SELECT id FROM tenants WHERE id = ANY($1) ORDER BY id FOR UPDATE), \
v AS (SELECT * FROM unnest($2::uuid[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::int8[]) \
      AS v (id, seq, users, was_seq, was_users, max_users)), \
t AS (UPDATE tenants SET \
        event_seq = CASE WHEN tenants.event_seq = v.was_seq AND tenants.user_count = v.was_users \
                         AND tenants.max_users = v.max_users THEN v.seq ELSE -1 END, \
        user_count = v.users \
      FROM v WHERE (SELECT count(*) FROM l) = cardinality($1) AND tenants.id = v.id \
      RETURNING tenants.event_seq = v.seq AS ok), \
u AS (INSERT INTO users (id, tenant_id, email, email_normalized, name, status, email_verified, \
        attributes, version, created_at, updated_at, password_hash) \
      SELECT id, tenant_id, email, email_normalized, name, status, email_verified, \
        attributes::jsonb, version, created_at, updated_at, password_hash \
      FROM unnest($8::uuid[], $9::uuid[], $10::text[], $11::text[], $12::text[], $13::text[], \
        $14::bool[], $15::text[], $16::int8[], $17::timestamptz[], $18::timestamptz[], $19::text[]) \
      AS u (id, tenant_id, email, email_normalized, name, status, email_verified, attributes, \
        version, created_at, updated_at, password_hash)), \
o AS (INSERT INTO outbox (event_id, tenant_id, tenant_seq, event_type, payload, created_at) \
      SELECT event_id, tenant_id, tenant_seq, event_type, payload::jsonb, $29 \
      FROM unnest($20::uuid[], $21::uuid[], $22::int8[], $23::text[], $24::text[]) \
      AS o (event_id, tenant_id, tenant_seq, event_type, payload)), \
k AS (INSERT INTO idempotency_keys (tenant_id, key, request_hash, response, created_at) \
      SELECT tenant_id, key, request_hash, response::jsonb, $29 \
      FROM unnest($25::uuid[], $26::text[], $27::text[], $28::text[]) \
      AS k (tenant_id, key, request_hash, response)) \
SELECT 1 / (count(*) FILTER (WHERE ok) = cardinality($2::uuid[]))::int FROM t";

/// A transaction of creates decided on guessed tenant rows.
pub(super) struct Guess<'w> {
    parts: Vec<Option<Part<'w>>>,
    users: Vec<&'w NewUser>,
}

impl<'w> Guess<'w> {
    /// Decides every tenant's creates as if its row were `rows`' and no email or key of
    /// them were stored (the guard and the unique indexes check both); with the rows
    /// it will leave. `None` where a guess cannot carry the batch: a tenant whose
    /// writes all fail (its row would be unchanged, so unguarded).
    pub fn decide(
        batches: &[(Uuid, &'w [TenantWrite])],
        rows: &HashMap<Uuid, TenantLock>,
    ) -> Option<(Self, Vec<(Uuid, TenantLock)>)> {
        let mut parts = Vec::with_capacity(batches.len());
        let mut users = Vec::new();
        let nothing_stored = Known::default();
        for (tenant, writes) in batches {
            let mut part = Part::new(*tenant, writes, rows.get(tenant)?);
            let run = part.take_create_run();
            let (accepted, expired) = super::batch::decide_creates(&mut part, &run, &nothing_stored).ok()?;
            if part.next != writes.len() || !expired.is_empty() || !part.tenant_changed() {
                return None;
            }
            users.extend(accepted);
            parts.push(Some(part));
        }
        let after = parts.iter().flatten().map(|p| (p.tenant_id, p.row_after())).collect();
        Some((Guess { parts, users }, after))
    }

    /// Its statement ([`STATEMENT`]), with its first event's id (to learn whether it
    /// committed when the connection breaks). `ids`: its tenants, sorted.
    pub fn statement(&self, ids: &[Uuid]) -> StoreResult<(Query<'static, Postgres, PgArguments>, Uuid)> {
        let rows = FinalRows::new(&self.parts, &self.users);
        let first_event = rows
            .events
            .first()
            .map(|(_, e)| e.id)
            .ok_or_else(|| StoreError::Corrupt("a guessed transaction of creates had no event".into()))?;
        let mut q = sqlx::query(STATEMENT).bind(ids.to_vec());

        let tenants = &rows.changed;
        q = q
            .bind(tenants.iter().map(|p| p.tenant_id).collect::<Vec<_>>())
            .bind(tenants.iter().map(|p| p.event_seq).collect::<Vec<_>>())
            .bind(tenants.iter().map(|p| p.user_count).collect::<Vec<_>>())
            .bind(tenants.iter().map(|p| p.row_before().0).collect::<Vec<_>>())
            .bind(tenants.iter().map(|p| p.row_before().1).collect::<Vec<_>>())
            .bind(tenants.iter().map(|p| p.max_users).collect::<Vec<_>>());

        let users: Vec<_> = rows.users.iter().map(|n| &n.0).collect();
        let hashes = rows
            .users
            .iter()
            .map(|n| n.password_hash().map(|h| h.map(|h| h.as_str().to_owned())))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt(e.into()))?;
        q = q
            .bind(users.iter().map(|u| u.id).collect::<Vec<_>>())
            .bind(users.iter().map(|u| u.tenant_id).collect::<Vec<_>>())
            .bind(users.iter().map(|u| u.email.as_str().to_owned()).collect::<Vec<_>>())
            .bind(users.iter().map(|u| u.email_key()).collect::<Vec<_>>())
            .bind(users.iter().map(|u| u.name.as_str().to_owned()).collect::<Vec<_>>())
            .bind(users.iter().map(|u| u.status.as_str().to_owned()).collect::<Vec<_>>())
            .bind(users.iter().map(|u| u.email_verified).collect::<Vec<_>>())
            .bind(users.iter().map(|u| json(&u.attributes)).collect::<StoreResult<Vec<_>>>()?)
            .bind(users.iter().map(|u| u.version).collect::<Vec<_>>())
            .bind(users.iter().map(|u| u.created_at).collect::<Vec<_>>())
            .bind(users.iter().map(|u| u.updated_at).collect::<Vec<_>>())
            .bind(hashes);

        let events = &rows.events;
        q = q
            .bind(events.iter().map(|(_, e)| e.id).collect::<Vec<_>>())
            .bind(events.iter().map(|(_, e)| e.tenantid).collect::<Vec<_>>())
            .bind(events.iter().map(|(seq, _)| *seq).collect::<Vec<_>>())
            .bind(events.iter().map(|(_, e)| e.event_type.as_str().to_owned()).collect::<Vec<_>>())
            .bind(events.iter().map(|(_, e)| json(e)).collect::<StoreResult<Vec<_>>>()?);

        let records = &rows.records;
        q = q
            .bind(records.iter().map(|(t, _)| *t).collect::<Vec<_>>())
            .bind(records.iter().map(|(_, (key, _, _))| key.clone()).collect::<Vec<_>>())
            .bind(records.iter().map(|(_, (_, hash, _))| hash.clone()).collect::<Vec<_>>())
            .bind(records.iter().map(|(_, (_, _, response))| json(response)).collect::<StoreResult<Vec<_>>>()?)
            .bind(rows.now);
        Ok((q, first_event))
    }

    /// The outcomes, per tenant, per write.
    pub fn outcomes(self) -> Vec<Vec<StoreResult<WriteOutcome>>> {
        self.parts.into_iter().flatten().map(Part::outcomes).collect()
    }
}

/// A value as JSON text (cast to `jsonb` in the statement).
fn json<T: serde::Serialize + ?Sized>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("a value is not serializable: {e}")))
}
