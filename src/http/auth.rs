//! End-user authentication over HTTP (SPEC §8): sign-in, refresh, logout, `/me`, a
//! user's sessions, the JWKS and signing-key rotation. Translation only: the rules are
//! in `crate::auth`.
//!
//! Sign-in and refresh take no key (the tenant is in the path). `/me` and logout take
//! the user's access token. The sessions routes take a tenant `admin` key or the user's
//! own access token.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::extract::{ApiJson, ApiPath, Caller, RequestId};
use super::openapi::{AuthProblems, BodyProblems, NotFound, QueryProblems, RateLimited, Unavailable};
use super::AppState;
use crate::auth::keys::Jwks;
use crate::auth::Client;
use crate::domain::auth::{
    Claims, CodeInput, CodeSent, LoginInput, PasswordChange, RefreshInput, ResetConfirm, ResetRequest, Session,
    TokenPair,
};
use crate::domain::{Actor, EventContext, Role, User};
use crate::error::{Error, Result};

/// The bearer token, when it is an access token (a JWT: three base64url parts);
/// API keys and the admin token have no dots.
fn access_token(parts: &Parts) -> Option<&str> {
    let v = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let t = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))?.trim();
    (t.split('.').count() == 3).then_some(t)
}

fn request_id(parts: &Parts) -> String {
    parts.extensions.get::<RequestId>().map(|r| r.0.clone()).unwrap_or_default()
}

fn client(parts: &Parts, trusted: &[ipnet::IpNet]) -> Client {
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    Client {
        ip: peer.map(|p| client_ip(p, parts, trusted).to_string()).unwrap_or_default(),
        user_agent: parts.headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned(),
    }
}

/// The socket's peer; behind trusted proxies, the right-most `X-Forwarded-For` entry
/// that is not one of them (entries further left are the client's own say, forgeable).
fn client_ip(peer: IpAddr, parts: &Parts, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let forwarded = parts.headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
    let hops: Vec<IpAddr> = forwarded.iter().flat_map(|v| v.split(',')).filter_map(|h| h.trim().parse().ok()).collect();
    hops.into_iter().rev().find(|ip| !is_trusted(ip)).unwrap_or(peer)
}

/// The user's verified access token of `tenant_id` (401 without one).
async fn user(s: &AppState, parts: &Parts, tenant_id: Uuid) -> Result<Claims> {
    let token = access_token(parts)
        .ok_or_else(|| Error::Unauthorized("send the user's access token as `Authorization: Bearer <token>`".into()))?;
    s.auth.authenticate(tenant_id, token).await
}

/// Who may act on a user: the user (own access token) or a tenant key of `role`.
/// Returns the event context, and the token's claims when it was the user.
async fn user_or_key(
    s: &AppState,
    parts: &mut Parts,
    tenant_id: Uuid,
    user_id: Uuid,
    role: Role,
) -> Result<(EventContext, Option<Claims>)> {
    if access_token(parts).is_some() {
        let claims = user(s, parts, tenant_id).await?;
        if claims.sub != user_id {
            return Err(Error::Forbidden("an access token may only act on its own user".into()));
        }
        let ctx = EventContext { correlation_id: request_id(parts), actor: Actor::User { id: claims.sub } };
        return Ok((ctx, Some(claims)));
    }
    let caller = Caller::from_request_parts(parts, s).await?;
    caller.principal.require_tenant(tenant_id, role)?;
    Ok((caller.ctx(), None))
}

/// `POST …/auth/login`: a session and its first token pair. 401, with one body for
/// every reason (unknown email, wrong password, disabled user, no password).
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/auth/login", operation_id = "login", tag = "auth",
    params(("tenant_id" = Uuid, Path, description = "The tenant")),
    request_body = LoginInput,
    responses((status = 200, description = "Signed in", body = TokenPair),
        (status = 401, description = "The email or password is wrong, or the user cannot sign in", body = super::problem::Problem, content_type = "application/problem+json"),
        RateLimited, BodyProblems, Unavailable))]
async fn login(
    State(s): State<AppState>,
    parts: Parts,
    ApiPath(tenant_id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<LoginInput>,
) -> Result<Json<TokenPair>> {
    let client = client(&parts, s.auth.trusted_proxies());
    Ok(Json(s.auth.login(tenant_id, input, &client, &request_id(&parts)).await?))
}

/// `POST …/auth/refresh`: spends the refresh token and answers a new pair. A spent one
/// revokes its whole session (401).
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/auth/refresh", operation_id = "refresh", tag = "auth",
    params(("tenant_id" = Uuid, Path, description = "The tenant")),
    request_body = RefreshInput,
    responses((status = 200, description = "A new pair; the presented refresh token is spent", body = TokenPair),
        (status = 401, description = "Unknown, expired or revoked; or spent already (the session is now revoked)", body = super::problem::Problem, content_type = "application/problem+json"),
        BodyProblems, Unavailable))]
