//! `webhook_delivery`: one event to one endpoint (SPEC §7).
//!
//! A job per (endpoint, event), keyed `webhook:<endpoint>:<event>`, so a redelivered
//! event adds no second job. A worker's leased batch shares its round trips (one
//! endpoint look-up, one look-up of logged successes, one log write, itself shared with
//! the other workers' batches in flight); the POSTs run concurrently. Each delivery:
//! 1. reads the endpoint and its signing secrets (deleted or disabled: nothing to do);
//! 2. skips the POST when a success is already logged for the pair (an operator's
//!    retry, a job run again after a crash before its ack);
//! 3. POSTs exactly the bytes it signs, with `webhook-id` = the event id (the same on
//!    every attempt), through a client with a timeout, no redirects and the SSRF resolver;
//! 4. logs the attempt. At most one success per pair is ever logged (a unique index);
//! 5. on `410 Gone`, or when every attempt has failed for 5 days, disables the endpoint
//!    (`webhook.disabled`, audited) and stops; on
//!    any other failure retries on SPEC §7's schedule (immediately, 5 s, 5 min, 30 min,
//!    2 h, 5 h, 10 h, 10 h, divided by `EVENTRA_JOB_TIME_SCALE`), or after the
//!    receiver's `Retry-After` on 429/503.
//!
//! One endpoint cannot hold the others back (in each process):
//! - at most [`MAX_IN_FLIGHT`] deliveries to an endpoint are in flight; more wait
//!   briefly for a fast endpoint's slot, and are snoozed (no attempt counted) for about
//!   as long as a slow endpoint takes, so a hanging receiver's backlog neither holds
//!   workers nor churns through the queue;
//! - a circuit breaker: after [`BREAKER_FAILURES`] failed attempts in a row, its
//!   deliveries are snoozed until the cooldown ends (30 s, doubling to 10 min while it
//!   keeps failing; divided by the time scale). Then one attempt probes: a success
//!   closes the breaker, a failure reopens it for twice as long.
//!
//! So a dead receiver's backlog holds at most a few workers for one timeout, then none.
//! Deliveries have their own queue (`webhooks`) and workers (`webhook-worker-N`, small
//! batches), so a slow receiver never holds a batch of audit, email or index jobs.
//!
//! The window left for a second POST is a crash between the receiver's 2xx and the log
//! row: the retry sends again with the same `webhook-id`, which is how Standard Webhooks
//! receivers recognise a duplicate.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::signature::signature_header;
use super::ssrf;
use crate::domain::webhook::{DeliveryAttempt, EndpointStatus, Secrets, WebhookEndpoint};
use crate::domain::{DomainEvent, EventContext};
use crate::jobs::kinds::{JobContext, JobFailure, JobKind};
use crate::jobs::{Job, NewJob};
use crate::store::{GroupWrite, Store};

pub const KIND: &str = "webhook_delivery";
/// Deliveries have a queue of their own, worked by `webhook-worker-N`.
pub const QUEUE: &str = "webhooks";
/// Deliveries one webhook worker leases at once. Small, because a batch waits for its
/// slowest delivery; not 1, because every lease and ack is a write to the queue (the
/// embedded queue's single writer took 35 % fewer deliveries/s at 1).
pub const WORKER_BATCH: u32 = 16;

/// SPEC §7's schedule: the wait before attempt n+1 after attempt n failed.
const SCHEDULE: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];
/// The first try plus one per step of the schedule.
pub const MAX_ATTEMPTS: u32 = SCHEDULE.len() as u32 + 1;
/// The wait after attempt `attempt` (1-based) failed, at `time_scale`.
fn backoff(attempt: u32, time_scale: f64) -> Duration {
    let step = SCHEDULE[(attempt as usize).saturating_sub(1).min(SCHEDULE.len() - 1)];
    step.div_f64(time_scale.max(1.0))
}

/// Most deliveries in flight to one endpoint from one process.
pub const MAX_IN_FLIGHT: usize = 16;
/// How long a delivery waits for one of a fast endpoint's slots before it is snoozed
/// (waiting holds the worker: short).
const SLOT_WAIT: Duration = Duration::from_millis(20);
/// The shortest snooze of a delivery whose endpoint has no slot free.
const MIN_SNOOZE: Duration = Duration::from_millis(250);

/// One endpoint's slots, and how fast they turn over.
struct EndpointSlots {
    slots: Arc<tokio::sync::Semaphore>,
    pace: Mutex<Pace>,
}

