//! One policy file: its rules, budgets and default, parsed and checked with every problem
//! located.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde_saphyr::Spanned;

use crate::cond::Condition;
use crate::error::Diagnostic;
use crate::facts::{Effect, Layer, Stage};
use crate::pattern::{Kind, Pattern};
use crate::yaml::{Doc, Node, pos};

/// The policy file format version this crate reads.
pub const VERSION: i128 = 1;

/// Where something was written: a policy file, its layer, and the line.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Origin {
    pub layer: Layer,
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// One rule as written (after merging: as it is in force), with where it comes from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    pub id: String,
    pub effect: Effect,
    /// The stages written in `on` (empty: not written; see [`Rule::stages`]).
    #[serde(rename = "on", skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<Stage>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    /// `paths.read` (and the entries of a plain `paths` list).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths_read: Vec<String>,
    /// `paths.write` (and the entries of a plain `paths` list).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths_write: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub task_types: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub origin: Origin,
}

impl Rule {
    /// The stages the rule applies at: those of `on`; without `on`, `tool` for a rule with a
    /// tool-level matcher (`tools`, `commands`, `paths`, `hosts`), every stage otherwise.
    pub fn stages(&self) -> Vec<Stage> {
        Stage::ALL.into_iter().filter(|s| stage_mask(&self.on, self.has_tool_matcher()) & s.bit() != 0).collect()
    }

    /// The number of matcher kinds the rule sets (`paths` counts once): the first measure of
    /// its specificity.
    pub fn matcher_kinds(&self) -> usize {
        let paths = !(self.paths_read.is_empty() && self.paths_write.is_empty());
        [&self.tools, &self.commands, &self.hosts, &self.task_types, &self.agents]
            .iter()
            .filter(|v| !v.is_empty())
            .count()
            + usize::from(paths)
    }

    fn has_tool_matcher(&self) -> bool {
        !(self.tools.is_empty()
            && self.commands.is_empty()
            && self.paths_read.is_empty()
            && self.paths_write.is_empty()
            && self.hosts.is_empty())
    }
}

fn stage_mask(on: &[Stage], tool_level: bool) -> u8 {
    match (on.is_empty(), tool_level) {
        (false, _) => on.iter().fold(0, |m, s| m | s.bit()),
        (true, true) => Stage::Tool.bit(),
        (true, false) => Stage::ALL.iter().fold(0, |m, s| m | s.bit()),
    }
}

/// The pattern lists of a rule, by what they are matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Tools = 0,
    Commands = 1,
    PathsRead = 2,
    PathsWrite = 3,
    Hosts = 4,
    TaskTypes = 5,
    Agents = 6,
}

pub(crate) const SLOTS: usize = 7;

impl Slot {
    pub(crate) const ALL: [Slot; SLOTS] =
        [Slot::Tools, Slot::Commands, Slot::PathsRead, Slot::PathsWrite, Slot::Hosts, Slot::TaskTypes, Slot::Agents];

    pub(crate) fn kind(self) -> Kind {
        match self {
            Slot::Tools => Kind::Tools,
            Slot::Commands => Kind::Commands,
            Slot::PathsRead | Slot::PathsWrite => Kind::Paths,
            Slot::Hosts => Kind::Hosts,
            Slot::TaskTypes => Kind::TaskTypes,
            Slot::Agents => Kind::Agents,
        }
    }
}

/// A rule's compiled matchers and condition.
#[derive(Debug, Clone)]
pub(crate) struct Compiled {
    pub(crate) slots: [Vec<Pattern>; SLOTS],
    /// The matcher kinds set (`Kind::bit`).
    pub(crate) kinds: u8,
    /// The stages it applies at (`Stage::bit`).
    pub(crate) stages: u8,
    pub(crate) condition: Option<Arc<Condition>>,
}

impl Compiled {
    pub(crate) fn kind_count(&self) -> u32 {
        self.kinds.count_ones()
    }

    /// The patterns of a kind (for `paths`, the read and the write lists).
    pub(crate) fn patterns(&self, kind: Kind) -> impl Iterator<Item = (Slot, &Pattern)> {
        Slot::ALL
            .into_iter()
            .filter(move |s| s.kind() == kind)
            .flat_map(|s| self.slots[s as usize].iter().map(move |p| (s, p)))
    }
}

/// A rule with its compiled form; `enabled: false` removes an earlier layer's rule of that id.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) rule: Rule,
    pub(crate) compiled: Compiled,
    pub(crate) enabled: bool,
}

