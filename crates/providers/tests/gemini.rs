#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use descartes_core::{Provider, ProviderError, StreamEvent};
use descartes_protocol::{ContentPart, Usage};
use descartes_providers::{GeminiProvider, ProviderSettings};
use descartes_test_support::{Chunk, FakeServer, RecordedRequest, Reply, cut_after, gemini, sequence};
use serde_json::json;

fn provider(server: &FakeServer) -> GeminiProvider {
    GeminiProvider::new(ProviderSettings::gemini(Some(KEY.into())).with_base_url(server.url())).unwrap()
}

#[tokio::test]
async fn streamed_text_answer_and_request_shape() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(gemini::text(&["Hel", "lo"])));
    let p = provider(&server);
    assert_eq!(
        p.url("models/test-model"),
        format!("{}/v1beta/models/test-model:streamGenerateContent?alt=sse", server.url())
    );
    let (a, events, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(events[0], StreamEvent::TextDelta("Hel".into()));
    assert_eq!(a.stop_reason.as_deref(), Some("STOP"));
    assert_eq!(
        a.usage,
        Usage { input_tokens: gemini::PROMPT_TOKENS, output_tokens: gemini::CANDIDATES_TOKENS, ..Usage::default() }
    );
    assert_eq!(a.finish(), vec![ContentPart::text("Hello")]);
    let r = server.last_request().unwrap();
    assert!(r.is_gemini());
    assert_eq!(r.path, "/v1beta/models/test-model:streamGenerateContent");
    assert_eq!(r.header("x-goog-api-key"), Some(KEY));
    assert!(r.header("authorization").is_none());
    assert_eq!(r.body["contents"], json!([{"role":"user","parts":[{"text":"hi"}]}]));
    assert_eq!(r.body["systemInstruction"], json!({"parts":[{"text":"You are terse."}]}));
    assert_eq!(r.body["generationConfig"]["maxOutputTokens"], json!(256));
    assert_eq!(r.tool_names(), vec!["shell".to_owned()]);
    assert_eq!(r.system_prompt().as_deref(), Some("You are terse."));
    assert_eq!(r.last_user_text().as_deref(), Some("hi"));
}

#[tokio::test]
async fn tool_round_trip_with_thought_signature() {
    let server = FakeServer::start(sequence(vec![
        Reply::Stream(gemini::tool_call("shell", json!({"command": "ls"}), "SIG/abc==")),
        Reply::Stream(gemini::text(&["a.rs"])),
    ]));
    let p = provider(&server);
    let (parts, a2) = tool_round_trip(&p, simple_request("ls"), "a.rs").await;
    assert_eq!(
        parts[0],
        ContentPart::Thinking { text: "Planning the call.".into(), signature: Some("SIG/abc==".into()) }
    );
    assert!(
        matches!(&parts[1], ContentPart::ToolUse { name, input, .. } if name == "shell" && input == &json!({"command":"ls"}))
    );
    assert_eq!(a2.finish(), vec![ContentPart::text("a.rs")]);
    let second = &server.requests()[1];
    assert_eq!(
        second.body["contents"],
        json!([
            {"role":"user","parts":[{"text":"ls"}]},
            {"role":"model","parts":[{"functionCall":{"name":"shell","args":{"command":"ls"}},"thoughtSignature":"SIG/abc=="}]},
            {"role":"user","parts":[{"functionResponse":{"name":"shell","response":{"output":"a.rs"}}}]},
        ])
    );
    assert!(second.has_tool_result());
    assert_eq!(second.tool_results(), vec![("shell".to_owned(), "a.rs".to_owned())]);
}

#[tokio::test]
async fn rate_limit_retry_delay_from_body() {
    let server = FakeServer::start(sequence(vec![
        gemini::error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota. Please retry in 24.4s.", None),
        gemini::error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", Some("7s")),
        gemini::error(
            400,
            "INVALID_ARGUMENT",
            "Invalid JSON payload received. Unknown name \"additionalProperties\"",
            None,
        ),
    ]));
    let p = provider(&server);
    let err = p.stream(simple_request("hi")).await.err().unwrap();
    match &err {
        ProviderError::Http { status: 429, retry_after, message, .. } => {
            assert_eq!(*retry_after, Some(Duration::from_millis(24_400)));
            assert!(message.contains("exceeded your current quota"));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_retryable());
    assert_no_key(&err);
    let err = p.stream(simple_request("hi")).await.err().unwrap();
    assert!(matches!(err, ProviderError::Http { retry_after: Some(d), .. } if d == Duration::from_secs(7)), "{err:?}");
    let err = p.stream(simple_request("hi")).await.err().unwrap();
    assert!(matches!(err, ProviderError::Http { status: 400, .. }));
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn bad_streams() {
    let server = FakeServer::start(sequence(vec![
        Reply::Stream(vec![Chunk::Data("data: {\"candidates\": [nope\n\n".into())]),
        Reply::Stream(cut_after(gemini::text(&["a", "b", "c"]), 1)),
        Reply::Stream(vec![gemini::chunk(json!([{"text": "no finish"}]), None, None)]),
        Reply::Stream({
            let mut c = gemini::text(&["ok"]);
            c.insert(0, Chunk::data(&json!({"candidates": [{"content": {"parts": [{"executableCode": {"code": "x"}}]}, "safetyRatings": []}], "newField": 1})));
            c
        }),
    ]));
    let p = provider(&server);
    let (_, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(
        matches!(err, Some(ProviderError::Protocol { ref message, .. }) if message.contains("invalid JSON")),
        "{err:?}"
    );
    let (_, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(matches!(err, Some(ProviderError::Protocol { .. })), "{err:?}");
    let (_, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(
        matches!(err, Some(ProviderError::Protocol { ref message, .. }) if message.contains("finishReason")),
        "{err:?}"
    );
    let (a, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(a.finish(), vec![ContentPart::text("ok")]);
}

#[tokio::test]
async fn check_probe_and_listing() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(vec![]));
    let p = provider(&server);
    p.check().await.unwrap();
    assert_eq!(p.list_models().await.unwrap(), vec!["fake-model".to_owned()]);
    let r = server.last_request().unwrap();
    assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/v1beta/models"));
    assert_eq!(r.header("x-goog-api-key"), Some(KEY));
}
