//! Ollama's native chat API (`POST {host}/api/chat`), streamed as NDJSON.

use async_trait::async_trait;
use descartes_core::{ModelRequest, ModelStream, Provider, ProviderError, StreamEvent};
use descartes_protocol::{ContentPart, Role, Usage};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::ProviderSettings;
use crate::http::{Auth, Endpoint, LineParser, NdjsonStreamDecoder, decoded_stream, excerpt};
use crate::openai::{join_text, model_ids};
use crate::text_tools::{filter_text_tool_calls, synthesize_call_id};

/// Ollama backend (`POST {base}/api/chat`, NDJSON; no key unless `api_key` is set, then it is
/// sent as a bearer token, for Ollama behind an authenticating proxy).
///
/// Tool calls a model writes as text (no native `tool_calls`) are recognised with
/// [`parse_text_tool_calls`](crate::parse_text_tool_calls).
#[derive(Clone)]
pub struct OllamaProvider {
    endpoint: Endpoint,
    url: String,
}

impl std::fmt::Debug for OllamaProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OllamaProvider").field("settings", &self.endpoint.settings).finish()
    }
}

impl OllamaProvider {
    /// Checks the settings (base URL; `host:port` without a scheme is accepted, as Ollama
    /// does) and builds the HTTP client.
    pub fn new(mut settings: ProviderSettings) -> Result<Self, ProviderError> {
        if !settings.base_url.contains("://") {
            settings.base_url = crate::ollama_base_url(&settings.base_url);
        }
        let endpoint = Endpoint::new(settings)?;
        let url = format!("{}/api/chat", endpoint.settings.base_url);
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

    /// Probe: `GET {base}/api/tags`.
    pub async fn check(&self) -> Result<(), ProviderError> {
        self.list_models().await.map(|_| ())
    }

    /// The installed models (`GET {base}/api/tags`, `models[].name`).
    pub async fn list_models(&self) -> Result<Vec<String>, ProviderError> {
        let headers = self.endpoint.auth_headers(Auth::Bearer)?;
        let url = format!("{}/api/tags", self.endpoint.settings.base_url);
        let listing = self.endpoint.get_json(&url, headers).await.map_err(|e| self.explain(e, ""))?;
        Ok(model_ids(&listing, "models", "name"))
    }

    /// Makes the usual Ollama failures self-explanatory.
    fn explain(&self, error: ProviderError, model: &str) -> ProviderError {
        let provider = self.endpoint.name().to_owned();
        match error {
            ProviderError::Http { status: 400, ref message, .. } if message.contains("does not support tools") => {
                ProviderError::Config {
                    provider,
                    message: format!(
                        "model {model:?} does not support tools; pick a model with tool support (e.g. `ollama pull qwen3` or llama3.1), or run without tools"
                    ),
                }
            }
            ProviderError::Http { status: 404, ref message, .. }
                if message.contains("not found") && !model.is_empty() =>
            {
                ProviderError::Config {
                    provider,
                    message: format!(
                        "model {model:?} is not installed in Ollama ({message}); run `ollama pull {model}`"
                    ),
                }
            }
            ProviderError::Network { message, .. } => ProviderError::Network {
                provider,
                message: format!("{message} (is Ollama running at {}?)", self.endpoint.settings.base_url),
            },
            other => other,
        }
    }
}

#[async_trait]
impl Provider for OllamaProvider {
    fn name(&self) -> &str {
        self.endpoint.name()
    }

    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ProviderError> {
        let name = self.endpoint.name();
        let headers = self.endpoint.auth_headers(Auth::Bearer)?;
        let body = self.endpoint.encode(&build_ollama_body(&request))?;
        let response = self
            .endpoint
            .post_stream(&self.url, headers, body, "application/x-ndjson")
            .await
            .map_err(|e| self.explain(e, &request.model))?;
        let stream = decoded_stream(response, NdjsonStreamDecoder::new(OllamaStreamParser::new(name)));
        let names = request.tools.iter().map(|t| t.name.clone()).collect();
        Ok(filter_text_tool_calls(stream, names))
    }
}

/// The JSON body of a streamed `/api/chat` request.
///
/// Mapping: the system prompt is the first message (role `system`); assistant `ToolUse` parts
/// become `tool_calls` with object `arguments`; a user message's `ToolResult`s become `tool`
/// messages (`content`, `tool_name` found from the earlier `ToolUse` with the same id) before
/// the rest of its text; `Thinking` text goes back as the assistant message's `thinking`.
/// `max_tokens` → `options.num_predict`, `temperature` → `options.temperature`.
pub fn build_ollama_body(request: &ModelRequest) -> Value {
    let mut messages = Vec::with_capacity(request.messages.len() + 1);
    if let Some(system) = &request.system {
        messages.push(json!({"role": "system", "content": system}));
    }
    for (position, message) in request.messages.iter().enumerate() {
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
                        let name = request.messages[..position]
                            .iter()
                            .rev()
                            .flat_map(|m| m.tool_uses())
                            .find(|(id, _, _)| *id == tool_use_id.as_str())
                            .map(|(_, name, _)| name.to_owned());
                        let mut m = json!({"role": "tool", "content": content});
                        if let Some(name) = name {
                            m["tool_name"] = name.into();
                        }
                        messages.push(m);
                    }
                }
                if message.content.iter().any(|p| matches!(p, ContentPart::Text { .. })) {
                    messages.push(json!({"role": "user", "content": join_text(&message.content)}));
                }
            }
            Role::Assistant => {
                let mut m = Map::new();
                m.insert("role".into(), "assistant".into());
                m.insert("content".into(), join_text(&message.content).into());
                let thinking: String = message
                    .content
                    .iter()
                    .filter_map(|p| match p {
                        ContentPart::Thinking { text, .. } => Some(text.as_str()),
                        _ => None,
                    })
                    .collect();
                if !thinking.is_empty() {
                    m.insert("thinking".into(), thinking.into());
                }
                let calls: Vec<Value> = message
                    .tool_uses()
                    .map(|(_, name, input)| {
                        let arguments = match input {
                            Value::Object(_) => input.clone(),
                            Value::String(raw) => match serde_json::from_str::<Value>(raw) {
                                Ok(v @ Value::Object(_)) => v,
                                _ => Value::Object(Map::new()),
                            },
                            _ => Value::Object(Map::new()),
                        };
                        json!({"function": {"name": name, "arguments": arguments}})
                    })
                    .collect();
                if !calls.is_empty() {
                    m.insert("tool_calls".into(), calls.into());
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
    let mut options = Map::new();
    if let Some(max) = request.max_tokens {
        options.insert("num_predict".into(), max.into());
    }
    if let Some(t) = request.temperature {
        options.insert("temperature".into(), json!(t));
    }
    if !options.is_empty() {
        body.insert("options".into(), options.into());
    }
    body.insert("stream".into(), true.into());
    Value::Object(body)
}

// ---- stream parsing ----

#[derive(Deserialize)]
struct WireLine {
    #[serde(default)]
    message: Option<WireMessage>,
    #[serde(default)]
    done: Option<bool>,
    #[serde(default)]
    done_reason: Option<String>,
    #[serde(default)]
    prompt_eval_count: Option<u64>,
    #[serde(default)]
    eval_count: Option<u64>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCall>>,
}

#[derive(Deserialize)]
struct WireToolCall {
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
    arguments: Option<Value>,
}

/// State machine from `/api/chat` NDJSON lines to [`StreamEvent`]s.
///
/// * `message.content` → `TextDelta`, `message.thinking` → `ThinkingDelta`;
/// * `message.tool_calls` (arguments whole, as an object) → `ToolCallStart` (synthesized id
///   unless the server gave one) + one `ToolCallDelta`;
/// * the `done: true` line → `Usage` (`prompt_eval_count` → input, `eval_count` → output) and
///   `Stop` (`done_reason`; `tool_calls` when calls were made);
/// * `{"error": "..."}` → [`ProviderError::Stream`] (retryable);
/// * a body that ends before `done` → [`ProviderError::Protocol`].
#[derive(Debug)]
pub struct OllamaStreamParser {
    provider: String,
    tools: usize,
    done: bool,
}

impl OllamaStreamParser {
    pub fn new(provider: impl Into<String>) -> Self {
        Self { provider: provider.into(), tools: 0, done: false }
    }

    /// Handles one line.
    pub fn feed(&mut self, line: &str) -> Result<Vec<StreamEvent>, ProviderError> {
        let mut out = Vec::new();
        self.on_line(line, &mut out)?;
        Ok(out)
    }
}

impl LineParser for OllamaStreamParser {
    fn on_line(&mut self, line: &str, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        if self.done {
            return Ok(());
        }
        let trimmed = line.trim();
        if trimmed.is_empty() {
            return Ok(());
        }
        let wire: WireLine = serde_json::from_str(trimmed).map_err(|e| ProviderError::Protocol {
            provider: self.provider.clone(),
            message: format!("invalid JSON line in stream ({e}): {}", excerpt(trimmed, 200)),
        })?;
        if let Some(error) = wire.error.filter(|e| !e.is_null()) {
            let message = match error {
                Value::String(s) => excerpt(&s, 2000),
                other => excerpt(&other.to_string(), 500),
            };
            return Err(ProviderError::Stream {
                provider: self.provider.clone(),
                kind: "error".into(),
                message,
                retryable: true,
            });
        }
        if let Some(message) = wire.message {
            if let Some(thinking) = message.thinking.filter(|t| !t.is_empty()) {
                out.push(StreamEvent::ThinkingDelta(thinking));
            }
            if let Some(text) = message.content.filter(|t| !t.is_empty()) {
                out.push(StreamEvent::TextDelta(text));
            }
            for call in message.tool_calls.into_iter().flatten() {
                let Some(function) = call.function else { continue };
                let index = self.tools;
                self.tools += 1;
                let id = call.id.filter(|i| !i.is_empty()).unwrap_or_else(synthesize_call_id);
                out.push(StreamEvent::ToolCallStart { index, id, name: function.name.unwrap_or_default() });
                let json = match function.arguments {
                    Some(v @ Value::Object(_)) => v.to_string(),
                    Some(Value::String(raw)) if !raw.trim().is_empty() => raw,
                    _ => "{}".to_owned(),
                };
                out.push(StreamEvent::ToolCallDelta { index, json });
            }
        }
        if wire.done == Some(true) {
            if wire.prompt_eval_count.is_some() || wire.eval_count.is_some() {
                out.push(StreamEvent::Usage(Usage {
                    input_tokens: wire.prompt_eval_count.unwrap_or(0),
                    output_tokens: wire.eval_count.unwrap_or(0),
                    ..Usage::default()
                }));
            }
            let reason = match wire.done_reason.filter(|r| !r.is_empty()) {
                Some(r) if r == "stop" && self.tools > 0 => Some("tool_calls".to_owned()),
                Some(r) => Some(r),
                None if self.tools > 0 => Some("tool_calls".to_owned()),
                None => Some("stop".to_owned()),
            };
            out.push(StreamEvent::Stop { reason });
            self.done = true;
        }
        Ok(())
    }

    fn on_end(&mut self, _out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        if self.done {
            return Ok(());
        }
        Err(ProviderError::Protocol {
            provider: self.provider.clone(),
            message: "stream ended before the response was complete (no \"done\": true line)".into(),
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
    use crate::http::BodyDecoder;
    use descartes_protocol::{Message, ToolSpec};

    #[test]
    fn lines_any_chunking() {
        let body = concat!(
            "{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\"\",\"thinking\":\"hmm\"},\"done\":false}\n",
            "{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\"Hé\"},\"done\":false}\r\n\n",
            "{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[{\"function\":{\"name\":\"shell\",\"arguments\":{\"command\":\"ls\"}}}]},\"done\":false}\n",
            "{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"done_reason\":\"stop\",\"prompt_eval_count\":26,\"eval_count\":9}\n",
        );
        let bytes = body.as_bytes();
        let mut whole = Vec::new();
        let mut d = NdjsonStreamDecoder::new(OllamaStreamParser::new("ollama"));
        d.feed(bytes, &mut whole).unwrap();
        d.finish(&mut whole).unwrap();
        assert_eq!(whole[0], StreamEvent::ThinkingDelta("hmm".into()));
        assert_eq!(whole[1], StreamEvent::TextDelta("Hé".into()));
        assert!(matches!(&whole[2], StreamEvent::ToolCallStart { index: 0, name, .. } if name == "shell"));
        assert_eq!(whole[3], StreamEvent::ToolCallDelta { index: 0, json: "{\"command\":\"ls\"}".into() });
        assert_eq!(whole[4], StreamEvent::Usage(Usage { input_tokens: 26, output_tokens: 9, ..Usage::default() }));
        assert_eq!(whole[5], StreamEvent::Stop { reason: Some("tool_calls".into()) });
        for split in [1, 7, 90, 91, 200] {
            let mut out = Vec::new();
            let mut d = NdjsonStreamDecoder::new(OllamaStreamParser::new("ollama"));
            d.feed(&bytes[..split], &mut out).unwrap();
            d.feed(&bytes[split..], &mut out).unwrap();
            d.finish(&mut out).unwrap();
            assert_eq!(out.len(), whole.len(), "split at {split}");
            assert_eq!(out[1], whole[1]);
        }
    }

    #[test]
    fn errors_and_truncation() {
        let mut p = OllamaStreamParser::new("ollama");
        assert!(matches!(p.feed("not json").unwrap_err(), ProviderError::Protocol { .. }));
        assert!(matches!(p.feed(r#"{"error":"model crashed"}"#).unwrap_err(), ProviderError::Stream { .. }));
        p.feed(r#"{"message":{"content":"x"},"done":false}"#).unwrap();
        assert!(matches!(p.on_end(&mut Vec::new()).unwrap_err(), ProviderError::Protocol { .. }));
    }

    #[test]
    fn request_body_mapping() {
        let request = ModelRequest {
            model: "qwen3".into(),
            system: Some("be brief".into()),
            messages: vec![
                Message::user_text("list"),
                Message::new(
                    Role::Assistant,
                    vec![
                        ContentPart::Thinking { text: "plan".into(), signature: None },
                        ContentPart::ToolUse { id: "c1".into(), name: "shell".into(), input: json!({"command":"ls"}) },
                    ],
                ),
                Message::new(
                    Role::User,
                    vec![ContentPart::ToolResult { tool_use_id: "c1".into(), content: "a.rs".into(), is_error: false }],
                ),
            ]
            .into(),
            tools: vec![ToolSpec {
                name: "shell".into(),
                description: "Run".into(),
                input_schema: json!({"type":"object"}),
            }]
            .into(),
            max_tokens: Some(64),
            temperature: None,
        };
        assert_eq!(
            build_ollama_body(&request),
            json!({
                "model": "qwen3",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "list"},
                    {"role": "assistant", "content": "", "thinking": "plan", "tool_calls": [{"function": {"name": "shell", "arguments": {"command": "ls"}}}]},
                    {"role": "tool", "content": "a.rs", "tool_name": "shell"},
                ],
                "tools": [{"type": "function", "function": {"name": "shell", "description": "Run", "parameters": {"type": "object"}}}],
                "options": {"num_predict": 64},
                "stream": true,
            })
        );
    }
}
