//! `TaskStore` on PostgreSQL: the shared rules of `descartes_core::task` run unchanged through
//! `PgTxn`, inside group commits.
//!
//! **Group commit**: the task operations of one process are queued to a few threads (see
//! `Grouper`); each takes every operation queued and runs them in one transaction, one after
//! the other (operations queued meanwhile join before the commit, when the other thread is busy
//! too), and commits them together (one WAL flush, one hold of the `event_seq` lock). An
//! operation that is refused (stale token, illegal transition, lost race) rolls back alone: the
//! group first runs without savepoints (they cost a round trip each) and, if one operation is
//! refused, runs again with a savepoint around each. A lost race is retried in a later group.
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
//! - **Events** are appended in the same transaction: an operation buffers its events, and the
//!   group writes the events of all its operations in one statement just before its commit,
//!   taking the `event_seq` row lock there (see the crate docs). So the lock is held only from
//!   that statement to the end of the commit, and the transaction holding it waits for no other
//!   lock: no lock cycle can go through the counter.
//! - **Round trips** are what an operation costs, so a claim finds its expired leases and takes
//!   its lock in one statement, fetches fencing tokens with its candidates, and buffers its
//!   writes to rows it holds, sending them in one statement at its end.

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
use postgres::{Client, Row};

use crate::PgStore;
use crate::conn::{Conn, Pool, Sql, StmtCache, Target, is_conflict, is_connection_error};
use crate::schema::{LOCK_CLAIM, LOCK_GRAPH, LOCK_NS};

/// How many times an operation is retried after losing a race with another transaction.
const MAX_RETRIES: u32 = 30;

const GET: &str = "SELECT version, data::text FROM tasks WHERE id = $1";
const GET_SHARE: &str = "SELECT version, data::text FROM tasks WHERE id = $1 FOR SHARE";
const LOCK_MANY: &str = "SELECT version, data::text FROM tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE";
const UPDATE: &str = "UPDATE tasks SET status = $2, priority = $3, not_before = $4, lease_expires_at = $5,
        has_locks = $6, data = $7, version = version + 1
    WHERE id = $1 AND version = $8 RETURNING version";
const INSERT: &str =
    "INSERT INTO tasks (id, status, priority, created_at, not_before, lease_expires_at, has_locks, version, data)
    VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8)";
const INSERT_DEPS: &str =
    "INSERT INTO task_deps (task_id, dep_id) SELECT $1, d FROM UNNEST($2::text[]) AS d ON CONFLICT DO NOTHING";
const DEPENDENTS: &str = "SELECT task_id FROM task_deps WHERE dep_id = $1 ORDER BY task_id";
const LEASED_WITH_LOCKS: &str =
    "SELECT version, data::text FROM tasks WHERE has_locks AND status IN ('claimed', 'running') ORDER BY id";
const LEASED_LOCKS: &str =
    "SELECT (data::jsonb->'locks')::text FROM tasks WHERE has_locks AND status IN ('claimed', 'running')";
/// Queued, ready tasks in claim order; a template for `Sql::Limit` (see there why).
const QUEUED: &str = "SELECT t.version, t.data::text FROM tasks t
    WHERE t.status = 'queued' AND (t.not_before IS NULL OR t.not_before <= $1)
      AND NOT EXISTS (SELECT 1 FROM task_deps d JOIN tasks p ON p.id = d.dep_id
                      WHERE d.task_id = t.id AND p.status <> 'done')
    ORDER BY t.priority DESC, t.created_at, t.id
    LIMIT {limit}
    FOR UPDATE OF t SKIP LOCKED";
/// Queued, ready tasks without path locks, with one fencing token per row (every row is claimed).
/// Like `QUEUED`, a template for `Sql::Limit` (see there why).
const QUEUED_WITH_TOKENS: &str = "WITH q AS (
    SELECT t.version, t.data::text AS data, t.priority, t.created_at, t.id FROM tasks t
    WHERE t.status = 'queued' AND (t.not_before IS NULL OR t.not_before <= $1) AND NOT t.has_locks
      AND NOT EXISTS (SELECT 1 FROM task_deps d JOIN tasks p ON p.id = d.dep_id
                      WHERE d.task_id = t.id AND p.status <> 'done')
    ORDER BY t.priority DESC, t.created_at, t.id
    LIMIT {limit}
    FOR UPDATE OF t SKIP LOCKED
)
SELECT q.version, q.data,
       (SELECT array_agg(nextval('task_tokens')) FROM generate_series(1, (SELECT count(*) FROM q)))
