//! The permission policy: allow / deny / ask rules from config, matched against a tool call.
//!
//! A rule is written `TOOL` or `TOOL(PATTERN)` in the `allow`, `deny` or `ask` list of a
//! `[permissions]` section (user and project config; the project's rules are added to the
//! user's):
//! - `TOOL` is a tool name or a glob over tool names (`shell`, `mcp__github__*`, `*`);
//!   `mcp__<server>` alone means every tool of that MCP server (`mcp__<server>__*`).
//! - `PATTERN` matches the call's argument: for `shell` its `command` (a pattern without
//!   wildcards is a command prefix on a word boundary, `git status` matches `git status -s`;
//!   with wildcards it is a glob over the whole command, `echo *`, where `*` also crosses `/`);
//!   for the file tools (`read_file`, `write_file`, `edit_file`, `list_files`, `search_files`)
//!   their `path` (a glob; `*` stays within a path component, `**` crosses them; an absolute
//!   pattern matches the absolute path, a relative one the path relative to the working
//!   directory; a pattern without wildcards also matches everything under it); for
//!   `http_request` the host of its `url` (a glob, case-insensitive: `*.github.com`).
//!
//! Shell commands: an `allow` pattern only matches a simple command (no `;`, `&`, `|`, `<`,
//! `>`, backquote, `$(` or newline), so `echo *` never lets `echo hi; rm -rf x` through. A
//! `deny` or `ask` pattern matches the whole command or any part of it between those
//! operators (best effort: the sandbox, not a pattern, is what confines a command).
//!
//! **Precedence: the most specific matching rule wins.** Rules are ordered by, in turn:
//! 1. a rule with an argument pattern (command, path, host) before a tool-only rule;
//! 2. the argument pattern with more literal characters (characters outside `*`, `?`,
//!    `[...]`, `{...}`) first, then an exact pattern (no wildcard) before a glob;
//! 3. the tool pattern with more literal characters first, then an exact tool name before a
//!    glob;
//! 4. on equal specificity, `deny` before `ask` before `allow`;
//! 5. then project rules before user rules, then by the rule's text (only to make the order
//!    total: the winner never depends on the order rules are written in).
//!
//! The first rule in that order that matches decides (`descartes permissions` lists them in
//! it). When none matches, the built-in defaults apply: read-only tools are allowed
//! (`builtin:read-only`), every other call asks (`builtin:ask`). An ask is answered by an
//! earlier "allow for this run" of the same tool, by `-y` (`flag:--yes`), or by a human; a
//! `deny` is never overridden by `-y`.

use std::cmp::Ordering;
use std::fmt;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobBuilder, GlobMatcher};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::glob::{
    command_parts, has_wildcard, is_simple_command, literal_len, normalize_command, normalize_host, normalize_path,
};

/// What a rule does to a matching call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Ask,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Ask => "ask",
            Action::Deny => "deny",
        }
    }
    /// deny > ask > allow.
    fn severity(self) -> u8 {
        match self {
            Action::Allow => 0,
            Action::Ask => 1,
            Action::Deny => 2,
        }
    }
}

/// Which argument of a call a pattern is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    Command,
    Path,
    Host,
}

/// The argument kind a tool's patterns match, if it takes patterns.
pub fn arg_kind(tool: &str) -> Option<ArgKind> {
    arg_field(tool).map(|(kind, _)| kind)
}

