//! Server-Sent Events and the WebSocket carry identical frames: the SSE `data:` of an event, a
//! delta and a run's terminal frame is, byte for byte, the WebSocket's text frame for it; and a
//! filter (stream, type) selects the same events on a first connect, on a rejoin with a cursor
//! (`after` / `Last-Event-ID`) and live.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use descartes_core::EventStore;
use descartes_protocol::{EventData, NewEvent, RunCompleted, RunId, RunStarted};
use descartes_server::{ApiState, serve};
use descartes_store::MemoryEventStore;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Server {
    addr: SocketAddr,
    state: ApiState,
    store: Arc<dyn EventStore>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

async fn server() -> Server {
    let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, rx) = tokio::sync::watch::channel(false);
    let state = ApiState::new(store.clone(), TOKEN.into(), addr, Arc::new(|s| s.status.clone()), rx);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, state.clone(), shutdown, async move {
        let _ = stopped.await;
    }));
    Server { addr, state, store, _shutdown: stop }
}

fn started() -> RunStarted {
    RunStarted {
        prompt: "p".into(),
        provider: "openai".into(),
        model: "m".into(),
        cwd: "/w".into(),
        max_turns: 10,
        auto_approve: false,
        system_prompt: None,
        tools: Vec::new(),
        pid: 1,
        version: "test".into(),
        budget: Default::default(),
    }
}

fn other(stream: &str, kind: &str, n: usize) -> NewEvent {
    NewEvent::new(&RunId::from(stream), EventData::Unknown { kind: kind.into(), data: json!({"n": n}) })
}

async fn ws(addr: SocketAddr) -> Socket {
    let mut request = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

/// The next `n` text frames that are not `subscribed` (5 s at most each).
async fn ws_frames(socket: &mut Socket, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next()).await.expect("a frame in time");
        let Some(Ok(Message::Text(text))) = message else { continue };
        if !text.as_str().contains(r#""type":"subscribed""#) {
            out.push(text.as_str().to_owned());
        }
    }
    out
}

async fn subscribe(socket: &mut Socket, frame: Value) {
    socket.send(Message::text(frame.to_string())).await.unwrap();
}

/// An SSE stream: (event name, data) of each frame, read as they come.
struct Sse {
    body: futures::stream::BoxStream<'static, reqwest::Result<Vec<u8>>>,
    buffer: String,
}

impl Sse {
    async fn open(addr: SocketAddr, path: &str, last_event_id: Option<i64>) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut request = client.get(format!("http://{addr}{path}")).bearer_auth(TOKEN);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        Self { body: response.bytes_stream().map(|r| r.map(|b| b.to_vec())).boxed(), buffer: String::new() }
    }

    /// The next `n` frames (comments, the keep-alives, skipped).
    async fn frames(&mut self, n: usize) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while out.len() < n {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let field =
                    |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim_start().to_owned());
                if let Some(data) = field("data:") {
                    out.push((field("event:").unwrap_or_default(), data));
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(5), self.body.next()).await.expect("a frame in time");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap().unwrap()));
        }
        out
    }
}

