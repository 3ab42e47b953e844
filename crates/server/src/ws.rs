//! The WebSocket `GET /v1/ws`: JSON text frames both ways, each an object with a `type`.
//!
//! The upgrade goes through the same [guard](crate::guard) as every route (403 for a foreign
//! `Host` or `Origin`, 401 without the token). A browser cannot set `Authorization` on a
//! WebSocket, so the token may come as the subprotocol `bearer.TOKEN` instead
//! (`new WebSocket(url, ["bearer." + token])`, for a token that is an HTTP token, as generated
//! ones are); the server then answers with that subprotocol, as browsers require.
//!
//! Client to server:
//! - `{"type": "subscribe", "after": SEQ?, "stream": "ID"?, "types": ["run_completed", "task_*"]?,
//!   "deltas": true?}` starts the socket's one subscription, or replaces it: every event of the
//!   log after `after` (0: from the start) in the stream `stream` (a run, a session, an agent;
//!   all if absent) whose type is one of `types` (`task_*`: a prefix; all if absent), in `seq`
//!   order with no gap and no duplicate, then the new ones as they are appended. Answered by
//!   `subscribed` first. `deltas: false` leaves the live deltas out; `until_end: true` (with
//!   `stream` a run's id) follows that run to its end as `GET /v1/runs/{id}/stream` does: the
//!   subscription ends with the run's one `run_ended` frame;
//! - `{"type": "unsubscribe"}` stops it (answered by `unsubscribed`; frames already queued for
//!   the old subscription may still come before);
//! - `{"type": "ping"}`, answered by `{"type": "pong"}`;
//! - `{"type": "start_run", "request_id": "..."?, "run": {...}, "idempotency_key": "..."?,
//!   "subscribe": true?}`: starts a run (`run` is the body of `POST /v1/runs`), answered by
//!   `{"type": "run_started", "request_id", "run_id", "new"}`; with `subscribe` the socket's
//!   subscription becomes the run's stream from its first event, deltas included, to its end
//!   (`until_end`);
//! - `{"type": "resume_run", "request_id"?, "run_id", "run": {...}?, "subscribe": true?}`:
//!   resumes a run (`run` is the body of `POST /v1/runs/{id}/resume`), answered by
//!   `run_started` as for `start_run`;
//! - `{"type": "answer", "run_id", "call_id", "decision": "allow"|"allow_for_run"|"deny"}`:
//!   answers an ask (a `permission_asked` event), answered by `answered`;
//! - `{"type": "cancel", "run_id"}`: stops a run this server drives, answered by `cancelling`.
//!   A request that fails gets an `error` frame with the code of the API's errors
//!   (`not_found`, `conflict`, `bad_request`, `config`, `no_runner`, ...).
//!
//! Server to client:
//! - `{"type": "subscribed", "after": SEQ}`;
//! - `{"type": "event", "event": EVENT}`: EVENT is the event's JSON, the same object the event
//!   stream's `data:` carries and `/v1/events` pages hold (`{seq, id, run_id, type, v, at, data}`);
//!   a client that reconnects subscribes with `after` = the last `seq` it got. The frame is
//!   made once per event for every subscriber (the server's hub, [`crate::hub`]), and the
//!   Server-Sent Events streams carry the same bytes as their `data:`;
//! - `{"type": "run_ended", "run_id", "status"}`: the end of a run followed to its end
//!   (`until_end`), sent once: `status` is `completed`, `failed`, `cancelled`,
//!   `budget_exceeded` or `interrupted` (nobody drives it any more, or a session's turn
//!   stopped for a newer message);
//! - `{"type": "delta", "run_id": "...", "kind": "text"|"notice"|"attempt_ended", "text": "..."}`
//!   (`attempt_ended` has `kept`: false when the streamed text is to be discarded): live output
//!   of a run ([`ApiState::publish_delta`]), to the subscribers of that run's stream or of
//!   every stream. Deltas are not in the log, so they are best-effort: one that finds the
//!   socket's queue full is skipped, and a subscriber that falls behind the broadcast
//!   ([`crate::LIVE_CAPACITY`]) skips those it missed; neither disconnects it. The run's events
//!   (its messages) remain the record;
//! - `{"type": "lagged", "after": SEQ, "message": "..."}`, then the socket closes (code 1013):
//!   the client left the server's queue ([`crate::STREAM_BUFFER`] frames) full for the lag
//!   timeout ([`ApiState::lag_timeout`]); every matching event up to `after` was sent before,
//!   so it resumes with `after`;
//! - `{"type": "end", "message": "..."}`, then the socket closes (code 1001): the server shuts
//!   down;
//! - `{"type": "error", "code": "...", "message": "..."}`: a frame the server could not take,
//!   the socket stays open and the subscription goes on. Codes: `bad_frame` (not JSON, not an
//!   object with a string `type`, an unknown field, a wrong type, a binary frame), `unknown_type`,
//!   `too_big` (a frame over [`WS_FRAME_LIMIT`]), `log_failed` (the log could not be read: the
//!   subscription stopped).
//!
//! The server pings every [`WS_KEEPALIVE`] so proxies keep an idle socket. A frame over
//! [`WS_HARD_LIMIT`] cannot be skipped and closes the socket (1009). An idle socket holds no
//! queue and no page of the log; a subscribed one at most [`crate::STREAM_BUFFER`] frames and
//! one page. A client that takes nothing for [`ApiState::lag_timeout`] plus [`STALL_GRACE`] is
//! dropped. New request types (`start_run`, `answer`, `cancel`) go in [`ClientFrame`] and
//! `dispatch`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use descartes_core::follow::EventFilter;
use descartes_protocol::{RunId, Seq};
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::error::{ApiError, ErrorBody};
use crate::guard::chosen_protocol;
use crate::hub::Item;
use crate::tail::{RunEnd, Tail, TailEnd};
use crate::{ApiState, BODY_LIMIT, STREAM_BUFFER};

