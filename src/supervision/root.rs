//! The process's supervision tree, declared as data: the root's child table.
//!
//! ```text
//! root (one_for_one; every supervisor allows 5 restarts per child in 5 s)
//! ├── tenants (supervisor, one_for_one, dynamic children; passivates idle ones)
//! │   └── tenant-<uuid>: one per active tenant (transient): group-commits its writes
//! ├── idempotency-purge: deletes expired idempotency records and old webhook delivery
//! │   log rows every 5 minutes
//! ├── metrics-sampler: keeps a window of `/metrics` for the dashboard (every 2 s)
//! ├── indexer: batches index changes by count and time; circuit breaker
//! ├── jobs (supervisor, one_for_one; `worker` role)
//! │   ├── job-scheduler: due scheduled and retrying jobs become ready
//! │   ├── job-reaper: jobs of dead workers (lapsed leases) go back to their queue
//! │   ├── job-worker-1 … job-worker-N: run jobs
//! │   └── webhook-worker-1 … N: deliver webhooks (queue `webhooks`, small batches)
//! └── pipeline (supervisor, one_for_one; `relay` and `consumer` roles)
//!     ├── outbox-relay: outbox rows → event bus (one active per database)
//!     └── event-consumer-1 … N: events → jobs, ack after enqueue
//! ```

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorRef, SpawnErr};

use super::spec::{ChildSpec, Intensity, Passivation, StartCtx, StartFn, Strategy, SupervisorSpec};
use super::supervisor::{Supervisor, SupervisorMsg};
use super::tree::Tree;
use crate::actors::event_consumer::{ConsumerArgs, EventConsumer, SubscriptionSlot};
use crate::actors::job_worker::{JobWorker, JobWorkerArgs};
use crate::actors::outbox_relay::{OutboxRelay, RelayArgs};
use crate::actors::periodic::{Periodic, PeriodicArgs, Task};
use crate::bus::EventBus;
use crate::jobs::runner::SharedRunner;
use crate::jobs::JobClient;
use crate::jobs::JobState;
use crate::store::Store;

/// Where the live `tenants` supervisor is published for the `Tenants` door; its start
/// function replaces it on every (re)start.
pub type TenantsSlot = Arc<RwLock<Option<ActorRef<SupervisorMsg>>>>;

/// What the tree's actors need from the rest of the process.
#[derive(Clone)]
pub struct RootDeps {
    pub store: Arc<dyn Store>,
    /// The `api` role: the tenant managers (the write path), the purge and the metrics
    /// sampler (the dashboard's) run only with it.
    pub api: bool,
    /// When tenant managers are passivated: idle this long, or past this many.
    pub tenant_idle_timeout: Duration,
    pub max_tenant_managers: usize,
    /// The job system, when this process has the `worker` role.
    pub jobs: Option<JobsDeps>,
    /// The event pipeline (relay and/or consumers), by role.
    pub pipeline: Option<PipelineDeps>,
    /// The indexing actor: the index it writes to and where it publishes itself.
    pub indexer: Option<crate::actors::indexer::IndexerDeps>,
    /// Where `metrics-sampler` keeps its samples (`None`: no recorder, no sampler).
    pub metrics_history: Option<crate::metrics_history::MetricsHistory>,
}

/// What the `pipeline` subtree needs.
#[derive(Clone)]
pub struct PipelineDeps {
    /// The outbox relay (`relay` role).
    pub relay: Option<RelayArgs>,
    /// Broker consumers (`consumer` role): how many, on which bus, feeding which queue.
    pub consumers: usize,
    pub bus: Arc<dyn EventBus>,
    /// The consumers read the tenants' webhook endpoints from it.
    pub store: Arc<dyn Store>,
    pub jobs: JobClient,
    pub prefetch: u16,
}

/// What the `jobs` subtree needs.
#[derive(Clone)]
pub struct JobsDeps {
    pub runner: SharedRunner,
    pub workers: usize,
    /// The webhook deliveries' own pool (queue `webhooks`, one job at a time each).
    pub webhook_runner: Option<SharedRunner>,
    pub webhook_workers: usize,
    /// How often the scheduler promotes due jobs.
    pub scheduler_every: Duration,
    /// This process (`host:port`): leased jobs name their worker `job-worker-N@<process>`,
    /// so the job views tell which process of a scaled-out deployment holds a job.
    pub process: String,
}

