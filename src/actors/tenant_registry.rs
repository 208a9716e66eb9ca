//! The `tenants` supervisor: owns tenant lifecycle and the per-tenant managers.
//!
//! Managers are started on the first request for their tenant and drained after
//! `idle_timeout` without one, so memory follows active tenants, not all tenants.
//! A manager that crashes is restarted at once (its mailbox is lost; callers waiting on
//! it get "unavailable" and may retry with their Idempotency-Key).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use uuid::Uuid;

use super::tenant_manager::{TenantManager, TenantManagerState, TenantMsg};
use crate::domain::{EventContext, NewApiKey, NewTenant, Tenant, TenantPatch};
use crate::error::{Error, Result};
use crate::store::Store;

/// What the registry does.
pub enum RegistryMsg {
    /// The manager of a tenant, started if it is not running.
    Manager { tenant_id: Uuid, reply: RpcReplyPort<Result<ActorRef<TenantMsg>>> },
    /// Create a tenant with its first admin key.
    CreateTenant { tenant: NewTenant, admin_key: NewApiKey, ctx: EventContext, reply: RpcReplyPort<Result<Tenant>> },
    /// Patch a tenant's name or limit.
    UpdateTenant { id: Uuid, patch: TenantPatch, ctx: EventContext, reply: RpcReplyPort<Result<Tenant>> },
    /// Delete a tenant; its manager is stopped first.
    DeleteTenant { id: Uuid, ctx: EventContext, reply: RpcReplyPort<Result<()>> },
    /// Timer tick: drain managers idle for longer than the timeout.
    ReapIdle,
    /// The running managers, for the supervision-tree view.
    Managers { reply: RpcReplyPort<Vec<ManagerInfo>> },
}

/// A running manager as the tree view shows it.
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
}

/// One running manager.
struct Entry {
    actor: ActorRef<TenantMsg>,
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
        Ok(RegistryState { store: args.store, idle_timeout: args.idle_timeout, managers: HashMap::new() })
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
            RegistryMsg::CreateTenant { tenant, admin_key, ctx, reply } => {
                let r = state.store.create_tenant(&tenant, &admin_key, &ctx).await.map_err(Into::into);
                let _ = reply.send(r);
            }
            RegistryMsg::UpdateTenant { id, patch, ctx, reply } => {
                let r = state.store.update_tenant(id, &patch, &ctx).await.map_err(Into::into);
                let _ = reply.send(r);
            }
            RegistryMsg::DeleteTenant { id, ctx, reply } => {
                if let Some(entry) = state.managers.remove(&id) {
                    entry.actor.stop(Some("tenant deleted".into()));
                }
                let r = state.store.delete_tenant(id, &ctx).await.map_err(Into::into);
                let _ = reply.send(r);
            }
            RegistryMsg::ReapIdle => reap_idle(state),
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
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(tenant_id) = tenant_of(state, &cell) else { return Ok(()) };
                let reason = err.to_string();
                tracing::warn!(%tenant_id, actor = %format!("tenant-{tenant_id}"), %reason, "tenant manager failed; restarting");
                let Some(old) = state.managers.remove(&tenant_id) else { return Ok(()) };
                match spawn_manager(&myself, state, tenant_id).await {
                    Ok(actor) => {
                        state.managers.insert(
                            tenant_id,
                            Entry {
                                actor,
                                last_used: old.last_used,
                                restarts: old.restarts + 1,
                                last_failure: Some(reason),
                                started_at: Utc::now(),
                            },
                        );
                    }
                    // Not fatal: the next request for the tenant starts it afresh.
                    Err(e) => tracing::error!(%tenant_id, error = %e, "could not restart tenant manager"),
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(tenant_id) = tenant_of(state, &cell) {
                    tracing::debug!(%tenant_id, ?reason, "tenant manager stopped");
                    state.managers.remove(&tenant_id);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Finds the running manager or starts one for an existing tenant.
async fn manager_for(
    myself: &ActorRef<RegistryMsg>,
    state: &mut RegistryState,
    tenant_id: Uuid,
) -> Result<ActorRef<TenantMsg>> {
    if let Some(entry) = state.managers.get_mut(&tenant_id) {
        entry.last_used = Instant::now();
        return Ok(entry.actor.clone());
    }
    // Only real tenants get an actor: random ids must not grow the registry.
    state.store.get_tenant(tenant_id).await?;
    let actor = spawn_manager(myself, state, tenant_id).await?;
    state.managers.insert(
        tenant_id,
        Entry {
            actor: actor.clone(),
            last_used: Instant::now(),
            restarts: 0,
            last_failure: None,
            started_at: Utc::now(),
        },
    );
    Ok(actor)
}

async fn spawn_manager(
    myself: &ActorRef<RegistryMsg>,
    state: &RegistryState,
    tenant_id: Uuid,
) -> Result<ActorRef<TenantMsg>> {
    let args = TenantManagerState { tenant_id, store: state.store.clone() };
    // Unnamed in ractor's global registry: several app instances share one process in
    // tests, and the tree view names actors itself (`tenant-<id>`).
    let (actor, _) = Actor::spawn_linked(None, TenantManager, args, myself.get_cell())
        .await
        .map_err(|e| Error::Unavailable(format!("could not start the tenant manager: {e}")))?;
    Ok(actor)
}

fn reap_idle(state: &mut RegistryState) {
    let timeout = state.idle_timeout;
    let idle: Vec<Uuid> =
        state.managers.iter().filter(|(_, e)| e.last_used.elapsed() >= timeout).map(|(id, _)| *id).collect();
    for tenant_id in idle {
        if let Some(entry) = state.managers.remove(&tenant_id) {
            tracing::debug!(%tenant_id, "tenant manager idle; draining");
            // Drain, not stop: messages already queued are still handled; later sends
            // fail fast and the caller asks the registry again.
            let _ = entry.actor.drain();
        }
    }
}

fn tenant_of(state: &RegistryState, cell: &ActorCell) -> Option<Uuid> {
    let id = cell.get_id();
    state.managers.iter().find(|(_, e)| e.actor.get_id() == id).map(|(t, _)| *t)
}
