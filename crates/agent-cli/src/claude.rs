//! Claude Code (`claude -p`), driven over stream-json on stdin and stdout, every tool call
//! decided by Descartes.
//!
//! The control protocol (as the official Agent SDKs speak it; checked against the pinned CLI,
//! see `docs/PROTOCOLS.md`):
//! - first on stdin, `{"type":"control_request","request_id":..,"request":{"subtype":"initialize",
//!   "hooks":{"PreToolUse":[{"matcher":null,"hookCallbackIds":["descartes_pre_tool_use"]}]}}}`:
//!   a `PreToolUse` hook for every tool, so that the calls Claude Code would allow by itself
//!   (read-only commands such as `echo`, `ls`, `cat`) are decided too;
//! - the CLI then sends `control_request` `hook_callback` (`callback_id`, `input` with
//!   `tool_name`, `tool_input`, `tool_use_id`) before each call, answered with
//!   `{"hookSpecificOutput":{"hookEventName":"PreToolUse","permissionDecision":"allow"|"deny",
//!   "permissionDecisionReason":..}}`;
//! - `control_request` `can_use_tool` (the permission prompt tool `stdio`) still comes for the
//!   asks Claude Code makes on its own; a call the hook already allowed is allowed again at once
//!   (one decision per call), others are decided like a hook call.

use async_trait::async_trait;
use descartes_core::{AgentCli, CliAnswer, CliEvent, CliPermissionRequest, CliRequest, CliSession, ProviderError};
use descartes_protocol::{ContentPart, Timestamp, Usage};
use serde_json::{Map, Value, json};

use crate::process::{CliProcess, Spawn};
use crate::session::{Decoded, Decoder, ProcessSession, parse_json_line};
use crate::{CliOptions, str_of, text_of, u64_of};

pub const INSTALL_HINT: &str = "npm install -g @anthropic-ai/claude-code";

/// Claude Code's tools that only read: allowed by Descartes' `builtin:read-only` rule.
pub const READ_ONLY_TOOLS: &[&str] = &[
    "Read",
    "Glob",
    "Grep",
    "LS",
    "NotebookRead",
    "TodoRead",
    "TodoWrite",
    "WebSearch",
    "BashOutput",
    "ListMcpResourcesTool",
    "ReadMcpResourceTool",
    "ToolSearch",
];

/// The `claude-code` backend (alias `headless`).
#[derive(Debug, Clone, Default)]
pub struct ClaudeCode {
    pub options: CliOptions,
}

impl ClaudeCode {
    pub fn new(options: CliOptions) -> Self {
        Self { options }
    }

    /// The command line for a request (without the program).
    pub fn args(&self, request: &CliRequest) -> Vec<String> {
        let mut args: Vec<String> = [
            "-p",
            "--verbose",
            "--output-format",
            "stream-json",
            "--input-format",
            "stream-json",
            "--include-partial-messages",
            "--permission-prompt-tool",
            "stdio",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if let Some(id) = &request.resume_session {
            args.extend(["--resume".into(), id.clone()]);
        }
        if let Some(model) = &request.model {
            args.extend(["--model".into(), model.clone()]);
        }
        if let Some(system) = &request.system_prompt {
            args.extend(["--append-system-prompt".into(), system.clone()]);
        }
        if let Some(max) = request.max_cost_usd {
            args.extend(["--max-budget-usd".into(), format!("{max}")]);
        }
        args.extend(self.options.extra_args.iter().cloned());
        args
    }
}

/// The id of Descartes' `PreToolUse` hook callback.
pub const HOOK_CALLBACK_ID: &str = "descartes_pre_tool_use";

/// The `initialize` control request that registers Descartes' `PreToolUse` hook for every tool.
pub fn initialize_request() -> String {
    json!({
        "type": "control_request",
        "request_id": "descartes_initialize",
        "request": {
            "subtype": "initialize",
            "hooks": {"PreToolUse": [{"matcher": null, "hookCallbackIds": [HOOK_CALLBACK_ID]}]},
        },
    })
    .to_string()
}

/// The stream-json user message that carries the prompt.
pub fn user_message(prompt: &str) -> String {
    json!({
        "type": "user",
        "message": {"role": "user", "content": prompt},
        "parent_tool_use_id": null,
        "session_id": "default",
    })
    .to_string()
}

#[async_trait]
impl AgentCli for ClaudeCode {
    fn name(&self) -> &str {
        "claude-code"
    }

