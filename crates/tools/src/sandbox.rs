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
//! - **Network off** (unless [`SandboxPolicy::network`]): a seccomp filter (`seccompiler`)
//!   makes `socket()` with `AF_INET` or `AF_INET6` fail with `EPERM`, so neither TCP nor UDP nor
//!   raw IP is possible, and refuses `io_uring_setup` (io_uring can create sockets). Unix sockets
//!   stay allowed (a command can still talk to a local daemon through a socket file it can reach).
//!   On x86_64, 32-bit (i386) system calls are refused by the filter's architecture check.
//!   Seccomp rather than Landlock's TCP rules because those cover neither UDP nor older kernels.
//!
//! Both restrictions are inherited by every process the command starts, and survive the death
//! of Descartes. The helper writes what it could enforce ([`SandboxStatus`]) into the call's
//! spool before running the command. Where the kernel lacks support (no Landlock, an ABI that
//! cannot enforce everything, no seccomp) or the helper cannot be found, the command runs with
//! what could be enforced, and the tool says so: a notice in the first such output's text and,
//! on every output, `details.sandbox`. The permission policy is then the only guard; nothing
//! is degraded silently. [`Sandbox::probe`] tells the same before any command runs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

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
        "{0}\nusage: descartes-sandbox [--mode MODE] [--write PATH]... [--network] [--require] [--status FILE] (--probe | -- PROGRAM ARGS...)"
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
    /// Set when something asked for is not enforced: what, and what it means.
    pub notice: Option<String>,
}

impl SandboxStatus {
    /// Every restriction asked for is in force.
    pub fn enforced(&self) -> bool {
        self.notice.is_none()
    }

    fn unsandboxed(mode: SandboxMode, notice: Option<String>) -> Self {
        Self { mode, landlock: "off".into(), landlock_abi: 0, network_blocked: false, notice }
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
        let helper = if policy.mode == SandboxMode::FullAccess {
            Err("not needed in full-access mode".to_owned())
        } else {
            SandboxHelper::locate()
        };
        Self { policy, helper, noticed: AtomicBool::new(false) }
    }

    /// The policy with an explicit helper.
    pub fn with_helper(policy: SandboxPolicy, helper: SandboxHelper) -> Self {
        Self { policy, helper: Ok(helper), noticed: AtomicBool::new(false) }
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
        Self { policy, helper: Err(why.to_owned()), noticed: AtomicBool::new(false) }
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
            Ok(Wrapped { command, status: Some(status) })
        };
        if self.policy.mode == SandboxMode::FullAccess {
            return direct(SandboxStatus::unsandboxed(SandboxMode::FullAccess, None));
        }
        let helper = match &self.helper {
            Ok(h) => h,
            Err(e) if self.policy.require => return Err(format!("{e}; the sandbox is required, so nothing was run")),
            Err(e) => return direct(SandboxStatus::unsandboxed(self.policy.mode, Some(missing_helper_notice(e)))),
        };
        let tmp = Self::temp_dir_for(spool);
        let mut writable: Vec<&Path> = vec![spool, &tmp];
        if self.policy.mode == SandboxMode::WorkspaceWrite {
            writable.push(cwd);
        }
        let mut command = tokio::process::Command::new(&helper.program);
        command
            .args(&helper.prefix_args)
            .args(self.policy_args(&writable))
            .arg("--status")
            .arg(spool.join(STATUS_FILE))
            .arg("--")
            .arg(program)
            .args(args)
            .env("TMPDIR", &tmp);
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

/// Arguments of the helper.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct HelperArgs {
    mode: SandboxMode,
    writable: Vec<PathBuf>,
    network: bool,
    status_file: Option<PathBuf>,
    require: bool,
    probe: bool,
    command: Vec<OsString>,
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<HelperArgs, SandboxError> {
    let mut out = HelperArgs::default();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| SandboxError::Usage(format!("{name} needs a value")));
        match arg.to_str() {
            Some("--write") => out.writable.push(value("--write")?.into()),
            Some("--status") => out.status_file = Some(value("--status")?.into()),
            Some("--mode") => {
                let v = value("--mode")?;
                out.mode = v.to_str().unwrap_or_default().parse().map_err(SandboxError::Usage)?;
            }
            Some("--network") => out.network = true,
            Some("--probe") => out.probe = true,
            Some("--require") => out.require = true,
            Some("--") => {
                out.command = it.collect();
                break;
            }
            _ => return Err(SandboxError::Usage(format!("unexpected argument {}", arg.to_string_lossy()))),
        }
    }
    if out.probe != out.command.is_empty() {
        return Err(SandboxError::Usage("give either --probe or a command after --".into()));
    }
    Ok(out)
}

/// What [`helper_main`] did when it returns normally.
#[derive(Debug)]
pub enum HelperOutcome {
    /// `--probe`: the restrictions were applied to the helper itself; here is the status (the
    /// caller prints it as JSON and exits).
    Probed(SandboxStatus),
}

