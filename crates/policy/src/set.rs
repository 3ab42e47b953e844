//! The merged policy: loading the layers, evaluating a decision, finding conflicts.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use globset::{GlobSet, GlobSetBuilder};

use crate::cond::{self, Condition};
use crate::error::{Diagnostic, DiagnosticKind, PolicyError, Result};
use crate::facts::{Access, DecisionInput, Effect, Layer, PolicyDecision, TOOL_ALIASES, UsageFacts};
use crate::file::{self, BudgetKind, Budgets, Compiled, Entry, Origin, Rule, SLOTS, Slot};
use crate::pattern::{
    KINDS, Kind, command_parts, is_simple_command, normalize_command, normalize_host, normalize_path,
};

/// The project policy file, relative to the project root.
pub const PROJECT_POLICY: &str = ".ai/policy.yaml";
/// The directory of per-agent policy files (`<agent>.yaml`), relative to the project root.
pub const AGENT_POLICIES: &str = ".ai/policies";
/// The global policy's file name in the user config directory.
pub const GLOBAL_POLICY: &str = "policy.yaml";

/// The policy in force: the layers merged (see the crate docs for the rules), compiled and
/// indexed for evaluation. Cheap to share (`Arc<PolicySet>`); `Send + Sync`.
#[derive(Debug, Clone)]
pub struct PolicySet {
    rules: Vec<Rule>,
    compiled: Vec<Compiled>,
    budgets: Budgets,
    budget_origins: [Option<Origin>; 4],
    default: Effect,
    default_origin: Option<Origin>,
    files: Vec<(Layer, PathBuf)>,
    index: [Option<SlotIndex>; SLOTS],
}

/// Every pattern of one slot of every rule, in one glob set.
#[derive(Debug, Clone)]
struct SlotIndex {
    set: GlobSet,
    /// For each glob of the set: the rule and pattern it belongs to.
    owners: Vec<Owner>,
}

#[derive(Debug, Clone, Copy)]
struct Owner {
    rule: u32,
    pattern: u32,
    literal: u32,
}

/// How a matching rule ranks: matcher kinds, literal characters of its matching patterns,
/// whether it has a condition, then its effect's severity and its layer.
type Specificity = (u32, u32, bool, u8, Layer);

/// The best (most literal) pattern of a rule that matched, per matcher kind.
#[derive(Debug, Clone, Copy, Default)]
struct Best {
    matched: bool,
    slot: u8,
    pattern: u32,
    literal: u32,
}

impl Default for PolicySet {
    fn default() -> Self {
        Self::empty()
    }
}

impl PolicySet {
    /// No rules, no budgets: everything is allowed.
    pub fn empty() -> Self {
        Self::merge(Vec::new(), Vec::new())
    }