async fn refresh(
    State(s): State<AppState>,
    parts: Parts,
    ApiPath(tenant_id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<RefreshInput>,
) -> Result<Json<TokenPair>> {
    Ok(Json(s.auth.refresh(tenant_id, &input.refresh_token, &request_id(&parts)).await?))
}

/// `PUT …/users/{user_id}/password`: sets the user's password (tenant `writer` key, or
/// the user's own access token with `current_password`). Revokes the user's other
/// sessions (all of them, with a key).
#[utoipa::path(put, path = "/v1/tenants/{tenant_id}/users/{user_id}/password", operation_id = "setPassword", tag = "auth", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("user_id" = Uuid, Path, description = "The user")),
    request_body = PasswordChange,
    responses((status = 204, description = "Set; the other sessions are revoked"),
        RateLimited, AuthProblems, BodyProblems, NotFound, Unavailable))]
async fn set_password(
    State(s): State<AppState>,
    mut parts: Parts,
    ApiPath((tenant_id, user_id)): ApiPath<(Uuid, Uuid)>,
    ApiJson(change): ApiJson<PasswordChange>,
) -> Result<StatusCode> {
    let (ctx, claims) = user_or_key(&s, &mut parts, tenant_id, user_id, Role::Writer).await?;
    let client = client(&parts, s.auth.trusted_proxies());
    s.auth.change_password(tenant_id, user_id, change, claims.as_ref(), &client, &ctx).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST …/users/{user_id}/verification`: emails the user a 6-digit code (valid 15
/// minutes, 5 tries), replacing an earlier one (tenant `writer` key, or the user's own
/// access token).
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/users/{user_id}/verification", operation_id = "startVerification", tag = "auth", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("user_id" = Uuid, Path, description = "The user")),
    responses((status = 202, description = "The code is on its way", body = CodeSent),
        (status = 409, description = "The email is verified already", body = super::problem::Problem, content_type = "application/problem+json"),
        RateLimited, AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn start_verification(
    State(s): State<AppState>,
    mut parts: Parts,
    ApiPath((tenant_id, user_id)): ApiPath<(Uuid, Uuid)>,
) -> Result<Response> {
    user_or_key(&s, &mut parts, tenant_id, user_id, Role::Writer).await?;
    let client = client(&parts, s.auth.trusted_proxies());
    let expires_at = s.auth.start_verification(tenant_id, user_id, &client).await?;
    Ok((StatusCode::ACCEPTED, Json(CodeSent { expires_at })).into_response())
}

/// `POST …/users/{user_id}/verification/confirm`: the emailed code marks the email
/// verified (`user.verified`) and answers the user.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/users/{user_id}/verification/confirm", operation_id = "confirmVerification", tag = "auth", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("user_id" = Uuid, Path, description = "The user")),
    request_body = CodeInput,
    responses((status = 200, description = "Verified", body = User),
        RateLimited, AuthProblems, BodyProblems, NotFound, Unavailable))]
async fn confirm_verification(
    State(s): State<AppState>,
    mut parts: Parts,
    ApiPath((tenant_id, user_id)): ApiPath<(Uuid, Uuid)>,
    ApiJson(input): ApiJson<CodeInput>,
) -> Result<Json<User>> {
    let (ctx, _) = user_or_key(&s, &mut parts, tenant_id, user_id, Role::Writer).await?;
    let client = client(&parts, s.auth.trusted_proxies());
    Ok(Json(s.auth.confirm_verification(tenant_id, user_id, &input.code, &client, &ctx).await?))
}

/// `POST …/auth/password-reset`: always 202, whether the email exists or not; an
/// active user with that email gets a code by email.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/auth/password-reset", operation_id = "requestPasswordReset", tag = "auth",
    params(("tenant_id" = Uuid, Path, description = "The tenant")),
    request_body = ResetRequest,
    responses((status = 202, description = "Accepted (nothing tells whether the email exists)"),
        RateLimited, BodyProblems, Unavailable))]
async fn request_reset(
    State(s): State<AppState>,
    parts: Parts,
    ApiPath(tenant_id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<ResetRequest>,
) -> Result<StatusCode> {
    let client = client(&parts, s.auth.trusted_proxies());
    s.auth.request_reset(tenant_id, &input.email, &client).await?;
    Ok(StatusCode::ACCEPTED)
}

/// `POST …/auth/password-reset/confirm`: the emailed code sets the new password and
/// revokes every session of the user (`user.password_changed`).
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/auth/password-reset/confirm", operation_id = "confirmPasswordReset", tag = "auth",
    params(("tenant_id" = Uuid, Path, description = "The tenant")),
    request_body = ResetConfirm,
    responses((status = 204, description = "The password is set; every session is revoked"),
        RateLimited, BodyProblems, Unavailable))]
async fn confirm_reset(
    State(s): State<AppState>,
    parts: Parts,
    ApiPath(tenant_id): ApiPath<Uuid>,
    ApiJson(input): ApiJson<ResetConfirm>,
) -> Result<StatusCode> {
    let client = client(&parts, s.auth.trusted_proxies());
    s.auth.confirm_reset(tenant_id, &input.email, &input.code, &input.password, &client, &request_id(&parts)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST …/auth/logout`: revokes the access token's session.
#[utoipa::path(post, path = "/v1/tenants/{tenant_id}/auth/logout", operation_id = "logout", tag = "auth", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant")),
    responses((status = 204, description = "The session is revoked: its tokens are refused from now on"), AuthProblems, QueryProblems, Unavailable))]
