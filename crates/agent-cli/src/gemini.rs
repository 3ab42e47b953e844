//! Gemini CLI (`gemini -p PROMPT --output-format stream-json`).
//!
//! Permissions: headless Gemini CLI has no way to ask us. In its `default` approval mode, the
//! tools that need approval (shell, file writes) are refused; `-y` selects `yolo` (everything
//! allowed). Tokens are reported, money is not.

use async_trait::async_trait;
use descartes_core::{AgentCli, CliEvent, CliRequest, CliSession, ProviderError};
use descartes_protocol::{ContentPart, Usage};
use serde_json::{Map, Value};

use crate::command::full_prompt;
use crate::process::CliProcess;
use crate::session::{Decoded, Decoder, ProcessSession, parse_json_line};
use crate::{CliOptions, str_of, text_of, u64_of};

pub const INSTALL_HINT: &str = "npm install -g @google/gemini-cli";

/// The `gemini-cli` backend.
#[derive(Debug, Clone, Default)]
pub struct GeminiCli {
    pub options: CliOptions,
}

impl GeminiCli {
    pub fn new(options: CliOptions) -> Self {
        Self { options }
    }

    /// The command line for a request (without the program).
    pub fn args(&self, request: &CliRequest) -> Vec<String> {
        let mut args: Vec<String> = vec!["--output-format".into(), "stream-json".into()];
        if let Some(model) = &request.model {
            args.extend(["-m".into(), model.clone()]);
        }
        let mode = if request.auto_approve { "yolo" } else { "default" };
        args.extend(["--approval-mode".into(), mode.into()]);
        if let Some(id) = &request.resume_session {
            args.extend(["--resume".into(), id.clone()]);
        }
        args.extend(self.options.extra_args.iter().cloned());
        // `--prompt=TEXT`: a prompt starting with `-` is not taken for an option.
        args.push(format!("--prompt={}", full_prompt(request)));
        args
    }
}

#[async_trait]
impl AgentCli for GeminiCli {
    fn name(&self) -> &str {
        "gemini-cli"
    }

    async fn start(&self, request: CliRequest) -> Result<Box<dyn CliSession>, ProviderError> {
        let program = self.options.program_or("gemini");
        let spawn = self.options.spawn(self.name(), program, self.args(&request), &request.cwd, INSTALL_HINT.into());
        let process = CliProcess::spawn(spawn).await?;
        Ok(Box::new(ProcessSession::new(process, GeminiDecoder::default())))
    }
}

/// Gemini CLI's stream-json output, line by line.
#[derive(Debug, Default)]
pub struct GeminiDecoder {
    /// Assistant text since the last tool event (the next message's text).
    text: String,
    /// The text of the last assistant message: the run's result.
    answer: String,
    last_error: Option<String>,
    finished: bool,
}

impl GeminiDecoder {
    fn flush_text(&mut self, extra: Option<ContentPart>, out: &mut Vec<CliEvent>) {
        let mut parts = Vec::new();
        if !self.text.is_empty() {
            let text = std::mem::take(&mut self.text);
            self.answer = text.clone();
            parts.push(ContentPart::text(text));
        }
        parts.extend(extra);
        if !parts.is_empty() {
            out.push(CliEvent::AssistantMessage { parts, usage: None, stop_reason: None });
        }
    }
}

fn usage_of(stats: Option<&Value>) -> Option<Usage> {
    let s = stats?.as_object()?;
    Some(Usage {
        input_tokens: u64_of(s.get("input_tokens").or_else(|| s.get("input"))),
        output_tokens: u64_of(s.get("output_tokens")),
        cache_read_tokens: u64_of(s.get("cached")),
        cache_write_tokens: 0,
    })
}

impl Decoder for GeminiDecoder {
    fn line(&mut self, line: &str) -> Result<Decoded, String> {
        let v = parse_json_line("gemini", line)?;
        let mut out = Vec::new();
        match v.get("type").and_then(Value::as_str).unwrap_or("") {
            "init" => {
                if let Some(id) = v.get("session_id").and_then(Value::as_str) {
                    out.push(CliEvent::SessionStarted {
                        session_id: id.to_owned(),
                        model: v.get("model").and_then(Value::as_str).map(str::to_owned),
                    });
                }
            }
            "message" if v.get("role").and_then(Value::as_str) == Some("assistant") => {
                let content = str_of(v.get("content"));
                if !content.is_empty() {
                    self.text.push_str(&content);
                    out.push(CliEvent::TextDelta(content));
                }
            }
            "tool_use" => {
                let id = str_of(v.get("tool_id"));
                let part = ContentPart::ToolUse {
                    id: id.clone(),
                    name: str_of(v.get("tool_name")),
                    input: v.get("parameters").cloned().unwrap_or(Value::Object(Map::new())),
                };
                self.flush_text(Some(part), &mut out);
                out.push(CliEvent::ToolStarted { tool_use_id: id });
            }
            "tool_result" => {
                self.flush_text(None, &mut out);
                let is_error = str_of(v.get("status")) != "success";
                let mut output = text_of(v.get("output"));
                if output.is_empty()
                    && let Some(e) = v.get("error")
                {
                    output = e.get("message").and_then(Value::as_str).map_or_else(|| text_of(Some(e)), str::to_owned);
                }
                out.push(CliEvent::ToolResult { tool_use_id: str_of(v.get("tool_id")), output, is_error });
            }
            "error" => {
                let message = str_of(v.get("message"));
                if str_of(v.get("severity")) == "error" {
                    self.last_error = Some(message.clone());
                }
                out.push(CliEvent::Notice(message));
            }
            "result" => {
                self.flush_text(None, &mut out);
                self.finished = true;
                let status = str_of(v.get("status"));
                let is_error = !status.is_empty() && status != "success";
                let mut result = self.answer.clone();
                if is_error {
                    let error = v.get("error");
                    let message = error
                        .and_then(|e| e.get("message"))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .or_else(|| self.last_error.clone())
                        .unwrap_or_else(|| status.clone());
                    result = message;
                }
                out.push(CliEvent::Finished {
                    result,
                    is_error,
                    subtype: Some(status).filter(|s| !s.is_empty()),
                    usage: usage_of(v.get("stats")),
                    cost_usd: None,
                });
            }
            // user messages (our prompt echoed), and types added later.
            _ => {}
        }
        Ok(Decoded::events(out))
    }

