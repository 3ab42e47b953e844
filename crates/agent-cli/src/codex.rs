//! Codex, driven through `codex app-server` (JSON-RPC over stdio, no `"jsonrpc"` member) so
//! that Descartes decides every command and every patch before it runs.
//!
//! The conversation (checked against the pinned CLI, see `docs/PROTOCOLS.md`):
//! - `initialize` (`clientInfo`), then the `initialized` notification;
//! - `thread/start` (`cwd`, `approvalPolicy: "untrusted"`, `sandbox`, `model`) or, to continue
//!   a session, `thread/resume` (`threadId`, the same settings, `excludeTurns`); the result's
//!   `thread.id` is the session;
//! - `turn/start` (`threadId`, `input: [{type: "text", text}]`); then notifications
//!   (`item/started`, `item/completed` with `commandExecution`, `fileChange`, `mcpToolCall`,
//!   `webSearch`, `agentMessage`, `reasoning` items; `item/agentMessage/delta`;
//!   `thread/tokenUsage/updated`; `error`) until `turn/completed` (`turn.status`
//!   `completed`, `failed` or `interrupted`);
//! - the CLI's requests `item/commandExecution/requestApproval` (`itemId`, `command`) and
//!   `item/fileChange/requestApproval` (`itemId`; the paths come with the item), answered
//!   `{"decision": "accept" | "decline"}` once the decision is recorded. Descartes never
//!   answers `acceptForSession` or an exec-policy amendment (they would let later calls skip
//!   it); "allow for this run" is Descartes' own.
//!
//! With `approvalPolicy: "untrusted"` Codex asks before every command, those it deems safe
//! (`echo`, `ls`, `cat`) included, in every sandbox mode. What Descartes does not decide: an
//! `allow` rule of Codex's own exec policy (`~/.codex/rules/*.rules`, `/etc/codex/rules`) runs
//! its commands without asking (such a call is recorded and reported as undecided), and input
//! typed into an interactive process that was allowed. The sandbox stays as before:
//! `read-only` by default, `workspace-write` with `-y`. Tokens are reported, money is not.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use descartes_core::{AgentCli, CliAnswer, CliEvent, CliPermissionRequest, CliRequest, CliSession, ProviderError};
use descartes_protocol::{ContentPart, Usage};
use serde_json::{Map, Value, json};

use crate::command::full_prompt;
use crate::process::CliProcess;
use crate::rpc::{self, Rpc, id_key};
use crate::session::{Decoded, Decoder, ProcessSession};
use crate::{CliOptions, str_of, u64_of};

pub const INSTALL_HINT: &str = "npm install -g @openai/codex";

/// The approval policy that makes Codex ask before every command.
const APPROVAL_POLICY: &str = "untrusted";

/// The `codex` backend.
#[derive(Debug, Clone, Default)]
pub struct Codex {
    pub options: CliOptions,
}

impl Codex {
    pub fn new(options: CliOptions) -> Self {
        Self { options }
    }

    /// The command line (without the program).
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["app-server".to_owned()];
        args.extend(self.options.extra_args.iter().cloned());
        args
    }
}

#[async_trait]
impl AgentCli for Codex {
    fn name(&self) -> &str {
        "codex"
    }

    async fn start(&self, request: CliRequest) -> Result<Box<dyn CliSession>, ProviderError> {
        let program = self.options.program_or("codex");
        let mut decoder = CodexDecoder::new(request.clone());
        let mut spawn = self.options.spawn(self.name(), program, self.args(), &request.cwd, INSTALL_HINT.into());
        spawn.stdin = Some(decoder.initialize() + "\n");
        spawn.keep_stdin = true;
        let process = CliProcess::spawn(spawn).await?;
        Ok(Box::new(ProcessSession::new(process, decoder)))
    }
}

/// Our requests awaiting their answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Initialize,
    Thread,
    Turn,
}

/// The app-server conversation of one invocation: what to send next, and the CLI's messages
/// as events.
#[derive(Debug)]
pub struct CodexDecoder {
    request: CliRequest,
    rpc: Rpc,
    calls: HashMap<u64, Call>,
    /// Tool items reported so far: item id → (tool, input).
    tools: HashMap<String, (String, Value)>,
    /// Tool items Descartes was asked about.
    asked: HashSet<String>,
    /// Approval requests awaiting Descartes' answer: our key → the CLI's request id.
    approvals: HashMap<String, Value>,
    /// Reasoning waiting for the next message it belongs to.
    thinking: Vec<ContentPart>,
    /// The last agent message: the run's result.
    answer: String,
    usage: Option<Usage>,
    last_error: Option<String>,
    finished: bool,
}

