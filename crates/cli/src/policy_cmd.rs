//! The project's policy engine in use: loading the layers for an agent, the facts it sees,
//! Policy Decision Records, the tool-call gate, and `descartes policy validate|explain`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use clap::Subcommand;
use descartes_core::permission::{GateVerdict, ToolGate};
use descartes_core::policy::Action;
use descartes_policy::{AgentFacts, DecisionInput, Effect, PolicyDecision, PolicySet, Stage, TaskFacts, ToolFacts};
use descartes_protocol::{AgentRecord, EventData, PolicyDecided, Task};
use descartes_runtime::{Mode, Runtime};
use serde_json::Value;

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Check policy files: every error with file, line and column, then conflicting rules.
    /// Without FILE: the user's, the project's and every agent's policy file.
    Validate {
        /// Policy files to check (default: every one Descartes reads here).
        files: Vec<PathBuf>,
    },
    /// The Policy Decision Records of a task (its claims, tool calls and merge), in order.
    Explain {
        /// The task id (or a unique prefix of it).
        task: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// The project root policies are read from (`.ai/` under it).
pub fn project_root(rt: &Runtime) -> PathBuf {
    match &rt.places.mode {
        Mode::Project { root } => root.clone(),
        Mode::Direct => rt.cwd.clone(),
    }
}

/// The user's (global) policy file: `policy.yaml` beside the user config file.
pub fn global_policy(rt: &Runtime) -> Option<PathBuf> {
    rt.places.user_config.as_ref().and_then(|c| c.parent()).map(|d| d.join("policy.yaml"))
}

/// The merged policy of an agent (global < project < agent).
pub fn load(rt: &Runtime, agent: Option<&str>) -> Result<PolicySet, descartes_policy::PolicyError> {
    PolicySet::load(global_policy(rt).as_deref(), &project_root(rt), agent)
}

pub fn task_facts(t: &Task) -> TaskFacts {
    TaskFacts {
        id: t.id.clone(),
        task_type: t.kind.clone(),
        priority: i64::from(t.priority),
        labels: t.labels.clone(),
        title: t.title.clone(),
    }
}

pub fn agent_facts(a: &AgentRecord) -> AgentFacts {
    AgentFacts { name: a.name.clone(), labels: a.labels.clone(), backend: a.backend.clone() }
}

/// A decision as a Policy Decision Record (the event adds the time).
pub fn record(d: &PolicyDecision, actor: &str) -> PolicyDecided {
    PolicyDecided {
        stage: d.inputs.stage.as_str().to_owned(),
        decision: d.effect.as_str().to_owned(),
        rule: d.rule_id.clone(),
        file: d.file.as_ref().map(|f| f.display().to_string()),
        line: d.line.map(|l| l as u64),
        reason: d.reason.clone(),
        inputs: serde_json::to_value(&d.inputs).unwrap_or(Value::Null),
        actor: actor.to_owned(),
    }
}

/// Whether a decision is worth a record: a rule matched, or the default is not "allow".
pub fn enforced(d: &PolicyDecision) -> bool {
    d.rule_id.is_some() || d.effect != Effect::Allow
}

/// The policy at each tool call of a task's run: deny and allow by a rule are final, "require
/// approval" asks (and is denied when nobody can be asked).
pub struct PolicyGate {
    pub policy: Arc<PolicySet>,
    pub task: TaskFacts,
    pub agent: AgentFacts,
    pub root: PathBuf,
}

impl ToolGate for PolicyGate {
    fn check(&self, tool: &str, input: &Value, _cwd: &Path) -> Option<GateVerdict> {
        let facts = ToolFacts::from_call(tool, input, &self.root);
        let d = self.policy.evaluate(
            &DecisionInput::new(Stage::Tool)
                .with_task(self.task.clone())
                .with_agent(self.agent.clone())
                .with_tool(facts),
        );
        if !enforced(&d) {
            return None;
        }
        let action = match d.effect {
            Effect::Allow => Action::Allow,
            Effect::Deny => Action::Deny,
            Effect::RequireApproval => Action::Ask,
        };
        Some(GateVerdict { action, record: record(&d, &format!("agent:{}", self.agent.name)) })
    }
}

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
            let id = crate::task_cmd::resolve(&*stores.tasks, &task).await?;
            let events = descartes_runtime::audit::task_events(&stores, &id).await?;
            let mut n = 0;
            for e in &events {
                let EventData::PolicyDecided(p) = &e.data else { continue };
                n += 1;
                if json {
                    println!("{}", serde_json::json!({ "at": e.at, "stream": e.run_id, "record": p }));
                } else {
                    let at = match (&p.file, p.line) {
                        (Some(f), Some(l)) => format!(" ({f}:{l})"),
                        (Some(f), None) => format!(" ({f})"),
                        _ => String::new(),
                    };
                    println!(
                        "{}  {:<5}  {:<16}  rule {}{at}  actor {}\n    {}\n    inputs: {}",
                        e.at.to_local("%Y-%m-%d %H:%M:%S"),
                        p.stage,
                        p.decision,
                        p.rule.as_deref().unwrap_or("(default)"),
                        p.actor,
                        p.reason,
                        p.inputs
                    );
                }
            }
            if n == 0 && !json {
                eprintln!("no policy decisions were recorded for task {id}");
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
