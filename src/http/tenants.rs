//! `/v1/tenants`: tenant lifecycle (platform admin), and reading one's own tenant.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::AppState;
use crate::domain::tenant::NewTenantInput;
use crate::domain::{NewTenant, PageRequest, Role, Tenant, TenantPatch};
use crate::error::Result;

/// `?limit=&cursor=` of every list endpoint.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

impl ListQuery {
    pub fn page(&self) -> Result<PageRequest> {
        Ok(PageRequest::parse(self.limit, self.cursor.as_deref())?)
    }
}

/// A key as shown once, at creation.
#[derive(Debug, Serialize)]
pub struct ShownKey {
    pub id: Uuid,
    pub role: Role,
    pub key: String,
}

#[derive(Debug, Serialize)]
struct CreatedTenant {
    tenant: Tenant,
    api_key: ShownKey,
}

/// `POST /v1/tenants`: creates a tenant and its first admin key (shown once).
async fn create(
    State(s): State<AppState>,
    caller: Caller,
    ApiJson(input): ApiJson<NewTenantInput>,
) -> Result<Response> {
    caller.principal.require_platform_admin()?;
    let tenant = NewTenant::parse(input, crate::domain::now())?;
    let (tenant, key) = s.tenants.create_tenant(tenant, caller.ctx()).await?;
    let location = format!("/v1/tenants/{}", tenant.id);
    let body = CreatedTenant { tenant, api_key: ShownKey { id: key.key.id, role: key.key.role, key: key.secret } };
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(body)).into_response())
}

/// `GET /v1/tenants`: all tenants, paged (platform admin).
async fn list(State(s): State<AppState>, caller: Caller, ApiQuery(q): ApiQuery<ListQuery>) -> Result<Response> {
    caller.principal.require_platform_admin()?;
    Ok(Json(s.tenants.list_tenants(q.page()?).await?).into_response())
}

/// `GET /v1/tenants/{tenant_id}`: the platform admin, or any key of that tenant.
async fn get_one(State(s): State<AppState>, caller: Caller, ApiPath(id): ApiPath<Uuid>) -> Result<Response> {
    caller.principal.require_tenant(id, Role::Reader)?;
    Ok(Json(s.tenants.get_tenant(id).await?).into_response())
}

/// `PATCH /v1/tenants/{tenant_id}`: rename or change `max_users` (platform admin).
async fn update(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<Uuid>,
    ApiJson(patch): ApiJson<TenantPatch>,
) -> Result<Response> {
    caller.principal.require_platform_admin()?;
    let patch = patch.validate()?;
    Ok(Json(s.tenants.update_tenant(id, patch, caller.ctx()).await?).into_response())
}

/// `DELETE /v1/tenants/{tenant_id}`: deletes the tenant, its users and keys (platform admin).
async fn delete(State(s): State<AppState>, caller: Caller, ApiPath(id): ApiPath<Uuid>) -> Result<StatusCode> {
    caller.principal.require_platform_admin()?;
    s.tenants.delete_tenant(id, caller.ctx()).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/tenants", get(list).post(create))
        .route("/v1/tenants/{tenant_id}", get(get_one).patch(update).delete(delete))
}
