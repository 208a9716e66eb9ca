//! A broker consumer (`event-consumer-N` under `pipeline`): turns delivered domain events
//! into their jobs and acks only once they are durably enqueued.
//!
//! - **Batches.** It takes every delivery that is there (up to `prefetch`), enqueues all
//!   their jobs in one round trip, then acks them together (RabbitMQ: one `multiple`
//!   ack), so a busy bus costs a few round trips per hundred events, not per event.
//! - **Invalid messages** (not JSON, not a CloudEvent 1.0, an unknown type, or `data`
//!   without the shape its type promises) are parked at once with the reason; no retry
//!   can fix them. So is a message whose handling panics.
//! - **The audit log is written here**, before the batch's jobs are enqueued: one
//!   multi-row insert a batch (idempotent by event id; the analytics are counted in its
//!   transaction), and one `audit` job a batch makes the entries searchable. A job per
//!   event only for an audit entry was most of the job system's load under custom
//!   events. If the database refuses the write, the batch is held, as when the job queue
//!   is down.
//! - **Idempotent** by event id: every job's idempotency key derives from the event (or
//!   its user, or the batch), so a redelivery enqueues nothing new.
//! - **Backpressure.** If the job queue is down, the batch is held and the enqueue
//!   retried with backoff (by a timer message, never a sleep in the handler) until it is
//!   back: an outage never spends a valid event's delivery attempts.
//! - **Restarts return nothing.** The subscription and the batch in hand live in a
//!   [`SubscriptionSlot`] outside the actor: a killed or crashed consumer's successor
//!   takes them over, so its unacked deliveries are not handed back to the broker (where
//!   every return counts toward the delivery limit). A clean stop cancels the
//!   subscription and settles what it holds first.
//! - **Bus errors** (broker gone) drop the subscription; the actor subscribes again with
//!   backoff. It never crashes for an outage, so the supervisor's restart intensity is
//!   kept for real faults.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::Mutex;

use crate::bus::{BusError, Consumer, Delivery, EventBus};
use crate::domain::{AuditEntry, DomainEvent};
use crate::jobs::kinds::AuditArgs;
use crate::jobs::{jobs_for_event, JobClient, NewJob};

// Messages

pub enum ConsumerMsg {
    /// Settle the batch in hand, or take the next one.
    Poll,
}

// State

/// What outlives a consumer actor: its subscription and the deliveries it took and has
/// not settled yet.
#[derive(Default)]
pub struct Held {
    subscription: Option<Box<dyn Consumer>>,
    /// Taken from the subscription, not settled: retried first by whoever runs next.
    in_hand: Vec<Delivery>,
}

/// Shared by every incarnation of one consumer (created with its child spec).
pub type SubscriptionSlot = Arc<Mutex<Held>>;

pub struct ConsumerArgs {
    pub bus: Arc<dyn EventBus>,
    pub jobs: JobClient,
    /// Where the audit log is written and the tenants' webhook endpoints are read.
    pub store: Arc<dyn crate::store::Store>,
    /// The tree name (and the consumer's tag prefix).
    pub name: String,
    pub prefetch: u16,
    pub slot: SubscriptionSlot,
}

pub struct ConsumerState {
    args: ConsumerArgs,
    /// Waits between subscription attempts while the bus is unreachable.
    reconnect: ExponentialBackoff,
    /// Waits between enqueue attempts while the job queue is unreachable.
    hold: ExponentialBackoff,
}

/// How long a poll waits for the first delivery of a batch.
const POLL_WAIT: Duration = Duration::from_millis(200);
/// How long a clean stop may spend settling what the consumer holds.
const DRAIN: Duration = Duration::from_secs(3);

// Handling

pub struct EventConsumer;

