//! The actors that own state changes.
//!
//! - [`tenant_manager`]: the `tenant-<uuid>` actors, one per active tenant (dynamic
//!   children of the `tenants` supervisor, passivated when idle): serialize and
//!   group-commit the writes of one tenant.
//! - [`group_commit`]: turns the managers' batches into transactions, several tenants'
//!   batches in one.
//! - [`Tenants`]: the door the HTTP layer talks to; it caches manager handles and
//!   verified API keys, starts managers on demand, and retries.
//! - [`job_worker`]: the `job-worker-N` actors that run background jobs.
//! - [`periodic`]: a task on a timer: the job scheduler, the reaper, the idempotency purge.
//! - [`outbox_relay`]: the `outbox-relay`: outbox rows → event bus, one active per database.
//! - [`event_consumer`]: the `event-consumer-N` actors: events → jobs, then ack.
//! - [`indexer`]: the `indexer`: batches index changes, with a circuit breaker.

pub mod event_consumer;
pub mod group_commit;
pub mod indexer;
pub mod job_worker;
pub mod outbox_relay;
pub mod periodic;
pub mod tenant_manager;
mod tenants;

pub use tenants::{manager_name, ManagerInfo, Tenants, KEY_CACHE_TTL};
