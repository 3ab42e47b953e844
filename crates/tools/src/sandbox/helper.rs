//! The helper process: parses its arguments, restricts itself, then supervises the command.
//!
//! Order of the restrictions (each is inherited by every process the command starts):
//! 1. **Protected paths** (`--readonly`): in a private user + mount namespace, each path is
//!    bind-mounted onto itself read-only, then the paths of `--writable-within` (the call's
//!    spool, a worktree under the state directory) are bound again writable, and `/dev/null`
//!    is bound over each file of `--hide` (the daemon's and the API's tokens). The working
//!    directory is entered again so that it resolves through the new mounts. In `full-access`
//!    mode only the files of `--hide` are covered (an agent CLI: unrestricted, but blind to
//!    the tokens); nothing else is restricted.
//! 2. **Landlock**: reads everywhere, writes only beneath `--write` paths; from ABI 6 the
//!    command cannot signal processes outside its sandbox nor connect to abstract Unix sockets
//!    made outside it. A Landlock-restricted process cannot mount or unmount, so step 1 holds.
//! 3. **seccomp**: no IP sockets (unless `--network`), no Unix sockets (unless
//!    `--unix-sockets`), no io_uring, and none of the calls that change mounts or namespaces.
//!
//! Then the helper does not `exec` the command: it starts it as its child (same process group)
//! and waits, so that the command dies with the process that asked for it (`--parent PID`):
//! when that process is gone (`PR_SET_PDEATHSIG`, and a check of the parent every 200 ms),
//! the helper kills its whole process group. It is also a child subreaper, so orphans of the
//! command stay below it. The helper leaves with the command's exit status (re-raising the
//! signal that killed it).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::{SandboxError, SandboxMode, SandboxStatus};

/// Arguments of the helper.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct HelperArgs {
    pub mode: SandboxMode,
    pub writable: Vec<PathBuf>,
    pub readonly: Vec<PathBuf>,
    pub writable_within: Vec<PathBuf>,
    pub hide: Vec<PathBuf>,
    pub network: bool,
    pub unix_sockets: bool,
    pub status_file: Option<PathBuf>,
    pub require: bool,
    pub probe: bool,
    pub parent: Option<i32>,
    pub command: Vec<OsString>,
}

