//! The control plane through the API: tasks, their evidence, diff, decisions and audit trail,
//! and what is done to them. A task is named by its id or a unique prefix of it (as on the
//! command line); every change is an event in the task's stream (`/v1/events?stream=ID`).
//!
//! - `POST /v1/tasks` ([`CreateTask`]) → `201` and the task; `GET /v1/tasks?status=S&label=L`
//!   → the tasks, oldest first (as `task list --json`);
//! - `GET /v1/tasks/{id}`: the task (as `task show --json`) with `waiting` (why it is not
//!   claimed), `dependencies` (`{id, title, status}`) and `routing` (why no agent takes it);
//! - `GET /v1/tasks/{id}/evidence` (JSON), `GET /v1/tasks/{id}/diff` (`text/plain`);
//! - `POST /v1/tasks/{id}/cancel`, `/retry` → the task; `/approve` (`{"stage": "claim" |
//!   "merge"}`, by `api`); `/merge` ([`MergedView`]), `/discard` ([`DiscardedView`]);
//! - `GET /v1/tasks/{id}/decisions`: the policy and permission decisions (as
//!   `policy explain --json`); `GET /v1/tasks/{id}/audit`: the trail and its verification.
//!
//! Errors: an unknown id `404`, an ambiguous prefix `400`, an operation the task's status does
//! not allow `409` (`illegal_transition`), a merge of a task that is not done `409`, one the
//! policy refuses `403`; a task that never ran in a worktree has no diff, evidence, merge or
//! discard (`404`).

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use descartes_app::executor::Executor;
use descartes_app::service::Service;
use descartes_app::{Problem, tasks};
use descartes_core::TaskFilter;
use descartes_protocol::{NewTask, Requirements, TaskStatus};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::ApiState;
use crate::drive::{app_error, bad_json, service};
use crate::error::{ApiError, ApiResult, ErrorBody};

/// A new task (the fields of `descartes task create`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTask {
    /// A short title.
    pub title: String,
    /// What to do: the agent's prompt (`DESCARTES_TASK_PROMPT` for a command). Also
    /// accepted as `description`.
    #[serde(default, alias = "description")]
    pub prompt: String,
    /// A type of your own (`bug`, `deploy`, ...); policies can match it.
    #[serde(default, rename = "type")]
    pub kind: String,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub labels: Vec<String>,
    /// Tasks that must be done first (ids or unique prefixes).
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Path globs this task locks while it runs.
    #[serde(default)]
    pub locks: Vec<String>,
    /// Attempts before the task fails for good (3).
    pub max_attempts: Option<u32>,
    /// What an agent must offer to be given the task.
    #[serde(default)]
    pub needs: Needs,
    /// Route only to this registered agent.
    pub agent: Option<String>,
    /// Run in the task's worktree after an agent's attempt; a failure fails the attempt.
    pub test_command: Option<String>,
    /// Choose the id (letters, digits, `-` and `_`); generated when absent.
    pub id: Option<String>,
}

/// What an agent must offer (`--needs-label`, `--needs-capability`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Needs {
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub capabilities: Vec<String>,
}

impl CreateTask {
    /// The task store's request.
    pub fn into_new_task(self) -> NewTask {
        NewTask {
            id: self.id,
            title: self.title,
            prompt: self.prompt,
            kind: self.kind,
            priority: self.priority,
            labels: self.labels,
            depends_on: self.depends_on,
            locks: self.locks,
            max_attempts: self.max_attempts,
            needs: Requirements { labels: self.needs.labels, capabilities: self.needs.capabilities, agent: self.agent },
            test_command: self.test_command,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct TasksQuery {
    /// Only tasks with this status (`queued`, `claimed`, `running`, `blocked`, `done`,
    /// `failed`, `cancelled`).
    status: Option<String>,
    /// Only tasks with this label.
    label: Option<String>,
}

/// An approval (`descartes task approve`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApproveTask {
    /// What is approved: running the task (`claim`, the default) or merging it (`merge`).
    #[serde(default = "claim")]
    pub stage: String,
}

fn claim() -> String {
    "claim".into()
}

impl Default for ApproveTask {
    fn default() -> Self {
        Self { stage: claim() }
    }
}

/// An approval recorded.
#[derive(Debug, Serialize, ToSchema)]
pub struct Approved {
    pub task_id: String,
    pub stage: String,
    /// Who approved (`api`).
    pub by: String,
}

/// A merge made.
#[derive(Debug, Serialize, ToSchema)]
pub struct MergedView {
    pub task_id: String,
    /// The task's branch.
    pub branch: String,
    /// The base branch it was merged into.
    pub into: String,
    /// The base branch's commit now.
    pub commit: String,
    /// `fast_forward`, `merge_commit` or `up_to_date`.
    pub kind: String,
}

/// A worktree and branch removed.
#[derive(Debug, Serialize, ToSchema)]
pub struct DiscardedView {
    pub task_id: String,
    pub branch: String,
    pub path: String,
}

/// The full id of the task `id` names (a full id or a unique prefix).
async fn resolve(s: &Service, id: &str) -> ApiResult<String> {
    tasks::resolve(&*s.stores().tasks, id).await.map_err(|e| app_error(e.into()))
}

async fn executor(s: &Service) -> ApiResult<Executor> {
    Executor::new(s.runtime().clone(), s.stores().clone(), None).await.map_err(app_error)
}

fn task_value(t: &descartes_protocol::Task) -> Value {
    tasks::task_json(t, None)
}

#[utoipa::path(post, path = "/v1/tasks", request_body = CreateTask,
    responses((status = 201, body = Object, description = "The task, as `task create --json`"),
        (status = 400, body = ErrorBody, description = "Malformed JSON, an invalid glob or id, a missing dependency"),
        (status = 422, body = ErrorBody, description = "Unknown fields or wrong types"), (status = 501, body = ErrorBody)))]
