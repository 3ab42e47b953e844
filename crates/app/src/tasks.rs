//! What is done to a task beyond the task store's own rules: execute it on its agent (as a
//! daemon worker would), show its diff and evidence, merge, discard and approve it. Each
//! records its event (and the policy's decision) and brings the task's audit trail up to date.
//! Also what every front end needs to name and show a task: [`resolve`] (a unique prefix),
//! [`create`] (dependencies by prefix), [`show`] (its dependencies, why it waits, why no agent
//! takes it).

use std::time::Duration;

use anyhow::Result;
use descartes_core::task::waiting_reason;
use descartes_core::{Clock, SystemClock, TaskError, TaskFilter, TaskStore};
use descartes_policy::{DecisionInput, Effect, Stage};
use descartes_protocol::{EventData, NewEvent, NewTask, RunId, Task, TaskDiscarded, TaskMerged, TaskStatus};
use descartes_runtime::daemon::{Outcome, TaskRunner};
use descartes_runtime::{Runtime, Stores};
use descartes_worktree::{MergeKind, Worktree};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::error::{Problem, fail};
use crate::executor::Executor;

async fn record(stores: &Stores, id: &str, data: impl Into<EventData>) -> Result<()> {
    stores.events.append(vec![NewEvent::new(&RunId::from(id), data)]).await?;
    Ok(())
}

/// How `execute` ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Executed {
    /// Done, with its result.
    Done(Option<String>),
    /// The attempt failed; the task is now `status` (queued again or failed for good).
    Failed { status: TaskStatus, reason: String },
    /// Stopped by `cancel`; the task was given back.
    Released,
}

/// Claims task `id` for the agent the router picks, runs it with heartbeats and records the
/// outcome, as a daemon worker would. `started` hears the agent's name once it runs. A task
/// that cannot be claimed now is [`Problem::NothingToDo`].
pub async fn execute(
    exec: &Executor,
    stores: &Stores,
    id: &str,
    ttl: Duration,
    cancel: CancellationToken,
    started: impl FnOnce(&Task),
) -> Result<Executed> {
    let worker = format!("execute@{}", descartes_runtime::daemon::default_name());
    let claim = exec.claim_task(id, &worker, ttl).await.map_err(|e| fail(Problem::NothingToDo, format!("{e:#}")))?;
    let token = claim.token;
    let tasks = stores.tasks.clone();
    tasks.start(id, token).await?;
    started(&claim.task);
    let beat = {
        let (tasks, id, cancel) = (tasks.clone(), id.to_owned(), cancel.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep((ttl / 3).max(Duration::from_millis(100))).await;
                match tasks.heartbeat(&id, token, ttl).await {
                    Ok(_) | Err(TaskError::Store(_)) => {}
                    Err(e) => {
                        tracing::warn!(task = %id, error = %e, "lost the task; stopping it");
                        cancel.cancel();
                        return;
                    }
                }
            }
        })
    };
    let outcome = exec.run(&claim.task, token, cancel).await;
    beat.abort();
    let executed = match outcome {
        Outcome::Succeeded { result } => {
            tasks
                .complete(id, token, result.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot complete the task: {e}"))?;
            Executed::Done(result)
        }
        Outcome::Failed { reason } => {
            let t =
                tasks.fail(id, token, &reason).await.map_err(|e| anyhow::anyhow!("cannot record the failure: {e}"))?;
            Executed::Failed { status: t.status, reason }
        }
        Outcome::Cancelled => {
            let _ = tasks.release(id, token).await;
            Executed::Released
        }
    };
    descartes_runtime::audit::sync(stores, id).await?;
    Ok(executed)
}

/// The diff of the task's last attempt against its base commit.
pub async fn diff(exec: &Executor, id: &str) -> Result<Vec<u8>> {
    let a = exec.artifacts(id).await?;
    let Some((_, _, r, _)) = a.evidence else {
        return Err(fail(
            Problem::NotFound,
            format!("task {id} has no evidence yet (it has not run on an agent in a git repository)"),
        ));
    };
    Ok(exec.evidence_store().get(&r.diff)?)
}