FROM q ORDER BY q.priority DESC, q.created_at, q.id";
/// The queue's head, without locks (the executor's routing looks ahead); a `Sql::Limit` template.
const PEEK: &str = "SELECT data::text FROM tasks WHERE status = 'queued' AND (not_before IS NULL OR not_before <= $1)
    ORDER BY priority DESC, created_at, id LIMIT {limit}";
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
/// The buffered writes to task rows this transaction holds locked, in one round trip. Fails
/// (division by zero) if a row did not match.
const FLUSH: &str = "WITH up AS (
    UPDATE tasks t SET status = u.status, priority = u.priority, not_before = u.not_before,
        lease_expires_at = u.lease, has_locks = u.has_locks, data = u.data, version = t.version + 1
    FROM UNNEST($1::text[], $2::text[], $3::int4[], $4::int8[], $5::int8[], $6::bool[], $7::text[], $8::int8[])
        AS u(id, status, priority, not_before, lease, has_locks, data, version)
    WHERE t.id = u.id AND t.version = u.version
    RETURNING 1
)
SELECT 1 / (CASE WHEN (SELECT count(*) FROM up) = $9 THEN 1 ELSE 0 END)";
const NEXT_TOKEN: &str = "SELECT nextval('task_tokens')";
const LEASED_BY_AGENT: &str =
    "SELECT count(*) FROM tasks WHERE status IN ('claimed', 'running') AND data::jsonb->>'agent' = $1";
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
    /// A claim of one given task: under the claim advisory lock, so path locks and agent
    /// capacities are checked against every lease committed before it.
    ClaimOne,
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

/// An event of an operation, written (and given its seq) by the group commit.
struct PendingEvent {
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
struct PgTxn<'a> {
    tx: &'a mut Client,
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
    /// Fencing tokens fetched with the candidates of an unlocked claim.
    tokens: VecDeque<i64>,
    /// Expired leases found (and locked) by the claim's first statement.
    expired: Option<Vec<Task>>,
    /// The failure was a lost race: the operation may be retried.
    conflict: bool,
    /// The connection broke before the commit: the operation may be retried on another.
    broken: bool,
}

impl<'a> PgTxn<'a> {
    fn new(tx: &'a mut Client, stmts: &'a mut StmtCache, target: &'a Target) -> Self {
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
            tokens: VecDeque::new(),
            expired: None,
            conflict: false,
            broken: false,
        }
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

    fn query(&mut self, sql: impl Into<Sql>, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, TaskError> {
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
            Op::ClaimOne => {
                self.query(GRAPH_LOCK, &[&LOCK_NS, &LOCK_CLAIM])?;
            }
        }
        Ok(())
    }

