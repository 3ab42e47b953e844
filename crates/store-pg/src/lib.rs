//! The Descartes event store and task store on PostgreSQL: how daemons on several machines
//! share one log and one task queue.
//!
//! [`PgStore::connect`] opens a store on a `postgres://` URL: it runs the embedded migrations
//! (idempotent, under an advisory lock, so several processes may open a database at once),
//! starts an event writer thread, and keeps a small pool of connections for reads and task
//! operations. It implements [`descartes_core::EventStore`] and [`descartes_core::TaskStore`];
//! the task rules are the shared ones of [`descartes_core::task`], run inside PostgreSQL
//! transactions that group the concurrent operations of a process (see the `tasks` module for
//! how concurrent workers are kept apart).
//!
//! # Event order
//!
//! Followers read "events after cursor `c`", so an event must never become visible with a
//! `seq` lower than one already visible: `seq` must increase in *commit* order, not merely be
//! unique. A PostgreSQL sequence does not give that (a transaction may take seq 10, commit after
//! the one that took 11, and a follower that read 11 in between never sees 10). So seqs come
//! from a one-row counter, `event_seq`, which every appending transaction updates: its row lock
//! is held until commit, so appenders take turns from their first event to their commit, and a
//! seq is visible only once every lower one is.
//!
//! The cost: appending transactions are serialized from their first event to the end of their
//! commit, WAL flush included. With `synchronous_commit = on` that bounds the database to
//! roughly one appending transaction per WAL flush, whatever the number of workers and
//! machines. What softens it: group commit. The event writer thread groups the concurrent
//! appends of one process into one transaction, and task operations are grouped likewise (each
//! group writes its events in one statement just before its commit, so the counter is held only
//! from there to the commit). On the development machine (2 CPUs, durable commits) that gives
//! about 1,600-2,300 claim+complete per second with 4 workers and one task per claim, and
//! 10,000-15,500 with claims of 32 completed by [`PgStore::complete_many`] (see the `pg_tasks`
//! benchmark and `docs/PERFORMANCE.md`); the CPU, two thirds of it in the server, is then the
//! limit.
//!
//! Letting appenders commit in parallel does not raise that figure on the development machine:
//! an experiment (session 5) that committed task events to an unlocked inbox table, moved to
//! `events` with their seqs by the event writer, measured no faster, and slower with the moves
//! and the inbox's vacuuming counted; with group commit the counter is not the limit there, the
//! server's CPU per statement is (see `docs/PERFORMANCE.md`). Seqs from transaction ids, with
//! followers reading below the oldest running transaction (`pg_snapshot_xmin`), would avoid the
//! moves but stall every follower behind any long transaction in the cluster.
//!
//! # Blocking
//!
//! The `postgres` client is synchronous (it blocks on a private runtime), so every database call
//! runs off the async runtime: on the writer thread, in `spawn_blocking`, or (for `connect`) on
//! a plain thread. Connections are plain TCP (`NoTls`): use a local socket, a private network,
//! or a TLS tunnel to reach a remote server.

mod agents;
mod conn;
mod maintenance;
mod schema;
mod store;
mod tasks;
pub mod testing;

pub use conn::{PgOptions, redact_url};
pub use store::PgStore;
