//! `TaskStore` on SQLite: the shared rules of `descartes_core::task` run inside the event
//! writer's transactions (so task operations share group commits with events and are atomic
//! with the events they append).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use descartes_core::audit::{AuditRecord, AuditStore};
use descartes_core::routing::{AgentChange, AgentStore, agent_stream};
use descartes_core::task::{self, TaskTxn};
use descartes_core::{StoreError, TaskError, TaskFilter, TaskStore};
use descartes_protocol::{
    AgentRecord, AgentRemoved, AgentUpdated, Claim, EVENT_VERSION, EventData, EventId, NewTask, Seq, Task, Timestamp,
};
use rusqlite::{OptionalExtension, Transaction, params};
use tokio::sync::oneshot;

use crate::sqlite::{Cmd, SqliteEventStore, TxDone, TxOp, io_err};

struct SqliteTxn<'a> {
    tx: &'a Transaction<'a>,
    /// Fencing tokens reserved by this transaction and not handed out yet.
    reserved: std::ops::Range<i64>,
}

fn sql(e: rusqlite::Error) -> TaskError {
    TaskError::Store(io_err(e))
}

fn decode(data: &str) -> Result<Task, TaskError> {
    serde_json::from_str(data)
        .map_err(|e| TaskError::Store(StoreError::Corrupt { seq: 0, message: format!("task record: {e}") }))
}

fn query_tasks(tx: &Transaction<'_>, sql_text: &str, p: impl rusqlite::Params) -> Result<Vec<Task>, TaskError> {
    let mut stmt = tx.prepare_cached(sql_text).map_err(sql)?;
    let rows = stmt.query_map(p, |r| r.get::<_, String>(0)).map_err(sql)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(decode(&row.map_err(sql)?)?);
    }
    Ok(out)
}

/// Bits of a task's rowid that number the tasks of one priority band.
const BAND_BITS: u32 = 44;
/// Priorities with a band of their own: `-BANDS..BANDS` (the others share the outermost two).
const BANDS: i64 = 1 << 18;

impl SqliteTxn<'_> {
    /// The rowid of a new task: its priority band, then the next number in that band.
    ///
    /// A task's rowid places its row in the table, and the queue is claimed in priority order,
    /// then creation order. Numbering rows by band keeps the tasks one claim takes next to each
    /// other on disk (a few pages per commit instead of one page per task: with several
    /// priorities interleaved in creation order, a batched claim otherwise dirties a page for
    /// every task). Only placement depends on it: order and correctness come from the queue
    /// index. Rows made before this scheme sit in band 0 (priorities above `BANDS`).
    fn new_rowid(&mut self, priority: i32) -> Result<Option<i64>, TaskError> {
        let band = BANDS - 1 - i64::from(priority).clamp(-BANDS, BANDS - 1);
        let (low, high) = (band << BAND_BITS, (band << BAND_BITS) | ((1i64 << BAND_BITS) - 1));
        let last: Option<i64> = self
            .tx
            .prepare_cached("SELECT rowid FROM tasks WHERE rowid BETWEEN ?1 AND ?2 ORDER BY rowid DESC LIMIT 1")
            .map_err(sql)?
            .query_row(params![low, high], |r| r.get(0))
            .optional()
            .map_err(sql)?;
        Ok(match last {
            None => Some(low + 1),
            Some(last) if last < high => Some(last + 1),
            // The band is full (2^44 tasks): let SQLite choose.
            Some(_) => None,
        })
    }
}

