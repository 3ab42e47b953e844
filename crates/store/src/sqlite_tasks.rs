//! `TaskStore` on SQLite: the shared rules of `descartes_core::task` run inside the event
//! writer's transactions (so task operations share group commits with events and are atomic
//! with the events they append).

use std::time::Duration;

use async_trait::async_trait;
use descartes_core::task::{self, TaskTxn};
use descartes_core::{StoreError, TaskError, TaskFilter, TaskStore};
use descartes_protocol::{Claim, EVENT_VERSION, EventData, EventId, NewTask, Seq, Task, Timestamp};
use rusqlite::{OptionalExtension, Transaction, params};
use tokio::sync::oneshot;

use crate::sqlite::{Cmd, SqliteEventStore, TxDone, TxOp, io_err};

struct SqliteTxn<'a> {
    tx: &'a Transaction<'a>,
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
        self.tx
            .prepare_cached(
                "INSERT INTO tasks (id, status, priority, created_at, not_before, lease_expires_at, locks, data)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (id) DO UPDATE SET status = ?2, priority = ?3, not_before = ?5, lease_expires_at = ?6,
                     locks = ?7, data = ?8",
            )
            .map_err(sql)?
            .execute(params![
                task.id,
                task.status.as_str(),
                task.priority,
                task.created_at.as_micros(),
                task.not_before.map(Timestamp::as_micros),
                if task.status.is_leased() { task.lease_expires_at.map(Timestamp::as_micros) } else { None },
                locks,
                data
            ])
            .map_err(sql)?;
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

    fn next_token(&mut self) -> Result<i64, TaskError> {
        self.tx
            .prepare_cached("UPDATE meta SET value = value + 1 WHERE key = 'fencing' RETURNING value")
            .map_err(sql)?
            .query_row([], |r| r.get(0))
            .map_err(sql)
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
            let mut txn = SqliteTxn { tx };
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

    async fn read_tasks(&self, sql_text: &'static str, id: Option<String>) -> Result<Vec<Task>, TaskError> {
        self.with_reader(move |c| {
            let mut stmt = c.prepare_cached(sql_text).map_err(io_err)?;
            let params: Vec<&dyn rusqlite::ToSql> = match &id {
                Some(id) => vec![id as &dyn rusqlite::ToSql],
                None => vec![],
            };
            let rows = stmt.query_map(params.as_slice(), |r| r.get::<_, String>(0)).map_err(io_err)?;
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
        self.read_tasks("SELECT data FROM tasks WHERE id = ?1", Some(id.to_owned()))
            .await?
            .pop()
            .ok_or_else(|| TaskError::NotFound(id.to_owned()))
    }

    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>, TaskError> {
        let tasks = match filter.status {
            Some(s) => {
                self.read_tasks(
                    "SELECT data FROM tasks WHERE status = ?1 ORDER BY created_at, id",
                    Some(s.as_str().to_owned()),
                )
                .await?
            }
            None => self.read_tasks("SELECT data FROM tasks ORDER BY created_at, id", None).await?,
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
