//! The task store on PostgreSQL: the shared suite of `descartes_test_support::task_suite`, and
//! what only a shared database has to withstand: several workers and several stores (processes)
//! claiming at once, and operations racing each other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use descartes_core::testing::ManualClock;
use descartes_core::{EventStore, TaskError, TaskFilter, TaskStore};
use descartes_protocol::{NewTask, TaskStatus, Timestamp};
use descartes_store_pg::PgStore;
use descartes_store_pg::testing::TestDb;
use descartes_test_support::task_suite::{self, Stores};

macro_rules! test_db {
    () => {
        match TestDb::create() {
            Some(db) => db,
            None => return,
        }
    };
}

fn new(title: &str) -> NewTask {
    NewTask { title: title.into(), ..Default::default() }
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(Timestamp(1_800_000_000_000_000)))
}

fn store(db: &TestDb, clock: &Arc<ManualClock>) -> Arc<PgStore> {
    Arc::new(db.store().unwrap().with_clock(clock.clone()))
}

const TTL: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_task_suite() {
    drop(test_db!());
    task_suite::run_all(|clock| async move {
        let db = TestDb::create().expect("a test database");
        let s = Arc::new(db.store().unwrap().with_clock(clock.clone()));
        Stores { tasks: s.clone(), events: s.clone(), agents: s.clone(), audit: s, clock, guard: Box::new(db) }
    })
    .await;
}

/// How many `task_completed` events each task has in the log.
async fn completions(events: &dyn EventStore) -> BTreeMap<String, usize> {
    let mut completed = BTreeMap::new();
    let mut cursor = 0;
    loop {
        let batch = events.read_all(cursor, 10_000).await.unwrap();
        let Some(last) = batch.last() else { break };
        cursor = last.seq;
        for e in &batch {
            if e.kind() == "task_completed" {
                *completed.entry(e.run_id.to_string()).or_default() += 1;
            }
        }
    }
    completed
}

/// Workers claim and complete until every task is done; returns each worker's count.
async fn work(stores: &[Arc<PgStore>], workers: usize, batch: impl Fn(usize) -> usize, total: usize) -> Vec<usize> {
    let done = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for w in 0..workers {
        let s = stores[w % stores.len()].clone();
        let (done, max) = (done.clone(), batch(w));
        handles.push(tokio::spawn(async move {
            let mut mine = 0;
            while done.load(Ordering::SeqCst) < total {
                let claims = s.claim(&format!("w{w}"), TTL, max).await.unwrap();
                if claims.is_empty() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                for c in claims {
                    s.complete(&c.task.id, c.token, None).await.unwrap();
                    done.fetch_add(1, Ordering::SeqCst);
                    mine += 1;
                }
            }
            mine
        }));
    }
    let mut counts = Vec::new();
    for h in handles {
        counts.push(h.await.unwrap());
    }
    counts
}

/// Four workers (on two stores: two processes) share 500 tasks: each is done exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_workers_do_every_task_exactly_once() {
    let db = test_db!();
    let c = clock();
    let stores = [store(&db, &c), store(&db, &c)];
    let n = 500;
    for i in 0..n {
        stores[i % 2].create_task(NewTask { priority: (i % 5) as i32, ..new(&format!("t{i}")) }).await.unwrap();
    }
    let counts = work(&stores, 4, |_| 1, n).await;
    assert_eq!(counts.iter().sum::<usize>(), n);
    assert!(counts.iter().all(|&c| c > 0), "every worker got work: {counts:?}");
    let completed = completions(&*stores[0]).await;
    assert_eq!(completed.len(), n);
    assert!(completed.values().all(|&c| c == 1), "a task completed twice");
    let done = stores[1].list_tasks(&TaskFilter { status: Some(TaskStatus::Done), label: None }).await.unwrap();
    assert_eq!(done.len(), n);
    assert!(done.iter().all(|t| t.attempts == 1));
}