impl TaskTxn for SqliteTxn<'_> {
    fn get(&mut self, id: &str) -> Result<Option<Task>, TaskError> {
        let data: Option<String> = self
            .tx
            .prepare_cached("SELECT data FROM tasks WHERE id = ?1")
            .map_err(sql)?
            .query_row([id], |r| r.get(0))
            .optional()
            .map_err(sql)?;
        data.map(|d| decode(&d)).transpose()
    }

    fn put(&mut self, task: &Task) -> Result<(), TaskError> {
        let data = serde_json::to_string(task).map_err(|e| TaskError::Invalid(format!("cannot encode task: {e}")))?;
        let locks = if task.locks.is_empty() { None } else { serde_json::to_string(&task.locks).ok() };
        let lease = if task.status.is_leased() { task.lease_expires_at.map(Timestamp::as_micros) } else { None };
        let not_before = task.not_before.map(Timestamp::as_micros);
        let updated = self
            .tx
            .prepare_cached(
                "UPDATE tasks SET status = ?2, priority = ?3, not_before = ?4, lease_expires_at = ?5, locks = ?6,
                     data = ?7
                 WHERE id = ?1",
            )
            .map_err(sql)?
            .execute(params![task.id, task.status.as_str(), task.priority, not_before, lease, locks, data])
            .map_err(sql)?;
        if updated == 0 {
            let rowid = self.new_rowid(task.priority)?;
            self.tx
                .prepare_cached(
                    "INSERT INTO tasks (rowid, id, status, priority, created_at, not_before, lease_expires_at, locks,
                         data)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(sql)?
                .execute(params![
                    rowid,
                    task.id,
                    task.status.as_str(),
                    task.priority,
                    task.created_at.as_micros(),
                    not_before,
                    lease,
                    locks,
                    data
                ])
                .map_err(sql)?;
        }
        let mut dep =
            self.tx.prepare_cached("INSERT OR IGNORE INTO task_deps (dep_id, task_id) VALUES (?1, ?2)").map_err(sql)?;
        for d in &task.depends_on {
            dep.execute(params![d, task.id]).map_err(sql)?;
        }
        Ok(())
    }

    fn dependents(&mut self, id: &str) -> Result<Vec<String>, TaskError> {
        let mut stmt = self.tx.prepare_cached("SELECT task_id FROM task_deps WHERE dep_id = ?1").map_err(sql)?;
        let rows = stmt.query_map([id], |r| r.get(0)).map_err(sql)?;
        rows.collect::<Result<Vec<String>, _>>().map_err(sql)
    }

    fn leased(&mut self) -> Result<Vec<Task>, TaskError> {
        query_tasks(self.tx, "SELECT data FROM tasks WHERE status IN ('claimed', 'running')", [])
    }

    fn leased_locks(&mut self) -> Result<Vec<Vec<String>>, TaskError> {
        let mut stmt = self
            .tx
            .prepare_cached("SELECT locks FROM tasks WHERE status IN ('claimed', 'running') AND locks IS NOT NULL")
            .map_err(sql)?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(sql)?;
        let mut out = Vec::new();
        for row in rows {
            let text = row.map_err(sql)?;
            out.push(
                serde_json::from_str(&text).map_err(|e| {
                    TaskError::Store(StoreError::Corrupt { seq: 0, message: format!("task locks: {e}") })
                })?,
            );
        }
        Ok(out)
    }

    fn queued(&mut self, now: Timestamp, limit: usize) -> Result<Vec<Task>, TaskError> {
        query_tasks(
            self.tx,
            "SELECT data FROM tasks WHERE status = 'queued' AND (not_before IS NULL OR not_before <= ?1)
             ORDER BY priority DESC, created_at, id LIMIT ?2",
            params![now.as_micros(), i64::try_from(limit).unwrap_or(i64::MAX)],
        )
    }

    fn expired(&mut self, now: Timestamp) -> Result<Vec<Task>, TaskError> {
        query_tasks(self.tx, "SELECT data FROM tasks WHERE lease_expires_at < ?1", [now.as_micros()])
    }

    fn append(&mut self, task_id: &str, data: EventData) -> Result<Seq, TaskError> {
        let json = data.to_json().map_err(|e| TaskError::Invalid(format!("cannot encode event: {e}")))?;
        self.tx
            .prepare_cached("INSERT INTO events (id, run_id, type, v, at, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
            .map_err(sql)?
            .execute(params![
                EventId::generate().as_str(),
                task_id,
                data.kind(),
                EVENT_VERSION,
                Timestamp::now().as_micros(),
                json
            ])
            .map_err(sql)?;
        Ok(self.tx.last_insert_rowid())
    }

    fn leased_by_agent(&mut self, agent: &str) -> Result<u32, TaskError> {
        self.tx
            .prepare_cached(
                "SELECT count(*) FROM tasks WHERE lease_expires_at IS NOT NULL AND status IN ('claimed', 'running')
                 AND json_extract(data, '$.agent') = ?1",
            )
            .map_err(sql)?
            .query_row([agent], |r| r.get::<_, u32>(0))
            .map_err(sql)
    }

    fn next_token(&mut self) -> Result<i64, TaskError> {
        if let Some(t) = self.reserved.next() {
            return Ok(t);
        }
        self.reserve_tokens(1)?;
        self.reserved.next().ok_or_else(|| TaskError::Invalid("no fencing token".into()))
    }

    fn reserve_tokens(&mut self, n: usize) -> Result<(), TaskError> {
        if self.reserved.end - self.reserved.start >= i64::try_from(n).unwrap_or(i64::MAX) {
            return Ok(());
        }
        let n = i64::try_from(n.max(1)).unwrap_or(1);
        let last: i64 = self
            .tx
            .prepare_cached("UPDATE meta SET value = value + ?1 WHERE key = 'fencing' RETURNING value")
            .map_err(sql)?
            .query_row([n], |r| r.get(0))
            .map_err(sql)?;
        // Tokens left over from an earlier reservation are skipped: tokens only need to grow.
        self.reserved = (last - n + 1)..(last + 1);
        Ok(())
    }
}

