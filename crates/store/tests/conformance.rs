//! The same behaviour checked on every event store implementation: the shared suite of
//! `descartes_test_support::event_suite` on the memory and SQLite stores, and what only SQLite
//! has (a file: reopening, migrations, append-only triggers, corruption), plus the shared task
//! suite on SQLite.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use descartes_protocol::*;
use descartes_store::{MemoryEventStore, SqliteEventStore, SqliteOptions, SyncMode};
use descartes_test_support::event_suite::{self, EventStores, msg, started};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_event_store_conformance() {
    event_suite::run_all(|| async { EventStores { store: Arc::new(MemoryEventStore::new()), guard: Box::new(()) } })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_event_store_conformance() {
    event_suite::run_all(|| async {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteEventStore::open(&dir.path().join("e.db"), SqliteOptions { sync: SyncMode::Normal }).unwrap();
        EventStores { store: Arc::new(store), guard: Box::new(dir) }
    })
    .await;
}

// The shared suite's long runs must span SQLite's run index and its tail.
const _: () = assert!(event_suite::LONG_RUN_APPENDS >= descartes_store::INDEX_LAG as usize * 2 + 300);

#[test]
fn sqlite_persists_across_reopen_and_migrations_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/e.db");
    let r = RunId::from("r");
    {
        let s = SqliteEventStore::open(&path, SqliteOptions::default()).unwrap();
        s.append_blocking(vec![NewEvent::new(&r, started("p")), msg(&r, "hello")]).unwrap();
    }
    let s = SqliteEventStore::open(&path, SqliteOptions::default()).unwrap();
    let s2 = SqliteEventStore::open(&path, SqliteOptions::default()).unwrap();
    let events = s.read_run_blocking(&r, 0).unwrap();
    assert_eq!(events.len(), 2);
    let more = s2.append_blocking(vec![msg(&r, "from another handle")]).unwrap();
    assert_eq!(more[0].seq, 3);
    let conn = rusqlite_check(&path);
    assert_eq!(conn.0, 5, "user_version: every migration ran once");
    assert!(conn.1.contains("append-only"), "update refused: {}", conn.1);
}

/// (user_version, error of an UPDATE on events)
fn rusqlite_check(path: &std::path::Path) -> (i64, String) {
    let c = rusqlite::Connection::open(path).unwrap();
    let v: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    let e = match c.execute("UPDATE events SET data = '{}'", []) {
        Ok(_) => "none".to_owned(),
        Err(e) => e.to_string(),
    };
    let d = match c.execute("DELETE FROM events", []) {
        Ok(_) => "none".to_owned(),
        Err(e) => e.to_string(),
    };
    assert!(d.contains("append-only"), "delete refused: {d}");
    (v, e)
}

#[test]
fn corrupt_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.db");
    std::fs::write(&path, b"this is not a database, just text that is long enough to be read").unwrap();
    let err = SqliteEventStore::open(&path, SqliteOptions::default()).err().unwrap().to_string();
    assert!(err.contains("bad.db"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_task_store_follows_the_rules() {
    descartes_test_support::task_suite::run_all(|clock| async move { sqlite_stores(clock) }).await;
}

fn sqlite_stores(clock: Arc<descartes_core::testing::ManualClock>) -> descartes_test_support::task_suite::Stores {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteEventStore::open(&dir.path().join("p.db"), SqliteOptions { sync: SyncMode::Normal })
            .unwrap()
            .with_clock(clock.clone()),
    );
    descartes_test_support::task_suite::Stores {
        tasks: store.clone(),
        events: store.clone(),
        agents: store.clone(),
        audit: store,
        clock,
        guard: Box::new(dir),
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]
    #[test]
    fn sqlite_random_interleavings_keep_leases_exclusive(ops in descartes_test_support::task_suite::ops()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let clock = Arc::new(descartes_core::testing::ManualClock::new(Timestamp(1_800_000_000_000_000)));
            let s = sqlite_stores(clock);
            descartes_test_support::task_suite::check_interleaving(&s, &ops).await;
        });
    }
}

/// New task rows are numbered by priority band, so the tasks a claim takes sit together on disk
/// whatever the mix of priorities; rows from before (plain rowids) keep working beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_task_rows_are_placed_by_priority_band() {
    use descartes_core::TaskStore;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    // A row as an older version wrote it: a plain rowid.
    {
        let s = SqliteEventStore::open(&path, SqliteOptions { sync: SyncMode::Normal }).unwrap();
        s.create_task(NewTask { title: "old".into(), priority: 5, ..Default::default() }).await.unwrap();
    }
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute("UPDATE tasks SET rowid = 1 WHERE data->>'title' = 'old'", []).unwrap();
    }
    let s = SqliteEventStore::open(&path, SqliteOptions { sync: SyncMode::Normal }).unwrap();
    let mut made = Vec::new();
    for i in 0..30 {
        let priority = [1, 5, i32::MAX, i32::MIN, -3][i % 5];
        made.push(s.create_task(NewTask { title: format!("t{i}"), priority, ..Default::default() }).await.unwrap());
    }
    s.close();
    let c = rusqlite::Connection::open(&path).unwrap();
    let rows: Vec<(i64, i32, String)> = c
        .prepare("SELECT rowid, priority, data->>'title' FROM tasks ORDER BY rowid")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 31);
    assert_eq!(rows[0], (1, 5, "old".to_owned()), "the old row keeps its place");
    // In rowid order: highest priority first, each priority's tasks together and in creation
    // order.
    let prios: Vec<i32> = rows[1..].iter().map(|r| r.1).collect();
    let mut expected: Vec<i32> = prios.clone();
    expected.sort_by(|a, b| b.cmp(a));
    assert_eq!(prios, expected, "{rows:?}");
    for p in [1, 5, i32::MAX, i32::MIN, -3] {
        let titles: Vec<usize> = rows[1..].iter().filter(|r| r.1 == p).map(|r| r.2[1..].parse().unwrap()).collect();
        assert!(titles.windows(2).all(|w| w[0] < w[1]), "priority {p}: {titles:?}");
        assert_eq!(titles.len(), 6);
    }
    // The tasks still read and claim in queue order.
    let s = SqliteEventStore::open(&path, SqliteOptions { sync: SyncMode::Normal }).unwrap();
    let claims = s.claim("w", std::time::Duration::from_secs(30), 40).await.unwrap();
    let order: Vec<i32> = claims.iter().map(|c| c.task.priority).collect();
    let mut sorted = order.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(order, sorted);
    assert_eq!(claims.len(), 31);
    assert_eq!(s.get_task(&made[0].id).await.unwrap().status, TaskStatus::Claimed);
}