    /// Loads the layers of an agent's policy: `global` (the user's file, e.g.
    /// `~/.config/descartes/policy.yaml`), `<project_root>/.ai/policy.yaml` and, for an agent,
    /// `<project_root>/.ai/policies/<agent>.yaml`. Missing files are skipped (no file at all is
    /// an empty policy). Every problem in every file is reported at once.
    pub fn load(global: Option<&Path>, project_root: &Path, agent: Option<&str>) -> Result<Self> {
        let mut files = Vec::new();
        if let Some(g) = global {
            files.push((Layer::Global, g.to_owned()));
        }
        files.push((Layer::Project, project_root.join(PROJECT_POLICY)));
        if let Some(agent) = agent {
            files.push((Layer::Agent, agent_policy_path(project_root, agent)?));
        }
        let mut sources = Vec::new();
        let mut diags = Vec::new();
        for (layer, path) in files {
            match std::fs::read_to_string(&path) {
                Ok(text) => sources.push((layer, path, text)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => diags.push(unreadable(&path, &e)),
            }
        }
        Self::build(sources, diags)
    }

    /// Loads the given files, merged in the order given (each with its layer). A missing file
    /// is an error.
    pub fn from_files(files: &[(Layer, PathBuf)]) -> Result<Self> {
        let mut sources = Vec::new();
        let mut diags = Vec::new();
        for (layer, path) in files {
            match std::fs::read_to_string(path) {
                Ok(text) => sources.push((*layer, path.clone(), text)),
                Err(e) => diags.push(unreadable(path, &e)),
            }
        }
        Self::build(sources, diags)
    }

    /// Parses policy texts (each named by a path for diagnostics), merged in the order given.
    pub fn from_sources(sources: &[(Layer, PathBuf, String)]) -> Result<Self> {
        Self::build(sources.to_vec(), Vec::new())
    }

    fn build(sources: Vec<(Layer, PathBuf, String)>, mut diags: Vec<Diagnostic>) -> Result<Self> {
        let mut parsed = Vec::with_capacity(sources.len());
        for (layer, path, text) in &sources {
            let (file, d) = file::parse(*layer, path, text);
            diags.extend(d);
            parsed.push((*layer, path.clone(), file));
        }
        if !diags.is_empty() {
            return Err(PolicyError::Invalid(diags));
        }
        let files = parsed.iter().map(|(l, p, _)| (*l, p.clone())).collect();
        Ok(Self::merge(parsed.into_iter().map(|(_, _, f)| f).collect(), files))
    }

    /// Merges parsed files, earliest first: a rule replaces an earlier one of the same id (in
    /// its place), `enabled: false` removes it; budgets field by field; `default`.
    fn merge(parsed: Vec<file::ParsedFile>, files: Vec<(Layer, PathBuf)>) -> Self {
        let mut entries: Vec<Entry> = Vec::new();
        let mut budgets = Budgets::default();
        let mut budget_origins: [Option<Origin>; 4] = Default::default();
        let mut default = None;
        for f in parsed {
            for e in f.entries {
                let existing = entries.iter().position(|x| x.rule.id == e.rule.id);
                match (existing, e.enabled) {
                    (Some(i), true) => entries[i] = e,
                    (Some(i), false) => {
                        entries.remove(i);
                    }
                    (None, true) => entries.push(e),
                    (None, false) => {}
                }
            }
            let b = f.budgets;
            budgets.max_tokens = b.max_tokens.or(budgets.max_tokens);
            budgets.max_cost_usd = b.max_cost_usd.or(budgets.max_cost_usd);
            budgets.max_time_secs = b.max_time_secs.or(budgets.max_time_secs);
            budgets.max_attempts = b.max_attempts.or(budgets.max_attempts);
            for (slot, origin) in budget_origins.iter_mut().zip(f.budget_origins) {
                if origin.is_some() {
                    *slot = origin;
                }
            }
            if f.default.is_some() {
                default = f.default;
            }
        }
        let (rules, compiled): (Vec<Rule>, Vec<Compiled>) = entries.into_iter().map(|e| (e.rule, e.compiled)).unzip();
        let index = build_index(&compiled);
        let (default, default_origin) = match default {
            Some((e, o)) => (e, Some(o)),
            None => (Effect::Allow, None),
        };
        Self { rules, compiled, budgets, budget_origins, default, default_origin, files, index }
    }

    /// The rules in force, in merge order (the global file's first; a replaced rule keeps its
    /// place). Their order never changes a decision.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The merged budgets.
    pub fn budgets(&self) -> &Budgets {
        &self.budgets
    }

    /// Where a budget's limit in force was set.
    pub fn budget_origin(&self, kind: BudgetKind) -> Option<&Origin> {
        self.budget_origins[kind as usize].as_ref()
    }

    /// The effect when no rule matches (`default`, else allow).
    pub fn default_effect(&self) -> Effect {
        self.default
    }

    /// The files that were read, in merge order.
    pub fn files(&self) -> &[(Layer, PathBuf)] {
        &self.files
    }

    /// No rules, no budgets and the default `allow`: every decision is allow.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.budgets == Budgets::default() && self.default == Effect::Allow
    }

