#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use descartes_core::{ModelRequest, ModelStream, ProviderError, ResponseAssembler, StreamEvent};
use descartes_protocol::{ContentPart, Message, Role, ToolSpec};
use futures::StreamExt;
use serde_json::json;

pub const KEY: &str = "sk-test-SECRET-123";

/// Drains a stream: the assembled events, and the error that ended it, if any.
pub async fn collect(mut stream: ModelStream) -> (ResponseAssembler, Vec<StreamEvent>, Option<ProviderError>) {
    let mut assembler = ResponseAssembler::default();
    let mut events = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                events.push(event.clone());
                assembler.push(event);
            }
            Err(e) => {
                assert!(stream.next().await.is_none(), "the stream ends after an error");
                return (assembler, events, Some(e));
            }
        }
    }
    (assembler, events, None)
}

pub fn simple_request(text: &str) -> ModelRequest {
    ModelRequest {
        model: "test-model".into(),
        system: Some("You are terse.".into()),
        messages: vec![Message::user_text(text)].into(),
        tools: vec![shell_tool()].into(),
        max_tokens: Some(256),
        temperature: None,
    }
}

pub fn shell_tool() -> ToolSpec {
    ToolSpec {
        name: "shell".into(),
        description: "Run a command".into(),
        input_schema: json!({"type":"object","properties":{"command":{"type":"string"}},"required":["command"]}),
    }
}

/// user -> assistant(text + tool use) -> user(tool result).
pub fn tool_history_request() -> ModelRequest {
    ModelRequest {
        model: "test-model".into(),
        system: None,
        messages: vec![
            Message::user_text("list files"),
            Message::new(
                Role::Assistant,
                vec![
                    ContentPart::text("Listing."),
                    ContentPart::ToolUse { id: "call_1".into(), name: "shell".into(), input: json!({"command":"ls"}) },
                ],
            ),
            Message::new(
                Role::User,
                vec![ContentPart::ToolResult {
                    tool_use_id: "call_1".into(),
                    content: "a.rs\nb.rs".into(),
                    is_error: false,
                }],
            ),
        ]
        .into(),
        tools: vec![shell_tool()].into(),
        max_tokens: None,
        temperature: None,
    }
}

pub fn assert_no_key(err: &ProviderError) {
    let text = format!("{err} {err:?}");
    assert!(!text.contains(KEY), "the key leaked into an error: {text}");
}

/// A full tool-call round trip: call 1 must end with a tool call; call 2 carries the assistant
/// message and a user message with the tool's `result`. Returns call 1's parts and call 2's
/// assembled answer.
pub async fn tool_round_trip(
    p: &dyn descartes_core::Provider,
    first: ModelRequest,
    result: &str,
) -> (Vec<ContentPart>, ResponseAssembler) {
    let (a, _, err) = collect(p.stream(first.clone()).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(a.stopped);
    let parts = a.finish();
    let id = parts
        .iter()
        .find_map(|p| match p {
            ContentPart::ToolUse { id, .. } => Some(id.clone()),
            _ => None,
        })
        .expect("call 1 asks for a tool");
    let mut messages = (*first.messages).clone();
    messages.push(Message::new(Role::Assistant, parts.clone()));
    messages.push(Message::new(
        Role::User,
        vec![ContentPart::ToolResult { tool_use_id: id, content: result.into(), is_error: false }],
    ));
    let second = ModelRequest { messages: messages.into(), ..first };
    let (a2, _, err) = collect(p.stream(second).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    (parts, a2)
}
