//! The process's supervision tree, declared as data: the root's child table.
//!
//! ```text
//! root (one_for_one, 3 restarts / 5 s)
//! └── tenants (supervisor, permanent): one tenant-<uuid> worker per active tenant
//! ```
//! Later capabilities add `pipeline`, `jobs` and `indexer` rows to [`root_children`].

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorRef, SpawnErr};

use super::parking::DeadLetterSink;
use super::spec::{ChildSpec, StartCtx, StartFn, Strategy, SupervisorSpec};
use super::supervisor::{Supervisor, SupervisorMsg};
use super::tree::Tree;
use crate::actors::tenant_registry::{RegistryArgs, RegistryMsg, TenantRegistry};
use crate::store::Store;

/// Where the live `tenants` registry is published for the `Tenants` handle; the start
/// function below replaces it on every (re)start.
pub type RegistrySlot = Arc<RwLock<Option<ActorRef<RegistryMsg>>>>;

/// What the tree's actors need from the rest of the process.
#[derive(Clone)]
pub struct RootDeps {
    pub store: Arc<dyn Store>,
    pub tenant_idle_timeout: Duration,
    pub dead_letters: Arc<dyn DeadLetterSink>,
}

/// The running tree.
pub struct RootHandle {
    pub actor: ActorRef<SupervisorMsg>,
    /// Completes when the root stops, normally or by escalation.
    pub join: JoinHandle<()>,
    pub registry: RegistrySlot,
    pub tree: Tree,
}

/// The root's children, started in this order and stopped in reverse.
pub fn root_children(deps: &RootDeps, slot: &RegistrySlot) -> Vec<ChildSpec> {
    vec![ChildSpec::worker("tenants", tenants_start(deps.clone(), slot.clone()))
        .supervisor()
        .shutdown(Duration::from_secs(15))]
}

pub fn root_spec(deps: &RootDeps, slot: &RegistrySlot) -> SupervisorSpec {
    let mut spec = SupervisorSpec::new("root", Strategy::OneForOne, root_children(deps, slot));
    spec.dead_letters = Some(deps.dead_letters.clone());
    spec
}

fn tenants_start(deps: RootDeps, slot: RegistrySlot) -> StartFn {
    Arc::new(move |ctx: StartCtx| {
        let (deps, slot) = (deps.clone(), slot.clone());
        Box::pin(async move {
            let args = RegistryArgs {
                store: deps.store.clone(),
                idle_timeout: deps.tenant_idle_timeout,
                tree: ctx.tree.clone(),
                name: ctx.name.clone(),
                parent: ctx.parent_name.clone(),
            };
            let (registry, _) = Actor::spawn_linked(None, TenantRegistry, args, ctx.parent).await?;
            if let Ok(mut s) = slot.write() {
                *s = Some(registry.clone());
            }
            Ok(registry.get_cell())
        })
    })
}

pub struct Root;

impl Root {
    /// Starts the whole tree; when this returns every child in the table is running.
    pub async fn start(deps: RootDeps) -> Result<RootHandle, SpawnErr> {
        let tree = Tree::new();
        let slot: RegistrySlot = Arc::new(RwLock::new(None));
        let (actor, join) = Supervisor::start(root_spec(&deps, &slot), tree.clone(), None).await?;
        Ok(RootHandle { actor, join, registry: slot, tree })
    }
}
