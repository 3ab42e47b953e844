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
//!
//! Sandbox: unless the mode is `full-access`, the wrapper itself is started through the sandbox
//! helper (see [`crate::sandbox`]), so the wrapper and the command run restricted; the spool
//! and the run's temporary directory (`TMPDIR`) are writable in every mode, so crash safety
//! works the same. The helper records what it enforced in the spool (`sandbox`); every output
//! carries it in `details.sandbox`, and the first output of a tool whose sandbox is missing a
//! restriction says so in its text.

use std::ffi::OsStr;
use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use descartes_core::{Recovery, Tool, ToolContext, ToolOutput};
use descartes_protocol::ToolSpec;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::sandbox::{Sandbox, SandboxMode, SandboxPolicy, SandboxStatus};
use crate::{clip, str_arg};

const WRAPPER: &str =
    r#": > "$1/started"; sh -c "$0"; c=$?; printf '%s' "$c" > "$1/exit.tmp" && mv "$1/exit.tmp" "$1/exit"; exit $c"#;

/// The `shell` tool.
#[derive(Debug, Clone)]
pub struct ShellTool {
    default_timeout: Duration,
    max_output: usize,
    sandbox: Arc<Sandbox>,
}

impl ShellTool {
    /// With the default sandbox (`workspace-write`, no network, the helper found by
    /// [`crate::sandbox::SandboxHelper::locate`]).
    pub fn new(default_timeout: Duration, max_output: usize) -> Self {
        Self::with_sandbox(default_timeout, max_output, Arc::new(Sandbox::new(SandboxPolicy::default())))
    }

    pub fn with_sandbox(default_timeout: Duration, max_output: usize, sandbox: Arc<Sandbox>) -> Self {
        Self { default_timeout, max_output, sandbox }
    }

    pub fn sandbox(&self) -> &Arc<Sandbox> {
        &self.sandbox
    }

