//! `descartes task execute|diff|merge|discard|approve` and the evidence of `task show`: tasks
//! run on registered agents in git worktrees (see `descartes_app::executor`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use descartes_app::executor::Executor;
use descartes_app::tasks::{self, Executed, resolve};
use descartes_runtime::{Runtime, Stores};
use tokio_util::sync::CancellationToken;

use crate::task_cmd::{TaskCommand, print_approved, print_diff, print_discarded, print_merged};

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
            print_diff(&tasks::diff(&exec, &id).await?)
        }
        TaskCommand::Merge { id } => {
            let id = resolve(&*tasks, &id).await?;
            let m = tasks::merge(&rt, &exec, &stores, &id).await?;
            print_merged(&m.branch, &m.into, m.kind_name(), &m.commit)
        }
        TaskCommand::Discard { id } => {
            let id = resolve(&*tasks, &id).await?;
            let wt = tasks::discard(&exec, &stores, &id).await?;
            print_discarded(&wt.branch, &wt.path.display().to_string())
        }
        TaskCommand::Approve { id, stage } => {
            let id = resolve(&*tasks, &id).await?;
            let by = std::env::var("USER").map(|u| format!("user:{u}")).unwrap_or_else(|_| "user".into());
            tasks::approve(&rt, &stores, &id, &stage, &by).await?;
            print_approved(&stage, &id)
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

/// The evidence of a task's last attempt as JSON (see [`tasks::evidence_json`]).
pub async fn evidence_json(rt: &Arc<Runtime>, stores: &Stores, id: &str) -> Result<serde_json::Value> {
    let exec = Executor::new(rt.clone(), stores.clone(), None).await?;
    tasks::evidence_json(&exec, id).await
}
