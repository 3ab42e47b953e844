//! OpenAI Chat Completions, streaming (also OpenAI-compatible servers).

use async_trait::async_trait;
use descartes_core::{ModelRequest, ModelStream, Provider, ProviderError, StreamEvent};
use descartes_protocol::{ContentPart, Role, Usage};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::ProviderSettings;
use crate::http::{Auth, Endpoint, SseEventParser, excerpt, response_stream};
use crate::sse::SseEvent;
use crate::text_tools::filter_text_tool_calls;

/// OpenAI Chat Completions backend (`POST {base_url}/chat/completions`, bearer auth).
#[derive(Clone)]
pub struct OpenAiProvider {
    endpoint: Endpoint,
    url: String,
}

impl std::fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiProvider").field("settings", &self.endpoint.settings).finish()
    }
}

impl OpenAiProvider {
    /// Checks the settings (base URL) and builds the HTTP client. A missing key is not an
    /// error here; [`Provider::stream`] reports it.
    pub fn new(settings: ProviderSettings) -> Result<Self, ProviderError> {
        let endpoint = Endpoint::new(settings)?;
        let url = format!("{}/chat/completions", endpoint.settings.base_url);
        Ok(Self { endpoint, url })
    }

    /// The settings, base URL normalised.
    pub fn settings(&self) -> &ProviderSettings {
        &self.endpoint.settings
    }

    /// The URL requests are sent to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Probe: `GET {base}/models` with the key (the cheapest authenticated call).
    pub async fn check(&self) -> Result<(), ProviderError> {
        self.list_models().await.map(|_| ())
    }

    /// The model ids of `GET {base}/models` (`{"data":[{"id":...}]}`).
    pub async fn list_models(&self) -> Result<Vec<String>, ProviderError> {
        let headers = self.endpoint.auth_headers(Auth::Bearer)?;
        let url = format!("{}/models", self.endpoint.settings.base_url);
        let listing = self.endpoint.get_json(&url, headers).await?;
        Ok(model_ids(&listing, "data", "id"))
    }
}

/// `listing[list_key][*][id_key]` as strings.
pub(crate) fn model_ids(listing: &Value, list_key: &str, id_key: &str) -> Vec<String> {
    listing
        .get(list_key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| m.get(id_key).and_then(Value::as_str))
        .map(str::to_owned)
        .collect()
}

#[async_trait]
impl Provider for OpenAiProvider {
    fn name(&self) -> &str {
        self.endpoint.name()
    }

    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ProviderError> {
        let name = self.endpoint.name();
        let headers = self.endpoint.auth_headers(Auth::Bearer)?;
        let body = self.endpoint.encode(&build_openai_body(&request))?;
        let response = self.endpoint.post(&self.url, headers, body).await?;
        let stream = response_stream(response, OpenAiStreamParser::new(name));
        if self.endpoint.settings.text_tool_calls {
            let names = request.tools.iter().map(|t| t.name.clone()).collect();
            return Ok(filter_text_tool_calls(stream, names));
        }
        Ok(stream)
    }
}

