//! The registry and the place's settings, as the CLI's `--json` lists them:
//!
//! - `GET /v1/agents`: the agent registry (`descartes ai list --json`);
//! - `GET /v1/sessions`: chat sessions, newest first (`descartes session list --json`; read from
//!   the log, so a server that only reads the log serves them too);
//! - `GET /v1/providers?check=BOOL`: the configured providers with their circuit breakers and
//!   call statistics (`descartes providers --json`); `check=true` probes each configured one
//!   (network calls), otherwise nothing leaves the machine.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use descartes_app::listings;
use descartes_protocol::Timestamp;
use serde::Deserialize;
use serde_json::Value;
use utoipa::IntoParams;

use crate::ApiState;
use crate::drive::{app_error, service};
use crate::error::{ApiResult, ErrorBody};

#[utoipa::path(get, path = "/v1/agents",
    responses((status = 200, body = Vec<Object>, description = "Each agent's record with `status`, `running` and `success_rate`, by name"),
        (status = 501, body = ErrorBody)))]
pub(crate) async fn agents(State(state): State<ApiState>) -> ApiResult<Json<Vec<Value>>> {
    let s = service(&state)?;
    Ok(Json(listings::agents(s.stores(), Timestamp::now()).await.map_err(app_error)?))
}

#[utoipa::path(get, path = "/v1/sessions",
    responses((status = 200, body = Vec<Object>, description = "Each session's `session_id`, `title`, `status`, `turns`, `tokens`, ..., newest first")))]
pub(crate) async fn sessions(State(state): State<ApiState>) -> ApiResult<Json<Vec<Value>>> {
    let status = state.status.clone();
    let rows = listings::session_rows(&*state.store, &*status).await.map_err(app_error)?;
    Ok(Json(rows))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ProvidersQuery {
    /// Probe each configured provider (network calls; `false`).
    check: Option<bool>,
}

#[utoipa::path(get, path = "/v1/providers", params(ProvidersQuery),
    responses((status = 200, body = Vec<Object>, description = "Each provider's `name`, `kind`, `model`, `default`, `configured`, `circuit`, `calls`, `failures`, `check`, ..."),
        (status = 400, body = ErrorBody), (status = 501, body = ErrorBody)))]
pub(crate) async fn providers(
    State(state): State<ApiState>,
    query: Result<Query<ProvidersQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<Value>>> {
    let Query(q) = query?;
    let s = service(&state)?;
    let found = listings::providers(s.runtime(), &*state.store, q.check.unwrap_or(false)).await.map_err(app_error)?;
    Ok(Json(found.rows))
}
