#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use descartes_core::{Provider, ProviderError, StreamEvent};
use descartes_protocol::{ContentPart, Usage};
use descartes_providers::{AnthropicProvider, ProviderSettings};
use descartes_test_support::{Chunk, FakeServer, RecordedRequest, Reply, anthropic, cut_after};
use serde_json::json;

fn provider(server: &FakeServer) -> AnthropicProvider {
    AnthropicProvider::new(ProviderSettings::anthropic(Some(KEY.into())).with_base_url(server.url() + "/")).unwrap()
}

#[tokio::test]
async fn streamed_text_answer() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(anthropic::text(&["Hel", "lo", "!"])));
    let p = provider(&server);
    assert_eq!(p.name(), "anthropic");
    assert_eq!(p.url(), format!("{}/v1/messages", server.url()));
    let (a, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(a.stopped);
    assert_eq!(a.stop_reason.as_deref(), Some("end_turn"));
    assert_eq!(
        a.usage,
        Usage { input_tokens: anthropic::INPUT_TOKENS, output_tokens: anthropic::OUTPUT_TOKENS, ..Usage::default() }
    );
    assert_eq!(a.finish(), vec![ContentPart::text("Hello!")]);
}

#[tokio::test]
async fn request_shape() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(anthropic::text(&["ok"])));
    collect(provider(&server).stream(simple_request("hi")).await.unwrap()).await;
    let r = server.last_request().unwrap();
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/messages");
    assert_eq!(r.header("x-api-key"), Some(KEY));
    assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("authorization"), None);
    assert_eq!(r.body["stream"], json!(true));
    assert_eq!(r.body["model"], json!("test-model"));
    assert_eq!(r.body["max_tokens"], json!(256));
    assert_eq!(r.body["system"], json!("You are terse."));
    assert_eq!(r.body["messages"], json!([{"role":"user","content":[{"type":"text","text":"hi"}]}]));
    assert_eq!(r.body["tools"][0]["name"], json!("shell"));
    assert_eq!(r.body["tools"][0]["input_schema"]["required"], json!(["command"]));
    assert!(r.body.get("stream_options").is_none());
    assert_eq!(r.system_prompt().as_deref(), Some("You are terse."));
    assert_eq!(r.tool_names(), vec!["shell".to_owned()]);
    assert_eq!(r.last_user_text().as_deref(), Some("hi"));
}

#[tokio::test]
async fn tool_history_is_mapped_and_max_tokens_defaults() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(anthropic::text(&["ok"])));
    collect(provider(&server).stream(tool_history_request()).await.unwrap()).await;
    let r = server.last_request().unwrap();
    assert_eq!(r.body["max_tokens"], json!(4096));
    assert!(r.body.get("system").is_none());
    assert_eq!(
        r.body["messages"],
        json!([
            {"role":"user","content":[{"type":"text","text":"list files"}]},
            {"role":"assistant","content":[
                {"type":"text","text":"Listing."},
                {"type":"tool_use","id":"call_1","name":"shell","input":{"command":"ls"}},
            ]},
            {"role":"user","content":[
                {"type":"tool_result","tool_use_id":"call_1","content":"a.rs\nb.rs","is_error":false},
            ]},
        ])
    );
    assert!(r.has_tool_result());
    assert_eq!(r.last_tool_results(), vec![("call_1".to_owned(), "a.rs\nb.rs".to_owned())]);
    assert_eq!(r.last_user_text().as_deref(), Some("list files"));
}

