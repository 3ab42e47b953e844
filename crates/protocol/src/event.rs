//! The event envelope and the typed payload of every event type.
//!
//! In storage and on the wire an event is a flat JSON object:
//! `{"seq":1,"id":"…","run_id":"…","type":"run_started","v":1,"at":"2026-…Z","data":{…}}`.
//! Unknown event types (written by a newer Descartes) are preserved as [`EventData::Unknown`].

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::{EventId, Message, Role, RunId, Seq, Timestamp, Usage};

/// Schema version written with every event of this build.
pub const EVENT_VERSION: u16 = 1;

/// An event as stored in the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub seq: Seq,
    pub id: EventId,
    pub run_id: RunId,
    pub at: Timestamp,
    pub v: u16,
    pub data: EventData,
}

impl Event {
    pub fn kind(&self) -> &str {
        self.data.kind()
    }
}

/// An event before it is appended: the log assigns `seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub id: EventId,
    pub run_id: RunId,
    pub at: Timestamp,
    /// Optional idempotency key: appending an event whose key is already in the log appends
    /// nothing and returns the stored event instead.
    pub key: Option<String>,
    pub data: EventData,
}

impl NewEvent {
    pub fn new(run_id: &RunId, data: impl Into<EventData>) -> Self {
        Self { id: EventId::generate(), run_id: run_id.clone(), at: Timestamp::now(), key: None, data: data.into() }
    }
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
}

