//! `descartes task ...` end to end: priorities and the DAG, leases and fencing with real time,
//! path locks, bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn env() -> Env {
    let env = Env::new(|_| Reply::Stream(openai::text(&["unused"])));
    env.init();
    env
}

fn ok(env: &Env, args: &[&str]) -> String {
    let out = env.run(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    stdout(&out).trim().to_owned()
}

fn create(env: &Env, args: &[&str]) -> String {
    let mut all = vec!["task", "create"];
    all.extend_from_slice(args);
    ok(env, &all)
}

/// `task claim` → (id, token), or None when nothing is ready.
fn claim(env: &Env, worker: &str, ttl: &str) -> Option<(String, String)> {
    let out = env.run(&["task", "claim", "--worker", worker, "--ttl", ttl]);
    if out.status.code() == Some(7) {
        return None;
    }
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let mut parts = text.split_whitespace();
    Some((parts.next().unwrap().to_owned(), parts.next().unwrap().to_owned()))
}

fn show(env: &Env, id: &str) -> Value {
    serde_json::from_str(&ok(env, &["task", "show", id, "--json"])).unwrap()
}

#[test]
fn claims_follow_priority_and_dependencies_and_cycles_are_refused() {
    let env = env();
    let a = create(&env, &["A", "--priority", "1"]);
    let b = create(&env, &["B", "--priority", "5"]);
    let c = create(&env, &["C", "--depends-on", &a]);
    let (first, _) = claim(&env, "w", "30s").unwrap();
    assert_eq!(first, b);
    let (second, token_a) = claim(&env, "w", "30s").unwrap();
    assert_eq!(second, a);
    assert!(claim(&env, "w", "30s").is_none(), "C waits for A");
    assert!(show(&env, &c)["waiting"].as_str().unwrap().contains(&a));
    ok(&env, &["task", "complete", &a, "--token", &token_a, "--result", "fine"]);
    assert_eq!(claim(&env, "w", "30s").unwrap().0, c);
    // A cycle: X -> Y -> X.
    let x = create(&env, &["X"]);
    let y = create(&env, &["Y", "--depends-on", &x]);
    let out = env.run(&["task", "depend", &x, "--on", &y]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cycle"), "{}", stderr(&out));
    // The graph shows the edges, as text and DOT.
    let text = ok(&env, &["task", "graph"]);
    assert!(text.contains(&format!("{a} [done] A")) && text.contains(&format!("  {c} [claimed] C")), "{text}");
    let dot = ok(&env, &["task", "graph", "--dot"]);
    assert!(dot.starts_with("digraph") && dot.contains(&format!("\"{x}\" -> \"{y}\"")), "{dot}");
}

#[test]
fn an_expired_lease_goes_to_another_worker_and_the_old_token_is_refused() {
    let env = env();
    let t = create(&env, &["T"]);
    let (_, old) = claim(&env, "w1", "2s").unwrap();
    assert!(claim(&env, "w2", "2s").is_none());
    // 2 s lease, then the 1 s backoff of a lost attempt.
    std::thread::sleep(Duration::from_millis(3300));
    let (id, new) = claim(&env, "w2", "30s").expect("claimable after expiry");
    assert_eq!(id, t);
    assert!(new.parse::<i64>().unwrap() > old.parse::<i64>().unwrap());
    let out = env.run(&["task", "complete", &t, "--token", &old]);
    assert_eq!(out.status.code(), Some(6));
    assert!(stderr(&out).contains("stale fencing token"), "{}", stderr(&out));
    ok(&env, &["task", "complete", &t, "--token", &new]);
    let shown = show(&env, &t);
    assert_eq!(shown["status"], "done");
    assert_eq!(shown["attempts"], 2);
}

#[test]
fn heartbeats_keep_a_lease_alive() {
    let env = env();
    let t = create(&env, &["T"]);
    let (_, token) = claim(&env, "w1", "2s").unwrap();
    ok(&env, &["task", "start", &t, "--token", &token]);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(800));
        ok(&env, &["task", "heartbeat", &t, "--token", &token, "--ttl", "2s"]);
        assert!(claim(&env, "w2", "2s").is_none());
    }
    ok(&env, &["task", "complete", &t, "--token", &token]);
}