impl CodexDecoder {
    pub fn new(request: CliRequest) -> Self {
        Self {
            request,
            rpc: Rpc::new(false),
            calls: HashMap::new(),
            tools: HashMap::new(),
            asked: HashSet::new(),
            approvals: HashMap::new(),
            thinking: Vec::new(),
            answer: String::new(),
            usage: None,
            last_error: None,
            finished: false,
        }
    }

    /// The first line: `initialize`.
    pub fn initialize(&mut self) -> String {
        let info = json!({"name": "descartes", "title": "Descartes", "version": env!("CARGO_PKG_VERSION")});
        self.call(Call::Initialize, "initialize", json!({"clientInfo": info}))
    }

    fn call(&mut self, call: Call, method: &str, params: Value) -> String {
        let (id, line) = self.rpc.request(method, params);
        self.calls.insert(id, call);
        line
    }

    /// `thread/start`, or `thread/resume` for a session to continue.
    fn thread(&mut self) -> String {
        let sandbox = if self.request.auto_approve { "workspace-write" } else { "read-only" };
        let mut params = json!({
            "cwd": self.request.cwd.display().to_string(),
            "approvalPolicy": APPROVAL_POLICY,
            "sandbox": sandbox,
        });
        if let Some(model) = &self.request.model {
            params["model"] = json!(model);
        }
        match self.request.resume_session.clone() {
            Some(id) => {
                params["threadId"] = json!(id);
                params["excludeTurns"] = json!(true);
                self.call(Call::Thread, "thread/resume", params)
            }
            None => self.call(Call::Thread, "thread/start", params),
        }
    }

    fn finish(&mut self, result: String, is_error: bool, subtype: Option<&str>, out: &mut Vec<CliEvent>) {
        if self.finished {
            return;
        }
        self.finished = true;
        if is_error {
            self.last_error = Some(result.clone());
        }
        if !self.thinking.is_empty() {
            let parts = std::mem::take(&mut self.thinking);
            out.push(CliEvent::AssistantMessage { parts, usage: None, stop_reason: None });
        }
        out.push(CliEvent::Finished {
            result,
            is_error,
            subtype: subtype.map(str::to_owned),
            usage: self.usage,
            cost_usd: None,
        });
    }

    fn on_response(&mut self, id: u64, result: Result<Value, String>, out: &mut Vec<CliEvent>) -> Vec<String> {
        let Some(call) = self.calls.remove(&id) else { return Vec::new() };
        let result = match result {
            Ok(r) => r,
            Err(message) => {
                let what = match call {
                    Call::Initialize => "initialize",
                    Call::Thread if self.request.resume_session.is_some() => "thread/resume",
                    Call::Thread => "thread/start",
                    Call::Turn => "turn/start",
                };
                self.finish(format!("{what} failed: {message}"), true, Some("app_server_error"), out);
                return Vec::new();
            }
        };
        match call {
            Call::Initialize => vec![self.rpc.notification("initialized", None), self.thread()],
            Call::Thread => {
                let thread = result.get("thread").and_then(|t| t.get("id")).and_then(Value::as_str);
                let Some(thread) = thread.map(str::to_owned) else {
                    self.finish("the thread has no id".into(), true, Some("app_server_error"), out);
                    return Vec::new();
                };
                let model = result.get("model").and_then(Value::as_str).map(str::to_owned);
                out.push(CliEvent::SessionStarted { session_id: thread.clone(), model });
                let text = full_prompt(&self.request);
                let input = json!([{"type": "text", "text": text, "text_elements": []}]);
                vec![self.call(Call::Turn, "turn/start", json!({"threadId": thread, "input": input}))]
            }
            Call::Turn => Vec::new(),
        }
    }

    /// Reports a tool item (once), as a tool use of an assistant message.
    fn tool_item(&mut self, item: &Map<String, Value>, out: &mut Vec<CliEvent>) {
        let id = str_of(item.get("id"));
        if self.tools.contains_key(&id) {
            return;
        }
        let Some((tool, input)) = tool_of(item) else { return };
        self.tools.insert(id.clone(), (tool.clone(), input.clone()));
        let mut parts = std::mem::take(&mut self.thinking);
        parts.push(ContentPart::ToolUse { id, name: tool, input });
        out.push(CliEvent::AssistantMessage { parts, usage: None, stop_reason: None });
    }

