//! `descartes daemon start|status|stop`: the worker daemon of a state directory.
//!
//! Exit codes: `start` 0 (started), 5 (a daemon already runs here), 1 (it did not come up; the
//! log's tail is shown); `status` 0 (running), 5 (not running); `stop` 0 (stopped, or was not
//! running), 1 (still running after the grace period).

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use descartes_core::SystemClock;
use descartes_runtime::Runtime;
use descartes_runtime::config::LogFormat;
use descartes_runtime::daemon::{
    CommandRunner, Daemon, DaemonConfig, DaemonError, DaemonPaths, DaemonStatus, PidLock, bind_control, request,
    serve_control, terminate,
};
use serde_json::json;

use crate::task_cmd::parse_ttl;

/// Set in the environment of a daemon started in the background by `daemon start`.
const DETACHED_ENV: &str = "DESCARTES_DAEMON_DETACHED";
/// The command run for each task when `--command` is not given: the agent, on the task's
/// prompt (or title). Risky actions are not auto-approved (no terminal: they are denied).
/// `DESCARTES_SANDBOX` is set by the daemon only when it was started with `--sandbox MODE`, so
/// the task's run gets the same flag.
const DEFAULT_COMMAND: &str = r#"exec "$DESCARTES_BIN" ${DESCARTES_SANDBOX:+--sandbox "$DESCARTES_SANDBOX"} run -- "${DESCARTES_TASK_PROMPT:-$DESCARTES_TASK_TITLE}""#;
/// How long `daemon start` waits for the daemon's control socket to answer.
const START_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Subcommand, Debug)]
pub enum DaemonCommand {
    /// Start the daemon (in the background unless --foreground): workers claim queued tasks,
    /// run each with the task command, keep their leases alive, and complete or fail them.
    Start(StartArgs),
    /// Whether a daemon runs here: pid, workers, tasks in flight, uptime, counts.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stop the daemon gracefully (in-flight tasks finish within the grace period or are
    /// released for another worker) and wait until it is gone.
    Stop,
}

#[derive(Args, Debug, Clone)]
pub struct StartArgs {
    /// Workers (tasks run at once).
    #[arg(long, default_value = "4", value_parser = parse_workers, allow_hyphen_values = true)]
    pub workers: usize,
    /// Lease of a claimed task (e.g. 30s, 2m). Workers heartbeat every third of it; the tasks of
    /// a daemon that dies are taken over after it.
    #[arg(long, default_value = "30s", value_parser = parse_ttl, allow_hyphen_values = true)]
    pub lease_ttl: Duration,
    /// How long in-flight tasks may run on after a stop before their commands are killed and
    /// the tasks released (e.g. 30s; 0s kills at once).
    #[arg(long, default_value = "30s", value_parser = parse_grace, allow_hyphen_values = true)]
    pub grace: Duration,
    /// Shell command run for each task (`sh -c`, in this directory, in its own process group),
    /// with the task in DESCARTES_TASK_ID, _TITLE, _PROMPT, _TYPE, _PRIORITY, _LABELS (comma-
    /// separated), _ATTEMPT and _TOKEN. Exit 0 completes the task (the result is the last lines
    /// of stdout); another exit fails the attempt. Default: `descartes run` on the task's prompt.
    #[arg(long)]
    pub command: Option<String>,
    /// Run in this terminal instead of the background (logs still go to daemon.log).
    #[arg(long)]
    pub foreground: bool,
    /// Serve the HTTP API too, on ADDR (as `descartes serve --listen`): one process runs the
    /// workers and the API.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// The API's token file (as `descartes serve --token-file`).
    #[arg(long, value_name = "PATH", requires = "listen")]
    pub token_file: Option<std::path::PathBuf>,
}

fn parse_workers(s: &str) -> Result<usize, String> {
    match s.trim().parse::<i64>() {
        Ok(n) if n >= 1 => usize::try_from(n).map_err(|e| e.to_string()),
        Ok(_) => Err(format!("{s} workers: at least 1 is needed")),
        Err(_) => Err(format!("{s:?} is not a number of workers (e.g. 4)")),
    }
}

fn parse_grace(s: &str) -> Result<Duration, String> {
    if s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic()).trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_ttl(s)
}

