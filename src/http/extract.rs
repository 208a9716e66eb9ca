//! Request extractors that turn every kind of bad input into a problem response:
//! JSON bodies, path and query parameters, bearer credentials and conditional headers.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::AppState;
use crate::domain::{api_key::hash_secret, Actor, ApiKey, EventContext, Role, ValidationErrors};
use crate::error::{Error, Result};
use crate::store::IdempotencyRequest;

// ---- bodies and parameters ---------------------------------------------------------

/// `Json<T>` whose rejections are problems: 415 without a JSON content type, 413 over
/// the size limit, 400 for malformed JSON, 422 for well-formed JSON of the wrong shape.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self> {
        let limit = req.extensions().get::<BodyLimit>().map(|l| l.0).unwrap_or(0);
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection, limit)),
        }
    }
}

/// The configured body limit, put into request extensions so messages can quote it.
#[derive(Clone, Copy)]
pub struct BodyLimit(pub usize);

fn json_rejection(r: JsonRejection, limit: usize) -> Error {
    match r {
        JsonRejection::MissingJsonContentType(_) => {
            Error::UnsupportedMediaType("send the body as JSON with `Content-Type: application/json`".into())
        }
        JsonRejection::JsonSyntaxError(e) => {
            Error::BadRequest(format!("the body is not valid JSON: {}", e.body_text()))
        }
        JsonRejection::JsonDataError(e) => Error::Validation(ValidationErrors::single("body", e.body_text())),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => Error::PayloadTooLarge { limit },
        other => Error::BadRequest(other.body_text()),
    }
}

/// An RFC 3339 time from a query parameter (absent or empty: `None`); `Err` says what
/// the field must be.
pub fn query_time(field: &str, value: Option<&str>) -> Result<Option<chrono::DateTime<chrono::Utc>>, ValidationErrors> {
    let Some(v) = value.filter(|v| !v.is_empty()) else { return Ok(None) };
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| Some(t.with_timezone(&chrono::Utc)))
        .map_err(|_| ValidationErrors::single(field, "must be an RFC 3339 time, e.g. 2026-11-23T10:00:00Z"))
}

/// Deserializes an already-parsed JSON value into a request type (422 on mismatch).
pub fn from_json_value<T: DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::Validation(ValidationErrors::single("body", e.to_string())))
}

/// `Path<T>` with a 400 problem naming the bad parameter.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => {
                Err(Error::BadRequest(format!("invalid path parameter: {}; ids are UUIDs", e.body_text())))
            }
            Err(other) => Err(Error::BadRequest(other.body_text())),
        }
    }
}

/// `Query<T>` with a 400 problem naming the bad parameter.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| ApiQuery(v))
            .map_err(|e: QueryRejection| Error::BadRequest(format!("invalid query string: {}", e.body_text())))
    }
}

// ---- credentials -------------------------------------------------------------------

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Principal {
    /// Holder of `EVENTRA_ADMIN_TOKEN`: manages tenants and operator endpoints.
    PlatformAdmin,
    /// A tenant API key: acts only inside its tenant, within its role.
    TenantKey(ApiKey),
}

impl Principal {
    pub fn actor(&self) -> Actor {
        match self {
            Principal::PlatformAdmin => Actor::PlatformAdmin,
            Principal::TenantKey(k) => Actor::ApiKey { id: k.id, role: k.role },
        }
    }

    /// Only the platform admin token.
    pub fn require_platform_admin(&self) -> Result<()> {
        match self {
            Principal::PlatformAdmin => Ok(()),
            Principal::TenantKey(_) => Err(Error::Forbidden("this endpoint needs the platform admin token".into())),
        }
    }

    /// The platform admin, or a key of `tenant_id` with at least `role`. A key of
    /// another tenant gets 404: it must not learn that the tenant exists.
    pub fn require_tenant(&self, tenant_id: Uuid, role: Role) -> Result<()> {
        match self {
            Principal::PlatformAdmin => Ok(()),
            Principal::TenantKey(k) if k.tenant_id != tenant_id => Err(Error::NotFound("tenant")),
            Principal::TenantKey(k) if k.role < role => Err(Error::Forbidden(format!(
                "this needs an API key with role '{}' or higher; this key is '{}'",
                role.as_str(),
                k.role.as_str()
            ))),
            Principal::TenantKey(_) => Ok(()),
        }
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let Some(header) = parts.headers.get(header::AUTHORIZATION) else {
            return dashboard_session(parts, state);
        };
        let token = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::Unauthorized("the Authorization header must be `Bearer <token>`".into()))?;
        let admin = state.admin_token.expose().as_bytes();
        if bool::from(token.as_bytes().ct_eq(admin)) {
            return Ok(Principal::PlatformAdmin);
        }
        match state.tenants.find_api_key(&hash_secret(token)).await? {
            Some(key) => {
                tracing::Span::current().record("tenant_id", tracing::field::display(key.tenant_id));
                let rate = state.tenants.rate_limit_of(key.tenant_id).await?;
                state.auth.api_key_request(key.id, rate).await?;
                Ok(Principal::TenantKey(key))
            }
            None => Err(Error::Unauthorized("the bearer token is not valid".into())),
        }
    }
}