/// The JSON body of a streamed Chat Completions request.
///
/// Mapping: the system prompt is the first message (role `system`); assistant `ToolUse` parts
/// become `tool_calls` (`arguments` is the JSON text of the input); the `ToolResult` parts of a
/// user message become separate `tool` messages, in order, before the rest of that message's
/// text; `Thinking` parts are dropped.
pub fn build_openai_body(request: &ModelRequest) -> Value {
    let mut messages = Vec::with_capacity(request.messages.len() + 1);
    if let Some(system) = &request.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    for message in request.messages.iter() {
        match message.role {
            Role::System => {
                let text = join_text(&message.content);
                if !text.is_empty() {
                    messages.push(json!({"role": "system", "content": text}));
                }
            }
            Role::User => {
                for part in &message.content {
                    if let ContentPart::ToolResult { tool_use_id, content, .. } = part {
                        messages.push(json!({"role": "tool", "tool_call_id": tool_use_id, "content": content}));
                    }
                }
                let has_text = message.content.iter().any(|p| matches!(p, ContentPart::Text { .. }));
                if has_text {
                    messages.push(json!({"role": "user", "content": join_text(&message.content)}));
                }
            }
            Role::Assistant => {
                let text = join_text(&message.content);
                let tool_calls: Vec<Value> = message
                    .tool_uses()
                    .map(|(id, name, input)| {
                        let arguments = match input {
                            // Invalid JSON the model produced is kept raw: send it back as it was.
                            Value::String(raw) => raw.clone(),
                            other => other.to_string(),
                        };
                        json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
                    })
                    .collect();
                let mut m = Map::new();
                m.insert("role".into(), "assistant".into());
                if tool_calls.is_empty() {
                    m.insert("content".into(), text.into());
                } else {
                    m.insert("content".into(), if text.is_empty() { Value::Null } else { text.into() });
                    m.insert("tool_calls".into(), tool_calls.into());
                }
                messages.push(Value::Object(m));
            }
        }
    }
    let mut body = Map::new();
    body.insert("model".into(), request.model.clone().into());
    body.insert("messages".into(), messages.into());
    if !request.tools.is_empty() {
        let tools: Vec<Value> = request
            .tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.input_schema,
                }})
            })
            .collect();
        body.insert("tools".into(), tools.into());
    }
    if let Some(max) = request.max_tokens {
        body.insert("max_tokens".into(), max.into());
    }
    if let Some(t) = request.temperature {
        body.insert("temperature".into(), json!(t));
    }
    body.insert("stream".into(), true.into());
    body.insert("stream_options".into(), json!({"include_usage": true}));
    Value::Object(body)
}

pub(crate) fn join_text(parts: &[ContentPart]) -> String {
    let mut texts = parts.iter().filter_map(|p| match p {
        ContentPart::Text { text } => Some(text.as_str()),
        _ => None,
    });
    let first = texts.next().unwrap_or_default().to_owned();
    texts.fold(first, |mut acc, t| {
        acc.push('\n');
        acc.push_str(t);
        acc
    })
}

// ---- stream parsing ----

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    choices: Option<Vec<WireChoice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
    /// DeepSeek, vLLM.
    #[serde(default)]
    reasoning_content: Option<String>,
    /// OpenRouter, Ollama.
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
}

#[derive(Deserialize)]
struct WireToolCall {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<WireFunction>,
}

#[derive(Deserialize)]
struct WireFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<WireTokenDetails>,
}

#[derive(Deserialize)]
struct WireTokenDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Debug)]
struct ToolSlot {
    wire_index: u64,
    id: Option<String>,
    name: Option<String>,
    started: bool,
    /// Argument fragments received before the name (emitted once the call starts).
    pending: String,
}

/// State machine from Chat Completions SSE `data:` payloads to [`StreamEvent`]s.
///
/// * `delta.content` → `TextDelta`; `delta.reasoning_content` / `delta.reasoning` →
///   `ThinkingDelta` (compatible servers);
/// * tool-call fragments are joined by `index`: `ToolCallStart` when the name first appears,
///   `ToolCallDelta` per arguments fragment (a new `id` on a used index starts a new call;
///   calls without an `id` get `call_N`);
/// * `usage` (any chunk) → `Usage` (`prompt_tokens` → input, `completion_tokens` → output,
///   `prompt_tokens_details.cached_tokens` → cache read);
/// * `finish_reason` is remembered; `[DONE]` → `Stop`. Only choice 0 is read.
#[derive(Debug)]
pub struct OpenAiStreamParser {
    provider: String,
    finish_reason: Option<String>,
    done: bool,
    tools: Vec<ToolSlot>,
}

impl OpenAiStreamParser {
    pub fn new(provider: impl Into<String>) -> Self {
        Self { provider: provider.into(), finish_reason: None, done: false, tools: Vec::new() }
    }

