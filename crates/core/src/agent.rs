//! The agent loop: model call, tool calls, results, repeat until the model answers without
//! tools or the turn limit is reached. Every step is recorded in the event log first, which is
//! what makes a run resumable with exactly-once tool effects.
//!
//! Durability points (see DESIGN.md, "Durability and exactly-once effects"):
//! - events are collected in an outbox and written in as few commits as the rules allow;
//! - before a tool call executes, its intent (and everything before it, e.g. the model's
//!   answer that asked for it) is committed durably;
//! - the result of a non-idempotent tool call is committed durably before anything else
//!   happens; the result of an idempotent one may ride with the next commit (losing it only
//!   means running the call again);
//! - a model call's intent is appended deferred (a lost intent only means the call is made
//!   again); its answer is committed with the next tool intent or with the run's completion;
//! - before a human is asked, everything so far is committed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use descartes_protocol::{
    BudgetExceeded, ContentPart, Decision, Event, EventData, Message, MessageAdded, ModelCallCompleted,
    ModelCallFailed, ModelCallStarted, PermissionDecided, ProviderSwitched, Role, RunCompleted, RunId, RunParked,
    RunResumed, RunStarted, SessionStarted, ToolCallCompleted, ToolCallStarted, Usage,
};
use futures::StreamExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::outbox::{Outbox, Recorder};
use crate::permission::{self, Prompter, Question};
use crate::policy::Policy;
use crate::provider::{ModelRequest, Provider, ProviderError, ResponseAssembler, StreamEvent};
use crate::resilience::ChainEntry;
use crate::state::{NextStep, PermissionOutcome, RunState};
use crate::store::EventStore;
use crate::tool::{Recovery, Tool, ToolContext, ToolOutput, ToolRegistry};
use crate::{CoreError, Result};

/// Where a run's output goes (the terminal, JSON lines, a test recorder).
pub trait OutputSink: Send + Sync {
    /// A piece of the model's answer, as it streams.
    fn text_delta(&self, _text: &str) {}
    /// The model call whose text was streamed since the last call of this method ended:
    /// `kept` when it succeeded, else its partial text is to be discarded (the call is retried,
    /// continued elsewhere or the run fails).
    fn attempt_ended(&self, _kept: bool) {}
    /// An event, once it is in the log.
    fn event(&self, _event: &Event) {}
    /// A diagnostic for the user (permission denied, a call re-run on resume, ...).
    fn notice(&self, _message: &str) {}
}

/// A sink that drops everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;
impl OutputSink for NullSink {}

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub provider: String,
    pub model: String,
    /// Maximum number of model calls in the run.
    pub max_turns: u32,
    /// `-y`: allow every permission ask.
    pub auto_approve: bool,
    pub system_prompt: Option<String>,
    pub max_tokens: Option<u32>,
    pub cwd: PathBuf,
    /// Root of per-call spool directories (`<spool_root>/<run_id>/<call_id>`).
    pub spool_root: PathBuf,
    /// Caps on the run's tokens and cost (a resume replaces them).
    pub budget: descartes_protocol::Budget,
}

/// How a run ended (this time).
#[derive(Debug, Clone, PartialEq)]
pub enum RunOutcome {
    Completed {
        result: String,
    },
    Failed {
        error: String,
        kind: String,
    },
    Cancelled,
    /// Stopped before a call that would cross the run's token or cost cap.
    BudgetExceeded {
        error: String,
    },
}

/// Runs goals on a model with tools, recording everything.
pub struct Agent {
    pub store: Arc<dyn EventStore>,
    pub provider: Arc<dyn Provider>,
    pub tools: ToolRegistry,
    pub prompter: Arc<dyn Prompter>,
    pub sink: Arc<dyn OutputSink>,
    pub cancel: CancellationToken,
    pub config: AgentConfig,
    /// Retries, fallbacks, breakers, prices.
    pub resilience: crate::resilience::Resilience,
    /// The tool specs offered to the model, with the registry version they were made from
    /// (recomputed when a tool source, such as an MCP server, changes its tools).
    pub tool_specs: std::sync::Mutex<Option<(u64, Arc<Vec<descartes_protocol::ToolSpec>>)>>,
    /// The permission rules from config (see [`crate::policy`]).
    pub policy: Policy,
    /// The project's policy engine, consulted before the permission rules (tasks run by the
    /// executor); None for plain runs.
    pub gate: Option<Arc<dyn permission::ToolGate>>,
}

