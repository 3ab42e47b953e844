//! Google Gemini (Generative Language API), streaming.

use async_trait::async_trait;
use descartes_core::{ModelRequest, ModelStream, Provider, ProviderError, StreamEvent};
use descartes_protocol::{ContentPart, Role, Usage};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::ProviderSettings;
use crate::http::{Auth, Endpoint, SseEventParser, excerpt, response_stream};
use crate::openai::{model_ids, stream_error};
use crate::sse::SseEvent;
use crate::text_tools::synthesize_call_id;

/// Gemini backend (`POST {base}/v1beta/models/{model}:streamGenerateContent?alt=sse`,
/// `x-goog-api-key` auth).
#[derive(Clone)]
pub struct GeminiProvider {
    endpoint: Endpoint,
}

impl std::fmt::Debug for GeminiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeminiProvider").field("settings", &self.endpoint.settings).finish()
    }
}

impl GeminiProvider {
    /// Checks the settings (base URL) and builds the HTTP client. A missing key is not an
    /// error here; [`Provider::stream`] reports it.
    pub fn new(settings: ProviderSettings) -> Result<Self, ProviderError> {
        Ok(Self { endpoint: Endpoint::new(settings)? })
    }

    /// The settings, base URL normalised.
    pub fn settings(&self) -> &ProviderSettings {
        &self.endpoint.settings
    }

    /// The URL a request for `model` is sent to (`models/` prefix of the name accepted).
    pub fn url(&self, model: &str) -> String {
        let model = model.trim().trim_start_matches("models/");
        format!("{}/v1beta/models/{model}:streamGenerateContent?alt=sse", self.endpoint.settings.base_url)
    }

    /// Probe: `GET {base}/v1beta/models` with the key.
    pub async fn check(&self) -> Result<(), ProviderError> {
        self.list_models().await.map(|_| ())
    }

    /// The model names of `GET {base}/v1beta/models` (first page, `models/` prefix removed).
    pub async fn list_models(&self) -> Result<Vec<String>, ProviderError> {
        let headers = self.endpoint.auth_headers(Auth::Header("x-goog-api-key"))?;
        let url = format!("{}/v1beta/models", self.endpoint.settings.base_url);
        let listing = self.endpoint.get_json(&url, headers).await?;
        Ok(model_ids(&listing, "models", "name")
            .into_iter()
            .map(|n| n.trim_start_matches("models/").to_owned())
            .collect())
    }
}

#[async_trait]
impl Provider for GeminiProvider {
    fn name(&self) -> &str {
        self.endpoint.name()
    }

    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ProviderError> {
        let name = self.endpoint.name();
        let headers = self.endpoint.auth_headers(Auth::Header("x-goog-api-key"))?;
        let body = self.endpoint.encode(&build_gemini_body(&request))?;
        let response = self.endpoint.post(&self.url(&request.model), headers, body).await?;
        Ok(response_stream(response, GeminiStreamParser::new(name)))
    }
}

