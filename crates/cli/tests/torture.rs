//! The torture test: random SIGKILLs of runs that make shell effects, and of the daemon while
//! its task commands run; lost and duplicated effects are counted and must be 0.
//!
//! Bounded for CI (`DESCARTES_TORTURE_KILLS`, default 40: about two thirds runs, one third
//! daemon). `DESCARTES_TORTURE_KILLS=1000` is the long run recorded in `docs/RELIABILITY.md`.
//!
//! What counts:
//! - **Runs.** Each run's model makes `CALLS` shell calls one after the other, call `i` writing
//!   the line `i` to the run's effects file after a short sleep. The run is SIGKILLed at a random
//!   moment and resumed until it completes. *Lost*: a call the log records as succeeded (exit 0)
//!   whose line is missing. *Duplicated*: a line written more than once (a call run again). A
//!   call killed while it ran dies with Descartes and is reported to the model as of unknown
//!   outcome; its line may or may not be there, but never twice.
//! - **Daemon.** Tasks run a command that holds a per-task `flock` for its whole life and writes
//!   `task attempt` at its end. The daemon is SIGKILLed at random moments and restarted until
//!   every task is done. *Lost*: a task done in the store without the line of the attempt that
//!   completed it. *Duplicated*: an attempt's process still alive after its daemon was killed
//!   (it could run beside its retry), two attempts of one task running at once (the second
//!   finds the lock held), or one attempt's line written twice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const CALLS: usize = 4;

