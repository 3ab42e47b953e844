//! The same behaviour checked on every event store implementation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use descartes_core::EventStore;
use descartes_protocol::*;
use descartes_store::{MemoryEventStore, SqliteEventStore, SqliteOptions, SyncMode};

fn started(prompt: &str) -> RunStarted {
    RunStarted {
        prompt: prompt.into(),
        provider: "openai".into(),
        model: "m".into(),
        cwd: "/".into(),
        max_turns: 5,
        auto_approve: false,
        system_prompt: None,
        tools: vec![],
        pid: 1,
        version: "t".into(),
    }
}

fn msg(run: &RunId, text: &str) -> NewEvent {
    NewEvent::new(run, MessageAdded { message: Message::user_text(text), model_call_id: None })
}

struct Fixture {
    store: Arc<dyn EventStore>,
    _dir: Option<tempfile::TempDir>,
}

fn stores() -> Vec<(&'static str, Fixture)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteEventStore::open(&dir.path().join("e.db"), SqliteOptions { sync: SyncMode::Normal }).unwrap();
    vec![
        ("memory", Fixture { store: Arc::new(MemoryEventStore::new()), _dir: None }),
        ("sqlite", Fixture { store: Arc::new(sqlite), _dir: Some(dir) }),
    ]
}

#[tokio::test]
async fn seq_is_global_and_reads_filter_by_run_and_cursor() {
    for (name, f) in stores() {
        let s = &f.store;
        let (a, b) = (RunId::from("a"), RunId::from("b"));
        let w1 = s.append(vec![NewEvent::new(&a, started("pa")), msg(&a, "1")]).await.unwrap();
        let w2 = s.append(vec![NewEvent::new(&b, started("pb")), msg(&a, "2")]).await.unwrap();
        let seqs: Vec<_> = w1.iter().chain(&w2).map(|e| e.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{name}: {seqs:?}");
        let run_a = s.read_run(&a, 0).await.unwrap();
        assert_eq!(run_a.len(), 3, "{name}");
        assert!(run_a.iter().all(|e| e.run_id == a));
        let after = s.read_run(&a, run_a[0].seq).await.unwrap();
        assert_eq!(after.len(), 2, "{name}");
        let all = s.read_all(seqs[1], 10).await.unwrap();
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs[2..].to_vec(), "{name}");
        assert_eq!(s.read_all(0, 2).await.unwrap().len(), 2, "{name}: limit");
        assert_eq!(s.last_seq().await.unwrap(), seqs[3], "{name}");
        // Round trip of the payload.
        assert_eq!(run_a[1].data, w1[1].data, "{name}");
    }
}

#[tokio::test]
async fn idempotency_keys_append_once() {
    for (name, f) in stores() {
        let s = &f.store;
        let r = RunId::from("r");
        let first = s.append(vec![msg(&r, "x").with_key("k1")]).await.unwrap();
        let again = s.append(vec![msg(&r, "y").with_key("k1"), msg(&r, "z")]).await.unwrap();
        assert_eq!(again[0].seq, first[0].seq, "{name}: same event returned");
        assert_eq!(again[0].data, first[0].data, "{name}");
        assert_eq!(s.read_run(&r, 0).await.unwrap().len(), 2, "{name}");
    }
}

