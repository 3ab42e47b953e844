//! `/v1/ws` with a real WebSocket client: `tests/ws_client.py` (Python's `websockets`), driven
//! line by line from here. Without `websockets` the tests skip loudly, unless
//! `DESCARTES_TEST_REQUIRE_WS=1`, which makes them fail. No network: the server listens on
//! 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use descartes_core::EventStore;
use descartes_protocol::{EventData, NewEvent, RunCancelled, RunId};
use descartes_server::{ApiState, serve};
use descartes_store::{MemoryEventStore, SqliteEventStore, SqliteOptions};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ws_client.py")
}

/// Whether the Python client can run (see `descartes_test_support::python`).
fn python_ready() -> bool {
    descartes_test_support::python::websockets()
}

/// The API served on 127.0.0.1 over `store`, stopped by `stop`.
struct Server {
    addr: SocketAddr,
    state: ApiState,
    store: Arc<dyn EventStore>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(store: Arc<dyn EventStore>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        let state = ApiState::new(store.clone(), TOKEN.into(), addr, Arc::new(|s| s.status.clone()), rx);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serve(listener, state.clone(), shutdown, async move {
            let _ = stopped.await;
        }));
        Self { addr, state, store, stop: Some(stop), served }
    }

    fn url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    async fn append(&self, events: Vec<NewEvent>) -> Vec<i64> {
        self.store.append(events).await.unwrap().iter().map(|e| e.seq).collect()
    }

    /// Every event of the log as its JSON, in `seq` order.
    async fn log(&self) -> Vec<Value> {
        self.store.read_all(0, 100_000).await.unwrap().iter().map(|e| serde_json::to_value(e).unwrap()).collect()
    }

    /// A client connected with the token in `Authorization`.
    async fn client(&self) -> Py {
        let mut py = Py::spawn();
        let answer = py.call(json!({"op": "connect", "url": self.url(), "token": TOKEN, "via": "header"})).await;
        assert_eq!(answer["ok"], true, "{answer}");
        py
    }
}

/// An event of `stream` with type `kind` (one this build may not know: kept verbatim).
fn event(stream: &str, kind: &str, n: usize) -> NewEvent {
    let data = match kind {
        "run_cancelled" => EventData::from(RunCancelled { reason: format!("#{n}") }),
        _ => EventData::Unknown { kind: kind.into(), data: json!({"n": n}) },
    };
    NewEvent::new(&RunId::from(stream), data)
}

/// The Python client, one command a line.
struct Py {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Py {
    fn spawn() -> Self {
        let mut command = Command::new("python3");
        command.arg(script()).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
        for proxy in ["http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
            command.env_remove(proxy);
        }
        let mut child = command.kill_on_drop(true).spawn().expect("python3 runs");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, stdin, stdout }
    }

