//! The event store trait: an append-only log with a global, strictly increasing `seq`.

use std::time::Duration;

use async_trait::async_trait;
use descartes_protocol::{Event, NewEvent, RunId, Seq, Timestamp};
use serde::Serialize;

/// Errors of event stores.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or migrated. Not retryable.
    #[error("cannot open event store at {path}: {message}")]
    Open { path: String, message: String },
    /// A read or write failed. Retryable when `busy` (another process holds the write lock).
    #[error("event store error: {message}")]
    Io { message: String, busy: bool },
    /// A stored event could not be decoded. Not retryable.
    #[error("corrupt event (seq {seq}): {message}")]
    Corrupt { seq: Seq, message: String },
    /// The store was closed. Not retryable.
    #[error("event store is closed")]
    Closed,
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Io { busy: true, .. })
    }
}

/// The result of a deferred append, resolved once the events are written.
pub type DeferredAppend = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Event>, StoreError>> + Send>>;

/// One row of `descartes list`: a run's lifecycle, maintained from its lifecycle events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    pub run_id: RunId,
    /// Status as recorded in the log: `running`, `completed`, `failed`, `cancelled`.
    /// (Whether a `running` run is really alive is decided by the runtime's run locks.)
    pub status: String,
    pub prompt: String,
    pub provider: String,
    pub model: String,
    pub started_at: Timestamp,
    pub updated_at: Timestamp,
    /// Tokens of all model calls (input, output and cached).
    pub tokens: u64,
    /// How many of `tokens` Descartes counted itself because the provider reported no usage
    /// (`Usage::estimated`).
    pub estimated_tokens: u64,
    /// Money spent on model calls with a known price.
    pub cost_usd: f64,
}

/// An append-only event log.
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Appends events atomically, in order, and returns them with their `seq` once they are
    /// durable (on disk, subject to the store's sync setting).
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Event>, StoreError>;

    /// Queues events for appending and returns at once. Their place in the log is fixed now
    /// (before anything appended later by this process); they are written with the next
    /// durable append or within a few milliseconds, whichever comes first. A crash may lose
    /// them, so use this only for events whose loss is harmless: an intent that will simply be
    /// made again (a model call), or the result of an idempotent tool call. The returned
    /// future resolves when they are written.
    fn append_deferred(&self, events: Vec<NewEvent>) -> DeferredAppend;

    /// Events of one run with `seq > after`, in order.
    async fn read_run(&self, run_id: &RunId, after: Seq) -> Result<Vec<Event>, StoreError>;

    /// Events of all runs with `seq > after`, in order, at most `limit`.
    async fn read_all(&self, after: Seq, limit: usize) -> Result<Vec<Event>, StoreError>;

    /// The highest `seq` in the log (0 when empty).
    async fn last_seq(&self) -> Result<Seq, StoreError>;

    /// Lifecycle summaries of all runs, newest first.
    async fn list_runs(&self) -> Result<Vec<RunSummary>, StoreError>;

    /// Run ids starting with `prefix` (for abbreviated ids).
    async fn find_runs(&self, prefix: &str) -> Result<Vec<RunId>, StoreError>;

    /// One run's lifecycle summary (`None`: no such run). Stores override the default, which
    /// lists every run.
    async fn run_summary(&self, run_id: &RunId) -> Result<Option<RunSummary>, StoreError> {
        Ok(self.list_runs().await?.into_iter().find(|r| &r.run_id == run_id))
    }

    /// Waits until the log may hold events after `after`, or `timeout` passes. Used to follow
    /// (tail) the log; may return early, callers re-read.
    async fn wait_for_events(&self, after: Seq, timeout: Duration);

    /// Rebuilds a run's state from its events. The default reads then folds; stores override
    /// it to fold while reading.
    async fn replay_run(&self, run_id: &RunId) -> Result<crate::RunState, crate::CoreError> {
        let events = self.read_run(run_id, 0).await?;
        crate::RunState::fold_owned(run_id.clone(), events)
    }

    /// Writes every deferred event durably.
    async fn flush(&self) -> Result<(), StoreError>;
}

/// What a run lifecycle event changes in a store's runs projection (`list_runs`). The one
/// definition every store follows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RunChange<'a> {
    /// `run_started`: a new row, status `running`.
    Insert { prompt: &'a str, provider: &'a str, model: &'a str },
    /// A new status (and, on resume, the provider and model now in use).
    Status { status: &'static str, provider: Option<(&'a str, &'a str)> },
    /// A model call finished: its tokens and cost add to the run's totals, and a parked run
    /// is running again.
    Usage { tokens: u64, estimated_tokens: u64, cost_usd: f64 },
}

/// The projection change of an event, if it is a run lifecycle event.
pub fn run_change(data: &descartes_protocol::EventData) -> Option<RunChange<'_>> {
    use descartes_protocol::EventData;
    match data {
        EventData::RunStarted(s) => {
            Some(RunChange::Insert { prompt: &s.prompt, provider: &s.provider, model: &s.model })
        }
        EventData::RunResumed(r) => {
            Some(RunChange::Status { status: "running", provider: Some((&r.provider, &r.model)) })
        }
        EventData::RunCompleted(_) => Some(RunChange::Status { status: "completed", provider: None }),
        EventData::RunFailed(_) => Some(RunChange::Status { status: "failed", provider: None }),
        EventData::RunCancelled(_) => Some(RunChange::Status { status: "cancelled", provider: None }),
        EventData::RunParked(_) => Some(RunChange::Status { status: "parked", provider: None }),
        EventData::BudgetExceeded(_) => Some(RunChange::Status { status: "budget_exceeded", provider: None }),
        EventData::ProviderSwitched(p) => {
            Some(RunChange::Status { status: "running", provider: Some((&p.to, &p.model)) })
        }
        EventData::ModelCallCompleted(c) => {
            let tokens = c.usage.all_tokens();
            let estimated_tokens = if c.usage.estimated { tokens } else { 0 };
            Some(RunChange::Usage { tokens, estimated_tokens, cost_usd: c.cost_usd.unwrap_or(0.0) })
        }
        _ => None,
    }
}

/// Why a run id or prefix names no single run.
#[derive(Debug, thiserror::Error)]
pub enum RunLookupError {
    #[error("the run id is empty; give a run id or a unique prefix of one (`descartes list` shows the runs)")]
    Empty,
    #[error("no run matches `{0}`; `descartes list` shows the runs")]
    NotFound(String),
    #[error("`{prefix}` matches several runs ({candidates}); give more of the id")]
    Ambiguous { prefix: String, candidates: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The run a full id or a unique prefix of one names: the one resolution every front end uses.
pub async fn resolve_run(store: &dyn EventStore, prefix: &str) -> Result<RunId, RunLookupError> {
    if prefix.trim().is_empty() {
        // An empty prefix would match every run, and pick the only one.
        return Err(RunLookupError::Empty);
    }
    let mut found = store.find_runs(prefix).await?;
    if let Some(exact) = found.iter().find(|r| r.as_str() == prefix) {
        return Ok(exact.clone());
    }
    match found.len() {
        0 => Err(RunLookupError::NotFound(prefix.to_owned())),
        1 => Ok(found.remove(0)),
        _ => Err(RunLookupError::Ambiguous {
            prefix: prefix.to_owned(),
            candidates: found.iter().take(5).map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
        }),
    }
}
