//! Runs: the one builder of the agent that drives a run (Descartes' loop on a model provider,
//! or an agent CLI), with its provider, tools, MCP servers, permissions, policy and budgets;
//! starting, resuming and wrapping up a run. Every front end (the CLI's `run`, `resume` and
//! `chat`, the daemon's executor, the API server) builds its runs here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use descartes_core::external::{ExternalAgent, ExternalOutcome};
use descartes_core::permission::ToolGate;
use descartes_core::state::{RunState, RunStatus};
use descartes_core::{Agent, AgentConfig, Budget, CoreError, EventStore, OutputSink, Prompter, RunOutcome};
use descartes_protocol::RunId;
use descartes_runtime::{Runtime, Stores};
use tokio_util::sync::CancellationToken;

use crate::error::{Problem, fail};

const DEFAULT_SYSTEM_PROMPT: &str = "You are Descartes, an autonomous software agent. You work in the directory given \
below, using the tools to inspect files, run commands and make changes. Work step by step; when the goal is reached, \
answer with a short summary of what you did and found.";

/// The system prompt of a new run on a model provider: the configured one or the default, then
/// the rules and context files (see `descartes_runtime::context` for their order), then
/// `session` rules files. Returns the prompt and the files it holds.
pub fn system_prompt_with_rules(rt: &Runtime, cwd: &Path, session: &[PathBuf]) -> Result<(String, Vec<PathBuf>)> {
    let base = rt
        .config
        .system_prompt
        .clone()
        .unwrap_or_else(|| format!("{DEFAULT_SYSTEM_PROMPT}\n\nWorking directory: {}", cwd.display()));
    let (files, left_out) = rt.rules(session).map_err(|e| fail(Problem::Usage, e.to_string()))?;
    let rules = descartes_runtime::context::render_rules(&files, &left_out);
    Ok((format!("{base}{rules}"), files.into_iter().map(|f| f.path).collect()))
}

/// What a run (new or resumed) is driven with.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub provider: Option<String>,
    pub model: Option<String>,
    pub auto_approve: bool,
    pub max_turns: u32,
    pub cwd: PathBuf,
    pub system_prompt: Option<String>,
    pub budget: Budget,
}

/// What a user asks of a new run or of a resume: each `None` keeps the default (the config's
/// for a new run, the run's own for a resume).
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    pub provider: Option<String>,
    pub model: Option<String>,
    /// `-y`: allow every ask the permission rules leave open.
    pub yes: bool,
    pub max_turns: Option<u32>,
    pub max_tokens: Option<u64>,
    pub max_cost_usd: Option<f64>,
    /// Providers to fall back to, in order.
    pub fallback: Vec<String>,
}

impl RunRequest {
    /// The settings of a new run in `rt`'s working directory.
    pub fn new_run(&self, rt: &Runtime) -> RunSettings {
        RunSettings {
            provider: self.provider.clone(),
            model: self.model.clone(),
            auto_approve: self.yes,
            max_turns: self.max_turns.unwrap_or(rt.config.max_turns),
            cwd: rt.cwd.clone(),
            system_prompt: None,
            budget: Budget {
                max_tokens: self.max_tokens.or(rt.config.budget.max_tokens),
                max_cost_usd: self.max_cost_usd.or(rt.config.budget.max_cost_usd),
            },
        }
    }

