//! The real coding-agent CLIs (installed from npm by `.ci/install-clis` into
//! `<repo>/target/npm`, or found in `DESCARTES_TEST_CLI_DIR`) driven by Descartes against fake
//! model servers on 127.0.0.1: no network, no API keys.
//!
//! When a CLI cannot be had (no npm, no registry), each test prints a loud skip and returns,
//! unless `DESCARTES_TEST_REQUIRE_CLIS=1`, which makes it fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use descartes_agent_cli::{ClaudeCode, CliOptions, Codex, GeminiCli};
use descartes_core::agent::{AgentConfig, NullSink};
use descartes_core::permission::NoPrompter;
use descartes_core::policy::{PermissionRules, Policy, RuleSpec, Source};
use descartes_core::{AgentCli, EventStore, ExternalAgent, ExternalOutcome, PermissionRequest, PromptAnswer, Prompter};
use descartes_protocol::{Decision, Event, EventData, Message, RunId};
use descartes_store::MemoryEventStore;
use descartes_test_support::{Chunk, FakeServer, RecordedRequest, Reply, anthropic};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

// ---- Finding (or installing) the CLIs ----

use descartes_test_support::agent_clis::cli;

// ---- Driver plumbing ----

struct Allow;

#[async_trait]
impl Prompter for Allow {
    async fn ask(&self, _request: &PermissionRequest) -> PromptAnswer {
        PromptAnswer::AllowOnce
    }
}

fn agent(
    store: Arc<MemoryEventStore>,
    backend: Arc<dyn AgentCli>,
    prompter: Arc<dyn Prompter>,
    cwd: &Path,
    model: &str,
    yes: bool,
) -> ExternalAgent {
    ExternalAgent {
        store,
        backend,
        prompter,
        policy: Default::default(),
        gate: None,
        sink: Arc::new(NullSink),
        cancel: CancellationToken::new(),
        config: AgentConfig {
            provider: String::new(),
            model: model.into(),
            max_turns: 0,
            auto_approve: yes,
            system_prompt: None,
            max_tokens: None,
            cwd: cwd.to_path_buf(),
            spool_root: std::env::temp_dir(),
            budget: Default::default(),
        },
    }
}

async fn events(store: &MemoryEventStore, run: &RunId) -> Vec<Event> {
    store.read_run(run, 0).await.unwrap()
}

fn kinds(events: &[Event]) -> Vec<&str> {
    events.iter().map(Event::kind).collect()
}

fn find<T>(events: &[Event], f: impl Fn(&EventData) -> Option<T>) -> Vec<T> {
    events.iter().filter_map(|e| f(&e.data)).collect()
}

/// The token every real CLI run has in its working directory, hidden from the CLI as the
/// runtime hides Descartes' tokens.
const SECRET: &str = "descartes-test-secret-4f1c";

/// The CLI's options, started through the sandbox helper with `work/secret.token` hidden.
fn options(program: PathBuf, env: &[(&str, String)], work: &Path) -> CliOptions {
    use descartes_tools::{Protected, Sandbox, SandboxHelper, SandboxPolicy};
    let token = work.join("secret.token");
    std::fs::write(&token, SECRET).unwrap();
    let helper = SandboxHelper::locate().expect(
        "the sandbox helper is missing: `cargo test --workspace` builds it, or `cargo build -p descartes-tools`",
    );
    let hidden = Protected { hidden: vec![token], ..Default::default() };
    let wrapper = Sandbox::with_helper(SandboxPolicy::default(), helper).protecting(hidden).hiding_prefix();
    assert!(wrapper.is_some());
    let mut o =
        CliOptions { program: Some(program), kill_grace: Duration::from_secs(3), wrapper, ..Default::default() };
    for (k, v) in env {
        o = o.with_env(*k, v.clone());
    }
    o
}

