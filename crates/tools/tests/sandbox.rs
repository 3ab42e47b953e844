//! The `shell` tool under the real sandbox helper on the real kernel (Landlock, seccomp).
//!
//! Where the kernel cannot sandbox (no Landlock), every test prints a loud skip, or fails when
//! `DESCARTES_TEST_REQUIRE_SANDBOX=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use descartes_core::{Recovery, Tool, ToolContext, ToolOutput};
use descartes_protocol::RunId;
use descartes_tools::sandbox::{Sandbox, SandboxHelper, SandboxMode, SandboxPolicy};
use descartes_tools::{Protected, ShellTool};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const HELPER: &str = env!("CARGO_BIN_EXE_descartes-sandbox");

struct Setup {
    dir: tempfile::TempDir,
    ctx: ToolContext,
}

impl Setup {
    fn root(&self) -> PathBuf {
        self.dir.path().canonicalize().unwrap()
    }
}

/// `<tmp>/work` as the working directory, `<tmp>/spool/run/call-1` as the call's spool.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let cwd = root.join("work");
    std::fs::create_dir(&cwd).unwrap();
    let ctx = ToolContext {
        cwd,
        run_id: RunId::from("run"),
        call_id: "call-1".into(),
        spool_dir: root.join("spool").join("run").join("call-1"),
        cancel: CancellationToken::new(),
    };
    Setup { dir, ctx }
}

fn sandbox(mode: SandboxMode, network: bool, writable_roots: Vec<PathBuf>) -> Arc<Sandbox> {
    Arc::new(Sandbox::with_helper(
        SandboxPolicy { mode, writable_roots, network, unix_sockets: false, require: true },
        SandboxHelper::at(HELPER),
    ))
}

fn shell(sandbox: Arc<Sandbox>) -> ShellTool {
    ShellTool::with_sandbox(Duration::from_secs(30), 64 * 1024, sandbox)
}

/// True when the kernel enforces the sandbox fully; otherwise a loud skip (or a failure when
/// `DESCARTES_TEST_REQUIRE_SANDBOX=1`).
async fn sandbox_available(test: &str) -> bool {
    let status = sandbox(SandboxMode::WorkspaceWrite, false, vec![]).probe().await;
    if status.landlock == "full" && status.network_blocked {
        return true;
    }
    let why = format!("the sandbox is not fully available here: {status:?}");
    if std::env::var("DESCARTES_TEST_REQUIRE_SANDBOX").as_deref() == Ok("1") {
        panic!("{test}: {why} (DESCARTES_TEST_REQUIRE_SANDBOX=1)");
    }
    eprintln!("\n!!!!!!!! SKIPPED {test}: {why} !!!!!!!!\n");
    false
}

macro_rules! require_sandbox {
    ($name:expr) => {
        if !sandbox_available($name).await {
            return;
        }
    };
}

fn details(out: &ToolOutput) -> &Value {
    out.details.as_ref().expect("shell output has details")
}

#[tokio::test]
async fn the_probe_reports_landlock_and_seccomp() {
    require_sandbox!("the_probe_reports_landlock_and_seccomp");
    let status = sandbox(SandboxMode::WorkspaceWrite, false, vec![]).probe().await;
    assert!(status.enforced(), "{status:?}");
    assert!(status.landlock_abi >= 1, "{status:?}");
    let with_network = sandbox(SandboxMode::ReadOnly, true, vec![]).probe().await;
    assert!(!with_network.network_blocked && with_network.enforced(), "{with_network:?}");
    assert_eq!(with_network.mode, SandboxMode::ReadOnly);
}