/// A merge made: the branch, the base branch, the commit and how.
#[derive(Debug, Clone)]
pub struct Merged {
    pub branch: String,
    pub into: String,
    pub commit: String,
    pub kind: MergeKind,
}

impl Merged {
    /// How it merged: `up_to_date`, `fast_forward` or `merge_commit`.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            MergeKind::UpToDate => "up_to_date",
            MergeKind::FastForward => "fast_forward",
            MergeKind::MergeCommit => "merge_commit",
        }
    }
}

/// Merges a done task's branch into its base branch, if the policy allows it at `merge`
/// (a deny refuses; "require approval" needs an approval of stage `merge`).
pub async fn merge(rt: &Runtime, exec: &Executor, stores: &Stores, id: &str) -> Result<Merged> {
    let task = stores.tasks.get_task(id).await?;
    if task.status != TaskStatus::Done {
        return Err(fail(Problem::Conflict, format!("task {id} is {}; only a done task is merged", task.status)));
    }
    let a = exec.artifacts(id).await?;
    let (Some(wt), Some(worktrees)) = (a.worktree, exec.worktrees()) else {
        return Err(fail(
            Problem::NotFound,
            format!("task {id} has no worktree (it has not run on an agent in this git repository)"),
        ));
    };
    if a.discarded {
        return Err(fail(Problem::Conflict, format!("task {id} was discarded; its branch is gone")));
    }
    check_merge_policy(rt, stores, &task).await?;
    match worktrees.merge(&wt).await {
        Ok(m) => {
            let fast_forward = matches!(m.kind, MergeKind::FastForward);
            let event = TaskMerged {
                branch: wt.branch.clone(),
                into: m.base_branch.clone(),
                commit: m.commit.clone(),
                fast_forward,
            };
            record(stores, id, event).await?;
            descartes_runtime::audit::sync(stores, id).await?;
            Ok(Merged { branch: wt.branch, into: m.base_branch, commit: m.commit, kind: m.kind })
        }
        Err(e) => Err(fail(Problem::MergeFailed, e.to_string())),
    }
}

/// The policy at merge: a deny refuses, "require approval" needs `task approve --stage merge`.
/// An enforced decision is recorded either way.
async fn check_merge_policy(rt: &Runtime, stores: &Stores, task: &Task) -> Result<()> {
    let id = task.id.as_str();
    let agent = match &task.agent {
        Some(n) => stores.agents.get_agent(n).await?,
        None => None,
    };
    let policy = descartes_runtime::policy_gate::load(rt, agent.as_ref().map(|a| a.name.as_str()))
        .map_err(|e| fail(Problem::Config, e.to_string()))?;
    let mut input = DecisionInput::new(Stage::Merge).with_task(descartes_runtime::policy_gate::task_facts(task));
    if let Some(a) = &agent {
        input = input.with_agent(descartes_runtime::policy_gate::agent_facts(a));
    }
    let d = policy.evaluate(&input);
    let approved = approved(stores, id, "merge").await?;
    if descartes_runtime::policy_gate::enforced(&d) {
        record(stores, id, descartes_runtime::policy_gate::record(&d, "user")).await?;
    }
    let refusal = match d.effect {
        Effect::Deny => format!("the policy refuses to merge task {id}: {}", d.reason),
        Effect::RequireApproval if !approved => {
            format!("merging task {id} needs approval ({}); `descartes task approve {id} --stage merge`", d.reason)
        }
        _ => return Ok(()),
    };
    descartes_runtime::audit::sync(stores, id).await?;
    Err(fail(Problem::PolicyRefused, refusal))
}

/// Whether a human approved task `id` for `stage`.
pub async fn approved(stores: &Stores, id: &str, stage: &str) -> Result<bool> {
    let events = stores.events.read_run(&RunId::from(id), 0).await?;
    Ok(events.iter().any(|e| matches!(&e.data, EventData::TaskApproved(a) if a.stage == stage)))
}

