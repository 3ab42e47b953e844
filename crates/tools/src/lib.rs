//! Built-in tools of Descartes.
//!
//! Invariants: a tool never panics on bad arguments (it returns an error output the model can
//! read); tools that change things say so (`read_only() == false`) so the permission check
//! asks; `shell` keeps a spool per call so that a run killed while a command executes recovers
//! the command's result on resume instead of running it twice.

mod fs;
mod shell;

use std::sync::Arc;

use descartes_core::{ToolOutput, ToolRegistry};
use serde_json::Value;

pub use fs::{ReadFileTool, WriteFileTool};
pub use shell::ShellTool;

/// Limits for the built-in tools.
#[derive(Debug, Clone)]
pub struct ToolLimits {
    /// Default `shell` timeout when the call does not name one.
    pub shell_timeout: std::time::Duration,
    /// Most bytes of one stream (stdout, stderr, a file) given back to the model.
    pub max_output_bytes: usize,
}

impl Default for ToolLimits {
    fn default() -> Self {
        Self { shell_timeout: std::time::Duration::from_secs(120), max_output_bytes: 64 * 1024 }
    }
}

/// The built-in tools: `shell`, `read_file`, `write_file`.
pub fn builtin_registry(limits: &ToolLimits) -> ToolRegistry {
    let mut r = ToolRegistry::new();
    r.register(Arc::new(ShellTool::new(limits.shell_timeout, limits.max_output_bytes)));
    r.register(Arc::new(ReadFileTool { max_bytes: limits.max_output_bytes * 4 }));
    r.register(Arc::new(WriteFileTool));
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
