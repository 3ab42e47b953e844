//! The configured servers as a whole, and their tools as Descartes tools.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use descartes_core::tool::ToolSource;
use descartes_core::{Tool, ToolContext, ToolOutput, ToolRegistry};
use descartes_protocol::ToolSpec;
use serde_json::{Value, json};

use crate::server::{McpServer, ServerTool};
use crate::{McpConfig, McpError, Result, model_tool_name, render_result};

/// Reads an environment variable.
pub type EnvFn = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The configured MCP servers. Cheap to clone (shared); every [`McpTool`] holds its server.
#[derive(Clone, Debug, Default)]
pub struct McpManager {
    servers: Vec<Arc<McpServer>>,
    max_output_bytes: usize,
}

/// What `descartes mcp list` shows of a server.
#[derive(Debug, Clone)]
pub struct ServerStatus {
    pub name: String,
    /// `stdio: cmd args` or `http: url`.
    pub target: String,
    pub enabled: bool,
    /// Its tools, or why they could not be listed.
    pub tools: std::result::Result<Arc<Vec<ServerTool>>, String>,
}

impl McpManager {
    /// The enabled and disabled servers of a config (none is started yet). `cwd` is the
    /// working directory of stdio servers that name none; tool outputs are clipped to
    /// `max_output_bytes`.
    pub fn new(config: &McpConfig, env: EnvFn, cwd: Option<PathBuf>, max_output_bytes: usize) -> Self {
        let servers = config
            .servers
            .iter()
            .map(|(name, c)| Arc::new(McpServer::new(name.clone(), c.clone(), env.clone(), cwd.clone())))
            .collect();
        Self { servers, max_output_bytes: max_output_bytes.max(1024) }
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    pub fn servers(&self) -> &[Arc<McpServer>] {
        &self.servers
    }

    pub fn server(&self, name: &str) -> Result<&Arc<McpServer>> {
        self.servers.iter().find(|s| s.name() == name).ok_or_else(|| McpError::UnknownServer(name.to_owned()))
    }

    /// Connects every enabled server at once and lists its tools.
    pub async fn status(&self) -> Vec<ServerStatus> {
        let futures = self.servers.iter().map(|s| async move {
            let enabled = s.config().enabled();
            let tools = if enabled { s.tools().await.map_err(|e| e.to_string()) } else { Ok(Arc::new(Vec::new())) };
            ServerStatus { name: s.name().to_owned(), target: s.config().describe(), enabled, tools }
        });
        futures::future::join_all(futures).await
    }

    /// The tools of every enabled server, connecting each (in parallel). Servers that fail are
    /// returned as errors beside the tools of the others.
    pub async fn tools(&self) -> (Vec<McpTool>, Vec<McpError>) {
        let mut tools = Vec::new();
        let mut errors = Vec::new();
        let enabled: Vec<_> = self.servers.iter().filter(|s| s.config().enabled()).collect();
        let listed = futures::future::join_all(enabled.iter().map(|s| s.tools())).await;
        for (server, listed) in enabled.into_iter().zip(listed) {
            match listed {
                Ok(list) => tools.extend(list.iter().map(|t| McpTool::new(server.clone(), t, self.max_output_bytes))),
                Err(e) => errors.push(e),
            }
        }
        (tools, errors)
    }

    /// Adds every enabled server to `registry` as a tool source (connecting them in parallel),
    /// so a server's `tools/list_changed` reaches the run at its next model call. Returns the
    /// errors of servers that could not list their tools (kept: a later refresh may succeed).
    pub async fn register(&self, registry: &ToolRegistry) -> Vec<McpError> {
        let enabled: Vec<_> = self.servers.iter().filter(|s| s.config().enabled()).collect();
        // Connect in parallel first; adding the sources then finds the lists cached.
        let listed = futures::future::join_all(enabled.iter().map(|s| s.tools())).await;
        let mut errors = Vec::new();
        for (server, listed) in enabled.into_iter().zip(listed) {
            let source = Arc::new(ServerSource { server: server.clone(), max_output_bytes: self.max_output_bytes });
            match listed {
                Ok(_) => {
                    let _ = registry.add_source(source).await;
                }
                Err(e) => {
                    errors.push(e);
                }
            }
        }
        errors
    }

    /// The sum of the servers' tool-list generations: changes whenever any list changes.
    pub fn generation(&self) -> u64 {
        self.servers.iter().map(|s| s.generation()).sum()
    }

    /// Stops every server.
    pub async fn shutdown(&self) {
        futures::future::join_all(self.servers.iter().map(|s| s.shutdown())).await;
    }
}

/// One server's tools as a [`ToolSource`] of a registry.
struct ServerSource {
    server: Arc<McpServer>,
    max_output_bytes: usize,
}

#[async_trait]
impl ToolSource for ServerSource {
    fn describe(&self) -> String {
        format!("MCP server `{}`", self.server.name())
    }

