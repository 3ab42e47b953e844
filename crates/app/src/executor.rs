//! The executor: runs tasks on registered agents, each in its own git worktree, and records
//! the evidence. It is the daemon's [`TaskRunner`] (and `task execute` runs one task with it).
//!
//! - **Claims** are routed ([`descartes_core::routing`]): the queue's head is read, each task
//!   goes to the best eligible agent the project policy allows, and is claimed for it in one
//!   transaction that re-checks readiness and the agent's capacity. With no agent registered,
//!   the daemon claims and runs tasks with its `--command` as before.
//! - **Runs**: when the project is a git repository, the attempt runs in the worktree
//!   `<state>/worktrees/<task>` on the branch `descartes/<task>` (the user's checkout is never
//!   touched). A `command` agent runs its command there; a model agent runs Descartes' own
//!   loop (tools confined to the worktree, under the sandbox and the policy); an agent CLI runs
//!   the CLI. Runs are unattended: asks are allowed, deny rules (permissions and policy) still
//!   apply, and a policy "require approval" is denied (nobody can be asked).
//! - **Evidence** after every attempt, failed ones included: the diff against the base commit,
//!   the changed files (those outside the task's lock paths flagged), the test command's
//!   result, the run's transcript, tokens and cost. Blobs are stored content-addressed under
//!   `<state>/evidence`; a `task_evidence` event holds the manifest.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use descartes_core::agent::NullSink;
use descartes_core::permission::NoPrompter;
use descartes_core::routing::{self};
use descartes_core::{Budget, Clock, SystemClock, TaskError, TaskStore};
use descartes_policy::{DecisionInput, Effect, Stage, UsageFacts};
use descartes_protocol::{
    AgentRecord, Claim, EventData, Message, NewEvent, PolicyDecided, RunId, Task, TaskEvidence, TaskRunLinked,
    TaskWorktree,
};
use descartes_runtime::daemon::{CommandRunner, Outcome, TaskRunner};
use descartes_runtime::{Runtime, Stores};
use descartes_worktree::{EvidenceOptions, EvidenceRef, EvidenceStore, Repo, Worktree, Worktrees};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::run::{RunIo, RunSettings, prepare};

/// How far down the queue a routed claim looks for a task some agent can take.
const MAX_SCAN: usize = 4096;

