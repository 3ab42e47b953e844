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