fn datas(frames: &[(String, String)]) -> Vec<String> {
    frames.iter().map(|(_, d)| d.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_and_websocket_carry_the_same_frames_with_the_same_filters() {
    let s = server().await;
    let r1 = RunId::from("r1");
    s.store.append(vec![NewEvent::new(&r1, started())]).await.unwrap();
    for n in 0..6 {
        s.store
            .append(vec![other("r1", "note_added", n), other("r2", "note_added", n), other("r2", "tick", n)])
            .await
            .unwrap();
    }

    // One stream; one type over every stream. Each on a first connect, then on a rejoin after
    // its second frame, then live.
    for (query, sub) in [
        ("stream=r1", json!({"stream": "r1"})),
        ("type=note_added", json!({"types": ["note_added"]})),
        ("stream=r2&type=tick", json!({"stream": "r2", "types": ["tick"]})),
    ] {
        let log = s.store.read_all(0, 1000).await.unwrap();
        let expected: Vec<&descartes_protocol::Event> = log
            .iter()
            .filter(|e| {
                let stream_ok = sub.get("stream").is_none_or(|st| e.run_id.as_str() == st);
                let type_ok = sub.get("types").is_none_or(|t| t[0] == e.kind());
                stream_ok && type_ok
            })
            .collect();
        let n = expected.len();
        assert!(n >= 6, "{query}: {n}");

        let mut first = sub.clone();
        first["type"] = json!("subscribe");
        first["after"] = json!(0);
        first["deltas"] = json!(false);
        let mut socket = ws(s.addr).await;
        subscribe(&mut socket, first.clone()).await;
        let from_ws = ws_frames(&mut socket, n).await;
        let mut sse = Sse::open(s.addr, &format!("/v1/events/stream?deltas=false&{query}"), None).await;
        let from_sse = sse.frames(n).await;
        assert_eq!(datas(&from_sse), from_ws, "{query}: the same frames");
        for ((name, data), e) in from_sse.iter().zip(&expected) {
            assert_eq!(name, e.kind());
            let frame: Value = serde_json::from_str(data).unwrap();
            assert_eq!(frame, json!({"type": "event", "event": serde_json::to_value(e).unwrap()}));
        }

        // A rejoin after the second frame: the rest, on both.
        let cursor = expected[1].seq;
        let mut again = first.clone();
        again["after"] = json!(cursor);
        let mut rejoined = ws(s.addr).await;
        subscribe(&mut rejoined, again).await;
        let rest_ws = ws_frames(&mut rejoined, n - 2).await;
        let mut rest_sse = Sse::open(s.addr, &format!("/v1/events/stream?deltas=false&{query}"), Some(cursor)).await;
        let rest = datas(&rest_sse.frames(n - 2).await);
        assert_eq!(rest, rest_ws, "{query}: the same rest");
        assert_eq!(rest, from_ws[2..], "{query}: the rest, nothing twice, nothing missing");

        // Live: each open stream gets the new matching events, the same bytes.
        s.store
            .append(vec![other("r2", "tick", 100), other("r1", "note_added", 100), other("r2", "note_added", 100)])
            .await
            .unwrap();
        let live = s.store.read_all(expected[n - 1].seq, 1000).await.unwrap();
        let wanted = live
            .iter()
            .filter(|e| {
                sub.get("stream").is_none_or(|st| e.run_id.as_str() == st)
                    && sub.get("types").is_none_or(|t| t[0] == e.kind())
            })
            .count();
        assert!(wanted >= 1);
        let live_ws = ws_frames(&mut socket, wanted).await;
        assert_eq!(ws_frames(&mut rejoined, wanted).await, live_ws);
        assert_eq!(datas(&sse.frames(wanted).await), live_ws, "{query}: live");
        assert_eq!(datas(&rest_sse.frames(wanted).await), live_ws, "{query}: live after a rejoin");
    }

    // A delta and a run's terminal frame.
    let mut socket = ws(s.addr).await;
    subscribe(&mut socket, json!({"type": "subscribe", "stream": "r1", "until_end": true, "after": 0})).await;
    let n = s.store.read_run(&r1, 0).await.unwrap().len();
    let mut sse = Sse::open(s.addr, "/v1/runs/r1/stream", None).await;
    let events_ws = ws_frames(&mut socket, n).await;
    assert_eq!(datas(&sse.frames(n).await), events_ws);
    // Both subscribed to the deltas: one published now reaches both.
    assert_eq!(s.state.publish_delta("r1", json!({"kind": "text", "text": "hé \"quoted\""})), 2);
    let delta_ws = ws_frames(&mut socket, 1).await;
    let delta_sse = sse.frames(1).await;
    assert_eq!(delta_sse[0].0, "delta");
    assert_eq!(vec![delta_sse[0].1.clone()], delta_ws);
    let completed = RunCompleted { result: "done".into(), turns: 1, usage: Default::default() };
    s.store.append(vec![NewEvent::new(&r1, completed)]).await.unwrap();
    let end_ws = ws_frames(&mut socket, 2).await;
    let end_sse = sse.frames(2).await;
    assert_eq!(datas(&end_sse), end_ws, "the last event and the terminal frame");
    assert_eq!(end_sse[1].0, "completed");
    let terminal: Value = serde_json::from_str(&end_ws[1]).unwrap();
    assert_eq!(terminal, json!({"type": "run_ended", "run_id": "r1", "status": "completed"}));
}
