//! The outbox relay (`outbox-relay` under `pipeline`): carries committed outbox rows to
//! the event bus, in commit order per tenant, marking a row published only after the bus
//! confirmed it.
//!
//! - **One active relay per database**: a `leases` row (`outbox-relay`) held for
//!   `lease_ttl` and renewed every tick; the others stand by and take over once it lapses
//!   (a dead relay stops renewing). A crash between publish and mark republishes: the
//!   bus is at-least-once and consumers are idempotent by event id.
//! - **Wakes at once** on new rows (PostgreSQL `LISTEN eventra_outbox`, which writers
//!   notify after their commit, held only while active; in-process writes through
//!   `Tenants`), and also polls.
//! - **Fenced**: the mark only applies while this relay still holds the lease (checked
//!   by the database in the same statement), so a stalled relay that lost its lease
//!   cannot mark rows the new holder is publishing.
//! - **Broker errors** are retried with exponential backoff (the `backoff` crate); the
//!   rows stay unpublished meanwhile, so nothing is lost or skipped.
//! - **Retention**: when idle, the active relay deletes published rows older than
//!   `EVENTRA_OUTBOX_RETENTION_HOURS` (a chunk a minute), so the outbox stays small.
//! - Lease times come from the database's clock, so relays on hosts whose clocks
//!   disagree still agree on who is active.

use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{Mutex, Notify};

use crate::bus::{BusMessage, EventBus};
use crate::store::Store;

/// The lease row's name.
pub const RELAY_LEASE: &str = "outbox-relay";

// Messages

pub enum RelayMsg {
    /// Renew the lease and publish what is pending.
    Tick,
}

// State

#[derive(Clone)]
pub struct RelayArgs {
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn EventBus>,
    /// This relay's name in the lease (the process: host and port); each start adds a
    /// fresh suffix, so a killed and restarted relay waits for its old lease to lapse
    /// like any standby does.
    pub holder: String,
    pub lease_ttl: Duration,
    pub poll: Duration,
    pub batch: u32,
    /// Rung by in-process writes.
    pub wake: Arc<Notify>,
    /// `LISTEN eventra_outbox` on PostgreSQL, for writes by other processes.
    pub database_url: Option<String>,
    /// Published rows older than this are deleted (`None`: kept forever).
    pub retention: Option<Duration>,
}

pub struct RelayState {
    args: RelayArgs,
    leader: bool,
    backoff: ExponentialBackoff,
    /// `LISTEN eventra_outbox`, held only while this relay is active (an unread
    /// subscription would make PostgreSQL queue notifications for it without end).
    listener: Option<Arc<Mutex<sqlx::postgres::PgListener>>>,
    /// When published rows were last pruned.
    last_prune: Option<std::time::Instant>,
}

// Handling

pub struct OutboxRelay;