pub fn run(rt: Runtime, command: DaemonCommand) -> Result<u8> {
    let paths = DaemonPaths::new(&rt.places.state_dir);
    match command {
        DaemonCommand::Start(args) if args.foreground => foreground(rt, args, &paths),
        DaemonCommand::Start(args) => start_detached(&rt, &args, &paths),
        DaemonCommand::Status { json } => status(&paths, json),
        DaemonCommand::Stop => stop(&paths),
    }
}

fn fail(code: u8, message: impl std::fmt::Display) -> Result<u8> {
    eprintln!("descartes: error: {message}");
    Ok(code)
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// `daemon start` without `--foreground`: runs this binary again with `--foreground`,
/// detached (its own process group, stdio to the log), and waits until it answers.
fn start_detached(rt: &Runtime, args: &StartArgs, paths: &DaemonPaths) -> Result<u8> {
    if let Some(pid) = paths.running_pid() {
        return fail(5, DaemonError::AlreadyRunning { pid });
    }
    paths.clean_stale();
    std::fs::create_dir_all(&rt.places.state_dir)
        .with_context(|| format!("cannot create {}", rt.places.state_dir.display()))?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .with_context(|| format!("cannot open the daemon log {}", paths.log.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().context("cannot find the descartes executable to start the daemon")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["daemon", "start", "--foreground"])
        .args(["--workers", &args.workers.to_string()])
        .args(["--lease-ttl", &ms(args.lease_ttl)])
        .args(["--grace", &ms(args.grace)]);
    if let Some(c) = &args.command {
        cmd.arg("--command").arg(c);
    }
    if let Some(listen) = &args.listen {
        cmd.arg("--listen").arg(listen);
    }
    if let Some(file) = &args.token_file {
        cmd.arg("--token-file").arg(file);
    }
    if let Some(mode) = rt.sandbox_flag {
        cmd.args(["--sandbox", mode.as_str()]);
    }
    cmd.current_dir(&rt.cwd)
        .env(DETACHED_ENV, "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("cannot open the daemon log")?)
        .stderr(log)
        .process_group(0);
    let mut child = cmd.spawn().context("cannot start the daemon process")?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(exit) = child.try_wait().context("cannot watch the daemon process")? {
            let tail = log_tail(&paths.log, log_start);
            let code = if exit.code() == Some(5) { 5 } else { 1 };
            return fail(code, format!("the daemon exited while starting ({exit}); {}:\n{tail}", paths.log.display()));
        }
        if let Ok(answer) = request(&paths.socket, &json!({ "cmd": "status" }), Duration::from_millis(500))
            && let Ok(st) = serde_json::from_value::<DaemonStatus>(answer)
        {
            println!(
                "daemon started: pid {}, {} worker{}, lease TTL {}; logs in {}",
                st.pid,
                st.workers,
                if st.workers == 1 { "" } else { "s" },
                humantime::format_duration(args.lease_ttl),
                paths.log.display()
            );
            return Ok(0);
        }
        if Instant::now() > deadline {
            return fail(
                1,
                format!(
                    "the daemon (pid {}) did not answer within {}s; see {}",
                    child.id(),
                    START_TIMEOUT.as_secs(),
                    paths.log.display()
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The log written since `from` (its last 20 lines).
fn log_tail(path: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.seek(SeekFrom::Start(from));
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn init_log(rt: &Runtime, paths: &DaemonPaths) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.log)
        .with_context(|| format!("cannot open the daemon log {}", paths.log.display()))?;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| rt.config.log.level.as_deref().and_then(|l| EnvFilter::try_new(l).ok()))
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(Mutex::new(file)).with_ansi(false);
    let _ = match rt.config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.try_init(),
    };
    Ok(())
}

/// The daemon itself (`daemon start --foreground`, also what the background start runs).
fn foreground(rt: Runtime, args: StartArgs, paths: &DaemonPaths) -> Result<u8> {
    let lock = match PidLock::acquire(&paths.pid) {
        Ok(l) => l,
        Err(e @ DaemonError::AlreadyRunning { .. }) => return fail(5, e),
        Err(e) => return Err(e).with_context(|| format!("cannot take the daemon lock {}", paths.pid.display())),
    };
    init_log(&rt, paths)?;
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = tokio.block_on(serve(rt, args, paths));
    let _ = std::fs::remove_file(&paths.socket);
    lock.release();
    if let Err(e) = &result {
        tracing::error!(error = %format!("{e:#}"), "the daemon stopped on an error");
    }
    result
}

/// The log's integrity, checked when the daemon starts and every 10 minutes: a deleted event
/// (a gap in the seqs) or an edited, deleted or reordered event that has an audit record is
/// reported loudly in the daemon's log.
async fn check_log_periodically(stores: descartes_runtime::Stores) {
    loop {
        match descartes_runtime::audit::check_log(&stores, false).await {
            Ok(check) if check.problems.is_empty() => {
                tracing::info!(events = check.events, trails = check.trails, "event log checked: intact");
            }
            Ok(check) => {
                for p in &check.problems {
                    tracing::error!("THE EVENT LOG WAS TAMPERED WITH: {p}");
                }
                tracing::error!(
                    "the event log failed its integrity check ({} problems); run `descartes audit verify`",
                    check.problems.len()
                );
            }
            Err(e) => tracing::warn!(error = %e, "cannot check the event log"),
        }
        tokio::time::sleep(Duration::from_secs(600)).await;
    }
}

async fn serve(rt: Runtime, args: StartArgs, paths: &DaemonPaths) -> Result<u8> {
    let stores = rt.open_stores().await?;
    let (tasks, events) = (stores.tasks.clone(), stores.events.clone());
    let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "descartes".into());
    let mut command = CommandRunner::new(args.command.clone().unwrap_or_else(|| DEFAULT_COMMAND.to_owned()), &rt.cwd)
        .with_env("DESCARTES_BIN", exe)
        .supervised_by(rt.sandbox());
    if args.command.is_none() {
        // The default command is Descartes itself (`descartes run`): it needs the provider
        // variables that the environment policy keeps from other commands.
        for (k, v) in descartes_runtime::provider_env(&rt) {
            command = command.with_env(k, v);
        }
        if let Some(mode) = rt.sandbox_flag {
            command = command.with_env("DESCARTES_SANDBOX", mode.as_str());
        }
    }
    // The API first: a bad address stops the start before any task is claimed.
    let rt = Arc::new(rt);
    let api = match &args.listen {
        Some(listen) => Some(crate::serve_cmd::Api::open(&rt, listen, args.token_file.as_deref()).await?),
        None => None,
    };
    // Tasks routed to registered agents run on them; the others run the daemon's command.
    let runner = descartes_app::executor::Executor::new(rt.clone(), stores.clone(), Some(command)).await?;
    let mut config = DaemonConfig::new(args.workers, args.lease_ttl);
    config.grace = args.grace;
    let daemon = Daemon::new(tasks, Arc::new(runner), Arc::new(SystemClock), config).with_events(events);
    let handle = daemon.handle();
    let listener = bind_control(&paths.socket)?;
    tokio::spawn(serve_control(listener, handle.clone()));
    tokio::spawn(check_log_periodically(stores.clone()));
    {
        let handle = handle.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term), Ok(mut hup)) =
                (signal(SignalKind::interrupt()), signal(SignalKind::terminate()), signal(SignalKind::hangup()))
            else {
                tracing::warn!("cannot listen for signals; stop the daemon with `descartes daemon stop`");
                return;
            };
            let mut stops = 0;
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                    _ = hup.recv() => { tracing::info!("SIGHUP ignored"); continue; }
                }
                stops += 1;
                if stops == 1 {
                    tracing::info!("signal received: stopping gracefully (a second one kills in-flight tasks)");
                    handle.stop();
                } else {
                    tracing::warn!("second signal: killing in-flight tasks and releasing them");
                    handle.stop_now();
                }
            }
        });
    }
    if std::env::var_os(DETACHED_ENV).is_none() {
        eprintln!(
            "descartes: daemon running (pid {}, {} workers); logs in {}; Ctrl-C stops it",
            std::process::id(),
            args.workers,
            paths.log.display()
        );
    }
    let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api_task = api.map(|api| {
        tracing::info!("serving the API on http://{}", api.bound);
        tokio::spawn(api.serve(async move {
            let _ = api_stopped.await;
        }))
    });
    daemon.run().await;
    // The workers are done: the API finishes its requests and ends its streams.
    let _ = api_stop.send(());
    if let Some(task) = api_task
        && let Ok(Err(e)) = task.await
    {
        tracing::warn!("the API stopped with an error: {e}");
    }
    stores.events.flush().await?;
    Ok(0)
}

