//! The one integration-test binary (one link step for every test).
//!
//! Tests that need PostgreSQL read `DATABASE_URL` (an admin connection; each test makes
//! its own database). Without it they print `NOT RUN` and return, unless `CI=true`,
//! where a missing service fails the test.

mod actors;
mod audit;
mod auth;
mod binary;
mod bus_conformance;
mod concurrency;
mod custom_events;
mod dashboard;
mod faults;
mod http_api;
mod job_queue_conformance;
mod jobs;
mod mailer_conformance;
mod openapi;
mod pipeline;
mod search;
mod search_conformance;
mod store_conformance;
mod supervision;
mod topology;
mod utils;
mod webhooks;
