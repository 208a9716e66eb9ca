//! `/debug/actors`: the live supervision tree (JSON, or HTML for browsers), and the
//! chaos endpoint that kills an actor the way a crash would.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{ApiPath, Principal};
use super::AppState;
use crate::error::{Error, Result};
use crate::supervision::{ActorNode, Status};

/// `GET /debug/actors` (platform admin): the tree in the SPEC's node shape.
#[utoipa::path(get, path = "/debug/actors", operation_id = "actorTree", tag = "operations", security(("bearer" = [])),
    responses((status = 200, description = "The supervision tree: nodes `{name, kind, strategy?, status, restarts, last_failure, started_at, mailbox?, stats?, children}`; an HTML page for `Accept: text/html`",
        content((serde_json::Value = "application/json"), (String = "text/html"))),
        super::openapi::AuthProblems, super::openapi::Unavailable))]
async fn tree(State(s): State<AppState>, principal: Principal, headers: HeaderMap) -> Result<Response> {
    principal.require_platform_admin()?;
    let root = s.tree.snapshot().ok_or_else(|| Error::Unavailable("the supervision tree is not running".into()))?;
    let wants_html = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/html"));
    if wants_html {
        Ok(Html(render_page(&root)).into_response())
    } else {
        Ok(Json(root).into_response())
    }
}

/// `POST /debug/actors/{name}/kill` (platform admin, `EVENTRA_CHAOS=1`): kills the actor
/// at once, mid-message if need be; its supervisor sees an abnormal exit (`killed`).
#[utoipa::path(post, path = "/debug/actors/{name}/kill", operation_id = "killActor", tag = "operations", security(("bearer" = [])),
    params(("name" = String, Path, description = "The actor's name in the tree")),
    responses((status = 202, description = "`{killed: name}`", body = serde_json::Value),
        (status = 409, description = "The root cannot be killed", body = super::problem::Problem, content_type = "application/problem+json"),
        super::openapi::AuthProblems, super::openapi::QueryProblems, super::openapi::NotFound))]
async fn kill(State(s): State<AppState>, principal: Principal, ApiPath(name): ApiPath<String>) -> Result<Response> {
    principal.require_platform_admin()?;
    if !s.chaos {
        return Err(Error::Forbidden("the kill endpoint is disabled; start the service with EVENTRA_CHAOS=1".into()));
    }
    if s.tree.snapshot().is_some_and(|root| root.name == name) {
        return Err(Error::Conflict("the root cannot be killed through the API; stop the process instead".into()));
    }
    let cell = s.tree.cell(&name).ok_or(Error::NotFound("running actor"))?;
    tracing::warn!(actor = %name, "chaos: killing actor");
    metrics::counter!("eventra_chaos_kills_total").increment(1);
    cell.kill();
    Ok((StatusCode::ACCEPTED, Json(json!({ "killed": name }))).into_response())
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(tree)).routes(routes!(kill))
}

fn render_page(root: &ActorNode) -> String {
    let mut body = String::new();
    render_node(root, &mut body);
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Eventra actors</title><style>\
         body{{font:14px system-ui,sans-serif;margin:2em}}ul{{list-style:none;border-left:1px solid #ccc;padding-left:1.2em}}\
         .running{{color:#176e2c}}.restarting{{color:#a66a00}}.failed{{color:#b00020}}.stopped{{color:#666}}\
         .meta{{color:#555;font-size:12px}}</style></head><body><h1>Supervision tree</h1><ul>{body}</ul></body></html>"
    )
}

fn render_node(n: &ActorNode, out: &mut String) {
    let status = match n.status {
        Status::Running => "running",
        Status::Restarting => "restarting",
        Status::Stopped => "stopped",
        Status::Failed => "failed",
    };
    let kind = match n.kind {
        crate::supervision::ChildKind::Supervisor => "supervisor",
        crate::supervision::ChildKind::Worker => "worker",
    };
    out.push_str(&format!(
        "<li><b>{}</b> <span class=\"{status}\">{status}</span> <span class=\"meta\">{kind}",
        escape(&n.name)
    ));
    if let Some(s) = n.strategy {
        out.push_str(&format!(", {}", s.as_str()));
    }
    out.push_str(&format!(", restarts {}", n.restarts));
    if let Some(m) = n.mailbox {
        out.push_str(&format!(", mailbox {m}"));
    }
    if let Some(stats) = &n.stats {
        out.push_str(&format!(", {}", escape(&stats.to_string())));
    }
    if let Some(t) = n.started_at {
        out.push_str(&format!(", started {}", t.to_rfc3339()));
    }
    if let Some(f) = &n.last_failure {
        out.push_str(&format!(", last failure: {}", escape(f)));
    }
    out.push_str("</span>");
    if !n.children.is_empty() {
        out.push_str("<ul>");
        for c in &n.children {
            render_node(c, out);
        }
        out.push_str("</ul>");
    }
    out.push_str("</li>");
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
