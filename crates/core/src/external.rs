//! Whole coding-agent CLIs (Claude Code, Codex, Gemini CLI, any command) as backends.
//!
//! The CLI does the work (it calls its model and runs its own tools); [`ExternalAgent`] records
//! every step in the event log, answers the CLI's permission requests with Descartes' policy,
//! and resumes the CLI's own session after an interruption. The CLI processes themselves live
//! behind the [`AgentCli`] and [`CliSession`] traits (implemented in `descartes-agent-cli`), so
//! this module does no IO of its own.
//!
//! What is recorded, in log order:
//! - `run_started` (provider = the backend's name), then the goal `message`;
//! - `backend_session` as soon as the CLI says which session it uses (committed durably: it is
//!   what a resume needs);
//! - each assistant message as `model_call_started` + `model_call_completed` + `message`
//!   (usage as the CLI reports it; what the CLI's final result adds, such as Claude Code's
//!   `total_cost_usd`, lands on the invocation's last model call);
//! - each tool use the CLI makes: `tool_call_started{executed_by: backend}` then
//!   `tool_call_completed` when its result arrives (never executed by Descartes);
//! - each permission request as `permission_decided`, committed durably before the CLI is
//!   answered;
//! - the end: `run_completed`, `run_failed` (the run stays resumable), `run_cancelled`, or
//!   `run_parked` when the CLI reports a rate limit with a reset time.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use descartes_protocol::{
    BackendSession, BudgetExceeded, ContentPart, Decision, EventData, Message, MessageAdded, ModelCallCompleted,
    ModelCallStarted, PermissionDecided, Role, RunCompleted, RunId, RunParked, RunResumed, RunStarted, Timestamp,
    ToolCallCompleted, ToolCallStarted, Usage,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::agent::{AgentConfig, OutputSink};
use crate::outbox::{Outbox, Recorder};
use crate::permission::{self, Prompter, Question};
use crate::policy::Policy;
use crate::provider::ProviderError;
use crate::state::RunState;
use crate::store::EventStore;
use crate::{CoreError, Result};

/// The prompt a resumed CLI session is given.
pub const CONTINUE_PROMPT: &str =
    "continue (the previous run of this session was interrupted; carry on with the task where you left off)";

/// How long a CLI may take to exit after it reported its final result.
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// What a CLI is started with.
#[derive(Debug, Clone, PartialEq)]
pub struct CliRequest {
    pub prompt: String,
    /// The CLI's own session to continue (`--resume ID`), from `backend_session`.
    pub resume_session: Option<String>,
    pub cwd: std::path::PathBuf,
    /// The model, or `None` for the CLI's default.
    pub model: Option<String>,
    pub system_prompt: Option<String>,
    /// `-y`: the user allows everything (backends without permission requests widen their
    /// sandbox with it).
    pub auto_approve: bool,
    /// What the run may still spend, for CLIs that enforce a cap themselves (Claude Code's
    /// `--max-budget-usd`); Descartes also stops the CLI when the recorded cost crosses it.
    pub max_cost_usd: Option<f64>,
}

/// A CLI asks whether one of its tools may run.
#[derive(Debug, Clone, PartialEq)]
pub struct CliPermissionRequest {
    /// The CLI's id of the request (echoed in the answer).
    pub request_id: String,
    pub tool: String,
    pub input: Value,
    /// The tool use the request is about, when the CLI says.
    pub tool_use_id: Option<String>,
    /// The tool only reads (Claude Code's Read, Glob, Grep, LS, ...): allowed by policy.
    pub read_only: bool,
}

/// Descartes' answer to a [`CliPermissionRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum CliAnswer {
    Allow { updated_input: Value },
    Deny { message: String },
}

