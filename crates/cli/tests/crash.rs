//! Crash tests: a real `descartes` process is killed with SIGKILL at many points of a run
//! (while the model streams, while the shell command executes, between steps) and resumed.
//! Every time: the shell command ran exactly once, the log has one `run_started`, one
//! `tool_call_completed` per tool call and one `run_completed`, and `seq` strictly increases.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;

/// The model: a tool call streamed slowly, then (after the result) a final answer streamed
/// slowly. The shell command takes a while, so kills land inside it too.
fn slow_model(req: &RecordedRequest) -> Reply {
    let step = Duration::from_millis(25);
    if req.has_tool_result() {
        Reply::Stream(with_delay(
            openai::text(&["The ", "command ", "ran ", "and ", "the ", "run ", "is ", "done."]),
            step,
        ))
    } else {
        Reply::Stream(with_delay(
            openai::tool_call("call_1", "shell", &[r#"{"command":"#, r#""sleep 0.2; "#, r#"echo ran >> marker.txt"}"#]),
            step,
        ))
    }
}

const ANSWER: &str = "The command ran and the run is done.";

/// Resumes until the run completes (a kill may leave it in any state); returns the last
/// resume's stdout.
fn resume_to_completion(env: &Env, id: &str) -> String {
    let mut last = String::new();
    for _ in 0..3 {
        let runs = env.runs();
        if runs[0]["status"] == "completed" {
            return last;
        }
        assert_eq!(runs[0]["status"], "interrupted", "a killed run shows as interrupted: {runs:?}");
        let out = env.run(&["resume", "-y", id]);
        assert!(out.status.success(), "resume failed: {}", stderr(&out));
        last = stdout(&out);
    }
    assert_eq!(env.runs()[0]["status"], "completed");
    last
}

fn check(env: &Env, id: &str, label: &str) {
    // A command that was running when Descartes was killed dies with it (its supervisor kills
    // its process group) and is never run again: it ran at most once, never twice.
    let lines = read_lines(&env.project().join("marker.txt"));
    assert!(lines.is_empty() || lines == vec!["ran"], "{label}: the command ran more than once: {lines:?}");
    let events = env.events(id);
    assert_log_invariants(&events);
    let last = events.iter().rev().find(|e| e["type"] == "run_completed").unwrap();
    assert_eq!(last["data"]["result"], ANSWER, "{label}");
}

#[test]
fn sigkill_while_the_final_answer_streams_then_resume() {
    let mut env = Env::new(slow_model);
    env.durable = true;
    env.init();
    let mut child = env.spawn(&["run", "-y", "-p", "openai", "run it"]);
    // Read stdout until the final answer starts streaming, then kill.
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    while !String::from_utf8_lossy(&seen).contains("The ") {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "the run ended before the final answer streamed");
        seen.extend_from_slice(&buf[..n]);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let id = env.run_id();
    assert_eq!(env.runs()[0]["status"], "interrupted");
    let out = resume_to_completion(&env, &id);
    assert_eq!(out.trim_end(), ANSWER, "the resumed run streams the whole answer again");
    check(&env, &id, "final answer");
    let events = env.events(&id);
    assert_eq!(count(&events, "run_resumed"), 1);
}

#[test]
fn sigkill_at_many_points_then_resume() {
    // Kill points spread over the whole run: model streaming (tool call), the shell command,
    // the second model call, and completion. One fresh project per point.
    let points: Vec<u64> = (0..24).map(|i| i * 40).collect();
    let mut killed_mid_run = 0;
    let mut recovered = 0;
    for &ms in &points {
        let label = format!("kill after {ms} ms");
        let mut env = Env::new(slow_model);
        env.durable = true;
        env.init();
        let mut child = env.spawn(&["run", "-y", "-p", "openai", "run it"]);
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(ms) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = child.kill();
        let status = child.wait().unwrap();
        let runs = env.runs();
        if runs.is_empty() {
            // Killed before `run_started` was committed: nothing happened, nothing to resume.
            assert!(!env.project().join("marker.txt").exists(), "{label}");
            continue;
        }
        let id = runs[0]["run_id"].as_str().unwrap().to_owned();
        if status.success() {
            assert_eq!(runs[0]["status"], "completed", "{label}");
        } else {
            killed_mid_run += 1;
        }
        resume_to_completion(&env, &id);
        check(&env, &id, &label);
        let events = env.events(&id);
        if events.iter().any(|e| e["type"] == "tool_call_completed" && e["data"]["recovered"] == true) {
            recovered += 1;
        }
    }
    eprintln!("{} kill points: {killed_mid_run} mid-run, {recovered} inside the shell command", points.len());
    assert!(killed_mid_run >= points.len() / 2, "most kills must land mid-run: {killed_mid_run}");
    assert!(recovered >= 1, "some kills must land while the shell command runs (recovered results: {recovered})");
}
