//! Gemini CLI, driven through its Agent Client Protocol mode (`gemini --acp`: JSON-RPC 2.0 over
//! stdio) so that Descartes decides every tool call before it runs.
//!
//! The conversation (checked against the pinned CLI, see `docs/PROTOCOLS.md`):
//! - `initialize` (`protocolVersion: 1`, no `fs` or terminal capability: Gemini CLI reads and
//!   writes files itself), then `session/new` (`cwd`, `mcpServers: []`) or, to continue a
//!   session, `session/load` (`sessionId`, `cwd`, `mcpServers`); then `session/prompt`
//!   (`prompt: [{type: "text", text}]`), whose result (`stopReason`, usage in
//!   `_meta.quota.token_count`) ends the invocation;
//! - `session/update` notifications: `agent_message_chunk`, `agent_thought_chunk`, `tool_call`,
//!   `tool_call_update` (`status` `completed` / `failed`, `content`);
//! - the CLI's request `session/request_permission` (`toolCall`: `toolCallId`, `title` (a
//!   shell call's command), `kind`, `locations`; `options`), answered with the `allow_once`
//!   or `reject_once` option once the decision is recorded. Descartes never picks
//!   `allow_always` (it would let later calls of the tool skip it).
//!
//! Gemini CLI asks only for the calls its policy engine says `ask_user` for, and allows
//! read-only tools and "safe" shell commands by itself. Descartes passes it a policy
//! (`--admin-policy` and `--policy`, [`ASK_ALL_POLICY`]) that asks for every tool, shell
//! commands included, at the highest tier. Its tools are named as Descartes' own for the
//! policy: `run_shell_command` is `shell` (`command`), `write_file` / `replace` are
//! `write_file` / `edit_file` (`path`), `read_file`, `list_directory` (`list_files`),
//! `glob` / `grep_search` (`search_files`), `web_fetch` (`http_request`). The workspace's own
//! Gemini settings (MCP servers, hooks) are not trusted (`GEMINI_CLI_TRUST_WORKSPACE=false`
//! unless set for the backend). Tokens are reported, money is not.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use descartes_core::{AgentCli, CliAnswer, CliEvent, CliPermissionRequest, CliRequest, CliSession, ProviderError};
use descartes_protocol::{ContentPart, Usage};
use serde_json::{Value, json};

use crate::command::full_prompt;
use crate::process::CliProcess;
use crate::rpc::{self, Rpc, id_key};
use crate::session::{Decoded, Decoder, ProcessSession};
use crate::{CliOptions, str_of, u64_of};

pub const INSTALL_HINT: &str = "npm install -g @google/gemini-cli";

/// Gemini CLI's policy that asks before every tool: a shell rule with `argsPattern` (which
/// turns off its "safe command" shortcut) and a wildcard for every other tool.
pub const ASK_ALL_POLICY: &str = r#"# Written by Descartes: every tool call is asked, and Descartes decides it.
[[rule]]
toolName = "run_shell_command"
argsPattern = "[\\s\\S]*"
decision = "ask_user"
priority = 999

[[rule]]
toolName = "*"
decision = "ask_user"
priority = 998
"#;

/// The `gemini-cli` backend.
#[derive(Debug, Clone, Default)]
pub struct GeminiCli {
    pub options: CliOptions,
}

impl GeminiCli {
    pub fn new(options: CliOptions) -> Self {
        Self { options }
    }

    /// The command line for a request (without the program), with the policy file.
    pub fn args(&self, request: &CliRequest, policy: &Path) -> Vec<String> {
        let policy = policy.display().to_string();
        let mut args: Vec<String> =
            vec!["--acp".into(), "--admin-policy".into(), policy.clone(), "--policy".into(), policy];
        if let Some(model) = &request.model {
            args.extend(["-m".into(), model.clone()]);
        }
        args.extend(self.options.extra_args.iter().cloned());
        args
    }