/// The helper: parses `args` (without the program name or subcommand), restricts the current
/// process and `exec`s the command. Returns only for `--probe` or an error. Call it from a
/// single-threaded process (before any runtime starts): the restrictions apply to the calling
/// thread, which becomes the command.
pub fn helper_main(args: impl IntoIterator<Item = OsString>) -> Result<HelperOutcome, SandboxError> {
    let args = parse_args(args)?;
    let status = restrict(&args)?;
    if args.probe {
        return Ok(HelperOutcome::Probed(status));
    }
    if let Some(path) = &args.status_file {
        let json = serde_json::to_vec(&status).unwrap_or_default();
        std::fs::write(path, json).map_err(|source| SandboxError::Status { path: path.clone(), source })?;
    }
    if let Some(notice) = status.notice.filter(|_| args.require) {
        return Err(SandboxError::NotEnforced(notice));
    }
    let (program, rest) = args.command.split_first().ok_or_else(|| SandboxError::Usage("no command".into()))?;
    use std::os::unix::process::CommandExt;
    let source = std::process::Command::new(program).args(rest).exec();
    Err(SandboxError::Exec { program: program.to_string_lossy().into_owned(), source })
}

#[cfg(not(target_os = "linux"))]
fn restrict(args: &HelperArgs) -> Result<SandboxStatus, SandboxError> {
    let _ = args;
    Err(SandboxError::Unsupported)
}

#[cfg(target_os = "linux")]
fn restrict(args: &HelperArgs) -> Result<SandboxStatus, SandboxError> {
    use landlock::{
        ABI, Access, AccessFs, LandlockStatus, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
        path_beneath_rules,
    };
    if args.mode == SandboxMode::FullAccess {
        return Ok(SandboxStatus::unsandboxed(SandboxMode::FullAccess, None));
    }
    let abi = ABI::V7;
    let writable: Vec<&Path> = args.writable.iter().map(PathBuf::as_path).collect();
    let restricted = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(&writable, AccessFs::from_all(abi))))
        .and_then(|r| {
            r.add_rules(path_beneath_rules(
                ["/dev/null", "/dev/zero", "/dev/full", "/dev/tty"],
                AccessFs::from_all(abi),
            ))
        })
        .and_then(|r| r.restrict_self())
        .map_err(|e| SandboxError::Landlock(e.to_string()))?;
    let landlock_abi = match restricted.landlock {
        LandlockStatus::Available { effective_abi, .. } => effective_abi as i32,
        _ => 0,
    };
    let mut notices = Vec::new();
    let landlock = match restricted.ruleset {
        RulesetStatus::FullyEnforced => "full",
        RulesetStatus::PartiallyEnforced => {
            notices.push(format!(
                "this kernel's Landlock ABI {landlock_abi} cannot restrict every kind of write (ABI 3+ restricts truncation, 5+ device ioctls)"
            ));
            "partial"
        }
        RulesetStatus::NotEnforced => {
            notices.push(format!(
                "Landlock is not available on this kernel ({:?}): writes outside the workspace are NOT prevented",
                restricted.landlock
            ));
            "none"
        }
    };
    let network_blocked = if args.network {
        false
    } else {
        match block_network() {
            Ok(()) => true,
            Err(e) => {
                notices.push(format!("network access could not be turned off (seccomp: {e})"));
                false
            }
        }
    };
    let notice = (!notices.is_empty())
        .then(|| format!("sandbox ({}): {}; the permission policy still applies.", args.mode, notices.join("; ")));
    Ok(SandboxStatus { mode: args.mode, landlock: landlock.into(), landlock_abi, network_blocked, notice })
}

/// Installs the seccomp filter that refuses IP sockets and io_uring with `EPERM`.
#[cfg(target_os = "linux")]
fn block_network() -> Result<(), String> {
    use std::collections::BTreeMap;

    use nix::libc;
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
        TargetArch,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())?;
    let domain_is = |family: libc::c_int| -> Result<SeccompRule, String> {
        let family = u64::try_from(family).map_err(|e| e.to_string())?;
        let cond =
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, family).map_err(|e| e.to_string())?;
        SeccompRule::new(vec![cond]).map_err(|e| e.to_string())
    };
    let socket_rules = vec![domain_is(libc::AF_INET)?, domain_is(libc::AF_INET6)?];
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_socket, socket_rules.clone());
    rules.insert(libc::SYS_io_uring_setup, Vec::new());
    #[cfg(target_arch = "x86_64")]
    {
        // The x32 ABI shares x86_64's audit architecture; its numbers carry bit 30.
        const X32: i64 = 0x4000_0000;
        rules.insert(X32 | libc::SYS_socket, socket_rules);
        rules.insert(X32 | libc::SYS_io_uring_setup, Vec::new());
    }
    let eperm = u32::try_from(libc::EPERM).map_err(|e| e.to_string())?;
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(eperm), arch)
        .map_err(|e| e.to_string())?;
    let program: BpfProgram = filter.try_into().map_err(|e: seccompiler::BackendError| e.to_string())?;
    seccompiler::apply_filter(&program).map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
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
            SandboxPolicy { mode: SandboxMode::WorkspaceWrite, writable_roots: vec![], network: true, require: false }
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
