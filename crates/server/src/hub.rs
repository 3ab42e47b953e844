//! The server's one reader of new events: it reads each event appended to the log once, frames
//! it once (the WebSocket text that the Server-Sent Events streams carry as `data:` too), and
//! keeps the newest in a ring that every live tail ([`crate::tail`]) reads by its cursor, each
//! taking the items its filter matches (shared bytes: nothing is copied per client until the
//! socket's own write). The tails read the log themselves only to catch up: from a client's
//! cursor, or when they fall behind the ring's oldest item.
//!
//! Each [`Item`] carries the `seq` of the event the hub read before it (`prev`), and the ring
//! holds consecutive items only (it is emptied when the hub pauses): a tail whose cursor is at
//! least the first unseen item's `prev` knows nothing lies between what it has and the ring;
//! one whose cursor is lower is [`Read::Behind`] and goes back to the log. So a tail sees every
//! event once, in `seq` order, whether it came from the log or the ring.
//!
//! The ring holds [`HUB_CAPACITY`] items and [`HUB_BYTES`] of frames at most. While no tail
//! listens the hub reads nothing and holds nothing; the next one wakes it, and it starts again
//! at the log's end.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use descartes_core::EventStore;
use descartes_core::follow::EventFilter;
use descartes_protocol::{Event, RunId, Seq};
use tokio::sync::{Notify, watch};

/// The most items the ring holds (a burst of this many events reaches a slow subscriber
/// without a read of the log).
pub const HUB_CAPACITY: usize = 100_000;
/// The most frame bytes the ring holds.
pub const HUB_BYTES: usize = 64 * 1024 * 1024;
/// How many events one read of the log takes.
const READ: usize = 1000;
/// How long a caught-up hub waits for new events before it looks again.
const WAKE: Duration = Duration::from_secs(15);
/// How long the hub waits after a failed read.
const RETRY: Duration = Duration::from_millis(200);
/// What an event's frame holds before the event's JSON (and `}` after it).
const EVENT_FRAME_START: &str = r#"{"type":"event","event":"#;

/// The terminal frame's name for a run's terminal event (a session's turn that a newer
/// message stopped: `interrupted`).
pub(crate) fn terminal(e: &Event) -> Option<&'static str> {
    use descartes_core::RunOutcome;
    if let descartes_protocol::EventData::RunCancelled(c) = &e.data
        && c.reason == descartes_app::service::INTERRUPTED
    {
        return Some("interrupted");
    }
    Some(match descartes_app::run::ending(&e.data)? {
        RunOutcome::Completed { .. } => "completed",
        RunOutcome::Failed { .. } => "failed",
        RunOutcome::Cancelled => "cancelled",
        RunOutcome::BudgetExceeded { .. } => "budget_exceeded",
    })
}

/// An event, framed once for every client, with what a tail needs to pick it.
#[derive(Debug)]
pub(crate) struct Item {
    /// The `seq` of the event read before this one (the hub's cursor before it).
    pub prev: Seq,
    pub seq: Seq,
    pub stream: RunId,
    pub kind: Box<str>,
    /// The terminal frame it makes for its run, if it ends one.
    pub terminal: Option<&'static str>,
    /// `{"type":"event","event":EVENT}` (WebSocket text, Server-Sent Events data).
    frame: Utf8Bytes,
}

impl Item {
    pub(crate) fn new(prev: Seq, event: &Event) -> Self {
        let json = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
        let mut frame = String::with_capacity(EVENT_FRAME_START.len() + json.len() + 1);
        frame.push_str(EVENT_FRAME_START);
        frame.push_str(&json);
        frame.push('}');
        Self {
            prev,
            seq: event.seq,
            stream: event.run_id.clone(),
            kind: event.kind().into(),
            terminal: terminal(event),
            frame: frame.into(),
        }
    }

    /// The event's frame (shared bytes: cloning it copies nothing).
    pub(crate) fn frame(&self) -> Utf8Bytes {
        self.frame.clone()
    }

    /// Whether `filter` wants it (as [`EventFilter::matches`] decides for an event).
    pub(crate) fn matches(&self, filter: &EventFilter) -> bool {
        filter.stream.as_ref().is_none_or(|s| *s == self.stream)
            && (filter.kinds.is_empty()
                || filter.kinds.iter().any(|k| match k.strip_suffix('*') {
                    Some(prefix) => self.kind.starts_with(prefix),
                    None => *self.kind == **k,
                }))
    }
}

