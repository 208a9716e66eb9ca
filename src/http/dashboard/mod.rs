//! `/dashboard`: the operator's page. Jobs (Sidekiq Web's sections), the event pipeline
//! and its dead-letter queue, events by type, tenants and the live supervision tree.
//!
//! The page is static HTML, CSS and JavaScript embedded in the binary (`assets/`); it
//! polls the documented JSON API (`/v1/admin/stats`, `/v1/admin/jobs…`,
//! `/v1/admin/dlq…`, `/v1/tenants`, `/debug/actors`) with the session cookie, which the
//! `Principal` extractor accepts as the platform admin's. State-changing calls carry
//! the session's CSRF token in `X-CSRF-Token`. Every answer here sends a strict
//! Content-Security-Policy: the page loads and talks to nothing but this server.
//!
//! To add a panel: add its section to `assets/index.html`, a `panels.<name>` loader to
//! `assets/dashboard.js` (it gets the polled stats and renders), and, when it needs data
//! no endpoint has yet, a documented endpoint (and its metric, so `/metrics` shows it too).

pub mod session;

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Form;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{ApiPath, Principal};
use super::openapi::{AuthProblems, NotFound, QueryProblems};
use super::AppState;
use crate::domain::ValidationErrors;
use crate::error::{Error, Result};
pub use session::Sessions;

/// What the page may load and call: this server only; no inline script or style.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const INDEX_HTML: &str = include_str!("assets/index.html");
const LOGIN_HTML: &str = include_str!("assets/login.html");

/// The embedded assets: name, content type, body.
const ASSETS: &[(&str, &str, &str)] = &[
    ("dashboard.js", "text/javascript; charset=utf-8", include_str!("assets/dashboard.js")),
    ("dashboard.css", "text/css; charset=utf-8", include_str!("assets/dashboard.css")),
    ("login.js", "text/javascript; charset=utf-8", include_str!("assets/login.js")),
];

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(page))
        .routes(routes!(login_page, login))
        .routes(routes!(logout))
        .routes(routes!(asset))
}

/// Seconds since the epoch (sessions expire by it).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Security headers every dashboard answer carries.
fn secured(mut res: Response, cache: &'static str) -> Response {
    let h = res.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    res
}

fn html(status: StatusCode, body: String) -> Response {
    let res = (status, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    secured(res, "no-store")
}

/// The signed-in session's cookie value, if the request has a valid one.
fn session_of<'h>(state: &AppState, headers: &'h HeaderMap) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(session::from_cookie_header)
        .filter(|c| state.sessions.verify(c, unix_now()))
}

fn see_other(to: &'static str) -> Response {
    secured((StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response(), "no-store")
}

/// `GET /dashboard`: the dashboard when signed in; otherwise to the sign-in page.
#[utoipa::path(get, path = "/dashboard", operation_id = "dashboard", tag = "dashboard",
    responses((status = 200, description = "The dashboard", content_type = "text/html", body = String),
        (status = 303, description = "Not signed in: to `/dashboard/login`")))]
async fn page(State(s): State<AppState>, headers: HeaderMap) -> Response {
    match session_of(&s, &headers) {
        Some(session) => {
            let csrf = s.sessions.csrf(session);
            html(StatusCode::OK, INDEX_HTML.replace("{{csrf}}", &csrf).replace("{{chaos}}", &s.chaos.to_string()))
        }
        None => see_other("/dashboard/login"),
    }
}

/// `GET /dashboard/login`: the sign-in form (to the dashboard when already signed in).
#[utoipa::path(get, path = "/dashboard/login", operation_id = "dashboardLoginPage", tag = "dashboard",
    responses((status = 200, description = "The sign-in form: its field `token` takes the admin token", content_type = "text/html", body = String),
        (status = 303, description = "Already signed in: to `/dashboard`")))]
async fn login_page(State(s): State<AppState>, headers: HeaderMap) -> Response {
    match session_of(&s, &headers) {
        Some(_) => see_other("/dashboard"),
        None => html(StatusCode::OK, LOGIN_HTML.to_owned()),
    }
}