    /// The settings that resume `state`, and how the run stood (`interrupted`, `failed`, ...).
    /// A completed run is not resumed.
    pub fn resume(&self, state: &RunState) -> Result<(RunSettings, &'static str)> {
        let run_id = &state.run_id;
        let previous = match state.status {
            RunStatus::Completed => {
                return Err(fail(
                    Problem::Conflict,
                    format!("run {run_id} already completed; `descartes logs {run_id}` shows what it did"),
                ));
            }
            RunStatus::Running => "interrupted",
            other => other.as_str(),
        };
        let started = state.started.clone().ok_or_else(|| CoreError::RunNotFound(run_id.to_string()))?;
        let (provider, model) = match (&self.provider, &self.model) {
            (Some(p), m) => (Some(p.clone()), m.clone()),
            (None, Some(m)) => (Some(state.provider.clone()), Some(m.clone())),
            (None, None) => (Some(state.provider.clone()), Some(state.model.clone())),
        };
        let settings = RunSettings {
            provider,
            model,
            auto_approve: self.yes || state.auto_approve,
            max_turns: self.max_turns.unwrap_or(state.max_turns),
            cwd: PathBuf::from(&started.cwd),
            system_prompt: started.system_prompt.clone(),
            // A resume keeps the run's caps unless new ones are given.
            budget: Budget {
                max_tokens: self.max_tokens.or(state.budget.max_tokens),
                max_cost_usd: self.max_cost_usd.or(state.budget.max_cost_usd),
            },
        };
        Ok((settings, previous))
    }
}

/// Where a driver reports, who it asks, what stops it, and the policy gate of its tool calls
/// (`None`: the global and project policies, as for any run; a task's run brings its own).
pub struct RunIo {
    pub sink: Arc<dyn OutputSink>,
    pub prompter: Arc<dyn Prompter>,
    pub cancel: CancellationToken,
    pub gate: Option<Arc<dyn ToolGate>>,
}

/// What drives a run: Descartes' own agent loop on a model, or an agent CLI.
enum Driver {
    Model(Agent),
    Cli(ExternalAgent),
}

/// The agent of a run, ready to start or resume it.
pub struct Prepared {
    driver: Driver,
    /// Provider and model, for messages.
    pub label: String,
}

impl Prepared {
    /// Starts run `run_id` on `goal`.
    pub async fn start(
        &self,
        run_id: RunId,
        prompt: String,
        goal: descartes_protocol::Message,
    ) -> Result<RunOutcome, CoreError> {
        match &self.driver {
            Driver::Model(a) => a.start(run_id, prompt, goal).await,
            Driver::Cli(a) => {
                let outcome = a.start(run_id.clone(), prompt, goal).await?;
                after_cli(a, run_id, outcome).await
            }
        }
    }

    /// Resumes the run `state` folds (`previous`: how it stood).
    pub async fn resume(&self, state: RunState, previous: &str) -> Result<RunOutcome, CoreError> {
        match &self.driver {
            Driver::Model(a) => a.resume(state, previous).await,
            Driver::Cli(a) => {
                let run_id = state.run_id.clone();
                let outcome = a.resume(state, previous).await?;
                after_cli(a, run_id, outcome).await
            }
        }
    }

    /// The agent loop, when the run is on a model provider (`chat` drives it turn by turn).
    pub fn into_agent(self) -> Option<Agent> {
        match self.driver {
            Driver::Model(a) => Some(a),
            Driver::Cli(_) => None,
        }
    }
}

/// Maps a CLI run's outcome; a rate-limited CLI is parked until its limit resets, then its
/// session is resumed (cancellable; a crash meanwhile leaves the run `parked`).
async fn after_cli(a: &ExternalAgent, run_id: RunId, mut outcome: ExternalOutcome) -> Result<RunOutcome, CoreError> {
    loop {
        return Ok(match outcome {
            ExternalOutcome::Completed { result } => RunOutcome::Completed { result },
            ExternalOutcome::Failed { error, kind } => RunOutcome::Failed { error, kind },
            ExternalOutcome::Cancelled => RunOutcome::Cancelled,
            ExternalOutcome::BudgetExceeded { error } => RunOutcome::BudgetExceeded { error },
            ExternalOutcome::Parked { until, reason } => {
                let wait = until.since(descartes_protocol::Timestamp::now());
                a.sink.notice(&format!(
                    "{} is rate-limited ({reason}); run {run_id} is parked until {} and continues then",
                    a.backend.name(),
                    until.to_local("%H:%M:%S")
                ));
                tokio::select! {
                    _ = a.cancel.cancelled() => return Ok(RunOutcome::Cancelled),
                    _ = tokio::time::sleep(wait) => {}
                }
                let state = a.store.replay_run(&run_id).await?;
                outcome = a.resume(state, "parked").await?;
                continue;
            }
        });
    }
}