#[tokio::test]
async fn full_tool_call() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        Reply::Stream(anthropic::tool_uses(
            Some("Let me look."),
            &[("toolu_1", "shell", &["{\"command\":", "\"ls\"}"])],
        ))
    });
    let (a, events, err) = collect(provider(&server).stream(simple_request("ls")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(events.contains(&StreamEvent::ToolCallStart { index: 1, id: "toolu_1".into(), name: "shell".into() }));
    assert_eq!(a.stop_reason.as_deref(), Some("tool_use"));
    assert_eq!(
        a.finish(),
        vec![
            ContentPart::text("Let me look."),
            ContentPart::ToolUse { id: "toolu_1".into(), name: "shell".into(), input: json!({"command":"ls"}) },
        ]
    );
}

#[tokio::test]
async fn thinking_with_signature() {
    let server =
        FakeServer::start(|_: &RecordedRequest| Reply::Stream(anthropic::thinking_then_text("hmm", "sig==", "Answer")));
    let (a, _, err) = collect(provider(&server).stream(simple_request("q")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        a.finish(),
        vec![
            ContentPart::Thinking { text: "hmm".into(), signature: Some("sig==".into()) },
            ContentPart::text("Answer")
        ]
    );
}

#[tokio::test]
async fn rate_limited_with_retry_after() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        Reply::anthropic_error(429, "rate_limit_error", "Number of request tokens has exceeded your rate limit")
            .with_header("retry-after", "2")
    });
    let err = provider(&server).stream(simple_request("hi")).await.err().unwrap();
    match &err {
        ProviderError::Http { status: 429, message, code, retry_after, .. } => {
            assert!(message.starts_with("Number of request tokens"));
            assert_eq!(code.as_deref(), Some("rate_limit_error"));
            assert_eq!(*retry_after, Some(Duration::from_secs(2)));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_retryable());
    assert_no_key(&err);
}

#[tokio::test]
async fn overloaded_and_server_errors_are_retryable_bad_request_is_not() {
    for (status, kind, retryable) in [
        (529, "overloaded_error", true),
        (500, "api_error", true),
        (400, "invalid_request_error", false),
        (401, "authentication_error", false),
    ] {
        let server = FakeServer::start(move |_: &RecordedRequest| Reply::anthropic_error(status, kind, "nope"));
        let err = provider(&server).stream(simple_request("hi")).await.err().unwrap();
        assert!(
            matches!(&err, ProviderError::Http { status: s, code: Some(c), .. } if *s == status && c == kind),
            "{err:?}"
        );
        assert_eq!(err.is_retryable(), retryable, "{status}");
    }
}

#[tokio::test]
async fn mid_stream_overloaded_error_is_retryable() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        let mut chunks = anthropic::text(&["Hel"]);
        chunks.truncate(4);
        chunks.push(anthropic::error("overloaded_error", "Overloaded"));
        Reply::Stream(chunks)
    });
    let (a, _, err) = collect(provider(&server).stream(simple_request("hi")).await.unwrap()).await;
    match &err {
        Some(e @ ProviderError::Stream { kind, message, .. }) => {
            assert_eq!(kind, "overloaded_error");
            assert_eq!(message, "Overloaded");
            assert!(e.is_retryable());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(a.finish(), vec![ContentPart::text("Hel")]);
}

#[tokio::test]
async fn mid_stream_invalid_request_error_is_not_retryable() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        Reply::Stream(vec![anthropic::message_start(3), anthropic::error("invalid_request_error", "bad")])
    });
    let (_, _, err) = collect(provider(&server).stream(simple_request("hi")).await.unwrap()).await;
    assert!(matches!(&err, Some(e @ ProviderError::Stream { .. }) if !e.is_retryable()), "{err:?}");
}

#[tokio::test]
async fn message_delta_usage_is_assigned_not_added() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        Reply::Stream(vec![
            anthropic::event(
                json!({"type":"message_start","message":{"id":"m","usage":{"input_tokens":40,"output_tokens":1,"cache_read_input_tokens":30,"cache_creation_input_tokens":5}}}),
            ),
            anthropic::text_block_start(0),
            anthropic::text_delta(0, "x"),
            anthropic::message_delta("max_tokens", 7),
            anthropic::message_delta("max_tokens", 12),
            anthropic::message_stop(),
        ])
    });
    let (a, events, err) = collect(provider(&server).stream(simple_request("hi")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        a.usage,
        Usage { input_tokens: 40, output_tokens: 12, cache_read_tokens: 30, cache_write_tokens: 5, ..Usage::default() }
    );
    assert_eq!(a.stop_reason.as_deref(), Some("max_tokens"));
    assert_eq!(events.iter().filter(|e| matches!(e, StreamEvent::Usage(_))).count(), 3);
}

