//! The `command` backend: any CLI, given the prompt in its arguments (`{prompt}`) or on stdin;
//! its stdout, streamed, is the answer. It has no session (a resume starts over on the goal)
//! and no permission requests.

use async_trait::async_trait;
use descartes_core::{AgentCli, CliEvent, CliRequest, CliSession, ProviderError};
use descartes_protocol::ContentPart;

use crate::CliOptions;
use crate::process::{CliProcess, Spawn};
use crate::session::{Decoded, Decoder, ProcessSession};

/// A command line template. In `args`, `{prompt}` is replaced by the prompt and `{model}` by
/// the model; without a `{prompt}` placeholder the prompt is written to stdin.
#[derive(Debug, Clone)]
pub struct CommandCli {
    /// The backend's name as recorded (`command`, or a configured name).
    pub name: String,
    pub program: String,
    pub args: Vec<String>,
    pub options: CliOptions,
}

impl CommandCli {
    pub fn new(program: impl Into<String>, args: Vec<String>, options: CliOptions) -> Self {
        Self { name: "command".into(), program: program.into(), args, options }
    }

    /// Splits a command line on whitespace (`"llm -m gpt {prompt}"`); `None` if it is empty.
    pub fn from_command_line(line: &str, options: CliOptions) -> Option<Self> {
        let mut words = line.split_whitespace().map(str::to_owned);
        let program = words.next()?;
        Some(Self::new(program, words.collect(), options))
    }

    fn prompt_in_args(&self) -> bool {
        self.args.iter().any(|a| a.contains("{prompt}"))
    }

    /// The arguments for a request.
    pub fn expand(&self, request: &CliRequest) -> Vec<String> {
        let prompt = full_prompt(request);
        let model = request.model.clone().unwrap_or_default();
        self.args.iter().map(|a| a.replace("{prompt}", &prompt).replace("{model}", &model)).collect()
    }
}

/// The prompt, after the system prompt if there is one.
pub(crate) fn full_prompt(request: &CliRequest) -> String {
    match &request.system_prompt {
        Some(system) if !system.trim().is_empty() => format!("{system}\n\n{}", request.prompt),
        _ => request.prompt.clone(),
    }
}

#[async_trait]
impl AgentCli for CommandCli {
    fn name(&self) -> &str {
        &self.name
    }

    async fn start(&self, request: CliRequest) -> Result<Box<dyn CliSession>, ProviderError> {
        let stdin = if self.prompt_in_args() { None } else { Some(full_prompt(&request)) };
        let hint = format!("check the command configured for the `{}` backend", self.name);
        let args = self.expand(&request);
        let spawn =
            Spawn { stdin, ..self.options.spawn(&self.name, self.program.clone().into(), args, &request.cwd, hint) };
        let process = CliProcess::spawn(spawn).await?;
        Ok(Box::new(ProcessSession::new(process, TextDecoder::default())))
    }
}

/// Plain text output: each line streams as answer text; the whole output is the result.
#[derive(Debug, Default)]
pub struct TextDecoder {
    text: String,
}

impl Decoder for TextDecoder {
    fn line(&mut self, line: &str) -> Result<Decoded, String> {
        let mut piece = line.to_owned();
        piece.push('\n');
        self.text.push_str(&piece);
        Ok(Decoded::events(vec![CliEvent::TextDelta(piece)]))
    }

    fn raw(&self) -> bool {
        true
    }

    fn at_exit(&mut self, _success: bool) -> Vec<CliEvent> {
        let result = self.text.trim_end().to_owned();
        vec![
            CliEvent::AssistantMessage {
                parts: vec![ContentPart::text(result.clone())],
                usage: None,
                stop_reason: None,
            },
            CliEvent::Finished { result, is_error: false, subtype: None, usage: None, cost_usd: None },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_streamed_and_becomes_the_result() {
        let mut d = TextDecoder::default();
        assert_eq!(d.line("hello").unwrap().events, vec![CliEvent::TextDelta("hello\n".into())]);
        d.line("").unwrap();
        d.line("  world").unwrap();
        let end = d.at_exit(true);
        assert!(
            matches!(&end[1], CliEvent::Finished { result, is_error: false, .. } if result == "hello\n\n  world"),
            "{end:?}"
        );
    }

    #[test]
    fn placeholders() {
        let c = CommandCli::from_command_line("llm -m {model} {prompt}", CliOptions::default()).unwrap();
        let req = CliRequest {
            max_cost_usd: None,
            prompt: "hi there".into(),
            resume_session: None,
            cwd: ".".into(),
            model: Some("m1".into()),
            system_prompt: None,
            auto_approve: false,
        };
        assert_eq!(c.expand(&req), vec!["-m", "m1", "hi there"]);
        assert!(c.prompt_in_args());
        assert!(!CommandCli::from_command_line("cat", CliOptions::default()).unwrap().prompt_in_args());
        assert!(CommandCli::from_command_line("  ", CliOptions::default()).is_none());
    }
}
