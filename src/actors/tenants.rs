//! `Tenants`: the one door from the HTTP layer into tenant and user state.
//!
//! - User and key writes become messages to the tenant's manager (`tenant-<uuid>` under
//!   the `tenants` supervisor), which group-commits them. The manager's handle is
//!   cached here, so a write goes straight to its mailbox; a miss checks the tenant in
//!   the database (outside every mailbox, so a cold tenant holds up no other) and asks
//!   the supervisor to start the manager (or for the one already running).
//! - Tenant writes (create, rename, delete) are single transactions straight to the
//!   store: the database orders them, and they must not queue behind any mailbox.
//! - Reads go straight to the store.
//! - API keys are verified through a cache (see [`KEY_CACHE_TTL`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use ractor::{ActorRef, MessagingErr};
use uuid::Uuid;

use super::group_commit::GroupCommit;
use super::tenant_manager::{TenantManager, TenantManagerArgs, TenantMsg, WriteQueue, WriteStats};
use crate::domain::{
    ApiKey, EventContext, NewApiKey, NewTenant, NewUser, Page, PageRequest, Role, Tenant, TenantPatch, User, UserPatch,
};
use crate::error::{Error, Result};
use crate::store::{Created, IdempotencyRequest, Store, TenantWrite, WriteOutcome};
use crate::supervision::root::TenantsSlot;
use crate::supervision::{Activity, ChildSpec, Restart, StartCtx, StartFn, StartedChild, SupervisorMsg};

/// How often a write is re-sent when its manager stopped before taking it (passivated,
/// restarting). Safe: a refused send was never processed.
const SEND_ATTEMPTS: usize = 5;
/// How long a verified API key is trusted without asking the database again: the bound
/// on how long a key deleted by another process (its tenant deleted) keeps working
/// here. This process forgets a deleted tenant's keys at once.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(10);
/// Verified keys kept (a few tens of bytes each).
const KEY_CACHE_SIZE: usize = 100_000;

/// A running manager, as callers reach it.
#[derive(Clone)]
struct ManagerHandle {
    actor: ActorRef<TenantMsg>,
    /// The calls in flight and the last call's time: the supervisor passivates by it.
    activity: Arc<Activity>,
}

/// A running manager, for tools and tests.
#[derive(Debug, Clone)]
pub struct ManagerInfo {
    pub tenant_id: Uuid,
    pub actor_id: ractor::ActorId,
}

#[derive(Clone)]
pub struct Tenants {
    /// The live `tenants` supervisor; replaced by its start function on restart.
    supervisor: TenantsSlot,
    /// Read path, and tenant writes.
    store: Arc<dyn Store>,
    /// Where the managers' batches become transactions (shared by all tenants).
    gate: Arc<GroupCommit>,
    /// Longest a request waits for an actor's reply before answering 503.
    call_timeout: Duration,
    /// Rung after every write, so this process's outbox relay publishes at once.
    outbox_wake: Arc<tokio::sync::Notify>,
    /// Asks the notifier task to tell other processes' relays (see [`notifier`]).
    notify: tokio::sync::mpsc::Sender<()>,
    /// Managers by tenant, as many as may run (`EVENTRA_MAX_TENANT_MANAGERS`): a handle
    /// keeps its actor's channels allocated even after the actor stopped, so handles of
    /// passivated managers must not pile up. An evicted (or stale) handle costs one
    /// supervisor call on the tenant's next write.
    managers: Arc<quick_cache::sync::Cache<Uuid, ManagerHandle>>,
    /// Verified API keys by secret hash, with when they were read.
    keys: Arc<quick_cache::sync::Cache<String, (ApiKey, Instant)>>,
    /// Tenants' `rate_limit_per_second`, with when they were read (same TTL as keys;
    /// a change in this process applies at once).
    rates: Arc<quick_cache::sync::Cache<Uuid, (i64, Instant)>>,
    /// Refuses writes while the effects fall behind (see `jobs::lag`).
    lag: Arc<crate::jobs::EffectLag>,
}

impl Tenants {
    /// The door to the tenants under `supervisor`, which runs at most `max_managers`.
    pub fn new(supervisor: TenantsSlot, store: Arc<dyn Store>, call_timeout: Duration, max_managers: usize) -> Self {
        let (notify, asked) = tokio::sync::mpsc::channel(1);
        tokio::spawn(notifier(store.clone(), asked));
        Tenants {
            supervisor,
            notify,
            gate: GroupCommit::new(store.clone()),
            store,
            call_timeout,
            outbox_wake: Arc::new(tokio::sync::Notify::new()),
            managers: Arc::new(quick_cache::sync::Cache::new(max_managers.max(1))),
            keys: Arc::new(quick_cache::sync::Cache::new(KEY_CACHE_SIZE)),
            rates: Arc::new(quick_cache::sync::Cache::new(KEY_CACHE_SIZE)),
            lag: crate::jobs::EffectLag::off(),
        }
    }

