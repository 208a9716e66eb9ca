//! The embedded event bus: one `bus_messages` table in the SQLite database.
//!
//! Every state change is one guarded statement (SQLite's single writer makes each
//! atomic). A delivery is leased to its consumer until `visible_at_us`; a consumer that
//! vanished without settling lets that lapse and the next `next()` of any consumer puts
//! the message back (or parks it at the delivery limit), as RabbitMQ does when a
//! consumer's channel closes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::SqlitePool;

use crate::store::SqlitePools;
use tokio::sync::Notify;
use uuid::Uuid;

use super::{BusConfig, BusError, BusMessage, BusResult, Consumer, Delivery, EventBus, Parked};
use crate::jobs::{dur_us, now_us};

/// How often a waiting consumer looks for messages published by other processes.
const POLL: Duration = Duration::from_millis(50);

pub struct SqliteBus {
    /// Reads (looks, listings) on the reader pool; every change through the one writer.
    pool: SqlitePool,
    writer: SqlitePool,
    config: BusConfig,
    /// Wakes this process's waiting consumers when it publishes.
    wake: Arc<Notify>,
}

impl SqliteBus {
    /// A bus in the database behind `pools` (migrated with the store's SQLite migrations).
    pub fn new(pools: SqlitePools, config: BusConfig) -> Self {
        SqliteBus { pool: pools.read, writer: pools.write, config, wake: Arc::new(Notify::new()) }
    }
}

#[derive(sqlx::FromRow)]
struct Row {
    seq: i64,
    id: String,
    routing_key: String,
    body: Vec<u8>,
    deliveries: i64,
    reason: Option<String>,
}

impl Row {
    fn message(self) -> BusMessage {
        BusMessage { id: self.id, routing_key: self.routing_key, body: self.body }
    }
}

