//! `descartes providers`: every provider with its configuration state and health.

use std::io::Write;

use anyhow::Result;
use descartes_runtime::Runtime;

pub async fn run(rt: Runtime, check: bool, json: bool) -> Result<u8> {
    let store = rt.open_store().await?;
    let found = descartes_app::listings::providers(&rt, &*store, check).await?;
    let (rows, failed_checks) = (found.rows, found.failed_checks);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(if failed_checks > 0 { 1 } else { 0 });
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<18} {:<17} {:<26} {:<10} {:>6} {:>5}  STATE",
        "PROVIDER", "KIND", "MODEL", "CIRCUIT", "CALLS", "FAIL"
    )?;
    for row in &rows {
        let s = |k: &str| row.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
        if let Some(err) = row.get("error").and_then(|v| v.as_str()) {
            writeln!(out, "{:<18} error: {err}", s("name"))?;
            continue;
        }
        let mut name = s("name");
        if row.get("default").and_then(|v| v.as_bool()) == Some(true) {
            name.push_str(" *");
        }
        let mut state = s("configuration");
        if let Some(check) = row.get("check").and_then(|v| v.as_str()) {
            state = if check == "ok" { "check ok".into() } else { format!("check FAILED: {check}") };
        }
        let model = if s("model").is_empty() { "(CLI default)".to_owned() } else { s("model") };
        writeln!(
            out,
            "{:<18} {:<17} {:<26} {:<10} {:>6} {:>5}  {}",
            name,
            s("kind"),
            crate::output::clip_line(&model, 26),
            s("circuit"),
            row.get("calls").and_then(|v| v.as_u64()).unwrap_or(0),
            row.get("failures").and_then(|v| v.as_u64()).unwrap_or(0),
            crate::output::clip_line(&state, 70),
        )?;
    }
    writeln!(out, "\n* used when no provider is chosen (-p, `provider` in config)")?;
    Ok(if failed_checks > 0 { 1 } else { 0 })
}