/// Asserts the recorded shape of a run in which the CLI ran (or was refused) one shell command.
fn assert_tool_events(evs: &[Event], backend: &str, executed: bool) {
    let k = kinds(evs);
    assert_eq!(k[0], "run_started");
    assert!(k.contains(&"backend_session"), "{k:?}");
    let started = find(evs, |d| match d {
        EventData::ToolCallStarted(t) => Some(t.clone()),
        _ => None,
    });
    let completed = find(evs, |d| match d {
        EventData::ToolCallCompleted(t) => Some(t.clone()),
        _ => None,
    });
    assert_eq!(completed.len(), 1, "{k:?}");
    if executed {
        assert_eq!(started.len(), 1, "{k:?}");
        assert_eq!(started[0].executed_by.as_deref(), Some(backend));
        assert_eq!(started[0].call_id, completed[0].call_id);
        let at = |kind: &str| k.iter().position(|x| *x == kind).unwrap();
        assert!(at("tool_call_started") < at("tool_call_completed"));
    }
    assert!(k.contains(&"model_call_completed"));
    assert_eq!(k.last(), Some(&"run_completed"), "{k:?}");
    assert_decided(evs);
}

/// No tool call executed without a decision before it.
fn assert_decided(evs: &[Event]) {
    let json: Vec<Value> = evs.iter().map(|e| json!({"type": e.kind(), "data": e.data})).collect();
    descartes_test_support::agent_clis::assert_every_call_decided(&json);
}

/// Permission rules as a project's config writes them.
fn rules(allow: &[&str], deny: &[&str]) -> Policy {
    let specs = |l: &[&str]| l.iter().map(|r| RuleSpec::parse(r).unwrap()).collect();
    Policy::new(&[(Source::Project, PermissionRules { allow: specs(allow), ask: vec![], deny: specs(deny) })]).unwrap()
}

fn decisions(evs: &[Event]) -> Vec<descartes_protocol::PermissionDecided> {
    find(evs, |d| match d {
        EventData::PermissionDecided(p) => Some(p.clone()),
        _ => None,
    })
}

// ---- Claude Code ----

