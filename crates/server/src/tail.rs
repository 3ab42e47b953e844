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
}

/// A live tail: what to follow, from where, and when to stop.
pub(crate) struct Tail {
    store: Arc<dyn EventStore>,
    filter: EventFilter,
    after: Seq,
    shutdown: watch::Receiver<bool>,
    lag_timeout: Duration,
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
        }
    }

    /// Sends each matching event, framed by `frame`, into `tx` until the client lags, the server
    /// shuts down, the log fails or the receiver goes; says which.
    pub(crate) async fn run<T>(self, tx: &mpsc::Sender<T>, frame: impl Fn(&Event) -> T) -> TailEnd {
        let Tail { store, filter, after, mut shutdown, lag_timeout } = self;
        let mut follower = Follower::new(&*store, filter, after);
        let mut after = after;
        loop {
            if *shutdown.borrow_and_update() {
                return TailEnd::Shutdown;
            }
            let batch = match follower.next_page(PAGE_LIMIT).await {
                Ok(p) => p,
                Err(e) => return TailEnd::Failed(e.to_string()),
            };
            let cursor = follower.cursor();
            for e in batch {
                match tx.send_timeout(frame(&e), lag_timeout).await {
                    Ok(()) => after = e.seq,
                    // The client takes too long: what it has is complete up to `after`.
                    Err(SendTimeoutError::Timeout(_)) => return TailEnd::Lagged(after),
                    Err(SendTimeoutError::Closed(_)) => return TailEnd::Closed,
                }
            }
            after = after.max(cursor);
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
