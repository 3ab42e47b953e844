//! Anthropic Messages stream builders (named events exactly as in `PROTOCOLS.md`).

use serde_json::{Value, json};

use crate::Chunk;

/// `usage.input_tokens` of `message_start`.
pub const INPUT_TOKENS: u64 = 10;
/// `usage.output_tokens` of the final `message_delta` (`message_start` says 1).
pub const OUTPUT_TOKENS: u64 = 5;

/// `event: {type}` + `data: {json}` where the type is the payload's `type`.
pub fn event(json: Value) -> Chunk {
    let name = json.get("type").and_then(Value::as_str).unwrap_or("unknown").to_owned();
    Chunk::event(&name, &json)
}

pub fn message_start(input_tokens: u64) -> Chunk {
    event(json!({
        "type": "message_start",
        "message": {
            "id": "msg_fake", "type": "message", "role": "assistant", "content": [],
            "model": "fake-model", "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        },
    }))
}

pub fn ping() -> Chunk {
    event(json!({"type": "ping"}))
}

pub fn text_block_start(index: usize) -> Chunk {
    event(json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}))
}

pub fn text_delta(index: usize, text: &str) -> Chunk {
    event(json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}))
}

pub fn tool_use_start(index: usize, id: &str, name: &str) -> Chunk {
    event(json!({
        "type": "content_block_start", "index": index,
        "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}},
    }))
}

pub fn input_json_delta(index: usize, partial_json: &str) -> Chunk {
    event(json!({
        "type": "content_block_delta", "index": index,
        "delta": {"type": "input_json_delta", "partial_json": partial_json},
    }))
}

pub fn thinking_block_start(index: usize) -> Chunk {
    event(json!({"type": "content_block_start", "index": index, "content_block": {"type": "thinking", "thinking": ""}}))
}

pub fn thinking_delta(index: usize, thinking: &str) -> Chunk {
    event(
        json!({"type": "content_block_delta", "index": index, "delta": {"type": "thinking_delta", "thinking": thinking}}),
    )
}

pub fn signature_delta(index: usize, signature: &str) -> Chunk {
    event(
        json!({"type": "content_block_delta", "index": index, "delta": {"type": "signature_delta", "signature": signature}}),
    )
}

pub fn block_stop(index: usize) -> Chunk {
    event(json!({"type": "content_block_stop", "index": index}))
}

pub fn message_delta(stop_reason: &str, output_tokens: u64) -> Chunk {
    event(json!({
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": null},
        "usage": {"output_tokens": output_tokens},
    }))
}

pub fn message_stop() -> Chunk {
    event(json!({"type": "message_stop"}))
}

/// A mid-stream `event: error`.
pub fn error(kind: &str, message: &str) -> Chunk {
    event(json!({"type": "error", "error": {"type": kind, "message": message}}))
}

/// A streamed text answer: `message_start`, a text block with one delta per part, `ping`,
/// `message_delta` (`end_turn`, [`OUTPUT_TOKENS`]), `message_stop`.
pub fn text(parts: &[&str]) -> Vec<Chunk> {
    let mut out = vec![message_start(INPUT_TOKENS), text_block_start(0), ping()];
    out.extend(parts.iter().map(|p| text_delta(0, p)));
    out.push(block_stop(0));
    out.push(message_delta("end_turn", OUTPUT_TOKENS));
    out.push(message_stop());
    out
}

/// One tool call (block 0) with its input JSON in fragments; `stop_reason: "tool_use"`.
pub fn tool_use(id: &str, name: &str, fragments: &[&str]) -> Vec<Chunk> {
    tool_uses(None, &[(id, name, fragments)])
}

/// Optional text (block 0), then tool calls in the following blocks; `stop_reason: "tool_use"`.
pub fn tool_uses(text: Option<&str>, calls: &[(&str, &str, &[&str])]) -> Vec<Chunk> {
    let mut out = vec![message_start(INPUT_TOKENS)];
    let mut index = 0;
    if let Some(text) = text {
        out.extend([text_block_start(0), text_delta(0, text), block_stop(0)]);
        index = 1;
    }
    for (id, name, fragments) in calls {
        out.push(tool_use_start(index, id, name));
        out.extend(fragments.iter().map(|f| input_json_delta(index, f)));
        out.push(block_stop(index));
        index += 1;
    }
    out.push(message_delta("tool_use", OUTPUT_TOKENS));
    out.push(message_stop());
    out
}

/// A thinking block (with signature) followed by a text answer.
pub fn thinking_then_text(thinking: &str, signature: &str, text: &str) -> Vec<Chunk> {
    vec![
        message_start(INPUT_TOKENS),
        thinking_block_start(0),
        thinking_delta(0, thinking),
        signature_delta(0, signature),
        block_stop(0),
        text_block_start(1),
        text_delta(1, text),
        block_stop(1),
        message_delta("end_turn", OUTPUT_TOKENS),
        message_stop(),
    ]
}
