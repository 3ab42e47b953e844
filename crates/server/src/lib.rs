//! Descartes as a service: an HTTP API over the event log (`descartes serve`).
//!
//! Every request needs the server's bearer token (`Authorization: Bearer TOKEN`, compared in
//! constant time; a WebSocket may send it as the subprotocol `bearer.TOKEN` instead); a request
//! whose `Host` is not the server's own address, or whose `Origin` is another site, is refused
//! before the token is looked at (DNS rebinding, cross-site pages). See [`guard`]. Errors are
//! JSON `{"error": {"code", "message"}}` with the matching status. Bodies are limited in size.
//!
//! Resources (JSON, under `/v1`):
//! - `GET /v1/health`: the server is up;
//! - `GET /v1/runs?status=S&limit=N&offset=N`: runs, newest first;
//! - `GET /v1/runs/{id}`: one run's summary; `GET /v1/runs/{id}/events?after=SEQ&limit=N`;
//! - `GET /v1/events?after=SEQ&stream=ID&type=T&limit=N`: the log, in `seq` order, paginated
//!   (`next_after` is the cursor of the next page);
//! - `GET /v1/events/stream?after=SEQ&stream=ID&type=T`: the same as Server-Sent Events, live:
//!   each event's `id` is its `seq`, so a client that reconnects with `Last-Event-ID` gets the
//!   rest with no gap and no duplicate. At shutdown the stream ends with an `end` event;
//! - `GET /v1/ws`: a WebSocket of JSON frames: subscriptions to the log (the stream's events),
//!   live model output deltas, and later requests; the protocol is in [`ws`];
//! - runs driven by this server: `POST /v1/runs`, `.../resume`, `.../cancel`, `.../asks` (`drive`);
//! - tasks: `POST|GET /v1/tasks`, `GET /v1/tasks/{id}` and its `evidence`, `diff`, `decisions`
//!   and `audit`; `POST /v1/tasks/{id}/cancel|retry|approve|merge|discard` (`tasks`);
//! - `GET /v1/agents`, `GET /v1/sessions`, `GET /v1/providers?check=BOOL` (`listings`);
//! - sessions driven by this server: `POST /v1/sessions`, `POST /v1/sessions/{id}/messages`
//!   (`on_busy`: `reject`, `enqueue`, `interrupt`), `GET /v1/sessions/{id}/stream` (`sessions`).
//!
//! Routes that need the place's runtime (driving runs, tasks, agents, providers) answer `501
//! no_runner` on a server that only reads the log. Bodies are JSON with no unknown field:
//! malformed JSON is `400`, unknown fields and wrong types `422`.
//!
//! The server reads the log through [`EventStore`]; what a run's status means beyond the log
//! (a `running` run nobody drives is `interrupted`) comes from the caller ([`RunStatus`]).
//!
//! Modules: [`guard`] (Host, Origin, token), `error` ([`ApiError`]), `runs`, `events`, `drive`,
//! `tasks` and `listings` (the routes), `tail` (the live tail the event stream and the
//! WebSocket share), `hub` (the one reader of new events that feeds every live tail, each
//! event read and framed once), [`ws`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, post};
use descartes_core::{EventStore, RunSummary};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[cfg(test)]
mod api_tests;
mod drive;
mod error;
mod events;
pub mod guard;
mod hub;
mod listings;
mod runs;
mod sessions;
mod tail;
mod tasks;
pub mod ws;

pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use events::EventsPage;
pub use runs::{RunView, RunsPage};
pub use tasks::{ApproveTask, Approved, CreateTask, DiscardedView, MergedView, Needs};

