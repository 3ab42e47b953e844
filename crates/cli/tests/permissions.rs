//! The permission policy through the binary: rules from config, decisions in the log,
//! `descartes permissions`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;

/// A model that asks for `echo hi` and `rm x` in one answer, then answers.
fn echo_and_rm(req: &RecordedRequest) -> Reply {
    if req.has_tool_result() {
        Reply::Stream(openai::text(&["done"]))
    } else {
        Reply::Stream(openai::tool_calls(&[
            ("call_echo", "shell", &[r#"{"command":"echo hi"}"#]),
            ("call_rm", "shell", &[r#"{"command":"rm x"}"#]),
        ]))
    }
}

fn decisions(events: &[Value]) -> Vec<(String, String, String)> {
    events
        .iter()
        .filter(|e| e["type"] == "permission_decided")
        .map(|e| {
            let d = &e["data"];
            (
                d["call_id"].as_str().unwrap().to_owned(),
                d["decision"].as_str().unwrap().to_owned(),
                d["rule"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn without_a_terminal_shell_is_denied_and_a_project_rule_lets_exactly_echo_through() {
    // No rule: both calls are denied, the log names the rule, nothing runs.
    let env = Env::new(echo_and_rm);
    env.init();
    std::fs::write(env.project().join("x"), "keep me").unwrap();
    let out = env.run(&["run", "-p", "openai", "clean up"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let events = env.events(&env.run_id());
    assert_eq!(
        decisions(&events),
        vec![
            ("call_echo".into(), "deny".into(), "builtin:ask-without-terminal".into()),
            ("call_rm".into(), "deny".into(), "builtin:ask-without-terminal".into()),
        ]
    );
    assert_eq!(count(&events, "tool_call_started"), 0);
    assert!(stderr(&out).contains("-y"), "{}", stderr(&out));

    // A project rule allows `echo *`: `echo hi` runs, `rm x` is still denied.
    let env = Env::new(echo_and_rm);
    env.init();
    std::fs::write(env.project().join("x"), "keep me").unwrap();
    std::fs::write(env.project().join(".descartes/config.toml"), "[permissions]\nallow = [\"shell(echo *)\"]\n")
        .unwrap();
    let out = env.run(&["run", "-p", "openai", "clean up"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let events = env.events(&env.run_id());
    assert_eq!(
        decisions(&events),
        vec![
            ("call_echo".into(), "allow".into(), "project:allow shell \"echo *\"".into()),
            ("call_rm".into(), "deny".into(), "builtin:ask-without-terminal".into()),
        ]
    );
    let started: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "tool_call_started")
        .map(|e| e["data"]["call_id"].as_str().unwrap())
        .collect();
    assert_eq!(started, vec!["call_echo"]);
    assert!(env.project().join("x").exists(), "rm must not run");
    let results = env.server.last_request().unwrap().tool_results();
    let result = |id: &str| results.iter().find(|r| r.0 == id).unwrap().1.clone();
    assert!(result("call_echo").contains("hi"), "{results:?}");
    assert!(result("call_rm").contains("Permission denied"), "{results:?}");
}

#[test]
fn a_deny_rule_wins_over_yes_and_names_its_file() {
    let env = Env::new(echo_and_rm);
    env.init();
    std::fs::write(env.project().join("x"), "keep me").unwrap();
    std::fs::write(env.dir.path().join("home/config.toml"), "[permissions]\ndeny = [\"shell(rm *)\"]\n").unwrap();
    let out = env.run(&["run", "-y", "-p", "openai", "clean up"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let events = env.events(&env.run_id());
    assert_eq!(
        decisions(&events),
        vec![
            ("call_echo".into(), "allow".into(), "flag:--yes".into()),
            ("call_rm".into(), "deny".into(), "user:deny shell \"rm *\"".into()),
        ]
    );
    assert!(env.project().join("x").exists(), "rm must not run under -y");
}

#[test]
fn permissions_lists_the_effective_rules_in_precedence_order() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["unused"])));
    env.init();
    std::fs::write(
        env.dir.path().join("home/config.toml"),
        "[permissions]\nallow = [\"shell\"]\ndeny = [\"shell(rm *)\"]\n",
    )
    .unwrap();
    std::fs::write(
        env.project().join(".descartes/config.toml"),
        "[permissions]\nallow = [\"shell(echo *)\", \"mcp__github\"]\nask = [\"shell(git push*)\"]\n",
    )
    .unwrap();
    let out = env.run(&["permissions", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    // The guardrail's rules come first: no tool writes Descartes' own files.
    let guardrail = rows.iter().take_while(|r| r["source"] == "guardrail").count();
    assert!(guardrail >= 8, "{rows:#?}");
    // An agent CLI's request for more than its sandbox is refused by the guardrail too.
    assert!(rows[..guardrail].iter().any(|r| r["action"] == "deny" && r["rule"] == "sandbox_escalation"), "{rows:#?}");
    let config = env.project().join(".descartes/config.toml").display().to_string();
    assert!(
        rows[..guardrail]
            .iter()
            .any(|r| r["action"] == "deny" && r["rule"].as_str().unwrap().ends_with(&format!("({config})")))
    );
    let got: Vec<(&str, &str, &str)> = rows[guardrail..]
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["rule"].as_str().unwrap(), r["source"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("ask", "shell(git push*)", "project"),
            ("allow", "shell(echo *)", "project"),
            ("deny", "shell(rm *)", "user"),
            ("allow", "mcp__github", "project"),
            ("allow", "shell", "user"),
            ("allow", "read-only tools", "builtin"),
            ("ask", "every other call", "builtin"),
        ]
    );
    let rows = &rows[guardrail..];
    assert!(rows[0]["file"].as_str().unwrap().ends_with(".descartes/config.toml"), "{rows:?}");
    assert!(rows[2]["file"].as_str().unwrap().ends_with("home/config.toml"), "{rows:?}");
    assert_eq!(rows[2]["name"], "user:deny shell \"rm *\"");

    let out = env.run(&["permissions"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("Guardrail (first, final even with -y)") && text.contains(&config), "{text}");
    let first = text.lines().skip_while(|l| !l.starts_with("Permission rules")).nth(1).unwrap();
    assert!(first.contains("ask") && first.contains("shell(git push*)") && first.contains("project"), "{text}");
    assert!(text.contains("never overrides a deny"), "{text}");
}

#[test]
fn a_bad_rule_is_a_located_config_error() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["unused"])));
    env.init();
    std::fs::write(env.project().join(".descartes/config.toml"), "[permissions]\n\nallow = [\"frobnicate(x)\"]\n")
        .unwrap();
    let out = env.run(&["permissions"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("config.toml:3:"), "{err}");
    assert!(err.contains("frobnicate(x)") && err.contains("takes no pattern"), "{err}");
}
