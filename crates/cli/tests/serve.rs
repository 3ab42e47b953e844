//! `descartes serve`: the HTTP API driven from outside the process with `curl`: the token, the
//! host and origin checks, JSON errors, runs and the event log, the live stream resumed with
//! `Last-Event-ID`, and a graceful stop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command};

use common::*;
use serde_json::Value;

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
    start_with(env, &[])
}

/// A server with extra environment variables.
fn start_with(env: &Env, vars: &[(&str, &str)]) -> Server {
    let token = stdout(&env.run(&["serve", "--print-token"])).trim().to_owned();
    assert_eq!(token.len(), 32, "{token}");
    let mut cmd = env.cmd(&["serve", "--listen", "127.0.0.1:0"]);
    cmd.envs(vars.iter().copied()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
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

fn get(s: &Server, path: &str) -> (u16, Value) {
    let auth = format!("Authorization: Bearer {}", s.token);
    let (code, body) = curl(&["-H", &auth, &format!("{}{path}", s.url)]);
    (code, serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}")))
}

fn text_model(_: &RecordedRequest) -> Reply {
    Reply::Stream(openai::text(&["the answer"]))
}

#[test]
fn the_api_needs_its_token_and_refuses_foreign_hosts_and_origins() {
    let env = Env::new(text_model);
    env.init();
    let s = start(&env);
    let url = format!("{}/v1/runs", s.url);
    let (code, body) = curl(&[&url]);
    assert_eq!(code, 401, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["code"], "unauthorized");
    assert!(err["error"]["message"].as_str().unwrap().contains("--print-token"), "{err}");
    let (code, _) = curl(&["-H", "Authorization: Bearer 0123456789abcdef0123456789abcdef", &url]);
    assert_eq!(code, 401);
    let auth = format!("Authorization: Bearer {}", s.token);
    let (code, body) = curl(&["-H", &auth, "-H", "Origin: https://evil.example", &url]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("foreign_origin"), "{body}");
    let (code, body) = curl(&["-H", &auth, "-H", "Host: attacker.example:7878", &url]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("foreign_host"), "{body}");
    let own_origin = format!("Origin: {}", s.url);
    assert_eq!(curl(&["-H", &auth, "-H", &own_origin, &url]).0, 200);

    // Bad input: a JSON error with the right status.
    let (code, body) = get(&s, "/v1/events?after=abc");
    assert_eq!((code, body["error"]["code"].as_str()), (400, Some("bad_query")), "{body}");
    let (code, body) = get(&s, "/v1/events?colour=red");
    assert_eq!(code, 400, "{body}");
    let (code, body) = get(&s, "/v1/runs/no-such-run");
    assert_eq!((code, body["error"]["code"].as_str()), (404, Some("not_found")), "{body}");
    let (code, body) = get(&s, "/v1/nothing");
    assert_eq!(code, 404, "{body}");

    // The OpenAPI document, generated from the handlers.
    let (code, doc) = get(&s, "/v1/openapi.json");
    assert_eq!(code, 200, "{doc}");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    for path in ["/v1/runs", "/v1/runs/{id}", "/v1/runs/{id}/events", "/v1/events", "/v1/events/stream"] {
        assert!(doc["paths"][path]["get"].is_object(), "{path} is documented: {doc}");
    }
    let params: Vec<&str> = doc["paths"]["/v1/events"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(params, ["after", "stream", "type", "limit"]);
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");

    // Not loopback without a token file of the user's: refused.
    let out = env.run(&["serve", "--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--token-file"), "{}", stderr(&out));
    let token_file = env.project().join(".descartes/server.token");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the token file is private");
}

#[test]
fn runs_and_the_event_log_are_served_and_streamed_with_resume() {
    let env = Env::new(text_model);
    env.init();
    assert!(env.run(&["run", "-p", "openai", "first"]).status.success());
    let s = start(&env);
    let (code, body) = get(&s, "/v1/runs");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["total"], 1);
    let id = body["runs"][0]["run_id"].as_str().unwrap().to_owned();
    assert_eq!(body["runs"][0]["status"], "completed");
    let (_, run) = get(&s, &format!("/v1/runs/{}", &id[..8]));
    assert_eq!(run["run_id"], id.as_str());

    // The log, paginated: pages of 2 cover it with no gap and no duplicate.
    let expected: Vec<i64> = env.events(&id).iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let (code, page) = get(&s, &format!("/v1/events?after={after}&limit=2"));
        assert_eq!(code, 200, "{page}");
        seen.extend(page["events"].as_array().unwrap().iter().map(|e| e["seq"].as_i64().unwrap()));
        match page["next_after"].as_i64() {
            Some(n) => after = n,
            None => break,
        }
    }
    assert_eq!(seen, expected);
    let (_, only) = get(&s, &format!("/v1/events?type=run_completed&stream={id}"));
    assert_eq!(only["events"].as_array().unwrap().len(), 1, "{only}");

    // The live stream: what is there, then what comes; a reconnect with Last-Event-ID gets
    // the rest and nothing twice.
    let auth = format!("Authorization: Bearer {}", s.token);
    let stream_url = format!("{}/v1/events/stream", s.url);
    let (_, first) = curl(&["-N", "--max-time", "2", "-H", &auth, &stream_url]);
    let ids = |text: &str| -> Vec<i64> {
        text.lines()
            .filter_map(|l| l.strip_prefix("id: ").or_else(|| l.strip_prefix("id:")))
            .map(|v| v.trim().parse().unwrap())
            .collect()
    };
    assert_eq!(ids(&first), expected, "{first}");
    assert!(env.run(&["run", "-p", "openai", "second"]).status.success());
    let last = format!("Last-Event-ID: {}", expected.last().unwrap());
    let (_, rest) = curl(&["-N", "--max-time", "2", "-H", &auth, "-H", &last, &stream_url]);
    let rest_ids = ids(&rest);
    assert!(!rest_ids.is_empty(), "{rest}");
    assert!(rest_ids.iter().all(|s| s > expected.last().unwrap()), "nothing twice: {rest_ids:?}");
    let all: Vec<i64> = {
        let (_, page) = get(&s, "/v1/events");
        page["events"].as_array().unwrap().iter().map(|e| e["seq"].as_i64().unwrap()).collect()
    };
    assert_eq!([expected.clone(), rest_ids].concat(), all, "no gap");
    assert!(rest.contains("event: run_completed"), "{rest}");
}

#[test]
fn sigterm_ends_the_streams_with_a_final_message() {
    let env = Env::new(text_model);
    env.init();
    let mut s = start(&env);
    let auth = format!("Authorization: Bearer {}", s.token);
    let stream_url = format!("{}/v1/events/stream", s.url);
    let reader = std::thread::spawn(move || curl(&["-N", "--max-time", "20", "-H", &auth, &stream_url]));
    std::thread::sleep(std::time::Duration::from_millis(700));
    signal(&s.child, "TERM");
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status}");
    let (code, body) = reader.join().unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("event: end"), "the stream ended with its final message: {body}");
}

