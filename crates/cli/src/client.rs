//! `descartes --server URL ...` (or `DESCARTES_SERVER`): `run`, `resume`, `list`, `logs` and
//! the `task` commands the API covers (`create`, `list`, `show`, `cancel`, `retry`, `approve`,
//! `diff`, `merge`, `discard`) talk to a running `descartes serve` (or `daemon start --listen`)
//! instead of opening the database, so a team shares one server. The output and the exit codes
//! are the local ones: the same printers, and the server's error codes map back to the same
//! problems (`descartes_app::Problem`). The rest says it needs the database (exit 2).
//!
//! The token: `DESCARTES_SERVER_TOKEN`, else the place's own `server.token` (a server on this
//! machine, in this project).

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Result;
use descartes_app::tasks::TaskShown;
use descartes_app::{Problem, fail};
use descartes_core::permission::{NoPrompter, PermissionRequest, PromptAnswer, Prompter};
use descartes_core::{OutputSink, RunOutcome, TaskError};
use descartes_protocol::{Event, EventData, RunId, Task};
use descartes_runtime::Runtime;
use descartes_server::ApproveTask;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::commands::{LogPrinter, RunRow, ctrl_c_token, print_runs};
use crate::output::{HumanSink, JsonSink, TerminalPrompter};
use crate::task_cmd::{
    TaskCommand, print_approved, print_created, print_diff, print_discarded, print_merged, print_shown, print_tasks,
};
use crate::{Command, ModelArgs};

/// A server's API, as a client.
pub struct Remote {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Remote {
    /// The server at `url`, with its token (see the module doc).
    pub fn new(url: &str, rt: &Runtime) -> Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(fail(
                Problem::Usage,
                format!("--server {url}: write the server's URL, e.g. http://127.0.0.1:7878"),
            ));
        }
        let token = match std::env::var("DESCARTES_SERVER_TOKEN").ok().filter(|t| !t.trim().is_empty()) {
            Some(t) => t.trim().to_owned(),
            None => {
                let file = rt.places.state_dir.join(descartes_runtime::serve::SERVER_TOKEN_FILE);
                std::fs::read_to_string(&file).map(|t| t.trim().to_owned()).map_err(|_| {
                    fail(
                        Problem::Usage,
                        "the server's token is needed: set DESCARTES_SERVER_TOKEN (`descartes serve --print-token` \
                         prints it on the server's machine)",
                    )
                })?
            }
        };
        descartes_core::redact::register(&token);
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| fail(Problem::Internal, format!("cannot make an HTTP client: {e}")))?;
        Ok(Self { base, token, http })
    }

    /// A request to the API: the body of its answer; an error answer becomes the problem its
    /// code names.
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Vec<u8>> {
        let mut request = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(b) = body {
            request = request.json(&b);
        }
        let response = request.send().await.map_err(|e| {
            fail(Problem::Store, format!("cannot reach the server at {}: {}", self.base, e.without_url()))
        })?;
        let status = response.status();
        let bytes = response.bytes().await.unwrap_or_default().to_vec();
        if status.is_success() {
            return Ok(bytes);
        }
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let code = value["error"]["code"].as_str().unwrap_or("internal");
        let message =
            value["error"]["message"].as_str().map_or_else(|| format!("the server answered {status}"), str::to_owned);
        Err(fail(Problem::from_code(code).unwrap_or(Problem::Internal), message))
    }

    /// A request to the API whose answer is JSON.
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let bytes = self.send(method, path, body).await?;
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Option<Value>) -> Result<Value> {
        self.call(reqwest::Method::POST, path, body).await
    }
}

