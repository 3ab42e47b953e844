//! OpenAI Responses API, streaming (`POST {base}/responses`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use descartes_core::{ModelRequest, ModelStream, Provider, ProviderError, StreamEvent};
use descartes_protocol::{ContentPart, Role, Usage};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::ProviderSettings;
use crate::http::{Auth, Endpoint, SseEventParser, excerpt, response_stream};
use crate::openai::{join_text, model_ids};
use crate::sse::SseEvent;

/// OpenAI Responses backend (`POST {base_url}/responses`, bearer auth). Stateless: every
/// request carries the whole conversation (`store: false`), reasoning included as
/// `encrypted_content`.
#[derive(Clone)]
pub struct OpenAiResponsesProvider {
    endpoint: Endpoint,
    url: String,
    /// Models that refused `include: ["reasoning.encrypted_content"]` (non-reasoning models
    /// answer 400 "Encrypted content is not supported with this model"): asked without it.
    plain_models: Arc<Mutex<HashSet<String>>>,
}

impl std::fmt::Debug for OpenAiResponsesProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiResponsesProvider").field("settings", &self.endpoint.settings).finish()
    }
}

impl OpenAiResponsesProvider {
    /// Checks the settings (base URL) and builds the HTTP client. A missing key is not an
    /// error here; [`Provider::stream`] reports it.
    pub fn new(settings: ProviderSettings) -> Result<Self, ProviderError> {
        let endpoint = Endpoint::new(settings)?;
        let url = format!("{}/responses", endpoint.settings.base_url);
        Ok(Self { endpoint, url, plain_models: Arc::default() })
    }

    /// The settings, base URL normalised.
    pub fn settings(&self) -> &ProviderSettings {
        &self.endpoint.settings
    }

    /// The URL requests are sent to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Probe: `GET {base}/models` with the key.
    pub async fn check(&self) -> Result<(), ProviderError> {
        let headers = self.endpoint.auth_headers(Auth::Bearer)?;
        let url = format!("{}/models", self.endpoint.settings.base_url);
        let listing = self.endpoint.get_json(&url, headers).await?;
        let _ = model_ids(&listing, "data", "id");
        Ok(())
    }
}

#[async_trait]
impl Provider for OpenAiResponsesProvider {
    fn name(&self) -> &str {
        self.endpoint.name()
    }

    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ProviderError> {
        let name = self.endpoint.name();
        let headers = self.endpoint.auth_headers(Auth::Bearer)?;
        let mut body = build_responses_body(&request);
        let plain = self.plain_models.lock().map(|m| m.contains(&request.model)).unwrap_or(false);
        if plain && let Value::Object(map) = &mut body {
            map.remove("include");
        }
        let response = match self.endpoint.post(&self.url, headers.clone(), self.endpoint.encode(&body)?).await {
            Err(ProviderError::Http { status: 400, message, .. })
                if !plain && message.to_ascii_lowercase().contains("encrypted content is not supported") =>
            {
                // A model without reasoning: ask again without encrypted reasoning, and remember.
                if let Ok(mut models) = self.plain_models.lock() {
                    models.insert(request.model.clone());
                }
                if let Value::Object(map) = &mut body {
                    map.remove("include");
                }
                self.endpoint.post(&self.url, headers, self.endpoint.encode(&body)?).await?
            }
            other => other?,
        };
        Ok(response_stream(response, ResponsesStreamParser::new(name)))
    }
}

