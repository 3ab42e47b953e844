//! How a claimed task is run: the [`TaskRunner`] trait and its first backend, the shell
//! command ([`CommandRunner`]).

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use descartes_protocol::Task;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

/// How a run of a task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The task's work succeeded; `result` is recorded with the task.
    Succeeded { result: Option<String> },
    /// This attempt failed; `reason` is recorded as the task's error.
    Failed { reason: String },
    /// Stopped through the cancel token before it finished (nothing is recorded by the runner).
    Cancelled,
}

/// Runs one claimed task. Implementations must return soon after `cancel` fires, having
/// stopped every process they started for the task.
#[async_trait]
pub trait TaskRunner: Send + Sync {
    async fn run(&self, task: &Task, token: i64, cancel: CancellationToken) -> Outcome;

    /// Claims the next task this runner takes (default: the highest-priority ready task; the
    /// agent registry's runner routes instead).
    async fn claim_next(
        &self,
        tasks: &dyn descartes_core::TaskStore,
        worker: &str,
        ttl: Duration,
    ) -> Result<Option<descartes_protocol::Claim>, descartes_core::TaskError> {
        Ok(tasks.claim(worker, ttl, 1).await?.pop())
    }

    /// One line for `daemon status` (e.g. the command).
    fn describe(&self) -> String;
}

/// Bytes of each output stream kept while a command runs (its tail).
const TAIL_BYTES: usize = 64 * 1024;
/// Lines of stdout kept as a task's result, and of stderr in a failure's reason.
const RESULT_LINES: usize = 20;
/// Bytes of the result (and of the stderr part of a failure reason).
const RESULT_BYTES: usize = 4096;
/// How long output is still read after the command exits (background processes that keep the
/// pipes open are not waited for).
const DRAIN: Duration = Duration::from_millis(200);

/// The `command` backend: `sh -c COMMAND` in a fixed directory, in its own process group, with
/// the task's fields in `DESCARTES_TASK_*` environment variables. Exit 0 is success (the result
/// is the last lines of stdout); any other exit fails the attempt (the reason carries the exit
/// code and the tail of stderr).
#[derive(Debug, Clone)]
pub struct CommandRunner {
    command: String,
    cwd: PathBuf,
    env: Vec<(String, String)>,
    supervisor: Option<Arc<descartes_tools::Sandbox>>,
}

impl CommandRunner {
    pub fn new(command: impl Into<String>, cwd: impl Into<PathBuf>) -> Self {
        Self { command: command.into(), cwd: cwd.into(), env: Vec::new(), supervisor: None }
    }

    /// Runs each command under the sandbox helper as its supervisor (the command and its
    /// process group die with this process, see `descartes_tools::sandbox`) and with the
    /// sandbox's environment policy (no secrets unless added with [`Self::with_env`]).
    pub fn supervised_by(mut self, sandbox: Arc<descartes_tools::Sandbox>) -> Self {
        self.supervisor = Some(sandbox);
        self
    }

    /// Adds an environment variable given to every command.
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The environment variables describing a task to its command.
    pub fn task_env(task: &Task, token: i64) -> Vec<(&'static str, String)> {
        vec![
            ("DESCARTES_TASK_ID", task.id.clone()),
            ("DESCARTES_TASK_TITLE", task.title.clone()),
            ("DESCARTES_TASK_PROMPT", task.prompt.clone()),
            ("DESCARTES_TASK_TYPE", task.kind.clone()),
            ("DESCARTES_TASK_PRIORITY", task.priority.to_string()),
            ("DESCARTES_TASK_LABELS", task.labels.join(",")),
            ("DESCARTES_TASK_ATTEMPT", task.attempts.to_string()),
            ("DESCARTES_TASK_TOKEN", token.to_string()),
        ]
    }
}

