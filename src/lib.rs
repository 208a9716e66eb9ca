//! Eventra: event-driven, multi-tenant user management as an actor system.
//!
//! # Layout
//! - [`config`]: flags/environment → validated [`config::Config`].
//! - [`domain`]: tenants, users, API keys, CloudEvents; pure rules, no I/O.
//! - [`store`]: the `Store` trait and its PostgreSQL and SQLite implementations, with
//!   the transactional outbox.
//! - [`actors`]: the tenant registry and per-tenant user managers ([`actors::Tenants`]
//!   is the door the HTTP layer uses), job workers, periodic tasks, the outbox relay
//!   and the broker consumers.
//! - [`supervision`]: the root supervisor and child specifications.
//! - [`http`]: axum routes, one file per resource; problem+json at the edge.
//! - [`jobs`]: the `JobQueue` trait (Redis and SQLite), Sidekiq's retry schedule, the
//!   runner the workers use, job kinds, and which jobs an event causes.
//! - [`mail`]: the `Mailer` trait: SMTP (lettre) or `.eml` files.
//! - [`bus`]: the `EventBus` trait: RabbitMQ (lapin) or tables in SQLite.
//! - [`bench`]: `eventra bench …` against the raw engines.
//! - [`chaos`]: `eventra chaos`: load, kills and dependency restarts on private
//!   services, then the invariant check (also what the fault tests run).
//! - [`error`]: the application error every subsystem converts into.
//! - [`app`]: wires it all together; [`app::run`] is the testable entry point.
//! - [`telemetry`]: JSON logging and the Prometheus recorder.
//! - [`metrics_history`]: a window of `/metrics` samples: rates and percentiles for the
//!   dashboard.
//! - [`webhooks`]: tenants' webhook endpoints: signing, SSRF checks, delivery jobs,
//!   secrets at rest.

pub mod actors;
pub mod app;
pub mod auth;
pub mod bench;
pub mod bus;
pub mod chaos;
pub mod config;
pub mod domain;
pub mod error;
pub mod http;
pub mod ingest;
pub mod jobs;
pub mod mail;
pub mod metrics_history;
pub mod search;
pub mod store;
pub mod supervision;
pub mod telemetry;
pub mod tls;
pub mod webhooks;
