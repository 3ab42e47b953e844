//! Codex (`codex exec --json`). Items are mapped to messages and tool calls: `agent_message` →
//! answer text, `reasoning` → thinking, `command_execution` → a `shell` tool call and its result,
//! `file_change` → an `apply_patch` call, `mcp_tool_call` → an `mcp__server__tool` call,
//! `web_search` → a `web_search` call, `error` → a notice; `thread.started` gives the session.
//!
//! Permissions: `codex exec` has no interactive approvals (they need `codex app-server`), so
//! Descartes cannot answer them. Its sandbox is the policy instead: `read-only` by default
//! (commands run but cannot write), `workspace-write` with `-y` (writes inside the working
//! directory, no network). Tokens are reported, money is not.

use std::collections::HashSet;

use async_trait::async_trait;
use descartes_core::{AgentCli, CliEvent, CliRequest, CliSession, ProviderError};
use descartes_protocol::{ContentPart, Usage};
use serde_json::{Map, Value, json};

use crate::command::full_prompt;
use crate::process::CliProcess;
use crate::session::{Decoded, Decoder, ProcessSession, parse_json_line};
use crate::{CliOptions, str_of, u64_of};

pub const INSTALL_HINT: &str = "npm install -g @openai/codex";

/// The `codex` backend.
#[derive(Debug, Clone, Default)]
pub struct Codex {
    pub options: CliOptions,
}

impl Codex {
    pub fn new(options: CliOptions) -> Self {
        Self { options }
    }

    /// The command line for a request (without the program).
    pub fn args(&self, request: &CliRequest) -> Vec<String> {
        let mut args: Vec<String> = vec!["exec".into(), "--json".into(), "--skip-git-repo-check".into()];
        let sandbox = if request.auto_approve { "workspace-write" } else { "read-only" };
        args.extend(["--sandbox".into(), sandbox.into()]);
        if let Some(model) = &request.model {
            args.extend(["-m".into(), model.clone()]);
        }
        args.extend(self.options.extra_args.iter().cloned());
        if let Some(id) = &request.resume_session {
            args.extend(["resume".into(), id.clone()]);
        }
        // After `--` so that a prompt starting with `-` is not taken for an option.
        args.push("--".into());
        args.push(full_prompt(request));
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
        let spawn = self.options.spawn(self.name(), program, self.args(&request), &request.cwd, INSTALL_HINT.into());
        let process = CliProcess::spawn(spawn).await?;
        Ok(Box::new(ProcessSession::new(process, CodexDecoder::default())))
    }
}

/// `codex exec --json` output, line by line.
#[derive(Debug, Default)]
pub struct CodexDecoder {
    /// Tool calls already reported (at `item.started`).
    started: HashSet<String>,
    /// Reasoning waiting for the next message it belongs to.
    thinking: Vec<ContentPart>,
    /// The last agent message: the run's result.
    answer: String,
    usage: Option<Usage>,
    last_error: Option<String>,
    finished: bool,
}

impl CodexDecoder {
    fn message(&mut self, part: ContentPart, out: &mut Vec<CliEvent>) {
        let mut parts = std::mem::take(&mut self.thinking);
        parts.push(part);
        out.push(CliEvent::AssistantMessage { parts, usage: None, stop_reason: None });
    }

    /// The tool call an item stands for: (tool, input).
    fn tool_of(item: &Map<String, Value>) -> Option<(String, Value)> {
        match item.get("type").and_then(Value::as_str)? {
            "command_execution" => Some(("shell".into(), json!({"command": str_of(item.get("command"))}))),
            "file_change" => {
                Some(("apply_patch".into(), json!({"changes": item.get("changes").cloned().unwrap_or(Value::Null)})))
            }
            "mcp_tool_call" => Some((
                format!("mcp__{}__{}", str_of(item.get("server")), str_of(item.get("tool"))),
                item.get("arguments").cloned().unwrap_or(Value::Object(Map::new())),
            )),
            "web_search" => Some(("web_search".into(), json!({"query": str_of(item.get("query"))}))),
            _ => None,
        }
    }

