//! `Tenants`: the one door from the HTTP layer into tenant and user state.
//!
//! Writes become messages to the `tenants` registry or a tenant's manager; reads go
//! straight to the store (they need no ordering and should not queue behind writes).
//! The registry reference sits behind a lock because the root supervisor replaces it
//! when it restarts the registry.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::{ActorRef, MessagingErr, RpcReplyPort};
use uuid::Uuid;

use super::tenant_manager::TenantMsg;
use super::tenant_registry::{ManagerInfo, RegistryMsg};
use crate::domain::{
    ApiKey, EventContext, NewApiKey, NewTenant, NewUser, Page, PageRequest, Role, Tenant, TenantPatch, User, UserPatch,
};
use crate::error::{Error, Result};
use crate::store::{Created, IdempotencyRequest, Store};
use crate::supervision::root::RegistrySlot;

/// How often a message is re-sent when its actor stopped before taking it (idle drain,
/// restart). Safe: a refused send was never processed.
const SEND_ATTEMPTS: usize = 5;

#[derive(Clone)]
pub struct Tenants {
    /// The live registry; replaced by the root supervisor's start function on restart.
    registry: RegistrySlot,
    /// Read path.
    store: Arc<dyn Store>,
    /// Longest a request waits for an actor's reply before answering 503.
    call_timeout: Duration,
    /// Rung after every write, so this process's outbox relay publishes at once.
    outbox_wake: Arc<tokio::sync::Notify>,
}

impl Tenants {
    pub fn new(registry: RegistrySlot, store: Arc<dyn Store>, call_timeout: Duration) -> Self {
        Tenants { registry, store, call_timeout, outbox_wake: Arc::new(tokio::sync::Notify::new()) }
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
        }
        result
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    // ---- tenants -------------------------------------------------------------------

    /// Creates a tenant and its first admin key; the key's secret is only in the reply.
    pub async fn create_tenant(&self, tenant: NewTenant, ctx: EventContext) -> Result<(Tenant, NewApiKey)> {
        let admin_key = NewApiKey::generate(tenant.id, Role::Admin, tenant.created_at);
        let t = self
            .call_registry(|reply| RegistryMsg::CreateTenant {
                tenant: tenant.clone(),
                admin_key: admin_key.clone(),
                ctx: ctx.clone(),
                reply,
            })
            .await;
        Ok((self.wrote(t)?, admin_key))
    }

    pub async fn get_tenant(&self, id: Uuid) -> Result<Tenant> {
        Ok(self.store.get_tenant(id).await?)
    }

    pub async fn list_tenants(&self, page: PageRequest) -> Result<Page<Tenant>> {
        Ok(self.store.list_tenants(page).await?)
    }

    pub async fn update_tenant(&self, id: Uuid, patch: TenantPatch, ctx: EventContext) -> Result<Tenant> {
        let r = self
            .call_registry(|reply| RegistryMsg::UpdateTenant { id, patch: patch.clone(), ctx: ctx.clone(), reply })
            .await;
        self.wrote(r)
    }

    pub async fn delete_tenant(&self, id: Uuid, ctx: EventContext) -> Result<()> {
        let r = self.call_registry(|reply| RegistryMsg::DeleteTenant { id, ctx: ctx.clone(), reply }).await;
        self.wrote(r)
    }

    /// The running tenant managers (for the supervision-tree view).
    pub async fn managers(&self) -> Result<Vec<ManagerInfo>> {
        let registry = self.registry()?;
        match registry.call(|reply| RegistryMsg::Managers { reply }, Some(self.call_timeout)).await {
            Ok(CallResult::Success(v)) => Ok(v),
            _ => Err(Error::Unavailable("the tenants supervisor is restarting; retry shortly".into())),
        }
    }

    // ---- keys ----------------------------------------------------------------------

    pub async fn create_api_key(&self, tenant_id: Uuid, role: Role, ctx: EventContext) -> Result<NewApiKey> {
        self.call_manager(tenant_id, |reply| TenantMsg::CreateApiKey { role, ctx: ctx.clone(), reply }).await
    }

    /// The key a bearer secret belongs to, if any.
    pub async fn find_api_key(&self, hash: &str) -> Result<Option<ApiKey>> {
        Ok(self.store.find_api_key(hash).await?)
    }

