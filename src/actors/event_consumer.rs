//! A broker consumer (`event-consumer-N` under `pipeline`): turns each delivered domain
//! event into its jobs and acks only once they are durably enqueued.
//!
//! - A message that is not JSON, not a CloudEvent 1.0, or of a type Eventra does not know
//!   is parked at once with the reason (no retry can fix it).
//! - Processing is idempotent by event id: every job's idempotency key derives from the
//!   event (or its user), so a redelivery enqueues nothing new.
//! - If the job queue is down, the delivery is held and the enqueue retried with backoff
//!   until it is back: an outage is backpressure, never a reason to spend the message's
//!   delivery attempts and park valid events.
//! - Bus errors (broker gone) drop the subscription; the actor reconnects with backoff
//!   and resumes. It never crashes for an outage, so the supervisor's restart intensity
//!   is kept for real faults.

use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::Instrument;

use crate::bus::{Consumer, Delivery, EventBus};
use crate::domain::DomainEvent;
use crate::jobs::{jobs_for_event, JobClient};

// Messages

pub enum ConsumerMsg {
    Poll,
}

// State

pub struct ConsumerArgs {
    pub bus: std::sync::Arc<dyn EventBus>,
    pub jobs: JobClient,
    /// The tree name (and the consumer's tag prefix).
    pub name: String,
    pub prefetch: u16,
}

pub struct ConsumerState {
    args: ConsumerArgs,
    subscription: Option<Box<dyn Consumer>>,
    reconnect: ExponentialBackoff,
}

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
        Ok(ConsumerState { args, subscription: None, reconnect: backoff_policy(Duration::from_secs(10)) })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        ConsumerMsg::Poll: Self::Msg,
        state: &mut ConsumerState,
    ) -> Result<(), ActorProcessingErr> {
        if state.subscription.is_none() {
            match state.args.bus.consume(&state.args.name, state.args.prefetch).await {
                Ok(s) => {
                    state.reconnect.reset();
                    state.subscription = Some(s);
                }
                Err(e) => {
                    let delay = state.reconnect.next_backoff().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(consumer = %state.args.name, error = %e, retry_in = ?delay, "cannot subscribe to the event bus");
                    myself.send_after(delay, || ConsumerMsg::Poll);
                    return Ok(());
                }
            }
        }
        let Some(sub) = state.subscription.as_mut() else { return Ok(()) };
        match sub.next(Duration::from_millis(200)).await {
            Ok(None) => {}
            Ok(Some(delivery)) => {
                if let Err(e) = process(&state.args, sub.as_mut(), &delivery).await {
                    tracing::warn!(consumer = %state.args.name, error = %e, "lost the event bus while settling; reconnecting");
                    state.subscription = None;
                }
            }
            Err(e) => {
                tracing::warn!(consumer = %state.args.name, error = %e, "event bus subscription failed; reconnecting");
                state.subscription = None;
            }
        }
        myself.send_message(ConsumerMsg::Poll)?;
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

/// Why a message can never be processed, if so.
fn validate(body: &[u8]) -> Result<DomainEvent, String> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    match value.get("specversion").and_then(|v| v.as_str()) {
        Some("1.0") => {}
        Some(other) => return Err(format!("not a CloudEvent 1.0: specversion {other:?}")),
        None => return Err("not a CloudEvent: no specversion".into()),
    }
    serde_json::from_value(value).map_err(|e| format!("not an Eventra domain event (unknown type or bad fields): {e}"))
}

async fn process(args: &ConsumerArgs, sub: &mut dyn Consumer, d: &Delivery) -> Result<(), crate::bus::BusError> {
    let event = match validate(&d.message.body) {
        Ok(e) => e,
        Err(reason) => {
            tracing::warn!(message_id = %d.message.id, %reason, "parking an invalid message");
            metrics::counter!("eventra_events_parked_total").increment(1);
            return sub.park(d, &reason).await;
        }
    };
    let span = tracing::info_span!("event", event_id = %event.id, tenant_id = %event.tenantid,
        correlation_id = %event.correlationid, r#type = event.event_type.as_str());
    enqueue_then_ack(args, sub, d, &event).instrument(span).await
}

async fn enqueue_then_ack(
    args: &ConsumerArgs,
    sub: &mut dyn Consumer,
    d: &Delivery,
    event: &DomainEvent,
) -> Result<(), crate::bus::BusError> {
    let mut retry = backoff_policy(Duration::from_secs(5));
    for job in jobs_for_event(event) {
        loop {
            match args.jobs.enqueue(job.clone()).await {
                Ok(_) => break,
                Err(e) => {
                    let delay = retry.next_backoff().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = %e, retry_in = ?delay, "job queue unavailable; holding the event");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
    match sub.ack(d).await {
        // Held past the bus's visibility: it was handed to another consumer, which will
        // find its jobs already enqueued. Not a reason to drop the subscription.
        Err(crate::bus::BusError::UnknownDelivery(tag)) => {
            tracing::warn!(tag, "delivery reclaimed by the bus before the ack; another consumer has it");
            return Ok(());
        }
        other => other?,
    }
    metrics::counter!("eventra_events_consumed_total", "type" => event.event_type.as_str()).increment(1);
    Ok(())
}
