//! Provider-neutral conversation model. Providers translate to and from their wire formats.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One block of a message. Serialized with a `type` tag (`text`, `thinking`, `tool_use`,
/// `tool_result`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    Text {
        text: String,
    },
    /// Model reasoning. `signature` must be sent back unchanged (Anthropic, Gemini).
    Thinking {
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
    },
    /// The model asks for a tool call. `input` is the parsed JSON arguments; when the model
    /// produced invalid JSON, it is a JSON string holding the raw text.
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    /// The result of a tool call, sent back to the model in a user message.
    ToolResult {
        tool_use_id: String,
        content: String,
        #[serde(default)]
        is_error: bool,
    },
}

// Deserialized through a flat struct: serde's internally tagged enums buffer every value first,
// which made replaying long runs several times slower.
#[derive(Deserialize)]
struct RawPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    tool_use_id: Option<String>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    is_error: bool,
}

impl<'de> Deserialize<'de> for ContentPart {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let r = RawPart::deserialize(d)?;
        let need = |v: Option<String>, field: &str| v.ok_or_else(|| D::Error::missing_field_in(&r.kind, field));
        Ok(match r.kind.as_str() {
            "text" => ContentPart::Text { text: need(r.text, "text")? },
            "thinking" => ContentPart::Thinking { text: need(r.text, "text")?, signature: r.signature },
            "tool_use" => ContentPart::ToolUse {
                id: need(r.id, "id")?,
                name: need(r.name, "name")?,
                input: r.input.unwrap_or(Value::Null),
            },
            "tool_result" => ContentPart::ToolResult {
                tool_use_id: need(r.tool_use_id, "tool_use_id")?,
                content: r.content.unwrap_or_default(),
                is_error: r.is_error,
            },
            other => return Err(D::Error::custom(format!("unknown content part type `{other}`"))),
        })
    }
}

trait MissingIn: serde::de::Error {
    fn missing_field_in(kind: &str, field: &str) -> Self {
        Self::custom(format!("content part `{kind}` is missing `{field}`"))
    }
}
impl<E: serde::de::Error> MissingIn for E {}

impl ContentPart {
    pub fn text(text: impl Into<String>) -> Self {
        ContentPart::Text { text: text.into() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: Vec<ContentPart>,
}

impl Message {
    pub fn new(role: Role, content: Vec<ContentPart>) -> Self {
        Self { role, content }
    }
    pub fn user_text(text: impl Into<String>) -> Self {
        Self::new(Role::User, vec![ContentPart::text(text)])
    }
    pub fn assistant_text(text: impl Into<String>) -> Self {
        Self::new(Role::Assistant, vec![ContentPart::text(text)])
    }
    /// All text parts joined.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for part in &self.content {
            if let ContentPart::Text { text } = part {
                out.push_str(text);
            }
        }
        out
    }
    /// The tool calls this message asks for, in order.
    pub fn tool_uses(&self) -> impl Iterator<Item = (&str, &str, &Value)> {
        self.content.iter().filter_map(|p| match p {
            ContentPart::ToolUse { id, name, input } => Some((id.as_str(), name.as_str(), input)),
            _ => None,
        })
    }
}

/// Token usage of one model call (or a total).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_read_tokens: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_tokens: u64,
    /// The provider reported no usage, so Descartes counted the tokens itself (with the
    /// model family's tokenizer, or an estimate of it): close, not exact.
    #[serde(default, skip_serializing_if = "is_false")]
    pub estimated: bool,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

impl Usage {
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_read_tokens += other.cache_read_tokens;
        self.cache_write_tokens += other.cache_write_tokens;
        self.estimated |= other.estimated;
    }
    pub fn total(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }
    /// Every token the call processed: input, output, and cache reads and writes (what
    /// `--max-tokens` caps and `descartes list` shows).
    pub fn all_tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens + self.cache_read_tokens + self.cache_write_tokens
    }
}

/// A tool as offered to a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments object.
    pub input_schema: Value,
}
