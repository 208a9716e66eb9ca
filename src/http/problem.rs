//! RFC 9457 problem details: the only error shape the API answers with.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::FieldError;
use crate::error::Error;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// The body of every error response (RFC 9457, `application/problem+json`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A stable URN per kind of problem, for clients to branch on
    /// (`urn:eventra:problem:<slug>`).
    #[serde(rename = "type")]
    pub kind: String,
    #[schema(value_type = String)]
    pub title: &'static str,
    pub status: u16,
    /// What went wrong and what to do about it.
    pub detail: String,
    /// Field-level problems (validation only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// For 412: the version to retry against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_version: Option<i64>,
}

impl Problem {
    pub fn new(status: StatusCode, slug: &str, title: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            kind: format!("urn:eventra:problem:{slug}"),
            title,
            status: status.as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
            current_version: None,
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let unauthorized = status == StatusCode::UNAUTHORIZED;
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut res = (status, body).into_response();
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if unauthorized {
            res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if matches!(status, StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS)
            && !res.headers().contains_key(header::RETRY_AFTER)
        {
            // Outages here are short (a dependency reconnecting): come back in a second.
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        res
    }
}

impl From<&Error> for Problem {
    fn from(e: &Error) -> Self {
        use StatusCode as S;
        let d = e.to_string();
        match e {
            Error::Validation(v) => {
                let mut p = Problem::new(S::UNPROCESSABLE_ENTITY, "validation", "Invalid input", d);
                p.errors = v.errors.clone();
                p
            }
            Error::BadRequest(_) => Problem::new(S::BAD_REQUEST, "bad-request", "Bad request", d),
            Error::Unauthorized(_) => Problem::new(S::UNAUTHORIZED, "unauthorized", "Unauthorized", d),
            Error::Forbidden(_) => Problem::new(S::FORBIDDEN, "forbidden", "Forbidden", d),
            Error::NotFound(_) => Problem::new(S::NOT_FOUND, "not-found", "Not found", d),
            Error::Conflict(_) => Problem::new(S::CONFLICT, "conflict", "Conflict", d),
            Error::TenantFull { .. } => Problem::new(S::CONFLICT, "tenant-user-limit", "Tenant user limit reached", d),
            Error::StaleVersion { current, .. } => {
                let mut p = Problem::new(S::PRECONDITION_FAILED, "stale-version", "Precondition failed", d);
                p.current_version = Some(*current);
                p
            }
            Error::IdempotencyMismatch => {
                Problem::new(S::UNPROCESSABLE_ENTITY, "idempotency-key-reused", "Idempotency-Key reused", d)
            }
            Error::PayloadTooLarge { .. } => {
                Problem::new(S::PAYLOAD_TOO_LARGE, "payload-too-large", "Payload too large", d)
            }
            Error::UnsupportedMediaType(_) => {
                Problem::new(S::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type", "Unsupported media type", d)
            }
            Error::Unavailable(_) => Problem::new(S::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable", d),
            Error::TooManyRequests(_) => Problem::new(S::TOO_MANY_REQUESTS, "backlog", "Too many requests", d),
            Error::RateLimited { .. } => Problem::new(S::TOO_MANY_REQUESTS, "rate-limited", "Too many attempts", d),
            Error::Internal(_) => Problem::new(
                S::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal server error",
                "the server failed to handle the request; it has been logged",
            ),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        match &self {
            Error::Internal(detail) => tracing::error!(error = %detail, "internal error"),
            Error::Unavailable(detail) => tracing::warn!(error = %detail, "unavailable"),
            _ => {}
        }
        let mut res = Problem::from(&self).into_response();
        if let Error::RateLimited { limit, window_secs, retry_after_secs } = self {
            // RFC 9110 Retry-After, and the IETF draft's RateLimit / RateLimit-Policy.
            let h = res.headers_mut();
            for (name, value) in [
                ("retry-after", retry_after_secs.to_string()),
                ("ratelimit", format!("limit={limit}, remaining=0, reset={retry_after_secs}")),
                ("ratelimit-policy", format!("{limit};w={window_secs}")),
            ] {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    h.insert(axum::http::HeaderName::from_static(name), v);
                }
            }
        }
        res
    }
}

/// Answer for routes that do not exist.
pub async fn not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "not-found", "Not found", "no such route; see /openapi.json for the API")
}

/// Answer for known routes called with the wrong method.
pub async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "this route does not accept that method",
    )
}