    /// The CLI's home (where its sessions are kept).
    fn home(&self) -> Option<PathBuf> {
        let set = self.options.env.iter().rev().find(|(k, _)| k == "HOME").map(|(_, v)| PathBuf::from(v));
        set.or_else(|| if self.options.clear_env { None } else { std::env::var_os("HOME").map(PathBuf::from) })
    }
}

#[async_trait]
impl AgentCli for GeminiCli {
    fn name(&self) -> &str {
        "gemini-cli"
    }

    async fn start(&self, request: CliRequest) -> Result<Box<dyn CliSession>, ProviderError> {
        let policy = write_policy(self.home().as_deref()).map_err(|e| ProviderError::Config {
            provider: self.name().into(),
            message: format!("cannot write the policy file for Gemini CLI: {e}"),
        })?;
        if let (Some(id), Some(home)) = (&request.resume_session, self.home()) {
            settle_session(&home, id).await;
        }
        let program = self.options.program_or("gemini");
        let mut spawn =
            self.options.spawn(self.name(), program, self.args(&request, &policy), &request.cwd, INSTALL_HINT.into());
        // Defaults, before the backend's own variables (which may override them).
        let defaults = [("GEMINI_CLI_NO_RELAUNCH", "true"), ("GEMINI_CLI_TRUST_WORKSPACE", "false")];
        spawn.env.splice(0..0, defaults.iter().map(|(k, v)| ((*k).into(), (*v).into())));
        let mut decoder = GeminiDecoder::new(request);
        spawn.stdin = Some(decoder.initialize() + "\n");
        spawn.keep_stdin = true;
        let process = CliProcess::spawn(spawn).await?;
        Ok(Box::new(ProcessSession::new(process, decoder)))
    }
}

/// Writes [`ASK_ALL_POLICY`] under the CLI's home (`~/.cache/descartes/gemini/`), or the
/// temporary directory without one; returns its path.
fn write_policy(home: Option<&Path>) -> std::io::Result<PathBuf> {
    let dir = match home {
        Some(h) => h.join(".cache/descartes/gemini"),
        None => {
            // A directory of our own (mode 0700, created now: never one someone else made).
            use std::os::unix::fs::DirBuilderExt;
            let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            let dir = std::env::temp_dir().join(format!("descartes-gemini-{}-{nanos}", std::process::id()));
            std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
            dir
        }
    };
    let path = dir.join("ask-all.toml");
    if std::fs::read_to_string(&path).is_ok_and(|t| t == ASK_ALL_POLICY) {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!("ask-all.{}.tmp", std::process::id()));
    std::fs::write(&tmp, ASK_ALL_POLICY)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Gemini CLI cannot load a session in the clock minute it was written in (its lookup misses
/// it, and the session's history is lost): waits for the minute to turn when the session's
/// file was written in the current one.
async fn settle_session(home: &Path, id: &str) {
    let short = id.get(..8).unwrap_or(id);
    let Ok(projects) = std::fs::read_dir(home.join(".gemini/tmp")) else { return };
    let mut newest: Option<SystemTime> = None;
    for project in projects.flatten() {
        let Ok(chats) = std::fs::read_dir(project.path().join("chats")) else { continue };
        for chat in chats.flatten() {
            let name = chat.file_name().to_string_lossy().into_owned();
            if name.contains(short)
                && let Ok(modified) = chat.metadata().and_then(|m| m.modified())
            {
                newest = newest.max(Some(modified));
            }
        }
    }
    let minute = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 60);
    let Some(written) = newest else { return };
    let now = SystemTime::now();
    if minute(now) == minute(written) {
        let into = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() % 60);
        tokio::time::sleep(Duration::from_secs(60 - into) + Duration::from_millis(200)).await;
    }
}

/// Our requests awaiting their answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Initialize,
    Session,
    Prompt,
}

