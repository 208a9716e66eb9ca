//! `/v1/tenants/{tenant_id}/event-types`, `/events` and `/analytics/events`: a tenant's
//! own events (SPEC §9). The rules live in `crate::ingest` and `domain::custom_event`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::extract::{query_time, ApiJson, ApiPath, ApiQuery, Caller};
use super::openapi::{AuthProblems, Backlog, BodyProblems, NotFound, QueryProblems, Unavailable};
use super::AppState;
use crate::domain::analytics::{EventAnalytics, Grain};
use crate::domain::custom_event::{EventInput, EventTypeDef, EventTypeInput, MAX_BATCH};
use crate::domain::{FieldError, Role, ValidationErrors};
use crate::error::{Error, Result};
use crate::ingest::ItemOutcome;

/// `{"items": [...]}`: a tenant's event types.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventTypeList {
    items: Vec<EventTypeDef>,
}

/// `PUT …/event-types/{type}`: creates (201) or replaces (200) a type. An invalid schema
/// → 422 naming what is wrong.
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/event-types/{event_type}", operation_id = "putEventType", tag = "events", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("event_type" = String, Path, description = "`[a-z][a-z0-9_]*(\\.[a-z0-9_]+)+`, outside `tenant.`, `user.`, `auth.`, `webhook.`, `api_key.`", pattern = r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$", max_length = 128)),
    request_body = EventTypeInput,
    responses((status = 201, description = "Created", body = EventTypeDef), (status = 200, description = "Replaced (version + 1)", body = EventTypeDef), AuthProblems, BodyProblems, NotFound, Unavailable))]
async fn put_type(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((tenant_id, name)): ApiPath<(Uuid, String)>,
    ApiJson(input): ApiJson<EventTypeInput>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Admin)?;
    let (def, created) = s.ingest.put_type(tenant_id, &name, input).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(def)).into_response())
}

/// `GET …/event-types`: every type of the tenant, by name.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/event-types", operation_id = "listEventTypes", tag = "events", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant")),
    responses((status = 200, description = "The tenant's types", body = EventTypeList), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn list_types(State(s): State<AppState>, caller: Caller, ApiPath(tenant_id): ApiPath<Uuid>) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Reader)?;
    Ok(Json(EventTypeList { items: s.ingest.list_types(tenant_id).await? }).into_response())
}

/// `GET …/event-types/{type}`.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/event-types/{event_type}", operation_id = "getEventType", tag = "events", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("event_type" = String, Path, description = "The type's name", max_length = 128)),
    responses((status = 200, description = "The type", body = EventTypeDef), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn get_type(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((tenant_id, name)): ApiPath<(Uuid, String)>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Reader)?;
    Ok(Json(s.ingest.get_type(tenant_id, &name).await?).into_response())
}

/// `DELETE …/event-types/{type}`: new events of it are refused; accepted ones are
/// still processed.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/event-types/{event_type}", operation_id = "deleteEventType", tag = "events", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("event_type" = String, Path, description = "The type's name", max_length = 128)),
    responses((status = 204, description = "Deleted"), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn delete_type(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((tenant_id, name)): ApiPath<(Uuid, String)>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Admin)?;
    s.ingest.delete_type(tenant_id, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `{"id"}`: an accepted event.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Accepted {
    id: Uuid,
}

/// `POST …/events`: one event → 202 `{"id"}`; a client `id` seen before → 200 with the
/// original event's id, nothing written; invalid `data` → 422 naming the JSON pointer of
/// each bad field.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/events", operation_id = "ingestEvent", tag = "events", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant")),
    request_body = EventInput,
    responses((status = 202, description = "Accepted", body = Accepted), (status = 200, description = "Seen before (the original id)", body = Accepted), AuthProblems, BodyProblems, NotFound, Backlog, Unavailable))]
async fn ingest_one(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(tenant_id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<EventInput>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Writer)?;
    let mut out = s.ingest.ingest(tenant_id, vec![Ok(input)], &caller.ctx()).await?;
    match out.pop() {
        Some(ItemOutcome::Accepted(w)) => {
            let status = if w.new { StatusCode::ACCEPTED } else { StatusCode::OK };
            Ok((status, Json(Accepted { id: w.id })).into_response())
        }
        Some(ItemOutcome::Invalid(e)) => Err(e.into()),
        None => Err(Error::Internal("ingestion answered nothing".into())),
    }
}

