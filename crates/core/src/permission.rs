//! Permission decisions: the policy's verdict on a call ([`decide`]) and, when it asks, a human's
//! answer through a [`Prompter`]. Used by the agent loop and by the coding-agent CLI driver alike.

use async_trait::async_trait;
use serde_json::Value;

/// What the user is asked about.
#[derive(Debug, Clone)]
pub struct PermissionRequest {
    pub tool: String,
    pub input: Value,
    /// A one-line human description, e.g. `shell: rm -rf build`.
    pub summary: String,
}

/// The user's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptAnswer {
    AllowOnce,
    AllowForRun,
    Deny,
    /// Nobody can be asked (no terminal).
    Unavailable,
}

/// Asks a human whether a sensitive action may proceed.
#[async_trait]
pub trait Prompter: Send + Sync {
    async fn ask(&self, request: &PermissionRequest) -> PromptAnswer;
}

/// A prompter for non-interactive use: nobody can be asked.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPrompter;

#[async_trait]
impl Prompter for NoPrompter {
    async fn ask(&self, _request: &PermissionRequest) -> PromptAnswer {
        PromptAnswer::Unavailable
    }
}

use std::collections::HashSet;
use std::path::Path;

use descartes_protocol::{Decision, DecisionScope, PermissionDecided, PolicyDecided};

use crate::policy::{Action, BUILTIN_ASK, Policy};

/// A policy consulted before the permission rules: the project's policy engine (issue's
/// `.ai/policy.yaml`), whose decisions are Policy Decision Records.
pub trait ToolGate: Send + Sync {
    /// The policy's verdict on a call, or None when no rule of it applies (the permission
    /// rules decide then).
    fn check(&self, tool: &str, input: &Value, cwd: &Path) -> Option<GateVerdict>;
}

/// A verdict of a [`ToolGate`]: what to do, and the record to write.
#[derive(Debug, Clone)]
pub struct GateVerdict {
    pub action: Action,
    pub record: PolicyDecided,
}

/// One permission question: a call of `tool` with `input`, by the agent loop (a Descartes tool)
/// or by a coding-agent CLI (its permission request).
pub struct Question<'a> {
    pub call_id: Option<String>,
    pub tool: &'a str,
    pub input: &'a Value,
    pub read_only: bool,
    pub cwd: &'a Path,
}

/// The first step of a decision: final, or a human must be asked (after the caller has made
/// everything so far durable).
pub enum Step {
    Decided(PermissionDecided),
    Ask(PendingAsk),
}

/// An ask waiting for a human's answer.
pub struct PendingAsk {
    pub request: PermissionRequest,
    call_id: Option<String>,
    rule: String,
    reason: String,
}

/// Decides a call by the policy: the configured rules (the most specific first, then the
/// built-in defaults: read-only tools allowed, others ask). An ask is answered by an earlier
/// "allow for this run" of the tool, by `-y` (`auto_approve`), or by a human ([`PendingAsk`]).
/// A deny is final, even with `-y`.
pub fn decide(policy: &Policy, q: &Question<'_>, run_allowed: &HashSet<String>, auto_approve: bool) -> Step {
    decide_gated(None, policy, q, run_allowed, auto_approve).0
}

/// [`decide`], with a [`ToolGate`] consulted first: its deny and allow are final, its
/// "require approval" asks a human (never answered by `-y` or an earlier allow-for-run). Also
/// returns the gate's record, which the caller appends to the log.
pub fn decide_gated(
    gate: Option<&dyn ToolGate>,
    policy: &Policy,
    q: &Question<'_>,
    run_allowed: &HashSet<String>,
    auto_approve: bool,
) -> (Step, Option<PolicyDecided>) {
    let decided = |decision, rule: &str, actor: &str, reason: String| {
        Step::Decided(PermissionDecided {
            call_id: q.call_id.clone(),
            tool: q.tool.to_owned(),
            decision,
            scope: DecisionScope::Once,
            rule: rule.to_owned(),
            actor: actor.to_owned(),
            reason,
        })
    };
    let ask = |rule: String, reason: String| {
        Step::Ask(PendingAsk {
            request: PermissionRequest {
                tool: q.tool.to_owned(),
                input: q.input.clone(),
                summary: crate::agent::summarize(q.tool, q.input),
            },
            call_id: q.call_id.clone(),
            rule,
            reason,
        })
    };
    // Descartes' own files first: no policy file and no `-y` opens them.
    if let Some(v) = policy.guardrail(q.tool, q.input, q.cwd) {
        return (decided(Decision::Deny, &v.rule, "guardrail", v.reason), None);
    }
    if let Some(g) = gate.and_then(|g| g.check(q.tool, q.input, q.cwd)) {
        let rule = format!("policy:{}", g.record.rule.as_deref().unwrap_or("default"));
        let reason = g.record.reason.clone();
        let step = match g.action {
            Action::Allow => decided(Decision::Allow, &rule, "policy", reason),
            Action::Deny => decided(Decision::Deny, &rule, "policy", reason),
            Action::Ask => ask(rule, reason),
        };
        return (step, Some(g.record));
    }
    let verdict = policy.evaluate(q.tool, q.input, q.cwd, q.read_only);
    match verdict.action {
        Action::Allow => return (decided(Decision::Allow, &verdict.rule, "policy", verdict.reason), None),
        Action::Deny => return (decided(Decision::Deny, &verdict.rule, "policy", verdict.reason), None),
        Action::Ask => {}
    }
    if run_allowed.contains(q.tool) {
        let reason = format!("`{}` was allowed for this run", q.tool);
        return (decided(Decision::Allow, "user:allow-for-run", "user", reason), None);
    }
    if auto_approve {
        let reason = format!("-y/--yes allows every ask in this run (asked by {})", verdict.rule);
        return (decided(Decision::Allow, "flag:--yes", "flag", reason), None);
    }
    (ask(verdict.rule, verdict.reason), None)
}

impl PendingAsk {
    /// The decision a human's answer makes.
    pub fn answered(self, answer: PromptAnswer) -> PermissionDecided {
        let name = self.request.tool.clone();
        let decided = |decision, scope, rule: &str, actor: &str, reason: String| PermissionDecided {
            call_id: self.call_id.clone(),
            tool: name.clone(),
            decision,
            scope,
            rule: rule.to_owned(),
            actor: actor.to_owned(),
            reason,
        };
        match answer {
            PromptAnswer::AllowOnce => decided(
                Decision::Allow,
                DecisionScope::Once,
                "user:allow-once",
                "user",
                format!("allowed once by the user (asked by {})", self.rule),
            ),
            PromptAnswer::AllowForRun => decided(
                Decision::Allow,
                DecisionScope::Run,
                "user:allow-for-run",
                "user",
                format!("`{name}` allowed for this run by the user"),
            ),
            PromptAnswer::Deny => decided(
                Decision::Deny,
                DecisionScope::Once,
                "user:deny",
                "user",
                format!("denied by the user (asked by {})", self.rule),
            ),
            PromptAnswer::Unavailable => decided(
                Decision::Deny,
                DecisionScope::Once,
                if self.rule == BUILTIN_ASK { "builtin:ask-without-terminal" } else { &self.rule },
                "policy",
                format!(
                    "`{name}` needs approval ({}) and there is no terminal to ask; rerun with -y/--yes to allow it",
                    self.reason
                ),
            ),
        }
    }
}
