//! `descartes ai ...`: the agent registry ("AI instances") that tasks are routed to.

use std::io::Write;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use descartes_core::routing::AgentStore;
use descartes_core::{Clock, SystemClock};
use descartes_protocol::{AgentRecord, AgentRegistered};
use descartes_runtime::Runtime;
use serde::Deserialize;

#[derive(Subcommand, Debug)]
pub enum AiCommand {
    /// Register an agent that tasks can be routed to.
    Register(RegisterArgs),
    /// List the agents with their status, load and success rate.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Add a label to an agent.
    Label {
        /// The agent's name.
        name: String,
        /// The label.
        label: String,
    },
    /// Remove a label from an agent.
    Unlabel {
        /// The agent's name.
        name: String,
        /// The label.
        label: String,
    },
    /// Route nothing more to an agent (its running tasks finish).
    Disable {
        /// The agent's name.
        name: String,
    },
    /// Route tasks to an agent again (also clears an unhealthy cool-down).
    Enable {
        /// The agent's name.
        name: String,
    },
    /// Remove an agent from the registry.
    Remove {
        /// The agent's name.
        name: String,
    },
}

#[derive(Args, Debug)]
pub struct RegisterArgs {
    /// Letters, digits, `-`, `_` and `.`.
    pub name: String,
    /// A model provider (Descartes' own agent loop: openai, anthropic, gemini, xai, ollama,
    /// local, or one declared in config), an agent CLI (claude-code, codex, gemini-cli), or
    /// `command` (with --command).
    #[arg(long)]
    pub backend: String,
    /// The model of a provider or agent CLI (default: the backend's own).
    #[arg(long)]
    pub model: Option<String>,
    /// The shell command of a `command` agent (run in the task's worktree, with the task in
    /// `DESCARTES_TASK_*` variables).
    #[arg(long)]
    pub command: Option<String>,
    /// A label tasks can ask for with `task create --needs-label` (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// A capability to declare (repeatable); detected ones are added.
    #[arg(long = "capability")]
    pub capabilities: Vec<String>,
    /// Most tasks it runs at once.
    #[arg(long, default_value_t = 1)]
    pub max_concurrent: u32,
    /// Replace an existing registration of the same name.
    #[arg(long)]
    pub replace: bool,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// What the backend can tell about itself.
pub fn detect_capabilities(rt: &Runtime, backend: &str) -> Result<Vec<String>> {
    if backend == "command" {
        return Ok(Vec::new());
    }
    let sel = rt.select(Some(backend), None)?;
    // `select` refuses a kind the catalog does not know.
    let caps = sel.kind_info().map_or(&[][..], |k| k.capabilities);
    Ok(caps.iter().map(|c| (*c).to_owned()).collect())
}

pub async fn run(rt: Runtime, command: AiCommand) -> Result<u8> {
    let stores = rt.open_stores().await?;
    let agents = stores.agents.clone();
    let now = SystemClock.now();
    match command {
        AiCommand::Register(a) => {
            if !valid_name(&a.name) {
                bail!("invalid agent name {:?}: use letters, digits, -, _ and .", a.name);
            }
            if a.max_concurrent == 0 {
                bail!("--max-concurrent must be at least 1");
            }
            match (a.backend.as_str(), &a.command) {
                ("command", None) => bail!("a `command` agent needs --command CMD"),
                ("command", Some(c)) if c.trim().is_empty() => bail!("--command is empty"),
                (b, Some(_)) if b != "command" => bail!("--command applies to the `command` backend only"),
                _ => {}
            }
            let detected = detect_capabilities(&rt, &a.backend)?;
            let existing = agents.get_agent(&a.name).await?;
            if existing.is_some() && !a.replace {
                eprintln!("descartes: error: an agent named `{}` is registered; add --replace to change it", a.name);
                return Ok(2);
            }
            let record = AgentRecord {
                name: a.name.clone(),
                backend: a.backend,
                model: a.model,
                command: a.command,
                labels: dedup(a.labels),
                capabilities: dedup(a.capabilities),
                detected,
                max_concurrent: a.max_concurrent,
                disabled: false,
                stats: existing.as_ref().map(|e| e.stats.clone()).unwrap_or_default(),
                created_at: existing.as_ref().map(|e| e.created_at).unwrap_or(now),
                updated_at: now,
            };
            agents.put_agent(&record, AgentRegistered { agent: record.clone() }.into()).await?;
            println!("{}", record.name);
        }
        AiCommand::List { json } => print_agents(&descartes_app::listings::agents(&stores, now).await?, json)?,
        AiCommand::Label { name, label } => {
            let what = format!("label +{label}");
            return update(&*agents, &name, &what, move |a| {
                if !a.labels.contains(&label) {
                    a.labels.push(label.clone());
                }
            })
            .await;
        }
        AiCommand::Unlabel { name, label } => {
            let what = format!("label -{label}");
            return update(&*agents, &name, &what, move |a| a.labels.retain(|l| *l != label)).await;
        }
        AiCommand::Disable { name } => return update(&*agents, &name, "disabled", |a| a.disabled = true).await,
        AiCommand::Enable { name } => {
            return update(&*agents, &name, "enabled", |a| {
                a.disabled = false;
                a.stats.unhealthy_until = None;
                a.stats.consecutive_failures = 0;
            })
            .await;
        }
        AiCommand::Remove { name } => {
            if !agents.remove_agent(&name).await? {
                eprintln!("descartes: error: no agent named `{name}`; `descartes ai list` shows them");
                return Ok(5);
            }
            println!("removed {name}");
        }
    }
    Ok(0)
}

fn dedup(mut v: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    v.retain(|x| seen.insert(x.clone()));
    v
}

/// `ai list`: the agents as `descartes_app::listings::agents` lists them.
fn print_agents(rows: &[serde_json::Value], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        eprintln!("no agents; register one with `descartes ai register NAME --backend B`");
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<16}  {:<14}  {:<9}  {:>5}  {:>7}  LABELS / CAPABILITIES",
        "NAME", "BACKEND", "STATUS", "LOAD", "SUCCESS"
    )?;
    for row in rows {
        let a = AgentRecord::deserialize(row)?;
        let running = row["running"].as_u64().unwrap_or(0);
        let success = match row["success_rate"].as_f64() {
            Some(rate) => format!("{:.0}%", 100.0 * rate),
            None => "-".to_owned(),
        };
        let mut caps: Vec<&str> = a.capabilities.iter().chain(&a.detected).map(String::as_str).collect();
        caps.sort_unstable();
        caps.dedup();
        writeln!(
            out,
            "{:<16}  {:<14}  {:<9}  {:>5}  {:>7}  {} / {}",
            a.name,
            backend_label(&a),
            row["status"].as_str().unwrap_or(""),
            format!("{running}/{}", a.max_concurrent),
            success,
            if a.labels.is_empty() { "-".to_owned() } else { a.labels.join(",") },
            if caps.is_empty() { "-".to_owned() } else { caps.join(",") },
        )?;
    }
    Ok(())
}

fn backend_label(a: &AgentRecord) -> String {
    match &a.model {
        Some(m) => format!("{}/{m}", a.backend),
        None => a.backend.clone(),
    }
}

async fn update(
    agents: &dyn AgentStore,
    name: &str,
    what: &str,
    f: impl Fn(&mut AgentRecord) + Send + Sync + 'static,
) -> Result<u8> {
    let change = Box::new(move |a: &mut AgentRecord| {
        f(a);
        a.updated_at = SystemClock.now();
    });
    if agents.update_agent(name, what, change).await?.is_none() {
        eprintln!("descartes: error: no agent named `{name}`; `descartes ai list` shows them");
        return Ok(5);
    }
    println!("{name}: {what}");
    Ok(0)
}
