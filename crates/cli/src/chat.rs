//! `descartes chat`: the interactive REPL over a session (a durable run, see
//! `descartes_core::session`). Input comes from rustyline on a terminal (history in the state
//! directory) or, without a terminal, line by line from stdin. Ctrl-C cancels the answer in
//! progress (the turn is recorded as cancelled), Ctrl-D or `/exit` ends the chat.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use descartes_app::run::{RunIo, RunSettings};
use descartes_core::permission::NoPrompter;
use descartes_core::session::{ContextPolicy, compact, conversation_tokens};
use descartes_core::state::RunState;
use descartes_core::{Agent, Budget, EventStore, Prompter, RunOutcome, TokenCounter};
use descartes_protocol::{ContentPart, Message, MessagePinned, NewEvent, Role, RunId, SessionStarted};
use descartes_runtime::{RunLock, Runtime};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::output::{HumanSink, TerminalPrompter};

#[derive(Args, Debug, Clone, Default)]
pub struct ChatArgs {
    /// Model provider (`descartes providers` lists them).
    #[arg(short, long)]
    pub provider: Option<String>,
    /// Model name.
    #[arg(short, long)]
    pub model: Option<String>,
    /// Allow every permission ask (shell, write_file) in this session.
    #[arg(short = 'y', long)]
    pub yes: bool,
    /// Most model calls in one turn (at least 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_turns: Option<u32>,
    /// A rules file for this session only (repeatable), read after the global and project ones.
    #[arg(long = "rules", value_name = "FILE")]
    pub rules: Vec<PathBuf>,
}

const HELP: &str = "\
commands:
  /help              this help
  /model [NAME]      show or change the model (from the next message on)
  /provider [NAME]   show or change the provider
  /tools             the tools the model can use
  /clear             start a new session (this one stays in `descartes session list`)
  /compact           summarise the older turns now (it also happens at the configured threshold)
  /pin               keep the last message verbatim through compactions
  /rules             the rules and context files in the system prompt
  /cost              tokens and cost of this session
  /exit              leave (Ctrl-D too); Ctrl-C cancels the answer in progress
input: end a line with \\ to continue it; a ``` block continues until its closing ```";

/// The chat's state between turns.
struct Chat<'a> {
    rt: &'a Runtime,
    store: Arc<dyn EventStore>,
    agent: Agent,
    human: Arc<HumanSink>,
    args: ChatArgs,
    /// The session so far (`None` before its first message).
    state: Option<RunState>,
    run_id: RunId,
    lock: Option<RunLock>,
    system_prompt: String,
    context_files: Vec<String>,
    policy: ContextPolicy,
}

/// Starts a new chat, or continues `resume` (a session's folded state).
pub async fn run(rt: Runtime, args: ChatArgs, resume: Option<RunState>) -> Result<u8> {
    rt.check_guardrails()?;
    let guardrails = rt.snapshot_guardrails();
    let store = rt.open_store().await?;
    let (system_prompt, context_files) = match resume.as_ref().and_then(|s| s.started.as_ref()) {
        Some(started) => (started.system_prompt.clone().unwrap_or_default(), Vec::new()),
        None => {
            let (prompt, files) = descartes_app::run::system_prompt_with_rules(&rt, &rt.cwd, &args.rules)?;
            (prompt, files.iter().map(|p| p.display().to_string()).collect())
        }
    };
    let mut args = args;
    if let Some(st) = &resume {
        args.provider = args.provider.or_else(|| Some(st.provider.clone()));
        if args.model.is_none() && args.provider.as_deref() == Some(st.provider.as_str()) {
            args.model = Some(st.model.clone());
        }
        args.yes |= st.auto_approve;
    }
    let human = Arc::new(HumanSink::new());
    let agent = build_agent(&rt, store.clone(), &args, &system_prompt, human.clone()).await?;
    let c = &rt.config.context;
    let policy = ContextPolicy { window: c.window.max(1), compact_at: c.compact_at, keep_turns: c.keep_turns };
    let (run_id, lock) = match &resume {
        Some(st) => (st.run_id.clone(), Some(rt.lock_run(&st.run_id)?)),
        None => (RunId::generate(), None),
    };
    let mut chat =
        Chat { rt: &rt, store, agent, human, args, state: resume, run_id, lock, system_prompt, context_files, policy };
    let result = chat.repl().await;
    crate::commands::warn_guardrail_changes(&rt, &guardrails, chat.run_id.as_str());
    result
}

