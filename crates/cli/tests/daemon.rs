//! `descartes daemon start|status|stop` end to end: the real binary, real shell commands, real
//! signals.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn env() -> Env {
    let env = Env::new(|_| Reply::Stream(openai::text(&["unused"])));
    env.init();
    env
}

fn ok(env: &Env, args: &[&str]) -> String {
    let out = env.run(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    stdout(&out).trim().to_owned()
}

fn tasks(env: &Env) -> Vec<Value> {
    serde_json::from_str::<Value>(&ok(env, &["task", "list", "--json"])).unwrap().as_array().cloned().unwrap()
}

fn show(env: &Env, id: &str) -> Value {
    serde_json::from_str(&ok(env, &["task", "show", id, "--json"])).unwrap()
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status(env: &Env) -> (Option<i32>, Value) {
    let out = env.run(&["daemon", "status", "--json"]);
    (out.status.code(), serde_json::from_str(stdout(&out).trim()).unwrap_or(Value::Null))
}

/// Kills a daemon left running by a failed test.
struct Reaper(Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).stderr(Stdio::null()).status();
        }
    }
}

fn foreground(env: &Env, args: &[&str]) -> Child {
    let mut all = vec!["daemon", "start", "--foreground"];
    all.extend_from_slice(args);
    env.cmd(&all).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

fn wait_running(env: &Env) -> u32 {
    let mut pid = 0;
    wait_until("the daemon to answer", Duration::from_secs(10), || {
        let (code, st) = status(env);
        pid = st["pid"].as_u64().unwrap_or(0) as u32;
        code == Some(0)
    });
    pid
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_background_daemon_runs_every_task_once_reports_status_and_stops() {
    let env = env();
    let start = env.run(&[
        "daemon",
        "start",
        "--workers",
        "2",
        "--lease-ttl",
        "2s",
        "--command",
        "echo $DESCARTES_TASK_TITLE >> out.txt; echo \"result of $DESCARTES_TASK_TITLE\"",
    ]);
    assert!(start.status.success(), "{}", stderr(&start));
    assert!(stdout(&start).contains("daemon started: pid "), "{}", stdout(&start));
    let (code, st) = status(&env);
    let _reaper = Reaper(vec![st["pid"].as_u64().unwrap() as u32]);
    assert_eq!(code, Some(0));
    assert_eq!(st["running"], true);
    assert_eq!(st["workers"], 2);
    assert_eq!(st["lease_ttl_ms"], 2000);
    let state = env.project().join(".descartes");
    let mode = std::fs::metadata(state.join("daemon.sock")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is private");
    assert_eq!(std::fs::read_to_string(state.join("daemon.pid")).unwrap().trim(), st["pid"].to_string());

    // A second daemon in the same place is refused.
    let again = env.run(&["daemon", "start"]);
    assert_eq!(again.status.code(), Some(5), "{}", stderr(&again));
    assert!(stderr(&again).contains("already running"), "{}", stderr(&again));

    let titles: Vec<String> = (0..8).map(|i| format!("title-{i}")).collect();
    for t in &titles {
        ok(&env, &["task", "create", t]);
    }
    wait_until("every task done", Duration::from_secs(20), || tasks(&env).iter().all(|t| t["status"] == "done"));
    let mut lines = read_lines(&env.project().join("out.txt"));
    lines.sort();
    assert_eq!(lines, titles, "each task ran exactly once");
    let t = &tasks(&env)[0];
    assert_eq!(t["result"], "result of title-0");
    assert_eq!(t["attempts"], 1);

    let human = env.run(&["daemon", "status"]);
    assert!(human.status.success());
    let text = stdout(&human);
    assert!(text.contains("daemon: running (pid"), "{text}");
    assert!(text.contains("workers: 2"), "{text}");
    assert!(text.contains("done: 8"), "{text}");
    assert_eq!(status(&env).1["done"], 8);

    let stop = env.run(&["daemon", "stop"]);
    assert!(stop.status.success(), "{}", stderr(&stop));
    assert!(stdout(&stop).contains("daemon stopped"), "{}", stdout(&stop));
    let (code, st) = status(&env);
    assert_eq!(code, Some(5));
    assert_eq!(st["running"], false);
    assert!(!state.join("daemon.pid").exists() && !state.join("daemon.sock").exists());
    let log = std::fs::read_to_string(state.join("daemon.log")).unwrap();
    assert!(log.contains("daemon started") && log.contains("daemon stopped"), "{log}");
    // Stopping again is harmless.
    assert!(env.run(&["daemon", "stop"]).status.success());
}

#[test]
fn a_failing_command_fails_the_attempt_with_its_exit_code_and_stderr() {
    let env = env();
    let mut child = foreground(&env, &["--workers", "1", "--command", "echo out; echo broken >&2; exit 3"]);
    let _reaper = Reaper(vec![child.id()]);
    wait_running(&env);
    let once = ok(&env, &["task", "create", "once", "--max-attempts", "1"]);
    let twice = ok(&env, &["task", "create", "twice", "--max-attempts", "2"]);
    wait_until("once failed", Duration::from_secs(10), || show(&env, &once)["status"] == "failed");
    let t = show(&env, &once);
    let err = t["error"].as_str().unwrap();
    assert!(err.contains("exit code 3") && err.contains("broken"), "{err}");
    // The first failure of a task with attempts left queues it again, with the error.
    wait_until("twice attempted", Duration::from_secs(10), || show(&env, &twice)["attempts"] == 1);
    wait_until("twice requeued", Duration::from_secs(10), || {
        let t = show(&env, &twice);
        t["status"] == "queued" && t["error"].is_string() || t["status"] == "failed"
    });
    ok(&env, &["daemon", "stop"]);
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}

#[test]
fn after_a_sigkill_the_task_command_dies_and_a_new_daemon_takes_the_task_over_when_the_lease_expires() {
    let env = env();
    // The first attempt hangs (and records its process group); later ones finish at once.
    let command = "if [ \"$DESCARTES_TASK_ATTEMPT\" = 1 ]; then echo $$ > first.pid; sleep 60; fi; \
                   echo \"$DESCARTES_TASK_TITLE $DESCARTES_TASK_ATTEMPT\" >> out.txt";
    let mut first = foreground(&env, &["--workers", "1", "--lease-ttl", "1s", "--command", command]);
    let mut reaper = Reaper(vec![first.id()]);
    wait_running(&env);
    let id = ok(&env, &["task", "create", "survivor"]);
    let pid_file = env.project().join("first.pid");
    let pgid = || std::fs::read_to_string(&pid_file).unwrap_or_default().trim().to_owned();
    wait_until("the first attempt to run", Duration::from_secs(10), || !pgid().is_empty());
    first.kill().unwrap();
    first.wait().unwrap();
    // The command dies with its daemon (the sandbox helper supervises it): attempt 2 can never
    // run beside attempt 1.
    let pid = pgid();
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or_default().trim_start().starts_with('Z'))
    };
    wait_until("the first attempt's process to die with its daemon", Duration::from_secs(3), || !alive());
    // The worker runs the command while its `start` commits, so under load the kill can come
    // before that commit: the task is held either way (claimed or running) until the lease ends.
    let held = show(&env, &id)["status"].as_str().unwrap_or_default().to_owned();
    assert!(held == "running" || held == "claimed", "{held}");
    let (code, _) = status(&env);
    assert_eq!(code, Some(5), "a SIGKILLed daemon is not running");

    let started = Instant::now();
    let mut second = foreground(&env, &["--workers", "1", "--lease-ttl", "1s", "--command", command]);
    reaper.0.push(second.id());
    wait_until("the task to be taken over and done", Duration::from_secs(15), || show(&env, &id)["status"] == "done");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    let t = show(&env, &id);
    assert_eq!(t["attempts"], 2);
    assert_eq!(read_lines(&env.project().join("out.txt")), vec!["survivor 2"]);
    signal(&second, "TERM");
    assert!(wait_exit(&mut second, Duration::from_secs(10)).success());
}

#[test]
fn sigterm_lets_running_tasks_finish_within_the_grace_then_releases_the_rest() {
    let env = env();
    let command = "case \"$DESCARTES_TASK_TITLE\" in long) sleep 60;; *) sleep 0.5;; esac; \
                   echo $DESCARTES_TASK_TITLE >> out.txt";
    let mut child = foreground(&env, &["--workers", "2", "--grace", "1500ms", "--command", command]);
    let _reaper = Reaper(vec![child.id()]);
    wait_running(&env);
    let short = ok(&env, &["task", "create", "short"]);
    let long = ok(&env, &["task", "create", "long"]);
    wait_until("both running", Duration::from_secs(10), || {
        show(&env, &short)["status"] == "running" && show(&env, &long)["status"] == "running"
    });
    let stopped_at = Instant::now();
    signal(&child, "TERM");
    let exit = wait_exit(&mut child, Duration::from_secs(10));
    assert!(exit.success(), "SIGTERM is a graceful stop: {exit}");
    let took = stopped_at.elapsed();
    assert!(took >= Duration::from_millis(1200) && took < Duration::from_secs(5), "{took:?}");
    assert_eq!(show(&env, &short)["status"], "done", "finished within the grace period");
    let l = show(&env, &long);
    assert_eq!(l["status"], "queued", "released for another worker: {l}");
    assert_eq!(l["attempts"], 0, "a release charges no attempt");
    assert_eq!(read_lines(&env.project().join("out.txt")), vec!["short"]);
    assert!(!env.project().join(".descartes/daemon.pid").exists());
}

#[test]
fn bad_daemon_arguments_are_usage_errors() {
    let env = env();
    for args in [
        &["daemon", "start", "--workers", "0"][..],
        &["daemon", "start", "--workers", "-2"],
        &["daemon", "start", "--lease-ttl", "-1s"],
        &["daemon", "start", "--lease-ttl", "0s"],
        &["daemon", "start", "--lease-ttl", "soon"],
    ] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
    let out = env.run(&["daemon", "start", "--workers", "0"]);
    assert!(stderr(&out).contains("at least 1"), "{}", stderr(&out));
    let out = env.run(&["daemon", "start", "--lease-ttl", "-1s"]);
    assert!(stderr(&out).contains("negative"), "{}", stderr(&out));
    // Nothing was started.
    assert_eq!(status(&env).0, Some(5));
}

#[test]
fn without_a_command_each_task_is_given_to_the_agent() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["Task ", "handled."])));
    env.init();
    let mut child = foreground(&env, &["--workers", "1"]);
    let _reaper = Reaper(vec![child.id()]);
    wait_running(&env);
    let id = ok(&env, &["task", "create", "greet", "--prompt", "say hello to the team"]);
    wait_until("done", Duration::from_secs(15), || show(&env, &id)["status"] == "done");
    assert_eq!(show(&env, &id)["result"], "Task handled.");
    let req = env.server.last_request().unwrap();
    assert_eq!(req.last_user_text().as_deref(), Some("say hello to the team"));
    // The agent's run is in the log like any other.
    assert_eq!(env.runs().len(), 1);
    signal(&child, "TERM");
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}
