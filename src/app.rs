//! Assembles the process: store → supervision tree → HTTP, and tears it down in reverse.
//!
//! [`run`] takes its listener and a shutdown future so tests can start real servers on
//! `127.0.0.1:0` and stop them; `main` passes the configured address and SIGTERM/SIGINT.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::actors::outbox_relay::RelayArgs;
use crate::actors::Tenants;
use crate::bus::{BusConfig, EventBus, RabbitBus, SqliteBus};
use crate::config::Config;
use crate::http::{self, AppState};
use crate::jobs::{
    JobClient, JobError, JobQueue, Kinds, QueueConfig, RedisJobQueue, RetrySchedule, Runner, RunnerConfig,
    SqliteJobQueue,
};
use crate::store::{self, redact_url, Store, StoreError};
use crate::supervision::root::{JobsDeps, PipelineDeps, RootDeps};
use crate::supervision::Root;

/// Longest an actor call may take before the request answers 503.
const ACTOR_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest in-flight requests may take to finish once shutdown began.
const HTTP_DRAIN: Duration = Duration::from_secs(10);
/// Longest the supervision tree may take to drain on shutdown. With [`HTTP_DRAIN`],
/// a SIGTERM exits within 25 s whatever state the dependencies are in (SPEC §4: 30 s).
const TREE_SHUTDOWN: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Backend(String),
    #[error("could not start the supervision tree: {0}")]
    Actors(String),
    #[error("the supervision tree failed past the root (restart intensity exceeded)")]
    TreeDown,
    #[error("http server: {0}")]
    Io(#[from] std::io::Error),
}

/// Opens the store named by the config and applies migrations.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StoreError> {
    let store = store::connect(&config.database_url, config.db_max_connections).await?;
    store.migrate().await?;
    Ok(store)
}

/// The job queue a config names: Redis when `REDIS_URL` is set, else the embedded
/// SQLite queue (in the database of record's file, or `<data dir>/jobs.db` beside
/// PostgreSQL: a per-host queue, fine for one process; scale-out wants Redis).
pub async fn open_job_queue(config: &Config, store: &dyn Store) -> Result<Arc<dyn JobQueue>, StartupError> {
    let queue_config = QueueConfig {
        schedule: RetrySchedule { time_scale: config.jobs.time_scale, jitter: config.jobs.jitter },
        ..QueueConfig::default()
    };
    let backend = |e: JobError| StartupError::Backend(format!("job queue: {e}"));
    if let Some(url) = &config.redis_url {
        let q = RedisJobQueue::connect(url, &config.namespace, queue_config).await.map_err(backend)?;
        return Ok(Arc::new(q));
    }
    if let Some(pools) = store.sqlite_pools() {
        // The database of record's own file and writer (already migrated).
        return Ok(Arc::new(SqliteJobQueue::new(pools, queue_config)));
    }
    tracing::warn!("REDIS_URL is unset: jobs use {}/jobs.db, local to this host", config.data_dir.display());
    let url = format!("sqlite://{}", config.data_dir.join("jobs.db").display());
    Ok(Arc::new(SqliteJobQueue::open(&url, queue_config).await.map_err(backend)?))
}

/// The event bus a config names: RabbitMQ when `AMQP_URL` is set, else the embedded
/// SQLite bus (in the database of record's file, or `<data dir>/bus.db` beside
/// PostgreSQL: local to that host).
pub async fn open_bus(config: &Config, store: &dyn Store) -> Result<Arc<dyn EventBus>, StartupError> {
    let bus_config =
        BusConfig { max_deliveries: config.pipeline.max_deliveries, visibility: config.pipeline.visibility };
    if let Some(url) = &config.amqp_url {
        let bus = RabbitBus::lazy(url, &config.namespace, bus_config);
        if let Err(e) = bus.ping().await {
            tracing::warn!(error = %e, "RabbitMQ is unreachable at start; the relay and consumers retry until it is back");
        }
        return Ok(Arc::new(bus));
    }
    if let Some(pools) = store.sqlite_pools() {
        return Ok(Arc::new(SqliteBus::new(pools, bus_config)));
    }
    tracing::warn!("AMQP_URL is unset: the event bus uses {}/bus.db, local to this host", config.data_dir.display());
    let url = format!("sqlite://{}", config.data_dir.join("bus.db").display());
    let db = crate::store::SqliteStore::connect(&url, 8).await?;
    db.migrate().await?;
    Ok(Arc::new(SqliteBus::new(db.pools(), bus_config)))
}

fn hostname() -> String {
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "eventra".into())
}

/// The job pool's queues, by role: `worker` runs the `default` queue (emails, and any
/// job enqueued without a queue), `indexer` the `index` queue (search documents and
/// audit entries).
fn runner_config(config: &Config) -> RunnerConfig {
    let mut queues = Vec::new();
    if config.has_role("worker") {
        queues.push("default".into());
    }
    if config.has_role("indexer") {
        queues.push(crate::jobs::kinds::index::QUEUE.into());
    }
    RunnerConfig {
        queues,
        lease: config.jobs.lease,
        timeout: config.jobs.timeout,
        idle_poll: config.jobs.poll.min(Duration::from_millis(200)),
        batch: config.jobs.batch,
        workers: u32::try_from(config.jobs.workers).unwrap_or(u32::MAX),
    }
}