/// Limits on what a task or run may use; exceeding one is a deny naming it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Budgets {
    /// Tokens (input plus output).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Money, in US dollars.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
    /// Wall-clock time, in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_time_secs: Option<f64>,
    /// Attempts at a task (the attempt numbered `max_attempts + 1` is denied).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

/// One budget field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BudgetKind {
    Tokens = 0,
    CostUsd = 1,
    TimeSecs = 2,
    Attempts = 3,
}

impl BudgetKind {
    pub const ALL: [BudgetKind; 4] =
        [BudgetKind::Tokens, BudgetKind::CostUsd, BudgetKind::TimeSecs, BudgetKind::Attempts];

    /// The field's name in `budgets`: `max_tokens`, `max_cost_usd`, `max_time_secs`,
    /// `max_attempts`.
    pub fn name(self) -> &'static str {
        match self {
            BudgetKind::Tokens => "max_tokens",
            BudgetKind::CostUsd => "max_cost_usd",
            BudgetKind::TimeSecs => "max_time_secs",
            BudgetKind::Attempts => "max_attempts",
        }
    }
}

/// A parsed policy file.
#[derive(Debug, Clone)]
pub(crate) struct ParsedFile {
    pub(crate) default: Option<(Effect, Origin)>,
    pub(crate) budgets: Budgets,
    pub(crate) budget_origins: [Option<Origin>; 4],
    pub(crate) entries: Vec<Entry>,
}

const TOP_FIELDS: &[&str] = &["version", "default", "rules", "budgets"];
const RULE_FIELDS: &[&str] =
    &["id", "effect", "on", "tools", "commands", "paths", "hosts", "task_types", "agents", "when", "reason", "enabled"];
const PATH_FIELDS: &[&str] = &["read", "write"];
const BUDGET_FIELDS: &[&str] = &["max_tokens", "max_cost_usd", "max_time_secs", "max_attempts"];

/// Parses and checks one policy file's text. Returns what could be understood and every
/// problem found (the file is usable only when there is none).
pub(crate) fn parse(layer: Layer, file: &Path, src: &str) -> (ParsedFile, Vec<Diagnostic>) {
    let mut doc = Doc::new(file, src);
    let mut out = ParsedFile {
        default: None,
        budgets: Budgets::default(),
        budget_origins: Default::default(),
        entries: Vec::new(),
    };
    let origin = |(line, column): (usize, usize)| Origin { layer, file: file.to_owned(), line, column };
    let Some(root) = doc.parse() else { return (out, doc.diags) };
    if matches!(root.value, Node::Null) {
        return (out, doc.diags);
    }
    let Some(fields) = doc.fields(&root, "the policy", TOP_FIELDS) else { return (out, doc.diags) };
    for (name, key, value) in fields {
        match name {
            "version" => match &value.value {
                Node::Int(VERSION) => {}
                Node::Int(n) => doc.error(
                    value,
                    format!("unsupported policy version {n}; this version of Descartes reads version {VERSION}"),
                ),
                other => {
                    let found = other.describe();
                    doc.error(value, format!("`version` must be an integer ({VERSION}), found {found}"))
                }
            },
            "default" => {
                if let Some(effect) = effect(&mut doc, value, "`default`") {
                    out.default = Some((effect, origin(pos(key))));
                }
            }
            "rules" => match &value.value {
                Node::Null => {}
                Node::Seq(items) => {
                    let mut seen: Vec<(String, usize)> = Vec::new();
                    for item in items {
                        if let Some(entry) = rule(&mut doc, layer, item) {
                            if let Some((_, line)) = seen.iter().find(|(id, _)| *id == entry.rule.id) {
                                let msg =
                                    format!("rule id `{}` is already used at line {line} of this file", entry.rule.id);
                                doc.error(item, msg);
                                continue;
                            }
                            seen.push((entry.rule.id.clone(), entry.rule.origin.line));
                            out.entries.push(entry);
                        }
                    }
                }
                other => {
                    let found = other.describe();
                    doc.error(value, format!("`rules` must be a list of rules, found {found}"))
                }
            },
            "budgets" => budgets(&mut doc, value, &mut out, &origin),
            _ => {}
        }
    }
    (out, doc.diags)
}

fn effect(doc: &mut Doc<'_>, n: &Spanned<Node>, what: &str) -> Option<Effect> {
    let s = doc.string(n, what)?;
    let e = Effect::parse(&s);
    if e.is_none() {
        let hint = if s == "ask" || s == "approve" { " (`require_approval` asks a human)" } else { "" };
        doc.error(n, format!("{what} must be allow, deny or require_approval, found `{s}`{hint}"));
    }
    e
}