#[tokio::test]
async fn deferred_events_keep_their_place_and_get_written() {
    for (name, f) in stores() {
        let s = &f.store;
        let r = RunId::from("r");
        let deferred = s.append_deferred(vec![msg(&r, "first")]);
        let durable = s.append(vec![msg(&r, "second")]).await.unwrap();
        let deferred = deferred.await.unwrap();
        assert!(deferred[0].seq < durable[0].seq, "{name}");
        // A deferred append alone is written within a few milliseconds.
        let alone = s.append_deferred(vec![msg(&r, "third")]);
        let written = tokio::time::timeout(Duration::from_secs(2), alone).await.unwrap().unwrap();
        assert!(written[0].seq > durable[0].seq, "{name}");
        assert_eq!(s.read_run(&r, 0).await.unwrap().len(), 3, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appenders_get_unique_increasing_seqs() {
    for (name, f) in stores() {
        let mut tasks = Vec::new();
        for i in 0..64 {
            let s = f.store.clone();
            tasks.push(tokio::spawn(async move {
                let run = RunId::from(format!("r{i}"));
                let mut seqs = Vec::new();
                for j in 0..20 {
                    let e = s.append(vec![msg(&run, &j.to_string())]).await.unwrap();
                    seqs.push(e[0].seq);
                }
                seqs
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            let seqs = t.await.unwrap();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{name}: per appender order");
            all.extend(seqs);
        }
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 64 * 20, "{name}: every seq unique");
        let log = f.store.read_all(0, 10_000).await.unwrap();
        assert_eq!(log.len(), 64 * 20, "{name}");
        assert!(log.windows(2).all(|w| w[0].seq < w[1].seq), "{name}");
    }
}

/// Enough events that some runs' events are found through the bulk run index and the rest by
/// the recent tail; reads by run and replays must see each event once, in order.
#[tokio::test]
async fn reads_by_run_span_the_index_and_the_tail() {
    for (name, f) in stores() {
        let s = &f.store;
        let runs: Vec<RunId> = (0..3).map(|i| RunId::from(format!("run{i}"))).collect();
        for r in &runs {
            s.append(vec![NewEvent::new(r, started("p"))]).await.unwrap();
        }
        let mut expected: Vec<Vec<Seq>> = vec![Vec::new(); 3];
        for i in 0..(descartes_store::INDEX_LAG as usize * 2 + 300) {
            let r = i % 3;
            let batch =
                if i % 7 == 0 { vec![msg(&runs[r], "a"), msg(&runs[r], "b")] } else { vec![msg(&runs[r], "c")] };
            for e in s.append(batch).await.unwrap() {
                expected[r].push(e.seq);
            }
        }
        for (r, run) in runs.iter().enumerate() {
            let got: Vec<Seq> = s.read_run(run, 0).await.unwrap().iter().skip(1).map(|e| e.seq).collect();
            assert_eq!(got, expected[r], "{name}: run {r}");
            let cursor = expected[r][expected[r].len() / 2];
            let after: Vec<Seq> = s.read_run(run, cursor).await.unwrap().iter().map(|e| e.seq).collect();
            assert_eq!(after, expected[r].iter().copied().filter(|&q| q > cursor).collect::<Vec<_>>(), "{name}");
            let state = s.replay_run(run).await.unwrap();
            assert_eq!(state.events, expected[r].len() + 1, "{name}");
        }
    }
}

#[tokio::test]
async fn runs_projection_follows_lifecycle() {
    for (name, f) in stores() {
        let s = &f.store;
        let (a, b) = (RunId::from("01aaa"), RunId::from("01abb"));
        s.append(vec![NewEvent::new(&a, started("first goal"))]).await.unwrap();
        s.append(vec![NewEvent::new(&b, started("second goal"))]).await.unwrap();
        s.append(vec![NewEvent::new(&a, RunFailed { error: "x".into(), kind: "provider".into(), retryable: true })])
            .await
            .unwrap();
        let runs = s.list_runs().await.unwrap();
        assert_eq!(runs.len(), 2, "{name}");
        let ra = runs.iter().find(|r| r.run_id == a).unwrap();
        assert_eq!((ra.status.as_str(), ra.prompt.as_str()), ("failed", "first goal"), "{name}");
        assert_eq!(runs.iter().find(|r| r.run_id == b).unwrap().status, "running", "{name}");
        assert_eq!(s.find_runs("01a").await.unwrap().len(), 2, "{name}");
        assert_eq!(s.find_runs("01ab").await.unwrap(), vec![b.clone()], "{name}");
        assert!(s.find_runs("zz").await.unwrap().is_empty(), "{name}");
    }
}

#[tokio::test]
async fn followers_are_woken_by_appends() {
    for (name, f) in stores() {
        let s = f.store.clone();
        let last = s.last_seq().await.unwrap();
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move {
                let t = std::time::Instant::now();
                s.wait_for_events(last, Duration::from_secs(5)).await;
                t.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.append(vec![msg(&RunId::from("r"), "wake")]).await.unwrap();
        let waited = waiter.await.unwrap();
        assert!(waited < Duration::from_secs(1), "{name}: woke after {waited:?}");
    }
}

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
    assert_eq!(conn.0, 2, "user_version: every migration ran once");
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
    descartes_test_support::task_suite::run_all(|clock| async move {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqliteEventStore::open(&dir.path().join("t.db"), SqliteOptions { sync: SyncMode::Normal })
                .unwrap()
                .with_clock(clock.clone()),
        );
        descartes_test_support::task_suite::Stores { tasks: store.clone(), events: store, clock, guard: Box::new(dir) }
    })
    .await;
}

fn sqlite_stores(clock: Arc<descartes_core::testing::ManualClock>) -> descartes_test_support::task_suite::Stores {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteEventStore::open(&dir.path().join("p.db"), SqliteOptions { sync: SyncMode::Normal })
            .unwrap()
            .with_clock(clock.clone()),
    );
    descartes_test_support::task_suite::Stores { tasks: store.clone(), events: store, clock, guard: Box::new(dir) }
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