/// Batched claims of different sizes from two stores: distinct tasks, unique tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_claims_from_two_stores_never_overlap() {
    let db = test_db!();
    let c = clock();
    let stores = [store(&db, &c), store(&db, &c)];
    let n = 600;
    for i in 0..n {
        stores[0].create_task(new(&format!("t{i}"))).await.unwrap();
    }
    let mut handles = Vec::new();
    for w in 0..4 {
        let s = stores[w % 2].clone();
        handles.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let claims = s.claim(&format!("w{w}"), TTL, [1, 7, 16, 32][w]).await.unwrap();
                if claims.is_empty() {
                    break got;
                }
                got.extend(claims.into_iter().map(|c| (c.task.id, c.token)));
            }
        }));
    }
    let mut ids = BTreeSet::new();
    let mut tokens = BTreeSet::new();
    for h in handles {
        for (id, token) in h.await.unwrap() {
            assert!(ids.insert(id), "a task was claimed twice");
            assert!(tokens.insert(token), "a token was handed out twice");
        }
    }
    assert_eq!(ids.len(), n);
}

/// Tasks with overlapping path locks are never held at once, however many claimers race.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn path_locks_hold_under_concurrent_claimers() {
    let db = test_db!();
    let c = clock();
    let stores = [store(&db, &c), store(&db, &c)];
    let n = 120;
    for i in 0..n {
        let locks = match i % 3 {
            0 => vec!["src/**".to_owned()],
            1 => vec!["src/a.rs".to_owned()],
            _ => vec![],
        };
        stores[i % 2].create_task(NewTask { locks, ..new(&format!("t{i}")) }).await.unwrap();
    }
    let holders = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for w in 0..4 {
        let s = stores[w % 2].clone();
        let (holders, most, done) = (holders.clone(), most.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            while done.load(Ordering::SeqCst) < n {
                let claims = s.claim(&format!("w{w}"), TTL, 1 + w % 2).await.unwrap();
                if claims.is_empty() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                for c in &claims {
                    if !c.task.locks.is_empty() {
                        let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_micros(300)).await;
                for c in claims {
                    if !c.task.locks.is_empty() {
                        holders.fetch_sub(1, Ordering::SeqCst);
                    }
                    s.complete(&c.task.id, c.token, None).await.unwrap();
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(most.load(Ordering::SeqCst), 1, "two tasks with overlapping locks were held at once");
    assert_eq!(completions(&*stores[0]).await.len(), n);
}

/// A dependency failing for good while a task depending on it is created: the new task must
/// end up blocked, never queued behind a failed dependency.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creating_a_dependent_races_its_dependency_failing() {
    let db = test_db!();
    let c = clock();
    let (s1, s2) = (store(&db, &c), store(&db, &c));
    for i in 0..25 {
        let dep =
            s1.create_task(NewTask { max_attempts: Some(1), priority: 100, ..new(&format!("d{i}")) }).await.unwrap();
        let claim = s1.claim("w", TTL, 1).await.unwrap().pop().unwrap();
        assert_eq!(claim.task.id, dep.id);
        let fail = {
            let s1 = s1.clone();
            let id = dep.id.clone();
            tokio::spawn(async move { s1.fail(&id, claim.token, "boom").await.unwrap() })
        };
        let create = {
            let s2 = s2.clone();
            let id = dep.id.clone();
            tokio::spawn(
                async move { s2.create_task(NewTask { depends_on: vec![id], ..new("dependent") }).await.unwrap() },
            )
        };
        let (failed, created) = (fail.await.unwrap(), create.await.unwrap());
        assert_eq!(failed.status, TaskStatus::Failed);
        let now = s1.get_task(&created.id).await.unwrap();
        assert_eq!(now.status, TaskStatus::Blocked, "round {i}: {now:?}");
        assert_eq!(now.blocked_by.as_deref(), Some(dep.id.as_str()));
    }
}

/// Two edges that together would make a cycle, added at once from two stores: one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_dependency_edges_cannot_make_a_cycle() {
    let db = test_db!();
    let c = clock();
    let (s1, s2) = (store(&db, &c), store(&db, &c));
    for _ in 0..20 {
        let a = s1.create_task(new("A")).await.unwrap();
        let b = s1.create_task(new("B")).await.unwrap();
        let (x, y) = tokio::join!(s1.add_dependency(&a.id, &b.id), s2.add_dependency(&b.id, &a.id));
        let refused = [&x, &y].iter().filter(|r| matches!(r, Err(TaskError::Cycle(_)))).count();
        assert_eq!(refused, 1, "{x:?} {y:?}");
    }
}

/// Workers completing their tasks while another machine, whose clock runs ahead, reaps the
/// same leases as expired: each task is either completed or taken back, never both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completions_racing_a_takeover() {
    let db = test_db!();
    let (c1, c2) = (clock(), clock());
    c2.advance(Duration::from_secs(10));
    let (s1, s2) = (store(&db, &c1), store(&db, &c2));
    let n = 200;
    for i in 0..n {
        s1.create_task(new(&format!("t{i}"))).await.unwrap();
    }
    let claims = s1.claim("slow", Duration::from_secs(5), n).await.unwrap();
    assert_eq!(claims.len(), n);
    let mut finishing = Vec::new();
    for part in claims.chunks(n / 4) {
        let (s1, part) = (s1.clone(), part.to_vec());
        finishing.push(tokio::spawn(async move {
            let mut ok = 0;
            for cl in part {
                match s1.complete(&cl.task.id, cl.token, None).await {
                    Ok(_) => ok += 1,
                    // Taken back first: queued again, so this worker's token is stale.
                    Err(TaskError::StaleToken { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            ok
        }));
    }
    let mut reaped = 0;
    while !finishing.iter().all(|f| f.is_finished()) {
        reaped += s2.reap_expired().await.unwrap().len();
    }
    let mut ok = 0;
    for f in finishing {
        ok += f.await.unwrap();
    }
    reaped += s2.reap_expired().await.unwrap().len();
    assert_eq!(ok + reaped, n, "each task either completed ({ok}) or was taken back ({reaped}), never both");
    let tasks = s1.list_tasks(&TaskFilter::default()).await.unwrap();
    assert_eq!(tasks.iter().filter(|t| t.status == TaskStatus::Done).count(), ok);
    assert_eq!(completions(&*s1).await.len(), ok);
}

/// Batched completion: one transaction; each task's refusal in its place, the others done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_many_completes_each_leased_task() {
    let db = test_db!();
    let c = clock();
    let s = store(&db, &c);
    for i in 0..40 {
        s.create_task(new(&format!("t{i}"))).await.unwrap();
    }
    let claims = s.claim("w", TTL, 40).await.unwrap();
    assert_eq!(claims.len(), 40);
    let mut items: Vec<(String, i64, Option<String>)> =
        claims.iter().map(|c| (c.task.id.clone(), c.token, Some(format!("r{}", c.token)))).collect();
    items[3].1 -= 1_000; // a stale token
    items.push(("nope".into(), 1, None));
    let results = s.complete_many(items.clone()).await.unwrap();
    assert_eq!(results.len(), 41);
    assert!(matches!(results[3], Err(TaskError::StaleToken { .. })), "{:?}", results[3]);
    assert!(matches!(results[40], Err(TaskError::NotFound(_))));
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 39);
    for (r, (id, token, result)) in results.iter().zip(&items).take(40) {
        if let Ok(t) = r {
            assert_eq!((&t.id, t.status, &t.result), (id, TaskStatus::Done, result));
            assert_eq!(t.token, Some(*token));
        }
    }
    let done = s.list_tasks(&TaskFilter { status: Some(TaskStatus::Done), label: None }).await.unwrap();
    assert_eq!(done.len(), 39);
    let completed = completions(&*s).await;
    assert_eq!(completed.len(), 39);
    // The events are in the log in order, with dense seqs.
    let log = s.read_all(0, 10_000).await.unwrap();
    assert!(log.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    // Again: all refused now (done), nothing changes.
    let again = s.complete_many(items[..5].to_vec()).await.unwrap();
    assert!(
        again.iter().all(|r| matches!(r, Err(TaskError::IllegalTransition { .. }) | Err(TaskError::StaleToken { .. })))
    );
    assert_eq!(s.last_seq().await.unwrap(), log.last().unwrap().seq);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]
    /// The shared random interleavings of claim, heartbeat, complete, fail, expiry and reaping.
    #[test]
    fn random_interleavings_keep_leases_exclusive(ops in task_suite::ops()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let db = test_db!();
            let clock = clock();
            let s = Arc::new(db.store().unwrap().with_clock(clock.clone()));
            let stores = Stores { tasks: s.clone(), events: s.clone(), agents: s.clone(), audit: s, clock, guard: Box::new(db) };
            task_suite::check_interleaving(&stores, &ops).await;
        });
    }
}
