//! Routing: which registered agent gets a task.
//!
//! An agent is **eligible** for a task when it is enabled, healthy (not cooling down after
//! repeated failures), has every label and capability the task needs (and is the agent the task
//! names, if it names one), and runs fewer tasks than its `max_concurrent`. Among eligible
//! agents the router picks the least busy (fewest running tasks, then the lowest share of its
//! capacity), then the best recent success rate, then the name (so the choice is
//! deterministic). When no agent is eligible, [`route`] says why in words that `task show`
//! prints.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use descartes_protocol::{AgentRecord, AgentStats, AgentStatus, EventData, Task, Timestamp};

use crate::StoreError;

/// The agent registry, kept in the store so every daemon sharing it sees the same agents. Each
/// change is also an event in the agent's stream `agent:<name>`, in the same transaction.
#[async_trait]
pub trait AgentStore: Send + Sync {
    /// Every registered agent, by name.
    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    async fn get_agent(&self, name: &str) -> Result<Option<AgentRecord>, StoreError>;
    /// Inserts or replaces `agent` and appends `event` to `agent:<name>`.
    async fn put_agent(&self, agent: &AgentRecord, event: EventData) -> Result<(), StoreError>;
    /// Removes the agent (true if it was there) and appends `agent_removed`.
    async fn remove_agent(&self, name: &str) -> Result<bool, StoreError>;
    /// Changes an agent in one transaction (read, `change`, write, and an `agent_updated`
    /// event saying `what`), so concurrent updates (two workers recording outcomes) never lose
    /// one. None when there is no such agent.
    async fn update_agent(
        &self,
        name: &str,
        what: &str,
        change: AgentChange,
    ) -> Result<Option<AgentRecord>, StoreError>;
}

/// A change to an agent's record (see [`AgentStore::update_agent`]).
pub type AgentChange = Box<dyn Fn(&mut AgentRecord) + Send + Sync>;

/// The stream of an agent's registration events.
pub fn agent_stream(name: &str) -> String {
    format!("agent:{name}")
}

/// Consecutive failed attempts after which an agent is unhealthy for [`COOL_DOWN`].
pub const UNHEALTHY_AFTER: u32 = 3;
/// How long an unhealthy agent is given nothing.
pub const COOL_DOWN: Duration = Duration::from_secs(300);

/// The status of an agent running `running` tasks now.
pub fn status(agent: &AgentRecord, running: u32, now: Timestamp) -> AgentStatus {
    if agent.disabled {
        AgentStatus::Disabled
    } else if agent.stats.unhealthy_until.is_some_and(|t| t > now) {
        AgentStatus::Unhealthy
    } else if running > 0 {
        AgentStatus::Busy
    } else {
        AgentStatus::Idle
    }
}

/// Why one agent cannot take a task (None: it can).
pub fn ineligible(agent: &AgentRecord, task: &Task, running: u32, now: Timestamp) -> Option<String> {
    let needs = &task.needs;
    if let Some(name) = &needs.agent
        && *name != agent.name
    {
        return Some(format!("the task asks for agent `{name}`"));
    }
    if let Some(l) = needs.labels.iter().find(|l| !agent.labels.contains(l)) {
        return Some(format!("no label `{l}`"));
    }
    if let Some(c) = needs.capabilities.iter().find(|c| !agent.has_capability(c)) {
        return Some(format!("no capability `{c}`"));
    }
    match status(agent, running, now) {
        AgentStatus::Disabled => return Some("disabled".into()),
        AgentStatus::Unhealthy => {
            return Some(format!("unhealthy after {} failed attempts in a row", agent.stats.consecutive_failures));
        }
        _ => {}
    }
    if running >= agent.max_concurrent {
        return Some(format!("at capacity ({running}/{})", agent.max_concurrent));
    }
    None
}

/// The agent that gets `task`, or why none can take it now. `running` counts the tasks each
/// agent holds (missing: none).
pub fn route<'a>(
    task: &Task,
    agents: &'a [AgentRecord],
    running: &HashMap<String, u32>,
    now: Timestamp,
) -> Result<&'a AgentRecord, String> {
    let load = |a: &AgentRecord| running.get(&a.name).copied().unwrap_or(0);
    let mut best: Option<(&AgentRecord, u32)> = None;
    for agent in agents {
        let n = load(agent);
        if ineligible(agent, task, n, now).is_some() {
            continue;
        }
        best = match best {
            Some((b, bn)) if !better(agent, n, b, bn) => Some((b, bn)),
            _ => Some((agent, n)),
        };
    }
    best.map(|(a, _)| a).ok_or_else(|| why_none(task, agents, running, now))
}

/// Whether `a` (running `an`) is a better choice than `b` (running `bn`).
fn better(a: &AgentRecord, an: u32, b: &AgentRecord, bn: u32) -> bool {
    if an != bn {
        return an < bn;
    }
    // Same count: the lower share of capacity, then the better success rate, then the name.
    let share = |n: u32, max: u32| f64::from(n) / f64::from(max.max(1));
    let (sa, sb) = (share(an, a.max_concurrent), share(bn, b.max_concurrent));
    if (sa - sb).abs() > f64::EPSILON {
        return sa < sb;
    }
    let (ra, rb) = (a.stats.success_rate(), b.stats.success_rate());
    if (ra - rb).abs() > f64::EPSILON {
        return ra > rb;
    }
    a.name < b.name
}

