//! The real chat templates of tool-capable models (`tests/fixtures/templates/*.jinja`, see the
//! README there) rendered by [`ChatTemplate`] with tools and a tool-call history, compared byte
//! for byte with their reference rendering: Python's `jinja2` set up as Hugging Face's
//! `apply_chat_template` sets it up (`tests/fixtures/templates/render.py`), given the very same
//! variables ([`ChatTemplate::context_json`]).
//!
//! The comparison needs `python3` with `jinja2` (`.ci/run` installs it); without it those tests
//! print a loud skip notice, unless `DESCARTES_TEST_REQUIRE_JINJA2=1`, which makes them fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use descartes_local::template::{ChatMessage, ChatTemplate, ToolCallFormat, map_messages};
use descartes_protocol::{ContentPart, Message, Role, ToolSpec};
use descartes_providers::parse_text_tool_calls;
use serde_json::json;

/// The fixed date `strftime_now` gives (both sides).
const TODAY: (i32, u32, u32) = (2024, 9, 5);
const TODAY_ISO: &str = "2024-09-05";

struct Case {
    file: &'static str,
    bos: &'static str,
    eos: &'static str,
    /// The template reads `tools`.
    tools: bool,
    format: ToolCallFormat,
}

const CASES: &[Case] = &[
    Case {
        file: "Qwen-Qwen2.5-7B-Instruct.jinja",
        bos: "",
        eos: "<|im_end|>",
        tools: true,
        format: ToolCallFormat::Hermes,
    },
    Case { file: "Qwen-Qwen3-0.6B.jinja", bos: "", eos: "<|im_end|>", tools: true, format: ToolCallFormat::Hermes },
    Case {
        file: "meta-llama-Llama-3.1-8B-Instruct.jinja",
        bos: "<|begin_of_text|>",
        eos: "<|eot_id|>",
        tools: true,
        format: ToolCallFormat::LlamaJson,
    },
    Case {
        file: "meta-llama-Llama-3.2-3B-Instruct.jinja",
        bos: "<|begin_of_text|>",
        eos: "<|eot_id|>",
        tools: true,
        format: ToolCallFormat::LlamaJson,
    },
    Case {
        file: "HuggingFaceTB-SmolLM3-3B-hf.jinja",
        bos: "",
        eos: "<|im_end|>",
        tools: true,
        format: ToolCallFormat::Hermes,
    },
    Case {
        file: "HuggingFaceTB-SmolLM3-3B.jinja",
        bos: "",
        eos: "<|im_end|>",
        tools: false,
        format: ToolCallFormat::None,
    },
    Case {
        file: "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
        bos: "<|begin_of_text|>",
        eos: "<|im_end|>",
        tools: true,
        format: ToolCallFormat::Hermes,
    },
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/templates")
}

fn load(case: &Case) -> ChatTemplate {
    let source = std::fs::read_to_string(fixtures().join(case.file)).unwrap();
    let (template, compiled) = ChatTemplate::new(Some(&source), case.bos, case.eos);
    assert!(compiled, "{} does not compile", case.file);
    template.with_date(TODAY.0, TODAY.1, TODAY.2)
}

fn tools() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "get_weather".into(),
            description: "Get the current weather in a city.".into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city, e.g. \"Paris\" or 'Zürich'."},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "The unit."},
                    "days": {"type": "integer", "description": "Days of forecast <= 7 & >= 1."}
                },
                "required": ["city"]
            }),
        },
        ToolSpec {
            name: "read_file".into(),
            description: "Read a text file.\nReturns its content.".into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Path of the file."},
                    "offset": {"type": "number", "description": "Where to start, in lines."},
                    "follow": {"type": "boolean", "description": "Follow symbolic links."}
                },
                "required": ["path"]
            }),
        },
    ]
}

const SYSTEM: &str = "You are a helpful assistant. Use the tools when they help.";

