//! OpenAI Responses API stream builders (named events, as the real API and the Codex CLI's
//! test fixtures send them).

use serde_json::{Value, json};

use crate::Chunk;

/// `usage.input_tokens` of the builders' `response.completed`.
pub const INPUT_TOKENS: u64 = 10;
/// `usage.output_tokens` of the builders' `response.completed`.
pub const OUTPUT_TOKENS: u64 = 5;
/// `usage.input_tokens_details.cached_tokens` of the builders' `response.completed`.
pub const CACHED_TOKENS: u64 = 4;

const RESPONSE_ID: &str = "resp_fake";

/// `event: {type}` + `data: {json}` where the type is the payload's `type`.
pub fn event(json: Value) -> Chunk {
    let name = json.get("type").and_then(Value::as_str).unwrap_or("unknown").to_owned();
    Chunk::event(&name, &json)
}

pub fn created() -> Chunk {
    event(json!({"type": "response.created", "sequence_number": 0, "response": {
        "id": RESPONSE_ID, "object": "response", "status": "in_progress", "model": "fake-model", "output": [],
    }}))
}

pub fn message_added(output_index: usize, id: &str) -> Chunk {
    event(json!({"type": "response.output_item.added", "output_index": output_index, "item": {
        "type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": [],
    }}))
}

pub fn text_delta(output_index: usize, item_id: &str, delta: &str) -> Chunk {
    event(json!({"type": "response.output_text.delta", "item_id": item_id, "output_index": output_index,
                 "content_index": 0, "delta": delta}))
}

pub fn message_done(output_index: usize, id: &str, text: &str) -> Chunk {
    event(json!({"type": "response.output_item.done", "output_index": output_index, "item": {
        "type": "message", "id": id, "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }}))
}

pub fn function_call_added(output_index: usize, item_id: &str, call_id: &str, name: &str) -> Chunk {
    event(json!({"type": "response.output_item.added", "output_index": output_index, "item": {
        "type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": "", "status": "in_progress",
    }}))
}

pub fn arguments_delta(output_index: usize, item_id: &str, delta: &str) -> Chunk {
    event(json!({"type": "response.function_call_arguments.delta", "item_id": item_id,
                 "output_index": output_index, "delta": delta}))
}

pub fn function_call_done(output_index: usize, item_id: &str, call_id: &str, name: &str, arguments: &str) -> Chunk {
    event(json!({"type": "response.output_item.done", "output_index": output_index, "item": {
        "type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
        "status": "completed",
    }}))
}

/// A reasoning item: added, one summary delta, done with `encrypted_content`.
pub fn reasoning(output_index: usize, id: &str, summary: &str, encrypted_content: &str) -> Vec<Chunk> {
    vec![
        event(json!({"type": "response.output_item.added", "output_index": output_index, "item": {
            "type": "reasoning", "id": id, "summary": [],
        }})),
        event(json!({"type": "response.reasoning_summary_text.delta", "item_id": id, "output_index": output_index,
                     "summary_index": 0, "delta": summary})),
        event(json!({"type": "response.output_item.done", "output_index": output_index, "item": {
            "type": "reasoning", "id": id, "summary": [{"type": "summary_text", "text": summary}],
            "encrypted_content": encrypted_content,
        }})),
    ]
}

pub fn completed(input_tokens: u64, output_tokens: u64, cached_tokens: u64) -> Chunk {
    event(json!({"type": "response.completed", "response": {
        "id": RESPONSE_ID, "object": "response", "status": "completed", "model": "fake-model",
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }}))
}

/// `response.failed` with an error code and message.
pub fn failed(code: &str, message: &str) -> Chunk {
    event(json!({"type": "response.failed", "response": {
        "id": RESPONSE_ID, "status": "failed", "error": {"code": code, "message": message},
    }}))
}

/// A streamed text answer: created, message added, one delta per part, message done, completed.
pub fn text(parts: &[&str]) -> Vec<Chunk> {
    let mut out = vec![created(), message_added(0, "msg_fake")];
    out.extend(parts.iter().map(|p| text_delta(0, "msg_fake", p)));
    out.push(message_done(0, "msg_fake", &parts.concat()));
    out.push(completed(INPUT_TOKENS, OUTPUT_TOKENS, CACHED_TOKENS));
    out
}

/// One streamed function call (`call_id`, name, argument fragments), optionally after a
/// reasoning item `(summary, encrypted_content)`.
pub fn tool_call(call_id: &str, name: &str, fragments: &[&str], reasoning_item: Option<(&str, &str)>) -> Vec<Chunk> {
    let mut out = vec![created()];
    let mut index = 0;
    if let Some((summary, encrypted)) = reasoning_item {
        out.extend(reasoning(0, "rs_fake", summary, encrypted));
        index = 1;
    }
    let item_id = format!("fc_{call_id}");
    out.push(function_call_added(index, &item_id, call_id, name));
    out.extend(fragments.iter().map(|f| arguments_delta(index, &item_id, f)));
    out.push(function_call_done(index, &item_id, call_id, name, &fragments.concat()));
    out.push(completed(INPUT_TOKENS, OUTPUT_TOKENS, CACHED_TOKENS));
    out
}

/// Responses `input` items in Chat Completions shape (see
/// [`RecordedRequest::conversation`](crate::RecordedRequest::conversation)).
pub(crate) fn conversation(items: &[Value]) -> Vec<Value> {
    let str_of = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_owned();
    let mut out: Vec<Value> = Vec::new();
    for item in items {
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
        match kind {
            "message" => {
                let role = str_of(item.get("role"));
                let content = crate::text_of(item.get("content").unwrap_or(&Value::Null));
                if role == "assistant" {
                    assistant(&mut out)["content"] = content.into();
                } else {
                    out.push(json!({"role": role, "content": content}));
                }
            }
            "function_call" => {
                let call = json!({"id": str_of(item.get("call_id")), "type": "function", "function": {
                    "name": str_of(item.get("name")), "arguments": str_of(item.get("arguments")),
                }});
                let message = assistant(&mut out);
                match message.get_mut("tool_calls").and_then(Value::as_array_mut) {
                    Some(calls) => calls.push(call),
                    None => message["tool_calls"] = json!([call]),
                }
            }
            "reasoning" => {
                assistant(&mut out);
            }
            "function_call_output" => out.push(json!({
                "role": "tool", "tool_call_id": str_of(item.get("call_id")), "content": str_of(item.get("output")),
            })),
            _ => {}
        }
    }
    out
}

/// The assistant message at the end of `out`, added if the last message is another role.
fn assistant(out: &mut Vec<Value>) -> &mut Value {
    if out.last().and_then(|m| m.get("role")).and_then(Value::as_str) != Some("assistant") {
        out.push(json!({"role": "assistant", "content": ""}));
    }
    let last = out.len() - 1;
    &mut out[last]
}
