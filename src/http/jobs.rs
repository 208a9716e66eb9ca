//! `/v1/admin/jobs`: the job system as an operator sees it (Sidekiq's web UI as an
//! API): queues with size and latency; the scheduled, retry, dead and running sets,
//! paged with a substring filter; and actions on one job or a whole set.
//!
//! | method & path | what |
//! |---|---|
//! | `GET /v1/admin/jobs` | counts per state and the queues |
//! | `GET /v1/admin/jobs/queues` | every queue: `name`, `size`, `latency_ms` |
//! | `GET /v1/admin/jobs/queues/{name}?q=&cursor=&limit=` | a queue's ready jobs, next first |
//! | `DELETE /v1/admin/jobs/queues/{name}` | clears a queue |
//! | `GET /v1/admin/jobs/{scheduled,retries,dead,running}?q=&cursor=&limit=` | a set, paged |
//! | `POST /v1/admin/jobs/{retries,dead,scheduled}/retry` | retry the whole set now |
//! | `DELETE /v1/admin/jobs/{retries,dead,scheduled}` | delete the whole set |
//! | `GET /v1/admin/jobs/{id}` | one job |
//! | `POST /v1/admin/jobs/{id}/retry` | run it now |
//! | `POST /v1/admin/jobs/{id}/kill` | move it to the dead set |
//! | `POST /v1/admin/jobs/{retries,scheduled}/kill` | move the whole set to the dead set |
//! | `DELETE /v1/admin/jobs/{id}` | delete it |

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::extract::{ApiPath, ApiQuery, Principal};
use super::openapi::{AuthProblems, NotFound, QueryProblems, Unavailable};
use super::AppState;
use crate::domain::ValidationErrors;
use crate::error::{Error, Result};
use crate::jobs::{Acted, Job, JobError, JobSet, JobState};

const DEFAULT_LIMIT: u32 = 25;
const MAX_LIMIT: u32 = 200;

impl From<JobError> for Error {
    fn from(e: JobError) -> Self {
        match e {
            JobError::NotLeased(id) => Error::Conflict(format!("job {id} is held by another worker")),
            JobError::Backend(msg) => Error::Unavailable(format!("job queue: {msg}")),
        }
    }
}

/// `?q=&cursor=&limit=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SetQuery {
    /// Case-insensitive substring of the job's id, kind, key, args or last error.
    q: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Jobs per page, 1-200 (default 25).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
}

impl SetQuery {
    fn parse(&self) -> Result<(Option<&str>, u64, u32)> {
        let mut errors = ValidationErrors::new();
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            errors.add("limit", format!("must be between 1 and {MAX_LIMIT}"));
        }
        let offset = match self.cursor.as_deref().filter(|c| !c.is_empty()) {
            None => 0,
            Some(c) => c.parse::<u64>().unwrap_or_else(|_| {
                errors.add("cursor", "is not a cursor this API issued; use next_cursor from the previous page");
                0
            }),
        };
        if self.q.as_ref().is_some_and(|q| q.chars().count() > 200) {
            errors.add("q", "must be at most 200 characters");
        }
        Ok(errors.into_result((self.q.as_deref(), offset, limit))?)
    }
}

/// A queue name as queues are named: 1-64 of `a-z 0-9 _ -`.
fn queue_name(name: String) -> Result<JobSet> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !ok {
        return Err(Error::BadRequest(format!("'{name}' is not a queue name (1-64 characters of a-z, 0-9, '_', '-')")));
    }
    Ok(JobSet::Queue(name))
}

/// A set by its URL name.
fn named_set(name: &str) -> Option<JobSet> {
    match name {
        "scheduled" => Some(JobSet::Scheduled),
        "retries" => Some(JobSet::Retry),
        "dead" => Some(JobSet::Dead),
        "running" => Some(JobSet::Running),
        _ => None,
    }
}

/// A path segment is a set name or a job id.
enum Ref {
    Set(JobSet),
    Job(Uuid),
}

fn parse_ref(segment: &str) -> Result<Ref> {
    if let Some(set) = named_set(segment) {
        return Ok(Ref::Set(set));
    }
    segment.parse::<Uuid>().map(Ref::Job).map_err(|_| {
        Error::BadRequest(format!(
            "'{segment}' is neither a job set (scheduled, retries, dead, running) nor a job id (UUID)"
        ))
    })
}

fn job_json(job: &Job) -> Value {
    let mut v = json!(job);
    if let Some(o) = v.as_object_mut() {
        o.remove("lease");
        o.insert("attempts".into(), json!(job.failures));
    }
    v
}

async fn page(s: &AppState, set: &JobSet, q: &SetQuery) -> Result<Response> {
    let (filter, offset, limit) = q.parse()?;
    let list = s.jobs.queue.list(set, filter, offset, limit).await?;
    let items: Vec<Value> = list.items.iter().map(job_json).collect();
    Ok(Json(json!({ "items": items, "next_cursor": list.next_offset.map(|o| o.to_string()) })).into_response())
}