pub struct Executor {
    rt: Arc<Runtime>,
    stores: Stores,
    worktrees: Option<Worktrees>,
    evidence: EvidenceStore,
    /// Runs tasks that no agent was routed to (the daemon's `--command`).
    fallback: Option<CommandRunner>,
    /// Policy decisions already recorded by this process for tasks that wait (so a task that
    /// waits for approval is not recorded again at every scan).
    recorded: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// What the router and the policy say about a task now.
pub enum Choice {
    /// Claim it for this agent; the policy's record (if any) goes with the claim.
    Agent(AgentRecord, Option<PolicyDecided>),
    /// It waits, for this reason.
    Wait(String),
}

/// Where a task's latest worktree and evidence are, from its events.
#[derive(Debug, Default, Clone)]
pub struct TaskArtifacts {
    pub worktree: Option<Worktree>,
    pub evidence: Option<(u32, bool, EvidenceRef, serde_json::Value)>,
    pub merged: Option<String>,
    pub discarded: bool,
}

impl Executor {
    pub async fn new(rt: Arc<Runtime>, stores: Stores, fallback: Option<CommandRunner>) -> anyhow::Result<Self> {
        let worktrees = match Repo::discover(&rt.cwd).await {
            Ok(Some(repo)) => Some(Worktrees::new(repo, rt.places.state_dir.join("worktrees"))),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "git is not usable here; tasks run in the project directory");
                None
            }
        };
        let evidence = EvidenceStore::new(rt.places.state_dir.join("evidence"));
        // The state directory may be inside the user's repository (project mode): its task
        // worktrees and blobs must not show in the user's `git status`.
        for dir in ["worktrees", "evidence"] {
            let dir = rt.places.state_dir.join(dir);
            let ignore = dir.join(".gitignore");
            if !ignore.exists() {
                let _ = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&ignore, "*\n"));
            }
        }
        Ok(Self { rt, stores, worktrees, evidence, fallback, recorded: Default::default() })
    }

    pub fn evidence_store(&self) -> &EvidenceStore {
        &self.evidence
    }

    pub fn worktrees(&self) -> Option<&Worktrees> {
        self.worktrees.as_ref()
    }

    async fn record(&self, task_id: &str, data: impl Into<EventData>) {
        let event = NewEvent::new(&RunId::from(task_id), data);
        if let Err(e) = self.stores.events.append(vec![event]).await {
            tracing::warn!(task = %task_id, error = %e, "cannot record a task event");
        }
    }

    /// Whether a human approved the task for `stage` (`descartes task approve`).
    async fn approved(&self, task_id: &str, stage: &str) -> bool {
        match self.stores.events.read_run(&RunId::from(task_id), 0).await {
            Ok(events) => events.iter().any(|e| matches!(&e.data, EventData::TaskApproved(a) if a.stage == stage)),
            Err(_) => false,
        }
    }

    /// Records a decision on a task that waits, once per process.
    async fn record_waiting(&self, task_id: &str, r: PolicyDecided) {
        let key = format!("{task_id}|{}|{}|{}|{}", r.stage, r.actor, r.decision, r.rule.as_deref().unwrap_or(""));
        let first = self.recorded.lock().map(|mut s| s.insert(key)).unwrap_or(true);
        if first {
            self.record(task_id, r).await;
        }
    }

    /// The agent `task` goes to: the router's choice among the agents the project policy lets
    /// claim it (an agent denied by a rule is passed over; "require approval" waits for
    /// `task approve`).
    pub async fn choose(
        &self,
        task: &Task,
        agents: &[AgentRecord],
        load: &std::collections::HashMap<String, u32>,
    ) -> Choice {
        let now = SystemClock.now();
        let mut pool: Vec<AgentRecord> = agents.to_vec();
        let mut denied = Vec::new();
        loop {
            let agent = match routing::route(task, &pool, load, now) {
                Ok(a) => a.clone(),
                Err(why) if denied.is_empty() => return Choice::Wait(why),
                Err(_) => return Choice::Wait(format!("the policy denies it to {}", denied.join("; "))),
            };
            let policy = match descartes_runtime::policy_gate::load(&self.rt, Some(&agent.name)) {
                Ok(p) => p,
                Err(e) => return Choice::Wait(format!("the policy cannot be read: {e}")),
            };
            let input = DecisionInput::new(Stage::Claim)
                .with_task(descartes_runtime::policy_gate::task_facts(task))
                .with_agent(descartes_runtime::policy_gate::agent_facts(&agent))
                .with_usage(UsageFacts { attempts: task.attempts + 1, ..Default::default() });
            let d = policy.evaluate(&input);
            let r = descartes_runtime::policy_gate::record(&d, &format!("agent:{}", agent.name));
            match d.effect {
                Effect::Allow => {
                    return Choice::Agent(agent, descartes_runtime::policy_gate::enforced(&d).then_some(r));
                }
                Effect::Deny => {
                    denied.push(format!("{} ({})", agent.name, d.reason));
                    self.record_waiting(&task.id, r).await;
                    pool.retain(|a| a.name != agent.name);
                }
                Effect::RequireApproval => {
                    if self.approved(&task.id, "claim").await {
                        return Choice::Agent(agent, Some(r));
                    }
                    self.record_waiting(&task.id, r).await;
                    return Choice::Wait(format!(
                        "it needs approval ({}); `descartes task approve {}` lets it run",
                        d.reason, task.id
                    ));
                }
            }
        }
    }

    /// Routes `task` now: the agent that gets it, or why none can.
    pub async fn route(&self, task: &Task) -> Result<(AgentRecord, Option<PolicyDecided>), String> {
        let agents = self.stores.agents.list_agents().await.map_err(|e| e.to_string())?;
        let load = self.stores.tasks.agent_load().await.map_err(|e| e.to_string())?;
        match self.choose(task, &agents, &load).await {
            Choice::Agent(a, r) => Ok((a, r)),
            Choice::Wait(why) => Err(why),
        }
    }

    /// Claims the task `id` for `worker`, routed to an eligible agent.
    pub async fn claim_task(&self, id: &str, worker: &str, ttl: Duration) -> anyhow::Result<Claim> {
        let task = self.stores.tasks.get_task(id).await?;
        let (agent, record) =
            self.route(&task).await.map_err(|why| anyhow::anyhow!("task {id} cannot run now: {why}"))?;
        match self.stores.tasks.claim_one(&task.id, worker, ttl, Some((&agent.name, agent.max_concurrent))).await? {
            Some(c) => {
                if let Some(r) = record {
                    self.record(&c.task.id, r).await;
                }
                Ok(c)
            }
            None => {
                let why = descartes_core::task::waiting_reason(&task, &[], &[], SystemClock.now())
                    .unwrap_or_else(|| format!("it is {} or not ready (dependencies, locks, backoff)", task.status));
                anyhow::bail!("task {id} cannot be claimed: {why}")
            }
        }
    }

    /// Reads what the task's events say about its worktree and evidence.
    pub async fn artifacts(&self, task_id: &str) -> anyhow::Result<TaskArtifacts> {
        let events = self.stores.events.read_run(&RunId::from(task_id), 0).await?;
        let mut a = TaskArtifacts::default();
        for e in events {
            match e.data {
                EventData::TaskWorktree(w) => {
                    a.worktree = serde_json::from_value(w.worktree).ok();
                    a.discarded = false;
                }
                EventData::TaskEvidence(ev) => {
                    let manifest = ev.evidence.clone();
                    if let Ok(r) = serde_json::from_value::<EvidenceRef>(ev.evidence["files"].clone()) {
                        a.evidence = Some((ev.attempt, ev.succeeded, r, manifest));
                    }
                }
                EventData::TaskMerged(m) => a.merged = Some(m.commit),
                EventData::TaskDiscarded(_) => a.discarded = true,
                _ => {}
            }
        }
        Ok(a)
    }

    async fn run_on_agent(&self, task: &Task, token: i64, agent: &AgentRecord, cancel: CancellationToken) -> Outcome {
        let attempt = task.attempts;
        let (cwd, worktree) = match &self.worktrees {
            Some(w) => match w.create(&task.id, None).await {
                Ok(wt) => {
                    self.record(&task.id, TaskWorktree { attempt, worktree: json!(wt) }).await;
                    (wt.path.clone(), Some(wt))
                }
                Err(e) => return Outcome::Failed { reason: format!("cannot create the task's worktree: {e}") },
            },
            None => (self.rt.cwd.clone(), None),
        };
        let mut run_id = None;
        let outcome = if agent.backend == "command" {
            let command = agent.command.clone().unwrap_or_default();
            let exe = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "descartes".into());
            CommandRunner::new(command, &cwd)
                .supervised_by(self.rt.sandbox())
                .with_env("DESCARTES_BIN", exe)
                .with_env("DESCARTES_AGENT", agent.name.clone())
                .run(task, token, cancel)
                .await
        } else {
            let id = RunId::generate();
            run_id = Some(id.clone());
            self.record(&task.id, TaskRunLinked { run_id: id.clone(), agent: agent.name.clone(), attempt }).await;
            self.run_model(task, agent, cwd.clone(), id, cancel).await
        };
        if matches!(outcome, Outcome::Cancelled) {
            return outcome;
        }
        let outcome = self.collect(task, agent, worktree.as_ref(), run_id.as_ref(), outcome).await;
        self.note_outcome(agent, matches!(outcome, Outcome::Succeeded { .. })).await;
        outcome
    }

    async fn run_model(
        &self,
        task: &Task,
        agent: &AgentRecord,
        cwd: PathBuf,
        run_id: RunId,
        cancel: CancellationToken,
    ) -> Outcome {
        let prompt = if task.prompt.trim().is_empty() { task.title.clone() } else { task.prompt.clone() };
        let policy = match descartes_runtime::policy_gate::load(&self.rt, Some(&agent.name)) {
            Ok(p) => Arc::new(p),
            Err(e) => return Outcome::Failed { reason: format!("the policy cannot be read: {e}") },
        };
        // The policy's budgets cap the run, under the configured ones.
        let b = policy.budgets();
        let min_u = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        let min_f = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        let budget = Budget {
            max_tokens: min_u(self.rt.config.budget.max_tokens, b.max_tokens),
            max_cost_usd: min_f(self.rt.config.budget.max_cost_usd, b.max_cost_usd),
        };
        let gate: Option<Arc<dyn descartes_core::permission::ToolGate>> = if policy.is_empty() {
            None
        } else {
            Some(Arc::new(descartes_runtime::policy_gate::PolicyGate {
                policy: policy.clone(),
                task: Some(descartes_runtime::policy_gate::task_facts(task)),
                agent: descartes_runtime::policy_gate::agent_facts(agent),
                root: cwd.clone(),
            }))
        };
        let time_limit = b.max_time_secs.map(Duration::from_secs_f64);
        let settings = RunSettings {
            provider: Some(agent.backend.clone()),
            model: agent.model.clone(),
            auto_approve: true,
            max_turns: self.rt.config.max_turns,
            cwd,
            system_prompt: None,
            budget,
        };
        if let Some(limit) = time_limit {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(limit).await;
                cancel.cancel();
            });
        }
        let started = std::time::Instant::now();
        let io = RunIo { sink: Arc::new(NullSink), prompter: Arc::new(NoPrompter), cancel, gate };
        let prepared = match prepare(&self.rt, self.stores.events.clone(), &[], settings, io).await {
            Ok(p) => p,
            Err(e) => return Outcome::Failed { reason: format!("agent {} cannot start: {e:#}", agent.name) },
        };
        match prepared.start(run_id.clone(), prompt.clone(), Message::user_text(&prompt)).await {
            Ok(descartes_core::RunOutcome::Completed { result }) => Outcome::Succeeded { result: Some(result) },
            Ok(descartes_core::RunOutcome::Cancelled) if time_limit.is_some_and(|l| started.elapsed() >= l) => {
                Outcome::Failed { reason: format!("run {run_id} stopped at the policy's time budget") }
            }
            Ok(descartes_core::RunOutcome::Cancelled) => Outcome::Cancelled,
            Ok(descartes_core::RunOutcome::Failed { error, .. }) => {
                Outcome::Failed { reason: format!("run {run_id} failed: {error}") }
            }
            Ok(descartes_core::RunOutcome::BudgetExceeded { error }) => {
                Outcome::Failed { reason: format!("run {run_id} stopped at its budget: {error}") }
            }
            Err(e) => Outcome::Failed { reason: format!("run {run_id}: {e}") },
        }
    }

    /// Collects and records the evidence of an attempt; a failing test command fails it.
    async fn collect(
        &self,
        task: &Task,
        agent: &AgentRecord,
        worktree: Option<&Worktree>,
        run_id: Option<&RunId>,
        outcome: Outcome,
    ) -> Outcome {
        let mut manifest = json!({ "agent": agent.name });
        let mut outcome = outcome;
        if let Some(run) = run_id {
            manifest["run_id"] = json!(run);
            if let Ok(st) = self.stores.events.replay_run(run).await {
                manifest["tokens"] = json!(st.usage.all_tokens());
                manifest["cost_usd"] = json!(st.cost_usd);
            }
            if let Ok(events) = self.stores.events.read_run(run, 0).await {
                let transcript: String =
                    events.iter().filter_map(|e| serde_json::to_string(e).ok()).map(|l| l + "\n").collect();
                match self.evidence.put(transcript.as_bytes()) {
                    Ok(h) => manifest["transcript"] = json!(h),
                    Err(e) => tracing::warn!(task = %task.id, error = %e, "cannot store the transcript"),
                }
            }
        }
        if let Some(wt) = worktree {
            let opts = EvidenceOptions {
                test_command: task.test_command.clone(),
                lock_globs: task.locks.clone(),
                ..EvidenceOptions::default()
            };
            match descartes_worktree::collect_evidence(wt, &opts).await {
                Ok(ev) => {
                    if let Some(t) = &ev.test
                        && !t.passed()
                        && matches!(outcome, Outcome::Succeeded { .. })
                    {
                        let how = match (t.timed_out, t.exit_code) {
                            (true, _) => "timed out".to_owned(),
                            (false, Some(c)) => format!("exit {c}"),
                            (false, None) => "killed".to_owned(),
                        };
                        outcome =
                            Outcome::Failed { reason: format!("the test command `{}` failed ({how})", t.command) };
                    }
                    match self.evidence.put_evidence(&ev) {
                        Ok(r) => manifest["files"] = json!(r),
                        Err(e) => tracing::warn!(task = %task.id, error = %e, "cannot store the evidence"),
                    }
                }
                Err(e) => {
                    tracing::warn!(task = %task.id, error = %e, "cannot collect the evidence");
                    manifest["error"] = json!(e.to_string());
                }
            }
        }
        let succeeded = matches!(outcome, Outcome::Succeeded { .. });
        if let Outcome::Failed { reason } = &outcome {
            manifest["failure"] = json!(reason);
        }
        self.record(&task.id, TaskEvidence { attempt: task.attempts, succeeded, evidence: manifest }).await;
        outcome
    }

    async fn note_outcome(&self, agent: &AgentRecord, succeeded: bool) {
        let what = if succeeded { "attempt succeeded" } else { "attempt failed" };
        let change = Box::new(move |a: &mut AgentRecord| {
            let now = SystemClock.now();
            routing::record_outcome(&mut a.stats, succeeded, now);
            a.updated_at = now;
        });
        if let Err(e) = self.stores.agents.update_agent(&agent.name, what, change).await {
            tracing::warn!(agent = %agent.name, error = %e, "cannot record the agent's statistics");
        }
    }

    async fn sync_audit(&self, task_id: &str) {
        if let Err(e) = descartes_runtime::audit::sync(&self.stores, task_id).await {
            tracing::warn!(task = %task_id, error = %e, "cannot bring the audit trail up to date");
        }
    }
}

