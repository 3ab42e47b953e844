//! The event store on PostgreSQL: the shared suite of `descartes_test_support::event_suite`
//! (also run on the memory and SQLite stores), plus what only a shared server has: several
//! stores (processes) on one database, commit-order seqs seen by a follower, migrations run by
//! concurrent openers, bad URLs, absent servers and lost connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use descartes_core::{EventStore, StoreError};
use descartes_protocol::*;
use descartes_store_pg::testing::TestDb;
use descartes_store_pg::{PgOptions, PgStore};
use descartes_test_support::event_suite::{self, EventStores, msg, started};

/// A fresh database, or return from the test (after a loud warning) when there is none.
macro_rules! test_db {
    () => {
        match TestDb::create() {
            Some(db) => db,
            None => return,
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shared_event_suite() {
    drop(test_db!());
    event_suite::run_all(|| async {
        let db = TestDb::create().expect("a test database");
        EventStores { store: Arc::new(db.store().unwrap()), guard: Box::new(db) }
    })
    .await;
}

/// Concurrent appends of one key from two stores (two processes): one event, and no gap left
/// in the seqs by the refused duplicate.
#[tokio::test]
async fn idempotency_keys_append_once_across_stores() {
    let db = test_db!();
    let (s, s2) = (db.store().unwrap(), db.store().unwrap());
    let r = RunId::from("r");
    s.append(vec![msg(&r, "before")]).await.unwrap();
    let (x, y) =
        tokio::join!(s.append(vec![msg(&r, "c1").with_key("k3")]), s2.append(vec![msg(&r, "c2").with_key("k3")]));
    assert_eq!(x.unwrap()[0].seq, y.unwrap()[0].seq);
    assert_eq!(s.read_run(&r, 0).await.unwrap().len(), 2);
    s2.append(vec![msg(&r, "after")]).await.unwrap();
    let seqs: Vec<Seq> = s.read_all(0, 100).await.unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3], "no gaps left by refused duplicates");
}

/// The suite's concurrent appenders, on two stores on one database: two processes, each with
/// its own writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appenders_on_two_stores_get_unique_increasing_seqs() {
    let db = test_db!();
    let stores: [Arc<dyn EventStore>; 2] = [Arc::new(db.store().unwrap()), Arc::new(db.store().unwrap())];
    event_suite::concurrent_appenders_get_unique_increasing_seqs(&stores).await;
}

