//! The HTTP/WebSocket API's benchmarks (`cargo bench -p descartes-server --bench api`), each
//! against its target; results are recorded in docs/PERFORMANCE.md ("The API server").
//!
//! - `get`: `GET /v1/runs/{id}` with 10,000 runs in a durable SQLite log, over a keep-alive
//!   HTTP/1.1 client (full ids and 10-character prefixes), beside the same lookups made on the
//!   store directly (what the handler does, without HTTP) and `GET /v1/health` (HTTP alone);
//! - `ws`: WebSocket subscribers (1, 10 and 100 by default) each receiving every event of a
//!   100,000-event burst appended in batches of 100: per-subscriber events/s and the latency
//!   from the return of the append that wrote an event to its arrival at each subscriber;
//! - `idle`: the server's memory (its process's RSS, the server running as a child process:
//!   this binary, re-executed) for 1,000 idle WebSockets, without and with a subscription to an
//!   idle stream.
//!
//! `cargo bench -p descartes-server --bench api -- ws idle` runs some of them. Knobs:
//! `DESCARTES_BENCH_SUBSCRIBERS` (`1,10,100`), `DESCARTES_BENCH_EVENTS` (100000),
//! `DESCARTES_BENCH_CONNECTIONS` (1000). In-process (`get`, `ws`) the clients and the server
//! share the machine's cores: what a subscriber costs its client is part of the figure. The
//! databases live under the target directory, on the project's disk.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use descartes_core::EventStore;
use descartes_core::store::resolve_run;
use descartes_protocol::{Message as ChatMessage, MessageAdded, NewEvent, RunId, RunStarted, Timestamp};
use descartes_server::ApiState;
use descartes_store::{SqliteEventStore, SqliteOptions};
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

// The same allocator as the `descartes` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";
/// The argument that makes this binary the server of the `idle` benchmark.
const CHILD: &str = "__serve-child";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    if args.first().map(String::as_str) == Some(CHILD) {
        return child_server(&args[1]);
    }
    let fds = raise_fd_limit();
    let wanted = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    println!("api benchmarks: {} cores, open files limit {fds}", cores());
    if wanted("get") {
        rt.block_on(get_run());
    }
    if wanted("ws") {
        let events = env_usize("DESCARTES_BENCH_EVENTS", 100_000);
        let subscribers = std::env::var("DESCARTES_BENCH_SUBSCRIBERS").unwrap_or_else(|_| "1,10,100".into());
        for n in subscribers.split(',').filter(|n| !n.trim().is_empty()).map(|n| n.trim().parse::<usize>().unwrap()) {
            rt.block_on(burst(n, events, 100, None));
        }
        // The latency when the subscribers keep up: batches of 100 at a set pace
        // (SUBSCRIBERS:MILLISECONDS between appends).
        let paced = std::env::var("DESCARTES_BENCH_PACED").unwrap_or_else(|_| "1:10,10:10,100:50".into());
        for pair in paced.split(',').filter(|p| !p.is_empty()) {
            let (n, ms) = pair.split_once(':').unwrap();
            let every = Duration::from_millis(ms.trim().parse().unwrap());
            rt.block_on(burst(n.trim().parse().unwrap(), 10_000, 100, Some(every)));
        }
    }
    if wanted("idle") {
        rt.block_on(idle(env_usize("DESCARTES_BENCH_CONNECTIONS", 1000)));
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Raises the soft limit on open files to the hard one (1,000 sockets, each end); says it.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

fn pct<T: Copy>(sorted: &[T], p: f64) -> T {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "  {name:<44} n={:<6} p50={:>9.1?} p90={:>9.1?} p99={:>9.1?} max={:>9.1?}",
        samples.len(),
        pct(&samples, 0.5),
        pct(&samples, 0.9),
        pct(&samples, 0.99),
        samples[samples.len() - 1]
    );
}

/// A durable SQLite log in a fresh directory under the target directory.
fn open_store(dir: &tempfile::TempDir) -> Arc<SqliteEventStore> {
    Arc::new(SqliteEventStore::open(&dir.path().join("events.db"), SqliteOptions::default()).unwrap())
}

/// The API served on 127.0.0.1 (a port of its own) on this runtime, as `descartes serve`
/// serves it (`descartes_server::serve`: `TCP_NODELAY`, the shared event hub).
async fn serve(store: Arc<dyn EventStore>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let state = ApiState::new(store, TOKEN.into(), addr, Arc::new(|s| s.status.clone()), rx);
    tokio::spawn(descartes_server::serve(listener, state, tx, std::future::pending()));
    addr
}