/// The argument kind a tool's patterns match and the input field it is read from: Descartes'
/// own tools, and the tools of the coding-agent CLIs whose permission requests Descartes
/// answers (Claude Code's `Bash`, `Read`, `Write`, `Edit`, `MultiEdit`, `NotebookEdit`, `Glob`,
/// `Grep`, `LS`, `WebFetch`), so `Bash(git status)` or `Write(src/**)` work like
/// `shell(git status)` and `write_file(src/**)`.
pub fn arg_field(tool: &str) -> Option<(ArgKind, &'static str)> {
    match tool {
        "shell" | "Bash" => Some((ArgKind::Command, "command")),
        "read_file" | "write_file" | "edit_file" | "list_files" | "search_files" | "Glob" | "Grep" | "LS" => {
            Some((ArgKind::Path, "path"))
        }
        "Read" | "Write" | "Edit" | "MultiEdit" => Some((ArgKind::Path, "file_path")),
        // Codex's patches: each of their `paths` is decided (see `permission::decide_gated`).
        "apply_patch" => Some((ArgKind::Path, "path")),
        "NotebookEdit" => Some((ArgKind::Path, "notebook_path")),
        "http_request" | "WebFetch" => Some((ArgKind::Host, "url")),
        _ => None,
    }
}

/// A rule as written in config: `TOOL` or `TOOL(PATTERN)`, checked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RuleSpec {
    pub tool: String,
    pub pattern: Option<String>,
}

/// A rule that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permission rule `{rule}`: {message}")]
pub struct RuleError {
    pub rule: String,
    pub message: String,
}

impl RuleSpec {
    pub fn parse(text: &str) -> Result<Self, RuleError> {
        let err = |message: &str| RuleError { rule: text.to_owned(), message: message.to_owned() };
        let text = text.trim();
        let (tool, pattern) = match text.find('(') {
            Some(open) => {
                let Some(inner) = text[open + 1..].strip_suffix(')') else {
                    return Err(err("expected `TOOL(PATTERN)` with a closing `)`"));
                };
                let pattern = inner.trim();
                if pattern.is_empty() {
                    return Err(err("the pattern in `(...)` is empty; write just the tool to match every call"));
                }
                (text[..open].trim(), Some(pattern.to_owned()))
            }
            None => (text, None),
        };
        if tool.is_empty() {
            return Err(err("the tool name is empty (write `shell`, `mcp__github__*`, `*`, ...)"));
        }
        if tool.chars().any(char::is_whitespace) {
            return Err(err("a tool name has no spaces; a pattern goes in parentheses: `shell(git status)`"));
        }
        Glob::new(tool).map_err(|e| err(&format!("bad tool glob: {e}")))?;
        if let Some(p) = &pattern {
            if !has_wildcard(tool) && arg_kind(tool).is_none() {
                return Err(err(&format!(
                    "`{tool}` takes no pattern: patterns apply to `shell` (command), the file tools (path), \
                     `http_request` (host) and Claude Code's `Bash`, `Read`, `Write`, `Edit`, `Glob`, `Grep`, \
                     `WebFetch`"
                )));
            }
            Glob::new(p).map_err(|e| err(&format!("bad pattern: {e}")))?;
        }
        Ok(Self { tool: tool.to_owned(), pattern })
    }
}

impl TryFrom<String> for RuleSpec {
    type Error = RuleError;
    fn try_from(s: String) -> Result<Self, RuleError> {
        Self::parse(&s)
    }
}

impl From<RuleSpec> for String {
    fn from(r: RuleSpec) -> String {
        r.to_string()
    }
}

impl fmt::Display for RuleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pattern {
            Some(p) => write!(f, "{}({p})", self.tool),
            None => f.write_str(&self.tool),
        }
    }
}

/// The rules of one config file's `[permissions]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PermissionRules {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<RuleSpec>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ask: Vec<RuleSpec>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<RuleSpec>,
}

impl PermissionRules {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.ask.is_empty() && self.deny.is_empty()
    }
    /// Adds `other`'s rules to these.
    pub fn extend(&mut self, other: &PermissionRules) {
        self.allow.extend(other.allow.iter().cloned());
        self.ask.extend(other.ask.iter().cloned());
        self.deny.extend(other.deny.iter().cloned());
    }
}

