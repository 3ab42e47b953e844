//! `TaskStore` on PostgreSQL: the shared rules of `descartes_core::task` run unchanged inside
//! one PostgreSQL transaction per operation, through `PgTxn`.
//!
//! Concurrency (several workers, several processes, one database), in READ COMMITTED:
//! - **Claims** pick candidates with `FOR UPDATE SKIP LOCKED`: concurrent claimers never wait for
//!   each other and never take the same task. Dependencies and `not_before` are checked in the
//!   query too, so the rows a claim locks are ready ones.
//! - **Path locks**: a claim that may take a task with path locks first takes a transaction
//!   advisory lock, so such claims run one at a time and each sees the leases the previous one
//!   committed. Claims made while no ready task with path locks is queued take no lock and
//!   skip tasks with path locks (they cannot conflict with anything).
//! - **Writes** are optimistic: every task row has a `version`; a write based on a read that
//!   another transaction has since changed matches no row, and the whole operation is retried
//!   (a fresh transaction re-reads and re-applies the rules, e.g. a `complete` racing with the
//!   expiry of its lease then fails with `StaleToken`). `create` and `add_dependency` read with
//!   `FOR SHARE`, so a dependency cannot fail (and block its dependents) while a new dependent is
//!   being added; `add_dependency` also takes an advisory lock so cycle checks are race-free.
//! - **Events** are appended in the same transaction, taking the `event_seq` row lock until
//!   commit (see the crate docs). A transaction holding it never waits for another lock: after
//!   its first event, its row locks are taken with `NOWAIT`, and a busy row means "retry the
//!   operation". So no lock cycle can go through the counter.
//! - **Round trips** are what an operation costs, so a claim finds its expired leases and takes
//!   its lock in one statement, fetches fencing tokens with its candidates, and buffers its
//!   writes to rows it holds and its events after the first (their seqs follow from the first's
//!   while the counter is held), sending them in one statement before the commit. A claim of 32
//!   tasks costs six round trips; [`PgStore::complete_many`] completes a batch in as many.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use descartes_core::task::{self, TaskTxn};
use descartes_core::{Clock, StoreError, TaskError, TaskFilter, TaskStore};
use descartes_protocol::{Claim, EVENT_VERSION, EventData, EventId, NewTask, Seq, Task, Timestamp};
use postgres::types::ToSql;
use postgres::{Row, Transaction};

use crate::PgStore;
use crate::conn::{Conn, Pool, StmtCache, Target, is_conflict, is_connection_error};
use crate::schema::{LOCK_CLAIM, LOCK_GRAPH, LOCK_NS};

/// How many times an operation is retried after losing a race with another transaction.
const MAX_RETRIES: u32 = 30;

const GET: &str = "SELECT version, data::text FROM tasks WHERE id = $1";
const GET_SHARE: &str = "SELECT version, data::text FROM tasks WHERE id = $1 FOR SHARE";
const GET_SHARE_NOWAIT: &str = "SELECT version, data::text FROM tasks WHERE id = $1 FOR SHARE NOWAIT";
const LOCK_MANY: &str = "SELECT version, data::text FROM tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE";
const PROBE: &str = "SELECT version FROM tasks WHERE id = $1 FOR UPDATE NOWAIT";
const UPDATE: &str = "UPDATE tasks SET status = $2, priority = $3, not_before = $4, lease_expires_at = $5,
        has_locks = $6, data = $7::text::jsonb, version = version + 1
    WHERE id = $1 AND version = $8 RETURNING version";
const INSERT: &str =
    "INSERT INTO tasks (id, status, priority, created_at, not_before, lease_expires_at, has_locks, version, data)
    VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8::text::jsonb)";
const INSERT_DEPS: &str =
    "INSERT INTO task_deps (task_id, dep_id) SELECT $1, d FROM UNNEST($2::text[]) AS d ON CONFLICT DO NOTHING";
const DEPENDENTS: &str = "SELECT task_id FROM task_deps WHERE dep_id = $1 ORDER BY task_id";
const LEASED_WITH_LOCKS: &str =
    "SELECT version, data::text FROM tasks WHERE has_locks AND status IN ('claimed', 'running') ORDER BY id";
const LEASED_LOCKS: &str =
    "SELECT (data->'locks')::text FROM tasks WHERE has_locks AND status IN ('claimed', 'running')";
const QUEUED: &str = "SELECT t.version, t.data::text FROM tasks t
    WHERE t.status = 'queued' AND (t.not_before IS NULL OR t.not_before <= $1)
      AND NOT EXISTS (SELECT 1 FROM task_deps d JOIN tasks p ON p.id = d.dep_id
                      WHERE d.task_id = t.id AND p.status <> 'done')
    ORDER BY t.priority DESC, t.created_at, t.id
    LIMIT $2
    FOR UPDATE OF t SKIP LOCKED";