    /// Sheds writes while `lag` says the effects are too far behind.
    pub fn with_effect_lag(mut self, lag: Arc<crate::jobs::EffectLag>) -> Self {
        self.lag = lag;
        self
    }

    /// Refuses a write while the job workers are overloaded: the client retries later
    /// instead of the backlog growing without bound.
    fn admit(&self) -> Result<()> {
        self.lag.admit().map_err(|lag| {
            Error::Unavailable(format!(
                "effects are {:.1} s behind (the job workers are catching up); retry after the Retry-After delay",
                lag.as_secs_f64()
            ))
        })
    }

    /// Rings `wake` after every write (the outbox relay listens).
    pub fn with_outbox_wake(mut self, wake: Arc<tokio::sync::Notify>) -> Self {
        self.outbox_wake = wake;
        self
    }

    /// A write finished: if it committed, the outbox has a new row.
    fn wrote<T>(&self, result: Result<T>) -> Result<T> {
        if result.is_ok() {
            self.outbox_wake.notify_one();
            // Full: a notification is pending already, and it will cover this write.
            let _ = self.notify.try_send(());
        }
        result
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    // ---- tenants -------------------------------------------------------------------

    /// Creates a tenant and its first admin key; the key's secret is only in the reply.
    pub async fn create_tenant(&self, tenant: NewTenant, ctx: EventContext) -> Result<(Tenant, NewApiKey)> {
        self.admit()?;
        let admin_key = NewApiKey::generate(tenant.id, Role::Admin, tenant.created_at);
        let t = self.store.create_tenant(&tenant, &admin_key, &ctx).await.map_err(Error::from);
        Ok((self.wrote(t)?, admin_key))
    }

    pub async fn get_tenant(&self, id: Uuid) -> Result<Tenant> {
        Ok(self.store.get_tenant(id).await?)
    }

    /// The busiest tenants since `since` (events committed), for the operator.
    pub async fn tenant_activity(
        &self,
        since: chrono::DateTime<chrono::Utc>,
        limit: u32,
    ) -> Result<Vec<crate::store::TenantActivity>> {
        Ok(self.store.tenant_activity(since, limit).await?)
    }

    pub async fn list_tenants(&self, page: PageRequest) -> Result<Page<Tenant>> {
        Ok(self.store.list_tenants(page).await?)
    }

    pub async fn update_tenant(&self, id: Uuid, patch: TenantPatch, ctx: EventContext) -> Result<Tenant> {
        let r = self.store.update_tenant(id, &patch, &ctx).await.map_err(Error::from);
        self.rates.remove(&id);
        self.wrote(r)
    }

    /// The tenant's requests a second per API key (0: no limit), cached for
    /// [`KEY_CACHE_TTL`] (other processes' changes apply within it).
    pub async fn rate_limit_of(&self, id: Uuid) -> Result<i64> {
        if let Some((rate, read_at)) = self.rates.get(&id) {
            if read_at.elapsed() < KEY_CACHE_TTL {
                return Ok(rate);
            }
        }
        let rate = self.store.get_tenant(id).await.map(|t| t.rate_limit_per_second).unwrap_or(0);
        self.rates.insert(id, (rate, Instant::now()));
        Ok(rate)
    }

    /// Deletes a tenant: its manager first finishes what it accepted and stops, then
    /// the tenant goes with its users and keys; its keys stop working here at once.
    pub async fn delete_tenant(&self, id: Uuid, ctx: EventContext) -> Result<()> {
        self.managers.remove(&id);
        if let Ok(supervisor) = self.supervisor() {
            let name = manager_name(id);
            let _ =
                supervisor.call(|reply| SupervisorMsg::StopChild(name.clone(), reply), Some(self.call_timeout)).await;
        }
        let r = self.store.delete_tenant(id, &ctx).await.map_err(Error::from);
        if r.is_ok() {
            self.keys.retain(|_, (key, _)| key.tenant_id != id);
        }
        self.wrote(r)
    }

    /// The running tenant managers (for the supervision-tree view and tests).
    pub async fn managers(&self) -> Result<Vec<ManagerInfo>> {
        let supervisor = self.supervisor()?;
        match supervisor.call(SupervisorMsg::Children, Some(self.call_timeout)).await {
            Ok(CallResult::Success(children)) => Ok(children
                .into_iter()
                .filter_map(|(name, id)| {
                    let tenant_id = name.strip_prefix("tenant-").and_then(|t| Uuid::parse_str(t).ok())?;
                    Some(ManagerInfo { tenant_id, actor_id: id? })
                })
                .collect()),
            _ => Err(Error::Unavailable("the tenants supervisor is restarting; retry shortly".into())),
        }
    }

    // ---- keys ----------------------------------------------------------------------

    pub async fn create_api_key(&self, tenant_id: Uuid, role: Role, ctx: EventContext) -> Result<NewApiKey> {
        let key = NewApiKey::generate(tenant_id, role, crate::domain::now());
        self.write(tenant_id, TenantWrite::CreateApiKey { key: key.clone(), ctx }).await?.into_api_key()?;
        Ok(key)
    }

    /// The key a bearer secret belongs to, if any. A verified key is trusted for
    /// [`KEY_CACHE_TTL`]; unknown secrets are always looked up (a key just created by
    /// another process works at once).
    pub async fn find_api_key(&self, hash: &str) -> Result<Option<ApiKey>> {
        if let Some((key, read_at)) = self.keys.get(hash) {
            if read_at.elapsed() < KEY_CACHE_TTL {
                return Ok(Some(key));
            }
        }
        let found = self.store.find_api_key(hash).await?;
        match &found {
            Some(key) => self.keys.insert(hash.to_owned(), (key.clone(), Instant::now())),
            None => {
                self.keys.remove(hash);
            }
        }
        Ok(found)
    }

    // ---- users ---------------------------------------------------------------------

    pub async fn create_user(
        &self,
        user: NewUser,
        idempotency: Option<IdempotencyRequest>,
        ctx: EventContext,
    ) -> Result<Created<User>> {
        let tenant_id = user.0.tenant_id;
        Ok(self.write(tenant_id, TenantWrite::CreateUser { user, idempotency, ctx }).await?.into_created_user()?)
    }

    pub async fn get_user(&self, tenant_id: Uuid, user_id: Uuid) -> Result<User> {
        Ok(self.store.get_user(tenant_id, user_id).await?)
    }

    /// The tenant's users with these ids, in the order given (missing ones left out).
    pub async fn get_users(&self, tenant_id: Uuid, ids: &[Uuid]) -> Result<Vec<User>> {
        Ok(self.store.get_users(tenant_id, ids).await?)
    }

    pub async fn list_users(&self, tenant_id: Uuid, page: PageRequest) -> Result<Page<User>> {
        // Distinguish "no such tenant" from "no users" for a platform admin.
        self.store.get_tenant(tenant_id).await?;
        Ok(self.store.list_users(tenant_id, page).await?)
    }

    pub async fn update_user(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        expected_version: Option<i64>,
        patch: UserPatch,
        ctx: EventContext,
    ) -> Result<User> {
        let write = TenantWrite::UpdateUser { user_id, expected_version, patch, ctx };
        Ok(self.write(tenant_id, write).await?.into_updated_user()?)
    }

    pub async fn delete_user(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        expected_version: Option<i64>,
        ctx: EventContext,
    ) -> Result<()> {
        let write = TenantWrite::DeleteUser { user_id, expected_version, ctx };
        Ok(self.write(tenant_id, write).await?.into_deleted()?)
    }

    // ---- messaging -----------------------------------------------------------------

    fn supervisor(&self) -> Result<ActorRef<SupervisorMsg>> {
        self.supervisor
            .read()
            .ok()
            .and_then(|r| r.clone())
            .ok_or_else(|| Error::Unavailable("the tenants supervisor is not running; retry shortly".into()))
    }

    /// Sends a write to the tenant's manager (starting it if needed) and waits for its
    /// outcome; re-sends when the manager stopped before it accepted the message.
    async fn write(&self, tenant_id: Uuid, write: TenantWrite) -> Result<WriteOutcome> {
        self.admit()?;
        for _ in 0..SEND_ATTEMPTS {
            let manager = match self.managers.get(&tenant_id) {
                Some(m) => m,
                None => self.start_manager(tenant_id).await?,
            };
            let outcome = {
                // In flight while queued or committing; the guard also ends it when the
                // client goes away and this future is dropped mid-call.
                let _busy = manager.activity.begin();
                manager.actor.call(|reply| TenantMsg::Write(write.clone(), reply), Some(self.call_timeout)).await
            };
            match outcome {
                Err(MessagingErr::SendErr(_)) => {
                    self.managers.remove(&tenant_id);
                    wait_for_restart().await;
                }
                other => return self.wrote(reply_of(other)),
            }
        }
        Err(Error::Unavailable("the tenant manager is restarting; retry shortly".into()))
    }

    /// Starts the manager of an existing tenant (or finds the running one) and caches it.
    async fn start_manager(&self, tenant_id: Uuid) -> Result<ManagerHandle> {
        // Only real tenants get an actor: random ids must not grow the tree.
        self.store.get_tenant(tenant_id).await?;
        let spec = manager_spec(tenant_id, self.gate.clone());
        let supervisor = self.supervisor()?;
        let started =
            supervisor.call(|reply| SupervisorMsg::StartChild(spec.clone(), reply), Some(self.call_timeout)).await;
        match started {
            Ok(CallResult::Success(Ok(StartedChild { cell, activity }))) => {
                let handle = ManagerHandle { actor: cell.into(), activity: activity.unwrap_or_default() };
                self.managers.insert(tenant_id, handle.clone());
                Ok(handle)
            }
            Ok(CallResult::Success(Err(e))) => Err(Error::Unavailable(format!("{e}; retry shortly"))),
            _ => Err(Error::Unavailable("the tenants supervisor is restarting; retry shortly".into())),
        }
    }
}

/// The shortest gap between two `NOTIFY`s of this process: commits within it share one
/// (a burst of thousands a second costs at most 200), at ≤ 5 ms of a relay's latency.
const NOTIFY_GAP: Duration = Duration::from_millis(5);

/// Tells other processes' relays about committed outbox rows: one `NOTIFY` for every
/// commit since the last (the channel holds one request), at most one per
/// [`NOTIFY_GAP`]. Ends when every `Tenants` is gone. A lost notification costs only
/// latency: relays also poll.
async fn notifier(store: Arc<dyn Store>, mut asked: tokio::sync::mpsc::Receiver<()>) {
    while asked.recv().await.is_some() {
        let sent = tokio::time::Instant::now();
        if let Err(e) = store.notify_outbox().await {
            tracing::debug!(error = %e, "could not notify other relays of new outbox rows; they poll");
        }
        tokio::time::sleep_until(sent + NOTIFY_GAP).await;
    }
}

/// The tree name of a tenant's manager.
pub fn manager_name(tenant_id: Uuid) -> String {
    format!("tenant-{tenant_id}")
}

/// The child spec of a tenant's manager: transient (a crash or kill restarts it, a
/// passivation or a deleted tenant does not), with one write queue and one set of
/// figures shared by all its incarnations.
fn manager_spec(tenant_id: Uuid, gate: Arc<GroupCommit>) -> ChildSpec {
    let queue: Arc<WriteQueue> = Arc::default();
    let stats: Arc<WriteStats> = Arc::default();
    let view = stats.clone();
    let start: StartFn = Arc::new(move |ctx: StartCtx| {
        let args = TenantManagerArgs { tenant_id, gate: gate.clone(), queue: queue.clone(), stats: stats.clone() };
        Box::pin(async move {
            // Unnamed in ractor's global registry: several app instances share one
            // process in tests, and the tree names actors itself (`tenant-<id>`).
            let (actor, _) = ractor::Actor::spawn_linked(None, TenantManager, args, ctx.parent).await?;
            Ok(actor.get_cell())
        })
    });
    ChildSpec::worker(manager_name(tenant_id), start)
        .restart(Restart::Transient)
        .shutdown(Duration::from_secs(10))
        .activity(Arc::new(Activity::new()))
        .stats(Arc::new(move || view.view()))
}

/// Maps an actor call outcome. A dropped reply means the actor died while holding the
/// message: whether the write committed is unknown, so the client is told to retry
/// (with its Idempotency-Key) rather than told it failed.
fn reply_of<T, E: Into<Error>, M>(
    r: std::result::Result<CallResult<std::result::Result<T, E>>, MessagingErr<M>>,
) -> Result<T> {
    match r {
        Ok(CallResult::Success(result)) => result.map_err(Into::into),
        Ok(CallResult::Timeout) => Err(Error::Unavailable(
            "the tenant manager did not answer in time; retry with the same Idempotency-Key".into(),
        )),
        Ok(CallResult::SenderError) | Err(_) => Err(Error::Unavailable(
            "the tenant manager stopped while handling the request; retry with the same Idempotency-Key".into(),
        )),
    }
}

/// A short pause before re-sending, so a restarting actor has a moment to come back.
async fn wait_for_restart() {
    tokio::time::sleep(Duration::from_millis(5)).await;
}
