//! Tool calls that local models write as text instead of using the native tool-call channel.
//!
//! [`parse_text_tool_calls`] recognises the usual forms; [`TextToolCallFilter`] applies it to a
//! stream of [`StreamEvent`]s (used by the Ollama provider, and by the OpenAI-compatible one
//! when [`ProviderSettings::text_tool_calls`](crate::ProviderSettings::text_tool_calls) is set).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use descartes_core::{ModelStream, ProviderError, StreamEvent};
use futures::Stream;
use serde_json::{Map, Value};

/// One tool call found in text.
#[derive(Debug, Clone, PartialEq)]
pub struct TextToolCall {
    pub name: String,
    /// The arguments (an object; `{}` when the text gave none).
    pub arguments: Value,
}

/// Texts longer than this are not scanned for bare JSON objects (only for tags and fences).
const MAX_SCAN_BYTES: usize = 1024 * 1024;

/// Finds the tool calls written in `text` and returns them with the text that remains once
/// they are cut out (trimmed).
///
/// Recognised forms, anywhere in the text:
/// * JSON objects `{"name": "...", "arguments": {...}}` (also `parameters` / `args` / `input`,
///   arguments given as a JSON string, and arrays of such objects), wrapped or not in
///   `{"tool_call": ...}`, `{"tool_calls": [...]}`, `{"function_call": ...}`, `{"function": ...}`
///   (OpenAI's `{"type":"function","function":{...}}` included);
/// * the same inside Markdown code fences (```` ```json ... ``` ````);
/// * `<tool_call>{json}</tool_call>` (Hermes, Qwen 2.5/3, SmolLM3; one block per call);
/// * `<function=NAME>{json arguments}</function>`, or with `<parameter=KEY>value</parameter>`
///   children (Qwen3-Coder, also inside `<tool_call>`); a missing closing tag at the end of the
///   text is tolerated;
/// * Llama 3.x: `{"name": ..., "parameters": {...}}`, after the `<|python_tag|>` token or not,
///   several separated by `;`.
///
/// Only names in `known_tool_names` count: anything else is left in the text. Once calls are
/// found, what is left of the `<|python_tag|>` token and of `;` separators between calls is
/// dropped from the remaining text. Never panics.
pub fn parse_text_tool_calls<S: AsRef<str>>(text: &str, known_tool_names: &[S]) -> (Vec<TextToolCall>, String) {
    let known = |name: &str| known_tool_names.iter().any(|k| k.as_ref() == name);
    let mut calls = Vec::new();
    // Byte ranges of `text` consumed by calls.
    let mut cut: Vec<(usize, usize)> = Vec::new();

    // <tool_call>...</tool_call>
    scan_tags(text, "<tool_call>", "</tool_call>", &mut cut, |inner| {
        let inner = inner.trim();
        if let Some(tag) = inner.strip_prefix("<function=") {
            let (call, _) = function_tag(tag, &known)?;
            return Some(vec![call]);
        }
        let value = first_json(inner)?;
        let found = calls_of(&value, &known);
        if found.is_empty() { None } else { Some(found) }
    })
    .into_iter()
    .for_each(|c| calls.extend(c));

    // <function=name>...</function>
    let mut position = 0;
    while let Some(rel) = text[position..].find("<function=") {
        let start = position + rel;
        position = start + 1;
        if overlaps(&cut, start) {
            continue;
        }
        let after = start + "<function=".len();
        if !text[after..].contains('>') {
            break;
        }
        let Some((call, len)) = function_tag(&text[after..], &known) else { continue };
        let end = after + len;
        calls.push(call);
        cut.push((start, end));
        position = end;
    }

    // ```json ... ``` fences
    let mut position = 0;
    while let Some(rel) = text[position..].find("```") {
        let start = position + rel;
        let Some(newline_rel) = text[start + 3..].find('\n') else { break };
        let lang = text[start + 3..start + 3 + newline_rel].trim();
        let body_start = start + 3 + newline_rel + 1;
        let Some(close_rel) = text[body_start..].find("```") else { break };
        let body_end = body_start + close_rel;
        let end = body_end + 3;
        position = end;
        if overlaps(&cut, start) || !(lang.is_empty() || lang.eq_ignore_ascii_case("json")) {
            continue;
        }
        let Some(value) = first_json(text[body_start..body_end].trim()) else { continue };
        let found = calls_of(&value, &known);
        if !found.is_empty() {
            calls.extend(found);
            cut.push((start, end));
        }
    }

    // Bare JSON objects / arrays.
    if text.len() <= MAX_SCAN_BYTES {
        let mut position = 0;
        while let Some(rel) = text[position..].find(['{', '[']) {
            let start = position + rel;
            position = start + 1;
            if overlaps(&cut, start) {
                continue;
            }
            let mut iter = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
            let Some(Ok(value)) = iter.next() else { continue };
            let end = start + iter.byte_offset();
            let found = calls_of(&value, &known);
            if !found.is_empty() {
                calls.extend(found);
                cut.push((start, end));
                position = end;
            }
        }
    }

    if calls.is_empty() {
        return (calls, text.trim().to_owned());
    }
    cut.sort_unstable();
    let mut remaining = String::with_capacity(text.len());
    let mut last = 0;
    for (start, end) in cut {
        if start >= last {
            remaining.push_str(&text[last..start]);
        }
        last = last.max(end);
    }
    remaining.push_str(&text[last.min(text.len())..]);
    let remaining = remaining.replace(PYTHON_TAG, "");
    let remaining = remaining.trim();
    // `;` between Llama's calls.
    if remaining.chars().all(|c| c == ';' || c.is_whitespace()) {
        return (calls, String::new());
    }
    (calls, remaining.to_owned())
}

