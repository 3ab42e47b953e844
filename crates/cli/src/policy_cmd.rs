//! `descartes policy validate|explain`; the policy in use at run time (layers, facts, records, the
//! tool-call gate) is `descartes_runtime::policy_gate`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use descartes_app::audit::Decided;
use descartes_runtime::Runtime;

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Check policy files: every error with file, line and column, then conflicting rules.
    /// Without FILE: the user's, the project's and every agent's policy file.
    Validate {
        /// Policy files to check (default: every one Descartes reads here).
        files: Vec<PathBuf>,
    },
    /// The decisions of a task (its claims, tool calls and merge) or of a run (its tool calls),
    /// in order: Policy Decision Records and permission decisions, each with its rule.
    Explain {
        /// A task id or a run id (or a unique prefix of one).
        #[arg(value_name = "ID")]
        task: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub use descartes_runtime::policy_gate::{global_policy, project_root};

pub async fn run(rt: Runtime, command: PolicyCommand) -> Result<u8> {
    match command {
        PolicyCommand::Validate { files } => {
            let files = if files.is_empty() { default_files(&rt) } else { files };
            if files.is_empty() {
                eprintln!(
                    "descartes: no policy files (looked for {} and {})",
                    project_root(&rt).join(".ai/policy.yaml").display(),
                    global_policy(&rt).map(|p| p.display().to_string()).unwrap_or_default()
                );
                return Ok(0);
            }
            let mut bad = 0;
            for f in &files {
                let diags = descartes_policy::validate_file(f);
                for d in &diags {
                    eprintln!("{d}");
                }
                if diags.is_empty() {
                    println!("{}: ok", f.display());
                }
                bad += diags.len();
            }
            Ok(if bad == 0 { 0 } else { 1 })
        }
        PolicyCommand::Explain { task, json } => {
            let stores = rt.open_stores().await?;
            // A task's decisions (its own stream and its runs'), else a run's.
            let found = descartes_app::audit::explain(&rt, &stores, &task).await?;
            for d in &found.decisions {
                if json {
                    // Through a JSON value, as every object here is printed (its keys sorted).
                    println!("{}", serde_json::to_value(d)?);
                    continue;
                }
                let at = d.at.to_local("%Y-%m-%d %H:%M:%S");
                match &d.decided {
                    Decided::Permission(p) => println!(
                        "{at}  tool   {:<16}  rule {}{}  actor {}  ({})\n    {}",
                        if p.decision == descartes_protocol::Decision::Allow { "allow" } else { "deny" },
                        p.rule,
                        located(p.file.as_deref(), p.line),
                        p.actor,
                        p.tool,
                        p.reason
                    ),
                    Decided::Record(p) => println!(
                        "{at}  {:<5}  {:<16}  rule {}{}  actor {}\n    {}\n    inputs: {}",
                        p.stage,
                        p.decision,
                        p.rule.as_deref().unwrap_or("(default)"),
                        located(p.file.as_deref(), p.line),
                        p.actor,
                        p.reason,
                        p.inputs
                    ),
                }
            }
            if found.decisions.is_empty() && !json {
                eprintln!("no decisions were recorded for {} {}", found.subject.as_str(), found.id);
            }
            Ok(0)
        }
    }
}

fn default_files(rt: &Runtime) -> Vec<PathBuf> {
    let root = project_root(rt);
    let mut files: Vec<PathBuf> = global_policy(rt).into_iter().chain([root.join(".ai/policy.yaml")]).collect();
    if let Ok(dir) = std::fs::read_dir(root.join(".ai/policies")) {
        let mut agents: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        agents.sort();
        files.extend(agents);
    }
    files.retain(|f| f.exists());
    files
}

/// ` (FILE:LINE)` of the rule that decided, or nothing for a built-in rule.
fn located(file: Option<&str>, line: Option<u64>) -> String {
    match (file, line) {
        (Some(f), Some(l)) => format!(" ({f}:{l})"),
        (Some(f), None) => format!(" ({f})"),
        _ => String::new(),
    }
}
