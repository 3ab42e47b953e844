//! The MCP client of Descartes: the tools of MCP servers (stdio child processes and streamable
//! HTTP) offered to models as Descartes [`Tool`](descartes_core::Tool)s, through the official
//! Rust SDK (`rmcp`).
//!
//! - [`McpManager`]: the configured servers, shared (`Arc`) by every tool it hands out. Each
//!   server is connected lazily or by [`McpManager::connect_all`], restarted on the next call
//!   after it crashed (with backoff), and keeps its tool list current when the server sends
//!   `notifications/tools/list_changed`.
//! - [`McpTool`]: one server tool, named `mcp__<server>__<tool>` for models (see
//!   [`model_tool_name`]). It resolves its tool by name at each call, so a list change is seen
//!   by the next call.
//!
//! Invariants: no printing; header values, environment values and bearer tokens never appear
//! in errors, `Debug` or tool output.

pub mod config;
mod names;
mod output;
mod server;
mod tool;

pub use config::{McpConfig, ServerConfig, add_server_to_toml, remove_server_from_toml};
pub use names::{model_tool_name, sanitize};
pub use output::render_result;
pub use server::{McpServer, ServerTool};
pub use tool::{EnvFn, McpManager, McpTool, ServerStatus};

/// Errors of the MCP client.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// The server's configuration is wrong. Not retryable: fix the config.
    #[error("MCP server `{server}` {message}")]
    Config { server: String, message: String },
    /// A config file cannot be edited (it is not valid TOML). Not retryable.
    #[error("cannot edit the config: {message}")]
    ConfigEdit { message: String },
    /// The server could not be started or reached. Retryable (the next call tries again).
    #[error("MCP server `{server}` cannot be started: {message}")]
    Start { server: String, message: String },
    /// The server did not answer `initialize` in time. Retryable.
    #[error(
        "MCP server `{server}` did not answer `initialize` within {secs} s; check that it speaks MCP on \
         {transport} (or raise mcp.servers.{server}.startup_timeout_secs){stderr}"
    )]
    InitTimeout { server: String, secs: u64, transport: &'static str, stderr: String },
    /// The server failed repeatedly and is resting before the next restart. Retryable later.
    #[error(
        "MCP server `{server}` keeps failing ({failures} times in a row; last: {last}); next restart in {retry_in_ms} ms"
    )]
    Backoff { server: String, failures: u32, last: String, retry_in_ms: u64 },
    /// A request failed (the connection closed, the server answered with an error). Retryable.
    #[error("MCP server `{server}`: {message}")]
    Request { server: String, message: String },
    /// A request took longer than its timeout. Retryable.
    #[error("MCP server `{server}` did not answer within {secs} s")]
    Timeout { server: String, secs: u64 },
    /// No server of that name is configured. Not retryable.
    #[error("no MCP server named `{0}`; `descartes mcp list` shows them")]
    UnknownServer(String),
}

impl From<toml_edit::ser::Error> for McpError {
    fn from(e: toml_edit::ser::Error) -> Self {
        McpError::ConfigEdit { message: e.to_string() }
    }
}

pub type Result<T, E = McpError> = std::result::Result<T, E>;