    /// What the helper recorded for the call in `spool`, or a notice when it recorded nothing.
    fn recorded_status(&self, spool: &Path) -> SandboxStatus {
        let path = spool.join(crate::sandbox::STATUS_FILE);
        match std::fs::read(&path).map(|b| serde_json::from_slice::<SandboxStatus>(&b)) {
            Ok(Ok(status)) => status,
            _ => SandboxStatus {
                mode: self.sandbox.policy().mode,
                landlock: "unknown".into(),
                landlock_abi: 0,
                network_blocked: false,
                unix_sockets_blocked: false,
                protected: "unknown".into(),
                notice: Some("the sandbox helper did not start the command (see its stderr)".into()),
            },
        }
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

    fn result(
        &self,
        spool: &Path,
        exit_code: Option<i32>,
        timed_out: bool,
        cancelled: bool,
        sandbox: &SandboxStatus,
    ) -> ToolOutput {
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
        if let Some(notice) = &sandbox.notice
            && self.sandbox.first_notice()
        {
            text.push_str("\nnote: ");
            text.push_str(notice);
        }
        let details = json!({
            "exit_code": exit_code,
            "timed_out": timed_out,
            "cancelled": cancelled,
            "stdout_bytes": stdout.len(),
            "stderr_bytes": stderr.len(),
            "truncated": out_cut || err_cut,
            "sandbox": sandbox,
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
            description: format!(
                "Run a shell command (sh -c) in the working directory. Returns the exit code, stdout and stderr. \
                 The command is killed after timeout_secs (default 120).{}",
                self.sandbox.describe()
            ),
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
        let sandboxed = self.sandbox.policy().mode != SandboxMode::FullAccess;
        let prepared = (|| -> std::io::Result<(File, File, File)> {
            std::fs::create_dir_all(&spool)?;
            if sandboxed {
                std::fs::create_dir_all(Sandbox::temp_dir_for(&spool))?;
                let _ = std::fs::remove_file(spool.join(crate::sandbox::STATUS_FILE));
            }
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
        let args = [OsStr::new("-c"), OsStr::new(WRAPPER), OsStr::new(&command), spool.as_os_str()];
        let wrapped = match self.sandbox.wrap("sh", &args, &ctx.cwd, &spool) {
            Ok(w) => w,
            Err(refused) => return ToolOutput::error(refused),
        };
        let mut cmd = wrapped.command;
        cmd.current_dir(&ctx.cwd)
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let program = cmd.as_std().get_program().to_string_lossy().into_owned();
                return ToolOutput::error(format!("cannot start `{program}`: {e}"));
            }
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
        let status = match wrapped.status {
            Some(s) => s,
            None => self.recorded_status(&spool),
        };
        self.result(&spool, exit_code, timed_out, cancelled, &status)
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
            let status = if spool.join(crate::sandbox::STATUS_FILE).exists() {
                self.recorded_status(&spool)
            } else {
                SandboxStatus {
                    mode: SandboxMode::FullAccess,
                    landlock: "off".into(),
                    landlock_abi: 0,
                    network_blocked: false,
                    unix_sockets_blocked: false,
                    protected: "off".into(),
                    notice: None,
                }
            };
            let mut out = self.result(&spool, Some(code), false, false, &status);
            out.content.push_str("\n(result recovered after an interruption; the command was not run again)");
            return Recovery::Completed(out);
        }
        if spool.join("started").exists() { Recovery::Unknown } else { Recovery::NotStarted }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use descartes_protocol::RunId;
    use tokio_util::sync::CancellationToken;

    struct Setup {
        _dir: tempfile::TempDir,
        ctx: ToolContext,
    }

    /// A working directory and a (not yet created) spool directory in a fresh temp dir.
    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path().canonicalize().unwrap().join("work");
        std::fs::create_dir(&cwd).unwrap();
        let ctx = ToolContext {
            cwd,
            run_id: RunId::from("run"),
            call_id: "call-1".into(),
            spool_dir: dir.path().join("spool").join("run").join("call-1"),
            cancel: CancellationToken::new(),
        };
        Setup { _dir: dir, ctx }
    }

    /// Without a sandbox: these tests are about the spool; `tests/sandbox.rs` runs the same
    /// kinds of calls through the real helper.
    fn tool() -> ShellTool {
        ShellTool::with_sandbox(Duration::from_secs(30), 64 * 1024, Arc::new(Sandbox::full_access()))
    }

    fn details(out: &ToolOutput) -> &Value {
        out.details.as_ref().expect("shell output has details")
    }

    #[tokio::test]
    async fn echo_succeeds_with_its_output() {
        let s = setup();
        let out = tool().call(json!({"command": "echo hi"}), &s.ctx).await;
        assert!(!out.is_error, "{}", out.content);
        assert!(out.content.starts_with("exit code: 0"), "{}", out.content);
        assert!(out.content.contains("stdout:\nhi\n"), "{}", out.content);
        assert!(!out.content.contains("stderr:"), "{}", out.content);
        let d = details(&out);
        assert_eq!(d["exit_code"], 0);
        assert_eq!(d["timed_out"], false);
        assert_eq!(d["cancelled"], false);
        assert_eq!(d["stdout_bytes"], 3);
        assert_eq!(d["truncated"], false);
    }

    #[tokio::test]
    async fn a_failing_command_is_an_error_with_its_exit_code() {
        let s = setup();
        let out = tool().call(json!({"command": "exit 3"}), &s.ctx).await;
        assert!(out.is_error);
        assert!(out.content.starts_with("exit code: 3"), "{}", out.content);
        assert_eq!(details(&out)["exit_code"], 3);
    }

    #[tokio::test]
    async fn stderr_is_captured() {
        let s = setup();
        let out = tool().call(json!({"command": "echo out; echo oops >&2"}), &s.ctx).await;
        assert!(!out.is_error);
        assert!(out.content.contains("stdout:\nout\n"), "{}", out.content);
        assert!(out.content.contains("stderr:\noops\n"), "{}", out.content);
        assert_eq!(details(&out)["stderr_bytes"], 5);
    }

    #[tokio::test]
    async fn runs_in_the_working_directory() {
        let s = setup();
        let out = tool().call(json!({"command": "pwd; echo x > here.txt"}), &s.ctx).await;
        assert!(!out.is_error, "{}", out.content);
        assert!(out.content.contains(&format!("stdout:\n{}\n", s.ctx.cwd.display())), "{}", out.content);
        assert!(s.ctx.cwd.join("here.txt").exists());
    }

    #[tokio::test]
    async fn a_command_is_killed_at_its_timeout() {
        let s = setup();
        let started = Instant::now();
        let out = tool().call(json!({"command": "sleep 5; touch late", "timeout_secs": 1}), &s.ctx).await;
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
        assert!(elapsed >= Duration::from_millis(900), "took {elapsed:?}");
        assert!(out.is_error);
        assert!(out.content.contains("timed out"), "{}", out.content);
        let d = details(&out);
        assert_eq!(d["timed_out"], true);
        assert_eq!(d["exit_code"], Value::Null);
    }

    #[tokio::test]
    async fn cancellation_kills_the_command_promptly() {
        let s = setup();
        let token = s.ctx.cancel.clone();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            token.cancel();
        });
        let started = Instant::now();
        let out = tool().call(json!({"command": "sleep 2; touch late"}), &s.ctx).await;
        let elapsed = started.elapsed();
        canceller.await.unwrap();
        assert!(elapsed < Duration::from_millis(1500), "took {elapsed:?}");
        assert!(out.is_error);
        assert!(out.content.contains("cancelled"), "{}", out.content);
        assert_eq!(details(&out)["cancelled"], true);
        // The whole process group died: what the command would do after the sleep never happens.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!s.ctx.cwd.join("late").exists(), "the command kept running after cancellation");
        assert!(!s.ctx.spool_dir.join("exit").exists());
    }

    #[tokio::test]
    async fn invalid_arguments_are_errors() {
        let s = setup();
        let cases = [
            (json!({}), "missing required argument `command`"),
            (json!({"command": 5}), "must be a string"),
            (json!({"command": ["ls"]}), "must be a string"),
            (json!({"command": "true", "timeout_secs": 0}), "positive integer"),
            (json!({"command": "true", "timeout_secs": "x"}), "positive integer"),
            (json!({"command": "true", "timeout_secs": -1}), "positive integer"),
            (json!({"command": "true", "timeout_secs": 1.5}), "positive integer"),
            (json!("echo hi"), "missing required argument `command`"),
        ];
        for (input, expected) in cases {
            let out = tool().call(input.clone(), &s.ctx).await;
            assert!(out.is_error, "{input}: {}", out.content);
            assert!(out.content.contains(expected), "{input}: {}", out.content);
        }
        assert!(!s.ctx.spool_dir.exists(), "nothing was started");
    }

    #[tokio::test]
    async fn big_output_is_clipped() {
        let s = setup();
        let shell = ShellTool::with_sandbox(Duration::from_secs(30), 1000, Arc::new(Sandbox::full_access()));
        let out = shell.call(json!({"command": r"head -c 1000000 /dev/zero | tr '\0' a"}), &s.ctx).await;
        assert!(!out.is_error, "{}", &out.content[..200.min(out.content.len())]);
        assert!(out.content.len() < 1200, "{} bytes", out.content.len());
        assert!(out.content.contains("[… 999000 bytes omitted …]"), "{}", out.content);
        let d = details(&out);
        assert_eq!(d["truncated"], true);
        assert_eq!(d["stdout_bytes"], 1_000_000);
    }

    #[tokio::test]
    async fn recover_after_a_completed_call_returns_its_result_without_running_it() {
        let s = setup();
        let input = json!({"command": "echo ran >> count.txt; echo out; echo err >&2; exit 4"});
        let first = tool().call(input.clone(), &s.ctx).await;
        assert!(first.is_error);
        assert_eq!(details(&first)["exit_code"], 4);

        let Recovery::Completed(out) = tool().recover(&input, &s.ctx).await else {
            panic!("expected a recovered result")
        };
        assert!(out.is_error);
        assert_eq!(out.details, first.details);
        assert!(out.content.starts_with(&first.content), "{}", out.content);
        assert!(out.content.contains("exit code: 4"), "{}", out.content);
        assert!(out.content.contains("stdout:\nout\n") && out.content.contains("stderr:\nerr\n"), "{}", out.content);
        assert!(out.content.contains("the command was not run again"), "{}", out.content);
        assert_eq!(std::fs::read_to_string(s.ctx.cwd.join("count.txt")).unwrap(), "ran\n");
    }

    #[tokio::test]
    async fn recover_without_a_spool_is_not_started() {
        let s = setup();
        assert_eq!(tool().recover(&json!({"command": "true"}), &s.ctx).await, Recovery::NotStarted);
        // A spool directory that exists but holds no lock: the call never got as far.
        std::fs::create_dir_all(&s.ctx.spool_dir).unwrap();
        assert_eq!(tool().recover(&json!({"command": "true"}), &s.ctx).await, Recovery::NotStarted);
    }

    #[tokio::test]
    async fn recover_with_a_lock_but_no_started_marker_is_not_started() {
        let s = setup();
        std::fs::create_dir_all(&s.ctx.spool_dir).unwrap();
        File::create(s.ctx.spool_dir.join("lock")).unwrap();
        assert_eq!(tool().recover(&json!({"command": "true"}), &s.ctx).await, Recovery::NotStarted);
    }

    #[tokio::test]
    async fn recover_of_a_started_call_without_exit_status_is_unknown() {
        let s = setup();
        std::fs::create_dir_all(&s.ctx.spool_dir).unwrap();
        File::create(s.ctx.spool_dir.join("lock")).unwrap();
        File::create(s.ctx.spool_dir.join("started")).unwrap();
        std::fs::write(s.ctx.spool_dir.join("stdout"), "partial").unwrap();
        assert_eq!(tool().recover(&json!({"command": "true"}), &s.ctx).await, Recovery::Unknown);
    }

    #[tokio::test]
    async fn recover_waits_for_a_command_still_holding_the_lock() {
        let s = setup();
        let spool = s.ctx.spool_dir.clone();
        std::fs::create_dir_all(&spool).unwrap();
        // The command's process (here: this test) holds the lock through its own open handle.
        let held = File::create(spool.join("lock")).unwrap();
        held.lock().unwrap();
        File::create(spool.join("started")).unwrap();

        let ctx = s.ctx.clone();
        let started = Instant::now();
        let recovering = tokio::spawn(async move { tool().recover(&json!({"command": "slow"}), &ctx).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!recovering.is_finished(), "recover did not wait for the lock");
        // The command finishes: output, exit status, then its processes exit (lock released).
        std::fs::write(spool.join("stdout"), "finished late\n").unwrap();
        std::fs::write(spool.join("exit"), "0").unwrap();
        drop(held);

        let recovery = tokio::time::timeout(Duration::from_secs(5), recovering).await.unwrap().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        let Recovery::Completed(out) = recovery else { panic!("expected Completed, got {recovery:?}") };
        assert!(!out.is_error, "{}", out.content);
        assert!(out.content.starts_with("exit code: 0"), "{}", out.content);
        assert!(out.content.contains("finished late"), "{}", out.content);
        assert!(out.content.contains("not run again"), "{}", out.content);
    }

    #[tokio::test]
    async fn a_missing_sandbox_is_told_once_in_the_text_and_always_in_details() {
        let s = setup();
        let sandbox = Arc::new(Sandbox::missing_helper(SandboxPolicy::default(), "helper `x` not found"));
        let shell = ShellTool::with_sandbox(Duration::from_secs(30), 64 * 1024, sandbox);
        let first = shell.call(json!({"command": "echo one"}), &s.ctx).await;
        assert!(!first.is_error, "{}", first.content);
        assert!(first.content.contains("note: helper `x` not found"), "{}", first.content);
        assert!(first.content.contains("WITHOUT a sandbox"), "{}", first.content);
        let second = shell.call(json!({"command": "echo two"}), &s.ctx).await;
        assert!(!second.content.contains("note:"), "{}", second.content);
        for out in [&first, &second] {
            let notice = details(out)["sandbox"]["notice"].as_str().unwrap_or_default().to_owned();
            assert!(notice.contains("helper `x` not found"), "{notice}");
        }
        // Required: nothing runs.
        let required = SandboxPolicy { require: true, ..SandboxPolicy::default() };
        let shell = ShellTool::with_sandbox(
            Duration::from_secs(30),
            64 * 1024,
            Arc::new(Sandbox::missing_helper(required, "helper `x` not found")),
        );
        let out = shell.call(json!({"command": "touch ran"}), &s.ctx).await;
        assert!(out.is_error && out.content.contains("required"), "{}", out.content);
        assert!(!s.ctx.cwd.join("ran").exists());
    }

    #[tokio::test]
    async fn a_call_killed_by_cancellation_recovers_as_unknown() {
        // The spool of a cancelled call has `started` but no `exit`: resume must not guess.
        let s = setup();
        let token = s.ctx.cancel.clone();
        token.cancel();
        let input = json!({"command": "sleep 2"});
        let out = tool().call(input.clone(), &s.ctx).await;
        assert!(out.content.contains("cancelled"), "{}", out.content);
        let recovery = tool().recover(&input, &s.ctx).await;
        assert!(matches!(recovery, Recovery::Unknown | Recovery::NotStarted), "{recovery:?}");
    }
}