#[async_trait]
impl TaskRunner for Executor {
    async fn run(&self, task: &Task, token: i64, cancel: CancellationToken) -> Outcome {
        // No agent runs while a guardrail file changed by an earlier run awaits review; the
        // attempt fails and is retried after its backoff.
        if let Err(e) = self.rt.check_guardrails() {
            return Outcome::Failed { reason: e.to_string() };
        }
        let guardrails = self.rt.snapshot_guardrails();
        let outcome = match &task.agent {
            Some(name) => match self.stores.agents.get_agent(name).await {
                Ok(Some(agent)) => self.run_on_agent(task, token, &agent, cancel).await,
                Ok(None) => Outcome::Failed { reason: format!("agent {name} is no longer registered") },
                Err(e) => Outcome::Failed { reason: format!("cannot read agent {name}: {e}") },
            },
            None => match &self.fallback {
                Some(c) => c.run(task, token, cancel).await,
                None => Outcome::Failed { reason: "no agent was routed to the task".into() },
            },
        };
        if let Ok(changed) = self.rt.flag_guardrail_changes(&guardrails, &task.id)
            && !changed.is_empty()
        {
            tracing::warn!(task = %task.id, ?changed, "guardrail files changed during the task's attempt");
        }
        self.sync_audit(&task.id).await;
        outcome
    }