/// One normalized step of a CLI's output.
#[derive(Debug, Clone, PartialEq)]
pub enum CliEvent {
    /// The CLI's session id (and model), as soon as it is known.
    SessionStarted { session_id: String, model: Option<String> },
    /// A piece of the answer as it streams (for display only; the text is recorded with the
    /// assistant message).
    TextDelta(String),
    /// A complete assistant message: text, thinking and tool-use parts; the model call's usage
    /// if the CLI reports one.
    AssistantMessage { parts: Vec<ContentPart>, usage: Option<Usage>, stop_reason: Option<String> },
    /// A tool use of an earlier assistant message started executing in the CLI.
    ToolStarted { tool_use_id: String },
    /// The result of a tool use the CLI executed (or refused).
    ToolResult { tool_use_id: String, output: String, is_error: bool },
    /// The CLI asks before running a tool; answer with [`CliSession::answer`].
    PermissionRequest(CliPermissionRequest),
    /// Usage of this invocation so far (running totals: assign, do not add).
    Usage { usage: Usage, cost_usd: Option<f64> },
    /// The CLI is rate limited until `until` (if known).
    RateLimited { until: Option<Timestamp>, reason: String },
    /// Something the user should see (a CLI warning).
    Notice(String),
    /// The CLI's final result. `usage` and `cost_usd` cover the whole invocation.
    Finished { result: String, is_error: bool, subtype: Option<String>, usage: Option<Usage>, cost_usd: Option<f64> },
}

/// A running CLI invocation.
#[async_trait]
pub trait CliSession: Send {
    /// The next event; `Ok(None)` once the CLI has exited after its result. An error ends the
    /// session (the CLI exited non-zero, printed something that is not its protocol, ...).
    async fn next_event(&mut self) -> Result<Option<CliEvent>, ProviderError>;
    /// Answers a permission request.
    async fn answer(&mut self, request: &CliPermissionRequest, answer: CliAnswer) -> Result<(), ProviderError>;
    /// Stops the CLI (interrupt, then kill after a grace period). Idempotent.
    async fn cancel(&mut self);
}

/// A coding-agent CLI backend.
#[async_trait]
pub trait AgentCli: Send + Sync {
    /// The backend's name as users select it (`claude-code`, `codex`, `gemini-cli`, `command`).
    fn name(&self) -> &str;
    /// Starts the CLI. A missing binary is an error here that says how to install it.
    async fn start(&self, request: CliRequest) -> Result<Box<dyn CliSession>, ProviderError>;
}

/// How a CLI run ended (this time).
#[derive(Debug, Clone, PartialEq)]
pub enum ExternalOutcome {
    Completed {
        result: String,
    },
    /// Recorded as `run_failed`; `descartes resume` continues the CLI's session.
    Failed {
        error: String,
        kind: String,
    },
    Cancelled,
    /// The run reached its token or cost cap (`budget_exceeded`); a resume with a higher cap
    /// continues it.
    BudgetExceeded {
        error: String,
    },
    /// The CLI is rate limited until `until`: recorded as `run_parked`, the CLI was stopped,
    /// and the run (still `running` in the log) can be resumed then.
    Parked {
        until: Timestamp,
        reason: String,
    },
}

/// Runs goals on a coding-agent CLI, recording everything.
pub struct ExternalAgent {
    pub store: Arc<dyn EventStore>,
    pub backend: Arc<dyn AgentCli>,
    pub prompter: Arc<dyn Prompter>,
    /// The permission rules from config; they answer the CLI's permission requests.
    pub policy: Policy,
    /// The project's policy engine, consulted first (see [`crate::permission::ToolGate`]).
    pub gate: Option<Arc<dyn permission::ToolGate>>,
    pub sink: Arc<dyn OutputSink>,
    pub cancel: CancellationToken,
    /// `provider` is ignored (the backend's name is recorded); an empty `model` means the
    /// CLI's default; `max_turns`, `max_tokens` and `spool_root` are not used by CLIs.
    pub config: AgentConfig,
}

/// A final assistant message held back until the CLI's result, which may add usage and cost.
struct HeldTurn {
    started: ModelCallStarted,
    completed: ModelCallCompleted,
    message: MessageAdded,
}

/// What one CLI invocation has shown so far.
#[derive(Default)]
struct Invocation {
    usage: Usage,
    cost: f64,
    totals: Option<(Usage, Option<f64>)>,
    held: Option<HeldTurn>,
    streamed: bool,
    /// Tool uses seen (id → tool, input), and those recorded as started or denied.
    tools: HashMap<String, (String, Value)>,
    started: HashMap<String, Instant>,
    denied: HashSet<String>,
    turn_started: Option<Instant>,
}

enum Step {
    Continue,
    Done(ExternalOutcome),
}