pub(crate) async fn create_task(
    State(state): State<ApiState>,
    body: Result<Json<CreateTask>, JsonRejection>,
) -> ApiResult<impl IntoResponse> {
    let Json(body) = body.map_err(bad_json)?;
    let s = service(&state)?;
    let t = tasks::create(&*s.stores().tasks, body.into_new_task()).await.map_err(|e| app_error(e.into()))?;
    tasks::wake_daemon(s.runtime());
    let location = format!("/v1/tasks/{}", t.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(task_value(&t))))
}

#[utoipa::path(get, path = "/v1/tasks", params(TasksQuery),
    responses((status = 200, body = Vec<Object>, description = "The tasks, oldest first, as `task list --json`"),
        (status = 400, body = ErrorBody), (status = 501, body = ErrorBody)))]
pub(crate) async fn list_tasks(
    State(state): State<ApiState>,
    query: Result<Query<TasksQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<Value>>> {
    let Query(q) = query?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(TaskStatus::parse(s).ok_or_else(|| {
            let all = TaskStatus::ALL.map(|t| t.as_str()).join(", ");
            ApiError::new(StatusCode::BAD_REQUEST, "bad_query", format!("unknown status {s:?}; one of: {all}"))
        })?),
    };
    let s = service(&state)?;
    let list =
        s.stores().tasks.list_tasks(&TaskFilter { status, label: q.label }).await.map_err(|e| app_error(e.into()))?;
    Ok(Json(list.iter().map(task_value).collect()))
}

#[utoipa::path(get, path = "/v1/tasks/{id}", params(("id" = String, Path, description = "A task id or a unique prefix of one")),
    responses((status = 200, body = Object, description = "The task with `waiting`, `dependencies` and `routing`"),
        (status = 400, body = ErrorBody, description = "The prefix names several tasks"), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_task(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let s = service(&state)?;
    let shown = tasks::show(s.stores(), &id).await.map_err(|e| app_error(e.into()))?;
    Ok(Json(shown.to_json()))
}

#[utoipa::path(get, path = "/v1/tasks/{id}/evidence", params(("id" = String, Path, description = "A task id or a unique prefix of one")),
    responses((status = 200, body = Object, description = "The worktree, the last attempt and its evidence manifest, the merge (`null` when none)"),
        (status = 404, body = ErrorBody)))]
pub(crate) async fn evidence(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let s = service(&state)?;
    let id = resolve(&s, &id).await?;
    let exec = executor(&s).await?;
    Ok(Json(tasks::evidence_json(&exec, &id).await.map_err(app_error)?))
}

#[utoipa::path(get, path = "/v1/tasks/{id}/diff", params(("id" = String, Path, description = "A task id or a unique prefix of one")),
    responses((status = 200, content_type = "text/plain", body = String, description = "The diff of the last attempt against its base commit"),
        (status = 404, body = ErrorBody, description = "No such task, or no evidence yet")))]
pub(crate) async fn diff(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<impl IntoResponse> {
    let s = service(&state)?;
    let id = resolve(&s, &id).await?;
    let exec = executor(&s).await?;
    let diff = tasks::diff(&exec, &id).await.map_err(app_error)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], diff))
}

#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", params(("id" = String, Path, description = "A task id or a unique prefix of one")),
    responses((status = 200, body = Object, description = "The task, cancelled (its dependents are blocked)"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "Its status does not allow it")))]
pub(crate) async fn cancel(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let s = service(&state)?;
    let id = resolve(&s, &id).await?;
    let t = s.stores().tasks.cancel(&id).await.map_err(|e| app_error(e.into()))?;
    Ok(Json(task_value(&t)))
}