/// A request without `Authorization`: the dashboard's session cookie makes it the
/// platform admin's; a state-changing one must also carry the session's CSRF token.
fn dashboard_session(parts: &Parts, state: &AppState) -> Result<Principal> {
    use super::dashboard::session;
    let cookie = parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(session::from_cookie_header)
        .filter(|c| state.sessions.verify(c, super::dashboard::unix_now()))
        .ok_or_else(|| Error::Unauthorized("send `Authorization: Bearer <token>`".into()))?;
    if !parts.method.is_safe() {
        let token = parts.headers.get(session::CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !state.sessions.csrf_matches(cookie, token) {
            return Err(Error::Forbidden(
                "a change made with the dashboard's session needs its CSRF token in `X-CSRF-Token`".into(),
            ));
        }
    }
    Ok(Principal::PlatformAdmin)
}

/// The request id set by the request-id middleware; events carry it as `correlationid`.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Principal plus request id: everything an event needs to say who did what, when asked.
pub struct Caller {
    pub principal: Principal,
    pub request_id: String,
}

impl Caller {
    pub fn ctx(&self) -> EventContext {
        EventContext { correlation_id: self.request_id.clone(), actor: self.principal.actor() }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let principal = Principal::from_request_parts(parts, state).await?;
        let request_id = parts.extensions.get::<RequestId>().map(|r| r.0.clone()).unwrap_or_default();
        Ok(Caller { principal, request_id })
    }
}

// ---- conditional and idempotent requests -------------------------------------------

/// The version an `If-Match` header names; `None` when absent or `*`.
pub fn if_match(headers: &HeaderMap) -> Result<Option<i64>> {
    let Some(v) = headers.get(header::IF_MATCH) else { return Ok(None) };
    let bad = || Error::BadRequest("If-Match must be the ETag from a previous response, like \"3\"".into());
    let s = v.to_str().map_err(|_| bad())?.trim();
    if s == "*" {
        return Ok(None);
    }
    let s = s.strip_prefix("W/").unwrap_or(s);
    let s = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(s);
    s.parse::<i64>().map(Some).map_err(|_| bad())
}

/// The `Idempotency-Key` header with the digest of the body it came with.
pub fn idempotency(headers: &HeaderMap, body: &serde_json::Value) -> Result<Option<IdempotencyRequest>> {
    let Some(v) = headers.get("idempotency-key") else { return Ok(None) };
    let key = v
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| Error::BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters".into()))?;
    // serde_json maps are ordered, so equal JSON gives equal bytes whatever the key order.
    let canonical = serde_json::to_vec(body).map_err(|e| Error::Internal(e.to_string()))?;
    let request_hash = Sha256::digest(&canonical).iter().map(|b| format!("{b:02x}")).collect();
    Ok(Some(IdempotencyRequest { key: key.to_owned(), request_hash }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(name: &'static str, v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn if_match_forms() {
        assert_eq!(if_match(&HeaderMap::new()).unwrap(), None);
        assert_eq!(if_match(&headers("if-match", "\"3\"")).unwrap(), Some(3));
        assert_eq!(if_match(&headers("if-match", "W/\"4\"")).unwrap(), Some(4));
        assert_eq!(if_match(&headers("if-match", "*")).unwrap(), None);
        assert!(if_match(&headers("if-match", "\"abc\"")).is_err());
    }

    #[test]
    fn idempotency_hash_ignores_key_order() {
        let a = serde_json::json!({"email": "a@b.co", "name": "A"});
        let b: serde_json::Value = serde_json::from_str(r#"{"name":"A","email":"a@b.co"}"#).unwrap();
        let h = headers("idempotency-key", "k1");
        assert_eq!(idempotency(&h, &a).unwrap(), idempotency(&h, &b).unwrap());
        assert!(idempotency(&headers("idempotency-key", &"x".repeat(256)), &a).is_err());
    }

    #[test]
    fn other_tenant_is_not_found_and_low_role_is_forbidden() {
        let key = ApiKey {
            id: Uuid::now_v7(),
            tenant_id: Uuid::now_v7(),
            role: Role::Reader,
            created_at: crate::domain::now(),
        };
        let p = Principal::TenantKey(key.clone());
        assert!(matches!(p.require_tenant(Uuid::now_v7(), Role::Reader), Err(Error::NotFound(_))));
        assert!(matches!(p.require_tenant(key.tenant_id, Role::Writer), Err(Error::Forbidden(_))));
        assert!(p.require_tenant(key.tenant_id, Role::Reader).is_ok());
        assert!(Principal::PlatformAdmin.require_tenant(Uuid::now_v7(), Role::Admin).is_ok());
    }
}
