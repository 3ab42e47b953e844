//! Policy evaluation latency (`cargo bench -p descartes-policy --bench eval`).
//!
//! A 200-rule merged policy (global 60 rules, project 100, agent 60 of which 20 replace project
//! rules by id) with every matcher kind, a quarter of the rules with a CEL `when`, loaded from
//! files like `PolicySet::load` does. One iteration is one `PolicySet::evaluate` of one of a
//! mix of inputs (shell commands, file reads and writes, HTTP, claims, merges), timed alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use descartes_policy::{
    Access, AgentFacts, DecisionInput, Effect, Layer, PolicySet, Stage, TaskFacts, ToolFacts, UsageFacts,
};

const ITERATIONS: usize = 200_000;
const WARMUP: usize = 5_000;

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e6;
    println!(
        "{name:<40} n={} p50={:.2}µs p90={:.2}µs p99={:.2}µs max={:.2}µs",
        samples.len(),
        p(0.5),
        p(0.9),
        p(0.99),
        p(1.0)
    );
}

/// Rule `i` of a layer: matchers chosen by `i`, so the set mixes every kind.
fn rule(out: &mut String, id: &str, i: usize) {
    let effect = ["allow", "deny", "require_approval"][i % 3];
    writeln!(out, "  - id: {id}\n    effect: {effect}").unwrap();
    match i % 8 {
        0 => writeln!(out, "    tools: [shell]\n    commands: [\"tool{i} *\", \"run{i} --fast\"]").unwrap(),
        1 => writeln!(out, "    paths: {{write: [\"src/mod{i}/**\"], read: [\"secrets{i}/**\"]}}").unwrap(),
        2 => writeln!(out, "    hosts: [\"*.host{i}.example.com\", \"api{i}.example.org\"]").unwrap(),
        3 => writeln!(out, "    task_types: [\"type{i}-*\"]\n    on: [claim, merge]").unwrap(),
        4 => writeln!(out, "    agents: [\"agent{i}-*\"]\n    tools: [\"mcp__server{i}__*\"]").unwrap(),
        5 => writeln!(out, "    tools: [\"tool_{i}\", Bash]\n    commands: [\"cargo {i}*\"]").unwrap(),
        6 => writeln!(out, "    paths: [\"**/*.ext{i}\"]").unwrap(),
        _ => writeln!(out, "    task_types: [\"deploy{i}\"]\n    agents: [\"claude-*\"]").unwrap(),
    }
    if i % 4 == 1 {
        let when = match i % 3 {
            0 => format!("task.priority > {} && \"prod\" in task.labels", i % 10),
            1 => format!("usage.cost_usd > {}.5 || usage.attempts > {}", i % 5, i % 4 + 1),
            _ => format!("agent.backend == \"b{i}\" && stage != \"merge\""),
        };
        writeln!(out, "    when: '{when}'").unwrap();
    }
}

fn write_policies(dir: &Path) -> Vec<(Layer, std::path::PathBuf)> {
    let mut global =
        String::from("version: 1\ndefault: allow\nbudgets:\n  max_tokens: 10000000\n  max_cost_usd: 50\nrules:\n");
    for i in 0..60 {
        rule(&mut global, &format!("g{i}"), i);
    }
    // The rules, among the project's.
    let mut project = String::from(
        "version: 1\nbudgets:\n  max_cost_usd: 20\nrules:\n  - id: no-rm-rf\n    effect: deny\n    tools: [shell]\n    \
         commands: [\"rm -rf *\"]\n  - id: approve-deploys\n    effect: require_approval\n    on: claim\n    \
         task_types: [deploy]\n",
    );
    for i in 60..158 {
        rule(&mut project, &format!("p{i}"), i);
    }
    let mut agent = String::from("version: 1\nbudgets:\n  max_attempts: 5\nrules:\n");
    for i in 0..60 {
        // The first 20 replace project rules.
        let id = if i < 20 { format!("p{}", 60 + i * 4) } else { format!("a{i}") };
        rule(&mut agent, &id, 200 + i);
    }
    let files = [
        (Layer::Global, "policy.yaml", global),
        (Layer::Project, "project.yaml", project),
        (Layer::Agent, "agent.yaml", agent),
    ];
    files
        .into_iter()
        .map(|(layer, name, text)| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            (layer, path)
        })
        .collect()
}