#[utoipa::path(post, path = "/v1/tasks/{id}/retry", params(("id" = String, Path, description = "A task id or a unique prefix of one")),
    responses((status = 200, body = Object, description = "The task, queued again (its dependents are unblocked)"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "Its status does not allow it")))]
pub(crate) async fn retry(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let s = service(&state)?;
    let id = resolve(&s, &id).await?;
    let t = s.stores().tasks.retry(&id).await.map_err(|e| app_error(e.into()))?;
    tasks::wake_daemon(s.runtime());
    Ok(Json(task_value(&t)))
}

#[utoipa::path(post, path = "/v1/tasks/{id}/approve", params(("id" = String, Path, description = "A task id or a unique prefix of one")),
    request_body(content = Option<ApproveTask>, description = "No body: `claim`"),
    responses((status = 200, body = Approved), (status = 400, body = ErrorBody, description = "An unknown stage"),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn approve(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Json<ApproveTask>, JsonRejection>,
) -> ApiResult<Json<Approved>> {
    let body = match body {
        Ok(Json(b)) => b,
        Err(JsonRejection::MissingJsonContentType(_)) => ApproveTask::default(),
        Err(e) => return Err(bad_json(e)),
    };
    if !matches!(body.stage.as_str(), "claim" | "merge") {
        let message = format!("unknown stage {:?}: approve `claim` (running the task) or `merge`", body.stage);
        return Err(ApiError::new(StatusCode::BAD_REQUEST, Problem::Usage.code(), message));
    }
    let s = service(&state)?;
    let id = resolve(&s, &id).await?;
    tasks::approve(s.runtime(), s.stores(), &id, &body.stage, "api").await.map_err(app_error)?;
    Ok(Json(Approved { task_id: id, stage: body.stage, by: "api".into() }))
}

#[utoipa::path(post, path = "/v1/tasks/{id}/merge", params(("id" = String, Path, description = "A task id or a unique prefix of one")),
    responses((status = 200, body = MergedView), (status = 403, body = ErrorBody, description = "The policy refuses, or wants an approval"),
        (status = 404, body = ErrorBody, description = "No such task, or it has no worktree"),
        (status = 409, body = ErrorBody, description = "Not done, discarded, or a conflict")))]
pub(crate) async fn merge(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<MergedView>> {
    let s = service(&state)?;
    let id = resolve(&s, &id).await?;
    let exec = executor(&s).await?;
    let m = tasks::merge(s.runtime(), &exec, s.stores(), &id).await.map_err(app_error)?;
    let kind = m.kind_name().to_owned();
    Ok(Json(MergedView { task_id: id, branch: m.branch, into: m.into, commit: m.commit, kind }))
}

#[utoipa::path(post, path = "/v1/tasks/{id}/discard", params(("id" = String, Path, description = "A task id or a unique prefix of one")),
    responses((status = 200, body = DiscardedView), (status = 404, body = ErrorBody, description = "No such task, or it has no worktree")))]
pub(crate) async fn discard(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<DiscardedView>> {
    let s = service(&state)?;
    let id = resolve(&s, &id).await?;
    let exec = executor(&s).await?;
    let wt = tasks::discard(&exec, s.stores(), &id).await.map_err(app_error)?;
    Ok(Json(DiscardedView { task_id: id, branch: wt.branch, path: wt.path.display().to_string() }))
}

#[utoipa::path(get, path = "/v1/tasks/{id}/decisions", params(("id" = String, Path, description = "A task id or a unique prefix of one")),
    responses((status = 200, body = Vec<Object>, description = "In order, each `{at, stream, record}` (a Policy Decision Record) or `{at, stream, permission}` (a tool call's permission decision)"),
        (status = 404, body = ErrorBody)))]
pub(crate) async fn decisions(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let s = service(&state)?;
    let id = resolve(&s, &id).await?;
    let found = descartes_app::audit::task_decisions(s.stores(), &id).await.map_err(app_error)?;
    Ok(Json(serde_json::to_value(found).map_err(ApiError::internal)?))
}

#[utoipa::path(get, path = "/v1/tasks/{id}/audit", params(("id" = String, Path, description = "A task id or a unique prefix of one")),
    responses((status = 200, body = Object, description = "`{task_id, records: [{record, event}], verification: {intact, records, problems}}`"),
        (status = 404, body = ErrorBody)))]
pub(crate) async fn audit(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let s = service(&state)?;
    let id = resolve(&s, &id).await?;
    let trail = descartes_app::audit::task_trail(s.stores(), &id).await.map_err(app_error)?;
    Ok(Json(serde_json::to_value(trail).map_err(ApiError::internal)?))
}
