DROP TABLE IF EXISTS raw_tasks;
CREATE TABLE raw_tasks (id bigserial primary key, status text not null default 'queued', priority int not null, worker text, token bigint default 0);
CREATE INDEX raw_q ON raw_tasks (priority desc, id) WHERE status = 'queued';
INSERT INTO raw_tasks (priority) SELECT (random()*3)::int FROM generate_series(1,200000);
VACUUM ANALYZE raw_tasks;
