//! Event store implementations: SQLite (the default, durable, group commit) and in-memory
//! (tests, embedding).
//!
//! Invariants: only this crate knows SQL. `seq` is assigned by the database inside the write
//! transaction, so it is global and strictly increasing even with several processes writing
//! one file. Events are never updated or deleted (triggers refuse it). The `runs` table is a
//! projection of lifecycle events, written in the same transaction as the events it reflects.

mod memory;
mod sqlite;
mod sqlite_tasks;

pub use memory::MemoryEventStore;
pub use sqlite::{INDEX_LAG, SqliteEventStore, SqliteOptions, SyncMode};
