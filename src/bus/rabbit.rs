//! The production event bus on RabbitMQ (lapin, rustls).
//!
//! ## Design note: topology (declared idempotently at connect, names under the namespace)
//! - `{ns}.events`: durable topic exchange; routing key = event type;
//! - `{ns}.events.work`: durable **quorum** queue bound with `#`, with
//!   `x-delivery-limit` (a message returned `max_deliveries - 1` times is dead-lettered
//!   on its next return), `x-dead-letter-exchange = {ns}.events.dlx` and at-least-once
//!   dead-lettering (`x-dead-letter-strategy`, which needs `x-overflow = reject-publish`);
//! - `{ns}.events.dlx` (fanout) → `{ns}.events.dlq`: durable classic queue of parked
//!   messages (peeking must not count deliveries against them).
//!
//! Messages are persistent, `content-type: application/cloudevents+json`, message id =
//! event id. Publishing waits for publisher confirms and fails on a nack or an
//! unroutable (mandatory) message. A consumer parks a message by publishing a copy to
//! the DLX with its reason (`x-eventra-reason`), confirmed, and only then acking the
//! original: at-least-once into the DLQ, never lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::Acker;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use super::{BusConfig, BusError, BusMessage, BusResult, Consumer, Delivery, EventBus, Parked};

const CONTENT_TYPE: &str = "application/cloudevents+json";
const REASON_HEADER: &str = "x-eventra-reason";
/// Our own copy of the delivery count on parked messages (the broker's
/// `x-delivery-count` changes when the DLQ itself redelivers).
const COUNT_HEADER: &str = "x-eventra-deliveries";

/// The names of one deployment's topology.
#[derive(Debug, Clone)]
struct Names {
    exchange: String,
    work: String,
    dlx: String,
    dlq: String,
}

impl Names {
    fn new(ns: &str) -> Self {
        Names {
            exchange: format!("{ns}.events"),
            work: format!("{ns}.events.work"),
            dlx: format!("{ns}.events.dlx"),
            dlq: format!("{ns}.events.dlq"),
        }
    }
}

pub struct RabbitBus {
    url: String,
    /// The live connection and its publishing channel (confirm mode; one publisher at a
    /// time keeps confirms and their messages paired). `None` after the broker went
    /// away: the next call reconnects and declares the topology again.
    live: Mutex<Option<Live>>,
    names: Names,
    config: BusConfig,
}

struct Live {
    connection: Arc<Connection>,
    publisher: Channel,
}

fn short(s: &str) -> ShortString {
    ShortString::from(s)
}

fn quorum_args(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(short("x-queue-type"), AMQPValue::LongString(LongString::from("quorum")));
    for (k, v) in extra {
        args.insert(short(k), v.clone());
    }
    args
}

fn properties(message_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(short(CONTENT_TYPE))
        .with_message_id(short(message_id))
}