fn kills() -> usize {
    std::env::var("DESCARTES_TORTURE_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(40)
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The model: call `i` of the run named in the goal (`goal-N`) writes `i` to `effects-N`.
fn effects_model(req: &RecordedRequest) -> Reply {
    let goal = req.conversation().iter().find(|m| m["role"] == "user").map(|m| m.to_string()).unwrap_or_default();
    let run = goal.split("goal-").nth(1).map(|r| r.chars().take_while(char::is_ascii_digit).collect::<String>());
    let run = run.unwrap_or_default();
    let done = req.tool_results().len();
    if done < CALLS {
        let command = format!("sleep 0.05; echo {done} >> effects-{run}.txt");
        let args = json!({ "command": command }).to_string();
        Reply::Stream(openai::tool_call(&format!("call_{done}"), "shell", &[&args]))
    } else {
        Reply::Stream(openai::text(&["all effects made"]))
    }
}

struct Tally {
    kills: usize,
    lost: Vec<String>,
    duplicated: Vec<String>,
}

fn torture_runs(kills_wanted: usize) -> Tally {
    let env = Env::new(effects_model);
    env.init();
    let mut tally = Tally { kills: 0, lost: Vec::new(), duplicated: Vec::new() };
    let mut run = 0;
    while tally.kills < kills_wanted {
        run += 1;
        let goal = format!("make the effects of goal-{run}");
        let mut id: Option<String> = None;
        // Start, then resume until completed; every attempt may be killed.
        for attempt in 0..20 {
            let args: Vec<String> = match &id {
                None => vec!["run".into(), "-y".into(), "-p".into(), "openai".into(), goal.clone()],
                Some(id) => vec!["resume".into(), "-y".into(), id.clone()],
            };
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut child = env.cmd(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
            // Kill most attempts at a random moment; let the last ones finish.
            let kill_at =
                (attempt < 4 && tally.kills < kills_wanted).then(|| Duration::from_millis(fastrand::u64(20..400)));
            let started = Instant::now();
            let mut killed = false;
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if kill_at.is_some_and(|at| started.elapsed() >= at) {
                    kill9(&mut child);
                    tally.kills += 1;
                    killed = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if id.is_none() {
                let runs = env.runs();
                match runs.iter().find(|r| r["prompt"].as_str().is_some_and(|p| p.contains(&format!("goal-{run}")))) {
                    Some(r) => id = Some(r["run_id"].as_str().unwrap().to_owned()),
                    // Killed before `run_started` was committed: start again.
                    None => continue,
                }
            }
            let status = env.runs().iter().find(|r| Some(r["run_id"].as_str().unwrap()) == id.as_deref()).cloned();
            if !killed && status.as_ref().is_some_and(|r| r["status"] == "completed") {
                break;
            }
        }
        let id = id.expect("the run started");
        let events = env.events(&id);
        assert_eq!(events.iter().filter(|e| e["type"] == "run_completed").count(), 1, "run {id} completed once");
        let lines = read_lines(&env.project().join(format!("effects-{run}.txt")));
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for l in &lines {
            *counts.entry(l.clone()).or_default() += 1;
        }
        for (line, n) in &counts {
            if *n > 1 {
                tally.duplicated.push(format!("run {id}: effect {line} made {n} times"));
            }
        }
        for e in events.iter().filter(|e| e["type"] == "tool_call_completed") {
            let call = e["data"]["call_id"].as_str().unwrap_or_default();
            let i = call.trim_start_matches("call_");
            if e["data"]["details"]["exit_code"] == 0 && !counts.contains_key(i) {
                tally.lost.push(format!("run {id}: call {call} succeeded but its effect is missing"));
            }
        }
    }
    tally
}

fn daemon(env: &Env, command: &str) -> Child {
    env.cmd(&["daemon", "start", "--foreground", "--workers", "2", "--lease-ttl", "1s", "--command", command])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn torture_daemon(kills_wanted: usize) -> Tally {
    let env = Env::new(|_| Reply::Stream(openai::text(&["unused"])));
    env.init();
    std::fs::create_dir_all(env.project().join("locks")).unwrap();
    // The attempt holds the task's lock for its whole life (the lock dies with its process).
    std::fs::create_dir_all(env.project().join("pids")).unwrap();
    let command = "echo $$ > \"pids/$DESCARTES_TASK_ID-$DESCARTES_TASK_ATTEMPT\"; \
                   exec flock -n \"locks/$DESCARTES_TASK_ID\" sh -c 'sleep 5; \
                   echo \"$DESCARTES_TASK_ID $DESCARTES_TASK_ATTEMPT\" >> effects.txt' \
                   || { echo \"$DESCARTES_TASK_ID $DESCARTES_TASK_ATTEMPT\" >> overlaps.txt; exit 1; }";
    let mut ids = Vec::new();
    let mut tally = Tally { kills: 0, lost: Vec::new(), duplicated: Vec::new() };
    let all_done = |env: &Env| {
        let out = env.run(&["task", "list", "--json"]);
        let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        list.iter().all(|t| t["status"] == "done")
    };
    let deadline = Instant::now() + Duration::from_secs(60 + 4 * kills_wanted as u64);
    while tally.kills < kills_wanted || !all_done(&env) {
        assert!(Instant::now() < deadline, "the tasks did not all finish");
        // Work for the next daemon to be killed in the middle of.
        if tally.kills < kills_wanted && all_done(&env) {
            for _ in 0..4 {
                let out = env.run(&["task", "create", &format!("t{}", ids.len()), "--max-attempts", "100"]);
                assert!(out.status.success(), "{}", stderr(&out));
                ids.push(stdout(&out).trim().to_owned());
            }
        }
        let mut d = daemon(&env, command);
        if tally.kills < kills_wanted {
            std::thread::sleep(Duration::from_millis(fastrand::u64(150..1500)));
            kill9(&mut d);
            tally.kills += 1;
            // No attempt outlives its daemon: one that did could run beside its retry.
            std::thread::sleep(Duration::from_millis(300));
            for entry in std::fs::read_dir(env.project().join("pids")).unwrap().flatten() {
                let pid = std::fs::read_to_string(entry.path()).unwrap_or_default().trim().to_owned();
                let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|st| !st.rsplit(')').next().unwrap_or_default().trim_start().starts_with('Z'));
                if alive {
                    let attempt = entry.file_name().to_string_lossy().into_owned();
                    tally.duplicated.push(format!("attempt {attempt} (pid {pid}) outlived its SIGKILLed daemon"));
                    let _ = std::process::Command::new("kill").args(["-9", &pid]).status();
                }
                let _ = std::fs::remove_file(entry.path());
            }
        } else {
            let until = Instant::now() + Duration::from_secs(30);
            while !all_done(&env) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(100));
            }
            signal(&d, "TERM");
            let _ = d.wait();
        }
    }
    let effects = read_lines(&env.project().join("effects.txt"));
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for l in &effects {
        *counts.entry(l.as_str()).or_default() += 1;
    }
    for (line, n) in &counts {
        if *n > 1 {
            tally.duplicated.push(format!("attempt `{line}` made its effect {n} times"));
        }
    }
    for overlap in read_lines(&env.project().join("overlaps.txt")) {
        tally.duplicated.push(format!("attempt `{overlap}` started while an earlier attempt still ran"));
    }
    for id in &ids {
        let out = env.run(&["task", "show", id, "--json"]);
        let t: Value = serde_json::from_slice(&out.stdout).unwrap();
        let attempt = t["attempts"].as_u64().unwrap_or(0);
        if !counts.contains_key(format!("{id} {attempt}").as_str()) {
            tally.lost.push(format!("task {id} is done (attempt {attempt}) without that attempt's effect"));
        }
    }
    tally
}

#[test]
fn random_sigkills_lose_and_duplicate_no_effect() {
    let total = kills();
    let started = Instant::now();
    let daemon_kills = total / 3;
    let runs = torture_runs(total - daemon_kills);
    let daemon = torture_daemon(daemon_kills);
    eprintln!(
        "torture: {} kills of runs, {} kills of the daemon in {:.0?}: lost {}, duplicated {}",
        runs.kills,
        daemon.kills,
        started.elapsed(),
        runs.lost.len() + daemon.lost.len(),
        runs.duplicated.len() + daemon.duplicated.len()
    );
    let problems: Vec<&String> =
        runs.lost.iter().chain(&runs.duplicated).chain(&daemon.lost).chain(&daemon.duplicated).collect();
    assert!(problems.is_empty(), "{problems:#?}");
}
