//! The process's write transactions: every tenant manager hands its batch here, and
//! each transaction takes the batches of every tenant waiting at that moment
//! (`Store::write_batches`), so many tenants writing at once share commits too, not
//! only the writes of one hot tenant.
//!
//! ## Design note: lanes and pipelining
//! A lane is one transaction in flight: while it runs, batches queue, and the lane's
//! next transaction takes them all (up to [`MAX_WRITES`]). PostgreSQL gets two lanes,
//! so one transaction's statements overlap the other's commit; SQLite has one writer,
//! so one lane.
//!
//! A submission is answered twice: `locked` once its transaction holds the tenant's
//! row lock, `done` with the outcomes. A manager sends its next batch at `locked`,
//! not at `done`: the next batch's transaction then waits on the row lock in the
//! database and starts the moment this one commits, instead of starting its round trips
//! after it (a hot tenant's throughput is no longer one transaction's latency apart).
//! The order holds: the later batch asks for the lock after the earlier one has it.
//! It cannot deadlock: tenant rows are locked in id order in one statement, and a batch
//! waiting on a lock was sent only after that lock was taken, so no two transactions
//! can each wait for the other. (A PostgreSQL transaction sent as one message on
//! guessed tenant rows answers `locked` once it has committed: the later batch's guess
//! rests on it; see `store/predicted.rs`.)

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::store::{Store, StoreError, StoreResult, TenantWrite, WriteOutcome};

/// Most writes one transaction takes (a bound on its statements' size and latency).
pub const MAX_WRITES: usize = 1024;

/// One tenant's batch waiting for a transaction.
struct Submission {
    tenant_id: Uuid,
    writes: Vec<TenantWrite>,
    /// Told when the transaction holds the tenant's row lock.
    locked: oneshot::Sender<()>,
    reply: oneshot::Sender<Vec<StoreResult<WriteOutcome>>>,
}

/// A submitted batch: `locked` resolves once its transaction holds the tenant's lock
/// (or ended without it); [`Outcomes`] gives one outcome per write.
pub struct Submitted {
    pub locked: oneshot::Receiver<()>,
    pub outcomes: Outcomes,
}

/// A submitted batch's outcomes, to come.
pub struct Outcomes {
    done: oneshot::Receiver<Vec<StoreResult<WriteOutcome>>>,
    writes: usize,
}

impl Outcomes {
    /// Waits for them (a lost transaction: "unavailable" for each write).
    pub async fn wait(self) -> Vec<StoreResult<WriteOutcome>> {
        match self.done.await {
            Ok(outcomes) => outcomes,
            // The lane died with the batch (a panic): unknown whether it committed.
            Err(_) => (0..self.writes)
                .map(|_| Err(StoreError::Unavailable("the write transaction was lost".into())))
                .collect(),
        }
    }
}

#[derive(Default)]
struct GateState {
    waiting: Vec<Submission>,
    /// Lanes running now (each a task with one transaction in flight at a time).
    lanes: usize,
}

pub struct GroupCommit {
    store: Arc<dyn Store>,
    /// Most transactions in flight at once.
    max_lanes: usize,
    state: Mutex<GateState>,
}

impl GroupCommit {
    pub fn new(store: Arc<dyn Store>) -> Arc<Self> {
        let max_lanes = if store.backend() == "postgres" { 2 } else { 1 };
        Arc::new(GroupCommit { store, max_lanes, state: Mutex::new(GateState::default()) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        // A list and a counter, consistent after every statement.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues one tenant's writes for the next transaction.
    pub fn submit(self: &Arc<Self>, tenant_id: Uuid, writes: Vec<TenantWrite>) -> Submitted {
        let n = writes.len();
        let (locked, on_lock) = oneshot::channel();
        let (reply, done) = oneshot::channel();
        let start_lane = {
            let mut s = self.lock();
            s.waiting.push(Submission { tenant_id, writes, locked, reply });
            let start = s.lanes < self.max_lanes;
            if start {
                s.lanes += 1;
            }
            start
        };
        if start_lane {
            tokio::spawn(self.clone().lane());
        }
        Submitted { locked: on_lock, outcomes: Outcomes { done, writes: n } }
    }

    /// The next transaction's batches, oldest first, up to [`MAX_WRITES`] (at least one
    /// batch); `None` (and one lane fewer) when nothing waits.
    fn next(&self) -> Option<Vec<Submission>> {
        let mut s = self.lock();
        if s.waiting.is_empty() {
            s.lanes -= 1;
            return None;
        }
        let mut writes = 0;
        let take = s
            .waiting
            .iter()
            .take_while(|sub| {
                let fits = writes == 0 || writes + sub.writes.len() <= MAX_WRITES;
                writes += sub.writes.len();
                fits
            })
            .count();
        Some(s.waiting.drain(..take).collect())
    }

    /// A lane: transactions back to back while batches wait.
    async fn lane(self: Arc<Self>) {
        // A panic in a transaction must not leave the lane counted as running.
        struct Release<'a>(&'a GroupCommit, bool);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.lock().lanes -= 1;
                }
            }
        }
        let mut release = Release(&self, false);
        while let Some(subs) = self.next() {
            let (batches, mut on_lock, replies): (Vec<(Uuid, Vec<TenantWrite>)>, Vec<_>, Vec<_>) =
                subs.into_iter().fold((Vec::new(), Vec::new(), Vec::new()), |(mut b, mut l, mut r), s| {
                    b.push((s.tenant_id, s.writes));
                    l.push(s.locked);
                    r.push(s.reply);
                    (b, l, r)
                });
            let slices: Vec<(Uuid, &[TenantWrite])> = batches.iter().map(|(t, w)| (*t, w.as_slice())).collect();
            let writes: usize = slices.iter().map(|(_, w)| w.len()).sum();
            let began = std::time::Instant::now();
            let on_lock_cell = Mutex::new(std::mem::take(&mut on_lock));
            let locked = || {
                let senders = std::mem::take(&mut *on_lock_cell.lock().unwrap_or_else(|e| e.into_inner()));
                for s in senders {
                    let _ = s.send(());
                }
            };
            let outcomes = self.store.write_batches(&slices, &locked).await;
            metrics::histogram!("eventra_write_transaction_writes").record(writes as f64);
            metrics::histogram!("eventra_write_transaction_seconds").record(began.elapsed().as_secs_f64());
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        }
        release.1 = true;
    }
}