/// A tool call that was decided and may run.
struct ReadyCall {
    id: String,
    name: String,
    input: Value,
    tool: Arc<dyn Tool>,
    ctx: ToolContext,
    /// Its intent is not in the log yet (false: an interrupted call run again on resume).
    fresh: bool,
}

impl Agent {
    /// The `run_started` event of a new run with this agent's configuration.
    fn run_started(&self, prompt: String) -> RunStarted {
        let c = &self.config;
        RunStarted {
            prompt,
            provider: c.provider.clone(),
            model: c.model.clone(),
            cwd: c.cwd.display().to_string(),
            max_turns: c.max_turns,
            auto_approve: c.auto_approve,
            system_prompt: c.system_prompt.clone(),
            tools: self.tools.names(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            budget: c.budget,
        }
    }

    /// Starts a new run with the given goal.
    pub async fn start(&self, run_id: RunId, prompt: String, goal: Message) -> Result<RunOutcome> {
        let mut st = RunState::new(run_id);
        let mut ob = Outbox::default();
        self.push(&mut st, &mut ob, self.run_started(prompt));
        self.push(&mut st, &mut ob, MessageAdded { message: goal, model_call_id: None });
        self.commit(&mut st, &mut ob).await?;
        self.drive(st, ob).await
    }

    /// Resumes a run from its folded state. Tool calls whose result is in the log are never
    /// executed again; a model call without a result is made again.
    pub async fn resume(&self, mut st: RunState, previous_status: &str) -> Result<RunOutcome> {
        let mut ob = Outbox::default();
        let c = &self.config;
        self.push(
            &mut st,
            &mut ob,
            RunResumed {
                previous_status: previous_status.to_owned(),
                provider: c.provider.clone(),
                model: c.model.clone(),
                auto_approve: c.auto_approve,
                max_turns: c.max_turns,
                pid: std::process::id(),
                budget: c.budget,
            },
        );
        self.commit(&mut st, &mut ob).await?;
        self.drive(st, ob).await
    }

    async fn drive(&self, mut st: RunState, mut ob: Outbox) -> Result<RunOutcome> {
        loop {
            if self.cancel.is_cancelled() {
                return self.cancelled(&mut st, &mut ob).await;
            }
            match st.next_step() {
                NextStep::Complete(result) => {
                    let turns = st.turns;
                    let usage = st.usage;
                    self.push(&mut st, &mut ob, RunCompleted { result: result.clone(), turns, usage });
                    self.commit(&mut st, &mut ob).await?;
                    return Ok(RunOutcome::Completed { result });
                }
                NextStep::CallModel => {
                    if st.max_turns > 0 && st.turns >= st.max_turns {
                        let error = format!(
                            "turn limit reached ({} model calls); continue with `descartes resume {} --max-turns {}`",
                            st.max_turns,
                            st.run_id,
                            st.max_turns.saturating_mul(2)
                        );
                        return self.fail(&mut st, &mut ob, error, "turn_limit", false).await;
                    }
                    if let Some(outcome) = self.call_model(&mut st, &mut ob).await? {
                        return Ok(outcome);
                    }
                }
                NextStep::RunTools(calls) => match self.run_tools(&mut st, &mut ob, calls).await {
                    // Stopped at a permission prompt: recorded like any other cancellation.
                    Err(CoreError::Cancelled) => return self.cancelled(&mut st, &mut ob).await,
                    r => r?,
                },
            }
        }
    }

    /// Makes one model call, with retries, fallback and the budget check. Returns
    /// `Some(outcome)` when the run ends here.
    async fn call_model(&self, st: &mut RunState, ob: &mut Outbox) -> Result<Option<RunOutcome>> {
        let r = &self.resilience;
        let chain = self.chain();
        let mut attempt = 0u32;
        loop {
            let at = chain.iter().position(|e| e.provider.name() == st.provider && e.model == st.model).unwrap_or(0);
            let entry = &chain[at];
            let name = entry.provider.name().to_owned();
            let now = r.clock.now();
            if !r.breakers.allows(&name, now)
                && let Some(next) = chain.get(at + 1)
            {
                let reason = format!("the circuit breaker of `{name}` is open after repeated failures");
                self.switch(st, ob, &name, next, reason);
                attempt = 0;
                continue;
            }
            if let Some(exceeded) = self.over_budget(st, entry) {
                self.sink.notice(&crate::cost::budget_message(&exceeded));
                let error = crate::cost::budget_message(&exceeded);
                self.push(st, ob, exceeded);
                self.commit(st, ob).await?;
                return Ok(Some(RunOutcome::BudgetExceeded { error }));
            }
            attempt += 1;
            let call_id = RunId::generate().0;
            self.push(
                st,
                ob,
                ModelCallStarted {
                    call_id: call_id.clone(),
                    provider: name.clone(),
                    model: entry.model.clone(),
                    turn: st.turns + 1,
                },
            );
            self.send_deferred(ob);
            let messages = st.conversation();
            let tools = self.offered_tools().await;
            let request = ModelRequest {
                model: entry.model.clone(),
                system: self.config.system_prompt.clone(),
                messages: messages.clone(),
                tools: tools.clone(),
                max_tokens: self.config.max_tokens,
                temperature: None,
            };
            let started = Instant::now();
            let result = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => Err(ProviderError::Cancelled),
                r = self.stream_model(entry.provider.as_ref(), request) => r,
            };
            self.sink.attempt_ended(result.is_ok());
            let e = match result {
                Ok(assembled) => {
                    r.breakers.record(&name, true, r.clock.now());
                    let reported = assembled.usage;
                    let stop_reason = assembled.stop_reason.clone();
                    let content = assembled.finish();
                    // A server that sends no usage (llama.cpp's, some proxies) is counted here, so
                    // budgets and totals do not read zero.
                    let usage = if reported.all_tokens() == 0 {
                        crate::cost::estimate_usage(
                            self.resilience.counter.as_ref(),
                            self.config.system_prompt.as_deref(),
                            &messages,
                            &tools,
                            &content,
                        )
                    } else {
                        reported
                    };
                    self.push(
                        st,
                        ob,
                        ModelCallCompleted {
                            call_id: call_id.clone(),
                            usage,
                            cost_usd: r.prices.cost(&entry.model, &usage),
                            stop_reason,
                            duration_ms: started.elapsed().as_millis() as u64,
                        },
                    );
                    self.push(
                        st,
                        ob,
                        MessageAdded { message: Message::new(Role::Assistant, content), model_call_id: Some(call_id) },
                    );
                    return Ok(None);
                }
                Err(ProviderError::Cancelled) => return self.cancelled(st, ob).await.map(Some),
                Err(e) => e,
            };
            let retryable = e.is_retryable();
            if retryable {
                r.breakers.record(&name, false, r.clock.now());
            }
            let wait = (retryable && attempt <= r.retry.max_retries)
                .then(|| r.retry.delay(attempt, e.retry_after(), fastrand::f64()))
                .filter(|d| *d <= r.retry.max_park);
            self.push(
                st,
                ob,
                ModelCallFailed {
                    call_id,
                    error: e.to_string(),
                    retryable,
                    attempt: Some(attempt),
                    retry_in_ms: wait.map(|d| d.as_millis() as u64),
                },
            );
            if let Some(wait) = wait {
                if wait > r.retry.park_after {
                    // A rate limit that resets later: park the run (durably, so a crash meanwhile
                    // leaves it `parked`, to be resumed) and continue when it resets.
                    let until = r.clock.now().plus(wait);
                    self.push(st, ob, RunParked { until, provider: name.clone(), reason: e.to_string() });
                    self.commit(st, ob).await?;
                    self.sink.notice(&format!(
                        "{name} is rate-limited; the run is parked until {} and continues then",
                        until.to_local("%H:%M:%S")
                    ));
                } else {
                    self.sink.notice(&format!("{e}; retrying in {:.1}s (attempt {attempt})", wait.as_secs_f64()));
                }
                tokio::select! {
                    biased;
                    _ = self.cancel.cancelled() => return self.cancelled(st, ob).await.map(Some),
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            if let Some(next) = chain.get(at + 1) {
                self.switch(st, ob, &name, next, e.to_string());
                attempt = 0;
                continue;
            }
            let hint = format!("; the run can be continued with `descartes resume {}`", st.run_id);
            return self.fail(st, ob, format!("{e}{hint}"), "provider", retryable).await.map(Some);
        }
    }

    /// The primary provider, then the fallbacks.
    fn chain(&self) -> Vec<ChainEntry> {
        let mut chain = vec![ChainEntry { provider: self.provider.clone(), model: self.config.model.clone() }];
        chain.extend(self.resilience.fallbacks.iter().cloned());
        chain
    }

    fn switch(&self, st: &mut RunState, ob: &mut Outbox, from: &str, to: &ChainEntry, reason: String) {
        let to_name = to.provider.name().to_owned();
        self.sink.notice(&format!("{from} failed ({reason}); continuing on {to_name} ({})", to.model));
        self.push(st, ob, ProviderSwitched { from: from.to_owned(), to: to_name, model: to.model.clone(), reason });
    }

    /// Whether the next call (to `entry`) would cross the run's token or cost cap. The call is
    /// estimated as the last call's input plus what was added since, and as output the
    /// request's `max_tokens` (or, without one, the run's average output per call).
    fn over_budget(&self, st: &RunState, entry: &ChainEntry) -> Option<BudgetExceeded> {
        let budget = st.budget;
        if budget.is_unlimited() {
            return None;
        }
        let counter = self.resilience.counter.as_ref();
        let messages = st.messages();
        let input = if st.turns > 0 && st.last_call_messages <= messages.len() {
            st.last_call_input_tokens + counter.count_messages(&messages[st.last_call_messages..])
        } else {
            counter.count_messages(messages) + self.config.system_prompt.as_deref().map_or(0, |s| counter.count(s))
        };
        let output = match self.config.max_tokens {
            Some(m) => u64::from(m),
            None => st.usage.output_tokens.checked_div(u64::from(st.turns)).unwrap_or(0),
        };
        if let Some(max) = budget.max_tokens {
            let spent = st.usage.all_tokens();
            if spent + input + output > max {
                return Some(BudgetExceeded {
                    kind: "tokens".into(),
                    limit: max as f64,
                    spent: spent as f64,
                    next_estimate: (input + output) as f64,
                });
            }
        }
        if let Some(max) = budget.max_cost_usd {
            let next = match self.resilience.prices.price(&entry.model) {
                Some(p) => p.cost(&Usage { input_tokens: input, output_tokens: output, ..Default::default() }),
                None => {
                    self.sink.notice(&format!(
                        "no price is known for model `{}`; its calls count as $0 against --max-cost-usd (add one under \
                         [prices] in config)",
                        entry.model
                    ));
                    0.0
                }
            };
            if st.cost_usd + next > max {
                return Some(BudgetExceeded {
                    kind: "cost_usd".into(),
                    limit: max,
                    spent: st.cost_usd,
                    next_estimate: next,
                });
            }
        }
        None
    }

    async fn stream_model(
        &self,
        provider: &dyn Provider,
        request: ModelRequest,
    ) -> Result<ResponseAssembler, ProviderError> {
        let mut stream = provider.stream(request).await?;
        let mut assembler = ResponseAssembler::default();
        while let Some(item) = stream.next().await {
            let event = item?;
            if let StreamEvent::TextDelta(text) = &event {
                self.sink.text_delta(text);
            }
            assembler.push(event);
            if assembler.stopped {
                break;
            }
        }
        if !assembler.stopped {
            return Err(ProviderError::Protocol {
                provider: provider.name().to_owned(),
                message: "the response stream ended before the model finished".into(),
            });
        }
        Ok(assembler)
    }

    /// Runs the tool calls of one model answer: first every decision (and prompt) in call
    /// order, then the calls. Consecutive read-only calls run concurrently (their intents are
    /// committed together before, their results recorded in call order after); every other
    /// call runs alone, in order, with the durability rules of a single call.
    async fn run_tools(&self, st: &mut RunState, ob: &mut Outbox, calls: Vec<(String, String, Value)>) -> Result<()> {
        let mut ready = Vec::new();
        for (id, name, input) in calls {
            if self.cancel.is_cancelled() {
                return Ok(());
            }
            if let Some(call) = self.prepare_tool(st, ob, id, name, input).await? {
                ready.push(call);
            }
        }
        let mut ready = ready.into_iter().peekable();
        while let Some(first) = ready.next() {
            if self.cancel.is_cancelled() {
                break;
            }
            let mut batch = vec![first];
            if batch[0].tool.read_only() {
                while let Some(next) = ready.next_if(|c| c.tool.read_only()) {
                    batch.push(next);
                }
            }
            self.execute(st, ob, batch).await?;
        }
        Ok(())
    }

    /// Decides one call and settles what needs no execution (unknown tool, denied, invalid
    /// arguments, an interrupted call recovered on resume). Returns the call if it is to run.
    async fn prepare_tool(
        &self,
        st: &mut RunState,
        ob: &mut Outbox,
        id: String,
        name: String,
        input: Value,
    ) -> Result<Option<ReadyCall>> {
        let Some(tool) = self.tools.get(&name) else {
            let output = format!("unknown tool `{name}`; available tools: {}", self.tools.names().join(", "));
            self.settle_unrun(st, ob, &id, &name, &input, output);
            return Ok(None);
        };
        let ctx = ToolContext {
            cwd: self.config.cwd.clone(),
            run_id: st.run_id.clone(),
            call_id: id.clone(),
            spool_dir: self.config.spool_root.join(st.run_id.as_str()).join(sanitize(&id)),
            cancel: self.cancel.clone(),
        };
        let record = st.tool_calls.get(&id).cloned().unwrap_or_default();
        if record.started {
            // The intent is in the log but not the result: the run was interrupted during the call.
            if !tool.idempotent() {
                match tool.recover(&input, &ctx).await {
                    Recovery::NotStarted => {}
                    Recovery::Completed(output) => {
                        self.sink
                            .notice(&format!("recovered the result of interrupted `{name}` call {id} (not run again)"));
                        self.complete_tool(st, ob, &id, &name, output, 0, true);
                        self.commit(st, ob).await?;
                        return Ok(None);
                    }
                    Recovery::Unknown => {
                        self.sink.notice(&format!(
                            "`{name}` call {id} was interrupted; its outcome is unknown and it was not run again"
                        ));
                        let output = ToolOutput::error(format!(
                            "This `{name}` call was interrupted (the run stopped while it was executing) and it is not \
                             known whether it took effect. It was not run again: check its effects before retrying."
                        ));
                        self.complete_tool(st, ob, &id, &name, output, 0, true);
                        self.commit(st, ob).await?;
                        return Ok(None);
                    }
                }
            } else {
                self.sink.notice(&format!("re-running interrupted `{name}` call {id} (idempotent)"));
            }
            return Ok(Some(ReadyCall { id, name, input, tool, ctx, fresh: false }));
        }
        // Arguments that do not match the tool's schema never reach permission or execution
        // (unparsable JSON arrives as a string and is reported below).
        if !input.is_string()
            && let Err(message) = self.tools.validate(&name, &input)
        {
            self.tools.record(&name, false, std::time::Duration::ZERO);
            self.settle_unrun(st, ob, &id, &name, &input, message);
            return Ok(None);
        }
        let decision = match record.permission {
            Some(p) => p,
            None => {
                let p = self.decide(st, ob, &id, &name, tool.as_ref(), &input).await?;
                let outcome = PermissionOutcome { decision: p.decision, reason: p.reason.clone() };
                self.push(st, ob, p);
                outcome
            }
        };
        if decision.decision == Decision::Deny {
            self.sink.notice(&format!("denied `{name}`: {}", decision.reason));
            let output = ToolOutput::error(format!("Permission denied: {}", decision.reason));
            self.complete_tool(st, ob, &id, &name, output, 0, false);
            return Ok(None);
        }
        if let Value::String(raw) = &input {
            let output = format!("the arguments are not valid JSON: {raw}");
            self.settle_unrun(st, ob, &id, &name, &input, output);
            return Ok(None);
        }
        Ok(Some(ReadyCall { id, name, input, tool, ctx, fresh: true }))
    }

    /// Executes calls that may run together: their intents are committed first, their results
    /// recorded in call order; a non-idempotent result is committed before anything else.
    async fn execute(&self, st: &mut RunState, ob: &mut Outbox, batch: Vec<ReadyCall>) -> Result<()> {
        let mut fresh = false;
        for c in batch.iter().filter(|c| c.fresh) {
            fresh = true;
            self.push(
                st,
                ob,
                ToolCallStarted {
                    call_id: c.id.clone(),
                    tool: c.name.clone(),
                    input: c.input.clone(),
                    idempotent: c.tool.idempotent(),
                    executed_by: None,
                    not_run: false,
                },
            );
        }
        if fresh {
            self.commit(st, ob).await?;
        }
        let outputs = futures::future::join_all(batch.iter().map(|c| async move {
            let started = Instant::now();
            let output =
                crate::tool::call_with_timeout(c.tool.as_ref(), c.input.clone(), &c.ctx, c.tool.timeout()).await;
            self.tools.record(&c.name, !output.is_error, started.elapsed());
            (output, started.elapsed().as_millis() as u64)
        }))
        .await;
        let mut durable = false;
        for (c, (output, ms)) in batch.iter().zip(outputs) {
            self.complete_tool(st, ob, &c.id, &c.name, output, ms, false);
            durable |= !c.tool.idempotent();
        }
        if durable {
            self.commit(st, ob).await?;
        }
        Ok(())
    }

    /// Settles a call the model made that cannot run (an unknown tool, arguments that fail
    /// the tool's schema or are not JSON): its start, with the arguments as given, and its
    /// error, in one commit, so the log pairs them as for every call that was attempted. (A
    /// call the policy denies has its `permission_decided` instead of a start.)
    fn settle_unrun(&self, st: &mut RunState, ob: &mut Outbox, id: &str, name: &str, input: &Value, error: String) {
        self.push(
            st,
            ob,
            ToolCallStarted {
                call_id: id.to_owned(),
                tool: name.to_owned(),
                input: input.clone(),
                idempotent: true,
                executed_by: None,
                not_run: true,
            },
        );
        self.complete_tool(st, ob, id, name, ToolOutput::error(error), 0, false);
    }

    #[allow(clippy::too_many_arguments)]
    fn complete_tool(
        &self,
        st: &mut RunState,
        ob: &mut Outbox,
        id: &str,
        name: &str,
        output: ToolOutput,
        duration_ms: u64,
        recovered: bool,
    ) {
        self.push(
            st,
            ob,
            ToolCallCompleted {
                call_id: id.to_owned(),
                tool: name.to_owned(),
                output: output.content,
                is_error: output.is_error,
                duration_ms,
                details: output.details,
                recovered,
            },
        );
    }

    /// The tools offered to the model now: the registry's sources are refreshed first (an MCP
    /// server that announced `tools/list_changed` is re-listed), and a change is noticed.
    async fn offered_tools(&self) -> Arc<Vec<descartes_protocol::ToolSpec>> {
        for notice in self.tools.refresh().await {
            self.sink.notice(&notice);
        }
        let version = self.tools.version();
        let mut cached = self.tool_specs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*cached {
            Some((v, specs)) if *v == version => specs.clone(),
            _ => {
                let specs = Arc::new(self.tools.specs());
                *cached = Some((version, specs.clone()));
                specs
            }
        }
    }

    /// What this loop records through (see [`crate::outbox::Recorder`]).
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

    /// Decides whether a tool call may run (see [`Recorder::decide`]).
    async fn decide(
        &self,
        st: &mut RunState,
        ob: &mut Outbox,
        id: &str,
        name: &str,
        tool: &dyn Tool,
        input: &Value,
    ) -> Result<PermissionDecided> {
        let q = Question {
            call_id: Some(id.to_owned()),
            tool: name,
            input,
            read_only: tool.read_only(),
            cwd: &self.config.cwd,
        };
        let auto = st.auto_approve;
        self.recorder().decide(st, ob, &q, auto).await
    }

    async fn fail(
        &self,
        st: &mut RunState,
        ob: &mut Outbox,
        error: String,
        kind: &str,
        retryable: bool,
    ) -> Result<RunOutcome> {
        self.recorder().failed(st, ob, &error, kind, retryable).await?;
        Ok(RunOutcome::Failed { error, kind: kind.to_owned() })
    }

    async fn cancelled(&self, st: &mut RunState, ob: &mut Outbox) -> Result<RunOutcome> {
        self.recorder().cancelled(st, ob).await?;
        Ok(RunOutcome::Cancelled)
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

    /// Starts an interactive session (`descartes chat`): `run_started`, `session_started`
    /// and the first message, then the loop until the model answers (the turn's
    /// `run_completed`).
    pub async fn start_session(&self, run_id: RunId, session: SessionStarted, first: Message) -> Result<RunOutcome> {
        let mut st = RunState::new(run_id);
        let mut ob = Outbox::default();
        self.push(&mut st, &mut ob, self.run_started(first.text()));
        self.push(&mut st, &mut ob, session);
        self.push(&mut st, &mut ob, MessageAdded { message: first, model_call_id: None });
        self.commit(&mut st, &mut ob).await?;
        self.drive(st, ob).await
    }

    /// One more turn of a session whose previous turn ended (completed, cancelled or
    /// failed): `run_resumed`, the user's message, the loop. Tool calls the previous turn left
    /// without a result (it was cancelled) are recorded as not run, never executed now. The
    /// turn limit counts the calls of this turn.
    pub async fn continue_session(&self, mut st: RunState, message: Message) -> Result<RunOutcome> {
        let mut ob = Outbox::default();
        let c = &self.config;
        let previous_status = st.status.as_str().to_owned();
        let max_turns = if c.max_turns == 0 { 0 } else { st.turns.saturating_add(c.max_turns) };
        self.push(
            &mut st,
            &mut ob,
            RunResumed {
                previous_status,
                provider: c.provider.clone(),
                model: c.model.clone(),
                auto_approve: c.auto_approve,
                max_turns,
                pid: std::process::id(),
                budget: c.budget,
            },
        );
        if let NextStep::RunTools(calls) = st.next_step() {
            for (id, name, _) in calls {
                let output = ToolOutput::error("This call was not run: the user cancelled the turn.".to_owned());
                self.complete_tool(&mut st, &mut ob, &id, &name, output, 0, false);
            }
        }
        self.push(&mut st, &mut ob, MessageAdded { message, model_call_id: None });
        self.commit(&mut st, &mut ob).await?;
        self.drive(st, ob).await
    }
}

/// A call id made safe as a directory name.
fn sanitize(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// One line describing a tool call for a permission prompt.
pub fn summarize(name: &str, input: &Value) -> String {
    let detail = match input {
        Value::Object(map) => map
            .get("command")
            .or_else(|| map.get("path"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| input.to_string()),
        other => other.to_string(),
    };
    let mut line: String = detail.chars().take(200).collect();
    if line.len() < detail.len() {
        line.push('…');
    }
    format!("{name}: {line}")
}

/// The goal message: the prompt, then any piped input.
pub fn goal_message(prompt: &str, piped: Option<&str>) -> Message {
    match piped {
        Some(input) if !input.trim().is_empty() => {
            Message::new(Role::User, vec![ContentPart::text(format!("{prompt}\n\n<stdin>\n{input}\n</stdin>"))])
        }
        _ => Message::user_text(prompt),
    }
}
