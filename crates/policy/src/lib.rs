//! The policy engine: what agents may do, decided from YAML policies and recorded.
//!
//! A policy says, for tasks being claimed, tool calls and merges, whether to **allow**,
//! **deny** or **require approval**, by rules that match task types, agents, tools and shell
//! commands, paths (read or write) and network hosts, optionally under a condition written in
//! [CEL](https://cel.dev), and it sets budgets (tokens, cost, time, attempts). Every decision
//! ([`PolicyDecision`]) names the rule and file that decided, what it matched and the inputs it
//! saw: the body of a Policy Decision Record, to which the caller adds the actor and the time.
//!
//! This crate does no IO beyond reading the policy files, and never prints.
//!
//! # Where policies live
//!
//! Three layers, merged in this order (later overrides earlier, see [Merging](#merging)):
//! 1. **global**: `<user config dir>/policy.yaml` (e.g. `~/.config/descartes/policy.yaml`;
//!    the caller passes the path);
//! 2. **project**: `<project>/.ai/policy.yaml` ([`PROJECT_POLICY`]);
//! 3. **agent**: `<project>/.ai/policies/<agent>.yaml` ([`agent_policy_path`]).
//!
//! [`PolicySet::load`] reads them (missing files are skipped: no policy at all allows
//! everything); [`PolicySet::from_files`] and [`PolicySet::from_sources`] take explicit files
//! or texts. [`validate_file`] checks one file and lists every problem, each with file, line and
//! column, then the file's conflicts; [`PolicySet::conflicts`] finds conflicts across layers.
//!
//! # The format
//!
//! ```yaml
//! version: 1                       # optional; 1 is the only version
//! default: allow                   # when no rule matches: allow (built-in) | deny | require_approval
//! rules:
//!   - id: no-rm-rf                 # required, unique in the file; a later layer's rule with
//!     effect: deny                 #   the same id replaces this one
//!     tools: [shell]               # allow | deny | require_approval (required)
//!     commands: ["rm -rf *"]
//!     reason: never delete trees from an agent   # shown in the decision
//!   - id: approve-deploys
//!     effect: require_approval
//!     on: claim                    # claim | tool | merge, or a list
//!     task_types: [deploy]
//!   - id: hot-prod
//!     effect: require_approval
//!     when: 'task.priority > 5 && "prod" in task.labels'
//!   - id: secrets
//!     effect: deny
//!     paths: { read: ["secrets/**"], write: ["secrets/**", "/etc/**"] }
//!   - id: docs-site
//!     effect: allow
//!     hosts: ["*.example.com"]
//!     agents: ["claude-*"]
//!   - id: old-rule-from-global
//!     enabled: false               # removes an earlier layer's rule of this id
//! budgets:                         # exceeding one is a deny naming it
//!   max_tokens: 200000
//!   max_cost_usd: 5.0
//!   max_time_secs: 3600
//!   max_attempts: 3
//! ```
//!
//! Unknown fields, wrong types, bad globs, bad CEL, duplicate keys and duplicate rule ids are
//! errors, all reported at once with their line and column (a YAML syntax error stops the file
//! there). Scalars follow YAML 1.2 (`yes`, `no`, `on` are strings); a number written where a
//! name is expected is taken as written (`task_types: [1]`). Every list field also takes a
//! single string; an empty list is an error (remove the field to match everything).
//!
//! ## Matchers
//!
//! A rule matches an input when **every** matcher it sets matches (any one of its patterns
//! suffices) and its `when` holds; a rule with no matcher and no `when` matches everything at
//! its stages. Patterns are globs ([`globset`] syntax: `*`, `?`, `[...]`, `{a,b}`, `**`):
//! - `tools`: the tool's name. Descartes' names and the coding-agent CLIs' are the same tool
//!   (`shell`/`Bash`, `read_file`/`Read`, `write_file`/`Write`, `edit_file`/`Edit`/`MultiEdit`,
//!   `list_files`/`LS`/`Glob`, `search_files`/`Grep`, `http_request`/`WebFetch`), so
//!   `tools: [shell]` also matches Claude Code's `Bash`.
//! - `commands`: the shell command, whitespace runs taken as one space. A pattern without
//!   wildcards is a prefix on a word boundary (`git push` matches `git push --force`); with
//!   wildcards it is a glob over the whole command where `*` also crosses `/`. A deny or
//!   require_approval pattern also matches any part of a compound command between `;`, `&`,
//!   `|`, `<`, `>`, backquotes, `$(`, `(`, `)` and newlines; an allow pattern only matches a
//!   simple command (none of those), so `echo *` never lets `echo hi; rm -rf x` through.
//!   Patterns are a guard, not a sandbox: `rm -r -f` is not `rm -rf *`.
//! - `paths`: the path a call reads or writes, normalised (`./a/../b` is `b`): relative to the
//!   project root inside it, absolute outside. `paths: [globs]` applies to reads and writes,
//!   `paths: {read: [...], write: [...]}` to each; a call of unknown access counts as a write.
//!   `*` stays within a path component, `**` crosses them; a pattern without wildcards also
//!   matches everything under it (`secrets` matches `secrets/a.key`).
//! - `hosts`: the host a call reaches (lower case, without port), case-insensitive;
//!   `*.example.com` does not match `example.com` itself.
//! - `task_types`, `agents`: the task's type and the agent's name.
//!
//! ## Stages
//!
//! `on` limits a rule to stages: `claim` (a worker is about to claim a task), `tool` (an agent
//! is about to call a tool), `merge` (a task's work is about to be merged). Without `on`, a rule
//! with `tools`, `commands`, `paths` or `hosts` applies at `tool` (those are facts of a tool
//! call; writing another stage in `on` for such a rule is an error), any other rule at every
//! stage. Write `on: claim` to ask once per task rather than before each of its tool calls.
//!
//! ## Conditions
//!
//! `when` is a CEL expression, compiled once at load, over these variables:
//! - `task`: `id`, `type`, `priority` (int), `labels` (list of strings), `title`;
//! - `agent`: `name`, `labels`, `backend`;
//! - `tool`: `name`, and when known `command`, `path`, `host`, `access` (`"read"`/`"write"`):
//!   test with `has(tool.command)`;
//! - `usage`: `tokens` (int), `cost_usd`, `elapsed_secs` (numbers), `attempts` (int);
//! - `stage`: `"claim"`, `"tool"` or `"merge"`.
//!
//! The standard library plus the `strings` and `lists` extensions and `matches` (regular
//! expressions) are available. A rule whose condition reads a variable the input does not
//! have (no task for a direct run, say) does not match. A condition that fails to evaluate
//! (a missing field, a type error, a result that is not a boolean) makes the decision **deny**
//! with the error in the reason (fail closed), never a panic, when that rule is the one being
//! considered (see below).
//!
//! ## Budgets
//!
//! When the input carries [`UsageFacts`], budgets are checked before any rule, at every stage:
//! `tokens > max_tokens`, `cost_usd > max_cost_usd`, `elapsed_secs > max_time_secs` or
//! `attempts > max_attempts` (attempts count from 1, so `max_attempts: 3` denies the fourth) is
//! a deny with rule id `budget:<field>` and the file and line that set the limit; no rule
//! overrides it. A usage that is not a number counts as exceeded. To ask before a limit, write a
//! rule: `when: usage.cost_usd > 2.0` with `effect: require_approval`.
//!
//! # Merging
//!
//! Files are merged global, then project, then agent:
//! 1. a rule whose `id` an earlier layer already has **replaces** that rule (whatever its
//!    effect: a project can turn a global deny into an allow by reusing its id), in its place;
//!    with `enabled: false` it **removes** it; other rules are added;
//! 2. `budgets` merge **field by field**: a later layer's field overrides, the others stay;
//! 3. `default` from the latest layer that sets it (else allow).
//!
//! Rules with different ids never override each other: they compete by precedence.
//!
//! # Precedence: the most specific matching rule wins
//!
//! Among the rules that match an input (stage, matchers, and facts for their condition), the
//! order is, in turn:
//! 1. more matcher kinds set (`tools`, `commands`, `paths`, `hosts`, `task_types`, `agents`;
//!    `paths` counts once) first;
//! 2. more literal characters (outside `*`, `?`, `[...]`, `{...}`) in the patterns that matched
//!    (for each kind, its most literal matching pattern) first;
//! 3. a rule with a `when` before one without;
//! 4. on equal specificity, `deny` before `require_approval` before `allow`;
//! 5. then the later layer, then the smaller id (only to make the order total: the winner
//!    never depends on the order rules are written in).
//!
//! Conditions are evaluated in that order: the first rule whose condition holds (or that has
//! none) decides; a condition that fails to evaluate decides deny. No matching rule: the
//! `default`.
//!
//! # Conflicts
//!
//! Two rules **conflict** when they have opposite effects (allow against deny or
//! require_approval), apply at a common stage, and some input could match both with equal
//! specificity (steps 1–3 above): the tie is then broken only by the effect, which is rarely
//! what the author meant. Detection is conservative: two patterns are taken to overlap unless
//! they visibly cannot (different literal prefixes or suffixes, a literal the other glob does not
//! match, read against write paths), and two conditions are taken to be able to hold together.
//! [`PolicySet::conflicts`] and [`validate_file`] report each conflict at the later rule,
//! naming both rules with `file:line`; a policy with conflicts still loads.
//!
//! # Example
//!
//! ```
//! use std::path::PathBuf;
//! use descartes_policy::{DecisionInput, Effect, Layer, PolicySet, Stage, TaskFacts, ToolFacts};
//!
//! let text = r#"
//! rules:
//!   - id: no-rm-rf
//!     effect: deny
//!     tools: [shell]
//!     commands: ["rm -rf *"]
//!   - id: approve-deploys
//!     effect: require_approval
//!     on: claim
//!     task_types: [deploy]
//! "#;
//! let policy = PolicySet::from_sources(&[(Layer::Project, PathBuf::from(".ai/policy.yaml"), text.into())])?;
//!
//! let call = ToolFacts { name: "Bash".into(), command: Some("rm -rf build".into()), ..Default::default() };
//! let decision = policy.evaluate(&DecisionInput::new(Stage::Tool).with_tool(call));
//! assert_eq!(decision.effect, Effect::Deny);
//! assert_eq!(decision.rule_id.as_deref(), Some("no-rm-rf"));
//! assert_eq!(decision.line, Some(3));
//!
//! let deploy = TaskFacts { task_type: "deploy".into(), ..Default::default() };
//! let decision = policy.evaluate(&DecisionInput::new(Stage::Claim).with_task(deploy));
//! assert_eq!(decision.effect, Effect::RequireApproval);
//! # Ok::<(), descartes_policy::PolicyError>(())
//! ```

mod cond;
mod error;
mod facts;
mod file;
mod pattern;
mod set;
#[cfg(test)]
mod tests;
mod yaml;

pub use error::{Diagnostic, DiagnosticKind, DisplayDiagnostics, PolicyError, Result};
pub use facts::{
    Access, AgentFacts, DecisionInput, Effect, Layer, PolicyDecision, Stage, TaskFacts, ToolFacts, UsageFacts,
};
pub use file::{BudgetKind, Budgets, Origin, Rule, VERSION};
pub use set::{
    AGENT_POLICIES, GLOBAL_POLICY, PROJECT_POLICY, PolicySet, agent_policy_path, validate_file, validate_str,
};
