//! The `descartes` binary: argument parsing, printing, exit codes. Everything else lives in the
//! library crates; `main` maps their errors to exit codes (see `EXIT CODES` in `--help`).

mod ai_cmd;
mod audit_cmd;
mod chat;
mod client;
mod commands;
mod daemon_cmd;
mod mcp_cmd;
mod model_cmd;
mod output;
mod permissions_cmd;
mod policy_cmd;
mod providers_cmd;
mod serve_cmd;
mod session_cmd;
mod task_cmd;
mod task_exec_cmd;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXIT_CODES: &str = "\
EXIT CODES:
  0    success (the run completed)
  1    the run failed (model or tool error, turn limit); `descartes resume ID` continues it
  2    usage error (bad arguments)
  3    configuration error (bad config file, missing API key, unknown provider, guardrail
       files changed by a run awaiting `descartes config trust`)
  4    store error (database cannot be opened or written)
  5    not found / wrong state (unknown run or task id, run already completed or running
       elsewhere, daemon not running or already running)
  6    stale lease (the fencing token is no longer current; another worker holds the task)
  7    nothing to do (`task claim` found no ready task)
  8    budget exceeded (the run stopped before crossing --max-tokens / --max-cost-usd);
       `descartes resume ID --max-cost-usd X` continues it with a higher cap
  130  cancelled (SIGINT/SIGTERM); `descartes resume ID` continues the run";

