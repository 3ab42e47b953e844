//! A run's state, rebuilt by folding its events. The fold is the only place that interprets a
//! run's log; the agent loop, `descartes list` and resume all go through it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use descartes_protocol::{
    BackendSession, Budget, ContentPart, Decision, DecisionScope, Event, EventData, Message, Role, RunId, RunStarted,
    Seq, Timestamp, Usage,
};
use serde_json::Value;

use crate::{CoreError, Result};

/// Status of a run as its log tells it. Whether a `Running` run is alive or was interrupted is
/// not in the log: the runtime decides that with its run locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Running,
    Completed,
    Failed,
    Cancelled,
    /// Waiting for a provider's rate limit to reset.
    Parked,
    /// Stopped before a call that would cross the run's token or cost cap.
    BudgetExceeded,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Parked => "parked",
            RunStatus::BudgetExceeded => "budget_exceeded",
        }
    }
}

/// The part of a `permission_decided` event a resumed run needs.
#[derive(Debug, Clone, PartialEq)]
pub struct PermissionOutcome {
    pub decision: Decision,
    pub reason: String,
}

/// What is known of one tool call.
#[derive(Debug, Clone, Default)]
pub struct ToolCallRecord {
    /// The permission decision for the call, if one was made.
    pub permission: Option<PermissionOutcome>,
    /// Its intent (`tool_call_started`) is in the log.
    pub started: bool,
    /// Whether the tool declared the call idempotent (from the intent).
    pub idempotent: bool,
    /// Its result (`tool_call_completed`) is in the log.
    pub completed: bool,
}

/// What the agent loop must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum NextStep {
    /// Ask the model (the conversation ends with user input or tool results).
    CallModel,
    /// Execute these tool calls of the last assistant message (id, tool, input), in order.
    RunTools(Vec<(String, String, Value)>),
    /// The model answered without asking for tools: the run is done with this answer.
    Complete(String),
}

/// The folded state of a run.
#[derive(Debug, Clone)]
pub struct RunState {
    pub run_id: RunId,
    pub started: Option<RunStarted>,
    pub status: RunStatus,
    /// Provider, model, turn limit and approval mode in force (from `run_started`, overridden
    /// by the latest `run_resumed`).
    pub provider: String,
    pub model: String,
    pub max_turns: u32,
    pub auto_approve: bool,
    /// The conversation. Tool results are gathered in a user message after the assistant
    /// message that asked for them. Shared with model requests (no copy per model call).
    messages: Arc<Vec<Message>>,
    pub tool_calls: HashMap<String, ToolCallRecord>,
    /// Tools the user allowed for the rest of this run.
    pub run_allowed: HashSet<String>,
    /// Model calls completed.
    pub turns: u32,
    /// A model call started without a result yet (it is made again on resume).
    pub open_model_call: Option<String>,
    pub usage: Usage,
    /// Money spent on model calls (those with a known price).
    pub cost_usd: f64,
    /// Caps in force (from `run_started`, replaced by each `run_resumed`).
    pub budget: Budget,
    /// Input tokens of the last completed model call, and how many messages it was sent.
    pub last_call_input_tokens: u64,
    pub last_call_messages: usize,
    /// When a parked run continues.
    pub parked_until: Option<Timestamp>,
    pub result: Option<String>,
    pub error: Option<String>,
    pub last_seq: Seq,
    pub events: usize,
    /// The coding-agent CLI session of the run (the latest `backend_session`), which a resume
    /// continues.
    pub backend_session: Option<BackendSession>,
    /// The session kind (`chat`) when the run is an interactive session.
    pub session: Option<String>,
    /// The session was deleted (a tombstone in the log).
    pub deleted: bool,
    /// Indices of pinned messages in the current conversation.
    pub pinned: std::collections::BTreeSet<usize>,
    /// Compactions applied to the conversation.
    pub compactions: u32,
}

impl RunState {
    pub fn new(run_id: RunId) -> Self {
        Self {
            run_id,
            started: None,
            status: RunStatus::Running,
            provider: String::new(),
            model: String::new(),
            max_turns: 0,
            auto_approve: false,
            messages: Arc::new(Vec::new()),
            tool_calls: HashMap::new(),
            run_allowed: HashSet::new(),
            turns: 0,
            open_model_call: None,
            usage: Usage::default(),
            cost_usd: 0.0,
            budget: Budget::default(),
            last_call_input_tokens: 0,
            last_call_messages: 0,
            parked_until: None,
            result: None,
            error: None,
            last_seq: 0,
            events: 0,
            backend_session: None,
            session: None,
            deleted: false,
            pinned: Default::default(),
            compactions: 0,
        }
    }

