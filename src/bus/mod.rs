//! The event bus: committed domain events travel from the outbox relay to the broker
//! consumers over it. One [`EventBus`] trait, two backends with the same semantics:
//! RabbitMQ via lapin ([`RabbitBus`]) in production, durable tables in the SQLite
//! database ([`SqliteBus`]) by default. One conformance suite runs against both.
//!
//! Semantics every backend keeps:
//! - `publish` returns only when the bus holds every message durably (publisher
//!   confirms; a committed SQLite transaction);
//! - a [`Consumer`] gets each message with its delivery count (1 on the first
//!   delivery) and must `ack` it, `requeue` it (another try later) or `park` it with a
//!   reason (invalid message: straight to the dead-letter queue);
//! - a message delivered `max_deliveries` times without an ack is parked by the bus
//!   itself (the delivery limit), so a poison message cannot loop forever;
//! - a consumer that goes away with unacked messages gets them redelivered to others;
//! - parked messages can be listed (with reason and delivery count) and replayed.
//!
//! Users: the outbox relay publishes (`actors::outbox_relay`), the broker consumers
//! consume (`actors::event_consumer`), `/v1/admin/dlq` lists and replays parked messages.

mod rabbit;
mod sqlite;

use std::time::Duration;

use async_trait::async_trait;

pub use rabbit::RabbitBus;
pub use sqlite::SqliteBus;

/// A message as published: a CloudEvents JSON body, its event id and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusMessage {
    /// The event id: the message id, for idempotent consumers and replays.
    pub id: String,
    /// The event type (`user.created`…): the topic routing key.
    pub routing_key: String,
    pub body: Vec<u8>,
}

/// A message handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub message: BusMessage,
    /// 1 on the first delivery, +1 on each redelivery.
    pub delivery_count: u32,
    /// The consumer's handle for ack/requeue/park.
    pub tag: u64,
}

/// A message in the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    pub message: BusMessage,
    /// Why: the consumer's reason, or `delivery limit reached`.
    pub reason: String,
    pub delivery_count: u32,
}

/// Limits of a bus deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusConfig {
    /// Deliveries after which an unacked message is parked.
    pub max_deliveries: u32,
    /// Embedded bus: how long a delivery stays with a consumer that neither acks nor
    /// requeues it before it goes back to the queue (a dead consumer). RabbitMQ does this
    /// when the consumer's channel closes.
    pub visibility: Duration,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig { max_deliveries: 20, visibility: Duration::from_secs(60) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("event bus: {0}")]
    Backend(String),
    #[error("the broker refused message {0} (nack or unroutable)")]
    Refused(String),
    #[error("delivery {0} is not held by this consumer")]
    UnknownDelivery(u64),
}

impl From<sqlx::Error> for BusError {
    fn from(e: sqlx::Error) -> Self {
        BusError::Backend(e.to_string())
    }
}

impl From<lapin::Error> for BusError {
    fn from(e: lapin::Error) -> Self {
        BusError::Backend(e.to_string())
    }
}

pub type BusResult<T> = Result<T, BusError>;

#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// `rabbitmq` or `sqlite`.
    fn backend(&self) -> &'static str;
    /// Answers when the bus does (connecting if need be).
    async fn ping(&self) -> BusResult<()>;
    /// Publishes in order; returns once the bus confirmed every message.
    async fn publish(&self, messages: &[BusMessage]) -> BusResult<()>;
    /// A consumer named `name` holding at most `prefetch` unsettled deliveries.
    async fn consume(&self, name: &str, prefetch: u16) -> BusResult<Box<dyn Consumer>>;
    /// Up to `limit` parked messages, oldest first, left in place.
    async fn parked(&self, limit: usize) -> BusResult<Vec<Parked>>;
    /// Puts the parked message with this id back on the bus; `false` if none.
    async fn replay(&self, id: &str) -> BusResult<bool>;
    /// Drops the parked message with this id for good, and returns it; `None` if none.
    async fn discard(&self, id: &str) -> BusResult<Option<BusMessage>>;
}

#[async_trait]
pub trait Consumer: Send {
    /// The next delivery, waiting up to `wait`; `None` when nothing came.
    async fn next(&mut self, wait: Duration) -> BusResult<Option<Delivery>>;
    /// Up to `max` deliveries: waits up to `wait` for the first, then takes whatever
    /// else has already arrived, without waiting again.
    async fn next_batch(&mut self, max: usize, wait: Duration) -> BusResult<Vec<Delivery>> {
        let mut batch = Vec::new();
        let Some(first) = self.next(wait).await? else { return Ok(batch) };
        batch.push(first);
        while batch.len() < max {
            match self.next(Duration::ZERO).await? {
                Some(d) => batch.push(d),
                None => break,
            }
        }
        Ok(batch)
    }
    /// Done with it: it will not be delivered again.
    async fn ack(&mut self, delivery: &Delivery) -> BusResult<()>;
    /// [`ack`](Consumer::ack) for several deliveries at once (one round trip where the
    /// backend can). Deliveries the bus already took back are skipped: another consumer
    /// has them, and processing is idempotent.
    async fn ack_many(&mut self, deliveries: &[Delivery]) -> BusResult<()> {
        for d in deliveries {
            match self.ack(d).await {
                Ok(()) | Err(BusError::UnknownDelivery(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    /// Every delivery received and not settled, in delivery order. A consumer task
    /// killed while it was taking a batch leaves deliveries that are received but in no
    /// one's hand; the next user of the subscription settles these first (they would
    /// otherwise sit unacked for as long as the subscription lives).
    fn unsettled(&self) -> Vec<Delivery>;
    /// Stops new deliveries (a clean stop): what was delivered stays held until it is
    /// settled, so a drained consumer returns nothing to the queue.
    async fn cancel(&mut self) -> BusResult<()> {
        Ok(())
    }
    /// Deliveries held and not settled yet.
    fn held(&self) -> usize;
    /// Not now: deliver it again (parked instead once it reached the delivery limit).
    async fn requeue(&mut self, delivery: &Delivery) -> BusResult<()>;
    /// Never: straight to the dead-letter queue with `reason`.
    async fn park(&mut self, delivery: &Delivery, reason: &str) -> BusResult<()>;
}
