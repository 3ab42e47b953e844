//! The control plane through the HTTP API (`descartes serve`), driven with `curl`: tasks
//! created, listed, shown by prefix with why they wait, cancelled, retried and approved, each
//! change in the task's stream; bad input; the agents, sessions and providers; and a task run
//! on a `command` agent in a git repository: its policy decision, evidence, diff, audit trail,
//! merge and discard.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command};

use common::*;
use serde_json::{Value, json};

struct Server {
    child: Child,
    url: String,
    token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(env: &Env) -> Server {
    let token = stdout(&env.run(&["serve", "--print-token"])).trim().to_owned();
    let mut cmd = env.cmd(&["serve", "--listen", "127.0.0.1:0"]);
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line}")).to_owned();
    Server { child, url, token }
}

/// `curl` with `args`: (HTTP status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl").args(["-s", "-w", "\n%{http_code}"]).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_owned())
}

/// `GET path`: (status, body as text).
fn get_text(s: &Server, path: &str) -> (u16, String) {
    let auth = format!("Authorization: Bearer {}", s.token);
    curl(&["-H", &auth, &format!("{}{path}", s.url)])
}

fn get(s: &Server, path: &str) -> (u16, Value) {
    let (code, body) = get_text(s, path);
    (code, serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON ({code}): {body}")))
}

/// `POST path` with a JSON body (`None`: no body at all).
fn post(s: &Server, path: &str, body: Option<&str>) -> (u16, Value) {
    let auth = format!("Authorization: Bearer {}", s.token);
    let url = format!("{}{path}", s.url);
    let (code, body) = match body {
        Some(b) => curl(&["-X", "POST", "-H", &auth, "-H", "Content-Type: application/json", "-d", b, &url]),
        None => curl(&["-X", "POST", "-H", &auth, &url]),
    };
    (code, serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON ({code}): {body}")))
}

/// An error's (status, code).
fn error(reply: &(u16, Value)) -> (u16, &str) {
    (reply.0, reply.1["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error: {}", reply.1)))
}

fn ok(env: &Env, args: &[&str]) -> String {
    let out = env.run(args);
    assert!(out.status.success(), "{args:?}: {}{}", stdout(&out), stderr(&out));
    stdout(&out).trim().to_owned()
}

/// The types of the events of stream `id`, through the API.
fn stream_types(s: &Server, id: &str) -> Vec<String> {
    let (code, page) = get(s, &format!("/v1/events?stream={id}"));
    assert_eq!(code, 200, "{page}");
    page["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn tasks_are_created_listed_shown_cancelled_retried_and_approved_through_the_api() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["unused"])));
    env.init();
    let s = start(&env);

    // Created, one depending on the other by prefix.
    let (code, a) =
        post(&s, "/v1/tasks", Some(r#"{"title": "alpha", "id": "t-alpha", "priority": 2, "labels": ["api"]}"#));
    assert_eq!(code, 201, "{a}");
    assert_eq!(
        (a["id"].as_str(), a["status"].as_str(), a["priority"].as_i64()),
        (Some("t-alpha"), Some("queued"), Some(2))
    );
    let body = json!({
        "title": "beta",
        "id": "t-beta",
        "description": "do beta",
        "type": "feature",
        "depends_on": ["t-al"],
        "locks": ["src/**"],
        "max_attempts": 5,
        "needs": {"labels": ["rust"]},
        "test_command": "true",
    });
    let (code, b) = post(&s, "/v1/tasks", Some(&body.to_string()));
    assert_eq!(code, 201, "{b}");
    assert_eq!(b["depends_on"], json!(["t-alpha"]), "{b}");
    assert_eq!(
        (b["prompt"].as_str(), b["type"].as_str(), b["max_attempts"].as_u64()),
        (Some("do beta"), Some("feature"), Some(5))
    );
    assert_eq!(b["needs"]["labels"], json!(["rust"]), "{b}");
    // The CLI sees what the API made.
    let shown: Value = serde_json::from_str(&ok(&env, &["task", "show", "t-beta", "--json"])).unwrap();
    assert_eq!(shown["title"], "beta");

    // Listed, with filters.
    let (code, all) = get(&s, "/v1/tasks");
    assert_eq!(code, 200, "{all}");
    let ids: Vec<&str> = all.as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["t-alpha", "t-beta"]);
    let (_, labelled) = get(&s, "/v1/tasks?label=api");
    assert_eq!(labelled.as_array().unwrap().len(), 1, "{labelled}");
    let (_, done) = get(&s, "/v1/tasks?status=done");
    assert_eq!(done, json!([]));

    // Shown by prefix, with why it waits and its dependencies.
    let (code, b) = get(&s, "/v1/tasks/t-b");
    assert_eq!(code, 200, "{b}");
    assert_eq!(b["id"], "t-beta");
    assert_eq!(b["waiting"], "waiting for dependencies: t-alpha (queued)", "{b}");
    assert_eq!(b["dependencies"], json!([{"id": "t-alpha", "title": "alpha", "status": "queued"}]));
    assert!(b.get("routing").is_none(), "no agent is registered: {b}");
    let (_, a) = get(&s, "/v1/tasks/t-alpha");
    assert!(a.get("waiting").is_none() && a["dependencies"] == json!([]), "{a}");
    assert_eq!(error(&get(&s, "/v1/tasks/t-")), (400, "bad_request"), "an ambiguous prefix");

    // Cancelled: the dependent is blocked; cancelling again is a conflict.
    let (code, a) = post(&s, "/v1/tasks/t-al/cancel", None);
    assert_eq!((code, a["status"].as_str()), (200, Some("cancelled")), "{a}");
    let (_, b) = get(&s, "/v1/tasks/t-beta");
    assert_eq!(b["status"], "blocked", "{b}");
    assert!(b["waiting"].as_str().unwrap().contains("t-alpha"), "{b}");
    let again = post(&s, "/v1/tasks/t-alpha/cancel", None);
    assert_eq!(error(&again), (409, "illegal_transition"), "{}", again.1);
    assert!(again.1["error"]["message"].as_str().unwrap().contains("cancelled"), "{}", again.1);
    // The CLI's exit code for the same refusal is unchanged (a usage error).
    assert_eq!(env.run(&["task", "cancel", "t-alpha"]).status.code(), Some(2));

    // Retried: queued again, the dependent unblocked; a queued task cannot be retried.
    let (code, a) = post(&s, "/v1/tasks/t-alpha/retry", None);
    assert_eq!((code, a["status"].as_str()), (200, Some("queued")), "{a}");
    assert_eq!(get(&s, "/v1/tasks/t-beta").1["status"], "queued");
    assert_eq!(error(&post(&s, "/v1/tasks/t-alpha/retry", None)), (409, "illegal_transition"));

    // Approved (claim by default, or the stage given), by `api`.
    let (code, approved) = post(&s, "/v1/tasks/t-alpha/approve", None);
    assert_eq!(code, 200, "{approved}");
    assert_eq!(approved, json!({"task_id": "t-alpha", "stage": "claim", "by": "api"}));
    let (code, approved) = post(&s, "/v1/tasks/t-al/approve", Some(r#"{"stage": "merge"}"#));
    assert_eq!((code, approved["stage"].as_str()), (200, Some("merge")), "{approved}");
    assert_eq!(error(&post(&s, "/v1/tasks/t-alpha/approve", Some(r#"{"stage": "lunch"}"#))), (400, "bad_request"));

    // Every change is in the task's stream.
    let types = stream_types(&s, "t-alpha");
    for kind in ["task_created", "task_cancelled", "task_retried", "task_approved"] {
        assert!(types.iter().any(|t| t == kind), "{kind} in {types:?}");
    }
    let (_, page) = get(&s, "/v1/events?stream=t-alpha&type=task_approved");
    let by: Vec<(&str, &str)> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["data"]["stage"].as_str().unwrap(), e["data"]["by"].as_str().unwrap()))
        .collect();
    assert_eq!(by, [("claim", "api"), ("merge", "api")]);
    let (_, trail) = get(&s, "/v1/tasks/t-alpha/audit");
    assert_eq!(trail["verification"]["intact"], true, "{trail}");
    let kinds: Vec<&str> =
        trail["records"].as_array().unwrap().iter().map(|r| r["record"]["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["task_created", "task_cancelled", "task_retried", "task_approved", "task_approved"]);

    // A task that never ran on an agent: no evidence yet, no diff, no worktree; not mergeable.
    let (code, ev) = get(&s, "/v1/tasks/t-alpha/evidence");
    assert_eq!(code, 200, "{ev}");
    assert_eq!(ev, json!({"worktree": null, "attempt": null, "succeeded": null, "merged": null}));
    assert_eq!(error(&get(&s, "/v1/tasks/t-alpha/diff")), (404, "not_found"));
    assert_eq!(error(&post(&s, "/v1/tasks/t-alpha/merge", None)), (409, "conflict"), "only a done task is merged");
    assert_eq!(error(&post(&s, "/v1/tasks/t-alpha/discard", None)), (404, "not_found"));
    assert_eq!(get(&s, "/v1/tasks/t-alpha/decisions"), (200, json!([])));

    // Unknown ids.
    for (method, path) in [
        ("GET", ""),
        ("GET", "/evidence"),
        ("GET", "/diff"),
        ("GET", "/decisions"),
        ("GET", "/audit"),
        ("POST", "/cancel"),
        ("POST", "/retry"),
        ("POST", "/approve"),
        ("POST", "/merge"),
        ("POST", "/discard"),
    ] {
        let path = format!("/v1/tasks/no-such-task{path}");
        let reply = if method == "GET" { get(&s, &path) } else { post(&s, &path, None) };
        assert_eq!(error(&reply), (404, "not_found"), "{method} {path}: {}", reply.1);
        assert!(reply.1["error"]["message"].as_str().unwrap().contains("no-such-task"), "{}", reply.1);
    }

    // Bad bodies and queries.
    for (body, status, code) in [
        (r#"{"title": "#, 400, "bad_json"),
        (r#"{"title": "x", "colour": "red"}"#, 422, "bad_json"),
        (r#"{"title": "x", "priority": "high"}"#, 422, "bad_json"),
        (r#"{"title": "x", "needs": {"agent": "a"}}"#, 422, "bad_json"),
        (r#"{"prompt": "no title"}"#, 422, "bad_json"),
        (r#"{"title": "x", "depends_on": ["nope"]}"#, 400, "bad_request"),
        (r#"{"title": "x", "locks": ["src/["]}"#, 400, "bad_request"),
        (r#"{"title": "x", "id": "t-alpha"}"#, 400, "bad_request"),
    ] {
        assert_eq!(error(&post(&s, "/v1/tasks", Some(body))), (status, code), "{body}");
    }
    let auth = format!("Authorization: Bearer {}", s.token);
    let (code, _) = curl(&["-X", "POST", "-H", &auth, "-d", r#"{"title": "x"}"#, &format!("{}/v1/tasks", s.url)]);
    assert_eq!(code, 415, "a body that does not say it is JSON");
    assert_eq!(error(&get(&s, "/v1/tasks?status=sleeping")), (400, "bad_query"));
    assert_eq!(error(&get(&s, "/v1/tasks?colour=red")), (400, "bad_query"));
    assert_eq!(get(&s, "/v1/tasks").1.as_array().unwrap().len(), 2, "nothing more was created");

    // The registry, the sessions and the providers.
    assert_eq!(get(&s, "/v1/agents"), (200, json!([])));
    ok(&env, &["ai", "register", "rusty", "--backend", "command", "--command", "true", "--label", "rust"]);
    let (code, agents) = get(&s, "/v1/agents");
    assert_eq!(code, 200, "{agents}");
    let cli: Value = serde_json::from_str(&ok(&env, &["ai", "list", "--json"])).unwrap();
    assert_eq!(agents, cli, "as `ai list --json`");
    assert_eq!((agents[0]["name"].as_str(), agents[0]["status"].as_str()), (Some("rusty"), Some("idle")));
    // The agent has the label the task needs, but the task waits for its dependency.
    let (_, b) = get(&s, "/v1/tasks/t-beta");
    assert!(b.get("routing").is_none(), "{b}");
    let (_, c) = post(&s, "/v1/tasks", Some(r#"{"title": "gamma", "id": "t-gamma", "agent": "nobody"}"#));
    assert_eq!(c["needs"]["agent"], "nobody", "{c}");
    let (_, c) = get(&s, "/v1/tasks/t-gamma");
    assert!(c["routing"].as_str().unwrap().contains("the task asks for agent `nobody`"), "{c}");
    assert_eq!(get(&s, "/v1/sessions"), (200, json!([])));
    let (code, providers) = get(&s, "/v1/providers");
    assert_eq!(code, 200, "{providers}");
    let cli: Value = serde_json::from_str(&ok(&env, &["providers", "--json"])).unwrap();
    let names = |v: &Value| -> Vec<String> {
        v.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(names(&providers), names(&cli), "as `providers --json`");
    let openai = providers.as_array().unwrap().iter().find(|p| p["name"] == "openai").expect("openai is listed");
    assert_eq!((openai["configured"].as_bool(), openai["check"].as_str()), (Some(true), None), "{openai}");
    assert!(env.server.requests().is_empty(), "no provider was called without `check`");
    let (code, checked) = get(&s, "/v1/providers?check=true");
    assert_eq!(code, 200, "{checked}");
    let openai = checked.as_array().unwrap().iter().find(|p| p["name"] == "openai").unwrap();
    assert_eq!(openai["check"], "ok", "checked: {openai}");
}

const POLICY: &str = "\
version: 1
rules:
  - id: approve-deploys
    effect: require_approval
    on: claim
    task_types: [deploy]
";

#[test]
fn an_executed_task_s_decisions_evidence_diff_audit_merge_and_discard_are_served() {
    let env = Env::new(|_| Reply::Stream(openai::text(&["unused"])));
    let p = env.project();
    env.git_repo(&[(".ai/policy.yaml", POLICY)]);
    env.init();
    ok(&env, &["ai", "register", "shipper", "--backend", "command", "--command", "echo shipped > shipped.txt"]);
    let s = start(&env);

    // The policy wants an approval before the deploy runs: recorded, served, approved.
    let (code, t) = post(&s, "/v1/tasks", Some(r#"{"title": "ship it", "type": "deploy", "id": "deploy-1"}"#));
    assert_eq!(code, 201, "{t}");
    let out = env.run(&["task", "execute", "deploy-1"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let (code, decisions) = get(&s, "/v1/tasks/deploy/decisions");
    assert_eq!(code, 200, "{decisions}");
    let record = &decisions[0]["record"];
    assert_eq!(decisions[0]["stream"], "deploy-1");
    assert_eq!((record["stage"].as_str(), record["decision"].as_str()), (Some("claim"), Some("require_approval")));
    assert_eq!(record["rule"], "approve-deploys");
    assert!(record["file"].as_str().unwrap().ends_with(".ai/policy.yaml"), "{record}");
    assert_eq!(record["line"], 3);
    // The same as `policy explain --json`.
    let cli: Vec<Value> = stdout(&env.run(&["policy", "explain", "deploy-1", "--json"]))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(decisions, Value::Array(cli));
    assert_eq!(post(&s, "/v1/tasks/deploy-1/approve", None).0, 200);
    let out = env.run(&["task", "execute", "deploy-1"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let (_, t) = get(&s, "/v1/tasks/deploy-1");
    assert_eq!((t["status"].as_str(), t["agent"].as_str()), (Some("done"), Some("shipper")), "{t}");
    let (code, ev) = get(&s, "/v1/tasks/deploy-1/evidence");
    assert_eq!(code, 200, "{ev}");
    assert_eq!((ev["attempt"].as_u64(), ev["succeeded"].as_bool()), (Some(1), Some(true)), "{ev:#}");
    assert_eq!(ev["files"]["changed_files"][0]["path"], "shipped.txt", "{ev:#}");
    assert!(ev["worktree"]["branch"].as_str().unwrap().starts_with("descartes/"), "{ev:#}");
    let (code, diff) = get_text(&s, "/v1/tasks/deploy-1/diff");
    assert_eq!(code, 200, "{diff}");
    assert!(diff.contains("+++ b/shipped.txt") && diff.contains("+shipped"), "{diff}");
    assert_eq!(diff, ok(&env, &["task", "diff", "deploy-1"]) + "\n");

    // Merged into the user's checkout, then discarded.
    let (code, merged) = post(&s, "/v1/tasks/deploy-1/merge", None);
    assert_eq!(code, 200, "{merged}");
    assert_eq!((merged["kind"].as_str(), merged["into"].as_str()), (Some("fast_forward"), Some("main")), "{merged}");
    assert_eq!(merged["commit"].as_str().unwrap(), git(&p, &["rev-parse", "HEAD"]));
    assert_eq!(std::fs::read_to_string(p.join("shipped.txt")).unwrap(), "shipped\n");
    let (code, discarded) = post(&s, "/v1/tasks/deploy-1/discard", None);
    assert_eq!(code, 200, "{discarded}");
    assert_eq!(discarded["branch"], merged["branch"]);
    assert!(!git(&p, &["branch", "--list", "descartes/*"]).contains("deploy-1"));
    assert_eq!(get(&s, "/v1/tasks/deploy-1/evidence").1["merged"], merged["commit"]);

    // The trail holds every step, the approval by `api` among them, and verifies.
    let (code, trail) = get(&s, "/v1/tasks/deploy-1/audit");
    assert_eq!(code, 200, "{trail}");
    assert_eq!(trail["task_id"], "deploy-1");
    assert_eq!(
        trail["verification"],
        json!({"intact": true, "records": trail["records"].as_array().unwrap().len(), "problems": []})
    );
    let records = trail["records"].as_array().unwrap();
    let kinds: Vec<&str> = records.iter().map(|r| r["record"]["kind"].as_str().unwrap()).collect();
    for k in [
        "task_created",
        "policy_decided",
        "task_approved",
        "task_claimed",
        "task_evidence",
        "task_completed",
        "task_merged",
        "task_discarded",
    ] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    let approval = records.iter().find(|r| r["record"]["kind"] == "task_approved").unwrap();
    assert_eq!(approval["event"]["data"]["by"], "api", "{approval}");
    let verified = ok(&env, &["audit", "verify"]);
    assert!(verified.starts_with("audit trail intact:"), "{verified}");
    let types = stream_types(&s, "deploy-1");
    assert!(types.ends_with(&["task_merged".to_owned(), "task_discarded".to_owned()]), "{types:?}");
}
