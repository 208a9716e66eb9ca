//! Predicted tenant rows, so that a PostgreSQL write transaction can be ONE message.
//!
//! A batch transaction must know its tenants' rows (event sequence, user count,
//! `max_users`) before it can decide its writes, which costs a round trip under the
//! lock. But the rows of a tenant this process writes are, almost always, as this
//! process's last transaction on it left them. So a transaction of creates may decide
//! on that guess and send everything at once (one statement that locks, checks the
//! guess and writes the rows: `pg_guess.rs`): it fails as a whole where the guess was
//! wrong, and is then written the ordinary way (lock, look, write).
//!
//! This module keeps the guesses and the order. Each transaction on a tenant takes a
//! [`Turn`]: it records what the tenant's row will be after it (when known), and lets a
//! later transaction wait for it to end. A guessed transaction is sent at once; where
//! its guess fails, it waits for every earlier transaction on its tenants before it
//! writes the ordinary way, so a tenant's writes still commit in the order they were
//! sent. A transaction that locks first waits only for guessed ones in flight (the
//! ones it could otherwise overtake; a locking one before it already holds the lock).

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;
use uuid::Uuid;

use super::sql::TenantLock;

/// Tenants remembered before those no transaction is writing are forgotten (a bound
/// on memory, a few hundred bytes each; a forgotten tenant's next transaction locks
/// and looks, and is remembered again).
const MAX_TENANTS: usize = 10_000;

struct TenantState {
    /// The row as the last transaction begun on the tenant will leave it, if known.
    row: Option<TenantLock>,
    /// Which transaction that is.
    generation: u64,
    /// Closed when it has ended.
    ends: watch::Receiver<()>,
    /// Whether it was sent on a guess (and may not hold the lock yet).
    guessed: bool,
}

#[derive(Default)]
struct Inner {
    tenants: HashMap<Uuid, TenantState>,
    generation: u64,
}

#[derive(Default)]
pub(super) struct Predictions {
    inner: Mutex<Inner>,
}

/// One transaction's place in its tenants' order; ends (the next may go on) when
/// dropped.
pub(super) struct Turn<'a> {
    predictions: &'a Predictions,
    generation: u64,
    tenants: Vec<Uuid>,
    /// Earlier transactions on these tenants, and whether each was guessed.
    before: Vec<(watch::Receiver<()>, bool)>,
    _ends: watch::Sender<()>,
}

impl Predictions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A map and a counter, consistent after every statement.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Begins a transaction on `tenants` (sorted, distinct). `plan` gets their predicted
    /// rows when every one has one, and answers its plan with the rows it will leave
    /// (`None`: it will lock and look instead).
    pub fn begin<T>(
        &self,
        tenants: &[Uuid],
        plan: impl FnOnce(&HashMap<Uuid, TenantLock>) -> Option<(T, Vec<(Uuid, TenantLock)>)>,
    ) -> (Turn<'_>, Option<T>) {
        let (ends_tx, ends) = watch::channel(());
        let mut inner = self.lock();
        if inner.tenants.len() >= MAX_TENANTS {
            // Forget the tenants no transaction is writing (their guess is redone on
            // their next write, which locks and looks).
            inner.tenants.retain(|_, t| t.ends.has_changed().is_ok());
        }
        inner.generation += 1;
        let generation = inner.generation;
        let rows: Option<HashMap<Uuid, TenantLock>> =
            tenants.iter().map(|t| inner.tenants.get(t).and_then(|s| s.row).map(|row| (*t, row))).collect();
        let planned = rows.and_then(|rows| plan(&rows));
        let (planned, after) = match planned {
            Some((plan, after)) => (Some(plan), after.into_iter().collect::<HashMap<_, _>>()),
            None => (None, HashMap::new()),
        };
        let guessed = planned.is_some();
        let mut before = Vec::new();
        for tenant in tenants {
            let state = TenantState { row: after.get(tenant).copied(), generation, ends: ends.clone(), guessed };
            if let Some(earlier) = inner.tenants.insert(*tenant, state) {
                before.push((earlier.ends, earlier.guessed));
            }
        }
        drop(inner);
        let turn = Turn { predictions: self, generation, tenants: tenants.to_vec(), before, _ends: ends_tx };
        (turn, planned)
    }
}

