//! `/v1/tenants/{tenant_id}/api-keys`: minting tenant keys (shown once).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use uuid::Uuid;

use super::extract::{ApiJson, ApiPath, Caller};
use super::tenants::ShownKey;
use super::AppState;
use crate::domain::Role;
use crate::error::Result;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKeyInput {
    role: Role,
}

/// `POST /v1/tenants/{tenant_id}/api-keys`: the platform admin or a tenant admin key.
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

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/tenants/{tenant_id}/api-keys", post(create))
}
