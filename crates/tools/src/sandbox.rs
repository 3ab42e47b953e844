//! The sandbox for `shell` commands (Linux).
//!
//! Modes, like Codex's ([`SandboxMode`]):
//! - `read-only`: the command reads everywhere and writes only to the run's temporary directory
//!   (and its own spool);
//! - `workspace-write` (the default): also the working directory and the configured
//!   `writable_roots`;
//! - `full-access`: no sandbox at all; must be chosen explicitly.
//!
//! How: the workspace forbids `unsafe`, so restrictions cannot be set up between `fork` and
//! `exec` in our process. The command is started through a small helper instead (the
//! `descartes-sandbox` binary of this crate, or any binary that calls [`helper_main`], e.g. a
//! hidden subcommand), which restricts *itself* and then `exec`s `sh -c ...`:
//! - **Landlock** (the `landlock` crate, best effort up to ABI 7): every filesystem access right
//!   the kernel knows is handled; read, read-dir and execute are granted beneath `/`, everything
//!   beneath the writable paths, and write access to `/dev/null`, `/dev/zero`, `/dev/full` and
//!   `/dev/tty`.
//!   From ABI 6 the command can neither signal processes outside its sandbox nor connect to
//!   abstract Unix sockets made outside it.
//! - **Protected paths** ([`crate::Protected`]: the state directory, config and policy files,
//!   `.git/hooks` and `.git/config`) that lie in the writable area are bind-mounted read-only in
//!   a user and mount namespace of the command's own.
//! - **Network off** (unless [`SandboxPolicy::network`]): a seccomp filter (`seccompiler`)
//!   makes `socket()` with `AF_INET` or `AF_INET6` fail with `EPERM`, so neither TCP nor UDP nor
//!   raw IP is possible, and refuses `io_uring_setup` (io_uring can create sockets). **Unix
//!   sockets** are refused the same way unless [`SandboxPolicy::unix_sockets`] (a socket file
//!   could reach any local daemon, Descartes' own included). The calls that change mounts or
//!   enter namespaces are always refused. On x86_64, 32-bit (i386) system calls are refused by
//!   the filter's architecture check. Seccomp rather than Landlock's TCP rules because those
//!   cover neither UDP nor older kernels.
//!
//! The restrictions are inherited by every process the command starts. The helper then runs
//! the command as its child and supervises it (see [`helper`]): when the process that started
//! it dies, the whole process group is killed, so no command outlives its run or task. The
//! command's environment is built by the [`crate::ShellEnv`] policy (no API keys). The helper writes what it could enforce ([`SandboxStatus`]) into the call's
//! spool before running the command. Where the kernel lacks support (no Landlock, an ABI that
//! cannot enforce everything, no seccomp) or the helper cannot be found, the command runs with
//! what could be enforced, and the tool says so: a notice in the first such output's text and,
//! on every output, `details.sandbox`. The permission policy is then the only guard; nothing
//! is degraded silently. [`Sandbox::probe`] tells the same before any command runs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::env::ShellEnv;
use crate::protect::Protected;

mod helper;
pub use helper::{HelperOutcome, helper_main};

/// The helper binary's name, looked for next to the current executable.
pub const HELPER_NAME: &str = "descartes-sandbox";
/// Environment variable naming the helper binary explicitly.
pub const HELPER_ENV: &str = "DESCARTES_SANDBOX_BIN";
/// Name of the file in a call's spool where the helper records what it enforced.
pub const STATUS_FILE: &str = "sandbox";

