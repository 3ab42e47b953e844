//! In-process fakes for tests and benchmarks: a provider answering from a script, with no IO.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use descartes_protocol::Usage;

use crate::provider::{ModelRequest, ModelStream, Provider, ProviderError, StreamEvent};

/// One scripted model answer.
#[derive(Debug, Clone)]
pub enum Scripted {
    /// Answer with this text.
    Text(String),
    /// Ask for one tool call (id, tool, JSON arguments as text).
    ToolCall(String, String, String),
    /// Fail with this error.
    Fail(ProviderError),
}

type ScriptFn = dyn Fn(&ModelRequest, usize) -> Scripted + Send + Sync;

/// A provider that answers each request with the next item of a script (or a function of the
/// request), streaming instantly.
pub struct ScriptedProvider {
    script: Box<ScriptFn>,
    calls: AtomicUsize,
    /// Every request received.
    pub requests: Mutex<Vec<ModelRequest>>,
    record: bool,
}

impl ScriptedProvider {
    /// Answers the n-th call (0-based) with `f(request, n)`.
    pub fn new(f: impl Fn(&ModelRequest, usize) -> Scripted + Send + Sync + 'static) -> Self {
        Self { script: Box::new(f), calls: AtomicUsize::new(0), requests: Mutex::new(Vec::new()), record: true }
    }

    /// Same, without recording requests (benchmarks).
    pub fn unrecorded(f: impl Fn(&ModelRequest, usize) -> Scripted + Send + Sync + 'static) -> Self {
        Self { record: false, ..Self::new(f) }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Provider for ScriptedProvider {
    fn name(&self) -> &str {
        "scripted"
    }

    async fn stream(&self, request: ModelRequest) -> Result<ModelStream, ProviderError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let answer = (self.script)(&request, n);
        if self.record
            && let Ok(mut r) = self.requests.lock()
        {
            r.push(request);
        }
        let usage = Usage { input_tokens: 10, output_tokens: 5, ..Default::default() };
        let events: Vec<Result<StreamEvent, ProviderError>> = match answer {
            Scripted::Text(t) => vec![
                Ok(StreamEvent::TextDelta(t)),
                Ok(StreamEvent::Usage(usage)),
                Ok(StreamEvent::Stop { reason: Some("stop".into()) }),
            ],
            Scripted::ToolCall(id, name, args) => vec![
                Ok(StreamEvent::ToolCallStart { index: 0, id, name }),
                Ok(StreamEvent::ToolCallDelta { index: 0, json: args }),
                Ok(StreamEvent::Usage(usage)),
                Ok(StreamEvent::Stop { reason: Some("tool_calls".into()) }),
            ],
            Scripted::Fail(e) => return Err(e),
        };
        Ok(Box::pin(futures::stream::iter(events)))
    }
}

/// A clock that moves only when told (lease expiry and backoff without sleeping).
#[derive(Debug)]
pub struct ManualClock {
    micros: std::sync::atomic::AtomicI64,
}

impl ManualClock {
    pub fn new(start: descartes_protocol::Timestamp) -> Self {
        Self { micros: std::sync::atomic::AtomicI64::new(start.as_micros()) }
    }
    pub fn advance(&self, d: std::time::Duration) {
        self.micros.fetch_add(i64::try_from(d.as_micros()).unwrap_or(i64::MAX), Ordering::SeqCst);
    }
}

impl crate::task::Clock for ManualClock {
    fn now(&self) -> descartes_protocol::Timestamp {
        descartes_protocol::Timestamp(self.micros.load(Ordering::SeqCst))
    }
}
