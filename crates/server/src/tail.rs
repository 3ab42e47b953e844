//! The one live tail of the log behind the Server-Sent Events streams and the WebSocket
//! subscriptions. A tail first catches up from the log (a [`Follower`] from the client's
//! cursor), then takes new events from the server's [`Hub`], which reads and frames each one
//! once for every tail, by reading its ring from its cursor; it goes back to the log whenever it
//! is behind the ring (see [`crate::hub`]). Matching events go, in `seq` order and each once, into a bounded
//! channel ([`STREAM_BUFFER`] waiting items at most). A client that leaves the channel full for
//! longer than the lag timeout is given up on ([`TailEnd::Lagged`], with the cursor to resume
//! from); the server never holds more for it. How each event is framed, and what the client is
//! told at the end, is the caller's.

use std::sync::Arc;
use std::time::Duration;

use descartes_core::EventStore;
use descartes_core::follow::{EventFilter, Follower};
use descartes_protocol::Seq;
use tokio::sync::mpsc::{self, error::SendTimeoutError};
use tokio::sync::watch;

#[cfg(doc)]
use crate::STREAM_BUFFER;
use crate::hub::{Hub, Item, Read};
use crate::{ApiState, PAGE_LIMIT};

/// How long a caught-up tail waits before it looks at the log again (a run nobody drives any
/// more writes nothing).
const WAKE: Duration = Duration::from_secs(15);
/// How many of the ring's items a tail looks at per read.
const RING_READ: usize = 256;

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
    hub: Arc<Hub>,
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
            hub: state.hub.clone(),
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
    pub(crate) async fn run<T>(self, tx: &mpsc::Sender<T>, frame: impl Fn(&Item) -> T) -> TailEnd {
        let mut shutdown = self.shutdown.clone();
        let mut live = self.hub.listen();
        let mut out = Out { tx, frame, lag_timeout: self.lag_timeout, after: self.after, last_terminal: None };
        // Where the log has been read to (matching or not).
        let mut cursor = self.after;
        loop {
            if *shutdown.borrow_and_update() {
                return TailEnd::Shutdown;
            }
            // Catch up from the log: everything up to its end as it is now.
            let head = match self.store.last_seq().await {
                Ok(s) => s,
                Err(e) => return TailEnd::Failed(e.to_string()),
            };
            let mut follower = Follower::new(&*self.store, self.filter.clone(), cursor);
            loop {
                let batch = match follower.next_page(PAGE_LIMIT).await {
                    Ok(p) => p,
                    Err(e) => return TailEnd::Failed(e.to_string()),
                };
                let caught_up = batch.len() < PAGE_LIMIT;
                for e in &batch {
                    if let Err(end) = out.send(&Item::new(0, e)).await {
                        return end;
                    }
                }
                cursor = follower.cursor();
                out.after = out.after.max(cursor);
                if caught_up {
                    break;
                }
                if *shutdown.borrow_and_update() {
                    return TailEnd::Shutdown;
                }
            }
            // A stream's follower reads that stream only: the rest of the log up to `head` was
            // read too, as far as this tail is concerned.
            cursor = cursor.max(head);
            out.after = out.after.max(cursor);
            if let Some(kind) = self.ended(out.last_terminal).await {
                return TailEnd::RunEnded(kind);
            }
            // Live: the hub's ring, until the tail is behind it, or looks at the log again.
            let wake = tokio::time::sleep(WAKE);
            tokio::pin!(wake);
            loop {
                let (items, last) = match live.read(cursor, RING_READ, &self.filter) {
                    Read::Items(items, last) => (items, last),
                    Read::Behind => break,
                    Read::Empty => {
                        tokio::select! {
                            () = live.changed() => continue,
                            () = &mut wake => break,
                            changed = shutdown.changed() => {
                                if changed.is_err() {
                                    return TailEnd::Shutdown;
                                }
                                break;
                            }
                            () = tx.closed() => return TailEnd::Closed,
                        }
                    }
                };
                for item in &items {
                    if let Err(end) = out.send(item).await {
                        return end;
                    }
                    // Live, a run's terminal event ends its tail: what may follow (a resume, a
                    // session's next turn) is another run of the stream.
                    if self.run_end.is_some()
                        && let Some(kind) = out.last_terminal
                    {
                        return TailEnd::RunEnded(kind);
                    }
                }
                cursor = last;
                out.after = cursor;
                if *shutdown.borrow_and_update() {
                    return TailEnd::Shutdown;
                }
            }
        }
    }
}

/// Where a tail's frames go, and what it sent.
struct Out<'a, T, F> {
    tx: &'a mpsc::Sender<T>,
    frame: F,
    lag_timeout: Duration,
    /// Every matching event up to this `seq` is in the channel.
    after: Seq,
    /// The terminal kind of the last event sent, for a run's tail.
    last_terminal: Option<&'static str>,
}

impl<T, F: Fn(&Item) -> T> Out<'_, T, F> {
    async fn send(&mut self, item: &Item) -> Result<(), TailEnd> {
        match self.tx.send_timeout((self.frame)(item), self.lag_timeout).await {
            Ok(()) => {
                self.after = item.seq;
                self.last_terminal = item.terminal;
                Ok(())
            }
            // The client takes too long: what it has is complete up to `after`.
            Err(SendTimeoutError::Timeout(_)) => Err(TailEnd::Lagged(self.after)),
            Err(SendTimeoutError::Closed(_)) => Err(TailEnd::Closed),
        }
    }
}
