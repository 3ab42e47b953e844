//! The audit trail of tasks: a tamper-evident chain of records, one per event of a task.
//!
//! A task's events are those of its own stream (created, claimed, routed, policy decisions,
//! worktree, evidence, merged, ...) and of the runs that worked on it (`task_run` links them:
//! model calls, tool calls, permission decisions). [`plan_sync`] turns the events not yet
//! recorded into [`AuditRecord`]s: each names its event (stream, seq, type), carries a digest
//! of the event's content and the hash of the task's previous record, and its own hash over
//! all of that. [`verify_chain`] recomputes everything: an edited record breaks its hash, a
//! deleted or reordered one breaks the chain, and an event edited in the log no longer matches
//! its record's digest. (A record deleted at the very end of a chain looks like events not yet
//! recorded; the next sync records them again, so the trail is still complete.)

use std::collections::HashSet;

use async_trait::async_trait;
use descartes_protocol::{Event, EventData, RunId, Seq, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::StoreError;

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub task_id: String,
    /// 1, 2, 3, ... within the task.
    pub n: i64,
    /// The event's stream (the task id or a run id) and position in the log.
    pub stream: String,
    pub seq: Seq,
    pub kind: String,
    pub at: Timestamp,
    /// SHA-256 of the event's type and content.
    pub digest: String,
    /// The hash of the task's previous record (empty for the first).
    pub prev: String,
    /// SHA-256 over every field above.
    pub hash: String,
}

