//! Runs driven by a long-lived process for its clients (the API server): started, resumed,
//! cancelled and answered by id, each driven in a task of its own while clients come and go.
//!
//! - A run keeps going when its client disconnects; its events are in the log for any client.
//! - Its model output streams to [`Publish`] as `{"type": "delta", "run_id", "kind", "text"}`
//!   values (best effort: deltas are not in the log).
//! - A tool call that needs a human's answer is recorded as `permission_asked` (with when it
//!   expires) before the run waits; [`Service::answer`] gives `allow`, `allow_for_run` or
//!   `deny`; an ask left unanswered past the run's ask timeout is denied. If the process dies
//!   meanwhile, the run is left `interrupted` and a resume asks again.
//! - [`Service::shutdown`] cancels every run it drives and waits for them to record it, so
//!   each is left resumable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use descartes_core::permission::{PermissionRequest, PromptAnswer, Prompter};
use descartes_core::{EventStore, OutputSink, RunOutcome};
use descartes_protocol::{
    EventData, Message, NewEvent, PermissionAsked, RunId, RunRequested, SessionStarted, Timestamp,
};
use descartes_runtime::{Runtime, Stores};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::error::{Problem, fail};
use crate::run::{Prepared, RunIo, RunRequest, prepare_with_policy, wrap_up};

/// Where live output goes (the server's broadcast of deltas).
pub type Publish = Arc<dyn Fn(serde_json::Value) + Send + Sync>;

/// How long an ask waits for an answer by default.
pub const DEFAULT_ASK_TIMEOUT: Duration = Duration::from_secs(600);

/// A human's answer to an ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Allow,
    AllowForRun,
    Deny,
}

impl std::str::FromStr for Answer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(Answer::Allow),
            "allow_for_run" => Ok(Answer::AllowForRun),
            "deny" => Ok(Answer::Deny),
            other => Err(format!("unknown answer `{other}` (allow, allow_for_run, deny)")),
        }
    }
}

/// An ask that waits for its answer.
#[derive(Debug, Clone, Serialize)]
pub struct Ask {
    pub call_id: String,
    pub tool: String,
    pub summary: String,
    pub expires_at: Timestamp,
}

/// A new run: the goal and what it runs with.
#[derive(Debug, Clone, Default)]
pub struct NewRun {
    pub prompt: String,
    pub request: RunRequest,
    /// How long a tool call waits for an answer before it is denied.
    pub ask_timeout: Option<Duration>,
    /// A retried request with the same key gets the first one's run.
    pub idempotency_key: Option<String>,
}

/// A run started (or resumed).
#[derive(Debug, Clone)]
pub struct Started {
    pub run_id: RunId,
    /// False when an earlier request with the same idempotency key started it.
    pub new: bool,
    /// Provider and model (`openai/gpt-4o-mini`).
    pub label: String,
}

/// A run this process drives.
struct Active {
    cancel: CancellationToken,
    asks: Mutex<HashMap<String, (Ask, oneshot::Sender<PromptAnswer>)>>,
    /// Why it is stopped, when not by a user's cancel (see [`descartes_core::STOP_REASON`]).
    stop_reason: Arc<Mutex<Option<String>>>,
}

/// The `run_cancelled` reason of a session's turn that a newer message interrupted; its
/// streams end with the terminal frame `interrupted`.
pub const INTERRUPTED: &str = "interrupted by a newer message";

/// What becomes of a message to a session while a turn of that session is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnBusy {
    /// Refused (a conflict: HTTP 409).
    #[default]
    Reject,
    /// Answered after the turns before it, in order.
    Enqueue,
    /// The running turn is stopped (it ends `interrupted`), then this one runs, before any
    /// queued one.
    Interrupt,
}

impl std::str::FromStr for OnBusy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reject" => Ok(OnBusy::Reject),
            "enqueue" => Ok(OnBusy::Enqueue),
            "interrupt" => Ok(OnBusy::Interrupt),
            other => Err(format!("unknown on_busy `{other}` (reject, enqueue, interrupt)")),
        }
    }
}

