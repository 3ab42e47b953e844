//! SQLite event store: WAL, embedded migrations, and a writer thread doing group commit.
//!
//! Every append goes through one writer thread per store. The thread takes everything queued,
//! writes it in one transaction and commits once, so many concurrent appenders share one
//! fsync; `descartes_core::batch` decides how long a commit waits for more appends.
//! Reads use their own connections (WAL lets them run beside the writer).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use descartes_core::store::DeferredAppend;
use descartes_core::{CoreError, EventStore, RunState, RunSummary, StoreError};
use descartes_protocol::{EVENT_VERSION, Event, EventData, EventId, NewEvent, RunId, Seq, Timestamp};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{oneshot, watch};

use descartes_core::batch::Batcher;
use descartes_core::store::{RunChange, run_change};

/// Events left out of `run_index` before they are added in bulk (reads scan at most this many
/// recent events besides the index).
pub const INDEX_LAG: Seq = 1024;
/// Page size of new databases.
const PAGE_SIZE: i64 = 1024;
/// How often a follower polls for events written by other processes.
const POLL: Duration = Duration::from_millis(100);

/// How hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// fsync on every commit: an append is on disk when it returns (the default).
    Full,
    /// No fsync per commit (WAL `synchronous=NORMAL`): survives a process crash, not a power
    /// loss. For tests that do not test durability.
    Normal,
}

#[derive(Debug, Clone)]
pub struct SqliteOptions {
    pub sync: SyncMode,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self { sync: SyncMode::Full }
    }
}

