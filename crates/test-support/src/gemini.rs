//! Gemini `streamGenerateContent?alt=sse` stream builders (`data:` chunks of
//! `GenerateContentResponse`; the stream ends with the body, no end marker).

use serde_json::{Value, json};

use crate::{Chunk, Reply};

/// `usageMetadata.promptTokenCount` of the builders' last chunk.
pub const PROMPT_TOKENS: u64 = 10;
/// `usageMetadata.candidatesTokenCount` of the builders' last chunk.
pub const CANDIDATES_TOKENS: u64 = 5;

/// One chunk with candidate 0 holding `parts`, and optionally a finish reason and usage.
pub fn chunk(parts: Value, finish_reason: Option<&str>, usage: Option<(u64, u64)>) -> Chunk {
    let mut candidate = json!({"content": {"parts": parts, "role": "model"}, "index": 0});
    if let Some(reason) = finish_reason {
        candidate["finishReason"] = reason.into();
    }
    let mut body = json!({"candidates": [candidate], "modelVersion": "fake-model", "responseId": "fake"});
    if let Some((prompt, candidates)) = usage {
        body["usageMetadata"] = json!({"promptTokenCount": prompt, "candidatesTokenCount": candidates, "totalTokenCount": prompt + candidates});
    }
    Chunk::data(&body)
}

/// A streamed text answer: one chunk per part, the last with `finishReason: "STOP"` and usage.
pub fn text(parts: &[&str]) -> Vec<Chunk> {
    let n = parts.len();
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if i + 1 == n {
                chunk(json!([{"text": p}]), Some("STOP"), Some((PROMPT_TOKENS, CANDIDATES_TOKENS)))
            } else {
                chunk(json!([{"text": p}]), None, None)
            }
        })
        .collect()
}

/// A thought summary, then one function call (arguments whole) carrying `thought_signature`.
pub fn tool_call(name: &str, args: Value, thought_signature: &str) -> Vec<Chunk> {
    vec![
        chunk(json!([{"text": "Planning the call.", "thought": true}]), None, None),
        chunk(
            json!([{"functionCall": {"name": name, "args": args}, "thoughtSignature": thought_signature}]),
            Some("STOP"),
            Some((PROMPT_TOKENS, CANDIDATES_TOKENS)),
        ),
    ]
}

/// Google's error body, with a `RetryInfo` detail when `retry_delay` is given (e.g. "24s").
pub fn error(status: u16, code_name: &str, message: &str, retry_delay: Option<&str>) -> Reply {
    let mut details = Vec::new();
    if let Some(delay) = retry_delay {
        details.push(json!({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}));
    }
    let body = json!({"error": {"code": status, "message": message, "status": code_name, "details": details}});
    Reply::Status {
        status,
        headers: vec![("content-type".to_owned(), "application/json".to_owned())],
        body: body.to_string(),
    }
}

/// Gemini `contents` in Chat Completions shape (see
/// [`RecordedRequest::conversation`](crate::RecordedRequest::conversation)): `functionResponse`
/// parts become `tool` messages whose `tool_call_id` is the function name.
pub(crate) fn conversation(contents: &[Value]) -> Vec<Value> {
    let mut out = Vec::new();
    for content in contents {
        let role = match content.get("role").and_then(Value::as_str) {
            Some("model") => "assistant",
            _ => "user",
        };
        let parts = content.get("parts").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
        for part in parts {
            if let Some(response) = part.get("functionResponse") {
                let name = response.get("name").and_then(Value::as_str).unwrap_or_default();
                let result = response
                    .get("response")
                    .map(|r| r.get("output").or_else(|| r.get("result")).or_else(|| r.get("error")).unwrap_or(r));
                let text = match result {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                out.push(json!({"role": "tool", "tool_call_id": name, "content": text}));
            }
        }
        let text = crate::text_of(&Value::Array(
            parts.iter().filter(|p| p.get("text").is_some() && p.get("thought").is_none()).cloned().collect(),
        ));
        let calls: Vec<Value> = parts
            .iter()
            .filter_map(|p| p.get("functionCall"))
            .map(|c| json!({"type": "function", "function": {"name": c.get("name"), "arguments": c.get("args").map(Value::to_string)}}))
            .collect();
        if !text.is_empty() || !calls.is_empty() || role == "assistant" {
            let mut message = json!({"role": role, "content": text});
            if !calls.is_empty() {
                message["tool_calls"] = calls.into();
            }
            out.push(message);
        }
    }
    out
}