/// The largest frame a client may send: a larger one gets a `too_big` error, the socket stays.
pub const WS_FRAME_LIMIT: usize = BODY_LIMIT;
/// The largest frame read at all: past it the socket closes.
pub const WS_HARD_LIMIT: usize = 4 * WS_FRAME_LIMIT;
/// How often the server pings a socket.
pub const WS_KEEPALIVE: Duration = Duration::from_secs(15);
/// How much longer than the lag timeout one frame may take to write before the client is
/// dropped (after `lagged`, the client still gets this long to take it).
pub const STALL_GRACE: Duration = Duration::from_secs(10);
/// How long a closing socket waits for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// The read buffer a socket starts with (it grows for a larger frame).
const READ_BUFFER: usize = 8 * 1024;
/// The longest message an error frame quotes.
const QUOTE: usize = 300;
/// The most frames a socket's writer sends with one flush.
const WRITE_BATCH: usize = 64;

/// What a client sends (the `type` tells which).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Starts (or replaces) the socket's subscription.
    Subscribe {
        /// Events after this `seq` (0: from the start).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<Seq>,
        /// One stream only (a run, a session, an agent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream: Option<String>,
        /// These event types only (`task_*`: a prefix).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        types: Option<Vec<String>>,
        /// Whether live deltas come too (yes by default).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deltas: Option<bool>,
        /// Follow the run `stream` names to its end, as `GET /v1/runs/{id}/stream` does: the
        /// subscription ends with the run's one terminal frame (`run_ended`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until_end: Option<bool>,
    },
    /// Stops the subscription.
    Unsubscribe {},
    /// Asks for a `pong`.
    Ping {},
    /// Starts a run (`run` is the body of `POST /v1/runs`); answered by `run_started` (echoing
    /// `request_id`). With `subscribe`, the socket's subscription becomes the run's stream from
    /// its first event, deltas included.
    StartRun {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        run: crate::drive::CreateRun,
        /// A retried request with the same key gets the first one's run.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
        #[serde(default)]
        subscribe: bool,
    },
    /// Resumes a run (`run`: the body of `POST /v1/runs/{id}/resume`); answered by
    /// `run_started`; with `subscribe`, as for `start_run`.
    ResumeRun {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        run_id: String,
        #[serde(default)]
        run: crate::drive::ResumeRun,
        #[serde(default)]
        subscribe: bool,
    },
    /// Answers an ask of a run (`decision`: `allow`, `allow_for_run`, `deny`); answered by
    /// `answered`.
    Answer { run_id: String, call_id: String, decision: String },
    /// Stops a run this server drives; answered by `cancelling` (its `run_cancelled` event
    /// follows in the log).
    Cancel { run_id: String },
}