/// The migrations, in order. `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE events (
    seq     INTEGER PRIMARY KEY,
    id      TEXT NOT NULL,
    run_id  TEXT NOT NULL,
    type    TEXT NOT NULL,
    v       INTEGER NOT NULL,
    at      INTEGER NOT NULL,
    key     TEXT,
    data    TEXT NOT NULL
);
-- Events by run, written in bulk every INDEX_LAG events (see `index_runs`); the newer tail is
-- found by scanning `events` after `meta.indexed_upto`.
CREATE TABLE run_index (
    run_id  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta (key, value) VALUES ('indexed_upto', 0);
CREATE UNIQUE INDEX events_by_key ON events(key) WHERE key IS NOT NULL;
CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TABLE runs (
    run_id      TEXT PRIMARY KEY,
    status      TEXT NOT NULL,
    prompt      TEXT NOT NULL,
    provider    TEXT NOT NULL,
    model       TEXT NOT NULL,
    started_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
"#,
    r#"
CREATE TABLE tasks (
    id                TEXT PRIMARY KEY,
    status            TEXT NOT NULL,
    priority          INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    not_before        INTEGER,
    lease_expires_at  INTEGER,
    -- The lock globs as JSON, NULL when the task locks nothing.
    locks             TEXT,
    data              TEXT NOT NULL
);
CREATE INDEX tasks_queue ON tasks(status, priority DESC, created_at, id);
CREATE INDEX tasks_lease ON tasks(lease_expires_at) WHERE lease_expires_at IS NOT NULL;
CREATE TABLE task_deps (
    dep_id   TEXT NOT NULL,
    task_id  TEXT NOT NULL,
    PRIMARY KEY (dep_id, task_id)
) WITHOUT ROWID;
INSERT INTO meta (key, value) VALUES ('fencing', 0);
"#,
    r#"
ALTER TABLE runs ADD COLUMN tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN cost_usd REAL NOT NULL DEFAULT 0;
"#,
    r#"
-- The agent registry (a projection of the `agent:<name>` streams).
CREATE TABLE agents (
    name  TEXT PRIMARY KEY,
    data  TEXT NOT NULL
) WITHOUT ROWID;
-- The tasks' audit trail: hash-chained records, one per event (see descartes_core::audit).
CREATE TABLE audit (
    task_id  TEXT NOT NULL,
    n        INTEGER NOT NULL,
    stream   TEXT NOT NULL,
    seq      INTEGER NOT NULL,
    kind     TEXT NOT NULL,
    at       INTEGER NOT NULL,
    digest   TEXT NOT NULL,
    prev     TEXT NOT NULL,
    hash     TEXT NOT NULL,
    PRIMARY KEY (task_id, n)
) WITHOUT ROWID;
"#,
    r#"
-- Tokens counted by Descartes for providers that report no usage (see Usage::estimated).
ALTER TABLE runs ADD COLUMN estimated_tokens INTEGER NOT NULL DEFAULT 0;
"#,
];

pub(crate) enum Cmd {
    Append {
        events: Vec<Prepared>,
        durable: bool,
        reply: oneshot::Sender<Result<Vec<Event>, StoreError>>,
    },
    Flush {
        reply: oneshot::Sender<Result<Vec<Event>, StoreError>>,
    },
    /// Any other write (task operations), run inside the batch's transaction under its own
    /// savepoint: an operation that fails is rolled back alone.
    Tx {
        op: TxOp,
    },
}

/// A write run in the writer's transaction. It says whether it succeeded (else its savepoint is
/// rolled back) and returns what to do once the transaction's fate is known (reply after commit).
pub(crate) type TxOp = Box<dyn FnOnce(&rusqlite::Transaction<'_>) -> (bool, TxDone) + Send>;
pub(crate) type TxDone = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

pub(crate) struct Prepared {
    event: NewEvent,
    json: String,
}

/// The SQLite event store.
pub struct SqliteEventStore {
    path: PathBuf,
    tx: Mutex<Option<mpsc::Sender<Cmd>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    /// At most [`MAX_READERS`] reads at once: many followers (a server's streams) queue here
    /// instead of holding a blocking thread and a connection each.
    reading: Arc<tokio::sync::Semaphore>,
    last: watch::Sender<Seq>,
    /// Whether the shared poller of other processes' writes runs (see `wait_for_events`).
    polling: std::sync::atomic::AtomicBool,
    /// Dropped with the store: the poller stops.
    alive: Arc<()>,
    pub(crate) clock: Arc<dyn descartes_core::Clock>,
}

/// The most reads of the log at once (each on a blocking thread with a connection of its own).
const MAX_READERS: usize = 8;

/// Runs `f` on a pooled reader connection (opened when none is free), on a blocking thread,
/// once one of [`MAX_READERS`] permits is free.
async fn read_pooled<T: Send + 'static>(
    readers: Arc<Mutex<Vec<Connection>>>,
    path: PathBuf,
    reading: Arc<tokio::sync::Semaphore>,
    f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let permit = reading.acquire_owned().await.map_err(|_| StoreError::Closed)?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let conn = readers.lock().map_err(|_| StoreError::Closed)?.pop();
        let conn = match conn {
            Some(c) => c,
            None => open_conn(&path, SyncMode::Normal).map_err(io_err)?,
        };
        let result = f(&conn);
        if let Ok(mut pool) = readers.lock() {
            pool.push(conn);
        }
        result
    })
    .await
    .map_err(|e| StoreError::Io { message: format!("reader task failed: {e}"), busy: false })?
}

pub(crate) fn io_err(e: rusqlite::Error) -> StoreError {
    let busy =
        matches!(e.sqlite_error_code(), Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked));
    StoreError::Io { message: e.to_string(), busy }
}

