//! The permission decision per tool call (`cargo bench -p descartes-runtime --bench decision`).
//!
//! What every tool call of every run now passes (issue 15): the guardrail rules (Descartes' own
//! files), the project's YAML policy through the gate (a 100-rule policy, every tool-level
//! matcher kind, some rules with a CEL `when`), then the `[permissions]` rules (60: the same 30 from two files). Against
//! the decision a `run` made before: the `[permissions]` rules alone. Inputs in turn: simple and
//! compound shell commands (Descartes' `shell` and Claude Code's `Bash`), a file read, a file
//! write, an HTTP call, a three-file Codex patch. Each decision is timed alone; p50 / p90 / p99.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use descartes_core::permission::{Question, ToolGate, decide, decide_gated};
use descartes_core::policy::{Action, PermissionRules, Policy, Rule, RuleSpec, Source};
use descartes_policy::{AgentFacts, Layer, PolicySet};
use descartes_runtime::policy_gate::PolicyGate;
use serde_json::{Value, json};

const ITERATIONS: usize = 100_000;
const WARMUP: usize = 5_000;

fn permissions() -> Policy {
    let mut rules = PermissionRules::default();
    for i in 0..10 {
        rules.allow.push(RuleSpec::parse(&format!("shell(tool{i} *)")).unwrap());
        rules.deny.push(RuleSpec::parse(&format!("write_file(secret{i}/**)")).unwrap());
        rules.ask.push(RuleSpec::parse(&format!("http_request(*.host{i}.example.com)")).unwrap());
    }
    Policy::new(&[(Source::User, rules.clone()), (Source::Project, rules)]).unwrap()
}

/// The guardrail rules a runtime adds (state directory, config, policy, git control files).
fn with_guardrails(policy: Policy) -> Policy {
    let tools = "{write_file,edit_file,apply_patch,Write,Edit,MultiEdit,NotebookEdit}";
    let rule = |action, path: &str| {
        Rule::new(action, Source::Guardrail, RuleSpec { tool: tools.into(), pattern: Some(path.into()) }).unwrap()
    };
    let mut rules = Vec::new();
    for p in [
        "/home/u/.local/state/descartes",
        "/home/u/.config/descartes/config.toml",
        "/home/u/.config/descartes/policy.yaml",
    ] {
        rules.push(rule(Action::Deny, p));
    }
    for name in [".descartes", ".ai", ".git/hooks", ".git/config"] {
        rules.push(rule(Action::Deny, name));
    }
    rules.push(rule(Action::Allow, "/home/u/.local/state/descartes/worktrees"));
    policy.with_rules(rules)
}

fn yaml_policy() -> PolicySet {
    let mut text = String::from("version: 1\nrules:\n");
    for i in 0..100 {
        let effect = ["allow", "deny", "require_approval"][i % 3];
        writeln!(text, "  - id: r{i}\n    effect: {effect}").unwrap();
        match i % 5 {
            0 => writeln!(text, "    tools: [shell]\n    commands: [\"tool{i} *\", \"run{i} --fast\"]").unwrap(),
            1 => writeln!(text, "    paths: {{write: [\"src/mod{i}/**\"], read: [\"secrets{i}/**\"]}}").unwrap(),
            2 => writeln!(text, "    hosts: [\"*.host{i}.example.com\"]").unwrap(),
            3 => writeln!(text, "    tools: [\"mcp__server{i}__*\"]").unwrap(),
            _ => writeln!(text, "    paths: [\"**/*.ext{i}\"]").unwrap(),
        }
        if i % 10 == 1 {
            writeln!(text, "    when: 'agent.backend == \"b{i}\"'").unwrap();
        }
    }
    PolicySet::from_sources(&[(Layer::Project, PathBuf::from("/p/.ai/policy.yaml"), text)]).unwrap()
}

fn inputs() -> Vec<(&'static str, Value, bool)> {
    vec![
        ("shell", json!({"command": "cargo test -p core"}), false),
        ("shell", json!({"command": "git status && rm -rf build | tee log"}), false),
        ("Bash", json!({"command": "echo $((5*5))-deny"}), false),
        ("read_file", json!({"path": "src/main.rs"}), true),
        ("write_file", json!({"path": "src/mod3/lib.rs"}), false),
        ("http_request", json!({"url": "https://api.host2.example.com/v1"}), false),
        ("apply_patch", json!({"paths": ["/p/a.rs", "/p/b/c.rs", "/p/.git/hooks/x"], "path": "/p/a.rs"}), false),
    ]
}

fn report(name: &str, mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e6;
    println!("{name:<44} n={} p50={:.2}µs p90={:.2}µs p99={:.2}µs", samples.len(), p(0.5), p(0.9), p(0.99));
    p(0.5)
}

fn time(mut f: impl FnMut(usize)) -> Vec<Duration> {
    for i in 0..WARMUP {
        f(i);
    }
    (0..ITERATIONS)
        .map(|i| {
            let t = Instant::now();
            f(i);
            t.elapsed()
        })
        .collect()
}

fn main() {
    let cwd = Path::new("/p");
    let before = permissions();
    let now = with_guardrails(permissions());
    let gate: Arc<dyn ToolGate> = Arc::new(PolicyGate {
        policy: Arc::new(yaml_policy()),
        task: None,
        agent: AgentFacts { name: "openai".into(), labels: Vec::new(), backend: "openai".into() },
        root: PathBuf::from("/p"),
    });
    let inputs = inputs();
    let allowed = HashSet::new();
    let question = |i: usize| {
        let (tool, input, read_only) = &inputs[i % inputs.len()];
        Question { call_id: Some("c1".into()), tool, input, read_only: *read_only, cwd }
    };
    let base = report(
        "before: [permissions] only",
        time(|i| {
            std::hint::black_box(decide(&before, &question(i), &allowed, true));
        }),
    );
    let full = report(
        "now: guardrails + YAML gate + [permissions]",
        time(|i| {
            std::hint::black_box(decide_gated(Some(gate.as_ref()), &now, &question(i), &allowed, true));
        }),
    );
    for (n, (tool, _, _)) in inputs.iter().enumerate() {
        report(
            &format!("  now, {tool} #{n}"),
            time(|_| {
                std::hint::black_box(decide_gated(Some(gate.as_ref()), &now, &question(n), &allowed, true));
            }),
        );
    }
    println!("added by the decision path: p50 {:.2}µs per tool call (target <= 20µs)", full - base);
}
