//! Operator endpoints: the dead-letter queue (`/v1/admin/dlq`) and `/metrics`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;
use uuid::Uuid;

use super::extract::{ApiPath, ApiQuery, Principal};
use super::tenants::ListQuery;
use super::AppState;
use crate::error::{Error, Result};

/// `GET /v1/admin/dlq?limit=&cursor=`: parked messages with reason and failure count.
async fn list_dlq(
    State(s): State<AppState>,
    principal: Principal,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Response> {
    principal.require_platform_admin()?;
    Ok(Json(s.tenants.store().list_dead_letters(q.page()?).await?).into_response())
}

/// `POST /v1/admin/dlq/{id}/replay`: hands the message back to its source, then
/// removes it from the DLQ (at-least-once: a crash in between replays it twice, never
/// loses it).
async fn replay(State(s): State<AppState>, principal: Principal, ApiPath(id): ApiPath<Uuid>) -> Result<Response> {
    principal.require_platform_admin()?;
    let store = s.tenants.store();
    let letter = store.get_dead_letter(id).await?;
    let target = s.replay.get(&letter.source).ok_or_else(|| {
        Error::Conflict(format!("no running consumer takes replays for '{}'; the message stays parked", letter.source))
    })?;
    target.replay(&letter).map_err(Error::Conflict)?;
    store.delete_dead_letter(id).await?;
    tracing::info!(dead_letter_id = %id, source = %letter.source, message_id = %letter.message_id, "dead letter replayed");
    Ok((StatusCode::ACCEPTED, Json(json!({ "replayed": id, "source": letter.source }))).into_response())
}

/// `DELETE /v1/admin/dlq/{id}`: discards a parked message.
async fn discard(State(s): State<AppState>, principal: Principal, ApiPath(id): ApiPath<Uuid>) -> Result<StatusCode> {
    principal.require_platform_admin()?;
    s.tenants.store().delete_dead_letter(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(s): State<AppState>) -> Response {
    let body = s.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/dlq", get(list_dlq))
        .route("/v1/admin/dlq/{id}/replay", post(replay))
        .route("/v1/admin/dlq/{id}", delete(discard))
        .route("/metrics", get(metrics))
}