/// What the server sends, but events (framed once by the hub, see [`crate::hub::Item`]) and
/// deltas (forwarded as published). The Server-Sent Events streams carry the same frames as
/// their `data:`.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ServerFrame<'a> {
    Subscribed {
        after: Seq,
    },
    Unsubscribed,
    RunStarted {
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
        run_id: &'a str,
        /// False when an earlier request with the same idempotency key started it.
        new: bool,
        /// Provider and model.
        label: &'a str,
    },
    Answered {
        run_id: &'a str,
        call_id: &'a str,
    },
    Cancelling {
        run_id: &'a str,
    },
    /// The run a stream follows has ended: its one terminal frame (`status`: `completed`,
    /// `failed`, `cancelled`, `budget_exceeded`, `interrupted`).
    RunEnded {
        run_id: &'a str,
        status: &'a str,
    },
    Pong,
    Lagged {
        after: Seq,
        message: &'a str,
    },
    End {
        message: &'a str,
    },
    Error {
        code: &'a str,
        message: String,
    },
}

impl ServerFrame<'_> {
    fn text(&self) -> Utf8Bytes {
        self.string().into()
    }

    pub(crate) fn string(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            let message = format!("a frame could not be written: {e}");
            serde_json::json!({"type": "error", "code": "internal", "message": message}).to_string()
        })
    }
}

/// What the writer of a socket is handed.
enum Out {
    /// A frame (an event's: the bytes every subscriber shares).
    Text(Utf8Bytes),
    Ping,
    /// The last frame, then a close with this code.
    Close(Utf8Bytes, u16),
}

/// The sending side of a socket: frames wait here, [`STREAM_BUFFER`] at most, for its writer.
#[derive(Clone)]
struct Outbox(mpsc::Sender<Out>);

impl Outbox {
    /// Queues a frame, waiting for room (a client that reads nothing holds the sender back).
    async fn send(&self, frame: ServerFrame<'_>) {
        let _ = self.0.send(Out::Text(frame.text())).await;
    }

    /// Queues a frame if there is room now (best-effort frames).
    fn offer(&self, out: Out) {
        let _ = self.0.try_send(out);
    }

    /// Queues the last frame: after it the writer closes the socket with `code`.
    async fn close(&self, frame: ServerFrame<'_>, code: u16) {
        let _ = self.0.send(Out::Close(frame.text(), code)).await;
    }

    /// An error frame.
    async fn error(&self, code: &str, message: impl Into<String>) {
        self.send(ServerFrame::Error { code, message: clip(message.into()) }).await;
    }
}

/// What `start_run` and `resume_run` ask for.
enum Begin {
    New(crate::drive::CreateRun, Option<String>),
    Resume(String, crate::drive::ResumeRun),
}

