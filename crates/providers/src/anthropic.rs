//! Anthropic Messages, streaming.

use async_trait::async_trait;
use descartes_core::{ModelRequest, ModelStream, Provider, ProviderError, StreamEvent};
use descartes_protocol::{ContentPart, Role, Usage};
use reqwest::header::HeaderValue;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::http::{Auth, Endpoint, SseEventParser, excerpt, insert_header, response_stream};
use crate::sse::SseEvent;
use crate::{ANTHROPIC_DEFAULT_MAX_TOKENS, ANTHROPIC_VERSION, ProviderSettings};

/// Anthropic Messages backend (`POST {base_url}/v1/messages`, `x-api-key` auth).
#[derive(Clone)]
pub struct AnthropicProvider {
    endpoint: Endpoint,
    url: String,
}

impl std::fmt::Debug for AnthropicProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnthropicProvider").field("settings", &self.endpoint.settings).finish()
    }
}

impl AnthropicProvider {
    /// Checks the settings (base URL) and builds the HTTP client. A missing key is not an
    /// error here; [`Provider::stream`] reports it.
    pub fn new(settings: ProviderSettings) -> Result<Self, ProviderError> {
        let endpoint = Endpoint::new(settings)?;
        let url = format!("{}/v1/messages", endpoint.settings.base_url);
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

    /// Probe: `GET {base}/v1/models` with the key (the cheapest authenticated call).
    pub async fn check(&self) -> Result<(), ProviderError> {
        self.list_models().await.map(|_| ())
    }

    /// The model ids of `GET {base}/v1/models` (first page).
    pub async fn list_models(&self) -> Result<Vec<String>, ProviderError> {
        let mut headers = self.endpoint.auth_headers(Auth::Header("x-api-key"))?;
        insert_header(&mut headers, "anthropic-version", HeaderValue::from_static(ANTHROPIC_VERSION));
        let url = format!("{}/v1/models", self.endpoint.settings.base_url);
        let listing = self.endpoint.get_json(&url, headers).await?;
        Ok(crate::openai::model_ids(&listing, "data", "id"))
    }
}

#[async_trait]
impl Provider for AnthropicProvider {
    fn name(&self) -> &str {
        self.endpoint.name()
    }

    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ProviderError> {
        let name = self.endpoint.name();
        let mut headers = self.endpoint.auth_headers(Auth::Header("x-api-key"))?;
        insert_header(&mut headers, "anthropic-version", HeaderValue::from_static(ANTHROPIC_VERSION));
        let body = self.endpoint.encode(&build_anthropic_body(&request))?;
        let response = self.endpoint.post(&self.url, headers, body).await?;
        Ok(response_stream(response, AnthropicStreamParser::new(name)))
    }
}

/// The JSON body of a streamed Messages request.
///
/// Mapping: `system` is a string (system-role messages are appended to it); content blocks are
/// `text` (empty ones dropped), `tool_use` (`input` must be an object: a raw invalid-JSON input
/// is sent as `{}`), `tool_result` (placed first in their message, as the API requires) and
/// `thinking` (only with a signature; unsigned thinking cannot be sent back). Messages left
/// without blocks are skipped.
pub fn build_anthropic_body(request: &ModelRequest) -> Value {
    let mut system = request.system.clone().unwrap_or_default();
    let mut messages = Vec::with_capacity(request.messages.len());
    for message in request.messages.iter() {
        let role = match message.role {
            Role::System => {
                let text = message.text();
                if !text.is_empty() {
                    if !system.is_empty() {
                        system.push_str("\n\n");
                    }
                    system.push_str(&text);
                }
                continue;
            }
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        let mut blocks = Vec::with_capacity(message.content.len());
        for part in &message.content {
            if let ContentPart::ToolResult { tool_use_id, content, is_error } = part {
                blocks.push(json!({"type": "tool_result", "tool_use_id": tool_use_id, "content": content, "is_error": is_error}));
            }
        }
        for part in &message.content {
            match part {
                ContentPart::Text { text } if !text.is_empty() => blocks.push(json!({"type": "text", "text": text})),
                ContentPart::Text { .. } | ContentPart::ToolResult { .. } => {}
                ContentPart::Thinking { text, signature: Some(signature) } => {
                    blocks.push(json!({"type": "thinking", "thinking": text, "signature": signature}))
                }
                ContentPart::Thinking { signature: None, .. } => {}
                ContentPart::ToolUse { id, name, input } => {
                    let input = match input {
                        Value::Object(_) => input.clone(),
                        Value::String(raw) => match serde_json::from_str::<Value>(raw) {
                            Ok(v @ Value::Object(_)) => v,
                            _ => Value::Object(Map::new()),
                        },
                        _ => Value::Object(Map::new()),
                    };
                    blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
                }
            }
        }
        if !blocks.is_empty() {
            messages.push(json!({"role": role, "content": blocks}));
        }
    }
    let mut body = Map::new();
    body.insert("model".into(), request.model.clone().into());
    body.insert("max_tokens".into(), request.max_tokens.unwrap_or(ANTHROPIC_DEFAULT_MAX_TOKENS).into());
    if request.system.is_some() || !system.is_empty() {
        body.insert("system".into(), system.into());
    }
    body.insert("messages".into(), messages.into());
    if !request.tools.is_empty() {
        let tools: Vec<Value> = request
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.input_schema}))
            .collect();
        body.insert("tools".into(), tools.into());
    }
    if let Some(t) = request.temperature {
        body.insert("temperature".into(), json!(t));
    }
    body.insert("stream".into(), true.into());
    Value::Object(body)
}

