//! `descartes task execute|diff|merge|discard` and the routing and evidence parts of
//! `task show`: tasks run on registered agents in git worktrees (see [`crate::executor`]).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use descartes_core::{Clock, SystemClock, TaskError};
use descartes_policy::{DecisionInput, Effect, Stage};
use descartes_protocol::{RunId, TaskDiscarded, TaskMerged, TaskStatus};
use descartes_runtime::daemon::{Outcome, TaskRunner};
use descartes_runtime::{Runtime, Stores};
use tokio_util::sync::CancellationToken;

use crate::executor::Executor;
use crate::task_cmd::{TaskCommand, resolve};

pub async fn run(rt: Arc<Runtime>, stores: Stores, command: TaskCommand) -> Result<u8> {
    let tasks = stores.tasks.clone();
    let exec = Executor::new(rt.clone(), stores.clone(), None).await?;
    match command {
        TaskCommand::Execute { id, ttl } => {
            let id = resolve(&*tasks, &id).await?;
            execute(&exec, &stores, &id, ttl).await
        }
        TaskCommand::Diff { id } => {
            let id = resolve(&*tasks, &id).await?;
            let a = exec.artifacts(&id).await?;
            let Some((_, _, r, _)) = a.evidence else {
                bail!("task {id} has no evidence yet (it has not run on an agent in a git repository)");
            };
            let diff = exec.evidence_store().get(&r.diff)?;
            std::io::stdout().lock().write_all(&diff)?;
            Ok(0)
        }
        TaskCommand::Merge { id } => {
            let id = resolve(&*tasks, &id).await?;
            let task = tasks.get_task(&id).await?;
            if task.status != TaskStatus::Done {
                bail!("task {id} is {}; only a done task is merged", task.status);
            }
            let a = exec.artifacts(&id).await?;
            let (Some(wt), Some(worktrees)) = (a.worktree, exec.worktrees()) else {
                bail!("task {id} has no worktree (it has not run on an agent in this git repository)");
            };
            if a.discarded {
                bail!("task {id} was discarded; its branch is gone");
            }
            // The policy at merge: a deny refuses, "require approval" needs `task approve --stage merge`.
            let agent = match &task.agent {
                Some(n) => stores.agents.get_agent(n).await?,
                None => None,
            };
            let policy = crate::policy_cmd::load(&rt, agent.as_ref().map(|a| a.name.as_str()))?;
            let mut input = DecisionInput::new(Stage::Merge).with_task(crate::policy_cmd::task_facts(&task));
            if let Some(a) = &agent {
                input = input.with_agent(crate::policy_cmd::agent_facts(a));
            }
            let d = policy.evaluate(&input);
            let approved = stores
                .events
                .read_run(&RunId::from(id.as_str()), 0)
                .await?
                .iter()
                .any(|e| matches!(&e.data, descartes_protocol::EventData::TaskApproved(a) if a.stage == "merge"));
            if crate::policy_cmd::enforced(&d) {
                let r = crate::policy_cmd::record(&d, "user");
                stores.events.append(vec![descartes_protocol::NewEvent::new(&RunId::from(id.as_str()), r)]).await?;
            }
            match d.effect {
                Effect::Deny => {
                    descartes_runtime::audit::sync(&stores, &id).await?;
                    eprintln!("descartes: error: the policy refuses to merge task {id}: {}", d.reason);
                    return Ok(10);
                }
                Effect::RequireApproval if !approved => {
                    descartes_runtime::audit::sync(&stores, &id).await?;
                    eprintln!(
                        "descartes: error: merging task {id} needs approval ({}); `descartes task approve {id} --stage merge`",
                        d.reason
                    );
                    return Ok(10);
                }
                _ => {}
            }
            match worktrees.merge(&wt).await {
                Ok(m) => {
                    let fast_forward = matches!(m.kind, descartes_worktree::MergeKind::FastForward);
                    let event = TaskMerged {
                        branch: wt.branch.clone(),
                        into: m.base_branch.clone(),
                        commit: m.commit.clone(),
                        fast_forward,
                    };
                    stores
                        .events
                        .append(vec![descartes_protocol::NewEvent::new(&RunId::from(id.as_str()), event)])
                        .await?;
                    descartes_runtime::audit::sync(&stores, &id).await?;
                    let how = match m.kind {
                        descartes_worktree::MergeKind::UpToDate => "already merged",
                        descartes_worktree::MergeKind::FastForward => "fast-forward",
                        descartes_worktree::MergeKind::MergeCommit => "merge commit",
                    };
                    println!("merged {} into {} ({how}): {}", wt.branch, m.base_branch, m.commit);
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("descartes: error: {e}");
                    Ok(9)
                }
            }
        }
        TaskCommand::Discard { id } => {
            let id = resolve(&*tasks, &id).await?;
            let a = exec.artifacts(&id).await?;
            let (Some(wt), Some(worktrees)) = (a.worktree, exec.worktrees()) else {
                bail!("task {id} has no worktree");
            };
            worktrees.discard(&wt).await?;
            let event = TaskDiscarded { branch: wt.branch.clone() };
            stores.events.append(vec![descartes_protocol::NewEvent::new(&RunId::from(id.as_str()), event)]).await?;
            descartes_runtime::audit::sync(&stores, &id).await?;
            println!("discarded {} and {}", wt.branch, wt.path.display());
            Ok(0)
        }
        TaskCommand::Approve { id, stage } => {
            let id = resolve(&*tasks, &id).await?;
            let by = std::env::var("USER").map(|u| format!("user:{u}")).unwrap_or_else(|_| "user".into());
            let event = descartes_protocol::TaskApproved { stage: stage.clone(), by, rule: None };
            stores.events.append(vec![descartes_protocol::NewEvent::new(&RunId::from(id.as_str()), event)]).await?;
            descartes_runtime::audit::sync(&stores, &id).await?;
            descartes_runtime::daemon::poke(&rt.places.state_dir);
            println!("approved {stage} of task {id}");
            Ok(0)
        }
        _ => Ok(2),
    }
}

