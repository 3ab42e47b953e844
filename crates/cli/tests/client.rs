//! `descartes --server URL ...`: the main commands (runs, and the task commands the API
//! covers) through a running server print what they print locally and exit with the same codes.
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
    for (args, name) in [(&["ai", "list"][..], "ai"), (&["task", "claim", "--worker", "w"], "task claim")] {
        let out = remote(&env, &s, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let refusal = format!("`descartes {name}` does not work with --server");
        assert!(stderr(&out).contains(&refusal), "{args:?}: {}", stderr(&out));
    }
    let out = env.cmd(&["--server", &s.url, "list"]).env("DESCARTES_SERVER_TOKEN", "wrong").output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("token"), "{}", stderr(&out));
    let out = env.run(&["--server", "http://127.0.0.1:9", "list"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot reach the server"), "{}", stderr(&out));
}

/// What a command said: (exit code, stdout, stderr).
type Said = (Option<i32>, String, String);

fn said(o: &Output) -> Said {
    (o.status.code(), stdout(o), stderr(o))
}

/// `args` here and through the server say the same; what they said.
fn same(env: &Env, s: &Server, args: &[&str]) -> Said {
    let here = said(&env.run(args));
    let there = said(&remote(env, s, args));
    assert_eq!(there, here, "{args:?}");
    here
}

/// `text` with the twins' prefix (`loc-` or `rem-`) as `ID-`, and without the lines of
/// timestamps.
fn normal(text: &str, prefix: &str) -> String {
    text.replace(prefix, "ID-").lines().filter(|l| !l.contains("_at\": ")).map(|l| format!("{l}\n")).collect()
}

fn normal_said((code, out, err): Said, prefix: &str) -> Said {
    (code, normal(&out, prefix), normal(&err, prefix))
}

/// `args` (naming `loc-` tasks) here, and the same naming their `rem-` twins through the server,
/// say the same but for the twins' ids and the time; what the local one said.
fn twins(env: &Env, s: &Server, args: &[&str]) -> Said {
    let theirs: Vec<String> = args.iter().map(|a| a.replace("loc-", "rem-")).collect();
    let theirs: Vec<&str> = theirs.iter().map(String::as_str).collect();
    let here = said(&env.run(args));
    let there = said(&remote(env, s, &theirs));
    assert_eq!(normal_said(there, "rem-"), normal_said(here.clone(), "loc-"), "{args:?}");
    here
}

/// The twins `loc-NAME` and `rem-NAME` are alike (what `args` says of each, locally).
fn alike(env: &Env, args: &[&str], name: &str) {
    let mine: Vec<String> = args.iter().map(|a| a.replace("NAME", &format!("loc-{name}"))).collect();
    let theirs: Vec<String> = args.iter().map(|a| a.replace("NAME", &format!("rem-{name}"))).collect();
    let run = |a: &[String]| said(&env.run(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    assert_eq!(normal_said(run(&theirs), "rem-"), normal_said(run(&mine), "loc-"), "{args:?} of {name}");
}

#[test]
fn task_commands_through_the_server_print_what_they_print_locally() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["unused"])));
    let p = env.project();
    env.git_repo(&[]);
    env.init();
    let out =
        env.run(&["ai", "register", "shipper", "--backend", "command", "--command", "echo shipped > shipped.txt"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = serve(&env);

    // Created here (`loc-`) and through the server (`rem-`), the second by a prefix of the first.
    let alpha = "task create alpha --id loc-alpha --prompt do-alpha --type feature --priority 2 --label api \
                 --lock src/** --max-attempts 5 --needs-label rust --needs-capability tools --test-command true";
    let alpha: Vec<&str> = alpha.split_whitespace().collect();
    assert_eq!(twins(&env, &s, &alpha), (Some(0), "loc-alpha\n".into(), String::new()));
    let beta = "task create beta --id loc-beta --depends-on loc-al --agent nobody --json";
    let beta = twins(&env, &s, &beta.split_whitespace().collect::<Vec<_>>());
    assert!(beta.1.contains("\"depends_on\": [\n    \"loc-alpha\"\n  ]"), "{}", beta.1);
    // A missing dependency, a bad glob, an id taken.
    for args in [
        &["task", "create", "x", "--depends-on", "nope"][..],
        &["task", "create", "x", "--lock", "src/["],
        &["task", "create", "x", "--id", "loc-alpha"],
    ] {
        assert_eq!(same(&env, &s, args).0, Some(2), "{args:?}");
    }

    // Read: the same output and exit codes.
    for args in [
        &["task", "list"][..],
        &["task", "list", "--json"],
        &["task", "list", "--status", "queued", "--label", "api"],
        &["task", "list", "--status", "done"],
        &["task", "list", "--label", "a b&c=d"],
        &["task", "show", "loc-alpha"],
        &["task", "show", "loc-b"],
        &["task", "show", "rem-beta", "--json"],
        &["task", "show", "loc-alpha", "--evidence"],
        &["task", "show", "loc-alpha", "--evidence", "--json"],
    ] {
        assert_eq!(same(&env, &s, args).0, Some(0), "{args:?}");
    }
    let shown = same(&env, &s, &["task", "show", "loc-alpha"]).1;
    assert!(shown.contains("routing:   "), "no agent has the label it needs: {shown}");
    assert!(same(&env, &s, &["task", "show", "loc-beta"]).1.contains("waiting:   "));
    // Unknown ids, an ambiguous prefix, and what a task that never ran does not have.
    for (args, code) in [
        (&["task", "show", "nope"][..], 5),
        (&["task", "show", ""], 5),
        (&["task", "show", "nope", "--evidence", "--json"], 5),
        (&["task", "cancel", "nope"], 5),
        (&["task", "retry", "nope"], 5),
        (&["task", "approve", "nope"], 5),
        (&["task", "diff", "nope"], 5),
        (&["task", "merge", "nope"], 5),
        (&["task", "discard", "nope"], 5),
        (&["task", "show", "loc-"], 2),
        (&["task", "diff", "loc-alpha"], 5),
        (&["task", "merge", "loc-alpha"], 5),
        (&["task", "discard", "loc-alpha"], 5),
        (&["task", "retry", "loc-alpha"], 2),
    ] {
        let (got, _, err) = same(&env, &s, args);
        assert_eq!(got, Some(code), "{args:?}: {err}");
        assert!(err.starts_with("descartes: error: "), "{args:?}: {err}");
    }

    // Cancelled, cancelled again (an illegal transition), retried and approved: the same output
    // and the same effect on each twin.
    assert_eq!(twins(&env, &s, &["task", "cancel", "loc-alpha"]), (Some(0), String::new(), String::new()));
    alike(&env, &["task", "show", "NAME", "--json"], "alpha");
    alike(&env, &["task", "show", "NAME"], "beta");
    let again = twins(&env, &s, &["task", "cancel", "loc-alpha"]);
    assert_eq!(again.0, Some(2), "{}", again.2);
    assert!(again.2.contains("cancelled"), "{}", again.2);
    assert_eq!(same(&env, &s, &["task", "cancel", "loc-alpha"]).0, Some(2));
    assert_eq!(twins(&env, &s, &["task", "retry", "loc-al"]), (Some(0), String::new(), String::new()));
    alike(&env, &["task", "show", "NAME", "--json"], "alpha");
    alike(&env, &["task", "show", "NAME", "--json"], "beta");
    let approved = twins(&env, &s, &["task", "approve", "loc-al"]);
    assert_eq!(approved.1, "approved claim of task loc-alpha\n");
    twins(&env, &s, &["task", "approve", "loc-alpha", "--stage", "merge"]);
    let kinds = |id: &str| -> Vec<String> {
        stdout(&env.run(&["audit", id, "--jsonl"]))
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["record"]["kind"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    assert_eq!(kinds("loc-alpha"), kinds("rem-alpha"));
    assert_eq!(
        kinds("rem-alpha"),
        ["task_created", "task_cancelled", "task_retried", "task_approved", "task_approved"]
    );

    // A task run on the agent in a worktree: its evidence, diff, merge and discard.
    let out = env.run(&["task", "create", "ship it", "--id", "ship-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.run(&["task", "execute", "ship-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    for args in [
        &["task", "show", "ship-1"][..],
        &["task", "show", "ship", "--evidence"],
        &["task", "show", "ship-1", "--evidence", "--json"],
        &["task", "list"],
    ] {
        assert_eq!(same(&env, &s, args).0, Some(0), "{args:?}");
    }
    let evidence = same(&env, &s, &["task", "show", "ship-1", "--evidence"]).1;
    assert!(evidence.contains("evidence:  attempt 1 (succeeded)") && evidence.contains("shipped.txt"), "{evidence}");
    let diff = same(&env, &s, &["task", "diff", "ship-1"]).1;
    assert!(diff.contains("+++ b/shipped.txt"), "{diff}");
    let merged = remote(&env, &s, &["task", "merge", "ship-1"]);
    assert!(merged.status.success(), "{}", stderr(&merged));
    let head = git(&p, &["rev-parse", "HEAD"]);
    let branch = "descartes/ship-1";
    assert_eq!(stdout(&merged), format!("merged {branch} into main (fast-forward): {head}\n"));
    assert_eq!(std::fs::read_to_string(p.join("shipped.txt")).unwrap(), "shipped\n");
    let again = same(&env, &s, &["task", "merge", "ship-1"]);
    assert_eq!(again, (Some(0), format!("merged {branch} into main (already merged): {head}\n"), String::new()));
    let ev: serde_json::Value =
        serde_json::from_str(&same(&env, &s, &["task", "show", "ship-1", "--evidence", "--json"]).1).unwrap();
    assert_eq!(ev["evidence"]["merged"], head.as_str(), "{ev:#}");
    let path = ev["evidence"]["worktree"]["path"].as_str().unwrap().to_owned();
    let discarded = remote(&env, &s, &["task", "discard", "ship-1"]);
    assert!(discarded.status.success(), "{}", stderr(&discarded));
    assert_eq!(stdout(&discarded), format!("discarded {branch} and {path}\n"));
    assert!(!git(&p, &["branch", "--list", "descartes/*"]).contains("ship-1"));
    same(&env, &s, &["task", "show", "ship-1", "--evidence"]);
}