/// The JSON body of a `streamGenerateContent` request.
///
/// Mapping: `systemInstruction` holds the system prompt (and system-role messages); roles are
/// `user` / `model`; `ToolUse` → a `functionCall` part (`name`, `args`: an object); a user
/// message's `ToolResult`s → `functionResponse` parts first (`name` found from the earlier
/// `ToolUse` with the same id, `response: {"output": ...}` or `{"error": ...}`).
///
/// Thought signatures: the stream parser emits a part's `thoughtSignature` as a
/// [`StreamEvent::ThinkingSignature`] just before the part, so the assistant message holds a
/// [`ContentPart::Thinking`] with that signature right before the part it belongs to (the
/// thinking text, if the model streamed `thought: true` parts, is that block's text). Here a
/// signed `Thinking` part gives its signature to the next text or function-call part of the
/// same message (or, when it comes last, to the previous one); thought text is not sent back.
pub fn build_gemini_body(request: &ModelRequest) -> Value {
    let mut system = request.system.clone().unwrap_or_default();
    let mut contents = Vec::with_capacity(request.messages.len());
    for (position, message) in request.messages.iter().enumerate() {
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
            Role::Assistant => "model",
        };
        let mut parts: Vec<Value> = Vec::with_capacity(message.content.len());
        for part in &message.content {
            if let ContentPart::ToolResult { tool_use_id, content, is_error } = part {
                let name = tool_name(&request.messages[..position], tool_use_id).unwrap_or(tool_use_id.as_str());
                let response = if *is_error { json!({"error": content}) } else { json!({"output": content}) };
                parts.push(json!({"functionResponse": {"name": name, "response": response}}));
            }
        }
        let mut signature: Option<&str> = None;
        for part in &message.content {
            let mut value = match part {
                ContentPart::Text { text } if !text.is_empty() => json!({"text": text}),
                ContentPart::ToolUse { name, input, .. } => {
                    let args = match input {
                        Value::Object(_) => input.clone(),
                        Value::String(raw) => match serde_json::from_str::<Value>(raw) {
                            Ok(v @ Value::Object(_)) => v,
                            _ => Value::Object(Map::new()),
                        },
                        _ => Value::Object(Map::new()),
                    };
                    json!({"functionCall": {"name": name, "args": args}})
                }
                ContentPart::Thinking { signature: Some(sig), .. } if !sig.is_empty() => {
                    signature = Some(sig);
                    continue;
                }
                _ => continue,
            };
            if let Some(sig) = signature.take() {
                value["thoughtSignature"] = sig.into();
            }
            parts.push(value);
        }
        if let Some(sig) = signature
            && role == "model"
        {
            match parts.last_mut() {
                Some(last) if last.get("thoughtSignature").is_none() => last["thoughtSignature"] = sig.into(),
                _ => parts.push(json!({"text": "", "thoughtSignature": sig})),
            }
        }
        if !parts.is_empty() {
            contents.push(json!({"role": role, "parts": parts}));
        }
    }
    let mut body = Map::new();
    if !system.is_empty() {
        body.insert("systemInstruction".into(), json!({"parts": [{"text": system}]}));
    }
    body.insert("contents".into(), contents.into());
    if !request.tools.is_empty() {
        let declarations: Vec<Value> = request
            .tools
            .iter()
            .map(|t| {
                let mut d = json!({"name": t.name, "description": t.description});
                let parameters = clean_gemini_schema(&t.input_schema);
                // An object schema without properties is rejected: leave parameters out.
                let empty_object = parameters.get("properties").and_then(Value::as_object).is_none_or(Map::is_empty)
                    && parameters.get("type").and_then(Value::as_str) == Some("object");
                if !empty_object {
                    d["parameters"] = parameters;
                }
                d
            })
            .collect();
        body.insert("tools".into(), json!([{"functionDeclarations": declarations}]));
    }
    let mut generation = Map::new();
    if let Some(max) = request.max_tokens {
        generation.insert("maxOutputTokens".into(), max.into());
    }
    if let Some(t) = request.temperature {
        generation.insert("temperature".into(), json!(t));
    }
    if !generation.is_empty() {
        body.insert("generationConfig".into(), generation.into());
    }
    Value::Object(body)
}

/// The name of the tool call `id` among the earlier messages (the latest one wins).
fn tool_name<'a>(messages: &'a [descartes_protocol::Message], id: &str) -> Option<&'a str> {
    messages.iter().rev().flat_map(|m| m.content.iter().rev()).find_map(|p| match p {
        ContentPart::ToolUse { id: use_id, name, .. } if use_id == id => Some(name.as_str()),
        _ => None,
    })
}

/// Schema keywords Gemini's OpenAPI-subset dialect rejects.
const UNSUPPORTED_SCHEMA_KEYS: &[&str] = &[
    "$schema",
    "$id",
    "$ref",
    "$defs",
    "$comment",
    "definitions",
    "additionalProperties",
    "unevaluatedProperties",
    "patternProperties",
    "dependentRequired",
    "dependentSchemas",
    "propertyNames",
    "const",
    "examples",
    "default",
    "if",
    "then",
    "else",
    "not",
    "contentEncoding",
    "contentMediaType",
];

/// A tool's JSON Schema in Gemini's dialect: drops the keywords it rejects (`$schema`,
/// `additionalProperties`, `$ref`, `default`, ... — `const` becomes a one-value `enum`),
/// turns `"type": ["string", "null"]` into `"type": "string", "nullable": true`, and recurses
/// into `properties` (whose keys are property names, kept as they are), `items`, `anyOf`.
pub fn clean_gemini_schema(schema: &Value) -> Value {
    clean_schema(schema, 0)
}

