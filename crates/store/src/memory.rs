use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use descartes_core::store::DeferredAppend;
use descartes_core::{EventStore, RunSummary, StoreError};
use descartes_protocol::{EVENT_VERSION, Event, NewEvent, RunId, Seq};
use tokio::sync::watch;

use descartes_core::store::{RunChange, run_change};

/// An event store in memory, for tests and embedding. Same semantics as SQLite, no durability.
pub struct MemoryEventStore {
    inner: Mutex<Inner>,
    last: watch::Sender<Seq>,
}

#[derive(Default)]
struct Inner {
    events: Vec<Event>,
    keys: HashMap<String, usize>,
    runs: Vec<RunSummary>,
}

impl Default for MemoryEventStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryEventStore {
    pub fn new() -> Self {
        Self { inner: Mutex::new(Inner::default()), last: watch::channel(0).0 }
    }

    fn write(&self, events: Vec<NewEvent>) -> Result<Vec<Event>, StoreError> {
        let mut guard = self.inner.lock().map_err(|_| StoreError::Closed)?;
        let inner = &mut *guard;
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            if let Some(k) = &e.key
                && let Some(&i) = inner.keys.get(k)
            {
                out.push(inner.events[i].clone());
                continue;
            }
            let seq = inner.events.len() as Seq + 1;
            let event = Event { seq, id: e.id, run_id: e.run_id, at: e.at, v: EVENT_VERSION, data: e.data };
            apply_projection(&mut inner.runs, &event);
            if let Some(k) = e.key {
                inner.keys.insert(k, inner.events.len());
            }
            inner.events.push(event.clone());
            out.push(event);
        }
        let last = inner.events.len() as Seq;
        drop(guard);
        self.last.send_replace(last);
        Ok(out)
    }
}

fn apply_projection(runs: &mut Vec<RunSummary>, event: &Event) {
    match run_change(&event.data) {
        Some(RunChange::Insert { prompt, provider, model }) => runs.push(RunSummary {
            run_id: event.run_id.clone(),
            status: "running".into(),
            prompt: prompt.to_owned(),
            provider: provider.to_owned(),
            model: model.to_owned(),
            started_at: event.at,
            updated_at: event.at,
            tokens: 0,
            estimated_tokens: 0,
            cost_usd: 0.0,
        }),
        Some(RunChange::Status { status, provider }) => {
            if let Some(r) = runs.iter_mut().find(|r| r.run_id == event.run_id) {
                r.status = status.to_owned();
                r.updated_at = event.at;
                if let Some((p, m)) = provider {
                    r.provider = p.to_owned();
                    r.model = m.to_owned();
                }
            }
        }
        Some(RunChange::Usage { tokens, estimated_tokens, cost_usd }) => {
            if let Some(r) = runs.iter_mut().find(|r| r.run_id == event.run_id) {
                r.tokens += tokens;
                r.estimated_tokens += estimated_tokens;
                r.cost_usd += cost_usd;
                r.updated_at = event.at;
                if r.status == "parked" {
                    r.status = "running".into();
                }
            }
        }
        None => {}
    }
}

#[async_trait]
impl EventStore for MemoryEventStore {
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Event>, StoreError> {
        self.write(events)
    }

    fn append_deferred(&self, events: Vec<NewEvent>) -> DeferredAppend {
        let result = self.write(events);
        Box::pin(async move { result })
    }

    async fn read_run(&self, run_id: &RunId, after: Seq) -> Result<Vec<Event>, StoreError> {
        let inner = self.inner.lock().map_err(|_| StoreError::Closed)?;
        Ok(inner.events.iter().filter(|e| e.seq > after && &e.run_id == run_id).cloned().collect())
    }

    async fn read_all(&self, after: Seq, limit: usize) -> Result<Vec<Event>, StoreError> {
        let inner = self.inner.lock().map_err(|_| StoreError::Closed)?;
        let start = usize::try_from(after.max(0)).unwrap_or(usize::MAX).min(inner.events.len());
        Ok(inner.events[start..].iter().take(limit).cloned().collect())
    }

    async fn last_seq(&self) -> Result<Seq, StoreError> {
        Ok(*self.last.borrow())
    }

    async fn list_runs(&self) -> Result<Vec<RunSummary>, StoreError> {
        let inner = self.inner.lock().map_err(|_| StoreError::Closed)?;
        let mut runs = inner.runs.clone();
        runs.reverse();
        Ok(runs)
    }

    async fn find_runs(&self, prefix: &str) -> Result<Vec<RunId>, StoreError> {
        let inner = self.inner.lock().map_err(|_| StoreError::Closed)?;
        Ok(inner.runs.iter().filter(|r| r.run_id.as_str().starts_with(prefix)).map(|r| r.run_id.clone()).collect())
    }

    async fn wait_for_events(&self, after: Seq, timeout: Duration) {
        let mut rx = self.last.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|s| *s > after)).await;
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
