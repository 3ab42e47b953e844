#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use descartes_core::{Provider, ProviderError, StreamEvent};
use descartes_protocol::{ContentPart, Usage};
use descartes_providers::{OpenAiProvider, ProviderSettings};
use descartes_test_support::{Chunk, FakeServer, RecordedRequest, Reply, cut_after, openai, sequence, with_delay};
use serde_json::json;

fn provider(server: &FakeServer) -> OpenAiProvider {
    OpenAiProvider::new(ProviderSettings::openai(Some(KEY.into())).with_base_url(server.openai_base_url() + "/"))
        .unwrap()
}

#[tokio::test]
async fn streamed_text_answer() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(openai::text(&["Hel", "lo", " world"])));
    let p = provider(&server);
    assert_eq!(p.name(), "openai");
    assert_eq!(p.url(), format!("{}/chat/completions", server.openai_base_url()));
    let (a, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(a.stopped);
    assert_eq!(a.stop_reason.as_deref(), Some("stop"));
    assert_eq!(
        a.usage,
        Usage { input_tokens: openai::PROMPT_TOKENS, output_tokens: openai::COMPLETION_TOKENS, ..Usage::default() }
    );
    assert_eq!(a.finish(), vec![ContentPart::text("Hello world")]);
}

#[tokio::test]
async fn request_shape() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(openai::text(&["ok"])));
    let p = provider(&server);
    collect(p.stream(simple_request("hi")).await.unwrap()).await;
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let r = &requests[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(r.header("Authorization"), Some(format!("Bearer {KEY}").as_str()));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.body["stream"], json!(true));
    assert_eq!(r.body["stream_options"], json!({"include_usage": true}));
    assert_eq!(r.body["model"], json!("test-model"));
    assert_eq!(r.body["max_tokens"], json!(256));
    assert_eq!(
        r.body["messages"],
        json!([{"role":"system","content":"You are terse."},{"role":"user","content":"hi"}])
    );
    assert_eq!(r.body["tools"][0]["type"], json!("function"));
    assert_eq!(r.body["tools"][0]["function"]["name"], json!("shell"));
    assert_eq!(r.body["tools"][0]["function"]["parameters"]["required"], json!(["command"]));
    assert_eq!(r.last_user_text().as_deref(), Some("hi"));
    assert!(!r.has_tool_result());
}

#[tokio::test]
async fn tool_history_is_mapped() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(openai::text(&["ok"])));
    let p = provider(&server);
    collect(p.stream(tool_history_request()).await.unwrap()).await;
    let r = server.last_request().unwrap();
    assert_eq!(
        r.body["messages"],
        json!([
            {"role":"user","content":"list files"},
            {"role":"assistant","content":"Listing.","tool_calls":[
                {"id":"call_1","type":"function","function":{"name":"shell","arguments":"{\"command\":\"ls\"}"}}
            ]},
            {"role":"tool","tool_call_id":"call_1","content":"a.rs\nb.rs"},
        ])
    );
    assert!(r.has_tool_result());
    assert_eq!(r.tool_results(), vec![("call_1".to_owned(), "a.rs\nb.rs".to_owned())]);
    assert_eq!(r.last_user_text().as_deref(), Some("list files"));
}

#[tokio::test]
async fn full_tool_call() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        Reply::Stream(openai::tool_call("call_abc", "shell", &["{\"comm", "and\":", "\"ls -la\"}"]))
    });
    let (a, events, err) = collect(provider(&server).stream(simple_request("ls")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(events[0], StreamEvent::ToolCallStart { index: 0, id: "call_abc".into(), name: "shell".into() });
    assert_eq!(a.stop_reason.as_deref(), Some("tool_calls"));
    assert_eq!(
        a.finish(),
        vec![ContentPart::ToolUse { id: "call_abc".into(), name: "shell".into(), input: json!({"command":"ls -la"}) }]
    );
}

#[tokio::test]
async fn scripted_conversation_with_sequence() {
    let server = FakeServer::start(sequence(vec![
        Reply::Stream(openai::text_then_tool_calls(
            Some("Sure."),
            &[("c1", "shell", &["{}"]), ("c2", "shell", &["{\"a\":1}"])],
        )),
        Reply::Stream(openai::text(&["done"])),
    ]));
    let p = provider(&server);
    let (a, _, _) = collect(p.stream(simple_request("go")).await.unwrap()).await;
    let parts = a.finish();
    assert_eq!(parts.len(), 3);
    assert_eq!(parts[2], ContentPart::ToolUse { id: "c2".into(), name: "shell".into(), input: json!({"a":1}) });
    let (a, _, _) = collect(p.stream(simple_request("again")).await.unwrap()).await;
    assert_eq!(a.finish(), vec![ContentPart::text("done")]);
    assert_eq!(server.request_count(), 2);
}

#[tokio::test]
async fn rate_limited_with_retry_after() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        Reply::openai_error(429, "requests", Some("rate_limit_exceeded"), "Rate limit reached")
            .with_header("retry-after", "2")
    });
    let err = provider(&server).stream(simple_request("hi")).await.err().unwrap();
    match &err {
        ProviderError::Http { provider, status, message, code, retry_after } => {
            assert_eq!(provider, "openai");
            assert_eq!(*status, 429);
            assert_eq!(message, "Rate limit reached");
            assert_eq!(code.as_deref(), Some("rate_limit_exceeded"));
            assert_eq!(*retry_after, Some(Duration::from_secs(2)));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_retryable());
    assert_no_key(&err);
}

