//! Tool-call round trips of the two original formats (the new ones have theirs in their files).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use descartes_protocol::ContentPart;
use descartes_providers::{AnthropicProvider, OpenAiProvider, ProviderSettings};
use descartes_test_support::{FakeServer, RecordedRequest, Reply, anthropic, openai, sequence};
use serde_json::json;

#[tokio::test]
async fn openai_tool_round_trip() {
    let server = FakeServer::start(sequence(vec![
        Reply::Stream(openai::tool_call("call_9", "shell", &["{\"command\":", "\"ls\"}"])),
        Reply::Stream(openai::text(&["done"])),
    ]));
    let p = OpenAiProvider::new(ProviderSettings::openai(Some(KEY.into())).with_base_url(server.openai_base_url()))
        .unwrap();
    let (_, a2) = tool_round_trip(&p, simple_request("ls"), "a.rs").await;
    assert_eq!(a2.finish(), vec![ContentPart::text("done")]);
    let second = &server.requests()[1];
    assert_eq!(second.messages()[3], json!({"role":"tool","tool_call_id":"call_9","content":"a.rs"}));
}

#[tokio::test]
async fn anthropic_thinking_signature_and_tool_result_are_sent_back() {
    let first = {
        let mut chunks = vec![anthropic::message_start(anthropic::INPUT_TOKENS)];
        chunks.extend([
            anthropic::thinking_block_start(0),
            anthropic::thinking_delta(0, "I should list."),
            anthropic::signature_delta(0, "EqQBCgIYAh=="),
            anthropic::block_stop(0),
            anthropic::tool_use_start(1, "toolu_1", "shell"),
            anthropic::input_json_delta(1, "{\"command\":\"ls\"}"),
            anthropic::block_stop(1),
            anthropic::message_delta("tool_use", anthropic::OUTPUT_TOKENS),
            anthropic::message_stop(),
        ]);
        chunks
    };
    let server = FakeServer::start(sequence(vec![Reply::Stream(first), Reply::Stream(anthropic::text(&["done"]))]));
    let p = AnthropicProvider::new(ProviderSettings::anthropic(Some(KEY.into())).with_base_url(server.url())).unwrap();
    let (parts, a2) = tool_round_trip(&p, simple_request("ls"), "a.rs").await;
    assert_eq!(
        parts[0],
        ContentPart::Thinking { text: "I should list.".into(), signature: Some("EqQBCgIYAh==".into()) }
    );
    assert_eq!(a2.finish(), vec![ContentPart::text("done")]);
    let second = &server.requests()[1];
    assert_eq!(
        second.messages()[1],
        json!({"role":"assistant","content":[
            {"type":"thinking","thinking":"I should list.","signature":"EqQBCgIYAh=="},
            {"type":"tool_use","id":"toolu_1","name":"shell","input":{"command":"ls"}},
        ]})
    );
    assert_eq!(
        second.messages()[2],
        json!({"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":"a.rs","is_error":false}]})
    );
    assert!(second.has_tool_result());
}

#[tokio::test]
async fn anthropic_check_probe() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(vec![]));
    let p = AnthropicProvider::new(ProviderSettings::anthropic(Some(KEY.into())).with_base_url(server.url())).unwrap();
    p.check().await.unwrap();
    let r = server.last_request().unwrap();
    assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/v1/models"));
    assert_eq!(r.header("x-api-key"), Some(KEY));
    assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
}

#[tokio::test]
async fn every_kind_answers_the_check_probe_on_its_route() {
    use descartes_providers::AnyProvider;
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(vec![]));
    let cases = [
        ("openai", server.openai_base_url(), "/v1/models"),
        ("openai-responses", server.openai_base_url(), "/v1/models"),
        ("anthropic", server.url(), "/v1/models"),
        ("gemini", server.url(), "/v1beta/models"),
        ("ollama", server.url(), "/api/tags"),
    ];
    for (kind, base, path) in cases {
        let settings = ProviderSettings::openai(Some(KEY.into())).with_base_url(base);
        AnyProvider::new(kind, settings).unwrap().check().await.unwrap_or_else(|e| panic!("{kind}: {e}"));
        let r = server.last_request().unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", path), "{kind}");
    }
    // A probe that fails says why.
    let wrong = ProviderSettings::openai(Some(KEY.into())).with_base_url(server.url() + "/nowhere");
    let err = AnyProvider::new("openai", wrong).unwrap().check().await.unwrap_err();
    assert!(matches!(err, descartes_core::ProviderError::Http { status: 404, .. }), "{err:?}");
}
