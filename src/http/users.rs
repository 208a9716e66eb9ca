//! `/v1/tenants/{tenant_id}/users`: user CRUD with ETags, `If-Match` and `Idempotency-Key`.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use uuid::Uuid;

use super::extract::{from_json_value, idempotency, if_match, ApiJson, ApiPath, ApiQuery, Caller};
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
async fn create(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(tenant_id): ApiPath<Uuid>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Writer)?;
    let idem = idempotency(&headers, &body)?;
    let input: NewUserInput = from_json_value(body)?;
    let user = NewUser::parse(tenant_id, input, crate::domain::now())?;
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
async fn get_one(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath((tenant_id, user_id)): ApiPath<(Uuid, Uuid)>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Reader)?;
    Ok(with_etag(StatusCode::OK, s.tenants.get_user(tenant_id, user_id).await?))
}

/// `PATCH …/users/{user_id}` (writer): 412 when `If-Match` names a stale version.
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

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/tenants/{tenant_id}/users", get(list).post(create))
        .route("/v1/tenants/{tenant_id}/users/{user_id}", get(get_one).patch(update).delete(delete))
}