/// `{"events": [...]}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchInput {
    /// At most 500 events, each like the body of `POST …/events`.
    #[schema(value_type = Vec<EventInput>, max_items = 500)]
    events: Vec<Value>,
}

/// One event's outcome in a batch.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchItem {
    /// The event's id (the original one for a client id seen before); absent when invalid.
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<Uuid>,
    /// 202 accepted, 200 seen before, 422 invalid.
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<Vec<FieldError>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchResult {
    items: Vec<BatchItem>,
}

/// `POST …/events/batch`: up to 500 events; an outcome per event, in order. The accepted
/// ones are written in one transaction; invalid ones do not stop the others.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/events/batch", operation_id = "ingestEvents", tag = "events", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant")),
    request_body = BatchInput,
    responses((status = 200, description = "Each event's outcome", body = BatchResult), AuthProblems, BodyProblems, NotFound, Backlog, Unavailable))]
async fn ingest_batch(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(tenant_id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<BatchInput>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Writer)?;
    if input.events.len() > MAX_BATCH {
        let n = input.events.len();
        return Err(ValidationErrors::single("events", format!("at most {MAX_BATCH} events a batch (got {n})")).into());
    }
    let items = input
        .events
        .into_iter()
        .map(|v| serde_json::from_value::<EventInput>(v).map_err(|e| ValidationErrors::single("", e.to_string())))
        .collect();
    let out = s.ingest.ingest(tenant_id, items, &caller.ctx()).await?;
    let items = out
        .into_iter()
        .map(|o| match o {
            ItemOutcome::Accepted(w) => {
                BatchItem { id: Some(w.id), status: if w.new { 202 } else { 200 }, errors: None }
            }
            ItemOutcome::Invalid(e) => BatchItem { id: None, status: 422, errors: Some(e.errors) },
        })
        .collect();
    Ok(Json(BatchResult { items }).into_response())
}

/// `?from=&to=&bucket=&type=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AnalyticsQuery {
    /// Start (RFC 3339); default: one hour (bucket=minute), one day (hour) or 30 days
    /// (day) before `to`.
    #[param(format = DateTime)]
    from: Option<String>,
    /// End, exclusive (RFC 3339); default: now.
    #[param(format = DateTime)]
    to: Option<String>,
    /// `minute` (default), `hour` or `day`.
    #[param(pattern = "^(minute|hour|day)$")]
    bucket: Option<String>,
    /// Only this event type.
    #[param(max_length = 128)]
    r#type: Option<String>,
}

/// `GET …/analytics/events`: counts per type (and per bucket in `items`), events per
/// second, and commit → processed latency p50/p95/p99 per type; every event counted
/// exactly once (domain events too).
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/analytics/events", operation_id = "eventAnalytics", tag = "events", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), AnalyticsQuery),
    responses((status = 200, description = "The window's figures", body = EventAnalytics), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn analytics(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(tenant_id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<AnalyticsQuery>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Reader)?;
    let grain = match q.bucket.as_deref() {
        None => Grain::Minute,
        Some(b) => Grain::parse(b)
            .ok_or_else(|| ValidationErrors::single("bucket", format!("'{b}' is not minute, hour or day")))?,
    };
    let to = query_time("to", q.to.as_deref())?.unwrap_or_else(chrono::Utc::now);
    let default_span = match grain {
        Grain::Minute => chrono::TimeDelta::hours(1),
        Grain::Hour => chrono::TimeDelta::days(1),
        Grain::Day => chrono::TimeDelta::days(30),
    };
    let from = query_time("from", q.from.as_deref())?.unwrap_or(to - default_span);
    Ok(Json(s.ingest.analytics(tenant_id, from, to, grain, q.r#type.as_deref()).await?).into_response())
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_types))
        .routes(routes!(put_type, get_type, delete_type))
        .routes(routes!(ingest_one))
        .routes(routes!(ingest_batch))
        .routes(routes!(analytics))
}

/// Largest body of a batch (500 events of up to 16 KiB each).
pub const BATCH_BODY_BYTES: usize = 8 * 1024 * 1024;

/// The body limit of a request: batches may be larger than other bodies.
pub fn body_limit(path: &str, default: usize) -> usize {
    if path.ends_with("/events/batch") {
        default.max(BATCH_BODY_BYTES)
    } else {
        default
    }
}