/// Llama 3.x's token before a tool call (in the text when special tokens are not skipped).
const PYTHON_TAG: &str = "<|python_tag|>";

/// A `<function=NAME>...</function>` tag, `tag` starting after `<function=`: the call and the
/// length of `tag` it spans (to the end of the text when `</function>` is missing). `None` for an
/// unknown name or a body that is neither a JSON object nor `<parameter=...>` children.
fn function_tag(tag: &str, known: &impl Fn(&str) -> bool) -> Option<(TextToolCall, usize)> {
    let close = tag.find('>')?;
    let name = tag[..close].trim().trim_matches('"');
    let body_start = close + 1;
    let (body_end, end) = match tag[body_start..].find("</function>") {
        Some(e) => (body_start + e, body_start + e + "</function>".len()),
        None => (tag.len(), tag.len()),
    };
    if !known(name) {
        return None;
    }
    let body = tag[body_start..body_end].trim();
    let arguments = if body.is_empty() {
        Value::Object(Map::new())
    } else if let Some(v @ Value::Object(_)) = first_json(body) {
        v
    } else {
        parameters_of(body)?
    };
    Some((TextToolCall { name: name.to_owned(), arguments }, end))
}

/// Whether `pos` lies inside an already consumed range.
fn overlaps(cut: &[(usize, usize)], pos: usize) -> bool {
    cut.iter().any(|&(s, e)| pos >= s && pos < e)
}

/// Finds `open ... close` spans (close optional at the end), calls `f` on the inside; spans
/// `f` accepts are recorded in `cut`.
fn scan_tags<T>(
    text: &str,
    open: &str,
    close: &str,
    cut: &mut Vec<(usize, usize)>,
    mut f: impl FnMut(&str) -> Option<T>,
) -> Vec<T> {
    let mut out = Vec::new();
    let mut position = 0;
    while let Some(rel) = text[position..].find(open) {
        let start = position + rel;
        let body_start = start + open.len();
        let (body_end, end) = match text[body_start..].find(close) {
            Some(e) => (body_start + e, body_start + e + close.len()),
            None => (text.len(), text.len()),
        };
        position = end.max(start + 1);
        if let Some(t) = f(&text[body_start..body_end]) {
            out.push(t);
            cut.push((start, end));
        }
        if position >= text.len() {
            break;
        }
    }
    out
}

/// The first JSON value of `s` (which must start with it; trailing text is ignored).
fn first_json(s: &str) -> Option<Value> {
    let mut iter = serde_json::Deserializer::from_str(s).into_iter::<Value>();
    iter.next()?.ok()
}

