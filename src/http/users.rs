//! `/v1/tenants/{tenant_id}/users`: user CRUD with ETags, `If-Match` and `Idempotency-Key`.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::extract::{from_json_value, idempotency, if_match, ApiJson, ApiPath, ApiQuery, Caller};
use super::openapi::{AuthProblems, BodyProblems, NotFound, QueryProblems, Unavailable};
use super::tenants::ListQuery;
use super::AppState;
use crate::domain::user::NewUserInput;
use crate::domain::{NewUser, Role, User, UserPatch};
use crate::error::Result;

/// A user with its `ETag: "<version>"`.
fn with_etag(status: StatusCode, user: User) -> Response {
    let etag = format!("\"{}\"", user.version);
    (status, [(header::ETAG, etag)], Json(user)).into_response()
}

/// `POST …/users`: creates a user (writer). With `Idempotency-Key`, a retry with the
/// same body gets the original answer (marked `Idempotent-Replayed: true`).
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/users", operation_id = "createUser", tag = "users", security(("bearer" = [])),
    params(
        ("tenant_id" = Uuid, Path, description = "The tenant"),
        ("Idempotency-Key" = Option<String>, Header, pattern = r"^[\x21-\x7e]([\x20-\x7e]{0,253}[\x21-\x7e])?$", description = "Makes the create safe to retry: the same key with the same body answers the original user (24 h)"),
    ),
    request_body = NewUserInput,
    responses(
        (status = 201, description = "Created (or replayed, with `Idempotent-Replayed: true`); `ETag` is its version", body = User,
            headers(("ETag" = String, description = "`\"<version>\"`"), ("Location" = String, description = "The user's URL"))),
        (status = 409, description = "The email is taken in this tenant, or the tenant is full (`type` …:tenant-user-limit)", body = super::problem::Problem, content_type = "application/problem+json"),
        AuthProblems, BodyProblems, NotFound, Unavailable,
    ))]
async fn create(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(tenant_id): ApiPath<Uuid>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Writer)?;
    // The stored request hash must not be a fast hash of the password: a replay is
    // matched on the rest of the body (the user was created with the first password).
    let mut without_password = body.clone();
    if let Some(o) = without_password.as_object_mut() {
        o.remove("password");
    }
    let idem = idempotency(&headers, &without_password)?;
    let input: NewUserInput = from_json_value(body)?;
    let user = NewUser::parse(tenant_id, input, crate::domain::now())?;
    let user = s.auth.hash_new_user(user).await?;
    let created = s.tenants.create_user(user, idem, caller.ctx()).await?;
    let location = format!("/v1/tenants/{tenant_id}/users/{}", created.value.id);
    let mut res = with_etag(StatusCode::CREATED, created.value);
    let h = res.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    if created.replayed {
        h.insert(HeaderName::from_static("idempotent-replayed"), HeaderValue::from_static("true"));
    }
    Ok(res)
}

/// `GET …/users?limit=&cursor=`: users in id (= creation) order (reader).
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/users", operation_id = "listUsers", tag = "users", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ListQuery),
    responses((status = 200, description = "A page of users", body = crate::domain::Page<User>), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn list(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(tenant_id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Reader)?;
    Ok(Json(s.tenants.list_users(tenant_id, q.page()?).await?).into_response())
}

/// `GET …/users/{user_id}` (reader).
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/users/{user_id}", operation_id = "getUser", tag = "users", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("user_id" = Uuid, Path, description = "The user")),
    responses((status = 200, description = "The user; `ETag` is its version", body = User, headers(("ETag" = String))),
        AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn get_one(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((tenant_id, user_id)): ApiPath<(Uuid, Uuid)>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Reader)?;
    Ok(with_etag(StatusCode::OK, s.tenants.get_user(tenant_id, user_id).await?))
}

/// `PATCH …/users/{user_id}` (writer): 412 when `If-Match` names a stale version.
#[utoipa::path(patch, path = "/v1/tenants/{tenant_id}/users/{user_id}", operation_id = "updateUser", tag = "users", security(("bearer" = [])),
    params(
        ("tenant_id" = Uuid, Path, description = "The tenant"), ("user_id" = Uuid, Path, description = "The user"),
        ("If-Match" = Option<String>, Header, pattern = r#"^(\*|(W/)?"?[0-9]{1,18}"?)$"#, description = "`\"<version>\"`: change only if this is still the current version"),
    ),
    request_body = UserPatch,
    responses(
        (status = 200, description = "The user after the change", body = User, headers(("ETag" = String))),
        (status = 409, description = "The new email is taken in this tenant", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 412, description = "`If-Match` names a stale version (`current_version` says which is current)", body = super::problem::Problem, content_type = "application/problem+json"),
        AuthProblems, BodyProblems, NotFound, Unavailable,
    ))]
async fn update(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((tenant_id, user_id)): ApiPath<(Uuid, Uuid)>,
    headers: HeaderMap,
    ApiJson(patch): ApiJson<UserPatch>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Writer)?;
    let expected = if_match(&headers)?;
    let patch = patch.validate()?;
    let user = s.tenants.update_user(tenant_id, user_id, expected, patch, caller.ctx()).await?;
    Ok(with_etag(StatusCode::OK, user))
}

/// `DELETE …/users/{user_id}` (writer): 204; honours `If-Match` too.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/users/{user_id}", operation_id = "deleteUser", tag = "users", security(("bearer" = [])),
    params(
        ("tenant_id" = Uuid, Path, description = "The tenant"), ("user_id" = Uuid, Path, description = "The user"),
        ("If-Match" = Option<String>, Header, pattern = r#"^(\*|(W/)?"?[0-9]{1,18}"?)$"#, description = "`\"<version>\"`: delete only if this is still the current version"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 412, description = "`If-Match` names a stale version", body = super::problem::Problem, content_type = "application/problem+json"),
        AuthProblems, QueryProblems, NotFound, Unavailable,
    ))]
async fn delete(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((tenant_id, user_id)): ApiPath<(Uuid, Uuid)>,
    headers: HeaderMap,
) -> Result<StatusCode> {
    caller.principal.require_tenant(tenant_id, Role::Writer)?;
    let expected = if_match(&headers)?;
    s.tenants.delete_user(tenant_id, user_id, expected, caller.ctx()).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list, create)).routes(routes!(get_one, update, delete))
}