/// Removes the task's worktree and branch; returns them as they were.
pub async fn discard(exec: &Executor, stores: &Stores, id: &str) -> Result<Worktree> {
    let a = exec.artifacts(id).await?;
    let (Some(wt), Some(worktrees)) = (a.worktree, exec.worktrees()) else {
        return Err(fail(Problem::NotFound, format!("task {id} has no worktree")));
    };
    worktrees.discard(&wt).await?;
    record(stores, id, TaskDiscarded { branch: wt.branch.clone() }).await?;
    descartes_runtime::audit::sync(stores, id).await?;
    Ok(wt)
}

/// Records `by`'s approval of `stage` of task `id` and wakes the daemon.
pub async fn approve(rt: &Runtime, stores: &Stores, id: &str, stage: &str, by: &str) -> Result<()> {
    let event = descartes_protocol::TaskApproved { stage: stage.to_owned(), by: by.to_owned(), rule: None };
    record(stores, id, event).await?;
    descartes_runtime::audit::sync(stores, id).await?;
    descartes_runtime::daemon::poke(&rt.places.state_dir);
    Ok(())
}

/// The evidence of a task's last attempt as JSON (`task show --evidence --json`): the worktree,
/// the attempt and whether it succeeded, the evidence manifest (changed files with the ones
/// outside the task's locks, the test's result, the run, usage, the failure, and the
/// content-addressed blob of each), and the merge commit; `null` fields when none yet.
pub async fn evidence_json(exec: &Executor, id: &str) -> Result<serde_json::Value> {
    let a = exec.artifacts(id).await?;
    let mut v = serde_json::json!({
        "worktree": a.worktree,
        "attempt": null,
        "succeeded": null,
        "merged": a.merged,
    });
    if let (Some(obj), Some((attempt, succeeded, _, manifest))) = (v.as_object_mut(), a.evidence) {
        obj.insert("attempt".into(), attempt.into());
        obj.insert("succeeded".into(), succeeded.into());
        if let serde_json::Value::Object(fields) = manifest {
            obj.extend(fields);
        }
    }
    Ok(v)
}

/// The task `id` names: a full id, or a unique prefix of one. An unknown id is
/// [`TaskError::NotFound`]; a prefix of several tasks is [`TaskError::Invalid`], naming some.
pub async fn resolve(tasks: &dyn TaskStore, id: &str) -> Result<String, TaskError> {
    match tasks.get_task(id).await {
        Ok(t) => Ok(t.id),
        Err(TaskError::NotFound(_)) if !id.is_empty() => {
            let all = tasks.list_tasks(&TaskFilter::default()).await?;
            let found: Vec<&Task> = all.iter().filter(|t| t.id.starts_with(id)).collect();
            match found.as_slice() {
                [one] => Ok(one.id.clone()),
                [] => Err(TaskError::NotFound(id.to_owned())),
                many => {
                    let shown = many.iter().take(5).map(|t| t.id.as_str()).collect::<Vec<_>>().join(", ");
                    let more = if many.len() > 5 { format!(" and {} more", many.len() - 5) } else { String::new() };
                    Err(TaskError::Invalid(format!(
                        "`{id}` matches {} tasks ({shown}{more}); give more of the id",
                        many.len()
                    )))
                }
            }
        }
        Err(e) => Err(e),
    }
}

/// Creates a task whose dependencies may be named by unique prefix (an unknown one is
/// [`TaskError::MissingDependency`]).
pub async fn create(tasks: &dyn TaskStore, mut new: NewTask) -> Result<Task, TaskError> {
    let mut depends_on = Vec::with_capacity(new.depends_on.len());
    for d in &new.depends_on {
        depends_on.push(match resolve(tasks, d).await {
            Err(TaskError::NotFound(_)) => return Err(TaskError::MissingDependency(d.clone())),
            other => other?,
        });
    }
    new.depends_on = depends_on;
    tasks.create_task(new).await
}

/// A task another one depends on, as `task show` names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dependency {
    pub id: String,
    pub title: String,
    pub status: TaskStatus,
}

/// A task as `task show` presents it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskShown {
    pub task: Task,
    /// The tasks it depends on, in its order.
    pub dependencies: Vec<Dependency>,
    /// Why it is not claimed (dependencies, locks, backoff, the blocking failure); `None` when
    /// it does not wait.
    pub waiting: Option<String>,
    /// Why no registered agent can take it now (a queued task, when agents are registered).
    pub routing: Option<String>,
}