    async fn start(&self, request: CliRequest) -> Result<Box<dyn CliSession>, ProviderError> {
        let mut stdin = initialize_request();
        stdin.push('\n');
        stdin.push_str(&user_message(&request.prompt));
        stdin.push('\n');
        let program = self.options.program_or("claude");
        let args = self.args(&request);
        let spawn = Spawn {
            stdin: Some(stdin),
            keep_stdin: true,
            ..self.options.spawn(self.name(), program, args, &request.cwd, INSTALL_HINT.into())
        };
        let process = CliProcess::spawn(spawn).await?;
        Ok(Box::new(ProcessSession::new(process, ClaudeDecoder::default())))
    }
}

/// Claude Code's stream-json output, line by line.
///
/// Claude Code prints one `assistant` line per content block, all with the same message id:
/// the blocks are gathered and the message is reported once the next line is about
/// something else.
#[derive(Debug, Default)]
pub struct ClaudeDecoder {
    pending: Option<Pending>,
    last_error: Option<String>,
    /// Requests that came through the hook: answered in the hook's format.
    hook_requests: std::collections::HashSet<String>,
    /// Tool uses the hook allowed: a later `can_use_tool` for them is allowed at once.
    hook_allowed: std::collections::HashSet<String>,
}

#[derive(Debug)]
struct Pending {
    id: Option<String>,
    parts: Vec<ContentPart>,
    usage: Option<Usage>,
    stop_reason: Option<String>,
}

impl ClaudeDecoder {
    fn flush(&mut self, out: &mut Vec<CliEvent>) {
        if let Some(p) = self.pending.take() {
            out.push(CliEvent::AssistantMessage { parts: p.parts, usage: p.usage, stop_reason: p.stop_reason });
        }
    }

