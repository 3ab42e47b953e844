//! The event-store behaviour of `crates/store/tests/conformance.rs`, on PostgreSQL, plus what
//! only a shared server has: several stores (processes) on one database, commit-order seqs seen
//! by a follower, migrations run by concurrent openers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use descartes_core::{EventStore, StoreError};
use descartes_protocol::*;
use descartes_store_pg::testing::TestDb;
use descartes_store_pg::{PgOptions, PgStore};

/// A fresh database, or return from the test (after a loud warning) when there is none.
macro_rules! test_db {
    () => {
        match TestDb::create() {
            Some(db) => db,
            None => return,
        }
    };
}

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

#[tokio::test]
async fn seq_is_global_and_reads_filter_by_run_and_cursor() {
    let db = test_db!();
    let s = db.store().unwrap();
    let (a, b) = (RunId::from("a"), RunId::from("b"));
    let w1 = s.append(vec![NewEvent::new(&a, started("pa")), msg(&a, "1")]).await.unwrap();
    let w2 = s.append(vec![NewEvent::new(&b, started("pb")), msg(&a, "2")]).await.unwrap();
    let seqs: Vec<_> = w1.iter().chain(&w2).map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4], "dense from 1");
    let run_a = s.read_run(&a, 0).await.unwrap();
    assert_eq!(run_a.len(), 3);
    assert!(run_a.iter().all(|e| e.run_id == a));
    let after = s.read_run(&a, run_a[0].seq).await.unwrap();
    assert_eq!(after.len(), 2);
    let all = s.read_all(seqs[1], 10).await.unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs[2..].to_vec());
    assert_eq!(s.read_all(0, 2).await.unwrap().len(), 2, "limit");
    assert_eq!(s.last_seq().await.unwrap(), seqs[3]);
    // Round trip of the whole envelope.
    assert_eq!(run_a[1], w1[1]);
    assert_eq!(run_a[0].data, w1[0].data);
}

#[tokio::test]
async fn idempotency_keys_append_once() {
    let db = test_db!();
    let s = db.store().unwrap();
    let r = RunId::from("r");
    let first = s.append(vec![msg(&r, "x").with_key("k1")]).await.unwrap();
    let again = s.append(vec![msg(&r, "y").with_key("k1"), msg(&r, "z")]).await.unwrap();
    assert_eq!(again[0].seq, first[0].seq, "same event returned");
    assert_eq!(again[0].data, first[0].data);
    assert_eq!(s.read_run(&r, 0).await.unwrap().len(), 2);
    // The same new key twice in one append: written once.
    let twice = s.append(vec![msg(&r, "p").with_key("k2"), msg(&r, "q").with_key("k2")]).await.unwrap();
    assert_eq!(twice.len(), 2);
    assert_eq!(twice[0].seq, twice[1].seq);
    assert_eq!(twice[1].data, twice[0].data);
    // Concurrent appends of one key from two stores: one event.
    let s2 = db.store().unwrap();
    let (x, y) =
        tokio::join!(s.append(vec![msg(&r, "c1").with_key("k3")]), s2.append(vec![msg(&r, "c2").with_key("k3")]));
    assert_eq!(x.unwrap()[0].seq, y.unwrap()[0].seq);
    assert_eq!(s.read_run(&r, 0).await.unwrap().len(), 4);
    let seqs: Vec<Seq> = s.read_all(0, 100).await.unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4], "no gaps left by refused duplicates");
}

