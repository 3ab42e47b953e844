//! Tasks of the control plane: the task record and its status.

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Waiting to be claimed (it may still wait for dependencies, locks or a retry backoff).
    Queued,
    /// A worker holds its lease but has not started it.
    Claimed,
    /// A worker is running it under a lease.
    Running,
    /// A dependency failed for good (or was cancelled); retrying it unblocks this task.
    Blocked,
    Done,
    /// Failed for good (attempts exhausted).
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 7] = [
        TaskStatus::Queued,
        TaskStatus::Claimed,
        TaskStatus::Running,
        TaskStatus::Blocked,
        TaskStatus::Done,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Claimed => "claimed",
            TaskStatus::Running => "running",
            TaskStatus::Blocked => "blocked",
            TaskStatus::Done => "done",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Held under a lease.
    pub fn is_leased(self) -> bool {
        matches!(self, TaskStatus::Claimed | TaskStatus::Running)
    }
}

impl std::fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A task as stored (its JSON form is what `task show --json` prints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub title: String,
    #[serde(default)]
    pub prompt: String,
    /// The task's type (free-form: `code`, `review`, `deploy`, ...).
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub labels: Vec<String>,
    pub status: TaskStatus,
    /// Ids of tasks that must be `done` first.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Path globs this task locks while it holds a lease.
    #[serde(default)]
    pub locks: Vec<String>,
    /// The worker holding the lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<Timestamp>,
    /// The fencing token of the current (or last) lease; increases monotonically across claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<i64>,
    /// Claims so far.
    #[serde(default)]
    pub attempts: u32,
    pub max_attempts: u32,
    /// Not claimable before this time (backoff between attempts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the task is blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_reason: Option<String>,
    /// The dependency whose failure blocks the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<String>,
    /// What an agent must offer to be given the task (routing).
    #[serde(default, skip_serializing_if = "Requirements::is_empty")]
    pub needs: Requirements,
    /// The registered agent the current (or last) attempt was routed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Run after an agent's attempt in the task's worktree; a failure fails the attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_command: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// What a task needs of the agent that runs it: every label and capability listed, and the
/// named agent when one is given.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Requirements {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

impl Requirements {
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.capabilities.is_empty() && self.agent.is_none()
    }
}

/// What `task create` gives.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NewTask {
    /// A chosen id (generated when absent).
    #[serde(default)]
    pub id: Option<String>,
    pub title: String,
    #[serde(default)]
    pub prompt: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub locks: Vec<String>,
    /// Defaults to 3.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Requirements::is_empty")]
    pub needs: Requirements,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_command: Option<String>,
}

/// A successful claim: the task and the fencing token every later write must carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub task: Task,
    pub token: i64,
}

/// A registered agent ("AI instance"): what runs tasks routed to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub name: String,
    /// A model provider (Descartes' own agent loop), an agent CLI (`claude-code`, `codex`,
    /// `gemini-cli`) or `command`.
    pub backend: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The shell command of a `command` agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default)]
    pub labels: Vec<String>,
    /// Declared capabilities.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Capabilities detected from the backend (tools, streaming, sandbox, cost).
    #[serde(default)]
    pub detected: Vec<String>,
    /// Most tasks it runs at once.
    pub max_concurrent: u32,
    #[serde(default)]
    pub disabled: bool,
    #[serde(default)]
    pub stats: AgentStats,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl AgentRecord {
    /// Declared and detected capabilities.
    pub fn has_capability(&self, c: &str) -> bool {
        self.capabilities.iter().chain(&self.detected).any(|x| x == c)
    }
}

/// What an agent's finished attempts tell about it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AgentStats {
    pub succeeded: u64,
    pub failed: u64,
    /// The outcomes of the last attempts (true: succeeded), oldest first, at most
    /// [`AgentStats::RECENT`].
    #[serde(default)]
    pub recent: Vec<bool>,
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Routed nothing until then (after repeated failures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_until: Option<Timestamp>,
}

impl AgentStats {
    pub const RECENT: usize = 20;

    /// Recent success rate, smoothed so an agent without history counts as 0.5..1 (Laplace):
    /// (successes + 1) / (attempts + 2).
    pub fn success_rate(&self) -> f64 {
        let ok = self.recent.iter().filter(|r| **r).count() as f64;
        (ok + 1.0) / (self.recent.len() as f64 + 2.0)
    }
}

/// An agent's status, as `ai list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    Idle,
    Busy,
    Unhealthy,
    Disabled,
}

impl AgentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Idle => "idle",
            AgentStatus::Busy => "busy",
            AgentStatus::Unhealthy => "unhealthy",
            AgentStatus::Disabled => "disabled",
        }
    }
}