/// A subscription: the task tailing the log into the outbox, and the deltas it wants.
struct Subscription {
    pump: JoinHandle<()>,
    stream: Option<String>,
    deltas: Option<broadcast::Receiver<Value>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// One socket's state, as the dispatch sees it.
struct Conn {
    state: ApiState,
    out: Outbox,
    sub: Option<Subscription>,
}

/// Handles one client frame, answering through `conn.out`: the one place each request type is
/// served (add `start_run`, `answer`, `cancel` here, beside their [`ClientFrame`] variants).
async fn dispatch(frame: ClientFrame, conn: &mut Conn) {
    match frame {
        ClientFrame::Subscribe { after, stream, types, deltas, until_end } => {
            let until_end = until_end.unwrap_or(false);
            if until_end && stream.is_none() {
                return conn.out.error("bad_frame", "`until_end` follows one run: give its id as `stream`").await;
            }
            let filter = EventFilter { stream: stream.as_deref().map(RunId::from), kinds: types.unwrap_or_default() };
            conn.subscribe(after.unwrap_or(0), filter, deltas.unwrap_or(true), until_end).await;
        }
        ClientFrame::Unsubscribe {} => {
            conn.sub = None;
            conn.out.send(ServerFrame::Unsubscribed).await;
        }
        ClientFrame::Ping {} => conn.out.send(ServerFrame::Pong).await,
        ClientFrame::StartRun { request_id, run, idempotency_key, subscribe } => {
            conn.start_run(request_id.as_deref(), Begin::New(run, idempotency_key), subscribe).await;
        }
        ClientFrame::ResumeRun { request_id, run_id, run, subscribe } => {
            conn.start_run(request_id.as_deref(), Begin::Resume(run_id, run), subscribe).await;
        }
        ClientFrame::Answer { run_id, call_id, decision } => conn.answer(&run_id, &call_id, &decision).await,
        ClientFrame::Cancel { run_id } => {
            let Some(service) = conn.service().await else { return };
            match service.cancel(&run_id).await {
                Ok(id) => conn.out.send(ServerFrame::Cancelling { run_id: id.as_str() }).await,
                Err(e) => conn.app_error(e).await,
            }
        }
    }
}

impl Conn {
    /// Replaces the subscription: `subscribed`, then the tail's events, and the deltas; with
    /// `until_end`, up to the end of the run the filter's stream names.
    async fn subscribe(&mut self, after: Seq, filter: EventFilter, deltas: bool, until_end: bool) {
        self.sub = None;
        // Deltas published once the client knows it is subscribed reach it.
        let deltas = deltas.then(|| self.state.live.subscribe());
        self.subscribe_with(after, filter, deltas, until_end).await;
    }

    /// [`Conn::subscribe`] with the deltas taken from `deltas` (subscribed to before a run
    /// started, so none of its deltas is missed).
    async fn subscribe_with(
        &mut self,
        after: Seq,
        filter: EventFilter,
        deltas: Option<broadcast::Receiver<Value>>,
        until_end: bool,
    ) {
        self.sub = None;
        self.out.send(ServerFrame::Subscribed { after }).await;
        let stream = filter.stream.as_ref().map(|s| s.as_str().to_owned());
        let mut tail = Tail::new(&self.state, filter, after);
        let run_end = until_end.then(|| stream.clone()).flatten();
        if let Some(run) = &run_end {
            tail = tail.until_run_ends(RunEnd { run_id: RunId::from(run.as_str()), status: self.state.status.clone() });
        }
        let out = self.out.clone();
        let pump = tokio::spawn(async move {
            let frame = |item: &Item| Out::Text(item.frame());
            match tail.run(&out.0, frame).await {
                TailEnd::Lagged(after) => {
                    let message = "the client fell behind; subscribe again with this `after`";
                    out.close(ServerFrame::Lagged { after, message }, close_code::AGAIN).await;
                }
                TailEnd::Failed(e) => out.error("log_failed", format!("the subscription stopped: {e}")).await,
                TailEnd::RunEnded(status) => {
                    let run_id = run_end.as_deref().unwrap_or_default();
                    out.send(ServerFrame::RunEnded { run_id, status }).await;
                }
                // The socket says `end` itself (subscribed or not).
                TailEnd::Shutdown | TailEnd::Closed => {}
            }
        });
        self.sub = Some(Subscription { pump, stream, deltas });
    }