impl SqliteEventStore {
    /// Opens (creating if needed) the database at `path` and runs pending migrations.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<Self, StoreError> {
        let open_err = |message: String| StoreError::Open { path: path.display().to_string(), message };
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        }
        let mut conn = open_conn(path, options.sync).map_err(|e| open_err(e.to_string()))?;
        migrate(&mut conn).map_err(|e| open_err(e.to_string()))?;
        let last: Seq = conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))
            .map_err(|e| open_err(e.to_string()))?;
        let (last_tx, _) = watch::channel(last);
        let (tx, rx) = mpsc::channel();
        let notify = last_tx.clone();
        let writer = std::thread::Builder::new()
            .name("descartes-event-writer".into())
            .spawn(move || writer_loop(conn, rx, notify))
            .map_err(|e| open_err(e.to_string()))?;
        Ok(Self {
            path: path.to_owned(),
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            readers: Arc::new(Mutex::new(Vec::new())),
            reading: Arc::new(tokio::sync::Semaphore::new(MAX_READERS)),
            last: last_tx,
            polling: std::sync::atomic::AtomicBool::new(false),
            alive: Arc::new(()),
            clock: Arc::new(descartes_core::SystemClock),
        })
    }

    /// Uses this clock for task leases (tests use a manual clock).
    pub fn with_clock(mut self, clock: Arc<dyn descartes_core::Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn send(&self, cmd: Cmd) -> Result<(), StoreError> {
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
        match prepared {
            Ok(events) => {
                if let Err(e) = self.send(Cmd::Append { events, durable, reply }) {
                    let (reply, rx) = oneshot::channel();
                    let _ = reply.send(Err(e));
                    return rx;
                }
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
        rx
    }

    /// Appends from synchronous code (benchmarks, tools without a runtime): blocks until
    /// durable.
    pub fn append_blocking(&self, events: Vec<NewEvent>) -> Result<Vec<Event>, StoreError> {
        self.enqueue(events, true).blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// Stops the writer after it has written everything queued. Later appends fail.
    pub fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut w) = self.writer.lock()
            && let Some(handle) = w.take()
        {
            let _ = handle.join();
        }
    }

    pub(crate) fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static {
        read_pooled(self.readers.clone(), self.path.clone(), self.reading.clone(), f)
    }

    /// Starts, once, the task that looks for other processes' writes every [`POLL`] while
    /// anyone waits for events, and moves `last` when the log grew. It stops with the store.
    fn start_poller(&self) {
        use std::sync::atomic::Ordering;
        if self.polling.swap(true, Ordering::SeqCst) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.polling.store(false, Ordering::SeqCst);
            return;
        };
        let alive = Arc::downgrade(&self.alive);
        let last = self.last.clone();
        let (readers, path, reading) = (self.readers.clone(), self.path.clone(), self.reading.clone());
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(POLL).await;
                if alive.upgrade().is_none() {
                    return;
                }
                if last.receiver_count() == 0 {
                    continue;
                }
                let max = read_pooled(readers.clone(), path.clone(), reading.clone(), |c: &Connection| {
                    c.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get::<_, Seq>(0)).map_err(io_err)
                })
                .await;
                if let Ok(max) = max {
                    last.send_if_modified(|s| {
                        let grew = max > *s;
                        if grew {
                            *s = max;
                        }
                        grew
                    });
                }
            }
        });
    }

    /// Reads one run's events synchronously (benchmarks and tools without a runtime).
    pub fn read_run_blocking(&self, run_id: &RunId, after: Seq) -> Result<Vec<Event>, StoreError> {
        let conn = open_conn(&self.path, SyncMode::Normal).map_err(io_err)?;
        read_run_events(&conn, run_id, after)
    }
}

impl Drop for SqliteEventStore {
    fn drop(&mut self) {
        self.close();
    }
}

fn open_conn(path: &Path, sync: SyncMode) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // Small pages: a commit writes every page it dirtied to the WAL, and concurrent runs dirty
    // one index page each (only takes effect when the database is created).
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "wal_autocheckpoint", 16384)?;
    conn.pragma_update(None, "synchronous", if sync == SyncMode::Full { "FULL" } else { "NORMAL" })?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Reads map the file instead of copying pages (replaying long runs is read-bound).
    conn.pragma_update(None, "mmap_size", 1i64 << 30)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: usize = tx.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
    }
    tx.commit()
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Cmd>, notify: watch::Sender<Seq>) {
    let mut queue: Vec<Cmd> = Vec::new();
    let mut batcher = Batcher::default();
    let is_deferred = |c: &Cmd| matches!(c, Cmd::Append { durable: false, .. });
    while batcher.gather(&rx, &mut queue, is_deferred) {
        write_batch(&mut conn, &mut queue, &notify);
    }
    if !queue.is_empty() {
        write_batch(&mut conn, &mut queue, &notify);
    }
}