/// The task `id` names (a full id or a unique prefix), with its dependencies and why it waits.
pub async fn show(stores: &Stores, id: &str) -> Result<TaskShown, TaskError> {
    let tasks = &*stores.tasks;
    let task = tasks.get_task(&resolve(tasks, id).await?).await?;
    let mut dependencies = Vec::with_capacity(task.depends_on.len());
    for d in &task.depends_on {
        dependencies.push(tasks.get_task(d).await?);
    }
    let leased: Vec<Task> =
        tasks.list_tasks(&TaskFilter::default()).await?.into_iter().filter(|t| t.status.is_leased()).collect();
    let now = SystemClock.now();
    let waiting = waiting_reason(&task, &dependencies, &leased, now);
    let dependencies =
        dependencies.into_iter().map(|d| Dependency { id: d.id, title: d.title, status: d.status }).collect();
    let mut routing = None;
    if task.status == TaskStatus::Queued {
        let agents = stores.agents.list_agents().await?;
        if !agents.is_empty() {
            let load = tasks.agent_load().await?;
            routing = descartes_core::routing::route(&task, &agents, &load, now).err();
        }
    }
    Ok(TaskShown { task, dependencies, waiting, routing })
}

/// A task as `task show --json` prints it: the task, with `waiting` when it waits.
pub fn task_json(task: &Task, waiting: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::to_value(task).unwrap_or_default();
    if let (Some(obj), Some(w)) = (v.as_object_mut(), waiting) {
        obj.insert("waiting".into(), w.into());
    }
    v
}

impl TaskShown {
    /// [`task_json`], plus `dependencies` (each `{id, title, status}`) and `routing` when no
    /// agent can take it (the API's `GET /v1/tasks/{id}`).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = task_json(&self.task, self.waiting.as_deref());
        if let Some(obj) = v.as_object_mut() {
            obj.insert("dependencies".into(), serde_json::to_value(&self.dependencies).unwrap_or_default());
            if let Some(r) = &self.routing {
                obj.insert("routing".into(), r.as_str().into());
            }
        }
        v
    }

    /// The task [`TaskShown::to_json`] made (what a client of the API reads back).
    pub fn from_json(v: &serde_json::Value) -> Result<TaskShown, serde_json::Error> {
        let text = |key: &str| v.get(key).and_then(|w| w.as_str()).map(str::to_owned);
        Ok(TaskShown {
            task: Task::deserialize(v)?,
            dependencies: match v.get("dependencies") {
                Some(d) => Vec::deserialize(d)?,
                None => Vec::new(),
            },
            waiting: text("waiting"),
            routing: text("routing"),
        })
    }
}

/// Wakes a local daemon's idle workers at once (new or requeued work) instead of at their next
/// poll.
pub fn wake_daemon(rt: &Runtime) {
    descartes_runtime::daemon::poke(&rt.places.state_dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shown_task_reads_back_from_its_json() {
        let task: Task = serde_json::from_value(serde_json::json!({
            "id": "t-b", "title": "beta", "status": "blocked", "depends_on": ["t-a"], "max_attempts": 3,
            "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:01Z",
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let dependency = Dependency { id: "t-a".into(), title: "alpha".into(), status: TaskStatus::Cancelled };
        let shown = TaskShown {
            task,
            dependencies: vec![dependency],
            waiting: Some("blocked: t-a was cancelled".into()),
            routing: Some("no agent".into()),
        };
        let json = shown.to_json();
        assert_eq!(json["dependencies"], serde_json::json!([{"id": "t-a", "title": "alpha", "status": "cancelled"}]));
        assert_eq!(TaskShown::from_json(&json).ok(), Some(shown.clone()));
        let bare = TaskShown { dependencies: vec![], waiting: None, routing: None, ..shown };
        let mut json = task_json(&bare.task, None);
        assert!(json.get("waiting").is_none() && json.get("routing").is_none(), "{json}");
        assert_eq!(TaskShown::from_json(&json).ok(), Some(bare.clone()));
        json["status"] = "sleeping".into();
        assert!(TaskShown::from_json(&json).is_err());
    }
}
