//! The one live tail of the log behind the Server-Sent Events stream and the WebSocket
//! subscriptions: a [`Follower`] whose matching events go, in `seq` order and each once, into a
//! bounded channel ([`STREAM_BUFFER`] waiting items at most), then, caught up, the new ones as
//! they are appended. A client that leaves the channel full for longer than the lag timeout is
//! given up on ([`TailEnd::Lagged`], with the cursor to resume from); the server never holds
//! more for it. How each event is framed, and what the client is told at the end, is the
//! caller's.

use std::sync::Arc;
use std::time::Duration;

use descartes_core::EventStore;
use descartes_core::follow::{EventFilter, Follower};
use descartes_protocol::{Event, Seq};
use tokio::sync::mpsc::{self, error::SendTimeoutError};
use tokio::sync::watch;

#[cfg(doc)]
use crate::STREAM_BUFFER;
use crate::{ApiState, PAGE_LIMIT};

/// How long a caught-up tail waits for new events before it looks again.
const WAKE: Duration = Duration::from_secs(15);

/// Why a tail stopped.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TailEnd {
    /// The client left the channel full for the lag timeout: everything up to this `seq` is in
    /// the channel (delivered before anything sent after), so it resumes after it.
    Lagged(Seq),
    /// The server is shutting down.
    Shutdown,
    /// The log could not be read.
    Failed(String),
    /// The channel's receiver is gone.
    Closed,
    /// The run the tail follows ended (`completed`, `failed`, `cancelled`, `budget_exceeded`),
    /// or nobody drives it any more (`interrupted`), and every event of it was sent.
    RunEnded(&'static str),
}

/// A tail of one run that stops at its end.
pub(crate) struct RunEnd {
    pub run_id: descartes_protocol::RunId,
    pub status: crate::RunStatus,
}

/// A live tail: what to follow, from where, and when to stop.
pub(crate) struct Tail {
    store: Arc<dyn EventStore>,
    filter: EventFilter,
    after: Seq,
    shutdown: watch::Receiver<bool>,
    lag_timeout: Duration,
    run_end: Option<RunEnd>,
}

/// The terminal frame's name for a run's terminal event.
fn terminal(e: &Event) -> Option<&'static str> {
    use descartes_core::RunOutcome;
    Some(match descartes_app::run::ending(&e.data)? {
        RunOutcome::Completed { .. } => "completed",
        RunOutcome::Failed { .. } => "failed",
        RunOutcome::Cancelled => "cancelled",
        RunOutcome::BudgetExceeded { .. } => "budget_exceeded",
    })
}

impl Tail {
    /// The events matching `filter` after `after`, over the server's log.
    pub(crate) fn new(state: &ApiState, filter: EventFilter, after: Seq) -> Self {
        Self {
            store: state.store.clone(),
            filter,
            after,
            shutdown: state.shutdown.clone(),
            lag_timeout: state.lag_timeout,
            run_end: None,
        }
    }

    /// Stops once the run has ended (its last event is terminal, or nobody drives it) and
    /// every one of its events was sent: [`TailEnd::RunEnded`].
    pub(crate) fn until_run_ends(mut self, run_end: RunEnd) -> Self {
        self.run_end = Some(run_end);
        self
    }

    /// How the followed run stands once the tail has caught up: `Some` when it has ended.
    async fn ended(&self, last: Option<&'static str>) -> Option<&'static str> {
        let run = self.run_end.as_ref()?;
        if last.is_some() {
            return last;
        }
        match self.store.run_summary(&run.run_id).await {
            Ok(Some(summary)) if (run.status)(&summary) == "interrupted" => Some("interrupted"),
            _ => None,
        }
    }

    /// Sends each matching event, framed by `frame`, into `tx` until the client lags, the server
    /// shuts down, the log fails or the receiver goes; says which.
    pub(crate) async fn run<T>(self, tx: &mpsc::Sender<T>, frame: impl Fn(&Event) -> T) -> TailEnd {
        let mut shutdown = self.shutdown.clone();
        let (store, lag_timeout) = (self.store.clone(), self.lag_timeout);
        let mut follower = Follower::new(&*store, self.filter.clone(), self.after);
        let mut after = self.after;
        // The terminal kind of the last event sent, for a run's tail.
        let mut last_terminal = None;
        loop {
            if *shutdown.borrow_and_update() {
                return TailEnd::Shutdown;
            }
            let batch = match follower.next_page(PAGE_LIMIT).await {
                Ok(p) => p,
                Err(e) => return TailEnd::Failed(e.to_string()),
            };
            let cursor = follower.cursor();
            let caught_up = batch.len() < PAGE_LIMIT;
            for e in batch {
                match tx.send_timeout(frame(&e), lag_timeout).await {
                    Ok(()) => {
                        after = e.seq;
                        last_terminal = terminal(&e);
                    }
                    // The client takes too long: what it has is complete up to `after`.
                    Err(SendTimeoutError::Timeout(_)) => return TailEnd::Lagged(after),
                    Err(SendTimeoutError::Closed(_)) => return TailEnd::Closed,
                }
            }
            after = after.max(cursor);
            if caught_up && let Some(kind) = self.ended(last_terminal).await {
                return TailEnd::RunEnded(kind);
            }
            tokio::select! {
                () = store.wait_for_events(after, WAKE) => {}
                changed = shutdown.changed() => {
                    // The sender gone: nobody can say "shut down" any more, the server is going.
                    if changed.is_err() {
                        return TailEnd::Shutdown;
                    }
                }
                () = tx.closed() => return TailEnd::Closed,
            }
        }
    }
}
