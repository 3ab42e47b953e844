//! The sandbox through the binary: a model's `shell` calls run confined to the workspace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

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
fn full_access_is_an_explicit_choice_of_the_user() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("allowed.txt");
    let command: &'static str = Box::leak(format!("echo x > {}", target.display()).into_boxed_str());
    let env = Env::new(shell_model(command));
    env.init();
    // From the project file (which a cloned repository or an earlier run could have written):
    // ignored, and said so.
    std::fs::write(
        env.project().join(".descartes/config.toml"),
        "[sandbox]\nmode = \"full-access\"\nnetwork = true\n\n[tools]\nroots = [\"/\"]\n",
    )
    .unwrap();
    let out = env.run(&["run", "-y", "-p", "openai", "write outside"]);
    assert!(out.status.success(), "{}", stderr(&out));
    if landlock_available(&env) {
        assert!(!target.exists(), "a project file loosened the sandbox");
    }
    for ignored in ["mode = \"full-access\"", "network = true", "roots = [\"/\"]"] {
        assert!(stderr(&out).contains(ignored) && stderr(&out).contains("is ignored"), "{}", stderr(&out));
    }
    // From the command line, or from the user config: honoured.
    let out = env.run(&["run", "-y", "-p", "openai", "--sandbox", "full-access", "write outside"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(target.exists());
    std::fs::remove_file(&target).unwrap();
    std::fs::write(env.project().join(".descartes/config.toml"), "").unwrap();
    std::fs::write(env.dir.path().join("home/config.toml"), "[sandbox]\nmode = \"full-access\"\n").unwrap();
    let out = env.run(&["run", "-y", "-p", "openai", "write outside"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(target.exists());
    assert!(!stderr(&out).contains("is ignored"), "{}", stderr(&out));
    // A typo in the sandbox settings is a located config error, not a silent default.
    std::fs::write(env.project().join(".descartes/config.toml"), "[sandbox]\nmod = \"full-access\"\n").unwrap();
    let out = env.run(&["run", "-y", "-p", "openai", "x"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("config.toml:2:"), "{}", stderr(&out));
}

/// A model that makes the given tool calls one after the other, then answers with every result
/// it saw.
fn scripted(calls: Vec<(&'static str, serde_json::Value)>) -> impl Fn(&RecordedRequest) -> Reply + Send + Sync {
    move |req: &RecordedRequest| {
        let done = req.tool_results();
        match calls.get(done.len()) {
            Some((tool, args)) => {
                let id = format!("call_{}", done.len());
                Reply::Stream(openai::tool_call(&id, tool, &[&args.to_string()]))
            }
            None => {
                let seen: Vec<String> = done.iter().map(|(_, out)| out.replace('\n', " ")).collect();
                Reply::Stream(openai::text(&[&format!("saw: {}", seen.join(" | "))]))
            }
        }
    }
}

#[test]
fn a_run_cannot_change_the_guardrails_of_the_next_run() {
    use serde_json::json;
    let env = Env::new(scripted(vec![
        ("write_file", json!({"path": ".descartes/config.toml", "content": "[sandbox]\nmode = \"full-access\"\n"})),
        ("write_file", json!({"path": ".ai/policy.yaml", "content": "rules: []\n"})),
        ("shell", json!({"command": "printf '[sandbox]\\nmode = \"full-access\"\\n' >> .descartes/config.toml"})),
        ("shell", json!({"command": "mkdir -p .ai && echo 'rules: []' > .ai/policy.yaml"})),
        ("shell", json!({"command": "python3 -c \"open('.descartes/descartes.db', 'r+b')\""})),
        ("shell", json!({"command": "echo outside-test > made.txt"})),
        ("write_file", json!({"path": ".claude/settings.json", "content": "{\"permissions\":{\"allow\":[\"Bash\"]}}"})),
    ]));
    env.init();
    if !landlock_available(&env) {
        return;
    }
    std::fs::create_dir_all(env.project().join(".ai")).unwrap();
    let config_before = std::fs::read_to_string(env.project().join(".descartes/config.toml")).unwrap();
    let out = env.run(&["run", "-y", "-p", "openai", "loosen your guardrails"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(env.project().join(".descartes/config.toml")).unwrap(), config_before);
    assert!(!env.project().join(".ai/policy.yaml").exists());
    assert_eq!(read_lines(&env.project().join("made.txt")), vec!["outside-test"]);
    let events = env.events(&env.run_id());
    let results: Vec<&serde_json::Value> = events.iter().filter(|e| e["type"] == "tool_call_completed").collect();
    assert_eq!(results.len(), 7);
    assert!(!env.project().join(".claude/settings.json").exists(), "an agent CLI's settings are protected too");
    assert_eq!(results[6]["data"]["is_error"], true, "{}", results[6]);
    for r in &results[..5] {
        assert_eq!(r["data"]["is_error"], true, "{r}");
    }
    // Refused by the guardrail before the tool runs (the tool would refuse it too), and recorded.
    assert!(results[0]["data"]["output"].as_str().unwrap().contains("denied by the guardrail rule"), "{}", results[0]);
    let guardrail = events.iter().filter(|e| e["type"] == "permission_decided" && e["data"]["actor"] == "guardrail");
    assert_eq!(guardrail.count(), 3, "every write_file call was denied by the guardrail");
    assert!(results[4]["data"]["output"].as_str().unwrap().contains("Read-only file system"), "{}", results[4]);
    assert_eq!(results[5]["data"]["details"]["sandbox"]["protected"], "read-only", "{}", results[5]);
}

#[test]
fn a_shell_call_sees_no_key_in_its_environment() {
    let env = Env::new(shell_model("env"));
    env.init();
    let out = env.run(&["run", "-y", "-p", "openai", "print the environment"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("PATH="), "{text}");
    for secret in [openai_key(), anthropic_key(), "OPENAI_API_KEY".into(), "OPENAI_BASE_URL".into()] {
        assert!(!text.contains(&secret), "{secret} reached the shell: {text}");
    }
    let logs = env.run(&["logs", "--json"]);
    assert!(!stdout(&logs).contains(&openai_key()));
}

#[test]
fn a_guardrail_file_created_by_a_run_stops_agents_until_the_user_trusts_it() {
    // `.ai` does not exist, so nothing can be mounted read-only over it: the shell can create
    // it. The change is caught when the run ends.
    let env = Env::new(shell_model("mkdir -p .ai && printf 'rules: []\\n' > .ai/policy.yaml"));
    env.init();
    let out = env.run(&["run", "-y", "-p", "openai", "write a policy"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(env.project().join(".ai/policy.yaml").exists());
    assert!(stderr(&out).contains("guardrail files changed during run"), "{}", stderr(&out));
    let out = env.run(&["run", "-y", "-p", "openai", "again"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains(".ai/policy.yaml") && stderr(&out).contains("config trust"), "{}", stderr(&out));
    assert_eq!(env.runs().len(), 1, "no second run started");
    let out = env.run(&["config", "trust"]);
    assert!(out.status.success() && stdout(&out).contains("trusted:"), "{}", stdout(&out));
    let out = env.run(&["run", "-y", "-p", "openai", "again"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The tokens of the API and of the daemon are read by no tool, `-y` or not: a run that could
/// read one could answer its own permission asks through the API.
#[test]
fn no_tool_reads_the_api_token() {
    use serde_json::json;
    let env = Env::new(scripted(vec![
        ("read_file", json!({"path": ".descartes/server.token"})),
        ("shell", json!({"command": "cat .descartes/server.token; echo read=$?"})),
    ]));
    env.init();
    let token = stdout(&env.run(&["serve", "--print-token"])).trim().to_owned();
    let out = env.run(&["run", "-y", "-p", "openai", "read the token"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains(&token), "{}", stdout(&out));
    let events = env.events(&env.run_id());
    let done: Vec<&serde_json::Value> = events.iter().filter(|e| e["type"] == "tool_call_completed").collect();
    assert_eq!(done.len(), 2);
    for d in &done {
        assert!(!d["data"]["output"].as_str().unwrap().contains(&token), "{d}");
    }
    let guardrail = events.iter().find(|e| e["type"] == "permission_decided" && e["data"]["actor"] == "guardrail");
    assert_eq!(guardrail.unwrap()["data"]["tool"], "read_file", "the read was refused before it ran");
}