/// Claims the task for the agent the router picks, runs it with heartbeats, and records the
/// outcome, as a daemon worker would.
async fn execute(exec: &Executor, stores: &Stores, id: &str, ttl: Duration) -> Result<u8> {
    let worker = format!("execute@{}", descartes_runtime::daemon::default_name());
    let claim = match exec.claim_task(id, &worker, ttl).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("descartes: error: {e:#}");
            return Ok(7);
        }
    };
    let token = claim.token;
    let tasks = stores.tasks.clone();
    tasks.start(id, token).await?;
    eprintln!("descartes: task {id} runs on agent {}", claim.task.agent.as_deref().unwrap_or("-"));
    let cancel = CancellationToken::new();
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        });
    }
    let beat = {
        let (tasks, id) = (tasks.clone(), id.to_owned());
        let cancel = cancel.clone();
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
    let outcome = exec.run(&claim.task, token, cancel.clone()).await;
    beat.abort();
    let code = match outcome {
        Outcome::Succeeded { result } => {
            tasks.complete(id, token, result.clone()).await.context("cannot complete the task")?;
            println!("{}", result.unwrap_or_else(|| "done".into()));
            0
        }
        Outcome::Failed { reason } => {
            let t = tasks.fail(id, token, &reason).await.context("cannot record the failure")?;
            eprintln!("descartes: task {id} failed ({}): {reason}", t.status);
            1
        }
        Outcome::Cancelled => {
            let _ = tasks.release(id, token).await;
            eprintln!("descartes: task {id} was interrupted and released");
            130
        }
    };
    descartes_runtime::audit::sync(stores, id).await?;
    Ok(code)
}

/// What `task show` adds: why no agent can take a queued task, and the last evidence.
pub async fn show_extra(rt: &Arc<Runtime>, stores: &Stores, id: &str, evidence: bool) -> Result<u8> {
    let task = stores.tasks.get_task(id).await?;
    let mut out = std::io::stdout().lock();
    if let Some(agent) = &task.agent {
        writeln!(out, "agent:     {agent}")?;
    }
    let agents = stores.agents.list_agents().await?;
    if task.status == TaskStatus::Queued && !agents.is_empty() {
        let load = stores.tasks.agent_load().await?;
        if let Err(why) = descartes_core::routing::route(&task, &agents, &load, SystemClock.now()) {
            writeln!(out, "routing:   {why}")?;
        }
    }
    if !evidence {
        return Ok(0);
    }
    let exec = Executor::new(rt.clone(), stores.clone(), None).await?;
    let a = exec.artifacts(id).await?;
    if let Some(wt) = &a.worktree {
        writeln!(out, "worktree:  {} (branch {}, base {})", wt.path.display(), wt.branch, short(&wt.base_commit))?;
    }
    let Some((attempt, succeeded, r, manifest)) = a.evidence else {
        writeln!(out, "evidence:  none yet")?;
        return Ok(0);
    };
    writeln!(out, "evidence:  attempt {attempt} ({})", if succeeded { "succeeded" } else { "failed" })?;
    writeln!(out, "  head:    {} (diff {} bytes, blob {})", short(&r.head_commit), r.diff_bytes, r.diff.as_str())?;
    for f in &r.changed_files {
        let flag = if r.outside_locks.contains(&f.path) { "  [outside the task's locks]" } else { "" };
        writeln!(out, "  {:<8} {}{flag}", format!("{:?}", f.status).to_lowercase(), f.path)?;
    }
    if let Some(t) = &r.test {
        let status = match (t.timed_out, t.exit_code) {
            (true, _) => "timed out".to_owned(),
            (false, Some(c)) => format!("exit {c}"),
            (false, None) => "killed".to_owned(),
        };
        writeln!(
            out,
            "  test:    `{}`: {status} in {} ms (output blob {})",
            t.command,
            t.duration_ms,
            t.output.as_str()
        )?;
    }
    if let Some(run) = manifest["run_id"].as_str() {
        writeln!(out, "  run:     {run} (transcript blob {})", manifest["transcript"].as_str().unwrap_or("-"))?;
    }
    if let Some(tokens) = manifest["tokens"].as_u64() {
        writeln!(out, "  usage:   {tokens} tokens, ${:.4}", manifest["cost_usd"].as_f64().unwrap_or(0.0))?;
    }
    if let Some(f) = manifest["failure"].as_str() {
        writeln!(out, "  failure: {f}")?;
    }
    if let Some(m) = &a.merged {
        writeln!(out, "merged:    {m}")?;
    }
    Ok(0)
}

/// The evidence of a task's last attempt as JSON (`task show --evidence --json`): the worktree,
/// the attempt and whether it succeeded, the evidence manifest (changed files with the ones
/// outside the task's locks, the test's result, the run, usage, the failure, and the
/// content-addressed blob of each), and the merge commit; `null` fields when none yet.
pub async fn evidence_json(rt: &Arc<Runtime>, stores: &Stores, id: &str) -> Result<serde_json::Value> {
    let exec = Executor::new(rt.clone(), stores.clone(), None).await?;
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

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}