macro_rules! event_types {
    ($($(#[$doc:meta])* $variant:ident = $name:literal),* $(,)?) => {
        /// The typed payload of an event. The variant decides the event's `type`.
        #[derive(Debug, Clone, PartialEq)]
        pub enum EventData {
            $($(#[$doc])* $variant($variant),)*
            /// An event type this build does not know; kept verbatim.
            Unknown { kind: String, data: Value },
        }

        impl EventData {
            /// All event type names this build knows.
            pub const KINDS: &'static [&'static str] = &[$($name),*];

            /// The event's `type` string.
            pub fn kind(&self) -> &str {
                match self {
                    $(Self::$variant(_) => $name,)*
                    Self::Unknown { kind, .. } => kind,
                }
            }

            /// The payload as a JSON string (the `data` column).
            pub fn to_json(&self) -> serde_json::Result<String> {
                match self {
                    $(Self::$variant(p) => serde_json::to_string(p),)*
                    Self::Unknown { data, .. } => serde_json::to_string(data),
                }
            }

            /// Rebuilds a payload from its `type` and `data` JSON.
            pub fn from_parts(kind: &str, data: &str) -> serde_json::Result<Self> {
                match kind {
                    $($name => Ok(Self::$variant(serde_json::from_str(data)?)),)*
                    other => Ok(Self::Unknown { kind: other.to_owned(), data: serde_json::from_str(data)? }),
                }
            }
        }

        impl Serialize for EventData {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self {
                    $(Self::$variant(p) => p.serialize(s),)*
                    Self::Unknown { data, .. } => data.serialize(s),
                }
            }
        }

        $(impl From<$variant> for EventData {
            fn from(p: $variant) -> Self { Self::$variant(p) }
        })*
    };
}

event_types! {
    /// A goal was given to an agent.
    RunStarted = "run_started",
    /// A run was resumed after it stopped (crash, cancel, failure).
    RunResumed = "run_resumed",
    /// A conversation message (user, assistant or system).
    MessageAdded = "message",
    /// A model call is about to be made (intent).
    ModelCallStarted = "model_call_started",
    /// A model call finished; its assistant message follows as a `message` event.
    ModelCallCompleted = "model_call_completed",
    /// A model call failed.
    ModelCallFailed = "model_call_failed",
    /// A tool call is about to be executed (intent).
    ToolCallStarted = "tool_call_started",
    /// A tool call finished (or was refused); its output goes back to the model.
    ToolCallCompleted = "tool_call_completed",
    /// An allow/deny decision for a sensitive action, with the rule that decided it.
    PermissionDecided = "permission_decided",
    /// A tool call waits for a human's answer given through the API (`allow`,
    /// `allow_for_run`, `deny`) until `expires_at`; its `permission_decided` follows.
    PermissionAsked = "permission_asked",
    /// A run was requested with an idempotency key (stream `request:<digest of the key>`): a
    /// retried request with the same key gets this run.
    RunRequested = "run_requested",
    /// The run finished with an answer.
    RunCompleted = "run_completed",
    /// The run stopped on an error; it can be resumed.
    RunFailed = "run_failed",
    /// The run was stopped by the user (SIGINT/SIGTERM); it can be resumed.
    RunCancelled = "run_cancelled",
    /// The run waits for a provider's rate limit to reset; it continues at `until`.
    RunParked = "run_parked",
    /// The run stopped before a model call that would cross its token or cost cap; it can be
    /// resumed with a higher cap.
    BudgetExceeded = "budget_exceeded",
    /// The run continues on another provider of its fallback chain.
    ProviderSwitched = "provider_switched",
    /// An agent CLI backend (Claude Code, Codex, Gemini CLI) reported its own session id; a
    /// resume continues that session.
    BackendSession = "backend_session",
    /// A task was created (its stream id is the task id).
    TaskCreated = "task_created",
    /// A dependency was added to a task.
    TaskDependencyAdded = "task_dependency_added",
    /// A worker claimed a task; `token` is the fencing token of the lease.
    TaskClaimed = "task_claimed",
    /// The worker started the task.
    TaskStarted = "task_started",
    TaskCompleted = "task_completed",
    /// An attempt failed; the task is queued again (with backoff) or failed for good.
    TaskFailed = "task_failed",
    /// A lease ran out without a heartbeat; the task is queued again or failed for good.
    TaskLeaseExpired = "task_lease_expired",
    /// The worker gave the task back (graceful shutdown); no attempt is charged.
    TaskReleased = "task_released",
    TaskCancelled = "task_cancelled",
    /// A failed, cancelled or blocked task was queued again by the user.
    TaskRetried = "task_retried",
    /// A dependency failed for good: the task cannot run until it is retried.
    TaskBlocked = "task_blocked",
    /// The blocking dependency was retried: the task is queued again.
    TaskUnblocked = "task_unblocked",
    /// A claimed attempt was routed to a registered agent (in the claim's transaction).
    TaskRouted = "task_routed",
    /// A run of Descartes' agent loop (or of an agent CLI) works on the task: its events are
    /// in the run's stream.
    TaskRunLinked = "task_run",
    /// The task's git worktree and branch for an attempt.
    TaskWorktree = "task_worktree",
    /// Evidence collected after an attempt (diff, changed files, tests, cost), stored
    /// content-addressed.
    TaskEvidence = "task_evidence",
    /// The task's branch was merged into its base branch.
    TaskMerged = "task_merged",
    /// The task's worktree and branch were removed.
    TaskDiscarded = "task_discarded",
    /// A Policy Decision Record: a decision of the policy engine that was enforced.
    PolicyDecided = "policy_decided",
    /// A human approved what a policy rule required approval for.
    TaskApproved = "task_approved",
    /// An agent was registered (stream `agent:<name>`).
    AgentRegistered = "agent_registered",
    /// An agent's registration changed (labels, enabled, statistics).
    AgentUpdated = "agent_updated",
    /// An agent was removed from the registry.
    AgentRemoved = "agent_removed",
    /// The run is an interactive session (`descartes chat`); written with its `run_started`.
    /// Each later turn records `run_resumed`, the user's message, the loop, `run_completed`.
    SessionStarted = "session_started",
    /// The conversation was compacted: its first `replaced` messages (except pinned ones) were
    /// replaced by a summary (or dropped, `method = "truncate"`). The fold applies it.
    ContextCompacted = "context_compacted",
    /// A message is kept verbatim by every later compaction.
    MessagePinned = "message_pinned",
    /// A tombstone: the session is hidden from `session list` and `search` (the log is
    /// append-only; its events stay).
    SessionDeleted = "session_deleted",
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStarted {
    /// The goal as the user typed it (without piped input).
    pub prompt: String,
    pub provider: String,
    pub model: String,
    pub cwd: String,
    pub max_turns: u32,
    #[serde(default)]
    pub auto_approve: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub tools: Vec<String>,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub version: String,
    /// Caps on tokens and cost.
    #[serde(default, skip_serializing_if = "Budget::is_unlimited")]
    pub budget: Budget,
}

/// A run's caps. A model call that would cross one is not made: the run stops with status
/// `budget_exceeded` and can be resumed with a higher cap.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Budget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
}

impl Budget {
    pub fn is_unlimited(&self) -> bool {
        self.max_tokens.is_none() && self.max_cost_usd.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResumed {
    /// Status the run had before this resume (`interrupted`, `failed`, `cancelled`).
    pub previous_status: String,
    pub provider: String,
    pub model: String,
    #[serde(default)]
    pub auto_approve: bool,
    pub max_turns: u32,
    #[serde(default)]
    pub pid: u32,
    /// Caps on tokens and cost from now on.
    #[serde(default, skip_serializing_if = "Budget::is_unlimited")]
    pub budget: Budget,
}

/// A message; serialized flat: `{"role", "content", "model_call_id"?}`.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageAdded {
    pub message: Message,
    /// The model call that produced it (assistant messages).
    pub model_call_id: Option<String>,
}

// Written by hand rather than with `#[serde(flatten)]`, which buffers every value and made
// replay several times slower.
#[derive(Serialize, Deserialize)]
struct MessageAddedRepr<M> {
    role: Role,
    content: M,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model_call_id: Option<String>,
}

impl Serialize for MessageAdded {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        MessageAddedRepr {
            role: self.message.role,
            content: &self.message.content,
            model_call_id: self.model_call_id.clone(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for MessageAdded {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = MessageAddedRepr::<Vec<crate::ContentPart>>::deserialize(d)?;
        Ok(MessageAdded { message: Message { role: r.role, content: r.content }, model_call_id: r.model_call_id })
    }
}

impl MessageAdded {
    pub fn role(&self) -> Role {
        self.message.role
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCallStarted {
    pub call_id: String,
    pub provider: String,
    pub model: String,
    /// 1-based number of this model call within the run.
    pub turn: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCallCompleted {
    pub call_id: String,
    pub usage: Usage,
    /// What the call cost, from the backend's own report or the price table (`None` when the
    /// model has no known price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCallFailed {
    pub call_id: String,
    pub error: String,
    pub retryable: bool,
    /// 1-based attempt of this call (retries make the same call again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The call is made again after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallStarted {
    /// The model's id for the call (tool_use id).
    pub call_id: String,
    pub tool: String,
    pub input: Value,
    /// Whether executing the call twice is harmless (decides what resume does with an
    /// intent that has no result).
    pub idempotent: bool,
    /// The backend that executed the call itself (an agent CLI such as `claude-code`); `None`
    /// when Descartes executed it. Such calls are records, never executed on resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executed_by: Option<String>,
    /// The call was settled without running (an unknown tool, arguments that fail its
    /// schema): only its error follows, and no permission was asked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_run: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallCompleted {
    pub call_id: String,
    pub tool: String,
    /// What the model is told.
    pub output: String,
    pub is_error: bool,
    #[serde(default)]
    pub duration_ms: u64,
    /// Structured details (exit code, truncation, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
    /// The result was recovered on resume (from the tool's own records) instead of running
    /// the call again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
}

/// How long a decision holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionScope {
    /// This one call.
    Once,
    /// Every later call of the same tool in this run.
    Run,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PermissionDecided {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    pub tool: String,
    pub decision: Decision,
    pub scope: DecisionScope,
    /// The rule that decided, e.g. `builtin:read-only`, `flag:--yes`, `user:allow-once`.
    pub rule: String,
    /// Who decided: `policy`, `user`, `flag`, `guardrail`.
    pub actor: String,
    pub reason: String,
    /// The file of the rule that decided (a config file's `[permissions]`, a policy file), when
    /// a written rule decided or asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The rule's line in `file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PermissionAsked {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    pub tool: String,
    /// A one-line description (`shell: rm -rf build`).
    pub summary: String,
    /// When an unanswered ask is denied.
    pub expires_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRequested {
    /// The run the request started.
    pub run_id: String,
    /// Its provider and model.
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunCompleted {
    /// The final answer.
    pub result: String,
    pub turns: u32,
    pub usage: Usage,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunFailed {
    pub error: String,
    /// Machine-readable class: `provider`, `turn_limit`, `tool`, `internal`.
    pub kind: String,
    #[serde(default)]
    pub retryable: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunCancelled {
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunParked {
    /// When the run continues.
    pub until: Timestamp,
    pub provider: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetExceeded {
    /// `tokens` or `cost_usd`.
    pub kind: String,
    /// The cap.
    pub limit: f64,
    /// Spent so far in the run.
    pub spent: f64,
    /// What the next call was estimated to add.
    pub next_estimate: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderSwitched {
    pub from: String,
    pub to: String,
    pub model: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendSession {
    /// `claude-code`, `codex`, `gemini-cli`, ...
    pub backend: String,
    pub session_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskCreated {
    pub task: crate::Task,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskDependencyAdded {
    pub dependency: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskClaimed {
    pub worker: String,
    pub token: i64,
    pub lease_expires_at: Timestamp,
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStarted {
    pub token: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskCompleted {
    pub token: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskFailed {
    pub token: i64,
    pub reason: String,
    /// No attempt left: the task is `failed` for good.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// When the next attempt may be claimed (not final).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskLeaseExpired {
    pub worker: String,
    pub token: i64,
    pub attempt: u32,
    #[serde(rename = "final")]
    pub is_final: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskReleased {
    pub worker: String,
    pub token: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TaskCancelled {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TaskRetried {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskBlocked {
    pub dependency: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskUnblocked {
    pub dependency: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRouted {
    pub agent: String,
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRunLinked {
    pub run_id: RunId,
    pub agent: String,
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskWorktree {
    pub attempt: u32,
    /// The worktree as the executor describes it (path, branch, base commit, base branch).
    pub worktree: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEvidence {
    pub attempt: u32,
    /// Whether the attempt succeeded.
    pub succeeded: bool,
    /// The evidence manifest: content hashes of the stored files and the metadata.
    pub evidence: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMerged {
    pub branch: String,
    pub into: String,
    pub commit: String,
    pub fast_forward: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskDiscarded {
    pub branch: String,
}

/// A Policy Decision Record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyDecided {
    /// `claim`, `tool` or `merge`.
    pub stage: String,
    /// `allow`, `deny` or `require_approval`.
    pub decision: String,
    /// The rule that matched (none: the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The policy file (and line) of the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    pub reason: String,
    /// What the policy saw.
    pub inputs: Value,
    /// Who the decision was enforced on (`agent:<name>`, `user`, `daemon`).
    pub actor: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskApproved {
    pub stage: String,
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRegistered {
    pub agent: crate::AgentRecord,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentUpdated {
    /// What changed, in words (`label +rust`, `disabled`, `attempt succeeded`, ...).
    pub change: String,
    pub agent: crate::AgentRecord,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRemoved {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStarted {
    /// `chat`.
    pub kind: String,
    /// Where the system prompt's rules and context files came from, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context_files: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextCompacted {
    /// The summary that replaces the old messages (`None` when they were truncated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// How many messages at the start of the conversation were replaced (pinned ones among
    /// them are kept).
    pub replaced: u64,
    /// How many messages follow them, kept as they were.
    pub kept: u64,
    /// Estimated tokens of the conversation before and after.
    pub tokens_before: u64,
    pub tokens_after: u64,
    /// `summary` or `truncate`.
    pub method: String,
    /// Why (`threshold`, `command`).
    #[serde(default)]
    pub trigger: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessagePinned {
    /// Index of the message in the current (folded) conversation.
    pub index: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SessionDeleted {}

impl Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(7))?;
        m.serialize_entry("seq", &self.seq)?;
        m.serialize_entry("id", &self.id)?;
        m.serialize_entry("run_id", &self.run_id)?;
        m.serialize_entry("type", self.data.kind())?;
        m.serialize_entry("v", &self.v)?;
        m.serialize_entry("at", &self.at)?;
        m.serialize_entry("data", &self.data)?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw<'a> {
            seq: Seq,
            id: EventId,
            run_id: RunId,
            #[serde(rename = "type")]
            kind: String,
            #[serde(default = "default_v")]
            v: u16,
            at: Timestamp,
            #[serde(borrow)]
            data: &'a RawValue,
        }
        fn default_v() -> u16 {
            EVENT_VERSION
        }
        let raw = Raw::deserialize(d)?;
        let data = EventData::from_parts(&raw.kind, raw.data.get()).map_err(serde::de::Error::custom)?;
        Ok(Event { seq: raw.seq, id: raw.id, run_id: raw.run_id, at: raw.at, v: raw.v, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ContentPart;

    #[test]
    fn event_round_trips_through_flat_json() {
        let e = Event {
            seq: 7,
            id: EventId::from("e1"),
            run_id: RunId::from("r1"),
            at: Timestamp(1_700_000_000_123_456),
            v: 1,
            data: EventData::MessageAdded(MessageAdded {
                message: Message::new(Role::User, vec![ContentPart::text("hi")]),
                model_call_id: None,
            }),
        };
        let json = serde_json::to_string(&e).unwrap();
        assert!(json.contains(r#""type":"message""#), "{json}");
        assert!(json.contains(r#""role":"user""#), "{json}");
        assert!(json.contains(r#""at":"2023-11-14T22:13:20.123456Z""#), "{json}");
        let back: Event = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn unknown_event_types_are_kept() {
        let d = EventData::from_parts("from_the_future", r#"{"x":1}"#).unwrap();
        assert_eq!(d.kind(), "from_the_future");
        assert_eq!(d.to_json().unwrap(), r#"{"x":1}"#);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let d = EventData::from_parts("run_cancelled", r#"{"reason":"SIGINT","new_field":true}"#).unwrap();
        assert_eq!(d, EventData::RunCancelled(RunCancelled { reason: "SIGINT".into() }));
    }
}
