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

/// The policy at each tool call of a run (a task's, or one started by `run` or `chat`): deny
/// and allow by a rule are final, "require approval" asks (and is denied when nobody can be
/// asked).
pub struct PolicyGate {
    pub policy: Arc<PolicySet>,
    /// The task the run works on (none for `run` and `chat`: rules about tasks do not match).
    pub task: Option<TaskFacts>,
    pub agent: AgentFacts,
    pub root: PathBuf,
}

/// The policy gate of a run started by `run` or `chat` on the provider `sel`: the global and
/// project policies (no agent layer: no registered agent runs it), the provider as the agent
/// (`agents` rules match its name, `backend` its kind). `None` when no policy file exists. A
/// policy file with errors is a configuration error naming each problem's file and line.
pub fn run_gate(rt: &Runtime, sel: &descartes_runtime::Selection) -> Result<Option<Arc<dyn ToolGate>>> {
    let policy = load(rt, None).map_err(|e| crate::commands::user_error(3, e.to_string()))?;
    if policy.is_empty() {
        return Ok(None);
    }
    Ok(Some(Arc::new(PolicyGate {
        policy: Arc::new(policy),
        task: None,
        agent: AgentFacts { name: sel.provider.clone(), labels: Vec::new(), backend: sel.kind.clone() },
        root: project_root(rt),
    })))
}

impl ToolGate for PolicyGate {
    fn check(&self, tool: &str, input: &Value, _cwd: &Path) -> Option<GateVerdict> {
        let facts = ToolFacts::from_call(tool, input, &self.root);
        let mut decision = DecisionInput::new(Stage::Tool).with_agent(self.agent.clone()).with_tool(facts);
        if let Some(task) = &self.task {
            decision = decision.with_task(task.clone());
        }
        let d = self.policy.evaluate(&decision);
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
            // A task's decisions (its own stream and its runs'), else a run's.
            let (what, id, events) = match crate::task_cmd::resolve(&*stores.tasks, &task).await {
                Ok(id) => ("task", id.clone(), descartes_runtime::audit::task_events(&stores, &id).await?),
                Err(descartes_core::TaskError::NotFound(_)) => {
                    let run = rt.resolve_run(&*stores.events, &task).await.map_err(|e| match e {
                        descartes_runtime::RuntimeError::RunNotFound(_) => crate::commands::user_error(
                            5,
                            format!(
                                "no task or run matches `{task}`; `descartes task list` and `descartes list` show them"
                            ),
                        ),
                        other => other.into(),
                    })?;
                    ("run", run.to_string(), stores.events.read_run(&run, 0).await?)
                }
                Err(e) => return Err(e.into()),
            };
            let mut n = 0;
            for e in &events {
                if let EventData::PermissionDecided(p) = &e.data {
                    n += 1;
                    if json {
                        println!("{}", serde_json::json!({ "at": e.at, "stream": e.run_id, "permission": p }));
                    } else {
                        println!(
                            "{}  tool   {:<16}  rule {}  actor {}  ({})\n    {}",
                            e.at.to_local("%Y-%m-%d %H:%M:%S"),
                            if p.decision == descartes_protocol::Decision::Allow { "allow" } else { "deny" },
                            p.rule,
                            p.actor,
                            p.tool,
                            p.reason
                        );
                    }
                    continue;
                }
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
                eprintln!("no decisions were recorded for {what} {id}");
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