#[async_trait]
impl TaskRunner for CommandRunner {
    async fn run(&self, task: &Task, token: i64, cancel: CancellationToken) -> Outcome {
        let mut cmd = match &self.supervisor {
            Some(sandbox) => {
                sandbox.supervised("sh", &[std::ffi::OsStr::new("-c"), std::ffi::OsStr::new(&self.command)])
            }
            None => {
                let mut c = tokio::process::Command::new("sh");
                c.arg("-c").arg(&self.command);
                c
            }
        };
        cmd.current_dir(&self.cwd)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(Self::task_env(task, token))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return Outcome::Failed { reason: format!("cannot start `sh -c` in {}: {e}", self.cwd.display()) };
            }
        };
        let pgid = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
        let stdout = Arc::new(Mutex::new(Tail::default()));
        let stderr = Arc::new(Mutex::new(Tail::default()));
        let readers = [
            child.stdout.take().map(|s| tokio::spawn(collect(s, stdout.clone()))),
            child.stderr.take().map(|s| tokio::spawn(collect(s, stderr.clone()))),
        ];
        let status = tokio::select! {
            s = child.wait() => s,
            _ = cancel.cancelled() => {
                if let Some(pgid) = pgid {
                    let _ = killpg(pgid, Signal::SIGKILL);
                }
                let _ = child.wait().await;
                for r in readers.into_iter().flatten() {
                    r.abort();
                }
                return Outcome::Cancelled;
            }
        };
        // Read what is left in the pipes, but do not wait for background processes that hold
        // them open.
        let _ = tokio::time::timeout(DRAIN, async {
            for r in readers.iter().flatten() {
                while !r.is_finished() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
        .await;
        for r in readers.into_iter().flatten() {
            r.abort();
        }
        let out = stdout.lock().map(|t| t.last_lines(RESULT_LINES, RESULT_BYTES)).unwrap_or_default();
        let err = stderr.lock().map(|t| t.last_lines(RESULT_LINES, RESULT_BYTES)).unwrap_or_default();
        match status {
            Ok(s) if s.success() => Outcome::Succeeded { result: (!out.is_empty()).then_some(out) },
            Ok(s) => {
                let how = match (s.code(), s.signal()) {
                    (Some(code), _) => format!("exit code {code}"),
                    (None, Some(sig)) => format!("killed by signal {sig}"),
                    (None, None) => "abnormal exit".to_owned(),
                };
                let detail = if err.is_empty() { out } else { err };
                let reason = if detail.is_empty() {
                    format!("the command failed ({how})")
                } else {
                    format!("the command failed ({how}): {detail}")
                };
                Outcome::Failed { reason }
            }
            Err(e) => Outcome::Failed { reason: format!("cannot wait for the command: {e}") },
        }
    }

    fn describe(&self) -> String {
        format!("command: {}", self.command)
    }
}

async fn collect(mut pipe: impl AsyncRead + Unpin, tail: Arc<Mutex<Tail>>) {
    let mut buf = vec![0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut t) = tail.lock() {
                    t.push(&buf[..n]);
                }
            }
        }
    }
}