impl Actor for OutboxRelay {
    type Msg = RelayMsg;
    type State = RelayState;
    type Arguments = RelayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        mut args: RelayArgs,
    ) -> Result<RelayState, ActorProcessingErr> {
        args.holder = format!("{}/{}", args.holder, uuid::Uuid::new_v4().simple());
        myself.send_message(RelayMsg::Tick)?;
        let backoff = broker_backoff(args.lease_ttl);
        Ok(RelayState { args, leader: false, backoff, listener: None, last_prune: None })
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut RelayState) -> Result<(), ActorProcessingErr> {
        if state.leader {
            // A clean stop hands over at once instead of after the lease lapses.
            let _ = state.args.store.release_lease(RELAY_LEASE, &state.args.holder).await;
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        RelayMsg::Tick: Self::Msg,
        state: &mut RelayState,
    ) -> Result<(), ActorProcessingErr> {
        let a = &state.args;
        match a.store.try_lease(RELAY_LEASE, &a.holder, a.lease_ttl).await {
            Ok(true) if !state.leader => {
                tracing::info!(holder = %a.holder, "this process is now the active outbox relay");
                state.leader = true;
                if let Some(url) = a.database_url.as_deref().filter(|u| u.starts_with("postgres")) {
                    match listen(url).await {
                        Ok(l) => state.listener = Some(Arc::new(Mutex::new(l))),
                        Err(e) => tracing::warn!(error = %e, "outbox relay: LISTEN failed; polling only"),
                    }
                }
            }
            Ok(true) => {}
            Ok(false) => {
                if state.leader {
                    tracing::warn!(holder = %a.holder, "outbox relay lease lost; standing by");
                }
                state.leader = false;
                state.listener = None;
                metrics::gauge!("eventra_relay_active").set(0.0);
                myself.send_after(a.lease_ttl / 3, || RelayMsg::Tick);
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(error = %e, "outbox relay: cannot reach the database for the lease");
                myself.send_after(a.lease_ttl / 3, || RelayMsg::Tick);
                return Ok(());
            }
        }
        metrics::gauge!("eventra_relay_active").set(1.0);
        // Not cut short by a timer: a database statement cancelled half-way can strand
        // its pooled connection. The bus bounds its own waits (publisher confirms), and
        // the mark is fenced by the lease, so a relay that stalls past its lease marks
        // nothing and the new holder republishes (at-least-once).
        let outcome = relay_once(a).await;
        match outcome {
            Ok(full) => {
                state.backoff.reset();
                record_lag(a).await;
                if !full {
                    prune(state).await;
                }
                if full {
                    myself.send_message(RelayMsg::Tick)?;
                } else {
                    wait_then_tick(myself, state);
                }
            }
            Err(e) => {
                let delay = state.backoff.next_backoff().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %e, retry_in = ?delay, "outbox relay: publishing failed; rows stay pending");
                metrics::counter!("eventra_relay_failures_total").increment(1);
                myself.send_after(delay, || RelayMsg::Tick);
            }
        }
        Ok(())
    }
}

/// Retry delays after broker errors, kept below a third of the lease (jitter included)
/// so the active relay renews its lease while it waits.
fn broker_backoff(lease: Duration) -> ExponentialBackoff {
    let max = (lease / 4).min(Duration::from_secs(5));
    ExponentialBackoff {
        initial_interval: Duration::from_millis(100).min(max),
        max_interval: max,
        randomization_factor: 0.25,
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    }
}

async fn listen(url: &str) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
    let mut l = sqlx::postgres::PgListener::connect(url).await?;
    l.listen("eventra_outbox").await?;
    Ok(l)
}

/// Publishes what is pending, batch after batch, for at most a third of the lease
/// (renewed right before); `true` when it stopped with more possibly waiting. Each
/// batch's mark runs while the next batch is read and published (the mark is a commit:
/// measured, a fifth of a round on PostgreSQL), so the next read skips exactly the rows
/// being marked. It skips those rows and no others: a `seq` cut-off would skip a row of
/// a lower `seq` that committed late, and a later row of its tenant could then go out
/// first.
///
/// Bounded by time, not by a number of batches: with a slow broker or database (a
/// backlog on a loaded machine), eight batches outlasted a 2 s lease, the marks were
/// refused by the fence and those batches went out again.
async fn relay_once(a: &RelayArgs) -> Result<bool, String> {
    let renew_at = tokio::time::Instant::now() + a.lease_ttl / 3;
    let mut marking: Vec<i64> = Vec::new();
    loop {
        let (marked, next) = tokio::join!(mark(a, &marking), publish_next(a, &marking));
        marked?;
        marking = next?;
        let full = marking.len() as u32 >= a.batch;
        if !full || tokio::time::Instant::now() >= renew_at {
            mark(a, &marking).await?;
            return Ok(full);
        }
    }
}