/// Runs the service until `shutdown` resolves, then drains HTTP, then the actor tree.
pub async fn run(
    config: Arc<Config>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    run_with(config, listener, shutdown, Kinds::default()).await
}

/// [`run`] with extra job kinds beside the standard ones (tests, embedders).
pub async fn run_with(
    config: Arc<Config>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    extra_kinds: Kinds,
) -> Result<(), StartupError> {
    let port = listener.local_addr()?.port();
    let store = open_store(&config).await?;
    tracing::info!(backend = store.backend(), url = %redact_url(&config.database_url), "database ready");

    let mailer = crate::mail::from_config(config.smtp_url.as_deref(), config.data_dir.join("mail"))
        .map_err(|e| StartupError::Backend(format!("mail: {e}")))?;
    // With embedded search only the `indexer` process writes the index; `api` processes
    // elsewhere on the same data dir follow its commits.
    let writes_index = config.has_role("indexer");
    let raw_index =
        crate::search::open(config.opensearch_url.as_deref(), &config.namespace, &config.data_dir, writes_index)
            .await
            .map_err(|e| StartupError::Backend(e.to_string()))?;
    tracing::info!(backend = raw_index.backend(), writes = writes_index, "search index ready");
    // Writes go through the indexer actor; searches straight to the index.
    let (indexer, search) = crate::actors::indexer::IndexerDeps::new(raw_index);
    let search: Arc<dyn crate::search::SearchIndex> = Arc::new(search);
    let secret_box = Arc::new(
        crate::webhooks::secret_box::SecretBox::from_base64(config.secret_key.expose())
            .map_err(|e| StartupError::Backend(e.to_string()))?,
    );
    let delivery = crate::webhooks::delivery::WebhookDelivery::new(
        store.clone(),
        secret_box.clone(),
        crate::webhooks::delivery::DeliveryConfig {
            timeout: config.webhook_timeout,
            allow_private: config.webhook_allow_private,
            time_scale: config.jobs.time_scale,
        },
    )
    .map_err(|e| StartupError::Backend(format!("webhook HTTP client: {e}")))?;
    let kinds = Kinds::standard(
        store.clone(),
        mailer.clone(),
        config.jobs.mail_from.clone(),
        search.clone(),
        secret_box.clone(),
    )
    .with(Arc::new(delivery))
    .with_all(extra_kinds);
    let jobs = JobClient::new(open_job_queue(&config, store.as_ref()).await?, &kinds);
    tracing::info!(backend = jobs.queue.backend(), "job queue ready");
    // Webhook deliveries are the `worker` role's too, in their own pool.
    let webhook_runner = (config.has_role("worker") && config.webhook_workers > 0).then(|| {
        let c = RunnerConfig {
            queues: vec![crate::webhooks::delivery::QUEUE.into()],
            batch: crate::webhooks::delivery::WORKER_BATCH,
            workers: u32::try_from(config.webhook_workers).unwrap_or(u32::MAX),
            ..runner_config(&config)
        };
        Arc::new(Runner::new(jobs.clone(), kinds.clone(), c))
    });
    let job_deps =
        ((config.has_role("worker") || config.has_role("indexer")) && config.jobs.workers > 0).then(|| JobsDeps {
            runner: Arc::new(Runner::new(jobs.clone(), kinds, runner_config(&config))),
            workers: config.jobs.workers,
            webhook_runner: webhook_runner.clone(),
            webhook_workers: config.webhook_workers,
            scheduler_every: config.jobs.poll,
            process: format!("{}:{port}", hostname()),
        });
    tracing::info!(
        mail = mailer.kind(),
        workers = job_deps.as_ref().map_or(0, |j| j.workers),
        "job workers configured"
    );

    let runner = job_deps.as_ref().map(|j| j.runner.clone());

    let bus = open_bus(&config, store.as_ref()).await?;
    tracing::info!(backend = bus.backend(), "event bus ready");
    let outbox_wake = Arc::new(tokio::sync::Notify::new());
    let p = &config.pipeline;
    let relay = config.has_role("relay").then(|| RelayArgs {
        store: store.clone(),
        bus: bus.clone(),
        holder: format!("{}:{}", hostname(), port),
        lease_ttl: p.relay_lease,
        poll: p.relay_poll,
        batch: p.relay_batch,
        wake: outbox_wake.clone(),
        database_url: Some(config.database_url.clone()),
        retention: p.outbox_retention,
    });
    let consumers = if config.has_role("consumer") { p.consumers } else { 0 };
    let pipeline = (relay.is_some() || consumers > 0).then(|| PipelineDeps {
        relay,
        consumers,
        bus: bus.clone(),
        store: store.clone(),
        jobs: jobs.clone(),
        prefetch: p.prefetch,
    });
    let metrics = crate::telemetry::metrics();
    let metrics_history = metrics.clone().map(crate::metrics_history::MetricsHistory::new);
    let api = config.has_role("api");
    let deps = RootDeps {
        store: store.clone(),
        api,
        tenant_idle_timeout: config.tenant_idle_timeout,
        max_tenant_managers: config.max_tenant_managers,
        jobs: job_deps,
        pipeline,
        // Index writes come from the index jobs, which the job workers run.
        // The index jobs (the `indexer` role's queue) write through it.
        indexer: config.has_role("indexer").then_some(indexer),
        metrics_history: metrics_history.clone(),
    };
    let root = Root::start(deps).await.map_err(|e| StartupError::Actors(e.to_string()))?;
    let store_for_webhooks = store.clone();
    let auth = crate::auth::Auth::new(
        store.clone(),
        secret_box.clone(),
        config.secret_key.expose(),
        jobs.clone(),
        config.auth.clone(),
        config.redis_url.as_deref().map(|u| (u, config.namespace.as_str())),
    )
    .map_err(StartupError::Backend)?;
    let effect_lag = crate::jobs::EffectLag::spawn(jobs.queue.clone(), config.max_effect_lag);
    let ingest =
        crate::ingest::Ingest::new(store.clone(), config.ingest_max_backlog, effect_lag.clone(), outbox_wake.clone());
    let tenants = Tenants::new(root.tenants.clone(), store, ACTOR_CALL_TIMEOUT, config.max_tenant_managers)
        .with_outbox_wake(outbox_wake)
        .with_effect_lag(effect_lag);
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let state = AppState::new(crate::http::AppStateParts {
        api,
        draining: draining.clone(),
        tenants,
        admin_token: Arc::new(config.admin_token.clone()),
        tree: root.tree.clone(),
        chaos: config.chaos,
        metrics,
        metrics_history,
        sessions: Arc::new(crate::http::dashboard::Sessions::new(config.admin_token.expose())),
        webhooks: crate::webhooks::Webhooks::new(
            store_for_webhooks,
            jobs.clone(),
            secret_box,
            config.webhook_allow_private,
        ),
        ingest,
        auth,
        jobs,
        bus,
        search,
    });
    if config.chaos {
        tracing::warn!("chaos mode: POST /debug/actors/{{name}}/kill is enabled");
    }
    // Without the `api` role a process serves its operator surface only: health,
    // metrics, the tree, the dead letters and the job sets.
    let app = if api { http::router(state, config.max_body_bytes) } else { http::operator_router(state) };

    // Stop serving when asked to, or when the tree is gone: a root that escalated has no
    // parent left to decide, so the process exits (non-zero) for its orchestrator to restart.
    let tree_died = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let stop = {
        let tree_died = tree_died.clone();
        let mut join = root.join;
        let (draining, grace) = (draining.clone(), config.drain_grace);
        let runners: Vec<_> = runner.iter().chain(webhook_runner.iter()).cloned().collect();
        async move {
            tokio::select! {
                _ = shutdown => {
                    // Readiness turns 503 first; requests are still served meanwhile, so
                    // a load balancer takes this process out before its listener closes.
                    draining.store(true, std::sync::atomic::Ordering::SeqCst);
                    // Workers take no new jobs from now on: they finish the batch in hand
                    // while the tree stops, and other processes take the rest.
                    for r in &runners {
                        r.drain();
                    }
                    if !grace.is_zero() {
                        tracing::info!(grace_ms = grace.as_millis() as u64,
                            "draining: readiness answers 503; new connections refused after the grace");
                        tokio::select! {
                            _ = tokio::time::sleep(grace) => {}
                            _ = &mut join => {
                                tree_died.store(true, std::sync::atomic::Ordering::SeqCst);
                            }
                        }
                    }
                }
                _ = &mut join => {
                    tracing::error!("the supervision tree stopped; shutting down");
                    tree_died.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
            let _ = stopping.send(());
        }
    };
    tracing::info!(addr = %listener.local_addr()?, "http listening");
    // With the peer address: sessions record the client IP (and rate limits key on it).
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let serve = axum::serve(listener, app).with_graceful_shutdown(stop).into_future();
    tokio::pin!(serve);
    // Graceful, but bounded: requests still running after the drain time are cut.
    let drain_deadline = async {
        if stopped.await.is_ok() {
            tokio::time::sleep(HTTP_DRAIN).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let served = tokio::select! {
        r = &mut serve => r,
        _ = drain_deadline => {
            tracing::warn!(drain = ?HTTP_DRAIN, "requests still in flight after the drain time; closing them");
            Ok(())
        }
    };
    tracing::info!("http drained; stopping the supervision tree");
    if let Some(runner) = &runner {
        // (Again, for a stop the tree itself began.)
        runner.drain();
    }
    if let Some(runner) = &webhook_runner {
        runner.drain();
    }
    if root.actor.stop_and_wait(Some("shutdown".into()), Some(TREE_SHUTDOWN)).await.is_err() {
        tracing::warn!("supervision tree did not stop in time");
    }
    if tree_died.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(StartupError::TreeDown);
    }
    tracing::info!("shutdown complete");
    served.map_err(StartupError::from)
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received; shutting down"),
        _ = term => tracing::info!("SIGTERM received; shutting down"),
    }
}
