//! The ExternalAgent driver with a scripted fake `AgentCli` (in memory), and with the real
//! process plumbing on small shell-script fake CLIs (tests/fixtures).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use descartes_agent_cli::{ClaudeCode, CliOptions, CommandCli};
use descartes_core::agent::{AgentConfig, NullSink};
use descartes_core::external::CONTINUE_PROMPT;
use descartes_core::permission::NoPrompter;
use descartes_core::{
    AgentCli, CliAnswer, CliEvent, CliPermissionRequest, CliRequest, CliSession, EventStore, ExternalAgent,
    ExternalOutcome, PermissionRequest, PromptAnswer, Prompter, ProviderError, RunState,
};
use descartes_protocol::{ContentPart, Decision, Event, EventData, Message, RunId, Timestamp, Usage};
use descartes_store::MemoryEventStore;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
enum Step {
    Event(CliEvent),
    Fail(ProviderError),
    Hang,
}

#[derive(Default)]
struct Log {
    requests: Vec<CliRequest>,
    answers: Vec<(String, CliAnswer)>,
    cancelled: usize,
}

struct FakeCli {
    scripts: Mutex<VecDeque<Vec<Step>>>,
    log: Arc<Mutex<Log>>,
}

impl FakeCli {
    fn new(scripts: Vec<Vec<Step>>) -> Arc<Self> {
        Arc::new(Self { scripts: Mutex::new(scripts.into()), log: Arc::default() })
    }
    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap()
    }
}

struct FakeSession {
    steps: VecDeque<Step>,
    log: Arc<Mutex<Log>>,
}

#[async_trait]
impl AgentCli for FakeCli {
    fn name(&self) -> &str {
        "fake-cli"
    }
    async fn start(&self, request: CliRequest) -> Result<Box<dyn CliSession>, ProviderError> {
        self.log().requests.push(request);
        let steps = self.scripts.lock().unwrap().pop_front().unwrap_or_default();
        Ok(Box::new(FakeSession { steps: steps.into(), log: self.log.clone() }))
    }
}

#[async_trait]
impl CliSession for FakeSession {
    async fn next_event(&mut self) -> Result<Option<CliEvent>, ProviderError> {
        match self.steps.pop_front() {
            None => Ok(None),
            Some(Step::Event(e)) => Ok(Some(e)),
            Some(Step::Fail(e)) => Err(e),
            Some(Step::Hang) => {
                std::future::pending::<()>().await;
                Ok(None)
            }
        }
    }
    async fn answer(&mut self, request: &CliPermissionRequest, answer: CliAnswer) -> Result<(), ProviderError> {
        self.log.lock().unwrap().answers.push((request.request_id.clone(), answer));
        Ok(())
    }
    async fn cancel(&mut self) {
        self.log.lock().unwrap().cancelled += 1;
    }
}

struct FixedPrompter(PromptAnswer, Mutex<Vec<String>>);

#[async_trait]
impl Prompter for FixedPrompter {
    async fn ask(&self, request: &PermissionRequest) -> PromptAnswer {
        self.1.lock().unwrap().push(request.summary.clone());
        self.0
    }
}

fn config(auto_approve: bool, cwd: PathBuf) -> AgentConfig {
    AgentConfig {
        provider: String::new(),
        model: String::new(),
        max_turns: 0,
        auto_approve,
        system_prompt: None,
        max_tokens: None,
        cwd,
        spool_root: std::env::temp_dir(),
        budget: Default::default(),
    }
}

fn agent(
    store: Arc<MemoryEventStore>,
    backend: Arc<dyn AgentCli>,
    prompter: Arc<dyn Prompter>,
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
        config: config(yes, std::env::temp_dir()),
    }
}

async fn events(store: &MemoryEventStore, run: &RunId) -> Vec<Event> {
    store.read_run(run, 0).await.unwrap()
}

fn kinds(events: &[Event]) -> Vec<&str> {
    events.iter().map(Event::kind).collect()
}

fn ev(e: CliEvent) -> Step {
    Step::Event(e)
}