/// Errors of the sandbox helper. None is retryable: they come from the kernel or the arguments.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Bad arguments to the helper (a bug in the caller). Not retryable.
    #[error(
        "{0}\nusage: descartes-sandbox [--mode MODE] [--write PATH]... [--readonly PATH]... [--writable-within PATH]... [--hide FILE]... [--network] [--unix-sockets] [--require] [--status FILE] [--parent PID] (--probe | -- PROGRAM ARGS...)"
    )]
    Usage(String),
    /// Landlock returned an error while building or applying the ruleset. Not retryable.
    #[error("cannot apply the Landlock ruleset: {0}")]
    Landlock(String),
    /// The status file could not be written. Not retryable.
    #[error("cannot write the sandbox status to {path}: {source}")]
    Status { path: PathBuf, source: std::io::Error },
    /// `--require` and something asked for is not enforced (the reason). Not retryable.
    #[error("{0}; the sandbox is required, so the command was not run")]
    NotEnforced(String),
    /// `exec` of the command failed. Not retryable.
    #[error("cannot run {program}: {source}")]
    Exec { program: String, source: std::io::Error },
    /// The sandbox needs Linux. Not retryable.
    #[error("the sandbox is only available on Linux")]
    Unsupported,
    /// The process that asked for the command was gone before it started. Not retryable.
    #[error("the process that started the sandbox helper is gone; the command was not run")]
    ParentGone,
    /// The helper could not set up its supervision of the command. Not retryable.
    #[error("cannot supervise the command: {0}")]
    Supervise(String),
}

/// How much a `shell` command may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SandboxMode {
    /// Writes only to the run's temporary directory.
    ReadOnly,
    /// Writes to the working directory, the writable roots and the temporary directory.
    #[default]
    WorkspaceWrite,
    /// No sandbox.
    FullAccess,
}

impl SandboxMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadOnly => "read-only",
            Self::WorkspaceWrite => "workspace-write",
            Self::FullAccess => "full-access",
        }
    }
}

impl std::fmt::Display for SandboxMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for SandboxMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read-only" => Ok(Self::ReadOnly),
            "workspace-write" => Ok(Self::WorkspaceWrite),
            "full-access" => Ok(Self::FullAccess),
            other => Err(format!("unknown sandbox mode `{other}` (read-only, workspace-write, full-access)")),
        }
    }
}

/// The sandbox settings of the `shell` tool.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxPolicy {
    pub mode: SandboxMode,
    /// Writable besides the working directory in `workspace-write` mode (ignored in
    /// `read-only`): e.g. other workspace roots, a cache directory.
    pub writable_roots: Vec<PathBuf>,
    /// Whether commands may open IP sockets. Off by default. `full-access` always has network.
    pub network: bool,
    /// Whether commands may open Unix sockets (to talk to local daemons such as Docker's). Off
    /// by default.
    pub unix_sockets: bool,
    /// Refuse to run a command whose restrictions cannot all be enforced (no Landlock, an old
    /// ABI, no seccomp, no helper) instead of running it with a notice. Off by default.
    pub require: bool,
}

/// What the helper could enforce for one command (or a probe).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxStatus {
    /// The mode asked for.
    pub mode: SandboxMode,
    /// Landlock: `"full"`, `"partial"` (an older ABI: some rights are not restricted) or
    /// `"none"` (no Landlock: writes are not restricted); `"off"` in `full-access` mode.
    pub landlock: String,
    /// The kernel's Landlock ABI as the `landlock` crate sees it (0: none).
    pub landlock_abi: i32,
    /// Whether IP sockets are refused.
    pub network_blocked: bool,
    /// Whether Unix sockets are refused.
    #[serde(default)]
    pub unix_sockets_blocked: bool,
    /// Descartes' protected paths: `read-only` (mounted so), `none-needed` (none in the
    /// writable area), `not-enforced` (no user namespaces: see the notice), `off`.
    #[serde(default)]
    pub protected: String,
    /// Set when something asked for is not enforced: what, and what it means.
    pub notice: Option<String>,
}

impl SandboxStatus {
    /// Every restriction asked for is in force.
    pub fn enforced(&self) -> bool {
        self.notice.is_none()
    }

    fn unsandboxed(mode: SandboxMode, notice: Option<String>) -> Self {
        Self {
            mode,
            landlock: "off".into(),
            landlock_abi: 0,
            network_blocked: false,
            unix_sockets_blocked: false,
            protected: "off".into(),
            notice,
        }
    }
}

