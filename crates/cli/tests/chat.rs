//! `descartes chat` through a real pseudo-terminal, `descartes session ...`, compaction and
//! the rules files, against the fake OpenAI server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const SUMMARY: &str = "SUMMARY-OF-THE-OLD-TURNS";

/// Answers by the last user message; summaries when asked to compact.
fn responder(req: &RecordedRequest) -> Reply {
    if req.system_prompt().is_some_and(|s| s.contains("You compact a conversation")) {
        return Reply::Stream(openai::text(&[SUMMARY]));
    }
    let last = req.last_user_text().unwrap_or_default();
    if last.contains("hello") {
        Reply::Stream(openai::text(&["Hi there, ", "zebra."]))
    } else if last.contains("second") {
        Reply::Stream(openai::text(&["Second answer ", "about giraffes."]))
    } else if last.contains("slow") {
        let parts: Vec<String> = (0..60).map(|i| format!("chunk-{i} ")).collect();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        Reply::Stream(with_delay(openai::text(&parts), Duration::from_millis(200)))
    } else {
        Reply::Stream(openai::text(&["ok: ", &last.chars().take(20).collect::<String>()]))
    }
}

/// `descartes ARGS` for a pseudo-terminal (stdin must not be redirected).
fn pty_command(env: &Env, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    let home = env.dir.path().join("home");
    c.args(args)
        .current_dir(env.project())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("DESCARTES_HOME", &home)
        .env("OPENAI_API_KEY", openai_key())
        .env("OPENAI_BASE_URL", env.server.openai_base_url())
        .env("TERM", "xterm")
        .env("NO_COLOR", "1")
        .env("DESCARTES_SYNC", "normal");
    c
}