#[test]
fn path_locks_keep_overlapping_tasks_apart() {
    let env = env();
    let wide = create(&env, &["wide", "--lock", "src/**", "--priority", "2"]);
    let narrow = create(&env, &["narrow", "--lock", "src/a.rs"]);
    let (first, token) = claim(&env, "w1", "30s").unwrap();
    assert_eq!(first, wide);
    assert!(claim(&env, "w2", "30s").is_none());
    assert!(show(&env, &narrow)["waiting"].as_str().unwrap().contains("path locks"));
    ok(&env, &["task", "complete", &wide, "--token", &token]);
    assert_eq!(claim(&env, "w2", "30s").unwrap().0, narrow);
}

#[test]
fn failures_block_dependents_until_retried() {
    let env = env();
    let a = create(&env, &["A", "--max-attempts", "1"]);
    let b = create(&env, &["B", "--depends-on", &a]);
    let (_, token) = claim(&env, "w", "30s").unwrap();
    assert_eq!(ok(&env, &["task", "fail", &a, "--token", &token, "--reason", "exit code 2"]), "failed");
    let shown = ok(&env, &["task", "show", &b]);
    assert!(shown.contains("status:    blocked") && shown.contains(&format!("task retry {a}")), "{shown}");
    ok(&env, &["task", "retry", &a]);
    assert_eq!(show(&env, &b)["status"], "queued");
    let list: Value = serde_json::from_str(&ok(&env, &["task", "list", "--status", "queued", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
}

#[test]
fn bad_input_is_reported_clearly() {
    let env = env();
    for (args, code, needle) in [
        (&["task", "create", "X", "--depends-on", "nope"][..], 2, "dependency nope does not exist"),
        (&["task", "create", "X", "--lock", "src/["][..], 2, "invalid lock glob"),
        (&["task", "claim", "--worker", "w", "--ttl", "-2s"][..], 2, "negative"),
        (&["task", "claim", "--worker", "w", "--ttl", "soon"][..], 2, "not a duration"),
        (&["task", "show", "nope"][..], 5, "no task with id nope"),
        (&["task", "list", "--status", "sleeping"][..], 2, "unknown status"),
    ] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
    assert!(stdout(&env.run(&["task", "list", "--json"])).trim() == "[]", "nothing was created");
}

#[test]
fn watch_prints_task_changes() {
    let env = env();
    let mut child = env.spawn(&["task", "watch"]);
    std::thread::sleep(Duration::from_millis(400));
    let t = create(&env, &["watched"]);
    let (_, token) = claim(&env, "w", "30s").unwrap();
    ok(&env, &["task", "complete", &t, "--token", &token]);
    std::thread::sleep(Duration::from_millis(400));
    signal(&child, "INT");
    let status = child.wait().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(status.success(), "{out}");
    for kind in ["task_created", "task_claimed", "task_completed"] {
        assert!(out.contains(kind), "{kind} missing: {out}");
    }
    let created = out.lines().find(|l| l.contains("task_created")).unwrap();
    assert_eq!(created.matches("\"watched\"").count(), 1, "the title once: {created}");
}

#[test]
fn task_list_lines_up_its_columns() {
    let env = env();
    create(&env, &["first", "--priority", "12"]);
    create(&env, &["second", "--priority", "3"]);
    claim(&env, "w1", "60s").unwrap();
    let text = ok(&env, &["task", "list"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let title_at = lines[0].find("TITLE").unwrap();
    for (line, title) in lines[1..].iter().zip(["first", "second"]) {
        assert_eq!(line.find(title), Some(title_at), "the title is not under TITLE:\n{text}");
    }
    assert!(lines[1].contains("claimed") && lines[2].contains("queued"), "{text}");
}