/// How to start the helper: a program and the arguments that come before the helper's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxHelper {
    pub program: PathBuf,
    /// E.g. `["__sandbox"]` when the helper is a hidden subcommand of the main binary.
    pub prefix_args: Vec<OsString>,
}

impl SandboxHelper {
    /// The helper at `program`.
    pub fn at(program: impl Into<PathBuf>) -> Self {
        Self { program: program.into(), prefix_args: Vec::new() }
    }

    /// A hidden subcommand: `program subcommand <helper arguments>`, where `program` calls
    /// [`helper_main`] for that subcommand before starting any thread.
    pub fn subcommand(program: impl Into<PathBuf>, subcommand: impl Into<OsString>) -> Self {
        Self { program: program.into(), prefix_args: vec![subcommand.into()] }
    }

    /// Finds `descartes-sandbox`: `$DESCARTES_SANDBOX_BIN`, else next to the current executable,
    /// else one directory up (a test binary in `target/*/deps`). The error lists where it looked.
    pub fn locate() -> Result<Self, String> {
        if let Some(p) = std::env::var_os(HELPER_ENV).filter(|p| !p.is_empty()) {
            let p = PathBuf::from(p);
            return if p.is_file() {
                Ok(Self::at(p))
            } else {
                Err(format!("{HELPER_ENV}={} does not name a file", p.display()))
            };
        }
        let mut looked = Vec::new();
        if let Ok(exe) = std::env::current_exe() {
            for dir in exe.parent().into_iter().chain(exe.parent().and_then(Path::parent)) {
                let candidate = dir.join(HELPER_NAME);
                if candidate.is_file() {
                    return Ok(Self::at(candidate));
                }
                looked.push(candidate.display().to_string());
            }
        }
        Err(format!(
            "the sandbox helper `{HELPER_NAME}` was not found (looked at {}; set {HELPER_ENV})",
            if looked.is_empty() { "nothing: the current executable is unknown".to_owned() } else { looked.join(", ") }
        ))
    }
}

/// The `shell` tool's sandbox: the policy, the helper, and whether the user was told about a
/// missing restriction.
#[derive(Debug)]
pub struct Sandbox {
    policy: SandboxPolicy,
    helper: Result<SandboxHelper, String>,
    noticed: AtomicBool,
    protected: Protected,
    env: ShellEnv,
}

/// How to start one command, as [`Sandbox::wrap`] decided.
#[derive(Debug)]
pub(crate) struct Wrapped {
    pub command: tokio::process::Command,
    /// The status when no helper runs (full access, or the helper is missing); otherwise the
    /// helper writes it to [`STATUS_FILE`] in the spool.
    pub status: Option<SandboxStatus>,
}

impl Sandbox {
    /// The policy with the helper found by [`SandboxHelper::locate`] (looked up only when the
    /// mode needs it).
    pub fn new(policy: SandboxPolicy) -> Self {
        Self::build(policy, SandboxHelper::locate())
    }

    /// The policy with an explicit helper.
    pub fn with_helper(policy: SandboxPolicy, helper: SandboxHelper) -> Self {
        Self::build(policy, Ok(helper))
    }

    fn build(policy: SandboxPolicy, helper: Result<SandboxHelper, String>) -> Self {
        Self { policy, helper, noticed: AtomicBool::new(false), protected: Protected::none(), env: ShellEnv::default() }
    }

    /// With Descartes' protected paths (read-only for commands).
    pub fn protecting(mut self, protected: Protected) -> Self {
        self.protected = protected;
        self
    }

    /// With the environment policy of commands.
    pub fn with_env(mut self, env: ShellEnv) -> Self {
        self.env = env;
        self
    }

    /// The protected paths.
    pub fn protected(&self) -> &Protected {
        &self.protected
    }

    /// The environment policy of commands.
    pub fn env(&self) -> &ShellEnv {
        &self.env
    }