impl Actor for EventConsumer {
    type Msg = ConsumerMsg;
    type State = ConsumerState;
    type Arguments = ConsumerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ConsumerArgs,
    ) -> Result<ConsumerState, ActorProcessingErr> {
        myself.send_message(ConsumerMsg::Poll)?;
        Ok(ConsumerState {
            args,
            reconnect: backoff_policy(Duration::from_secs(10)),
            hold: backoff_policy(Duration::from_secs(5)),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        ConsumerMsg::Poll: Self::Msg,
        state: &mut ConsumerState,
    ) -> Result<(), ActorProcessingErr> {
        let slot = state.args.slot.clone();
        let mut held = slot.lock().await;
        if held.subscription.is_none() {
            match state.args.bus.consume(&state.args.name, state.args.prefetch).await {
                Ok(s) => {
                    state.reconnect.reset();
                    held.subscription = Some(s);
                }
                Err(e) => {
                    let delay = state.reconnect.next_backoff().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(consumer = %state.args.name, error = %e, retry_in = ?delay, "cannot subscribe to the event bus");
                    myself.send_after(delay, || ConsumerMsg::Poll);
                    return Ok(());
                }
            }
        }
        match step(&state.args, &mut held).await {
            Ok(Step::Done) => {
                state.hold.reset();
                myself.send_message(ConsumerMsg::Poll)?;
            }
            Ok(Step::QueueDown(e)) => {
                let delay = state.hold.next_backoff().unwrap_or(Duration::from_secs(5));
                tracing::warn!(consumer = %state.args.name, error = %e, held = held.in_hand.len(), retry_in = ?delay,
                    "cannot settle the batch (job queue or database unavailable); holding the events");
                myself.send_after(delay, || ConsumerMsg::Poll);
            }
            Err(e) => {
                tracing::warn!(consumer = %state.args.name, error = %e, "event bus subscription failed; subscribing again");
                // Deliveries in hand went back to the broker with the subscription.
                held.subscription = None;
                held.in_hand.clear();
                myself.send_message(ConsumerMsg::Poll)?;
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut ConsumerState,
    ) -> Result<(), ActorProcessingErr> {
        // A clean stop (shutdown, a one-for-all restart): stop new deliveries, settle what
        // is held, and only then let the subscription go, so nothing returns to the broker.
        let mut held = state.args.slot.lock().await;
        let Some(sub) = held.subscription.as_mut() else { return Ok(()) };
        if let Err(e) = sub.cancel().await {
            tracing::debug!(consumer = %state.args.name, error = %e, "cancel before stop failed");
        }
        let drained = tokio::time::timeout(DRAIN, async {
            loop {
                let outcome = step(&state.args, &mut held).await;
                let idle = held.in_hand.is_empty() && held.subscription.as_ref().is_none_or(|s| s.held() == 0);
                match outcome {
                    Ok(Step::Done) if idle => return true,
                    Ok(Step::Done) => {}
                    Ok(Step::QueueDown(_)) => return false,
                    // A cancelled subscription ends once its buffer is empty.
                    Err(_) => return idle,
                }
            }
        })
        .await
        .unwrap_or(false);
        if !drained {
            tracing::warn!(consumer = %state.args.name, held = held.in_hand.len(),
                "stopping with deliveries unsettled; the broker redelivers them");
        }
        held.subscription = None;
        held.in_hand.clear();
        Ok(())
    }
}

fn backoff_policy(max: Duration) -> ExponentialBackoff {
    ExponentialBackoff {
        initial_interval: Duration::from_millis(100),
        max_interval: max,
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    }
}

/// Why a message can never be processed, if so; else its event and its jobs.
fn validate(body: &[u8]) -> Result<(DomainEvent, Vec<NewJob>), String> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    match value.get("specversion").and_then(|v| v.as_str()) {
        Some("1.0") => {}
        Some(other) => return Err(format!("not a CloudEvent 1.0: specversion {other:?}")),
        None => return Err("not a CloudEvent: no specversion".into()),
    }
    let event: DomainEvent = serde_json::from_value(value)
        .map_err(|e| format!("not an Eventra domain event (unknown type or bad fields): {e}"))?;
    let jobs = jobs_for_event(&event)?;
    Ok((event, jobs))
}

/// [`validate`], with a panic turned into a reason to park (it would recur every time).
fn checked(body: &[u8]) -> Result<(DomainEvent, Vec<NewJob>), String> {
    std::panic::catch_unwind(AssertUnwindSafe(|| validate(body)))
        .unwrap_or_else(|_| Err("handling this message panicked".to_owned()))
}

enum Step {
    /// The batch (if any) is settled.
    Done,
    /// The job queue refused the batch; it stays in hand.
    QueueDown(String),
}

/// Settles the batch in hand, or takes the next one and settles it: park the invalid,
/// enqueue the jobs of the rest in one call, ack them together.
async fn step(args: &ConsumerArgs, held: &mut Held) -> Result<Step, BusError> {
    let Held { subscription, in_hand } = held;
    let Some(sub) = subscription.as_mut() else { return Ok(Step::Done) };
    if in_hand.is_empty() {
        // Received but in no one's hand: a predecessor killed inside `next_batch`.
        *in_hand = sub.unsettled();
        if !in_hand.is_empty() {
            tracing::info!(consumer = %args.name, deliveries = in_hand.len(),
                "settling deliveries a killed predecessor had received");
        }
    }
    if in_hand.is_empty() {
        *in_hand = sub.next_batch(usize::from(args.prefetch.max(1)), POLL_WAIT).await?;
        if in_hand.is_empty() {
            return Ok(Step::Done);
        }
    }
    let mut valid = Vec::with_capacity(in_hand.len());
    let mut jobs = Vec::new();
    let mut events = Vec::new();
    for d in in_hand.iter() {
        match checked(&d.message.body) {
            Ok((event, event_jobs)) => {
                jobs.extend(event_jobs);
                events.push(event);
                valid.push(d.clone());
            }
            Err(reason) => {
                tracing::warn!(consumer = %args.name, message_id = %d.message.id, %reason, "parking an invalid message");
                metrics::counter!("eventra_events_parked_total").increment(1);
                match sub.park(d, &reason).await {
                    // Settled before a restart: nothing left to do.
                    Ok(()) | Err(BusError::UnknownDelivery(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    // What remains in hand is what still needs its jobs.
    *in_hand = valid;
    // The audit log: written here, one multi-row insert a batch (idempotent by event id,
    // and counted in the analytics in the same transaction), and indexed by ONE job.
    if !events.is_empty() {
        let entries: Vec<AuditEntry> = events.iter().map(AuditEntry::from_event).collect();
        if let Err(e) = args.store.append_audit_many(&entries).await {
            // Acking without the entries would lose them: hold the batch.
            return Ok(Step::QueueDown(format!("audit log unwritable: {e}")));
        }
        jobs.extend(AuditArgs::job(&entries));
    }
    // Webhooks: one delivery job per (subscribed endpoint, event); one query a batch.
    if !events.is_empty() {
        let mut tenants: Vec<uuid::Uuid> = events.iter().map(|e| e.tenantid).collect();
        tenants.sort_unstable();
        tenants.dedup();
        match args.store.webhook_targets(&tenants).await {
            Ok(endpoints) => {
                for event in &events {
                    for e in
                        endpoints.iter().filter(|e| e.tenant_id == event.tenantid && e.wants(event.event_type.as_str()))
                    {
                        jobs.push(crate::webhooks::delivery::DeliveryArgs::job(e.id, event));
                    }
                }
            }
            // Acking without the deliveries would lose them: hold the batch, as when the
            // job queue is down.
            Err(e) => return Ok(Step::QueueDown(format!("webhook endpoints unreadable: {e}"))),
        }
    }
    if !jobs.is_empty() {
        if let Err(e) = args.jobs.enqueue_many(jobs).await {
            return Ok(Step::QueueDown(e.to_string()));
        }
    }
    sub.ack_many(in_hand).await?;
    let now = chrono::Utc::now();
    for event in &events {
        tracing::debug!(event_id = %event.id, tenant_id = %event.tenantid, correlation_id = %event.correlationid,
            r#type = event.event_type.as_str(), "event consumed");
        metrics::counter!("eventra_events_consumed_total", "type" => event.event_type.as_str().to_owned()).increment(1);
        // Commit → consumed (a custom event's `time` is the client's: its id tells).
        let latency = (now - event.committed_at()).to_std().unwrap_or_default().as_secs_f64();
        metrics::histogram!("eventra_event_latency_seconds", "type" => event.event_type.as_str().to_owned())
            .record(latency);
    }
    in_hand.clear();
    Ok(Step::Done)
}