/// `<parameter=key>value</parameter>` children as an object of strings (JSON values when the
/// value parses as JSON).
fn parameters_of(body: &str) -> Option<Value> {
    let mut args = Map::new();
    let mut position = 0;
    while let Some(rel) = body[position..].find("<parameter=") {
        let after = position + rel + "<parameter=".len();
        let close_rel = body[after..].find('>')?;
        let key = body[after..after + close_rel].trim().trim_matches('"').to_owned();
        let value_start = after + close_rel + 1;
        let (value_end, end) = match body[value_start..].find("</parameter>") {
            Some(e) => (value_start + e, value_start + e + "</parameter>".len()),
            None => (body.len(), body.len()),
        };
        let raw = body[value_start..value_end].trim_matches('\n');
        let value = match serde_json::from_str::<Value>(raw.trim()) {
            Ok(v @ (Value::Object(_) | Value::Array(_) | Value::Number(_) | Value::Bool(_))) => v,
            _ => Value::String(raw.to_owned()),
        };
        args.insert(key, value);
        position = end;
    }
    if args.is_empty() { None } else { Some(Value::Object(args)) }
}

/// The tool calls a JSON value describes (possibly none).
fn calls_of(value: &Value, known: &impl Fn(&str) -> bool) -> Vec<TextToolCall> {
    let mut out = Vec::new();
    collect_calls(value, known, &mut out, 0);
    out
}

fn collect_calls(value: &Value, known: &impl Fn(&str) -> bool, out: &mut Vec<TextToolCall>, depth: usize) {
    if depth > 4 {
        return;
    }
    match value {
        Value::Array(items) => {
            for item in items {
                collect_calls(item, known, out, depth + 1);
            }
        }
        Value::Object(map) => {
            for wrapper in ["tool_call", "function_call", "tool_calls", "function"] {
                match map.get(wrapper) {
                    Some(inner @ (Value::Object(_) | Value::Array(_))) => {
                        collect_calls(inner, known, out, depth + 1);
                        return;
                    }
                    Some(Value::String(name)) if wrapper == "function" && known(name) => {
                        out.push(TextToolCall { name: name.clone(), arguments: arguments_of(map) });
                        return;
                    }
                    _ => {}
                }
            }
            if let Some(Value::String(name)) = map.get("name").or_else(|| map.get("tool"))
                && known(name)
            {
                out.push(TextToolCall { name: name.clone(), arguments: arguments_of(map) });
            }
        }
        _ => {}
    }
}

fn arguments_of(map: &Map<String, Value>) -> Value {
    for key in ["arguments", "parameters", "args", "input"] {
        match map.get(key) {
            Some(v @ Value::Object(_)) => return v.clone(),
            Some(Value::String(raw)) => {
                if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(raw) {
                    return v;
                }
            }
            _ => {}
        }
    }
    Value::Object(Map::new())
}

