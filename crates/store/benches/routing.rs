//! Routing decisions (`cargo bench -p descartes-store --bench routing`): with 1,000 registered
//! agents and 100,000 queued tasks on SQLite, the time to pick the next task and its agent, the
//! way the executor does it (the queue's head, the agents' load, the router), and to claim it
//! for that agent.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use descartes_core::routing::{self, AgentStore};
use descartes_core::{Clock, SystemClock, TaskStore};
use descartes_protocol::{AgentRecord, AgentRegistered, AgentStats, NewTask, Requirements, Timestamp};
use descartes_store::{SqliteEventStore, SqliteOptions, SyncMode};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const AGENTS: usize = 1000;
const TASKS: usize = 100_000;
const LABELS: [&str; 8] = ["rust", "python", "go", "docs", "web", "db", "infra", "ml"];

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = Arc::new(
        SqliteEventStore::open(&dir.path().join("routing.db"), SqliteOptions { sync: SyncMode::Normal }).unwrap(),
    );
    rt.block_on(async {
        for i in 0..AGENTS {
            let a = AgentRecord {
                name: format!("agent-{i:04}"),
                backend: "command".into(),
                model: None,
                command: Some("true".into()),
                labels: vec![LABELS[i % LABELS.len()].into(), LABELS[(i / 8) % LABELS.len()].into()],
                capabilities: vec![],
                detected: vec![],
                max_concurrent: 4,
                disabled: i % 10 == 0,
                stats: AgentStats::default(),
                created_at: Timestamp::now(),
                updated_at: Timestamp::now(),
            };
            store.put_agent(&a, AgentRegistered { agent: a.clone() }.into()).await.unwrap();
        }
        let mut pending = Vec::new();
        for i in 0..TASKS {
            let needs = Requirements { labels: vec![LABELS[i % LABELS.len()].into()], ..Default::default() };
            pending.push(store.create_task(NewTask {
                title: format!("task {i}"),
                priority: (i % 7) as i32,
                needs,
                ..Default::default()
            }));
            if pending.len() == 512 {
                for r in futures::future::join_all(pending.drain(..)).await {
                    r.unwrap();
                }
            }
        }
        for r in futures::future::join_all(pending).await {
            r.unwrap();
        }
    });
    let agents = rt.block_on(store.list_agents()).unwrap();
    assert_eq!(agents.len(), AGENTS);

    // One decision: the queue's head, the load, the router (the executor's claim_next).
    let mut decide = Vec::new();
    let mut claim = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        let (task, agent) = rt.block_on(async {
            let load = store.agent_load().await.unwrap();
            let queue = store.peek_queued(32).await.unwrap();
            let now = SystemClock.now();
            queue
                .into_iter()
                .find_map(|t| routing::route(&t, &agents, &load, now).ok().cloned().map(|a| (t, a)))
                .unwrap()
        });
        decide.push(t.elapsed());
        let t = Instant::now();
        let c = rt
            .block_on(store.claim_one(
                &task.id,
                "bench",
                Duration::from_secs(600),
                Some((&agent.name, agent.max_concurrent)),
            ))
            .unwrap()
            .unwrap();
        claim.push(t.elapsed());
        rt.block_on(store.complete(&c.task.id, c.token, None)).unwrap();
    }
    // The router alone, over the 1,000 agents.
    let task = rt.block_on(store.peek_queued(1)).unwrap().remove(0);
    let load = rt.block_on(store.agent_load()).unwrap();
    let mut route = Vec::new();
    for _ in 0..5000 {
        let t = Instant::now();
        std::hint::black_box(routing::route(&task, &agents, &load, SystemClock.now()).ok());
        route.push(t.elapsed());
    }
    println!(
        "routing, {AGENTS} agents, {TASKS} queued tasks: decision (head + load + route) p50 {:?} p99 {:?}; \
         claim_one p50 {:?}; router alone p50 {:?}",
        pct(&mut decide, 0.5),
        pct(&mut decide, 0.99),
        pct(&mut claim, 0.5),
        pct(&mut route, 0.5),
    );
}
