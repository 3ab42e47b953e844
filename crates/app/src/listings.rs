//! What the front ends list, as the CLI's `--json` prints it: the agent registry
//! (`descartes ai list --json`), chat sessions (`descartes session list --json`) and the
//! providers with their health (`descartes providers --json [--check]`).

use anyhow::Result;
use descartes_core::state::RunState;
use descartes_core::{BreakerPolicy, BreakerState, EventStore, RunSummary, routing};
use descartes_protocol::{AgentStats, Role, Timestamp};
use descartes_runtime::{Runtime, Stores};
use serde_json::{Value, json};

/// The recent success rate (0 without history).
pub fn recent_rate(s: &AgentStats) -> f64 {
    if s.recent.is_empty() { 0.0 } else { s.recent.iter().filter(|r| **r).count() as f64 / s.recent.len() as f64 }
}

/// The recent success rate, `None` without history.
pub fn success_rate(s: &AgentStats) -> Option<f64> {
    (!s.recent.is_empty()).then(|| recent_rate(s))
}

/// Every registered agent, by name: its record with `status` (`idle`, `busy`, `disabled`,
/// `unhealthy`), `running` (leased tasks) and `success_rate` (recent; `null` without history).
pub async fn agents(stores: &Stores, now: Timestamp) -> Result<Vec<Value>> {
    let list = stores.agents.list_agents().await?;
    let load = stores.tasks.agent_load().await?;
    Ok(list
        .iter()
        .map(|a| {
            let running = load.get(&a.name).copied().unwrap_or(0);
            let mut v = serde_json::to_value(a).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("status".into(), routing::status(a, running, now).as_str().into());
                o.insert("running".into(), running.into());
                o.insert("success_rate".into(), success_rate(&a.stats).into());
            }
            v
        })
        .collect())
}

/// The chat sessions (runs marked `session_started`, not deleted), newest first, with their
/// folded state.
pub async fn sessions(store: &dyn EventStore) -> Result<Vec<(RunSummary, RunState)>> {
    let mut out = Vec::new();
    for r in store.list_runs().await? {
        let state = store.replay_run(&r.run_id).await?;
        if state.session.is_some() && !state.deleted {
            out.push((r, state));
        }
    }
    Ok(out)
}

/// The user's turns in a session.
pub fn user_turns(state: &RunState) -> usize {
    state.messages().iter().filter(|m| m.role == Role::User && !m.text().is_empty()).count()
}

/// A session as `session list --json` shows it; `status` is the run's (see
/// `Runtime::run_status`).
pub fn session_row(r: &RunSummary, st: &RunState, status: String) -> Value {
    json!({
        "session_id": r.run_id,
        "title": r.prompt,
        "status": status,
        "provider": r.provider,
        "model": r.model,
        "started_at": r.started_at,
        "updated_at": r.updated_at,
        "messages": st.messages().len(),
        "turns": user_turns(st),
        "compactions": st.compactions,
        "tokens": r.tokens,
        "cost_usd": r.cost_usd,
    })
}

/// Every session as [`session_row`], newest first.
pub async fn session_rows(
    store: &dyn EventStore,
    status: &(dyn Fn(&RunSummary) -> String + Sync),
) -> Result<Vec<Value>> {
    Ok(sessions(store).await?.iter().map(|(r, st)| session_row(r, st, status(r))).collect())
}

/// The providers and their health.
#[derive(Debug, Clone, Default)]
pub struct Providers {
    /// One per provider, as `providers --json` prints it: `name`, `kind`, `model`, `base_url`,
    /// `default`, `configured`, `configuration`, `circuit`, `open_until`, `calls`,
    /// `failures`, `last_error`, `check` (`"ok"`, the failure, or `null` when not checked);
    /// a provider whose settings cannot be resolved is `{name, error}`.
    pub rows: Vec<Value>,
    /// How many checks failed.
    pub failed_checks: usize,
}

/// Every configured provider with its configuration state, circuit breaker and call statistics
/// (from the log); with `check`, each configured one is probed (a network call).
pub async fn providers(rt: &Runtime, store: &dyn EventStore, check: bool) -> Result<Providers> {
    let r = &rt.config.retry;
    let policy = BreakerPolicy {
        failure_threshold: r.breaker_failures.max(1),
        open_for: std::time::Duration::from_secs(r.breaker_open_secs),
    };
    let health = rt.provider_health(store, policy).await?;
    let now = Timestamp::now();
    let default = rt.default_provider();
    let mut out = Providers::default();
    for name in rt.provider_names() {
        let sel = match rt.select(Some(&name), None) {
            Ok(s) => s,
            Err(e) => {
                out.rows.push(json!({"name": name, "error": e.to_string()}));
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
                out.failed_checks += 1;
            }
            Some(result.map_err(|e| e.to_string()))
        } else {
            None
        };
        out.rows.push(json!({
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
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        let mut s = AgentStats::default();
        assert_eq!((recent_rate(&s), success_rate(&s)), (0.0, None));
        s.recent = vec![true, false, true, true];
        assert_eq!(success_rate(&s), Some(0.75));
    }
}
