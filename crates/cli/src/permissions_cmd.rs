//! `descartes permissions`: the effective permission rules, in precedence order, with where
//! each came from.

use std::io::Write;

use anyhow::Result;
use descartes_core::policy::{Action, BUILTIN_ASK, BUILTIN_READ_ONLY, Rule};
use descartes_runtime::Runtime;
use serde_json::json;

pub fn run(rt: &Runtime, json: bool) -> Result<u8> {
    let user = rt.places.user_config.as_deref();
    let policy = rt.permission_policy()?;
    let file_of = |r: &Rule| {
        rt.config
            .permission_layers
            .iter()
            .find(|(file, rules)| {
                let list = match r.action {
                    Action::Allow => &rules.allow,
                    Action::Ask => &rules.ask,
                    Action::Deny => &rules.deny,
                };
                (Some(file.as_path()) == user) == (r.source == descartes_core::policy::Source::User)
                    && list.contains(&r.spec)
            })
            .map(|(file, _)| file.display().to_string())
    };
    let mut rows: Vec<serde_json::Value> = policy
        .rules()
        .iter()
        .map(|r| {
            json!({
                "action": r.action.as_str(),
                "rule": r.spec.to_string(),
                "name": r.name(),
                "source": r.source.as_str(),
                "file": file_of(r),
            })
        })
        .collect();
    rows.push(json!({"action": "allow", "rule": "read-only tools", "name": BUILTIN_READ_ONLY, "source": "builtin"}));
    rows.push(json!({"action": "ask", "rule": "every other call", "name": BUILTIN_ASK, "source": "builtin"}));
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return Ok(0);
    }
    // The guardrail's rules, one line: which paths no tool writes, and the exceptions.
    let guardrail: Vec<&Rule> =
        policy.rules().iter().filter(|r| r.source == descartes_core::policy::Source::Guardrail).collect();
    let paths = |action: Action| {
        let mut list: Vec<String> =
            guardrail.iter().filter(|r| r.action == action).filter_map(|r| r.spec.pattern.clone()).collect();
        list.sort();
        list.join(", ")
    };
    if !guardrail.is_empty() {
        let whole: Vec<String> =
            guardrail.iter().filter(|r| r.spec.pattern.is_none()).map(|r| format!("`{}`", r.spec.tool)).collect();
        writeln!(
            out,
            "Guardrail (first, final even with -y): no tool writes Descartes' own files: {}; except beneath {}.{}\n",
            paths(Action::Deny),
            paths(Action::Allow),
            if whole.is_empty() {
                String::new()
            } else {
                format!(" Denied: {} (an agent CLI asking for more than its sandbox).", whole.join(", "))
            }
        )?;
    }
    rows.retain(|r| r["source"] != "guardrail");
    writeln!(out, "Permission rules in precedence order (the first that matches a call decides):")?;
    let width = rows.iter().filter_map(|r| r["rule"].as_str()).map(|r| r.chars().count()).max().unwrap_or(0);
    for (i, r) in rows.iter().enumerate() {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
        let from = match r["file"].as_str() {
            Some(file) => format!("{} ({file})", s("source")),
            None => s("source"),
        };
        writeln!(out, "{:>3}. {:<5}  {:<width$}  {from}", i + 1, s("action"), s("rule"))?;
    }
    writeln!(
        out,
        "More specific rules come first: a command/path/host pattern before a tool name, more literal characters \
         before fewer; on a tie deny > ask > allow, then project before user.\n-y/--yes answers asks for one run; it \
         never overrides a deny."
    )?;
    Ok(0)
}
