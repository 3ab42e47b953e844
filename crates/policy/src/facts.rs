//! What a decision is about (the facts the caller hands in) and what it decides.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::pattern::{normalize_host, normalize_path};

/// What a rule does to the inputs it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    RequireApproval,
    Deny,
}

impl Effect {
    pub const ALL: [Effect; 3] = [Effect::Allow, Effect::RequireApproval, Effect::Deny];

    /// The name written in policy files: `allow`, `require_approval`, `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "allow",
            Effect::RequireApproval => "require_approval",
            Effect::Deny => "deny",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Effect::ALL.into_iter().find(|e| e.as_str() == s)
    }

    /// deny > require_approval > allow (the tie-break between rules of equal specificity).
    pub(crate) fn severity(self) -> u8 {
        match self {
            Effect::Allow => 0,
            Effect::RequireApproval => 1,
            Effect::Deny => 2,
        }
    }

    pub(crate) fn verb(self) -> &'static str {
        match self {
            Effect::Allow => "allowed",
            Effect::RequireApproval => "requires approval",
            Effect::Deny => "denied",
        }
    }
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Where a decision is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// A worker is about to claim a task (task and agent facts, usually usage with `attempts`).
    Claim,
    /// An agent is about to call a tool (tool facts; task, agent and usage when known).
    Tool,
    /// A task's work is about to be merged (task and agent facts, usage).
    Merge,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Claim, Stage::Tool, Stage::Merge];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Claim => "claim",
            Stage::Tool => "tool",
            Stage::Merge => "merge",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Stage::ALL.into_iter().find(|e| e.as_str() == s)
    }

    pub(crate) fn bit(self) -> u8 {
        match self {
            Stage::Claim => 1,
            Stage::Tool => 2,
            Stage::Merge => 4,
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The layer a policy file belongs to; later layers override earlier ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    /// `<user config dir>/policy.yaml` (e.g. `~/.config/descartes/policy.yaml`).
    Global,
    /// `<project>/.ai/policy.yaml`.
    Project,
    /// `<project>/.ai/policies/<agent>.yaml`.
    Agent,
}

impl Layer {
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Global => "global",
            Layer::Project => "project",
            Layer::Agent => "agent",
        }
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Whether a tool call reads or writes its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Read,
    Write,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// The task a decision is about.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskFacts {
    pub id: String,
    /// The task type (`task_types` matches it; `task.type` in CEL).
    #[serde(rename = "type")]
    pub task_type: String,
    pub priority: i64,
    pub labels: Vec<String>,
    pub title: String,
}

/// The agent that acts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentFacts {
    /// The agent's name (`agents` matches it).
    pub name: String,
    pub labels: Vec<String>,
    /// The backend that runs it (`anthropic`, `claude-code`, `local`, ...).
    pub backend: String,
}

/// The tool call a decision is about (stage `tool`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolFacts {
    /// The tool's name as called: Descartes' (`shell`, `write_file`) or an agent CLI's (`Bash`,
    /// `Write`); both spellings match either in `tools`.
    pub name: String,
    /// The shell command, for a shell tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The path the call touches: relative to the project root when inside it, else absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The network host the call reaches (a URL is accepted: its host is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Whether the call reads or writes `path`; unknown is taken as write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
}

/// The shell-like tools (their `command` argument is matched by `commands`).
const SHELL_TOOLS: &[&str] = &["shell", "Bash"];
/// Tools that read their `path` (or `file_path`).
const READ_TOOLS: &[&str] = &["read_file", "list_files", "search_files", "Read", "Glob", "Grep", "LS"];
/// Tools that write their `path` (or `file_path`, `notebook_path`).
const WRITE_TOOLS: &[&str] = &["write_file", "edit_file", "apply_patch", "Write", "Edit", "MultiEdit", "NotebookEdit"];
/// Tools that reach the host of their `url`.
const HOST_TOOLS: &[&str] = &["http_request", "WebFetch"];

/// Groups of names that denote the same tool: Descartes' own name first, then the names the
/// coding-agent CLIs use for it. A `tools` pattern that matches any name of a group matches a
/// call of any of them.
pub(crate) const TOOL_ALIASES: &[&[&str]] = &[
    &["shell", "Bash"],
    &["read_file", "Read"],
    &["write_file", "Write"],
    &["edit_file", "Edit", "MultiEdit"],
    &["list_files", "LS", "Glob"],
    &["search_files", "Grep"],
    &["http_request", "WebFetch"],
];

