//! The commands. Each returns an exit code or an error that `dispatch` maps to one.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use descartes_core::agent::goal_message;
use descartes_core::external::{ExternalAgent, ExternalOutcome};
use descartes_core::permission::NoPrompter;
use descartes_core::state::{RunState, RunStatus};
use descartes_core::{Agent, AgentConfig, Budget, CoreError, EventStore, OutputSink, Prompter, RunOutcome, StoreError};
use descartes_protocol::{Event, EventData, RunId};
use descartes_runtime::config::{self, LogFormat};
use descartes_runtime::{Runtime, RuntimeError};
use tokio_util::sync::CancellationToken;

use crate::output::{HumanSink, JsonSink, TerminalPrompter, event_summary};
use crate::{Cli, Command, ConfigCommand, ModelArgs, ResumeArgs, RunArgs};

const DEFAULT_SYSTEM_PROMPT: &str = "You are Descartes, an autonomous software agent. You work in the directory given \
below, using the tools to inspect files, run commands and make changes. Work step by step; when the goal is reached, \
answer with a short summary of what you did and found.";

/// The system prompt of a new run on a model provider: the configured one or the default, then
/// the rules and context files (see `descartes_runtime::context` for their order), then
/// `session` rules files. Returns the prompt and the files it holds.
pub(crate) fn system_prompt_with_rules(
    rt: &Runtime,
    cwd: &std::path::Path,
    session: &[PathBuf],
) -> Result<(String, Vec<PathBuf>)> {
    let base = rt
        .config
        .system_prompt
        .clone()
        .unwrap_or_else(|| format!("{DEFAULT_SYSTEM_PROMPT}\n\nWorking directory: {}", cwd.display()));
    let (files, left_out) = rt.rules(session).map_err(|e| user_error(2, e.to_string()))?;
    let rules = descartes_runtime::context::render_rules(&files, &left_out);
    Ok((format!("{base}{rules}"), files.into_iter().map(|f| f.path).collect()))
}

/// An error with its exit code and a message that says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct UserError {
    code: u8,
    message: String,
}

pub(crate) fn user_error(code: u8, message: impl Into<String>) -> anyhow::Error {
    UserError { code, message: message.into() }.into()
}

fn exit_code(err: &anyhow::Error) -> u8 {
    if let Some(u) = err.downcast_ref::<UserError>() {
        return u.code;
    }
    if let Some(r) = err.downcast_ref::<RuntimeError>() {
        return match r {
            RuntimeError::Config(_)
            | RuntimeError::UnknownProvider { .. }
            | RuntimeError::UnknownKind { .. }
            | RuntimeError::MissingApiKey { .. }
            | RuntimeError::Provider(_) => 3,
            RuntimeError::Store(_) => 4,
            RuntimeError::EmptyRunId => 2,
            RuntimeError::GuardrailsChanged(_) => 3,
            RuntimeError::RunNotFound(_) | RuntimeError::AmbiguousRun { .. } => 5,
            RuntimeError::Io(e) if e.kind() == std::io::ErrorKind::WouldBlock => 5,
            RuntimeError::Io(_) => 1,
        };
    }
    if err.downcast_ref::<StoreError>().is_some() {
        return 4;
    }
    if let Some(t) = err.downcast_ref::<descartes_core::TaskError>() {
        return crate::task_cmd::exit_code(t);
    }
    if let Some(c) = err.downcast_ref::<CoreError>() {
        return match c {
            CoreError::Store(_) => 4,
            CoreError::RunNotFound(_) | CoreError::NotResumable(_) => 5,
            CoreError::Cancelled => 130,
            _ => 1,
        };
    }
    1
}