pub(crate) fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<HelperArgs, SandboxError> {
    let mut out = HelperArgs::default();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| SandboxError::Usage(format!("{name} needs a value")));
        match arg.to_str() {
            Some("--write") => out.writable.push(value("--write")?.into()),
            Some("--readonly") => out.readonly.push(value("--readonly")?.into()),
            Some("--writable-within") => out.writable_within.push(value("--writable-within")?.into()),
            Some("--hide") => out.hide.push(value("--hide")?.into()),
            Some("--status") => out.status_file = Some(value("--status")?.into()),
            Some("--mode") => {
                let v = value("--mode")?;
                out.mode = v.to_str().unwrap_or_default().parse().map_err(SandboxError::Usage)?;
            }
            Some("--parent") => {
                let v = value("--parent")?;
                let pid = v.to_str().and_then(|s| s.parse::<i32>().ok()).filter(|p| *p > 0);
                out.parent = Some(pid.ok_or_else(|| SandboxError::Usage("--parent needs a process id".into()))?);
            }
            Some("--network") => out.network = true,
            Some("--unix-sockets") => out.unix_sockets = true,
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
/// process and runs the command under its supervision; it does not return once the command
/// started (the process exits with the command's status). Returns only for `--probe` or an
/// error. Call it from a single-threaded process (before any runtime starts): a user namespace
/// can only be entered by a single-threaded process, and the restrictions apply to the calling
/// thread.
pub fn helper_main(args: impl IntoIterator<Item = OsString>) -> Result<HelperOutcome, SandboxError> {
    let args = parse_args(args)?;
    // The parent as it is now: if it is already gone, do not start anything.
    let parent = nix::unistd::getppid();
    if args.parent.is_some_and(|p| p != parent.as_raw()) {
        return Err(SandboxError::ParentGone);
    }
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
    supervise(program, rest, args.parent.is_some().then_some(parent))
}

#[cfg(not(target_os = "linux"))]
fn restrict(args: &HelperArgs) -> Result<SandboxStatus, SandboxError> {
    let _ = args;
    Err(SandboxError::Unsupported)
}

#[cfg(not(target_os = "linux"))]
fn supervise(
    program: &OsString,
    rest: &[OsString],
    parent: Option<nix::unistd::Pid>,
) -> Result<HelperOutcome, SandboxError> {
    let _ = (program, rest, parent);
    Err(SandboxError::Unsupported)
}

#[cfg(target_os = "linux")]
fn restrict(args: &HelperArgs) -> Result<SandboxStatus, SandboxError> {
    use landlock::{
        ABI, Access, AccessFs, LandlockStatus, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
        path_beneath_rules,
    };
    if args.mode == SandboxMode::FullAccess {
        // Unrestricted, but the hidden files stay hidden (an agent CLI's own tools).
        if args.hide.is_empty() {
            return Ok(SandboxStatus::unsandboxed(SandboxMode::FullAccess, None));
        }
        let notice = protect_paths(&[], &[], &args.hide).err().map(|e| {
            format!("sandbox (full-access): Descartes' tokens could NOT be hidden ({e}); the permission policy still applies.")
        });
        let mut status = SandboxStatus::unsandboxed(SandboxMode::FullAccess, notice.clone());
        status.protected = if notice.is_some() { "not-enforced" } else { "hidden" }.into();
        return Ok(status);
    }
    let mut notices = Vec::new();
    let protected = if args.readonly.is_empty() && args.hide.is_empty() {
        "none-needed"
    } else {
        match protect_paths(&args.readonly, &args.writable_within, &args.hide) {
            Ok(()) => "read-only",
            Err(e) => {
                notices.push(format!(
                    "Descartes' protected paths ({}) could NOT be made read-only ({e})",
                    args.readonly.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                ));
                "not-enforced"
            }
        }
    };
    let abi = ABI::V7;
    let writable: Vec<&Path> = args.writable.iter().map(PathBuf::as_path).collect();
    let restricted = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.scope(Scope::from_all(abi)))
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
    let landlock = match restricted.ruleset {
        RulesetStatus::FullyEnforced => "full",
        RulesetStatus::PartiallyEnforced => {
            notices.push(format!(
                "this kernel's Landlock ABI {landlock_abi} cannot restrict everything (ABI 3+ restricts truncation, 5+ device ioctls, 6+ signals and abstract Unix sockets outside the sandbox)"
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
    let (network_blocked, unix_sockets_blocked) = match install_filter(!args.network, !args.unix_sockets) {
        Ok(()) => (!args.network, !args.unix_sockets),
        Err(e) => {
            notices.push(format!("network and Unix sockets could not be turned off (seccomp: {e})"));
            (false, false)
        }
    };
    let notice = (!notices.is_empty())
        .then(|| format!("sandbox ({}): {}; the permission policy still applies.", args.mode, notices.join("; ")));
    Ok(SandboxStatus {
        mode: args.mode,
        landlock: landlock.into(),
        landlock_abi,
        network_blocked,
        unix_sockets_blocked,
        protected: protected.into(),
        notice,
    })
}

/// Enters a user and mount namespace of its own and makes each of `readonly` read-only there
/// (then each of `writable_within` writable again), deepest last; each file of `hide` is
/// replaced by `/dev/null`.
#[cfg(target_os = "linux")]
fn protect_paths(readonly: &[PathBuf], writable_within: &[PathBuf], hide: &[PathBuf]) -> Result<(), String> {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    let cwd = std::env::current_dir().map_err(|e| format!("cannot read the working directory: {e}"))?;
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("cannot make a user and mount namespace: {e}"))?;
    let write = |file: &str, text: String| std::fs::write(file, text).map_err(|e| format!("cannot write {file}: {e}"));
    match std::fs::write("/proc/self/setgroups", "deny") {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot write /proc/self/setgroups: {e}")),
    }
    write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    write("/proc/self/gid_map", format!("{gid} {gid} 1"))?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(|e| format!("cannot make the mounts private: {e}"))?;
    let mut binds: Vec<(&Path, bool)> = readonly
        .iter()
        .map(|p| (p.as_path(), true))
        .chain(
            writable_within
                .iter()
                .filter(|w| readonly.iter().any(|r| w.starts_with(r) && *w != r))
                .map(|p| (p.as_path(), false)),
        )
        .filter(|(p, _)| p.exists())
        .collect();
    binds.sort_by_key(|(p, _)| p.components().count());
    for (path, read_only) in binds {
        mount(Some(path), path, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
            .map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
        // A bind takes the flags of the mount it comes from (a read-only one when it lies
        // beneath a protected path), so each is remounted with the flags wanted; the remount
        // must keep the flags the mount has (nosuid, nodev, ...): they are locked in a user
        // namespace.
        let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | locked_flags(path);
        flags.set(MsFlags::MS_RDONLY, read_only);
        mount(None::<&str>, path, None::<&str>, flags, None::<&str>).map_err(|e| {
            format!("cannot make {} {}: {e}", path.display(), if read_only { "read-only" } else { "writable" })
        })?;
    }
    for file in hide.iter().filter(|f| f.is_file()) {
        mount(Some("/dev/null"), file, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(|e| format!("cannot hide {}: {e}", file.display()))?;
    }
    std::env::set_current_dir(&cwd).map_err(|e| format!("cannot enter {} again: {e}", cwd.display()))
}

#[cfg(target_os = "linux")]
fn locked_flags(path: &Path) -> nix::mount::MsFlags {
    use nix::mount::MsFlags;
    use nix::sys::statvfs::{FsFlags, statvfs};
    // ST_RDONLY is deliberately not kept: the caller decides it.
    let Ok(st) = statvfs(path) else { return MsFlags::empty() };
    let f = st.flags();
    let mut out = MsFlags::empty();
    for (fs, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(fs) {
            out |= ms;
        }
    }
    out
}

/// Installs the seccomp filter: `socket()` for IP families (`block_ip`) and for `AF_UNIX`
/// (`block_unix`), io_uring (it can make sockets), and the calls that change mounts or enter
/// namespaces fail with `EPERM`.
#[cfg(target_os = "linux")]
fn install_filter(block_ip: bool, block_unix: bool) -> Result<(), String> {
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
    let mut socket_rules = Vec::new();
    if block_ip {
        socket_rules.push(domain_is(libc::AF_INET)?);
        socket_rules.push(domain_is(libc::AF_INET6)?);
    }
    if block_unix {
        socket_rules.push(domain_is(libc::AF_UNIX)?);
    }
    let mut refused: Vec<i64> = vec![
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_pivot_root,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
    ];
    if block_ip || block_unix {
        refused.push(libc::SYS_io_uring_setup);
    }
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in &refused {
        rules.insert(*nr, Vec::new());
    }
    if !socket_rules.is_empty() {
        rules.insert(libc::SYS_socket, socket_rules.clone());
    }
    #[cfg(target_arch = "x86_64")]
    {
        // The x32 ABI shares x86_64's audit architecture; its numbers carry bit 30.
        const X32: i64 = 0x4000_0000;
        for nr in &refused {
            rules.insert(X32 | nr, Vec::new());
        }
        if !socket_rules.is_empty() {
            rules.insert(X32 | libc::SYS_socket, socket_rules);
        }
    }
    let eperm = u32::try_from(libc::EPERM).map_err(|e| e.to_string())?;
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(eperm), arch)
        .map_err(|e| e.to_string())?;
    let program: BpfProgram = filter.try_into().map_err(|e: seccompiler::BackendError| e.to_string())?;
    seccompiler::apply_filter(&program).map_err(|e| e.to_string())
}

/// Runs the command as a child in this process group and waits for it; kills the group when
/// `parent` (the process that started the helper) is gone. Exits with the command's status.
#[cfg(target_os = "linux")]
fn supervise(
    program: &OsString,
    rest: &[OsString],
    parent: Option<nix::unistd::Pid>,
) -> Result<HelperOutcome, SandboxError> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::prctl;
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, killpg, raise, sigprocmask};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use nix::unistd::{Pid, getpgrp, getppid};
    use std::os::fd::AsFd;

    let setup = |what: &str, e: nix::Error| SandboxError::Supervise(format!("{what}: {e}"));
    let mut mask = SigSet::empty();
    for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT] {
        mask.add(s);
    }
    // Blocked here, delivered through the signalfd; the child starts with an empty mask (std
    // resets it).
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).map_err(|e| setup("cannot block signals", e))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| setup("cannot make a signalfd", e))?;
    if parent.is_some() {
        prctl::set_pdeathsig(Signal::SIGTERM).map_err(|e| setup("cannot set the parent-death signal", e))?;
        if parent != Some(getppid()) {
            return Err(SandboxError::ParentGone);
        }
    }
    let _ = prctl::set_child_subreaper(true);
    let child = std::process::Command::new(program)
        .args(rest)
        .spawn()
        .map_err(|source| SandboxError::Exec { program: program.to_string_lossy().into_owned(), source })?;
    let child = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let kill_all = || -> ! {
        let _ = killpg(getpgrp(), Signal::SIGKILL);
        std::process::exit(137)
    };
    loop {
        let mut fds = [PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(200u16));
        // Only the facts matter (a child changed state, the parent may be gone): drain.
        while let Ok(Some(_)) = signals.read_signal() {}
        if parent.is_some_and(|p| p != getppid()) {
            kill_all();
        }
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => std::process::exit(code),
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                    // Leave the way the command did (std ignores SIGPIPE: that one ends in the
                    // exit code below).
                    let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&mask), None);
                    let _ = raise(sig);
                    std::process::exit(128 + sig as i32)
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}
