//! The commands. Each returns an exit code or an error that `dispatch` maps to one.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use descartes_app::run::{Prepared, RunIo, RunRequest, RunSettings};
use descartes_core::agent::goal_message;
use descartes_core::permission::NoPrompter;
use descartes_core::{CoreError, EventStore, OutputSink, Prompter, RunOutcome};
use descartes_protocol::{Event, EventData, RunId};
use descartes_runtime::Runtime;
use descartes_runtime::config::{self, LogFormat};
use tokio_util::sync::CancellationToken;

use crate::output::{HumanSink, JsonSink, TerminalPrompter, event_summary};
use crate::{Cli, Command, ConfigCommand, ModelArgs, ResumeArgs, RunArgs};

/// The exit code of an error: the one table in `descartes_app::error`.
fn exit_code(err: &anyhow::Error) -> u8 {
    descartes_app::classify(err).exit_code()
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
        if let Some(url) = &cli.server {
            let remote = crate::client::Remote::new(url, &rt)?;
            return tokio.block_on(crate::client::dispatch(remote, cli.command));
        }
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

/// The request of `run`/`resume`'s model flags.
fn request(args: &ModelArgs) -> RunRequest {
    RunRequest {
        provider: args.provider.clone(),
        model: args.model.clone(),
        yes: args.yes,
        max_turns: args.max_turns,
        max_tokens: args.max_tokens,
        max_cost_usd: args.max_cost_usd,
        fallback: args.fallback.clone(),
    }
}

/// The agent of a run on the terminal: human or JSON output, the terminal's prompt (none
/// without a terminal), stopped by SIGINT/SIGTERM.
async fn prepare(
    rt: &Runtime,
    store: Arc<dyn EventStore>,
    args: &ModelArgs,
    settings: RunSettings,
) -> Result<(Prepared, Option<Arc<HumanSink>>)> {
    let cancel = CancellationToken::new();
    install_signals(cancel.clone());
    let human = (!args.json).then(|| Arc::new(HumanSink::new()));
    let sink: Arc<dyn OutputSink> = match &human {
        Some(h) => h.clone(),
        None => Arc::new(JsonSink),
    };
    let prompter: Arc<dyn Prompter> =
        if std::io::stderr().is_terminal() { Arc::new(TerminalPrompter) } else { Arc::new(NoPrompter) };
    let io = RunIo { sink, prompter, cancel, gate: None };
    Ok((descartes_app::run::prepare(rt, store, &args.fallback, settings, io).await?, human))
}

async fn run(rt: Runtime, args: RunArgs) -> Result<u8> {
    let prompt = args.prompt.join(" ");
    if prompt.trim().is_empty() {
        return Err(descartes_app::fail(
            descartes_app::Problem::Usage,
            "the prompt is empty; say what the agent should do",
        ));
    }
    rt.check_guardrails()?;
    let stores = rt.open_stores().await?;
    let store = stores.events.clone();
    rt.sweep_completed(&*store).await;
    let settings = request(&args.model).new_run(&rt);
    let guardrails = rt.snapshot_guardrails();
    let (p, human) = prepare(&rt, store.clone(), &args.model, settings).await?;
    let piped = read_piped_stdin()?;
    let run_id = RunId::generate();
    let lock = rt.lock_run(&run_id)?;
    if !args.model.json {
        eprintln!("descartes: run {run_id} · {}", p.label);
    }
    let outcome = p.start(run_id.clone(), prompt.clone(), goal_message(&prompt, piped.as_deref())).await;
    finish(&rt, &stores, &guardrails, &run_id, outcome, human.as_deref(), lock).await
}

async fn resume(rt: Runtime, args: ResumeArgs) -> Result<u8> {
    rt.check_guardrails()?;
    let stores = rt.open_stores().await?;
    let store = stores.events.clone();
    let run_id = rt.resolve_run(&*store, &args.id).await?;
    let lock = rt.lock_run(&run_id)?;
    let state = store.replay_run(&run_id).await?;
    let (settings, previous) = request(&args.model).resume(&state)?;
    let guardrails = rt.snapshot_guardrails();
    let (p, human) = prepare(&rt, store.clone(), &args.model, settings).await?;
    if !args.model.json {
        eprintln!("descartes: resuming run {run_id} ({previous}, {} events) · {}", state.events, p.label);
    }
    let outcome = p.resume(state, previous).await;
    finish(&rt, &stores, &guardrails, &run_id, outcome, human.as_deref(), lock).await
}

/// Flags the guardrail files that changed since `before` (see `descartes_runtime::guardrails`)
/// and says so.
pub(crate) fn warn_guardrail_changes(rt: &Runtime, before: &descartes_runtime::guardrails::Snapshot, run: &str) {
    if let Some(n) = descartes_app::run::guardrail_notice(rt, before, run) {
        eprintln!("descartes: {n}");
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
    for n in descartes_app::run::wrap_up(rt, stores, guardrails, run_id).await? {
        eprintln!("descartes: {n}");
    }
    let outcome = outcome?;
    lock.release();
    Ok(match descartes_app::run::outcome_problem(run_id, &outcome) {
        None => 0,
        Some((problem, message)) => {
            eprintln!("descartes: {message}");
            problem.exit_code()
        }
    })
}

async fn list(rt: Runtime, json: bool) -> Result<u8> {
    let store = rt.open_store().await?;
    let runs = store.list_runs().await?;
    let rows: Vec<RunRow> = runs
        .iter()
        .map(|r| RunRow {
            run_id: r.run_id.to_string(),
            status: rt.run_status(r),
            prompt: r.prompt.clone(),
            provider: r.provider.clone(),
            model: r.model.clone(),
            started_at: r.started_at,
            updated_at: r.updated_at,
            tokens: r.tokens,
            estimated_tokens: r.estimated_tokens,
            cost_usd: r.cost_usd,
        })
        .collect();
    print_runs(&rows, json)
}

/// A run as `descartes list` shows it (the API's run view has the same fields).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct RunRow {
    pub run_id: String,
    pub status: String,
    pub prompt: String,
    pub provider: String,
    pub model: String,
    pub started_at: descartes_protocol::Timestamp,
    pub updated_at: descartes_protocol::Timestamp,
    pub tokens: u64,
    /// Of `tokens`, those Descartes counted because the provider reported none.
    #[serde(default)]
    pub estimated_tokens: u64,
    pub cost_usd: f64,
}

/// Prints runs, newest first, as `descartes list` does.
pub(crate) fn print_runs(runs: &[RunRow], json: bool) -> Result<u8> {
    if json {
        let items: Vec<serde_json::Value> = runs.iter().map(serde_json::to_value).collect::<Result<_, _>>()?;
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(0);
    }
    if runs.is_empty() {
        eprintln!("no runs yet; start one with `descartes run \"...\"`");
        return Ok(0);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<26}  {:<15}  {:<19}  {:>9}  {:>9}  PROMPT", "ID", "STATUS", "STARTED", "TOKENS", "COST")?;
    for r in runs {
        writeln!(
            out,
            "{:<26}  {:<15}  {:<19}  {:>9}  {:>9}  {}",
            r.run_id,
            r.status,
            local_time(r.started_at.as_micros(), "%Y-%m-%d %H:%M:%S"),
            // `~`: partly counted by Descartes (the provider reported no usage).
            format!("{}{}", if r.estimated_tokens > 0 { "~" } else { "" }, crate::output::human_tokens(r.tokens)),
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
    let stop = ctrl_c_token();
    let mut printer = LogPrinter::new(run.clone(), json);
    let filter = descartes_core::follow::EventFilter { stream: run.clone(), kinds: Vec::new() };
    let mut follower = descartes_core::follow::Follower::new(&*store, filter, 0);
    loop {
        let batch: Vec<Event> = follower.next_page(1000).await?;
        let ended = printer.print(&batch)?;
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
    printer.finish(follow);
    Ok(0)
}

/// A token cancelled by Ctrl-C.
pub(crate) fn ctrl_c_token() -> CancellationToken {
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        token.cancel();
    });
    stop
}

/// Prints events as `descartes logs` does, and a run's totals at the end.
pub(crate) struct LogPrinter {
    run: Option<RunId>,
    json: bool,
    printed: usize,
    totals: (u32, descartes_protocol::Usage, f64),
}

impl LogPrinter {
    pub(crate) fn new(run: Option<RunId>, json: bool) -> Self {
        Self { run, json, printed: 0, totals: (0, descartes_protocol::Usage::default(), 0.0) }
    }

    /// Prints a batch; says whether its last event ended a run.
    pub(crate) fn print(&mut self, batch: &[Event]) -> Result<bool> {
        let mut ended = false;
        let mut out = std::io::stdout().lock();
        for e in batch {
            self.printed += 1;
            if let EventData::ModelCallCompleted(c) = &e.data {
                self.totals.0 += 1;
                self.totals.1.add(&c.usage);
                self.totals.2 += c.cost_usd.unwrap_or(0.0);
            }
            if self.json {
                writeln!(out, "{}", serde_json::to_string(e)?)?;
            } else {
                let time = e.at.to_local("%H:%M:%S%.3f");
                let who = if self.run.is_some() {
                    String::new()
                } else {
                    format!("{}  ", &e.run_id.as_str()[..e.run_id.as_str().len().min(10)])
                };
                writeln!(out, "{:>6}  {time}  {who}{:<21} {}", e.seq, e.kind(), event_summary(e))?;
            }
            ended = descartes_app::run::ending(&e.data).is_some();
        }
        out.flush()?;
        Ok(ended)
    }

    /// The closing line: "no events yet", or a run's totals.
    pub(crate) fn finish(&self, follow: bool) {
        if self.printed == 0 && !self.json && !follow {
            eprintln!("no events yet");
        } else if self.run.is_some() && !self.json {
            let (calls, usage, cost) = &self.totals;
            println!(
                "total: {calls} model calls, {}{} tokens ({} in, {} out, {} cached{}), {}",
                if usage.estimated { "~" } else { "" },
                usage.all_tokens(),
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_read_tokens + usage.cache_write_tokens,
                if usage.estimated { "; counted by Descartes: the provider reported no usage" } else { "" },
                if *cost > 0.0 { format!("${cost:.4}") } else { "no known cost".into() }
            );
        }
    }
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