    /// The result of a completed tool item: (output, is_error).
    fn result_of(item: &Map<String, Value>) -> (String, bool) {
        let failed = str_of(item.get("status")) == "failed";
        match item.get("type").and_then(Value::as_str).unwrap_or("") {
            "command_execution" => {
                let output = str_of(item.get("aggregated_output"));
                let code = item.get("exit_code").and_then(Value::as_i64);
                let is_error = failed || code.is_some_and(|c| c != 0);
                let output = match code {
                    Some(c) if c != 0 => format!("{output}\n[exit code {c}]").trim_start().to_owned(),
                    _ => output,
                };
                (output, is_error)
            }
            "file_change" => {
                let changes = item.get("changes").and_then(Value::as_array).cloned().unwrap_or_default();
                let lines: Vec<String> =
                    changes.iter().map(|c| format!("{} {}", str_of(c.get("kind")), str_of(c.get("path")))).collect();
                (lines.join("\n"), failed)
            }
            "mcp_tool_call" => {
                if let Some(e) = item.get("error").filter(|e| !e.is_null()) {
                    return (
                        e.get("message").and_then(Value::as_str).map_or_else(|| e.to_string(), str::to_owned),
                        true,
                    );
                }
                let result = item.get("result");
                let text = crate::text_of(result.and_then(|r| r.get("content")));
                (text, failed)
            }
            _ => (String::new(), failed),
        }
    }
}

impl Decoder for CodexDecoder {
    fn line(&mut self, line: &str) -> Result<Decoded, String> {
        let v = parse_json_line("codex", line)?;
        let mut out = Vec::new();
        match v.get("type").and_then(Value::as_str).unwrap_or("") {
            "thread.started" => {
                if let Some(id) = v.get("thread_id").and_then(Value::as_str) {
                    out.push(CliEvent::SessionStarted { session_id: id.to_owned(), model: None });
                }
            }
            kind @ ("item.started" | "item.completed") => {
                let Some(item) = v.get("item").and_then(Value::as_object) else { return Ok(Decoded::default()) };
                let id = str_of(item.get("id"));
                let completed = kind == "item.completed";
                match item.get("type").and_then(Value::as_str).unwrap_or("") {
                    "agent_message" if completed => {
                        let text = str_of(item.get("text"));
                        self.answer = text.clone();
                        self.message(ContentPart::text(text), &mut out);
                    }
                    "reasoning" if completed => {
                        let text = str_of(item.get("text"));
                        if !text.is_empty() {
                            self.thinking.push(ContentPart::Thinking { text, signature: None });
                        }
                    }
                    "error" if completed => {
                        let message = str_of(item.get("message"));
                        out.push(CliEvent::Notice(message));
                    }
                    _ => {
                        if let Some((tool, input)) = Self::tool_of(item) {
                            if self.started.insert(id.clone()) {
                                self.message(ContentPart::ToolUse { id: id.clone(), name: tool, input }, &mut out);
                                out.push(CliEvent::ToolStarted { tool_use_id: id.clone() });
                            }
                            if completed {
                                let (output, is_error) = Self::result_of(item);
                                out.push(CliEvent::ToolResult { tool_use_id: id, output, is_error });
                            }
                        }
                    }
                }
            }
            "turn.completed" => {
                let u = v.get("usage");
                let usage = Usage {
                    input_tokens: u64_of(u.and_then(|u| u.get("input_tokens"))),
                    output_tokens: u64_of(u.and_then(|u| u.get("output_tokens"))),
                    cache_read_tokens: u64_of(u.and_then(|u| u.get("cached_input_tokens"))),
                    cache_write_tokens: 0,
                };
                // Several turns may run in one exec: totals add up.
                let total = self.usage.get_or_insert_with(Usage::default);
                total.add(&usage);
                out.push(CliEvent::Usage { usage: *total, cost_usd: None });
            }
            "turn.failed" => {
                let message = v
                    .get("error")
                    .and_then(|e| e.get("message"))
                    .and_then(Value::as_str)
                    .unwrap_or("the turn failed")
                    .to_owned();
                self.last_error = Some(message.clone());
                self.finished = true;
                out.push(CliEvent::Finished {
                    result: message,
                    is_error: true,
                    subtype: Some("turn_failed".into()),
                    usage: self.usage,
                    cost_usd: None,
                });
            }
            "error" => {
                let message = str_of(v.get("message"));
                self.last_error = Some(message.clone());
                out.push(CliEvent::Notice(message));
            }
            // turn.started, item.updated, and types added later.
            _ => {}
        }
        Ok(Decoded::events(out))
    }

    fn at_exit(&mut self, _success: bool) -> Vec<CliEvent> {
        if self.finished {
            return Vec::new();
        }
        let mut out = Vec::new();
        if !self.thinking.is_empty() {
            let parts = std::mem::take(&mut self.thinking);
            out.push(CliEvent::AssistantMessage { parts, usage: None, stop_reason: None });
        }
        out.push(CliEvent::Finished {
            result: self.answer.clone(),
            is_error: false,
            subtype: None,
            usage: self.usage,
            cost_usd: None,
        });
        out
    }

