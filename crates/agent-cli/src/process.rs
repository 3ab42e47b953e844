//! A CLI as a child process: spawned with tokio (`kill_on_drop`, stdin piped), stdout read
//! line by line, stderr kept (bounded) for error messages, stopped with SIGINT then SIGKILL.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use descartes_core::ProviderError;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// The most of a CLI's stderr kept for error messages (its tail).
pub const STDERR_LIMIT: usize = 8 * 1024;

/// How to start a CLI.
#[derive(Debug, Clone)]
pub struct Spawn {
    /// The backend's name, for errors (`claude-code`).
    pub backend: String,
    /// The binary (a name looked up on `PATH`, or a path).
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Variables added to the CLI's environment (it inherits ours, unless `clear_env`).
    pub env: Vec<(OsString, OsString)>,
    /// Start from an empty environment: the CLI gets `env` only.
    pub clear_env: bool,
    pub cwd: PathBuf,
    /// Written to stdin at once (e.g. the prompt).
    pub stdin: Option<String>,
    /// Keep stdin open after the initial write (to answer permission requests).
    pub keep_stdin: bool,
    /// How to install the binary, for the error when it is missing.
    pub install_hint: String,
    /// SIGINT, then SIGKILL after this long.
    pub kill_grace: Duration,
    /// Started through this program and its arguments (see `CliOptions::wrapper`).
    pub wrapper: Option<(PathBuf, Vec<OsString>)>,
}

/// A running CLI.
pub struct CliProcess {
    pub backend: String,
    pub program: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: Arc<Mutex<StderrTail>>,
    stderr_task: Option<tokio::task::JoinHandle<()>>,
    kill_grace: Duration,
    exited: Option<ExitStatus>,
}

/// The program of `spec` as the CLI's own `PATH` finds it (a path with a `/` as it is,
/// relative to the working directory).
fn find_program(spec: &Spawn) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |p: &std::path::Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if spec.program.components().count() > 1 {
        let p = spec.cwd.join(&spec.program);
        return executable(&p).then_some(p);
    }
    let path = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .or_else(|| if spec.clear_env { None } else { std::env::var_os("PATH") })?;
    std::env::split_paths(&path).map(|d| d.join(&spec.program)).find(|p| executable(p))
}

#[derive(Default)]
struct StderrTail {
    bytes: VecDeque<u8>,
    truncated: bool,
}