impl SqliteEventStore {
    /// Runs a task operation in the writer's next transaction; answers after the commit.
    async fn task_op<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn TaskTxn) -> Result<T, TaskError> + Send + 'static,
    ) -> Result<T, TaskError> {
        let (reply, rx) = oneshot::channel::<Result<T, TaskError>>();
        let op: TxOp = Box::new(move |tx: &Transaction<'_>| {
            let mut txn = SqliteTxn { tx, reserved: 0..0 };
            let result = f(&mut txn);
            let ok = result.is_ok();
            let done: TxDone = Box::new(move |commit: Result<(), StoreError>| {
                let _ = reply.send(match commit {
                    Ok(()) => result,
                    Err(e) => Err(TaskError::Store(e)),
                });
            });
            (ok, done)
        });
        self.send(Cmd::Tx { op })?;
        rx.await.map_err(|_| TaskError::Store(StoreError::Closed))?
    }

    async fn read_tasks(
        &self,
        sql_text: &'static str,
        params: Vec<rusqlite::types::Value>,
    ) -> Result<Vec<Task>, TaskError> {
        self.with_reader(move |c| {
            let mut stmt = c.prepare_cached(sql_text).map_err(io_err)?;
            let rows =
                stmt.query_map(rusqlite::params_from_iter(params.iter()), |r| r.get::<_, String>(0)).map_err(io_err)?;
            let mut out = Vec::new();
            for row in rows {
                let data = row.map_err(io_err)?;
                out.push(
                    serde_json::from_str(&data)
                        .map_err(|e| StoreError::Corrupt { seq: 0, message: format!("task record: {e}") })?,
                );
            }
            Ok(out)
        })
        .await
        .map_err(TaskError::Store)
    }
}

fn new_id(new: &NewTask) -> String {
    new.id.clone().unwrap_or_else(|| descartes_protocol::RunId::generate().0)
}

#[async_trait]
impl TaskStore for SqliteEventStore {
    async fn create_task(&self, new: NewTask) -> Result<Task, TaskError> {
        task::validate_new(&new)?;
        let id = new_id(&new);
        let now = self.clock.now();
        self.task_op(move |txn| task::create(txn, new, id, now)).await
    }