    fn item(&mut self, params: &Value, completed: bool, out: &mut Vec<CliEvent>) {
        let Some(item) = params.get("item").and_then(Value::as_object) else { return };
        match item.get("type").and_then(Value::as_str).unwrap_or("") {
            "agentMessage" if completed => {
                let text = str_of(item.get("text"));
                self.answer = text.clone();
                let mut parts = std::mem::take(&mut self.thinking);
                parts.push(ContentPart::text(text));
                out.push(CliEvent::AssistantMessage { parts, usage: None, stop_reason: None });
            }
            "reasoning" if completed => {
                let mut lines: Vec<String> = Vec::new();
                for key in ["summary", "content"] {
                    let list = item.get(key).and_then(Value::as_array).into_iter().flatten();
                    lines.extend(list.filter_map(Value::as_str).map(str::to_owned));
                }
                let text = lines.join("\n");
                if !text.trim().is_empty() {
                    self.thinking.push(ContentPart::Thinking { text, signature: None });
                }
            }
            _ => {
                self.tool_item(item, out);
                let id = str_of(item.get("id"));
                if completed && self.tools.contains_key(&id) {
                    if !self.asked.contains(&id) && str_of(item.get("status")) != "declined" {
                        let tool = self.tools.get(&id).map(|t| t.0.clone()).unwrap_or_default();
                        out.push(CliEvent::Notice(format!(
                            "ran `{tool}` without asking Descartes (an allow rule of Codex's own exec policy?)"
                        )));
                    }
                    let (output, is_error) = result_of(item);
                    out.push(CliEvent::ToolResult { tool_use_id: id, output, is_error });
                }
            }
        }
    }

    /// An approval request: a permission request for Descartes.
    fn approval(&mut self, id: &Value, params: &Value, file_change: bool, out: &mut Vec<CliEvent>) {
        let item_id = str_of(params.get("itemId"));
        if !self.tools.contains_key(&item_id) {
            // The item was not announced: make it known from the request itself.
            let item = if file_change {
                json!({"id": item_id, "type": "fileChange", "changes": []})
            } else {
                json!({"id": item_id, "type": "commandExecution", "command": str_of(params.get("command"))})
            };
            if let Some(item) = item.as_object() {
                self.tool_item(item, out);
            }
        }
        let (mut tool, mut input) =
            self.tools.get(&item_id).cloned().unwrap_or_else(|| ("unknown".into(), Value::Null));
        if let Some(why) = escalation(params, &input, self.asked.contains(&item_id)) {
            // More than the sandbox allows, or a change Descartes cannot see: its own question
            // (the guardrail refuses it unless Descartes' sandbox is off).
            input = json!({"tool": tool, "input": input, "reason": why});
            tool = ESCALATION_TOOL.into();
        }
        let key = id_key(id);
        self.approvals.insert(key.clone(), id.clone());
        self.asked.insert(item_id.clone());
        out.push(CliEvent::PermissionRequest(CliPermissionRequest {
            request_id: key,
            tool,
            input,
            tool_use_id: Some(item_id),
            read_only: false,
        }));
    }

    /// A request Descartes does not serve: refused in the way that grants nothing.
    fn refuse(&self, id: &Value, method: &str, out: &mut Vec<CliEvent>) -> String {
        out.push(CliEvent::Notice(format!("refused `{method}`: Descartes does not grant it")));
        match method {
            "item/permissions/requestApproval" => self.rpc.response(id, json!({"permissions": {}, "scope": "turn"})),
            "mcpServer/elicitation/request" => self.rpc.response(id, json!({"action": "decline"})),
            "item/tool/requestUserInput" => self.rpc.response(id, json!({"answers": {}})),
            "execCommandApproval" | "applyPatchApproval" => self.rpc.response(id, json!({"decision": "denied"})),
            _ => self.rpc.error(id, -32601, "not supported by this client (Descartes)"),
        }
    }

