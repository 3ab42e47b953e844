//! Task throughput on PostgreSQL: 4 workers claiming and completing, one task per claim and
//! batches of 32, with durable commits (`synchronous_commit = on`) and without.
//!
//! `DESCARTES_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench -p descartes-store-pg --bench pg_tasks`
//!
//! Without that variable a throwaway cluster is started (with `fsync=off`, so "durable" figures
//! from it are not). `DESCARTES_BENCH_TASKS` sets the number of tasks per run (default 3000);
//! `DESCARTES_BENCH_ONLY=single` runs only the durable one-task-per-claim case, `single-no-flush`
//! the same without WAL flushes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use descartes_core::{EventStore, TaskStore};
use descartes_protocol::NewTask;
use descartes_store_pg::testing::TestDb;
use descartes_store_pg::{PgOptions, PgStore};

static WORKERS_VAR: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Workers (`DESCARTES_BENCH_WORKERS`, default 4).
fn workers() -> usize {
    *WORKERS_VAR.get_or_init(|| std::env::var("DESCARTES_BENCH_WORKERS").ok().and_then(|v| v.parse().ok()).unwrap_or(4))
}

/// Priority levels the tasks are spread over (`DESCARTES_BENCH_PRIORITIES`, default 3).
fn priorities() -> usize {
    std::env::var("DESCARTES_BENCH_PRIORITIES").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(3)
}

fn pct(sorted: &[Duration], p: f64) -> String {
    if sorted.is_empty() {
        return "-".into();
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    format!("{:.2} ms", sorted[i].as_secs_f64() * 1e3)
}

async fn fill(db: &TestDb, n: usize) {
    let s = Arc::new(db.store().unwrap());
    let mut hs = Vec::new();
    for w in 0..workers() {
        let s = s.clone();
        hs.push(tokio::spawn(async move {
            for i in (w..n).step_by(workers()) {
                s.create_task(NewTask {
                    title: format!("t{i}"),
                    priority: (i % priorities()) as i32,
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        }));
    }
    for h in hs {
        h.await.unwrap();
    }
}

async fn run(durable: bool, batch: usize, many: bool, n: usize) {
    let Some(db) = TestDb::create() else { return };
    fill(&db, n).await;
    let store = Arc::new(
        db.store_with(PgOptions { synchronous_commit: durable, pool_size: workers() + 2, ..PgOptions::default() })
            .unwrap(),
    );
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut hs = Vec::new();
    for w in 0..workers() {
        let (s, done) = (store.clone(), done.clone());
        hs.push(tokio::spawn(async move {
            let (mut claims_t, mut completes_t) = (Vec::new(), Vec::new());
            let worker = format!("w{w}");
            while done.load(Ordering::Relaxed) < n {
                let t = Instant::now();
                let claims = s.claim(&worker, Duration::from_secs(60), batch).await.unwrap();
                claims_t.push(t.elapsed());
                if claims.is_empty() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                if many {
                    let t = Instant::now();
                    let k = claims.len();
                    let items = claims.into_iter().map(|c| (c.task.id, c.token, None)).collect();
                    let results = s.complete_many(items).await.unwrap();
                    assert!(results.iter().all(|r| r.is_ok()));
                    completes_t.push(t.elapsed());
                    done.fetch_add(k, Ordering::Relaxed);
                    continue;
                }
                for c in claims {
                    let t = Instant::now();
                    s.complete(&c.task.id, c.token, None).await.unwrap();
                    completes_t.push(t.elapsed());
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            (claims_t, completes_t)
        }));
    }
    let (mut claims_t, mut completes_t) = (Vec::new(), Vec::new());
    for h in hs {
        let (a, b) = h.await.unwrap();
        claims_t.extend(a);
        completes_t.extend(b);
    }
    let elapsed = start.elapsed();
    claims_t.sort();
    completes_t.sort();
    let events = store.last_seq().await.unwrap();
    println!(
        "{:<9} {:>2} per claim{}: {n} tasks in {:.2} s = {:>6.0} claim+complete/s   claim p50 {} p99 {}   complete p50 {} p99 {}   ({} events)",
        if durable { "durable" } else { "no-flush" },
        batch,
        if many { ", complete_many" } else { ", complete each " },
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        pct(&claims_t, 0.5),
        pct(&claims_t, 0.99),
        pct(&completes_t, 0.5),
        pct(&completes_t, 0.99),
        events,
    );
    drop(store);
}

/// Appends of single events by 4 concurrent appenders (the event writer's group commit).
async fn appends(durable: bool, n: usize) {
    let Some(db) = TestDb::create() else { return };
    let store: Arc<PgStore> =
        Arc::new(db.store_with(PgOptions { synchronous_commit: durable, ..PgOptions::default() }).unwrap());
    let start = Instant::now();
    let mut hs = Vec::new();
    for w in 0..workers() * 4 {
        let s = store.clone();
        hs.push(tokio::spawn(async move {
            let run = descartes_protocol::RunId::from(format!("r{w}"));
            for i in 0..n / (workers() * 4) {
                let e = descartes_protocol::NewEvent::new(
                    &run,
                    descartes_protocol::MessageAdded {
                        message: descartes_protocol::Message::user_text(format!("m{i}")),
                        model_call_id: None,
                    },
                );
                s.append(vec![e]).await.unwrap();
            }
        }));
    }
    for h in hs {
        h.await.unwrap();
    }
    let elapsed = start.elapsed();
    println!(
        "{:<9} event appends, 16 appenders: {n} in {:.2} s = {:.0}/s",
        if durable { "durable" } else { "no-flush" },
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
}

fn main() {
    let n: usize = std::env::var("DESCARTES_BENCH_TASKS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    rt.block_on(async {
        match descartes_store_pg::testing::admin_url() {
            Ok(url) => println!("PostgreSQL: {}", descartes_store_pg::redact_url(&url)),
            Err(e) => {
                println!("no PostgreSQL: {e}");
                return;
            }
        }
        println!("{} workers, each claim then complete (one transaction each)", workers());
        if std::env::var("DESCARTES_BENCH_ONLY").is_ok_and(|v| v == "single") {
            // Only the durable one-task-per-claim run (`DESCARTES_BENCH_ONLY=single`).
            run(true, 1, false, n).await;
            return;
        }
        if std::env::var("DESCARTES_BENCH_ONLY").is_ok_and(|v| v == "single-no-flush") {
            // Only the one-task-per-claim run without WAL flushes: the bound flushes set.
            run(false, 1, false, n).await;
            return;
        }
        run(true, 1, false, n).await;
        run(true, 32, false, n).await;
        run(true, 32, true, n * 4).await;
        run(false, 1, false, n).await;
        run(false, 32, false, n).await;
        run(false, 32, true, n * 4).await;
        appends(true, n * 2).await;
    });
}