async fn logout(State(s): State<AppState>, parts: Parts, ApiPath(tenant_id): ApiPath<Uuid>) -> Result<StatusCode> {
    let claims = user(&s, &parts, tenant_id).await?;
    let ctx = EventContext { correlation_id: request_id(&parts), actor: Actor::User { id: claims.sub } };
    s.auth.revoke(tenant_id, claims.sid, Some(claims.sub), "logout", &ctx).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET …/me`: the signed-in user.
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/me", operation_id = "me", tag = "auth", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant")),
    responses((status = 200, description = "The user of the access token", body = User), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn me(State(s): State<AppState>, parts: Parts, ApiPath(tenant_id): ApiPath<Uuid>) -> Result<Json<User>> {
    let claims = user(&s, &parts, tenant_id).await?;
    Ok(Json(s.auth.me(&claims).await?))
}

/// `GET …/users/{user_id}/sessions`: the user's active sessions, newest first (tenant
/// `admin` key, or the user's own access token).
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/users/{user_id}/sessions", operation_id = "listSessions", tag = "auth", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("user_id" = Uuid, Path, description = "The user")),
    responses((status = 200, description = "Active sessions", body = Vec<Session>), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn sessions(
    State(s): State<AppState>,
    mut parts: Parts,
    ApiPath((tenant_id, user_id)): ApiPath<(Uuid, Uuid)>,
) -> Result<Json<Vec<Session>>> {
    user_or_key(&s, &mut parts, tenant_id, user_id, Role::Admin).await?;
    Ok(Json(s.auth.sessions(tenant_id, user_id).await?))
}

/// `DELETE …/users/{user_id}/sessions/{session_id}`: revokes one session; its access
/// tokens are refused at once, its refresh token too.
#[utoipa::path(delete, path = "/v1/tenants/{tenant_id}/users/{user_id}/sessions/{session_id}", operation_id = "revokeSession", tag = "auth", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), ("user_id" = Uuid, Path, description = "The user"), ("session_id" = Uuid, Path, description = "The session")),
    responses((status = 204, description = "Revoked"), AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn revoke_session(
    State(s): State<AppState>,
    mut parts: Parts,
    ApiPath((tenant_id, user_id, session_id)): ApiPath<(Uuid, Uuid, Uuid)>,
) -> Result<StatusCode> {
    let (ctx, _) = user_or_key(&s, &mut parts, tenant_id, user_id, Role::Admin).await?;
    s.auth.revoke(tenant_id, session_id, Some(user_id), "revoked", &ctx).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /.well-known/jwks.json`: the public keys that verify access tokens.
#[utoipa::path(get, path = "/.well-known/jwks.json", operation_id = "jwks", tag = "auth",
    responses((status = 200, description = "The JWKS (Ed25519 `OKP` keys, `alg: EdDSA`)", body = Jwks), Unavailable))]
async fn jwks(State(s): State<AppState>) -> Result<Response> {
    let keys = s.auth.jwks().await?;
    Ok(([(header::CACHE_CONTROL, "public, max-age=60")], Json(keys)).into_response())
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Rotated {
    /// The new signing key's id.
    pub kid: String,
}

/// `POST /v1/admin/signing-keys/rotate`: a new signing key (platform admin); the old
/// ones verify until their tokens expired.
#[utoipa::path(post, path = "/v1/admin/signing-keys/rotate", operation_id = "rotateSigningKeys", tag = "auth", security(("bearer" = [])),
    responses((status = 200, description = "The new key signs from now on", body = Rotated), AuthProblems, Unavailable))]
async fn rotate(State(s): State<AppState>, caller: Caller) -> Result<Json<Rotated>> {
    caller.principal.require_platform_admin()?;
    Ok(Json(Rotated { kid: s.auth.rotate_keys().await? }))
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
        .routes(routes!(set_password))
        .routes(routes!(start_verification))
        .routes(routes!(confirm_verification))
        .routes(routes!(request_reset))
        .routes(routes!(confirm_reset))
        .routes(routes!(me))
        .routes(routes!(sessions))
        .routes(routes!(revoke_session))
        .routes(routes!(jwks))
        .routes(routes!(rotate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_ip_is_the_peer_unless_a_trusted_proxy_forwarded_it() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let req = |xff: &str| {
            let (parts, ()) =
                axum::http::Request::builder().header("x-forwarded-for", xff).body(()).unwrap().into_parts();
            parts
        };
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        // An untrusted peer's header is ignored.
        assert_eq!(client_ip(stranger, &req("198.51.100.1"), &trusted), stranger);
        // Behind the proxy: the right-most address it did not add itself.
        assert_eq!(
            client_ip(proxy, &req("1.1.1.1, 198.51.100.1, 10.9.9.9"), &trusted),
            "198.51.100.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(proxy, &req("garbage"), &trusted), proxy);
    }
}