fn piped(env: &Env, args: &[&str], input: &str) -> std::process::Output {
    let mut child = env.cmd(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn sessions(env: &Env) -> Vec<Value> {
    let out = env.run(&["session", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().cloned().unwrap()
}

#[test]
fn chat_in_a_terminal_then_sessions() {
    let env = Env::new(responder);
    env.init();
    let mut p =
        rexpect::session::spawn_command(pty_command(&env, &["chat", "-p", "openai", "-y"]), Some(20_000)).unwrap();
    p.exp_string("/help for commands").unwrap();
    p.send_line("hello").unwrap();
    p.exp_string("zebra.").unwrap();
    p.send_line("/help").unwrap();
    p.exp_string("/compact").unwrap();
    p.send_line("a second question").unwrap();
    p.exp_string("about giraffes.").unwrap();
    p.send_line("slow please").unwrap();
    p.exp_string("chunk-2").unwrap();
    p.send_control('c').unwrap();
    p.exp_string("answer cancelled").unwrap();
    p.send_line("/exit").unwrap();
    p.exp_string("saved").unwrap();
    p.exp_eof().unwrap();

    let list = sessions(&env);
    assert_eq!(list.len(), 1, "{list:?}");
    let id = list[0]["session_id"].as_str().unwrap().to_owned();
    assert_eq!(list[0]["title"], "hello");
    assert_eq!(list[0]["turns"], 3);
    let events = env.events(&id);
    assert_eq!(count(&events, "session_started"), 1);
    assert_eq!(count(&events, "run_cancelled"), 1, "the Ctrl-C'd turn is recorded as cancelled");
    assert_eq!(count(&events, "run_completed"), 2);
    assert_eq!(count(&events, "run_resumed"), 2, "each later turn resumes the run");

    // Resume: the earlier turns go to the model.
    let before = env.server.request_count();
    let out = piped(&env, &["session", "resume", &id[..10]], "what did I say first\n");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("ok: what did I say"), "{}", stdout(&out));
    assert_eq!(env.server.request_count(), before + 1);
    let req = env.server.last_request().unwrap();
    let conversation = serde_json::to_string(&req.conversation()).unwrap();
    for earlier in ["hello", "zebra.", "a second question", "about giraffes.", "slow please"] {
        assert!(conversation.contains(earlier), "{earlier} missing from {conversation}");
    }
    assert_eq!(sessions(&env).len(), 1, "the resumed session is the same one");

    let md = stdout(&env.run(&["session", "export", &id, "--format", "md"]));
    assert!(md.contains("## User\n\nhello") && md.contains("## Assistant\n\nHi there, zebra."), "{md}");
    assert!(md.contains("a second question") && md.contains("about giraffes."), "{md}");
    let json: Value = serde_json::from_slice(&env.run(&["session", "export", &id, "--format", "json"]).stdout).unwrap();
    assert_eq!(json["session"]["session_id"], id.as_str());

    let found = env.run(&["session", "search", "GIRAFFES"]);
    assert!(found.status.success());
    let text = stdout(&found);
    assert!(text.contains(&id) && text.contains("assistant: Second answer about giraffes."), "{text}");
    assert!(!env.run(&["session", "search", "okapi"]).status.success());

    let shown = stdout(&env.run(&["session", "show", &id]));
    assert!(shown.contains("user: hello") && shown.contains("cancelled"), "{shown}");

    // Delete is a tombstone: hidden, the log kept.
    assert!(env.run(&["session", "delete", &id]).status.success());
    assert!(sessions(&env).is_empty());
    assert!(count(&env.events(&id), "session_deleted") == 1);
}

#[test]
fn piped_chat_with_slash_commands_and_saved_prompts() {
    let env = Env::new(responder);
    env.init();
    std::fs::write(env.project().join(".descartes/config.toml"), "[prompts]\nreview = \"Please review the diff\"\n")
        .unwrap();
    let out = piped(&env, &["chat", "-p", "openai"], "/tools\n/review carefully\nmulti \\\nline\n/cost\n/nope\n");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("read_file"), "{text}");
    assert!(text.contains("ok: Please review the d"), "{text}");
    assert!(text.contains("2 model calls"), "{text}");
    assert!(text.contains("unknown command /nope"), "{text}");
    let reqs = env.server.requests();
    assert_eq!(reqs[0].last_user_text().as_deref(), Some("Please review the diff\n\ncarefully"));
    assert_eq!(reqs[1].last_user_text().as_deref(), Some("multi \nline"));
}

#[test]
fn a_long_session_compacts_and_keeps_working() {
    let env = Env::new(responder);
    env.init();
    std::fs::write(
        env.project().join(".descartes/config.toml"),
        "system_prompt = \"Be brief.\"\n[context]\nwindow = 300\ncompact_at = 0.5\nkeep_turns = 1\n",
    )
    .unwrap();
    let filler = "lorem ipsum dolor sit amet ".repeat(6);
    let input: String = (1..=5).map(|i| format!("message {i} {filler}\n")).collect();
    let out = piped(&env, &["chat", "-p", "openai"], &input);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("context compacted"), "{}", stderr(&out));
    assert!(stdout(&out).contains("ok: message 5"), "the session keeps working: {}", stdout(&out));
    let id = sessions(&env)[0]["session_id"].as_str().unwrap().to_owned();
    let events = env.events(&id);
    let compactions: Vec<&Value> = events.iter().filter(|e| e["type"] == "context_compacted").collect();
    assert!(!compactions.is_empty());
    let c = &compactions[0]["data"];
    assert_eq!(c["method"], "summary");
    assert_eq!(c["summary"], SUMMARY);
    assert!(c["tokens_after"].as_u64() < c["tokens_before"].as_u64(), "{c}");
    // The request after the first compaction is smaller and starts from the summary.
    let reqs: Vec<RecordedRequest> = env
        .server
        .requests()
        .into_iter()
        .filter(|r| !r.system_prompt().unwrap_or_default().contains("You compact"))
        .collect();
    let last = reqs.last().unwrap();
    let conversation = serde_json::to_string(&last.conversation()).unwrap();
    assert!(conversation.contains(SUMMARY), "{conversation}");
    assert!(!conversation.contains("message 1 "), "{conversation}");
    let largest = reqs.iter().map(|r| r.conversation().len()).max().unwrap();
    assert!(last.conversation().len() < largest, "the compacted request is smaller");
    // A resumed session sends the compacted conversation (the fold applies the event).
    let out = piped(&env, &["session", "resume", &id], "one more\n");
    assert!(out.status.success(), "{}", stderr(&out));
    let conversation = serde_json::to_string(&env.server.last_request().unwrap().conversation()).unwrap();
    assert!(conversation.contains(SUMMARY) && !conversation.contains("message 1 "), "{conversation}");
}

#[test]
fn rules_files_reach_the_system_prompt_in_order() {
    let env = Env::new(responder);
    env.init();
    let home = env.dir.path().join("home");
    std::fs::write(home.join("AGENTS.md"), "RULE-GLOBAL").unwrap();
    std::fs::write(env.project().join("AGENTS.md"), "RULE-PROJECT-AGENTS").unwrap();
    std::fs::write(env.project().join("CLAUDE.md"), "RULE-PROJECT-CLAUDE").unwrap();
    std::fs::write(env.project().join(".windsurfrules"), "RULE-WINDSURF").unwrap();
    std::fs::write(env.dir.path().join("session.md"), "RULE-SESSION").unwrap();
    let order = |system: &str, names: &[&str]| {
        let at: Vec<usize> =
            names.iter().map(|n| system.find(n).unwrap_or_else(|| panic!("{n} in {system}"))).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{names:?} out of order in {system}");
    };
    let out = env.run(&["run", "-p", "openai", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let system = env.server.last_request().unwrap().system_prompt().unwrap();
    order(
        &system,
        &["Working directory", "RULE-GLOBAL", "RULE-PROJECT-AGENTS", "RULE-PROJECT-CLAUDE", "RULE-WINDSURF"],
    );
    assert!(!system.contains("RULE-SESSION"));

    let session = env.dir.path().join("session.md");
    let out = piped(&env, &["chat", "-p", "openai", "--rules", session.to_str().unwrap()], "hello\n/rules\n");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("session.md"), "{}", stdout(&out));
    let system = env.server.last_request().unwrap().system_prompt().unwrap();
    order(&system, &["RULE-GLOBAL", "RULE-PROJECT-AGENTS", "RULE-WINDSURF", "RULE-SESSION"]);
}
