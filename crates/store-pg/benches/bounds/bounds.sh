#!/usr/bin/env bash
# What PostgreSQL itself can do on this machine, to set the store's figures against.
#
#   crates/store-pg/benches/bounds/bounds.sh [ROUNDS]
#
# Runs pgbench (4 clients, 6 s, prepared statements) on scripts that claim and complete tasks:
#   raw                  one `UPDATE … SKIP LOCKED … RETURNING` claim and one `UPDATE` complete per
#                        task on a minimal table (the issue's "raw SQL ceiling")
#   raw+events           the same, each statement also inserting one event row
#   model/counter        the store's own tables and indexes, claim and complete as PL/pgSQL functions
#                        (one round trip each), seqs from the `event_seq` counter as the store does
#   model/sequence       the same, seqs from a sequence (no commit-order guarantee: a bound only)
#   model/sequence-text-record   the same, the new record written as text of the same size
#                        (encoded by the client, as the store does) instead of edited as JSONB
#   model/no-events      the same without event rows
#   model/no-events-no-record   and without rewriting the task's JSON record
# Every run starts from a fresh table of 200,000 queued tasks. Connection: PGHOST (127.0.0.1),
# PGPORT, PGUSER (postgres); the database `descartes_bounds` is created and dropped.
set -euo pipefail
cd "$(dirname "$0")"
export PGHOST="${PGHOST:-127.0.0.1}" PGUSER="${PGUSER:-postgres}" PGOPTIONS="-c client_min_messages=warning"
rounds="${1:-3}"
db=descartes_bounds
psql -q -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
trap 'psql -q -d postgres -c "DROP DATABASE IF EXISTS $db"' EXIT
# The store plans its task statements as index walks and without JIT (see tasks.rs).
for s in "enable_seqscan = off" "enable_bitmapscan = off" "enable_sort = off" "jit = off"; do
    psql -q -d postgres -c "ALTER DATABASE $db SET $s"
done

bench() { # name script
    local tps
    tps=$(pgbench -n -c 4 -j 2 -T 6 -M prepared -f "$2" "$db" 2>&1 | sed -n 's/^tps = \([0-9]*\).*/\1/p')
    printf '%-28s %6s/s\n' "$1" "${tps:-failed}"
}

# The store vacuums `event_seq` itself when autovacuum is off (maintenance.rs); so does this.
vacuum_counter() {
    for _ in $(seq 1 60); do psql -q -d "$db" -c "VACUUM event_seq" >/dev/null 2>&1 || true; sleep 0.1; done
}

for _ in $(seq 1 "$rounds"); do
    psql -q -v ON_ERROR_STOP=1 -d "$db" -f raw.sql >/dev/null
    bench raw raw_claim.sql
    psql -q -v ON_ERROR_STOP=1 -d "$db" -f raw.sql -f raw_events.sql >/dev/null
    bench raw+events raw_claim_events.sql
    for variant in counter sequence sequence-text-record no-events no-events-no-record; do
        case $variant in
            counter) drop='@sequence|@text' ;;
            sequence) drop='@counter|@text' ;;
            sequence-text-record) drop='@counter|@json' ;;
            no-events) drop='@events|@text' ;;
            no-events-no-record) drop='@events|@record' ;;
        esac
        grep -Ev -- "$drop" model.sql | psql -q -v ON_ERROR_STOP=1 -d "$db" >/dev/null
        if [ "$variant" = counter ]; then vacuum_counter & fi
        bench "model/$variant" model_run.sql
        wait
    done
done