pub fn dispatch(cli: Cli) -> ExitCode {
    let result = (|| -> Result<u8> {
        let cwd = std::env::current_dir().context("cannot read the current directory")?;
        if let Command::Init = cli.command {
            init_tracing(LogFormat::Human, None);
            return init(cwd);
        }
        if let Some(stray) = descartes_runtime::places::stray_state_file(&cwd) {
            eprintln!(
                "descartes: warning: {} is not a directory, so it is not a project: working in direct mode",
                stray.display()
            );
        }
        let mut rt = Runtime::load(cwd)?;
        if let Some(mode) = cli.sandbox {
            rt.set_sandbox_flag(mode);
        }
        for ignored in &rt.config.ignored {
            eprintln!("descartes: warning: {ignored}");
        }
        if let Command::Daemon { command } = cli.command {
            // The daemon logs to its own file and runs its own (multi-threaded) tokio runtime.
            return crate::daemon_cmd::run(rt, command);
        }
        init_tracing(rt.config.log.format, rt.config.log.level.as_deref());
        let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        tokio.block_on(async move {
            match cli.command {
                Command::Init | Command::Daemon { .. } => Ok(0),
                Command::Run(args) => run(rt, args).await,
                Command::Resume(args) => resume(rt, args).await,
                Command::List { json } => list(rt, json).await,
                Command::Logs { id, follow, json } => logs(rt, id, follow, json).await,
                Command::Config { command } => config_command(rt, command),
                Command::Model { command } => crate::model_cmd::run(rt, command).await,
                Command::Providers { check, json } => crate::providers_cmd::run(rt, check, json).await,
                Command::Task { command } => crate::task_cmd::run(rt, command).await,
                Command::Mcp { command } => crate::mcp_cmd::run(rt, command).await,
                Command::Ai { command } => crate::ai_cmd::run(rt, command).await,
                Command::Audit(args) => crate::audit_cmd::run(rt, args).await,
                Command::Policy { command } => crate::policy_cmd::run(rt, command).await,
                Command::Chat(args) => crate::chat::run(rt, args, None).await,
                Command::Session { command } => crate::session_cmd::run(rt, command).await,
                Command::Permissions { json } => crate::permissions_cmd::run(&rt, json),
                Command::Serve(args) => crate::serve_cmd::run(rt, args).await,
            }
        })
    })();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) if is_broken_pipe(&err) => ExitCode::from(141),
        Err(err) => {
            eprintln!("descartes: error: {}", descartes_core::redact::redact(&format!("{err:#}")));
            ExitCode::from(exit_code(&err))
        }
    }
}

/// The reader of our output went away (`descartes logs | head`): not an error to report.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

fn init_tracing(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| level.and_then(|l| EnvFilter::try_new(l).ok()))
        .unwrap_or_else(|| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.with_ansi(crate::output::color()).try_init(),
    };
}

fn init(cwd: PathBuf) -> Result<u8> {
    let (places, existed) = Runtime::init_project(&cwd)?;
    let verb = if existed { "Reinitialized existing" } else { "Initialized" };
    println!("{verb} Descartes project in {}", places.state_dir.display());
    Ok(0)
}

/// Reads piped stdin (a pipe or a file), never a terminal or an inherited device.
fn read_piped_stdin() -> Result<Option<String>> {
    use std::os::unix::fs::FileTypeExt;
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(None);
    }
    let Ok(meta) = std::fs::metadata("/dev/stdin") else { return Ok(None) };
    let ft = meta.file_type();
    if !(ft.is_fifo() || ft.is_file()) {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    stdin.lock().read_to_end(&mut bytes).context("cannot read stdin")?;
    if bytes.is_empty() {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Cancels the token on SIGINT/SIGTERM; a second signal exits at once (every committed event
/// is already on disk).
fn install_signals(cancel: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
            return;
        };
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        eprintln!("\ndescartes: stopping (press Ctrl-C again to quit at once)");
        cancel.cancel();
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        std::process::exit(130);
    });
}

/// What drives a run: Descartes' own agent loop on a model, or an agent CLI.
enum Driver {
    Model(Agent),
    Cli(ExternalAgent),
}

pub(crate) struct Prepared {
    driver: Driver,
    /// Provider and model, for messages.
    label: String,
    human: Option<Arc<HumanSink>>,
}

impl Prepared {
    pub(crate) async fn start(
        &self,
        run_id: RunId,
        prompt: String,
        goal: descartes_protocol::Message,
    ) -> Result<RunOutcome, CoreError> {
        match &self.driver {
            Driver::Model(a) => a.start(run_id, prompt, goal).await,
            Driver::Cli(a) => {
                let outcome = a.start(run_id.clone(), prompt, goal).await?;
                self.after_cli(a, run_id, outcome).await
            }
        }
    }