/// Where a rule came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    User,
    Project,
    /// Built in: Descartes' own files (state, config, policy, git control files) are never
    /// written by a tool. These rules come before every configured rule, whatever its
    /// specificity, and `-y` does not answer their denials.
    Guardrail,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::User => "user",
            Source::Project => "project",
            Source::Guardrail => "guardrail",
        }
    }
}

/// A compiled pattern.
#[derive(Debug, Clone)]
struct Pattern {
    text: String,
    /// Characters outside wildcards.
    literal: usize,
    exact: bool,
}

impl Pattern {
    fn new(text: &str) -> Self {
        Self { text: text.to_owned(), literal: literal_len(text), exact: !has_wildcard(text) }
    }
}

/// One rule, compiled.
#[derive(Debug, Clone)]
pub struct Rule {
    pub action: Action,
    pub source: Source,
    pub spec: RuleSpec,
    tool: Pattern,
    tool_glob: GlobMatcher,
    arg: Option<Pattern>,
    /// The argument glob: with `*` crossing `/` (commands), with `*` within a path component
    /// (paths), case-insensitive (hosts).
    arg_free: Option<GlobMatcher>,
    arg_path: Option<GlobMatcher>,
    arg_host: Option<GlobMatcher>,
    /// Where the rule is written: its config file and line (when known).
    pub origin: Option<(PathBuf, Option<usize>)>,
}

impl Rule {
    pub fn new(action: Action, source: Source, spec: RuleSpec) -> Result<Self, RuleError> {
        let err = |e: globset::Error| RuleError { rule: spec.to_string(), message: e.to_string() };
        let tool_text = match spec.tool.strip_prefix("mcp__") {
            // `mcp__github`: every tool of the server.
            Some(server) if !server.is_empty() && !server.contains("__") && !has_wildcard(server) => {
                format!("{}__*", spec.tool)
            }
            _ => spec.tool.clone(),
        };
        let tool_glob = GlobBuilder::new(&tool_text).build().map_err(err)?.compile_matcher();
        let (arg, arg_free, arg_path, arg_host) = match &spec.pattern {
            Some(p) => {
                let glob = |separator: bool, nocase: bool| {
                    // A command pattern is matched against the command with whitespace runs
                    // made single spaces: so is the pattern.
                    let text = if separator || nocase { p.clone() } else { normalize_command(p) };
                    GlobBuilder::new(&text)
                        .literal_separator(separator)
                        .case_insensitive(nocase)
                        .build()
                        .map(|g| g.compile_matcher())
                        .map_err(err)
                };
                (Some(Pattern::new(p)), Some(glob(false, false)?), Some(glob(true, false)?), Some(glob(false, true)?))
            }
            None => (None, None, None, None),
        };
        let tool = Pattern::new(&spec.tool);
        Ok(Self { action, source, tool, tool_glob, arg, arg_free, arg_path, arg_host, spec, origin: None })
    }

    /// The rule, written at `line` of `file`.
    pub fn at(mut self, file: PathBuf, line: Option<usize>) -> Self {
        self.origin = Some((file, line));
        self
    }

    /// The rule's name in events, e.g. `project:allow shell "echo *"`.
    pub fn name(&self) -> String {
        let mut name = format!("{}:{} {}", self.source.as_str(), self.action.as_str(), self.spec.tool);
        if let Some(p) = &self.spec.pattern {
            name.push_str(&format!(" {p:?}"));
        }
        name
    }

    /// The verdict of this rule on a call of `tool` it matches.
    fn verdict(&self, tool: &str) -> Verdict {
        let what = match (&self.spec.pattern, arg_kind(tool)) {
            (Some(p), Some(ArgKind::Command)) => format!("the command matches {p:?}"),
            (Some(p), Some(ArgKind::Path)) => format!("the path matches {p:?}"),
            (Some(p), Some(ArgKind::Host)) => format!("the host matches {p:?}"),
            _ => format!("the tool matches `{}`", self.spec.tool),
        };
        let verb = match self.action {
            Action::Allow => "allowed",
            Action::Ask => "needs approval",
            Action::Deny => "denied",
        };
        Verdict {
            action: self.action,
            rule: self.name(),
            reason: format!("{verb} by the {} rule `{}`: {what}", self.source.as_str(), self.spec),
            file: self.origin.as_ref().map(|(f, _)| f.display().to_string()),
            line: self.origin.as_ref().and_then(|(_, l)| *l).map(|l| l as u64),
        }
    }