impl ToolFacts {
    /// The facts of a call of `tool` with JSON arguments `input`, for Descartes' own tools and
    /// Claude Code's: the `command` of `shell`/`Bash`; the `path` (`file_path`,
    /// `notebook_path`) of the file tools, with read or write access by tool; the host of
    /// `url` for `http_request`/`WebFetch`. An absolute path under `root` is made relative to
    /// it. Other tools give just their name.
    pub fn from_call(tool: &str, input: &Value, root: &Path) -> Self {
        let field = |names: &[&str]| names.iter().find_map(|n| input.get(n).and_then(Value::as_str));
        let mut facts = ToolFacts { name: tool.to_owned(), ..ToolFacts::default() };
        if SHELL_TOOLS.contains(&tool) {
            facts.command = field(&["command"]).map(str::to_owned);
        } else if READ_TOOLS.contains(&tool) || WRITE_TOOLS.contains(&tool) {
            let access = if WRITE_TOOLS.contains(&tool) { Access::Write } else { Access::Read };
            facts.access = Some(access);
            facts.path = Some(match field(&["path", "file_path", "notebook_path"]) {
                Some(p) => relative_to(p, root),
                None => ".".to_owned(),
            });
        } else if HOST_TOOLS.contains(&tool) {
            facts.host = field(&["url"]).and_then(normalize_host);
        }
        facts
    }
}

/// `path` relative to `root` when it is an absolute path under it, else as given.
fn relative_to(path: &str, root: &Path) -> String {
    let p = PathBuf::from(normalize_path(path));
    if p.is_absolute()
        && let Ok(rel) = p.strip_prefix(PathBuf::from(normalize_path(&root.to_string_lossy())))
    {
        let rel = rel.to_string_lossy().into_owned();
        return if rel.is_empty() { ".".to_owned() } else { rel };
    }
    path.to_owned()
}

/// What has been used so far (checked against `budgets`; `usage` in CEL).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageFacts {
    /// Tokens used so far (input plus output).
    pub tokens: u64,
    /// Money spent so far, in US dollars.
    pub cost_usd: f64,
    /// Wall-clock time spent so far, in seconds.
    pub elapsed_secs: f64,
    /// The number of the attempt being made (1 for the first).
    pub attempts: u32,
}

/// Everything a decision may look at. Facts that do not apply are `None`: a rule whose
/// matchers (or whose `when`) need a fact the input does not have does not match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionInput {
    pub stage: Stage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskFacts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentFacts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<ToolFacts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageFacts>,
}

impl DecisionInput {
    pub fn new(stage: Stage) -> Self {
        Self { stage, task: None, agent: None, tool: None, usage: None }
    }
    pub fn with_task(mut self, task: TaskFacts) -> Self {
        self.task = Some(task);
        self
    }
    pub fn with_agent(mut self, agent: AgentFacts) -> Self {
        self.agent = Some(agent);
        self
    }
    pub fn with_tool(mut self, tool: ToolFacts) -> Self {
        self.tool = Some(tool);
        self
    }
    pub fn with_usage(mut self, usage: UsageFacts) -> Self {
        self.usage = Some(usage);
        self
    }
}

/// The outcome of [`PolicySet::evaluate`](crate::PolicySet::evaluate): the body of a Policy
/// Decision Record (the caller adds the actor and the time when it records it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyDecision {
    pub effect: Effect,
    /// The rule that decided: a rule's `id`, `budget:<name>` for an exceeded budget, or `None`
    /// when no rule matched (the default effect applied).
    pub rule_id: Option<String>,
    /// The policy file of that rule (or of the budget, or of the `default` that applied).
    pub file: Option<PathBuf>,
    /// The line of the rule (or budget field, or `default`) in that file.
    pub line: Option<usize>,
    /// The layer of that file.
    pub layer: Option<Layer>,
    /// Why, in words: the rule, what matched, and the rule's own `reason`.
    pub reason: String,
    /// The inputs the decision saw.
    pub inputs: DecisionInput,
}
