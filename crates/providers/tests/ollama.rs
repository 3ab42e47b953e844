#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use descartes_core::{Provider, ProviderError, StreamEvent};
use descartes_protocol::{ContentPart, Usage};
use descartes_providers::{OllamaProvider, ProviderSettings};
use descartes_test_support::{Chunk, FakeServer, RecordedRequest, Reply, cut_after, ollama, sequence};
use serde_json::json;

fn provider(server: &FakeServer) -> OllamaProvider {
    // OLLAMA_HOST style: host:port without a scheme.
    OllamaProvider::new(ProviderSettings::ollama().with_base_url(server.addr().to_string())).unwrap()
}

#[tokio::test]
async fn streamed_answer_with_thinking_and_request_shape() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(ollama::text(&["Hel", "lo"], Some("hmm"))));
    let p = provider(&server);
    assert_eq!(p.url(), format!("{}/api/chat", server.url()));
    let (a, events, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(events[0], StreamEvent::ThinkingDelta("hmm".into()));
    assert_eq!(a.stop_reason.as_deref(), Some("stop"));
    assert_eq!(
        a.usage,
        Usage { input_tokens: ollama::PROMPT_EVAL_COUNT, output_tokens: ollama::EVAL_COUNT, ..Usage::default() }
    );
    assert_eq!(
        a.finish(),
        vec![ContentPart::Thinking { text: "hmm".into(), signature: None }, ContentPart::text("Hello")]
    );
    let r = server.last_request().unwrap();
    assert!(r.is_ollama());
    assert!(r.header("authorization").is_none());
    assert_eq!(r.body["stream"], json!(true));
    assert_eq!(r.body["options"]["num_predict"], json!(256));
    assert_eq!(r.body["messages"][0], json!({"role":"system","content":"You are terse."}));
    assert_eq!(r.tool_names(), vec!["shell".to_owned()]);
}

#[tokio::test]
async fn native_tool_round_trip() {
    let server = FakeServer::start(sequence(vec![
        Reply::Stream(ollama::tool_call("shell", json!({"command": "ls"}))),
        Reply::Stream(ollama::text(&["a.rs"], None)),
    ]));
    let p = provider(&server);
    let (parts, a2) = tool_round_trip(&p, simple_request("ls"), "a.rs").await;
    assert!(
        matches!(&parts[0], ContentPart::ToolUse { name, input, .. } if name == "shell" && input == &json!({"command":"ls"}))
    );
    assert_eq!(a2.finish(), vec![ContentPart::text("a.rs")]);
    let second = &server.requests()[1];
    let messages = second.messages();
    assert_eq!(
        messages[2],
        json!({"role":"assistant","content":"","tool_calls":[{"function":{"name":"shell","arguments":{"command":"ls"}}}]})
    );
    assert_eq!(messages[3], json!({"role":"tool","content":"a.rs","tool_name":"shell"}));
    assert!(second.has_tool_result());
}

#[tokio::test]
async fn tool_call_written_as_text_is_recognised() {
    let server = FakeServer::start(sequence(vec![
        Reply::Stream(ollama::text(
            &["<tool_call>\n{\"name\": \"shell\", ", "\"arguments\": {\"command\": \"pwd\"}}\n</tool_call>"],
            None,
        )),
        Reply::Stream(ollama::text(&["{\"name\": \"unknown_tool\", \"arguments\": {}}"], None)),
    ]));
    let p = provider(&server);
    let (a, _, err) = collect(p.stream(simple_request("where")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(a.stop_reason.as_deref(), Some("tool_calls"));
    let parts = a.finish();
    assert_eq!(parts.len(), 1, "{parts:?}");
    assert!(
        matches!(&parts[0], ContentPart::ToolUse { name, input, .. } if name == "shell" && input == &json!({"command":"pwd"}))
    );
    // Unknown tool names stay text.
    let (a, _, _) = collect(p.stream(simple_request("x")).await.unwrap()).await;
    assert_eq!(a.finish(), vec![ContentPart::text("{\"name\": \"unknown_tool\", \"arguments\": {}}")]);
}

#[tokio::test]
async fn model_without_tool_support_is_a_clear_config_error() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Status {
        status: 400,
        headers: vec![("content-type".into(), "application/json".into())],
        body: r#"{"error":"registry.ollama.ai/library/gemma2:latest does not support tools"}"#.into(),
    });
    let err = provider(&server).stream(simple_request("hi")).await.err().unwrap();
    match &err {
        ProviderError::Config { message, .. } => {
            assert!(message.contains("test-model") && message.contains("tool support"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn bad_streams() {
    let server = FakeServer::start(sequence(vec![
        Reply::Stream(vec![ollama::message(json!({"content": "a"})), Chunk::Data("{not json\n".into())]),
        Reply::Stream(cut_after(ollama::text(&["a", "b"], None), 1)),
        Reply::Stream(vec![ollama::message(json!({"content": "a"}))]),
        Reply::Stream(vec![Chunk::Data("{\"error\":\"model runner has unexpectedly stopped\"}\n".into())]),
        Reply::Stream({
            let mut c = ollama::text(&["ok"], None);
            c.insert(0, ollama::line(&json!({"model": "m", "status": "loading", "new_field": [1]})));
            c
        }),
        Reply::Status { status: 400, headers: vec![], body: r#"{"error":"invalid options"}"#.into() },
    ]));
    let p = provider(&server);
    let (a, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(
        matches!(err, Some(ProviderError::Protocol { ref message, .. }) if message.contains("invalid JSON line")),
        "{err:?}"
    );
    assert_eq!(a.finish(), vec![ContentPart::text("a")]);
    let (_, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(matches!(err, Some(ProviderError::Protocol { .. })), "{err:?}");
    let (_, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(matches!(err, Some(ProviderError::Protocol { ref message, .. }) if message.contains("done")), "{err:?}");
    let (_, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(
        matches!(err, Some(ProviderError::Stream { ref message, .. }) if message.contains("unexpectedly")),
        "{err:?}"
    );
    let (a, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(a.finish(), vec![ContentPart::text("ok")]);
    let err = p.stream(simple_request("hi")).await.err().unwrap();
    assert!(matches!(&err, ProviderError::Http { status: 400, message, .. } if message == "invalid options"));
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn list_models_and_check() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(vec![]));
    let p = provider(&server);
    assert_eq!(p.list_models().await.unwrap(), vec!["fake-model:latest".to_owned()]);
    p.check().await.unwrap();
    let r = server.last_request().unwrap();
    assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/api/tags"));
    // Nothing listening: a network error that says where Ollama was expected.
    let dead = OllamaProvider::new(ProviderSettings::ollama().with_base_url("127.0.0.1:9")).unwrap();
    match dead.check().await {
        Err(ProviderError::Network { message, .. }) => assert!(message.contains("is Ollama running"), "{message}"),
        other => panic!("{other:?}"),
    }
}
