//! Operator endpoints: the dead-letter queue (`/v1/admin/dlq`) and `/metrics`.
//!
//! One DLQ story: events that can never be processed (invalid, or returned past the
//! bus's delivery limit) are parked in the event bus's dead-letter queue, listed,
//! replayed or discarded here. Jobs that failed their last attempt live in the job dead
//! set (`/v1/admin/jobs/dead`).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{ApiPath, ApiQuery, Principal};
use super::openapi::{AuthProblems, NotFound, QueryProblems, Unavailable};
use super::AppState;
use crate::error::{Error, Result};

/// Most parked messages one listing returns.
const MAX_LIMIT: u32 = 500;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DlqQuery {
    /// Messages to list, 1-500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// `GET /v1/admin/dlq?limit=`: parked messages, oldest first, with reason and delivery
/// count. The DLQ is a queue, not a table: the listing peeks at its head (no cursor).
#[utoipa::path(get, path = "/v1/admin/dlq", operation_id = "listDeadLetters", tag = "pipeline", security(("bearer" = [])), params(DlqQuery),
    responses((status = 200, description = "`{items: [{id, source, message_id, routing_key, payload, reason, delivery_count}], next_cursor: null}`", body = serde_json::Value),
        AuthProblems, QueryProblems, Unavailable))]
async fn list_dlq(
    State(s): State<AppState>,
    principal: Principal,
    ApiQuery(q): ApiQuery<DlqQuery>,
) -> Result<Response> {
    principal.require_platform_admin()?;
    let limit = match q.limit {
        None => 100,
        Some(n @ 1..=MAX_LIMIT) => n,
        Some(_) => return Err(Error::BadRequest(format!("limit must be between 1 and {MAX_LIMIT}"))),
    };
    let parked = s.bus.parked(limit as usize).await.map_err(|e| Error::Unavailable(e.to_string()))?;
    let items: Vec<serde_json::Value> = parked
        .into_iter()
        .map(|p| {
            let payload = serde_json::from_slice::<serde_json::Value>(&p.message.body)
                .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&p.message.body).into_owned()));
            json!({
                "id": p.message.id,
                "source": "event-bus",
                "message_id": p.message.id,
                "routing_key": p.message.routing_key,
                "payload": payload,
                "reason": p.reason,
                "delivery_count": p.delivery_count,
            })
        })
        .collect();
    Ok(Json(json!({ "items": items, "next_cursor": null })).into_response())
}

/// `POST /v1/admin/dlq/{id}/replay`: puts the parked message back on the bus (confirmed),
/// then removes it from the DLQ; consumers are idempotent, so a replay of an event that
/// already took effect changes nothing.
#[utoipa::path(post, path = "/v1/admin/dlq/{id}/replay", operation_id = "replayDeadLetter", tag = "pipeline", security(("bearer" = [])),
    params(("id" = String, Path, description = "The parked message's id")),
    responses((status = 202, description = "`{replayed: id, source: \"event-bus\"}`", body = serde_json::Value),
        AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn replay(State(s): State<AppState>, principal: Principal, ApiPath(id): ApiPath<String>) -> Result<Response> {
    principal.require_platform_admin()?;
    if !s.bus.replay(&id).await.map_err(|e| Error::Unavailable(e.to_string()))? {
        return Err(Error::NotFound("dead letter"));
    }
    tracing::info!(message_id = %id, "dead letter replayed onto the event bus");
    Ok((StatusCode::ACCEPTED, Json(json!({ "replayed": id, "source": "event-bus" }))).into_response())
}

/// `DELETE /v1/admin/dlq/{id}`: discards a parked message for good. An event among
/// them will not be processed: it leaves its tenant's ingestion backlog.
#[utoipa::path(delete, path = "/v1/admin/dlq/{id}", operation_id = "discardDeadLetter", tag = "pipeline", security(("bearer" = [])),
    params(("id" = String, Path, description = "The parked message's id")),
    responses((status = 204, description = "Discarded"), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn discard(State(s): State<AppState>, principal: Principal, ApiPath(id): ApiPath<String>) -> Result<StatusCode> {
    principal.require_platform_admin()?;
    let Some(message) = s.bus.discard(&id).await.map_err(|e| Error::Unavailable(e.to_string()))? else {
        return Err(Error::NotFound("dead letter"));
    };
    tracing::warn!(message_id = %id, "dead letter discarded by an operator");
    // The message is gone either way; a failure here only leaves the backlog one high.
    if let Ok(event) = serde_json::from_slice::<crate::domain::DomainEvent>(&message.body) {
        if let Err(e) = s.tenants.store().record_dropped_event(event.tenantid, event.id).await {
            tracing::error!(event_id = %event.id, error = %e, "could not take a discarded event out of its tenant's backlog");
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain; version=0.0.4")))]
async fn metrics(State(s): State<AppState>) -> Response {
    let body = s.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_dlq))
        .routes(routes!(replay))
        .routes(routes!(discard))
        .routes(routes!(metrics))
}
