//! The API's errors: a status, a stable code and a message, as JSON
//! `{"error": {"code", "message"}}`.

use axum::extract::rejection::QueryRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

/// An API error: its status, a stable code and a message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    /// A failure of the server itself (500, `internal`).
    pub(crate) fn internal(e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text())
    }
}

/// What a handler answers.
pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// The body of every error.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable: `unauthorized`, `foreign_host`, `foreign_origin`, `bad_query`, `bad_json`,
    /// `too_large`, `not_found`, `ambiguous`, `bad_last_event_id`, `not_websocket`,
    /// `no_runner`, `internal`, and the application's problems (`descartes_app::Problem`:
    /// `bad_request`, `illegal_transition`, `conflict`, `policy_refused`, `merge_failed`, ...).
    pub code: String,
    pub message: String,
}