    fn on_notification(&mut self, method: &str, params: &Value, out: &mut Vec<CliEvent>) {
        match method {
            "item/started" => self.item(params, false, out),
            "item/completed" => self.item(params, true, out),
            "item/agentMessage/delta" => {
                let delta = str_of(params.get("delta"));
                if !delta.is_empty() {
                    out.push(CliEvent::TextDelta(delta));
                }
            }
            "thread/tokenUsage/updated" => {
                // `last` is the model call just made: they add up to this invocation's usage
                // (`total` counts the thread's earlier invocations too).
                let last = params.get("tokenUsage").and_then(|u| u.get("last"));
                let field = |k: &str| u64_of(last.and_then(|l| l.get(k)));
                let cached = field("cachedInputTokens");
                let usage = Usage {
                    input_tokens: field("inputTokens"),
                    output_tokens: field("outputTokens"),
                    cache_read_tokens: cached,
                    cache_write_tokens: field("cacheWriteInputTokens"),
                    ..Usage::default()
                };
                let total = self.usage.get_or_insert_with(Usage::default);
                total.add(&usage);
                out.push(CliEvent::Usage { usage: *total, cost_usd: None });
            }
            "error" => {
                let message = params
                    .get("error")
                    .and_then(|e| e.get("message"))
                    .and_then(Value::as_str)
                    .unwrap_or("error")
                    .to_owned();
                self.last_error = Some(message.clone());
                if params.get("willRetry").and_then(Value::as_bool) == Some(true) {
                    out.push(CliEvent::Notice(format!("{message} (retrying)")));
                }
            }
            "turn/completed" => {
                let turn = params.get("turn");
                match turn.and_then(|t| t.get("status")).and_then(Value::as_str).unwrap_or("completed") {
                    "completed" => {
                        let answer = self.answer.clone();
                        self.finish(answer, false, None, out);
                    }
                    status => {
                        let message = turn
                            .and_then(|t| t.get("error"))
                            .and_then(|e| e.get("message"))
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                            .or_else(|| self.last_error.clone())
                            .unwrap_or_else(|| format!("the turn ended `{status}`"));
                        self.finish(message, true, Some(&format!("turn_{status}")), out);
                    }
                }
            }
            "warning" | "configWarning" | "deprecationNotice" => {
                let text = ["summary", "message"].iter().find_map(|k| params.get(*k).and_then(Value::as_str));
                if let Some(text) = text {
                    out.push(CliEvent::Notice(text.to_owned()));
                }
            }
            _ => {}
        }
    }
}

impl rpc::Handler for CodexDecoder {
    fn response(&mut self, id: u64, result: Result<Value, String>, out: &mut Vec<CliEvent>) -> Vec<String> {
        self.on_response(id, result, out)
    }

    fn request(&mut self, id: &Value, method: &str, params: &Value, out: &mut Vec<CliEvent>) -> Vec<String> {
        match method {
            "item/commandExecution/requestApproval" => self.approval(id, params, false, out),
            "item/fileChange/requestApproval" => self.approval(id, params, true, out),
            other => return vec![self.refuse(id, other, out)],
        }
        Vec::new()
    }

    fn notification(&mut self, method: &str, params: &Value, out: &mut Vec<CliEvent>) {
        self.on_notification(method, params, out);
    }
}

impl Decoder for CodexDecoder {
    fn line(&mut self, line: &str) -> Result<Decoded, String> {
        Ok(rpc::decode_line("codex", line, self))
    }

    fn answer(&mut self, request: &CliPermissionRequest, answer: &CliAnswer) -> Option<String> {
        let id = self.approvals.remove(&request.request_id)?;
        let decision = match answer {
            CliAnswer::Allow { .. } => "accept",
            CliAnswer::Deny { .. } => "decline",
        };
        Some(self.rpc.response(&id, json!({"decision": decision})))
    }

    fn at_exit(&mut self, _success: bool) -> Vec<CliEvent> {
        let mut out = Vec::new();
        if !self.finished {
            let message =
                self.last_error.clone().unwrap_or_else(|| "codex app-server exited before the turn ended".into());
            self.finish(message, true, Some("exited"), &mut out);
        }
        out
    }

    fn last_error(&self) -> Option<String> {
        self.last_error.clone()
    }
}

/// The tool name of a request for more than the sandbox allows (network access, writes outside
/// it, a retry without it, a patch whose files are not known).
pub const ESCALATION_TOOL: &str = "sandbox_escalation";