/// Why no agent can take `task`, one reason per agent (at most a few), for `task show`.
pub fn why_none(task: &Task, agents: &[AgentRecord], running: &HashMap<String, u32>, now: Timestamp) -> String {
    if agents.is_empty() {
        return "no agent is registered (`descartes ai register`)".into();
    }
    let reasons: Vec<String> = agents
        .iter()
        .filter_map(|a| {
            let n = running.get(&a.name).copied().unwrap_or(0);
            ineligible(a, task, n, now).map(|why| format!("{}: {why}", a.name))
        })
        .collect();
    let shown = reasons.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
    let more = reasons.len().saturating_sub(5);
    let mut out = format!("no eligible agent ({shown}");
    if more > 0 {
        out.push_str(&format!("; and {more} more"));
    }
    out.push(')');
    out
}

/// Records an attempt's outcome in an agent's statistics; repeated failures make it unhealthy
/// for [`COOL_DOWN`], a success makes it healthy again.
pub fn record_outcome(stats: &mut AgentStats, succeeded: bool, now: Timestamp) {
    if succeeded {
        stats.succeeded += 1;
        stats.consecutive_failures = 0;
        stats.unhealthy_until = None;
    } else {
        stats.failed += 1;
        stats.consecutive_failures += 1;
        if stats.consecutive_failures >= UNHEALTHY_AFTER {
            stats.unhealthy_until = Some(now.plus(COOL_DOWN));
        }
    }
    stats.recent.push(succeeded);
    if stats.recent.len() > AgentStats::RECENT {
        let cut = stats.recent.len() - AgentStats::RECENT;
        stats.recent.drain(..cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use descartes_protocol::{Requirements, TaskStatus};

    fn agent(name: &str, labels: &[&str], max: u32) -> AgentRecord {
        AgentRecord {
            name: name.into(),
            backend: "command".into(),
            model: None,
            command: Some("true".into()),
            labels: labels.iter().map(|s| s.to_string()).collect(),
            capabilities: vec![],
            detected: vec!["tools".into()],
            max_concurrent: max,
            disabled: false,
            stats: AgentStats::default(),
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
        }
    }

    fn task(labels: &[&str]) -> Task {
        Task {
            id: "t".into(),
            title: "t".into(),
            prompt: String::new(),
            kind: String::new(),
            priority: 0,
            labels: vec![],
            status: TaskStatus::Queued,
            depends_on: vec![],
            locks: vec![],
            claimed_by: None,
            lease_expires_at: None,
            token: None,
            attempts: 0,
            max_attempts: 3,
            not_before: None,
            result: None,
            error: None,
            blocked_reason: None,
            blocked_by: None,
            needs: Requirements { labels: labels.iter().map(|s| s.to_string()).collect(), ..Default::default() },
            agent: None,
            test_command: None,
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
        }
    }

    #[test]
    fn labels_capabilities_and_names_decide_eligibility() {
        let agents = vec![agent("a", &["rust"], 1), agent("b", &["python"], 1)];
        let none = HashMap::new();
        assert_eq!(route(&task(&["python"]), &agents, &none, Timestamp(0)).unwrap().name, "b");
        let why = route(&task(&["go"]), &agents, &none, Timestamp(0)).unwrap_err();
        assert!(why.contains("a: no label `go`") && why.contains("b: no label `go`"), "{why}");
        let mut t = task(&[]);
        t.needs.capabilities = vec!["tools".into()];
        t.needs.agent = Some("b".into());
        assert_eq!(route(&t, &agents, &none, Timestamp(0)).unwrap().name, "b");
        t.needs.capabilities = vec!["gpu".into()];
        assert!(route(&t, &agents, &none, Timestamp(0)).unwrap_err().contains("no capability `gpu`"));
    }

    #[test]
    fn load_is_spread_and_capacity_respected() {
        let agents = vec![agent("a", &[], 2), agent("b", &[], 2)];
        let mut running = HashMap::new();
        let mut picks = Vec::new();
        for _ in 0..4 {
            let a = route(&task(&[]), &agents, &running, Timestamp(0)).unwrap();
            *running.entry(a.name.clone()).or_insert(0) += 1;
            picks.push(a.name.clone());
        }
        assert_eq!(picks, ["a", "b", "a", "b"]);
        let why = route(&task(&[]), &agents, &running, Timestamp(0)).unwrap_err();
        assert!(why.contains("at capacity (2/2)"), "{why}");
    }

    #[test]
    fn disabled_and_unhealthy_agents_get_nothing_and_success_rate_breaks_ties() {
        let mut agents = vec![agent("a", &[], 1), agent("b", &[], 1), agent("c", &[], 1)];
        agents[0].disabled = true;
        for _ in 0..UNHEALTHY_AFTER {
            record_outcome(&mut agents[1].stats, false, Timestamp(0));
        }
        let none = HashMap::new();
        assert_eq!(route(&task(&[]), &agents, &none, Timestamp(1)).unwrap().name, "c");
        assert_eq!(status(&agents[1], 0, Timestamp(1)), AgentStatus::Unhealthy);
        // After the cool-down it is eligible again, but c's record is better.
        let later = Timestamp(0).plus(COOL_DOWN + Duration::from_secs(1));
        record_outcome(&mut agents[2].stats, true, Timestamp(0));
        assert_eq!(route(&task(&[]), &agents, &none, later).unwrap().name, "c");
        agents.remove(2);
        assert_eq!(route(&task(&[]), &agents, &none, later).unwrap().name, "b");
        let why = route(&task(&[]), &agents, &none, Timestamp(1)).unwrap_err();
        assert!(why.contains("a: disabled") && why.contains("b: unhealthy"), "{why}");
    }

    #[test]
    fn recent_outcomes_are_bounded() {
        let mut s = AgentStats::default();
        for i in 0..50 {
            record_outcome(&mut s, i % 2 == 0, Timestamp(0));
        }
        assert_eq!(s.recent.len(), AgentStats::RECENT);
        assert_eq!((s.succeeded, s.failed), (25, 25));
    }
}