/// How long the endpoint's attempts take.
struct Pace {
    /// A moving average of finished attempts' durations.
    typical: Option<Duration>,
    /// When the last attempt finished (or the slots were created).
    last_done: Instant,
}

impl EndpointSlots {
    /// How slow the endpoint is now: its typical attempt, or, while none finishes, at
    /// least the time since one last did.
    fn slowness(&self) -> Duration {
        let pace = self.pace.lock().unwrap_or_else(|e| e.into_inner());
        pace.typical.unwrap_or_default().max(pace.last_done.elapsed())
    }

    fn done(&self, took: Duration) {
        let mut pace = self.pace.lock().unwrap_or_else(|e| e.into_inner());
        pace.typical = Some(match pace.typical {
            Some(t) => (t * 7 + took) / 8,
            None => took,
        });
        pace.last_done = Instant::now();
    }
}

/// A delivery's slot; giving it back records how long the attempt held it.
struct Slot {
    endpoint: Arc<EndpointSlots>,
    started: Instant,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.endpoint.done(self.started.elapsed());
    }
}

/// Delivery slots per endpoint.
#[derive(Default)]
struct InFlight(Mutex<HashMap<Uuid, Arc<EndpointSlots>>>);

impl InFlight {
    /// A slot for `endpoint`, or how long to snooze. A fast endpoint's slots free within
    /// moments: the delivery waits up to `wait` for one. A slow one's (a receiver that
    /// hangs until the timeout) do not: the delivery is snoozed at once, for about as
    /// long as the endpoint takes (at least [`MIN_SNOOZE`], at most `longest`, spread
    /// by up to half again), so a backlog for a dead receiver neither holds workers nor
    /// keeps coming back to the queue.
    async fn take(&self, endpoint: Uuid, wait: Duration, longest: Duration) -> Result<Slot, Duration> {
        let entry = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(endpoint)
                .or_insert_with(|| {
                    Arc::new(EndpointSlots {
                        slots: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
                        pace: Mutex::new(Pace { typical: None, last_done: Instant::now() }),
                    })
                })
                .clone()
        };
        let slot = |permit| Slot { endpoint: entry.clone(), started: Instant::now(), _permit: permit };
        if let Ok(permit) = entry.slots.clone().try_acquire_owned() {
            return Ok(slot(permit));
        }
        let slowness = entry.slowness();
        if slowness <= wait {
            if let Ok(Ok(permit)) = tokio::time::timeout(wait, entry.slots.clone().acquire_owned()).await {
                return Ok(slot(permit));
            }
        }
        let snooze = slowness.clamp(MIN_SNOOZE, longest.max(MIN_SNOOZE));
        Err(snooze.mul_f64(1.0 + rand::random::<f64>() / 2.0))
    }
}

/// Failed attempts in a row that open an endpoint's breaker.
pub const BREAKER_FAILURES: u32 = 5;
const BREAKER_COOLDOWN: Duration = Duration::from_secs(30);
const BREAKER_MAX_COOLDOWN: Duration = Duration::from_secs(600);

/// One endpoint's breaker.
#[derive(Debug, Default, Clone, Copy)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    cooldown: Duration,
}

/// The breakers of every endpoint this process delivers to.
#[derive(Default)]
struct Breakers(Mutex<HashMap<Uuid, Breaker>>);

impl Breakers {
    /// `Some(remaining)` while the endpoint's breaker is open. When a cooldown ends, one
    /// caller gets `None` (the probe) and the others see it open for `probe` longer.
    fn open_for(&self, endpoint: Uuid, probe: Duration) -> Option<Duration> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let b = map.get_mut(&endpoint)?;
        let until = b.open_until?;
        match until.checked_duration_since(Instant::now()) {
            Some(remaining) => Some(remaining),
            None => {
                b.open_until = Some(Instant::now() + probe);
                None
            }
        }
    }

    fn succeeded(&self, endpoint: Uuid) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.remove(&endpoint).is_some_and(|b| b.open_until.is_some()) {
            tracing::info!(endpoint_id = %endpoint, "webhook endpoint answered again; circuit closed");
        }
    }

    fn failed(&self, endpoint: Uuid, time_scale: f64) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let b = map.entry(endpoint).or_default();
        b.failures += 1;
        if b.failures >= BREAKER_FAILURES {
            b.cooldown =
                if b.cooldown.is_zero() { BREAKER_COOLDOWN } else { (b.cooldown * 2).min(BREAKER_MAX_COOLDOWN) };
            b.open_until = Some(Instant::now() + b.cooldown.div_f64(time_scale.max(1.0)));
            metrics::counter!("eventra_webhook_breaker_opened_total").increment(1);
            tracing::warn!(endpoint_id = %endpoint, failures = b.failures, cooldown = ?b.cooldown,
                "webhook endpoint keeps failing; circuit open");
        }
    }
}

