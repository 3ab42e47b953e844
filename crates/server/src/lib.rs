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
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc::error::SendTimeoutError;
use tokio::sync::watch;

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

/// The API's routes, guarded.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
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

async fn health() -> axum::Json<Value> {
    axum::Json(json!({"ok": true, "version": env!("CARGO_PKG_VERSION")}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    status: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

fn run_json(r: &RunSummary, status: String) -> Value {
    json!({
        "run_id": r.run_id,
        "status": status,
        "prompt": r.prompt,
        "provider": r.provider,
        "model": r.model,
        "started_at": r.started_at,
        "updated_at": r.updated_at,
        "tokens": r.tokens,
        "cost_usd": r.cost_usd,
    })
}

async fn list_runs(
    State(state): State<ApiState>,
    query: Result<Query<RunsQuery>, QueryRejection>,
) -> ApiResult<axum::Json<Value>> {
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(100).clamp(1, PAGE_LIMIT);
    let offset = q.offset.unwrap_or(0);
    let runs = state.store.list_runs().await.map_err(ApiError::internal)?;
    let matching: Vec<Value> = runs
        .iter()
        .map(|r| (r, (state.status)(r)))
        .filter(|(_, s)| q.status.as_ref().is_none_or(|want| want == s))
        .map(|(r, s)| run_json(r, s))
        .collect();
    let total = matching.len();
    let page: Vec<Value> = matching.into_iter().skip(offset).take(limit).collect();
    let next = (offset + page.len() < total).then_some(offset + page.len());
    Ok(axum::Json(json!({"runs": page, "total": total, "next_offset": next})))
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

async fn get_run(State(state): State<ApiState>, Path(id): Path<String>) -> ApiResult<axum::Json<Value>> {
    let run = find_run(&state, &id).await?;
    let status = (state.status)(&run);
    Ok(axum::Json(run_json(&run, status)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    after: Option<i64>,
    limit: Option<usize>,
}

async fn run_events(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<axum::Json<Value>> {
    let Query(q) = query?;
    let run = find_run(&state, &id).await?;
    let limit = q.limit.unwrap_or(PAGE_LIMIT).clamp(1, PAGE_LIMIT);
    let events = state.store.read_run(&run.run_id, q.after.unwrap_or(0)).await.map_err(ApiError::internal)?;
    let more = events.len() > limit;
    let page: Vec<&Event> = events.iter().take(limit).collect();
    let next = if more { page.last().map(|e| e.seq) } else { None };
    Ok(axum::Json(json!({"events": page, "next_after": next})))
}

/// Which events a reader wants.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Filter {
    after: Option<i64>,
    stream: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    limit: Option<usize>,
}

impl Filter {
    /// The log's filter (one stream, one type).
    fn events(&self) -> EventFilter {
        EventFilter { stream: self.stream.as_deref().map(RunId::from), kinds: self.kind.iter().cloned().collect() }
    }
}

async fn events(
    State(state): State<ApiState>,
    query: Result<Query<Filter>, QueryRejection>,
) -> ApiResult<axum::Json<Value>> {
    let Query(filter) = query?;
    let limit = filter.limit.unwrap_or(PAGE_LIMIT).clamp(1, PAGE_LIMIT);
    let mut follower = Follower::new(&*state.store, filter.events(), filter.after.unwrap_or(0));
    let events = follower.next_page(limit).await.map_err(ApiError::internal)?;
    let cursor = follower.cursor();
    let next = (events.len() == limit).then_some(cursor);
    Ok(axum::Json(json!({"events": events, "next_after": next, "cursor": cursor})))
}

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
