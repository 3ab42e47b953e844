//! The outbox of a run's driver (the agent loop, the agent-CLI driver): events applied to the
//! run's state at once and written to the log in batches, deferred or durable.

use descartes_protocol::{EventData, NewEvent};

use crate::Result;
use crate::agent::OutputSink;
use crate::state::RunState;
use crate::store::{DeferredAppend, EventStore};

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
