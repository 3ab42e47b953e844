//! `descartes run`, `spawn`, `list`, `logs`, `resume`, `config` against fake model servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;

const SHELL_ARGS: &[&str] = &[r#"{"command":"#, r#""echo ran >> marker.txt; echo hi-from-shell"}"#];

/// A model that asks for one shell call, then answers.
fn shell_then_answer(req: &RecordedRequest) -> Reply {
    if req.has_tool_result() {
        Reply::Stream(openai::text(&["The command ", "said hi."]))
    } else {
        Reply::Stream(openai::tool_call("call_1", "shell", SHELL_ARGS))
    }
}

#[test]
fn run_streams_an_openai_answer() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["Hello", ", world"])));
    env.init();
    let out = env.run(&["run", "-y", "-p", "openai", "say", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "Hello, world\n");
    let req = env.server.last_request().unwrap();
    assert_eq!(req.path, "/v1/chat/completions");
    assert_eq!(req.header("authorization"), Some(format!("Bearer {}", openai_key()).as_str()));
    assert_eq!(req.body["stream"], true);
    assert_eq!(req.body["stream_options"]["include_usage"], true);
    assert_eq!(req.last_user_text().as_deref(), Some("say hello"));
    let tools = req.tool_names();
    for t in ["shell", "read_file", "write_file"] {
        assert!(tools.contains(&t.to_owned()), "{tools:?}");
    }
    let runs = env.runs();
    assert_eq!(runs[0]["status"], "completed");
    assert_eq!(runs[0]["prompt"], "say hello");
    // The run used the project's database.
    assert!(env.project().join(".descartes/descartes.db").exists());
    // Secrets never reach the log or the output.
    let log = stdout(&env.run(&["logs", "--json"]));
    assert!(!log.contains("sk-test-secret") && !stderr(&out).contains("sk-test-secret"));
    let completed = env.events(runs[0]["run_id"].as_str().unwrap());
    let usage = &completed.iter().find(|e| e["type"] == "model_call_completed").unwrap()["data"]["usage"];
    assert_eq!(usage["input_tokens"], openai::PROMPT_TOKENS);
    assert_eq!(usage["output_tokens"], openai::COMPLETION_TOKENS);
}

#[test]
fn run_streams_an_anthropic_answer() {
    let env = Env::new(|_| Reply::Stream(anthropic::text(&["Bonjour", " le monde"])));
    env.init();
    let out = env.run(&["run", "-y", "-p", "anthropic", "-m", "claude-test", "greet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "Bonjour le monde\n");
    let req = env.server.last_request().unwrap();
    assert_eq!(req.path, "/v1/messages");
    assert_eq!(req.header("x-api-key"), Some(anthropic_key().as_str()));
    assert_eq!(req.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(req.body["model"], "claude-test");
    assert_eq!(req.body["stream"], true);
    assert!(req.system_prompt().unwrap().contains("Working directory"));
    assert_eq!(env.runs()[0]["status"], "completed");
}

#[test]
fn piped_stdin_is_given_to_the_model_with_the_prompt() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["A summary."])));
    env.init();
    let content = "Line one of the README.\nDescartes is durable.\n";
    let mut child = env
        .cmd(&["spawn", "-p", "openai", "Summarize this"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(content.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = env.server.last_request().unwrap().last_user_text().unwrap();
    assert!(text.contains("Summarize this"), "{text}");
    assert!(text.contains("Descartes is durable."), "{text}");
}

#[test]
fn a_shell_call_runs_once_and_the_run_finishes() {
    let env = Env::new(shell_then_answer);
    env.init();
    let out = env.run(&["run", "-y", "-p", "openai", "run the command"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "The command said hi.\n");
    assert!(stderr(&out).contains("shell: echo ran"), "{}", stderr(&out));
    assert_eq!(read_lines(&env.project().join("marker.txt")), vec!["ran"]);
    // The tool result went back to the model.
    let results = env.server.last_request().unwrap().tool_results();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].0, "call_1");
    assert!(results[0].1.contains("exit code: 0") && results[0].1.contains("hi-from-shell"), "{:?}", results);
    let events = env.events(&env.run_id());
    assert_log_invariants(&events);
    let decision = events.iter().find(|e| e["type"] == "permission_decided").unwrap();
    assert_eq!(decision["data"]["decision"], "allow");
    assert_eq!(decision["data"]["rule"], "flag:--yes");
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "run_started",
            "message",
            "model_call_started",
            "model_call_completed",
            "message",
            "permission_decided",
            "tool_call_started",
            "tool_call_completed",
            "model_call_started",
            "model_call_completed",
            "message",
            "run_completed"
        ]
    );
}