/// The ACP conversation of one invocation.
#[derive(Debug)]
pub struct GeminiDecoder {
    request: CliRequest,
    rpc: Rpc,
    calls: HashMap<u64, Call>,
    session: Option<String>,
    /// A loaded session's history is being replayed (until its `available_commands_update`,
    /// which Gemini CLI sends after the replay): already recorded, not recorded again.
    replaying: bool,
    /// Tool calls reported so far.
    tools: HashSet<String>,
    /// Tool calls Descartes was asked about.
    asked: HashSet<String>,
    /// Permission requests awaiting Descartes' answer: our key → (their id, allow option,
    /// reject option).
    approvals: HashMap<String, (Value, String, String)>,
    /// Calls refused since the last event: their results (Gemini CLI reports none).
    refused: Vec<String>,
    /// The answer's text since the last tool call, and the thinking before it.
    text: String,
    thinking: String,
    /// The last message's text: the run's result.
    answer: String,
    last_error: Option<String>,
    finished: bool,
}

impl GeminiDecoder {
    pub fn new(request: CliRequest) -> Self {
        Self {
            replaying: request.resume_session.is_some(),
            request,
            rpc: Rpc::new(true),
            calls: HashMap::new(),
            session: None,
            tools: HashSet::new(),
            asked: HashSet::new(),
            approvals: HashMap::new(),
            refused: Vec::new(),
            text: String::new(),
            thinking: String::new(),
            answer: String::new(),
            last_error: None,
            finished: false,
        }
    }

    /// The first line: `initialize`.
    pub fn initialize(&mut self) -> String {
        let caps = json!({"fs": {"readTextFile": false, "writeTextFile": false}, "terminal": false});
        self.call(Call::Initialize, "initialize", json!({"protocolVersion": 1, "clientCapabilities": caps}))
    }

    fn call(&mut self, call: Call, method: &str, params: Value) -> String {
        let (id, line) = self.rpc.request(method, params);
        self.calls.insert(id, call);
        line
    }

    fn prompt(&mut self, session: String) -> String {
        let text = full_prompt(&self.request);
        let params = json!({"sessionId": session, "prompt": [{"type": "text", "text": text}]});
        self.call(Call::Prompt, "session/prompt", params)
    }

    /// The text and thinking so far as a message, with `tool` after them.
    fn flush(&mut self, tool: Option<ContentPart>, out: &mut Vec<CliEvent>) {
        let mut parts = Vec::new();
        let thinking = std::mem::take(&mut self.thinking);
        if !thinking.trim().is_empty() {
            parts.push(ContentPart::Thinking { text: thinking, signature: None });
        }
        if !self.text.is_empty() {
            let text = std::mem::take(&mut self.text);
            self.answer = text.clone();
            parts.push(ContentPart::text(text));
        }
        parts.extend(tool);
        if !parts.is_empty() {
            out.push(CliEvent::AssistantMessage { parts, usage: None, stop_reason: None });
        }
    }