/// An integer header, whatever integer type the broker chose.
fn int_header(headers: Option<&FieldTable>, name: &str) -> Option<i64> {
    match headers?.inner().get(name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

fn string_header(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Why RabbitMQ dead-lettered a message (the first `x-death` entry's reason).
fn death_reason(headers: Option<&FieldTable>) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = headers?.inner().get("x-death")? else { return None };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else { return None };
    string_header(Some(first), "reason")
}

fn message_of(d: &lapin::message::Delivery) -> BusMessage {
    BusMessage {
        id: d.properties.message_id().as_ref().map(|s| s.as_str().to_owned()).unwrap_or_default(),
        routing_key: d.routing_key.as_str().to_owned(),
        body: d.data.clone(),
    }
}

/// Delivery count of a delivery: RabbitMQ's quorum queues count returns in
/// `x-delivery-count` (absent on the first delivery).
fn delivery_count(d: &lapin::message::Delivery) -> u32 {
    let returned = int_header(d.properties.headers().as_ref(), "x-delivery-count").unwrap_or(0);
    u32::try_from(returned.saturating_add(1)).unwrap_or(u32::MAX)
}

/// Longest wait for the broker's confirms of one publish call.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a connection, its channel and the topology declaration.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes every message (pipelined) and checks every confirm: a nack or a returned
/// (unroutable) message is a refusal.
async fn publish_all(channel: &Channel, exchange: &str, messages: &[(BusMessage, BasicProperties)]) -> BusResult<()> {
    // Every publish is started before any is awaited. lapin does a publish's work up to
    // its first await on the first poll (the delivery tag taken, the frames queued on
    // the channel), so polling each once, in order, sends them in this order; awaiting
    // each before starting the next cost a hand-off to lapin's I/O loop per message
    // (measured: 15–60 ms per 500, most of the relay's time).
    type Sending<'a> =
        std::pin::Pin<Box<dyn std::future::Future<Output = lapin::Result<lapin::PublisherConfirm>> + Send + 'a>>;
    let mut sends: Vec<(Sending<'_>, Option<lapin::Result<lapin::PublisherConfirm>>)> = messages
        .iter()
        .map(|(m, props)| {
            let send: Sending<'_> = Box::pin(channel.basic_publish(
                short(exchange),
                short(&m.routing_key),
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                &m.body,
                props.clone(),
            ));
            (send, None)
        })
        .collect();
    std::future::poll_fn(|cx| {
        for (send, done) in sends.iter_mut() {
            if let std::task::Poll::Ready(r) = send.as_mut().poll(cx) {
                *done = Some(r);
            }
        }
        std::task::Poll::Ready(())
    })
    .await;
    let mut confirms = Vec::with_capacity(messages.len());
    for ((m, _), (send, done)) in messages.iter().zip(sends) {
        let confirm = match done {
            Some(r) => r?,
            None => send.await?,
        };
        confirms.push((m.id.as_str(), confirm));
    }
    for (id, confirm) in confirms {
        let confirm = confirm.await?;
        if !confirm.is_ack() || confirm.take_message().is_some() {
            return Err(BusError::Refused(id.to_owned()));
        }
    }
    Ok(())
}

/// lapin answers `Ok(false)` when an ack or nack could not be sent (closed channel).
fn settled(done: bool, what: &str) -> BusResult<()> {
    if done {
        Ok(())
    } else {
        Err(BusError::Backend(format!("the {what} could not be sent (channel closed)")))
    }
}

impl RabbitBus {
    /// Connects and declares the topology under `namespace`.
    pub async fn connect(url: &str, namespace: &str, config: BusConfig) -> BusResult<Self> {
        let bus = Self::lazy(url, namespace, config);
        bus.connection().await?;
        Ok(bus)
    }

    /// A bus that connects on first use (a process must start, and its API serve, while
    /// the broker is down; the relay and consumers retry until it is back).
    pub fn lazy(url: &str, namespace: &str, config: BusConfig) -> Self {
        RabbitBus { url: url.to_owned(), live: Mutex::new(None), names: Names::new(namespace), config }
    }

    /// The live connection, reconnecting (and declaring the topology) if the broker
    /// dropped the last one.
    async fn connection(&self) -> BusResult<Arc<Connection>> {
        let mut live = self.live.lock().await;
        if let Some(l) = live.as_ref().filter(|l| l.connection.status().connected() && l.publisher.status().connected())
        {
            return Ok(l.connection.clone());
        }
        // Named after the namespace, so operators (and tests) can tell connections apart.
        let props =
            ConnectionProperties::default().with_connection_name(LongString::from(self.names.exchange.as_str()));
        // Bounded: a broker that accepts TCP but never answers (a partition, a node that
        // is starting) must not hold every publisher behind this lock.
        let setup = async {
            let connection = Arc::new(Connection::connect(&self.url, props).await?);
            let publisher = connection.create_channel().await?;
            self.declare(&publisher).await?;
            publisher.confirm_select(ConfirmSelectOptions::default()).await?;
            BusResult::Ok((connection, publisher))
        };
        let (connection, publisher) = tokio::time::timeout(CONNECT_TIMEOUT, setup)
            .await
            .map_err(|_| BusError::Backend(format!("RabbitMQ did not answer within {CONNECT_TIMEOUT:?}")))??;
        *live = Some(Live { connection: connection.clone(), publisher });
        tracing::info!(exchange = %self.names.exchange, "connected to RabbitMQ; topology declared");
        Ok(connection)
    }

    async fn declare(&self, channel: &Channel) -> BusResult<()> {
        let names = &self.names;
        let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        channel.exchange_declare(short(&names.exchange), ExchangeKind::Topic, durable, FieldTable::default()).await?;
        channel.exchange_declare(short(&names.dlx), ExchangeKind::Fanout, durable, FieldTable::default()).await?;
        let queue = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        // A classic queue: peeking (get, then return) must not count as deliveries, and no
        // broker default delivery limit may ever drop a parked message.
        let mut dlq_args = FieldTable::default();
        dlq_args.insert(short("x-queue-type"), AMQPValue::LongString(LongString::from("classic")));
        channel.queue_declare(short(&names.dlq), queue, dlq_args).await?;
        channel
            .queue_bind(
                short(&names.dlq),
                short(&names.dlx),
                short(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let work_args = quorum_args(&[
            ("x-delivery-limit", AMQPValue::LongLongInt(i64::from(self.config.max_deliveries.max(1) - 1))),
            ("x-dead-letter-exchange", AMQPValue::LongString(LongString::from(names.dlx.as_str()))),
            ("x-dead-letter-strategy", AMQPValue::LongString(LongString::from("at-least-once"))),
            ("x-overflow", AMQPValue::LongString(LongString::from("reject-publish"))),
        ]);
        channel.queue_declare(short(&names.work), queue, work_args).await?;
        channel
            .queue_bind(
                short(&names.work),
                short(&names.exchange),
                short("#"),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Publishes on the confirm channel and waits (bounded) for every confirm; a failure
    /// drops the connection so the next call starts from a fresh one. The lock is held
    /// only to pick the channel, never across the broker's answers.
    async fn publish_confirmed(&self, exchange: &str, messages: &[(BusMessage, BasicProperties)]) -> BusResult<()> {
        let publisher = self.publisher().await?;
        let result = match tokio::time::timeout(CONFIRM_TIMEOUT, publish_all(&publisher, exchange, messages)).await {
            Ok(r) => r,
            Err(_) => Err(BusError::Backend(format!("no publisher confirm within {CONFIRM_TIMEOUT:?}"))),
        };
        if matches!(result, Err(BusError::Backend(_))) {
            let mut live = self.live.lock().await;
            if live.as_ref().is_some_and(|l| l.publisher.id() == publisher.id()) {
                *live = None;
            }
        }
        result
    }

    /// The live publishing channel (connecting if need be).
    async fn publisher(&self) -> BusResult<Channel> {
        self.connection().await?;
        let live = self.live.lock().await;
        live.as_ref().map(|l| l.publisher.clone()).ok_or_else(|| BusError::Backend("not connected".into()))
    }

    /// Deletes this namespace's queues and exchanges (tests; decommissioning).
    pub async fn delete_topology(&self) -> BusResult<()> {
        let channel = self.connection().await?.create_channel().await?;
        for q in [&self.names.work, &self.names.dlq] {
            channel.queue_delete(short(q), QueueDeleteOptions::default()).await?;
        }
        for x in [&self.names.exchange, &self.names.dlx] {
            channel.exchange_delete(short(x), lapin::options::ExchangeDeleteOptions::default()).await?;
        }
        Ok(())
    }

    /// Takes up to `limit` messages off the DLQ unacked (they stay on the queue), on a
    /// channel of their own; the caller settles them, then closes the channel.
    /// The parked message with this id, taken (unacked) from the DLQ on `channel`; every
    /// other message peeked on the way goes back when the channel closes.
    async fn find_in_dlq(&self, channel: &Channel, id: &str) -> BusResult<Option<lapin::message::Delivery>> {
        loop {
            let batch = self.peek_dlq(channel, 100).await?;
            if batch.is_empty() {
                return Ok(None);
            }
            if let Some(d) = batch.into_iter().find(|d| message_of(d).id == id) {
                return Ok(Some(d));
            }
        }
    }

    async fn peek_dlq(&self, channel: &Channel, limit: usize) -> BusResult<Vec<lapin::message::Delivery>> {
        let mut out = Vec::new();
        while out.len() < limit {
            match channel.basic_get(short(&self.names.dlq), BasicGetOptions { no_ack: false }).await? {
                Some(got) => out.push(got.delivery),
                None => break,
            }
        }
        Ok(out)
    }
}

/// A DLQ message as the API shows it. A consumer-parked message carries its reason and
/// delivery count; one the broker dead-lettered at the limit was delivered exactly
/// `max_deliveries` times.
fn parked_of(d: &lapin::message::Delivery, max_deliveries: u32) -> Parked {
    let headers = d.properties.headers().as_ref();
    let (reason, delivery_count) = match string_header(headers, REASON_HEADER) {
        Some(reason) => (reason, int_header(headers, COUNT_HEADER).unwrap_or(1)),
        None => match death_reason(headers).as_deref() {
            Some("delivery_limit") => ("delivery limit reached".to_owned(), i64::from(max_deliveries)),
            Some(other) => (format!("dead-lettered by the broker: {other}"), 1),
            None => ("unknown".to_owned(), 1),
        },
    };
    Parked { message: message_of(d), reason, delivery_count: u32::try_from(delivery_count.max(1)).unwrap_or(u32::MAX) }
}

#[async_trait]
impl EventBus for RabbitBus {
    fn backend(&self) -> &'static str {
        "rabbitmq"
    }

    async fn ping(&self) -> BusResult<()> {
        self.connection().await.map(|_| ())
    }

    async fn publish(&self, messages: &[BusMessage]) -> BusResult<()> {
        let batch: Vec<(BusMessage, BasicProperties)> =
            messages.iter().map(|m| (m.clone(), properties(&m.id))).collect();
        self.publish_confirmed(&self.names.exchange, &batch).await
    }

    async fn consume(&self, name: &str, prefetch: u16) -> BusResult<Box<dyn Consumer>> {
        let connection = self.connection().await?;
        let channel = connection.create_channel().await?;
        channel.basic_qos(prefetch.max(1), BasicQosOptions::default()).await?;
        let tag = format!("{name}-{}", uuid::Uuid::new_v4().simple());
        let consumer = channel
            .basic_consume(short(&self.names.work), short(&tag), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        let parking = connection.create_channel().await?;
        parking.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Box::new(RabbitConsumer {
            channel,
            tag,
            parking,
            consumer,
            dlx: self.names.dlx.clone(),
            held: HashMap::new(),
        }))
    }

    async fn parked(&self, limit: usize) -> BusResult<Vec<Parked>> {
        let channel = self.connection().await?.create_channel().await?;
        let got = self.peek_dlq(&channel, limit).await?;
        let parked = got.iter().map(|d| parked_of(d, self.config.max_deliveries)).collect();
        // Closing the channel returns every unacked message to the DLQ.
        channel.close(200, short("peeked")).await?;
        Ok(parked)
    }

    async fn replay(&self, id: &str) -> BusResult<bool> {
        let channel = self.connection().await?.create_channel().await?;
        let found = self.find_in_dlq(&channel, id).await?;
        if let Some(d) = &found {
            let m = message_of(d);
            let props = properties(&m.id);
            self.publish_confirmed(&self.names.exchange, &[(m, props)]).await?;
            settled(d.acker.ack(BasicAckOptions::default()).await?, "ack of the replayed message")?;
        }
        channel.close(200, short("replayed")).await?;
        Ok(found.is_some())
    }

    async fn discard(&self, id: &str) -> BusResult<Option<BusMessage>> {
        let channel = self.connection().await?.create_channel().await?;
        let found = self.find_in_dlq(&channel, id).await?;
        if let Some(d) = &found {
            settled(d.acker.ack(BasicAckOptions::default()).await?, "ack of the discarded message")?;
        }
        channel.close(200, short("discarded")).await?;
        Ok(found.as_ref().map(message_of))
    }
}

pub struct RabbitConsumer {
    /// Kept for the consumer's lifetime; dropping the last handle closes the channel,
    /// which returns unsettled deliveries to the queue.
    channel: Channel,
    tag: String,
    /// Confirm-mode channel for parking copies into the DLX.
    parking: Channel,
    consumer: lapin::Consumer,
    dlx: String,
    held: HashMap<u64, (Acker, BusMessage, u32)>,
}

#[async_trait]
impl Consumer for RabbitConsumer {
    async fn next(&mut self, wait: Duration) -> BusResult<Option<Delivery>> {
        match tokio::time::timeout(wait, self.consumer.next()).await {
            Err(_) => Ok(None),
            Ok(None) => Err(BusError::Backend("the broker cancelled the consumer".into())),
            Ok(Some(Err(e))) => Err(e.into()),
            Ok(Some(Ok(d))) => {
                let message = message_of(&d);
                let count = delivery_count(&d);
                self.held.insert(d.delivery_tag, (d.acker, message.clone(), count));
                Ok(Some(Delivery { message, delivery_count: count, tag: d.delivery_tag }))
            }
        }
    }

    async fn ack(&mut self, delivery: &Delivery) -> BusResult<()> {
        let (acker, _, _) = self.held.remove(&delivery.tag).ok_or(BusError::UnknownDelivery(delivery.tag))?;
        settled(acker.ack(BasicAckOptions::default()).await?, "ack")
    }

    /// One `basic.ack` with `multiple` for the highest tag when every held delivery up
    /// to it is in the batch (the usual case: batches are taken and settled in order),
    /// else one ack each.
    async fn ack_many(&mut self, deliveries: &[Delivery]) -> BusResult<()> {
        let tags: std::collections::HashSet<u64> =
            deliveries.iter().map(|d| d.tag).filter(|t| self.held.contains_key(t)).collect();
        let Some(&top) = tags.iter().max() else { return Ok(()) };
        let covered = self.held.keys().filter(|t| **t <= top).all(|t| tags.contains(t));
        if !covered || tags.len() == 1 {
            for d in deliveries.iter().filter(|d| tags.contains(&d.tag)) {
                self.ack(d).await?;
            }
            return Ok(());
        }
        let Some((acker, _, _)) = self.held.remove(&top) else { return Ok(()) };
        for t in &tags {
            self.held.remove(t);
        }
        settled(acker.ack(BasicAckOptions { multiple: true }).await?, "multiple ack")
    }

    async fn cancel(&mut self) -> BusResult<()> {
        self.channel.basic_cancel(short(&self.tag), lapin::options::BasicCancelOptions::default()).await?;
        Ok(())
    }

    fn held(&self) -> usize {
        self.held.len()
    }

    fn unsettled(&self) -> Vec<Delivery> {
        let mut all: Vec<Delivery> = self
            .held
            .iter()
            .map(|(tag, (_, message, count))| Delivery { message: message.clone(), delivery_count: *count, tag: *tag })
            .collect();
        all.sort_by_key(|d| d.tag);
        all
    }

    async fn requeue(&mut self, delivery: &Delivery) -> BusResult<()> {
        let (acker, _, _) = self.held.remove(&delivery.tag).ok_or(BusError::UnknownDelivery(delivery.tag))?;
        settled(acker.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await?, "nack")
    }

    async fn park(&mut self, delivery: &Delivery, reason: &str) -> BusResult<()> {
        let (acker, message, count) = self.held.remove(&delivery.tag).ok_or(BusError::UnknownDelivery(delivery.tag))?;
        let mut headers = FieldTable::default();
        headers.insert(short(REASON_HEADER), AMQPValue::LongString(LongString::from(reason)));
        headers.insert(short(COUNT_HEADER), AMQPValue::LongLongInt(i64::from(count)));
        let props = properties(&message.id).with_headers(headers);
        // The copy is safe in the DLQ before the original goes: at-least-once.
        match tokio::time::timeout(CONFIRM_TIMEOUT, publish_all(&self.parking, &self.dlx, &[(message, props)])).await {
            Ok(r) => r?,
            Err(_) => return Err(BusError::Backend("no confirm for the parked copy".into())),
        }
        settled(acker.ack(BasicAckOptions::default()).await?, "ack of the parked original")
    }
}
