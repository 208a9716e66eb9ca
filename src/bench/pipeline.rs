//! `eventra bench pipeline`: commit → consumed latency and events/s through the real
//! pipeline (HTTP API → PostgreSQL outbox → relay → RabbitMQ → consumers → Redis jobs),
//! beside a raw lapin publish-with-confirm + consume loop of the same messages on the
//! same broker, in one invocation.
//!
//! - Eventra: a server in this process on the given services (fresh namespace); `users`
//!   users created through the HTTP API, `concurrency` at a time. An event counts as
//!   consumed when its consumer enqueued its jobs (just before the ack): latency is that
//!   job's `enqueued_at` minus the event's time (taken in the writing transaction).
//! - Raw: the same serialized events published to a fresh quorum queue with publisher
//!   confirms and consumed (auto-ack off, manual ack), timed per message from publish to
//!   delivery.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::config::Config;
use crate::jobs::{Enqueued, JobQueue, NewJob, QueueConfig, RedisJobQueue};

#[derive(Debug, Clone, clap::Args)]
pub struct PipelineBenchArgs {
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub database_url: String,
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Users to create (one `user.created` event each).
    #[arg(long, default_value_t = 2000)]
    pub users: usize,
    /// Concurrent HTTP requests.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
}

/// One engine's figures.
#[derive(Debug, Clone)]
pub struct Row {
    pub engine: String,
    pub events_per_s: f64,
    pub p50: Duration,
    pub p95: Duration,
    pub p99: Duration,
}

type BenchResult<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn percentiles(mut lat: Vec<Duration>) -> (Duration, Duration, Duration) {
    lat.sort();
    let at = |q: f64| lat.get(((lat.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default();
    (at(0.50), at(0.95), at(0.99))
}

pub async fn run(args: PipelineBenchArgs) -> BenchResult<Vec<Row>> {
    let (eventra, bodies) = eventra(&args).await?;
    let raw = raw_lapin(&args, &bodies).await?;
    Ok(vec![eventra, raw])
}

async fn eventra(args: &PipelineBenchArgs) -> BenchResult<(Row, Vec<(String, Vec<u8>)>)> {
    let ns = format!("eventra-bench-{}", uuid::Uuid::now_v7().simple());
    let dir = std::env::temp_dir().join(&ns);
    std::fs::create_dir_all(&dir).map_err(err)?;
    let token = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let mut config = Config::embedded(&dir, &token);
    config.database_url = args.database_url.clone();
    config.amqp_url = Some(args.amqp_url.clone());
    config.redis_url = Some(args.redis_url.clone());
    config.namespace = ns.clone();
    config.db_max_connections = 16;
    let config = Arc::new(config);
    let server = super::InProcessServer::start(config.clone()).await?;
    let (client, base) = (server.client.clone(), server.base.clone());
    let slug = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let created: serde_json::Value = client
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"name": slug, "slug": slug}))
        .send()
        .await
        .map_err(err)?
        .json()
        .await
        .map_err(err)?;
    let tenant = created["tenant"]["id"].as_str().ok_or("no tenant id")?.to_owned();
    let key = created["api_key"]["key"].as_str().ok_or("no key")?.to_owned();

    let results: Vec<Result<(), String>> = futures_util::stream::iter(0..args.users)
        .map(|i| {
            let (client, base, tenant, key) = (client.clone(), base.clone(), tenant.clone(), key.clone());
            async move {
                let res = client
                    .post(format!("{base}/v1/tenants/{tenant}/users"))
                    .bearer_auth(key)
                    .json(&serde_json::json!({"email": format!("u{i}@bench.example"), "name": format!("User {i}")}))
                    .send()
                    .await
                    .map_err(err)?;
                if res.status() != reqwest::StatusCode::CREATED {
                    return Err(format!("create user {i}: {}", res.status()));
                }
                Ok(())
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    if let Some(e) = results.into_iter().find_map(Result::err) {
        return Err(e);
    }

    // Every user.created consumed: its audit job is in the queue.
    let store = crate::store::connect(&args.database_url, 2).await.map_err(err)?;
    let queue = RedisJobQueue::connect(&args.redis_url, &ns, QueueConfig::default()).await.map_err(err)?;
    let tenant_id: uuid::Uuid = tenant.parse().map_err(err)?;
    let events: Vec<_> = store
        .outbox_after(0, u32::MAX)
        .await
        .map_err(err)?
        .into_iter()
        .filter(|r| r.tenant_id == tenant_id && r.event.event_type == crate::domain::EventType::UserCreated)
        .map(|r| r.event)
        .collect();
    // Wait until every event's effects exist (its audit entry), so every probe below
    // finds the job the consumer enqueued.
    let deadline = Instant::now() + Duration::from_secs(300);
    while store.count_audit(tenant_id).await.map_err(err)? < events.len() as u64 + 1 {
        if Instant::now() > deadline {
            return Err("events were not consumed within 300 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut latencies = Vec::with_capacity(events.len());
    let mut last = chrono::DateTime::<chrono::Utc>::MIN_UTC;
    for e in &events {
        // A duplicate enqueue is a no-op that names the job holding the key.
        let probe = NewJob::new("audit", format!("audit:{}", e.id), serde_json::json!({}));
        let Enqueued::Duplicate(id) = queue.enqueue(probe).await.map_err(err)? else {
            return Err(format!("event {} has no audit job", e.id));
        };
        let job = queue.get(id).await.map_err(err)?.ok_or("job vanished")?;
        latencies.push((job.enqueued_at - e.time).to_std().unwrap_or_default());
        last = last.max(job.enqueued_at);
    }
    let first = events.iter().map(|e| e.time).min().unwrap_or_default();
    let span = (last - first).to_std().unwrap_or_default().max(Duration::from_millis(1));
    let n = latencies.len();
    let (p50, p95, p99) = percentiles(latencies);
    let bodies = events
        .iter()
        .map(|e| Ok((e.id.to_string(), serde_json::to_vec(e).map_err(err)?)))
        .collect::<BenchResult<Vec<_>>>()?;

    let _ = server.stop().await;
    // Clean up the bench's namespace.
    if let Ok(bus) = crate::bus::RabbitBus::connect(&args.amqp_url, &ns, crate::bus::BusConfig::default()).await {
        let _ = bus.delete_topology().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok((
        Row {
            engine: format!("Eventra: API → outbox → relay → RabbitMQ → consumer → Redis ({n} events)"),
            events_per_s: n as f64 / span.as_secs_f64(),
            p50,
            p95,
            p99,
        },
        bodies,
    ))
}

async fn raw_lapin(args: &PipelineBenchArgs, bodies: &[(String, Vec<u8>)]) -> BenchResult<Row> {
    let conn = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await.map_err(err)?;
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
    let (p50, p95, p99) = percentiles(latencies);
    let _ = publisher.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(Row {
        engine: format!("raw lapin: publish with confirms → quorum queue → consume ({n} messages)"),
        events_per_s: n as f64 / span.as_secs_f64(),
        p50,
        p95,
        p99,
    })
}

/// The rows as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    let mut out = String::from("| engine | events/s | p50 | p95 | p99 |\n|---|---:|---:|---:|---:|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {:.0} | {} | {} | {} |\n",
            r.engine,
            r.events_per_s,
            ms(r.p50),
            ms(r.p95),
            ms(r.p99)
        ));
    }
    out
}
