//! Tool-call dispatch overhead (`cargo bench -p descartes-tools --bench dispatch`).
//!
//! A no-op tool whose schema looks like a real tool's, in a registry beside the built-ins. One
//! iteration is what the agent loop does around a call: registry lookup, argument validation,
//! the `tool_call_started` / `tool_call_completed` payloads built and serialized, and (second
//! measurement) the whole `ToolRegistry::execute` (validation, timeout wrapper, statistics).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use descartes_core::{Tool, ToolContext, ToolOutput};
use descartes_protocol::{RunId, ToolCallCompleted, ToolCallStarted, ToolSpec};
use descartes_tools::{ToolLimits, builtin_registry};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const ITERATIONS: usize = 100_000;

struct Noop;

#[async_trait]
impl Tool for Noop {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "noop".into(),
            description: "does nothing".into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "minLength": 1},
                    "offset": {"type": "integer", "minimum": 1},
                    "limit": {"type": "integer", "minimum": 1},
                    "mode": {"enum": ["a", "b", "c"]},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}}
                },
                "required": ["path"],
                "additionalProperties": false
            }),
        }
    }
    fn read_only(&self) -> bool {
        true
    }
    fn idempotent(&self) -> bool {
        true
    }
    fn timeout(&self) -> Option<Duration> {
        Some(Duration::from_secs(60))
    }
    async fn call(&self, _input: Value, _ctx: &ToolContext) -> ToolOutput {
        ToolOutput::ok("ok")
    }
}

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

fn main() {
    let mut registry = builtin_registry(&ToolLimits::default());
    registry.register(Arc::new(Noop));
    let input =
        json!({"path": "src/main.rs", "offset": 10, "limit": 50, "mode": "b", "headers": {"accept": "text/plain"}});
    let ctx = ToolContext {
        cwd: std::env::temp_dir(),
        run_id: RunId::from("bench"),
        call_id: "call".into(),
        spool_dir: std::env::temp_dir().join("spool"),
        cancel: CancellationToken::new(),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

    let mut dispatch = Vec::with_capacity(ITERATIONS);
    let mut execute = Vec::with_capacity(ITERATIONS);
    rt.block_on(async {
        for i in 0..ITERATIONS + 1000 {
            let t = Instant::now();
            let tool = registry.get("noop").unwrap();
            registry.validate("noop", &input).unwrap();
            let started = ToolCallStarted {
                call_id: "call".into(),
                tool: "noop".into(),
                input: input.clone(),
                idempotent: tool.idempotent(),
                executed_by: None,
                not_run: false,
            };
            let started = serde_json::to_string(&started).unwrap();
            let output = tool.call(input.clone(), &ctx).await;
            let completed = ToolCallCompleted {
                call_id: "call".into(),
                tool: "noop".into(),
                output: output.content,
                is_error: output.is_error,
                duration_ms: 0,
                details: output.details,
                recovered: false,
            };
            let completed = serde_json::to_string(&completed).unwrap();
            let elapsed = t.elapsed();
            std::hint::black_box((started, completed));
            if i >= 1000 {
                dispatch.push(elapsed);
            }

            let t = Instant::now();
            let out = registry.execute("noop", input.clone(), &ctx).await;
            let elapsed = t.elapsed();
            assert!(!out.is_error);
            if i >= 1000 {
                execute.push(elapsed);
            }
        }
    });
    report("lookup+validate+call+payloads", dispatch);
    report("ToolRegistry::execute", execute);
    let s = registry.stats()["noop"];
    println!("stats: calls={} errors={} avg={:?}", s.calls, s.errors, s.avg());
}