    fn assistant(&mut self, v: &Map<String, Value>, out: &mut Vec<CliEvent>) {
        let Some(message) = v.get("message").and_then(Value::as_object) else { return };
        let id = message.get("id").and_then(Value::as_str).map(str::to_owned);
        let same = matches!((&self.pending, &id), (Some(p), Some(id)) if p.id.as_deref() == Some(id));
        if !same {
            self.flush(out);
            self.pending = Some(Pending { id, parts: Vec::new(), usage: None, stop_reason: None });
        }
        let Some(pending) = self.pending.as_mut() else { return };
        if let Some(usage) = message.get("usage").and_then(usage_of) {
            pending.usage = Some(usage);
        }
        if let Some(reason) = message.get("stop_reason").and_then(Value::as_str) {
            pending.stop_reason = Some(reason.to_owned());
        }
        for block in message.get("content").and_then(Value::as_array).into_iter().flatten() {
            match block.get("type").and_then(Value::as_str) {
                Some("text") => pending.parts.push(ContentPart::text(str_of(block.get("text")))),
                Some("thinking") => pending.parts.push(ContentPart::Thinking {
                    text: str_of(block.get("thinking")),
                    signature: block.get("signature").and_then(Value::as_str).map(str::to_owned),
                }),
                Some("tool_use" | "server_tool_use") => pending.parts.push(ContentPart::ToolUse {
                    id: str_of(block.get("id")),
                    name: str_of(block.get("name")),
                    input: block.get("input").cloned().unwrap_or(Value::Object(Map::new())),
                }),
                _ => {}
            }
        }
    }
}

impl Decoder for ClaudeDecoder {
    fn line(&mut self, line: &str) -> Result<Decoded, String> {
        let v = parse_json_line("claude", line)?;
        let mut out = Vec::new();
        let mut replies = Vec::new();
        match v.get("type").and_then(Value::as_str).unwrap_or("") {
            "system" => {
                self.flush(&mut out);
                if v.get("subtype").and_then(Value::as_str) == Some("init")
                    && let Some(id) = v.get("session_id").and_then(Value::as_str)
                {
                    out.push(CliEvent::SessionStarted {
                        session_id: id.to_owned(),
                        model: v.get("model").and_then(Value::as_str).map(str::to_owned),
                    });
                }
            }
            "assistant" => self.assistant(&v, &mut out),
            "user" => {
                self.flush(&mut out);
                let content = v.get("message").and_then(|m| m.get("content"));
                for block in content.and_then(Value::as_array).into_iter().flatten() {
                    if block.get("type").and_then(Value::as_str) == Some("tool_result") {
                        out.push(CliEvent::ToolResult {
                            tool_use_id: str_of(block.get("tool_use_id")),
                            output: text_of(block.get("content")),
                            is_error: block.get("is_error").and_then(Value::as_bool).unwrap_or(false),
                        });
                    }
                }
            }
            "stream_event" => {
                let event = v.get("event");
                match event.and_then(|e| e.get("type")).and_then(Value::as_str) {
                    Some("message_start") => self.flush(&mut out),
                    Some("message_delta") => {
                        // Final counts of the message being gathered (running totals: assign).
                        if let (Some(pending), Some(u)) =
                            (self.pending.as_mut(), event.and_then(|e| e.get("usage")).and_then(Value::as_object))
                        {
                            let usage = pending.usage.get_or_insert_with(Usage::default);
                            for (key, slot) in [
                                ("input_tokens", &mut usage.input_tokens),
                                ("output_tokens", &mut usage.output_tokens),
                                ("cache_read_input_tokens", &mut usage.cache_read_tokens),
                                ("cache_creation_input_tokens", &mut usage.cache_write_tokens),
                            ] {
                                if let Some(n) = u.get(key).and_then(Value::as_u64) {
                                    *slot = n;
                                }
                            }
                        }
                    }
                    Some("content_block_delta") => {
                        let delta = event.and_then(|e| e.get("delta"));
                        if delta.and_then(|d| d.get("type")).and_then(Value::as_str) == Some("text_delta") {
                            let text = str_of(delta.and_then(|d| d.get("text")));
                            if !text.is_empty() {
                                out.push(CliEvent::TextDelta(text));
                            }
                        }
                    }
                    _ => {}
                }
            }
            "control_request" => {
                self.flush(&mut out);
                let request_id = str_of(v.get("request_id"));
                let request = v.get("request");
                match request.and_then(|r| r.get("subtype")).and_then(Value::as_str) {
                    Some("can_use_tool") => {
                        let input = request.and_then(|r| r.get("input")).cloned().unwrap_or(Value::Object(Map::new()));
                        let use_id = tool_use_id_of(request);
                        if use_id.as_ref().is_some_and(|id| self.hook_allowed.contains(id)) {
                            // Decided (and recorded) when the hook asked: one decision per call.
                            replies.push(can_use_tool_answer(&request_id, &CliAnswer::Allow { updated_input: input }));
                        } else {
                            let tool = str_of(request.and_then(|r| r.get("tool_name")));
                            out.push(CliEvent::PermissionRequest(CliPermissionRequest {
                                request_id,
                                read_only: READ_ONLY_TOOLS.contains(&tool.as_str()),
                                tool,
                                input,
                                tool_use_id: use_id,
                            }));
                        }
                    }
                    Some("hook_callback")
                        if request.and_then(|r| r.get("callback_id")).and_then(Value::as_str)
                            == Some(HOOK_CALLBACK_ID) =>
                    {
                        let hook = request.and_then(|r| r.get("input"));
                        let tool = str_of(hook.and_then(|h| h.get("tool_name")));
                        self.hook_requests.insert(request_id.clone());
                        out.push(CliEvent::PermissionRequest(CliPermissionRequest {
                            request_id,
                            read_only: READ_ONLY_TOOLS.contains(&tool.as_str()),
                            tool,
                            input: hook.and_then(|h| h.get("tool_input")).cloned().unwrap_or(Value::Object(Map::new())),
                            tool_use_id: tool_use_id_of(hook).or_else(|| tool_use_id_of(request)),
                        }));
                    }
                    other => {
                        // Hooks, MCP messages, ...: not offered by Descartes. Answer so the CLI
                        // does not wait.
                        replies.push(
                            json!({
                                "type": "control_response",
                                "response": {
                                    "subtype": "error",
                                    "request_id": request_id,
                                    "error": format!("control request `{}` is not supported by Descartes", other.unwrap_or("")),
                                },
                            })
                            .to_string(),
                        );
                    }
                }
            }
            "rate_limit_event" => {
                let info = v.get("rate_limit_info");
                let status = str_of(info.and_then(|i| i.get("status")));
                let resets = info.and_then(|i| i.get("resetsAt")).and_then(Value::as_f64).filter(|t| *t > 0.0);
                if status == "rejected" {
                    self.flush(&mut out);
                    let kind = str_of(info.and_then(|i| i.get("rateLimitType")));
                    let reason = if kind.is_empty() {
                        "Claude Code usage limit reached".to_owned()
                    } else {
                        format!("Claude Code usage limit reached ({kind})")
                    };
                    out.push(CliEvent::RateLimited {
                        until: resets.map(|secs| Timestamp((secs * 1_000_000.0) as i64)),
                        reason,
                    });
                }
            }
            "result" => {
                self.flush(&mut out);
                let subtype = v.get("subtype").and_then(Value::as_str).map(str::to_owned);
                let is_error = v.get("is_error").and_then(Value::as_bool).unwrap_or(false)
                    || subtype.as_deref().is_some_and(|s| s.starts_with("error"));
                let mut result = str_of(v.get("result"));
                if result.is_empty()
                    && let Some(errors) = v.get("errors").and_then(Value::as_array)
                {
                    result = errors.iter().map(|e| text_of(Some(e))).collect::<Vec<_>>().join("; ");
                }
                if is_error {
                    self.last_error = Some(result.clone());
                }
                out.push(CliEvent::Finished {
                    result,
                    is_error,
                    subtype,
                    usage: v.get("usage").and_then(usage_of),
                    cost_usd: v.get("total_cost_usd").and_then(Value::as_f64),
                });
            }
            // control_response (to our requests), keep_alive, and types added later.
            _ => {}
        }
        Ok(Decoded { events: out, replies })
    }

