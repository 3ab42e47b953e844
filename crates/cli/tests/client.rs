//! `descartes --server URL ...`: the main commands through a running server print what they
//! print locally and exit with the same codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Output};

use common::*;

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(env: &Env) -> Server {
    let mut cmd = env.cmd(&["serve", "--listen", "127.0.0.1:0"]);
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line}")).to_owned();
    Server { child, url }
}

/// `descartes --server URL args...`.
fn remote(env: &Env, s: &Server, args: &[&str]) -> Output {
    let mut all = vec!["--server", s.url.as_str()];
    all.extend_from_slice(args);
    env.run(&all)
}

fn shell_then_answer(req: &RecordedRequest) -> Reply {
    if let Some((_, out)) = req.tool_results().last() {
        Reply::Stream(openai::text(&["the tool said ", &out.replace('\n', " ")]))
    } else {
        let args = serde_json::json!({"command": "echo remote-$((2*21))"}).to_string();
        Reply::Stream(openai::tool_call("call_1", "shell", &[&args]))
    }
}

#[test]
fn run_list_and_logs_through_the_server_print_what_they_print_locally() {
    let env = Env::new(shell_then_answer);
    env.init();
    let local = env.run(&["run", "-y", "-p", "openai", "compute it"]);
    assert!(local.status.success(), "{}", stderr(&local));
    let s = serve(&env);
    let through = remote(&env, &s, &["run", "-y", "-p", "openai", "compute it"]);
    assert!(through.status.success(), "{}", stderr(&through));
    assert_eq!(stdout(&through), stdout(&local), "the answer");
    assert!(stdout(&through).contains("remote-42"), "{}", stdout(&through));
    let runs = env.runs();
    assert_eq!(runs.len(), 2);
    let (newest, oldest) = (runs[0]["run_id"].as_str().unwrap(), runs[1]["run_id"].as_str().unwrap());
    // stderr names its own run; the rest is the same.
    assert_eq!(stderr(&through).replace(newest, "ID"), stderr(&local).replace(oldest, "ID"));

    for args in [&["list"][..], &["list", "--json"], &["logs", newest], &["logs", "--json", oldest], &["logs"]] {
        let here = env.run(args);
        let there = remote(&env, &s, args);
        assert_eq!((there.status.code(), stdout(&there)), (here.status.code(), stdout(&here)), "{args:?}");
    }

    // Resume of a completed run: the same refusal and exit code.
    let here = env.run(&["resume", newest]);
    let there = remote(&env, &s, &["resume", newest]);
    assert_eq!(here.status.code(), Some(5));
    assert_eq!((there.status.code(), stderr(&there)), (here.status.code(), stderr(&here)));
    // An unknown run.
    let here = env.run(&["logs", "zzz"]);
    let there = remote(&env, &s, &["logs", "zzz"]);
    assert_eq!((there.status.code(), stderr(&there)), (here.status.code(), stderr(&here)));
}

#[test]
fn without_yes_the_remote_run_denies_its_ask_like_a_local_one() {
    let env = Env::new(shell_then_answer);
    env.init();
    let s = serve(&env);
    let out = remote(&env, &s, &["run", "-p", "openai", "compute it"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains("remote-42"), "the denied command did not run: {}", stdout(&out));
    let events = env.events(&env.run_id());
    assert_eq!(count(&events, "permission_asked"), 1);
    assert_eq!(count(&events, "tool_call_started"), 0);
    assert_log_invariants(&events);
}

#[test]
fn the_client_says_what_it_cannot_do_and_needs_the_token() {
    let env = Env::new(shell_then_answer);
    env.init();
    let s = serve(&env);
    let out = remote(&env, &s, &["task", "list"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("does not work with --server"), "{}", stderr(&out));
    let out = env.cmd(&["--server", &s.url, "list"]).env("DESCARTES_SERVER_TOKEN", "wrong").output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("token"), "{}", stderr(&out));
    let out = env.run(&["--server", "http://127.0.0.1:9", "list"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot reach the server"), "{}", stderr(&out));
}
