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

/// `GET /v1/admin/dlq?limit=&cursor=`: parked messages with reason and failure count:
/// the event bus's dead-letter queue (`source: "event-bus"`, on the first page) and
/// messages parked by supervisors (paged by the cursor).
async fn list_dlq(
    State(s): State<AppState>,
    principal: Principal,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Response> {
    principal.require_platform_admin()?;
    let page = q.page()?;
    let mut items: Vec<serde_json::Value> = Vec::new();
    if page.after.is_none() {
        let parked = s.bus.parked(page.limit as usize).await.map_err(|e| Error::Unavailable(e.to_string()))?;
        items.extend(parked.into_iter().map(|p| {
            let payload = serde_json::from_slice::<serde_json::Value>(&p.message.body)
                .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&p.message.body).into_owned()));
            json!({
                "id": p.message.id,
                "source": "event-bus",
                "message_id": p.message.id,
                "routing_key": p.message.routing_key,
                "payload": payload,
                "reason": p.reason,
                "failures": p.delivery_count,
                "delivery_count": p.delivery_count,
                "parked_at": null,
            })
        }));
    }
    let letters = s.tenants.store().list_dead_letters(page).await?;
    items.extend(letters.items.iter().map(|l| json!(l)));
    Ok(Json(json!({ "items": items, "next_cursor": letters.next_cursor })).into_response())
}

/// `POST /v1/admin/dlq/{id}/replay`: hands the message back to its source, then
/// removes it from the DLQ (at-least-once: a crash in between replays it twice, never
/// loses it).
async fn replay(State(s): State<AppState>, principal: Principal, ApiPath(id): ApiPath<Uuid>) -> Result<Response> {
    principal.require_platform_admin()?;
    let store = s.tenants.store();
    let letter = match store.get_dead_letter(id).await {
        Ok(letter) => letter,
        Err(crate::store::StoreError::NotFound(_)) => {
            // Not parked by a supervisor: maybe in the event bus's dead-letter queue.
            let replayed = s.bus.replay(&id.to_string()).await.map_err(|e| Error::Unavailable(e.to_string()))?;
            if !replayed {
                return Err(Error::NotFound("dead letter"));
            }
            tracing::info!(message_id = %id, "event bus dead letter replayed");
            return Ok((StatusCode::ACCEPTED, Json(json!({ "replayed": id, "source": "event-bus" }))).into_response());
        }
        Err(e) => return Err(e.into()),
    };
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