    /// A command that is not sandboxed but supervised by the helper (`full-access` mode): it
    /// dies with this process (see [`helper`]). Used for task commands. Without a helper, the
    /// command itself. Either way with the environment policy applied.
    pub fn supervised(&self, program: &str, args: &[&std::ffi::OsStr]) -> tokio::process::Command {
        let mut command = match &self.helper {
            Ok(helper) => {
                let mut c = tokio::process::Command::new(&helper.program);
                c.args(&helper.prefix_args)
                    .args(["--mode", SandboxMode::FullAccess.as_str(), "--parent"])
                    .arg(std::process::id().to_string())
                    .arg("--")
                    .arg(program)
                    .args(args);
                c
            }
            Err(_) => {
                let mut c = tokio::process::Command::new(program);
                c.args(args);
                c
            }
        };
        self.env.apply(&mut command);
        command
    }

    /// How to start an unrestricted program that must not see Descartes' hidden files (an
    /// agent CLI, whose own tools run in its process): the helper and its arguments, up to and
    /// including `--`; the program and its arguments follow. The program dies with this
    /// process. `None` without a helper, or when protection is disabled.
    pub fn hiding_prefix(&self) -> Option<(PathBuf, Vec<OsString>)> {
        let helper = self.helper.as_ref().ok().filter(|_| !self.protected.disabled)?;
        let mut args = helper.prefix_args.clone();
        args.extend(["--mode".into(), SandboxMode::FullAccess.as_str().into()]);
        for p in &self.protected.hidden {
            args.extend(["--hide".into(), p.clone().into_os_string()]);
        }
        args.extend(["--parent".into(), std::process::id().to_string().into(), "--".into()]);
        Some((helper.program.clone(), args))
    }

    /// No sandbox (`full-access`).
    pub fn full_access() -> Self {
        Self::new(SandboxPolicy { mode: SandboxMode::FullAccess, ..SandboxPolicy::default() })
    }