fn status(paths: &DaemonPaths, as_json: bool) -> Result<u8> {
    let Some(pid) = paths.running_pid() else {
        let cleaned = paths.clean_stale();
        if as_json {
            println!("{}", json!({ "running": false }));
        } else {
            let note = if cleaned { " (a stale pid file was removed)" } else { "" };
            println!("daemon: not running{note}");
            eprintln!("descartes: `descartes daemon start` starts it");
        }
        return Ok(5);
    };
    let st = match request(&paths.socket, &json!({ "cmd": "status" }), Duration::from_secs(5)) {
        Ok(v) => v,
        Err(e) => {
            return fail(
                1,
                format!(
                    "a daemon runs (pid {pid}) but its control socket {} does not answer: {e}",
                    paths.socket.display()
                ),
            );
        }
    };
    if as_json {
        let mut v = st;
        if let Some(o) = v.as_object_mut() {
            o.insert("running".into(), json!(true));
        }
        println!("{v}");
        return Ok(0);
    }
    let st: DaemonStatus = serde_json::from_value(st).context("the daemon's status answer is not understood")?;
    let state = if st.stopping { "stopping" } else { "running" };
    println!(
        "daemon: {state} (pid {}, up {}, since {})",
        st.pid,
        humantime::format_duration(Duration::from_secs(st.uptime_secs)),
        st.started_at
    );
    println!(
        "workers: {} (lease TTL {}, grace {})",
        st.workers,
        humantime::format_duration(Duration::from_millis(st.lease_ttl_ms)),
        humantime::format_duration(Duration::from_millis(st.grace_ms))
    );
    println!("runner: {}", st.runner);
    println!("in flight: {}", st.in_flight.len());
    for t in &st.in_flight {
        println!(
            "  {}  {}  ({}, attempt {}, since {})",
            t.task_id,
            crate::output::clip_line(&t.title, 60),
            t.worker,
            t.attempt,
            t.since
        );
    }
    println!("done: {}  failed: {}  released: {}  lost: {}", st.done, st.failed, st.released, st.lost);
    Ok(0)
}

