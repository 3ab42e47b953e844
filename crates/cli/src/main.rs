//! The `descartes` binary: argument parsing, printing, exit codes. Everything else lives in the
//! library crates; `main` maps their errors to exit codes (see `EXIT CODES` in `--help`).

mod commands;
mod daemon_cmd;
mod output;
mod task_cmd;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXIT_CODES: &str = "\
EXIT CODES:
  0    success (the run completed)
  1    the run failed (model or tool error, turn limit); `descartes resume ID` continues it
  2    usage error (bad arguments)
  3    configuration error (bad config file, missing API key, unknown provider)
  4    store error (database cannot be opened or written)
  5    not found / wrong state (unknown run or task id, run already completed or running
       elsewhere, daemon not running or already running)
  6    stale lease (the fencing token is no longer current; another worker holds the task)
  7    nothing to do (`task claim` found no ready task)
  130  cancelled (SIGINT/SIGTERM); `descartes resume ID` continues the run";

#[derive(Parser, Debug)]
#[command(name = "descartes", version, about = "A durable control plane and runtime for AI agents", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
}

#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// Model provider (openai, anthropic, or one from the config).
    #[arg(short, long)]
    provider: Option<String>,
    /// Model name.
    #[arg(short, long)]
    model: Option<String>,
    /// Allow every permission ask (shell, write_file) in this run.
    #[arg(short = 'y', long)]
    yes: bool,
    /// Print the run's events as JSON lines instead of the answer.
    #[arg(long)]
    json: bool,
    /// Most model calls in the run.
    #[arg(long)]
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