#[test]
fn without_a_terminal_an_ask_is_a_recorded_deny() {
    let env = Env::new(shell_then_answer);
    env.init();
    let out = env.run(&["run", "-p", "openai", "run the command"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("-y"), "the user is told how to allow: {}", stderr(&out));
    assert!(!env.project().join("marker.txt").exists(), "the command must not run");
    let results = env.server.last_request().unwrap().tool_results();
    assert!(results[0].1.contains("Permission denied"), "{results:?}");
    let events = env.events(&env.run_id());
    let decision = events.iter().find(|e| e["type"] == "permission_decided").unwrap();
    assert_eq!(decision["data"]["decision"], "deny");
    assert_eq!(decision["data"]["rule"], "builtin:ask-without-terminal");
    assert_eq!(count(&events, "tool_call_started"), 0);
}

#[test]
fn read_file_is_allowed_without_asking() {
    let env = Env::new(|req: &RecordedRequest| {
        if req.has_tool_result() {
            Reply::Stream(openai::text(&["ok"]))
        } else {
            Reply::Stream(openai::tool_call("call_r", "read_file", &[r#"{"path":"notes.txt"}"#]))
        }
    });
    env.init();
    std::fs::write(env.project().join("notes.txt"), "secret sauce").unwrap();
    let out = env.run(&["run", "-p", "openai", "read"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(env.server.last_request().unwrap().tool_results()[0].1, "secret sauce");
    let events = env.events(&env.run_id());
    assert_eq!(events.iter().find(|e| e["type"] == "permission_decided").unwrap()["data"]["rule"], "builtin:read-only");
}

#[test]
fn json_output_prints_the_events() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["hi"])));
    env.init();
    let out = env.run(&["run", "--json", "-p", "openai", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let events: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.first().unwrap()["type"], "run_started");
    assert_eq!(events.last().unwrap()["type"], "run_completed");
    assert_log_invariants(&events);
    for e in &events {
        for k in ["seq", "id", "run_id", "type", "at", "data"] {
            assert!(e.get(k).is_some(), "{k} missing in {e}");
        }
    }
    // The same events as the log holds.
    assert_eq!(events, env.events(&env.run_id()));
}

#[test]
fn a_missing_api_key_names_the_variable() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["hi"])));
    env.init();
    let out = env.cmd(&["run", "-p", "openai", "hello"]).env_remove("OPENAI_API_KEY").output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("OPENAI_API_KEY"), "{}", stderr(&out));
    // (Without -p and without any key, the local model is used: tests/backends.rs.)
    assert!(env.runs().is_empty());
}

#[test]
fn a_bad_config_is_reported_with_file_and_line() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["hi"])));
    env.init();
    let config = env.project().join(".descartes/config.toml");
    std::fs::write(&config, "max_turns = 4\n\n[providers.openai]\nmodel = \"x\"\nmodle = \"typo\"\n").unwrap();
    for args in [&["config", "check"][..], &["run", "hi"][..]] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains(&format!("{}:5:1", config.display())), "{err}");
        assert!(err.contains("modle"), "{err}");
    }
    std::fs::write(&config, "max_turns = [\n").unwrap();
    let err = stderr(&env.run(&["config", "check"]));
    assert!(err.contains("config.toml:1:"), "{err}");
}

#[test]
fn config_show_redacts_secrets_and_names_its_sources() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["hi"])));
    env.init();
    std::fs::write(
        env.project().join(".descartes/config.toml"),
        "provider = \"openai\"\n[providers.openai]\napi_key = \"sk-in-config-secret\"\n",
    )
    .unwrap();
    let out = env.run(&["config", "show"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(!text.contains("sk-in-config-secret") && text.contains("<redacted>"), "{text}");
    assert!(text.contains("config.toml (read)"), "{text}");
    assert!(text.contains(&env.server.openai_base_url()), "environment layer applied: {text}");
}

#[test]
fn direct_mode_uses_descartes_home() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["hi"])));
    // No init: direct mode.
    let out = env.run(&["run", "-p", "openai", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(env.dir.path().join("home/descartes.db").exists());
    assert!(!env.project().join(".descartes").exists());
}

#[test]
fn init_is_idempotent_and_keeps_data() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["hi"])));
    env.init();
    let config = env.project().join(".descartes/config.toml");
    std::fs::write(&config, "max_turns = 7\n").unwrap();
    assert!(env.run(&["run", "-p", "openai", "hello"]).status.success());
    let again = env.run(&["init"]);
    assert!(again.status.success());
    assert!(stdout(&again).contains("Reinitialized"));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "max_turns = 7\n");
    assert_eq!(env.runs().len(), 1);
}