fn stop(paths: &DaemonPaths) -> Result<u8> {
    let Some(pid) = paths.running_pid() else {
        paths.clean_stale();
        eprintln!("descartes: no daemon is running here");
        return Ok(0);
    };
    let status = request(&paths.socket, &json!({ "cmd": "status" }), Duration::from_secs(2))
        .ok()
        .and_then(|v| serde_json::from_value::<DaemonStatus>(v).ok());
    let grace = status.as_ref().map(|s| Duration::from_millis(s.grace_ms)).unwrap_or(Duration::from_secs(30));
    let asked = request(&paths.socket, &json!({ "cmd": "stop" }), Duration::from_secs(2));
    if let Err(e) = asked {
        if pid == 0 {
            return fail(
                1,
                format!("cannot reach the daemon ({e}) and its pid is unknown; see {}", paths.pid.display()),
            );
        }
        tracing::debug!(error = %e, "control socket unreachable; sending SIGTERM");
        terminate(pid).with_context(|| format!("cannot signal the daemon (pid {pid})"))?;
    }
    if let Some(n) = status.as_ref().map(|s| s.in_flight.len()).filter(|n| *n > 0) {
        eprintln!(
            "descartes: waiting for {n} task(s) in flight to finish (up to {}, then they are released)",
            humantime::format_duration(grace)
        );
    }
    let deadline = Instant::now() + grace + Duration::from_secs(10);
    while paths.running_pid().is_some() {
        if Instant::now() > deadline {
            return fail(
                1,
                format!(
                    "the daemon (pid {pid}) is still running; `kill -9 {pid}` ends it at once (its tasks are taken \
                     over when their leases expire)"
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("daemon stopped (pid {pid})");
    Ok(0)
}