impl Turn<'_> {
    /// Waits for the earlier transactions on these tenants to end: every one
    /// (`guessed_only == false`), or those sent on a guess.
    pub async fn wait_for_earlier(&self, guessed_only: bool) {
        for (ends, guessed) in &self.before {
            if *guessed || !guessed_only {
                let mut ends = ends.clone();
                // Never sent to: this returns when the sender is dropped (the end).
                let _ = ends.changed().await;
            }
        }
    }

    /// Records the rows this transaction will leave, once it holds their locks and has
    /// decided its writes (before its commit: the next transaction on these tenants may
    /// then be sent on them at once), unless a later transaction has begun on them
    /// since. Tenants not in `rows` are left as they are.
    pub fn expect(&self, rows: &[(Uuid, TenantLock)]) {
        let rows: HashMap<Uuid, TenantLock> = rows.iter().map(|(t, r)| (*t, *r)).collect();
        self.set(|tenant, row| rows.get(tenant).copied().or(row));
    }

    /// Forgets the rows guessed for this transaction (it did not commit, or may not
    /// have), unless a later transaction has begun on them since.
    pub fn forget(&self) {
        self.set(|_, _| None);
    }

    /// Sets the row of each of its tenants no later transaction has begun on, from the
    /// tenant and its row now.
    fn set(&self, row: impl Fn(&Uuid, Option<TenantLock>) -> Option<TenantLock>) {
        let mut inner = self.predictions.lock();
        for tenant in &self.tenants {
            if let Some(state) = inner.tenants.get_mut(tenant).filter(|s| s.generation == self.generation) {
                state.row = row(tenant, state.row);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(event_seq: i64) -> TenantLock {
        TenantLock { event_seq, max_users: 0, user_count: event_seq }
    }

    #[test]
    fn a_guess_needs_every_tenant_known_and_is_what_the_last_transaction_leaves() {
        let p = Predictions::default();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let (turn, planned) = p.begin(&[a], |_| Some(((), vec![])));
        assert!(planned.is_none(), "an unknown tenant is not guessed");
        turn.expect(&[(a, row(3))]);
        drop(turn);
        let (turn, planned) = p.begin(&[a, b], |_| Some(((), vec![])));
        assert!(planned.is_none(), "one tenant unknown: no guess for the transaction");
        turn.expect(&[(a, row(4)), (b, row(1))]);
        drop(turn);
        let (first, planned) = p.begin(&[a, b], |rows| Some((rows[&a].event_seq, vec![(a, row(6)), (b, row(2))])));
        assert_eq!(planned, Some(4));
        // A second transaction begun before the first settles guesses after it.
        let (second, planned) = p.begin(&[a], |rows| Some((rows[&a].event_seq, vec![(a, row(7))])));
        assert_eq!(planned, Some(6));
        // The first one's rows, recorded late, do not overwrite the second's guess.
        first.expect(&[(a, row(6)), (b, row(2))]);
        drop(first);
        second.forget();
        drop(second);
        let (_t, planned) = p.begin(&[a], |rows| Some((rows[&a].event_seq, vec![])));
        assert!(planned.is_none(), "a transaction that did not commit leaves its tenants unknown");
        let (_t, planned) = p.begin(&[b], |rows| Some((rows[&b].event_seq, vec![])));
        assert_eq!(planned, Some(2));
        // Rows recorded for some of a transaction's tenants (one tenant written again
        // alone) leave the others' as they were.
        let (both, _) = p.begin(&[a, b], |_| None::<((), _)>);
        both.expect(&[(a, row(9)), (b, row(3))]);
        both.expect(&[(b, row(4))]);
        drop(both);
        let (_t, planned) = p.begin(&[a, b], |rows| Some(((rows[&a].event_seq, rows[&b].event_seq), vec![])));
        assert_eq!(planned, Some((9, 4)));
    }

    #[tokio::test]
    async fn a_turn_waits_for_the_earlier_ones_it_is_told_to() {
        let p = Predictions::default();
        let a = Uuid::from_u128(1);
        let (turn, _) = p.begin(&[a], |_| None::<((), _)>);
        turn.expect(&[(a, row(1))]);
        drop(turn);
        let (locking, _) = p.begin(&[a], |_| None::<((), _)>);
        let (guessed, planned) = {
            // Known again once the locking one has decided.
            locking.expect(&[(a, row(2))]);
            p.begin(&[a], |_| Some(((), vec![(a, row(3))])))
        };
        assert!(planned.is_some());
        let (last, _) = p.begin(&[a], |_| None::<((), _)>);
        // `last` waits for the guessed one only while it is in flight.
        let wait = last.wait_for_earlier(true);
        tokio::pin!(wait);
        assert!(futures::poll!(&mut wait).is_pending(), "the guessed transaction is in flight");
        drop(guessed);
        tokio::time::timeout(std::time::Duration::from_secs(5), wait).await.expect("it ended");
        // `guessed` itself only waited on a locking one with `false`.
        drop(locking);
    }
}