/// The agent (Descartes' loop on a model provider, or an agent CLI) for a run.
pub async fn prepare(
    rt: &Runtime,
    store: Arc<dyn EventStore>,
    fallback: &[String],
    settings: RunSettings,
    io: RunIo,
) -> Result<Prepared> {
    prepare_with_policy(rt, store, fallback, settings, io, None).await
}

/// The permission rules of `rt`'s runs, compiled (regexes and globs): what a long-lived process
/// compiles once for all its runs and hands to [`prepare_with_policy`].
pub fn permission_policy(rt: &Runtime) -> Result<descartes_core::policy::Policy> {
    rt.permission_policy().map_err(|e| fail(Problem::Config, e.to_string()))
}

/// [`prepare`] with the permission rules already compiled (`None`: compile them now).
pub async fn prepare_with_policy(
    rt: &Runtime,
    store: Arc<dyn EventStore>,
    fallback: &[String],
    settings: RunSettings,
    io: RunIo,
    policy: Option<descartes_core::policy::Policy>,
) -> Result<Prepared> {
    let RunSettings { provider, model, auto_approve, max_turns, cwd, system_prompt, budget } = settings;
    let RunIo { sink, prompter, cancel, gate } = io;
    for (flag, v) in [("--max-tokens", budget.max_tokens.map(|t| t as f64)), ("--max-cost-usd", budget.max_cost_usd)] {
        if v.is_some_and(|v| !(v > 0.0 && v.is_finite())) {
            return Err(fail(Problem::Usage, format!("{flag} must be a positive number")));
        }
    }
    let sel = rt.select(provider.as_deref(), model.as_deref())?;
    // The project's policy governs every run: a task's run brings its own gate (with the task's
    // facts), other runs get the global and project policies.
    let gate = match gate {
        Some(g) => Some(g),
        None => run_gate(rt, &sel)?,
    };
    // An agent CLI has its own system prompt; ours is added only when configured.
    let system_prompt = match system_prompt {
        Some(p) => Some(p),
        None if sel.is_agent_cli() => rt.config.system_prompt.clone(),
        None => Some(system_prompt_with_rules(rt, &cwd, &[])?.0),
    };
    let label = if sel.model.is_empty() { sel.provider.clone() } else { format!("{}/{}", sel.provider, sel.model) };
    let config = AgentConfig {
        provider: sel.provider.clone(),
        model: sel.model.clone(),
        max_turns,
        auto_approve,
        system_prompt,
        max_tokens: sel.max_tokens,
        cwd,
        spool_root: rt.places.spool_dir(),
        budget,
    };
    let policy = match policy {
        Some(p) => p,
        None => permission_policy(rt)?,
    };
    if sel.is_agent_cli() {
        if !fallback.is_empty() {
            return Err(fail(Problem::Usage, "--fallback applies to model providers, not to agent CLIs"));
        }
        let backend = rt.build_agent_cli(&sel)?;
        let driver = Driver::Cli(ExternalAgent { store, backend, prompter, policy, gate, sink, cancel, config });
        return Ok(Prepared { driver, label });
    }
    if sel.kind == "local" && sel.model == descartes_local::DEFAULT_MODEL && !rt.local_model_present(&sel.model) {
        // The default local model is fetched on first use, so `descartes run` works on a fresh
        // machine without an API key.
        sink.notice(&format!("the local model {} is not installed yet; fetching it once (about 100 MB)", sel.model));
        pull_model(rt, &sel.model, &*sink).await?;
    }
    let provider = rt.build_provider(&sel)?;
    if sel.kind == "local"
        && let Some(notice) = rt.local_model_notice(&sel).await
    {
        sink.notice(&notice);
    }
    let (resilience, warnings) = rt.resilience(&*store, &sel, fallback).await?;
    for w in warnings {
        sink.notice(&format!("warning: {w}"));
    }
    let agent = Agent {
        store,
        provider,
        policy,
        gate,
        tools: rt.tools_with_mcp().await,
        prompter,
        sink,
        cancel,
        tool_specs: Default::default(),
        resilience,
        config,
    };
    Ok(Prepared { driver: Driver::Model(agent), label })
}