/// A fresh tool call id (`call_<process stamp>_<n>`): unique within the process and, the stamp
/// being the process start time, across runs. For providers whose calls carry no id.
pub(crate) fn synthesize_call_id() -> String {
    static STAMP: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let stamp = *STAMP
        .get_or_init(|| SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default());
    format!("call_{:x}_{}", stamp & 0xffff_ffff_ffff, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Could `text` (all of the answer so far) still turn out to be a tool call written as text?
fn may_be_call_prefix(text: &str) -> bool {
    let t = text.trim_start();
    if t.is_empty() {
        return true;
    }
    ["{", "[", "```", "<tool_call>", "<function=", PYTHON_TAG].iter().any(|p| t.starts_with(p) || p.starts_with(t))
}

/// Stream-level filter: holds back answer text while it may be a tool call written as text;
/// at the end, if the model made no native tool call and the text holds calls of offered
/// tools, emits them as [`StreamEvent::ToolCallStart`]/[`StreamEvent::ToolCallDelta`] (the
/// held text minus the calls is emitted first) and reports the stop reason `tool_calls`.
/// Text that does not start like a call streams through at once (and is still scanned at the
/// end, in which case it stays in the answer along with the calls).
#[derive(Debug)]
pub struct TextToolCallFilter {
    names: Vec<String>,
    text: String,
    streaming: bool,
    native: bool,
    next_index: usize,
}

impl TextToolCallFilter {
    /// `names`: the offered tools. With none, the filter passes everything through.
    pub fn new(names: Vec<String>) -> Self {
        Self { names, text: String::new(), streaming: false, native: false, next_index: 0 }
    }

    /// Handles one event, appending what to forward to `out`.
    pub fn push(&mut self, event: StreamEvent, out: &mut Vec<StreamEvent>) {
        if self.names.is_empty() {
            out.push(event);
            return;
        }
        match event {
            StreamEvent::TextDelta(t) => {
                self.text.push_str(&t);
                if self.streaming || self.native {
                    out.push(StreamEvent::TextDelta(t));
                } else if !may_be_call_prefix(&self.text) {
                    self.streaming = true;
                    out.push(StreamEvent::TextDelta(self.text.clone()));
                }
            }
            StreamEvent::ToolCallStart { index, id, name } => {
                self.flush(out);
                self.native = true;
                self.next_index = self.next_index.max(index + 1);
                out.push(StreamEvent::ToolCallStart { index, id, name });
            }
            StreamEvent::Stop { reason } => {
                let mut reason = reason;
                if !self.native {
                    let (calls, remaining) = parse_text_tool_calls(&self.text, &self.names);
                    if calls.is_empty() {
                        self.flush(out);
                    } else {
                        if !self.streaming && !remaining.is_empty() {
                            out.push(StreamEvent::TextDelta(remaining));
                        }
                        self.streaming = true;
                        for call in calls {
                            let index = self.next_index;
                            self.next_index += 1;
                            out.push(StreamEvent::ToolCallStart { index, id: synthesize_call_id(), name: call.name });
                            out.push(StreamEvent::ToolCallDelta { index, json: call.arguments.to_string() });
                        }
                        reason = Some("tool_calls".into());
                    }
                }
                out.push(StreamEvent::Stop { reason });
            }
            other => out.push(other),
        }
    }

    /// Emits held text (the stream ended without `Stop`, or a native call came).
    pub fn flush(&mut self, out: &mut Vec<StreamEvent>) {
        if !self.streaming && !self.text.is_empty() {
            out.push(StreamEvent::TextDelta(self.text.clone()));
        }
        self.streaming = true;
    }
}

/// Applies a [`TextToolCallFilter`] to a [`ModelStream`].
pub fn filter_text_tool_calls(inner: ModelStream, names: Vec<String>) -> ModelStream {
    if names.is_empty() {
        return inner;
    }
    Box::pin(FilteredStream { inner: Some(inner), filter: TextToolCallFilter::new(names), pending: VecDeque::new() })
}

struct FilteredStream {
    inner: Option<ModelStream>,
    filter: TextToolCallFilter,
    pending: VecDeque<Result<StreamEvent, ProviderError>>,
}

impl Stream for FilteredStream {
    type Item = Result<StreamEvent, ProviderError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(item) = this.pending.pop_front() {
                return Poll::Ready(Some(item));
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            let mut out = Vec::new();
            match inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(event))) => this.filter.push(event, &mut out),
                Poll::Ready(Some(Err(e))) => {
                    this.filter.flush(&mut out);
                    this.pending.extend(out.drain(..).map(Ok));
                    this.pending.push_back(Err(e));
                    this.inner = None;
                    continue;
                }
                Poll::Ready(None) => {
                    this.filter.flush(&mut out);
                    this.inner = None;
                }
            }
            this.pending.extend(out.into_iter().map(Ok));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const NAMES: &[&str] = &["shell", "read_file"];

    fn one(text: &str) -> (Vec<TextToolCall>, String) {
        parse_text_tool_calls(text, NAMES)
    }

    fn call(name: &str, arguments: Value) -> TextToolCall {
        TextToolCall { name: name.into(), arguments }
    }

    #[test]
    fn bare_and_wrapped_json() {
        assert_eq!(
            one(r#"{"name": "shell", "arguments": {"command": "ls"}}"#),
            (vec![call("shell", json!({"command":"ls"}))], String::new())
        );
        assert_eq!(
            one(r#"Sure. {"tool_call": {"name": "read_file", "parameters": {"path": "a"}}} done"#),
            (vec![call("read_file", json!({"path":"a"}))], "Sure.  done".into())
        );
        assert_eq!(
            one(r#"{"type":"function","function":{"name":"shell","arguments":"{\"command\":\"pwd\"}"}}"#).0,
            vec![call("shell", json!({"command":"pwd"}))]
        );
        assert_eq!(
            one(r#"[{"name":"shell","arguments":{"command":"a"}},{"name":"shell","arguments":{"command":"b"}}]"#).0,
            vec![call("shell", json!({"command":"a"})), call("shell", json!({"command":"b"}))]
        );
        assert_eq!(one(r#"{"function": "shell", "args": {}}"#).0, vec![call("shell", json!({}))]);
    }

    #[test]
    fn fences_and_tags() {
        let (calls, rest) =
            one("I will list.\n```json\n{\"name\":\"shell\",\"arguments\":{\"command\":\"ls\"}}\n```\n");
        assert_eq!(calls, vec![call("shell", json!({"command":"ls"}))]);
        assert_eq!(rest, "I will list.");
        let (calls, rest) =
            one("<tool_call>\n{\"name\": \"shell\", \"arguments\": {\"command\": \"ls\"}}\n</tool_call>");
        assert_eq!((calls, rest), (vec![call("shell", json!({"command":"ls"}))], String::new()));
        let (calls, _) = one("<function=read_file>{\"path\": \"x.rs\"}</function>");
        assert_eq!(calls, vec![call("read_file", json!({"path":"x.rs"}))]);
        let (calls, _) =
            one("<function=shell>\n<parameter=command>\nls -la\n</parameter>\n<parameter=timeout>5</parameter>\n");
        assert_eq!(calls, vec![call("shell", json!({"command":"ls -la","timeout":5}))]);
        // Unclosed tool_call at the end.
        assert_eq!(one("<tool_call>{\"name\":\"shell\",\"arguments\":{}}").0, vec![call("shell", json!({}))]);
    }

    /// Tool calls as the local models whose chat templates offer tools write them (the formats
    /// their templates ask for and show in the conversation: see crates/local/tests/templates.rs).
    #[test]
    fn the_formats_local_models_emit() {
        let names = ["get_current_temperature", "get_temperature_date", "get_weather", "get_stock_fundamentals"];
        let parse = |text: &str| parse_text_tool_calls(text, &names);

        // Qwen 2.5 / Qwen 3: one <tool_call> block per call, several in a row.
        let qwen = "<tool_call>\n{\"name\": \"get_current_temperature\", \"arguments\": {\"location\": \"San Francisco, CA, USA\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_temperature_date\", \"arguments\": {\"location\": \"San Francisco, CA, USA\", \"date\": \"2024-10-01\"}}\n</tool_call>";
        assert_eq!(
            parse(qwen),
            (
                vec![
                    call("get_current_temperature", json!({"location": "San Francisco, CA, USA"})),
                    call("get_temperature_date", json!({"location": "San Francisco, CA, USA", "date": "2024-10-01"})),
                ],
                String::new()
            )
        );
        // With text before (Qwen 2.5 often says what it does), and Qwen 3's thinking.
        let (calls, rest) = parse(&format!("I'll check both.\n\n{qwen}"));
        assert_eq!((calls.len(), rest.as_str()), (2, "I'll check both."));
        let (calls, rest) = parse(&format!("<think>\nThe user wants temperatures.\n</think>\n\n{qwen}"));
        assert_eq!((calls.len(), rest.as_str()), (2, "<think>\nThe user wants temperatures.\n</think>"));

        // Hermes 2 Pro / Hermes 3: arguments first.
        let hermes =
            "<tool_call>\n{\"arguments\": {\"symbol\": \"TSLA\"}, \"name\": \"get_stock_fundamentals\"}\n</tool_call>";
        assert_eq!(parse(hermes), (vec![call("get_stock_fundamentals", json!({"symbol": "TSLA"}))], String::new()));

        // SmolLM3 (thinking mode): reasoning, then the Hermes block.
        let smollm3 = "<think>\nI need the weather in Copenhagen, so I call get_weather.\n</think>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Copenhagen\"}}\n</tool_call>";
        let (calls, rest) = parse(smollm3);
        assert_eq!(calls, vec![call("get_weather", json!({"city": "Copenhagen"}))]);
        assert_eq!(rest, "<think>\nI need the weather in Copenhagen, so I call get_weather.\n</think>");

        // Llama 3.1 / 3.2 (JSON tool calling): a bare object with "parameters", with or without
        // the <|python_tag|> token, several separated by ";".
        let llama =
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"San Francisco, CA\", \"unit\": \"fahrenheit\"}}";
        let expected = vec![call("get_weather", json!({"city": "San Francisco, CA", "unit": "fahrenheit"}))];
        assert_eq!(parse(llama), (expected.clone(), String::new()));
        assert_eq!(parse(&format!("<|python_tag|>{llama}")), (expected.clone(), String::new()));
        assert_eq!(
            parse("{\"type\": \"function\", \"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}"),
            (vec![call("get_weather", json!({"city": "Paris"}))], String::new())
        );
        assert_eq!(
            parse(
                "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}; {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}"
            ),
            (
                vec![call("get_weather", json!({"city": "Paris"})), call("get_weather", json!({"city": "Oslo"}))],
                String::new()
            )
        );
        // Parameters given as a JSON string (smaller Llamas do).
        assert_eq!(
            parse("{\"name\": \"get_weather\", \"parameters\": \"{\\\"city\\\": \\\"Rome\\\"}\"}").0,
            vec![call("get_weather", json!({"city": "Rome"}))]
        );
        // Text around a call stays; an unknown tool's <|python_tag|> call is left alone.
        let (calls, rest) = parse(&format!("Checking.\n<|python_tag|>{llama}"));
        assert_eq!((calls, rest.as_str()), (expected, "Checking."));
        let unknown = "<|python_tag|>{\"name\": \"brave_search\", \"parameters\": {\"query\": \"x\"}}";
        assert_eq!(parse(unknown), (vec![], unknown.to_owned()));

        // Qwen3-Coder: <function=...> inside <tool_call>.
        let coder =
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>";
        assert_eq!(parse(coder), (vec![call("get_weather", json!({"city": "Paris"}))], String::new()));
    }

    #[test]
    fn the_filter_holds_llama_python_tag_calls() {
        let mut f = TextToolCallFilter::new(vec!["get_weather".into()]);
        let mut out = Vec::new();
        for piece in ["<|python", "_tag|>{\"name\": \"get_weather\", ", "\"parameters\": {\"city\": \"Paris\"}}"] {
            f.push(StreamEvent::TextDelta(piece.into()), &mut out);
        }
        assert!(out.is_empty(), "held: {out:?}");
        f.push(StreamEvent::Stop { reason: None }, &mut out);
        assert!(matches!(&out[0], StreamEvent::ToolCallStart { name, .. } if name == "get_weather"), "{out:?}");
        assert_eq!(out[1], StreamEvent::ToolCallDelta { index: 0, json: "{\"city\":\"Paris\"}".into() });
        assert_eq!(out.len(), 3, "{out:?}");
    }

    #[test]
    fn unknown_names_and_plain_json_are_left_alone() {
        let text = r#"Example: {"name": "rm_rf", "arguments": {}} and {"a": 1}"#;
        assert_eq!(one(text), (vec![], text.into()));
        assert_eq!(one("no calls here").0, vec![]);
        assert_eq!(one("```rust\nfn main() {}\n```").0, vec![]);
    }

    #[test]
    fn filter_turns_held_text_into_calls() {
        let mut f = TextToolCallFilter::new(vec!["shell".into()]);
        let mut out = Vec::new();
        for piece in ["{\"name\": \"sh", "ell\", \"arguments\": {\"command\": \"ls\"}}"] {
            f.push(StreamEvent::TextDelta(piece.into()), &mut out);
        }
        assert!(out.is_empty(), "held: {out:?}");
        f.push(StreamEvent::Stop { reason: Some("stop".into()) }, &mut out);
        assert!(matches!(&out[0], StreamEvent::ToolCallStart { index: 0, name, .. } if name == "shell"));
        assert_eq!(out[1], StreamEvent::ToolCallDelta { index: 0, json: "{\"command\":\"ls\"}".into() });
        assert_eq!(out[2], StreamEvent::Stop { reason: Some("tool_calls".into()) });
    }

    #[test]
    fn filter_streams_prose_and_respects_native_calls() {
        let mut f = TextToolCallFilter::new(vec!["shell".into()]);
        let mut out = Vec::new();
        f.push(StreamEvent::TextDelta("Hel".into()), &mut out);
        f.push(StreamEvent::TextDelta("lo".into()), &mut out);
        f.push(StreamEvent::Stop { reason: None }, &mut out);
        assert_eq!(
            out,
            vec![
                StreamEvent::TextDelta("Hel".into()),
                StreamEvent::TextDelta("lo".into()),
                StreamEvent::Stop { reason: None }
            ]
        );
        let mut f = TextToolCallFilter::new(vec!["shell".into()]);
        let mut out = Vec::new();
        f.push(StreamEvent::TextDelta("{\"name\":\"shell\",\"arguments\":{}}".into()), &mut out);
        f.push(StreamEvent::ToolCallStart { index: 0, id: "n".into(), name: "shell".into() }, &mut out);
        f.push(StreamEvent::Stop { reason: None }, &mut out);
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(matches!(out[0], StreamEvent::TextDelta(_)));
    }

    #[test]
    fn ids_are_unique() {
        assert_ne!(synthesize_call_id(), synthesize_call_id());
    }

    proptest! {
        #[test]
        fn never_panics(text in "\\PC{0,200}") {
            let _ = parse_text_tool_calls(&text, NAMES);
        }

        #[test]
        fn never_panics_on_tag_soup(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just("<tool_call>"), Just("</tool_call>"), Just("<function="), Just("</function>"),
                    Just("<parameter="), Just("</parameter>"), Just(">"), Just("```"), Just("```json\n"),
                    Just("{"), Just("}"), Just("["), Just("\"name\":\"shell\""), Just(","), Just("\"arguments\":"),
                    Just("é"), Just("\n"), Just("shell"), Just("<|python_tag|>"), Just(";"),
                ],
                0..40,
            )
        ) {
            let text: String = parts.concat();
            let (calls, rest) = parse_text_tool_calls(&text, NAMES);
            prop_assert!(rest.len() <= text.len());
            for c in calls {
                prop_assert!(NAMES.contains(&c.name.as_str()));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod parser_fuzz {
    use crate::http::{BodyDecoder, LineParser};
    use crate::{GeminiStreamParser, NdjsonStreamDecoder, OllamaStreamParser, ResponsesStreamParser, SseStreamDecoder};
    use proptest::prelude::*;

    proptest! {
        /// Arbitrary bytes never panic the stream decoders; they end in events or an error.
        #[test]
        fn stream_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), split in 0usize..300) {
            let split = split.min(bytes.len());
            let mut out = Vec::new();
            let mut sse = SseStreamDecoder::new(ResponsesStreamParser::new("p"));
            let _ = sse.feed(&bytes[..split], &mut out).and_then(|_| sse.feed(&bytes[split..], &mut out)).and_then(|_| sse.finish(&mut out));
            let mut sse = SseStreamDecoder::new(GeminiStreamParser::new("p"));
            let _ = sse.feed(&bytes, &mut out).and_then(|_| sse.finish(&mut out));
            let mut nd = NdjsonStreamDecoder::new(OllamaStreamParser::new("p"));
            let _ = nd.feed(&bytes[..split], &mut out).and_then(|_| nd.feed(&bytes[split..], &mut out)).and_then(|_| BodyDecoder::finish(&mut nd, &mut out));
            let mut p = OllamaStreamParser::new("p");
            let _ = p.on_line(&String::from_utf8_lossy(&bytes), &mut out);
        }

        /// Arbitrary JSON-ish payloads in the right event shapes never panic either.
        #[test]
        fn json_payloads_never_panic(
            kind in prop_oneof![
                Just("response.output_item.added"), Just("response.output_item.done"), Just("response.output_text.delta"),
                Just("response.function_call_arguments.delta"), Just("response.completed"), Just("response.failed"), Just("error"),
            ],
            item_kind in prop_oneof![Just("message"), Just("function_call"), Just("reasoning"), Just("other")],
            id in prop_oneof![Just(None), Just(Some("a")), Just(Some("b"))],
            index in prop_oneof![Just(None), Just(Some(0u64)), Just(Some(1u64))],
        ) {
            let mut p = ResponsesStreamParser::new("p");
            let mut out = Vec::new();
            let item = serde_json::json!({"type": item_kind, "id": id, "call_id": id, "name": "t", "arguments": "{}",
                "content": [{"type": "output_text", "text": "x"}], "summary": [{"type": "summary_text", "text": "s"}]});
            let event = serde_json::json!({"type": kind, "item": item, "item_id": id, "output_index": index, "delta": "d"});
            for _ in 0..3 {
                let _ = p.feed_into(None, &event.to_string(), &mut out);
            }
        }
    }
}