    /// Decides an input (see the crate docs for precedence). Never panics; a condition that
    /// cannot be evaluated decides deny (fail closed).
    pub fn evaluate(&self, input: &DecisionInput) -> PolicyDecision {
        if let Some(usage) = &input.usage
            && let Some(d) = self.check_budgets(usage, input)
        {
            return d;
        }
        let best = self.match_patterns(input);
        let stage = input.stage.bit();
        let available = cond::available(input);
        // (key, rule index): the greatest key wins; equal keys (same effect) go to the smaller
        // id, so that the winner never depends on the order rules are written in.
        let mut candidates: Vec<(Specificity, usize)> = Vec::new();
        'rules: for (i, c) in self.compiled.iter().enumerate() {
            if c.stages & stage == 0 {
                continue;
            }
            if let Some(cond) = &c.condition
                && cond.needs & available != cond.needs
            {
                continue;
            }
            let mut literal = 0u32;
            for kind in Kind::ALL {
                if c.kinds & kind.bit() != 0 {
                    let b = best[i * KINDS + kind as usize];
                    if !b.matched {
                        continue 'rules;
                    }
                    literal = literal.saturating_add(b.literal);
                }
            }
            let r = &self.rules[i];
            let key = (c.kind_count(), literal, c.condition.is_some(), r.effect.severity(), r.origin.layer);
            candidates.push((key, i));
        }
        candidates.sort_by(|(ka, a), (kb, b)| kb.cmp(ka).then_with(|| self.rules[*a].id.cmp(&self.rules[*b].id)));
        // The CEL context holds only the facts some candidate's condition reads.
        let needs =
            candidates.iter().filter_map(|(_, i)| self.compiled[*i].condition.as_ref()).fold(0, |m, c| m | c.needs);
        let mut ctx = None;
        for (_, i) in candidates {
            let (rule, c) = (&self.rules[i], &self.compiled[i]);
            if let Some(cond) = &c.condition {
                let ctx = ctx.get_or_insert_with(|| cond::context(input, needs));
                match cond.eval(ctx) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(e) => return self.fail_closed(rule, cond, &e, input),
                }
            }
            return self.rule_decision(i, &best, input);
        }
        let reason = match &self.default_origin {
            Some(o) => format!("no rule matched; the default is {} (set at {o})", self.default),
            None => format!("no rule matched; the default is {}", self.default),
        };
        PolicyDecision {
            effect: self.default,
            rule_id: None,
            file: self.default_origin.as_ref().map(|o| o.file.clone()),
            line: self.default_origin.as_ref().map(|o| o.line),
            layer: self.default_origin.as_ref().map(|o| o.layer),
            reason,
            inputs: input.clone(),
        }
    }

    /// For every rule and matcher kind, the most literal pattern that matches the input.
    fn match_patterns(&self, input: &DecisionInput) -> Vec<Best> {
        let mut best = vec![Best::default(); self.rules.len() * KINDS];
        let mut hits = Vec::new();
        let mark = |best: &mut Vec<Best>, slot: Slot, o: Owner| {
            let b = &mut best[o.rule as usize * KINDS + slot.kind() as usize];
            if !b.matched || o.literal > b.literal {
                *b = Best { matched: true, slot: slot as u8, pattern: o.pattern, literal: o.literal };
            }
        };
        let run =
            |best: &mut Vec<Best>, slot: Slot, value: &str, hits: &mut Vec<usize>, filter: &dyn Fn(Owner) -> bool| {
                if let Some(ix) = &self.index[slot as usize] {
                    ix.set.matches_into(value, hits);
                    for &h in hits.iter() {
                        if let Some(&o) = ix.owners.get(h)
                            && filter(o)
                        {
                            mark(best, slot, o);
                        }
                    }
                }
            };
        let any = |_: Owner| true;
        if let Some(tool) = &input.tool {
            let group = TOOL_ALIASES.iter().find(|g| g.contains(&tool.name.as_str()));
            match group {
                Some(names) => {
                    for name in names.iter() {
                        run(&mut best, Slot::Tools, name, &mut hits, &any);
                    }
                }
                None => run(&mut best, Slot::Tools, &tool.name, &mut hits, &any),
            }
            if let Some(command) = &tool.command
                && self.index[Slot::Commands as usize].is_some()
            {
                let simple = is_simple_command(command);
                // An allow pattern matches a simple command only; a deny or require_approval
                // pattern the whole command or any part of it between shell operators.
                let whole = |o: Owner| simple || self.rules[o.rule as usize].effect != Effect::Allow;
                run(&mut best, Slot::Commands, &normalize_command(command), &mut hits, &whole);
                if !simple {
                    let not_allow = |o: Owner| self.rules[o.rule as usize].effect != Effect::Allow;
                    for part in command_parts(command) {
                        run(&mut best, Slot::Commands, &part, &mut hits, &not_allow);
                    }
                }
            }
            if let Some(path) = &tool.path {
                let slot = match tool.access {
                    Some(Access::Read) => Slot::PathsRead,
                    Some(Access::Write) | None => Slot::PathsWrite,
                };
                run(&mut best, slot, &normalize_path(path), &mut hits, &any);
            }
            if let Some(host) = tool.host.as_deref().and_then(normalize_host) {
                run(&mut best, Slot::Hosts, &host, &mut hits, &any);
            }
        }
        if let Some(task) = &input.task {
            run(&mut best, Slot::TaskTypes, &task.task_type, &mut hits, &any);
        }
        if let Some(agent) = &input.agent {
            run(&mut best, Slot::Agents, &agent.name, &mut hits, &any);
        }
        best
    }

    fn rule_decision(&self, i: usize, best: &[Best], input: &DecisionInput) -> PolicyDecision {
        let (rule, c) = (&self.rules[i], &self.compiled[i]);
        let mut reason = format!("{} by rule `{}` ({})", rule.effect.verb(), rule.id, rule.origin);
        let mut what = Vec::new();
        for kind in Kind::ALL {
            let b = best[i * KINDS + kind as usize];
            if c.kinds & kind.bit() != 0
                && let Some(slot) = Slot::ALL.get(usize::from(b.slot))
                && let Some(p) = c.slots[*slot as usize].get(b.pattern as usize)
            {
                what.push(format!("the {} matches {:?}", kind.noun(), p.text));
            }
        }
        if let Some(cond) = &c.condition {
            what.push(format!("`{}` holds", cond.source.trim()));
        }
        if !what.is_empty() {
            let _ = write!(reason, ": {}", what.join(", "));
        }
        if let Some(r) = &rule.reason {
            let _ = write!(reason, " ({r})");
        }
        PolicyDecision {
            effect: rule.effect,
            rule_id: Some(rule.id.clone()),
            file: Some(rule.origin.file.clone()),
            line: Some(rule.origin.line),
            layer: Some(rule.origin.layer),
            reason,
            inputs: input.clone(),
        }
    }

    fn fail_closed(&self, rule: &Rule, cond: &Condition, error: &str, input: &DecisionInput) -> PolicyDecision {
        PolicyDecision {
            effect: Effect::Deny,
            rule_id: Some(rule.id.clone()),
            file: Some(rule.origin.file.clone()),
            line: Some(rule.origin.line),
            layer: Some(rule.origin.layer),
            reason: format!(
                "denied (fail closed): the condition `{}` of rule `{}` ({}) could not be evaluated: {error}",
                cond.source.trim(),
                rule.id,
                rule.origin
            ),
            inputs: input.clone(),
        }
    }

    fn check_budgets(&self, usage: &UsageFacts, input: &DecisionInput) -> Option<PolicyDecision> {
        let b = &self.budgets;
        // A usage that is not a number counts as exceeded (fail closed).
        let over = |used: f64, max: f64| used.partial_cmp(&max).is_none_or(|o| o == std::cmp::Ordering::Greater);
        let exceeded = BudgetKind::ALL.into_iter().find_map(|kind| {
            let (over, max, used) = match kind {
                BudgetKind::Tokens => {
                    let max = b.max_tokens?;
                    (usage.tokens > max, max.to_string(), format!("{} used", usage.tokens))
                }
                BudgetKind::CostUsd => {
                    let max = b.max_cost_usd?;
                    (over(usage.cost_usd, max), format!("${max}"), format!("${} spent", usage.cost_usd))
                }
                BudgetKind::TimeSecs => {
                    let max = b.max_time_secs?;
                    (over(usage.elapsed_secs, max), format!("{max} s"), format!("{} s elapsed", usage.elapsed_secs))
                }
                BudgetKind::Attempts => {
                    let max = b.max_attempts?;
                    (usage.attempts > max, max.to_string(), format!("this is attempt {}", usage.attempts))
                }
            };
            over.then_some((kind, max, used))
        })?;
        let (kind, max, used) = exceeded;
        let origin = self.budget_origins[kind as usize].as_ref();
        let mut reason = format!("denied: budget `{}` of {max} exceeded ({used})", kind.name());
        if let Some(o) = origin {
            let _ = write!(reason, ", set at {o}");
        }
        Some(PolicyDecision {
            effect: Effect::Deny,
            rule_id: Some(format!("budget:{}", kind.name())),
            file: origin.map(|o| o.file.clone()),
            line: origin.map(|o| o.line),
            layer: origin.map(|o| o.layer),
            reason,
            inputs: input.clone(),
        })
    }

    /// Pairs of rules of equal specificity that could match the same input with opposite
    /// effects (allow against deny or require_approval), each reported at the later rule and
    /// naming both. Conservative: patterns are assumed to overlap unless they visibly cannot,
    /// and two `when` conditions are assumed to be able to hold together.
    pub fn conflicts(&self) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        for (i, (ra, ca)) in self.rules.iter().zip(&self.compiled).enumerate() {
            for (rb, cb) in self.rules.iter().zip(&self.compiled).skip(i + 1) {
                if (ra.effect == Effect::Allow) == (rb.effect == Effect::Allow) || !may_tie(ca, cb) {
                    continue;
                }
                let (allow, other) = if ra.effect == Effect::Allow { (ra, rb) } else { (rb, ra) };
                let verb = if other.effect == Effect::Deny { "denies" } else { "requires approval for" };
                out.push(Diagnostic {
                    file: rb.origin.file.clone(),
                    line: rb.origin.line,
                    column: rb.origin.column,
                    kind: DiagnosticKind::Conflict,
                    message: format!(
                        "rule `{}` ({}) allows and rule `{}` ({}) {verb} inputs that both can match, with equal \
                         specificity; {} wins the tie: make one rule more specific, or remove one",
                        allow.id, allow.origin, other.id, other.origin, other.effect
                    ),
                });
            }
        }
        out
    }
}