fn tool_turn() -> Vec<Step> {
    vec![
        ev(CliEvent::SessionStarted { session_id: "s-1".into(), model: Some("m".into()) }),
        ev(CliEvent::TextDelta("Running".into())),
        ev(CliEvent::AssistantMessage {
            parts: vec![
                ContentPart::text("Running"),
                ContentPart::ToolUse { id: "t1".into(), name: "Bash".into(), input: json!({"command": "make"}) },
            ],
            usage: Some(Usage { input_tokens: 10, output_tokens: 2, ..Default::default() }),
            stop_reason: Some("tool_use".into()),
        }),
        ev(CliEvent::PermissionRequest(CliPermissionRequest {
            request_id: "r1".into(),
            tool: "Bash".into(),
            input: json!({"command": "make"}),
            tool_use_id: Some("t1".into()),
            read_only: false,
        })),
        ev(CliEvent::ToolResult { tool_use_id: "t1".into(), output: "ok".into(), is_error: false }),
        ev(CliEvent::AssistantMessage { parts: vec![ContentPart::text("Built.")], usage: None, stop_reason: None }),
        ev(CliEvent::Finished {
            result: "Built.".into(),
            is_error: false,
            subtype: Some("success".into()),
            usage: Some(Usage { input_tokens: 30, output_tokens: 8, ..Default::default() }),
            cost_usd: Some(0.5),
        }),
    ]
}

#[tokio::test]
async fn events_are_recorded_in_order_and_an_allow_is_answered() {
    let store = Arc::new(MemoryEventStore::new());
    let cli = FakeCli::new(vec![tool_turn()]);
    let prompter = Arc::new(FixedPrompter(PromptAnswer::AllowOnce, Mutex::default()));
    let a = agent(store.clone(), cli.clone(), prompter.clone(), false);
    let run = RunId::from("run-1");
    let outcome = a.start(run.clone(), "build it".into(), Message::user_text("build it")).await.unwrap();
    assert_eq!(outcome, ExternalOutcome::Completed { result: "Built.".into() });

    let evs = events(&store, &run).await;
    assert_eq!(
        kinds(&evs),
        [
            "run_started",
            "message",
            "backend_session",
            "model_call_started",
            "model_call_completed",
            "message",
            "permission_decided",
            "tool_call_started",
            "tool_call_completed",
            "model_call_started",
            "model_call_completed",
            "message",
            "run_completed"
        ]
    );
    let EventData::RunStarted(s) = &evs[0].data else { panic!() };
    assert_eq!(s.provider, "fake-cli");
    let EventData::BackendSession(b) = &evs[2].data else { panic!() };
    assert_eq!((b.backend.as_str(), b.session_id.as_str(), b.model.as_deref()), ("fake-cli", "s-1", Some("m")));
    let EventData::PermissionDecided(p) = &evs[6].data else { panic!() };
    assert_eq!((p.decision, p.rule.as_str(), p.call_id.as_deref()), (Decision::Allow, "user:allow-once", Some("t1")));
    let EventData::ToolCallStarted(t) = &evs[7].data else { panic!() };
    assert_eq!(t.executed_by.as_deref(), Some("fake-cli"));
    assert_eq!(t.tool, "Bash");
    let EventData::ToolCallCompleted(t) = &evs[8].data else { panic!() };
    assert_eq!((t.call_id.as_str(), t.output.as_str(), t.is_error), ("t1", "ok", false));
    // The result's totals: what the messages did not report lands on the last model call.
    let EventData::ModelCallCompleted(c) = &evs[10].data else { panic!() };
    assert_eq!(c.usage, Usage { input_tokens: 20, output_tokens: 6, ..Default::default() });
    assert_eq!(c.cost_usd, Some(0.5));
    let EventData::RunCompleted(c) = &evs[12].data else { panic!() };
    assert_eq!(c.result, "Built.");
    assert_eq!(c.turns, 2);
    assert_eq!(c.usage, Usage { input_tokens: 30, output_tokens: 8, ..Default::default() });

    {
        let log = cli.log();
        assert_eq!(log.requests[0].prompt, "build it");
        assert_eq!(log.requests[0].resume_session, None);
        assert_eq!(
            log.answers,
            vec![("r1".to_owned(), CliAnswer::Allow { updated_input: json!({"command": "make"}) })]
        );
        assert_eq!(prompter.1.lock().unwrap().as_slice(), ["Bash: make"]);
    }

    let st = store.replay_run(&run).await.unwrap();
    assert_eq!(st.backend_session.as_ref().map(|b| b.session_id.as_str()), Some("s-1"));
}

