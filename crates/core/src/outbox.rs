//! The run recorder both drivers (the agent loop, the agent-CLI driver) write through: the
//! outbox (events applied to the run's state at once and written to the log in batches,
//! deferred or durable), the one decision of a tool call (durable before a human is asked),
//! and the run's failure and stop. The durability rules are written here once.

use descartes_protocol::{EventData, NewEvent, PermissionDecided, RunCancelled, RunFailed};
use tokio_util::sync::CancellationToken;

use crate::agent::OutputSink;
use crate::permission::{self, Prompter, Question, Step, ToolGate};
use crate::policy::Policy;
use crate::state::RunState;
use crate::store::{DeferredAppend, EventStore};
use crate::{CoreError, Result};

/// What a run's driver records through, borrowed from the driver.
pub(crate) struct Recorder<'a> {
    pub store: &'a dyn EventStore,
    pub sink: &'a dyn OutputSink,
    pub prompter: &'a dyn Prompter,
    pub cancel: &'a CancellationToken,
    pub policy: &'a Policy,
    pub gate: Option<&'a dyn ToolGate>,
}

impl Recorder<'_> {
    /// Applies an event to the run's state and queues it.
    pub(crate) fn push(&self, st: &mut RunState, ob: &mut Outbox, data: impl Into<EventData>) {
        ob.push(st, data);
    }

    /// Hands the queued events to the store without waiting (their loss is harmless).
    pub(crate) fn send_deferred(&self, ob: &mut Outbox) {
        ob.send_deferred(self.store);
    }

    /// Writes everything queued durably.
    pub(crate) async fn commit(&self, st: &mut RunState, ob: &mut Outbox) -> Result<()> {
        ob.commit(st, self.store, self.sink).await
    }

    /// The decision of a tool call (see [`permission::decide_gated`]): the policy gate's record
    /// is queued; before a human is asked everything so far is made durable; a stop while the
    /// human is asked is [`CoreError::Cancelled`] with no answer recorded.
    pub(crate) async fn decide(
        &self,
        st: &mut RunState,
        ob: &mut Outbox,
        q: &Question<'_>,
        auto_approve: bool,
    ) -> Result<PermissionDecided> {
        let (step, record) = permission::decide_gated(self.gate, self.policy, q, &st.run_allowed, auto_approve);
        if let Some(r) = record {
            self.push(st, ob, r);
        }
        let ask = match step {
            Step::Decided(d) => return Ok(d),
            Step::Ask(ask) => ask,
        };
        self.commit(st, ob).await?;
        let answer = tokio::select! {
            _ = self.cancel.cancelled() => return Err(CoreError::Cancelled),
            a = self.prompter.ask(&ask.request) => a,
        };
        Ok(ask.answered(answer))
    }

    /// Records, durably, that the run failed.
    pub(crate) async fn failed(
        &self,
        st: &mut RunState,
        ob: &mut Outbox,
        error: &str,
        kind: &str,
        retryable: bool,
    ) -> Result<()> {
        self.push(st, ob, RunFailed { error: error.to_owned(), kind: kind.to_owned(), retryable });
        self.commit(st, ob).await
    }

    /// Records, durably, that the run was stopped by the user (or, within [`STOP_REASON`],
    /// for the reason set there).
    pub(crate) async fn cancelled(&self, st: &mut RunState, ob: &mut Outbox) -> Result<()> {
        let set = STOP_REASON.try_with(|r| r.lock().ok().and_then(|r| r.clone())).ok().flatten();
        let reason = set.unwrap_or_else(|| "stopped by the user".into());
        self.push(st, ob, RunCancelled { reason });
        self.commit(st, ob).await
    }
}

tokio::task_local! {
    /// Why a run driven within this scope is stopped when its cancellation token fires: a
    /// front end that stops runs for more than one reason (a server interrupting a session's
    /// turn for a newer message) sets it before cancelling. Unset or empty: "stopped by the
    /// user".
    pub static STOP_REASON: std::sync::Arc<std::sync::Mutex<Option<String>>>;
}

/// Events not yet handed to the store, and deferred appends not yet known to be written.
#[derive(Default)]
pub(crate) struct Outbox {
    events: Vec<NewEvent>,
    deferred: Vec<DeferredAppend>,
}

impl Outbox {
    /// Applies an event to the run's state and queues it.
    pub(crate) fn push(&mut self, st: &mut RunState, data: impl Into<EventData>) {
        let event = NewEvent::new(&st.run_id, data);
        st.apply(0, &event.data);
        self.events.push(event);
    }

    /// Hands the queued events to the store without waiting for their commit.
    pub(crate) fn send_deferred(&mut self, store: &dyn EventStore) {
        if !self.events.is_empty() {
            self.deferred.push(store.append_deferred(std::mem::take(&mut self.events)));
        }
    }

    /// Writes the queued events durably and reports every written event to the sink, in log
    /// order (deferred ones first).
    pub(crate) async fn commit(
        &mut self,
        st: &mut RunState,
        store: &dyn EventStore,
        sink: &dyn OutputSink,
    ) -> Result<()> {
        let written =
            if self.events.is_empty() { Vec::new() } else { store.append(std::mem::take(&mut self.events)).await? };
        for deferred in self.deferred.drain(..) {
            for e in deferred.await? {
                st.last_seq = st.last_seq.max(e.seq);
                sink.event(&e);
            }
        }
        for e in &written {
            st.last_seq = st.last_seq.max(e.seq);
            sink.event(e);
        }
        Ok(())
    }
}