fn budgets(doc: &mut Doc<'_>, n: &Spanned<Node>, out: &mut ParsedFile, origin: &dyn Fn((usize, usize)) -> Origin) {
    if matches!(n.value, Node::Null) {
        return;
    }
    let Some(fields) = doc.fields(n, "`budgets`", BUDGET_FIELDS) else { return };
    for (name, key, value) in fields {
        let number = match &value.value {
            Node::Int(i) => Some(*i as f64),
            Node::Float(f) => Some(*f),
            _ => None,
        };
        let integer = match &value.value {
            Node::Int(i) => Some(*i),
            _ => None,
        };
        let kind = match name {
            "max_tokens" => match integer.and_then(|i| u64::try_from(i).ok()) {
                Some(v) => {
                    out.budgets.max_tokens = Some(v);
                    BudgetKind::Tokens
                }
                None => {
                    doc.error(
                        value,
                        format!(
                            "`max_tokens` must be a whole number of tokens, at least 0, found {}",
                            show(&value.value)
                        ),
                    );
                    continue;
                }
            },
            "max_attempts" => match integer.and_then(|i| u32::try_from(i).ok()).filter(|v| *v >= 1) {
                Some(v) => {
                    out.budgets.max_attempts = Some(v);
                    BudgetKind::Attempts
                }
                None => {
                    doc.error(
                        value,
                        format!("`max_attempts` must be a whole number, at least 1, found {}", show(&value.value)),
                    );
                    continue;
                }
            },
            _ => match number.filter(|v| v.is_finite() && *v >= 0.0) {
                Some(v) if name == "max_cost_usd" => {
                    out.budgets.max_cost_usd = Some(v);
                    BudgetKind::CostUsd
                }
                Some(v) => {
                    out.budgets.max_time_secs = Some(v);
                    BudgetKind::TimeSecs
                }
                None => {
                    doc.error(value, format!("`{name}` must be a number, at least 0, found {}", show(&value.value)));
                    continue;
                }
            },
        };
        out.budget_origins[kind as usize] = Some(origin(pos(key)));
    }
}

fn show(n: &Node) -> String {
    match n {
        Node::Int(i) => i.to_string(),
        Node::Float(f) => f.to_string(),
        Node::Str(s) => format!("{s:?}"),
        other => other.describe().to_owned(),
    }
}