/// Each broken provider reply fails the run with a clear error (no panic), and the run resumes.
#[test]
fn provider_failures_leave_a_resumable_run() {
    let malformed = Reply::Raw("data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {not json\n\n".into());
    let cut = Reply::Stream(descartes_test_support::cut_after(openai::text(&["Hel", "lo", "!"]), 2));
    let status500 = Reply::openai_error(500, "server_error", None, "the server had an error");
    for (name, bad, expect) in [
        ("malformed SSE", malformed, &["malformed"][..]),
        ("connection closed mid-stream", cut, &["ended", "connection"][..]),
        ("HTTP 500", status500, &["500"][..]),
    ] {
        let env = Env::new(sequence(vec![bad, Reply::Stream(openai::text(&["recovered"]))]));
        env.init();
        // Without retries, so that the failure reaches the run (retries: tests/resilience.rs).
        std::fs::write(env.project().join(".descartes/config.toml"), "[retry]\nmax_retries = 0\n").unwrap();
        let out = env.run(&["run", "-p", "openai", "hello"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(expect.iter().any(|x| err.contains(x)) && err.contains("descartes resume"), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        let id = env.run_id();
        assert_eq!(env.runs()[0]["status"], "failed", "{name}");
        let resumed = env.run(&["resume", &id[..8]]);
        assert!(resumed.status.success(), "{name}: {}", stderr(&resumed));
        assert_eq!(stdout(&resumed), "recovered\n", "{name}");
        assert_eq!(env.runs()[0]["status"], "completed", "{name}");
        let events = env.events(&id);
        assert_log_invariants(&events);
        assert_eq!(count(&events, "model_call_failed"), 1, "{name}");
        assert_eq!(count(&events, "run_resumed"), 1, "{name}");
        // A completed run is not resumed again.
        let again = env.run(&["resume", &id]);
        assert_eq!(again.status.code(), Some(5), "{name}");
        assert!(stderr(&again).contains("already completed"), "{name}");
    }
}

#[test]
fn sigint_cancels_cleanly_and_the_run_resumes() {
    cancels_cleanly_and_resumes("INT");
}

#[test]
fn sigterm_cancels_cleanly_and_the_run_resumes() {
    cancels_cleanly_and_resumes("TERM");
}

fn cancels_cleanly_and_resumes(sig: &str) {
    let env = Env::new(|req: &RecordedRequest| {
        if req.has_tool_result() {
            Reply::Stream(openai::text(&["finished"]))
        } else {
            Reply::Stream(openai::tool_call("call_s", "shell", &[r#"{"command":"sleep 5; echo late >> marker.txt"}"#]))
        }
    });
    env.init();
    let child = env.spawn(&["run", "-y", "-p", "openai", "wait"]);
    // Wait for the shell command to start, then interrupt.
    let spool = env.project().join(".descartes/spool");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !spool.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, sig);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains("descartes resume"), "{}", stderr(&out));
    let id = env.run_id();
    assert_eq!(env.runs()[0]["status"], "cancelled");
    let events = env.events(&id);
    assert_eq!(count(&events, "run_cancelled"), 1);
    let done = events.iter().find(|e| e["type"] == "tool_call_completed").unwrap();
    assert_eq!(done["data"]["details"]["cancelled"], true, "the command was killed: {done}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!env.project().join("marker.txt").exists(), "the cancelled command was killed");
    let resumed = env.run(&["resume", &id]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert_eq!(stdout(&resumed), "finished\n");
    assert_log_invariants(&env.events(&id));
}

#[test]
fn turn_limit_stops_the_run_and_resume_can_raise_it() {
    let env = Env::new(|req: &RecordedRequest| {
        if req.assistant_turns() >= 2 {
            Reply::Stream(openai::text(&["enough"]))
        } else {
            Reply::Stream(openai::tool_call(
                &format!("call_{}", req.assistant_turns()),
                "read_file",
                &[r#"{"path":"x"}"#],
            ))
        }
    });
    env.init();
    let out = env.run(&["run", "--max-turns", "1", "-p", "openai", "loop"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("turn limit"), "{}", stderr(&out));
    let id = env.run_id();
    let resumed = env.run(&["resume", &id, "--max-turns", "5"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert_eq!(stdout(&resumed), "enough\n");
}

#[test]
fn logs_show_all_runs_and_follow_one() {
    let env = Env::new(|_| Reply::Stream(with_delay(openai::text(&["a", "b", "c", "d"]), Duration::from_millis(150))));
    env.init();
    assert!(env.run(&["run", "-p", "openai", "first"]).status.success());
    let all = stdout(&env.run(&["logs"]));
    assert!(all.contains("run_started") && all.contains("\"first\""), "{all}");
    let child = env.spawn(&["run", "-p", "openai", "second"]);
    // Follow the second run until it ends.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let id = loop {
        let runs = env.runs();
        if let Some(r) = runs.iter().find(|r| r["prompt"] == "second") {
            break r["run_id"].as_str().unwrap().to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "second run never started");
        std::thread::sleep(Duration::from_millis(10));
    };
    let follow = env.run(&["logs", &id, "-f"]);
    assert!(follow.status.success());
    let text = stdout(&follow);
    assert!(text.contains("run_completed"), "follow ends with the run: {text}");
    assert!(child.wait_with_output().unwrap().status.success());
}

#[test]
fn unknown_run_ids_say_what_to_do() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["hi"])));
    env.init();
    let out = env.run(&["resume", "nope"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("descartes list"), "{}", stderr(&out));
}