/// An endpoint whose every attempt failed for this long is disabled (SPEC §7).
pub const DISABLE_AFTER_FAILING: Duration = Duration::from_secs(5 * 24 * 3600);

/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The job's arguments: the endpoint, and the event as it was committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryArgs {
    pub endpoint_id: Uuid,
    pub event: DomainEvent,
}

impl DeliveryArgs {
    pub fn job(endpoint_id: Uuid, event: &DomainEvent) -> NewJob {
        let args = DeliveryArgs { endpoint_id, event: event.clone() };
        NewJob {
            max_attempts: Some(MAX_ATTEMPTS),
            queue: QUEUE.into(),
            ..NewJob::new(KIND, format!("webhook:{endpoint_id}:{}", event.id), serde_json::json!(args))
        }
    }
}

/// How deliveries are made.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// A 2xx must arrive within this (SPEC: 15 s).
    pub timeout: Duration,
    /// `EVENTRA_WEBHOOK_ALLOW_PRIVATE=1`: no SSRF checks (development and tests).
    pub allow_private: bool,
    /// `EVENTRA_JOB_TIME_SCALE`: the schedule is divided by it.
    pub time_scale: f64,
}

pub struct WebhookDelivery {
    store: Arc<dyn Store>,
    /// Opens the secrets as stored (encrypted at rest).
    secret_box: Arc<super::secret_box::SecretBox>,
    client: reqwest::Client,
    config: DeliveryConfig,
    breakers: Breakers,
    in_flight: InFlight,
    /// The attempts of concurrent batches, logged together.
    log: GroupWrite<DeliveryAttempt, bool>,
}

impl WebhookDelivery {
    pub fn new(
        store: Arc<dyn Store>,
        secret_box: Arc<super::secret_box::SecretBox>,
        config: DeliveryConfig,
    ) -> Result<Self, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("Eventra-Webhooks/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(32);
        if !config.allow_private {
            builder = builder.dns_resolver(Arc::new(ssrf::GuardedResolver));
        }
        Ok(WebhookDelivery {
            secret_box,
            store,
            client: builder.build()?,
            config,
            breakers: Breakers::default(),
            in_flight: InFlight::default(),
            log: GroupWrite::default(),
        })
    }

    /// One POST; `Ok(status)` when the receiver answered.
    async fn post(
        &self,
        url: &str,
        msg_id: &str,
        timestamp: i64,
        signature: &str,
        body: Vec<u8>,
    ) -> Result<reqwest::Response, String> {
        if !self.config.allow_private {
            let parsed = url::Url::parse(url).map_err(|e| format!("bad URL: {e}"))?;
            // Names are checked by the resolver; a literal address never reaches it.
            if let Some(host) =
                parsed.host_str().filter(|h| h.parse::<std::net::IpAddr>().is_ok() || h.starts_with('['))
            {
                let port = parsed.port_or_known_default().unwrap_or(443);
                ssrf::check_host(host, port, self.config.timeout).await.map_err(|e| e.to_string())?;
            }
        }
        self.client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", msg_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                let mut msg = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    msg.push_str(&format!(": {s}"));
                    source = s.source();
                }
                msg
            })
    }
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(res: &reqwest::Response) -> Option<Duration> {
    let v = res.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().ok().map(|d| d.min(MAX_RETRY_AFTER))
}

/// A delivery that passed its checks and was attempted: what the log gets, and what
/// decides the job's outcome once the log row is written.
struct Attempted {
    endpoint: WebhookEndpoint,
    event: DomainEvent,
    record: DeliveryAttempt,
    /// The receiver's `Retry-After` on 429/503.
    wait: Option<Duration>,
}