fn claude_responder(req: &RecordedRequest) -> Reply {
    if req.tool_names().is_empty() {
        // Side requests (titles, summaries): a short text.
        return Reply::Stream(anthropic::text(&["ok"]));
    }
    if req.has_tool_result() {
        return Reply::Stream(anthropic::text(&["All ", "done."]));
    }
    if req.last_user_text().is_some_and(|t| t.contains("carry on with the task")) {
        return Reply::Stream(anthropic::text(&["Resumed."]));
    }
    Reply::Stream(anthropic::tool_uses(
        Some("Creating the marker."),
        &[("toolu_01", "Bash", &[r#"{"command": "touch marker.txt", "#, r#""description": "Create marker"}"#])],
    ))
}

struct ClaudeFixture {
    server: FakeServer,
    home: tempfile::TempDir,
    work: tempfile::TempDir,
    program: PathBuf,
}

impl ClaudeFixture {
    fn new() -> Option<Self> {
        let program = cli("claude")?;
        Some(Self {
            server: FakeServer::start(claude_responder),
            home: tempfile::tempdir().unwrap(),
            work: tempfile::tempdir().unwrap(),
            program,
        })
    }

    fn backend(&self) -> Arc<dyn AgentCli> {
        let env = [
            ("HOME", self.home.path().display().to_string()),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".to_owned()),
            ("ANTHROPIC_BASE_URL", self.server.url()),
            ("ANTHROPIC_API_KEY", "sk-ant-test".to_owned()),
            ("DISABLE_AUTOUPDATER", "1".to_owned()),
        ];
        Arc::new(ClaudeCode::new(options(self.program.clone(), &env, self.work.path())))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_runs_bash_when_descartes_approves_and_resumes_its_session() {
    let Some(fx) = ClaudeFixture::new() else { return };
    let store = Arc::new(MemoryEventStore::new());
    let a = agent(store.clone(), fx.backend(), Arc::new(Allow), fx.work.path(), "claude-sonnet-4-5", false);
    let run = RunId::from("real-claude-allow");
    let outcome = a.start(run.clone(), "make a marker".into(), Message::user_text("make a marker")).await.unwrap();
    assert_eq!(outcome, ExternalOutcome::Completed { result: "All done.".into() });
    assert!(fx.work.path().join("marker.txt").exists(), "the approved command really ran");

    let evs = events(&store, &run).await;
    assert_tool_events(&evs, "claude-code", true);
    let decisions = find(&evs, |d| match d {
        EventData::PermissionDecided(p) => Some(p.clone()),
        _ => None,
    });
    assert_eq!(decisions.len(), 1);
    assert_eq!((decisions[0].decision, decisions[0].tool.as_str()), (Decision::Allow, "Bash"));
    assert_eq!(decisions[0].call_id.as_deref(), Some("toolu_01"));
    let costs: f64 = find(&evs, |d| match d {
        EventData::ModelCallCompleted(c) => c.cost_usd,
        _ => None,
    })
    .iter()
    .sum();
    assert!(costs > 0.0, "Claude Code's total_cost_usd is recorded");
    let messages = find(&evs, |d| match d {
        EventData::MessageAdded(m) => Some(m.message.text()),
        _ => None,
    });
    assert!(messages.iter().any(|m| m.contains("Creating the marker.")), "{messages:?}");

    // Resume: the CLI continues the recorded session (its history goes to the model again).
    let st = store.replay_run(&run).await.unwrap();
    let session = st.backend_session.clone().unwrap();
    assert_eq!(session.backend, "claude-code");
    let before = fx.server.request_count();
    let outcome = a.resume(st, "completed").await.unwrap();
    assert_eq!(outcome, ExternalOutcome::Completed { result: "Resumed.".into() });
    let resumed: Vec<RecordedRequest> =
        fx.server.requests().into_iter().skip(before).filter(|r| !r.tool_names().is_empty()).collect();
    assert!(!resumed.is_empty());
    assert!(
        resumed[0].raw_body.contains("touch marker.txt") && resumed[0].assistant_turns() >= 2,
        "the resumed call carries the earlier conversation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_bash_denied_by_descartes_does_not_run() {
    let Some(fx) = ClaudeFixture::new() else { return };
    let store = Arc::new(MemoryEventStore::new());
    let a = agent(store.clone(), fx.backend(), Arc::new(NoPrompter), fx.work.path(), "claude-sonnet-4-5", false);
    let run = RunId::from("real-claude-deny");
    let outcome = a.start(run.clone(), "make a marker".into(), Message::user_text("make a marker")).await.unwrap();
    assert_eq!(outcome, ExternalOutcome::Completed { result: "All done.".into() });
    assert!(!fx.work.path().join("marker.txt").exists(), "the denied command did not run");

    let evs = events(&store, &run).await;
    assert_tool_events(&evs, "claude-code", false);
    let decision = find(&evs, |d| match d {
        EventData::PermissionDecided(p) => Some(p.clone()),
        _ => None,
    })
    .remove(0);
    assert_eq!(decision.decision, Decision::Deny);
    assert_eq!(decision.rule, "builtin:ask-without-terminal");
    let completed = find(&evs, |d| match d {
        EventData::ToolCallCompleted(t) => Some(t.clone()),
        _ => None,
    })
    .remove(0);
    assert!(completed.is_error);
    // The model was told why.
    let results: Vec<String> = fx.server.requests().iter().flat_map(|r| r.tool_results()).map(|(_, c)| c).collect();
    assert!(results.iter().any(|c| c.contains("-y")), "{results:?}");
}

// ---- A minimal local fake for the Responses and Gemini APIs ----

type Handler = Arc<dyn Fn(&str, &Value) -> String + Send + Sync>;
type Requests = Arc<Mutex<Vec<(String, Value)>>>;

struct LocalFake {
    addr: std::net::SocketAddr,
    requests: Requests,
    task: tokio::task::JoinHandle<()>,
}

impl LocalFake {
    async fn start(handler: impl Fn(&str, &Value) -> String + Send + Sync + 'static) -> Self {
        let requests: Requests = Arc::default();
        let state = (Arc::new(handler) as Handler, requests.clone());
        let app = Router::new().fallback(serve).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, requests, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<(String, Value)> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for LocalFake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(State((handler, requests)): State<(Handler, Requests)>, uri: Uri, body: bytes::Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = uri.path().to_owned();
    requests.lock().unwrap().push((path.clone(), body.clone()));
    let text = handler(&path, &body);
    if text.is_empty() {
        let mut r = Response::new(Body::from("fake: unknown route"));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    let mut r = Response::new(Body::from(text));
    let content_type =
        if path.contains("stream") || path.ends_with("/responses") { "text/event-stream" } else { "application/json" };
    r.headers_mut().insert("content-type", content_type.parse().unwrap());
    r
}

fn sse(chunks: Vec<Chunk>) -> String {
    chunks
        .into_iter()
        .map(|c| match c {
            Chunk::Data(s) => s,
            _ => String::new(),
        })
        .collect()
}

// ---- Codex ----

/// The OpenAI Responses streaming API: a shell call (`exec_command`, Codex's tool) running
/// `command` until the conversation carries its output, then a text answer.
fn responses_handler(command: &'static str) -> impl Fn(&str, &Value) -> String + Send + Sync + 'static {
    move |path: &str, body: &Value| {
        if !path.ends_with("/responses") {
            return String::new();
        }
        let input = body.get("input").and_then(Value::as_array).cloned().unwrap_or_default();
        let has_output = input.iter().any(|i| i.get("type").and_then(Value::as_str) == Some("function_call_output"));
        let item = if has_output {
            json!({"type": "message", "role": "assistant", "id": "msg_2",
                   "content": [{"type": "output_text", "text": "All done.", "annotations": []}]})
        } else {
            json!({"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "exec_command",
                   "arguments": json!({"cmd": command}).to_string()})
        };
        let ev = |v: Value| Chunk::event(v["type"].as_str().unwrap_or("unknown"), &v);
        sse(vec![
            ev(json!({"type": "response.created", "response": {"id": "resp_1"}})),
            ev(json!({"type": "response.output_item.added", "output_index": 0, "item": item})),
            ev(json!({"type": "response.output_item.done", "output_index": 0, "item": item})),
            ev(json!({"type": "response.completed", "response": {"id": "resp_1", "usage": {
                "input_tokens": 10, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15}}})),
        ])
    }
}

/// A real CLI's run against its fake model server.
struct CliRun {
    agent: ExternalAgent,
    store: Arc<MemoryEventStore>,
    run: RunId,
    events: Vec<Event>,
    work: tempfile::TempDir,
    server: LocalFake,
    _home: tempfile::TempDir,
}

impl CliRun {
    /// What the model was told about its call (the Responses API's `function_call_output`).
    fn codex_told(&self) -> Vec<String> {
        self.server
            .requests()
            .iter()
            .flat_map(|(_, b)| b.get("input").and_then(Value::as_array).cloned().unwrap_or_default())
            .filter(|i| i.get("type").and_then(Value::as_str) == Some("function_call_output"))
            .map(|i| i.to_string())
            .collect()
    }
}

/// Codex (`codex app-server`) asked by the model to run `command`, with `-y` or not, under the
/// permission rules `policy`.
async fn codex_run(yes: bool, command: &'static str, policy: Policy) -> Option<CliRun> {
    let program = cli("codex")?;
    let server = LocalFake::start(responses_handler(command)).await;
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join("config.toml"),
        format!(
            "model = \"fake-model\"\nmodel_provider = \"fake\"\n\n[model_providers.fake]\nname = \"fake\"\n\
             base_url = \"{}/v1\"\nenv_key = \"DESCARTES_FAKE_OPENAI_KEY\"\nwire_api = \"responses\"\n",
            server.url()
        ),
    )
    .unwrap();
    let env = [
        ("CODEX_HOME", home.path().display().to_string()),
        ("HOME", home.path().display().to_string()),
        ("DESCARTES_FAKE_OPENAI_KEY", "sk-test".to_owned()),
    ];
    let backend = Arc::new(Codex::new(options(program, &env, work.path())));
    let store = Arc::new(MemoryEventStore::new());
    let mut agent = agent(store.clone(), backend, Arc::new(NoPrompter), work.path(), "", yes);
    agent.policy = policy;
    let run = RunId::from("real-codex");
    let outcome = agent.start(run.clone(), "make a marker".into(), Message::user_text("make a marker")).await.unwrap();
    assert_eq!(outcome, ExternalOutcome::Completed { result: "All done.".into() });
    let events = events(&store, &run).await;
    assert_decided(&events);
    Some(CliRun { agent, store, run, events, work, server, _home: home })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_with_yes_runs_the_command_descartes_allowed_and_resumes() {
    let Some(r) = codex_run(true, "touch marker.txt", Policy::default()).await else { return };
    let evs = &r.events;
    assert!(r.work.path().join("marker.txt").exists(), "the command ran");
    assert_tool_events(evs, "codex", true);
    let started = find(evs, |d| match d {
        EventData::ToolCallStarted(t) => Some(t.clone()),
        _ => None,
    });
    assert_eq!(started[0].tool, "shell");
    assert_eq!(started[0].input["command"], "touch marker.txt", "the command as the policy sees it");
    let d = decisions(evs);
    assert_eq!((d.len(), d[0].decision, d[0].rule.as_str()), (1, Decision::Allow, "flag:--yes"));
    assert_eq!(d[0].call_id, Some(started[0].call_id.clone()));
    let EventData::RunCompleted(c) = &evs.last().unwrap().data else { panic!() };
    assert!(c.usage.input_tokens > 0 && c.usage.output_tokens > 0, "{:?}", c.usage);

    // `thread/resume`: the earlier conversation goes to the model again.
    let st = r.store.replay_run(&r.run).await.unwrap();
    let thread = st.backend_session.clone().unwrap().session_id;
    let before = r.server.requests().len();
    let outcome = r.agent.resume(st, "completed").await.unwrap();
    assert_eq!(outcome, ExternalOutcome::Completed { result: "All done.".into() });
    let resumed = r.server.requests().into_iter().nth(before).unwrap().1.to_string();
    assert!(resumed.contains("make a marker") && resumed.contains("carry on with the task"), "{resumed}");
    let st = r.store.replay_run(&r.run).await.unwrap();
    assert_eq!(st.backend_session.unwrap().session_id, thread, "the same thread continued");
    assert_decided(&events(&r.store, &r.run).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_without_yes_and_without_a_terminal_runs_nothing() {
    let Some(r) = codex_run(false, "touch marker.txt", Policy::default()).await else { return };
    assert!(!r.work.path().join("marker.txt").exists(), "the ask was denied: nothing ran");
    assert_tool_events(&r.events, "codex", false);
    let d = decisions(&r.events);
    assert_eq!((d.len(), d[0].decision, d[0].rule.as_str()), (1, Decision::Deny, "builtin:ask-without-terminal"));
    assert!(r.codex_told().iter().any(|o| o.contains("rejected")), "{:?}", r.codex_told());
}

/// `echo` is a command Codex deems safe and would run without asking in its usual modes: a
/// Descartes rule denies it even with `-y`, and an allow rule lets it run without `-y`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_s_safe_commands_are_decided_by_descartes_rules() {
    let Some(r) = codex_run(true, "echo codex-was-here > echoed.txt", rules(&[], &["shell(echo *)"])).await else {
        return;
    };
    assert!(!r.work.path().join("echoed.txt").exists(), "the denied echo did not run");
    let d = decisions(&r.events);
    assert_eq!((d.len(), d[0].decision), (1, Decision::Deny));
    assert_eq!(d[0].rule, "project:deny shell \"echo *\"");

    let Some(r) = codex_run(false, "echo codex-was-here", rules(&["shell(echo *)"], &[])).await else { return };
    assert_tool_events(&r.events, "codex", true);
    let d = decisions(&r.events);
    assert_eq!((d.len(), d[0].decision), (1, Decision::Allow));
    assert_eq!(d[0].rule, "project:allow shell \"echo *\"");
    assert!(r.codex_told().iter().any(|o| o.contains("codex-was-here")), "{:?}", r.codex_told());
}

// ---- Gemini CLI ----

/// The Gemini API: a call of `tool` with `args` until the conversation carries its response,
/// then a text answer (or, for a resumed session, "Resumed.").
fn gemini_handler(tool: &'static str, args: Value) -> impl Fn(&str, &Value) -> String + Send + Sync + 'static {
    move |path: &str, body: &Value| {
        if path.contains(":countTokens") {
            return json!({"totalTokens": 10}).to_string();
        }
        if !path.contains(":streamGenerateContent") {
            if path.contains(":generateContent") {
                return json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "{}"}]}, "finishReason": "STOP"}]})
                    .to_string();
            }
            return String::new();
        }
        let contents = body.get("contents").and_then(Value::as_array).cloned().unwrap_or_default();
        let last_parts =
            contents.last().and_then(|c| c.get("parts")).and_then(Value::as_array).cloned().unwrap_or_default();
        let answered = last_parts.iter().any(|p| p.get("functionResponse").is_some());
        let continuing = last_parts
            .iter()
            .any(|p| p.get("text").and_then(Value::as_str).is_some_and(|t| t.contains("carry on with the task")));
        let parts = if answered {
            json!([{"text": "All done."}])
        } else if continuing {
            json!([{"text": "Resumed."}])
        } else {
            json!([{"functionCall": {"name": tool, "args": args.clone()}}])
        };
        sse(vec![Chunk::data(&json!({
            "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 15, "candidatesTokenCount": 6, "totalTokenCount": 21},
        }))])
    }
}

impl CliRun {
    /// What the model was told about its call (the Gemini API's `functionResponse`).
    fn gemini_told(&self) -> Vec<String> {
        self.server
            .requests()
            .iter()
            .flat_map(|(_, b)| b.get("contents").and_then(Value::as_array).cloned().unwrap_or_default())
            .flat_map(|c| c.get("parts").and_then(Value::as_array).cloned().unwrap_or_default())
            .filter_map(|p| p.get("functionResponse").map(Value::to_string))
            .collect()
    }
}

/// Gemini CLI (`gemini --acp`) asked by the model to call `tool` with `args` (in a working
/// directory holding `hello.txt`), with `-y` or not, under the permission rules `policy`.
async fn gemini_run(yes: bool, tool: &'static str, args: Value, policy: Policy) -> Option<CliRun> {
    let program = cli("gemini")?;
    let server = LocalFake::start(gemini_handler(tool, args)).await;
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("hello.txt"), "gemini-read-this\n").unwrap();
    std::fs::create_dir_all(home.path().join(".gemini")).unwrap();
    std::fs::write(
        home.path().join(".gemini/settings.json"),
        json!({"security": {"auth": {"selectedType": "gemini-api-key"}}}).to_string(),
    )
    .unwrap();
    let env = [
        ("HOME", home.path().display().to_string()),
        ("GEMINI_API_KEY", "test-key".to_owned()),
        ("GOOGLE_GEMINI_BASE_URL", server.url()),
    ];
    let backend = Arc::new(GeminiCli::new(options(program, &env, work.path())));
    let store = Arc::new(MemoryEventStore::new());
    let mut agent = agent(store.clone(), backend, Arc::new(NoPrompter), work.path(), "gemini-2.5-flash", yes);
    agent.policy = policy;
    let run = RunId::from("real-gemini");
    let outcome = agent.start(run.clone(), "make a marker".into(), Message::user_text("make a marker")).await.unwrap();
    assert_eq!(outcome, ExternalOutcome::Completed { result: "All done.".into() });
    let events = events(&store, &run).await;
    assert_decided(&events);
    Some(CliRun { agent, store, run, events, work, server, _home: home })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_cli_runs_the_shell_command_descartes_allowed_and_resumes() {
    let touch = json!({"command": "touch marker.txt"});
    let Some(r) = gemini_run(true, "run_shell_command", touch, Policy::default()).await else { return };
    assert!(r.work.path().join("marker.txt").exists(), "the command ran");
    assert_tool_events(&r.events, "gemini-cli", true);
    let d = decisions(&r.events);
    assert_eq!((d.len(), d[0].decision, d[0].tool.as_str()), (1, Decision::Allow, "shell"));
    assert_eq!(d[0].rule, "flag:--yes");
    let EventData::RunCompleted(c) = &r.events.last().unwrap().data else { panic!() };
    assert!(c.usage.input_tokens > 0, "{:?}", c.usage);

    // `session/load`: the session continues with its history.
    let st = r.store.replay_run(&r.run).await.unwrap();
    assert!(st.backend_session.is_some());
    let before = r.server.requests().len();
    let outcome = r.agent.resume(st, "completed").await.unwrap();
    assert_eq!(outcome, ExternalOutcome::Completed { result: "Resumed.".into() });
    let resumed: Vec<(String, Value)> = r.server.requests().into_iter().skip(before).collect();
    assert!(
        resumed.iter().any(|(p, b)| p.contains(":streamGenerateContent") && b.to_string().contains("touch marker.txt")),
        "the resumed session carries the earlier conversation"
    );
    assert_decided(&events(&r.store, &r.run).await);
}

/// The matrix: without `-y` and a terminal the ask is denied; a command Gemini CLI deems safe
/// (`ls`) and a read-only tool it runs by itself (`read_file`) are decided by Descartes'
/// rules, denied by a deny rule, run under an allow rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_cli_s_every_call_is_decided_by_descartes() {
    let touch = json!({"command": "touch marker.txt"});
    let Some(r) = gemini_run(false, "run_shell_command", touch, Policy::default()).await else { return };
    assert!(!r.work.path().join("marker.txt").exists(), "the denied ask did not run");
    assert_tool_events(&r.events, "gemini-cli", false);
    assert_eq!(decisions(&r.events)[0].rule, "builtin:ask-without-terminal");
    assert!(r.gemini_told().iter().any(|t| t.contains("cancel")), "{:?}", r.gemini_told());

    let ls = json!({"command": "ls"});
    let Some(r) = gemini_run(true, "run_shell_command", ls.clone(), rules(&[], &["shell(ls)"])).await else { return };
    let d = decisions(&r.events);
    assert_eq!((d[0].decision, d[0].rule.as_str()), (Decision::Deny, "project:deny shell \"ls\""));
    assert!(!r.gemini_told().iter().any(|t| t.contains("hello.txt")), "ls did not run: {:?}", r.gemini_told());

    let Some(r) = gemini_run(false, "run_shell_command", ls, rules(&["shell(ls)"], &[])).await else { return };
    assert_tool_events(&r.events, "gemini-cli", true);
    assert!(r.gemini_told().iter().any(|t| t.contains("hello.txt")), "ls ran: {:?}", r.gemini_told());

    let read = json!({"file_path": "hello.txt"});
    let Some(r) = gemini_run(true, "read_file", read.clone(), rules(&[], &["read_file(hello.txt)"])).await else {
        return;
    };
    let d = decisions(&r.events);
    assert_eq!((d[0].decision, d[0].tool.as_str()), (Decision::Deny, "read_file"));
    assert!(!r.gemini_told().iter().any(|t| t.contains("gemini-read-this")), "{:?}", r.gemini_told());

    let Some(r) = gemini_run(false, "read_file", read, Policy::default()).await else { return };
    let d = decisions(&r.events);
    assert_eq!((d[0].decision, d[0].rule.as_str()), (Decision::Allow, "builtin:read-only"));
    assert!(r.gemini_told().iter().any(|t| t.contains("gemini-read-this")), "{:?}", r.gemini_told());
}

/// The CLIs' own shells run outside Descartes' sandbox, in the CLI's process: a token hidden by
/// the helper the CLI is started through reads as empty there (`SECRET` is in the work dir).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_s_shell_cannot_read_a_hidden_token() {
    let Some(r) = codex_run(true, "cat secret.token; echo read=$?-done", Policy::default()).await else { return };
    let told = r.codex_told().join(" | ");
    // Codex's own sandbox refuses the read of the device bound over it (`Permission denied`).
    assert!(told.contains("-done"), "the command ran: {told}");
    assert!(!told.contains(SECRET), "the token reached the model: {told}");
    assert_eq!(std::fs::read_to_string(r.work.path().join("secret.token")).unwrap(), SECRET, "hidden, not removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_cli_s_shell_cannot_read_a_hidden_token() {
    let cat = json!({"command": "cat secret.token; echo read=$?-done"});
    let Some(r) = gemini_run(true, "run_shell_command", cat, Policy::default()).await else { return };
    let told = r.gemini_told().join(" | ");
    assert!(told.contains("read=0-done"), "the command ran: {told}");
    assert!(!told.contains(SECRET), "the token reached the model: {told}");
}
