#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The agent loop driven directly: an in-memory event store, a scripted model, counting tools,
//! a recording sink and a scripted prompter. Crashes are simulated by writing a hand-made
//! prefix of a run's log and resuming from its fold.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use descartes_core::agent::goal_message;
use descartes_core::permission::NoPrompter;
use descartes_core::testing::{Scripted, ScriptedProvider};
use descartes_core::{
    Agent, AgentConfig, EventStore, ModelRequest, ModelStream, OutputSink, PermissionRequest, PromptAnswer, Prompter,
    Provider, ProviderError, Recovery, RunOutcome, RunState, StreamEvent, Tool, ToolContext, ToolOutput, ToolRegistry,
};
use descartes_protocol::{
    ContentPart, Decision, DecisionScope, Event, EventData, Message, MessageAdded, ModelCallCompleted,
    ModelCallStarted, NewEvent, PermissionDecided, Role, RunId, RunStarted, ToolCallCompleted, ToolCallStarted,
    ToolSpec, Usage,
};
use descartes_store::MemoryEventStore;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Test doubles
// ---------------------------------------------------------------------------------------------

/// A tool that counts its executions and recoveries.
struct CountingTool {
    name: String,
    read_only: bool,
    idempotent: bool,
    recovery: Recovery,
    calls: AtomicUsize,
    recovers: AtomicUsize,
    /// Cancelled when the tool executes (simulates Ctrl-C while a tool runs).
    cancel_on_call: Option<CancellationToken>,
}

impl CountingTool {
    fn new(name: &str, read_only: bool, idempotent: bool) -> Self {
        Self {
            name: name.into(),
            read_only,
            idempotent,
            recovery: Recovery::Unknown,
            calls: AtomicUsize::new(0),
            recovers: AtomicUsize::new(0),
            cancel_on_call: None,
        }
    }
    fn with_recovery(mut self, recovery: Recovery) -> Self {
        self.recovery = recovery;
        self
    }
    fn cancelling(mut self, token: CancellationToken) -> Self {
        self.cancel_on_call = Some(token);
        self
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn recovers(&self) -> usize {
        self.recovers.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Tool for CountingTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: self.name.clone(),
            description: format!("test tool {}", self.name),
            input_schema: json!({"type": "object"}),
        }
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn idempotent(&self) -> bool {
        self.idempotent
    }
    async fn call(&self, input: Value, _ctx: &ToolContext) -> ToolOutput {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(token) = &self.cancel_on_call {
            token.cancel();
        }
        ToolOutput::ok(format!("{} ran (#{n}) with {input}", self.name)).with_details(json!({"n": n}))
    }
    async fn recover(&self, _input: &Value, _ctx: &ToolContext) -> Recovery {
        self.recovers.fetch_add(1, Ordering::SeqCst);
        self.recovery.clone()
    }
}

/// Records everything the agent reports.
#[derive(Default)]
struct RecordingSink {
    events: Mutex<Vec<Event>>,
    notices: Mutex<Vec<String>>,
    text: Mutex<String>,
}

impl RecordingSink {
    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }
    fn notices(&self) -> Vec<String> {
        self.notices.lock().unwrap().clone()
    }
}

impl OutputSink for RecordingSink {
    fn text_delta(&self, text: &str) {
        self.text.lock().unwrap().push_str(text);
    }
    fn event(&self, event: &Event) {
        self.events.lock().unwrap().push(event.clone());
    }
    fn notice(&self, message: &str) {
        self.notices.lock().unwrap().push(message.to_owned());
    }
}

/// Answers permission prompts from a queue (`Unavailable` once it is empty).
#[derive(Default)]
struct ScriptedPrompter {
    answers: Mutex<VecDeque<PromptAnswer>>,
    asked: Mutex<Vec<PermissionRequest>>,
}

impl ScriptedPrompter {
    fn new(answers: impl IntoIterator<Item = PromptAnswer>) -> Self {
        Self { answers: Mutex::new(answers.into_iter().collect()), asked: Mutex::default() }
    }
    fn asked(&self) -> usize {
        self.asked.lock().unwrap().len()
    }
}

#[async_trait]
impl Prompter for ScriptedPrompter {
    async fn ask(&self, request: &PermissionRequest) -> PromptAnswer {
        self.asked.lock().unwrap().push(request.clone());
        self.answers.lock().unwrap().pop_front().unwrap_or(PromptAnswer::Unavailable)
    }
}

/// A provider whose stream never produces anything (a model call in flight).
#[derive(Default)]
struct HangingProvider {
    calls: AtomicUsize,
}

#[async_trait]
impl Provider for HangingProvider {
    fn name(&self) -> &str {
        "scripted"
    }
    async fn stream(&self, _request: ModelRequest) -> Result<ModelStream, ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Box::pin(futures::stream::pending()))
    }
}

/// A provider answering with raw stream events computed from the request (several tool calls
/// per answer are possible, unlike [`ScriptedProvider`]).
type AnswerFn = dyn Fn(&ModelRequest) -> Vec<StreamEvent> + Send + Sync;

struct FnProvider {
    f: Box<AnswerFn>,
    calls: AtomicUsize,
}

impl FnProvider {
    fn new(f: impl Fn(&ModelRequest) -> Vec<StreamEvent> + Send + Sync + 'static) -> Self {
        Self { f: Box::new(f), calls: AtomicUsize::new(0) }
    }
}

#[async_trait]
impl Provider for FnProvider {
    fn name(&self) -> &str {
        "scripted"
    }
    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let events: Vec<Result<StreamEvent, ProviderError>> = (self.f)(&request).into_iter().map(Ok).collect();
        Ok(Box::pin(futures::stream::iter(events)))
    }
}

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

const MODEL: &str = "test-model";

fn config(auto_approve: bool, max_turns: u32) -> AgentConfig {
    let tmp: PathBuf = std::env::temp_dir();
    AgentConfig {
        provider: "scripted".into(),
        model: MODEL.into(),
        max_turns,
        auto_approve,
        system_prompt: None,
        max_tokens: None,
        cwd: tmp.clone(),
        spool_root: tmp.join("descartes-agent-loop-test-spool"),
        budget: Default::default(),
    }
}

struct Harness {
    store: Arc<MemoryEventStore>,
    sink: Arc<RecordingSink>,
    prompter: Arc<dyn Prompter>,
    tools: ToolRegistry,
    cancel: CancellationToken,
    policy: descartes_core::policy::Policy,
}

impl Harness {
    fn new<const N: usize>(tools: [Arc<CountingTool>; N]) -> Self {
        let mut registry = ToolRegistry::new();
        for t in tools {
            registry.register(t);
        }
        Self {
            store: Arc::new(MemoryEventStore::new()),
            sink: Arc::new(RecordingSink::default()),
            prompter: Arc::new(ScriptedPrompter::default()),
            tools: registry,
            cancel: CancellationToken::new(),
            policy: Default::default(),
        }
    }

    fn with_prompter(mut self, prompter: Arc<dyn Prompter>) -> Self {
        self.prompter = prompter;
        self
    }

    /// A fresh sink for the next agent (so a resume's reports can be checked on their own).
    fn new_sink(&mut self) {
        self.sink = Arc::new(RecordingSink::default());
    }

    fn agent(&self, provider: Arc<dyn Provider>, config: AgentConfig) -> Agent {
        Agent {
            store: self.store.clone(),
            provider,
            tools: self.tools.clone(),
            prompter: self.prompter.clone(),
            sink: self.sink.clone(),
            cancel: self.cancel.clone(),
            config,
            tool_specs: Default::default(),
            policy: self.policy.clone(),
            gate: None,
            // No retries unless a test asks for them (the failure paths are tested as such).
            resilience: descartes_core::Resilience {
                retry: descartes_core::RetryPolicy { max_retries: 0, ..Default::default() },
                ..Default::default()
            },
        }
    }

    async fn start(&self, provider: Arc<dyn Provider>, config: AgentConfig, run_id: &RunId) -> RunOutcome {
        let prompt = "do the thing";
        self.agent(provider, config).start(run_id.clone(), prompt.into(), goal_message(prompt, None)).await.unwrap()
    }

    async fn resume(&self, provider: Arc<dyn Provider>, config: AgentConfig, run_id: &RunId) -> RunOutcome {
        let events = self.store.read_run(run_id, 0).await.unwrap();
        let state = RunState::fold(run_id.clone(), &events).unwrap();
        self.agent(provider, config).resume(state, "interrupted").await.unwrap()
    }

    async fn log(&self, run_id: &RunId) -> Vec<Event> {
        self.store.read_run(run_id, 0).await.unwrap()
    }

