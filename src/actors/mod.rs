//! The actors that own state changes.
//!
//! - [`tenant_registry`]: the `tenants` supervisor: tenant lifecycle, and one
//!   [`tenant_manager`] per active tenant, started on demand and stopped when idle.
//! - [`tenant_manager`]: serializes the writes of one tenant.
//! - [`Tenants`]: the handle the HTTP layer talks to; it hides actor lookup and retries.

pub mod tenant_manager;
pub mod tenant_registry;
mod tenants;

pub use tenants::Tenants;
