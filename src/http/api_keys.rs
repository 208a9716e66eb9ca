//! `/v1/tenants/{tenant_id}/api-keys`: minting tenant keys (shown once).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::extract::{ApiJson, ApiPath, Caller};
use super::openapi::{AuthProblems, BodyProblems, NotFound, Unavailable};
use super::tenants::ShownKey;
use super::AppState;
use crate::domain::Role;
use crate::error::Result;

/// The key to mint.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKeyInput {
    role: Role,
}

/// `POST /v1/tenants/{tenant_id}/api-keys`: the platform admin or a tenant admin key.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/api-keys", operation_id = "createApiKey", tag = "tenants", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant")), request_body = NewKeyInput,
    responses((status = 201, description = "The key, shown only here (stored hashed)", body = ShownKey),
        AuthProblems, BodyProblems, NotFound, Unavailable))]
async fn create(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(tenant_id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<NewKeyInput>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Admin)?;
    let key = s.tenants.create_api_key(tenant_id, input.role, caller.ctx()).await?;
    let body = ShownKey { id: key.key.id, role: key.key.role, key: key.secret };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create))
}
