//! Webhooks (SPEC §7): tenants' endpoints receive every subscribed event, signed
//! (Standard Webhooks), retried on their own schedule, and logged.
//!
//! - [`signature`]: the `webhook-signature` header.
//! - [`ssrf`]: which destinations may be called, at create and at every delivery.
//! - [`service`]: what the API's webhook routes do.
//! - [`secret_box`]: signing secrets encrypted at rest.
//! - [`delivery`]: the `webhook_delivery` job kind: one job per (endpoint, event), keyed
//!   so a redelivered event adds nothing; it POSTs, logs the attempt, and disables the
//!   endpoint on `410 Gone`.
//!
//! The fan-out (which endpoints an event goes to) is done by the broker consumers, one
//! `Store::webhook_targets` query per batch (`actors::event_consumer`).

pub mod delivery;
pub mod secret_box;
pub mod service;
pub mod signature;
pub mod ssrf;

pub use service::Webhooks;