fn write_batch(conn: &mut Connection, queue: &mut Vec<Cmd>, notify: &watch::Sender<Seq>) {
    let mut dones: Vec<TxDone> = Vec::new();
    let mut wrote_other = false;
    let mut other_last: Option<Seq> = None;
    let result = (|| -> Result<Vec<Vec<Event>>, rusqlite::Error> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut written = Vec::with_capacity(queue.len());
        {
            let mut insert_keyed = tx.prepare_cached(
                "INSERT INTO events (id, run_id, type, v, at, key, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (key) WHERE key IS NOT NULL DO NOTHING RETURNING seq",
            )?;
            let mut insert = tx
                .prepare_cached("INSERT INTO events (id, run_id, type, v, at, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
            for cmd in queue.iter_mut() {
                if let Cmd::Tx { .. } = cmd {
                    let Cmd::Tx { op } = std::mem::replace(cmd, Cmd::Tx { op: Box::new(|_| (true, Box::new(|_| ()))) })
                    else {
                        continue;
                    };
                    tx.prepare_cached("SAVEPOINT task_op")?.execute([])?;
                    let (ok, on_done) = op(&tx);
                    if !ok {
                        tx.prepare_cached("ROLLBACK TO task_op")?.execute([])?;
                    }
                    tx.prepare_cached("RELEASE task_op")?.execute([])?;
                    dones.push(on_done);
                    wrote_other = true;
                    written.push(Vec::new());
                    continue;
                }
                let Cmd::Append { events, .. } = cmd else {
                    written.push(Vec::new());
                    continue;
                };
                let mut out = Vec::with_capacity(events.len());
                for p in events.drain(..) {
                    let e = p.event;
                    let seq: Option<Seq> = match &e.key {
                        None => {
                            insert.execute(params![
                                e.id.as_str(),
                                e.run_id.as_str(),
                                e.data.kind(),
                                EVENT_VERSION,
                                e.at.as_micros(),
                                p.json
                            ])?;
                            Some(tx.last_insert_rowid())
                        }
                        Some(key) => insert_keyed
                            .query_row(
                                params![
                                    e.id.as_str(),
                                    e.run_id.as_str(),
                                    e.data.kind(),
                                    EVENT_VERSION,
                                    e.at.as_micros(),
                                    key,
                                    p.json
                                ],
                                |r| r.get(0),
                            )
                            .optional()?,
                    };
                    let event = match seq {
                        Some(seq) => {
                            let event =
                                Event { seq, id: e.id, run_id: e.run_id, at: e.at, v: EVENT_VERSION, data: e.data };
                            project(&tx, &event)?;
                            event
                        }
                        // Idempotency key already present: return the stored event.
                        None => existing_by_key(&tx, e.key.as_deref().unwrap_or_default())?,
                    };
                    out.push(event);
                }
                written.push(out);
            }
        }
        if wrote_other {
            other_last =
                Some(tx.prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM events")?.query_row([], |r| r.get(0))?);
        }
        if let Some(last) = written.iter().flatten().map(|e| e.seq).max().max(other_last) {
            index_runs(&tx, last)?;
        }
        tx.commit()?;
        Ok(written)
    })();
    let cmds = std::mem::take(queue);
    let outcome = match &result {
        Ok(_) => Ok(()),
        Err(e) => Err(StoreError::Io { message: e.to_string(), busy: false }),
    };
    for done in dones {
        done(match &outcome {
            Ok(()) => Ok(()),
            Err(StoreError::Io { message, busy }) => Err(StoreError::Io { message: message.clone(), busy: *busy }),
            Err(_) => Err(StoreError::Closed),
        });
    }
    match result {
        Ok(written) => {
            let last = written.iter().flatten().map(|e| e.seq).max().max(other_last);
            for (cmd, events) in cmds.into_iter().zip(written) {
                match cmd {
                    Cmd::Append { reply, .. } | Cmd::Flush { reply } => {
                        let _ = reply.send(Ok(events));
                    }
                    Cmd::Tx { .. } => {}
                }
            }
            if let Some(last) = last {
                notify.send_if_modified(|s| {
                    let changed = last > *s;
                    *s = (*s).max(last);
                    changed
                });
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "event store write failed");
            let err = io_err(e);
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
                    Cmd::Tx { .. } => {}
                }
            }
        }
    }
}

