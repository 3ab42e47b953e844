//! The project's policy engine at run time: the layers loaded for an agent, the facts it sees,
//! Policy Decision Records, and the tool-call gate every run consults (tasks, `run`, `chat`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use descartes_core::permission::{GateVerdict, ToolGate};
use descartes_core::policy::Action;
use descartes_policy::{
    AgentFacts, DecisionInput, Effect, PolicyDecision, PolicyError, PolicySet, Stage, TaskFacts, ToolFacts,
};
use descartes_protocol::{AgentRecord, PolicyDecided, Task};
use serde_json::Value;

use crate::{Mode, Runtime, Selection};

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
pub fn run_gate(rt: &Runtime, sel: &Selection) -> Result<Option<Arc<dyn ToolGate>>, PolicyError> {
    let policy = load(rt, None)?;
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
