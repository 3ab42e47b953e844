//! Event log benchmarks (`cargo bench -p descartes-store --bench event_log`).
//!
//! Prints, in order: durable sequential append latency, group-commit throughput with 64
//! concurrent appenders, fold of a 1,000,000-event run, and resuming a typical run.
//! Results are recorded in docs/PERFORMANCE.md. The database lives under the target
//! directory, on the same disk as the project (not a tmpfs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

// The same allocator as the `descartes` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::{Duration, Instant};

use descartes_core::EventStore;
use descartes_protocol::*;
use descartes_store::{SqliteEventStore, SqliteOptions, SyncMode};
use serde_json::json;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name}: n={} p50={:?} p90={:?} p99={:?} max={:?}",
        samples.len(),
        pct(&samples, 0.5),
        pct(&samples, 0.9),
        pct(&samples, 0.99),
        samples[samples.len() - 1]
    );
}

fn started() -> RunStarted {
    RunStarted {
        prompt: "fix the flaky test".into(),
        provider: "openai".into(),
        model: "gpt-4o-mini".into(),
        cwd: "/work".into(),
        max_turns: 1_000_000,
        auto_approve: true,
        system_prompt: None,
        tools: vec!["shell".into()],
        pid: 1,
        version: "bench".into(),
        budget: Default::default(),
    }
}

/// The events of one agent step (model call asking for a tool, the tool call), as a run has them.
fn step(run: &RunId, i: usize) -> Vec<NewEvent> {
    let call = format!("call_{i}");
    vec![
        NewEvent::new(
            run,
            ModelCallStarted { call_id: format!("m{i}"), provider: "openai".into(), model: "m".into(), turn: i as u32 },
        ),
        NewEvent::new(
            run,
            ModelCallCompleted {
                call_id: format!("m{i}"),
                usage: Usage { input_tokens: 1200, output_tokens: 40, ..Default::default() },
                cost_usd: None,
                stop_reason: Some("tool_calls".into()),
                duration_ms: 900,
            },
        ),
        NewEvent::new(
            run,
            MessageAdded {
                message: Message::new(
                    Role::Assistant,
                    vec![
                        ContentPart::text("Let me look at the test output."),
                        ContentPart::ToolUse {
                            id: call.clone(),
                            name: "shell".into(),
                            input: json!({"command": "cargo test -p foo"}),
                        },
                    ],
                ),
                model_call_id: Some(format!("m{i}")),
            },
        ),
        NewEvent::new(
            run,
            PermissionDecided {
                call_id: Some(call.clone()),
                tool: "shell".into(),
                decision: Decision::Allow,
                scope: DecisionScope::Once,
                rule: "flag:--yes".into(),
                actor: "flag".into(),
                reason: "-y".into(),
                file: None,
                line: None,
            },
        ),
        NewEvent::new(
            run,
            ToolCallStarted {
                call_id: call.clone(),
                tool: "shell".into(),
                input: json!({"command": "cargo test -p foo"}),
                idempotent: false,
                executed_by: None,
                not_run: false,
            },
        ),
        NewEvent::new(
            run,
            ToolCallCompleted {
                call_id: call,
                tool: "shell".into(),
                output: "exit code: 0\nstdout:\ntest result: ok. 12 passed".into(),
                is_error: false,
                duration_ms: 1500,
                details: Some(json!({"exit_code": 0})),
                recovered: false,
            },
        ),
    ]
}