#[tokio::test]
async fn deferred_events_keep_their_place_and_get_written() {
    let db = test_db!();
    let s = db.store().unwrap();
    let r = RunId::from("r");
    let deferred = s.append_deferred(vec![msg(&r, "first")]);
    let durable = s.append(vec![msg(&r, "second")]).await.unwrap();
    let deferred = deferred.await.unwrap();
    assert!(deferred[0].seq < durable[0].seq);
    // A deferred append alone is written within a few milliseconds.
    let alone = s.append_deferred(vec![msg(&r, "third")]);
    let written = tokio::time::timeout(Duration::from_secs(2), alone).await.unwrap().unwrap();
    assert!(written[0].seq > durable[0].seq);
    // Many deferred appends keep their call order.
    let pending: Vec<_> = (0..50).map(|i| s.append_deferred(vec![msg(&r, &i.to_string())])).collect();
    s.flush().await.unwrap();
    let mut last = written[0].seq;
    for p in pending {
        let e = p.await.unwrap();
        assert!(e[0].seq > last);
        last = e[0].seq;
    }
    assert_eq!(s.read_run(&r, 0).await.unwrap().len(), 53);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appenders_get_unique_increasing_seqs() {
    let db = test_db!();
    // Two stores on one database: two processes, each with its own writer.
    let stores = [Arc::new(db.store().unwrap()), Arc::new(db.store().unwrap())];
    let mut tasks = Vec::new();
    for i in 0..64 {
        let s = stores[i % 2].clone();
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
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "per appender order");
        all.extend(seqs);
    }
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 64 * 20, "every seq unique");
    let log = stores[0].read_all(0, 10_000).await.unwrap();
    assert_eq!(log.len(), 64 * 20);
    assert!(log.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(log.last().unwrap().seq, 64 * 20, "dense");
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
async fn reads_and_replay_of_long_runs() {
    let db = test_db!();
    let s = db.store().unwrap();
    let runs: Vec<RunId> = (0..3).map(|i| RunId::from(format!("run{i}"))).collect();
    for r in &runs {
        s.append(vec![NewEvent::new(r, started("p"))]).await.unwrap();
    }
    let mut expected: Vec<Vec<Seq>> = vec![Vec::new(); 3];
    for i in 0..600 {
        let r = i % 3;
        let batch = if i % 7 == 0 { vec![msg(&runs[r], "a"), msg(&runs[r], "b")] } else { vec![msg(&runs[r], "c")] };
        for e in s.append(batch).await.unwrap() {
            expected[r].push(e.seq);
        }
    }
    for (r, run) in runs.iter().enumerate() {
        let got: Vec<Seq> = s.read_run(run, 0).await.unwrap().iter().skip(1).map(|e| e.seq).collect();
        assert_eq!(got, expected[r], "run {r}");
        let cursor = expected[r][expected[r].len() / 2];
        let after: Vec<Seq> = s.read_run(run, cursor).await.unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(after, expected[r].iter().copied().filter(|&q| q > cursor).collect::<Vec<_>>());
        let state = s.replay_run(run).await.unwrap();
        assert_eq!(state.events, expected[r].len() + 1);
    }
}

#[tokio::test]
async fn runs_projection_follows_lifecycle() {
    let db = test_db!();
    let s = db.store().unwrap();
    let (a, b) = (RunId::from("01aaa"), RunId::from("01abb"));
    s.append(vec![NewEvent::new(&a, started("first goal"))]).await.unwrap();
    s.append(vec![NewEvent::new(&b, started("second goal"))]).await.unwrap();
    s.append(vec![NewEvent::new(&a, RunFailed { error: "x".into(), kind: "provider".into(), retryable: true })])
        .await
        .unwrap();
    let runs = s.list_runs().await.unwrap();
    assert_eq!(runs.len(), 2);
    let ra = runs.iter().find(|r| r.run_id == a).unwrap();
    assert_eq!((ra.status.as_str(), ra.prompt.as_str()), ("failed", "first goal"));
    assert_eq!(runs.iter().find(|r| r.run_id == b).unwrap().status, "running");
    assert_eq!(s.find_runs("01a").await.unwrap().len(), 2);
    assert_eq!(s.find_runs("01ab").await.unwrap(), vec![b.clone()]);
    assert!(s.find_runs("zz").await.unwrap().is_empty());
    assert!(s.find_runs("%").await.unwrap().is_empty(), "prefixes are literal");
}

#[tokio::test]
async fn followers_are_woken_by_appends() {
    let db = test_db!();
    let s = Arc::new(db.store().unwrap());
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
    assert!(waited < Duration::from_secs(1), "woke after {waited:?}");
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
    assert_eq!(versions, 1);
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
