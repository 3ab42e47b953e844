//! Coding-agent CLIs as Descartes backends.
//!
//! Each backend implements [`descartes_core::AgentCli`]: it spawns the CLI as a child process
//! (tokio, `kill_on_drop`, stdin piped, stderr kept for errors), turns its NDJSON output into
//! normalized [`descartes_core::CliEvent`]s and, where the CLI supports it, writes Descartes'
//! answers to its permission requests back on stdin. [`descartes_core::ExternalAgent`] records
//! the events and applies the policy.
//!
//! | backend | command | permissions |
//! |---|---|---|
//! | `claude-code` (`headless`) | `claude -p --verbose --output-format stream-json --input-format stream-json --include-partial-messages --permission-prompt-tool stdio` | every ask answered by Descartes (`can_use_tool`) |
//! | `codex` | `codex app-server` (JSON-RPC: `thread/start` with `approvalPolicy: untrusted`, sandbox `read-only`, `-y` → `workspace-write`) | every command and patch answered by Descartes (`item/commandExecution/requestApproval`, `item/fileChange/requestApproval`) |
//! | `gemini-cli` | `gemini --acp --admin-policy ASK_ALL --policy ASK_ALL [-m M]` (Agent Client Protocol: `session/new`, `session/prompt`) | every tool call answered by Descartes (`session/request_permission`; the policy file makes Gemini CLI ask for all, read-only tools and "safe" commands included) |
//! | `command` | any program; `{prompt}` in its arguments or the prompt on stdin | none (stdout is the answer) |
//!
//! Every CLI inherits Descartes' environment (`ANTHROPIC_BASE_URL`, `OPENAI_API_KEY`, ...)
//! plus [`CliOptions::env`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use descartes_core::AgentCli;
use serde_json::Value;

pub mod claude;
pub mod codex;
pub mod command;
pub mod gemini;
pub mod process;
pub mod rpc;
pub mod session;

pub use claude::ClaudeCode;
pub use codex::Codex;
pub use command::CommandCli;
pub use gemini::GeminiCli;

/// Settings shared by the CLI backends.
#[derive(Debug, Clone)]
pub struct CliOptions {
    /// The binary; `None` looks up the CLI's usual name (`claude`, `codex`, `gemini`) on `PATH`.
    pub program: Option<PathBuf>,
    /// Variables added to the CLI's environment (it inherits Descartes' own, unless
    /// `clear_env`).
    pub env: Vec<(OsString, OsString)>,
    /// The CLI gets only `env`, none of Descartes' own environment (the runtime builds `env`
    /// with the environment policy: no secret but the CLI's own).
    pub clear_env: bool,
    /// Arguments appended to the CLI's command line.
    pub extra_args: Vec<String>,
    /// After SIGINT, how long the CLI may take to exit before SIGKILL.
    pub kill_grace: Duration,
    /// A program the CLI is started through, with its arguments (the CLI's path and arguments
    /// follow): the sandbox helper, which hides Descartes' tokens from the CLI and its tools
    /// and makes the CLI die with Descartes.
    pub wrapper: Option<(PathBuf, Vec<OsString>)>,
}

impl Default for CliOptions {
    fn default() -> Self {
        Self {
            program: None,
            env: Vec::new(),
            clear_env: false,
            extra_args: Vec::new(),
            kill_grace: Duration::from_secs(5),
            wrapper: None,
        }
    }
}

impl CliOptions {
    pub fn program_or(&self, default: &str) -> PathBuf {
        self.program.clone().unwrap_or_else(|| PathBuf::from(default))
    }

    /// How to start `program` for the `backend` with `args` in `cwd`, with these options'
    /// environment and kill grace; nothing on stdin.
    pub(crate) fn spawn(
        &self,
        backend: &str,
        program: PathBuf,
        args: Vec<String>,
        cwd: &std::path::Path,
        install_hint: String,
    ) -> process::Spawn {
        process::Spawn {
            backend: backend.to_owned(),
            program,
            args: args.into_iter().map(Into::into).collect(),
            env: self.env.clone(),
            clear_env: self.clear_env,
            cwd: cwd.to_owned(),
            stdin: None,
            keep_stdin: false,
            install_hint,
            kill_grace: self.kill_grace,
            wrapper: self.wrapper.clone(),
        }
    }

    /// Adds an environment variable for the CLI.
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// The backend names users select (`-p NAME`), aliases included.
pub const BACKENDS: &[&str] = &["claude-code", "headless", "codex", "gemini-cli"];

/// The CLI backend called `name` (`claude-code` or its alias `headless`, `codex`,
/// `gemini-cli`), or `None`. The `command` backend needs a command line: [`CommandCli::new`].
pub fn backend(name: &str, options: CliOptions) -> Option<Arc<dyn AgentCli>> {
    match name {
        "claude-code" | "headless" | "claude" => Some(Arc::new(ClaudeCode::new(options))),
        "codex" => Some(Arc::new(Codex::new(options))),
        "gemini-cli" | "gemini" => Some(Arc::new(GeminiCli::new(options))),
        _ => None,
    }
}

/// A JSON string value, or empty.
pub(crate) fn str_of(v: Option<&Value>) -> String {
    v.and_then(Value::as_str).unwrap_or("").to_owned()
}

/// Text of a tool result's content: a string, or an array of `{type: text, text}` blocks.
pub(crate) fn text_of(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|i| match i {
                Value::String(s) => Some(s.clone()),
                other => other.get("text").and_then(Value::as_str).map(str::to_owned),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Some(other) => other.get("text").and_then(Value::as_str).map_or_else(|| other.to_string(), str::to_owned),
    }
}

pub(crate) fn u64_of(v: Option<&Value>) -> u64 {
    v.and_then(Value::as_u64).unwrap_or(0)
}