    /// Sends the buffered row writes (events stay buffered for the group commit).
    fn flush(&mut self) -> Result<(), TaskError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.pending.len() == 1 {
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
        let pending = std::mem::take(&mut self.pending);
        let w = Writes::of(&pending);
        let result = self.query_opt(
            FLUSH,
            &[&w.ids, &w.statuses, &w.prios, &w.not_befores, &w.leases, &w.locks, &w.data, &w.versions, &w.n],
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

impl TaskTxn for PgTxn<'_> {
    fn get(&mut self, id: &str) -> Result<Option<Task>, TaskError> {
        if let Some(t) = self.cache.get(id) {
            return Ok(Some(t.clone()));
        }
        let sql = match self.read_lock {
            ReadLock::None => GET,
            ReadLock::Share => GET_SHARE,
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
            let rows = self.query(Sql::Limit(QUEUED_WITH_TOKENS, limit(limit_.min(hint))), &[&now.as_micros()])?;
            if let Some(row) = rows.first() {
                let mut tokens: Vec<i64> = row.try_get(2).map_err(|e| self.db(e))?;
                tokens.sort_unstable();
                self.tokens.extend(tokens);
            }
            return self.tasks(&rows, true);
        }
        let rows = self.query(Sql::Limit(QUEUED, limit(limit_)), &[&now.as_micros()])?;
        self.tasks(&rows, true)
    }

    fn leased_by_agent(&mut self, agent: &str) -> Result<u32, TaskError> {
        self.flush()?;
        let rows = self.query(LEASED_BY_AGENT, &[&agent])?;
        let n: i64 = match rows.first() {
            Some(r) => r.try_get(0).map_err(|e| self.db(e))?,
            None => 0,
        };
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
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
        // Buffered: the group commit writes the events of all its operations in one statement
        // just before its commit, so the `event_seq` lock is held only from there to the commit.
        // The rules do not use the seq; 0 stands for "not known yet".
        self.events.push(PendingEvent {
            id: EventId::generate().0,
            run_id: task_id.to_owned(),
            kind: data.kind().to_owned(),
            at: Timestamp::now().as_micros(),
            data: json,
        });
        Ok(0)
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

/// An attempt's result: the value and the last seq it appended, or why it failed.
type Outcome<T> = Result<(T, Seq), (TaskError, Again)>;

/// One attempt of a task operation, queued for a group commit.
trait Job: Send {
    /// Runs the operation in the group's transaction (under its own savepoint), keeping its
    /// value until the group's commit.
    fn run(&mut self, client: &mut Client, stmts: &mut StmtCache, target: &Target) -> Attempted;
    /// Sends the result: `Ok(seq)` once the group committed, or the error.
    fn finish(self: Box<Self>, outcome: Result<Seq, (TaskError, Again)>);
}

/// What running a job in the group's transaction did.
struct Attempted {
    result: Result<(), (TaskError, Again)>,
    /// The events it appended, for the group to write.
    events: Vec<PendingEvent>,
}

struct TaskJob<T> {
    op: Op,
    rules: Arc<Rules<T>>,
    clock: Arc<dyn Clock>,
    value: Option<T>,
    reply: tokio::sync::oneshot::Sender<Outcome<T>>,
}

impl<T: Send + 'static> Job for TaskJob<T> {
    fn run(&mut self, client: &mut Client, stmts: &mut StmtCache, target: &Target) -> Attempted {
        let now = self.clock.now();
        let mut txn = PgTxn::new(client, stmts, target);
        let (op, rules) = (&self.op, &self.rules);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            txn.begin(op, now).and_then(|()| rules(&mut txn, now)).and_then(|v| txn.flush().map(|()| v))
        }))
        .unwrap_or_else(|_| {
            Err(TaskError::Store(StoreError::Io { message: "task operation panicked".into(), busy: false }))
        });
        let (conflict, broken) = (txn.conflict, txn.broken);
        let events = std::mem::take(&mut txn.events);
        match result {
            Ok(value) => {
                self.value = Some(value);
                Attempted { result: Ok(()), events }
            }
            Err(e) => {
                let again = if broken {
                    Again::Reconnect
                } else if conflict {
                    Again::Conflict
                } else {
                    Again::No
                };
                Attempted { result: Err((e, again)), events: Vec::new() }
            }
        }
    }

    fn finish(self: Box<Self>, outcome: Result<Seq, (TaskError, Again)>) {
        let out = match (outcome, self.value) {
            (Ok(seq), Some(value)) => Ok((value, seq)),
            (Ok(_), None) => Err((
                TaskError::Store(StoreError::Io { message: "task operation has no result".into(), busy: false }),
                Again::No,
            )),
            (Err(e), _) => Err(e),
        };
        let _ = self.reply.send(out);
    }
}

/// Starts a group's transaction. The statements of task operations find rows by key or walk an
/// index in its order (the queue, the leases), and their plans are made once per connection
/// (`force_generic_plan`), from the statistics of the moment: a young table's (a few rows) make
/// "read the whole queue and sort it" look cheaper than walking the queue's index, and that plan
/// would then cost every claim a read of the whole queue for as long as the connection lives.
/// So within these transactions the planner walks indexes whatever the statistics say (a sort
/// or a full scan is still used where nothing else can answer).
macro_rules! begin_sql {
    () => {
        "BEGIN; SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off"
    };
}
const BEGIN: &str = begin_sql!();
/// [`BEGIN`], and the savepoint of a group's first job.
const BEGIN_SAVEPOINT: &str = concat!(begin_sql!(), "; SAVEPOINT t");

