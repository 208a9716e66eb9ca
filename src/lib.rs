//! Eventra: event-driven, multi-tenant user management as an actor system.
//!
//! # Layout
//! - [`config`]: flags/environment → validated [`config::Config`].
//! - [`domain`]: tenants, users, API keys, CloudEvents; pure rules, no I/O.
//! - [`store`]: the `Store` trait and its PostgreSQL and SQLite implementations, with
//!   the transactional outbox.
//! - [`actors`]: the tenant registry and per-tenant user managers; [`actors::Tenants`]
//!   is the door the HTTP layer uses.
//! - [`supervision`]: the root supervisor and child specifications.
//! - [`http`]: axum routes, one file per resource; problem+json at the edge.
//! - [`jobs`]: the `JobQueue` trait, retry schedule and the embedded backend.
//! - [`error`]: the application error every subsystem converts into.
//! - [`app`]: wires it all together; [`app::run`] is the testable entry point.
//! - [`telemetry`]: JSON logging.

pub mod actors;
pub mod app;
pub mod bench;
pub mod config;
pub mod domain;
pub mod error;
pub mod http;
pub mod jobs;
pub mod mail;
pub mod store;
pub mod supervision;
pub mod telemetry;
