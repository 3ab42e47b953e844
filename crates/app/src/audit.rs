//! What the front ends show of the record: a task's audit trail with its verification
//! (`descartes audit TASK`), the whole log's verification (`descartes audit verify`), and the
//! policy and permission decisions recorded for a task or a run (`descartes policy explain`).

use std::collections::HashMap;

use anyhow::Result;
use descartes_core::audit::{AuditRecord, verify_chain};
use descartes_protocol::{Event, EventData, PermissionDecided, PolicyDecided, RunId, Seq, Timestamp};
use descartes_runtime::{Runtime, RuntimeError, Stores};
use serde::Serialize;

use crate::error::{Problem, fail};

/// One record of a trail and the event it names (`None`: not in the log any more).
#[derive(Debug, Clone, Serialize)]
pub struct TrailEntry {
    pub record: AuditRecord,
    pub event: Option<Event>,
}

/// What checking one trail found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// No problem found: every record's hash, the chain and every event's digest hold.
    pub intact: bool,
    /// Records checked.
    pub records: usize,
    /// Each problem, naming its record.
    pub problems: Vec<String>,
}

/// A task's audit trail, brought up to date, and its verification.
#[derive(Debug, Clone, Serialize)]
pub struct TaskTrail {
    pub task_id: String,
    pub records: Vec<TrailEntry>,
    pub verification: Verification,
}

/// The trail of task `task_id` (a full id): its events not yet recorded are recorded first,
/// then every record is checked against itself, the chain and the log.
pub async fn task_trail(stores: &Stores, task_id: &str) -> Result<TaskTrail> {
    let records = descartes_runtime::audit::sync(stores, task_id).await?;
    let events = descartes_runtime::audit::task_events(stores, task_id).await?;
    let by_place: HashMap<(&str, Seq), &Event> = events.iter().map(|e| ((e.run_id.as_str(), e.seq), e)).collect();
    let find = |stream: &str, seq: Seq| by_place.get(&(stream, seq)).map(|e| (*e).clone());
    let problems: Vec<String> = verify_chain(&records, &find).into_iter().map(|t| t.to_string()).collect();
    let verification = Verification { intact: problems.is_empty(), records: records.len(), problems };
    let records = records
        .into_iter()
        .map(|r| {
            let event = find(&r.stream, r.seq);
            TrailEntry { record: r, event }
        })
        .collect();
    Ok(TaskTrail { task_id: task_id.to_owned(), records, verification })
}

/// What checking the whole log found (`descartes audit verify`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogVerification {
    pub intact: bool,
    /// Events in the log.
    pub events: usize,
    /// Trails checked (one per task, one per other stream).
    pub trails: usize,
    pub problems: Vec<String>,
}

impl LogVerification {
    /// The one-line verdict: `audit trail intact: N events in M trails`, or how many problems.
    pub fn summary(&self) -> String {
        if self.intact {
            format!("audit trail intact: {} events in {} trails", self.events, self.trails)
        } else {
            format!("audit verify failed: {} problem(s)", self.problems.len())
        }
    }
}

/// Brings every stream's trail up to date and verifies them all, and the log's numbering.
pub async fn verify_log(stores: &Stores) -> Result<LogVerification> {
    let check = descartes_runtime::audit::check_log(stores, true).await?;
    Ok(LogVerification {
        intact: check.problems.is_empty(),
        events: check.events,
        trails: check.trails,
        problems: check.problems,
    })
}

/// What decided: a Policy Decision Record (the YAML policy at claim, tool or merge) or a
/// permission decision (a tool call, with its rule).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decided {
    Record(PolicyDecided),
    Permission(PermissionDecided),
}

/// A decision recorded in the log: `{"at", "stream", "record" | "permission"}`, as
/// `descartes policy explain --json` prints each.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionEntry {
    pub at: Timestamp,
    /// The stream it is in (the task's, or one of its runs').
    pub stream: RunId,
    #[serde(flatten)]
    pub decided: Decided,
}