// ---- stream parsing ----

/// Every event's payload, flattened: each event type uses some of the fields.
#[derive(Deserialize)]
struct WireEvent {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    message: Option<WireMessage>,
    #[serde(default)]
    content_block: Option<WireBlock>,
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireBlock {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Value>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    partial_json: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

/// State machine from Messages SSE events to [`StreamEvent`]s.
///
/// `message_start` and `message_delta` usage are running totals (assigned, never added);
/// `Usage` is emitted whenever the combined totals change. `tool_use` blocks start tool calls
/// whose index is the content block index. `message_stop` → `Stop` with the `stop_reason` of
/// `message_delta`. `ping` and unknown events, block types and delta types are skipped.
/// `error` → [`ProviderError::Stream`] (retryable for `overloaded_error` and `api_error`).
#[derive(Debug)]
pub struct AnthropicStreamParser {
    provider: String,
    usage: Usage,
    emitted: Option<Usage>,
    stop_reason: Option<String>,
    /// Content block indexes that are `tool_use` blocks.
    tool_blocks: Vec<usize>,
    done: bool,
}

impl AnthropicStreamParser {
    pub fn new(provider: impl Into<String>) -> Self {
        Self {
            provider: provider.into(),
            usage: Usage::default(),
            emitted: None,
            stop_reason: None,
            tool_blocks: Vec::new(),
            done: false,
        }
    }

    /// Handles one SSE event (`event` is its `event:` name, `data` its payload).
    pub fn feed(&mut self, event: Option<&str>, data: &str) -> Result<Vec<StreamEvent>, ProviderError> {
        let mut out = Vec::new();
        self.feed_into(event, data, &mut out)?;
        Ok(out)
    }

    /// The stream ended: an error unless `message_stop` came.
    pub fn finish(&mut self) -> Result<Vec<StreamEvent>, ProviderError> {
        let mut out = Vec::new();
        self.on_end(&mut out)?;
        Ok(out)
    }

    /// The running usage totals.
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// Like [`feed`](Self::feed), appending to `out`.
    pub fn feed_into(
        &mut self,
        event: Option<&str>,
        data: &str,
        out: &mut Vec<StreamEvent>,
    ) -> Result<(), ProviderError> {
        if self.done {
            return Ok(());
        }
        let trimmed = data.trim();
        if trimmed.is_empty() {
            return Ok(());
        }
        let wire: WireEvent = serde_json::from_str(trimmed).map_err(|e| ProviderError::Protocol {
            provider: self.provider.clone(),
            message: format!("invalid JSON in stream ({e}): {}", excerpt(trimmed, 200)),
        })?;
        let kind = wire.kind.as_deref().or(event).unwrap_or_default();
        match kind {
            "message_start" => {
                if let Some(usage) = wire.message.and_then(|m| m.usage) {
                    self.assign_usage(&usage);
                }
            }
            "content_block_start" => {
                let (Some(index), Some(block)) = (wire.index, wire.content_block) else {
                    return Ok(());
                };
                match block.kind.as_deref() {
                    Some("text") => {
                        if let Some(text) = block.text.filter(|t| !t.is_empty()) {
                            out.push(StreamEvent::TextDelta(text));
                        }
                    }
                    Some("thinking") => {
                        if let Some(text) = block.thinking.filter(|t| !t.is_empty()) {
                            out.push(StreamEvent::ThinkingDelta(text));
                        }
                    }
                    Some("tool_use") => {
                        self.tool_blocks.push(index);
                        out.push(StreamEvent::ToolCallStart {
                            index,
                            id: block.id.unwrap_or_default(),
                            name: block.name.unwrap_or_default(),
                        });
                        // Normally `{}` with the arguments following as deltas.
                        if let Some(input) = block.input.filter(|i| i.as_object().is_some_and(|o| !o.is_empty())) {
                            out.push(StreamEvent::ToolCallDelta { index, json: input.to_string() });
                        }
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let (Some(index), Some(delta)) = (wire.index, wire.delta) else {
                    return Ok(());
                };
                match delta.kind.as_deref() {
                    Some("text_delta") => {
                        if let Some(text) = delta.text.filter(|t| !t.is_empty()) {
                            out.push(StreamEvent::TextDelta(text));
                        }
                    }
                    Some("input_json_delta") => {
                        if let Some(json) = delta.partial_json.filter(|j| !j.is_empty())
                            && self.tool_blocks.contains(&index)
                        {
                            out.push(StreamEvent::ToolCallDelta { index, json });
                        }
                    }
                    Some("thinking_delta") => {
                        if let Some(text) = delta.thinking.filter(|t| !t.is_empty()) {
                            out.push(StreamEvent::ThinkingDelta(text));
                        }
                    }
                    Some("signature_delta") => {
                        if let Some(signature) = delta.signature {
                            out.push(StreamEvent::ThinkingSignature(signature));
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(reason) = wire.delta.and_then(|d| d.stop_reason) {
                    self.stop_reason = Some(reason);
                }
                if let Some(usage) = wire.usage {
                    self.assign_usage(&usage);
                }
            }
            "message_stop" => {
                self.done = true;
                out.push(StreamEvent::Stop { reason: self.stop_reason.clone() });
                return Ok(());
            }
            "error" => return Err(stream_error(&self.provider, wire.error.as_ref())),
            // "ping", "content_block_stop" and whatever comes next.
            _ => return Ok(()),
        }
        if self.emitted != Some(self.usage) {
            self.emitted = Some(self.usage);
            out.push(StreamEvent::Usage(self.usage));
        }
        Ok(())
    }

    fn assign_usage(&mut self, usage: &WireUsage) {
        if let Some(v) = usage.input_tokens {
            self.usage.input_tokens = v;
        }
        if let Some(v) = usage.output_tokens {
            self.usage.output_tokens = v;
        }
        if let Some(v) = usage.cache_read_input_tokens {
            self.usage.cache_read_tokens = v;
        }
        if let Some(v) = usage.cache_creation_input_tokens {
            self.usage.cache_write_tokens = v;
        }
    }
}

fn stream_error(provider: &str, error: Option<&Value>) -> ProviderError {
    let field = |k: &str| error.and_then(|e| e.get(k)).and_then(Value::as_str).filter(|s| !s.is_empty());
    let kind = field("type").unwrap_or("error").to_owned();
    let message = field("message")
        .map(|m| excerpt(m, 2000))
        .or_else(|| error.map(|e| excerpt(&e.to_string(), 500)))
        .unwrap_or_else(|| "error event without details".into());
    let retryable = matches!(kind.as_str(), "overloaded_error" | "api_error");
    ProviderError::Stream { provider: provider.to_owned(), kind, message, retryable }
}

impl SseEventParser for AnthropicStreamParser {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        self.feed_into(event.event.as_deref(), &event.data, out)
    }

    fn on_end(&mut self, _out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        if self.done {
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

    const EXAMPLE: &[(&str, &str)] = &[
        (
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"m","stop_reason":null,"usage":{"input_tokens":25,"output_tokens":1}}}"#,
        ),
        (
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
        ),
        ("content_block_stop", r#"{"type":"content_block_stop","index":0}"#),
        (
            "content_block_start",
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{}}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"city\":"}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"\"SF\"}"}}"#,
        ),
        ("content_block_stop", r#"{"type":"content_block_stop","index":1}"#),
        ("ping", r#"{"type":"ping"}"#),
        (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":15}}"#,
        ),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ];

    fn run(events: &[(&str, &str)]) -> (Vec<StreamEvent>, AnthropicStreamParser) {
        let mut p = AnthropicStreamParser::new("anthropic");
        let mut out = Vec::new();
        for (e, d) in events {
            p.feed_into(Some(e), d, &mut out).unwrap();
        }
        (out, p)
    }

    #[test]
    fn protocol_example() {
        let (events, p) = run(EXAMPLE);
        assert!(p.is_done());
        assert_eq!(
            events,
            vec![
                StreamEvent::Usage(Usage { input_tokens: 25, output_tokens: 1, ..Usage::default() }),
                StreamEvent::TextDelta("Hello".into()),
                StreamEvent::ToolCallStart { index: 1, id: "toolu_1".into(), name: "get_weather".into() },
                StreamEvent::ToolCallDelta { index: 1, json: "{\"city\":".into() },
                StreamEvent::ToolCallDelta { index: 1, json: "\"SF\"}".into() },
                StreamEvent::Usage(Usage { input_tokens: 25, output_tokens: 15, ..Usage::default() }),
                StreamEvent::Stop { reason: Some("tool_use".into()) },
            ]
        );
        let mut a = ResponseAssembler::default();
        for e in events {
            a.push(e);
        }
        assert_eq!(a.usage.output_tokens, 15);
        assert_eq!(
            a.finish(),
            vec![
                ContentPart::text("Hello"),
                ContentPart::ToolUse { id: "toolu_1".into(), name: "get_weather".into(), input: json!({"city":"SF"}) },
            ]
        );
    }

    #[test]
    fn usage_is_assigned_and_cache_counted() {
        let (events, p) = run(&[
            (
                "message_start",
                r#"{"type":"message_start","message":{"usage":{"input_tokens":10,"output_tokens":1,"cache_read_input_tokens":7,"cache_creation_input_tokens":3}}}"#,
            ),
            ("message_delta", r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":5}}"#),
            ("message_delta", r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":9}}"#),
            ("message_delta", r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":9}}"#),
        ]);
        assert_eq!(
            p.usage(),
            Usage {
                input_tokens: 10,
                output_tokens: 9,
                cache_read_tokens: 7,
                cache_write_tokens: 3,
                ..Usage::default()
            }
        );
        assert_eq!(events.len(), 3, "unchanged usage is not re-emitted: {events:?}");
    }

    #[test]
    fn thinking_blocks() {
        let (events, _) = run(&[
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Let me"}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQB"}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":1,"content_block":{"type":"redacted_thinking","data":"x"}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"citations_delta","citation":{}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":2,"content_block":{"type":"text","text":""}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":2,"delta":{"type":"text_delta","text":"Hi"}}"#,
            ),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ]);
        let mut a = ResponseAssembler::default();
        for e in events {
            a.push(e);
        }
        assert_eq!(
            a.finish(),
            vec![
                ContentPart::Thinking { text: "Let me".into(), signature: Some("EqQB".into()) },
                ContentPart::text("Hi")
            ]
        );
    }

    #[test]
    fn errors_and_unknowns() {
        let mut p = AnthropicStreamParser::new("anthropic");
        assert!(p.feed(Some("brand_new_event"), r#"{"type":"brand_new_event","x":1}"#).unwrap().is_empty());
        assert!(p.feed(Some("ping"), r#"{"type":"ping"}"#).unwrap().is_empty());
        let err = p
            .feed(Some("error"), r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#)
            .unwrap_err();
        assert!(
            matches!(&err, ProviderError::Stream { kind, message, retryable: true, .. } if kind == "overloaded_error" && message == "Overloaded")
        );
        let err = p
            .feed(Some("error"), r#"{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}"#)
            .unwrap_err();
        assert!(!err.is_retryable());
        let err = p.feed(Some("message_start"), "{not json").unwrap_err();
        assert!(matches!(err, ProviderError::Protocol { .. }));
        let err = p.finish().unwrap_err();
        assert!(matches!(&err, ProviderError::Protocol { message, .. } if message.contains("ended before")));
    }

    #[test]
    fn request_body_mapping() {
        let request = ModelRequest {
            model: "claude-x".into(),
            system: Some("be brief".into()),
            messages: vec![
                Message::user_text("weather?"),
                Message::new(
                    Role::Assistant,
                    vec![
                        ContentPart::Thinking { text: "hmm".into(), signature: Some("sig".into()) },
                        ContentPart::Thinking { text: "unsigned".into(), signature: None },
                        ContentPart::text("checking"),
                        ContentPart::ToolUse { id: "t1".into(), name: "w".into(), input: json!({"city":"SF"}) },
                        ContentPart::ToolUse { id: "t2".into(), name: "w".into(), input: Value::String("{bad".into()) },
                    ],
                ),
                Message::new(
                    Role::User,
                    vec![
                        ContentPart::text("thanks"),
                        ContentPart::ToolResult { tool_use_id: "t1".into(), content: "22C".into(), is_error: false },
                        ContentPart::ToolResult {
                            tool_use_id: "t2".into(),
                            content: "bad json".into(),
                            is_error: true,
                        },
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
            max_tokens: None,
            temperature: None,
        };
        assert_eq!(
            build_anthropic_body(&request),
            json!({
                "model": "claude-x",
                "max_tokens": 4096,
                "system": "be brief",
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
                    {"role": "assistant", "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                        {"type": "text", "text": "checking"},
                        {"type": "tool_use", "id": "t1", "name": "w", "input": {"city": "SF"}},
                        {"type": "tool_use", "id": "t2", "name": "w", "input": {}},
                    ]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "t1", "content": "22C", "is_error": false},
                        {"type": "tool_result", "tool_use_id": "t2", "content": "bad json", "is_error": true},
                        {"type": "text", "text": "thanks"},
                    ]},
                ],
                "tools": [{"name": "w", "description": "weather", "input_schema": {"type": "object"}}],
                "stream": true,
            })
        );
        let bare = build_anthropic_body(&ModelRequest {
            model: "m".into(),
            system: None,
            messages: vec![Message::user_text("hi")].into(),
            tools: vec![].into(),
            max_tokens: Some(10),
            temperature: None,
        });
        assert!(bare.get("system").is_none());
        assert!(bare.get("tools").is_none());
        assert_eq!(bare["max_tokens"], json!(10));
    }
}
