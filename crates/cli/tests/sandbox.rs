//! The sandbox through the binary: a model's `shell` calls run confined to the workspace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

/// A model that runs `command` with `shell`, then answers with what it saw.
fn shell_model(command: &'static str) -> impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static {
    move |req: &RecordedRequest| {
        if let Some((_, out)) = req.tool_results().last() {
            Reply::Stream(openai::text(&[&format!("saw: {}", out.replace('\n', " "))]))
        } else {
            let args = serde_json::json!({ "command": command }).to_string();
            Reply::Stream(openai::tool_call("call_1", "shell", &[&args]))
        }
    }
}

fn landlock_available(env: &Env) -> bool {
    let out = env.cmd(&["__sandbox", "--probe"]).output().unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let full = status["landlock"] == "full";
    if !full {
        let message = format!("Landlock is not fully available here: {}", stdout(&out));
        if std::env::var("DESCARTES_TEST_REQUIRE_SANDBOX").as_deref() == Ok("1") {
            panic!("{message}");
        }
        eprintln!("\n!!!!!!!! SKIPPED: {message} !!!!!!!!\n");
    }
    full
}

#[test]
fn a_shell_call_cannot_write_outside_the_workspace() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("escaped.txt");
    let command: &'static str =
        Box::leak(format!("echo x > {} && echo wrote || echo refused", target.display()).into_boxed_str());
    let env = Env::new(shell_model(command));
    env.init();
    if !landlock_available(&env) {
        return;
    }
    let out = env.run(&["run", "-y", "-p", "openai", "write outside"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("refused"), "{}", stdout(&out));
    assert!(!target.exists(), "the file outside the workspace was not created");
    let events = env.events(env.runs()[0]["run_id"].as_str().unwrap());
    let done = events.iter().find(|e| e["type"] == "tool_call_completed").unwrap();
    assert_eq!(done["data"]["details"]["sandbox"]["mode"], "workspace-write", "{done}");
}

#[test]
fn a_shell_call_writes_inside_the_workspace() {
    let env = Env::new(shell_model("echo inside > made.txt && cat made.txt"));
    env.init();
    if !landlock_available(&env) {
        return;
    }
    let out = env.run(&["run", "-y", "-p", "openai", "write inside"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("saw:") && stdout(&out).contains("inside"), "{}", stdout(&out));
    assert_eq!(read_lines(&env.project().join("made.txt")), vec!["inside"]);
}

#[test]
fn full_access_is_an_explicit_choice() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("allowed.txt");
    let command: &'static str = Box::leak(format!("echo x > {}", target.display()).into_boxed_str());
    let env = Env::new(shell_model(command));
    env.init();
    std::fs::write(env.project().join(".descartes/config.toml"), "[sandbox]\nmode = \"full-access\"\n").unwrap();
    let out = env.run(&["run", "-y", "-p", "openai", "write outside"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(target.exists());
    // A typo in the sandbox settings is a located config error, not a silent default.
    std::fs::write(env.project().join(".descartes/config.toml"), "[sandbox]\nmod = \"full-access\"\n").unwrap();
    let out = env.run(&["run", "-y", "-p", "openai", "x"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("config.toml:2:"), "{}", stderr(&out));
}
