//! OpenAI Chat Completions stream builders (frames exactly as in `PROTOCOLS.md`).

use serde_json::{Value, json};

use crate::Chunk;

/// `usage.prompt_tokens` of the builders' usage chunk.
pub const PROMPT_TOKENS: u64 = 10;
/// `usage.completion_tokens` of the builders' usage chunk.
pub const COMPLETION_TOKENS: u64 = 5;

const ID: &str = "chatcmpl-fake";

/// One `chat.completion.chunk` frame with a single choice.
pub fn chunk(delta: Value, finish_reason: Option<&str>) -> Chunk {
    Chunk::data(&json!({
        "id": ID,
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }))
}

/// The usage frame (`choices: []`).
pub fn usage(prompt_tokens: u64, completion_tokens: u64) -> Chunk {
    Chunk::data(&json!({
        "id": ID,
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "fake-model",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
}

/// `data: [DONE]`.
pub fn done() -> Chunk {
    Chunk::Data("data: [DONE]\n\n".into())
}

/// An `{"error":{...}}` frame inside the stream.
pub fn stream_error(kind: &str, message: &str) -> Chunk {
    Chunk::data(&json!({"error": {"message": message, "type": kind, "param": null, "code": null}}))
}

/// A streamed text answer: role chunk, one content delta per part, `finish_reason: "stop"`,
/// usage ([`PROMPT_TOKENS`], [`COMPLETION_TOKENS`]), `[DONE]`.
pub fn text(parts: &[&str]) -> Vec<Chunk> {
    text_with_usage(parts, PROMPT_TOKENS, COMPLETION_TOKENS)
}

/// [`text`] with the given usage.
pub fn text_with_usage(parts: &[&str], prompt_tokens: u64, completion_tokens: u64) -> Vec<Chunk> {
    let mut out = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    out.extend(parts.iter().map(|p| chunk(json!({"content": p}), None)));
    out.push(chunk(json!({}), Some("stop")));
    out.push(usage(prompt_tokens, completion_tokens));
    out.push(done());
    out
}

/// One streamed tool call: the first fragment carries id and name (empty arguments), then one
/// chunk per arguments fragment; `finish_reason: "tool_calls"`, usage, `[DONE]`.
pub fn tool_call(id: &str, name: &str, fragments: &[&str]) -> Vec<Chunk> {
    tool_calls(&[(id, name, fragments)])
}

/// Several tool calls, one after the other (indexes 0, 1, ...).
pub fn tool_calls(calls: &[(&str, &str, &[&str])]) -> Vec<Chunk> {
    text_then_tool_calls(None, calls)
}

/// Text, then tool calls.
pub fn text_then_tool_calls(text: Option<&str>, calls: &[(&str, &str, &[&str])]) -> Vec<Chunk> {
    let mut out = vec![chunk(json!({"role": "assistant", "content": null}), None)];
    if let Some(text) = text {
        out.push(chunk(json!({"content": text}), None));
    }
    for (index, (id, name, fragments)) in calls.iter().enumerate() {
        out.push(chunk(
            json!({"tool_calls": [{
                "index": index, "id": id, "type": "function",
                "function": {"name": name, "arguments": ""},
            }]}),
            None,
        ));
        for fragment in *fragments {
            out.push(chunk(json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}), None));
        }
    }
    out.push(chunk(json!({}), Some("tool_calls")));
    out.push(usage(PROMPT_TOKENS, COMPLETION_TOKENS));
    out.push(done());
    out
}