#[tokio::test]
async fn workspace_write_allows_the_workspace_and_the_temp_dir_but_nothing_else() {
    require_sandbox!("workspace_write_allows_the_workspace_and_the_temp_dir_but_nothing_else");
    let s = setup();
    let outside = s.root().join("outside.txt");
    std::fs::write(s.root().join("readable.txt"), "read me\n").unwrap();
    let tool = shell(sandbox(SandboxMode::WorkspaceWrite, false, vec![]));

    let out = tool.call(json!({"command": format!("echo x > {}", outside.display())}), &s.ctx).await;
    assert!(out.is_error, "{}", out.content);
    assert!(out.content.contains("Permission denied"), "{}", out.content);
    assert!(!outside.exists(), "the sandbox let a write outside the workspace through");
    // Not in a child process either, nor by moving a file out.
    let out = tool
        .call(
            json!({"command": format!("echo y > inside.txt; sh -c 'touch {0}'; mv inside.txt {0}", outside.display())}),
            &s.ctx,
        )
        .await;
    assert!(out.is_error, "{}", out.content);
    assert!(!outside.exists());

    let out = tool
        .call(
            json!({"command": format!("echo x > here.txt && mkdir -p a/b && echo t > \"$TMPDIR/t\" && cat \"$TMPDIR/t\" {} && echo \"$TMPDIR\"", s.root().join("readable.txt").display())}),
            &s.ctx,
        )
        .await;
    assert!(!out.is_error, "{}", out.content);
    assert!(s.ctx.cwd.join("here.txt").exists() && s.ctx.cwd.join("a/b").is_dir());
    let tmp = s.root().join("spool/run/.tmp");
    assert!(out.content.contains(&format!("t\nread me\n{}\n", tmp.display())), "{}", out.content);
    assert!(tmp.join("t").exists());
    let d = details(&out);
    assert_eq!(d["sandbox"]["mode"], "workspace-write");
    assert_eq!(d["sandbox"]["landlock"], "full");
    assert_eq!(d["sandbox"]["network_blocked"], true);
    assert!(!out.content.contains("note:"), "{}", out.content);
    // /dev/null stays writable: commands redirect to it all the time.
    let out = tool.call(json!({"command": "echo gone > /dev/null && echo ok"}), &s.ctx).await;
    assert!(!out.is_error, "{}", out.content);
}

#[tokio::test]
async fn extra_writable_roots_are_writable() {
    require_sandbox!("extra_writable_roots_are_writable");
    let s = setup();
    let extra = s.root().join("extra");
    std::fs::create_dir(&extra).unwrap();
    let tool = shell(sandbox(SandboxMode::WorkspaceWrite, false, vec![extra.clone()]));
    let out = tool.call(json!({"command": format!("echo x > {}/f", extra.display())}), &s.ctx).await;
    assert!(!out.is_error, "{}", out.content);
    assert!(extra.join("f").exists());
}

#[tokio::test]
async fn read_only_refuses_workspace_writes_but_keeps_the_temp_dir() {
    require_sandbox!("read_only_refuses_workspace_writes_but_keeps_the_temp_dir");
    let s = setup();
    std::fs::write(s.ctx.cwd.join("existing.txt"), "old\n").unwrap();
    let tool = shell(sandbox(SandboxMode::ReadOnly, false, vec![s.root()]));
    let out = tool.call(json!({"command": "echo x > new.txt"}), &s.ctx).await;
    assert!(out.is_error, "{}", out.content);
    assert!(!s.ctx.cwd.join("new.txt").exists());
    let out = tool.call(json!({"command": "echo new > existing.txt; rm existing.txt"}), &s.ctx).await;
    assert!(out.is_error, "{}", out.content);
    assert_eq!(std::fs::read_to_string(s.ctx.cwd.join("existing.txt")).unwrap(), "old\n");
    let out =
        tool.call(json!({"command": "cat existing.txt && echo t > \"$TMPDIR/t\" && cat \"$TMPDIR/t\""}), &s.ctx).await;
    assert!(!out.is_error, "{}", out.content);
    assert!(out.content.contains("stdout:\nold\nt\n"), "{}", out.content);
    assert_eq!(details(&out)["sandbox"]["mode"], "read-only");
}

#[tokio::test]
async fn full_access_writes_anywhere() {
    // No helper, no kernel support needed: runs everywhere.
    let s = setup();
    let outside = s.root().join("outside.txt");
    let tool = shell(sandbox(SandboxMode::FullAccess, false, vec![]));
    let out =
        tool.call(json!({"command": format!("echo x > {} && echo \"tmp=$TMPDIR\"", outside.display())}), &s.ctx).await;
    assert!(!out.is_error, "{}", out.content);
    assert!(outside.exists());
    assert!(!out.content.contains(".tmp"), "full access leaves TMPDIR alone: {}", out.content);
    assert_eq!(details(&out)["sandbox"]["landlock"], "off");
    assert!(!s.root().join("spool/run/.tmp").exists());
}

/// Connects to a local listener from a sandboxed command (bash's `/dev/tcp`); returns the
/// output and what the listener received, if anything.
async fn connect_from_shell(network: bool) -> (ToolOutput, Option<String>) {
    use tokio::io::AsyncReadExt;
    let s = setup();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepting = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.ok()?;
        let mut got = String::new();
        stream.read_to_string(&mut got).await.ok()?;
        Some(got)
    });
    let tool = shell(sandbox(SandboxMode::WorkspaceWrite, network, vec![]));
    let command = format!("bash -c 'echo hello > /dev/tcp/127.0.0.1/{port}'");
    let out = tool.call(json!({"command": command}), &s.ctx).await;
    let got = tokio::time::timeout(Duration::from_millis(500), accepting).await.ok().and_then(|r| r.ok()).flatten();
    (out, got)
}

