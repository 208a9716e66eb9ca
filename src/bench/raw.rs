//! The raw engines, driven directly with the same payloads Eventra's pipeline carries:
//! the baselines `eventra bench e2e` prints beside its own figures.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

type BenchResult<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

pub async fn lapin_publish_consume(amqp_url: &str, bodies: &[(String, Vec<u8>)]) -> BenchResult<(String, f64, String)> {
    let conn = Connection::connect(amqp_url, ConnectionProperties::default()).await.map_err(err)?;
    let queue = format!("eventra-bench-raw-{}", uuid::Uuid::now_v7().simple());
    let publisher = conn.create_channel().await.map_err(err)?;
    let mut qargs = FieldTable::default();
    qargs.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    publisher.queue_declare(queue.as_str().into(), durable, qargs).await.map_err(err)?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await.map_err(err)?;
    let consumer_channel = conn.create_channel().await.map_err(err)?;
    consumer_channel.basic_qos(100, BasicQosOptions::default()).await.map_err(err)?;
    let mut consumer = consumer_channel
        .basic_consume(queue.as_str().into(), "bench".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(err)?;
    let total = bodies.len();
    let receiver = tokio::spawn(async move {
        let mut got: HashMap<String, Instant> = HashMap::with_capacity(total);
        while got.len() < total {
            match consumer.next().await {
                Some(Ok(d)) => {
                    let id = d.properties.message_id().as_ref().map(|s| s.as_str().to_owned()).unwrap_or_default();
                    got.insert(id, Instant::now());
                    let _ = d.acker.ack(BasicAckOptions::default()).await;
                }
                _ => break,
            }
        }
        got
    });
    let started = Instant::now();
    let mut sent: HashMap<String, Instant> = HashMap::with_capacity(total);
    let mut confirms = Vec::with_capacity(total);
    for (id, body) in bodies {
        sent.insert(id.clone(), Instant::now());
        let props = BasicProperties::default().with_delivery_mode(2).with_message_id(id.as_str().into());
        let c = publisher
            .basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), body, props)
            .await
            .map_err(err)?;
        confirms.push(c);
    }
    for c in confirms {
        if !c.await.map_err(err)?.is_ack() {
            return Err("raw publish nacked".into());
        }
    }
    let got = tokio::time::timeout(Duration::from_secs(120), receiver).await.map_err(err)?.map_err(err)?;
    let span = started.elapsed();
    let latencies: Vec<Duration> =
        sent.iter().filter_map(|(id, at)| got.get(id).map(|g| g.saturating_duration_since(*at))).collect();
    let n = latencies.len();
    let _ = publisher.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    let _ = conn.close(200, "done".into()).await;
    if n < total {
        return Err(format!("raw lapin: {n} of {total} messages came back"));
    }
    Ok((
        format!("lapin: the same {n} events published with confirms to a quorum queue and consumed (manual ack)"),
        n as f64 / span.as_secs_f64(),
        "messages/s".to_owned(),
    ))
}

/// LPUSH the payloads onto a list and RPOP them all back, 100 a round trip (pipelined),
/// as a queue of the same jobs would move through Redis.
pub async fn redis_push_pop(redis_url: &str, payloads: &[Vec<u8>]) -> BenchResult<(String, f64, String)> {
    use fred::prelude::*;
    let client = Builder::from_config(Config::from_url(redis_url).map_err(err)?).build().map_err(err)?;
    client.init().await.map_err(err)?;
    let key = format!("eventra-bench-raw-{}", uuid::Uuid::now_v7().simple());
    let started = Instant::now();
    for chunk in payloads.chunks(100) {
        let values: Vec<fred::types::Value> =
            chunk.iter().map(|p| fred::types::Value::Bytes(p.clone().into())).collect();
        let _: i64 = client.lpush(&key, values).await.map_err(err)?;
    }
    let mut popped = 0;
    while popped < payloads.len() {
        let got: Vec<fred::types::Value> = client.rpop(&key, Some(100)).await.map_err(err)?;
        if got.is_empty() {
            break;
        }
        popped += got.len();
    }
    let span = started.elapsed();
    let _: i64 = client.del(&key).await.map_err(err)?;
    let _ = client.quit().await;
    Ok((
        format!("Redis: LPUSH then RPOP the same {} job payloads, 100 a call", payloads.len()),
        popped as f64 / span.as_secs_f64(),
        "jobs/s (in and out)".to_owned(),
    ))
}