    /// Orders rules by precedence: the first of two is the one that wins (guardrail rules
    /// before all others, then the more specific).
    pub fn precedence(&self, other: &Rule) -> Ordering {
        let key = |r: &Rule| {
            (
                r.source == Source::Guardrail,
                r.arg.is_some(),
                r.arg.as_ref().map_or(0, |a| a.literal),
                r.arg.as_ref().is_some_and(|a| a.exact),
                r.tool.literal,
                r.tool.exact,
                r.action.severity(),
                r.source == Source::Project,
            )
        };
        key(other).cmp(&key(self)).then_with(|| self.spec.cmp(&other.spec))
    }

    /// Whether the rule matches a call of `tool` with `input` (relative paths against `cwd`).
    pub fn matches(&self, tool: &str, input: &Value, cwd: &Path) -> bool {
        if !self.tool_glob.is_match(tool) {
            return false;
        }
        let (Some(arg), Some(free), Some(path_glob), Some(host_glob)) =
            (&self.arg, &self.arg_free, &self.arg_path, &self.arg_host)
        else {
            return true;
        };
        let field = |k: &str| input.get(k).and_then(Value::as_str);
        let Some((kind, name)) = arg_field(tool) else { return false };
        match kind {
            ArgKind::Command => {
                let Some(command) = field(name) else { return false };
                let matches_one = |c: &str| command_matches(arg, free, c);
                let whole = normalize_command(command);
                if self.action == Action::Allow {
                    is_simple_command(command) && matches_one(&whole)
                } else {
                    matches_one(&whole) || command_parts(command).any(|p| matches_one(&p))
                }
            }
            ArgKind::Path => {
                let raw = field(name).unwrap_or(".");
                let abs = normalize(&cwd.join(raw));
                let target = if Path::new(&arg.text).is_absolute() {
                    abs
                } else {
                    match abs.strip_prefix(normalize(cwd)) {
                        Ok(rel) if rel.as_os_str().is_empty() => PathBuf::from("."),
                        Ok(rel) => rel.to_owned(),
                        Err(_) => return false,
                    }
                };
                if arg.exact {
                    let trimmed = arg.text.trim_end_matches('/');
                    let base = normalize(Path::new(if trimmed.is_empty() { "/" } else { trimmed }));
                    // `.` is the working directory: every relative target is under it.
                    base == Path::new(".") || target == base || target.starts_with(&base)
                } else {
                    path_glob.is_match(&target)
                }
            }
            ArgKind::Host => {
                let Some(host) = field(name).and_then(normalize_host) else { return false };
                if arg.exact { host.eq_ignore_ascii_case(&arg.text) } else { host_glob.is_match(&host) }
            }
        }
    }
}

fn command_matches(arg: &Pattern, glob: &GlobMatcher, command: &str) -> bool {
    if arg.exact {
        let text = normalize_command(&arg.text);
        command == text || command.strip_prefix(text.as_str()).is_some_and(|rest| rest.starts_with(' '))
    } else {
        glob.is_match(command)
    }
}

/// A path with `.` and `..` resolved lexically.
fn normalize(path: &Path) -> PathBuf {
    PathBuf::from(normalize_path(&path.to_string_lossy()))
}

/// The outcome of the policy for one call, before any ask is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    /// The rule's name, e.g. `user:deny write_file "/etc/**"` or `builtin:read-only`.
    pub rule: String,
    /// Why, in words.
    pub reason: String,
    /// Where the deciding rule is written (none for built-in rules).
    pub file: Option<String>,
    pub line: Option<u64>,
}