/// Whether two rules can match one input with equal specificity.
fn may_tie(a: &Compiled, b: &Compiled) -> bool {
    if a.stages & b.stages == 0 || a.kind_count() != b.kind_count() || a.condition.is_some() != b.condition.is_some() {
        return false;
    }
    // The possible differences of literal characters (a minus b) over the kinds seen so far.
    let mut sums: BTreeSet<i64> = BTreeSet::from([0]);
    for kind in Kind::ALL {
        let (has_a, has_b) = (a.kinds & kind.bit() != 0, b.kinds & kind.bit() != 0);
        let options: BTreeSet<i64> = match (has_a, has_b) {
            (false, false) => continue,
            (true, false) => a.patterns(kind).map(|(_, p)| i64::from(p.literal)).collect(),
            (false, true) => b.patterns(kind).map(|(_, p)| -i64::from(p.literal)).collect(),
            (true, true) => a
                .patterns(kind)
                .flat_map(|(sa, pa)| {
                    b.patterns(kind)
                        .filter(move |(sb, pb)| *sb == sa && pa.may_overlap(pb))
                        .map(move |(_, pb)| i64::from(pa.literal) - i64::from(pb.literal))
                })
                .collect(),
        };
        if options.is_empty() {
            return false;
        }
        sums = sums.iter().flat_map(|s| options.iter().map(move |o| s + o)).collect();
    }
    sums.contains(&0)
}