fn queue_json(q: &crate::jobs::QueueStats) -> Value {
    json!({ "name": q.name, "size": q.size, "latency_ms": q.latency.as_millis() as u64 })
}

/// `GET /v1/admin/jobs`: job counts per state and the queues.
#[utoipa::path(get, path = "/v1/admin/jobs", operation_id = "jobsSummary", tag = "jobs", security(("bearer" = [])),
    responses((status = 200, description = "`{backend, counts: {ready, scheduled, running, retry, dead, done}, queues: [{name, size, latency_ms}]}`", body = serde_json::Value),
        AuthProblems, Unavailable))]
async fn summary(State(s): State<AppState>, principal: Principal) -> Result<Response> {
    principal.require_platform_admin()?;
    let mut counts = serde_json::Map::new();
    for state in
        [JobState::Ready, JobState::Scheduled, JobState::Running, JobState::Retry, JobState::Dead, JobState::Done]
    {
        counts.insert(state.as_str().into(), json!(s.jobs.queue.count(state).await?));
    }
    let queues: Vec<Value> = s.jobs.queue.queues().await?.iter().map(queue_json).collect();
    Ok(Json(json!({ "backend": s.jobs.queue.backend(), "counts": counts, "queues": queues })).into_response())
}

/// `GET /v1/admin/jobs/queues`: every queue with its size and latency.
#[utoipa::path(get, path = "/v1/admin/jobs/queues", operation_id = "listQueues", tag = "jobs", security(("bearer" = [])),
    responses((status = 200, description = "`{items: [{name, size, latency_ms}], next_cursor: null}`", body = serde_json::Value),
        AuthProblems, Unavailable))]
async fn queues(State(s): State<AppState>, principal: Principal) -> Result<Response> {
    principal.require_platform_admin()?;
    let items: Vec<Value> = s.jobs.queue.queues().await?.iter().map(queue_json).collect();
    Ok(Json(json!({ "items": items, "next_cursor": null })).into_response())
}

/// `GET /v1/admin/jobs/queues/{name}`: a queue's ready jobs, next first.
#[utoipa::path(get, path = "/v1/admin/jobs/queues/{name}", operation_id = "listQueueJobs", tag = "jobs", security(("bearer" = [])),
    params(("name" = String, Path, pattern = r"^[a-z0-9_-]{1,64}$", description = "The queue (`default`)"), SetQuery),
    responses((status = 200, description = "`{items: [job], next_cursor}`", body = serde_json::Value),
        AuthProblems, QueryProblems, Unavailable))]
async fn queue_jobs(
    State(s): State<AppState>,
    principal: Principal,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<SetQuery>,
) -> Result<Response> {
    principal.require_platform_admin()?;
    page(&s, &queue_name(name)?, &q).await
}

/// `DELETE /v1/admin/jobs/queues/{name}`: deletes every ready job of a queue.
#[utoipa::path(delete, path = "/v1/admin/jobs/queues/{name}", operation_id = "clearQueue", tag = "jobs", security(("bearer" = [])),
    params(("name" = String, Path, pattern = r"^[a-z0-9_-]{1,64}$", description = "The queue")),
    responses((status = 200, description = "`{deleted: n}`", body = serde_json::Value), AuthProblems, QueryProblems, Unavailable))]
async fn clear_queue(
    State(s): State<AppState>,
    principal: Principal,
    ApiPath(name): ApiPath<String>,
) -> Result<Response> {
    principal.require_platform_admin()?;
    let n = s.jobs.queue.delete_all(&queue_name(name.clone())?).await?;
    tracing::warn!(queue = %name, deleted = n, "operator cleared a job queue");
    Ok(Json(json!({ "deleted": n })).into_response())
}