    fn finish(
        &mut self,
        result: String,
        is_error: bool,
        subtype: Option<&str>,
        usage: Option<Usage>,
        out: &mut Vec<CliEvent>,
    ) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.flush(None, out);
        if is_error {
            self.last_error = Some(result.clone());
        }
        let result = if is_error { result } else { self.answer.clone() };
        out.push(CliEvent::Finished { result, is_error, subtype: subtype.map(str::to_owned), usage, cost_usd: None });
    }

    fn on_response(&mut self, id: u64, result: Result<Value, String>, out: &mut Vec<CliEvent>) -> Vec<String> {
        let Some(call) = self.calls.remove(&id) else { return Vec::new() };
        let result = match result {
            Ok(r) => r,
            Err(message) => {
                let what = match call {
                    Call::Initialize => "initialize",
                    Call::Session if self.request.resume_session.is_some() => "session/load",
                    Call::Session => "session/new",
                    Call::Prompt => "session/prompt",
                };
                self.finish(format!("{what} failed: {message}"), true, Some("acp_error"), None, out);
                return Vec::new();
            }
        };
        match call {
            Call::Initialize => {
                let cwd = self.request.cwd.display().to_string();
                let line = match self.request.resume_session.clone() {
                    Some(id) => {
                        self.call(Call::Session, "session/load", json!({"sessionId": id, "cwd": cwd, "mcpServers": []}))
                    }
                    None => self.call(Call::Session, "session/new", json!({"cwd": cwd, "mcpServers": []})),
                };
                vec![line]
            }
            Call::Session => {
                let id = result
                    .get("sessionId")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or_else(|| self.request.resume_session.clone());
                let Some(id) = id else {
                    self.finish("session/new returned no session id".into(), true, Some("acp_error"), None, out);
                    return Vec::new();
                };
                let model = result
                    .get("models")
                    .and_then(|m| m.get("currentModelId"))
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                out.push(CliEvent::SessionStarted { session_id: id.clone(), model });
                self.session = Some(id.clone());
                vec![self.prompt(id)]
            }
            Call::Prompt => {
                let tokens = result.get("_meta").and_then(|m| m.get("quota")).and_then(|q| q.get("token_count"));
                let usage = tokens.map(|t| Usage {
                    input_tokens: u64_of(t.get("input_tokens")),
                    output_tokens: u64_of(t.get("output_tokens")),
                    cache_read_tokens: 0,
                    cache_write_tokens: 0,
                    ..Usage::default()
                });
                match str_of(result.get("stopReason")).as_str() {
                    "end_turn" | "" => self.finish(String::new(), false, None, usage, out),
                    reason => {
                        let message = format!("the prompt ended with `{reason}`");
                        self.finish(message, true, Some(reason), usage, out);
                    }
                }
                Vec::new()
            }
        }
    }

    /// A tool call (once), as a tool use of an assistant message.
    fn tool_use(&mut self, call: &Value, out: &mut Vec<CliEvent>) -> (String, String, Value, bool) {
        let id = str_of(call.get("toolCallId"));
        let (tool, input, read_only) = tool_of(call);
        if self.tools.insert(id.clone()) {
            let part = ContentPart::ToolUse { id: id.clone(), name: tool.clone(), input: input.clone() };
            self.flush(Some(part), out);
        }
        (id, tool, input, read_only)
    }

    fn update(&mut self, params: &Value, out: &mut Vec<CliEvent>) {
        let Some(update) = params.get("update") else { return };
        let kind = str_of(update.get("sessionUpdate"));
        if kind == "available_commands_update" && self.session.is_some() {
            self.replaying = false;
        }
        if self.session.is_none() || self.replaying {
            return;
        }
        let chunk = || update.get("content").and_then(|c| c.get("text")).and_then(Value::as_str).unwrap_or("");
        match kind.as_str() {
            "agent_message_chunk" => {
                let text = chunk();
                if !text.is_empty() {
                    self.text.push_str(text);
                    out.push(CliEvent::TextDelta(text.to_owned()));
                }
            }
            "agent_thought_chunk" => self.thinking.push_str(chunk()),
            kind @ ("tool_call" | "tool_call_update") => {
                let status = str_of(update.get("status"));
                let done = matches!(status.as_str(), "completed" | "failed");
                let id = str_of(update.get("toolCallId"));
                if kind == "tool_call" && done && !self.tools.contains(&id) {
                    // A replayed call of a loaded session.
                    return;
                }
                let (id, tool, _, _) = self.tool_use(update, out);
                if done {
                    if !self.asked.contains(&id) {
                        out.push(CliEvent::Notice(format!("ran `{tool}` without asking Descartes")));
                    }
                    let output = content_text(update.get("content"));
                    out.push(CliEvent::ToolResult { tool_use_id: id, output, is_error: status == "failed" });
                }
            }
            _ => {}
        }
    }

    fn permission(&mut self, id: &Value, params: &Value, out: &mut Vec<CliEvent>) {
        // Only a live prompt asks.
        self.replaying = false;
        let call = params.get("toolCall").cloned().unwrap_or(Value::Null);
        let (call_id, tool, input, read_only) = self.tool_use(&call, out);
        let options = params.get("options").and_then(Value::as_array).cloned().unwrap_or_default();
        let option = |kind: &str, default: &str| {
            options
                .iter()
                .find(|o| o.get("kind").and_then(Value::as_str) == Some(kind))
                .and_then(|o| o.get("optionId").and_then(Value::as_str))
                .unwrap_or(default)
                .to_owned()
        };
        let key = id_key(id);
        self.approvals
            .insert(key.clone(), (id.clone(), option("allow_once", "proceed_once"), option("reject_once", "cancel")));
        self.asked.insert(call_id.clone());
        out.push(CliEvent::PermissionRequest(CliPermissionRequest {
            request_id: key,
            tool,
            input,
            tool_use_id: Some(call_id),
            read_only,
        }));
    }
}

