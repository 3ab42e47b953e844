//! The model provider trait. Streaming first: every backend produces a stream of
//! [`StreamEvent`]s; [`ResponseAssembler`] turns them into the assistant message.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use descartes_protocol::{ContentPart, Message, ToolSpec, Usage};
use futures::Stream;
use serde_json::Value;

/// What a model is asked.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRequest {
    pub model: String,
    pub system: Option<String>,
    /// The conversation, shared with the run's state (requests do not copy it).
    pub messages: Arc<Vec<Message>>,
    pub tools: Arc<Vec<ToolSpec>>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
}

/// One increment of a streamed model response.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// Answer text.
    TextDelta(String),
    /// Reasoning text.
    ThinkingDelta(String),
    /// Signature of the current thinking block (must be sent back with it).
    ThinkingSignature(String),
    /// A tool call begins. `index` identifies it among this response's tool calls.
    ToolCallStart { index: usize, id: String, name: String },
    /// A fragment of a tool call's JSON arguments.
    ToolCallDelta { index: usize, json: String },
    /// Usage so far (running totals: assign, do not add).
    Usage(Usage),
    /// The model stopped; the stream ends after this.
    Stop { reason: Option<String> },
}

pub type ModelStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, ProviderError>> + Send>>;

/// Errors of model backends.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// No API key: names the variable to set. Not retryable.
    #[error("{provider}: no API key; set {var} (or pass -p to choose another provider)")]
    MissingApiKey { provider: String, var: String },
    /// The provider's configuration is invalid. Not retryable.
    #[error("{provider}: {message}")]
    Config { provider: String, message: String },
    /// The server answered with an error status. Retryable for 408, 409, 429 (unless the quota
    /// is exhausted), 5xx and 529.
    #[error("{provider}: HTTP {status}: {message}")]
    Http { provider: String, status: u16, message: String, code: Option<String>, retry_after: Option<Duration> },
    /// The connection failed or broke. Retryable.
    #[error("{provider}: connection error: {message}")]
    Network { provider: String, message: String },
    /// The server sent something that is not the protocol (malformed SSE/JSON, stream ended
    /// early). Retryable: the call is made again on resume.
    #[error("{provider}: malformed response: {message}")]
    Protocol { provider: String, message: String },
    /// The provider reported an error inside the stream (e.g. `overloaded_error`).
    #[error("{provider}: {kind}: {message}")]
    Stream { provider: String, kind: String, message: String, retryable: bool },
    /// The call was cancelled by the user. Not retryable.
    #[error("cancelled")]
    Cancelled,
}

impl ProviderError {
    /// How long the server asked us to wait before trying again.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The provider that failed (empty for cancellation).
    pub fn provider(&self) -> &str {
        match self {
            ProviderError::MissingApiKey { provider, .. }
            | ProviderError::Config { provider, .. }
            | ProviderError::Http { provider, .. }
            | ProviderError::Network { provider, .. }
            | ProviderError::Protocol { provider, .. }
            | ProviderError::Stream { provider, .. } => provider,
            ProviderError::Cancelled => "",
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::MissingApiKey { .. } | ProviderError::Config { .. } | ProviderError::Cancelled => false,
            ProviderError::Http { status, code, .. } => {
                if code.as_deref() == Some("insufficient_quota") {
                    return false;
                }
                matches!(status, 408 | 409 | 429 | 529) || *status >= 500
            }
            ProviderError::Network { .. } | ProviderError::Protocol { .. } => true,
            ProviderError::Stream { retryable, .. } => *retryable,
        }
    }
}

/// A model backend.
#[async_trait]
pub trait Provider: Send + Sync {
    /// The provider's name as users select it (`openai`, `anthropic`, ...).
    fn name(&self) -> &str;

    /// Starts a streamed model call. Errors before the first byte (HTTP status, connection)
    /// are returned here; errors after it arrive in the stream.
    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ProviderError>;
}

/// Builds the assistant message out of stream events.
#[derive(Debug, Default)]
pub struct ResponseAssembler {
    parts: Vec<Part>,
    pub usage: Usage,
    pub stop_reason: Option<String>,
    pub stopped: bool,
}

