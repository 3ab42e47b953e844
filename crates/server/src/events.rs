//! The log: `/v1/events` (cursor pages) and `/v1/events/stream` (Server-Sent Events, live,
//! through the shared [`crate::tail`]).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use descartes_core::follow::{EventFilter, Follower};
use descartes_protocol::{Event, RunId};
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::tail::{RunEnd, Tail, TailEnd};
use crate::{ApiState, PAGE_LIMIT, STREAM_BUFFER};

/// A page of events (each `{seq, id, run_id, type, v, at, data}`).
#[derive(Serialize, ToSchema)]
pub struct EventsPage {
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<Event>,
    /// The `after` of the next page, if the page is full.
    pub next_after: Option<i64>,
    /// The `seq` of the last event read: where a reader resumes.
    pub cursor: i64,
}

/// Which events a reader wants.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct Filter {
    /// Events after this `seq` (the stream: `Last-Event-ID` wins).
    after: Option<i64>,
    /// One stream only (a run, a session, an agent).
    stream: Option<String>,
    /// One event type only (`run_completed`).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    kind: Option<String>,
    /// At most this many (1 to 1000; pages only).
    limit: Option<usize>,
}

impl Filter {
    /// The log's filter (one stream, one type).
    fn events(&self) -> EventFilter {
        EventFilter { stream: self.stream.as_deref().map(RunId::from), kinds: self.kind.iter().cloned().collect() }
    }
}

#[utoipa::path(get, path = "/v1/events", params(Filter), responses((status = 200, body = EventsPage), (status = 400, body = ErrorBody)))]
pub(crate) async fn events(
    State(state): State<ApiState>,
    query: Result<Query<Filter>, QueryRejection>,
) -> ApiResult<axum::Json<EventsPage>> {
    let Query(filter) = query?;
    let limit = filter.limit.unwrap_or(PAGE_LIMIT).clamp(1, PAGE_LIMIT);
    let mut follower = Follower::new(&*state.store, filter.events(), filter.after.unwrap_or(0));
    let events = follower.next_page(limit).await.map_err(ApiError::internal)?;
    let cursor = follower.cursor();
    let next_after = (events.len() == limit).then_some(cursor);
    Ok(axum::Json(EventsPage { events, next_after, cursor }))
}

#[utoipa::path(get, path = "/v1/events/stream", params(Filter, ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this seq")), responses((status = 200, description = "Server-Sent Events: `id` is the seq, `event` the type, `data` the event; `lagged` (with `after`) for a client that fell behind, `end` at shutdown", content_type = "text/event-stream")))]
pub(crate) async fn stream(
    State(state): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<Filter>, QueryRejection>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>>> {
    let Query(filter) = query?;
    let after = resume_point(&headers, filter.after)?;
    Ok(sse(Tail::new(&state, filter.events(), after), None))
}

/// The `after` of a stream: `Last-Event-ID` (a reconnecting client) wins over the query.
fn resume_point(headers: &HeaderMap, after: Option<i64>) -> ApiResult<i64> {
    match headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::parse::<i64>) {
        Some(Ok(seq)) => Ok(seq),
        Some(Err(_)) => {
            Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_last_event_id", "`Last-Event-ID` is not a seq"))
        }
        None => Ok(after.unwrap_or(0)),
    }
}

/// A tail as Server-Sent Events, ending with one last event: `lagged`, `end`, `error`, or, for
/// a run's stream (`run_id`), the run's terminal frame.
fn sse(tail: Tail, run_id: Option<String>) -> Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        let last = match tail.run(&tx, sse_event).await {
            TailEnd::Lagged(after) => {
                let lagged = json!({"after": after, "message": "the client fell behind; reconnect with Last-Event-ID"});
                SseEvent::default().event("lagged").data(lagged.to_string())
            }
            TailEnd::Shutdown => SseEvent::default().event("end").data("the server is shutting down"),
            TailEnd::Failed(e) => SseEvent::default().event("error").data(e.replace(['\r', '\n'], " ")),
            TailEnd::RunEnded(kind) => {
                SseEvent::default().event(kind).data(json!({"run_id": run_id, "status": kind}).to_string())
            }
            TailEnd::Closed => return,
        };
        // After everything already queued; then the stream ends.
        let _ = tx.send(last).await;
    });
    let events = futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|e| e.map(Ok)));
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// `after` of a run's stream.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunStreamQuery {
    /// Events after this `seq` (`Last-Event-ID` wins).
    after: Option<i64>,
}

#[utoipa::path(get, path = "/v1/runs/{id}/stream", params(("id" = String, Path, description = "A run id or a unique prefix"), RunStreamQuery, ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this seq")), responses((status = 200, description = "Server-Sent Events of one run, running or finished, as `/v1/events/stream` frames them; it ends with exactly one terminal event: `completed`, `failed`, `cancelled`, `budget_exceeded` or `interrupted` (nobody drives the run), with `{run_id, status}`", content_type = "text/event-stream"), (status = 404, body = ErrorBody)))]
pub(crate) async fn run_stream(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<RunStreamQuery>, QueryRejection>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>>> {
    let Query(q) = query?;
    let run = crate::runs::find_run(&state, &id).await?;
    let after = resume_point(&headers, q.after)?;
    let filter = EventFilter { stream: Some(run.run_id.clone()), kinds: Vec::new() };
    let end = RunEnd { run_id: run.run_id.clone(), status: state.status.clone() };
    Ok(sse(Tail::new(&state, filter, after).until_run_ends(end), Some(run.run_id.to_string())))
}

/// An event as Server-Sent Events carry it: `id` its seq, `event` its type, `data` its JSON.
fn sse_event(e: &Event) -> SseEvent {
    let data = serde_json::to_string(e).unwrap_or_else(|_| "{}".into());
    // An event name cannot hold a line break (a type from elsewhere could).
    let kind = if e.kind().contains(['\r', '\n']) { "unknown" } else { e.kind() };
    SseEvent::default().id(e.seq.to_string()).event(kind).data(data)
}
