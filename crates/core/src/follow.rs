//! Following the event log: the one tailing mechanism of `descartes logs -f`, `task watch` and
//! the server's streams. A [`Follower`] keeps a cursor (the `seq` of the last event it read,
//! matching or not) and hands out the matching events after it in `seq` order, each once,
//! waiting for new ones when it has caught up.

use std::time::Duration;

use descartes_protocol::{Event, RunId, Seq};

use crate::store::{EventStore, StoreError};

/// How many events one read of the log takes.
const READ: usize = 1000;

/// Which events a follower hands out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// One stream (a run, a session, an agent) only.
    pub stream: Option<RunId>,
    /// Event types (`run_completed`) or prefixes ending in `*` (`task_*`); none: every type.
    pub kinds: Vec<String>,
}

impl EventFilter {
    pub fn matches(&self, e: &Event) -> bool {
        self.stream.as_ref().is_none_or(|s| &e.run_id == s)
            && (self.kinds.is_empty()
                || self.kinds.iter().any(|k| match k.strip_suffix('*') {
                    Some(prefix) => e.kind().starts_with(prefix),
                    None => e.kind() == k,
                }))
    }
}

/// A cursor over the log with a filter.
pub struct Follower<'a> {
    store: &'a dyn EventStore,
    filter: EventFilter,
    cursor: Seq,
}

impl<'a> Follower<'a> {
    /// Follows the events after `after` (0: from the start).
    pub fn new(store: &'a dyn EventStore, filter: EventFilter, after: Seq) -> Self {
        Self { store, filter, cursor: after }
    }

    /// The `seq` of the last event read: where a reader resumes.
    pub fn cursor(&self) -> Seq {
        self.cursor
    }

    /// The next matching events, at most `limit` (at least 1), reading as far as needed; empty
    /// when the log holds nothing more that matches.
    pub async fn next_page(&mut self, limit: usize) -> Result<Vec<Event>, StoreError> {
        let limit = limit.max(1);
        let mut out = Vec::new();
        loop {
            let batch = match &self.filter.stream {
                // One stream: its own index (its events are few).
                Some(run) => {
                    let mut b = self.store.read_run(run, self.cursor).await?;
                    b.truncate(READ);
                    b
                }
                None => self.store.read_all(self.cursor, READ).await?,
            };
            let full = batch.len() == READ;
            if batch.is_empty() {
                return Ok(out);
            }
            for e in batch {
                self.cursor = e.seq;
                if self.filter.matches(&e) {
                    out.push(e);
                    if out.len() == limit {
                        return Ok(out);
                    }
                }
            }
            if !full {
                return Ok(out);
            }
        }
    }

    /// [`Follower::next_page`], waiting up to `wait` for new events when there are none yet.
    pub async fn next(&mut self, limit: usize, wait: Duration) -> Result<Vec<Event>, StoreError> {
        let page = self.next_page(limit).await?;
        if !page.is_empty() {
            return Ok(page);
        }
        self.store.wait_for_events(self.cursor, wait).await;
        self.next_page(limit).await
    }
}