#[tokio::test]
async fn tcp_connect_fails_when_the_network_is_off() {
    require_sandbox!("tcp_connect_fails_when_the_network_is_off");
    let (out, got) = connect_from_shell(false).await;
    assert!(out.is_error, "{}", out.content);
    assert!(out.content.contains("not permitted"), "{}", out.content);
    assert_eq!(got, None, "the listener was reached");
}

#[tokio::test]
async fn tcp_connect_works_when_the_network_is_on() {
    require_sandbox!("tcp_connect_works_when_the_network_is_on");
    let (out, got) = connect_from_shell(true).await;
    assert!(!out.is_error, "{}", out.content);
    assert_eq!(got.as_deref(), Some("hello\n"));
    assert_eq!(details(&out)["sandbox"]["network_blocked"], false);
}

#[tokio::test]
async fn udp_is_refused_too_when_the_network_is_off() {
    require_sandbox!("udp_is_refused_too_when_the_network_is_off");
    let s = setup();
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let tool = shell(sandbox(SandboxMode::WorkspaceWrite, false, vec![]));
    let out = tool.call(json!({"command": format!("bash -c 'echo hello > /dev/udp/127.0.0.1/{port}'")}), &s.ctx).await;
    assert!(out.is_error, "{}", out.content);
    assert!(out.content.contains("not permitted"), "{}", out.content);
    let mut buf = [0u8; 16];
    let received = tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buf)).await;
    assert!(received.is_err(), "a datagram got through");
}

#[tokio::test]
async fn the_spool_and_recovery_work_inside_the_sandbox() {
    require_sandbox!("the_spool_and_recovery_work_inside_the_sandbox");
    let s = setup();
    let tool = shell(sandbox(SandboxMode::ReadOnly, false, vec![]));
    let input = json!({"command": "echo ran >> \"$TMPDIR/count.txt\"; echo out; echo err >&2; exit 4"});
    let first = tool.call(input.clone(), &s.ctx).await;
    assert_eq!(details(&first)["exit_code"], 4, "{}", first.content);
    for f in ["lock", "started", "stdout", "stderr", "exit", "sandbox"] {
        assert!(s.ctx.spool_dir.join(f).exists(), "spool file {f} missing");
    }
    let Recovery::Completed(out) = tool.recover(&input, &s.ctx).await else { panic!("not completed") };
    assert!(out.content.contains("exit code: 4") && out.content.contains("stdout:\nout\n"), "{}", out.content);
    assert!(out.content.contains("not run again"), "{}", out.content);
    assert_eq!(details(&out)["sandbox"]["mode"], "read-only");
    let count = s.root().join("spool/run/.tmp/count.txt");
    assert_eq!(std::fs::read_to_string(count).unwrap(), "ran\n");
}

#[tokio::test]
async fn timeout_cancellation_and_clipping_work_inside_the_sandbox() {
    require_sandbox!("timeout_cancellation_and_clipping_work_inside_the_sandbox");
    let s = setup();
    let tool = shell(sandbox(SandboxMode::WorkspaceWrite, false, vec![]));
    let started = Instant::now();
    let out = tool.call(json!({"command": "sleep 5; touch late", "timeout_secs": 1}), &s.ctx).await;
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    assert_eq!(details(&out)["timed_out"], true, "{}", out.content);

    let token = s.ctx.cancel.clone();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel();
    });
    let out = tool.call(json!({"command": "sleep 2; touch late"}), &s.ctx).await;
    canceller.await.unwrap();
    assert_eq!(details(&out)["cancelled"], true, "{}", out.content);

    let s = setup();
    let small =
        ShellTool::with_sandbox(Duration::from_secs(30), 1000, sandbox(SandboxMode::WorkspaceWrite, false, vec![]));
    let out = small.call(json!({"command": r"head -c 1000000 /dev/zero | tr '\0' a"}), &s.ctx).await;
    assert!(!out.is_error);
    assert!(out.content.contains("[… 999000 bytes omitted …]"));
    assert_eq!(details(&out)["stdout_bytes"], 1_000_000);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!s.ctx.cwd.join("late").exists());
}

