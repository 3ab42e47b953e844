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

/// Brings the trail of one stream that is not a task (a run, a session, an agent) up to date:
/// one record per event of the stream (the trail's id is the stream's).
pub async fn sync_stream(stores: &Stores, stream: &str) -> Result<(), StoreError> {
    let events = stores.events.read_run(&RunId::from(stream), 0).await?;
    sync_events(stores, stream, &events).await
}

async fn sync_events(stores: &Stores, trail: &str, events: &[Event]) -> Result<(), StoreError> {
    let mut tries = 0;
    loop {
        let existing = stores.audit.audit_records(Some(trail)).await?;
        let new = plan_sync(trail, &existing, events);
        if new.is_empty() {
            return Ok(());
        }
        match stores.audit.audit_append(new).await {
            Ok(()) => return Ok(()),
            Err(_) if tries < 3 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

/// What a whole-log check found.
#[derive(Debug, Default)]
pub struct LogCheck {
    /// Events in the log.
    pub events: usize,
    /// Trails checked (one per task, one per other stream).
    pub trails: usize,
    /// Every problem, with the seq it concerns.
    pub problems: Vec<String>,
}

/// Reads the whole log once: reports every missing seq (the log's seqs are contiguous from 1,
/// so a gap is a deleted event), brings every stream's trail up to date when `bring_up_to_date` (events
/// already recorded are checked against their records, new ones are recorded), and verifies
/// every trail: an edited, deleted or reordered event of any stream is reported with its seq.
pub async fn check_log(stores: &Stores, bring_up_to_date: bool) -> Result<LogCheck, StoreError> {
    let mut check = LogCheck::default();
    let mut streams: Vec<(String, Vec<Event>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut after: Seq = 0;
    loop {
        let page = stores.events.read_all(after, 10_000).await?;
        let Some(last) = page.last().map(|e| e.seq) else { break };
        for e in page {
            if e.seq != after + 1 {
                let what = if e.seq == after + 2 {
                    format!("event seq {} is missing from the log (deleted)", after + 1)
                } else {
                    format!("events seq {} to {} are missing from the log (deleted)", after + 1, e.seq - 1)
                };
                check.problems.push(what);
            }
            after = e.seq;
            check.events += 1;
            let i = *index.entry(e.run_id.as_str().to_owned()).or_insert_with(|| {
                streams.push((e.run_id.as_str().to_owned(), Vec::new()));
                streams.len() - 1
            });
            streams[i].1.push(e);
        }
        after = last;
    }
    let last_seq = stores.events.last_seq().await?;
    if last_seq > after {
        check.problems.push(format!("events seq {} to {last_seq} are missing from the log (deleted)", after + 1));
    }
    if bring_up_to_date {
        for (stream, events) in &streams {
            // A task's trail also holds the runs linked to it.
            if events.first().is_some_and(|e| matches!(e.data, descartes_protocol::EventData::TaskCreated(_))) {
                sync(stores, stream).await?;
            } else {
                sync_events(stores, stream, events).await?;
            }
        }
    }
    let (trails, tampered) = verify_all(stores).await?;
    check.trails = trails;
    check.problems.extend(tampered.into_iter().map(|t| t.to_string()));
    Ok(check)
}