/// The last bytes of an output stream.
#[derive(Debug, Default)]
struct Tail {
    bytes: Vec<u8>,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > 2 * TAIL_BYTES {
            let cut = self.bytes.len() - TAIL_BYTES;
            self.bytes.drain(..cut);
        }
    }

    /// The last `lines` lines (trailing whitespace trimmed), at most `max_bytes` long.
    fn last_lines(&self, lines: usize, max_bytes: usize) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        let text = text.trim_end();
        let start = text.rmatch_indices('\n').nth(lines.saturating_sub(1)).map(|(i, _)| i + 1).unwrap_or(0);
        let mut tail = &text[start..];
        if tail.len() > max_bytes {
            let mut cut = tail.len() - max_bytes;
            while !tail.is_char_boundary(cut) {
                cut += 1;
            }
            tail = &tail[cut..];
        }
        tail.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use descartes_protocol::{TaskStatus, Timestamp};

    fn task(title: &str) -> Task {
        Task {
            id: "t1".into(),
            title: title.into(),
            prompt: "the prompt".into(),
            kind: "code".into(),
            priority: 7,
            labels: vec!["a".into(), "b".into()],
            status: TaskStatus::Running,
            depends_on: vec![],
            locks: vec![],
            claimed_by: None,
            lease_expires_at: None,
            token: Some(42),
            attempts: 2,
            max_attempts: 3,
            not_before: None,
            result: None,
            error: None,
            blocked_reason: None,
            blocked_by: None,
            needs: Default::default(),
            agent: None,
            test_command: None,
            created_at: Timestamp::now(),
            updated_at: Timestamp::now(),
        }
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let mut t = Tail::default();
        t.push(b"one\ntwo\nthree\n\n");
        assert_eq!(t.last_lines(2, 100), "two\nthree");
        assert_eq!(t.last_lines(10, 100), "one\ntwo\nthree");
        assert_eq!(t.last_lines(10, 5), "three");
        let mut big = Tail::default();
        for _ in 0..50_000 {
            big.push(b"0123456789\n");
        }
        assert!(big.bytes.len() <= 2 * TAIL_BYTES);
        assert_eq!(big.last_lines(3, 100), "0123456789\n0123456789\n0123456789");
    }

    #[tokio::test]
    async fn command_sees_the_task_and_its_output_is_the_result() {
        let dir = tempfile::tempdir().unwrap();
        let runner = CommandRunner::new(
            "echo noise; echo \"$DESCARTES_TASK_ID|$DESCARTES_TASK_TITLE|$DESCARTES_TASK_PROMPT|$DESCARTES_TASK_TYPE|\
             $DESCARTES_TASK_PRIORITY|$DESCARTES_TASK_LABELS|$DESCARTES_TASK_ATTEMPT|$DESCARTES_TASK_TOKEN|$EXTRA|$(pwd)\"",
            dir.path(),
        )
        .with_env("EXTRA", "x");
        let out = runner.run(&task("hello world"), 42, CancellationToken::new()).await;
        let cwd = dir.path().canonicalize().unwrap();
        let expected = format!("noise\nt1|hello world|the prompt|code|7|a,b|2|42|x|{}", cwd.display());
        assert_eq!(out, Outcome::Succeeded { result: Some(expected) });
    }

    #[tokio::test]
    async fn a_failing_command_reports_its_exit_code_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let runner = CommandRunner::new("echo out; echo oops >&2; exit 3", dir.path());
        match runner.run(&task("t"), 1, CancellationToken::new()).await {
            Outcome::Failed { reason } => assert_eq!(reason, "the command failed (exit code 3): oops"),
            other => panic!("{other:?}"),
        }
        let quiet = CommandRunner::new("exit 1", dir.path());
        assert_eq!(
            quiet.run(&task("t"), 1, CancellationToken::new()).await,
            Outcome::Failed { reason: "the command failed (exit code 1)".into() }
        );
    }

    #[tokio::test]
    async fn cancel_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("late");
        let runner = CommandRunner::new(format!("(sleep 1; touch {}) & sleep 30", marker.display()), dir.path());
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.cancel();
        });
        let started = std::time::Instant::now();
        assert_eq!(runner.run(&task("t"), 1, cancel).await, Outcome::Cancelled);
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert!(!marker.exists(), "a background process of the command survived the kill");
    }

    #[tokio::test]
    async fn background_processes_holding_the_pipes_do_not_delay_the_result() {
        let dir = tempfile::tempdir().unwrap();
        let runner = CommandRunner::new("sleep 5 & echo done", dir.path());
        let started = std::time::Instant::now();
        let out = runner.run(&task("t"), 1, CancellationToken::new()).await;
        assert_eq!(out, Outcome::Succeeded { result: Some("done".into()) });
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