/// Queued, ready tasks without path locks, with one fencing token per row (every row is claimed).
const QUEUED_WITH_TOKENS: &str = "WITH q AS (
    SELECT t.version, t.data::text AS data, t.priority, t.created_at, t.id FROM tasks t
    WHERE t.status = 'queued' AND (t.not_before IS NULL OR t.not_before <= $1) AND NOT t.has_locks
      AND NOT EXISTS (SELECT 1 FROM task_deps d JOIN tasks p ON p.id = d.dep_id
                      WHERE d.task_id = t.id AND p.status <> 'done')
    ORDER BY t.priority DESC, t.created_at, t.id
    LIMIT $2
    FOR UPDATE OF t SKIP LOCKED
)
SELECT q.version, q.data,
       (SELECT array_agg(nextval('task_tokens')) FROM generate_series(1, (SELECT count(*) FROM q)))
FROM q ORDER BY q.priority DESC, q.created_at, q.id";
const EXPIRED: &str = "SELECT version, data::text FROM tasks
    WHERE status IN ('claimed', 'running') AND lease_expires_at < $1
    ORDER BY lease_expires_at, id
    FOR UPDATE SKIP LOCKED";
/// The start of a claim, in one round trip: takes the claim lock when a ready task with path
/// locks is queued (first column: 1 if taken), and locks the expired leases to reap.
const CLAIM_BEGIN: &str = "WITH lk AS (
    SELECT pg_advisory_xact_lock($1, $2)::text AS l
    WHERE EXISTS (SELECT 1 FROM tasks WHERE has_locks AND status = 'queued'
                  AND (not_before IS NULL OR not_before <= $3))
), ex AS (
    SELECT version, data::text AS data, lease_expires_at AS exp, id FROM tasks
    WHERE status IN ('claimed', 'running') AND lease_expires_at < $3
    FOR UPDATE SKIP LOCKED
)
SELECT (SELECT count(*) FROM lk), ex.version, ex.data
FROM (SELECT 1) AS one LEFT JOIN ex ON TRUE
ORDER BY ex.exp, ex.id";
/// The first event of a transaction: takes the `event_seq` row lock (until commit).
const APPEND: &str = "WITH c AS (UPDATE event_seq SET value = value + 1 RETURNING value)
    INSERT INTO events (seq, id, run_id, type, v, at, data) SELECT c.value, $1, $2, $3, $4, $5, $6 FROM c
    RETURNING seq";
/// Everything buffered, in one round trip before the commit: the later events (their seqs were
/// handed out under the `event_seq` lock this transaction holds), the counter, and the writes
/// to task rows this transaction holds locked. Fails (division by zero) if a row did not match.
const FLUSH: &str = "WITH ev AS (
    INSERT INTO events (seq, id, run_id, type, v, at, data)
    SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::int8[], $7::text[])
), ctr AS (
    UPDATE event_seq SET value = $8 WHERE $8 > value
), up AS (
    UPDATE tasks t SET status = u.status, priority = u.priority, not_before = u.not_before,
        lease_expires_at = u.lease, has_locks = u.has_locks, data = u.data::jsonb, version = t.version + 1
    FROM UNNEST($9::text[], $10::text[], $11::int4[], $12::int8[], $13::int8[], $14::bool[], $15::text[], $16::int8[])
        AS u(id, status, priority, not_before, lease, has_locks, data, version)
    WHERE t.id = u.id AND t.version = u.version
    RETURNING 1
)
SELECT 1 / (CASE WHEN (SELECT count(*) FROM up) = $17 THEN 1 ELSE 0 END)";
const NEXT_TOKEN: &str = "SELECT nextval('task_tokens')";
const GRAPH_LOCK: &str = "SELECT pg_advisory_xact_lock($1, $2)::text";

/// How reads of single tasks lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadLock {
    None,
    Share,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClaimMode {
    /// Not a claim.
    None,
    /// No ready task with path locks was queued: this claim takes no lock and skips tasks with
    /// path locks; it locks at most `hint` (the claim's `max`) rows, all of them claimable.
    Unlocked { hint: usize },
    /// This claim holds the claim advisory lock and may take tasks with path locks.
    Locked,
}

/// What an operation needs set up before the rules run.
#[derive(Debug, Clone)]
enum Op {
    /// Operations on existing tasks, and reaping.
    Plain,
    Create,
    AddDependency,
    Claim {
        max: usize,
    },
    /// Several tasks, locked up front (in id order).
    Many(Vec<String>),
}

/// A write to a task row this transaction holds, sent with the flush.
struct PendingPut {
    id: String,
    status: &'static str,
    priority: i32,
    not_before: Option<i64>,
    lease: Option<i64>,
    has_locks: bool,
    data: String,
    /// The row's version in the database (the flush's `WHERE version =`).
    version: i64,
}