fn count(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[async_trait]
impl EventBus for SqliteBus {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> BusResult<()> {
        sqlx::query("SELECT 1 FROM bus_messages LIMIT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn publish(&self, messages: &[BusMessage]) -> BusResult<()> {
        let mut tx = self.writer.begin().await?;
        let now = now_us();
        // One statement per chunk: every statement is a round trip to the writer's thread.
        for chunk in messages.chunks(500) {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO bus_messages (id, routing_key, body, state, published_at_us) ",
            );
            q.push_values(chunk, |mut row, m| {
                row.push_bind(m.id.clone())
                    .push_bind(m.routing_key.clone())
                    .push_bind(m.body.clone())
                    .push_bind("ready")
                    .push_bind(now);
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        self.wake.notify_waiters();
        Ok(())
    }

    async fn consume(&self, name: &str, prefetch: u16) -> BusResult<Box<dyn Consumer>> {
        Ok(Box::new(SqliteConsumer {
            pool: self.pool.clone(),
            writer: self.writer.clone(),
            config: self.config,
            wake: self.wake.clone(),
            name: format!("{name}-{}", Uuid::new_v4().simple()),
            prefetch: usize::from(prefetch.max(1)),
            held: HashMap::new(),
            cancelled: false,
        }))
    }

    async fn parked(&self, limit: usize) -> BusResult<Vec<Parked>> {
        let rows = sqlx::query_as::<_, Row>(
            "SELECT seq, id, routing_key, body, deliveries, reason FROM bus_messages WHERE state = 'parked' \
             ORDER BY parked_at_us, seq LIMIT $1",
        )
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Parked {
                reason: r.reason.clone().unwrap_or_default(),
                delivery_count: count(r.deliveries),
                message: r.message(),
            })
            .collect())
    }

    async fn replay(&self, id: &str) -> BusResult<bool> {
        let done = sqlx::query(
            "UPDATE bus_messages SET state = 'ready', deliveries = 0, reason = NULL, parked_at_us = NULL \
             WHERE seq = (SELECT seq FROM bus_messages WHERE state = 'parked' AND id = $1 ORDER BY seq LIMIT 1)",
        )
        .bind(id)
        .execute(&self.writer)
        .await?;
        self.wake.notify_waiters();
        Ok(done.rows_affected() == 1)
    }

    async fn discard(&self, id: &str) -> BusResult<Option<BusMessage>> {
        let gone: Option<(String, String, Vec<u8>)> = sqlx::query_as(
            "DELETE FROM bus_messages WHERE seq = (SELECT seq FROM bus_messages WHERE state = 'parked' AND id = $1 \
             ORDER BY seq LIMIT 1) RETURNING id, routing_key, body",
        )
        .bind(id)
        .fetch_optional(&self.writer)
        .await?;
        Ok(gone.map(|(id, routing_key, body)| BusMessage { id, routing_key, body }))
    }
}

pub struct SqliteConsumer {
    pool: SqlitePool,
    writer: SqlitePool,
    config: BusConfig,
    wake: Arc<Notify>,
    /// Unique per consumer instance: whose deliveries are whose.
    name: String,
    prefetch: usize,
    /// Deliveries to this consumer not settled yet, by sequence number.
    held: HashMap<i64, Delivery>,
    /// Cancelled (a clean stop): takes nothing new.
    cancelled: bool,
}

impl SqliteConsumer {
    /// Deliveries whose consumer vanished go back to the queue (or are parked at the
    /// delivery limit).
    async fn reclaim_lapsed(&self) -> BusResult<()> {
        let now = now_us();
        let lapsed: Option<(i64,)> =
            sqlx::query_as("SELECT seq FROM bus_messages WHERE state = 'delivered' AND visible_at_us < $1 LIMIT 1")
                .bind(now)
                .fetch_optional(&self.pool)
                .await?;
        if lapsed.is_none() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE bus_messages SET consumer = NULL, visible_at_us = NULL, \
             state = CASE WHEN deliveries >= $2 THEN 'parked' ELSE 'ready' END, \
             reason = CASE WHEN deliveries >= $2 THEN 'delivery limit reached' ELSE reason END, \
             parked_at_us = CASE WHEN deliveries >= $2 THEN $1 ELSE parked_at_us END \
             WHERE state = 'delivered' AND visible_at_us < $1",
        )
        .bind(now)
        .bind(i64::from(self.config.max_deliveries))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Takes up to `max` ready messages, oldest first, in one statement.
    async fn take(&mut self, max: usize) -> BusResult<Vec<Delivery>> {
        // Look before taking the writer (idle consumers poll).
        let next: Option<(i64,)> =
            sqlx::query_as("SELECT seq FROM bus_messages WHERE state = 'ready' ORDER BY seq LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        if next.is_none() || max == 0 {
            return Ok(Vec::new());
        }
        let mut rows = sqlx::query_as::<_, Row>(
            "UPDATE bus_messages SET state = 'delivered', deliveries = deliveries + 1, consumer = $1, \
             visible_at_us = $2 WHERE seq IN (SELECT seq FROM bus_messages WHERE state = 'ready' ORDER BY seq \
             LIMIT $3) RETURNING seq, id, routing_key, body, deliveries, reason",
        )
        .bind(&self.name)
        .bind(now_us() + dur_us(self.config.visibility))
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&self.writer)
        .await?;
        rows.sort_by_key(|r| r.seq);
        Ok(rows
            .into_iter()
            .map(|r| {
                let (seq, tag) = (r.seq, u64::try_from(r.seq).unwrap_or(0));
                let delivery = Delivery { delivery_count: count(r.deliveries), tag, message: r.message() };
                self.held.insert(seq, delivery.clone());
                delivery
            })
            .collect())
    }

    /// Takes a delivery off this consumer's books; its sequence number.
    fn claim(&mut self, delivery: &Delivery) -> BusResult<i64> {
        let seq = i64::try_from(delivery.tag).map_err(|_| BusError::UnknownDelivery(delivery.tag))?;
        if self.held.remove(&seq).is_none() {
            return Err(BusError::UnknownDelivery(delivery.tag));
        }
        Ok(seq)
    }

    /// The settlement changed `rows` rows: none means the delivery was held too long,
    /// went back to the queue and is someone else's now.
    fn settled(&self, delivery: &Delivery, rows: u64) -> BusResult<()> {
        self.wake.notify_waiters();
        if rows != 1 {
            return Err(BusError::UnknownDelivery(delivery.tag));
        }
        Ok(())
    }
}

#[async_trait]
impl Consumer for SqliteConsumer {
    async fn next(&mut self, wait: Duration) -> BusResult<Option<Delivery>> {
        Ok(self.next_batch(1, wait).await?.pop())
    }

    async fn next_batch(&mut self, max: usize, wait: Duration) -> BusResult<Vec<Delivery>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.cancelled {
                return Ok(Vec::new());
            }
            if self.held.len() < self.prefetch {
                self.reclaim_lapsed().await?;
                let room = (self.prefetch - self.held.len()).min(max);
                let batch = self.take(room).await?;
                if !batch.is_empty() {
                    return Ok(batch);
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let nap = (deadline - now).min(POLL);
            let _ = tokio::time::timeout(nap, self.wake.notified()).await;
        }
    }

    async fn ack(&mut self, delivery: &Delivery) -> BusResult<()> {
        let seq = self.claim(delivery)?;
        let done = sqlx::query("DELETE FROM bus_messages WHERE seq = $1 AND consumer = $2 AND state = 'delivered'")
            .bind(seq)
            .bind(&self.name)
            .execute(&self.writer)
            .await?;
        self.settled(delivery, done.rows_affected())
    }

    async fn ack_many(&mut self, deliveries: &[Delivery]) -> BusResult<()> {
        let seqs: Vec<i64> = deliveries.iter().filter_map(|d| self.claim(d).ok()).collect();
        if seqs.is_empty() {
            return Ok(());
        }
        let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new("DELETE FROM bus_messages WHERE consumer = ");
        q.push_bind(self.name.clone());
        q.push(" AND state = 'delivered' AND seq IN (");
        let mut list = q.separated(", ");
        for seq in &seqs {
            list.push_bind(*seq);
        }
        q.push(")");
        let done = q.build().execute(&self.writer).await?;
        self.wake.notify_waiters();
        if done.rows_affected() < seqs.len() as u64 {
            tracing::warn!(
                lost = seqs.len() as u64 - done.rows_affected(),
                "deliveries reclaimed by the bus before the ack; another consumer has them"
            );
        }
        Ok(())
    }

    fn held(&self) -> usize {
        self.held.len()
    }

    fn unsettled(&self) -> Vec<Delivery> {
        let mut all: Vec<Delivery> = self.held.values().cloned().collect();
        all.sort_by_key(|d| d.tag);
        all
    }

    async fn cancel(&mut self) -> BusResult<()> {
        self.cancelled = true;
        Ok(())
    }

    async fn requeue(&mut self, delivery: &Delivery) -> BusResult<()> {
        let seq = self.claim(delivery)?;
        let done = sqlx::query(
            "UPDATE bus_messages SET consumer = NULL, visible_at_us = NULL, \
             state = CASE WHEN deliveries >= $4 THEN 'parked' ELSE 'ready' END, \
             reason = CASE WHEN deliveries >= $4 THEN 'delivery limit reached' ELSE reason END, \
             parked_at_us = CASE WHEN deliveries >= $4 THEN $3 ELSE parked_at_us END \
             WHERE seq = $1 AND consumer = $2 AND state = 'delivered'",
        )
        .bind(seq)
        .bind(&self.name)
        .bind(now_us())
        .bind(i64::from(self.config.max_deliveries))
        .execute(&self.writer)
        .await?;
        self.settled(delivery, done.rows_affected())
    }

    async fn park(&mut self, delivery: &Delivery, reason: &str) -> BusResult<()> {
        let seq = self.claim(delivery)?;
        let done = sqlx::query(
            "UPDATE bus_messages SET consumer = NULL, visible_at_us = NULL, state = 'parked', reason = $3, \
             parked_at_us = $4 WHERE seq = $1 AND consumer = $2 AND state = 'delivered'",
        )
        .bind(seq)
        .bind(&self.name)
        .bind(reason)
        .bind(now_us())
        .execute(&self.writer)
        .await?;
        self.settled(delivery, done.rows_affected())
    }
}