/// The policy gate of a run that is not a task's (see
/// [`descartes_runtime::policy_gate::run_gate`]); a broken policy file is a config problem.
pub fn run_gate(rt: &Runtime, sel: &descartes_runtime::Selection) -> Result<Option<Arc<dyn ToolGate>>> {
    descartes_runtime::policy_gate::run_gate(rt, sel).map_err(|e| fail(Problem::Config, e.to_string()))
}

/// Downloads the local model `name` into the models directory.
pub async fn pull_model(rt: &Runtime, name: &str, sink: &dyn OutputSink) -> Result<PathBuf> {
    let dir = &rt.places.models_dir;
    sink.notice(&format!("pulling model {name} into {}", dir.display()));
    descartes_local::pull(name, dir).await.map_err(|e| anyhow::anyhow!("cannot pull model {name}: {e:#}"))
}

/// What a front end tells the user after a run ended (`descartes: ...` lines).
pub async fn wrap_up(
    rt: &Runtime,
    stores: &Stores,
    guardrails: &descartes_runtime::guardrails::Snapshot,
    run_id: &RunId,
) -> Result<Vec<String>> {
    stores.events.flush().await?;
    let mut notices: Vec<String> = guardrail_notice(rt, guardrails, run_id.as_str()).into_iter().collect();
    // The run's events get their hash-chained audit records now, so a later edit of the log
    // is found by `audit verify`.
    if let Err(e) = descartes_runtime::audit::sync_stream(stores, run_id.as_str()).await {
        notices.push(format!("warning: cannot record the run's audit trail: {e}"));
    }
    rt.clean_spool(run_id);
    Ok(notices)
}

/// The warning for guardrail files changed since `before` (see
/// `descartes_runtime::guardrails`), which are flagged.
pub fn guardrail_notice(rt: &Runtime, before: &descartes_runtime::guardrails::Snapshot, run: &str) -> Option<String> {
    match rt.flag_guardrail_changes(before, run) {
        Ok(changed) if changed.is_empty() => None,
        Ok(changed) => Some(format!(
            "warning: guardrail files changed during run {run}: {}; no agent runs again until you have \
             reviewed them and run `descartes config trust`",
            changed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )),
        Err(e) => Some(format!("warning: cannot check the guardrail files after run {run}: {e}")),
    }
}

/// How a run ended, as a problem (`None`: completed) and a message for the user.
pub fn outcome_problem(run_id: &RunId, outcome: &RunOutcome) -> Option<(Problem, String)> {
    match outcome {
        RunOutcome::Completed { .. } => None,
        RunOutcome::Failed { error, .. } => Some((
            Problem::Failed,
            format!("run {run_id} failed: {}", descartes_core::redact::redact(&error.to_string())),
        )),
        RunOutcome::Cancelled => {
            Some((Problem::Cancelled, format!("run {run_id} cancelled; continue it with `descartes resume {run_id}`")))
        }
        RunOutcome::BudgetExceeded { error } => {
            Some((Problem::BudgetExceeded, format!("run {run_id} stopped: {error} (`descartes resume {run_id} ...`)")))
        }
    }
}

/// How a run ended, from its terminal event (`run_completed`, `run_failed`, `run_cancelled`,
/// `budget_exceeded`); `None` for any other event. A client that watched a run's events
/// reports its end as the process that drove it does.
pub fn ending(event: &descartes_protocol::EventData) -> Option<RunOutcome> {
    use descartes_protocol::EventData;
    Some(match event {
        EventData::RunCompleted(c) => RunOutcome::Completed { result: c.result.clone() },
        EventData::RunFailed(f) => RunOutcome::Failed { error: f.error.clone(), kind: f.kind.clone() },
        EventData::RunCancelled(_) => RunOutcome::Cancelled,
        EventData::BudgetExceeded(b) => RunOutcome::BudgetExceeded { error: descartes_core::cost::budget_message(b) },
        _ => return None,
    })
}