    /// Folds a run's events (in log order).
    pub fn fold<'a>(run_id: RunId, events: impl IntoIterator<Item = &'a Event>) -> Result<Self> {
        let mut state = Self::new(run_id);
        for e in events {
            state.apply(e.seq, &e.data);
        }
        state.check_folded()
    }

    /// Folds a run's events, consuming them (no copies: the fastest way to rebuild a run).
    pub fn fold_owned(run_id: RunId, events: impl IntoIterator<Item = Event>) -> Result<Self> {
        let mut state = Self::new(run_id);
        for e in events {
            state.apply_owned(e.seq, e.data);
        }
        state.check_folded()
    }

    /// After a fold: a run must start with `run_started`.
    pub fn check_folded(self) -> Result<Self> {
        if self.started.is_none() {
            return Err(if self.events == 0 {
                CoreError::RunNotFound(self.run_id.to_string())
            } else {
                CoreError::Inconsistent(format!("run {} has events but no run_started", self.run_id))
            });
        }
        Ok(self)
    }

    /// Applies one event. `seq` may be 0 for an event not yet written.
    pub fn apply(&mut self, seq: Seq, data: &EventData) {
        self.apply_owned(seq, data.clone());
    }

    /// Applies one event, taking its payload.
    pub fn apply_owned(&mut self, seq: Seq, data: EventData) {
        self.events += 1;
        if seq > self.last_seq {
            self.last_seq = seq;
        }
        match data {
            EventData::RunStarted(s) => {
                self.provider = s.provider.clone();
                self.model = s.model.clone();
                self.max_turns = s.max_turns;
                self.auto_approve = s.auto_approve;
                self.budget = s.budget;
                self.started = Some(s);
                self.status = RunStatus::Running;
            }
            EventData::RunResumed(r) => {
                if !self.provider.is_empty() && self.provider != r.provider {
                    self.drop_thinking();
                }
                self.provider = r.provider;
                self.model = r.model;
                self.max_turns = r.max_turns;
                self.auto_approve = r.auto_approve;
                self.budget = r.budget;
                self.status = RunStatus::Running;
                self.error = None;
                self.parked_until = None;
            }
            EventData::MessageAdded(m) => Arc::make_mut(&mut self.messages).push(m.message),
            EventData::ModelCallStarted(c) => self.open_model_call = Some(c.call_id),
            EventData::ModelCallCompleted(c) => {
                self.turns += 1;
                self.usage.add(&c.usage);
                self.cost_usd += c.cost_usd.unwrap_or(0.0);
                self.last_call_input_tokens =
                    c.usage.input_tokens + c.usage.cache_read_tokens + c.usage.cache_write_tokens;
                self.last_call_messages = self.messages.len();
                self.open_model_call = None;
                if self.status == RunStatus::Parked {
                    self.status = RunStatus::Running;
                    self.parked_until = None;
                }
            }
            EventData::ModelCallFailed(_) => self.open_model_call = None,
            EventData::ToolCallStarted(t) => {
                let record = self.tool_calls.entry(t.call_id).or_default();
                record.started = true;
                record.idempotent = t.idempotent;
            }
            EventData::ToolCallCompleted(t) => {
                let record = self.tool_calls.entry(t.call_id.clone()).or_default();
                if !record.completed {
                    record.completed = true;
                    let part =
                        ContentPart::ToolResult { tool_use_id: t.call_id, content: t.output, is_error: t.is_error };
                    let messages = Arc::make_mut(&mut self.messages);
                    match messages.last_mut() {
                        Some(last) if is_tool_results(last) => last.content.push(part),
                        _ => messages.push(Message::new(Role::User, vec![part])),
                    }
                }
            }
            EventData::PermissionDecided(p) => {
                if p.scope == DecisionScope::Run && p.decision == Decision::Allow {
                    self.run_allowed.insert(p.tool);
                }
                if let Some(id) = p.call_id {
                    self.tool_calls.entry(id).or_default().permission =
                        Some(PermissionOutcome { decision: p.decision, reason: p.reason });
                }
            }
            EventData::RunCompleted(c) => {
                self.status = RunStatus::Completed;
                self.result = Some(c.result);
            }
            EventData::RunFailed(f) => {
                self.status = RunStatus::Failed;
                self.error = Some(f.error);
            }
            EventData::RunCancelled(_) => self.status = RunStatus::Cancelled,
            EventData::RunParked(p) => {
                self.status = RunStatus::Parked;
                self.parked_until = Some(p.until);
            }
            EventData::BudgetExceeded(b) => {
                self.status = RunStatus::BudgetExceeded;
                self.error = Some(crate::cost::budget_message(&b));
            }
            EventData::ProviderSwitched(p) => {
                if self.provider != p.to {
                    self.drop_thinking();
                }
                self.provider = p.to;
                self.model = p.model;
            }
            EventData::BackendSession(b) => self.backend_session = Some(b),
            EventData::SessionStarted(s) => self.session = Some(s.kind),
            EventData::SessionDeleted(_) => self.deleted = true,
            EventData::MessagePinned(p) if (p.index as usize) < self.messages.len() => {
                self.pinned.insert(p.index as usize);
            }
            EventData::ContextCompacted(c) => self.compact(c.replaced as usize, c.summary),
            // Other streams' events (tasks, ...) say nothing about a run.
            _ => {}
        }
    }

    /// Removes reasoning blocks from the conversation: their signatures (Anthropic's, Gemini's
    /// thought signatures, OpenAI's encrypted reasoning) are only valid for the provider that
    /// made them, and another provider refuses them. Done when a run changes provider.
    fn drop_thinking(&mut self) {
        let has_thinking =
            self.messages.iter().any(|m| m.content.iter().any(|p| matches!(p, ContentPart::Thinking { .. })));
        if has_thinking {
            for m in Arc::make_mut(&mut self.messages) {
                m.content.retain(|p| !matches!(p, ContentPart::Thinking { .. }));
            }
        }
    }

    /// Replaces the first `replaced` messages by the summary (when there is one) followed by
    /// the pinned ones among them; the rest is kept. Pins are renumbered.
    fn compact(&mut self, replaced: usize, summary: Option<String>) {
        let replaced = replaced.min(self.messages.len());
        let old = std::mem::take(Arc::make_mut(&mut self.messages));
        let mut next = Vec::with_capacity(old.len() - replaced + 1);
        let mut pinned = std::collections::BTreeSet::new();
        if let Some(s) = summary {
            next.push(crate::session::summary_message(&s));
        }
        for (i, m) in old.into_iter().enumerate() {
            if i >= replaced || self.pinned.contains(&i) {
                if self.pinned.contains(&i) {
                    pinned.insert(next.len());
                }
                next.push(m);
            }
        }
        self.messages = Arc::new(next);
        self.pinned = pinned;
        self.compactions += 1;
        // The last call's input no longer describes the conversation: estimate it afresh.
        self.last_call_messages = usize::MAX;
    }

    /// The conversation to send to the model (shared, not copied).
    pub fn conversation(&self) -> Arc<Vec<Message>> {
        self.messages.clone()
    }

    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// What the agent loop does next.
    pub fn next_step(&self) -> NextStep {
        // The last assistant message, and whether only its tool results follow it.
        let Some(at) = self.messages.iter().rposition(|m| m.role == Role::Assistant) else {
            return NextStep::CallModel;
        };
        let last = &self.messages[at];
        let mut uses = last.tool_uses().peekable();
        if uses.peek().is_none() {
            return if at + 1 == self.messages.len() { NextStep::Complete(last.text()) } else { NextStep::CallModel };
        }
        let missing: Vec<_> = uses
            .filter(|(id, _, _)| self.tool_calls.get(*id).is_none_or(|r| !r.completed))
            .map(|(id, name, input)| (id.to_owned(), name.to_owned(), input.clone()))
            .collect();
        if missing.is_empty() { NextStep::CallModel } else { NextStep::RunTools(missing) }
    }

    /// The first user message's text (the goal with any piped input).
    pub fn goal(&self) -> Option<&Message> {
        self.messages.iter().find(|m| m.role == Role::User)
    }
}