impl CliProcess {
    /// Starts the CLI. A binary that cannot be found is a [`ProviderError::Config`] naming it
    /// and how to install it.
    pub async fn spawn(spec: Spawn) -> Result<Self, ProviderError> {
        let program = spec.program.display().to_string();
        let mut cmd = match &spec.wrapper {
            None => Command::new(&spec.program),
            Some((wrapper, prefix)) => {
                // The wrapper starts the CLI: find it first, so a missing one is reported as such.
                let found = find_program(&spec).ok_or_else(|| ProviderError::Config {
                    provider: spec.backend.clone(),
                    message: format!(
                        "the `{program}` CLI was not found (not on PATH); install it with `{}`",
                        spec.install_hint
                    ),
                })?;
                let mut c = Command::new(wrapper);
                c.args(prefix).arg(found);
                c
            }
        };
        if spec.clear_env {
            cmd.env_clear();
        }
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.cwd)
            .stdin(if spec.stdin.is_some() || spec.keep_stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a stop reaches the commands the CLI runs too, and the
            // terminal's Ctrl-C goes to Descartes, which decides.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            let message = if e.kind() == std::io::ErrorKind::NotFound {
                if spec.cwd.is_dir() {
                    format!("the `{program}` CLI was not found (not on PATH); install it with `{}`", spec.install_hint)
                } else {
                    format!("cannot start `{program}`: the working directory {} does not exist", spec.cwd.display())
                }
            } else if e.kind() == std::io::ErrorKind::PermissionDenied {
                format!("cannot run `{program}`: permission denied (is it executable?)")
            } else {
                format!("cannot start `{program}`: {e}")
            };
            ProviderError::Config { provider: spec.backend.clone(), message }
        })?;
        let io_error = |what: &str| ProviderError::Config {
            provider: spec.backend.clone(),
            message: format!("cannot start `{program}`: no {what} pipe"),
        };
        let stdout = child.stdout.take().ok_or_else(|| io_error("stdout"))?;
        let stderr_pipe = child.stderr.take().ok_or_else(|| io_error("stderr"))?;
        let mut stdin = child.stdin.take();
        let stderr = Arc::new(Mutex::new(StderrTail::default()));
        let stderr_task = tokio::spawn(read_stderr(stderr_pipe, stderr.clone()));
        if let (Some(text), Some(pipe)) = (&spec.stdin, stdin.as_mut()) {
            // A CLI that exits at once (bad flags) closes its stdin: reported when reading.
            let _ = pipe.write_all(text.as_bytes()).await;
            let _ = pipe.flush().await;
        }
        if !spec.keep_stdin {
            stdin = None;
        }
        Ok(Self {
            backend: spec.backend,
            program,
            child,
            stdin,
            stdout: BufReader::new(stdout),
            stderr,
            stderr_task: Some(stderr_task),
            kill_grace: spec.kill_grace,
            exited: None,
        })
    }

    /// The next stdout line without its line ending (`\n` or `\r\n`), lossily decoded;
    /// `None` at end of output.
    pub async fn next_line(&mut self) -> Result<Option<String>, ProviderError> {
        let mut buf = Vec::new();
        let n = self.stdout.read_until(b'\n', &mut buf).await.map_err(|e| ProviderError::Protocol {
            provider: self.backend.clone(),
            message: format!("cannot read the output of `{}`: {e}", self.program),
        })?;
        if n == 0 {
            return Ok(None);
        }
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
    }

    /// Writes one line to the CLI's stdin.
    pub async fn write_line(&mut self, line: &str) -> Result<(), ProviderError> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(ProviderError::Protocol {
                provider: self.backend.clone(),
                message: format!("cannot write to `{}`: its input is closed", self.program),
            });
        };
        let mut data = line.as_bytes().to_vec();
        data.push(b'\n');
        let r = async {
            stdin.write_all(&data).await?;
            stdin.flush().await
        }
        .await;
        r.map_err(|e| ProviderError::Protocol {
            provider: self.backend.clone(),
            message: format!("cannot write to `{}`: {e}", self.program),
        })
    }

    /// Closes stdin (the CLI sees end of input).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the CLI to exit (after its output ended) and for its stderr to be read.
    pub async fn wait(&mut self) -> Result<ExitStatus, ProviderError> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        self.stdin = None;
        let status = self.child.wait().await.map_err(|e| ProviderError::Protocol {
            provider: self.backend.clone(),
            message: format!("cannot wait for `{}`: {e}", self.program),
        })?;
        self.exited = Some(status);
        if let Some(task) = self.stderr_task.take() {
            // A grandchild may keep stderr open: do not wait for it long.
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        Ok(status)
    }

    /// The end of what the CLI wrote on stderr (at most [`STDERR_LIMIT`] bytes), trimmed.
    pub fn stderr_tail(&self) -> String {
        let tail = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        let bytes: Vec<u8> = tail.bytes.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes).trim().to_owned();
        if tail.truncated { format!("…{text}") } else { text }
    }

    /// An error for a CLI that exited unsuccessfully, with its stderr.
    pub fn exit_error(&self, status: ExitStatus, last_error: Option<&str>) -> ProviderError {
        let how = match status.code() {
            Some(code) => format!("exited with status {code}"),
            None => "was killed by a signal".to_owned(),
        };
        let mut detail = self.stderr_tail();
        if detail.is_empty() {
            detail = last_error.unwrap_or("").to_owned();
        }
        let message = if detail.is_empty() {
            format!("`{}` {how} (no error output)", self.program)
        } else {
            format!("`{}` {how}: {}", self.program, excerpt(&detail, 2000))
        };
        ProviderError::Stream { provider: self.backend.clone(), kind: "exit".into(), message, retryable: true }
    }

    /// Stops the CLI and the commands it runs: SIGINT to its process group (the CLI may save
    /// its session), then SIGKILL to the group after the grace period.
    pub async fn interrupt(&mut self) {
        if self.exited.is_some() {
            return;
        }
        self.stdin = None;
        let group = self.child.id().and_then(|p| i32::try_from(p).ok()).map(nix::unistd::Pid::from_raw);
        if let Ok(Some(status)) = self.child.try_wait() {
            self.exited = Some(status);
        } else {
            if let Some(pid) = group {
                let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGINT);
            }
            match tokio::time::timeout(self.kill_grace, self.child.wait()).await {
                Ok(Ok(status)) => self.exited = Some(status),
                _ => {
                    let _ = self.child.start_kill();
                    if let Ok(status) = self.child.wait().await {
                        self.exited = Some(status);
                    }
                }
            }
        }
        // Whatever the CLI left running in its group.
        if let Some(pid) = group {
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        }
        if let Some(task) = self.stderr_task.take() {
            task.abort();
        }
    }
}

async fn read_stderr(mut pipe: impl AsyncRead + Unpin, tail: Arc<Mutex<StderrTail>>) {
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                t.bytes.extend(&buf[..n]);
                while t.bytes.len() > STDERR_LIMIT {
                    t.bytes.pop_front();
                    t.truncated = true;
                }
            }
        }
    }
}

/// At most `max` characters of `text`, with `…` when cut.
pub fn excerpt(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}