    fn last_error(&self) -> Option<String> {
        self.last_error.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = r#"{"type":"thread.started","thread_id":"0199abc"}
{"type":"turn.started"}
{"type":"item.completed","item":{"id":"item_0","type":"reasoning","text":"**Listing files**"}}
{"type":"item.started","item":{"id":"item_1","type":"command_execution","command":"bash -lc ls","aggregated_output":"","exit_code":null,"status":"in_progress"}}
{"type":"item.completed","item":{"id":"item_1","type":"command_execution","command":"bash -lc ls","aggregated_output":"a.rs\n","exit_code":0,"status":"completed"}}
{"type":"item.completed","item":{"id":"item_2","type":"file_change","changes":[{"path":"src/a.rs","kind":"update"}],"status":"completed"}}
{"type":"item.completed","item":{"id":"item_3","type":"agent_message","text":"Done."}}
{"type":"turn.completed","usage":{"input_tokens":24763,"cached_input_tokens":24448,"output_tokens":122}}"#;

    fn decode_all(d: &mut CodexDecoder, text: &str) -> Vec<CliEvent> {
        text.lines().flat_map(|l| d.line(l).unwrap().events).collect()
    }

    #[test]
    fn protocol_fixture() {
        let mut d = CodexDecoder::default();
        let mut events = decode_all(&mut d, FIXTURE);
        events.extend(d.at_exit(true));
        assert_eq!(events[0], CliEvent::SessionStarted { session_id: "0199abc".into(), model: None });
        assert_eq!(
            events[1],
            CliEvent::AssistantMessage {
                parts: vec![
                    ContentPart::Thinking { text: "**Listing files**".into(), signature: None },
                    ContentPart::ToolUse {
                        id: "item_1".into(),
                        name: "shell".into(),
                        input: json!({"command":"bash -lc ls"})
                    }
                ],
                usage: None,
                stop_reason: None
            }
        );
        assert_eq!(events[2], CliEvent::ToolStarted { tool_use_id: "item_1".into() });
        assert_eq!(
            events[3],
            CliEvent::ToolResult { tool_use_id: "item_1".into(), output: "a.rs\n".into(), is_error: false }
        );
        assert!(
            matches!(&events[4], CliEvent::AssistantMessage { parts, .. } if matches!(&parts[0], ContentPart::ToolUse { name, .. } if name == "apply_patch"))
        );
        assert_eq!(events[5], CliEvent::ToolStarted { tool_use_id: "item_2".into() });
        assert_eq!(
            events[6],
            CliEvent::ToolResult { tool_use_id: "item_2".into(), output: "update src/a.rs".into(), is_error: false }
        );
        assert!(
            matches!(&events[7], CliEvent::AssistantMessage { parts, .. } if parts == &vec![ContentPart::text("Done.")])
        );
        let usage = Usage { input_tokens: 24763, output_tokens: 122, cache_read_tokens: 24448, cache_write_tokens: 0 };
        assert_eq!(events[8], CliEvent::Usage { usage, cost_usd: None });
        assert_eq!(
            events[9],
            CliEvent::Finished {
                result: "Done.".into(),
                is_error: false,
                subtype: None,
                usage: Some(usage),
                cost_usd: None
            }
        );
        assert_eq!(events.len(), 10);
    }

    #[test]
    fn failures() {
        let mut d = CodexDecoder::default();
        let events = decode_all(
            &mut d,
            r#"{"type":"item.completed","item":{"id":"i","type":"command_execution","command":"false","aggregated_output":"","exit_code":1,"status":"failed"}}
{"type":"error","message":"stream disconnected"}
{"type":"turn.failed","error":{"message":"unexpected status 401"}}
{"type":"some.new.event"}"#,
        );
        assert!(matches!(&events[2], CliEvent::ToolResult { is_error: true, output, .. } if output == "[exit code 1]"));
        assert_eq!(events[3], CliEvent::Notice("stream disconnected".into()));
        assert!(
            matches!(&events[4], CliEvent::Finished { is_error: true, result, .. } if result == "unexpected status 401")
        );
        assert_eq!(events.len(), 5);
        assert!(d.at_exit(true).is_empty());
        assert!(d.line("not json").is_err());
    }

    #[test]
    fn arguments() {
        let c = Codex::default();
        let mut req = CliRequest {
            max_cost_usd: None,
            prompt: "-fix".into(),
            resume_session: None,
            cwd: ".".into(),
            model: Some("gpt-x".into()),
            system_prompt: None,
            auto_approve: false,
        };
        assert_eq!(
            c.args(&req),
            ["exec", "--json", "--skip-git-repo-check", "--sandbox", "read-only", "-m", "gpt-x", "--", "-fix"]
        );
        req.auto_approve = true;
        req.resume_session = Some("0199".into());
        req.model = None;
        assert_eq!(
            c.args(&req),
            ["exec", "--json", "--skip-git-repo-check", "--sandbox", "workspace-write", "resume", "0199", "--", "-fix"]
        );
    }
}