/// Why an approval request asks for more than running `input` in the sandbox, if it does: a
/// second request for an item already asked about (Codex's retry without the sandbox), network
/// access, a write root, input to a running process, or a patch without known files.
fn escalation(params: &Value, input: &Value, asked_before: bool) -> Option<String> {
    let reason = str_of(params.get("reason"));
    let set = |k: &str| params.get(k).is_some_and(|v| !v.is_null() && v != &json!([]));
    if asked_before {
        return Some(format!("asked again for the same call (a retry without the sandbox?): {reason}"));
    }
    if set("networkApprovalContext") || set("proposedNetworkPolicyAmendments") {
        return Some(format!("network access: {reason}"));
    }
    if set("grantRoot") {
        return Some(format!("writes under {}: {reason}", params["grantRoot"]));
    }
    let kind = params.get("kind").and_then(Value::as_str).unwrap_or("command");
    if kind != "command" {
        return Some(format!("a `{kind}` request: {reason}"));
    }
    if input.get("paths").is_some_and(|p| p.as_array().is_none_or(Vec::is_empty)) {
        return Some("a patch whose files are not known".into());
    }
    None
}

/// The tool call an item stands for: (tool, input).
fn tool_of(item: &Map<String, Value>) -> Option<(String, Value)> {
    match item.get("type").and_then(Value::as_str)? {
        "commandExecution" => Some(("shell".into(), json!({"command": unwrap_shell(&str_of(item.get("command")))}))),
        "fileChange" => {
            let changes = item.get("changes").cloned().unwrap_or(Value::Array(Vec::new()));
            // Every file a change touches: its path and, for a move, where it goes.
            let mut paths: Vec<Value> = Vec::new();
            for c in changes.as_array().into_iter().flatten() {
                paths.extend(c.get("path").cloned());
                let kind = c.get("kind");
                let target = ["move_path", "movePath"].iter().find_map(|k| kind.and_then(|o| o.get(*k)));
                paths.extend(target.filter(|v| v.is_string()).cloned());
            }
            let mut input = json!({"paths": paths, "changes": changes});
            if let Some(first) = paths.first() {
                input["path"] = first.clone();
            }
            Some(("apply_patch".into(), input))
        }
        "mcpToolCall" => Some((
            format!("mcp__{}__{}", str_of(item.get("server")), str_of(item.get("tool"))),
            item.get("arguments").cloned().unwrap_or(Value::Object(Map::new())),
        )),
        "webSearch" => Some(("web_search".into(), json!({"query": str_of(item.get("query"))}))),
        _ => None,
    }
}

/// The result of a completed tool item: (output, is_error).
fn result_of(item: &Map<String, Value>) -> (String, bool) {
    let status = str_of(item.get("status"));
    if status == "declined" {
        return ("declined: not run".into(), true);
    }
    let failed = status == "failed";
    match item.get("type").and_then(Value::as_str).unwrap_or("") {
        "commandExecution" => {
            let output = str_of(item.get("aggregatedOutput"));
            let code = item.get("exitCode").and_then(Value::as_i64);
            let is_error = failed || code.is_some_and(|c| c != 0);
            let output = match code {
                Some(c) if c != 0 => format!("{output}\n[exit code {c}]").trim_start().to_owned(),
                _ => output,
            };
            (output, is_error)
        }
        "fileChange" => {
            let changes = item.get("changes").and_then(Value::as_array).cloned().unwrap_or_default();
            let lines: Vec<String> = changes
                .iter()
                .map(|c| {
                    let kind = c.get("kind").and_then(|k| k.get("type")).and_then(Value::as_str).unwrap_or("update");
                    format!("{kind} {}", str_of(c.get("path")))
                })
                .collect();
            (lines.join("\n"), failed)
        }
        "mcpToolCall" => {
            if let Some(e) = item.get("error").filter(|e| !e.is_null()) {
                return (e.get("message").and_then(Value::as_str).map_or_else(|| e.to_string(), str::to_owned), true);
            }
            (crate::text_of(item.get("result").and_then(|r| r.get("content"))), failed)
        }
        _ => (String::new(), failed),
    }
}