impl WebhookDelivery {
    /// Checks the breaker and the endpoint's slots, signs and POSTs. `Err` when the
    /// delivery is not attempted now (snoozed) or cannot be signed.
    async fn attempt(
        &self,
        job: &Job,
        endpoint: &WebhookEndpoint,
        stored: &Secrets,
        event: DomainEvent,
    ) -> Result<Attempted, JobFailure> {
        if let Some(remaining) = self.breakers.open_for(endpoint.id, self.config.timeout) {
            // Spread out, so the backlog does not come back all at the probe.
            let wait = remaining + remaining.min(self.config.timeout).mul_f64(rand::random::<f64>());
            return Err(JobFailure::snooze(format!("the endpoint's circuit is open for {remaining:?}"), wait));
        }
        let _slot = self.in_flight.take(endpoint.id, SLOT_WAIT, self.config.timeout).await.map_err(|wait| {
            JobFailure::snooze(format!("{MAX_IN_FLIGHT} deliveries to this endpoint in flight"), wait)
        })?;
        let open = |s: &str| self.secret_box.open(s).map_err(|e| JobFailure::new(format!("webhook secret: {e}")));
        let secrets =
            Secrets { current: open(&stored.current)?, previous: stored.previous.as_deref().map(open).transpose()? };
        let attempt = job.failures + 1;
        let body = serde_json::to_vec(&event).map_err(|e| JobFailure::permanent(format!("event body: {e}")))?;
        let msg_id = event.id.to_string();
        let timestamp = chrono::Utc::now().timestamp();
        let signature = signature_header(&secrets, &msg_id, timestamp, &body);
        let started = Instant::now();
        let outcome = self.post(&endpoint.url, &msg_id, timestamp, &signature, body).await;
        let duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let (status, response_status, error, wait) = match &outcome {
            Ok(res) if res.status().is_success() => ("succeeded", Some(res.status().as_u16()), None, None),
            Ok(res) => {
                let code = res.status().as_u16();
                let wait = matches!(code, 429 | 503).then(|| retry_after(res)).flatten();
                ("failed", Some(code), Some(format!("the receiver answered {}", res.status())), wait)
            }
            Err(e) => ("failed", None, Some(e.clone()), None),
        };
        let record = DeliveryAttempt {
            id: Uuid::now_v7(),
            endpoint_id: endpoint.id,
            event_id: event.id,
            event_type: event.event_type.as_str().to_owned(),
            attempt: i32::try_from(attempt).unwrap_or(i32::MAX),
            status: status.to_owned(),
            response_status: response_status.map(i32::from),
            duration_ms,
            error,
            at: crate::domain::now(),
        };
        Ok(Attempted { endpoint: endpoint.clone(), event, record, wait })
    }

    /// The job's outcome once its attempt is logged (`logged`: the log's answer).
    async fn settle(&self, a: Attempted, logged: Result<bool, String>) -> Result<(), JobFailure> {
        let Attempted { endpoint, event, record, wait } = a;
        let span = tracing::info_span!("webhook", endpoint_id = %endpoint.id, event_id = %event.id,
            tenant_id = %endpoint.tenant_id, attempt = record.attempt);
        let _enter = span.enter();
        let (status, response_status, duration_ms) =
            (record.status.as_str(), record.response_status, record.duration_ms);
        metrics::counter!("eventra_webhook_deliveries_total", "status" => status.to_owned()).increment(1);
        metrics::counter!("eventra_webhook_endpoint_attempts_total", "endpoint_id" => endpoint.id.to_string(),
            "tenant_id" => endpoint.tenant_id.to_string(), "status" => status.to_owned())
        .increment(1);
        metrics::histogram!("eventra_webhook_delivery_seconds").record(duration_ms as f64 / 1000.0);
        if status == "succeeded" {
            self.breakers.succeeded(endpoint.id);
            match logged {
                Ok(true) => tracing::info!(response_status, duration_ms, "webhook delivered"),
                Ok(false) => tracing::warn!("webhook delivered again; the log keeps the first success"),
                // The receiver has it; a retry would deliver it twice.
                Err(e) => tracing::warn!(error = %e, "webhook delivered but not logged"),
            }
            return Ok(());
        }
        if let Err(e) = logged {
            tracing::warn!(error = %e, "webhook attempt not logged");
        }
        if response_status == Some(410) {
            let ctx = EventContext::system(format!("webhook-410:{}", event.id));
            match self.store.disable_webhook(endpoint.id, "the receiver answered 410 Gone", &ctx).await {
                Ok(_) => tracing::warn!("webhook endpoint answered 410 Gone; disabled"),
                Err(e) => return Err(JobFailure::new(format!("410 Gone, but disabling failed: {e}"))),
            }
            return Ok(());
        }
        let error = record.error.unwrap_or_default();
        self.breakers.failed(endpoint.id, self.config.time_scale);
        if let Ok(Some(since)) = self.store.failing_since(endpoint.id).await {
            let failing = (chrono::Utc::now() - since).to_std().unwrap_or_default();
            if failing >= DISABLE_AFTER_FAILING {
                let ctx = EventContext::system(format!("webhook-failing:{}", event.id));
                let reason = format!("every attempt failed since {}", since.to_rfc3339());
                if let Ok(true) = self.store.disable_webhook(endpoint.id, &reason, &ctx).await {
                    tracing::warn!(%since, "webhook endpoint failed for 5 days; disabled");
                }
                return Ok(());
            }
        }
        tracing::warn!(%error, response_status, duration_ms, "webhook attempt failed");
        let attempt = u32::try_from(record.attempt).unwrap_or(1);
        Err(JobFailure::new(error).retry_in(wait.unwrap_or_else(|| backoff(attempt, self.config.time_scale))))
    }
}