/// A system prompt, a user message, an assistant's tool call (with text), its result.
fn tool_conversation() -> Vec<Message> {
    vec![
        Message::user_text("What's the weather in Paris?"),
        Message::new(
            Role::Assistant,
            vec![
                ContentPart::Thinking { text: "The user wants the weather.".into(), signature: None },
                ContentPart::text("Let me check."),
                ContentPart::ToolUse {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    input: json!({"city": "Paris", "unit": "celsius"}),
                },
            ],
        ),
        Message::new(
            Role::User,
            vec![ContentPart::ToolResult {
                tool_use_id: "call_1".into(),
                content: "{\"temperature\": 21, \"sky\": \"clear\"}".into(),
                is_error: false,
            }],
        ),
    ]
}

/// Two calls at once, one failing, then the model answers and the user asks again.
fn parallel_conversation() -> Vec<Message> {
    vec![
        Message::user_text("Compare the weather in Paris and Oslo, then read notes.txt."),
        Message::new(
            Role::Assistant,
            vec![
                ContentPart::ToolUse { id: "a".into(), name: "get_weather".into(), input: json!({"city": "Paris"}) },
                ContentPart::ToolUse { id: "b".into(), name: "get_weather".into(), input: json!({"city": "Oslo"}) },
            ],
        ),
        Message::new(
            Role::User,
            vec![
                ContentPart::ToolResult { tool_use_id: "a".into(), content: "21 C".into(), is_error: false },
                ContentPart::ToolResult {
                    tool_use_id: "b".into(),
                    content: "service unavailable".into(),
                    is_error: true,
                },
            ],
        ),
        Message::assistant_text("Paris is at 21 C; Oslo's weather is unavailable."),
        Message::user_text("Now read notes.txt please."),
    ]
}

/// Whether the reference renderer can run: `python3` with `jinja2`.
fn jinja2() -> bool {
    descartes_test_support::python::jinja2()
}