#[tokio::test]
async fn insufficient_quota_is_not_retryable() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        Reply::openai_error(429, "insufficient_quota", Some("insufficient_quota"), "You exceeded your current quota")
    });
    let err = provider(&server).stream(simple_request("hi")).await.err().unwrap();
    assert!(
        matches!(&err, ProviderError::Http { status: 429, code: Some(c), .. } if c == "insufficient_quota"),
        "{err:?}"
    );
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn server_error_is_retryable_and_raw_bodies_survive() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Status {
        status: 500,
        headers: vec![("retry-after-ms".into(), "1500".into())],
        body: "<html>upstream exploded</html>".into(),
    });
    let err = provider(&server).stream(simple_request("hi")).await.err().unwrap();
    match &err {
        ProviderError::Http { status: 500, message, code: None, retry_after, .. } => {
            assert!(message.contains("upstream exploded"), "{message}");
            assert_eq!(*retry_after, Some(Duration::from_millis(1500)));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_retryable());
}

#[tokio::test]
async fn unauthorized_is_not_retryable() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        Reply::openai_error(
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect API key provided: sk-te***123",
        )
    });
    let err = provider(&server).stream(simple_request("hi")).await.err().unwrap();
    assert!(matches!(err, ProviderError::Http { status: 401, .. }));
    assert!(!err.is_retryable());
    assert_no_key(&err);
}

#[tokio::test]
async fn malformed_data_line_is_a_protocol_error() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        let mut chunks = openai::text(&["partial"]);
        chunks.insert(2, Chunk::Data(format!("data: {{\"choices\": [oops {}\n\n", "z".repeat(500))));
        Reply::Stream(chunks)
    });
    let (a, _, err) = collect(provider(&server).stream(simple_request("hi")).await.unwrap()).await;
    match err {
        Some(ProviderError::Protocol { message, .. }) => {
            assert!(message.contains("invalid JSON"), "{message}");
            assert!(message.len() < 400, "excerpt is short: {}", message.len());
        }
        other => panic!("{other:?}"),
    }
    assert!(!a.stopped);
    assert_eq!(a.finish(), vec![ContentPart::text("partial")], "events before the error are delivered");
}

#[tokio::test]
async fn raw_garbage_body_is_a_protocol_error() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Raw("this is not SSE at all\n".into()));
    let (_, events, err) = collect(provider(&server).stream(simple_request("hi")).await.unwrap()).await;
    assert!(events.is_empty());
    assert!(matches!(err, Some(ProviderError::Protocol { .. })), "{err:?}");
}

#[tokio::test]
async fn connection_closed_mid_stream_is_a_protocol_error() {
    let server =
        FakeServer::start(|_: &RecordedRequest| Reply::Stream(cut_after(openai::text(&["one", "two", "three"]), 3)));
    let (a, _, err) = collect(provider(&server).stream(simple_request("hi")).await.unwrap()).await;
    match &err {
        Some(e @ ProviderError::Protocol { message, .. }) => {
            assert!(message.contains("stream ended before the response was complete"), "{message}");
            assert!(e.is_retryable());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(a.finish(), vec![ContentPart::text("onetwo")]);
}

#[tokio::test]
async fn clean_end_after_finish_reason_without_done_still_stops() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        let mut chunks = openai::text(&["fine"]);
        chunks.truncate(chunks.len() - 2); // no usage, no [DONE]
        Reply::Stream(chunks)
    });
    let (a, _, err) = collect(provider(&server).stream(simple_request("hi")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(a.stopped);
    assert_eq!(a.stop_reason.as_deref(), Some("stop"));
    assert_eq!(a.usage, Usage::default());
}

#[tokio::test]
async fn abrupt_close_after_finish_reason_still_stops() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(cut_after(openai::text(&["fine"]), 3)));
    let (a, _, err) = collect(provider(&server).stream(simple_request("hi")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(a.stopped);
}

#[tokio::test]
async fn unknown_fields_and_comments_are_skipped() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        Reply::Stream(vec![
            Chunk::Data(": keep-alive comment\n\n".into()),
            Chunk::Data("event: something_new\ndata: {\"foo\":{\"bar\":[1,2,3]}}\n\n".into()),
            Chunk::Data("data: {\"id\":\"x\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp\",\"choices\":[{\"index\":0,\"logprobs\":null,\"delta\":{\"role\":\"assistant\",\"content\":\"A\",\"refusal\":null,\"annotations\":[]},\"finish_reason\":null}]}\r\n\r\n".into()),
            Chunk::Data("data: {\"choices\":[{\"index\":1,\"delta\":{\"content\":\"other choice\"}}]}\n\n".into()),
            Chunk::Data("data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"B\"},\"finish_reason\":\"stop\"}]}\n\n".into()),
            Chunk::Data("data: {\"choices\":null,\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5,\"prompt_tokens_details\":{\"cached_tokens\":1}}}\n\n".into()),
            Chunk::Data("data: [DONE]\n\n".into()),
        ])
    });
    let (a, _, err) = collect(provider(&server).stream(simple_request("hi")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        a.usage,
        Usage { input_tokens: 3, output_tokens: 2, cache_read_tokens: 1, cache_write_tokens: 0, ..Usage::default() }
    );
    assert_eq!(a.finish(), vec![ContentPart::text("AB")]);
}