#[tokio::test]
async fn a_missing_helper_is_a_clear_error() {
    let s = setup();
    let missing = s.root().join("no-such-helper");
    let tool = shell(Arc::new(Sandbox::with_helper(SandboxPolicy::default(), SandboxHelper::at(&missing))));
    let out = tool.call(json!({"command": "echo hi"}), &s.ctx).await;
    assert!(out.is_error);
    assert!(out.content.contains("no-such-helper"), "{}", out.content);
    let status = Sandbox::with_helper(SandboxPolicy::default(), SandboxHelper::at(&missing)).probe().await;
    assert!(!status.enforced() && status.notice.as_deref().unwrap_or("").contains("no-such-helper"), "{status:?}");
}

#[tokio::test]
async fn a_helper_behind_a_subcommand_gets_its_arguments_after_the_prefix() {
    require_sandbox!("a_helper_behind_a_subcommand_gets_its_arguments_after_the_prefix");
    // A main binary's hidden subcommand is `program SUBCOMMAND <helper arguments>`; here the
    // "subcommand" is a helper option itself, which shows where the prefix goes.
    let s = setup();
    let extra = s.root().join("extra");
    std::fs::create_dir(&extra).unwrap();
    let helper = SandboxHelper { program: HELPER.into(), prefix_args: vec!["--write".into(), extra.clone().into()] };
    let policy = SandboxPolicy { require: true, ..SandboxPolicy::default() };
    let tool = shell(Arc::new(Sandbox::with_helper(policy, helper)));
    let out = tool.call(json!({"command": format!("echo x > {}/f", extra.display())}), &s.ctx).await;
    assert!(!out.is_error, "{}", out.content);
    assert!(extra.join("f").exists());
    assert_eq!(SandboxHelper::subcommand("/bin/descartes", "__sandbox").prefix_args, vec!["__sandbox"]);
}

#[tokio::test]
async fn protected_paths_are_read_only_for_commands_but_the_spool_beneath_them_is_not() {
    require_sandbox!("protected_paths_are_read_only_for_commands_but_the_spool_beneath_them_is_not");
    let s = setup();
    let cwd = s.ctx.cwd.clone();
    let state = cwd.join(".descartes");
    std::fs::create_dir_all(state.join("worktrees/t1/.ai")).unwrap();
    std::fs::create_dir_all(cwd.join(".git/hooks")).unwrap();
    std::fs::create_dir_all(cwd.join(".ai")).unwrap();
    std::fs::write(state.join("config.toml"), "# mine\n").unwrap();
    std::fs::write(state.join("descartes.db"), "db").unwrap();
    std::fs::write(cwd.join(".git/config"), "[core]\n").unwrap();
    std::fs::write(state.join("daemon.token"), "the-daemon-token").unwrap();
    let protected = Protected {
        absolute: vec![state.clone(), state.join("worktrees/.meta")],
        writable_within: vec![state.join("worktrees")],
        hidden: vec![state.join("daemon.token")],
        disabled: false,
    };
    let sandbox = Arc::new(
        Sandbox::with_helper(SandboxPolicy { require: true, ..SandboxPolicy::default() }, SandboxHelper::at(HELPER))
            .protecting(protected),
    );
    let tool = shell(sandbox);
    let mut ctx = s.ctx.clone();
    // The spool under the state directory, as in a project.
    ctx.spool_dir = state.join("spool/run/call-1");
    for attack in [
        "printf '[sandbox]\\nmode = \"full-access\"\\n' >> .descartes/config.toml",
        "echo x > .descartes/descartes.db",
        "rm .descartes/descartes.db",
        "mv .descartes/descartes.db moved.db",
        "echo x > .descartes/new-file",
        "echo 'rules: []' > .ai/policy.yaml",
        "echo 'exit 0' > .git/hooks/pre-commit",
        "echo '[x]' >> .git/config",
        "umount .descartes",
    ] {
        let out = tool.call(json!({"command": attack}), &ctx).await;
        assert!(out.is_error, "{attack}: {}", out.content);
    }
    assert_eq!(std::fs::read_to_string(state.join("config.toml")).unwrap(), "# mine\n");
    assert_eq!(std::fs::read_to_string(state.join("descartes.db")).unwrap(), "db");
    assert!(!state.join("new-file").exists() && !cwd.join(".ai/policy.yaml").exists());
    assert!(!cwd.join(".git/hooks/pre-commit").exists());
    assert_eq!(std::fs::read_to_string(cwd.join(".git/config")).unwrap(), "[core]\n");
    // The daemon's token cannot even be read.
    let out = tool.call(json!({"command": "cat .descartes/daemon.token; echo read=$?"}), &ctx).await;
    assert!(!out.content.contains("the-daemon-token"), "{}", out.content);
    // The rest of the workspace, the spool and the temporary directory are writable.
    let out = tool.call(json!({"command": "echo ok > src.txt && echo t > \"$TMPDIR/t\" && cat src.txt"}), &ctx).await;
    assert!(!out.is_error, "{}", out.content);
    assert_eq!(details(&out)["sandbox"]["protected"], "read-only", "{}", out.content);
    // A worktree under the state directory is writable, its own `.ai` is not.
    let mut in_worktree = ctx.clone();
    in_worktree.cwd = state.join("worktrees/t1");
    in_worktree.call_id = "call-2".into();
    in_worktree.spool_dir = state.join("spool/run/call-2");
    let out = tool.call(json!({"command": "echo code > lib.rs"}), &in_worktree).await;
    assert!(!out.is_error, "{}", out.content);
    assert!(state.join("worktrees/t1/lib.rs").exists());
    in_worktree.spool_dir = state.join("spool/run/call-3");
    let out = tool.call(json!({"command": "echo x > .ai/policy.yaml"}), &in_worktree).await;
    assert!(out.is_error, "{}", out.content);
}

