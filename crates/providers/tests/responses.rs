#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use descartes_core::{Provider, ProviderError, StreamEvent};
use descartes_protocol::{ContentPart, Usage};
use descartes_providers::{OpenAiResponsesProvider, ProviderSettings};
use descartes_test_support::{Chunk, FakeServer, RecordedRequest, Reply, cut_after, responses, sequence};
use serde_json::json;

fn provider(server: &FakeServer) -> OpenAiResponsesProvider {
    OpenAiResponsesProvider::new(
        ProviderSettings::openai_responses(Some(KEY.into())).with_base_url(server.openai_base_url()),
    )
    .unwrap()
}

#[tokio::test]
async fn streamed_text_answer_and_request_shape() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(responses::text(&["Hel", "lo"])));
    let p = provider(&server);
    assert_eq!(p.url(), format!("{}/responses", server.openai_base_url()));
    let (a, events, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(events[0], StreamEvent::TextDelta("Hel".into()));
    assert_eq!(
        a.usage,
        Usage {
            input_tokens: responses::INPUT_TOKENS,
            output_tokens: responses::OUTPUT_TOKENS,
            cache_read_tokens: responses::CACHED_TOKENS,
            cache_write_tokens: 0,
            ..Usage::default()
        }
    );
    assert_eq!(a.stop_reason.as_deref(), Some("stop"));
    assert_eq!(a.finish(), vec![ContentPart::text("Hello")]);
    let r = server.last_request().unwrap();
    assert!(r.is_responses());
    assert_eq!(r.path, "/v1/responses");
    assert_eq!(r.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
    assert_eq!(r.body["stream"], json!(true));
    assert_eq!(r.body["store"], json!(false));
    assert_eq!(r.body["instructions"], json!("You are terse."));
    assert_eq!(r.body["max_output_tokens"], json!(256));
    assert_eq!(
        r.body["input"],
        json!([{"type":"message","role":"user","content":[{"type":"input_text","text":"hi"}]}])
    );
    assert_eq!(r.body["tools"][0]["type"], json!("function"));
    assert_eq!(r.body["tools"][0]["name"], json!("shell"));
    assert_eq!(r.tool_names(), vec!["shell".to_owned()]);
    assert_eq!(r.system_prompt().as_deref(), Some("You are terse."));
    assert_eq!(r.last_user_text().as_deref(), Some("hi"));
}

#[tokio::test]
async fn tool_round_trip_with_reasoning_sent_back() {
    let server = FakeServer::start(sequence(vec![
        Reply::Stream(responses::tool_call(
            "call_77",
            "shell",
            &["{\"command\":", "\"ls\"}"],
            Some(("Need files", "ENC==")),
        )),
        Reply::Stream(responses::text(&["a.rs"])),
    ]));
    let p = provider(&server);
    let (parts, a2) = tool_round_trip(&p, simple_request("ls"), "a.rs\n").await;
    assert_eq!(
        parts,
        vec![
            ContentPart::Thinking { text: "Need files".into(), signature: Some("ENC==".into()) },
            ContentPart::ToolUse { id: "call_77".into(), name: "shell".into(), input: json!({"command":"ls"}) },
        ]
    );
    assert_eq!(a2.finish(), vec![ContentPart::text("a.rs")]);
    let second = &server.requests()[1];
    assert_eq!(
        second.body["input"],
        json!([
            {"type":"message","role":"user","content":[{"type":"input_text","text":"ls"}]},
            {"type":"reasoning","summary":[{"type":"summary_text","text":"Need files"}],"encrypted_content":"ENC=="},
            {"type":"function_call","call_id":"call_77","name":"shell","arguments":"{\"command\":\"ls\"}"},
            {"type":"function_call_output","call_id":"call_77","output":"a.rs\n"},
        ])
    );
    assert!(second.has_tool_result());
    assert_eq!(second.tool_results(), vec![("call_77".to_owned(), "a.rs\n".to_owned())]);
    assert_eq!(second.assistant_turns(), 1);
}

#[tokio::test]
async fn failed_response_and_error_event() {
    let server = FakeServer::start(sequence(vec![
        Reply::Stream(vec![responses::created(), responses::failed("server_error", "The server had an error")]),
        Reply::Stream(vec![
            responses::created(),
            responses::event(
                json!({"type":"error","code":"context_length_exceeded","message":"too long","param":null}),
            ),
        ]),
    ]));
    let p = provider(&server);
    let (_, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    let err = err.unwrap();
    assert!(matches!(&err, ProviderError::Stream { kind, .. } if kind == "server_error"), "{err:?}");
    assert!(err.is_retryable());
    let (_, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(!err.unwrap().is_retryable());
}

#[tokio::test]
async fn bad_streams() {
    let server = FakeServer::start(sequence(vec![
        Reply::Stream(vec![
            responses::created(),
            Chunk::Data("event: response.output_text.delta\ndata: {oops\n\n".into()),
        ]),
        Reply::Stream(cut_after(responses::text(&["a", "b"]), 3)),
        Reply::Stream({
            let mut c = responses::text(&["ok"]);
            c.insert(1, responses::event(json!({"type":"response.brand_new_event","x":{"y":1}})));
            c.insert(2, Chunk::Data(": keep-alive\n\n".into()));
            c
        }),
    ]));
    let p = provider(&server);
    let (_, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(
        matches!(err, Some(ProviderError::Protocol { ref message, .. }) if message.contains("invalid JSON")),
        "{err:?}"
    );
    let (a, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(matches!(err, Some(ProviderError::Protocol { .. })), "{err:?}");
    assert!(!a.stopped);
    let (a, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(a.finish(), vec![ContentPart::text("ok")]);
}

#[tokio::test]
async fn http_errors() {
    let server = FakeServer::start(sequence(vec![
        Reply::openai_error(
            429,
            "requests",
            Some("rate_limit_exceeded"),
            "Rate limit reached. Please try again in 1.5s.",
        )
        .with_header("retry-after", "2"),
        Reply::openai_error(429, "requests", Some("rate_limit_exceeded"), "Please try again in 250ms."),
        Reply::openai_error(400, "invalid_request_error", None, "Unsupported parameter"),
    ]));
    let p = provider(&server);
    let err = p.stream(simple_request("hi")).await.err().unwrap();
    assert!(
        matches!(err, ProviderError::Http { status: 429, retry_after: Some(d), .. } if d == Duration::from_secs(2))
    );
    let err = p.stream(simple_request("hi")).await.err().unwrap();
    assert!(
        matches!(err, ProviderError::Http { status: 429, retry_after: Some(d), .. } if d == Duration::from_millis(250)),
        "{err:?}"
    );
    let err = p.stream(simple_request("hi")).await.err().unwrap();
    assert!(!err.is_retryable());
    assert_no_key(&err);
}

#[tokio::test]
async fn check_probe() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(vec![]));
    provider(&server).check().await.unwrap();
    let r = server.last_request().unwrap();
    assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/v1/models"));
    assert_eq!(r.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
    let missing =
        OpenAiResponsesProvider::new(ProviderSettings::openai_responses(None).with_base_url(server.openai_base_url()))
            .unwrap();
    assert!(matches!(missing.check().await, Err(ProviderError::MissingApiKey { .. })));
}

#[tokio::test]
async fn non_reasoning_model_is_asked_again_without_encrypted_reasoning() {
    let server = FakeServer::start(|r: &RecordedRequest| {
        if r.body.get("include").is_some() {
            Reply::openai_error(
                400,
                "invalid_request_error",
                None,
                "Encrypted content is not supported with this model.",
            )
        } else {
            Reply::Stream(responses::text(&["plain"]))
        }
    });
    let p = provider(&server);
    let (a, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(a.finish(), vec![ContentPart::text("plain")]);
    assert_eq!(server.request_count(), 2);
    // Remembered: the next call goes without `include` at once.
    collect(p.stream(simple_request("again")).await.unwrap()).await;
    assert_eq!(server.request_count(), 3);
    assert!(server.last_request().unwrap().body.get("include").is_none());
}
