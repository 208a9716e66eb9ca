//! `/health/live` and `/health/ready`: for load balancers and orchestrators.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;

/// `GET /health/live`: the process serves HTTP.
async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /health/ready`: 200 when every dependency answers, 503 otherwise, with a
/// check per dependency.
async fn ready(State(s): State<AppState>) -> Response {
    let store = s.tenants.store();
    let (db_ok, db_detail) = match store.ping().await {
        Ok(()) => (true, None),
        Err(e) => (false, Some(e.to_string())),
    };
    let (actors_ok, actors_detail) = match s.tenants.managers().await {
        Ok(m) => (true, Some(format!("{} tenant managers running", m.len()))),
        Err(e) => (false, Some(e.to_string())),
    };
    let (jobs_ok, jobs_detail) = match s.jobs.queue.ping().await {
        Ok(()) => (true, None),
        Err(e) => (false, Some(e.to_string())),
    };
    let (bus_ok, bus_detail) = match tokio::time::timeout(std::time::Duration::from_secs(5), s.bus.ping()).await {
        Ok(Ok(())) => (true, None),
        Ok(Err(e)) => (false, Some(e.to_string())),
        Err(_) => (false, Some("no answer within 5 s".to_owned())),
    };
    let (search_ok, search_detail) =
        match tokio::time::timeout(std::time::Duration::from_secs(5), s.search.ping()).await {
            Ok(Ok(())) => (true, None),
            Ok(Err(e)) => (false, Some(e.to_string())),
            Err(_) => (false, Some("no answer within 5 s".to_owned())),
        };
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

pub fn router() -> Router<AppState> {
    Router::new().route("/health/live", get(live)).route("/health/ready", get(ready))
}