/// The name of the built-in rule that asks about every call no configured rule matches.
pub const BUILTIN_ASK: &str = "builtin:ask";
/// The name of the built-in rule that allows read-only tools.
pub const BUILTIN_READ_ONLY: &str = "builtin:read-only";

/// The effective rules, in precedence order.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// Compiles the rules of each source (user first, then project).
    pub fn new(layers: &[(Source, PermissionRules)]) -> Result<Self, RuleError> {
        let mut rules = Vec::new();
        for (source, r) in layers {
            for (action, list) in [(Action::Allow, &r.allow), (Action::Ask, &r.ask), (Action::Deny, &r.deny)] {
                for spec in list {
                    rules.push(Rule::new(action, *source, spec.clone())?);
                }
            }
        }
        Ok(Self::from_rules(rules))
    }

    pub fn from_rules(mut rules: Vec<Rule>) -> Self {
        rules.sort_by(Rule::precedence);
        rules.dedup_by(|a, b| a.action == b.action && a.source == b.source && a.spec == b.spec);
        Self { rules }
    }

    /// A denial by a guardrail rule (Descartes' protected files), checked before every other
    /// policy, the project's YAML policy included; `-y` does not answer it. The most specific
    /// guardrail rule that matches decides: an `allow` there (a worktree beneath the state
    /// directory) only means "no guardrail objection".
    pub fn guardrail(&self, tool: &str, input: &Value, cwd: &Path) -> Option<Verdict> {
        let rule =
            self.rules.iter().take_while(|r| r.source == Source::Guardrail).find(|r| r.matches(tool, input, cwd))?;
        (rule.action == Action::Deny).then(|| rule.verdict(tool))
    }

    /// Adds rules (e.g. the guardrail's) to the policy, keeping the precedence order.
    pub fn with_rules(self, more: Vec<Rule>) -> Self {
        Self::from_rules(self.rules.into_iter().chain(more).collect())
    }

    /// The configured rules, in precedence order (the first that matches decides).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// What the policy says about a call.
    /// The configured rules' verdict (guardrail rules aside: see [`Policy::guardrail`]).
    pub fn evaluate(&self, tool: &str, input: &Value, cwd: &Path, read_only: bool) -> Verdict {
        if let Some(rule) =
            self.rules.iter().filter(|r| r.source != Source::Guardrail).find(|r| r.matches(tool, input, cwd))
        {
            return rule.verdict(tool);
        }
        if read_only {
            Verdict {
                action: Action::Allow,
                rule: BUILTIN_READ_ONLY.into(),
                reason: "read-only tool".into(),
                file: None,
                line: None,
            }
        } else {
            Verdict {
                action: Action::Ask,
                rule: BUILTIN_ASK.into(),
                reason: format!("`{tool}` is not read-only and no permission rule matches it"),
                file: None,
                line: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn rule(action: Action, source: Source, text: &str) -> Rule {
        Rule::new(action, source, RuleSpec::parse(text).unwrap()).unwrap()
    }

    fn policy(rules: &[(Action, Source, &str)]) -> Policy {
        Policy::from_rules(rules.iter().map(|(a, s, t)| rule(*a, *s, t)).collect())
    }

    fn shell(c: &str) -> Value {
        json!({ "command": c })
    }

    const CWD: &str = "/work/p";

    fn eval(p: &Policy, tool: &str, input: Value) -> Verdict {
        p.evaluate(tool, &input, Path::new(CWD), tool == "read_file")
    }

    use Action::*;
    use Source::*;

    #[test]
    fn parses_and_rejects_rules() {
        assert_eq!(RuleSpec::parse("shell(echo *)").unwrap().pattern.as_deref(), Some("echo *"));
        assert_eq!(RuleSpec::parse("mcp__github__*").unwrap().tool, "mcp__github__*");
        assert_eq!(RuleSpec::parse("shell(git status)").unwrap().to_string(), "shell(git status)");
        for bad in ["", "shell(", "shell()", "git status", "mcp__x__y(foo)", "shell([)"] {
            assert!(RuleSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn builtins_apply_when_no_rule_matches() {
        let p = Policy::default();
        assert_eq!(eval(&p, "read_file", json!({"path": "a"})).rule, BUILTIN_READ_ONLY);
        let v = eval(&p, "shell", shell("ls"));
        assert_eq!((v.action, v.rule.as_str()), (Ask, BUILTIN_ASK));
    }

    #[test]
    fn dot_is_everything_under_the_working_directory_and_globs_ignore_spacing() {
        let p = policy(&[(Deny, Project, "write_file(.)"), (Deny, Project, "shell(rm  -rf *)")]);
        assert_eq!(eval(&p, "write_file", json!({"path": "src/a.rs"})).action, Deny);
        assert_eq!(eval(&p, "write_file", json!({"path": "/elsewhere/a.rs"})).action, Ask);
        assert_eq!(eval(&p, "shell", shell("rm   -rf build")).action, Deny);
    }

    #[test]
    fn shell_prefix_and_glob() {
        let p = policy(&[(Allow, Project, "shell(echo *)"), (Allow, User, "shell(git status)")]);
        let v = eval(&p, "shell", shell("echo hi"));
        assert_eq!((v.action, v.rule.as_str()), (Allow, "project:allow shell \"echo *\""));
        assert_eq!(eval(&p, "shell", shell("git status --short")).action, Allow);
        assert_eq!(eval(&p, "shell", shell("git statusx")).action, Ask);
        assert_eq!(eval(&p, "shell", shell("rm x")).action, Ask);
        // Chaining never rides on an allow pattern.
        assert_eq!(eval(&p, "shell", shell("echo hi; rm -rf x")).action, Ask);
        assert_eq!(eval(&p, "shell", shell("echo $(rm x)")).action, Ask);
        assert_eq!(eval(&p, "shell", shell("echo hi > /etc/passwd")).action, Ask);
    }

    #[test]
    fn deny_patterns_match_any_part_of_a_command() {
        let p = policy(&[(Allow, User, "shell"), (Deny, User, "shell(rm *)")]);
        assert_eq!(eval(&p, "shell", shell("ls")).action, Allow);
        for c in ["rm x", "ls && rm x", "ls | rm x", "echo $(rm x)", "ls\nrm -f y"] {
            let v = eval(&p, "shell", shell(c));
            assert_eq!((v.action, v.rule.as_str()), (Deny, "user:deny shell \"rm *\""), "{c}");
        }
    }

    #[test]
    fn path_globs() {
        let p = policy(&[
            (Deny, User, "write_file(/etc/**)"),
            (Allow, Project, "write_file(src/**)"),
            (Deny, Project, "write_file(src/secret)"),
            (Deny, User, "read_file(**/.env)"),
        ]);
        let v = eval(&p, "write_file", json!({"path": "/etc/passwd"}));
        assert_eq!((v.action, v.rule.as_str()), (Deny, "user:deny write_file \"/etc/**\""));
        assert_eq!(eval(&p, "write_file", json!({"path": "src/a/b.rs"})).action, Allow);
        assert_eq!(eval(&p, "write_file", json!({"path": "/work/p/src/main.rs"})).action, Allow);
        assert_eq!(eval(&p, "write_file", json!({"path": "src/../../etc/x"})).action, Ask);
        assert_eq!(eval(&p, "write_file", json!({"path": "../../../etc/hosts"})).action, Deny);
        assert_eq!(
            eval(&p, "write_file", json!({"path": "src/secret/key"})).action,
            Deny,
            "a literal path covers its subtree"
        );
        assert_eq!(eval(&p, "write_file", json!({"path": "README"})).action, Ask);
        assert_eq!(eval(&p, "read_file", json!({"path": "a/.env"})).action, Deny);
        assert_eq!(eval(&p, "read_file", json!({"path": "a/env"})).rule, BUILTIN_READ_ONLY);
    }

    #[test]
    fn hosts_and_mcp_servers() {
        let p = policy(&[
            (Allow, User, "http_request(*.github.com)"),
            (Deny, User, "http_request(evil.github.com)"),
            (Ask, User, "mcp__github"),
            (Allow, User, "mcp__github__get_*"),
        ]);
        let get = |u: &str| eval(&p, "http_request", json!({"url": u})).action;
        assert_eq!(get("https://api.GitHub.com/repos?x=1"), Allow);
        assert_eq!(get("https://user@evil.github.com:443/"), Deny);
        assert_eq!(get("http://example.com/"), Ask);
        assert_eq!(eval(&p, "mcp__github__create_issue", json!({})).rule, "user:ask mcp__github");
        assert_eq!(eval(&p, "mcp__github__get_issue", json!({})).action, Allow);
        assert_eq!(eval(&p, "mcp__gitlab__x", json!({})).rule, BUILTIN_ASK);
    }

    #[test]
    fn specificity_then_severity_then_source() {
        // An argument pattern beats a tool-only rule, whatever the action.
        let p = policy(&[(Deny, User, "shell"), (Allow, User, "shell(cargo test*)")]);
        assert_eq!(eval(&p, "shell", shell("cargo test -p x")).action, Allow);
        assert_eq!(eval(&p, "shell", shell("cargo build")).action, Deny);
        // More literal characters win.
        let p = policy(&[(Allow, User, "shell(cargo *)"), (Ask, User, "shell(cargo publish*)")]);
        assert_eq!(eval(&p, "shell", shell("cargo publish")).action, Ask);
        assert_eq!(eval(&p, "shell", shell("cargo check")).action, Allow);
        // An exact tool name beats a glob.
        let p = policy(&[(Deny, User, "*"), (Allow, User, "shell")]);
        assert_eq!(eval(&p, "shell", shell("x")).action, Allow);
        // Equal specificity: deny > ask > allow.
        let p = policy(&[(Allow, Project, "shell(ls *)"), (Ask, User, "shell(ls *)"), (Deny, User, "shell(ls *)")]);
        assert_eq!(eval(&p, "shell", shell("ls a")).rule, "user:deny shell \"ls *\"");
        // Then project before user.
        let p = policy(&[(Allow, User, "shell"), (Allow, Project, "shell")]);
        assert_eq!(eval(&p, "shell", shell("x")).rule, "project:allow shell");
    }

    #[test]
    fn literal_length_ignores_wildcards() {
        assert_eq!(literal_len("echo *"), 5);
        assert_eq!(literal_len("/etc/**"), 5);
        assert_eq!(literal_len("a[bc]d{e,f}?"), 2);
        assert_eq!(literal_len(r"a\*"), 2);
    }

    const POOL: &[&str] = &[
        "shell",
        "*",
        "shell(echo *)",
        "shell(echo hi)",
        "shell(rm *)",
        "shell(git status)",
        "sh*",
        "write_file(/etc/**)",
        "write_file(src/**)",
        "*_file(**/.env)",
        "read_file",
        "http_request(*.github.com)",
        "mcp__github",
        "mcp__github__*",
    ];

    fn arb_rule() -> impl Strategy<Value = (Action, Source, &'static str)> {
        (
            prop_oneof![Just(Allow), Just(Ask), Just(Deny)],
            prop_oneof![Just(User), Just(Project)],
            proptest::sample::select(POOL),
        )
    }

    fn calls() -> Vec<(&'static str, Value)> {
        vec![
            ("shell", shell("echo hi")),
            ("shell", shell("echo hi && rm x")),
            ("shell", shell("git status -s")),
            ("write_file", json!({"path": "/etc/x"})),
            ("write_file", json!({"path": "src/.env"})),
            ("read_file", json!({"path": "a/.env"})),
            ("http_request", json!({"url": "https://api.github.com"})),
            ("mcp__github__x", json!({})),
            ("other", json!({})),
        ]
    }

    proptest! {
        #[test]
        fn the_winner_does_not_depend_on_rule_order(
            rules in proptest::collection::vec(arb_rule(), 0..8),
            seed in any::<u64>(),
        ) {
            let a = policy(&rules);
            let mut shuffled = rules.clone();
            fastrand::Rng::with_seed(seed).shuffle(&mut shuffled);
            let b = policy(&shuffled);
            for (tool, input) in calls() {
                prop_assert_eq!(eval(&a, tool, input.clone()), eval(&b, tool, input));
            }
        }

        #[test]
        fn the_winner_is_the_most_specific_matching_rule(rules in proptest::collection::vec(arb_rule(), 1..8)) {
            let p = policy(&rules);
            for (tool, input) in calls() {
                let v = eval(&p, tool, input.clone());
                let matching: Vec<Rule> = rules
                    .iter()
                    .map(|(a, s, t)| rule(*a, *s, t))
                    .filter(|r| r.matches(tool, &input, Path::new(CWD)))
                    .collect();
                if let Some(best) = matching.iter().min_by(|x, y| x.precedence(y)) {
                    prop_assert_eq!(&v.rule, &best.name());
                    for other in &matching {
                        prop_assert_ne!(other.precedence(best), Ordering::Less);
                    }
                } else {
                    prop_assert!(v.rule.starts_with("builtin:"));
                }
            }
        }
    }
    #[test]
    fn guardrail_denials_come_before_every_rule_and_an_exception_allows_nothing_by_itself() {
        let p = Policy::from_rules(vec![
            rule(Action::Deny, Source::Guardrail, "{write_file,Write}(/work/p/.descartes)"),
            rule(Action::Allow, Source::Guardrail, "{write_file,Write}(/work/p/.descartes/worktrees)"),
            rule(Action::Allow, Source::User, "write_file(/work/p/.descartes/config.toml)"),
            rule(Action::Allow, Source::Project, "Write"),
        ]);
        let cwd = Path::new(CWD);
        let config = json!({"path": ".descartes/config.toml"});
        let denied = p.guardrail("write_file", &config, cwd).unwrap();
        assert_eq!(denied.action, Action::Deny);
        assert!(denied.rule.starts_with("guardrail:deny"), "{}", denied.rule);
        assert!(p.guardrail("Write", &json!({"file_path": "/work/p/.descartes/descartes.db"}), cwd).is_some());
        // The worktree exception: no guardrail objection, and the configured rules decide.
        let in_worktree = json!({"path": ".descartes/worktrees/t1/lib.rs"});
        assert!(p.guardrail("write_file", &in_worktree, cwd).is_none());
        assert_eq!(p.evaluate("write_file", &in_worktree, cwd, false).action, Action::Ask);
        // Elsewhere, and for reads, the guardrail says nothing.
        assert!(p.guardrail("write_file", &json!({"path": "src/a.rs"}), cwd).is_none());
        assert!(p.guardrail("read_file", &config, cwd).is_none());
        // The decision: denied before the user's more specific allow, whatever -y says.
        let q =
            crate::permission::Question { call_id: None, tool: "write_file", input: &config, read_only: false, cwd };
        match crate::permission::decide(&p, &q, &Default::default(), true) {
            crate::permission::Step::Decided(d) => {
                assert_eq!(d.decision, descartes_protocol::Decision::Deny);
                assert_eq!(d.actor, "guardrail");
            }
            _ => panic!("the guardrail asked"),
        }
    }
}
