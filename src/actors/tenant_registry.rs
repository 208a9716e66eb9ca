//! The `tenants` supervisor: owns tenant lifecycle and the per-tenant managers.
//!
//! Managers are started on the first request for their tenant and drained after
//! `idle_timeout` without one, so memory follows active tenants, not all tenants.
//! A manager that crashes (or is killed) is restarted at once; its mailbox is lost, so
//! callers waiting on it get "unavailable" and may retry with their Idempotency-Key.
//! Restarts count against the registry's restart intensity: a crash storm escalates
//! to `root`, which restarts the whole registry (one-for-one at the root).
//! Every manager appears in the tree as `tenant-<uuid>`, with its mailbox depth.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use uuid::Uuid;

use super::tenant_manager::{TenantManager, TenantManagerState, TenantMsg};
use crate::domain::{EventContext, NewApiKey, NewTenant, Tenant, TenantPatch};
use crate::error::{Error, Result};
use crate::store::Store;
use crate::supervision::intensity::RestartWindow;
use crate::supervision::supervisor::ChildExit;
use crate::supervision::{ChildKind, Intensity, Strategy, Tree};

/// What the registry does.
pub enum RegistryMsg {
    /// The manager of a tenant, started if it is not running.
    Manager { tenant_id: Uuid, reply: RpcReplyPort<Result<ManagerHandle>> },
    /// Create a tenant with its first admin key.
    CreateTenant { tenant: NewTenant, admin_key: NewApiKey, ctx: EventContext, reply: RpcReplyPort<Result<Tenant>> },
    /// Patch a tenant's name or limit.
    UpdateTenant { id: Uuid, patch: TenantPatch, ctx: EventContext, reply: RpcReplyPort<Result<Tenant>> },
    /// Delete a tenant; its manager is stopped first.
    DeleteTenant { id: Uuid, ctx: EventContext, reply: RpcReplyPort<Result<()>> },
    /// Timer tick: drain managers idle for longer than the timeout.
    ReapIdle,
    /// The running managers.
    Managers { reply: RpcReplyPort<Vec<ManagerInfo>> },
}

/// A manager and the count of requests sent to it and not yet answered.
#[derive(Clone)]
pub struct ManagerHandle {
    pub actor: ActorRef<TenantMsg>,
    /// Incremented by senders before a call, decremented after: the mailbox depth.
    pub pending: Arc<AtomicUsize>,
}

/// A running manager, for tools and tests.
#[derive(Debug, Clone)]
pub struct ManagerInfo {
    pub tenant_id: Uuid,
    pub actor_id: ActorId,
    pub restarts: u32,
    pub last_failure: Option<String>,
    pub started_at: DateTime<Utc>,
}

/// Startup arguments.
pub struct RegistryArgs {
    pub store: Arc<dyn Store>,
    /// How long a manager may sit without requests before it is drained.
    pub idle_timeout: Duration,
    pub tree: Tree,
    /// This registry's name in the tree (`tenants`) and its parent's.
    pub name: String,
    pub parent: String,
}

/// One running manager.
struct Entry {
    actor: ActorRef<TenantMsg>,
    /// Shared with callers and the tree's mailbox gauge; survives restarts.
    pending: Arc<AtomicUsize>,
    /// Refreshed on every lookup; the reaper compares it to `idle_timeout`.
    last_used: Instant,
    restarts: u32,
    last_failure: Option<String>,
    started_at: DateTime<Utc>,
}

pub struct RegistryState {
    store: Arc<dyn Store>,
    idle_timeout: Duration,
    /// The live managers by tenant.
    managers: HashMap<Uuid, Entry>,
    tree: Tree,
    name: String,
    /// Manager restarts in the intensity window; too many escalate to `root`.
    window: RestartWindow,
    /// When expired idempotency records were last purged (done on the reaper's tick).
    last_purge: Option<Instant>,
}

/// The actor.
pub struct TenantRegistry;