    // ---- users ---------------------------------------------------------------------

    pub async fn create_user(
        &self,
        user: NewUser,
        idempotency: Option<IdempotencyRequest>,
        ctx: EventContext,
    ) -> Result<Created<User>> {
        let tenant_id = user.0.tenant_id;
        self.call_manager(tenant_id, |reply| TenantMsg::CreateUser {
            user: user.clone(),
            idempotency: idempotency.clone(),
            ctx: ctx.clone(),
            reply,
        })
        .await
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
        self.call_manager(tenant_id, |reply| TenantMsg::UpdateUser {
            user_id,
            expected_version,
            patch: patch.clone(),
            ctx: ctx.clone(),
            reply,
        })
        .await
    }

    pub async fn delete_user(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        expected_version: Option<i64>,
        ctx: EventContext,
    ) -> Result<()> {
        self.call_manager(tenant_id, |reply| TenantMsg::DeleteUser {
            user_id,
            expected_version,
            ctx: ctx.clone(),
            reply,
        })
        .await
    }

    // ---- messaging -----------------------------------------------------------------

    fn registry(&self) -> Result<ActorRef<RegistryMsg>> {
        self.registry
            .read()
            .ok()
            .and_then(|r| r.clone())
            .ok_or_else(|| Error::Unavailable("the tenants supervisor is not running; retry shortly".into()))
    }

    async fn call_registry<T: Send + 'static>(
        &self,
        build: impl Fn(RpcReplyPort<Result<T>>) -> RegistryMsg,
    ) -> Result<T> {
        for _ in 0..SEND_ATTEMPTS {
            let registry = self.registry()?;
            match registry.call(&build, Some(self.call_timeout)).await {
                Err(MessagingErr::SendErr(_)) => wait_for_restart().await,
                other => return reply_of(other, "tenants supervisor"),
            }
        }
        Err(Error::Unavailable("the tenants supervisor is restarting; retry shortly".into()))
    }

    /// Sends to the tenant's manager, starting it if needed; re-sends when the manager
    /// stopped (idle drain, restart) before it accepted the message.
    async fn call_manager<T: Send + 'static>(
        &self,
        tenant_id: Uuid,
        build: impl Fn(RpcReplyPort<Result<T>>) -> TenantMsg,
    ) -> Result<T> {
        for _ in 0..SEND_ATTEMPTS {
            let manager = self.call_registry(|reply| RegistryMsg::Manager { tenant_id, reply }).await?;
            let outcome = {
                // Counted while queued or in process; the guard also undoes the count when
                // the client goes away and this future is dropped mid-call.
                let _queued = PendingGuard::new(&manager.pending);
                manager.actor.call(&build, Some(self.call_timeout)).await
            };
            match outcome {
                Err(MessagingErr::SendErr(_)) => wait_for_restart().await,
                other => return self.wrote(reply_of(other, "tenant manager")),
            }
        }
        Err(Error::Unavailable("the tenant manager is restarting; retry shortly".into()))
    }
}

/// Maps an actor call outcome. A dropped reply means the actor died while handling the
/// message: whether the write committed is unknown, so the client is told to retry
/// (with its Idempotency-Key) rather than told it failed.
fn reply_of<T, M>(r: std::result::Result<CallResult<Result<T>>, MessagingErr<M>>, who: &str) -> Result<T> {
    match r {
        Ok(CallResult::Success(result)) => result,
        Ok(CallResult::Timeout) => {
            Err(Error::Unavailable(format!("the {who} did not answer in time; retry with the same Idempotency-Key")))
        }
        Ok(CallResult::SenderError) | Err(_) => Err(Error::Unavailable(format!(
            "the {who} stopped while handling the request; retry with the same Idempotency-Key"
        ))),
    }
}

/// Holds one unit of a manager's mailbox gauge for as long as it lives.
struct PendingGuard<'a>(&'a AtomicUsize);

impl<'a> PendingGuard<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        PendingGuard(counter)
    }
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A short pause before re-sending, so a restarting actor has a moment to come back.
async fn wait_for_restart() {
    tokio::time::sleep(Duration::from_millis(5)).await;
}
