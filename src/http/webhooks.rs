//! `/v1/tenants/{tenant_id}/webhooks`: a tenant's webhook endpoints (SPEC §7). Tenant
//! `admin` key or platform admin. The rules live in `webhooks::service`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::openapi::{AuthProblems, BodyProblems, NotFound, QueryProblems, Unavailable};
use super::tenants::ListQuery;
use super::AppState;
use crate::domain::webhook::{DeliveryAttempt, EndpointPatch, NewEndpointInput, WebhookEndpoint};
use crate::domain::{Page, PageRequest, Role, ValidationErrors};
use crate::error::Result;

/// An endpoint with its secret: only in the answers to create and rotation.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EndpointWithSecret {
    #[serde(flatten)]
    pub endpoint: WebhookEndpoint,
    /// `whsec_…`: verify the `webhook-signature` header with it. Shown only here.
    pub secret: String,
}

/// `?status=&limit=&cursor=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// `succeeded` or `failed`: those attempts; `pending`: each event's latest attempt
    /// when it failed and another is due (shown with status `pending`); absent: every
    /// attempt.
    #[param(pattern = "^(succeeded|failed|pending)$")]
    status: Option<String>,
    /// Attempts per page, 1-200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// `?since=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RecoverQuery {
    /// Resend every event that failed since this time (RFC 3339).
    #[param(required = true, format = DateTime)]
    since: Option<String>,
}

fn page(limit: Option<u32>, cursor: Option<&str>) -> Result<PageRequest> {
    Ok(PageRequest::parse(limit, cursor)?)
}

/// `POST …/webhooks`: subscribes an endpoint (its URL must resolve to public addresses).
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/webhooks", operation_id = "createWebhook", tag = "webhooks", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant")), request_body = NewEndpointInput,
    responses((status = 201, description = "The endpoint with its secret (shown only here and on rotation)", body = EndpointWithSecret),
        AuthProblems, BodyProblems, NotFound, Unavailable))]
async fn create(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(tenant_id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<NewEndpointInput>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Admin)?;
    let (endpoint, secret) = s.webhooks.create(tenant_id, input).await?;
    Ok((StatusCode::CREATED, Json(EndpointWithSecret { endpoint, secret })).into_response())
}

/// `GET …/webhooks`: the tenant's endpoints, oldest first.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/webhooks", operation_id = "listWebhooks", tag = "webhooks", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ListQuery),
    responses((status = 200, description = "A page of endpoints", body = Page<WebhookEndpoint>), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn list(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(tenant_id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Admin)?;
    Ok(Json(s.webhooks.list(tenant_id, q.page()?).await?).into_response())
}

/// `GET …/webhooks/{webhook_id}`.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/webhooks/{webhook_id}", operation_id = "getWebhook", tag = "webhooks", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("webhook_id" = Uuid, Path, description = "The endpoint")),
    responses((status = 200, description = "The endpoint", body = WebhookEndpoint), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn get_one(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((tenant_id, id)): ApiPath<(Uuid, Uuid)>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Admin)?;
    Ok(Json(s.webhooks.get(tenant_id, id).await?).into_response())
}

/// `PATCH …/webhooks/{webhook_id}`: `url`, `event_types`, `description`, `status`.
#[utoipa::path(patch, path = "/v1/tenants/{tenant_id}/webhooks/{webhook_id}", operation_id = "updateWebhook", tag = "webhooks", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("webhook_id" = Uuid, Path, description = "The endpoint")), request_body = EndpointPatch,
    responses((status = 200, description = "The endpoint after the change", body = WebhookEndpoint), AuthProblems, BodyProblems, NotFound, Unavailable))]
async fn update(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((tenant_id, id)): ApiPath<(Uuid, Uuid)>,
    ApiJson(patch): ApiJson<EndpointPatch>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Admin)?;
    Ok(Json(s.webhooks.update(tenant_id, id, patch).await?).into_response())
}