/// Largest number of task operations in one group commit.
const MAX_GROUP: usize = 64;
/// How many threads run group commits of task operations. While one group commits (its WAL
/// flush), the next one runs its reads on another connection.
const GROUP_THREADS: usize = 2;

/// The task operations' group commit: threads that each take every operation queued, run them
/// in one transaction (each under its own savepoint) and commit them together.
pub(crate) struct Grouper {
    /// Task operations sent so far (the vacuuming thread vacuums only after some).
    pub(crate) ops: Arc<std::sync::atomic::AtomicU64>,
    tx: std::sync::Mutex<Option<std::sync::mpsc::Sender<Box<dyn Job>>>>,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Grouper {
    pub(crate) fn start(pool: Arc<Pool>, last: tokio::sync::watch::Sender<Seq>) -> Result<Grouper, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn Job>>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let mut handles = Vec::new();
        for i in 0..GROUP_THREADS {
            let (pool, rx, last) = (pool.clone(), rx.clone(), last.clone());
            let h = std::thread::Builder::new()
                .name(format!("descartes-pg-tasks-{i}"))
                .spawn(move || group_loop(&pool, &rx, &last))
                .map_err(|e| StoreError::Open { path: String::new(), message: e.to_string() })?;
            handles.push(h);
        }
        Ok(Grouper {
            ops: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            tx: std::sync::Mutex::new(Some(tx)),
            threads: std::sync::Mutex::new(handles),
        })
    }

    fn send(&self, job: Box<dyn Job>) -> Result<(), StoreError> {
        self.ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let guard = self.tx.lock().map_err(|_| StoreError::Closed)?;
        guard.as_ref().ok_or(StoreError::Closed)?.send(job).map_err(|_| StoreError::Closed)
    }

    /// Stops the threads after the queued operations.
    pub(crate) fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handles = self.threads.lock().map(|mut h| std::mem::take(&mut *h)).unwrap_or_default();
        for h in handles {
            let _ = h.join();
        }
    }
}

fn group_loop(
    pool: &Pool,
    rx: &std::sync::Mutex<std::sync::mpsc::Receiver<Box<dyn Job>>>,
    last: &tokio::sync::watch::Sender<Seq>,
) {
    loop {
        let jobs = {
            let Ok(rx) = rx.lock() else { return };
            let mut jobs = match rx.recv() {
                Ok(j) => vec![j],
                Err(_) => return,
            };
            // No waiting for more: waiting for late joiners measured slower than letting the
            // other thread take them.
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            jobs
        };
        let mut conn = match pool.get() {
            Ok(c) => c,
            Err(e) => {
                for job in jobs {
                    let err = match &e {
                        StoreError::Io { message, busy } => StoreError::Io { message: message.clone(), busy: *busy },
                        _ => StoreError::Closed,
                    };
                    job.finish(Err((TaskError::Store(err), Again::No)));
                }
                continue;
            }
        };
        let mut jobs = jobs;
        // Operations queued while this group runs join it before its commit (never waiting for
        // them): its commit is shared by more operations, and the time it would spend waiting
        // for `event_seq` (held by the other thread's commit) goes to their statements instead.
        // Only when the other thread is busy too: an idle one holds the queue and takes them.
        let mut more = || rx.try_lock().ok().and_then(|rx| rx.try_recv().ok());
        let (results, broken) = run_group(&mut conn, &pool.target, &mut jobs, &mut more);
        if broken {
            conn.discard();
        } else {
            conn.last_used = std::time::Instant::now();
        }
        let max = results.iter().filter_map(|r| r.as_ref().ok()).copied().max().unwrap_or(0);
        if max > 0 {
            crate::store::notify(last, max);
        }
        for (job, result) in jobs.into_iter().zip(results) {
            job.finish(result);
        }
    }
}

fn store_err(target: &Target, e: &postgres::Error) -> TaskError {
    TaskError::Store(target.error(e))
}

/// Adds the next queued operation, if any, to `jobs`.
fn take_more(jobs: &mut Vec<Box<dyn Job>>, more: &mut dyn FnMut() -> Option<Box<dyn Job>>) -> bool {
    match more() {
        Some(job) => {
            jobs.push(job);
            true
        }
        None => false,
    }
}