#[tokio::test]
async fn error_object_inside_stream() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        Reply::Stream(vec![
            openai::chunk(json!({"content":"x"}), None),
            openai::stream_error("server_error", "The server had an error"),
        ])
    });
    let (_, _, err) = collect(provider(&server).stream(simple_request("hi")).await.unwrap()).await;
    match err {
        Some(e @ ProviderError::Stream { .. }) => assert!(e.is_retryable()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn missing_key_is_reported_by_stream() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Stream(openai::text(&["x"])));
    let p = OpenAiProvider::new(ProviderSettings::openai(None).with_base_url(server.openai_base_url())).unwrap();
    let err = p.stream(simple_request("hi")).await.err().unwrap();
    assert!(
        matches!(&err, ProviderError::MissingApiKey { provider, var } if provider == "openai" && var == "OPENAI_API_KEY")
    );
    assert_eq!(server.request_count(), 0);

    // Keyless servers: empty variable name, no auth header.
    let mut settings = ProviderSettings::openai(None).with_base_url(server.openai_base_url());
    settings.name = "ollama".into();
    settings.api_key_env = String::new();
    let p = OpenAiProvider::new(settings).unwrap();
    let (_, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(err.is_none());
    assert_eq!(server.last_request().unwrap().header("authorization"), None);
}

#[tokio::test]
async fn bad_base_url_is_a_config_error_and_debug_hides_the_key() {
    let err = OpenAiProvider::new(ProviderSettings::openai(Some(KEY.into())).with_base_url("not a url")).unwrap_err();
    assert!(matches!(err, ProviderError::Config { .. }));
    assert_no_key(&err);
    let p = OpenAiProvider::new(ProviderSettings::openai(Some(KEY.into()))).unwrap();
    assert!(!format!("{p:?}").contains(KEY));
}

#[tokio::test]
async fn connection_refused_is_a_network_error() {
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let p = OpenAiProvider::new(ProviderSettings::openai(Some(KEY.into())).with_base_url(format!("http://{addr}/v1")))
        .unwrap();
    let err = p.stream(simple_request("hi")).await.err().unwrap();
    assert!(matches!(err, ProviderError::Network { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert_no_key(&err);
}

#[tokio::test]
async fn stalled_stream_times_out() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        let mut chunks = openai::text(&["a"]);
        chunks.insert(2, Chunk::Delay(Duration::from_secs(30)));
        Reply::Stream(chunks)
    });
    let mut settings = ProviderSettings::openai(Some(KEY.into())).with_base_url(server.openai_base_url());
    settings.read_timeout = Some(Duration::from_millis(300));
    let p = OpenAiProvider::new(settings).unwrap();
    let (a, _, err) = collect(p.stream(simple_request("hi")).await.unwrap()).await;
    assert!(matches!(&err, Some(ProviderError::Network { message, .. }) if message.contains("timed out")), "{err:?}");
    assert_eq!(a.finish(), vec![ContentPart::text("a")]);
}

#[tokio::test]
async fn dropping_the_stream_closes_the_connection() {
    let server = FakeServer::start(|_: &RecordedRequest| {
        Reply::Stream(with_delay(openai::text(&["a", "b", "c", "d"]), Duration::from_millis(200)))
    });
    let p = provider(&server);
    let mut stream = p.stream(simple_request("hi")).await.unwrap();
    use futures::StreamExt;
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.unwrap();
    assert!(matches!(first, Some(Ok(_))));
    assert_eq!(server.open_streams(), 1);
    drop(stream);
    assert!(server.wait_streams_closed(Duration::from_secs(5)).await, "the server saw the client go away");
    // A second request still works (the aborted connection is not reused half-read).
    let (a, _, err) = collect(p.stream(simple_request("again")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(a.finish(), vec![ContentPart::text("abcd")]);
}

#[tokio::test]
async fn json_body_instead_of_a_stream_is_a_protocol_error() {
    let server = FakeServer::start(|_: &RecordedRequest| Reply::Status {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: r#"{"error":{"message":"model 'x' not found","type":"invalid_request_error"}}"#.into(),
    });
    let err = provider(&server).stream(simple_request("hi")).await.err().unwrap();
    assert!(
        matches!(&err, ProviderError::Protocol { message, .. } if message.contains("model 'x' not found")),
        "{err:?}"
    );
}
