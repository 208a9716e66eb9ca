//! `GET /v1/tenants/{tenant_id}/audit?q=&type=&from=&to=&limit=&cursor=`: the tenant's
//! audit log (one entry per domain event: who, what, when, before/after), oldest first,
//! filtered by event type and time range (`from` inclusive, `to` exclusive, RFC 3339).
//! Tenant `admin` keys and the platform admin.
//!
//! Without `q` the database of record answers (every recorded entry, at once). With `q`
//! the search index does: every word of `q` must prefix a word of the entry (its type,
//! subject, actor and before/after values), as in user search.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::extract::{ApiPath, ApiQuery, Caller};
use super::openapi::{AuthProblems, NotFound, QueryProblems, Unavailable};
use super::AppState;
use crate::domain::{EventType, PageRequest, Role, ValidationErrors};
use crate::error::{Error, Result};
use crate::store::AuditFilter;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Words that must each start a word of the entry (searched in the index).
    q: Option<String>,
    /// An event type, exactly (`user.updated`).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    event_type: Option<String>,
    /// Entries at or after this time (RFC 3339).
    #[param(format = DateTime)]
    from: Option<String>,
    /// Entries before this time (RFC 3339).
    #[param(format = DateTime)]
    to: Option<String>,
    /// Entries per page, 1-200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

fn time(errors: &mut ValidationErrors, field: &str, value: Option<&str>) -> Option<DateTime<Utc>> {
    super::extract::query_time(field, value).unwrap_or_else(|e| {
        errors.errors.extend(e.errors);
        None
    })
}

/// `GET /v1/tenants/{tenant_id}/audit`: the audit log, oldest first (tenant admin).
#[utoipa::path(get, path = "/v1/tenants/{tenant_id}/audit", operation_id = "listAudit", tag = "audit", security(("bearer" = [])),
    params(("tenant_id" = Uuid, Path, description = "The tenant"), AuditQuery),
    responses((status = 200, description = "A page of audit entries", body = crate::domain::Page<crate::domain::AuditEntry>),
        AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn list(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(tenant_id): ApiPath<Uuid>,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Response> {
    caller.principal.require_tenant(tenant_id, Role::Admin)?;
    let mut errors = ValidationErrors::new();
    let page = match PageRequest::parse(query.limit, query.cursor.as_deref()) {
        Ok(p) => Some(p),
        Err(e) => {
            errors.errors.extend(e.errors);
            None
        }
    };
    if let Some(t) = query.event_type.as_deref().filter(|t| EventType::parse_any(t).is_none()) {
        let known: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        errors.add(
            "type",
            format!("unknown event type {t:?}; one of {}, or one of the tenant's own types", known.join(", ")),
        );
    }
    let from = time(&mut errors, "from", query.from.as_deref());
    let to = time(&mut errors, "to", query.to.as_deref());
    if let (Some(f), Some(t)) = (from, to) {
        if f >= t {
            errors.add("to", "must be after `from`");
        }
    }
    if query.q.as_ref().is_some_and(|q| q.chars().count() > 200) {
        errors.add("q", "must be at most 200 characters");
    }
    let page = errors.into_result(page)?.unwrap_or_else(PageRequest::first);
    s.tenants.get_tenant(tenant_id).await?;
    let q = query.q.filter(|q| !crate::search::words(q).is_empty());
    let searched = q.is_some();
    let filter = AuditFilter { event_type: query.event_type, from, to, text: q };
    let entries = if searched {
        s.search.search_audit(tenant_id, &filter, page).await.map_err(|e| Error::Unavailable(e.to_string()))?
    } else {
        s.tenants.store().list_audit(tenant_id, &filter, page).await?
    };
    Ok(Json(entries).into_response())
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}
