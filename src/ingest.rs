//! What the custom-event endpoints of the API do (SPEC §9; the HTTP layer only
//! translates): tenants' event types with their compiled schemas, validated ingestion
//! into the outbox, analytics reads, and backpressure.
//!
//! ## Schemas, compiled once
//! A type's schema is compiled at its first use in a process and cached with the type's
//! `version`. Each ingestion reads the current versions of the types it uses (one small
//! query for a whole batch), so a schema replaced or deleted in any process is in force
//! in every process from its next request on.
//!
//! ## Backpressure
//! A tenant's backlog is its events accepted (the tenant's event sequence) minus those
//! processed (counted in the analytics when they are audited): the whole path, outbox,
//! broker, consumers and jobs. While it is past `EVENTRA_INGEST_MAX_BACKLOG`, ingestion
//! answers 429 with `Retry-After`; accepted events are never dropped. The backlog is read
//! at most every [`BACKLOG_EVERY`] per tenant and process (what the process accepts
//! meanwhile is added to its reading), so a process overshoots by one batch at most.
//! The limit is per tenant: one tenant's flood does not refuse the others' events.
//! Ingestion also honours the job workers' load shedding (503), like every write.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::analytics::{EventAnalytics, Grain};
use crate::domain::custom_event::{
    EventInput, EventTypeDef, EventTypeInput, Ingested, NewCustomEvent, Schema, MAX_BATCH,
};
use crate::domain::{EventContext, ValidationErrors};
use crate::error::{Error, Result};
use crate::store::Store;

/// How long a tenant's backlog reading is reused.
pub const BACKLOG_EVERY: Duration = Duration::from_millis(250);
/// The longest analytics window, per grain (the rows read stay bounded).
const MAX_WINDOW_DAYS: [i64; 3] = [2, 62, 3660];

/// Compiled schemas by (tenant, type), with the version they were compiled from.
type SchemaCache = quick_cache::sync::Cache<(Uuid, String), (i64, Arc<Schema>)>;

/// One event's outcome in a batch.
#[derive(Debug)]
pub enum ItemOutcome {
    Accepted(Ingested),
    Invalid(ValidationErrors),
}

#[derive(Clone)]
pub struct Ingest {
    store: Arc<dyn Store>,
    schemas: Arc<SchemaCache>,
    backlogs: Arc<Mutex<HashMap<Uuid, (Instant, i64)>>>,
    /// Above this many unprocessed events a tenant's ingestion answers 429 (0: off).
    max_backlog: i64,
    lag: Arc<crate::jobs::EffectLag>,
    /// Rung after every write that added events (the outbox relay listens).
    outbox_wake: Arc<tokio::sync::Notify>,
}

impl Ingest {
    pub fn new(
        store: Arc<dyn Store>,
        max_backlog: u64,
        lag: Arc<crate::jobs::EffectLag>,
        outbox_wake: Arc<tokio::sync::Notify>,
    ) -> Self {
        Ingest {
            store,
            schemas: Arc::new(quick_cache::sync::Cache::new(10_000)),
            backlogs: Arc::default(),
            max_backlog: i64::try_from(max_backlog).unwrap_or(i64::MAX),
            lag,
            outbox_wake,
        }
    }

    // ---- event types ----

    /// Creates or replaces a type; `true` when it was created.
    pub async fn put_type(&self, tenant_id: Uuid, name: &str, input: EventTypeInput) -> Result<(EventTypeDef, bool)> {
        let (def, compiled) = EventTypeDef::parse(tenant_id, name, input, crate::domain::now())?;
        let stored = self.store.put_event_type(&def).await?;
        self.schemas.insert((tenant_id, stored.name.clone()), (stored.version, Arc::new(compiled)));
        let created = stored.version == 1;
        Ok((stored, created))
    }

    pub async fn get_type(&self, tenant_id: Uuid, name: &str) -> Result<EventTypeDef> {
        self.store.get_event_type(tenant_id, name).await?.ok_or(Error::NotFound("event type"))
    }

    pub async fn list_types(&self, tenant_id: Uuid) -> Result<Vec<EventTypeDef>> {
        self.store.get_tenant(tenant_id).await?;
        Ok(self.store.list_event_types(tenant_id).await?)
    }

    /// Deletes a type: new events of it are refused; those accepted are still processed.
    pub async fn delete_type(&self, tenant_id: Uuid, name: &str) -> Result<()> {
        self.store.delete_event_type(tenant_id, name).await?;
        self.schemas.remove(&(tenant_id, name.to_owned()));
        Ok(())
    }

    /// The compiled schemas of the registered types among `names`, current in every
    /// process (see the module note).
    async fn schemas(&self, tenant_id: Uuid, names: Vec<String>) -> Result<HashMap<String, Arc<Schema>>> {
        let mut out = HashMap::new();
        for (name, version) in self.store.event_type_versions(tenant_id, &names).await? {
            let key = (tenant_id, name.clone());
            match self.schemas.get(&key) {
                Some((v, schema)) if v == version => {
                    out.insert(name, schema);
                }
                _ => {
                    let Some(def) = self.store.get_event_type(tenant_id, &name).await? else { continue };
                    // Stored schemas compiled when they were put; one that no longer does
                    // (a newer crate is stricter) refuses its events rather than panicking.
                    let Ok(schema) = crate::domain::custom_event::compile(&def.schema) else {
                        tracing::warn!(%tenant_id, event_type = %name, "a stored event schema no longer compiles");
                        continue;
                    };
                    let schema = Arc::new(schema);
                    self.schemas.insert(key, (def.version, schema.clone()));
                    out.insert(name, schema);
                }
            }
        }
        Ok(out)
    }

