//! The event-store behaviour every `EventStore` implementation must have, run against each one
//! (memory and SQLite in `crates/store/tests`, PostgreSQL in `crates/store-pg/tests`).
//!
//! `run_all(factory)` runs every case on a fresh, empty store made by `factory()`.

use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use descartes_core::EventStore;
use descartes_protocol::{Message, MessageAdded, NewEvent, RunFailed, RunId, RunStarted, Seq};

/// What a factory returns: an empty event store.
pub struct EventStores {
    pub store: Arc<dyn EventStore>,
    /// Keeps whatever the store needs alive (a temp dir, a test database). Dropped after the
    /// store.
    pub guard: Box<dyn Any + Send>,
}

/// Appends (of one or two events) in the long-runs case: more than twice SQLite's run index lag
/// (`descartes_store::INDEX_LAG`, 1024) plus 300, so that reads by run span the bulk index and
/// the recent tail. `crates/store/tests` checks at compile time that this stays large enough.
pub const LONG_RUN_APPENDS: usize = 2 * 1024 + 300;

/// Runs every case; panics with the case's name on the first failure. Call it from a
/// multi-threaded runtime (`#[tokio::test(flavor = "multi_thread", worker_threads = 4)]`) so
/// the concurrent appenders really run at once.
pub async fn run_all<F, Fut>(factory: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = EventStores>,
{
    macro_rules! case {
        ($name:ident) => {{
            let s = factory().await;
            eprintln!("event suite: {}", stringify!($name));
            $name(&s.store).await;
            drop(s);
        }};
    }
    case!(seq_is_global_and_reads_filter_by_run_and_cursor);
    case!(idempotency_keys_append_once);
    case!(deferred_events_keep_their_place_and_get_written);
    case!(concurrent_appenders_get_unique_increasing_seqs_on_one_store);
    case!(reads_by_run_span_the_index_and_the_tail);
    case!(runs_projection_follows_lifecycle);
    case!(followers_are_woken_by_appends);
}

/// A `run_started` payload.
pub fn started(prompt: &str) -> RunStarted {
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
        budget: Default::default(),
    }
}

/// A user message event of `run`.
pub fn msg(run: &RunId, text: &str) -> NewEvent {
    NewEvent::new(run, MessageAdded { message: Message::user_text(text), model_call_id: None })
}

async fn seq_is_global_and_reads_filter_by_run_and_cursor(s: &Arc<dyn EventStore>) {
    let (a, b) = (RunId::from("a"), RunId::from("b"));
    let w1 = s.append(vec![NewEvent::new(&a, started("pa")), msg(&a, "1")]).await.unwrap();
    let w2 = s.append(vec![NewEvent::new(&b, started("pb")), msg(&a, "2")]).await.unwrap();
    let seqs: Vec<_> = w1.iter().chain(&w2).map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
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
    // Round trip of the payload, and of the whole envelope.
    assert_eq!(run_a[1].data, w1[1].data);
    assert_eq!(run_a[1], w1[1]);
    assert_eq!(run_a[0].data, w1[0].data);
}

async fn idempotency_keys_append_once(s: &Arc<dyn EventStore>) {
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
    assert_eq!(s.read_run(&r, 0).await.unwrap().len(), 3);
    let seqs: Vec<Seq> = s.read_all(0, 100).await.unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3], "no gaps left by refused duplicates");
}

async fn deferred_events_keep_their_place_and_get_written(s: &Arc<dyn EventStore>) {
    let r = RunId::from("r");
    let deferred = s.append_deferred(vec![msg(&r, "first")]);
    let durable = s.append(vec![msg(&r, "second")]).await.unwrap();
    let deferred = deferred.await.unwrap();
    assert!(deferred[0].seq < durable[0].seq);
    // A deferred append alone is written within a few milliseconds.
    let alone = s.append_deferred(vec![msg(&r, "third")]);
    let written = tokio::time::timeout(Duration::from_secs(2), alone).await.unwrap().unwrap();
    assert!(written[0].seq > durable[0].seq);
    assert_eq!(s.read_run(&r, 0).await.unwrap().len(), 3);
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

async fn concurrent_appenders_get_unique_increasing_seqs_on_one_store(s: &Arc<dyn EventStore>) {
    concurrent_appenders_get_unique_increasing_seqs(std::slice::from_ref(s)).await;
}

/// 64 appenders of 20 events each, spread over `stores` (several stores on one database stand
/// for several processes): every seq unique, increasing per appender, the log dense from 1.
pub async fn concurrent_appenders_get_unique_increasing_seqs(stores: &[Arc<dyn EventStore>]) {
    let mut tasks = Vec::new();
    for i in 0..64 {
        let s = stores[i % stores.len()].clone();
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

/// Enough events that some runs' events are found through a bulk run index (SQLite's) and the
/// rest by the recent tail; reads by run and replays must see each event once, in order.
async fn reads_by_run_span_the_index_and_the_tail(s: &Arc<dyn EventStore>) {
    let runs: Vec<RunId> = (0..3).map(|i| RunId::from(format!("run{i}"))).collect();
    for r in &runs {
        s.append(vec![NewEvent::new(r, started("p"))]).await.unwrap();
    }
    let mut expected: Vec<Vec<Seq>> = vec![Vec::new(); 3];
    for i in 0..LONG_RUN_APPENDS {
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
        assert_eq!(after, expected[r].iter().copied().filter(|&q| q > cursor).collect::<Vec<_>>(), "run {r}");
        let state = s.replay_run(run).await.unwrap();
        assert_eq!(state.events, expected[r].len() + 1, "run {r}");
    }
}

async fn runs_projection_follows_lifecycle(s: &Arc<dyn EventStore>) {
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
    assert_eq!(s.run_summary(&a).await.unwrap().as_ref(), Some(ra), "one run's summary is its row of the list");
    assert!(s.run_summary(&RunId::from("01a")).await.unwrap().is_none(), "a prefix is not an id");
    let resolved = descartes_core::store::resolve_run(&**s, "01ab").await.unwrap();
    assert_eq!(resolved, b);
    let ambiguous = descartes_core::store::resolve_run(&**s, "01a").await.unwrap_err().to_string();
    assert!(ambiguous.contains("matches several runs"), "{ambiguous}");
}

async fn followers_are_woken_by_appends(s: &Arc<dyn EventStore>) {
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