/// The largest request body accepted.
pub const BODY_LIMIT: usize = 1024 * 1024;
/// The most events one page holds.
pub const PAGE_LIMIT: usize = 1000;
/// How many events (or frames) wait for a stream's or a WebSocket's client at most.
pub const STREAM_BUFFER: usize = 256;
/// How long a stream waits for a slow client (see [`ApiState::lag_timeout`]).
pub const LAG_TIMEOUT: Duration = Duration::from_secs(30);
/// How many live deltas wait in [`ApiState::live`] for the slowest WebSocket subscriber; one
/// further behind skips the oldest.
pub const LIVE_CAPACITY: usize = 1024;
/// How long [`serve`], once stopped, waits for the WebSockets to say `end` and close.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A run's status as the caller knows it (the log's, or `interrupted` for a `running` run
/// whose process is gone).
pub type RunStatus = Arc<dyn Fn(&RunSummary) -> String + Send + Sync>;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The event log.
    pub store: Arc<dyn EventStore>,
    /// The bearer token.
    pub token: Arc<str>,
    /// The `Host` values (`host:port`) that name this server.
    pub hosts: Arc<[String]>,
    /// What a run's status is.
    pub status: RunStatus,
    /// Set (or dropped) when the server shuts down: streams end, WebSockets get `end`.
    pub shutdown: watch::Receiver<bool>,
    /// How long a stream waits for a slow client to take its next event before it sends it
    /// `lagged` (with the cursor to resume from) and disconnects it.
    pub lag_timeout: Duration,
    /// Live model output deltas (`{"type": "delta", "run_id", ...}`), not in the log: each
    /// WebSocket subscriber gets those of its stream, best-effort. See [`ApiState::publish_delta`].
    pub live: broadcast::Sender<Value>,
    /// The WebSockets open, which [`serve`] waits for at shutdown.
    pub(crate) sockets: Arc<ws::Sockets>,
    /// The one reader of new events, shared by every live stream.
    pub(crate) hub: Arc<hub::Hub>,
    /// The runs this server drives (create, resume, cancel, answer); `None`: the server only
    /// reads the log, and those routes answer 501.
    pub service: Option<Arc<descartes_app::service::Service>>,
}

impl ApiState {
    /// The state of a server bound to `addr`.
    pub fn new(
        store: Arc<dyn EventStore>,
        token: String,
        addr: SocketAddr,
        status: RunStatus,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            hub: hub::Hub::new(store.clone(), shutdown.clone()),
            store,
            token: token.into(),
            hosts: own_hosts(addr).into(),
            status,
            shutdown,
            lag_timeout: LAG_TIMEOUT,
            live: broadcast::channel(LIVE_CAPACITY).0,
            sockets: Arc::default(),
            service: None,
        }
    }

    /// Hands a live model output delta of run `run_id` to the WebSocket subscribers of that run
    /// (and those of every run): `delta`'s fields (e.g. `{"kind": "text", "text": "..."}`; a
    /// value that is not an object goes in `delta`) with `"type": "delta"` and `run_id` set.
    /// Best-effort: nothing waits, nothing is stored, a subscriber that lags skips some. Says
    /// how many subscribers there are.
    pub fn publish_delta(&self, run_id: &str, delta: Value) -> usize {
        let mut frame = match delta {
            Value::Object(fields) => fields,
            other => {
                let mut fields = serde_json::Map::new();
                fields.insert("delta".into(), other);
                fields
            }
        };
        frame.insert("type".into(), "delta".into());
        frame.insert("run_id".into(), run_id.into());
        self.live.send(Value::Object(frame)).unwrap_or(0)
    }
}

/// The `Host` values a client reaching `addr` sends: the address itself and, on loopback,
/// `localhost`.
fn own_hosts(addr: SocketAddr) -> Vec<String> {
    let port = addr.port();
    let mut hosts = vec![addr.to_string()];
    if addr.ip().is_loopback() {
        hosts.extend([format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("[::1]:{port}")]);
    }
    hosts.sort();
    hosts.dedup();
    hosts
}

/// The API's OpenAPI document, generated from the handlers (`GET /v1/openapi.json`).
#[derive(OpenApi)]
#[openapi(
    info(title = "Descartes API", description = "Runs, tasks, agents and the event log of a Descartes place."),
    paths(
        health,
        openapi,
        runs::list_runs,
        runs::get_run,
        runs::run_events,
        events::events,
        events::stream,
        events::run_stream,
        ws::upgrade,
        drive::create_run,
        drive::resume_run,
        drive::cancel_run,
        drive::list_asks,
        drive::answer_ask,
        tasks::create_task,
        tasks::list_tasks,
        tasks::get_task,
        tasks::evidence,
        tasks::diff,
        tasks::cancel,
        tasks::retry,
        tasks::approve,
        tasks::merge,
        tasks::discard,
        tasks::decisions,
        tasks::audit,
        listings::agents,
        listings::sessions,
        listings::providers,
        sessions::create_session,
        sessions::send_message,
        sessions::session_stream
    ),
    components(schemas(
        ErrorBody, ErrorDetail, RunView, RunsPage, EventsPage, drive::CreateRun, drive::ResumeRun, drive::RunAccepted,
        drive::AskAnswer, drive::AskView, sessions::SendMessage, sessions::MessageAccepted, CreateTask, Needs, ApproveTask, Approved, MergedView, DiscardedView
    )),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        let scheme = HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build();
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

#[utoipa::path(get, path = "/v1/openapi.json", responses((status = 200, description = "This document")))]
async fn openapi() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

