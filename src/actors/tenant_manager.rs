//! One actor per active tenant: every write to the tenant's users and keys passes
//! through its mailbox, so one process never races itself on a tenant and events of a
//! tenant leave in the order the requests arrived. Across processes the store's
//! tenant-row lock gives the same guarantee (see `store/sql.rs`).

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use uuid::Uuid;

use crate::domain::{EventContext, NewApiKey, NewUser, Role, User, UserPatch};
use crate::error::Result;
use crate::store::{Created, IdempotencyRequest, Store};

/// What a tenant manager does. Each carries its reply port.
pub enum TenantMsg {
    /// Create a user (idempotently when a key is given).
    CreateUser {
        user: NewUser,
        idempotency: Option<IdempotencyRequest>,
        ctx: EventContext,
        reply: RpcReplyPort<Result<Created<User>>>,
    },
    /// Patch a user, if `expected_version` is current.
    UpdateUser {
        user_id: Uuid,
        expected_version: Option<i64>,
        patch: UserPatch,
        ctx: EventContext,
        reply: RpcReplyPort<Result<User>>,
    },
    /// Delete a user, if `expected_version` is current.
    DeleteUser { user_id: Uuid, expected_version: Option<i64>, ctx: EventContext, reply: RpcReplyPort<Result<()>> },
    /// Mint an API key with a role; the reply holds the only copy of the secret.
    CreateApiKey { role: Role, ctx: EventContext, reply: RpcReplyPort<Result<NewApiKey>> },
}

/// Startup arguments and state: the tenant it serves and where state lives.
pub struct TenantManagerState {
    pub tenant_id: Uuid,
    pub store: Arc<dyn Store>,
}

/// The actor.
pub struct TenantManager;

impl Actor for TenantManager {
    type Msg = TenantMsg;
    type State = TenantManagerState;
    type Arguments = TenantManagerState;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        tracing::debug!(tenant_id = %args.tenant_id, "tenant manager started");
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let store = &state.store;
        let tenant_id = state.tenant_id;
        // A reply port whose caller gave up is not our failure: ignore send errors.
        match msg {
            TenantMsg::CreateUser { user, idempotency, ctx, reply } => {
                let r = store.create_user(&user, idempotency.as_ref(), &ctx).await.map_err(Into::into);
                let _ = reply.send(r);
            }
            TenantMsg::UpdateUser { user_id, expected_version, patch, ctx, reply } => {
                let r = store.update_user(tenant_id, user_id, expected_version, &patch, &ctx).await.map_err(Into::into);
                let _ = reply.send(r);
            }
            TenantMsg::DeleteUser { user_id, expected_version, ctx, reply } => {
                let r = store.delete_user(tenant_id, user_id, expected_version, &ctx).await.map_err(Into::into);
                let _ = reply.send(r);
            }
            TenantMsg::CreateApiKey { role, ctx, reply } => {
                let key = NewApiKey::generate(tenant_id, role, crate::domain::now());
                let r = store.create_api_key(&key, &ctx).await.map(|_| key).map_err(Into::into);
                let _ = reply.send(r);
            }
        }
        Ok(())
    }
}