/// Buffered row writes as statement parameters.
struct Writes<'p> {
    ids: Vec<&'p str>,
    statuses: Vec<&'p str>,
    prios: Vec<i32>,
    not_befores: Vec<Option<i64>>,
    leases: Vec<Option<i64>>,
    locks: Vec<bool>,
    data: Vec<&'p str>,
    versions: Vec<i64>,
    n: i64,
}

impl<'p> Writes<'p> {
    fn of(pending: &'p [PendingPut]) -> Self {
        Writes {
            ids: pending.iter().map(|p| p.id.as_str()).collect(),
            statuses: pending.iter().map(|p| p.status).collect(),
            prios: pending.iter().map(|p| p.priority).collect(),
            not_befores: pending.iter().map(|p| p.not_before).collect(),
            leases: pending.iter().map(|p| p.lease).collect(),
            locks: pending.iter().map(|p| p.has_locks).collect(),
            data: pending.iter().map(|p| p.data.as_str()).collect(),
            versions: pending.iter().map(|p| p.version).collect(),
            n: i64::try_from(pending.len()).unwrap_or(i64::MAX),
        }
    }
}

/// An event whose seq is already fixed, sent with the flush.
struct PendingEvent {
    seq: Seq,
    id: String,
    run_id: String,
    kind: String,
    at: i64,
    data: String,
}

/// One PostgreSQL transaction as the rules see it.
///
/// Round trips are what a task operation costs, so: rows this transaction holds `FOR UPDATE`
/// are kept in `cache` (reading them again needs no query), writes to them are buffered, and
/// so are the events after the first one (whose seqs follow from the first's, the counter being
/// locked); all of that goes to the server in one statement before the commit, or before a
/// query that could see those rows.
struct PgTxn<'a, 'c> {
    tx: &'a mut Transaction<'c>,
    stmts: &'a mut StmtCache,
    target: &'a Target,
    read_lock: ReadLock,
    claim: ClaimMode,
    /// The version of each task in the database as first read in this transaction (`None`: it
    /// did not exist), then as written by it.
    versions: HashMap<String, Option<i64>>,
    /// The dependencies of each task as first read (to insert only new `task_deps` rows).
    deps: HashMap<String, Vec<String>>,
    /// Rows this transaction holds `FOR UPDATE`, as they are now (buffered writes included).
    cache: HashMap<String, Task>,
    pending: Vec<PendingPut>,
    events: Vec<PendingEvent>,
    /// The seq of the next event, once the first one took the counter.
    next_seq: Option<Seq>,
    /// Fencing tokens fetched with the candidates of an unlocked claim.
    tokens: VecDeque<i64>,
    /// Expired leases found (and locked) by the claim's first statement.
    expired: Option<Vec<Task>>,
    max_seq: Seq,
    /// The failure was a lost race: the operation may be retried.
    conflict: bool,
    /// The connection broke before the commit: the operation may be retried on another.
    broken: bool,
}

impl<'a, 'c> PgTxn<'a, 'c> {
    fn new(tx: &'a mut Transaction<'c>, stmts: &'a mut StmtCache, target: &'a Target) -> Self {
        PgTxn {
            tx,
            stmts,
            target,
            read_lock: ReadLock::None,
            claim: ClaimMode::None,
            versions: HashMap::new(),
            deps: HashMap::new(),
            cache: HashMap::new(),
            pending: Vec::new(),
            events: Vec::new(),
            next_seq: None,
            tokens: VecDeque::new(),
            expired: None,
            max_seq: 0,
            conflict: false,
            broken: false,
        }
    }

    fn counter_held(&self) -> bool {
        self.next_seq.is_some()
    }

    fn db(&mut self, e: postgres::Error) -> TaskError {
        if is_conflict(&e) {
            self.conflict = true;
        }
        if is_connection_error(&e) {
            self.broken = true;
        }
        TaskError::Store(self.target.error(&e))
    }

    fn lost_race(&mut self, id: &str) -> TaskError {
        self.conflict = true;
        TaskError::Store(StoreError::Io {
            message: format!("task {id} was changed by a concurrent transaction; retry the operation"),
            busy: true,
        })
    }