/// The prompt Python's jinja2 renders from `template` with `context` (JSON).
fn reference(file: &str, context: &str) -> Result<String, String> {
    let request = format!(
        "{{\"template\": {}, \"context\": {context}, \"today\": \"{TODAY_ISO}\"}}",
        serde_json::to_string(&fixtures().join(file)).unwrap()
    );
    let mut child = Command::new("python3")
        .arg(fixtures().join("render.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(request.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    if output.status.success() {
        Ok(String::from_utf8(output.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Renders `messages` with every template, ours and the reference, and requires the same bytes
/// (or the same refusal: a template may raise an exception). Returns our prompts.
fn compare(system: Option<&str>, messages: &[Message], tools: &[ToolSpec]) -> Vec<(&'static str, String)> {
    let mapped = map_messages(system, messages);
    let mut prompts = Vec::new();
    for case in CASES {
        let template = load(case);
        let ours = template.render(&mapped, tools);
        let context = template.context_json(&mapped, tools).unwrap();
        match (ours, reference(case.file, &context)) {
            (Ok(ours), Ok(theirs)) => {
                assert!(
                    ours == theirs,
                    "{}: our prompt differs from the reference rendering\n--- ours ---\n{ours}\n--- jinja2 ---\n{theirs}\n--- context ---\n{context}",
                    case.file
                );
                prompts.push((case.file, ours));
            }
            (Err(ours), Err(theirs)) => eprintln!("{}: both refuse: {ours} / {}", case.file, theirs.trim()),
            // Hermes' tool-use template loops over `tools` unguarded: jinja2 cannot iterate
            // `None`, minijinja iterates it as empty (that template is for tool use only).
            (Ok(_), Err(theirs))
                if case.file.contains("Hermes") && theirs.contains("'NoneType' object is not iterable") => {}
            (ours, theirs) => panic!("{}: ours {ours:?}, jinja2 {theirs:?}\ncontext: {context}", case.file),
        }
    }
    prompts
}

#[test]
fn prompts_with_tools_and_a_tool_call_match_the_reference_rendering() {
    if !jinja2() {
        return;
    }
    let prompts = compare(Some(SYSTEM), &tool_conversation(), &tools());
    assert_eq!(prompts.len(), CASES.len());
}

#[test]
fn prompts_with_parallel_calls_and_errors_match_the_reference_rendering() {
    if !jinja2() {
        return;
    }
    let prompts = compare(Some(SYSTEM), &parallel_conversation(), &tools());
    assert_eq!(prompts.len(), CASES.len());
    // Without a system prompt, and without tools.
    compare(None, &parallel_conversation(), &tools());
    // (Hermes' tool-use template cannot render without tools: see compare.)
    let prompts = compare(None, &[Message::user_text("What is the capital of France?")], &[]);
    assert_eq!(prompts.len(), CASES.len() - 1);
    compare(Some("Be brief. /no_think"), &[Message::user_text("Hi"), Message::assistant_text("Hello!")], &[]);
}

/// Without Python: the prompt of every tool-capable template holds the tools (names,
/// descriptions, parameters), the call and its result; the others hold neither.
#[test]
fn tool_capable_templates_put_the_tools_the_call_and_the_result_in_the_prompt() {
    let mapped = map_messages(Some(SYSTEM), &tool_conversation());
    for case in CASES {
        let template = load(case);
        assert_eq!(template.supports_tools(), case.tools, "{}", case.file);
        assert_eq!(template.tool_call_format(), case.format, "{}", case.file);
        let prompt = template.render(&mapped, &tools()).unwrap();
        for needle in ["read_file", "Get the current weather in a city.", "Follow symbolic links.", "offset"] {
            assert_eq!(prompt.contains(needle), case.tools, "{}: {needle} in\n{prompt}", case.file);
        }
        assert!(prompt.contains("What's the weather in Paris?"), "{}", case.file);
        // Llama 3.x shows a result as JSON, a string result as a JSON string (as with Hugging Face).
        let result = if case.format == ToolCallFormat::LlamaJson {
            "\"{\\\"temperature\\\": 21, \\\"sky\\\": \\\"clear\\\"}\""
        } else {
            "{\"temperature\": 21, \"sky\": \"clear\"}"
        };
        assert!(prompt.contains(result), "{}: the result {result} in\n{prompt}", case.file);
        assert!(!prompt.contains("The user wants the weather."), "{}: thinking", case.file);
        // The call is shown as the model writes it, and parses back.
        let (calls, _) = parse_text_tool_calls(&prompt, &["get_weather"]);
        let parsed =
            calls.iter().any(|c| c.name == "get_weather" && c.arguments == json!({"city": "Paris", "unit": "celsius"}));
        assert_eq!(parsed, case.tools, "{}: the call in\n{prompt}", case.file);
        let expected_call = match case.format {
            ToolCallFormat::Hermes => {
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>"
            }
            ToolCallFormat::LlamaJson => {
                "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}"
            }
            ToolCallFormat::None => "[tool call call_1: get_weather {\"city\":\"Paris\",\"unit\":\"celsius\"}]",
        };
        assert!(prompt.contains(expected_call), "{}: {expected_call} in\n{prompt}", case.file);
    }
}

#[test]
fn the_generation_prompt_ends_every_prompt() {
    let mapped = map_messages(Some(SYSTEM), &tool_conversation());
    let ends = [
        ("Hermes", "<|im_start|>assistant\n"),
        ("Qwen", "<|im_start|>assistant\n"),
        ("Llama", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        ("SmolLM3", "<|im_start|>assistant\n"),
    ];
    for case in CASES {
        let prompt = load(case).render(&mapped, &tools()).unwrap();
        let (_, end) = ends.iter().find(|(k, _)| case.file.contains(k)).unwrap();
        assert!(prompt.ends_with(end), "{}: {prompt}", case.file);
    }
}

#[test]
fn llama_gets_one_call_per_message_and_the_date() {
    let case = CASES.iter().find(|c| c.file.contains("Llama-3.2")).unwrap();
    let prompt = load(case).render(&map_messages(None, &parallel_conversation()), &tools()).unwrap();
    assert!(prompt.contains("Today Date: 05 Sep 2024"), "{prompt}");
    assert!(prompt.contains("{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|>"));
    assert!(prompt.contains("{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}<|eot_id|>"));
    assert!(prompt.contains("<|start_header_id|>ipython<|end_header_id|>\n\n\"Error: service unavailable\"<|eot_id|>"));
    // Llama 3.1 keeps its fixed date when none is given, as with Hugging Face.
    let case = CASES.iter().find(|c| c.file.contains("Llama-3.1")).unwrap();
    let prompt = load(case).render(&[ChatMessage::new("user", "hi")], &[]).unwrap();
    assert!(prompt.contains("Today Date: 26 Jul 2024"), "{prompt}");
}
