//! The audit trail of tasks, kept up to date from the log (see `descartes_core::audit`).

use std::collections::HashMap;

use descartes_core::StoreError;
use descartes_core::audit::{AuditRecord, Tamper, linked_runs, plan_sync, verify_chain};
use descartes_protocol::{Event, RunId, Seq};

use crate::Stores;

/// Every event of a task: its own stream's and those of the runs linked to it, in log order.
pub async fn task_events(stores: &Stores, task_id: &str) -> Result<Vec<Event>, StoreError> {
    let mut events = stores.events.read_run(&RunId::from(task_id), 0).await?;
    for run in linked_runs(&events.clone()) {
        events.extend(stores.events.read_run(&run, 0).await?);
    }
    events.sort_by_key(|e| e.seq);
    Ok(events)
}

/// Records the task's events that have no audit record yet; returns the whole trail. Another
/// process recording at the same moment makes one append fail: it is planned again.
pub async fn sync(stores: &Stores, task_id: &str) -> Result<Vec<AuditRecord>, StoreError> {
    let mut tries = 0;
    loop {
        let events = task_events(stores, task_id).await?;
        let existing = stores.audit.audit_records(Some(task_id)).await?;
        let new = plan_sync(task_id, &existing, &events);
        if new.is_empty() {
            return Ok(existing);
        }
        match stores.audit.audit_append(new.clone()).await {
            Ok(()) => return Ok(existing.into_iter().chain(new).collect()),
            Err(_) if tries < 3 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Checks every task's trail against itself and the log.
pub async fn verify_all(stores: &Stores) -> Result<(usize, Vec<Tamper>), StoreError> {
    let records = stores.audit.audit_records(None).await?;
    let mut by_task: Vec<(String, Vec<AuditRecord>)> = Vec::new();
    for r in records {
        match by_task.last_mut() {
            Some((t, list)) if *t == r.task_id => list.push(r),
            _ => by_task.push((r.task_id.clone(), vec![r])),
        }
    }
    let mut problems = Vec::new();
    for (_, records) in &by_task {
        let mut streams: HashMap<String, HashMap<Seq, Event>> = HashMap::new();
        for r in records {
            if !streams.contains_key(&r.stream) {
                let events = stores.events.read_run(&RunId::from(r.stream.as_str()), 0).await?;
                streams.insert(r.stream.clone(), events.into_iter().map(|e| (e.seq, e)).collect());
            }
        }
        let find = |stream: &str, seq: Seq| streams.get(stream).and_then(|m| m.get(&seq)).cloned();
        problems.extend(verify_chain(records, &find));
    }
    Ok((by_task.len(), problems))
}