    fn query(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, TaskError> {
        let stmt = match self.stmts.get(self.tx, sql) {
            Ok(s) => s,
            Err(e) => return Err(self.db(e)),
        };
        self.tx.query(&stmt, params).map_err(|e| self.db(e))
    }

    fn query_opt(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, TaskError> {
        let stmt = match self.stmts.get(self.tx, sql) {
            Ok(s) => s,
            Err(e) => return Err(self.db(e)),
        };
        self.tx.query_opt(&stmt, params).map_err(|e| self.db(e))
    }

    fn execute(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, TaskError> {
        let stmt = match self.stmts.get(self.tx, sql) {
            Ok(s) => s,
            Err(e) => return Err(self.db(e)),
        };
        self.tx.execute(&stmt, params).map_err(|e| self.db(e))
    }

    /// Decodes the `(version, data)` columns at `at` of a row, remembering the version (and
    /// the row, if `locked`).
    fn task_at(&mut self, row: &Row, at: usize, locked: bool) -> Result<Task, TaskError> {
        let version: i64 = row.try_get(at).map_err(|e| self.db(e))?;
        let data: &str = row.try_get(at + 1).map_err(|e| self.db(e))?;
        let task = decode(data)?;
        self.versions.entry(task.id.clone()).or_insert(Some(version));
        self.deps.entry(task.id.clone()).or_insert_with(|| task.depends_on.clone());
        if locked {
            self.cache.entry(task.id.clone()).or_insert_with(|| task.clone());
        }
        Ok(task)
    }

    fn tasks(&mut self, rows: &[Row], locked: bool) -> Result<Vec<Task>, TaskError> {
        rows.iter().map(|r| self.task_at(r, 0, locked)).collect()
    }

    fn begin(&mut self, op: &Op, now: Timestamp) -> Result<(), TaskError> {
        match op {
            Op::Plain => {}
            Op::Create => self.read_lock = ReadLock::Share,
            Op::AddDependency => {
                self.query(GRAPH_LOCK, &[&LOCK_NS, &LOCK_GRAPH])?;
                self.read_lock = ReadLock::Share;
            }
            Op::Claim { max } => {
                let rows = self.query(CLAIM_BEGIN, &[&LOCK_NS, &LOCK_CLAIM, &now.as_micros()])?;
                let mut locked = false;
                let mut expired = Vec::new();
                for row in &rows {
                    locked |= row.try_get::<_, i64>(0).map_err(|e| self.db(e))? > 0;
                    if row.try_get::<_, Option<i64>>(1).map_err(|e| self.db(e))?.is_some() {
                        expired.push(self.task_at(row, 1, true)?);
                    }
                }
                self.expired = Some(expired);
                self.claim = if locked { ClaimMode::Locked } else { ClaimMode::Unlocked { hint: (*max).max(1) } };
            }
            Op::Many(ids) => {
                let rows = self.query(LOCK_MANY, &[ids])?;
                self.tasks(&rows, true)?;
            }
        }
        Ok(())
    }

    /// Sends the buffered events and row writes.
    fn flush(&mut self) -> Result<(), TaskError> {
        if self.pending.is_empty() && self.events.is_empty() {
            return Ok(());
        }
        if self.events.is_empty() && self.pending.len() == 1 {
            // One row: the plain statement is the cheapest.
            let pending = std::mem::take(&mut self.pending);
            let p = &pending[0];
            let row = self.query_opt(
                UPDATE,
                &[&p.id, &p.status, &p.priority, &p.not_before, &p.lease, &p.has_locks, &p.data, &p.version],
            )?;
            let Some(row) = row else { return Err(self.lost_race(&p.id)) };
            let new: i64 = row.try_get(0).map_err(|e| self.db(e))?;
            self.versions.insert(p.id.clone(), Some(new));
            return Ok(());
        }
        let events = std::mem::take(&mut self.events);
        let pending = std::mem::take(&mut self.pending);
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        let runs: Vec<&str> = events.iter().map(|e| e.run_id.as_str()).collect();
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        let vs: Vec<i32> = events.iter().map(|_| i32::from(EVENT_VERSION)).collect();
        let ats: Vec<i64> = events.iter().map(|e| e.at).collect();
        let datas: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
        let counter: i64 = seqs.last().copied().unwrap_or(0);
        let w = Writes::of(&pending);
        let result = self.query_opt(
            FLUSH,
            &[
                &seqs,
                &ids,
                &runs,
                &kinds,
                &vs,
                &ats,
                &datas,
                &counter,
                &w.ids,
                &w.statuses,
                &w.prios,
                &w.not_befores,
                &w.leases,
                &w.locks,
                &w.data,
                &w.versions,
                &w.n,
            ],
        );
        self.written(result, pending).map(|_| ())
    }

    /// After a statement that wrote `pending`: their new versions, or a lost race when a row
    /// did not match (the statement divides by zero).
    fn written(&mut self, result: Result<Option<Row>, TaskError>, pending: Vec<PendingPut>) -> Result<Row, TaskError> {
        match result {
            Ok(Some(row)) => {
                for p in pending {
                    self.versions.insert(p.id, Some(p.version + 1));
                }
                Ok(row)
            }
            Ok(None) => Err(TaskError::Store(StoreError::Io { message: "no result from a write".into(), busy: false })),
            Err(e) => {
                if e.to_string().contains("(22012)") {
                    self.conflict = true;
                }
                Err(e)
            }
        }
    }
}
fn decode(data: &str) -> Result<Task, TaskError> {
    serde_json::from_str(data)
        .map_err(|e| TaskError::Store(StoreError::Corrupt { seq: 0, message: format!("task record: {e}") }))
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl TaskTxn for PgTxn<'_, '_> {
    fn get(&mut self, id: &str) -> Result<Option<Task>, TaskError> {
        if let Some(t) = self.cache.get(id) {
            return Ok(Some(t.clone()));
        }
        let sql = match (self.read_lock, self.counter_held()) {
            (ReadLock::None, _) => GET,
            (ReadLock::Share, false) => GET_SHARE,
            (ReadLock::Share, true) => GET_SHARE_NOWAIT,
        };
        match self.query_opt(sql, &[&id])? {
            Some(row) => Ok(Some(self.task_at(&row, 0, false)?)),
            None => {
                self.versions.entry(id.to_owned()).or_insert(None);
                Ok(None)
            }
        }
    }

    fn put(&mut self, task: &Task) -> Result<(), TaskError> {
        let data = serde_json::to_string(task).map_err(|e| TaskError::Invalid(format!("cannot encode task: {e}")))?;
        let status = task.status.as_str();
        let not_before = task.not_before.map(Timestamp::as_micros);
        let lease = if task.status.is_leased() { task.lease_expires_at.map(Timestamp::as_micros) } else { None };
        let has_locks = !task.locks.is_empty();
        let version = self.versions.get(&task.id).copied().flatten();
        match version {
            // A row we hold: buffer the write.
            Some(version) if self.cache.contains_key(&task.id) => {
                let put = PendingPut {
                    id: task.id.clone(),
                    status,
                    priority: task.priority,
                    not_before,
                    lease,
                    has_locks,
                    data,
                    version,
                };
                match self.pending.iter_mut().find(|p| p.id == task.id) {
                    Some(p) => *p = put,
                    None => self.pending.push(put),
                }
            }
            Some(version) => {
                if self.counter_held() {
                    // Holding the event counter: never wait for a row lock (see the module docs).
                    let row = self.query_opt(PROBE, &[&task.id])?;
                    let current: Option<i64> = row.and_then(|r| r.try_get(0).ok());
                    if current != Some(version) {
                        return Err(self.lost_race(&task.id));
                    }
                }
                let row = self.query_opt(
                    UPDATE,
                    &[&task.id, &status, &task.priority, &not_before, &lease, &has_locks, &data, &version],
                )?;
                let Some(row) = row else { return Err(self.lost_race(&task.id)) };
                let new: i64 = row.try_get(0).map_err(|e| self.db(e))?;
                self.versions.insert(task.id.clone(), Some(new));
            }
            None => {
                self.execute(
                    INSERT,
                    &[
                        &task.id,
                        &status,
                        &task.priority,
                        &task.created_at.as_micros(),
                        &not_before,
                        &lease,
                        &has_locks,
                        &data,
                    ],
                )?;
                self.versions.insert(task.id.clone(), Some(1));
            }
        }
        self.cache.insert(task.id.clone(), task.clone());
        let known = self.deps.get(&task.id);
        let new_deps: Vec<&str> =
            task.depends_on.iter().filter(|d| known.is_none_or(|k| !k.contains(d))).map(String::as_str).collect();
        if !new_deps.is_empty() {
            self.execute(INSERT_DEPS, &[&task.id, &new_deps])?;
        }
        self.deps.insert(task.id.clone(), task.depends_on.clone());
        Ok(())
    }

    fn dependents(&mut self, id: &str) -> Result<Vec<String>, TaskError> {
        let rows = self.query(DEPENDENTS, &[&id])?;
        rows.iter().map(|r| r.try_get(0)).collect::<Result<Vec<String>, _>>().map_err(|e| self.db(e))
    }

    /// The leased tasks that hold path locks: the rules use `leased` for lock conflicts alone,
    /// and the others cannot conflict. In an unlocked claim (no candidate has path locks)
    /// nothing can conflict, so nothing is read.
    fn leased(&mut self) -> Result<Vec<Task>, TaskError> {
        if let ClaimMode::Unlocked { .. } = self.claim {
            return Ok(Vec::new());
        }
        self.flush()?;
        let rows = self.query(LEASED_WITH_LOCKS, &[])?;
        self.tasks(&rows, false)
    }

    fn leased_locks(&mut self) -> Result<Vec<Vec<String>>, TaskError> {
        if let ClaimMode::Unlocked { .. } = self.claim {
            return Ok(Vec::new());
        }
        self.flush()?;
        let rows = self.query(LEASED_LOCKS, &[])?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let json: &str = row.try_get(0).map_err(|e| self.db(e))?;
            out.push(
                serde_json::from_str(json).map_err(|e| {
                    TaskError::Store(StoreError::Corrupt { seq: 0, message: format!("task locks: {e}") })
                })?,
            );
        }
        Ok(out)
    }

    fn queued(&mut self, now: Timestamp, limit_: usize) -> Result<Vec<Task>, TaskError> {
        self.flush()?;
        if let ClaimMode::Unlocked { hint } = self.claim {
            // Every row returned is claimable: lock no more than the claim takes, and fetch
            // their fencing tokens with them.
            let rows = self.query(QUEUED_WITH_TOKENS, &[&now.as_micros(), &limit(limit_.min(hint))])?;
            if let Some(row) = rows.first() {
                let mut tokens: Vec<i64> = row.try_get(2).map_err(|e| self.db(e))?;
                tokens.sort_unstable();
                self.tokens.extend(tokens);
            }
            return self.tasks(&rows, true);
        }
        let rows = self.query(QUEUED, &[&now.as_micros(), &limit(limit_)])?;
        self.tasks(&rows, true)
    }

    fn expired(&mut self, now: Timestamp) -> Result<Vec<Task>, TaskError> {
        if let Some(found) = self.expired.take() {
            return Ok(found);
        }
        self.flush()?;
        let rows = self.query(EXPIRED, &[&now.as_micros()])?;
        self.tasks(&rows, true)
    }

    fn append(&mut self, task_id: &str, data: EventData) -> Result<Seq, TaskError> {
        let json = data.to_json().map_err(|e| TaskError::Invalid(format!("cannot encode event: {e}")))?;
        let id = EventId::generate();
        let at = Timestamp::now().as_micros();
        if let Some(seq) = self.next_seq {
            // The counter is ours until commit: this event's seq is the next one.
            self.events.push(PendingEvent {
                seq,
                id: id.0,
                run_id: task_id.to_owned(),
                kind: data.kind().to_owned(),
                at,
                data: json,
            });
            self.next_seq = Some(seq + 1);
            self.max_seq = seq;
            return Ok(seq);
        }
        // Writes buffered so far go first: the statement that takes the counter starts the
        // serialized part of the transaction, which should hold as little as possible.
        self.flush()?;
        let row =
            self.query_opt(APPEND, &[&id.as_str(), &task_id, &data.kind(), &i32::from(EVENT_VERSION), &at, &json])?;
        let seq: Seq = match row {
            Some(r) => r.try_get(0).map_err(|e| self.db(e))?,
            None => {
                return Err(TaskError::Store(StoreError::Io {
                    message: "event_seq row is missing".into(),
                    busy: false,
                }));
            }
        };
        self.next_seq = Some(seq + 1);
        self.max_seq = self.max_seq.max(seq);
        Ok(seq)
    }

    fn next_token(&mut self) -> Result<i64, TaskError> {
        if let Some(t) = self.tokens.pop_front() {
            return Ok(t);
        }
        let row = self.query_opt(NEXT_TOKEN, &[])?;
        match row {
            Some(r) => r.try_get(0).map_err(|e| self.db(e)),
            None => Err(TaskError::Store(StoreError::Io { message: "no fencing token".into(), busy: false })),
        }
    }
}

type Rules<T> = dyn Fn(&mut dyn TaskTxn, Timestamp) -> Result<T, TaskError> + Send + Sync;

/// Why an attempt may be made again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Again {
    No,
    /// Lost a race with another transaction (rolled back).
    Conflict,
    /// The connection broke before the commit was sent (nothing was written).
    Reconnect,
}

/// One attempt: a transaction running the rules.
fn attempt<T>(
    conn: &mut Conn,
    target: &Target,
    op: &Op,
    now: Timestamp,
    rules: &Rules<T>,
) -> Result<(T, Seq), (TaskError, Again)> {
    let Conn { client, stmts, .. } = conn;
    let mut tx = client.transaction().map_err(|e| {
        let again = if is_connection_error(&e) { Again::Reconnect } else { Again::No };
        (TaskError::Store(target.error(&e)), again)
    })?;
    let mut txn = PgTxn::new(&mut tx, stmts, target);
    let result = txn.begin(op, now).and_then(|()| rules(&mut txn, now)).and_then(|v| txn.flush().map(|()| v));
    let (conflict, broken, seq) = (txn.conflict, txn.broken, txn.max_seq);
    match result {
        Ok(value) => match tx.commit() {
            Ok(()) => Ok((value, seq)),
            Err(e) => {
                let mut err = target.error(&e);
                if is_connection_error(&e)
                    && let StoreError::Io { message, .. } = &mut err
                {
                    message
                        .push_str("; the connection broke while committing, so whether the change was made is unknown");
                }
                Err((TaskError::Store(err), if is_conflict(&e) { Again::Conflict } else { Again::No }))
            }
        },
        Err(e) => {
            let _ = tx.rollback();
            let again = if conflict {
                Again::Conflict
            } else if broken {
                Again::Reconnect
            } else {
                Again::No
            };
            Err((e, again))
        }
    }
}

/// A short random pause before retry `n` (1 ms, 2 ms, ... at most 64 ms, plus jitter).
fn pause(n: u32) -> Duration {
    let base = 1u64 << n.min(6);
    let jitter = RandomState::new().build_hasher().finish() % base.max(1);
    Duration::from_millis(base + jitter)
}

fn run<T>(pool: &Pool, clock: &dyn Clock, op: &Op, rules: &Rules<T>) -> Result<(T, Seq), TaskError> {
    let mut conn = pool.get()?;
    let (mut conflicts, mut reconnects) = (0, 0);
    loop {
        let now = clock.now();
        match attempt(&mut conn, &pool.target, op, now, rules) {
            Ok(done) => {
                conn.last_used = std::time::Instant::now();
                return Ok(done);
            }
            Err((_, Again::Conflict)) if conflicts < MAX_RETRIES => {
                conflicts += 1;
                std::thread::sleep(pause(conflicts));
            }
            Err((e, Again::Reconnect)) if reconnects < 2 => {
                reconnects += 1;
                tracing::debug!(error = %e, "PostgreSQL connection lost; retrying the task operation");
                conn.discard();
                conn = pool.get()?;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

impl PgStore {
    /// Runs a task operation: one transaction on the blocking pool, retried when it loses a
    /// race with another transaction.
    async fn task_op<T: Send + 'static>(
        &self,
        op: Op,
        rules: impl Fn(&mut dyn TaskTxn, Timestamp) -> Result<T, TaskError> + Send + Sync + 'static,
    ) -> Result<T, TaskError> {
        let pool = self.pool.clone();
        let clock: Arc<dyn Clock> = self.clock.clone();
        let (value, seq) =
            tokio::task::spawn_blocking(move || run(&pool, &*clock, &op, &rules)).await.map_err(|e| {
                TaskError::Store(StoreError::Io { message: format!("database task failed: {e}"), busy: false })
            })??;
        if seq > 0 {
            self.notify(seq);
        }
        Ok(value)
    }

    async fn read_tasks(
        &self,
        sql: &'static str,
        params: impl Fn() -> Vec<Box<dyn ToSql + Sync + Send>> + Send + 'static,
    ) -> Result<Vec<Task>, TaskError> {
        self.with_conn(move |conn, target| {
            let Conn { client, stmts, .. } = conn;
            let stmt = stmts.get(client, sql).map_err(|e| target.error(&e))?;
            let params = params();
            let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
            let rows = client.query(&stmt, &refs).map_err(|e| target.error(&e))?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let data: &str = row.try_get(0).map_err(|e| target.error(&e))?;
                out.push(decode(data).map_err(|e| match e {
                    TaskError::Store(s) => s,
                    other => StoreError::Corrupt { seq: 0, message: other.to_string() },
                })?);
            }
            Ok(out)
        })
        .await
        .map_err(TaskError::Store)
    }
}

impl PgStore {
    /// Completes several leased tasks in one transaction: one commit (and a handful of round
    /// trips) for the lot, for workers that finish tasks in batches. Each task's own refusal
    /// (stale token, expired lease, ...) is in its place in the result, and does not stop the
    /// others; the outer error is the store's (then nothing was completed).
    pub async fn complete_many(
        &self,
        items: Vec<(String, i64, Option<String>)>,
    ) -> Result<Vec<Result<Task, TaskError>>, TaskError> {
        let mut ids: Vec<String> = items.iter().map(|(id, ..)| id.clone()).collect();
        ids.sort();
        ids.dedup();
        self.task_op(Op::Many(ids), move |txn, now| {
            let mut out = Vec::with_capacity(items.len());
            for (id, token, result) in &items {
                match task::complete(txn, id, *token, result.clone(), now) {
                    Err(e @ TaskError::Store(_)) => return Err(e),
                    other => out.push(other),
                }
            }
            Ok(out)
        })
        .await
    }
}

fn new_id(new: &NewTask) -> String {
    new.id.clone().unwrap_or_else(|| descartes_protocol::RunId::generate().0)
}

#[async_trait]
impl TaskStore for PgStore {
    async fn create_task(&self, new: NewTask) -> Result<Task, TaskError> {
        task::validate_new(&new)?;
        let id = new_id(&new);
        self.task_op(Op::Create, move |txn, now| task::create(txn, new.clone(), id.clone(), now)).await
    }

    async fn add_dependency(&self, id: &str, dependency: &str) -> Result<Task, TaskError> {
        let (id, dependency) = (id.to_owned(), dependency.to_owned());
        self.task_op(Op::AddDependency, move |txn, now| task::add_dependency(txn, &id, &dependency, now)).await
    }

    async fn get_task(&self, id: &str) -> Result<Task, TaskError> {
        let key = id.to_owned();
        self.read_tasks("SELECT data::text FROM tasks WHERE id = $1", move || vec![Box::new(key.clone())])
            .await?
            .pop()
            .ok_or_else(|| TaskError::NotFound(id.to_owned()))
    }

    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>, TaskError> {
        let status = filter.status.map(|s| s.as_str().to_owned());
        let label = filter.label.clone();
        self.read_tasks(
            "SELECT data::text FROM tasks
             WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR data->'labels' ? $2)
             ORDER BY created_at, id",
            move || vec![Box::new(status.clone()), Box::new(label.clone())],
        )
        .await
    }

    async fn claim(&self, worker: &str, ttl: Duration, max: usize) -> Result<Vec<Claim>, TaskError> {
        let worker = worker.to_owned();
        if worker.trim().is_empty() || ttl.is_zero() || max == 0 {
            // Let the rules refuse bad input (or claim nothing) without a transaction.
            return task::claim(&mut NoTxn, &worker, ttl, max, self.clock.now());
        }
        self.task_op(Op::Claim { max }, move |txn, now| task::claim(txn, &worker, ttl, max, now)).await
    }

    async fn start(&self, id: &str, token: i64) -> Result<Task, TaskError> {
        let id = id.to_owned();
        self.task_op(Op::Plain, move |txn, now| task::start(txn, &id, token, now)).await
    }

    async fn heartbeat(&self, id: &str, token: i64, ttl: Duration) -> Result<Task, TaskError> {
        let id = id.to_owned();
        self.task_op(Op::Plain, move |txn, now| task::heartbeat(txn, &id, token, ttl, now)).await
    }

    async fn complete(&self, id: &str, token: i64, result: Option<String>) -> Result<Task, TaskError> {
        let id = id.to_owned();
        self.task_op(Op::Plain, move |txn, now| task::complete(txn, &id, token, result.clone(), now)).await
    }

    async fn fail(&self, id: &str, token: i64, reason: &str) -> Result<Task, TaskError> {
        let (id, reason) = (id.to_owned(), reason.to_owned());
        self.task_op(Op::Plain, move |txn, now| task::fail(txn, &id, token, &reason, now)).await
    }

    async fn release(&self, id: &str, token: i64) -> Result<Task, TaskError> {
        let id = id.to_owned();
        self.task_op(Op::Plain, move |txn, now| task::release(txn, &id, token, now)).await
    }

    async fn cancel(&self, id: &str) -> Result<Task, TaskError> {
        let id = id.to_owned();
        self.task_op(Op::Plain, move |txn, now| task::cancel(txn, &id, now)).await
    }

    async fn retry(&self, id: &str) -> Result<Task, TaskError> {
        let id = id.to_owned();
        self.task_op(Op::Plain, move |txn, now| task::retry(txn, &id, now)).await
    }

    async fn reap_expired(&self) -> Result<Vec<Task>, TaskError> {
        self.task_op(Op::Plain, task::reap_expired).await
    }
}

/// A transaction that is never reached: for input the rules refuse before touching the store.
struct NoTxn;

impl NoTxn {
    fn unreachable<T>() -> Result<T, TaskError> {
        Err(TaskError::Invalid("invalid claim".into()))
    }
}

impl TaskTxn for NoTxn {
    fn get(&mut self, _: &str) -> Result<Option<Task>, TaskError> {
        Self::unreachable()
    }
    fn put(&mut self, _: &Task) -> Result<(), TaskError> {
        Self::unreachable()
    }
    fn dependents(&mut self, _: &str) -> Result<Vec<String>, TaskError> {
        Self::unreachable()
    }
    fn leased(&mut self) -> Result<Vec<Task>, TaskError> {
        Ok(Vec::new())
    }
    fn queued(&mut self, _: Timestamp, _: usize) -> Result<Vec<Task>, TaskError> {
        Ok(Vec::new())
    }
    fn expired(&mut self, _: Timestamp) -> Result<Vec<Task>, TaskError> {
        Ok(Vec::new())
    }
    fn append(&mut self, _: &str, _: EventData) -> Result<Seq, TaskError> {
        Self::unreachable()
    }
    fn next_token(&mut self) -> Result<i64, TaskError> {
        Self::unreachable()
    }
}