    // ---- ingestion ----

    /// 429 while the tenant's backlog is past the limit; 503 while the job workers shed.
    async fn admit(&self, tenant_id: Uuid) -> Result<()> {
        self.lag.admit().map_err(|lag| {
            Error::Unavailable(format!(
                "effects are {:.1} s behind (the job workers are catching up); retry after the Retry-After delay",
                lag.as_secs_f64()
            ))
        })?;
        if self.max_backlog == 0 {
            return Ok(());
        }
        let cached = {
            let map = self.backlogs.lock().unwrap_or_else(|e| e.into_inner());
            map.get(&tenant_id).filter(|(at, _)| at.elapsed() < BACKLOG_EVERY).map(|(_, n)| *n)
        };
        let backlog = match cached {
            Some(n) => n,
            None => {
                let n = self.store.tenant_backlog(tenant_id).await?.ok_or(Error::NotFound("tenant"))?;
                let mut map = self.backlogs.lock().unwrap_or_else(|e| e.into_inner());
                if map.len() > 100_000 {
                    map.retain(|_, (at, _)| at.elapsed() < BACKLOG_EVERY);
                }
                map.insert(tenant_id, (Instant::now(), n));
                n
            }
        };
        metrics::gauge!("eventra_ingest_backlog").set(backlog as f64);
        if backlog >= self.max_backlog {
            metrics::counter!("eventra_ingest_refused_total").increment(1);
            return Err(Error::TooManyRequests(format!(
                "{backlog} of this tenant's events are accepted and not yet processed (the limit is {}); \
                 retry after the Retry-After delay",
                self.max_backlog
            )));
        }
        Ok(())
    }

    /// Validates and writes a batch: each event's outcome, in order. The accepted ones
    /// are written in one transaction.
    pub async fn ingest(
        &self,
        tenant_id: Uuid,
        items: Vec<Result<EventInput, ValidationErrors>>,
        ctx: &EventContext,
    ) -> Result<Vec<ItemOutcome>> {
        if items.len() > MAX_BATCH {
            return Err(ValidationErrors::single("events", format!("at most {MAX_BATCH} events a batch")).into());
        }
        self.admit(tenant_id).await?;
        let mut names: Vec<String> =
            items.iter().filter_map(|i| i.as_ref().ok()).map(|i| i.event_type.clone()).collect();
        names.sort();
        names.dedup();
        let schemas = self.schemas(tenant_id, names).await?;
        let now = crate::domain::now();
        let mut outcomes: Vec<Option<ItemOutcome>> = Vec::with_capacity(items.len());
        let mut accepted: Vec<(usize, NewCustomEvent)> = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let parsed = item.and_then(|input| {
                let schema = schemas.get(&input.event_type).map(Arc::as_ref);
                NewCustomEvent::parse(tenant_id, input, schema, ctx, now)
            });
            match parsed {
                Ok(event) => {
                    accepted.push((i, event));
                    outcomes.push(None);
                }
                Err(e) => outcomes.push(Some(ItemOutcome::Invalid(e))),
            }
        }
        if accepted.is_empty() && self.max_backlog == 0 {
            // Nothing to write and no backlog read: an unknown tenant is still a 404.
            self.store.get_tenant(tenant_id).await?;
        }
        if !accepted.is_empty() {
            let events: Vec<NewCustomEvent> = accepted.iter().map(|(_, e)| e.clone()).collect();
            let written = self.store.ingest_events(tenant_id, &events).await?;
            let new = written.iter().filter(|w| w.new).count();
            for ((i, _), w) in accepted.iter().zip(written) {
                outcomes[*i] = Some(ItemOutcome::Accepted(w));
            }
            if new > 0 {
                // The reading in hand counts what this process adds until the next one, so
                // a process overshoots the limit by one batch at most.
                if let Some((_, n)) = self.backlogs.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&tenant_id) {
                    *n += new as i64;
                }
                metrics::counter!("eventra_events_ingested_total").increment(new as u64);
                self.outbox_wake.notify_one();
                if let Err(e) = self.store.notify_outbox().await {
                    tracing::debug!(error = %e, "outbox notification not sent; the relay polls");
                }
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| ItemOutcome::Invalid(ValidationErrors::single("", "not processed"))))
            .collect())
    }

    // ---- analytics ----

    /// SPEC §9's analytics of `[from, to)` at `grain`, optionally for one type.
    pub async fn analytics(
        &self,
        tenant_id: Uuid,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        grain: Grain,
        event_type: Option<&str>,
    ) -> Result<EventAnalytics> {
        if to <= from {
            return Err(ValidationErrors::single("to", "must be after from").into());
        }
        let longest = MAX_WINDOW_DAYS[grain.code() as usize];
        if to - from > chrono::TimeDelta::days(longest) {
            return Err(ValidationErrors::single(
                "from",
                format!("the window is at most {longest} days at bucket={grain:?} (use a coarser bucket)"),
            )
            .into());
        }
        self.store.get_tenant(tenant_id).await?;
        let rows = self.store.event_stats(tenant_id, grain, from, to, event_type).await?;
        Ok(EventAnalytics::from_rows(from, to, grain, &rows))
    }
}