/// A user's message to a session.
#[derive(Debug, Clone, Default)]
pub struct SessionMessage {
    pub text: String,
    pub on_busy: OnBusy,
    /// What the turn runs with: a new session's provider, model and limits; for a later turn,
    /// each `None` keeps the session's own.
    pub request: RunRequest,
    /// How long a tool call waits for an answer before it is denied.
    pub ask_timeout: Option<Duration>,
}

/// What became of a message to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Its turn started.
    Started,
    /// It waits behind the running turn and `position - 1` other messages.
    Queued { position: usize },
    /// The running turn is being stopped; this message's turn comes next.
    Interrupting,
}

/// A message delivered to session `session_id`.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub session_id: RunId,
    pub delivery: Delivery,
}

/// A session this process is answering: the messages waiting for their turn.
#[derive(Default)]
struct Busy {
    queue: std::collections::VecDeque<SessionMessage>,
    /// An interrupt came before the running turn could be stopped: stop it as soon as it is.
    interrupt: bool,
}

/// The runs a process drives for its clients.
pub struct Service {
    rt: Arc<Runtime>,
    stores: Stores,
    publish: Publish,
    active: Mutex<HashMap<RunId, Arc<Active>>>,
    keys: tokio::sync::Mutex<HashMap<String, (RunId, String)>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The permission rules, compiled for the first run and kept (the configuration is the
    /// runtime's, fixed for the process).
    policy: std::sync::OnceLock<descartes_core::policy::Policy>,
    /// The sessions with a turn going, and their waiting messages.
    sessions: Mutex<HashMap<RunId, Busy>>,
    /// Set by [`Service::shutdown`]: no queued turn starts any more.
    stopping: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Service {
    pub fn new(rt: Arc<Runtime>, stores: Stores, publish: Publish) -> Arc<Self> {
        Arc::new(Self {
            rt,
            stores,
            publish,
            active: Mutex::new(HashMap::new()),
            keys: tokio::sync::Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            policy: std::sync::OnceLock::new(),
            sessions: Mutex::new(HashMap::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Starts a run once its agent is built (an earlier request with the same idempotency key
    /// gets its run, `new` false). Bad settings are refused here, before anything is recorded.
    pub async fn start(self: &Arc<Self>, new: NewRun) -> Result<Started> {
        if new.prompt.trim().is_empty() {
            return Err(fail(Problem::Usage, "the prompt is empty; say what the agent should do"));
        }
        let mut keys = self.keys.lock().await;
        if let Some((id, label)) = new.idempotency_key.as_ref().and_then(|k| keys.get(k)) {
            return Ok(Started { run_id: id.clone(), new: false, label: label.clone() });
        }
        if let Some(key) = &new.idempotency_key
            && let Some(earlier) = self.requested(key).await?
        {
            return Ok(earlier);
        }
        self.rt.check_guardrails()?;
        let run_id = RunId::generate();
        let settings = new.request.new_run(&self.rt);
        let (prepared, active) = self.prepare(&run_id, &new.request, settings, new.ask_timeout).await?;
        let lock = self.rt.lock_run(&run_id)?;
        let label = prepared.label.clone();
        if let Some(k) = new.idempotency_key {
            // Durable before the run starts: a retry after a crash finds it.
            let requested = RunRequested { run_id: run_id.to_string(), label: label.clone() };
            self.stores.events.append(vec![NewEvent::new(&request_stream(&k), requested)]).await?;
            // Another process on the same log (a second server on one PostgreSQL database) may
            // have taken the key meanwhile: the first `run_requested` in the log wins (seqs
            // become visible in commit order, so every lower one is readable once ours is), and
            // the others start nothing.
            if let Some(first) = self.requested(&k).await?
                && first.run_id != run_id
            {
                keys.insert(k, (first.run_id.clone(), first.label.clone()));
                return Ok(first);
            }
            keys.insert(k, (run_id.clone(), label.clone()));
        }
        drop(keys);
        let goal = Message::user_text(&new.prompt);
        let (this, id) = (self.clone(), run_id.clone());
        self.spawn(&run_id, active, async move {
            let outcome = prepared.start(id.clone(), new.prompt, goal).await;
            this.finish(&id, outcome, lock).await;
        });
        Ok(Started { run_id, new: true, label })
    }

    /// The run an earlier request with idempotency key `key` started, from the log.
    async fn requested(&self, key: &str) -> Result<Option<Started>> {
        let events = self.stores.events.read_run(&request_stream(key), 0).await?;
        Ok(events.into_iter().find_map(|e| match e.data {
            EventData::RunRequested(r) => {
                Some(Started { run_id: RunId::from(r.run_id.as_str()), new: false, label: r.label })
            }
            _ => None,
        }))
    }

    /// Resumes run `id` (a full id or a unique prefix) with `request`'s overrides.
    pub async fn resume(self: &Arc<Self>, id: &str, request: RunRequest) -> Result<Started> {
        self.rt.check_guardrails()?;
        let run_id = self.rt.resolve_run(&*self.stores.events, id).await?;
        if lock(&self.active).contains_key(&run_id) {
            return Err(fail(Problem::Conflict, format!("run {run_id} is running")));
        }
        let lock_ = self.rt.lock_run(&run_id)?;
        let state = self.stores.events.replay_run(&run_id).await?;
        let (settings, previous) = request.resume(&state)?;
        let (prepared, active) = self.prepare(&run_id, &request, settings, None).await?;
        let label = prepared.label.clone();
        let (this, id) = (self.clone(), run_id.clone());
        self.spawn(&run_id, active, async move {
            let outcome = prepared.resume(state, previous).await;
            this.finish(&id, outcome, lock_).await;
        });
        Ok(Started { run_id, new: true, label })
    }

    async fn prepare(
        self: &Arc<Self>,
        run_id: &RunId,
        request: &RunRequest,
        settings: crate::run::RunSettings,
        ask_timeout: Option<Duration>,
    ) -> Result<(Prepared, Arc<Active>)> {
        let active = Arc::new(Active {
            cancel: CancellationToken::new(),
            asks: Mutex::new(HashMap::new()),
            stop_reason: Arc::default(),
        });
        let prompter = Arc::new(ApiPrompter {
            run_id: run_id.clone(),
            store: self.stores.events.clone(),
            active: active.clone(),
            timeout: ask_timeout.unwrap_or(DEFAULT_ASK_TIMEOUT),
            publish: self.publish.clone(),
        });
        let sink = Arc::new(LiveSink { run_id: run_id.clone(), publish: self.publish.clone() });
        let io = RunIo { sink, prompter, cancel: active.cancel.clone(), gate: None };
        let policy = match self.policy.get() {
            Some(p) => p.clone(),
            None => {
                let compiled = crate::run::permission_policy(&self.rt)?;
                self.policy.get_or_init(|| compiled).clone()
            }
        };
        let events = self.stores.events.clone();
        let prepared = prepare_with_policy(&self.rt, events, &request.fallback, settings, io, Some(policy)).await?;
        Ok((prepared, active))
    }

    fn spawn(&self, run_id: &RunId, active: Arc<Active>, drive: impl Future<Output = ()> + Send + 'static) {
        let reason = active.stop_reason.clone();
        lock(&self.active).insert(run_id.clone(), active);
        let mut tasks = lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(descartes_core::STOP_REASON.scope(reason, drive)));
    }

    async fn finish(
        &self,
        run_id: &RunId,
        outcome: Result<RunOutcome, descartes_core::CoreError>,
        lock_: descartes_runtime::RunLock,
    ) {
        let guardrails = self.rt.snapshot_guardrails();
        match wrap_up(&self.rt, &self.stores, &guardrails, run_id).await {
            Ok(notices) => notices.iter().for_each(|n| tracing::warn!(run = %run_id, "{n}")),
            Err(e) => tracing::warn!(run = %run_id, error = %e, "cannot wrap up the run"),
        }
        match outcome {
            Ok(o) => tracing::info!(run = %run_id, outcome = ?crate::run::outcome_problem(run_id, &o), "run ended"),
            Err(e) => tracing::warn!(run = %run_id, error = %e, "run stopped"),
        }
        lock_.release();
        lock(&self.active).remove(run_id);
        (self.publish)(serde_json::json!({"type": "run_ended", "run_id": run_id}));
    }

    /// Starts a session (a conversation of turns in one stream, as `descartes chat` records
    /// it) with its first message; its id is the stream's.
    pub async fn create_session(self: &Arc<Self>, message: SessionMessage) -> Result<Delivered> {
        check_message(&message)?;
        self.rt.check_guardrails()?;
        let session_id = RunId::generate();
        lock(&self.sessions).insert(session_id.clone(), Busy::default());
        if let Err(e) = self.start_turn(&session_id, message, None).await {
            lock(&self.sessions).remove(&session_id);
            return Err(e);
        }
        Ok(Delivered { session_id, delivery: Delivery::Started })
    }

    /// Sends a message to session `id` (a full id or a unique prefix): its turn starts now, or,
    /// while a turn of the session is going, as `on_busy` says.
    pub async fn message(self: &Arc<Self>, id: &str, message: SessionMessage) -> Result<Delivered> {
        check_message(&message)?;
        let session_id = self.rt.resolve_run(&*self.stores.events, id).await?;
        {
            let mut sessions = lock(&self.sessions);
            if let Some(busy) = sessions.get_mut(&session_id) {
                let delivery = match message.on_busy {
                    OnBusy::Reject => {
                        return Err(fail(
                            Problem::Conflict,
                            format!(
                                "session {session_id} is answering a message; send it with on_busy `enqueue` (after \
                                 the running turn) or `interrupt` (instead of it)"
                            ),
                        ));
                    }
                    OnBusy::Enqueue => {
                        busy.queue.push_back(message);
                        Delivery::Queued { position: busy.queue.len() }
                    }
                    OnBusy::Interrupt => {
                        busy.queue.push_front(message);
                        busy.interrupt = true;
                        if let Some(active) = lock(&self.active).get(&session_id) {
                            interrupt(active);
                        }
                        Delivery::Interrupting
                    }
                };
                return Ok(Delivered { session_id, delivery });
            }
            if lock(&self.active).contains_key(&session_id) {
                return Err(fail(Problem::Conflict, format!("run {session_id} is running (not as a session)")));
            }
            sessions.insert(session_id.clone(), Busy::default());
        }
        let started = async {
            self.rt.check_guardrails()?;
            let state = self.stores.events.replay_run(&session_id).await?;
            if state.session.is_none() {
                return Err(fail(
                    Problem::Usage,
                    format!("{session_id} is a run, not a session; resume it with POST /v1/runs/{session_id}/resume"),
                ));
            }
            self.start_turn(&session_id, message, Some(state)).await
        };
        if let Err(e) = started.await {
            lock(&self.sessions).remove(&session_id);
            return Err(e);
        }
        Ok(Delivered { session_id, delivery: Delivery::Started })
    }

    /// Whether a turn of session `id` is going in this process.
    pub fn session_busy(&self, id: &RunId) -> bool {
        lock(&self.sessions).contains_key(id)
    }

    /// Builds the turn's agent and starts it; once it ends, the session's next message (if
    /// any) gets its turn.
    async fn start_turn(
        self: &Arc<Self>,
        session_id: &RunId,
        message: SessionMessage,
        state: Option<descartes_core::RunState>,
    ) -> Result<()> {
        let settings = match &state {
            None => message.request.new_run(&self.rt),
            Some(st) => turn_settings(&self.rt, &message.request, st)?,
        };
        let lock_ = self.rt.lock_run(session_id)?;
        let (prepared, active) = self.prepare(session_id, &message.request, settings, message.ask_timeout).await?;
        let not_a_model = || fail(Problem::Usage, "a session runs on a model provider, not on an agent CLI");
        let agent = prepared.into_agent().ok_or_else(not_a_model)?;
        let text = message.text;
        let (this, id) = (self.clone(), session_id.clone());
        let running = active.clone();
        self.spawn(session_id, active, async move {
            let goal = Message::user_text(&text);
            let outcome = match state {
                None => {
                    let session = SessionStarted { kind: "api".into(), context_files: Vec::new() };
                    agent.start_session(id.clone(), session, goal).await
                }
                Some(st) => agent.continue_session(st, goal).await,
            };
            this.finish(&id, outcome, lock_).await;
            this.next_turn(id);
        });
        // An interrupt that came before the turn could be stopped (it is stoppable now).
        let mut sessions = lock(&self.sessions);
        if sessions.get_mut(session_id).is_some_and(|b| std::mem::take(&mut b.interrupt)) {
            interrupt(&running);
        }
        Ok(())
    }

    /// Starts the next waiting turn of session `id`, or marks it idle.
    fn next_turn(self: Arc<Self>, id: RunId) {
        let next = {
            let mut sessions = lock(&self.sessions);
            let next = if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                None
            } else {
                sessions.get_mut(&id).and_then(|b| {
                    b.interrupt = false;
                    b.queue.pop_front()
                })
            };
            if next.is_none() {
                sessions.remove(&id);
            }
            next
        };
        let Some(message) = next else { return };
        // A task of its own: this one is the finished turn's.
        let task = tokio::spawn(async move {
            let started = async {
                let state = self.stores.events.replay_run(&id).await?;
                self.start_turn(&id, message, Some(state)).await
            };
            if let Err(e) = started.await {
                let message = format!("the queued message could not start: {e:#}");
                let text = descartes_core::redact::redact(&message).into_owned();
                tracing::warn!(session = %id, "{text}");
                (self.publish)(serde_json::json!({"type": "delta", "run_id": id, "kind": "notice", "text": text}));
                self.next_turn(id);
            }
        });
        drop(task);
    }

    /// The place's runtime (configuration, providers, policy).
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.rt
    }

    /// The place's stores (events, tasks, agents, audit).
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// Whether this process drives run `id` now.
    pub fn is_active(&self, id: &RunId) -> bool {
        lock(&self.active).contains_key(id)
    }

    /// Stops run `id`, which this process drives; it records `run_cancelled` and stays
    /// resumable.
    pub async fn cancel(&self, id: &str) -> Result<RunId> {
        let run_id = self.rt.resolve_run(&*self.stores.events, id).await?;
        let Some(active) = lock(&self.active).get(&run_id).cloned() else {
            return Err(fail(Problem::Conflict, format!("run {run_id} is not running in this server")));
        };
        active.cancel.cancel();
        Ok(run_id)
    }

    /// The asks of run `id` that wait for an answer.
    pub fn asks(&self, id: &RunId) -> Vec<Ask> {
        let Some(active) = lock(&self.active).get(id).cloned() else { return Vec::new() };
        let asks = lock(&active.asks);
        asks.values().map(|(a, _)| a.clone()).collect()
    }

    /// Answers the ask of tool call `call_id` in run `id`.
    pub async fn answer(&self, id: &str, call_id: &str, answer: Answer) -> Result<()> {
        let run_id = self.rt.resolve_run(&*self.stores.events, id).await?;
        let active = lock(&self.active).get(&run_id).cloned();
        let waiting = active.and_then(|a| lock(&a.asks).remove(call_id));
        let Some((_, tx)) = waiting else {
            return Err(fail(Problem::NotFound, format!("run {run_id} has no ask waiting for tool call {call_id}")));
        };
        let answer = match answer {
            Answer::Allow => PromptAnswer::AllowOnce,
            Answer::AllowForRun => PromptAnswer::AllowForRun,
            Answer::Deny => PromptAnswer::Deny,
        };
        tx.send(answer).map_err(|_| fail(Problem::Conflict, format!("the ask of tool call {call_id} has ended")))
    }

    /// Cancels every run this process drives and waits (at most `grace`) until each has
    /// recorded it.
    pub async fn shutdown(&self, grace: Duration) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        let actives: Vec<Arc<Active>> = lock(&self.active).values().cloned().collect();
        actives.iter().for_each(|a| a.cancel.cancel());
        let tasks: Vec<_> = std::mem::take(&mut *lock(&self.tasks));
        let _ = tokio::time::timeout(grace, futures_join(tasks)).await;
    }
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// Stops a session's running turn for a newer message.
fn interrupt(active: &Active) {
    *lock(&active.stop_reason) = Some(INTERRUPTED.to_owned());
    active.cancel.cancel();
}

fn check_message(message: &SessionMessage) -> Result<()> {
    if message.text.trim().is_empty() {
        return Err(fail(Problem::Usage, "the message is empty; say what the agent should do"));
    }
    Ok(())
}

/// The settings of a later turn of session `st`: its own provider, model, system prompt and
/// caps, unless `request` changes them.
fn turn_settings(rt: &Runtime, request: &RunRequest, st: &descartes_core::RunState) -> Result<crate::run::RunSettings> {
    let started = st.started.as_ref().ok_or_else(|| descartes_core::CoreError::RunNotFound(st.run_id.to_string()))?;
    let (provider, model) = match (&request.provider, &request.model) {
        (Some(p), m) => (Some(p.clone()), m.clone()),
        (None, Some(m)) => (Some(st.provider.clone()), Some(m.clone())),
        (None, None) => (Some(st.provider.clone()), Some(st.model.clone())),
    };
    Ok(crate::run::RunSettings {
        provider,
        model,
        auto_approve: request.yes || st.auto_approve,
        max_turns: request.max_turns.unwrap_or(rt.config.max_turns),
        cwd: std::path::PathBuf::from(&started.cwd),
        system_prompt: started.system_prompt.clone(),
        budget: descartes_core::Budget {
            max_tokens: request.max_tokens.or(st.budget.max_tokens),
            max_cost_usd: request.max_cost_usd.or(st.budget.max_cost_usd),
        },
    })
}

/// Asks through the API: the ask is an event, then the run waits for [`Service::answer`] or
/// the timeout (a deny).
struct ApiPrompter {
    run_id: RunId,
    store: Arc<dyn EventStore>,
    active: Arc<Active>,
    timeout: Duration,
    publish: Publish,
}

#[async_trait]
impl Prompter for ApiPrompter {
    async fn ask(&self, request: &PermissionRequest) -> PromptAnswer {
        let call_id = request.call_id.clone().unwrap_or_else(|| format!("ask-{}", Timestamp::now().as_micros()));
        let expires_at = Timestamp(Timestamp::now().as_micros() + self.timeout.as_micros() as i64);
        let ask =
            Ask { call_id: call_id.clone(), tool: request.tool.clone(), summary: request.summary.clone(), expires_at };
        let event = PermissionAsked {
            call_id: Some(call_id.clone()),
            tool: ask.tool.clone(),
            summary: ask.summary.clone(),
            expires_at,
        };
        // Durable before anyone can answer: a client sees the ask in the log.
        let (tx, rx) = oneshot::channel();
        lock(&self.active.asks).insert(call_id.clone(), (ask, tx));
        if let Err(e) = self.store.append(vec![NewEvent::new(&self.run_id, event)]).await {
            tracing::warn!(run = %self.run_id, error = %e, "cannot record the ask; denied");
            lock(&self.active.asks).remove(&call_id);
            return PromptAnswer::Deny;
        }
        (self.publish)(serde_json::json!({"type": "ask", "run_id": self.run_id, "call_id": call_id}));
        // A stop (cancel, shutdown) is the run's to handle: it drops this wait and records
        // `run_cancelled`, with no answer, so a resume asks again.
        let _forget = Forget { asks: &self.active.asks, call_id: &call_id };
        tokio::select! {
            a = rx => a.unwrap_or(PromptAnswer::Deny),
            () = tokio::time::sleep(self.timeout) => PromptAnswer::Deny,
        }
    }
}

/// The stream that records the run of an idempotency key: `request:` and the key's SHA-256
/// (keys are the client's text: any length, any characters).
fn request_stream(key: &str) -> RunId {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    RunId::from(format!("request:{hex}").as_str())
}

/// Removes an ask from the waiting ones when its wait ends, however it ends.
struct Forget<'a> {
    asks: &'a Mutex<HashMap<String, (Ask, oneshot::Sender<PromptAnswer>)>>,
    call_id: &'a str,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(self.asks).remove(self.call_id);
    }
}

/// A run's live output, published as deltas.
struct LiveSink {
    run_id: RunId,
    publish: Publish,
}

impl OutputSink for LiveSink {
    fn text_delta(&self, text: &str) {
        (self.publish)(serde_json::json!({"type": "delta", "run_id": self.run_id, "kind": "text", "text": text}));
    }
    fn attempt_ended(&self, kept: bool) {
        (self.publish)(
            serde_json::json!({"type": "delta", "run_id": self.run_id, "kind": "attempt_ended", "kept": kept}),
        );
    }
    fn notice(&self, message: &str) {
        let text = descartes_core::redact::redact(message);
        (self.publish)(serde_json::json!({"type": "delta", "run_id": self.run_id, "kind": "notice", "text": text}));
    }
}
