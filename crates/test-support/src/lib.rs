//! Test support for Descartes: a fake model server speaking the providers' exact wire formats
//! (see `PROTOCOLS.md`), with a request recorder.
//!
//! ```
//! use descartes_test_support::{FakeServer, RecordedRequest, Reply, openai};
//!
//! let server = FakeServer::start_blocking(|req: &RecordedRequest| {
//!     if req.has_tool_result() {
//!         Reply::Stream(openai::text(&["done"]))
//!     } else {
//!         Reply::Stream(openai::tool_call("call_1", "shell", &["{\"command\":", "\"ls\"}"]))
//!     }
//! });
//! // Point the client at it: OPENAI_BASE_URL = server.openai_base_url(),
//! // ANTHROPIC_BASE_URL = server.url().
//! assert!(server.openai_base_url().starts_with("http://127.0.0.1:"));
//! ```
//!
//! Served routes: `POST /v1/chat/completions` and `POST /chat/completions` (OpenAI),
//! `POST /v1/messages` (Anthropic), `POST /v1/responses` and `POST /responses` (OpenAI
//! Responses), `POST /v1beta/models/{model}:streamGenerateContent` (Gemini), `POST /api/chat`
//! (Ollama, streamed as NDJSON). Model listings (`GET /v1/models`, `/models`, `/v1beta/models`,
//! `/api/tags`) are answered with one fake model without asking the responder. Any other
//! request is recorded too and answered 404.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use serde_json::Value;

pub mod agent_clis;
pub mod anthropic;
pub mod event_suite;
pub mod gemini;
pub mod ollama;
pub mod openai;
pub mod python;
pub mod responses;
pub mod task_suite;

/// One request the server received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Header names lowercase; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
    /// The body parsed as JSON (`Value::Null` when it is not JSON).
    pub body: Value,
    /// The body as text.
    pub raw_body: String,
}

impl RecordedRequest {
    /// A header value (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }

    /// The request went to the Anthropic route.
    pub fn is_anthropic(&self) -> bool {
        self.path.ends_with("/messages")
    }

    /// The request went to an OpenAI route.
    pub fn is_openai(&self) -> bool {
        self.path.ends_with("/chat/completions")
    }

    /// The request went to the OpenAI Responses route.
    pub fn is_responses(&self) -> bool {
        self.path.ends_with("/responses")
    }

    /// The request went to a Gemini route.
    pub fn is_gemini(&self) -> bool {
        self.path.contains(":streamGenerateContent") || self.path.contains(":generateContent")
    }

    /// The request went to Ollama's native route.
    pub fn is_ollama(&self) -> bool {
        self.path == "/api/chat"
    }

    /// The conversation in Chat Completions shape whatever the wire format: Responses `input`
    /// items and Gemini `contents` are converted (consecutive assistant items merged; tool
    /// outputs become `{"role":"tool","tool_call_id",...}` messages, with the function name as
    /// id for Gemini); other formats are `messages` as they are.
    pub fn conversation(&self) -> Vec<Value> {
        if let Some(items) = self.body.get("input").and_then(Value::as_array) {
            return responses::conversation(items);
        }
        if let Some(contents) = self.body.get("contents").and_then(Value::as_array) {
            return gemini::conversation(contents);
        }
        self.messages().to_vec()
    }

    /// `body.model`.
    pub fn model(&self) -> Option<&str> {
        self.body.get("model").and_then(Value::as_str)
    }

    /// `body.messages` (empty when missing).
    pub fn messages(&self) -> &[Value] {
        self.body.get("messages").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The system prompt: Anthropic's `system` (string or text blocks), or OpenAI's first
    /// `system` message.
    pub fn system_prompt(&self) -> Option<String> {
        if let Some(system) = self.body.get("system") {
            return Some(text_of(system));
        }
        if let Some(Value::String(instructions)) = self.body.get("instructions") {
            return Some(instructions.clone());
        }
        if let Some(system) = self.body.get("systemInstruction") {
            return Some(text_of(system.get("parts").unwrap_or(&Value::Null)));
        }
        self.messages()
            .iter()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("system"))
            .map(|m| text_of(m.get("content").unwrap_or(&Value::Null)))
    }

    /// Names of the offered tools (both formats).
    pub fn tool_names(&self) -> Vec<String> {
        self.body
            .get("tools")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .flat_map(|t| match t.get("functionDeclarations").and_then(Value::as_array) {
                Some(declarations) => declarations.iter().collect::<Vec<_>>(),
                None => vec![t],
            })
            .filter_map(|t| {
                t.get("name").or_else(|| t.get("function").and_then(|f| f.get("name"))).and_then(Value::as_str)
            })
            .map(str::to_owned)
            .collect()
    }