/// The running tree.
pub struct RootHandle {
    pub actor: ActorRef<SupervisorMsg>,
    /// Completes when the root stops, normally or by escalation.
    pub join: JoinHandle<()>,
    pub tenants: TenantsSlot,
    pub tree: Tree,
}

/// The root's children, started in this order and stopped in reverse.
pub fn root_children(deps: &RootDeps, slot: &TenantsSlot) -> Vec<ChildSpec> {
    let mut children = Vec::new();
    if deps.api {
        children.push(
            ChildSpec::worker("tenants", tenants_start(tenants_spec(deps), slot.clone()))
                .supervisor()
                .shutdown(Duration::from_secs(15)),
        );
        children
            .push(ChildSpec::worker("idempotency-purge", periodic_start(PURGE_EVERY, purge_task(deps.store.clone()))));
    }
    if let Some(history) = deps.metrics_history.as_ref().filter(|_| deps.api) {
        let history = history.clone();
        let task: Task = Arc::new(move || {
            let history = history.clone();
            Box::pin(async move { Ok(history.sample() as u64) })
        });
        children.push(ChildSpec::worker("metrics-sampler", periodic_start(crate::metrics_history::SAMPLE_EVERY, task)));
    }
    // Before `jobs`: the index jobs write through it.
    if let Some(indexer) = &deps.indexer {
        let indexer = indexer.clone();
        let start: StartFn = Arc::new(move |ctx: StartCtx| {
            let crate::actors::indexer::IndexerDeps { index, slot, stats } = indexer.clone();
            Box::pin(async move {
                let args = crate::actors::indexer::IndexerArgs { index, stats };
                let (actor, _) = Actor::spawn_linked(None, crate::actors::indexer::Indexer, args, ctx.parent).await?;
                if let Ok(mut s) = slot.write() {
                    *s = Some(actor.clone());
                }
                Ok(actor.get_cell())
            })
        });
        children.push(ChildSpec::worker("indexer", start));
    }
    if let Some(jobs) = &deps.jobs {
        children.push(Supervisor::child(jobs_spec(jobs)).shutdown(Duration::from_secs(16)));
    }
    // After `jobs`: the consumers' output is jobs.
    if let Some(pipeline) = &deps.pipeline {
        children.push(Supervisor::child(pipeline_spec(pipeline)).shutdown(Duration::from_secs(10)));
    }
    children
}

/// The `pipeline` subtree: the relay, then the consumers; one-for-one.
pub fn pipeline_spec(p: &PipelineDeps) -> SupervisorSpec {
    let mut children = Vec::new();
    if let Some(relay) = &p.relay {
        let relay = relay.clone();
        let start: StartFn = Arc::new(move |ctx: StartCtx| {
            let relay = relay.clone();
            Box::pin(async move {
                let (actor, _) = Actor::spawn_linked(None, OutboxRelay, relay, ctx.parent).await?;
                Ok(actor.get_cell())
            })
        });
        children.push(ChildSpec::worker("outbox-relay", start));
    }
    for n in 1..=p.consumers {
        let (bus, jobs, prefetch, store) = (p.bus.clone(), p.jobs.clone(), p.prefetch, p.store.clone());
        // One per consumer, made once: every incarnation of the consumer takes over the
        // subscription and the batch in hand of the one before it.
        let slot: SubscriptionSlot = Arc::default();
        let start: StartFn = Arc::new(move |ctx: StartCtx| {
            let args = ConsumerArgs {
                bus: bus.clone(),
                jobs: jobs.clone(),
                store: store.clone(),
                name: ctx.name.clone(),
                prefetch,
                slot: slot.clone(),
            };
            Box::pin(async move {
                let (actor, _) = Actor::spawn_linked(None, EventConsumer, args, ctx.parent).await?;
                Ok(actor.get_cell())
            })
        });
        children.push(ChildSpec::worker(format!("event-consumer-{n}"), start));
    }
    let intensity = Intensity::per_child(children.len());
    SupervisorSpec { intensity, ..SupervisorSpec::new("pipeline", Strategy::OneForOne, children) }
}

