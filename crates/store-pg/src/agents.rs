//! The agent registry on PostgreSQL: the `agents` table, each change written with its event in
//! one transaction.

use async_trait::async_trait;
use descartes_core::StoreError;
use descartes_core::routing::{AgentChange, AgentStore, agent_stream};
use descartes_protocol::{AgentRecord, AgentRemoved, AgentUpdated, EVENT_VERSION, EventData, EventId, Timestamp};

use crate::PgStore;
use crate::conn::Conn;

const LIST: &str = "SELECT data::text FROM agents ORDER BY name";
const GET: &str = "SELECT data::text FROM agents WHERE name = $1";
const UPSERT: &str = "INSERT INTO agents (name, data) VALUES ($1, $2::text::jsonb)
    ON CONFLICT (name) DO UPDATE SET data = EXCLUDED.data";
const DELETE: &str = "DELETE FROM agents WHERE name = $1";

fn decode(data: &str) -> Result<AgentRecord, StoreError> {
    serde_json::from_str(data).map_err(|e| StoreError::Corrupt { seq: 0, message: format!("agent record: {e}") })
}

/// Appends one event in `tx`; returns the event counter's value before it (its seq is one more).
fn insert_event(
    tx: &mut postgres::Transaction<'_>,
    stmts: &mut crate::conn::StmtCache,
    stream: &str,
    kind: &str,
    json: &str,
) -> Result<i64, postgres::Error> {
    let insert = stmts.get(tx, crate::store::INSERT_EVENTS)?;
    let id = EventId::generate();
    let row = tx.query_one(
        &insert,
        &[
            &1i64,
            &vec![id.as_str()],
            &vec![stream],
            &vec![kind],
            &vec![i32::from(EVENT_VERSION)],
            &vec![Timestamp::now().as_micros()],
            &vec![None::<&str>],
            &vec![json],
        ],
    )?;
    row.try_get(0)
}

impl PgStore {
    async fn read_agents(&self, sql: &'static str, name: Option<String>) -> Result<Vec<AgentRecord>, StoreError> {
        self.with_conn(move |conn, target| {
            let Conn { client, stmts, .. } = conn;
            let stmt = stmts.get(client, sql).map_err(|e| target.error(&e))?;
            let rows = match &name {
                Some(n) => client.query(&stmt, &[n]),
                None => client.query(&stmt, &[]),
            }
            .map_err(|e| target.error(&e))?;
            rows.iter().map(|r| decode(r.try_get::<_, &str>(0).map_err(|e| target.error(&e))?)).collect()
        })
        .await
    }

    /// Runs `change` (a statement on the `agents` row) and appends `event` to the agent's
    /// stream, in one transaction. Returns the rows `change` touched.
    async fn agent_write(
        &self,
        sql: &'static str,
        name: String,
        data: Option<String>,
        event: EventData,
        only_if_changed: bool,
    ) -> Result<u64, StoreError> {
        let json = event
            .to_json()
            .map_err(|e| StoreError::Corrupt { seq: 0, message: format!("cannot encode event: {e}") })?;
        let kind = event.kind().to_owned();
        let seq = self
            .with_conn(move |conn, target| {
                let Conn { client, stmts, .. } = conn;
                let mut tx = client.transaction().map_err(|e| target.error(&e))?;
                let stmt = stmts.get(&mut tx, sql).map_err(|e| target.error(&e))?;
                let n = match &data {
                    Some(d) => tx.execute(&stmt, &[&name, d]),
                    None => tx.execute(&stmt, &[&name]),
                }
                .map_err(|e| target.error(&e))?;
                if only_if_changed && n == 0 {
                    return Ok((n, None));
                }
                let base =
                    insert_event(&mut tx, stmts, &agent_stream(&name), &kind, &json).map_err(|e| target.error(&e))?;
                tx.commit().map_err(|e| target.error(&e))?;
                Ok((n, Some(base + 1)))
            })
            .await?;
        if let (_, Some(seq)) = seq {
            self.notify(seq);
        }
        Ok(seq.0)
    }
}