impl ExternalAgent {
    /// The provider name the run records: the one the user selected (a declared `command`
    /// provider has its own name), else the backend's.
    fn backend_name(&self) -> String {
        if self.config.provider.is_empty() { self.backend.name().to_owned() } else { self.config.provider.clone() }
    }

    fn model(&self) -> Option<String> {
        Some(self.config.model.clone()).filter(|m| !m.trim().is_empty())
    }

    fn request(&self, prompt: String, resume_session: Option<String>) -> CliRequest {
        CliRequest {
            prompt,
            resume_session,
            cwd: self.config.cwd.clone(),
            model: self.model(),
            system_prompt: self.config.system_prompt.clone(),
            auto_approve: self.config.auto_approve,
            max_cost_usd: None,
        }
    }

    /// The run's spending against its caps: `Some` when a cap is reached.
    fn budget_reached(&self, st: &RunState) -> Option<BudgetExceeded> {
        let b = st.budget;
        if let Some(max) = b.max_tokens {
            let spent = st.usage.all_tokens();
            if spent >= max {
                return Some(BudgetExceeded {
                    kind: "tokens".into(),
                    limit: max as f64,
                    spent: spent as f64,
                    next_estimate: 0.0,
                });
            }
        }
        if let Some(max) = b.max_cost_usd
            && st.cost_usd >= max
        {
            return Some(BudgetExceeded {
                kind: "cost_usd".into(),
                limit: max,
                spent: st.cost_usd,
                next_estimate: 0.0,
            });
        }
        None
    }

    /// Records that the run stopped on its budget.
    async fn budget_stop(
        &self,
        st: &mut RunState,
        ob: &mut Outbox,
        exceeded: BudgetExceeded,
    ) -> Result<ExternalOutcome> {
        let error = crate::cost::budget_message(&exceeded);
        self.sink.notice(&error);
        self.push(st, ob, exceeded);
        self.commit(st, ob).await?;
        Ok(ExternalOutcome::BudgetExceeded { error })
    }

    /// Starts a new run with the given goal (its text is the CLI's prompt).
    pub async fn start(&self, run_id: RunId, prompt: String, goal: Message) -> Result<ExternalOutcome> {
        let mut st = RunState::new(run_id);
        let mut ob = Outbox::default();
        let c = &self.config;
        self.push(
            &mut st,
            &mut ob,
            RunStarted {
                prompt,
                provider: self.backend_name(),
                model: c.model.clone(),
                cwd: c.cwd.display().to_string(),
                max_turns: c.max_turns,
                auto_approve: c.auto_approve,
                system_prompt: c.system_prompt.clone(),
                tools: Vec::new(),
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                budget: c.budget,
            },
        );
        let text = goal.text();
        self.push(&mut st, &mut ob, MessageAdded { message: goal, model_call_id: None });
        self.commit(&mut st, &mut ob).await?;
        let request = self.request(text, None);
        self.drive(st, ob, request).await
    }

    /// Resumes a run: with a recorded CLI session, the CLI continues it (its resume flag and a
    /// "continue" prompt); without one, the CLI starts over on the goal.
    pub async fn resume(&self, mut st: RunState, previous_status: &str) -> Result<ExternalOutcome> {
        let mut ob = Outbox::default();
        let c = &self.config;
        self.push(
            &mut st,
            &mut ob,
            RunResumed {
                previous_status: previous_status.to_owned(),
                provider: self.backend_name(),
                model: c.model.clone(),
                auto_approve: c.auto_approve,
                max_turns: c.max_turns,
                pid: std::process::id(),
                budget: c.budget,
            },
        );
        self.commit(&mut st, &mut ob).await?;
        let session =
            st.backend_session.as_ref().filter(|s| s.backend == self.backend.name()).map(|s| s.session_id.clone());
        let request = match session {
            Some(id) => self.request(CONTINUE_PROMPT.to_owned(), Some(id)),
            None => {
                let goal = st.goal().map(Message::text).unwrap_or_default();
                if goal.trim().is_empty() {
                    return Err(CoreError::NotResumable(format!(
                        "run {} has neither a {} session nor a goal to start over from",
                        st.run_id,
                        self.backend.name()
                    )));
                }
                self.request(goal, None)
            }
        };
        self.drive(st, ob, request).await
    }

