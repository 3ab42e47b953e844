//! Sessions driven through the API: a session is a conversation of turns in one stream (as
//! `descartes chat` records it), each turn answering one message of the user.
//!
//! - `POST /v1/sessions`: a new session with its first message (its turn starts at once);
//! - `POST /v1/sessions/{id}/messages`: the next message. While a turn of the session is going,
//!   `on_busy` says what becomes of it: `reject` (the default: `409 conflict`), `enqueue` (its
//!   turn comes after the running one and the messages queued before it, in order) or
//!   `interrupt` (the running turn is stopped, recording `run_cancelled` with the reason
//!   [`descartes_app::service::INTERRUPTED`] so its streams end with the terminal frame
//!   `interrupted`; then this message's turn runs, before any queued one);
//! - `GET /v1/sessions/{id}/stream`: Server-Sent Events of the session's stream, framed as every
//!   stream (see `events`): its current turn and every later one, with their deltas; it does not
//!   end with a turn.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use descartes_app::Problem;
use descartes_app::run::RunRequest;
use descartes_app::service::{Delivered, Delivery, OnBusy, SessionMessage};
use descartes_core::follow::EventFilter;
use futures::Stream;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use utoipa::{IntoParams, ToSchema};

use crate::ApiState;
use crate::drive::{app_error, bad_json, service};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::tail::Tail;

/// A message to a session (and, for a new session, what it runs with).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    /// What the user says.
    pub message: String,
    /// While a turn of the session is going: `reject` (409, the default), `enqueue` (after it,
    /// in order) or `interrupt` (stop it, then answer this one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "enqueue")]
    pub on_busy: Option<String>,
    /// The provider; a new session's default is the configured one, a later turn keeps the
    /// session's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Allow every ask the permission rules leave open.
    #[serde(default)]
    pub auto_approve: bool,
    /// Model calls this turn may make.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
    /// How long a tool call waits for an answer before it is denied (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ask_timeout_secs: Option<u64>,
}

impl SendMessage {
    fn into_message(self) -> ApiResult<SessionMessage> {
        let on_busy = match self.on_busy.as_deref() {
            None => OnBusy::default(),
            Some(s) => {
                s.parse().map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, Problem::Usage.code(), e))?
            }
        };
        Ok(SessionMessage {
            text: self.message,
            on_busy,
            request: RunRequest {
                provider: self.provider,
                model: self.model,
                yes: self.auto_approve,
                max_turns: self.max_turns,
                max_tokens: self.max_tokens,
                max_cost_usd: self.max_cost_usd,
                fallback: Vec::new(),
            },
            ask_timeout: self.ask_timeout_secs.map(Duration::from_secs),
        })
    }
}

/// What became of a message.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageAccepted {
    pub session_id: String,
    /// `started` (its turn runs now), `queued` (behind the running turn) or `interrupting`
    /// (the running turn is being stopped; this one comes next).
    pub status: String,
    /// For `queued`: 1 for the next turn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
}

impl From<Delivered> for MessageAccepted {
    fn from(d: Delivered) -> Self {
        let (status, position) = match d.delivery {
            Delivery::Started => ("started", None),
            Delivery::Queued { position } => ("queued", Some(position)),
            Delivery::Interrupting => ("interrupting", None),
        };
        Self { session_id: d.session_id.to_string(), status: status.into(), position }
    }
}

#[utoipa::path(post, path = "/v1/sessions", request_body = SendMessage,
    responses((status = 201, body = MessageAccepted, description = "The session, its first turn started"),
        (status = 400, body = ErrorBody), (status = 422, body = ErrorBody), (status = 501, body = ErrorBody)))]
pub(crate) async fn create_session(
    State(state): State<ApiState>,
    body: Result<Json<SendMessage>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<MessageAccepted>)> {
    let Json(body) = body.map_err(bad_json)?;
    let delivered = service(&state)?.create_session(body.into_message()?).await.map_err(app_error)?;
    Ok((StatusCode::CREATED, Json(delivered.into())))
}

#[utoipa::path(post, path = "/v1/sessions/{id}/messages", request_body = SendMessage,
    params(("id" = String, Path, description = "A session id or a unique prefix")),
    responses((status = 202, body = MessageAccepted),
        (status = 409, body = ErrorBody, description = "A turn of the session is going and `on_busy` is `reject`"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(crate) async fn send_message(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Result<Json<SendMessage>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<MessageAccepted>)> {
    let Json(body) = body.map_err(bad_json)?;
    let delivered = service(&state)?.message(&id, body.into_message()?).await.map_err(app_error)?;
    Ok((StatusCode::ACCEPTED, Json(delivered.into())))
}

/// `after` of a session's stream.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct SessionStreamQuery {
    /// Events after this `seq` (`Last-Event-ID` wins).
    after: Option<i64>,
    /// The live model output deltas too (yes by default).
    deltas: Option<bool>,
}

#[utoipa::path(get, path = "/v1/sessions/{id}/stream", params(("id" = String, Path, description = "A session id or a unique prefix"), SessionStreamQuery, ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this seq")), responses((status = 200, description = "Server-Sent Events of the session's stream, its current turn and every later one, with their deltas, framed as `/v1/events/stream` frames them", content_type = "text/event-stream"), (status = 404, body = ErrorBody)))]
pub(crate) async fn session_stream(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<SessionStreamQuery>, QueryRejection>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>>> {
    let Query(q) = query?;
    let run = crate::runs::find_run(&state, &id).await?;
    let after = crate::events::resume_point(&headers, q.after)?;
    let filter = EventFilter { stream: Some(run.run_id.clone()), kinds: Vec::new() };
    let deltas = q.deltas.unwrap_or(true).then(|| (state.live.subscribe(), Some(run.run_id.to_string())));
    Ok(crate::events::sse(Tail::new(&state, filter, after), None, deltas))
}
