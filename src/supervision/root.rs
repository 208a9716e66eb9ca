//! The root supervisor (one-for-one): starts the top-level children of
//! [`ROOT_CHILDREN`](super::ROOT_CHILDREN) in order, restarts them when they fail, and
//! escalates (stops, ending the process's actor system) when failures exceed the
//! restart intensity.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::spec::{MAX_RESTARTS, RESTART_PERIOD, ROOT_CHILDREN};
use crate::actors::tenant_registry::{RegistryArgs, RegistryMsg, TenantRegistry};
use crate::store::Store;

/// The root takes no requests yet; its children are reached through their handles.
pub enum RootMsg {}

/// Startup arguments.
pub struct RootArgs {
    pub store: Arc<dyn Store>,
    pub tenant_idle_timeout: Duration,
    /// Where the live `tenants` registry is published for the `Tenants` handle.
    pub registry_slot: Arc<RwLock<ActorRef<RegistryMsg>>>,
}

pub struct RootState {
    args: RootArgs,
    /// The running `tenants` child.
    tenants: ActorRef<RegistryMsg>,
    /// Recent restart times, for the intensity check.
    restarts: VecDeque<Instant>,
}

pub struct Root;

impl Root {
    /// Starts the root (and so the whole tree). The registry slot is filled before
    /// this returns, so handles built from it work at once.
    pub async fn start(
        store: Arc<dyn Store>,
        tenant_idle_timeout: Duration,
    ) -> Result<(ActorRef<RootMsg>, Arc<RwLock<ActorRef<RegistryMsg>>>), ActorProcessingErr> {
        // A placeholder registry ref is needed to build the slot; spawn the real child
        // unlinked first and hand it to the root, which adopts it by linking.
        let (tenants, _) = Actor::spawn(
            None,
            TenantRegistry,
            RegistryArgs { store: store.clone(), idle_timeout: tenant_idle_timeout },
        )
        .await?;
        let slot = Arc::new(RwLock::new(tenants));
        let args = RootArgs { store, tenant_idle_timeout, registry_slot: slot.clone() };
        let (root, _) = Actor::spawn(None, Root, args).await?;
        Ok((root, slot))
    }
}

impl Actor for Root {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let tenants = args.registry_slot.read().map_err(|_| "registry slot poisoned")?.clone();
        tenants.link(myself.get_cell());
        for spec in ROOT_CHILDREN {
            tracing::info!(child = spec.name, doc = spec.doc, "supervisor root started child");
        }
        Ok(RootState { args, tenants, restarts: VecDeque::new() })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {}
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) if cell.get_id() == state.tenants.get_id() => {
                tracing::warn!(child = "tenants", reason = %err, "child failed; restarting");
                let now = Instant::now();
                state.restarts.push_back(now);
                while state.restarts.front().is_some_and(|t| now.duration_since(*t) > RESTART_PERIOD) {
                    state.restarts.pop_front();
                }
                if state.restarts.len() > MAX_RESTARTS {
                    tracing::error!(child = "tenants", "restart intensity exceeded; root escalates and stops");
                    myself.stop(Some("restart intensity exceeded".into()));
                    return Ok(());
                }
                let args =
                    RegistryArgs { store: state.args.store.clone(), idle_timeout: state.args.tenant_idle_timeout };
                let (tenants, _) = Actor::spawn_linked(None, TenantRegistry, args, myself.get_cell()).await?;
                if let Ok(mut slot) = state.args.registry_slot.write() {
                    *slot = tenants.clone();
                }
                state.tenants = tenants;
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) if cell.get_id() == state.tenants.get_id() => {
                tracing::info!(child = "tenants", ?reason, "child stopped");
            }
            _ => {}
        }
        Ok(())
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        // Children stop in reverse start order, each given its shutdown time.
        for spec in ROOT_CHILDREN.iter().rev() {
            if spec.name == "tenants" {
                let _ = state.tenants.drain_and_wait(Some(spec.shutdown)).await;
            }
        }
        Ok(())
    }
}
