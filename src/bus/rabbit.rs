//! The production event bus on RabbitMQ (lapin, rustls).
//!
//! ## Design note: topology (declared idempotently at connect, names under the namespace)
//! - `{ns}.events`: durable topic exchange; routing key = event type;
//! - `{ns}.events.work`: durable **quorum** queue bound with `#`, with
//!   `x-delivery-limit` (a message returned `max_deliveries - 1` times is dead-lettered
//!   on its next return), `x-dead-letter-exchange = {ns}.events.dlx` and at-least-once
//!   dead-lettering (`x-dead-letter-strategy`, which needs `x-overflow = reject-publish`);
//! - `{ns}.events.dlx` (fanout) → `{ns}.events.dlq`: durable quorum queue of parked
//!   messages.
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

async fn confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
    id: &str,
) -> BusResult<()> {
    let confirm = channel
        .basic_publish(
            short(exchange),
            short(routing_key),
            BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
            body,
            props,
        )
        .await?
        .await?;
    if !confirm.is_ack() || confirm.take_message().is_some() {
        return Err(BusError::Refused(id.to_owned()));
    }
    Ok(())
}

impl RabbitBus {
    /// Connects and declares the topology under `namespace`.
    pub async fn connect(url: &str, namespace: &str, config: BusConfig) -> BusResult<Self> {
        let bus = RabbitBus { url: url.to_owned(), live: Mutex::new(None), names: Names::new(namespace), config };
        bus.connection().await?;
        Ok(bus)
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
        let connection = Arc::new(Connection::connect(&self.url, props).await?);
        let publisher = connection.create_channel().await?;
        self.declare(&publisher).await?;
        publisher.confirm_select(ConfirmSelectOptions::default()).await?;
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
        channel.queue_declare(short(&names.dlq), queue, quorum_args(&[])).await?;
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

    /// Publishes on the confirm channel; a failure drops the connection so the next call
    /// starts from a fresh one.
    async fn publish_confirmed(&self, exchange: &str, messages: &[(BusMessage, BasicProperties)]) -> BusResult<()> {
        self.connection().await?;
        let mut live = self.live.lock().await;
        let Some(l) = live.as_ref() else { return Err(BusError::Backend("not connected".into())) };
        let result = async {
            let mut confirms = Vec::with_capacity(messages.len());
            for (m, props) in messages {
                let confirm = l
                    .publisher
                    .basic_publish(
                        short(exchange),
                        short(&m.routing_key),
                        BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                        &m.body,
                        props.clone(),
                    )
                    .await?;
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
        .await;
        if matches!(result, Err(BusError::Backend(_))) {
            *live = None;
        }
        result
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

/// A DLQ message as the API shows it. The broker dead-letters at the limit without a
/// count header, so such a message was delivered exactly `max_deliveries` times.
fn parked_of(d: &lapin::message::Delivery, max_deliveries: u32) -> Parked {
    let headers = d.properties.headers().as_ref();
    if string_header(headers, REASON_HEADER).is_none() && death_reason(headers).as_deref() == Some("delivery_limit") {
        return Parked {
            message: message_of(d),
            reason: "delivery limit reached".into(),
            delivery_count: max_deliveries,
        };
    }
    let reason = string_header(headers, REASON_HEADER).unwrap_or_else(|| match death_reason(headers).as_deref() {
        Some("delivery_limit") => "delivery limit reached".to_owned(),
        Some(other) => format!("dead-lettered by the broker: {other}"),
        None => "unknown".to_owned(),
    });
    // A message the consumer parked carries its delivery count; for anything else the
    // broker counted returns.
    let count = int_header(headers, "x-delivery-count").unwrap_or(0);
    let delivery_count = if string_header(headers, REASON_HEADER).is_some() { count } else { count + 1 };
    Parked { message: message_of(d), reason, delivery_count: u32::try_from(delivery_count.max(1)).unwrap_or(u32::MAX) }
}

#[async_trait]
impl EventBus for RabbitBus {
    fn backend(&self) -> &'static str {
        "rabbitmq"
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
        Ok(Box::new(RabbitConsumer { channel, parking, consumer, dlx: self.names.dlx.clone(), held: HashMap::new() }))
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
        let mut found = false;
        'scan: loop {
            let batch = self.peek_dlq(&channel, 100).await?;
            if batch.is_empty() {
                break;
            }
            for d in &batch {
                if message_of(d).id == id {
                    let m = message_of(d);
                    let props = properties(&m.id);
                    self.publish_confirmed(&self.names.exchange, &[(m, props)]).await?;
                    d.acker.ack(BasicAckOptions::default()).await?;
                    found = true;
                    break 'scan;
                }
            }
        }
        channel.close(200, short("replayed")).await?;
        Ok(found)
    }
}

pub struct RabbitConsumer {
    channel: Channel,
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
        acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    async fn requeue(&mut self, delivery: &Delivery) -> BusResult<()> {
        let (acker, _, _) = self.held.remove(&delivery.tag).ok_or(BusError::UnknownDelivery(delivery.tag))?;
        acker.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await?;
        Ok(())
    }

    async fn park(&mut self, delivery: &Delivery, reason: &str) -> BusResult<()> {
        let (acker, message, count) = self.held.remove(&delivery.tag).ok_or(BusError::UnknownDelivery(delivery.tag))?;
        let mut headers = FieldTable::default();
        headers.insert(short(REASON_HEADER), AMQPValue::LongString(LongString::from(reason)));
        headers.insert(short("x-delivery-count"), AMQPValue::LongLongInt(i64::from(count)));
        let props = properties(&message.id).with_headers(headers);
        // The copy is safe in the DLQ before the original goes: at-least-once.
        confirmed(&self.parking, &self.dlx, &message.routing_key, &message.body, props, &message.id).await?;
        acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }
}

impl Drop for RabbitConsumer {
    fn drop(&mut self) {
        // Unsettled deliveries go back to the queue when the channel closes.
        let (channel, parking) = (self.channel.clone(), self.parking.clone());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = channel.close(200, short("consumer dropped")).await;
                let _ = parking.close(200, short("consumer dropped")).await;
            });
        }
    }
}
