//! The actors that own state changes.
//!
//! - [`tenant_registry`]: the `tenants` supervisor: tenant lifecycle, and one
//!   [`tenant_manager`] per active tenant, started on demand and stopped when idle.
//! - [`tenant_manager`]: serializes the writes of one tenant.
//! - [`Tenants`]: the handle the HTTP layer talks to; it hides actor lookup and retries.
//! - [`job_worker`]: the `job-worker-N` actors that run background jobs.
//! - [`periodic`]: a task on a timer: the job scheduler and the reaper.
//! - [`outbox_relay`]: the `outbox-relay`: outbox rows → event bus, one active per database.
//! - [`event_consumer`]: the `event-consumer-N` actors: events → jobs, then ack.
//! - [`indexer`]: the `indexer`: batches index changes, with a circuit breaker.

pub mod event_consumer;
pub mod indexer;
pub mod job_worker;
pub mod outbox_relay;
pub mod periodic;
pub mod tenant_manager;
pub mod tenant_registry;
mod tenants;

pub use tenants::Tenants;