    async fn add_dependency(&self, id: &str, dependency: &str) -> Result<Task, TaskError> {
        let (id, dependency, now) = (id.to_owned(), dependency.to_owned(), self.clock.now());
        self.task_op(move |txn| task::add_dependency(txn, &id, &dependency, now)).await
    }

    async fn get_task(&self, id: &str) -> Result<Task, TaskError> {
        self.read_tasks("SELECT data FROM tasks WHERE id = ?1", vec![id.to_owned().into()])
            .await?
            .pop()
            .ok_or_else(|| TaskError::NotFound(id.to_owned()))
    }

    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>, TaskError> {
        let tasks = match filter.status {
            Some(s) => {
                self.read_tasks(
                    "SELECT data FROM tasks WHERE status = ?1 ORDER BY created_at, id",
                    vec![s.as_str().to_owned().into()],
                )
                .await?
            }
            None => self.read_tasks("SELECT data FROM tasks ORDER BY created_at, id", vec![]).await?,
        };
        Ok(match &filter.label {
            Some(l) => tasks.into_iter().filter(|t| t.labels.contains(l)).collect(),
            None => tasks,
        })
    }

    async fn claim(&self, worker: &str, ttl: Duration, max: usize) -> Result<Vec<Claim>, TaskError> {
        let (worker, now) = (worker.to_owned(), self.clock.now());
        self.task_op(move |txn| task::claim(txn, &worker, ttl, max, now)).await
    }

    async fn claim_one(
        &self,
        id: &str,
        worker: &str,
        ttl: Duration,
        agent: Option<(&str, u32)>,
    ) -> Result<Option<Claim>, TaskError> {
        let (id, worker, now) = (id.to_owned(), worker.to_owned(), self.clock.now());
        let agent = agent.map(|(a, n)| (a.to_owned(), n));
        self.task_op(move |txn| {
            task::claim_one(txn, &id, &worker, ttl, agent.as_ref().map(|(a, n)| (a.as_str(), *n)), now)
        })
        .await
    }

    async fn peek_queued(&self, limit: usize) -> Result<Vec<Task>, TaskError> {
        let (now, limit) = (self.clock.now().as_micros(), i64::try_from(limit).unwrap_or(i64::MAX));
        self.read_tasks(
            "SELECT data FROM tasks WHERE status = 'queued' AND (not_before IS NULL OR not_before <= ?1)
             ORDER BY priority DESC, created_at, id LIMIT ?2",
            vec![now.into(), limit.into()],
        )
        .await
    }