/// The JSON body of a streamed Responses request.
///
/// Mapping: the system prompt is `instructions` (system-role messages become `developer`
/// messages); user text is a `message` with `input_text`, assistant text a `message` with
/// `output_text`; `ToolUse` → `function_call` (`call_id`, `name`, `arguments` as JSON text);
/// `ToolResult` → `function_call_output` (`call_id`, `output`; placed before the rest of their
/// message); a `Thinking` part with a signature → a `reasoning` item whose `encrypted_content`
/// is the signature and whose `summary` is the text (unsigned thinking is dropped). `store` is
/// false and `include` asks for `reasoning.encrypted_content`, so reasoning survives without
/// server-side state (the provider drops `include` for models that refuse it).
pub fn build_responses_body(request: &ModelRequest) -> Value {
    let mut input = Vec::with_capacity(request.messages.len() + 4);
    for message in request.messages.iter() {
        match message.role {
            Role::System => {
                let text = join_text(&message.content);
                if !text.is_empty() {
                    input.push(json!({"type": "message", "role": "developer", "content": [{"type": "input_text", "text": text}]}));
                }
            }
            Role::User => {
                for part in &message.content {
                    if let ContentPart::ToolResult { tool_use_id, content, .. } = part {
                        input.push(json!({"type": "function_call_output", "call_id": tool_use_id, "output": content}));
                    }
                }
                let text = join_text(&message.content);
                if message.content.iter().any(|p| matches!(p, ContentPart::Text { .. })) {
                    input.push(
                        json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}),
                    );
                }
            }
            Role::Assistant => {
                for part in &message.content {
                    match part {
                        ContentPart::Text { text } if !text.is_empty() => input.push(json!({
                            "type": "message", "role": "assistant",
                            "content": [{"type": "output_text", "text": text}],
                        })),
                        ContentPart::Thinking { text, signature: Some(signature) } => {
                            let summary: Vec<Value> = if text.is_empty() {
                                Vec::new()
                            } else {
                                vec![json!({"type": "summary_text", "text": text})]
                            };
                            input
                                .push(json!({"type": "reasoning", "summary": summary, "encrypted_content": signature}));
                        }
                        ContentPart::ToolUse { id, name, input: arguments } => {
                            let arguments = match arguments {
                                Value::String(raw) => raw.clone(),
                                other => other.to_string(),
                            };
                            input.push(
                                json!({"type": "function_call", "call_id": id, "name": name, "arguments": arguments}),
                            );
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    let mut body = Map::new();
    body.insert("model".into(), request.model.clone().into());
    if let Some(system) = &request.system {
        body.insert("instructions".into(), system.clone().into());
    }
    body.insert("input".into(), input.into());
    if !request.tools.is_empty() {
        let tools: Vec<Value> = request
            .tools
            .iter()
            .map(|t| {
                json!({"type": "function", "name": t.name, "description": t.description, "parameters": t.input_schema, "strict": false})
            })
            .collect();
        body.insert("tools".into(), tools.into());
        body.insert("tool_choice".into(), "auto".into());
        body.insert("parallel_tool_calls".into(), true.into());
    }
    if let Some(max) = request.max_tokens {
        body.insert("max_output_tokens".into(), max.into());
    }
    if let Some(t) = request.temperature {
        body.insert("temperature".into(), json!(t));
    }
    body.insert("stream".into(), true.into());
    body.insert("store".into(), false.into());
    body.insert("include".into(), json!(["reasoning.encrypted_content"]));
    Value::Object(body)
}

// ---- stream parsing ----

#[derive(Deserialize)]
struct WireEvent {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    item_id: Option<String>,
    #[serde(default)]
    output_index: Option<u64>,
    #[serde(default)]
    delta: Option<String>,
    #[serde(default)]
    item: Option<WireItem>,
    #[serde(default)]
    response: Option<WireResponse>,
    // `error` events.
    #[serde(default)]
    code: Option<Value>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize, Default)]
struct WireItem {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
    #[serde(default)]
    content: Option<Vec<WirePart>>,
    #[serde(default)]
    summary: Option<Vec<WirePart>>,
    #[serde(default)]
    encrypted_content: Option<String>,
}

#[derive(Deserialize)]
struct WirePart {
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    incomplete_details: Option<Value>,
    #[serde(default)]
    status: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    input_tokens_details: Option<WireInputDetails>,
}

#[derive(Deserialize)]
struct WireInputDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Debug)]
struct ItemState {
    id: Option<String>,
    output_index: Option<u64>,
    kind: String,
    /// Deltas were emitted for it (text, reasoning or arguments).
    streamed: bool,
    /// `output_item.done` came.
    closed: bool,
    /// Index among this response's tool calls, once started.
    tool: Option<usize>,
}

/// State machine from Responses SSE events to [`StreamEvent`]s.
///
/// * `response.output_text.delta` → `TextDelta`; `response.reasoning_summary_text.delta` and
///   `response.reasoning_text.delta` → `ThinkingDelta`;
/// * `response.output_item.added` of a `function_call` → `ToolCallStart` (`call_id`, `name`),
///   `response.function_call_arguments.delta` → `ToolCallDelta`;
/// * `response.output_item.done` completes what no delta carried (servers that send whole
///   items only, like the Codex test fixtures): a message's text, a function call and its
///   arguments, a reasoning summary; a reasoning item's `encrypted_content` → `ThinkingSignature`;
/// * `response.completed` → `Usage` (`input_tokens`, `output_tokens`,
///   `input_tokens_details.cached_tokens`) and `Stop` (`tool_calls` if a call was made, else
///   `stop`); `response.incomplete` → `Usage` and `Stop` with the incomplete reason (e.g.
///   `max_output_tokens`);
/// * `response.failed` and `error` → [`ProviderError::Stream`]. Other events are skipped.
///
/// Deltas without `item_id` belong to the last added item.
#[derive(Debug)]
pub struct ResponsesStreamParser {
    provider: String,
    items: Vec<ItemState>,
    tools: usize,
    done: bool,
}

impl ResponsesStreamParser {
    pub fn new(provider: impl Into<String>) -> Self {
        Self { provider: provider.into(), items: Vec::new(), tools: 0, done: false }
    }

    /// Handles one event (`event` is the SSE event name; the payload's `type` wins).
    pub fn feed(&mut self, event: Option<&str>, data: &str) -> Result<Vec<StreamEvent>, ProviderError> {
        let mut out = Vec::new();
        self.feed_into(event, data, &mut out)?;
        Ok(out)
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
        if trimmed.is_empty() || trimmed == "[DONE]" {
            return Ok(());
        }
        let wire: WireEvent = serde_json::from_str(trimmed).map_err(|e| ProviderError::Protocol {
            provider: self.provider.clone(),
            message: format!("invalid JSON in stream ({e}): {}", excerpt(trimmed, 200)),
        })?;
        let kind = wire.kind.as_deref().or(event).unwrap_or_default();
        match kind {
            "response.output_item.added" => {
                let item = wire.item.unwrap_or_default();
                let slot = self.item_slot(item.id.as_deref(), wire.output_index, &item.kind);
                if item.kind == "function_call" {
                    self.start_tool(slot, &item, out);
                    if let Some(args) = item.arguments.filter(|a| !a.is_empty())
                        && let Some(index) = self.items[slot].tool
                    {
                        self.items[slot].streamed = true;
                        out.push(StreamEvent::ToolCallDelta { index, json: args });
                    }
                }
            }
            "response.output_text.delta" | "response.refusal.delta" => {
                if let Some(delta) = wire.delta.filter(|d| !d.is_empty()) {
                    let slot = self.item_slot(wire.item_id.as_deref(), wire.output_index, "message");
                    self.items[slot].streamed = true;
                    out.push(StreamEvent::TextDelta(delta));
                }
            }
            "response.reasoning_summary_text.delta" | "response.reasoning_text.delta" => {
                if let Some(delta) = wire.delta.filter(|d| !d.is_empty()) {
                    let slot = self.item_slot(wire.item_id.as_deref(), wire.output_index, "reasoning");
                    self.items[slot].streamed = true;
                    out.push(StreamEvent::ThinkingDelta(delta));
                }
            }
            "response.function_call_arguments.delta" => {
                if let Some(delta) = wire.delta.filter(|d| !d.is_empty()) {
                    let slot = self.item_slot(wire.item_id.as_deref(), wire.output_index, "function_call");
                    if let Some(index) = self.items[slot].tool {
                        self.items[slot].streamed = true;
                        out.push(StreamEvent::ToolCallDelta { index, json: delta });
                    }
                }
            }
            "response.output_item.done" => {
                let item = wire.item.unwrap_or_default();
                let slot = self.item_slot(item.id.as_deref(), wire.output_index, &item.kind);
                self.item_done(slot, item, out);
            }
            "response.completed" | "response.incomplete" => {
                let response = wire.response;
                if let Some(usage) = response.as_ref().and_then(|r| r.usage.as_ref()) {
                    out.push(StreamEvent::Usage(Usage {
                        input_tokens: usage.input_tokens.unwrap_or(0),
                        output_tokens: usage.output_tokens.unwrap_or(0),
                        cache_read_tokens: usage
                            .input_tokens_details
                            .as_ref()
                            .and_then(|d| d.cached_tokens)
                            .unwrap_or(0),
                        cache_write_tokens: 0,
                        ..Usage::default()
                    }));
                }
                let incomplete = response
                    .as_ref()
                    .and_then(|r| r.incomplete_details.as_ref())
                    .and_then(|d| d.get("reason"))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                let reason = if kind == "response.incomplete"
                    || response.as_ref().and_then(|r| r.status.as_deref()) == Some("incomplete")
                {
                    incomplete.or(Some("incomplete".into()))
                } else if self.tools > 0 {
                    Some("tool_calls".into())
                } else {
                    Some("stop".into())
                };
                out.push(StreamEvent::Stop { reason });
                self.done = true;
            }
            "response.failed" => {
                let error = wire.response.and_then(|r| r.error).unwrap_or(Value::Null);
                return Err(failure(&self.provider, &error));
            }
            "error" => {
                let error = json!({"code": wire.code, "message": wire.message});
                return Err(failure(&self.provider, &error));
            }
            _ => {}
        }
        Ok(())
    }

    /// The open item an event refers to: by id, else by output index, else the last open item
    /// of that kind that lacks an id (or any, if the event has none).
    fn find(&self, id: Option<&str>, output_index: Option<u64>, kind: &str) -> Option<usize> {
        if let Some(id) = id
            && let Some(i) = self.items.iter().rposition(|i| i.id.as_deref() == Some(id))
        {
            return Some(i);
        }
        if let Some(n) = output_index
            && let Some(i) = self.items.iter().rposition(|i| i.output_index == Some(n) && i.kind == kind)
        {
            return Some(i);
        }
        self.items.iter().rposition(|i| !i.closed && i.kind == kind && (i.id.is_none() || id.is_none()))
    }

    /// The slot of an item, created if new.
    fn item_slot(&mut self, id: Option<&str>, output_index: Option<u64>, kind: &str) -> usize {
        match self.find(id, output_index, kind) {
            Some(slot) => {
                let item = &mut self.items[slot];
                if item.id.is_none() {
                    item.id = id.map(str::to_owned);
                }
                slot
            }
            None => {
                self.items.push(ItemState {
                    id: id.map(str::to_owned),
                    output_index,
                    kind: kind.to_owned(),
                    streamed: false,
                    closed: false,
                    tool: None,
                });
                self.items.len() - 1
            }
        }
    }

    fn start_tool(&mut self, slot: usize, item: &WireItem, out: &mut Vec<StreamEvent>) {
        if self.items[slot].tool.is_some() {
            return;
        }
        let index = self.tools;
        self.tools += 1;
        self.items[slot].tool = Some(index);
        let id = item
            .call_id
            .clone()
            .filter(|c| !c.is_empty())
            .or_else(|| item.id.clone())
            .unwrap_or_else(|| format!("call_{index}"));
        out.push(StreamEvent::ToolCallStart { index, id, name: item.name.clone().unwrap_or_default() });
    }

    fn item_done(&mut self, slot: usize, item: WireItem, out: &mut Vec<StreamEvent>) {
        let streamed = self.items[slot].streamed;
        match item.kind.as_str() {
            "message" if !streamed => {
                let text: String = item
                    .content
                    .iter()
                    .flatten()
                    .filter(|p| matches!(p.kind.as_str(), "output_text" | "refusal"))
                    .filter_map(|p| p.text.as_deref().or(p.refusal.as_deref()))
                    .collect();
                if !text.is_empty() {
                    out.push(StreamEvent::TextDelta(text));
                }
            }
            "function_call" => {
                self.start_tool(slot, &item, out);
                if !streamed
                    && let (Some(index), Some(args)) = (self.items[slot].tool, item.arguments.filter(|a| !a.is_empty()))
                {
                    out.push(StreamEvent::ToolCallDelta { index, json: args });
                }
            }
            "reasoning" => {
                if !streamed {
                    let summary: Vec<&str> = item
                        .summary
                        .iter()
                        .flatten()
                        .chain(item.content.iter().flatten().filter(|p| p.kind == "reasoning_text"))
                        .filter_map(|p| p.text.as_deref())
                        .filter(|t| !t.is_empty())
                        .collect();
                    if !summary.is_empty() {
                        out.push(StreamEvent::ThinkingDelta(summary.join("\n\n")));
                    }
                }
                if let Some(encrypted) = item.encrypted_content.filter(|e| !e.is_empty()) {
                    out.push(StreamEvent::ThinkingSignature(encrypted));
                }
            }
            _ => {}
        }
        self.items[slot].streamed = true;
        self.items[slot].closed = true;
    }
}

/// `response.failed` / `error`: retryable unless the code says the request itself is wrong.
fn failure(provider: &str, error: &Value) -> ProviderError {
    let field = |k: &str| match error.get(k) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let kind = field("code").or_else(|| field("type")).unwrap_or_else(|| "response_failed".into());
    let message = field("message").unwrap_or_else(|| excerpt(&error.to_string(), 500));
    let retryable = !matches!(
        kind.as_str(),
        "invalid_request_error"
            | "invalid_prompt"
            | "context_length_exceeded"
            | "insufficient_quota"
            | "invalid_api_key"
            | "model_not_found"
            | "unsupported_parameter"
            | "invalid_image"
            | "authentication_error"
            | "permission_error"
    );
    ProviderError::Stream { provider: provider.to_owned(), kind, message, retryable }
}

impl SseEventParser for ResponsesStreamParser {
    fn on_event(&mut self, event: &SseEvent, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        self.feed_into(event.event.as_deref(), &event.data, out)
    }

    fn on_end(&mut self, _out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        if self.done {
            return Ok(());
        }
        Err(ProviderError::Protocol {
            provider: self.provider.clone(),
            message: "stream ended before response.completed".into(),
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

    fn run(events: &[&str]) -> (Vec<StreamEvent>, ResponsesStreamParser) {
        let mut p = ResponsesStreamParser::new("openai");
        let mut out = Vec::new();
        for e in events {
            p.feed_into(None, e, &mut out).unwrap();
        }
        (out, p)
    }

    #[test]
    fn streamed_text_tool_call_and_usage() {
        let (events, p) = run(&[
            r#"{"type":"response.created","response":{"id":"resp_1","status":"in_progress"}}"#,
            r#"{"type":"response.output_item.added","output_index":0,"item":{"type":"message","id":"msg_1","role":"assistant","content":[]}}"#,
            r#"{"type":"response.output_text.delta","item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi"}"#,
            r#"{"type":"response.output_item.done","output_index":0,"item":{"type":"message","id":"msg_1","content":[{"type":"output_text","text":"Hi"}]}}"#,
            r#"{"type":"response.output_item.added","output_index":1,"item":{"type":"function_call","id":"fc_1","call_id":"call_A","name":"shell","arguments":""}}"#,
            r#"{"type":"response.function_call_arguments.delta","item_id":"fc_1","output_index":1,"delta":"{\"command\":"}"#,
            r#"{"type":"response.function_call_arguments.delta","item_id":"fc_1","output_index":1,"delta":"\"ls\"}"}"#,
            r#"{"type":"response.function_call_arguments.done","item_id":"fc_1","arguments":"{\"command\":\"ls\"}"}"#,
            r#"{"type":"response.output_item.done","output_index":1,"item":{"type":"function_call","id":"fc_1","call_id":"call_A","name":"shell","arguments":"{\"command\":\"ls\"}"}}"#,
            r#"{"type":"response.some_future_event","x":1}"#,
            r#"{"type":"response.completed","response":{"id":"resp_1","status":"completed","usage":{"input_tokens":50,"input_tokens_details":{"cached_tokens":20},"output_tokens":7,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":57}}}"#,
        ]);
        assert!(p.is_done());
        assert_eq!(events[0], StreamEvent::TextDelta("Hi".into()));
        assert_eq!(events[1], StreamEvent::ToolCallStart { index: 0, id: "call_A".into(), name: "shell".into() });
        assert_eq!(
            events[4],
            StreamEvent::Usage(Usage {
                input_tokens: 50,
                output_tokens: 7,
                cache_read_tokens: 20,
                cache_write_tokens: 0,
                ..Usage::default()
            })
        );
        let mut a = ResponseAssembler::default();
        events.into_iter().for_each(|e| a.push(e));
        assert_eq!(a.stop_reason.as_deref(), Some("tool_calls"));
        assert_eq!(
            a.finish(),
            vec![
                ContentPart::text("Hi"),
                ContentPart::ToolUse { id: "call_A".into(), name: "shell".into(), input: json!({"command":"ls"}) }
            ]
        );
    }

    #[test]
    fn whole_items_only_like_codex_fixtures() {
        let (events, _) = run(&[
            r#"{"type":"response.created","response":{"id":"r"}}"#,
            r#"{"type":"response.output_item.done","item":{"type":"reasoning","id":"rs_1","summary":[{"type":"summary_text","text":"Think"}],"encrypted_content":"gAAAA-enc"}}"#,
            r#"{"type":"response.output_item.done","item":{"type":"message","role":"assistant","id":"m","content":[{"type":"output_text","text":"Done."}]}}"#,
            r#"{"type":"response.output_item.done","item":{"type":"function_call","call_id":"c9","name":"shell","arguments":"{}"}}"#,
            r#"{"type":"response.completed","response":{"id":"r","usage":{"input_tokens":0,"input_tokens_details":null,"output_tokens":0,"output_tokens_details":null,"total_tokens":0}}}"#,
        ]);
        let mut a = ResponseAssembler::default();
        events.into_iter().for_each(|e| a.push(e));
        assert_eq!(
            a.finish(),
            vec![
                ContentPart::Thinking { text: "Think".into(), signature: Some("gAAAA-enc".into()) },
                ContentPart::text("Done."),
                ContentPart::ToolUse { id: "c9".into(), name: "shell".into(), input: json!({}) },
            ]
        );
    }

    #[test]
    fn reasoning_deltas_then_signature() {
        let (events, _) = run(&[
            r#"{"type":"response.output_item.added","output_index":0,"item":{"type":"reasoning","id":"rs","summary":[]}}"#,
            r#"{"type":"response.reasoning_summary_text.delta","item_id":"rs","output_index":0,"summary_index":0,"delta":"Plan"}"#,
            r#"{"type":"response.output_item.done","output_index":0,"item":{"type":"reasoning","id":"rs","summary":[{"type":"summary_text","text":"Plan"}],"encrypted_content":"ENC"}}"#,
        ]);
        assert_eq!(
            events,
            vec![StreamEvent::ThinkingDelta("Plan".into()), StreamEvent::ThinkingSignature("ENC".into())]
        );
    }

    #[test]
    fn failures_incomplete_and_truncation() {
        let mut p = ResponsesStreamParser::new("openai");
        let err = p
            .feed(None, r#"{"type":"response.failed","response":{"id":"r","status":"failed","error":{"code":"server_error","message":"boom"}}}"#)
            .unwrap_err();
        assert!(matches!(&err, ProviderError::Stream { kind, retryable: true, .. } if kind == "server_error"));
        let err = p
            .feed(
                Some("error"),
                r#"{"type":"error","code":"context_length_exceeded","message":"too long","param":null}"#,
            )
            .unwrap_err();
        assert!(!err.is_retryable(), "{err:?}");
        let (events, _) = run(&[
            r#"{"type":"response.incomplete","response":{"status":"incomplete","incomplete_details":{"reason":"max_output_tokens"}}}"#,
        ]);
        assert_eq!(events, vec![StreamEvent::Stop { reason: Some("max_output_tokens".into()) }]);
        let mut p = ResponsesStreamParser::new("openai");
        p.feed(None, r#"{"type":"response.output_text.delta","delta":"x"}"#).unwrap();
        let err = p.on_end(&mut Vec::new()).unwrap_err();
        assert!(matches!(err, ProviderError::Protocol { .. }));
        assert!(matches!(p.feed(None, "{nope").unwrap_err(), ProviderError::Protocol { .. }));
    }

    #[test]
    fn request_body_mapping() {
        let request = ModelRequest {
            model: "gpt-5".into(),
            system: Some("be brief".into()),
            messages: vec![
                Message::user_text("weather?"),
                Message::new(
                    Role::Assistant,
                    vec![
                        ContentPart::Thinking { text: "plan".into(), signature: Some("ENC".into()) },
                        ContentPart::Thinking { text: "unsigned".into(), signature: None },
                        ContentPart::text("checking"),
                        ContentPart::ToolUse { id: "c1".into(), name: "w".into(), input: json!({"city":"SF"}) },
                    ],
                ),
                Message::new(
                    Role::User,
                    vec![ContentPart::ToolResult { tool_use_id: "c1".into(), content: "22C".into(), is_error: false }],
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
        assert_eq!(
            build_responses_body(&request),
            json!({
                "model": "gpt-5",
                "instructions": "be brief",
                "input": [
                    {"type":"message","role":"user","content":[{"type":"input_text","text":"weather?"}]},
                    {"type":"reasoning","summary":[{"type":"summary_text","text":"plan"}],"encrypted_content":"ENC"},
                    {"type":"message","role":"assistant","content":[{"type":"output_text","text":"checking"}]},
                    {"type":"function_call","call_id":"c1","name":"w","arguments":"{\"city\":\"SF\"}"},
                    {"type":"function_call_output","call_id":"c1","output":"22C"},
                ],
                "tools": [{"type":"function","name":"w","description":"weather","parameters":{"type":"object"},"strict":false}],
                "tool_choice": "auto",
                "parallel_tool_calls": true,
                "max_output_tokens": 100,
                "stream": true,
                "store": false,
                "include": ["reasoning.encrypted_content"],
            })
        );
    }
}
