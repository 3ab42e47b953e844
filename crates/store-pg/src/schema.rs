//! The schema, as embedded migrations run on open.
//!
//! Migrations run under a session advisory lock, so two processes opening the same database at
//! once take turns; each migration runs in its own transaction with the row that records it in
//! `descartes_migrations`, so a migration is applied exactly once.

use postgres::Client;

/// Namespace (first key) of Descartes' advisory locks: "DESC".
pub(crate) const LOCK_NS: i32 = 0x4445_5343;
/// Held (session-level) while migrating.
pub(crate) const LOCK_MIGRATE: i32 = 1;
/// Held (transaction-level) by claims that may take tasks with path locks.
pub(crate) const LOCK_CLAIM: i32 = 2;
/// Held (transaction-level) while adding a dependency edge (cycle checks are race-free).
pub(crate) const LOCK_GRAPH: i32 = 3;

/// The migrations, in order; version = index + 1.
pub(crate) const MIGRATIONS: &[&str] = &[
    r#"
-- The event log. `seq` is handed out from `event_seq` inside the appending transaction.
CREATE TABLE events (
    seq     BIGINT PRIMARY KEY,
    id      TEXT NOT NULL,
    run_id  TEXT NOT NULL,
    type    TEXT NOT NULL,
    v       INTEGER NOT NULL,
    at      BIGINT NOT NULL,
    key     TEXT UNIQUE,
    data    TEXT NOT NULL
);
CREATE INDEX events_by_run ON events (run_id, seq);

-- The last seq handed out (one row). Every appending transaction updates it, which serializes
-- appenders from their first event to their commit: seqs become visible in commit order.
CREATE TABLE event_seq (
    one    BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    value  BIGINT NOT NULL
);
INSERT INTO event_seq (one, value) VALUES (TRUE, 0);

CREATE FUNCTION descartes_refuse_event_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only';
END
$$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION descartes_refuse_event_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION descartes_refuse_event_change();

-- Projection of run lifecycle events, written in the appending transaction.
CREATE TABLE runs (
    run_id      TEXT PRIMARY KEY,
    status      TEXT NOT NULL,
    prompt      TEXT NOT NULL,
    provider    TEXT NOT NULL,
    model       TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX runs_by_start ON runs (started_at DESC, run_id DESC);

-- Tasks: the whole record in `data`, the columns the queue needs beside it. `version` grows
-- with every write (optimistic concurrency: a write based on a stale read is refused).
CREATE TABLE tasks (
    id                TEXT PRIMARY KEY,
    status            TEXT NOT NULL,
    priority          INTEGER NOT NULL,
    created_at        BIGINT NOT NULL,
    not_before        BIGINT,
    lease_expires_at  BIGINT,
    has_locks         BOOLEAN NOT NULL,
    version           BIGINT NOT NULL,
    data              JSONB NOT NULL
);
CREATE INDEX tasks_queue ON tasks (priority DESC, created_at, id) WHERE status = 'queued';
CREATE INDEX tasks_leases ON tasks (lease_expires_at) WHERE status IN ('claimed', 'running');
CREATE INDEX tasks_locking ON tasks (status) WHERE has_locks;
CREATE INDEX tasks_by_age ON tasks (created_at, id);
CREATE INDEX tasks_by_status ON tasks (status, created_at, id);

CREATE TABLE task_deps (
    task_id  TEXT NOT NULL,
    dep_id   TEXT NOT NULL,
    PRIMARY KEY (task_id, dep_id)
);
CREATE INDEX task_deps_by_dep ON task_deps (dep_id, task_id);

-- Fencing tokens: strictly increasing across every process.
CREATE SEQUENCE task_tokens;
"#,
    r#"
ALTER TABLE runs ADD COLUMN tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0;
"#,
    r#"
-- The agent registry (a projection of the `agent:<name>` streams).
CREATE TABLE agents (
    name  TEXT PRIMARY KEY,
    data  JSONB NOT NULL
);
-- The tasks' audit trail: hash-chained records, one per event (see descartes_core::audit).
CREATE TABLE audit (
    task_id  TEXT NOT NULL,
    n        BIGINT NOT NULL,
    stream   TEXT NOT NULL,
    seq      BIGINT NOT NULL,
    kind     TEXT NOT NULL,
    at       BIGINT NOT NULL,
    digest   TEXT NOT NULL,
    prev     TEXT NOT NULL,
    hash     TEXT NOT NULL,
    PRIMARY KEY (task_id, n)
);
"#,
    r#"
-- Every task row is rewritten several times (never as a HOT update: the writes change indexed
-- columns), so the table needs vacuuming long before the default 20% of it is dead.
ALTER TABLE tasks SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000,
                       autovacuum_analyze_scale_factor = 0.05);
"#,
    r#"
-- A task row is rewritten at every step of its life, and every rewrite adds an entry to each
-- index of the table: keep only the indexes the queue, the leases and the path locks need
-- (listing sorts), and keep the record as text (no JSONB parse on every write; queries that
-- look inside cast it).
DROP INDEX IF EXISTS tasks_by_age;
DROP INDEX IF EXISTS tasks_by_status;
ALTER TABLE tasks ALTER COLUMN data TYPE TEXT USING data::text;
-- Most events have no idempotency key: index only those that do.
ALTER TABLE events DROP CONSTRAINT IF EXISTS events_key_key;
CREATE UNIQUE INDEX IF NOT EXISTS events_by_key ON events (key) WHERE key IS NOT NULL;
"#,
    r#"
-- Task ids, run ids and idempotency keys compare byte by byte ("C", as SQLite's BINARY does)
-- instead of by the database's locale: every index lookup and join on them otherwise pays for
-- the locale's comparison (strcoll). Only the order of ids that differ in case or punctuation
-- changes, and ids are used as the last tie-break of the queue's order.
ALTER TABLE tasks ALTER COLUMN id TYPE TEXT COLLATE "C";
ALTER TABLE task_deps ALTER COLUMN task_id TYPE TEXT COLLATE "C", ALTER COLUMN dep_id TYPE TEXT COLLATE "C";
ALTER TABLE events ALTER COLUMN run_id TYPE TEXT COLLATE "C", ALTER COLUMN key TYPE TEXT COLLATE "C";
"#,
    r#"
-- Tokens counted by Descartes for providers that report no usage (see Usage::estimated).
ALTER TABLE runs ADD COLUMN estimated_tokens BIGINT NOT NULL DEFAULT 0;
"#,
];

/// Runs the migrations not applied yet; safe when several processes open the database at once.
pub(crate) fn migrate(client: &mut Client) -> Result<(), postgres::Error> {
    client.execute("SELECT pg_advisory_lock($1, $2)", &[&LOCK_NS, &LOCK_MIGRATE])?;
    let result = apply(client);
    let unlocked = client.execute("SELECT pg_advisory_unlock($1, $2)", &[&LOCK_NS, &LOCK_MIGRATE]);
    result?;
    unlocked.map(|_| ())
}

fn apply(client: &mut Client) -> Result<(), postgres::Error> {
    client.batch_execute(
        "CREATE TABLE IF NOT EXISTS descartes_migrations (
            version     INTEGER PRIMARY KEY,
            applied_at  TIMESTAMPTZ NOT NULL DEFAULT now()
        )",
    )?;
    let applied: Option<i32> = client.query_one("SELECT MAX(version) FROM descartes_migrations", &[])?.get(0);
    let applied = usize::try_from(applied.unwrap_or(0)).unwrap_or(0);
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        let mut tx = client.transaction()?;
        tx.batch_execute(sql)?;
        tx.execute("INSERT INTO descartes_migrations (version) VALUES ($1)", &[&version])?;
        tx.commit()?;
    }
    Ok(())
}