#[tokio::test]
async fn without_a_terminal_the_ask_is_denied_and_recorded() {
    let store = Arc::new(MemoryEventStore::new());
    let mut script = tool_turn();
    script[4] = ev(CliEvent::ToolResult { tool_use_id: "t1".into(), output: "denied".into(), is_error: true });
    let cli = FakeCli::new(vec![script]);
    let a = agent(store.clone(), cli.clone(), Arc::new(NoPrompter), false);
    let run = RunId::from("run-deny");
    a.start(run.clone(), "b".into(), Message::user_text("b")).await.unwrap();
    let evs = events(&store, &run).await;
    let k = kinds(&evs);
    assert!(!k.contains(&"tool_call_started"), "a denied call never starts: {k:?}");
    let p = evs
        .iter()
        .find_map(|e| match &e.data {
            EventData::PermissionDecided(p) => Some(p.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(p.decision, Decision::Deny);
    assert!(p.reason.contains("-y"), "{}", p.reason);
    let log = cli.log();
    assert!(matches!(&log.answers[0].1, CliAnswer::Deny { message } if message.contains("-y")));
}

#[tokio::test]
async fn yes_flag_and_read_only_tools_are_allowed_by_rule() {
    for (yes, read_only, rule) in [(true, false, "flag:--yes"), (false, true, "builtin:read-only")] {
        let store = Arc::new(MemoryEventStore::new());
        let mut script = tool_turn();
        if let Step::Event(CliEvent::PermissionRequest(r)) = &mut script[3] {
            r.read_only = read_only;
        }
        let cli = FakeCli::new(vec![script]);
        let a = agent(store.clone(), cli.clone(), Arc::new(NoPrompter), yes);
        let run = RunId::from("run-rule");
        a.start(run.clone(), "b".into(), Message::user_text("b")).await.unwrap();
        let p = events(&store, &run)
            .await
            .into_iter()
            .find_map(|e| match e.data {
                EventData::PermissionDecided(p) => Some(p),
                _ => None,
            })
            .unwrap();
        assert_eq!((p.decision, p.rule.as_str()), (Decision::Allow, rule));
        assert!(matches!(cli.log().answers[0].1, CliAnswer::Allow { .. }));
    }
}

#[tokio::test]
async fn configured_rules_answer_the_cli_and_a_deny_wins_over_yes() {
    use descartes_core::policy::{PermissionRules, Policy, RuleSpec, Source};
    let rules = |allow: &[&str], deny: &[&str]| {
        let specs = |l: &[&str]| l.iter().map(|t| RuleSpec::parse(t).unwrap()).collect::<Vec<_>>();
        Policy::new(&[(Source::Project, PermissionRules { allow: specs(allow), ask: vec![], deny: specs(deny) })])
            .unwrap()
    };
    // (policy, -y, expected decision, expected rule)
    let cases = [
        (rules(&["Bash(make)"], &[]), false, Decision::Allow, "project:allow Bash \"make\""),
        (rules(&["Bash(mak*)"], &["Bash(make)"]), true, Decision::Deny, "project:deny Bash \"make\""),
        (rules(&["Bash(cargo test)"], &[]), false, Decision::Deny, "builtin:ask-without-terminal"),
    ];
    for (policy, yes, decision, rule) in cases {
        let store = Arc::new(MemoryEventStore::new());
        let cli = FakeCli::new(vec![tool_turn()]);
        let mut a = agent(store.clone(), cli.clone(), Arc::new(NoPrompter), yes);
        a.policy = policy;
        let run = RunId::from("run-policy");
        a.start(run.clone(), "b".into(), Message::user_text("b")).await.unwrap();
        let p = events(&store, &run)
            .await
            .into_iter()
            .find_map(|e| match e.data {
                EventData::PermissionDecided(p) => Some(p),
                _ => None,
            })
            .unwrap();
        assert_eq!((p.decision, p.rule.as_str()), (decision, rule), "{}", p.reason);
        let allowed = matches!(cli.log().answers[0].1, CliAnswer::Allow { .. });
        assert_eq!(allowed, decision == Decision::Allow);
    }
}

#[tokio::test]
async fn a_failed_run_resumes_the_recorded_session() {
    let store = Arc::new(MemoryEventStore::new());
    let first = vec![
        ev(CliEvent::SessionStarted { session_id: "s-9".into(), model: None }),
        Step::Fail(ProviderError::Stream {
            provider: "fake-cli".into(),
            kind: "exit".into(),
            message: "`fake` exited with status 1: boom".into(),
            retryable: true,
        }),
    ];
    let second = vec![
        ev(CliEvent::SessionStarted { session_id: "s-9".into(), model: None }),
        ev(CliEvent::AssistantMessage { parts: vec![ContentPart::text("ok")], usage: None, stop_reason: None }),
        ev(CliEvent::Finished { result: "ok".into(), is_error: false, subtype: None, usage: None, cost_usd: None }),
    ];
    let cli = FakeCli::new(vec![first, second]);
    let a = agent(store.clone(), cli.clone(), Arc::new(NoPrompter), false);
    let run = RunId::from("run-resume");
    let outcome = a.start(run.clone(), "goal".into(), Message::user_text("goal")).await.unwrap();
    let ExternalOutcome::Failed { error, .. } = outcome else { panic!("{outcome:?}") };
    assert!(error.contains("boom") && error.contains("descartes resume run-resume"), "{error}");

    let st: RunState = store.replay_run(&run).await.unwrap();
    assert_eq!(st.status.as_str(), "failed");
    let outcome = a.resume(st, "failed").await.unwrap();
    assert_eq!(outcome, ExternalOutcome::Completed { result: "ok".into() });
    {
        let log = cli.log();
        assert_eq!(log.requests[1].resume_session.as_deref(), Some("s-9"));
        assert_eq!(log.requests[1].prompt, CONTINUE_PROMPT);
    }
    let k = kinds(&events(&store, &run).await).join(",");
    assert_eq!(
        k,
        "run_started,message,backend_session,run_failed,run_resumed,model_call_started,model_call_completed,message,run_completed",
        "the same session is not recorded twice"
    );
}

#[tokio::test]
async fn a_run_without_a_session_starts_over_on_the_goal() {
    let store = Arc::new(MemoryEventStore::new());
    let cli = FakeCli::new(vec![
        vec![Step::Fail(ProviderError::Config { provider: "fake-cli".into(), message: "not installed".into() })],
        vec![ev(CliEvent::Finished {
            result: "x".into(),
            is_error: false,
            subtype: None,
            usage: None,
            cost_usd: None,
        })],
    ]);
    let a = agent(store.clone(), cli.clone(), Arc::new(NoPrompter), false);
    let run = RunId::from("run-fresh");
    a.start(run.clone(), "the goal".into(), Message::user_text("the goal")).await.unwrap();
    let st = store.replay_run(&run).await.unwrap();
    assert!(st.backend_session.is_none());
    a.resume(st, "failed").await.unwrap();
    assert_eq!(cli.log().requests[1].resume_session, None);
    assert_eq!(cli.log().requests[1].prompt, "the goal");
}

#[tokio::test]
async fn cancel_stops_the_cli_and_records_it() {
    let store = Arc::new(MemoryEventStore::new());
    let cli =
        FakeCli::new(vec![vec![ev(CliEvent::SessionStarted { session_id: "s".into(), model: None }), Step::Hang]]);
    let a = agent(store.clone(), cli.clone(), Arc::new(NoPrompter), false);
    let cancel = a.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        cancel.cancel();
    });
    let run = RunId::from("run-cancel");
    let outcome = a.start(run.clone(), "g".into(), Message::user_text("g")).await.unwrap();
    assert_eq!(outcome, ExternalOutcome::Cancelled);
    assert_eq!(cli.log().cancelled, 1);
    assert_eq!(kinds(&events(&store, &run).await).last(), Some(&"run_cancelled"));
}

#[tokio::test]
async fn a_rate_limit_with_a_reset_time_parks_the_run() {
    let store = Arc::new(MemoryEventStore::new());
    let until = Timestamp(1_900_000_000_000_000);
    let cli = FakeCli::new(vec![vec![
        ev(CliEvent::SessionStarted { session_id: "s".into(), model: None }),
        ev(CliEvent::RateLimited { until: None, reason: "warning only".into() }),
        ev(CliEvent::RateLimited { until: Some(until), reason: "limit".into() }),
        Step::Hang,
    ]]);
    let a = agent(store.clone(), cli.clone(), Arc::new(NoPrompter), false);
    let run = RunId::from("run-park");
    let outcome = a.start(run.clone(), "g".into(), Message::user_text("g")).await.unwrap();
    assert_eq!(outcome, ExternalOutcome::Parked { until, reason: "limit".into() });
    let evs = events(&store, &run).await;
    let EventData::RunParked(p) = &evs.last().unwrap().data else { panic!("{:?}", kinds(&evs)) };
    assert_eq!((p.until, p.provider.as_str()), (until, "fake-cli"));
    assert_eq!(cli.log().cancelled, 1);
}

// ---- The real process plumbing, on shell-script fake CLIs ----

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn claude_at(program: PathBuf, env: Vec<(&str, String)>) -> Arc<dyn AgentCli> {
    let mut options = CliOptions { program: Some(program), kill_grace: Duration::from_secs(2), ..Default::default() };
    for (k, v) in env {
        options = options.with_env(k, v);
    }
    Arc::new(ClaudeCode::new(options))
}

#[tokio::test]
async fn fake_claude_permission_round_trip_over_stdin() {
    for (prompter, expected) in [(PromptAnswer::AllowOnce, "allowed"), (PromptAnswer::Deny, "denied")] {
        let dir = tempfile::tempdir().unwrap();
        let args_file = dir.path().join("args");
        let store = Arc::new(MemoryEventStore::new());
        let backend = claude_at(fixture("fake-claude.sh"), vec![("FAKE_ARGS_FILE", args_file.display().to_string())]);
        let a = agent(store.clone(), backend, Arc::new(FixedPrompter(prompter, Mutex::default())), false);
        let run = RunId::from("run-fake-claude");
        let outcome = a.start(run.clone(), "say hi".into(), Message::user_text("say hi")).await.unwrap();
        assert_eq!(outcome, ExternalOutcome::Completed { result: expected.into() });
        let evs = events(&store, &run).await;
        let k = kinds(&evs);
        assert_eq!(
            k.iter().filter(|k| **k == "tool_call_started").count(),
            usize::from(expected == "allowed"),
            "{k:?}"
        );
        let done = evs.iter().find_map(|e| match &e.data {
            EventData::ToolCallCompleted(t) => Some(t.clone()),
            _ => None,
        });
        assert_eq!(done.unwrap().is_error, expected == "denied");
        let EventData::RunCompleted(c) = &evs.last().unwrap().data else { panic!() };
        assert_eq!(c.usage, Usage { input_tokens: 20, output_tokens: 5, ..Default::default() });
        let args = std::fs::read_to_string(&args_file).unwrap();
        assert!(args.contains("--permission-prompt-tool stdio"), "{args}");
    }
}

#[tokio::test]
async fn a_cli_exiting_non_zero_fails_with_its_stderr_and_stays_resumable() {
    let store = Arc::new(MemoryEventStore::new());
    let a = agent(store.clone(), claude_at(fixture("exit-nonzero.sh"), vec![]), Arc::new(NoPrompter), false);
    let run = RunId::from("run-exit");
    let outcome = a.start(run.clone(), "g".into(), Message::user_text("g")).await.unwrap();
    let ExternalOutcome::Failed { error, kind } = outcome else { panic!("{outcome:?}") };
    assert_eq!(kind, "backend");
    assert!(error.contains("exited with status 3") && error.contains("the model is not available"), "{error}");
    let st = store.replay_run(&run).await.unwrap();
    assert_eq!(st.backend_session.map(|b| b.session_id), Some("sess-x".into()), "resume can continue the session");
    let evs = events(&store, &run).await;
    let EventData::RunFailed(f) = &evs.last().unwrap().data else { panic!() };
    assert!(f.retryable);
}

#[tokio::test]
async fn garbage_output_fails_naming_the_line() {
    let store = Arc::new(MemoryEventStore::new());
    let a = agent(store.clone(), claude_at(fixture("garbage.sh"), vec![]), Arc::new(NoPrompter), false);
    let run = RunId::from("run-garbage");
    let started = std::time::Instant::now();
    let outcome = a.start(run.clone(), "g".into(), Message::user_text("g")).await.unwrap();
    let ExternalOutcome::Failed { error, .. } = outcome else { panic!("{outcome:?}") };
    assert!(error.contains("not a JSON event") && error.contains("Welcome to FakeCLI!"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(4), "the CLI is stopped, not waited for");
}

#[tokio::test]
async fn a_missing_cli_says_how_to_install_it() {
    let store = Arc::new(MemoryEventStore::new());
    let a = agent(
        store.clone(),
        claude_at(PathBuf::from("descartes-no-such-claude-binary"), vec![]),
        Arc::new(NoPrompter),
        false,
    );
    let run = RunId::from("run-missing");
    let outcome = a.start(run.clone(), "g".into(), Message::user_text("g")).await.unwrap();
    let ExternalOutcome::Failed { error, .. } = outcome else { panic!("{outcome:?}") };
    assert!(
        error.contains("descartes-no-such-claude-binary")
            && error.contains("npm install -g @anthropic-ai/claude-code")
            && error.contains("descartes resume"),
        "{error}"
    );
    assert_eq!(store.replay_run(&run).await.unwrap().status.as_str(), "failed");
}

#[tokio::test]
async fn cancel_interrupts_a_real_process() {
    let store = Arc::new(MemoryEventStore::new());
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let backend = claude_at(fixture("hang.sh"), vec![("FAKE_PID_FILE", pid_file.display().to_string())]);
    let a = agent(store.clone(), backend, Arc::new(NoPrompter), false);
    let cancel = a.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel();
    });
    let started = std::time::Instant::now();
    let run = RunId::from("run-hang");
    let outcome = a.start(run.clone(), "g".into(), Message::user_text("g")).await.unwrap();
    assert_eq!(outcome, ExternalOutcome::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(2), "SIGINT stopped it before the kill: {:?}", started.elapsed());
    // The command the CLI was running is stopped too (its process group is signalled).
    let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_owned();
    let mut gone = false;
    for _ in 0..50 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for init to reap it.
        if stat.is_empty() || stat.split_whitespace().nth(2) == Some("Z") {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "the CLI's child process {pid} survived the stop");
}