fn started(i: usize) -> RunStarted {
    RunStarted {
        prompt: format!("fix the flaky test number {i} in the parser"),
        provider: "openai".into(),
        model: "gpt-4o-mini".into(),
        cwd: "/work/project".into(),
        max_turns: 100,
        auto_approve: false,
        system_prompt: None,
        tools: vec!["shell".into(), "read_file".into(), "write_file".into()],
        pid: 4242,
        version: "bench".into(),
        budget: Default::default(),
    }
}

/// `n` runs, one `run_started` each, appended 500 per commit. Their ids are ULIDs a minute
/// apart (about a week of runs), as `RunId::generate` makes them over time, so a 10-character
/// prefix (the ULID's time) names one run.
async fn seed_runs(store: &dyn EventStore, n: usize) -> Vec<RunId> {
    let first_ms = 1_780_000_000_000u64;
    let ids: Vec<RunId> = (0..n)
        .map(|i| {
            let ulid = ulid::Ulid::from_parts(first_ms + i as u64 * 60_000, fastrand::u128(..));
            RunId(ulid.to_string().to_lowercase())
        })
        .collect();
    for (chunk, batch) in ids.chunks(500).enumerate() {
        let events = batch
            .iter()
            .enumerate()
            .map(|(j, id)| {
                let i = chunk * 500 + j;
                let mut e = NewEvent::new(id, started(i));
                e.at = Timestamp(((first_ms + i as u64 * 60_000) * 1000) as i64);
                e
            })
            .collect();
        store.append(events).await.unwrap();
    }
    ids
}

/// Target 1: `GET /v1/runs/{id}` p50 ≤ 1 ms with 10,000 runs.
async fn get_run() {
    const RUNS: usize = 10_000;
    const N: usize = 4_000;
    const WARMUP: usize = 300;
    println!("\nGET /v1/runs/{{id}}: {RUNS} runs in a durable SQLite log, keep-alive HTTP/1.1 (reqwest), sequential");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = open_store(&dir);
    let ids = seed_runs(&*store, RUNS).await;
    let addr = serve(store.clone()).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder().http1_only().no_proxy().build().unwrap();
    let auth = format!("Bearer {TOKEN}");
    let get = |path: String| {
        let request = client.get(format!("http://{addr}{path}")).header("authorization", &auth);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let body = response.bytes().await.unwrap();
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            body
        }
    };
    let pick = || &ids[fastrand::usize(..ids.len())];

    // HTTP, the guard and the client alone.
    for _ in 0..WARMUP {
        get("/v1/health".into()).await;
    }
    let mut health = Vec::with_capacity(N);
    for _ in 0..N {
        let t = Instant::now();
        get("/v1/health".into()).await;
        health.push(t.elapsed());
    }

    for _ in 0..WARMUP {
        get(format!("/v1/runs/{}", pick())).await;
    }
    let (mut full, mut prefix, mut all) = (Vec::new(), Vec::new(), Vec::with_capacity(N));
    for i in 0..N {
        let id = pick();
        let by_prefix = i % 2 == 1;
        let path = if by_prefix { format!("/v1/runs/{}", &id.as_str()[..10]) } else { format!("/v1/runs/{id}") };
        let t = Instant::now();
        let body = get(path).await;
        let d = t.elapsed();
        assert!(body.windows(id.as_str().len()).any(|w| w == id.as_str().as_bytes()), "the run asked for");
        all.push(d);
        if by_prefix { prefix.push(d) } else { full.push(d) }
    }

    // The same work without HTTP: what the handler asks the store (`resolve_run`, then
    // `run_summary`), and `run_summary` alone.
    let mut summary = Vec::with_capacity(N);
    let (mut resolve_full, mut resolve_prefix) = (Vec::new(), Vec::new());
    for i in 0..N {
        let id = pick();
        let t = Instant::now();
        store.run_summary(id).await.unwrap().unwrap();
        summary.push(t.elapsed());
        let key = if i % 2 == 1 { &id.as_str()[..10] } else { id.as_str() };
        let t = Instant::now();
        let found = resolve_run(&*store, key).await.unwrap();
        store.run_summary(&found).await.unwrap().unwrap();
        if i % 2 == 1 { resolve_prefix.push(t.elapsed()) } else { resolve_full.push(t.elapsed()) }
    }

    report("GET /v1/runs/{id} (all)   [target p50 <= 1 ms]", all);
    report("GET /v1/runs/{id} full id", full);
    report("GET /v1/runs/{id} 10-char prefix", prefix);
    report("GET /v1/health (HTTP + guard + client)", health);
    report("store: resolve_run + run_summary, full id", resolve_full);
    report("store: resolve_run + run_summary, prefix", resolve_prefix);
    report("store: run_summary alone", summary);
}

