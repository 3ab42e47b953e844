//! Domain logic and traits of Descartes.
//!
//! Invariants: this crate does no IO of its own (no SQL, no HTTP, no terminal, no files).
//! Everything external comes in through a trait: [`EventStore`], [`Provider`], [`Tool`],
//! [`Prompter`], [`OutputSink`]. The agent loop ([`agent`]) and the run fold ([`state`]) are
//! pure logic over those traits, which is what makes them testable with in-memory fakes.

pub mod agent;
pub mod error;
pub mod permission;
pub mod provider;
pub mod state;
pub mod store;
pub mod task;
pub mod testing;
pub mod tool;

pub use agent::{Agent, AgentConfig, OutputSink, RunOutcome};
pub use error::{CoreError, Result};
pub use permission::{PermissionRequest, PromptAnswer, Prompter};
pub use provider::{ModelRequest, ModelStream, Provider, ProviderError, ResponseAssembler, StreamEvent};
pub use state::{RunState, RunStatus};
pub use store::{DeferredAppend, EventStore, RunSummary, StoreError};
pub use task::{Clock, SystemClock, TaskError, TaskFilter, TaskStore, TaskTxn};
pub use tool::{Recovery, Tool, ToolContext, ToolOutput, ToolRegistry};