#[tokio::test]
async fn command_backend_streams_stdout_as_the_answer() {
    let store = Arc::new(MemoryEventStore::new());
    // The prompt on stdin (no `{prompt}` in the arguments).
    let cmd = CommandCli::new("sh", vec!["-c".into(), "echo got: $(cat)".into()], CliOptions::default());
    let a = agent(store.clone(), Arc::new(cmd), Arc::new(NoPrompter), false);
    let run = RunId::from("run-cmd");
    let outcome = a.start(run.clone(), "hello".into(), Message::user_text("hello")).await.unwrap();
    assert_eq!(outcome, ExternalOutcome::Completed { result: "got: hello".into() });
    assert_eq!(
        kinds(&events(&store, &run).await),
        ["run_started", "message", "model_call_started", "model_call_completed", "message", "run_completed"]
    );

    // `{prompt}` in the arguments; a non-zero exit fails with stderr.
    let cmd = CommandCli::new(
        "sh",
        vec!["-c".into(), "echo partial; echo \"no: $0\" >&2; exit 2".into(), "{prompt}".into()],
        CliOptions::default(),
    );
    let a = agent(store.clone(), Arc::new(cmd), Arc::new(NoPrompter), false);
    let run = RunId::from("run-cmd-fail");
    let outcome = a.start(run.clone(), "the prompt".into(), Message::user_text("the prompt")).await.unwrap();
    let ExternalOutcome::Failed { error, .. } = outcome else { panic!("{outcome:?}") };
    assert!(error.contains("exited with status 2") && error.contains("no: the prompt"), "{error}");
}