    /// Handles one `data:` payload.
    pub fn feed(&mut self, data: &str) -> Result<Vec<StreamEvent>, ProviderError> {
        let mut out = Vec::new();
        self.feed_into(data, &mut out)?;
        Ok(out)
    }

    /// The stream ended without `[DONE]`: `Stop` if a `finish_reason` came, else an error.
    pub fn finish(&mut self) -> Result<Vec<StreamEvent>, ProviderError> {
        let mut out = Vec::new();
        self.on_end(&mut out)?;
        Ok(out)
    }

    pub fn finish_reason(&self) -> Option<&str> {
        self.finish_reason.as_deref()
    }

    /// Like [`feed`](Self::feed), appending to `out` (no allocation per call).
    pub fn feed_into(&mut self, data: &str, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        if self.done {
            return Ok(());
        }
        let trimmed = data.trim();
        if trimmed == "[DONE]" {
            self.stop(out);
            return Ok(());
        }
        if trimmed.is_empty() {
            return Ok(());
        }
        let chunk: WireChunk = serde_json::from_str(trimmed).map_err(|e| ProviderError::Protocol {
            provider: self.provider.clone(),
            message: format!("invalid JSON in stream ({e}): {}", excerpt(trimmed, 200)),
        })?;
        if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
            return Err(stream_error(&self.provider, &error));
        }
        for choice in chunk.choices.into_iter().flatten() {
            if choice.index.unwrap_or(0) != 0 {
                continue;
            }
            if let Some(delta) = choice.delta {
                if let Some(thinking) = delta.reasoning_content.or(delta.reasoning).filter(|t| !t.is_empty()) {
                    out.push(StreamEvent::ThinkingDelta(thinking));
                }
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    out.push(StreamEvent::TextDelta(text));
                }
                for (position, call) in delta.tool_calls.into_iter().flatten().enumerate() {
                    self.tool_fragment(position, call, out);
                }
            }
            if let Some(reason) = choice.finish_reason.filter(|r| !r.is_empty())
                && self.finish_reason.is_none()
            {
                self.finish_reason = Some(reason);
            }
        }
        if let Some(usage) = chunk.usage {
            let cache_read = usage.prompt_tokens_details.and_then(|d| d.cached_tokens).unwrap_or(0);
            out.push(StreamEvent::Usage(Usage {
                input_tokens: usage.prompt_tokens.unwrap_or(0),
                output_tokens: usage.completion_tokens.unwrap_or(0),
                cache_read_tokens: cache_read,
                cache_write_tokens: 0,
                ..Usage::default()
            }));
        }
        Ok(())
    }

    fn tool_fragment(&mut self, position: usize, call: WireToolCall, out: &mut Vec<StreamEvent>) {
        let wire_index = call.index.unwrap_or(position as u64);
        let (name, arguments) = match call.function {
            Some(f) => (f.name.filter(|n| !n.is_empty()), f.arguments),
            None => (None, None),
        };
        let id = call.id.filter(|i| !i.is_empty());
        let existing = self.tools.iter().rposition(|t| t.wire_index == wire_index);
        let slot = match existing {
            // A different id on a used index: a server that numbers every call 0.
            Some(i) if !matches!((&id, &self.tools[i].id), (Some(new), Some(old)) if new != old) => i,
            _ => {
                self.tools.push(ToolSlot { wire_index, id: None, name: None, started: false, pending: String::new() });
                self.tools.len() - 1
            }
        };
        let tool = &mut self.tools[slot];
        if tool.id.is_none() {
            tool.id = id;
        }
        if tool.name.is_none() {
            tool.name = name;
        }
        let arguments = arguments.filter(|a| !a.is_empty());
        if tool.started {
            if let Some(json) = arguments {
                out.push(StreamEvent::ToolCallDelta { index: slot, json });
            }
        } else {
            if let Some(json) = arguments {
                tool.pending.push_str(&json);
            }
            if tool.name.is_some() {
                start_tool(slot, tool, out);
            }
        }
    }

    fn stop(&mut self, out: &mut Vec<StreamEvent>) {
        for (slot, tool) in self.tools.iter_mut().enumerate() {
            if !tool.started {
                start_tool(slot, tool, out);
            }
        }
        out.push(StreamEvent::Stop { reason: self.finish_reason.clone() });
        self.done = true;
    }
}