    async fn agent_load(&self) -> Result<HashMap<String, u32>, TaskError> {
        self.with_reader(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT json_extract(data, '$.agent'), count(*) FROM tasks
                     WHERE lease_expires_at IS NOT NULL AND status IN ('claimed', 'running')
                     AND json_extract(data, '$.agent') IS NOT NULL GROUP BY 1",
                )
                .map_err(io_err)?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?))).map_err(io_err)?;
            rows.map(|r| r.map_err(io_err)).collect()
        })
        .await
        .map_err(TaskError::Store)
    }

    async fn start(&self, id: &str, token: i64) -> Result<Task, TaskError> {
        let (id, now) = (id.to_owned(), self.clock.now());
        self.task_op(move |txn| task::start(txn, &id, token, now)).await
    }

    async fn heartbeat(&self, id: &str, token: i64, ttl: Duration) -> Result<Task, TaskError> {
        let (id, now) = (id.to_owned(), self.clock.now());
        self.task_op(move |txn| task::heartbeat(txn, &id, token, ttl, now)).await
    }

    async fn complete(&self, id: &str, token: i64, result: Option<String>) -> Result<Task, TaskError> {
        let (id, now) = (id.to_owned(), self.clock.now());
        self.task_op(move |txn| task::complete(txn, &id, token, result, now)).await
    }

    async fn complete_many(
        &self,
        items: Vec<(String, i64, Option<String>)>,
    ) -> Result<Vec<Result<Task, TaskError>>, TaskError> {
        let now = self.clock.now();
        // One operation for the lot: `complete` refuses (stale token, ...) before it writes
        // anything, so a refused task leaves nothing behind and the others go on.
        self.task_op(move |txn| {
            let mut out = Vec::with_capacity(items.len());
            for (id, token, result) in items {
                match task::complete(txn, &id, token, result, now) {
                    Err(e @ TaskError::Store(_)) => return Err(e),
                    other => out.push(other),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn fail(&self, id: &str, token: i64, reason: &str) -> Result<Task, TaskError> {
        let (id, reason, now) = (id.to_owned(), reason.to_owned(), self.clock.now());
        self.task_op(move |txn| task::fail(txn, &id, token, &reason, now)).await
    }

    async fn release(&self, id: &str, token: i64) -> Result<Task, TaskError> {
        let (id, now) = (id.to_owned(), self.clock.now());
        self.task_op(move |txn| task::release(txn, &id, token, now)).await
    }

    async fn cancel(&self, id: &str) -> Result<Task, TaskError> {
        let (id, now) = (id.to_owned(), self.clock.now());
        self.task_op(move |txn| task::cancel(txn, &id, now)).await
    }

    async fn retry(&self, id: &str) -> Result<Task, TaskError> {
        let (id, now) = (id.to_owned(), self.clock.now());
        self.task_op(move |txn| task::retry(txn, &id, now)).await
    }

    async fn reap_expired(&self) -> Result<Vec<Task>, TaskError> {
        let now = self.clock.now();
        self.task_op(move |txn| task::reap_expired(txn, now)).await
    }
}

impl SqliteEventStore {
    /// Runs `f` in the writer's next transaction (with its events); answers after the commit.
    async fn write_op<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel::<Result<T, StoreError>>();
        let op: TxOp = Box::new(move |tx: &Transaction<'_>| {
            let result = f(tx);
            let ok = result.is_ok();
            let done: TxDone = Box::new(move |commit: Result<(), StoreError>| {
                let _ = reply.send(commit.and(result));
            });
            (ok, done)
        });
        self.send(Cmd::Tx { op })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

fn append_raw(tx: &Transaction<'_>, stream: &str, data: &EventData) -> Result<(), StoreError> {
    let json =
        data.to_json().map_err(|e| StoreError::Corrupt { seq: 0, message: format!("cannot encode event: {e}") })?;
    tx.prepare_cached("INSERT INTO events (id, run_id, type, v, at, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
        .map_err(io_err)?
        .execute(params![
            EventId::generate().as_str(),
            stream,
            data.kind(),
            EVENT_VERSION,
            Timestamp::now().as_micros(),
            json
        ])
        .map_err(io_err)?;
    Ok(())
}

fn decode_agent(data: &str) -> Result<AgentRecord, StoreError> {
    serde_json::from_str(data).map_err(|e| StoreError::Corrupt { seq: 0, message: format!("agent record: {e}") })
}

#[async_trait]
impl AgentStore for SqliteEventStore {
    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.with_reader(|c| {
            let mut stmt = c.prepare_cached("SELECT data FROM agents ORDER BY name").map_err(io_err)?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(io_err)?;
            rows.map(|r| decode_agent(&r.map_err(io_err)?)).collect()
        })
        .await
    }

    async fn get_agent(&self, name: &str) -> Result<Option<AgentRecord>, StoreError> {
        let name = name.to_owned();
        self.with_reader(move |c| {
            let data: Option<String> = c
                .prepare_cached("SELECT data FROM agents WHERE name = ?1")
                .map_err(io_err)?
                .query_row([&name], |r| r.get(0))
                .optional()
                .map_err(io_err)?;
            data.map(|d| decode_agent(&d)).transpose()
        })
        .await
    }

    async fn put_agent(&self, agent: &AgentRecord, event: EventData) -> Result<(), StoreError> {
        let data = serde_json::to_string(agent)
            .map_err(|e| StoreError::Corrupt { seq: 0, message: format!("cannot encode agent: {e}") })?;
        let name = agent.name.clone();
        self.write_op(move |tx| {
            tx.prepare_cached(
                "INSERT INTO agents (name, data) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET data = ?2",
            )
            .map_err(io_err)?
            .execute(params![name, data])
            .map_err(io_err)?;
            append_raw(tx, &agent_stream(&name), &event)
        })
        .await
    }

    async fn update_agent(
        &self,
        name: &str,
        what: &str,
        change: AgentChange,
    ) -> Result<Option<AgentRecord>, StoreError> {
        let (name, what) = (name.to_owned(), what.to_owned());
        self.write_op(move |tx| {
            let data: Option<String> = tx
                .prepare_cached("SELECT data FROM agents WHERE name = ?1")
                .map_err(io_err)?
                .query_row([&name], |r| r.get(0))
                .optional()
                .map_err(io_err)?;
            let Some(data) = data else { return Ok(None) };
            let mut agent = decode_agent(&data)?;
            change(&mut agent);
            let json = serde_json::to_string(&agent)
                .map_err(|e| StoreError::Corrupt { seq: 0, message: format!("cannot encode agent: {e}") })?;
            tx.prepare_cached("UPDATE agents SET data = ?2 WHERE name = ?1")
                .map_err(io_err)?
                .execute(params![name, json])
                .map_err(io_err)?;
            append_raw(tx, &agent_stream(&name), &AgentUpdated { change: what.clone(), agent: agent.clone() }.into())?;
            Ok(Some(agent))
        })
        .await
    }

    async fn remove_agent(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_owned();
        self.write_op(move |tx| {
            let n = tx
                .prepare_cached("DELETE FROM agents WHERE name = ?1")
                .map_err(io_err)?
                .execute([&name])
                .map_err(io_err)?;
            if n > 0 {
                append_raw(tx, &agent_stream(&name), &AgentRemoved { name: name.clone() }.into())?;
            }
            Ok(n > 0)
        })
        .await
    }
}

const AUDIT_COLUMNS: &str = "task_id, n, stream, seq, kind, at, digest, prev, hash";

fn audit_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRecord> {
    Ok(AuditRecord {
        task_id: r.get(0)?,
        n: r.get(1)?,
        stream: r.get(2)?,
        seq: r.get(3)?,
        kind: r.get(4)?,
        at: Timestamp(r.get(5)?),
        digest: r.get(6)?,
        prev: r.get(7)?,
        hash: r.get(8)?,
    })
}

#[async_trait]
impl AuditStore for SqliteEventStore {
    async fn audit_append(&self, records: Vec<AuditRecord>) -> Result<(), StoreError> {
        self.write_op(move |tx| {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
                ))
                .map_err(io_err)?;
            for r in &records {
                stmt.execute(params![
                    r.task_id,
                    r.n,
                    r.stream,
                    r.seq,
                    r.kind,
                    r.at.as_micros(),
                    r.digest,
                    r.prev,
                    r.hash
                ])
                .map_err(io_err)?;
            }
            Ok(())
        })
        .await
    }

    async fn audit_records(&self, task_id: Option<&str>) -> Result<Vec<AuditRecord>, StoreError> {
        let task_id = task_id.map(str::to_owned);
        self.with_reader(move |c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {AUDIT_COLUMNS} FROM audit WHERE ?1 IS NULL OR task_id = ?1 ORDER BY task_id, n"
                ))
                .map_err(io_err)?;
            let rows = stmt.query_map([&task_id], audit_row).map_err(io_err)?;
            rows.map(|r| r.map_err(io_err)).collect()
        })
        .await
    }
}