type GroupResult = (Vec<Result<Seq, (TaskError, Again)>>, bool);

/// Runs `jobs` in one transaction and commits the lot; each job's refusal (stale token, lost
/// race, ...) rolls back that job alone. Returns each job's outcome, and whether the connection
/// broke.
///
/// Refusals are rare, so the group first runs without savepoints (each costs a round trip and a
/// subtransaction); if one of several jobs is refused, that transaction is rolled back and the group
/// runs again with a savepoint around each job.
fn run_group(
    conn: &mut Conn,
    target: &Target,
    jobs: &mut Vec<Box<dyn Job>>,
    more: &mut dyn FnMut() -> Option<Box<dyn Job>>,
) -> GroupResult {
    match run_group_as(conn, target, jobs, false, more) {
        Some(done) => done,
        None => {
            tracing::trace!("a task operation was refused; running its group again with savepoints");
            run_group_as(conn, target, jobs, true, &mut || None).unwrap_or_else(|| (Vec::new(), false))
        }
    }
}

/// [`run_group`], with or without savepoints. Without, `None` when a job of several was refused
/// (then nothing was written); a job alone is refused alone without one.
fn run_group_as(
    conn: &mut Conn,
    target: &Target,
    jobs: &mut Vec<Box<dyn Job>>,
    savepoints: bool,
    more: &mut dyn FnMut() -> Option<Box<dyn Job>>,
) -> Option<GroupResult> {
    let Conn { client, stmts, .. } = conn;
    let all = |e: &postgres::Error, n: usize| -> GroupResult {
        let broken = is_connection_error(e) || client_closed(e);
        let again = if broken {
            Again::Reconnect
        } else if is_conflict(e) {
            Again::Conflict
        } else {
            Again::No
        };
        ((0..n).map(|_| Err((store_err(target, e), again))).collect(), broken)
    };
    if let Err(e) = client.batch_execute(if savepoints { BEGIN_SAVEPOINT } else { BEGIN }) {
        return Some(all(&e, jobs.len()));
    }
    let mut results: Vec<Result<Seq, (TaskError, Again)>> = Vec::with_capacity(jobs.len());
    let mut events: Vec<PendingEvent> = Vec::new();
    // Per job: how many events were appended before it and by it.
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(jobs.len());
    let mut any_ok = false;
    let mut i = 0;
    // Every job in `jobs`; then, without savepoints, any queued since, while the group has room.
    while i < jobs.len() || (!savepoints && jobs.len() < MAX_GROUP && take_more(jobs, more)) {
        let job = &mut jobs[i];
        if savepoints
            && i > 0
            && let Err(e) = client.batch_execute("RELEASE SAVEPOINT t; SAVEPOINT t")
        {
            let _ = client.batch_execute("ROLLBACK");
            return Some(all(&e, jobs.len()));
        }
        let done = job.run(client, stmts, target);
        match done.result {
            Ok(()) => {
                any_ok = true;
                spans.push((events.len(), done.events.len()));
                events.extend(done.events);
                results.push(Ok(0));
            }
            Err((e, Again::Reconnect)) => {
                // The connection broke: nothing of the group is committed; all may be retried.
                let _ = client.batch_execute("ROLLBACK");
                let n = jobs.len();
                let mut out: Vec<_> = (0..n)
                    .map(|_| {
                        Err((
                            TaskError::Store(StoreError::Io {
                                message: "the connection broke before the commit".into(),
                                busy: true,
                            }),
                            Again::Reconnect,
                        ))
                    })
                    .collect();
                out[i] = Err((e, Again::Reconnect));
                return Some((out, true));
            }
            Err(err) if !savepoints => {
                let _ = client.batch_execute("ROLLBACK");
                // A job alone in its group needs no savepoint to be refused alone.
                return (jobs.len() == 1).then(|| (vec![Err(err)], false));
            }
            Err(err) => {
                if let Err(e) = client.batch_execute("ROLLBACK TO SAVEPOINT t") {
                    let _ = client.batch_execute("ROLLBACK");
                    return Some(all(&e, jobs.len()));
                }
                spans.push((events.len(), 0));
                results.push(Err(err));
            }
        }
        i += 1;
    }
    if !events.is_empty() {
        // The events of the whole group, in one statement: it takes the `event_seq` lock, which
        // is held from here to the commit only (seqs are visible in commit order).
        match insert_events(client, stmts, &events) {
            Ok(base) => {
                for (r, (before, n)) in results.iter_mut().zip(&spans) {
                    if let Ok(seq) = r
                        && *n > 0
                    {
                        *seq = base + Seq::try_from(before + n).unwrap_or(0);
                    }
                }
            }
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK");
                return Some(all(&e, jobs.len()));
            }
        }
    }
    let end = if any_ok { "COMMIT" } else { "ROLLBACK" };
    match client.batch_execute(end) {
        Ok(()) => Some((results, false)),
        Err(e) => {
            let (mut out, broken) = all(&e, jobs.len());
            if any_ok && is_connection_error(&e) {
                // Whether the group was committed is unknown: do not retry.
                for (o, r) in out.iter_mut().zip(&results) {
                    if r.is_ok() {
                        let mut err = target.error(&e);
                        if let StoreError::Io { message, .. } = &mut err {
                            message.push_str(
                                "; the connection broke while committing, so whether the change was made is unknown",
                            );
                        }
                        *o = Err((TaskError::Store(err), Again::No));
                    }
                }
            }
            Some((out, broken))
        }
    }
}

