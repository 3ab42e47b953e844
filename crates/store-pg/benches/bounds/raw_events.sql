DROP TABLE IF EXISTS raw_events; DROP SEQUENCE IF EXISTS rs; CREATE SEQUENCE rs;
CREATE TABLE raw_events (seq bigint primary key, task bigint not null, kind text not null, data text not null);
