//! The routes of `tasks` and `listings` on a server that only reads the log: what needs the
//! runner answers 501, bad input is refused first, sessions come from the log.

use std::sync::Arc;

use descartes_core::EventStore;
use descartes_protocol::{NewEvent, RunId, RunStarted, SessionStarted};
use descartes_store::MemoryEventStore;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{ApiState, router};

/// A server over `store` that only reads the log (no runner).
async fn server(store: Arc<MemoryEventStore>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let state = ApiState::new(store, "t0k3n".into(), addr, Arc::new(|s| s.status.clone()), rx);
    tokio::spawn(async move {
        let _shutdown = tx;
        axum::serve(listener, router(state)).await
    });
    addr
}

/// `METHOD path` with a JSON `body`: (status, body as JSON).
async fn call(addr: std::net::SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer t0k3n\r\nConnection: close\r\n");
    if let Some(b) = body {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len()));
    } else {
        request.push_str("\r\n");
    }
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    conn.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

#[tokio::test]
async fn without_a_runner_tasks_are_501_but_bad_bodies_are_still_refused_first() {
    let addr = server(Arc::new(MemoryEventStore::new())).await;
    for (method, path) in [
        ("GET", "/v1/tasks"),
        ("GET", "/v1/tasks/t1"),
        ("POST", "/v1/tasks/t1/cancel"),
        ("GET", "/v1/tasks/t1/audit"),
        ("GET", "/v1/agents"),
        ("GET", "/v1/providers"),
    ] {
        let (status, body) = call(addr, method, path, None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (501, Some("no_runner")), "{method} {path}: {body}");
    }
    let (status, body) = call(addr, "POST", "/v1/tasks", Some("{\"title\": ")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_json")), "{body}");
    let (status, body) = call(addr, "POST", "/v1/tasks", Some(r#"{"title": "x", "colour": "red"}"#)).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("colour"), "{body}");
    let (status, body) = call(addr, "POST", "/v1/tasks", Some(r#"{"title": "x", "priority": "high"}"#)).await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = call(addr, "POST", "/v1/tasks/t1/approve", Some(r#"{"stage": "lunch"}"#)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")), "{body}");
    let (status, body) = call(addr, "GET", "/v1/tasks?status=sleeping", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_query")), "{body}");
    let (status, body) = call(addr, "GET", "/v1/providers?check=maybe", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_query")), "{body}");
}

#[tokio::test]
async fn sessions_are_read_from_the_log() {
    let store = Arc::new(MemoryEventStore::new());
    let (chat, run) = (RunId::from("chat1"), RunId::from("run1"));
    let started = |prompt: &str| RunStarted {
        prompt: prompt.into(),
        provider: "openai".into(),
        model: "m".into(),
        cwd: "/".into(),
        max_turns: 1,
        auto_approve: false,
        system_prompt: None,
        tools: vec![],
        pid: 0,
        version: String::new(),
        budget: Default::default(),
    };
    store
        .append(vec![
            NewEvent::new(&chat, started("a chat")),
            NewEvent::new(&chat, SessionStarted { kind: "chat".into(), context_files: vec![] }),
            NewEvent::new(&run, started("a run")),
        ])
        .await
        .unwrap();
    let addr = server(store).await;
    let (status, body) = call(addr, "GET", "/v1/sessions", None).await;
    assert_eq!(status, 200, "{body}");
    let rows = body.as_array().unwrap();
    assert_eq!(rows.len(), 1, "only the chat: {body}");
    assert_eq!((rows[0]["session_id"].as_str(), rows[0]["title"].as_str()), (Some("chat1"), Some("a chat")));
}