fn clean_schema(schema: &Value, depth: usize) -> Value {
    let Value::Object(map) = schema else {
        return schema.clone();
    };
    if depth > 32 {
        return Value::Object(Map::new());
    }
    let mut out = Map::new();
    for (key, value) in map {
        match key.as_str() {
            "const" if !map.contains_key("enum") => {
                out.insert("enum".into(), json!([value]));
            }
            k if UNSUPPORTED_SCHEMA_KEYS.contains(&k) => {}
            "type" => match value {
                Value::Array(types) => {
                    let non_null: Vec<&Value> = types.iter().filter(|t| t.as_str() != Some("null")).collect();
                    if let Some(first) = non_null.first() {
                        out.insert("type".into(), (*first).clone());
                    }
                    if non_null.len() < types.len() {
                        out.insert("nullable".into(), true.into());
                    }
                }
                other => {
                    out.insert("type".into(), other.clone());
                }
            },
            "properties" => {
                let props = match value {
                    Value::Object(props) => {
                        props.iter().map(|(name, s)| (name.clone(), clean_schema(s, depth + 1))).collect()
                    }
                    _ => Map::new(),
                };
                out.insert("properties".into(), Value::Object(props));
            }
            "items" => {
                out.insert("items".into(), clean_schema(value, depth + 1));
            }
            "anyOf" | "oneOf" | "allOf" => {
                let list = match value {
                    Value::Array(list) => list.iter().map(|s| clean_schema(s, depth + 1)).collect(),
                    _ => Vec::new(),
                };
                out.insert("anyOf".into(), Value::Array(list));
            }
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    Value::Object(out)
}

// ---- stream parsing ----

#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    candidates: Option<Vec<WireCandidate>>,
    #[serde(default, rename = "usageMetadata")]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default, rename = "promptFeedback")]
    prompt_feedback: Option<Value>,
}

#[derive(Deserialize)]
struct WireCandidate {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    content: Option<WireContent>,
    #[serde(default, rename = "finishReason")]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireContent {
    #[serde(default)]
    parts: Option<Vec<WirePart>>,
}

#[derive(Deserialize)]
struct WirePart {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: Option<bool>,
    #[serde(default, rename = "thoughtSignature")]
    thought_signature: Option<String>,
    #[serde(default, rename = "functionCall")]
    function_call: Option<WireFunctionCall>,
}

#[derive(Deserialize)]
struct WireFunctionCall {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    args: Option<Value>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default, rename = "promptTokenCount")]
    prompt: Option<u64>,
    #[serde(default, rename = "candidatesTokenCount")]
    candidates: Option<u64>,
    #[serde(default, rename = "thoughtsTokenCount")]
    thoughts: Option<u64>,
    #[serde(default, rename = "cachedContentTokenCount")]
    cached: Option<u64>,
}

/// State machine from Gemini SSE chunks (`GenerateContentResponse` JSON) to [`StreamEvent`]s.
///
/// * text parts → `TextDelta`, `thought: true` parts → `ThinkingDelta`;
/// * `functionCall` parts (arguments whole) → `ToolCallStart` (the part's `id`, else a
///   synthesized unique id) + one `ToolCallDelta` with the JSON arguments;
/// * a part's `thoughtSignature` → `ThinkingSignature`, emitted before the part (see
///   [`build_gemini_body`] for the way back);
/// * `usageMetadata` → `Usage` (prompt → input, candidates + thoughts → output, cached content
///   → cache read); `finishReason` is remembered and `Stop` emitted when the body ends
///   (Gemini has no end marker); a body that ends without a `finishReason` is an error;
/// * `{"error": ...}` → [`ProviderError::Stream`]; a blocked prompt (`promptFeedback.blockReason`)
///   → `Stop` with that reason. Only candidate 0 is read.
#[derive(Debug)]
pub struct GeminiStreamParser {
    provider: String,
    finish_reason: Option<String>,
    tools: usize,
    done: bool,
}

impl GeminiStreamParser {
    pub fn new(provider: impl Into<String>) -> Self {
        Self { provider: provider.into(), finish_reason: None, tools: 0, done: false }
    }

    /// Handles one `data:` payload.
    pub fn feed(&mut self, data: &str) -> Result<Vec<StreamEvent>, ProviderError> {
        let mut out = Vec::new();
        self.feed_into(data, &mut out)?;
        Ok(out)
    }