/// The agent a chat turn runs on.
async fn build_agent(
    rt: &Runtime,
    store: Arc<dyn EventStore>,
    args: &ChatArgs,
    system_prompt: &str,
    sink: Arc<HumanSink>,
) -> Result<Agent> {
    let not_a_model = |provider: &str| {
        anyhow::anyhow!(
            "`{provider}` is an agent CLI; `descartes chat` runs on a model provider (use `descartes run -p {provider}`)"
        )
    };
    let sel = rt.select(args.provider.as_deref(), args.model.as_deref())?;
    if sel.is_agent_cli() {
        return Err(not_a_model(&sel.provider));
    }
    let prompter: Arc<dyn Prompter> =
        if std::io::stderr().is_terminal() { Arc::new(TerminalPrompter) } else { Arc::new(NoPrompter) };
    let settings = RunSettings {
        provider: args.provider.clone(),
        model: args.model.clone(),
        auto_approve: args.yes,
        max_turns: args.max_turns.unwrap_or(rt.config.max_turns),
        cwd: rt.cwd.clone(),
        system_prompt: Some(system_prompt.to_owned()),
        budget: Budget { max_tokens: rt.config.budget.max_tokens, max_cost_usd: rt.config.budget.max_cost_usd },
    };
    let io = RunIo { sink, prompter, cancel: CancellationToken::new(), gate: None };
    let prepared = descartes_app::run::prepare(rt, store, &[], settings, io).await?;
    prepared.into_agent().ok_or_else(|| not_a_model(&sel.provider))
}

/// Where input lines come from.
enum Input {
    /// The editor, its history file, and the terminal's own mode (restored while an answer
    /// streams, so Ctrl-C interrupts it).
    Editor(Box<rustyline::DefaultEditor>, Option<PathBuf>, Option<nix::sys::termios::Termios>),
    Stdin(std::io::Lines<std::io::StdinLock<'static>>),
}

enum Read {
    Line(String),
    Interrupted,
    Eof,
}

impl Input {
    fn open(rt: &Runtime) -> Input {
        if std::io::stdin().is_terminal() {
            let config = rustyline::Config::builder().max_history_size(rt.config.chat.history_size).ok();
            let editor = match config {
                Some(b) => rustyline::DefaultEditor::with_config(b.auto_add_history(false).build()),
                None => rustyline::DefaultEditor::new(),
            };
            let mode = nix::sys::termios::tcgetattr(std::io::stdin()).ok();
            if let Ok(mut editor) = editor {
                let history = rt.places.state_dir.join("chat_history");
                let _ = editor.load_history(&history);
                return Input::Editor(Box::new(editor), Some(history), mode);
            }
        }
        Input::Stdin(std::io::stdin().lock().lines())
    }

    fn read_one(&mut self, prompt: &str) -> Read {
        match self {
            Input::Editor(editor, _, _) => match editor.readline(prompt) {
                Ok(line) => Read::Line(line),
                Err(rustyline::error::ReadlineError::Interrupted) => Read::Interrupted,
                Err(_) => Read::Eof,
            },
            Input::Stdin(lines) => match lines.next() {
                Some(Ok(line)) => Read::Line(line),
                _ => Read::Eof,
            },
        }
    }

    /// One message: continues after a trailing `\` and inside an open ``` block.
    fn read(&mut self) -> Read {
        let mut text = String::new();
        let mut prompt = "> ";
        loop {
            let line = match self.read_one(prompt) {
                Read::Line(l) => l,
                Read::Interrupted => return Read::Interrupted,
                Read::Eof if text.is_empty() => return Read::Eof,
                Read::Eof => break,
            };
            prompt = "… ";
            if let Some(stripped) = line.strip_suffix('\\') {
                text.push_str(stripped);
                text.push('\n');
                continue;
            }
            text.push_str(&line);
            let fences = text.lines().filter(|l| l.trim_start().starts_with("```")).count();
            if fences % 2 == 1 {
                text.push('\n');
                continue;
            }
            break;
        }
        if let Input::Editor(editor, _, _) = self
            && !text.trim().is_empty()
        {
            let _ = editor.add_history_entry(text.as_str());
        }
        Read::Line(text)
    }

    fn save(&mut self) {
        if let Input::Editor(editor, Some(path), _) = self {
            let _ = editor.save_history(path);
        }
    }

    /// Puts the terminal back in its own (cooked) mode: Ctrl-C is a signal again.
    fn cooked(&self) {
        if let Input::Editor(_, _, Some(mode)) = self {
            let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, mode);
        }
    }
}

