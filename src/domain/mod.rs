//! The domain: tenants, users, API keys and the events their changes produce.
//!
//! Everything here is pure: validation, patch application and event construction take
//! values and return values. Persistence lives in `crate::store`, concurrency in
//! `crate::actors`; both call into this module so the rules exist exactly once.

pub mod analytics;
pub mod api_key;
pub mod audit;
pub mod auth;
pub mod custom_event;
pub mod event;
pub mod page;
pub mod tenant;
pub mod user;
pub mod validation;
pub mod webhook;

pub use api_key::{ApiKey, NewApiKey, Role};
pub use audit::AuditEntry;
pub use event::{Actor, DomainEvent, EventContext, EventType};
pub use page::{Cursor, Page, PageRequest};
pub use tenant::{NewTenant, Tenant, TenantPatch};
pub use user::{NewUser, User, UserPatch, UserStatus};
pub use validation::{FieldError, ValidationErrors};

use chrono::{DateTime, SubsecRound, Utc};

/// The current time at the precision every backend stores (microseconds), so a value
/// returned from a write equals the same value read back later.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}
