//! Two daemons on one real PostgreSQL database (a fresh database per test) execute 1,000
//! tasks: every task runs exactly once; and with one daemon killed by SIGKILL halfway, every
//! task still finishes and only the tasks that daemon held at the kill run a second time.
//! Skipped loudly when no PostgreSQL can be had (`.ci/run` makes sure one is).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::BIN;
use descartes_core::{EventStore, TaskFilter, TaskStore};
use descartes_protocol::{NewTask, TaskStatus};
use descartes_store_pg::testing::TestDb;

const TASKS: usize = 1000;

fn daemon(dir: &Path, url: &str, out: &Path) -> Child {
    std::fs::create_dir_all(dir).unwrap();
    Command::new(BIN)
        .args(["daemon", "start", "--foreground", "--workers", "4", "--lease-ttl", "2s", "--grace", "1s"])
        .arg("--command")
        .arg(format!("echo \"$DESCARTES_TASK_ID\" >> {}", out.display()))
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("DESCARTES_HOME", dir)
        .env("DESCARTES_DATABASE_URL", url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn runs_per_task(out: &Path) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for line in std::fs::read_to_string(out).unwrap_or_default().lines() {
        *m.entry(line.trim().to_owned()).or_default() += 1;
    }
    m
}

async fn completions_per_task(store: &dyn EventStore) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    let mut cursor = 0;
    loop {
        let batch = store.read_all(cursor, 10_000).await.unwrap();
        if batch.is_empty() {
            return m;
        }
        for e in &batch {
            cursor = e.seq;
            if e.kind() == "task_completed" {
                *m.entry(e.run_id.to_string()).or_default() += 1;
            }
        }
    }
}

async fn wait_all_done(store: &dyn TaskStore, timeout: Duration) {
    let t = Instant::now();
    loop {
        let done = store.list_tasks(&TaskFilter { status: Some(TaskStatus::Done), label: None }).await.unwrap().len();
        if done == TASKS {
            return;
        }
        assert!(t.elapsed() < timeout, "only {done}/{TASKS} tasks done after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Setup {
    _db: TestDb,
    dir: tempfile::TempDir,
    store: std::sync::Arc<descartes_store_pg::PgStore>,
    url: String,
    out: PathBuf,
}

async fn setup() -> Option<Setup> {
    let db = tokio::task::spawn_blocking(TestDb::create).await.unwrap()?;
    let url = db.url().to_owned();
    let store = {
        let db_url = url.clone();
        std::sync::Arc::new(
            tokio::task::spawn_blocking(move || descartes_store_pg::PgStore::connect(&db_url)).await.unwrap().unwrap(),
        )
    };
    let futures: Vec<_> =
        (0..TASKS).map(|i| store.create_task(NewTask { title: format!("t{i}"), ..Default::default() })).collect();
    for r in futures::future::join_all(futures).await {
        r.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.txt");
    Some(Setup { _db: db, dir, store, url, out })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_run_every_task_exactly_once() {
    let Some(s) = setup().await else { return };
    let mut a = daemon(&s.dir.path().join("a"), &s.url, &s.out);
    let mut b = daemon(&s.dir.path().join("b"), &s.url, &s.out);
    wait_all_done(&*s.store, Duration::from_secs(120)).await;
    for d in [&a, &b] {
        common::signal(d, "TERM");
    }
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success(), "graceful exit");
    let runs = runs_per_task(&s.out);
    assert_eq!(runs.len(), TASKS, "every task ran");
    assert!(
        runs.values().all(|&n| n == 1),
        "a task ran twice: {:?}",
        runs.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    let done = completions_per_task(&*s.store).await;
    assert_eq!(done.len(), TASKS);
    assert!(done.values().all(|&n| n == 1));
    // Both daemons did work: the claims name workers of two daemons (`HOST-PID/wN`).
    let mut daemons = BTreeSet::new();
    for e in s.store.read_all(0, 1_000_000).await.unwrap() {
        if let descartes_protocol::EventData::TaskClaimed(c) = &e.data {
            daemons.insert(c.worker.split('/').next().unwrap_or_default().to_owned());
        }
    }
    assert_eq!(daemons.len(), 2, "{daemons:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemons_tasks_are_taken_over_and_only_they_run_twice() {
    let Some(s) = setup().await else { return };
    let mut a = daemon(&s.dir.path().join("a"), &s.url, &s.out);
    let mut b = daemon(&s.dir.path().join("b"), &s.url, &s.out);
    // Halfway, kill daemon A without warning.
    let t = Instant::now();
    while runs_per_task(&s.out).len() < TASKS / 2 {
        assert!(t.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a_pid = a.id();
    a.kill().unwrap();
    a.wait().unwrap();
    // What A held at the kill (its workers are named `HOST-PID/wN`).
    let held: BTreeSet<String> = s
        .store
        .list_tasks(&TaskFilter::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.status.is_leased() && t.claimed_by.as_deref().is_some_and(|w| w.contains(&format!("-{a_pid}/"))))
        .map(|t| t.id)
        .collect();
    wait_all_done(&*s.store, Duration::from_secs(120)).await;
    common::signal(&b, "TERM");
    assert!(b.wait().unwrap().success());
    let runs = runs_per_task(&s.out);
    assert_eq!(runs.len(), TASKS, "every task ran");
    let twice: BTreeSet<String> = runs.iter().filter(|(_, n)| **n > 1).map(|(id, _)| id.clone()).collect();
    assert!(runs.values().all(|&n| n <= 2));
    assert!(
        twice.is_subset(&held),
        "ran twice without being held by the killed daemon: {:?}",
        twice.difference(&held).collect::<Vec<_>>()
    );
    let done = completions_per_task(&*s.store).await;
    assert_eq!(done.len(), TASKS);
    assert!(done.values().all(|&n| n == 1), "completed once each");
    eprintln!("killed daemon held {} tasks; {} ran twice", held.len(), twice.len());
}

/// The database goes away under a running daemon (every connection to it is terminated by the
/// server, repeatedly, for a while) and comes back: the daemon retries, nothing is lost, and
/// no task runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_survives_the_database_going_away() {
    let Some(s) = setup().await else { return };
    let mut d = daemon(&s.dir.path().join("a"), &s.url, &s.out);
    let t = Instant::now();
    while runs_per_task(&s.out).len() < TASKS / 10 {
        assert!(t.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // For about a second, terminate every other connection to this database every 50 ms.
    let mut terminated = 0;
    for _ in 0..20 {
        terminated += s
            ._db
            .with_client(|c| {
                c.query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .map(|rows| rows.len())
                .unwrap_or(0)
            })
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(terminated > 0, "the daemon's connections were cut");
    wait_all_done(&*s.store, Duration::from_secs(120)).await;
    common::signal(&d, "TERM");
    assert!(d.wait().unwrap().success(), "the daemon kept running and stopped gracefully");
    let runs = runs_per_task(&s.out);
    assert_eq!(runs.len(), TASKS, "every task ran");
    let done = completions_per_task(&*s.store).await;
    assert!(done.values().all(|&n| n == 1) && done.len() == TASKS);
    assert!(runs.values().all(|&n| n <= 2));
    let twice = runs.values().filter(|&&n| n > 1).count();
    eprintln!(
        "{terminated} connections terminated; {twice} tasks ran twice (their completion was lost with a connection)"
    );
}