#[tokio::test]
async fn a_cli_that_crosses_the_token_cap_is_stopped_and_not_restarted() {
    let store = Arc::new(MemoryEventStore::new());
    let cli = FakeCli::new(vec![tool_turn(), tool_turn()]);
    let mut a = agent(store.clone(), cli.clone(), Arc::new(NoPrompter), true);
    a.config.budget = descartes_protocol::Budget { max_tokens: Some(5), max_cost_usd: Some(2.0) };
    let run = RunId::from("run-budget");
    let outcome = a.start(run.clone(), "goal".into(), Message::user_text("goal")).await.unwrap();
    let ExternalOutcome::BudgetExceeded { error } = outcome else { panic!("{outcome:?}") };
    assert!(error.contains("--max-tokens"), "{error}");
    {
        let log = cli.log();
        assert_eq!(log.cancelled, 1, "the CLI was stopped");
        assert!(log.answers.is_empty(), "its permission request was never answered");
        assert_eq!(log.requests[0].max_cost_usd, Some(2.0), "the cost cap is handed to the CLI");
    }
    let evs = events(&store, &run).await;
    assert_eq!(kinds(&evs).last(), Some(&"budget_exceeded"));
    let st = store.replay_run(&run).await.unwrap();
    assert_eq!(st.status.as_str(), "budget_exceeded");

    // Resumed with the same cap: stopped before the CLI starts again.
    let outcome = a.resume(st, "budget_exceeded").await.unwrap();
    assert!(matches!(outcome, ExternalOutcome::BudgetExceeded { .. }), "{outcome:?}");
    assert_eq!(cli.log().requests.len(), 1);
}
