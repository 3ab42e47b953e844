//! The tool trait and registry.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use descartes_protocol::{RunId, ToolSpec};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Everything a tool call may use besides its arguments.
#[derive(Debug, Clone)]
pub struct ToolContext {
    /// Working directory of the run.
    pub cwd: PathBuf,
    pub run_id: RunId,
    /// The model's id for this call.
    pub call_id: String,
    /// A directory private to this call where a tool keeps what it needs to recover after a
    /// crash (see [`Tool::recover`]). Not created in advance.
    pub spool_dir: PathBuf,
    /// Cancelled when the user stops the run: tools stop their work (kill children) promptly.
    pub cancel: CancellationToken,
}

/// The result of a tool call, as the model will see it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    pub content: String,
    pub is_error: bool,
    /// Structured details recorded in the event (exit code, truncation, ...).
    pub details: Option<Value>,
}

impl ToolOutput {
    pub fn ok(content: impl Into<String>) -> Self {
        Self { content: content.into(), is_error: false, details: None }
    }
    pub fn error(content: impl Into<String>) -> Self {
        Self { content: content.into(), is_error: true, details: None }
    }
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }
}

/// A tool a model can call.
#[async_trait]
pub trait Tool: Send + Sync {
    fn spec(&self) -> ToolSpec;

    /// Read-only tools change nothing and are allowed without asking.
    fn read_only(&self) -> bool;

    /// Running the call twice is harmless: on resume an interrupted call is simply run again.
    fn idempotent(&self) -> bool;

    /// Runs the call. Failures the model should see are `ToolOutput::error`, never a panic.
    async fn call(&self, input: Value, ctx: &ToolContext) -> ToolOutput;

    /// On resume, for a non-idempotent call whose intent is logged without a result: what the
    /// tool can tell about it (for example from files it kept in `ctx.spool_dir`). The default
    /// is [`Recovery::Unknown`]: the call is not run again and the model is told.
    async fn recover(&self, _input: &Value, _ctx: &ToolContext) -> Recovery {
        Recovery::Unknown
    }
}

/// What a tool knows about an interrupted call.
#[derive(Debug, Clone, PartialEq)]
pub enum Recovery {
    /// The call never started: it is safe to run it.
    NotStarted,
    /// The call ran; here is its result.
    Completed(ToolOutput),
    /// The tool cannot tell. The call is not run again; the model is told.
    Unknown,
}

/// The tools offered to a run, by name.
#[derive(Clone, Default)]
pub struct ToolRegistry {
    tools: BTreeMap<String, Arc<dyn Tool>>,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.tools.keys()).finish()
    }
}

impl ToolRegistry {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn register(&mut self, tool: Arc<dyn Tool>) {
        self.tools.insert(tool.spec().name, tool);
    }
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.tools.get(name)
    }
    pub fn names(&self) -> Vec<String> {
        self.tools.keys().cloned().collect()
    }
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools.values().map(|t| t.spec()).collect()
    }
}