    /// Like [`feed`](Self::feed), appending to `out`.
    pub fn feed_into(&mut self, data: &str, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        if self.done {
            return Ok(());
        }
        let trimmed = data.trim();
        if trimmed.is_empty() {
            return Ok(());
        }
        let chunk: WireChunk = serde_json::from_str(trimmed).map_err(|e| ProviderError::Protocol {
            provider: self.provider.clone(),
            message: format!("invalid JSON in stream ({e}): {}", excerpt(trimmed, 200)),
        })?;
        if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
            let mut error = error;
            // Google errors: {"code": 429, "message", "status": "RESOURCE_EXHAUSTED"}.
            if let Some(status) = error.get("status").cloned()
                && let Value::Object(map) = &mut error
            {
                map.insert("type".into(), status);
            }
            return Err(stream_error(&self.provider, &error));
        }
        for candidate in chunk.candidates.into_iter().flatten() {
            if candidate.index.unwrap_or(0) != 0 {
                continue;
            }
            for part in candidate.content.and_then(|c| c.parts).into_iter().flatten() {
                if let Some(sig) = part.thought_signature.filter(|s| !s.is_empty()) {
                    out.push(StreamEvent::ThinkingSignature(sig));
                }
                if let Some(call) = part.function_call {
                    let index = self.tools;
                    self.tools += 1;
                    let id = call.id.filter(|i| !i.is_empty()).unwrap_or_else(synthesize_call_id);
                    out.push(StreamEvent::ToolCallStart { index, id, name: call.name.unwrap_or_default() });
                    let args = match call.args {
                        Some(v @ Value::Object(_)) => v.to_string(),
                        _ => "{}".to_owned(),
                    };
                    out.push(StreamEvent::ToolCallDelta { index, json: args });
                } else if let Some(text) = part.text.filter(|t| !t.is_empty()) {
                    if part.thought == Some(true) {
                        out.push(StreamEvent::ThinkingDelta(text));
                    } else {
                        out.push(StreamEvent::TextDelta(text));
                    }
                }
            }
            if let Some(reason) = candidate.finish_reason.filter(|r| !r.is_empty() && r != "FINISH_REASON_UNSPECIFIED")
            {
                self.finish_reason = Some(reason);
            }
        }
        if let Some(reason) = chunk.prompt_feedback.as_ref().and_then(|f| f.get("blockReason")).and_then(Value::as_str)
        {
            self.finish_reason = Some(format!("prompt blocked: {reason}"));
        }
        if let Some(u) = chunk.usage {
            out.push(StreamEvent::Usage(Usage {
                input_tokens: u.prompt.unwrap_or(0),
                output_tokens: u.candidates.unwrap_or(0) + u.thoughts.unwrap_or(0),
                cache_read_tokens: u.cached.unwrap_or(0),
                cache_write_tokens: 0,
                ..Usage::default()
            }));
        }
        Ok(())
    }

    /// The body ended: `Stop` if a finish reason came, else an error.
    pub fn finish(&mut self) -> Result<Vec<StreamEvent>, ProviderError> {
        let mut out = Vec::new();
        self.on_end(&mut out)?;
        Ok(out)
    }
}

