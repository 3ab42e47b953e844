//! A [`CliSession`] over a child process whose stdout a [`Decoder`] turns into [`CliEvent`]s.

use std::collections::VecDeque;

use async_trait::async_trait;
use descartes_core::{CliAnswer, CliEvent, CliPermissionRequest, CliSession, ProviderError};

use crate::process::{CliProcess, excerpt};

/// What one line of output means.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Decoded {
    pub events: Vec<CliEvent>,
    /// Lines to write back to the CLI's stdin (e.g. answers to control requests).
    pub replies: Vec<String>,
}

impl Decoded {
    pub fn events(events: Vec<CliEvent>) -> Self {
        Self { events, replies: Vec::new() }
    }
}

/// Turns a CLI's output lines into events. Pure: no IO (unit-tested line by line).
pub trait Decoder: Send {
    /// One non-blank line of stdout. `Err` is a message for output that is not the CLI's
    /// protocol (the session fails with it and an excerpt of the line).
    fn line(&mut self, line: &str) -> Result<Decoded, String>;

    /// The line to write to answer a permission request, if the CLI takes answers.
    fn answer(&mut self, _request: &CliPermissionRequest, _answer: &CliAnswer) -> Option<String> {
        None
    }

    /// Events an answer makes (e.g. the result of a refused call, for a CLI that reports none).
    fn answered(&mut self) -> Vec<CliEvent> {
        Vec::new()
    }

    /// The output ended and the CLI exited with `success`, without a `Finished` event so far:
    /// events that complete the run (e.g. the answer of a CLI that reports no result line).
    fn at_exit(&mut self, _success: bool) -> Vec<CliEvent> {
        Vec::new()
    }

    /// Whether lines are passed as printed (blank lines included) rather than trimmed, with
    /// blank ones skipped.
    fn raw(&self) -> bool {
        false
    }

    /// The last error the CLI reported in its output (for the exit error).
    fn last_error(&self) -> Option<String> {
        None
    }
}

/// Parses one NDJSON line into a JSON object; a clear message for anything else.
pub fn parse_json_line(program: &str, line: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) | Err(_) => Err(format!("`{program}` printed a line that is not a JSON event: `{}`", excerpt(line, 200))),
    }
}

/// A CLI process and its decoder.
pub struct ProcessSession<D: Decoder> {
    process: CliProcess,
    decoder: D,
    queue: VecDeque<CliEvent>,
    finished: bool,
    done: bool,
}

impl<D: Decoder> ProcessSession<D> {
    pub fn new(process: CliProcess, decoder: D) -> Self {
        Self { process, decoder, queue: VecDeque::new(), finished: false, done: false }
    }
}

#[async_trait]
impl<D: Decoder> CliSession for ProcessSession<D> {
    async fn next_event(&mut self) -> Result<Option<CliEvent>, ProviderError> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                if matches!(event, CliEvent::Finished { .. }) {
                    self.finished = true;
                    // The CLI may wait for more input: the conversation is over.
                    self.process.close_stdin();
                }
                return Ok(Some(event));
            }
            if self.done {
                return Ok(None);
            }
            match self.process.next_line().await? {
                Some(line) if !self.decoder.raw() && line.trim().is_empty() => {}
                Some(line) => match self.decoder.line(if self.decoder.raw() { &line } else { line.trim() }) {
                    Ok(decoded) => {
                        for reply in decoded.replies {
                            self.process.write_line(&reply).await?;
                        }
                        self.queue.extend(decoded.events);
                    }
                    Err(message) => {
                        self.done = true;
                        self.process.interrupt().await;
                        let stderr = self.process.stderr_tail();
                        let message = if stderr.is_empty() {
                            message
                        } else {
                            format!("{message}; its error output: {}", excerpt(&stderr, 1000))
                        };
                        return Err(ProviderError::Protocol { provider: self.process.backend.clone(), message });
                    }
                },
                None => {
                    self.done = true;
                    let status = self.process.wait().await?;
                    if self.finished {
                        return Ok(None);
                    }
                    if !status.success() {
                        return Err(self.process.exit_error(status, self.decoder.last_error().as_deref()));
                    }
                    self.queue.extend(self.decoder.at_exit(true));
                    if self.queue.is_empty() {
                        let mut message = format!("`{}` exited without reporting a result", self.process.program);
                        let stderr = self.process.stderr_tail();
                        if !stderr.is_empty() {
                            message.push_str(&format!("; its error output: {}", excerpt(&stderr, 1000)));
                        }
                        return Err(ProviderError::Protocol { provider: self.process.backend.clone(), message });
                    }
                }
            }
        }
    }

    async fn answer(&mut self, request: &CliPermissionRequest, answer: CliAnswer) -> Result<(), ProviderError> {
        let written = match self.decoder.answer(request, &answer) {
            Some(line) => self.process.write_line(&line).await,
            None => Ok(()),
        };
        self.queue.extend(self.decoder.answered());
        written
    }

    async fn cancel(&mut self) {
        self.done = true;
        self.process.interrupt().await;
    }
}
