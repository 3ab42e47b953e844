//! Descartes as a service: an HTTP API over the event log (`descartes serve`).
//!
//! Every request needs the server's bearer token (`Authorization: Bearer TOKEN`, compared in
//! constant time); a request whose `Host` is not the server's own address, or whose `Origin`
//! is another site, is refused before the token is looked at (DNS rebinding, cross-site pages).
//! Errors are JSON `{"error": {"code", "message"}}` with the matching status. Bodies are
//! limited in size.
//!
//! Resources (JSON, under `/v1`):
//! - `GET /v1/health`: the server is up;
//! - `GET /v1/runs?status=S&limit=N&offset=N`: runs, newest first;
//! - `GET /v1/runs/{id}`: one run's summary; `GET /v1/runs/{id}/events?after=SEQ&limit=N`;
//! - `GET /v1/events?after=SEQ&stream=ID&type=T&limit=N`: the log, in `seq` order, paginated
//!   (`next_after` is the cursor of the next page);
//! - `GET /v1/events/stream?after=SEQ&stream=ID&type=T`: the same as Server-Sent Events, live:
//!   each event's `id` is its `seq`, so a client that reconnects with `Last-Event-ID` gets the
//!   rest with no gap and no duplicate. At shutdown the stream ends with an `end` event.
//!
//! The server reads the log through [`EventStore`]; what a run's status means beyond the log
//! (a `running` run nobody drives is `interrupted`) comes from the caller ([`RunStatus`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use descartes_core::follow::{EventFilter, Follower};
use descartes_core::{EventStore, RunSummary};
use descartes_protocol::{Event, RunId};
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio::sync::watch;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

/// The largest request body accepted.
pub const BODY_LIMIT: usize = 1024 * 1024;
/// The most events one page holds.
pub const PAGE_LIMIT: usize = 1000;
/// How many events wait for a stream's client at most.
pub const STREAM_BUFFER: usize = 256;
/// How long a stream waits for a slow client (see [`ApiState::lag_timeout`]).
pub const LAG_TIMEOUT: Duration = Duration::from_secs(30);

/// A run's status as the caller knows it (the log's, or `interrupted` for a `running` run
/// whose process is gone).
pub type RunStatus = Arc<dyn Fn(&RunSummary) -> String + Send + Sync>;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub store: Arc<dyn EventStore>,
    pub token: Arc<str>,
    /// The `Host` values (`host:port`) that name this server.
    pub hosts: Arc<[String]>,
    pub status: RunStatus,
    /// Set when the server shuts down: streams end.
    pub shutdown: watch::Receiver<bool>,
    /// How long a stream waits for a slow client to take its next event before it sends it
    /// `lagged` (with the cursor to resume from) and disconnects it.
    pub lag_timeout: Duration,
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
        Self { store, token: token.into(), hosts: own_hosts(addr).into(), status, shutdown, lag_timeout: LAG_TIMEOUT }
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

/// An API error: its status, a stable code and a message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    fn internal(e: impl std::fmt::Display) -> Self {
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

type ApiResult<T> = Result<T, ApiError>;

/// The body of every error.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable: `unauthorized`, `foreign_host`, `foreign_origin`, `bad_query`, `not_found`,
    /// `ambiguous`, `bad_last_event_id`, `internal`.
    pub code: String,
    pub message: String,
}

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

/// The API's OpenAPI document, generated from the handlers (`GET /v1/openapi.json`).
#[derive(OpenApi)]
#[openapi(
    info(title = "Descartes API", description = "Runs and the event log of a Descartes place."),
    paths(health, openapi, list_runs, get_run, run_events, events, stream),
    components(schemas(ErrorBody, ErrorDetail, RunView, RunsPage, EventsPage)),
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
        .route("/v1/runs", get(list_runs))
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/runs/{id}/events", get(run_events))
        .route("/v1/events", get(events))
        .route("/v1/events/stream", get(stream))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Equality that takes as long whatever the first difference.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuses foreign hosts and origins, then requests without the token.
async fn guard(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if let Err(e) = check(&state, request.headers()) {
        return e.into_response();
    }
    next.run(request).await
}

fn check(state: &ApiState, headers: &HeaderMap) -> ApiResult<()> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let host = text(header::HOST).unwrap_or("");
    if !state.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "foreign_host",
            format!("`Host: {host}` is not this server (expected one of {})", state.hosts.join(", ")),
        ));
    }
    if let Some(origin) = text(header::ORIGIN) {
        let own =
            origin.strip_prefix("http://").is_some_and(|rest| state.hosts.iter().any(|h| h.eq_ignore_ascii_case(rest)));
        if !own {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "foreign_origin",
                format!("requests from `{origin}` are refused (another site)"),
            ));
        }
    }
    let token = text(header::AUTHORIZATION).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    if token.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this server needs its token: `Authorization: Bearer TOKEN` (`descartes serve --print-token`)",
        ));
    }
    if !same_secret(token, &state.token) {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "the token is not this server's"));
    }
    Ok(())
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no such resource: {}", request.uri().path()))
}

#[utoipa::path(get, path = "/v1/health", responses((status = 200, description = "The server is up"), (status = 401, body = ErrorBody)))]
async fn health() -> axum::Json<Value> {
    axum::Json(json!({"ok": true, "version": env!("CARGO_PKG_VERSION")}))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct RunsQuery {
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
        cost_usd: r.cost_usd,
    }
}

#[utoipa::path(get, path = "/v1/runs", params(RunsQuery), responses((status = 200, body = RunsPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn list_runs(
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