/// Reads the next batch (without the rows in `skip`) and publishes it; returns its seqs.
async fn publish_next(a: &RelayArgs, skip: &[i64]) -> Result<Vec<i64>, String> {
    let mut rows = a.store.unpublished_outbox(a.batch + skip.len() as u32).await.map_err(|e| e.to_string())?;
    // `skip` is in `seq` order, as read.
    rows.retain(|r| skip.binary_search(&r.seq).is_err());
    rows.truncate(a.batch as usize);
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    // The stored JSON goes out as it is (consumers parse and validate it).
    let messages: Vec<BusMessage> = rows
        .into_iter()
        .map(|r| BusMessage { id: r.event_id.to_string(), routing_key: r.event_type, body: r.payload.into_bytes() })
        .collect();
    a.bus.publish(&messages).await.map_err(|e| e.to_string())?;
    Ok(seqs)
}

/// Marks published rows, fenced by the lease.
async fn mark(a: &RelayArgs, seqs: &[i64]) -> Result<(), String> {
    if seqs.is_empty() {
        return Ok(());
    }
    let marked = a.store.mark_published(seqs, RELAY_LEASE, &a.holder).await.map_err(|e| e.to_string())?;
    if marked < seqs.len() as u64 {
        // Our lease lapsed meanwhile: the new holder republishes what we could not mark
        // (at-least-once; consumers are idempotent).
        return Err(format!("lease lapsed before {} of {} rows were marked", seqs.len() as u64 - marked, seqs.len()));
    }
    metrics::counter!("eventra_events_published_total").increment(seqs.len() as u64);
    Ok(())
}

/// How often the active relay prunes published rows past their retention.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Most rows one prune deletes (a big backlog of old rows goes over several ticks).
const PRUNE_CHUNK: u32 = 5_000;

/// Deletes published rows older than the retention, at most every [`PRUNE_EVERY`], only
/// on the active relay and only when it has nothing to publish.
async fn prune(state: &mut RelayState) {
    let Some(retention) = state.args.retention else { return };
    if state.last_prune.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
        return;
    }
    state.last_prune = Some(std::time::Instant::now());
    match state.args.store.prune_outbox(retention, PRUNE_CHUNK).await {
        Ok(0) => {}
        Ok(n) => {
            metrics::counter!("eventra_outbox_pruned_total").increment(n);
            tracing::info!(rows = n, ?retention, "pruned published outbox rows past their retention");
            if n == u64::from(PRUNE_CHUNK) {
                // More to go: next idle tick.
                state.last_prune = None;
            }
        }
        Err(e) => tracing::warn!(error = %e, "outbox prune failed; trying again later"),
    }
}

async fn record_lag(a: &RelayArgs) {
    if let Ok(oldest) = a.store.oldest_unpublished().await {
        let lag = oldest.map_or(0.0, |t| (crate::domain::now() - t).num_milliseconds().max(0) as f64 / 1000.0);
        metrics::gauge!("eventra_relay_lag_seconds").set(lag);
    }
}

/// Ticks again on a new-row signal (in-process or `NOTIFY`) or after `poll`, waiting
/// outside the handler so a stop is never held up.
fn wait_then_tick(myself: ActorRef<RelayMsg>, state: &RelayState) {
    let (wake, poll, listener) = (state.args.wake.clone(), state.args.poll, state.listener.clone());
    tokio::spawn(async move {
        let notified = async {
            match listener {
                Some(l) => {
                    let mut l = l.lock().await;
                    tokio::select! {
                        _ = wake.notified() => {}
                        r = l.recv() => {
                            if let Err(e) = r {
                                // The listener reconnects on its next call; until then, poll.
                                tracing::debug!(error = %e, "outbox LISTEN interrupted");
                                std::future::pending::<()>().await;
                            }
                        }
                    }
                }
                None => wake.notified().await,
            }
        };
        let _ = tokio::time::timeout(poll, notified).await;
        let _ = myself.send_message(RelayMsg::Tick);
    });
}
