//! The project's YAML policy governs `run` and `chat` too, not only tasks: a deny stops the
//! call even under `-y`, an allow lets it run without asking, each decision recorded with its
//! rule, file and line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::Stdio;

use common::*;
use serde_json::Value;

const POLICY: &str = "version: 1
rules:
  - id: no-pd
    effect: deny
    tools: [shell]
    commands: [\"echo *-pd*\"]
    reason: no pd echoes
  - id: listing-is-fine
    effect: allow
    tools: [shell]
    commands: [\"ls*\"]
";

fn with_policy(env: &Env) {
    std::fs::create_dir_all(env.project().join(".ai")).unwrap();
    std::fs::write(env.project().join(".ai/policy.yaml"), POLICY).unwrap();
}

fn decisions(events: &[Value], kind: &str) -> Vec<Value> {
    events.iter().filter(|e| e["type"] == kind).map(|e| e["data"].clone()).collect()
}

fn assert_denied_by_no_pd(env: &Env, run_id: &str) {
    let events = env.events(run_id);
    let policy = decisions(&events, "policy_decided");
    assert_eq!(policy.len(), 1, "{events:#?}");
    assert_eq!(policy[0]["decision"], "deny");
    assert_eq!(policy[0]["rule"], "no-pd");
    assert!(policy[0]["file"].as_str().unwrap().ends_with(".ai/policy.yaml"), "{}", policy[0]);
    assert_eq!(policy[0]["line"], 3);
    let permission = decisions(&events, "permission_decided");
    assert_eq!(permission[0]["decision"], "deny", "{}", permission[0]);
    assert_eq!(permission[0]["rule"], "policy:no-pd");
    assert!(permission[0]["file"].as_str().unwrap().ends_with(".ai/policy.yaml"), "{}", permission[0]);
    assert_eq!(permission[0]["line"], 3);
    let done = decisions(&events, "tool_call_completed");
    assert!(!done[0]["output"].as_str().unwrap().contains("66-pd"), "the command ran: {}", done[0]);
    assert_eq!(decisions(&events, "tool_call_started").len(), 0, "a denied call never starts");
}

#[test]
fn a_project_policy_deny_stops_a_call_of_run_even_with_yes() {
    let env = Env::new(shell_model("echo $((6*11))-pd"));
    env.init();
    with_policy(&env);
    let out = env.run(&["run", "-y", "-p", "openai", "compute"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains("66-pd"), "{}", stdout(&out));
    assert_denied_by_no_pd(&env, &env.run_id());
}

#[test]
fn a_project_policy_allow_lets_a_call_of_run_through_without_asking() {
    let env = Env::new(shell_model("ls -a"));
    env.init();
    with_policy(&env);
    // No -y and no terminal: without the policy the call would be denied (nobody to ask).
    let out = env.run(&["run", "-p", "openai", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(".descartes"), "{}", stdout(&out));
    let events = env.events(&env.run_id());
    let policy = decisions(&events, "policy_decided");
    assert_eq!((policy[0]["decision"].as_str(), policy[0]["rule"].as_str()), (Some("allow"), Some("listing-is-fine")));
    assert_eq!(decisions(&events, "permission_decided")[0]["decision"], "allow");
}

#[test]
fn a_project_policy_deny_stops_a_call_of_chat() {
    let env = Env::new(shell_model("echo $((6*11))-pd"));
    env.init();
    with_policy(&env);
    let mut child = env
        .cmd(&["chat", "-y", "-p", "openai"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"compute\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains("66-pd"), "{}", stdout(&out));
    assert_denied_by_no_pd(&env, &env.run_id());
}

#[test]
fn a_broken_policy_file_stops_run_with_its_file_and_line() {
    let env = Env::new(shell_model("ls"));
    env.init();
    std::fs::create_dir_all(env.project().join(".ai")).unwrap();
    std::fs::write(env.project().join(".ai/policy.yaml"), "rules:\n  - id: x\n    effect: maybe\n").unwrap();
    let out = env.run(&["run", "-p", "openai", "list"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains(".ai/policy.yaml:3:"), "{}", stderr(&out));
    assert!(env.server.requests().is_empty(), "no model call before the policy is valid");
}

#[test]
fn policy_explain_shows_a_run_s_decisions() {
    let env = Env::new(shell_model("echo $((6*11))-pd"));
    env.init();
    with_policy(&env);
    assert!(env.run(&["run", "-y", "-p", "openai", "compute"]).status.success());
    let id = env.run_id();
    let out = env.run(&["policy", "explain", &id[..10]]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("rule no-pd") && text.contains(".ai/policy.yaml:3"), "{text}");
    assert!(text.contains("rule policy:no-pd"), "{text}");
    let json = env.run(&["policy", "explain", &id, "--json"]);
    let lines: Vec<Value> = stdout(&json).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().any(|l| l["record"]["rule"] == "no-pd"), "{lines:?}");
    assert!(lines.iter().any(|l| l["permission"]["decision"] == "deny"), "{lines:?}");
    let out = env.run(&["policy", "explain", "nothing-like-this"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("no task or run matches"), "{}", stderr(&out));
}

/// A `[permissions]` rule's decisions name its config file and line too, in the log and in
/// `policy explain`.
#[test]
fn a_permissions_rule_s_decision_names_its_file_and_line() {
    let env = Env::new(shell_model("echo $((6*11))-pd"));
    env.init();
    let config = env.project().join(".descartes/config.toml");
    std::fs::write(
        &config,
        "[permissions]\nallow = [\"shell(ls *)\"]\ndeny = [\n  \"shell(git push)\",\n  \"shell(echo *)\",\n]\n",
    )
    .unwrap();
    let out = env.run(&["run", "-y", "-p", "openai", "compute"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let events = env.events(&env.run_id());
    assert_log_invariants(&events);
    let permission = decisions(&events, "permission_decided");
    assert_eq!(permission[0]["decision"], "deny", "{}", permission[0]);
    assert_eq!(permission[0]["rule"], "project:deny shell \"echo *\"");
    assert_eq!(permission[0]["file"].as_str(), Some(config.display().to_string().as_str()));
    assert_eq!(permission[0]["line"], 5);
    let out = env.run(&["policy", "explain", &env.run_id()]);
    assert!(stdout(&out).contains(&format!("({}:5)", config.display())), "{}", stdout(&out));
}
