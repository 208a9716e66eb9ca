//! The HTTP edge: parse, authorise, send a message, map the reply. No business rules.
//!
//! One file per resource; this module merges their routers and adds the cross-cutting
//! layers: request ids and request spans, the body size limit, panic containment and
//! problem+json fallbacks.

pub mod admin;
pub mod api_keys;
pub mod audit;
pub mod auth;
mod body;
pub mod dashboard;
pub mod debug;
pub mod events;
pub mod extract;
pub mod health;
pub mod jobs;
pub mod openapi;
pub mod problem;
pub mod search;
pub mod stats;
pub mod tenants;
pub mod users;
pub mod webhooks;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;
use uuid::Uuid;

use crate::actors::Tenants;
use crate::config::Secret;
use crate::supervision::Tree;
use extract::{BodyLimit, RequestId};
use metrics_exporter_prometheus::PrometheusHandle;
use problem::Problem;

/// What every handler can reach: one `Arc`, because axum clones the state for every
/// request; a struct of ~20 `Arc`s made that ~20 atomic increments and decrements a
/// request (3.8 % of Eventra's CPU samples under `bench writes`).
#[derive(Clone)]
pub struct AppState(Arc<AppStateParts>);

impl AppState {
    pub fn new(parts: AppStateParts) -> Self {
        AppState(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppStateParts;

    fn deref(&self) -> &AppStateParts {
        &self.0
    }
}

/// The fields of [`AppState`].
pub struct AppStateParts {
    /// The door to tenant and user state (actors for writes, store for reads).
    pub tenants: Tenants,
    /// The platform admin bearer token.
    pub admin_token: Arc<Secret>,
    /// The live supervision tree (`/debug/actors`).
    pub tree: Tree,
    /// Whether the chaos kill endpoint is enabled.
    pub chaos: bool,
    /// Prometheus exposition (`None` if the recorder could not be installed).
    pub metrics: Option<PrometheusHandle>,
    /// A window of `/metrics` samples (`/v1/admin/stats`, the dashboard).
    pub metrics_history: Option<crate::metrics_history::MetricsHistory>,
    /// Dashboard sign-ins: signed session cookies and their CSRF tokens.
    pub sessions: Arc<dashboard::Sessions>,
    /// The job queue (`/v1/admin/jobs`, readiness).
    pub jobs: crate::jobs::JobClient,
    /// The event bus (its dead-letter queue in `/v1/admin/dlq`).
    pub bus: Arc<dyn crate::bus::EventBus>,
    /// Webhook endpoints (`/v1/tenants/{id}/webhooks`).
    pub webhooks: crate::webhooks::Webhooks,
    /// Tenants' own events, their types and analytics (`/v1/tenants/{id}/events`).
    pub ingest: crate::ingest::Ingest,
    /// Whether this process has the `api` role (the tenant API and its managers).
    pub api: bool,
    /// Set when shutdown began: readiness answers 503 from then on.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// End-user sign-in, tokens and sessions (`/v1/tenants/{id}/auth/…`, the JWKS).
    pub auth: crate::auth::Auth,
    /// The search index (`/users/search`).
    pub search: Arc<dyn crate::search::SearchIndex>,
}

/// The whole API.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let (routes, doc) = described_routes().split_for_parts();
    routes
        .merge(openapi::router(openapi::document(doc)))
        .fallback(problem::not_found)
        .method_not_allowed_fallback(problem::method_not_allowed)
        .layer(DefaultBodyLimit::max(events::body_limit("/events/batch", max_body_bytes)))
        .layer(middleware::from_fn(move |req: Request, next| {
            body::limit(events::body_limit(req.uri().path(), max_body_bytes), req, next)
        }))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn(move |req, next| request_context(max_body_bytes, req, next)))
        .layer(middleware::from_fn_with_state(state.draining.clone(), close_when_draining))
        .with_state(state)
}

/// A process without the `api` role: its operator surface only (`/health/*`,
/// `/metrics`, `/debug/actors`, the dead letters, the job sets), platform admin.
pub fn operator_router(state: AppState) -> Router {
    let routes = utoipa_axum::router::OpenApiRouter::new()
        .merge(health::router())
        .merge(debug::router())
        .merge(admin::router())
        .merge(jobs::router());
    let (routes, _) = routes.split_for_parts();
    routes
        .fallback(|| async {
            problem::Problem::new(
                axum::http::StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                "this process has no `api` role: it serves /health/*, /metrics, /debug/actors and /v1/admin only",
            )
        })
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn(move |req, next| request_context(64 * 1024, req, next)))
        .layer(middleware::from_fn_with_state(state.draining.clone(), close_when_draining))
        .with_state(state)
}

/// While the process drains, every answer says `Connection: close`: clients stop
/// reusing their kept-alive connections to it during the grace, so when the listener
/// closes none is left to race a request against the close.
async fn close_when_draining(
    axum::extract::State(draining): axum::extract::State<Arc<std::sync::atomic::AtomicBool>>,
    req: Request,
    next: middleware::Next,
) -> axum::response::Response {
    let mut res = next.run(req).await;
    if draining.load(std::sync::atomic::Ordering::SeqCst) {
        res.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    }
    res
}

/// Every route with its OpenAPI description (a route is added only through
/// `OpenApiRouter::routes(routes!(handler))`, so it cannot lack one).
fn described_routes() -> utoipa_axum::router::OpenApiRouter<AppState> {
    utoipa_axum::router::OpenApiRouter::new()
        .merge(tenants::router())
        .merge(api_keys::router())
        .merge(users::router())
        .merge(health::router())
        .merge(debug::router())
        .merge(admin::router())
        .merge(jobs::router())
        .merge(search::router())
        .merge(audit::router())
        .merge(stats::router())
        .merge(webhooks::router())
        .merge(events::router())
        .merge(auth::router())
        .merge(dashboard::router())
}

/// The OpenAPI document of the whole API (what `GET /openapi.json` answers).
pub fn api_document() -> utoipa::openapi::OpenApi {
    openapi::document(described_routes().into_openapi())
}

/// Accepts a sane `X-Request-Id` or makes one, opens the request span (with
/// `request_id`, and `tenant_id` once credentials are known), logs the outcome and
/// echoes the id on the response.
async fn request_context(max_body_bytes: usize, mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_acceptable_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| Uuid::now_v7().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let limit = events::body_limit(req.uri().path(), max_body_bytes);
    req.extensions_mut().insert(BodyLimit(limit));
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = %id,
        tenant_id = tracing::field::Empty,
    );
    let started = Instant::now();
    let mut res = next.run(req).instrument(span.clone()).await;
    let status = res.status().as_u16();
    let elapsed = started.elapsed().as_secs_f64();
    let latency_ms = elapsed * 1000.0;
    metrics::counter!("eventra_http_requests_total", "status" => status.to_string()).increment(1);
    metrics::histogram!("eventra_http_request_duration_seconds").record(elapsed);
    span.in_scope(|| {
        if status >= 500 {
            tracing::warn!(status, latency_ms, "request failed");
        } else {
            tracing::info!(status, latency_ms, "request finished");
        }
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", v);
    }
    res
}

/// Client ids are echoed into logs and events, so only short, plain tokens are kept.
fn is_acceptable_request_id(v: &str) -> bool {
    (1..=128).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("handler panicked");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "Internal server error",
        "the server failed to handle the request; it has been logged",
    )
    .into_response()
}