    fn generation(&self) -> u64 {
        self.server.generation()
    }

    async fn tools(&self) -> std::result::Result<Vec<Arc<dyn Tool>>, String> {
        let list = self.server.tools().await.map_err(|e| e.to_string())?;
        Ok(list
            .iter()
            .map(|t| Arc::new(McpTool::new(self.server.clone(), t, self.max_output_bytes)) as Arc<dyn Tool>)
            .collect())
    }
}

/// One tool of an MCP server, as a Descartes tool named `mcp__<server>__<tool>`.
///
/// The spec is the one the server gave when the tool was registered; each call looks the tool up
/// in the server's current list (refreshed after `tools/list_changed`), so a tool the server
/// withdrew gives a clear error instead of a confusing call.
pub struct McpTool {
    server: Arc<McpServer>,
    tool: ServerTool,
    model_name: String,
    max_output_bytes: usize,
}

impl std::fmt::Debug for McpTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpTool").field("name", &self.model_name).finish()
    }
}

impl McpTool {
    pub fn new(server: Arc<McpServer>, tool: &ServerTool, max_output_bytes: usize) -> Self {
        let model_name = model_tool_name(server.name(), &tool.name);
        Self { server, tool: tool.clone(), model_name, max_output_bytes }
    }

    /// The server's name for the tool.
    pub fn server_tool_name(&self) -> &str {
        &self.tool.name
    }
}

#[async_trait]
impl Tool for McpTool {
    fn spec(&self) -> ToolSpec {
        let mut schema = self.tool.input_schema.clone();
        if let Some(obj) = schema.as_object_mut() {
            obj.entry("type").or_insert_with(|| json!("object"));
        }
        ToolSpec {
            name: self.model_name.clone(),
            description: format!("{} (MCP server `{}`)", self.tool.description, self.server.name()).trim().to_owned(),
            input_schema: schema,
        }
    }

    fn read_only(&self) -> bool {
        self.tool.read_only
    }

    fn idempotent(&self) -> bool {
        self.tool.idempotent
    }

    async fn call(&self, input: Value, ctx: &ToolContext) -> ToolOutput {
        let details = || json!({ "mcp_server": self.server.name(), "mcp_tool": self.tool.name });
        match self.server.tools().await {
            Ok(list) if !list.iter().any(|t| t.name == self.tool.name) => {
                return ToolOutput::error(format!(
                    "MCP server `{}` no longer offers the tool `{}`",
                    self.server.name(),
                    self.tool.name
                ))
                .with_details(details());
            }
            Ok(_) => {}
            Err(e) => return ToolOutput::error(e.to_string()).with_details(details()),
        }
        match self.server.call(&self.tool.name, input, &ctx.cancel).await {
            Ok(result) => {
                let mut out = render_result(&result, self.max_output_bytes);
                if let Some(Value::Object(d)) = &mut out.details {
                    d.insert("mcp_server".into(), json!(self.server.name()));
                    d.insert("mcp_tool".into(), json!(self.tool.name));
                }
                out
            }
            Err(e) => ToolOutput::error(e.to_string()).with_details(details()),
        }
    }
}
