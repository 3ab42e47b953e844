//! The log: `/v1/events` (cursor pages) and `/v1/events/stream` (Server-Sent Events, live,
//! through the shared [`crate::tail`]).
//!
//! The Server-Sent Events streams carry the WebSocket's frames: each `data:` is the JSON of the
//! frame a WebSocket subscriber gets for the same thing (`{"type": "event", "event": EVENT}`,
//! `{"type": "delta", ...}`, `{"type": "run_ended", "run_id", "status"}`, `lagged`, `end`,
//! `error`), byte for byte. The `event:` field names it: the event's type for an event (with
//! `id:` its seq), the status for a run's terminal frame, the frame's type otherwise.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use descartes_core::follow::{EventFilter, Follower};
use descartes_protocol::{Event, RunId};
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::hub::Item;
use crate::tail::{RunEnd, Tail, TailEnd};
use crate::ws::{ServerFrame, recv_delta};
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
    /// At most this many (1 to 1000).
    limit: Option<usize>,
}

impl Filter {
    /// The log's filter (one stream, one type).
    fn events(&self) -> EventFilter {
        events_filter(self.stream.as_deref(), self.kind.as_deref())
    }
}

fn events_filter(stream: Option<&str>, kind: Option<&str>) -> EventFilter {
    EventFilter { stream: stream.map(RunId::from), kinds: kind.iter().map(|k| (*k).to_owned()).collect() }
}

/// Which events a live stream carries.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct StreamFilter {
    /// Events after this `seq` (`Last-Event-ID` wins).
    after: Option<i64>,
    /// One stream only (a run, a session, an agent).
    stream: Option<String>,
    /// One event type only (`run_completed`).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    kind: Option<String>,
    /// Live model output deltas too (of `stream`, or of every run; yes by default, as on the
    /// WebSocket).
    deltas: Option<bool>,
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

#[utoipa::path(get, path = "/v1/events/stream", params(StreamFilter, ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this seq")), responses((status = 200, description = "Server-Sent Events carrying the WebSocket's frames as `data` (`{\"type\": \"event\", \"event\": EVENT}` with `id` the seq and `event` the event's type; `delta` frames unless `deltas=false`); `lagged` (with `after`) for a client that fell behind, `end` at shutdown", content_type = "text/event-stream")))]
pub(crate) async fn stream(
    State(state): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<StreamFilter>, QueryRejection>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>>> {
    let Query(filter) = query?;
    let after = resume_point(&headers, filter.after)?;
    let deltas = filter.deltas.unwrap_or(true).then(|| (state.live.subscribe(), filter.stream.clone()));
    let events = events_filter(filter.stream.as_deref(), filter.kind.as_deref());
    Ok(sse(Tail::new(&state, events, after), None, deltas))
}

/// The `after` of a stream: `Last-Event-ID` (a reconnecting client) wins over the query.
pub(crate) fn resume_point(headers: &HeaderMap, after: Option<i64>) -> ApiResult<i64> {
    match headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::parse::<i64>) {
        Some(Ok(seq)) => Ok(seq),
        Some(Err(_)) => {
            Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_last_event_id", "`Last-Event-ID` is not a seq"))
        }
        None => Ok(after.unwrap_or(0)),
    }
}

/// A tail as Server-Sent Events, with the live deltas of `deltas` (those of one stream, or all),
/// ending with one last event: `lagged`, `end`, `error`, or, for a run's stream (`run_id`), the
/// run's terminal frame.
pub(crate) fn sse(
    tail: Tail,
    run_id: Option<String>,
    deltas: Option<(broadcast::Receiver<Value>, Option<String>)>,
) -> Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        let events = tail.run(&tx, sse_event);
        tokio::pin!(events);
        let (mut deltas, stream) = match deltas {
            Some((rx, stream)) => (Some(rx), stream),
            None => (None, None),
        };
        let end = loop {
            tokio::select! {
                end = &mut events => break end,
                delta = next_delta(&mut deltas, stream.as_deref()) => {
                    // Best-effort, as on the WebSocket: a full queue skips it.
                    let _ = tx.try_send(frame("delta", delta.to_string()));
                }
            }
        };
        let last = match end {
            TailEnd::Lagged(after) => {
                let message = "the client fell behind; reconnect with Last-Event-ID";
                frame("lagged", ServerFrame::Lagged { after, message }.string())
            }
            TailEnd::Shutdown => frame("end", ServerFrame::End { message: "the server is shutting down" }.string()),
            TailEnd::Failed(e) => {
                let message = format!("the stream stopped: {e}");
                frame("error", ServerFrame::Error { code: "log_failed", message }.string())
            }
            TailEnd::RunEnded(status) => {
                let run_id = run_id.as_deref().unwrap_or_default();
                frame(status, ServerFrame::RunEnded { run_id, status }.string())
            }
            TailEnd::Closed => return,
        };
        // After everything already queued; then the stream ends.
        let _ = tx.send(last).await;
    });
    let events = futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|e| e.map(Ok)));
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// The next delta `deltas` brings (never, without it).
async fn next_delta(deltas: &mut Option<broadcast::Receiver<Value>>, stream: Option<&str>) -> Value {
    match deltas {
        Some(rx) => recv_delta(rx, stream).await,
        None => std::future::pending().await,
    }
}

/// A frame that is not an event, as Server-Sent Events carry it: `event` its name, `data` the
/// WebSocket's JSON.
fn frame(name: &str, json: String) -> SseEvent {
    SseEvent::default().event(name).data(json)
}

/// `after` of a run's stream.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunStreamQuery {
    /// Events after this `seq` (`Last-Event-ID` wins).
    after: Option<i64>,
    /// The run's live model output deltas too (yes by default, as on the WebSocket).
    deltas: Option<bool>,
}

#[utoipa::path(get, path = "/v1/runs/{id}/stream", params(("id" = String, Path, description = "A run id or a unique prefix"), RunStreamQuery, ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this seq")), responses((status = 200, description = "Server-Sent Events of one run, running or finished, with its deltas, as `/v1/events/stream` frames them; it ends with exactly one terminal frame, named `completed`, `failed`, `cancelled`, `budget_exceeded` or `interrupted` (nobody drives the run), with data `{\"type\": \"run_ended\", \"run_id\", \"status\"}`", content_type = "text/event-stream"), (status = 404, body = ErrorBody)))]
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
    let deltas = q.deltas.unwrap_or(true).then(|| (state.live.subscribe(), Some(run.run_id.to_string())));
    Ok(sse(Tail::new(&state, filter, after).until_run_ends(end), Some(run.run_id.to_string()), deltas))
}

/// An event as Server-Sent Events carry it: `id` its seq, `event` its type, `data` the
/// WebSocket's frame (made once for every client by the hub).
fn sse_event(item: &Item) -> SseEvent {
    // An event name cannot hold a line break (a type from elsewhere could).
    let kind = if item.kind.contains(['\r', '\n']) { "unknown" } else { &item.kind };
    SseEvent::default().id(item.seq.to_string()).event(kind).data(item.frame().as_str())
}