/// Inserts `events` with consecutive seqs; returns the seq before the first.
fn insert_events(client: &mut Client, stmts: &mut StmtCache, events: &[PendingEvent]) -> Result<Seq, postgres::Error> {
    let n = i64::try_from(events.len()).unwrap_or(i64::MAX);
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let runs: Vec<&str> = events.iter().map(|e| e.run_id.as_str()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let vs: Vec<i32> = events.iter().map(|_| i32::from(EVENT_VERSION)).collect();
    let ats: Vec<i64> = events.iter().map(|e| e.at).collect();
    let keys: Vec<Option<&str>> = events.iter().map(|_| None).collect();
    let datas: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
    let s = stmts.get(client, crate::store::INSERT_EVENTS)?;
    let row = client.query_one(&s, &[&n, &ids, &runs, &kinds, &vs, &ats, &keys, &datas])?;
    row.try_get(0)
}

fn client_closed(e: &postgres::Error) -> bool {
    e.is_closed()
}

/// A short random pause before retry `n` (1 ms, 2 ms, ... at most 64 ms, plus jitter).
fn pause(n: u32) -> Duration {
    let base = 1u64 << n.min(6);
    let jitter = RandomState::new().build_hasher().finish() % base.max(1);
    Duration::from_millis(base + jitter)
}

impl PgStore {
    /// Runs a task operation in the next group commit, retried when it loses a race with
    /// another transaction.
    async fn task_op<T: Send + 'static>(
        &self,
        op: Op,
        rules: impl Fn(&mut dyn TaskTxn, Timestamp) -> Result<T, TaskError> + Send + Sync + 'static,
    ) -> Result<T, TaskError> {
        let rules: Arc<Rules<T>> = Arc::new(rules);
        let (mut conflicts, mut reconnects) = (0, 0);
        loop {
            let (reply, rx) = tokio::sync::oneshot::channel();
            let job = TaskJob { op: op.clone(), rules: rules.clone(), clock: self.clock.clone(), value: None, reply };
            self.tasks.send(Box::new(job))?;
            match rx.await.map_err(|_| TaskError::Store(StoreError::Closed))? {
                Ok((value, seq)) => {
                    if seq > 0 {
                        self.notify(seq);
                    }
                    return Ok(value);
                }
                Err((_, Again::Conflict)) if conflicts < MAX_RETRIES => {
                    conflicts += 1;
                    tokio::time::sleep(pause(conflicts)).await;
                }
                Err((e, Again::Reconnect)) if reconnects < 2 => {
                    reconnects += 1;
                    tracing::debug!(error = %e, "PostgreSQL connection lost; retrying the task operation");
                }
                Err((e, _)) => return Err(e),
            }
        }
    }
    async fn read_tasks(
        &self,
        sql: Sql,
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
    async fn complete_many(
        &self,
        items: Vec<(String, i64, Option<String>)>,
    ) -> Result<Vec<Result<Task, TaskError>>, TaskError> {
        PgStore::complete_many(self, items).await
    }

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
        self.read_tasks(Sql::Fixed("SELECT data::text FROM tasks WHERE id = $1"), move || vec![Box::new(key.clone())])
            .await?
            .pop()
            .ok_or_else(|| TaskError::NotFound(id.to_owned()))
    }

    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>, TaskError> {
        let status = filter.status.map(|s| s.as_str().to_owned());
        let label = filter.label.clone();
        self.read_tasks(
            Sql::Fixed(
                "SELECT data::text FROM tasks
             WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR data::jsonb->'labels' ? $2)
             ORDER BY created_at, id",
            ),
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

    async fn claim_one(
        &self,
        id: &str,
        worker: &str,
        ttl: Duration,
        agent: Option<(&str, u32)>,
    ) -> Result<Option<Claim>, TaskError> {
        let (id, worker) = (id.to_owned(), worker.to_owned());
        if worker.trim().is_empty() || ttl.is_zero() {
            return task::claim_one(&mut NoTxn, &id, &worker, ttl, None, self.clock.now());
        }
        let agent = agent.map(|(a, n)| (a.to_owned(), n));
        self.task_op(Op::ClaimOne, move |txn, now| {
            task::claim_one(txn, &id, &worker, ttl, agent.as_ref().map(|(a, n)| (a.as_str(), *n)), now)
        })
        .await
    }

    async fn peek_queued(&self, limit: usize) -> Result<Vec<Task>, TaskError> {
        let now = self.clock.now().as_micros();
        let n = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_tasks(Sql::Limit(PEEK, n), move || vec![Box::new(now)]).await
    }

    async fn agent_load(&self) -> Result<HashMap<String, u32>, TaskError> {
        self.with_conn(|conn, target| {
            let Conn { client, stmts, .. } = conn;
            let stmt = stmts
                .get(
                    client,
                    "SELECT data::jsonb->>'agent' AS agent, count(*) FROM tasks
                     WHERE status IN ('claimed', 'running') AND data::jsonb->>'agent' IS NOT NULL GROUP BY 1",
                )
                .map_err(|e| target.error(&e))?;
            let rows = client.query(&stmt, &[]).map_err(|e| target.error(&e))?;
            let mut out = HashMap::new();
            for r in rows {
                let name: String = r.try_get(0).map_err(|e| target.error(&e))?;
                let n: i64 = r.try_get(1).map_err(|e| target.error(&e))?;
                out.insert(name, u32::try_from(n).unwrap_or(u32::MAX));
            }
            Ok(out)
        })
        .await
        .map_err(TaskError::Store)
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
    fn leased_by_agent(&mut self, _: &str) -> Result<u32, TaskError> {
        Self::unreachable()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::PgOptions;
    use crate::testing::TestDb;

    /// The plans of the queue scans for `limit`, made the way the store makes them: on a
    /// connection of the store, the claim's scans inside a task group's `BEGIN`.
    fn queue_plans(conn: &mut Conn, limit: i64) -> Vec<(String, String)> {
        let mut plans = Vec::new();
        for (name, template, begin) in
            [("QUEUED", QUEUED, BEGIN), ("QUEUED_WITH_TOKENS", QUEUED_WITH_TOKENS, BEGIN), ("PEEK", PEEK, "BEGIN")]
        {
            let c = &mut conn.client;
            c.batch_execute(begin).unwrap();
            c.batch_execute(&format!("PREPARE q(int8) AS {}", Sql::Limit(template, limit).text())).unwrap();
            let plan: Vec<String> =
                c.query("EXPLAIN EXECUTE q(0)", &[]).unwrap().iter().map(|r| r.get::<_, String>(0)).collect();
            c.batch_execute("ROLLBACK; DEALLOCATE q").unwrap();
            plans.push((format!("{name} LIMIT {limit}"), plan.join("\n")));
        }
        plans
    }

    /// Task ids compare byte by byte, as in SQLite, whatever the database's locale: in a
    /// database whose default collation is ICU's `en-US` (punctuation first, case ignored), the
    /// queue's last tie-break still orders `B1`, `_1`, `a1`; and the id columns are "C".
    #[test]
    fn ids_compare_byte_by_byte_whatever_the_locale() {
        let Some(plain) = TestDb::create() else { return };
        drop(plain);
        let db = match TestDb::try_create_with("TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'") {
            Ok(db) => db,
            Err(e) if e.contains("ICU") => {
                eprintln!("SKIPPING ids_compare_byte_by_byte_whatever_the_locale: this server has no ICU ({e})");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        drop(db.store().unwrap());
        let (order, collations) = db
            .with_client(|c| {
                c.batch_execute(
                    "INSERT INTO tasks (id, status, priority, created_at, not_before, lease_expires_at, has_locks, version, data)
                     SELECT id, 'queued', 1, 7, NULL, NULL, FALSE, 1, '{}' FROM (VALUES ('a1'), ('B1'), ('_1')) AS v(id)",
                )
                .unwrap();
                let order: Vec<String> = c
                    .query(&Sql::Limit(PEEK, 10).text().replace("data::text", "id"), &[&8i64])
                    .unwrap()
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                let collations: Vec<(String, String)> = c
                    .query(
                        "SELECT cl.relname || '.' || a.attname, coalesce(co.collname, '')
                         FROM pg_attribute a JOIN pg_class cl ON cl.oid = a.attrelid
                         LEFT JOIN pg_collation co ON co.oid = a.attcollation
                         WHERE (cl.relname, a.attname) IN (('tasks', 'id'), ('task_deps', 'task_id'),
                             ('task_deps', 'dep_id'), ('events', 'run_id'), ('events', 'key'))
                         ORDER BY 1",
                        &[],
                    )
                    .unwrap()
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect();
                (order, collations)
            })
            .unwrap();
        assert_eq!(order, ["B1", "_1", "a1"], "the queue's tie-break is byte order");
        assert_eq!(collations.len(), 5, "{collations:?}");
        assert!(collations.iter().all(|(_, c)| c == "C"), "{collations:?}");
    }

    /// The queue scans are planned once per connection (generic plans), from the statistics
    /// of the moment. However long the queue, and even when the last statistics are those of
    /// the empty table, they must walk the queue's index for the first rows rather than read
    /// and sort the whole queue, which made claims cost tens of milliseconds (`LIMIT $n` planned
    /// as 10% of the table; plans made from an empty table's statistics; JIT compiling them).
    #[test]
    fn queue_scans_walk_the_queue_index_however_long_the_queue() {
        let Some(db) = TestDb::create() else { return };
        drop(db.store().unwrap());
        let target = Target::parse(db.url()).unwrap();
        let fill = |c: &mut Client, from: i64, to: i64| {
            c.execute(
                "INSERT INTO tasks (id, status, priority, created_at, not_before, lease_expires_at, has_locks, version, data)
                 SELECT 't' || g, CASE WHEN g % 2 = 0 THEN 'queued' ELSE 'done' END, (g % 3)::int4, g, NULL, NULL,
                        FALSE, 1, '{\"title\": \"' || repeat('x', 200) || '\"}'
                 FROM generate_series($1::int8, $2::int8) AS g",
                &[&from, &to],
            )
            .unwrap();
        };
        let plans = std::thread::scope(|s| {
            s.spawn(|| {
                let mut conn = Conn::open(&target, &PgOptions::default()).unwrap();
                // Statistics of the empty table; then it fills without new ones.
                conn.client.batch_execute("ANALYZE tasks").unwrap();
                fill(&mut conn.client, 1, 40_000);
                let mut plans = queue_plans(&mut conn, 1);
                plans.extend(queue_plans(&mut conn, 64));
                // And with statistics that know the queue's length.
                conn.client.batch_execute("ANALYZE tasks").unwrap();
                plans.extend(queue_plans(&mut conn, 1));
                plans.extend(queue_plans(&mut conn, 64));
                plans
            })
            .join()
            .unwrap()
        });
        assert_eq!(plans.len(), 12);
        for (what, plan) in plans {
            assert!(
                plan.contains("Index Scan using tasks_queue on tasks"),
                "{what} does not walk the queue index:\n{plan}"
            );
            assert!(!plan.contains("Seq Scan on tasks"), "{what} reads the whole table:\n{plan}");
            assert!(!plan.contains("JIT"), "{what} is compiled:\n{plan}");
        }
    }
}