/// `s` as one segment of a path or as a query value.
fn encoded(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(char::from(b)),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// What works through a server.
const SERVED: &str = "run, resume, list, logs and task create, list, show, cancel, retry, approve, diff, merge and \
                      discard do";

/// The refusal of a command that needs the database itself.
fn not_served(command: &str) -> anyhow::Error {
    fail(
        Problem::Usage,
        format!("`descartes {command}` does not work with --server ({SERVED}); run it where the server's database is"),
    )
}

/// Runs `command` against the server; the commands that need the database itself say so.
pub async fn dispatch(remote: Remote, command: Command) -> Result<u8> {
    match command {
        Command::Run(args) => run(&remote, &args.model, Start::New(args.prompt.join(" "))).await,
        Command::Resume(args) => run(&remote, &args.model, Start::Resume(args.id)).await,
        Command::List { json } => list(&remote, json).await,
        Command::Logs { id, follow, json } => logs(&remote, id, follow, json).await,
        Command::Task { command } => task(&remote, command).await,
        other => Err(not_served(&command_name(&other))),
    }
}

/// The name of a command (or subcommand): its variant's.
fn command_name(c: &impl std::fmt::Debug) -> String {
    let debug = format!("{c:?}");
    debug.split(|ch: char| !ch.is_alphanumeric()).next().unwrap_or("").to_lowercase()
}

/// The path of task `id` (a full id or a unique prefix) and `then` under it.
fn task_path(id: &str, then: &str) -> Result<String> {
    if id.is_empty() {
        // No route names it; the local command's answer.
        return Err(TaskError::NotFound(String::new()).into());
    }
    Ok(format!("/v1/tasks/{}{then}", encoded(id)))
}

/// `task ...` through the server's `/v1/tasks` routes, printed as the local command prints.
async fn task(remote: &Remote, command: TaskCommand) -> Result<u8> {
    let text = |v: &Value, key: &str| v[key].as_str().unwrap_or_default().to_owned();
    match command {
        TaskCommand::Create(a) => {
            let json = a.json;
            let body = serde_json::to_value(a.request())?;
            let t: Task = serde_json::from_value(remote.post("/v1/tasks", Some(body)).await?)?;
            print_created(&t, json)
        }
        TaskCommand::List { status, label, json } => {
            let mut query: Vec<String> = Vec::new();
            if let Some(s) = status {
                query.push(format!("status={}", encoded(s.as_str())));
            }
            if let Some(l) = &label {
                query.push(format!("label={}", encoded(l)));
            }
            let path = if query.is_empty() { "/v1/tasks".to_owned() } else { format!("/v1/tasks?{}", query.join("&")) };
            let list: Vec<Task> = serde_json::from_value(remote.get(&path).await?)?;
            print_tasks(&list, json)
        }
        TaskCommand::Show { id, json, evidence } => {
            let shown = TaskShown::from_json(&remote.get(&task_path(&id, "")?).await?)?;
            let evidence = match evidence {
                true => Some(remote.get(&task_path(&shown.task.id, "/evidence")?).await?),
                false => None,
            };
            print_shown(&shown, evidence.as_ref(), json)
        }
        TaskCommand::Cancel { id } => {
            remote.post(&task_path(&id, "/cancel")?, None).await?;
            Ok(0)
        }
        TaskCommand::Retry { id } => {
            remote.post(&task_path(&id, "/retry")?, None).await?;
            Ok(0)
        }
        TaskCommand::Approve { id, stage } => {
            let body = serde_json::to_value(ApproveTask { stage })?;
            let approved = remote.post(&task_path(&id, "/approve")?, Some(body)).await?;
            print_approved(&text(&approved, "stage"), &text(&approved, "task_id"))
        }
        TaskCommand::Diff { id } => {
            print_diff(&remote.send(reqwest::Method::GET, &task_path(&id, "/diff")?, None).await?)
        }
        TaskCommand::Merge { id } => {
            let m = remote.post(&task_path(&id, "/merge")?, None).await?;
            print_merged(&text(&m, "branch"), &text(&m, "into"), &text(&m, "kind"), &text(&m, "commit"))
        }
        TaskCommand::Discard { id } => {
            let d = remote.post(&task_path(&id, "/discard")?, None).await?;
            print_discarded(&text(&d, "branch"), &text(&d, "path"))
        }
        other => Err(not_served(&format!("task {}", command_name(&other)))),
    }
}

async fn list(remote: &Remote, json: bool) -> Result<u8> {
    let mut rows: Vec<RunRow> = Vec::new();
    let mut offset = 0usize;
    loop {
        let page = remote.get(&format!("/v1/runs?limit=1000&offset={offset}")).await?;
        rows.extend(serde_json::from_value::<Vec<RunRow>>(page["runs"].clone())?);
        match page["next_offset"].as_u64() {
            Some(next) => offset = next as usize,
            None => break,
        }
    }
    print_runs(&rows, json)
}

async fn logs(remote: &Remote, id: Option<String>, follow: bool, json: bool) -> Result<u8> {
    let run = match &id {
        Some(prefix) => {
            let run = remote.get(&format!("/v1/runs/{}", encoded(prefix))).await?;
            Some(RunId::from(run["run_id"].as_str().unwrap_or_default()))
        }
        None => None,
    };
    let stop = ctrl_c_token();
    let mut printer = LogPrinter::new(run.clone(), json);
    let mut after = 0i64;
    loop {
        let path = match &run {
            Some(r) => format!("/v1/events?stream={r}&after={after}&limit=1000"),
            None => format!("/v1/events?after={after}&limit=1000"),
        };
        let page = remote.get(&path).await?;
        // Events read from their text (their payloads are kept raw).
        let batch: Vec<Event> = serde_json::from_str(&page["events"].to_string())?;
        after = page["cursor"].as_i64().unwrap_or(after);
        let ended = printer.print(&batch)?;
        if batch.len() == 1000 {
            continue;
        }
        if !follow || (run.is_some() && ended) || stop.is_cancelled() {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
            () = stop.cancelled() => break,
        }
    }
    printer.finish(follow);
    Ok(0)
}

enum Start {
    New(String),
    Resume(String),
}

/// `run` and `resume` through the server: the run is started (or resumed) over the WebSocket
/// and followed there, its output printed as a local run prints it, its asks answered here (on
/// the terminal; without one, denied); Ctrl-C cancels it. A dropped connection is taken up
/// again after the last event received.
async fn run(remote: &Remote, args: &ModelArgs, start: Start) -> Result<u8> {
    let human = (!args.json).then(|| Arc::new(HumanSink::new()));
    let sink: Arc<dyn OutputSink> = match &human {
        Some(h) => h.clone(),
        None => Arc::new(JsonSink),
    };
    let prompter: Arc<dyn Prompter> =
        if std::io::stderr().is_terminal() { Arc::new(TerminalPrompter) } else { Arc::new(NoPrompter) };
    let mut settings = json!({"auto_approve": args.yes});
    for (key, v) in [
        ("provider", args.provider.clone().map(Value::from)),
        ("model", args.model.clone().map(Value::from)),
        ("max_turns", args.max_turns.map(Value::from)),
        ("max_tokens", args.max_tokens.map(Value::from)),
        ("max_cost_usd", args.max_cost_usd.map(Value::from)),
    ] {
        if let Some(v) = v {
            settings[key] = v;
        }
    }
    let request = match start {
        Start::New(prompt) => {
            if prompt.trim().is_empty() {
                return Err(fail(Problem::Usage, "the prompt is empty; say what the agent should do"));
            }
            settings["prompt"] = prompt.into();
            if !args.fallback.is_empty() {
                settings["fallback"] = json!(args.fallback);
            }
            json!({"type": "start_run", "run": settings, "subscribe": true})
        }
        Start::Resume(id) => json!({"type": "resume_run", "run_id": id, "run": settings, "subscribe": true}),
    };
    let mut follow = Follow { sink: &*sink, prompter: &*prompter, run_id: None, after: 0, json: args.json };
    let outcome = follow.run(remote, request).await;
    if let Some(h) = &human {
        h.end_line();
    }
    let outcome = outcome?;
    let run_id = RunId::from(follow.run_id.unwrap_or_default().as_str());
    Ok(match descartes_app::run::outcome_problem(&run_id, &outcome) {
        None => 0,
        Some((problem, message)) => {
            eprintln!("descartes: {message}");
            problem.exit_code()
        }
    })
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A run followed over the WebSocket.
struct Follow<'a> {
    sink: &'a dyn OutputSink,
    prompter: &'a dyn Prompter,
    run_id: Option<String>,
    /// The last event received.
    after: i64,
    json: bool,
}

/// What one connection ended with.
enum Ended {
    Run(RunOutcome),
    /// The connection was lost or the client lagged: take up again after the last event.
    Again,
}

impl Follow<'_> {
    async fn run(&mut self, remote: &Remote, first: Value) -> Result<RunOutcome> {
        let mut request = first;
        let mut tries = 0;
        loop {
            let mut ws = connect(remote).await?;
            ws.send(Message::text(request.to_string())).await?;
            match self.receive(&mut ws).await? {
                Ended::Run(outcome) => {
                    let _ = ws.close(None).await;
                    return Ok(outcome);
                }
                Ended::Again if tries < 5 && self.run_id.is_some() => {
                    tries += 1;
                    let run = self.run_id.clone().unwrap_or_default();
                    request = json!({"type": "subscribe", "stream": run, "after": self.after});
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Ended::Again => {
                    return Err(fail(Problem::Store, "the server closed the connection before the run ended"));
                }
            }
        }
    }

    async fn receive(&mut self, ws: &mut Socket) -> Result<Ended> {
        let stop = ctrl_c_token();
        let mut cancelled = false;
        loop {
            let message = tokio::select! {
                m = ws.next() => m,
                () = stop.cancelled(), if !cancelled && self.run_id.is_some() => {
                    cancelled = true;
                    eprintln!("\ndescartes: stopping (press Ctrl-C again to quit at once)");
                    let cancel = json!({"type": "cancel", "run_id": self.run_id});
                    ws.send(Message::text(cancel.to_string())).await?;
                    continue;
                }
            };
            let text = match message {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ok(Ended::Again),
                Some(Ok(_)) => continue,
            };
            let frame: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
            if let Some(ended) = self.frame(ws, &frame).await? {
                return Ok(ended);
            }
        }
    }

    /// Handles one frame; `Some` when the connection is done.
    async fn frame(&mut self, ws: &mut Socket, frame: &Value) -> Result<Option<Ended>> {
        match frame["type"].as_str() {
            Some("run_started") => {
                let id = frame["run_id"].as_str().unwrap_or_default().to_owned();
                if !self.json {
                    eprintln!("descartes: run {id} · {}", frame["label"].as_str().unwrap_or_default());
                }
                self.run_id = Some(id);
            }
            Some("delta") => match frame["kind"].as_str() {
                Some("text") => self.sink.text_delta(frame["text"].as_str().unwrap_or_default()),
                Some("attempt_ended") => self.sink.attempt_ended(frame["kept"].as_bool().unwrap_or(true)),
                Some("notice") => self.sink.notice(frame["text"].as_str().unwrap_or_default()),
                _ => {}
            },
            Some("event") => {
                let event: Event = serde_json::from_str(&frame["event"].to_string())?;
                self.after = event.seq;
                self.sink.event(&event);
                if let EventData::PermissionAsked(ask) = &event.data {
                    self.answer(ws, ask).await?;
                }
                if let Some(outcome) = descartes_app::run::ending(&event.data) {
                    return Ok(Some(Ended::Run(outcome)));
                }
            }
            Some("lagged") => return Ok(Some(Ended::Again)),
            Some("end") => {
                let run = self.run_id.clone().unwrap_or_default();
                return Err(fail(Problem::Store, format!("the server stopped; run {run} can be resumed")));
            }
            Some("error") => {
                let code = frame["code"].as_str().unwrap_or("internal");
                let message = frame["message"].as_str().unwrap_or("the server refused a request").to_owned();
                return Err(fail(Problem::from_code(code).unwrap_or(Problem::Internal), message));
            }
            _ => {}
        }
        Ok(None)
    }

    /// Asks here (the terminal, or nobody: a deny) and answers the server.
    async fn answer(&self, ws: &mut Socket, ask: &descartes_protocol::PermissionAsked) -> Result<()> {
        let request = PermissionRequest {
            call_id: ask.call_id.clone(),
            tool: ask.tool.clone(),
            input: Value::Null,
            summary: ask.summary.clone(),
        };
        let decision = match self.prompter.ask(&request).await {
            PromptAnswer::AllowOnce => "allow",
            PromptAnswer::AllowForRun => "allow_for_run",
            PromptAnswer::Deny | PromptAnswer::Unavailable => "deny",
        };
        let answer = json!({"type": "answer", "run_id": self.run_id, "call_id": ask.call_id, "decision": decision});
        ws.send(Message::text(answer.to_string())).await?;
        Ok(())
    }
}

/// The server's WebSocket, with the token.
async fn connect(remote: &Remote) -> Result<Socket> {
    let url = format!("{}/v1/ws", remote.base.replacen("http", "ws", 1));
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| fail(Problem::Usage, format!("--server {}: {e}", remote.base)))?;
    let auth = format!("Bearer {}", remote.token)
        .parse()
        .map_err(|_| fail(Problem::Usage, "the server's token is not a valid header value"))?;
    request.headers_mut().insert("authorization", auth);
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| fail(Problem::Store, format!("cannot open the WebSocket of {}: {e}", remote.base)))?;
    Ok(ws)
}