    fn at_exit(&mut self, _success: bool) -> Vec<CliEvent> {
        if self.finished {
            return Vec::new();
        }
        let mut out = Vec::new();
        self.flush_text(None, &mut out);
        if !out.is_empty() {
            out.push(CliEvent::Finished {
                result: self.answer.clone(),
                is_error: false,
                subtype: None,
                usage: None,
                cost_usd: None,
            });
        }
        out
    }

    fn last_error(&self) -> Option<String> {
        self.last_error.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FIXTURE: &str = r#"{"type":"init","timestamp":"2026-01-01T00:00:00Z","session_id":"g1","model":"gemini-x"}
{"type":"message","timestamp":"t","role":"user","content":"list files"}
{"type":"message","timestamp":"t","role":"assistant","content":"Hel","delta":true}
{"type":"message","timestamp":"t","role":"assistant","content":"lo","delta":true}
{"type":"tool_use","timestamp":"t","tool_name":"run_shell_command","tool_id":"t1","parameters":{"command":"ls"}}
{"type":"tool_result","timestamp":"t","tool_id":"t1","status":"success","output":"a.rs"}
{"type":"error","timestamp":"t","severity":"warning","message":"slow"}
{"type":"message","timestamp":"t","role":"assistant","content":"Done.","delta":true}
{"type":"result","timestamp":"t","status":"success","stats":{"total_tokens":9,"input_tokens":5,"output_tokens":4,"duration_ms":0,"tool_calls":1}}"#;

    #[test]
    fn protocol_fixture() {
        let mut d = GeminiDecoder::default();
        let events: Vec<CliEvent> = FIXTURE.lines().flat_map(|l| d.line(l).unwrap().events).collect();
        assert_eq!(
            events,
            vec![
                CliEvent::SessionStarted { session_id: "g1".into(), model: Some("gemini-x".into()) },
                CliEvent::TextDelta("Hel".into()),
                CliEvent::TextDelta("lo".into()),
                CliEvent::AssistantMessage {
                    parts: vec![
                        ContentPart::text("Hello"),
                        ContentPart::ToolUse {
                            id: "t1".into(),
                            name: "run_shell_command".into(),
                            input: json!({"command":"ls"})
                        }
                    ],
                    usage: None,
                    stop_reason: None
                },
                CliEvent::ToolStarted { tool_use_id: "t1".into() },
                CliEvent::ToolResult { tool_use_id: "t1".into(), output: "a.rs".into(), is_error: false },
                CliEvent::Notice("slow".into()),
                CliEvent::TextDelta("Done.".into()),
                CliEvent::AssistantMessage { parts: vec![ContentPart::text("Done.")], usage: None, stop_reason: None },
                CliEvent::Finished {
                    result: "Done.".into(),
                    is_error: false,
                    subtype: Some("success".into()),
                    usage: Some(Usage { input_tokens: 5, output_tokens: 4, ..Default::default() }),
                    cost_usd: None
                },
            ]
        );
        assert!(d.at_exit(true).is_empty());
    }

    #[test]
    fn errors() {
        let mut d = GeminiDecoder::default();
        d.line(r#"{"type":"error","severity":"error","message":"quota"}"#).unwrap();
        let events = d.line(r#"{"type":"result","status":"error","stats":{}}"#).unwrap().events;
        assert!(matches!(&events[0], CliEvent::Finished { is_error: true, result, .. } if result == "quota"));
        let events = d
            .line(r#"{"type":"tool_result","tool_id":"t","status":"error","error":{"type":"x","message":"denied"}}"#)
            .unwrap()
            .events;
        assert_eq!(
            events,
            vec![CliEvent::ToolResult { tool_use_id: "t".into(), output: "denied".into(), is_error: true }]
        );
        assert!(d.line("<html>").is_err());
    }

    #[test]
    fn arguments() {
        let g = GeminiCli::default();
        let req = CliRequest {
            max_cost_usd: None,
            prompt: "hi".into(),
            resume_session: Some("g1".into()),
            cwd: ".".into(),
            model: Some("gemini-2.5-flash".into()),
            system_prompt: None,
            auto_approve: true,
        };
        assert_eq!(
            g.args(&req),
            [
                "--output-format",
                "stream-json",
                "-m",
                "gemini-2.5-flash",
                "--approval-mode",
                "yolo",
                "--resume",
                "g1",
                "--prompt=hi"
            ]
        );
    }
}