    /// The text of the last user message that has text (tool results are not text).
    pub fn last_user_text(&self) -> Option<String> {
        self.conversation()
            .iter()
            .rev()
            .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .map(|m| text_of(m.get("content").unwrap_or(&Value::Null)))
            .find(|t| !t.is_empty())
    }

    /// Whether the messages after the last assistant message carry a tool result (OpenAI
    /// `tool` messages, Anthropic `tool_result` blocks): "the model is being told what its
    /// tool call gave".
    pub fn has_tool_result(&self) -> bool {
        let messages = self.conversation();
        let start = messages
            .iter()
            .rposition(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
            .map_or(0, |i| i + 1);
        messages[start..].iter().any(|m| !tool_results_of(m).is_empty())
    }

    /// All tool results in the conversation, in order: `(tool call id, content)`.
    pub fn tool_results(&self) -> Vec<(String, String)> {
        self.conversation().iter().flat_map(tool_results_of).collect()
    }

    /// The tool results after the last assistant message.
    pub fn last_tool_results(&self) -> Vec<(String, String)> {
        let messages = self.conversation();
        let start = messages
            .iter()
            .rposition(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
            .map_or(0, |i| i + 1);
        messages[start..].iter().flat_map(tool_results_of).collect()
    }

    /// Number of assistant messages in the history (= model turns already taken).
    pub fn assistant_turns(&self) -> usize {
        self.conversation().iter().filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant")).count()
    }
}

/// Text of a `content` value: a string, or the `text` of its text blocks joined.
pub(crate) fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter(|b| match b.get("type").and_then(Value::as_str) {
                Some(kind) => matches!(kind, "text" | "input_text" | "output_text"),
                // Gemini parts: {"text": ...} (thoughts excluded).
                None => b.get("thought").is_none(),
            })
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

fn tool_results_of(message: &Value) -> Vec<(String, String)> {
    let str_of = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_owned();
    if message.get("role").and_then(Value::as_str) == Some("tool") {
        let content = match message.get("content") {
            Some(c @ Value::Array(_)) => text_of(c),
            other => str_of(other),
        };
        // Ollama names the tool instead of the call.
        let id = message.get("tool_call_id").or_else(|| message.get("tool_name"));
        return vec![(str_of(id), content)];
    }
    match message.get("content") {
        Some(Value::Array(blocks)) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            .map(|b| {
                let content = match b.get("content") {
                    Some(c @ Value::Array(_)) => text_of(c),
                    other => str_of(other),
                };
                (str_of(b.get("tool_use_id")), content)
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A piece of a scripted streamed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Text written as is (one or more whole SSE frames, or a deliberately broken piece).
    Data(String),
    /// Wait before the next chunk.
    Delay(Duration),
    /// Abort the connection here: the chunked body is never terminated.
    Close,
}

impl Chunk {
    /// `data: {json}\n\n`.
    pub fn data(json: &Value) -> Chunk {
        Chunk::Data(format!("data: {json}\n\n"))
    }

    /// `event: {name}\ndata: {json}\n\n`.
    pub fn event(name: &str, json: &Value) -> Chunk {
        Chunk::Data(format!("event: {name}\ndata: {json}\n\n"))
    }
}

/// What the server answers to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// 200 `text/event-stream`, written chunk by chunk.
    Stream(Vec<Chunk>),
    /// An error (or any) status with headers and a body.
    Status { status: u16, headers: Vec<(String, String)>, body: String },
    /// 200 `text/event-stream` with this exact body.
    Raw(String),
}

impl Reply {
    /// OpenAI error: `{"error":{"message","type","param":null,"code"}}`.
    pub fn openai_error(status: u16, kind: &str, code: Option<&str>, message: &str) -> Reply {
        let body = serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
        Reply::Status { status, headers: json_headers(), body: body.to_string() }
    }

    /// Anthropic error: `{"type":"error","error":{"type","message"}}`.
    pub fn anthropic_error(status: u16, kind: &str, message: &str) -> Reply {
        let body = serde_json::json!({"type": "error", "error": {"type": kind, "message": message}});
        Reply::Status { status, headers: json_headers(), body: body.to_string() }
    }

    /// Adds a header to a `Status` reply (no effect on the others).
    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        if let Reply::Status { headers, .. } = &mut self {
            headers.push((name.to_owned(), value.to_owned()));
        }
        self
    }
}

fn json_headers() -> Vec<(String, String)> {
    vec![("content-type".to_owned(), "application/json".to_owned())]
}

/// Inserts `delay` between consecutive chunks.
pub fn with_delay(chunks: Vec<Chunk>, delay: Duration) -> Vec<Chunk> {
    let mut out = Vec::with_capacity(chunks.len() * 2);
    for (i, chunk) in chunks.into_iter().enumerate() {
        if i > 0 {
            out.push(Chunk::Delay(delay));
        }
        out.push(chunk);
    }
    out
}

/// Keeps the first `n` data chunks (delays kept), then [`Chunk::Close`]: a stream cut off.
pub fn cut_after(chunks: Vec<Chunk>, n: usize) -> Vec<Chunk> {
    let mut out = Vec::new();
    let mut seen = 0;
    for chunk in chunks {
        if matches!(chunk, Chunk::Data(_)) {
            if seen == n {
                break;
            }
            seen += 1;
        }
        out.push(chunk);
    }
    out.push(Chunk::Close);
    out
}

/// Decides the reply to each request.
pub type Responder = Arc<dyn Fn(&RecordedRequest) -> Reply + Send + Sync>;

/// A responder answering the given replies in order, then repeating the last one (or a 500
/// if the list is empty).
pub fn sequence(replies: Vec<Reply>) -> impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static {
    let next = AtomicUsize::new(0);
    move |_req| {
        let i = next.fetch_add(1, Ordering::SeqCst);
        replies.get(i).or_else(|| replies.last()).cloned().unwrap_or_else(|| Reply::Status {
            status: 500,
            headers: Vec::new(),
            body: "fake server: no reply scripted".into(),
        })
    }
}

struct Shared {
    responder: Responder,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Streamed replies being written (the body is dropped when done or when the client goes).
    open_streams: AtomicUsize,
}

/// Counts a streamed reply as open while it lives.
struct OpenStream(Arc<Shared>);

impl OpenStream {
    fn new(shared: Arc<Shared>) -> Self {
        shared.open_streams.fetch_add(1, Ordering::SeqCst);
        OpenStream(shared)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A fake model server on `127.0.0.1`. Stops when dropped.
pub struct FakeServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for FakeServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeServer").field("addr", &self.addr).finish()
    }
}

impl FakeServer {
    /// Starts the server on a task of the current Tokio runtime (call it inside
    /// `#[tokio::test]`; panics outside a runtime).
    pub fn start<F>(responder: F) -> FakeServer
    where
        F: Fn(&RecordedRequest) -> Reply + Send + Sync + 'static,
    {
        Self::start_with(Arc::new(responder))
    }

    /// [`start`](Self::start) with a shared responder.
    pub fn start_with(responder: Responder) -> FakeServer {
        let (listener, addr) = bind();
        let shared =
            Arc::new(Shared { responder, requests: Mutex::new(Vec::new()), open_streams: AtomicUsize::new(0) });
        let listener = tokio::net::TcpListener::from_std(listener).expect("fake server: register listener with tokio");
        let router = router(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        FakeServer { addr, shared, task: Some(task), shutdown: None }
    }

    /// Starts the server on its own thread with its own runtime: for synchronous tests (e.g.
    /// ones that spawn the `descartes` binary).
    pub fn start_blocking<F>(responder: F) -> FakeServer
    where
        F: Fn(&RecordedRequest) -> Reply + Send + Sync + 'static,
    {
        Self::start_blocking_with(Arc::new(responder))
    }

    /// [`start_blocking`](Self::start_blocking) with a shared responder.
    pub fn start_blocking_with(responder: Responder) -> FakeServer {
        let (listener, addr) = bind();
        let shared =
            Arc::new(Shared { responder, requests: Mutex::new(Vec::new()), open_streams: AtomicUsize::new(0) });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let router = router(shared.clone());
        std::thread::Builder::new()
            .name("fake-model-server".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fake server: build runtime");
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("fake server: register listener with tokio");
                    tokio::select! {
                        _ = axum::serve(listener, router) => {}
                        _ = rx => {}
                    }
                });
                // Dropping the runtime cancels the connection tasks still running.
            })
            .expect("fake server: spawn thread");
        FakeServer { addr, shared, task: None, shutdown: Some(tx) }
    }

    /// `http://127.0.0.1:PORT` (the Anthropic base URL).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/v1` (the OpenAI base URL).
    pub fn openai_base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Number of requests received so far.
    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Streamed replies still being written. A client that drops its stream makes this go
    /// down once the server notices (at its next write).
    pub fn open_streams(&self) -> usize {
        self.shared.open_streams.load(Ordering::SeqCst)
    }

    /// Waits (up to `timeout`) until no streamed reply is open; returns whether that happened.
    pub async fn wait_streams_closed(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.open_streams() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// The last request received.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.shared.requests.lock().unwrap_or_else(|e| e.into_inner()).last().cloned()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn bind() -> (std::net::TcpListener, SocketAddr) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("fake server: bind 127.0.0.1:0");
    listener.set_nonblocking(true).expect("fake server: set_nonblocking");
    let addr = listener.local_addr().expect("fake server: local_addr");
    (listener, addr)
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).layer(DefaultBodyLimit::disable()).with_state(shared)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut recorded_headers = BTreeMap::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        recorded_headers
            .entry(name.as_str().to_ascii_lowercase())
            .and_modify(|v: &mut String| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let raw_body = String::from_utf8_lossy(&body).into_owned();
    let request = RecordedRequest {
        method: method.to_string(),
        path: uri.path().to_owned(),
        headers: recorded_headers,
        body: serde_json::from_str(&raw_body).unwrap_or(Value::Null),
        raw_body,
    };
    let path = request.path.as_str();
    let known = method == Method::POST
        && (matches!(
            path,
            "/v1/chat/completions"
                | "/chat/completions"
                | "/v1/messages"
                | "/v1/responses"
                | "/responses"
                | "/api/chat"
        ) || (path.starts_with("/v1beta/models/") && path.ends_with(":streamGenerateContent")));
    let ndjson = path == "/api/chat";
    let listing = if method == Method::GET { model_listing(path) } else { None };
    let reply = if known { Some((shared.responder)(&request)) } else { None };
    shared.requests.lock().unwrap_or_else(|e| e.into_inner()).push(request);
    if let Some(listing) = listing {
        return status_response(200, &json_headers(), listing.to_string());
    }
    match reply {
        Some(reply) => {
            let mut response = respond(reply, &shared);
            if ndjson && response.status() == StatusCode::OK {
                response
                    .headers_mut()
                    .insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
            }
            response
        }
        None => status_response(404, &[], "fake server: unknown route".into()),
    }
}

fn respond(reply: Reply, shared: &Arc<Shared>) -> Response {
    match reply {
        Reply::Stream(chunks) => {
            let state = (chunks.into_iter(), OpenStream::new(shared.clone()));
            let stream = futures::stream::unfold(state, |(mut it, guard)| async move {
                loop {
                    match it.next()? {
                        Chunk::Data(text) => return Some((Ok(Bytes::from(text)), (it, guard))),
                        Chunk::Delay(d) => tokio::time::sleep(d).await,
                        Chunk::Close => {
                            // Let the server flush what was written so far: hyper drops its
                            // unflushed buffer when the body fails.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            let end: Vec<Chunk> = Vec::new();
                            return Some((
                                Err(std::io::Error::other("fake server: connection closed by script")),
                                (end.into_iter(), guard),
                            ));
                        }
                    }
                }
            });
            sse_response(Body::from_stream(stream))
        }
        Reply::Raw(text) => sse_response(Body::from(text)),
        Reply::Status { status, headers, body } => status_response(status, &headers, body),
    }
}

fn sse_response(body: Body) -> Response {
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(axum::http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn status_response(status: u16, headers: &[(String, String)], body: String) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            response.headers_mut().append(name, value);
        }
    }
    response
}

/// The built-in answer to a model listing route (one model, `fake-model`).
fn model_listing(path: &str) -> Option<Value> {
    use serde_json::json;
    match path {
        "/v1/models" | "/models" => Some(json!({
            "object": "list",
            "data": [{"id": "fake-model", "object": "model", "created": 1_700_000_000, "owned_by": "fake",
                      "type": "model", "display_name": "Fake Model", "created_at": "2025-01-01T00:00:00Z"}],
            "has_more": false, "first_id": "fake-model", "last_id": "fake-model",
        })),
        "/v1beta/models" => Some(json!({"models": [{
            "name": "models/fake-model", "displayName": "Fake Model",
            "supportedGenerationMethods": ["generateContent", "streamGenerateContent"],
        }]})),
        "/api/tags" => Some(json!({"models": [{
            "name": "fake-model:latest", "model": "fake-model:latest", "size": 1, "digest": "0",
            "details": {"format": "gguf", "family": "fake"},
        }]})),
        _ => None,
    }
}