/// The command a shell wrapper runs: `/bin/bash -lc 'echo hi'` is `echo hi` (what the policy
/// is matched against), split with POSIX shell rules; anything else as it is.
fn unwrap_shell(command: &str) -> String {
    match shlex::split(command).as_deref() {
        Some([shell, flag, script]) if matches!(flag.as_str(), "-lc" | "-c") => {
            let name = shell.rsplit('/').next().unwrap_or(shell);
            if matches!(name, "bash" | "sh" | "zsh") { script.clone() } else { command.to_owned() }
        }
        _ => command.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::testing::sent;

    fn request(resume: Option<&str>) -> CliRequest {
        crate::rpc::testing::request(resume, Some("gpt-x"))
    }

    fn feed(d: &mut CodexDecoder, line: &str) -> Decoded {
        d.line(line).unwrap()
    }

    /// A transcript of the pinned CLI (abbreviated): a command asked about, declined, and the
    /// answer.
    #[test]
    fn conversation() {
        let mut d = CodexDecoder::new(request(None));
        let init = sent(&d.initialize());
        assert_eq!((init["id"].as_u64(), init["method"].as_str()), (Some(1), Some("initialize")));
        assert!(init.get("jsonrpc").is_none());
        let r = feed(&mut d, r#"{"id":1,"result":{"userAgent":"descartes/0.169.0","codexHome":"/h"}}"#);
        assert_eq!(sent(&r.replies[0]), json!({"method": "initialized"}));
        let start = sent(&r.replies[1]);
        assert_eq!(start["method"], "thread/start");
        assert_eq!(start["params"]["approvalPolicy"], "untrusted");
        assert_eq!(start["params"]["sandbox"], "read-only");
        assert_eq!(start["params"]["cwd"], "/w");
        assert_eq!(start["params"]["model"], "gpt-x");
        let r = feed(&mut d, r#"{"id":2,"result":{"thread":{"id":"th-1"},"model":"gpt-x"}}"#);
        assert_eq!(r.events, vec![CliEvent::SessionStarted { session_id: "th-1".into(), model: Some("gpt-x".into()) }]);
        let turn = sent(&r.replies[0]);
        assert_eq!(turn["method"], "turn/start");
        assert_eq!(turn["params"]["threadId"], "th-1");
        assert_eq!(turn["params"]["input"][0]["text"], "please do it");
        assert!(feed(&mut d, r#"{"id":3,"result":{"turn":{"id":"t1","status":"inProgress"}}}"#).events.is_empty());

        let r = feed(
            &mut d,
            r#"{"method":"item/started","params":{"item":{"type":"commandExecution","id":"call_1","command":"/bin/bash -lc 'echo hi'","status":"inProgress"},"threadId":"th-1","turnId":"t1"}}"#,
        );
        let use_ =
            ContentPart::ToolUse { id: "call_1".into(), name: "shell".into(), input: json!({"command": "echo hi"}) };
        assert_eq!(r.events, vec![CliEvent::AssistantMessage { parts: vec![use_], usage: None, stop_reason: None }]);
        let r = feed(
            &mut d,
            r#"{"method":"item/commandExecution/requestApproval","id":0,"params":{"kind":"command","threadId":"th-1","turnId":"t1","itemId":"call_1","command":"/bin/bash -lc 'echo hi'","cwd":"/w"}}"#,
        );
        let [CliEvent::PermissionRequest(ask)] = &r.events[..] else { panic!("{:?}", r.events) };
        assert_eq!((ask.tool.as_str(), ask.tool_use_id.as_deref()), ("shell", Some("call_1")));
        assert_eq!(ask.input, json!({"command": "echo hi"}));
        let answer = d.answer(ask, &CliAnswer::Deny { message: "no".into() }).unwrap();
        assert_eq!(sent(&answer), json!({"id": 0, "result": {"decision": "decline"}}));
        assert!(d.answer(ask, &CliAnswer::Deny { message: "no".into() }).is_none(), "answered once");
        let r = feed(
            &mut d,
            r#"{"method":"item/completed","params":{"item":{"type":"commandExecution","id":"call_1","command":"/bin/bash -lc 'echo hi'","status":"declined","aggregatedOutput":null,"exitCode":null}}}"#,
        );
        assert!(matches!(&r.events[..], [CliEvent::ToolResult { is_error: true, .. }]), "{:?}", r.events);
        let r = feed(
            &mut d,
            r#"{"method":"thread/tokenUsage/updated","params":{"tokenUsage":{"total":{"inputTokens":99,"outputTokens":9},"last":{"inputTokens":10,"cachedInputTokens":2,"outputTokens":5}}}}"#,
        );
        let usage = Usage {
            input_tokens: 10,
            output_tokens: 5,
            cache_read_tokens: 2,
            cache_write_tokens: 0,
            ..Usage::default()
        };
        assert_eq!(r.events, vec![CliEvent::Usage { usage, cost_usd: None }]);
        let r = feed(&mut d, r#"{"method":"item/agentMessage/delta","params":{"itemId":"m","delta":"All "}}"#);
        assert_eq!(r.events, vec![CliEvent::TextDelta("All ".into())]);
        feed(
            &mut d,
            r#"{"method":"item/completed","params":{"item":{"type":"reasoning","id":"r","summary":["**Wrapping up**"],"content":[]}}}"#,
        );
        let r = feed(
            &mut d,
            r#"{"method":"item/completed","params":{"item":{"type":"agentMessage","id":"m","text":"All done."}}}"#,
        );
        let CliEvent::AssistantMessage { parts, .. } = &r.events[0] else { panic!() };
        assert_eq!(parts[0], ContentPart::Thinking { text: "**Wrapping up**".into(), signature: None });
        assert_eq!(parts[1], ContentPart::text("All done."));
        let r = feed(
            &mut d,
            r#"{"method":"turn/completed","params":{"turn":{"id":"t1","status":"completed","error":null}}}"#,
        );
        let done = CliEvent::Finished {
            result: "All done.".into(),
            is_error: false,
            subtype: None,
            usage: Some(usage),
            cost_usd: None,
        };
        assert_eq!(r.events, vec![done]);
        assert!(d.at_exit(true).is_empty());
    }

    #[test]
    fn resumes_patches_refusals_and_failures() {
        let mut d = CodexDecoder::new(CliRequest { auto_approve: true, ..request(Some("th-9")) });
        d.initialize();
        let r = feed(&mut d, r#"{"id":1,"result":{}}"#);
        let resume = sent(&r.replies[1]);
        assert_eq!(resume["method"], "thread/resume");
        assert_eq!(resume["params"]["threadId"], "th-9");
        assert_eq!(resume["params"]["sandbox"], "workspace-write");
        assert_eq!(resume["params"]["approvalPolicy"], "untrusted");

        // A patch: every path is in the question.
        feed(
            &mut d,
            r#"{"method":"item/started","params":{"item":{"type":"fileChange","id":"p1","changes":[{"path":"/w/a.txt","kind":{"type":"add"},"diff":"x"},{"path":"/w/.git/hooks/pre-commit","kind":{"type":"add"},"diff":"y"}],"status":"inProgress"}}}"#,
        );
        let r = feed(
            &mut d,
            r#"{"method":"item/fileChange/requestApproval","id":5,"params":{"itemId":"p1","reason":null}}"#,
        );
        let [CliEvent::PermissionRequest(ask)] = &r.events[..] else { panic!("{:?}", r.events) };
        assert_eq!(ask.tool, "apply_patch");
        assert_eq!(ask.input["paths"], json!(["/w/a.txt", "/w/.git/hooks/pre-commit"]));
        let answer = d.answer(ask, &CliAnswer::Allow { updated_input: Value::Null }).unwrap();
        assert_eq!(sent(&answer), json!({"id": 5, "result": {"decision": "accept"}}));

        // A command run without asking is reported.
        let r = feed(
            &mut d,
            r#"{"method":"item/completed","params":{"item":{"type":"commandExecution","id":"c9","command":"ls","status":"completed","aggregatedOutput":"a\n","exitCode":0}}}"#,
        );
        assert!(matches!(&r.events[1], CliEvent::Notice(n) if n.contains("without asking")), "{:?}", r.events);
        assert_eq!(
            r.events[2],
            CliEvent::ToolResult { tool_use_id: "c9".into(), output: "a\n".into(), is_error: false }
        );

        // Requests Descartes does not serve are refused in a way that grants nothing.
        let r = feed(&mut d, r#"{"method":"item/permissions/requestApproval","id":6,"params":{}}"#);
        assert_eq!(sent(&r.replies[0])["result"]["permissions"], json!({}));
        let r = feed(&mut d, r#"{"method":"something/new","id":"x","params":{}}"#);
        assert_eq!(sent(&r.replies[0])["error"]["code"], -32601);

        let r = feed(&mut d, r#"{"id":2,"error":{"code":-32600,"message":"invalid thread id: th-9"}}"#);
        assert!(
            matches!(&r.events[..], [CliEvent::Finished { is_error: true, result, .. }] if result.contains("thread/resume failed: invalid thread id")),
            "{:?}",
            r.events
        );
        assert!(matches!(&d.line("not json").unwrap().events[..], [CliEvent::Notice(_)]));

        let mut d = CodexDecoder::new(request(None));
        feed(&mut d, r#"{"method":"error","params":{"error":{"message":"unexpected status 400"},"willRetry":false}}"#);
        let r = feed(&mut d, r#"{"method":"turn/completed","params":{"turn":{"status":"failed","error":null}}}"#);
        assert!(
            matches!(&r.events[..], [CliEvent::Finished { is_error: true, result, subtype: Some(s), .. }] if result == "unexpected status 400" && s == "turn_failed")
        );
        let mut d = CodexDecoder::new(request(None));
        assert!(matches!(&d.at_exit(true)[..], [CliEvent::Finished { is_error: true, .. }]));
    }

    #[test]
    fn escalations_are_their_own_question() {
        let mut d = CodexDecoder::new(request(None));
        let started = r#"{"method":"item/started","params":{"item":{"type":"commandExecution","id":"c1","command":"/bin/bash -lc 'touch /etc/x'","status":"inProgress"}}}"#;
        feed(&mut d, started);
        let ask = r#"{"method":"item/commandExecution/requestApproval","id":1,"params":{"itemId":"c1","command":"/bin/bash -lc 'touch /etc/x'"}}"#;
        let r = feed(&mut d, ask);
        let [CliEvent::PermissionRequest(first)] = &r.events[..] else { panic!("{:?}", r.events) };
        assert_eq!(first.tool, "shell");
        // Asked again for the same call: a retry without the sandbox.
        let again = ask.replace("\"id\":1", "\"id\":2");
        let r = feed(&mut d, &again);
        let [CliEvent::PermissionRequest(second)] = &r.events[..] else { panic!("{:?}", r.events) };
        assert_eq!(second.tool, ESCALATION_TOOL);
        assert_eq!(second.input["input"]["command"], "touch /etc/x");
        let net = r#"{"method":"item/commandExecution/requestApproval","id":3,"params":{"itemId":"c2","command":"curl x","networkApprovalContext":{"host":"x"}}}"#;
        let r = feed(&mut d, net);
        assert!(
            matches!(&r.events[..], [_, CliEvent::PermissionRequest(p)] if p.tool == ESCALATION_TOOL),
            "{:?}",
            r.events
        );
        let blind = r#"{"method":"item/fileChange/requestApproval","id":4,"params":{"itemId":"p9"}}"#;
        let r = feed(&mut d, blind);
        assert!(
            matches!(&r.events[..], [_, CliEvent::PermissionRequest(p)] if p.tool == ESCALATION_TOOL),
            "{:?}",
            r.events
        );
        // A move is decided on where it goes too.
        let mv = r#"{"method":"item/started","params":{"item":{"type":"fileChange","id":"p2","changes":[{"path":"/w/a","kind":{"type":"update","move_path":"/w/.git/hooks/pre-commit"}}]}}}"#;
        feed(&mut d, mv);
        let r = feed(&mut d, r#"{"method":"item/fileChange/requestApproval","id":5,"params":{"itemId":"p2"}}"#);
        let [CliEvent::PermissionRequest(p)] = &r.events[..] else { panic!("{:?}", r.events) };
        assert_eq!(p.input["paths"], json!(["/w/a", "/w/.git/hooks/pre-commit"]));
    }

    #[test]
    fn shell_wrappers_are_unwrapped() {
        // Codex quotes with mixed pieces (shlex's join): the real command comes out.
        assert_eq!(unwrap_shell(r#"/bin/bash -lc 'rm -rf "$HOME/x" '"'y'""#), r#"rm -rf "$HOME/x" 'y'"#);
        assert_eq!(unwrap_shell("/bin/bash -lc 'echo hi'"), "echo hi");
        assert_eq!(unwrap_shell(r"bash -c 'echo '\''q'\'''"), "echo 'q'");
        assert_eq!(unwrap_shell(r#"/bin/sh -c "ls -la""#), "ls -la");
        assert_eq!(unwrap_shell("/bin/bash -lc ls"), "ls");
        assert_eq!(unwrap_shell("python3 -c 'x'"), "python3 -c 'x'");
        assert_eq!(unwrap_shell("ls"), "ls");
    }
}