/// `GET /v1/admin/jobs/{set or id}`: a set (`scheduled`, `retries`, `dead`, `running`),
/// paged and filtered, or one job by id.
#[utoipa::path(get, path = "/v1/admin/jobs/{segment}", operation_id = "getJobOrSet", tag = "jobs", security(("bearer" = [])),
    params(("segment" = String, Path, pattern = r"^(scheduled|retries|dead|running|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$", description = "`scheduled`, `retries`, `dead`, `running`, or a job id"), SetQuery),
    responses((status = 200, description = "A set: `{items: [job], next_cursor}`; a job: `{id, kind, queue, args, state, attempts, …}`", body = serde_json::Value),
        AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn show(
    State(s): State<AppState>,
    principal: Principal,
    ApiPath(segment): ApiPath<String>,
    ApiQuery(q): ApiQuery<SetQuery>,
) -> Result<Response> {
    principal.require_platform_admin()?;
    match parse_ref(&segment)? {
        Ref::Set(set) => page(&s, &set, &q).await,
        Ref::Job(id) => {
            let job = s.jobs.queue.get(id).await?.ok_or(Error::NotFound("job"))?;
            Ok(Json(job_json(&job)).into_response())
        }
    }
}

fn acted(id: Uuid, what: &str, outcome: Acted) -> Result<Response> {
    match outcome {
        Acted::Done => {
            tracing::info!(job_id = %id, action = what, "operator action on a job");
            Ok(Json(json!({ "id": id, "action": what })).into_response())
        }
        Acted::NotFound => Err(Error::NotFound("job")),
        Acted::Refused(state) => Err(Error::Conflict(format!("job {id} is {}; it cannot be {what}", state.as_str()))),
    }
}

/// `DELETE /v1/admin/jobs/{set or id}`: deletes a whole set, or one job.
#[utoipa::path(delete, path = "/v1/admin/jobs/{segment}", operation_id = "deleteJobOrSet", tag = "jobs", security(("bearer" = [])),
    params(("segment" = String, Path, pattern = r"^(scheduled|retries|dead|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$", description = "`scheduled`, `retries`, `dead`, or a job id")),
    responses((status = 200, description = "`{deleted: n}`, or `{id, action}`", body = serde_json::Value), (status = 409, description = "Not possible in the job's state (running, done)", body = super::problem::Problem, content_type = "application/problem+json"),
        AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn remove(
    State(s): State<AppState>,
    principal: Principal,
    ApiPath(segment): ApiPath<String>,
) -> Result<Response> {
    principal.require_platform_admin()?;
    match parse_ref(&segment)? {
        Ref::Set(JobSet::Running) => {
            Err(Error::Conflict("running jobs cannot be deleted; they finish or are reaped".into()))
        }
        Ref::Set(set) => {
            let n = s.jobs.queue.delete_all(&set).await?;
            tracing::warn!(set = %segment, deleted = n, "operator deleted a job set");
            Ok(Json(json!({ "deleted": n })).into_response())
        }
        Ref::Job(id) => acted(id, "deleted", s.jobs.queue.delete(id).await?),
    }
}

/// `POST /v1/admin/jobs/{set or id}/retry`: runs a whole set, or one job, now.
#[utoipa::path(post, path = "/v1/admin/jobs/{segment}/retry", operation_id = "retryJobOrSet", tag = "jobs", security(("bearer" = [])),
    params(("segment" = String, Path, pattern = r"^(scheduled|retries|dead|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$", description = "`scheduled`, `retries`, `dead`, or a job id")),
    responses((status = 200, description = "`{retried: n}`, or `{id, action}`", body = serde_json::Value), (status = 409, description = "Not possible in the job's state (running, done)", body = super::problem::Problem, content_type = "application/problem+json"),
        AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn retry(State(s): State<AppState>, principal: Principal, ApiPath(segment): ApiPath<String>) -> Result<Response> {
    principal.require_platform_admin()?;
    match parse_ref(&segment)? {
        Ref::Set(JobSet::Running) => Err(Error::Conflict("running jobs are already running".into())),
        Ref::Set(set) => {
            let n = s.jobs.queue.retry_all(&set).await?;
            s.jobs.wake_all();
            tracing::info!(set = %segment, retried = n, "operator retried a job set");
            Ok(Json(json!({ "retried": n })).into_response())
        }
        Ref::Job(id) => {
            let outcome = s.jobs.queue.retry_now(id).await?;
            s.jobs.wake_all();
            acted(id, "retried", outcome)
        }
    }
}

/// `POST /v1/admin/jobs/{set or id}/kill`: moves a job, or every job of the scheduled
/// or retry set, to the dead set.
#[utoipa::path(post, path = "/v1/admin/jobs/{segment}/kill", operation_id = "killJobOrSet", tag = "jobs", security(("bearer" = [])),
    params(("segment" = String, Path, pattern = r"^(scheduled|retries|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$", description = "`scheduled`, `retries`, or a job id")),
    responses((status = 200, description = "`{killed: n}`, or `{id, action: \"killed\"}`", body = serde_json::Value), (status = 409, description = "Not possible in the job's state (running, done), or for that set (dead, running)", body = super::problem::Problem, content_type = "application/problem+json"),
        AuthProblems, QueryProblems, NotFound, Unavailable))]
async fn kill(State(s): State<AppState>, principal: Principal, ApiPath(segment): ApiPath<String>) -> Result<Response> {
    principal.require_platform_admin()?;
    match parse_ref(&segment)? {
        Ref::Set(set @ (JobSet::Scheduled | JobSet::Retry)) => {
            let n = s.jobs.queue.kill_all(&set).await?;
            tracing::warn!(set = %segment, killed = n, "operator killed a job set");
            Ok(Json(json!({ "killed": n })).into_response())
        }
        Ref::Set(_) => Err(Error::Conflict(format!("the {segment} set cannot be killed; kill scheduled or retries"))),
        Ref::Job(id) => acted(id, "killed", s.jobs.queue.kill(id).await?),
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(summary))
        .routes(routes!(queues))
        .routes(routes!(queue_jobs, clear_queue))
        .routes(routes!(show, remove))
        .routes(routes!(retry))
        .routes(routes!(kill))
}