/// Adds the events not yet in `run_index` once there are at least [`INDEX_LAG`] of them. Done
/// in bulk so that a commit of concurrent runs' events does not dirty one index page per run:
/// the index pages are written once per INDEX_LAG events instead.
fn index_runs(tx: &rusqlite::Transaction<'_>, last: Seq) -> rusqlite::Result<()> {
    let upto: Seq =
        tx.prepare_cached("SELECT value FROM meta WHERE key = 'indexed_upto'")?.query_row([], |r| r.get(0))?;
    if last - upto < INDEX_LAG {
        return Ok(());
    }
    tx.prepare_cached(
        "INSERT INTO run_index (run_id, seq) SELECT run_id, seq FROM events WHERE seq > ?1 AND seq <= ?2 ORDER BY run_id, seq",
    )?
    .execute(params![upto, last])?;
    tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'indexed_upto'")?.execute([last])?;
    Ok(())
}

fn project(tx: &rusqlite::Transaction<'_>, event: &Event) -> rusqlite::Result<()> {
    match run_change(&event.data) {
        Some(RunChange::Insert { prompt, provider, model }) => {
            tx.prepare_cached(
                "INSERT INTO runs (run_id, status, prompt, provider, model, started_at, updated_at)
                 VALUES (?1, 'running', ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT (run_id) DO NOTHING",
            )?
            .execute(params![event.run_id.as_str(), prompt, provider, model, event.at.as_micros()])?;
        }
        Some(RunChange::Status { status, provider }) => {
            tx.prepare_cached("UPDATE runs SET status = ?2, updated_at = ?3 WHERE run_id = ?1")?.execute(params![
                event.run_id.as_str(),
                status,
                event.at.as_micros()
            ])?;
            if let Some((p, m)) = provider {
                tx.prepare_cached("UPDATE runs SET provider = ?2, model = ?3 WHERE run_id = ?1")?.execute(params![
                    event.run_id.as_str(),
                    p,
                    m
                ])?;
            }
        }
        Some(RunChange::Usage { tokens, estimated_tokens, cost_usd }) => {
            tx.prepare_cached(
                "UPDATE runs SET tokens = tokens + ?2, cost_usd = cost_usd + ?3, updated_at = ?4,
                 estimated_tokens = estimated_tokens + ?5,
                 status = CASE WHEN status = 'parked' THEN 'running' ELSE status END WHERE run_id = ?1",
            )?
            .execute(params![
                event.run_id.as_str(),
                i64::try_from(tokens).unwrap_or(i64::MAX),
                cost_usd,
                event.at.as_micros(),
                i64::try_from(estimated_tokens).unwrap_or(i64::MAX)
            ])?;
        }
        None => {}
    }
    Ok(())
}

fn existing_by_key(tx: &rusqlite::Transaction<'_>, key: &str) -> rusqlite::Result<Event> {
    let mut stmt = tx.prepare_cached(&format!("{SELECT} WHERE key = ?1"))?;
    let row = stmt.query_row([key], row_parts)?;
    to_event(row).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

const SELECT: &str = "SELECT seq, id, run_id, type, v, at, data FROM events";

/// The events of run ?1 with ?2 < seq <= ?3 that `run_index` holds, in order.
const RUN_INDEXED: &str = "SELECT e.seq, e.id, e.run_id, e.type, e.v, e.at, e.data
     FROM run_index r JOIN events e ON e.seq = r.seq
     WHERE r.run_id = ?1 AND r.seq > ?2 AND r.seq <= ?3 ORDER BY r.seq";
/// The events of run ?1 after seq ?2 that are not indexed yet (a scan of at most INDEX_LAG-odd rows).
const RUN_TAIL: &str =
    "SELECT seq, id, run_id, type, v, at, data FROM events WHERE seq > ?2 AND run_id = ?1 ORDER BY seq";

/// Visits the events of a run after `after`, in order: the indexed part through `run_index`,
/// then the tail not indexed yet. Both are read in one transaction (one snapshot), so nothing
/// is missed or seen twice.
fn for_run_events(
    conn: &Connection,
    run_id: &RunId,
    after: Seq,
    mut f: impl FnMut(&rusqlite::Row<'_>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let tx = conn.unchecked_transaction().map_err(io_err)?;
    let upto: Seq = tx
        .prepare_cached("SELECT value FROM meta WHERE key = 'indexed_upto'")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(io_err)?;
    if after < upto {
        let mut stmt = tx.prepare_cached(RUN_INDEXED).map_err(io_err)?;
        let mut rows = stmt.query(params![run_id.as_str(), after, upto]).map_err(io_err)?;
        while let Some(row) = rows.next().map_err(io_err)? {
            f(row)?;
        }
    }
    let mut stmt = tx.prepare_cached(RUN_TAIL).map_err(io_err)?;
    let mut rows = stmt.query(params![run_id.as_str(), after.max(upto)]).map_err(io_err)?;
    while let Some(row) = rows.next().map_err(io_err)? {
        f(row)?;
    }
    Ok(())
}

type RowParts = (Seq, String, String, String, u16, i64, String);

fn row_parts(r: &rusqlite::Row<'_>) -> rusqlite::Result<RowParts> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
}

fn to_event((seq, id, run_id, kind, v, at, data): RowParts) -> Result<Event, StoreError> {
    let data = EventData::from_parts(&kind, &data).map_err(|e| StoreError::Corrupt { seq, message: e.to_string() })?;
    Ok(Event { seq, id: EventId(id), run_id: RunId(run_id), at: Timestamp(at), v, data })
}

fn read_run_events(conn: &Connection, run_id: &RunId, after: Seq) -> Result<Vec<Event>, StoreError> {
    let mut out = Vec::new();
    for_run_events(conn, run_id, after, |row| {
        out.push(to_event(row_parts(row).map_err(io_err)?)?);
        Ok(())
    })?;
    Ok(out)
}

fn read_events(conn: &Connection, clause: &str, params: impl rusqlite::Params) -> Result<Vec<Event>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("{SELECT} {clause}")).map_err(io_err)?;
    let rows = stmt.query_map(params, row_parts).map_err(io_err)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(to_event(row.map_err(io_err)?)?);
    }
    Ok(out)
}