/// The decisions among `events`, in their order.
pub fn decisions_in(events: &[Event]) -> Vec<DecisionEntry> {
    events
        .iter()
        .filter_map(|e| {
            let decided = match &e.data {
                EventData::PolicyDecided(p) => Decided::Record(p.clone()),
                EventData::PermissionDecided(p) => Decided::Permission(p.clone()),
                _ => return None,
            };
            Some(DecisionEntry { at: e.at, stream: e.run_id.clone(), decided })
        })
        .collect()
}

/// The decisions of task `task_id` (a full id): its claims and merge, and its runs' tool calls.
pub async fn task_decisions(stores: &Stores, task_id: &str) -> Result<Vec<DecisionEntry>> {
    Ok(decisions_in(&descartes_runtime::audit::task_events(stores, task_id).await?))
}

/// Whose decisions [`explain`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    Task,
    Run,
}

impl Subject {
    pub fn as_str(self) -> &'static str {
        match self {
            Subject::Task => "task",
            Subject::Run => "run",
        }
    }
}

/// The decisions `descartes policy explain ID` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Explained {
    pub subject: Subject,
    /// The full id of the task or run.
    pub id: String,
    pub decisions: Vec<DecisionEntry>,
}

/// The decisions of the task `id` names (a full id or a unique prefix), else of the run it
/// names; neither is [`Problem::NotFound`].
pub async fn explain(rt: &Runtime, stores: &Stores, id: &str) -> Result<Explained> {
    match crate::tasks::resolve(&*stores.tasks, id).await {
        Ok(task) => {
            let decisions = task_decisions(stores, &task).await?;
            Ok(Explained { subject: Subject::Task, id: task, decisions })
        }
        Err(descartes_core::TaskError::NotFound(_)) => {
            let run = rt.resolve_run(&*stores.events, id).await.map_err(|e| match e {
                RuntimeError::RunNotFound(_) => fail(
                    Problem::NotFound,
                    format!("no task or run matches `{id}`; `descartes task list` and `descartes list` show them"),
                ),
                other => other.into(),
            })?;
            let decisions = decisions_in(&stores.events.read_run(&run, 0).await?);
            Ok(Explained { subject: Subject::Run, id: run.to_string(), decisions })
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use descartes_protocol::{Decision, DecisionScope, EventId, TaskCancelled};

    fn event(seq: Seq, data: impl Into<EventData>) -> Event {
        Event { seq, id: EventId::generate(), run_id: RunId::from("t1"), at: Timestamp(seq), v: 1, data: data.into() }
    }

    #[test]
    fn decisions_serialize_as_policy_explain_prints_them() {
        let permission = PermissionDecided {
            call_id: None,
            tool: "shell".into(),
            decision: Decision::Deny,
            scope: DecisionScope::Once,
            rule: "policy:no-pd".into(),
            actor: "policy".into(),
            reason: "no".into(),
            file: None,
            line: None,
        };
        let record = PolicyDecided {
            stage: "claim".into(),
            decision: "require_approval".into(),
            rule: Some("approve-deploys".into()),
            file: None,
            line: None,
            reason: "r".into(),
            inputs: serde_json::Value::Null,
            actor: "user".into(),
        };
        let events = [event(1, record), event(2, TaskCancelled {}), event(3, permission)];
        let found = serde_json::to_value(decisions_in(&events)).unwrap_or_default();
        assert_eq!(found.as_array().map(Vec::len), Some(2), "{found}");
        assert_eq!(found[0]["stream"], "t1");
        assert_eq!(found[0]["record"]["rule"], "approve-deploys");
        assert_eq!(found[1]["permission"]["rule"], "policy:no-pd");
        assert!(found[1]["at"].is_string() && found[1].get("record").is_none(), "{found}");
    }

    #[test]
    fn the_summary_says_intact_or_how_many_problems() {
        let ok = LogVerification { intact: true, events: 7, trails: 2, problems: vec![] };
        assert_eq!(ok.summary(), "audit trail intact: 7 events in 2 trails");
        let bad = LogVerification { intact: false, events: 7, trails: 2, problems: vec!["x".into(), "y".into()] };
        assert_eq!(bad.summary(), "audit verify failed: 2 problem(s)");
    }
}
