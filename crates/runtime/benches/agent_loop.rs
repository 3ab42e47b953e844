//! Agent-loop overhead per step (`cargo bench -p descartes-runtime --bench agent_loop`).
//!
//! A run of 10,000 steps against an in-process instant model: each step is one model call that
//! asks for a no-op tool, and that tool call, with every event written to a durable SQLite log
//! (fsync per commit). The time of a step is the time between two consecutive model calls, so it
//! is everything Descartes does per step: recording, folding, permission, tool dispatch, request
//! building. Results go in docs/PERFORMANCE.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use descartes_core::agent::{NullSink, goal_message};
use descartes_core::permission::NoPrompter;
use descartes_core::testing::{Scripted, ScriptedProvider};
use descartes_core::{Agent, AgentConfig, RunOutcome, Tool, ToolContext, ToolOutput, ToolRegistry};
use descartes_protocol::{RunId, ToolSpec};
use descartes_store::{SqliteEventStore, SqliteOptions, SyncMode};
use serde_json::{Value, json};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const STEPS: usize = 10_000;

struct Noop;

#[async_trait]
impl Tool for Noop {
    fn spec(&self) -> ToolSpec {
        ToolSpec { name: "noop".into(), description: "does nothing".into(), input_schema: json!({"type": "object"}) }
    }
    fn read_only(&self) -> bool {
        true
    }
    fn idempotent(&self) -> bool {
        true
    }
    async fn call(&self, _input: Value, _ctx: &ToolContext) -> ToolOutput {
        ToolOutput::ok("ok")
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn window(steps: &[Duration], from: usize, to: usize) -> String {
    let mut w = steps[from..to.min(steps.len())].to_vec();
    w.sort();
    format!("p50={:?} p99={:?} max={:?}", pct(&w, 0.5), pct(&w, 0.99), w[w.len() - 1])
}

fn main() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store =
        Arc::new(SqliteEventStore::open(&dir.path().join("loop.db"), SqliteOptions { sync: SyncMode::Full }).unwrap());
    let times = Arc::new(Mutex::new(Vec::with_capacity(STEPS + 1)));
    let provider = {
        let times = times.clone();
        ScriptedProvider::unrecorded(move |_req, n| {
            times.lock().unwrap().push(Instant::now());
            if n < STEPS {
                Scripted::ToolCall(format!("call_{n}"), "noop".into(), "{}".into())
            } else {
                Scripted::Text("done".into())
            }
        })
    };
    let mut tools = ToolRegistry::new();
    tools.register(Arc::new(Noop));
    let agent = Agent {
        store,
        provider: Arc::new(provider),
        tools,
        prompter: Arc::new(NoPrompter),
        sink: Arc::new(NullSink),
        cancel: Default::default(),
        tool_specs: Default::default(),
        resilience: Default::default(),
        policy: Default::default(),
        gate: None,
        config: AgentConfig {
            provider: "scripted".into(),
            model: "instant".into(),
            max_turns: (STEPS + 10) as u32,
            auto_approve: false,
            system_prompt: None,
            max_tokens: None,
            cwd: dir.path().to_owned(),
            spool_root: dir.path().join("spool"),
            budget: Default::default(),
        },
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let t = Instant::now();
    let outcome = rt.block_on(agent.start(RunId::generate(), "bench".into(), goal_message("bench", None))).unwrap();
    let total = t.elapsed();
    assert_eq!(outcome, RunOutcome::Completed { result: "done".into() });
    let times = times.lock().unwrap();
    let steps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    println!("agent loop, {STEPS} steps (model call + no-op tool call), durable events: total {total:?}");
    println!("  steps 10..110:      {}", window(&steps, 10, 110));
    println!("  steps 1000..1100:   {}", window(&steps, 1000, 1100));
    println!("  steps 9900..10000:  {}", window(&steps, 9900, 10000));
    println!("  steps 10..10000:    {}", window(&steps, 10, 10000));
}