/// The API's routes, guarded.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/runs", get(runs::list_runs).post(drive::create_run))
        .route("/v1/runs/{id}/resume", post(drive::resume_run))
        .route("/v1/runs/{id}/cancel", post(drive::cancel_run))
        .route("/v1/runs/{id}/asks", get(drive::list_asks))
        .route("/v1/runs/{id}/asks/{call_id}", post(drive::answer_ask))
        .route("/v1/runs/{id}", get(runs::get_run))
        .route("/v1/runs/{id}/events", get(runs::run_events))
        .route("/v1/runs/{id}/stream", get(events::run_stream))
        .route("/v1/tasks", get(tasks::list_tasks).post(tasks::create_task))
        .route("/v1/tasks/{id}", get(tasks::get_task))
        .route("/v1/tasks/{id}/evidence", get(tasks::evidence))
        .route("/v1/tasks/{id}/diff", get(tasks::diff))
        .route("/v1/tasks/{id}/decisions", get(tasks::decisions))
        .route("/v1/tasks/{id}/audit", get(tasks::audit))
        .route("/v1/tasks/{id}/cancel", post(tasks::cancel))
        .route("/v1/tasks/{id}/retry", post(tasks::retry))
        .route("/v1/tasks/{id}/approve", post(tasks::approve))
        .route("/v1/tasks/{id}/merge", post(tasks::merge))
        .route("/v1/tasks/{id}/discard", post(tasks::discard))
        .route("/v1/agents", get(listings::agents))
        .route("/v1/sessions", get(listings::sessions).post(sessions::create_session))
        .route("/v1/sessions/{id}/messages", post(sessions::send_message))
        .route("/v1/sessions/{id}/stream", get(sessions::session_stream))
        .route("/v1/providers", get(listings::providers))
        .route("/v1/events", get(events::events))
        .route("/v1/events/stream", get(events::stream))
        .route("/v1/ws", get(ws::upgrade))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard::guard))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no such resource: {}", request.uri().path()))
}

#[utoipa::path(get, path = "/v1/health", responses((status = 200, description = "The server is up"), (status = 401, body = ErrorBody)))]
async fn health() -> axum::Json<Value> {
    axum::Json(json!({"ok": true, "version": env!("CARGO_PKG_VERSION")}))
}

/// Serves the API on `listener` (`TCP_NODELAY` on every connection) until `stop` resolves; then in-flight requests finish, streams
/// end with their `end` event and WebSockets with theirs (waiting [`CLOSE_TIMEOUT`] at most for
/// them to close).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: watch::Sender<bool>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let sockets = state.sockets.clone();
    let app = router(state);
    // Each frame goes out as soon as it is written (the WebSocket writer batches what is
    // ready): with Nagle's algorithm a small frame waits for the client's delayed ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            stop.await;
            let _ = shutdown.send(true);
        })
        .await;
    // An upgraded connection is no longer the HTTP server's: wait for the sockets themselves.
    sockets.closed(CLOSE_TIMEOUT).await;
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let hosts = own_hosts("127.0.0.1:7878".parse().unwrap());
        assert!(hosts.contains(&"localhost:7878".to_owned()) && hosts.contains(&"127.0.0.1:7878".to_owned()));
        assert_eq!(own_hosts("10.0.0.5:80".parse().unwrap()), vec!["10.0.0.5:80".to_owned()]);
    }

    #[test]
    fn the_openapi_document_has_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        for path in ["/v1/health", "/v1/runs", "/v1/runs/{id}/events", "/v1/events", "/v1/events/stream", "/v1/ws"] {
            assert!(doc["paths"][path]["get"].is_object(), "{path} in {doc}");
        }
        assert!(doc["components"]["schemas"]["EventsPage"].is_object());
        for path in [
            "/v1/tasks",
            "/v1/tasks/{id}",
            "/v1/tasks/{id}/evidence",
            "/v1/tasks/{id}/diff",
            "/v1/tasks/{id}/decisions",
            "/v1/tasks/{id}/audit",
            "/v1/agents",
            "/v1/sessions",
            "/v1/providers",
        ] {
            assert!(doc["paths"][path]["get"].is_object(), "{path} in {doc}");
        }
        for path in [
            "/v1/tasks",
            "/v1/tasks/{id}/cancel",
            "/v1/tasks/{id}/retry",
            "/v1/tasks/{id}/approve",
            "/v1/tasks/{id}/merge",
            "/v1/tasks/{id}/discard",
        ] {
            assert!(doc["paths"][path]["post"].is_object(), "{path} in {doc}");
        }
        let create = &doc["components"]["schemas"]["CreateTask"];
        assert!(
            create["properties"]["type"].is_object() && create["required"] == serde_json::json!(["title"]),
            "{create}"
        );
    }
}
