//! `PgStore`: opening, the event writer thread (group commit), and the `EventStore` methods.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use descartes_core::batch::Batcher;
use descartes_core::store::DeferredAppend;
use descartes_core::{Clock, CoreError, EventStore, RunState, RunSummary, StoreError, SystemClock};
use descartes_protocol::{EVENT_VERSION, Event, EventData, EventId, NewEvent, RunId, Seq, Timestamp};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{GenericClient, Row};
use tokio::sync::{oneshot, watch};

use crate::conn::{Conn, PgOptions, Pool, Target, is_connection_error};
use crate::schema;

/// How often a follower re-reads to see events written by other processes.
const POLL: Duration = Duration::from_millis(100);

/// Appends `n` events: bumps the counter (taking its row lock until commit) and inserts the
/// events with the seqs after the old value. Returns the old value.
pub(crate) const INSERT_EVENTS: &str = "
WITH c AS (UPDATE event_seq SET value = value + $1 RETURNING value - $1 AS base),
ins AS (
    INSERT INTO events (seq, id, run_id, type, v, at, key, data)
    SELECT c.base + u.ord, u.id, u.run_id, u.type, u.v, u.at, u.key, u.data
    FROM c, UNNEST($2::text[], $3::text[], $4::text[], $5::int4[], $6::int8[], $7::text[], $8::text[])
        WITH ORDINALITY AS u(id, run_id, type, v, at, key, data, ord)
)
SELECT base FROM c";

const READ_RUN: &str =
    "SELECT seq, id, run_id, type, v, at, data FROM events WHERE run_id = $1 AND seq > $2 ORDER BY seq";
const READ_ALL: &str = "SELECT seq, id, run_id, type, v, at, data FROM events WHERE seq > $1 ORDER BY seq LIMIT $2";
const LAST_SEQ: &str = "SELECT value FROM event_seq";

/// The PostgreSQL event store and task store.
///
/// Cheap to share behind an `Arc`; every method is safe to call from many tasks and from
/// several processes on the same database.
pub struct PgStore {
    pub(crate) pool: Arc<Pool>,
    pub(crate) clock: Arc<dyn Clock>,
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    pub(crate) last: watch::Sender<Seq>,
    pub(crate) tasks: crate::tasks::Grouper,
    /// The vacuuming thread (when the server's autovacuum is off) and what stops it.
    maintenance: Mutex<Option<(mpsc::Sender<()>, JoinHandle<()>)>>,
}

enum Cmd {
    Append { events: Vec<Prepared>, durable: bool, reply: oneshot::Sender<Result<Vec<Event>, StoreError>> },
    Flush { reply: oneshot::Sender<Result<Vec<Event>, StoreError>> },
}

struct Prepared {
    event: NewEvent,
    json: String,
}

/// Runs blocking client work on a plain thread (the `postgres` client must not block an async
/// runtime's thread), and waits for it.
fn off_runtime<T: Send>(f: impl FnOnce() -> Result<T, StoreError> + Send) -> Result<T, StoreError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| match std::thread::Builder::new().name("descartes-pg-open".into()).spawn_scoped(s, f) {
        Ok(h) => {
            h.join().unwrap_or_else(|_| Err(StoreError::Io { message: "opening thread panicked".into(), busy: false }))
        }
        Err(e) => Err(StoreError::Io { message: format!("cannot start a thread: {e}"), busy: false }),
    })
}