    /// The runs of this server, or an error frame when it drives none.
    async fn service(&self) -> Option<Arc<descartes_app::service::Service>> {
        let service = self.state.service.clone();
        if service.is_none() {
            self.out.error("no_runner", "this server does not drive runs (it reads the log only)").await;
        }
        service
    }

    /// An application error as an error frame with its problem's code.
    async fn app_error(&self, e: anyhow::Error) {
        let code = descartes_app::classify(&e).code();
        self.out.error(code, descartes_core::redact::redact(&format!("{e:#}"))).await;
    }

    /// `start_run` and `resume_run`: starts the run, says `run_started`, and subscribes to it
    /// if asked (deltas taken from before the start, so none is missed).
    async fn start_run(&mut self, request_id: Option<&str>, begin: Begin, subscribe: bool) {
        let Some(service) = self.service().await else { return };
        let deltas = subscribe.then(|| self.state.live.subscribe());
        let started = match begin {
            Begin::New(run, key) => service.start(run.into_new_run(key)).await,
            Begin::Resume(id, run) => service.resume(&id, run.into_request()).await,
        };
        match started {
            Ok(started) => {
                let id = started.run_id.as_str();
                let frame = ServerFrame::RunStarted { request_id, run_id: id, new: started.new, label: &started.label };
                self.out.send(frame).await;
                if subscribe {
                    let filter = EventFilter { stream: Some(started.run_id.clone()), kinds: Vec::new() };
                    self.subscribe_with(0, filter, deltas, true).await;
                }
            }
            Err(e) => self.app_error(e).await,
        }
    }

    /// `answer`: answers a run's ask.
    async fn answer(&mut self, run_id: &str, call_id: &str, decision: &str) {
        let answer = match decision.parse::<descartes_app::service::Answer>() {
            Ok(a) => a,
            Err(e) => return self.out.error(descartes_app::Problem::Usage.code(), e).await,
        };
        let Some(service) = self.service().await else { return };
        match service.answer(run_id, call_id, answer).await {
            Ok(()) => self.out.send(ServerFrame::Answered { run_id, call_id }).await,
            Err(e) => self.app_error(e).await,
        }
    }

    /// The last word on what WebSocket cannot read past (a frame over the hard limit, bad
    /// framing): an error frame, then the socket closes.
    async fn unreadable(&mut self, e: axum::Error) {
        self.sub = None;
        let message = clip(e.to_string());
        let (code, close) = if message.contains("too long") {
            ("too_big", close_code::SIZE)
        } else {
            ("bad_frame", close_code::PROTOCOL)
        };
        self.out.close(ServerFrame::Error { code, message }, close).await;
    }

    /// A message from the client.
    async fn receive(&mut self, message: Message) {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                return self.out.error("bad_frame", "binary frames are not read: send JSON text").await;
            }
            // The WebSocket layer answers pings and closes itself.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) => return,
        };
        if text.len() > WS_FRAME_LIMIT {
            let message = format!("a frame holds {WS_FRAME_LIMIT} bytes at most; this one {}", text.len());
            return self.out.error("too_big", message).await;
        }
        match parse(text.as_str()) {
            Ok(frame) => dispatch(frame, self).await,
            Err((code, message)) => self.out.error(code, message).await,
        }
    }
}

/// A client frame, or the error code and message to answer it with.
fn parse(text: &str) -> Result<ClientFrame, (&'static str, String)> {
    let value: Value = serde_json::from_str(text).map_err(|e| ("bad_frame", format!("not JSON: {e}")))?;
    let Some(kind) = value.get("type").and_then(Value::as_str).map(str::to_owned) else {
        return Err(("bad_frame", "a frame is a JSON object with a string `type`".into()));
    };
    serde_json::from_value(value).map_err(|e| {
        let message = e.to_string();
        if message.starts_with("unknown variant") {
            (
                "unknown_type",
                format!(
                    "unknown frame type `{}` (known: subscribe, unsubscribe, ping, start_run, resume_run, answer, cancel)",
                    clip(kind)
                ),
            )
        } else {
            ("bad_frame", format!("`{}`: {message}", clip(kind)))
        }
    })
}