#[async_trait]
impl AgentStore for PgStore {
    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.read_agents(LIST, None).await
    }

    async fn get_agent(&self, name: &str) -> Result<Option<AgentRecord>, StoreError> {
        Ok(self.read_agents(GET, Some(name.to_owned())).await?.pop())
    }

    async fn put_agent(&self, agent: &AgentRecord, event: EventData) -> Result<(), StoreError> {
        let data = serde_json::to_string(agent)
            .map_err(|e| StoreError::Corrupt { seq: 0, message: format!("cannot encode agent: {e}") })?;
        self.agent_write(UPSERT, agent.name.clone(), Some(data), event, false).await?;
        Ok(())
    }

    async fn update_agent(
        &self,
        name: &str,
        what: &str,
        change: AgentChange,
    ) -> Result<Option<AgentRecord>, StoreError> {
        let (name, what) = (name.to_owned(), what.to_owned());
        let done = self
            .with_conn(move |conn, target| {
                let Conn { client, stmts, .. } = conn;
                let mut tx = client.transaction().map_err(|e| target.error(&e))?;
                let row = tx
                    .query_opt("SELECT data::text FROM agents WHERE name = $1 FOR UPDATE", &[&name])
                    .map_err(|e| target.error(&e))?;
                let Some(row) = row else { return Ok(None) };
                let mut agent = decode(row.try_get::<_, &str>(0).map_err(|e| target.error(&e))?)?;
                change(&mut agent);
                let data = serde_json::to_string(&agent)
                    .map_err(|e| StoreError::Corrupt { seq: 0, message: format!("cannot encode agent: {e}") })?;
                tx.execute("UPDATE agents SET data = $2::text::jsonb WHERE name = $1", &[&name, &data])
                    .map_err(|e| target.error(&e))?;
                let event: EventData = AgentUpdated { change: what.clone(), agent: agent.clone() }.into();
                let json = event
                    .to_json()
                    .map_err(|e| StoreError::Corrupt { seq: 0, message: format!("cannot encode event: {e}") })?;
                let base = insert_event(&mut tx, stmts, &agent_stream(&name), event.kind(), &json)
                    .map_err(|e| target.error(&e))?;
                tx.commit().map_err(|e| target.error(&e))?;
                Ok(Some((agent, base + 1)))
            })
            .await?;
        Ok(done.map(|(agent, seq)| {
            self.notify(seq);
            agent
        }))
    }

    async fn remove_agent(&self, name: &str) -> Result<bool, StoreError> {
        let event = AgentRemoved { name: name.to_owned() }.into();
        Ok(self.agent_write(DELETE, name.to_owned(), None, event, true).await? > 0)
    }
}

const AUDIT_INSERT: &str = "INSERT INTO audit (task_id, n, stream, seq, kind, at, digest, prev, hash)
    SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::int8[], $5::text[], $6::int8[], $7::text[],
        $8::text[], $9::text[])";
const AUDIT_READ: &str = "SELECT task_id, n, stream, seq, kind, at, digest, prev, hash FROM audit
    WHERE $1::text IS NULL OR task_id = $1 ORDER BY task_id, n";

#[async_trait]
impl descartes_core::audit::AuditStore for PgStore {
    async fn audit_append(&self, records: Vec<descartes_core::audit::AuditRecord>) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let pg = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pg.get()?;
            let Conn { client, stmts, .. } = &mut *conn;
            let stmt = stmts.get(client, AUDIT_INSERT).map_err(|e| pg.target.error(&e))?;
            let col = |f: fn(&descartes_core::audit::AuditRecord) -> String| records.iter().map(f).collect::<Vec<_>>();
            let ints = |f: fn(&descartes_core::audit::AuditRecord) -> i64| records.iter().map(f).collect::<Vec<_>>();
            client
                .execute(
                    &stmt,
                    &[
                        &col(|r| r.task_id.clone()),
                        &ints(|r| r.n),
                        &col(|r| r.stream.clone()),
                        &ints(|r| r.seq),
                        &col(|r| r.kind.clone()),
                        &ints(|r| r.at.as_micros()),
                        &col(|r| r.digest.clone()),
                        &col(|r| r.prev.clone()),
                        &col(|r| r.hash.clone()),
                    ],
                )
                .map_err(|e| pg.target.error(&e))?;
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Io { message: format!("database task failed: {e}"), busy: false })?
    }

    async fn audit_records(
        &self,
        task_id: Option<&str>,
    ) -> Result<Vec<descartes_core::audit::AuditRecord>, StoreError> {
        let task_id = task_id.map(str::to_owned);
        self.with_conn(move |conn, target| {
            let Conn { client, stmts, .. } = conn;
            let stmt = stmts.get(client, AUDIT_READ).map_err(|e| target.error(&e))?;
            let rows = client.query(&stmt, &[&task_id]).map_err(|e| target.error(&e))?;
            rows.iter()
                .map(|r| {
                    let g = |e: postgres::Error| target.error(&e);
                    Ok(descartes_core::audit::AuditRecord {
                        task_id: r.try_get(0).map_err(g)?,
                        n: r.try_get(1).map_err(g)?,
                        stream: r.try_get(2).map_err(g)?,
                        seq: r.try_get(3).map_err(g)?,
                        kind: r.try_get(4).map_err(g)?,
                        at: Timestamp(r.try_get(5).map_err(g)?),
                        digest: r.try_get(6).map_err(g)?,
                        prev: r.try_get(7).map_err(g)?,
                        hash: r.try_get(8).map_err(g)?,
                    })
                })
                .collect()
        })
        .await
    }
}