/// How often the scheduler refreshes the `eventra_jobs{state}` gauges.
const GAUGE_EVERY: Duration = Duration::from_secs(5);

/// The `jobs` subtree: scheduler, reaper, then the workers. One-for-one: each piece
/// recovers alone (a killed worker's job comes back through the reaper).
pub fn jobs_spec(jobs: &JobsDeps) -> SupervisorSpec {
    let queue = jobs.runner.client().queue.clone();
    let scheduler: Task = {
        let queue = queue.clone();
        let gauges_due = Arc::new(std::sync::Mutex::new(std::time::Instant::now()));
        Arc::new(move || {
            let (queue, gauges_due) = (queue.clone(), gauges_due.clone());
            Box::pin(async move {
                let promoted = queue.promote_due().await.map_err(|e| e.to_string())?;
                // Queue gauges ride along, at a gentler pace than the promotions.
                let now = std::time::Instant::now();
                let due = {
                    let mut at = gauges_due.lock().unwrap_or_else(|e| e.into_inner());
                    let due = now >= *at;
                    if due {
                        *at = now + GAUGE_EVERY;
                    }
                    due
                };
                if due {
                    for state in
                        [JobState::Ready, JobState::Scheduled, JobState::Running, JobState::Retry, JobState::Dead]
                    {
                        let n = queue.count(state).await.map_err(|e| e.to_string())?;
                        metrics::gauge!("eventra_jobs", "state" => state.as_str()).set(n as f64);
                    }
                }
                Ok(promoted)
            })
        })
    };
    let reaper: Task = {
        let queue = queue.clone();
        Arc::new(move || {
            let queue = queue.clone();
            Box::pin(async move {
                let n = queue.reap_expired().await.map_err(|e| e.to_string())?;
                if n > 0 {
                    metrics::counter!("eventra_jobs_reaped_total").increment(n);
                    tracing::warn!(jobs = n, "reaper: leases lapsed (worker died); jobs returned to their queues");
                }
                Ok(n)
            })
        })
    };
    let lease = jobs.runner.config().lease;
    let mut children = vec![
        ChildSpec::worker("job-scheduler", periodic_start(jobs.scheduler_every, scheduler)),
        ChildSpec::worker("job-reaper", periodic_start((lease / 4).max(Duration::from_millis(50)), reaper)),
    ];
    // Stop waits for the batch in hand (the runner drains first, so no new batch is
    // taken); past this, the batch is left to the reaper.
    for n in 1..=jobs.workers {
        children.push(worker_child(format!("job-worker-{n}"), &jobs.process, &jobs.runner, Duration::from_secs(15)));
    }
    if let Some(webhook_runner) = &jobs.webhook_runner {
        for n in 1..=jobs.webhook_workers {
            children.push(worker_child(
                format!("webhook-worker-{n}"),
                &jobs.process,
                webhook_runner,
                Duration::from_secs(20),
            ));
        }
    }
    let intensity = Intensity::per_child(children.len());
    SupervisorSpec { intensity, ..SupervisorSpec::new("jobs", Strategy::OneForOne, children) }
}

/// A job worker on `runner`'s queues; the jobs it leases name it `<tree name>@<process>`.
fn worker_child(name: String, process: &str, runner: &SharedRunner, shutdown: Duration) -> ChildSpec {
    let runner = runner.clone();
    let process = process.to_owned();
    let start: StartFn = Arc::new(move |ctx: StartCtx| {
        let runner = runner.clone();
        let name = format!("{}@{process}", ctx.name);
        Box::pin(async move {
            let args = JobWorkerArgs { runner, name };
            let (worker, _) = Actor::spawn_linked(None, JobWorker, args, ctx.parent).await?;
            Ok(worker.get_cell())
        })
    });
    ChildSpec::worker(name, start).shutdown(shutdown)
}