fn start_tool(slot: usize, tool: &mut ToolSlot, out: &mut Vec<StreamEvent>) {
    tool.started = true;
    let id = tool.id.clone().unwrap_or_else(|| format!("call_{slot}"));
    out.push(StreamEvent::ToolCallStart { index: slot, id, name: tool.name.clone().unwrap_or_default() });
    if !tool.pending.is_empty() {
        out.push(StreamEvent::ToolCallDelta { index: slot, json: std::mem::take(&mut tool.pending) });
    }
}

/// `{"error":{...}}` inside the stream.
pub(crate) fn stream_error(provider: &str, error: &Value) -> ProviderError {
    let (kind, message) = match error {
        Value::Object(e) => {
            let field = |k: &str| match e.get(k) {
                Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                _ => None,
            };
            let kind = field("type").or_else(|| field("code")).unwrap_or_else(|| "error".into());
            let message = field("message").unwrap_or_else(|| excerpt(&error.to_string(), 500));
            (kind, message)
        }
        Value::String(s) => ("error".to_owned(), excerpt(s, 2000)),
        other => ("error".to_owned(), excerpt(&other.to_string(), 500)),
    };
    let code = error.get("code").and_then(Value::as_str).unwrap_or_default();
    let retryable = !matches!(
        kind.as_str(),
        "invalid_request_error"
            | "authentication_error"
            | "permission_error"
            | "not_found_error"
            | "insufficient_quota"
            | "invalid_api_key"
    ) && !matches!(code, "insufficient_quota" | "invalid_api_key" | "context_length_exceeded");
    ProviderError::Stream { provider: provider.to_owned(), kind, message, retryable }
}