impl PgStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/database`), runs pending
    /// migrations, and starts the event writer. Blocks while doing so (it may be called from
    /// async code: the blocking work runs on a plain thread).
    pub fn connect(url: &str) -> Result<PgStore, StoreError> {
        Self::connect_with(url, PgOptions::default())
    }

    pub fn connect_with(url: &str, options: PgOptions) -> Result<PgStore, StoreError> {
        let target = Target::parse(url)?;
        let (conn, writer_conn, last, autovacuum) = off_runtime(|| {
            let mut conn = Conn::open(&target, &options).map_err(|e| target.open_error(&e))?;
            schema::migrate(&mut conn.client).map_err(|e| {
                let StoreError::Open { path, message } = target.open_error(&e) else { return target.open_error(&e) };
                StoreError::Open { path, message: format!("migrating the schema failed: {message}") }
            })?;
            let last: Seq = conn.client.query_one(LAST_SEQ, &[]).map_err(|e| target.open_error(&e))?.get(0);
            let writer_conn = Conn::open(&target, &options).map_err(|e| target.open_error(&e))?;
            let autovacuum = crate::maintenance::autovacuum_on(&mut conn.client).unwrap_or_else(|e| {
                tracing::debug!(error = %target.error(&e), "cannot tell whether autovacuum is on; assuming it is");
                true
            });
            Ok((conn, writer_conn, last, autovacuum))
        })?;
        let pool = Arc::new(Pool::new(target, options));
        pool.add(conn);
        let (last_tx, _) = watch::channel(last);
        let (tx, rx) = mpsc::channel();
        let notify = last_tx.clone();
        let writer_pool = pool.clone();
        let writer = std::thread::Builder::new()
            .name("descartes-pg-writer".into())
            .spawn(move || writer_loop(Some(writer_conn), writer_pool, rx, notify))
            .map_err(|e| StoreError::Open { path: pool.target.display.clone(), message: e.to_string() })?;
        let tasks = crate::tasks::Grouper::start(pool.clone(), last_tx.clone())?;
        let maintenance = if autovacuum {
            None
        } else {
            tracing::info!(
                "autovacuum is off on {}: this store vacuums the task tables every {:?}",
                pool.target.display,
                crate::maintenance::VACUUM_EVERY
            );
            let (stop, stopped) = mpsc::channel();
            let (target, options, ops) = (pool.target.clone(), pool.options.clone(), tasks.ops.clone());
            let h = std::thread::Builder::new()
                .name("descartes-pg-vacuum".into())
                .spawn(move || crate::maintenance::run(target, options, ops, stopped))
                .map_err(|e| StoreError::Open { path: pool.target.display.clone(), message: e.to_string() })?;
            Some((stop, h))
        };
        Ok(PgStore {
            tasks,
            pool,
            clock: Arc::new(SystemClock),
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            last: last_tx,
            maintenance: Mutex::new(maintenance),
        })
    }

    /// Uses this clock for task leases and backoff (tests use a manual clock).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> PgStore {
        self.clock = clock;
        self
    }

    /// Where the store is connected, without the password.
    pub fn target(&self) -> &str {
        &self.pool.target.display
    }

    /// Stops the writer after it has written everything queued and closes idle connections.
    /// Later appends fail with `StoreError::Closed`.
    pub fn close(&self) {
        self.tasks.close();
        if let Some((stop, h)) = self.maintenance.lock().ok().and_then(|mut m| m.take()) {
            drop(stop);
            let _ = h.join();
        }
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut w) = self.writer.lock()
            && let Some(handle) = w.take()
        {
            let _ = handle.join();
        }
        self.pool.close_idle();
    }

    fn send(&self, cmd: Cmd) -> Result<(), StoreError> {
        let guard = self.tx.lock().map_err(|_| StoreError::Closed)?;
        guard.as_ref().ok_or(StoreError::Closed)?.send(cmd).map_err(|_| StoreError::Closed)
    }

    fn enqueue(&self, events: Vec<NewEvent>, durable: bool) -> oneshot::Receiver<Result<Vec<Event>, StoreError>> {
        let (reply, rx) = oneshot::channel();
        let prepared: Result<Vec<Prepared>, StoreError> = events
            .into_iter()
            .map(|event| {
                let json = event
                    .data
                    .to_json()
                    .map_err(|e| StoreError::Io { message: format!("cannot encode event: {e}"), busy: false })?;
                Ok(Prepared { event, json })
            })
            .collect();
        let sent = prepared.and_then(|events| {
            let (r, rx2) = oneshot::channel();
            self.send(Cmd::Append { events, durable, reply: r }).map(|()| rx2)
        });
        match sent {
            Ok(rx2) => return rx2,
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
        rx
    }

    /// Runs `f` with a pooled connection on the blocking thread pool.
    /// Reads are retried once on a new connection when the connection broke.
    pub(crate) async fn with_conn<T: Send + 'static>(
        &self,
        f: impl Fn(&mut Conn, &Target) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.get()?;
            match f(&mut conn, &pool.target) {
                // Reads may be repeated: once more on a new connection when this one broke.
                Err(e) if conn.client.is_closed() || e.is_retryable() => {
                    tracing::debug!(error = %e, "PostgreSQL connection lost; retrying the read");
                    conn.discard();
                    let mut fresh = pool.get()?;
                    f(&mut fresh, &pool.target)
                }
                other => other,
            }
        })
        .await
        .map_err(|e| StoreError::Io { message: format!("database task failed: {e}"), busy: false })?
    }

    /// Tells followers in this process that events up to `seq` are committed.
    pub(crate) fn notify(&self, seq: Seq) {
        notify(&self.last, seq);
    }

    async fn read_events(
        &self,
        sql: &'static str,
        params: impl Fn() -> Vec<Box<dyn ToSql + Sync + Send>> + Send + 'static,
    ) -> Result<Vec<Event>, StoreError> {
        self.with_conn(move |conn, target| {
            let Conn { client, stmts, .. } = conn;
            let stmt = stmts.get(client, sql).map_err(|e| target.error(&e))?;
            let params = params();
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
            let rows = client.query(&stmt, &refs).map_err(|e| target.error(&e))?;
            rows.iter().map(|r| to_event(r, target)).collect()
        })
        .await
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.close();
    }
}

pub(crate) fn notify(last: &watch::Sender<Seq>, seq: Seq) {
    last.send_if_modified(|s| {
        let changed = seq > *s;
        *s = (*s).max(seq);
        changed
    });
}

fn corrupt(seq: Seq, message: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { seq, message: message.to_string() }
}

fn to_event(r: &Row, target: &Target) -> Result<Event, StoreError> {
    let seq: Seq = r.try_get(0).map_err(|e| target.error(&e))?;
    let parts = (|| -> Result<_, postgres::Error> {
        Ok((
            r.try_get::<_, String>(1)?,
            r.try_get::<_, String>(2)?,
            r.try_get::<_, &str>(3)?,
            r.try_get::<_, i32>(4)?,
            r.try_get::<_, i64>(5)?,
            r.try_get::<_, &str>(6)?,
        ))
    })();
    let (id, run_id, kind, v, at, data) = parts.map_err(|e| corrupt(seq, e))?;
    let v = u16::try_from(v).map_err(|_| corrupt(seq, format!("event version {v} out of range")))?;
    let data = EventData::from_parts(kind, data).map_err(|e| corrupt(seq, e))?;
    Ok(Event { seq, id: EventId(id), run_id: RunId(run_id), at: Timestamp(at), v, data })
}

fn project(
    c: &mut impl GenericClient,
    stmts: &mut crate::conn::StmtCache,
    event: &Event,
) -> Result<(), postgres::Error> {
    let at = event.at.as_micros();
    let run = event.run_id.as_str();
    match descartes_core::store::run_change(&event.data) {
        Some(descartes_core::store::RunChange::Insert { prompt, provider, model }) => {
            let s = stmts.get(
                c,
                "INSERT INTO runs (run_id, status, prompt, provider, model, started_at, updated_at)
                 VALUES ($1, 'running', $2, $3, $4, $5, $5) ON CONFLICT (run_id) DO NOTHING",
            )?;
            c.execute(&s, &[&run, &prompt, &provider, &model, &at])?;
        }
        Some(descartes_core::store::RunChange::Status { status, provider }) => {
            let s = stmts.get(c, "UPDATE runs SET status = $2, updated_at = $3 WHERE run_id = $1")?;
            c.execute(&s, &[&run, &status, &at])?;
            if let Some((p, m)) = provider {
                let s = stmts.get(c, "UPDATE runs SET provider = $2, model = $3 WHERE run_id = $1")?;
                c.execute(&s, &[&run, &p, &m])?;
            }
        }
        Some(descartes_core::store::RunChange::Usage { tokens, estimated_tokens, cost_usd }) => {
            let s = stmts.get(
                c,
                "UPDATE runs SET tokens = tokens + $2, cost_usd = cost_usd + $3, updated_at = $4,
                 estimated_tokens = estimated_tokens + $5,
                 status = CASE WHEN status = 'parked' THEN 'running' ELSE status END WHERE run_id = $1",
            )?;
            let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
            let estimated = i64::try_from(estimated_tokens).unwrap_or(i64::MAX);
            c.execute(&s, &[&run, &tokens, &cost_usd, &at, &estimated])?;
        }
        None => {}
    }
    Ok(())
}

/// Inserts `events` with consecutive seqs; returns the seq before the first.
fn insert_events(
    c: &mut impl GenericClient,
    stmts: &mut crate::conn::StmtCache,
    events: &[&Prepared],
) -> Result<Seq, postgres::Error> {
    let n = i64::try_from(events.len()).unwrap_or(i64::MAX);
    let ids: Vec<&str> = events.iter().map(|p| p.event.id.as_str()).collect();
    let runs: Vec<&str> = events.iter().map(|p| p.event.run_id.as_str()).collect();
    let kinds: Vec<&str> = events.iter().map(|p| p.event.data.kind()).collect();
    let vs: Vec<i32> = events.iter().map(|_| i32::from(EVENT_VERSION)).collect();
    let ats: Vec<i64> = events.iter().map(|p| p.event.at.as_micros()).collect();
    let keys: Vec<Option<&str>> = events.iter().map(|p| p.event.key.as_deref()).collect();
    let datas: Vec<&str> = events.iter().map(|p| p.json.as_str()).collect();
    let s = stmts.get(c, INSERT_EVENTS)?;
    let row = c.query_one(&s, &[&n, &ids, &runs, &kinds, &vs, &ats, &keys, &datas])?;
    row.try_get(0)
}

fn writer_loop(mut conn: Option<Conn>, pool: Arc<Pool>, rx: mpsc::Receiver<Cmd>, notify_tx: watch::Sender<Seq>) {
    let mut queue: Vec<Cmd> = Vec::new();
    let mut batcher = Batcher::default();
    let is_deferred = |c: &Cmd| matches!(c, Cmd::Append { durable: false, .. });
    while batcher.gather(&rx, &mut queue, is_deferred) {
        write_batch(&mut conn, &pool, &mut queue, &notify_tx);
    }
    if !queue.is_empty() {
        write_batch(&mut conn, &pool, &mut queue, &notify_tx);
    }
}

/// Where each appended event's result comes from.
enum Slot {
    /// The i-th inserted event.
    New(usize),
    /// Its idempotency key was already in the log.
    Existing(Box<Event>),
    /// Its key was used by an earlier event of the same batch.
    Dup(String),
}

fn write_batch(conn: &mut Option<Conn>, pool: &Pool, queue: &mut Vec<Cmd>, notify_tx: &watch::Sender<Seq>) {
    let cmds = std::mem::take(queue);
    if conn.as_mut().is_some_and(|c| !c.alive()) {
        conn.take();
    }
    let result = match conn {
        Some(c) => write(c, &cmds),
        None => match Conn::open(&pool.target, &pool.options) {
            Ok(c) => write(conn.insert(c), &cmds),
            Err(e) => Err(e),
        },
    };
    match (&result, conn.as_mut()) {
        (Ok(_), Some(c)) => c.last_used = Instant::now(),
        // Reconnect at the next batch.
        (Err(e), Some(c)) if c.client.is_closed() || is_connection_error(e) => {
            conn.take();
        }
        _ => {}
    }
    let result = result.map_err(|e| pool.target.error(&e));
    match result {
        Ok(written) => {
            if let Some(last) = written.iter().flatten().map(|e| e.seq).max() {
                notify(notify_tx, last);
            }
            for (cmd, events) in cmds.into_iter().zip(written) {
                match cmd {
                    Cmd::Append { reply, .. } | Cmd::Flush { reply } => {
                        let _ = reply.send(Ok(events));
                    }
                }
            }
        }
        Err(err) => {
            tracing::error!(error = %err, "event store write failed");
            for cmd in cmds {
                match cmd {
                    Cmd::Append { reply, .. } | Cmd::Flush { reply } => {
                        let _ = reply.send(Err(match &err {
                            StoreError::Io { message, busy } => {
                                StoreError::Io { message: message.clone(), busy: *busy }
                            }
                            _ => StoreError::Closed,
                        }));
                    }
                }
            }
        }
    }
}

fn write(conn: &mut Conn, cmds: &[Cmd]) -> Result<Vec<Vec<Event>>, postgres::Error> {
    let all: Vec<&Prepared> = cmds
        .iter()
        .flat_map(|c| match c {
            Cmd::Append { events, .. } => events.iter().collect::<Vec<_>>(),
            Cmd::Flush { .. } => Vec::new(),
        })
        .collect();
    let keyed = all.iter().any(|p| p.event.key.is_some());
    let lifecycle = all.iter().any(|p| descartes_core::store::run_change(&p.event.data).is_some());
    let Conn { client, stmts, .. } = conn;
    if all.is_empty() {
        return Ok(cmds.iter().map(|_| Vec::new()).collect());
    }
    if !keyed && !lifecycle {
        // One statement, committed on its own: the common case costs one round trip.
        let base = insert_events(client, stmts, &all)?;
        let mut seq = base;
        return Ok(cmds
            .iter()
            .map(|c| match c {
                Cmd::Append { events, .. } => events
                    .iter()
                    .map(|p| {
                        seq += 1;
                        event_of(p, seq)
                    })
                    .collect(),
                Cmd::Flush { .. } => Vec::new(),
            })
            .collect());
    }
    let mut tx = client.transaction()?;
    let mut existing: HashMap<String, Event> = HashMap::new();
    if keyed {
        // Lock the counter first: no other appender can insert the same key until we commit.
        let s = stmts.get(&mut tx, "SELECT value FROM event_seq FOR UPDATE")?;
        tx.query_one(&s, &[])?;
        let keys: Vec<&str> = all.iter().filter_map(|p| p.event.key.as_deref()).collect();
        let s = stmts.get(&mut tx, "SELECT seq, id, run_id, type, v, at, data, key FROM events WHERE key = ANY($1)")?;
        for row in tx.query(&s, &[&keys])? {
            let key: String = row.try_get(7)?;
            let seq: Seq = row.try_get(0)?;
            let kind: &str = row.try_get(3)?;
            let data: &str = row.try_get(6)?;
            let v: i32 = row.try_get(4)?;
            // The stored event, as this build reads it (verbatim if it cannot).
            let data = EventData::from_parts(kind, data).unwrap_or_else(|_| EventData::Unknown {
                kind: kind.to_owned(),
                data: serde_json::from_str(data).unwrap_or_else(|_| serde_json::Value::String(data.to_owned())),
            });
            let event = Event {
                seq,
                id: EventId(row.try_get(1)?),
                run_id: RunId(row.try_get(2)?),
                at: Timestamp(row.try_get(5)?),
                v: u16::try_from(v).unwrap_or(EVENT_VERSION),
                data,
            };
            existing.insert(key, event);
        }
    }
    let mut inserts: Vec<&Prepared> = Vec::new();
    let mut seen_keys: HashMap<&str, usize> = HashMap::new();
    let mut slots: Vec<Vec<Slot>> = Vec::with_capacity(cmds.len());
    for c in cmds {
        let Cmd::Append { events, .. } = c else {
            slots.push(Vec::new());
            continue;
        };
        let mut s = Vec::with_capacity(events.len());
        for p in events {
            let key = p.event.key.as_deref();
            if let Some(e) = key.and_then(|k| existing.get(k)) {
                s.push(Slot::Existing(Box::new(e.clone())));
            } else if let Some(k) = key.filter(|k| seen_keys.contains_key(k)) {
                s.push(Slot::Dup(k.to_owned()));
            } else {
                if let Some(k) = key {
                    seen_keys.insert(k, inserts.len());
                }
                s.push(Slot::New(inserts.len()));
                inserts.push(p);
            }
        }
        slots.push(s);
    }
    let base = if inserts.is_empty() { 0 } else { insert_events(&mut tx, stmts, &inserts)? };
    let inserted: Vec<Event> = inserts.iter().zip(1..).map(|(p, i)| event_of(p, base + i)).collect();
    for e in &inserted {
        project(&mut tx, stmts, e)?;
    }
    tx.commit()?;
    let by_key = |k: &str| seen_keys.get(k).and_then(|&i| inserted.get(i)).cloned();
    Ok(slots
        .into_iter()
        .map(|s| {
            s.into_iter()
                .filter_map(|slot| match slot {
                    Slot::New(i) => inserted.get(i).cloned(),
                    Slot::Existing(e) => Some(*e),
                    Slot::Dup(k) => by_key(&k),
                })
                .collect()
        })
        .collect())
}

fn event_of(p: &Prepared, seq: Seq) -> Event {
    let e = &p.event;
    Event { seq, id: e.id.clone(), run_id: e.run_id.clone(), at: e.at, v: EVENT_VERSION, data: e.data.clone() }
}

/// The runs projection, newest first.
const LIST_RUNS: &str = "SELECT run_id, status, prompt, provider, model, started_at, updated_at, tokens, cost_usd, \
     estimated_tokens FROM runs ORDER BY started_at DESC, run_id DESC";
/// One run's summary.
const RUN_SUMMARY: &str = "SELECT run_id, status, prompt, provider, model, started_at, updated_at, tokens, cost_usd, \
     estimated_tokens FROM runs WHERE run_id = $1";

fn run_summary_row(r: &postgres::Row) -> Result<RunSummary, postgres::Error> {
    Ok(RunSummary {
        run_id: RunId(r.try_get(0)?),
        status: r.try_get(1)?,
        prompt: r.try_get(2)?,
        provider: r.try_get(3)?,
        model: r.try_get(4)?,
        started_at: Timestamp(r.try_get(5)?),
        updated_at: Timestamp(r.try_get(6)?),
        tokens: u64::try_from(r.try_get::<_, i64>(7)?).unwrap_or(0),
        cost_usd: r.try_get(8)?,
        estimated_tokens: u64::try_from(r.try_get::<_, i64>(9)?).unwrap_or(0),
    })
}

#[async_trait]
impl EventStore for PgStore {
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Event>, StoreError> {
        self.enqueue(events, true).await.map_err(|_| StoreError::Closed)?
    }

    fn append_deferred(&self, events: Vec<NewEvent>) -> DeferredAppend {
        let rx = self.enqueue(events, false);
        Box::pin(async move { rx.await.map_err(|_| StoreError::Closed)? })
    }

    async fn read_run(&self, run_id: &RunId, after: Seq) -> Result<Vec<Event>, StoreError> {
        let run = run_id.0.clone();
        self.read_events(READ_RUN, move || vec![Box::new(run.clone()), Box::new(after)]).await
    }

    async fn read_all(&self, after: Seq, limit: usize) -> Result<Vec<Event>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_events(READ_ALL, move || vec![Box::new(after), Box::new(limit)]).await
    }

    async fn last_seq(&self) -> Result<Seq, StoreError> {
        self.with_conn(|conn, target| {
            let Conn { client, stmts, .. } = conn;
            let s = stmts.get(client, LAST_SEQ).map_err(|e| target.error(&e))?;
            client.query_one(&s, &[]).and_then(|r| r.try_get(0)).map_err(|e| target.error(&e))
        })
        .await
    }

    async fn list_runs(&self) -> Result<Vec<RunSummary>, StoreError> {
        self.with_conn(|conn, target| {
            let Conn { client, stmts, .. } = conn;
            let s = stmts.get(client, LIST_RUNS).map_err(|e| target.error(&e))?;
            let rows = client.query(&s, &[]).map_err(|e| target.error(&e))?;
            rows.iter().map(run_summary_row).collect::<Result<Vec<_>, postgres::Error>>().map_err(|e| target.error(&e))
        })
        .await
    }

    async fn run_summary(&self, run_id: &RunId) -> Result<Option<RunSummary>, StoreError> {
        let id = run_id.as_str().to_owned();
        self.with_conn(move |conn, target| {
            let Conn { client, stmts, .. } = conn;
            let s = stmts.get(client, RUN_SUMMARY).map_err(|e| target.error(&e))?;
            let rows = client.query(&s, &[&id]).map_err(|e| target.error(&e))?;
            rows.first().map(run_summary_row).transpose().map_err(|e| target.error(&e))
        })
        .await
    }

    async fn find_runs(&self, prefix: &str) -> Result<Vec<RunId>, StoreError> {
        let prefix = prefix.to_owned();
        self.with_conn(move |conn, target| {
            let Conn { client, stmts, .. } = conn;
            let s = stmts
                .get(client, "SELECT run_id FROM runs WHERE starts_with(run_id, $1) ORDER BY run_id")
                .map_err(|e| target.error(&e))?;
            let rows = client.query(&s, &[&prefix]).map_err(|e| target.error(&e))?;
            rows.iter().map(|r| r.try_get(0).map(RunId)).collect::<Result<Vec<_>, _>>().map_err(|e| target.error(&e))
        })
        .await
    }

    async fn wait_for_events(&self, after: Seq, timeout: Duration) {
        // Our own writes wake us at once; other processes' writes are seen by the caller's
        // re-read after at most POLL.
        let mut rx = self.last.subscribe();
        let _ = tokio::time::timeout(timeout.min(POLL), rx.wait_for(|s| *s > after)).await;
    }

    async fn replay_run(&self, run_id: &RunId) -> Result<RunState, CoreError> {
        let id = run_id.clone();
        let state = self
            .with_conn(move |conn, target| {
                let Conn { client, stmts, .. } = conn;
                let s = stmts.get(client, READ_RUN).map_err(|e| target.error(&e))?;
                let mut state = RunState::new(id.clone());
                let params: [&(dyn ToSql + Sync); 2] = [&id.0, &0i64];
                let mut rows = client.query_raw(&s, params).map_err(|e| target.error(&e))?;
                while let Some(row) = rows.next().map_err(|e| target.error(&e))? {
                    let seq: Seq = row.try_get(0).map_err(|e| target.error(&e))?;
                    let kind: &str = row.try_get(3).map_err(|e| corrupt(seq, e))?;
                    let data: &str = row.try_get(6).map_err(|e| corrupt(seq, e))?;
                    let data = EventData::from_parts(kind, data).map_err(|e| corrupt(seq, e))?;
                    state.apply_owned(seq, data);
                }
                Ok(state)
            })
            .await?;
        state.check_folded()
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Flush { reply })?;
        rx.await.map_err(|_| StoreError::Closed)?.map(|_| ())
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("target", &self.pool.target.display).finish_non_exhaustive()
    }
}