impl rpc::Handler for GeminiDecoder {
    fn response(&mut self, id: u64, result: Result<Value, String>, out: &mut Vec<CliEvent>) -> Vec<String> {
        self.on_response(id, result, out)
    }

    fn request(&mut self, id: &Value, method: &str, params: &Value, out: &mut Vec<CliEvent>) -> Vec<String> {
        if method == "session/request_permission" {
            self.permission(id, params, out);
            return Vec::new();
        }
        out.push(CliEvent::Notice(format!("refused `{method}`: not offered by Descartes")));
        vec![self.rpc.error(id, -32601, "not supported by this client (Descartes)")]
    }

    fn notification(&mut self, method: &str, params: &Value, out: &mut Vec<CliEvent>) {
        if method == "session/update" {
            self.update(params, out);
        }
    }
}

impl Decoder for GeminiDecoder {
    fn line(&mut self, line: &str) -> Result<Decoded, String> {
        Ok(rpc::decode_line("gemini", line, self))
    }

    fn answer(&mut self, request: &CliPermissionRequest, answer: &CliAnswer) -> Option<String> {
        let (id, allow, reject) = self.approvals.remove(&request.request_id)?;
        let option = match answer {
            CliAnswer::Allow { .. } => allow,
            CliAnswer::Deny { .. } => {
                self.refused.extend(request.tool_use_id.clone());
                reject
            }
        };
        Some(self.rpc.response(&id, json!({"outcome": {"outcome": "selected", "optionId": option}})))
    }

    fn answered(&mut self) -> Vec<CliEvent> {
        // A refused call gets no update from Gemini CLI: its result is the refusal.
        std::mem::take(&mut self.refused)
            .into_iter()
            .map(|id| CliEvent::ToolResult { tool_use_id: id, output: "refused by Descartes".into(), is_error: true })
            .collect()
    }

    fn at_exit(&mut self, _success: bool) -> Vec<CliEvent> {
        let mut out = Vec::new();
        if !self.finished {
            let message = self.last_error.clone().unwrap_or_else(|| "gemini exited before the prompt ended".into());
            self.finish(message, true, Some("exited"), None, &mut out);
        }
        out
    }

    fn last_error(&self) -> Option<String> {
        self.last_error.clone()
    }
}