    async fn append(&self, events: Vec<NewEvent>) {
        self.store.append(events).await.unwrap();
    }
}

/// A scripted provider answering the n-th call with `script[n]` (and panicking past its end, so
/// an unexpected model call fails the test).
fn scripted(script: Vec<Scripted>) -> Arc<ScriptedProvider> {
    Arc::new(ScriptedProvider::new(move |_, n| match script.get(n) {
        Some(s) => s.clone(),
        None => panic!("unexpected model call #{n}"),
    }))
}

fn tool_call(id: &str, tool: &str, args: &str) -> Scripted {
    Scripted::ToolCall(id.into(), tool.into(), args.into())
}

fn text(t: &str) -> Scripted {
    Scripted::Text(t.into())
}

fn kinds(events: &[Event]) -> Vec<&str> {
    events.iter().map(Event::kind).collect()
}

fn count(events: &[Event], kind: &str) -> usize {
    events.iter().filter(|e| e.kind() == kind).count()
}

fn permissions(events: &[Event]) -> Vec<PermissionDecided> {
    events
        .iter()
        .filter_map(|e| match &e.data {
            EventData::PermissionDecided(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

fn completions(events: &[Event]) -> Vec<ToolCallCompleted> {
    events
        .iter()
        .filter_map(|e| match &e.data {
            EventData::ToolCallCompleted(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

/// The tool results sent to the model in a request, by call id.
fn tool_results(request: &ModelRequest) -> HashMap<String, (String, bool)> {
    request
        .messages
        .iter()
        .flat_map(|m| m.content.iter())
        .filter_map(|p| match p {
            ContentPart::ToolResult { tool_use_id, content, is_error } => {
                Some((tool_use_id.clone(), (content.clone(), *is_error)))
            }
            _ => None,
        })
        .collect()
}

fn requests(provider: &ScriptedProvider) -> Vec<ModelRequest> {
    provider.requests.lock().unwrap().clone()
}

/// The sink got exactly the run's stored events after `after`, once each, in seq order.
fn assert_sink_matches_log(sink: &[Event], log: &[Event], after: i64) {
    let expected: Vec<&Event> = log.iter().filter(|e| e.seq > after).collect();
    let got: Vec<&Event> = sink.iter().collect();
    assert_eq!(got, expected, "sink events differ from the stored events");
    for pair in sink.windows(2) {
        assert!(pair[0].seq < pair[1].seq, "sink events out of order: {} then {}", pair[0].seq, pair[1].seq);
    }
    assert!(sink.iter().all(|e| e.seq > 0), "an event was reported before it had a seq");
}

// ----- hand-made log prefixes ----------------------------------------------------------------

fn ev(run_id: &RunId, data: impl Into<EventData>) -> NewEvent {
    NewEvent::new(run_id, data)
}

fn run_started(run_id: &RunId, auto_approve: bool, tools: &[&str]) -> Vec<NewEvent> {
    vec![
        ev(
            run_id,
            RunStarted {
                prompt: "do the thing".into(),
                provider: "scripted".into(),
                model: MODEL.into(),
                cwd: std::env::temp_dir().display().to_string(),
                max_turns: 10,
                auto_approve,
                system_prompt: None,
                tools: tools.iter().map(|t| (*t).to_owned()).collect(),
                pid: 1,
                version: "0".into(),
                budget: Default::default(),
            },
        ),
        ev(run_id, MessageAdded { message: Message::user_text("do the thing"), model_call_id: None }),
    ]
}

fn model_call_started(run_id: &RunId, call_id: &str, turn: u32) -> NewEvent {
    ev(run_id, ModelCallStarted { call_id: call_id.into(), provider: "scripted".into(), model: MODEL.into(), turn })
}

/// A completed model call that asked for one tool call.
fn model_turn_with_tool(
    run_id: &RunId,
    model_call: &str,
    turn: u32,
    id: &str,
    tool: &str,
    input: Value,
) -> Vec<NewEvent> {
    vec![
        model_call_started(run_id, model_call, turn),
        ev(
            run_id,
            ModelCallCompleted {
                call_id: model_call.into(),
                usage: Usage { input_tokens: 10, output_tokens: 5, ..Default::default() },
                cost_usd: None,
                stop_reason: Some("tool_calls".into()),
                duration_ms: 1,
            },
        ),
        ev(
            run_id,
            MessageAdded {
                message: Message::new(
                    Role::Assistant,
                    vec![ContentPart::ToolUse { id: id.into(), name: tool.into(), input }],
                ),
                model_call_id: Some(model_call.into()),
            },
        ),
    ]
}

fn permission(run_id: &RunId, id: &str, tool: &str, rule: &str, actor: &str) -> NewEvent {
    ev(
        run_id,
        PermissionDecided {
            call_id: Some(id.into()),
            tool: tool.into(),
            decision: Decision::Allow,
            scope: DecisionScope::Once,
            rule: rule.into(),
            actor: actor.into(),
            reason: "test".into(),
            file: None,
            line: None,
        },
    )
}

fn tool_started(run_id: &RunId, id: &str, tool: &str, input: Value, idempotent: bool) -> NewEvent {
    ev(
        run_id,
        ToolCallStarted { call_id: id.into(), tool: tool.into(), input, idempotent, executed_by: None, not_run: false },
    )
}

/// A run that crashed while its tool call `c1` of `tool` was executing (intent logged, no result).
fn crashed_during_tool(run_id: &RunId, tool: &str, idempotent: bool) -> Vec<NewEvent> {
    let input = json!({"x": 1});
    let mut log = run_started(run_id, true, &[tool]);
    log.extend(model_turn_with_tool(run_id, "m1", 1, "c1", tool, input.clone()));
    log.push(permission(run_id, "c1", tool, "flag:--yes", "flag"));
    log.push(tool_started(run_id, "c1", tool, input, idempotent));
    log
}

// ---------------------------------------------------------------------------------------------
// A plain run
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn one_read_only_tool_call_completes_with_events_in_order() {
    let reader = Arc::new(CountingTool::new("reader", true, true));
    let h = Harness::new([reader.clone()]);
    let provider = scripted(vec![tool_call("c1", "reader", r#"{"path":"a"}"#), text("all done")]);
    let run = RunId::from("run-plain");

    let outcome = h.start(provider.clone(), config(false, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "all done".into() });
    assert_eq!(reader.calls(), 1);
    assert_eq!(provider.calls(), 2);
    let log = h.log(&run).await;
    assert_eq!(
        kinds(&log),
        [
            "run_started",
            "message",
            "model_call_started",
            "model_call_completed",
            "message",
            "permission_decided",
            "tool_call_started",
            "tool_call_completed",
            "model_call_started",
            "model_call_completed",
            "message",
            "run_completed",
        ]
    );
    let p = &permissions(&log)[0];
    assert_eq!(p.rule, "builtin:read-only");
    assert_eq!(p.decision, Decision::Allow);
    assert_eq!(p.call_id.as_deref(), Some("c1"));
    let c = &completions(&log)[0];
    assert_eq!(c.call_id, "c1");
    assert!(!c.is_error);
    assert!(!c.recovered);
    assert!(c.output.contains(r#"{"path":"a"}"#), "{}", c.output);
    // The model saw the result in its second request.
    let second = &requests(&provider)[1];
    assert_eq!(tool_results(second)["c1"], (c.output.clone(), false));
    match &log.last().unwrap().data {
        EventData::RunCompleted(r) => {
            assert_eq!(r.result, "all done");
            assert_eq!(r.turns, 2);
            assert_eq!(r.usage.input_tokens, 20);
        }
        other => panic!("last event is {other:?}"),
    }
    assert_sink_matches_log(&h.sink.events(), &log, 0);
    assert_eq!(*h.sink.text.lock().unwrap(), "all done");
    assert_eq!(h.store.list_runs().await.unwrap()[0].status, "completed");
}

#[tokio::test]
async fn non_read_only_tool_is_allowed_by_auto_approve() {
    let writer = Arc::new(CountingTool::new("writer", false, false));
    let prompter = Arc::new(ScriptedPrompter::default());
    let h = Harness::new([writer.clone()]).with_prompter(prompter.clone());
    let provider = scripted(vec![tool_call("c1", "writer", "{}"), text("ok")]);
    let run = RunId::from("run-yes");

    let outcome = h.start(provider, config(true, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "ok".into() });
    assert_eq!(writer.calls(), 1);
    assert_eq!(prompter.asked(), 0);
    let log = h.log(&run).await;
    let p = &permissions(&log)[0];
    assert_eq!((p.rule.as_str(), p.actor.as_str(), p.decision), ("flag:--yes", "flag", Decision::Allow));
    match &log.iter().find(|e| e.kind() == "tool_call_started").unwrap().data {
        EventData::ToolCallStarted(s) => assert!(!s.idempotent),
        _ => unreachable!(),
    }
    assert_sink_matches_log(&h.sink.events(), &log, 0);
}

// ---------------------------------------------------------------------------------------------
// Resume: reconciling a tool intent without a result
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn resume_reruns_an_interrupted_idempotent_call_exactly_once() {
    let tool = Arc::new(CountingTool::new("idem", false, true));
    let h = Harness::new([tool.clone()]);
    let run = RunId::from("run-idem");
    h.append(crashed_during_tool(&run, "idem", true)).await;
    let before = h.log(&run).await.last().unwrap().seq;
    let provider = scripted(vec![text("finished")]);

    let outcome = h.resume(provider.clone(), config(true, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "finished".into() });
    assert_eq!(tool.calls(), 1);
    assert_eq!(tool.recovers(), 0, "an idempotent call is simply run again");
    assert_eq!(provider.calls(), 1);
    let log = h.log(&run).await;
    let new: Vec<&str> = log.iter().filter(|e| e.seq > before).map(Event::kind).collect();
    assert_eq!(
        new,
        [
            "run_resumed",
            "tool_call_completed",
            "model_call_started",
            "model_call_completed",
            "message",
            "run_completed"
        ]
    );
    let c = &completions(&log)[0];
    assert!(!c.is_error && !c.recovered);
    assert_eq!(tool_results(&requests(&provider)[0])["c1"].0, c.output);
    assert!(h.sink.notices().iter().any(|n| n.contains("re-running")), "{:?}", h.sink.notices());
    assert_sink_matches_log(&h.sink.events(), &log, before);
}

#[tokio::test]
async fn resume_recovers_a_completed_non_idempotent_call_without_running_it() {
    let out = ToolOutput::ok("recovered output 42").with_details(json!({"exit_code": 0}));
    let tool = Arc::new(CountingTool::new("effect", false, false).with_recovery(Recovery::Completed(out.clone())));
    let h = Harness::new([tool.clone()]);
    let run = RunId::from("run-recovered");
    h.append(crashed_during_tool(&run, "effect", false)).await;
    let before = h.log(&run).await.last().unwrap().seq;
    let provider = scripted(vec![text("finished")]);

    let outcome = h.resume(provider.clone(), config(true, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "finished".into() });
    assert_eq!(tool.calls(), 0, "a recovered call is not run again");
    assert_eq!(tool.recovers(), 1);
    let log = h.log(&run).await;
    let c = &completions(&log);
    assert_eq!(c.len(), 1);
    assert!(c[0].recovered);
    assert!(!c[0].is_error);
    assert_eq!(c[0].output, "recovered output 42");
    assert_eq!(c[0].details, Some(json!({"exit_code": 0})));
    assert_eq!(tool_results(&requests(&provider)[0])["c1"], ("recovered output 42".to_owned(), false));
    assert_eq!(count(&log, "tool_call_started"), 1, "no second intent");
    assert_sink_matches_log(&h.sink.events(), &log, before);
}

#[tokio::test]
async fn resume_reports_an_unknown_outcome_without_running_the_call() {
    let tool = Arc::new(CountingTool::new("effect", false, false).with_recovery(Recovery::Unknown));
    let h = Harness::new([tool.clone()]);
    let run = RunId::from("run-unknown");
    h.append(crashed_during_tool(&run, "effect", false)).await;
    let before = h.log(&run).await.last().unwrap().seq;
    let provider = scripted(vec![text("I will check")]);

    let outcome = h.resume(provider.clone(), config(true, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "I will check".into() });
    assert_eq!(tool.calls(), 0);
    assert_eq!(tool.recovers(), 1);
    let log = h.log(&run).await;
    let c = &completions(&log)[0];
    assert!(c.is_error);
    assert!(c.output.contains("not known whether it took effect"), "{}", c.output);
    assert!(c.output.contains("not run again"), "{}", c.output);
    let (seen, is_error) = &tool_results(&requests(&provider)[0])["c1"];
    assert!(*is_error);
    assert_eq!(seen, &c.output);
    assert_sink_matches_log(&h.sink.events(), &log, before);
}

#[tokio::test]
async fn resume_runs_a_call_that_never_started() {
    let tool = Arc::new(CountingTool::new("effect", false, false).with_recovery(Recovery::NotStarted));
    let h = Harness::new([tool.clone()]);
    let run = RunId::from("run-notstarted");
    h.append(crashed_during_tool(&run, "effect", false)).await;
    let provider = scripted(vec![text("finished")]);

    let outcome = h.resume(provider.clone(), config(true, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "finished".into() });
    assert_eq!(tool.recovers(), 1);
    assert_eq!(tool.calls(), 1);
    let log = h.log(&run).await;
    let c = &completions(&log)[0];
    assert!(!c.is_error && !c.recovered);
    assert!(c.output.starts_with("effect ran (#1)"), "{}", c.output);
    assert_eq!(count(&log, "tool_call_started"), 1);
}

#[tokio::test]
async fn resume_never_reruns_a_call_whose_result_is_logged() {
    let tool = Arc::new(CountingTool::new("effect", false, false));
    let h = Harness::new([tool.clone()]);
    let run = RunId::from("run-logged");
    let mut log = crashed_during_tool(&run, "effect", false);
    log.push(ev(
        &run,
        ToolCallCompleted {
            call_id: "c1".into(),
            tool: "effect".into(),
            output: "result from before the crash".into(),
            is_error: false,
            duration_ms: 3,
            details: None,
            recovered: false,
        },
    ));
    h.append(log).await;
    let before = h.log(&run).await.last().unwrap().seq;
    let provider = scripted(vec![text("finished")]);

    let outcome = h.resume(provider.clone(), config(true, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "finished".into() });
    assert_eq!(tool.calls(), 0);
    assert_eq!(tool.recovers(), 0);
    assert_eq!(provider.calls(), 1);
    let log = h.log(&run).await;
    let new: Vec<&str> = log.iter().filter(|e| e.seq > before).map(Event::kind).collect();
    assert_eq!(new, ["run_resumed", "model_call_started", "model_call_completed", "message", "run_completed"]);
    assert_eq!(tool_results(&requests(&provider)[0])["c1"], ("result from before the crash".to_owned(), false));
}

#[tokio::test]
async fn resume_remakes_an_interrupted_model_call_once() {
    let h = Harness::new([]);
    let run = RunId::from("run-model");
    let mut log = run_started(&run, false, &[]);
    log.push(model_call_started(&run, "m-lost", 1));
    h.append(log).await;
    let before = h.log(&run).await.last().unwrap().seq;
    let provider = scripted(vec![text("answer")]);

    let outcome = h.resume(provider.clone(), config(false, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "answer".into() });
    assert_eq!(provider.calls(), 1);
    let log = h.log(&run).await;
    let new: Vec<&str> = log.iter().filter(|e| e.seq > before).map(Event::kind).collect();
    assert_eq!(new, ["run_resumed", "model_call_started", "model_call_completed", "message", "run_completed"]);
    assert_eq!(count(&log, "run_completed"), 1);
    // The remade call is turn 1 again (the lost one never completed), under a new id.
    let remade = log
        .iter()
        .filter_map(|e| match &e.data {
            EventData::ModelCallStarted(s) if e.seq > before => Some(s.clone()),
            _ => None,
        })
        .next()
        .unwrap();
    assert_eq!(remade.turn, 1);
    assert_ne!(remade.call_id, "m-lost");
    // The model was asked with the same conversation as before the crash.
    assert_eq!(*requests(&provider)[0].messages, vec![Message::user_text("do the thing")]);
    assert_sink_matches_log(&h.sink.events(), &log, before);
}

// ---------------------------------------------------------------------------------------------
// Permissions
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn allow_for_run_is_asked_once_and_reused_in_later_turns() {
    let writer = Arc::new(CountingTool::new("writer", false, false));
    let prompter = Arc::new(ScriptedPrompter::new([PromptAnswer::AllowForRun]));
    let h = Harness::new([writer.clone()]).with_prompter(prompter.clone());
    let provider =
        scripted(vec![tool_call("c1", "writer", r#"{"a":1}"#), tool_call("c2", "writer", "{}"), text("done")]);
    let run = RunId::from("run-allow-for-run");

    let outcome = h.start(provider, config(false, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "done".into() });
    assert_eq!(prompter.asked(), 1);
    assert_eq!(writer.calls(), 2);
    let asked = prompter.asked.lock().unwrap()[0].clone();
    assert_eq!(asked.tool, "writer");
    assert_eq!(asked.input, json!({"a": 1}));
    let log = h.log(&run).await;
    let p = permissions(&log);
    assert_eq!(p.len(), 2);
    assert_eq!(
        (p[0].call_id.as_deref(), p[0].rule.as_str(), p[0].scope, p[0].decision),
        (Some("c1"), "user:allow-for-run", DecisionScope::Run, Decision::Allow)
    );
    assert_eq!(
        (p[1].call_id.as_deref(), p[1].rule.as_str(), p[1].scope, p[1].decision),
        (Some("c2"), "user:allow-for-run", DecisionScope::Once, Decision::Allow)
    );
    assert_sink_matches_log(&h.sink.events(), &log, 0);
}

#[tokio::test]
async fn allow_for_run_survives_a_resume() {
    // Decided for the run before the crash; a later call of the same tool is not asked about.
    let writer = Arc::new(CountingTool::new("writer", false, false));
    let prompter = Arc::new(ScriptedPrompter::default());
    let h = Harness::new([writer.clone()]).with_prompter(prompter.clone());
    let run = RunId::from("run-allow-for-run-resume");
    let mut log = run_started(&run, false, &["writer"]);
    log.extend(model_turn_with_tool(&run, "m1", 1, "c1", "writer", json!({})));
    log.push(ev(
        &run,
        PermissionDecided {
            call_id: Some("c1".into()),
            tool: "writer".into(),
            decision: Decision::Allow,
            scope: DecisionScope::Run,
            rule: "user:allow-for-run".into(),
            actor: "user".into(),
            reason: "test".into(),
            file: None,
            line: None,
        },
    ));
    log.push(tool_started(&run, "c1", "writer", json!({}), false));
    log.push(ev(
        &run,
        ToolCallCompleted {
            call_id: "c1".into(),
            tool: "writer".into(),
            output: "ok".into(),
            is_error: false,
            duration_ms: 0,
            details: None,
            recovered: false,
        },
    ));
    h.append(log).await;
    let provider = scripted(vec![tool_call("c2", "writer", "{}"), text("done")]);

    let outcome = h.resume(provider, config(false, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "done".into() });
    assert_eq!(prompter.asked(), 0);
    assert_eq!(writer.calls(), 1);
    let p = permissions(&h.log(&run).await);
    assert_eq!(p[1].rule, "user:allow-for-run");
}

#[tokio::test]
async fn allow_once_asks_again_for_the_next_call() {
    let writer = Arc::new(CountingTool::new("writer", false, false));
    let prompter = Arc::new(ScriptedPrompter::new([PromptAnswer::AllowOnce, PromptAnswer::AllowOnce]));
    let h = Harness::new([writer.clone()]).with_prompter(prompter.clone());
    let provider = scripted(vec![tool_call("c1", "writer", "{}"), tool_call("c2", "writer", "{}"), text("done")]);
    let run = RunId::from("run-allow-once");

    let outcome = h.start(provider, config(false, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "done".into() });
    assert_eq!(prompter.asked(), 2);
    assert_eq!(writer.calls(), 2);
    let p = permissions(&h.log(&run).await);
    assert!(p.iter().all(|p| p.rule == "user:allow-once" && p.scope == DecisionScope::Once));
}

#[tokio::test]
async fn denied_call_is_not_executed_and_the_model_is_told() {
    let writer = Arc::new(CountingTool::new("writer", false, false));
    let prompter = Arc::new(ScriptedPrompter::new([PromptAnswer::Deny]));
    let h = Harness::new([writer.clone()]).with_prompter(prompter.clone());
    let provider = scripted(vec![tool_call("c1", "writer", "{}"), text("ok, I will not")]);
    let run = RunId::from("run-deny");

    let outcome = h.start(provider.clone(), config(false, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "ok, I will not".into() });
    assert_eq!(writer.calls(), 0);
    assert_eq!(prompter.asked(), 1);
    let log = h.log(&run).await;
    assert_eq!(count(&log, "tool_call_started"), 0);
    let p = &permissions(&log)[0];
    assert_eq!((p.decision, p.rule.as_str(), p.actor.as_str()), (Decision::Deny, "user:deny", "user"));
    let (seen, is_error) = &tool_results(&requests(&provider)[1])["c1"];
    assert!(*is_error);
    assert!(seen.starts_with("Permission denied"), "{seen}");
    assert_sink_matches_log(&h.sink.events(), &log, 0);
}

#[tokio::test]
async fn without_a_terminal_an_ask_is_denied() {
    let writer = Arc::new(CountingTool::new("writer", false, false));
    let h = Harness::new([writer.clone()]).with_prompter(Arc::new(NoPrompter));
    let provider = scripted(vec![tool_call("c1", "writer", "{}"), text("stopped")]);
    let run = RunId::from("run-no-terminal");

    let outcome = h.start(provider.clone(), config(false, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "stopped".into() });
    assert_eq!(writer.calls(), 0);
    let log = h.log(&run).await;
    let p = &permissions(&log)[0];
    assert_eq!((p.decision, p.rule.as_str()), (Decision::Deny, "builtin:ask-without-terminal"));
    assert!(p.reason.contains("-y/--yes"), "{}", p.reason);
    let (seen, is_error) = &tool_results(&requests(&provider)[1])["c1"];
    assert!(*is_error && seen.starts_with("Permission denied"), "{seen}");
}

#[tokio::test]
async fn a_permission_decided_before_a_crash_is_reused_on_resume() {
    let writer = Arc::new(CountingTool::new("writer", false, false));
    let prompter = Arc::new(ScriptedPrompter::new([PromptAnswer::Deny]));
    let h = Harness::new([writer.clone()]).with_prompter(prompter.clone());
    let run = RunId::from("run-permission-reuse");
    let mut log = run_started(&run, false, &["writer"]);
    log.extend(model_turn_with_tool(&run, "m1", 1, "c1", "writer", json!({"k": "v"})));
    log.push(permission(&run, "c1", "writer", "user:allow-once", "user"));
    h.append(log).await;
    let before = h.log(&run).await.last().unwrap().seq;
    let provider = scripted(vec![text("done")]);

    let outcome = h.resume(provider, config(false, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "done".into() });
    assert_eq!(prompter.asked(), 0, "the logged decision is reused");
    assert_eq!(writer.calls(), 1);
    let log = h.log(&run).await;
    let new: Vec<&str> = log.iter().filter(|e| e.seq > before).map(Event::kind).collect();
    assert_eq!(
        new,
        [
            "run_resumed",
            "tool_call_started",
            "tool_call_completed",
            "model_call_started",
            "model_call_completed",
            "message",
            "run_completed"
        ]
    );
    assert_eq!(permissions(&log).len(), 1);
}

#[tokio::test]
async fn a_denial_logged_before_a_crash_is_reused_on_resume() {
    let writer = Arc::new(CountingTool::new("writer", false, false));
    let prompter = Arc::new(ScriptedPrompter::new([PromptAnswer::AllowOnce]));
    let h = Harness::new([writer.clone()]).with_prompter(prompter.clone());
    let run = RunId::from("run-denial-reuse");
    let mut log = run_started(&run, false, &["writer"]);
    log.extend(model_turn_with_tool(&run, "m1", 1, "c1", "writer", json!({})));
    log.push(ev(
        &run,
        PermissionDecided {
            call_id: Some("c1".into()),
            tool: "writer".into(),
            decision: Decision::Deny,
            scope: DecisionScope::Once,
            rule: "user:deny".into(),
            actor: "user".into(),
            reason: "denied by the user".into(),
            file: None,
            line: None,
        },
    ));
    h.append(log).await;
    let provider = scripted(vec![text("done")]);

    let outcome = h.resume(provider.clone(), config(false, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "done".into() });
    assert_eq!(prompter.asked(), 0);
    assert_eq!(writer.calls(), 0);
    let (seen, _) = &tool_results(&requests(&provider)[0])["c1"];
    assert!(seen.starts_with("Permission denied"), "{seen}");
}

// ---------------------------------------------------------------------------------------------
// Bad tool calls
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_tool_gets_an_error_listing_the_tools_and_the_run_goes_on() {
    let a = Arc::new(CountingTool::new("alpha", true, true));
    let b = Arc::new(CountingTool::new("beta", false, false));
    let h = Harness::new([a.clone(), b.clone()]);
    let provider = scripted(vec![tool_call("c1", "gamma", "{}"), text("sorry")]);
    let run = RunId::from("run-unknown-tool");

    let outcome = h.start(provider.clone(), config(false, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "sorry".into() });
    assert_eq!(a.calls() + b.calls(), 0);
    let log = h.log(&run).await;
    // Attempted, never run: its start and its error are paired in the log.
    assert_eq!(count(&log, "tool_call_started"), 1);
    let c = &completions(&log)[0];
    assert!(c.is_error);
    assert!(c.output.contains("unknown tool `gamma`"), "{}", c.output);
    assert!(c.output.contains("alpha, beta"), "{}", c.output);
    assert_eq!(tool_results(&requests(&provider)[1])["c1"], (c.output.clone(), true));
    assert_sink_matches_log(&h.sink.events(), &log, 0);
}

#[tokio::test]
async fn invalid_json_arguments_are_reported_and_the_tool_is_not_executed() {
    let reader = Arc::new(CountingTool::new("reader", true, true));
    let h = Harness::new([reader.clone()]);
    let provider = scripted(vec![tool_call("c1", "reader", "{oops"), text("retrying later")]);
    let run = RunId::from("run-bad-json");

    let outcome = h.start(provider.clone(), config(false, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "retrying later".into() });
    assert_eq!(reader.calls(), 0);
    let log = h.log(&run).await;
    assert_eq!(count(&log, "tool_call_started"), 1);
    let c = &completions(&log)[0];
    assert!(c.is_error);
    assert!(c.output.contains("not valid JSON"), "{}", c.output);
    assert!(c.output.contains("{oops"), "{}", c.output);
    assert_eq!(tool_results(&requests(&provider)[1])["c1"], (c.output.clone(), true));
}

// ---------------------------------------------------------------------------------------------
// Turn limit, provider failures
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn turn_limit_fails_the_run_and_a_resume_with_more_turns_continues() {
    let reader = Arc::new(CountingTool::new("reader", true, true));
    let h = Harness::new([reader.clone()]);
    let looping = Arc::new(ScriptedProvider::new(|_, n| tool_call(&format!("c{n}"), "reader", "{}")));
    let run = RunId::from("run-turns");

    let outcome = h.start(looping.clone(), config(false, 2), &run).await;

    match &outcome {
        RunOutcome::Failed { kind, error } => {
            assert_eq!(kind, "turn_limit");
            assert!(error.contains("--max-turns 4"), "{error}");
        }
        other => panic!("expected a turn-limit failure, got {other:?}"),
    }
    assert_eq!(looping.calls(), 2);
    assert_eq!(reader.calls(), 2);
    let log = h.log(&run).await;
    assert_eq!(log.last().unwrap().kind(), "run_failed");
    match &log.last().unwrap().data {
        EventData::RunFailed(f) => assert_eq!(f.kind, "turn_limit"),
        _ => unreachable!(),
    }
    assert_eq!(h.store.list_runs().await.unwrap()[0].status, "failed");
    let before = log.last().unwrap().seq;

    let provider = scripted(vec![tool_call("c-more", "reader", "{}"), text("finally")]);
    let outcome = h.resume(provider.clone(), config(false, 5), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "finally".into() });
    assert_eq!(reader.calls(), 3, "the two logged calls are not run again");
    assert_eq!(provider.calls(), 2);
    let log = h.log(&run).await;
    match &log.iter().find(|e| e.seq > before).unwrap().data {
        EventData::RunResumed(r) => assert_eq!(r.max_turns, 5),
        other => panic!("expected run_resumed, got {other:?}"),
    }
    match &log.last().unwrap().data {
        EventData::RunCompleted(r) => assert_eq!(r.turns, 4),
        other => panic!("expected run_completed, got {other:?}"),
    }
}

#[tokio::test]
async fn turn_limit_resume_with_the_same_limit_fails_again_without_a_model_call() {
    let reader = Arc::new(CountingTool::new("reader", true, true));
    let h = Harness::new([reader.clone()]);
    let looping = Arc::new(ScriptedProvider::new(|_, n| tool_call(&format!("c{n}"), "reader", "{}")));
    let run = RunId::from("run-turns-same");
    h.start(looping.clone(), config(false, 1), &run).await;
    let provider = scripted(vec![]);

    let outcome = h.resume(provider.clone(), config(false, 1), &run).await;

    assert!(matches!(outcome, RunOutcome::Failed { ref kind, .. } if kind == "turn_limit"), "{outcome:?}");
    assert_eq!(provider.calls(), 0);
    assert_eq!(reader.calls(), 1);
}

fn http_500() -> ProviderError {
    ProviderError::Http {
        provider: "scripted".into(),
        status: 500,
        message: "internal server error".into(),
        code: None,
        retry_after: None,
    }
}

#[tokio::test]
async fn retries_then_fallback_continue_the_same_run() {
    let h = Harness::new([]);
    let run = RunId::from("run-retry-fallback");
    // The primary fails twice (one retry allowed), then the fallback answers.
    let primary = scripted(vec![Scripted::Fail(http_500()), Scripted::Fail(http_500())]);
    let fallback = scripted(vec![text("from the fallback")]);
    let mut agent = h.agent(primary.clone(), config(false, 10));
    agent.resilience.retry = descartes_core::RetryPolicy {
        max_retries: 1,
        base_delay: std::time::Duration::from_millis(1),
        ..Default::default()
    };
    agent.resilience.fallbacks =
        vec![descartes_core::ChainEntry { provider: fallback.clone(), model: "fallback-model".into() }];
    let outcome = agent.start(run.clone(), "p".into(), goal_message("p", None)).await.unwrap();
    assert_eq!(outcome, RunOutcome::Completed { result: "from the fallback".into() });
    let log = h.log(&run).await;
    assert_eq!(
        kinds(&log),
        [
            "run_started",
            "message",
            "model_call_started",
            "model_call_failed",
            "model_call_started",
            "model_call_failed",
            "provider_switched",
            "model_call_started",
            "model_call_completed",
            "message",
            "run_completed"
        ]
    );
    match (&log[3].data, &log[5].data, &log[7].data) {
        (EventData::ModelCallFailed(a), EventData::ModelCallFailed(b), EventData::ModelCallStarted(c)) => {
            assert_eq!((a.attempt, b.attempt), (Some(1), Some(2)));
            assert!(a.retry_in_ms.is_some() && b.retry_in_ms.is_none());
            assert_eq!(c.model, "fallback-model");
        }
        _ => unreachable!(),
    }
    // The fold follows the switch: a resume would continue on the fallback.
    let state = RunState::fold(run.clone(), &log).unwrap();
    assert_eq!(state.model, "fallback-model");
}

#[tokio::test]
async fn provider_failure_fails_the_run_and_a_resume_completes_it() {
    let h = Harness::new([]);
    let failing = scripted(vec![Scripted::Fail(http_500())]);
    let run = RunId::from("run-provider-fail");

    let outcome = h.start(failing.clone(), config(false, 10), &run).await;

    match &outcome {
        RunOutcome::Failed { kind, error } => {
            assert_eq!(kind, "provider");
            assert!(error.contains("HTTP 500"), "{error}");
            assert!(error.contains("descartes resume run-provider-fail"), "{error}");
        }
        other => panic!("expected a provider failure, got {other:?}"),
    }
    let log = h.log(&run).await;
    assert_eq!(kinds(&log), ["run_started", "message", "model_call_started", "model_call_failed", "run_failed"]);
    match (&log[3].data, &log[4].data) {
        (EventData::ModelCallFailed(m), EventData::RunFailed(f)) => {
            assert!(m.retryable);
            assert!(f.retryable);
            assert_eq!(f.kind, "provider");
        }
        _ => unreachable!(),
    }
    assert_sink_matches_log(&h.sink.events(), &log, 0);
    let before = log.last().unwrap().seq;

    let provider = scripted(vec![text("recovered")]);
    let outcome = h.resume(provider.clone(), config(false, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "recovered".into() });
    assert_eq!(provider.calls(), 1);
    let log = h.log(&run).await;
    let new: Vec<&str> = log.iter().filter(|e| e.seq > before).map(Event::kind).collect();
    assert_eq!(new, ["run_resumed", "model_call_started", "model_call_completed", "message", "run_completed"]);
    assert_eq!(h.store.list_runs().await.unwrap()[0].status, "completed");
}

#[tokio::test]
async fn provider_failure_after_a_tool_call_does_not_rerun_it_on_resume() {
    let writer = Arc::new(CountingTool::new("writer", false, false));
    let h = Harness::new([writer.clone()]);
    let failing = scripted(vec![tool_call("c1", "writer", "{}"), Scripted::Fail(http_500())]);
    let run = RunId::from("run-fail-after-tool");

    let outcome = h.start(failing, config(true, 10), &run).await;
    assert!(matches!(outcome, RunOutcome::Failed { ref kind, .. } if kind == "provider"), "{outcome:?}");
    assert_eq!(writer.calls(), 1);

    let provider = scripted(vec![text("done")]);
    let outcome = h.resume(provider.clone(), config(true, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "done".into() });
    assert_eq!(writer.calls(), 1);
    assert_eq!(writer.recovers(), 0);
    assert!(tool_results(&requests(&provider)[0]).contains_key("c1"));
}

// ---------------------------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn cancelled_before_the_first_model_call() {
    let h = Harness::new([]);
    h.cancel.cancel();
    let provider = scripted(vec![]);
    let run = RunId::from("run-cancel-early");

    let outcome = h.start(provider.clone(), config(false, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Cancelled);
    assert_eq!(provider.calls(), 0);
    let log = h.log(&run).await;
    assert_eq!(kinds(&log), ["run_started", "message", "run_cancelled"]);
    assert_sink_matches_log(&h.sink.events(), &log, 0);
    assert_eq!(h.store.list_runs().await.unwrap()[0].status, "cancelled");
}

#[tokio::test]
async fn cancelled_while_a_tool_runs_then_resumed_without_rerunning_it() {
    let mut h = Harness::new([]);
    let writer = Arc::new(CountingTool::new("writer", false, false).cancelling(h.cancel.clone()));
    let other = Arc::new(CountingTool::new("other", true, true));
    h.tools.register(writer.clone());
    h.tools.register(other.clone());
    // Two tool calls in one answer: the second must not run once the first cancelled the run.
    let provider = Arc::new(FnProvider::new(|_| {
        vec![
            StreamEvent::ToolCallStart { index: 0, id: "c1".into(), name: "writer".into() },
            StreamEvent::ToolCallDelta { index: 0, json: "{}".into() },
            StreamEvent::ToolCallStart { index: 1, id: "c2".into(), name: "other".into() },
            StreamEvent::ToolCallDelta { index: 1, json: "{}".into() },
            StreamEvent::Stop { reason: Some("tool_calls".into()) },
        ]
    }));
    let run = RunId::from("run-cancel-tool");

    let outcome = h.start(provider.clone(), config(true, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Cancelled);
    assert_eq!(writer.calls(), 1);
    assert_eq!(other.calls(), 0);
    let log = h.log(&run).await;
    assert_eq!(
        kinds(&log),
        [
            "run_started",
            "message",
            "model_call_started",
            "model_call_completed",
            "message",
            // Decisions come first, for every call of the answer; then the calls run.
            "permission_decided",
            "permission_decided",
            "tool_call_started",
            "tool_call_completed",
            "run_cancelled",
        ]
    );
    assert_sink_matches_log(&h.sink.events(), &log, 0);
    let before = log.last().unwrap().seq;

    // Resume with a fresh token: the writer's result is in the log, only `other` runs.
    h.cancel = CancellationToken::new();
    h.new_sink();
    let after = scripted(vec![text("done")]);
    let outcome = h.resume(after.clone(), config(true, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "done".into() });
    assert_eq!(writer.calls(), 1);
    assert_eq!(other.calls(), 1);
    let results = tool_results(&requests(&after)[0]);
    assert!(results.contains_key("c1") && results.contains_key("c2"), "{results:?}");
    assert_sink_matches_log(&h.sink.events(), &h.log(&run).await, before);
}

#[tokio::test]
async fn cancelled_while_the_model_is_streaming() {
    let h = Harness::new([]);
    let provider = Arc::new(HangingProvider::default());
    let run = RunId::from("run-cancel-model");
    let token = h.cancel.clone();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        token.cancel();
    });

    let outcome = tokio::time::timeout(Duration::from_secs(5), h.start(provider.clone(), config(false, 10), &run))
        .await
        .expect("the run did not stop on cancellation");
    canceller.await.unwrap();

    assert_eq!(outcome, RunOutcome::Cancelled);
    assert_eq!(provider.calls.load(Ordering::SeqCst), 1);
    let log = h.log(&run).await;
    assert_eq!(kinds(&log), ["run_started", "message", "model_call_started", "run_cancelled"]);
    assert_sink_matches_log(&h.sink.events(), &log, 0);

    // On resume the interrupted model call is made again.
    let folded = RunState::fold(run.clone(), &log).unwrap();
    assert!(folded.open_model_call.is_some());
    let fresh = Harness { cancel: CancellationToken::new(), ..h };
    let provider = scripted(vec![text("back")]);
    let outcome = fresh.resume(provider.clone(), config(false, 10), &run).await;
    assert_eq!(outcome, RunOutcome::Completed { result: "back".into() });
    assert_eq!(provider.calls(), 1);
}

/// A prompter at which the user presses Ctrl-C: it cancels the run and never answers.
struct CtrlCPrompter {
    token: CancellationToken,
    asked: AtomicUsize,
}

#[async_trait]
impl Prompter for CtrlCPrompter {
    async fn ask(&self, _request: &PermissionRequest) -> PromptAnswer {
        self.asked.fetch_add(1, Ordering::SeqCst);
        self.token.cancel();
        std::future::pending().await
    }
}

#[tokio::test]
async fn cancelled_at_a_permission_prompt_is_recorded_and_resumable() {
    let writer = Arc::new(CountingTool::new("writer", false, false));
    let h = Harness::new([writer.clone()]);
    let prompter = Arc::new(CtrlCPrompter { token: h.cancel.clone(), asked: AtomicUsize::new(0) });
    let mut h = h.with_prompter(prompter.clone());
    let provider = scripted(vec![tool_call("c1", "writer", "{}")]);
    let run = RunId::from("run-cancel-prompt");

    let outcome = tokio::time::timeout(Duration::from_secs(5), h.start(provider, config(false, 10), &run))
        .await
        .expect("the run did not stop on cancellation");

    assert_eq!(outcome, RunOutcome::Cancelled);
    assert_eq!(prompter.asked.load(Ordering::SeqCst), 1);
    assert_eq!(writer.calls(), 0);
    let log = h.log(&run).await;
    assert_eq!(
        kinds(&log),
        ["run_started", "message", "model_call_started", "model_call_completed", "message", "run_cancelled"]
    );
    assert_sink_matches_log(&h.sink.events(), &log, 0);
    assert_eq!(h.store.list_runs().await.unwrap()[0].status, "cancelled");

    // Resumed, the user is asked again (nothing was decided) and the call runs once.
    h.cancel = CancellationToken::new();
    let answers = Arc::new(ScriptedPrompter::new([PromptAnswer::AllowOnce]));
    h.prompter = answers.clone();
    let outcome = h.resume(scripted(vec![text("done")]), config(false, 10), &run).await;
    assert_eq!(outcome, RunOutcome::Completed { result: "done".into() });
    assert_eq!(answers.asked(), 1);
    assert_eq!(writer.calls(), 1);
}

// ---------------------------------------------------------------------------------------------
// The sink
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sink_gets_every_event_once_in_seq_order() {
    let idem = Arc::new(CountingTool::new("idem", true, true));
    let effect = Arc::new(CountingTool::new("effect", false, false));
    let h = Harness::new([idem.clone(), effect.clone()]);
    let provider = scripted(vec![
        tool_call("c1", "idem", "{}"),
        tool_call("c2", "effect", "{}"),
        tool_call("c3", "idem", "{}"),
        tool_call("c4", "nope", "{}"),
        tool_call("c5", "idem", "{bad"),
        tool_call("c6", "effect", "{}"),
        text("done"),
    ]);
    let run = RunId::from("run-sink");
    // Another run's events interleave in the same store: they must not reach this run's sink.
    h.append(run_started(&RunId::from("other-run"), false, &[])).await;

    let outcome = h.start(provider, config(true, 20), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "done".into() });
    assert_eq!((idem.calls(), effect.calls()), (2, 2));
    let log = h.log(&run).await;
    assert_eq!(count(&log, "tool_call_completed"), 6);
    assert_eq!(count(&log, "model_call_started"), 7);
    assert_eq!(count(&log, "model_call_completed"), 7);
    assert_sink_matches_log(&h.sink.events(), &log, 0);
    let all = h.store.read_all(0, 1000).await.unwrap();
    assert_eq!(all.len(), log.len() + 2);
    // Each call's intent precedes its result, and each result precedes the next model call.
    let pos = |kind: &str, id: &str| {
        log.iter().position(|e| match &e.data {
            EventData::ToolCallStarted(s) => kind == "start" && s.call_id == id,
            EventData::ToolCallCompleted(c) => kind == "done" && c.call_id == id,
            _ => false,
        })
    };
    for id in ["c1", "c2", "c3", "c6"] {
        assert!(pos("start", id).unwrap() < pos("done", id).unwrap(), "{id}");
    }
}

// ---------------------------------------------------------------------------------------------
// Crash at every point of a run
// ---------------------------------------------------------------------------------------------

/// The answer for the request: the number of assistant messages so far decides the turn.
fn multi_tool_script(request: &ModelRequest) -> Vec<StreamEvent> {
    let turn = request.messages.iter().filter(|m| m.role == Role::Assistant).count();
    let call = |index: usize, id: &str, name: &str| {
        [
            StreamEvent::ToolCallStart { index, id: id.into(), name: name.into() },
            StreamEvent::ToolCallDelta { index, json: format!(r#"{{"id":"{id}"}}"#) },
        ]
    };
    let mut events = Vec::new();
    match turn {
        0 => {
            events.push(StreamEvent::TextDelta("two things first".into()));
            events.extend(call(0, "c1", "reader"));
            events.extend(call(1, "c2", "writer"));
        }
        1 => events.extend(call(0, "c3", "writer")),
        _ => events.push(StreamEvent::TextDelta("done".into())),
    }
    events.push(StreamEvent::Usage(Usage { input_tokens: 1, output_tokens: 1, ..Default::default() }));
    events.push(StreamEvent::Stop { reason: Some("stop".into()) });
    events
}

/// Runs a reference run, then for every proper prefix of its log (a crash after that event),
/// resumes from the prefix in a fresh store and checks the exactly-once rules: a call with a
/// logged result is never executed again, an interrupted idempotent call runs once more, an
/// interrupted non-idempotent one (recovery unknown) is not run, a call never started runs once;
/// the run completes with one result per call and one `run_completed`.
#[tokio::test]
async fn crash_after_any_event_then_resume_keeps_exactly_once() {
    let reference = {
        let reader = Arc::new(CountingTool::new("reader", true, true));
        let writer = Arc::new(CountingTool::new("writer", false, false));
        let h = Harness::new([reader.clone(), writer.clone()]);
        let run = RunId::from("reference");
        let outcome = h.start(Arc::new(FnProvider::new(multi_tool_script)), config(true, 10), &run).await;
        assert_eq!(outcome, RunOutcome::Completed { result: "done".into() });
        assert_eq!((reader.calls(), writer.calls()), (1, 2));
        let log = h.log(&run).await;
        assert_sink_matches_log(&h.sink.events(), &log, 0);
        log
    };
    assert_eq!(
        kinds(&reference),
        [
            "run_started",
            "message",
            "model_call_started",
            "model_call_completed",
            "message",
            "permission_decided",
            "permission_decided",
            "tool_call_started",
            "tool_call_completed",
            "tool_call_started",
            "tool_call_completed",
            "model_call_started",
            "model_call_completed",
            "message",
            "permission_decided",
            "tool_call_started",
            "tool_call_completed",
            "model_call_started",
            "model_call_completed",
            "message",
            "run_completed",
        ]
    );
    let idempotent: HashMap<&str, bool> = [("c1", true), ("c2", false), ("c3", false)].into();

    // From 2 (run_started and the goal are written together) to just before run_completed.
    for cut in 2..reference.len() {
        let prefix = &reference[..cut];
        let reader = Arc::new(CountingTool::new("reader", true, true));
        let writer = Arc::new(CountingTool::new("writer", false, false));
        let h = Harness::new([reader.clone(), writer.clone()]);
        let run = RunId::from("reference");
        h.append(
            prefix
                .iter()
                .map(|e| NewEvent {
                    id: e.id.clone(),
                    run_id: e.run_id.clone(),
                    at: e.at,
                    key: None,
                    data: e.data.clone(),
                })
                .collect(),
        )
        .await;
        let provider = Arc::new(FnProvider::new(multi_tool_script));

        let outcome = h.resume(provider.clone(), config(true, 10), &run).await;

        let at = format!("crash after event {cut} ({})", prefix.last().unwrap().kind());
        assert_eq!(outcome, RunOutcome::Completed { result: "done".into() }, "{at}");
        let started =
            |id: &str| prefix.iter().any(|e| matches!(&e.data, EventData::ToolCallStarted(s) if s.call_id == id));
        let completed =
            |id: &str| prefix.iter().any(|e| matches!(&e.data, EventData::ToolCallCompleted(c) if c.call_id == id));
        let mut expected = HashMap::from([("reader", 0), ("writer", 0)]);
        for (id, tool) in [("c1", "reader"), ("c2", "writer"), ("c3", "writer")] {
            let runs = match (completed(id), started(id), idempotent[id]) {
                (true, _, _) => 0,
                (false, true, true) => 1,
                (false, true, false) => 0,
                (false, false, _) => 1,
            };
            *expected.get_mut(tool).unwrap() += runs;
        }
        assert_eq!((reader.calls(), writer.calls()), (expected["reader"], expected["writer"]), "{at}");

        let log = h.log(&run).await;
        assert_eq!(count(&log, "run_completed"), 1, "{at}");
        let done = completions(&log);
        for id in ["c1", "c2", "c3"] {
            let n = done.iter().filter(|c| c.call_id == id).count();
            assert_eq!(n, 1, "{at}: {id} has {n} results");
        }
        for c in &done {
            if !completed(&c.call_id) && started(&c.call_id) && !idempotent[c.call_id.as_str()] {
                assert!(c.is_error && c.recovered, "{at}: {c:?}");
                assert!(c.output.contains("not known whether it took effect"), "{at}: {}", c.output);
            }
        }
        // No model call is repeated once its answer is logged.
        let answered = prefix
            .iter()
            .filter(|e| matches!(&e.data, EventData::MessageAdded(m) if m.role() == Role::Assistant))
            .count();
        let calls = provider.calls.load(Ordering::SeqCst);
        assert_eq!(calls, 3 - answered, "{at}");
        assert_eq!(count(&log, "model_call_completed"), count(prefix, "model_call_completed") + calls, "{at}");
        assert_eq!(count(&log, "message"), 4, "{at}: the goal and three answers, each once");
        assert_sink_matches_log(&h.sink.events(), &log, prefix.last().unwrap().seq);
    }
}

// ---------------------------------------------------------------------------------------------
// Permission rules and parallel execution
// ---------------------------------------------------------------------------------------------

fn policy(rules: &[(descartes_core::policy::Action, &str)]) -> descartes_core::policy::Policy {
    use descartes_core::policy::{Rule, RuleSpec, Source};
    descartes_core::policy::Policy::from_rules(
        rules.iter().map(|(a, t)| Rule::new(*a, Source::Project, RuleSpec::parse(t).unwrap()).unwrap()).collect(),
    )
}

/// A model asking for the given calls (id, tool, arguments) in its first answer, then done.
fn calls_then_done(calls: Vec<(&'static str, &'static str, &'static str)>) -> Arc<FnProvider> {
    Arc::new(FnProvider::new(move |request| {
        if request.messages.iter().any(|m| m.role == Role::Assistant) {
            return vec![StreamEvent::TextDelta("done".into()), StreamEvent::Stop { reason: Some("stop".into()) }];
        }
        let mut events = Vec::new();
        for (index, (id, name, args)) in calls.iter().enumerate() {
            events.push(StreamEvent::ToolCallStart { index, id: (*id).into(), name: (*name).into() });
            events.push(StreamEvent::ToolCallDelta { index, json: (*args).into() });
        }
        events.push(StreamEvent::Stop { reason: Some("tool_calls".into()) });
        events
    }))
}

#[tokio::test]
async fn rules_allow_deny_and_ask_and_each_decision_names_its_rule() {
    use descartes_core::policy::Action::*;
    let shell = Arc::new(CountingTool::new("shell", false, false));
    let reader = Arc::new(CountingTool::new("read_file", true, true));
    let prompter = Arc::new(ScriptedPrompter::new([PromptAnswer::AllowOnce]));
    let mut h = Harness::new([shell.clone(), reader.clone()]).with_prompter(prompter.clone());
    h.policy = policy(&[
        (Allow, "shell(echo *)"),
        (Deny, "shell(rm *)"),
        (Ask, "shell(git push*)"),
        (Deny, "read_file(**/.env)"),
    ]);
    let provider = calls_then_done(vec![
        ("c1", "shell", r#"{"command":"echo hi"}"#),
        ("c2", "shell", r#"{"command":"rm -rf x"}"#),
        ("c3", "shell", r#"{"command":"git push origin"}"#),
        ("c4", "read_file", r#"{"path":"a/.env"}"#),
        ("c5", "read_file", r#"{"path":"a/b.txt"}"#),
        ("c6", "shell", r#"{"command":"ls"}"#),
    ]);
    let run = RunId::from("run-rules");

    let outcome = h.start(provider, config(false, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "done".into() });
    let got: Vec<(String, Decision, String, String)> = permissions(&h.log(&run).await)
        .into_iter()
        .map(|p| (p.call_id.unwrap(), p.decision, p.rule, p.actor))
        .collect();
    let want = [
        ("c1", Decision::Allow, "project:allow shell \"echo *\"", "policy"),
        ("c2", Decision::Deny, "project:deny shell \"rm *\"", "policy"),
        ("c3", Decision::Allow, "user:allow-once", "user"),
        ("c4", Decision::Deny, "project:deny read_file \"**/.env\"", "policy"),
        ("c5", Decision::Allow, "builtin:read-only", "policy"),
        // The scripted prompter has no more answers: nobody to ask.
        ("c6", Decision::Deny, "builtin:ask-without-terminal", "policy"),
    ];
    let want: Vec<(String, Decision, String, String)> =
        want.iter().map(|(c, d, r, a)| ((*c).into(), *d, (*r).into(), (*a).into())).collect();
    assert_eq!(got, want);
    // The configured ask rule was what asked.
    assert_eq!(prompter.asked(), 2);
    let reason = &permissions(&h.log(&run).await)[2].reason;
    assert!(reason.contains("project:ask shell \"git push*\""), "{reason}");
    assert_eq!((shell.calls(), reader.calls()), (2, 1), "echo and git push ran, rm and ls did not");
}

#[tokio::test]
async fn yes_answers_asks_but_never_overrides_a_deny() {
    use descartes_core::policy::Action::*;
    let shell = Arc::new(CountingTool::new("shell", false, false));
    let mut h = Harness::new([shell.clone()]);
    h.policy = policy(&[(Deny, "shell(rm *)"), (Ask, "shell")]);
    let provider = calls_then_done(vec![
        ("c1", "shell", r#"{"command":"rm x"}"#),
        ("c2", "shell", r#"{"command":"make"}"#),
        ("c3", "shell", r#"{"command":"ls; rm x"}"#),
    ]);
    let run = RunId::from("run-yes");

    h.start(provider, config(true, 10), &run).await;

    let p = permissions(&h.log(&run).await);
    let got: Vec<(Decision, &str)> = p.iter().map(|p| (p.decision, p.rule.as_str())).collect();
    assert_eq!(
        got,
        [
            (Decision::Deny, "project:deny shell \"rm *\""),
            (Decision::Allow, "flag:--yes"),
            (Decision::Deny, "project:deny shell \"rm *\""),
        ]
    );
    assert!(p[1].reason.contains("project:ask shell"), "{}", p[1].reason);
    assert_eq!(shell.calls(), 1);
}

/// A read-only tool that takes a while.
struct SlowReader {
    name: String,
    delay: Duration,
    running: Arc<AtomicUsize>,
    most_at_once: Arc<AtomicUsize>,
}

#[async_trait]
impl Tool for SlowReader {
    fn spec(&self) -> ToolSpec {
        ToolSpec { name: self.name.clone(), description: "slow".into(), input_schema: json!({"type": "object"}) }
    }
    fn read_only(&self) -> bool {
        true
    }
    fn idempotent(&self) -> bool {
        true
    }
    async fn call(&self, input: Value, _ctx: &ToolContext) -> ToolOutput {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        // The later call finishes first: results are still recorded in call order.
        let extra = if input["id"] == "c1" { self.delay / 2 } else { Duration::ZERO };
        tokio::time::sleep(self.delay + extra).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        ToolOutput::ok(format!("{} read {input}", self.name))
    }
}

#[tokio::test]
async fn independent_read_only_calls_run_concurrently_and_are_logged_in_call_order() {
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let delay = Duration::from_millis(400);
    let slow = |name: &str| {
        Arc::new(SlowReader { name: name.into(), delay, running: running.clone(), most_at_once: most.clone() })
    };
    let writer = Arc::new(CountingTool::new("writer", false, false));
    let mut h = Harness::new([writer.clone()]);
    h.tools.register(slow("slow_a"));
    h.tools.register(slow("slow_b"));
    let provider = calls_then_done(vec![
        ("c1", "slow_a", r#"{"id":"c1"}"#),
        ("c2", "slow_b", r#"{"id":"c2"}"#),
        ("c3", "writer", r#"{"id":"c3"}"#),
    ]);
    let run = RunId::from("run-parallel");

    let t = std::time::Instant::now();
    let outcome = h.start(provider.clone(), config(true, 10), &run).await;
    let took = t.elapsed();

    assert_eq!(outcome, RunOutcome::Completed { result: "done".into() });
    assert_eq!(most.load(Ordering::SeqCst), 2, "the two read-only calls overlapped");
    // One slow call takes 600 ms (c1) and the other 400 ms; in sequence they would take 1 s.
    assert!(took < Duration::from_millis(900), "took {took:?}");
    assert!(took >= Duration::from_millis(600), "took {took:?}");
    let log = h.log(&run).await;
    let order: Vec<String> = log
        .iter()
        .filter_map(|e| match &e.data {
            EventData::PermissionDecided(p) => Some(format!("decided {}", p.call_id.as_deref().unwrap_or(""))),
            EventData::ToolCallStarted(s) => Some(format!("started {}", s.call_id)),
            EventData::ToolCallCompleted(c) => Some(format!("completed {}", c.call_id)),
            _ => None,
        })
        .collect();
    assert_eq!(
        order,
        [
            "decided c1",
            "decided c2",
            "decided c3",
            "started c1",
            "started c2",
            "completed c1",
            "completed c2",
            "started c3",
            "completed c3",
        ]
    );
    let durations: Vec<u64> = completions(&log).iter().map(|c| c.duration_ms).collect();
    assert!(durations[0] >= 600 && durations[1] >= 400 && durations[1] < 600, "{durations:?}");
    assert_sink_matches_log(&h.sink.events(), &log, 0);
    assert_eq!(writer.calls(), 1);
}

#[tokio::test]
async fn a_crash_during_parallel_calls_reruns_only_the_unfinished_ones() {
    let reader = Arc::new(CountingTool::new("reader", true, true));
    let h = Harness::new([reader.clone()]);
    let run = RunId::from("run-parallel-crash");
    // The model asked for two reads; both intents are logged, one result is.
    let mut log = run_started(&run, true, &["reader"]);
    log.push(model_call_started(&run, "m1", 1));
    log.push(ev(
        &run,
        ModelCallCompleted {
            call_id: "m1".into(),
            usage: Usage::default(),
            cost_usd: None,
            stop_reason: None,
            duration_ms: 1,
        },
    ));
    let uses = vec![
        ContentPart::ToolUse { id: "c1".into(), name: "reader".into(), input: json!({"n": 1}) },
        ContentPart::ToolUse { id: "c2".into(), name: "reader".into(), input: json!({"n": 2}) },
    ];
    log.push(ev(&run, MessageAdded { message: Message::new(Role::Assistant, uses), model_call_id: Some("m1".into()) }));
    for id in ["c1", "c2"] {
        log.push(permission(&run, id, "reader", "builtin:read-only", "policy"));
    }
    for (id, n) in [("c1", 1), ("c2", 2)] {
        log.push(tool_started(&run, id, "reader", json!({ "n": n }), true));
    }
    log.push(ev(
        &run,
        ToolCallCompleted {
            call_id: "c2".into(),
            tool: "reader".into(),
            output: "two".into(),
            is_error: false,
            duration_ms: 1,
            details: None,
            recovered: false,
        },
    ));
    h.append(log).await;

    let after = scripted(vec![text("done")]);
    let outcome = h.resume(after.clone(), config(false, 10), &run).await;

    assert_eq!(outcome, RunOutcome::Completed { result: "done".into() });
    assert_eq!(reader.calls(), 1, "only c1 runs again");
    let log = h.log(&run).await;
    assert_eq!(count(&log, "tool_call_started"), 2, "no new intent for a call re-run on resume");
    assert_eq!(count(&log, "permission_decided"), 2, "decisions are not made again");
    let results = tool_results(&requests(&after)[0]);
    assert_eq!(results["c2"].0, "two");
    assert!(results["c1"].0.contains("reader ran"), "{results:?}");
}
