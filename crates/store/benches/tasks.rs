//! Task queue throughput on SQLite (`cargo bench -p descartes-store --bench tasks`): durable
//! claim + complete per second, one task per claim and batched, with 1 and 4 workers.
//! `DESCARTES_BENCH_ONLY=single|batched` runs one kind of case; `DESCARTES_BENCH_PRIORITIES`
//! sets how many priority levels the tasks are spread over (default 7).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use descartes_core::TaskStore;
use descartes_protocol::NewTask;
use descartes_store::{SqliteEventStore, SqliteOptions, SyncMode};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Priority levels the tasks are spread over (`DESCARTES_BENCH_PRIORITIES`, default 7): with
/// one level, tasks are claimed in the order they were created (neighbours on disk); with
/// several, each claim takes tasks spread over the table.
fn priorities() -> usize {
    std::env::var("DESCARTES_BENCH_PRIORITIES").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(7)
}

async fn fill(store: &SqliteEventStore, n: usize) {
    let mut pending = Vec::new();
    for i in 0..n {
        pending.push(store.create_task(NewTask {
            title: format!("task {i}"),
            priority: (i % priorities()) as i32,
            ..Default::default()
        }));
        if pending.len() == 256 {
            for r in futures::future::join_all(pending.drain(..)).await {
                r.unwrap();
            }
        }
    }
    for r in futures::future::join_all(pending).await {
        r.unwrap();
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // `DESCARTES_BENCH_ONLY=batched|single` runs one kind of case.
    let only = std::env::var("DESCARTES_BENCH_ONLY").unwrap_or_default();
    for (workers, batch, n) in [(1usize, 1usize, 2000usize), (4, 1, 4000), (1, 64, 20_000), (4, 64, 40_000)] {
        if (only == "batched" && batch == 1) || (only == "single" && batch > 1) {
            continue;
        }
        let path = dir.path().join(format!("tasks-{workers}-{batch}.db"));
        let store = Arc::new(SqliteEventStore::open(&path, SqliteOptions { sync: SyncMode::Full }).unwrap());
        rt.block_on(fill(&store, n));
        let t = Instant::now();
        let done: usize = rt.block_on(async {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let mut done = 0;
                        loop {
                            let claims = store.claim(&format!("w{w}"), Duration::from_secs(60), batch).await.unwrap();
                            if claims.is_empty() {
                                break done;
                            }
                            // A batch is completed in one operation (one commit).
                            let items = claims.iter().map(|c| (c.task.id.clone(), c.token, None)).collect();
                            for r in store.complete_many(items).await.unwrap() {
                                r.unwrap();
                                done += 1;
                            }
                        }
                    })
                })
                .collect();
            let mut total = 0;
            for h in handles {
                total += h.await.unwrap();
            }
            total
        });
        let elapsed = t.elapsed();
        assert_eq!(done, n);
        println!(
            "sqlite, durable, {workers} worker(s), {batch} task(s) per claim: {n} claim+complete in {elapsed:?} = {:.0}/s",
            n as f64 / elapsed.as_secs_f64()
        );
    }
}