fn main() {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();

    if wants("append") {
        // 1. Durable append, one event per call, sequential (fresh fsync regime: the first ~2,000 flushes).
        let store = SqliteEventStore::open(&dir.path().join("seq.db"), SqliteOptions { sync: SyncMode::Full }).unwrap();
        let run = RunId::generate();
        store.append_blocking(vec![NewEvent::new(&run, started())]).unwrap();
        for i in 0..100 {
            store.append_blocking(vec![NewEvent::new(&run, RunCancelled { reason: format!("warmup {i}") })]).unwrap();
        }
        let mut samples = Vec::new();
        for i in 0..2000 {
            let e = NewEvent::new(
                &run,
                MessageAdded { message: Message::user_text(format!("message {i}")), model_call_id: None },
            );
            let t = Instant::now();
            store.append_blocking(vec![e]).unwrap();
            samples.push(t.elapsed());
        }
        report("durable append, 1 event/call, sequential", samples);
    }

    if wants("group") {
        // 2. Group commit: 64 concurrent appenders (tokio tasks), each on its own run, durable.
        // Once with one event per call, once with four (what the agent loop commits per step).
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        for per_call in [1usize, 4] {
            let store = Arc::new(
                SqliteEventStore::open(
                    &dir.path().join(format!("group{per_call}.db")),
                    SqliteOptions { sync: SyncMode::Full },
                )
                .unwrap(),
            );
            let calls = 4000 / per_call;
            let t = Instant::now();
            rt.block_on(async {
                let tasks: Vec<_> = (0..64)
                    .map(|i| {
                        let store = store.clone();
                        tokio::spawn(async move {
                            let run = RunId::from(format!("run{i}"));
                            for j in 0..calls {
                                let events = (0..per_call)
                                    .map(|k| {
                                        let text = format!("m{j}.{k}");
                                        NewEvent::new(
                                            &run,
                                            MessageAdded { message: Message::user_text(text), model_call_id: None },
                                        )
                                    })
                                    .collect();
                                store.append(events).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
            });
            let elapsed = t.elapsed();
            let n = 64 * calls * per_call;
            println!(
                "group commit, 64 appenders, {per_call} event(s)/call, durable: {n} events in {elapsed:?} = {:.0} events/s",
                n as f64 / elapsed.as_secs_f64()
            );
        }
    }

    if wants("replay") || wants("resume") {
        // 3. Replay (fold) of a run with 1,000,000 events, and resume of a typical run beside it.
        let path = dir.path().join("big.db");
        let store = SqliteEventStore::open(&path, SqliteOptions { sync: SyncMode::Normal }).unwrap();
        let big = RunId::generate();
        store
            .append_blocking(vec![
                NewEvent::new(&big, started()),
                NewEvent::new(&big, MessageAdded { message: Message::user_text("go"), model_call_id: None }),
            ])
            .unwrap();
        let mut total = 2;
        let mut i = 0;
        while total < 1_000_000 {
            let mut batch = Vec::new();
            while batch.len() < 6000 && total + batch.len() < 1_000_000 {
                batch.extend(step(&big, i));
                i += 1;
            }
            batch.truncate(1_000_000 - total);
            total += batch.len();
            store.append_blocking(batch).unwrap();
        }
        let typical = RunId::generate();
        let mut events = vec![
            NewEvent::new(&typical, started()),
            NewEvent::new(&typical, MessageAdded { message: Message::user_text("fix it"), model_call_id: None }),
        ];
        for i in 0..10 {
            events.extend(step(&typical, i));
        }
        store.append_blocking(events).unwrap();
        store.close();
        drop(store);

        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let store = SqliteEventStore::open(&path, SqliteOptions { sync: SyncMode::Full }).unwrap();
        let mut samples = Vec::new();
        for pass in 0..6 {
            let t = Instant::now();
            let state = rt.block_on(store.replay_run(&big)).unwrap();
            if pass == 0 {
                println!("  replay, first (cold heap) pass: {:?}", t.elapsed());
                continue;
            }
            let all = t.elapsed();
            assert_eq!(state.events, 1_000_000);
            println!(
                "  replay pass: {all:?} ({} tool calls, {} messages)",
                state.tool_calls.len(),
                state.messages().len()
            );
            samples.push(all);
        }
        report("replay (read + fold) of a 1,000,000-event run", samples);
        if wants("breakdown") {
            let c = rusqlite::Connection::open(&path).unwrap();
            let t = Instant::now();
            let mut stmt = c.prepare("SELECT seq, type, data FROM events WHERE run_id = ?1 ORDER BY seq").unwrap();
            let mut rows = stmt.query([big.as_str()]).unwrap();
            let mut bytes = 0usize;
            let mut parsed = Vec::new();
            while let Some(row) = rows.next().unwrap() {
                let k = row.get_ref(1).unwrap().as_str().unwrap();
                let d = row.get_ref(2).unwrap().as_str().unwrap();
                bytes += d.len();
                parsed.push((k.to_owned(), d.to_owned()));
            }
            let sql = t.elapsed();
            let t = Instant::now();
            let mut n = 0;
            let mut typed = Vec::with_capacity(parsed.len());
            for (i, (k, d)) in parsed.iter().enumerate() {
                let v = EventData::from_parts(k, d).unwrap();
                n += v.kind().len();
                typed.push((i as i64 + 1, v));
            }
            let parse = t.elapsed();
            let t = Instant::now();
            let mut state = descartes_core::RunState::new(big.clone());
            for (seq, d) in typed {
                state.apply_owned(seq, d);
            }
            let fold = t.elapsed();
            let t = Instant::now();
            drop(state);
            println!(
                "  breakdown: sql {sql:?} ({bytes} bytes), typed parse {parse:?} ({n}), fold {fold:?}, drop {:?}",
                t.elapsed()
            );
        }
        drop(store);

        let mut samples = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            let store = SqliteEventStore::open(&path, SqliteOptions { sync: SyncMode::Full }).unwrap();
            let state = rt.block_on(store.replay_run(&typical)).unwrap();
            samples.push(t.elapsed());
            assert_eq!(state.events, 62);
            store.close();
        }
        report("resume of a typical run (open store + read + fold, 62 events, 1M-event log)", samples);
    }
}