/// Where audit records are kept.
#[async_trait]
pub trait AuditStore: Send + Sync {
    /// Appends records (each task's in order after its last one); a record whose `(task_id,
    /// n)` exists already is a conflict error (another process recorded it first).
    async fn audit_append(&self, records: Vec<AuditRecord>) -> Result<(), StoreError>;
    /// The records of a task (every task when None), by task then `n`.
    async fn audit_records(&self, task_id: Option<&str>) -> Result<Vec<AuditRecord>, StoreError>;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest of an event's type and content (its canonical JSON).
pub fn event_digest(kind: &str, data: &EventData) -> String {
    let json = data.to_json().unwrap_or_default();
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(json.as_bytes());
    hex(&h.finalize())
}

/// The hash of a record (over every field but `hash`).
pub fn record_hash(r: &AuditRecord) -> String {
    let mut h = Sha256::new();
    for part in [
        r.prev.as_str(),
        r.task_id.as_str(),
        &r.n.to_string(),
        r.stream.as_str(),
        &r.seq.to_string(),
        r.kind.as_str(),
        &r.at.as_micros().to_string(),
        r.digest.as_str(),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex(&h.finalize())
}

/// The runs linked to a task by its `task_run` events.
pub fn linked_runs(task_events: &[Event]) -> Vec<RunId> {
    let mut out: Vec<RunId> = Vec::new();
    for e in task_events {
        if let EventData::TaskRunLinked(l) = &e.data
            && !out.contains(&l.run_id)
        {
            out.push(l.run_id.clone());
        }
    }
    out
}

/// The records to append for `events` (the task's and its runs' events, in log order) after
/// the task's `existing` records.
pub fn plan_sync(task_id: &str, existing: &[AuditRecord], events: &[Event]) -> Vec<AuditRecord> {
    let seen: HashSet<(&str, Seq)> = existing.iter().map(|r| (r.stream.as_str(), r.seq)).collect();
    let mut prev = existing.last().map(|r| r.hash.clone()).unwrap_or_default();
    let mut n = existing.last().map(|r| r.n).unwrap_or(0);
    let mut out = Vec::new();
    let mut ordered: Vec<&Event> = events.iter().collect();
    ordered.sort_by_key(|e| e.seq);
    for e in ordered {
        if seen.contains(&(e.run_id.as_str(), e.seq)) {
            continue;
        }
        n += 1;
        let mut r = AuditRecord {
            task_id: task_id.to_owned(),
            n,
            stream: e.run_id.as_str().to_owned(),
            seq: e.seq,
            kind: e.kind().to_owned(),
            at: e.at,
            digest: event_digest(e.kind(), &e.data),
            prev: prev.clone(),
            hash: String::new(),
        };
        r.hash = record_hash(&r);
        prev = r.hash.clone();
        out.push(r);
    }
    out
}

/// What `audit verify` found wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("trail {task_id}, audit record {n}: {problem}")]
pub struct Tamper {
    pub task_id: String,
    pub n: i64,
    pub problem: String,
}

/// Checks one task's records (in `n` order) against themselves and against the log: `event`
/// finds the event a record names (None: it is not in the log).
pub fn verify_chain(records: &[AuditRecord], event: &dyn Fn(&str, Seq) -> Option<Event>) -> Vec<Tamper> {
    let mut problems = Vec::new();
    let mut prev = String::new();
    for (i, r) in records.iter().enumerate() {
        let tamper = |problem: String| Tamper { task_id: r.task_id.clone(), n: r.n, problem };
        let expected_n = i64::try_from(i).unwrap_or(i64::MAX) + 1;
        if r.n != expected_n {
            problems.push(tamper(format!("expected record {expected_n} here: a record was deleted or moved")));
        }
        if r.prev != prev {
            problems.push(tamper("it does not follow the previous record (the chain is broken)".into()));
        }
        if record_hash(r) != r.hash {
            problems.push(tamper("its content does not match its hash (the record was edited)".into()));
        }
        match event(&r.stream, r.seq) {
            None => problems.push(tamper(format!("its event {}#{} is not in the log", r.stream, r.seq))),
            Some(e) if event_digest(e.kind(), &e.data) != r.digest || e.kind() != r.kind => {
                problems.push(tamper(format!("its event {}#{} was changed in the log", r.stream, r.seq)))
            }
            Some(_) => {}
        }
        prev = r.hash.clone();
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use descartes_protocol::{EventId, TaskStarted};

    fn ev(stream: &str, seq: Seq, token: i64) -> Event {
        Event {
            seq,
            id: EventId::generate(),
            run_id: RunId::from(stream),
            at: Timestamp(seq * 10),
            v: 1,
            data: TaskStarted { token }.into(),
        }
    }

    #[test]
    fn a_chain_verifies_and_every_kind_of_tampering_is_named() {
        let events = vec![ev("t", 1, 1), ev("r", 2, 2), ev("t", 3, 3)];
        let records = plan_sync("t", &[], &events);
        assert_eq!(records.len(), 3);
        assert_eq!(plan_sync("t", &records, &events), vec![], "nothing twice");
        let more = vec![ev("t", 1, 1), ev("r", 2, 2), ev("t", 3, 3), ev("t", 4, 4)];
        let next = plan_sync("t", &records, &more);
        assert_eq!((next.len(), next[0].n, next[0].prev.clone()), (1, 4, records[2].hash.clone()));

        let find =
            |log: Vec<Event>| move |s: &str, q: Seq| log.iter().find(|e| e.run_id.as_str() == s && e.seq == q).cloned();
        assert!(verify_chain(&records, &find(events.clone())).is_empty());

        let mut edited = records.clone();
        edited[1].kind = "task_completed".into();
        let p = verify_chain(&edited, &find(events.clone()));
        assert!(p.iter().any(|t| t.n == 2 && t.problem.contains("edited")), "{p:?}");

        let mut deleted = records.clone();
        deleted.remove(1);
        let p = verify_chain(&deleted, &find(events.clone()));
        assert!(p.iter().any(|t| t.n == 3 && t.problem.contains("deleted")), "{p:?}");

        let mut log = events.clone();
        log[2] = ev("t", 3, 99);
        let p = verify_chain(&records, &find(log));
        assert_eq!(p.len(), 1);
        assert!(p[0].to_string().contains("trail t, audit record 3: its event t#3 was changed"), "{}", p[0]);
    }
}
