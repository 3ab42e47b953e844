//! The run routes: `/v1/runs`, `/v1/runs/{id}`, `/v1/runs/{id}/events`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use descartes_core::RunSummary;
use descartes_protocol::Event;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::events::EventsPage;
use crate::{ApiState, PAGE_LIMIT};

/// A run, as `descartes list --json` shows it.
#[derive(Serialize, ToSchema)]
pub struct RunView {
    pub run_id: String,
    /// `running`, `interrupted`, `completed`, `failed`, `cancelled`, ...
    pub status: String,
    pub prompt: String,
    pub provider: String,
    pub model: String,
    #[schema(value_type = String, format = DateTime)]
    pub started_at: descartes_protocol::Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: descartes_protocol::Timestamp,
    pub tokens: u64,
    /// Of `tokens`, those Descartes counted because the provider reported no usage.
    pub estimated_tokens: u64,
    pub cost_usd: f64,
}

/// A page of runs.
#[derive(Serialize, ToSchema)]
pub struct RunsPage {
    pub runs: Vec<RunView>,
    pub total: usize,
    /// The `offset` of the next page, if there is one.
    pub next_offset: Option<usize>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct RunsQuery {
    /// Only runs with this status.
    status: Option<String>,
    /// At most this many (1 to 1000; 100).
    limit: Option<usize>,
    /// Skip this many.
    offset: Option<usize>,
}

fn run_view(r: &RunSummary, status: String) -> RunView {
    RunView {
        run_id: r.run_id.as_str().to_owned(),
        status,
        prompt: r.prompt.clone(),
        provider: r.provider.clone(),
        model: r.model.clone(),
        started_at: r.started_at,
        updated_at: r.updated_at,
        tokens: r.tokens,
        estimated_tokens: r.estimated_tokens,
        cost_usd: r.cost_usd,
    }
}

#[utoipa::path(get, path = "/v1/runs", params(RunsQuery), responses((status = 200, body = RunsPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(crate) async fn list_runs(
    State(state): State<ApiState>,
    query: Result<Query<RunsQuery>, QueryRejection>,
) -> ApiResult<axum::Json<RunsPage>> {
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(100).clamp(1, PAGE_LIMIT);
    let offset = q.offset.unwrap_or(0);
    let runs = state.store.list_runs().await.map_err(ApiError::internal)?;
    let matching: Vec<RunView> = runs
        .iter()
        .map(|r| (r, (state.status)(r)))
        .filter(|(_, s)| q.status.as_ref().is_none_or(|want| want == s))
        .map(|(r, s)| run_view(r, s))
        .collect();
    let total = matching.len();
    let runs: Vec<RunView> = matching.into_iter().skip(offset).take(limit).collect();
    let next_offset = (offset + runs.len() < total).then_some(offset + runs.len());
    Ok(axum::Json(RunsPage { runs, total, next_offset }))
}

/// The run `id` names (a full id or a unique prefix), as every front end resolves it.
pub(crate) async fn find_run(state: &ApiState, id: &str) -> ApiResult<RunSummary> {
    use descartes_core::store::{RunLookupError, resolve_run};
    let not_found = |message: String| ApiError::new(StatusCode::NOT_FOUND, "not_found", message);
    let run_id = resolve_run(&*state.store, id).await.map_err(|e| match e {
        RunLookupError::Store(e) => ApiError::internal(e),
        RunLookupError::Ambiguous { .. } => ApiError::new(StatusCode::BAD_REQUEST, "ambiguous", e.to_string()),
        e => not_found(e.to_string()),
    })?;
    state
        .store
        .run_summary(&run_id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| not_found(RunLookupError::NotFound(id.to_owned()).to_string()))
}

#[utoipa::path(get, path = "/v1/runs/{id}", params(("id" = String, Path, description = "A run id or a unique prefix of one")), responses((status = 200, body = RunView), (status = 404, body = ErrorBody), (status = 400, description = "The prefix names several runs", body = ErrorBody)))]
pub(crate) async fn get_run(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<axum::Json<RunView>> {
    let run = find_run(&state, &id).await?;
    let status = (state.status)(&run);
    Ok(axum::Json(run_view(&run, status)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct PageQuery {
    /// Events after this `seq`.
    after: Option<i64>,
    /// At most this many (1 to 1000).
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/runs/{id}/events", params(("id" = String, Path, description = "A run id or a unique prefix of one"), PageQuery), responses((status = 200, body = EventsPage), (status = 404, body = ErrorBody)))]
pub(crate) async fn run_events(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<axum::Json<EventsPage>> {
    let Query(q) = query?;
    let run = find_run(&state, &id).await?;
    let limit = q.limit.unwrap_or(PAGE_LIMIT).clamp(1, PAGE_LIMIT);
    let events = state.store.read_run(&run.run_id, q.after.unwrap_or(0)).await.map_err(ApiError::internal)?;
    let more = events.len() > limit;
    let events: Vec<Event> = events.into_iter().take(limit).collect();
    let cursor = events.last().map_or(q.after.unwrap_or(0), |e| e.seq);
    let next_after = more.then_some(cursor);
    Ok(axum::Json(EventsPage { events, next_after, cursor }))
}
