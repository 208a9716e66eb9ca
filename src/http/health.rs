//! `/health/live` and `/health/ready`: for load balancers and orchestrators.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::time::Duration;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;

/// `GET /health/live`: the process serves HTTP.
#[utoipa::path(get, path = "/health/live", operation_id = "live", tag = "operations",
    responses((status = 200, description = "`{status: \"ok\"}`", body = serde_json::Value)))]
async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Longest one dependency check may take: every check runs at once, so readiness
/// answers within this (SPEC §4: within 2 s) whatever is down.
const CHECK_TIMEOUT: Duration = Duration::from_millis(1500);

/// A check's outcome: up, or down with why. The check runs in a task of its own and
/// is left to finish when it is late: cancelling a database call half-way can strand
/// its pooled connection.
async fn check<E: std::fmt::Display + Send + 'static>(
    f: impl std::future::Future<Output = Result<Option<String>, E>> + Send + 'static,
) -> (bool, Option<String>) {
    match tokio::time::timeout(CHECK_TIMEOUT, tokio::spawn(f)).await {
        Ok(Ok(Ok(detail))) => (true, detail),
        Ok(Ok(Err(e))) => (false, Some(e.to_string())),
        Ok(Err(e)) => (false, Some(format!("the check failed: {e}"))),
        Err(_) => (false, Some(format!("no answer within {CHECK_TIMEOUT:?}"))),
    }
}

/// `GET /health/ready`: 200 when every dependency answers, 503 otherwise, with a
/// check per dependency.
#[utoipa::path(get, path = "/health/ready", operation_id = "ready", tag = "operations",
    responses(
        (status = 200, description = "`{status: \"up\", checks: {database, actors, job_queue, event_bus, search}}`, each `{status, backend?, detail}`", body = serde_json::Value),
        (status = 503, description = "A dependency is down (its check says `down` and why)", body = serde_json::Value),
    ))]
async fn ready(State(s): State<AppState>) -> Response {
    if s.draining.load(std::sync::atomic::Ordering::SeqCst) {
        let body = json!({"status": "draining", "detail": "shutting down: take this process out of rotation"});
        return (StatusCode::SERVICE_UNAVAILABLE, [(axum::http::header::RETRY_AFTER, "5")], Json(body)).into_response();
    }
    let store = s.tenants.store().clone();
    let (tenants, queue, bus, search) = (s.tenants.clone(), s.jobs.queue.clone(), s.bus.clone(), s.search.clone());
    let api = s.api;
    let (
        (db_ok, db_detail),
        (actors_ok, actors_detail),
        (jobs_ok, jobs_detail),
        (bus_ok, bus_detail),
        (search_ok, search_detail),
    ) = tokio::join!(
        check({
            let store = store.clone();
            async move { store.ping().await.map(|()| None) }
        }),
        check(async move {
            if !api {
                return Ok(Some("no api role: no tenant managers here".into()));
            }
            tenants.managers().await.map(|m| Some(format!("{} tenant managers running", m.len())))
        }),
        check(async move { queue.ping().await.map(|()| None) }),
        check(async move { bus.ping().await.map(|()| None) }),
        check(async move { search.ping().await.map(|()| None) }),
    );
    let up = |ok: bool| if ok { "up" } else { "down" };
    let all = db_ok && actors_ok && jobs_ok && bus_ok && search_ok;
    let body = json!({
        "status": up(all),
        "checks": {
            "database": { "status": up(db_ok), "backend": store.backend(), "detail": db_detail },
            "actors": { "status": up(actors_ok), "detail": actors_detail },
            "job_queue": { "status": up(jobs_ok), "backend": s.jobs.queue.backend(), "detail": jobs_detail },
            "event_bus": { "status": up(bus_ok), "backend": s.bus.backend(), "detail": bus_detail },
            "search": { "status": up(search_ok), "backend": s.search.backend(), "detail": search_detail },
        }
    });
    let status = if all { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(live)).routes(routes!(ready))
}
