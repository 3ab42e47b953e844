//! One MCP server: its connection (started lazily, restarted after a crash with backoff), its
//! tool list (refreshed after `notifications/tools/list_changed`) and its calls.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use rmcp::model::{CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation};
use rmcp::service::{NotificationContext, Peer, RunningService};
use rmcp::{ClientHandler, RoleClient, ServiceError, ServiceExt};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::{McpError, Result, ServerConfig};

/// Consecutive failures (crashes, failed starts) after which restarts are spaced out.
const FREE_RESTARTS: u32 = 1;
/// The longest wait between restarts of a failing server.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Bytes of a stdio server's stderr kept for error messages.
const STDERR_TAIL: usize = 2048;

/// A tool as the server describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerTool {
    /// The server's name for it.
    pub name: String,
    pub description: String,
    pub input_schema: Value,
    /// `annotations.readOnlyHint` (default false).
    pub read_only: bool,
    /// `annotations.idempotentHint` (default false).
    pub idempotent: bool,
}

/// Receives the server's notifications.
struct Handler {
    tools_changed: Arc<AtomicBool>,
}

impl ClientHandler for Handler {
    fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) -> impl Future<Output = ()> + Send + '_ {
        self.tools_changed.store(true, Ordering::SeqCst);
        std::future::ready(())
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(ClientCapabilities::default(), Implementation::new("descartes", env!("CARGO_PKG_VERSION")))
    }
}

fn alive(s: &RunningService<RoleClient, Handler>) -> bool {
    !s.is_closed() && !s.peer().is_transport_closed()
}

/// The live connection, or why there is none.
#[derive(Default)]
struct Conn {
    service: Option<RunningService<RoleClient, Handler>>,
    pid: Option<u32>,
    /// Consecutive failures since the last successful call or start.
    failures: u32,
    last_error: Option<String>,
    /// No restart before this.
    retry_at: Option<Instant>,
    /// The connection has served at least one request since it started.
    started_ok: bool,
}

/// One configured MCP server.
pub struct McpServer {
    name: String,
    config: ServerConfig,
    env: crate::EnvFn,
    default_cwd: Option<std::path::PathBuf>,
    conn: tokio::sync::Mutex<Conn>,
    tools: StdMutex<Arc<Vec<ServerTool>>>,
    tools_changed: Arc<AtomicBool>,
    /// Bumped whenever the tool list changes.
    generation: AtomicU64,
    stderr: Arc<StdMutex<VecDeque<u8>>>,
}

impl std::fmt::Debug for McpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpServer").field("name", &self.name).field("config", &self.config).finish()
    }
}

