//! The writes a tenant's manager applies to its users and keys, and their outcomes.
//!
//! A manager hands the store a whole batch ([`Store::write_batch`]): every write of the
//! batch is applied in ONE transaction (group commit: one tenant-row lock, one commit,
//! one outbox insert), yet each keeps its own outcome, as if it had run alone in
//! mailbox order. The rules that make that hold are in `sql.rs` (`write_batch`).
//!
//! [`Store::write_batch`]: super::Store::write_batch

use uuid::Uuid;

use super::{Created, IdempotencyRequest, StoreError, StoreResult};
use crate::domain::{ApiKey, EventContext, NewApiKey, NewUser, User, UserPatch};

/// Most writes one transaction takes: keeps each statement's parameters well inside
/// SQLite's limit and a commit's latency bounded, while a flood still shares commits.
pub const MAX_BATCH: usize = 256;

/// One write to a tenant's users or keys.
#[derive(Clone)]
pub enum TenantWrite {
    /// Create a user (idempotently when a key is given).
    CreateUser { user: NewUser, idempotency: Option<IdempotencyRequest>, ctx: EventContext },
    /// Patch a user, if `expected_version` is current.
    UpdateUser { user_id: Uuid, expected_version: Option<i64>, patch: UserPatch, ctx: EventContext },
    /// Delete a user, if `expected_version` is current.
    DeleteUser { user_id: Uuid, expected_version: Option<i64>, ctx: EventContext },
    /// Store a new API key (its secret is only in the caller's hands).
    CreateApiKey { key: NewApiKey, ctx: EventContext },
}

impl TenantWrite {
    /// The write's name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            TenantWrite::CreateUser { .. } => "create_user",
            TenantWrite::UpdateUser { .. } => "update_user",
            TenantWrite::DeleteUser { .. } => "delete_user",
            TenantWrite::CreateApiKey { .. } => "create_api_key",
        }
    }
}

/// What one write did.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOutcome {
    /// A user was created, or an earlier identical keyed request's user replayed.
    UserCreated(Created<User>),
    /// The user after the patch (unchanged, and no event, when the patch changed nothing).
    UserUpdated(User),
    UserDeleted,
    ApiKeyCreated(ApiKey),
}

impl WriteOutcome {
    fn unexpected(self, wanted: &str) -> StoreError {
        StoreError::Corrupt(format!("a {wanted} write answered {self:?}"))
    }

    pub fn into_created_user(self) -> StoreResult<Created<User>> {
        match self {
            WriteOutcome::UserCreated(c) => Ok(c),
            other => Err(other.unexpected("create_user")),
        }
    }

    pub fn into_updated_user(self) -> StoreResult<User> {
        match self {
            WriteOutcome::UserUpdated(u) => Ok(u),
            other => Err(other.unexpected("update_user")),
        }
    }

    pub fn into_deleted(self) -> StoreResult<()> {
        match self {
            WriteOutcome::UserDeleted => Ok(()),
            other => Err(other.unexpected("delete_user")),
        }
    }

    pub fn into_api_key(self) -> StoreResult<ApiKey> {
        match self {
            WriteOutcome::ApiKeyCreated(k) => Ok(k),
            other => Err(other.unexpected("create_api_key")),
        }
    }
}

/// The one outcome of a batch of one.
pub(super) fn single(mut outcomes: Vec<StoreResult<WriteOutcome>>) -> StoreResult<WriteOutcome> {
    match (outcomes.pop(), outcomes.is_empty()) {
        (Some(outcome), true) => outcome,
        _ => Err(StoreError::Corrupt("a batch of one write did not answer once".into())),
    }
}

/// The same "unavailable" answer for every write of these batches: their transaction
/// cannot be known to have committed (the database is unreachable, or the connection
/// broke under it).
pub(super) fn all_unavailable<W>(
    batches: &[(Uuid, &[W])],
    message: &str,
) -> Vec<Vec<StoreResult<super::WriteOutcome>>> {
    batches.iter().map(|(_, w)| w.iter().map(|_| Err(StoreError::Unavailable(message.to_owned()))).collect()).collect()
}
