//! `descartes task execute|diff|merge|discard` and the routing and evidence parts of
//! `task show`: tasks run on registered agents in git worktrees (see `descartes_app::executor`).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use descartes_app::executor::Executor;
use descartes_app::tasks::{self, Executed};
use descartes_core::{Clock, SystemClock};
use descartes_protocol::TaskStatus;
use descartes_runtime::{Runtime, Stores};
use descartes_worktree::MergeKind;
use tokio_util::sync::CancellationToken;

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
            let diff = tasks::diff(&exec, &id).await?;
            std::io::stdout().lock().write_all(&diff)?;
            Ok(0)
        }
        TaskCommand::Merge { id } => {
            let id = resolve(&*tasks, &id).await?;
            let m = tasks::merge(&rt, &exec, &stores, &id).await?;
            let how = match m.kind {
                MergeKind::UpToDate => "already merged",
                MergeKind::FastForward => "fast-forward",
                MergeKind::MergeCommit => "merge commit",
            };
            println!("merged {} into {} ({how}): {}", m.branch, m.into, m.commit);
            Ok(0)
        }
        TaskCommand::Discard { id } => {
            let id = resolve(&*tasks, &id).await?;
            let wt = tasks::discard(&exec, &stores, &id).await?;
            println!("discarded {} and {}", wt.branch, wt.path.display());
            Ok(0)
        }
        TaskCommand::Approve { id, stage } => {
            let id = resolve(&*tasks, &id).await?;
            let by = std::env::var("USER").map(|u| format!("user:{u}")).unwrap_or_else(|_| "user".into());
            tasks::approve(&rt, &stores, &id, &stage, &by).await?;
            println!("approved {stage} of task {id}");
            Ok(0)
        }
        _ => Ok(2),
    }
}

/// Claims the task for the agent the router picks, runs it with heartbeats, and records the
/// outcome, as a daemon worker would.
async fn execute(exec: &Executor, stores: &Stores, id: &str, ttl: Duration) -> Result<u8> {
    let cancel = CancellationToken::new();
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        });
    }
    let started = |t: &descartes_protocol::Task| {
        eprintln!("descartes: task {id} runs on agent {}", t.agent.as_deref().unwrap_or("-"));
    };
    Ok(match tasks::execute(exec, stores, id, ttl, cancel, started).await? {
        Executed::Done(result) => {
            println!("{}", result.unwrap_or_else(|| "done".into()));
            0
        }
        Executed::Failed { status, reason } => {
            eprintln!("descartes: task {id} failed ({status}): {reason}");
            1
        }
        Executed::Released => {
            eprintln!("descartes: task {id} was interrupted and released");
            130
        }
    })
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

/// The evidence of a task's last attempt as JSON (see [`tasks::evidence_json`]).
pub async fn evidence_json(rt: &Arc<Runtime>, stores: &Stores, id: &str) -> Result<serde_json::Value> {
    let exec = Executor::new(rt.clone(), stores.clone(), None).await?;
    tasks::evidence_json(&exec, id).await
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}