fn is_tool_results(m: &Message) -> bool {
    m.role == Role::User
        && !m.content.is_empty()
        && m.content.iter().all(|p| matches!(p, ContentPart::ToolResult { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use descartes_protocol::*;
    use serde_json::json;

    fn ev(seq: Seq, data: impl Into<EventData>) -> Event {
        Event { seq, id: EventId::generate(), run_id: RunId::from("r"), at: Timestamp(0), v: 1, data: data.into() }
    }

    fn started() -> RunStarted {
        RunStarted {
            prompt: "p".into(),
            provider: "openai".into(),
            model: "m".into(),
            cwd: "/".into(),
            max_turns: 10,
            auto_approve: false,
            system_prompt: None,
            tools: vec![],
            pid: 1,
            version: "0".into(),
            budget: Default::default(),
        }
    }

    fn msg(role: Role, content: Vec<ContentPart>) -> MessageAdded {
        MessageAdded { message: Message::new(role, content), model_call_id: None }
    }

    #[test]
    fn fold_tracks_tool_calls_and_next_step() {
        let tool_use = ContentPart::ToolUse { id: "c1".into(), name: "shell".into(), input: json!({"command":"ls"}) };
        let mut events = vec![
            ev(1, started()),
            ev(2, msg(Role::User, vec![ContentPart::text("hi")])),
            ev(3, ModelCallStarted { call_id: "m1".into(), provider: "openai".into(), model: "m".into(), turn: 1 }),
            ev(
                4,
                ModelCallCompleted {
                    call_id: "m1".into(),
                    usage: Usage { input_tokens: 5, output_tokens: 2, ..Default::default() },
                    cost_usd: None,
                    stop_reason: None,
                    duration_ms: 1,
                },
            ),
            ev(5, msg(Role::Assistant, vec![tool_use])),
        ];
        let s = RunState::fold(RunId::from("r"), &events).unwrap();
        assert_eq!(s.turns, 1);
        assert_eq!(s.next_step(), NextStep::RunTools(vec![("c1".into(), "shell".into(), json!({"command":"ls"}))]));

        events.push(ev(
            6,
            ToolCallStarted {
                call_id: "c1".into(),
                tool: "shell".into(),
                input: json!({}),
                idempotent: false,
                executed_by: None,
                not_run: false,
            },
        ));
        let s = RunState::fold(RunId::from("r"), &events).unwrap();
        assert!(matches!(s.next_step(), NextStep::RunTools(_)), "started without completion still runs (reconciled)");

        events.push(ev(
            7,
            ToolCallCompleted {
                call_id: "c1".into(),
                tool: "shell".into(),
                output: "a.rs".into(),
                is_error: false,
                duration_ms: 1,
                details: None,
                recovered: false,
            },
        ));
        let s = RunState::fold(RunId::from("r"), &events).unwrap();
        assert_eq!(s.next_step(), NextStep::CallModel);
        let conv = s.conversation();
        assert_eq!(conv.len(), 3);
        assert_eq!(
            conv[2].content[0],
            ContentPart::ToolResult { tool_use_id: "c1".into(), content: "a.rs".into(), is_error: false }
        );

        events.push(ev(8, msg(Role::Assistant, vec![ContentPart::text("done")])));
        let s = RunState::fold(RunId::from("r"), &events).unwrap();
        assert_eq!(s.next_step(), NextStep::Complete("done".into()));
        assert_eq!(s.conversation().len(), 4);
    }

    #[test]
    fn a_provider_switch_drops_signed_reasoning() {
        let thinking = ContentPart::Thinking { text: "hmm".into(), signature: Some("sig".into()) };
        let events = vec![
            ev(1, started()),
            ev(2, msg(Role::User, vec![ContentPart::text("hi")])),
            ev(3, msg(Role::Assistant, vec![thinking.clone(), ContentPart::text("answer")])),
        ];
        let mut st = RunState::fold(RunId::from("r"), &events).unwrap();
        assert_eq!(st.messages()[1].content.len(), 2);
        st.apply(
            4,
            &EventData::ProviderSwitched(descartes_protocol::ProviderSwitched {
                from: "openai".into(),
                to: "anthropic".into(),
                model: "c".into(),
                reason: "down".into(),
            }),
        );
        assert_eq!(st.messages()[1].content, vec![ContentPart::text("answer")]);
        assert_eq!((st.provider.as_str(), st.model.as_str()), ("anthropic", "c"));
    }

    #[test]
    fn duplicate_completion_is_ignored() {
        let c = ToolCallCompleted {
            call_id: "c1".into(),
            tool: "t".into(),
            output: "x".into(),
            is_error: false,
            duration_ms: 0,
            details: None,
            recovered: false,
        };
        let events = vec![ev(1, started()), ev(2, c.clone()), ev(3, c)];
        let s = RunState::fold(RunId::from("r"), &events).unwrap();
        assert_eq!(s.conversation().len(), 1);
        assert_eq!(s.conversation()[0].content.len(), 1);
    }

    #[test]
    fn empty_log_is_not_found() {
        assert!(matches!(RunState::fold(RunId::from("r"), &[]), Err(CoreError::RunNotFound(_))));
    }
}
