//! A `tools/call` result as the model sees it.

use descartes_core::ToolOutput;
use serde_json::{Value, json};

/// Renders a `CallToolResult` (as JSON, the wire shape) into a tool output of at most
/// `max_bytes`: text content joined by newlines, other content described (an image by its mime
/// type and size), `structuredContent` when there is no content, `isError` as an error output.
pub fn render_result(result: &Value, max_bytes: usize) -> ToolOutput {
    let mut parts: Vec<String> = Vec::new();
    for block in result.get("content").and_then(Value::as_array).into_iter().flatten() {
        parts.push(render_block(block));
    }
    if parts.is_empty()
        && let Some(s) = result.get("structuredContent").filter(|v| !v.is_null())
    {
        parts.push(s.to_string());
    }
    let is_error = result.get("isError").and_then(Value::as_bool).unwrap_or(false);
    let text = parts.join("\n");
    let (content, truncated) = clip(&text, max_bytes);
    let out = if is_error { ToolOutput::error(content) } else { ToolOutput::ok(content) };
    out.with_details(json!({ "truncated": truncated, "bytes": text.len() }))
}

fn render_block(block: &Value) -> String {
    let s = |k: &str| block.get(k).and_then(Value::as_str).unwrap_or("");
    let size = |k: &str| base64_len(s(k));
    match s("type") {
        "text" => s("text").to_owned(),
        "image" => format!("[image: {}, {} bytes]", or_unknown(s("mimeType")), size("data")),
        "audio" => format!("[audio: {}, {} bytes]", or_unknown(s("mimeType")), size("data")),
        "resource" => {
            let r = block.get("resource").cloned().unwrap_or(Value::Null);
            let rs = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            match r.get("text").and_then(Value::as_str) {
                Some(text) => format!("[resource {}]\n{text}", rs("uri")),
                None => format!(
                    "[resource {}: {}, {} bytes]",
                    rs("uri"),
                    or_unknown(&rs("mimeType")),
                    base64_len(&rs("blob"))
                ),
            }
        }
        "resource_link" => {
            let mut d = format!("[resource link: {}", s("uri"));
            if !s("name").is_empty() {
                d.push_str(&format!(" ({})", s("name")));
            }
            if !s("description").is_empty() {
                d.push_str(&format!(": {}", s("description")));
            }
            d.push(']');
            d
        }
        other => format!("[{} content]", or_unknown(other)),
    }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() { "unknown" } else { s }
}

/// Decoded size of base64 text.
fn base64_len(b64: &str) -> usize {
    let t = b64.trim_end();
    let pad = t.bytes().rev().take_while(|b| *b == b'=').count();
    (t.len() / 4 * 3 + (t.len() % 4).saturating_sub(1)).saturating_sub(pad)
}

/// The head and tail of `text` within `max` bytes, on character boundaries.
fn clip(text: &str, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text.to_owned(), false);
    }
    let keep = max.saturating_sub(80) / 2;
    let mut head = keep;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - keep;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    let omitted = tail - head;
    (format!("{}\n[... {omitted} bytes omitted ...]\n{}", &text[..head], &text[tail..]), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_joined_and_others_described() {
        let r = json!({"content": [
            {"type": "text", "text": "one"},
            {"type": "image", "mimeType": "image/png", "data": "AAAA"},
            {"type": "resource", "resource": {"uri": "file:///a", "text": "body"}},
            {"type": "resource", "resource": {"uri": "file:///b", "mimeType": "application/gzip", "blob": "AAA="}},
            {"type": "resource_link", "uri": "test://x", "name": "x"},
            {"type": "text", "text": "two"}
        ]});
        let out = render_result(&r, 10_000);
        assert!(!out.is_error);
        assert_eq!(
            out.content,
            "one\n[image: image/png, 3 bytes]\n[resource file:///a]\nbody\n[resource file:///b: application/gzip, 2 bytes]\n[resource link: test://x (x)]\ntwo"
        );
    }

    #[test]
    fn is_error_and_structured_content() {
        let out = render_result(&json!({"content": [{"type": "text", "text": "bad"}], "isError": true}), 100);
        assert!(out.is_error);
        assert_eq!(out.content, "bad");
        let out = render_result(&json!({"content": [], "structuredContent": {"sum": 3}}), 100);
        assert_eq!(out.content, r#"{"sum":3}"#);
    }

    #[test]
    fn output_is_bounded() {
        let long = "é".repeat(10_000);
        let out = render_result(&json!({"content": [{"type": "text", "text": long}]}), 1024);
        assert!(out.content.len() <= 1024, "{}", out.content.len());
        assert!(out.content.contains("bytes omitted"));
        assert_eq!(out.details.unwrap()["truncated"], true);
    }
}