/// A follower reading "after cursor" while many transactions append concurrently (from two
/// stores) must end up having seen every event: no event may become visible with a seq lower
/// than one already read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_never_misses_an_event() {
    let db = test_db!();
    let stores = [Arc::new(db.store().unwrap()), Arc::new(db.store().unwrap())];
    let follower = Arc::new(db.store().unwrap());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (f, done) = (follower.clone(), done.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut cursor = 0;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                let batch = f.read_all(cursor, 1000).await.unwrap();
                for e in &batch {
                    assert!(e.seq > cursor);
                    cursor = e.seq;
                    seen.push(e.seq);
                }
                if batch.is_empty() {
                    if finished {
                        break seen;
                    }
                    f.wait_for_events(cursor, Duration::from_millis(5)).await;
                }
            }
        })
    };
    let mut writers = Vec::new();
    for i in 0..16 {
        let s = stores[i % 2].clone();
        writers.push(tokio::spawn(async move {
            let run = RunId::from(format!("w{i}"));
            for j in 0..40 {
                let batch = (0..(j % 3 + 1)).map(|k| msg(&run, &format!("{j}.{k}"))).collect();
                s.append(batch).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = reader.await.unwrap();
    let log: Vec<Seq> = follower.read_all(0, 100_000).await.unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(seen, log, "the follower saw the whole log, in order");
}

#[tokio::test]
async fn durable_appends_survive_reopen_and_migrations_are_idempotent() {
    let db = test_db!();
    let r = RunId::from("r");
    {
        // Durable commits (synchronous_commit on); kept small.
        let s = db.store_with(PgOptions::default()).unwrap();
        s.append(vec![NewEvent::new(&r, started("p")), msg(&r, "hello")]).await.unwrap();
    }
    // Several processes opening at once: migrations run once, nobody fails.
    let url = db.url().to_owned();
    let opened: Vec<_> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..4).map(|_| sc.spawn(|| PgStore::connect(&url))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let stores: Vec<PgStore> = opened.into_iter().map(|s| s.unwrap()).collect();
    assert_eq!(stores[0].read_run(&r, 0).await.unwrap().len(), 2);
    let more = stores[1].append(vec![msg(&r, "from another handle")]).await.unwrap();
    assert_eq!(more[0].seq, 3);
    let (versions, update, delete, truncate) = db
        .with_client(|c| {
            let versions: i64 = c.query_one("SELECT COUNT(*) FROM descartes_migrations", &[]).unwrap().get(0);
            let mut err =
                |sql: &str| c.batch_execute(sql).err().map(|e| format!("{e:?}")).unwrap_or_else(|| "none".into());
            (versions, err("UPDATE events SET data = '{}'"), err("DELETE FROM events"), err("TRUNCATE events"))
        })
        .unwrap();
    assert_eq!(versions, 7, "every migration (there are 7) ran once");
    for e in [update, delete, truncate] {
        assert!(e.contains("append-only"), "refused: {e}");
    }
    assert_eq!(stores[0].read_all(0, 10).await.unwrap().len(), 3);
}

#[tokio::test]
async fn bad_urls_and_absent_servers_are_clear_errors() {
    let err = PgStore::connect("postgres://me:hunter2@localhost:notaport/db").err().unwrap();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    assert!(text.contains("invalid PostgreSQL URL") && !text.contains("hunter2"), "{text}");
    // Nothing listens on this port (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://me:hunter2@127.0.0.1:{port}/db?connect_timeout=2");
    let err = PgStore::connect(&url).err().unwrap();
    let text = err.to_string();
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains(&format!("postgres://me@127.0.0.1:{port}/db")), "{text}");
    assert!(text.contains("check that the server is running"), "{text}");
}

#[tokio::test]
async fn wrong_database_is_an_open_error() {
    let db = test_db!();
    let url = descartes_store_pg::testing::with_dbname(db.url(), "descartes_no_such_database");
    let err = PgStore::connect(&url).err().unwrap();
    let text = err.to_string();
    assert!(text.contains("descartes_no_such_database") && text.contains("does not exist"), "{text}");
}

/// The server ends the store's connections (a restart, a failover): the next operations fail
/// with a retryable error or reconnect, and nothing is lost.
#[tokio::test]
async fn lost_connections_are_replaced() {
    let db = test_db!();
    let s = db.store().unwrap();
    let r = RunId::from("r");
    s.append(vec![msg(&r, "before")]).await.unwrap();
    s.read_run(&r, 0).await.unwrap();
    let name = db.name().to_owned();
    let killed: i64 = db
        .with_client(move |c| {
            c.query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&name],
            )
            .unwrap()
            .len() as i64
        })
        .unwrap();
    assert!(killed >= 2, "writer and pooled connection: {killed}");
    let mut ok = 0;
    let mut seen = BTreeSet::new();
    for i in 0..5 {
        match s.append(vec![msg(&r, &format!("after {i}"))]).await {
            Ok(e) => {
                ok += 1;
                seen.insert(e[0].seq);
            }
            Err(e) => assert!(e.is_retryable(), "{e}"),
        }
        match s.read_run(&r, 0).await {
            Ok(_) => {}
            Err(e) => assert!(e.is_retryable(), "{e}"),
        }
    }
    assert!(ok >= 4, "reconnected");
    assert_eq!(s.read_run(&r, 0).await.unwrap().len(), 1 + ok);
}