/// What the ring has after a cursor.
pub(crate) enum Read {
    /// The matching items among the next ones, and the `seq` of the last one looked at.
    Items(Vec<Arc<Item>>, Seq),
    /// Nothing after the cursor yet.
    Empty,
    /// Events after the cursor are not in the ring (older than its oldest, or never read by
    /// the hub): they are in the log.
    Behind,
}

#[derive(Default)]
struct Ring {
    items: VecDeque<Arc<Item>>,
    bytes: usize,
    /// The ring holds every event after this `seq` that the hub has read (`None`: the hub has
    /// not started reading).
    base: Option<Seq>,
}

/// The shared reader and its ring.
pub(crate) struct Hub {
    store: Arc<dyn EventStore>,
    ring: RwLock<Ring>,
    /// Bumped after each batch put in the ring.
    version: watch::Sender<u64>,
    listeners: AtomicUsize,
    started: AtomicBool,
    wake: Notify,
    shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("listeners", &self.listeners.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

/// A tail listening to the hub (the hub reads while there is one).
pub(crate) struct Listener {
    hub: Arc<Hub>,
    version: watch::Receiver<u64>,
}

impl Listener {
    /// The ring after `cursor`: up to `max` items looked at, those `filter` wants returned.
    /// What is put in the ring after this call wakes [`Listener::changed`].
    pub(crate) fn read(&mut self, cursor: Seq, max: usize, filter: &EventFilter) -> Read {
        self.version.borrow_and_update();
        let ring = self.hub.ring.read().unwrap_or_else(|e| e.into_inner());
        let Some(base) = ring.base else { return Read::Empty };
        if cursor < base {
            return Read::Behind;
        }
        let items = &ring.items;
        let start = items.partition_point(|i| i.seq <= cursor);
        let Some(first) = items.get(start) else { return Read::Empty };
        if first.prev > cursor {
            return Read::Behind;
        }
        let end = items.len().min(start.saturating_add(max.max(1)));
        let wanted = items.range(start..end).filter(|i| i.matches(filter)).cloned().collect();
        let last = items.get(end - 1).map_or(cursor, |i| i.seq);
        Read::Items(wanted, last)
    }

    /// Waits until the ring has changed since the last [`Listener::read`].
    pub(crate) async fn changed(&mut self) {
        if self.version.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.hub.listeners.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Hub {
    pub(crate) fn new(store: Arc<dyn EventStore>, shutdown: watch::Receiver<bool>) -> Arc<Self> {
        Arc::new(Self {
            store,
            ring: RwLock::default(),
            version: watch::channel(0).0,
            listeners: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            wake: Notify::new(),
            shutdown,
        })
    }

    /// Listens (the reader started if it was not).
    pub(crate) fn listen(self: &Arc<Self>) -> Listener {
        self.listeners.fetch_add(1, Ordering::AcqRel);
        if !self.started.swap(true, Ordering::AcqRel) {
            tokio::spawn(self.clone().run());
        }
        self.wake.notify_one();
        Listener { hub: self.clone(), version: self.version.subscribe() }
    }

    /// Puts `items` (consecutive, after the ring's last) in the ring, dropping the oldest past
    /// its bounds, and wakes the listeners.
    fn push(&self, items: Vec<Arc<Item>>) {
        {
            let mut ring = self.ring.write().unwrap_or_else(|e| e.into_inner());
            for item in items {
                ring.bytes += item.frame.len();
                ring.items.push_back(item);
            }
            while ring.items.len() > HUB_CAPACITY || ring.bytes > HUB_BYTES {
                let Some(old) = ring.items.pop_front() else { break };
                ring.bytes -= old.frame.len();
                ring.base = Some(old.seq);
            }
        }
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Empties the ring; `base`: where it starts again (`None`: not yet known).
    fn reset(&self, base: Option<Seq>) {
        {
            let mut ring = self.ring.write().unwrap_or_else(|e| e.into_inner());
            *ring = Ring { base, ..Ring::default() };
        }
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Reads the log from its end onwards while anyone listens, until the server shuts down.
    async fn run(self: Arc<Self>) {
        let mut shutdown = self.shutdown.clone();
        // Where the hub has read to; `None`: nobody listened, start again at the log's end.
        let mut cursor: Option<Seq> = None;
        loop {
            if *shutdown.borrow_and_update() {
                return;
            }
            if self.listeners.load(Ordering::Acquire) == 0 {
                if cursor.take().is_some() {
                    self.reset(None);
                }
                tokio::select! {
                    () = self.wake.notified() => {}
                    changed = shutdown.changed() => if changed.is_err() { return },
                }
                continue;
            }
            let after = match cursor {
                Some(c) => c,
                None => match self.store.last_seq().await {
                    Ok(s) => {
                        // A tail before this point is behind, even while nothing comes.
                        self.reset(Some(s));
                        s
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the event hub cannot read the log's end");
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                },
            };
            cursor = Some(after);
            let batch = match self.store.read_all(after, READ).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "the event hub cannot read the log");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            let full = batch.len() == READ;
            let mut prev = after;
            let items: Vec<Arc<Item>> = batch
                .iter()
                .map(|e| {
                    let item = Arc::new(Item::new(prev, e));
                    prev = e.seq;
                    item
                })
                .collect();
            if !items.is_empty() {
                self.push(items);
            }
            cursor = Some(prev);
            if full {
                continue;
            }
            tokio::select! {
                () = self.store.wait_for_events(prev, WAKE) => {}
                changed = shutdown.changed() => if changed.is_err() { return },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use descartes_protocol::{Message, MessageAdded, NewEvent};

    #[tokio::test]
    async fn the_frame_holds_the_event() {
        let store = descartes_store::MemoryEventStore::new();
        let added = MessageAdded { message: Message::user_text("hi \"there\""), model_call_id: None };
        let e = store.append(vec![NewEvent::new(&RunId::from("r1"), added)]).await.unwrap().remove(0);
        let item = Item::new(0, &e);
        let frame: serde_json::Value = serde_json::from_str(item.frame().as_str()).unwrap();
        assert_eq!(frame, serde_json::json!({"type": "event", "event": serde_json::to_value(&e).unwrap()}));
        let filter = |stream: Option<&str>, kinds: &[&str]| EventFilter {
            stream: stream.map(RunId::from),
            kinds: kinds.iter().map(|k| (*k).to_owned()).collect(),
        };
        for f in [filter(None, &[]), filter(Some("r1"), &["message_*"]), filter(Some("r2"), &[]), filter(None, &["x"])]
        {
            assert_eq!(item.matches(&f), f.matches(&e), "{f:?}");
        }
    }

    #[tokio::test]
    async fn a_listener_reads_the_ring_by_cursor_and_knows_when_it_is_behind() {
        let store: Arc<dyn EventStore> = Arc::new(descartes_store::MemoryEventStore::new());
        let (_tx, rx) = watch::channel(false);
        let hub = Hub::new(store.clone(), rx);
        let mut listener = hub.listen();
        let all = EventFilter::default();
        // The hub starts at the log's end: wait for it to be there.
        let note = |n: usize| {
            let added = MessageAdded { message: Message::user_text(format!("{n}")), model_call_id: None };
            NewEvent::new(&RunId::from(if n.is_multiple_of(2) { "even" } else { "odd" }), added)
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            while hub.ring.read().unwrap().base.is_none() {
                listener.changed().await;
            }
        })
        .await
        .unwrap();
        assert!(matches!(listener.read(0, 10, &all), Read::Empty));
        let seqs: Vec<Seq> = store.append((0..5).map(note).collect()).await.unwrap().iter().map(|e| e.seq).collect();
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Read::Items(items, last) = listener.read(0, 10, &all) {
                    break (items.iter().map(|i| i.seq).collect::<Vec<_>>(), last);
                }
                listener.changed().await;
            }
        })
        .await
        .unwrap();
        assert_eq!(got, (seqs.clone(), seqs[4]));
        let even = EventFilter { stream: Some(RunId::from("even")), kinds: Vec::new() };
        let Read::Items(items, last) = listener.read(seqs[0], 2, &even) else { panic!("items") };
        assert_eq!((items.iter().map(|i| i.seq).collect::<Vec<_>>(), last), (vec![seqs[2]], seqs[2]));
        assert!(matches!(listener.read(seqs[4], 10, &all), Read::Empty));
        // A ring that starts after the cursor: behind, even empty.
        hub.reset(Some(seqs[4] + 5));
        assert!(matches!(listener.read(seqs[4], 10, &all), Read::Behind));
        assert!(matches!(listener.read(seqs[4] + 5, 10, &all), Read::Empty));
    }
}