/// `DELETE …/webhooks/{webhook_id}`: the endpoint and its delivery log.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/webhooks/{webhook_id}", operation_id = "deleteWebhook", tag = "webhooks", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("webhook_id" = Uuid, Path, description = "The endpoint")),
    responses((status = 204, description = "Deleted"), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn delete(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((tenant_id, id)): ApiPath<(Uuid, Uuid)>,
) -> Result<StatusCode> {
    caller.principal.require_tenant(tenant_id, Role::Admin)?;
    s.webhooks.delete(tenant_id, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST …/webhooks/{webhook_id}/rotate-secret`: a new secret; the old one keeps
/// signing (a second signature) for 24 hours.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/webhooks/{webhook_id}/rotate-secret", operation_id = "rotateWebhookSecret", tag = "webhooks", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("webhook_id" = Uuid, Path, description = "The endpoint")),
    responses((status = 200, description = "The endpoint with its new secret (shown only here)", body = EndpointWithSecret), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn rotate(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((tenant_id, id)): ApiPath<(Uuid, Uuid)>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Admin)?;
    let secret = s.webhooks.rotate_secret(tenant_id, id).await?;
    let endpoint = s.webhooks.get(tenant_id, id).await?;
    Ok(Json(EndpointWithSecret { endpoint, secret }).into_response())
}

/// `POST …/webhooks/{webhook_id}/test`: sends a `webhook.test` event to the endpoint.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/webhooks/{webhook_id}/test", operation_id = "testWebhook", tag = "webhooks", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("webhook_id" = Uuid, Path, description = "The endpoint")),
    responses((status = 202, description = "`{event_id}`: queued; see the deliveries", body = serde_json::Value), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn test(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((tenant_id, id)): ApiPath<(Uuid, Uuid)>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Admin)?;
    let event_id = s.webhooks.test(tenant_id, id, &caller.ctx()).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "event_id": event_id }))).into_response())
}

/// `GET …/webhooks/{webhook_id}/deliveries?status=&cursor=`: every attempt, oldest first.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/webhooks/{webhook_id}/deliveries", operation_id = "listWebhookDeliveries", tag = "webhooks", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("webhook_id" = Uuid, Path, description = "The endpoint"), DeliveriesQuery),
    responses((status = 200, description = "A page of attempts", body = Page<DeliveryAttempt>), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn deliveries(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((tenant_id, id)): ApiPath<(Uuid, Uuid)>,
    ApiQuery(q): ApiQuery<DeliveriesQuery>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Admin)?;
    if let Some(st) = q.status.as_deref().filter(|st| !matches!(*st, "succeeded" | "failed" | "pending")) {
        return Err(ValidationErrors::single("status", format!("'{st}' is not succeeded, failed or pending")).into());
    }
    let page = page(q.limit, q.cursor.as_deref())?;
    Ok(Json(s.webhooks.deliveries(tenant_id, id, q.status.as_deref(), page).await?).into_response())
}

/// `POST …/webhooks/{webhook_id}/deliveries/{event_id}/retry`: resends one event now
/// (nothing is sent if it was delivered).
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/webhooks/{webhook_id}/deliveries/{event_id}/retry", operation_id = "retryWebhookDelivery", tag = "webhooks", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("webhook_id" = Uuid, Path, description = "The endpoint"), ("event_id" = Uuid, Path, description = "The event")),
    responses((status = 202, description = "`{queued: true}`", body = serde_json::Value), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn retry(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((tenant_id, id, event_id)): ApiPath<(Uuid, Uuid, Uuid)>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Admin)?;
    s.webhooks.retry(tenant_id, id, event_id).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "queued": true }))).into_response())
}

/// `POST …/webhooks/{webhook_id}/recover?since=`: resends every event that failed
/// since then and was not delivered.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/webhooks/{webhook_id}/recover", operation_id = "recoverWebhook", tag = "webhooks", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("webhook_id" = Uuid, Path, description = "The endpoint"), RecoverQuery),
    responses((status = 202, description = "`{resent: n}`", body = serde_json::Value), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn recover(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((tenant_id, id)): ApiPath<(Uuid, Uuid)>,
    ApiQuery(q): ApiQuery<RecoverQuery>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Admin)?;
    let since = super::extract::query_time("since", q.since.as_deref())?
        .ok_or_else(|| ValidationErrors::single("since", "is required: an RFC 3339 time"))?;
    let n = s.webhooks.recover(tenant_id, id, since).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "resent": n }))).into_response())
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(get_one, update, delete))
        .routes(routes!(rotate))
        .routes(routes!(test))
        .routes(routes!(deliveries))
        .routes(routes!(retry))
        .routes(routes!(recover))
}
