//! `/v1/tenants`: tenant lifecycle (platform admin), and reading one's own tenant.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::extract::{ApiJson, ApiPath, ApiQuery, Caller};
use super::openapi::{AuthProblems, BodyProblems, NotFound, QueryProblems, Unavailable};
use super::AppState;
use crate::domain::tenant::NewTenantInput;
use crate::domain::{NewTenant, PageRequest, Role, Tenant, TenantPatch};
use crate::error::Result;

/// `?limit=&cursor=` of every list endpoint.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Items per page, 1-200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl ListQuery {
    pub fn page(&self) -> Result<PageRequest> {
        Ok(PageRequest::parse(self.limit, self.cursor.as_deref())?)
    }
}

/// A key as shown once, at creation.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ShownKey {
    pub id: Uuid,
    pub role: Role,
    pub key: String,
}

/// A new tenant and its first admin key (the key is shown only here).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedTenant {
    tenant: Tenant,
    api_key: ShownKey,
}

/// `POST /v1/tenants`: creates a tenant and its first admin key (shown once).
#[utoipa::path(post, path = "/v1/tenants", operation_id = "createTenant", tag = "tenants", security(("bearer" = [])),
    request_body = NewTenantInput,
    responses(
        (status = 201, description = "Created; `Location` names it; the key is shown only here", body = CreatedTenant),
        (status = 409, description = "The slug is taken", body = super::problem::Problem, content_type = "application/problem+json"),
        AuthProblems, BodyProblems, Unavailable,
    ))]
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
#[utoipa::path(get, path = "/v1/tenants", operation_id = "listTenants", tag = "tenants", security(("bearer" = [])), params(ListQuery),
    responses((status = 200, description = "A page of tenants", body = crate::domain::Page<Tenant>), AuthProblems, QueryProblems, Unavailable))]
async fn list(State(s): State<AppState>, caller: Caller, ApiQuery(q): ApiQuery<ListQuery>) -> Result<Response> {
    caller.principal.require_platform_admin()?;
    Ok(Json(s.tenants.list_tenants(q.page()?).await?).into_response())
}

/// `GET /v1/tenants/{tenant_id}`: the platform admin, or any key of that tenant.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}", operation_id = "getTenant", tag = "tenants", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant")),
    responses((status = 200, description = "The tenant", body = Tenant), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn get_one(State(s): State<AppState>, caller: Caller, ApiPath(id): ApiPath<Uuid>) -> Result<Response> {
    caller.principal.require_tenant(id, Role::Reader)?;
    Ok(Json(s.tenants.get_tenant(id).await?).into_response())
}

/// `PATCH /v1/tenants/{tenant_id}`: rename or change `max_users` (platform admin).
#[utoipa::path(patch, path = "/v1/tenants/{tenant_id}", operation_id = "updateTenant", tag = "tenants", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant")), request_body = TenantPatch,
    responses((status = 200, description = "The tenant after the change", body = Tenant), AuthProblems, BodyProblems, NotFound, Unavailable))]
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
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}", operation_id = "deleteTenant", tag = "tenants", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant")),
    responses((status = 204, description = "Deleted"), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn delete(State(s): State<AppState>, caller: Caller, ApiPath(id): ApiPath<Uuid>) -> Result<StatusCode> {
    caller.principal.require_platform_admin()?;
    s.tenants.delete_tenant(id, caller.ctx()).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list, create)).routes(routes!(get_one, update, delete))
}