#[tokio::test]
async fn commands_cannot_signal_processes_outside_the_sandbox() {
    require_sandbox!("commands_cannot_signal_processes_outside_the_sandbox");
    let s = setup();
    let mut victim = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let tool = shell(sandbox(SandboxMode::WorkspaceWrite, false, vec![]));
    let out = tool.call(json!({"command": format!("kill -TERM {}", victim.id())}), &s.ctx).await;
    assert!(out.is_error, "{}", out.content);
    assert!(out.content.contains("not permitted"), "{}", out.content);
    assert!(victim.try_wait().unwrap().is_none(), "the process outside the sandbox was killed");
    // Its own children it can still signal.
    let out = tool.call(json!({"command": "sleep 30 & kill $! && wait $!; echo status=$?"}), &s.ctx).await;
    assert!(out.content.contains("status=143"), "{}", out.content);
    victim.kill().unwrap();
    let _ = victim.wait();
}

#[tokio::test]
async fn commands_cannot_connect_to_unix_sockets_unless_allowed() {
    require_sandbox!("commands_cannot_connect_to_unix_sockets_unless_allowed");
    let s = setup();
    let path = s.root().join("daemon.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let connect = format!(
        "python3 -c \"import socket; s = socket.socket(socket.AF_UNIX); s.connect('{}'); s.send(b'stop')\"",
        path.display()
    );
    let tool = shell(sandbox(SandboxMode::WorkspaceWrite, false, vec![]));
    let out = tool.call(json!({"command": connect}), &s.ctx).await;
    assert!(out.is_error, "{}", out.content);
    assert!(out.content.contains("not permitted"), "{}", out.content);
    assert!(listener.accept().is_err(), "a connection got through");
    assert_eq!(details(&out)["sandbox"]["unix_sockets_blocked"], true);
    let allowed = Arc::new(Sandbox::with_helper(
        SandboxPolicy { unix_sockets: true, require: true, ..SandboxPolicy::default() },
        SandboxHelper::at(HELPER),
    ));
    let out = shell(allowed).call(json!({"command": connect}), &s.ctx).await;
    assert!(!out.is_error, "{}", out.content);
    assert!(listener.accept().is_ok());
}

#[tokio::test]
async fn the_helper_kills_the_command_when_its_parent_dies() {
    // The helper's parent is a shell that leaves after starting it; the command (and its own
    // child) must not outlive it.
    let s = setup();
    let pids = s.root().join("pids");
    let script = format!(
        "{HELPER} --mode full-access --parent $$ -- sh -c 'sleep 30 & echo $! > {0}; wait' & sleep 0.5; exit 0",
        pids.display()
    );
    let status = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .status()
        .unwrap();
    assert!(status.success());
    let pid: i32 = std::fs::read_to_string(&pids).unwrap().trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z")
    {
        assert!(Instant::now() < deadline, "the command's process {pid} outlived the helper's parent");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A parent that is already gone: nothing starts.
    let out = std::process::Command::new(HELPER)
        .args(["--mode", "full-access", "--parent", "999999999", "--", "touch"])
        .arg(s.root().join("started"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!s.root().join("started").exists());
}
