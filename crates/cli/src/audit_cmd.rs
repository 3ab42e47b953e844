//! `descartes audit TASK` and `descartes audit verify`: the tamper-evident trail of tasks.

use std::io::Write;

use anyhow::Result;
use clap::{Args, Subcommand};
use descartes_app::audit::{self, TrailEntry};
use descartes_protocol::EventData;
use descartes_runtime::Runtime;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: Option<AuditCommand>,
    /// The task whose trail to show (every event, in order); its id or a unique prefix of it.
    pub task: Option<String>,
    /// One JSON object per line: the audit record and its event.
    #[arg(long)]
    pub jsonl: bool,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Recompute every task's chain and check it against the log; exit 1 naming each
    /// tampered record.
    Verify,
}

pub async fn run(rt: Runtime, args: AuditArgs) -> Result<u8> {
    let stores = rt.open_stores().await?;
    match (args.command, args.task) {
        (Some(AuditCommand::Verify), _) => {
            // Every stream's trail is brought up to date first (events already recorded are
            // checked against their records), so verify covers everything logged.
            let check = audit::verify_log(&stores).await?;
            if check.intact {
                println!("{}", check.summary());
                Ok(0)
            } else {
                for p in &check.problems {
                    eprintln!("descartes: tampered: {p}");
                }
                eprintln!("descartes: {}", check.summary());
                Ok(1)
            }
        }
        (None, Some(task)) => {
            let id = descartes_app::tasks::resolve(&*stores.tasks, &task).await?;
            let trail = audit::task_trail(&stores, &id).await?;
            let mut out = std::io::stdout().lock();
            for TrailEntry { record: r, event } in &trail.records {
                if args.jsonl {
                    let line = serde_json::json!({ "record": r, "event": event });
                    writeln!(out, "{line}")?;
                } else {
                    let detail = event.as_ref().map(describe).unwrap_or_default();
                    writeln!(
                        out,
                        "{:>4}  {}  {:<22}  {:<28}  {}",
                        r.n,
                        r.at.to_local("%Y-%m-%d %H:%M:%S"),
                        r.kind,
                        short(&r.stream),
                        detail
                    )?;
                }
            }
            Ok(0)
        }
        (None, None) => {
            eprintln!("descartes: error: give a task id (`descartes audit TASK`) or `descartes audit verify`");
            Ok(2)
        }
    }
}

fn short(s: &str) -> String {
    if s.len() > 28 { format!("{}…", &s[..27]) } else { s.to_owned() }
}

fn describe(e: &descartes_protocol::Event) -> String {
    match &e.data {
        EventData::TaskClaimed(c) => format!("by {} (token {}, attempt {})", c.worker, c.token, c.attempt),
        EventData::TaskRouted(r) => format!("to agent {}", r.agent),
        EventData::TaskRunLinked(l) => format!("run {} on {}", l.run_id, l.agent),
        EventData::PolicyDecided(p) => format!(
            "{} {} ({}){}",
            p.stage,
            p.decision,
            p.rule.as_deref().unwrap_or("default"),
            p.file.as_deref().map(|f| format!(" {f}")).unwrap_or_default()
        ),
        EventData::PermissionDecided(p) => format!("{} {:?} by {}", p.tool, p.decision, p.rule),
        EventData::ToolCallStarted(t) => descartes_core::agent::summarize(&t.tool, &t.input),
        EventData::TaskCompleted(_) => "done".into(),
        EventData::TaskFailed(f) => f.reason.clone(),
        EventData::TaskMerged(m) => format!("{} into {} at {}", m.branch, m.into, m.commit),
        _ => String::new(),
    }
    .chars()
    .take(100)
    .collect()
}