/// A WebSocket to the server at `addr`, with the token.
async fn connect(addr: SocketAddr) -> Socket {
    let mut request = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text frame (pings are answered by the read itself).
async fn next_text(ws: &mut Socket) -> String {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return t.as_str().to_owned(),
            Some(Ok(Message::Close(c))) => panic!("closed: {c:?}"),
            Some(Ok(_)) => {}
            other => panic!("the socket ended: {other:?}"),
        }
    }
}

/// Subscribes (`{"type":"subscribe",...}` with `fields`) and waits for `subscribed`.
async fn subscribe(ws: &mut Socket, fields: &str) {
    ws.send(Message::text(format!(r#"{{"type":"subscribe"{fields}}}"#))).await.unwrap();
    let answer = next_text(ws).await;
    assert!(answer.contains(r#""type":"subscribed""#), "{answer}");
}

/// The `seq` of an event frame (`{"type":"event","event":{"seq":N,...`): the envelope's
/// `seq` comes before its payload.
fn seq_of(frame: &str) -> i64 {
    let at = frame.find(r#""seq":"#).unwrap_or_else(|| panic!("not an event: {frame}")) + 6;
    let digits = frame[at..].bytes().take_while(u8::is_ascii_digit).count();
    frame[at..at + digits].parse().unwrap()
}

/// What one subscriber saw: when each event arrived (µs after the start), indexed by
/// `seq - after - 1`.
struct Seen {
    arrived: Vec<u32>,
}

/// This process's CPU time (user + system).
fn cpu_time() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF).unwrap();
    let micros = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64;
    Duration::from_micros(micros(usage.user_time()) + micros(usage.system_time()))
}

/// Target 2: `subscribers` WebSockets each receive every event of a burst of `total` events, appended
/// `batch` per append by one appender as fast as the log takes them, or one append `every`.
async fn burst(subscribers: usize, total: usize, batch: usize, every: Option<Duration>) {
    match every {
        None => println!(
            "\nWebSocket burst: {subscribers} subscribers, {total} events appended {batch} per append, as fast as \
             the log takes them (durable SQLite)"
        ),
        Some(every) => println!(
            "\nWebSocket, paced: {subscribers} subscribers, {total} events appended {batch} every {every:?} \
             ({:.0} events/s, {:.0} deliveries/s)",
            batch as f64 / every.as_secs_f64(),
            (batch * subscribers) as f64 / every.as_secs_f64()
        ),
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = open_store(&dir);
    let run = RunId::generate();
    store.append(vec![NewEvent::new(&run, started(0))]).await.unwrap();
    let addr = serve(store.clone()).await;
    let after = store.last_seq().await.unwrap();
    let base = Instant::now();

    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(subscribers);
    let mut clients = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let ready = ready_tx.clone();
        clients.push(tokio::spawn(async move {
            let mut ws = connect(addr).await;
            subscribe(&mut ws, &format!(r#","after":{after}"#)).await;
            ready.send(()).await.unwrap();
            let mut arrived = vec![0u32; total];
            let mut expected = after + 1;
            while expected <= after + total as i64 {
                let Some(message) = ws.next().await else { panic!("the socket ended at {expected}") };
                let Message::Text(text) = message.unwrap() else { continue };
                let now = base.elapsed().as_micros() as u32;
                let seq = seq_of(text.as_str());
                assert_eq!(seq, expected, "in order, no gap");
                arrived[(seq - after - 1) as usize] = now;
                expected += 1;
            }
            Seen { arrived }
        }));
    }
    drop(ready_tx);
    for _ in 0..subscribers {
        ready_rx.recv().await.unwrap();
    }

    // The burst, built beforehand: the appender only appends.
    let batches: Vec<Vec<NewEvent>> = (0..total / batch)
        .map(|b| {
            (0..batch)
                .map(|i| {
                    let text = format!("token {} of the answer", b * batch + i);
                    NewEvent::new(&run, MessageAdded { message: ChatMessage::user_text(text), model_call_id: None })
                })
                .collect()
        })
        .collect();
    let cpu = cpu_time();
    let started_at = tokio::time::Instant::now();
    let start = base.elapsed().as_micros() as u32;
    let mut appended = vec![0u32; total];
    for (k, events) in batches.into_iter().enumerate() {
        if let Some(every) = every {
            tokio::time::sleep_until(started_at + every * k as u32).await;
        }
        let written = store.append(events).await.unwrap();
        let now = base.elapsed().as_micros() as u32;
        for e in written {
            appended[(e.seq - after - 1) as usize] = now;
        }
    }
    let append_end = base.elapsed().as_micros() as u32;

    let mut seen = Vec::with_capacity(subscribers);
    for c in clients {
        seen.push(tokio::time::timeout(Duration::from_secs(600), c).await.expect("every subscriber done").unwrap());
    }
    let cpu = cpu_time() - cpu;
    let wall = Duration::from_micros(u64::from(base.elapsed().as_micros() as u32 - start));
    let secs = |us: u32| f64::from(us) / 1e6;
    println!(
        "  appender: {total} events in {:.3} s = {:.0} events/s",
        secs(append_end - start),
        total as f64 / secs(append_end - start)
    );
    let mut rates: Vec<f64> =
        seen.iter().map(|s| total as f64 / secs(s.arrived.iter().max().unwrap() - start)).collect();
    rates.sort_by(f64::total_cmp);
    println!(
        "  CPU (this process: server, clients, appender): {:.2} s in {:.2} s of wall time, {:.2} µs per delivery",
        cpu.as_secs_f64(),
        wall.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / (subscribers * total) as f64
    );
    println!(
        "  per subscriber, from the first append to its last event [target >= 50,000 events/s]: \
         min {:.0}, median {:.0}, max {:.0} events/s",
        rates[0],
        pct(&rates, 0.5),
        rates[rates.len() - 1]
    );
    let mut latencies: Vec<i64> = Vec::with_capacity(subscribers * total);
    for s in &seen {
        latencies.extend(s.arrived.iter().zip(&appended).map(|(&r, &a)| i64::from(r) - i64::from(a)));
    }
    let early = latencies.iter().filter(|&&l| l < 0).count();
    latencies.sort_unstable();
    let ms = |us: i64| us as f64 / 1000.0;
    println!(
        "  append return -> arrival, all {} deliveries [target p99 <= 2 ms]: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, \
         max {:.2} ms ({early} arrived before their append returned, counted as negative)",
        latencies.len(),
        ms(pct(&latencies, 0.5)),
        ms(pct(&latencies, 0.9)),
        ms(pct(&latencies, 0.99)),
        ms(latencies[latencies.len() - 1]),
    );
}

/// The server's resident memory: `VmRSS` and its anonymous part (`RssAnon`), in kB; and its
/// open files.
fn rss(pid: u32) -> (u64, u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..].trim().trim_end_matches("kB").trim().parse::<u64>().unwrap()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    (field("VmRSS:"), field("RssAnon:"), fds)
}

/// The server of the `idle` benchmark, as a child process over the log in `dir`.
struct Child {
    child: tokio::process::Child,
    pid: u32,
    addr: SocketAddr,
}

impl Child {
    async fn start(dir: &std::path::Path) -> Self {
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([CHILD, &dir.display().to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let mut line = String::new();
        tokio::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).await.unwrap();
        let addr = line.trim().strip_prefix("listening on ").unwrap().parse().unwrap();
        Self { child, pid, addr }
    }

    async fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// How busy process `pid` is over `window`: its CPU time (user + system) in % of one core.
async fn busy(pid: u32, window: Duration) -> f64 {
    // `utime` and `stime`, the 14th and 15th fields, in clock ticks (USER_HZ, 100 on Linux).
    let ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after_name.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let before = ticks();
    tokio::time::sleep(window).await;
    (ticks() - before) as f64 / window.as_secs_f64()
}

/// Waits for the one event of the idle stream (its `run_started`).
async fn first_event(ws: &mut Socket) {
    let frame = next_text(ws).await;
    assert!(frame.contains(r#""type":"event""#), "{frame}");
}

/// A child server over `dir`, warmed up with a few connections and subscriptions (what every
/// server has once: a connection, a subscription, a log reader); its memory then.
async fn warm_server(dir: &std::path::Path, subscription: &str) -> (Child, (u64, u64, usize)) {
    let server = Child::start(dir).await;
    for _ in 0..4 {
        let mut ws = connect(server.addr).await;
        subscribe(&mut ws, subscription).await;
        first_event(&mut ws).await;
        ws.close(None).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss(server.pid);
    println!(
        "  {:<60} RSS {:>7} kB (anonymous {} kB), {} open files",
        "server, warmed up, no connection", before.0, before.1, before.2
    );
    (server, before)
}

/// Target 3: `connections` idle WebSockets cost the server ≤ 50 MB: the server is this binary in a
/// child process, so its RSS is the server's alone.
async fn idle(connections: usize) {
    println!("\nIdle WebSockets: {connections} connections to a server in a child process (its RSS and open files)");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // A log of 1,000 runs, and the stream the subscribers follow: one event, then nothing.
    let idle_stream = RunId::generate();
    {
        let store = open_store(&dir);
        seed_runs(&*store, 1000).await;
        store.append(vec![NewEvent::new(&idle_stream, started(0))]).await.unwrap();
    }
    let subscription = format!(r#","stream":"{idle_stream}""#);
    let settle = Duration::from_secs(3);
    // After `wait`, the server's memory and open files against `before`, and how busy it was
    // meanwhile (idle, it should not be).
    let row = async |what: &str, pid: u32, wait: Duration, (rss0, anon0, _): (u64, u64, usize)| {
        let busy = busy(pid, wait).await;
        let (rss, anon, fds) = rss(pid);
        let mb = |a: u64, b: u64| (a as f64 - b as f64) / 1024.0;
        println!(
            "  {what:<56} RSS {rss:>7} kB, delta {:>6.1} MB ({:>5.1} kB each; anonymous {:>6.1} MB), {fds:>4} \
             open files, CPU {busy:>3.0}% of a core",
            mb(rss, rss0),
            mb(rss, rss0) * 1024.0 / connections as f64,
            mb(anon, anon0)
        )
    };
    // Subscriptions made one after the other.
    let (server, before) = warm_server(dir.path(), &subscription).await;
    let mut sockets = Vec::with_capacity(connections);
    for _ in 0..connections {
        sockets.push(connect(server.addr).await);
    }
    row("open, authenticated, idle  [target <= 50 MB]", server.pid, settle, before).await;
    for ws in &mut sockets {
        subscribe(ws, &subscription).await;
        first_event(ws).await;
    }
    row("+ each subscribed to an idle stream, one after the other", server.pid, settle, before).await;
    for mut ws in sockets {
        let _ = ws.close(None).await;
    }
    row("all closed again", server.pid, settle, before).await;
    server.stop().await;

    // The same subscriptions all at once (clients reconnecting together): each starts with a
    // read of the log, and the store opens a reader connection for each read it runs
    // concurrently.
    let (server, before) = warm_server(dir.path(), &subscription).await;
    let mut sockets = Vec::with_capacity(connections);
    for _ in 0..connections {
        sockets.push(connect(server.addr).await);
    }
    for ws in &mut sockets {
        ws.send(Message::text(format!(r#"{{"type":"subscribe"{subscription}}}"#))).await.unwrap();
    }
    for ws in &mut sockets {
        assert!(next_text(ws).await.contains(r#""type":"subscribed""#));
        first_event(ws).await;
    }
    row("open and subscribed all at once, 3 s after", server.pid, settle, before).await;
    // The blocking threads that ran those reads end after 10 s idle.
    row("open and subscribed all at once, 13 s after", server.pid, Duration::from_secs(11), before).await;
    for mut ws in sockets {
        let _ = ws.close(None).await;
    }
    row("all closed again", server.pid, settle, before).await;
    server.stop().await;
}

/// The server of the `idle` benchmark: the API over the log in `dir`, until stdin closes.
fn child_server(dir: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let addr = rt.block_on(async {
        let store = Arc::new(
            SqliteEventStore::open(&std::path::Path::new(dir).join("events.db"), SqliteOptions::default()).unwrap(),
        );
        serve(store).await
    });
    println!("listening on {addr}");
    // The runtime's workers serve; this thread waits for the parent to go.
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
}