#[test]
fn two_servers_on_one_postgresql_database_both_see_every_event() {
    let Some(db) = descartes_store_pg::testing::TestDb::create() else { return };
    let env = Env::new(text_model);
    env.init();
    let vars = [("DESCARTES_DATABASE_URL", db.url())];
    let (a, b) = (start_with(&env, &vars), start_with(&env, &vars));
    let out = env.cmd(&["run", "-p", "openai", "shared"]).envs(vars).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seqs = |s: &Server| -> (String, Vec<i64>) {
        let (_, runs) = get(s, "/v1/runs");
        assert_eq!(runs["total"], 1, "{runs}");
        let id = runs["runs"][0]["run_id"].as_str().unwrap().to_owned();
        let (_, page) = get(s, &format!("/v1/events?stream={id}"));
        (id, page["events"].as_array().unwrap().iter().map(|e| e["seq"].as_i64().unwrap()).collect())
    };
    let (id_a, seen_a) = seqs(&a);
    let (id_b, seen_b) = seqs(&b);
    assert_eq!((id_a, &seen_a), (id_b, &seen_b));
    assert!(seen_a.len() >= 4, "{seen_a:?}");
}

/// `daemon start --listen`: one process runs the workers and the API; a stop ends both.
#[test]
fn the_daemon_serves_the_api_too() {
    let env = Env::new(text_model);
    env.init();
    let token = stdout(&env.run(&["serve", "--print-token"])).trim().to_owned();
    let mut child = env.spawn(&["daemon", "start", "--foreground", "--workers", "1", "--listen", "127.0.0.1:0"]);
    // Its stderr is read to the end (a closed pipe would fail its next message).
    let stderr_pipe = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("serving the API on ").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_owned());
            }
        }
    });
    let url = rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let s = Server { child, url, token };
    let (code, body) = get(&s, "/v1/health");
    assert_eq!((code, body["ok"].as_bool()), (200, Some(true)), "{body}");
    let created = env.run(&["task", "create", "through the daemon"]);
    assert!(created.status.success(), "{}", stderr(&created));
    let (_, page) = get(&s, "/v1/events?type=task_created");
    assert_eq!(page["events"].as_array().unwrap().len(), 1, "{page}");
    let mut s = s;
    signal(&s.child, "TERM");
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status}");
    // A wrong address stops the start with a clear error.
    let out = env.run(&["daemon", "start", "--foreground", "--listen", "nowhere"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--listen nowhere"), "{}", stderr(&out));
}

fn post(s: &Server, path: &str, body: &str) -> (u16, Value) {
    let auth = format!("Authorization: Bearer {}", s.token);
    let url = format!("{}{path}", s.url);
    let (code, body) = curl(&["-X", "POST", "-H", &auth, "-H", "Content-Type: application/json", "-d", body, &url]);
    (code, serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON ({code}): {body}")))
}

/// Polls `GET path` until `done` holds for its body (at most 30 s).
fn wait_for(s: &Server, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (code, body) = get(s, path);
        if code == 200 && done(&body) {
            return body;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}: {code} {body}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn run_events(s: &Server, id: &str) -> Vec<Value> {
    get(s, &format!("/v1/runs/{id}/events?limit=1000")).1["events"].as_array().unwrap().clone()
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

/// A run started through the API asks before its shell call; the ask is an event, and the
/// run waits until a client answers it. `allow` runs the call; `deny` refuses it; an ask
/// nobody answers is denied at its timeout.
#[test]
fn a_run_started_through_the_api_waits_for_its_asks_to_be_answered() {
    let env = Env::new(shell_model("echo api-$((6*7))"));
    env.init();
    let s = start(&env);
    let (code, body) = post(&s, "/v1/runs", r#"{"prompt": "compute", "provider": "openai"}"#);
    assert_eq!(code, 201, "{body}");
    let id = body["run_id"].as_str().unwrap().to_owned();
    let asks = wait_for(&s, &format!("/v1/runs/{id}/asks"), "the ask", |b| b.as_array().is_some_and(|a| !a.is_empty()));
    assert_eq!((asks[0]["tool"].as_str(), asks[0]["call_id"].as_str()), (Some("shell"), Some("call_1")), "{asks}");
    let asked = run_events(&s, &id);
    assert_eq!(of_type(&asked, "permission_asked").len(), 1, "the ask is in the log before the answer");
    assert!(of_type(&asked, "tool_call_started").is_empty());
    // Bad answers are refused; the ask still waits.
    let (code, body) = post(&s, &format!("/v1/runs/{id}/asks/call_1"), r#"{"decision": "maybe"}"#);
    assert_eq!((code, body["error"]["code"].as_str()), (400, Some("bad_request")), "{body}");
    let (code, _) = post(&s, &format!("/v1/runs/{id}/asks/call_9"), r#"{"decision": "allow"}"#);
    assert_eq!(code, 404);
    let (code, body) = post(&s, &format!("/v1/runs/{id}/asks/call_1"), r#"{"decision": "allow"}"#);
    assert_eq!(code, 200, "{body}");
    let run = wait_for(&s, &format!("/v1/runs/{id}"), "completion", |b| b["status"] == "completed");
    assert_eq!(run["status"], "completed");
    let events = run_events(&s, &id);
    let done = of_type(&events, "tool_call_completed");
    assert!(done[0]["data"]["output"].as_str().unwrap().contains("api-42"), "{done:?}");
    let decided = of_type(&events, "permission_decided");
    assert_eq!(
        (decided[0]["data"]["decision"].as_str(), decided[0]["data"]["actor"].as_str()),
        (Some("allow"), Some("user"))
    );
    assert_log_invariants(&events);

    // Denied: the call does not run.
    let (_, body) = post(&s, "/v1/runs", r#"{"prompt": "compute", "provider": "openai"}"#);
    let id = body["run_id"].as_str().unwrap().to_owned();
    wait_for(&s, &format!("/v1/runs/{id}/asks"), "the ask", |b| b.as_array().is_some_and(|a| !a.is_empty()));
    assert_eq!(post(&s, &format!("/v1/runs/{id}/asks/call_1"), r#"{"decision": "deny"}"#).0, 200);
    wait_for(&s, &format!("/v1/runs/{id}"), "completion", |b| b["status"] == "completed");
    let events = run_events(&s, &id);
    assert!(of_type(&events, "tool_call_started").is_empty(), "the denied call did not run");
    assert_eq!(of_type(&events, "permission_decided")[0]["data"]["decision"], "deny");

    // Nobody answers: denied at the ask's timeout.
    let (_, body) = post(&s, "/v1/runs", r#"{"prompt": "compute", "provider": "openai", "ask_timeout_secs": 1}"#);
    let id = body["run_id"].as_str().unwrap().to_owned();
    wait_for(&s, &format!("/v1/runs/{id}"), "completion", |b| b["status"] == "completed");
    let events = run_events(&s, &id);
    assert_eq!(of_type(&events, "permission_asked").len(), 1);
    assert!(of_type(&events, "tool_call_started").is_empty(), "the unanswered call did not run");
}

/// Bad requests to the run routes get JSON errors with the right status; a retried POST with
/// the same `Idempotency-Key` gets the first run.
#[test]
fn run_creation_refuses_bad_input_and_honours_idempotency_keys() {
    let env = Env::new(text_model);
    env.init();
    let s = start(&env);
    for (body, status, code) in [
        ("{not json", 400, "bad_json"),
        (r#"{"prompt": "x", "bogus": 1}"#, 422, "bad_json"),
        (r#"{"prompt": 5}"#, 422, "bad_json"),
        (r#"{"prompt": "  "}"#, 400, "bad_request"),
        (r#"{"prompt": "x", "provider": "nope"}"#, 422, "config"),
        (r#"{"prompt": "x", "max_tokens": 0}"#, 400, "bad_request"),
    ] {
        let (got, answer) = post(&s, "/v1/runs", body);
        assert_eq!((got, answer["error"]["code"].as_str()), (status, Some(code)), "{body}: {answer}");
    }
    let big = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(2 * 1024 * 1024));
    let file = env.project().join("big.json");
    std::fs::write(&file, big).unwrap();
    let auth = format!("Authorization: Bearer {}", s.token);
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        &auth,
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("{}/v1/runs", s.url),
    ]);
    assert_eq!(code, 413, "{body}");
    assert_eq!(post(&s, "/v1/runs/nope/cancel", "{}").0, 404);
    assert_eq!(post(&s, "/v1/runs/nope/resume", "{}").0, 404);
    assert!(env.runs().is_empty(), "no bad request started a run");

    let keyed = |key: &str| {
        let url = format!("{}/v1/runs", s.url);
        let idem = format!("Idempotency-Key: {key}");
        let (code, body) = curl(&[
            "-X",
            "POST",
            "-H",
            &auth,
            "-H",
            &idem,
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"prompt": "say it", "provider": "openai"}"#,
            &url,
        ]);
        (code, serde_json::from_str::<Value>(&body).unwrap()["run_id"].as_str().unwrap().to_owned())
    };
    let (first_code, first) = keyed("k-1");
    let (again_code, again) = keyed("k-1");
    let (_, other) = keyed("k-2");
    assert_eq!((first_code, again_code), (201, 200));
    assert_eq!(first, again, "a retried POST does not start a second run");
    assert_ne!(first, other);
    wait_for(&s, &format!("/v1/runs/{other}"), "completion", |b| b["status"] == "completed");
    wait_for(&s, &format!("/v1/runs/{first}"), "completion", |b| b["status"] == "completed");
    assert_eq!(env.runs().len(), 2);
    // The key is in the log: a retry after the server restarted gets the same run.
    drop(s);
    let s = start(&env);
    let auth = format!("Authorization: Bearer {}", s.token);
    let (code, body) = curl(&[
        "-X",
        "POST",
        "-H",
        &auth,
        "-H",
        "Idempotency-Key: k-1",
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"prompt": "say it", "provider": "openai"}"#,
        &format!("{}/v1/runs", s.url),
    ]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["run_id"].as_str(), Some(first.as_str()));
    assert_eq!(env.runs().len(), 2, "no third run");
}

/// The server is killed (SIGKILL) while it drives a run whose shell call has run; a new server
/// resumes the run through the API, and the call's effect happened once.
#[test]
fn a_run_survives_a_killed_server_and_resumes_through_the_api_with_its_effect_once() {
    let env = Env::new(|req: &RecordedRequest| {
        if req.tool_results().is_empty() {
            let args = serde_json::json!({"command": "echo once >> effect.txt"}).to_string();
            return Reply::Stream(openai::tool_call("call_1", "shell", &[&args]));
        }
        // The model takes its time after the tool result: the server is killed meanwhile.
        std::thread::sleep(std::time::Duration::from_secs(2));
        Reply::Stream(openai::text(&["all done"]))
    });
    env.init();
    let mut s = start(&env);
    let (code, body) = post(&s, "/v1/runs", r#"{"prompt": "append", "provider": "openai", "auto_approve": true}"#);
    assert_eq!(code, 201, "{body}");
    let id = body["run_id"].as_str().unwrap().to_owned();
    wait_for(&s, &format!("/v1/runs/{id}/events?limit=1000"), "the tool result", |b| {
        b["events"].as_array().unwrap().iter().any(|e| e["type"] == "tool_call_completed")
    });
    s.child.kill().unwrap();
    s.child.wait().unwrap();

    let s = start(&env);
    let run = wait_for(&s, &format!("/v1/runs/{id}"), "the run", |_| true);
    assert_eq!(run["status"], "interrupted", "{run}");
    // The run's stream: every event, then one terminal frame.
    let (code, body) = run_stream(&s, &id);
    assert_eq!(code, 200);
    assert_eq!(body.matches("event: interrupted").count(), 1, "{body}");
    assert_eq!(terminal_frames(&body), 1, "{body}");
    let (code, body) = post(&s, &format!("/v1/runs/{id}/resume"), "{}");
    assert_eq!(code, 202, "{body}");
    let (code, _) = post(&s, &format!("/v1/runs/{id}/resume"), "{}");
    assert_eq!(code, 409, "a run that is running is not resumed twice");
    wait_for(&s, &format!("/v1/runs/{id}"), "completion", |b| b["status"] == "completed");
    let effect = std::fs::read_to_string(env.project().join("effect.txt")).unwrap();
    assert_eq!(effect, "once\n", "the tool's effect happened once");
    let (_, body) = run_stream(&s, &id);
    let last = format!("data: {{\"type\":\"run_ended\",\"run_id\":\"{id}\",\"status\":\"completed\"}}");
    assert!(body.trim_end().ends_with(&last), "{body}");
    assert_eq!(terminal_frames(&body), 1, "one terminal frame, though the run was interrupted once: {body}");
    let events = run_events(&s, &id);
    assert_eq!(of_type(&events, "tool_call_started").len(), 1);
    assert_eq!(of_type(&events, "run_resumed").len(), 1);
    assert_log_invariants(&events);
}

/// A front end over the WebSocket, with a real client (Python's `websockets`): it starts a run,
/// gets its events and deltas, drops the connection at the run's ask, reconnects with its last
/// seq, answers the ask and sees the run complete; across both connections it received every
/// event of the run once, in order.
#[test]
fn a_websocket_client_starts_a_run_answers_its_ask_and_reconnects_without_a_gap() {
    if !descartes_test_support::python::websockets() {
        return;
    }
    let env = Env::new(shell_model("echo ws-$((3*4))"));
    env.init();
    let s = start(&env);
    let client = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/ws_run.py");
    let url = s.url.replacen("http://", "ws://", 1) + "/v1/ws";
    let out = Command::new("python3").arg(&client).args([&url, &s.token, "compute"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = seen["run_id"].as_str().unwrap();
    let run = wait_for(&s, &format!("/v1/runs/{id}"), "completion", |b| b["status"] == "completed");
    assert_eq!(run["status"], "completed");
    let events = run_events(&s, id);
    let all: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    let got: Vec<i64> = seen["seqs"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(got, all, "every event of the run, once, in order, across the reconnect");
    assert!(seen["deltas"].as_str().unwrap().contains("ws-12"), "the answer streamed as deltas: {seen}");
    let kinds: Vec<&str> = seen["kinds"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    assert!(kinds.contains(&"answered") && kinds.contains(&"run_started"), "{kinds:?}");
    let done = of_type(&events, "tool_call_completed");
    assert!(done[0]["data"]["output"].as_str().unwrap().contains("ws-12"));
    assert_eq!(of_type(&events, "permission_decided")[0]["data"]["actor"], "user");
    assert_log_invariants(&events);
}

/// SIGTERM while the server drives a run that waits for an ask: the run is stopped cleanly
/// (`run_cancelled`, nothing run), and a new server resumes it to completion.
#[test]
fn sigterm_leaves_the_runs_of_the_server_resumable() {
    let env = Env::new(shell_model("echo after-$((5*5))"));
    env.init();
    let mut s = start(&env);
    let (code, body) = post(&s, "/v1/runs", r#"{"prompt": "compute", "provider": "openai"}"#);
    assert_eq!(code, 201, "{body}");
    let id = body["run_id"].as_str().unwrap().to_owned();
    wait_for(&s, &format!("/v1/runs/{id}/asks"), "the ask", |b| b.as_array().is_some_and(|a| !a.is_empty()));
    signal(&s.child, "TERM");
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status}");
    let events = env.events(&id);
    assert_eq!(count(&events, "run_cancelled"), 1, "stopped cleanly");
    assert_eq!(count(&events, "tool_call_started"), 0, "the asked call did not run");

    let s = start(&env);
    let (code, body) = post(&s, &format!("/v1/runs/{id}/resume"), r#"{"auto_approve": true}"#);
    assert_eq!(code, 202, "{body}");
    wait_for(&s, &format!("/v1/runs/{id}"), "completion", |b| b["status"] == "completed");
    let events = run_events(&s, &id);
    let done = of_type(&events, "tool_call_completed");
    assert!(done.iter().any(|d| d["data"]["output"].as_str().unwrap().contains("after-25")), "{done:?}");
    assert_log_invariants(&events);
}

/// `GET /v1/runs/{id}/stream` to its end (at most 20 s).
fn run_stream(s: &Server, id: &str) -> (u16, String) {
    let auth = format!("Authorization: Bearer {}", s.token);
    curl(&["-N", "--max-time", "20", "-H", &auth, &format!("{}/v1/runs/{id}/stream", s.url)])
}

/// How many terminal frames a run's stream holds.
fn terminal_frames(body: &str) -> usize {
    ["completed", "failed", "cancelled", "budget_exceeded", "interrupted"]
        .iter()
        .map(|k| body.matches(&format!("event: {k}\n")).count())
        .sum()
}

/// `POST path` with extra headers (`Name: value`), from any thread.
fn post_to(url: &str, token: &str, path: &str, body: &str, headers: &[String]) -> (u16, Value) {
    let auth = format!("Authorization: Bearer {token}");
    let url = format!("{url}{path}");
    let mut args = vec!["-X", "POST", "-H", &auth, "-H", "Content-Type: application/json", "-d", body];
    for h in headers {
        args.extend(["-H", h.as_str()]);
    }
    args.push(&url);
    let (code, body) = curl(&args);
    (code, serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON ({code}): {body}")))
}

#[test]
fn two_servers_on_one_postgresql_database_start_one_run_per_idempotency_key() {
    let Some(db) = descartes_store_pg::testing::TestDb::create() else { return };
    let env = Env::new(text_model);
    env.init();
    let vars = [("DESCARTES_DATABASE_URL", db.url())];
    let (a, b) = (start_with(&env, &vars), start_with(&env, &vars));
    const ROUNDS: usize = 6;
    for round in 0..ROUNDS {
        // The same request to both servers at once, as a client retrying through a balancer.
        let key = vec![format!("Idempotency-Key: shared-{round}")];
        let body = format!(r#"{{"prompt": "round {round}", "provider": "openai"}}"#);
        let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
            let calls: Vec<_> = [&a, &b]
                .iter()
                .map(|s| {
                    let (url, token, body, key) = (s.url.clone(), s.token.clone(), body.clone(), key.clone());
                    scope.spawn(move || post_to(&url, &token, "/v1/runs", &body, &key))
                })
                .collect();
            calls.into_iter().map(|c| c.join().unwrap()).collect()
        });
        let mut codes: Vec<u16> = answers.iter().map(|(c, _)| *c).collect();
        codes.sort();
        assert_eq!(codes, [200, 201], "one started it, the other got its run: {answers:?}");
        assert_eq!(answers[0].1["run_id"], answers[1].1["run_id"], "{answers:?}");
    }
    let runs = wait_for(&a, "/v1/runs", "every run done", |b| {
        b["runs"].as_array().unwrap().iter().all(|r| r["status"] == "completed")
    });
    assert_eq!(runs["total"], ROUNDS, "one run per key: {runs}");
    let (_, seen_by_b) = get(&b, "/v1/runs");
    assert_eq!(seen_by_b["total"], ROUNDS);
}

/// A model whose answers take about a second (three pieces, 300 ms apart) and quote the
/// user's last message.
fn slow_echo(req: &RecordedRequest) -> Reply {
    let text = req.last_user_text().unwrap_or_default();
    let pieces = ["answer ", "to: ", text.as_str()];
    Reply::Stream(with_delay(openai::text(&pieces), std::time::Duration::from_millis(300)))
}

/// The `seq`-ordered texts of the user's messages in a session's events.
fn user_messages(events: &[Value]) -> Vec<String> {
    of_type(events, "message")
        .iter()
        .filter(|e| e["data"]["role"] == "user")
        .map(|e| {
            let content = &e["data"]["content"];
            match content.as_str() {
                Some(t) => t.to_owned(),
                None => content.as_array().into_iter().flatten().filter_map(|p| p["text"].as_str()).collect(),
            }
        })
        .collect()
}

#[test]
fn a_session_takes_messages_while_busy_as_on_busy_says() {
    let env = Env::new(slow_echo);
    env.init();
    let s = start(&env);
    let (code, body) = post(&s, "/v1/sessions", r#"{"message": "first", "provider": "openai"}"#);
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["status"], "started");
    let id = body["session_id"].as_str().unwrap().to_owned();
    let messages = format!("/v1/sessions/{id}/messages");

    // While the first turn streams: reject (the default), then two queued in order.
    let (code, body) = post(&s, &messages, r#"{"message": "not now"}"#);
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"]["code"], "conflict", "{body}");
    let (code, body) = post(&s, &messages, r#"{"message": "not now either", "on_busy": "reject"}"#);
    assert_eq!(code, 409, "{body}");
    let (code, body) = post(&s, &messages, r#"{"message": "second", "on_busy": "enqueue"}"#);
    assert_eq!((code, &body["status"], &body["position"]), (202, &Value::from("queued"), &Value::from(1)), "{body}");
    let (code, body) = post(&s, &messages, r#"{"message": "third", "on_busy": "enqueue"}"#);
    assert_eq!((code, &body["position"]), (202, &Value::from(2)), "{body}");
    let (code, body) = post(&s, &messages, r#"{"message": "x", "on_busy": "later"}"#);
    assert_eq!(code, 400, "{body}");
    let events_path = format!("/v1/runs/{id}/events?limit=1000");
    let turns_done = |n: usize| move |b: &Value| of_type(b["events"].as_array().unwrap(), "run_completed").len() == n;
    let page = wait_for(&s, &events_path, "three turns", turns_done(3));
    let events = page["events"].as_array().unwrap().clone();
    assert_eq!(user_messages(&events), ["first", "second", "third"], "in order, the rejected ones left out");

    // Idle again: a message starts at once, whatever `on_busy`; an interrupt stops it.
    let (code, body) = post(&s, &messages, r#"{"message": "fourth", "on_busy": "interrupt"}"#);
    assert_eq!((code, &body["status"]), (202, &Value::from("started")), "{body}");
    std::thread::sleep(std::time::Duration::from_millis(400));
    let (code, body) = post(&s, &messages, r#"{"message": "fifth", "on_busy": "interrupt"}"#);
    assert_eq!((code, &body["status"]), (202, &Value::from("interrupting")), "{body}");
    let page = wait_for(&s, &events_path, "the fifth turn", turns_done(4));
    let events = page["events"].as_array().unwrap().clone();
    assert_eq!(user_messages(&events), ["first", "second", "third", "fourth", "fifth"]);
    let cancelled = of_type(&events, "run_cancelled");
    assert_eq!(cancelled.len(), 1, "{cancelled:?}");
    assert_eq!(cancelled[0]["data"]["reason"], "interrupted by a newer message");
    let last = events.last().unwrap();
    assert_eq!(last["type"], "run_completed", "{last}");
    assert!(last["data"]["result"].as_str().unwrap().contains("fifth"), "{last}");

    // The session's stream: every turn, and it stays open for the next ones.
    let auth = format!("Authorization: Bearer {}", s.token);
    let url = format!("{}/v1/sessions/{id}/stream", s.url);
    let (code, body) = curl(&["-N", "--max-time", "2", "-H", &auth, &url]);
    assert_eq!(code, 200);
    assert_eq!(body.matches("event: run_completed\n").count(), 4, "{body}");
    assert_eq!(body.matches("event: run_cancelled\n").count(), 1, "{body}");
    let (code, _) = post(&s, "/v1/sessions/nope/messages", r#"{"message": "hi"}"#);
    assert_eq!(code, 404);
    let (code, _) = post(&s, "/v1/sessions", r#"{"message": "hi", "surprise": 1}"#);
    assert_eq!(code, 422);
}

#[test]
fn an_interrupted_turn_ends_its_streams_with_interrupted() {
    let env = Env::new(slow_echo);
    env.init();
    let s = start(&env);
    let (code, body) = post(&s, "/v1/sessions", r#"{"message": "long", "provider": "openai"}"#);
    assert_eq!(code, 201, "{body}");
    let id = body["session_id"].as_str().unwrap().to_owned();
    // The run's stream, joined while the turn streams: the interrupt ends it.
    let (url, token, id2) = (s.url.clone(), s.token.clone(), id.clone());
    let reader = std::thread::spawn(move || {
        let auth = format!("Authorization: Bearer {token}");
        curl(&["-N", "--max-time", "20", "-H", &auth, &format!("{url}/v1/runs/{id2}/stream")])
    });
    std::thread::sleep(std::time::Duration::from_millis(400));
    let (code, body) =
        post(&s, &format!("/v1/sessions/{id}/messages"), r#"{"message": "now", "on_busy": "interrupt"}"#);
    assert_eq!((code, &body["status"]), (202, &Value::from("interrupting")), "{body}");
    let (code, body) = reader.join().unwrap();
    assert_eq!(code, 200);
    assert_eq!(terminal_frames(&body), 1, "{body}");
    let last = format!("data: {{\"type\":\"run_ended\",\"run_id\":\"{id}\",\"status\":\"interrupted\"}}");
    assert!(body.trim_end().ends_with(&last), "{body}");
}
