//! The smaller faults of issue 14's point 8, each pinned through the binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use descartes_test_support::cut_after;

#[test]
fn a_retried_stream_leaves_no_partial_copy_on_stdout() {
    let env = Env::new(sequence(vec![
        Reply::Stream(cut_after(openai::text(&["Partial ", "answer ", "that breaks"]), 2)),
        Reply::Stream(cut_after(openai::text(&["Partial ", "answer ", "that breaks"]), 2)),
        Reply::Stream(openai::text(&["The ", "whole ", "answer."])),
    ]));
    env.init();
    std::fs::write(env.project().join(".descartes/config.toml"), "[retry]\nbase_delay_ms = 10\n").unwrap();
    let out = env.run(&["run", "-p", "openai", "hello"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "The whole answer.", "stdout: {:?}", stdout(&out));
}

#[test]
fn max_turns_zero_is_refused_everywhere() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["unused"])));
    env.init();
    let out = env.run(&["run", "-p", "openai", "--max-turns", "0", "hello"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    std::fs::write(env.project().join(".descartes/config.toml"), "max_turns = 0\n").unwrap();
    let out = env.run(&["run", "-p", "openai", "hello"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("config.toml:1:") && stderr(&out).contains("at least 1"), "{}", stderr(&out));
    assert!(env.server.requests().is_empty(), "a model call was made");
}

#[test]
fn an_empty_run_id_picks_no_run() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["fine"])));
    env.init();
    assert!(env.run(&["run", "-p", "openai", "hello"]).status.success());
    for args in [&["resume", ""][..], &["logs", ""][..], &["resume", " "][..]] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stdout(&out));
        assert!(stderr(&out).contains("the run id is empty"), "{}", stderr(&out));
    }
}

#[test]
fn a_file_named_descartes_is_explained_not_silently_ignored() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["fine"])));
    std::fs::write(env.project().join(".descartes"), "").unwrap();
    let out = env.run(&["init"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.matches("exists").count(), 1, "said once: {err}");
    assert!(err.contains("is not a directory") && err.contains("move it away"), "{err}");
    let out = env.run(&["list"]);
    assert!(stderr(&out).contains("is not a directory, so it is not a project"), "{}", stderr(&out));
}

#[test]
fn every_unknown_config_key_is_reported() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["fine"])));
    env.init();
    std::fs::write(env.project().join(".descartes/config.toml"), "colour = 1\n[retry]\nmax_retrys = 2\n").unwrap();
    let out = env.run(&["config", "check"]);
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert!(err.contains("config.toml:1:1: unknown field `colour`"), "{err}");
    assert!(err.contains("config.toml:3:1: unknown field `max_retrys`"), "{err}");
}

#[test]
fn arguments_that_fail_the_schema_leave_a_paired_start_and_result() {
    let env = Env::new(|req: &RecordedRequest| {
        if req.tool_results().is_empty() {
            Reply::Stream(openai::tool_call("call_1", "read_file", &[r#"{"path": 42}"#]))
        } else {
            Reply::Stream(openai::text(&["done"]))
        }
    });
    env.init();
    let out = env.run(&["run", "-p", "openai", "read"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let events = env.events(&env.run_id());
    assert_log_invariants(&events);
    let started: Vec<_> = events.iter().filter(|e| e["type"] == "tool_call_started").collect();
    assert_eq!(started.len(), 1, "{events:#?}");
    assert_eq!(started[0]["data"]["input"]["path"], 42);
    let done = events.iter().find(|e| e["type"] == "tool_call_completed").unwrap();
    assert_eq!(done["data"]["is_error"], true);
    assert!(started[0]["seq"].as_i64() < done["seq"].as_i64());
}

#[test]
fn a_completed_run_killed_before_its_clean_up_leaves_nothing_behind_at_the_next_run() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["fine"])));
    env.init();
    assert!(env.run(&["run", "-p", "openai", "first"]).status.success());
    let id = env.run_id();
    // What a kill between `run_completed` and the clean-up leaves.
    let state = env.project().join(".descartes");
    std::fs::create_dir_all(state.join("spool").join(&id).join("call_1")).unwrap();
    std::fs::write(state.join("runs").join(format!("{id}.lock")), "12345").unwrap();
    assert!(env.run(&["run", "-p", "openai", "second"]).status.success());
    assert!(!state.join("spool").join(&id).exists(), "the spool leaked");
    assert!(!state.join("runs").join(format!("{id}.lock")).exists(), "the lock file leaked");
}
