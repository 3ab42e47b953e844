//! `shell {"command", "timeout_secs"?}`: runs a command with `sh -c` in the run's working
//! directory.
//!
//! Crash safety: each call runs inside a small wrapper with its own spool directory:
//! - `lock`: locked by us and inherited as the command's stdin, so the lock is held for as long
//!   as any process of the command lives, even after Descartes itself was killed;
//! - `started`: created by the wrapper just before the command runs;
//! - `stdout`, `stderr`: the command's output (files, not pipes, so the command never dies of
//!   SIGPIPE when Descartes dies);
//! - `exit`: the exit status, written atomically by the wrapper when the command ends.
//!
//! On resume, [`ShellTool::recover`] waits for the lock (the command finished), then reads the
//! result from the spool: a command that ran is never run again.

use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use descartes_core::{Recovery, Tool, ToolContext, ToolOutput};
use descartes_protocol::ToolSpec;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::{clip, str_arg};

const WRAPPER: &str =
    r#": > "$1/started"; sh -c "$0"; c=$?; printf '%s' "$c" > "$1/exit.tmp" && mv "$1/exit.tmp" "$1/exit"; exit $c"#;

/// The `shell` tool.
#[derive(Debug, Clone)]
pub struct ShellTool {
    default_timeout: Duration,
    max_output: usize,
}

impl ShellTool {
    pub fn new(default_timeout: Duration, max_output: usize) -> Self {
        Self { default_timeout, max_output }
    }

    fn timeout_of(&self, input: &Value) -> Result<Duration, ToolOutput> {
        match input.get("timeout_secs") {
            None | Some(Value::Null) => Ok(self.default_timeout),
            Some(v) => match v.as_u64() {
                Some(s) if s > 0 => Ok(Duration::from_secs(s)),
                _ => Err(ToolOutput::error(format!("argument `timeout_secs` must be a positive integer, got {v}"))),
            },
        }
    }

    fn result(&self, spool: &Path, exit_code: Option<i32>, timed_out: bool, cancelled: bool) -> ToolOutput {
        let stdout = std::fs::read(spool.join("stdout")).unwrap_or_default();
        let stderr = std::fs::read(spool.join("stderr")).unwrap_or_default();
        let (out, out_cut) = clip(&stdout, self.max_output);
        let (err, err_cut) = clip(&stderr, self.max_output);
        let status = match (exit_code, timed_out, cancelled) {
            (_, true, _) => "killed: timed out".to_owned(),
            (_, _, true) => "killed: the run was cancelled".to_owned(),
            (Some(c), _, _) => format!("exit code: {c}"),
            (None, _, _) => "killed by a signal".to_owned(),
        };
        let mut text = status;
        if !out.is_empty() {
            text.push_str("\nstdout:\n");
            text.push_str(&out);
        }
        if !err.is_empty() {
            text.push_str("\nstderr:\n");
            text.push_str(&err);
        }
        let details = json!({
            "exit_code": exit_code,
            "timed_out": timed_out,
            "cancelled": cancelled,
            "stdout_bytes": stdout.len(),
            "stderr_bytes": stderr.len(),
            "truncated": out_cut || err_cut,
        });
        ToolOutput { content: text, is_error: exit_code != Some(0), details: Some(details) }
    }
}

fn read_exit(spool: &Path) -> Option<i32> {
    std::fs::read_to_string(spool.join("exit")).ok()?.trim().parse().ok()
}

#[async_trait]
impl Tool for ShellTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "shell".into(),
            description:
                "Run a shell command (sh -c) in the working directory. Returns the exit code, stdout and stderr. \
                          The command is killed after timeout_secs (default 120)."
                    .into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The command line"},
                    "timeout_secs": {"type": "integer", "minimum": 1, "description": "Kill the command after this many seconds"}
                },
                "required": ["command"]
            }),
        }
    }

    fn read_only(&self) -> bool {
        false
    }

    fn idempotent(&self) -> bool {
        false
    }

    async fn call(&self, input: Value, ctx: &ToolContext) -> ToolOutput {
        let command = match str_arg(&input, "command") {
            Ok(c) => c,
            Err(e) => return e,
        };
        let timeout = match self.timeout_of(&input) {
            Ok(t) => t,
            Err(e) => return e,
        };
        let spool = ctx.spool_dir.clone();
        let prepared = (|| -> std::io::Result<(File, File, File)> {
            std::fs::create_dir_all(&spool)?;
            let lock = File::create(spool.join("lock"))?;
            lock.lock()?;
            Ok((lock, File::create(spool.join("stdout"))?, File::create(spool.join("stderr"))?))
        })();
        let (lock, stdout, stderr) = match prepared {
            Ok(files) => files,
            Err(e) => return ToolOutput::error(format!("cannot prepare the command's spool {}: {e}", spool.display())),
        };
        let stdin = match lock.try_clone() {
            Ok(f) => f,
            Err(e) => return ToolOutput::error(format!("cannot prepare the command: {e}")),
        };
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(WRAPPER)
            .arg(&command)
            .arg(&spool)
            .current_dir(&ctx.cwd)
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return ToolOutput::error(format!("cannot start `sh`: {e}")),
        };
        let pgid = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
        let kill_group = || {
            if let Some(pgid) = pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
        };
        let started = Instant::now();
        let (status, timed_out, cancelled) = tokio::select! {
            s = child.wait() => (s.ok(), false, false),
            _ = tokio::time::sleep(timeout) => { kill_group(); (child.wait().await.ok(), true, false) }
            _ = ctx.cancel.cancelled() => { kill_group(); (child.wait().await.ok(), false, true) }
        };
        drop(lock);
        tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, ?status, "shell command finished");
        let exit_code = if timed_out || cancelled { None } else { read_exit(&spool).or(status.and_then(|s| s.code())) };
        self.result(&spool, exit_code, timed_out, cancelled)
    }

    async fn recover(&self, input: &Value, ctx: &ToolContext) -> Recovery {
        let spool = ctx.spool_dir.clone();
        let lock_path = spool.join("lock");
        if !lock_path.exists() {
            return Recovery::NotStarted;
        }
        // Wait until no process of the command is alive (they hold the lock through stdin).
        let patience = self.timeout_of(input).unwrap_or(self.default_timeout) + Duration::from_secs(5);
        let acquired = tokio::task::spawn_blocking(move || {
            let Ok(file) = File::open(&lock_path) else { return false };
            let deadline = Instant::now() + patience;
            loop {
                match file.try_lock() {
                    Ok(()) => return true,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    Err(_) => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        if !acquired {
            return Recovery::Unknown;
        }
        if let Some(code) = read_exit(&spool) {
            let mut out = self.result(&spool, Some(code), false, false);
            out.content.push_str("\n(result recovered after an interruption; the command was not run again)");
            return Recovery::Completed(out);
        }
        if spool.join("started").exists() { Recovery::Unknown } else { Recovery::NotStarted }
    }
}