/// Rebuilds a run's state while reading it: each row is decoded and folded as it is read, so
/// no event is materialized beyond its payload.
fn replay(conn: &Connection, run_id: RunId) -> Result<RunState, StoreError> {
    let mut state = RunState::new(run_id.clone());
    for_run_events(conn, &run_id, 0, |row| {
        let seq: Seq = row.get(0).map_err(io_err)?;
        let kind = row.get_ref(3).and_then(|v| Ok(v.as_str()?)).map_err(io_err)?;
        let data = row.get_ref(6).and_then(|v| Ok(v.as_str()?)).map_err(io_err)?;
        let data =
            EventData::from_parts(kind, data).map_err(|e| StoreError::Corrupt { seq, message: e.to_string() })?;
        state.apply_owned(seq, data);
        Ok(())
    })?;
    Ok(state)
}

/// The columns of a run's summary (`runs` projection).
const RUN_SUMMARY: &str = "SELECT run_id, status, prompt, provider, model, started_at, updated_at, tokens, cost_usd, estimated_tokens FROM runs";

fn run_summary_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunSummary> {
    Ok(RunSummary {
        run_id: RunId(r.get(0)?),
        status: r.get(1)?,
        prompt: r.get(2)?,
        provider: r.get(3)?,
        model: r.get(4)?,
        started_at: Timestamp(r.get(5)?),
        updated_at: Timestamp(r.get(6)?),
        tokens: u64::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
        cost_usd: r.get(8)?,
        estimated_tokens: u64::try_from(r.get::<_, i64>(9)?).unwrap_or(0),
    })
}