fn inputs() -> Vec<DecisionInput> {
    let task = |ty: &str, prio: i64| TaskFacts {
        id: "t-42".into(),
        task_type: ty.into(),
        priority: prio,
        labels: vec!["prod".into(), "web".into()],
        title: "fix the flaky test".into(),
    };
    let agent =
        |name: &str| AgentFacts { name: name.into(), labels: vec!["fast".into()], backend: "claude-code".into() };
    let usage = UsageFacts { tokens: 120_000, cost_usd: 1.2, elapsed_secs: 300.0, attempts: 1 };
    let tool = |t: ToolFacts| {
        DecisionInput::new(Stage::Tool)
            .with_tool(t)
            .with_task(task("bugfix", 7))
            .with_agent(agent("claude-3"))
            .with_usage(usage.clone())
    };
    let shell = |c: &str| tool(ToolFacts { name: "shell".into(), command: Some(c.into()), ..ToolFacts::default() });
    let file = |p: &str, a: Access| {
        tool(ToolFacts { name: "write_file".into(), path: Some(p.into()), access: Some(a), ..ToolFacts::default() })
    };
    vec![
        shell("cargo test -p descartes-policy"),
        shell("rm -rf target && cargo build"),
        shell("git status"),
        // Rules with a `when` that is false: evaluated, then the default.
        shell("cargo 13 build"),
        file("src/mod9/a.rs", Access::Write),
        file("src/mod17/lib.rs", Access::Write),
        file("crates/policy/src/set.rs", Access::Read),
        tool(ToolFacts {
            name: "http_request".into(),
            host: Some("api.host10.example.com".into()),
            ..ToolFacts::default()
        }),
        tool(ToolFacts { name: "mcp__server12__search".into(), ..ToolFacts::default() }),
        DecisionInput::new(Stage::Claim)
            .with_task(task("deploy", 9))
            .with_agent(agent("claude-1"))
            .with_usage(usage.clone()),
        DecisionInput::new(Stage::Merge)
            .with_task(task("type11-x", 2))
            .with_agent(agent("agent12-a"))
            .with_usage(usage),
    ]
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_policies(dir.path());
    let t = Instant::now();
    let set = PolicySet::from_files(&files).unwrap_or_else(|e| panic!("{e}"));
    let load = t.elapsed();
    assert_eq!(set.rules().len(), 200, "the merged policy has 200 rules");
    let with_when = set.rules().iter().filter(|r| r.when.is_some()).count();
    println!("loaded 200 rules ({with_when} with `when`) from 3 files in {:.2} ms", load.as_secs_f64() * 1e3);

    let inputs = inputs();
    for input in &inputs {
        let d = set.evaluate(input);
        println!("  {:<18} {:<16} {}", format!("{:?}", d.effect), d.rule_id.as_deref().unwrap_or("-"), d.reason);
    }
    assert_eq!(set.evaluate(&inputs[1]).effect, Effect::Deny);
    assert_eq!(set.evaluate(&inputs[9]).effect, Effect::RequireApproval);

    let mut all = Vec::with_capacity(ITERATIONS);
    let mut per_input: Vec<Vec<Duration>> = vec![Vec::new(); inputs.len()];
    for i in 0..WARMUP + ITERATIONS {
        let k = i % inputs.len();
        let t = Instant::now();
        let d = set.evaluate(&inputs[k]);
        let elapsed = t.elapsed();
        std::hint::black_box(d);
        if i >= WARMUP {
            all.push(elapsed);
            per_input[k].push(elapsed);
        }
    }
    report("evaluate (200 rules, mixed inputs)", all);
    for (k, samples) in per_input.into_iter().enumerate() {
        report(&format!("  input {k}"), samples);
    }
    let t = Instant::now();
    let conflicts = set.conflicts();
    println!("conflicts(): {} found in {:.2} ms", conflicts.len(), t.elapsed().as_secs_f64() * 1e3);
}
