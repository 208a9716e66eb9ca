//! `GET /v1/admin/stats`: the dashboard's figures in one answer, for it and for anyone
//! else: Sidekiq's header counts from the job backend, and rates, percentiles and
//! history from this process's `/metrics` window ([`crate::metrics_history`]).

use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{ApiQuery, Principal};
use super::openapi::{AuthProblems, QueryProblems, Unavailable};
use super::AppState;
use crate::domain::ValidationErrors;
use crate::error::{Error, Result};
use crate::jobs::JobState;
use crate::metrics_history::{Overview, WINDOW};

const DEFAULT_WINDOW_SECS: u64 = 300;

/// `?window=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StatsQuery {
    /// Seconds over which rates and percentiles are taken, 10-1800 (default 300).
    #[param(minimum = 10, maximum = 1800)]
    window: Option<u64>,
}

/// Sidekiq's header: what the job backend holds now.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobCounts {
    /// Jobs done and still remembered (the backend keeps them for its retention).
    pub processed: u64,
    /// Failed attempts in this process since it started.
    pub failed: u64,
    /// Running now (leased by a worker).
    pub busy: u64,
    /// Ready, waiting for a worker.
    pub enqueued: u64,
    pub retries: u64,
    pub scheduled: u64,
    pub dead: u64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Stats {
    pub counts: JobCounts,
    /// Tenant managers running now (tenants written to recently).
    pub active_tenants: usize,
    #[serde(flatten)]
    pub overview: Overview,
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(stats)).routes(routes!(tenant_activity)).routes(routes!(webhook_health))
}

/// `?window=&limit=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ActivityQuery {
    /// Seconds back from now, 10-86400 (default 300).
    #[param(minimum = 10, maximum = 86400)]
    window: Option<u64>,
    /// Tenants to list, 1-100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
}

impl ActivityQuery {
    /// `(window seconds, limit, window start)`, checked.
    fn checked(&self) -> Result<(u64, u32, chrono::DateTime<chrono::Utc>)> {
        let mut errors = ValidationErrors::new();
        let window = self.window.unwrap_or(DEFAULT_WINDOW_SECS);
        if !(10..=86_400).contains(&window) {
            errors.add("window", "must be between 10 and 86400 seconds");
        }
        let limit = self.limit.unwrap_or(20);
        if !(1..=100).contains(&limit) {
            errors.add("limit", "must be between 1 and 100");
        }
        errors.into_result(())?;
        let since = chrono::Utc::now() - chrono::Duration::seconds(i64::try_from(window).unwrap_or(300));
        Ok((window, limit, since))
    }
}

/// A tenant's events over the window, from the outbox (every process's writes).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ActiveTenant {
    #[serde(flatten)]
    pub activity: crate::store::TenantActivity,
    pub per_second: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Activity {
    pub window_seconds: u64,
    pub items: Vec<ActiveTenant>,
}

/// `GET /v1/admin/stats/tenants?window=&limit=`: the busiest tenants, by events
/// committed in the window, with their user counts and event rates.
#[utoipa::path(get, path = "/v1/admin/stats/tenants", operation_id = "tenantActivity", tag = "operations", security(("bearer" = [])),
    params(ActivityQuery),
    responses((status = 200, description = "The busiest tenants first", body = Activity), AuthProblems, QueryProblems, Unavailable))]
async fn tenant_activity(
    State(s): State<AppState>,
    principal: Principal,
    ApiQuery(q): ApiQuery<ActivityQuery>,
) -> Result<Response> {
    principal.require_platform_admin()?;
    let (window, limit, since) = q.checked()?;
    let items = s
        .tenants
        .tenant_activity(since, limit)
        .await?
        .into_iter()
        .map(|a| ActiveTenant { per_second: a.events as f64 / window as f64, activity: a })
        .collect();
    Ok(Json(Activity { window_seconds: window, items }).into_response())
}

/// `GET /v1/admin/stats?window=`: job counts, per-kind and per-event-type rates and
/// percentiles over the window, the pipeline's lags and rates, a live processed/failed
/// series and hourly history.
#[utoipa::path(get, path = "/v1/admin/stats", operation_id = "stats", tag = "operations", security(("bearer" = [])),
    params(StatsQuery),
    responses((status = 200, description = "The dashboard's figures", body = Stats), AuthProblems, QueryProblems, Unavailable))]
async fn stats(State(s): State<AppState>, principal: Principal, ApiQuery(q): ApiQuery<StatsQuery>) -> Result<Response> {
    principal.require_platform_admin()?;
    let window = q.window.unwrap_or(DEFAULT_WINDOW_SECS);
    if !(10..=WINDOW.as_secs()).contains(&window) {
        return Err(
            ValidationErrors::single("window", format!("must be between 10 and {} seconds", WINDOW.as_secs())).into()
        );
    }
    let history = s.metrics_history.as_ref().ok_or_else(|| Error::Unavailable("metrics are not recorded".into()))?;
    let queue = &s.jobs.queue;
    let counts = JobCounts {
        processed: queue.count(JobState::Done).await?,
        failed: 0,
        busy: queue.count(JobState::Running).await?,
        enqueued: queue.count(JobState::Ready).await?,
        retries: queue.count(JobState::Retry).await?,
        scheduled: queue.count(JobState::Scheduled).await?,
        dead: queue.count(JobState::Dead).await?,
    };
    let overview = history.overview(Duration::from_secs(window));
    let counts = JobCounts { failed: overview.failed_total, ..counts };
    let active_tenants = s.tenants.managers().await.map(|m| m.len()).unwrap_or(0);
    Ok(Json(Stats { counts, active_tenants, overview }).into_response())
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookHealth {
    pub window_seconds: u64,
    pub items: Vec<EndpointFailures>,
}

/// An endpoint's attempts and failures in the window.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EndpointFailures {
    #[serde(flatten)]
    pub health: crate::store::EndpointHealth,
    /// failed / attempts.
    pub failure_rate: f64,
}

/// `GET /v1/admin/stats/webhooks?window=&limit=`: webhook endpoints with delivery attempts
/// in the window, across tenants, the most failures first, with their failure rates.
#[utoipa::path(get, path = "/v1/admin/stats/webhooks", operation_id = "webhookHealth", tag = "operations", security(("bearer" = [])),
    params(ActivityQuery),
    responses((status = 200, description = "Endpoints, the most failures first", body = WebhookHealth), AuthProblems, QueryProblems, Unavailable))]
async fn webhook_health(
    State(s): State<AppState>,
    principal: Principal,
    ApiQuery(q): ApiQuery<ActivityQuery>,
) -> Result<Response> {
    principal.require_platform_admin()?;
    let (window, limit, since) = q.checked()?;
    let items = s
        .webhooks
        .health(since, limit)
        .await?
        .into_iter()
        .map(|h| EndpointFailures { failure_rate: h.failed as f64 / h.attempts.max(1) as f64, health: h })
        .collect();
    Ok(Json(WebhookHealth { window_seconds: window, items }).into_response())
}