/// The run `id` names (a full id or a unique prefix).
async fn find_run(state: &ApiState, id: &str) -> ApiResult<RunSummary> {
    let runs = state.store.list_runs().await.map_err(ApiError::internal)?;
    let mut found =
        runs.into_iter().filter(|r| r.run_id.as_str() == id || (!id.is_empty() && r.run_id.as_str().starts_with(id)));
    match (found.next(), found.next()) {
        (Some(r), None) => Ok(r),
        (None, _) => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no run `{id}`"))),
        (Some(_), Some(_)) => {
            Err(ApiError::new(StatusCode::BAD_REQUEST, "ambiguous", format!("`{id}` names more than one run")))
        }
    }
}

#[utoipa::path(get, path = "/v1/runs/{id}", params(("id" = String, Path, description = "A run id or a unique prefix of one")), responses((status = 200, body = RunView), (status = 404, body = ErrorBody), (status = 400, description = "The prefix names several runs", body = ErrorBody)))]
async fn get_run(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<axum::Json<RunView>> {
    let run = find_run(&state, &id).await?;
    let status = (state.status)(&run);
    Ok(axum::Json(run_view(&run, status)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// Events after this `seq`.
    after: Option<i64>,
    /// At most this many (1 to 1000).
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/runs/{id}/events", params(("id" = String, Path, description = "A run id or a unique prefix of one"), PageQuery), responses((status = 200, body = EventsPage), (status = 404, body = ErrorBody)))]
async fn run_events(
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

/// Which events a reader wants.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct Filter {
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
async fn events(
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
async fn stream(
    State(state): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<Filter>, QueryRejection>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>>> {
    let Query(filter) = query?;
    // A reconnecting client says where it was: `Last-Event-ID` wins over `after`.
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::parse::<i64>);
    let after = match resume {
        Some(Ok(seq)) => seq,
        Some(Err(_)) => {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_last_event_id", "`Last-Event-ID` is not a seq"));
        }
        None => filter.after.unwrap_or(0),
    };
    let store = state.store.clone();
    let mut shutdown = state.shutdown.clone();
    let lag_timeout = state.lag_timeout;
    let events = feed(move |tx| async move {
        let mut follower = Follower::new(&*store, filter.events(), after);
        let mut after = after;
        loop {
            if *shutdown.borrow() {
                let _ = tx.send(SseEvent::default().event("end").data("the server is shutting down")).await;
                return;
            }
            let batch = match follower.next_page(PAGE_LIMIT).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(SseEvent::default().event("error").data(e.to_string())).await;
                    return;
                }
            };
            let cursor = follower.cursor();
            for e in batch {
                let data = serde_json::to_string(&e).unwrap_or_else(|_| "{}".into());
                let sse = SseEvent::default().id(e.seq.to_string()).event(e.kind()).data(data);
                match tx.send_timeout(sse, lag_timeout).await {
                    Ok(()) => after = e.seq,
                    Err(SendTimeoutError::Timeout(_)) => {
                        // The client takes too long: what it has is complete up to `after`.
                        let lagged =
                            json!({"after": after, "message": "the client fell behind; reconnect with Last-Event-ID"});
                        tx.lagged(SseEvent::default().event("lagged").data(lagged.to_string()));
                        return;
                    }
                    Err(SendTimeoutError::Closed(_)) => return,
                }
            }
            after = after.max(cursor);
            tokio::select! {
                () = store.wait_for_events(after, Duration::from_secs(15)) => {}
                _ = shutdown.changed() => {}
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// A stream's sending side: a bounded channel, and the last word for a client that lagged.
struct Feed {
    tx: tokio::sync::mpsc::Sender<SseEvent>,
    last: tokio::sync::oneshot::Sender<SseEvent>,
}

impl Feed {
    async fn send(&self, e: SseEvent) -> Result<(), SendTimeoutError<SseEvent>> {
        self.tx.send(e).await.map_err(|e| SendTimeoutError::Closed(e.0))
    }
    async fn send_timeout(&self, e: SseEvent, timeout: Duration) -> Result<(), SendTimeoutError<SseEvent>> {
        self.tx.send_timeout(e, timeout).await
    }
    /// Sent after everything already queued, then the stream ends.
    fn lagged(self, e: SseEvent) {
        let _ = self.last.send(e);
    }
}

/// A stream fed by a task through at most [`STREAM_BUFFER`] waiting events: the server never
/// holds more for a slow client (the task waits, then gives up with `lagged`).
fn feed<F, Fut>(f: F) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>>
where
    F: FnOnce(Feed) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    let (last, last_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(f(Feed { tx, last }));
    futures::stream::unfold((rx, Some(last_rx)), |(mut rx, last)| async move {
        match rx.recv().await {
            Some(e) => Some((Ok(e), (rx, last))),
            None => match last?.await {
                Ok(e) => Some((Ok(e), (rx, None))),
                Err(_) => None,
            },
        }
    })
}

/// Serves the API on `listener` until `stop` resolves; then in-flight requests finish and
/// streams end with their `end` event.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: watch::Sender<bool>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            stop.await;
            let _ = shutdown.send(true);
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_secrets() {
        let hosts = own_hosts("127.0.0.1:7878".parse().unwrap());
        assert!(hosts.contains(&"localhost:7878".to_owned()) && hosts.contains(&"127.0.0.1:7878".to_owned()));
        assert_eq!(own_hosts("10.0.0.5:80".parse().unwrap()), vec!["10.0.0.5:80".to_owned()]);
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("abc", "ab"));
    }
}
