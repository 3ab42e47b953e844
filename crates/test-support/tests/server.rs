//! The fake server over raw TCP (no HTTP client dependency): what is on the wire is exactly
//! what the scripts say.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use descartes_test_support::{Chunk, FakeServer, RecordedRequest, Reply, anthropic, openai, sequence, with_delay};
use serde_json::{Value, json};

fn post(server: &FakeServer, path: &str, body: &Value) -> String {
    let body = body.to_string();
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nX-Api-Key: k2\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The payload of a chunked body (sizes removed), and whether the terminating chunk came.
fn dechunk(response: &str) -> (String, bool) {
    let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
    let mut rest = body;
    let mut out = String::new();
    loop {
        let Some(eol) = rest.find("\r\n") else { return (out, false) };
        let Ok(size) = usize::from_str_radix(rest[..eol].trim(), 16) else { return (out, false) };
        if size == 0 {
            return (out, true);
        }
        let start = eol + 2;
        if rest.len() < start + size {
            out.push_str(&rest[start..]);
            return (out, false);
        }
        out.push_str(&rest[start..start + size]);
        rest = &rest[(start + size + 2).min(rest.len())..];
    }
}

#[test]
fn blocking_server_streams_openai_frames_and_records_requests() {
    let server = FakeServer::start_blocking(|r: &RecordedRequest| {
        assert_eq!(r.last_user_text().as_deref(), Some("hi"));
        Reply::Stream(openai::text(&["Hel", "lo"]))
    });
    let body =
        json!({"model":"m","stream":true,"messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}]});
    let response = post(&server, "/v1/chat/completions", &body);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.to_ascii_lowercase().contains("content-type: text/event-stream"));
    let (payload, terminated) = dechunk(&response);
    assert!(terminated);
    let frames: Vec<&str> = payload.split("\n\n").filter(|f| !f.is_empty()).collect();
    assert_eq!(frames.len(), 6, "{payload}");
    assert!(frames.iter().all(|f| f.starts_with("data: ")));
    let first: Value = serde_json::from_str(&frames[0][6..]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], json!("assistant"));
    let second: Value = serde_json::from_str(&frames[1][6..]).unwrap();
    assert_eq!(second["choices"][0]["delta"]["content"], json!("Hel"));
    let finish: Value = serde_json::from_str(&frames[3][6..]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], json!("stop"));
    let usage: Value = serde_json::from_str(&frames[4][6..]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], json!(openai::PROMPT_TOKENS));
    assert_eq!(frames[5], "data: [DONE]");

    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert!(r.is_openai());
    assert_eq!(r.header("AUTHORIZATION"), Some("Bearer k"));
    assert_eq!(r.header("x-api-key"), Some("k2"));
    assert_eq!(r.body, body);
    assert_eq!(r.model(), Some("m"));
    assert_eq!(r.system_prompt().as_deref(), Some("s"));
}

#[test]
fn anthropic_route_named_events() {
    let server = FakeServer::start_blocking(|_: &RecordedRequest| {
        Reply::Stream(anthropic::tool_use("toolu_1", "shell", &["{}"]))
    });
    let response = post(&server, "/v1/messages", &json!({"model":"m","messages":[]}));
    let (payload, terminated) = dechunk(&response);
    assert!(terminated);
    let names: Vec<&str> = payload
        .split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|f| f.lines().next().unwrap().strip_prefix("event: ").unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    for frame in payload.split("\n\n").filter(|f| !f.is_empty()) {
        let mut lines = frame.lines();
        let name = lines.next().unwrap().strip_prefix("event: ").unwrap();
        let data: Value = serde_json::from_str(lines.next().unwrap().strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(data["type"], json!(name), "event name matches the payload type");
    }
    assert!(payload.contains(r#""stop_reason":"tool_use""#));
}

#[test]
fn close_leaves_the_chunked_body_unterminated() {
    let server = FakeServer::start_blocking(|_: &RecordedRequest| {
        Reply::Stream(vec![Chunk::Data("data: {\"a\":1}\n\n".into()), Chunk::Close, Chunk::Data("never".into())])
    });
    let response = post(&server, "/chat/completions", &json!({}));
    let (payload, terminated) = dechunk(&response);
    assert_eq!(payload, "data: {\"a\":1}\n\n");
    assert!(!terminated);
}

#[test]
fn delays_status_raw_unknown_routes_and_sequences() {
    let server = FakeServer::start_blocking(sequence(vec![
        Reply::Stream(with_delay(
            vec![Chunk::Data("data: 1\n\n".into()), Chunk::Data("data: 2\n\n".into())],
            Duration::from_millis(300),
        )),
        Reply::openai_error(429, "requests", Some("rate_limit_exceeded"), "slow").with_header("retry-after", "2"),
        Reply::Raw("garbage".into()),
    ]));
    let t = Instant::now();
    let response = post(&server, "/v1/chat/completions", &json!({}));
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(dechunk(&response).0, "data: 1\n\ndata: 2\n\n");

    let response = post(&server, "/v1/chat/completions", &json!({}));
    assert!(response.starts_with("HTTP/1.1 429"), "{response}");
    assert!(response.to_ascii_lowercase().contains("retry-after: 2"));
    assert!(response.contains(r#""code":"rate_limit_exceeded""#));

    let response = post(&server, "/v1/chat/completions", &json!({}));
    assert!(response.starts_with("HTTP/1.1 200") && response.ends_with("garbage"), "{response}");

    let response = post(&server, "/v2/other", &json!({}));
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    assert_eq!(server.request_count(), 4);
}

#[test]
fn request_helpers_understand_both_formats() {
    let recorded = |path: &str, body: Value| RecordedRequest {
        method: "POST".into(),
        path: path.into(),
        headers: Default::default(),
        raw_body: body.to_string(),
        body,
    };
    let openai = recorded(
        "/v1/chat/completions",
        json!({"messages":[
            {"role":"user","content":"list"},
            {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"shell","arguments":"{}"}}]},
            {"role":"tool","tool_call_id":"c1","content":"a.rs"},
        ],"tools":[{"type":"function","function":{"name":"shell"}}]}),
    );
    assert!(openai.has_tool_result());
    assert_eq!(openai.last_user_text().as_deref(), Some("list"));
    assert_eq!(openai.tool_results(), vec![("c1".to_owned(), "a.rs".to_owned())]);
    assert_eq!(openai.tool_names(), vec!["shell".to_owned()]);
    assert_eq!(openai.assistant_turns(), 1);

    let anthropic = recorded(
        "/v1/messages",
        json!({"system":"sys","messages":[
            {"role":"user","content":[{"type":"text","text":"list"}]},
            {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"shell","input":{}}]},
            {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"a.rs","is_error":false}]},
            {"role":"assistant","content":[{"type":"text","text":"done"}]},
            {"role":"user","content":"next"},
        ]}),
    );
    assert!(!anthropic.has_tool_result(), "the last turn carries no tool result");
    assert_eq!(anthropic.last_user_text().as_deref(), Some("next"));
    assert_eq!(anthropic.tool_results(), vec![("t1".to_owned(), "a.rs".to_owned())]);
    assert!(anthropic.last_tool_results().is_empty());
    assert_eq!(anthropic.system_prompt().as_deref(), Some("sys"));
}

#[tokio::test]
async fn task_server_inside_tokio_test() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(openai::text(&["x"])));
    let addr = server.addr();
    let response = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        write!(stream, "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}")
            .unwrap();
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out);
        out
    })
    .await
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"));
    assert_eq!(server.requests()[0].path, "/v1/messages");
    assert_eq!(server.open_streams(), 0);
}
