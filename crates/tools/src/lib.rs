//! Built-in tools of Descartes.
//!
//! Invariants: a tool never panics on bad arguments (it returns an error output the model can
//! read); tools that change things say so (`read_only() == false`) so the permission check
//! asks; `shell` keeps a spool per call so that a run killed while a command executes recovers
//! the command's result on resume instead of running it twice.

mod confine;
mod env;
mod fs;
mod git;
mod http;
mod protect;
pub mod sandbox;
mod search;
mod shell;

use std::sync::Arc;

use descartes_core::{ToolOutput, ToolRegistry};
use serde_json::Value;

pub use confine::{ConfineError, Workspace};
pub use env::{CORE_VARS, DEFAULT_EXCLUDES, EnvInherit, EnvPolicy, ShellEnv};
pub use fs::{EditFileTool, ReadFileTool, WriteFileTool};
pub use git::{GitDiffTool, GitLogTool, GitStatusTool};
pub use http::HttpRequestTool;
pub use protect::{PROTECTED_NAMES, Protected};
pub use sandbox::{Sandbox, SandboxHelper, SandboxMode, SandboxPolicy, SandboxStatus};
pub use search::{ListFilesTool, SearchFilesTool};
pub use shell::ShellTool;

/// Limits for the built-in tools.
#[derive(Debug, Clone)]
pub struct ToolLimits {
    /// Default `shell` timeout when the call does not name one.
    pub shell_timeout: std::time::Duration,
    /// Most bytes of one stream (stdout, stderr, a file, a listing, a response body) given back
    /// to the model.
    pub max_output_bytes: usize,
    /// Workspace roots added in config: file tools may touch them besides the run's cwd.
    pub roots: Vec<std::path::PathBuf>,
    /// Default `http_request` timeout when the call does not name one.
    pub http_timeout: std::time::Duration,
    /// Paths no tool may write (Descartes' state, config, policy, git control files).
    pub protected: Protected,
}

impl Default for ToolLimits {
    fn default() -> Self {
        Self {
            shell_timeout: std::time::Duration::from_secs(120),
            max_output_bytes: 64 * 1024,
            roots: Vec::new(),
            http_timeout: std::time::Duration::from_secs(30),
            protected: Protected::none(),
        }
    }
}

/// The built-in tools with the default sandbox (`workspace-write`, no network).
pub fn builtin_registry(limits: &ToolLimits) -> ToolRegistry {
    builtin_registry_with_sandbox(limits, Arc::new(Sandbox::new(SandboxPolicy::default())))
}

/// The built-in tools: `shell` (under `sandbox`; build it once per process: it remembers that
/// it gave its notice, see [`sandbox`]), `read_file`, `write_file`, `edit_file`, `list_files`,
/// `search_files`, `git_status`, `git_diff`, `git_log`, `http_request` (left out, with a
/// warning, if no HTTP client can be built).
pub fn builtin_registry_with_sandbox(limits: &ToolLimits, sandbox: Arc<Sandbox>) -> ToolRegistry {
    let ws = Workspace::new(limits.roots.clone()).protecting(limits.protected.clone());
    let max = limits.max_output_bytes;
    let mut r = ToolRegistry::new();
    r.register(Arc::new(ShellTool::with_sandbox(limits.shell_timeout, max, sandbox)));
    r.register(Arc::new(ReadFileTool { max_bytes: max * 4, workspace: ws.clone() }));
    r.register(Arc::new(WriteFileTool { workspace: ws.clone() }));
    r.register(Arc::new(EditFileTool { workspace: ws.clone() }));
    r.register(Arc::new(ListFilesTool { max_bytes: max, workspace: ws.clone() }));
    r.register(Arc::new(SearchFilesTool { max_bytes: max, workspace: ws.clone() }));
    r.register(Arc::new(GitStatusTool { max_bytes: max, workspace: ws.clone() }));
    r.register(Arc::new(GitDiffTool { max_bytes: max, workspace: ws.clone() }));
    r.register(Arc::new(GitLogTool { max_bytes: max, workspace: ws }));
    match HttpRequestTool::new(max, limits.http_timeout) {
        Ok(t) => r.register(Arc::new(t)),
        Err(e) => tracing::warn!("http_request is unavailable: {e}"),
    }
    r
}

/// A required string argument, or an error output naming it.
pub(crate) fn str_arg(input: &Value, name: &str) -> Result<String, ToolOutput> {
    match input.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(ToolOutput::error(format!("argument `{name}` must be a string, got {other}"))),
        None => Err(ToolOutput::error(format!("missing required argument `{name}`"))),
    }
}

/// Cuts `bytes` to at most `max` bytes, keeping the head and the tail, as text.
pub(crate) fn clip(bytes: &[u8], max: usize) -> (String, bool) {
    if bytes.len() <= max {
        return (String::from_utf8_lossy(bytes).into_owned(), false);
    }
    let half = max / 2;
    let head = String::from_utf8_lossy(&bytes[..half]);
    let tail = String::from_utf8_lossy(&bytes[bytes.len() - half..]);
    (format!("{head}\n[… {} bytes omitted …]\n{tail}", bytes.len() - 2 * half), true)
}