#[tokio::test]
async fn unknown_events_blocks_and_fields_are_skipped() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        Reply::Stream(vec![
            anthropic::message_start(5),
            Chunk::Data("event: brand_new\ndata: {\"type\":\"brand_new\",\"whatever\":[1]}\n\n".into()),
            anthropic::event(
                json!({"type":"content_block_start","index":0,"content_block":{"type":"server_tool_use","id":"srv","name":"web_search","input":{}}}),
            ),
            anthropic::event(
                json!({"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"q\":1}"}}),
            ),
            anthropic::block_stop(0),
            anthropic::event(
                json!({"type":"content_block_start","index":1,"content_block":{"type":"text","text":"","citations":null,"extra":true}}),
            ),
            anthropic::ping(),
            anthropic::event(
                json!({"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Hi","new_field":1}}),
            ),
            anthropic::event(
                json!({"type":"content_block_delta","index":1,"delta":{"type":"citations_delta","citation":{"x":1}}}),
            ),
            anthropic::block_stop(1),
            anthropic::message_delta("end_turn", 2),
            anthropic::message_stop(),
        ])
    });
    let (a, _, err) = collect(provider(&server).stream(simple_request("hi")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(a.finish(), vec![ContentPart::text("Hi")]);
}

#[tokio::test]
async fn malformed_data_line_is_a_protocol_error() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        Reply::Stream(vec![
            anthropic::message_start(5),
            Chunk::Data("event: content_block_start\ndata: {\"type\": nope\n\n".into()),
        ])
    });
    let (_, _, err) = collect(provider(&server).stream(simple_request("hi")).await.unwrap()).await;
    assert!(
        matches!(&err, Some(ProviderError::Protocol { message, .. }) if message.contains("invalid JSON")),
        "{err:?}"
    );
}

#[tokio::test]
async fn connection_closed_mid_stream_is_a_protocol_error() {
    let server =
        FakeServer::start(|_: &RecordedRequest| Reply::Stream(cut_after(anthropic::text(&["a", "b", "c"]), 5)));
    let (a, _, err) = collect(provider(&server).stream(simple_request("hi")).await.unwrap()).await;
    assert!(
        matches!(&err, Some(ProviderError::Protocol { message, .. }) if message.contains("stream ended before the response was complete")),
        "{err:?}"
    );
    assert!(!a.stopped);
    assert_eq!(a.finish(), vec![ContentPart::text("ab")]);
}

#[tokio::test]
async fn clean_end_without_message_stop_is_a_protocol_error() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        let mut chunks = anthropic::text(&["a"]);
        chunks.pop();
        Reply::Stream(chunks)
    });
    let (_, _, err) = collect(provider(&server).stream(simple_request("hi")).await.unwrap()).await;
    assert!(matches!(err, Some(ProviderError::Protocol { .. })), "{err:?}");
}

#[tokio::test]
async fn missing_key_is_reported_by_stream() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(anthropic::text(&["x"])));
    let p = AnthropicProvider::new(ProviderSettings::anthropic(Some("  ".into())).with_base_url(server.url())).unwrap();
    let err = p.stream(simple_request("hi")).await.err().unwrap();
    assert!(matches!(&err, ProviderError::MissingApiKey { var, .. } if var == "ANTHROPIC_API_KEY"), "{err:?}");
    assert!(!err.is_retryable());
    assert_eq!(server.request_count(), 0);
}
