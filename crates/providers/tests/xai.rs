//! xAI: the OpenAI Chat Completions format at another base URL with another key variable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use descartes_core::{Provider, ProviderError};
use descartes_protocol::ContentPart;
use descartes_providers::{OpenAiProvider, ProviderSettings, XAI_DEFAULT_BASE_URL};
use descartes_test_support::{FakeServer, RecordedRequest, Reply, openai, sequence};
use serde_json::json;

fn provider(server: &FakeServer) -> OpenAiProvider {
    OpenAiProvider::new(ProviderSettings::xai(Some(KEY.into())).with_base_url(server.openai_base_url())).unwrap()
}

#[tokio::test]
async fn streamed_answer_under_the_xai_name() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(openai::text(&["Grok", "ked"])));
    let p = provider(&server);
    assert_eq!(p.name(), "xai");
    let (a, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(a.finish(), vec![ContentPart::text("Grokked")]);
    let r = server.last_request().unwrap();
    assert_eq!(r.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
    assert_eq!(r.path, "/v1/chat/completions");
}

#[tokio::test]
async fn tool_call_round_trip() {
    let server = FakeServer::start(sequence(vec![
        Reply::Stream(openai::tool_call("call_x1", "shell", &["{\"command\":\"ls\"}"])),
        Reply::Stream(openai::text(&["done"])),
    ]));
    let p = provider(&server);
    let (parts, a2) = tool_round_trip(&p, simple_request("ls"), "a.rs").await;
    assert_eq!(
        parts,
        vec![ContentPart::ToolUse { id: "call_x1".into(), name: "shell".into(), input: json!({"command":"ls"}) }]
    );
    assert_eq!(a2.finish(), vec![ContentPart::text("done")]);
    let second = &server.requests()[1];
    assert_eq!(second.messages()[3], json!({"role":"tool","tool_call_id":"call_x1","content":"a.rs"}));
    assert_eq!(second.messages()[2]["tool_calls"][0]["id"], json!("call_x1"));
}

#[tokio::test]
async fn missing_key_names_the_xai_variable_and_settings_default() {
    let s = ProviderSettings::xai(None);
    assert_eq!(s.base_url, XAI_DEFAULT_BASE_URL);
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(openai::text(&["x"])));
    let p = OpenAiProvider::new(s.with_base_url(server.openai_base_url())).unwrap();
    match p.stream(simple_request("hi")).await.err().unwrap() {
        ProviderError::MissingApiKey { provider, var } => {
            assert_eq!((provider.as_str(), var.as_str()), ("xai", "XAI_API_KEY"))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.request_count(), 0);
}

#[tokio::test]
async fn declarative_provider_name_and_check() {
    let settings = ProviderSettings {
        name: "my-vllm".into(),
        api_key_env: String::new(),
        api_key: None,
        ..ProviderSettings::default()
    };
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(openai::text(&["ok"])));
    let p = OpenAiProvider::new(settings.with_base_url(server.openai_base_url())).unwrap();
    assert_eq!(p.name(), "my-vllm");
    p.check().await.unwrap();
    assert_eq!(p.list_models().await.unwrap(), vec!["fake-model".to_owned()]);
    let r = server.last_request().unwrap();
    assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/v1/models"));
    assert!(r.header("authorization").is_none());
    let (a, _, _) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert_eq!(a.finish(), vec![ContentPart::text("ok")]);
}

#[tokio::test]
async fn text_tool_calls_setting_on_an_openai_compatible_server() {
    let script = || {
        sequence(vec![Reply::Stream(openai::text(&[
            "```json\n{\"name\": \"shell\", \"arguments\": {\"command\": \"ls\"}}\n```",
        ]))])
    };
    let server = FakeServer::start(script());
    let settings = ProviderSettings { text_tool_calls: true, ..ProviderSettings::xai(Some(KEY.into())) };
    let p = OpenAiProvider::new(settings.with_base_url(server.openai_base_url())).unwrap();
    let (a, _, err) = collect(p.stream(simple_request("ls")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    let parts = a.finish();
    assert!(
        matches!(&parts[..], [ContentPart::ToolUse { name, input, .. }] if name == "shell" && input == &json!({"command":"ls"})),
        "{parts:?}"
    );
    // Off by default: the text stays text.
    let server = FakeServer::start(script());
    let (a, _, _) = collect(provider(&server).stream(simple_request("ls")).await.unwrap()).await;
    assert!(matches!(&a.finish()[..], [ContentPart::Text { .. }]));
}