/// A tool call as Descartes names it: (tool, input, read_only). The tool's own name starts the
/// call id (`run_shell_command__run_shell_command_17..._0`), checked against the call's `kind`
/// (a name Descartes does not know is named by its kind: `execute` is `shell`, `edit` a write);
/// a shell call's title is its command; the paths are in `locations`.
fn tool_of(call: &Value) -> (String, Value, bool) {
    let id = str_of(call.get("toolCallId"));
    let name = id.split("__").next().unwrap_or_default().to_owned();
    let kind = str_of(call.get("kind"));
    let title = str_of(call.get("title"));
    let path = call
        .get("locations")
        .and_then(Value::as_array)
        .and_then(|l| l.first())
        .and_then(|l| l.get("path"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| {
            let content = call.get("content").and_then(Value::as_array)?;
            let diff = content.iter().find(|c| c.get("type") == Some(&json!("diff")))?;
            diff.get("path").and_then(Value::as_str).map(str::to_owned)
        });
    let with_path = |tool: &str, read_only: bool| {
        let mut input = json!({"title": title});
        match &path {
            Some(p) => input["path"] = json!(p),
            // A path tool whose path is not known is not a read-only call.
            None if read_only => return (tool.to_owned(), input, false),
            None => {}
        }
        (tool.to_owned(), input, read_only)
    };
    match (name.as_str(), kind.as_str()) {
        ("run_shell_command", _) | (_, "execute") => ("shell".into(), json!({"command": title}), false),
        ("write_file", _) => with_path("write_file", false),
        ("replace", _) | (_, "edit" | "delete" | "move") => with_path("edit_file", false),
        ("read_file", _) => with_path("read_file", true),
        ("list_directory", _) => with_path("list_files", true),
        ("glob" | "grep_search" | "search_file_content", _) => with_path("search_files", true),
        // Its URLs are inside a prompt (the title is a description): no host to decide on.
        ("web_fetch", _) | (_, "fetch") => ("web_fetch".into(), json!({"prompt": title}), false),
        ("", _) => ("unknown".into(), json!({"title": title}), false),
        (other, _) => (other.to_owned(), json!({"title": title, "path": path}), false),
    }
}

/// The text of a tool call's `content` (`{type: content, content: {text}}` blocks; a diff as
/// its path).
fn content_text(content: Option<&Value>) -> String {
    let items = content.and_then(Value::as_array).cloned().unwrap_or_default();
    items
        .iter()
        .filter_map(|c| match c.get("type").and_then(Value::as_str) {
            Some("diff") => Some(format!("changed {}", str_of(c.get("path")))),
            _ => c.get("content").and_then(|t| t.get("text")).and_then(Value::as_str).map(str::to_owned),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::testing::sent;

    fn request(resume: Option<&str>) -> CliRequest {
        crate::rpc::testing::request(resume, None)
    }

    fn feed(d: &mut GeminiDecoder, line: &str) -> Decoded {
        d.line(line).unwrap()
    }

    const ASK: &str = r#"{"jsonrpc":"2.0","id":0,"method":"session/request_permission","params":{"sessionId":"s1","options":[{"optionId":"proceed_always","name":"Allow for this session","kind":"allow_always"},{"optionId":"proceed_once","name":"Allow","kind":"allow_once"},{"optionId":"cancel","name":"Reject","kind":"reject_once"}],"toolCall":{"toolCallId":"run_shell_command__run_shell_command_1796528674451_0","status":"pending","title":"touch marker.txt","content":[],"locations":[],"kind":"execute"}}}"#;

    /// A transcript of the pinned CLI (abbreviated): a shell call asked about and refused, a
    /// file read allowed, the answer.
    #[test]
    fn conversation() {
        let mut d = GeminiDecoder::new(request(None));
        let init = sent(&d.initialize());
        assert_eq!((init["jsonrpc"].as_str(), init["method"].as_str()), (Some("2.0"), Some("initialize")));
        assert_eq!(init["params"]["clientCapabilities"]["fs"]["writeTextFile"], false);
        let r = feed(
            &mut d,
            r#"{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":1,"agentCapabilities":{"loadSession":true}}}"#,
        );
        let new = sent(&r.replies[0]);
        assert_eq!((new["method"].as_str(), new["params"]["cwd"].as_str()), (Some("session/new"), Some("/w")));
        let r = feed(
            &mut d,
            r#"{"jsonrpc":"2.0","id":2,"result":{"sessionId":"s1","models":{"currentModelId":"gemini-2.5-flash"}}}"#,
        );
        assert_eq!(
            r.events,
            vec![CliEvent::SessionStarted { session_id: "s1".into(), model: Some("gemini-2.5-flash".into()) }]
        );
        let prompt = sent(&r.replies[0]);
        assert_eq!(prompt["method"], "session/prompt");
        assert_eq!(prompt["params"]["prompt"][0]["text"], "please do it");

        feed(
            &mut d,
            r#"{"jsonrpc":"2.0","method":"session/update","params":{"sessionId":"s1","update":{"sessionUpdate":"agent_thought_chunk","content":{"type":"text","text":"**Plan**"}}}}"#,
        );
        let r = feed(&mut d, ASK);
        let CliEvent::AssistantMessage { parts, .. } = &r.events[0] else { panic!("{:?}", r.events) };
        assert_eq!(parts[0], ContentPart::Thinking { text: "**Plan**".into(), signature: None });
        assert!(
            matches!(&parts[1], ContentPart::ToolUse { name, input, .. } if name == "shell" && input["command"] == "touch marker.txt")
        );
        let CliEvent::PermissionRequest(ask) = &r.events[1] else { panic!("{:?}", r.events) };
        assert_eq!(ask.tool, "shell");
        assert_eq!(ask.tool_use_id.as_deref(), Some("run_shell_command__run_shell_command_1796528674451_0"));
        let answer = d.answer(ask, &CliAnswer::Deny { message: "no".into() }).unwrap();
        assert_eq!(
            sent(&answer),
            json!({"jsonrpc": "2.0", "id": 0, "result": {"outcome": {"outcome": "selected", "optionId": "cancel"}}})
        );
        assert!(matches!(&d.answered()[..], [CliEvent::ToolResult { is_error: true, .. }]), "a refusal has a result");

        let r = feed(
            &mut d,
            r#"{"jsonrpc":"2.0","id":1,"method":"session/request_permission","params":{"sessionId":"s1","options":[{"optionId":"proceed_once","kind":"allow_once"},{"optionId":"cancel","kind":"reject_once"}],"toolCall":{"toolCallId":"read_file__read_file_1_0","status":"pending","title":"hello.txt","content":[],"locations":[{"path":"/w/hello.txt"}],"kind":"read"}}}"#,
        );
        let CliEvent::PermissionRequest(ask) = &r.events[1] else { panic!("{:?}", r.events) };
        assert_eq!(
            (ask.tool.as_str(), ask.input["path"].as_str(), ask.read_only),
            ("read_file", Some("/w/hello.txt"), true)
        );
        let answer = d.answer(ask, &CliAnswer::Allow { updated_input: Value::Null }).unwrap();
        assert_eq!(sent(&answer)["result"]["outcome"]["optionId"], "proceed_once");
        assert!(d.answered().is_empty());
        let r = feed(
            &mut d,
            r#"{"jsonrpc":"2.0","method":"session/update","params":{"sessionId":"s1","update":{"sessionUpdate":"tool_call_update","toolCallId":"read_file__read_file_1_0","status":"completed","content":[{"type":"content","content":{"type":"text","text":"hi there"}}]}}}"#,
        );
        assert_eq!(
            r.events,
            vec![CliEvent::ToolResult {
                tool_use_id: "read_file__read_file_1_0".into(),
                output: "hi there".into(),
                is_error: false
            }]
        );
        let r = feed(
            &mut d,
            r#"{"jsonrpc":"2.0","method":"session/update","params":{"sessionId":"s1","update":{"sessionUpdate":"agent_message_chunk","content":{"type":"text","text":"All done."}}}}"#,
        );
        assert_eq!(r.events, vec![CliEvent::TextDelta("All done.".into())]);
        let r = feed(
            &mut d,
            r#"{"jsonrpc":"2.0","id":3,"result":{"stopReason":"end_turn","_meta":{"quota":{"token_count":{"input_tokens":30,"output_tokens":12}}}}}"#,
        );
        assert!(
            matches!(&r.events[0], CliEvent::AssistantMessage { parts, .. } if parts == &vec![ContentPart::text("All done.")])
        );
        let usage = Usage {
            input_tokens: 30,
            output_tokens: 12,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            ..Usage::default()
        };
        assert_eq!(
            r.events[1],
            CliEvent::Finished {
                result: "All done.".into(),
                is_error: false,
                subtype: None,
                usage: Some(usage),
                cost_usd: None
            }
        );
        assert!(d.at_exit(true).is_empty());
    }

    #[test]
    fn loads_refuses_and_fails() {
        let mut d = GeminiDecoder::new(request(Some("s0")));
        d.initialize();
        let r = feed(&mut d, r#"{"jsonrpc":"2.0","id":1,"result":{}}"#);
        let load = sent(&r.replies[0]);
        assert_eq!((load["method"].as_str(), load["params"]["sessionId"].as_str()), (Some("session/load"), Some("s0")));
        // The history replayed before the load's answer is not recorded again.
        let replay = r#"{"jsonrpc":"2.0","method":"session/update","params":{"sessionId":"s0","update":{"sessionUpdate":"agent_message_chunk","content":{"type":"text","text":"old"}}}}"#;
        assert!(feed(&mut d, replay).events.is_empty());
        let r = feed(&mut d, r#"{"jsonrpc":"2.0","id":2,"result":{"modes":{}}}"#);
        assert_eq!(r.events, vec![CliEvent::SessionStarted { session_id: "s0".into(), model: None }]);
        assert!(feed(&mut d, replay).events.is_empty(), "the replay goes on after the answer");
        feed(
            &mut d,
            r#"{"jsonrpc":"2.0","method":"session/update","params":{"sessionId":"s0","update":{"sessionUpdate":"available_commands_update","availableCommands":[]}}}"#,
        );
        assert_eq!(feed(&mut d, replay).events, vec![CliEvent::TextDelta("old".into())], "live again");
        let old_call = r#"{"jsonrpc":"2.0","method":"session/update","params":{"sessionId":"s0","update":{"sessionUpdate":"tool_call","toolCallId":"x__x_1","status":"completed","content":[]}}}"#;
        assert!(feed(&mut d, old_call).events.is_empty(), "a replayed call is not a new one");
        let r =
            feed(&mut d, r#"{"jsonrpc":"2.0","id":7,"method":"fs/read_text_file","params":{"path":"/etc/passwd"}}"#);
        assert_eq!(sent(&r.replies[0])["error"]["code"], -32601);
        let r = feed(&mut d, r#"{"jsonrpc":"2.0","id":3,"error":{"code":-32603,"message":"Internal error"}}"#);
        assert!(
            matches!(&r.events[..], [.., CliEvent::Finished { is_error: true, result, .. }] if result == "session/prompt failed: Internal error"),
            "{:?}",
            r.events
        );
        assert!(matches!(&d.line("Ripgrep is not available").unwrap().events[..], [CliEvent::Notice(_)]));
    }

    #[test]
    fn tools_are_named_as_descartes_names_them() {
        let call = |id: &str, title: &str, path: Option<&str>| {
            let locations: Vec<Value> = path.map(|p| json!({"path": p})).into_iter().collect();
            tool_of(&json!({"toolCallId": id, "title": title, "locations": locations}))
        };
        assert_eq!(call("run_shell_command__x_0", "ls -la", None).0, "shell");
        assert_eq!(call("run_shell_command__x_0", "ls -la", None).1["command"], "ls -la");
        let (tool, input, read_only) = call("write_file__x_0", "a.txt", Some("/w/.git/hooks/pre-commit"));
        assert_eq!(
            (tool.as_str(), input["path"].as_str(), read_only),
            ("write_file", Some("/w/.git/hooks/pre-commit"), false)
        );
        assert_eq!(call("replace__x_0", "a", Some("/w/a")).0, "edit_file");
        assert_eq!(call("list_directory__x_0", ".", None).0, "list_files");
        assert_eq!(call("mcp_srv_poke__x_0", "poke", None).0, "mcp_srv_poke");
        let odd = json!({"toolCallId": "x-1", "kind": "execute", "title": "rm -rf /"});
        assert_eq!(tool_of(&odd), ("shell".into(), json!({"command": "rm -rf /"}), false), "named by its kind");
        let nowhere = json!({"toolCallId": "read_file__1", "kind": "read", "title": "?"});
        assert!(!tool_of(&nowhere).2, "a read of no known path is not read-only");
        assert_eq!(tool_of(&json!({"toolCallId": "web_fetch__1", "title": "get https://a.b"})).0, "web_fetch");
        let diff = json!({"toolCallId": "write_file__y", "title": "b", "content": [{"type": "diff", "path": "/w/b", "newText": "x"}]});
        assert_eq!(tool_of(&diff).1["path"], "/w/b");
    }
}
