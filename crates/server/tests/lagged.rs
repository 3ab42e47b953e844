//! A client that does not read its stream is never buffered without bound: once the stream's
//! buffer is full and the client takes longer than the lag timeout, it gets `lagged` with the
//! cursor to resume from (everything before it delivered, in order), and is disconnected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use descartes_core::EventStore;
use descartes_protocol::{Message, MessageAdded, NewEvent, RunId};
use descartes_server::{ApiState, router};
use descartes_store::MemoryEventStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_falls_behind_gets_lagged_with_its_cursor() {
    let store = Arc::new(MemoryEventStore::new());
    let run = RunId::from("r1");
    // Enough events (about 8 MB of text) that the kernel's socket buffers cannot hold them all.
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
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let mut state = ApiState::new(store.clone(), "t0k3n".into(), addr, Arc::new(|s| s.status.clone()), rx);
    state.lag_timeout = Duration::from_millis(300);
    tokio::spawn(async move { axum::serve(listener, router(state)).await });

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
