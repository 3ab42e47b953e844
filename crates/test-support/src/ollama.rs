//! Ollama `/api/chat` stream builders (NDJSON: one JSON object per line, the last with
//! `"done": true`).

use serde_json::{Value, json};

use crate::Chunk;

/// `prompt_eval_count` of the builders' final line.
pub const PROMPT_EVAL_COUNT: u64 = 10;
/// `eval_count` of the builders' final line.
pub const EVAL_COUNT: u64 = 5;

/// One line: `{json}\n`.
pub fn line(json: &Value) -> Chunk {
    Chunk::Data(format!("{json}\n"))
}

/// A message line (`done: false`).
pub fn message(message: Value) -> Chunk {
    let mut m = json!({"role": "assistant", "content": ""});
    if let (Value::Object(base), Value::Object(extra)) = (&mut m, message) {
        base.extend(extra);
    }
    line(&json!({"model": "fake-model", "created_at": "2025-01-01T00:00:00Z", "message": m, "done": false}))
}

/// The final line.
pub fn done(reason: &str) -> Chunk {
    line(&json!({
        "model": "fake-model", "created_at": "2025-01-01T00:00:00Z",
        "message": {"role": "assistant", "content": ""},
        "done": true, "done_reason": reason, "total_duration": 1000, "load_duration": 10,
        "prompt_eval_count": PROMPT_EVAL_COUNT, "prompt_eval_duration": 100,
        "eval_count": EVAL_COUNT, "eval_duration": 100,
    }))
}

/// A streamed text answer (optionally after some thinking).
pub fn text(parts: &[&str], thinking: Option<&str>) -> Vec<Chunk> {
    let mut out = Vec::new();
    if let Some(t) = thinking {
        out.push(message(json!({"thinking": t})));
    }
    out.extend(parts.iter().map(|p| message(json!({"content": p}))));
    out.push(done("stop"));
    out
}

/// One native tool call (arguments as an object; Ollama gives no call id).
pub fn tool_call(name: &str, arguments: Value) -> Vec<Chunk> {
    vec![message(json!({"tool_calls": [{"function": {"name": name, "arguments": arguments}}]})), done("stop")]
}
