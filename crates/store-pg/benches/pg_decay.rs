//! Sustained task throughput on PostgreSQL: 4 workers claim and complete one task per claim,
//! durable, while a producer keeps the queue filled, for `DESCARTES_BENCH_SECONDS` (default
//! 600); prints the throughput of every minute and the decay from the first to the last.
//!
//! `DESCARTES_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench -p descartes-store-pg --bench pg_decay`
//!
//! Every task is updated several times, so the tasks table needs vacuuming: PostgreSQL's
//! autovacuum does it (on by default), and a store that finds autovacuum off vacuums the task
//! tables itself (see the `maintenance` module). `DESCARTES_BENCH_VACUUM_SECS` (default 0:
//! none) makes this benchmark run `VACUUM (ANALYZE) tasks` every so many seconds on top.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use descartes_core::{TaskFilter, TaskStore};
use descartes_protocol::{NewTask, TaskStatus};
use descartes_store_pg::PgOptions;
use descartes_store_pg::testing::TestDb;

fn main() {
    let seconds: u64 = std::env::var("DESCARTES_BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(600);
    let interval = Duration::from_secs(60.min(seconds.max(1)));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let Some(db) = TestDb::create() else { return };
        let store = Arc::new(db.store_with(PgOptions { synchronous_commit: true, pool_size: 8, ..PgOptions::default() }).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        // Producer: keep about 2,000 tasks queued (created minus done, without querying).
        let producer = {
            let (store, stop, done) = (store.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let queued = i.saturating_sub(done.load(Ordering::Relaxed));
                    if queued < 2000 {
                        let batch: Vec<_> = (0..500)
                            .map(|k| store.create_task(NewTask { title: format!("t{}", i + k), ..Default::default() }))
                            .collect();
                        for r in futures::future::join_all(batch).await {
                            r.unwrap();
                        }
                        i += 500;
                    } else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            })
        };
        // Wait for a first fill.
        while store.list_tasks(&TaskFilter { status: Some(TaskStatus::Queued), label: None }).await.unwrap().len() < 1000 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (store, stop, done) = (store.clone(), stop.clone(), done.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let claims = store.claim(&format!("w{w}"), Duration::from_secs(60), 1).await.unwrap();
                        if claims.is_empty() {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        }
                        for c in claims {
                            store.complete(&c.task.id, c.token, None).await.unwrap();
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        let vacuum_every: u64 =
            std::env::var("DESCARTES_BENCH_VACUUM_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        let vacuum = (vacuum_every > 0).then(|| {
            let stop = stop.clone();
            let url = db.url().to_owned();
            std::thread::spawn(move || {
                let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(vacuum_every));
                    client.batch_execute("VACUUM (ANALYZE) tasks").unwrap();
                }
            })
        });
        let start = Instant::now();
        let mut rates = Vec::new();
        let mut last = 0;
        while start.elapsed() < Duration::from_secs(seconds) {
            tokio::time::sleep(interval).await;
            let now = done.load(Ordering::Relaxed);
            let rate = (now - last) as f64 / interval.as_secs_f64();
            last = now;
            println!("minute {}: {rate:.0} claim+complete/s", rates.len() + 1);
            rates.push(rate);
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.await.unwrap();
        }
        producer.await.unwrap();
        if let Some(v) = vacuum {
            let _ = v.join();
        }
        if let (Some(first), Some(last)) = (rates.first(), rates.last()) {
            println!(
                "postgres, durable, 4 workers, 1 task per claim, {seconds} s, vacuum every {vacuum_every} s: first interval {first:.0}/s, last {last:.0}/s, decay {:.1}%",
                (1.0 - last / first) * 100.0
            );
        }
    });
}