    async fn resume(&self, state: RunState, previous: &str) -> Result<RunOutcome, CoreError> {
        match &self.driver {
            Driver::Model(a) => a.resume(state, previous).await,
            Driver::Cli(a) => {
                let run_id = state.run_id.clone();
                let outcome = a.resume(state, previous).await?;
                self.after_cli(a, run_id, outcome).await
            }
        }
    }

    /// Maps a CLI run's outcome; a rate-limited CLI is parked until its limit resets, then
    /// its session is resumed (cancellable; a crash meanwhile leaves the run `parked`).
    async fn after_cli(
        &self,
        a: &ExternalAgent,
        run_id: RunId,
        mut outcome: ExternalOutcome,
    ) -> Result<RunOutcome, CoreError> {
        loop {
            return Ok(match outcome {
                ExternalOutcome::Completed { result } => RunOutcome::Completed { result },
                ExternalOutcome::Failed { error, kind } => RunOutcome::Failed { error, kind },
                ExternalOutcome::Cancelled => RunOutcome::Cancelled,
                ExternalOutcome::BudgetExceeded { error } => RunOutcome::BudgetExceeded { error },
                ExternalOutcome::Parked { until, reason } => {
                    let wait = until.since(descartes_protocol::Timestamp::now());
                    eprintln!(
                        "descartes: {} is rate-limited ({reason}); run {run_id} is parked until {} and continues then",
                        a.backend.name(),
                        until.to_local("%H:%M:%S")
                    );
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
}

/// What a run (new or resumed) is driven with.
pub(crate) struct RunSettings {
    pub provider: Option<String>,
    pub model: Option<String>,
    pub auto_approve: bool,
    pub max_turns: u32,
    pub cwd: PathBuf,
    pub system_prompt: Option<String>,
    pub budget: Budget,
}

async fn prepare(
    rt: &Runtime,
    store: Arc<dyn EventStore>,
    args: &ModelArgs,
    settings: RunSettings,
) -> Result<Prepared> {
    let RunSettings { provider, model, auto_approve, max_turns, cwd, system_prompt, budget } = settings;
    for (flag, v) in [("--max-tokens", budget.max_tokens.map(|t| t as f64)), ("--max-cost-usd", budget.max_cost_usd)] {
        if v.is_some_and(|v| !(v > 0.0 && v.is_finite())) {
            return Err(user_error(2, format!("{flag} must be a positive number")));
        }
    }
    let cancel = CancellationToken::new();
    install_signals(cancel.clone());
    let human = (!args.json).then(|| Arc::new(HumanSink::new()));
    let sink: Arc<dyn OutputSink> = match &human {
        Some(h) => h.clone(),
        None => Arc::new(JsonSink),
    };
    let prompter: Arc<dyn Prompter> =
        if std::io::stderr().is_terminal() { Arc::new(TerminalPrompter) } else { Arc::new(NoPrompter) };
    let io = DriverIo { sink, prompter, cancel, gate: None, human };
    let settings = RunSettings { provider, model, auto_approve, max_turns, cwd, system_prompt, budget };
    prepare_driver(rt, store, &args.fallback, settings, io).await
}

/// Where a driver reports, who it asks, what stops it, and the policy gate of its tool calls.
pub(crate) struct DriverIo {
    pub sink: Arc<dyn OutputSink>,
    pub prompter: Arc<dyn Prompter>,
    pub cancel: CancellationToken,
    pub gate: Option<Arc<dyn descartes_core::permission::ToolGate>>,
    pub human: Option<Arc<HumanSink>>,
}

/// The agent (Descartes' loop on a model provider, or an agent CLI) for a run.
pub(crate) async fn prepare_driver(
    rt: &Runtime,
    store: Arc<dyn EventStore>,
    fallback: &[String],
    settings: RunSettings,
    io: DriverIo,
) -> Result<Prepared> {
    let RunSettings { provider, model, auto_approve, max_turns, cwd, system_prompt, budget } = settings;
    let DriverIo { sink, prompter, cancel, gate, human } = io;
    let sel = rt.select(provider.as_deref(), model.as_deref())?;
    // The project's policy governs every run: a task's run brings its own gate (with the task's
    // facts), `run` gets the global and project policies.
    let gate = match gate {
        Some(g) => Some(g),
        None => crate::policy_cmd::run_gate(rt, &sel)?,
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
    if sel.is_agent_cli() {
        if !fallback.is_empty() {
            return Err(user_error(2, "--fallback applies to model providers, not to agent CLIs"));
        }
        let backend = rt.build_agent_cli(&sel)?;
        let policy = rt.permission_policy().map_err(|e| user_error(3, e.to_string()))?;
        let driver = Driver::Cli(ExternalAgent { store, backend, prompter, policy, gate, sink, cancel, config });
        return Ok(Prepared { driver, label, human });
    }
    if sel.kind == "local" && sel.model == descartes_local::DEFAULT_MODEL && !rt.local_model_present(&sel.model) {
        // The default local model is fetched on first use, so `descartes run` works on a fresh
        // machine without an API key.
        eprintln!("descartes: the local model {} is not installed yet; fetching it once (about 100 MB)", sel.model);
        crate::model_cmd::pull(rt, &sel.model).await?;
    }
    let provider = rt.build_provider(&sel)?;
    let (resilience, warnings) = rt.resilience(&*store, &sel, fallback).await?;
    for w in warnings {
        eprintln!("descartes: warning: {w}");
    }
    let policy = rt.permission_policy().map_err(|e| user_error(3, e.to_string()))?;
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
    Ok(Prepared { driver: Driver::Model(agent), label, human })
}

async fn run(rt: Runtime, args: RunArgs) -> Result<u8> {
    let prompt = args.prompt.join(" ");
    if prompt.trim().is_empty() {
        return Err(user_error(2, "the prompt is empty; say what the agent should do"));
    }
    rt.check_guardrails()?;
    let stores = rt.open_stores().await?;
    let store = stores.events.clone();
    rt.sweep_completed(&*store).await;
    let max_turns = args.model.max_turns.unwrap_or(rt.config.max_turns);
    let settings = RunSettings {
        provider: args.model.provider.clone(),
        model: args.model.model.clone(),
        auto_approve: args.model.yes,
        max_turns,
        cwd: rt.cwd.clone(),
        system_prompt: None,
        budget: Budget {
            max_tokens: args.model.max_tokens.or(rt.config.budget.max_tokens),
            max_cost_usd: args.model.max_cost_usd.or(rt.config.budget.max_cost_usd),
        },
    };
    let guardrails = rt.snapshot_guardrails();
    let p = prepare(&rt, store.clone(), &args.model, settings).await?;
    let piped = read_piped_stdin()?;
    let run_id = RunId::generate();
    let lock = rt.lock_run(&run_id)?;
    if !args.model.json {
        eprintln!("descartes: run {run_id} · {}", p.label);
    }
    let outcome = p.start(run_id.clone(), prompt.clone(), goal_message(&prompt, piped.as_deref())).await;
    finish(&rt, &stores, &guardrails, &run_id, outcome, p.human.as_deref(), lock).await
}

async fn resume(rt: Runtime, args: ResumeArgs) -> Result<u8> {
    rt.check_guardrails()?;
    let stores = rt.open_stores().await?;
    let store = stores.events.clone();
    let run_id = rt.resolve_run(&*store, &args.id).await?;
    let lock = rt.lock_run(&run_id)?;
    let state = store.replay_run(&run_id).await?;
    let previous = match state.status {
        RunStatus::Completed => {
            return Err(user_error(
                5,
                format!("run {run_id} already completed; `descartes logs {run_id}` shows what it did"),
            ));
        }
        RunStatus::Running => "interrupted",
        other => other.as_str(),
    };
    let started = state.started.clone().ok_or_else(|| CoreError::RunNotFound(run_id.to_string()))?;
    let (provider, model) = match (&args.model.provider, &args.model.model) {
        (Some(p), m) => (Some(p.clone()), m.clone()),
        (None, Some(m)) => (Some(state.provider.clone()), Some(m.clone())),
        (None, None) => (Some(state.provider.clone()), Some(state.model.clone())),
    };
    let max_turns = args.model.max_turns.unwrap_or(state.max_turns);
    let settings = RunSettings {
        provider,
        model,
        auto_approve: args.model.yes || state.auto_approve,
        max_turns,
        cwd: PathBuf::from(&started.cwd),
        system_prompt: started.system_prompt.clone(),
        // A resume keeps the run's caps unless new ones are given.
        budget: Budget {
            max_tokens: args.model.max_tokens.or(state.budget.max_tokens),
            max_cost_usd: args.model.max_cost_usd.or(state.budget.max_cost_usd),
        },
    };
    let guardrails = rt.snapshot_guardrails();
    let p = prepare(&rt, store.clone(), &args.model, settings).await?;
    if !args.model.json {
        eprintln!("descartes: resuming run {run_id} ({previous}, {} events) · {}", state.events, p.label);
    }
    let outcome = p.resume(state, previous).await;
    finish(&rt, &stores, &guardrails, &run_id, outcome, p.human.as_deref(), lock).await
}

/// Flags the guardrail files that changed since `before` (see `descartes_runtime::guardrails`)
/// and says so.
pub(crate) fn warn_guardrail_changes(rt: &Runtime, before: &descartes_runtime::guardrails::Snapshot, run: &str) {
    match rt.flag_guardrail_changes(before, run) {
        Ok(changed) if changed.is_empty() => {}
        Ok(changed) => eprintln!(
            "descartes: warning: guardrail files changed during run {run}: {}; no agent runs again until you have \
             reviewed them and run `descartes config trust`",
            changed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
        Err(e) => eprintln!("descartes: warning: cannot check the guardrail files after run {run}: {e}"),
    }
}

async fn finish(
    rt: &Runtime,
    stores: &descartes_runtime::Stores,
    guardrails: &descartes_runtime::guardrails::Snapshot,
    run_id: &RunId,
    outcome: Result<RunOutcome, CoreError>,
    human: Option<&HumanSink>,
    lock: descartes_runtime::RunLock,
) -> Result<u8> {
    if let Some(h) = human {
        h.end_line();
    }
    stores.events.flush().await?;
    warn_guardrail_changes(rt, guardrails, run_id.as_str());
    // The run's events get their hash-chained audit records now, so a later edit of the log
    // is found by `audit verify`.
    if let Err(e) = descartes_runtime::audit::sync_stream(stores, run_id.as_str()).await {
        eprintln!("descartes: warning: cannot record the run's audit trail: {e}");
    }
    let code = match outcome? {
        RunOutcome::Completed { .. } => 0,
        RunOutcome::Failed { error, .. } => {
            eprintln!("descartes: run {run_id} failed: {}", descartes_core::redact::redact(&error.to_string()));
            1
        }
        RunOutcome::Cancelled => {
            eprintln!("descartes: run {run_id} cancelled; continue it with `descartes resume {run_id}`");
            130
        }
        RunOutcome::BudgetExceeded { error } => {
            eprintln!("descartes: run {run_id} stopped: {error} (`descartes resume {run_id} ...`)");
            8
        }
    };
    rt.clean_spool(run_id);
    lock.release();
    Ok(code)
}

async fn list(rt: Runtime, json: bool) -> Result<u8> {
    let store = rt.open_store().await?;
    let runs = store.list_runs().await?;
    if json {
        let items: Vec<_> = runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "run_id": r.run_id,
                    "status": rt.run_status(r),
                    "prompt": r.prompt,
                    "provider": r.provider,
                    "model": r.model,
                    "started_at": r.started_at,
                    "updated_at": r.updated_at,
                    "tokens": r.tokens,
                    "cost_usd": r.cost_usd,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(0);
    }
    if runs.is_empty() {
        eprintln!("no runs yet; start one with `descartes run \"...\"`");
        return Ok(0);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<26}  {:<15}  {:<19}  {:>9}  {:>9}  PROMPT", "ID", "STATUS", "STARTED", "TOKENS", "COST")?;
    for r in &runs {
        writeln!(
            out,
            "{:<26}  {:<15}  {:<19}  {:>9}  {:>9}  {}",
            r.run_id,
            rt.run_status(r),
            local_time(r.started_at.as_micros(), "%Y-%m-%d %H:%M:%S"),
            crate::output::human_tokens(r.tokens),
            crate::output::money(r.cost_usd),
            crate::output::clip_line(&r.prompt, 50)
        )?;
    }
    Ok(0)
}

fn local_time(micros: i64, fmt: &str) -> String {
    descartes_protocol::Timestamp(micros).to_local(fmt)
}

async fn logs(rt: Runtime, id: Option<String>, follow: bool, json: bool) -> Result<u8> {
    let store = rt.open_store().await?;
    let run = match &id {
        Some(prefix) => Some(rt.resolve_run(&*store, prefix).await?),
        None => None,
    };
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
    }
    let mut printed = 0usize;
    let mut totals = (0u32, descartes_protocol::Usage::default(), 0.0f64);
    let filter = descartes_core::follow::EventFilter { stream: run.clone(), kinds: Vec::new() };
    let mut follower = descartes_core::follow::Follower::new(&*store, filter, 0);
    loop {
        let batch: Vec<Event> = follower.next_page(1000).await?;
        let mut ended = false;
        {
            let mut out = std::io::stdout().lock();
            for e in &batch {
                printed += 1;
                if let EventData::ModelCallCompleted(c) = &e.data {
                    totals.0 += 1;
                    totals.1.add(&c.usage);
                    totals.2 += c.cost_usd.unwrap_or(0.0);
                }
                if json {
                    writeln!(out, "{}", serde_json::to_string(e)?)?;
                } else {
                    let time = e.at.to_local("%H:%M:%S%.3f");
                    let who = if run.is_some() {
                        String::new()
                    } else {
                        format!("{}  ", &e.run_id.as_str()[..e.run_id.as_str().len().min(10)])
                    };
                    writeln!(out, "{:>6}  {time}  {who}{:<21} {}", e.seq, e.kind(), event_summary(e))?;
                }
                ended = matches!(
                    e.data,
                    EventData::RunCompleted(_)
                        | EventData::RunFailed(_)
                        | EventData::RunCancelled(_)
                        | EventData::BudgetExceeded(_)
                );
            }
            out.flush()?;
        }
        if batch.len() == 1000 {
            continue;
        }
        if !follow || (run.is_some() && ended) || stop.is_cancelled() {
            break;
        }
        tokio::select! {
            _ = store.wait_for_events(follower.cursor(), Duration::from_secs(1)) => {}
            _ = stop.cancelled() => break,
        }
    }
    if printed == 0 && !json && !follow {
        eprintln!("no events yet");
    } else if run.is_some() && !json {
        let (calls, usage, cost) = totals;
        println!(
            "total: {calls} model calls, {} tokens ({} in, {} out, {} cached), {}",
            usage.all_tokens(),
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_tokens + usage.cache_write_tokens,
            if cost > 0.0 { format!("${cost:.4}") } else { "no known cost".into() }
        );
    }
    Ok(0)
}

fn config_command(rt: Runtime, command: ConfigCommand) -> Result<u8> {
    match command {
        ConfigCommand::Show => {
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "# mode: {}",
                match &rt.places.mode {
                    descartes_runtime::Mode::Project { root } => format!("project ({})", root.display()),
                    descartes_runtime::Mode::Direct => "direct".to_owned(),
                }
            )?;
            writeln!(out, "# database: {}", rt.database_location())?;
            for f in [&rt.places.user_config, &rt.places.project_config].into_iter().flatten() {
                let state = if rt.config_files.contains(f) { "read" } else { "not present" };
                writeln!(out, "# config file: {} ({state})", f.display())?;
            }
            match rt.select(None, None) {
                Ok(sel) => writeln!(
                    out,
                    "# provider in effect: {} (model {}, {})",
                    sel.provider,
                    sel.model,
                    descartes_core::redact::redact_url(&sel.base_url)
                )?,
                Err(e) => writeln!(out, "# provider in effect: none ({e})")?,
            }
            writeln!(out)?;
            write!(out, "{}", config::redacted_toml(&rt.config))?;
            Ok(0)
        }
        ConfigCommand::Trust => {
            let flagged = rt.trust_guardrails()?;
            if flagged.is_empty() {
                println!("no guardrail file awaits review");
            }
            for f in flagged {
                let what = if f.digest.is_some() { "changed" } else { "deleted" };
                println!("trusted: {} ({what} by run {})", f.path.display(), f.run);
            }
            Ok(0)
        }
        ConfigCommand::Check => {
            // Loading already checked every file; report what was read.
            if rt.config_files.is_empty() {
                println!("ok: no config files (built-in defaults)");
            }
            for f in &rt.config_files {
                println!("ok: {}", f.display());
            }
            Ok(0)
        }
    }
}