impl SseEventParser for GeminiStreamParser {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        self.feed_into(&event.data, out)
    }

    fn on_end(&mut self, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        if self.done {
            return Ok(());
        }
        match self.finish_reason.take() {
            Some(reason) => {
                let reason = if self.tools > 0 && reason == "STOP" { "tool_calls".to_owned() } else { reason };
                out.push(StreamEvent::Stop { reason: Some(reason) });
                self.done = true;
                Ok(())
            }
            None => Err(ProviderError::Protocol {
                provider: self.provider.clone(),
                message: "stream ended before the response was complete (no finishReason)".into(),
            }),
        }
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

    fn run(chunks: &[&str]) -> Vec<StreamEvent> {
        let mut p = GeminiStreamParser::new("gemini");
        let mut out = Vec::new();
        for c in chunks {
            p.feed_into(c, &mut out).unwrap();
        }
        p.on_end(&mut out).unwrap();
        out
    }

    #[test]
    fn text_thoughts_calls_and_usage() {
        let events = run(&[
            r#"{"candidates":[{"content":{"parts":[{"text":"plan","thought":true}],"role":"model"},"index":0}]}"#,
            r#"{"candidates":[{"content":{"parts":[{"functionCall":{"name":"shell","args":{"command":"ls"}},"thoughtSignature":"SIG1"},{"functionCall":{"name":"shell","args":{"command":"pwd"}}}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":12,"candidatesTokenCount":4,"thoughtsTokenCount":3,"cachedContentTokenCount":2,"totalTokenCount":19},"modelVersion":"gemini-2.5-flash"}"#,
        ]);
        assert_eq!(events[0], StreamEvent::ThinkingDelta("plan".into()));
        assert_eq!(events[1], StreamEvent::ThinkingSignature("SIG1".into()));
        assert!(
            matches!(&events[2], StreamEvent::ToolCallStart { index: 0, name, id } if name == "shell" && id.starts_with("call_"))
        );
        assert_eq!(
            events[6],
            StreamEvent::Usage(Usage {
                input_tokens: 12,
                output_tokens: 7,
                cache_read_tokens: 2,
                cache_write_tokens: 0,
                ..Usage::default()
            })
        );
        assert_eq!(events[7], StreamEvent::Stop { reason: Some("tool_calls".into()) });
        let mut a = ResponseAssembler::default();
        events.into_iter().for_each(|e| a.push(e));
        let parts = a.finish();
        assert_eq!(parts[0], ContentPart::Thinking { text: "plan".into(), signature: Some("SIG1".into()) });
        assert!(matches!(&parts[1], ContentPart::ToolUse { input, .. } if input == &json!({"command":"ls"})));
        assert!(matches!(&parts[2], ContentPart::ToolUse { input, .. } if input == &json!({"command":"pwd"})));
        let (ContentPart::ToolUse { id: a, .. }, ContentPart::ToolUse { id: b, .. }) = (&parts[1], &parts[2]) else {
            panic!()
        };
        assert_ne!(a, b);
    }

    #[test]
    fn errors_and_truncation() {
        let mut p = GeminiStreamParser::new("gemini");
        p.feed(r#"{"candidates":[{"content":{"parts":[{"text":"Hi"}]}}]}"#).unwrap();
        assert!(matches!(p.finish().unwrap_err(), ProviderError::Protocol { .. }));
        let err = p.feed(r#"{"error":{"code":503,"message":"overloaded","status":"UNAVAILABLE"}}"#).unwrap_err();
        assert!(matches!(&err, ProviderError::Stream { kind, retryable: true, .. } if kind == "UNAVAILABLE"));
        assert!(matches!(p.feed("{bad").unwrap_err(), ProviderError::Protocol { .. }));
        let events = run(&[r#"{"promptFeedback":{"blockReason":"SAFETY"}}"#]);
        assert_eq!(events, vec![StreamEvent::Stop { reason: Some("prompt blocked: SAFETY".into()) }]);
    }

    #[test]
    fn schema_cleaning() {
        let schema = json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "default": {"type": ["string", "null"], "default": "x"},
                "mode": {"const": "fast"},
                "list": {"type": "array", "items": {"type": "object", "additionalProperties": {"type": "string"}}},
            },
            "required": ["default"],
        });
        assert_eq!(
            clean_gemini_schema(&schema),
            json!({
                "type": "object",
                "properties": {
                    "default": {"type": "string", "nullable": true},
                    "mode": {"enum": ["fast"]},
                    "list": {"type": "array", "items": {"type": "object"}},
                },
                "required": ["default"],
            })
        );
    }

    #[test]
    fn request_body_mapping_and_signature_round_trip() {
        let request = ModelRequest {
            model: "gemini-2.5-flash".into(),
            system: Some("be brief".into()),
            messages: vec![
                Message::user_text("list"),
                Message::new(
                    Role::Assistant,
                    vec![
                        ContentPart::Thinking { text: "plan".into(), signature: Some("SIG1".into()) },
                        ContentPart::ToolUse { id: "call_x".into(), name: "shell".into(), input: json!({"command":"ls"}) },
                    ],
                ),
                Message::new(
                    Role::User,
                    vec![ContentPart::ToolResult { tool_use_id: "call_x".into(), content: "a.rs".into(), is_error: false }],
                ),
                Message::new(
                    Role::Assistant,
                    vec![ContentPart::text("Done."), ContentPart::Thinking { text: String::new(), signature: Some("SIG2".into()) }],
                ),
            ]
            .into(),
            tools: vec![ToolSpec {
                name: "shell".into(),
                description: "Run".into(),
                input_schema: json!({"type":"object","properties":{"command":{"type":"string"}},"additionalProperties":false}),
            }]
            .into(),
            max_tokens: Some(64),
            temperature: Some(0.0),
        };
        assert_eq!(
            build_gemini_body(&request),
            json!({
                "systemInstruction": {"parts": [{"text": "be brief"}]},
                "contents": [
                    {"role": "user", "parts": [{"text": "list"}]},
                    {"role": "model", "parts": [{"functionCall": {"name": "shell", "args": {"command": "ls"}}, "thoughtSignature": "SIG1"}]},
                    {"role": "user", "parts": [{"functionResponse": {"name": "shell", "response": {"output": "a.rs"}}}]},
                    {"role": "model", "parts": [{"text": "Done.", "thoughtSignature": "SIG2"}]},
                ],
                "tools": [{"functionDeclarations": [{"name": "shell", "description": "Run", "parameters": {"type":"object","properties":{"command":{"type":"string"}}}}]}],
                "generationConfig": {"maxOutputTokens": 64, "temperature": 0.0},
            })
        );
    }
}