impl Chat<'_> {
    async fn repl(&mut self) -> Result<u8> {
        let mut input = Input::open(self.rt);
        // After the editor: rustyline installs a SIGINT handler of its own when it is made
        // (Ctrl-C while typing is a key in raw mode anyway); ours must be the one in force.
        let mut interrupts = signal(SignalKind::interrupt()).context("cannot handle Ctrl-C")?;
        let interactive = matches!(input, Input::Editor(..));
        if interactive {
            let what = match &self.state {
                Some(st) => format!("resuming session {} ({} messages)", st.run_id, st.messages().len()),
                None => "new session".to_owned(),
            };
            eprintln!(
                "descartes chat · {}/{} · {what} · /help for commands, Ctrl-D to leave",
                self.agent.config.provider, self.agent.config.model
            );
        }
        loop {
            let text = match input.read() {
                Read::Line(t) => t,
                Read::Interrupted => {
                    eprintln!("(Ctrl-D or /exit leaves the chat)");
                    continue;
                }
                Read::Eof => break,
            };
            let trimmed = text.trim();
            if trimmed.is_empty() {
                continue;
            }
            if let Some(command) = trimmed.strip_prefix('/') {
                match self.command(command).await {
                    Ok(Flow::Exit) => break,
                    Ok(Flow::Continue) => continue,
                    Ok(Flow::Send(prompt)) => {
                        input.cooked();
                        self.turn(prompt, &mut interrupts).await?
                    }
                    Err(e) => eprintln!("descartes: {e:#}"),
                }
                continue;
            }
            input.cooked();
            self.turn(text, &mut interrupts).await?;
        }
        input.save();
        self.store.flush().await?;
        if self.state.is_some() {
            eprintln!(
                "descartes: session {} saved; `descartes session resume {}` continues it",
                self.run_id, self.run_id
            );
        }
        self.end_session();
        Ok(0)
    }

    fn end_session(&mut self) {
        self.rt.clean_spool(&self.run_id);
        if let Some(lock) = self.lock.take() {
            lock.release();
        }
    }

    /// One turn: the user's message, the agent loop until the model answers. Ctrl-C cancels it.
    async fn turn(&mut self, text: String, interrupts: &mut Signal) -> Result<()> {
        self.compact_if_needed(&text).await?;
        let cancel = CancellationToken::new();
        self.agent.cancel = cancel.clone();
        let message = Message::user_text(text);
        if self.lock.is_none() {
            self.lock = Some(self.rt.lock_run(&self.run_id)?);
        }
        let agent = &self.agent;
        let previous = self.state.take();
        let run_id = self.run_id.clone();
        let context_files = self.context_files.clone();
        let run = async move {
            match previous {
                Some(st) => agent.continue_session(st, message).await,
                None => {
                    let session = SessionStarted { kind: "chat".into(), context_files };
                    agent.start_session(run_id, session, message).await
                }
            }
        };
        tokio::pin!(run);
        let outcome = loop {
            tokio::select! {
                r = &mut run => break r,
                _ = interrupts.recv() => cancel.cancel(),
            }
        };
        self.human.end_line();
        match outcome {
            Ok(RunOutcome::Completed { .. }) => {}
            Ok(RunOutcome::Cancelled) => eprintln!("descartes: answer cancelled (the session goes on)"),
            Ok(RunOutcome::Failed { error, .. }) => eprintln!("descartes: the turn failed: {error}"),
            Ok(RunOutcome::BudgetExceeded { error }) => eprintln!("descartes: stopped: {error}"),
            Err(e) => eprintln!("descartes: the turn failed: {e}"),
        }
        self.state = Some(self.store.replay_run(&self.run_id).await?);
        Ok(())
    }

    /// Compacts before a turn when the conversation with the next message reaches the
    /// threshold.
    async fn compact_if_needed(&mut self, next: &str) -> Result<()> {
        let Some(st) = &self.state else { return Ok(()) };
        let counter = self.agent.resilience.counter.clone();
        let tokens = conversation_tokens(counter.as_ref(), Some(&self.system_prompt), st.messages())
            + counter.count_messages(&[Message::user_text(next)]);
        if tokens >= self.policy.threshold() {
            self.compact("threshold", counter).await?;
        }
        Ok(())
    }

    async fn compact(&mut self, trigger: &str, counter: Arc<dyn TokenCounter>) -> Result<()> {
        let Some(st) = &mut self.state else {
            eprintln!("descartes: nothing to compact yet");
            return Ok(());
        };
        let planned = compact(
            st,
            self.agent.provider.as_ref(),
            &self.agent.config.model,
            counter.as_ref(),
            Some(&self.system_prompt),
            &self.policy,
            trigger,
        )
        .await;
        let Some((event, error)) = planned else {
            eprintln!("descartes: nothing to compact (only the last {} turns)", self.policy.keep_turns);
            return Ok(());
        };
        if let Some(e) = error {
            eprintln!("descartes: the summary failed ({e}); the older turns are dropped instead");
        }
        eprintln!(
            "descartes: context compacted: {} messages {} ({} → {} tokens)",
            event.replaced,
            if event.method == "summary" { "summarised" } else { "dropped" },
            event.tokens_before,
            event.tokens_after
        );
        let written = self.store.append(vec![NewEvent::new(&self.run_id, event)]).await?;
        for e in written {
            st.apply_owned(e.seq, e.data);
        }
        Ok(())
    }

    async fn command(&mut self, line: &str) -> Result<Flow> {
        let (name, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        let mut out = std::io::stdout().lock();
        match name {
            "help" | "?" => {
                writeln!(out, "{HELP}")?;
                if !self.rt.config.prompts.is_empty() {
                    writeln!(out, "saved prompts (from config [prompts]):")?;
                    for (name, text) in &self.rt.config.prompts {
                        writeln!(out, "  /{name:<17} {}", crate::output::clip_line(text, 60))?;
                    }
                }
            }
            "exit" | "quit" | "q" => return Ok(Flow::Exit),
            "model" | "provider" if rest.is_empty() => {
                writeln!(out, "{}/{}", self.agent.config.provider, self.agent.config.model)?;
            }
            "model" | "provider" => {
                let mut args = self.args.clone();
                if name == "model" {
                    args.provider = Some(self.agent.config.provider.clone());
                    args.model = Some(rest.to_owned());
                } else {
                    args.provider = Some(rest.to_owned());
                    args.model = None;
                }
                drop(out);
                let agent =
                    build_agent(self.rt, self.store.clone(), &args, &self.system_prompt, self.human.clone()).await?;
                self.agent = agent;
                self.args = args;
                eprintln!("descartes: now on {}/{}", self.agent.config.provider, self.agent.config.model);
            }
            "tools" => {
                for spec in self.agent.tools.specs() {
                    let first = spec.description.lines().next().unwrap_or("");
                    writeln!(out, "  {:<14} {}", spec.name, crate::output::clip_line(first, 90))?;
                }
            }
            "clear" | "new" => {
                drop(out);
                self.end_session();
                self.state = None;
                self.run_id = RunId::generate();
                eprintln!("descartes: new session");
            }
            "compact" => {
                drop(out);
                let counter = self.agent.resilience.counter.clone();
                self.compact("command", counter).await?;
            }
            "pin" => {
                drop(out);
                let Some(st) = &mut self.state else {
                    eprintln!("descartes: nothing to pin yet");
                    return Ok(Flow::Continue);
                };
                let Some(index) = st.messages().iter().rposition(|m| {
                    m.role == Role::User && m.content.iter().any(|p| matches!(p, ContentPart::Text { .. }))
                }) else {
                    return Ok(Flow::Continue);
                };
                let pin = MessagePinned { index: index as u64 };
                for e in self.store.append(vec![NewEvent::new(&self.run_id, pin)]).await? {
                    st.apply_owned(e.seq, e.data);
                }
                eprintln!("descartes: pinned message {index}");
            }
            "rules" => {
                if self.context_files.is_empty() {
                    writeln!(out, "no rules or context files in the system prompt")?;
                }
                for f in &self.context_files {
                    writeln!(out, "  {f}")?;
                }
            }
            "cost" => {
                let counter = self.agent.resilience.counter.clone();
                match &self.state {
                    None => writeln!(out, "nothing spent yet")?,
                    Some(st) => {
                        let context = conversation_tokens(counter.as_ref(), Some(&self.system_prompt), st.messages());
                        writeln!(
                            out,
                            "{} model calls · {} tokens ({} in, {} out) · {} · context {} of {} tokens ({} \
                             messages, {} compactions)",
                            st.turns,
                            st.usage.all_tokens(),
                            st.usage.input_tokens,
                            st.usage.output_tokens,
                            if st.cost_usd > 0.0 { format!("${:.4}", st.cost_usd) } else { "no known cost".into() },
                            context,
                            self.policy.window,
                            st.messages().len(),
                            st.compactions
                        )?;
                    }
                }
            }
            other => match self.rt.config.prompts.get(other) {
                Some(text) if rest.is_empty() => return Ok(Flow::Send(text.clone())),
                Some(text) => return Ok(Flow::Send(format!("{text}\n\n{rest}"))),
                None => writeln!(out, "unknown command /{other}; /help lists them")?,
            },
        }
        Ok(Flow::Continue)
    }
}

enum Flow {
    Continue,
    Exit,
    /// Send this message (a saved prompt).
    Send(String),
}
