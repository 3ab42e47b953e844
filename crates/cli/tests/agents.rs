//! Agents at work, end to end: the registry, routing, execution in git worktrees with
//! evidence, merge and discard, and the audit trail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn ok(env: &Env, args: &[&str]) -> String {
    let out = env.run(args);
    assert!(out.status.success(), "{args:?}: {}{}", stdout(&out), stderr(&out));
    stdout(&out).trim().to_owned()
}

fn show(env: &Env, id: &str) -> Value {
    serde_json::from_str(&ok(env, &["task", "show", id, "--json"])).unwrap()
}

/// The project is a git repository with one commit on `main`; `.descartes/` is ignored.
fn repo_env<F>(responder: F) -> Env
where
    F: Fn(&RecordedRequest) -> Reply + Send + Sync + 'static,
{
    let env = Env::new(responder);
    env.git_repo(&[]);
    env.init();
    env
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills a daemon left running by a failed test.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-9", &self.0.id().to_string()]).stderr(Stdio::null()).status();
        let _ = self.0.wait();
    }
}

fn daemon(env: &Env, workers: &str) -> Daemon {
    let child = env
        .cmd(&["daemon", "start", "--foreground", "--workers", workers, "--lease-ttl", "5s", "--command", "exit 3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Daemon(child)
}

fn stop(env: &Env, mut d: Daemon) {
    let out = env.run(&["daemon", "stop"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the daemon did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tasks_go_to_agents_by_label_load_is_spread_and_a_disabled_agent_gets_nothing() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["unused"])));
    env.init();
    let slow = "sleep 1; echo \"$DESCARTES_AGENT did $DESCARTES_TASK_TITLE\"";
    for (name, label) in [("rusty-1", "rust"), ("rusty-2", "rust"), ("snake", "python")] {
        ok(
            &env,
            &[
                "ai",
                "register",
                name,
                "--backend",
                "command",
                "--command",
                slow,
                "--label",
                label,
                "--max-concurrent",
                "2",
            ],
        );
    }
    // Bad registrations are refused clearly.
    let out = env.run(&["ai", "register", "x", "--backend", "command"]);
    assert!(!out.status.success() && stderr(&out).contains("needs --command"), "{}", stderr(&out));
    let out = env.run(&["ai", "register", "y", "--backend", "no-such-provider"]);
    assert!(!out.status.success() && stderr(&out).contains("no-such-provider"), "{}", stderr(&out));
    let out = env.run(&["ai", "register", "rusty-1", "--backend", "command", "--command", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    ok(&env, &["ai", "disable", "snake"]);
    let list: Value = serde_json::from_str(&ok(&env, &["ai", "list", "--json"])).unwrap();
    let status: Vec<(&str, &str)> =
        list.as_array().unwrap().iter().map(|a| (a["name"].as_str().unwrap(), a["status"].as_str().unwrap())).collect();
    assert_eq!(status, [("rusty-1", "idle"), ("rusty-2", "idle"), ("snake", "disabled")]);

    let rust: Vec<String> =
        (0..4).map(|i| ok(&env, &["task", "create", &format!("r{i}"), "--needs-label", "rust"])).collect();
    let py = ok(&env, &["task", "create", "p", "--needs-label", "python"]);
    let d = daemon(&env, "4");
    wait_until("the rust tasks", Duration::from_secs(60), || rust.iter().all(|id| show(&env, id)["status"] == "done"));
    let mut by_agent = std::collections::BTreeMap::<String, usize>::new();
    for id in &rust {
        let t = show(&env, id);
        let agent = t["agent"].as_str().unwrap().to_owned();
        assert!(t["result"].as_str().unwrap().starts_with(&format!("{agent} did")), "{t}");
        *by_agent.entry(agent).or_default() += 1;
    }
    assert_eq!(by_agent.len(), 2, "both rust agents got work: {by_agent:?}");
    assert!(by_agent.values().all(|n| *n == 2), "load is spread: {by_agent:?}");
    // The python task waits for an agent, and says why.
    let t = show(&env, &py);
    assert_eq!(t["status"], "queued");
    let human = ok(&env, &["task", "show", &py]);
    assert!(human.contains("routing:") && human.contains("snake: disabled"), "{human}");
    assert!(human.contains("rusty-1: no label `python`"), "{human}");
    // Enabled again, it gets its task.
    ok(&env, &["ai", "enable", "snake"]);
    wait_until("the python task", Duration::from_secs(30), || show(&env, &py)["status"] == "done");
    assert_eq!(show(&env, &py)["agent"], "snake");
    stop(&env, d);
    let list: Value = serde_json::from_str(&ok(&env, &["ai", "list", "--json"])).unwrap();
    assert_eq!(list[0]["stats"]["succeeded"], 2, "{list}");
    assert_eq!(list[0]["success_rate"], 1.0, "{list}");
    let human = ok(&env, &["ai", "list"]);
    assert!(human.contains("snake") && human.contains("100%"), "{human}");
    ok(&env, &["ai", "remove", "snake"]);
    assert_eq!(env.run(&["ai", "remove", "snake"]).status.code(), Some(5));
}

#[test]
fn parallel_tasks_run_in_their_own_worktrees_with_their_own_evidence() {
    let env = repo_env(|_| Reply::Stream(openai::text(&["unused"])));
    let p = env.project();
    let edit = "sleep 1; echo \"$DESCARTES_TASK_TITLE\" > \"$DESCARTES_TASK_PROMPT\"; echo edited";
    ok(&env, &["ai", "register", "editor", "--backend", "command", "--command", edit, "--max-concurrent", "2"]);
    let a = ok(&env, &["task", "create", "alpha", "--prompt", "a.txt", "--lock", "a.txt", "--id", "task-a"]);
    let b = ok(
        &env,
        &[
            "task",
            "create",
            "beta",
            "--prompt",
            "b.txt",
            "--lock",
            "src/**",
            "--id",
            "task-b",
            "--test-command",
            "test -f b.txt",
        ],
    );
    let head = git(&p, &["rev-parse", "HEAD"]);
    let d = daemon(&env, "2");
    wait_until("both tasks", Duration::from_secs(60), || [&a, &b].iter().all(|id| show(&env, id)["status"] == "done"));
    stop(&env, d);

    // The user's checkout is untouched: same commit, no changes, no new files.
    assert_eq!(git(&p, &["rev-parse", "HEAD"]), head);
    assert_eq!(git(&p, &["status", "--porcelain"]), "");
    assert!(!p.join("a.txt").exists() && !p.join("b.txt").exists());
    let branches = git(&p, &["branch", "--list", "descartes/*"]);
    assert!(branches.contains("descartes/task-a") && branches.contains("descartes/task-b"), "{branches}");
    let worktrees = git(&p, &["worktree", "list"]);
    assert_eq!(worktrees.lines().count(), 3, "{worktrees}");

    // Each task's evidence is exactly its own diff.
    let diff_a = ok(&env, &["task", "diff", &a]);
    assert!(diff_a.contains("+++ b/a.txt") && diff_a.contains("+alpha") && !diff_a.contains("b.txt"), "{diff_a}");
    let diff_b = ok(&env, &["task", "diff", &b]);
    assert!(diff_b.contains("+++ b/b.txt") && !diff_b.contains("a.txt"), "{diff_b}");
    let ev = ok(&env, &["task", "show", &b, "--evidence"]);
    assert!(ev.contains("added    b.txt  [outside the task's locks]"), "{ev}");
    assert!(ev.contains("test:    `test -f b.txt`: exit 0"), "{ev}");
    let ev = ok(&env, &["task", "show", &a, "--evidence"]);
    assert!(ev.contains("added    a.txt") && !ev.contains("outside"), "{ev}");

    // Merge one: it lands in the user's checkout (fast-forward); the other then needs a merge
    // commit, which works too because they touch different files.
    let out = ok(&env, &["task", "merge", &a]);
    assert!(out.contains("fast-forward"), "{out}");
    assert_eq!(std::fs::read_to_string(p.join("a.txt")).unwrap(), "alpha\n");
    let out = ok(&env, &["task", "merge", &b]);
    assert!(out.contains("merge commit"), "{out}");
    assert!(p.join("b.txt").exists());
    assert_eq!(git(&p, &["status", "--porcelain"]), "");

    // Discard removes the worktree and the branch.
    ok(&env, &["task", "discard", &a]);
    assert!(!git(&p, &["branch", "--list", "descartes/*"]).contains("task-a"));

    // The audit trail holds every step, in order, and verifies.
    let trail = ok(&env, &["audit", &a]);
    let kinds: Vec<&str> = trail.lines().map(|l| l.split_whitespace().nth(3).unwrap()).collect();
    for k in [
        "task_created",
        "task_claimed",
        "task_routed",
        "task_worktree",
        "task_evidence",
        "task_completed",
        "task_merged",
        "task_discarded",
    ] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    let verified = ok(&env, &["audit", "verify"]);
    assert!(verified.starts_with("audit trail intact:") && verified.ends_with("in 3 trails"), "{verified}");
}

#[test]
fn a_failed_test_command_fails_the_attempt_and_keeps_its_evidence() {
    let env = repo_env(|_| Reply::Stream(openai::text(&["unused"])));
    ok(&env, &["ai", "register", "w", "--backend", "command", "--command", "echo change > c.txt"]);
    let id = ok(&env, &["task", "create", "t", "--test-command", "echo failing tests; exit 4", "--max-attempts", "1"]);
    let out = env.run(&["task", "execute", &id]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("the test command `echo failing tests; exit 4` failed"), "{}", stderr(&out));
    assert_eq!(show(&env, &id)["status"], "failed");
    let ev = ok(&env, &["task", "show", &id, "--evidence"]);
    assert!(ev.contains("attempt 1 (failed)") && ev.contains("exit 4") && ev.contains("added    c.txt"), "{ev}");
    // The same evidence in JSON, with its content-addressed references.
    let json: serde_json::Value =
        serde_json::from_str(&ok(&env, &["task", "show", &id, "--evidence", "--json"])).unwrap();
    assert_eq!(json["id"], id.as_str());
    let ev = &json["evidence"];
    assert_eq!((ev["attempt"].as_u64(), ev["succeeded"].as_bool()), (Some(1), Some(false)), "{json:#}");
    assert_eq!(ev["files"]["test"]["exit_code"], 4, "{json:#}");
    assert_eq!(ev["files"]["changed_files"][0]["path"], "c.txt", "{json:#}");
    assert_eq!(ev["files"]["diff"].as_str().map(str::len), Some(64), "a SHA-256 reference: {json:#}");
    assert!(ev["worktree"]["branch"].as_str().unwrap().starts_with("descartes/"), "{json:#}");
    // A task that is not runnable now says why.
    let out = env.run(&["task", "execute", &id]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
}

/// A model agent (Descartes' own loop) that writes a file with `write_file`.
fn writer(req: &RecordedRequest) -> Reply {
    if req.has_tool_result() {
        Reply::Stream(openai::text(&["Wrote notes."]))
    } else {
        Reply::Stream(openai::tool_call("w1", "write_file", &[r##"{"path":"notes.md","content":"# notes\n"}"##]))
    }
}

#[test]
fn a_model_agent_runs_its_loop_in_the_worktree_with_evidence() {
    let env = repo_env(writer);
    ok(&env, &["ai", "register", "gpt", "--backend", "openai", "--model", "gpt-4o-mini", "--label", "docs"]);
    let list = ok(&env, &["ai", "list"]);
    assert!(list.contains("openai/gpt-4o-mini") && list.contains("cost,sandbox,streaming,tools"), "{list}");
    let id = ok(&env, &["task", "create", "notes", "--prompt", "write the notes", "--needs-label", "docs"]);
    let out = env.run(&["task", "execute", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "Wrote notes.");
    assert!(!env.project().join("notes.md").exists(), "the user's checkout is untouched");
    let diff = ok(&env, &["task", "diff", &id]);
    assert!(diff.contains("+++ b/notes.md") && diff.contains("+# notes"), "{diff}");
    let ev = ok(&env, &["task", "show", &id, "--evidence"]);
    assert!(ev.contains("run:") && ev.contains("usage:") && ev.contains("tokens"), "{ev}");
    // The run's tool call is part of the task's audit trail.
    let trail = ok(&env, &["audit", &id, "--jsonl"]);
    assert!(trail.lines().any(|l| l.contains("\"tool_call_started\"") && l.contains("write_file")), "{trail}");
    assert!(env.server.requests()[0].body["messages"].to_string().contains("write the notes"));
}

/// The real `claude` CLI against a fake Anthropic server: it creates a file with its Bash tool,
/// Descartes answers its permission request (runs are unattended: asks are allowed) and
/// records everything; the change is evidence on the task's branch.
fn claude_responder(req: &RecordedRequest) -> Reply {
    if req.tool_names().is_empty() {
        return Reply::Stream(anthropic::text(&["ok"]));
    }
    if req.has_tool_result() {
        return Reply::Stream(anthropic::text(&["Marker made."]));
    }
    Reply::Stream(anthropic::tool_uses(
        Some("Creating the marker."),
        &[("toolu_01", "Bash", &[r#"{"command": "echo done > marker.txt", "#, r#""description": "Create marker"}"#])],
    ))
}

#[test]
fn claude_code_as_an_agent_works_in_the_worktree() {
    let Some(dir) = descartes_test_support::agent_clis::cli("claude").and_then(|p| p.parent().map(|d| d.to_owned()))
    else {
        return;
    };
    let env = repo_env(claude_responder);
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
    let run = |args: &[&str]| {
        env.cmd(args)
            .env("PATH", &path)
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .env("DISABLE_AUTOUPDATER", "1")
            .output()
            .unwrap()
    };
    let out = run(&["ai", "register", "claude", "--backend", "claude-code"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = ok(&env, &["task", "create", "marker", "--prompt", "make a marker", "--agent", "claude"]);
    let out = run(&["task", "execute", &id]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("Marker made."), "{}", stdout(&out));
    assert!(!env.project().join("marker.txt").exists(), "the user's checkout is untouched");
    let diff = ok(&env, &["task", "diff", &id]);
    assert!(diff.contains("+++ b/marker.txt") && diff.contains("+done"), "{diff}");
    let trail = ok(&env, &["audit", &id, "--jsonl"]);
    for kind in ["backend_session", "permission_decided", "tool_call_started", "task_evidence", "task_completed"] {
        assert!(trail.contains(&format!("\"{kind}\"")), "{kind} in the trail");
    }
}

const POLICY: &str = "\
version: 1
rules:
  - id: no-rm-rf
    effect: deny
    tools: [shell]
    commands: [\"rm -rf *\"]
    reason: never delete trees from an agent
  - id: approve-deploys
    effect: require_approval
    on: claim
    task_types: [deploy]
";

/// A model that tries to delete a tree, then reports what it got.
fn deleter(req: &RecordedRequest) -> Reply {
    match req.tool_results().last() {
        Some((_, out)) => Reply::Stream(openai::text(&[&format!("got: {}", out.replace('\n', " "))])),
        None => Reply::Stream(openai::tool_call("d1", "shell", &[r#"{"command":"rm -rf build"}"#])),
    }
}

#[test]
fn the_project_policy_denies_requires_approval_and_explains_itself() {
    let env = repo_env(deleter);
    let p = env.project();
    std::fs::create_dir_all(p.join(".ai")).unwrap();
    std::fs::write(p.join(".ai/policy.yaml"), POLICY).unwrap();
    std::fs::create_dir_all(p.join("build")).unwrap();
    std::fs::write(p.join("build/keep.txt"), "x").unwrap();
    git(&p, &["add", "-f", ".ai/policy.yaml", "build/keep.txt"]);
    git(&p, &["commit", "-q", "-m", "policy"]);
    assert!(ok(&env, &["policy", "validate"]).contains("policy.yaml: ok"));
    ok(&env, &["ai", "register", "gpt", "--backend", "openai", "--model", "gpt-4o-mini"]);

    // The shell call matching `rm -rf *` is denied by the policy (not run), recorded, explained.
    let clean = ok(&env, &["task", "create", "clean up", "--prompt", "delete the build"]);
    let out = env.run(&["task", "execute", &clean]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("never delete trees"), "{}", stdout(&out));
    let explain = ok(&env, &["policy", "explain", &clean]);
    assert!(explain.contains("tool   deny") && explain.contains("rule no-rm-rf"), "{explain}");
    assert!(explain.contains(".ai/policy.yaml:3"), "the rule's file and line: {explain}");
    assert!(explain.contains("rule policy:no-rm-rf (") && explain.contains("policy.yaml:3)  actor"), "{explain}");
    assert!(explain.contains("actor agent:gpt") && explain.contains("rm -rf build"), "{explain}");
    let diff = ok(&env, &["task", "diff", &clean]);
    assert!(diff.is_empty(), "nothing was deleted: {diff}");

    // The deploy task waits for approval: recorded once, shown, then approved and run.
    let deploy = ok(&env, &["task", "create", "ship it", "--type", "deploy"]);
    let out = env.run(&["task", "execute", &deploy]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(stderr(&out).contains("needs approval") && stderr(&out).contains("task approve"), "{}", stderr(&out));
    let explain = ok(&env, &["policy", "explain", &deploy]);
    assert!(explain.contains("claim  require_approval") && explain.contains("rule approve-deploys"), "{explain}");
    // An unknown task is "not found" (exit 5), as for every task command.
    let out = env.run(&["policy", "explain", "no-such-task"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("no-such-task"), "{}", stderr(&out));
    ok(&env, &["task", "approve", &deploy]);
    let out = env.run(&["task", "execute", &deploy]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(show(&env, &deploy)["status"], "done");

    // Bad policy files are reported with file, line and column; conflicts are reported.
    std::fs::write(p.join(".ai/policy.yaml"), "rules:\n  - id: a\n    effect: deny\n    tols: [shell]\n").unwrap();
    let out = env.run(&["policy", "validate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(".ai/policy.yaml:4:5:") && stderr(&out).contains("tols"), "{}", stderr(&out));
    std::fs::write(p.join(".ai/policy.yaml"), "rules:\n  - id: a\n    effect: deny\n    when: 'task.priority >'\n")
        .unwrap();
    let out = env.run(&["policy", "validate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(".ai/policy.yaml:4:"), "{}", stderr(&out));
    let conflicting = "rules:\n  - id: a\n    effect: deny\n    task_types: [deploy]\n  - id: b\n    effect: allow\n    task_types: [deploy]\n";
    std::fs::write(p.join(".ai/policy.yaml"), conflicting).unwrap();
    let out = env.run(&["policy", "validate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("conflict:"), "{}", stderr(&out));
    // A broken policy stops work rather than being ignored.
    std::fs::write(p.join(".ai/policy.yaml"), "rules: [").unwrap();
    let t = ok(&env, &["task", "create", "x"]);
    let out = env.run(&["task", "execute", &t]);
    assert_eq!(out.status.code(), Some(7));
    assert!(stderr(&out).contains("the policy cannot be read"), "{}", stderr(&out));
}

#[test]
fn audit_verify_names_a_record_edited_in_the_database() {
    let env = repo_env(|_| Reply::Stream(openai::text(&["unused"])));
    ok(&env, &["ai", "register", "w", "--backend", "command", "--command", "echo hi > hi.txt"]);
    let id = ok(&env, &["task", "create", "t", "--id", "audited"]);
    ok(&env, &["task", "execute", &id]);
    let trail = ok(&env, &["audit", &id, "--jsonl"]);
    let n = trail.lines().count();
    assert!(n >= 6, "{trail}");
    for line in trail.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["record"]["task_id"], "audited");
        assert!(v["event"].is_object(), "each record has its event: {v}");
    }
    let verified = ok(&env, &["audit", "verify"]);
    assert!(verified.starts_with("audit trail intact:") && verified.ends_with("in 2 trails"), "{verified}");
    // Edit one audit row by hand.
    let db = rusqlite::Connection::open(env.project().join(".descartes/descartes.db")).unwrap();
    let changed = db.execute("UPDATE audit SET kind = 'task_failed' WHERE task_id = 'audited' AND n = 3", []).unwrap();
    assert_eq!(changed, 1);
    drop(db);
    let out = env.run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("trail audited, audit record 3: its content does not match its hash"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_policy_budget_on_attempts_stops_retries() {
    let env = repo_env(|_| Reply::Stream(openai::text(&["unused"])));
    let p = env.project();
    std::fs::create_dir_all(p.join(".ai")).unwrap();
    std::fs::write(p.join(".ai/policy.yaml"), "budgets:\n  max_attempts: 1\n").unwrap();
    ok(&env, &["ai", "register", "w", "--backend", "command", "--command", "echo broken >&2; exit 1"]);
    let id = ok(&env, &["task", "create", "t", "--max-attempts", "3"]);
    let out = env.run(&["task", "execute", &id]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(show(&env, &id)["status"], "queued", "the task itself has attempts left");
    let out = env.run(&["task", "execute", &id]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(stderr(&out).contains("the policy denies it to w"), "{}", stderr(&out));
    let explain = ok(&env, &["policy", "explain", &id]);
    assert!(explain.contains("claim  deny") && explain.contains("budget:max_attempts"), "{explain}");
}