fn periodic_start(every: Duration, task: Task) -> StartFn {
    Arc::new(move |ctx: StartCtx| {
        let task = task.clone();
        Box::pin(async move {
            let args = PeriodicArgs { name: ctx.name.clone(), every, task };
            let (actor, _) = Actor::spawn_linked(None, Periodic, args, ctx.parent).await?;
            Ok(actor.get_cell())
        })
    })
}

pub fn root_spec(deps: &RootDeps, slot: &TenantsSlot) -> SupervisorSpec {
    let children = root_children(deps, slot);
    let intensity = Intensity::per_child(children.len());
    SupervisorSpec { intensity, ..SupervisorSpec::new("root", Strategy::OneForOne, children) }
}

/// The `tenants` supervisor: no fixed children; a manager per active tenant is started
/// on demand (by the `Tenants` door) and passivated when idle or past the limit.
pub fn tenants_spec(deps: &RootDeps) -> SupervisorSpec {
    SupervisorSpec {
        intensity: Intensity::per_child(1),
        passivation: Some(Passivation {
            idle: deps.tenant_idle_timeout,
            max_children: deps.max_tenant_managers.max(1),
            intensity_per_child: true,
        }),
        ..SupervisorSpec::new("tenants", Strategy::OneForOne, Vec::new())
    }
}

/// Starts the `tenants` supervisor and publishes it for the door.
fn tenants_start(spec: SupervisorSpec, slot: TenantsSlot) -> StartFn {
    Arc::new(move |ctx: StartCtx| {
        let (spec, slot) = (spec.clone(), slot.clone());
        Box::pin(async move {
            let (supervisor, _) =
                Supervisor::start(spec, ctx.tree.clone(), Some((ctx.parent, ctx.parent_name))).await?;
            if let Ok(mut s) = slot.write() {
                *s = Some(supervisor.clone());
            }
            Ok(supervisor.get_cell())
        })
    })
}

/// How often expired idempotency records are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(300);

/// Deletes idempotency records past their retention (dead weight once they expire).
fn purge_task(store: Arc<dyn Store>) -> Task {
    Arc::new(move || {
        let store = store.clone();
        Box::pin(async move {
            let before = chrono::Utc::now() - chrono::Duration::hours(crate::store::IDEMPOTENCY_TTL_HOURS);
            let n = store.purge_idempotency_keys(before).await.map_err(|e| e.to_string())?;
            if n > 0 {
                tracing::info!(deleted = n, "purged expired idempotency records");
            }
            // The webhook delivery log keeps 30 days, pruned in chunks.
            let before = chrono::Utc::now() - chrono::Duration::days(crate::store::DELIVERY_LOG_DAYS);
            let mut pruned = 0;
            loop {
                let d = store.prune_deliveries(before, 5_000).await.map_err(|e| e.to_string())?;
                pruned += d;
                if d < 5_000 {
                    break;
                }
            }
            if pruned > 0 {
                tracing::info!(deleted = pruned, "pruned webhook delivery log rows past their retention");
            }
            // Sessions expired or revoked a day ago go with their refresh tokens (a spent
            // token only matters while its session could still be used), and dead codes.
            let auth =
                store.purge_auth(chrono::Utc::now() - chrono::Duration::days(1)).await.map_err(|e| e.to_string())?;
            if auth > 0 {
                tracing::info!(deleted = auth, "purged ended sessions and expired one-time codes");
            }
            Ok(n + pruned + auth)
        })
    })
}

pub struct Root;

impl Root {
    /// Starts the whole tree; when this returns every child in the table is running.
    pub async fn start(deps: RootDeps) -> Result<RootHandle, SpawnErr> {
        let tree = Tree::new();
        let slot: TenantsSlot = Arc::new(RwLock::new(None));
        let (actor, join) = Supervisor::start(root_spec(&deps, &slot), tree.clone(), None).await?;
        if let Some(indexer) = &deps.indexer {
            // The records outlive restarts, so the views follow every indexer instance.
            let stats = indexer.stats.clone();
            tree.set_mailbox("indexer", Arc::new(move || stats.queued.load(std::sync::atomic::Ordering::Relaxed)));
            let stats = indexer.stats.clone();
            tree.set_stats("indexer", Arc::new(move || stats.view()));
        }
        Ok(RootHandle { actor, join, tenants: slot, tree })
    }
}