    async fn claim_next(&self, tasks: &dyn TaskStore, worker: &str, ttl: Duration) -> Result<Option<Claim>, TaskError> {
        let agents = self.stores.agents.list_agents().await?;
        if agents.is_empty() {
            if self.fallback.is_none() {
                return Ok(None);
            }
            return Ok(tasks.claim(worker, ttl, 1).await?.pop());
        }
        let mut load = tasks.agent_load().await?;
        let now = SystemClock.now();
        let mut limit = 32;
        loop {
            let queue = tasks.peek_queued(limit).await?;
            for task in &queue {
                // Cheap check first: most tasks no agent can take now are skipped here.
                if routing::route(task, &agents, &load, now).is_err() {
                    continue;
                }
                let Choice::Agent(agent, record) = self.choose(task, &agents, &load).await else { continue };
                if let Some(claim) =
                    tasks.claim_one(&task.id, worker, ttl, Some((&agent.name, agent.max_concurrent))).await?
                {
                    if let Some(r) = record {
                        self.record(&claim.task.id, r).await;
                    }
                    return Ok(Some(claim));
                }
                // Not ready (dependencies, locks) or the agent filled up meanwhile.
                load = tasks.agent_load().await?;
            }
            if queue.len() < limit || limit >= MAX_SCAN {
                return Ok(None);
            }
            limit *= 4;
        }
    }

    fn describe(&self) -> String {
        match &self.fallback {
            Some(c) => format!("registered agents (unrouted tasks: {})", c.describe()),
            None => "registered agents".into(),
        }
    }
}