    async fn call(&mut self, command: Value) -> Value {
        self.stdin.write_all(format!("{command}\n").as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
        let line = tokio::time::timeout(Duration::from_secs(60), self.stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("the Python client did not answer {command}"))
            .unwrap()
            .unwrap_or_else(|| panic!("the Python client stopped on {command} (its stderr is above)"));
        serde_json::from_str(&line).unwrap()
    }

    async fn send(&mut self, frame: Value) {
        assert_eq!(self.call(json!({"op": "send_json", "frame": frame})).await["ok"], true);
    }

    /// The next frame (panics on a close or a timeout).
    async fn recv(&mut self) -> Value {
        let got = self.call(json!({"op": "recv", "timeout": 10})).await;
        got.get("frame").cloned().unwrap_or_else(|| panic!("expected a frame, got {got}"))
    }

    /// Subscribes and checks the answer.
    async fn subscribe(&mut self, frame: Value) {
        let after = frame["after"].as_i64().unwrap_or(0);
        self.send(frame).await;
        assert_eq!(self.recv().await, json!({"type": "subscribed", "after": after}));
    }

    /// The frames up to the one carrying the event `seq`.
    async fn collect_until(&mut self, seq: i64) -> Vec<Value> {
        let got = self.call(json!({"op": "collect", "until_seq": seq, "timeout": 30})).await;
        assert!(got.get("closed").is_none() && got.get("timeout").is_none(), "stopped early: {got}");
        got["frames"].as_array().unwrap().clone()
    }

    async fn exit(mut self) {
        let _ = self.stdin.write_all(b"{\"op\": \"exit\"}\n").await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// The events the `event` frames among `frames` carry.
fn events_of(frames: &[Value]) -> Vec<Value> {
    frames.iter().filter(|f| f["type"] == "event").map(|f| f["event"].clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_is_guarded_like_every_route() {
    if !python_ready() {
        return;
    }
    let server = Server::start(Arc::new(MemoryEventStore::new())).await;
    let mut py = Py::spawn();
    let url = server.url();
    let refused = [
        (json!({"op": "connect", "url": url, "via": "none"}), 401),
        (json!({"op": "connect", "url": url, "via": "header", "token": "wrong"}), 401),
        (json!({"op": "connect", "url": url, "via": "subprotocol", "token": "wrong"}), 401),
        (json!({"op": "connect", "url": url, "via": "header", "token": TOKEN, "origin": "http://evil.example"}), 403),
        (
            json!({"op": "connect", "url": url, "via": "subprotocol", "token": TOKEN, "origin": "https://evil.example"}),
            403,
        ),
    ];
    for (connect, status) in refused {
        let answer = py.call(connect.clone()).await;
        assert_eq!(answer["ok"], false, "{connect} was accepted");
        assert_eq!(answer["status"], status, "{connect}: {answer}");
        let body: Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
        assert!(body["error"]["code"].is_string(), "a JSON error: {body}");
    }
    // The token as the subprotocol `bearer.TOKEN` (what a browser can send), echoed back.
    let own_origin = format!("http://{}", server.addr);
    let answer =
        py.call(json!({"op": "connect", "url": url, "via": "subprotocol", "token": TOKEN, "origin": own_origin})).await;
    assert_eq!(answer, json!({"ok": true, "subprotocol": format!("bearer.{TOKEN}")}));
    py.send(json!({"type": "ping"})).await;
    assert_eq!(py.recv().await, json!({"type": "pong"}));
    assert_eq!(py.call(json!({"op": "close"})).await["ok"], true);
    // The header: no subprotocol.
    let answer = py.call(json!({"op": "connect", "url": url, "via": "header", "token": TOKEN})).await;
    assert_eq!(answer, json!({"ok": true, "subprotocol": null}));
    py.exit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_gets_exactly_its_events_in_order_then_live_ones() {
    if !python_ready() {
        return;
    }
    let server = Server::start(Arc::new(MemoryEventStore::new())).await;
    // Types this build does not know (kept verbatim) but `run_cancelled`; `tasks` is no `task_*`.
    let kinds = ["note", "run_cancelled", "task_note", "task_tick", "tasks", "run_finished"];
    let history: Vec<NewEvent> =
        (0..60).map(|n| event(if n % 3 == 0 { "r2" } else { "r1" }, kinds[n % kinds.len()], n)).collect();
    server.append(history).await;
    let wanted = |e: &Value| {
        e["run_id"] == "r1" && (e["type"] == "run_cancelled" || e["type"].as_str().unwrap().starts_with("task_"))
    };

    let mut py = server.client().await;
    py.subscribe(json!({"type": "subscribe", "stream": "r1", "types": ["run_cancelled", "task_*"]})).await;
    let expected: Vec<Value> = server.log().await.into_iter().filter(wanted).collect();
    assert!(expected.len() > 10, "the filter leaves some out and keeps some");
    let last = expected.last().unwrap()["seq"].as_i64().unwrap();
    let frames = py.collect_until(last).await;
    assert!(frames.iter().all(|f| f["type"] == "event"), "{frames:?}");
    // Exactly the log's JSON of each matching event, the same object `/v1/events` holds.
    assert_eq!(events_of(&frames), expected);

    // Live: appended now, after non-matching ones (other stream, other type).
    server.append(vec![event("r2", "task_note", 100), event("r1", "note", 101)]).await;
    let seqs = server.append(vec![event("r1", "task_note", 102)]).await;
    let live = py.recv().await;
    assert_eq!(live["type"], "event");
    assert_eq!(live["event"]["seq"], seqs[0], "the next frame is the next matching event: {live}");
    assert_eq!(live["event"]["data"], json!({"n": 102}));

    // Resubscribing replaces the subscription: from `after`, another filter.
    py.subscribe(json!({"type": "subscribe", "after": seqs[0] - 1, "types": ["task_note"]})).await;
    assert_eq!(py.recv().await["event"]["seq"], seqs[0]);
    py.send(json!({"type": "unsubscribe"})).await;
    assert_eq!(py.recv().await, json!({"type": "unsubscribed"}));
    server.append(vec![event("r1", "task_note", 103)]).await;
    py.send(json!({"type": "ping"})).await;
    assert_eq!(py.recv().await, json!({"type": "pong"}), "nothing more once unsubscribed");
    py.exit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_with_its_last_seq_misses_nothing_while_events_are_appended() {
    if !python_ready() {
        return;
    }
    // The real log: SQLite, with its group commit and its wake-ups.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteEventStore::open(&dir.path().join("events.db"), SqliteOptions::default()).unwrap());
    let server = Server::start(store.clone()).await;
    server.append((0..50).map(|n| event(if n % 2 == 0 { "r1" } else { "r2" }, "task_note", n)).collect()).await;

    // Appends go on while the client reads, drops and comes back.
    let appender = {
        let store = store.clone();
        tokio::spawn(async move {
            for batch in 0..40 {
                let events =
                    (0..5).map(|i| event(if i % 2 == 0 { "r1" } else { "r2" }, "task_note", 1000 + batch * 5 + i));
                store.append(events.collect()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            store.append(vec![event("r1", "run_cancelled", 9999)]).await.unwrap()[0].seq
        })
    };
    let mut received = Vec::new();
    let mut py = server.client().await;
    py.subscribe(json!({"type": "subscribe", "stream": "r1"})).await;
    let got = py.call(json!({"op": "collect", "events": 40, "timeout": 30})).await;
    received.extend(events_of(got["frames"].as_array().unwrap()));
    assert_eq!(received.len(), 40, "{got}");
    py.exit().await;

    // Reconnect with `after` = the last seq received, mid-appends.
    let after = received.last().unwrap()["seq"].as_i64().unwrap();
    let mut py = server.client().await;
    py.subscribe(json!({"type": "subscribe", "stream": "r1", "after": after})).await;
    let last = appender.await.unwrap();
    let frames = py.collect_until(last).await;
    received.extend(events_of(&frames));
    py.exit().await;

    let expected: Vec<Value> = server.log().await.into_iter().filter(|e| e["run_id"] == "r1").collect();
    let seqs = |v: &[Value]| v.iter().map(|e| e["seq"].as_i64().unwrap()).collect::<Vec<_>>();
    assert_eq!(seqs(&received), seqs(&expected), "every event of r1 once, in order");
    assert_eq!(received, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_error_frames_and_the_subscription_goes_on() {
    if !python_ready() {
        return;
    }
    let server = Server::start(Arc::new(MemoryEventStore::new())).await;
    let first = server.append((0..5).map(|n| event("r1", "note", n)).collect()).await;
    let mut py = server.client().await;
    py.subscribe(json!({"type": "subscribe", "stream": "r1"})).await;
    assert_eq!(events_of(&py.collect_until(*first.last().unwrap()).await).len(), 5);

    let huge = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(1536 * 1024));
    let garbage = [
        (json!({"op": "send", "text": "this is not JSON"}), "bad_frame"),
        (json!({"op": "send", "text": "[1, 2]"}), "bad_frame"),
        (json!({"op": "send", "text": "{\"type\": 7}"}), "bad_frame"),
        (json!({"op": "send", "text": "{\"type\": \"subscribe\", \"stream\": \"r2\", \"bogus\": 1}"}), "bad_frame"),
        (json!({"op": "send", "text": "{\"type\": \"subscribe\", \"after\": \"soon\"}"}), "bad_frame"),
        (json!({"op": "send", "text": "{\"type\": \"start_rocket\"}"}), "unknown_type"),
        (json!({"op": "send_binary", "hex": "00ff10"}), "bad_frame"),
        (json!({"op": "send", "text": huge}), "too_big"),
    ];
    let mut appended = Vec::new();
    for (n, (command, _)) in garbage.iter().enumerate() {
        assert_eq!(py.call(command.clone()).await["ok"], true);
        appended.extend(server.append(vec![event("r1", "note", 100 + n)]).await);
    }
    // Errors answer the frames in order; events come as appended; `pong` follows every error.
    py.send(json!({"type": "ping"})).await;
    let mut frames = Vec::new();
    let last = *appended.last().unwrap();
    while !(frames.contains(&json!({"type": "pong"})) && events_of(&frames).iter().any(|e| e["seq"] == last)) {
        frames.push(py.recv().await);
    }
    let errors: Vec<&Value> = frames.iter().filter(|f| f["type"] == "error").collect();
    let codes: Vec<&str> = errors.iter().map(|f| f["code"].as_str().unwrap()).collect();
    assert_eq!(codes, garbage.iter().map(|(_, code)| *code).collect::<Vec<_>>(), "{errors:?}");
    assert!(errors.iter().all(|f| f["message"].as_str().is_some_and(|m| !m.is_empty() && m.len() < 1000)));
    let seqs: Vec<i64> = events_of(&frames).iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, appended, "the subscription (stream r1) kept delivering, nothing replaced it");
    let pong = frames.iter().position(|f| f["type"] == "pong").unwrap();
    assert!(frames[pong + 1..].iter().all(|f| f["type"] == "event"), "pong after every error: {frames:?}");

    // Past the hard limit a frame cannot be skipped: the socket closes (1009), the server stays.
    let enormous = "x".repeat(descartes_server::ws::WS_HARD_LIMIT + 1);
    py.call(json!({"op": "send", "text": enormous})).await;
    let mut last = py.call(json!({"op": "recv", "timeout": 10})).await;
    let mut before_close = Vec::new();
    while let Some(frame) = last.get("frame") {
        before_close.push(frame.clone());
        last = py.call(json!({"op": "recv", "timeout": 10})).await;
    }
    // (The error and the close code may be lost if the connection is reset under the sender.)
    assert_eq!(last["closed"], true, "{last}");
    assert!(last["code"] == 1009 || last["code"].is_null(), "{last}");
    assert!(before_close.iter().all(|f| f["type"] == "error" && f["code"] == "too_big"), "{before_close:?}");
    py.exit().await;
    let mut py = server.client().await;
    py.send(json!({"type": "ping"})).await;
    assert_eq!(py.recv().await, json!({"type": "pong"}));
    py.exit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_reach_the_subscribers_of_their_run() {
    if !python_ready() {
        return;
    }
    let server = Server::start(Arc::new(MemoryEventStore::new())).await;
    let mut r1 = server.client().await;
    r1.subscribe(json!({"type": "subscribe", "stream": "r1"})).await;
    let mut r2 = server.client().await;
    r2.subscribe(json!({"type": "subscribe", "stream": "r2"})).await;
    let mut all = server.client().await;
    all.subscribe(json!({"type": "subscribe"})).await;
    let mut quiet = server.client().await;
    quiet.subscribe(json!({"type": "subscribe", "stream": "r1", "deltas": false})).await;
    let mut idle = server.client().await;

    assert_eq!(server.state.publish_delta("r2", json!({"kind": "thinking", "text": "hmm"})), 3);
    assert_eq!(server.state.publish_delta("r1", json!({"kind": "text", "text": "Hello"})), 3);
    let d1 = json!({"type": "delta", "run_id": "r1", "kind": "text", "text": "Hello"});
    let d2 = json!({"type": "delta", "run_id": "r2", "kind": "thinking", "text": "hmm"});
    assert_eq!(r1.recv().await, d1, "r2's delta skipped, r1's delivered");
    assert_eq!(r2.recv().await, d2);
    assert_eq!(all.recv().await, d2);
    assert_eq!(all.recv().await, d1);
    for py in [&mut r1, &mut r2, &mut all, &mut quiet, &mut idle] {
        py.send(json!({"type": "ping"})).await;
        assert_eq!(py.recv().await, json!({"type": "pong"}), "nothing else");
    }
    for py in [r1, r2, all, quiet, idle] {
        py.exit().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_shutdown_every_socket_gets_end_and_is_closed() {
    if !python_ready() {
        return;
    }
    let mut server = Server::start(Arc::new(MemoryEventStore::new())).await;
    let seqs = server.append((0..3).map(|n| event("r1", "note", n)).collect()).await;
    let mut subscribed = server.client().await;
    subscribed.subscribe(json!({"type": "subscribe"})).await;
    assert_eq!(events_of(&subscribed.collect_until(seqs[2]).await).len(), 3);
    let mut idle = server.client().await;
    idle.send(json!({"type": "ping"})).await;
    assert_eq!(idle.recv().await, json!({"type": "pong"}));

    server.stop.take().unwrap().send(()).unwrap();
    for py in [&mut subscribed, &mut idle] {
        let end = py.recv().await;
        assert_eq!(end["type"], "end", "{end}");
        assert!(end["message"].as_str().unwrap().contains("shutting down"));
        let closed = py.call(json!({"op": "recv", "timeout": 10})).await;
        assert_eq!(closed["closed"], true, "{closed}");
        assert_eq!(closed["code"], 1001, "going away: {closed}");
    }
    let served = tokio::time::timeout(Duration::from_secs(10), &mut server.served).await;
    assert!(matches!(served, Ok(Ok(Ok(())))), "serve returned: {served:?}");
    subscribed.exit().await;
    idle.exit().await;
}