/// `text`, cut to [`QUOTE`] bytes at most.
fn clip(mut text: String) -> String {
    if text.len() > QUOTE {
        let mut end = QUOTE;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

#[utoipa::path(get, path = "/v1/ws", responses(
    (status = 101, description = "A WebSocket of JSON frames (subscribe to the log, live deltas); the token may come as the subprotocol `bearer.TOKEN`"),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    (status = 426, description = "Not a WebSocket upgrade", body = ErrorBody)))]
pub(crate) async fn upgrade(
    State(state): State<ApiState>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let mut ws = match ws {
        Ok(ws) => ws,
        Err(e) => return ApiError::new(e.status(), "not_websocket", e.body_text()).into_response(),
    };
    if let Some(protocol) = chosen_protocol(&headers, &state.token) {
        ws.set_selected_protocol(protocol);
    }
    ws.max_message_size(WS_HARD_LIMIT)
        .max_frame_size(WS_HARD_LIMIT)
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| session(socket, state))
}

/// One socket, from its upgrade to its close.
async fn session(socket: WebSocket, state: ApiState) {
    let _open = state.sockets.open();
    let (sink, mut incoming) = socket.split();
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let writer = tokio::spawn(write(sink, rx, state.lag_timeout.saturating_add(STALL_GRACE)));
    let mut shutdown = state.shutdown.clone();
    let mut conn = Conn { state, out: Outbox(tx), sub: None };
    let start = tokio::time::Instant::now() + WS_KEEPALIVE;
    let mut keepalive = tokio::time::interval_at(start, WS_KEEPALIVE);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut going = *shutdown.borrow_and_update();
    while !going {
        tokio::select! {
            // Set, or the sender gone: the server is going.
            changed = shutdown.changed() => going = changed.is_err() || *shutdown.borrow_and_update(),
            message = incoming.next() => match message {
                Some(Ok(message)) => conn.receive(message).await,
                Some(Err(e)) => {
                    conn.unreadable(e).await;
                    break;
                }
                None => break,
            },
            delta = next_delta(&mut conn.sub) => conn.out.offer(Out::Text(delta.to_string().into())),
            _ = keepalive.tick() => conn.out.offer(Out::Ping),
            // The writer is done: it closed after `lagged`, or the client is gone.
            () = conn.out.0.closed() => break,
        }
    }
    if going {
        conn.sub = None;
        conn.out.close(ServerFrame::End { message: "the server is shutting down" }, close_code::AWAY).await;
    }
    drop(conn);
    let _ = writer.await;
    // The client's close frame, if it comes soon.
    let _ = tokio::time::timeout(CLOSE_WAIT, async { while let Some(Ok(_)) = incoming.next().await {} }).await;
}

/// The next delta the subscription wants (never, without one).
async fn next_delta(sub: &mut Option<Subscription>) -> Value {
    let Some(Subscription { stream, deltas: Some(deltas), .. }) = sub else {
        return std::future::pending().await;
    };
    recv_delta(deltas, stream.as_deref()).await
}

/// The next delta of run `stream` (of any run: `None`) that `deltas` brings; never, once the
/// broadcast is closed. One that fell behind the broadcast skips what it missed.
pub(crate) async fn recv_delta(deltas: &mut broadcast::Receiver<Value>, stream: Option<&str>) -> Value {
    loop {
        match deltas.recv().await {
            Ok(delta) => {
                if stream.is_none_or(|s| delta.get("run_id").and_then(Value::as_str) == Some(s)) {
                    return delta;
                }
            }
            // Fell behind the broadcast: those are skipped.
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return std::future::pending().await,
        }
    }
}