    async fn drive(&self, mut st: RunState, mut ob: Outbox, request: CliRequest) -> Result<ExternalOutcome> {
        if self.cancel.is_cancelled() {
            return self.cancelled(&mut st, &mut ob).await;
        }
        // A CLI makes its model calls itself: a run that reached a cap does not start it again,
        // a cost cap is handed to CLIs that enforce one, and a CLI whose recorded spending
        // crosses a cap is stopped.
        if let Some(exceeded) = self.budget_reached(&st) {
            return self.budget_stop(&mut st, &mut ob, exceeded).await;
        }
        let mut request = request;
        request.max_cost_usd = st.budget.max_cost_usd.map(|max| (max - st.cost_usd).max(0.0));
        let resuming = request.resume_session.is_some();
        let fresh = CliRequest {
            prompt: st.goal().map(Message::text).unwrap_or_default(),
            resume_session: None,
            ..request.clone()
        };
        let mut session = match self.start_session(request).await {
            Ok(s) => s,
            Err(e) => return self.fail_provider(&mut st, &mut ob, e).await,
        };
        let mut inv = Invocation::default();
        let mut seen_any = false;
        loop {
            let next = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => {
                    session.cancel().await;
                    self.release_held(&mut st, &mut ob, &mut inv, None);
                    return self.cancelled(&mut st, &mut ob).await;
                }
                e = session.next_event() => e,
            };
            let event = match next {
                Ok(Some(event)) => event,
                Ok(None) => {
                    self.release_held(&mut st, &mut ob, &mut inv, None);
                    let e = ProviderError::Protocol {
                        provider: self.backend_name(),
                        message: "the CLI exited without reporting a result".into(),
                    };
                    return self.fail_provider(&mut st, &mut ob, e).await;
                }
                Err(e) => {
                    session.cancel().await;
                    // `--resume` of a session the CLI does not know (e.g. one that never got a
                    // model turn): start over on the goal.
                    if resuming
                        && !seen_any
                        && e.to_string().contains("No conversation found")
                        && !fresh.prompt.is_empty()
                    {
                        self.sink.notice(&format!(
                            "{}: the recorded session cannot be resumed; starting over on the goal",
                            self.backend.name()
                        ));
                        session = match self.start_session(fresh.clone()).await {
                            Ok(s) => s,
                            Err(e) => return self.fail_provider(&mut st, &mut ob, e).await,
                        };
                        seen_any = true;
                        continue;
                    }
                    self.release_held(&mut st, &mut ob, &mut inv, None);
                    return self.fail_provider(&mut st, &mut ob, e).await;
                }
            };
            seen_any = true;
            match self.handle(&mut st, &mut ob, &mut inv, session.as_mut(), event).await {
                Ok(Step::Continue) => {
                    if let Some(exceeded) = self.budget_reached(&st) {
                        session.cancel().await;
                        self.release_held(&mut st, &mut ob, &mut inv, None);
                        return self.budget_stop(&mut st, &mut ob, exceeded).await;
                    }
                    self.send_deferred(&mut ob)
                }
                Ok(Step::Done(outcome)) => return Ok(outcome),
                Err(CoreError::Cancelled) => {
                    session.cancel().await;
                    self.release_held(&mut st, &mut ob, &mut inv, None);
                    return self.cancelled(&mut st, &mut ob).await;
                }
                Err(e) => {
                    session.cancel().await;
                    return Err(e);
                }
            }
        }
    }

    async fn start_session(&self, request: CliRequest) -> Result<Box<dyn CliSession>, ProviderError> {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(ProviderError::Cancelled),
            s = self.backend.start(request) => s,
        }
    }

    async fn handle(
        &self,
        st: &mut RunState,
        ob: &mut Outbox,
        inv: &mut Invocation,
        session: &mut dyn CliSession,
        event: CliEvent,
    ) -> Result<Step> {
        match event {
            CliEvent::SessionStarted { session_id, model } => {
                let known = st.backend_session.as_ref().is_some_and(|s| {
                    s.backend == self.backend.name() && s.session_id == session_id && s.model == model
                });
                if !known && !session_id.is_empty() {
                    self.push(st, ob, BackendSession { backend: self.backend.name().to_owned(), session_id, model });
                    self.commit(st, ob).await?;
                }
                inv.turn_started.get_or_insert_with(Instant::now);
            }
            CliEvent::TextDelta(text) => {
                inv.streamed = true;
                self.sink.text_delta(&text);
            }
            CliEvent::AssistantMessage { parts, usage, stop_reason } => {
                self.release_held(st, ob, inv, None);
                let parts: Vec<ContentPart> =
                    parts.into_iter().filter(|p| !matches!(p, ContentPart::Text { text } if text.is_empty())).collect();
                if parts.is_empty() {
                    return Ok(Step::Continue);
                }
                let message = Message::new(Role::Assistant, parts);
                if !inv.streamed {
                    let text = message.text();
                    if !text.is_empty() {
                        self.sink.text_delta(&text);
                        self.sink.text_delta("\n");
                    }
                }
                inv.streamed = false;
                // The CLI's message is final: its text is kept (a sink that holds text back
                // writes it now).
                self.sink.attempt_ended(true);
                let call_id = RunId::generate().0;
                let usage = usage.unwrap_or_default();
                inv.usage.add(&usage);
                let duration_ms =
                    inv.turn_started.replace(Instant::now()).map_or(0, |t| t.elapsed().as_millis() as u64);
                let turn = HeldTurn {
                    started: ModelCallStarted {
                        call_id: call_id.clone(),
                        provider: self.backend_name(),
                        model: st
                            .backend_session
                            .as_ref()
                            .and_then(|s| s.model.clone())
                            .unwrap_or_else(|| self.config.model.clone()),
                        turn: st.turns + 1,
                    },
                    completed: ModelCallCompleted {
                        call_id: call_id.clone(),
                        usage,
                        cost_usd: None,
                        stop_reason,
                        duration_ms,
                    },
                    message: MessageAdded { message, model_call_id: Some(call_id) },
                };
                let uses: Vec<_> = turn
                    .message
                    .message
                    .tool_uses()
                    .map(|(id, name, input)| (id.to_owned(), name.to_owned(), input.clone()))
                    .collect();
                if uses.is_empty() {
                    inv.held = Some(turn);
                } else {
                    self.record_turn(st, ob, turn);
                    for (id, name, input) in uses {
                        inv.tools.insert(id, (name, input));
                    }
                }
            }
            CliEvent::ToolStarted { tool_use_id } => {
                self.release_held(st, ob, inv, None);
                self.tool_started(st, ob, inv, &tool_use_id);
            }
            CliEvent::ToolResult { tool_use_id, output, is_error } => {
                self.release_held(st, ob, inv, None);
                if !inv.denied.contains(&tool_use_id) {
                    self.tool_started(st, ob, inv, &tool_use_id);
                }
                let tool = inv.tools.get(&tool_use_id).map(|(n, _)| n.clone()).unwrap_or_else(|| "unknown".into());
                let duration_ms = inv.started.get(&tool_use_id).map_or(0, |t| t.elapsed().as_millis() as u64);
                self.push(
                    st,
                    ob,
                    ToolCallCompleted {
                        call_id: tool_use_id,
                        tool,
                        output,
                        is_error,
                        duration_ms,
                        details: None,
                        recovered: false,
                    },
                );
            }
            CliEvent::PermissionRequest(request) => {
                self.release_held(st, ob, inv, None);
                let decided = self.decide(st, ob, &request).await?;
                let allowed = decided.decision == Decision::Allow;
                let reason = decided.reason.clone();
                self.push(st, ob, decided);
                // The decision is on disk before the CLI acts on it.
                self.commit(st, ob).await?;
                let answer = if allowed {
                    CliAnswer::Allow { updated_input: request.input.clone() }
                } else {
                    self.sink.notice(&format!("denied `{}`: {reason}", request.tool));
                    CliAnswer::Deny { message: format!("Permission denied by Descartes: {reason}") }
                };
                if let Some(id) = &request.tool_use_id {
                    inv.tools.entry(id.clone()).or_insert_with(|| (request.tool.clone(), request.input.clone()));
                    if allowed {
                        self.tool_started(st, ob, inv, id);
                    } else {
                        inv.denied.insert(id.clone());
                    }
                }
                if let Err(e) = session.answer(&request, answer).await {
                    // Reported by the next read (the CLI is gone); nothing more to do here.
                    self.sink.notice(&format!("{}: could not answer the permission request: {e}", self.backend.name()));
                }
            }
            CliEvent::Usage { usage, cost_usd } => inv.totals = Some((usage, cost_usd)),
            CliEvent::RateLimited { until, reason } => {
                let Some(until) = until else {
                    self.sink.notice(&format!("{}: rate limited: {reason}", self.backend.name()));
                    return Ok(Step::Continue);
                };
                self.release_held(st, ob, inv, None);
                session.cancel().await;
                self.push(st, ob, RunParked { until, provider: self.backend_name(), reason: reason.clone() });
                self.commit(st, ob).await?;
                self.sink.notice(&format!(
                    "{} is rate limited until {until}: run parked; `descartes resume {}` continues it",
                    self.backend.name(),
                    st.run_id
                ));
                return Ok(Step::Done(ExternalOutcome::Parked { until, reason }));
            }
            CliEvent::Notice(message) => self.sink.notice(&format!("{}: {message}", self.backend.name())),
            CliEvent::Finished { result, is_error, subtype, usage, cost_usd } => {
                let (total_usage, total_cost) = match (usage, &inv.totals) {
                    (Some(u), _) => (Some(u), cost_usd.or(inv.totals.as_ref().and_then(|t| t.1))),
                    (None, Some((u, c))) => (Some(*u), cost_usd.or(*c)),
                    (None, None) => (None, cost_usd),
                };
                self.release_held(st, ob, inv, Some((total_usage, total_cost)));
                // Let the CLI exit by itself (it saves its session on the way out).
                let drained =
                    tokio::time::timeout(EXIT_GRACE, async { while let Ok(Some(_)) = session.next_event().await {} })
                        .await;
                if drained.is_err() {
                    session.cancel().await;
                }
                if is_error && subtype.as_deref() == Some("error_max_budget_usd") {
                    let limit = st.budget.max_cost_usd.unwrap_or(st.cost_usd);
                    let exceeded =
                        BudgetExceeded { kind: "cost_usd".into(), limit, spent: st.cost_usd, next_estimate: 0.0 };
                    return self.budget_stop(st, ob, exceeded).await.map(Step::Done);
                }
                if is_error {
                    let kind = subtype.unwrap_or_else(|| "error".into());
                    let text = if result.trim().is_empty() { kind.clone() } else { format!("{kind}: {result}") };
                    let error = format!(
                        "{}: {text}; the run can be continued with `descartes resume {}`",
                        self.backend.name(),
                        st.run_id
                    );
                    return self.fail(st, ob, error, "backend", true).await.map(Step::Done);
                }
                let turns = st.turns;
                let usage = st.usage;
                self.sink.attempt_ended(true);
                self.push(st, ob, RunCompleted { result: result.clone(), turns, usage });
                self.commit(st, ob).await?;
                return Ok(Step::Done(ExternalOutcome::Completed { result }));
            }
        }
        Ok(Step::Continue)
    }

    fn tool_started(&self, st: &mut RunState, ob: &mut Outbox, inv: &mut Invocation, id: &str) {
        if inv.started.contains_key(id) {
            return;
        }
        inv.started.insert(id.to_owned(), Instant::now());
        let (tool, input) = inv.tools.get(id).cloned().unwrap_or_else(|| ("unknown".into(), Value::Null));
        self.push(
            st,
            ob,
            ToolCallStarted {
                call_id: id.to_owned(),
                tool,
                input,
                idempotent: false,
                executed_by: Some(self.backend.name().to_owned()),
                not_run: false,
            },
        );
    }

    fn record_turn(&self, st: &mut RunState, ob: &mut Outbox, turn: HeldTurn) {
        self.push(st, ob, turn.started);
        self.push(st, ob, turn.completed);
        self.push(st, ob, turn.message);
    }

    /// Records the held final message. With the invocation's totals (at its result), the
    /// usage and cost not yet attributed to a model call are added to it (or, without a held
    /// message, recorded on a model call of their own so that totals stay right).
    fn release_held(
        &self,
        st: &mut RunState,
        ob: &mut Outbox,
        inv: &mut Invocation,
        totals: Option<(Option<Usage>, Option<f64>)>,
    ) {
        let mut held = inv.held.take();
        if let Some((usage, cost)) = totals {
            let extra = usage.map(|u| saturating_sub(&u, &inv.usage)).unwrap_or_default();
            let extra_cost = cost.map(|c| (c - inv.cost).max(0.0));
            let has_extra = extra.total() + extra.cache_read_tokens + extra.cache_write_tokens > 0
                || extra_cost.is_some_and(|c| c > 0.0);
            if let Some(turn) = held.as_mut() {
                turn.completed.usage.add(&extra);
                turn.completed.cost_usd = extra_cost;
            } else if has_extra {
                let call_id = RunId::generate().0;
                self.push(
                    st,
                    ob,
                    ModelCallStarted {
                        call_id: call_id.clone(),
                        provider: self.backend_name(),
                        model: self.config.model.clone(),
                        turn: st.turns + 1,
                    },
                );
                self.push(
                    st,
                    ob,
                    ModelCallCompleted {
                        call_id,
                        usage: extra,
                        cost_usd: extra_cost,
                        stop_reason: Some("cli_result".into()),
                        duration_ms: 0,
                    },
                );
            }
            inv.usage.add(&extra);
            inv.cost += extra_cost.unwrap_or(0.0);
        }
        if let Some(turn) = held {
            self.record_turn(st, ob, turn);
        }
    }

    /// What this driver records through (see [`crate::outbox::Recorder`]).
    fn recorder(&self) -> Recorder<'_> {
        Recorder {
            store: &*self.store,
            sink: &*self.sink,
            prompter: &*self.prompter,
            cancel: &self.cancel,
            policy: &self.policy,
            gate: self.gate.as_deref(),
        }
    }

    /// Descartes' decision on a CLI's permission request (see [`Recorder::decide`]): the
    /// configured rules (which can name the CLI's tools: `Bash(git status)`), then the CLI's
    /// read-only tools allowed, a tool allowed for the run, `-y`, or a human (denied when
    /// nobody can be asked).
    async fn decide(
        &self,
        st: &mut RunState,
        ob: &mut Outbox,
        req: &CliPermissionRequest,
    ) -> Result<PermissionDecided> {
        let q = Question {
            call_id: req.tool_use_id.clone(),
            tool: &req.tool,
            input: &req.input,
            read_only: req.read_only,
            cwd: &self.config.cwd,
        };
        let auto = self.config.auto_approve || st.auto_approve;
        self.recorder().decide(st, ob, &q, auto).await
    }

    async fn fail_provider(&self, st: &mut RunState, ob: &mut Outbox, e: ProviderError) -> Result<ExternalOutcome> {
        if matches!(e, ProviderError::Cancelled) {
            return self.cancelled(st, ob).await;
        }
        let retryable = e.is_retryable();
        let error = format!("{e}; the run can be continued with `descartes resume {}`", st.run_id);
        self.fail(st, ob, error, "backend", retryable).await
    }

    async fn fail(
        &self,
        st: &mut RunState,
        ob: &mut Outbox,
        error: String,
        kind: &str,
        retryable: bool,
    ) -> Result<ExternalOutcome> {
        // What the CLI said before failing stays said.
        self.sink.attempt_ended(true);
        self.recorder().failed(st, ob, &error, kind, retryable).await?;
        Ok(ExternalOutcome::Failed { error, kind: kind.to_owned() })
    }

    async fn cancelled(&self, st: &mut RunState, ob: &mut Outbox) -> Result<ExternalOutcome> {
        self.recorder().cancelled(st, ob).await?;
        Ok(ExternalOutcome::Cancelled)
    }

    fn push(&self, st: &mut RunState, ob: &mut Outbox, data: impl Into<EventData>) {
        self.recorder().push(st, ob, data);
    }

    fn send_deferred(&self, ob: &mut Outbox) {
        self.recorder().send_deferred(ob);
    }

    async fn commit(&self, st: &mut RunState, ob: &mut Outbox) -> Result<()> {
        self.recorder().commit(st, ob).await
    }
}

fn saturating_sub(a: &Usage, b: &Usage) -> Usage {
    Usage {
        input_tokens: a.input_tokens.saturating_sub(b.input_tokens),
        output_tokens: a.output_tokens.saturating_sub(b.output_tokens),
        cache_read_tokens: a.cache_read_tokens.saturating_sub(b.cache_read_tokens),
        cache_write_tokens: a.cache_write_tokens.saturating_sub(b.cache_write_tokens),
        estimated: a.estimated,
    }
}