    fn answer(&mut self, request: &CliPermissionRequest, answer: &CliAnswer) -> Option<String> {
        if !self.hook_requests.remove(&request.request_id) {
            return Some(can_use_tool_answer(&request.request_id, answer));
        }
        let (decision, reason) = match answer {
            CliAnswer::Allow { .. } => {
                self.hook_allowed.extend(request.tool_use_id.clone());
                ("allow", "allowed by Descartes".to_owned())
            }
            CliAnswer::Deny { message } => ("deny", message.clone()),
        };
        let response = json!({
            "hookSpecificOutput": {
                "hookEventName": "PreToolUse",
                "permissionDecision": decision,
                "permissionDecisionReason": reason,
            },
        });
        Some(
            json!({
                "type": "control_response",
                "response": {"subtype": "success", "request_id": request.request_id, "response": response},
            })
            .to_string(),
        )
    }

    fn last_error(&self) -> Option<String> {
        self.last_error.clone()
    }
}

/// The `tool_use_id` of a request or hook input.
fn tool_use_id_of(v: Option<&Value>) -> Option<String> {
    v.and_then(|r| r.get("tool_use_id")).and_then(Value::as_str).map(str::to_owned)
}

/// The answer to a `can_use_tool` request.
fn can_use_tool_answer(request_id: &str, answer: &CliAnswer) -> String {
    let response = match answer {
        CliAnswer::Allow { updated_input } => json!({"behavior": "allow", "updatedInput": updated_input}),
        CliAnswer::Deny { message } => json!({"behavior": "deny", "message": message, "interrupt": false}),
    };
    json!({
        "type": "control_response",
        "response": {"subtype": "success", "request_id": request_id, "response": response},
    })
    .to_string()
}

/// Anthropic-style usage (`input_tokens`, `output_tokens`, `cache_read_input_tokens`,
/// `cache_creation_input_tokens`).
pub fn usage_of(v: &Value) -> Option<Usage> {
    let o = v.as_object()?;
    Some(Usage {
        input_tokens: u64_of(o.get("input_tokens")),
        output_tokens: u64_of(o.get("output_tokens")),
        cache_read_tokens: u64_of(o.get("cache_read_input_tokens")),
        cache_write_tokens: u64_of(o.get("cache_creation_input_tokens")),
        ..Usage::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(d: &mut ClaudeDecoder, line: &str) -> Vec<CliEvent> {
        d.line(line).unwrap().events
    }

    #[test]
    fn protocol_fixture_maps_in_order() {
        let mut d = ClaudeDecoder::default();
        let init = r#"{"type":"system","subtype":"init","session_id":"s1","cwd":".","model":"claude-x","tools":[],"mcp_servers":[],"permissionMode":"default"}"#;
        assert_eq!(
            decode(&mut d, init),
            vec![CliEvent::SessionStarted { session_id: "s1".into(), model: Some("claude-x".into()) }]
        );
        let assistant = r#"{"type":"assistant","session_id":"s1","message":{"id":"msg_1","role":"assistant","content":[{"type":"text","text":"I'll list files"},{"type":"tool_use","id":"toolu_1","name":"Bash","input":{"command":"ls"}}],"stop_reason":"tool_use","usage":{}}}"#;
        assert!(decode(&mut d, assistant).is_empty(), "held until the message is complete");
        let user = r#"{"type":"user","session_id":"s1","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":"a.rs","is_error":false}]}}"#;
        let events = decode(&mut d, user);
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0],
            CliEvent::AssistantMessage {
                parts: vec![
                    ContentPart::text("I'll list files"),
                    ContentPart::ToolUse { id: "toolu_1".into(), name: "Bash".into(), input: json!({"command":"ls"}) }
                ],
                usage: Some(Usage::default()),
                stop_reason: Some("tool_use".into()),
            }
        );
        assert_eq!(
            events[1],
            CliEvent::ToolResult { tool_use_id: "toolu_1".into(), output: "a.rs".into(), is_error: false }
        );
        let delta = r#"{"type":"stream_event","session_id":"s1","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}}"#;
        assert_eq!(decode(&mut d, delta), vec![CliEvent::TextDelta("Hel".into())]);
        let rate = r#"{"type":"rate_limit_event","session_id":"s1","rate_limit_info":{"status":"allowed_warning","resetsAt":0,"utilization":0.9}}"#;
        assert!(decode(&mut d, rate).is_empty());
        let result = r#"{"type":"result","subtype":"success","is_error":false,"duration_ms":1000,"num_turns":1,"session_id":"s1","result":"Final text","total_cost_usd":0.001,"usage":{"input_tokens":3,"output_tokens":4},"permission_denials":[]}"#;
        assert_eq!(
            decode(&mut d, result),
            vec![CliEvent::Finished {
                result: "Final text".into(),
                is_error: false,
                subtype: Some("success".into()),
                usage: Some(Usage { input_tokens: 3, output_tokens: 4, ..Default::default() }),
                cost_usd: Some(0.001),
            }]
        );
    }

    #[test]
    fn blocks_of_one_message_are_gathered() {
        // What Claude Code 2.1 really prints: one line per content block, same message id.
        let mut d = ClaudeDecoder::default();
        let a = r#"{"type":"assistant","message":{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"Creating it."}],"model":"m","stop_reason":null,"usage":{"input_tokens":10,"output_tokens":1}},"parent_tool_use_id":null,"session_id":"s"}"#;
        let b = r#"{"type":"assistant","message":{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"tool_use","id":"toolu_1","name":"Bash","input":{"command":"touch x"}}],"model":"m","stop_reason":null,"usage":{"input_tokens":10,"output_tokens":1}},"parent_tool_use_id":null,"session_id":"s"}"#;
        let req = r#"{"type":"control_request","request_id":"r1","request":{"subtype":"can_use_tool","tool_name":"Bash","display_name":"Bash","input":{"command":"touch x"},"permission_suggestions":[],"tool_use_id":"toolu_1"}}"#;
        assert!(decode(&mut d, a).is_empty());
        assert!(decode(&mut d, b).is_empty());
        let events = decode(&mut d, req);
        assert_eq!(events.len(), 2);
        let CliEvent::AssistantMessage { parts, .. } = &events[0] else { panic!("{events:?}") };
        assert_eq!(parts.len(), 2);
        let CliEvent::PermissionRequest(r) = &events[1] else { panic!("{events:?}") };
        assert_eq!(r.request_id, "r1");
        assert_eq!(r.tool, "Bash");
        assert_eq!(r.tool_use_id.as_deref(), Some("toolu_1"));
        assert!(!r.read_only);
        let allow = d.answer(r, &CliAnswer::Allow { updated_input: json!({"command":"touch x"}) }).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&allow).unwrap(),
            json!({"type":"control_response","response":{"subtype":"success","request_id":"r1","response":{"behavior":"allow","updatedInput":{"command":"touch x"}}}})
        );
        let deny = d.answer(r, &CliAnswer::Deny { message: "no".into() }).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&deny).unwrap(),
            json!({"type":"control_response","response":{"subtype":"success","request_id":"r1","response":{"behavior":"deny","message":"no","interrupt":false}}})
        );
    }

    #[test]
    fn message_delta_usage_completes_the_gathered_message() {
        let mut d = ClaudeDecoder::default();
        let a = r#"{"type":"assistant","message":{"id":"m","role":"assistant","content":[{"type":"text","text":"x"}],"usage":{"input_tokens":10,"output_tokens":1}}}"#;
        let delta = r#"{"type":"stream_event","event":{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":7}}}"#;
        assert!(decode(&mut d, a).is_empty());
        assert!(decode(&mut d, delta).is_empty());
        let events = decode(&mut d, r#"{"type":"stream_event","event":{"type":"message_stop"}}"#);
        assert!(events.is_empty(), "message_stop does not end the gathering");
        let events = decode(&mut d, r#"{"type":"result","subtype":"success","is_error":false,"result":"x"}"#);
        let CliEvent::AssistantMessage { usage, .. } = &events[0] else { panic!("{events:?}") };
        assert_eq!(*usage, Some(Usage { input_tokens: 10, output_tokens: 7, ..Default::default() }));
    }

    #[test]
    fn the_pre_tool_use_hook_asks_descartes_about_every_call_once() {
        let init: Value = serde_json::from_str(&initialize_request()).unwrap();
        assert_eq!(init["request"]["subtype"], "initialize");
        assert_eq!(init["request"]["hooks"]["PreToolUse"][0]["hookCallbackIds"][0], HOOK_CALLBACK_ID);
        let mut d = ClaudeDecoder::default();
        // A call Claude Code would allow by itself (`echo`) still comes to Descartes.
        let hook = r#"{"type":"control_request","request_id":"h1","request":{"subtype":"hook_callback","callback_id":"descartes_pre_tool_use","input":{"session_id":"s","transcript_path":"/t","cwd":"/w","hook_event_name":"PreToolUse","tool_name":"Bash","tool_input":{"command":"echo hi"},"tool_use_id":"toolu_9"},"tool_use_id":"toolu_9"}}"#;
        let events = decode(&mut d, hook);
        let CliEvent::PermissionRequest(r) = &events[0] else { panic!("{events:?}") };
        assert_eq!((r.tool.as_str(), r.tool_use_id.as_deref()), ("Bash", Some("toolu_9")));
        assert_eq!(r.input, json!({"command": "echo hi"}));
        let deny = d.answer(r, &CliAnswer::Deny { message: "no echo".into() }).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&deny).unwrap(),
            json!({"type":"control_response","response":{"subtype":"success","request_id":"h1","response":{
                "hookSpecificOutput":{"hookEventName":"PreToolUse","permissionDecision":"deny","permissionDecisionReason":"no echo"}}}})
        );
        // Allowed by the hook: a `can_use_tool` for the same call is allowed at once, no second
        // decision.
        let events = decode(&mut d, &hook.replace("h1", "h2"));
        let CliEvent::PermissionRequest(r) = &events[0] else { panic!("{events:?}") };
        let allow: Value =
            serde_json::from_str(&d.answer(r, &CliAnswer::Allow { updated_input: json!({}) }).unwrap()).unwrap();
        assert_eq!(allow["response"]["response"]["hookSpecificOutput"]["permissionDecision"], "allow");
        let ask = r#"{"type":"control_request","request_id":"c1","request":{"subtype":"can_use_tool","tool_name":"Bash","input":{"command":"echo hi"},"tool_use_id":"toolu_9"}}"#;
        let out = d.line(ask).unwrap();
        assert!(out.events.is_empty(), "{:?}", out.events);
        let reply: Value = serde_json::from_str(&out.replies[0]).unwrap();
        assert_eq!(reply["response"]["response"]["behavior"], "allow");
    }

    #[test]
    fn other_control_requests_are_answered_with_an_error() {
        let mut d = ClaudeDecoder::default();
        let out =
            d.line(r#"{"type":"control_request","request_id":"h1","request":{"subtype":"hook_callback"}}"#).unwrap();
        assert!(out.events.is_empty());
        let reply: Value = serde_json::from_str(&out.replies[0]).unwrap();
        assert_eq!(reply["response"]["subtype"], "error");
        assert_eq!(reply["response"]["request_id"], "h1");
    }

    #[test]
    fn read_only_tools_are_flagged() {
        let mut d = ClaudeDecoder::default();
        let events = decode(
            &mut d,
            r#"{"type":"control_request","request_id":"r","request":{"subtype":"can_use_tool","tool_name":"Grep","input":{"pattern":"x"}}}"#,
        );
        let CliEvent::PermissionRequest(r) = &events[0] else { panic!() };
        assert!(r.read_only);
        assert_eq!(r.tool_use_id, None);
    }

    #[test]
    fn rejected_rate_limit_parks_and_error_results_fail() {
        let mut d = ClaudeDecoder::default();
        let events = decode(
            &mut d,
            r#"{"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":1700000000,"rateLimitType":"five_hour"}}"#,
        );
        assert_eq!(
            events,
            vec![CliEvent::RateLimited {
                until: Some(Timestamp(1_700_000_000_000_000)),
                reason: "Claude Code usage limit reached (five_hour)".into()
            }]
        );
        let events = decode(
            &mut d,
            r#"{"type":"result","subtype":"error_max_turns","is_error":true,"session_id":"s","total_cost_usd":0.5}"#,
        );
        let CliEvent::Finished { is_error, subtype, cost_usd, .. } = &events[0] else { panic!() };
        assert!(is_error);
        assert_eq!(subtype.as_deref(), Some("error_max_turns"));
        assert_eq!(*cost_usd, Some(0.5));
    }

    #[test]
    fn garbage_and_unknown_lines() {
        let mut d = ClaudeDecoder::default();
        assert!(decode(&mut d, r#"{"type":"brand_new_thing","x":1}"#).is_empty());
        assert!(decode(&mut d, r#"{"no_type":true}"#).is_empty());
        let err = d.line("Error: something broke").unwrap_err();
        assert!(err.contains("not a JSON event") && err.contains("something broke"), "{err}");
        assert!(d.line("[1,2]").is_err());
    }

    #[test]
    fn arguments() {
        let c = ClaudeCode::default();
        let req = CliRequest {
            max_cost_usd: None,
            prompt: "p".into(),
            resume_session: Some("s1".into()),
            cwd: ".".into(),
            model: Some("opus".into()),
            system_prompt: Some("be brief".into()),
            auto_approve: false,
        };
        let args = c.args(&req).join(" ");
        assert!(args.starts_with("-p --verbose --output-format stream-json --input-format stream-json"), "{args}");
        assert!(args.contains("--permission-prompt-tool stdio"));
        assert!(args.contains("--resume s1 --model opus --append-system-prompt be brief"), "{args}");
        assert_eq!(
            serde_json::from_str::<Value>(&user_message("fix it")).unwrap(),
            json!({"type":"user","message":{"role":"user","content":"fix it"},"parent_tool_use_id":null,"session_id":"default"})
        );
    }
}
