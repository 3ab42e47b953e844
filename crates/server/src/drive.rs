//! Driving runs through the API: create, resume, cancel, and answer their permission asks.
//! The runs are driven by this process ([`descartes_app::service::Service`]); they keep going
//! when the client that started them disconnects.
//!
//! - `POST /v1/runs` (`Idempotency-Key` header: a retried request gets the first one's run,
//!   `200` instead of `201`);
//! - `POST /v1/runs/{id}/resume`, `POST /v1/runs/{id}/cancel`;
//! - `GET /v1/runs/{id}/asks`: the asks waiting for an answer;
//!   `POST /v1/runs/{id}/asks/{call_id}` with `{"decision": "allow" | "allow_for_run" | "deny"}`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use descartes_app::Problem;
use descartes_app::run::RunRequest;
use descartes_app::service::{Answer, Ask, NewRun, Service};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ApiState;
use crate::error::{ApiError, ApiResult, ErrorBody};

/// An application error as the API's error: the status and code of its kind.
pub(crate) fn app_error(e: anyhow::Error) -> ApiError {
    let problem = descartes_app::classify(&e);
    let status = StatusCode::from_u16(problem.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    ApiError::new(status, problem.code(), descartes_core::redact::redact(&format!("{e:#}")))
}

pub(crate) fn bad_json(e: JsonRejection) -> ApiError {
    let status = e.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "too_large" } else { "bad_json" };
    ApiError::new(status, code, e.body_text())
}

pub(crate) fn service(state: &ApiState) -> ApiResult<Arc<Service>> {
    state.service.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "no_runner",
            "this server does not drive runs (it reads the log only)",
        )
    })
}

/// A new run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRun {
    /// The goal.
    pub prompt: String,
    /// The provider; the configured default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Allow every ask the permission rules leave open (`-y`).
    #[serde(default)]
    pub auto_approve: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
    /// Providers to fall back to, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<String>,
    /// How long a tool call waits for an answer before it is denied (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ask_timeout_secs: Option<u64>,
}

/// What a resume changes (each absent field keeps the run's own).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeRun {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub auto_approve: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
}

impl ResumeRun {
    /// The application's request.
    pub fn into_request(self) -> RunRequest {
        RunRequest {
            provider: self.provider,
            model: self.model,
            yes: self.auto_approve,
            max_turns: self.max_turns,
            max_tokens: self.max_tokens,
            max_cost_usd: self.max_cost_usd,
            fallback: Vec::new(),
        }
    }
}

/// A run that was started, resumed or cancelled.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunAccepted {
    pub run_id: String,
    /// Provider and model (`openai/gpt-4o-mini`), for a run started or resumed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// An answer to an ask.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AskAnswer {
    /// `allow`, `allow_for_run` or `deny`.
    pub decision: String,
}

/// An ask waiting for its answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct AskView {
    pub call_id: String,
    pub tool: String,
    pub summary: String,
    /// When it is denied if nobody answers (microseconds since the epoch).
    pub expires_at: i64,
}

impl From<Ask> for AskView {
    fn from(a: Ask) -> Self {
        Self { call_id: a.call_id, tool: a.tool, summary: a.summary, expires_at: a.expires_at.as_micros() }
    }
}

impl CreateRun {
    /// The application's request.
    pub fn into_new_run(self, idempotency_key: Option<String>) -> NewRun {
        NewRun {
            prompt: self.prompt,
            request: RunRequest {
                provider: self.provider,
                model: self.model,
                yes: self.auto_approve,
                max_turns: self.max_turns,
                max_tokens: self.max_tokens,
                max_cost_usd: self.max_cost_usd,
                fallback: self.fallback,
            },
            ask_timeout: self.ask_timeout_secs.map(Duration::from_secs),
            idempotency_key,
        }
    }
}

#[utoipa::path(post, path = "/v1/runs", request_body = CreateRun,
    params(("Idempotency-Key" = Option<String>, Header, description = "A retried request with the same key gets the first one's run")),
    responses((status = 201, body = RunAccepted), (status = 200, body = RunAccepted, description = "The run an earlier request with this key started"), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn create_run(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Json<CreateRun>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<RunAccepted>)> {
    let Json(body) = body.map_err(bad_json)?;
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        Some(Ok(k)) if !k.is_empty() && k.len() <= 256 => Some(k.to_owned()),
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_idempotency_key",
                "Idempotency-Key must be 1 to 256 visible characters",
            ));
        }
        None => None,
    };
    let started = service(&state)?.start(body.into_new_run(key)).await.map_err(app_error)?;
    let status = if started.new { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(RunAccepted { run_id: started.run_id.to_string(), label: Some(started.label) })))
}

#[utoipa::path(post, path = "/v1/runs/{id}/resume", request_body = ResumeRun,
    responses((status = 202, body = RunAccepted), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn resume_run(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Json<ResumeRun>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<RunAccepted>)> {
    let body = match body {
        Ok(Json(b)) => b,
        // No body at all: nothing changes.
        Err(JsonRejection::MissingJsonContentType(_)) => ResumeRun::default(),
        Err(e) => return Err(bad_json(e)),
    };
    let started = service(&state)?.resume(&id, body.into_request()).await.map_err(app_error)?;
    Ok((StatusCode::ACCEPTED, Json(RunAccepted { run_id: started.run_id.to_string(), label: Some(started.label) })))
}

#[utoipa::path(post, path = "/v1/runs/{id}/cancel",
    responses((status = 202, body = RunAccepted), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(crate) async fn cancel_run(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<RunAccepted>)> {
    let run_id = service(&state)?.cancel(&id).await.map_err(app_error)?;
    Ok((StatusCode::ACCEPTED, Json(RunAccepted { run_id: run_id.to_string(), label: None })))
}

#[utoipa::path(get, path = "/v1/runs/{id}/asks", responses((status = 200, body = Vec<AskView>), (status = 404, body = ErrorBody)))]
pub(crate) async fn list_asks(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<Json<Vec<AskView>>> {
    let run = crate::runs::find_run(&state, &id).await?;
    let asks = match &state.service {
        Some(s) => s.asks(&run.run_id),
        None => Vec::new(),
    };
    Ok(Json(asks.into_iter().map(AskView::from).collect()))
}

#[utoipa::path(post, path = "/v1/runs/{id}/asks/{call_id}", request_body = AskAnswer,
    responses((status = 200, body = RunAccepted), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(crate) async fn answer_ask(
    State(state): State<ApiState>,
    Path((id, call_id)): Path<(String, String)>,
    body: Result<Json<AskAnswer>, JsonRejection>,
) -> ApiResult<Json<RunAccepted>> {
    let Json(body) = body.map_err(bad_json)?;
    let answer: Answer =
        body.decision.parse().map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, Problem::Usage.code(), e))?;
    service(&state)?.answer(&id, &call_id, answer).await.map_err(app_error)?;
    Ok(Json(RunAccepted { run_id: id, label: None }))
}