impl Actor for TenantRegistry {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = RegistryArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let tick = (args.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        myself.send_interval(tick, || RegistryMsg::ReapIdle);
        // Register before any manager so they appear under this node.
        args.tree.started(&args.name, Some(&args.parent), ChildKind::Supervisor, myself.get_cell());
        args.tree.set_strategy(&args.name, Strategy::OneForOne);
        Ok(RegistryState {
            store: args.store,
            idle_timeout: args.idle_timeout,
            managers: HashMap::new(),
            tree: args.tree,
            name: args.name,
            window: RestartWindow::new(Intensity::per_child(1)),
            last_purge: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RegistryMsg::Manager { tenant_id, reply } => {
                let r = manager_for(&myself, state, tenant_id).await;
                let _ = reply.send(r);
            }
            // Tenant writes run beside the mailbox, not in it: a long cascade delete must
            // not hold up every other tenant's manager lookups. The database orders them.
            RegistryMsg::CreateTenant { tenant, admin_key, ctx, reply } => {
                let store = state.store.clone();
                tokio::spawn(async move {
                    let _ = reply.send(store.create_tenant(&tenant, &admin_key, &ctx).await.map_err(Into::into));
                });
            }
            RegistryMsg::UpdateTenant { id, patch, ctx, reply } => {
                let store = state.store.clone();
                tokio::spawn(async move {
                    let _ = reply.send(store.update_tenant(id, &patch, &ctx).await.map_err(Into::into));
                });
            }
            RegistryMsg::DeleteTenant { id, ctx, reply } => {
                if let Some(entry) = state.managers.remove(&id) {
                    entry.actor.stop(Some("tenant deleted".into()));
                    state.tree.remove(&manager_name(id));
                }
                let store = state.store.clone();
                tokio::spawn(async move {
                    let _ = reply.send(store.delete_tenant(id, &ctx).await.map_err(Into::into));
                });
            }
            RegistryMsg::ReapIdle => {
                reap_idle(state);
                purge_expired_idempotency(state);
            }
            RegistryMsg::Managers { reply } => {
                let infos = state
                    .managers
                    .iter()
                    .map(|(tenant_id, e)| ManagerInfo {
                        tenant_id: *tenant_id,
                        actor_id: e.actor.get_id(),
                        restarts: e.restarts,
                        last_failure: e.last_failure.clone(),
                        started_at: e.started_at,
                    })
                    .collect();
                let _ = reply.send(infos);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some(ChildExit { cell, abnormal: crashed, reason }) = ChildExit::of(event) else { return Ok(()) };
        let Some(tenant_id) = tenant_of(state, &cell) else { return Ok(()) };
        let Some(old) = state.managers.remove(&tenant_id) else { return Ok(()) };
        let name = manager_name(tenant_id);
        if !crashed {
            tracing::debug!(%tenant_id, %reason, "tenant manager stopped");
            state.tree.remove(&name);
            return Ok(());
        }
        restart_manager(&myself, state, tenant_id, old, reason).await
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        // Drain every manager at once (requests already queued are still answered),
        // then wait for them together within one deadline; stragglers are killed.
        let managers: Vec<(Uuid, Entry)> = state.managers.drain().collect();
        for (_, entry) in &managers {
            let _ = entry.actor.drain();
        }
        let deadline = tokio::time::Instant::now() + MANAGER_DRAIN;
        for (tenant_id, entry) in managers {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if entry.actor.get_cell().wait(Some(left)).await.is_err() {
                tracing::warn!(%tenant_id, "tenant manager did not drain in time; killed");
                entry.actor.kill();
            }
            state.tree.remove(&manager_name(tenant_id));
        }
        Ok(())
    }
}

/// How long managers may take, together, to finish their queued requests on shutdown.
const MANAGER_DRAIN: Duration = Duration::from_secs(10);

/// The tree name of a tenant's manager.
pub fn manager_name(tenant_id: Uuid) -> String {
    format!("tenant-{tenant_id}")
}

/// Finds the running manager or starts one for an existing tenant.
async fn manager_for(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    tenant_id: Uuid,
) -> Result<ManagerHandle> {
    if let Some(entry) = state.managers.get_mut(&tenant_id) {
        entry.last_used = Instant::now();
        return Ok(ManagerHandle { actor: entry.actor.clone(), pending: entry.pending.clone() });
    }
    // Only real tenants get an actor: random ids must not grow the registry.
    state.store.get_tenant(tenant_id).await?;
    let pending = Arc::new(AtomicUsize::new(0));
    let actor = spawn_manager(myself, state, tenant_id, pending.clone()).await?;
    let entry = Entry {
        actor: actor.clone(),
        pending: pending.clone(),
        last_used: Instant::now(),
        restarts: 0,
        last_failure: None,
        started_at: Utc::now(),
    };
    state.managers.insert(tenant_id, entry);
    Ok(ManagerHandle { actor, pending })
}

/// Restarts a crashed manager, or escalates when restarts come too fast.
async fn restart_manager(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    tenant_id: Uuid,
    old: Entry,
    reason: String,
) -> Result<(), ActorProcessingErr> {
    let name = manager_name(tenant_id);
    tracing::warn!(supervisor = %state.name, child = %name, %reason, "child failed");
    state.tree.failed(&name, &reason);
    state.window.set_limit(Intensity::per_child(state.managers.len() + 1));
    if !state.window.allow(tokio::time::Instant::now()) {
        tracing::error!(supervisor = %state.name, child = %name, "restart intensity exceeded; escalating to the parent");
        metrics::counter!("eventra_supervisor_escalations_total", "supervisor" => state.name.clone()).increment(1);
        return Err(format!("restart intensity exceeded (last: {name}: {reason})").into());
    }
    state.tree.restarting(&name);
    metrics::counter!("eventra_actor_restarts_total", "supervisor" => state.name.clone(), "child" => "tenant-manager")
        .increment(1);
    match spawn_manager(myself, state, tenant_id, old.pending.clone()).await {
        Ok(actor) => {
            tracing::info!(supervisor = %state.name, child = %name, "child restarted");
            let entry = Entry {
                actor,
                pending: old.pending,
                last_used: old.last_used,
                restarts: old.restarts + 1,
                last_failure: Some(reason),
                started_at: Utc::now(),
            };
            state.managers.insert(tenant_id, entry);
        }
        // Not fatal: the next request for the tenant starts it afresh.
        Err(e) => {
            tracing::error!(%tenant_id, error = %e, "could not restart tenant manager");
            state.tree.remove(&name);
        }
    }
    Ok(())
}

async fn spawn_manager(
    myself: &ActorRef<RegistryMsg>,
    state: &RegistryState,
    tenant_id: Uuid,
    pending: Arc<AtomicUsize>,
) -> Result<ActorRef<TenantMsg>> {
    let args = TenantManagerState { tenant_id, store: state.store.clone() };
    // Unnamed in ractor's global registry: several app instances share one process in
    // tests, and the tree view names actors itself (`tenant-<id>`).
    let (actor, _) = Actor::spawn_linked(None, TenantManager, args, myself.get_cell())
        .await
        .map_err(|e| Error::Unavailable(format!("could not start the tenant manager: {e}")))?;
    let name = manager_name(tenant_id);
    state.tree.started(&name, Some(&state.name), ChildKind::Worker, actor.get_cell());
    state.tree.set_mailbox(&name, Arc::new(move || pending.load(Ordering::Relaxed)));
    Ok(actor)
}

fn reap_idle(state: &mut RegistryState) {
    let timeout = state.idle_timeout;
    let idle: Vec<Uuid> =
        state.managers.iter().filter(|(_, e)| e.last_used.elapsed() >= timeout).map(|(id, _)| *id).collect();
    for tenant_id in idle {
        if let Some(entry) = state.managers.remove(&tenant_id) {
            tracing::debug!(%tenant_id, "tenant manager idle; draining");
            state.tree.remove(&manager_name(tenant_id));
            // Drain, not stop: messages already queued are still handled; later sends
            // fail fast and the caller asks the registry again.
            let _ = entry.actor.drain();
        }
    }
}

/// Expired idempotency records are dead weight: delete them every few minutes, off the
/// registry's mailbox (a large delete must not hold up tenant lookups).
fn purge_expired_idempotency(state: &mut RegistryState) {
    const EVERY: Duration = Duration::from_secs(300);
    if state.last_purge.is_some_and(|t| t.elapsed() < EVERY) {
        return;
    }
    state.last_purge = Some(Instant::now());
    let store = state.store.clone();
    tokio::spawn(async move {
        let before = Utc::now() - chrono::Duration::hours(crate::store::IDEMPOTENCY_TTL_HOURS);
        match store.purge_idempotency_keys(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "purged expired idempotency records"),
            Err(e) => tracing::warn!(error = %e, "could not purge expired idempotency records"),
        }
    });
}

fn tenant_of(state: &RegistryState, cell: &ActorCell) -> Option<Uuid> {
    let id = cell.get_id();
    state.managers.iter().find(|(_, e)| e.actor.get_id() == id).map(|(t, _)| *t)
}
