//! One actor per active tenant (`tenant-<uuid>` under `tenants`): every write to the
//! tenant's users and keys passes through its mailbox, so one process never races itself
//! on a tenant and events of a tenant leave in the order the requests arrived. Across
//! processes the store's tenant-row lock gives the same guarantee (see `store/batch.rs`).
//!
//! ## Design note: group commit
//! The actor only queues: each write goes into the tenant's [`WriteQueue`], and one
//! committer task at a time takes everything queued (up to [`MAX_BATCH`]) and hands it
//! to the process's [`GroupCommit`], which applies it in ONE transaction (with other
//! tenants' batches of the moment), answering each caller with its own outcome. While a batch commits, the next requests queue up and go together into the
//! next one, so batches grow with the load and an idle tenant's lone write commits at
//! once. The committer sends the next batch as soon as the current one's transaction
//! holds the tenant's row lock (see `group_commit`), so two batches of a tenant can be
//! in flight, the second queued on the lock in the database. The committer runs beside the actor, not in its handler: a kill of the actor
//! loses only the requests still in its mailbox (their callers are told to retry); the
//! batch in flight commits and is answered, and the queue (shared by every incarnation
//! of the tenant's manager) is carried on.
//!
//! [`MAX_BATCH`]: crate::store::writes::MAX_BATCH

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use uuid::Uuid;

use super::group_commit::{GroupCommit, Submitted};
use crate::store::writes::MAX_BATCH;
use crate::store::{StoreResult, TenantWrite, WriteOutcome};

// Messages

/// What a tenant manager does.
pub enum TenantMsg {
    /// Apply a write; answered once the batch it went into committed (or failed).
    Write(TenantWrite, RpcReplyPort<StoreResult<WriteOutcome>>),
}

// State

/// A write waiting for its batch, with whom to answer.
type Queued = (TenantWrite, RpcReplyPort<StoreResult<WriteOutcome>>);

/// The tenant's writes waiting for the committer; one per tenant, shared by every
/// incarnation of its manager.
#[derive(Default)]
pub struct WriteQueue {
    inner: Mutex<QueueState>,
    /// Rung when the committer finishes (a draining manager waits for it).
    idle: tokio::sync::Notify,
}

#[derive(Default)]
struct QueueState {
    writes: Vec<Queued>,
    /// Whether a committer task is running (at most one per queue).
    committing: bool,
}

impl WriteQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // The state is a list and a flag, consistent after every statement: a panic
        // elsewhere while holding the lock leaves nothing half-done.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a write; `true` when the caller must start a committer.
    fn push(&self, write: Queued) -> bool {
        let mut q = self.lock();
        q.writes.push(write);
        !std::mem::replace(&mut q.committing, true)
    }

    /// The next batch, or `None` (and no committer any more) when nothing is queued.
    fn next_batch(&self) -> Option<Vec<Queued>> {
        let mut q = self.lock();
        if q.writes.is_empty() {
            q.committing = false;
            self.idle.notify_waiters();
            return None;
        }
        let n = q.writes.len().min(MAX_BATCH);
        Some(q.writes.drain(..n).collect())
    }

    /// Waits until no committer runs.
    async fn until_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if !self.lock().committing {
                return;
            }
            idle.await;
        }
    }
}

/// A tenant's write figures, for the tree view (`stats`) and `/metrics`.
#[derive(Debug, Default)]
pub struct WriteStats {
    pub batches: AtomicU64,
    pub writes: AtomicU64,
    pub largest_batch: AtomicUsize,
}

impl WriteStats {
    fn record(&self, writes: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.writes.fetch_add(writes as u64, Ordering::Relaxed);
        self.largest_batch.fetch_max(writes, Ordering::Relaxed);
        metrics::histogram!("eventra_tenant_write_batch_size").record(writes as f64);
    }

    /// The `/debug/actors` view.
    pub fn view(&self) -> serde_json::Value {
        serde_json::json!({
            "batches": self.batches.load(Ordering::Relaxed),
            "writes": self.writes.load(Ordering::Relaxed),
            "largest_batch": self.largest_batch.load(Ordering::Relaxed),
        })
    }
}

/// What a manager runs with: the same values for every incarnation of it.
#[derive(Clone)]
pub struct TenantManagerArgs {
    pub tenant_id: Uuid,
    /// Where batches become transactions.
    pub gate: Arc<GroupCommit>,
    pub queue: Arc<WriteQueue>,
    pub stats: Arc<WriteStats>,
}

// Handling

/// The actor.
pub struct TenantManager;

impl Actor for TenantManager {
    type Msg = TenantMsg;
    type State = TenantManagerArgs;
    type Arguments = TenantManagerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        tracing::debug!(tenant_id = %args.tenant_id, "tenant manager started");
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TenantMsg::Write(write, reply) => {
                if state.queue.push((write, reply)) {
                    tokio::spawn(commit(state.clone()));
                }
            }
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        // A drained or stopped manager leaves only when what it accepted is committed
        // and answered (its supervisor kills it past the shutdown time).
        state.queue.until_idle().await;
        tracing::debug!(tenant_id = %state.tenant_id, "tenant manager stopped");
        Ok(())
    }
}

/// The committer: applies queued writes a batch at a time until none are left.
async fn commit(m: TenantManagerArgs) {
    // A panic in a batch must not leave the queue believing a committer still runs.
    struct Reset<'a>(&'a WriteQueue, bool);
    impl Drop for Reset<'_> {
        fn drop(&mut self) {
            if !self.1 {
                self.0.lock().committing = false;
                self.0.idle.notify_waiters();
            }
        }
    }
    let mut reset = Reset(&m.queue, false);
    while let Some(batch) = m.queue.next_batch() {
        let (writes, replies): (Vec<TenantWrite>, Vec<_>) = batch.into_iter().unzip();
        m.stats.record(writes.len());
        let Submitted { locked, outcomes } = m.gate.submit(m.tenant_id, writes);
        // Answered by a task of its own: the committer moves on at `locked`.
        tokio::spawn(async move {
            let outcomes = outcomes.wait().await;
            // A caller that gave up is not our failure: ignore send errors.
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(outcome);
            }
        });
        // Resolves when the transaction holds the lock, or ended without it.
        let _ = locked.await;
    }
    reset.1 = true;
}