#[derive(Debug)]
enum Part {
    Text(String),
    Thinking(String, Option<String>),
    Tool { index: usize, id: String, name: String, json: String },
}

impl ResponseAssembler {
    pub fn push(&mut self, event: StreamEvent) {
        match event {
            StreamEvent::TextDelta(t) => match self.parts.last_mut() {
                Some(Part::Text(s)) => s.push_str(&t),
                _ => self.parts.push(Part::Text(t)),
            },
            StreamEvent::ThinkingDelta(t) => match self.parts.last_mut() {
                Some(Part::Thinking(s, None)) => s.push_str(&t),
                _ => self.parts.push(Part::Thinking(t, None)),
            },
            StreamEvent::ThinkingSignature(sig) => match self.parts.last_mut() {
                Some(Part::Thinking(_, s)) => *s = Some(sig),
                _ => self.parts.push(Part::Thinking(String::new(), Some(sig))),
            },
            StreamEvent::ToolCallStart { index, id, name } => {
                self.parts.push(Part::Tool { index, id, name, json: String::new() })
            }
            StreamEvent::ToolCallDelta { index, json } => {
                if let Some(Part::Tool { json: buf, .. }) =
                    self.parts.iter_mut().rev().find(|p| matches!(p, Part::Tool { index: i, .. } if *i == index))
                {
                    buf.push_str(&json);
                }
            }
            StreamEvent::Usage(u) => self.usage = u,
            StreamEvent::Stop { reason } => {
                self.stop_reason = reason;
                self.stopped = true;
            }
        }
    }

    /// The assembled content. Tool arguments that are not valid JSON are kept as a JSON string
    /// holding the raw text, so the tool can report the problem to the model.
    pub fn finish(self) -> Vec<ContentPart> {
        self.parts
            .into_iter()
            .filter_map(|p| match p {
                Part::Text(text) if text.is_empty() => None,
                Part::Text(text) => Some(ContentPart::Text { text }),
                Part::Thinking(text, signature) => Some(ContentPart::Thinking { text, signature }),
                Part::Tool { id, name, json, .. } => {
                    let input = if json.trim().is_empty() {
                        Value::Object(Default::default())
                    } else {
                        serde_json::from_str(&json).unwrap_or(Value::String(json))
                    };
                    Some(ContentPart::ToolUse { id, name, input })
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_text_and_tool_fragments() {
        let mut a = ResponseAssembler::default();
        for e in [
            StreamEvent::TextDelta("Hel".into()),
            StreamEvent::TextDelta("lo".into()),
            StreamEvent::ToolCallStart { index: 0, id: "c1".into(), name: "shell".into() },
            StreamEvent::ToolCallDelta { index: 0, json: "{\"command\":".into() },
            StreamEvent::ToolCallDelta { index: 0, json: "\"ls\"}".into() },
            StreamEvent::Stop { reason: Some("tool_calls".into()) },
        ] {
            a.push(e);
        }
        let parts = a.finish();
        assert_eq!(parts[0], ContentPart::text("Hello"));
        assert_eq!(
            parts[1],
            ContentPart::ToolUse { id: "c1".into(), name: "shell".into(), input: serde_json::json!({"command":"ls"}) }
        );
    }

    #[test]
    fn invalid_tool_json_is_kept_raw() {
        let mut a = ResponseAssembler::default();
        a.push(StreamEvent::ToolCallStart { index: 0, id: "c".into(), name: "t".into() });
        a.push(StreamEvent::ToolCallDelta { index: 0, json: "{oops".into() });
        assert_eq!(
            a.finish()[0],
            ContentPart::ToolUse { id: "c".into(), name: "t".into(), input: Value::String("{oops".into()) }
        );
    }

    #[test]
    fn quota_errors_are_not_retryable() {
        let e = |status, code: Option<&str>| ProviderError::Http {
            provider: "p".into(),
            status,
            message: String::new(),
            code: code.map(str::to_owned),
            retry_after: None,
        };
        assert!(e(429, None).is_retryable());
        assert!(!e(429, Some("insufficient_quota")).is_retryable());
        assert!(e(500, None).is_retryable());
        assert!(!e(400, None).is_retryable());
        assert!(!e(401, None).is_retryable());
    }
}
