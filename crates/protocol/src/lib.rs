//! The serialized, versioned types every other Descartes crate speaks: identifiers, the event
//! envelope and its typed payloads, and the provider-neutral conversation model.
//!
//! This crate does no IO. Everything here is plain data with `serde` implementations whose
//! JSON shape is part of Descartes' public contract (the event log, `--json` output, the
//! daemon API), so changes must stay backwards compatible: add optional fields, add event
//! types, never rename.

mod conversation;
mod event;
mod ids;
mod task;

pub use conversation::*;
pub use event::*;
pub use ids::*;
pub use task::*;