fn build_index(compiled: &[Compiled]) -> [Option<SlotIndex>; SLOTS] {
    Slot::ALL.map(|slot| {
        let mut builder = GlobSetBuilder::new();
        let mut owners = Vec::new();
        for (r, c) in compiled.iter().enumerate() {
            for (p, pattern) in c.slots[slot as usize].iter().enumerate() {
                for g in &pattern.globs {
                    builder.add(g.clone());
                    owners.push(Owner {
                        rule: u32::try_from(r).unwrap_or(u32::MAX),
                        pattern: u32::try_from(p).unwrap_or(u32::MAX),
                        literal: pattern.literal,
                    });
                }
            }
        }
        if owners.is_empty() {
            return None;
        }
        // Every glob was built alone already; a set of valid globs builds.
        builder.build().ok().map(|set| SlotIndex { set, owners })
    })
}

fn unreadable(path: &Path, e: &io::Error) -> Diagnostic {
    let message = if e.kind() == io::ErrorKind::NotFound {
        "cannot read the policy file: no such file".to_owned()
    } else {
        format!("cannot read the policy file: {e}")
    };
    Diagnostic::error(path, 0, 0, message)
}

/// `<project_root>/.ai/policies/<agent>.yaml`, for an agent name that can name a file.
pub fn agent_policy_path(project_root: &Path, agent: &str) -> Result<PathBuf> {
    if agent.is_empty() || agent == "." || agent.contains(['/', '\\', '\0']) || agent.contains("..") {
        return Err(PolicyError::BadAgentName(agent.to_owned()));
    }
    Ok(project_root.join(AGENT_POLICIES).join(format!("{agent}.yaml")))
}

/// Checks one policy file alone: every error, then (when it has none) its conflicts. A
/// missing or unreadable file is one diagnostic.
pub fn validate_file(path: &Path) -> Vec<Diagnostic> {
    match std::fs::read_to_string(path) {
        Ok(text) => validate_str(path, &text),
        Err(e) => vec![unreadable(path, &e)],
    }
}

/// [`validate_file`] on a text (named `path` in diagnostics).
pub fn validate_str(path: &Path, text: &str) -> Vec<Diagnostic> {
    match PolicySet::from_sources(&[(Layer::Project, path.to_owned(), text.to_owned())]) {
        Ok(set) => set.conflicts(),
        Err(e) => e.diagnostics().to_vec(),
    }
}
