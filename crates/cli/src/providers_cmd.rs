//! `descartes providers`: every provider with its configuration state and health.

use std::io::Write;

use anyhow::Result;
use descartes_core::{BreakerPolicy, BreakerState};
use descartes_runtime::Runtime;

pub async fn run(rt: Runtime, check: bool, json: bool) -> Result<u8> {
    let store = rt.open_store().await?;
    let r = &rt.config.retry;
    let policy = BreakerPolicy {
        failure_threshold: r.breaker_failures.max(1),
        open_for: std::time::Duration::from_secs(r.breaker_open_secs),
    };
    let health = rt.provider_health(&*store, policy).await?;
    let now = descartes_protocol::Timestamp::now();
    let default = rt.default_provider();
    let mut rows = Vec::new();
    let mut failed_checks = 0;
    for name in rt.provider_names() {
        let sel = match rt.select(Some(&name), None) {
            Ok(s) => s,
            Err(e) => {
                rows.push(serde_json::json!({"name": name, "error": e.to_string()}));
                continue;
            }
        };
        let configured = rt.provider_status(&sel);
        let breaker =
            health.breakers.get(&name).map(|b| b.current(now)).unwrap_or(BreakerState::Closed { failures: 0 });
        let stats = health.stats.get(&name).cloned().unwrap_or_default();
        let probe = if check && configured.is_ok() {
            let result = rt.check_provider(&sel).await;
            if result.is_err() {
                failed_checks += 1;
            }
            Some(result.map_err(|e| e.to_string()))
        } else {
            None
        };
        rows.push(serde_json::json!({
            "name": name,
            "kind": sel.kind,
            "model": sel.model,
            "base_url": sel.base_url,
            "default": name == default,
            "configured": configured.is_ok(),
            "configuration": match &configured { Ok(s) => s.clone(), Err(e) => e.clone() },
            "circuit": breaker.name(),
            "open_until": match breaker { BreakerState::Open { until } => Some(until), _ => None },
            "calls": stats.calls,
            "failures": stats.failures,
            "last_error": stats.last_error,
            "check": probe.as_ref().map(|p| match p { Ok(()) => "ok".to_owned(), Err(e) => e.clone() }),
        }));
    }
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
