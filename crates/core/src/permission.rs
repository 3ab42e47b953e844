//! Permission decisions: the policy's verdict on a call ([`decide`]) and, when it asks, a human's
//! answer through a [`Prompter`]. Used by the agent loop and by the coding-agent CLI driver alike.

use async_trait::async_trait;
use serde_json::Value;

/// What the user is asked about.
#[derive(Debug, Clone)]
pub struct PermissionRequest {
    /// The tool call's id, when it has one.
    pub call_id: Option<String>,
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
    /// Where the rule that asked is written.
    at: At,
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
///
/// A patch (`apply_patch`, whose input lists the `paths` it touches) is decided for each of
/// them, and the strictest verdict (deny, then ask, then allow) is the call's.
pub fn decide_gated(
    gate: Option<&dyn ToolGate>,
    policy: &Policy,
    q: &Question<'_>,
    run_allowed: &HashSet<String>,
    auto_approve: bool,
) -> (Step, Option<PolicyDecided>) {
    let paths = if q.tool == "apply_patch" { per_path(q.input) } else { Vec::new() };
    let mut first = first_verdict(gate, policy, q, paths.first().unwrap_or(q.input));
    for input in paths.iter().skip(1) {
        let f = first_verdict(gate, policy, q, input);
        if f.severity() > first.severity() {
            first = f;
        }
    }
    let decided = |decision, rule: &str, actor: &str, reason: String, at: &At| {
        Step::Decided(PermissionDecided {
            call_id: q.call_id.clone(),
            tool: q.tool.to_owned(),
            decision,
            scope: DecisionScope::Once,
            rule: rule.to_owned(),
            actor: actor.to_owned(),
            reason,
            file: at.0.clone(),
            line: at.1,
        })
    };
    let ask = |rule: String, reason: String, at: At| {
        Step::Ask(PendingAsk {
            request: PermissionRequest {
                call_id: q.call_id.clone(),
                tool: q.tool.to_owned(),
                input: q.input.clone(),
                summary: crate::agent::summarize(q.tool, q.input),
            },
            call_id: q.call_id.clone(),
            rule,
            reason,
            at,
        })
    };
    let verdict = match first {
        // Descartes' own files first: no policy file and no `-y` opens them.
        First::Guardrail(v) => return (decided(Decision::Deny, &v.rule, "guardrail", v.reason, &(None, None)), None),
        First::Gate(g) => {
            let rule = format!("policy:{}", g.record.rule.as_deref().unwrap_or("default"));
            let reason = g.record.reason.clone();
            let at: At = (g.record.file.clone(), g.record.line);
            let step = match g.action {
                Action::Allow => decided(Decision::Allow, &rule, "policy", reason, &at),
                Action::Deny => decided(Decision::Deny, &rule, "policy", reason, &at),
                Action::Ask => ask(rule, reason, at),
            };
            return (step, Some(g.record));
        }
        First::Rules(v) => v,
    };
    let at: At = (verdict.file.clone(), verdict.line);
    match verdict.action {
        Action::Allow => return (decided(Decision::Allow, &verdict.rule, "policy", verdict.reason, &at), None),
        Action::Deny => return (decided(Decision::Deny, &verdict.rule, "policy", verdict.reason, &at), None),
        Action::Ask => {}
    }
    if run_allowed.contains(q.tool) {
        let reason = format!("`{}` was allowed for this run", q.tool);
        return (decided(Decision::Allow, "user:allow-for-run", "user", reason, &(None, None)), None);
    }
    if auto_approve {
        let reason = format!("-y/--yes allows every ask in this run (asked by {})", verdict.rule);
        return (decided(Decision::Allow, "flag:--yes", "flag", reason, &at), None);
    }
    (ask(verdict.rule, verdict.reason, at), None)
}

/// The first verdict on one input of a call: a guardrail's denial, the policy files' decision,
/// or the permission rules' (with the built-in defaults).
enum First {
    Guardrail(crate::policy::Verdict),
    Gate(GateVerdict),
    Rules(crate::policy::Verdict),
}

impl First {
    /// How strict: a guardrail denial, then deny, ask, allow; on the same action the policy
    /// file's verdict before the permission rules' (its ask is not answered by `-y`).
    fn severity(&self) -> u8 {
        let of = |a: Action| match a {
            Action::Allow => 0,
            Action::Ask => 2,
            Action::Deny => 4,
        };
        match self {
            First::Guardrail(_) => 6,
            First::Gate(g) => of(g.action) + 1,
            First::Rules(v) => of(v.action),
        }
    }
}

fn first_verdict(gate: Option<&dyn ToolGate>, policy: &Policy, q: &Question<'_>, input: &Value) -> First {
    if let Some(v) = policy.guardrail(q.tool, input, q.cwd) {
        return First::Guardrail(v);
    }
    if let Some(g) = gate.and_then(|g| g.check(q.tool, input, q.cwd)) {
        return First::Gate(g);
    }
    First::Rules(policy.evaluate(q.tool, input, q.cwd, q.read_only))
}

/// When a call lists several `paths` (a patch), one input per path (with `path` set to it);
/// otherwise none (the call is decided on its own input).
fn per_path(input: &Value) -> Vec<Value> {
    let Some(paths) = input.get("paths").and_then(Value::as_array) else { return Vec::new() };
    paths
        .iter()
        .map(|p| {
            let mut one = input.clone();
            if let Some(o) = one.as_object_mut() {
                o.insert("path".into(), p.clone());
            }
            one
        })
        .collect()
}

/// Where the rule behind a decision is written: file and line.
type At = (Option<String>, Option<u64>);

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
            file: self.at.0.clone(),
            line: self.at.1,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PermissionRules, Rule, RuleSpec, Source};
    use serde_json::json;

    /// A policy file that asks about writes to `b/**` (rule `ask-b`, line 7).
    struct AskB;

    impl ToolGate for AskB {
        fn check(&self, _tool: &str, input: &Value, _cwd: &Path) -> Option<GateVerdict> {
            let path = input.get("path").and_then(Value::as_str)?;
            path.starts_with("/p/b/").then(|| GateVerdict {
                action: Action::Ask,
                record: PolicyDecided {
                    stage: "tool".into(),
                    decision: "require_approval".into(),
                    rule: Some("ask-b".into()),
                    file: Some("/p/.ai/policy.yaml".into()),
                    line: Some(7),
                    reason: "b needs a look".into(),
                    inputs: Value::Null,
                    actor: "agent:x".into(),
                },
            })
        }
    }

    fn policy() -> Policy {
        let spec = |t: &str| RuleSpec::parse(t).unwrap();
        let rules = PermissionRules { ask: vec![spec("apply_patch(a/**)")], ..Default::default() };
        let guard = RuleSpec { tool: "{write_file,apply_patch}".into(), pattern: Some(".git/hooks".into()) };
        Policy::new(&[(Source::Project, rules)])
            .unwrap()
            .with_rules(vec![Rule::new(Action::Deny, Source::Guardrail, guard).unwrap()])
    }

    fn ask(tool: &str, input: &Value, gate: Option<&dyn ToolGate>) -> Step {
        let q = Question { call_id: Some("c".into()), tool, input, read_only: false, cwd: Path::new("/p") };
        decide_gated(gate, &policy(), &q, &HashSet::new(), true).0
    }

    #[test]
    fn a_patch_is_decided_on_every_file_it_touches() {
        let patch = |paths: &[&str]| json!({"paths": paths, "path": paths[0]});
        // One protected file among allowed ones: the guardrail refuses the whole patch.
        let Step::Decided(d) = ask("apply_patch", &patch(&["/p/x.rs", "/p/.git/hooks/pre-commit"]), None) else {
            panic!()
        };
        assert_eq!((d.decision, d.actor.as_str()), (Decision::Deny, "guardrail"));
        // `-y` answers the permission rules' ask on `a/`...
        let Step::Decided(d) = ask("apply_patch", &patch(&["/p/a/1.rs"]), Some(&AskB)) else { panic!() };
        assert_eq!(d.rule, "flag:--yes");
        // ...but not the policy file's ask on `b/`, even when `a/` is asked about too.
        let Step::Ask(a) = ask("apply_patch", &patch(&["/p/a/1.rs", "/p/b/2.rs"]), Some(&AskB)) else { panic!() };
        let d = a.answered(PromptAnswer::Unavailable);
        assert_eq!((d.rule.as_str(), d.file.as_deref(), d.line), ("policy:ask-b", Some("/p/.ai/policy.yaml"), Some(7)));
        // `paths` means nothing to another tool: its own `path` is decided.
        let sneaky = json!({"path": "/p/.git/hooks/x", "paths": ["/p/ok.rs"]});
        let Step::Decided(d) = ask("write_file", &sneaky, None) else { panic!() };
        assert_eq!((d.decision, d.actor.as_str()), (Decision::Deny, "guardrail"));
    }
}