    /// One sentence for the model about what commands may do (empty in `full-access`).
    pub fn describe(&self) -> &'static str {
        match (self.policy.mode, self.policy.network) {
            (SandboxMode::FullAccess, _) => "",
            (SandboxMode::WorkspaceWrite, false) => {
                " Sandboxed: files can be written only in the working directory (and the configured roots) and $TMPDIR; no network."
            }
            (SandboxMode::WorkspaceWrite, true) => {
                " Sandboxed: files can be written only in the working directory (and the configured roots) and $TMPDIR."
            }
            (SandboxMode::ReadOnly, false) => " Sandboxed: read-only except $TMPDIR; no network.",
            (SandboxMode::ReadOnly, true) => " Sandboxed: read-only except $TMPDIR.",
        }
    }

    /// A sandbox whose helper could not be found (tests).
    #[cfg(test)]
    pub(crate) fn missing_helper(policy: SandboxPolicy, why: &str) -> Self {
        Self::build(policy, Err(why.to_owned()))
    }

    pub fn policy(&self) -> &SandboxPolicy {
        &self.policy
    }

    /// What the sandbox would enforce here, found by running the helper in probe mode (it
    /// restricts itself as for a command and reports). A runtime shows `notice` once at start.
    pub async fn probe(&self) -> SandboxStatus {
        if self.policy.mode == SandboxMode::FullAccess {
            return SandboxStatus::unsandboxed(SandboxMode::FullAccess, None);
        }
        let helper = match &self.helper {
            Ok(h) => h,
            Err(e) => return SandboxStatus::unsandboxed(self.policy.mode, Some(missing_helper_notice(e))),
        };
        let mut cmd = tokio::process::Command::new(&helper.program);
        cmd.args(&helper.prefix_args).args(self.policy_args(&[])).arg("--probe");
        cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
        match cmd.output().await {
            Ok(out) if out.status.success() => match serde_json::from_slice::<SandboxStatus>(&out.stdout) {
                Ok(status) => status,
                Err(e) => SandboxStatus::unsandboxed(
                    self.policy.mode,
                    Some(format!(
                        "the sandbox helper {} answered the probe with something unexpected: {e}",
                        helper.program.display()
                    )),
                ),
            },
            Ok(out) => SandboxStatus::unsandboxed(
                self.policy.mode,
                Some(format!(
                    "the sandbox helper {} failed its probe ({}): {}",
                    helper.program.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
            ),
            Err(e) => SandboxStatus::unsandboxed(
                self.policy.mode,
                Some(format!("cannot run the sandbox helper {}: {e}", helper.program.display())),
            ),
        }
    }

    /// The per-run temporary directory for a call's spool: `<spool of the run>/.tmp` (call
    /// spools are named by sanitized call ids, which never start with a dot), removed with the
    /// run's spool.
    pub fn temp_dir_for(spool_dir: &Path) -> PathBuf {
        spool_dir.parent().unwrap_or(spool_dir).join(".tmp")
    }

    fn policy_args(&self, extra_writable: &[&Path]) -> Vec<OsString> {
        let mut args = Vec::new();
        for p in extra_writable.iter().copied().chain(
            (self.policy.mode == SandboxMode::WorkspaceWrite)
                .then_some(self.policy.writable_roots.iter().map(PathBuf::as_path))
                .into_iter()
                .flatten(),
        ) {
            args.push("--write".into());
            args.push(p.as_os_str().to_owned());
        }
        if self.policy.network {
            args.push("--network".into());
        }
        if self.policy.unix_sockets {
            args.push("--unix-sockets".into());
        }
        if self.policy.require {
            args.push("--require".into());
        }
        args.push("--mode".into());
        args.push(self.policy.mode.as_str().into());
        args
    }

    /// The command that runs `program args` under this sandbox for a call whose working
    /// directory is `cwd` and whose spool is `spool` (both writable by the helper's rules as
    /// the mode says; the temporary directory must exist). An error (the reason) when the
    /// sandbox is required and the helper is missing.
    pub(crate) fn wrap(
        &self,
        program: &str,
        args: &[&std::ffi::OsStr],
        cwd: &Path,
        spool: &Path,
    ) -> Result<Wrapped, String> {
        let direct = |status: SandboxStatus| {
            let mut command = tokio::process::Command::new(program);
            command.args(args);
            self.env.apply(&mut command);
            Ok(Wrapped { command, status: Some(status) })
        };
        if self.policy.mode == SandboxMode::FullAccess {
            if self.helper.is_ok() {
                let command = self.supervised(program, args);
                return Ok(Wrapped {
                    command,
                    status: Some(SandboxStatus::unsandboxed(SandboxMode::FullAccess, None)),
                });
            }
            return direct(SandboxStatus::unsandboxed(SandboxMode::FullAccess, None));
        }
        let helper = match &self.helper {
            Ok(h) => h,
            Err(e) if self.policy.require => return Err(format!("{e}; the sandbox is required, so nothing was run")),
            Err(e) => return direct(SandboxStatus::unsandboxed(self.policy.mode, Some(missing_helper_notice(e)))),
        };
        let tmp = Self::temp_dir_for(spool);
        let mut writable: Vec<&Path> = vec![spool, &tmp];
        let mut name_roots: Vec<&Path> = Vec::new();
        if self.policy.mode == SandboxMode::WorkspaceWrite {
            writable.push(cwd);
            name_roots.push(cwd);
            name_roots.extend(self.policy.writable_roots.iter().map(PathBuf::as_path));
        }
        let all_writable: Vec<&Path> = writable.iter().copied().chain(name_roots.iter().skip(1).copied()).collect();
        let (readonly, again) = self.protected.mounts(&name_roots, &all_writable);
        let mut command = tokio::process::Command::new(&helper.program);
        command.args(&helper.prefix_args).args(self.policy_args(&writable));
        for p in &readonly {
            command.arg("--readonly").arg(p);
        }
        for p in &again {
            command.arg("--writable-within").arg(p);
        }
        if !self.protected.disabled {
            for p in self.protected.hidden.iter().filter(|p| p.is_file()) {
                command.arg("--hide").arg(p);
            }
        }
        command
            .arg("--parent")
            .arg(std::process::id().to_string())
            .arg("--status")
            .arg(spool.join(STATUS_FILE))
            .arg("--")
            .arg(program)
            .args(args);
        self.env.apply(&mut command);
        command.env("TMPDIR", &tmp);
        Ok(Wrapped { command, status: None })
    }

    /// True the first time a notice is to be shown (then it goes into details only).
    pub(crate) fn first_notice(&self) -> bool {
        !self.noticed.swap(true, Ordering::Relaxed)
    }
}

fn missing_helper_notice(e: &str) -> String {
    format!(
        "{e}. Commands run WITHOUT a sandbox; only the permission policy guards them. \
         Install `{HELPER_NAME}` next to the executable, or choose sandbox mode full-access to silence this."
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::helper::{HelperArgs, parse_args};
    use super::*;

    fn args(list: &[&str]) -> Result<HelperArgs, SandboxError> {
        parse_args(list.iter().map(OsString::from))
    }

    #[test]
    fn helper_arguments_parse() {
        let a = args(&[
            "--write",
            "/a",
            "--write",
            "/b",
            "--network",
            "--require",
            "--mode",
            "read-only",
            "--status",
            "/s",
            "--",
            "sh",
            "-c",
            "x",
        ])
        .unwrap();
        assert_eq!(a.writable, vec![PathBuf::from("/a"), PathBuf::from("/b")]);
        assert!(a.network && a.require && !a.probe);
        assert_eq!(a.mode, SandboxMode::ReadOnly);
        assert_eq!(a.status_file, Some(PathBuf::from("/s")));
        assert_eq!(a.command, vec![OsString::from("sh"), "-c".into(), "x".into()]);
        assert!(args(&["--probe"]).unwrap().probe);
        assert_eq!(args(&["--", "--write"]).unwrap().command, vec![OsString::from("--write")]);
    }

    #[test]
    fn bad_helper_arguments_are_usage_errors() {
        for bad in
            [&[][..], &["--probe", "--", "x"], &["--write"], &["--mode", "open"], &["--bogus", "--", "x"], &["--"]]
        {
            let err = args(bad).unwrap_err();
            assert!(matches!(err, SandboxError::Usage(_)), "{bad:?}: {err}");
            assert!(err.to_string().contains("usage:"), "{err}");
        }
    }

    #[test]
    fn modes_parse_and_serialize_in_kebab_case() {
        for m in [SandboxMode::ReadOnly, SandboxMode::WorkspaceWrite, SandboxMode::FullAccess] {
            assert_eq!(m.as_str().parse::<SandboxMode>().unwrap(), m);
            assert_eq!(serde_json::to_value(m).unwrap(), serde_json::json!(m.as_str()));
        }
        assert!("none".parse::<SandboxMode>().unwrap_err().contains("workspace-write"));
        let p: SandboxPolicy = serde_json::from_value(serde_json::json!({"network": true})).unwrap();
        assert_eq!(
            p,
            SandboxPolicy {
                mode: SandboxMode::WorkspaceWrite,
                writable_roots: vec![],
                network: true,
                unix_sockets: false,
                require: false
            }
        );
    }

    #[test]
    fn the_temp_dir_sits_beside_the_call_spools() {
        assert_eq!(Sandbox::temp_dir_for(Path::new("/s/run/call-1")), PathBuf::from("/s/run/.tmp"));
    }

    #[test]
    fn a_missing_helper_is_named_in_the_notice() {
        let sandbox =
            Sandbox::missing_helper(SandboxPolicy::default(), "the sandbox helper `descartes-sandbox` was not found");
        let w = sandbox.wrap("sh", &[], Path::new("/w"), Path::new("/s/r/c")).unwrap();
        let notice = w.status.unwrap().notice.unwrap();
        assert!(notice.contains("descartes-sandbox") && notice.contains("WITHOUT a sandbox"), "{notice}");
        assert!(sandbox.first_notice());
        assert!(!sandbox.first_notice());
        let required = Sandbox::missing_helper(SandboxPolicy { require: true, ..SandboxPolicy::default() }, "gone");
        let refused = required.wrap("sh", &[], Path::new("/w"), Path::new("/s/r/c")).unwrap_err();
        assert!(refused.contains("gone") && refused.contains("required"), "{refused}");
    }
}