/// Writes what the outbox holds to the socket, in order, until a `Close` or the outbox's end;
/// a write that takes longer than `stall` (the client reads nothing) drops the client. The
/// frames ready at once (up to [`WRITE_BATCH`]) go out with one flush: with `TCP_NODELAY`, one
/// packet for a burst rather than one per frame.
async fn write(mut sink: SplitSink<WebSocket, Message>, mut rx: mpsc::Receiver<Out>, stall: Duration) {
    let mut code = close_code::NORMAL;
    'frames: while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut fed = 0;
        while let Some(out) = next.take() {
            let (message, last) = match out {
                Out::Text(text) => (Message::Text(text), None),
                Out::Ping => (Message::Ping(Default::default()), None),
                Out::Close(text, code) => (Message::Text(text), Some(code)),
            };
            if !matches!(tokio::time::timeout(stall, sink.feed(message)).await, Ok(Ok(()))) {
                return;
            }
            if let Some(last) = last {
                // The close frame below flushes it.
                code = last;
                break 'frames;
            }
            fed += 1;
            if fed < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !matches!(tokio::time::timeout(stall, sink.flush()).await, Ok(Ok(()))) {
            return;
        }
    }
    drop(rx);
    let close = CloseFrame { code, reason: "".into() };
    let _ = tokio::time::timeout(stall, sink.send(Message::Close(Some(close)))).await;
}

/// The sockets open: [`crate::serve`] waits for them at shutdown.
#[derive(Debug)]
pub(crate) struct Sockets(watch::Sender<usize>);

impl Default for Sockets {
    fn default() -> Self {
        Self(watch::channel(0).0)
    }
}

impl Sockets {
    /// Counts a socket until the guard is dropped.
    fn open(self: &Arc<Self>) -> OpenSocket {
        self.0.send_modify(|n| *n += 1);
        OpenSocket(self.clone())
    }

    /// Waits until no socket is open, `within` at most.
    pub(crate) async fn closed(&self, within: Duration) {
        let mut rx = self.0.subscribe();
        let _ = tokio::time::timeout(within, rx.wait_for(|n| *n == 0)).await;
    }
}

/// An open socket, counted.
struct OpenSocket(Arc<Sockets>);

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_or_say_why_not() {
        let sub = parse(r#"{"type":"subscribe","after":3,"stream":"r1","types":["task_*"]}"#).unwrap();
        let want = ClientFrame::Subscribe {
            after: Some(3),
            stream: Some("r1".into()),
            types: Some(vec!["task_*".into()]),
            deltas: None,
            until_end: None,
        };
        assert_eq!(sub, want);
        assert_eq!(parse(r#"{"type":"ping"}"#).unwrap(), ClientFrame::Ping {});
        assert_eq!(parse(r#"{"type":"unsubscribe"}"#).unwrap(), ClientFrame::Unsubscribe {});
        for (text, code) in [
            ("nope", "bad_frame"),
            ("[1]", "bad_frame"),
            (r#"{"type":3}"#, "bad_frame"),
            (r#"{"type":"ping","x":1}"#, "bad_frame"),
            (r#"{"type":"subscribe","after":"x"}"#, "bad_frame"),
            (r#"{"type":"subscribe","bogus":true}"#, "bad_frame"),
            (r#"{"type":"start_rocket"}"#, "unknown_type"),
        ] {
            assert_eq!(parse(text).unwrap_err().0, code, "{text}");
        }
        let long = format!(r#"{{"type":"{}"}}"#, "x".repeat(5000));
        assert!(parse(&long).unwrap_err().1.len() < 2 * QUOTE);
    }

    #[test]
    fn server_frames_have_their_type() {
        let text = ServerFrame::Lagged { after: 7, message: "m" }.text();
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            serde_json::json!({"type": "lagged", "after": 7, "message": "m"})
        );
        assert_eq!(ServerFrame::Pong.text(), r#"{"type":"pong"}"#);
    }
}