#[derive(Parser, Debug)]
#[command(name = "descartes", version, about = "A durable control plane and runtime for AI agents", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How shell commands are confined, over the config: read-only, workspace-write, or
    /// full-access (no sandbox, and Descartes' own files are no longer protected from tools).
    /// Settings that loosen the sandbox are honoured only from here and the user config.
    #[arg(long, global = true, value_name = "MODE")]
    sandbox: Option<descartes_tools::SandboxMode>,
    /// Talk to a running `descartes serve` at URL instead of opening the database (`run`,
    /// `resume`, `list`, `logs`, and `task create|list|show|cancel|retry|approve|diff|merge|
    /// discard`); the token comes from DESCARTES_SERVER_TOKEN or this place's `server.token`.
    #[arg(long, global = true, value_name = "URL", env = "DESCARTES_SERVER")]
    server: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make `.descartes/` (config and database) in the current directory. Safe to run again.
    Init,
    /// Give a goal to an agent and stream its answer. Piped stdin is added to the prompt.
    #[command(visible_alias = "spawn")]
    Run(RunArgs),
    /// List runs with their status.
    List {
        /// Print JSON (an array of runs).
        #[arg(long)]
        json: bool,
    },
    /// Continue a run that was interrupted, cancelled or failed.
    Resume(ResumeArgs),
    /// Show the event log of all runs or of one run.
    Logs {
        /// A run id (or a unique prefix of one). Without it: all runs.
        id: Option<String>,
        /// Keep printing new events as they are appended (a single run: until it ends).
        #[arg(short, long)]
        follow: bool,
        /// Print events as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// The task queue: create, claim, complete, watch tasks and their dependency graph.
    Task {
        #[command(subcommand)]
        command: task_cmd::TaskCommand,
    },
    /// The worker daemon: claims queued tasks and runs them (`daemon start|status|stop`).
    Daemon {
        #[command(subcommand)]
        command: daemon_cmd::DaemonCommand,
    },
    /// The local models the in-process `local` provider runs (`model pull`, `model list`).
    Model {
        #[command(subcommand)]
        command: model_cmd::ModelCommand,
    },
    /// List the model providers and agent CLIs with their health (circuit breaker, recent
    /// calls); `--check` probes each one that is configured.
    Providers {
        /// Make the cheapest authenticated call to each configured provider.
        #[arg(long)]
        check: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Serve the HTTP API (runs, the event log, live event streams) on 127.0.0.1:7878; every
    /// request needs the token (`--print-token`).
    Serve(crate::serve_cmd::ServeArgs),
    /// The effective permission rules, in precedence order, with the file each came from.
    Permissions {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The agents ("AI instances") that tasks are routed to.
    Ai {
        #[command(subcommand)]
        command: ai_cmd::AiCommand,
    },
    /// The project's policy engine: check policy files, explain a task's decisions.
    Policy {
        #[command(subcommand)]
        command: policy_cmd::PolicyCommand,
    },
    /// The tamper-evident trail of a task (`audit TASK`), and the check of the whole log, every
    /// stream's trail included (`audit verify`).
    Audit(audit_cmd::AuditArgs),
    /// MCP servers whose tools runs get (`mcp add|list|remove`).
    Mcp {
        #[command(subcommand)]
        command: mcp_cmd::McpCommand,
    },
    /// An interactive chat (a session: a durable run that `descartes session` lists, resumes,
    /// exports and searches). Without a terminal, reads one message per line from stdin.
    Chat(chat::ChatArgs),
    /// Chat sessions: list, show, resume, delete (a tombstone: the log is append-only),
    /// export (JSON or Markdown), search.
    Session {
        #[command(subcommand)]
        command: session_cmd::SessionCommand,
    },
    /// Show or check the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print the effective configuration (secrets redacted) and where it came from.
    Show,
    /// Check every config file; errors name the file, line and column.
    Check,
    /// Accept the guardrail files (config, `.ai/` policies and skills) that a run changed, once
    /// you have reviewed them: until then no agent runs.
    Trust,
}

#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// Model provider or agent CLI: openai, openai-responses, anthropic, gemini, xai, ollama,
    /// local, claude-code, codex, gemini-cli, command, or one declared in config
    /// (`descartes providers` lists them).
    #[arg(short, long)]
    provider: Option<String>,
    /// Continue on this provider when the provider fails after its retries (repeatable; tried
    /// in order, before the config's `fallback` list).
    #[arg(long = "fallback", value_name = "PROVIDER")]
    fallback: Vec<String>,
    /// Stop the run before a model call that would take its tokens (input + output) past N.
    #[arg(long, value_name = "N")]
    max_tokens: Option<u64>,
    /// Stop the run before a model call that would take its cost past X US dollars.
    #[arg(long, value_name = "X")]
    max_cost_usd: Option<f64>,
    /// Model name.
    #[arg(short, long)]
    model: Option<String>,
    /// Allow every permission ask (shell, write_file) in this run.
    #[arg(short = 'y', long)]
    yes: bool,
    /// Print the run's events as JSON lines instead of the answer.
    #[arg(long)]
    json: bool,
    /// Most model calls in the run (at least 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_turns: Option<u32>,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The goal.
    #[arg(required = true, num_args = 1.., trailing_var_arg = true)]
    prompt: Vec<String>,
}

#[derive(Args, Debug)]
struct ResumeArgs {
    /// The run id (or a unique prefix).
    id: String,
    #[command(flatten)]
    model: ModelArgs,
}

fn main() -> ExitCode {
    // The sandbox helper: restricts this (still single-threaded) process, then runs the command.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new("__sandbox")) {
        return sandbox_helper();
    }
    quiet_broken_pipe();
    let cli = Cli::parse();
    commands::dispatch(cli)
}

/// `descartes logs | head`: when the reader goes away, stop quietly like other Unix tools
/// (`println!` panics on a closed stdout; errors are handled in `commands::dispatch`).
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg =
            payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied());
        if msg.is_some_and(|m| m.contains("Broken pipe")) {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// `descartes __sandbox ...`: see `descartes_tools::sandbox::helper_main`. Returns only for a
/// probe or an error (125: the sandbox could not be set up; 127: the command could not start).
fn sandbox_helper() -> ExitCode {
    use descartes_tools::sandbox::{HelperOutcome, SandboxError, helper_main};
    match helper_main(std::env::args_os().skip(2)) {
        Ok(HelperOutcome::Probed(status)) => {
            println!("{}", serde_json::to_string(&status).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("descartes: sandbox: {e}");
            ExitCode::from(if matches!(e, SandboxError::Exec { .. }) { 127 } else { 125 })
        }
    }
}