impl SseEventParser for OpenAiStreamParser {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        self.feed_into(&event.data, out)
    }

    fn on_end(&mut self, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        if self.done {
            return Ok(());
        }
        if self.finish_reason.is_some() {
            self.stop(out);
            return Ok(());
        }
        Err(ProviderError::Protocol {
            provider: self.provider.clone(),
            message: "stream ended before the response was complete".into(),
        })
    }

    fn is_done(&self) -> bool {
        self.done
    }

    fn provider(&self) -> &str {
        &self.provider
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use descartes_core::ResponseAssembler;
    use descartes_protocol::{Message, ToolSpec};

    fn feed_all(p: &mut OpenAiStreamParser, lines: &[&str]) -> Vec<StreamEvent> {
        let mut out = Vec::new();
        for l in lines {
            p.feed_into(l, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn protocol_example_tool_call() {
        let mut p = OpenAiStreamParser::new("openai");
        let events = feed_all(
            &mut p,
            &[
                r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","tool_calls":[{"index":0,"id":"call_abc","type":"function","function":{"name":"get_weather","arguments":""}}]},"finish_reason":null}]}"#,
                r#"{"id":"chatcmpl-1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]},"finish_reason":null}]}"#,
                r#"{"id":"chatcmpl-1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"SF\"}"}}]},"finish_reason":null}]}"#,
                r#"{"id":"chatcmpl-1","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
                r#"{"id":"chatcmpl-1","choices":[],"usage":{"prompt_tokens":82,"completion_tokens":17,"total_tokens":99}}"#,
                "[DONE]",
            ],
        );
        assert_eq!(
            events,
            vec![
                StreamEvent::ToolCallStart { index: 0, id: "call_abc".into(), name: "get_weather".into() },
                StreamEvent::ToolCallDelta { index: 0, json: "{\"city\":".into() },
                StreamEvent::ToolCallDelta { index: 0, json: "\"SF\"}".into() },
                StreamEvent::Usage(Usage { input_tokens: 82, output_tokens: 17, ..Usage::default() }),
                StreamEvent::Stop { reason: Some("tool_calls".into()) },
            ]
        );
        assert!(p.is_done());
        assert!(p.feed("{\"garbage\"").unwrap().is_empty(), "ignored after [DONE]");
    }

    #[test]
    fn parallel_tool_calls_and_text() {
        let mut p = OpenAiStreamParser::new("openai");
        let events = feed_all(
            &mut p,
            &[
                r#"{"choices":[{"index":0,"delta":{"content":"Let me check."}}]}"#,
                r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"x","arguments":"{}"}},{"index":1,"id":"b","function":{"name":"y","arguments":"{\"k\""}}]}}]}"#,
                r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":":1}"}}]}}]}"#,
                r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}],"usage":null}"#,
                "[DONE]",
            ],
        );
        let mut a = ResponseAssembler::default();
        for e in events {
            a.push(e);
        }
        assert_eq!(a.stop_reason.as_deref(), Some("tool_calls"));
        let parts = a.finish();
        assert_eq!(parts[0], ContentPart::text("Let me check."));
        assert_eq!(parts[1], ContentPart::ToolUse { id: "a".into(), name: "x".into(), input: json!({}) });
        assert_eq!(parts[2], ContentPart::ToolUse { id: "b".into(), name: "y".into(), input: json!({"k":1}) });
    }

    #[test]
    fn calls_all_numbered_zero_with_distinct_ids_are_separate() {
        let mut p = OpenAiStreamParser::new("compat");
        let events = feed_all(
            &mut p,
            &[
                r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"a","function":{"name":"x","arguments":"{\"n\":1}"}}]}}]}"#,
                r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"b","function":{"name":"x","arguments":"{\"n\":2}"}}]}}]}"#,
                r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
            ],
        );
        let mut a = ResponseAssembler::default();
        for e in events.into_iter().chain(p.finish().unwrap()) {
            a.push(e);
        }
        let parts = a.finish();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1], ContentPart::ToolUse { id: "b".into(), name: "x".into(), input: json!({"n":2}) });
    }

    #[test]
    fn missing_id_gets_one_and_early_arguments_are_kept() {
        let mut p = OpenAiStreamParser::new("compat");
        let events = feed_all(
            &mut p,
            &[
                r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"a\""}}]}}]}"#,
                r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"t","arguments":":2}"}}]}}]}"#,
                r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
                "[DONE]",
            ],
        );
        assert_eq!(events[0], StreamEvent::ToolCallStart { index: 0, id: "call_0".into(), name: "t".into() });
        assert_eq!(events[1], StreamEvent::ToolCallDelta { index: 0, json: "{\"a\":2}".into() });
        assert_eq!(events[2], StreamEvent::Stop { reason: Some("tool_calls".into()) });
    }

    #[test]
    fn usage_with_cached_tokens_and_unknown_fields() {
        let mut p = OpenAiStreamParser::new("openai");
        let out = p
            .feed(r#"{"choices":null,"system_fingerprint":"x","usage":{"prompt_tokens":100,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":64,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":3}}}"#)
            .unwrap();
        assert_eq!(
            out,
            vec![StreamEvent::Usage(Usage {
                input_tokens: 100,
                output_tokens: 5,
                cache_read_tokens: 64,
                cache_write_tokens: 0,
                ..Usage::default()
            })]
        );
    }

    #[test]
    fn reasoning_content_is_thinking() {
        let mut p = OpenAiStreamParser::new("deepseek");
        let out = p.feed(r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hmm","content":null}}]}"#).unwrap();
        assert_eq!(out, vec![StreamEvent::ThinkingDelta("hmm".into())]);
    }

    #[test]
    fn end_handling() {
        let mut p = OpenAiStreamParser::new("openai");
        p.feed(r#"{"choices":[{"index":0,"delta":{"content":"hi"}}]}"#).unwrap();
        let err = p.finish().unwrap_err();
        assert!(matches!(&err, ProviderError::Protocol { message, .. } if message.contains("ended before")));

        let mut p = OpenAiStreamParser::new("openai");
        p.feed(r#"{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"length"}]}"#).unwrap();
        assert_eq!(p.finish().unwrap(), vec![StreamEvent::Stop { reason: Some("length".into()) }]);
    }

    #[test]
    fn malformed_and_error_payloads() {
        let mut p = OpenAiStreamParser::new("openai");
        let long = format!("{{\"choices\": [{}", "x".repeat(1000));
        match p.feed(&long).unwrap_err() {
            ProviderError::Protocol { message, .. } => assert!(message.len() < 400, "{message}"),
            other => panic!("{other:?}"),
        }
        let err = p.feed(r#"{"error":{"message":"boom","type":"server_error","code":null}}"#).unwrap_err();
        assert!(matches!(&err, ProviderError::Stream { kind, retryable: true, .. } if kind == "server_error"));
        let err = p.feed(r#"{"error":{"message":"no","type":"invalid_request_error"}}"#).unwrap_err();
        assert!(!err.is_retryable());
    }

    #[test]
    fn request_body_mapping() {
        let request = ModelRequest {
            model: "gpt-x".into(),
            system: Some("be brief".into()),
            messages: vec![
                Message::user_text("weather?"),
                Message::new(
                    Role::Assistant,
                    vec![
                        ContentPart::Thinking { text: "secret".into(), signature: Some("sig".into()) },
                        ContentPart::text("checking"),
                        ContentPart::ToolUse { id: "c1".into(), name: "w".into(), input: json!({"city":"SF"}) },
                        ContentPart::ToolUse { id: "c2".into(), name: "w".into(), input: Value::String("{bad".into()) },
                    ],
                ),
                Message::new(
                    Role::User,
                    vec![
                        ContentPart::ToolResult { tool_use_id: "c1".into(), content: "22C".into(), is_error: false },
                        ContentPart::ToolResult {
                            tool_use_id: "c2".into(),
                            content: "bad json".into(),
                            is_error: true,
                        },
                        ContentPart::text("thanks"),
                    ],
                ),
            ]
            .into(),
            tools: vec![ToolSpec {
                name: "w".into(),
                description: "weather".into(),
                input_schema: json!({"type":"object"}),
            }]
            .into(),
            max_tokens: Some(100),
            temperature: None,
        };
        let body = build_openai_body(&request);
        assert_eq!(
            body,
            json!({
                "model": "gpt-x",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": "checking", "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{\"city\":\"SF\"}"}},
                        {"id": "c2", "type": "function", "function": {"name": "w", "arguments": "{bad"}},
                    ]},
                    {"role": "tool", "tool_call_id": "c1", "content": "22C"},
                    {"role": "tool", "tool_call_id": "c2", "content": "bad json"},
                    {"role": "user", "content": "thanks"},
                ],
                "tools": [{"type": "function", "function": {"name": "w", "description": "weather", "parameters": {"type": "object"}}}],
                "max_tokens": 100,
                "stream": true,
                "stream_options": {"include_usage": true},
            })
        );
        let bare = build_openai_body(&ModelRequest {
            model: "m".into(),
            system: None,
            messages: vec![Message::user_text("hi")].into(),
            tools: vec![].into(),
            max_tokens: None,
            temperature: Some(0.5),
        });
        assert!(bare.get("tools").is_none());
        assert!(bare.get("max_tokens").is_none());
        assert_eq!(bare["temperature"], json!(0.5));
        assert_eq!(bare["messages"], json!([{"role":"user","content":"hi"}]));
    }
}
