//! `GET /v1/tenants/{tenant_id}/users/search?q=&limit=&cursor=`: users of the tenant
//! whose name or email words start with every word of `q`, best first (reader).
//!
//! The index answers which users match; the users themselves are read from the database
//! of record, so a hit always shows the current user (and a user deleted since the last
//! index update is left out).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::extract::{ApiPath, ApiQuery, Caller};
use super::openapi::{AuthProblems, NotFound, QueryProblems, Unavailable};
use super::AppState;
use crate::domain::{Role, ValidationErrors};
use crate::error::{Error, Result};

const DEFAULT_LIMIT: u32 = 20;
const MAX_LIMIT: u32 = 100;
/// How deep paging goes (OpenSearch's default `index.max_result_window`).
const MAX_DEPTH: u32 = 10_000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SearchQuery {
    /// Words that must each start a word of the user's name or email (required).
    #[param(required = true, min_length = 1, max_length = 200, pattern = r"\S")]
    q: Option<String>,
    /// Users per page, 1-100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// `GET /v1/tenants/{tenant_id}/users/search?q=`: users whose name or email words
/// start with every word of `q`, best first (reader).
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/users/search", operation_id = "searchUsers", tag = "users", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), SearchQuery),
    responses((status = 200, description = "A page of users, best first", body = crate::domain::Page<crate::domain::User>),
        AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn search_users(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(tenant_id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<SearchQuery>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Reader)?;
    let mut errors = ValidationErrors::new();
    let q = query.q.unwrap_or_default();
    if q.trim().is_empty() {
        errors.add("q", "is required: the words to search names and emails for");
    } else if q.chars().count() > 200 {
        errors.add("q", "must be at most 200 characters");
    }
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        errors.add("limit", format!("must be between 1 and {MAX_LIMIT}"));
    }
    let offset = match query.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => 0,
        Some(c) => c.parse::<u32>().unwrap_or_else(|_| {
            errors.add("cursor", "is not a cursor this API issued; use next_cursor from the previous page");
            0
        }),
    };
    if offset.saturating_add(limit) > MAX_DEPTH {
        errors.add("cursor", format!("results past the first {MAX_DEPTH} cannot be paged to; narrow the query"));
    }
    errors.into_result(())?;
    // A tenant that does not exist (for the platform admin) is a 404, not an empty list.
    s.tenants.get_tenant(tenant_id).await?;
    let hits =
        s.search.search_users(tenant_id, &q, offset, limit).await.map_err(|e| Error::Unavailable(e.to_string()))?;
    let ids: Vec<Uuid> = hits.items.iter().map(|hit| hit.user_id).collect();
    let items = s.tenants.get_users(tenant_id, &ids).await?;
    let next = hits.next_offset.map(|o| o.to_string());
    Ok(Json(json!({ "items": items, "next_cursor": next })).into_response())
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(search_users))
}