#[async_trait]
impl JobKind for WebhookDelivery {
    fn name(&self) -> &'static str {
        KIND
    }

    fn max_attempts(&self) -> u32 {
        MAX_ATTEMPTS
    }

    /// A leased batch in three shared round trips: one look-up of its endpoints, one of
    /// the successes already logged, the POSTs concurrently, and one log write (shared
    /// with the other workers' batches in flight, [`GroupWrite`]).
    async fn run_batch(&self, jobs: &[&Job], _ctx: &JobContext) -> Vec<Result<(), JobFailure>> {
        let mut results: Vec<Option<Result<(), JobFailure>>> = vec![None; jobs.len()];
        let mut todo: Vec<(usize, DeliveryArgs)> = Vec::with_capacity(jobs.len());
        for (i, job) in jobs.iter().enumerate() {
            match DeliveryArgs::deserialize(&job.args) {
                Ok(args) => todo.push((i, args)),
                Err(e) => results[i] = Some(Err(JobFailure::permanent(format!("bad webhook_delivery args: {e}")))),
            }
        }
        let fail_all =
            |results: &mut Vec<Option<Result<(), JobFailure>>>, todo: &[(usize, DeliveryArgs)], e: String| {
                for (i, _) in todo {
                    results[*i] = Some(Err(JobFailure::new(format!("database: {e}"))));
                }
            };
        let ids: Vec<Uuid> = todo.iter().map(|(_, a)| a.endpoint_id).collect::<HashSet<_>>().into_iter().collect();
        let endpoints: HashMap<Uuid, (WebhookEndpoint, Secrets)> = match self.store.webhooks_for_delivery(&ids).await {
            Ok(found) => found.into_iter().map(|(e, s)| (e.id, (e, s))).collect(),
            Err(e) => {
                fail_all(&mut results, &todo, e.to_string());
                todo.clear();
                HashMap::new()
            }
        };
        todo.retain(|(i, args)| {
            let event = &args.event;
            let Some((endpoint, _)) = endpoints.get(&args.endpoint_id) else {
                tracing::info!(endpoint_id = %args.endpoint_id, event_id = %event.id, "webhook endpoint deleted; delivery dropped");
                results[*i] = Some(Ok(()));
                return false;
            };
            let test = event.event_type == crate::domain::EventType::WebhookTest;
            if !(endpoint.wants(event.event_type.as_str()) || (test && endpoint.status == EndpointStatus::Enabled)) {
                tracing::info!(endpoint_id = %endpoint.id, event_id = %event.id, "webhook endpoint disabled or unsubscribed; delivery dropped");
                results[*i] = Some(Ok(()));
                return false;
            }
            true
        });
        let pairs: Vec<(Uuid, Uuid)> = todo.iter().map(|(_, a)| (a.endpoint_id, a.event.id)).collect();
        match self.store.delivered(&pairs).await {
            Ok(done) => todo.retain(|(i, a)| {
                let delivered = done.contains(&(a.endpoint_id, a.event.id));
                if delivered {
                    results[*i] = Some(Ok(()));
                }
                !delivered
            }),
            Err(e) => {
                fail_all(&mut results, &todo, e.to_string());
                todo.clear();
            }
        }
        let endpoints = &endpoints;
        let attempts = futures_util::future::join_all(todo.into_iter().map(|(i, args)| async move {
            let (endpoint, secrets) = &endpoints[&args.endpoint_id];
            (i, self.attempt(jobs[i], endpoint, secrets, args.event).await)
        }))
        .await;
        let mut attempted = Vec::with_capacity(attempts.len());
        for (i, a) in attempts {
            match a {
                Ok(a) => attempted.push((i, a)),
                Err(failure) => results[i] = Some(Err(failure)),
            }
        }
        let records: Vec<DeliveryAttempt> = attempted.iter().map(|(_, a)| a.record.clone()).collect();
        let store = &self.store;
        let logged: Vec<Result<bool, String>> = match self
            .log
            .submit(records, |all| async move { store.record_deliveries(&all).await.map_err(|e| e.to_string()) })
            .await
        {
            Ok(logged) => logged.into_iter().map(Ok).collect(),
            Err(e) => attempted.iter().map(|_| Err(e.clone())).collect(),
        };
        let settled = futures_util::future::join_all(
            attempted.into_iter().zip(logged).map(|((i, a), logged)| async move { (i, self.settle(a, logged).await) }),
        )
        .await;
        for (i, r) in settled {
            results[i] = Some(r);
        }
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(JobFailure::new("delivery not decided")))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_failures_in_a_row_and_closes_on_success() {
        let b = Breakers::default();
        let e = Uuid::now_v7();
        for _ in 0..BREAKER_FAILURES - 1 {
            b.failed(e, 1.0);
        }
        let probe = Duration::from_secs(15);
        assert!(b.open_for(e, probe).is_none(), "not yet");
        b.failed(e, 1.0);
        let open = b.open_for(e, probe).expect("open after 5 in a row");
        assert!(open <= BREAKER_COOLDOWN && open > BREAKER_COOLDOWN - Duration::from_secs(1));
        // At the end of the cooldown one call probes; the others still see it open.
        b.0.lock().unwrap().get_mut(&e).unwrap().open_until = Some(Instant::now());
        assert!(b.open_for(e, probe).is_none(), "the probe");
        assert!(b.open_for(e, probe).is_some(), "only one probe");
        b.succeeded(e);
        assert!(b.open_for(e, probe).is_none(), "a success closes it");
        assert!(b.open_for(Uuid::now_v7(), probe).is_none(), "per endpoint");
    }

    #[tokio::test]
    async fn in_flight_deliveries_per_endpoint_are_bounded() {
        let f = InFlight::default();
        let e = Uuid::now_v7();
        let (short, longest) = (Duration::from_millis(10), Duration::from_secs(15));
        let mut slots = Vec::new();
        for _ in 0..MAX_IN_FLIGHT {
            slots.push(f.take(e, short, longest).await.expect("a slot"));
        }
        let snooze = f.take(e, short, longest).await.err().expect("full");
        assert!(snooze >= MIN_SNOOZE && snooze <= MIN_SNOOZE.mul_f64(1.5), "{snooze:?}");
        assert!(f.take(Uuid::now_v7(), short, longest).await.is_ok(), "per endpoint");
        slots.pop();
        assert!(f.take(e, short, longest).await.is_ok(), "given back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_endpoints_backlog_is_snoozed_for_about_as_long_as_it_takes() {
        let f = InFlight::default();
        let e = Uuid::now_v7();
        let (short, longest) = (Duration::from_millis(10), Duration::from_secs(15));
        let slots: Vec<Slot> = futures_util::future::join_all((0..MAX_IN_FLIGHT).map(|_| f.take(e, short, longest)))
            .await
            .into_iter()
            .map(|s| s.expect("a slot"))
            .collect();
        // Hanging: nothing has finished for 4 s.
        {
            let map = f.0.lock().unwrap();
            map[&e].pace.lock().unwrap().last_done = Instant::now() - Duration::from_secs(4);
        }
        let snooze = f.take(e, short, longest).await.err().expect("full");
        assert!(snooze >= Duration::from_secs(4) && snooze <= Duration::from_secs(6), "{snooze:?}");
        drop(slots);
        assert!(f.take(e, short, longest).await.is_ok(), "free again");
    }

    #[test]
    fn the_schedule_is_spec_7s_divided_by_the_time_scale() {
        assert_eq!(MAX_ATTEMPTS, 8);
        let waits: Vec<u64> = (1..=7).map(|a| backoff(a, 1.0).as_secs()).collect();
        assert_eq!(waits, [5, 300, 1800, 7200, 18000, 36000, 36000]);
        assert_eq!(backoff(1, 100.0), Duration::from_millis(50));
    }
}