#[async_trait]
impl EventStore for SqliteEventStore {
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Event>, StoreError> {
        self.enqueue(events, true).await.map_err(|_| StoreError::Closed)?
    }

    fn append_deferred(&self, events: Vec<NewEvent>) -> DeferredAppend {
        let rx = self.enqueue(events, false);
        Box::pin(async move { rx.await.map_err(|_| StoreError::Closed)? })
    }

    async fn read_run(&self, run_id: &RunId, after: Seq) -> Result<Vec<Event>, StoreError> {
        let run_id = run_id.clone();
        self.with_reader(move |c| read_run_events(c, &run_id, after)).await
    }

    async fn read_all(&self, after: Seq, limit: usize) -> Result<Vec<Event>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_reader(move |c| read_events(c, "WHERE seq > ?1 ORDER BY seq LIMIT ?2", params![after, limit])).await
    }

    async fn last_seq(&self) -> Result<Seq, StoreError> {
        self.with_reader(|c| c.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0)).map_err(io_err))
            .await
    }

    async fn list_runs(&self) -> Result<Vec<RunSummary>, StoreError> {
        self.with_reader(|c| {
            let mut stmt =
                c.prepare_cached(&format!("{RUN_SUMMARY} ORDER BY started_at DESC, run_id DESC")).map_err(io_err)?;
            let rows = stmt.query_map([], run_summary_row).map_err(io_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(io_err)
        })
        .await
    }

    async fn run_summary(&self, run_id: &RunId) -> Result<Option<RunSummary>, StoreError> {
        let id = run_id.as_str().to_owned();
        self.with_reader(move |c| {
            let mut stmt = c.prepare_cached(&format!("{RUN_SUMMARY} WHERE run_id = ?1")).map_err(io_err)?;
            let mut rows = stmt.query_map([id], run_summary_row).map_err(io_err)?;
            rows.next().transpose().map_err(io_err)
        })
        .await
    }

    async fn find_runs(&self, prefix: &str) -> Result<Vec<RunId>, StoreError> {
        let prefix = prefix.to_owned();
        self.with_reader(move |c| {
            let mut stmt = c
                // A range of the primary key (binary collation): every id that starts with the
                // prefix sorts between it and it followed by the last code point.
                .prepare_cached("SELECT run_id FROM runs WHERE run_id >= ?1 AND run_id < ?2 ORDER BY run_id")
                .map_err(io_err)?;
            let upper = format!("{prefix}\u{10FFFF}");
            let rows = stmt.query_map([prefix, upper], |r| Ok(RunId(r.get(0)?))).map_err(io_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(io_err)
        })
        .await
    }

    async fn wait_for_events(&self, after: Seq, timeout: Duration) {
        // Our own writes wake us at once; other processes' writes are seen by one poller shared
        // by every waiter (a server's thousand idle streams make one query per poll, not one
        // each).
        self.start_poller();
        let mut rx = self.last.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|s| *s > after)).await;
    }

    async fn replay_run(&self, run_id: &RunId) -> Result<RunState, CoreError> {
        let id = run_id.clone();
        let state = self.with_reader(move |c| replay(c, id)).await?;
        state.check_folded()
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Flush { reply })?;
        rx.await.map_err(|_| StoreError::Closed)?.map(|_| ())
    }
}