/// One rule; `None` (with diagnostics) when it cannot be used.
fn rule(doc: &mut Doc<'_>, layer: Layer, n: &Spanned<Node>) -> Option<Entry> {
    let errors_before = doc.diags.len();
    let (line, column) = pos(n);
    let fields = doc.fields(n, "a rule", RULE_FIELDS)?;
    let mut id = None;
    let mut effect_ = None;
    let mut effect_written = false;
    let mut enabled = true;
    let mut on: Vec<Stage> = Vec::new();
    let mut on_node = None;
    let mut when = None;
    let mut reason = None;
    let mut lists: [Vec<String>; SLOTS] = Default::default();
    let mut slots: [Vec<Pattern>; SLOTS] = Default::default();
    let mut kinds = 0u8;
    for (name, _key, value) in fields {
        match name {
            "id" => {
                if let Some(s) = doc.string(value, "`id`") {
                    if s.trim().is_empty() || s.chars().any(char::is_whitespace) {
                        doc.error(value, format!("`id` must be a non-empty name without spaces, found {s:?}"));
                    } else {
                        id = Some(s);
                    }
                }
            }
            "effect" => {
                effect_written = true;
                effect_ = effect(doc, value, "`effect`");
            }
            "enabled" => match value.value {
                Node::Bool(b) => enabled = b,
                ref other => {
                    let found = other.describe();
                    doc.error(value, format!("`enabled` must be true or false, found {found}"))
                }
            },
            "on" => {
                on_node = Some(value);
                for (s, node) in doc.strings(value, "`on`") {
                    match Stage::parse(&s) {
                        Some(stage) if !on.contains(&stage) => on.push(stage),
                        Some(_) => {}
                        None => doc.error(node, format!("`on` takes claim, tool or merge, found `{s}`")),
                    }
                }
            }
            "when" => {
                if let Some(src) = doc.string(value, "`when`") {
                    when = Some((src, value));
                }
            }
            "reason" => reason = doc.string(value, "`reason`"),
            "paths" => {
                let mut any = false;
                match &value.value {
                    Node::Map(_) => {
                        let Some(sub) = doc.fields(value, "`paths`", PATH_FIELDS) else { continue };
                        for (sub_name, _k, v) in sub {
                            let slot = if sub_name == "read" { Slot::PathsRead } else { Slot::PathsWrite };
                            if matches!(&v.value, Node::Seq(items) if items.is_empty()) {
                                continue;
                            }
                            let field = format!("`paths.{sub_name}`");
                            for (s, node) in doc.strings(v, &field) {
                                any |= add_pattern(doc, slot, &field, s, node, &mut lists, &mut slots);
                            }
                        }
                    }
                    _ => {
                        if matches!(&value.value, Node::Seq(items) if items.is_empty()) {
                            doc.error(value, "`paths` is empty: remove it to match every path, or list globs");
                            continue;
                        }
                        for (s, node) in doc.strings(value, "`paths`") {
                            any |=
                                add_pattern(doc, Slot::PathsRead, "`paths`", s.clone(), node, &mut lists, &mut slots);
                            any |= add_pattern(doc, Slot::PathsWrite, "`paths`", s, node, &mut lists, &mut slots);
                        }
                    }
                }
                if any {
                    kinds |= Kind::Paths.bit();
                } else if doc.diags.len() == errors_before {
                    doc.error(value, "`paths` lists no glob: give `read` or `write` globs, or remove it");
                }
            }
            _ => {
                let slot = match name {
                    "tools" => Slot::Tools,
                    "commands" => Slot::Commands,
                    "hosts" => Slot::Hosts,
                    "task_types" => Slot::TaskTypes,
                    _ => Slot::Agents,
                };
                if matches!(&value.value, Node::Seq(items) if items.is_empty()) {
                    let noun = slot.kind().noun();
                    doc.error(value, format!("`{name}` is empty: remove it to match every {noun}, or list globs"));
                    continue;
                }
                let field = format!("`{name}`");
                for (s, node) in doc.strings(value, &field) {
                    if add_pattern(doc, slot, &field, s, node, &mut lists, &mut slots) {
                        kinds |= slot.kind().bit();
                    }
                }
            }
        }
    }

    let tool_level = Kind::ALL.iter().any(|k| k.is_tool_level() && kinds & k.bit() != 0);
    if let Some(node) = on_node
        && tool_level
        && on.iter().any(|s| *s != Stage::Tool)
    {
        doc.error(
            node,
            "`tools`, `commands`, `paths` and `hosts` are facts of a tool call: such a rule applies only `on: tool`",
        );
    }
    let condition = when.and_then(|(src, node)| match Condition::compile(&src) {
        Ok(c) => Some(Arc::new(c)),
        Err(errors) => {
            let (vl, vc) = pos(node);
            let quote = usize::from(matches!(doc.first_char(node), Some('\'' | '"')));
            for (el, ec, msg) in errors {
                let (l, c) = if el <= 1 { (vl, vc + quote + ec - 1) } else { (vl + el - 1, vc + ec - 1) };
                doc.error_at(l, c, format!("bad CEL in `when`: {msg}"));
            }
            None
        }
    });
    if id.is_none() && !doc.diags.iter().skip(errors_before).any(|d| d.message.contains("`id`")) {
        doc.error_at(line, column, "a rule needs an `id`");
    }
    if effect_.is_none() && enabled && !effect_written {
        let name = id.as_deref().map(|i| format!("rule `{i}`")).unwrap_or_else(|| "a rule".to_owned());
        doc.error_at(line, column, format!("{name} needs an `effect`: allow, deny or require_approval"));
    }
    let (Some(id), Some(effect_)) = (id, effect_.or((!enabled).then_some(Effect::Allow))) else { return None };
    if doc.diags.len() != errors_before {
        return None;
    }
    let [tools, commands, paths_read, paths_write, hosts, task_types, agents] = lists;
    let rule = Rule {
        id,
        effect: effect_,
        on,
        tools,
        commands,
        paths_read,
        paths_write,
        hosts,
        task_types,
        agents,
        when: condition.as_ref().map(|c| c.source.clone()),
        reason,
        origin: Origin { layer, file: doc.file.to_owned(), line, column },
    };
    let stages = stage_mask(&rule.on, tool_level);
    Some(Entry { rule, compiled: Compiled { slots, kinds, stages, condition }, enabled })
}

/// Compiles a pattern into its slot; `false` (reported) when it is not a valid glob.
fn add_pattern(
    doc: &mut Doc<'_>,
    slot: Slot,
    field: &str,
    text: String,
    node: &Spanned<Node>,
    lists: &mut [Vec<String>; SLOTS],
    slots: &mut [Vec<Pattern>; SLOTS],
) -> bool {
    match Pattern::new(slot.kind(), &text) {
        Ok(p) => {
            slots[slot as usize].push(p);
            lists[slot as usize].push(text);
            true
        }
        Err(e) => {
            doc.error(node, format!("bad glob {text:?} in {field}: {e}"));
            false
        }
    }
}