/// The sign-in form.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct LoginForm {
    /// The platform admin token (`EVENTRA_ADMIN_TOKEN`).
    token: String,
}

/// `POST /dashboard/login`: the admin token in, a session cookie out (HttpOnly,
/// SameSite=Strict, 8 h), then back to the dashboard. A wrong token goes back to the
/// sign-in page, which says so.
#[utoipa::path(post, path = "/dashboard/login", operation_id = "dashboardLogin", tag = "dashboard",
    request_body(content = LoginForm, content_type = "application/x-www-form-urlencoded"),
    responses((status = 303, description = "To `/dashboard`: signed in (`Set-Cookie`), or back to `/dashboard/login#failed`"),
        (status = 403, description = "Sent from another site", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not a form", body = super::problem::Problem, content_type = "application/problem+json"),
        (status = 422, description = "No token field", body = super::problem::Problem, content_type = "application/problem+json")))]
async fn login(
    State(s): State<AppState>,
    headers: HeaderMap,
    form: std::result::Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Result<Response> {
    // Login CSRF: a browser says where a form came from; only this site may sign in.
    let cross_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()).is_some_and(|v| v == "cross-site");
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let foreign_origin = match (origin, host) {
        (Some(o), Some(h)) => o != "null" && o.split_once("://").map(|(_, rest)| rest) != Some(h),
        _ => false,
    };
    if cross_site || foreign_origin {
        return Err(Error::Forbidden("sign in from the dashboard's own page".into()));
    }
    let form = match form {
        Ok(Form(form)) => form,
        Err(axum::extract::rejection::FormRejection::InvalidFormContentType(_)) => {
            return Err(Error::UnsupportedMediaType(
                "send the sign-in form as `application/x-www-form-urlencoded` with a `token` field".into(),
            ))
        }
        Err(e) => return Err(ValidationErrors::single("token", e.body_text()).into()),
    };
    let ok = bool::from(form.token.trim().as_bytes().ct_eq(s.admin_token.expose().as_bytes()));
    let mut res =
        (StatusCode::SEE_OTHER, [(header::LOCATION, if ok { "/dashboard" } else { "/dashboard/login#failed" })])
            .into_response();
    if ok {
        let secure = headers.get("x-forwarded-proto").is_some_and(|v| v == "https");
        let cookie = session::set_cookie(&s.sessions.issue(unix_now()), secure);
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            res.headers_mut().insert(header::SET_COOKIE, v);
        }
        tracing::info!("dashboard sign-in");
    } else {
        tracing::warn!("dashboard sign-in with a wrong token");
    }
    Ok(secured(res, "no-store"))
}

/// `POST /dashboard/logout` (with the session's CSRF token): removes the cookie.
#[utoipa::path(post, path = "/dashboard/logout", operation_id = "dashboardLogout", tag = "dashboard",
    responses((status = 204, description = "Signed out (the cookie is cleared)"), AuthProblems))]
async fn logout(principal: Principal) -> Result<Response> {
    principal.require_platform_admin()?;
    let mut res = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie()) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(secured(res, "no-store"))
}

/// `GET /dashboard/assets/{file}`: the page's script and style, from the binary.
#[utoipa::path(get, path = "/dashboard/assets/{file}", operation_id = "dashboardAsset", tag = "dashboard",
    params(("file" = String, Path, description = "`dashboard.js`, `dashboard.css` or `login.js`")),
    responses((status = 200, description = "The asset", content((String = "text/javascript"), (String = "text/css"))), QueryProblems, NotFound))]
async fn asset(ApiPath(file): ApiPath<String>) -> Result<Response> {
    let (_, content_type, body) =
        ASSETS.iter().find(|(name, _, _)| *name == file).ok_or(Error::NotFound("dashboard asset"))?;
    let res = ([(header::CONTENT_TYPE, *content_type)], *body).into_response();
    Ok(secured(res, "no-cache"))
}