impl McpServer {
    /// A server, not yet started. `env` reads variables (the bearer token); `default_cwd` is a
    /// stdio server's working directory when the config names none.
    pub fn new(
        name: impl Into<String>,
        config: ServerConfig,
        env: crate::EnvFn,
        default_cwd: Option<std::path::PathBuf>,
    ) -> Self {
        Self {
            name: name.into(),
            config,
            env,
            default_cwd,
            conn: Default::default(),
            tools: StdMutex::new(Arc::new(Vec::new())),
            tools_changed: Arc::new(AtomicBool::new(false)),
            generation: AtomicU64::new(0),
            stderr: Default::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The process id of a running stdio server.
    pub async fn pid(&self) -> Option<u32> {
        let conn = self.conn.lock().await;
        conn.service.as_ref().filter(|s| alive(s)).and(conn.pid)
    }

    /// Bumped each time the tool list changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The tool list as last fetched (empty before the first connection).
    pub fn cached_tools(&self) -> Arc<Vec<ServerTool>> {
        self.tools.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Connects if needed and returns the current tool list (fetched again after the server
    /// said it changed).
    pub async fn tools(&self) -> Result<Arc<Vec<ServerTool>>> {
        let peer = self.peer().await?;
        if self.tools_changed.swap(false, Ordering::SeqCst) {
            self.fetch_tools(&peer).await?;
        }
        Ok(self.cached_tools())
    }

    /// Calls a tool; the result is the `CallToolResult` as JSON. A timeout or a cancellation
    /// abandons the request (the server is told it was cancelled).
    pub async fn call(&self, tool: &str, arguments: Value, cancel: &CancellationToken) -> Result<Value> {
        let peer = self.peer().await?;
        let mut params = CallToolRequestParams::new(tool.to_owned());
        match arguments {
            Value::Object(map) => params = params.with_arguments(map),
            Value::Null => {}
            other => {
                return Err(McpError::Request {
                    server: self.name.clone(),
                    message: format!("tool arguments must be a JSON object, got {other}"),
                });
            }
        }
        let timeout = self.config.call_timeout();
        let result = tokio::select! {
            r = tokio::time::timeout(timeout, peer.call_tool(params)) => r,
            _ = cancel.cancelled() => {
                return Err(McpError::Request { server: self.name.clone(), message: "the call was cancelled".into() });
            }
        };
        match result {
            Err(_) => Err(McpError::Timeout { server: self.name.clone(), secs: timeout.as_secs() }),
            Ok(Ok(r)) => {
                self.conn.lock().await.failures = 0;
                serde_json::to_value(&r)
                    .map_err(|e| McpError::Request { server: self.name.clone(), message: e.to_string() })
            }
            Ok(Err(e)) => Err(self.request_error(e, &peer).await),
        }
    }

    /// Stops the server (a stdio server's process is killed).
    pub async fn shutdown(&self) {
        let mut conn = self.conn.lock().await;
        if let Some(mut s) = conn.service.take() {
            let _ = s.close_with_timeout(Duration::from_secs(2)).await;
        }
    }

    /// Maps a failed request; a closed connection counts as a crash (restarted on next use).
    async fn request_error(&self, e: ServiceError, peer: &Peer<RoleClient>) -> McpError {
        let closed =
            matches!(e, ServiceError::TransportClosed | ServiceError::TransportSend(_)) || peer.is_transport_closed();
        if !closed {
            return McpError::Request { server: self.name.clone(), message: e.to_string() };
        }
        let mut conn = self.conn.lock().await;
        let message = format!("the connection closed during the call (the server crashed?){}", self.stderr_tail());
        self.record_failure(&mut conn, message.clone());
        conn.service = None;
        McpError::Request { server: self.name.clone(), message: format!("{message}; it is restarted on the next call") }
    }

    fn record_failure(&self, conn: &mut Conn, message: String) {
        conn.failures += 1;
        conn.last_error = Some(message);
        let delay = if conn.failures <= FREE_RESTARTS {
            Duration::ZERO
        } else {
            let exp = (conn.failures - FREE_RESTARTS - 1).min(10);
            (Duration::from_millis(500) * 2u32.pow(exp)).min(MAX_BACKOFF)
        };
        conn.retry_at = Some(Instant::now() + delay);
    }

    /// The live connection's peer, (re)starting the server if needed.
    async fn peer(&self) -> Result<Peer<RoleClient>> {
        let mut conn = self.conn.lock().await;
        if let Some(s) = &conn.service {
            if alive(s) {
                return Ok(s.peer().clone());
            }
            // It died between calls.
            let message = format!("the server exited{}", self.stderr_tail());
            self.record_failure(&mut conn, message);
            conn.service = None;
        }
        if let Some(at) = conn.retry_at {
            let now = Instant::now();
            if at > now {
                return Err(McpError::Backoff {
                    server: self.name.clone(),
                    failures: conn.failures,
                    last: conn.last_error.clone().unwrap_or_default(),
                    retry_in_ms: (at - now).as_millis() as u64,
                });
            }
        }
        match self.start().await {
            Ok((service, pid)) => {
                let peer = service.peer().clone();
                conn.service = Some(service);
                conn.pid = pid;
                conn.retry_at = None;
                conn.started_ok = true;
                drop(conn);
                self.tools_changed.store(false, Ordering::SeqCst);
                if let Err(e) = self.fetch_tools(&peer).await {
                    let mut conn = self.conn.lock().await;
                    self.record_failure(&mut conn, e.to_string());
                    return Err(e);
                }
                Ok(peer)
            }
            Err(e) => {
                self.record_failure(&mut conn, e.to_string());
                Err(e)
            }
        }
    }

    async fn fetch_tools(&self, peer: &Peer<RoleClient>) -> Result<()> {
        let timeout = self.config.call_timeout();
        let listed = tokio::time::timeout(timeout, peer.list_all_tools())
            .await
            .map_err(|_| McpError::Timeout { server: self.name.clone(), secs: timeout.as_secs() })?
            .map_err(|e| McpError::Request { server: self.name.clone(), message: format!("tools/list: {e}") })?;
        let tools: Vec<ServerTool> = listed
            .into_iter()
            .map(|t| {
                let ann = t.annotations.as_ref();
                ServerTool {
                    name: t.name.to_string(),
                    description: t.description.as_deref().or(t.title.as_deref()).unwrap_or_default().to_owned(),
                    input_schema: Value::Object((*t.input_schema).clone()),
                    read_only: ann.and_then(|a| a.read_only_hint).unwrap_or(false),
                    idempotent: ann.and_then(|a| a.idempotent_hint).unwrap_or(false),
                }
            })
            .collect();
        if let Ok(mut current) = self.tools.lock()
            && **current != tools
        {
            *current = Arc::new(tools);
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Starts the server and runs `initialize`, within the startup timeout.
    async fn start(&self) -> Result<(RunningService<RoleClient, Handler>, Option<u32>)> {
        self.config.check(&self.name)?;
        let handler = Handler { tools_changed: self.tools_changed.clone() };
        let secs = self.config.startup_timeout().as_secs();
        let start_error = |message: String| McpError::Start { server: self.name.clone(), message };
        if let Some(url) = &self.config.url {
            // reqwest is built without a default TLS crypto provider (as in descartes-providers).
            if rustls::crypto::CryptoProvider::get_default().is_none() {
                let _ = rustls::crypto::ring::default_provider().install_default();
            }
            use rmcp::transport::StreamableHttpClientTransport;
            use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
            let mut config = StreamableHttpClientTransportConfig::with_uri(url.clone());
            if let Some(var) = &self.config.bearer_token_env {
                let token = (self.env)(var).filter(|t| !t.is_empty()).ok_or_else(|| McpError::Config {
                    server: self.name.clone(),
                    message: format!("needs a bearer token: set {var}"),
                })?;
                config = config.auth_header(token);
            }
            let mut headers = std::collections::HashMap::new();
            for (k, v) in &self.config.headers {
                let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| start_error(format!("`{k}` is not a valid header name")))?;
                let value = reqwest::header::HeaderValue::from_str(v)
                    .map_err(|_| start_error(format!("the value of header `{k}` is not valid")))?;
                headers.insert(name, value);
            }
            config = config.custom_headers(headers);
            let transport = StreamableHttpClientTransport::from_config(config);
            let service = tokio::time::timeout(self.config.startup_timeout(), handler.serve(transport))
                .await
                .map_err(|_| McpError::InitTimeout {
                    server: self.name.clone(),
                    secs,
                    transport: "streamable HTTP",
                    stderr: String::new(),
                })?
                .map_err(|e| start_error(format!("{url}: {e}")))?;
            return Ok((service, None));
        }
        let program = self.config.command.clone().unwrap_or_default();
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&self.config.args).envs(&self.config.env).kill_on_drop(true);
        if let Some(cwd) = self.config.cwd.as_ref().or(self.default_cwd.as_ref()) {
            cmd.current_dir(cwd);
        }
        let (transport, stderr) = rmcp::transport::TokioChildProcess::builder(cmd)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| start_error(format!("`{program}`: {e}")))?;
        let pid = transport.id();
        if let Ok(mut tail) = self.stderr.lock() {
            tail.clear();
        }
        if let Some(mut stderr) = stderr {
            let tail = self.stderr.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = stderr.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut t) = tail.lock() {
                        t.extend(&buf[..n]);
                        let excess = t.len().saturating_sub(STDERR_TAIL);
                        t.drain(..excess);
                    }
                }
            });
        }
        let service = match tokio::time::timeout(self.config.startup_timeout(), handler.serve(transport)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(start_error(format!("`{program}`: {e}{}", self.stderr_tail()))),
            Err(_) => {
                return Err(McpError::InitTimeout {
                    server: self.name.clone(),
                    secs,
                    transport: "stdin/stdout",
                    stderr: self.stderr_tail(),
                });
            }
        };
        Ok((service, pid))
    }

    /// The end of the server's stderr, as `; stderr: ...` (empty when there is none).
    fn stderr_tail(&self) -> String {
        let Ok(tail) = self.stderr.lock() else { return String::new() };
        let bytes: Vec<u8> = tail.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let text = text.trim();
        if text.is_empty() {
            return String::new();
        }
        let last: Vec<&str> = text.lines().rev().take(5).collect();
        let last: Vec<&str> = last.into_iter().rev().collect();
        format!("; stderr: {}", last.join(" | "))
    }
}
