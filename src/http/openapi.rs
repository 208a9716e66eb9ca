//! `GET /openapi.json` and `GET /docs`: the API's OpenAPI 3.1 description, generated
//! from the handlers (each resource's router is a `utoipa_axum::OpenApiRouter` whose
//! routes come from `#[utoipa::path]` annotations, so a route cannot exist without its
//! description), and Swagger UI over it, served from the binary.
//!
//! The problem responses are shared here: every error is `application/problem+json`
//! with the [`Problem`] schema.

use std::collections::BTreeMap;

use axum::Router;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::problem::Problem;
use super::AppState;

/// The document's fixed parts; the paths come from the routers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Eventra",
        description = "Event-driven, multi-tenant user management. Every change is a domain event \
            (CloudEvents 1.0) written to a transactional outbox in the same transaction, and flows \
            to email, audit log, search and webhooks. Errors are RFC 9457 problem details.",
        license(name = "MIT OR Apache-2.0"),
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "tenants", description = "Tenants and their API keys (platform admin)"),
        (name = "users", description = "A tenant's users"),
        (name = "audit", description = "A tenant's audit log"),
        (name = "auth", description = "End-user sign-in: passwords, access tokens (JWT, EdDSA; verify with `/.well-known/jwks.json`), rotating refresh tokens, sessions"),
        (name = "webhooks", description = "A tenant's webhook endpoints and their delivery log (tenant admin)"),
        (name = "jobs", description = "The job system, as operators see it (platform admin)"),
        (name = "pipeline", description = "The event bus's dead-letter queue (platform admin)"),
        (name = "operations", description = "Health, metrics and the supervision tree"),
    ),
    components(schemas(Problem))
)]
pub struct ApiDoc;

/// `Authorization: Bearer <token>`: the platform admin token, a tenant API key, or (on
/// the `auth` routes that say so) a user's access token.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The platform admin token (`EVENTRA_ADMIN_TOKEN`) or a tenant API key (`evk_…`)"))
                    .build(),
            ),
        );
    }
}

/// One problem+json response.
fn problem(description: &str) -> RefOr<utoipa::openapi::Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            super::problem::PROBLEM_JSON,
            ContentBuilder::new().schema(Some(utoipa::openapi::Ref::from_schema_name("Problem"))).build(),
        )
        .into()
}

/// Declares a set of problem responses usable in `responses(...)`.
macro_rules! problems {
    ($(#[$doc:meta])* $name:ident: $($status:literal => $desc:literal),+ $(,)?) => {
        $(#[$doc])*
        pub struct $name;
        impl utoipa::IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
                BTreeMap::from([$(($status.to_string(), problem($desc))),+])
            }
        }
    };
}

problems!(
    /// Missing or bad credentials, or a role too low.
    AuthProblems:
    "401" => "Missing or invalid bearer token",
    "403" => "The credentials may not do this (role too low, or platform admin only)",
    "429" => "The API key is over its tenant's `rate_limit_per_second`; retry after `Retry-After`",
);
problems!(
    /// A request whose body is read.
    BodyProblems:
    "400" => "Malformed JSON, path, query or header",
    "413" => "The body is larger than the limit",
    "415" => "The body is not JSON",
    "422" => "Invalid fields (`errors` lists them)",
);
problems!(
    /// A request with a path or query only.
    QueryProblems:
    "400" => "Malformed path or query",
    "422" => "Invalid query parameters (`errors` lists them)",
);
problems!(
    /// The resource does not exist, or belongs to another tenant.
    NotFound:
    "404" => "Not found, or another tenant's",
);
problems!(
    /// Ingestion backpressure (with `Retry-After`).
    Backlog:
    "429" => "The tenant's accepted events not yet processed are past the limit; retry after `Retry-After`",
);
problems!(
    /// Over a rate limit (with `Retry-After`, `RateLimit` and `RateLimit-Policy`).
    RateLimited:
    "429" => "Too many attempts for this email, from this IP, or with this API key; retry after `Retry-After`",
);
problems!(
    /// A dependency is down or the service is shedding load (with `Retry-After`).
    Unavailable:
    "503" => "A dependency is down or restarting, or effects are behind (load shedding); retry after `Retry-After`",
);

/// The whole document: the fixed parts merged with the routers' paths.
pub fn document(paths: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(paths);
    doc
}

/// `GET /openapi.json` and `GET /docs` (Swagger UI, its assets embedded in the binary:
/// nothing is loaded from another host, and the online validator is off).
pub fn router(doc: utoipa::openapi::OpenApi) -> Router<AppState> {
    let config = utoipa_swagger_ui::Config::new(["/openapi.json"]).validator_url("none").try_it_out_enabled(true);
    utoipa_swagger_ui::SwaggerUi::new("/docs").url("/openapi.json", doc).config(config).into()
}
