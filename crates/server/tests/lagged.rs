//! A client that does not read its stream (Server-Sent Events or WebSocket) is never buffered
//! without bound: once the stream's buffer is full and the client takes longer than the lag
//! timeout, it gets `lagged` with the cursor to resume from (everything before it delivered, in
//! order), and is disconnected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use descartes_core::EventStore;
use descartes_protocol::{Message, MessageAdded, NewEvent, RunId};
use descartes_server::{ApiState, router};
use descartes_store::MemoryEventStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server (lag timeout 300 ms) over a log of about 8 MB of text: more than the kernel's
/// socket buffers hold.
async fn server() -> std::net::SocketAddr {
    let store = Arc::new(MemoryEventStore::new());
    let run = RunId::from("r1");
    let text = "x".repeat(4000);
    for chunk in 0..20 {
        let batch: Vec<NewEvent> = (0..100)
            .map(|i| {
                NewEvent::new(
                    &run,
                    MessageAdded { message: Message::user_text(format!("{chunk}-{i} {text}")), model_call_id: None },
                )
            })
            .collect();
        store.append(batch).await.unwrap();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut state = ApiState::new(store.clone(), "t0k3n".into(), addr, Arc::new(|s| s.status.clone()), rx);
    state.lag_timeout = Duration::from_millis(300);
    tokio::spawn(async move {
        let _shutdown = tx;
        axum::serve(listener, router(state)).await
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_falls_behind_gets_lagged_with_its_cursor() {
    let addr = server().await;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /v1/events/stream HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer t0k3n\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    // Read nothing for a while: the server must give up on this client.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut body)).await.expect("disconnected").unwrap();
    let body = String::from_utf8_lossy(&body);
    let ids: Vec<i64> =
        body.lines().filter_map(|l| l.strip_prefix("id: ")).map(|v| v.trim().parse().unwrap()).collect();
    assert!(!ids.is_empty() && ids.len() < 2000, "some, not all, events were delivered: {}", ids.len());
    assert_eq!(ids, (1..=ids.len() as i64).collect::<Vec<_>>(), "in order, no gap");
    let lagged = body.lines().skip_while(|l| *l != "event: lagged").nth(1).expect("a lagged message");
    let data: serde_json::Value = serde_json::from_str(lagged.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(data["after"], *ids.last().unwrap(), "the cursor is the last event delivered");
}

/// The frames a WebSocket server sent (unmasked): `(opcode, payload)`, after the HTTP head.
fn ws_frames(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let head = bytes.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP head") + 4;
    assert!(bytes.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&bytes[..head]));
    let mut rest = &bytes[head..];
    let mut frames = Vec::new();
    while rest.len() >= 2 {
        let (opcode, short) = (rest[0] & 0x0f, (rest[1] & 0x7f) as usize);
        assert_eq!(rest[1] & 0x80, 0, "a server does not mask");
        let (len, at) = match short {
            126 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
            127 => (u64::from_be_bytes(rest[2..10].try_into().unwrap()) as usize, 10),
            n => (n, 2),
        };
        assert!(rest[0] & 0x80 != 0, "whole frames");
        frames.push((opcode, rest[at..at + len].to_vec()));
        rest = &rest[at + len..];
    }
    assert!(rest.is_empty(), "no partial frame");
    frames
}

/// A masked client text frame.
fn client_frame(text: &str) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut frame = vec![0x81];
    match text.len() {
        n @ 0..126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend((n as u16).to_be_bytes());
        }
    }
    frame.extend(mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_falls_behind_gets_lagged_with_its_cursor() {
    let addr = server().await;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer t0k3n\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    conn.write_all(&client_frame(r#"{"type":"subscribe"}"#)).await.unwrap();
    // Read nothing for a while: the server must give up on this client.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut bytes)).await.expect("disconnected").unwrap();
    let frames = ws_frames(&bytes);
    let (close, texts) = frames.split_last().expect("frames");
    assert_eq!(close.0, 0x8, "a close frame last");
    assert_eq!(u16::from_be_bytes([close.1[0], close.1[1]]), 1013, "try again later");
    let texts: Vec<serde_json::Value> = texts
        .iter()
        .map(|(opcode, payload)| {
            assert_eq!(*opcode, 0x1, "text frames");
            serde_json::from_slice(payload).unwrap()
        })
        .collect();
    assert_eq!(texts[0], serde_json::json!({"type": "subscribed", "after": 0}));
    let (lagged, events) = texts[1..].split_last().unwrap();
    let seqs: Vec<i64> = events
        .iter()
        .map(|f| {
            assert_eq!(f["type"], "event");
            f["event"]["seq"].as_i64().unwrap()
        })
        .collect();
    assert!(!seqs.is_empty() && seqs.len() < 2000, "some, not all, events were delivered: {}", seqs.len());
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "in order, no gap");
    assert_eq!(lagged["type"], "lagged", "{lagged}");
    assert_eq!(lagged["after"], *seqs.last().unwrap(), "the cursor is the last event delivered");
}
