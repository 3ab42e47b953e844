-- The task model of `descartes-store-pg` (migrations 1-6: tables, indexes, a task record of
-- about 600 bytes of JSON text) with a claim and a complete written as PL/pgSQL functions: one
-- round trip per operation, no client-side work. `bounds.sh` runs it in variants by dropping
-- the lines tagged `@counter`, `@sequence`, `@events`, `@record`, `@json` (the record rewritten by
-- the server, as JSONB) or `@text` (a new record of the same size written as text, as the store
-- does after encoding it itself).
DROP TABLE IF EXISTS tasks, task_deps, events, event_seq CASCADE; DROP SEQUENCE IF EXISTS task_tokens;
CREATE TABLE events (seq BIGINT PRIMARY KEY, id TEXT NOT NULL, run_id TEXT COLLATE "C" NOT NULL, type TEXT NOT NULL, v INTEGER NOT NULL, at BIGINT NOT NULL, key TEXT COLLATE "C", data TEXT NOT NULL);
CREATE INDEX events_by_run ON events (run_id, seq);
CREATE UNIQUE INDEX events_by_key ON events (key) WHERE key IS NOT NULL;
CREATE TABLE event_seq (one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one), value BIGINT NOT NULL);
INSERT INTO event_seq VALUES (TRUE, 0);
CREATE TABLE tasks (id TEXT COLLATE "C" PRIMARY KEY, status TEXT NOT NULL, priority INTEGER NOT NULL, created_at BIGINT NOT NULL, not_before BIGINT, lease_expires_at BIGINT, has_locks BOOLEAN NOT NULL, version BIGINT NOT NULL, data TEXT NOT NULL);
CREATE INDEX tasks_queue ON tasks (priority DESC, created_at, id) WHERE status = 'queued';
CREATE INDEX tasks_leases ON tasks (lease_expires_at) WHERE status IN ('claimed', 'running');
CREATE INDEX tasks_locking ON tasks (status) WHERE has_locks;
CREATE TABLE task_deps (task_id TEXT COLLATE "C" NOT NULL, dep_id TEXT COLLATE "C" NOT NULL, PRIMARY KEY (task_id, dep_id));
CREATE INDEX task_deps_by_dep ON task_deps (dep_id, task_id);
CREATE SEQUENCE task_tokens;
DROP SEQUENCE IF EXISTS evs; CREATE SEQUENCE evs;
INSERT INTO tasks SELECT 't_01JCX' || lpad(g::text, 19, '0'), 'queued', g % 3, 1700000000000000 + g, NULL, NULL, false, 1,
  json_build_object('id', 't_01JCX' || lpad(g::text, 19, '0'), 'title', 't' || g, 'prompt', '', 'type', 'task', 'priority', g % 3, 'labels', '[]'::json,
   'status', 'queued', 'depends_on', '[]'::json, 'locks', '[]'::json, 'claimed_by', null, 'lease_expires_at', null, 'token', null, 'attempts', 0,
   'max_attempts', 3, 'not_before', null, 'result', null, 'error', null, 'blocked_reason', null, 'blocked_by', null, 'needs', '{}'::json, 'agent', null,
   'test_command', null, 'created_at', '2026-12-05T09:30:00.123456Z', 'updated_at', '2026-12-05T09:30:00.123456Z')::text
FROM generate_series(1, 200000) g;
VACUUM ANALYZE tasks;

CREATE OR REPLACE FUNCTION claim(w text, now_us bigint, OUT tid text, OUT tok bigint) LANGUAGE plpgsql AS $$
DECLARE t record; base bigint; ex int;
BEGIN
  SELECT count(*) INTO ex FROM tasks WHERE status IN ('claimed','running') AND lease_expires_at < now_us;
  PERFORM 1 FROM tasks WHERE has_locks AND status = 'queued';
  SELECT tk.id, tk.data, tk.version INTO t FROM tasks tk
    WHERE tk.status = 'queued' AND (tk.not_before IS NULL OR tk.not_before <= now_us) AND NOT tk.has_locks
      AND NOT EXISTS (SELECT 1 FROM task_deps d JOIN tasks p ON p.id = d.dep_id WHERE d.task_id = tk.id AND p.status <> 'done')
    ORDER BY tk.priority DESC, tk.created_at, tk.id LIMIT 1 FOR UPDATE OF tk SKIP LOCKED;
  IF NOT FOUND THEN RETURN; END IF;
  tok := nextval('task_tokens');
  UPDATE tasks SET status = 'claimed', lease_expires_at = now_us + 60000000, version = version + 1
    , data = (data::jsonb || jsonb_build_object('status','claimed','claimed_by',w,'lease_expires_at','2026-12-05T09:31:00.123456Z','token',tok,'attempts',1,'updated_at','2026-12-05T09:30:00.123456Z'))::text -- @record @json
    , data = '{"id":"t_01JCX0000000000000017615","title":"t17615","prompt":"","type":"task","priority":2,"labels":[],"status":"claimed","depends_on":[],"locks":[],"claimed_by":"w1","lease_expires_at":"2026-12-05T09:31:00.123456Z","token":5872,"attempts":1,"max_attempts":3,"not_before":null,"result":null,"error":null,"blocked_reason":null,"blocked_by":null,"needs":{},"agent":null,"test_command":null,"created_at":"2026-12-05T09:30:00.123456Z","updated_at":"2026-12-05T09:30:00.123456Z"}' -- @record @text
    WHERE id = t.id AND version = t.version;
  UPDATE event_seq SET value = value + 1 RETURNING value INTO base; -- @events @counter
  base := nextval('evs'); -- @events @sequence
  INSERT INTO events VALUES (base, gen_random_uuid()::text, 'task:' || t.id, 'task.claimed', 1, now_us, NULL, -- @events
    json_build_object('type','task.claimed','task_id',t.id,'worker',w,'token',tok,'lease_expires_at','2026-12-05T09:31:00.123456Z','attempt',1)::text); -- @events
  tid := t.id;
END $$;

CREATE OR REPLACE FUNCTION complete(tid text, tk bigint, now_us bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE t record; base bigint;
BEGIN
  SELECT id, data, version, status INTO t FROM tasks WHERE id = tid;
  IF t.status <> 'claimed' THEN RAISE EXCEPTION 'not claimed'; END IF;
  UPDATE tasks SET status = 'done', lease_expires_at = NULL, version = version + 1
    , data = (data::jsonb || jsonb_build_object('status','done','lease_expires_at',null,'result',null,'updated_at','2026-12-05T09:30:00.123456Z'))::text -- @record @json
    , data = '{"id":"t_01JCX0000000000000017615","title":"t17615","prompt":"","type":"task","priority":2,"labels":[],"status":"claimed","depends_on":[],"locks":[],"claimed_by":"w1","lease_expires_at":"2026-12-05T09:31:00.123456Z","token":5872,"attempts":1,"max_attempts":3,"not_before":null,"result":null,"error":null,"blocked_reason":null,"blocked_by":null,"needs":{},"agent":null,"test_command":null,"created_at":"2026-12-05T09:30:00.123456Z","updated_at":"2026-12-05T09:30:00.123456Z"}' -- @record @text
    WHERE id = tid AND version = t.version;
  UPDATE event_seq SET value = value + 1 RETURNING value INTO base; -- @events @counter
  base := nextval('evs'); -- @events @sequence
  INSERT INTO events VALUES (base, gen_random_uuid()::text, 'task:' || tid, 'task.completed', 1, now_us, NULL, -- @events
    json_build_object('type','task.completed','task_id',tid,'token',tk,'result',null)::text); -- @events
  RETURN base;
END $$;
